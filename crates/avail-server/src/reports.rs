//! Agents' reports: instance status and logs, applied to the workloads they are about.

use avail_model::EventKind;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use avail_model::agent::{InstanceState, InstanceStatus, LogLine, ReplicaRole};
use avail_model::{Level, Phase, WorkloadStatus};

use crate::events::NewEvent;
use crate::now_ms;
use crate::state::*;

impl AppState {
    /// Update a workload's status with `f`, retrying on concurrent change. Writes only
    /// when `f` changed something.
    pub async fn update_status(
        &self,
        name: &str,
        f: impl Fn(&mut WorkloadStatus),
    ) -> Result<(), StateError> {
        self.update_status_with_events(name, |s| {
            f(s);
            vec![]
        })
        .await
        .map(|_| ())
    }

    /// [`update_status`](Self::update_status) where `f` also says which events its
    /// change makes: each attempt asks `f` again, and the events of the attempt that
    /// commits are committed with it (so once). Whether it wrote (an unchanged status
    /// is not written, and its events are not recorded).
    pub async fn update_status_with_events(
        &self,
        name: &str,
        f: impl Fn(&mut WorkloadStatus) -> Vec<NewEvent>,
    ) -> Result<bool, StateError> {
        for _ in 0..10 {
            let Some((mut w, rev)) = self.workload(name) else {
                return Ok(false);
            };
            let before = w.status.clone();
            let events = f(&mut w.status);
            if w.status == before {
                return Ok(false);
            }
            w.status.updated_ms = now_ms();
            match self.write_workload_with_events(&w, rev, events).await {
                Ok(_) => return Ok(true),
                Err(StateError::Conflict(_)) => {
                    let mut v = self.view_rev.subscribe();
                    let _ = tokio::time::timeout(Duration::from_millis(50), v.changed()).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(StateError::Conflict(format!(
            "status of {name}: too many concurrent changes"
        )))
    }

    /// The reports of a heartbeat: instance states and log lines. One node's reports
    /// are applied in the order they came (a lock per node).
    pub async fn reports(&self, node: &str, instances: &[InstanceStatus], logs: Vec<LogLine>) {
        let turn = self
            .report_turns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(node.to_string())
            .or_default()
            .clone();
        if Arc::strong_count(&turn) > 3 {
            // Two reports of this node are already in line (the store is slow): this
            // one's instance states will be superseded by the next heartbeat's, which
            // carries them all again; only its log lines are kept.
            drop(turn);
            self.keep_logs(node, logs);
            return;
        }
        let _turn = turn.lock().await;
        for inst in instances {
            let phase = match inst.state {
                InstanceState::Starting => Phase::Placed,
                InstanceState::Running => Phase::Running,
                InstanceState::Restarting | InstanceState::Failed => Phase::Failed,
            };
            let Some((w, _)) = self.workload(&inst.workload) else {
                continue;
            };
            // The active replica speaks for the workload; a secondary's report matters
            // only when it failed (out of memory for its image, a start that failed):
            // it is replaced, and its node avoided for a while.
            if inst.role == ReplicaRole::Secondary {
                if inst.state == InstanceState::Failed {
                    self.secondary_failed(
                        &inst.workload,
                        node,
                        inst.generation,
                        inst.message.as_deref(),
                    )
                    .await;
                }
                continue;
            }
            // A report about another run (a stale copy, a moved workload) is ignored.
            if w.status.node.as_deref() != Some(node) || w.status.incarnation != inst.incarnation {
                continue;
            }
            // The run is checked again inside the update: the workload may have been
            // re-created or moved since it was read. A new phase is an event, committed
            // with the status that has it.
            let res = self
                .update_status_with_events(&inst.workload, |s| {
                    let was = s.phase;
                    if s.node.as_deref() == Some(node) && s.incarnation == inst.incarnation {
                        s.phase = phase;
                        s.restarts = inst.restarts;
                        s.message = inst.message.clone();
                        // Figures taken at another level (before the replica heard of
                        // a live level change) are stale.
                        if let (Some(ft), Level::Ft | Level::Ha) = (&inst.ft, w.spec.level)
                            && inst.level.is_none_or(|l| l == w.spec.level)
                        {
                            if let Some(p) = ft.mode.protection() {
                                s.level_state = Some(avail_model::LevelState::new(w.spec.level, p));
                            }
                            s.ft = Some(ft.clone());
                        }
                    }
                    (s.phase != was)
                        .then(|| {
                            NewEvent::new(
                                EventKind::for_phase(phase),
                                Some(&inst.workload),
                                Some(node),
                                inst.message.clone().unwrap_or_default(),
                            )
                        })
                        .into_iter()
                        .collect()
                })
                .await;
            if let Err(e) = res {
                // One workload's status must not cost the node its liveness or the
                // other reports: log it; the next heartbeat reports again.
                tracing::warn!(workload = %inst.workload, "status not recorded: {e}");
                continue;
            }
            // An ha workload that cannot start on its node, or keeps crashing there
            // (local restarts), is restarted on another one.
            let failing = inst.state == InstanceState::Failed
                || (inst.state == InstanceState::Restarting && inst.restarts >= HA_LOCAL_RESTARTS);
            if failing && w.spec.level == Level::Ha {
                self.ha_failed_on(&inst.workload, node).await;
            }
            if phase == Phase::Running {
                self.failed_on
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&inst.workload);
            }
        }
        self.keep_logs(node, logs);
    }

    /// Keep a node's log lines (only those of workloads placed on it).
    pub(crate) fn keep_logs(&self, node: &str, logs: Vec<LogLine>) {
        if !logs.is_empty() {
            // Only lines of workloads placed on this node are kept.
            let here: BTreeSet<String> = {
                let v = self.view.read().unwrap_or_else(|p| p.into_inner());
                v.workloads
                    .values()
                    .filter(|(w, _)| w.status.node.as_deref() == Some(node))
                    .map(|(w, _)| w.spec.name.clone())
                    .collect()
            };
            let mut all = self.logs.lock().unwrap_or_else(|p| p.into_inner());
            for mut l in logs.into_iter().filter(|l| here.contains(&l.workload)) {
                if l.line.len() > MAX_LOG_LINE_BYTES {
                    let mut cut = MAX_LOG_LINE_BYTES;
                    while !l.line.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    l.line.truncate(cut);
                }
                let q = all.entry(l.workload.clone()).or_default();
                if q.len() == MAX_LOG_LINES {
                    q.pop_front();
                }
                q.push_back(l);
            }
        }
    }
}
