//! avail-sched: placement as a pure function.
//!
//! [`plan`] takes a read-only [`ClusterView`], a batch of [`Request`]s and a random
//! source, and returns a [`Plan`]: a node (two for an `ft` pair) for each request, or an
//! explanation with counts per reason ("10000 nodes: 9700 filtered by constraint zone ==
//! tokyo, 280 short of memory, 20 hold another replica or share its fault domain"). It
//! never reads a clock, a socket or a file.
//!
//! Cost. The view keeps an index maintained as nodes change: per tag value a bitset of
//! nodes, and the schedulable nodes. A request's hard rules are bitset operations (one
//! AND per constraint over `nodes / 64` words); then the feasible nodes are visited
//! from a random point and the first [`SAMPLE`] with room are scored (least or most
//! allocated, plus soft affinities): the best of a random sample of feasible nodes, as
//! Nomad and kube-scheduler do at scale. Only an unplaceable request pays a full pass,
//! to explain itself exactly. Small clusters (at most [`SAMPLE`] feasible nodes) are
//! scored whole, and ties go to the name that sorts first, so there the plan is
//! deterministic whatever the random source.
//!
//! Within one batch the plan accounts for what it has already placed, so a batch never
//! over-commits a node; [`plan_all`] is the all-or-nothing form (a template).
//!
//! Admission. Besides cpu and memory, a node takes at most
//! [`NodeView::max_workloads`] replicas (its workload limit, like Kubernetes'
//! max-pods): a count kept beside the allocation, checked in the same place as the
//! capacity, so it costs nothing per filter. A request no node can take stays
//! unplaceable with the reason ("2 at their workload limit"); a node is never over.

mod bitset;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

pub use bitset::Bitset;

use avail_model::{Constraint, ConstraintOp, Resources};

/// Feasible nodes with room scored per replica, at most.
pub const SAMPLE: usize = 16;

/// A random source (the caller's: the plan is reproducible from its seed).
pub trait Rng {
    /// The next 64 random bits.
    fn next_u64(&mut self) -> u64;
}

impl Rng for avail_model::rng::SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        avail_model::rng::SplitMix64::next_u64(self)
    }
}

/// A node as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Capacity.
    pub capacity: Resources,
    /// Already allocated.
    pub allocated: Resources,
    /// Replicas placed on it (primaries and `ft` secondaries; reservations do not
    /// count): [`ClusterView::allocate`] adds one, [`ClusterView::release`] takes one.
    pub workloads: u32,
    /// The most replicas it takes (its workload limit).
    pub max_workloads: u32,
    /// Whether the node takes new work (ready, not draining).
    pub schedulable: bool,
    /// Capacity held for workloads that would restart here (HA soft reservations).
    pub reserved: Vec<Reservation>,
}

impl NodeView {
    fn free(&self) -> Resources {
        self.capacity.saturating_sub(self.allocated)
    }

    /// Replicas it may still take.
    fn slots_free(&self) -> u32 {
        self.max_workloads.saturating_sub(self.workloads)
    }
}

/// Capacity held on a node for a workload's restart (level `ha`). Soft: a request of a
/// higher priority may use it, and the plan names the reservations it displaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The workload it is held for.
    pub workload: String,
    /// That workload's priority.
    pub priority: i32,
    /// How much.
    pub resources: Resources,
}

/// The cluster, indexed: nodes in slots, a bitset of slots per tag value, the
/// schedulable slots. Changed in place as nodes come, go and change ([`ClusterView::upsert`],
/// [`ClusterView::remove`], [`ClusterView::allocate`]); every change bumps
/// [`ClusterView::revision`].
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    slots: Vec<Option<NodeView>>,
    free_slots: Vec<usize>,
    by_name: HashMap<String, usize>,
    live: Bitset,
    schedulable: Bitset,
    /// tag key -> value -> slots.
    index: HashMap<String, HashMap<String, Bitset>>,
    revision: u64,
}

impl ClusterView {
    /// An empty cluster.
    pub fn new() -> ClusterView {
        ClusterView::default()
    }

    /// A cluster of these nodes.
    pub fn from_nodes(nodes: impl IntoIterator<Item = NodeView>) -> ClusterView {
        let mut v = ClusterView::new();
        for n in nodes {
            v.upsert(n);
        }
        v
    }

