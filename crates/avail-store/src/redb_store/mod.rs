//! The embedded backend: one [redb] file, used by a single server.
//!
//! # Layout
//! One redb file holds five tables:
//!
//! | table        | key                | value                                              |
//! | ------------ | ------------------ | -------------------------------------------------- |
//! | `keys`       | key (`&str`)       | record: format byte, `create_rev`, `mod_rev`, lease (0 = none), value |
//! | `meta`       | name (`&str`)      | `u64`: `format`, `revision`, `next_lease`, `history_floor` |
//! | `leases`     | lease id           | TTL in seconds                                     |
//! | `lease_keys` | lease id (multimap)| the keys attached to the lease                     |
//! | `history`    | (revision, index)  | one watch event (put with its record, or delete)   |
//!
//! Integers are little-endian. A record or event that does not decode is reported as
//! [`StoreError::Backend`] naming the key or revision. `meta.format` marks the file as an
//! avail store: a redb file of another program, or of another format version, is refused
//! at open.
//!
//! # Writes and revisions
//! redb is synchronous: every operation that touches the file runs on tokio's blocking
//! pool ([`tokio::task::spawn_blocking`]), never on the async workers (only
//! [`RedbStore::open`] is a plain blocking call, meant for start-up). Writes are committed
//! under one writer lock (a `std::sync::Mutex` held only on blocking threads) for the
//! whole of their redb write transaction, commit and publication to watchers, so
//! revisions are strictly increasing and watchers receive them in order. The writes
//! that queue while another commits are committed together, each still its own
//! revision ([`group_commit`]). Each acknowledged write is committed with redb's
//! default durability (fsync) before the call returns. A write whose chosen branch
//! changes nothing does not bump the revision. A panic while
//! the writer lock is held poisons it: later writes fail with [`StoreError::Backend`]
//! (fail-stop) instead of risking a gap in the revision sequence.
//!
//! # Watch history
//! Events are kept **in the `history` table**, in the same write transaction as the change
//! they describe, so history survives a restart: a watcher can resume from its last
//! revision after the server restarts. At least the last
//! [`RedbOptions::history_events`] events (default 10,000) are kept; older ones are
//! trimmed a whole revision at a time, and `meta.history_floor` records the newest trimmed
//! revision. A watch from a revision below the floor gets [`StoreError::Compacted`] with
//! `oldest` = the floor. Disk cost: every value is written twice (record and event) and
//! history holds at most `history_events` plus one transaction's events.
//!
//! A watch registers under the writer lock and at the same moment opens a redb read
//! snapshot at the current revision `N`; it replays `(from_rev, N]` from that snapshot
//! (in batches of at most [`REPLAY_BATCH_EVENTS`] events, on the blocking pool) and then
//! delivers live events `> max(from_rev, N)`. Since no write can commit between the
//! snapshot and the registration, every event is delivered exactly once, with no gap.
//!
//! Each watch has two bounded queues of [`RedbOptions::watch_channel`] entries (default
//! 1024): the live queue the writer fills (one entry per revision that touches the
//! prefix) and the [`Watch`]'s channel (one entry per revision). A writer never waits for a watcher: when a
//! watcher's live queue is full (it fell about `2 × watch_channel` changes behind), it is
//! dropped; it still receives the events already queued, in order, and then its channel
//! closes. The caller re-reads and watches again.
//!
//! # Leases
//! `leases` persists each lease's TTL; liveness (the deadline) lives only in memory, as a
//! [`tokio::time::Instant`]. At open every persisted lease gets a full TTL again. A reaper
//! task, spawned at open and aborted when the store is dropped or closed, wakes every
//! [`REAP_INTERVAL`] and deletes the keys of every expired lease in one revision, with a
//! `Delete` event per key. The keys of a lease are found through the `lease_keys` index
//! (kept in the same transaction as the key), so expiry costs `O(keys of the lease)`, not
//! a scan. A lease past its deadline but not yet reaped is already dead for `put` and
//! `keep_alive` ([`StoreError::LeaseNotFound`]); `revoke_lease` still accepts it and
//! deletes its keys at once. Lease ids come from a persisted counter and are never
//! reused.
//!
//! # Limits
//! Keys are non-empty UTF-8; values may be up to redb's limit (about 3 GiB); tests cover
//! 4 MiB. Within one transaction branch a key may appear only once.

mod group_commit;

use std::collections::HashMap;

