//! Watch over etcd: one gRPC watch stream per [`Watch`], resumed after a disconnect.
//!
//! ```text
//!  caller              EtcdStore::watch                      etcd
//!    | watch(p, from)        |                                  |
//!    |---------------------->| Watch(create p*, start=S) ------>|   S = max(from, 1)
//!    |                       |<------------------ created ------|
//!    |                       | Range(count, rev=S) ------------>|   compacted below S?
//!    |                       |<----------- ok | compacted ------|
//!    |<-- Err(Compacted) ----|  (oldest: the compact_revision of the watch's cancel)
//!    |<-- Ok(Watch) ---------|  forward task:                   |
//!    |<====== events ========|<======== events (rev > last) ====|
//!    |                       |    x stream breaks (etcd restart, no leader, ping lost)
//!    |                       | Watch(create p*, start=last) --->|   retried with backoff
//!    |<====== events ========|<======== events (rev > last) ====|   for `watch_retry`
//! ```
//!
//! `last` is the newest revision whose events are all in the channel (initially
//! `from`). etcd sends a revision's events in one response (the watch asks for no
//! fragments; a batch of catch-up events holds whole revisions), so after each response
//! `last` is its newest event's revision, and after a resume the events up to `last` are
//! dropped: nothing is lost or delivered twice.
//!
//! Why start at `S = max(from, 1)` rather than `from + 1`: etcd cancels a watch when its
//! start is below the compact revision `C`, and keeps events *of* revision `C` only in
//! part (a delete at `C` is gone). Starting at `from` (and dropping its events) makes
//! etcd refuse exactly the watches with `from < C`, which are the ones the model calls
//! compacted (`oldest` = `C`). The count-only range at revision `S` fails for the same
//! ones and tells it at once, since etcd's cancel of a compacted watch comes
//! asynchronously after `created`.
//!
//! The channel is bounded ([`EtcdOptions::watch_channel`](super::EtcdOptions)): a
//! watcher that falls that far behind is cancelled (the channel closes after the events
//! already in it), as in the redb backend. The channel also closes when the resume point
//! was compacted while the stream was down, or when no stream could be set up again
//! within [`EtcdOptions::watch_retry`](super::EtcdOptions); the caller re-reads and
//! watches again.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions, WatchStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::keys::{Namespace, key_range, revision};
use super::members::{Retry, Shared, is_compacted, is_future_rev, store_error};
use crate::{Event, Result, Revision, StoreError, Watch};

/// First wait before a new stream after a failure; doubles up to [`RETRY_MAX_WAIT`].
const RETRY_FIRST_WAIT: Duration = Duration::from_millis(50);
/// Longest wait between two attempts to set up a stream again.
const RETRY_MAX_WAIT: Duration = Duration::from_secs(1);

/// Starts a watch of `prefix` for events after `from_rev` (see the module docs).
pub(super) async fn open(shared: Arc<Shared>, prefix: &str, from_rev: Revision) -> Result<Watch> {
    let what = format!("watch {prefix:?} from {from_rev}");
    let start = i64::try_from(from_rev.max(1))
        .map_err(|_| StoreError::Invalid(format!("{what}: revision out of range")))?;
    let key = shared.ns.key(prefix);
    let mut stream = match create(&shared, &key, start).await {
        Ok(Created::Stream(s)) => *s,
        Ok(Created::Compacted(oldest)) => {
            return Err(StoreError::Compacted {
                requested: from_rev,
                oldest,
            });
        }
        Err(e) => return Err(StoreError::Backend(format!("{what}: {e}"))),
    };
    if compacted_below(&shared, &what, start).await? {
        let oldest = compact_revision(&shared, &mut stream)
            .await
            .ok_or_else(|| {
                StoreError::Backend(format!(
                    "{what}: compacted, but etcd did not cancel the watch within {:?}",
                    shared.options.request_timeout
                ))
            })?;
        return Err(StoreError::Compacted {
            requested: from_rev,
            oldest,
        });
    }
    let (tx, rx) = mpsc::channel(shared.options.watch_channel);
    tokio::spawn(forward(shared, key, from_rev, stream, tx));
    Ok(Watch::new(rx))
}

/// The answer to a watch create request.
enum Created {
    /// The watch runs on this stream.
    Stream(Box<WatchStream>),
    /// etcd cancelled it at once: its start is below this compact revision.
    Compacted(Revision),
}

/// Opens a stream watching every key under `key` from revision `start`, and waits
/// (bounded by the request timeout) for etcd's `created`.
async fn create(shared: &Shared, key: &[u8], start: i64) -> std::result::Result<Created, String> {
    let (from, end) = key_range(key);
    let options = WatchOptions::new()
        .with_range(end)
        .with_start_revision(start);
    let setup = shared.call("watch", Retry::Always, |m| {
        let (mut client, from, options) = (m.watch.clone(), from.clone(), options.clone());
        async move {
            let mut stream = client.watch(from, Some(options)).await?;
            let first = stream.message().await?;
            Ok((stream, first))
        }
    });
    let (stream, first) = setup
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    match first {
        Some(r) if r.canceled() && r.compact_revision() > 0 => Ok(Created::Compacted(
            revision(r.compact_revision(), "compact revision").map_err(|e| e.to_string())?,
        )),
        Some(r) if r.canceled() => Err(format!("watch cancelled by etcd: {}", r.cancel_reason())),
        Some(r) if r.created() => Ok(Created::Stream(Box::new(stream))),
        Some(_) => Err("etcd answered a watch create without `created`".into()),
        None => Err("watch stream closed by etcd before `created`".into()),
    }
}

