//! Drain: nodes taking no new work, and the pass that moves everything off them (live
//! moves of wasm workloads, restarts of the rest).

use avail_model::EventKind;
use std::time::Instant;

use avail_model::{Level, Node, NodeState, Workload};
use avail_sched::Decision;

use crate::admission::Placement;
use crate::events::NewEvent;
use crate::state::*;
use crate::{keys, now_ms};

impl AppState {
    /// Start draining `node` (`None`: no such node): it takes no new work, and the
    /// drain pass moves everything on it off, the highest priority first.
    pub async fn start_drain(&self, node: &str) -> Result<Option<Node>, StateError> {
        self.update_node(node, |rec, v| {
            if rec.drain.is_some() {
                return None;
            }
            let total = v
                .workloads
                .values()
                .filter(|(w, _)| occupies(w, node))
                .count() as u64;
            rec.drain = Some(DrainRecord {
                started_ms: now_ms(),
                total,
            });
            Some(NewEvent::new(
                EventKind::NodeDraining,
                None,
                Some(node),
                format!("drain of {node} started: {total} to move"),
            ))
        })
        .await
    }

    /// Stop draining `node`: it takes work again (what was moved off stays where it is).
    pub async fn undrain(&self, node: &str) -> Result<Option<Node>, StateError> {
        self.drain_blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
        self.update_node(node, |rec, _| {
            rec.drain.take().map(|_| {
                NewEvent::new(
                    EventKind::NodeUndrained,
                    None,
                    Some(node),
                    format!("{node} takes work again"),
                )
            })
        })
        .await
    }

    /// Change `node`'s record with `f` (by compare-and-swap, retried), and the event
    /// `f` gives for its change, committed with it.
    pub(crate) async fn update_node(
        &self,
        node: &str,
        f: impl Fn(&mut NodeRecord, &View) -> Option<NewEvent>,
    ) -> Result<Option<Node>, StateError> {
        for _ in 0..10 {
            let Some(kv) = self.store.get(&keys::node(node)).await? else {
                return Ok(None);
            };
            let Ok(mut rec) = serde_json::from_slice::<NodeRecord>(&kv.value) else {
                return Err(StateError::Conflict(format!(
                    "node {node}: unreadable record"
                )));
            };
            let before = rec.clone();
            let event = {
                let v = self.view.read().unwrap_or_else(|p| p.into_inner());
                f(&mut rec, &v)
            };
            if rec != before {
                let value = serde_json::to_vec(&rec).expect("node serialises");
                match self
                    .events
                    .compare_and_swap_also(
                        &keys::node(node),
                        kv.mod_rev,
                        value,
                        vec![keys::rules_changed()],
                        event.into_iter().collect(),
                    )
                    .await?
                {
                    Some(rev) => self.wait_view(rev).await,
                    None => continue,
                }
            }
            self.check_liveness().await;
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            return Ok(v.nodes.get(node).map(|r| self.node(r, &v)));
        }
        Err(StateError::Conflict(format!(
            "node {node} kept changing; try again"
        )))
    }