use crate::check_key;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use redb::{
    Database, MultimapTable, MultimapTableDefinition, ReadTransaction, ReadableDatabase,
    ReadableTable, ReadableTableMetadata, Table, TableDefinition, WriteTransaction,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{
    Compare, Event, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError, Txn, TxnResult,
    Watch,
};

/// How often the reaper looks for expired leases.
pub const REAP_INTERVAL: Duration = Duration::from_millis(100);

/// Most events a watch replays from history per blocking read.
pub const REPLAY_BATCH_EVENTS: usize = 256;

/// Default of [`RedbOptions::history_events`].
pub const DEFAULT_HISTORY_EVENTS: usize = 10_000;

/// Default of [`RedbOptions::watch_channel`].
pub const DEFAULT_WATCH_CHANNEL: usize = 1024;

/// How long [`RedbStore::close`] waits for operations still running on the blocking pool.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

/// Version of the table layout, stored in `meta.format`.
const FORMAT_VERSION: u64 = 1;
/// Version byte at the start of each record.
const RECORD_VERSION: u8 = 1;
/// Record header: version byte, create_rev, mod_rev, lease.
const RECORD_HEADER_BYTES: usize = 1 + 8 + 8 + 8;
const EVENT_PUT: u8 = 1;
const EVENT_DELETE: u8 = 2;

const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LEASES: TableDefinition<u64, u64> = TableDefinition::new("leases");
const LEASE_KEYS: MultimapTableDefinition<u64, &str> = MultimapTableDefinition::new("lease_keys");
/// A history entry's key: revision, and index of the event within the revision.
type HistoryKey = (u64, u32);
/// The queue of whole revisions a watcher's forwarding task receives.
type LiveQueue = mpsc::Receiver<Arc<Vec<Event>>>;

const HISTORY: TableDefinition<HistoryKey, &[u8]> = TableDefinition::new("history");

const META_FORMAT: &str = "format";
const META_REVISION: &str = "revision";
const META_NEXT_LEASE: &str = "next_lease";
const META_HISTORY_FLOOR: &str = "history_floor";

/// Tunables of a [`RedbStore`]; [`Default`] gives the documented defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedbOptions {
    /// At least this many of the latest watch events are kept for replay (whole
    /// revisions are trimmed, so up to one transaction's events more). Must be >= 1.
    pub history_events: usize,
    /// Capacity of each watch's live queue and of its [`Watch`]'s channel. Must be
    /// >= 1.
    pub watch_channel: usize,
}

impl Default for RedbOptions {
    fn default() -> Self {
        RedbOptions {
            history_events: DEFAULT_HISTORY_EVENTS,
            watch_channel: DEFAULT_WATCH_CHANNEL,
        }
    }
}

/// The embedded [`Store`] on one redb file (see the [module docs](self)).
///
/// Must be opened inside a tokio runtime (it spawns its lease reaper there). Dropping it
/// stops the reaper and releases the file once operations still running on the blocking
/// pool finish; [`RedbStore::close`] waits for that.
pub struct RedbStore {
    inner: Arc<Inner>,
    reaper: Reaper,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.inner.path)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

/// Aborts the reaper task when dropped.
struct Reaper(Option<JoinHandle<()>>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.abort();
        }
    }
}

struct Inner {
    db: Database,
    path: PathBuf,
    options: RedbOptions,
    /// The writer lock: held for a whole write transaction, its commit and publication.
    writer: Mutex<Writer>,
    /// Writes waiting for the next group commit ([`group_commit`]).
    queue: Mutex<Vec<group_commit::Job>>,
    /// redb transactions committed (each one or more writes).
    commits: std::sync::atomic::AtomicU64,
    /// Lease deadlines. Lock order: `writer` before `clock`.
    clock: Arc<LeaseClock>,
}

struct Writer {
    watchers: Vec<Watcher>,
    /// Newest trimmed revision; watches from below it are compacted. Mirrors `meta`.
    history_floor: Revision,
}

struct Watcher {
    prefix: String,
    live: mpsc::Sender<Arc<Vec<Event>>>,
}

#[derive(Clone, Copy)]
struct LeaseLife {
    ttl: Duration,
    deadline: Instant,
}

#[derive(Default)]
struct LeaseClock {
    leases: Mutex<HashMap<LeaseId, LeaseLife>>,
}

impl LeaseClock {
    fn lock(&self) -> MutexGuard<'_, HashMap<LeaseId, LeaseLife>> {
        // The map holds plain values updated in single statements: a panic elsewhere
        // cannot leave it half-changed, so a poisoned lock is still usable.
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_alive(&self, lease: LeaseId, now: Instant) -> bool {
        self.lock().get(&lease).is_some_and(|l| l.deadline > now)
    }

    fn expired(&self, now: Instant) -> Vec<LeaseId> {
        let mut ids: Vec<LeaseId> = self
            .lock()
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }
}

fn backend(what: &'static str) -> impl FnOnce(redb::Error) -> StoreError {
    move |e| StoreError::Backend(format!("{what}: {e}"))
}

