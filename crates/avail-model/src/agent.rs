//! Messages between agents and the server (`/v1/agent/...`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Resources, TimeMs, ValidationError, WorkloadSpec};

/// An agent asks to join (with a join token) or re-join (over TLS with its node
/// certificate, which alone may speak for an existing node).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// Node name (DNS label).
    pub name: String,
    /// The node's IP address.
    pub address: String,
    /// The node's ingress base URL.
    pub ingress_url: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Capacity offered.
    pub capacity: Resources,
    /// The most workload replicas the node takes.
    #[serde(default = "crate::node::default_max_workloads")]
    pub max_workloads: u32,
    /// Agent version.
    pub agent_version: String,
    /// Identifies this run of the agent process: a new value means the node restarted
    /// and every workload on it is a new run (new incarnation).
    pub boot_id: String,
    /// The agent's peer port (`ip:port`, mutual TLS): replication links, requests
    /// forwarded by other nodes' ingresses, and the fencing contact probe.
    pub replication_addr: String,
    /// The node's public key: an uncompressed P-256 point, base64url without padding.
    /// The server signs a certificate for it; its private half never leaves the node.
    pub public_key: String,
    /// A re-join's proof of holding the key bound to the name (absent at a first join,
    /// which needs a join token instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<KeyProof>,
}

/// A signature by the node's key over its name, key and the time (see
/// `avail_tls::node_key::proof_message`): proves the caller holds the key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyProof {
    /// When it was made, seconds since the Unix epoch (stale after 5 minutes).
    pub time_s: u64,
    /// ECDSA P-256 SHA-256 signature (ASN.1), base64url without padding.
    pub signature: String,
}

/// Most tags a node may declare.
pub const MAX_NODE_TAGS: usize = 64;
/// Largest CPU a node may offer, millicores (1,024 cores).
pub const MAX_NODE_CPU_MILLIS: u32 = 1_024_000;
/// Most workload replicas a node may take.
pub const MAX_NODE_WORKLOADS: u32 = 10_000;
/// Largest memory a node may offer, MiB (16 TiB).
pub const MAX_NODE_MEMORY_MIB: u32 = 16 << 20;

impl JoinRequest {
    /// Check every field as a tag patch is checked; the error names the field.
    pub fn validate(&self) -> Result<std::net::IpAddr, ValidationError> {
        let err = |f: &str, m: String| Err(ValidationError::new(f, m));
        if !crate::spec::is_dns_label(&self.name) {
            return err("name", format!("{:?} is not a DNS label", self.name));
        }
        let Ok(ip) = self.address.parse::<std::net::IpAddr>() else {
            return err(
                "address",
                format!("{:?} is not an IP address", self.address),
            );
        };
        // Routes and replication links must point at the node's own address.
        let ingress_ok = self
            .ingress_url
            .strip_prefix("http://")
            .and_then(|hp| hp.parse::<std::net::SocketAddr>().ok())
            .is_some_and(|sa| sa.ip() == ip);
        if !ingress_ok {
            return err(
                "ingress_url",
                format!("{:?} is not http://{ip}:<port>", self.ingress_url),
            );
        }
        let replication_ok = self
            .replication_addr
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|sa| sa.ip() == ip);
        if !replication_ok {
            return err(
                "replication_addr",
                format!("{:?} is not {ip}:<port>", self.replication_addr),
            );
        }
        if self.tags.len() > MAX_NODE_TAGS {
            return err(
                "tags",
                format!("{} tags; at most {MAX_NODE_TAGS}", self.tags.len()),
            );
        }
        for (k, v) in &self.tags {
            crate::constraint::parse_tag(&format!("{k}={v}"))
                .map_err(|e| ValidationError::new(format!("tags.{k}"), e.message))?;
        }
        if !(1..=MAX_NODE_CPU_MILLIS).contains(&self.capacity.cpu_millis) {
            return err(
                "capacity.cpu_millis",
                format!(
                    "{} is out of range 1..={MAX_NODE_CPU_MILLIS}",
                    self.capacity.cpu_millis
                ),
            );
        }
        if !(1..=MAX_NODE_MEMORY_MIB).contains(&self.capacity.memory_mib) {
            return err(
                "capacity.memory_mib",
                format!(
                    "{} is out of range 1..={MAX_NODE_MEMORY_MIB}",
                    self.capacity.memory_mib
                ),
            );
        }
        if !(1..=MAX_NODE_WORKLOADS).contains(&self.max_workloads) {
            return err(
                "max_workloads",
                format!(
                    "{} is out of range 1..={MAX_NODE_WORKLOADS}",
                    self.max_workloads
                ),
            );
        }
        for (field, value, max) in [
            ("agent_version", &self.agent_version, 64),
            ("boot_id", &self.boot_id, 128),
        ] {
            if value.len() > max || value.chars().any(|c| c.is_control()) {
                return err(field, format!("at most {max} printable characters"));
            }
        }
        if self.public_key.len() > 128 {
            return err("public_key", "too long for a P-256 point".into());
        }
        if self.proof.as_ref().is_some_and(|p| p.signature.len() > 256) {
            return err("proof.signature", "too long for a P-256 signature".into());
        }
        Ok(ip)
    }
}

