//! The server's state: the store, an in-memory view of the cluster kept current by a
//! store watch, node liveness, placement and status bookkeeping.
//!
//! Reads are served from the view; writes go to the store, and a writer waits until the
//! view has caught up with its revision before answering, so a client reads its own
//! writes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use avail_model::agent::{
    Assignment, DesiredState, InstanceState, InstanceStatus, LogLine, Peer, PeerNode, ReplicaRole,
    Route,
};
use avail_model::{Level, Node, NodeState, Phase, Resources, Workload, WorkloadStatus};
use avail_sched::{ClusterView, Decision, NodeView, Preference, Request};
use avail_store::{Event, LeaseId, Store, StoreError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::admission::{self, Placement};
use crate::auth::Auth;
use crate::events::{Events, NewEvent};
use crate::level_policy::decode_policy;
pub use crate::level_policy::{apply_admitted, with_admission};
use crate::metrics::Metrics;
use crate::{ServerConfig, keys, now_ms};

/// What the store keeps about a node (its liveness is the `/alive/` key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Name.
    pub name: String,
    /// IP address.
    pub address: String,
    /// Ingress base URL.
    pub ingress_url: String,
    /// Tags in force: the agent's, with the operator's changes applied.
    pub tags: BTreeMap<String, String>,
    /// Tags the agent declared when it joined.
    #[serde(default)]
    pub agent_tags: BTreeMap<String, String>,
    /// The operator's changes (`avail node tag`): a value sets the tag, `None` removes
    /// it. They outlive the agent's restarts and rejoins.
    #[serde(default)]
    pub tag_overrides: BTreeMap<String, Option<String>>,
    /// Capacity.
    pub capacity: Resources,
    /// The most workload replicas it takes.
    #[serde(default = "avail_model::node::default_max_workloads")]
    pub max_workloads: u32,
    /// First join.
    pub joined_ms: u64,
    /// Agent version.
    pub agent_version: String,
    /// The agent's replication listener.
    #[serde(default)]
    pub replication_addr: String,
    /// The agent run that last joined.
    #[serde(default)]
    pub boot_id: String,
    /// Being drained (`avail node drain`): it takes no new work and everything on it
    /// is moved off. Kept across the agent's rejoins until `undrain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainRecord>,
    /// The key the name is bound to and the certificates that speak for it.
    #[serde(default)]
    pub identity: crate::identity::NodeIdentity,
}

/// A drain as stored on the node record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainRecord {
    /// When it started.
    pub started_ms: u64,
    /// What was on the node then (replicas, standbys, reservations).
    pub total: u64,
}

impl NodeRecord {
    /// The agent's tags with the operator's changes applied.
    pub fn tags_in_force(&self) -> BTreeMap<String, String> {
        let mut t = self.agent_tags.clone();
        for (k, v) in &self.tag_overrides {
            match v {
                Some(v) => {
                    t.insert(k.clone(), v.clone());
                }
                None => {
                    t.remove(k);
                }
            }
        }
        t
    }
}

/// The cluster as last read from the store.
#[derive(Debug, Default)]
pub struct View {
    /// Revision the view reflects.
    pub rev: u64,
    /// Workloads and their `mod_rev`.
    pub workloads: BTreeMap<String, (Workload, u64)>,
    /// Node records.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Nodes whose liveness key exists.
    pub alive: BTreeSet<String>,
    /// Resources placed on each node (primaries and ft secondaries), kept up to date as
    /// workloads change: no scan of the workloads per node.
    pub allocated: HashMap<String, Resources>,
    /// Replicas placed on each node (against its workload limit), kept like `allocated`.
    pub replicas: HashMap<String, u32>,
    /// The scheduler's indexed view, kept up to date as nodes, their tags, their
    /// allocations and (from the liveness tick) their readiness change.
    pub sched: ClusterView,
    /// `mod_rev` of the placement key: the revision a plan is made at.
    pub placement_rev: u64,
    /// The cluster's level policy (the default when none is stored).
    pub policy: avail_model::spec::LevelPolicy,
}

impl View {
    /// Add (`add`) or take away a workload's resources on the nodes it occupies, and
    /// its `ha` reservation.
    fn account(&mut self, w: &Workload, add: bool) {
        if let Some(r) = &w.status.reservation {
            if add {
                self.sched.reserve(
                    r,
                    avail_sched::Reservation {
                        workload: w.spec.name.clone(),
                        priority: w.spec.ha.priority,
                        resources: w.spec.resources,
                    },
                );
            } else {
                self.sched.unreserve(r, &w.spec.name);
            }
        }
        let mut nodes: Vec<&str> = [
            w.status.node.as_deref(),
            w.status.secondary.as_deref(),
            w.status.moving_to.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect();
        nodes.sort_unstable();
        nodes.dedup();
        for n in nodes {
            let a = self.allocated.entry(n.to_string()).or_insert(Resources {
                cpu_millis: 0,
                memory_mib: 0,
            });
            let k = self.replicas.entry(n.to_string()).or_default();
            if add {
                *a = a.saturating_add(w.spec.resources);
                *k = k.saturating_add(1);
                self.sched.allocate(n, w.spec.resources);
            } else {
                *a = a.saturating_sub(w.spec.resources);
                *k = k.saturating_sub(1);
                self.sched.release(n, w.spec.resources);
            }
        }
    }

    fn put_workload(&mut self, name: &str, w: Workload, mod_rev: u64) {
        if let Some((old, _)) = self.workloads.remove(name) {
            self.account(&old, false);
        }
        self.account(&w, true);
        self.workloads.insert(name.to_string(), (w, mod_rev));
    }

    fn delete_workload(&mut self, name: &str) {
        if let Some((old, _)) = self.workloads.remove(name) {
            self.account(&old, false);
        }
    }

    fn put_node(&mut self, rec: NodeRecord) {
        let schedulable = self.sched.node(&rec.name).is_some_and(|n| n.schedulable);
        // A node seen for the first time: the reservations already held on it.
        let reserved = match self.sched.node(&rec.name) {
            Some(n) => n.reserved.clone(),
            None => self
                .workloads
                .values()
                .filter(|(w, _)| w.status.reservation.as_deref() == Some(rec.name.as_str()))
                .map(|(w, _)| avail_sched::Reservation {
                    workload: w.spec.name.clone(),
                    priority: w.spec.ha.priority,
                    resources: w.spec.resources,
                })
                .collect(),
        };
        self.sched.upsert(NodeView {
            name: rec.name.clone(),
            tags: rec.tags.clone(),
            capacity: rec.capacity,
            allocated: self.allocated.get(&rec.name).copied().unwrap_or(Resources {
                cpu_millis: 0,
                memory_mib: 0,
            }),
            workloads: self.replicas.get(&rec.name).copied().unwrap_or(0),
            max_workloads: rec.max_workloads,
            schedulable,
            reserved,
        });
        self.nodes.insert(rec.name.clone(), rec);
    }

    fn delete_node(&mut self, name: &str) {
        self.nodes.remove(name);
        self.sched.remove(name);
    }
}

/// When the current grace began, and when any node was last heard.
struct Grace {
    from: Instant,
    last_any: Instant,
}

/// Liveness seen by this server (memory only).
struct Live {
    last_heartbeat: Instant,
    last_heartbeat_ms: u64,
    lease: Option<LeaseId>,
}

/// Whether a live workload occupies `node`: runs there, has its secondary or standby
/// there, holds a reservation there, or is moving there. Failed and stopped workloads
/// do not count.
pub fn occupies(w: &Workload, node: &str) -> bool {
    let n = Some(node);
    matches!(w.status.phase, Phase::Placed | Phase::Running)
        && (w.status.node.as_deref() == n
            || w.status.secondary.as_deref() == n
            || w.status.reservation.as_deref() == n
            || w.status.moving_to.as_deref() == n)
}

/// Local restarts after which an `ha` workload still crashing on its node is
/// restarted on another node.
pub const HA_LOCAL_RESTARTS: u32 = 3;

/// Live moves a drain runs at once per node.
pub const DRAIN_PARALLEL_MOVES: usize = 16;
/// A live move that has not finished in this long is called off and tried again (a
/// restart would lose the workload's state).
pub const MOVE_TIMEOUT: Duration = Duration::from_secs(30);

/// The node of a workload's other replica: the `ft` secondary, or the standby of an
/// `ha` wasm workload on the node holding its reservation.
pub fn replica_node(w: &Workload) -> Option<&str> {
    match (w.spec.level, w.spec.driver) {
        (Level::Ft, _) => w.status.secondary.as_deref(),
        (Level::Ha, avail_model::DriverKind::Wasm) if !w.status.plain => {
            w.status.reservation.as_deref()
        }
        _ => None,
    }
}

/// Most `ha` restarts written in one store transaction (etcd's default limit on the
/// operations of a transaction is 128).
pub const RESTART_BATCH: usize = 100;

/// How long a node an ft pair lost is kept out of secondary placements.
pub const LOST_NODE_AVOID: Duration = Duration::from_secs(10);

/// Longest log history kept per workload, lines.
pub const MAX_LOG_LINES: usize = 1000;
/// Longest log line kept, bytes.
pub const MAX_LOG_LINE_BYTES: usize = 4096;

/// Shared server state.
pub struct AppState {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Token authority.
    pub auth: Auth,
    /// The cluster CA: signs node certificates.
    pub ca: avail_tls::ClusterCa,
    /// Configuration.
    pub config: ServerConfig,
    /// The cluster view.
    pub view: RwLock<View>,
    view_rev: watch::Sender<u64>,
    /// Bumped when workloads or nodes change: agents long-poll on it.
    desired_rev: watch::Sender<u64>,
    live: Mutex<HashMap<String, Live>>,
    /// Node states as last published (for transition events).
    published: Mutex<HashMap<String, NodeState>>,
    /// Events.
    pub events: Events,
    /// Recent log lines per workload.
    pub logs: Mutex<HashMap<String, VecDeque<LogLine>>>,
    /// Metrics.
    pub metrics: Metrics,
    /// Nodes an ft pair reported lost, and when: not candidates for a secondary for
    /// [`LOST_NODE_AVOID`] (they may still look ready for a heartbeat window).
    lost_nodes: Mutex<HashMap<String, Instant>>,
    /// Secondary failures already recorded: (workload, node, generation).
    failed_secondaries: Mutex<HashSet<(String, String, u64)>>,
    /// The grace against mass verdicts: from this server's start, and again after a
    /// stretch when no node was heard at all.
    grace: Mutex<Grace>,
    /// When each node was last declared down (restart timings run from here).
    down_at: Mutex<HashMap<String, Instant>>,
    /// `ha` workloads that failed on nodes since they last ran: the next restart avoids
    /// those nodes.
    failed_on: Mutex<HashMap<String, BTreeSet<String>>>,
    /// One lock per node: its heartbeat reports are applied in order, apart from the
    /// answer.
    report_turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Live moves under way, and when each started.
    moves: Mutex<HashMap<String, Instant>>,
    /// What holds each draining node's drain up.
    drain_blocked: Mutex<HashMap<String, String>>,
    /// Placements decided so far: the seed of each plan's random sample.
    placements: std::sync::atomic::AtomicU64,
    /// Module checks remembered per artifact digest.
    pub module_checks: crate::module_checks::ModuleChecks,
    /// Serialises placement decisions so two never use the same capacity.
    pub placement: tokio::sync::Mutex<()>,
}

/// Errors of state operations, mapped to HTTP by the API.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Concurrent modification; retry.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A placement was made on a view that another placement has changed since: plan
    /// again.
    #[error("the plan is stale: another placement came first")]
    StalePlan,
}

