//! The cluster's event history: persisted in the store (bounded), streamed live.
//!
//! # An event commits with the write it describes
//!
//! A write that has events (a workload placed, a node drained, a token created)
//! hands them to [`Events::commit`] (or [`Events::compare_and_swap`]) together with
//! its store transaction: the events' puts are appended to the transaction's
//! `success` branch, so the write and its events are one revision, or neither is
//! there. An event with no write of its own (the server started, a node's liveness
//! changed by the clock, a fence an agent reported) is recorded alone by
//! [`Events::emit`]. A write with no events goes straight to the store.
//!
//! ```text
//!  writer                       Events (next_seq lock)               store   followers
//!    | commit(txn, [e1, e2]) ---> lock; seq s, s+1 given; next = s+2
//!    |                            txn.success += put e1@s, put e2@s+1 -> txn
//!    |                              compares hold:  <- committed -------------> e1, e2
//!    |                              compares fail:  <- refused; next = s  (no event,
//!    |                                                                  nothing sent)
//!    |                              store error:    <- ?; next stays s+2 (a gap)
//!    | <--- result ---------------- unlock; trim when due
//! ```
//!
//! Sequence numbers, and why they stay dense:
//! - They are given under the `next_seq` lock, and the lock is held across the
//!   transaction and the broadcast. So event-bearing writes are serialised, one store
//!   transaction at a time: acceptable, they are rare control-plane writes (placements,
//!   failovers, drains, joins), and [`Events::emit`] already held the lock across its
//!   store put. Writes without events (heartbeat status, liveness) never take it.
//! - A transaction whose compare fails commits nothing: its numbers are handed back
//!   (the next event reuses them), so followers see no gap and no event is recorded or
//!   broadcast for a write that did not happen.
//! - A transaction that ends in a store error, or whose caller is dropped while the
//!   store works, may have committed (a timed-out etcd transaction, a redb commit on the
//!   blocking pool): its numbers are never reused, so no event can overwrite another;
//!   this is the one way a gap appears. Nothing is broadcast for it; if it did commit,
//!   the history (and a follower's replay after a reconnect) has it.
//! - Followers see events in sequence order: broadcast happens under the lock, and
//!   [`Events::last_seq`] waits for a transaction under way.
//! - Retry loops (conflict, re-read, retry) stage their events with each attempt:
//!   only the attempt that commits records them, once.
//!
//! **Several servers** give numbers from one sequence: each starts after the last
//! number it has seen stored, and the transaction also requires the first number it
//! uses to be free. When another server took it, the transaction (which then commits
//! nothing) is made again after the last number stored, once this server's store
//! watch has passed that one on. Each server's live followers get every server's
//! events: its own at their commit, the others' from the store's watch
//! ([`Events::publish`]), each once, in the store's order.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use avail_model::{ClusterEvent, EventKind};
use avail_store::{Compare, Op, Revision, Store, Txn, TxnResult};
use tokio::sync::broadcast;

use crate::keys;

#[cfg(test)]
mod tests;

/// How many events the store keeps; older ones are trimmed in batches.
pub const KEEP_EVENTS: u64 = 10_000;
/// Trim once per this many events.
const TRIM_EVERY: u64 = 500;
/// Events the broadcast to followers holds (shared by all); a follower's forwarder
/// that falls this far behind is dropped ([`crate::followers`]).
pub const STREAM_BUFFER: usize = 1024;
/// Events one write may carry, at most (a restart batch carries one per workload).
pub const MAX_EVENTS_PER_WRITE: usize = 256;

/// An event not recorded yet: staged with a write ([`Events::commit`]) or recorded
/// alone ([`Events::emit`]). Its sequence number and time are given when it commits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    /// Kind, e.g. `workload.placed`.
    pub kind: EventKind,
    /// The workload it is about.
    pub workload: Option<String>,
    /// The node it is about.
    pub node: Option<String>,
    /// What happened, for people.
    pub message: String,
}

