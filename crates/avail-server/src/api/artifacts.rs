//! Artifacts: content-addressed uploads and downloads.

use super::*;

pub(crate) fn artifact_file(digest: &str) -> String {
    digest.replace(':', "-")
}

#[utoipa::path(put, path = "/v1/artifacts", request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = ArtifactRef), (status = 413, body = ApiErrorBody)), security(("bearer" = [])))]
pub(super) async fn put_artifact(
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
pub(super) async fn get_artifact(
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
