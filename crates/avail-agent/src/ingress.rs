//! The node's ingress: `http://<node>:7480/w/<workload>/<path>` reaches the workload's
//! active replica wherever it runs.
//!
//! - served locally when this node runs the active instance;
//! - otherwise forwarded once to the node in the route table, on its peer port (mutual
//!   TLS: `crate::peers`), marked with `avail-forwarded: <this node>` so a stale route
//!   never loops;
//! - unknown workload: `404` JSON; known but not running: `503` with `Retry-After`.
//!
//! Every reply carries `Avail-Node` (the node that ran the request) and
//! `Avail-Incarnation` (which run of the workload answered).
//!
//! Request bodies are bounded each and together ([`crate::body_budget`]): `413` past
//! 16 MiB, `503` when the node already holds 64 MiB of bodies.
//!
//! Two doors, one handler:
//! - the public port (7480, plain HTTP): every request is a client's. The internal
//!   headers (`avail-forwarded`, `avail-delivered`) a client sends count for nothing
//!   and never reach the workload; there is no contact probe here;
//! - the peer port (7481, mutual TLS, HTTP by ALPN beside the replication links): a
//!   request counts as forwarded only when the node its `avail-forwarded` names is a
//!   node of the cluster and the connection's certificate is that node's (else `403`);
//!   the fencing contact probe (`/_avail/contact`) answers here only.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use avail_driver::process::is_hop_by_hop;
use avail_driver::{HttpRequest, HttpResponse};
use avail_model::agent::ContactReply;
use avail_tls::serve::{Handoff, PeerCert};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use tokio::sync::mpsc;

use crate::body_budget::{self, BodyError};
use crate::ft::{DELIVERED_HEADER, NOT_RUN_HEADER};
use crate::replylog::INGRESS_KEY_PREFIX;
use crate::supervisor::{SlotState, Supervisor};

pub use crate::body_budget::MAX_BODY_BYTES;
/// Longest a forwarded request may take, end to end (above any handler deadline a
/// spec may set, 600 s).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(610);
/// Header marking a request already forwarded by another node's ingress.
pub const FORWARDED: &str = "avail-forwarded";

struct Ingress {
    sup: Arc<Supervisor>,
    /// Per ft workload: keys this ingress assigned whose replies it delivered, to be
    /// reported on the next request (the replica trims them from its reply log).
    delivered: Mutex<HashMap<String, VecDeque<String>>>,
}

/// Delivered keys remembered per workload (older ones age out of the log instead).
const MAX_DELIVERED: usize = 1024;
/// Delivered keys reported on one request, at most.
const DELIVERED_PER_REQUEST: usize = 64;

impl Ingress {
    fn take_delivered(&self, workload: &str) -> Option<String> {
        let mut d = self.delivered.lock().unwrap_or_else(|p| p.into_inner());
        let q = d.get_mut(workload)?;
        let n = q.len().min(DELIVERED_PER_REQUEST);
        let keys: Vec<String> = q.drain(..n).collect();
        if q.is_empty() {
            d.remove(workload);
        }
        (!keys.is_empty()).then(|| keys.join(","))
    }

    fn push_delivered(&self, workload: &str, key: String) {
        let mut d = self.delivered.lock().unwrap_or_else(|p| p.into_inner());
        let q = d.entry(workload.to_string()).or_default();
        q.push_back(key);
        if q.len() > MAX_DELIVERED {
            q.pop_front();
        }
    }
}

