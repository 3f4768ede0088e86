//! Restarts: `ha` workloads of a dead or drained node restarted elsewhere, in batches
//! of one transaction each; a workload that keeps failing tried on other nodes.

use avail_model::EventKind;
use std::time::Instant;

use std::collections::{BTreeMap, HashMap};

use avail_model::Level;

use crate::admission::Placement;
use crate::events::NewEvent;
use crate::keys;
use crate::restart_plan::{Lost, plan_restarts};
use crate::state::*;

impl AppState {
    /// Restart `ha` workloads whose node is down on other nodes, in the order given
    /// (highest priority first): each a new incarnation (a late report from the old copy
    /// is ignored), to the node holding its reservation when it still fits there, else
    /// where the scheduler puts it away from the down nodes. The whole batch is planned
    /// on one copy of the view (each decision takes its capacity before the next) and
    /// written in one store transaction per [`RESTART_BATCH`] workloads, with a
    /// compare-and-swap on every workload and on the placement key. Without room a
    /// workload waits `pending` with the explanation and is placed by the pending pass
    /// when room appears.
    pub(crate) async fn restart_elsewhere(&self, names: &[String], down: &[String]) {
        for chunk in names.chunks(RESTART_BATCH) {
            self.restart_batch(chunk, down, "down").await;
        }
    }

    /// [`restart_elsewhere`](Self::restart_elsewhere) for the workloads of nodes that
    /// are `why` (`down`, `draining`).
    pub(crate) async fn restart_batch(&self, names: &[String], down: &[String], why: &str) {
        let _guard = self.placement.lock().await;
        for _ in 0..5 {
            let (work, at, policy, lost, tags) = {
                let v = self.view.read().unwrap_or_else(|p| p.into_inner());
                let lost: Vec<Lost> = names
                    .iter()
                    .filter_map(|n| v.workloads.get(n))
                    .map(|(w, rev)| Lost {
                        workload: w.clone(),
                        mod_rev: *rev,
                    })
                    .collect();
                let tags: HashMap<String, BTreeMap<String, String>> = v
                    .nodes
                    .iter()
                    .map(|(n, r)| (n.clone(), r.tags.clone()))
                    .collect();
                (
                    v.sched.clone(),
                    v.placement_rev,
                    v.policy.clone(),
                    lost,
                    tags,
                )
            };
            let seed = self
                .placements
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let started = Instant::now();
            let tags_of = |n: &str| tags.get(n).cloned().unwrap_or_default();
            let planned = plan_restarts(work, lost, down, why, &policy, &tags_of, seed);
            let planned_us = started.elapsed().as_micros();
            if planned.is_empty() {
                return;
            }
            let mut txn = avail_store::Txn {
                compares: vec![avail_store::Compare::ModRev(keys::PLACEMENT.into(), at)],
                success: vec![keys::placement_written("restart")],
                failure: vec![],
            };
            let mut events = Vec::with_capacity(planned.len());
            for r in &planned {
                let what =
                    r.message((r.kind == EventKind::WorkloadRestarted).then_some(planned_us));
                events.push(NewEvent::new(
                    r.kind,
                    Some(&r.workload.spec.name),
                    r.node.as_deref(),
                    what,
                ));
                let key = keys::workload(&r.workload.spec.name);
                txn.compares
                    .push(avail_store::Compare::ModRev(key.clone(), r.mod_rev));
                txn.success.push(avail_store::Op::Put {
                    key,
                    value: serde_json::to_vec(&r.workload).expect("workload serialises"),
                    lease: None,
                });
            }
            // The restarts and their events in one transaction.
            match self.events.commit(txn, events).await {
                Ok(r) if r.succeeded => {
                    self.wait_view(r.revision).await;
                    self.metrics.restarts.inc_by(planned.len() as u64);
                    let down_at = self
                        .down_at
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    for r in planned.iter().filter(|r| r.node.is_some()) {
                        if let Some(at) = down_at.get(&r.lost) {
                            self.metrics
                                .restart_seconds
                                .observe(at.elapsed().as_secs_f64());
                        }
                    }
                    for r in planned {
                        if let Some(n) = &r.node {
                            self.release_displaced(&r.displaced, n).await;
                        }
                    }
                    return;
                }
                // Another placement or a status report came first: plan again.
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!("restarts not recorded: {e}");
                    return;
                }
            }
        }
    }

    /// An `ha` workload failed on `node` (it would not start there, or it keeps
    /// crashing): restart it on another node, away from every node it failed on since
    /// it last ran; when it has failed on every node that could take it, it stays
    /// failed, saying so.
    pub(crate) async fn ha_failed_on(&self, name: &str, node: &str) {
        let tried: Vec<String> = {
            let mut m = self.failed_on.lock().unwrap_or_else(|p| p.into_inner());
            if m.len() > 10_000 {
                m.clear();
            }
            let t = m.entry(name.to_string()).or_default();
            if !t.insert(node.to_string()) {
                // Already handled for this node (reports repeat every heartbeat).
                return;
            }
            t.iter().cloned().collect()
        };
        let Some((w, _)) = self.workload(name) else {
            return;
        };
        let req = self.request(
            &w,
            avail_sched::Avoid {
                nodes: tried.clone(),
                fault_domain: None,
            },
            None,
            &self.level_policy(),
            Placement::Start,
        );
        let candidates = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.sched
                .nodes()
                .filter(|n| !tried.contains(&n.name) && v.sched.fits(&n.name, &req))
                .count()
        };
        if candidates == 0 {
            self.events
                .emit(
                    EventKind::WorkloadFailed,
                    Some(name),
                    Some(node),
                    format!(
                        "it failed on {} and no other node can take it: left failed",
                        tried.join(", ")
                    ),
                )
                .await;
            return;
        }
        self.restart_batch(&[name.to_string()], &tried, "failing it")
            .await;
    }

    /// Of `names`, restart the ha workloads placed on `node` (its agent restarted, or it
    /// fenced itself) that have a standby on another node onto it: they resume from
    /// their last checkpoint rather than fresh on `node`. Returns the others.
    pub async fn resume_on_standby(
        &self,
        names: Vec<String>,
        node: &str,
        why: &str,
    ) -> Vec<String> {
        let (resume, rest): (Vec<String>, Vec<String>) = names.into_iter().partition(|n| {
            self.workload(n).is_some_and(|(w, _)| {
                w.spec.level == Level::Ha
                    && w.status.node.as_deref() == Some(node)
                    && replica_node(&w).is_some_and(|r| r != node)
            })
        });
        if !resume.is_empty() {
            self.restart_batch(&resume, &[node.to_string()], why).await;
        }
        rest
    }
}
