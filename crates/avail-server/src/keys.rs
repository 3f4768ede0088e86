//! The store's key layout. Everything the control plane persists lives under these
//! prefixes; values are JSON.
//!
//! | key | value |
//! |---|---|
//! | `/workloads/<name>` | [`avail_model::Workload`] |
//! | `/nodes/<name>` | [`crate::state::NodeRecord`] |
//! | `/alive/<name>` | empty; attached to the node's lease: absent means down |
//! | `/servers/<id>` | [`avail_model::api::ServerInfo`]: a server of the cluster, on its own lease ([`crate::membership`]) |
//! | `/verdicts/<name>` | [`avail_model::NodeState`]: the leader's liveness verdict on the node, written when it changes (every server answers from it) |
//! | `/events/<seq, 20 digits>` | [`avail_model::ClusterEvent`] (the last [`crate::events::KEEP_EVENTS`]) |
//! | `/config/cluster_id` | the cluster's id, also in the server's data dir (`cluster.id`): a store and a data dir of different clusters are refused |
//! | `/config/schema` | the cluster's record schema ([`crate::schema`]); absent: 1 |
//! | `/config/levels` | [`avail_model::spec::LevelPolicy`]: the default level and minimums by node tag |
//! | `/tokens/<id>` | [`crate::join_tokens::TokenRecord`]: a join token's hash, life and uses |
//! | `/placement` | the last workload placed: written with every placement, and compared in the same transaction, so a plan made on an older view is refused |

/// Prefix of workloads.
pub const WORKLOADS: &str = "/workloads/";
/// Prefix of node records.
pub const NODES: &str = "/nodes/";
/// Prefix of node liveness keys.
pub const ALIVE: &str = "/alive/";
/// Prefix of the servers' registrations.
pub const SERVERS: &str = "/servers/";
/// Prefix of the leader's liveness verdicts.
pub const VERDICTS: &str = "/verdicts/";
/// Prefix of events.
pub const EVENTS: &str = "/events/";
/// The cluster's record schema.
pub const SCHEMA: &str = "/config/schema";
/// The cluster's level policy.
pub const LEVEL_POLICY: &str = "/config/levels";
/// Prefix of join tokens.
pub const TOKENS: &str = "/tokens/";
/// The cluster's id: bound to the server's data dir ([`crate::store_open`]).
pub const CLUSTER_ID: &str = "/config/cluster_id";
/// The placement key: every placement writes it and compares its revision.
pub const PLACEMENT: &str = "/placement";

/// A write of the placement key (its value says what: the workload placed, `restart`,
/// `rules`): every plan made before it is stale and refused.
pub fn placement_written(what: impl Into<Vec<u8>>) -> avail_store::Op {
    avail_store::Op::Put {
        key: PLACEMENT.into(),
        value: what.into(),
        lease: None,
    }
}

/// The placement-key write made with every change of what plans are made from (a
/// node's tags or drain, a join, the level policy), so a plan made on the old rules is
/// refused and made again.
pub fn rules_changed() -> avail_store::Op {
    placement_written("rules")
}

/// Key of a workload.
pub fn workload(name: &str) -> String {
    format!("{WORKLOADS}{name}")
}
/// Key of a node record.
pub fn node(name: &str) -> String {
    format!("{NODES}{name}")
}
/// Key of a node's liveness.
pub fn alive(name: &str) -> String {
    format!("{ALIVE}{name}")
}
/// Key of a server's registration.
pub fn server(id: &str) -> String {
    format!("{SERVERS}{id}")
}
/// Key of a node's liveness verdict.
pub fn verdict(name: &str) -> String {
    format!("{VERDICTS}{name}")
}
/// Key of an event.
pub fn event(seq: u64) -> String {
    format!("{EVENTS}{seq:020}")
}
/// Key of a join token.
pub fn token(id: &str) -> String {
    format!("{TOKENS}{id}")
}
