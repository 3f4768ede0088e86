//! Workload handlers: create (with its dry run), read, delete, events, logs, level changes.

use super::*;
use crate::admission;
use crate::creates::Created;
use crate::module_checks::CheckError;

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
pub(super) async fn create_workload(
    _: Admin,
    State(state): State<AppStateRef>,
    Query(q): Query<CreateQuery>,
    body: Body,
) -> ApiResult<Response> {
    let bytes = read_body(body, MAX_JSON_BYTES).await?;
    let text = std::str::from_utf8(&bytes).map_err(|_| ApiErr::invalid("body", "not UTF-8"))?;
    let mut spec =
        WorkloadSpec::parse(text).map_err(|e| ApiErr(StatusCode::BAD_REQUEST, e.into()))?;
    // Admission of the spec: the default level when it names none; a wasm module
    // checked (once per digest), and whether it runs without checkpoints.
    let policy = state.level_policy();
    spec.level = admission::initial_level(&spec, WorkloadSpec::names_level(text), &policy);
    spec.validate()
        .map_err(|e| ApiErr(StatusCode::BAD_REQUEST, e.into()))?;
    let mut plain = false;
    if spec.driver == DriverKind::Wasm {
        let checked = state
            .module_check(&spec.artifact)
            .await
            .map_err(|e| match e {
                CheckError::NotUploaded(_) => ApiErr::invalid("artifact", e.to_string()),
                CheckError::Task(m) => {
                    ApiErr::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m)
                }
            })?;
        checked.valid.map_err(|m| ApiErr::invalid("artifact", m))?;
        plain = admission::runs_plain(spec.level, &checked.rewrite)
            .map_err(|m| ApiErr::invalid("artifact", m))?;
    }
    state
        .vm_files_uploaded(&spec)
        .await
        .map_err(|(field, m)| ApiErr::invalid(field, m))?;
    let name = spec.name.clone();
    let mut w = Workload {
        uid: crate::new_uid(),
        spec,
        status: WorkloadStatus {
            updated_ms: now_ms(),
            plain,
            ..WorkloadStatus::default()
        },
        created_ms: now_ms(),
    };
    if q.dry_run {
        if state.workload(&name).is_some() {
            return Err(exists(&name));
        }
        return Ok(Json(preview(&state, &w)).into_response());
    }
    // Planned and written with the creates that arrive meanwhile, in one transaction.
    let (written, displaced) = match state.create(w).await? {
        Created::Written {
            workload,
            displaced,
        } => (*workload, displaced),
        Created::Exists => return Err(exists(&name)),
    };
    w = written;
    if let Some(node) = &w.status.node {
        state.release_displaced(&displaced, node).await;
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

/// The answer to a create whose name is taken.
fn exists(name: &str) -> ApiErr {
    ApiErr::new(
        StatusCode::CONFLICT,
        "conflict",
        format!("workload {name:?} already exists"),
    )
}

/// Where `w` would go now (a create's dry run); nothing is written.
fn preview(state: &AppState, w: &Workload) -> PlanPreview {
    let workload = w.spec.name.clone();
    match state.preview(w) {
        Decision::Place {
            node, secondary, ..
        } => PlanPreview {
            workload,
            placeable: true,
            node: Some(node),
            secondary,
            explanation: None,
        },
        Decision::Unplaceable { explanation } => PlanPreview {
            workload,
            placeable: false,
            node: None,
            secondary: None,
            explanation: Some(explanation),
        },
    }
}

#[utoipa::path(get, path = "/v1/workloads", responses((status = 200, body = [Workload])), security(("bearer" = [])))]
pub(super) async fn list_workloads(
    _: Admin,
    State(state): State<AppStateRef>,
) -> Json<Vec<Workload>> {
    let v = state.view.read().unwrap_or_else(|p| p.into_inner());
    Json(v.workloads.values().map(|(w, _)| w.clone()).collect())
}

#[utoipa::path(get, path = "/v1/workloads/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Workload), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
pub(super) async fn get_workload(
    _: Admin,
    State(state): State<AppStateRef>,
    Path(name): Path<String>,
) -> ApiResult<Json<Workload>> {
    state
        .workload(&name)
        .map(|(w, _)| Json(w))
        .ok_or_else(|| ApiErr::not_found("workload", &name))
}

#[utoipa::path(delete, path = "/v1/workloads/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Deleted), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
pub(super) async fn delete_workload(
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
pub(super) async fn workload_events(
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
pub(super) async fn workload_logs(
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

#[utoipa::path(put, path = "/v1/workloads/{name}/level", params(("name" = String, Path)), request_body = LevelChange,
    responses((status = 200, body = Workload, description = "the workload with its new level (the new protection is set up in the background: watch level_state)"),
        (status = 400, description = "a level the workload cannot have, the field named"), (status = 404)),
    security(("bearer" = [])))]
pub(super) async fn set_workload_level(
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
