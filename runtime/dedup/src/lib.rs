//! Which files do the VMs on a node share, and which layers should hold them.
//!
//! Input: for each VM, the entries of its image (several VMs may use the
//! same image). Everything here works on manifests: no file is read.
//!
//! **Analysis.** A file of a VM is its entry minus the modification time:
//! (path, type, mode, uid, gid, content hash, link target, device). For each
//! such file, the set of VMs that hold exactly it; files with the same VM
//! set form a candidate layer. Layers hold no directory entries: a
//! directory in a layer is implied by the files below it, root-owned
//! 0755. In an overlay the topmost copy of a directory decides its
//! metadata, so a VM's private set holds each directory of its image that
//! its layers do not show with the image's mode and owner (an empty one, a
//! `/tmp` of mode 1777), and each directory its own entries and whiteouts
//! sit in; every other directory comes from its layers, and a VM whose
//! files all come from layers writes no directory of its own.
//! Byte figures count regular-file content (hard links count the bytes of
//! the file they name only once per VM).
//!
//! **Plan.** Given a [`Policy`], candidate layers are taken largest first
//! while every VM of the layer has room for one more layer; layers under
//! the minimum size, or that do not fit, fold back into the private sets of
//! their VMs. With `share_across_paths`, content that recurs under other
//! paths (same content, mode and owner) moves into one alias layer per VM,
//! so the partition builder stores it once. [`Plan::reassemble`] puts a VM back together (its layers, then
//! its private set on top); the tests prove that equals its image, entry by
//! entry, on generated trees. A shared file carries the modification time
//! of the first VM of its set: modification times are not part of what
//! makes files equal, nor of what the verification compares.
//!
//! ```
//! use provd_dedup::{Policy, analyze};
//! use provd_domain::image::{Entry, EntryKind, Hash};
//!
//! let file = |path: &str, byte: u8| Entry {
//!     path: path.into(), kind: EntryKind::File, mode: 0o644, uid: 0, gid: 0, mtime: 0,
//!     size: 1000, hash: Some(Hash([byte; 32])), link_target: None, device: None,
//! };
//! let dir = |path: &str| Entry { kind: EntryKind::Dir, mode: 0o755, size: 0, hash: None, ..file(path, 0) };
//! let a = vec![dir("bin"), file("bin/sh", 1), dir("etc"), file("etc/hostname", 2)];
//! let b = vec![dir("bin"), file("bin/sh", 1), dir("etc"), file("etc/hostname", 3)];
//! let analysis = analyze(&[("vm-a".into(), a.clone()), ("vm-b".into(), b.clone())]).unwrap();
//! assert_eq!(analysis.layers.len(), 1); // bin/sh, shared by both
//! let plan = analysis.plan(&Policy::default());
//! assert_eq!(plan.reassemble("vm-a").unwrap(), a);
//! ```

mod on_node;
mod overlay;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use provd_domain::image::{Entry, EntryKind, Hash};
use serde::Serialize;

pub use on_node::{NodeLayer, could_stack, plan_on_node};
pub use overlay::{VmLayout, VmView, overlay_view, place, remove_tree, vm_layout};

/// Why an analysis could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DedupError {
    #[error("VM {0:?} appears twice")]
    DuplicateVm(String),
    #[error("at most {MAX_VMS} VMs per analysis; got {0}")]
    TooManyVms(usize),
    #[error("VM {vm:?}: entry {path:?} appears twice")]
    DuplicatePath { vm: String, path: String },
}

/// VMs one analysis may cover; VM sets are kept as sorted index lists.
pub const MAX_VMS: usize = 1024;

/// What makes two files "the same" for sharing: everything but mtime.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct FileKey {
    path: String,
    kind: &'static str,
    mode: u32,
    uid: u64,
    gid: u64,
    hash: Option<Hash>,
    link_target: Option<String>,
    device: Option<(u32, u32)>,
}

impl FileKey {
    fn of(e: &Entry) -> FileKey {
        FileKey {
            path: e.path.clone(),
            kind: e.kind.as_str(),
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            hash: e.hash,
            link_target: e.link_target.clone(),
            device: e.device,
        }
    }
}

