//! The HTTP API: routes, authentication extractors, handlers and the OpenAPI document.

use avail_model::EventKind;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use avail_model::agent::{
    DesiredState, HandoverRequest, Heartbeat, HeartbeatReply, LeaseReply, LeaseRequest, LogLine,
    SecondaryFailure,
};
use avail_model::spec::LevelPolicy;
use avail_model::spec::is_digest;
use avail_model::{
    ApiErrorBody, ClusterEvent, DriverKind, Level, Node, Phase, Workload, WorkloadSpec,
    WorkloadStatus,
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
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{OpenApi, ToSchema};

use crate::admission::Placement;
use crate::auth::{Claims, Role, TokenError};
use crate::events::NewEvent;
use crate::followers::Next as FollowerNext;
use crate::metrics::FtFigures;
use crate::state::{AppState, NodeRecord, StateError};
use crate::{keys, now_ms, now_s};

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

async fn read_body(body: Body, limit: usize) -> ApiResult<Bytes> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit");
        if too_large {
            ApiErr::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("body larger than {limit} bytes"),
            )
        } else {
            ApiErr::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("reading body: {e}"),
            )
        }
    })
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
            get(get_node).delete(crate::api_identity::remove_node),
        )
        .route(
            "/v1/nodes/{name}/tags",
            axum::routing::patch(patch_node_tags),
        )
        .route("/v1/events", get(events))
        .route("/v1/artifacts", put(put_artifact))
        .route("/v1/artifacts/{digest}", get(get_artifact))
        .route("/v1/agent/join", post(crate::api_identity::join))
        .route("/v1/agent/renew", post(crate::api_identity::renew))
        .route(
            "/v1/tokens",
            post(crate::api_identity::create_token).get(crate::api_identity::list_tokens),
        )
        .route(
            "/v1/tokens/{id}",
            axum::routing::delete(crate::api_identity::revoke_token),
        )
        .route("/v1/agent/heartbeat", post(heartbeat))
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
    state.store.revision().await?;
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

/// What `POST /v1/workloads?dry_run=true` answers: where the workload would go now.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PlanPreview {
    /// Workload name.
    pub workload: String,
    /// Whether it fits now.
    pub placeable: bool,
    /// Its node (the primary, for `ft`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `ft`: its secondary's node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secondary: Option<String>,
    /// Why it does not fit, with counts per reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanation: Option<String>,
}

/// Query of `POST /v1/workloads`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct CreateQuery {
    /// Validate and plan only: answer a [`PlanPreview`], create nothing.
    #[serde(default)]
    pub dry_run: bool,
}

#[utoipa::path(post, path = "/v1/workloads", request_body = WorkloadSpec, params(CreateQuery),
    responses((status = 201, body = Workload, description = "created; `status.phase` is `pending` with an explanation when no node fits"),
              (status = 200, body = PlanPreview, description = "with `dry_run=true`: where it would go now; nothing is created"),
              (status = 400, body = ApiErrorBody), (status = 401, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 413, body = ApiErrorBody)),
    security(("bearer" = [])))]
