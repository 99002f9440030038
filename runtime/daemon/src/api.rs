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
use provd_node::{BundleRefused, Node};
use provd_store::{AcceptError, AuditQuery, NewAudit, OpState, OperationError, Store};
use provd_wire as wire;
use serde::Deserialize;
use serde_json::{Value, json};

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
    pub store: Arc<Store>,
    pub ops: Arc<Operations>,
    pub metrics: Arc<Metrics>,
    pub limits: HttpLimits,
    /// What the node offers VMs (`GET /v1/capacity`).
    pub capacity: provd_domain::NodeCapacity,
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

fn ok(status: StatusCode, body: impl serde::Serialize) -> ApiResult {
    Ok((status, axum::Json(body)).into_response())
}

fn blocking_error(e: tokio::task::JoinError) -> ApiError {
    ApiError::internal(format!("a worker task failed: {e}"))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(blocking_error)
}

/// Runs a handler's effects on a task of their own: a client that
/// disconnects mid-request drops only the wait for the answer, never an
/// action half done or its audit row.
async fn detached(f: impl std::future::Future<Output = ApiResult> + Send + 'static) -> ApiResult {
    tokio::spawn(f).await.map_err(blocking_error)?
}

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
        .route("/v1/images", get(list_images))
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
        &s.store,
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
    let store = s.store.clone();
    let db = blocking(move || store.stats()).await?;
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
    // The layer figures are read when asked for: they change with every
    // provisioning, deletion and repack.
    let store = s.store.clone();
    match tokio::task::spawn_blocking(move || store.layer_usage()).await {
        Ok(Ok(usage)) => s.metrics.set_layer_usage(&usage),
        failed => tracing::warn!(?failed, "reading the layer figures for metrics"),
    }
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        s.metrics.encode(),
    )
        .into_response()
}

