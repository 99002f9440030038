//! VMs: list, read, delete, start and stop (built-in operations), repack.

use super::*;

pub(super) async fn list_vms(State(s): State<AppState>) -> ApiResult {
    let node = s.node.clone();
    ok(StatusCode::OK, blocking(move || node.vms()).await?.map_err(ApiError::internal)?)
}

pub(super) async fn get_vm(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult {
    let node = s.node.clone();
    let n = name.clone();
    let vm = blocking(move || node.vm(&n)).await?.map_err(ApiError::internal)?;
    let vm = vm.ok_or_else(|| ApiError::not_found(format!("no VM {name}")))?;
    ok(StatusCode::OK, wire::VmAnswer { vm })
}

pub(super) async fn delete_vm(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    Path(name): Path<String>,
) -> ApiResult {
    detached(delete_vm_now(s, peer, name)).await
}

/// Refuses a name no VM may have.
fn vm_name(name: &str) -> Result<(), ApiError> {
    provd_node::spec::check_dns_label(name)
        .map_err(|e| ApiError::bad("invalid-request", format!("VM name {name:?}: {e}")))
}

/// Refuses a name no VM of the node has.
async fn existing_vm(s: &AppState, name: &str) -> Result<(), ApiError> {
    let node = s.node.clone();
    let n = name.to_string();
    if !blocking(move || node.has_vm(&n)).await?.map_err(ApiError::internal)? {
        return Err(ApiError::not_found(format!("no VM {name}")));
    }
    Ok(())
}

/// The request of one of provd's own operations, by `peer`, holding `vms`.
fn builtin_request(peer: &Peer, input: Value, vms: Vec<String>) -> StartRequest {
    StartRequest {
        plugin: provd_node::operations::BUILTIN.into(),
        version: None,
        input: input.to_string(),
        request_digest: String::new(),
        idempotency_key: None,
        vms,
        actor: peer.name.clone(),
        allow_inactive: false,
        specs: std::collections::BTreeMap::new(),
        start: false,
    }
}

pub(super) async fn delete_vm_now(s: AppState, peer: Peer, name: String) -> ApiResult {
    vm_name(&name)?;
    existing_vm(&s, &name).await?;
    // A deletion is an operation of its own: it holds the VM's name, so no
    // provisioning of that name runs meanwhile, and it is on the record.
    let action = provd_node::operations::Builtin::DeleteVms;
    let req = builtin_request(&peer, json!({action.function(): name}), vec![name.clone()]);
    let rec = s.ops.run_builtin(req, action).await.map_err(builtin_error)?;
    if rec.state != OpState::Succeeded {
        return Err(ApiError::internal(rec.error.unwrap_or_default()));
    }
    ok(StatusCode::OK, wire::Deleted { deleted: name, operation: queries::operation(&rec, None) })
}

pub(super) async fn start_vm(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    Path(name): Path<String>,
) -> ApiResult {
    detached(power_now(s, peer, name, provd_node::operations::Builtin::Start)).await
}

pub(super) async fn stop_vm(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    // The body may be empty: a graceful stop within the default time.
    let req: wire::StopRequest = optional_json(&body)
        .map_err(|e| ApiError::bad("invalid-request", format!("stop request: {e}")))?;
    let how = if req.force {
        if req.timeout_seconds.is_some() {
            return Err(ApiError::bad(
                "invalid-request",
                "timeout-seconds: a forced stop does not wait; give one or the other",
            ));
        }
        provd_node::Stop::Now
    } else {
        let seconds = req.timeout_seconds.unwrap_or(DEFAULT_STOP_SECONDS);
        if !(1..=MAX_STOP_SECONDS).contains(&seconds) {
            return Err(ApiError::bad(
                "invalid-request",
                format!("timeout-seconds: {seconds}; from 1 to {MAX_STOP_SECONDS}"),
            ));
        }
        provd_node::Stop::Shutdown { within: Duration::from_secs(seconds) }
    };
    detached(power_now(s, peer, name, provd_node::operations::Builtin::Stop(how))).await
}

/// How long a guest asked to shut down has, unless the request says.
const DEFAULT_STOP_SECONDS: u64 = 60;
/// The longest a stop request may wait for its guest.
const MAX_STOP_SECONDS: u64 = 600;

/// Starts or stops VM `name`'s domain as one built-in operation, which
/// holds the VM's name: no repack or deletion of it runs meanwhile.
async fn power_now(
    s: AppState,
    peer: Peer,
    name: String,
    action: provd_node::operations::Builtin,
) -> ApiResult {
    vm_name(&name)?;
    if s.node.libvirt().is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no-libvirt",
            provd_node::operations::NO_LIBVIRT,
        ));
    }
    existing_vm(&s, &name).await?;
    let req = builtin_request(&peer, json!({action.function(): name}), vec![name.clone()]);
    let rec = s.ops.run_builtin(req, action).await.map_err(builtin_error)?;
    if rec.state != OpState::Succeeded {
        let message = rec.error.clone().unwrap_or_default();
        let code = match rec.error_code.as_deref().unwrap_or_default() {
            "vm-not-defined" => "vm-not-defined",
            "vm-running" => "vm-running",
            _ => "libvirt-failed",
        };
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            code,
            format!("{message} (operation {})", rec.id),
        ));
    }
    let powered: Vec<provd_node::operations::Powered> =
        rec.report.as_deref().and_then(|r| serde_json::from_str(r).ok()).unwrap_or_default();
    let Some(p) = powered.into_iter().next() else {
        return Err(ApiError::internal(format!("operation {} reported nothing", rec.id)));
    };
    ok(
        StatusCode::OK,
        wire::PowerAnswer {
            vm: p.vm,
            state: p.state,
            changed: p.changed,
            operation: queries::operation(&rec, None),
        },
    )
}

