//! avail-sched: placement as a pure function.
//!
//! [`plan`] takes a read-only [`ClusterView`] and a batch of [`Request`]s and returns a
//! [`Plan`]: a node for each request, or an explanation of why none fits. It never
//! reads a clock, a socket or a file, so it is tested with property tests and reused by
//! simulations. It owns filtering (node state, tag constraints, capacity), scoring
//! (least allocated plus soft affinities) and explanations; it does not own what happens
//! to a plan (the server writes it to the store).
//!
//! Within one batch the plan accounts for what it has already placed, so a batch never
//! over-commits a node.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use avail_model::{Constraint, Resources};

/// A node as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Capacity.
    pub capacity: Resources,
    /// Already allocated.
    pub allocated: Resources,
    /// Whether the node takes new work (ready, not draining).
    pub schedulable: bool,
}

/// A consistent snapshot of the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// The nodes.
    pub nodes: Vec<NodeView>,
}

/// A soft preference: matching nodes get `weight` added to their score.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preference {
    /// The rule.
    pub rule: Constraint,
    /// -100..=100.
    pub weight: i32,
}

/// One workload to place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Workload name (for the plan and explanations).
    pub workload: String,
    /// Resources it needs.
    pub resources: Resources,
    /// Hard constraints.
    pub constraints: Vec<Constraint>,
    /// Soft preferences.
    pub preferences: Vec<Preference>,
    /// Anti-affinity with the workload's other replicas.
    pub avoid: Avoid,
}

/// Where a replica must not go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Avoid {
    /// Nodes that run another replica.
    pub nodes: Vec<String>,
    /// The fault-domain tag and the values the other replicas sit in.
    pub fault_domain: Option<(String, Vec<String>)>,
}

/// The outcome for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run it on this node.
    Place {
        /// The chosen node.
        node: String,
    },
    /// No node fits.
    Unplaceable {
        /// Why, per filter: "3 nodes: 2 filtered by constraint zone == tokyo, 1 short of memory".
        explanation: String,
    },
}

/// Decisions in request order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// One decision per request, in the order of the requests.
    pub decisions: Vec<(String, Decision)>,
}

/// Why a node was filtered out, in the order filters run.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Filtered {
    NotSchedulable,
    AntiAffinity,
    Constraint(String),
    ShortOfCpu,
    ShortOfMemory,
}

impl Filtered {
    fn describe(&self) -> String {
        match self {
            Filtered::NotSchedulable => "not ready".into(),
            Filtered::AntiAffinity => "hold another replica or share its fault domain".into(),
            Filtered::Constraint(c) => format!("filtered by constraint {c}"),
            Filtered::ShortOfCpu => "short of cpu".into(),
            Filtered::ShortOfMemory => "short of memory".into(),
        }
    }
}

fn filter(node: &NodeView, free: Resources, req: &Request) -> Result<(), Filtered> {
    if !node.schedulable {
        return Err(Filtered::NotSchedulable);
    }
    let same_domain = req
        .avoid
        .fault_domain
        .as_ref()
        .is_some_and(|(tag, values)| node.tags.get(tag).is_some_and(|v| values.contains(v)));
    if req.avoid.nodes.contains(&node.name) || same_domain {
        return Err(Filtered::AntiAffinity);
    }
    if let Some(c) = req.constraints.iter().find(|c| !c.matches(&node.tags)) {
        return Err(Filtered::Constraint(c.to_string()));
    }
    if req.resources.cpu_millis > free.cpu_millis {
        return Err(Filtered::ShortOfCpu);
    }
    if req.resources.memory_mib > free.memory_mib {
        return Err(Filtered::ShortOfMemory);
    }
    Ok(())
}

/// Score of a feasible node: higher is better. Least-allocated (mean free fraction of
/// cpu and memory after placing, in thousandths) plus the affinity weights times 10.
fn score(node: &NodeView, free: Resources, req: &Request) -> i64 {
    let frac = |free: u32, need: u32, cap: u32| -> i64 {
        if cap == 0 {
            0
        } else {
            (i64::from(free - need) * 1000) / i64::from(cap)
        }
    };
    let base = (frac(
        free.cpu_millis,
        req.resources.cpu_millis,
        node.capacity.cpu_millis,
    ) + frac(
        free.memory_mib,
        req.resources.memory_mib,
        node.capacity.memory_mib,
    )) / 2;
    let prefs: i64 = req
        .preferences
        .iter()
        .filter(|p| p.rule.matches(&node.tags))
        .map(|p| i64::from(p.weight) * 10)
        .sum();
    base + prefs
}

/// Place a batch of requests on a cluster. Deterministic: ties go to the node whose
/// name sorts first.
pub fn plan(view: &ClusterView, requests: &[Request]) -> Plan {
    let mut free: Vec<Resources> = view
        .nodes
        .iter()
        .map(|n| n.capacity.saturating_sub(n.allocated))
        .collect();
    let mut decisions = Vec::with_capacity(requests.len());
    for req in requests {
        let mut best: Option<(i64, usize)> = None;
        let mut reasons: BTreeMap<Filtered, usize> = BTreeMap::new();
        for (i, node) in view.nodes.iter().enumerate() {
            match filter(node, free[i], req) {
                Ok(()) => {
                    let s = score(node, free[i], req);
                    let better = match best {
                        None => true,
                        Some((bs, bi)) => s > bs || (s == bs && node.name < view.nodes[bi].name),
                    };
                    if better {
                        best = Some((s, i));
                    }
                }
                Err(why) => *reasons.entry(why).or_default() += 1,
            }
        }
        let decision = match best {
            Some((_, i)) => {
                free[i] = free[i].saturating_sub(req.resources);
                Decision::Place {
                    node: view.nodes[i].name.clone(),
                }
            }
            None => Decision::Unplaceable {
                explanation: explain(view.nodes.len(), &reasons),
            },
        };
        decisions.push((req.workload.clone(), decision));
    }
    Plan { decisions }
}