/// The server's answer to a join.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JoinResponse {
    /// The node's certificate (PEM), signed by the cluster CA for the key it sent:
    /// presented on every call to the server from now on.
    pub certificate: String,
    /// Not valid after, seconds since the Unix epoch: the agent renews before.
    pub certificate_expires_s: u64,
    /// The cluster CA certificate (PEM).
    pub ca: String,
    /// How often to heartbeat, ms.
    pub heartbeat_interval_ms: u64,
    /// TTL of the node's liveness lease, ms: the server declares the node down (and
    /// restarts its `ha` workloads elsewhere) this long after its last heartbeat, so an
    /// isolated agent stops them itself before that.
    #[serde(default)]
    pub lease_ttl_ms: u64,
}

/// An agent asks for a fresh certificate, over a connection presenting its current one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// The key to certify (the node's current key, or a new one replacing it).
    pub public_key: String,
}

/// A renewed certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RenewResponse {
    /// The certificate (PEM).
    pub certificate: String,
    /// Not valid after, seconds since the Unix epoch.
    pub certificate_expires_s: u64,
}

/// One workload an agent must run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Assignment {
    /// The workload's uid (a re-created workload is a different one).
    pub uid: String,
    /// The workload's spec.
    pub spec: WorkloadSpec,
    /// Which run this is.
    pub incarnation: u64,
    /// Which replica this node runs.
    #[serde(default)]
    pub role: ReplicaRole,
    /// Level `ft`: the pair generation.
    #[serde(default)]
    pub generation: u64,
    /// Level `ft`: the other replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<Peer>,
    /// The active replica hands over to its peer as soon as the peer is in step (a
    /// live move: a drain): it stops taking requests, sends a last checkpoint, and
    /// once that is acknowledged asks the server to make the peer active.
    #[serde(default)]
    pub handover: bool,
}

/// Which replica of a workload a node runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaRole {
    /// The replica that serves.
    #[default]
    Active,
    /// The `ft` secondary, kept in step by checkpoints.
    Secondary,
}

/// The other replica of an `ft` pair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Peer {
    /// Its node.
    pub node: String,
    /// Its agent's replication address, `ip:port`.
    pub replication_addr: String,
}

/// An agent asks to move the pair lease of an `ft` workload from one generation to the
/// next (a secondary taking over, or a primary that lost its secondary).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// The generation the asker holds.
    pub from: u64,
    /// The generation it asks for (`from + 1`).
    pub to: u64,
}

/// An `ft` secondary reports that it failed (it cannot hold the pair's image, or it could
/// not start): `POST /v1/agent/pairs/<workload>/failed`. Sent at once, not with the next
/// heartbeat, so the reason is recorded even when the primary takes the next
/// generation first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecondaryFailure {
    /// The pair generation the secondary was assigned at.
    pub generation: u64,
    /// Why.
    pub reason: String,
}

/// The active replica, its last checkpoint acknowledged by the peer it hands over to,
/// asks the server to make that peer active: `POST /v1/agent/pairs/<workload>/handover`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HandoverRequest {
    /// The generation the asker holds.
    pub from: u64,
}

/// The answer to a [`LeaseRequest`] or a [`HandoverRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LeaseReply {
    /// Whether the asker now holds generation `to`.
    pub granted: bool,
    /// The workload's generation now.
    pub generation: u64,
}

