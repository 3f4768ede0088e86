//! The pair protocol: a primary and a secondary of one `ft` workload, as pure state
//! machines. They take messages, ticks (the time is passed in, in ms) and the answers
//! of the control-plane lease, and return actions for the driver to carry out (send,
//! apply, release outputs, ask for the lease, promote). No clock, socket or store in
//! here: the same code runs over TCP between agents and in the seeded simulation of
//! `tests/pair_sim.rs`.
//!
//! ```text
//!  primary P (generation g)                          secondary S (generation g)
//!  ---------------------                      ---------------------
//!  runs epoch e; outputs of e are HELD
//!  end of epoch: capture delta e
//!      ---- Checkpoint{g, e, full?} ---->     apply atomically (all or nothing)
//!      <--------- Ack{g, e} ------------      (only if applied and generation == g)
//!  release outputs of epochs <= e
//!
//!  a gap or a failed apply:
//!      <-------- NeedFull{g} -----------
//!      ---- Checkpoint{g, e', full} --->
//!
//!  idle link:  Heartbeat{g} both ways every heartbeat_ms
//!
//!  P silent for failure_ms (P's host died):
//!                                  S: RequestLease(g -> g+1) to the store
//!                                  granted: Promote{g+1, last applied epoch}:
//!                                     resume the guest from that image, serve
//!                                  refused: Fenced (someone else is active)
//!
//!  S silent for failure_ms (S's host died, or the link is cut):
//!  P: outputs stay held; RequestLease(g -> g+1)
//!     granted: generation = g+1, Degraded: release held outputs if the policy is
//!              `release`, else hold until a new secondary (generation g+1) acks
//!     refused: Fenced: never release again (S took over)
//! ```
//!
//! Safety rests on two rules: (1) an output leaves only when a checkpoint containing
//! its cause is acknowledged at the primary's generation, or when the primary itself
//! holds the lease of a newer generation; (2) the lease moves from g to g+1 by
//! compare-and-swap in the store, so one node at most is active per generation, and a
//! secondary never acknowledges a frame of any other generation than its own, so a
//! stale primary cannot collect acks.

use std::collections::VecDeque;

/// A pair generation (fencing token).
pub type Generation = u64;
/// A checkpoint epoch within a generation.
pub type Epoch = u64;
/// Identifies one output (a reply) held by the primary.
pub type OutputId = u64;

/// Timing and bounds of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairConfig {
    /// Send a heartbeat when nothing else was sent for this long.
    pub heartbeat_ms: u64,
    /// The peer is declared lost after this long without any message from it.
    pub failure_ms: u64,
    /// Most checkpoints sent and not yet acknowledged; past it the primary does not end
    /// epochs (the guest keeps running, the delta grows).
    pub max_inflight: usize,
    /// Most outputs held; past it the driver must stop taking requests.
    pub max_held: usize,
    /// A new secondary has this long to start and say its first word (it may have to
    /// fetch and compile the module) before it is declared lost.
    pub attach_grace_ms: u64,
}

impl Default for PairConfig {
    fn default() -> Self {
        PairConfig {
            heartbeat_ms: 50,
            failure_ms: 200,
            max_inflight: 8,
            max_held: 10_000,
            attach_grace_ms: 5_000,
        }
    }
}

/// What the primary does with held outputs when it has lost its secondary and holds the
/// lease of the next generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossPolicy {
    /// Keep holding until a new secondary is synced.
    Hold,
    /// Release them, unprotected (degraded).
    Release,
}

/// A message between the two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Primary to secondary: the checkpoint of an epoch (its bytes travel with it).
    Checkpoint {
        /// Generation.
        generation: Generation,
        /// Epoch.
        epoch: Epoch,
        /// Whether it is a full image.
        full: bool,
    },
    /// Secondary to primary: every epoch up to this one is applied.
    Ack {
        /// Generation.
        generation: Generation,
        /// Epoch.
        epoch: Epoch,
    },
    /// Secondary to primary: send a full image (after a gap or a failed apply).
    NeedFull {
        /// Generation.
        generation: Generation,
    },
    /// Either way: still here.
    Heartbeat {
        /// Generation.
        generation: Generation,
    },
}

/// The primary's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrimaryMode {
    /// A secondary is attached but has no full image yet.
    Syncing,
    /// The secondary acknowledges checkpoints.
    Protected,
    /// The secondary went silent; the lease of the next generation is being asked for.
    Suspect,
    /// Holds the lease of its generation with no secondary.
    Degraded,
    /// Lost the lease: must never release an output again.
    Fenced,
}

/// What the primary asks its driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrimaryAction {
    /// Send a message to the secondary (for a checkpoint: capture the delta first).
    Send(Msg),
    /// Release these outputs to their clients.
    Release(Vec<OutputId>),
    /// Ask the store for the lease `from -> to` (compare-and-swap).
    RequestLease {
        /// Current generation.
        from: Generation,
        /// Next generation.
        to: Generation,
    },
    /// Lost the lease: stop the instance, release nothing.
    Fence,
}