impl AppState {
    /// Load the view from the store and start following it.
    pub async fn open(
        store: Arc<dyn Store>,
        auth: Auth,
        ca: avail_tls::ClusterCa,
        config: ServerConfig,
    ) -> Result<Arc<AppState>, StoreError> {
        let events = Events::open(store.clone()).await?;
        let (view_rev, _) = watch::channel(0);
        let (desired_rev, _) = watch::channel(0);
        let state = Arc::new(AppState {
            store,
            auth,
            ca,
            config,
            view: RwLock::new(View::default()),
            view_rev,
            desired_rev,
            live: Mutex::new(HashMap::new()),
            published: Mutex::new(HashMap::new()),
            events,
            logs: Mutex::new(HashMap::new()),
            metrics: Metrics::new(),
            placement: tokio::sync::Mutex::new(()),
            lost_nodes: Mutex::new(HashMap::new()),
            failed_secondaries: Mutex::new(HashSet::new()),
            grace: Mutex::new(Grace {
                from: Instant::now(),
                last_any: Instant::now(),
            }),
            down_at: Mutex::new(HashMap::new()),
            moves: Mutex::new(HashMap::new()),
            report_turns: Mutex::new(HashMap::new()),
            failed_on: Mutex::new(HashMap::new()),
            drain_blocked: Mutex::new(HashMap::new()),
            placements: std::sync::atomic::AtomicU64::new(0),
            module_checks: Default::default(),
        });
        let rev = state.load().await?;
        let watch = state.store.watch("/", rev).await?;
        tokio::spawn(follow(Arc::downgrade(&state), watch));
        Ok(state)
    }

    async fn load(&self) -> Result<u64, StoreError> {
        let (wl, rev) = self.store.range(keys::WORKLOADS).await?;
        let mut v = View {
            rev,
            ..View::default()
        };
        for kv in wl {
            match serde_json::from_slice::<Workload>(&kv.value) {
                Ok(w) => {
                    let name = w.spec.name.clone();
                    v.put_workload(&name, w, kv.mod_rev);
                }
                Err(e) => tracing::error!("skipping unreadable {}: {e}", kv.key),
            }
        }
        // Ranges are separate reads; revisions only move forward, and the watch replays
        // anything after `rev`, so a later-revision read here is corrected by the watch.
        for kv in self.store.range(keys::NODES).await?.0 {
            if let Ok(n) = serde_json::from_slice::<NodeRecord>(&kv.value) {
                v.put_node(n);
            }
        }
        for kv in self.store.range(keys::ALIVE).await?.0 {
            v.alive.insert(kv.key[keys::ALIVE.len()..].to_string());
        }
        if let Some(kv) = self.store.get(keys::LEVEL_POLICY).await? {
            v.policy = decode_policy(&kv.value);
        }
        v.placement_rev = self
            .store
            .get(keys::PLACEMENT)
            .await?
            .map(|kv| kv.mod_rev)
            .unwrap_or(0);
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = v;
        self.view_rev.send_replace(rev);
        self.desired_rev.send_replace(rev);
        Ok(rev)
    }

    fn apply(&self, ev: &Event) {
        let rev = ev.revision();
        let key = ev.key();
        let mut desired = false;
        {
            let mut v = self.view.write().unwrap_or_else(|p| p.into_inner());
            v.rev = v.rev.max(rev);
            if let Some(name) = key.strip_prefix(keys::WORKLOADS) {
                desired = true;
                match ev {
                    Event::Put(kv) => match serde_json::from_slice::<Workload>(&kv.value) {
                        Ok(w) => v.put_workload(name, w, kv.mod_rev),
                        Err(e) => tracing::error!("unreadable {key}: {e}"),
                    },
                    Event::Delete { .. } => v.delete_workload(name),
                }
            } else if let Some(name) = key.strip_prefix(keys::NODES) {
                desired = true;
                match ev {
                    Event::Put(kv) => {
                        if let Ok(n) = serde_json::from_slice::<NodeRecord>(&kv.value) {
                            v.put_node(n);
                        }
                    }
                    Event::Delete { .. } => v.delete_node(name),
                }
            } else if key == keys::LEVEL_POLICY {
                v.policy = match ev {
                    Event::Put(kv) => decode_policy(&kv.value),
                    Event::Delete { .. } => Default::default(),
                };
            } else if key == keys::PLACEMENT {
                v.placement_rev = match ev {
                    Event::Put(kv) => kv.mod_rev,
                    Event::Delete { .. } => 0,
                };
            } else if let Some(name) = key.strip_prefix(keys::ALIVE) {
                desired = true;
                match ev {
                    Event::Put(_) => v.alive.insert(name.to_string()),
                    Event::Delete { .. } => v.alive.remove(name),
                };
            }
        }
        if desired {
            self.desired_rev.send_replace(rev);
        }
        self.view_rev.send_replace(rev);
    }