/// A set of VMs holding exactly the same files, with those files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layer {
    /// Names of the VMs, sorted.
    pub vms: Vec<String>,
    /// Entries (path order), as the first VM of the set has them.
    #[serde(skip)]
    pub entries: Vec<Entry>,
    /// Entries in the layer.
    pub files: u64,
    /// Regular-file bytes in the layer (each path once).
    pub bytes: u64,
}

/// Figures for one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmFigures {
    pub vm: String,
    /// Regular-file bytes of its image.
    pub bytes: u64,
    /// Of those, bytes in files it shares with at least one other VM.
    pub shared_bytes: u64,
}

/// The sharing analysis of a set of VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Analysis {
    /// VM names, in input order.
    pub vms: Vec<String>,
    /// Candidate layers: every VM set of two or more, largest first.
    pub layers: Vec<Layer>,
    pub per_vm: Vec<VmFigures>,
    /// Every VM's file bytes as separate copies.
    pub naive_bytes: u64,
    /// Bytes of distinct contents over all VMs: what a content store holds.
    pub distinct_content_bytes: u64,
    /// Bytes of files held by two or more VMs, counted once.
    pub shared_once_bytes: u64,
    /// The same files counted once per VM holding them.
    pub shared_as_copies_bytes: u64,
    #[serde(skip)]
    private: BTreeMap<String, Vec<Entry>>,
    /// Every VM's entries by path, for folding layers back.
    #[serde(skip)]
    images: BTreeMap<String, BTreeMap<String, Entry>>,
}

/// Choices a plugin makes about which layers are worth keeping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Policy {
    /// Layers with fewer regular-file bytes are folded into private sets.
    pub min_layer_bytes: u64,
    /// Most layers one VM may stack under its private set.
    pub max_layers_per_vm: usize,
    /// Also share content found under other paths: false shares only files
    /// at the same path in every VM of a layer. True adds, per VM, one
    /// alias layer holding its files whose content, mode and owner another
    /// VM or a kept layer also holds; the partition builder stores each
    /// such file once (hard links within the shared partition).
    #[serde(default)]
    pub share_across_paths: bool,
    /// Put a VM's files that no other VM of the plan holds into a layer of
    /// their own rather than its private set, so that the next VM of the
    /// same image, arriving in a later request, stacks them instead of
    /// storing them again. Files under `min_layer_bytes` stay private.
    #[serde(default)]
    pub layer_unique_files: bool,
    /// Most shared partitions one VM may stack layers from (each is a disk
    /// its hypervisor attaches). Layers the node holds on further
    /// partitions are not stacked: their files are stored again.
    #[serde(default = "default_max_shared_partitions")]
    pub max_shared_partitions: usize,
}

fn default_max_shared_partitions() -> usize {
    DEFAULT_MAX_SHARED_PARTITIONS
}

/// The default bound on shared partitions per VM.
pub const DEFAULT_MAX_SHARED_PARTITIONS: usize = 8;

impl Default for Policy {
    fn default() -> Self {
        Policy {
            min_layer_bytes: 0,
            max_layers_per_vm: 8,
            share_across_paths: false,
            layer_unique_files: false,
            max_shared_partitions: DEFAULT_MAX_SHARED_PARTITIONS,
        }
    }
}

/// What makes two files the same content on a partition: one inode can hold
/// both.
type ContentKey = (Hash, u32, u64, u64);

fn content_key(e: &Entry) -> Option<ContentKey> {
    match e.kind {
        EntryKind::File | EntryKind::Hardlink => e.hash.map(|h| (h, e.mode, e.uid, e.gid)),
        _ => None,
    }
}

/// A layer the plan keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PlannedLayer {
    /// `layer-0`, `layer-1`, … for layers to build, in the order chosen;
    /// `node-0`, `node-1`, … for layers the node already holds.
    pub id: String,
    /// The VMs of this plan that stack it.
    pub vms: Vec<String>,
    pub files: u64,
    pub bytes: u64,
    pub entries: Vec<Entry>,
    /// Where the node already holds it; `None` for a layer to build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeRef>,
}

