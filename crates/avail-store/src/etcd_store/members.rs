//! The members a store talks to, failover between them (see the parent module's
//! "Members"), and what etcd's errors mean.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Client, KvClient, LeaseClient, WatchClient};
use tokio::time::Instant;
use tonic::Code;

use super::EtcdOptions;
use super::keys::Namespace;
use crate::{Result, StoreError};

/// First pause before a request is sent again; doubles up to [`RETRY_MAX_PAUSE`].
const RETRY_FIRST_PAUSE: Duration = Duration::from_millis(20);
/// Longest pause between two tries of one request.
const RETRY_MAX_PAUSE: Duration = Duration::from_millis(500);

/// One endpoint and its clients.
pub(super) struct Member {
    /// The endpoint, for messages.
    pub(super) url: String,
    /// Keeps the channel's endpoint set alive.
    _client: Client,
    pub(super) kv: KvClient,
    pub(super) watch: WatchClient,
    pub(super) lease: LeaseClient,
}

impl Member {
    pub(super) fn new(url: String, client: Client, max_message_bytes: usize) -> Member {
        Member {
            url,
            kv: client
                .kv_client()
                .max_decoding_message_size(max_message_bytes),
            watch: client
                .watch_client()
                .max_decoding_message_size(max_message_bytes),
            lease: client.lease_client(),
            _client: client,
        }
    }
}

/// When a failed request may be sent again (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Retry {
    /// Reads and idempotent requests.
    Always,
    /// Writes.
    IfNotApplied,
}

/// What the store and its watch tasks share.
pub(super) struct Shared {
    pub(super) members: Vec<Member>,
    /// Index of the member in use.
    current: AtomicUsize,
    pub(super) ns: Namespace,
    /// The endpoints, comma-separated, for messages.
    pub(super) endpoints: String,
    pub(super) options: EtcdOptions,
}

impl Shared {
    pub(super) fn new(members: Vec<Member>, options: EtcdOptions) -> Shared {
        assert!(!members.is_empty(), "a store needs an etcd member");
        let endpoints = members
            .iter()
            .map(|m| m.url.as_str())
            .collect::<Vec<_>>()
            .join(",");
        Shared {
            members,
            current: AtomicUsize::new(0),
            ns: Namespace(options.key_prefix.clone()),
            endpoints,
            options,
        }
    }

    /// The member in use, with its index.
    pub(super) fn member(&self) -> (usize, &Member) {
        let i = self.current.load(Ordering::Relaxed) % self.members.len();
        (i, &self.members[i])
    }

    /// Member `i` failed: use the next one (unless another caller already moved on).
    pub(super) fn failed(&self, i: usize) {
        let next = (i + 1) % self.members.len();
        let _ = self
            .current
            .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Runs one request, on the member in use, again on the next member when `retry`
    /// allows, all within the request timeout. The outer error is the timeout; the inner
    /// result is etcd's last answer, for the caller to map.
    pub(super) async fn call<T, F, Fut>(
        &self,
        what: &str,
        retry: Retry,
        mut attempt: F,
    ) -> Result<std::result::Result<T, etcd_client::Error>>
    where
        F: FnMut(&Member) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let timeout = self.options.request_timeout;
        let deadline = Instant::now() + timeout;
        let mut pause = RETRY_FIRST_PAUSE;
        loop {
            let (i, member) = self.member();
            let e = match tokio::time::timeout_at(deadline, attempt(member)).await {
                Ok(Ok(v)) => return Ok(Ok(v)),
                Ok(Err(e)) => e,
                Err(_) => {
                    self.failed(i);
                    return Err(StoreError::Backend(format!(
                        "{what}: no answer from etcd {} within {timeout:?}",
                        member.url
                    )));
                }
            };
            if !is_unavailable(&e) {
                return Ok(Err(e));
            }
            // Whether or not this request goes again, the next one goes elsewhere.
            self.failed(i);
            if retry == Retry::IfNotApplied && !is_not_applied(&e) {
                return Ok(Err(e));
            }
            if Instant::now() + pause >= deadline {
                return Ok(Err(e));
            }
            tracing::debug!(what, member = %member.url, error = %e, "etcd request failed; again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_MAX_PAUSE);
        }
    }
}

fn grpc(e: &etcd_client::Error) -> Option<(Code, &str)> {
    match e {
        etcd_client::Error::GRpcStatus(s) => Some((s.code(), s.message())),
        _ => None,
    }
}

/// The request surely did not reach the cluster's log: no connection was made, the
/// connection closed before the request was written to it (hyper cancels it: "connection
/// closed", "connection was not ready"), or the member had no leader.
pub(super) fn is_not_applied(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => match s.code() {
            Code::Unavailable => {
                let m = s.message();
                m.contains("connect") || m.contains("no leader") || m.contains("not ready")
            }
            Code::Cancelled => source_says(s, &["connection closed", "connection was not ready"]),
            _ => false,
        },
        _ => false,
    }
}

/// Whether an error that caused `e` (its source chain) says one of `texts`.
fn source_says(e: &(dyn std::error::Error + 'static), texts: &[&str]) -> bool {
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if texts.iter().any(|t| text.contains(t)) {
            return true;
        }
        cause = c.source();
    }
    false
}

/// The member is unavailable for now (the request may or may not have been applied).
pub(super) fn is_unavailable(e: &etcd_client::Error) -> bool {
    is_not_applied(e)
        || grpc(e).is_some_and(|(c, m)| {
            matches!(
                c,
                Code::Unavailable | Code::Unknown | Code::DeadlineExceeded
            ) || m.contains("leader changed")
                || m.contains("request timed out")
        })
}

pub(super) fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
        _ => grpc(e).is_some_and(|(c, m)| c == Code::NotFound && m.contains("lease not found")),
    }
}

pub(super) fn is_compacted(e: &etcd_client::Error) -> bool {
    grpc(e).is_some_and(|(_, m)| m.contains("required revision has been compacted"))
}

pub(super) fn is_future_rev(e: &etcd_client::Error) -> bool {
    grpc(e).is_some_and(|(_, m)| m.contains("required revision is a future revision"))
}

/// The store error of a failed call that has no more specific meaning.
pub(super) fn store_error(what: &str, e: etcd_client::Error) -> StoreError {
    match grpc(&e) {
        Some((Code::InvalidArgument, m)) => StoreError::Invalid(format!("{what}: {m}")),
        _ => StoreError::Backend(format!("{what}: {e}")),
    }
}
