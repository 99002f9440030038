//! The HTTP API, version 1. Every error is JSON:
//! `{"error": {"code": "<stable-code>", "message": "<what was wrong>"}}`.
//! `docs/api.md` is the reference.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use provd_node::{
    ActivateError, AuditQuery, BundleRefused, NewAudit, Node, OpState, OperationError, Refusal,
    queries,
};
use provd_wire as wire;
use serde::Deserialize;
use serde_json::{Value, json};

mod bundles;
mod operations;
mod records;
mod vms;

use bundles::*;
use operations::*;
use records::*;
use vms::*;

pub use operations::parse_operation_body;
pub use records::collect_images;

use crate::access::Role;
use crate::config::HttpLimits;
use crate::metrics::Metrics;
use provd_node::operations::{Operations, StartError, StartRequest};

/// Who is calling: the manager certificate's common name, or `local` on the
/// admin socket, and the role `[access]` gives it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub name: String,
    pub role: Option<Role>,
}

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    pub node: Arc<Node>,
    pub ops: Arc<Operations>,
    pub metrics: Arc<Metrics>,
    pub limits: HttpLimits,
    /// What the node offers VMs (`GET /v1/capacity`).
    pub capacity: provd_node::policy::NodeCapacity,
    /// `[metrics] enabled`.
    pub metrics_on: bool,
    /// `[images]`: what a collection removes when its request does not
    /// say.
    pub gc: provd_node::GcPolicy,
    /// One image collection at a time.
    pub gc_lock: Arc<tokio::sync::Mutex<()>>,
}

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }
    fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }
    fn internal(message: impl std::fmt::Display) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message.to_string())
    }
    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not-found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = wire::ErrorBody {
            error: wire::ErrorDetail { code: self.code.to_string(), message: self.message },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        match r {
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "send the body as application/json",
            ),
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too-large", e.body_text())
            }
            other => ApiError::bad("invalid-json", other.body_text()),
        }
    }
}

type ApiResult = Result<Response, ApiError>;

/// A raw body that could not be read: `413 too-large` naming `what`'s
/// limit, or `400 invalid-body`.
fn unread_body(e: &axum::extract::rejection::BytesRejection, what: &str, limit: u64) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("{what} may be at most {limit} bytes"),
        )
    } else {
        ApiError::bad("invalid-body", e.body_text())
    }
}

/// A JSON body that may be left out: an empty or blank body is `T`'s
/// default.
fn optional_json<T: serde::de::DeserializeOwned + Default>(
    body: &[u8],
) -> Result<T, serde_json::Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        serde_json::from_slice(body)
    }
}

/// An answer: only the API's own types (`provd_wire::Body`) reach the wire.
fn ok(status: StatusCode, body: impl wire::Body) -> ApiResult {
    Ok((status, axum::Json(body)).into_response())
}

fn blocking_error(e: tokio::task::JoinError) -> ApiError {
    ApiError::internal(format!("a worker task failed: {e}"))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    provd_node::spawn_blocking(f).await.map_err(blocking_error)
}

/// Runs a handler's effects on a task of their own: a client that
/// disconnects mid-request drops only the wait for the answer, never an
/// action half done or its audit row.
async fn detached(f: impl std::future::Future<Output = ApiResult> + Send + 'static) -> ApiResult {
    tokio::spawn(f).await.map_err(blocking_error)?
}

