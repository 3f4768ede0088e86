//! Admission: at what level a workload may run on a node, under the cluster's level
//! policy. Pure functions over a workload, the policy and a node's tags; one path for
//! every placement (create, a pending placement, an `ha` restart, a move), so a rule
//! cannot hold in one and be missed in another.
//!
//! The policy sets minimum levels by node tag (`compliance=pci: ft`). A workload
//! placed on such a node is **raised** to the minimum ([`admit`]); one that cannot run
//! at it (a process, or a module that cannot be checkpointed, at `ft`; a spec that does
//! not hold at the higher level) is **kept off** such nodes: the scheduler is given the
//! constraints ([`kept_off`]) and an unplaceable verdict says why ([`explain`]). A move
//! of a running workload never changes its level: it is kept off every node whose
//! minimum is above it ([`Placement::Move`]).

use std::collections::BTreeMap;

use avail_model::spec::{DriverKind, LevelPolicy};
use avail_model::{Constraint, Level, Workload, WorkloadSpec};

/// The level a new workload gets: its spec's, or when the spec names none
/// (`names_level` false) the cluster's default, at most `ha` for a process.
pub fn initial_level(spec: &WorkloadSpec, names_level: bool, policy: &LevelPolicy) -> Level {
    if names_level {
        return spec.level;
    }
    match (spec.driver, policy.default) {
        (DriverKind::Process, Level::Ft) => Level::Ha,
        (_, l) => l,
    }
}

/// Whether a wasm module runs plain (without checkpoints) at `level`, from what the
/// checkpoint rewrite said of it (`rewrite`): it does when the rewrite refuses it,
/// except at `ft`, which cannot run without checkpoints (the rewrite's reason).
pub fn runs_plain(level: Level, rewrite: &Result<(), String>) -> Result<bool, String> {
    match rewrite {
        Ok(()) => Ok(false),
        Err(e) if level == Level::Ft => Err(e.clone()),
        Err(_) => Ok(true),
    }
}

/// What kind of placement is being admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// A new run: a create, a pending workload placed, an `ha` restart. The level may
    /// be raised to the node's minimum.
    Start,
    /// A running workload moved live (drain): its level stays.
    Move,
}

/// The level a workload gets on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// Its own level.
    AsIs,
    /// Raised to the node's minimum, set by `tag`.
    Raised {
        /// The new level.
        level: Level,
        /// The node tag whose minimum it is (`compliance=pci`).
        tag: String,
    },
}

impl Admitted {
    /// The note kept in the workload's status when the level was raised.
    pub fn message(&self) -> Option<String> {
        match self {
            Admitted::AsIs => None,
            Admitted::Raised { level, tag } => {
                Some(format!("level {} required on {tag}", level.as_str()))
            }
        }
    }
}

/// Whether `w` can run at level `ft`: a wasm module that can be checkpointed.
pub fn ft_capable(w: &Workload) -> bool {
    w.spec.driver == DriverKind::Wasm && !w.status.plain
}

/// Whether `w` may run at `level` (its spec holds there and its driver can).
fn can_run_at(w: &Workload, level: Level) -> Result<(), String> {
    if level == Level::Ft && !ft_capable(w) {
        return Err(match w.spec.driver {
            DriverKind::Wasm => "its module cannot be checkpointed".into(),
            d => format!("a {} workload cannot run at ft", d.as_str()),
        });
    }
    let mut spec = w.spec.clone();
    spec.level = level;
    spec.validate().map_err(|e| e.to_string())
}