/// A layer on one of the node's shared partitions.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
pub struct NodeRef {
    /// The shared partition holding it.
    pub partition: String,
    /// Its directory on that partition: `layers/<name>`.
    pub name: String,
    /// BLAKE3 over its entries, as recorded when it was built.
    pub digest: String,
    /// Its partition's trust domain (`public` or `tenant:<name>`), carried
    /// for reports: which VMs may stack it was decided when it was offered.
    #[serde(default)]
    pub domain: String,
}

/// Where a VM's file bytes come from under a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct VmShare {
    /// Regular-file bytes of its image.
    pub image_bytes: u64,
    /// Of those, bytes that layers the node already holds provide.
    pub node_bytes: u64,
    /// Bytes that layers this plan builds provide.
    pub new_shared_bytes: u64,
    /// Bytes left in its private set.
    pub private_bytes: u64,
    /// Paths its private set hides from the layers below (whiteouts).
    pub whiteouts: u64,
}

/// Which layers to build, and what stays private to each VM. A value: it
/// serialises to JSON and back, for the partition builder to consume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Plan {
    pub policy: Policy,
    pub layers: Vec<PlannedLayer>,
    /// Per VM, the ids of its layers, bottom first.
    pub stacks: BTreeMap<String, Vec<String>>,
    /// Per VM, its private entries (path order).
    pub private: BTreeMap<String, Vec<Entry>>,
    /// Per VM, bytes of its private files.
    pub private_bytes: BTreeMap<String, u64>,
    /// Bytes stored in layers (each layer once).
    pub layer_bytes: u64,
    /// Layer bytes plus every private set: what the node stores.
    pub stored_bytes: u64,
    pub naive_bytes: u64,
    /// Per VM, paths of its private set that hide what its layers hold at
    /// that path and below (overlay whiteouts), path order.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub whiteouts: BTreeMap<String, Vec<String>>,
    /// Per VM, where its bytes come from.
    #[serde(default)]
    pub shares: BTreeMap<String, VmShare>,
}

fn file_bytes(e: &Entry) -> u64 {
    if e.kind == EntryKind::File { e.size } else { 0 }
}

/// Analyses the images of `vms` (name, entries).
pub fn analyze(vms: &[(String, Vec<Entry>)]) -> Result<Analysis, DedupError> {
    if vms.len() > MAX_VMS {
        return Err(DedupError::TooManyVms(vms.len()));
    }
    let mut seen = HashSet::new();
    for (name, entries) in vms {
        if !seen.insert(name) {
            return Err(DedupError::DuplicateVm(name.clone()));
        }
        let mut paths = HashSet::new();
        for e in entries {
            if !paths.insert(&e.path) {
                return Err(DedupError::DuplicatePath { vm: name.clone(), path: e.path.clone() });
            }
        }
    }

    // File → the VMs holding exactly it (indices, ascending).
    let mut holders: HashMap<FileKey, Vec<usize>> = HashMap::new();
    for (i, (_, entries)) in vms.iter().enumerate() {
        for e in entries.iter().filter(|e| e.kind != EntryKind::Dir) {
            holders.entry(FileKey::of(e)).or_default().push(i);
        }
    }
    // Group shared files by VM set.
    let mut groups: BTreeMap<Vec<usize>, BTreeSet<FileKey>> = BTreeMap::new();
    for (key, set) in holders {
        if set.len() >= 2 {
            groups.entry(set).or_default().insert(key);
        }
    }
    let by_path: Vec<HashMap<&str, &Entry>> =
        vms.iter().map(|(_, es)| es.iter().map(|e| (e.path.as_str(), e)).collect()).collect();

    let mut layers = Vec::new();
    let mut in_layer: Vec<HashSet<String>> = vec![HashSet::new(); vms.len()];
    let mut shared_once = 0u64;
    let mut shared_copies = 0u64;
    let mut per_vm_shared = vec![0u64; vms.len()];
    for (set, keys) in groups {
        let first = set.first().copied().unwrap_or(0);
        let mut entries = Vec::with_capacity(keys.len());
        let mut bytes = 0;
        for key in &keys {
            if let Some(e) = by_path.get(first).and_then(|m| m.get(key.path.as_str())) {
                bytes += file_bytes(e);
                entries.push((*e).clone());
            }
            for &vm in &set {
                if let Some(paths) = in_layer.get_mut(vm) {
                    paths.insert(key.path.clone());
                }
            }
        }
        shared_once += bytes;
        shared_copies += bytes * set.len() as u64;
        for &vm in &set {
            if let Some(s) = per_vm_shared.get_mut(vm) {
                *s += bytes;
            }
        }
        layers.push(Layer {
            vms: set.iter().filter_map(|&i| vms.get(i).map(|v| v.0.clone())).collect(),
            files: entries.len() as u64,
            bytes,
            entries,
        });
    }
    layers.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.vms.cmp(&b.vms)));

    let mut private = BTreeMap::new();
    let mut per_vm = Vec::new();
    let mut naive = 0u64;
    let mut contents: HashMap<Hash, u64> = HashMap::new();
    for (i, (name, entries)) in vms.iter().enumerate() {
        let empty = HashSet::new();
        let shared_paths = in_layer.get(i).unwrap_or(&empty);
        let own: Vec<Entry> =
            entries.iter().filter(|e| !shared_paths.contains(&e.path)).cloned().collect();
        let bytes: u64 = entries.iter().map(file_bytes).sum();
        naive += bytes;
        for e in entries.iter().filter(|e| e.kind == EntryKind::File) {
            if let Some(h) = e.hash {
                contents.insert(h, e.size);
            }
        }
        per_vm.push(VmFigures {
            vm: name.clone(),
            bytes,
            shared_bytes: per_vm_shared.get(i).copied().unwrap_or(0),
        });
        private.insert(name.clone(), sorted(own));
    }

    Ok(Analysis {
        vms: vms.iter().map(|v| v.0.clone()).collect(),
        layers,
        per_vm,
        naive_bytes: naive,
        distinct_content_bytes: contents.values().sum(),
        shared_once_bytes: shared_once,
        shared_as_copies_bytes: shared_copies,
        private,
        images: vms
            .iter()
            .map(|(name, es)| {
                (name.clone(), es.iter().map(|e| (e.path.clone(), e.clone())).collect())
            })
            .collect(),
    })
}