/// Whether etcd's history is compacted past `start` (a range at `start` is refused).
async fn compacted_below(shared: &Shared, what: &str, start: i64) -> Result<bool> {
    let (key, _) = key_range(&shared.ns.key(""));
    let opts = GetOptions::new().with_count_only().with_revision(start);
    let call = shared.call(what, Retry::Always, |m| {
        let (mut kv, key, opts) = (m.kv.clone(), key.clone(), opts.clone());
        async move { kv.get(key, Some(opts)).await }
    });
    match call.await? {
        Ok(_) => Ok(false),
        Err(e) if is_compacted(&e) => Ok(true),
        Err(e) if is_future_rev(&e) => Ok(false),
        Err(e) => Err(store_error(what, e)),
    }
}

/// The compact revision of the cancel etcd sends for a compacted watch, if it comes
/// within the request timeout.
async fn compact_revision(shared: &Shared, stream: &mut WatchStream) -> Option<Revision> {
    let deadline = Instant::now() + shared.options.request_timeout;
    loop {
        let msg = tokio::time::timeout_at(deadline, stream.message()).await;
        match msg {
            Ok(Ok(Some(r))) if r.canceled() => {
                return revision(r.compact_revision(), "compact revision")
                    .ok()
                    .filter(|c| *c > 0);
            }
            Ok(Ok(Some(_))) => continue,
            _ => return None,
        }
    }
}

/// Feeds the channel from the stream, resuming the stream after a failure.
async fn forward(
    shared: Arc<Shared>,
    key: Vec<u8>,
    from_rev: Revision,
    mut stream: WatchStream,
    out: mpsc::Sender<Vec<Event>>,
) {
    let prefix = String::from_utf8_lossy(&key).into_owned();
    // Every event up to `last` is in the channel, or was before `from_rev`.
    let mut last = from_rev;
    loop {
        let failure = loop {
            let msg = tokio::select! {
                _ = out.closed() => return,
                msg = stream.message() => msg,
            };
            let resp = match msg {
                Ok(Some(resp)) => resp,
                Ok(None) => break "stream closed by etcd".to_string(),
                Err(e) => break e.to_string(),
            };
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    tracing::warn!(
                        %prefix, last, compact_revision = resp.compact_revision(),
                        "watch resume point compacted; closing the watch"
                    );
                    return;
                }
                break format!("cancelled by etcd: {}", resp.cancel_reason());
            }
            // A response holds whole revisions: each is sent as one item.
            let mut groups: Vec<Vec<Event>> = Vec::new();
            for ev in resp.events() {
                let event = match convert(&shared.ns, ev) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(%prefix, error = %e, "bad watch event; closing the watch");
                        return;
                    }
                };
                if event.revision() <= last {
                    continue;
                }
                match groups.last_mut() {
                    Some(g) if g[0].revision() == event.revision() => g.push(event),
                    _ => groups.push(vec![event]),
                }
            }
            for group in groups {
                match out.try_send(group) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::warn!(%prefix, "watcher fell too far behind and is cancelled");
                        return;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
            // A response holds whole revisions: all of its events are now delivered.
            if let Some(newest) = resp
                .events()
                .iter()
                .filter_map(|e| e.kv())
                .map(|kv| kv.mod_revision())
                .max()
            {
                last = last.max(newest.max(0) as Revision);
            }
        };
        match resume(&shared, &key, &prefix, last, &out, failure).await {
            Some(s) => stream = s,
            None => return,
        }
    }
}

/// Sets the stream up again from `last`, retrying with backoff for at most
/// `watch_retry`; `None` when the watch must close.
async fn resume(
    shared: &Shared,
    key: &[u8],
    prefix: &str,
    last: Revision,
    out: &mpsc::Sender<Vec<Event>>,
    mut failure: String,
) -> Option<WatchStream> {
    let deadline = Instant::now() + shared.options.watch_retry;
    let start = i64::try_from(last.max(1)).ok()?;
    let mut wait = RETRY_FIRST_WAIT;
    loop {
        tracing::debug!(%prefix, last, %failure, "watch stream broke; resuming");
        if Instant::now() + wait > deadline {
            tracing::warn!(
                %prefix, last, %failure,
                "watch could not resume within {:?}; closing the watch",
                shared.options.watch_retry
            );
            return None;
        }
        tokio::select! {
            _ = out.closed() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(RETRY_MAX_WAIT);
        match create(shared, key, start).await {
            Ok(Created::Stream(s)) => return Some(*s),
            Ok(Created::Compacted(c)) => {
                tracing::warn!(%prefix, last, compact_revision = c, "watch resume point compacted; closing the watch");
                return None;
            }
            Err(e) => failure = e,
        }
    }
}

fn convert(ns: &Namespace, ev: &etcd_client::Event) -> Result<Event> {
    let kv = ev
        .kv()
        .ok_or_else(|| StoreError::Backend("watch event without a key".into()))?;
    Ok(match ev.event_type() {
        EventType::Put => Event::Put(ns.key_value(kv)?),
        EventType::Delete => Event::Delete {
            key: ns.strip(kv.key())?,
            revision: revision(kv.mod_revision(), "delete revision")?,
        },
    })
}