/// Converts any redb error into [`StoreError::Backend`] with a context.
trait Ctx<T> {
    fn ctx(self, what: &'static str) -> Result<T>;
}

impl<T, E: Into<redb::Error>> Ctx<T> for std::result::Result<T, E> {
    fn ctx(self, what: &'static str) -> Result<T> {
        self.map_err(|e| backend(what)(e.into()))
    }
}

fn ttl_deadline(now: Instant, ttl_s: u64) -> Result<LeaseLife> {
    let ttl = Duration::from_secs(ttl_s);
    let deadline = now
        .checked_add(ttl)
        .ok_or_else(|| StoreError::Invalid(format!("lease TTL {ttl_s} s is too large")))?;
    Ok(LeaseLife { ttl, deadline })
}

// ---------------------------------------------------------------------------------------
// Encoding

/// The fixed part of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    create_rev: Revision,
    mod_rev: Revision,
    lease: Option<LeaseId>,
}

fn encode_record(header: Header, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_HEADER_BYTES + value.len());
    out.push(RECORD_VERSION);
    out.extend_from_slice(&header.create_rev.to_le_bytes());
    out.extend_from_slice(&header.mod_rev.to_le_bytes());
    out.extend_from_slice(&header.lease.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(value);
    out
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Splits a record into header and value; names the key when it does not decode.
fn decode_record<'a>(key: &str, bytes: &'a [u8]) -> Result<(Header, &'a [u8])> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(StoreError::Backend(format!(
            "corrupt record for key {key:?}: {} bytes, shorter than the {RECORD_HEADER_BYTES}-byte header",
            bytes.len()
        )));
    }
    if bytes[0] != RECORD_VERSION {
        return Err(StoreError::Backend(format!(
            "corrupt record for key {key:?}: unknown record version {}",
            bytes[0]
        )));
    }
    let lease = u64_at(bytes, 17);
    let header = Header {
        create_rev: u64_at(bytes, 1),
        mod_rev: u64_at(bytes, 9),
        lease: (lease != 0).then_some(lease),
    };
    if header.mod_rev == 0 || header.create_rev == 0 || header.create_rev > header.mod_rev {
        return Err(StoreError::Backend(format!(
            "corrupt record for key {key:?}: create_rev {} mod_rev {}",
            header.create_rev, header.mod_rev
        )));
    }
    Ok((header, &bytes[RECORD_HEADER_BYTES..]))
}

fn key_value(key: &str, bytes: &[u8]) -> Result<KeyValue> {
    let (h, value) = decode_record(key, bytes)?;
    Ok(KeyValue {
        key: key.to_string(),
        value: value.to_vec(),
        create_rev: h.create_rev,
        mod_rev: h.mod_rev,
        lease: h.lease,
    })
}

fn encode_event(event: &Event) -> Vec<u8> {
    let (tag, key) = match event {
        Event::Put(kv) => (EVENT_PUT, kv.key.as_str()),
        Event::Delete { key, .. } => (EVENT_DELETE, key.as_str()),
    };
    let key_len = u32::try_from(key.len()).expect("keys are shorter than 4 GiB (redb limit)");
    let mut out = Vec::with_capacity(5 + key.len());
    out.push(tag);
    out.extend_from_slice(&key_len.to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    if let Event::Put(kv) = event {
        let header = Header {
            create_rev: kv.create_rev,
            mod_rev: kv.mod_rev,
            lease: kv.lease,
        };
        out.extend_from_slice(&encode_record(header, &kv.value));
    }
    out
}

fn decode_event(revision: Revision, bytes: &[u8]) -> Result<Event> {
    let corrupt = |why: &str| {
        StoreError::Backend(format!(
            "corrupt history event at revision {revision}: {why}"
        ))
    };
    if bytes.len() < 5 {
        return Err(corrupt("too short"));
    }
    let key_len = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    let rest = &bytes[5..];
    if rest.len() < key_len {
        return Err(corrupt("key longer than the event"));
    }
    let key = std::str::from_utf8(&rest[..key_len]).map_err(|_| corrupt("key is not UTF-8"))?;
    let rest = &rest[key_len..];
    match bytes[0] {
        EVENT_PUT => {
            let kv = key_value(key, rest)?;
            if kv.mod_rev != revision {
                return Err(corrupt("put's mod_rev differs from its revision"));
            }
            Ok(Event::Put(kv))
        }
        EVENT_DELETE if rest.is_empty() => Ok(Event::Delete {
            key: key.to_string(),
            revision,
        }),
        _ => Err(corrupt("unknown event kind")),
    }
}

// ---------------------------------------------------------------------------------------
// Write batches

/// The tables of one write transaction and the events it produces, all at revision
/// `current + 1`.
struct Batch<'t> {
    keys: Table<'t, &'static str, &'static [u8]>,
    meta: Table<'t, &'static str, u64>,
    leases: Table<'t, u64, u64>,
    lease_keys: MultimapTable<'t, u64, &'static str>,
    history: Table<'t, HistoryKey, &'static [u8]>,
    /// The revision before the write being applied (each write of a group commit is
    /// sealed as the next one).
    current: Revision,
    /// The events of the write being applied.
    events: Vec<Event>,
    /// Something other than events changed (a lease was granted or removed).
    dirty: bool,
    /// Some write of the batch was sealed with events.
    sealed: bool,
}