/// Admit `w` onto a node with `tags`: as it is, raised to the node's minimum, or
/// refused with the reason (it cannot run at the minimum; for a move, any minimum
/// above its level).
pub fn admit(
    w: &Workload,
    policy: &LevelPolicy,
    tags: &BTreeMap<String, String>,
    kind: Placement,
) -> Result<Admitted, String> {
    let Some((min, tag)) = policy.minimum_for(tags) else {
        return Ok(Admitted::AsIs);
    };
    if min.rank() <= w.spec.level.rank() {
        return Ok(Admitted::AsIs);
    }
    if kind == Placement::Move {
        return Err(format!(
            "{tag} requires level {}, above its level {}; a move keeps the level",
            min.as_str(),
            w.spec.level.as_str()
        ));
    }
    can_run_at(w, min).map_err(|why| {
        format!(
            "{tag} requires level {}, which it cannot run at: {why}",
            min.as_str()
        )
    })?;
    Ok(Admitted::Raised {
        level: min,
        tag: tag.to_string(),
    })
}

/// The minimums `w` cannot be admitted under, as the tags that set them.
fn refused_tags(w: &Workload, policy: &LevelPolicy, kind: Placement) -> Vec<(String, String)> {
    policy
        .minimums
        .iter()
        .filter_map(|m| {
            let (k, v) = avail_model::constraint::parse_tag(&m.tag).ok()?;
            let tags = BTreeMap::from([(k.clone(), v.clone())]);
            admit(w, policy, &tags, kind).is_err().then_some((k, v))
        })
        .collect()
}

/// Constraints a driver puts on its workloads' nodes: a `qemu` workload goes where
/// the agent said it runs VMs (its `vm` tag).
pub fn driver_needs(driver: avail_model::DriverKind) -> Vec<Constraint> {
    match driver {
        avail_model::DriverKind::Qemu => {
            Constraint::parse(&format!("{} exists", avail_model::node::VM_TAG))
                .into_iter()
                .collect()
        }
        _ => Vec::new(),
    }
}

/// Constraints keeping `w` off the nodes where it cannot be admitted: `key != value`
/// for each minimum it cannot run at.
pub fn kept_off(w: &Workload, policy: &LevelPolicy, kind: Placement) -> Vec<Constraint> {
    refused_tags(w, policy, kind)
        .into_iter()
        .filter_map(|(k, v)| Constraint::parse(&format!("{k} != {v}")).ok())
        .collect()
}

/// An unplaceable verdict's explanation, with why the policy kept `w` off some nodes
/// (unchanged when it did not).
pub fn explain(w: &Workload, policy: &LevelPolicy, kind: Placement, explanation: &str) -> String {
    let refused = refused_tags(w, policy, kind);
    if refused.is_empty() {
        return explanation.to_string();
    }
    let tags: Vec<String> = refused.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let why = match kind {
        Placement::Start => format!(
            "the cluster requires a level there that this workload cannot run at (level {}, driver {})",
            w.spec.level.as_str(),
            w.spec.driver.as_str()
        ),
        Placement::Move => format!(
            "the cluster requires a level there above its level {}",
            w.spec.level.as_str()
        ),
    };
    format!(
        "{explanation}; kept off nodes with {}: {why}",
        tags.join(", ")
    )
}

/// A running workload below the minimum of the node it is on (the policy or the node's
/// tags changed after it started).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Below {
    /// Raise it live to `level` (no restart), as `tag` requires.
    Raise {
        /// The workload.
        name: String,
        /// The level required.
        level: Level,
        /// The tag that requires it.
        tag: String,
    },
    /// It cannot run at the level required: left as it is, said why.
    Cannot {
        /// The workload.
        name: String,
        /// Why, for its status and an event.
        why: String,
    },
}