async fn create_workload(
    _: Admin,
    State(state): State<AppStateRef>,
    Query(q): Query<CreateQuery>,
    body: Body,
) -> ApiResult<Response> {
    let bytes = read_body(body, MAX_JSON_BYTES).await?;
    let text = std::str::from_utf8(&bytes).map_err(|_| ApiErr::invalid("body", "not UTF-8"))?;
    let mut spec =
        WorkloadSpec::parse(text).map_err(|e| ApiErr(StatusCode::BAD_REQUEST, e.into()))?;
    // A spec that names no level gets the cluster's default (at most ha for a process).
    let policy = state.level_policy();
    if !WorkloadSpec::names_level(text) {
        spec.level = match (spec.driver, policy.default) {
            (DriverKind::Process, Level::Ft) => Level::Ha,
            (_, l) => l,
        };
    }
    spec.validate()
        .map_err(|e| ApiErr(StatusCode::BAD_REQUEST, e.into()))?;
    // Whether the module can be checkpointed (every wasm level but ft runs without).
    let mut checkpointable = true;
    if spec.driver == DriverKind::Wasm {
        let path = state.artifacts_dir().join(artifact_file(&spec.artifact));
        // Checked once per artifact digest (the bytes are named by it).
        let checked = match state.module_checks.get(&spec.artifact) {
            Some(c) => c,
            None => {
                let module = tokio::fs::read(&path).await.map_err(|_| {
                    ApiErr::invalid(
                        "artifact",
                        format!(
                            "{} has not been uploaded (PUT /v1/artifacts)",
                            spec.artifact
                        ),
                    )
                })?;
                let c = tokio::task::spawn_blocking(move || {
                    crate::module_checks::ModuleChecks::check(&module)
                })
                .await
                .map_err(|e| {
                    ApiErr::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                })?;
                state.module_checks.put(&spec.artifact, c.clone());
                c
            }
        };
        checked.valid.map_err(|m| ApiErr::invalid("artifact", m))?;
        checkpointable = match checked.rewrite {
            Ok(()) => true,
            Err(e) if spec.level == avail_model::Level::Ft => {
                return Err(ApiErr::invalid("artifact", e));
            }
            Err(_) => false,
        };
    }
    let name = spec.name.clone();
    let _guard = state.placement.lock().await;
    if state.workload(&name).is_some() {
        return Err(ApiErr::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("workload {name:?} already exists"),
        ));
    }
    let mut w = Workload {
        uid: crate::new_uid(),
        spec,
        status: WorkloadStatus {
            phase: Phase::Pending,
            level_state: None,
            node: None,
            incarnation: 0,
            restarts: 0,
            message: None,
            updated_ms: now_ms(),
            secondary: None,
            generation: 0,
            reservation: None,
            plain: false,
            moving_to: None,
            ft: None,
        },
        created_ms: now_ms(),
    };
    if q.dry_run {
        drop(_guard);
        let preview = match state.preview(&w) {
            Decision::Place {
                node, secondary, ..
            } => PlanPreview {
                workload: name,
                placeable: true,
                node: Some(node),
                secondary,
                explanation: None,
            },
            Decision::Unplaceable { explanation } => PlanPreview {
                workload: name,
                placeable: false,
                node: None,
                secondary: None,
                explanation: Some(explanation),
            },
        };
        return Ok(Json(preview).into_response());
    }
    // Plan, and write the placement by compare-and-swap on the placement revision the
    // plan was made at; a plan made stale by another placement is made again.
    w.status.plain = w.spec.driver == DriverKind::Wasm && !checkpointable;
    let pending = w.clone();
    let mut attempts = 0;
    let decision = loop {
        attempts += 1;
        w = pending.clone();
        let (decision, at) = state.decide(&w);
        let written = match &decision {
            Decision::Place { node, .. } => {
                // Admitted at the node's minimum level; the plan kept it off the nodes
                // where it cannot run at theirs (tags changed since: plan again).
                let Ok(admitted) = state.admit_on(&w, node, Placement::Start) else {
                    if attempts < 5 {
                        continue;
                    }
                    return Err(ApiErr::new(
                        StatusCode::CONFLICT,
                        "conflict",
                        "the nodes' tags kept changing under the plan; try again",
                    ));
                };
                crate::state::apply_admitted(&mut w, &admitted);
                w.status.phase = Phase::Placed;
                w.status.node = Some(node.clone());
                w.status.incarnation = 1;
                w.status.generation = 1;
                let placed = NewEvent::new(
                    EventKind::WorkloadPlaced,
                    Some(&name),
                    Some(node),
                    crate::state::with_admission(
                        format!("placed on {node} (incarnation 1)"),
                        &admitted,
                    ),
                );
                let events = vec![created_event(&w), placed];
                state.write_placement_with_events(&w, 0, at, events).await
            }
            Decision::Unplaceable { explanation } => {
                w.status.message = Some(format!("unplaceable: {explanation}"));
                let unplaceable = NewEvent::new(
                    EventKind::WorkloadUnplaceable,
                    Some(&name),
                    None,
                    explanation,
                );
                let events = vec![created_event(&w), unplaceable];
                state.write_workload_with_events(&w, 0, events).await
            }
        };
        match written {
            Ok(_) => break decision,
            Err(StateError::StalePlan) if attempts < 5 => continue,
            Err(StateError::Conflict(_)) => {
                return Err(ApiErr::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    format!("workload {name:?} already exists"),
                ));
            }
            Err(e) => return Err(e.into()),
        }
    };
    drop(_guard);
    if let Decision::Place {
        node, displaced, ..
    } = &decision
    {
        state.release_displaced(displaced, node).await;
    }
    if w.status.node.is_some() {
        match w.spec.level {
            avail_model::Level::Ft => state.place_secondaries().await,
            avail_model::Level::Ha => state.place_reservations().await,
            avail_model::Level::None => {}
        }
        if let Some((now, _)) = state.workload(&name) {
            w = now;
        }
    }
    Ok((StatusCode::CREATED, Json(w)).into_response())
}

