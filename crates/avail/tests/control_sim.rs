//! Seeded simulation of the control plane: three servers (a leader elected on a store
//! lease, followers relaying heartbeats), a linearizable store that can lose its
//! quorum, five nodes (agents that heartbeat, fence themselves and run `ha`
//! workloads), with crashes, pauses and network splits, in simulated milliseconds.
//!
//! It runs the control plane's own decisions: the leader's liveness verdicts
//! ([`liveness::judge`], [`liveness::verdict_change`]), a follower's answer to a relayed
//! heartbeat ([`heard_relay::answers`]), the `ha` restart plan with the level policy
//! ([`restart_plan::plan_restarts`], the scheduler, admission) and an agent's fencing
//! verdict ([`fence::peer_round`], [`fence::decide`]). The messages, timers, store and
//! leases around them are modelled here as the servers and agents do them.
//!
//! Checked on every seed:
//! - never two serving copies of a workload (a copy serves while its node runs it and
//!   its ingress would: not fenced, and in contact or shown the control plane away);
//! - the level policy's minimums hold on every node a workload is placed on;
//! - after the faults end, every workload runs once, on a live node.
//!
//! The store refuses a deposed leader's write (the term compared, as
//! [`avail_server::events::Events::commit`] does); API clients and their writes are
//! not modelled.
//!
//! What it found (each a way to two serving copies, each fixed): an isolated node took
//! "every peer that answered lost the server too" as the control plane away for all,
//! so across a network split the nodes without the leader kept serving what the leader
//! restarted on the other side; a node waking from a pause took peers that lost the
//! server to a later outage for company, although they heard it after the node could
//! have been declared down; an "away" verdict outlived a pause; and a leader deaf for
//! less than the down window, but longer than the agents' isolation window, declared
//! down nodes that had found the control plane away meanwhile. See [`fence::decide`],
//! [`fence::away_valid_for`] and `ServerConfig::blackout_after`.
//!
//! `AVAIL_SEED=<n>` runs one seed; `AVAIL_SIM_SEEDS=<n>` sets how many (default 2000).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use avail_agent::fence;
use avail_model::rng::SplitMix64 as Rng;
use avail_model::spec::{LevelMinimum, LevelPolicy};
use avail_model::{Level, NodeState, Phase, Resources, Workload, WorkloadSpec, WorkloadStatus};
use avail_sched::{ClusterView, NodeView};
use avail_server::heard_relay::{self, Delivery, Relayed};
use avail_server::liveness;
use avail_server::pending_plan;
use avail_server::restart_plan::{self, Lost};

const TICK: u64 = 10;
const HEARTBEAT: u64 = 200;
const LEADER_TTL: u64 = 2000;
const NODES: usize = 5;
const SERVERS: usize = 3;
/// Faults happen in [0, FAULTS_END); then everything heals and the sim runs on.
const FAULTS_END: u64 = 30_000;
const END: u64 = 45_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum End {
    Node(usize),
    Server(usize),
    Store,
}

struct Server {
    up: bool,
    paused_until: u64,
    /// Leading since `term`, last renewal sent at.
    leading: Option<(u64, u64)>,
    live: HashMap<usize, u64>,
    grace_from: u64,
    last_any: u64,
    /// The leader as this server last read it from the store: (server, term).
    known_leader: Option<(usize, u64)>,
}

struct Node {
    up: bool,
    paused_until: u64,
    /// Send time of the last answered heartbeat.
    contact: u64,
    /// Send time of the last heartbeat a leader heard.
    judged: u64,
    next_beat: u64,
    next_fence_round: u64,
    server: usize,
    fenced: bool,
    /// Until when the peers' "away" verdict holds.
    away_until: u64,
    unanswered: u32,
    /// Workloads it runs, with their incarnation.
    running: BTreeMap<String, u64>,
}

struct Store {
    rev: u64,
    /// (server, term, lease expiry)
    leader: Option<(usize, u64, u64)>,
    verdicts: HashMap<usize, NodeState>,
    workloads: BTreeMap<String, (Workload, u64)>,
    placement_rev: u64,
}

