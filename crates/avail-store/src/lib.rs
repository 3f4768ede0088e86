//! avail-store: the control plane's key-value store.
//!
//! Owns the [`Store`] trait (get, range, put, delete, compare-and-swap on a revision,
//! multi-key transactions, watch from a revision, leases whose expiry deletes keys),
//! its two backends — the embedded [`redb`](crate::redb_store) one that a single server
//! uses, and the [`etcd`](crate::etcd_store) one for several servers — the
//! [`conformance`] suite that both pass, and the [`etcd_process`] kit that starts real
//! etcd processes for tests. It does not own what keys mean: that is the server's
//! business.
//!
//! The model follows etcd's, so that the etcd backend is a thin mapping:
//! - one global, monotonically increasing **revision**; every write (put or delete,
//!   or a transaction as a whole) bumps it by one;
//! - each key remembers `create_rev` (revision of its creation) and `mod_rev`
//!   (revision of its last change); a compare on `mod_rev == 0` means "absent";
//! - **watch** delivers every change with revision `> from_rev` for a prefix, in order;
//!   a backend keeps a bounded history and answers [`StoreError::Compacted`] for a
//!   revision older than it;
//! - **leases** have a TTL in seconds; keys put with a lease are deleted (with watch
//!   events) when the lease expires or is revoked. Lease liveness is held in memory:
//!   after a restart every surviving lease gets its full TTL again, as in etcd after a
//!   leader change.
//!
//! Where the backends differ (each backend's module docs say more):
//!
//! | | redb | etcd |
//! |---|---|---|
//! | first revision of a fresh store | 0 | 1 (etcd's initial revision; the first write is 2) |
//! | history | the latest [`RedbOptions::history_events`], trimmed on write | everything until etcd is compacted (`--auto-compaction-*`, [`EtcdStore::compact`]) |
//! | `Compacted::oldest` | newest trimmed revision | etcd's compact revision |
//! | smallest lease TTL | 1 s | etcd's floor `⌈1.5 × election timeout⌉` (2 s with default flags); a smaller TTL is raised to it |
//! | largest value | about 3 GiB | a whole request up to etcd's `--max-request-bytes` (1.5 MiB by default), else `Invalid` |
//! | other writers | none | every client of the etcd cluster: the revision is etcd-wide, keys are namespaced by [`EtcdOptions::key_prefix`] |
//! | a member or connection lost | cannot happen | calls move to another member, or fail with `Backend` within the request timeout; watches resume by themselves |
//! | a write that failed with `Backend` | not applied | maybe applied (a timeout, a connection lost mid-request): re-read before trying again |
//!
//! None of these is visible to the conformance suite: it counts revisions relative to
//! the store's own, uses TTLs of 1 s (the test kit starts etcd with a 1 s floor) and
//! values of 1 MiB.

pub mod conformance;
pub mod etcd_process;
pub mod etcd_store;
pub mod redb_store;

use std::fmt;

use async_trait::async_trait;
use tokio::sync::mpsc;

pub use etcd_store::{EtcdOptions, EtcdStore};
pub use redb_store::{RedbOptions, RedbStore};

/// A revision of the whole store. 0 means "never": no key has `mod_rev == 0`.
pub type Revision = u64;

/// A lease identifier, never 0.
pub type LeaseId = u64;

/// One key with its value and revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value bytes.
    pub value: Vec<u8>,
    /// Revision at which the key was created (last time it went from absent to present).
    pub create_rev: Revision,
    /// Revision of the last put to the key.
    pub mod_rev: Revision,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// A condition of a transaction, checked against the state before the transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key's `mod_rev` equals the revision; `0` means "the key is absent".
    ModRev(String, Revision),
    /// The key exists and its value equals these bytes.
    Value(String, Vec<u8>),
}

/// One write of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Put a value, optionally attached to a lease.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// Lease to attach the key to (the key is deleted when it expires).
        lease: Option<LeaseId>,
    },
    /// Delete a key (no-op if absent).
    Delete {
        /// The key.
        key: String,
    },
}

/// A transaction: if every compare holds, apply `success`, otherwise apply `failure`.
/// All writes of the chosen branch are applied atomically under one new revision; a
/// branch with no effective write does not bump the revision. A key may appear at most
/// once in a branch (as in etcd); otherwise, and for an empty key, the transaction is
/// refused with [`StoreError::Invalid`]. A put with a lease that is not alive refuses the
/// whole transaction with [`StoreError::LeaseNotFound`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    /// Conditions, all must hold.
    pub compares: Vec<Compare>,
    /// Writes when all conditions hold.
    pub success: Vec<Op>,
    /// Writes when any condition fails.
    pub failure: Vec<Op>,
}