impl<'t> Batch<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self> {
        let meta = txn.open_table(META).ctx("open table meta")?;
        let current = meta
            .get(META_REVISION)
            .ctx("read revision")?
            .map_or(0, |g| g.value());
        Ok(Batch {
            keys: txn.open_table(KEYS).ctx("open table keys")?,
            meta,
            leases: txn.open_table(LEASES).ctx("open table leases")?,
            lease_keys: txn
                .open_multimap_table(LEASE_KEYS)
                .ctx("open table lease_keys")?,
            history: txn.open_table(HISTORY).ctx("open table history")?,
            current,
            events: Vec::new(),
            dirty: false,
            sealed: false,
        })
    }

    /// The revision this batch's changes get.
    fn next_rev(&self) -> Revision {
        self.current + 1
    }

    fn header(&self, key: &str) -> Result<Option<Header>> {
        match self.keys.get(key).ctx("read key")? {
            Some(g) => Ok(Some(decode_record(key, g.value())?.0)),
            None => Ok(None),
        }
    }

    fn holds(&self, compare: &Compare) -> Result<bool> {
        match compare {
            Compare::ModRev(key, rev) => Ok(self.header(key)?.map_or(0, |h| h.mod_rev) == *rev),
            Compare::Value(key, expected) => match self.keys.get(key.as_str()).ctx("read key")? {
                Some(g) => Ok(decode_record(key, g.value())?.1 == expected.as_slice()),
                None => Ok(false),
            },
        }
    }

    fn put(&mut self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<()> {
        let rev = self.next_rev();
        let old = self.header(key)?;
        let old_lease = old.and_then(|h| h.lease);
        if let Some(l) = old_lease.filter(|l| Some(*l) != lease) {
            self.lease_keys.remove(l, key).ctx("unindex lease key")?;
        }
        if let Some(l) = lease.filter(|l| Some(*l) != old_lease) {
            self.lease_keys.insert(l, key).ctx("index lease key")?;
        }
        let header = Header {
            create_rev: old.map_or(rev, |h| h.create_rev),
            mod_rev: rev,
            lease,
        };
        self.keys
            .insert(key, encode_record(header, &value).as_slice())
            .ctx("write key")?;
        self.events.push(Event::Put(KeyValue {
            key: key.to_string(),
            value,
            create_rev: header.create_rev,
            mod_rev: rev,
            lease,
        }));
        Ok(())
    }

    fn delete(&mut self, key: &str) -> Result<bool> {
        let lease = match self.keys.remove(key).ctx("delete key")? {
            Some(g) => decode_record(key, g.value())?.0.lease,
            None => return Ok(false),
        };
        if let Some(l) = lease {
            self.lease_keys.remove(l, key).ctx("unindex lease key")?;
        }
        self.events.push(Event::Delete {
            key: key.to_string(),
            revision: self.next_rev(),
        });
        Ok(true)
    }

    fn grant_lease(&mut self, ttl_s: u64) -> Result<LeaseId> {
        let id = self
            .meta
            .get(META_NEXT_LEASE)
            .ctx("read next lease")?
            .map_or(1, |g| g.value());
        self.leases.insert(id, ttl_s).ctx("write lease")?;
        self.meta
            .insert(META_NEXT_LEASE, id + 1)
            .ctx("write next lease")?;
        self.dirty = true;
        Ok(id)
    }

    /// Deletes the lease and every key attached to it.
    fn remove_lease(&mut self, lease: LeaseId) -> Result<()> {
        let keys: Vec<String> = self
            .lease_keys
            .remove_all(lease)
            .ctx("read lease keys")?
            .map(|k| k.map(|k| k.value().to_string()))
            .collect::<std::result::Result<_, _>>()
            .ctx("read lease keys")?;
        for key in keys {
            let existed = self.delete(&key)?;
            debug_assert!(existed, "lease index names missing key {key:?}");
        }
        self.leases.remove(lease).ctx("delete lease")?;
        self.dirty = true;
        Ok(())
    }

    /// Ends the write being applied: when it changed keys, stamps the next revision
    /// and appends its events to history. Returns its events and its revision (the
    /// current one when it changed no key).
    fn seal(&mut self) -> Result<(Vec<Event>, Revision)> {
        if self.events.is_empty() {
            return Ok((Vec::new(), self.current));
        }
        let rev = self.next_rev();
        self.meta.insert(META_REVISION, rev).ctx("write revision")?;
        for (i, event) in self.events.iter().enumerate() {
            let index = u32::try_from(i).map_err(|_| {
                StoreError::Invalid("more than 2^32 writes in one transaction".into())
            })?;
            self.history
                .insert((rev, index), encode_event(event).as_slice())
                .ctx("write history")?;
        }
        self.current = rev;
        self.sealed = true;
        Ok((std::mem::take(&mut self.events), rev))
    }

    /// Ends the batch: trims history when revisions were added. Returns whether
    /// anything changed, and the new history floor.
    fn finish(mut self, history_events: usize) -> Result<(bool, Option<Revision>)> {
        debug_assert!(self.events.is_empty(), "a write not sealed");
        if !self.sealed {
            return Ok((self.dirty, None));
        }
        let floor = self.trim_history(history_events as u64)?;
        Ok((true, floor))
    }

    /// Drops the oldest revisions while at least `keep` events remain; returns the new
    /// floor if it moved.
    fn trim_history(&mut self, keep: u64) -> Result<Option<Revision>> {
        let mut len = self.history.len().ctx("count history")?;
        let mut floor = None;
        while len > keep {
            let oldest = match self.history.first().ctx("read history")? {
                Some((k, _)) => k.value().0,
                None => break,
            };
            let group = self
                .history
                .range((oldest, 0)..=(oldest, u32::MAX))
                .ctx("read history")?
                .count() as u64;
            if len - group < keep {
                break;
            }
            self.history
                .retain_in((oldest, 0)..=(oldest, u32::MAX), |_, _| false)
                .ctx("trim history")?;
            len -= group;
            floor = Some(oldest);
        }
        if let Some(f) = floor {
            self.meta
                .insert(META_HISTORY_FLOOR, f)
                .ctx("write history floor")?;
        }
        Ok(floor)
    }
}