struct Sim {
    seed: u64,
    rng: Rng,
    now: u64,
    cfg: avail_server::ServerConfig,
    fence_window: u64,
    policy: LevelPolicy,
    tags: Vec<BTreeMap<String, String>>,
    servers: Vec<Server>,
    nodes: Vec<Node>,
    store: Store,
    /// Store unreachable for everyone (quorum lost) until then.
    quorum_lost_until: u64,
    /// Cut links: (a, b, until).
    cuts: Vec<(End, End, u64)>,
    log: Vec<String>,
}

fn node_name(i: usize) -> String {
    format!("n{i}")
}

fn index(name: &str) -> usize {
    name[1..].parse().unwrap()
}

fn workload(name: &str, node: usize) -> Workload {
    let spec = WorkloadSpec::parse(&format!(
        r#"{{"name":"{name}","driver":"process","artifact":"sh","level":"ha","resources":{{"memory_mib":100,"cpu_millis":100}}}}"#
    ))
    .unwrap();
    Workload {
        uid: name.into(),
        spec,
        status: WorkloadStatus {
            phase: Phase::Running,
            node: Some(node_name(node)),
            incarnation: 1,
            ..WorkloadStatus::default()
        },
        created_ms: 0,
    }
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let cfg = avail_server::ServerConfig::new("sim".into(), "127.0.0.1:0".parse().unwrap());
        let fence_window = avail_model::node::isolation_window(cfg.down_after).as_millis() as u64;
        // Nodes 3 and 4 are gold: the policy wants ft there, which a process cannot
        // run at, so no process may be placed there.
        let tags = (0..NODES)
            .map(|i| {
                let mut t = BTreeMap::new();
                t.insert("zone".into(), if i % 2 == 0 { "a" } else { "b" }.into());
                if i >= 3 {
                    t.insert("tier".into(), "gold".into());
                }
                t
            })
            .collect();
        let policy = LevelPolicy {
            default: Level::None,
            minimums: vec![LevelMinimum {
                tag: "tier=gold".into(),
                level: Level::Ft,
            }],
        };
        let mut workloads = BTreeMap::new();
        for (k, node) in [0usize, 1, 2, 0].into_iter().enumerate() {
            let name = format!("w{k}");
            workloads.insert(name.clone(), (workload(&name, node), 1));
        }
        let nodes = (0..NODES)
            .map(|i| Node {
                up: true,
                paused_until: 0,
                contact: 0,
                judged: 0,
                next_beat: (i as u64 * 37) % HEARTBEAT,
                next_fence_round: 0,
                server: i % SERVERS,
                fenced: false,
                away_until: 0,
                unanswered: 0,
                running: workloads
                    .iter()
                    .filter(|(_, (w, _))| w.status.node.as_deref() == Some(&node_name(i)))
                    .map(|(n, _)| (n.clone(), 1))
                    .collect(),
            })
            .collect();
        let servers = (0..SERVERS)
            .map(|_| Server {
                up: true,
                paused_until: 0,
                leading: None,
                live: HashMap::new(),
                grace_from: 0,
                last_any: 0,
                known_leader: None,
            })
            .collect();
        Sim {
            seed,
            rng: Rng(seed),
            now: 0,
            cfg,
            fence_window,
            policy,
            tags,
            servers,
            nodes,
            store: Store {
                rev: 1,
                leader: None,
                verdicts: HashMap::new(),
                workloads,
                placement_rev: 1,
            },
            quorum_lost_until: 0,
            cuts: vec![],
            log: vec![],
        }
    }

    fn note(&mut self, what: String) {
        self.log.push(format!("{:>6} {what}", self.now));
    }

    fn cut(&self, a: End, b: End) -> bool {
        self.cuts.iter().any(|(x, y, until)| {
            *until > self.now && ((*x == a && *y == b) || (*x == b && *y == a))
        })
    }

    fn server_responsive(&self, s: usize) -> bool {
        self.servers[s].up && self.servers[s].paused_until <= self.now
    }

    fn node_responsive(&self, n: usize) -> bool {
        self.nodes[n].up && self.nodes[n].paused_until <= self.now
    }

    /// Whether server `s` reaches the store now.
    fn store_reachable(&self, s: usize) -> bool {
        self.quorum_lost_until <= self.now && !self.cut(End::Server(s), End::Store)
    }

    fn leads(&self, s: usize) -> bool {
        self.servers[s].leading.is_some()
    }

    // ----- servers -----

    fn server_tick(&mut self, s: usize) {
        if !self.server_responsive(s) {
            return;
        }
        let reach = self.store_reachable(s);
        // The store's lease expiry.
        if reach
            && let Some((_, _, expiry)) = self.store.leader
            && expiry <= self.now
        {
            self.store.leader = None;
        }
        if reach {
            self.servers[s].known_leader = self.store.leader.map(|(l, t, _)| (l, t));
        }
        match self.servers[s].leading {
            Some((term, renewed)) => {
                let still = self
                    .store
                    .leader
                    .is_some_and(|(l, t, _)| l == s && t == term);
                if (reach && !still) || self.now.saturating_sub(renewed) > LEADER_TTL * 2 / 3 {
                    self.servers[s].leading = None;
                    self.note(format!("s{s} steps down from term {term}"));
                    return;
                }
                if reach && self.now.saturating_sub(renewed) >= LEADER_TTL / 3 {
                    self.store.leader = Some((s, term, self.now + LEADER_TTL));
                    self.servers[s].leading = Some((term, self.now));
                }
                if self.now.is_multiple_of(50) {
                    self.decide(s, term);
                }
                if self.now.is_multiple_of(1000) {
                    self.place_pending(s, term);
                }
            }
            None => {
                if reach && self.store.leader.is_none() {
                    self.store.rev += 1;
                    let term = self.store.rev;
                    self.store.leader = Some((s, term, self.now + LEADER_TTL));
                    let srv = &mut self.servers[s];
                    srv.leading = Some((term, self.now));
                    // A new term: the grace begins.
                    srv.grace_from = self.now;
                    srv.last_any = self.now;
                    self.note(format!("s{s} leads, term {term}"));
                }
            }
        }
    }

    /// A fenced write by the leader of `term`: refused unless its term holds.
    fn fenced_write(&mut self, s: usize, term: u64) -> bool {
        if !self.store_reachable(s) {
            return false;
        }
        let holds = self
            .store
            .leader
            .is_some_and(|(l, t, _)| l == s && t == term);
        if holds {
            self.store.rev += 1;
        }
        holds
    }

    fn decide(&mut self, s: usize, term: u64) {
        let now = self.now;
        let in_grace = now.saturating_sub(self.servers[s].grace_from)
            < self.cfg.startup_grace.as_millis() as u64;
        let blackout = now.saturating_sub(self.servers[s].last_any)
            > self.cfg.blackout_after().as_millis() as u64;
        let mut states = Vec::new();
        for n in 0..NODES {
            let heard = self.servers[s].live.get(&n).map(|at| {
                (
                    Duration::from_millis(now - at),
                    *at >= self.servers[s].grace_from,
                )
            });
            let (st, unheard) = liveness::judge(heard, false, in_grace, blackout, &self.cfg);
            if let Some(v) =
                liveness::verdict_change(st, self.store.verdicts.get(&n).copied(), unheard)
                && self.fenced_write(s, term)
            {
                self.store.verdicts.insert(n, v);
                self.note(format!("s{s} verdict n{n} {}", v.as_str()));
            }
            states.push(st);
        }
        let down: Vec<String> = (0..NODES)
            .filter(|n| states[*n] == NodeState::Down)
            .map(node_name)
            .collect();
        if down.is_empty() {
            return;
        }
        let lost: Vec<Lost> = self
            .store
            .workloads
            .values()
            .filter(|(w, _)| {
                w.spec.level == Level::Ha
                    && w.status.phase != Phase::Failed
                    && w.status.node.as_ref().is_some_and(|n| down.contains(n))
            })
            .map(|(w, rev)| Lost {
                workload: w.clone(),
                mod_rev: *rev,
            })
            .collect();
        if lost.is_empty() {
            return;
        }
        let sched = self.sched(&states);
        let tags = self.tags.clone();
        let tags_of = |n: &str| tags[index(n)].clone();
        let seed = self.rng.next_u64();
        let plan =
            restart_plan::plan_restarts(sched, lost, &down, "down", &self.policy, &tags_of, seed);
        // One transaction, compared on every workload.
        let fresh = plan
            .iter()
            .all(|r| self.store.workloads[&r.workload.spec.name].1 == r.mod_rev);
        if !fresh || !self.fenced_write(s, term) {
            return;
        }
        let rev = self.store.rev;
        self.store.placement_rev = rev;
        for r in plan {
            self.note(format!(
                "s{s} restarts {} from {} on {:?} (incarnation {})",
                r.workload.spec.name, r.lost, r.node, r.workload.status.incarnation
            ));
            self.store
                .workloads
                .insert(r.workload.spec.name.clone(), (r.workload, rev));
        }
    }

    /// The pending pass (every second): each pending workload placed where the
    /// scheduler puts it now, one fenced write each.
    fn place_pending(&mut self, s: usize, term: u64) {
        let states: Vec<NodeState> = (0..NODES)
            .map(|n| match self.store.verdicts.get(&n) {
                Some(st) => *st,
                None => NodeState::Suspect,
            })
            .collect();
        let pending: Vec<String> = self
            .store
            .workloads
            .values()
            .filter(|(w, _)| w.status.phase == Phase::Pending)
            .map(|(w, _)| w.spec.name.clone())
            .collect();
        for name in pending {
            let sched = self.sched(&states);
            let w = self.store.workloads[&name].0.clone();
            let tags = self.tags.clone();
            let tags_of = |n: &str| tags[index(n)].clone();
            let seed = self.rng.next_u64();
            if let pending_plan::Pending::Placed { workload, node, .. } =
                pending_plan::place_pending(&sched, &w, &self.policy, &tags_of, seed)
                && self.fenced_write(s, term)
            {
                self.note(format!("s{s} places pending {name} on {node}"));
                let rev = self.store.rev;
                self.store.workloads.insert(name, (*workload, rev));
            }
        }
    }

    /// The scheduler's view from the store: ready nodes take work.
    fn sched(&self, states: &[NodeState]) -> ClusterView {
        let mut v = ClusterView::default();
        for (n, state) in states.iter().enumerate() {
            v.upsert(NodeView {
                name: node_name(n),
                tags: self.tags[n].clone(),
                capacity: Resources {
                    cpu_millis: 4000,
                    memory_mib: 4096,
                },
                allocated: Resources {
                    cpu_millis: 0,
                    memory_mib: 0,
                },
                workloads: 0,
                max_workloads: 110,
                schedulable: *state == NodeState::Ready,
                reserved: vec![],
            });
        }
        for (w, _) in self.store.workloads.values() {
            if let Some(n) = &w.status.node {
                v.allocate(n, w.spec.resources);
            }
        }
        v
    }

    /// Server `s` hears node `n` (its own heartbeat, or relayed).
    fn record(&mut self, s: usize, n: usize) -> NodeState {
        let now = self.now;
        let srv = &mut self.servers[s];
        if now.saturating_sub(srv.last_any) > self.cfg.blackout_after().as_millis() as u64 {
            srv.grace_from = now;
        }
        srv.last_any = now;
        srv.live.insert(n, now);
        NodeState::Ready
    }

    /// A heartbeat of node `n` to server `s`: whether it was answered with success, and
    /// then whether a leader heard it.
    fn heartbeat(&mut self, n: usize, s: usize) -> Result<bool, &'static str> {
        if !self.servers[s].up {
            return Err("refused");
        }
        if self.cut(End::Node(n), End::Server(s)) || self.servers[s].paused_until > self.now {
            return Err("timeout");
        }
        if self.leads(s) {
            self.record(s, n);
            return Ok(true);
        }
        // A follower relays it to the leader it knows.
        let delivery = match self.servers[s].known_leader {
            None => Delivery::NotLeader,
            Some((l, _)) if l == s => Delivery::NotLeader,
            Some((l, _)) => {
                if !self.servers[l].up {
                    Delivery::ConnectionRefused
                } else if self.cut(End::Server(s), End::Server(l))
                    || self.servers[l].paused_until > self.now
                {
                    Delivery::Failed("timeout".into())
                } else if !self.leads(l) {
                    Delivery::NotLeader
                } else {
                    Delivery::Answered(vec![Some(self.record(l, n))])
                }
            }
        };
        let held = match delivery {
            Delivery::Answered(_) | Delivery::ConnectionRefused => None,
            _ if self.store_reachable(s) => {
                Some(self.store.leader.is_some_and(|(_, _, e)| e > self.now))
            }
            _ => None,
        };
        match heard_relay::answers(1, &delivery, held).remove(0) {
            Relayed::Heard(_) => Ok(true),
            Relayed::NoLeader => Ok(false),
            Relayed::Refused(_) => Err("refused by the follower"),
        }
    }

    // ----- nodes -----

    fn node_tick(&mut self, n: usize) {
        if !self.node_responsive(n) {
            return;
        }
        if self.now >= self.nodes[n].next_beat {
            self.nodes[n].next_beat = self.now + HEARTBEAT;
            let sent = self.now;
            // The agent's client: the current server, then the next ones while a server
            // cannot be reached or says it cannot act.
            let mut answered_by = None;
            for k in 0..SERVERS {
                let s = (self.nodes[n].server + k) % SERVERS;
                match self.heartbeat(n, s) {
                    Ok(judged) => {
                        answered_by = Some((s, judged));
                        break;
                    }
                    Err("timeout") => {
                        // Waited for it: moves on next time.
                        self.nodes[n].server = (s + 1) % SERVERS;
                        break;
                    }
                    Err(_) => continue,
                }
            }
            if let Some((s, judged)) = answered_by {
                self.nodes[n].server = s;
                self.contact(n, s, sent, judged);
            }
        }
        // The fence watch: every quarter of the window while isolated.
        let isolated = self.now.saturating_sub(self.nodes[n].contact) > self.fence_window;
        if isolated && !self.nodes[n].fenced && self.now >= self.nodes[n].next_fence_round {
            self.nodes[n].next_fence_round = self.now
                + fence::round_period(Duration::from_millis(self.fence_window)).as_millis() as u64;
            self.fence_round(n);
        }
    }

    /// Node `n`'s heartbeat sent at `sent` was answered by server `s`.
    fn contact(&mut self, n: usize, s: usize, sent: u64, judged: bool) {
        // A heartbeat that left after the isolation window fences when it comes back,
        // unless the peers showed the control plane away (when it left, or now).
        let late = sent.saturating_sub(self.nodes[n].contact) > self.fence_window
            && self.nodes[n].away_until <= sent
            && self.nodes[n].away_until <= self.now;
        if late && !self.nodes[n].fenced {
            self.fence(n, "a late heartbeat");
        }
        let node = &mut self.nodes[n];
        node.contact = sent;
        if judged {
            node.judged = sent;
        }
        node.away_until = 0;
        node.unanswered = 0;
        // Its desired state, from a server whose view is fresh.
        if !self.store_reachable(s) {
            return;
        }
        let me = node_name(n);
        let assigned: BTreeMap<String, u64> = self
            .store
            .workloads
            .values()
            .filter(|(w, _)| {
                w.status.node.as_deref() == Some(&me) && w.status.phase != Phase::Pending
            })
            .map(|(w, _)| (w.spec.name.clone(), w.status.incarnation))
            .collect();
        let node = &mut self.nodes[n];
        node.fenced = false;
        node.running = assigned;
    }

    fn fence_round(&mut self, n: usize) {
        let window = Duration::from_millis(self.fence_window);
        let ages: Vec<Option<u64>> = (0..NODES)
            .filter(|p| *p != n)
            .map(|p| {
                (self.node_responsive(p) && !self.cut(End::Node(n), End::Node(p)))
                    .then(|| self.now.saturating_sub(self.nodes[p].judged))
            })
            .collect();
        let mine = Duration::from_millis(self.now.saturating_sub(self.nodes[n].judged));
        let margin = (self.cfg.down_after - self.cfg.suspect_after)
            .saturating_sub(Duration::from_millis(50));
        let round = fence::peer_round(&ages, window, mine, margin);
        let reached = round.heard_by_peer.then(|| {
            (0..SERVERS)
                .any(|s| self.server_responsive(s) && !self.cut(End::Node(n), End::Server(s)))
        });
        let Some(v) = fence::decide(round, reached, self.nodes[n].unanswered) else {
            return;
        };
        let valid = fence::away_valid_for(window).as_millis() as u64;
        self.nodes[n].away_until = if v.away { self.now + valid } else { 0 };
        self.nodes[n].unanswered = v.unanswered;
        if v.fence {
            self.fence(n, "its fence watch");
        }
    }

    fn fence(&mut self, n: usize, why: &str) {
        self.note(format!("n{n} fences ({why})"));
        let node = &mut self.nodes[n];
        node.fenced = true;
        node.running.clear();
    }

    /// Whether node `n` serves workload `w` now.
    fn serves(&self, n: usize, w: &str) -> bool {
        let node = &self.nodes[n];
        let isolated = self.now.saturating_sub(node.contact) > self.fence_window;
        self.node_responsive(n)
            && !node.fenced
            && node.running.contains_key(w)
            && (!isolated || node.away_until > self.now)
    }

    // ----- faults -----

    fn fault(&mut self) {
        let until = self.now + 500 + self.rng.next_u64() % 6000;
        match self.rng.next_u64() % 9 {
            0 => {
                let n = (self.rng.next_u64() % NODES as u64) as usize;
                if self.nodes[n].up {
                    self.note(format!("n{n} crashes"));
                    self.nodes[n].up = false;
                    self.nodes[n].running.clear();
                    self.nodes[n].paused_until = until; // restarts then
                }
            }
            1 => {
                let n = (self.rng.next_u64() % NODES as u64) as usize;
                self.note(format!("n{n} paused until {until}"));
                self.nodes[n].paused_until = until;
            }
            2 => {
                let s = (self.rng.next_u64() % SERVERS as u64) as usize;
                if self.servers[s].up {
                    self.note(format!("s{s} crashes"));
                    let srv = &mut self.servers[s];
                    srv.up = false;
                    srv.leading = None;
                    srv.live.clear();
                    srv.paused_until = until;
                }
            }
            3 => {
                let s = (self.rng.next_u64() % SERVERS as u64) as usize;
                self.note(format!("s{s} paused until {until}"));
                self.servers[s].paused_until = until;
            }
            4 => {
                // A network split: some nodes with some servers, against the rest.
                let mask = self.rng.next_u64();
                let side = |e: End| match e {
                    End::Node(i) => mask >> i & 1 == 1,
                    End::Server(i) => mask >> (8 + i) & 1 == 1,
                    End::Store => mask >> 16 & 1 == 1,
                };
                let ends: Vec<End> = (0..NODES)
                    .map(End::Node)
                    .chain((0..SERVERS).map(End::Server))
                    .chain([End::Store])
                    .collect();
                self.note(format!("split {mask:#x} until {until}"));
                for (i, a) in ends.iter().enumerate() {
                    for b in &ends[i + 1..] {
                        if side(*a) != side(*b) {
                            self.cuts.push((*a, *b, until));
                        }
                    }
                }
            }
            5 => {
                let n = (self.rng.next_u64() % NODES as u64) as usize;
                self.note(format!("n{n} cut from the servers until {until}"));
                for s in 0..SERVERS {
                    self.cuts.push((End::Node(n), End::Server(s), until));
                }
            }
            6 => {
                let s = (self.rng.next_u64() % SERVERS as u64) as usize;
                self.note(format!("s{s} cut from the store until {until}"));
                self.cuts.push((End::Server(s), End::Store, until));
            }
            7 => {
                self.note(format!("store quorum lost until {until}"));
                self.quorum_lost_until = until;
            }
            _ => {
                let a = (self.rng.next_u64() % SERVERS as u64) as usize;
                let b = (a + 1) % SERVERS;
                self.note(format!("s{a} cut from s{b} until {until}"));
                self.cuts.push((End::Server(a), End::Server(b), until));
            }
        }
    }

    fn heal(&mut self) {
        for n in 0..NODES {
            if !self.nodes[n].up && self.nodes[n].paused_until <= self.now {
                self.note(format!("n{n} restarts"));
                let node = &mut self.nodes[n];
                node.up = true;
                node.fenced = false;
                node.contact = self.now;
                node.judged = self.now;
            }
        }
        for s in 0..SERVERS {
            if !self.servers[s].up && self.servers[s].paused_until <= self.now {
                self.note(format!("s{s} restarts"));
                self.servers[s].up = true;
            }
        }
    }

    // ----- checks -----

    fn check(&self) {
        for name in self.store.workloads.keys() {
            let serving: Vec<usize> = (0..NODES).filter(|n| self.serves(*n, name)).collect();
            assert!(
                serving.len() <= 1,
                "{name} served by {serving:?} at {}\n{}",
                self.now,
                self.trail()
            );
        }
        for (w, _) in self.store.workloads.values() {
            if let Some(n) = &w.status.node
                && let Some((min, tag)) = self.policy.minimum_for(&self.tags[index(n)])
            {
                assert!(
                    w.spec.level.rank() >= min.rank(),
                    "{} at {} on {n}, whose {tag} wants {}\n{}",
                    w.spec.name,
                    w.spec.level.as_str(),
                    min.as_str(),
                    self.trail()
                );
            }
        }
    }

    fn check_end(&self) {
        for (w, _) in self.store.workloads.values() {
            let name = &w.spec.name;
            let serving: Vec<usize> = (0..NODES).filter(|n| self.serves(*n, name)).collect();
            assert_eq!(
                serving.len(),
                1,
                "{name} ({:?}) served by {serving:?} at the end\n{}",
                w.status,
                self.trail()
            );
        }
    }

    fn trail(&self) -> String {
        let start = self.log.len().saturating_sub(60);
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                format!(
                    "n{i}: up {} paused_until {} contact {} fenced {} away_until {} running {:?}",
                    n.up, n.paused_until, n.contact, n.fenced, n.away_until, n.running
                )
            })
            .collect();
        format!(
            "seed {}; nodes:\n{}\nlast events:\n{}",
            self.seed,
            nodes.join("\n"),
            self.log[start..].join("\n")
        )
    }

    fn run(&mut self) {
        let faults = 2 + self.rng.next_u64() % 6;
        let mut at: Vec<u64> = (0..faults)
            .map(|_| self.rng.next_u64() % (FAULTS_END - 8000))
            .collect();
        at.sort_unstable();
        while self.now < END {
            while at.first().is_some_and(|t| *t <= self.now) {
                at.remove(0);
                self.fault();
            }
            if self.now == FAULTS_END {
                // Everything heals: links, pauses, the store; crashed ones restart.
                self.cuts.clear();
                self.quorum_lost_until = 0;
                for n in &mut self.nodes {
                    n.paused_until = n.paused_until.min(self.now);
                }
                for s in &mut self.servers {
                    s.paused_until = s.paused_until.min(self.now);
                }
            }
            self.heal();
            for s in 0..SERVERS {
                self.server_tick(s);
            }
            for n in 0..NODES {
                self.node_tick(n);
            }
            self.check();
            self.now += TICK;
        }
        self.check_end();
    }
}