/// The `workload.created` event, committed with the workload's first write.
fn created_event(w: &Workload) -> NewEvent {
    NewEvent::new(
        EventKind::WorkloadCreated,
        Some(&w.spec.name),
        None,
        format!(
            "{} workload at level {}",
            w.spec.driver.as_str(),
            w.spec.level.as_str()
        ),
    )
}

#[utoipa::path(get, path = "/v1/workloads", responses((status = 200, body = [Workload])), security(("bearer" = [])))]
async fn list_workloads(_: Admin, State(state): State<AppStateRef>) -> Json<Vec<Workload>> {
    let v = state.view.read().unwrap_or_else(|p| p.into_inner());
    Json(v.workloads.values().map(|(w, _)| w.clone()).collect())
}

#[utoipa::path(get, path = "/v1/workloads/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Workload), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
async fn get_workload(
    _: Admin,
    State(state): State<AppStateRef>,
    Path(name): Path<String>,
) -> ApiResult<Json<Workload>> {
    state
        .workload(&name)
        .map(|(w, _)| Json(w))
        .ok_or_else(|| ApiErr::not_found("workload", &name))
}

/// Reply of a delete.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct Deleted {
    /// What was deleted (a workload, node or join token).
    pub deleted: String,
}

#[utoipa::path(delete, path = "/v1/workloads/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Deleted), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
async fn delete_workload(
    _: Admin,
    State(state): State<AppStateRef>,
    Path(name): Path<String>,
) -> ApiResult<Json<Deleted>> {
    let Some((w, rev)) = state.workload(&name) else {
        return Err(ApiErr::not_found("workload", &name));
    };
    let deleted = NewEvent::new(
        EventKind::WorkloadDeleted,
        Some(&name),
        w.status.node.as_deref(),
        "deleted",
    );
    let txn = avail_store::Txn {
        compares: vec![avail_store::Compare::ModRev(keys::workload(&name), rev)],
        success: vec![avail_store::Op::Delete {
            key: keys::workload(&name),
        }],
        failure: vec![],
    };
    let res = state.events.commit(txn, vec![deleted]).await?;
    if !res.succeeded {
        return Err(ApiErr::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("workload {name:?} changed concurrently; retry"),
        ));
    }
    state.wait_view(res.revision).await;
    state
        .logs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&name);
    Ok(Json(Deleted { deleted: name }))
}

/// Query of event listings.
#[derive(Deserialize, utoipa::IntoParams)]
pub struct EventsQuery {
    /// Only events with a sequence number above this.
    #[serde(default)]
    pub since: u64,
    /// Most events returned (default 1000).
    pub limit: Option<usize>,
    /// Return the last `limit` events after `since` instead of the first.
    #[serde(default)]
    pub tail: bool,
    /// Stream: replay, then follow live as server-sent events.
    #[serde(default)]
    pub follow: bool,
}