// ---------------------------------------------------------------------------------------
// The store

impl RedbStore {
    /// Opens (creating if absent) the store file at `path` with default options.
    ///
    /// A file that is not a redb database, or is corrupt, or is already open, or is
    /// empty (0 bytes: a truncated or clobbered store, never a new one), gives
    /// [`StoreError::Open`] naming the file; it is never reset. A new file is created
    /// with mode `0600`. The open checks the whole file's integrity, and blocks the
    /// calling thread while it does. Must be called inside a tokio runtime.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_options(path, RedbOptions::default())
    }

    /// Opens the store file with explicit [`RedbOptions`] (see [`RedbStore::open`]).
    pub fn open_with_options(path: &Path, options: RedbOptions) -> Result<Self> {
        let open_err = |reason: String| StoreError::Open {
            path: path.display().to_string(),
            reason,
        };
        if options.history_events == 0 || options.watch_channel == 0 {
            return Err(StoreError::Invalid(format!(
                "history_events and watch_channel must be >= 1: {options:?}"
            )));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            open_err("must be opened inside a tokio runtime (leases need a reaper task)".into())
        })?;
        prepare_file(path).map_err(open_err)?;
        let db = panic::catch_unwind(AssertUnwindSafe(|| {
            Database::builder()
                .set_check_integrity_on_open(true)
                .create(path)
        }))
        .map_err(|p| {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            open_err(format!("not a valid store file (redb panicked: {msg})"))
        })?
        .map_err(|e| {
            open_err(match e {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    "already open (by this or another process)".into()
                }
                e => e.to_string(),
            })
        })?;
        let (floor, leases) = init_tables(&db).map_err(|e| {
            open_err(match e {
                StoreError::Backend(reason) => reason,
                e => e.to_string(),
            })
        })?;
        let now = Instant::now();
        let mut lives = HashMap::with_capacity(leases.len());
        for (id, ttl_s) in leases {
            lives.insert(
                id,
                ttl_deadline(now, ttl_s).map_err(|e| open_err(e.to_string()))?,
            );
        }
        let clock = Arc::new(LeaseClock {
            leases: Mutex::new(lives),
        });
        let inner = Arc::new(Inner {
            db,
            path: path.to_path_buf(),
            options,
            writer: Mutex::new(Writer {
                watchers: Vec::new(),
                history_floor: floor,
            }),
            queue: Mutex::new(Vec::new()),
            commits: Default::default(),
            clock: clock.clone(),
        });
        let reaper = runtime.spawn(reap(Arc::downgrade(&inner), clock));
        tracing::debug!(path = %path.display(), "redb store open");
        Ok(RedbStore {
            inner,
            reaper: Reaper(Some(reaper)),
        })
    }

    /// Stops the reaper, waits (up to 30 s) for operations still running on the blocking
    /// pool, and closes the file, so that it can be opened again at once.
    pub async fn close(self) -> Result<()> {
        let RedbStore { inner, mut reaper } = self;
        if let Some(handle) = reaper.0.take() {
            handle.abort();
            let _ = handle.await;
        }
        let deadline = Instant::now() + CLOSE_WAIT;
        let mut inner = inner;
        loop {
            match Arc::try_unwrap(inner) {
                Ok(Inner { db, path, .. }) => {
                    return db.close().map_err(|e| {
                        StoreError::Backend(format!("close {}: {e}", path.display()))
                    });
                }
                Err(shared) if Instant::now() < deadline => {
                    inner = shared;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(shared) => {
                    return Err(StoreError::Backend(format!(
                        "close {}: operations still running after {CLOSE_WAIT:?}",
                        shared.path.display()
                    )));
                }
            }
        }
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &RedbOptions {
        &self.inner.options
    }

    /// How many redb transactions were committed since open: one per group of writes
    /// (see [`group_commit`]), each an fsync.
    pub fn commits(&self) -> u64 {
        self.inner
            .commits
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }
}

/// Refuses an empty file (redb would silently make it a new, empty store) and creates
/// an absent one with mode `0600`, so that no other user can read the store.
fn prepare_file(path: &Path) -> std::result::Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() == 0 => Err(
            "the file is empty (0 bytes): not a store; refusing to start an empty cluster over it (remove the file only if a new cluster is meant)"
                .into(),
        ),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map(drop)
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Creates the tables of a new file, checks the format of an existing one, and returns
/// the history floor and the persisted leases.
fn init_tables(db: &Database) -> Result<(Revision, Vec<(LeaseId, u64)>)> {
    let txn = db.begin_write().ctx("begin write")?;
    let (floor, leases) = {
        let existing: Vec<String> = txn
            .list_tables()
            .ctx("list tables")?
            .map(|t| redb::TableHandle::name(&t).to_string())
            .collect();
        let mut meta = txn.open_table(META).ctx("open table meta")?;
        let format = meta.get(META_FORMAT).ctx("read format")?.map(|g| g.value());
        match format {
            Some(FORMAT_VERSION) => {}
            Some(other) => {
                return Err(StoreError::Backend(format!(
                    "store format {other} is not supported (this build reads {FORMAT_VERSION})"
                )));
            }
            None if !existing.is_empty() => {
                return Err(StoreError::Backend(format!(
                    "a redb database of another program (tables {existing:?}, no avail format mark)"
                )));
            }
            None => {
                meta.insert(META_FORMAT, FORMAT_VERSION)
                    .ctx("write format")?;
            }
        }
        let floor = meta
            .get(META_HISTORY_FLOOR)
            .ctx("read history floor")?
            .map_or(0, |g| g.value());
        txn.open_table(KEYS).ctx("open table keys")?;
        txn.open_table(HISTORY).ctx("open table history")?;
        txn.open_multimap_table(LEASE_KEYS)
            .ctx("open table lease_keys")?;
        let leases = txn.open_table(LEASES).ctx("open table leases")?;
        let leases = leases
            .iter()
            .ctx("read leases")?
            .map(|r| r.map(|(k, v)| (k.value(), v.value())))
            .collect::<std::result::Result<Vec<_>, _>>()
            .ctx("read leases")?;
        (floor, leases)
    };
    txn.commit().ctx("commit")?;
    Ok((floor, leases))
}

/// Deletes the keys of expired leases every [`REAP_INTERVAL`] until the store is gone.
async fn reap(inner: Weak<Inner>, clock: Arc<LeaseClock>) {
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let expired = clock.expired(Instant::now());
        if expired.is_empty() {
            continue;
        }
        let Some(inner) = inner.upgrade() else { return };
        match tokio::task::spawn_blocking(move || inner.expire(&expired)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("lease expiry failed, retrying: {e}"),
            Err(e) => tracing::error!("lease expiry task failed, retrying: {e}"),
        }
    }
}

