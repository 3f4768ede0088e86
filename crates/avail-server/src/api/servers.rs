//! What one server asks of another: a follower relays the heartbeats it receives to
//! the leader ([`crate::heard_relay`]). Callers are servers of this cluster, proven by
//! a client certificate naming `<id>.server.avail` (issued by the cluster CA to
//! servers only; a node's certificate names `.node.avail`).

use super::*;
use avail_model::api::{HeardBatch, HeardReply};

/// Proof that a call comes from a server of this cluster (its certificate).
pub(crate) struct ServerPeer;

impl FromRequestParts<AppStateRef> for ServerPeer {
    type Rejection = ApiErr;
    async fn from_request_parts(parts: &mut Parts, state: &AppStateRef) -> Result<Self, ApiErr> {
        let unauthorized = |m: &str| {
            state.metrics.auth_failures.inc();
            ApiErr::new(StatusCode::UNAUTHORIZED, "unauthorized", m)
        };
        let Some(peer) = parts.extensions.get::<avail_tls::serve::PeerCert>() else {
            return Err(unauthorized(
                "server calls need a server's certificate (TLS client authentication)",
            ));
        };
        let id = parts
            .headers
            .get(crate::heard_relay::SERVER_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|id| {
                (1..=64).contains(&id.len())
                    && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        match id {
            Some(id) if peer.names_server(id) => Ok(ServerPeer),
            _ => Err(unauthorized(
                "this certificate is not a server's of this cluster",
            )),
        }
    }
}

/// The leader takes heartbeats relayed by a follower: each node is heard as if it
/// had spoken here. A server that does not lead says so (503, try another server).
#[utoipa::path(post, path = "/v1/internal/heard", request_body = HeardBatch,
    responses((status = 200, body = HeardReply), (status = 503, body = ApiErrorBody)))]
pub(super) async fn heard(
    _from: ServerPeer,
    State(state): State<AppStateRef>,
    body: Body,
) -> ApiResult<Json<HeardReply>> {
    let batch: HeardBatch = read_json(body).await?;
    if batch.nodes.len() > crate::heard_relay::MAX_BATCH {
        return Err(ApiErr::invalid(
            "nodes",
            format!("at most {} nodes", crate::heard_relay::MAX_BATCH),
        ));
    }
    if !state.is_leader() {
        return Err(StateError::TryAnotherServer("this server does not lead".into()).into());
    }
    let known: Vec<bool> = {
        let v = state.view.read().unwrap_or_else(|p| p.into_inner());
        batch
            .nodes
            .iter()
            .map(|n| v.nodes.contains_key(n))
            .collect()
    };
    let asks = batch.nodes.iter().zip(known).map(|(node, known)| {
        let state = state.clone();
        async move {
            if !known {
                return Ok(None);
            }
            state.metrics.heartbeats.inc();
            state.heard_here(node).await.map(Some)
        }
    });
    let states = futures_util::future::join_all(asks)
        .await
        .into_iter()
        .collect::<Result<Vec<_>, StateError>>()?;
    Ok(Json(HeardReply { states }))
}
