//! VMs: list, read, delete (a built-in operation), repack.

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

pub(super) async fn delete_vm_now(s: AppState, peer: Peer, name: String) -> ApiResult {
    provd_node::spec::check_dns_label(&name)
        .map_err(|e| ApiError::bad("invalid-request", format!("VM name {name:?}: {e}")))?;
    let node = s.node.clone();
    let n = name.clone();
    if !blocking(move || node.has_vm(&n)).await?.map_err(ApiError::internal)? {
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
        start: false,
    };
    let rec = s
        .ops
        .run_builtin(req, provd_node::operations::Builtin::DeleteVms)
        .await
        .map_err(builtin_error)?;
    if rec.state != OpState::Succeeded {
        return Err(ApiError::internal(rec.error.unwrap_or_default()));
    }
    ok(StatusCode::OK, wire::Deleted { deleted: name, operation: queries::operation(&rec, None) })
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
    let req = StartRequest {
        plugin: provd_node::operations::BUILTIN.into(),
        version: None,
        input: json!({"repack": names, "shared-format": format}).to_string(),
        request_digest: String::new(),
        idempotency_key: None,
        vms: names,
        actor: peer.name.clone(),
        allow_inactive: false,
        specs: std::collections::BTreeMap::new(),
        start: false,
    };
    let rec = s.ops.run_builtin(req, builtin).await.map_err(builtin_error)?;
    let report: Option<Value> = rec.report.as_deref().and_then(|r| serde_json::from_str(r).ok());
    let status =
        if rec.state == OpState::Succeeded { StatusCode::OK } else { StatusCode::CONFLICT };
    ok(status, wire::RepackAnswer { repack: report, operation: queries::operation(&rec, None) })
}

/// VMs one repack moves at most (each is a partition rewrite).
pub(super) const MAX_REPACK_VMS: usize = 4096;
