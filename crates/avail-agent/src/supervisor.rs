//! Runs this node's workloads: follows the desired state, starts and stops instances
//! through the drivers, keeps the route table for the ingress, and collects status and
//! log lines for the heartbeat.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use avail_client::Client;
use avail_driver::process::ProcessDriver;
use avail_driver::wasm::WasmDriver;
use avail_driver::{Driver, Instance, LogSink, StartSpec};
use avail_model::agent::{
    Assignment, DesiredState, InstanceState, InstanceStatus, LogLine, ReplicaRole, Route,
};
use avail_model::{DriverKind, Level};
use sha2::{Digest, Sha256};

use crate::AgentConfig;
use crate::ft::{FtContext, FtReplica, Hello};
use crate::peers::Peers;
use avail_tls::serve::PeerCert;

/// Most log lines buffered between heartbeats; older ones are dropped.
pub const MAX_BUFFERED_LOG_LINES: usize = 5000;
/// Most log bytes sent with one heartbeat (the heartbeat must stay small: it is the
/// node's liveness).
pub const MAX_LOG_BYTES_PER_HEARTBEAT: usize = 256 << 10;
/// Longest log line kept, bytes; longer lines are cut.
pub const MAX_LOG_LINE_BYTES: usize = 4096;
/// How long a failed start waits before it is tried again.
pub const RETRY_FAILED_AFTER: Duration = Duration::from_secs(5);
/// Long-poll wait for desired state, ms.
pub const DESIRED_WAIT_MS: u64 = 10_000;
/// The server's down window before it is known (the server's default; the isolation
/// window follows from it, [`isolation_window`]).
pub const DEFAULT_DOWN_AFTER: Duration = Duration::from_millis(1000);

pub use avail_model::node::isolation_window;

/// What a slot holds.
#[derive(Clone)]
pub enum SlotState {
    /// Fetching, compiling or spawning.
    Starting,
    /// Serving.
    Running(Arc<dyn Instance>),
    /// Could not start.
    Failed {
        /// Why.
        message: String,
        /// When it failed.
        at: Instant,
    },
}

/// One workload on this node.
#[derive(Clone)]
pub struct Slot {
    /// What the server assigned (uid, spec, incarnation).
    pub assignment: Assignment,
    /// State.
    pub state: SlotState,
    /// Level `ft`: the replica (also the `Running` instance).
    pub ft: Option<Arc<FtReplica>>,
}

/// What to do with a slot given the server's assignment.
enum Fit {
    /// Keep it as it is.
    Same,
    /// Keep it running; tell an `ft` replica its new peer and generation.
    Update,
    /// Stop it (and start what is assigned, if anything).
    Restart,
}

/// Whether two specs describe the same run: equal but for the level, which changes
/// live.
fn same_run(a: &avail_model::WorkloadSpec, b: &avail_model::WorkloadSpec) -> bool {
    a.level == b.level || {
        let mut x = a.clone();
        x.level = b.level;
        x == *b
    }
}

fn fit(slot: &Slot, a: &Assignment) -> Fit {
    if slot.assignment.uid != a.uid || !same_run(&slot.assignment.spec, &a.spec) {
        return Fit::Restart;
    }
    if slot.assignment == *a {
        return Fit::Same;
    }
    let Some(r) = &slot.ft else {
        // A plain instance (a process, a wasm module the checkpoint rewrite refused, or
        // one still starting): a change between none and ha keeps it; ft cannot run on
        // it; another run or role is a new instance.
        // Still starting: the start takes the newest assignment of the same run when
        // it is done.
        let same = a.role == slot.assignment.role && a.incarnation == slot.assignment.incarnation;
        let keep = same && (a.spec.level != Level::Ft || matches!(slot.state, SlotState::Starting));
        return if keep { Fit::Update } else { Fit::Restart };
    };
    // A replica keeps running across level changes, peer changes, its own promotion
    // (ft) and its activation (an ha standby restarted as the active copy).
    let (role, generation) = (r.role(), r.generation());
    let ok = match (role, a.role) {
        (ReplicaRole::Active, ReplicaRole::Active) => a.generation >= generation,
        (ReplicaRole::Secondary, ReplicaRole::Secondary) => a.generation == generation,
        // ft: the server already recorded this secondary's takeover; the replica hears
        // the lease answer on its own (or has just heard it). ha: the server restarted
        // the workload here, onto the standby's checkpoint.
        (ReplicaRole::Secondary, ReplicaRole::Active) => a.generation == generation + 1,
        (ReplicaRole::Active, ReplicaRole::Secondary) => false,
    };
    if ok { Fit::Update } else { Fit::Restart }
}