/// Serve the public ingress on `public` and the node's peer port on `peer` (HTTP from
/// other nodes here; replication links go to `links`) until the task is aborted.
pub async fn serve(
    public: tokio::net::TcpListener,
    peer: tokio::net::TcpListener,
    peer_tls: Arc<rustls::ServerConfig>,
    links: mpsc::Sender<Handoff>,
    sup: Arc<Supervisor>,
) {
    let state = Arc::new(Ingress {
        delivered: Mutex::new(HashMap::new()),
        sup,
    });
    let not_found = || async {
        error(
            StatusCode::NOT_FOUND,
            "not_found",
            "ingress paths are /w/<workload>/<path>",
        )
    };
    let public_app = Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/w/{*rest}", any(handle_public))
        .fallback(not_found)
        .with_state(state.clone());
    let peer_app = Router::new()
        .route("/_avail/contact", get(contact))
        .route("/w/{*rest}", any(handle_peer))
        .fallback(not_found)
        .with_state(state);
    // The public side: plain HTTP, bounded like every listener (connections, header
    // and idle timeouts); more connections than the API, as clients come here.
    let public_limits = avail_tls::serve::Limits {
        max_connections: 4096,
        max_per_ip: 4096,
        ..Default::default()
    };
    // The peer side: other nodes only (their forwarding pools, contact probes).
    let peer_limits = avail_tls::serve::Limits {
        max_connections: 2048,
        max_per_ip: 512,
        ..Default::default()
    };
    let public = avail_tls::serve::serve(public, None, public_app, public_limits);
    let peer = avail_tls::serve::serve_peer(peer, peer_tls, peer_app, peer_limits, links);
    tokio::select! {
        r = public => if let Err(e) = r { tracing::error!("ingress stopped: {e}") },
        r = peer => if let Err(e) = r { tracing::error!("peer port stopped: {e}") },
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// A request body and the bytes of the node's budget it holds, or `413` past
/// [`MAX_BODY_BYTES`], `503` when the budget is spent.
async fn read_body(
    body: Body,
    headers: &hyper::HeaderMap,
) -> Result<(Bytes, body_budget::Held), Response> {
    let declared = headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    body_budget::read(body, declared)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge => {
                error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", &e.to_string())
            }
            BodyError::Busy => unavailable(&e.to_string()),
            BodyError::Read(_) => error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()),
        })
}

fn unavailable(message: &str) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
    r.headers_mut()
        .insert("retry-after", HeaderValue::from_static("1"));
    r
}

/// A 503 for a request that did not run here and may run where the route leads a
/// moment later (this node not synced yet, the workload starting or moved away): the
/// ingress that took it from the client retries it.
fn not_run(message: &str) -> Response {
    let mut r = unavailable(message);
    r.headers_mut()
        .insert(NOT_RUN_HEADER, HeaderValue::from_static("1"));
    r
}

fn to_response(r: HttpResponse, node: &str, incarnation: u64) -> Response {
    let mut b = Response::builder().status(r.status);
    for (n, v) in &r.headers {
        if !is_hop_by_hop(n) {
            b = b.header(n.as_str(), v.as_str());
        }
    }
    let mut resp = b.body(Body::from(r.body)).unwrap_or_else(|e| {
        error(
            StatusCode::BAD_GATEWAY,
            "bad_gateway",
            &format!("bad reply from workload: {e}"),
        )
    });
    let h = resp.headers_mut();
    if r.status == 503 && !h.contains_key("retry-after") {
        h.insert("retry-after", HeaderValue::from_static("1"));
    }
    if let Ok(v) = HeaderValue::from_str(node) {
        h.insert(HeaderName::from_static("avail-node"), v);
    }
    h.insert(
        HeaderName::from_static("avail-incarnation"),
        HeaderValue::from(incarnation),
    );
    resp
}

/// A request as received, kept so that it can be sent again.
struct Incoming {
    method: hyper::Method,
    name: String,
    rest: String,
    headers: hyper::HeaderMap,
    body: Bytes,
    forwarded: bool,
}

/// One try at an `ft` workload through another node, at most.
pub const FT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long an ingress keeps retrying a request to an `ft` workload across a failover.
pub const FT_RETRY_FOR: Duration = Duration::from_secs(15);

/// A client's request (the public port).
async fn handle_public(State(ing): State<Arc<Ingress>>, req: Request) -> Response {
    handle(&ing, req, false).await
}

/// A request another node's ingress forwarded (the peer port): it counts as forwarded
/// only from a node of the cluster whose certificate names it.
async fn handle_peer(State(ing): State<Arc<Ingress>>, req: Request) -> Response {
    let from = req
        .headers()
        .get(FORWARDED)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let cert = req.extensions().get::<PeerCert>();
    let proven = cert.is_some_and(|c| c.names_node(from)) && ing.sup.peers().is_member(from);
    if !proven {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a forwarded request needs avail-forwarded naming a node of the cluster whose certificate the connection presented",
        );
    }
    handle(&ing, req, true).await
}

