//! Handlers of node identity: join, renew, join tokens, node removal. They parse and
//! call [`crate::join`]; the rules live in [`crate::identity`] and
//! [`crate::join_tokens`].

use avail_model::ApiErrorBody;
use avail_model::agent::{JoinRequest, JoinResponse, RenewRequest, RenewResponse};
use avail_model::token::{JoinTokenCreated, JoinTokenInfo, JoinTokenRequest};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};

use crate::api::{Admin, AgentNode, ApiErr, ApiResult, AppStateRef, read_json};
use crate::identity::JoinRefusal;
use crate::join::JoinError;
use avail_model::api::Deleted;

impl From<JoinError> for ApiErr {
    fn from(e: JoinError) -> ApiErr {
        let msg = e.to_string();
        match e {
            JoinError::Invalid(v) => ApiErr(StatusCode::BAD_REQUEST, v.into()),
            JoinError::Refused(JoinRefusal::NameHeld(_)) => {
                ApiErr::new(StatusCode::CONFLICT, "conflict", msg)
            }
            JoinError::Refused(_) | JoinError::Token(_) => {
                ApiErr::new(StatusCode::UNAUTHORIZED, "unauthorized", msg)
            }
            JoinError::NotFound(_) => ApiErr::new(StatusCode::NOT_FOUND, "not_found", msg),
            JoinError::Busy(_) => ApiErr::new(StatusCode::CONFLICT, "conflict", msg),
            JoinError::Cert(_) => ApiErr::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg),
            JoinError::State(s) => s.into(),
        }
    }
}

/// The bearer token of a request, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

#[utoipa::path(post, path = "/v1/agent/join", request_body = JoinRequest,
    responses((status = 200, body = JoinResponse), (status = 400, body = ApiErrorBody),
              (status = 401, body = ApiErrorBody, description = "no valid join token, or a re-join proof that does not verify"),
              (status = 409, body = ApiErrorBody, description = "the name is held by another key")),
    security(("bearer" = [])))]
pub(crate) async fn join(
    State(state): State<AppStateRef>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<JoinResponse>> {
    let req: JoinRequest = read_json(body).await?;
    Ok(Json(state.join(req, bearer(&headers)).await?))
}

#[utoipa::path(post, path = "/v1/agent/renew", request_body = RenewRequest,
    responses((status = 200, body = RenewResponse), (status = 400, body = ApiErrorBody), (status = 401, body = ApiErrorBody)))]
pub(crate) async fn renew(
    AgentNode(node): AgentNode,
    State(state): State<AppStateRef>,
    body: Body,
) -> ApiResult<Json<RenewResponse>> {
    let req: RenewRequest = read_json(body).await?;
    Ok(Json(state.renew(&node, &req.public_key).await?))
}

#[utoipa::path(post, path = "/v1/tokens", request_body = JoinTokenRequest,
    responses((status = 201, body = JoinTokenCreated, description = "the only answer that shows the secret"),
              (status = 400, body = ApiErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn create_token(
    _: Admin,
    State(state): State<AppStateRef>,
    body: Body,
) -> ApiResult<(StatusCode, Json<JoinTokenCreated>)> {
    let req: JoinTokenRequest = read_json(body).await?;
    Ok((
        StatusCode::CREATED,
        Json(state.create_join_token(&req).await?),
    ))
}

#[utoipa::path(get, path = "/v1/tokens",
    responses((status = 200, body = [JoinTokenInfo])), security(("bearer" = [])))]
pub(crate) async fn list_tokens(
    _: Admin,
    State(state): State<AppStateRef>,
) -> ApiResult<Json<Vec<JoinTokenInfo>>> {
    Ok(Json(state.join_tokens().await?))
}

#[utoipa::path(delete, path = "/v1/tokens/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Deleted), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
pub(crate) async fn revoke_token(
    _: Admin,
    State(state): State<AppStateRef>,
    Path(id): Path<String>,
) -> ApiResult<Json<Deleted>> {
    state.revoke_join_token(&id).await?;
    Ok(Json(Deleted { deleted: id }))
}

#[utoipa::path(delete, path = "/v1/nodes/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Deleted), (status = 404, body = ApiErrorBody),
              (status = 409, body = ApiErrorBody, description = "the node still holds workloads")),
    security(("bearer" = [])))]
pub(crate) async fn remove_node(
    _: Admin,
    State(state): State<AppStateRef>,
    Path(name): Path<String>,
) -> ApiResult<Json<Deleted>> {
    state.remove_node(&name).await?;
    Ok(Json(Deleted { deleted: name }))
}
