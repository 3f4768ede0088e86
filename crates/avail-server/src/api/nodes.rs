//! Node handlers: read, tags, drain.

use super::*;

#[utoipa::path(get, path = "/v1/nodes", responses((status = 200, body = [Node])), security(("bearer" = [])))]
pub(super) async fn list_nodes(_: Admin, State(state): State<AppStateRef>) -> Json<Vec<Node>> {
    Json(state.nodes())
}

#[utoipa::path(get, path = "/v1/nodes/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Node), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
pub(super) async fn get_node(
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

#[utoipa::path(patch, path = "/v1/nodes/{name}/tags", params(("name" = String, Path)), request_body = TagChange,
    responses((status = 200, body = Node), (status = 400, description = "a bad tag, named"), (status = 404)),
    security(("bearer" = [])))]
pub(super) async fn patch_node_tags(
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
            .compare_and_swap_also(
                &keys::node(&name),
                kv.mod_rev,
                value,
                vec![keys::rules_changed()],
                vec![tagged],
            )
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

#[utoipa::path(post, path = "/v1/nodes/{name}/drain", params(("name" = String, Path)),
    responses((status = 200, body = Node, description = "the node, draining; `drain` shows the progress"), (status = 404)),
    security(("bearer" = [])))]
pub(super) async fn drain_node(
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
pub(super) async fn undrain_node(
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