async fn handle(ing: &Ingress, req: Request, forwarded: bool) -> Response {
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let after = &path_and_query["/w/".len()..];
    let (name, rest) = match after.find(['/', '?']) {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, ""),
    };
    let rest = if rest.starts_with('/') {
        rest.to_string()
    } else {
        format!("/{rest}")
    };
    let name = name.to_string();
    let (mut parts, body) = req.into_parts();
    parts.headers.remove(FORWARDED);
    // Held until the request is answered: the body may be sent again.
    let (body, _held) = match read_body(body, &parts.headers).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut inc = Incoming {
        forwarded,
        method: parts.method,
        name,
        rest,
        headers: parts.headers,
        body,
    };
    // An ft workload's requests are retried across a failover: they need an id that
    // stays the same on every attempt, so the new replica answers a repeat from its
    // reply log instead of running it twice.
    let ft = ing.sup.route(&inc.name).is_some_and(|r| r.ft);
    if !inc.forwarded {
        // Only an ingress reports deliveries.
        inc.headers.remove(DELIVERED_HEADER);
        // A client's key never passes for one the ingress assigned (those are trimmed
        // on delivery and kept for less time): the reserved prefix gets another.
        if let Some(k) = inc
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .filter(|k| k.starts_with(INGRESS_KEY_PREFIX))
            .map(|k| format!("client-{k}"))
            && let Ok(v) = HeaderValue::from_str(&k)
        {
            inc.headers.insert("idempotency-key", v);
        }
    }
    let mut assigned = None;
    if ft && !inc.headers.contains_key("idempotency-key") {
        let mut id = [0u8; 12];
        let _ = getrandom::fill(&mut id);
        let key: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let key = format!("{INGRESS_KEY_PREFIX}{key}");
        if let Ok(v) = HeaderValue::from_str(&key) {
            inc.headers.insert("idempotency-key", v);
            assigned = Some(key);
        }
    }
    if ft
        && !inc.forwarded
        && let Some(keys) = ing.take_delivered(&inc.name)
        && let Ok(v) = HeaderValue::from_str(&keys)
    {
        inc.headers.insert(DELIVERED_HEADER, v);
    }
    let deadline = std::time::Instant::now() + FT_RETRY_FOR;
    loop {
        match attempt(ing, &inc).await {
            Ok(r) => {
                // This ingress will never send that key again: its log entry can go.
                if let Some(key) = assigned {
                    ing.push_delivered(&inc.name, key);
                }
                return r;
            }
            Err(r) => {
                // Retried, by the ingress that took the request from the client only:
                // an ft workload's request (its key makes a repeat safe), and any
                // request that did not run (a live move, a replica not active yet).
                let ft = ing.sup.route(&inc.name).is_some_and(|r| r.ft);
                let not_run = r.headers().contains_key(NOT_RUN_HEADER);
                if !(ft || not_run) || inc.forwarded || std::time::Instant::now() >= deadline {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }
}

/// How long since this node last heard the control plane (peers ask, to tell an
/// isolated node from a control plane that is away).
async fn contact(State(ing): State<Arc<Ingress>>) -> axum::Json<ContactReply> {
    axum::Json(ContactReply {
        contact_age_ms: ing.sup.judged_age().as_millis() as u64,
    })
}

/// One try: `Ok` is final, `Err` a reply that a retry might improve (503, unreachable).
async fn attempt(ing: &Ingress, inc: &Incoming) -> Result<Response, Response> {
    let name = &inc.name;
    if !ing.sup.is_synced() {
        return Err(not_run("this node has not received its desired state yet"));
    }
    let me = ing.sup.node();
    let route = ing.sup.route(name);
    let is_local_active = route
        .as_ref()
        .is_some_and(|r| r.node.as_deref() == Some(me));
    if let Some(slot) = ing.sup.slot(name).filter(|_| is_local_active) {
        // A node cut off from the control plane serves no ha workload: the server may be
        // restarting it elsewhere (a paused or partitioned node must not answer as a
        // second copy). Until the peers have said whether this node is the one cut off
        // (fenced: refused) or the control plane is away for all (served), the request
        // waits, unrun: the ingress that took it tries again (a control plane outage
        // delays requests by one peer check instead of failing them).
        if slot.assignment.spec.level == avail_model::Level::Ha && ing.sup.must_not_serve_ha() {
            return Err(if ing.sup.is_fenced() {
                unavailable(&format!(
                    "workload {name}: this node has lost the control plane (fenced)"
                ))
            } else {
                not_run(&format!(
                    "workload {name}: this node cannot reach the control plane; asking its peers whether it is the one cut off"
                ))
            });
        }
        return match slot.state {
            SlotState::Running(inst) => {
                let headers = inc
                    .headers
                    .iter()
                    .filter(|(n, _)| !is_hop_by_hop(n.as_str()) && n.as_str() != FORWARDED)
                    .filter_map(|(n, v)| {
                        Some((n.as_str().to_string(), v.to_str().ok()?.to_string()))
                    })
                    .collect();
                let hreq = HttpRequest {
                    method: inc.method.to_string(),
                    path: inc.rest.clone(),
                    headers,
                    body: inc.body.clone(),
                };
                let resp = inst.handle(hreq).await;
                let retry = resp.status == 503;
                let r = to_response(resp, me, slot.assignment.incarnation);
                if retry { Err(r) } else { Ok(r) }
            }
            SlotState::Starting => Err(not_run(&format!("workload {name} is starting"))),
            SlotState::Failed { message, .. } => Err(unavailable(&format!(
                "workload {name} failed to start: {message}"
            ))),
        };
    }
    let Some(route) = route else {
        return Ok(error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no workload named {name:?}"),
        ));
    };
    match &route.node {
        Some(node) if node != me && !inc.forwarded => {
            if route.ft {
                // A primary whose host died mid-request never answers: give up on this
                // try soon and retry (same key) against the route then in force.
                match tokio::time::timeout(FT_ATTEMPT_TIMEOUT, forward(ing, inc, node)).await {
                    Ok(r) => r,
                    Err(_) => Err(unavailable(&format!(
                        "no reply from {node} in time; retrying"
                    ))),
                }
            } else {
                forward(ing, inc, node).await
            }
        }
        None => Err(unavailable(&format!(
            "workload {name} is not placed on any node"
        ))),
        // Routed here but not (yet) running here, or a peer's stale route: never loop.
        _ => Err(not_run(&format!("workload {name} is not running on {me}"))),
    }
}

/// Send the request to `node`'s peer port.
async fn forward(ing: &Ingress, inc: &Incoming, node: &str) -> Result<Response, Response> {
    let Some((peer, base)) = ing.sup.peers().http(node) else {
        return Err(unavailable(&format!("node {node} has no known peer port")));
    };
    let mut b = hyper::Request::builder()
        .method(inc.method.clone())
        .uri(format!("{base}/w/{}{}", inc.name, inc.rest))
        .header(FORWARDED, ing.sup.node());
    for (n, v) in inc.headers.iter() {
        if !is_hop_by_hop(n.as_str()) && n != "host" {
            b = b.header(n, v);
        }
    }
    let Ok(out) = b.body(Full::new(inc.body.clone())) else {
        return Ok(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "cannot forward this request",
        ));
    };
    let exchange = async {
        let resp = peer
            .request(out)
            .await
            .map_err(|e| unavailable(&format!("node {node} unreachable: {e}")))?;
        let (parts, body) = resp.into_parts();
        match Limited::new(body, MAX_BODY_BYTES * 4).collect().await {
            Ok(b) => {
                let r = Response::from_parts(parts, Body::from(b.to_bytes()));
                if r.status() == StatusCode::SERVICE_UNAVAILABLE {
                    Err(r)
                } else {
                    Ok(r)
                }
            }
            Err(e) => Err(error(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                &format!("reading the reply of {node}: {e}"),
            )),
        }
    };
    match tokio::time::timeout(FORWARD_TIMEOUT, exchange).await {
        Ok(r) => r,
        Err(_) => Err(error(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            &format!(
                "no reply from {node} within {} s",
                FORWARD_TIMEOUT.as_secs()
            ),
        )),
    }
}