fn explain(total: usize, reasons: &BTreeMap<Filtered, usize>) -> String {
    if total == 0 {
        return "no nodes in the cluster".into();
    }
    let mut s = format!("{total} node{}: ", if total == 1 { "" } else { "s" });
    for (i, (why, n)) in reasons.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{n} {}", why.describe());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(name: &str, zone: &str, cpu: u32, mem: u32) -> NodeView {
        NodeView {
            name: name.into(),
            tags: [("zone".to_string(), zone.to_string())].into(),
            capacity: Resources {
                cpu_millis: cpu,
                memory_mib: mem,
            },
            allocated: Resources {
                cpu_millis: 0,
                memory_mib: 0,
            },
            schedulable: true,
        }
    }

    fn req(name: &str, cpu: u32, mem: u32, constraints: &[&str]) -> Request {
        Request {
            workload: name.into(),
            resources: Resources {
                cpu_millis: cpu,
                memory_mib: mem,
            },
            constraints: constraints
                .iter()
                .map(|c| Constraint::parse(c).unwrap())
                .collect(),
            preferences: vec![],
            avoid: Avoid::default(),
        }
    }

    #[test]
    fn least_allocated_and_constraints() {
        let mut a = node("a", "tokyo", 1000, 1000);
        a.allocated.memory_mib = 500;
        let view = ClusterView {
            nodes: vec![
                a,
                node("b", "tokyo", 1000, 1000),
                node("c", "osaka", 1000, 1000),
            ],
        };
        let p = plan(&view, &[req("w", 100, 100, &["zone == tokyo"])]);
        assert_eq!(p.decisions[0].1, Decision::Place { node: "b".into() });
    }

    #[test]
    fn explains_unplaceable() {
        let mut down = node("d", "tokyo", 1000, 1000);
        down.schedulable = false;
        let view = ClusterView {
            nodes: vec![
                node("a", "tokyo", 1000, 10),
                node("b", "osaka", 1000, 1000),
                down,
            ],
        };
        let p = plan(&view, &[req("w", 100, 100, &["zone == tokyo"])]);
        assert_eq!(
            p.decisions[0].1,
            Decision::Unplaceable {
                explanation: "3 nodes: 1 not ready, 1 filtered by constraint zone == tokyo, 1 short of memory".into()
            }
        );
        let p = plan(&ClusterView::default(), &[req("w", 1, 1, &[])]);
        assert!(
            matches!(&p.decisions[0].1, Decision::Unplaceable { explanation } if explanation == "no nodes in the cluster")
        );
    }

    #[test]
    fn affinity_moves_the_choice() {
        let view = ClusterView {
            nodes: vec![
                node("a", "tokyo", 1000, 1000),
                node("b", "osaka", 1000, 1000),
            ],
        };
        let mut r = req("w", 100, 100, &[]);
        r.preferences.push(Preference {
            rule: Constraint::parse("zone == osaka").unwrap(),
            weight: 50,
        });
        assert_eq!(
            plan(&view, &[r]).decisions[0].1,
            Decision::Place { node: "b".into() }
        );
    }

    proptest! {
        #[test]
        fn never_overcommits_and_constraints_hold(
            nodes in prop::collection::vec((0u8..3, 0u32..4000, 0u32..4000), 0..8),
            reqs in prop::collection::vec((0u8..4, 1u32..2000, 1u32..2000), 0..30),
        ) {
            let zones = ["a", "b", "c"];
            let view = ClusterView {
                nodes: nodes.iter().enumerate().map(|(i, (z, c, m))| node(&format!("n{i}"), zones[*z as usize], *c, *m)).collect(),
            };
            let requests: Vec<Request> = reqs.iter().enumerate().map(|(i, (z, c, m))| {
                let cons: Vec<&str> = match z { 0 => vec![], 1 => vec!["zone == a"], 2 => vec!["zone in [b, c]"], _ => vec!["zone != a"] };
                req(&format!("w{i}"), *c, *m, &cons)
            }).collect();
            let p = plan(&view, &requests);
            prop_assert_eq!(p.decisions.len(), requests.len());
            let mut used: BTreeMap<String, Resources> = BTreeMap::new();
            for ((name, d), r) in p.decisions.iter().zip(&requests) {
                prop_assert_eq!(name, &r.workload);
                if let Decision::Place { node } = d {
                    let n = view.nodes.iter().find(|n| &n.name == node).unwrap();
                    prop_assert!(r.constraints.iter().all(|c| c.matches(&n.tags)));
                    let u = used.entry(node.clone()).or_insert(Resources { cpu_millis: 0, memory_mib: 0 });
                    *u = u.saturating_add(r.resources);
                    prop_assert!(n.capacity.fits(*u), "over-committed {}", node);
                }
            }
        }
    }
}
