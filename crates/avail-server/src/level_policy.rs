//! The level policy on the server: held in the view, applied by admission
//! ([`crate::admission`]) to every placement, and enforced on what already runs when
//! the policy or a node's tags change (a pass of the background loop).

use avail_model::EventKind;
use avail_model::{Level, Workload};

use crate::admission::{self, Below};
use crate::events::NewEvent;
use crate::state::AppState;

/// A stored level policy; an unreadable one is the default (and said in the log).
pub(crate) fn decode_policy(bytes: &[u8]) -> avail_model::spec::LevelPolicy {
    serde_json::from_slice(bytes).unwrap_or_else(|e| {
        tracing::error!("unreadable level policy, using the default: {e}");
        Default::default()
    })
}

/// Give a workload what admission decided: its level raised to the node's minimum
/// (said in its status message), and an `ft` workload starts unprotected.
pub fn apply_admitted(w: &mut Workload, admitted: &admission::Admitted) {
    if let admission::Admitted::Raised { level, .. } = admitted {
        w.spec.level = *level;
        w.status.message = admitted.message();
    }
    if w.spec.level == Level::Ft {
        w.status.level_state = avail_model::LevelState::unprotected(Level::Ft);
    }
}

/// An event's message, with the level raise admission made, if any.
pub fn with_admission(what: String, admitted: &admission::Admitted) -> String {
    match admitted.message() {
        Some(raised) => format!("{what}; {raised}"),
        None => what,
    }
}

impl AppState {
    /// The cluster's level policy (the default when none is stored), from the view.
    pub fn level_policy(&self) -> avail_model::spec::LevelPolicy {
        self.view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .policy
            .clone()
    }

    /// The minimum level the policy sets for workloads on `node`, with the tag.
    pub fn minimum_on(
        &self,
        policy: &avail_model::spec::LevelPolicy,
        node: &str,
    ) -> Option<(Level, String)> {
        let v = self.view.read().unwrap_or_else(|p| p.into_inner());
        let rec = v.nodes.get(node)?;
        policy
            .minimum_for(&rec.tags)
            .map(|(l, t)| (l, t.to_string()))
    }

    /// Raise, live, the workloads running below the minimum of their node (the
    /// policy or the node's tags changed since they started); say once, in the status
    /// and an event, of those that cannot run at it. Decided by
    /// [`admission::below_minimum`] over the view.
    pub async fn enforce_level_policy(&self) {
        let below = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            admission::below_minimum(
                v.workloads.values().map(|(w, _)| w),
                |n| v.nodes.get(n).map(|r| &r.tags),
                &v.policy,
            )
        };
        let mut still = std::collections::HashSet::new();
        for b in below {
            match b {
                Below::Raise { name, level, tag } => {
                    let why = format!("level {} required on {tag}", level.as_str());
                    if let Err(e) = self.set_level_because(&name, level, Some(&why)).await {
                        tracing::warn!(workload = %name, "level policy: {e}");
                    }
                }
                Below::Cannot { name, why } => {
                    still.insert(name.clone());
                    self.say_below(&name, &why).await;
                }
            }
        }
        // What is no longer below may be said again if it comes back.
        self.below_said
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, _| still.contains(name));
    }

    /// Say `why` of workload `name` once: in its status message and an event.
    async fn say_below(&self, name: &str, why: &str) {
        {
            let said = self.below_said.lock().unwrap_or_else(|p| p.into_inner());
            if said.get(name).is_some_and(|w| w == why) {
                return;
            }
        }
        let Some((mut w, rev)) = self.workload(name) else {
            return;
        };
        w.status.message = Some(why.to_string());
        w.status.updated_ms = crate::now_ms();
        let ev = NewEvent::new(
            EventKind::WorkloadBelowPolicy,
            Some(name),
            w.status.node.as_deref(),
            why,
        );
        if self
            .write_workload_with_events(&w, rev, vec![ev])
            .await
            .is_ok()
        {
            self.below_said
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.to_string(), why.to_string());
        }
    }
}
