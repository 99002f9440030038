//! Bundles and plugin versions: upload, list, activate, roll back.

use super::*;

pub(super) fn refused(e: &BundleRefused) -> ApiError {
    use provd_bundle::BundleError as B;
    use provd_engine::LoadError as L;
    let text = e.to_string();
    let (status, code) = match e {
        BundleRefused::Invalid(b) => match b {
            B::NoTrustedSignature { .. } => (StatusCode::FORBIDDEN, "untrusted-signer"),
            B::BadSignature { .. } => (StatusCode::FORBIDDEN, "bad-signature"),
            B::DigestMismatch { .. } | B::SizeMismatch { .. } => {
                (StatusCode::FORBIDDEN, "tampered")
            }
            B::Expired { .. } | B::CreatedInFuture { .. } => {
                (StatusCode::FORBIDDEN, "outside-validity")
            }
            B::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too-large"),
            _ => (StatusCode::BAD_REQUEST, "invalid-bundle"),
        },
        BundleRefused::Load(l) => match l {
            L::Policy(_) => (StatusCode::FORBIDDEN, "over-policy"),
            L::UndeclaredImports(_) => (StatusCode::FORBIDDEN, "undeclared-imports"),
            L::Unavailable(_) => (StatusCode::FORBIDDEN, "unavailable-capability"),
            L::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too-large"),
            L::Cache { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            _ => (StatusCode::UNPROCESSABLE_ENTITY, "invalid-component"),
        },
        BundleRefused::Version(v) => match v {
            AcceptError::Downgrade { .. } => (StatusCode::CONFLICT, "version-downgrade"),
            AcceptError::Conflict { .. } => (StatusCode::CONFLICT, "version-conflict"),
            AcceptError::Expired { .. } => (StatusCode::FORBIDDEN, "outside-validity"),
            AcceptError::BadVersion(_) => (StatusCode::BAD_REQUEST, "invalid-bundle"),
            AcceptError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        },
        BundleRefused::Untrusted { .. } => (StatusCode::FORBIDDEN, "untrusted-signer"),
        BundleRefused::Expired { .. } => (StatusCode::FORBIDDEN, "outside-validity"),
        BundleRefused::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    ApiError::new(status, code, text)
}

pub(super) async fn upload_bundle(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                format!("a bundle may be at most {} bytes", s.limits.max_bundle_bytes),
            )
        } else {
            ApiError::bad("invalid-body", e.body_text())
        }
    })?;
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
            row.detail = Some(format!("signer {} component {}", a.signer, a.digest));
            audit_one(&s.store, row).await;
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
            audit_one(&s.store, row).await;
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
    let store = s.store.clone();
    let (n, v) = (name.to_string(), version.clone());
    let result = blocking(move || store.activate_plugin(&n, &v)).await?;
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
            audit_one(&s.store, row).await;
            tracing::warn!(actor = %peer.name, plugin = %name, from = %previous, to = %version, "operator changed the active plugin version");
            ok(
                StatusCode::OK,
                wire::Activated { plugin: name.to_string(), active: version, previous },
            )
        }
        Err(AcceptError::Store(provd_store::StoreError::NotFound(what))) => {
            row.outcome = "refused".into();
            row.detail = Some(format!("{what} not accepted on this node"));
            audit_one(&s.store, row).await;
            Err(ApiError::not_found(format!("{what} has not been accepted on this node")))
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
    let store = s.store.clone();
    let n = name.clone();
    let previous =
        blocking(move || store.previous_version(&n)).await?.map_err(ApiError::internal)?;
    let Some(previous) = previous else {
        let store = s.store.clone();
        let known = blocking(move || store.bundles())
            .await?
            .map_err(ApiError::internal)?
            .iter()
            .any(|b| b.name == name);
        if !known {
            return Err(ApiError::not_found(format!("no accepted plugin {name} on this node")));
        }
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no-previous-version",
            format!("plugin {name} has no accepted version older than its active one"),
        ));
    };
    set_active(&s, &peer, &name, previous).await
}
