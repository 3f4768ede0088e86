//! The cluster's event history: persisted in the store (bounded), streamed live.

use std::sync::Arc;

use avail_model::ClusterEvent;
use avail_store::{Op, Store, Txn};
use tokio::sync::broadcast;

use crate::keys;

/// How many events the store keeps; older ones are trimmed in batches.
pub const KEEP_EVENTS: u64 = 10_000;
/// Trim once per this many events.
const TRIM_EVERY: u64 = 500;
/// Events the broadcast to followers holds (shared by all); a follower's forwarder
/// that falls this far behind is dropped ([`crate::followers`]).
pub const STREAM_BUFFER: usize = 1024;

/// Records events and fans them out.
pub struct Events {
    store: Arc<dyn Store>,
    /// The next sequence number; held while an event is persisted and broadcast, so
    /// followers see events in sequence order with no gaps.
    next_seq: tokio::sync::Mutex<u64>,
    tx: broadcast::Sender<ClusterEvent>,
    /// Followers of the live stream, bounded.
    pub followers: crate::followers::Followers,
}

impl Events {
    /// Load the last sequence number from the store.
    pub async fn open(store: Arc<dyn Store>) -> avail_store::Result<Events> {
        let (kvs, _) = store.range(keys::EVENTS).await?;
        let last = kvs
            .last()
            .and_then(|kv| kv.key.strip_prefix(keys::EVENTS)?.parse::<u64>().ok())
            .unwrap_or(0);
        let (tx, _) = broadcast::channel(STREAM_BUFFER);
        Ok(Events {
            store,
            next_seq: tokio::sync::Mutex::new(last + 1),
            tx,
            followers: Default::default(),
        })
    }

    /// Record an event. A store failure is logged, never fatal to the caller.
    pub async fn emit(
        &self,
        kind: &str,
        workload: Option<&str>,
        node: Option<&str>,
        message: impl Into<String>,
    ) {
        let mut next = self.next_seq.lock().await;
        let seq = *next;
        *next += 1;
        let ev = ClusterEvent {
            seq,
            time_ms: crate::now_ms(),
            kind: kind.to_string(),
            workload: workload.map(str::to_string),
            node: node.map(str::to_string),
            message: message.into(),
        };
        tracing::info!(seq, kind, workload, node, message = %ev.message, "event");
        let value = serde_json::to_vec(&ev).expect("event serialises");
        if let Err(e) = self.store.put(&keys::event(seq), value, None).await {
            tracing::warn!("event {seq} not persisted: {e}");
        }
        let _ = self.tx.send(ev);
        drop(next);
        if seq.is_multiple_of(TRIM_EVERY) && seq > KEEP_EVENTS {
            let from = seq.saturating_sub(KEEP_EVENTS + TRIM_EVERY);
            let ops = (from..=seq - KEEP_EVENTS)
                .map(|s| Op::Delete {
                    key: keys::event(s),
                })
                .collect();
            if let Err(e) = self
                .store
                .txn(Txn {
                    compares: vec![],
                    success: ops,
                    failure: vec![],
                })
                .await
            {
                tracing::warn!("event trim failed: {e}");
            }
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

    /// The last sequence number given (0: none yet). Taken after an event being recorded
    /// is persisted and broadcast.
    pub async fn last_seq(&self) -> u64 {
        *self.next_seq.lock().await - 1
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