    /// Changes so far (each upsert, removal or allocation counts one).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Nodes.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeView> {
        self.by_name.get(name).and_then(|i| self.slots[*i].as_ref())
    }

    /// Every node, in slot order.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeView> {
        self.slots.iter().flatten()
    }

    fn unindex(&mut self, i: usize) {
        if let Some(n) = &self.slots[i] {
            for (k, v) in &n.tags {
                if let Some(b) = self.index.get_mut(k).and_then(|m| m.get_mut(v)) {
                    b.clear(i);
                }
            }
        }
        self.live.clear(i);
        self.schedulable.clear(i);
    }

    fn reindex(&mut self, i: usize) {
        let Some(n) = &self.slots[i] else { return };
        for (k, v) in &n.tags {
            self.index
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .set(i);
        }
        self.live.set(i);
        if n.schedulable {
            self.schedulable.set(i);
        }
    }

    /// Add a node, or replace the one of the same name (tags, capacity, state).
    pub fn upsert(&mut self, n: NodeView) {
        self.revision += 1;
        let i = match self.by_name.get(&n.name) {
            Some(i) => {
                let i = *i;
                self.unindex(i);
                i
            }
            None => {
                let i = self.free_slots.pop().unwrap_or(self.slots.len());
                if i == self.slots.len() {
                    self.slots.push(None);
                }
                self.by_name.insert(n.name.clone(), i);
                i
            }
        };
        self.slots[i] = Some(n);
        self.reindex(i);
    }

    /// Remove a node.
    pub fn remove(&mut self, name: &str) -> Option<NodeView> {
        let i = self.by_name.remove(name)?;
        self.revision += 1;
        self.unindex(i);
        self.free_slots.push(i);
        self.slots[i].take()
    }

    /// Add one replica of `r` to a node's allocation (a placement applied). `false`: no
    /// such node.
    pub fn allocate(&mut self, name: &str, r: Resources) -> bool {
        let Some(n) = self.by_name.get(name).and_then(|i| self.slots[*i].as_mut()) else {
            return false;
        };
        n.allocated = n.allocated.saturating_add(r);
        n.workloads = n.workloads.saturating_add(1);
        self.revision += 1;
        true
    }

    /// Hold capacity on a node for a workload's restart (replacing its earlier one there).
    pub fn reserve(&mut self, name: &str, r: Reservation) -> bool {
        let Some(n) = self.by_name.get(name).and_then(|i| self.slots[*i].as_mut()) else {
            return false;
        };
        n.reserved.retain(|x| x.workload != r.workload);
        n.reserved.push(r);
        self.revision += 1;
        true
    }

    /// Drop a workload's reservation on a node.
    pub fn unreserve(&mut self, name: &str, workload: &str) {
        if let Some(n) = self.by_name.get(name).and_then(|i| self.slots[*i].as_mut()) {
            n.reserved.retain(|x| x.workload != workload);
            self.revision += 1;
        }
    }

    /// Whether a node takes new work (ready, not draining).
    pub fn set_schedulable(&mut self, name: &str, schedulable: bool) {
        let Some(&i) = self.by_name.get(name) else {
            return;
        };
        let Some(n) = self.slots[i].as_mut() else {
            return;
        };
        if n.schedulable != schedulable {
            n.schedulable = schedulable;
            if schedulable {
                self.schedulable.set(i);
            } else {
                self.schedulable.clear(i);
            }
            self.revision += 1;
        }
    }

    /// Take one replica of `r` off a node's allocation (a workload gone).
    pub fn release(&mut self, name: &str, r: Resources) {
        if let Some(n) = self.by_name.get(name).and_then(|i| self.slots[*i].as_mut()) {
            n.allocated = n.allocated.saturating_sub(r);
            n.workloads = n.workloads.saturating_sub(1);
            self.revision += 1;
        }
    }

    /// Whether `req` fits on node `name` now: schedulable, its hard constraints hold, and
    /// room besides allocations and the reservations it may not use (those of other
    /// workloads of its priority or higher).
    pub fn fits(&self, name: &str, req: &Request) -> bool {
        let Some(n) = self.node(name) else {
            return false;
        };
        let held = n
            .reserved
            .iter()
            .filter(|r| r.workload != req.workload && r.priority >= req.priority)
            .fold(n.allocated, |a, r| a.saturating_add(r.resources));
        n.schedulable
            && req.constraints.iter().all(|c| c.matches(&n.tags))
            && n.slots_free() > 0
            && n.capacity.saturating_sub(held).fits(req.resources)
    }

    /// Live nodes whose tags satisfy `c`.
    fn matching(&self, c: &Constraint) -> Bitset {
        let values = self.index.get(&c.key);
        let mut with: Bitset = Bitset::default();
        if let Some(values) = values {
            for (v, nodes) in values {
                let positive = match c.op {
                    ConstraintOp::Ne => v == &c.values[0],
                    ConstraintOp::NotIn => c.values.contains(v),
                    _ => c.holds_for(v),
                };
                if positive {
                    with.or(nodes);
                }
            }
        }
        if matches!(c.op, ConstraintOp::Ne | ConstraintOp::NotIn) {
            // The complement: nodes without the tag satisfy `!=` and `not in`.
            let mut all = self.live.clone();
            all.and_not(&with);
            all
        } else {
            with
        }
    }

    /// Whether any node has tag `key`.
    fn has_key(&self, key: &str) -> bool {
        self.index
            .get(key)
            .is_some_and(|m| m.values().any(|b| !b.is_empty()))
    }
}

/// A soft preference: matching nodes get `weight` added to their score.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preference {
    /// The rule.
    pub rule: Constraint,
    /// -100..=100.
    pub weight: i32,
}

/// How to choose among the nodes that fit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    /// The least allocated node (spread the load).
    #[default]
    Spread,
    /// The most allocated node that fits (keep whole nodes free).
    Pack,
}

/// One workload to place.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// Workload name (for the plan and explanations).
    pub workload: String,
    /// Resources it needs (each replica).
    pub resources: Resources,
    /// Hard constraints.
    pub constraints: Vec<Constraint>,
    /// Soft preferences.
    pub preferences: Vec<Preference>,
    /// Where it must not go (other replicas).
    pub avoid: Avoid,
    /// Spread or pack.
    pub policy: Policy,
    /// An `ft` pair: two replicas, on different values of this tag (the fault domain;
    /// hard anti-affinity).
    pub pair: Option<String>,
    /// The group it belongs to (a template's workloads, a service's instances), with
    /// where the group's members already run.
    pub group: Option<Group>,
    /// Priority: it may use capacity reserved for lower priorities (never for equal or
    /// higher ones), and its own reservation.
    pub priority: i32,
    /// Level `ha`: also hold a reservation for its restart on another value of this tag
    /// (soft: the workload is placed even when no reservation fits).
    pub reserve: Option<String>,
}

/// A group of workloads placed together: spread across a tag, kept apart by node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Group {
    /// Group name (members of one batch with the same name count together).
    pub name: String,
    /// Nodes the group's members already run on (one entry per member).
    pub existing: Vec<String>,
    /// Never two members on one node (hard).
    pub anti_affinity: bool,
    /// Spread the members across the values of a tag.
    pub spread: Option<Spread>,
}

/// Spread across a tag's values: with `targets`, each listed value gets its share
/// (percent); without, the values the feasible nodes have share evenly. Soft: when the
/// value that is most behind its share has no room, the next one is used.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spread {
    /// The tag (`zone`, `rack`).
    pub tag: String,
    /// Value and percent; at most 100 in all.
    pub targets: Vec<(String, u32)>,
}

impl Spread {
    /// Check the targets: each 1..=100, at most 100 in all, no value twice.
    pub fn validate(&self) -> Result<(), String> {
        let mut sum = 0;
        for (i, (v, pct)) in self.targets.iter().enumerate() {
            if *pct == 0 || *pct > 100 {
                return Err(format!("spread target {v:?}: {pct}% is not 1..=100"));
            }
            if self.targets[..i].iter().any(|(w, _)| w == v) {
                return Err(format!("spread target {v:?} is listed twice"));
            }
            sum += pct;
        }
        if sum > 100 {
            return Err(format!(
                "spread targets of {:?} add up to {sum}%, more than 100%",
                self.tag
            ));
        }
        Ok(())
    }
}

