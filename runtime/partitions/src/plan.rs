//! Plans checked against the images they are applied to, and the node's
//! layers a plan may be made against.

use std::collections::{BTreeMap, BTreeSet};

use provd_dedup::Plan;
use provd_domain::image::{Entry, EntryKind};
use provd_store::{ImageRecord, LayerRecord, Store, StoreError};

use crate::{MAX_LAYERS_PER_VM, PartitionError, VmImage, layer_digest, valid_layer_id};

/// Node layers one plan considers. Each costs its entries in memory while
/// the plan is made; past this the largest are kept.
pub const MAX_NODE_LAYERS: usize = 1024;

/// The layers the node offers to new VMs (see [`Store::layers`]) that a
/// plan considers: those whose trust domain `visible` accepts, the largest
/// first, within `max_files` regular files in all and [`MAX_NODE_LAYERS`].
/// Chosen from the store's records alone, so that a kept plan can tell
/// whether the layers it was made against are still the ones considered
/// without reading an entry.
pub fn considered_layers(
    store: &Store,
    max_files: u64,
    visible: &dyn Fn(&str) -> bool,
) -> Result<Vec<LayerRecord>, StoreError> {
    let mut records = store.layer_records(true)?;
    records.retain(|r| visible(&r.domain));
    records.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.partition.cmp(&b.partition)));
    let mut left = max_files;
    let mut out = Vec::new();
    for r in records.into_iter().take(MAX_NODE_LAYERS) {
        if r.files > left {
            continue;
        }
        left -= r.files;
        out.push(r);
    }
    Ok(out)
}

/// A layer record with its entries, as a plan takes it.
pub fn node_layer(store: &Store, r: LayerRecord) -> Result<provd_dedup::NodeLayer, StoreError> {
    let entries = store.layer_entries(&r.partition, &r.name)?;
    Ok(provd_dedup::NodeLayer {
        node: provd_dedup::NodeRef {
            partition: r.partition,
            name: r.name,
            digest: r.digest,
            domain: r.domain,
        },
        entries,
    })
}

/// The layers [`considered_layers`] gives, with their entries: a plan made
/// only against layers its VMs may see neither stacks nor counts nor
/// reveals the others.
pub fn node_layers(
    store: &Store,
    max_files: u64,
    visible: &dyn Fn(&str) -> bool,
) -> Result<Vec<provd_dedup::NodeLayer>, StoreError> {
    considered_layers(store, max_files, visible)?
        .into_iter()
        .map(|r| node_layer(store, r))
        .collect()
}

/// A plan [`check_plan`] proved to give each of its VMs exactly its image,
/// with those VMs' images. Builders take it as it is: the proof is made
/// once, however many partitions are then built from it, and the entries of
/// the node's layers it stacks, checked against their recorded digests, may
/// then be dropped ([`CheckedPlan::without_node_entries`]).
#[derive(Debug, Clone)]
pub struct CheckedPlan {
    plan: Plan,
    vms: Vec<VmImage>,
}

impl CheckedPlan {
    /// Checks `plan` for every VM of `vms`.
    /// Each VM's part is checked on its own thread, a few at a time: each
    /// reads its image and assembles its view, and a plan of many VMs
    /// would otherwise wait for them one by one.
    pub fn check(store: &Store, plan: Plan, vms: Vec<VmImage>) -> Result<Self, PartitionError> {
        check_shape(&plan, &vms, None)?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        let chunk = vms.len().div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            let running: Vec<_> = vms
                .chunks(chunk)
                .map(|part| {
                    let plan = &plan;
                    scope.spawn(move || part.iter().try_for_each(|v| check_vm(store, plan, v)))
                })
                .collect();
            // The first VM's error in plan order, whichever thread ends first.
            running
                .into_iter()
                .try_for_each(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        })?;
        Ok(CheckedPlan { plan, vms })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn vms(&self) -> &[VmImage] {
        &self.vms
    }

    /// The same plan without the entries of the layers the node holds:
    /// the check matched them to the digests the node recorded, and a
    /// build finds each by that digest. What is left is the VMs' private
    /// sets and the layers to build.
    pub fn without_node_entries(mut self) -> Self {
        for layer in self.plan.layers.iter_mut().filter(|l| l.node.is_some()) {
            layer.entries = Vec::new();
        }
        self
    }

    /// The same plan for VM `to` running `image`, in place of its only VM:
    /// names take no part in what a plan shares, and `image` must have the
    /// digest (so the entries) of the image it was checked against. `None`
    /// otherwise.
    pub fn for_vm(&self, to: &str, image: ImageRecord) -> Option<Self> {
        let [one] = self.vms.as_slice() else { return None };
        if one.image.digest != image.digest {
            return None;
        }
        let plan = self.plan.renamed(&one.vm, to)?;
        Some(CheckedPlan { plan, vms: vec![VmImage { vm: to.to_string(), image }] })
    }
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
    check_shape(plan, vms, only)?;
    for v in vms.iter().filter(|v| only.is_none_or(|o| o == v.vm)) {
        check_vm(store, plan, v)?;
    }
    Ok(())
}

/// Checks that `plan` gives VM `v` back exactly its image.
fn check_vm(store: &Store, plan: &Plan, v: &VmImage) -> Result<(), PartitionError> {
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
    Ok(())
}

/// Checks that `plan` is well formed: its layer ids, its stacks, the VMs
/// each layer names, and the node layers the VMs checked stack.
fn check_shape(plan: &Plan, vms: &[VmImage], only: Option<&str>) -> Result<(), PartitionError> {
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
    // A node layer is the node's: builds find it by the digest the node
    // recorded, so its entries here must be the ones that digest covers.
    let checked: BTreeSet<&str> = plan
        .stacks
        .iter()
        .filter(|(vm, _)| only.is_none_or(|o| o == vm.as_str()))
        .flat_map(|(_, stack)| stack.iter().map(String::as_str))
        .collect();
    for layer in plan.layers.iter().filter(|l| checked.contains(l.id.as_str())) {
        if let Some(node) = &layer.node
            && layer_digest(&layer.entries) != node.digest
        {
            return Err(PartitionError::InvalidPlan(format!(
                "layer {:?} does not have the entries of node layer {}/{}",
                layer.id, node.partition, node.name
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
    Ok(())
}