fn refused(e: &BundleRefused) -> ApiError {
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

async fn audit_one(store: &Arc<Store>, row: NewAudit) {
    let store = store.clone();
    let done = tokio::task::spawn_blocking(move || store.append_audit(&[row])).await;
    if !matches!(done, Ok(Ok(()))) {
        tracing::error!(?done, "writing the audit trail failed");
    }
}

async fn upload_bundle(
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

async fn accept_upload(s: AppState, peer: Peer, body: Bytes) -> ApiResult {
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

async fn list_bundles(State(s): State<AppState>) -> ApiResult {
    let store = s.store.clone();
    let bundles = blocking(move || store.bundles()).await?.map_err(ApiError::internal)?;
    let bundles = bundles
        .into_iter()
        .map(|b| wire::Bundle {
            name: b.name,
            version: b.version,
            digest: b.digest,
            signer: b.signer,
            active: b.active,
            accepted_at: b.accepted_at,
            expires: b.expires,
            grant: b.grant,
            manifest: b.manifest,
        })
        .collect();
    ok(StatusCode::OK, wire::BundleList { bundles })
}

async fn set_active(s: &AppState, peer: &Peer, name: &str, version: String) -> ApiResult {
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

async fn activate(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    Path(name): Path<String>,
    body: Result<axum::Json<wire::ActivateRequest>, JsonRejection>,
) -> ApiResult {
    let axum::Json(body) = body?;
    detached(async move { set_active(&s, &peer, &name, body.version).await }).await
}

async fn rollback(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    Path(name): Path<String>,
) -> ApiResult {
    detached(roll_back_plugin(s, peer, name)).await
}

async fn roll_back_plugin(s: AppState, peer: Peer, name: String) -> ApiResult {
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

/// VM specs one operation may carry.
const MAX_VMS: usize = 64;
/// Separates the actor from the key in a stored idempotency key; a
/// control character, which neither may contain.
const KEY_SCOPE: char = '\u{1f}';

/// The key as its manager sent it, without the actor's scope.
fn unscoped(key: &str) -> &str {
    key.split_once(KEY_SCOPE).map_or(key, |(_, k)| k)
}

/// Longest idempotency key.
const MAX_KEY_LEN: usize = 128;

fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad(
            "invalid-request",
            format!("{what} {name:?}: use 1 to 64 of a-z 0-9 - _ ."),
        ))
    }
}

fn start_request(
    body: wire::OperationRequest,
    header_key: Option<String>,
    actor: String,
) -> Result<StartRequest, ApiError> {
    check_name("plugin", &body.plugin)?;
    if let Some(v) = &body.version
        && semver::Version::parse(v).is_err()
    {
        return Err(ApiError::bad(
            "invalid-request",
            format!("version {v:?} is not a semantic version"),
        ));
    }
    let key = match (header_key, body.idempotency_key) {
        (Some(h), Some(b)) if h != b => {
            return Err(ApiError::bad(
                "invalid-request",
                "the Idempotency-Key header and idempotency-key field differ",
            ));
        }
        (h, b) => h.or(b),
    };
    if let Some(k) = &key
        && (k.is_empty() || k.len() > MAX_KEY_LEN || k.chars().any(|c| c.is_control()))
    {
        return Err(ApiError::bad(
            "invalid-request",
            format!("idempotency key: 1 to {MAX_KEY_LEN} printable characters"),
        ));
    }
    if body.vms.len() > MAX_VMS {
        return Err(ApiError::bad(
            "invalid-request",
            format!("vms: at most {MAX_VMS} per operation"),
        ));
    }
    let mut names = Vec::new();
    let mut specs = std::collections::BTreeMap::new();
    for (i, spec) in body.vms.iter().enumerate() {
        let parsed = provd_vm::spec::parse_spec(&spec.to_string())
            .map_err(|e| ApiError::bad("invalid-vm-spec", format!("vms[{i}]: {e}")))?;
        if names.contains(&parsed.name) {
            return Err(ApiError::bad(
                "invalid-vm-spec",
                format!("vms[{i}]: VM {:?} appears twice", parsed.name),
            ));
        }
        names.push(parsed.name.clone());
        specs.insert(parsed.name.clone(), parsed);
    }
    let mut input = match body.params.clone() {
        None => serde_json::Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(ApiError::bad("invalid-request", "params: must be a JSON object")),
    };
    if !body.vms.is_empty() {
        if input.contains_key("vms") {
            return Err(ApiError::bad(
                "invalid-request",
                "params.vms: reserved for the VM specs; send them as the top-level `vms`",
            ));
        }
        input.insert("vms".into(), Value::Array(body.vms.clone()));
    }
    let mut canonical = json!({"plugin": body.plugin, "version": body.version, "vms": body.vms,
                               "params": body.params});
    // Only when set, so the digests of requests without it stay as they were.
    if body.allow_inactive
        && let Some(m) = canonical.as_object_mut()
    {
        m.insert("allow-inactive".into(), Value::Bool(true));
    }
    Ok(StartRequest {
        plugin: body.plugin,
        version: body.version,
        input: Value::Object(input).to_string(),
        request_digest: blake3::hash(canonical.to_string().as_bytes()).to_hex().to_string(),
        // Each manager's keys are its own: another manager's same key names
        // another operation, never this one's record.
        idempotency_key: key.map(|k| format!("{actor}{KEY_SCOPE}{k}")),
        vms: names,
        actor,
        allow_inactive: body.allow_inactive,
        specs,
    })
}

/// The checks `POST /v1/operations` makes of a body before the node is
/// asked anything (JSON shape, plugin name, version, idempotency key, every
/// VM spec, params), as the handler makes them; for the fuzz target.
pub fn parse_operation_body(
    body: &[u8],
    header_key: Option<&str>,
    actor: &str,
) -> Result<StartRequest, ApiError> {
    let body: wire::OperationRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("invalid-request", format!("body: {e}")))?;
    start_request(body, header_key.map(str::to_string), actor.to_string())
}

fn operation_json(
    rec: &provd_store::OperationRecord,
    live: Option<&provd_node::operations::Snapshot>,
) -> wire::Operation {
    let mut op = wire::Operation {
        id: rec.id.clone(),
        idempotency_key: rec.idempotency_key.as_deref().map(|k| unscoped(k).to_string()),
        plugin: rec.plugin.clone(),
        version: rec.version.clone(),
        actor: rec.actor.clone(),
        state: wire_state(rec.state),
        phase: rec.phase.clone(),
        done: rec.done,
        total: rec.total,
        report: rec
            .report
            .as_ref()
            .map(|r| serde_json::from_str(r).unwrap_or(Value::String(r.clone()))),
        error: rec
            .error_code
            .as_ref()
            .map(|code| wire::OperationFailure { code: code.clone(), message: rec.error.clone() }),
        vms: rec.vms.clone(),
        created_at: rec.created_at,
        finished_at: rec.finished_at,
        seq: None,
    };
    if let Some(s) = live {
        op.phase = s.phase.clone();
        op.done = Some(s.done);
        op.total = s.total;
        op.seq = Some(s.seq);
    }
    op
}

fn wire_state(s: OpState) -> wire::OperationState {
    match s {
        OpState::Running => wire::OperationState::Running,
        OpState::Succeeded => wire::OperationState::Succeeded,
        OpState::Failed => wire::OperationState::Failed,
        OpState::Cancelled => wire::OperationState::Cancelled,
    }
}

fn progress_of(s: &provd_node::operations::Snapshot) -> wire::Progress {
    wire::Progress {
        seq: s.seq,
        state: wire_state(s.state),
        phase: s.phase.clone(),
        done: s.done,
        total: s.total,
    }
}

fn resources_json(r: &provd_store::Resources) -> wire::Resources {
    wire::Resources { vcpus: r.vcpus, memory_mib: r.memory_mib, disk_bytes: r.disk_bytes }
}

async fn start_operation(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
    body: Result<axum::Json<wire::OperationRequest>, JsonRejection>,
) -> ApiResult {
    let axum::Json(body) = body?;
    let header_key = match headers.get("idempotency-key") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::bad("invalid-request", "Idempotency-Key: not text"))?
                .to_string(),
        ),
        None => None,
    };
    let req = start_request(body, header_key, peer.name.clone())?;
    // The node's bounds on host networks and boot files hold for the
    // manager's specs as for what a plugin passes.
    let allow = &s.node.engine().policy().vm_allow;
    let mut beyond = Vec::new();
    for (name, spec) in &req.specs {
        beyond.extend(
            provd_vm::spec::beyond_node(spec, allow).into_iter().map(|m| format!("{name}: {m}")),
        );
    }
    if !beyond.is_empty() {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "over-policy", beyond.join("; ")));
    }
    // Recorded and spawned on a task of its own: a client that disconnects
    // meanwhile cannot leave an operation recorded but never run.
    let ops = s.ops.clone();
    let started =
        tokio::spawn(async move { ops.start(req).await }).await.map_err(blocking_error)?;
    match started {
        Ok((rec, true)) => ok(
            StatusCode::ACCEPTED,
            wire::OperationAnswer { operation: operation_json(&rec, None) },
        ),
        Ok((rec, false)) => {
            ok(StatusCode::OK, wire::OperationAnswer { operation: operation_json(&rec, None) })
        }
        Err(StartError::NoPlugin(p)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no-such-plugin",
            format!("no accepted plugin {p} on this node"),
        )),
        Err(StartError::Distrusted(message)) => {
            Err(ApiError::new(StatusCode::FORBIDDEN, "untrusted-bundle", message))
        }
        Err(e @ StartError::Inactive { .. }) => {
            Err(ApiError::new(StatusCode::CONFLICT, "inactive-version", e.to_string()))
        }
        Err(StartError::Busy(n)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("{n} operations are running or queued, the most this node takes; retry later"),
        )),
        Err(StartError::ShuttingDown) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting-down",
            "the node is shutting down; retry with the same idempotency key",
        )),
        Err(StartError::Refused(OperationError::KeyReused { key, operation })) => {
            let key = unscoped(&key);
            Err(ApiError::new(
                StatusCode::CONFLICT,
                "idempotency-conflict",
                format!("idempotency key {key:?} was used by {operation} for a different request"),
            ))
        }
        Err(StartError::Refused(OperationError::VmBusy { vm, operation })) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "vm-busy",
            format!("VM {vm:?} is in operation {operation}, which is still running"),
        )),
        Err(e) => Err(ApiError::internal(e)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    limit: Option<u32>,
}

