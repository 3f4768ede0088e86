//! Cluster events: what happened, when, to what.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{NodeState, Phase, TimeMs};

/// One event in the cluster's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterEvent {
    /// Sequence number, strictly increasing.
    pub seq: u64,
    /// When it happened.
    pub time_ms: TimeMs,
    /// What kind (`workload.placed`, `node.down`, ...).
    pub kind: EventKind,
    /// The workload concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// The node concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Details for people.
    pub message: String,
}

/// What kind of thing an event says happened: `<subject>.<what>` on the wire
/// (`workload.placed`). A kind this build does not know (from a newer server) reads
/// as [`EventKind::Unknown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum EventKind {
    /// The server started (its address).
    #[serde(rename = "server.started")]
    ServerStarted,
    /// A server took the lead (it decides from now on; its term).
    #[serde(rename = "server.leader")]
    ServerLeader,
    /// A join token was created.
    #[serde(rename = "token.created")]
    TokenCreated,
    /// A join token was revoked.
    #[serde(rename = "token.revoked")]
    TokenRevoked,
    /// The level policy changed.
    #[serde(rename = "cluster.levels")]
    ClusterLevels,
    /// The cluster's record schema was raised (every server reads the new one).
    #[serde(rename = "cluster.schema")]
    ClusterSchema,
    /// A node joined for the first time.
    #[serde(rename = "node.joined")]
    NodeJoined,
    /// A node joined again with its own key.
    #[serde(rename = "node.rejoined")]
    NodeRejoined,
    /// A node was removed (`avail node rm`).
    #[serde(rename = "node.removed")]
    NodeRemoved,
    /// An administrator changed a node's tags.
    #[serde(rename = "node.tagged")]
    NodeTagged,
    /// A node became ready.
    #[serde(rename = "node.ready")]
    NodeReady,
    /// A node went silent: no new placements on it.
    #[serde(rename = "node.suspect")]
    NodeSuspect,
    /// A node was declared down: its `ha` workloads restart elsewhere.
    #[serde(rename = "node.down")]
    NodeDown,
    /// A node started draining.
    #[serde(rename = "node.draining")]
    NodeDraining,
    /// A node takes work again.
    #[serde(rename = "node.undrained")]
    NodeUndrained,
    /// A node's agent fenced itself (cut off from the control plane).
    #[serde(rename = "node.fenced")]
    NodeFenced,
    /// A workload was created.
    #[serde(rename = "workload.created")]
    WorkloadCreated,
    /// A workload was placed on a node.
    #[serde(rename = "workload.placed")]
    WorkloadPlaced,
    /// No node can take a workload (the explanation says why).
    #[serde(rename = "workload.unplaceable")]
    WorkloadUnplaceable,
    /// A workload went back to pending.
    #[serde(rename = "workload.pending")]
    WorkloadPending,
    /// A workload's instance runs.
    #[serde(rename = "workload.running")]
    WorkloadRunning,
    /// A workload failed.
    #[serde(rename = "workload.failed")]
    WorkloadFailed,
    /// A workload's instance stopped.
    #[serde(rename = "workload.stopped")]
    WorkloadStopped,
    /// A workload was deleted.
    #[serde(rename = "workload.deleted")]
    WorkloadDeleted,
    /// An `ha` workload was restarted elsewhere.
    #[serde(rename = "workload.restarted")]
    WorkloadRestarted,
    /// An `ft` pair failed over, or its primary lost its secondary.
    #[serde(rename = "workload.failover")]
    WorkloadFailover,
    /// A workload's level changed live.
    #[serde(rename = "workload.level_changed")]
    WorkloadLevelChanged,
    /// A live move began.
    #[serde(rename = "workload.moving")]
    WorkloadMoving,
    /// A live move finished.
    #[serde(rename = "workload.moved")]
    WorkloadMoved,
    /// An `ha` workload got its reservation.
    #[serde(rename = "workload.reserved")]
    WorkloadReserved,
    /// An `ha` reservation was taken by a higher priority.
    #[serde(rename = "workload.reservation_displaced")]
    WorkloadReservationDisplaced,
    /// An `ft` secondary was placed.
    #[serde(rename = "workload.secondary_placed")]
    WorkloadSecondaryPlaced,
    /// An `ft` secondary was moved (a drain).
    #[serde(rename = "workload.secondary_moved")]
    WorkloadSecondaryMoved,
    /// An `ft` secondary failed.
    #[serde(rename = "workload.secondary_failed")]
    WorkloadSecondaryFailed,
    /// An `ha` standby failed.
    #[serde(rename = "workload.standby_failed")]
    WorkloadStandbyFailed,
    /// A running workload is below its node's minimum level and cannot be raised.
    #[serde(rename = "workload.below_policy")]
    WorkloadBelowPolicy,
    /// A kind this build does not know.
    #[serde(other, rename = "unknown")]
    Unknown,
}

