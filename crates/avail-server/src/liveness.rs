//! Liveness: a node's heartbeats renew its lease; the verdicts (ready, suspect, down)
//! and what follows a node's death or reboot.

use avail_model::EventKind;
use std::time::Instant;

use avail_model::{Level, NodeState, Phase};
use avail_store::StoreError;

use crate::events::NewEvent;
use crate::state::*;
use crate::{keys, now_ms};

impl AppState {
    /// Current liveness state of a node, from this server's clock: heard within
    /// `suspect_after` is ready, within `down_after` suspect, then down. A node this
    /// server has not heard since it started is suspect while its store lease holds or
    /// the startup grace lasts, then down.
    pub fn node_state(&self, name: &str, view: &View) -> NodeState {
        let st = self.liveness(name, view);
        let draining = view.nodes.get(name).is_some_and(|r| r.drain.is_some());
        if st == NodeState::Ready && draining {
            NodeState::Draining
        } else {
            st
        }
    }

    pub(crate) fn liveness(&self, name: &str, view: &View) -> NodeState {
        // No heartbeat from any node for the down window: this server is the one cut
        // off (or stalled), not every node at once. Nothing is declared down then, and
        // when heartbeats come back the nodes get a grace to be heard again.
        let (from, blackout) = {
            let g = self.grace.lock().unwrap_or_else(|p| p.into_inner());
            (g.from, g.last_any.elapsed() > self.config.down_after)
        };
        let in_grace = from.elapsed() < self.config.startup_grace;
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let (state, heard_since_grace) = match live.get(name) {
            Some(l) => {
                let silent = l.last_heartbeat.elapsed();
                let st = if silent <= self.config.suspect_after {
                    NodeState::Ready
                } else if silent <= self.config.down_after {
                    NodeState::Suspect
                } else {
                    NodeState::Down
                };
                (st, l.last_heartbeat >= from)
            }
            None if view.alive.contains(name) => (NodeState::Suspect, false),
            None => (NodeState::Down, false),
        };
        // A node heard since the grace began and silent since is down at once; one not
        // heard since then gets the grace.
        if state == NodeState::Down && (blackout || (in_grace && !heard_since_grace)) {
            NodeState::Suspect
        } else {
            state
        }
    }