/// The primary of a pair.
#[derive(Clone, Debug)]
pub struct Primary {
    cfg: PairConfig,
    policy: LossPolicy,
    generation: Generation,
    /// The epoch running now: outputs produced now belong to it.
    epoch: Epoch,
    /// Highest epoch acknowledged in this generation.
    acked: Option<Epoch>,
    /// Highest epoch sent.
    sent: Option<Epoch>,
    /// First epoch sent to the current secondary.
    base: Epoch,
    need_full: bool,
    /// A full image sent and not acknowledged yet (it may take long to send and apply).
    full_inflight: Option<Epoch>,
    has_secondary: bool,
    /// Whether the current secondary has been heard at all.
    heard: bool,
    last_heard_ms: u64,
    /// When acknowledgements last moved forward (or the secondary was attached).
    last_progress_ms: u64,
    last_sent_ms: u64,
    mode: PrimaryMode,
    held: VecDeque<(Epoch, OutputId)>,
    /// Output commit (level `ft`): outputs wait for the ack of their epoch, and a lost
    /// secondary means taking the next generation's lease. Off (level `ha`'s periodic
    /// checkpoints to a standby): outputs leave at once, and a silent standby only
    /// makes the primary `degraded` (the control plane decides about standbys).
    commit: bool,
}

impl Primary {
    /// A primary at generation `generation` with a secondary attached (which needs a full image).
    pub fn new(
        cfg: PairConfig,
        policy: LossPolicy,
        generation: Generation,
        now_ms: u64,
    ) -> Primary {
        Primary {
            cfg,
            policy,
            generation,
            epoch: 1,
            acked: None,
            sent: None,
            base: 1,
            need_full: true,
            full_inflight: None,
            has_secondary: true,
            heard: false,
            last_heard_ms: now_ms,
            last_progress_ms: now_ms,
            last_sent_ms: now_ms,
            mode: PrimaryMode::Syncing,
            held: VecDeque::new(),
            commit: true,
        }
    }

    /// A secondary that promoted itself: active at `generation`, no secondary yet (degraded).
    pub fn promoted(
        cfg: PairConfig,
        policy: LossPolicy,
        generation: Generation,
        now_ms: u64,
    ) -> Primary {
        let mut p = Primary::new(cfg, policy, generation, now_ms);
        p.has_secondary = false;
        p.mode = PrimaryMode::Degraded;
        p
    }

    /// Mode.
    pub fn mode(&self) -> PrimaryMode {
        self.mode
    }

    /// Whether [`Primary::tick`] has anything to do (a secondary to heartbeat and
    /// watch): without one, a caller need not wake up for it.
    pub fn needs_time(&self) -> bool {
        self.has_secondary && !matches!(self.mode, PrimaryMode::Fenced | PrimaryMode::Suspect)
    }

    /// Generation.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The epoch running now.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Highest epoch acknowledged.
    pub fn acked(&self) -> Option<Epoch> {
        self.acked
    }

    /// Checkpoints sent to the current secondary and not acknowledged yet.
    pub fn inflight(&self) -> usize {
        let first_unacked = self.acked.map(|a| a + 1).unwrap_or(self.base);
        self.sent
            .map(|s| (s + 1).saturating_sub(first_unacked) as usize)
            .unwrap_or(0)
    }

    /// Whether an output of the running epoch is held (ending the epoch now would let it
    /// leave one round trip sooner: the driver's low-latency mode).
    pub fn waiting(&self) -> bool {
        self.held.back().is_some_and(|(e, _)| *e == self.epoch)
    }

    /// Outputs held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Whether the driver may take another request (outputs are bounded).
    pub fn accepting(&self) -> bool {
        self.mode != PrimaryMode::Fenced && self.held.len() < self.cfg.max_held
    }

    /// Change what happens to held outputs when the secondary is lost (a level change).
    pub fn set_policy(&mut self, policy: LossPolicy) {
        self.policy = policy;
    }

    /// Whether outputs wait for acks (see [`Primary::set_commit`]).
    pub fn commit(&self) -> bool {
        self.commit
    }

    /// Turn output commit on (level `ft`) or off (level `ha`: checkpoints go to a
    /// standby and outputs leave at once). Turning it off releases every held output.
    /// Turning it on holds outputs from now until the secondary acknowledges an epoch
    /// that contains them (a secondary attached afterwards gets a full image first).
    pub fn set_commit(&mut self, commit: bool) -> Vec<PrimaryAction> {
        self.commit = commit;
        if commit || self.held.is_empty() {
            return vec![];
        }
        vec![PrimaryAction::Release(
            self.held.drain(..).map(|(_, id)| id).collect(),
        )]
    }

