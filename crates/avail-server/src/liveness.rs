//! Liveness: a node's heartbeats renew its lease; the verdicts (ready, suspect, down)
//! and what follows a node's death or reboot.

use avail_model::EventKind;
use std::time::Instant;

use avail_model::{Level, NodeState, Phase};
use avail_store::{LeaseId, StoreError};

use crate::events::NewEvent;
use crate::heard_relay::Relayed;
use crate::state::*;
use crate::{keys, now_ms};
use avail_store::{Op, Txn};

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
        self.judge(name, view).0
    }

    /// A node's liveness, and whether it is one the leader has not heard since its
    /// grace began (its previous verdict stands meanwhile). A follower answers from
    /// the leader's verdicts.
    fn judge(&self, name: &str, view: &View) -> (NodeState, bool) {
        if !self.is_leader() {
            let st = match view.verdicts.get(name) {
                Some(st) => *st,
                None if view.alive.contains(name) => NodeState::Suspect,
                None => NodeState::Down,
            };
            return (st, false);
        }
        // No heartbeat from any node for the blackout window
        // ([`crate::ServerConfig::blackout_after`]): this server is the one cut off (or
        // stalled), not every node at once. Nothing is declared down then, and
        // when heartbeats come back the nodes get a grace to be heard again.
        let (from, blackout) = {
            let g = self.grace.lock().unwrap_or_else(|p| p.into_inner());
            (g.from, g.last_any.elapsed() > self.config.blackout_after())
        };
        let in_grace = from.elapsed() < self.config.startup_grace;
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let heard = live
            .get(name)
            .map(|l| (l.last_heartbeat.elapsed(), l.last_heartbeat >= from));
        judge(
            heard,
            view.alive.contains(name),
            in_grace,
            blackout,
            &self.config,
        )
    }

    /// A new term begins here: the grace before any down verdict starts again (this
    /// server has heard none of the nodes that spoke to the previous leader).
    pub fn begin_term(&self) {
        let mut g = self.grace.lock().unwrap_or_else(|p| p.into_inner());
        g.from = Instant::now();
        g.last_any = Instant::now();
    }

    /// The liveness part of a heartbeat, with whether a leader heard it: on the leader
    /// [`AppState::heard_here`], on a follower relayed to the leader
    /// ([`crate::heard_relay`]). Kept short: the agent times its contact with the server
    /// by the answer (fencing), so the reports are applied apart ([`AppState::reports`]).
    pub async fn heard(&self, node: &str) -> Result<(NodeState, bool), StateError> {
        if self.is_leader() {
            return Ok((self.heard_here(node).await?, true));
        }
        let Some(relay) = self.relay.get() else {
            return Err(StateError::TryAnotherServer(
                "this server does not lead and cannot reach the leader".into(),
            ));
        };
        match relay.heard(node).await {
            Relayed::Heard(st) => Ok((st, true)),
            Relayed::NoLeader => {
                let v = self.view.read().unwrap_or_else(|p| p.into_inner());
                Ok((self.node_state(node, &v), false))
            }
            Relayed::Refused(why) => Err(StateError::TryAnotherServer(why)),
        }
    }

    /// The leader's part of a heartbeat (its own, or relayed by a follower). A leader
    /// out of touch with the store vouches for nobody ([`crate::leader::Leadership::in_touch`]).
    pub async fn heard_here(&self, node: &str) -> Result<NodeState, StateError> {
        if self.leadership.get().is_some_and(|l| !l.in_touch()) {
            return Err(StateError::TryAnotherServer(
                "the leader has lost the store; its lead is ending".into(),
            ));
        }
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
        let lease = lease.filter(|_| {
            self.view
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .alive
                .contains(node)
        });
        {
            let mut g = self.grace.lock().unwrap_or_else(|p| p.into_inner());
            if g.last_any.elapsed() > self.config.blackout_after() {
                tracing::warn!(
                    "no node was heard for {} ms: this server was cut off or stalled; a grace before any node is declared down",
                    g.last_any.elapsed().as_millis()
                );
                g.from = Instant::now();
            }
            g.last_any = Instant::now();
        }
        // The node's store lease (the backstop other readers see) is renewed apart
        // from the verdict: this server heard the node whatever the store does, so
        // the answer never waits long for it (an etcd election, say) and a failure is
        // not the node's. At most once a third of its life.
        let due = lease.is_none_or(|(_, at)| at.elapsed() >= self.lease_renewal_period());
        if due {
            let renewal = self.renew_alive(node, lease.map(|(id, _)| id));
            match tokio::time::timeout(self.config.heartbeat_interval, renewal).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(%node, "liveness lease not renewed: {e}"),
                Err(_) => tracing::warn!(%node, "liveness lease: no answer from the store in time"),
            }
        }
        // Heard and alive: ready, so schedulable from now on (the liveness tick takes
        // it away again when the heartbeats stop).
        let (state, schedulable) = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            let schedulable = v.sched.node(node).is_some_and(|n| n.schedulable);
            (self.node_state(node, &v), schedulable)
        };
        if state == NodeState::Ready && !schedulable {
            self.view
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .sched
                .set_schedulable(node, true);
        }
        Ok(state)
    }

    /// How often a node's store lease is renewed: a third of its life.
    fn lease_renewal_period(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.config.lease_ttl_s()) / 3
    }

    /// Renew node `node`'s store lease `lease`, or make a new one with its liveness
    /// key when there is none (or it expired).
    async fn renew_alive(&self, node: &str, lease: Option<LeaseId>) -> Result<(), StoreError> {
        if let Some(id) = lease {
            match self.store.keep_alive(id).await {
                Ok(()) => {
                    self.set_lease(node, id);
                    return Ok(());
                }
                Err(StoreError::LeaseNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let id = self.store.grant_lease(self.config.lease_ttl_s()).await?;
        let rev = self
            .store
            .put(&keys::alive(node), Vec::new(), Some(id))
            .await?;
        self.set_lease(node, id);
        self.wait_view(rev).await;
        Ok(())
    }

    fn set_lease(&self, node: &str, id: LeaseId) {
        if let Some(l) = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(node)
        {
            l.lease = Some((id, Instant::now()));
        }
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
        let judged: Vec<(String, NodeState, Option<NodeState>)> = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.nodes
                .keys()
                .map(|n| {
                    let (st, unheard) = self.judge(n, &v);
                    let change = verdict_change(st, v.verdicts.get(n).copied(), unheard);
                    (n.clone(), st, change)
                })
                .collect()
        };
        let states: Vec<(String, NodeState)> =
            judged.iter().map(|(n, st, _)| (n.clone(), *st)).collect();
        // The scheduler's view follows readiness (a clock matter, not a store event).
        {
            let mut v = self.view.write().unwrap_or_else(|p| p.into_inner());
            for (name, st) in &states {
                v.sched.set_schedulable(name, *st == NodeState::Ready);
            }
        }
        let changed: Vec<(String, NodeState)> = judged
            .into_iter()
            .filter_map(|(n, _, change)| Some((n, change?)))
            .collect();
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
            // The verdict and its event, one write (fenced by the term: a deposed
            // leader's verdict is refused).
            let txn = Txn {
                compares: vec![],
                success: vec![Op::Put {
                    key: keys::verdict(&name),
                    value: serde_json::to_vec(&st).expect("a state serialises"),
                    lease: None,
                }],
                failure: vec![],
            };
            let ev = NewEvent::new(EventKind::for_node_state(st), None, Some(&name), what);
            if let Err(e) = self.events.commit(txn, vec![ev]).await {
                tracing::warn!(node = %name, "verdict not written: {e}");
            }
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
                .filter_map(|n| {
                    live.get_mut(n)
                        .and_then(|l| l.lease.take())
                        .map(|(id, _)| id)
                })
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

/// A node's liveness on the leader, from when it was last heard (how long ago, and
/// whether since the grace began), whether its store lease lives, whether the grace
/// lasts, and whether no node at all was heard for the blackout window (this server
/// was cut off or stalled, [`crate::ServerConfig::blackout_after`]). Returns the state and whether the node is one not heard since
/// the grace began, whose previous verdict stands. Pure.
pub fn judge(
    heard: Option<(std::time::Duration, bool)>,
    alive: bool,
    in_grace: bool,
    blackout: bool,
    config: &crate::ServerConfig,
) -> (NodeState, bool) {
    let (state, heard_since_grace) = match heard {
        Some((silent, since)) => {
            let st = if silent <= config.suspect_after {
                NodeState::Ready
            } else if silent <= config.down_after {
                NodeState::Suspect
            } else {
                NodeState::Down
            };
            (st, since)
        }
        None if alive => (NodeState::Suspect, false),
        None => (NodeState::Down, false),
    };
    let unheard = in_grace && !heard_since_grace;
    // A node heard since the grace began and silent since is down at once; one not
    // heard since then gets the grace.
    if state == NodeState::Down && (blackout || unheard) {
        (NodeState::Suspect, unheard)
    } else {
        (state, unheard)
    }
}

/// The verdict the leader writes for a node now, if any: its state when that differs
/// from the verdict in force, except that a node not heard since the grace began
/// keeps the verdict it has (a new leader does not call every node suspect while the
/// agents find it). Pure.
pub fn verdict_change(
    state: NodeState,
    in_force: Option<NodeState>,
    unheard_in_grace: bool,
) -> Option<NodeState> {
    if unheard_in_grace && in_force.is_some() {
        return None;
    }
    (in_force != Some(state)).then_some(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config() -> crate::ServerConfig {
        crate::ServerConfig::new("d".into(), "127.0.0.1:0".parse().unwrap())
    }

    #[test]
    fn a_node_is_judged_by_its_silence_and_given_the_grace() {
        let c = config();
        let ms = Duration::from_millis;
        use NodeState::*;
        assert_eq!(
            judge(Some((ms(100), true)), true, false, false, &c),
            (Ready, false)
        );
        assert_eq!(
            judge(Some((ms(700), true)), true, false, false, &c),
            (Suspect, false)
        );
        assert_eq!(
            judge(Some((ms(1500), true)), true, false, false, &c),
            (Down, false)
        );
        // Heard in the grace and silent since: down at once.
        assert_eq!(
            judge(Some((ms(1500), true)), true, true, false, &c),
            (Down, false)
        );
        // Not heard since the grace began: suspect at worst, its verdict stands.
        assert_eq!(
            judge(Some((ms(1500), false)), true, true, false, &c),
            (Suspect, true)
        );
        assert_eq!(judge(None, false, true, false, &c), (Suspect, true));
        // After the grace, never heard: down.
        assert_eq!(judge(None, false, false, false, &c), (Down, false));
        assert_eq!(judge(None, true, false, false, &c), (Suspect, false));
        // A blackout: nobody down.
        assert_eq!(
            judge(Some((ms(5000), true)), true, false, true, &c),
            (Suspect, false)
        );
    }

    #[test]
    fn a_verdict_is_written_on_a_change_and_stands_for_the_unheard_in_a_grace() {
        use NodeState::*;
        assert_eq!(verdict_change(Ready, None, false), Some(Ready));
        assert_eq!(verdict_change(Ready, Some(Ready), false), None);
        assert_eq!(verdict_change(Suspect, Some(Ready), false), Some(Suspect));
        assert_eq!(verdict_change(Down, Some(Suspect), false), Some(Down));
        // A new leader that has not heard the node yet keeps the old verdict...
        assert_eq!(verdict_change(Suspect, Some(Ready), true), None);
        // ...unless there is none.
        assert_eq!(verdict_change(Suspect, None, true), Some(Suspect));
    }
}
