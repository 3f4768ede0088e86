//! The placement of a batch of new workloads, pure: for each, in order, the record to
//! write (placed and admitted at its node's minimum level, or pending with why no node
//! takes it) and its events, or that its name is taken. One plan over one snapshot of
//! the view, so the batch's workloads share the capacity as the scheduler counts it
//! and never take the same twice. The shell ([`crate::creates`]) writes the batch in
//! one transaction, compared against the placement key.

use std::collections::{BTreeMap, HashSet};

use avail_model::spec::LevelPolicy;
use avail_model::{EventKind, Workload};
use avail_sched::{ClusterView, Decision};

use crate::admission::{self, Placement};
use crate::events::NewEvent;
use crate::pending_plan::placed_on;

/// What becomes of one new workload.
#[derive(Clone, Debug, PartialEq)]
pub enum Create {
    /// A workload of its name exists (or comes earlier in the batch): nothing written.
    Exists,
    /// Write this record with these events.
    Write {
        /// The record: placed on a node, or pending.
        workload: Box<Workload>,
        /// `workload.created`, then `workload.placed` or `workload.unplaceable`.
        events: Vec<NewEvent>,
        /// Lower-priority workloads whose reservations the placement takes: moved once
        /// the batch is written.
        displaced: Vec<String>,
    },
}

/// Plan the new workloads `batch` (each admitted already: level, checks) on `sched`,
/// with the level policy `policy`, the nodes' tags `tags_of`, and `exists` saying which
/// names are taken; `seed` seeds the scheduler's sample.
pub fn plan_creates(
    sched: &ClusterView,
    batch: &[Workload],
    exists: &dyn Fn(&str) -> bool,
    policy: &LevelPolicy,
    tags_of: &dyn Fn(&str) -> BTreeMap<String, String>,
    seed: u64,
) -> Vec<Create> {
    let mut seen = HashSet::new();
    let fresh: Vec<bool> = batch
        .iter()
        .map(|w| !exists(&w.spec.name) && seen.insert(w.spec.name.as_str()))
        .collect();
    let requests: Vec<_> = batch
        .iter()
        .zip(&fresh)
        .filter(|(_, fresh)| **fresh)
        .map(|(w, _)| {
            crate::placement::request_for(
                w,
                avail_sched::Avoid::default(),
                None,
                policy,
                Placement::Start,
            )
        })
        .collect();
    let plan = avail_sched::plan(sched, &requests, &mut avail_model::rng::SplitMix64(seed));
    let mut decisions = plan.decisions.into_iter().map(|(_, d)| d);
    batch
        .iter()
        .zip(fresh)
        .map(|(w, fresh)| {
            if !fresh {
                return Create::Exists;
            }
            let decision = decisions.next().unwrap_or(Decision::Unplaceable {
                explanation: "no decision".into(),
            });
            one(w, decision, policy, tags_of)
        })
        .collect()
}

/// The record and events of `w` under the scheduler's `decision`.
fn one(
    w: &Workload,
    decision: Decision,
    policy: &LevelPolicy,
    tags_of: &dyn Fn(&str) -> BTreeMap<String, String>,
) -> Create {
    let w = w.clone();
    let name = w.spec.name.clone();
    let unplaceable = |mut w: Workload, why: String| {
        w.status.message = Some(format!("unplaceable: {why}"));
        let events = vec![
            created_event(&w),
            NewEvent::new(EventKind::WorkloadUnplaceable, Some(&name), None, why),
        ];
        Create::Write {
            workload: Box::new(w),
            events,
            displaced: vec![],
        }
    };
    let (node, displaced) = match decision {
        Decision::Place {
            node, displaced, ..
        } => (node, displaced),
        Decision::Unplaceable { explanation } => {
            let why = admission::explain(&w, policy, Placement::Start, &explanation);
            return unplaceable(w, why);
        }
    };
    // The plan kept it off the nodes whose minimum it cannot run at, from the same
    // snapshot: a refusal here would be a rule the plan missed, and leaves it pending.
    let (w, what) = match placed_on(&w, &node, policy, &tags_of(&node)) {
        Ok(placed) => placed,
        Err(why) => return unplaceable(w, why),
    };
    let placed = NewEvent::new(EventKind::WorkloadPlaced, Some(&name), Some(&node), what);
    let events = vec![created_event(&w), placed];
    Create::Write {
        workload: Box::new(w),
        events,
        displaced,
    }
}

