//! The cluster's event history: persisted in the store (bounded), streamed live.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use avail_model::ClusterEvent;
use avail_store::{Op, Store, Txn};
use tokio::sync::broadcast;

use crate::keys;

/// How many events the store keeps; older ones are trimmed in batches.
pub const KEEP_EVENTS: u64 = 10_000;
/// Trim once per this many events.
const TRIM_EVERY: u64 = 500;
/// Live subscribers that fall this far behind miss events (they are told).
pub const STREAM_BUFFER: usize = 1024;

/// Records events and fans them out.
pub struct Events {
    store: Arc<dyn Store>,
    next_seq: AtomicU64,
    tx: broadcast::Sender<ClusterEvent>,
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
            next_seq: AtomicU64::new(last + 1),
            tx,
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
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
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
    /// first, at most `limit`.
    pub async fn history(
        &self,
        since: u64,
        workload: Option<&str>,
        limit: usize,
    ) -> avail_store::Result<Vec<ClusterEvent>> {
        let (kvs, _) = self.store.range(keys::EVENTS).await?;
        let mut out: Vec<ClusterEvent> = kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<ClusterEvent>(&kv.value).ok())
            .filter(|e| e.seq > since && workload.is_none_or(|w| e.workload.as_deref() == Some(w)))
            .collect();
        if out.len() > limit {
            out.drain(..out.len() - limit);
        }
        Ok(out)
    }

    /// Subscribe to live events.
    pub fn subscribe(&self) -> broadcast::Receiver<ClusterEvent> {
        self.tx.subscribe()
    }
}