#[utoipa::path(get, path = "/v1/workloads/{name}/events", params(("name" = String, Path), EventsQuery),
    responses((status = 200, body = [ClusterEvent]), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
async fn workload_events(
    _: Admin,
    State(state): State<AppStateRef>,
    Path(name): Path<String>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Json<Vec<ClusterEvent>>> {
    let list = state
        .events
        .history(q.since, Some(&name), q.limit.unwrap_or(1000), q.tail)
        .await?;
    if list.is_empty() && state.workload(&name).is_none() {
        return Err(ApiErr::not_found("workload", &name));
    }
    Ok(Json(list))
}

/// Query of log listings.
#[derive(Deserialize, utoipa::IntoParams)]
pub struct LogsQuery {
    /// Last this many lines (default 100, at most the 1000 kept).
    pub tail: Option<usize>,
}

#[utoipa::path(get, path = "/v1/workloads/{name}/logs", params(("name" = String, Path), LogsQuery),
    responses((status = 200, body = [LogLine]), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
async fn workload_logs(
    _: Admin,
    State(state): State<AppStateRef>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Json<Vec<LogLine>>> {
    if state.workload(&name).is_none() {
        return Err(ApiErr::not_found("workload", &name));
    }
    let logs = state.logs.lock().unwrap_or_else(|p| p.into_inner());
    let lines: Vec<LogLine> = logs
        .get(&name)
        .map(|q| q.iter().cloned().collect())
        .unwrap_or_default();
    let tail = q.tail.unwrap_or(100);
    Ok(Json(lines[lines.len().saturating_sub(tail)..].to_vec()))
}

#[utoipa::path(get, path = "/v1/nodes", responses((status = 200, body = [Node])), security(("bearer" = [])))]
async fn list_nodes(_: Admin, State(state): State<AppStateRef>) -> Json<Vec<Node>> {
    Json(state.nodes())
}

#[utoipa::path(get, path = "/v1/nodes/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Node), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
async fn get_node(
    _: Admin,
    State(state): State<AppStateRef>,
    Path(name): Path<String>,
) -> ApiResult<Json<Node>> {
    state
        .nodes()
        .into_iter()
        .find(|n| n.name == name)
        .map(Json)
        .ok_or_else(|| ApiErr::not_found("node", &name))
}

#[utoipa::path(get, path = "/v1/cluster/levels",
    responses((status = 200, body = LevelPolicy)), security(("bearer" = [])))]
async fn get_level_policy(
    _: Admin,
    State(state): State<AppStateRef>,
) -> ApiResult<Json<LevelPolicy>> {
    Ok(Json(state.level_policy()))
}

#[utoipa::path(put, path = "/v1/cluster/levels", request_body = LevelPolicy,
    responses((status = 200, body = LevelPolicy), (status = 400, description = "a bad tag, named")),
    security(("bearer" = [])))]
async fn put_level_policy(
    _: Admin,
    State(state): State<AppStateRef>,
    body: Body,
) -> ApiResult<Json<LevelPolicy>> {
    let policy: LevelPolicy = read_json(body).await?;
    policy
        .validate()
        .map_err(|e| ApiErr(StatusCode::BAD_REQUEST, e.into()))?;
    let levels = NewEvent::new(
        EventKind::ClusterLevels,
        None,
        None,
        format!(
            "default level {}; minimums {}",
            policy.default.as_str(),
            policy
                .minimums
                .iter()
                .map(|m| format!("{}: {}", m.tag, m.level.as_str()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let txn = avail_store::Txn {
        compares: vec![],
        success: vec![avail_store::Op::Put {
            key: keys::LEVEL_POLICY.into(),
            value: serde_json::to_vec(&policy).expect("policy serialises"),
            lease: None,
        }],
        failure: vec![],
    };
    // Read back from the view (every placement decides on it): wait until it has it.
    let r = state.events.commit(txn, vec![levels]).await?;
    state.wait_view(r.revision).await;
    Ok(Json(policy))
}

/// A live level change: `PUT /v1/workloads/<name>/level`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LevelChange {
    /// The new level.
    pub level: avail_model::Level,
}

#[utoipa::path(put, path = "/v1/workloads/{name}/level", params(("name" = String, Path)), request_body = LevelChange,
    responses((status = 200, body = Workload, description = "the workload with its new level (the new protection is set up in the background: watch level_state)"),
        (status = 400, description = "a level the workload cannot have, the field named"), (status = 404)),
    security(("bearer" = [])))]
async fn set_workload_level(
    _: Admin,
    State(state): State<AppStateRef>,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<Json<Workload>> {
    let change: serde_json::Value = read_json(body).await?;
    let change: LevelChange = serde_json::from_value(change).map_err(|e| {
        let field = if e.to_string().contains("unknown field") {
            "body"
        } else {
            "level"
        };
        ApiErr::invalid(field, e.to_string())
    })?;
    let Some((w, _)) = state.workload(&name) else {
        return Err(ApiErr::not_found("workload", &name));
    };
    // The spec must hold at the new level (process: no ft; ft: memory bound).
    let mut spec = w.spec.clone();
    spec.level = change.level;
    spec.validate()
        .map_err(|e| ApiErr(StatusCode::BAD_REQUEST, e.into()))?;
    // Not below the cluster's minimum for the node it runs on.
    let policy = state.level_policy();
    if let Some(node) = &w.status.node
        && let Some((min, tag)) = state.minimum_on(&policy, node)
        && change.level.rank() < min.rank()
    {
        return Err(ApiErr::invalid(
            "level",
            format!(
                "it runs on {node}, which has {tag}: the cluster requires at least {} there",
                min.as_str()
            ),
        ));
    }
    // ft with on_secondary_loss = hold and no node for the secondary would hold every
    // reply: refused, saying why.
    if change.level == Level::Ft
        && w.spec.ft.on_secondary_loss == avail_model::SecondaryLoss::Hold
        && w.status.node.is_some()
    {
        let mut at_ft = w.clone();
        at_ft.spec.level = Level::Ft;
        if let (Decision::Unplaceable { explanation }, _) = state.decide_secondary(&at_ft, None) {
            return Err(ApiErr::invalid(
                "level",
                format!(
                    "no node for its secondary ({explanation}); with ft.on_secondary_loss = hold every reply would wait for one"
                ),
            ));
        }
    }
    // ft needs a module that can be checkpointed (known since it was created).
    if change.level == Level::Ft && w.status.plain {
        return Err(ApiErr::invalid(
            "level",
            "this module cannot run at ft: it cannot be checkpointed (shared memory or reference-typed state)",
        ));
    }
    match state.set_level(&name, change.level).await? {
        Some((w, _)) => Ok(Json(w)),
        None => Err(ApiErr::not_found("workload", &name)),
    }
}

/// A change of a node's tags: `set` adds or replaces, `remove` deletes (also a tag the
/// agent declared). Applied over the agent's own tags and kept across its rejoins.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TagChange {
    /// Tags to set.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Tag keys to remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

#[utoipa::path(patch, path = "/v1/nodes/{name}/tags", params(("name" = String, Path)), request_body = TagChange,
    responses((status = 200, body = Node), (status = 400, description = "a bad tag, named"), (status = 404)),
    security(("bearer" = [])))]
