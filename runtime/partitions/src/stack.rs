//! Resolving the layers a VM stacks to the shared partitions that hold
//! them, within its trust domain and the attach limits.

use provd_dedup::Plan;
use provd_store::{PartitionRecord, StackedLayer, Store};

use crate::{
    MAX_SHARED_PER_VM, PartitionError, SharedRef, StackItem, layer_digest, shared_manifest,
};

/// What a stack is made of.
pub(crate) type ResolvedStack = (Vec<SharedRef>, Vec<StackItem>, Vec<StackedLayer>);

/// Finds each layer `vm` stacks of a checked plan: a layer the node
/// already holds (still there, with the digest the plan was made against) or one of `shared`,
/// the shared partition this plan built. Returns the shared partitions in
/// the order the stack first uses them, the stack as the manifest records
/// it, and as the store does.
pub(crate) fn resolve_stack(
    store: &Store,
    plan: &Plan,
    vm: &str,
    ids: &[String],
    shared: Option<&PartitionRecord>,
    domain: &str,
) -> Result<ResolvedStack, PartitionError> {
    let on_node = if plan.layers.iter().any(|l| l.node.is_some()) {
        store.layer_records(false)?
    } else {
        Vec::new()
    };
    // This plan's shared partition, read once, when a layer of the stack is
    // one it built.
    let builds = ids.iter().any(|id| plan.layers.iter().any(|l| &l.id == id && l.node.is_none()));
    let own = match shared {
        Some(rec) if builds => Some((rec, shared_manifest(rec)?)),
        _ => None,
    };
    let mut refs: Vec<SharedRef> = Vec::new();
    let mut items = Vec::new();
    let mut rows = Vec::new();
    for id in ids {
        let layer = plan.layers.iter().find(|l| &l.id == id).ok_or_else(|| {
            PartitionError::InvalidPlan(format!(
                "VM {vm:?} stacks layer {id:?}, which the plan does not have"
            ))
        })?;
        // A node layer's entries were matched to its digest when the plan
        // was checked; a layer of this plan is digested here, once.
        let digest = match &layer.node {
            Some(node) => node.digest.clone(),
            None => layer_digest(&layer.entries),
        };
        let (partition, name) = match &layer.node {
            Some(node) => {
                let there = on_node.iter().any(|l| {
                    l.partition == node.partition && l.name == node.name && l.digest == node.digest
                });
                if !there {
                    return Err(PartitionError::NotFound(format!(
                        "layer {} of shared partition {} is no longer on the node",
                        node.name, node.partition
                    )));
                }
                (node.partition.clone(), node.name.clone())
            }
            None => {
                let (rec, manifest) = own.as_ref().ok_or_else(|| {
                    PartitionError::NotFound(format!(
                        "VM {vm:?} stacks layer {id:?} of this plan but no shared partition was given"
                    ))
                })?;
                // The same layer, not one that happens to share its id
                // (every plan numbers its layers from 0).
                let ok = manifest
                    .layers
                    .iter()
                    .any(|l| &l.id == id && l.vms.iter().any(|v| v == vm) && l.digest == digest);
                if !ok {
                    return Err(PartitionError::NotFound(format!(
                        "shared partition {} has no layer {id:?} of this plan for VM {vm:?}",
                        rec.id
                    )));
                }
                (rec.id.clone(), id.clone())
            }
        };
        let index = match refs.iter().position(|r| r.partition == partition) {
            Some(i) => i,
            None => {
                let rec = store.partition(&partition)?.ok_or_else(|| {
                    PartitionError::NotFound(format!("shared partition {partition} is gone"))
                })?;
                // Whatever the plan says: a guest reads every byte of what
                // it attaches, so its tenant must be allowed all of it.
                let tenant = domain.strip_prefix("tenant:").unwrap_or("");
                if !provd_domain::trust::may_see(tenant, &rec.domain) {
                    return Err(PartitionError::OtherDomain {
                        vm: vm.to_string(),
                        tenant: tenant.to_string(),
                        partition: rec.id,
                        domain: rec.domain,
                    });
                }
                let sm = shared_manifest(&rec)?;
                refs.push(SharedRef { partition: rec.id, format: sm.format, uuid: sm.uuid });
                refs.len() - 1
            }
        };
        items.push(StackItem { shared: index, layer: name.clone(), digest });
        rows.push(StackedLayer { shared: partition, layer: name });
    }
    if refs.len() > MAX_SHARED_PER_VM {
        return Err(PartitionError::TooManyShared {
            vm: vm.to_string(),
            partitions: refs.len(),
            max: MAX_SHARED_PER_VM,
        });
    }
    Ok((refs, items, rows))
}