    /// The liveness part of a heartbeat: renew the node's lease (or create it), make it
    /// schedulable when ready. Kept short: the agent times its contact with the server
    /// by the answer (fencing), so the reports are applied apart ([`AppState::reports`]).
    pub async fn heard(&self, node: &str) -> Result<NodeState, StateError> {
        let lease = {
            let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            let l = live.entry(node.to_string()).or_insert(Live {
                last_heartbeat: Instant::now(),
                last_heartbeat_ms: 0,
                lease: None,
            });
            l.last_heartbeat = Instant::now();
            l.last_heartbeat_ms = now_ms();
            l.lease
        };
        {
            let mut g = self.grace.lock().unwrap_or_else(|p| p.into_inner());
            if g.last_any.elapsed() > self.config.down_after {
                tracing::warn!(
                    "no node was heard for {} ms: this server was cut off or stalled; a grace before any node is declared down",
                    g.last_any.elapsed().as_millis()
                );
                g.from = Instant::now();
            }
            g.last_any = Instant::now();
        }
        let renewed = match lease {
            Some(id) => match self.store.keep_alive(id).await {
                Ok(()) => true,
                Err(StoreError::LeaseNotFound(_)) => false,
                Err(e) => return Err(e.into()),
            },
            None => false,
        };
        if !renewed
            || !self
                .view
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .alive
                .contains(node)
        {
            let id = self.store.grant_lease(self.config.lease_ttl_s()).await?;
            let rev = self
                .store
                .put(&keys::alive(node), Vec::new(), Some(id))
                .await?;
            if let Some(l) = self
                .live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(node)
            {
                l.lease = Some(id);
            }
            self.wait_view(rev).await;
        }
        // Heard and alive: ready, so schedulable from now on (the liveness tick takes
        // it away again when the heartbeats stop).
        let ready = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            let schedulable = v.sched.node(node).is_some_and(|n| n.schedulable);
            (!schedulable && self.node_state(node, &v) == NodeState::Ready).then_some(())
        };
        if ready.is_some() {
            self.view
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .sched
                .set_schedulable(node, true);
        }
        let v = self.view.read().unwrap_or_else(|p| p.into_inner());
        Ok(self.node_state(node, &v))
    }

    /// A node's agent restarted (new boot id): every workload on it is a new run.
    /// Mark them placed with the next incarnation until the agent reports them.
    pub async fn node_rebooted(&self, node: &str) -> Result<(), StateError> {
        let names: Vec<String> = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.workloads
                .values()
                .filter(|(w, _)| {
                    w.status.node.as_deref() == Some(node) && w.status.phase != Phase::Stopped
                })
                .map(|(w, _)| w.spec.name.clone())
                .collect()
        };
        // An ha wasm workload with a standby elsewhere resumes there, from its last
        // checkpoint, rather than fresh on the restarted node.
        let names = self.resume_on_standby(names, node, "restarted").await;
        for name in names {
            self.update_status_with_events(&name, |s| {
                s.phase = Phase::Placed;
                s.incarnation += 1;
                // A new run: a standby or secondary of the old one is replaced.
                s.generation += 1;
                s.moving_to = None;
                s.restarts = 0;
                s.message = Some(format!("node {node} restarted"));
                vec![NewEvent::new(
                    EventKind::WorkloadPlaced,
                    Some(&name),
                    Some(node),
                    format!("node restarted; starting incarnation {}", s.incarnation),
                )]
            })
            .await?;
        }
        Ok(())
    }

    /// Publish node state transitions as events; mark the workloads of a node that
    /// went down as failed. Called periodically.
    pub async fn check_liveness(&self) {
        // States only: building the API's node (allocation, drain progress) every 50 ms
        // would scan the workloads of each draining node for nothing.
        let states: Vec<(String, NodeState)> = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.nodes
                .keys()
                .map(|n| (n.clone(), self.node_state(n, &v)))
                .collect()
        };
        // The scheduler's view follows readiness (a clock matter, not a store event).
        {
            let mut v = self.view.write().unwrap_or_else(|p| p.into_inner());
            for (name, st) in &states {
                v.sched.set_schedulable(name, *st == NodeState::Ready);
            }
        }
        let mut changed = Vec::new();
        {
            let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
            for (name, st) in &states {
                if published.insert(name.clone(), *st) != Some(*st) {
                    changed.push((name.clone(), *st));
                }
            }
        }
        for (name, st) in changed {
            let silent = self
                .live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&name)
                .map(|l| l.last_heartbeat.elapsed());
            let what = match (st, silent) {
                (NodeState::Down, Some(d)) => {
                    self.metrics.nodes_down.inc();
                    self.metrics.detection_seconds.observe(d.as_secs_f64());
                    self.down_at
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name.clone(), Instant::now());
                    format!("node {name} is down: silent for {} ms", d.as_millis())
                }
                (NodeState::Suspect, Some(d)) => {
                    format!("node {name} is suspect: silent for {} ms", d.as_millis())
                }
                _ => format!("node {name} is {}", st.as_str()),
            };
            self.events
                .emit(EventKind::for_node_state(st), None, Some(&name), what)
                .await;
        }
        let down: Vec<String> = states
            .iter()
            .filter(|(_, s)| *s == NodeState::Down)
            .map(|(n, _)| n.clone())
            .collect();
        // Down by this server's clock: end the node's store lease too, so the store
        // (and every other reader) agrees at once rather than at the lease's TTL.
        let revoke: Vec<avail_store::LeaseId> = {
            let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            down.iter()
                .filter_map(|n| live.get_mut(n).and_then(|l| l.lease.take()))
                .collect()
        };
        for id in revoke {
            if let Err(e) = self.store.revoke_lease(id).await {
                tracing::debug!("revoking a down node's lease: {e}");
            }
        }
        if down.is_empty() {
            return;
        }
        // What the down nodes held for others: a reservation (its standby is gone) is
        // made again elsewhere; a live move from or to them is over.
        let stale: Vec<String> = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.workloads
                .values()
                .filter(|(w, _)| {
                    let on = |n: &Option<String>| n.as_ref().is_some_and(|n| down.contains(n));
                    on(&w.status.reservation)
                        || (w.status.moving_to.is_some()
                            && (on(&w.status.moving_to) || on(&w.status.node)))
                })
                .map(|(w, _)| w.spec.name.clone())
                .collect()
        };
        for name in stale {
            self.moves
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&name);
            let _ = self
                .update_status(&name, |s| {
                    if s.reservation.as_ref().is_some_and(|r| down.contains(r)) {
                        s.reservation = None;
                    }
                    let on = |n: &Option<String>| n.as_ref().is_some_and(|n| down.contains(n));
                    if on(&s.moving_to) || (s.moving_to.is_some() && on(&s.node)) {
                        s.moving_to = None;
                    }
                })
                .await;
        }
        let affected: Vec<String> = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.workloads
                .values()
                .filter(|(w, _)| {
                    // An ft workload whose secondary lives goes on there (the secondary
                    // takes the lease): not failed.
                    let survivor = w.spec.level == Level::Ft
                        && w.status
                            .secondary
                            .as_ref()
                            .is_some_and(|s| !down.contains(s));
                    w.status.phase != Phase::Failed
                        && w.status.node.as_ref().is_some_and(|n| down.contains(n))
                        && !survivor
                })
                .map(|(w, _)| w.spec.name.clone())
                .collect()
        };
        // Level ha: restarted elsewhere, the highest priority first (capacity may be
        // short); the rest of the affected workloads fail.
        let (mut ha, affected): (Vec<String>, Vec<String>) = affected.into_iter().partition(|n| {
            self.workload(n)
                .is_some_and(|(w, _)| w.spec.level == Level::Ha)
        });
        ha.sort_by_key(|n| {
            std::cmp::Reverse(
                self.workload(n)
                    .map(|(w, _)| w.spec.ha.priority)
                    .unwrap_or(0),
            )
        });
        // Failures that come together are restarted together: while another node is
        // suspect (it may be going down too), the restarts wait, at most the gap
        // between the suspect and down windows, so one plan puts the highest
        // priorities of all the lost nodes first.
        let settling = {
            let any_suspect = states.iter().any(|(_, s)| *s == NodeState::Suspect);
            let oldest = self
                .down_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|(n, _)| down.contains(n))
                .map(|(_, at)| at.elapsed())
                .max()
                .unwrap_or_default();
            any_suspect
                && oldest
                    < self
                        .config
                        .down_after
                        .saturating_sub(self.config.suspect_after)
        };
        if !settling {
            self.restart_elsewhere(&ha, &down).await;
        }
        for name in affected {
            let _ = self
                .update_status_with_events(&name, |s| {
                    let was = s.phase;
                    s.phase = Phase::Failed;
                    s.message = Some(format!(
                        "node {} is down",
                        s.node.clone().unwrap_or_default()
                    ));
                    (was != Phase::Failed)
                        .then(|| {
                            NewEvent::new(
                                EventKind::WorkloadFailed,
                                Some(&name),
                                None,
                                "its node is down",
                            )
                        })
                        .into_iter()
                        .collect()
                })
                .await;
        }
    }
}
