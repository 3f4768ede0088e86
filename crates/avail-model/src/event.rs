//! Cluster events: what happened, when, to what.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::TimeMs;

/// One event in the cluster's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClusterEvent {
    /// Sequence number, strictly increasing.
    pub seq: u64,
    /// When it happened.
    pub time_ms: TimeMs,
    /// What kind: `workload.created`, `workload.placed`, `workload.running`,
    /// `workload.failed`, `workload.deleted`, `workload.unplaceable`, `node.joined`,
    /// `node.ready`, `node.suspect`, `node.down`, `server.started`, ...
    pub kind: String,
    /// The workload concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// The node concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Details for people.
    pub message: String,
}