async fn patch_node_tags(
    _: Admin,
    State(state): State<AppStateRef>,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<Json<Node>> {
    let change: TagChange = read_json(body).await?;
    for (k, v) in &change.set {
        avail_model::constraint::parse_tag(&format!("{k}={v}"))
            .map_err(|e| ApiErr::invalid(&format!("set.{k}"), e.message))?;
    }
    for k in &change.remove {
        avail_model::constraint::parse_tag(&format!("{k}=x"))
            .map_err(|e| ApiErr::invalid("remove", e.message))?;
    }
    // Compare-and-swap on the record: a concurrent rejoin is not overwritten.
    for _ in 0..10 {
        let Some(kv) = state.store.get(&keys::node(&name)).await? else {
            return Err(ApiErr::not_found("node", &name));
        };
        let mut rec: NodeRecord = serde_json::from_slice(&kv.value).map_err(|e| {
            ApiErr::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?;
        for (k, v) in &change.set {
            rec.tag_overrides.insert(k.clone(), Some(v.clone()));
        }
        for k in &change.remove {
            rec.tag_overrides.insert(k.clone(), None);
        }
        rec.tags = rec.tags_in_force();
        let value = serde_json::to_vec(&rec).expect("node serialises");
        let tagged = NewEvent::new(
            EventKind::NodeTagged,
            None,
            Some(&name),
            format!("tags now {:?}", rec.tags),
        );
        if let Some(rev) = state
            .events
            .compare_and_swap(&keys::node(&name), kv.mod_rev, value, vec![tagged])
            .await?
        {
            state.wait_view(rev).await;
            return state
                .nodes()
                .into_iter()
                .find(|n| n.name == name)
                .map(Json)
                .ok_or_else(|| ApiErr::not_found("node", &name));
        }
    }
    Err(ApiErr::new(
        StatusCode::CONFLICT,
        "conflict",
        "the node record kept changing; try again",
    ))
}

#[utoipa::path(get, path = "/v1/events", params(EventsQuery),
    responses((status = 200, body = [ClusterEvent], description = "a JSON list, or with `follow=true` a text/event-stream of `event` messages whose data is one ClusterEvent")),
    security(("bearer" = [])))]
async fn events(
    _: Admin,
    State(state): State<AppStateRef>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Response> {
    let limit = q.limit.unwrap_or(1000);
    if !q.follow {
        return Ok(Json(state.events.history(q.since, None, limit, q.tail).await?).into_response());
    }
    // Subscribe before reading history so nothing falls between the two; drop repeats
    // by seq. Followers are bounded in number, queue and replay (crate::followers).
    let Some(follower) = state.events.followers.follow(state.events.subscribe()) else {
        return Err(ApiErr::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_followers",
            format!(
                "{} event followers are connected already; retry later",
                crate::followers::MAX_FOLLOWERS
            ),
        ));
    };
    // Replay what is kept after `since` up to the last event recorded before the
    // subscription, a page at a time, then follow live.
    enum Phase {
        Replay(std::vec::IntoIter<ClusterEvent>, bool),
        Live,
    }
    let upto = state.events.last_seq().await;
    let first = state
        .events
        .page(q.since, upto, crate::followers::REPLAY_PAGE)
        .await?;
    let more = first.last().is_some_and(|e| e.seq < upto);
    let s = stream::unfold(
        (
            state.clone(),
            follower,
            q.since,
            Phase::Replay(first.into_iter(), more),
        ),
        move |(state, follower, mut last, mut phase)| async move {
            loop {
                match &mut phase {
                    Phase::Replay(page, more) => {
                        if let Some(ev) = page.next() {
                            last = ev.seq;
                            return Some((to_sse(ev), (state, follower, last, phase)));
                        }
                        phase = if *more {
                            match state
                                .events
                                .page(last, upto, crate::followers::REPLAY_PAGE)
                                .await
                            {
                                Ok(p) => {
                                    let more = p.last().is_some_and(|e| e.seq < upto);
                                    Phase::Replay(p.into_iter(), more)
                                }
                                Err(e) => {
                                    let err = std::io::Error::other(format!("event history: {e}"));
                                    return Some((Err(err), (state, follower, last, Phase::Live)));
                                }
                            }
                        } else {
                            Phase::Live
                        };
                    }
                    Phase::Live => match follower.next().await {
                        FollowerNext::Event(ev) if ev.seq <= last => continue,
                        FollowerNext::Event(ev) => {
                            last = ev.seq;
                            return Some((to_sse(ev), (state, follower, last, phase)));
                        }
                        FollowerNext::Dropped => {
                            // The connection is closed; the client resumes with `since`.
                            let err = std::io::Error::other(
                                "event follower dropped: it fell behind; reconnect with since",
                            );
                            return Some((Err(err), (state, follower, last, phase)));
                        }
                        FollowerNext::Closed => return None,
                    },
                }
            }
        },
    );
    Ok(Sse::new(s)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

fn to_sse(ev: ClusterEvent) -> Result<SseEvent, std::io::Error> {
    Ok(SseEvent::default()
        .event("event")
        .id(ev.seq.to_string())
        .data(serde_json::to_string(&ev).expect("event serialises")))
}

/// Reply of an artifact upload.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ArtifactRef {
    /// Content digest, `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size_bytes: u64,
}

fn artifact_file(digest: &str) -> String {
    digest.replace(':', "-")
}

#[utoipa::path(put, path = "/v1/artifacts", request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = ArtifactRef), (status = 413, body = ApiErrorBody)), security(("bearer" = [])))]
async fn put_artifact(
    _: Admin,
    State(state): State<AppStateRef>,
    body: Body,
) -> ApiResult<Json<ArtifactRef>> {
    let bytes = read_body(body, MAX_ARTIFACT_BYTES).await?;
    let digest = format!("sha256:{:x}", Sha256::digest(&bytes));
    let dir = state.artifacts_dir();
    let path = dir.join(artifact_file(&digest));
    // A file already there is trusted only if its content still matches its name.
    let intact = match tokio::fs::read(&path).await {
        Ok(existing) => format!("sha256:{:x}", Sha256::digest(&existing)) == digest,
        Err(_) => false,
    };
    if !intact {
        let tmp = dir.join(format!(".upload-{}", crate::new_uid()));
        let io = |e: std::io::Error| {
            ApiErr::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("storing artifact: {e}"),
            )
        };
        tokio::fs::create_dir_all(&dir).await.map_err(io)?;
        tokio::fs::write(&tmp, &bytes).await.map_err(io)?;
        tokio::fs::File::open(&tmp)
            .await
            .map_err(io)?
            .sync_all()
            .await
            .map_err(io)?;
        tokio::fs::rename(&tmp, &path).await.map_err(io)?;
        // The rename is durable once the directory is synced.
        tokio::fs::File::open(&dir)
            .await
            .map_err(io)?
            .sync_all()
            .await
            .map_err(io)?;
    }
    Ok(Json(ArtifactRef {
        digest,
        size_bytes: bytes.len() as u64,
    }))
}

#[utoipa::path(get, path = "/v1/artifacts/{digest}", params(("digest" = String, Path)),
    responses((status = 200, content_type = "application/octet-stream"), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
async fn get_artifact(
    _: AdminOrAgent,
    State(state): State<AppStateRef>,
    Path(digest): Path<String>,
) -> ApiResult<Response> {
    if !is_digest(&digest) {
        return Err(ApiErr::invalid("digest", "expected sha256:<64 hex>"));
    }
    let bytes = tokio::fs::read(state.artifacts_dir().join(artifact_file(&digest)))
        .await
        .map_err(|_| ApiErr::not_found("artifact", &digest))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

#[utoipa::path(post, path = "/v1/agent/heartbeat", request_body = Heartbeat,
    responses((status = 200, body = HeartbeatReply), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
async fn heartbeat(
    AgentNode(node): AgentNode,
    State(state): State<AppStateRef>,
    body: Body,
) -> ApiResult<Json<HeartbeatReply>> {
    let hb: Heartbeat = read_json(body).await?;
    if !state
        .view
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .nodes
        .contains_key(&node)
    {
        return Err(ApiErr::not_found("node", &node));
    }
    state.metrics.heartbeats.inc();
    for f in hb.fences.iter().take(100) {
        state.metrics.fences.inc();
        state
            .events
            .emit(
                EventKind::NodeFenced,
                None,
                Some(&node),
                format!(
                    "{node} fenced itself after {} ms without the control plane, stopping {} ha workload(s): {}",
                    f.silent_ms,
                    f.stopped.len(),
                    f.stopped.iter().take(20).cloned().collect::<Vec<_>>().join(", ")
                ),
            )
            .await;
    }
    let st = state.heard(&node).await?;
    // The ha workloads a fence stopped resume on their standbys (from their last
    // checkpoint) before the agent, heard again, fetches its desired state: it must
    // not start them afresh here.
    let stopped: Vec<String> = hb
        .fences
        .iter()
        .flat_map(|f| f.stopped.iter().cloned())
        .collect();
    state.resume_on_standby(stopped, &node, "fenced").await;
    // The reports are applied apart, in order: the answer is the node's contact with
    // the control plane and must not wait for store writes.
    let reporter = state.clone();
    tokio::spawn(async move {
        reporter.reports(&node, &hb.instances, hb.logs).await;
    });
    Ok(Json(HeartbeatReply {
        state: st,
        heartbeat_interval_ms: state.config.heartbeat_interval.as_millis() as u64,
        lease_ttl_ms: state.config.down_after.as_millis() as u64,
    }))
}

/// Query of the desired-state poll.
#[derive(Deserialize, utoipa::IntoParams)]
pub struct DesiredQuery {
    /// Answer when the desired state is newer than this revision (0: at once).
    #[serde(default)]
    pub revision: u64,
    /// Longest wait, ms (at most 30000).
    #[serde(default)]
    pub wait_ms: u64,
}

#[utoipa::path(get, path = "/v1/agent/desired", params(DesiredQuery),
    responses((status = 200, body = DesiredState)), security(("bearer" = [])))]
async fn desired(
    AgentNode(node): AgentNode,
    State(state): State<AppStateRef>,
    Query(q): Query<DesiredQuery>,
) -> Json<DesiredState> {
    let rev = state
        .wait_desired(
            q.revision,
            Duration::from_millis(q.wait_ms.min(MAX_WAIT_MS)),
        )
        .await;
    Json(state.desired(&node, rev))
}

#[utoipa::path(post, path = "/v1/agent/pairs/{name}/lease", params(("name" = String, Path)), request_body = LeaseRequest,
    responses((status = 200, body = LeaseReply)), security(("bearer" = [])))]