fn sorted(mut entries: Vec<Entry>) -> Vec<Entry> {
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    entries
}

impl Analysis {
    /// Chooses the layers to build under `policy`.
    pub fn plan(&self, policy: &Policy) -> Plan {
        let room = self.vms.iter().map(|v| (v.clone(), policy.max_layers_per_vm)).collect();
        let mut plan = self.plan_with_room(policy, &room);
        overlay::finish(&mut plan, &self.images);
        plan
    }

    /// [`Analysis::plan`] where each VM may take at most `room[vm]` layers
    /// (fewer than the policy's when it already stacks some), before the
    /// private sets are checked against the images.
    pub(crate) fn plan_with_room(&self, policy: &Policy, room: &BTreeMap<String, usize>) -> Plan {
        let room_of = |vm: &str| room.get(vm).copied().unwrap_or(0);
        let mut stacks: BTreeMap<String, Vec<String>> =
            self.vms.iter().map(|v| (v.clone(), Vec::new())).collect();
        let mut private = self.private.clone();
        let mut layers = Vec::new();
        for layer in &self.layers {
            let fits = layer.bytes >= policy.min_layer_bytes
                && layer.vms.iter().all(|vm| stacks.get(vm).is_some_and(|s| s.len() < room_of(vm)));
            if fits {
                let id = format!("layer-{}", layers.len());
                for vm in &layer.vms {
                    if let Some(s) = stacks.get_mut(vm) {
                        s.push(id.clone());
                    }
                }
                layers.push(PlannedLayer {
                    id,
                    vms: layer.vms.clone(),
                    files: layer.files,
                    bytes: layer.bytes,
                    entries: layer.entries.clone(),
                    node: None,
                });
            } else {
                // Folded away: every VM of the set keeps its own copy, with
                // its own modification time.
                for vm in &layer.vms {
                    let (Some(own), Some(image)) = (private.get_mut(vm), self.images.get(vm))
                    else {
                        continue;
                    };
                    own.extend(layer.entries.iter().filter_map(|e| image.get(&e.path).cloned()));
                }
            }
        }
        if policy.share_across_paths {
            self.alias_layers(&room_of, policy, &mut layers, &mut stacks, &mut private);
        }
        if policy.layer_unique_files {
            unique_layers(&room_of, policy, &mut layers, &mut stacks, &mut private);
        }
        let mut private_bytes = BTreeMap::new();
        for (vm, own) in private.iter_mut() {
            *own = sorted(std::mem::take(own));
            private_bytes.insert(vm.clone(), own.iter().map(file_bytes).sum());
        }
        // Each content (with its mode and owner) counts once however many
        // layers hold it: the shared partition stores it once.
        let layer_bytes: u64 = if policy.share_across_paths {
            let mut seen: HashMap<ContentKey, u64> = HashMap::new();
            for e in layers.iter().flat_map(|l| &l.entries) {
                if let (Some(k), EntryKind::File) = (content_key(e), e.kind) {
                    seen.insert(k, e.size);
                }
            }
            seen.values().sum()
        } else {
            layers.iter().map(|l| l.bytes).sum()
        };
        let stored = layer_bytes + private_bytes.values().sum::<u64>();
        Plan {
            policy: policy.clone(),
            layers,
            stacks,
            private,
            private_bytes,
            layer_bytes,
            stored_bytes: stored,
            naive_bytes: self.naive_bytes,
            whiteouts: BTreeMap::new(),
            shares: BTreeMap::new(),
        }
    }
}