/// The workloads running below their node's minimum, and what to do about each: a pure
/// verdict over the workloads, the nodes' tags and the policy. Workloads not on a node,
/// or moving, are left to their placement.
pub fn below_minimum<'a>(
    workloads: impl IntoIterator<Item = &'a Workload>,
    tags_of: impl Fn(&str) -> Option<&'a BTreeMap<String, String>>,
    policy: &LevelPolicy,
) -> Vec<Below> {
    if policy.minimums.is_empty() {
        return Vec::new();
    }
    workloads
        .into_iter()
        .filter(|w| w.status.moving_to.is_none())
        .filter_map(|w| {
            let tags = tags_of(w.status.node.as_deref()?)?;
            match admit(w, policy, tags, Placement::Start) {
                Ok(Admitted::AsIs) => None,
                Ok(Admitted::Raised { level, tag }) => Some(Below::Raise {
                    name: w.spec.name.clone(),
                    level,
                    tag,
                }),
                Err(why) => Some(Below::Cannot {
                    name: w.spec.name.clone(),
                    why: format!("below the level policy: {why}"),
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use avail_model::spec::{LevelMinimum, WorkloadSpec};

    fn workload(driver: &str, level: &str, plain: bool) -> Workload {
        let spec = WorkloadSpec::parse(&format!(
            "name = \"w\"\ndriver = \"{driver}\"\nartifact = \"{}\"\nlevel = \"{level}\"\n",
            if driver == "wasm" {
                "sha256:0000000000000000000000000000000000000000000000000000000000000000"
            } else {
                "sh"
            }
        ))
        .unwrap();
        let mut w = Workload {
            uid: "u".into(),
            spec,
            status: Default::default(),
            created_ms: 0,
        };
        w.status.plain = plain;
        w
    }

    fn policy(min: &[(&str, Level)]) -> LevelPolicy {
        LevelPolicy {
            default: Level::None,
            minimums: min
                .iter()
                .map(|(t, l)| LevelMinimum {
                    tag: t.to_string(),
                    level: *l,
                })
                .collect(),
        }
    }

    fn tags(t: &[(&str, &str)]) -> BTreeMap<String, String> {
        t.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_start_is_raised_to_the_minimum_of_the_node() {
        let p = policy(&[("compliance=pci", Level::Ft), ("zone=tokyo", Level::Ha)]);
        let w = workload("wasm", "none", false);
        let pci = tags(&[("compliance", "pci"), ("zone", "tokyo")]);
        assert_eq!(
            admit(&w, &p, &pci, Placement::Start),
            Ok(Admitted::Raised {
                level: Level::Ft,
                tag: "compliance=pci".into()
            })
        );
        assert_eq!(
            admit(&w, &p, &tags(&[("zone", "tokyo")]), Placement::Start)
                .unwrap()
                .message()
                .as_deref(),
            Some("level ha required on zone=tokyo")
        );
        assert_eq!(
            admit(&w, &p, &tags(&[("zone", "osaka")]), Placement::Start),
            Ok(Admitted::AsIs)
        );
        // At or above the minimum already: as it is.
        let ft = workload("wasm", "ft", false);
        assert_eq!(admit(&ft, &p, &pci, Placement::Start), Ok(Admitted::AsIs));
    }

    #[test]
    fn what_cannot_run_at_the_minimum_is_kept_off() {
        let p = policy(&[("compliance=pci", Level::Ft), ("zone=tokyo", Level::Ha)]);
        let pci = tags(&[("compliance", "pci")]);
        for w in [
            workload("process", "ha", false),
            workload("wasm", "none", true),
        ] {
            let e = admit(&w, &p, &pci, Placement::Start).unwrap_err();
            assert!(e.contains("compliance=pci requires level ft"), "{e}");
            let off = kept_off(&w, &p, Placement::Start);
            assert_eq!(off.len(), 1, "{off:?}");
            assert!(!off[0].matches(&pci) && off[0].matches(&tags(&[("zone", "tokyo")])));
            let x = explain(&w, &p, Placement::Start, "1 node: 1 filtered");
            assert!(
                x.starts_with("1 node: 1 filtered; kept off nodes with compliance=pci"),
                "{x}"
            );
        }
        // An ft-capable module is not kept off anything.
        let w = workload("wasm", "none", false);
        assert!(kept_off(&w, &p, Placement::Start).is_empty());
        assert_eq!(explain(&w, &p, Placement::Start, "x"), "x");
    }

    #[test]
    fn a_move_keeps_the_level_and_avoids_higher_minimums() {
        let p = policy(&[("compliance=pci", Level::Ft), ("zone=tokyo", Level::Ha)]);
        let w = workload("wasm", "ha", false);
        assert!(admit(&w, &p, &tags(&[("compliance", "pci")]), Placement::Move).is_err());
        assert_eq!(
            admit(&w, &p, &tags(&[("zone", "tokyo")]), Placement::Move),
            Ok(Admitted::AsIs)
        );
        let off = kept_off(&w, &p, Placement::Move);
        assert_eq!(off.len(), 1);
        assert_eq!(off[0].to_string(), "compliance != pci");
    }

    #[test]
    fn running_workloads_below_their_nodes_minimum_are_found() {
        let p = policy(&[("compliance=pci", Level::Ft), ("zone=osaka", Level::Ha)]);
        let nodes: BTreeMap<String, BTreeMap<String, String>> = [
            ("n1".to_string(), tags(&[("zone", "osaka")])),
            ("n2".to_string(), tags(&[("compliance", "pci")])),
            ("n3".to_string(), tags(&[("zone", "tokyo")])),
        ]
        .into();
        let on = |mut w: Workload, name: &str, node: Option<&str>| {
            w.spec.name = name.into();
            w.status.node = node.map(str::to_string);
            w
        };
        let mut moving = on(workload("wasm", "none", false), "moving", Some("n2"));
        moving.status.moving_to = Some("n3".into());
        let ws = [
            on(workload("wasm", "none", false), "raise-ha", Some("n1")),
            on(workload("wasm", "ha", false), "at-ha", Some("n1")),
            on(workload("wasm", "none", false), "raise-ft", Some("n2")),
            on(workload("process", "ha", false), "cannot", Some("n2")),
            on(workload("wasm", "none", false), "free", Some("n3")),
            on(workload("wasm", "none", false), "pending", None),
            moving,
        ];
        let got = below_minimum(&ws, |n| nodes.get(n), &p);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(
            got[0],
            Below::Raise {
                name: "raise-ha".into(),
                level: Level::Ha,
                tag: "zone=osaka".into()
            }
        );
        assert!(
            matches!(&got[1], Below::Raise { name, level: Level::Ft, .. } if name == "raise-ft")
        );
        assert!(
            matches!(&got[2], Below::Cannot { name, why } if name == "cannot" && why.contains("compliance=pci requires level ft"))
        );
        assert!(below_minimum(&ws, |n| nodes.get(n), &LevelPolicy::default()).is_empty());
    }

    #[test]
    fn a_new_workload_gets_the_default_level_and_runs_plain_only_below_ft() {
        let p = LevelPolicy {
            default: Level::Ft,
            minimums: vec![],
        };
        let wasm = workload("wasm", "none", false);
        let process = workload("process", "none", false);
        assert_eq!(initial_level(&wasm.spec, true, &p), Level::None);
        assert_eq!(initial_level(&wasm.spec, false, &p), Level::Ft);
        assert_eq!(initial_level(&process.spec, false, &p), Level::Ha);
        let refused: Result<(), String> = Err("no".into());
        assert_eq!(runs_plain(Level::Ha, &Ok(())), Ok(false));
        assert_eq!(runs_plain(Level::Ha, &refused), Ok(true));
        assert_eq!(runs_plain(Level::Ft, &refused), Err("no".into()));
    }

    #[test]
    fn no_policy_admits_everything() {
        let p = LevelPolicy::default();
        let w = workload("process", "none", false);
        assert_eq!(
            admit(&w, &p, &tags(&[("compliance", "pci")]), Placement::Start),
            Ok(Admitted::AsIs)
        );
        assert!(kept_off(&w, &p, Placement::Move).is_empty());
    }
}
