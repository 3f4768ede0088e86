//! Level `ft` on a node: one replica (primary or secondary) of a pair, as an actor
//! task that owns the guest and carries out the pair protocol's actions
//! (`avail_statepoint::pair`) over a mutual-TLS link to the other replica's agent. The guest's
//! calls run on a thread of their own (`ft/guest_thread.rs`), so the link and its
//! heartbeats never wait for a handler; links arrive through the replication listener
//! (`ft/listener.rs`).
//!
//! ```text
//!  ingress --Request--> [replica actor: primary] --frames--> TLS --> [replica actor: secondary]
//!        <--reply (held until the ack of its epoch)--  <--acks-- TLS <--
//!  secondary: primary silent -> POST /v1/agent/pairs/<w>/lease {g -> g+1}
//!             granted -> restore the guest from the last applied image -> primary
//! ```
//!
//! The link: the primary dials the secondary's peer port (bound to its own node
//! address) with mutual TLS (ALPN `avail-repl/1`; it verifies the secondary's node
//! name, the secondary checks that the certificate is its primary's: see
//! `crate::peers` and `ft/listener.rs`), says `Hello`, then both sides send
//! length-prefixed messages:
//! `u32 length | u8 kind | body` with kinds 1 Hello (JSON), 2 checkpoint frame
//! (`avail_statepoint::frame`), 3 Ack, 4 NeedFull, 5 Heartbeat (generation, epoch as
//! u64 LE).
//!
//! The reply log (exactly once per `Idempotency-Key`) is the replica's host-side state:
//! each checkpoint carries the entries added since the previous one (a full checkpoint
//! carries all), so a promoted secondary answers a retried request from the log
//! (`Avail-Replayed: 1`) instead of running it twice.

mod guest_thread;
mod listener;

pub use listener::{HelloError, LINK_QUEUE, serve_replication};

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use avail_client::Client;
use avail_driver::wasm::ft::FtModule;
use avail_driver::{HttpRequest, HttpResponse, Instance, InstanceStatus};
use avail_model::agent::{InstanceState, LeaseReply, LeaseRequest, Peer, ReplicaRole};
use avail_model::spec::SecondaryLoss;
use avail_model::{FtStatus, Level, WorkloadSpec};
use avail_statepoint::frame::{self, Frame};
use avail_statepoint::pair::{
    LossPolicy, Msg, OutputId, PairConfig, Primary, PrimaryAction, PrimaryMode, Secondary,
    SecondaryAction,
};
use avail_statepoint::state::{StateDelta, StateImage};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::peers::{Link, Peers};
use crate::replylog::ReplyLog;
use guest_thread::{Batch, Done, GuestSide, GuestThread, Pending};

/// The header an ingress uses to report the ingress-assigned keys whose replies it
/// delivered (comma-separated): the replica trims them from its reply log.
pub const DELIVERED_HEADER: &str = "avail-delivered";

/// The header of a reply to a request that did not run (the workload is moving, the
/// replica is not the active one, or it stopped before taking the request): the ingress
/// retries it against the route then in force, whatever the level.
pub const NOT_RUN_HEADER: &str = "avail-not-run";

fn not_run(code: &str, message: &str) -> HttpResponse {
    let mut r = HttpResponse::error(503, code, message);
    r.headers.push((NOT_RUN_HEADER.into(), "1".into()));
    r
}

/// Default port of the replication listener.
pub const DEFAULT_REPLICATION_PORT: u16 = 7481;
/// Largest message on the link.
const MAX_LINK_MESSAGE: usize = frame::MAX_PAYLOAD_BYTES as usize + 4096;
/// Requests waiting for the actor, at most.
const MAX_QUEUED: usize = 1024;
/// Control messages waiting for the actor, at most (link readers wait when it is full).
const MAX_CONTROL_QUEUED: usize = 4096;
/// A large message is read this much at a time.
const READ_CHUNK: usize = 1 << 20;
/// Read and write buffer of a replication link.
const LINK_BUFFER: usize = 64 << 10;
/// Queued requests taken into an epoch at once before it may end early.
const MAX_BATCH: usize = 64;
/// A batch starts no request after it has run this long (or the epoch's length, when
/// shorter), so replies and epochs are not held behind a long queue of slow handlers.
const MAX_BATCH_MS: u64 = 10;
/// An epoch ends early for a waiting reply only while fewer checkpoints are in flight.
const LOW_LATENCY_INFLIGHT: usize = 1;

/// The first message on a link.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    /// Workload.
    pub workload: String,
    /// Workload uid.
    pub uid: String,
    /// The primary's generation.
    pub generation: u64,
}

enum Wire {
    Hello(Hello),
    /// A whole message of kind 2 as read: the frame starts at byte 1.
    Frame(Vec<u8>),
    Msg(Msg),
}

/// A checkpoint frame as one link message, encoded in place (no copy of the pages
/// besides the one into this buffer).
fn frame_message(f: &Frame) -> Result<Vec<u8>, frame::FrameError> {
    let mut out = vec![0, 0, 0, 0, 2];
    frame::encode_into(f, &mut out)?;
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_le_bytes());
    Ok(out)
}