async fn pair_lease(
    AgentNode(node): AgentNode,
    State(state): State<AppStateRef>,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<Json<LeaseReply>> {
    let req: LeaseRequest = read_json(body).await?;
    let (granted, generation) = state.take_lease(&name, &node, req.from, req.to).await?;
    tracing::info!(workload = %name, %node, from = req.from, to = req.to, granted, "pair lease");
    Ok(Json(LeaseReply {
        granted,
        generation,
    }))
}

#[utoipa::path(post, path = "/v1/agent/pairs/{name}/handover", params(("name" = String, Path)), request_body = HandoverRequest,
    responses((status = 200, body = LeaseReply)), security(("bearer" = [])))]
async fn pair_handover(
    AgentNode(node): AgentNode,
    State(state): State<AppStateRef>,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<Json<LeaseReply>> {
    let req: HandoverRequest = read_json(body).await?;
    let (granted, generation) = state.handover(&name, &node, req.from).await?;
    tracing::info!(workload = %name, %node, from = req.from, granted, "handover");
    Ok(Json(LeaseReply {
        granted,
        generation,
    }))
}

#[utoipa::path(post, path = "/v1/nodes/{name}/drain", params(("name" = String, Path)),
    responses((status = 200, body = Node, description = "the node, draining; `drain` shows the progress"), (status = 404)),
    security(("bearer" = [])))]
