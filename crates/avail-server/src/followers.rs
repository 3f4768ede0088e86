//! Followers of the event stream (`GET /v1/events?follow=true`), bounded.
//!
//! - At most [`MAX_FOLLOWERS`] at once: one more is refused (`429`, JSON error).
//! - Each has a queue of live events of at most [`FOLLOWER_QUEUE`] events, filled by a
//!   small forwarding task from the server's broadcast channel (itself bounded:
//!   [`crate::events::STREAM_BUFFER`], shared by all).
//! - A follower whose queue is full (it does not read as fast as events come) is
//!   dropped: its queue is emptied at once (the memory comes back), its forwarder ends,
//!   and its stream ends with an error the next time it is polled, which closes the
//!   connection. The client reconnects with `since=<last seq it saw>`.
//! - History is replayed a page of [`REPLAY_PAGE`] events at a time, read from the
//!   store as the client takes them: a client that stops reading holds one page.
//!
//! So a follower holds at most a page, a full queue and the HTTP connection's own
//! buffers, and there are at most [`MAX_FOLLOWERS`] of them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use avail_model::ClusterEvent;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast};

/// Event stream followers at once, at most.
pub const MAX_FOLLOWERS: usize = 64;
/// Live events queued for one follower, at most; past it the follower is dropped.
pub const FOLLOWER_QUEUE: usize = 256;
/// Stored events replayed per store read.
pub const REPLAY_PAGE: usize = 256;

/// Followers now, queued events and followers dropped so far (for `/metrics`).
#[derive(Debug, Default)]
pub struct FollowerStats {
    active: AtomicUsize,
    queued: AtomicUsize,
    dropped: AtomicU64,
}

/// A snapshot of [`FollowerStats`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FollowerFigures {
    /// Followers connected.
    pub active: usize,
    /// Live events queued for them, in all.
    pub queued: usize,
    /// Followers dropped for falling behind, since the server started.
    pub dropped: u64,
}

/// The followers of one server.
pub struct Followers {
    slots: Arc<Semaphore>,
    stats: Arc<FollowerStats>,
}

impl Default for Followers {
    fn default() -> Self {
        Followers {
            slots: Arc::new(Semaphore::new(MAX_FOLLOWERS)),
            stats: Arc::default(),
        }
    }
}

struct Queue {
    events: VecDeque<ClusterEvent>,
    /// Dropped for falling behind (or the broadcast lagged past it).
    dropped: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Notify,
    stats: Arc<FollowerStats>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Push a live event; `false` when the follower is (now) dropped.
    fn push(&self, ev: ClusterEvent) -> bool {
        let mut q = self.lock();
        if q.dropped {
            return false;
        }
        if q.events.len() >= FOLLOWER_QUEUE {
            self.drop_follower(&mut q);
            return false;
        }
        q.events.push_back(ev);
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        drop(q);
        self.ready.notify_one();
        true
    }

    fn drop_follower(&self, q: &mut Queue) {
        self.stats
            .queued
            .fetch_sub(q.events.len(), Ordering::Relaxed);
        q.events = VecDeque::new();
        q.dropped = true;
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        self.ready.notify_one();
    }
}

/// One follower: its queue of live events, and its slot (returned on drop).
pub struct Follower {
    shared: Arc<Shared>,
    forwarder: tokio::task::JoinHandle<()>,
    _slot: OwnedSemaphorePermit,
}

/// The next thing a follower gets.
pub enum Next {
    /// A live event.
    Event(ClusterEvent),
    /// It was dropped for falling behind: end its stream with an error.
    Dropped,
    /// The server is shutting down.
    Closed,
}

impl Followers {
    /// A new follower of `rx` (subscribed before its history is read, so nothing falls
    /// between the two), or `None` when [`MAX_FOLLOWERS`] are connected.
    pub fn follow(&self, mut rx: broadcast::Receiver<ClusterEvent>) -> Option<Follower> {
        let slot = self.slots.clone().try_acquire_owned().ok()?;
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                events: VecDeque::new(),
                dropped: false,
            }),
            ready: Notify::new(),
            stats: self.stats.clone(),
        });
        let weak = Arc::downgrade(&shared);
        let forwarder = tokio::spawn(async move {
            loop {
                let ev = rx.recv().await;
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                match ev {
                    Ok(ev) => {
                        if !shared.push(ev) {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!("event follower dropped: {n} events behind");
                        let mut q = shared.lock();
                        shared.drop_follower(&mut q);
                        return;
                    }
                    Err(RecvError::Closed) => {
                        shared.ready.notify_one();
                        return;
                    }
                }
            }
        });
        Some(Follower {
            shared,
            forwarder,
            _slot: slot,
        })
    }

    /// The figures now.
    pub fn figures(&self) -> FollowerFigures {
        FollowerFigures {
            active: self.stats.active.load(Ordering::Relaxed),
            queued: self.stats.queued.load(Ordering::Relaxed),
            dropped: self.stats.dropped.load(Ordering::Relaxed),
        }
    }
}

impl Follower {
    /// Wait for the next live event.
    pub async fn next(&self) -> Next {
        loop {
            let notified = self.shared.ready.notified();
            {
                let mut q = self.shared.lock();
                if q.dropped {
                    return Next::Dropped;
                }
                if let Some(ev) = q.events.pop_front() {
                    self.shared.stats.queued.fetch_sub(1, Ordering::Relaxed);
                    return Next::Event(ev);
                }
            }
            if self.forwarder.is_finished() {
                return Next::Closed;
            }
            notified.await;
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.forwarder.abort();
        let q = self.shared.lock();
        self.shared
            .stats
            .queued
            .fetch_sub(q.events.len(), Ordering::Relaxed);
        self.shared.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64) -> ClusterEvent {
        ClusterEvent {
            seq,
            time_ms: 0,
            kind: avail_model::EventKind::ServerStarted,
            workload: None,
            node: None,
            message: String::new(),
        }
    }

    #[tokio::test]
    async fn followers_are_capped_queues_bounded_and_laggards_dropped() {
        let (tx, _) = broadcast::channel(4096);
        let f = Followers::default();
        let mut held: Vec<Follower> = (0..MAX_FOLLOWERS)
            .map(|_| f.follow(tx.subscribe()).expect("a slot"))
            .collect();
        assert!(f.follow(tx.subscribe()).is_none(), "past the cap");
        held.truncate(1);
        assert_eq!(f.figures().active, 1);
        let reader = f.follow(tx.subscribe()).expect("a slot came back");
        // One event reaches both.
        tx.send(ev(1)).unwrap();
        assert!(matches!(reader.next().await, Next::Event(e) if e.seq == 1));
        // `held[0]` never reads: past its queue it is dropped and its queue emptied.
        for s in 2..(FOLLOWER_QUEUE as u64 + 10) {
            tx.send(ev(s)).unwrap();
            assert!(matches!(reader.next().await, Next::Event(e) if e.seq == s));
        }
        while f.figures().dropped == 0 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(held[0].next().await, Next::Dropped));
        let fig = f.figures();
        assert_eq!((fig.active, fig.queued, fig.dropped), (2, 0, 1));
        drop(held);
        drop(reader);
        assert_eq!(f.figures().active, 0);
    }
}