impl NewEvent {
    /// An event of `kind` about `workload` and `node`.
    pub fn new(
        kind: EventKind,
        workload: Option<&str>,
        node: Option<&str>,
        message: impl Into<String>,
    ) -> NewEvent {
        NewEvent {
            kind,
            workload: workload.map(str::to_string),
            node: node.map(str::to_string),
            message: message.into(),
        }
    }

    fn at(self, seq: u64, time_ms: u64) -> ClusterEvent {
        ClusterEvent {
            seq,
            time_ms,
            kind: self.kind,
            workload: self.workload,
            node: self.node,
            message: self.message,
        }
    }
}

/// The multiple of [`TRIM_EVERY`] past [`KEEP_EVENTS`] among `first..=last`, if any:
/// when it commits, the events more than [`KEEP_EVENTS`] older than it are trimmed.
fn trim_due(first: u64, last: u64) -> Option<u64> {
    let due = last - last % TRIM_EVERY;
    (due >= first && due > KEEP_EVENTS).then_some(due)
}

/// The number of the last event stored (0: none).
async fn last_stored(store: &dyn Store) -> avail_store::Result<u64> {
    let (kvs, _) = store.range(keys::EVENTS).await?;
    Ok(kvs
        .last()
        .and_then(|kv| kv.key.strip_prefix(keys::EVENTS)?.parse::<u64>().ok())
        .unwrap_or(0))
}

/// Records events and fans them out.
pub struct Events {
    store: Arc<dyn Store>,
    /// The next sequence number. Held while events are committed (with their write)
    /// and broadcast, so followers see events in sequence order (see the module docs).
    next_seq: tokio::sync::Mutex<u64>,
    tx: broadcast::Sender<ClusterEvent>,
    /// The highest number seen in the store (written by any server).
    seen: AtomicU64,
    /// The highest number sent to the live followers.
    sent: std::sync::Mutex<u64>,
    /// Followers of the live stream, bounded.
    pub followers: crate::followers::Followers,
}

impl Events {
    /// Load the last sequence number from the store.
    pub async fn open(store: Arc<dyn Store>) -> avail_store::Result<Events> {
        let last = last_stored(store.as_ref()).await?;
        let (tx, _) = broadcast::channel(STREAM_BUFFER);
        Ok(Events {
            store,
            next_seq: tokio::sync::Mutex::new(last + 1),
            tx,
            seen: AtomicU64::new(last),
            sent: std::sync::Mutex::new(last),
            followers: Default::default(),
        })
    }

    /// Record an event that has no write of its own. A store failure is logged, never
    /// fatal to the caller.
    pub async fn emit(
        &self,
        kind: EventKind,
        workload: Option<&str>,
        node: Option<&str>,
        message: impl Into<String>,
    ) {
        let ev = NewEvent::new(kind, workload, node, message);
        if let Err(e) = self.commit(Txn::default(), vec![ev]).await {
            tracing::warn!(kind = %kind, "event not persisted: {e}");
        }
    }