impl Txn {
    /// The checks every backend makes before anything is written: no empty key, and
    /// no key twice in one branch ([`StoreError::Invalid`]).
    pub fn check(&self) -> Result<()> {
        for c in &self.compares {
            match c {
                Compare::ModRev(k, _) | Compare::Value(k, _) => check_key(k)?,
            }
        }
        for branch in [&self.success, &self.failure] {
            let mut seen = std::collections::HashSet::new();
            for op in branch {
                let key = match op {
                    Op::Put { key, .. } | Op::Delete { key } => key,
                };
                check_key(key)?;
                if !seen.insert(key.as_str()) {
                    return Err(StoreError::Invalid(format!(
                        "key {key:?} appears twice in one transaction branch"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// A key every backend accepts: not empty.
pub fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(StoreError::Invalid("empty key".into()));
    }
    Ok(())
}

/// What a transaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether all compares held (the `success` branch ran).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: Revision,
}

/// A change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The key was created or updated; `kv.mod_rev` is the event's revision.
    Put(KeyValue),
    /// The key was deleted at `revision` (by a delete, a transaction or lease expiry).
    Delete {
        /// The deleted key.
        key: String,
        /// Revision of the delete.
        revision: Revision,
    },
}

impl Event {
    /// The revision at which this change happened.
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_rev,
            Event::Delete { revision, .. } => *revision,
        }
    }

    /// The key this change is about.
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }
}

/// A stream of changes for one prefix, in revision order, each revision's changes
/// delivered together ([`Watch::next_revision`]): a reader that applies a revision
/// whole never shows half of a transaction. Dropping it cancels the watch. The channel
/// is bounded (in revisions); a watcher that falls more than its capacity behind is
/// cancelled (the channel closes) and must re-read and watch again.
#[derive(Debug)]
pub struct Watch {
    revisions: mpsc::Receiver<Vec<Event>>,
    /// The rest of a revision [`Watch::next`] began.
    pending: std::collections::VecDeque<Event>,
}

impl Watch {
    /// A watch fed by `revisions`: each item the changes of one revision under the
    /// prefix (never empty), in revision order.
    pub(crate) fn new(revisions: mpsc::Receiver<Vec<Event>>) -> Watch {
        Watch {
            revisions,
            pending: Default::default(),
        }
    }

    /// The next change; `None` when the watch closed. Cancel-safe.
    pub async fn next(&mut self) -> Option<Event> {
        if self.pending.is_empty() {
            self.pending = self.revisions.recv().await?.into();
        }
        self.pending.pop_front()
    }

    /// The changes of the next revision, whole (or the rest of the one [`Watch::next`]
    /// began); `None` when the watch closed. Cancel-safe.
    pub async fn next_revision(&mut self) -> Option<Vec<Event>> {
        if !self.pending.is_empty() {
            return Some(self.pending.drain(..).collect());
        }
        self.revisions.recv().await
    }
}

/// Errors of store operations.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The store file or backend could not be opened; names the path or endpoint.
    #[error("cannot open store {path}: {reason}")]
    Open {
        /// Path of the file (or the endpoint).
        path: String,
        /// Why.
        reason: String,
    },
    /// A watch asked for history that is no longer kept.
    #[error("revision {requested} is compacted (oldest kept: {oldest})")]
    Compacted {
        /// Requested start revision.
        requested: Revision,
        /// Oldest revision the backend can still replay from.
        oldest: Revision,
    },
    /// The lease does not exist (never granted, expired or revoked).
    #[error("lease {0} not found")]
    LeaseNotFound(LeaseId),
    /// A key or argument that the store refuses (empty key, TTL 0, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// An I/O or backend failure.
    #[error("store backend error: {0}")]
    Backend(String),
}

/// Result of store operations.
pub type Result<T> = std::result::Result<T, StoreError>;

/// The store contract that every backend implements (see the crate docs for semantics).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Read one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;
    /// Read all keys starting with `prefix`, in key order, and the revision read at.
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)>;
    /// Put a value; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision>;
    /// Delete a key; returns whether it existed (and so whether the revision moved).
    async fn delete(&self, key: &str) -> Result<bool>;
    /// Put `value` only if the key's `mod_rev` is `expected` (0: only if absent).
    /// Returns the new revision on success, `None` when the compare failed.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
    ) -> Result<Option<Revision>> {
        let r = self
            .txn(Txn {
                compares: vec![Compare::ModRev(key.to_string(), expected)],
                success: vec![Op::Put {
                    key: key.to_string(),
                    value,
                    lease: None,
                }],
                failure: vec![],
            })
            .await?;
        Ok(r.succeeded.then_some(r.revision))
    }
    /// Run a transaction atomically.
    async fn txn(&self, txn: Txn) -> Result<TxnResult>;
    /// The current revision.
    async fn revision(&self) -> Result<Revision>;
    /// Watch keys under `prefix` for changes with revision `> from_rev`.
    async fn watch(&self, prefix: &str, from_rev: Revision) -> Result<Watch>;
    /// Grant a lease with a TTL in seconds (>= 1).
    async fn grant_lease(&self, ttl_s: u64) -> Result<LeaseId>;
    /// Renew a lease to its full TTL.
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;
    /// Revoke a lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;
}

impl fmt::Debug for dyn Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dyn Store")
    }
}
