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