/// The node's workload supervisor.
pub struct Supervisor {
    cfg: AgentConfig,
    client: RwLock<Client>,
    wasm: WasmDriver,
    process: ProcessDriver,
    /// VMs, when qemu is installed on this node.
    qemu: Option<avail_driver::qemu::QemuDriver>,
    slots: Mutex<HashMap<String, Slot>>,
    routes: RwLock<HashMap<String, Route>>,
    logs: Arc<Mutex<VecDeque<LogLine>>>,
    /// Whether the first desired state has been applied (before it, the ingress cannot
    /// tell an unknown workload from one it has not heard of yet).
    synced: AtomicBool,
    /// Fencing (level ha): when the server last answered a heartbeat.
    last_contact: Mutex<Instant>,
    /// Send time of the last heartbeat a leader heard (what peers are told: a contact
    /// answered while no leader judged proves nothing about restarts).
    last_judged: Mutex<Instant>,
    /// The server's suspect window: a node silent this long takes no new work.
    suspect_after: Mutex<Duration>,
    /// The server's down window (its lease TTL): how long after its last contact this
    /// node may be declared down. The isolation window follows from it.
    down_after: Mutex<Duration>,
    /// Whether the ha workloads are stopped for isolation.
    fenced: AtomicBool,
    /// The other nodes and mutual TLS to them.
    peers: Arc<Peers>,
    /// Until when the peers' verdict holds that the control plane is away (they lost
    /// it too, not this node alone): ha workloads go on serving meanwhile
    /// ([`crate::fence::away_valid_for`]).
    control_plane_away: Mutex<Option<Instant>>,
    /// Memory the node's ft secondaries may hold in checkpoint images.
    image_budget: Arc<crate::ft::ImageBudget>,
    /// Fences not reported to the server yet.
    fences: Mutex<Vec<avail_model::agent::FenceReport>>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Supervisor {
    /// A supervisor talking to the server with `client` (node token set).
    pub fn new(cfg: AgentConfig, client: Client, peers: Arc<Peers>) -> Result<Supervisor, String> {
        let contain = Arc::new(crate::contain::probe(&cfg)?);
        Ok(Supervisor {
            image_budget: Arc::new(crate::ft::ImageBudget::new(
                cfg.ft_secondary_memory_mib << 20,
            )),
            process: ProcessDriver::new(cfg.process_shim.clone(), contain.clone()),
            qemu: avail_driver::qemu::QemuDriver::probe(ProcessDriver::new(
                cfg.process_shim.clone(),
                contain,
            )),
            cfg,
            client: RwLock::new(client),
            wasm: WasmDriver::new()?,
            slots: Mutex::new(HashMap::new()),
            routes: RwLock::new(HashMap::new()),
            logs: Arc::new(Mutex::new(VecDeque::new())),
            synced: AtomicBool::new(false),
            last_contact: Mutex::new(Instant::now()),
            last_judged: Mutex::new(Instant::now()),
            suspect_after: Mutex::new(DEFAULT_DOWN_AFTER / 2),
            down_after: Mutex::new(DEFAULT_DOWN_AFTER),
            fenced: AtomicBool::new(false),
            peers,
            control_plane_away: Mutex::new(None),
            fences: Mutex::new(Vec::new()),
        })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.cfg.name
    }

    /// The server's URL.
    pub fn server_url(&self) -> String {
        self.cfg.server.clone()
    }

    /// The node's own address.
    pub fn addr(&self) -> std::net::IpAddr {
        self.cfg.addr
    }

    /// The client for the server (the node's certificate, renewed in place).
    pub fn server_client(&self) -> Client {
        self.client()
    }

    fn client(&self) -> Client {
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the node has its desired state yet.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The route of a workload, if it is placed anywhere.
    pub fn route(&self, workload: &str) -> Option<Route> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(workload)
            .cloned()
    }

    /// The local slot of a workload.
    pub fn slot(&self, workload: &str) -> Option<Slot> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(workload)
            .cloned()
    }

