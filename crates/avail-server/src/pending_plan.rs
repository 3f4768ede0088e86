//! The placement of a pending workload, pure: where the scheduler puts it now (kept
//! off the nodes whose level minimum it cannot run at), admitted at the node's
//! minimum, as the new record to write; or why nothing can take it. The shell
//! ([`crate::placement`]'s pending pass) writes it, compared against the placement
//! key; the control-plane simulation runs the same function.

use std::collections::BTreeMap;

use avail_model::spec::LevelPolicy;
use avail_model::{Phase, Workload};
use avail_sched::{ClusterView, Decision};

use crate::admission::{self, Placement};
use crate::level_policy::{apply_admitted, with_admission};

/// What became of a pending workload.
#[derive(Clone, Debug, PartialEq)]
pub enum Pending {
    /// Placed: the new record (the next incarnation), its node, what to say.
    Placed {
        /// The record to write.
        workload: Box<Workload>,
        /// Its node.
        node: String,
        /// The event's message.
        what: String,
    },
    /// No node can take it now: why (kept in its status).
    Unplaceable(String),
}

/// Place pending workload `w` on `sched` with the level policy `policy` and the nodes'
/// tags `tags_of`; `seed` seeds the scheduler's sample.
pub fn place_pending(
    sched: &ClusterView,
    w: &Workload,
    policy: &LevelPolicy,
    tags_of: &dyn Fn(&str) -> BTreeMap<String, String>,
    seed: u64,
) -> Pending {
    let req = crate::placement::request_for(
        w,
        avail_sched::Avoid::default(),
        None,
        policy,
        Placement::Start,
    );
    let plan = avail_sched::plan(sched, &[req], &mut avail_model::rng::SplitMix64(seed));
    let node = match plan.decisions.into_iter().next().map(|(_, d)| d) {
        Some(Decision::Place { node, .. }) => node,
        Some(Decision::Unplaceable { explanation }) => {
            return Pending::Unplaceable(admission::explain(
                w,
                policy,
                Placement::Start,
                &explanation,
            ));
        }
        None => return Pending::Unplaceable("no decision".into()),
    };
    // Admitted at the node's minimum level (the plan kept it off nodes where it cannot
    // be; their tags may have changed since: the next pass).
    match placed_on(w, &node, policy, &tags_of(&node)) {
        Ok((w, what)) => Pending::Placed {
            workload: Box::new(w),
            node,
            what,
        },
        Err(why) => Pending::Unplaceable(why),
    }
}

/// `w` placed on `node` (whose tags are `tags`) as its next run, admitted at the node's
/// minimum level: the record to write and what to say of it (`placed on <node>
/// (incarnation n)`, with the level raise), or why the policy refuses it there. The
/// one placement of a new run, for a create as for a pending workload.
pub fn placed_on(
    w: &Workload,
    node: &str,
    policy: &LevelPolicy,
    tags: &BTreeMap<String, String>,
) -> Result<(Workload, String), String> {
    let admitted = admission::admit(w, policy, tags, Placement::Start)?;
    let mut w = w.clone();
    w.status.phase = Phase::Placed;
    w.status.node = Some(node.to_string());
    w.status.incarnation += 1;
    w.status.message = None;
    w.status.updated_ms = crate::now_ms();
    w.status.generation = w.status.generation.max(1);
    apply_admitted(&mut w, &admitted);
    let what = with_admission(
        format!("placed on {node} (incarnation {})", w.status.incarnation),
        &admitted,
    );
    Ok((w, what))
}
