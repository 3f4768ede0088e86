//! Request and reply bodies of the API that are not resources themselves: one
//! definition for the server, the CLI and any client.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Level;

/// Reply of a delete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Deleted {
    /// What was deleted (a workload, node or join token).
    pub deleted: String,
}

/// What `POST /v1/workloads?dry_run=true` answers: where the workload would go now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PlanPreview {
    /// Workload name.
    pub workload: String,
    /// Whether it fits now.
    pub placeable: bool,
    /// Its node (the primary, for `ft`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `ft`: its secondary's node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<String>,
    /// Why it does not fit, with counts per reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explanation: Option<String>,
}

/// A live level change: `PUT /v1/workloads/<name>/level`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LevelChange {
    /// The new level.
    pub level: Level,
}

/// A change of a node's tags: `set` adds or replaces, `remove` deletes (also a tag the
/// agent declared). Applied over the agent's own tags and kept across its rejoins.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TagChange {
    /// Tags to set.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Tag keys to remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Reply of an artifact upload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ArtifactRef {
    /// Content digest, `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size_bytes: u64,
}

/// Heartbeats a follower relays to the leader (`POST /v1/internal/heard`, server to
/// server): the nodes heard since its last relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HeardBatch {
    /// The nodes' names.
    pub nodes: Vec<String>,
}

/// The leader's answer to a [`HeardBatch`]: each node's state, in the order asked
/// (`null`: a node the leader does not know).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HeardReply {
    /// The states.
    pub states: Vec<Option<crate::NodeState>>,
}

/// The control plane as one server sees it (`GET /v1/cluster/control`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ControlPlane {
    /// The answering server's id.
    pub server: String,
    /// Whether the answering server leads (decides).
    pub leads: bool,
    /// The leading server, when known.
    pub leader: Option<LeaderInfo>,
    /// Every server of the cluster now, as they registered in the store.
    #[serde(default)]
    pub servers: Vec<ServerInfo>,
}

/// A server of the cluster, as it registered in the store (`/servers/<id>`, on a
/// lease it keeps alive while it runs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServerInfo {
    /// Its id.
    pub id: String,
    /// Its API, `https://ip:port`.
    pub api: String,
    /// Its version of avail.
    pub version: String,
    /// The newest record schema it reads and writes.
    pub schema: u32,
    /// When it started, ms since the epoch.
    pub since_ms: u64,
}

/// The leading server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LeaderInfo {
    /// Its id.
    pub server: String,
    /// Its API address.
    pub addr: String,
    /// The term: the store revision at which it took the lead.
    pub term: u64,
}