    /// The control plane took the secondary (or standby) away on purpose (a lower
    /// level): no secondary from now on, held outputs released, no lease asked.
    pub fn detach(&mut self) -> Vec<PrimaryAction> {
        if self.mode == PrimaryMode::Fenced {
            return vec![];
        }
        self.has_secondary = false;
        self.acked = None;
        self.sent = None;
        self.full_inflight = None;
        self.need_full = false;
        if self.mode != PrimaryMode::Suspect {
            self.mode = PrimaryMode::Degraded;
        }
        if self.held.is_empty() {
            return vec![];
        }
        vec![PrimaryAction::Release(
            self.held.drain(..).map(|(_, id)| id).collect(),
        )]
    }

    fn releases_unprotected(&self) -> bool {
        !self.commit
            || self.mode == PrimaryMode::Degraded
                && self.policy == LossPolicy::Release
                && !self.has_secondary
    }

    /// The guest produced output `id` during the current epoch.
    pub fn output(&mut self, id: OutputId) -> Vec<PrimaryAction> {
        match self.mode {
            PrimaryMode::Fenced => vec![],
            _ if self.releases_unprotected() => vec![PrimaryAction::Release(vec![id])],
            _ => {
                self.held.push_back((self.epoch, id));
                vec![]
            }
        }
    }

    /// The driver wants to end the current epoch (timer, or an output is waiting and the
    /// link is idle). Returns the checkpoint to capture and send, or nothing (no
    /// secondary, fenced, or too many checkpoints in flight: the epoch goes on).
    pub fn end_epoch(&mut self, now_ms: u64) -> Vec<PrimaryAction> {
        if !self.has_secondary || matches!(self.mode, PrimaryMode::Fenced | PrimaryMode::Suspect) {
            return vec![];
        }
        if self.inflight() >= self.cfg.max_inflight && !self.need_full {
            return vec![];
        }
        let e = self.epoch;
        let full = std::mem::take(&mut self.need_full);
        if full {
            self.full_inflight = Some(e);
        }
        debug_assert!(self.sent.is_none_or(|s| s < e), "epochs only go forward");
        self.sent = Some(e);
        self.epoch += 1;
        self.last_sent_ms = now_ms;
        vec![PrimaryAction::Send(Msg::Checkpoint {
            generation: self.generation,
            epoch: e,
            full,
        })]
    }

    /// A message from the secondary.
    pub fn receive(&mut self, msg: Msg, now_ms: u64) -> Vec<PrimaryAction> {
        let msg_gen = match msg {
            Msg::Ack { generation, .. }
            | Msg::NeedFull { generation }
            | Msg::Heartbeat { generation } => generation,
            Msg::Checkpoint { .. } => return vec![],
        };
        if msg_gen != self.generation
            || !self.has_secondary
            || matches!(self.mode, PrimaryMode::Fenced | PrimaryMode::Suspect)
        {
            return vec![];
        }
        self.last_heard_ms = now_ms;
        self.heard = true;
        match msg {
            Msg::Ack { epoch, .. } => {
                // An ack for an epoch never sent is a protocol violation: ignore it.
                if self.sent.is_none_or(|s| epoch > s) || self.acked.is_some_and(|a| epoch <= a) {
                    return vec![];
                }
                self.acked = Some(epoch);
                self.last_progress_ms = now_ms;
                if self.full_inflight.is_some_and(|f| f <= epoch) {
                    self.full_inflight = None;
                }
                self.mode = PrimaryMode::Protected;
                let mut out = Vec::new();
                while self.held.front().is_some_and(|(e, _)| *e <= epoch) {
                    out.push(self.held.pop_front().expect("front exists").1);
                }
                if out.is_empty() {
                    vec![]
                } else {
                    vec![PrimaryAction::Release(out)]
                }
            }
            // While a full image is on its way, a request for one is the secondary
            // still waiting for it (it asks at every heartbeat until it has an image):
            // sending another would only queue it behind the first. A full image that
            // never arrives is sent again after the progress window (see `tick`).
            Msg::NeedFull { .. } if self.full_inflight.is_some() => vec![],
            Msg::NeedFull { .. } => {
                self.need_full = true;
                self.mode = PrimaryMode::Syncing;
                vec![]
            }
            _ => vec![],
        }
    }

