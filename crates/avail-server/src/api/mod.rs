//! The HTTP API: routes, authentication extractors, handlers and the OpenAPI document.

use avail_model::EventKind;
use std::sync::Arc;
use std::time::Duration;

use avail_model::agent::{
    DesiredState, HandoverRequest, Heartbeat, HeartbeatReply, LeaseReply, LeaseRequest, LogLine,
    SecondaryFailure,
};
use avail_model::api::{ArtifactRef, ControlPlane, Deleted, LevelChange, PlanPreview, TagChange};
use avail_model::spec::LevelPolicy;
use avail_model::spec::is_digest;
use avail_model::{
    ApiErrorBody, ClusterEvent, DriverKind, Level, Node, Workload, WorkloadSpec, WorkloadStatus,
};
use avail_sched::Decision;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::stream;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use utoipa::OpenApi;

use crate::auth::{Claims, Role, TokenError};
use crate::events::NewEvent;
use crate::followers::Next as FollowerNext;
use crate::metrics::FtFigures;
use crate::state::{AppState, NodeRecord, StateError};
use crate::{keys, now_ms, now_s};

mod agent;
pub(crate) mod artifacts;
mod cluster;
mod events;
mod identity;
mod nodes;
mod servers;
mod workloads;

use self::agent::*;
use self::artifacts::*;
use self::cluster::*;
use self::events::*;
use self::nodes::*;
use self::workloads::*;

/// Largest JSON body accepted, bytes.
pub const MAX_JSON_BYTES: usize = 1 << 20;
/// Largest artifact accepted, bytes.
pub const MAX_ARTIFACT_BYTES: usize = 64 << 20;
/// Longest an agent's desired-state poll may wait.
pub const MAX_WAIT_MS: u64 = 30_000;

pub(crate) type AppStateRef = Arc<AppState>;

/// An API error: status plus the JSON error body.
#[derive(Debug)]
pub struct ApiErr(pub StatusCode, pub ApiErrorBody);