/// Moves each VM's remaining private files into a layer of its own, where
/// it has room for one more layer and they weigh at least the minimum.
/// Directories are not layered (see the crate's documentation).
fn unique_layers(
    room_of: &dyn Fn(&str) -> usize,
    policy: &Policy,
    layers: &mut Vec<PlannedLayer>,
    stacks: &mut BTreeMap<String, Vec<String>>,
    private: &mut BTreeMap<String, Vec<Entry>>,
) {
    for (vm, own) in private.iter_mut() {
        let Some(stack) = stacks.get_mut(vm) else { continue };
        if stack.len() >= room_of(vm) {
            continue;
        }
        let (files, dirs): (Vec<Entry>, Vec<Entry>) =
            std::mem::take(own).into_iter().partition(|e| e.kind != EntryKind::Dir);
        let bytes: u64 = files.iter().map(file_bytes).sum();
        if files.is_empty() || bytes < policy.min_layer_bytes.max(1) {
            *own = dirs.into_iter().chain(files).collect();
            continue;
        }
        *own = dirs;
        let id = format!("layer-{}", layers.len());
        stack.push(id.clone());
        layers.push(PlannedLayer {
            id,
            vms: vec![vm.clone()],
            files: files.len() as u64,
            bytes,
            entries: sorted(files),
            node: None,
        });
    }
}

impl Analysis {
    /// Moves into one alias layer per VM the files of its private set whose
    /// content, mode and owner another VM's private set or a kept layer also
    /// holds, where the VM has room for one more layer.
    fn alias_layers(
        &self,
        room_of: &dyn Fn(&str) -> usize,
        policy: &Policy,
        layers: &mut Vec<PlannedLayer>,
        stacks: &mut BTreeMap<String, Vec<String>>,
        private: &mut BTreeMap<String, Vec<Entry>>,
    ) {
        let in_layers: HashSet<ContentKey> =
            layers.iter().flat_map(|l| &l.entries).filter_map(content_key).collect();
        let mut holders: HashMap<ContentKey, BTreeSet<&str>> = HashMap::new();
        for (vm, own) in private.iter() {
            for k in own.iter().filter_map(content_key) {
                holders.entry(k).or_default().insert(vm.as_str());
            }
        }
        let recurring: HashSet<ContentKey> = holders
            .into_iter()
            .filter(|(k, vms)| vms.len() >= 2 || in_layers.contains(k))
            .map(|(k, _)| k)
            .collect();
        for (vm, own) in private.iter_mut() {
            let Some(stack) = stacks.get_mut(vm) else { continue };
            if stack.len() >= room_of(vm) {
                continue;
            }
            let (alias, keep): (Vec<Entry>, Vec<Entry>) = std::mem::take(own)
                .into_iter()
                .partition(|e| content_key(e).is_some_and(|k| recurring.contains(&k)));
            let bytes: u64 = alias.iter().map(file_bytes).sum();
            if alias.is_empty() || bytes < policy.min_layer_bytes {
                *own = keep.into_iter().chain(alias).collect();
                continue;
            }
            *own = keep;
            let id = format!("layer-{}", layers.len());
            stack.push(id.clone());
            layers.push(PlannedLayer {
                id,
                vms: vec![vm.clone()],
                files: alias.iter().filter(|e| e.kind == EntryKind::File).count() as u64,
                bytes,
                entries: sorted(alias),
                node: None,
            });
        }
    }
}

