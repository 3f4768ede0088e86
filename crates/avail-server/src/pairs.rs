//! `ft` pairs: a secondary's failure, the pair lease that arbitrates a failover, the
//! handover of a live move.

use avail_model::EventKind;
use std::time::Instant;

use avail_model::{Level, NodeState, Phase};

use crate::events::NewEvent;
use crate::now_ms;
use crate::state::*;

impl AppState {
    /// The secondary of `name` on `node` (at `generation`) reported failure (out of
    /// memory for its image, a start that failed), at once or in a heartbeat. Recorded
    /// once per (workload, node, generation) as an event, even when the primary already
    /// took the next generation. For the current secondary: its node is kept out of the
    /// next secondary placement; a live primary notices the silence and takes the next
    /// generation (the pair protocol; a new secondary is placed then). A primary whose
    /// node is down too cannot: the pair is taken to have no secondary, so the workload
    /// is reported failed instead of staying "running" on a dead node.
    pub async fn secondary_failed(
        &self,
        name: &str,
        node: &str,
        generation: u64,
        why: Option<&str>,
    ) {
        let Some((w, _)) = self.workload(name) else {
            return;
        };
        if w.spec.level == Level::Ha && w.status.reservation.as_deref() == Some(node) {
            // An ha standby that cannot hold the checkpoints: the reservation moves
            // elsewhere (the next reservation pass), away from this node for a while.
            self.lost_nodes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(node.to_string(), Instant::now());
            let failed = NewEvent::new(
                EventKind::WorkloadStandbyFailed,
                Some(name),
                Some(node),
                format!(
                    "standby on {node} failed: {}",
                    why.unwrap_or("no reason given")
                ),
            );
            self.drop_reservation(name, node, Some(failed)).await;
            return;
        }
        if w.spec.level != Level::Ft || generation > w.status.generation {
            return;
        }
        let first = {
            let mut seen = self
                .failed_secondaries
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if seen.len() > 10_000 {
                seen.clear();
            }
            seen.insert((name.to_string(), node.to_string(), generation))
        };
        let current =
            w.status.secondary.as_deref() == Some(node) && w.status.generation == generation;
        if current {
            self.lost_nodes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(node.to_string(), Instant::now());
        }
        let primary_down = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.workloads
                .get(name)
                .and_then(|(w, _)| w.status.node.clone())
                .is_some_and(|n| self.node_state(&n, &v) == NodeState::Down)
        };
        // Recorded once: with the write the failure makes, or alone.
        let event = first.then(|| {
            NewEvent::new(
                EventKind::WorkloadSecondaryFailed,
                Some(name),
                Some(node),
                format!(
                    "secondary on {node} (generation {generation}) failed: {}",
                    why.unwrap_or("no reason given")
                ),
            )
        });
        let mut res = Ok(false);
        if current && primary_down {
            // Failed in the same write: no later placement may give the dead primary a
            // secondary that would count as a survivor.
            let why = why.unwrap_or("no reason given").to_string();
            res = self
                .update_status_with_events(name, |s| {
                    if s.secondary.as_deref() != Some(node) || s.generation != generation {
                        return vec![];
                    }
                    s.secondary = None;
                    s.phase = Phase::Failed;
                    s.message = Some(format!(
                        "node {} is down and the secondary on {node} failed: {why}",
                        s.node.clone().unwrap_or_default()
                    ));
                    event.iter().cloned().collect()
                })
                .await;
        }
        self.events.unless_written(res, event).await;
    }

    /// Move the pair lease of an `ft` workload from generation `from` to `to` for
    /// `node` (its primary or its secondary), by compare-and-swap on the workload: one
    /// asker at most wins a generation. A winning secondary becomes the active replica
    /// (new incarnation); either way the pair has no secondary until a new one is placed.
    pub async fn take_lease(
        &self,
        name: &str,
        node: &str,
        from: u64,
        to: u64,
    ) -> Result<(bool, u64), StateError> {
        // A compare-and-swap conflict with an unrelated write (a heartbeat's status) is
        // not a refusal: read again and retry while the generation is still `from`.
        let mut attempts = 0;
        let lost = loop {
            attempts += 1;
            let Some((mut w, rev)) = self.workload(name) else {
                return Ok((false, 0));
            };
            // Asked again after a lost answer: the asker already holds `to`.
            if w.status.generation == to && w.status.node.as_deref() == Some(node) {
                return Ok((true, to));
            }
            let member = w.status.node.as_deref() == Some(node)
                || w.status.secondary.as_deref() == Some(node);
            if w.spec.level != Level::Ft
                && w.status.node.as_deref() == Some(node)
                && w.status.generation == from
                && to == from + 1
            {
                // No longer ft (a level lowered while the primary was asking, its
                // secondary already gone): the active copy keeps running, at the next
                // generation; never fenced for it.
                w.status.generation = to;
                w.status.secondary = None;
                w.status.moving_to = None;
                w.status.updated_ms = now_ms();
                match self.write_workload(&w, rev).await {
                    Ok(_) => return Ok((true, to)),
                    Err(StateError::Conflict(_)) if attempts < 20 => continue,
                    Err(e) => return Err(e),
                }
            }
            if w.spec.level != Level::Ft || !member || w.status.generation != from || to != from + 1
            {
                return Ok((false, w.status.generation));
            }
            let promoted = w.status.secondary.as_deref() == Some(node);
            // The other member is presumed lost: not a candidate for the next secondary.
            let lost = if promoted {
                w.status.node.clone()
            } else {
                w.status.secondary.clone()
            };
            // Recorded before the write, so that no placement after it picks the lost node.
            if let Some(l) = &lost {
                self.lost_nodes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(l.clone(), Instant::now());
            }
            w.status.generation = to;
            w.status.secondary = None;
            // A move under way is over: the pair changed under it.
            w.status.moving_to = None;
            w.status.level_state = Some(avail_model::LevelState::new(
                Level::Ft,
                avail_model::Protection::Degraded,
            ));
            if promoted {
                w.status.node = Some(node.to_string());
                w.status.incarnation += 1;
                w.status.phase = Phase::Running;
                w.status.restarts = 0;
            }
            w.status.ft = None;
            w.status.updated_ms = now_ms();
            let what = if promoted {
                format!(
                    "secondary on {node} took over at generation {to} (incarnation {})",
                    w.status.incarnation
                )
            } else {
                format!("primary on {node} lost its secondary; runs at generation {to}")
            };
            let failover = NewEvent::new(EventKind::WorkloadFailover, Some(name), Some(node), what);
            match self
                .write_workload_with_events(&w, rev, vec![failover])
                .await
            {
                Ok(_) => break lost,
                Err(StateError::Conflict(_)) if attempts < 20 => continue,
                Err(e) => return Err(e),
            }
        };
        self.place_secondaries_avoiding(lost.as_deref().map(|l| (name, l)))
            .await;
        Ok((true, to))
    }

    /// The active copy of `name` on `node`, at generation `from`, has handed over: its
    /// last checkpoint is acknowledged by the move's target, which becomes the active
    /// copy (a new incarnation and generation; the old copy is let go). Granted again
    /// when asked again after a lost answer.
    pub async fn handover(
        &self,
        name: &str,
        node: &str,
        from: u64,
    ) -> Result<(bool, u64), StateError> {
        for _ in 0..20 {
            let Some((mut w, rev)) = self.workload(name) else {
                return Ok((false, 0));
            };
            if w.status.generation == from + 1 && w.status.node.as_deref() != Some(node) {
                return Ok((true, from + 1));
            }
            let Some(target) = w.status.moving_to.clone() else {
                return Ok((false, w.status.generation));
            };
            if w.status.node.as_deref() != Some(node) || w.status.generation != from {
                return Ok((false, w.status.generation));
            }
            w.status.node = Some(target.clone());
            w.status.moving_to = None;
            if w.status.secondary.as_deref() == Some(target.as_str()) {
                w.status.secondary = None;
            }
            w.status.generation = from + 1;
            w.status.incarnation += 1;
            w.status.phase = Phase::Running;
            w.status.ft = None;
            w.status.level_state = match w.spec.level {
                Level::Ft => Some(avail_model::LevelState::new(
                    Level::Ft,
                    avail_model::Protection::Degraded,
                )),
                l => avail_model::LevelState::unprotected(l),
            };
            w.status.message = Some(format!("moved live from {node} to {target}"));
            w.status.updated_ms = now_ms();
            let took = self
                .moves
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(name)
                .map(|t| t.elapsed());
            let moved = NewEvent::new(
                EventKind::WorkloadMoved,
                Some(name),
                Some(&target),
                format!(
                    "moved live from {node} to {target} (incarnation {}){}",
                    w.status.incarnation,
                    took.map(|t| format!(" in {} ms", t.as_millis()))
                        .unwrap_or_default()
                ),
            );
            match self.write_workload_with_events(&w, rev, vec![moved]).await {
                Ok(_) => {
                    self.moves
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(name);
                    self.metrics.moves.inc();
                    if let Some(t) = took {
                        self.metrics.move_seconds.observe(t.as_secs_f64());
                    }
                    self.place_secondaries().await;
                    self.place_reservations().await;
                    return Ok((true, from + 1));
                }
                Err(StateError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StateError::Conflict(format!(
            "workload {name} kept changing during its handover"
        )))
    }
}
