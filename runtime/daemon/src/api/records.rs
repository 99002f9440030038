//! What the node holds and records: images, capacity, layers and their
//! files, the audit trail.

use super::*;

pub(super) async fn list_images(State(s): State<AppState>) -> ApiResult {
    let node = s.node.clone();
    ok(StatusCode::OK, blocking(move || node.images()).await?.map_err(ApiError::internal)?)
}

/// Most layers in one page of `GET /v1/layers`.
pub(super) const MAX_LAYERS_PAGE: u32 = 500;
/// Most entries in one page of a layer's entries.
pub(super) const MAX_ENTRIES_PAGE: u32 = 5000;

/// What the node can still give VMs: its capacity (over-commit applied),
/// what VMs reserve, and the data directory's free space beyond the
/// reserve. A remote manager places VMs from this and `GET /v1/layers`.
pub(super) async fn capacity(State(s): State<AppState>) -> ApiResult {
    let node = s.node.clone();
    let capacity = s.capacity;
    ok(
        StatusCode::OK,
        blocking(move || node.capacity(&capacity)).await?.map_err(ApiError::internal)?,
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LayerPage {
    /// `partition/layer` of the last layer of the previous page.
    after: Option<String>,
    limit: Option<u32>,
}

/// The layers new VMs may stack, by partition and name, a page at a time:
/// digest, files, bytes, and the VMs that stack each.
pub(super) async fn list_layers(
    State(s): State<AppState>,
    q: Result<Query<LayerPage>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::bad("invalid-request", e.body_text()))?;
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_LAYERS_PAGE) as usize;
    let after = match &q.after {
        Some(a) => {
            Some(a.split_once('/').map(|(p, l)| (p.to_string(), l.to_string())).ok_or_else(
                || ApiError::bad("invalid-request", format!("after {a:?}: write PARTITION/LAYER")),
            )?)
        }
        None => None,
    };
    let node = s.node.clone();
    ok(
        StatusCode::OK,
        blocking(move || node.layers(after, limit)).await?.map_err(ApiError::internal)?,
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EntryPage {
    /// Entries to skip.
    after: Option<u64>,
    limit: Option<u32>,
}

/// A layer's regular files: path, size and BLAKE3, a page at a time; what
/// a manager compares a new VM's image with.
pub(super) async fn layer_entries(
    State(s): State<AppState>,
    Path((partition, layer)): Path<(String, String)>,
    q: Result<Query<EntryPage>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::bad("invalid-request", e.body_text()))?;
    if !provd_node::valid_partition_id(&partition) {
        return Err(ApiError::bad(
            "invalid-request",
            format!("{partition:?} is not a partition id"),
        ));
    }
    let limit = q.limit.unwrap_or(1000).clamp(1, MAX_ENTRIES_PAGE) as usize;
    let after = q.after.unwrap_or(0);
    let node = s.node.clone();
    let (p, l) = (partition.clone(), layer.clone());
    let page = blocking(move || node.layer_files(&p, &l, after, limit as u32))
        .await?
        .map_err(ApiError::internal)?;
    let page = page
        .ok_or_else(|| ApiError::not_found(format!("no layer {layer} on partition {partition}")))?;
    ok(StatusCode::OK, page)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditParams {
    operation: Option<String>,
    plugin: Option<String>,
    kind: Option<String>,
    outcome: Option<String>,
    after: Option<i64>,
    limit: Option<u32>,
}

pub(super) async fn audit(
    State(s): State<AppState>,
    q: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::bad("invalid-request", e.body_text()))?;
    let query = AuditQuery {
        operation: q.operation,
        plugin: q.plugin,
        kind: q.kind,
        outcome: q.outcome,
        after: q.after,
        limit: q.limit.unwrap_or(0),
    };
    let node = s.node.clone();
    ok(StatusCode::OK, blocking(move || node.audit(&query)).await?.map_err(ApiError::internal)?)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ImageQuery {
    reference: String,
}

/// Deletes an image no VM or running operation uses, with the object files
/// no other image needs.
pub(super) async fn delete_image(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    q: Result<Query<ImageQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| {
        ApiError::bad(
            "invalid-request",
            format!("{} (name the image: ?reference=...)", e.body_text()),
        )
    })?;
    if q.reference.is_empty() || q.reference.len() > 4096 {
        return Err(ApiError::bad("invalid-request", "reference: 1 to 4096 bytes"));
    }
    detached(async move {
        let node = s.node.clone();
        let reference = q.reference.clone();
        // A failed blocking task is audited like any other end.
        let result = blocking(move || node.delete_image(&reference)).await;
        let mut row = NewAudit {
            actor: peer.name.clone(),
            kind: "image".into(),
            function: Some("delete".into()),
            args: Some(q.reference.chars().take(256).collect()),
            count: 1,
            ..NewAudit::default()
        };
        let answer = match result {
            Err(err) => {
                row.outcome = "failed".into();
                row.detail = Some(format!("{}: {}", err.code, err.message));
                Err(err)
            }
            Ok(Ok(deleted)) => {
                row.outcome = "deleted".into();
                row.detail =
                    Some(format!("freed {} objects, {} bytes", deleted.objects, deleted.bytes));
                tracing::info!(actor = %peer.name, reference = %deleted.reference, objects = deleted.objects, bytes = deleted.bytes, "image deleted");
                ok(StatusCode::OK, deleted)
            }
            Ok(Err(e)) => {
                let (err, outcome) = match &e {
                    provd_node::DeleteImageError::NotFound(_) => {
                        (ApiError::not_found(e.to_string()), "refused")
                    }
                    provd_node::DeleteImageError::InUse(_) => {
                        (ApiError::new(StatusCode::CONFLICT, "in-use", e.to_string()), "refused")
                    }
                    provd_node::DeleteImageError::Store(_) => (ApiError::internal(&e), "failed"),
                };
                row.outcome = outcome.into();
                row.detail = Some(format!("{}: {}", err.code, err.message));
                Err(err)
            }
        };
        audit_one(&s.node, row).await;
        answer
    })
    .await
}

/// `POST /v1/gc`: one image collection now.
pub(super) async fn collect(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult {
    let body = body.map_err(|e| unread_body(&e, "a request body", s.limits.max_json_bytes))?;
    let req: wire::GcRequest =
        optional_json(&body).map_err(|e| ApiError::bad("invalid-json", e.to_string()))?;
    let policy = provd_node::GcPolicy {
        max_age_secs: req.max_age_secs.or(s.gc.max_age_secs),
        max_bytes: req.max_bytes.or(s.gc.max_bytes),
    };
    // One collection at a time, and none waiting: a request while one
    // runs (the schedule's included) is refused rather than queued.
    let Ok(one) = s.gc_lock.clone().try_lock_owned() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "gc-running",
            "an image collection is already running; ask again when it has ended",
        ));
    };
    let report = detached(async move {
        match run_collection(&s, &peer.name, "request", policy, one).await {
            Ok(report) => ok(StatusCode::OK, wire::GcAnswer { gc: report }),
            Err(e) => Err(ApiError::internal(e)),
        }
    });
    report.await
}

