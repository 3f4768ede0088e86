//! Cluster-wide settings and state: the level policy, the control plane.

use super::*;

#[utoipa::path(get, path = "/v1/cluster/levels",
    responses((status = 200, body = LevelPolicy)), security(("bearer" = [])))]
pub(super) async fn get_level_policy(
    _: Admin,
    State(state): State<AppStateRef>,
) -> ApiResult<Json<LevelPolicy>> {
    Ok(Json(state.level_policy()))
}

#[utoipa::path(put, path = "/v1/cluster/levels", request_body = LevelPolicy,
    responses((status = 200, body = LevelPolicy), (status = 400, description = "a bad tag, named")),
    security(("bearer" = [])))]
pub(super) async fn put_level_policy(
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
        success: vec![
            avail_store::Op::Put {
                key: keys::LEVEL_POLICY.into(),
                value: serde_json::to_vec(&policy).expect("policy serialises"),
                lease: None,
            },
            keys::rules_changed(),
        ],
        failure: vec![],
    };
    // Read back from the view (every placement decides on it): wait until it has it.
    let r = state.events.commit(txn, vec![levels]).await?;
    state.wait_view(r.revision).await;
    Ok(Json(policy))
}

#[utoipa::path(get, path = "/v1/cluster/control",
    responses((status = 200, body = ControlPlane)), security(("bearer" = [])))]
pub(super) async fn control_plane(
    _: Admin,
    State(state): State<AppStateRef>,
) -> ApiResult<Json<ControlPlane>> {
    let Some(l) = state.leadership.get() else {
        return Err(ApiErr::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this server takes no part in a leadership",
        ));
    };
    let servers = state
        .view
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .servers
        .values()
        .cloned()
        .collect();
    Ok(Json(l.control_plane(servers).await?))
}
