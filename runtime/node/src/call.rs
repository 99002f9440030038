//! One plugin call on the node, however it is started (an operation, a
//! local run, a test): the engine runs it with the node's interfaces, which
//! record what it builds in a ledger; this module keeps or undoes that
//! once the call has ended, and waits for changes still in flight.

use std::collections::BTreeMap;
use std::sync::Arc;

use provd_engine::{Cancel, InvokeError, Observer, Outcome, Request};
use provd_host::{Built, Engine, Ledger, NodeCall, Plugin};
use provd_store::{PartitionRole, Store};

/// What a caller says about one call beyond its request.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// Stops the call at the plugin's next host call or epoch slice.
    pub cancel: Cancel,
    /// The VM names the operation is about (the daemon holds them for it):
    /// when given, the only VMs the plugin may plan, build or configure
    /// for. `None` (local tools, tests) leaves the names free.
    pub vms: Option<Vec<String>>,
    /// The manager's spec of each VM the operation names.
    pub specs: BTreeMap<String, provd_vm::spec::VmSpec>,
    /// The node's libvirtd, when provd hands it the libvirt VMs it
    /// configures: a call that succeeds has them defined (and started, with
    /// `start`), or fails and is rolled back.
    pub libvirt: Option<provd_libvirt::Libvirt>,
    pub start: bool,
}

/// Runs `plugin` once. If the call fails, what it built is removed
/// ([`crate::rollback::call`]); if it succeeds in an operation that names
/// its VMs, private partitions it built for a VM it did not configure are
/// freed. Returns once no change of the call runs any more.
pub async fn run(
    engine: &Engine,
    plugin: &Plugin,
    request: Request,
    observer: Arc<dyn Observer>,
    options: CallOptions,
) -> Result<Outcome, InvokeError> {
    let ledger = Arc::new(Ledger::default());
    let names_given = options.vms.is_some();
    let (libvirt, start) = (options.libvirt, options.start);
    let operation = request.operation_id.clone();
    let host = NodeCall { vms: options.vms, specs: options.specs, ledger: ledger.clone() };
    let result = engine
        .provision_with(
            plugin,
            request,
            observer,
            provd_engine::CallOptions { cancel: options.cancel, host },
        )
        .await;
    // Closed before anything is undone, so that a build still running on
    // a blocking thread removes its own result instead of publishing it.
    let built = ledger.close();
    let store = engine.host().store().cloned();
    let result = match (result, libvirt.clone(), store.clone()) {
        (Ok(outcome), Some(libvirt), Some(store)) if !built.vms.is_empty() => {
            let vms = built.vms.clone();
            let handed = provd_engine::spawn_blocking(move || {
                hand_to_libvirt(&store, &libvirt, &vms, start)
            })
            .await
            .unwrap_or_else(|e| Err(format!("handing VMs to libvirt: {e}")));
            handed.map(|()| outcome).map_err(InvokeError::Host)
        }
        (result, _, _) => result,
    };
    if let Some(store) = store
        && !built.is_empty()
        && (result.is_err() || names_given)
    {
        let failed = result.is_err();
        let done = provd_engine::spawn_blocking(move || {
            if failed {
                crate::rollback::call(&store, libvirt.as_ref(), &operation, &built);
            } else {
                free_unconfigured(&store, &built);
            }
        })
        .await;
        if let Err(e) = done {
            tracing::warn!(error = %e, "ending a call panicked");
        }
    }
    ledger.settle().await;
    result
}

/// Defines each libvirt VM of `vms` in libvirt, and starts it with
/// `start`; on the first failure, removes from libvirt the ones it
/// defined, so that the caller's rollback leaves nothing there either.
fn hand_to_libvirt(
    store: &Store,
    libvirt: &provd_libvirt::Libvirt,
    vms: &[String],
    start: bool,
) -> Result<(), String> {
    let mut defined = Vec::new();
    let mut each = || {
        for vm in vms {
            if !define(store, libvirt, vm)? {
                continue;
            }
            defined.push(vm.clone());
            if start {
                libvirt
                    .start(vm, &provd_vm::domain_uuid(vm))
                    .map_err(|e| format!("VM {vm}: {e}"))?;
            }
        }
        Ok(())
    };
    let done = each();
    if done.is_err() {
        for vm in defined.iter().rev() {
            if let Err(e) = libvirt.remove(vm, &provd_vm::domain_uuid(vm)) {
                tracing::warn!(vm, error = %e, "cannot remove a failed operation's domain");
            }
        }
    }
    done
}

/// Defines VM `vm` in libvirt (again) from the domain provd wrote for it;
/// `false` for a VM of another hypervisor, which has no domain.
pub(crate) fn define(
    store: &Store,
    libvirt: &provd_libvirt::Libvirt,
    vm: &str,
) -> Result<bool, String> {
    let Some(xml) = provd_vm::libvirt_domain(store, vm).map_err(|e| format!("VM {vm}: {e}"))?
    else {
        return Ok(false);
    };
    libvirt.define(&xml).map_err(|e| format!("VM {vm}: {e}"))?;
    Ok(true)
}

/// After an operation that names its VMs succeeds: removes the private
/// partitions it built for a VM it did not configure. Nothing else would
/// ever use or free them, and the VM that rightfully has that name would
/// find its partition taken.
fn free_unconfigured(store: &Store, built: &Built) {
    for id in built.partitions.iter().rev() {
        let unused = match store.partition(id) {
            Ok(Some(rec)) => {
                rec.role == PartitionRole::Private && !rec.vms.iter().any(|v| built.vms.contains(v))
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(partition = %id, error = %e, "cannot read a partition");
                false
            }
        };
        if !unused {
            continue;
        }
        match store.remove_partition(id) {
            Ok(_) => {
                tracing::info!(partition = %id, "freed a private partition no VM of its operation was configured on")
            }
            Err(e) => {
                tracing::warn!(partition = %id, error = %e, "cannot free an unconfigured private partition")
            }
        }
    }
}
