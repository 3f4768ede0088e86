//! A workload's level changed while it runs (no restart).

use avail_model::EventKind;
use avail_model::{Level, Workload};

use crate::events::NewEvent;
use crate::now_ms;
use crate::state::*;

impl AppState {
    /// Change a workload's level while it runs (no restart): the spec's level changes,
    /// and the status loses what the old level held (an `ft` secondary, an `ha`
    /// reservation and its standby); the placement passes then give it what the new
    /// level needs (a reservation, a secondary). The agents follow: output commit goes
    /// on or off, a standby or secondary is attached and synced from a full image, or
    /// let go. `None` when there is no such workload.
    pub async fn set_level(
        &self,
        name: &str,
        level: Level,
    ) -> Result<Option<(Workload, Level)>, StateError> {
        self.set_level_because(name, level, None).await
    }

    /// [`set_level`](Self::set_level), the event saying `why` (the level policy).
    pub async fn set_level_because(
        &self,
        name: &str,
        level: Level,
        why: Option<&str>,
    ) -> Result<Option<(Workload, Level)>, StateError> {
        let mut from = None;
        for _ in 0..10 {
            let Some((mut w, rev)) = self.workload(name) else {
                return Ok(None);
            };
            let was = w.spec.level;
            from = Some(was);
            if was == level {
                return Ok(Some((w, was)));
            }
            w.spec.level = level;
            if was == Level::Ft {
                w.status.secondary = None;
            }
            if was == Level::Ha {
                w.status.reservation = None;
            }
            w.status.ft = None;
            w.status.level_state = avail_model::LevelState::unprotected(level);
            w.status.updated_ms = now_ms();
            let changed = NewEvent::new(
                EventKind::WorkloadLevelChanged,
                Some(name),
                w.status.node.as_deref(),
                format!(
                    "level {} -> {} (live, no restart){}",
                    was.as_str(),
                    level.as_str(),
                    why.map(|w| format!(": {w}")).unwrap_or_default()
                ),
            );
            match self
                .write_workload_with_events(&w, rev, vec![changed])
                .await
            {
                Ok(_) => {
                    self.metrics.level_changes.inc();
                    self.place_secondaries().await;
                    self.place_reservations().await;
                    return Ok(self.workload(name).map(|(w, _)| (w, was)));
                }
                Err(StateError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StateError::Conflict(format!(
            "workload {name} kept changing (level {} wanted, was {:?}); try again",
            level.as_str(),
            from.map(Level::as_str)
        )))
    }
}