/// Where a workload's active replica answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Route {
    /// Workload name.
    pub workload: String,
    /// Node of the active replica; none while the workload is not placed. Another
    /// node's ingress forwards to that node's peer port ([`DesiredState::peers`]).
    pub node: Option<String>,
    /// Incarnation of the active replica.
    pub incarnation: u64,
    /// Level `ft`: an ingress retries a request that got no reply against the replica
    /// active after a failover.
    #[serde(default)]
    pub ft: bool,
}

/// Desired state of one node plus the cluster's route table, at a revision.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DesiredState {
    /// Store revision this state was read at; pass it back to wait for a newer one.
    pub revision: u64,
    /// Workloads this node must run.
    pub assignments: Vec<Assignment>,
    /// Every workload's route, for the ingress.
    pub routes: Vec<Route>,
    /// Every node of the cluster and its peer port: where an ingress forwards, whom an
    /// agent asks, when the server is silent, whether the others still hear it
    /// (fencing), and the only names whose certificates a peer port accepts.
    #[serde(default)]
    pub peers: Vec<PeerNode>,
}

/// A node as the other nodes reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PeerNode {
    /// Its name (its certificate names `<name>.node.avail`).
    pub name: String,
    /// Its peer port, `ip:port`.
    pub addr: String,
}

/// A node's answer to the contact probe (`GET /_avail/contact` on its peer port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ContactReply {
    /// How long since a leader last heard the node, ms (since the send time of its last
    /// heartbeat a leader heard).
    pub contact_age_ms: u64,
}

/// The server's answer to a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatReply {
    /// The node's state as the server sees it.
    pub state: crate::NodeState,
    /// How often to heartbeat, ms (the windows may change when the server restarts).
    pub heartbeat_interval_ms: u64,
    /// The down window, ms: the agent's isolation window follows it.
    pub lease_ttl_ms: u64,
    /// The API of every server of the cluster now (`https://ip:port`): the agent
    /// speaks to these from now on (servers added or replaced, blue/green). Empty:
    /// keep the list it has.
    #[serde(default)]
    pub servers: Vec<String>,
    /// Whether a leader heard this heartbeat (false: no leader judges anyone now, and
    /// the server answered for the agent's fencing only).
    #[serde(default = "yes")]
    pub judged: bool,
    /// The suspect window, ms: a node silent this long takes no new work (0: unknown).
    #[serde(default)]
    pub suspect_ms: u64,
}

fn yes() -> bool {
    true
}

/// State of one instance on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Being prepared (artifact fetch, compile, process start).
    Starting,
    /// Serving.
    Running,
    /// Down and waiting for a local restart (backoff).
    Restarting,
    /// Cannot run (bad artifact, too many failures).
    Failed,
}

/// Status of one instance, reported by its agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InstanceStatus {
    /// Workload name.
    pub workload: String,
    /// Incarnation the agent runs.
    pub incarnation: u64,
    /// State.
    pub state: InstanceState,
    /// Local restarts.
    pub restarts: u32,
    /// Last error, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Which replica.
    #[serde(default)]
    pub role: ReplicaRole,
    /// Level `ft`: the pair generation of the assignment this replica runs.
    #[serde(default)]
    pub generation: u64,
    /// Level `ft` primary: replication figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ft: Option<crate::status::FtStatus>,
    /// The level the instance runs at as it reports (it follows a live level change a
    /// moment after the store): figures of another level than the workload's are stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<crate::Level>,
}

/// One log line of a workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogLine {
    /// Workload name.
    pub workload: String,
    /// When.
    pub time_ms: TimeMs,
    /// The line.
    pub line: String,
}

/// Heartbeat and status report of a node; the server answers with its node state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Heartbeat {
    /// Status of every instance on the node.
    pub instances: Vec<InstanceStatus>,
    /// Log lines since the last heartbeat (bounded by the agent).
    pub logs: Vec<LogLine>,
    /// Fences since the last heartbeat the server answered (reported once the node is
    /// heard again: while fenced it could not tell anyone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fences: Vec<FenceReport>,
}

/// A node fenced itself: cut off from the control plane, it stopped its `ha` workloads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FenceReport {
    /// When.
    pub at_ms: TimeMs,
    /// How long it had not heard the server then, ms.
    pub silent_ms: u64,
    /// The workloads it stopped.
    pub stopped: Vec<String>,
}