async fn list_operations(
    State(s): State<AppState>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::bad("invalid-request", e.body_text()))?;
    let state = match q.state.as_deref() {
        None => None,
        Some("running") => Some(OpState::Running),
        Some("succeeded") => Some(OpState::Succeeded),
        Some("failed") => Some(OpState::Failed),
        Some("cancelled") => Some(OpState::Cancelled),
        Some(other) => {
            return Err(ApiError::bad(
                "invalid-request",
                format!("state {other:?}: one of running, succeeded, failed, cancelled"),
            ));
        }
    };
    let limit = q.limit.unwrap_or(100).min(1000);
    let store = s.store.clone();
    let ops =
        blocking(move || store.operations(state, limit)).await?.map_err(ApiError::internal)?;
    let operations = ops.iter().map(|o| operation_json(o, None)).collect();
    ok(StatusCode::OK, wire::OperationList { operations })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    /// Seconds to wait for a change (long poll).
    wait: Option<u64>,
    /// The `seq` the client has seen.
    since: Option<u64>,
}

async fn load_operation(s: &AppState, id: &str) -> Result<provd_store::OperationRecord, ApiError> {
    let store = s.store.clone();
    let op = id.to_string();
    blocking(move || store.operation(&op))
        .await?
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found(format!("no operation {id}")))
}