    /// Time passes: heartbeat, and detect a lost secondary.
    pub fn tick(&mut self, now_ms: u64) -> Vec<PrimaryAction> {
        if !self.has_secondary || matches!(self.mode, PrimaryMode::Fenced | PrimaryMode::Suspect) {
            return vec![];
        }
        // Checkpoints in flight and no ack for a failure window, while the secondary still
        // talks: frames were lost on the way; start again from a full image. A full image
        // in flight gets the attach grace instead: a big one takes long to send and
        // apply, and sending it again would only queue it behind itself.
        let unacked = self.sent.is_some_and(|s| self.acked.is_none_or(|a| a < s));
        let progress_window = if self.full_inflight.is_some() {
            self.cfg.failure_ms.max(self.cfg.attach_grace_ms)
        } else {
            self.cfg.failure_ms
        };
        if unacked
            && !self.need_full
            && now_ms.saturating_sub(self.last_progress_ms) >= progress_window
        {
            self.need_full = true;
            self.last_progress_ms = now_ms;
        }
        let limit = if self.heard {
            self.cfg.failure_ms
        } else {
            self.cfg.attach_grace_ms
        };
        if now_ms.saturating_sub(self.last_heard_ms) >= limit {
            if !self.commit {
                // A silent standby: degraded until it speaks again (the control plane
                // replaces it); nothing is held, no lease is needed.
                self.mode = PrimaryMode::Degraded;
                if now_ms.saturating_sub(self.last_sent_ms) >= self.cfg.heartbeat_ms {
                    self.last_sent_ms = now_ms;
                    return vec![PrimaryAction::Send(Msg::Heartbeat {
                        generation: self.generation,
                    })];
                }
                return vec![];
            }
            self.mode = PrimaryMode::Suspect;
            return vec![PrimaryAction::RequestLease {
                from: self.generation,
                to: self.generation + 1,
            }];
        }
        if now_ms.saturating_sub(self.last_sent_ms) >= self.cfg.heartbeat_ms {
            self.last_sent_ms = now_ms;
            return vec![PrimaryAction::Send(Msg::Heartbeat {
                generation: self.generation,
            })];
        }
        vec![]
    }

    /// The store's answer to [`PrimaryAction::RequestLease`].
    pub fn lease_result(&mut self, granted: bool) -> Vec<PrimaryAction> {
        if self.mode != PrimaryMode::Suspect {
            return vec![];
        }
        if !granted {
            self.mode = PrimaryMode::Fenced;
            self.held.clear();
            return vec![PrimaryAction::Fence];
        }
        self.generation += 1;
        self.has_secondary = false;
        self.acked = None;
        self.sent = None;
        self.full_inflight = None;
        self.mode = PrimaryMode::Degraded;
        if self.policy == LossPolicy::Release {
            let out: Vec<OutputId> = self.held.drain(..).map(|(_, id)| id).collect();
            if !out.is_empty() {
                return vec![PrimaryAction::Release(out)];
            }
        }
        vec![]
    }

    /// The link to the secondary was re-established: what was in flight may be lost, so
    /// the next checkpoint is a full image.
    pub fn resync(&mut self) {
        if self.has_secondary {
            self.need_full = true;
        }
    }

    /// The control plane attached a new secondary (at this primary's generation): it
    /// gets a full image next, then deltas; held outputs wait for its first ack.
    pub fn attach_secondary(&mut self, now_ms: u64) {
        // Fenced: done. Suspect: a lease request is out; whatever its answer, the
        // control plane names the secondary again for the generation that follows.
        if matches!(self.mode, PrimaryMode::Fenced | PrimaryMode::Suspect) {
            return;
        }
        self.has_secondary = true;
        self.heard = false;
        self.last_progress_ms = now_ms;
        self.need_full = true;
        self.full_inflight = None;
        self.acked = None;
        self.sent = None;
        self.base = self.epoch;
        self.mode = PrimaryMode::Syncing;
        self.last_heard_ms = now_ms;
        self.last_sent_ms = now_ms;
    }
}

/// The secondary's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecondaryMode {
    /// No full image yet.
    Syncing,
    /// Has an image and follows the primary.
    Synced,
    /// The primary went silent; asking for the lease.
    Promoting,
    /// Took over: now the active replica (the driver runs a [`Primary`]).
    Active,
    /// Lost the race for the lease, or was replaced: discard.
    Fenced,
}

/// What the secondary asks its driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecondaryAction {
    /// Decode and apply the checkpoint's bytes atomically, then call
    /// [`Secondary::applied`] with the outcome.
    Apply {
        /// Epoch.
        epoch: Epoch,
        /// Full image.
        full: bool,
    },
    /// Send a message to the primary.
    Send(Msg),
    /// Ask the store for the lease `from -> to`.
    RequestLease {
        /// Current generation.
        from: Generation,
        /// Next generation.
        to: Generation,
    },
    /// Resume the guest from the image of `epoch` and become active at `generation`.
    Promote {
        /// The new generation.
        generation: Generation,
        /// The epoch of the image resumed from.
        epoch: Epoch,
    },
    /// Throw the image away; this replica is done.
    Discard,
}

/// The secondary of a pair.
#[derive(Clone, Debug)]
pub struct Secondary {
    cfg: PairConfig,
    generation: Generation,
    applied: Option<Epoch>,
    applying: Option<(Epoch, bool)>,
    heard: bool,
    last_heard_ms: u64,
    last_sent_ms: u64,
    mode: SecondaryMode,
    /// Takes over on its own when the primary falls silent (level `ft`). Off for a
    /// standby (level `ha`): it keeps the last image and the control plane decides.
    promote: bool,
}