impl ApiErr {
    pub(crate) fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiErr {
        ApiErr(status, ApiErrorBody::new(code, message))
    }
    pub(crate) fn not_found(what: &str, name: &str) -> ApiErr {
        ApiErr::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} {name:?} not found"),
        )
    }
    pub(crate) fn invalid(field: &str, message: impl Into<String>) -> ApiErr {
        ApiErr(
            StatusCode::BAD_REQUEST,
            avail_model::ValidationError::new(field, message).into(),
        )
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let mut r = (self.0, Json(self.1)).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl From<StateError> for ApiErr {
    fn from(e: StateError) -> ApiErr {
        match e {
            StateError::Conflict(m) => ApiErr::new(StatusCode::CONFLICT, "conflict", m),
            e @ StateError::StalePlan => {
                ApiErr::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            StateError::Store(e) => ApiErr::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("store: {e}"),
            ),
            StateError::TryAnotherServer(m) => ApiErr::new(
                StatusCode::SERVICE_UNAVAILABLE,
                avail_client::TRY_ANOTHER_SERVER,
                m,
            ),
        }
    }
}

impl From<avail_store::StoreError> for ApiErr {
    fn from(e: avail_store::StoreError) -> ApiErr {
        StateError::Store(e).into()
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiErr>;

fn claims(parts: &Parts, state: &AppState) -> Result<Claims, ApiErr> {
    let token = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let result = match token {
        None => Err(TokenError::Missing),
        Some(t) => state.auth.verify(t, now_s()),
    };
    result.map_err(|e| {
        state.metrics.auth_failures.inc();
        tracing::warn!(path = parts.uri.path(), "rejected request: {e}");
        ApiErr::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
    })
}

/// The caller's verified claims, if its role is one of `allowed` (else 403).
fn claims_of_role(parts: &Parts, state: &AppState, allowed: &[Role]) -> Result<Claims, ApiErr> {
    let c = claims(parts, state)?;
    if allowed.contains(&c.role) {
        Ok(c)
    } else {
        Err(forbidden(&c))
    }
}

fn forbidden(c: &Claims) -> ApiErr {
    ApiErr::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!("a {:?} token may not do this", c.role).to_lowercase(),
    )
}

/// The caller is an administrator.
pub struct Admin;

impl FromRequestParts<AppStateRef> for Admin {
    type Rejection = ApiErr;
    async fn from_request_parts(parts: &mut Parts, state: &AppStateRef) -> Result<Self, ApiErr> {
        claims_of_role(parts, state, &[Role::Admin])?;
        Ok(Admin)
    }
}

/// The caller is the agent of node `.0`: its connection presented a certificate the
/// server issued to that node (one of its last two, unexpired), and its requests name
/// the node in [`avail_client::NODE_HEADER`]. No store read: the node records are in
/// the view.
pub struct AgentNode(pub String);

impl FromRequestParts<AppStateRef> for AgentNode {
    type Rejection = ApiErr;
    async fn from_request_parts(parts: &mut Parts, state: &AppStateRef) -> Result<Self, ApiErr> {
        agent_of(parts, state).inspect_err(|e| {
            state.metrics.auth_failures.inc();
            tracing::warn!(
                path = parts.uri.path(),
                "rejected agent call: {}",
                e.1.error.message
            );
        })
    }
}

fn agent_of(parts: &Parts, state: &AppState) -> Result<AgentNode, ApiErr> {
    let unauthorized = |m: String| ApiErr::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let Some(peer) = parts.extensions.get::<avail_tls::serve::PeerCert>() else {
        return Err(unauthorized(
            "agent calls need the node's certificate (TLS client authentication)".into(),
        ));
    };
    let Some(name) = parts
        .headers
        .get(avail_client::NODE_HEADER)
        .and_then(|v| v.to_str().ok())
    else {
        return Err(unauthorized(format!(
            "agent calls name their node in the {} header",
            avail_client::NODE_HEADER
        )));
    };
    let view = state.view.read().unwrap_or_else(|p| p.into_inner());
    match view.nodes.get(name) {
        Some(rec) if rec.identity.accepts(&peer.digest, now_s()) => Ok(AgentNode(name.to_string())),
        _ => Err(unauthorized(format!(
            "this certificate does not speak for node {name:?}"
        ))),
    }
}

/// An admin (bearer token) or an agent (node certificate): artifact downloads.
pub struct AdminOrAgent;

impl FromRequestParts<AppStateRef> for AdminOrAgent {
    type Rejection = ApiErr;
    async fn from_request_parts(parts: &mut Parts, state: &AppStateRef) -> Result<Self, ApiErr> {
        if parts
            .extensions
            .get::<avail_tls::serve::PeerCert>()
            .is_some()
            && parts.headers.contains_key(avail_client::NODE_HEADER)
        {
            AgentNode::from_request_parts(parts, state).await?;
        } else {
            claims_of_role(parts, state, &[Role::Admin])?;
        }
        Ok(AdminOrAgent)
    }
}

/// Past a body's limit, the server goes on reading (and dropping) at most this much
/// more, for at most [`LINGER`], before it answers `413` and closes: a client still
/// sending then reads the answer instead of a broken pipe (a lingering close, as
/// nginx's). Bounded in bytes and time, and nothing is kept.
pub const LINGER_BYTES: usize = 16 << 20;
/// How long an oversized body is drained at most.
pub const LINGER: Duration = Duration::from_secs(2);

async fn read_body(body: Body, limit: usize) -> ApiResult<Bytes> {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    let mut over = 0usize;
    let deadline = tokio::time::Instant::now() + LINGER;
    loop {
        let next = if over > 0 {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(f) => f,
                Err(_) => break,
            }
        } else {
            body.frame().await
        };
        let Some(frame) = next else { break };
        let frame = frame.map_err(|e| {
            ApiErr::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("reading body: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if over == 0 && buf.len() + data.len() <= limit {
            buf.extend_from_slice(&data);
        } else {
            over += data.len();
            if over > LINGER_BYTES {
                break;
            }
        }
    }
    if over > 0 {
        return Err(ApiErr::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("body larger than {limit} bytes"),
        ));
    }
    Ok(buf.freeze())
}

pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(body: Body) -> ApiResult<T> {
    let bytes = read_body(body, MAX_JSON_BYTES).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        let msg = e.to_string();
        let field = msg
            .split("field `")
            .nth(1)
            .and_then(|r| r.split('`').next())
            .unwrap_or("body")
            .to_string();
        ApiErr::invalid(&field, msg)
    })
}