async fn get_operation(
    State(s): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::bad("invalid-request", e.body_text()))?;
    let wait = Duration::from_secs(q.wait.unwrap_or(0).min(s.limits.max_wait_secs));
    if let Some(mut rx) = s.ops.watch(&id) {
        // Without `since`, a long poll waits for the next change.
        let since = q.since.unwrap_or_else(|| rx.borrow().seq);
        if !wait.is_zero() {
            let _ = tokio::time::timeout(wait, async {
                loop {
                    let seen = rx.borrow_and_update().clone();
                    if seen.seq != since || seen.state.finished() {
                        return;
                    }
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await;
        }
        let live = rx.borrow().clone();
        let rec = load_operation(&s, &id).await?;
        let live = (!rec.state.finished()).then_some(live);
        return ok(
            StatusCode::OK,
            wire::OperationAnswer { operation: operation_json(&rec, live.as_ref()) },
        );
    }
    let rec = load_operation(&s, &id).await?;
    ok(StatusCode::OK, wire::OperationAnswer { operation: operation_json(&rec, None) })
}

async fn operation_events(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let rec = load_operation(&s, &id).await?;
    let rx = s.ops.watch(&id);
    let state = s.clone();
    let stream = async_stream(state, id, rec, rx);
    Ok(Sse::new(stream).keep_alive(axum::response::sse::KeepAlive::default()).into_response())
}

/// Server-sent events: `progress` for each change, then one `done` with the
/// finished operation.
fn async_stream(
    s: AppState,
    id: String,
    rec: provd_store::OperationRecord,
    rx: Option<tokio::sync::watch::Receiver<provd_node::operations::Snapshot>>,
) -> impl futures::Stream<Item = Result<Event, std::convert::Infallible>> {
    use futures::StreamExt as _;
    let progress = match rx {
        Some(rx) => tokio_stream::wrappers::WatchStream::new(rx)
            .take_while(|snap| futures::future::ready(!snap.state.finished()))
            .map(|snap| {
                Ok(Event::default()
                    .event("progress")
                    .data(serde_json::to_string(&progress_of(&snap)).unwrap_or_default()))
            })
            .boxed(),
        None => futures::stream::empty().boxed(),
    };
    let done = futures::stream::once(async move {
        // The record is final once the watch has closed or reported the end.
        let rec = match load_operation(&s, &id).await {
            Ok(r) => r,
            Err(_) => rec,
        };
        Ok(Event::default().event("done").data(
            serde_json::to_string(&wire::OperationAnswer { operation: operation_json(&rec, None) })
                .unwrap_or_default(),
        ))
    });
    progress.chain(done)
}

async fn cancel_operation(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    Path(id): Path<String>,
) -> ApiResult {
    detached(cancel_now(s, peer, id)).await
}

async fn cancel_now(s: AppState, peer: Peer, id: String) -> ApiResult {
    let rec = load_operation(&s, &id).await?;
    if rec.state.finished() || !s.ops.cancel(&id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already-finished",
            format!("operation {id} has already finished ({})", rec.state.as_str()),
        ));
    }
    audit_one(
        &s.store,
        NewAudit {
            actor: peer.name.clone(),
            kind: "operation".into(),
            plugin: Some(rec.plugin.clone()),
            version: Some(rec.version.clone()),
            operation: Some(id.clone()),
            function: Some("cancel".into()),
            outcome: "requested".into(),
            count: 1,
            ..NewAudit::default()
        },
    )
    .await;
    ok(
        StatusCode::ACCEPTED,
        wire::CancelAnswer { operation: operation_json(&rec, None), cancel: "requested".into() },
    )
}

