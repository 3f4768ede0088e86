//! The etcd backend: [`Store`] over an etcd v3 cluster, through the `etcd-client` crate
//! (gRPC over plain HTTP/2; no TLS yet).
//!
//! # Mapping
//! | [`Store`]                        | etcd v3 RPC                                                   |
//! | -------------------------------- | ------------------------------------------------------------- |
//! | `get`, `range`                   | `Range` (linearizable); `range` in pages of [`RANGE_PAGE_KEYS`] keys, all pages at the first page's revision |
//! | `put`, `delete`                  | `Put` (with its lease), `DeleteRange` of one key              |
//! | `txn`, `compare_and_swap`        | `Txn`: `ModRev` → `mod_revision ==`, `Value` → `value ==`; puts (with lease) and deletes |
//! | `revision`                       | header of a count-only `Range`                                |
//! | `watch`                          | `Watch` of the prefix from `start_revision` (`watch.rs`)      |
//! | `grant_lease`, `revoke_lease`    | `LeaseGrant`, `LeaseRevoke`                                   |
//! | `keep_alive`                     | one round trip on a `LeaseKeepAlive` stream                   |
//!
//! Every revision a call returns is the `revision` of etcd's response header: etcd bumps
//! it once per write request (a whole `Txn` included) and not at all for a request that
//! changes nothing, exactly as the model says. etcd's own error strings (its Go client
//! maps them the same way) give [`StoreError::LeaseNotFound`] ("requested lease not
//! found") and [`StoreError::Compacted`] ("required revision has been compacted"); a gRPC
//! `InvalidArgument` (a request over `--max-request-bytes`, a TTL over etcd's maximum)
//! is [`StoreError::Invalid`]; anything else, a timeout included, is
//! [`StoreError::Backend`] naming the operation and key. Empty keys, zero TTLs and keys
//! written twice in one branch are refused before any request, with the redb backend's
//! messages.
//!
//! # Namespace
//! Every key is stored under [`EtcdOptions::key_prefix`] (default `/avail/`), so that
//! several avail clusters, or the tests of the conformance suite, share one etcd; the
//! prefix is stripped from every key read back. Revisions, leases and compaction are
//! etcd-wide and not namespaced: a writer in another namespace moves the revision too.
//!
//! # Members
//! `etcd-client` balances one channel over all endpoints, but a member that refuses
//! connections stays "ready" in its balancer and fails every request sent its way
//! (etcd-client issue 39). So the store keeps one client per endpoint and does what
//! etcd's Go client does: it talks to one member at a time, moves to the next when that
//! one fails, and sends a failed request again, within the request timeout, only when
//! that is safe: reads and idempotent requests after any sign that the member is
//! unavailable; writes only when they surely did not reach the cluster's log (no
//! connection could be made, or the member had no leader: the store asks etcd to refuse
//! requests then). A write whose fate is unknown (a timeout, a connection lost
//! mid-request) is [`StoreError::Backend`], as with etcd's own client.
//!
//! # Bounds
//! - every call (its retries included) and every stream set-up is cut at
//!   [`EtcdOptions::request_timeout`], a TCP connect at [`EtcdOptions::connect_timeout`];
//!   HTTP/2 pings every [`KEEPALIVE_INTERVAL`] notice a dead connection under a watch;
//! - a message from etcd decodes up to [`EtcdOptions::max_message_bytes`];
//! - a watch has one channel of [`EtcdOptions::watch_channel`] events and retries a broken
//!   stream for at most [`EtcdOptions::watch_retry`] (its protocol: `etcd_store/watch.rs`).
//!
//! # Differences from the model (see also the crate docs)
//! - **Lease TTL floor**: etcd raises a TTL below its minimum, `⌈1.5 × election
//!   timeout⌉` (2 s with etcd's default flags, 1 s with the test kit's), to that minimum.
//!   `grant_lease` logs it at `debug`; TTLs that matter (heartbeats of several seconds)
//!   are above it.
//! - **History** is kept until somebody compacts etcd (`--auto-compaction-*` flags, or
//!   [`EtcdStore::compact`]); a watch from below the compaction gets
//!   [`StoreError::Compacted`] with `oldest` = etcd's compact revision.
//! - **Values** are limited by etcd's `--max-request-bytes` (1.5 MiB by default) for a
//!   whole request; a larger put is [`StoreError::Invalid`].

mod keys;
mod members;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, CompactionOptions, Compare as EtcdCompare, CompareOp, ConnectOptions, GetOptions,
    PutOptions, Txn as EtcdTxn, TxnOp,
};

use crate::check_key;
use crate::{
    Compare, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError, Txn, TxnResult, Watch,
};
use keys::{header_rev, key_range, lease_id};
use members::{
    Member, Retry, Shared, is_compacted, is_future_rev, is_lease_not_found, store_error,
};

