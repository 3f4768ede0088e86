//! The server's state: the store, the in-memory view of the cluster kept current by a
//! store watch, and what the server remembers in memory alone (liveness, moves under
//! way, failures seen). The work on it is split by concern, each an `impl AppState` in
//! a file of its own:
//!
//! | file | concern |
//! |---|---|
//! | [`crate::view`] | the view, fed by the store's watch; read-your-writes waits |
//! | [`crate::liveness`] | heartbeats, verdicts, what a node's death or reboot causes |
//! | [`crate::placement`] | plans and their writes; pending, reservation and secondary passes |
//! | [`crate::admission`], [`crate::level_policy`] | the level policy on every placement |
//! | [`crate::restarts`] | `ha` restarts elsewhere |
//! | [`crate::pairs`] | `ft` pairs: secondary failure, the pair lease, handovers |
//! | [`crate::level_change`] | live level changes |
//! | [`crate::drain`] | drains and live moves |
//! | [`crate::reports`] | agents' instance reports and logs |
//! | [`crate::desired`] | a node's desired state |
//!
//! Reads are served from the view; writes go to the store, and a writer waits until the
//! view has caught up with its revision before answering, so a client reads its own
//! writes.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use avail_model::agent::LogLine;
use avail_model::{Level, Node, Phase, Resources, Workload};
use avail_store::{LeaseId, Store, StoreError};
use tokio::sync::watch;

use crate::auth::Auth;
use crate::events::{Events, NewEvent};
pub use crate::level_policy::{apply_admitted, with_admission};
use crate::metrics::Metrics;
use crate::{ServerConfig, keys};

use crate::view::follow;
pub use crate::view::{DrainRecord, NodeRecord, View};

/// When the current grace began, and when any node was last heard.
pub(crate) struct Grace {
    pub(crate) from: Instant,
    pub(crate) last_any: Instant,
}

/// Liveness seen by this server (memory only).
pub(crate) struct Live {
    pub(crate) last_heartbeat: Instant,
    pub(crate) last_heartbeat_ms: u64,
    /// The node's store lease, and when it was last renewed.
    pub(crate) lease: Option<(LeaseId, Instant)>,
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
    pub(crate) view_rev: watch::Sender<u64>,
    /// Bumped when workloads or nodes change: agents long-poll on it.
    pub(crate) desired_rev: watch::Sender<u64>,
    pub(crate) live: Mutex<HashMap<String, Live>>,
    /// This server's part in the leadership (unset: alone, so leading, as in unit
    /// tests).
    pub leadership: std::sync::OnceLock<crate::leader::Leadership>,
    /// A follower's relay of heartbeats to the leader ([`crate::heard_relay`]).
    pub relay: std::sync::OnceLock<crate::heard_relay::HeardRelay>,
    /// Events.
    pub events: Events,
    /// Recent log lines per workload.
    pub logs: Mutex<HashMap<String, VecDeque<LogLine>>>,
    /// Metrics.
    pub metrics: Metrics,
    /// Nodes an ft pair reported lost, and when: not candidates for a secondary for
    /// [`LOST_NODE_AVOID`] (they may still look ready for a heartbeat window).
    pub(crate) lost_nodes: Mutex<HashMap<String, Instant>>,
    /// Secondary failures already recorded: (workload, node, generation).
    pub(crate) failed_secondaries: Mutex<HashSet<(String, String, u64)>>,
    /// The grace against mass verdicts: from this server's start, and again after a
    /// stretch when no node was heard at all.
    pub(crate) grace: Mutex<Grace>,
    /// When each node was last declared down (restart timings run from here).
    pub(crate) down_at: Mutex<HashMap<String, Instant>>,
    /// `ha` workloads that failed on nodes since they last ran: the next restart avoids
    /// those nodes.
    pub(crate) failed_on: Mutex<HashMap<String, BTreeSet<String>>>,
    /// One lock per node: its heartbeat reports are applied in order, apart from the
    /// answer.
    pub(crate) report_turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Live moves under way, and when each started.
    pub(crate) moves: Mutex<HashMap<String, Instant>>,
    /// What holds each draining node's drain up.
    pub(crate) drain_blocked: Mutex<HashMap<String, String>>,
    /// Workloads said to run below the level policy, with what was said: said once
    /// (agents' reports overwrite status messages every heartbeat).
    pub(crate) below_said: Mutex<HashMap<String, String>>,
    /// Placements decided so far: the seed of each plan's random sample.
    pub(crate) placements: std::sync::atomic::AtomicU64,
    /// Module checks remembered per artifact digest.
    pub module_checks: crate::module_checks::ModuleChecks,
    /// Serialises placement decisions so two never use the same capacity.
    pub placement: tokio::sync::Mutex<()>,
    /// Creates waiting to be committed in a batch ([`crate::creates`]).
    pub(crate) creates: crate::creates::Creates,
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
    /// This server cannot do it now and did nothing (a follower that cannot reach
    /// the leader): another server may.
    #[error("{0}")]
    TryAnotherServer(String),
}