fn encode_wire(w: &Wire) -> Vec<u8> {
    let (kind, body): (u8, Vec<u8>) = match w {
        Wire::Hello(h) => (1, serde_json::to_vec(h).expect("hello serialises")),
        Wire::Frame(_) => unreachable!("frames are encoded by frame_message"),
        Wire::Msg(Msg::Ack { generation, epoch }) => {
            (3, [generation.to_le_bytes(), epoch.to_le_bytes()].concat())
        }
        Wire::Msg(Msg::NeedFull { generation }) => (4, generation.to_le_bytes().to_vec()),
        Wire::Msg(Msg::Heartbeat { generation }) => (5, generation.to_le_bytes().to_vec()),
        Wire::Msg(Msg::Checkpoint { .. }) => unreachable!("checkpoints travel as frames"),
    };
    let mut out = Vec::with_capacity(5 + body.len());
    out.extend_from_slice(&((body.len() + 1) as u32).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(&body);
    out
}

/// Read one message. A large frame is read in chunks: memory grows with the bytes that
/// really arrive (not with what the length says), and `alive` is called with the
/// frame's generation after each chunk, so a secondary hears its primary while a big
/// image is still on the way.
async fn read_wire(
    r: &mut (impl AsyncReadExt + Unpin),
    mut alive: impl FnMut(u64),
) -> std::io::Result<Wire> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let len = r.read_u32_le().await? as usize;
    if len == 0 || len > MAX_LINK_MESSAGE {
        return Err(bad("bad message length"));
    }
    let mut buf = Vec::with_capacity(len.min(READ_CHUNK));
    while buf.len() < len {
        let start = buf.len();
        buf.resize(start + (len - start).min(READ_CHUNK), 0);
        r.read_exact(&mut buf[start..]).await?;
        // Kind 2, a frame: its generation is at frame offset 8.
        if buf[0] == 2
            && buf.len() < len
            && let Some(g) = buf.get(9..17)
        {
            alive(u64::from_le_bytes(g.try_into().expect("8 bytes")));
        }
    }
    let u64_at = |i: usize| -> std::io::Result<u64> {
        buf.get(1 + i * 8..9 + i * 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or_else(|| bad("short message"))
    };
    Ok(match buf[0] {
        1 => Wire::Hello(serde_json::from_slice(&buf[1..]).map_err(|e| bad(&e.to_string()))?),
        2 => Wire::Frame(buf),
        3 => Wire::Msg(Msg::Ack {
            generation: u64_at(0)?,
            epoch: u64_at(1)?,
        }),
        4 => Wire::Msg(Msg::NeedFull {
            generation: u64_at(0)?,
        }),
        5 => Wire::Msg(Msg::Heartbeat {
            generation: u64_at(0)?,
        }),
        k => return Err(bad(&format!("unknown message kind {k}"))),
    })
}

enum Cmd {
    Peer(Option<Peer>, u64),
    /// The control plane's assignment changed: level, role, peer, generation, handover.
    Assign(Level, ReplicaRole, Option<Peer>, u64, bool),
    /// The server's answer to a handover (none: not known).
    Handover(Option<bool>),
    Link(Link),
    FromPeer(Wire),
    /// The link with this number went down.
    LinkDown(u64),
    /// Bytes of a frame of this generation are arriving (liveness only).
    PeerAlive(u64),
    /// A dial (with its number) connected.
    Dialled(Link, u64),
    Lease(bool),
    Stop,
}

/// Replication figures and role, shared with the supervisor.
#[derive(Clone, Debug, Default)]
struct Report {
    role: ReplicaRole,
    generation: u64,
    ft: FtStatus,
    failed: Option<String>,
    promoted: bool,
    /// A standby made active: the checkpoint epoch it resumed from (none: fresh).
    resumed_epoch: Option<u64>,
    /// Guests made afresh after a fault.
    restarts: u32,
    /// The level the replica runs at.
    level: Level,
}

/// The handle of one replica: the slot's instance.
pub struct FtReplica {
    /// Client requests (bounded: a full queue answers 503).
    requests: mpsc::Sender<Pending>,
    /// Everything else (peer changes, link events, acks, lease answers): served first,
    /// so a backlog of requests never delays the protocol.
    control: mpsc::Sender<Cmd>,
    report: Arc<Mutex<Report>>,
    workload: String,
}

/// What a replica needs from its node.
#[derive(Clone)]
pub struct FtContext {
    /// The server client with the node token.
    pub client: Client,
    /// Memory the node's secondaries may hold in checkpoint images, shared by them.
    pub budget: Arc<ImageBudget>,
    /// The other nodes (links are dialled with mutual TLS).
    pub peers: Arc<Peers>,
}

/// The memory a node lets its secondaries' checkpoint images take (they live in memory,
/// not on disk). A secondary whose image would pass it refuses the checkpoint and
/// fails: its primary then takes the next generation and the control plane places a
/// new secondary elsewhere. Nothing the primary released is lost.
#[derive(Debug)]
pub struct ImageBudget {
    limit: u64,
    used: std::sync::atomic::AtomicU64,
}

impl ImageBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> ImageBudget {
        ImageBudget {
            limit,
            used: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Change a holder's share from `from` to `to` bytes; growing past the limit is
    /// refused (nothing changes) with what the node would then hold.
    pub fn resize(&self, from: u64, to: u64) -> Result<(), String> {
        use std::sync::atomic::Ordering;
        if to <= from {
            self.used.fetch_sub(from - to, Ordering::Relaxed);
            return Ok(());
        }
        let grow = to - from;
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                (u + grow <= self.limit).then_some(u + grow)
            })
            .map(|_| ())
            .map_err(|u| {
                format!(
                    "out of memory for checkpoint images: {} MiB held on this node, {} MiB more needed, budget {} MiB",
                    u >> 20,
                    grow.div_ceil(1 << 20),
                    self.limit >> 20
                )
            })
    }
}

impl FtReplica {
    /// Start a replica of `spec` at `generation` in `role`.
    pub fn start(
        ctx: FtContext,
        spec: WorkloadSpec,
        uid: String,
        module: FtModule,
        role: ReplicaRole,
        generation: u64,
        peer: Option<Peer>,
    ) -> Result<Arc<FtReplica>, String> {
        let (requests, requests_rx) = mpsc::channel(MAX_QUEUED);
        let (control, control_rx) = mpsc::channel(MAX_CONTROL_QUEUED);
        let report = Arc::new(Mutex::new(Report {
            role,
            generation,
            level: spec.level,
            ..Report::default()
        }));
        let cfg = PairConfig {
            heartbeat_ms: 25,
            failure_ms: 150,
            ..PairConfig::default()
        };
        let level = spec.level;
        let policy = policy_of(&spec);
        let now = now_ms();
        let state = match role {
            ReplicaRole::Active => {
                let guest = tokio::task::block_in_place(|| module.fresh())?;
                let mut machine = if peer.is_some() {
                    Primary::new(cfg, policy, generation, now)
                } else {
                    Primary::promoted(cfg, policy, generation, now)
                };
                machine.set_commit(level == Level::Ft);
                let side = GuestSide {
                    guest,
                    log: ReplyLog::default(),
                };
                Role::Primary(Box::new(PrimaryState::new(machine, side)))
            }
            ReplicaRole::Secondary => {
                let mut machine = Secondary::new(cfg, generation, now);
                machine.set_promote(level == Level::Ft);
                Role::Secondary(Box::new(SecondaryState {
                    machine,
                    image: StateImage::default(),
                    log: ReplyLog::default(),
                    clock_ms: 0,
                    budget: ctx.budget.clone(),
                    reserved: 0,
                }))
            }
        };
        let actor = Actor {
            main: tokio::runtime::Handle::current(),
            ctx,
            spec: spec.clone(),
            uid,
            module,
            cfg,
            policy,
            level,
            handover: false,
            handing: None,
            moved: false,
            tx: control.clone(),
            report: report.clone(),
            peer: None,
            peer_gen: 0,
            link: None,
            link_gen: 0,
            dial_gen: 0,
            redials: 0,
            dial_task: None,
            guest_thread: None,
            away: None,
            pending: VecDeque::new(),
            state,
        };
        // The replica runs on a thread of its own with a single-threaded runtime: the
        // guest's calls and captures run there directly (no hand-off of a shared worker
        // per request), and the link's reader and writer are tasks on the same thread.
        let failed = report.clone();
        std::thread::Builder::new()
            .name(format!("ft-{}", spec.name))
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(actor.run(requests_rx, control_rx, peer, generation)),
                    Err(e) => {
                        failed.lock().unwrap_or_else(|p| p.into_inner()).failed =
                            Some(format!("replica runtime: {e}"))
                    }
                }
            })
            .map_err(|e| format!("replica thread: {e}"))?;
        Ok(Arc::new(FtReplica {
            requests,
            control,
            report,
            workload: spec.name,
        }))
    }

    /// The role this replica plays now (a promoted secondary is active).
    pub fn role(&self) -> ReplicaRole {
        self.report.lock().unwrap_or_else(|p| p.into_inner()).role
    }

    /// The generation this replica is at.
    pub fn generation(&self) -> u64 {
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .generation
    }

    /// Tell the replica who its peer is now (the control plane placed a new secondary,
    /// or the primary moved).
    pub fn set_peer(&self, peer: Option<Peer>, generation: u64) {
        if self.control.try_send(Cmd::Peer(peer, generation)).is_err() {
            tracing::error!(workload = %self.workload, "replica control queue full: peer change lost");
        }
    }

    /// The control plane's assignment changed while this replica runs: its level (a
    /// live level change: output commit on or off, a standby that does or does not take
    /// over on its own), its role (a standby made active: an `ha` restart onto the
    /// node holding its checkpoint), its peer and generation.
    pub fn assign(
        &self,
        level: Level,
        role: ReplicaRole,
        peer: Option<Peer>,
        generation: u64,
        handover: bool,
    ) {
        if self
            .control
            .try_send(Cmd::Assign(level, role, peer, generation, handover))
            .is_err()
        {
            tracing::error!(workload = %self.workload, "replica control queue full: assignment lost");
        }
    }

    /// Hand an accepted link to this replica (a secondary).
    pub fn link(&self, stream: Link) {
        let _ = self.control.try_send(Cmd::Link(stream));
    }

    /// Workload name.
    pub fn workload(&self) -> &str {
        &self.workload
    }
}