/// Every route of the API by method and template: the label values of
/// `provd_http_request_duration_seconds` (`metrics.rs`).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("POST", "/v1/bundles"),
    ("GET", "/v1/bundles"),
    ("POST", "/v1/plugins/{name}/activate"),
    ("POST", "/v1/plugins/{name}/rollback"),
    ("POST", "/v1/operations"),
    ("GET", "/v1/operations"),
    ("GET", "/v1/operations/{id}"),
    ("GET", "/v1/operations/{id}/events"),
    ("POST", "/v1/operations/{id}/cancel"),
    ("GET", "/v1/vms"),
    ("GET", "/v1/vms/{name}"),
    ("DELETE", "/v1/vms/{name}"),
    ("POST", "/v1/vms/{name}/start"),
    ("POST", "/v1/vms/{name}/stop"),
    ("GET", "/v1/images"),
    ("DELETE", "/v1/images"),
    ("POST", "/v1/gc"),
    ("GET", "/v1/capacity"),
    ("GET", "/v1/layers"),
    ("GET", "/v1/layers/{partition}/{layer}/entries"),
    ("GET", "/v1/audit"),
    ("POST", "/v1/repack"),
];

/// The router of API version 1.
pub fn router(state: AppState) -> Router {
    let json_limit = usize::try_from(state.limits.max_json_bytes).unwrap_or(usize::MAX);
    let bundle_limit = usize::try_from(state.limits.max_bundle_bytes).unwrap_or(usize::MAX);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/bundles", post(upload_bundle).layer(DefaultBodyLimit::max(bundle_limit)))
        .route("/v1/bundles", get(list_bundles))
        .route("/v1/plugins/{name}/activate", post(activate))
        .route("/v1/plugins/{name}/rollback", post(rollback))
        .route("/v1/operations", post(start_operation).get(list_operations))
        .route("/v1/operations/{id}", get(get_operation))
        .route("/v1/operations/{id}/events", get(operation_events))
        .route("/v1/operations/{id}/cancel", post(cancel_operation))
        .route("/v1/vms", get(list_vms))
        .route("/v1/vms/{name}", get(get_vm))
        .route("/v1/vms/{name}", delete(delete_vm))
        .route("/v1/vms/{name}/start", post(start_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/images", get(list_images).delete(delete_image))
        .route("/v1/gc", post(collect))
        .route("/v1/capacity", get(capacity))
        .route("/v1/layers", get(list_layers))
        .route("/v1/layers/{partition}/{layer}/entries", get(layer_entries))
        .route("/v1/audit", get(audit))
        .route("/v1/repack", post(repack))
        .fallback(|| async {
            ApiError::not_found("no such endpoint; the API is under /v1 (docs/api.md)")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "this endpoint does not take that method (docs/api.md)",
            )
        })
        .layer(DefaultBodyLimit::max(json_limit))
        .layer(axum::middleware::from_fn_with_state(state.limits, refuse_announced_excess))
        .layer(axum::middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

/// Refuses, before anything else reads the request, what the caller's role
/// does not cover (`access.rs`), and audits the refusal with the actor.
async fn authorize(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(needed) = crate::access::required(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let (name, role) = match req.extensions().get::<Peer>() {
        Some(p) => (p.name.clone(), p.role),
        None => ("unnamed-client".to_string(), None),
    };
    if role.is_some_and(|r| r >= needed) {
        return next.run(req).await;
    }
    let has = role.map_or("no role", Role::name);
    // The path is cut: it is the caller's text, and the row's is bounded.
    let path = req.uri().path();
    let path = path.get(..path.floor_char_boundary(200)).unwrap_or_default();
    let what = format!("{} {path}", req.method());
    tracing::warn!(actor = %name, request = %what, needed = needed.name(), has, "access denied");
    audit_one(
        &s.node,
        NewAudit {
            actor: name.clone(),
            kind: "access".into(),
            outcome: "denied".into(),
            args: Some(what.clone()),
            detail: Some(format!("needs {}; {name:?} has {has}", needed.name())),
            count: 1,
            ..NewAudit::default()
        },
    )
    .await;
    // A certificate without a role can make these rows as fast as it can
    // connect: they count toward the history's pruning as operations do.
    s.ops.prune_now_and_then().await;
    // The body is read (within the route's limit) before the refusal goes
    // out: a client still sending it would otherwise see the connection
    // close under it instead of the answer. A body announced over the limit
    // is not waited for.
    let limit = if req.uri().path() == "/v1/bundles" {
        s.limits.max_bundle_bytes
    } else {
        s.limits.max_json_bytes
    };
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_none_or(|n| n <= limit) {
        let _ = axum::body::to_bytes(req.into_body(), usize::try_from(limit).unwrap_or(usize::MAX))
            .await;
    }
    let mut response = ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!("{what} needs the {} role; the certificate {name:?} has {has}", needed.name()),
    )
    .into_response();
    // The body, if any, is never read: the connection cannot carry another
    // request, and the client must not reuse it.
    response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    response
}

/// Refuses a body whose announced length is over the route's limit before
/// reading any of it; bodies without a length are cut at the limit while
/// they are read (`DefaultBodyLimit`).
async fn refuse_announced_excess(
    State(limits): State<HttpLimits>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let limit = if req.uri().path() == "/v1/bundles" {
        limits.max_bundle_bytes
    } else {
        limits.max_json_bytes
    };
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = announced
        && len > limit
    {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("the body is {len} bytes; this endpoint takes at most {limit}"),
        )
        .into_response();
    }
    next.run(req).await
}

async fn healthz(State(s): State<AppState>) -> ApiResult {
    let node = s.node.clone();
    let db = blocking(move || node.healthy()).await?;
    match db {
        Ok(_) => ok(
            StatusCode::OK,
            wire::Health {
                status: "ok".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                running_operations: s.ops.running_count() as u64,
            },
        ),
        Err(e) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unhealthy", e.to_string())),
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    if !s.metrics_on {
        return ApiError::not_found("metrics are off on this node ([metrics] enabled = false)")
            .into_response();
    }
    // The store's, the layers' and the capacity figures are read when
    // asked for: they change with every provisioning, deletion and repack.
    let node = s.node.clone();
    let capacity = s.capacity;
    let read = provd_node::spawn_blocking(move || {
        Ok::<_, provd_node::StoreError>((
            node.layer_usage()?,
            node.store_sizes()?,
            node.capacity(&capacity)?,
        ))
    })
    .await;
    match read {
        Ok(Ok((usage, sizes, capacity))) => {
            s.metrics.set_layer_usage(&usage);
            s.metrics.set_sizes(&sizes);
            s.metrics.set_capacity(&capacity);
        }
        failed => tracing::warn!(?failed, "reading the node's figures for metrics"),
    }
    // /proc is read on a blocking thread like the store.
    let metrics = s.metrics.clone();
    let _ = provd_node::spawn_blocking(move || metrics.set_process()).await;
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        s.metrics.encode(),
    )
        .into_response()
}

/// Appends one row to the audit trail on a blocking thread; a failure is
/// logged, and the request it records goes on.
async fn audit_one(node: &Arc<Node>, row: NewAudit) {
    let node = node.clone();
    let done = provd_node::spawn_blocking(move || node.append_audit(&[row])).await;
    if !matches!(done, Ok(Ok(()))) {
        tracing::error!(?done, "writing the audit trail failed");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `ROUTES` names every route the router serves, with each method, so
    /// that each has its latency series from the start.
    #[test]
    fn routes_list_every_route_of_the_router() {
        let source = include_str!("mod.rs");
        let router = source.split_once("pub fn router(").unwrap().1;
        let router = router.split_once(".fallback(").unwrap().0;
        let mut served = Vec::new();
        for call in router.split(".route(\"").skip(1) {
            let (path, handlers) = call.split_once('"').unwrap();
            for (method, name) in [("GET", "get("), ("POST", "post("), ("DELETE", "delete(")] {
                if handlers.starts_with(&format!(", {name}"))
                    || handlers.contains(&format!(".{name}"))
                {
                    served.push((method, path));
                }
            }
        }
        served.sort_unstable();
        let mut listed = ROUTES.to_vec();
        listed.sort_unstable();
        assert_eq!(served, listed);
    }
}
