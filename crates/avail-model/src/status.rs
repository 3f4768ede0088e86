//! Workload status as the control plane reports it.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{TimeMs, WorkloadSpec};

/// Lifecycle phase of a workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Not placed yet (no node fits; see the status message).
    #[default]
    Pending,
    /// Placed on a node, not yet reported running.
    Placed,
    /// Running on its node.
    Running,
    /// Not running: the node is down or the workload keeps failing.
    Failed,
    /// Stopped by the user.
    Stopped,
}

impl Phase {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Placed => "placed",
            Phase::Running => "running",
            Phase::Failed => "failed",
            Phase::Stopped => "stopped",
        }
    }
}

/// Observed status of a workload (the default: pending, never placed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WorkloadStatus {
    /// Phase.
    pub phase: Phase,
    /// Level state (`ft:protected`, `ha:syncing`, ...); none for level `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "ft:protected")]
    pub level_state: Option<crate::LevelState>,
    /// The node running the active replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Which run of the workload this is; goes up on every placement.
    pub incarnation: u64,
    /// Local restarts of the instance on its node (traps, exits, timeouts).
    pub restarts: u32,
    /// Why the workload is in this phase (unplaceable explanation, last error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When this status last changed.
    pub updated_ms: TimeMs,
    /// Level `ft`: the node of the secondary replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<String>,
    /// Level `ft`: the pair generation (fencing token); goes up on every failover.
    #[serde(default)]
    pub generation: u64,
    /// Level `ha`: the node holding capacity for its restart (another fault domain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<String>,
    /// wasm: the module cannot be checkpointed (shared memory, reference-typed state):
    /// it runs as a plain instance, with no `ha` standby, no live move (a drain
    /// restarts it) and no level `ft`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plain: bool,
    /// A live move under way (a drain): the node the workload moves to. A wasm
    /// workload's copy there is synced as a secondary, then takes over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving_to: Option<String>,
    /// Level `ft`: replication figures reported by the primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ft: Option<FtStatus>,
}

/// Replication figures of an `ft` workload, as its primary reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FtStatus {
    /// The replica's mode (an active copy's: `syncing`, `protected`, `suspect`,
    /// `degraded` or `fenced`).
    pub mode: crate::ReplicaMode,
    /// Last epoch the secondary acknowledged.
    pub acked_epoch: u64,
    /// Age of the oldest output still held, ms (0: none held).
    pub lag_ms: u64,
    /// Bytes of checkpoints sent and not yet acknowledged.
    pub lag_bytes: u64,
    /// Checkpoints sent in this generation.
    pub checkpoints: u64,
    /// Dirty-page tracker in use (`shadow`, `uffd`).
    pub tracker: String,
    /// Replies kept in the reply log (exactly-once answers to retried requests).
    #[serde(default)]
    pub reply_log_entries: u64,
    /// Bytes the reply log keeps.
    #[serde(default)]
    pub reply_log_bytes: u64,
    /// Requests refused (503) because the reply log was full of undelivered replies.
    #[serde(default)]
    pub reply_log_refusals: u64,
}

/// A workload: its spec and its status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Workload {
    /// Unique id of this workload's creation: a workload deleted and created again
    /// under the same name has a new uid.
    #[serde(default)]
    pub uid: String,
    /// The spec as accepted.
    pub spec: WorkloadSpec,
    /// The observed status.
    pub status: WorkloadStatus,
    /// When it was created.
    pub created_ms: TimeMs,
}
