//! The guest's own thread: a replica's calls into its guest run here, never on the
//! replica's thread, so the pair link's reader and writer, its heartbeats, acks and
//! lease answers go on while a handler runs. A handler may run up to its `timeout_ms`
//! (5 s by default); the peer declares a replica lost after 150 ms of silence.
//!
//! ```text
//!  replica thread (the actor)                       guest thread
//!  --------------------------                       ------------
//!  queued requests ---- Batch{guest + reply log, requests} ---->
//!  the guest is away: no capture,                   serve the requests in order,
//!  no epoch ends; heartbeats, acks,                 each against the reply log,
//!  releases and leases go on                        until the batch's time is up
//!       <---- Done{guest + reply log, replies, requests not run} ----
//!  hold the replies (output commit); end the epoch: capture guest and log together
//! ```
//!
//! The guest and its reply log travel together ([`GuestSide`]) and are never apart: a
//! capture always sees a log that holds the reply of every call the guest's memory
//! reflects, so a retried request is answered from the log after a failover instead of
//! running twice. One batch at a time is out (the actor holds the only guest side), so
//! the thread's queue holds at most one batch.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use avail_driver::wasm::ft::{FtGuest, FtModule};
use avail_driver::{HttpRequest, HttpResponse};
use avail_model::Level;
use tokio::sync::oneshot;

use super::{DELIVERED_HEADER, now_ms};
use crate::replylog::{Entry, Lookup, ReplyLog, request_digest};

/// The guest and its reply log: on the replica's thread between batches, on the guest
/// thread during one.
pub(super) struct GuestSide {
    pub guest: FtGuest,
    pub log: ReplyLog,
}

/// A request and where its reply goes.
pub(super) type Pending = (HttpRequest, oneshot::Sender<HttpResponse>);

/// Requests for the guest thread to serve, in order.
pub(super) struct Batch {
    pub side: Box<GuestSide>,
    pub requests: Vec<Pending>,
    /// The level in force when the batch left: at `ft` a guest fault leaves the guest as
    /// it is (the checkpoints describe it) and a young reply is never evicted from the
    /// log; below, the guest is made afresh and old replies make room.
    pub level: Level,
    /// A peer takes captures: the log keeps its changes for the next delta.
    pub keep_changes: bool,
    /// No request is started once the batch has run this long (the rest come back
    /// unrun), so an epoch ends about this often even under slow handlers.
    pub budget: Duration,
    pub done: oneshot::Sender<Done>,
}

/// A batch served.
pub(super) struct Done {
    pub side: Box<GuestSide>,
    /// Replies, in the order of their requests, not yet released (output commit).
    pub replies: Vec<(oneshot::Sender<HttpResponse>, HttpResponse)>,
    /// Requests not started (the batch's time was up), in order.
    pub unrun: Vec<Pending>,
    /// Guest faults below `ft` (each one makes the guest afresh).
    pub restarts: u32,
    /// A guest was made afresh: a peer needs a full image.
    pub remade: bool,
}

/// The guest thread of one replica. It ends when this handle is dropped (after the
/// batch it may be serving).
pub(super) struct GuestThread {
    batches: mpsc::Sender<Batch>,
}

impl GuestThread {
    /// Start the thread of workload `name`, which makes guests afresh from `module`.
    pub fn spawn(name: &str, module: FtModule) -> std::io::Result<GuestThread> {
        let (batches, rx) = mpsc::channel::<Batch>();
        let workload = name.to_string();
        std::thread::Builder::new()
            .name(format!("ft-guest-{name}"))
            .spawn(move || {
                while let Ok(batch) = rx.recv() {
                    serve_batch(&workload, &module, batch);
                }
            })?;
        Ok(GuestThread { batches })
    }

    /// Hand a batch over; `Err` gives it back when the thread is gone.
    pub fn send(&self, batch: Batch) -> Result<(), Box<Batch>> {
        self.batches.send(batch).map_err(|e| Box::new(e.0))
    }
}

fn serve_batch(workload: &str, module: &FtModule, batch: Batch) {
    let Batch {
        mut side,
        requests,
        level,
        keep_changes,
        budget,
        done,
    } = batch;
    let started = Instant::now();
    let mut replies = Vec::with_capacity(requests.len());
    let mut unrun = Vec::new();
    let (mut restarts, mut remade) = (0, false);
    for (req, tx) in requests {
        if !replies.is_empty() && started.elapsed() >= budget {
            unrun.push((req, tx));
            continue;
        }
        let (resp, fault) = serve(workload, &mut side, module, req, level, keep_changes);
        if let Some(fresh) = fault {
            restarts += 1;
            remade |= fresh;
        }
        replies.push((tx, resp));
    }
    // The actor gone (the replica stopped): the reply senders drop with the batch.
    let _ = done.send(Done {
        side,
        replies,
        unrun,
        restarts,
        remade,
    });
}