impl Plan {
    /// The same plan with VM `from` called `to`: a plan of one VM serves
    /// another VM of the same image, since names take no part in what is
    /// shared. `None` when the plan has no VM `from` or already one `to`.
    pub fn renamed(&self, from: &str, to: &str) -> Option<Plan> {
        if !self.stacks.contains_key(from) || (from != to && self.stacks.contains_key(to)) {
            return None;
        }
        fn rekey<V: Clone>(map: &BTreeMap<String, V>, from: &str, to: &str) -> BTreeMap<String, V> {
            map.iter()
                .map(|(k, v)| (if k == from { to.to_string() } else { k.clone() }, v.clone()))
                .collect()
        }
        let mut plan = Plan {
            policy: self.policy.clone(),
            layers: self.layers.clone(),
            stacks: rekey(&self.stacks, from, to),
            private: rekey(&self.private, from, to),
            private_bytes: rekey(&self.private_bytes, from, to),
            layer_bytes: self.layer_bytes,
            stored_bytes: self.stored_bytes,
            naive_bytes: self.naive_bytes,
            whiteouts: rekey(&self.whiteouts, from, to),
            shares: rekey(&self.shares, from, to),
        };
        for layer in &mut plan.layers {
            for vm in &mut layer.vms {
                if vm == from {
                    *vm = to.to_string();
                }
            }
        }
        Some(plan)
    }

    /// Host memory the plan holds, estimated from its entries (each its
    /// struct plus the text it owns) and whiteout paths: what a host that
    /// keeps plans for later calls bounds.
    pub fn held_bytes(&self) -> u64 {
        let entry = |e: &Entry| {
            (std::mem::size_of::<Entry>()
                + e.path.len()
                + e.link_target.as_ref().map_or(0, String::len)) as u64
        };
        let layers: u64 = self.layers.iter().flat_map(|l| &l.entries).map(entry).sum();
        let private: u64 = self.private.values().flatten().map(entry).sum();
        let whiteouts: u64 = self
            .whiteouts
            .values()
            .flatten()
            .map(|p| (std::mem::size_of::<String>() + p.len()) as u64)
            .sum();
        layers + private + whiteouts
    }

    /// A VM's root as its layers and private set give it back, with the
    /// overlay's rules: layers bottom up, each hiding what lies below it at
    /// its paths (a file hides a directory's whole tree, the directories a
    /// layer's files sit in hide a file at that path), then the private
    /// set on top with its whiteouts. Directories that only a layer
    /// implies appear as root-owned 0755 directories. `None` for an
    /// unknown VM.
    pub fn reassemble(&self, vm: &str) -> Option<Vec<Entry>> {
        let stack = self.stacks.get(vm)?;
        let lowers: Vec<&[Entry]> = stack
            .iter()
            .filter_map(|id| self.layers.iter().find(|l| &l.id == id))
            .map(|l| l.entries.as_slice())
            .collect();
        let empty = Vec::new();
        let whiteouts = self.whiteouts.get(vm).unwrap_or(&empty);
        let view = overlay_view(&lowers, self.private.get(vm)?, whiteouts);
        Some(view.entries())
    }

    /// The node's shared partitions a VM's stack reaches, in the order its
    /// layers first use them.
    pub fn node_partitions(&self, vm: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for id in self.stacks.get(vm).into_iter().flatten() {
            if let Some(node) =
                self.layers.iter().find(|l| &l.id == id).and_then(|l| l.node.as_ref())
                && !out.contains(&node.partition)
            {
                out.push(node.partition.clone());
            }
        }
        out
    }
}