/// Runs one image collection on a blocking thread, one at a time, and
/// records it in the metrics, the log and the audit trail.
pub async fn collect_images(
    s: &AppState,
    actor: &str,
    trigger: &str,
    policy: provd_node::GcPolicy,
) -> Result<wire::GcReport, String> {
    let one = s.gc_lock.clone().lock_owned().await;
    run_collection(s, actor, trigger, policy, one).await
}

/// One image collection while `_one` holds the collections' lock.
async fn run_collection(
    s: &AppState,
    actor: &str,
    trigger: &str,
    policy: provd_node::GcPolicy,
    _one: tokio::sync::OwnedMutexGuard<()>,
) -> Result<wire::GcReport, String> {
    let node = s.node.clone();
    let result = blocking(move || node.collect_images(policy))
        .await
        .map_err(|e| e.message)
        .and_then(|r| r.map_err(|e| e.to_string()));
    s.metrics.collected(trigger, result.as_ref().ok());
    let mut row = NewAudit {
        actor: actor.to_string(),
        kind: "image-gc".into(),
        function: Some(trigger.to_string()),
        args: Some(format!(
            "max-age-secs={} max-bytes={}",
            policy.max_age_secs.map_or("none".into(), |v| v.to_string()),
            policy.max_bytes.map_or("none".into(), |v| v.to_string())
        )),
        count: 1,
        ..NewAudit::default()
    };
    match &result {
        Ok(r) => {
            let names: Vec<&str> = r.images.iter().map(|i| i.reference.as_str()).collect();
            let mut detail = format!(
                "removed {} images, {} objects, {} bytes; {} in use kept",
                r.images.len(),
                r.objects,
                r.bytes,
                r.in_use
            );
            if !names.is_empty() {
                detail.push_str(": ");
                detail.push_str(&names.join(" "));
            }
            row.outcome = "succeeded".into();
            row.detail = Some(detail.chars().take(2000).collect());
            tracing::info!(
                actor,
                trigger,
                images = r.images.len(),
                objects = r.objects,
                bytes = r.bytes,
                in_use = r.in_use,
                "image collection"
            );
        }
        Err(e) => {
            row.outcome = "failed".into();
            row.detail = Some(e.clone());
            tracing::warn!(actor, trigger, error = %e, "image collection failed");
        }
    }
    audit_one(&s.node, row).await;
    result
}
