//! Bundles and plugin versions: upload, list, activate, roll back.

use super::*;

pub(super) fn refused(e: &BundleRefused) -> ApiError {
    let (kind, code) = e.kind();
    let status = match kind {
        Refusal::Forbidden => StatusCode::FORBIDDEN,
        Refusal::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Refusal::Conflict => StatusCode::CONFLICT,
        Refusal::Invalid => StatusCode::BAD_REQUEST,
        Refusal::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
        Refusal::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, code, e.to_string())
}

pub(super) async fn upload_bundle(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult {
    let body = body.map_err(|e| unread_body(&e, "a bundle", s.limits.max_bundle_bytes))?;
    detached(accept_upload(s, peer, body)).await
}

pub(super) async fn accept_upload(s: AppState, peer: Peer, body: Bytes) -> ApiResult {
    let digest = format!("blake3:{}", blake3::hash(&body).to_hex());
    let result = s.node.accept_bundle(&body, provd_node::operations::unix_now()).await;
    let mut row = NewAudit {
        actor: peer.name.clone(),
        kind: "bundle".into(),
        args: Some(format!("bytes={} file-digest={digest}", body.len())),
        count: 1,
        ..NewAudit::default()
    };
    match result {
        Ok(a) => {
            row.plugin = Some(a.name.clone());
            row.version = Some(a.version.clone());
            row.outcome = if a.new { "accepted" } else { "already-accepted" }.into();
            s.metrics.plugin_known(&a.name);
            row.detail = Some(format!("signer {} component {}", a.signer, a.digest));
            audit_one(&s.node, row).await;
            Metrics::outcome(
                &s.metrics.bundles,
                if a.new { "accepted" } else { "already-accepted" },
            );
            let status = if a.new { StatusCode::CREATED } else { StatusCode::OK };
            ok(
                status,
                wire::BundleAnswer {
                    bundle: wire::Accepted {
                        name: a.name,
                        version: a.version,
                        digest: a.digest,
                        signer: a.signer,
                        new: a.new,
                    },
                },
            )
        }
        Err(e) => {
            let err = refused(&e);
            row.outcome = "refused".into();
            row.detail = Some(format!("{}: {}", err.code, err.message));
            audit_one(&s.node, row).await;
            Metrics::outcome(&s.metrics.bundles, "refused");
            tracing::warn!(actor = %peer.name, code = err.code, message = %err.message, "bundle refused");
            Err(err)
        }
    }
}

pub(super) async fn list_bundles(State(s): State<AppState>) -> ApiResult {
    let node = s.node.clone();
    ok(StatusCode::OK, blocking(move || node.bundles()).await?.map_err(ApiError::internal)?)
}

pub(super) async fn set_active(
    s: &AppState,
    peer: &Peer,
    name: &str,
    version: String,
) -> ApiResult {
    let node = s.node.clone();
    let (n, v) = (name.to_string(), version.clone());
    let result = blocking(move || node.activate(&n, &v)).await?;
    let mut row = NewAudit {
        actor: peer.name.clone(),
        kind: "plugin".into(),
        plugin: Some(name.to_string()),
        version: Some(version.clone()),
        function: Some("activate".into()),
        count: 1,
        ..NewAudit::default()
    };
    match result {
        Ok(previous) => {
            row.outcome = "activated".into();
            row.detail = Some(format!("active version {previous} -> {version}"));
            audit_one(&s.node, row).await;
            tracing::warn!(actor = %peer.name, plugin = %name, from = %previous, to = %version, "operator changed the active plugin version");
            ok(
                StatusCode::OK,
                wire::Activated { plugin: name.to_string(), active: version, previous },
            )
        }
        Err(e @ ActivateError::NotAccepted(_)) => {
            row.outcome = "refused".into();
            row.detail = Some(e.to_string());
            audit_one(&s.node, row).await;
            Err(ApiError::not_found(e.to_string()))
        }
        Err(e) => Err(ApiError::internal(e)),
    }
}

pub(super) async fn activate(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    Path(name): Path<String>,
    body: Result<axum::Json<wire::ActivateRequest>, JsonRejection>,
) -> ApiResult {
    let axum::Json(body) = body?;
    detached(async move { set_active(&s, &peer, &name, body.version).await }).await
}

pub(super) async fn rollback(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    Path(name): Path<String>,
) -> ApiResult {
    detached(roll_back_plugin(s, peer, name)).await
}

pub(super) async fn roll_back_plugin(s: AppState, peer: Peer, name: String) -> ApiResult {
    let node = s.node.clone();
    let n = name.clone();
    match blocking(move || node.previous_version(&n)).await? {
        Ok(previous) => set_active(&s, &peer, &name, previous).await,
        Err(e @ ActivateError::NoSuchPlugin(_)) => Err(ApiError::not_found(e.to_string())),
        Err(e @ ActivateError::NoPreviousVersion(_)) => {
            Err(ApiError::new(StatusCode::CONFLICT, "no-previous-version", e.to_string()))
        }
        Err(e) => Err(ApiError::internal(e)),
    }
}
