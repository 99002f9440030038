//! Plans checked against the images they are applied to, and the node's
//! layers a plan may be made against.

use std::collections::{BTreeMap, BTreeSet};

use provd_dedup::Plan;
use provd_domain::image::{Entry, EntryKind};
use provd_store::{ImageRecord, Store, StoreError};

use crate::{MAX_LAYERS_PER_VM, PartitionError, VmImage, valid_layer_id};

/// Node layers one plan considers. Each costs its entries in memory while
/// the plan is made; past this the largest are kept.
pub const MAX_NODE_LAYERS: usize = 1024;

/// The layers the node offers to new VMs (see [`Store::layers`]) whose
/// trust domain `visible` accepts, with their entries: the largest first,
/// within `max_entries` entries in all and [`MAX_NODE_LAYERS`]. A plan made
/// only against layers its VMs may see neither stacks nor counts nor
/// reveals the others.
pub fn node_layers(
    store: &Store,
    max_entries: u64,
    visible: &dyn Fn(&str) -> bool,
) -> Result<Vec<provd_dedup::NodeLayer>, StoreError> {
    let mut records = store.layers(true)?;
    records.retain(|r| visible(&r.domain));
    records.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.partition.cmp(&b.partition)));
    let mut left = max_entries;
    let mut out = Vec::new();
    for r in records.into_iter().take(MAX_NODE_LAYERS) {
        if r.files > left {
            continue;
        }
        let entries = store.layer_entries(&r.partition, &r.name)?;
        left = left.saturating_sub(entries.len() as u64);
        out.push(provd_dedup::NodeLayer {
            node: provd_dedup::NodeRef {
                partition: r.partition,
                name: r.name,
                digest: r.digest,
                domain: r.domain,
            },
            entries,
        });
    }
    Ok(out)
}

/// The layers of a plan that are to be built (not already on the node).
pub(crate) fn new_layers(plan: &Plan) -> impl Iterator<Item = &provd_dedup::PlannedLayer> {
    plan.layers.iter().filter(|l| l.node.is_none())
}

/// An entry as a partition can reproduce it: the modification time is not
/// part of a file's identity (see the dedup crate), and a hard link is a
/// regular file with its target's content.
pub(crate) fn identity(e: &Entry) -> Entry {
    let kind = if e.kind == EntryKind::Hardlink { EntryKind::File } else { e.kind };
    Entry {
        path: e.path.clone(),
        kind,
        mode: e.mode & 0o7777,
        uid: e.uid,
        gid: e.gid,
        mtime: 0,
        size: if kind == EntryKind::File { e.size } else { 0 },
        hash: e.hash.filter(|_| kind == EntryKind::File),
        link_target: e.link_target.clone().filter(|_| kind == EntryKind::Symlink),
        device: e.device,
    }
}

/// Every entry of an image.
pub fn image_entries(store: &Store, image: &ImageRecord) -> Result<Vec<Entry>, PartitionError> {
    Ok(store.entries(image, 0, u64::MAX)?)
}

/// Checks that `plan` is well formed and gives back exactly the image of
/// each VM in `vms` (all of them when `only` is `None`).
pub fn check_plan(
    store: &Store,
    plan: &Plan,
    vms: &[VmImage],
    only: Option<&str>,
) -> Result<(), PartitionError> {
    let mut ids = BTreeSet::new();
    for layer in &plan.layers {
        if !valid_layer_id(&layer.id) {
            return Err(PartitionError::InvalidPlan(format!(
                "layer id {:?} is not 1 to 64 of a-z, 0-9 and -",
                layer.id
            )));
        }
        if !ids.insert(layer.id.as_str()) {
            return Err(PartitionError::InvalidPlan(format!("layer id {:?} repeats", layer.id)));
        }
    }
    let mut users: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (vm, stack) in &plan.stacks {
        if stack.len() > MAX_LAYERS_PER_VM {
            return Err(PartitionError::TooManyLayers {
                vm: vm.clone(),
                layers: stack.len(),
                max: MAX_LAYERS_PER_VM,
            });
        }
        for id in stack {
            if !ids.contains(id.as_str()) {
                return Err(PartitionError::InvalidPlan(format!(
                    "VM {vm:?} stacks layer {id:?}, which the plan does not have"
                )));
            }
            users.entry(id.as_str()).or_default().insert(vm.as_str());
        }
    }
    for layer in &plan.layers {
        let declared: BTreeSet<&str> = layer.vms.iter().map(String::as_str).collect();
        if users.get(layer.id.as_str()) != Some(&declared) {
            return Err(PartitionError::InvalidPlan(format!(
                "layer {:?} names VMs {:?}, but other VMs stack it",
                layer.id, layer.vms
            )));
        }
    }
    let known: BTreeSet<&str> = vms.iter().map(|v| v.vm.as_str()).collect();
    for vm in plan.stacks.keys() {
        if !known.contains(vm.as_str()) {
            return Err(PartitionError::PlanMismatch {
                vm: vm.clone(),
                reason: "no image was given for this VM".into(),
            });
        }
    }
    for v in vms.iter().filter(|v| only.is_none_or(|o| o == v.vm)) {
        let mismatch = |reason: String| PartitionError::PlanMismatch { vm: v.vm.clone(), reason };
        let planned = plan
            .reassemble(&v.vm)
            .ok_or_else(|| mismatch("the plan has no entry for this VM".into()))?;
        let image = image_entries(store, &v.image)?;
        if let Some(e) =
            image.iter().find(|e| e.kind == EntryKind::CharDevice && e.device == Some((0, 0)))
        {
            return Err(PartitionError::InvalidEntry {
                path: e.path.clone(),
                reason: format!(
                    "image {} holds a character device 0:0, which an overlay root shows as a \
                     deleted file (a whiteout); it cannot be given back",
                    v.image.reference
                ),
            });
        }
        let mut want: BTreeMap<String, _> =
            image.iter().map(|e| (e.path.clone(), identity(e))).collect();
        for e in &planned {
            match want.remove(&e.path) {
                None => {
                    return Err(mismatch(format!(
                        "{:?} is not in image {}",
                        e.path, v.image.reference
                    )));
                }
                Some(w) if w != identity(e) => {
                    return Err(mismatch(format!(
                        "{:?} differs from image {} in type, content or metadata",
                        e.path, v.image.reference
                    )));
                }
                Some(_) => {}
            }
        }
        if let Some(path) = want.keys().next() {
            return Err(mismatch(format!(
                "{path:?} of image {} is in neither its layers nor its private set",
                v.image.reference
            )));
        }
    }
    Ok(())
}
