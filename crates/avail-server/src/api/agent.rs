//! The agents' side of the API: heartbeats, desired state, pair leases, handovers.

use super::*;

#[utoipa::path(post, path = "/v1/agent/heartbeat", request_body = Heartbeat,
    responses((status = 200, body = HeartbeatReply), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
pub(super) async fn heartbeat(
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
    // Heard first: a heartbeat this server cannot vouch for (a follower without the
    // leader) is refused before anything of it is recorded, so the agent sends its
    // fences again, once, to the server that takes it.
    let (st, judged) = state.heard(&node).await?;
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
        servers: state.server_apis(),
        judged,
        suspect_ms: state.config.suspect_after.as_millis() as u64,
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
pub(super) async fn desired(
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
pub(super) async fn pair_lease(
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
pub(super) async fn pair_handover(
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

#[utoipa::path(post, path = "/v1/agent/pairs/{name}/failed", params(("name" = String, Path)), request_body = SecondaryFailure,
    responses((status = 200, description = "Recorded: `{\"recorded\": true}`")), security(("bearer" = [])))]
pub(super) async fn pair_secondary_failed(
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
