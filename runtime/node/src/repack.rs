//! Repacking the node's layers and moving stopped VMs onto them.
//!
//! [`repack`] plans one new shared partition for the layers a set of VMs
//! stack, cut to what they see (`provd_partitions::repack`), builds it,
//! then moves each VM: its new stack is recorded as pending (both stacks
//! now keep their partitions), the boot files of its private partition are
//! rewritten on a copy renamed over it, its hypervisor configuration is
//! written again, and the pending stack becomes its stack, which frees the
//! shared partitions no stack names any more. A crash at any step leaves
//! a pending stack that [`recover`] settles at the next start from what the
//! private partition itself carries: no VM loses a layer it boots from and
//! no partition is left that nothing uses.
//!
//! provd does not run the VMs, so it cannot tell whether one is running:
//! the caller names the VMs that are stopped (rewriting the partition of a
//! running VM would change its disk under it).

use provd_partitions::repack::{
    allocated_bytes, carried_manifest, moved_manifest, plan_repack, rewrite_boot_files,
};
use provd_partitions::{BuildOptions, PartitionError, SharedFormat};
use provd_store::{PartitionRecord, Store, StoreError};
use provd_vm::VmError;

/// Why a repack, or a move of it, failed.
#[derive(Debug, thiserror::Error)]
pub enum RepackError {
    #[error(transparent)]
    Partition(#[from] PartitionError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("encoding a manifest: {0}")]
    Manifest(#[from] serde_json::Error),
}

/// What a repack did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Repacked {
    /// The new shared partition (none when no VM could be moved).
    pub partition: Option<PartitionRecord>,
    pub moved: Vec<String>,
    /// VMs left where they are, with the reason.
    pub skipped: Vec<(String, String)>,
    /// VMs whose move failed, with the error; they keep their stack.
    pub failed: Vec<(String, String)>,
    /// Shared partitions freed (no stack names them any more).
    pub freed: Vec<String>,
    /// Bytes of the node's shared partitions before and after.
    pub shared_bytes_before: u64,
    pub shared_bytes_after: u64,
}

fn shared_bytes(store: &Store) -> Result<u64, RepackError> {
    Ok(store
        .partitions()?
        .iter()
        .filter(|p| p.role == provd_store::PartitionRole::Shared)
        .map(|p| p.bytes)
        .sum())
}

/// Repacks the layers of the stopped VMs `vms` (every VM with a private
/// partition when `None`) into one new shared partition in `format` and
/// moves them onto it.
pub fn repack(
    store: &Store,
    vms: Option<&[String]>,
    format: SharedFormat,
    opts: &BuildOptions,
) -> Result<Repacked, RepackError> {
    // A move an earlier repack could not finish is settled first: its VM
    // boots from the stack its partition carries.
    recover(store)?;
    let mut out = Repacked { shared_bytes_before: shared_bytes(store)?, ..Repacked::default() };
    let planned = plan_repack(store, vms)?;
    out.skipped = planned.skipped.clone();
    if planned.moves.is_empty() || planned.plan.layers.is_empty() {
        out.shared_bytes_after = out.shared_bytes_before;
        return Ok(out);
    }
    let point = store.sync_point()?;
    let shared_opts = BuildOptions { domain: planned.domain.clone(), ..opts.clone() };
    let shared =
        provd_partitions::build_shared(store, &planned.plan, &planned.vms, format, &shared_opts)?;
    // The VMs' boot files are about to name it, and each move is final on
    // its own: the partition must be on disk before the first one (an
    // operation's partitions are otherwise synced once, at its end). If it
    // cannot be, it goes: nothing may stack a partition that may be torn.
    if let Err(e) = store.sync_since(&point) {
        if let Err(rm) = store.remove_partition(&shared.id) {
            tracing::warn!(partition = %shared.id, error = %rm, "removing an unsynced partition");
        }
        return Err(e.into());
    }
    for mv in &planned.moves {
        match move_vm(store, mv, &planned.plan, &shared, opts) {
            Ok(freed) => {
                out.moved.push(mv.vm.clone());
                out.freed.extend(freed.into_iter().map(|p| p.id));
            }
            Err(e) => out.failed.push((mv.vm.clone(), e.to_string())),
        }
    }
    out.partition = store.partition(&shared.id)?;
    if out.moved.is_empty() {
        // Nothing stacks it, unless a move left it pending (then `recover`
        // settles it at the next start or repack).
        match store.remove_partition(&shared.id) {
            Ok(_) => out.partition = None,
            Err(provd_store::StoreError::InUse(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Partitions only a failed move named.
    out.freed.extend(store.free_unused_shared()?.into_iter().map(|p| p.id));
    out.shared_bytes_after = shared_bytes(store)?;
    Ok(out)
}

/// Moves one VM onto `shared`; returns the shared partitions freed.
fn move_vm(
    store: &Store,
    mv: &provd_partitions::repack::Move,
    plan: &provd_dedup::Plan,
    shared: &PartitionRecord,
    opts: &BuildOptions,
) -> Result<Vec<PartitionRecord>, RepackError> {
    let (manifest, rows) = moved_manifest(mv, plan, shared)?;
    let json = serde_json::to_string_pretty(&manifest)?;
    store.begin_restack(&mv.private.id, &rows, &json)?;
    let bytes = match rewrite_boot_files(store, &mv.private, &manifest, opts) {
        Ok(b) => b,
        Err(e) => {
            // The partition was not replaced (every error comes before the
            // rename): its old stack stands.
            let _ = store.abort_restack(&mv.private.id);
            return Err(e.into());
        }
    };
    // From here the partition boots from the new stack; a failure leaves
    // the stack pending for `recover` to finish.
    finish(store, &mv.vm, &mv.private, &json, bytes)
}

/// Writes the VM's configuration for its rewritten partition, then makes
/// the pending stack its stack: only then are the old shared partitions
/// deleted, once nothing names them.
fn finish(
    store: &Store,
    vm: &str,
    private: &PartitionRecord,
    manifest: &str,
    bytes: u64,
) -> Result<Vec<PartitionRecord>, RepackError> {
    let now = PartitionRecord { manifest: manifest.to_string(), ..private.clone() };
    // Partitions built without a VM configured on them (`provctl partition
    // build`) have no configuration to write.
    if let Some(spec) = provd_vm::recorded_spec(store, vm)? {
        let attached = provd_partitions::attachments(store, &now, &spec.name, spec.tenant())?;
        provd_vm::rerender(store, &spec, &attached)?;
    }
    Ok(store.finish_restack(&private.id, manifest, bytes)?)
}

/// Settles the moves a crash interrupted: a private partition whose boot
/// files already carry its pending stack keeps it (its configuration is
/// written again); any other drops it. Returns how many were settled.
pub fn recover(store: &Store) -> Result<usize, RepackError> {
    let pending = store.pending_restacks()?;
    for (private, stack) in &pending {
        let Some(rec) = store.partition(private)? else { continue };
        // What the partition carries only tells whether its boot files were
        // rewritten; what is stored is the node's own manifest, recorded
        // when the move began, never text read back from a partition the
        // guest writes.
        let ours = store.pending_manifest(private)?;
        let carried = carried_manifest(store, &rec).ok();
        let pending: Vec<(String, String)> =
            stack.iter().map(|s| (s.shared.clone(), s.layer.clone())).collect();
        let carries_new = carried.as_ref().is_some_and(|m| m.stack_names() == pending);
        match (carries_new, ours) {
            (true, Some(json)) => {
                let bytes = allocated_bytes(store, &rec);
                let vm = rec.vms.first().cloned().unwrap_or_default();
                finish(store, &vm, &rec, &json, bytes)?;
                tracing::info!(partition = %rec.id, vm, "finished a repack move a crash interrupted");
            }
            _ => {
                store.abort_restack(&rec.id)?;
                tracing::info!(partition = %rec.id, "dropped a repack move a crash interrupted");
            }
        }
    }
    if !pending.is_empty() {
        store.free_unused_shared()?;
    }
    Ok(pending.len())
}