/// Where a replica must not go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Avoid {
    /// Nodes that run another replica.
    pub nodes: Vec<String>,
    /// The fault-domain tag and the values the other replicas sit in.
    pub fault_domain: Option<(String, Vec<String>)>,
}

/// The outcome for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run it on `node` (and, for a pair, its secondary on `secondary`).
    Place {
        /// The chosen node.
        node: String,
        /// A pair's secondary.
        secondary: Option<String>,
        /// Where its restart capacity is held (a request with `reserve`), if it fits.
        reservation: Option<String>,
        /// Lower-priority workloads whose reservations it uses ("uses capacity reserved
        /// for ..."): the caller re-creates those elsewhere.
        displaced: Vec<String>,
    },
    /// No node fits.
    Unplaceable {
        /// Why, per filter: "3 nodes: 2 filtered by constraint zone == tokyo, 1 short of memory".
        explanation: String,
    },
}

/// Decisions in request order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// One decision per request, in the order of the requests.
    pub decisions: Vec<(String, Decision)>,
    /// The view's revision the plan was made on: the server applies a plan only while
    /// the view is still at it (compare-and-swap), so two plans never over-commit.
    pub revision: u64,
}

/// Why a node was filtered out, in the order filters run.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Filtered {
    NotSchedulable,
    Constraint(String),
    AntiAffinity,
    AtWorkloadLimit,
    ShortOfCpu,
    ShortOfMemory,
}

impl Filtered {
    fn describe(&self) -> String {
        match self {
            Filtered::NotSchedulable => "not ready".into(),
            Filtered::AntiAffinity => "hold another replica or share its fault domain".into(),
            Filtered::Constraint(c) => format!("filtered by constraint {c}"),
            Filtered::AtWorkloadLimit => "at their workload limit".into(),
            Filtered::ShortOfCpu => "short of cpu".into(),
            Filtered::ShortOfMemory => "short of memory".into(),
        }
    }
}

/// One batch's working state: what it placed so far, per slot, and per group.
struct Batch<'a> {
    view: &'a ClusterView,
    used: HashMap<usize, Resources>,
    /// Replicas this batch placed, per slot (against the workload limit).
    count: HashMap<usize, u32>,
    /// Reservations made by this batch, per slot.
    reserved: HashMap<usize, Vec<Reservation>>,
    /// Per group: its members so far.
    groups: HashMap<String, GroupState>,
}

/// A group's members as a batch goes: running ones and the batch's own.
#[derive(Default)]
struct GroupState {
    /// Slots with a member.
    nodes: Bitset,
    /// Slots the batch placed members on (in order; repeats allowed).
    placed: Vec<usize>,
    /// Members per value of the spread tag.
    counts: HashMap<String, u32>,
}

