//! How well a workload's level is in force: typed, and on the wire the strings users
//! know (`ft:protected`, `ha:syncing`, ...).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Level;

/// The mode of one replica of a checkpointed workload, as its agent reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaMode {
    /// Active copy: its standby or secondary is being sent a full image.
    #[default]
    Syncing,
    /// Active copy: its standby or secondary is in step.
    Protected,
    /// Active copy: its peer went silent; waiting for the pair lease's verdict.
    Suspect,
    /// Active copy: runs without a peer in step (the lease said go on alone).
    Degraded,
    /// Active copy: stopped, it lost the pair lease.
    Fenced,
    /// Secondary or standby: in step with the active copy.
    Synced,
    /// Secondary or standby: taking over.
    Promoting,
    /// Secondary or standby: took over (it is the active copy now).
    Active,
}

impl ReplicaMode {
    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaMode::Syncing => "syncing",
            ReplicaMode::Protected => "protected",
            ReplicaMode::Suspect => "suspect",
            ReplicaMode::Degraded => "degraded",
            ReplicaMode::Fenced => "fenced",
            ReplicaMode::Synced => "synced",
            ReplicaMode::Promoting => "promoting",
            ReplicaMode::Active => "active",
        }
    }

    /// The protection an active copy in this mode gives; `None` for the modes of a
    /// secondary or standby (they say nothing of the workload's protection).
    pub fn protection(self) -> Option<Protection> {
        match self {
            ReplicaMode::Syncing => Some(Protection::Syncing),
            ReplicaMode::Protected => Some(Protection::Protected),
            ReplicaMode::Suspect => Some(Protection::Suspect),
            ReplicaMode::Degraded => Some(Protection::Degraded),
            ReplicaMode::Fenced => Some(Protection::Fenced),
            ReplicaMode::Synced | ReplicaMode::Promoting | ReplicaMode::Active => None,
        }
    }
}

/// How protected a workload at level `ft` or `ha` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protection {
    /// No peer yet (none placed, or one lost and not replaced yet).
    Unprotected,
    /// A peer is being sent a full image.
    Syncing,
    /// A peer is in step.
    Protected,
    /// The peer went silent; the pair lease decides.
    Suspect,
    /// Running without a peer in step.
    Degraded,
    /// The active copy lost the pair lease and stopped.
    Fenced,
}

impl Protection {
    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Protection::Unprotected => "unprotected",
            Protection::Syncing => "syncing",
            Protection::Protected => "protected",
            Protection::Suspect => "suspect",
            Protection::Degraded => "degraded",
            Protection::Fenced => "fenced",
        }
    }

    const ALL: [Protection; 6] = [
        Protection::Unprotected,
        Protection::Syncing,
        Protection::Protected,
        Protection::Suspect,
        Protection::Degraded,
        Protection::Fenced,
    ];
}

/// A workload's level and how well it is in force, `<level>:<protection>` on the wire
/// (`ft:protected`). Only levels `ft` and `ha` have one.
/// (In the OpenAPI document a string: see `WorkloadStatus::level_state`.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct LevelState {
    /// The level (`ft` or `ha`).
    pub level: Level,
    /// How well it is in force.
    pub protection: Protection,
}

impl LevelState {
    /// `level` at `protection`.
    pub fn new(level: Level, protection: Protection) -> LevelState {
        LevelState { level, protection }
    }

    /// A new run or a new level: no peer in step yet (`None` for level `none`).
    pub fn unprotected(level: Level) -> Option<LevelState> {
        (level != Level::None).then(|| LevelState::new(level, Protection::Unprotected))
    }

    /// Whether it is `level` with a peer in step.
    pub fn is_protected(state: Option<LevelState>, level: Level) -> bool {
        state == Some(LevelState::new(level, Protection::Protected))
    }
}

impl fmt::Display for ReplicaMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for LevelState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.level.as_str(), self.protection.as_str())
    }
}

impl FromStr for LevelState {
    type Err = String;

    fn from_str(s: &str) -> Result<LevelState, String> {
        let bad = || format!("{s:?} is not a level state (ft:protected, ha:syncing, ...)");
        let (level, protection) = s.split_once(':').ok_or_else(bad)?;
        let level = match level {
            "ft" => Level::Ft,
            "ha" => Level::Ha,
            _ => return Err(bad()),
        };
        let protection = Protection::ALL
            .into_iter()
            .find(|p| p.as_str() == protection)
            .ok_or_else(bad)?;
        Ok(LevelState::new(level, protection))
    }
}

impl From<LevelState> for String {
    fn from(s: LevelState) -> String {
        s.to_string()
    }
}

impl TryFrom<String> for LevelState {
    type Error = String;

    fn try_from(s: String) -> Result<LevelState, String> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_states_round_trip_as_the_strings_users_know() {
        for level in [Level::Ft, Level::Ha] {
            for p in Protection::ALL {
                let s = LevelState::new(level, p);
                let json = serde_json::to_string(&s).unwrap();
                assert_eq!(json, format!("\"{}:{}\"", level.as_str(), p.as_str()));
                assert_eq!(serde_json::from_str::<LevelState>(&json).unwrap(), s);
            }
        }
        assert_eq!(
            "ft:protected".parse::<LevelState>(),
            Ok(LevelState::new(Level::Ft, Protection::Protected))
        );
        for bad in ["none:protected", "ft", "ft:happy", ""] {
            assert!(bad.parse::<LevelState>().is_err(), "{bad}");
        }
        assert_eq!(LevelState::unprotected(Level::None), None);
        assert!(LevelState::is_protected(
            Some(LevelState::new(Level::Ha, Protection::Protected)),
            Level::Ha
        ));
    }

    #[test]
    fn only_an_active_copys_mode_says_how_protected_it_is() {
        assert_eq!(
            serde_json::to_string(&ReplicaMode::Degraded).unwrap(),
            "\"degraded\""
        );
        assert_eq!(
            ReplicaMode::Protected.protection(),
            Some(Protection::Protected)
        );
        assert_eq!(ReplicaMode::Synced.protection(), None);
        for m in [
            ReplicaMode::Syncing,
            ReplicaMode::Promoting,
            ReplicaMode::Active,
        ] {
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{m}\""));
        }
    }
}