    /// One pass of every drain under way: move off what is on each draining node, the
    /// highest priority first, at most [`DRAIN_PARALLEL_MOVES`] live moves at once per
    /// node. An `ft` secondary is placed anew elsewhere (the primary syncs it, then the
    /// old one goes); a reservation (and its standby) is made again elsewhere; an active
    /// wasm copy moves live (a secondary is synced on the target, then the copy hands
    /// over: no request is lost); a process is restarted elsewhere.
    pub async fn drain_pass(&self) {
        let draining: Vec<String> = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.nodes
                .values()
                .filter(|r| r.drain.is_some())
                .map(|r| r.name.clone())
                // A suspect node waits: a process restarted off it now could overlap
                // with its old copy.
                .filter(|n| self.node_state(n, &v) == NodeState::Draining)
                .collect()
        };
        for node in draining {
            self.drain_node(&node).await;
        }
    }

    pub(crate) async fn drain_node(&self, node: &str) {
        let mut on: Vec<Workload> = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.workloads
                .values()
                .map(|(w, _)| w.clone())
                .filter(|w| occupies(w, node))
                .collect()
        };
        on.sort_by_key(|w| std::cmp::Reverse(w.spec.ha.priority));
        let mut moving = on
            .iter()
            .filter(|w| w.status.moving_to.is_some() && w.status.node.as_deref() == Some(node))
            .count();
        let mut blocked = None;
        let mut restart = Vec::new();
        for w in on {
            let name = w.spec.name.clone();
            let here = Some(node);
            if w.status.moving_to.as_deref() == here {
                // Moving onto the draining node (begun before the drain): call it off.
                self.cancel_move(&name).await;
            } else if w.status.secondary.as_deref() == here && w.status.moving_to.is_none() {
                if let Err(e) = self.move_secondary(&name, node).await {
                    blocked = Some(format!("{name}: {e}"));
                }
            } else if w.status.reservation.as_deref() == here {
                self.drop_reservation(&name, node, None).await;
            } else if w.status.node.as_deref() == here {
                if let Some(t) = w.status.moving_to.as_deref() {
                    let started = self
                        .moves
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&name)
                        .copied();
                    if started.is_none_or(|s| s.elapsed() > MOVE_TIMEOUT) {
                        // Its state would be lost by a restart: call the move off and
                        // try again (a target the scheduler picks anew), saying so.
                        tracing::warn!(workload = %name, target = t, "live move did not finish: trying again");
                        blocked = Some(format!(
                            "{name}: the live move to {t} did not finish in {} s; trying again",
                            MOVE_TIMEOUT.as_secs()
                        ));
                        self.cancel_move(&name).await;
                    }
                    continue;
                }
                if moving >= DRAIN_PARALLEL_MOVES {
                    continue;
                }
                if w.spec.driver == avail_model::DriverKind::Wasm && !w.status.plain {
                    match self.begin_move(&name, node).await {
                        Ok(()) => moving += 1,
                        Err(e) => blocked = Some(format!("{name}: {e}")),
                    }
                } else {
                    restart.push(name);
                }
            }
        }
        if !restart.is_empty() {
            self.restart_batch(&restart, &[node.to_string()], "draining")
                .await;
        }
        let mut b = self.drain_blocked.lock().unwrap_or_else(|p| p.into_inner());
        match blocked {
            Some(m) => b.insert(node.to_string(), m),
            None => b.remove(node),
        };
    }

    /// Place an `ft` secondary that is on `node` anew elsewhere, in one write: the
    /// primary syncs the new one from a full image and the old one is let go.
    pub(crate) async fn move_secondary(&self, name: &str, node: &str) -> Result<(), String> {
        let _guard = self.placement.lock().await;
        let Some((mut w, rev)) = self.workload(name) else {
            return Ok(());
        };
        match self.decide_secondary(&w, Some(node.to_string())) {
            (Decision::Place { node: to, .. }, at) => {
                w.status.secondary = Some(to.clone());
                w.status.level_state = Some(avail_model::LevelState::new(
                    Level::Ft,
                    avail_model::Protection::Syncing,
                ));
                w.status.updated_ms = now_ms();
                let moved = NewEvent::new(
                    EventKind::WorkloadSecondaryMoved,
                    Some(name),
                    Some(&to),
                    format!("secondary moved from {node} (draining) to {to}"),
                );
                let _ = self
                    .write_placement_with_events(&w, rev, at, vec![moved])
                    .await;
                Ok(())
            }
            (Decision::Unplaceable { explanation }, _) => {
                Err(format!("no node for its secondary: {explanation}"))
            }
        }
    }

    /// Begin a live move of the wasm workload active on `node`: the target (the `ft`
    /// secondary, else a node the scheduler picks away from `node`) runs a copy synced
    /// as a secondary, and the active copy hands over to it once it is in step
    /// ([`AppState::handover`]).
    pub(crate) async fn begin_move(&self, name: &str, node: &str) -> Result<(), String> {
        let _guard = self.placement.lock().await;
        let Some((mut w, rev)) = self.workload(name) else {
            return Ok(());
        };
        let (target, at) = match (w.spec.level, w.status.secondary.clone()) {
            (Level::Ft, Some(s)) => {
                // After the handover the secondary is the primary and needs a secondary
                // of its own; with on_secondary_loss = hold it would hold every reply
                // until one is synced. No node for it: the drain waits, saying why.
                let mut after = w.clone();
                after.status.node = Some(s.clone());
                if w.spec.ft.on_secondary_loss == avail_model::spec::SecondaryLoss::Hold
                    && let (Decision::Unplaceable { explanation }, _) =
                        self.decide_secondary(&after, Some(node.to_string()))
                {
                    return Err(format!(
                        "after handing over to {s} it would have no node for its next secondary ({explanation}), and on_secondary_loss = hold would hold its replies: add a node, or lower its level"
                    ));
                }
                (s, 0)
            }
            (Level::Ft, None) => return Err("waiting for its secondary".into()),
            _ => {
                let avoid = avail_sched::Avoid {
                    nodes: vec![node.to_string()],
                    fault_domain: None,
                };
                match self.decide_avoiding(&w, Some(avoid), None, Placement::Move) {
                    (Decision::Place { node: t, .. }, at) => (t, at),
                    (Decision::Unplaceable { explanation }, _) => {
                        return Err(format!("no node can take it: {explanation}"));
                    }
                }
            }
        };
        w.status.moving_to = Some(target.clone());
        if w.status.reservation.as_deref() == Some(target.as_str()) {
            // Its standby's node becomes its home: a new reservation follows the move.
            w.status.reservation = None;
        }
        w.status.updated_ms = now_ms();
        let moving = vec![NewEvent::new(
            EventKind::WorkloadMoving,
            Some(name),
            Some(&target),
            format!("moving live from {node} to {target}"),
        )];
        let written = if at == 0 {
            self.write_workload_with_events(&w, rev, moving).await
        } else {
            self.write_placement_with_events(&w, rev, at, moving).await
        };
        written.map_err(|e| e.to_string())?;
        self.moves
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), Instant::now());
        Ok(())
    }

    pub(crate) async fn cancel_move(&self, name: &str) {
        self.moves
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        let _ = self.update_status(name, |s| s.moving_to = None).await;
    }
}