    /// Run `txn` with `events` in its `success` branch: when its compares hold, the
    /// write and the events commit in one revision and the events are then broadcast;
    /// otherwise no event is recorded or broadcast, and their sequence numbers go to the
    /// next events. Without events this is just the store's transaction.
    pub async fn commit(
        &self,
        mut txn: Txn,
        events: Vec<NewEvent>,
    ) -> avail_store::Result<TxnResult> {
        // A decision pass's write holds only while its leader's term does (fencing: a
        // deposed leader's write in flight is refused, like a stale compare).
        if let Some(term) = crate::leader::current_term() {
            // A failure branch would run for a deposed leader: passes have none.
            debug_assert!(
                txn.failure.is_empty(),
                "a fenced write with a failure branch"
            );
            txn.compares
                .push(Compare::ModRev(crate::leader::LEADER_KEY.into(), term));
        }
        if events.is_empty() {
            return self.store.txn(txn).await;
        }
        assert!(
            events.len() <= MAX_EVENTS_PER_WRITE,
            "{} events in one write",
            events.len()
        );
        let n = events.len() as u64;
        let mut next = self.next_seq.lock().await;
        let mut tries = 0;
        let (first, result) = loop {
            // After the last number any server is seen to have used: several servers
            // give numbers from one sequence.
            let first = (*next).max(self.seen.load(Ordering::Acquire) + 1);
            let time_ms = crate::now_ms();
            let staged: Vec<ClusterEvent> = events
                .iter()
                .cloned()
                .zip(first..)
                .map(|(e, seq)| e.at(seq, time_ms))
                .collect();
            let mut attempt = txn.clone();
            attempt.success.extend(staged.iter().map(|ev| Op::Put {
                key: keys::event(ev.seq),
                value: serde_json::to_vec(ev).expect("event serialises"),
                lease: None,
            }));
            // The first number must be free: another server may have used it.
            attempt
                .compares
                .push(Compare::ModRev(keys::event(first), 0));
            // Taken before the store is asked: a caller dropped while the store works
            // (the transaction may still commit) leaves a gap, never a number given
            // twice.
            *next = first + n;
            let result = self.store.txn(attempt).await;
            match &result {
                Ok(r) if r.succeeded => {
                    for ev in staged {
                        tracing::info!(
                            seq = ev.seq,
                            kind = %ev.kind,
                            workload = ev.workload.as_deref(),
                            node = ev.node.as_deref(),
                            message = %ev.message,
                            revision = r.revision,
                            "event"
                        );
                        self.send(ev);
                    }
                }
                Ok(_) => {
                    // Nothing committed: the numbers are free again (still under the
                    // lock, so none was given since) unless another server took them.
                    *next = first;
                    tries += 1;
                    if tries < 8
                        && txn.failure.is_empty()
                        && let Ok(Some(_)) = self.store.get(&keys::event(first)).await
                    {
                        // Taken by another server: after the last one stored, once this
                        // server's watch has passed it along (followers see events in
                        // order), or a second at most.
                        let last = last_stored(self.store.as_ref()).await.unwrap_or(first);
                        for _ in 0..100 {
                            if self.seen.load(Ordering::Acquire) >= last {
                                break;
                            }
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        }
                        self.seen.fetch_max(last, Ordering::AcqRel);
                        continue;
                    }
                }
                Err(e) => {
                    tracing::warn!(first, last = first + n - 1, "events of a failed write: {e}");
                }
            }
            break (first, result);
        };
        drop(next);
        if result.as_ref().is_ok_and(|r| r.succeeded) {
            self.trim(first, first + n - 1).await;
        }
        result
    }

    /// [`Store::compare_and_swap`] with `events` committed with the put (see
    /// [`Events::commit`]): the new revision, or `None` when `key`'s `mod_rev` was not
    /// `expected` (and then no event is recorded).
    pub async fn compare_and_swap(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
        events: Vec<NewEvent>,
    ) -> avail_store::Result<Option<Revision>> {
        self.compare_and_swap_also(key, expected, value, vec![], events)
            .await
    }

    /// [`Events::compare_and_swap`], with the writes `also` in the same transaction.
    pub async fn compare_and_swap_also(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
        also: Vec<Op>,
        events: Vec<NewEvent>,
    ) -> avail_store::Result<Option<Revision>> {
        let mut success = vec![Op::Put {
            key: key.to_string(),
            value,
            lease: None,
        }];
        success.extend(also);
        let r = self
            .commit(
                Txn {
                    compares: vec![Compare::ModRev(key.to_string(), expected)],
                    success,
                    failure: vec![],
                },
                events,
            )
            .await?;
        Ok(r.succeeded.then_some(r.revision))
    }

