//! Seeded simulation of the pair protocol: three hosts (primary, secondary, spare), a
//! lossy, delaying, reordering network with partitions, host crashes (up to two, so a
//! workload must survive two successive host deaths with a resync in between), and a
//! linearizable store holding the pair lease. The guest is an append-only log; a
//! client's output is (request id, position in the log).
//!
//! Checked on every seed:
//! - output commit: an output is released only after a checkpoint of its epoch was
//!   acknowledged at its generation, or while its releaser holds the lease of a newer
//!   generation;
//! - at most one active replica per generation;
//! - nothing a client saw is lost: at the end, the active replica's log holds every
//!   released output at the position the client was told.
//!
//! `AVAIL_SEED=<n>` runs one seed; `AVAIL_SIM_SEEDS=<n>` sets how many (default 2000).

use std::collections::{BTreeMap, BTreeSet};

use avail_statepoint::pair::{
    Epoch, Generation, LossPolicy, Msg, OutputId, PairConfig, Primary, PrimaryAction, PrimaryMode,
    Secondary, SecondaryAction,
};
use avail_statepoint::rng::SplitMix64 as Rng;

enum Role {
    Idle,
    Primary(Primary),
    Secondary(Secondary),
}

struct Node {
    alive: bool,
    role: Role,
    /// The primary's running guest state.
    live: Vec<u64>,
    /// Primary: the state captured at the end of each epoch (what its checkpoint carries).
    captured: BTreeMap<Epoch, Vec<u64>>,
    /// Secondary: the applied image.
    image: Option<(Epoch, Vec<u64>)>,
    /// Secondary: a frame being applied.
    applying: Option<(Epoch, Vec<u64>)>,
    /// Primary: outputs held, with the generation and epoch they were produced in.
    outputs: BTreeMap<OutputId, (u64, usize, Generation, Epoch)>,
}

impl Node {
    fn new() -> Node {
        Node {
            alive: true,
            role: Role::Idle,
            live: vec![],
            captured: BTreeMap::new(),
            image: None,
            applying: None,
            outputs: BTreeMap::new(),
        }
    }
}

struct Packet {
    at: u64,
    from: usize,
    to: usize,
    msg: Msg,
    state: Option<Vec<u64>>,
}