#[async_trait]
impl Instance for FtReplica {
    async fn handle(&self, req: HttpRequest) -> HttpResponse {
        let (tx, rx) = oneshot::channel();
        if self.requests.try_send((req, tx)).is_err() {
            return HttpResponse::error(503, "busy", "the replica is not taking requests");
        }
        // A request the replica never took (it stopped first) did not run.
        rx.await
            .unwrap_or_else(|_| not_run("unavailable", "the replica stopped before answering"))
    }

    fn status(&self) -> InstanceStatus {
        let r = self.report.lock().unwrap_or_else(|p| p.into_inner());
        InstanceStatus {
            state: if r.failed.is_some() {
                InstanceState::Failed
            } else {
                InstanceState::Running
            },
            restarts: r.restarts,
            message: r.failed.clone(),
        }
    }

    async fn stop(&self) {
        let _ = self.control.send(Cmd::Stop).await;
    }
}

impl FtReplica {
    /// The replication figures to report (active replica only), and the level they
    /// were taken at.
    pub fn ft_status(&self) -> (ReplicaRole, Option<FtStatus>, Level) {
        let r = self.report.lock().unwrap_or_else(|p| p.into_inner());
        let ft = (r.role == ReplicaRole::Active).then(|| r.ft.clone());
        (r.role, ft, r.level)
    }
}

/// What a primary does with held outputs when its secondary is lost: the spec's choice
/// at level `ft`; nothing is held at the other levels.
fn policy_of(spec: &WorkloadSpec) -> LossPolicy {
    match (spec.level, spec.ft.on_secondary_loss) {
        (Level::Ft, SecondaryLoss::Hold) => LossPolicy::Hold,
        _ => LossPolicy::Release,
    }
}