/// The reply to a request whose `Idempotency-Key` answered another request: `422`,
/// nothing run.
fn key_reused() -> HttpResponse {
    let body = avail_model::ApiErrorBody {
        error: avail_model::ApiError {
            code: "idempotency_key_reused".into(),
            message: "this Idempotency-Key was used by a different request (method, path \
                      or body); use a new key for a new request"
                .into(),
            field: Some("Idempotency-Key".into()),
        },
    };
    HttpResponse {
        status: 422,
        headers: vec![("content-type".into(), "application/json".into())],
        body: serde_json::to_vec(&body).expect("error serialises").into(),
    }
}

fn idempotency_key(req: &HttpRequest) -> Option<String> {
    req.headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("idempotency-key"))
        .map(|(_, v)| v.clone())
}

/// Serve one request against the reply log: a logged key is answered from the log, a
/// new one runs the guest and is logged. Returns the reply and, after a guest fault
/// below `ft`, whether the guest was made afresh.
fn serve(
    workload: &str,
    side: &mut GuestSide,
    module: &FtModule,
    mut req: HttpRequest,
    level: Level,
    keep_changes: bool,
) -> (HttpResponse, Option<bool>) {
    if let Some(i) = req
        .headers
        .iter()
        .position(|(n, _)| n.eq_ignore_ascii_case(DELIVERED_HEADER))
    {
        let (_, v) = req.headers.swap_remove(i);
        side.log.delivered(v.split(',').map(str::trim));
    }
    let key = idempotency_key(&req);
    let digest = request_digest(&req.method, &req.path, &req.body);
    // A key is bound to its request: another request under it runs nothing.
    if key
        .as_ref()
        .is_some_and(|k| side.log.lookup(k, &digest) == Lookup::Reused)
    {
        return (key_reused(), None);
    }
    let logged = !matches!(req.method.as_str(), "GET" | "HEAD");
    let new_key = logged && key.as_ref().is_some_and(|k| side.log.get(k).is_none());
    // Below ft the log is best effort (nothing fails over relying on it): the oldest
    // replies make room. At ft a young reply is never evicted.
    if new_key && level != Level::Ft {
        side.log.make_room(now_ms());
    }
    if new_key && level == Level::Ft && !side.log.has_room(now_ms()) {
        let mut r = HttpResponse::error(
            503,
            "busy",
            "the reply log is full of replies not yet delivered; retry",
        );
        r.headers.push(("retry-after".into(), "1".into()));
        return (r, None);
    }
    if let Some(e) = key.as_ref().and_then(|k| side.log.get(k)) {
        let mut headers = e.headers.clone();
        headers.push(("avail-replayed".into(), "1".into()));
        let resp = HttpResponse {
            status: e.status,
            headers,
            body: e.body.clone().into(),
        };
        return (resp, None);
    }
    let mut fault = None;
    let resp = match side.guest.call(&req) {
        Ok(r) => r,
        // At ft the guest goes on from the state the fault left: the next checkpoint
        // carries it to the secondary, so both stay the same. Below ft it is made
        // afresh, like a plain instance, and a standby gets a full image of the new one.
        Err(r) if level == Level::Ft => r,
        Err(r) => {
            match module.fresh() {
                Ok(g) => {
                    side.guest = g;
                    fault = Some(true);
                    tracing::warn!(workload, "guest fault: instance made afresh");
                }
                Err(e) => {
                    fault = Some(false);
                    tracing::error!(workload, "guest fault, and a fresh instance failed: {e}")
                }
            }
            r
        }
    };
    if let (Some(k), true) = (key, logged) {
        side.log.insert(
            k,
            Entry {
                request: digest,
                status: resp.status,
                headers: resp.headers.clone(),
                body: resp.body.to_vec(),
                at_ms: now_ms(),
            },
        );
        // No peer takes captures: the changes need not be kept (a peer attached later
        // gets a full image).
        if !keep_changes {
            side.log.forget_changes();
        }
    }
    (resp, fault)
}