impl Batch<'_> {
    fn reservations<'b>(
        &'b self,
        i: usize,
        n: &'b NodeView,
    ) -> impl Iterator<Item = &'b Reservation> {
        n.reserved
            .iter()
            .chain(self.reserved.get(&i).into_iter().flatten())
    }

    /// What `req` may use on node `i`: capacity less allocations, this batch's
    /// placements, and reservations of other workloads of its priority or higher.
    fn free(&self, i: usize, n: &NodeView, req: &Request) -> Resources {
        let used = self.used.get(&i).copied().unwrap_or(Resources {
            cpu_millis: 0,
            memory_mib: 0,
        });
        let held = self
            .reservations(i, n)
            .filter(|r| r.workload != req.workload && r.priority >= req.priority)
            .fold(used, |a, r| a.saturating_add(r.resources));
        n.free().saturating_sub(held)
    }

    /// The lower-priority reservations `req` needs on node `i` (none when it fits
    /// without them).
    fn displaced(&self, i: usize, n: &NodeView, req: &Request) -> Vec<String> {
        // With every other reservation counted, does it still fit?
        let all = self
            .reservations(i, n)
            .filter(|r| r.workload != req.workload)
            .fold(
                self.used.get(&i).copied().unwrap_or(Resources {
                    cpu_millis: 0,
                    memory_mib: 0,
                }),
                |a, r| a.saturating_add(r.resources),
            );
        if n.free().saturating_sub(all).fits(req.resources) {
            return vec![];
        }
        self.reservations(i, n)
            .filter(|r| r.workload != req.workload && r.priority < req.priority)
            .map(|r| r.workload.clone())
            .collect()
    }

    fn take(&mut self, i: usize, r: Resources) {
        let u = self.used.entry(i).or_insert(Resources {
            cpu_millis: 0,
            memory_mib: 0,
        });
        *u = u.saturating_add(r);
        *self.count.entry(i).or_default() += 1;
    }

    fn give_back(&mut self, i: usize, r: Resources) {
        if let Some(u) = self.used.get_mut(&i) {
            *u = u.saturating_sub(r);
        }
        if let Some(c) = self.count.get_mut(&i) {
            *c = c.saturating_sub(1);
        }
    }

    /// Whether node `i` may take one more replica (its workload limit, this batch's
    /// placements counted).
    fn below_limit(&self, i: usize, n: &NodeView) -> bool {
        n.slots_free() > self.count.get(&i).copied().unwrap_or(0)
    }

    /// The slots the hard rules allow (before capacity), and the avoid set.
    fn feasible(&self, req: &Request, avoid: &Avoid) -> (Bitset, Bitset) {
        let v = self.view;
        let mut f = v.schedulable.clone();
        for c in &req.constraints {
            f.and(&v.matching(c));
        }
        let mut avoided = Bitset::default();
        for name in &avoid.nodes {
            if let Some(i) = v.by_name.get(name) {
                avoided.set(*i);
            }
        }
        if let Some((tag, values)) = &avoid.fault_domain
            && let Some(m) = v.index.get(tag)
        {
            for val in values {
                if let Some(b) = m.get(val) {
                    avoided.or(b);
                }
            }
        }
        f.and_not(&avoided);
        (f, avoided)
    }

    fn score(&self, n: &NodeView, free: Resources, req: &Request) -> i64 {
        let frac = |free: u32, need: u32, cap: u32| -> i64 {
            if cap == 0 {
                0
            } else {
                (i64::from(free.saturating_sub(need)) * 1000) / i64::from(cap)
            }
        };
        let least = (frac(
            free.cpu_millis,
            req.resources.cpu_millis,
            n.capacity.cpu_millis,
        ) + frac(
            free.memory_mib,
            req.resources.memory_mib,
            n.capacity.memory_mib,
        )) / 2;
        let base = match req.policy {
            Policy::Spread => least,
            Policy::Pack => 1000 - least,
        };
        let prefs: i64 = req
            .preferences
            .iter()
            .filter(|p| p.rule.matches(&n.tags))
            .map(|p| i64::from(p.weight) * 10)
            .sum();
        base + prefs
    }

    /// Place one replica. With a spread rule, the tag values are tried from the one
    /// most behind its share; within the candidates, the best of a random sample.
    fn place_one(
        &mut self,
        req: &Request,
        avoid: &Avoid,
        rng: &mut impl Rng,
    ) -> Result<(usize, Vec<String>), String> {
        let mut counts: HashMap<String, u32> = HashMap::new();
        let mut members = Bitset::default();
        if let Some(g) = &req.group {
            let state = self.group(g);
            if g.anti_affinity {
                members = state.nodes.clone();
            }
            counts = state.counts.clone();
        }
        let (mut feasible, mut avoided) = self.feasible(req, avoid);
        feasible.and_not(&members);
        avoided.or(&members);
        if let Some(sp) = req.group.as_ref().and_then(|g| g.spread.as_ref()) {
            // Shares: the targets, or even over the values the feasible nodes have.
            let shares: Vec<(String, f64)> = if sp.targets.is_empty() {
                let values: Vec<String> = self
                    .view
                    .index
                    .get(&sp.tag)
                    .map(|m| {
                        m.iter()
                            .filter(|(_, b)| b.intersects(&feasible))
                            .map(|(v, _)| v.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                let n = values.len().max(1) as f64;
                values.into_iter().map(|v| (v, 1.0 / n)).collect()
            } else {
                sp.targets
                    .iter()
                    .map(|(v, p)| (v.clone(), f64::from(*p) / 100.0))
                    .collect()
            };
            let total = counts.values().sum::<u32>() as f64 + 1.0;
            let mut order: Vec<(f64, String)> = shares
                .into_iter()
                .map(|(v, share)| {
                    let have = f64::from(counts.get(&v).copied().unwrap_or(0));
                    (share * total - have, v)
                })
                .collect();
            order.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
            for (_, value) in &order {
                let Some(nodes) = self.view.index.get(&sp.tag).and_then(|m| m.get(value)) else {
                    continue;
                };
                let mut candidates = feasible.clone();
                candidates.and(nodes);
                if let Some(i) = self.sample(&candidates, req, rng) {
                    return Ok(self.commit(i, req));
                }
            }
            // No value with a share has room: anywhere feasible (the spread is soft).
        }
        match self.sample(&feasible, req, rng) {
            Some(i) => Ok(self.commit(i, req)),
            None => Err(self.explain(req, &avoided)),
        }
    }

    /// Take the capacity; returns the slot and the lower-priority reservations used.
    fn commit(&mut self, i: usize, req: &Request) -> (usize, Vec<String>) {
        let displaced = self.view.slots[i]
            .as_ref()
            .map(|n| self.displaced(i, n, req))
            .unwrap_or_default();
        self.take(i, req.resources);
        if let Some(g) = &req.group {
            let value = g.spread.as_ref().and_then(|sp| {
                self.view.slots[i]
                    .as_ref()
                    .and_then(|n| n.tags.get(&sp.tag).cloned())
            });
            let state = self.group(g);
            state.nodes.set(i);
            state.placed.push(i);
            if let Some(v) = value {
                *state.counts.entry(v).or_default() += 1;
            }
        }
        (i, displaced)
    }

    /// A group's members so far (running and placed by this batch), built on first use.
    fn group(&mut self, g: &Group) -> &mut GroupState {
        let view = self.view;
        self.groups.entry(g.name.clone()).or_insert_with(|| {
            let mut st = GroupState::default();
            for m in &g.existing {
                if let Some(&i) = view.by_name.get(m) {
                    st.nodes.set(i);
                    if let Some(v) = g
                        .spread
                        .as_ref()
                        .and_then(|sp| view.slots[i].as_ref().and_then(|n| n.tags.get(&sp.tag)))
                    {
                        *st.counts.entry(v.clone()).or_default() += 1;
                    }
                }
            }
            st
        })
    }

    /// Undo a group placement (a pair whose secondary did not fit).
    fn forget(&mut self, g: &Group, i: usize) {
        let value = g.spread.as_ref().and_then(|sp| {
            self.view.slots[i]
                .as_ref()
                .and_then(|n| n.tags.get(&sp.tag).cloned())
        });
        let st = self.group(g);
        if let Some(at) = st.placed.iter().rposition(|x| *x == i) {
            st.placed.remove(at);
        }
        if !st.placed.contains(&i) {
            st.nodes.clear(i);
        }
        if let Some(c) = value.and_then(|v| st.counts.get_mut(&v)) {
            *c = c.saturating_sub(1);
        }
    }

    fn name(&self, i: usize) -> String {
        self.view.slots[i]
            .as_ref()
            .expect("placed on a live node")
            .name
            .clone()
    }

    /// `base`, plus the node of slot `i` and its value of `tag`.
    fn away_from(&self, base: &Avoid, i: usize, tag: &str) -> Avoid {
        let mut avoid = base.clone();
        avoid.nodes.push(self.name(i));
        let domain = self.view.slots[i]
            .as_ref()
            .and_then(|n| n.tags.get(tag).cloned());
        match (&mut avoid.fault_domain, domain) {
            (Some((t, values)), Some(d)) if t == tag => values.push(d),
            (fd, Some(d)) => *fd = Some((tag.to_string(), vec![d])),
            _ => {}
        }
        avoid
    }

    /// Hold `req`'s restart capacity on a node away from slot `primary` (soft).
    fn reserve(
        &mut self,
        req: &Request,
        primary: usize,
        tag: &str,
        rng: &mut impl Rng,
    ) -> Option<String> {
        let avoid = self.away_from(&req.avoid, primary, tag);
        let (feasible, _) = self.feasible(req, &avoid);
        let i = self.sample(&feasible, req, rng)?;
        self.reserved.entry(i).or_default().push(Reservation {
            workload: req.workload.clone(),
            priority: req.priority,
            resources: req.resources,
        });
        Some(self.name(i))
    }

    /// The best of a random sample of `candidates` with room.
    fn sample(&self, candidates: &Bitset, req: &Request, rng: &mut impl Rng) -> Option<usize> {
        let start = rng.next_u64() as usize;
        let mut best: Option<(i64, usize)> = None;
        let mut seen = 0;
        for i in candidates.iter_from(start) {
            let Some(n) = self.view.slots[i].as_ref() else {
                continue;
            };
            if !self.below_limit(i, n) {
                continue;
            }
            let free = self.free(i, n, req);
            if !free.fits(req.resources) {
                continue;
            }
            let s = self.score(n, free, req);
            let better = match best {
                None => true,
                Some((bs, bi)) => {
                    s > bs || (s == bs && n.name < self.view.slots[bi].as_ref().expect("live").name)
                }
            };
            if better {
                best = Some((s, i));
            }
            seen += 1;
            if seen >= SAMPLE {
                break;
            }
        }
        best.map(|(_, i)| i)
    }

    /// Count, for every node, the first filter that rules it out.
    fn explain(&self, req: &Request, avoided: &Bitset) -> String {
        let v = self.view;
        let total = v.live.count();
        if total == 0 {
            return "no nodes in the cluster".into();
        }
        let mut reasons: Vec<(Filtered, usize)> = Vec::new();
        let mut remaining = v.schedulable.clone();
        let not_ready = total - remaining.count();
        if not_ready > 0 {
            reasons.push((Filtered::NotSchedulable, not_ready));
        }
        let mut notes = Vec::new();
        for c in &req.constraints {
            let m = v.matching(c);
            let before = remaining.count();
            remaining.and(&m);
            let out = before - remaining.count();
            if out > 0 {
                reasons.push((Filtered::Constraint(c.to_string()), out));
            }
            if !v.has_key(&c.key) && !c.holds_without_tag() {
                notes.push(format!("no node has the tag {:?}", c.key));
            }
        }
        let before = remaining.count();
        remaining.and_not(avoided);
        let out = before - remaining.count();
        if out > 0 {
            reasons.push((Filtered::AntiAffinity, out));
        }
        let (mut full, mut cpu, mut mem) = (0, 0, 0);
        for i in remaining.iter_from(0) {
            if let Some(n) = v.slots[i].as_ref() {
                let free = self.free(i, n, req);
                if !self.below_limit(i, n) {
                    full += 1;
                } else if req.resources.cpu_millis > free.cpu_millis {
                    cpu += 1;
                } else if req.resources.memory_mib > free.memory_mib {
                    mem += 1;
                }
            }
        }
        if full > 0 {
            reasons.push((Filtered::AtWorkloadLimit, full));
        }
        if cpu > 0 {
            reasons.push((Filtered::ShortOfCpu, cpu));
        }
        if mem > 0 {
            reasons.push((Filtered::ShortOfMemory, mem));
        }
        let mut s = format!("{total} node{}: ", if total == 1 { "" } else { "s" });
        for (i, (why, n)) in reasons.iter().enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            let _ = write!(s, "{n} {}", why.describe());
        }
        for n in notes {
            let _ = write!(s, " ({n})");
        }
        s
    }

    fn decide(&mut self, req: &Request, rng: &mut impl Rng) -> Decision {
        if let Some(Err(e)) = req
            .group
            .as_ref()
            .and_then(|g| g.spread.as_ref())
            .map(Spread::validate)
        {
            return Decision::Unplaceable { explanation: e };
        }
        let (primary, mut displaced) = match self.place_one(req, &req.avoid, rng) {
            Ok(p) => p,
            Err(explanation) => return Decision::Unplaceable { explanation },
        };
        let node = self.name(primary);
        let mut secondary = None;
        if let Some(tag) = &req.pair {
            // The secondary: not on the primary's node nor in its fault domain.
            let avoid = self.away_from(&req.avoid, primary, tag);
            match self.place_one(req, &avoid, rng) {
                Ok((s, d)) => {
                    secondary = Some(self.name(s));
                    displaced.extend(d);
                }
                Err(e) => {
                    self.give_back(primary, req.resources);
                    if let Some(g) = &req.group {
                        self.forget(g, primary);
                    }
                    return Decision::Unplaceable {
                        explanation: format!(
                            "no node for the secondary on another {tag} than {node}'s: {e}"
                        ),
                    };
                }
            }
        }
        let reservation = req
            .reserve
            .as_ref()
            .and_then(|tag| self.reserve(req, primary, tag, rng));
        displaced.sort();
        displaced.dedup();
        Decision::Place {
            node,
            secondary,
            reservation,
            displaced,
        }
    }
}

/// Place a batch of requests, each on its own: a request that does not fit is
/// explained and the others are placed.
pub fn plan(view: &ClusterView, requests: &[Request], rng: &mut impl Rng) -> Plan {
    let mut batch = Batch {
        view,
        used: HashMap::new(),
        count: HashMap::new(),
        reserved: HashMap::new(),
        groups: HashMap::new(),
    };
    let decisions = requests
        .iter()
        .map(|r| (r.workload.clone(), batch.decide(r, rng)))
        .collect();
    Plan {
        decisions,
        revision: view.revision,
    }
}

/// Place a batch all or nothing (a template): the plan when every request fits, else
/// the first that does not, named, with its explanation.
pub fn plan_all(
    view: &ClusterView,
    requests: &[Request],
    rng: &mut impl Rng,
) -> Result<Plan, String> {
    let mut batch = Batch {
        view,
        used: HashMap::new(),
        count: HashMap::new(),
        reserved: HashMap::new(),
        groups: HashMap::new(),
    };
    let mut decisions = Vec::with_capacity(requests.len());
    for r in requests {
        match batch.decide(r, rng) {
            Decision::Unplaceable { explanation } => {
                return Err(format!(
                    "{} of {} placed before {:?} did not fit: {explanation}",
                    decisions.len(),
                    requests.len(),
                    r.workload
                ));
            }
            d => decisions.push((r.workload.clone(), d)),
        }
    }
    Ok(Plan {
        decisions,
        revision: view.revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use avail_model::rng::SplitMix64;
    use proptest::prelude::*;

    fn res(cpu: u32, mem: u32) -> Resources {
        Resources {
            cpu_millis: cpu,
            memory_mib: mem,
        }
    }

    fn node(name: &str, tags: &[(&str, &str)], cpu: u32, mem: u32) -> NodeView {
        NodeView {
            name: name.into(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            capacity: res(cpu, mem),
            allocated: res(0, 0),
            workloads: 0,
            max_workloads: 110,
            schedulable: true,
            reserved: vec![],
        }
    }

    fn req(name: &str, cpu: u32, mem: u32, constraints: &[&str]) -> Request {
        Request {
            workload: name.into(),
            resources: res(cpu, mem),
            constraints: constraints
                .iter()
                .map(|c| Constraint::parse(c).unwrap())
                .collect(),
            ..Request::default()
        }
    }

    fn place(node: &str) -> Decision {
        Decision::Place {
            node: node.into(),
            secondary: None,
            reservation: None,
            displaced: vec![],
        }
    }

    #[test]
    fn least_allocated_and_constraints() {
        let mut a = node("a", &[("zone", "tokyo")], 1000, 1000);
        a.allocated.memory_mib = 500;
        let view = ClusterView::from_nodes([
            a,
            node("b", &[("zone", "tokyo")], 1000, 1000),
            node("c", &[("zone", "osaka")], 1000, 1000),
        ]);
        let p = plan(
            &view,
            &[req("w", 100, 100, &["zone == tokyo"])],
            &mut SplitMix64(1),
        );
        assert_eq!(p.decisions[0].1, place("b"));
        // Pack picks the fuller node.
        let mut r = req("w", 100, 100, &["zone == tokyo"]);
        r.policy = Policy::Pack;
        assert_eq!(
            plan(&view, &[r], &mut SplitMix64(1)).decisions[0].1,
            place("a")
        );
    }

    #[test]
    fn explains_unplaceable_with_counts() {
        let mut down = node("d", &[("zone", "tokyo")], 1000, 1000);
        down.schedulable = false;
        let view = ClusterView::from_nodes([
            node("a", &[("zone", "tokyo")], 1000, 10),
            node("b", &[("zone", "osaka")], 1000, 1000),
            down,
        ]);
        let p = plan(
            &view,
            &[req("w", 100, 100, &["zone == tokyo"])],
            &mut SplitMix64(1),
        );
        assert_eq!(
            p.decisions[0].1,
            Decision::Unplaceable {
                explanation: "3 nodes: 1 not ready, 1 filtered by constraint zone == tokyo, 1 short of memory".into()
            }
        );
        let p = plan(
            &view,
            &[req("w", 1, 1, &["gpu exists"])],
            &mut SplitMix64(1),
        );
        assert!(
            matches!(&p.decisions[0].1, Decision::Unplaceable { explanation } if explanation.contains("no node has the tag \"gpu\"")),
            "{:?}",
            p.decisions[0].1
        );
        let p = plan(
            &ClusterView::new(),
            &[req("w", 1, 1, &[])],
            &mut SplitMix64(1),
        );
        assert!(
            matches!(&p.decisions[0].1, Decision::Unplaceable { explanation } if explanation == "no nodes in the cluster")
        );
    }

    #[test]
    fn nodes_at_their_workload_limit_take_nothing_more() {
        let mut a = node("a", &[], 100_000, 100_000);
        a.max_workloads = 2;
        let mut b = node("b", &[], 100_000, 100_000);
        b.max_workloads = 3;
        b.workloads = 2;
        let mut view = ClusterView::from_nodes([a, b]);
        // Room for three more replicas in all, whatever the cpu and memory left.
        let reqs: Vec<Request> = (0..5).map(|i| req(&format!("w{i}"), 10, 1, &[])).collect();
        let p = plan(&view, &reqs, &mut SplitMix64(7));
        let mut ns = nodes_of(&p);
        ns.sort();
        assert_eq!(ns, ["a", "a", "b"]);
        for (_, d) in &p.decisions[3..] {
            assert_eq!(
                d,
                &Decision::Unplaceable {
                    explanation: "2 nodes: 2 at their workload limit".into()
                }
            );
        }
        // Applied to the view: counted there too; a release frees a slot.
        view.allocate("b", res(10, 1));
        assert_eq!(view.node("b").unwrap().workloads, 3);
        assert!(!view.fits("b", &reqs[0]));
        view.release("b", res(10, 1));
        assert!(view.fits("b", &reqs[0]));
        // The limit is counted before cpu: a node both full and short says "limit".
        let mut c = node("c", &[], 5, 5);
        c.max_workloads = 0;
        let view = ClusterView::from_nodes([c, node("d", &[], 5, 5)]);
        assert_eq!(
            plan(&view, &[req("w", 10, 1, &[])], &mut SplitMix64(1)).decisions[0].1,
            Decision::Unplaceable {
                explanation: "2 nodes: 1 at their workload limit, 1 short of cpu".into()
            }
        );
    }

    #[test]
    fn affinity_moves_the_choice() {
        let view = ClusterView::from_nodes([
            node("a", &[("zone", "tokyo")], 1000, 1000),
            node("b", &[("zone", "osaka")], 1000, 1000),
        ]);
        let mut r = req("w", 100, 100, &[]);
        r.preferences.push(Preference {
            rule: Constraint::parse("zone == osaka").unwrap(),
            weight: 50,
        });
        assert_eq!(
            plan(&view, &[r], &mut SplitMix64(1)).decisions[0].1,
            place("b")
        );
    }

    #[test]
    fn pairs_never_share_a_fault_domain_and_tags_change_in_place() {
        let mut view = ClusterView::from_nodes([
            node("a", &[("rack", "r1")], 1000, 1000),
            node("b", &[("rack", "r1")], 1000, 1000),
            node("c", &[("rack", "r2")], 1000, 1000),
        ]);
        let mut r = req("w", 100, 100, &[]);
        r.pair = Some("rack".into());
        let d = plan(&view, std::slice::from_ref(&r), &mut SplitMix64(1)).decisions[0]
            .1
            .clone();
        assert_eq!(
            d,
            Decision::Place {
                node: "a".into(),
                secondary: Some("c".into()),
                reservation: None,
                displaced: vec![],
            }
        );
        // c moves into r1: no second fault domain left.
        let rev = view.revision();
        view.upsert(node("c", &[("rack", "r1")], 1000, 1000));
        assert!(view.revision() > rev);
        let d = plan(&view, &[r], &mut SplitMix64(1)).decisions[0].1.clone();
        assert!(
            matches!(&d, Decision::Unplaceable { explanation } if explanation.contains("secondary") && explanation.contains("3 hold another replica")),
            "{d:?}"
        );
        assert!(view.remove("c").is_some());
        assert_eq!(view.len(), 2);
        assert!(view.node("c").is_none());
    }

    #[test]
    fn all_or_nothing() {
        let view = ClusterView::from_nodes([node("a", &[], 1000, 1000)]);
        let ok = [req("x", 400, 10, &[]), req("y", 400, 10, &[])];
        let p = plan_all(&view, &ok, &mut SplitMix64(1)).unwrap();
        assert_eq!(p.decisions.len(), 2);
        let too_much = [req("x", 600, 10, &[]), req("y", 600, 10, &[])];
        let e = plan_all(&view, &too_much, &mut SplitMix64(1)).unwrap_err();
        assert!(e.contains("1 of 2 placed before \"y\""), "{e}");
    }

    fn group_req(name: &str, g: &Group) -> Request {
        let mut r = req(name, 10, 10, &[]);
        r.group = Some(g.clone());
        r
    }

    fn nodes_of(p: &Plan) -> Vec<String> {
        p.decisions
            .iter()
            .filter_map(|(_, d)| match d {
                Decision::Place { node, .. } => Some(node.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn groups_spread_by_share_and_keep_apart() {
        let view = ClusterView::from_nodes([
            node("t1", &[("zone", "tokyo")], 1000, 1000),
            node("t2", &[("zone", "tokyo")], 1000, 1000),
            node("o1", &[("zone", "osaka")], 1000, 1000),
            node("o2", &[("zone", "osaka")], 1000, 1000),
        ]);
        let zone = |p: &Plan| -> (usize, usize) {
            let ns = nodes_of(p);
            (
                ns.iter().filter(|n| n.starts_with('t')).count(),
                ns.iter().filter(|n| n.starts_with('o')).count(),
            )
        };
        // Even: 2 and 2, whatever the sample.
        let even = Group {
            name: "g".into(),
            spread: Some(Spread {
                tag: "zone".into(),
                targets: vec![],
            }),
            ..Group::default()
        };
        let reqs: Vec<Request> = (0..4).map(|i| group_req(&format!("w{i}"), &even)).collect();
        for seed in 0..20 {
            assert_eq!(zone(&plan(&view, &reqs, &mut SplitMix64(seed))), (2, 2));
        }
        // 75/25 of 8.
        let mut weighted = even.clone();
        weighted.spread.as_mut().unwrap().targets =
            vec![("tokyo".into(), 75), ("osaka".into(), 25)];
        let reqs: Vec<Request> = (0..8)
            .map(|i| group_req(&format!("w{i}"), &weighted))
            .collect();
        assert_eq!(zone(&plan(&view, &reqs, &mut SplitMix64(3))), (6, 2));
        // Members already running count: two in Tokyo, so the next two go to Osaka.
        let mut running = even.clone();
        running.existing = vec!["t1".into(), "t2".into()];
        let reqs: Vec<Request> = (0..2)
            .map(|i| group_req(&format!("w{i}"), &running))
            .collect();
        assert_eq!(zone(&plan(&view, &reqs, &mut SplitMix64(3))), (0, 2));
        // Anti-affinity: four nodes, five members: the fifth is explained.
        let apart = Group {
            name: "a".into(),
            anti_affinity: true,
            ..Group::default()
        };
        let reqs: Vec<Request> = (0..5)
            .map(|i| group_req(&format!("w{i}"), &apart))
            .collect();
        let p = plan(&view, &reqs, &mut SplitMix64(1));
        let mut ns = nodes_of(&p);
        ns.sort();
        ns.dedup();
        assert_eq!(ns.len(), 4);
        assert!(
            matches!(&p.decisions[4].1, Decision::Unplaceable { explanation } if explanation.contains("4 hold another replica")),
            "{:?}",
            p.decisions[4]
        );
        // Contradictory targets: a clear explanation, no panic.
        let mut bad = weighted.clone();
        bad.spread.as_mut().unwrap().targets = vec![("tokyo".into(), 80), ("osaka".into(), 40)];
        let p = plan(&view, &[group_req("x", &bad)], &mut SplitMix64(1));
        assert!(
            matches!(&p.decisions[0].1, Decision::Unplaceable { explanation } if explanation.contains("add up to 120%")),
            "{:?}",
            p.decisions[0]
        );
        // A target on a value no node has: soft, placed elsewhere.
        let mut mars = weighted.clone();
        mars.spread.as_mut().unwrap().targets = vec![("mars".into(), 100)];
        let p = plan(&view, &[group_req("x", &mars)], &mut SplitMix64(1));
        assert!(matches!(p.decisions[0].1, Decision::Place { .. }));
    }

    #[test]
    fn reservations_hold_capacity_for_lower_priorities_only() {
        let mut view = ClusterView::from_nodes([
            node("a", &[("rack", "r1")], 1000, 1000),
            node("b", &[("rack", "r2")], 1000, 1000),
        ]);
        // An ha workload: placed, and its restart capacity held on the other rack.
        let mut ha = req("db", 600, 600, &[]);
        ha.reserve = Some("rack".into());
        ha.priority = 5;
        let d = plan(&view, std::slice::from_ref(&ha), &mut SplitMix64(1)).decisions[0]
            .1
            .clone();
        let Decision::Place {
            node: n,
            reservation: Some(r),
            ..
        } = d
        else {
            panic!("{d:?}")
        };
        assert_ne!(n, r);
        view.allocate(&n, ha.resources);
        view.reserve(
            &r,
            Reservation {
                workload: "db".into(),
                priority: 5,
                resources: ha.resources,
            },
        );
        // Equal priority may not use it: only the other node, which is full.
        let mut same = req("web", 600, 600, &[]);
        same.priority = 5;
        let d = plan(&view, std::slice::from_ref(&same), &mut SplitMix64(1)).decisions[0]
            .1
            .clone();
        assert!(
            matches!(&d, Decision::Unplaceable { explanation } if explanation.contains("2 short of cpu")),
            "{d:?}"
        );
        // The workload itself (its restart) uses its own reservation.
        let d = plan(&view, std::slice::from_ref(&ha), &mut SplitMix64(1)).decisions[0]
            .1
            .clone();
        assert!(
            matches!(&d, Decision::Place { node, displaced, .. } if *node == r && displaced.is_empty()),
            "{d:?}"
        );
        // A higher priority may, and says whose reservation it took.
        let mut urgent = req("pay", 600, 600, &[]);
        urgent.priority = 9;
        let d = plan(&view, &[urgent], &mut SplitMix64(1)).decisions[0]
            .1
            .clone();
        assert_eq!(
            d,
            Decision::Place {
                node: r.clone(),
                secondary: None,
                reservation: None,
                displaced: vec!["db".into()],
            }
        );
        view.unreserve(&r, "db");
        let d = plan(&view, &[same], &mut SplitMix64(1)).decisions[0]
            .1
            .clone();
        assert!(
            matches!(&d, Decision::Place { displaced, .. } if displaced.is_empty()),
            "{d:?}"
        );
    }

    /// Brute force: does any node satisfy the request on its own (batch usage given)?
    /// `used` plus the reservations on `n` that `r` may not use.
    fn blocked(n: &NodeView, r: &Request, used: Resources) -> Resources {
        n.reserved
            .iter()
            .filter(|x| x.workload != r.workload && x.priority >= r.priority)
            .fold(used, |a, x| a.saturating_add(x.resources))
    }

    fn feasible_somewhere(
        view: &ClusterView,
        used: &HashMap<String, Resources>,
        count: &HashMap<String, u32>,
        r: &Request,
        avoid: &Avoid,
    ) -> bool {
        view.nodes().any(|n| {
            let u = blocked(n, r, used.get(&n.name).copied().unwrap_or(res(0, 0)));
            n.schedulable
                && n.workloads + count.get(&n.name).copied().unwrap_or(0) < n.max_workloads
                && r.constraints.iter().all(|c| c.matches(&n.tags))
                && !avoid.nodes.contains(&n.name)
                && !avoid
                    .fault_domain
                    .as_ref()
                    .is_some_and(|(t, vs)| n.tags.get(t).is_some_and(|v| vs.contains(v)))
                && n.free().saturating_sub(u).fits(r.resources)
        })
    }

    proptest! {
        #[test]
        fn plans_hold_every_rule_and_unplaceable_is_really_infeasible(
            nodes in prop::collection::vec((0u8..3, 0u8..3, 0u32..4000, 0u32..4000, any::<bool>(), 0u8..20, prop::collection::vec((0i32..4, 0u32..1500), 0..3), (0u32..6, 0u32..6)), 0..10),
            reqs in prop::collection::vec((0u8..6, 1u32..2000, 1u32..2000, any::<bool>(), any::<bool>(), 0i32..4), 0..30),
            seed in any::<u64>(),
        ) {
            let zones = ["a", "b", "c"];
            let view = ClusterView::from_nodes(nodes.iter().enumerate().map(|(i, (z, rack, c, m, up, ver, held, (max, running)))| {
                let mut n = node(&format!("n{i}"), &[("zone", zones[*z as usize]), ("rack", &format!("r{rack}")), ("ver", &format!("1.{ver}"))], *c, *m);
                n.schedulable = *up;
                // A workload limit, sometimes already reached (or passed: a limit
                // lowered under running workloads).
                n.max_workloads = *max;
                n.workloads = *running;
                n.reserved = held.iter().enumerate().map(|(k, (p, size))| Reservation { workload: format!("held{k}"), priority: *p, resources: res(*size, *size) }).collect();
                n
            }));
            let requests: Vec<Request> = reqs.iter().enumerate().map(|(i, (z, c, m, pair, grouped, prio))| {
                let cons: Vec<&str> = match z { 0 => vec![], 1 => vec!["zone == a"], 2 => vec!["zone in [b, c]"], 3 => vec!["zone != a"], 4 => vec!["ver >= 1.10"], _ => vec!["zone not in [b]", "ver < 1.5"] };
                let mut r = req(&format!("w{i}"), *c, *m, &cons);
                if *pair { r.pair = Some("rack".into()); }
                r.priority = *prio;
                if *grouped {
                    r.group = Some(Group { name: "g".into(), anti_affinity: true, ..Group::default() });
                }
                r
            }).collect();
            let p = plan(&view, &requests, &mut SplitMix64(seed));
            prop_assert_eq!(p.decisions.len(), requests.len());
            let mut used: HashMap<String, Resources> = HashMap::new();
            let mut count: HashMap<String, u32> = HashMap::new();
            let mut group_nodes: Vec<String> = Vec::new();
            for ((name, d), r) in p.decisions.iter().zip(&requests) {
                prop_assert_eq!(name, &r.workload);
                match d {
                    Decision::Place { node, secondary, .. } => {
                        let mut replicas = vec![node.clone()];
                        replicas.extend(secondary.clone());
                        prop_assert_eq!(replicas.len(), if r.pair.is_some() { 2 } else { 1 });
                        for n in &replicas {
                            let nv = view.node(n).unwrap();
                            prop_assert!(nv.schedulable);
                            prop_assert!(r.constraints.iter().all(|c| c.matches(&nv.tags)));
                            let u = used.entry(n.clone()).or_insert(res(0, 0));
                            *u = u.saturating_add(r.resources);
                            // Allocations, the plan's placements and the reservations this
                            // request may not use all fit.
                            prop_assert!(nv.free().fits(blocked(nv, r, *u)), "over-committed {}", n);
                            let k = count.entry(n.clone()).or_default();
                            *k += 1;
                            prop_assert!(nv.workloads + *k <= nv.max_workloads, "{} over its workload limit", n);
                        }
                        if r.group.is_some() {
                            for n in &replicas {
                                prop_assert!(!group_nodes.contains(n), "two members of the group on {}", n);
                            }
                            group_nodes.extend(replicas.clone());
                        }
                        if let Some(s) = secondary {
                            let (a, b) = (view.node(node).unwrap(), view.node(s).unwrap());
                            prop_assert_ne!(node, s);
                            prop_assert_ne!(a.tags.get("rack"), b.tags.get("rack"), "pair shares a fault domain");
                        }
                    }
                    Decision::Unplaceable { .. } => {
                        // Single replicas: no node could have taken it. (A pair may fail
                        // on its second replica after a greedy first choice.)
                        if r.pair.is_none() {
                            let mut avoid = r.avoid.clone();
                            if r.group.is_some() {
                                avoid.nodes.extend(group_nodes.clone());
                            }
                            prop_assert!(!feasible_somewhere(&view, &used, &count, r, &avoid), "{} was placeable", r.workload);
                        }
                    }
                }
            }
        }
    }
}