/// Default of [`EtcdOptions::key_prefix`].
pub const DEFAULT_KEY_PREFIX: &str = "/avail/";
/// Default of [`EtcdOptions::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of [`EtcdOptions::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default of [`EtcdOptions::watch_retry`].
pub const DEFAULT_WATCH_RETRY: Duration = Duration::from_secs(30);
/// Default of [`EtcdOptions::watch_channel`] (as the redb backend's).
pub const DEFAULT_WATCH_CHANNEL: usize = 1024;
/// Default of [`EtcdOptions::max_message_bytes`].
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Keys per page of a `range`.
pub const RANGE_PAGE_KEYS: i64 = 256;
/// Interval of HTTP/2 pings on the connection (etcd refuses pings more often than its
/// `--grpc-keepalive-min-time`, 5 s by default); an unanswered ping for
/// [`EtcdOptions::request_timeout`] closes the connection.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// A `range` whose pinned revision is compacted between two pages starts over, at most
/// this many times in all.
const RANGE_ATTEMPTS: usize = 3;

/// Tunables of an [`EtcdStore`]; [`Default`] gives the documented defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdOptions {
    /// Prefix of every key in etcd, stripped on the way back (may be empty).
    pub key_prefix: String,
    /// Longest wait for one request, or for a stream to be set up.
    pub request_timeout: Duration,
    /// Longest wait for a TCP connection to an endpoint.
    pub connect_timeout: Duration,
    /// How long a watch whose stream broke tries to resume before it closes its channel.
    pub watch_retry: Duration,
    /// Capacity, in revisions, of each [`Watch`]'s channel; a watcher that falls this far behind
    /// is cancelled (its channel closes). Must be >= 1.
    pub watch_channel: usize,
    /// Largest message accepted from etcd (a page of a range, a batch of watch events).
    pub max_message_bytes: usize,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            key_prefix: DEFAULT_KEY_PREFIX.to_string(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            watch_retry: DEFAULT_WATCH_RETRY,
            watch_channel: DEFAULT_WATCH_CHANNEL,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// The [`Store`] on an etcd cluster (see the [module docs](self)).
///
/// Cheap to share behind an `Arc`; every call is independent. Watches go on after the
/// store is dropped, until their receiver is.
pub struct EtcdStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.shared.endpoints)
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (`http://host:port`, or `host:port`) and checks
    /// that it answers within the connect and request timeouts; otherwise
    /// [`StoreError::Open`] naming the endpoints. Must be called inside a tokio runtime.
    pub async fn connect(endpoints: &[String], options: EtcdOptions) -> Result<Self> {
        let joined = endpoints.join(",");
        let open_err = |reason: String| StoreError::Open {
            path: joined.clone(),
            reason,
        };
        if endpoints.is_empty() {
            return Err(StoreError::Invalid("no etcd endpoint given".into()));
        }
        if options.watch_channel == 0
            || options.request_timeout.is_zero()
            || options.connect_timeout.is_zero()
            || options.max_message_bytes == 0
        {
            return Err(StoreError::Invalid(format!(
                "watch_channel, timeouts and max_message_bytes must be > 0: {options:?}"
            )));
        }
        let connect = ConnectOptions::new()
            .with_timeout(options.request_timeout)
            .with_connect_timeout(options.connect_timeout)
            .with_keep_alive(KEEPALIVE_INTERVAL, options.request_timeout)
            .with_require_leader(true);
        let mut members = Vec::with_capacity(endpoints.len());
        for url in endpoints {
            // Connections are made lazily, at the first request: this does no I/O.
            let client = Client::connect([url], Some(connect.clone()))
                .await
                .map_err(|e| open_err(format!("{url}: {e}")))?;
            members.push(Member::new(url.clone(), client, options.max_message_bytes));
        }
        let store = EtcdStore {
            shared: Arc::new(Shared::new(members, options)),
        };
        store
            .revision()
            .await
            .map_err(|e| open_err(format!("etcd does not answer: {e}")))?;
        Ok(store)
    }

    /// The options the store runs with.
    pub fn options(&self) -> &EtcdOptions {
        &self.shared.options
    }

    /// Compacts etcd's history up to `revision` (etcd-wide, every namespace), waiting
    /// until it is applied; later watches from below `revision` get
    /// [`StoreError::Compacted`]. Compacting at or below an earlier compaction is a
    /// no-op; a future revision is [`StoreError::Invalid`].
    pub async fn compact(&self, revision: Revision) -> Result<()> {
        let what = format!("compact at {revision}");
        let rev = i64::try_from(revision)
            .map_err(|_| StoreError::Invalid(format!("{what}: revision out of range")))?;
        let r = self
            .shared
            .call(&what, Retry::Always, |m| {
                let mut kv = m.kv.clone();
                async move {
                    kv.compact(rev, Some(CompactionOptions::new().with_physical()))
                        .await
                }
            })
            .await?;
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_compacted(&e) => Ok(()),
            Err(e) if is_future_rev(&e) => Err(StoreError::Invalid(format!("{what}: {e}"))),
            Err(e) => Err(store_error(&what, e)),
        }
    }

    /// Reads `prefix` page by page at one revision; `Ok(None)` when that revision was
    /// compacted between two pages.
    async fn range_once(&self, prefix: &str) -> Result<Option<(Vec<KeyValue>, Revision)>> {
        let what = format!("range {prefix:?}");
        let (mut start, end) = key_range(&self.shared.ns.key(prefix));
        let mut out = Vec::new();
        let mut at: Option<i64> = None;
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(RANGE_PAGE_KEYS);
            if let Some(rev) = at {
                opts = opts.with_revision(rev);
            }
            let mut resp = match self
                .shared
                .call(&what, Retry::Always, |m| {
                    let (mut kv, start, opts) = (m.kv.clone(), start.clone(), opts.clone());
                    async move { kv.get(start, Some(opts)).await }
                })
                .await?
            {
                Ok(resp) => resp,
                Err(e) if at.is_some() && is_compacted(&e) => return Ok(None),
                Err(e) => return Err(store_error(&what, e)),
            };
            let rev = header_rev(resp.header(), &what)?;
            let more = resp.more();
            let kvs = resp.take_kvs();
            if let Some(last) = kvs.last() {
                start = last.key().to_vec();
                start.push(0);
            }
            for kv in &kvs {
                out.push(self.shared.ns.key_value(kv)?);
            }
            let pinned = *at.get_or_insert(rev as i64);
            if !more || kvs.is_empty() {
                return Ok(Some((out, pinned as Revision)));
            }
        }
    }

    /// Which of `leases` etcd does not know (the first such); the first one if all are
    /// alive again by now (the caller's request said one was not).
    async fn dead_lease(&self, leases: &[LeaseId]) -> LeaseId {
        for &l in leases {
            let Ok(id) = i64::try_from(l) else {
                return l;
            };
            match self
                .shared
                .call("lease time-to-live", Retry::Always, |m| {
                    let mut lease = m.lease.clone();
                    async move { lease.time_to_live(id, None).await }
                })
                .await
            {
                Ok(Ok(r)) if r.ttl() > 0 => continue,
                Ok(Err(e)) if !is_lease_not_found(&e) => continue,
                Err(_) => continue,
                _ => return l,
            }
        }
        leases[0]
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        check_key(key)?;
        let what = format!("get {key:?}");
        let key = self.shared.ns.key(key);
        let resp = self
            .shared
            .call(&what, Retry::Always, |m| {
                let (mut kv, key) = (m.kv.clone(), key.clone());
                async move { kv.get(key, None).await }
            })
            .await?
            .map_err(|e| store_error(&what, e))?;
        resp.kvs()
            .first()
            .map(|kv| self.shared.ns.key_value(kv))
            .transpose()
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        for _ in 0..RANGE_ATTEMPTS {
            if let Some(r) = self.range_once(prefix).await? {
                return Ok(r);
            }
        }
        Err(StoreError::Backend(format!(
            "range {prefix:?}: compacted between pages {RANGE_ATTEMPTS} times"
        )))
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision> {
        check_key(key)?;
        let what = format!("put {key:?}");
        let mut opts = PutOptions::new();
        if let Some(l) = lease {
            opts = opts.with_lease(lease_id(l)?);
        }
        let key = self.shared.ns.key(key);
        let resp = self
            .shared
            .call(&what, Retry::IfNotApplied, |m| {
                let (mut kv, key, value) = (m.kv.clone(), key.clone(), value.clone());
                let opts = opts.clone();
                async move { kv.put(key, value, Some(opts)).await }
            })
            .await?
            .map_err(|e| match lease {
                Some(l) if is_lease_not_found(&e) => StoreError::LeaseNotFound(l),
                _ => store_error(&what, e),
            })?;
        header_rev(resp.header(), &what)
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        check_key(key)?;
        let what = format!("delete {key:?}");
        let key = self.shared.ns.key(key);
        let resp = self
            .shared
            .call(&what, Retry::IfNotApplied, |m| {
                let (mut kv, key) = (m.kv.clone(), key.clone());
                async move { kv.delete(key, None).await }
            })
            .await?
            .map_err(|e| store_error(&what, e))?;
        Ok(resp.deleted() > 0)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        txn.check()?;
        let ns = &self.shared.ns;
        let compares: Vec<EtcdCompare> = txn
            .compares
            .iter()
            .map(|c| match c {
                // A revision etcd cannot hold never matches; -1 never does either.
                Compare::ModRev(k, r) => EtcdCompare::mod_revision(
                    ns.key(k),
                    CompareOp::Equal,
                    i64::try_from(*r).unwrap_or(-1),
                ),
                Compare::Value(k, v) => EtcdCompare::value(ns.key(k), CompareOp::Equal, v.clone()),
            })
            .collect();
        let mut leases: Vec<LeaseId> = Vec::new();
        let mut ops = |branch: &[Op]| -> Result<Vec<TxnOp>> {
            branch
                .iter()
                .map(|op| match op {
                    Op::Put { key, value, lease } => {
                        let opts = match lease {
                            Some(l) => {
                                if !leases.contains(l) {
                                    leases.push(*l);
                                }
                                Some(PutOptions::new().with_lease(lease_id(*l)?))
                            }
                            None => None,
                        };
                        Ok(TxnOp::put(ns.key(key), value.clone(), opts))
                    }
                    Op::Delete { key } => Ok(TxnOp::delete(ns.key(key), None)),
                })
                .collect()
        };
        let success = ops(&txn.success)?;
        let failure = ops(&txn.failure)?;
        let request = EtcdTxn::new()
            .when(compares)
            .and_then(success)
            .or_else(failure);
        let what = "txn";
        let call = self.shared.call(what, Retry::IfNotApplied, |m| {
            let (mut kv, request) = (m.kv.clone(), request.clone());
            async move { kv.txn(request).await }
        });
        let resp = match call.await? {
            Ok(resp) => resp,
            Err(e) if is_lease_not_found(&e) && !leases.is_empty() => {
                return Err(StoreError::LeaseNotFound(self.dead_lease(&leases).await));
            }
            Err(e) => return Err(store_error(what, e)),
        };
        Ok(TxnResult {
            succeeded: resp.succeeded(),
            revision: header_rev(resp.header(), what)?,
        })
    }

    async fn revision(&self) -> Result<Revision> {
        let what = "revision";
        let (key, _) = key_range(&self.shared.ns.key(""));
        let resp = self
            .shared
            .call(what, Retry::Always, |m| {
                let (mut kv, key) = (m.kv.clone(), key.clone());
                async move { kv.get(key, Some(GetOptions::new().with_count_only())).await }
            })
            .await?
            .map_err(|e| store_error(what, e))?;
        header_rev(resp.header(), what)
    }

    async fn watch(&self, prefix: &str, from_rev: Revision) -> Result<Watch> {
        watch::open(self.shared.clone(), prefix, from_rev).await
    }

    async fn grant_lease(&self, ttl_s: u64) -> Result<LeaseId> {
        if ttl_s == 0 {
            return Err(StoreError::Invalid("lease TTL must be >= 1 s".into()));
        }
        let what = format!("grant lease of {ttl_s} s");
        let ttl = i64::try_from(ttl_s)
            .map_err(|_| StoreError::Invalid(format!("lease TTL {ttl_s} s is too large")))?;
        let resp = self
            .shared
            .call(&what, Retry::IfNotApplied, |m| {
                let mut lease = m.lease.clone();
                async move { lease.grant(ttl, None).await }
            })
            .await?
            .map_err(|e| store_error(&what, e))?;
        if !resp.error().is_empty() {
            return Err(StoreError::Backend(format!("{what}: {}", resp.error())));
        }
        if resp.ttl() != ttl {
            tracing::debug!(
                requested_s = ttl,
                granted_s = resp.ttl(),
                "etcd changed the TTL of a lease"
            );
        }
        match LeaseId::try_from(resp.id()) {
            Ok(id) if id != 0 => Ok(id),
            _ => Err(StoreError::Backend(format!(
                "{what}: etcd answered lease id {}",
                resp.id()
            ))),
        }
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let id = lease_id(lease)?;
        let what = format!("keep lease {lease} alive");
        // One request and its answer (TTL 0: not found) on a fresh stream, closed on drop;
        // renewing twice does no harm.
        let call = self.shared.call(&what, Retry::Always, |m| {
            let mut lease = m.lease.clone();
            async move { lease.keep_alive(id).await.map(drop) }
        });
        match call.await? {
            Ok(_) => Ok(()),
            Err(e) if is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(lease)),
            Err(e) => Err(store_error(&what, e)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let id = lease_id(lease)?;
        let what = format!("revoke lease {lease}");
        let call = self.shared.call(&what, Retry::IfNotApplied, |m| {
            let mut lease = m.lease.clone();
            async move { lease.revoke(id).await }
        });
        match call.await? {
            Ok(_) => Ok(()),
            Err(e) if is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(lease)),
            Err(e) => Err(store_error(&what, e)),
        }
    }
}