impl Secondary {
    /// A secondary attached at generation `generation`.
    pub fn new(cfg: PairConfig, generation: Generation, now_ms: u64) -> Secondary {
        Secondary {
            cfg,
            generation,
            applied: None,
            applying: None,
            heard: false,
            last_heard_ms: now_ms,
            last_sent_ms: now_ms,
            mode: SecondaryMode::Syncing,
            promote: true,
        }
    }

    /// Whether this replica takes over on its own when the primary falls silent
    /// (level `ft`), or is a standby that only keeps the image (level `ha`).
    pub fn set_promote(&mut self, promote: bool) {
        self.promote = promote;
    }

    /// Mode.
    pub fn mode(&self) -> SecondaryMode {
        self.mode
    }

    /// Last applied epoch.
    pub fn applied_epoch(&self) -> Option<Epoch> {
        self.applied
    }

    /// Bytes of a frame of `generation` are arriving from the primary (a large frame is
    /// read in pieces): the primary is alive. Only liveness: no request for an image.
    pub fn touch(&mut self, generation: Generation, now_ms: u64) {
        if generation == self.generation
            && matches!(self.mode, SecondaryMode::Syncing | SecondaryMode::Synced)
        {
            self.last_heard_ms = now_ms;
            self.heard = true;
        }
    }

    /// A message from the primary.
    pub fn receive(&mut self, msg: Msg, now_ms: u64) -> Vec<SecondaryAction> {
        let msg_gen = match msg {
            Msg::Checkpoint { generation, .. } | Msg::Heartbeat { generation } => generation,
            Msg::Ack { .. } | Msg::NeedFull { .. } => return vec![],
        };
        // Never anything of another generation: this is the fence on stale primaries.
        if msg_gen != self.generation
            || !matches!(self.mode, SecondaryMode::Syncing | SecondaryMode::Synced)
        {
            return vec![];
        }
        self.last_heard_ms = now_ms;
        self.heard = true;
        let Msg::Checkpoint { epoch, full, .. } = msg else {
            // A primary that talks but sends no image: ask for one.
            if self.applied.is_none() && self.applying.is_none() {
                return vec![self.send(
                    Msg::NeedFull {
                        generation: self.generation,
                    },
                    now_ms,
                )];
            }
            return vec![];
        };
        if self.applying.is_some() {
            // One apply at a time; a later frame while applying is a gap: ask again.
            return vec![];
        }
        // A full image moves the image forward only: a late full image of an older
        // epoch (reordered behind newer deltas) would take back state that was already
        // acknowledged, and outputs released on that ack would be lost on failover.
        let next = match self.applied {
            None => full,
            Some(a) => (full && epoch > a) || epoch == a + 1,
        };
        if next {
            self.applying = Some((epoch, full));
            return vec![SecondaryAction::Apply { epoch, full }];
        }
        match self.applied {
            // Already have it (a duplicate): acknowledge again what we have.
            Some(a) if epoch <= a => vec![self.send(
                Msg::Ack {
                    generation: self.generation,
                    epoch: a,
                },
                now_ms,
            )],
            // A gap (lost or reordered frame), or a delta before any image.
            _ => vec![self.send(
                Msg::NeedFull {
                    generation: self.generation,
                },
                now_ms,
            )],
        }
    }

    fn send(&mut self, m: Msg, now_ms: u64) -> SecondaryAction {
        self.last_sent_ms = now_ms;
        SecondaryAction::Send(m)
    }

    /// The driver finished an [`SecondaryAction::Apply`]: `ok` if the frame decoded and
    /// was applied, `false` if it was refused (corrupt, torn, out of memory); the image
    /// is then as before.
    pub fn applied(&mut self, epoch: Epoch, ok: bool, now_ms: u64) -> Vec<SecondaryAction> {
        let Some((e, full)) = self.applying.take() else {
            return vec![];
        };
        if e != epoch || !matches!(self.mode, SecondaryMode::Syncing | SecondaryMode::Synced) {
            return vec![];
        }
        if !ok {
            return vec![self.send(
                Msg::NeedFull {
                    generation: self.generation,
                },
                now_ms,
            )];
        }
        debug_assert!(full || self.applied.is_some_and(|a| a + 1 == e));
        self.applied = Some(e);
        self.mode = SecondaryMode::Synced;
        vec![self.send(
            Msg::Ack {
                generation: self.generation,
                epoch: e,
            },
            now_ms,
        )]
    }