    /// Wait until the view reflects revision `rev` (bounded: 5 s).
    pub async fn wait_view(&self, rev: u64) {
        let mut rx = self.view_rev.subscribe();
        if tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|r| *r >= rev))
            .await
            .is_err()
        {
            tracing::warn!("view did not reach revision {rev} within 5 s; answering anyway");
        }
    }

    /// Wait until workloads or nodes change past `rev`, at most `wait`; returns the
    /// current desired revision.
    pub async fn wait_desired(&self, rev: u64, wait: Duration) -> u64 {
        let mut rx = self.desired_rev.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|r| *r > rev)).await;
        *rx.borrow()
    }

    /// Current liveness state of a node, from this server's clock: heard within
    /// `suspect_after` is ready, within `down_after` suspect, then down. A node this
    /// server has not heard since it started is suspect while its store lease holds or
    /// the startup grace lasts, then down.
    pub fn node_state(&self, name: &str, view: &View) -> NodeState {
        let st = self.liveness(name, view);
        let draining = view.nodes.get(name).is_some_and(|r| r.drain.is_some());
        if st == NodeState::Ready && draining {
            NodeState::Draining
        } else {
            st
        }
    }

    fn liveness(&self, name: &str, view: &View) -> NodeState {
        // No heartbeat from any node for the down window: this server is the one cut
        // off (or stalled), not every node at once. Nothing is declared down then, and
        // when heartbeats come back the nodes get a grace to be heard again.
        let (from, blackout) = {
            let g = self.grace.lock().unwrap_or_else(|p| p.into_inner());
            (g.from, g.last_any.elapsed() > self.config.down_after)
        };
        let in_grace = from.elapsed() < self.config.startup_grace;
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let (state, heard_since_grace) = match live.get(name) {
            Some(l) => {
                let silent = l.last_heartbeat.elapsed();
                let st = if silent <= self.config.suspect_after {
                    NodeState::Ready
                } else if silent <= self.config.down_after {
                    NodeState::Suspect
                } else {
                    NodeState::Down
                };
                (st, l.last_heartbeat >= from)
            }
            None if view.alive.contains(name) => (NodeState::Suspect, false),
            None => (NodeState::Down, false),
        };
        // A node heard since the grace began and silent since is down at once; one not
        // heard since then gets the grace.
        if state == NodeState::Down && (blackout || (in_grace && !heard_since_grace)) {
            NodeState::Suspect
        } else {
            state
        }
    }

    /// A node as the API shows it.
    pub fn node(&self, rec: &NodeRecord, view: &View) -> Node {
        let allocated = view.allocated.get(&rec.name).copied().unwrap_or(Resources {
            cpu_millis: 0,
            memory_mib: 0,
        });
        let last = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&rec.name)
            .map(|l| l.last_heartbeat_ms)
            .unwrap_or(0);
        Node {
            name: rec.name.clone(),
            address: rec.address.clone(),
            ingress_url: rec.ingress_url.clone(),
            tags: rec.tags.clone(),
            capacity: rec.capacity,
            allocated,
            workloads: view.replicas.get(&rec.name).copied().unwrap_or(0),
            max_workloads: rec.max_workloads,
            state: self.node_state(&rec.name, view),
            last_heartbeat_ms: last,
            joined_ms: rec.joined_ms,
            agent_version: rec.agent_version.clone(),
            replication_addr: rec.replication_addr.clone(),
            drain: rec.drain.as_ref().map(|d| {
                let on: Vec<&Workload> = view
                    .workloads
                    .values()
                    .map(|(w, _)| w)
                    .filter(|w| occupies(w, &rec.name))
                    .collect();
                avail_model::node::DrainStatus {
                    started_ms: d.started_ms,
                    total: d.total.max(on.len() as u64),
                    remaining: on.len() as u64,
                    moving: on.iter().filter(|w| w.status.moving_to.is_some()).count() as u64,
                    blocked: self
                        .drain_blocked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&rec.name)
                        .cloned(),
                }
            }),
        }
    }

    /// All nodes, by name.
    pub fn nodes(&self) -> Vec<Node> {
        let v = self.view.read().unwrap_or_else(|p| p.into_inner());
        v.nodes.values().map(|r| self.node(r, &v)).collect()
    }

    /// Decide where a workload goes, given the current view (caller holds `placement`),
    /// and the placement revision the plan was made at (for [`AppState::write_placement`]).
    pub fn decide(&self, w: &Workload) -> (Decision, u64) {
        self.decide_avoiding(w, None, None, Placement::Start)
    }

    /// Where `w` would go now, both replicas for an `ft` workload (its secondary on
    /// another value of its spread tag): the `--dry-run` answer. Changes nothing.
    pub fn preview(&self, w: &Workload) -> Decision {
        let pair = (w.spec.level == Level::Ft).then(|| {
            w.spec
                .placement
                .spread
                .clone()
                .unwrap_or_else(|| "rack".into())
        });
        self.decide_avoiding(w, None, pair, Placement::Start).0
    }

    /// Where the `ft` secondary of `w` goes: not on the primary's node, nor in its fault
    /// domain (the tag named by `placement.spread`, default `rack`).
    pub fn decide_secondary(&self, w: &Workload, also_avoid: Option<String>) -> (Decision, u64) {
        let Some(primary) = w.status.node.clone() else {
            return (
                Decision::Unplaceable {
                    explanation: "no primary yet".into(),
                },
                0,
            );
        };
        let tag = w
            .spec
            .placement
            .spread
            .clone()
            .unwrap_or_else(|| "rack".into());
        let domain = self
            .view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .nodes
            .get(&primary)
            .and_then(|n| n.tags.get(&tag).cloned());
        self.decide_avoiding(
            w,
            Some(avail_sched::Avoid {
                nodes: std::iter::once(primary)
                    .chain(also_avoid)
                    .chain(self.recently_lost())
                    .collect(),
                fault_domain: domain.map(|d| (tag, vec![d])),
            }),
            None,
            Placement::Start,
        )
    }

    /// Nodes an ft pair lost within [`LOST_NODE_AVOID`].
    fn recently_lost(&self) -> Vec<String> {
        let mut lost = self.lost_nodes.lock().unwrap_or_else(|p| p.into_inner());
        lost.retain(|_, at| at.elapsed() < LOST_NODE_AVOID);
        lost.keys().cloned().collect()
    }

    fn decide_avoiding(
        &self,
        w: &Workload,
        avoid: Option<avail_sched::Avoid>,
        pair: Option<String>,
        kind: Placement,
    ) -> (Decision, u64) {
        let policy = self.level_policy();
        let req = self.request(w, avoid.unwrap_or_default(), pair, &policy, kind);
        let seed = self
            .placements
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Planned on the indexed view kept up to date as the store changes: no copy,
        // no scan of the workloads.
        let (plan, at) = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            let plan = avail_sched::plan(&v.sched, &[req], &mut avail_model::rng::SplitMix64(seed));
            (plan, v.placement_rev)
        };
        let d = match plan.decisions.into_iter().next().map(|(_, d)| d) {
            Some(Decision::Unplaceable { explanation }) => Decision::Unplaceable {
                explanation: admission::explain(w, &policy, kind, &explanation),
            },
            Some(d) => d,
            None => Decision::Unplaceable {
                explanation: "no decision".into(),
            },
        };
        (d, at)
    }

    /// The scheduler's request for `w`: its own rules, and kept off the nodes where the
    /// level policy would not admit it ([`admission::kept_off`]).
    fn request(
        &self,
        w: &Workload,
        avoid: avail_sched::Avoid,
        pair: Option<String>,
        policy: &avail_model::spec::LevelPolicy,
        kind: Placement,
    ) -> Request {
        let mut constraints = w.spec.constraints();
        constraints.extend(admission::kept_off(w, policy, kind));
        Request {
            workload: w.spec.name.clone(),
            resources: w.spec.resources,
            constraints,
            preferences: w
                .spec
                .placement
                .affinity
                .iter()
                .filter_map(|a| {
                    Some(Preference {
                        rule: avail_model::Constraint::parse(&a.rule).ok()?,
                        weight: a.weight,
                    })
                })
                .collect(),
            avoid,
            pair,
            policy: match w.spec.placement.policy {
                avail_model::spec::PlacementPolicy::Spread => avail_sched::Policy::Spread,
                avail_model::spec::PlacementPolicy::Pack => avail_sched::Policy::Pack,
            },
            priority: w.spec.ha.priority,
            ..Request::default()
        }
    }

    /// Write a workload if its `mod_rev` is still `expected` (0: create). Returns the
    /// new revision, after the view has caught up with it.
    pub async fn write_workload(&self, w: &Workload, expected: u64) -> Result<u64, StateError> {
        self.write_workload_with_events(w, expected, vec![]).await
    }

    /// [`write_workload`](Self::write_workload) with `events` committed in the same
    /// transaction (none when the compare fails: [`Events::commit`]).
    pub async fn write_workload_with_events(
        &self,
        w: &Workload,
        expected: u64,
        events: Vec<NewEvent>,
    ) -> Result<u64, StateError> {
        let value = serde_json::to_vec(w).expect("workload serialises");
        match self
            .events
            .compare_and_swap(&keys::workload(&w.spec.name), expected, value, events)
            .await?
        {
            Some(rev) => {
                self.wait_view(rev).await;
                Ok(rev)
            }
            None => Err(StateError::Conflict(format!(
                "workload {} changed concurrently",
                w.spec.name
            ))),
        }
    }

    /// Write a placement: the workload if its `mod_rev` is still `expected` (0: create),
    /// and only if no other placement was written since the plan was made at
    /// `placement_rev` (compare-and-swap on the placement key, in one transaction): two
    /// plans, from one server or several, can never both take the same capacity.
    pub async fn write_placement(
        &self,
        w: &Workload,
        expected: u64,
        placement_rev: u64,
    ) -> Result<u64, StateError> {
        self.write_placement_with_events(w, expected, placement_rev, vec![])
            .await
    }

    /// [`write_placement`](Self::write_placement) with `events` committed in the same
    /// transaction (none when it is refused).
    pub async fn write_placement_with_events(
        &self,
        w: &Workload,
        expected: u64,
        placement_rev: u64,
        events: Vec<NewEvent>,
    ) -> Result<u64, StateError> {
        let key = keys::workload(&w.spec.name);
        let txn = avail_store::Txn {
            compares: vec![
                avail_store::Compare::ModRev(key.clone(), expected),
                avail_store::Compare::ModRev(keys::PLACEMENT.into(), placement_rev),
            ],
            success: vec![
                avail_store::Op::Put {
                    key,
                    value: serde_json::to_vec(w).expect("workload serialises"),
                    lease: None,
                },
                avail_store::Op::Put {
                    key: keys::PLACEMENT.into(),
                    value: w.spec.name.clone().into_bytes(),
                    lease: None,
                },
            ],
            failure: vec![],
        };
        let r = self.events.commit(txn, events).await?;
        if r.succeeded {
            self.wait_view(r.revision).await;
            return Ok(r.revision);
        }
        let now = self.store.get(keys::PLACEMENT).await?.map(|kv| kv.mod_rev);
        if now.unwrap_or(0) != placement_rev {
            Err(StateError::StalePlan)
        } else {
            Err(StateError::Conflict(format!(
                "workload {} changed concurrently",
                w.spec.name
            )))
        }
    }

    /// Update a workload's status with `f`, retrying on concurrent change. Writes only
    /// when `f` changed something.
    pub async fn update_status(
        &self,
        name: &str,
        f: impl Fn(&mut WorkloadStatus),
    ) -> Result<(), StateError> {
        self.update_status_with_events(name, |s| {
            f(s);
            vec![]
        })
        .await
        .map(|_| ())
    }

    /// [`update_status`](Self::update_status) where `f` also says which events its
    /// change makes: each attempt asks `f` again, and the events of the attempt that
    /// commits are committed with it (so once). Whether it wrote (an unchanged status
    /// is not written, and its events are not recorded).
    pub async fn update_status_with_events(
        &self,
        name: &str,
        f: impl Fn(&mut WorkloadStatus) -> Vec<NewEvent>,
    ) -> Result<bool, StateError> {
        for _ in 0..10 {
            let Some((mut w, rev)) = self.workload(name) else {
                return Ok(false);
            };
            let before = w.status.clone();
            let events = f(&mut w.status);
            if w.status == before {
                return Ok(false);
            }
            w.status.updated_ms = now_ms();
            match self.write_workload_with_events(&w, rev, events).await {
                Ok(_) => return Ok(true),
                Err(StateError::Conflict(_)) => {
                    let mut v = self.view_rev.subscribe();
                    let _ = tokio::time::timeout(Duration::from_millis(50), v.changed()).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(StateError::Conflict(format!(
            "status of {name}: too many concurrent changes"
        )))
    }

    /// One workload and its `mod_rev`.
    pub fn workload(&self, name: &str) -> Option<(Workload, u64)> {
        self.view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .workloads
            .get(name)
            .cloned()
    }

    /// Place every pending workload that fits now.
    pub async fn place_pending(&self) {
        let _guard = self.placement.lock().await;
        let pending: Vec<String> = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.workloads
                .values()
                .filter(|(w, _)| w.status.phase == Phase::Pending)
                .map(|(w, _)| w.spec.name.clone())
                .collect()
        };
        for name in pending {
            let Some((mut w, rev)) = self.workload(&name) else {
                continue;
            };
            let (decision, at) = self.decide(&w);
            if let Decision::Unplaceable { explanation } = &decision {
                // The reason kept with the workload follows the cluster (a node that was
                // not ready may now be at its workload limit): written when it changes.
                let message = format!("unplaceable: {explanation}");
                if w.status.message.as_deref() != Some(message.as_str()) {
                    w.status.message = Some(message);
                    w.status.updated_ms = now_ms();
                    let _ = self.write_workload(&w, rev).await;
                }
                continue;
            }
            if let Decision::Place { node, .. } = decision {
                // Admitted at the node's minimum level (the plan kept it off nodes
                // where it cannot be; their tags may have changed since: next pass).
                let Ok(admitted) = self.admit_on(&w, &node, Placement::Start) else {
                    continue;
                };
                w.status.phase = Phase::Placed;
                w.status.node = Some(node.clone());
                w.status.incarnation += 1;
                w.status.message = None;
                w.status.updated_ms = now_ms();
                w.status.generation = w.status.generation.max(1);
                apply_admitted(&mut w, &admitted);
                // A stale plan is tried again at the next pass (every second).
                let placed = NewEvent::new(
                    "workload.placed",
                    Some(&name),
                    Some(&node),
                    with_admission(
                        format!("placed on {node} (incarnation {})", w.status.incarnation),
                        &admitted,
                    ),
                );
                let _ = self
                    .write_placement_with_events(&w, rev, at, vec![placed])
                    .await;
            }
        }
        drop(_guard);
        self.place_secondaries().await;
        self.place_reservations().await;
    }

    /// Give every placed `ha` workload that has none a soft reservation for its restart:
    /// its resources held on a node of another fault domain (the tag named by
    /// `placement.spread`, default `rack`) that its constraints allow. Lower priorities
    /// cannot use it; a higher-priority placement may, and the reservation is then made
    /// again elsewhere.
    pub async fn place_reservations(&self) {
        let _guard = self.placement.lock().await;
        for name in self.placed_lacking(Level::Ha, |s| s.reservation.is_none()) {
            let Some((mut w, rev)) = self.workload(&name) else {
                continue;
            };
            // Where a secondary would go: not the node, nor its fault domain.
            if let (Decision::Place { node: r, .. }, at) = self.decide_secondary(&w, None) {
                w.status.reservation = Some(r.clone());
                let reserved = NewEvent::new(
                    "workload.reserved",
                    Some(&name),
                    Some(&r),
                    format!("restart capacity held on {r}"),
                );
                let _ = self
                    .write_placement_with_events(&w, rev, at, vec![reserved])
                    .await;
            }
        }
    }

    /// Placed or running workloads of `level` whose status `lacks` something.
    fn placed_lacking(&self, level: Level, lacks: impl Fn(&WorkloadStatus) -> bool) -> Vec<String> {
        let v = self.view.read().unwrap_or_else(|p| p.into_inner());
        v.workloads
            .values()
            .filter(|(w, _)| {
                w.spec.level == level
                    && w.status.node.is_some()
                    && lacks(&w.status)
                    && matches!(w.status.phase, Phase::Placed | Phase::Running)
            })
            .map(|(w, _)| w.spec.name.clone())
            .collect()
    }

    /// Take away `name`'s reservation if it is on `node` (a new one is made by the next
    /// reservation pass, away from what made this one go). `why`, an event, is
    /// committed with that write, or recorded alone when there was nothing to write.
    async fn drop_reservation(&self, name: &str, node: &str, why: Option<NewEvent>) {
        let res = self
            .update_status_with_events(name, |s| {
                if s.reservation.as_deref() != Some(node) {
                    return vec![];
                }
                s.reservation = None;
                why.iter().cloned().collect()
            })
            .await;
        self.events.unless_written(res, why).await;
    }

    /// Reservations a higher-priority placement took: the workloads they were held for
    /// get new ones from the next pass.
    pub async fn release_displaced(&self, displaced: &[String], on: &str) {
        for name in displaced {
            let why = NewEvent::new(
                "workload.reservation_displaced",
                Some(name),
                Some(on),
                format!("its reservation on {on} was taken by a higher priority"),
            );
            self.drop_reservation(name, on, Some(why)).await;
        }
    }

    /// Give every running `ft` workload that has none a secondary on another fault domain.
    pub async fn place_secondaries(&self) {
        self.place_secondaries_avoiding(None).await
    }

    /// [`place_secondaries`](Self::place_secondaries), not on `avoid` (a node just lost by
    /// a pair: it may still look ready for a heartbeat window).
    pub async fn place_secondaries_avoiding(&self, avoid: Option<(&str, &str)>) {
        let _guard = self.placement.lock().await;
        for name in self.placed_lacking(Level::Ft, |s| s.secondary.is_none()) {
            let Some((mut w, rev)) = self.workload(&name) else {
                continue;
            };
            let skip = avoid
                .filter(|(w, _)| *w == name)
                .map(|(_, n)| n.to_string());
            match self.decide_secondary(&w, skip) {
                (Decision::Place { node, .. }, at) => {
                    w.status.secondary = Some(node.clone());
                    w.status.level_state = Some("ft:syncing".into());
                    w.status.updated_ms = now_ms();
                    let placed = NewEvent::new(
                        "workload.secondary_placed",
                        Some(&name),
                        Some(&node),
                        format!("secondary on {node} (generation {})", w.status.generation),
                    );
                    let _ = self
                        .write_placement_with_events(&w, rev, at, vec![placed])
                        .await;
                }
                (Decision::Unplaceable { explanation }, _) => {
                    let msg = format!("no node for the secondary: {explanation}");
                    if w.status.message.as_deref() != Some(msg.as_str()) {
                        w.status.message = Some(msg);
                        w.status.level_state = Some("ft:unprotected".into());
                        let _ = self.write_workload(&w, rev).await;
                    }
                }
            }
        }
    }

    /// The secondary of `name` on `node` (at `generation`) reported failure (out of
    /// memory for its image, a start that failed), at once or in a heartbeat. Recorded
    /// once per (workload, node, generation) as an event, even when the primary already
    /// took the next generation. For the current secondary: its node is kept out of the
    /// next secondary placement; a live primary notices the silence and takes the next
    /// generation (the pair protocol; a new secondary is placed then). A primary whose
    /// node is down too cannot: the pair is taken to have no secondary, so the workload
    /// is reported failed instead of staying "running" on a dead node.
    pub async fn secondary_failed(
        &self,
        name: &str,
        node: &str,
        generation: u64,
        why: Option<&str>,
    ) {
        let Some((w, _)) = self.workload(name) else {
            return;
        };
        if w.spec.level == Level::Ha && w.status.reservation.as_deref() == Some(node) {
            // An ha standby that cannot hold the checkpoints: the reservation moves
            // elsewhere (the next reservation pass), away from this node for a while.
            self.lost_nodes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(node.to_string(), Instant::now());
            let failed = NewEvent::new(
                "workload.standby_failed",
                Some(name),
                Some(node),
                format!(
                    "standby on {node} failed: {}",
                    why.unwrap_or("no reason given")
                ),
            );
            self.drop_reservation(name, node, Some(failed)).await;
            return;
        }
        if w.spec.level != Level::Ft || generation > w.status.generation {
            return;
        }
        let first = {
            let mut seen = self
                .failed_secondaries
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if seen.len() > 10_000 {
                seen.clear();
            }
            seen.insert((name.to_string(), node.to_string(), generation))
        };
        let current =
            w.status.secondary.as_deref() == Some(node) && w.status.generation == generation;
        if current {
            self.lost_nodes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(node.to_string(), Instant::now());
        }
        let primary_down = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.workloads
                .get(name)
                .and_then(|(w, _)| w.status.node.clone())
                .is_some_and(|n| self.node_state(&n, &v) == NodeState::Down)
        };
        // Recorded once: with the write the failure makes, or alone.
        let event = first.then(|| {
            NewEvent::new(
                "workload.secondary_failed",
                Some(name),
                Some(node),
                format!(
                    "secondary on {node} (generation {generation}) failed: {}",
                    why.unwrap_or("no reason given")
                ),
            )
        });
        let mut res = Ok(false);
        if current && primary_down {
            // Failed in the same write: no later placement may give the dead primary a
            // secondary that would count as a survivor.
            let why = why.unwrap_or("no reason given").to_string();
            res = self
                .update_status_with_events(name, |s| {
                    if s.secondary.as_deref() != Some(node) || s.generation != generation {
                        return vec![];
                    }
                    s.secondary = None;
                    s.phase = Phase::Failed;
                    s.message = Some(format!(
                        "node {} is down and the secondary on {node} failed: {why}",
                        s.node.clone().unwrap_or_default()
                    ));
                    event.iter().cloned().collect()
                })
                .await;
        }
        self.events.unless_written(res, event).await;
    }

    /// Move the pair lease of an `ft` workload from generation `from` to `to` for
    /// `node` (its primary or its secondary), by compare-and-swap on the workload: one
    /// asker at most wins a generation. A winning secondary becomes the active replica
    /// (new incarnation); either way the pair has no secondary until a new one is placed.
    pub async fn take_lease(
        &self,
        name: &str,
        node: &str,
        from: u64,
        to: u64,
    ) -> Result<(bool, u64), StateError> {
        // A compare-and-swap conflict with an unrelated write (a heartbeat's status) is
        // not a refusal: read again and retry while the generation is still `from`.
        let mut attempts = 0;
        let lost = loop {
            attempts += 1;
            let Some((mut w, rev)) = self.workload(name) else {
                return Ok((false, 0));
            };
            // Asked again after a lost answer: the asker already holds `to`.
            if w.status.generation == to && w.status.node.as_deref() == Some(node) {
                return Ok((true, to));
            }
            let member = w.status.node.as_deref() == Some(node)
                || w.status.secondary.as_deref() == Some(node);
            if w.spec.level != Level::Ft
                && w.status.node.as_deref() == Some(node)
                && w.status.generation == from
                && to == from + 1
            {
                // No longer ft (a level lowered while the primary was asking, its
                // secondary already gone): the active copy keeps running, at the next
                // generation; never fenced for it.
                w.status.generation = to;
                w.status.secondary = None;
                w.status.moving_to = None;
                w.status.updated_ms = now_ms();
                match self.write_workload(&w, rev).await {
                    Ok(_) => return Ok((true, to)),
                    Err(StateError::Conflict(_)) if attempts < 20 => continue,
                    Err(e) => return Err(e),
                }
            }
            if w.spec.level != Level::Ft || !member || w.status.generation != from || to != from + 1
            {
                return Ok((false, w.status.generation));
            }
            let promoted = w.status.secondary.as_deref() == Some(node);
            // The other member is presumed lost: not a candidate for the next secondary.
            let lost = if promoted {
                w.status.node.clone()
            } else {
                w.status.secondary.clone()
            };
            // Recorded before the write, so that no placement after it picks the lost node.
            if let Some(l) = &lost {
                self.lost_nodes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(l.clone(), Instant::now());
            }
            w.status.generation = to;
            w.status.secondary = None;
            // A move under way is over: the pair changed under it.
            w.status.moving_to = None;
            w.status.level_state = Some("ft:degraded".into());
            if promoted {
                w.status.node = Some(node.to_string());
                w.status.incarnation += 1;
                w.status.phase = Phase::Running;
                w.status.restarts = 0;
            }
            w.status.ft = None;
            w.status.updated_ms = now_ms();
            let what = if promoted {
                format!(
                    "secondary on {node} took over at generation {to} (incarnation {})",
                    w.status.incarnation
                )
            } else {
                format!("primary on {node} lost its secondary; runs at generation {to}")
            };
            let failover = NewEvent::new("workload.failover", Some(name), Some(node), what);
            match self
                .write_workload_with_events(&w, rev, vec![failover])
                .await
            {
                Ok(_) => break lost,
                Err(StateError::Conflict(_)) if attempts < 20 => continue,
                Err(e) => return Err(e),
            }
        };
        self.place_secondaries_avoiding(lost.as_deref().map(|l| (name, l)))
            .await;
        Ok((true, to))
    }

    /// The liveness part of a heartbeat: renew the node's lease (or create it), make it
    /// schedulable when ready. Kept short: the agent times its contact with the server
    /// by the answer (fencing), so the reports are applied apart ([`AppState::reports`]).
    pub async fn heard(&self, node: &str) -> Result<NodeState, StateError> {
        let lease = {
            let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            let l = live.entry(node.to_string()).or_insert(Live {
                last_heartbeat: Instant::now(),
                last_heartbeat_ms: 0,
                lease: None,
            });
            l.last_heartbeat = Instant::now();
            l.last_heartbeat_ms = now_ms();
            l.lease
        };
        {
            let mut g = self.grace.lock().unwrap_or_else(|p| p.into_inner());
            if g.last_any.elapsed() > self.config.down_after {
                tracing::warn!(
                    "no node was heard for {} ms: this server was cut off or stalled; a grace before any node is declared down",
                    g.last_any.elapsed().as_millis()
                );
                g.from = Instant::now();
            }
            g.last_any = Instant::now();
        }
        let renewed = match lease {
            Some(id) => match self.store.keep_alive(id).await {
                Ok(()) => true,
                Err(StoreError::LeaseNotFound(_)) => false,
                Err(e) => return Err(e.into()),
            },
            None => false,
        };
        if !renewed
            || !self
                .view
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .alive
                .contains(node)
        {
            let id = self.store.grant_lease(self.config.lease_ttl_s()).await?;
            let rev = self
                .store
                .put(&keys::alive(node), Vec::new(), Some(id))
                .await?;
            if let Some(l) = self
                .live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(node)
            {
                l.lease = Some(id);
            }
            self.wait_view(rev).await;
        }
        // Heard and alive: ready, so schedulable from now on (the liveness tick takes
        // it away again when the heartbeats stop).
        let ready = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            let schedulable = v.sched.node(node).is_some_and(|n| n.schedulable);
            (!schedulable && self.node_state(node, &v) == NodeState::Ready).then_some(())
        };
        if ready.is_some() {
            self.view
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .sched
                .set_schedulable(node, true);
        }
        let v = self.view.read().unwrap_or_else(|p| p.into_inner());
        Ok(self.node_state(node, &v))
    }

    /// The reports of a heartbeat: instance states and log lines. One node's reports
    /// are applied in the order they came (a lock per node).
    pub async fn reports(&self, node: &str, instances: &[InstanceStatus], logs: Vec<LogLine>) {
        let turn = self
            .report_turns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(node.to_string())
            .or_default()
            .clone();
        if Arc::strong_count(&turn) > 3 {
            // Two reports of this node are already in line (the store is slow): this
            // one's instance states will be superseded by the next heartbeat's, which
            // carries them all again; only its log lines are kept.
            drop(turn);
            self.keep_logs(node, logs);
            return;
        }
        let _turn = turn.lock().await;
        for inst in instances {
            let phase = match inst.state {
                InstanceState::Starting => Phase::Placed,
                InstanceState::Running => Phase::Running,
                InstanceState::Restarting | InstanceState::Failed => Phase::Failed,
            };
            let Some((w, _)) = self.workload(&inst.workload) else {
                continue;
            };
            // The active replica speaks for the workload; a secondary's report matters
            // only when it failed (out of memory for its image, a start that failed):
            // it is replaced, and its node avoided for a while.
            if inst.role == ReplicaRole::Secondary {
                if inst.state == InstanceState::Failed {
                    self.secondary_failed(
                        &inst.workload,
                        node,
                        inst.generation,
                        inst.message.as_deref(),
                    )
                    .await;
                }
                continue;
            }
            // A report about another run (a stale copy, a moved workload) is ignored.
            if w.status.node.as_deref() != Some(node) || w.status.incarnation != inst.incarnation {
                continue;
            }
            // The run is checked again inside the update: the workload may have been
            // re-created or moved since it was read. A new phase is an event, committed
            // with the status that has it.
            let res = self
                .update_status_with_events(&inst.workload, |s| {
                    let was = s.phase;
                    if s.node.as_deref() == Some(node) && s.incarnation == inst.incarnation {
                        s.phase = phase;
                        s.restarts = inst.restarts;
                        s.message = inst.message.clone();
                        // Figures taken at another level (before the replica heard of
                        // a live level change) are stale.
                        if let (Some(ft), Level::Ft | Level::Ha) = (&inst.ft, w.spec.level)
                            && inst.level.is_none_or(|l| l == w.spec.level)
                        {
                            s.level_state = Some(format!("{}:{}", w.spec.level.as_str(), ft.mode));
                            s.ft = Some(ft.clone());
                        }
                    }
                    (s.phase != was)
                        .then(|| {
                            NewEvent::new(
                                format!("workload.{}", phase.as_str()),
                                Some(&inst.workload),
                                Some(node),
                                inst.message.clone().unwrap_or_default(),
                            )
                        })
                        .into_iter()
                        .collect()
                })
                .await;
            if let Err(e) = res {
                // One workload's status must not cost the node its liveness or the
                // other reports: log it; the next heartbeat reports again.
                tracing::warn!(workload = %inst.workload, "status not recorded: {e}");
                continue;
            }
            // An ha workload that cannot start on its node, or keeps crashing there
            // (local restarts), is restarted on another one.
            let failing = inst.state == InstanceState::Failed
                || (inst.state == InstanceState::Restarting && inst.restarts >= HA_LOCAL_RESTARTS);
            if failing && w.spec.level == Level::Ha {
                self.ha_failed_on(&inst.workload, node).await;
            }
            if phase == Phase::Running {
                self.failed_on
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&inst.workload);
            }
        }
        self.keep_logs(node, logs);
    }

    /// Keep a node's log lines (only those of workloads placed on it).
    fn keep_logs(&self, node: &str, logs: Vec<LogLine>) {
        if !logs.is_empty() {
            // Only lines of workloads placed on this node are kept.
            let here: BTreeSet<String> = {
                let v = self.view.read().unwrap_or_else(|p| p.into_inner());
                v.workloads
                    .values()
                    .filter(|(w, _)| w.status.node.as_deref() == Some(node))
                    .map(|(w, _)| w.spec.name.clone())
                    .collect()
            };
            let mut all = self.logs.lock().unwrap_or_else(|p| p.into_inner());
            for mut l in logs.into_iter().filter(|l| here.contains(&l.workload)) {
                if l.line.len() > MAX_LOG_LINE_BYTES {
                    let mut cut = MAX_LOG_LINE_BYTES;
                    while !l.line.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    l.line.truncate(cut);
                }
                let q = all.entry(l.workload.clone()).or_default();
                if q.len() == MAX_LOG_LINES {
                    q.pop_front();
                }
                q.push_back(l);
            }
        }
    }

    /// A node's agent restarted (new boot id): every workload on it is a new run.
    /// Mark them placed with the next incarnation until the agent reports them.
    pub async fn node_rebooted(&self, node: &str) -> Result<(), StateError> {
        let names: Vec<String> = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.workloads
                .values()
                .filter(|(w, _)| {
                    w.status.node.as_deref() == Some(node) && w.status.phase != Phase::Stopped
                })
                .map(|(w, _)| w.spec.name.clone())
                .collect()
        };
        // An ha wasm workload with a standby elsewhere resumes there, from its last
        // checkpoint, rather than fresh on the restarted node.
        let names = self.resume_on_standby(names, node, "restarted").await;
        for name in names {
            self.update_status_with_events(&name, |s| {
                s.phase = Phase::Placed;
                s.incarnation += 1;
                // A new run: a standby or secondary of the old one is replaced.
                s.generation += 1;
                s.moving_to = None;
                s.restarts = 0;
                s.message = Some(format!("node {node} restarted"));
                vec![NewEvent::new(
                    "workload.placed",
                    Some(&name),
                    Some(node),
                    format!("node restarted; starting incarnation {}", s.incarnation),
                )]
            })
            .await?;
        }
        Ok(())
    }

    /// Publish node state transitions as events; mark the workloads of a node that
    /// went down as failed. Called periodically.
    pub async fn check_liveness(&self) {
        // States only: building the API's node (allocation, drain progress) every 50 ms
        // would scan the workloads of each draining node for nothing.
        let states: Vec<(String, NodeState)> = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.nodes
                .keys()
                .map(|n| (n.clone(), self.node_state(n, &v)))
                .collect()
        };
        // The scheduler's view follows readiness (a clock matter, not a store event).
        {
            let mut v = self.view.write().unwrap_or_else(|p| p.into_inner());
            for (name, st) in &states {
                v.sched.set_schedulable(name, *st == NodeState::Ready);
            }
        }
        let mut changed = Vec::new();
        {
            let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
            for (name, st) in &states {
                if published.insert(name.clone(), *st) != Some(*st) {
                    changed.push((name.clone(), *st));
                }
            }
        }
        for (name, st) in changed {
            let silent = self
                .live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&name)
                .map(|l| l.last_heartbeat.elapsed());
            let what = match (st, silent) {
                (NodeState::Down, Some(d)) => {
                    self.metrics.nodes_down.inc();
                    self.metrics.detection_seconds.observe(d.as_secs_f64());
                    self.down_at
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name.clone(), Instant::now());
                    format!("node {name} is down: silent for {} ms", d.as_millis())
                }
                (NodeState::Suspect, Some(d)) => {
                    format!("node {name} is suspect: silent for {} ms", d.as_millis())
                }
                _ => format!("node {name} is {}", st.as_str()),
            };
            self.events
                .emit(&format!("node.{}", st.as_str()), None, Some(&name), what)
                .await;
        }
        let down: Vec<String> = states
            .iter()
            .filter(|(_, s)| *s == NodeState::Down)
            .map(|(n, _)| n.clone())
            .collect();
        // Down by this server's clock: end the node's store lease too, so the store
        // (and every other reader) agrees at once rather than at the lease's TTL.
        let revoke: Vec<avail_store::LeaseId> = {
            let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            down.iter()
                .filter_map(|n| live.get_mut(n).and_then(|l| l.lease.take()))
                .collect()
        };
        for id in revoke {
            if let Err(e) = self.store.revoke_lease(id).await {
                tracing::debug!("revoking a down node's lease: {e}");
            }
        }
        if down.is_empty() {
            return;
        }
        // What the down nodes held for others: a reservation (its standby is gone) is
        // made again elsewhere; a live move from or to them is over.
        let stale: Vec<String> = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.workloads
                .values()
                .filter(|(w, _)| {
                    let on = |n: &Option<String>| n.as_ref().is_some_and(|n| down.contains(n));
                    on(&w.status.reservation)
                        || (w.status.moving_to.is_some()
                            && (on(&w.status.moving_to) || on(&w.status.node)))
                })
                .map(|(w, _)| w.spec.name.clone())
                .collect()
        };
        for name in stale {
            self.moves
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&name);
            let _ = self
                .update_status(&name, |s| {
                    if s.reservation.as_ref().is_some_and(|r| down.contains(r)) {
                        s.reservation = None;
                    }
                    let on = |n: &Option<String>| n.as_ref().is_some_and(|n| down.contains(n));
                    if on(&s.moving_to) || (s.moving_to.is_some() && on(&s.node)) {
                        s.moving_to = None;
                    }
                })
                .await;
        }
        let affected: Vec<String> = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.workloads
                .values()
                .filter(|(w, _)| {
                    // An ft workload whose secondary lives goes on there (the secondary
                    // takes the lease): not failed.
                    let survivor = w.spec.level == Level::Ft
                        && w.status
                            .secondary
                            .as_ref()
                            .is_some_and(|s| !down.contains(s));
                    w.status.phase != Phase::Failed
                        && w.status.node.as_ref().is_some_and(|n| down.contains(n))
                        && !survivor
                })
                .map(|(w, _)| w.spec.name.clone())
                .collect()
        };
        // Level ha: restarted elsewhere, the highest priority first (capacity may be
        // short); the rest of the affected workloads fail.
        let (mut ha, affected): (Vec<String>, Vec<String>) = affected.into_iter().partition(|n| {
            self.workload(n)
                .is_some_and(|(w, _)| w.spec.level == Level::Ha)
        });
        ha.sort_by_key(|n| {
            std::cmp::Reverse(
                self.workload(n)
                    .map(|(w, _)| w.spec.ha.priority)
                    .unwrap_or(0),
            )
        });
        // Failures that come together are restarted together: while another node is
        // suspect (it may be going down too), the restarts wait, at most the gap
        // between the suspect and down windows, so one plan puts the highest
        // priorities of all the lost nodes first.
        let settling = {
            let any_suspect = states.iter().any(|(_, s)| *s == NodeState::Suspect);
            let oldest = self
                .down_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|(n, _)| down.contains(n))
                .map(|(_, at)| at.elapsed())
                .max()
                .unwrap_or_default();
            any_suspect
                && oldest
                    < self
                        .config
                        .down_after
                        .saturating_sub(self.config.suspect_after)
        };
        if !settling {
            self.restart_elsewhere(&ha, &down).await;
        }
        for name in affected {
            let _ = self
                .update_status_with_events(&name, |s| {
                    let was = s.phase;
                    s.phase = Phase::Failed;
                    s.message = Some(format!(
                        "node {} is down",
                        s.node.clone().unwrap_or_default()
                    ));
                    (was != Phase::Failed)
                        .then(|| {
                            NewEvent::new("workload.failed", Some(&name), None, "its node is down")
                        })
                        .into_iter()
                        .collect()
                })
                .await;
        }
    }

    /// Restart `ha` workloads whose node is down on other nodes, in the order given
    /// (highest priority first): each a new incarnation (a late report from the old copy
    /// is ignored), to the node holding its reservation when it still fits there, else
    /// where the scheduler puts it away from the down nodes. The whole batch is planned
    /// on one copy of the view (each decision takes its capacity before the next) and
    /// written in one store transaction per [`RESTART_BATCH`] workloads, with a
    /// compare-and-swap on every workload and on the placement key. Without room a
    /// workload waits `pending` with the explanation and is placed by the pending pass
    /// when room appears.
    async fn restart_elsewhere(&self, names: &[String], down: &[String]) {
        for chunk in names.chunks(RESTART_BATCH) {
            self.restart_batch(chunk, down, "down").await;
        }
    }

    /// [`restart_elsewhere`](Self::restart_elsewhere) for the workloads of nodes that
    /// are `why` (`down`, `draining`).
    async fn restart_batch(&self, names: &[String], down: &[String], why: &str) {
        let _guard = self.placement.lock().await;
        for _ in 0..5 {
            let (mut work, at) = {
                let v = self.view.read().unwrap_or_else(|p| p.into_inner());
                (v.sched.clone(), v.placement_rev)
            };
            let mut seed = self
                .placements
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let started = Instant::now();
            let policy = self.level_policy();
            // (workload, its mod_rev, event kind, node, what, displaced, lost node)
            let mut planned = Vec::new();
            for name in names {
                let Some((mut w, rev)) = self.workload(name) else {
                    continue;
                };
                let Some(lost) = w.status.node.clone().filter(|n| down.contains(n)) else {
                    continue;
                };
                let req = self.request(
                    &w,
                    avail_sched::Avoid {
                        nodes: down.to_vec(),
                        fault_domain: None,
                    },
                    None,
                    &policy,
                    Placement::Start,
                );
                // Its reservation is its own: the node holding it first (if the policy
                // still admits it there: the request's constraints say).
                let reserved = w
                    .status
                    .reservation
                    .clone()
                    .filter(|r| !down.contains(r) && work.fits(r, &req));
                let decision = match reserved {
                    Some(r) => Decision::Place {
                        node: r,
                        secondary: None,
                        reservation: None,
                        displaced: vec![],
                    },
                    None => {
                        seed = seed.wrapping_add(0x9e37_79b9);
                        avail_sched::plan(
                            &work,
                            std::slice::from_ref(&req),
                            &mut avail_model::rng::SplitMix64(seed),
                        )
                        .decisions
                        .into_iter()
                        .next()
                        .map(|(_, d)| d)
                        .unwrap_or(Decision::Unplaceable {
                            explanation: "no decision".into(),
                        })
                    }
                };
                // The reservation is used (or void): a new one is made by the next pass.
                if let Some(r) = w.status.reservation.take() {
                    work.unreserve(&r, &w.spec.name);
                }
                // A move under way is over (its source is gone).
                if let Some(t) = w.status.moving_to.take() {
                    work.release(&t, w.spec.resources);
                }
                w.status.incarnation += 1;
                // A new generation too: the old copy's checkpoints (were it still alive)
                // are refused by the next standby.
                w.status.generation += 1;
                w.status.restarts += 1;
                w.status.ft = None;
                w.status.updated_ms = now_ms();
                // Admitted at the node's minimum level (the plan kept it off the nodes
                // where it cannot run at theirs).
                let admitted = match &decision {
                    Decision::Place { node, .. } => self.admit_on(&w, node, Placement::Start),
                    Decision::Unplaceable { .. } => Ok(admission::Admitted::AsIs),
                };
                let (decision, admitted) = match (decision, admitted) {
                    (Decision::Place { .. }, Err(why)) => (
                        Decision::Unplaceable { explanation: why },
                        admission::Admitted::AsIs,
                    ),
                    (d, a) => (d, a.unwrap_or(admission::Admitted::AsIs)),
                };
                match decision {
                    Decision::Place {
                        node, displaced, ..
                    } => {
                        work.allocate(&node, w.spec.resources);
                        for d in &displaced {
                            work.unreserve(&node, d);
                        }
                        apply_admitted(&mut w, &admitted);
                        w.status.phase = Phase::Placed;
                        w.status.node = Some(node.clone());
                        w.status.message = Some(match admitted.message() {
                            Some(raised) => format!("restarted: node {lost} is {why}; {raised}"),
                            None => format!("restarted: node {lost} is {why}"),
                        });
                        let what = with_admission(
                            format!(
                                "node {lost} is {why}: restarting on {node} (incarnation {}), planned in {} us",
                                w.status.incarnation,
                                started.elapsed().as_micros()
                            ),
                            &admitted,
                        );
                        planned.push((
                            w,
                            rev,
                            "workload.restarted",
                            Some(node),
                            what,
                            displaced,
                            lost,
                        ));
                    }
                    Decision::Unplaceable { explanation } => {
                        w.status.phase = Phase::Pending;
                        w.status.node = None;
                        let what =
                            format!("node {lost} is {why} and no node can take it: {explanation}");
                        w.status.message = Some(format!("unplaceable: {what}"));
                        planned.push((w, rev, "workload.unplaceable", None, what, vec![], lost));
                    }
                }
            }
            if planned.is_empty() {
                return;
            }
            let mut txn = avail_store::Txn {
                compares: vec![avail_store::Compare::ModRev(keys::PLACEMENT.into(), at)],
                success: vec![avail_store::Op::Put {
                    key: keys::PLACEMENT.into(),
                    value: b"restart".to_vec(),
                    lease: None,
                }],
                failure: vec![],
            };
            let mut events = Vec::with_capacity(planned.len());
            for (w, rev, kind, node, what, ..) in &planned {
                events.push(NewEvent::new(
                    *kind,
                    Some(&w.spec.name),
                    node.as_deref(),
                    what.clone(),
                ));
                let key = keys::workload(&w.spec.name);
                txn.compares
                    .push(avail_store::Compare::ModRev(key.clone(), *rev));
                txn.success.push(avail_store::Op::Put {
                    key,
                    value: serde_json::to_vec(w).expect("workload serialises"),
                    lease: None,
                });
            }
            // The restarts and their events in one transaction.
            match self.events.commit(txn, events).await {
                Ok(r) if r.succeeded => {
                    self.wait_view(r.revision).await;
                    self.metrics.restarts.inc_by(planned.len() as u64);
                    let down_at = self
                        .down_at
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    for p in planned.iter().filter(|p| p.3.is_some()) {
                        if let Some(at) = down_at.get(&p.6) {
                            self.metrics
                                .restart_seconds
                                .observe(at.elapsed().as_secs_f64());
                        }
                    }
                    for (_, _, _, node, _, displaced, _) in planned {
                        if let Some(n) = &node {
                            self.release_displaced(&displaced, n).await;
                        }
                    }
                    return;
                }
                // Another placement or a status report came first: plan again.
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!("restarts not recorded: {e}");
                    return;
                }
            }
        }
    }

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
            w.status.level_state = match level {
                Level::Ft => Some("ft:unprotected".into()),
                Level::Ha => Some("ha:unprotected".into()),
                Level::None => None,
            };
            w.status.updated_ms = now_ms();
            let changed = NewEvent::new(
                "workload.level_changed",
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

    /// An `ha` workload failed on `node` (it would not start there, or it keeps
    /// crashing): restart it on another node, away from every node it failed on since
    /// it last ran; when it has failed on every node that could take it, it stays
    /// failed, saying so.
    async fn ha_failed_on(&self, name: &str, node: &str) {
        let tried: Vec<String> = {
            let mut m = self.failed_on.lock().unwrap_or_else(|p| p.into_inner());
            if m.len() > 10_000 {
                m.clear();
            }
            let t = m.entry(name.to_string()).or_default();
            if !t.insert(node.to_string()) {
                // Already handled for this node (reports repeat every heartbeat).
                return;
            }
            t.iter().cloned().collect()
        };
        let Some((w, _)) = self.workload(name) else {
            return;
        };
        let req = self.request(
            &w,
            avail_sched::Avoid {
                nodes: tried.clone(),
                fault_domain: None,
            },
            None,
            &self.level_policy(),
            Placement::Start,
        );
        let candidates = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.sched
                .nodes()
                .filter(|n| !tried.contains(&n.name) && v.sched.fits(&n.name, &req))
                .count()
        };
        if candidates == 0 {
            self.events
                .emit(
                    "workload.failed",
                    Some(name),
                    Some(node),
                    format!(
                        "it failed on {} and no other node can take it: left failed",
                        tried.join(", ")
                    ),
                )
                .await;
            return;
        }
        self.restart_batch(&[name.to_string()], &tried, "failing it")
            .await;
    }

    /// Of `names`, restart the ha workloads placed on `node` (its agent restarted, or it
    /// fenced itself) that have a standby on another node onto it: they resume from
    /// their last checkpoint rather than fresh on `node`. Returns the others.
    pub async fn resume_on_standby(
        &self,
        names: Vec<String>,
        node: &str,
        why: &str,
    ) -> Vec<String> {
        let (resume, rest): (Vec<String>, Vec<String>) = names.into_iter().partition(|n| {
            self.workload(n).is_some_and(|(w, _)| {
                w.spec.level == Level::Ha
                    && w.status.node.as_deref() == Some(node)
                    && replica_node(&w).is_some_and(|r| r != node)
            })
        });
        if !resume.is_empty() {
            self.restart_batch(&resume, &[node.to_string()], why).await;
        }
        rest
    }

    /// Start draining `node` (`None`: no such node): it takes no new work, and the
    /// drain pass moves everything on it off, the highest priority first.
    pub async fn start_drain(&self, node: &str) -> Result<Option<Node>, StateError> {
        self.update_node(node, |rec, v| {
            if rec.drain.is_some() {
                return None;
            }
            let total = v
                .workloads
                .values()
                .filter(|(w, _)| occupies(w, node))
                .count() as u64;
            rec.drain = Some(DrainRecord {
                started_ms: now_ms(),
                total,
            });
            Some(NewEvent::new(
                "node.draining",
                None,
                Some(node),
                format!("drain of {node} started: {total} to move"),
            ))
        })
        .await
    }

    /// Stop draining `node`: it takes work again (what was moved off stays where it is).
    pub async fn undrain(&self, node: &str) -> Result<Option<Node>, StateError> {
        self.drain_blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
        self.update_node(node, |rec, _| {
            rec.drain.take().map(|_| {
                NewEvent::new(
                    "node.undrained",
                    None,
                    Some(node),
                    format!("{node} takes work again"),
                )
            })
        })
        .await
    }

    /// Change `node`'s record with `f` (by compare-and-swap, retried), and the event
    /// `f` gives for its change, committed with it.
    async fn update_node(
        &self,
        node: &str,
        f: impl Fn(&mut NodeRecord, &View) -> Option<NewEvent>,
    ) -> Result<Option<Node>, StateError> {
        for _ in 0..10 {
            let Some(kv) = self.store.get(&keys::node(node)).await? else {
                return Ok(None);
            };
            let Ok(mut rec) = serde_json::from_slice::<NodeRecord>(&kv.value) else {
                return Err(StateError::Conflict(format!(
                    "node {node}: unreadable record"
                )));
            };
            let before = rec.clone();
            let event = {
                let v = self.view.read().unwrap_or_else(|p| p.into_inner());
                f(&mut rec, &v)
            };
            if rec != before {
                let value = serde_json::to_vec(&rec).expect("node serialises");
                match self
                    .events
                    .compare_and_swap(
                        &keys::node(node),
                        kv.mod_rev,
                        value,
                        event.into_iter().collect(),
                    )
                    .await?
                {
                    Some(rev) => self.wait_view(rev).await,
                    None => continue,
                }
            }
            self.check_liveness().await;
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            return Ok(v.nodes.get(node).map(|r| self.node(r, &v)));
        }
        Err(StateError::Conflict(format!(
            "node {node} kept changing; try again"
        )))
    }

    /// One pass of every drain under way: move off what is on each draining node, the
    /// highest priority first, at most [`DRAIN_PARALLEL_MOVES`] live moves at once per
    /// node. An `ft` secondary is placed anew elsewhere (the primary syncs it, then the
    /// old one goes); a reservation (and its standby) is made again elsewhere; an active
    /// wasm copy moves live (a secondary is synced on the target, then the copy hands
    /// over: no request is lost); a process is restarted elsewhere.
    pub async fn drain_pass(&self) {
        let draining: Vec<String> = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.nodes
                .values()
                .filter(|r| r.drain.is_some())
                .map(|r| r.name.clone())
                // A suspect node waits: a process restarted off it now could overlap
                // with its old copy.
                .filter(|n| self.node_state(n, &v) == NodeState::Draining)
                .collect()
        };
        for node in draining {
            self.drain_node(&node).await;
        }
    }

    async fn drain_node(&self, node: &str) {
        let mut on: Vec<Workload> = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            v.workloads
                .values()
                .map(|(w, _)| w.clone())
                .filter(|w| occupies(w, node))
                .collect()
        };
        on.sort_by_key(|w| std::cmp::Reverse(w.spec.ha.priority));
        let mut moving = on
            .iter()
            .filter(|w| w.status.moving_to.is_some() && w.status.node.as_deref() == Some(node))
            .count();
        let mut blocked = None;
        let mut restart = Vec::new();
        for w in on {
            let name = w.spec.name.clone();
            let here = Some(node);
            if w.status.moving_to.as_deref() == here {
                // Moving onto the draining node (begun before the drain): call it off.
                self.cancel_move(&name).await;
            } else if w.status.secondary.as_deref() == here && w.status.moving_to.is_none() {
                if let Err(e) = self.move_secondary(&name, node).await {
                    blocked = Some(format!("{name}: {e}"));
                }
            } else if w.status.reservation.as_deref() == here {
                self.drop_reservation(&name, node, None).await;
            } else if w.status.node.as_deref() == here {
                if let Some(t) = w.status.moving_to.as_deref() {
                    let started = self
                        .moves
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&name)
                        .copied();
                    if started.is_none_or(|s| s.elapsed() > MOVE_TIMEOUT) {
                        // Its state would be lost by a restart: call the move off and
                        // try again (a target the scheduler picks anew), saying so.
                        tracing::warn!(workload = %name, target = t, "live move did not finish: trying again");
                        blocked = Some(format!(
                            "{name}: the live move to {t} did not finish in {} s; trying again",
                            MOVE_TIMEOUT.as_secs()
                        ));
                        self.cancel_move(&name).await;
                    }
                    continue;
                }
                if moving >= DRAIN_PARALLEL_MOVES {
                    continue;
                }
                if w.spec.driver == avail_model::DriverKind::Wasm && !w.status.plain {
                    match self.begin_move(&name, node).await {
                        Ok(()) => moving += 1,
                        Err(e) => blocked = Some(format!("{name}: {e}")),
                    }
                } else {
                    restart.push(name);
                }
            }
        }
        if !restart.is_empty() {
            self.restart_batch(&restart, &[node.to_string()], "draining")
                .await;
        }
        let mut b = self.drain_blocked.lock().unwrap_or_else(|p| p.into_inner());
        match blocked {
            Some(m) => b.insert(node.to_string(), m),
            None => b.remove(node),
        };
    }

    /// Place an `ft` secondary that is on `node` anew elsewhere, in one write: the
    /// primary syncs the new one from a full image and the old one is let go.
    async fn move_secondary(&self, name: &str, node: &str) -> Result<(), String> {
        let _guard = self.placement.lock().await;
        let Some((mut w, rev)) = self.workload(name) else {
            return Ok(());
        };
        match self.decide_secondary(&w, Some(node.to_string())) {
            (Decision::Place { node: to, .. }, at) => {
                w.status.secondary = Some(to.clone());
                w.status.level_state = Some("ft:syncing".into());
                w.status.updated_ms = now_ms();
                let moved = NewEvent::new(
                    "workload.secondary_moved",
                    Some(name),
                    Some(&to),
                    format!("secondary moved from {node} (draining) to {to}"),
                );
                let _ = self
                    .write_placement_with_events(&w, rev, at, vec![moved])
                    .await;
                Ok(())
            }
            (Decision::Unplaceable { explanation }, _) => {
                Err(format!("no node for its secondary: {explanation}"))
            }
        }
    }

    /// Begin a live move of the wasm workload active on `node`: the target (the `ft`
    /// secondary, else a node the scheduler picks away from `node`) runs a copy synced
    /// as a secondary, and the active copy hands over to it once it is in step
    /// ([`AppState::handover`]).
    async fn begin_move(&self, name: &str, node: &str) -> Result<(), String> {
        let _guard = self.placement.lock().await;
        let Some((mut w, rev)) = self.workload(name) else {
            return Ok(());
        };
        let (target, at) = match (w.spec.level, w.status.secondary.clone()) {
            (Level::Ft, Some(s)) => {
                // After the handover the secondary is the primary and needs a secondary
                // of its own; with on_secondary_loss = hold it would hold every reply
                // until one is synced. No node for it: the drain waits, saying why.
                let mut after = w.clone();
                after.status.node = Some(s.clone());
                if w.spec.ft.on_secondary_loss == avail_model::spec::SecondaryLoss::Hold
                    && let (Decision::Unplaceable { explanation }, _) =
                        self.decide_secondary(&after, Some(node.to_string()))
                {
                    return Err(format!(
                        "after handing over to {s} it would have no node for its next secondary ({explanation}), and on_secondary_loss = hold would hold its replies: add a node, or lower its level"
                    ));
                }
                (s, 0)
            }
            (Level::Ft, None) => return Err("waiting for its secondary".into()),
            _ => {
                let avoid = avail_sched::Avoid {
                    nodes: vec![node.to_string()],
                    fault_domain: None,
                };
                match self.decide_avoiding(&w, Some(avoid), None, Placement::Move) {
                    (Decision::Place { node: t, .. }, at) => (t, at),
                    (Decision::Unplaceable { explanation }, _) => {
                        return Err(format!("no node can take it: {explanation}"));
                    }
                }
            }
        };
        w.status.moving_to = Some(target.clone());
        if w.status.reservation.as_deref() == Some(target.as_str()) {
            // Its standby's node becomes its home: a new reservation follows the move.
            w.status.reservation = None;
        }
        w.status.updated_ms = now_ms();
        let moving = vec![NewEvent::new(
            "workload.moving",
            Some(name),
            Some(&target),
            format!("moving live from {node} to {target}"),
        )];
        let written = if at == 0 {
            self.write_workload_with_events(&w, rev, moving).await
        } else {
            self.write_placement_with_events(&w, rev, at, moving).await
        };
        written.map_err(|e| e.to_string())?;
        self.moves
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), Instant::now());
        Ok(())
    }

    async fn cancel_move(&self, name: &str) {
        self.moves
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        let _ = self.update_status(name, |s| s.moving_to = None).await;
    }

    /// The active copy of `name` on `node`, at generation `from`, has handed over: its
    /// last checkpoint is acknowledged by the move's target, which becomes the active
    /// copy (a new incarnation and generation; the old copy is let go). Granted again
    /// when asked again after a lost answer.
    pub async fn handover(
        &self,
        name: &str,
        node: &str,
        from: u64,
    ) -> Result<(bool, u64), StateError> {
        for _ in 0..20 {
            let Some((mut w, rev)) = self.workload(name) else {
                return Ok((false, 0));
            };
            if w.status.generation == from + 1 && w.status.node.as_deref() != Some(node) {
                return Ok((true, from + 1));
            }
            let Some(target) = w.status.moving_to.clone() else {
                return Ok((false, w.status.generation));
            };
            if w.status.node.as_deref() != Some(node) || w.status.generation != from {
                return Ok((false, w.status.generation));
            }
            w.status.node = Some(target.clone());
            w.status.moving_to = None;
            if w.status.secondary.as_deref() == Some(target.as_str()) {
                w.status.secondary = None;
            }
            w.status.generation = from + 1;
            w.status.incarnation += 1;
            w.status.phase = Phase::Running;
            w.status.ft = None;
            w.status.level_state = match w.spec.level {
                Level::Ft => Some("ft:degraded".into()),
                Level::Ha => Some("ha:unprotected".into()),
                Level::None => None,
            };
            w.status.message = Some(format!("moved live from {node} to {target}"));
            w.status.updated_ms = now_ms();
            let took = self
                .moves
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(name)
                .map(|t| t.elapsed());
            let moved = NewEvent::new(
                "workload.moved",
                Some(name),
                Some(&target),
                format!(
                    "moved live from {node} to {target} (incarnation {}){}",
                    w.status.incarnation,
                    took.map(|t| format!(" in {} ms", t.as_millis()))
                        .unwrap_or_default()
                ),
            );
            match self.write_workload_with_events(&w, rev, vec![moved]).await {
                Ok(_) => {
                    self.moves
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(name);
                    self.metrics.moves.inc();
                    if let Some(t) = took {
                        self.metrics.move_seconds.observe(t.as_secs_f64());
                    }
                    self.place_secondaries().await;
                    self.place_reservations().await;
                    return Ok((true, from + 1));
                }
                Err(StateError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StateError::Conflict(format!(
            "workload {name} kept changing during its handover"
        )))
    }

    /// The desired state of `node` and the route table.
    pub fn desired(&self, node: &str, revision: u64) -> DesiredState {
        let v = self.view.read().unwrap_or_else(|p| p.into_inner());
        let mut out = DesiredState {
            revision,
            peers: v
                .nodes
                .values()
                .map(|n| PeerNode {
                    name: n.name.clone(),
                    addr: n.replication_addr.clone(),
                })
                .collect(),
            ..DesiredState::default()
        };
        for (w, _) in v.workloads.values() {
            let n = w.status.node.as_deref();
            let peer = |name: Option<&str>| {
                let rec = v.nodes.get(name?)?;
                Some(Peer {
                    node: rec.name.clone(),
                    replication_addr: rec.replication_addr.clone(),
                })
            };
            // The other replica: the ft secondary, or the standby of an ha wasm workload
            // on the node holding its reservation (it takes periodic checkpoints, and a
            // restart there resumes from the last one).
            // A live move under way: the copy on the target is synced as a secondary,
            // and the active one hands over to it.
            let other = w
                .status
                .moving_to
                .as_deref()
                .or_else(|| replica_node(w))
                .filter(|o| Some(*o) != n);
            let role = if n == Some(node) {
                Some((ReplicaRole::Active, peer(other)))
            } else if other == Some(node) {
                Some((ReplicaRole::Secondary, peer(n)))
            } else {
                None
            };
            if let Some((role, peer)) = role.filter(|_| w.status.phase != Phase::Stopped) {
                out.assignments.push(Assignment {
                    uid: w.uid.clone(),
                    spec: w.spec.clone(),
                    incarnation: w.status.incarnation,
                    role,
                    generation: w.status.generation,
                    peer,
                    handover: role == ReplicaRole::Active && w.status.moving_to.is_some(),
                });
            }
            // Every workload has a route, so the ingress can tell "not running" (503)
            // from "no such workload" (404).
            out.routes.push(Route {
                workload: w.spec.name.clone(),
                node: n.map(str::to_string),
                incarnation: w.status.incarnation,
                ft: w.spec.level == Level::Ft,
            });
        }
        out
    }

    /// Where artifacts live.
    pub fn artifacts_dir(&self) -> PathBuf {
        self.config.data_dir.join("artifacts")
    }
}

async fn follow(state: std::sync::Weak<AppState>, mut watch: avail_store::Watch) {
    loop {
        let Some(ev) = watch.events.recv().await else {
            // The watch was dropped (we fell behind): reload and watch again.
            let Some(s) = state.upgrade() else { return };
            tracing::warn!("store watch closed; reloading the view");
            match s.load().await {
                Ok(rev) => match s.store.watch("/", rev).await {
                    Ok(w) => {
                        watch = w;
                        continue;
                    }
                    Err(e) => tracing::error!("re-watch failed: {e}"),
                },
                Err(e) => tracing::error!("reload failed: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let Some(s) = state.upgrade() else { return };
        s.apply(&ev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, node: Option<&str>, secondary: Option<&str>, mem: u32) -> Workload {
        let mut spec = avail_model::WorkloadSpec::parse(&format!(
            r#"{{"name":"{name}","driver":"wasm","artifact":"x","resources":{{"memory_mib":{mem},"cpu_millis":10}}}}"#
        ))
        .unwrap();
        spec.resources.memory_mib = mem;
        Workload {
            uid: name.into(),
            spec,
            status: WorkloadStatus {
                phase: Phase::Placed,
                level_state: None,
                node: node.map(String::from),
                incarnation: 1,
                restarts: 0,
                message: None,
                updated_ms: 0,
                secondary: secondary.map(String::from),
                generation: 0,
                reservation: None,
                plain: false,
                moving_to: None,
                ft: None,
            },
            created_ms: 0,
        }
    }

    fn record(name: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            address: String::new(),
            ingress_url: String::new(),
            tags: [("rack".to_string(), name.to_string())].into(),
            agent_tags: BTreeMap::new(),
            tag_overrides: BTreeMap::new(),
            capacity: Resources {
                cpu_millis: 1000,
                memory_mib: 1000,
            },
            max_workloads: avail_model::node::DEFAULT_MAX_WORKLOADS,
            joined_ms: 0,
            agent_version: String::new(),
            replication_addr: String::new(),
            boot_id: String::new(),
            drain: None,
            identity: Default::default(),
        }
    }

    /// A placement planned before another placement was written is refused (stale),
    /// and goes through when planned again.
    #[tokio::test]
    async fn a_stale_plan_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn avail_store::Store> =
            Arc::new(avail_store::RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let auth = crate::auth::Auth::load_or_create(dir.path()).unwrap();
        let cfg = crate::ServerConfig::new(dir.path().into(), "127.0.0.1:0".parse().unwrap());
        let ca = avail_tls::ClusterCa::load_or_create(dir.path()).unwrap();
        let state = AppState::open(store, auth, ca, cfg).await.unwrap();
        let first = workload("first", None, None, 10);
        let second = workload("second", None, None, 10);
        let at = state.view.read().unwrap().placement_rev;
        state.write_placement(&first, 0, at).await.unwrap();
        assert!(matches!(
            state.write_placement(&second, 0, at).await,
            Err(StateError::StalePlan)
        ));
        assert!(state.workload("second").is_none(), "nothing half-written");
        let now = state.view.read().unwrap().placement_rev;
        assert!(now > at);
        state.write_placement(&second, 0, now).await.unwrap();
        // A workload that exists is a conflict, not a stale plan.
        let now = state.view.read().unwrap().placement_rev;
        assert!(matches!(
            state.write_placement(&second, 0, now).await,
            Err(StateError::Conflict(_))
        ));
    }

    /// The incremental allocation and the scheduler's view agree with a fresh scan
    /// through puts, moves, secondaries, deletes and a node that arrives late.
    #[test]
    fn allocations_follow_workloads_and_nodes() {
        let mut v = View::default();
        v.put_node(record("a"));
        v.put_workload("w1", workload("w1", Some("a"), None, 100), 1);
        v.put_workload("w2", workload("w2", Some("a"), Some("b"), 200), 2);
        v.put_node(record("b")); // after its workload: picks up the allocation
        v.put_workload("w1", workload("w1", Some("b"), None, 100), 3); // moved
        v.delete_workload("w2");
        v.put_workload("w3", workload("w3", None, None, 50), 4); // pending: nowhere
        // A live move: the target holds the resources once, also when it is the
        // pair's secondary (an ft handover).
        let mut w4 = workload("w4", Some("a"), Some("b"), 30);
        w4.status.moving_to = Some("b".into());
        v.put_workload("w4", w4.clone(), 5);
        let mut w5 = workload("w5", Some("b"), None, 7);
        w5.status.moving_to = Some("a".into());
        v.put_workload("w5", w5, 6);
        w4.status.node = Some("b".into());
        w4.status.secondary = None;
        w4.status.moving_to = None;
        v.put_workload("w4", w4, 7); // handed over
        let scan = |node: &str| -> u32 {
            v.workloads
                .values()
                .filter(|(w, _)| {
                    w.status.node.as_deref() == Some(node)
                        || w.status.secondary.as_deref() == Some(node)
                        || w.status.moving_to.as_deref() == Some(node)
                })
                .map(|(w, _)| w.spec.resources.memory_mib)
                .sum()
        };
        for n in ["a", "b"] {
            assert_eq!(
                v.allocated.get(n).map(|r| r.memory_mib).unwrap_or(0),
                scan(n),
                "{n}"
            );
            assert_eq!(
                v.sched.node(n).unwrap().allocated.memory_mib,
                scan(n),
                "{n}"
            );
        }
        v.delete_node("a");
        assert!(v.sched.node("a").is_none());
    }
}