/// The answer to a built-in operation that could not run: another holds
/// one of its VMs, or the node failed.
pub(super) fn builtin_error(e: StartError) -> ApiError {
    match e {
        StartError::Refused(OperationError::VmBusy { vm, operation }) => ApiError::new(
            StatusCode::CONFLICT,
            "vm-busy",
            format!("VM {vm:?} is in operation {operation}, which is still running"),
        ),
        e => ApiError::internal(e),
    }
}

pub(super) async fn repack(
    State(s): State<AppState>,
    axum::Extension(peer): axum::Extension<Peer>,
    body: Result<axum::Json<wire::RepackRequest>, JsonRejection>,
) -> ApiResult {
    let axum::Json(req) = body?;
    detached(repack_now(s, peer, req)).await
}

pub(super) async fn repack_now(s: AppState, peer: Peer, req: wire::RepackRequest) -> ApiResult {
    // Only a format's own name parses, so it is recorded as sent.
    let format = req.shared_format.as_deref().unwrap_or("erofs").to_string();
    let builtin = provd_node::operations::Builtin::repack(&format)
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
                provd_node::spec::check_dns_label(n).map_err(|e| {
                    ApiError::bad("invalid-request", format!("vms[{i}]: {n:?}: {e}"))
                })?;
            }
            names
        }
        None => {
            let node = s.node.clone();
            blocking(move || node.vm_names()).await?.map_err(ApiError::internal)?
        }
    };
    if names.len() > MAX_REPACK_VMS {
        return Err(ApiError::bad(
            "invalid-request",
            format!("vms: {} VMs; one repack moves at most {MAX_REPACK_VMS}", names.len()),
        ));
    }
    let input = json!({builtin.function(): names, "shared-format": format});
    let req = builtin_request(&peer, input, names);
    let rec = s.ops.run_builtin(req, builtin).await.map_err(builtin_error)?;
    let report: Option<Value> = rec.report.as_deref().and_then(|r| serde_json::from_str(r).ok());
    let status =
        if rec.state == OpState::Succeeded { StatusCode::OK } else { StatusCode::CONFLICT };
    ok(status, wire::RepackAnswer { repack: report, operation: queries::operation(&rec, None) })
}

/// VMs one repack moves at most (each is a partition rewrite).
pub(super) const MAX_REPACK_VMS: usize = 4096;