    /// Record `event` alone unless `written` says a write already committed it: for
    /// events that describe a report (a standby failed) and ride on the write the report
    /// causes when there is one. A store error leaves the write's outcome unknown: the
    /// event is then not recorded again, only logged.
    pub(crate) async fn unless_written(
        &self,
        written: Result<bool, crate::state::StateError>,
        event: Option<NewEvent>,
    ) {
        let Some(ev) = event else { return };
        match written {
            Ok(true) => {}
            Ok(false) | Err(crate::state::StateError::Conflict(_)) => {
                self.emit(
                    ev.kind,
                    ev.workload.as_deref(),
                    ev.node.as_deref(),
                    ev.message,
                )
                .await
            }
            Err(e) => tracing::warn!(kind = %ev.kind, "event of a failed write: {e}"),
        }
    }

    /// Trim the oldest events once per [`TRIM_EVERY`]: when a multiple of it is among
    /// the sequence numbers `first..=last` just committed.
    async fn trim(&self, first: u64, last: u64) {
        let Some(due) = trim_due(first, last) else {
            return;
        };
        let from = due.saturating_sub(KEEP_EVENTS + TRIM_EVERY);
        let ops = (from..=due - KEEP_EVENTS)
            .map(|s| Op::Delete {
                key: keys::event(s),
            })
            .collect();
        let trim = Txn {
            compares: vec![],
            success: ops,
            failure: vec![],
        };
        if let Err(e) = self.store.txn(trim).await {
            tracing::warn!("event trim failed: {e}");
        }
    }

    /// Stored events with `seq > since`, optionally only those of one workload, oldest
    /// first: the first `limit` of them (paging forward), or with `tail` the last
    /// `limit`.
    pub async fn history(
        &self,
        since: u64,
        workload: Option<&str>,
        limit: usize,
        tail: bool,
    ) -> avail_store::Result<Vec<ClusterEvent>> {
        let (kvs, _) = self.store.range(keys::EVENTS).await?;
        let start = kvs.partition_point(|kv| kv.key <= keys::event(since));
        let matching = kvs[start..]
            .iter()
            .filter_map(|kv| serde_json::from_slice::<ClusterEvent>(&kv.value).ok())
            .filter(|e| workload.is_none_or(|w| e.workload.as_deref() == Some(w)));
        let mut out: Vec<ClusterEvent> = if tail {
            matching.collect()
        } else {
            matching.take(limit).collect()
        };
        if out.len() > limit {
            out.drain(..out.len() - limit);
        }
        Ok(out)
    }

    /// The last sequence number given here or seen from any server (0: none yet).
    /// Taken after a write under way here with events has committed (or not).
    pub async fn last_seq(&self) -> u64 {
        (*self.next_seq.lock().await - 1).max(self.seen.load(Ordering::Acquire))
    }

    /// An event as the store's watch delivers it (from any server): sent to the live
    /// followers of this server, in the store's order.
    pub fn publish(&self, ev: ClusterEvent) {
        self.seen.fetch_max(ev.seq, Ordering::AcqRel);
        self.send(ev);
    }

    /// Send `ev` to the live followers unless it (or a later one) went already: this
    /// server's own events go at their commit, everyone's again from the watch.
    fn send(&self, ev: ClusterEvent) {
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        if ev.seq > *sent {
            *sent = ev.seq;
            let _ = self.tx.send(ev);
        }
    }

    /// Stored events with `after < seq <= upto`, oldest first, at most `limit`: point
    /// reads of their keys (a page costs `limit` lookups, not a read of the history).
    /// Events trimmed or never persisted are skipped.
    pub async fn page(
        &self,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> avail_store::Result<Vec<ClusterEvent>> {
        let from = (after + 1).max(upto.saturating_sub(KEEP_EVENTS) + 1);
        let mut out = Vec::new();
        for seq in from..=upto {
            if out.len() >= limit {
                break;
            }
            if let Some(kv) = self.store.get(&keys::event(seq)).await?
                && let Ok(ev) = serde_json::from_slice::<ClusterEvent>(&kv.value)
            {
                out.push(ev);
            }
        }
        Ok(out)
    }

    /// Subscribe to live events.
    pub fn subscribe(&self) -> broadcast::Receiver<ClusterEvent> {
        self.tx.subscribe()
    }
}