    /// Time passes: heartbeat, and detect a dead primary.
    pub fn tick(&mut self, now_ms: u64) -> Vec<SecondaryAction> {
        if !matches!(self.mode, SecondaryMode::Syncing | SecondaryMode::Synced) {
            return vec![];
        }
        let limit = if self.heard {
            self.cfg.failure_ms
        } else {
            self.cfg.attach_grace_ms
        };
        if now_ms.saturating_sub(self.last_heard_ms) >= limit && self.promote {
            if self.mode == SecondaryMode::Synced && self.applying.is_none() {
                self.mode = SecondaryMode::Promoting;
                return vec![SecondaryAction::RequestLease {
                    from: self.generation,
                    to: self.generation + 1,
                }];
            }
            // Nothing to resume from: this replica cannot take over.
            if self.mode == SecondaryMode::Syncing {
                self.mode = SecondaryMode::Fenced;
                return vec![SecondaryAction::Discard];
            }
        }
        if now_ms.saturating_sub(self.last_sent_ms) >= self.cfg.heartbeat_ms {
            return vec![self.send(
                Msg::Heartbeat {
                    generation: self.generation,
                },
                now_ms,
            )];
        }
        vec![]
    }

    /// The store's answer to [`SecondaryAction::RequestLease`].
    pub fn lease_result(&mut self, granted: bool) -> Vec<SecondaryAction> {
        if self.mode != SecondaryMode::Promoting {
            return vec![];
        }
        if granted {
            self.mode = SecondaryMode::Active;
            let epoch = self.applied.expect("only a synced secondary promotes");
            vec![SecondaryAction::Promote {
                generation: self.generation + 1,
                epoch,
            }]
        } else {
            self.mode = SecondaryMode::Fenced;
            vec![SecondaryAction::Discard]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PairConfig {
        PairConfig::default()
    }

    #[test]
    fn outputs_wait_for_the_ack_of_their_epoch() {
        let mut p = Primary::new(cfg(), LossPolicy::Hold, 1, 0);
        let mut s = Secondary::new(cfg(), 1, 0);
        assert!(p.output(10).is_empty());
        let send = p.end_epoch(1);
        assert_eq!(
            send,
            vec![PrimaryAction::Send(Msg::Checkpoint {
                generation: 1,
                epoch: 1,
                full: true
            })]
        );
        assert!(p.output(11).is_empty(), "epoch 2's output");
        let apply = s.receive(
            Msg::Checkpoint {
                generation: 1,
                epoch: 1,
                full: true,
            },
            2,
        );
        assert_eq!(
            apply,
            vec![SecondaryAction::Apply {
                epoch: 1,
                full: true
            }]
        );
        let ack = s.applied(1, true, 3);
        assert_eq!(
            ack,
            vec![SecondaryAction::Send(Msg::Ack {
                generation: 1,
                epoch: 1
            })]
        );
        assert_eq!(
            p.receive(
                Msg::Ack {
                    generation: 1,
                    epoch: 1
                },
                4
            ),
            vec![PrimaryAction::Release(vec![10])]
        );
        assert_eq!(p.held(), 1);
        assert_eq!(p.mode(), PrimaryMode::Protected);
    }

    #[test]
    fn a_slow_full_image_is_not_sent_again_while_the_secondary_talks() {
        let c = cfg();
        let mut p = Primary::new(c, LossPolicy::Hold, 1, 0);
        let hb = |_t: u64| Msg::Heartbeat { generation: 1 };
        assert!(matches!(
            p.end_epoch(0)[..],
            [PrimaryAction::Send(Msg::Checkpoint { full: true, .. })]
        ));
        // The image takes longer than a failure window; the secondary keeps talking.
        let mut t = 0;
        while t < c.attach_grace_ms - c.heartbeat_ms {
            t += c.heartbeat_ms;
            p.receive(hb(t), t);
            p.tick(t);
        }
        assert!(
            matches!(
                p.end_epoch(t)[..],
                [PrimaryAction::Send(Msg::Checkpoint { full: false, .. })]
            ),
            "no second full image within the attach grace"
        );
        assert!(
            p.receive(
                Msg::Ack {
                    generation: 1,
                    epoch: 1
                },
                t
            )
            .is_empty()
        );
        // Deltas in flight get the failure window: after it, a full image again.
        let t0 = t;
        while t < t0 + c.failure_ms + c.heartbeat_ms {
            t += c.heartbeat_ms;
            p.receive(hb(t), t);
            p.tick(t);
        }
        assert!(matches!(
            p.end_epoch(t)[..],
            [PrimaryAction::Send(Msg::Checkpoint { full: true, .. })]
        ));
    }

    #[test]
    fn secondary_refuses_other_generations_and_asks_for_full_on_gaps() {
        let mut s = Secondary::new(cfg(), 2, 0);
        assert!(
            s.receive(
                Msg::Checkpoint {
                    generation: 1,
                    epoch: 1,
                    full: true
                },
                1
            )
            .is_empty()
        );
        assert_eq!(
            s.receive(
                Msg::Checkpoint {
                    generation: 2,
                    epoch: 3,
                    full: false
                },
                1
            ),
            vec![SecondaryAction::Send(Msg::NeedFull { generation: 2 })]
        );
        s.receive(
            Msg::Checkpoint {
                generation: 2,
                epoch: 4,
                full: true,
            },
            2,
        );
        s.applied(4, true, 2);
        assert_eq!(
            s.receive(
                Msg::Checkpoint {
                    generation: 2,
                    epoch: 6,
                    full: false
                },
                3
            ),
            vec![SecondaryAction::Send(Msg::NeedFull { generation: 2 })]
        );
        assert_eq!(
            s.receive(
                Msg::Checkpoint {
                    generation: 2,
                    epoch: 4,
                    full: false
                },
                3
            ),
            vec![SecondaryAction::Send(Msg::Ack {
                generation: 2,
                epoch: 4
            })]
        );
        // A corrupt frame: refused, image unchanged, full image requested.
        s.receive(
            Msg::Checkpoint {
                generation: 2,
                epoch: 5,
                full: false,
            },
            4,
        );
        assert_eq!(
            s.applied(5, false, 4),
            vec![SecondaryAction::Send(Msg::NeedFull { generation: 2 })]
        );
        assert_eq!(s.applied_epoch(), Some(4));
    }

    #[test]
    fn a_late_full_image_never_takes_the_image_back() {
        let mut s = Secondary::new(cfg(), 1, 0);
        s.receive(
            Msg::Checkpoint {
                generation: 1,
                epoch: 5,
                full: true,
            },
            0,
        );
        s.applied(5, true, 0);
        s.receive(
            Msg::Checkpoint {
                generation: 1,
                epoch: 6,
                full: false,
            },
            1,
        );
        s.applied(6, true, 1);
        // The full image of epoch 4, delayed on the way: acknowledged as what we have.
        assert_eq!(
            s.receive(
                Msg::Checkpoint {
                    generation: 1,
                    epoch: 4,
                    full: true
                },
                2
            ),
            vec![SecondaryAction::Send(Msg::Ack {
                generation: 1,
                epoch: 6
            })]
        );
        assert_eq!(s.applied_epoch(), Some(6));
    }

    #[test]
    fn silent_primary_leads_to_promotion_or_fencing() {
        let mut s = Secondary::new(cfg(), 1, 0);
        s.receive(
            Msg::Checkpoint {
                generation: 1,
                epoch: 1,
                full: true,
            },
            0,
        );
        s.applied(1, true, 0);
        assert_eq!(
            s.tick(500),
            vec![SecondaryAction::RequestLease { from: 1, to: 2 }]
        );
        let mut t = s.clone();
        assert_eq!(
            s.lease_result(true),
            vec![SecondaryAction::Promote {
                generation: 2,
                epoch: 1
            }]
        );
        assert_eq!(t.lease_result(false), vec![SecondaryAction::Discard]);
    }

    #[test]
    fn primary_that_loses_the_lease_never_releases() {
        let mut p = Primary::new(cfg(), LossPolicy::Release, 1, 0);
        p.output(1);
        p.end_epoch(1);
        assert_eq!(
            p.tick(10_000),
            vec![PrimaryAction::RequestLease { from: 1, to: 2 }]
        );
        let mut q = p.clone();
        assert_eq!(p.lease_result(false), vec![PrimaryAction::Fence]);
        assert!(p.output(2).is_empty());
        assert!(
            p.receive(
                Msg::Ack {
                    generation: 1,
                    epoch: 1
                },
                501
            )
            .is_empty()
        );
        // Granted instead: generation moves on, held outputs go out under `release`.
        assert_eq!(q.lease_result(true), vec![PrimaryAction::Release(vec![1])]);
        assert_eq!((q.generation(), q.mode()), (2, PrimaryMode::Degraded));
    }

    #[test]
    fn without_commit_outputs_leave_at_once_and_silence_asks_no_lease() {
        let mut p = Primary::new(cfg(), LossPolicy::Hold, 1, 0);
        assert!(p.output(1).is_empty(), "held under output commit");
        assert_eq!(p.set_commit(false), vec![PrimaryAction::Release(vec![1])]);
        assert_eq!(p.output(2), vec![PrimaryAction::Release(vec![2])]);
        // A checkpoint still goes to the standby when the driver ends an epoch.
        assert!(matches!(
            p.end_epoch(10).as_slice(),
            [PrimaryAction::Send(Msg::Checkpoint { full: true, .. })]
        ));
        // A standby silent past every window: degraded, heartbeats, never a lease.
        for t in (0..20_000).step_by(10) {
            for a in p.tick(t) {
                assert!(!matches!(a, PrimaryAction::RequestLease { .. }), "{a:?}");
            }
        }
        assert_eq!(p.mode(), PrimaryMode::Degraded);
        // It speaks again: protected.
        assert!(
            p.receive(
                Msg::Ack {
                    generation: 1,
                    epoch: 1
                },
                20_000
            )
            .is_empty()
        );
        assert_eq!(p.mode(), PrimaryMode::Protected);
        // Commit back on: outputs wait again for an epoch's ack.
        assert!(p.set_commit(true).is_empty());
        assert!(p.output(3).is_empty());
        assert_eq!(p.held(), 1);
        // Detached on purpose: what was held leaves, nothing more is sent.
        assert_eq!(p.detach(), vec![PrimaryAction::Release(vec![3])]);
        assert!(p.end_epoch(20_010).is_empty());
        // Still under commit with policy hold, alone: held until commit goes off.
        assert!(p.output(4).is_empty());
        assert_eq!(p.set_commit(false), vec![PrimaryAction::Release(vec![4])]);
        assert_eq!(p.output(5), vec![PrimaryAction::Release(vec![5])]);
    }

    #[test]
    fn a_standby_never_takes_over_on_its_own() {
        let mut s = Secondary::new(cfg(), 1, 0);
        s.set_promote(false);
        let a = s.receive(
            Msg::Checkpoint {
                generation: 1,
                epoch: 1,
                full: true,
            },
            1,
        );
        assert_eq!(
            a,
            vec![SecondaryAction::Apply {
                epoch: 1,
                full: true
            }]
        );
        s.applied(1, true, 2);
        for t in (0..60_000).step_by(10) {
            for a in s.tick(t) {
                assert!(
                    matches!(a, SecondaryAction::Send(Msg::Heartbeat { .. })),
                    "{a:?}"
                );
            }
        }
        assert_eq!(s.mode(), SecondaryMode::Synced);
        assert_eq!(s.applied_epoch(), Some(1));
        // Made a promoting secondary again (level ft), it does.
        s.set_promote(true);
        assert!(matches!(
            s.tick(60_000).as_slice(),
            [SecondaryAction::RequestLease { from: 1, to: 2 }]
        ));
    }

    /// A guest call far longer than the failure window (the driver ends no epoch while
    /// the guest runs) is not silence: both sides keep ticking and exchanging
    /// heartbeats, nobody asks for a lease, and the call's output leaves on the ack of
    /// the epoch that ends after it.
    #[test]
    fn a_long_epoch_with_heartbeats_is_not_a_lost_peer() {
        let c = cfg();
        let mut p = Primary::new(c, LossPolicy::Hold, 1, 0);
        let mut s = Secondary::new(c, 1, 0);
        let full = p.end_epoch(0);
        assert_eq!(
            s.receive(
                Msg::Checkpoint {
                    generation: 1,
                    epoch: 1,
                    full: true
                },
                0
            ),
            vec![SecondaryAction::Apply {
                epoch: 1,
                full: true
            }]
        );
        assert_eq!(full.len(), 1);
        let ack = s.applied(1, true, 0);
        for a in ack {
            if let SecondaryAction::Send(m) = a {
                p.receive(m, 0);
            }
        }
        assert_eq!(p.mode(), PrimaryMode::Protected);
        // A call of 20 failure windows: only ticks and heartbeats in between.
        let long_ms = 20 * c.failure_ms;
        for t in (1..=long_ms).step_by(10) {
            for a in p.tick(t) {
                match a {
                    PrimaryAction::Send(m @ Msg::Heartbeat { .. }) => {
                        assert!(s.receive(m, t).is_empty());
                    }
                    other => panic!("primary at {t} ms: {other:?}"),
                }
            }
            for a in s.tick(t) {
                match a {
                    SecondaryAction::Send(m @ Msg::Heartbeat { .. }) => {
                        assert!(p.receive(m, t).is_empty());
                    }
                    other => panic!("secondary at {t} ms: {other:?}"),
                }
            }
        }
        assert_eq!(p.mode(), PrimaryMode::Protected);
        assert_eq!(s.mode(), SecondaryMode::Synced);
        // The call's output; the epoch ends after it; its ack releases it.
        assert!(p.output(7).is_empty());
        let send = p.end_epoch(long_ms + 1);
        assert!(matches!(
            send.as_slice(),
            [PrimaryAction::Send(Msg::Checkpoint {
                epoch: 2,
                full: false,
                ..
            })]
        ));
        assert_eq!(
            s.receive(
                Msg::Checkpoint {
                    generation: 1,
                    epoch: 2,
                    full: false
                },
                long_ms + 1
            ),
            vec![SecondaryAction::Apply {
                epoch: 2,
                full: false
            }]
        );
        let [SecondaryAction::Send(ack)] = s.applied(2, true, long_ms + 2)[..] else {
            panic!("one ack");
        };
        assert_eq!(
            p.receive(ack, long_ms + 2),
            vec![PrimaryAction::Release(vec![7])]
        );
    }
}
