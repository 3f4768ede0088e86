//! Nodes: an agent and everything it runs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Resources, TimeMs};

/// The most workload replicas a node takes unless its agent says otherwise
/// (`avail agent --max-workloads`): Kubernetes' default max-pods. Each replica costs
/// the agent a thread and some memory whatever `cpu_millis` it asks for.
pub const DEFAULT_MAX_WORKLOADS: u32 = 110;

/// The node tag an agent sets when it can run VMs (qemu is installed): the
/// accelerator they get, `kvm` or `tcg`. The server places `qemu` workloads only on
/// nodes that have it.
pub const VM_TAG: &str = "vm";

/// Serde default of a node's workload limit (records written before it existed).
pub fn default_max_workloads() -> u32 {
    DEFAULT_MAX_WORKLOADS
}

/// Liveness and scheduling state of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Heartbeating; takes new work.
    Ready,
    /// Missed its heartbeat window; takes no new work, not yet declared dead.
    Suspect,
    /// Its lease expired: declared dead.
    Down,
    /// Being emptied by an operator; takes no new work.
    Draining,
}

impl NodeState {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Suspect => "suspect",
            NodeState::Down => "down",
            NodeState::Draining => "draining",
        }
    }
}

/// A node as the control plane sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Node {
    /// Unique node name.
    pub name: String,
    /// The node's own IP address (agents bind listeners and outgoing connections to it).
    pub address: String,
    /// Base URL of the node's ingress, e.g. `http://127.0.0.11:7480`.
    pub ingress_url: String,
    /// Tags (`zone`, `rack`, `compliance`, ...).
    pub tags: BTreeMap<String, String>,
    /// Capacity offered to workloads.
    pub capacity: Resources,
    /// Resources of the workloads placed on it.
    pub allocated: Resources,
    /// Workload replicas placed on it (primaries and `ft` secondaries).
    #[serde(default)]
    pub workloads: u32,
    /// The most replicas it takes (its workload limit).
    #[serde(default = "default_max_workloads")]
    pub max_workloads: u32,
    /// Liveness state.
    pub state: NodeState,
    /// Time of the last heartbeat the server saw (0: never since the server started).
    pub last_heartbeat_ms: TimeMs,
    /// When the node first joined.
    pub joined_ms: TimeMs,
    /// Version of the agent.
    pub agent_version: String,
    /// The agent's replication listener (`ip:port`).
    #[serde(default)]
    pub replication_addr: String,
    /// A drain under way or done (`avail node drain`); none when the node takes work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainStatus>,
}

/// Progress of a node's drain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DrainStatus {
    /// When it started.
    pub started_ms: TimeMs,
    /// Replicas, standbys and reservations on the node when it started.
    pub total: u64,
    /// Those still on the node.
    pub remaining: u64,
    /// Moves under way now.
    pub moving: u64,
    /// What holds the drain up, if anything (a workload no other node can take).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<String>,
}

/// A node's isolation window for the server's down window `down`: `down` less a margin
/// of a third of it, at least 250 ms (and never under 100 ms in all). An agent that has
/// not been answered for this long stops serving its `ha` workloads unless its peers
/// show the control plane away for all; the server, which hears nobody for about as
/// long, knows the agents may have concluded so.
pub fn isolation_window(down: std::time::Duration) -> std::time::Duration {
    let down = down.as_millis() as u64;
    let margin = down.div_ceil(3).max(250);
    std::time::Duration::from_millis(down.saturating_sub(margin).max(100))
}