struct Sim {
    seed: u64,
    rng: Rng,
    cfg: PairConfig,
    policy: LossPolicy,
    now: u64,
    nodes: Vec<Node>,
    net: Vec<Packet>,
    /// Cut links (both directions): (a, b, from, until).
    cuts: Vec<(usize, usize, u64, u64)>,
    loss_percent: u64,
    max_delay: u64,
    /// The store: lease generation and holder.
    lease: (Generation, usize),
    /// Lease answers in flight: (at, node, granted).
    lease_answers: Vec<(u64, usize, bool)>,
    /// Highest epoch a secondary has acknowledged, per generation.
    acks_sent: BTreeMap<Generation, Epoch>,
    /// Which nodes acted as primary in each generation.
    active: BTreeMap<Generation, BTreeSet<usize>>,
    released: Vec<(u64, usize)>,
    next_request: u64,
    next_output: OutputId,
    failovers: u32,
    crashes: u64,
    /// A host died while the pair was not fully protected (a synced secondary
    /// following a protected primary): the workload may be lost then.
    unprotected_crash: bool,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let policy = if rng.chance(50) {
            LossPolicy::Hold
        } else {
            LossPolicy::Release
        };
        let cfg = PairConfig {
            heartbeat_ms: 20,
            failure_ms: 100 + rng.below(100),
            max_inflight: 1 + rng.below(8) as usize,
            max_held: 10_000,
            attach_grace_ms: 150 + rng.below(300),
        };
        let mut nodes: Vec<Node> = (0..3).map(|_| Node::new()).collect();
        nodes[0].role = Role::Primary(Primary::new(cfg, policy, 1, 0));
        nodes[1].role = Role::Secondary(Secondary::new(cfg, 1, 0));
        let loss_percent = rng.below(6);
        let max_delay = 1 + rng.below(30);
        let mut active = BTreeMap::new();
        active.insert(1, BTreeSet::from([0]));
        Sim {
            seed,
            rng,
            cfg,
            policy,
            now: 0,
            nodes,
            net: vec![],
            cuts: vec![],
            loss_percent,
            max_delay,
            lease: (1, 0),
            lease_answers: vec![],
            acks_sent: BTreeMap::new(),
            active,
            released: vec![],
            next_request: 1,
            next_output: 1,
            failovers: 0,
            crashes: 0,
            unprotected_crash: false,
        }
    }

    fn trace(&self, what: String) {
        if std::env::var_os("AVAIL_SIM_TRACE").is_some() {
            eprintln!("[{:>5} ms] {what}", self.now);
        }
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "seed {} (AVAIL_SEED={}) at {} ms: {what}",
            self.seed, self.seed, self.now
        );
    }

    fn peer_of(&self, n: usize, want_secondary: bool) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| {
            i != n
                && match &self.nodes[i].role {
                    Role::Secondary(_) => want_secondary,
                    Role::Primary(_) => !want_secondary,
                    Role::Idle => false,
                }
        })
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg, state: Option<Vec<u64>>) {
        if self.rng.chance(self.loss_percent) {
            return;
        }
        let at = self.now + 1 + self.rng.below(self.max_delay);
        self.net.push(Packet {
            at,
            from,
            to,
            msg,
            state,
        });
    }

    fn primary_actions(&mut self, n: usize, actions: Vec<PrimaryAction>) {
        for a in actions {
            match a {
                PrimaryAction::Send(msg) => {
                    let state = match msg {
                        Msg::Checkpoint { epoch, .. } => {
                            let s = self.nodes[n].live.clone();
                            self.nodes[n].captured.insert(epoch, s.clone());
                            Some(s)
                        }
                        _ => None,
                    };
                    if let Some(to) = self.peer_of(n, true) {
                        self.send(n, to, msg, state);
                    }
                }
                PrimaryAction::Release(ids) => {
                    for id in ids {
                        let Some((req, pos, generation, epoch)) = self.nodes[n].outputs.remove(&id)
                        else {
                            self.fail(format!("node {n} released unknown output {id}"));
                        };
                        // The releaser's generation now (epochs go on across a
                        // generation change on the same node).
                        let (current, mode) = match &self.nodes[n].role {
                            Role::Primary(p) => (p.generation(), p.mode()),
                            _ => self.fail(format!("node {n} released while not primary")),
                        };
                        let acked = self.acks_sent.get(&current).is_some_and(|a| *a >= epoch);
                        let unprotected = self.policy == LossPolicy::Release
                            && mode == PrimaryMode::Degraded
                            && self.lease == (current, n);
                        if !acked && !unprotected {
                            self.fail(format!(
                                "node {n} (gen {current}, {mode:?}) released output {id} of gen {generation} epoch {epoch} without an ack (acks {:?}, lease {:?})",
                                self.acks_sent, self.lease
                            ));
                        }
                        self.released.push((req, pos));
                    }
                }
                PrimaryAction::RequestLease { from, to } => self.request_lease(n, from, to),
                PrimaryAction::Fence => {
                    self.trace(format!("node {n} fenced"));
                    self.nodes[n].role = Role::Idle;
                    self.nodes[n].outputs.clear();
                }
            }
        }
    }

    fn request_lease(&mut self, n: usize, from: Generation, to: Generation) {
        // The store answers after a delay; the compare-and-swap happens now.
        let granted = self.lease.0 == from;
        self.trace(format!("node {n} asks lease {from}->{to}: {granted}"));
        if granted {
            self.lease = (to, n);
        }
        let at = self.now + 1 + self.rng.below(10);
        self.lease_answers.push((at, n, granted));
    }

    fn secondary_actions(&mut self, n: usize, actions: Vec<SecondaryAction>) {
        for a in actions {
            match a {
                SecondaryAction::Apply { epoch, .. } => {
                    // Applying takes time; a frame may be refused (corrupt) now and then.
                    let ok = !self.rng.chance(2);
                    let state = self.nodes[n].applying.take().map(|(_, s)| s);
                    if let (true, Some(s)) = (ok, state) {
                        self.nodes[n].image = Some((epoch, s));
                    }
                    let more = match &mut self.nodes[n].role {
                        Role::Secondary(s) => s.applied(epoch, ok, self.now),
                        _ => vec![],
                    };
                    self.secondary_actions(n, more);
                }
                SecondaryAction::Send(msg) => {
                    if let Msg::Ack { generation, epoch } = msg {
                        let e = self.acks_sent.entry(generation).or_insert(0);
                        *e = (*e).max(epoch);
                        let image_epoch = self.nodes[n].image.as_ref().map(|(e, _)| *e);
                        if image_epoch != Some(epoch) {
                            self.fail(format!(
                                "node {n} acked epoch {epoch} holding image {image_epoch:?}"
                            ));
                        }
                    }
                    if let Some(to) = self.peer_of(n, false) {
                        self.send(n, to, msg, None);
                    }
                }
                SecondaryAction::RequestLease { from, to } => self.request_lease(n, from, to),
                SecondaryAction::Promote { generation, epoch } => {
                    let Some((e, state)) = self.nodes[n].image.clone() else {
                        self.fail(format!("node {n} promoted without an image"));
                    };
                    if e != epoch {
                        self.fail(format!(
                            "node {n} promoted from epoch {epoch}, image is {e}"
                        ));
                    }
                    let node = &mut self.nodes[n];
                    node.live = state;
                    node.captured.clear();
                    node.outputs.clear();
                    node.role = Role::Primary(Primary::promoted(
                        self.cfg,
                        self.policy,
                        generation,
                        self.now,
                    ));
                    self.failovers += 1;
                    self.trace(format!(
                        "node {n} promoted to gen {generation} from epoch {epoch}"
                    ));
                    if !self.active.entry(generation).or_default().insert(n)
                        || self.active[&generation].len() > 1
                    {
                        self.fail(format!(
                            "two active replicas in generation {generation}: {:?}",
                            self.active[&generation]
                        ));
                    }
                }
                SecondaryAction::Discard => {
                    self.nodes[n].role = Role::Idle;
                    self.nodes[n].image = None;
                }
            }
        }
    }

    /// The control plane: a primary without a secondary that holds the lease gets a new
    /// secondary on a live idle node.
    fn control_plane(&mut self) {
        let Some(p) = (0..3).find(|&i| {
            self.nodes[i].alive
                && matches!(&self.nodes[i].role, Role::Primary(pr) if pr.mode() == PrimaryMode::Degraded && self.lease == (pr.generation(), i))
        }) else {
            return;
        };
        let Some(s) = (0..3)
            .find(|&i| i != p && self.nodes[i].alive && matches!(self.nodes[i].role, Role::Idle))
        else {
            return;
        };
        let generation = self.lease.0;
        self.trace(format!(
            "control plane attaches node {s} as secondary of node {p} at gen {generation}"
        ));
        self.nodes[s] = Node::new();
        self.nodes[s].role = Role::Secondary(Secondary::new(self.cfg, generation, self.now));
        if let Role::Primary(pr) = &mut self.nodes[p].role {
            pr.attach_secondary(self.now);
        }
    }

    fn crash(&mut self, n: usize) {
        let protected = self.nodes.iter().any(|x| x.alive && matches!(&x.role, Role::Primary(p) if p.mode() == PrimaryMode::Protected))
            && self.nodes.iter().any(|x| x.alive && matches!(&x.role, Role::Secondary(s) if s.mode() == avail_statepoint::pair::SecondaryMode::Synced));
        self.unprotected_crash |= !protected;
        self.trace(format!("node {n} crashes (pair protected: {protected})"));
        let node = &mut self.nodes[n];
        node.alive = false;
        node.role = Role::Idle;
        node.live.clear();
        node.image = None;
        node.outputs.clear();
    }

    fn link_up(&self, a: usize, b: usize) -> bool {
        !self.cuts.iter().any(|&(x, y, from, until)| {
            ((x, y) == (a, b) || (x, y) == (b, a)) && (from..until).contains(&self.now)
        })
    }

    fn step(&mut self) {
        let now = self.now;
        // Deliver packets due now.
        let due: Vec<Packet> = {
            let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.net)
                .into_iter()
                .partition(|p| p.at <= now);
            self.net = rest;
            due
        };
        for p in due {
            if !self.nodes[p.to].alive || !self.link_up(p.from, p.to) {
                continue;
            }
            match &mut self.nodes[p.to].role {
                Role::Primary(pr) => {
                    let a = pr.receive(p.msg, now);
                    self.primary_actions(p.to, a);
                }
                Role::Secondary(s) => {
                    let a = s.receive(p.msg, now);
                    if matches!(a.first(), Some(SecondaryAction::Apply { .. })) {
                        let epoch = match p.msg {
                            Msg::Checkpoint { epoch, .. } => epoch,
                            _ => unreachable!(),
                        };
                        self.nodes[p.to].applying =
                            Some((epoch, p.state.clone().unwrap_or_default()));
                    }
                    self.secondary_actions(p.to, a);
                }
                Role::Idle => {}
            }
        }
        // Lease answers due now.
        let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.lease_answers)
            .into_iter()
            .partition(|(at, _, _)| *at <= now);
        self.lease_answers = rest;
        for (_, n, granted) in due {
            if !self.nodes[n].alive {
                continue;
            }
            match &mut self.nodes[n].role {
                Role::Primary(pr) => {
                    let a = pr.lease_result(granted);
                    if granted {
                        let g = pr.generation();
                        if !self.active.entry(g).or_default().insert(n) || self.active[&g].len() > 1
                        {
                            self.fail(format!(
                                "two active replicas in generation {g}: {:?}",
                                self.active[&g]
                            ));
                        }
                    }
                    self.primary_actions(n, a);
                }
                Role::Secondary(s) => {
                    let a = s.lease_result(granted);
                    self.secondary_actions(n, a);
                }
                Role::Idle => {}
            }
        }
        for n in 0..3 {
            if !self.nodes[n].alive {
                continue;
            }
            // The client: a request reaches whoever serves as primary.
            let serve = matches!(&self.nodes[n].role, Role::Primary(p) if p.accepting())
                && self.rng.chance(30);
            if serve {
                let req = self.next_request;
                self.next_request += 1;
                let id = self.next_output;
                self.next_output += 1;
                let node = &mut self.nodes[n];
                node.live.push(req);
                let pos = node.live.len() - 1;
                let Role::Primary(p) = &mut node.role else {
                    unreachable!()
                };
                node.outputs
                    .insert(id, (req, pos, p.generation(), p.epoch()));
                let a = p.output(id);
                self.primary_actions(n, a);
            }
            // Epoch timer (10 ms) and ticks.
            let a = match &mut self.nodes[n].role {
                Role::Primary(p) => {
                    let mut a = p.tick(now);
                    if now.is_multiple_of(10) {
                        a.extend(p.end_epoch(now));
                    }
                    Some(a)
                }
                _ => None,
            };
            if let Some(a) = a {
                self.primary_actions(n, a);
            }
            if let Role::Secondary(s) = &mut self.nodes[n].role {
                let a = s.tick(now);
                self.secondary_actions(n, a);
            }
        }
        if now.is_multiple_of(50) {
            self.control_plane();
        }
    }

    fn run(&mut self) {
        const FAULTS_UNTIL: u64 = 2500;
        const END: u64 = 4000;
        let crashes = self.rng.below(3);
        self.crashes = crashes;
        let mut crash_at: Vec<u64> = (0..crashes)
            .map(|i| 100 + i * 1000 + self.rng.below(800))
            .collect();
        crash_at.sort();
        let cuts = self.rng.below(3);
        for _ in 0..cuts {
            let a = self.rng.below(3) as usize;
            let b = (a + 1 + self.rng.below(2) as usize) % 3;
            let from = self.rng.below(FAULTS_UNTIL);
            let len = 20 + self.rng.below(400);
            self.cuts.push((a, b, from, from + len));
        }
        while self.now < END {
            if crash_at.first().is_some_and(|t| *t == self.now) {
                crash_at.remove(0);
                // Crash whoever is primary now (the interesting case), else the secondary.
                let victim = (0..3)
                    .find(|&i| {
                        self.nodes[i].alive && matches!(self.nodes[i].role, Role::Primary(_))
                    })
                    .or_else(|| {
                        (0..3).find(|&i| {
                            self.nodes[i].alive && matches!(self.nodes[i].role, Role::Secondary(_))
                        })
                    });
                if let Some(v) = victim {
                    self.crash(v);
                }
            }
            self.step();
            self.now += 1;
        }
        self.check_end();
    }

    fn check_end(&self) {
        let current = self.lease;
        let holder = &self.nodes[current.1];
        let Role::Primary(p) = &holder.role else {
            // The lease holder is gone (both hosts of the pair died): the workload is
            // reported failed by the control plane; nothing can be checked here.
            if holder.alive {
                self.fail(format!("lease holder {} alive but not primary", current.1));
            }
            return;
        };
        if !holder.alive || p.generation() != current.0 {
            self.fail("lease holder is not the primary of the current generation".into());
        }
        for (req, pos) in &self.released {
            if holder.live.get(*pos) != Some(req) {
                self.fail(format!(
                    "released output (request {req} at position {pos}) is not in the active replica's state (len {})",
                    holder.live.len()
                ));
            }
        }
    }
}

fn seeds() -> Vec<u64> {
    if let Some(s) = std::env::var("AVAIL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![s];
    }
    let n: u64 = std::env::var("AVAIL_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    (1..=n).collect()
}

#[test]
fn pair_protocol_is_safe_under_faults() {
    let (mut failovers, mut released, mut both_lost) = (0u64, 0usize, 0u32);
    for seed in seeds() {
        let mut sim = Sim::new(seed);
        sim.run();
        failovers += u64::from(sim.failovers);
        released += sim.released.len();
        if !matches!(sim.nodes[sim.lease.1].role, Role::Primary(_)) {
            both_lost += 1;
            // One host death of a protected pair (with any partitions, loss and corrupt
            // frames) must never lose the workload: there is a synced survivor.
            assert!(
                sim.crashes >= 2 || sim.unprotected_crash,
                "seed {seed} (AVAIL_SEED={seed}): workload lost after one crash of a protected pair"
            );
        }
    }
    println!(
        "seeds: {}, failovers: {failovers}, outputs released: {released}, pairs lost to double faults: {both_lost}",
        seeds().len()
    );
    assert!(failovers > 0, "the faults must cause failovers");
    assert!(released > 0, "outputs must flow");
}