/// How often an epoch ends: every checkpoint epoch at `ft` and during a live move (the
/// target catches up at once), every checkpoint interval at `ha` (to the standby), and
/// rarely at `none` (no peer: nothing is sent).
fn epoch_period(level: Level, spec: &WorkloadSpec, moving: bool) -> Duration {
    Duration::from_millis(match level {
        _ if moving || level == Level::Ft => u64::from(spec.ft.epoch_ms.max(1)),
        Level::Ha => u64::from(spec.ha.checkpoint_ms.max(1)),
        _ => 60_000,
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Capture the guest and its reply log together (the guest is between calls): a
/// delta, or a full image.
fn capture(side: &mut GuestSide, full: bool) -> Result<StateDelta, String> {
    // Host state: the guest's clock floor, then the reply log.
    let mut host = side.guest.clock_ms().to_le_bytes().to_vec();
    side.log.expire(now_ms());
    if full {
        host.extend(side.log.take_full());
        side.guest.capture_full(host)
    } else {
        host.extend(side.log.take_delta());
        side.guest.capture(host)
    }
}

struct PrimaryState {
    machine: Primary,
    /// The guest and its reply log: here between batches, `None` while a batch runs on
    /// the guest thread (no capture then).
    side: Option<Box<GuestSide>>,
    /// Held replies by output id, with when they were produced.
    held: HashMap<OutputId, (oneshot::Sender<HttpResponse>, HttpResponse, Instant)>,
    next_output: OutputId,
    checkpoints: u64,
    inflight_bytes: BTreeMap<u64, u64>,
    /// Guests made afresh after a fault (levels below ft).
    restarts: u32,
}

impl PrimaryState {
    fn new(machine: Primary, side: GuestSide) -> PrimaryState {
        PrimaryState {
            machine,
            side: Some(Box::new(side)),
            held: HashMap::new(),
            next_output: 1,
            checkpoints: 0,
            inflight_bytes: BTreeMap::new(),
            restarts: 0,
        }
    }
}

struct SecondaryState {
    machine: Secondary,
    image: StateImage,
    log: ReplyLog,
    /// The primary's guest clock floor at the applied checkpoint.
    clock_ms: i64,
    budget: Arc<ImageBudget>,
    /// Bytes of the budget this image holds.
    reserved: u64,
}

impl Drop for SecondaryState {
    fn drop(&mut self) {
        let _ = self.budget.resize(self.reserved, 0);
    }
}

enum Role {
    Primary(Box<PrimaryState>),
    Secondary(Box<SecondaryState>),
    Done,
}

struct Actor {
    /// The agent's runtime (requests to the server run there).
    main: tokio::runtime::Handle,
    ctx: FtContext,
    spec: WorkloadSpec,
    uid: String,
    module: FtModule,
    cfg: PairConfig,
    policy: LossPolicy,
    /// The level in force (changes live).
    level: Level,
    /// The control plane asks this (active) replica to hand over to its peer.
    handover: bool,
    /// A handover under way: the last checkpoint's epoch, when it began, and whether
    /// the server has been asked.
    handing: Option<(u64, Instant, bool)>,
    /// Handed over: the peer is the active copy now; requests are turned away (the
    /// ingress retries them there) until the supervisor stops this replica.
    moved: bool,
    tx: mpsc::Sender<Cmd>,
    report: Arc<Mutex<Report>>,
    peer: Option<Peer>,
    /// The generation the control plane gave with `peer`.
    peer_gen: u64,
    /// Writer to the peer, when linked.
    link: Option<mpsc::Sender<Vec<u8>>>,
    /// Bumped on every new link, so a stale link's "down" is ignored.
    link_gen: u64,
    /// Bumped on every dial, so an older dial's link is dropped.
    dial_gen: u64,
    /// Dials since the peer last spoke (the pause before the next grows with it).
    redials: u32,
    /// The dial under way (aborted when a newer one starts).
    dial_task: Option<tokio::task::JoinHandle<()>>,
    /// Where the guest's calls run (started at the first batch).
    guest_thread: Option<GuestThread>,
    /// The batch out on the guest thread, if one is.
    away: Option<oneshot::Receiver<Done>>,
    /// Requests taken from the queue and not yet served (at most [`MAX_BATCH`]).
    pending: VecDeque<Pending>,
    state: Role,
}

impl Actor {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Pending>,
        mut control: mpsc::Receiver<Cmd>,
        peer: Option<Peer>,
        generation: u64,
    ) {
        self.set_peer(peer, generation);
        let mut period = epoch_period(self.level, &self.spec, self.handover);
        let mut epoch_timer = tokio::time::interval(period);
        epoch_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        // An idle replica with no peer sleeps: after a pause the tick resumes at once.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let ticking = self.needs_tick();
            tokio::select! {
                biased;
                cmd = control.recv() => {
                    let Some(cmd) = cmd else { break };
                    if !self.command(cmd).await {
                        break;
                    }
                }
                done = async {
                    match self.away.as_mut() {
                        Some(rx) => rx.await,
                        None => std::future::pending().await,
                    }
                }, if self.away.is_some() => self.batch_done(done),
                _ = tick.tick(), if ticking => {
                    // This thread may have been busy (a capture or an apply) while the
                    // peer's messages arrived: let the link's reader deliver them before
                    // judging the peer silent.
                    tokio::task::yield_now().await;
                    if !self.drain(&mut control, MAX_CONTROL_QUEUED).await {
                        break;
                    }
                    self.tick();
                }
                // The guest away (a batch runs): the epoch cannot end (no capture).
                _ = epoch_timer.tick(), if self.away.is_none() => self.end_epoch(),
                req = requests.recv(), if self.away.is_none() && self.pending.is_empty() => {
                    let Some(req) = req else { break };
                    self.pending.push_back(req);
                    // Take the requests already queued into this epoch before ending it.
                    while self.pending.len() < MAX_BATCH {
                        let Ok(req) = requests.try_recv() else { break };
                        self.pending.push_back(req);
                    }
                }
            }
            // The epoch of the batch that came back ends first (its replies leave one
            // round trip sooner), then the next batch goes out.
            self.end_epoch_early();
            self.start_batch();
            self.handover_step();
            self.publish();
            if matches!(self.state, Role::Done) {
                break;
            }
            // A level change or a live move changes the epoch's length.
            let now = epoch_period(self.level, &self.spec, self.handover);
            if now != period {
                period = now;
                epoch_timer =
                    tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                epoch_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
        }
        // A batch out runs to its end (its current call is bounded by the handler
        // deadline, and no new call starts after the batch's time): what it ran is
        // answered like the replies held.
        if let Some(rx) = self.away.take() {
            let done = rx.await;
            self.batch_done(done);
        }
        for (_, tx) in self.pending.drain(..) {
            let _ = tx.send(not_run("unavailable", "the replica stopped"));
        }
        if let Role::Primary(p) = &mut self.state {
            for (_, (tx, _, _)) in p.held.drain() {
                let _ = tx.send(HttpResponse::error(
                    503,
                    "unavailable",
                    "the replica stopped",
                ));
            }
        }
        tracing::info!(workload = %self.spec.name, "ft replica stopped");
    }

    /// Send the requests taken from the queue to the guest thread as one batch, when
    /// the guest is here; refuse them when this replica may not serve.
    fn start_batch(&mut self) {
        if self.pending.is_empty() || self.away.is_some() {
            return;
        }
        let Role::Primary(p) = &mut self.state else {
            for (_, tx) in self.pending.drain(..) {
                let _ = tx.send(not_run("unavailable", "this replica is not the active one"));
            }
            return;
        };
        if self.handing.is_some() || self.moved {
            for (_, tx) in self.pending.drain(..) {
                let _ = tx.send(not_run(
                    "moving",
                    "the workload is moving to another node; retry",
                ));
            }
            return;
        }
        // Outputs held are bounded: no more requests than there is room for.
        let room = if p.machine.accepting() {
            self.cfg.max_held.saturating_sub(p.machine.held())
        } else {
            0
        };
        while self.pending.len() > room {
            let (_, tx) = self.pending.pop_back().expect("longer than room");
            let _ = tx.send(HttpResponse::error(
                503,
                "unavailable",
                "the replica is not taking requests",
            ));
        }
        if self.pending.is_empty() {
            return;
        }
        let Some(side) = p.side.take() else {
            return;
        };
        if self.guest_thread.is_none() {
            match GuestThread::spawn(&self.spec.name, self.module.clone()) {
                Ok(t) => self.guest_thread = Some(t),
                Err(e) => {
                    p.side = Some(side);
                    tracing::error!(workload = %self.spec.name, "guest thread: {e}");
                    for (_, tx) in self.pending.drain(..) {
                        let _ = tx.send(not_run("unavailable", "the replica cannot run its guest"));
                    }
                    return;
                }
            }
        }
        let (done, rx) = oneshot::channel();
        let batch = Batch {
            side,
            requests: self.pending.drain(..).collect(),
            level: self.level,
            keep_changes: self.peer.is_some(),
            budget: epoch_period(self.level, &self.spec, self.handover)
                .min(Duration::from_millis(MAX_BATCH_MS)),
            done,
        };
        let thread = self.guest_thread.as_ref().expect("started above");
        match thread.send(batch) {
            Ok(()) => self.away = Some(rx),
            Err(batch) => {
                // The thread ended (a panic): the guest came back with the batch; the
                // next batch starts a new thread.
                p.side = Some(batch.side);
                for (_, tx) in batch.requests {
                    let _ = tx.send(not_run("unavailable", "the replica's guest thread ended"));
                }
                self.guest_thread = None;
            }
        }
    }

    /// A batch came back from the guest thread: the guest is here again, and its
    /// replies are held until the checkpoint of this epoch is acknowledged (output
    /// commit), or released at once when nothing is held (below `ft`).
    fn batch_done(&mut self, done: Result<Done, oneshot::error::RecvError>) {
        self.away = None;
        let Ok(done) = done else {
            // The guest thread ended in the middle of a batch (a panic): the guest
            // and the replies of its batch are lost, so this replica cannot go on.
            tracing::error!(workload = %self.spec.name, "the guest thread ended during a call");
            self.report.lock().unwrap_or_else(|p| p.into_inner()).failed =
                Some("the guest thread ended during a call".into());
            self.guest_thread = None;
            self.state = Role::Done;
            return;
        };
        let Role::Primary(p) = &mut self.state else {
            // Fenced while the batch ran: nothing it produced may leave.
            for (tx, _) in done.replies {
                let _ = tx.send(HttpResponse::error(
                    503,
                    "unavailable",
                    "this replica was fenced; retry",
                ));
            }
            for (_, tx) in done.unrun {
                let _ = tx.send(not_run("unavailable", "this replica is not the active one"));
            }
            return;
        };
        p.side = Some(done.side);
        p.restarts += done.restarts;
        if done.remade {
            p.machine.resync();
        }
        // Not started: first in the next batch.
        for r in done.unrun.into_iter().rev() {
            self.pending.push_front(r);
        }
        for (tx, resp) in done.replies {
            let Role::Primary(p) = &mut self.state else {
                let _ = tx.send(HttpResponse::error(
                    503,
                    "unavailable",
                    "this replica was fenced; retry",
                ));
                continue;
            };
            let id = p.next_output;
            p.next_output += 1;
            p.held.insert(id, (tx, resp, Instant::now()));
            let actions = p.machine.output(id);
            self.primary_actions(actions);
        }
    }

    /// Whether the 10 ms tick has work: a pair to heartbeat and watch, replies held, a
    /// move under way. A primary alone (levels none and ha without a standby) has none,
    /// so an idle one does not wake up (1,000 of them would wake 100,000 times a second).
    fn needs_tick(&self) -> bool {
        match &self.state {
            Role::Primary(p) => {
                p.machine.needs_time()
                    || self.peer.is_some()
                    || !p.held.is_empty()
                    || self.handing.is_some()
                    || self.handover
            }
            Role::Secondary(_) => true,
            Role::Done => false,
        }
    }

    /// Serve up to `max` commands already queued on `rx`; `false` when one says stop.
    async fn drain(&mut self, rx: &mut mpsc::Receiver<Cmd>, max: usize) -> bool {
        for _ in 0..max {
            let Ok(cmd) = rx.try_recv() else { return true };
            if !self.command(cmd).await {
                return false;
            }
        }
        true
    }

    fn publish(&self) {
        let mut r = self.report.lock().unwrap_or_else(|p| p.into_inner());
        r.level = self.level;
        match &self.state {
            Role::Primary(p) => {
                r.role = ReplicaRole::Active;
                r.generation = p.machine.generation();
                r.restarts = p.restarts;
                let oldest = p.held.values().map(|(_, _, t)| *t).min();
                r.ft.mode = primary_mode(p.machine.mode());
                r.ft.acked_epoch = p.machine.acked().unwrap_or(0);
                r.ft.lag_ms = oldest.map(|t| t.elapsed().as_millis() as u64).unwrap_or(0);
                r.ft.lag_bytes = p.inflight_bytes.values().sum();
                r.ft.checkpoints = p.checkpoints;
                // The guest side's figures as of when it was last here (a batch runs).
                if let Some(side) = &p.side {
                    r.ft.tracker = side.guest.tracker().to_string();
                    r.ft.reply_log_entries = side.log.len() as u64;
                    r.ft.reply_log_bytes = side.log.bytes() as u64;
                    r.ft.reply_log_refusals = side.log.refusals();
                }
            }
            Role::Secondary(s) => {
                r.role = ReplicaRole::Secondary;
                r.ft.mode = secondary_mode(s.machine.mode());
                r.ft.acked_epoch = s.machine.applied_epoch().unwrap_or(0);
            }
            Role::Done => {}
        }
    }

    fn set_peer(&mut self, peer: Option<Peer>, generation: u64) {
        let changed = peer.as_ref().map(|p| &p.replication_addr)
            != self.peer.as_ref().map(|p| &p.replication_addr);
        self.peer = peer.clone();
        self.peer_gen = generation;
        if let Role::Primary(p) = &mut self.state
            && changed
            && peer.is_some()
            && generation == p.machine.generation()
            && !matches!(p.machine.mode(), PrimaryMode::Suspect | PrimaryMode::Fenced)
        {
            // The pair machine asks for a full image next; the capture resets.
            tracing::info!(workload = %self.spec.name, generation, peer = ?peer, "attaching a secondary");
            p.machine.attach_secondary(now_ms());
            self.drop_link();
            self.redials = 0;
            self.dial();
        }
    }

    /// The primary dials its secondary (retrying while the peer stays the same).
    fn dial(&mut self) {
        let Some(peer) = self.peer.clone() else {
            return;
        };
        let Role::Primary(p) = &self.state else {
            return;
        };
        let hello = Hello {
            workload: self.spec.name.clone(),
            uid: self.uid.clone(),
            generation: p.machine.generation(),
        };
        // One dial at a time: a newer dial makes an older one's link unwanted. A link
        // the peer drops at once (its replica is still starting) is dialled again
        // after a growing pause.
        self.dial_gen += 1;
        let dial = self.dial_gen;
        let pause = (self.redials > 0)
            .then(|| Duration::from_millis((25u64 << self.redials.min(5)).min(1000)));
        self.redials += 1;
        let (peers, tx) = (self.ctx.peers.clone(), self.tx.clone());
        if let Some(old) = self.dial_task.take() {
            old.abort();
        }
        self.dial_task = Some(tokio::spawn(async move {
            let Ok(target) = peer.replication_addr.parse::<SocketAddr>() else {
                return;
            };
            if let Some(pause) = pause {
                tokio::time::sleep(pause).await;
            }
            for _ in 0..100 {
                if tx.is_closed() {
                    return;
                }
                // Mutual TLS: the peer must prove it is `peer.node`, and sees that
                // this is its pair's primary.
                match peers.dial_link(&peer.node, target).await {
                    Ok(mut stream) => {
                        let hello = encode_wire(&Wire::Hello(hello.clone()));
                        if stream.write_all(&hello).await.is_ok() && stream.flush().await.is_ok() {
                            let _ = tx.send(Cmd::Dialled(stream, dial)).await;
                            return;
                        }
                    }
                    Err(e) => tracing::debug!(peer = %peer.node, "replication dial: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }

    /// Start the reader and writer of a link.
    fn attach_link(&mut self, mut stream: Link) {
        // Accepted on the agent's runtime: move its socket to this replica's.
        if let Err(e) = stream.get_mut().0.rehome() {
            tracing::warn!(workload = %self.spec.name, "replication link lost while moving it to the replica: {e}");
            if matches!(self.state, Role::Primary(_)) {
                self.dial();
            }
            return;
        }
        let (r, w) = tokio::io::split(stream);
        // Buffered both ways: a burst of small messages (acks, heartbeats) is one
        // syscall; a large frame goes straight through.
        let mut r = tokio::io::BufReader::with_capacity(LINK_BUFFER, r);
        let mut w = tokio::io::BufWriter::with_capacity(LINK_BUFFER, w);
        let (wtx, mut wrx) = mpsc::channel::<Vec<u8>>(256);
        self.link_gen += 1;
        let link = self.link_gen;
        self.link = Some(wtx);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            while let Some(bytes) = wrx.recv().await {
                if w.write_all(&bytes).await.is_err() {
                    return;
                }
                // Flush when nothing else is queued.
                if wrx.is_empty() && w.flush().await.is_err() {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            loop {
                let alive = |generation| {
                    let _ = tx.try_send(Cmd::PeerAlive(generation));
                };
                match read_wire(&mut r, alive).await {
                    Ok(Wire::Hello(_)) => continue,
                    Ok(m) => {
                        if tx.send(Cmd::FromPeer(m)).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => {
                        let _ = tx.send(Cmd::LinkDown(link)).await;
                        return;
                    }
                }
            }
        });
    }

    /// Forget the current link (its writer ends; its "down", when it comes, is stale).
    fn drop_link(&mut self) {
        self.link = None;
        self.link_gen += 1;
    }

    fn send(&mut self, w: Wire) {
        self.send_bytes(encode_wire(&w));
    }

    fn send_bytes(&mut self, bytes: Vec<u8>) {
        let Some(link) = &self.link else { return };
        match link.try_send(bytes) {
            Ok(()) => {}
            // A congested link drops this message; the protocol recovers (a gap asks
            // for a full image; silence declares the peer lost).
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::debug!(workload = %self.spec.name, "replication link congested: message dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.drop_link(),
        }
    }

    async fn command(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Stop => return false,
            Cmd::Peer(peer, generation) => self.set_peer(peer, generation),
            Cmd::Assign(level, role, peer, generation, handover) => {
                self.handover = handover;
                self.assign(level, role, peer, generation)
            }
            Cmd::Handover(granted) => self.handover_answer(granted),
            Cmd::Link(stream) => {
                self.attach_link(stream);
                if let Role::Primary(p) = &mut self.state {
                    p.machine.resync();
                }
            }
            Cmd::Dialled(stream, dial) => {
                if dial != self.dial_gen {
                    return true;
                }
                self.attach_link(stream);
                if let Role::Primary(p) = &mut self.state {
                    p.machine.resync();
                }
            }
            Cmd::LinkDown(link) => {
                if link != self.link_gen {
                    // An older link's end: the current one is fine.
                    return true;
                }
                self.drop_link();
                if matches!(self.state, Role::Primary(_)) && self.peer.is_some() {
                    self.dial();
                }
            }
            Cmd::PeerAlive(generation) => {
                if let Role::Secondary(s) = &mut self.state {
                    s.machine.touch(generation, now_ms());
                }
            }
            Cmd::FromPeer(w) => self.on_peer_message(w),
            Cmd::Lease(granted) => self.lease(granted),
        }
        true
    }

    /// Low-latency mode: a reply of the running epoch is waiting and the link is idle:
    /// end the epoch now instead of at the timer.
    fn end_epoch_early(&mut self) {
        if let Role::Primary(p) = &self.state
            && p.machine.commit()
            && p.machine.waiting()
            && p.machine.inflight() < LOW_LATENCY_INFLIGHT
        {
            self.end_epoch();
        }
    }

    fn end_epoch(&mut self) {
        // A checkpoint is captured at once: only while the guest is here, between
        // batches (a batch out makes the epoch longer, never shorter).
        let Role::Primary(p) = &mut self.state else {
            return;
        };
        if p.side.is_none() {
            return;
        }
        let actions = p.machine.end_epoch(now_ms());
        self.primary_actions(actions);
    }

    fn tick(&mut self) {
        let now = now_ms();
        match &mut self.state {
            Role::Primary(p) => {
                let a = p.machine.tick(now);
                self.primary_actions(a);
            }
            Role::Secondary(s) => {
                let a = s.machine.tick(now);
                self.secondary_actions(a);
            }
            Role::Done => {}
        }
    }

    fn on_peer_message(&mut self, w: Wire) {
        let now = now_ms();
        self.redials = 0;
        match (&mut self.state, w) {
            (Role::Primary(p), Wire::Msg(m)) => {
                if let Msg::Ack { epoch, .. } = m {
                    p.inflight_bytes.retain(|e, _| *e > epoch);
                }
                let a = p.machine.receive(m, now);
                self.primary_actions(a);
            }
            (Role::Secondary(s), Wire::Msg(m)) => {
                let a = s.machine.receive(m, now);
                self.secondary_actions(a);
            }
            (Role::Secondary(s), Wire::Frame(bytes)) => match frame::decode(&bytes[1..]) {
                Ok(f) if f.workload == self.spec.name => {
                    let msg = Msg::Checkpoint {
                        generation: f.generation,
                        epoch: f.epoch,
                        full: f.delta.full,
                    };
                    let actions = s.machine.receive(msg, now);
                    let mut out = Vec::new();
                    let mut out_of_memory = None;
                    for a in actions {
                        if let SecondaryAction::Apply { epoch, full } = a {
                            // The node's budget for checkpoint images first: past it the
                            // checkpoint is refused and this secondary fails (never acks
                            // what it cannot hold).
                            let host = &f.delta.host;
                            let memory: u64 = f.delta.memories.iter().map(|m| m.size_bytes).sum();
                            let need = memory + host.len() as u64 + s.log.bytes() as u64;
                            if let Err(e) = s.budget.resize(s.reserved, need) {
                                out_of_memory = Some(e);
                                break;
                            }
                            s.reserved = need;
                            // All or nothing: the reply log is checked first, then the
                            // image (whose apply checks before it changes anything).
                            let parsed = host
                                .get(..8)
                                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                                .ok_or_else(|| "no clock".to_string())
                                .and_then(|clock| Ok((clock, ReplyLog::parse(&host[8..])?)));
                            let ok = match parsed {
                                Ok((clock, entries)) => {
                                    let applied = s.image.apply(&f.delta).is_ok();
                                    if applied {
                                        s.log.apply(entries, full);
                                        s.clock_ms = clock;
                                    }
                                    applied
                                }
                                Err(_) => false,
                            };
                            out.extend(s.machine.applied(epoch, ok, now));
                        } else {
                            out.push(a);
                        }
                    }
                    if let Some(e) = out_of_memory {
                        self.secondary_fails(e);
                        return;
                    }
                    self.secondary_actions(out);
                }
                // Corrupt, torn or for another workload: refused whole; ask for a full image.
                _ => {
                    let g = self
                        .report
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .generation;
                    self.send(Wire::Msg(Msg::NeedFull { generation: g }));
                }
            },
            _ => {}
        }
    }

    fn primary_actions(&mut self, actions: Vec<PrimaryAction>) {
        for a in actions {
            match a {
                PrimaryAction::Send(Msg::Checkpoint {
                    generation,
                    epoch,
                    full,
                }) => {
                    let Role::Primary(p) = &mut self.state else {
                        return;
                    };
                    // Epochs end only while the guest is here (see `end_epoch`).
                    let captured = match p.side.as_mut() {
                        Some(side) => capture(side, full),
                        None => Err("the guest is away (a batch runs)".to_string()),
                    };
                    let message = captured.and_then(|delta| {
                        frame_message(&Frame {
                            workload: self.spec.name.clone(),
                            generation,
                            epoch,
                            delta,
                        })
                        .map_err(|e| e.to_string())
                    });
                    match message {
                        Ok(bytes) => {
                            p.checkpoints += 1;
                            p.inflight_bytes.insert(epoch, bytes.len() as u64);
                            self.send_bytes(bytes);
                        }
                        // The secondary asks for a full image after the gap; the replies
                        // of this epoch wait (output commit) until a checkpoint is acked.
                        Err(e) => {
                            tracing::error!(workload = %self.spec.name, "capture failed: {e}")
                        }
                    }
                }
                PrimaryAction::Send(m) => self.send(Wire::Msg(m)),
                PrimaryAction::Release(ids) => {
                    let Role::Primary(p) = &mut self.state else {
                        return;
                    };
                    for id in ids {
                        if let Some((tx, resp, _)) = p.held.remove(&id) {
                            let _ = tx.send(resp);
                        }
                    }
                }
                PrimaryAction::RequestLease { from, to } => self.request_lease(from, to),
                PrimaryAction::Fence => {
                    tracing::warn!(workload = %self.spec.name, "fenced: another replica holds the lease");
                    if let Role::Primary(p) = &mut self.state {
                        for (_, (tx, _, _)) in p.held.drain() {
                            let _ = tx.send(HttpResponse::error(
                                503,
                                "unavailable",
                                "this replica was fenced; retry",
                            ));
                        }
                    }
                    self.report.lock().unwrap_or_else(|p| p.into_inner()).failed =
                        Some("fenced".into());
                    self.state = Role::Done;
                }
            }
        }
    }

    fn secondary_actions(&mut self, actions: Vec<SecondaryAction>) {
        for a in actions {
            match a {
                SecondaryAction::Send(m) => self.send(Wire::Msg(m)),
                SecondaryAction::Apply { .. } => {}
                SecondaryAction::RequestLease { from, to } => self.request_lease(from, to),
                SecondaryAction::Promote { generation, epoch } => self.promote(generation, epoch),
                SecondaryAction::Discard => {
                    tracing::warn!(workload = %self.spec.name, "secondary discarded");
                    self.report.lock().unwrap_or_else(|p| p.into_inner()).failed =
                        Some("secondary discarded".into());
                    self.state = Role::Done;
                }
            }
        }
    }

    /// The control plane's assignment changed (see [`FtReplica::assign`]).
    fn assign(&mut self, level: Level, role: ReplicaRole, peer: Option<Peer>, generation: u64) {
        if level != self.level {
            tracing::info!(workload = %self.spec.name, from = self.level.as_str(), to = level.as_str(), "level changed live");
            self.level = level;
            self.spec.level = level;
            self.policy = policy_of(&self.spec);
        }
        let ft = level == Level::Ft;
        match &mut self.state {
            Role::Primary(p) => {
                p.machine.set_policy(self.policy);
                let a = p.machine.set_commit(ft);
                self.primary_actions(a);
            }
            Role::Secondary(s) => {
                s.machine.set_promote(ft);
                // Made the active copy by the control plane: an ha restart onto this
                // standby's node, a live move's handover, or (ft) a takeover the server
                // recorded: resume from the last checkpoint applied.
                if role == ReplicaRole::Active {
                    self.activate(generation);
                }
            }
            Role::Done => {}
        }
        if peer.is_none() && self.peer.is_some() {
            // The secondary or standby was taken away (a lower level, a reservation
            // moved): on alone, nothing held, no lease asked.
            if let Role::Primary(p) = &mut self.state {
                tracing::info!(workload = %self.spec.name, "peer taken away: running alone");
                let a = p.machine.detach();
                self.primary_actions(a);
            }
            self.drop_link();
            if let Some(old) = self.dial_task.take() {
                old.abort();
            }
        }
        self.set_peer(peer, generation);
    }

    /// A live move: once the peer is in step, stop taking requests, send a last
    /// checkpoint, and when the peer has acknowledged it (every reply released), ask the
    /// server to make the peer active. Given up after 5 s without the ack, or when the
    /// control plane calls the move off before the server was asked.
    fn handover_step(&mut self) {
        let Role::Primary(p) = &mut self.state else {
            return;
        };
        if self.moved {
            return;
        }
        match self.handing {
            None if self.handover
                && self.link.is_some()
                && p.side.is_some()
                && p.machine.mode() == PrimaryMode::Protected
                && p.machine.inflight() == 0 =>
            {
                let actions = p.machine.end_epoch(now_ms());
                let last = actions.iter().find_map(|a| match a {
                    PrimaryAction::Send(Msg::Checkpoint { epoch, .. }) => Some(*epoch),
                    _ => None,
                });
                if let Some(epoch) = last {
                    tracing::info!(workload = %self.spec.name, epoch, "handing over: last checkpoint");
                    self.handing = Some((epoch, Instant::now(), false));
                }
                self.primary_actions(actions);
            }
            Some((_, _, false)) if !self.handover => {
                tracing::info!(workload = %self.spec.name, "handover called off");
                self.handing = None;
            }
            Some((epoch, since, false)) => {
                if p.machine.acked().is_some_and(|a| a >= epoch) && p.held.is_empty() {
                    let generation = p.machine.generation();
                    self.handing = Some((epoch, since, true));
                    self.ask_handover(generation);
                } else if since.elapsed() > Duration::from_secs(5) {
                    tracing::warn!(workload = %self.spec.name, "handover: the last checkpoint was not acknowledged in 5 s; serving on");
                    self.handing = None;
                }
            }
            _ => {}
        }
    }

    fn ask_handover(&self, from: u64) {
        let (client, tx, name) = (
            self.ctx.client.clone(),
            self.tx.clone(),
            self.spec.name.clone(),
        );
        self.main.spawn(async move {
            let path = format!("/v1/agent/pairs/{name}/handover");
            let body = avail_model::agent::HandoverRequest { from };
            // Some(answer), or None when it is not known (the server may have made the
            // peer active): then this copy keeps turning requests away and asks again.
            let answer = match client.post::<_, LeaseReply>(&path, &body).await {
                Ok(r) => Some(r.granted),
                Err(avail_client::ClientError::Api {
                    status: 400 | 403 | 404 | 409,
                    ..
                }) => Some(false),
                Err(e) => {
                    tracing::warn!(workload = %name, "handover: {e}; asking again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    None
                }
            };
            let _ = tx.send(Cmd::Handover(answer)).await;
        });
    }

    fn handover_answer(&mut self, answer: Option<bool>) {
        match answer {
            Some(true) => {
                tracing::info!(workload = %self.spec.name, "handed over: the peer is the active copy");
                self.moved = true;
                self.handing = None;
            }
            Some(false) => {
                tracing::warn!(workload = %self.spec.name, "handover refused: serving on");
                self.handing = None;
            }
            // Unknown: still handing over, not asked; the next step asks again.
            None => {
                if let Some((epoch, since, _)) = self.handing {
                    self.handing = Some((epoch, since, false));
                }
            }
        }
    }

    /// A standby made active (level `ha`: its primary's node is down and the control
    /// plane restarted the workload here): the guest resumes from the last checkpoint
    /// it applied, or starts fresh when it never had one.
    fn activate(&mut self, generation: u64) {
        let Role::Secondary(mut s) = std::mem::replace(&mut self.state, Role::Done) else {
            return;
        };
        let epoch = s.machine.applied_epoch();
        let guest = match epoch {
            Some(_) => self.module.restored(&s.image, s.clock_ms),
            None => self.module.fresh(),
        };
        match guest {
            Ok(guest) => {
                match epoch {
                    Some(e) => {
                        tracing::info!(workload = %self.spec.name, generation, epoch = e, "standby made active: resuming from its last checkpoint")
                    }
                    None => {
                        tracing::warn!(workload = %self.spec.name, generation, "standby made active without a checkpoint: starting fresh")
                    }
                }
                let mut machine = Primary::promoted(self.cfg, self.policy, generation, now_ms());
                machine.set_commit(self.level == Level::Ft);
                let log = std::mem::take(&mut s.log);
                let p = PrimaryState::new(machine, GuestSide { guest, log });
                self.state = Role::Primary(Box::new(p));
                self.drop_link();
                let mut r = self.report.lock().unwrap_or_else(|p| p.into_inner());
                r.promoted = true;
                r.role = ReplicaRole::Active;
                r.generation = generation;
                r.resumed_epoch = epoch;
            }
            Err(e) => {
                // Reported as the active copy that failed: the control plane restarts it
                // on another node.
                tracing::error!(workload = %self.spec.name, "activation failed: {e}");
                let mut r = self.report.lock().unwrap_or_else(|p| p.into_inner());
                r.role = ReplicaRole::Active;
                r.generation = generation;
                r.failed = Some(format!("activation failed: {e}"));
            }
        }
    }

    fn promote(&mut self, generation: u64, epoch: u64) {
        let Role::Secondary(mut s) = std::mem::replace(&mut self.state, Role::Done) else {
            return;
        };
        match self.module.restored(&s.image, s.clock_ms) {
            Ok(guest) => {
                tracing::info!(workload = %self.spec.name, generation, epoch, "promoted: resuming from the last applied checkpoint");
                let mut machine = Primary::promoted(self.cfg, self.policy, generation, now_ms());
                machine.set_commit(self.level == Level::Ft);
                let log = std::mem::take(&mut s.log);
                let p = PrimaryState::new(machine, GuestSide { guest, log });
                self.state = Role::Primary(Box::new(p));
                self.drop_link();
                // The control plane may already have named the next secondary (for the
                // new generation) while this replica was still promoting.
                let next = self.peer.take().filter(|_| self.peer_gen == generation);
                self.set_peer(next, generation);
                let mut r = self.report.lock().unwrap_or_else(|p| p.into_inner());
                r.promoted = true;
                r.role = ReplicaRole::Active;
                r.generation = generation;
            }
            Err(e) => {
                tracing::error!(workload = %self.spec.name, "promotion failed: {e}");
                self.report.lock().unwrap_or_else(|p| p.into_inner()).failed =
                    Some(format!("promotion failed: {e}"));
            }
        }
    }

    /// This secondary cannot go on: stop, and tell the control plane at once (with the
    /// reason) rather than with the next heartbeat.
    fn secondary_fails(&mut self, reason: String) {
        tracing::error!(workload = %self.spec.name, "secondary fails: {reason}");
        let generation = {
            let mut r = self.report.lock().unwrap_or_else(|p| p.into_inner());
            r.failed = Some(reason.clone());
            r.generation
        };
        self.state = Role::Done;
        let (client, name) = (self.ctx.client.clone(), self.spec.name.clone());
        self.main.spawn(async move {
            let path = format!("/v1/agent/pairs/{name}/failed");
            let body = avail_model::agent::SecondaryFailure { generation, reason };
            for _ in 0..10 {
                match client.post::<_, serde_json::Value>(&path, &body).await {
                    Ok(_) | Err(avail_client::ClientError::Api { .. }) => return,
                    Err(e) => {
                        tracing::warn!(workload = %name, "reporting the failure: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
    }

    fn request_lease(&self, from: u64, to: u64) {
        tracing::info!(workload = %self.spec.name, from, to, "asking for the pair lease");
        let (client, tx, name) = (
            self.ctx.client.clone(),
            self.tx.clone(),
            self.spec.name.clone(),
        );
        self.main.spawn(async move {
            let path = format!("/v1/agent/pairs/{name}/lease");
            // The store decides; while it cannot be reached, the answer waits (a
            // failover needs the lease: consistency over availability).
            let granted = loop {
                match client
                    .post::<_, LeaseReply>(&path, &LeaseRequest { from, to })
                    .await
                {
                    Ok(r) => break r.granted,
                    // A definite no. Anything else (the store unavailable, a timeout after
                    // the server may have granted) is asked again: the server answers a
                    // repeated grant as granted.
                    Err(avail_client::ClientError::Api {
                        status: 400 | 403 | 404,
                        ..
                    }) => break false,
                    Err(e) => {
                        tracing::warn!(workload = %name, "lease request: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            let _ = tx.send(Cmd::Lease(granted)).await;
        });
    }

    fn lease(&mut self, granted: bool) {
        tracing::info!(workload = %self.spec.name, granted, "pair lease answer");
        match &mut self.state {
            Role::Primary(p) => {
                let a = p.machine.lease_result(granted);
                let generation = p.machine.generation();
                self.primary_actions(a);
                if granted {
                    // The old secondary is gone. The control plane may already have named
                    // the next one (for the new generation) before this answer came.
                    self.drop_link();
                    let next = self.peer.take().filter(|_| self.peer_gen == generation);
                    self.set_peer(next, generation);
                }
            }
            Role::Secondary(s) => {
                let a = s.machine.lease_result(granted);
                self.secondary_actions(a);
            }
            Role::Done => {}
        }
    }
}

/// An active copy's mode, as the wire contract names it.
fn primary_mode(m: PrimaryMode) -> avail_model::ReplicaMode {
    use avail_model::ReplicaMode as R;
    match m {
        PrimaryMode::Syncing => R::Syncing,
        PrimaryMode::Protected => R::Protected,
        PrimaryMode::Suspect => R::Suspect,
        PrimaryMode::Degraded => R::Degraded,
        PrimaryMode::Fenced => R::Fenced,
    }
}

/// A secondary's or standby's mode, as the wire contract names it.
fn secondary_mode(m: avail_statepoint::pair::SecondaryMode) -> avail_model::ReplicaMode {
    use avail_model::ReplicaMode as R;
    use avail_statepoint::pair::SecondaryMode as S;
    match m {
        S::Syncing => R::Syncing,
        S::Synced => R::Synced,
        S::Promoting => R::Promoting,
        S::Active => R::Active,
        S::Fenced => R::Fenced,
    }
}