impl Inner {
    fn lock_writer(&self) -> Result<MutexGuard<'_, Writer>> {
        self.writer.lock().map_err(|_| {
            StoreError::Backend(format!(
                "store {} stopped after a panic during a write; reopen it",
                self.path.display()
            ))
        })
    }

    fn txn(&self, txn: Txn) -> Result<TxnResult> {
        txn.check()?;
        let Txn {
            compares,
            success,
            failure,
        } = txn;
        let clock = self.clock.clone();
        let (succeeded, revision) = self.write(move |batch| {
            let mut succeeded = true;
            for c in &compares {
                if !batch.holds(c)? {
                    succeeded = false;
                    break;
                }
            }
            let ops = if succeeded { success } else { failure };
            let now = Instant::now();
            for op in &ops {
                if let Op::Put { lease: Some(l), .. } = op
                    && !clock.is_alive(*l, now)
                {
                    return Err(StoreError::LeaseNotFound(*l));
                }
            }
            for op in ops {
                match op {
                    Op::Put { key, value, lease } => batch.put(&key, value, lease)?,
                    Op::Delete { key } => {
                        batch.delete(&key)?;
                    }
                }
            }
            Ok(succeeded)
        })?;
        Ok(TxnResult {
            succeeded,
            revision,
        })
    }

    fn grant_lease(&self, ttl_s: u64) -> Result<LeaseId> {
        if ttl_s == 0 {
            return Err(StoreError::Invalid("lease TTL must be >= 1 s".into()));
        }
        let life = ttl_deadline(Instant::now(), ttl_s)?;
        let (id, _) = self.write(move |batch| batch.grant_lease(ttl_s))?;
        // Outside the writer lock, but nobody knows the id before it is returned.
        self.clock.lock().insert(id, life);
        Ok(id)
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let clock = self.clock.clone();
        self.write(move |batch| {
            if !clock.lock().contains_key(&lease) {
                return Err(StoreError::LeaseNotFound(lease));
            }
            batch.remove_lease(lease)
        })?;
        self.clock.lock().remove(&lease);
        Ok(())
    }

    /// Deletes, in one revision, the keys of the leases among `ids` that are still
    /// expired.
    fn expire(&self, ids: &[LeaseId]) -> Result<()> {
        let clock = self.clock.clone();
        let ids = ids.to_vec();
        let (expired, _) = self.write(move |batch| {
            let now = Instant::now();
            let expired: Vec<LeaseId> = {
                let clock = clock.lock();
                ids.iter()
                    .copied()
                    .filter(|id| clock.get(id).is_some_and(|l| l.deadline <= now))
                    .collect()
            };
            for id in &expired {
                batch.remove_lease(*id)?;
            }
            Ok(expired)
        })?;
        let mut clock = self.clock.lock();
        for id in &expired {
            clock.remove(id);
        }
        if !expired.is_empty() {
            tracing::debug!(leases = ?expired, "leases expired");
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        check_key(key)?;
        let txn = self.db.begin_read().ctx("begin read")?;
        let keys = txn.open_table(KEYS).ctx("open table keys")?;
        match keys.get(key).ctx("read key")? {
            Some(g) => Ok(Some(key_value(key, g.value())?)),
            None => Ok(None),
        }
    }

    fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let txn = self.db.begin_read().ctx("begin read")?;
        let revision = read_revision(&txn)?;
        let keys = txn.open_table(KEYS).ctx("open table keys")?;
        let mut out = Vec::new();
        for entry in keys.range(prefix..).ctx("read keys")? {
            let (k, v) = entry.ctx("read keys")?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            out.push(key_value(key, v.value())?);
        }
        Ok((out, revision))
    }

    /// Registers a watcher and returns a snapshot at the current revision to replay
    /// history from (see the module docs for why this is race-free).
    fn register_watch(
        &self,
        prefix: &str,
        from_rev: Revision,
    ) -> Result<(ReadTransaction, Revision, LiveQueue)> {
        let mut writer = self.lock_writer()?;
        if from_rev < writer.history_floor {
            return Err(StoreError::Compacted {
                requested: from_rev,
                oldest: writer.history_floor,
            });
        }
        let snapshot = self.db.begin_read().ctx("begin read")?;
        let current = read_revision(&snapshot)?;
        let (tx, rx) = mpsc::channel(self.options.watch_channel);
        writer.watchers.push(Watcher {
            prefix: prefix.to_string(),
            live: tx,
        });
        Ok((snapshot, current, rx))
    }
}