#[test]
fn the_control_plane_keeps_one_copy_of_each_workload_through_faults() {
    let seeds: Vec<u64> = match std::env::var("AVAIL_SEED") {
        Ok(s) => vec![s.parse().expect("AVAIL_SEED is a number")],
        Err(_) => {
            let n = std::env::var("AVAIL_SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(2000);
            (0..n).collect()
        }
    };
    for seed in seeds {
        Sim::new(seed).run();
    }
}

/// The restart plan applies the level policy: an `ha` wasm workload restarted onto a
/// node whose tag sets a minimum of `ft` is raised to it, and a process (which cannot
/// run at `ft`) is kept off such nodes, waiting pending when nothing else can take it.
#[test]
fn restarts_apply_the_level_policy_minimum() {
    let sim = Sim::new(0);
    let mut states = vec![NodeState::Down; NODES];
    states[3] = NodeState::Ready;
    let sched = sim.sched(&states);
    let tags = sim.tags.clone();
    let tags_of = |n: &str| tags[index(n)].clone();
    let mut wasm = workload("wasm", 0);
    wasm.spec.driver = avail_model::DriverKind::Wasm;
    wasm.spec.artifact = format!("sha256:{}", "ab".repeat(32));
    let lost = vec![
        Lost {
            workload: wasm,
            mod_rev: 1,
        },
        Lost {
            workload: workload("proc", 0),
            mod_rev: 1,
        },
    ];
    let down = vec![node_name(0)];
    let plan = restart_plan::plan_restarts(sched, lost, &down, "down", &sim.policy, &tags_of, 7);
    assert_eq!(plan[0].node.as_deref(), Some("n3"), "{}", plan[0].what);
    assert_eq!(plan[0].workload.spec.level, Level::Ft, "{:?}", plan[0].what);
    assert!(
        plan[0]
            .message(Some(12))
            .ends_with(", planned in 12 us; level ft required on tier=gold"),
        "{}",
        plan[0].message(Some(12))
    );
    assert_eq!(plan[1].node, None, "{}", plan[1].what);
    assert_eq!(plan[1].workload.status.phase, Phase::Pending);
    assert!(
        plan[1].what.contains("kept off nodes with tier=gold"),
        "{}",
        plan[1].what
    );
}
