//! Operations: start (with the request's checks), list, read with a long
//! poll, follow as server-sent events, cancel.

use super::*;

/// VM specs one operation may carry.
pub(super) const MAX_VMS: usize = 64;

/// Longest idempotency key.
pub(super) const MAX_KEY_LEN: usize = 128;

pub(super) fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
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

pub(super) fn start_request(
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
        let parsed = provd_node::spec::parse_spec(&spec.to_string())
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
    // Only when set, so the digests of requests without them stay as they were.
    if body.allow_inactive
        && let Some(m) = canonical.as_object_mut()
    {
        m.insert("allow-inactive".into(), Value::Bool(true));
    }
    if body.start
        && let Some(m) = canonical.as_object_mut()
    {
        m.insert("start".into(), Value::Bool(true));
    }
    Ok(StartRequest {
        plugin: body.plugin,
        version: body.version,
        input: Value::Object(input).to_string(),
        request_digest: blake3::hash(canonical.to_string().as_bytes()).to_hex().to_string(),
        // Each manager's keys are its own: another manager's same key names
        // another operation, never this one's record.
        idempotency_key: key.map(|k| queries::scoped_key(&actor, &k)),
        vms: names,
        actor,
        allow_inactive: body.allow_inactive,
        specs,
        start: body.start,
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

pub(super) async fn start_operation(
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
    if req.start && s.node.libvirt().is_none() {
        return Err(ApiError::bad(
            "invalid-request",
            format!("start: {}", provd_node::operations::NO_LIBVIRT),
        ));
    }
    // The node's bounds on host networks and boot files hold for the
    // manager's specs as for what a plugin passes.
    let mut beyond = Vec::new();
    for (name, spec) in &req.specs {
        beyond.extend(s.node.beyond_policy(spec).into_iter().map(|m| format!("{name}: {m}")));
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
            wire::OperationAnswer { operation: queries::operation(&rec, None) },
        ),
        Ok((rec, false)) => {
            ok(StatusCode::OK, wire::OperationAnswer { operation: queries::operation(&rec, None) })
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
            let key = queries::unscoped(&key);
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
pub(super) struct ListQuery {
    state: Option<String>,
    limit: Option<u32>,
}

pub(super) async fn list_operations(
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
    let node = s.node.clone();
    ok(
        StatusCode::OK,
        blocking(move || node.operations(state, limit)).await?.map_err(ApiError::internal)?,
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WaitQuery {
    /// Seconds to wait for a change (long poll).
    wait: Option<u64>,
    /// The `seq` the client has seen.
    since: Option<u64>,
}

pub(super) async fn load_operation(
    s: &AppState,
    id: &str,
) -> Result<provd_node::OperationRecord, ApiError> {
    let node = s.node.clone();
    let op = id.to_string();
    blocking(move || node.operation_record(&op))
        .await?
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found(format!("no operation {id}")))
}

pub(super) async fn get_operation(
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
            wire::OperationAnswer { operation: queries::operation(&rec, live.as_ref()) },
        );
    }
    let rec = load_operation(&s, &id).await?;
    ok(StatusCode::OK, wire::OperationAnswer { operation: queries::operation(&rec, None) })
}

pub(super) async fn operation_events(
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
pub(super) fn async_stream(
    s: AppState,
    id: String,
    rec: provd_node::OperationRecord,
    rx: Option<tokio::sync::watch::Receiver<provd_node::operations::Snapshot>>,
) -> impl futures::Stream<Item = Result<Event, std::convert::Infallible>> {
    use futures::StreamExt as _;
    let progress = match rx {
        Some(rx) => tokio_stream::wrappers::WatchStream::new(rx)
            .take_while(|snap| futures::future::ready(!snap.state.finished()))
            .map(|snap| {
                Ok(Event::default()
                    .event("progress")
                    .data(serde_json::to_string(&queries::progress(&snap)).unwrap_or_default()))
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
            serde_json::to_string(&wire::OperationAnswer {
                operation: queries::operation(&rec, None),
            })
            .unwrap_or_default(),
        ))
    });
    progress.chain(done)
}

pub(super) async fn cancel_operation(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    Path(id): Path<String>,
) -> ApiResult {
    detached(cancel_now(s, peer, id)).await
}

pub(super) async fn cancel_now(s: AppState, peer: Peer, id: String) -> ApiResult {
    let rec = load_operation(&s, &id).await?;
    if rec.state.finished() || !s.ops.cancel(&id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already-finished",
            format!("operation {id} has already finished ({})", rec.state.as_str()),
        ));
    }
    audit_one(
        &s.node,
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
        wire::CancelAnswer {
            operation: queries::operation(&rec, None),
            cancel: "requested".into(),
        },
    )
}