fn read_revision(txn: &ReadTransaction) -> Result<Revision> {
    let meta = txn.open_table(META).ctx("open table meta")?;
    Ok(meta
        .get(META_REVISION)
        .ctx("read revision")?
        .map_or(0, |g| g.value()))
}

/// Hands one revision's events to every watcher of a prefix they touch; drops watchers
/// whose queue is full or whose receiver is gone.
fn publish(writer: &mut Writer, events: Vec<Event>) {
    if events.is_empty() {
        return;
    }
    let batch = Arc::new(events);
    writer.watchers.retain(|w| {
        if !batch.iter().any(|e| e.key().starts_with(&w.prefix)) {
            return !w.live.is_closed();
        }
        match w.live.try_send(batch.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(
                    prefix = %w.prefix,
                    "watcher fell too far behind and is cancelled"
                );
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    });
}

/// Reads up to [`REPLAY_BATCH_EVENTS`] history entries from `start` (inclusive) and
/// returns those under `prefix`, and where to continue (`None` at the end).
fn read_history(
    snapshot: &ReadTransaction,
    prefix: &str,
    start: HistoryKey,
) -> Result<(Vec<Event>, Option<HistoryKey>)> {
    let history = snapshot.open_table(HISTORY).ctx("open table history")?;
    let mut out = Vec::new();
    for (scanned, entry) in history.range(start..).ctx("read history")?.enumerate() {
        let (k, v) = entry.ctx("read history")?;
        let (rev, index) = k.value();
        if scanned == REPLAY_BATCH_EVENTS {
            return Ok((out, Some((rev, index))));
        }
        let event = decode_event(rev, v.value())?;
        if event.key().starts_with(prefix) {
            out.push(event);
        }
    }
    Ok((out, None))
}

/// Feeds a watch: history replay from the snapshot, then live events.
async fn forward(
    snapshot: ReadTransaction,
    snapshot_rev: Revision,
    prefix: String,
    from_rev: Revision,
    mut live: LiveQueue,
    out: mpsc::Sender<Vec<Event>>,
) {
    if from_rev < snapshot_rev {
        let snapshot = Arc::new(snapshot);
        let mut cursor = Some((from_rev + 1, 0));
        // A revision's events, sent once the next revision's begin (a page of history
        // may end inside a revision) or the replay ends.
        let mut group: Vec<Event> = Vec::new();
        while let Some(start) = cursor {
            let (snap, p) = (snapshot.clone(), prefix.clone());
            let read = tokio::task::spawn_blocking(move || read_history(&snap, &p, start)).await;
            let (events, next) = match read {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::error!(%prefix, "watch replay failed, closing the watch: {e}");
                    return;
                }
                Err(e) => {
                    tracing::error!(%prefix, "watch replay task failed, closing the watch: {e}");
                    return;
                }
            };
            for event in events {
                if group
                    .first()
                    .is_some_and(|g| g.revision() != event.revision())
                    && out.send(std::mem::take(&mut group)).await.is_err()
                {
                    return;
                }
                group.push(event);
            }
            cursor = next;
        }
        if !group.is_empty() && out.send(group).await.is_err() {
            return;
        }
    } else {
        drop(snapshot);
    }
    let after = from_rev.max(snapshot_rev);
    loop {
        let batch = tokio::select! {
            _ = out.closed() => return,
            batch = live.recv() => batch,
        };
        let Some(batch) = batch else { return };
        // One revision: sent whole.
        let events: Vec<Event> = batch
            .iter()
            .filter(|e| e.revision() > after && e.key().starts_with(&prefix))
            .cloned()
            .collect();
        if !events.is_empty() && out.send(events).await.is_err() {
            return;
        }
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_string();
        self.blocking(move |s| s.get(&key)).await
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let prefix = prefix.to_string();
        self.blocking(move |s| s.range(&prefix)).await
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision> {
        let r = self
            .txn(Txn {
                compares: vec![],
                success: vec![Op::Put {
                    key: key.to_string(),
                    value,
                    lease,
                }],
                failure: vec![],
            })
            .await?;
        Ok(r.revision)
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        check_key(key)?;
        let key = key.to_string();
        self.blocking(move |s| {
            let (existed, _) = s.write(move |batch| batch.delete(&key))?;
            Ok(existed)
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        self.blocking(move |s| s.txn(txn)).await
    }

    async fn revision(&self) -> Result<Revision> {
        self.blocking(|s| read_revision(&s.db.begin_read().ctx("begin read")?))
            .await
    }

    async fn watch(&self, prefix: &str, from_rev: Revision) -> Result<Watch> {
        let p = prefix.to_string();
        let (snapshot, snapshot_rev, live) = self
            .blocking(move |s| s.register_watch(&p, from_rev))
            .await?;
        let (tx, rx) = mpsc::channel(self.inner.options.watch_channel);
        tokio::spawn(forward(
            snapshot,
            snapshot_rev,
            prefix.to_string(),
            from_rev,
            live,
            tx,
        ));
        Ok(Watch::new(rx))
    }

    async fn grant_lease(&self, ttl_s: u64) -> Result<LeaseId> {
        self.blocking(move |s| s.grant_lease(ttl_s)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let now = Instant::now();
        let mut leases = self.inner.clock.lock();
        match leases.get_mut(&lease) {
            Some(life) if life.deadline > now => {
                life.deadline = ttl_deadline(now, life.ttl.as_secs())?.deadline;
                Ok(())
            }
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.blocking(move |s| s.revoke_lease(lease)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_rejects_garbage() {
        let h = Header {
            create_rev: 3,
            mod_rev: 7,
            lease: Some(9),
        };
        let bytes = encode_record(h, b"hello");
        assert_eq!(decode_record("k", &bytes).unwrap(), (h, &b"hello"[..]));
        assert!(matches!(
            decode_record("k", &bytes[..10]),
            Err(StoreError::Backend(m)) if m.contains("\"k\"")
        ));
        let mut bad = bytes.clone();
        bad[0] = 99;
        assert!(decode_record("k", &bad).is_err());
        let no_lease = Header { lease: None, ..h };
        let (back, _) = decode_record("k", &encode_record(no_lease, b"")).unwrap();
        assert_eq!(back.lease, None);
    }

    #[test]
    fn event_round_trips_and_rejects_garbage() {
        let put = Event::Put(KeyValue {
            key: "a/b".into(),
            value: vec![1, 2, 3],
            create_rev: 2,
            mod_rev: 5,
            lease: None,
        });
        assert_eq!(decode_event(5, &encode_event(&put)).unwrap(), put);
        let del = Event::Delete {
            key: "a/b".into(),
            revision: 6,
        };
        assert_eq!(decode_event(6, &encode_event(&del)).unwrap(), del);
        assert!(decode_event(6, &[]).is_err());
        assert!(decode_event(6, &[EVENT_PUT, 200, 0, 0, 0, b'a']).is_err());
        assert!(decode_event(4, &encode_event(&put)).is_err());
        let mut unknown = encode_event(&del);
        unknown[0] = 7;
        assert!(decode_event(6, &unknown).is_err());
    }
}
