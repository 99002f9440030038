//! The one rollback: what an operation or a call built on the node is
//! removed by one function, newest first. Its list comes from one of two
//! places: the ledger of a call that just failed ([`call`]), or the
//! store's records against an operation's id, after a failure or a stop
//! ([`operation`]). Customisations go first (a VM customised twice gets
//! its first seed back), then VMs (they use the partitions), then
//! partitions (a private partition stacks on shared ones, so it goes first).

use provd_host::Built;
use provd_libvirt::Libvirt;
use provd_store::{PartitionRole, Store, StoreError};

/// Removes what a failed call recorded in its ledger. Only VMs the call's
/// operation configured are removed: the name may have been deleted and
/// taken by another operation since.
pub fn call(
    store: &Store,
    libvirt: Option<&Libvirt>,
    operation: &str,
    built: &Built,
) -> (usize, usize) {
    for c in built.customized.iter().rev() {
        if let Err(e) = provd_vm::restore_seed(store, &c.vm, &c.spec, &c.seed) {
            tracing::warn!(vm = %c.vm, error = %e, "rollback: cannot undo a customisation");
        }
    }
    let vms: Vec<&str> = built.vms.iter().rev().map(String::as_str).collect();
    let partitions: Vec<&str> = built.partitions.iter().rev().map(String::as_str).collect();
    remove(store, libvirt, operation, &vms, &partitions)
}

/// Removes everything the store records against operation `id`: its VMs
/// (with their reservations, seeds and configuration, and the partitions
/// only they used), then its remaining partitions, private ones first.
/// Returns how many VMs and partitions of the operation are gone.
pub fn operation(store: &Store, libvirt: Option<&Libvirt>, id: &str) -> (usize, usize) {
    let vms = match store.vms_of_operation(id) {
        Ok(names) => names,
        Err(e) => {
            tracing::error!(operation = %id, error = %e, "rollback: cannot list VMs");
            Vec::new()
        }
    };
    let mut recs = match store.partitions_of_operation(id) {
        Ok(recs) => recs,
        Err(e) => {
            tracing::error!(operation = %id, error = %e, "rollback: cannot list partitions");
            Vec::new()
        }
    };
    recs.sort_by_key(|r| (r.role == PartitionRole::Shared, std::cmp::Reverse(r.created_at)));
    let vms: Vec<&str> = vms.iter().map(String::as_str).collect();
    let partitions: Vec<&str> = recs.iter().map(|r| r.id.as_str()).collect();
    remove(store, libvirt, id, &vms, &partitions)
}

/// Removes `vms` of `operation` (from libvirt too), then `partitions`, in
/// the order given. Returns how many of each are gone.
fn remove(
    store: &Store,
    libvirt: Option<&Libvirt>,
    operation: &str,
    vms: &[&str],
    partitions: &[&str],
) -> (usize, usize) {
    let mut vms_gone = 0;
    for vm in vms {
        match store.vm(vm) {
            Ok(Some(rec)) if rec.operation.as_deref() == Some(operation) => {}
            Ok(_) => continue,
            Err(e) => {
                tracing::error!(operation, vm, error = %e, "rollback: cannot read VM");
                continue;
            }
        }
        if let Some(libvirt) = libvirt
            && let Err(e) = libvirt.remove(vm, &provd_vm::domain_uuid(vm))
        {
            tracing::error!(operation, vm, error = %e, "rollback: cannot remove the VM's domain");
        }
        match provd_vm::delete(store, vm) {
            Ok(_) => vms_gone += 1,
            Err(e) => tracing::error!(operation, vm, error = %e, "rollback: cannot remove VM"),
        }
    }
    let mut partitions_gone = 0;
    for id in partitions {
        match store.remove_partition(id) {
            // `None`: already removed with the last VM that used it.
            Ok(_) => partitions_gone += 1,
            // A repack's partition VMs were moved onto before the crash:
            // theirs now, it goes with the last of them.
            Err(StoreError::InUse(why)) => {
                tracing::info!(operation, partition = id, why, "rollback: partition kept");
            }
            Err(e) => {
                tracing::error!(operation, partition = id, error = %e, "rollback: cannot remove partition");
            }
        }
    }
    (vms_gone, partitions_gone)
}