/// Build the router.
pub fn router(state: AppStateRef) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/workloads", post(create_workload).get(list_workloads))
        .route(
            "/v1/workloads/{name}",
            get(get_workload).delete(delete_workload),
        )
        .route("/v1/workloads/{name}/events", get(workload_events))
        .route("/v1/workloads/{name}/level", put(set_workload_level))
        .route(
            "/v1/cluster/levels",
            get(get_level_policy).put(put_level_policy),
        )
        .route("/v1/workloads/{name}/logs", get(workload_logs))
        .route("/v1/nodes", get(list_nodes))
        .route(
            "/v1/nodes/{name}",
            get(get_node).delete(identity::remove_node),
        )
        .route(
            "/v1/nodes/{name}/tags",
            axum::routing::patch(patch_node_tags),
        )
        .route("/v1/events", get(events))
        .route("/v1/artifacts", put(put_artifact))
        .route("/v1/artifacts/{digest}", get(get_artifact))
        .route("/v1/agent/join", post(identity::join))
        .route("/v1/agent/renew", post(identity::renew))
        .route(
            "/v1/tokens",
            post(identity::create_token).get(identity::list_tokens),
        )
        .route(
            "/v1/tokens/{id}",
            axum::routing::delete(identity::revoke_token),
        )
        .route("/v1/agent/heartbeat", post(heartbeat))
        .route("/v1/internal/heard", post(servers::heard))
        .route("/v1/cluster/control", get(control_plane))
        .route("/v1/agent/desired", get(desired))
        .route("/v1/agent/pairs/{name}/lease", post(pair_lease))
        .route("/v1/agent/pairs/{name}/failed", post(pair_secondary_failed))
        .route("/v1/agent/pairs/{name}/handover", post(pair_handover))
        .route(
            "/v1/nodes/{name}/drain",
            post(drain_node).delete(undrain_node),
        )
        .fallback(|| async { ApiErr::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

async fn count_requests(State(state): State<AppStateRef>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    state
        .metrics
        .request(&method, &route, resp.status().as_u16());
    resp
}

#[utoipa::path(get, path = "/livez", responses((status = 200, description = "the process is alive")))]
async fn livez() -> &'static str {
    "ok\n"
}

#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "the store answers"), (status = 503, body = ApiErrorBody)))]
async fn readyz(State(state): State<AppStateRef>) -> ApiResult<&'static str> {
    // Ready when the store answers a read within a second (an etcd without its quorum
    // does not).
    match tokio::time::timeout(Duration::from_secs(1), state.store.revision()).await {
        Ok(r) => {
            r?;
        }
        Err(_) => {
            return Err(ApiErr::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "store: no answer within 1 s",
            ));
        }
    }
    Ok("ok\n")
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text exposition")))]
async fn metrics(State(state): State<AppStateRef>) -> Response {
    let node_states: Vec<&'static str> = state.nodes().iter().map(|n| n.state.as_str()).collect();
    let view = state.view.read().unwrap_or_else(|p| p.into_inner());
    let phases: Vec<&'static str> = view
        .workloads
        .values()
        .map(|(w, _)| w.status.phase.as_str())
        .collect();
    let ft: Vec<FtFigures<'_>> = view
        .workloads
        .values()
        .filter_map(|(w, _)| {
            Some(FtFigures {
                workload: &w.spec.name,
                level_state: w.status.level_state,
                generation: w.status.generation,
                status: w.status.ft.as_ref()?,
            })
        })
        .collect();
    state
        .metrics
        .set_followers(state.events.followers.figures());
    let text = state.metrics.scrape(&node_states, &phases, &ft);
    drop(view);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// The OpenAPI document, generated from the handlers and the model types.
#[derive(OpenApi)]
#[openapi(
    info(title = "avail API", description = "Control plane of avail. Errors are `{\"error\": {\"code\", \"message\", \"field\"}}`."),
    paths(livez, readyz, metrics, create_workload, list_workloads, get_workload, delete_workload, workload_events, workload_logs,
          list_nodes, get_node, events, put_artifact, get_artifact, identity::join, identity::renew,
          identity::create_token, identity::list_tokens, identity::revoke_token,
          identity::remove_node, heartbeat, desired, pair_lease,
          pair_secondary_failed, patch_node_tags, set_workload_level,
          pair_handover, drain_node, undrain_node, get_level_policy, put_level_policy,
          servers::heard, control_plane),
    components(schemas(ControlPlane, Deleted, ArtifactRef, HeartbeatReply, TagChange, PlanPreview, LevelChange, LevelPolicy)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}