/// The `workload.created` event, committed with the workload's first write.
pub fn created_event(w: &Workload) -> NewEvent {
    NewEvent::new(
        EventKind::WorkloadCreated,
        Some(&w.spec.name),
        None,
        format!(
            "{} workload at level {}",
            w.spec.driver.as_str(),
            w.spec.level.as_str()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use avail_model::Resources;
    use avail_model::spec::{LevelMinimum, WorkloadSpec};
    use avail_model::{Level, Phase};
    use avail_sched::NodeView;

    fn workload(name: &str, driver: &str, level: &str) -> Workload {
        let artifact = if driver == "wasm" {
            "sha256:0000000000000000000000000000000000000000000000000000000000000000"
        } else {
            "sh"
        };
        let spec = WorkloadSpec::parse(&format!(
            "name = \"{name}\"\ndriver = \"{driver}\"\nartifact = \"{artifact}\"\nlevel = \"{level}\"\n\
             [resources]\ncpu_millis = 100\nmemory_mib = 100\n"
        ))
        .unwrap();
        Workload {
            uid: name.into(),
            spec,
            status: Default::default(),
            created_ms: 0,
        }
    }

    /// Nodes `n0..n{count}`, each taking `max` workloads; the first is `compliance=pci`.
    fn inventory(
        count: usize,
        max: u32,
    ) -> (ClusterView, BTreeMap<String, BTreeMap<String, String>>) {
        let mut sched = ClusterView::default();
        let mut tags = BTreeMap::new();
        for i in 0..count {
            let name = format!("n{i}");
            let mut t = BTreeMap::from([("rack".to_string(), format!("r{i}"))]);
            if i == 0 {
                t.insert("compliance".into(), "pci".into());
            }
            sched.upsert(NodeView {
                name: name.clone(),
                tags: t.clone(),
                capacity: Resources {
                    cpu_millis: 10_000,
                    memory_mib: 10_000,
                },
                allocated: Resources {
                    cpu_millis: 0,
                    memory_mib: 0,
                },
                workloads: 0,
                max_workloads: max,
                schedulable: true,
                reserved: vec![],
            });
            tags.insert(name, t);
        }
        (sched, tags)
    }

    fn pci_ft() -> LevelPolicy {
        LevelPolicy {
            default: Level::None,
            minimums: vec![LevelMinimum {
                tag: "compliance=pci".into(),
                level: Level::Ft,
            }],
        }
    }

    fn kinds(events: &[NewEvent]) -> Vec<EventKind> {
        events.iter().map(|e| e.kind).collect()
    }

    fn node_of(c: &Create) -> Option<&str> {
        match c {
            Create::Write { workload, .. } => workload.status.node.as_deref(),
            Create::Exists => None,
        }
    }

    /// A batch shares the capacity it is planned on: never more on a node than it
    /// takes, and the one that does not fit is written pending, with why.
    #[test]
    fn a_batch_shares_the_capacity() {
        let (sched, tags) = inventory(3, 1);
        let batch: Vec<Workload> = (0..4)
            .map(|i| workload(&format!("w{i}"), "wasm", "none"))
            .collect();
        let tags_of = |n: &str| tags.get(n).cloned().unwrap_or_default();
        let plan = plan_creates(
            &sched,
            &batch,
            &|_| false,
            &LevelPolicy::default(),
            &tags_of,
            7,
        );
        let mut nodes: Vec<&str> = plan.iter().filter_map(node_of).collect();
        nodes.sort();
        assert_eq!(nodes, ["n0", "n1", "n2"], "one each");
        let pending: Vec<&Create> = plan.iter().filter(|c| node_of(c).is_none()).collect();
        let [
            Create::Write {
                workload, events, ..
            },
        ] = pending[..]
        else {
            panic!("one pending: {plan:?}");
        };
        assert_eq!(workload.status.phase, Phase::Pending);
        assert!(
            workload
                .status
                .message
                .as_deref()
                .unwrap()
                .contains("workload limit")
        );
        assert_eq!(
            kinds(events),
            [EventKind::WorkloadCreated, EventKind::WorkloadUnplaceable]
        );
    }

    /// A name taken in the view, or earlier in the batch, is refused; the rest go on.
    #[test]
    fn a_taken_name_is_refused_alone() {
        let (sched, tags) = inventory(3, 10);
        let batch = vec![
            workload("old", "wasm", "none"),
            workload("a", "wasm", "none"),
            workload("a", "wasm", "none"),
        ];
        let tags_of = |n: &str| tags.get(n).cloned().unwrap_or_default();
        let plan = plan_creates(
            &sched,
            &batch,
            &|n| n == "old",
            &LevelPolicy::default(),
            &tags_of,
            1,
        );
        assert_eq!(plan[0], Create::Exists);
        assert!(node_of(&plan[1]).is_some());
        assert_eq!(plan[2], Create::Exists);
        let Create::Write {
            workload, events, ..
        } = &plan[1]
        else {
            unreachable!()
        };
        assert_eq!(workload.status.phase, Phase::Placed);
        assert_eq!(workload.status.incarnation, 1);
        assert_eq!(
            kinds(events),
            [EventKind::WorkloadCreated, EventKind::WorkloadPlaced]
        );
    }

    /// The level policy holds for creates: on the `compliance=pci` node (minimum `ft`)
    /// a module is raised to `ft`, and a process, which cannot run at `ft`, is kept
    /// off it.
    #[test]
    fn the_policy_minimum_holds_for_creates() {
        let (sched, tags) = inventory(3, 10);
        let tags_of = |n: &str| tags.get(n).cloned().unwrap_or_default();
        let policy = pci_ft();
        for seed in 0..50 {
            let batch = vec![workload("m", "wasm", "ha"), workload("p", "process", "ha")];
            let plan = plan_creates(&sched, &batch, &|_| false, &policy, &tags_of, seed);
            for c in &plan {
                let Create::Write { workload, .. } = c else {
                    panic!("{c:?}")
                };
                if workload.status.node.as_deref() == Some("n0") {
                    assert_eq!(workload.spec.name, "m", "the process is kept off n0");
                    assert_eq!(workload.spec.level, Level::Ft, "raised");
                    assert!(
                        workload
                            .status
                            .message
                            .as_deref()
                            .unwrap()
                            .contains("compliance=pci")
                    );
                } else {
                    assert_eq!(workload.spec.level, Level::Ha);
                }
            }
        }
    }
}