async fn drain_node(
    _: Admin,
    State(state): State<AppStateRef>,
    Path(name): Path<String>,
) -> ApiResult<Json<Node>> {
    // The `node.draining` event is committed with the record (none when it was
    // draining already).
    let node = state
        .start_drain(&name)
        .await?
        .ok_or_else(|| ApiErr::not_found("node", &name))?;
    Ok(Json(node))
}

#[utoipa::path(delete, path = "/v1/nodes/{name}/drain", params(("name" = String, Path)),
    responses((status = 200, body = Node, description = "the node, taking work again"), (status = 404)),
    security(("bearer" = [])))]
async fn undrain_node(
    _: Admin,
    State(state): State<AppStateRef>,
    Path(name): Path<String>,
) -> ApiResult<Json<Node>> {
    // `node.undrained` is committed with the record (none when it was not draining).
    let node = state
        .undrain(&name)
        .await?
        .ok_or_else(|| ApiErr::not_found("node", &name))?;
    Ok(Json(node))
}

#[utoipa::path(post, path = "/v1/agent/pairs/{name}/failed", params(("name" = String, Path)), request_body = SecondaryFailure,
    responses((status = 200, description = "Recorded: `{\"recorded\": true}`")), security(("bearer" = [])))]
async fn pair_secondary_failed(
    AgentNode(node): AgentNode,
    State(state): State<AppStateRef>,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<Json<serde_json::Value>> {
    let req: SecondaryFailure = read_json(body).await?;
    if req.reason.len() > 4096 {
        return Err(ApiErr::invalid("reason", "at most 4096 bytes"));
    }
    state
        .secondary_failed(&name, &node, req.generation, Some(&req.reason))
        .await;
    Ok(Json(serde_json::json!({ "recorded": true })))
}

/// The OpenAPI document, generated from the handlers and the model types.
#[derive(OpenApi)]
#[openapi(
    info(title = "avail API", description = "Control plane of avail. Errors are `{\"error\": {\"code\", \"message\", \"field\"}}`."),
    paths(livez, readyz, metrics, create_workload, list_workloads, get_workload, delete_workload, workload_events, workload_logs,
          list_nodes, get_node, events, put_artifact, get_artifact, crate::api_identity::join, crate::api_identity::renew,
          crate::api_identity::create_token, crate::api_identity::list_tokens, crate::api_identity::revoke_token,
          crate::api_identity::remove_node, heartbeat, desired, pair_lease,
          pair_secondary_failed, patch_node_tags, set_workload_level,
          pair_handover, drain_node, undrain_node, get_level_policy, put_level_policy),
    components(schemas(Deleted, ArtifactRef, HeartbeatReply, TagChange, PlanPreview, LevelChange, LevelPolicy)),
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