fn vm_json(v: &provd_store::VmRecord) -> wire::Vm {
    wire::Vm {
        name: v.name.clone(),
        operation: v.operation.clone(),
        macs: v.macs.clone(),
        reserved: resources_json(&v.reserved),
        created_at: v.created_at,
        spec: serde_json::from_str::<Value>(&v.spec).unwrap_or(Value::String(v.spec.clone())),
        partitions: None,
    }
}

async fn list_vms(State(s): State<AppState>) -> ApiResult {
    let store = s.store.clone();
    let (vms, reserved) =
        blocking(move || Ok::<_, provd_store::StoreError>((store.vms()?, store.reserved()?)))
            .await?
            .map_err(ApiError::internal)?;
    let vms = vms.iter().map(vm_json).collect();
    ok(StatusCode::OK, wire::VmList { vms, reserved: resources_json(&reserved) })
}

async fn get_vm(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult {
    let store = s.store.clone();
    let n = name.clone();
    let (vm, parts) = blocking(move || {
        Ok::<_, provd_store::StoreError>((store.vm(&n)?, store.partitions_of_vm(&n)?))
    })
    .await?
    .map_err(ApiError::internal)?;
    let vm = vm.ok_or_else(|| ApiError::not_found(format!("no VM {name}")))?;
    let parts = parts
        .iter()
        .map(|p| wire::VmPartition {
            id: p.id.clone(),
            role: p.role.clone(),
            format: p.format.clone(),
            bytes: p.bytes,
        })
        .collect();
    let mut vm = vm_json(&vm);
    vm.partitions = Some(parts);
    ok(StatusCode::OK, wire::VmAnswer { vm })
}

async fn delete_vm(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    Path(name): Path<String>,
) -> ApiResult {
    detached(delete_vm_now(s, peer, name)).await
}

async fn delete_vm_now(s: AppState, peer: Peer, name: String) -> ApiResult {
    provd_vm::spec::check_dns_label(&name)
        .map_err(|e| ApiError::bad("invalid-request", format!("VM name {name:?}: {e}")))?;
    let store = s.store.clone();
    let n = name.clone();
    if blocking(move || store.vm(&n)).await?.map_err(ApiError::internal)?.is_none() {
        return Err(ApiError::not_found(format!("no VM {name}")));
    }
    // A deletion is an operation of its own: it holds the VM's name, so no
    // provisioning of that name runs meanwhile, and it is on the record.
    let req = StartRequest {
        plugin: provd_node::operations::BUILTIN.into(),
        version: None,
        input: json!({"delete-vm": name}).to_string(),
        request_digest: String::new(),
        idempotency_key: None,
        vms: vec![name.clone()],
        actor: peer.name.clone(),
        allow_inactive: false,
        specs: std::collections::BTreeMap::new(),
    };
    let rec = s
        .ops
        .run_builtin(req, provd_node::operations::Builtin::DeleteVms)
        .await
        .map_err(builtin_error)?;
    if rec.state != OpState::Succeeded {
        return Err(ApiError::internal(rec.error.unwrap_or_default()));
    }
    ok(StatusCode::OK, wire::Deleted { deleted: name, operation: operation_json(&rec, None) })
}

/// The answer to a built-in operation that could not run: another holds
/// one of its VMs, or the node failed.
fn builtin_error(e: StartError) -> ApiError {
    match e {
        StartError::Refused(OperationError::VmBusy { vm, operation }) => ApiError::new(
            StatusCode::CONFLICT,
            "vm-busy",
            format!("VM {vm:?} is in operation {operation}, which is still running"),
        ),
        e => ApiError::internal(e),
    }
}

async fn repack(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    body: Result<axum::Json<wire::RepackRequest>, JsonRejection>,
) -> ApiResult {
    let axum::Json(req) = body?;
    detached(repack_now(s, peer, req)).await
}

async fn repack_now(s: AppState, peer: Peer, req: wire::RepackRequest) -> ApiResult {
    let format =
        provd_partitions::SharedFormat::parse(req.shared_format.as_deref().unwrap_or("erofs"))
            .map_err(|e| ApiError::bad("invalid-request", format!("shared-format: {e}")))?;
    let names = match req.vms {
        Some(_) if req.all => {
            return Err(ApiError::bad("invalid-request", "give vms or all, not both"));
        }
        None if !req.all => {
            // provd cannot tell whether a VM runs: the caller names the
            // stopped ones, or says that all are.
            return Err(ApiError::bad(
                "invalid-request",
                "vms: name the stopped VMs to move, or set \"all\": true when every VM is stopped",
            ));
        }
        Some(names) => {
            for (i, n) in names.iter().enumerate() {
                provd_vm::spec::check_dns_label(n).map_err(|e| {
                    ApiError::bad("invalid-request", format!("vms[{i}]: {n:?}: {e}"))
                })?;
            }
            names
        }
        None => {
            let store = s.store.clone();
            blocking(move || store.vms())
                .await?
                .map_err(ApiError::internal)?
                .into_iter()
                .map(|v| v.name)
                .collect()
        }
    };
    if names.len() > MAX_REPACK_VMS {
        return Err(ApiError::bad(
            "invalid-request",
            format!("vms: {} VMs; one repack moves at most {MAX_REPACK_VMS}", names.len()),
        ));
    }
    let req = StartRequest {
        plugin: provd_node::operations::BUILTIN.into(),
        version: None,
        input: json!({"repack": names, "shared-format": format.as_str()}).to_string(),
        request_digest: String::new(),
        idempotency_key: None,
        vms: names,
        actor: peer.name.clone(),
        allow_inactive: false,
        specs: std::collections::BTreeMap::new(),
    };
    let rec = s
        .ops
        .run_builtin(req, provd_node::operations::Builtin::Repack { format })
        .await
        .map_err(builtin_error)?;
    let report: Option<Value> = rec.report.as_deref().and_then(|r| serde_json::from_str(r).ok());
    let status =
        if rec.state == OpState::Succeeded { StatusCode::OK } else { StatusCode::CONFLICT };
    ok(status, wire::RepackAnswer { repack: report, operation: operation_json(&rec, None) })
}

/// VMs one repack moves at most (each is a partition rewrite).
const MAX_REPACK_VMS: usize = 4096;

async fn list_images(State(s): State<AppState>) -> ApiResult {
    let store = s.store.clone();
    let images = blocking(move || store.images()).await?.map_err(ApiError::internal)?;
    let images = images
        .into_iter()
        .map(|i| wire::Image {
            reference: i.reference,
            digest: i.digest,
            source: i.source,
            source_digest: i.source_digest,
            entries: i.entries,
            files: i.files,
            bytes: i.bytes,
            created_at: i.created_at,
        })
        .collect();
    ok(StatusCode::OK, wire::ImageList { images })
}

/// Most layers in one page of `GET /v1/layers`.
const MAX_LAYERS_PAGE: u32 = 500;
/// Most entries in one page of a layer's entries.
const MAX_ENTRIES_PAGE: u32 = 5000;

/// What the node can still give VMs: its capacity (over-commit applied),
/// what VMs reserve, and the data directory's free space beyond the
/// reserve. A remote manager places VMs from this and `GET /v1/layers`.
async fn capacity(State(s): State<AppState>) -> ApiResult {
    let store = s.store.clone();
    let (reserved, fs_free, vms) = blocking(move || {
        let free = store.free_bytes()?.saturating_sub(store.min_free_bytes);
        Ok::<_, provd_store::StoreError>((store.reserved()?, free, store.vms()?.len()))
    })
    .await?
    .map_err(ApiError::internal)?;
    let total = provd_vm::capacity_of(&s.capacity);
    let part = |t: u64, r: u64| wire::Headroom { total: t, reserved: r, free: t.saturating_sub(r) };
    let disk = wire::DiskHeadroom {
        total: total.disk_bytes,
        reserved: reserved.disk_bytes,
        free: total.disk_bytes.saturating_sub(reserved.disk_bytes).min(fs_free),
        filesystem_free: fs_free,
    };
    ok(
        StatusCode::OK,
        wire::Capacity {
            vcpus: part(total.vcpus, reserved.vcpus),
            memory_mib: part(total.memory_mib, reserved.memory_mib),
            disk_bytes: disk,
            vms: vms as u64,
        },
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerPage {
    /// `partition/layer` of the last layer of the previous page.
    after: Option<String>,
    limit: Option<u32>,
}

/// The layers new VMs may stack, by partition and name, a page at a time:
/// digest, files, bytes, and the VMs that stack each.
async fn list_layers(
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
    let store = s.store.clone();
    let mut layers = blocking(move || store.layers(true)).await?.map_err(ApiError::internal)?;
    layers.sort_by(|a, b| (&a.partition, &a.name).cmp(&(&b.partition, &b.name)));
    let total = layers.len();
    let start = match &after {
        Some((p, l)) => layers.partition_point(|x| (&x.partition, &x.name) <= (p, l)),
        None => 0,
    };
    let page: Vec<&provd_store::LayerRecord> = layers.iter().skip(start).take(limit).collect();
    let next = if start + page.len() < total {
        page.last().map(|l| format!("{}/{}", l.partition, l.name))
    } else {
        None
    };
    let layers = page
        .iter()
        .map(|l| wire::Layer {
            partition: l.partition.clone(),
            layer: l.name.clone(),
            digest: l.digest.clone(),
            files: l.files,
            bytes: l.bytes,
            format: l.format.clone(),
            vms: l.vms.clone(),
            domain: l.domain.clone(),
        })
        .collect();
    ok(StatusCode::OK, wire::LayerPage { layers, total: total as u64, next })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryPage {
    /// Entries to skip.
    after: Option<u64>,
    limit: Option<u32>,
}

/// A layer's regular files: path, size and BLAKE3, a page at a time; what
/// a manager compares a new VM's image with.
async fn layer_entries(
    State(s): State<AppState>,
    Path((partition, layer)): Path<(String, String)>,
    q: Result<Query<EntryPage>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::bad("invalid-request", e.body_text()))?;
    if !provd_store::valid_partition_id(&partition) {
        return Err(ApiError::bad(
            "invalid-request",
            format!("{partition:?} is not a partition id"),
        ));
    }
    let limit = q.limit.unwrap_or(1000).clamp(1, MAX_ENTRIES_PAGE) as usize;
    let after = q.after.unwrap_or(0);
    let store = s.store.clone();
    let (p, l) = (partition.clone(), layer.clone());
    let (known, (files, total)) = blocking(move || {
        let known = store.layers(true)?.iter().any(|x| x.partition == p && x.name == l);
        let page = if known {
            store.layer_files_page(&p, &l, after, limit as u32)?
        } else {
            (Vec::new(), 0)
        };
        Ok::<_, provd_store::StoreError>((known, page))
    })
    .await?
    .map_err(ApiError::internal)?;
    if !known {
        return Err(ApiError::not_found(format!("no layer {layer} on partition {partition}")));
    }
    let entries: Vec<wire::LayerFile> = files
        .iter()
        .map(|e| wire::LayerFile {
            path: e.path.clone(),
            size: e.size,
            blake3: e.hash.map(|h| h.to_hex()).unwrap_or_default(),
        })
        .collect();
    let end = after.saturating_add(entries.len() as u64);
    let next = (end < total).then_some(end);
    ok(StatusCode::OK, wire::EntryPage { entries, total, next })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    operation: Option<String>,
    plugin: Option<String>,
    kind: Option<String>,
    outcome: Option<String>,
    after: Option<i64>,
    limit: Option<u32>,
}

async fn audit(
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
    let store = s.store.clone();
    let rows = blocking(move || store.audit(&query)).await?.map_err(ApiError::internal)?;
    let audit = rows
        .into_iter()
        .map(|r| wire::AuditEntry {
            id: r.id,
            at: r.at,
            actor: r.actor,
            kind: r.kind,
            plugin: r.plugin,
            version: r.version,
            operation: r.operation,
            interface: r.interface,
            function: r.function,
            args: r.args,
            outcome: r.outcome,
            detail: r.detail,
            count: r.count,
        })
        .collect();
    ok(StatusCode::OK, wire::AuditList { audit })
}
