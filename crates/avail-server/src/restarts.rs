//! Restarts: `ha` workloads of a dead or drained node restarted elsewhere, in batches
//! of one transaction each; a workload that keeps failing tried on other nodes.

use avail_model::EventKind;
use std::time::Instant;

use avail_model::{Level, Phase};
use avail_sched::Decision;

use crate::admission::{self, Placement};
use crate::events::NewEvent;
use crate::level_policy::{apply_admitted, with_admission};
use crate::state::*;
use crate::{keys, now_ms};

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
            let (mut work, at) = {
                let v = self.view.read().unwrap_or_else(|p| p.into_inner());
                (v.sched.clone(), v.placement_rev)
            };
            let mut seed = self
                .placements
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let started = Instant::now();
            let policy = self.level_policy();
            // (workload, its mod_rev, event kind, node, what, displaced, lost node)
            let mut planned = Vec::new();
            for name in names {
                let Some((mut w, rev)) = self.workload(name) else {
                    continue;
                };
                let Some(lost) = w.status.node.clone().filter(|n| down.contains(n)) else {
                    continue;
                };
                let req = self.request(
                    &w,
                    avail_sched::Avoid {
                        nodes: down.to_vec(),
                        fault_domain: None,
                    },
                    None,
                    &policy,
                    Placement::Start,
                );
                // Its reservation is its own: the node holding it first (if the policy
                // still admits it there: the request's constraints say).
                let reserved = w
                    .status
                    .reservation
                    .clone()
                    .filter(|r| !down.contains(r) && work.fits(r, &req));
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
                            &work,
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
                    work.unreserve(&r, &w.spec.name);
                }
                // A move under way is over (its source is gone).
                if let Some(t) = w.status.moving_to.take() {
                    work.release(&t, w.spec.resources);
                }
                w.status.incarnation += 1;
                // A new generation too: the old copy's checkpoints (were it still alive)
                // are refused by the next standby.
                w.status.generation += 1;
                w.status.restarts += 1;
                w.status.ft = None;
                w.status.updated_ms = now_ms();
                // Admitted at the node's minimum level (the plan kept it off the nodes
                // where it cannot run at theirs).
                let admitted = match &decision {
                    Decision::Place { node, .. } => self.admit_on(&w, node, Placement::Start),
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
                        work.allocate(&node, w.spec.resources);
                        for d in &displaced {
                            work.unreserve(&node, d);
                        }
                        apply_admitted(&mut w, &admitted);
                        w.status.phase = Phase::Placed;
                        w.status.node = Some(node.clone());
                        w.status.message = Some(match admitted.message() {
                            Some(raised) => format!("restarted: node {lost} is {why}; {raised}"),
                            None => format!("restarted: node {lost} is {why}"),
                        });
                        let what = with_admission(
                            format!(
                                "node {lost} is {why}: restarting on {node} (incarnation {}), planned in {} us",
                                w.status.incarnation,
                                started.elapsed().as_micros()
                            ),
                            &admitted,
                        );
                        planned.push((
                            w,
                            rev,
                            EventKind::WorkloadRestarted,
                            Some(node),
                            what,
                            displaced,
                            lost,
                        ));
                    }
                    Decision::Unplaceable { explanation } => {
                        w.status.phase = Phase::Pending;
                        w.status.node = None;
                        let what =
                            format!("node {lost} is {why} and no node can take it: {explanation}");
                        w.status.message = Some(format!("unplaceable: {what}"));
                        planned.push((
                            w,
                            rev,
                            EventKind::WorkloadUnplaceable,
                            None,
                            what,
                            vec![],
                            lost,
                        ));
                    }
                }
            }
            if planned.is_empty() {
                return;
            }
            let mut txn = avail_store::Txn {
                compares: vec![avail_store::Compare::ModRev(keys::PLACEMENT.into(), at)],
                success: vec![keys::placement_written("restart")],
                failure: vec![],
            };
            let mut events = Vec::with_capacity(planned.len());
            for (w, rev, kind, node, what, ..) in &planned {
                events.push(NewEvent::new(
                    *kind,
                    Some(&w.spec.name),
                    node.as_deref(),
                    what.clone(),
                ));
                let key = keys::workload(&w.spec.name);
                txn.compares
                    .push(avail_store::Compare::ModRev(key.clone(), *rev));
                txn.success.push(avail_store::Op::Put {
                    key,
                    value: serde_json::to_vec(w).expect("workload serialises"),
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
                    for p in planned.iter().filter(|p| p.3.is_some()) {
                        if let Some(at) = down_at.get(&p.6) {
                            self.metrics
                                .restart_seconds
                                .observe(at.elapsed().as_secs_f64());
                        }
                    }
                    for (_, _, _, node, _, displaced, _) in planned {
                        if let Some(n) = &node {
                            self.release_displaced(&displaced, n).await;
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
