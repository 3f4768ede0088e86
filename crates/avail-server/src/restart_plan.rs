//! The plan of `ha` restarts, pure: which node each workload of a lost node restarts
//! on (or why none can take it), at what level, as the new status to write. The shell
//! ([`crate::restarts`]) writes a plan in one transaction, compared against every
//! workload's and the placement key's revision; the control-plane simulation
//! (`tests/control_sim.rs`) runs the same function.

use std::collections::BTreeMap;

use avail_model::spec::LevelPolicy;
use avail_model::{EventKind, Phase, Workload};
use avail_sched::{ClusterView, Decision};

use crate::admission::{self, Placement};
use crate::level_policy::apply_admitted;

/// A workload to restart: its record and revision, read from the view.
#[derive(Clone, Debug)]
pub struct Lost {
    /// The workload as stored.
    pub workload: Workload,
    /// Its `mod_rev`.
    pub mod_rev: u64,
}

/// One restart decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Restart {
    /// The workload's new record (a new incarnation and generation; placed, or pending).
    pub workload: Workload,
    /// The revision it was planned from (the write compares it).
    pub mod_rev: u64,
    /// `workload.restarted`, or `workload.unplaceable`.
    pub kind: EventKind,
    /// Where it restarts.
    pub node: Option<String>,
    /// What happened, for the event (without the level raise, [`Restart::raised`]).
    pub what: String,
    /// The level raise admission made, if any ("level ft required on ...").
    pub raised: Option<String>,
    /// Reservations of lower priority it displaced on its node.
    pub displaced: Vec<String>,
    /// The node it was lost on.
    pub lost: String,
}

impl Restart {
    /// The event's message, with how long the plan took when given.
    pub fn message(&self, planned_us: Option<u128>) -> String {
        let mut m = self.what.clone();
        if let Some(us) = planned_us {
            m.push_str(&format!(", planned in {us} us"));
        }
        if let Some(r) = &self.raised {
            m.push_str(&format!("; {r}"));
        }
        m
    }
}

/// Plan the restarts of `lost` (highest priority first), away from the nodes `down`,
/// which are `why` (`down`, `draining`, ...), on a working copy of `sched` (each
/// decision takes its capacity before the next), with the level policy `policy` and
/// the nodes' tags `tags_of`. `seed` seeds the scheduler's sample; `ha` workloads go to
/// the node holding their reservation when it still fits there. A workload not on a
/// node of `down` is skipped.
pub fn plan_restarts(
    mut sched: ClusterView,
    lost: Vec<Lost>,
    down: &[String],
    why: &str,
    policy: &LevelPolicy,
    tags_of: &dyn Fn(&str) -> BTreeMap<String, String>,
    mut seed: u64,
) -> Vec<Restart> {
    let mut planned = Vec::new();
    for Lost {
        workload: mut w,
        mod_rev,
    } in lost
    {
        let Some(lost_on) = w.status.node.clone().filter(|n| down.contains(n)) else {
            continue;
        };
        let req = crate::placement::request_for(
            &w,
            avail_sched::Avoid {
                nodes: down.to_vec(),
                fault_domain: None,
            },
            None,
            policy,
            Placement::Start,
        );
        // Its reservation is its own: the node holding it first (if the policy still
        // admits it there: the request's constraints say).
        let reserved = w
            .status
            .reservation
            .clone()
            .filter(|r| !down.contains(r) && sched.fits(r, &req));
        let decision = match reserved {
            Some(r) => Decision::Place {
                node: r,
                secondary: None,
                reservation: None,
                displaced: vec![],
            },
            None => {
                seed = seed.wrapping_add(0x9e37_79b9);
                avail_sched::plan(
                    &sched,
                    std::slice::from_ref(&req),
                    &mut avail_model::rng::SplitMix64(seed),
                )
                .decisions
                .into_iter()
                .next()
                .map(|(_, d)| d)
                .unwrap_or(Decision::Unplaceable {
                    explanation: "no decision".into(),
                })
            }
        };
        // The reservation is used (or void): a new one is made by the next pass.
        if let Some(r) = w.status.reservation.take() {
            sched.unreserve(&r, &w.spec.name);
        }
        // A move under way is over (its source is gone).
        if let Some(t) = w.status.moving_to.take() {
            sched.release(&t, w.spec.resources);
        }
        w.status.incarnation += 1;
        // A new generation too: the old copy's checkpoints (were it still alive) are
        // refused by the next standby.
        w.status.generation += 1;
        w.status.restarts += 1;
        w.status.ft = None;
        w.status.updated_ms = crate::now_ms();
        // Admitted at the node's minimum level (the plan kept it off the nodes where
        // it cannot run at theirs).
        let admitted = match &decision {
            Decision::Place { node, .. } => {
                admission::admit(&w, policy, &tags_of(node), Placement::Start)
            }
            Decision::Unplaceable { .. } => Ok(admission::Admitted::AsIs),
        };
        let (decision, admitted) = match (decision, admitted) {
            (Decision::Place { .. }, Err(why)) => (
                Decision::Unplaceable { explanation: why },
                admission::Admitted::AsIs,
            ),
            (d, a) => (d, a.unwrap_or(admission::Admitted::AsIs)),
        };
        match decision {
            Decision::Place {
                node, displaced, ..
            } => {
                sched.allocate(&node, w.spec.resources);
                for d in &displaced {
                    sched.unreserve(&node, d);
                }
                apply_admitted(&mut w, &admitted);
                w.status.phase = Phase::Placed;
                w.status.node = Some(node.clone());
                w.status.message = Some(match admitted.message() {
                    Some(raised) => format!("restarted: node {lost_on} is {why}; {raised}"),
                    None => format!("restarted: node {lost_on} is {why}"),
                });
                let what = format!(
                    "node {lost_on} is {why}: restarting on {node} (incarnation {})",
                    w.status.incarnation
                );
                planned.push(Restart {
                    workload: w,
                    mod_rev,
                    kind: EventKind::WorkloadRestarted,
                    node: Some(node),
                    what,
                    raised: admitted.message(),
                    displaced,
                    lost: lost_on,
                });
            }
            Decision::Unplaceable { explanation } => {
                // Why the policy kept it off some nodes, too.
                let explanation = admission::explain(&w, policy, Placement::Start, &explanation);
                w.status.phase = Phase::Pending;
                w.status.node = None;
                let what =
                    format!("node {lost_on} is {why} and no node can take it: {explanation}");
                w.status.message = Some(format!("unplaceable: {what}"));
                planned.push(Restart {
                    workload: w,
                    mod_rev,
                    kind: EventKind::WorkloadUnplaceable,
                    node: None,
                    what,
                    raised: None,
                    displaced: vec![],
                    lost: lost_on,
                });
            }
        }
    }
    planned
}