    fn log_sink(&self, workload: &str) -> LogSink {
        let logs = self.logs.clone();
        let workload = workload.to_string();
        Arc::new(move |mut line: String| {
            if line.len() > MAX_LOG_LINE_BYTES {
                let mut cut = MAX_LOG_LINE_BYTES;
                while !line.is_char_boundary(cut) {
                    cut -= 1;
                }
                line.truncate(cut);
            }
            let mut q = logs.lock().unwrap_or_else(|p| p.into_inner());
            if q.len() == MAX_BUFFERED_LOG_LINES {
                q.pop_front();
            }
            q.push_back(LogLine {
                workload: workload.clone(),
                time_ms: now_ms(),
                line,
            });
        })
    }

    /// Log lines to send with the next heartbeat, at most
    /// [`MAX_LOG_BYTES_PER_HEARTBEAT`]; the rest wait for the next one.
    pub fn drain_logs(&self) -> Vec<LogLine> {
        let mut q = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        let mut bytes = 0;
        let n = q
            .iter()
            .take_while(|l| {
                bytes += l.line.len() + l.workload.len() + 32;
                bytes <= MAX_LOG_BYTES_PER_HEARTBEAT
            })
            .count();
        q.drain(..n).collect()
    }

    /// Status of every slot.
    pub fn statuses(&self) -> Vec<InstanceStatus> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .iter()
            .map(|(name, s)| {
                let (state, restarts, message) = match &s.state {
                    SlotState::Starting => (InstanceState::Starting, 0, None),
                    SlotState::Running(i) => {
                        let st = i.status();
                        (st.state, st.restarts, st.message)
                    }
                    SlotState::Failed { message, .. } => {
                        (InstanceState::Failed, 0, Some(message.clone()))
                    }
                };
                let (role, ft, level) = match &s.ft {
                    Some(r) => r.ft_status(),
                    None => (s.assignment.role, None, s.assignment.spec.level),
                };
                InstanceStatus {
                    workload: name.clone(),
                    incarnation: s.assignment.incarnation,
                    state,
                    restarts,
                    message,
                    role,
                    generation: s.assignment.generation,
                    ft,
                    level: Some(level),
                }
            })
            .collect()
    }

    /// Bring the node to `desired`.
    pub fn apply(self: &Arc<Self>, desired: &DesiredState) {
        self.peers.set(&desired.peers);
        let fenced = self.fenced.load(Ordering::Acquire);
        {
            let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
            *routes = desired
                .routes
                .iter()
                .map(|r| (r.workload.clone(), r.clone()))
                .collect();
        }
        let mut to_stop: Vec<Arc<dyn Instance>> = Vec::new();
        let mut to_start: Vec<Assignment> = Vec::new();
        let mut updates = Vec::new();
        {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            let wanted: HashMap<&str, _> = desired
                .assignments
                .iter()
                .map(|a| (a.spec.name.as_str(), a))
                .collect();
            slots.retain(|name, slot| {
                let keep = match wanted.get(name.as_str()).map(|a| (fit(slot, a), a)) {
                    Some((Fit::Same, _)) => true,
                    Some((Fit::Update, a)) => {
                        if slot.assignment.spec.level != a.spec.level {
                            tracing::info!(workload = %name, from = slot.assignment.spec.level.as_str(), to = a.spec.level.as_str(), "level change");
                        }
                        slot.assignment = (*a).clone();
                        if let Some(r) = &slot.ft {
                            updates.push((r.clone(), (*a).clone()));
                        }
                        true
                    }
                    _ => false,
                };
                if !keep {
                    if let SlotState::Running(i) = &slot.state {
                        to_stop.push(i.clone());
                    }
                    tracing::info!(workload = %name, "stopping");
                }
                keep
            });
            for a in &desired.assignments {
                // Fenced: ha workloads stay stopped until the server is heard again.
                if fenced && a.spec.level == avail_model::Level::Ha {
                    continue;
                }
                let retry = match slots.get(&a.spec.name) {
                    None => true,
                    Some(Slot {
                        state: SlotState::Failed { at, .. },
                        ..
                    }) => at.elapsed() >= RETRY_FAILED_AFTER,
                    Some(_) => false,
                };
                if retry {
                    slots.insert(
                        a.spec.name.clone(),
                        Slot {
                            assignment: a.clone(),
                            state: SlotState::Starting,
                            ft: None,
                        },
                    );
                    to_start.push(a.clone());
                }
            }
        }
        for (r, a) in updates {
            r.assign(a.spec.level, a.role, a.peer, a.generation, a.handover);
        }
        for i in to_stop {
            tokio::spawn(async move { i.stop().await });
        }
        for a in to_start {
            let this = self.clone();
            tokio::spawn(async move { this.start(a).await });
        }
        self.synced.store(true, Ordering::Release);
    }

    async fn start(self: Arc<Self>, a: Assignment) {
        let spec = &a.spec;
        tracing::info!(workload = %spec.name, incarnation = a.incarnation, "starting");
        let result = self.start_instance(&a).await;
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        // The assignment may have moved on while starting (an ft peer placed): still
        // this run if uid, spec and role hold.
        let current = slots.get_mut(&spec.name).filter(|s| {
            s.assignment.uid == a.uid
                && same_run(&s.assignment.spec, &a.spec)
                && s.assignment.role == a.role
                && s.assignment.incarnation == a.incarnation
                && matches!(s.state, SlotState::Starting)
        });
        match (current, result) {
            (Some(slot), Ok((inst, ft))) => {
                if let Some(r) = &ft
                    && slot.assignment != a
                {
                    let now = &slot.assignment;
                    r.assign(
                        now.spec.level,
                        now.role,
                        now.peer.clone(),
                        now.generation,
                        now.handover,
                    );
                }
                slot.state = SlotState::Running(inst);
                slot.ft = ft;
            }
            (Some(slot), Err(message)) => {
                tracing::warn!(workload = %spec.name, "start failed: {message}");
                (self.log_sink(&spec.name))(format!("avail: start failed: {message}"));
                slot.state = SlotState::Failed {
                    message,
                    at: Instant::now(),
                }
            }
            // Removed or replaced while starting: stop what we made.
            (None, Ok((inst, _))) => {
                tokio::spawn(async move { inst.stop().await });
            }
            (None, Err(_)) => {}
        }
    }

    async fn start_instance(
        &self,
        a: &Assignment,
    ) -> Result<(Arc<dyn Instance>, Option<Arc<FtReplica>>), String> {
        let spec = &a.spec;
        let logs = self.log_sink(&spec.name);
        if spec.driver == DriverKind::Wasm {
            // A fresh guest only for the first run of an ft pair: later generations
            // exist only as a checkpoint chain, and starting from nothing would silently
            // lose state that clients saw.
            if spec.level == Level::Ft && a.role == ReplicaRole::Active && a.generation > 1 {
                return Err(format!(
                    "no replica state to resume generation {} from: the pair's replicas are gone",
                    a.generation
                ));
            }
            let bytes = self.fetch_module(&spec.artifact).await?;
            // Every wasm workload runs as a replica of the checkpointing engine, so its
            // level can change live. A module the checkpoint rewrite refuses (shared
            // memory, reference-typed state) runs as a plain instance at none or ha
            // (restarted fresh), and cannot be made ft.
            let module = match self.wasm.ft_module(spec, bytes.clone(), logs.clone()).await {
                Ok(m) => m,
                Err(e) if spec.level != Level::Ft && a.role == ReplicaRole::Active => {
                    logs(format!(
                        "avail: no checkpoints for this module ({e}): it runs without live level changes or ha checkpoints"
                    ));
                    return self
                        .wasm
                        .start(StartSpec {
                            spec,
                            module: Some(bytes),
                            files: Default::default(),
                            logs,
                        })
                        .await
                        .map(|i| (i, None))
                        .map_err(|e| e.to_string());
                }
                Err(e) => return Err(e.to_string()),
            };
            let ctx = FtContext {
                peers: self.peers.clone(),
                client: self.client(),
                budget: self.image_budget.clone(),
            };
            let r = FtReplica::start(
                ctx,
                spec.clone(),
                a.uid.clone(),
                module,
                a.role,
                a.generation,
                a.peer.clone(),
            )?;
            return Ok((r.clone() as Arc<dyn Instance>, Some(r)));
        }
        let inst = match spec.driver {
            DriverKind::Wasm => {
                let module = self.fetch_module(&spec.artifact).await?;
                self.wasm
                    .start(StartSpec {
                        spec,
                        module: Some(module),
                        files: Default::default(),
                        logs,
                    })
                    .await
                    .map_err(|e| e.to_string())
            }
            DriverKind::Process => {
                // What the program learns of its run, as Nomad's NOMAD_* variables.
                let mut spec = spec.clone();
                for (k, v) in [
                    ("AVAIL_NODE", self.cfg.name.clone()),
                    ("AVAIL_WORKLOAD", spec.name.clone()),
                    ("AVAIL_INCARNATION", a.incarnation.to_string()),
                ] {
                    spec.env.insert(k.into(), v);
                }
                self.process
                    .start(StartSpec {
                        spec: &spec,
                        module: None,
                        files: Default::default(),
                        logs,
                    })
                    .await
                    .map_err(|e| e.to_string())
            }
            DriverKind::Qemu => {
                let Some(qemu) = &self.qemu else {
                    return Err(format!(
                        "this node has no {} (install qemu-system-x86)",
                        avail_driver::qemu::QEMU_BINARY
                    ));
                };
                // The kernel and initrd, fetched and checked into the node's cache.
                let mut files = std::collections::BTreeMap::new();
                let vm = spec.vm.clone().unwrap_or_default();
                for digest in std::iter::once(&spec.artifact).chain(vm.initrd.as_ref()) {
                    files.insert(digest.clone(), self.fetch_file(digest).await?);
                }
                qemu.start(StartSpec {
                    spec,
                    module: None,
                    files,
                    logs,
                })
                .await
                .map_err(|e| e.to_string())
            }
        }?;
        Ok((inst, None))
    }

    /// The secondary replica of `workload` (run `uid`) on this node, for a replication
    /// link.
    pub fn secondary(&self, hello: &Hello, cert: &PeerCert) -> Option<Arc<FtReplica>> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let s = slots.get(&hello.workload)?;
        let r = s.ft.as_ref()?;
        // Only the primary this secondary is paired with may feed it: another node's
        // certificate (valid as it may be) names another node.
        let primary = s.assignment.peer.as_ref()?;
        (s.assignment.uid == hello.uid
            && r.role() == ReplicaRole::Secondary
            && cert.names_node(&primary.node))
        .then(|| r.clone())
    }

    /// Where the node's cache keeps the artifact `digest`.
    fn cached_artifact(&self, digest: &str) -> std::path::PathBuf {
        self.cfg
            .data_dir
            .join("artifacts")
            .join(digest.replace(':', "-"))
    }

    /// An artifact by digest, as a file in the node's cache (fetched and checked like
    /// a module).
    async fn fetch_file(&self, digest: &str) -> Result<std::path::PathBuf, String> {
        self.fetch_module(digest).await?;
        let path = self.cached_artifact(digest);
        if !path.is_file() {
            return Err(format!(
                "artifact {digest} could not be kept in the node's cache"
            ));
        }
        Ok(path)
    }

    /// A module by digest: from the node's cache, else from the server; the digest is
    /// checked either way.
    async fn fetch_module(&self, digest: &str) -> Result<Arc<[u8]>, String> {
        let path = self.cached_artifact(digest);
        let dir = path
            .parent()
            .expect("in the artifacts directory")
            .to_path_buf();
        let verify = |b: &[u8]| format!("sha256:{:x}", Sha256::digest(b)) == digest;
        if let Ok(b) = tokio::fs::read(&path).await {
            if verify(&b) {
                return Ok(b.into());
            }
            tracing::warn!("cached {} is corrupt; fetching again", path.display());
        }
        let bytes = self
            .client()
            .get_bytes(&format!("/v1/artifacts/{digest}"))
            .await
            .map_err(|e| format!("fetching {digest}: {e}"))?;
        if !verify(&bytes) {
            return Err(format!(
                "artifact {digest}: content does not match its digest"
            ));
        }
        let tmp = dir.join(format!(".{}.tmp", digest.replace(':', "-")));
        let cached = async {
            tokio::fs::create_dir_all(&dir).await?;
            tokio::fs::write(&tmp, &bytes).await?;
            tokio::fs::rename(&tmp, &path).await
        };
        if let Err(e) = cached.await {
            tracing::warn!("cannot cache {digest}: {e}");
        }
        Ok(bytes.to_vec().into())
    }

    /// The server answered a heartbeat sent at `sent`. After a fence, the desired state is fetched
    /// afresh (never the one from before the isolation: the server may have moved the
    /// workloads meanwhile), and the ha workloads still assigned here start again.
    /// `judged`: whether a leader heard it (see [`Supervisor::judged_age`]).
    pub fn contact(self: &Arc<Self>, sent: Instant, judged: bool) {
        {
            let mut last = self.last_contact.lock().unwrap_or_else(|p| p.into_inner());
            *last = (*last).max(sent);
        }
        if judged {
            let mut last = self.last_judged.lock().unwrap_or_else(|p| p.into_inner());
            *last = (*last).max(sent);
        }
        *self
            .control_plane_away
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        if self.fenced.load(Ordering::Acquire) {
            let this = self.clone();
            tokio::spawn(async move {
                let fresh = this
                    .client()
                    .with_timeout(Duration::from_secs(5))
                    .get::<DesiredState>("/v1/agent/desired?revision=0&wait_ms=0")
                    .await;
                match fresh {
                    Ok(d) => {
                        tracing::warn!("the server is reachable again: ha workloads may start");
                        this.fenced.store(false, Ordering::Release);
                        this.apply(&d);
                    }
                    Err(e) => tracing::warn!("desired state after a fence: {e}"),
                }
            });
        }
    }

    /// Set the isolation window from the server's down window (the lease TTL): a
    /// margin of a third of it (at least 250 ms) before the server may declare the node
    /// down, so the node's ha workloads stop serving before they are restarted
    /// elsewhere.
    pub fn set_lease_ttl(&self, ttl: Duration) {
        if !ttl.is_zero() {
            *self.down_after.lock().unwrap_or_else(|p| p.into_inner()) = ttl;
        }
    }

    /// The server's down window in force.
    pub fn down_after(&self) -> Duration {
        *self.down_after.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Set the server's suspect window (0: unknown, kept).
    pub fn set_suspect_after(&self, suspect: Duration) {
        if !suspect.is_zero() {
            *self.suspect_after.lock().unwrap_or_else(|p| p.into_inner()) = suspect;
        }
    }

    /// How much later than this node a peer may have been last heard by a leader and
    /// still not have been given this node's workloads: a restart needs this node
    /// `down` (silent for the down window) and its target ready (heard within the
    /// suspect window), so the target was heard at least the down window less the
    /// suspect window after this node; less 50 ms for the heartbeats' travel.
    pub fn company_margin(&self) -> Duration {
        self.down_after()
            .saturating_sub(*self.suspect_after.lock().unwrap_or_else(|p| p.into_inner()))
            .saturating_sub(Duration::from_millis(50))
    }

    /// How long since a leader last heard this node (its last judged heartbeat's send
    /// time): what peers are told when they ask.
    pub fn judged_age(&self) -> Duration {
        self.last_judged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    /// The isolation window in force: isolated this long, the agent stops its ha
    /// workloads (the down window less a margin, [`isolation_window`]).
    pub fn fence_after(&self) -> Duration {
        isolation_window(self.down_after())
    }

    /// How long since the server last answered.
    pub fn contact_age(&self) -> Duration {
        self.last_contact
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    /// Whether the server has not answered for the isolation window: this node's ha
    /// workloads must not serve (the server may be about to restart them elsewhere).
    pub fn isolated(&self) -> bool {
        self.contact_age() > self.fence_after()
    }

    /// Whether, when a heartbeat left at `at`, the server had been silent for the
    /// isolation window (a pause or a partition just ended) and the peers had not
    /// shown the control plane away: a slow answer to a heartbeat sent in time does not
    /// count.
    pub fn isolated_at(&self, at: Instant) -> bool {
        let last = *self.last_contact.lock().unwrap_or_else(|p| p.into_inner());
        at.saturating_duration_since(last) > self.fence_after() && !self.away_at(at)
    }

    /// Whether the peers' verdict that the control plane is away holds now.
    pub fn is_away(&self) -> bool {
        self.away_at(Instant::now())
    }

    /// Whether the peers' verdict that the control plane is away holds at `at`.
    fn away_at(&self, at: Instant) -> bool {
        self.control_plane_away
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| at < until)
    }

    /// Record what the peers said while the server was silent: `true` when every
    /// other node answered and all have lost it too; the verdict holds for
    /// [`crate::fence::away_valid_for`] unless renewed.
    pub fn set_control_plane_away(&self, away: bool) {
        let until = away.then(|| Instant::now() + crate::fence::away_valid_for(self.fence_after()));
        *self
            .control_plane_away
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = until;
    }

    /// Whether this node's ha workloads must not serve: the server has been silent for
    /// the isolation window, and the peers have not shown that it is silent for all.
    pub fn must_not_serve_ha(&self) -> bool {
        self.is_fenced() || (self.isolated() && !self.away_at(Instant::now()))
    }

    /// Whether the ha workloads are stopped for isolation.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Stop every ha workload: this node is cut off and the server will restart them
    /// elsewhere once its lease expires.
    pub async fn fence(&self) {
        if self.fenced.swap(true, Ordering::AcqRel) {
            return;
        }
        let gone: Vec<(String, Slot)> = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            let names: Vec<String> = slots
                .iter()
                .filter(|(_, s)| s.assignment.spec.level == avail_model::Level::Ha)
                .map(|(n, _)| n.clone())
                .collect();
            names
                .into_iter()
                .filter_map(|n| slots.remove(&n).map(|s| (n, s)))
                .collect()
        };
        tracing::warn!(
            workloads = gone.len(),
            "isolated from the control plane: stopping ha workloads (fenced)"
        );
        self.fences.lock().unwrap_or_else(|p| p.into_inner()).push(
            avail_model::agent::FenceReport {
                at_ms: now_ms(),
                silent_ms: self.contact_age().as_millis() as u64,
                stopped: gone.iter().map(|(n, _)| n.clone()).collect(),
            },
        );
        for (_, s) in gone {
            if let SlotState::Running(i) = s.state {
                i.stop().await;
            }
        }
    }

    /// Fences to report with the next heartbeat (put back with
    /// [`Supervisor::unreported_fences`] when it fails).
    pub fn take_fences(&self) -> Vec<avail_model::agent::FenceReport> {
        std::mem::take(&mut *self.fences.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Fences a failed heartbeat did not deliver: reported with the next one.
    pub fn unreported_fences(&self, mut f: Vec<avail_model::agent::FenceReport>) {
        let mut q = self.fences.lock().unwrap_or_else(|p| p.into_inner());
        f.append(&mut q);
        *q = f;
    }

    /// The other nodes (from the last desired state) and mutual TLS to them.
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// Stop everything (agent shutdown).
    pub async fn stop_all(&self) {
        let all: Vec<Slot> = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in all {
            if let SlotState::Running(i) = s.state {
                i.stop().await;
            }
        }
        // This run's working directories and cgroups go with it.
        self.process.containment().remove_scope();
    }
}

/// Follow the node's desired state from the server, forever.
pub async fn follow_desired(sup: Arc<Supervisor>) {
    let mut rev = 0u64;
    loop {
        let client = sup
            .client()
            .with_timeout(Duration::from_millis(DESIRED_WAIT_MS + 5000));
        match client
            .get::<DesiredState>(&format!(
                "/v1/agent/desired?revision={rev}&wait_ms={DESIRED_WAIT_MS}"
            ))
            .await
        {
            Ok(d) => {
                rev = d.revision;
                sup.apply(&d);
            }
            Err(e) => {
                tracing::warn!("desired state: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_isolation_window_ends_before_the_down_window() {
        let ms = Duration::from_millis;
        assert_eq!(isolation_window(ms(3000)), ms(2000));
        assert_eq!(isolation_window(ms(1000)), ms(666));
        assert_eq!(isolation_window(ms(600)), ms(350));
        assert_eq!(isolation_window(ms(200)), ms(100));
        for t in (200..10_000).step_by(50) {
            assert!(isolation_window(ms(t)) < ms(t));
        }
    }
}