impl AppState {
    /// The API of every registered server (what agents are told to speak to).
    pub fn server_apis(&self) -> Vec<String> {
        self.view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .servers
            .values()
            .map(|s| s.api.clone())
            .collect()
    }

    /// Whether this server decides now (leads; alone, it does).
    pub fn is_leader(&self) -> bool {
        self.leadership.get().is_none_or(|l| l.is_leader())
    }

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
        let (creates, start_creates) = crate::creates::start();
        let state = Arc::new(AppState {
            store,
            auth,
            ca,
            config,
            view: RwLock::new(View::default()),
            view_rev,
            desired_rev,
            live: Mutex::new(HashMap::new()),
            leadership: std::sync::OnceLock::new(),
            relay: std::sync::OnceLock::new(),
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
            below_said: Mutex::new(HashMap::new()),
            placements: std::sync::atomic::AtomicU64::new(0),
            module_checks: Default::default(),
            creates,
        });
        start_creates(Arc::downgrade(&state));
        let rev = state.load().await?;
        let watch = state.store.watch("/", rev).await?;
        tokio::spawn(follow(Arc::downgrade(&state), watch));
        Ok(state)
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

    /// One workload and its `mod_rev`.
    pub fn workload(&self, name: &str) -> Option<(Workload, u64)> {
        self.view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .workloads
            .get(name)
            .cloned()
    }

    /// Where artifacts live.
    pub fn artifacts_dir(&self) -> PathBuf {
        self.config.data_dir.join("artifacts")
    }
}

/// A server's state on a new redb store in a temp dir, for tests.
#[cfg(test)]
pub(crate) async fn test_app() -> (tempfile::TempDir, Arc<AppState>) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(avail_store::RedbStore::open(&dir.path().join("s.redb")).unwrap());
    let auth = crate::auth::Auth::load_or_create(dir.path()).unwrap();
    let cfg = crate::ServerConfig::new(dir.path().into(), "127.0.0.1:0".parse().unwrap());
    let ca = avail_tls::ClusterCa::load_or_create(dir.path()).unwrap();
    let state = AppState::open(store, auth, ca, cfg).await.unwrap();
    (dir, state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use avail_model::WorkloadStatus;
    use std::collections::BTreeMap;

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
        let (_dir, state) = test_app().await;
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

    /// A plan made before the rules it was made by changed (a node drained, here) is
    /// refused as stale: a placement never lands on rules it did not see.
    #[tokio::test]
    async fn a_plan_made_before_a_rule_change_is_refused() {
        let (_dir, state) = test_app().await;
        let store = state.store.clone();
        let rec = record("a");
        store
            .put(&keys::node("a"), serde_json::to_vec(&rec).unwrap(), None)
            .await
            .unwrap();
        let at = state.view.read().unwrap().placement_rev;
        assert!(state.start_drain("a").await.unwrap().is_some());
        let w = workload("w", Some("a"), None, 10);
        assert!(matches!(
            state.write_placement(&w, 0, at).await,
            Err(StateError::StalePlan)
        ));
        assert!(state.workload("w").is_none(), "nothing written");
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