impl EventKind {
    /// Every kind this build knows.
    pub const ALL: &[EventKind] = &[
        EventKind::ServerStarted,
        EventKind::ServerLeader,
        EventKind::TokenCreated,
        EventKind::TokenRevoked,
        EventKind::ClusterLevels,
        EventKind::ClusterSchema,
        EventKind::NodeJoined,
        EventKind::NodeRejoined,
        EventKind::NodeRemoved,
        EventKind::NodeTagged,
        EventKind::NodeReady,
        EventKind::NodeSuspect,
        EventKind::NodeDown,
        EventKind::NodeDraining,
        EventKind::NodeUndrained,
        EventKind::NodeFenced,
        EventKind::WorkloadCreated,
        EventKind::WorkloadPlaced,
        EventKind::WorkloadUnplaceable,
        EventKind::WorkloadPending,
        EventKind::WorkloadRunning,
        EventKind::WorkloadFailed,
        EventKind::WorkloadStopped,
        EventKind::WorkloadDeleted,
        EventKind::WorkloadRestarted,
        EventKind::WorkloadFailover,
        EventKind::WorkloadLevelChanged,
        EventKind::WorkloadMoving,
        EventKind::WorkloadMoved,
        EventKind::WorkloadReserved,
        EventKind::WorkloadReservationDisplaced,
        EventKind::WorkloadSecondaryPlaced,
        EventKind::WorkloadSecondaryMoved,
        EventKind::WorkloadSecondaryFailed,
        EventKind::WorkloadStandbyFailed,
        EventKind::WorkloadBelowPolicy,
    ];

    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::ServerStarted => "server.started",
            EventKind::ServerLeader => "server.leader",
            EventKind::TokenCreated => "token.created",
            EventKind::TokenRevoked => "token.revoked",
            EventKind::ClusterLevels => "cluster.levels",
            EventKind::ClusterSchema => "cluster.schema",
            EventKind::NodeJoined => "node.joined",
            EventKind::NodeRejoined => "node.rejoined",
            EventKind::NodeRemoved => "node.removed",
            EventKind::NodeTagged => "node.tagged",
            EventKind::NodeReady => "node.ready",
            EventKind::NodeSuspect => "node.suspect",
            EventKind::NodeDown => "node.down",
            EventKind::NodeDraining => "node.draining",
            EventKind::NodeUndrained => "node.undrained",
            EventKind::NodeFenced => "node.fenced",
            EventKind::WorkloadCreated => "workload.created",
            EventKind::WorkloadPlaced => "workload.placed",
            EventKind::WorkloadUnplaceable => "workload.unplaceable",
            EventKind::WorkloadPending => "workload.pending",
            EventKind::WorkloadRunning => "workload.running",
            EventKind::WorkloadFailed => "workload.failed",
            EventKind::WorkloadStopped => "workload.stopped",
            EventKind::WorkloadDeleted => "workload.deleted",
            EventKind::WorkloadRestarted => "workload.restarted",
            EventKind::WorkloadFailover => "workload.failover",
            EventKind::WorkloadLevelChanged => "workload.level_changed",
            EventKind::WorkloadMoving => "workload.moving",
            EventKind::WorkloadMoved => "workload.moved",
            EventKind::WorkloadReserved => "workload.reserved",
            EventKind::WorkloadReservationDisplaced => "workload.reservation_displaced",
            EventKind::WorkloadSecondaryPlaced => "workload.secondary_placed",
            EventKind::WorkloadSecondaryMoved => "workload.secondary_moved",
            EventKind::WorkloadSecondaryFailed => "workload.secondary_failed",
            EventKind::WorkloadStandbyFailed => "workload.standby_failed",
            EventKind::WorkloadBelowPolicy => "workload.below_policy",
            EventKind::Unknown => "unknown",
        }
    }

    /// The event of a workload's instance entering `phase`.
    pub fn for_phase(phase: Phase) -> EventKind {
        match phase {
            Phase::Pending => EventKind::WorkloadPending,
            Phase::Placed => EventKind::WorkloadPlaced,
            Phase::Running => EventKind::WorkloadRunning,
            Phase::Failed => EventKind::WorkloadFailed,
            Phase::Stopped => EventKind::WorkloadStopped,
        }
    }

    /// The event of a node entering `state`.
    pub fn for_node_state(state: NodeState) -> EventKind {
        match state {
            NodeState::Ready => EventKind::NodeReady,
            NodeState::Suspect => EventKind::NodeSuspect,
            NodeState::Down => EventKind::NodeDown,
            NodeState::Draining => EventKind::NodeDraining,
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_their_names_on_the_wire_and_unknown_ones_read() {
        for k in EventKind::ALL {
            let json = serde_json::to_string(k).unwrap();
            assert_eq!(json, format!("\"{k}\""));
            assert_eq!(serde_json::from_str::<EventKind>(&json).unwrap(), *k);
        }
        assert_eq!(
            serde_json::from_str::<EventKind>("\"workload.teleported\"").unwrap(),
            EventKind::Unknown
        );
    }
}
