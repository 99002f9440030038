//! Partitions built from a sharing plan, and their verification.
//!
//! The method stores the files several VMs share once, on a **shared
//! partition** every one of those VMs can reach, and gives each VM a
//! **private partition** with only its own files. Here both are built from
//! a [`provd_dedup::Plan`] and the images in the content store:
//!
//! ```text
//! shared (read-only; EROFS, EROFS+lz4/lz4hc, ext4, or a directory for virtio-fs)
//!   provd-shared.json            the layers and the VMs of each
//!   layers/<layer-id>/<path>     each layer's files at their real paths;
//!                                identical files hard-linked, stored once
//! private (writable ext4, raw or qcow2), one per VM
//!   upper/<path>                 the VM's own files and every directory
//!   work/                        overlayfs work directory
//!   provd/stack                  its layers, bottom first, one per line
//!   provd/shared                 fstype= and device= of the shared partition
//!   provd/partition.json         what the partition was built from
//!   provd/provd-overlay-root     the initramfs-tools script that stacks them
//! ```
//!
//! At boot the guest's initramfs mounts the private partition as its root
//! device; the script (see `assets/provd-overlay-root`) moves it aside,
//! mounts the shared partition read-only and mounts an overlay — the
//! VM's layers below, `upper/` on top — as the root. A file the VM changes
//! is copied up into its private partition; the shared one never changes.
//!
//! A build stages a tree in a directory the store registered (files copied
//! from the content store with `copy_file_range`, ownership and modes set),
//! runs the filesystem builder on it, deletes the tree, and publishes the
//! result with [`provd_store::Store::publish_partition`]: a partition is
//! visible whole or not at all, and a failure at any step removes the
//! build directory. Verification ([`verify_vm`]) reads the built images
//! with this crate's own readers, never a mount.

mod customize;
// The formats live in provd-formats; their paths here stay as they were.
pub use provd_formats::{erofs, erofs_writer, ext4, ext4_writer, reader};
pub mod repack;
mod stage;
mod tools;
mod verify;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use provd_dedup::Plan;
use provd_domain::image::{Entry, EntryKind};
use provd_store::{
    ImageRecord, NewLayer, NewPartition, PartitionRecord, StackedLayer, Store, StoreError,
};

pub use customize::{AddedFile, MAX_ADDED_FILE_BYTES, add_file};
pub use tools::DEFAULT_TOOL_DIRS;
pub use verify::{Verification, verify_vm};

use stage::{Deferred, Specials, Stager};
use tools::{DEBUGFS, MKE2FS, MKFS_EROFS, QEMU_IMG, Tools};

/// Most layers one VM may stack. The guest mounts its overlay with one
/// `mount(2)` call whose options must fit in a page (4096 bytes); with the
/// shared partition at `/run/provd/s` each lower directory takes at most 30
/// bytes (`/run/provd/s/layers/layer-127:`), so 128 layers leave room for
/// the upper and work directories.
pub const MAX_LAYERS_PER_VM: usize = 128;

/// The boot script installed into guests, also written into every private
/// partition.
pub const OVERLAY_ROOT_SCRIPT: &str = include_str!("../assets/provd-overlay-root");

/// Why a build or a verification failed.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// a file operation failed
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// the build lacks a privilege it needs (root: chown, mknod)
    #[error("{what}: {source} (building partitions needs CAP_CHOWN, CAP_FOWNER and CAP_MKNOD)")]
    Privilege { what: String, source: std::io::Error },
    /// the store failed
    #[error(transparent)]
    Store(#[from] StoreError),
    /// a filesystem tool is not installed
    #[error("{tool} not found: install the Debian package {package}")]
    MissingTool { tool: &'static str, package: &'static str },
    /// a filesystem tool failed
    #[error("{tool} failed ({status}): {stderr}")]
    ToolFailed { tool: &'static str, status: String, stderr: String },
    /// an entry cannot be written to the partition
    #[error("entry {path:?}: {reason}")]
    InvalidEntry { path: String, reason: String },
    /// the plan does not describe the images it is applied to
    #[error("the plan does not match the image of VM {vm:?}: {reason}")]
    PlanMismatch { vm: String, reason: String },
    /// the plan itself is malformed
    #[error("invalid plan: {0}")]
    InvalidPlan(String),
    /// a VM stacks more layers than an overlay can mount
    #[error("VM {vm:?} stacks {layers} layers; at most {max} can be mounted as one overlay")]
    TooManyLayers { vm: String, layers: usize, max: usize },
    /// a VM would stack layers from more shared partitions than it attaches
    #[error(
        "VM {vm:?} would attach {partitions} shared partitions; at most {max} are attached to one VM"
    )]
    TooManyShared { vm: String, partitions: usize, max: usize },
    /// the partitions would exceed the caller's byte quota
    #[error("{what} needs {needed} bytes; the quota leaves {quota}")]
    QuotaExceeded { what: String, needed: u64, quota: u64 },
    /// the node's disk cannot hold the build
    #[error("{what} needs {needed} bytes of free space; {free} are free beyond the reserve")]
    DiskFull { what: String, needed: u64, free: u64 },
    /// the requested size cannot hold the content
    #[error("a private partition of {requested} bytes cannot hold VM {vm:?}'s {needed} bytes")]
    TooSmall { vm: String, requested: u64, needed: u64 },
    /// a partition the request names does not exist or does not fit
    #[error("{0}")]
    NotFound(String),
    /// an unknown format name
    #[error("unknown {role} partition format {name:?}; expected one of {expected}")]
    UnknownFormat { role: &'static str, name: String, expected: &'static str },
    /// the plan has no layer to put on a shared partition
    #[error("the plan keeps no layer, so there is nothing to put on a shared partition")]
    NothingShared,
    /// the request the build served ended first; its result was removed
    #[error("the request ended before the build did; its partition was removed")]
    Cancelled,
    /// an image could not be read back
    #[error("reading partition {partition}: {reason}")]
    Unreadable { partition: String, reason: String },
    /// a VM would stack a partition of a trust domain its tenant may not see
    #[error(
        "VM {vm:?} of tenant {tenant:?} may not stack shared partition {partition} (domain {domain}); \
         a VM stacks only public layers and its own tenant's"
    )]
    OtherDomain { vm: String, tenant: String, partition: String, domain: String },
}

/// Formats of the shared partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SharedFormat {
    /// EROFS, uncompressed.
    Erofs,
    /// EROFS with lz4 compression (fast to build).
    ErofsLz4,
    /// EROFS with lz4hc compression (smaller, slower to build).
    ErofsLz4hc,
    /// ext4 without a journal.
    Ext4,
    /// A plain directory, for export over virtio-fs.
    Dir,
}

impl SharedFormat {
    pub const NAMES: &'static str = "erofs, erofs-lz4, erofs-lz4hc, ext4, dir";

    pub fn as_str(self) -> &'static str {
        match self {
            SharedFormat::Erofs => "erofs",
            SharedFormat::ErofsLz4 => "erofs-lz4",
            SharedFormat::ErofsLz4hc => "erofs-lz4hc",
            SharedFormat::Ext4 => "ext4",
            SharedFormat::Dir => "dir",
        }
    }

    pub fn parse(name: &str) -> Result<SharedFormat, PartitionError> {
        [
            SharedFormat::Erofs,
            SharedFormat::ErofsLz4,
            SharedFormat::ErofsLz4hc,
            SharedFormat::Ext4,
            SharedFormat::Dir,
        ]
        .into_iter()
        .find(|f| f.as_str() == name)
        .ok_or_else(|| PartitionError::UnknownFormat {
            role: "shared",
            name: name.to_string(),
            expected: Self::NAMES,
        })
    }

    fn file_name(self) -> &'static str {
        match self {
            SharedFormat::Erofs | SharedFormat::ErofsLz4 | SharedFormat::ErofsLz4hc => {
                "shared.erofs"
            }
            SharedFormat::Ext4 => "shared.ext4",
            SharedFormat::Dir => "tree",
        }
    }

    /// The `fstype` a guest mounts it with.
    fn fstype(self) -> &'static str {
        match self {
            SharedFormat::Erofs | SharedFormat::ErofsLz4 | SharedFormat::ErofsLz4hc => "erofs",
            SharedFormat::Ext4 => "ext4",
            SharedFormat::Dir => "virtiofs",
        }
    }
}

/// Formats of a private partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrivateFormat {
    /// A raw ext4 image (sparse).
    Ext4,
    /// The same ext4 filesystem in a qcow2 container.
    Qcow2,
}

impl PrivateFormat {
    pub const NAMES: &'static str = "ext4, qcow2";

    pub fn as_str(self) -> &'static str {
        match self {
            PrivateFormat::Ext4 => "ext4",
            PrivateFormat::Qcow2 => "qcow2",
        }
    }

    pub fn parse(name: &str) -> Result<PrivateFormat, PartitionError> {
        match name {
            "ext4" => Ok(PrivateFormat::Ext4),
            "qcow2" => Ok(PrivateFormat::Qcow2),
            _ => Err(PartitionError::UnknownFormat {
                role: "private",
                name: name.to_string(),
                expected: Self::NAMES,
            }),
        }
    }
}

/// What every build takes besides the plan.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The operation the partition belongs to.
    pub operation: Option<String>,
    /// Most bytes (size a guest sees) the build may create.
    pub quota_bytes: u64,
    /// Where the filesystem tools are looked for.
    pub tool_dirs: Vec<PathBuf>,
    /// Longest one run of a filesystem tool may take before it is killed
    /// and the build fails (default 30 minutes).
    pub tool_timeout: std::time::Duration,
    /// The trust domain of what is built (`provd_domain::trust`): a shared
    /// partition's layers, or the tenant of a private partition's VM, whose
    /// stack may then reach only `public` and its own domain.
    pub domain: String,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            operation: None,
            quota_bytes: u64::MAX,
            tool_dirs: DEFAULT_TOOL_DIRS.iter().map(PathBuf::from).collect(),
            tool_timeout: std::time::Duration::from_secs(30 * 60),
            domain: provd_domain::trust::LEGACY_DOMAIN.to_string(),
        }
    }
}

impl BuildOptions {
    fn tools(&self) -> Tools {
        Tools { dirs: self.tool_dirs.clone(), timeout: self.tool_timeout }
    }
}

/// One layer as the shared partition's manifest names it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerInfo {
    pub id: String,
    pub vms: Vec<String>,
    pub files: u64,
    pub bytes: u64,
    /// BLAKE3 over the layer's entries ([`layer_digest`]): a private
    /// partition stacks a layer only if its plan has exactly this one.
    #[serde(default)]
    pub digest: String,
}

/// BLAKE3 over a layer's entries as a partition reproduces them, in path
/// order.
pub fn layer_digest(entries: &[Entry]) -> String {
    let mut ids: Vec<Entry> = entries.iter().map(identity).collect();
    ids.sort_by(|a, b| a.path.cmp(&b.path));
    let mut h = blake3::Hasher::new();
    for e in &ids {
        let line = serde_json::to_string(e).unwrap_or_default();
        h.update(&(line.len() as u64).to_le_bytes());
        h.update(line.as_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// `provd-shared.json`, also the shared partition's database manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedManifest {
    pub partition: String,
    pub format: SharedFormat,
    /// Filesystem UUID (none for a directory).
    pub uuid: Option<String>,
    pub layers: Vec<LayerInfo>,
}

/// Where a private partition finds one of its shared partitions.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedRef {
    pub partition: String,
    pub format: SharedFormat,
    pub uuid: Option<String>,
}

/// One layer of a private partition's stack.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackItem {
    /// Index into the manifest's `shared` list.
    pub shared: usize,
    /// The layer's directory on that partition: `layers/<layer>`.
    pub layer: String,
    /// Its digest ([`layer_digest`]); empty in manifests written before
    /// layers were node-wide.
    #[serde(default)]
    pub digest: String,
}

/// Most shared partitions one VM attaches: each is a disk (or a virtio-fs
/// export) of its hypervisor and a mount in its initramfs. Well below what
/// libvirt, Cloud Hypervisor and Firecracker attach, so that a VM keeps
/// room for its data disks; a plan never reaches past it (the files of
/// layers on further partitions are stored again).
pub const MAX_SHARED_PER_VM: usize = provd_dedup::DEFAULT_MAX_SHARED_PARTITIONS;

/// Reads `shared` as a list, or as the single partition (or null) that
/// manifests held before layers were node-wide.
fn shared_refs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SharedRef>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Any {
        Many(Vec<SharedRef>),
        One(SharedRef),
    }
    Ok(match <Option<Any> as serde::Deserialize>::deserialize(d)? {
        None => Vec::new(),
        Some(Any::Many(v)) => v,
        Some(Any::One(one)) => vec![one],
    })
}

/// Reads `stack` as items, or as the layer ids (all on one shared
/// partition) that manifests held before.
fn stack_items<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<StackItem>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Item {
        Legacy(String),
        Now(StackItem),
    }
    let items = <Vec<Item> as serde::Deserialize>::deserialize(d)?;
    Ok(items
        .into_iter()
        .map(|i| match i {
            Item::Legacy(layer) => StackItem { shared: 0, layer, digest: String::new() },
            Item::Now(item) => item,
        })
        .collect())
}

/// `provd/partition.json`, also the private partition's database manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivateManifest {
    pub partition: String,
    pub vm: String,
    pub format: PrivateFormat,
    pub uuid: String,
    /// The image the VM's files come from, and its digest at build time.
    pub image: String,
    pub image_digest: String,
    /// The shared partitions its layers are on, in the order the boot
    /// script mounts them.
    #[serde(deserialize_with = "shared_refs")]
    pub shared: Vec<SharedRef>,
    /// Its layers, bottom first.
    #[serde(deserialize_with = "stack_items")]
    pub stack: Vec<StackItem>,
    /// Paths of its image's root where it hides what its layers hold.
    #[serde(default)]
    pub whiteouts: u64,
    /// Files added after the build, in the VM's root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added: Vec<AddedFile>,
}

impl PrivateManifest {
    /// Its stack as (shared partition, layer) pairs, bottom first.
    pub fn stack_names(&self) -> Vec<(String, String)> {
        self.stack
            .iter()
            .map(|i| {
                let partition = self.shared.get(i.shared).map(|r| r.partition.clone());
                (partition.unwrap_or_default(), i.layer.clone())
            })
            .collect()
    }

    /// Whether its boot files take the one-partition format (`fstype=` and
    /// `device=` lines, bare layer names): whenever it stacks at most one
    /// shared partition. Guests whose initramfs carries the boot script of
    /// an earlier provd read only that format, so a VM on one shared
    /// partition (every VM after a repack) boots with either script; only
    /// a VM on several needs the current one.
    fn one_partition_format(&self) -> bool {
        self.shared.len() <= 1
    }
}

/// How a guest finds a shared partition: the fstype and the device (or
/// virtio-fs tag) it mounts.
fn mount_source(s: &SharedRef) -> (&'static str, String) {
    if s.format == SharedFormat::Dir {
        ("virtiofs", format!("provd-{}", s.partition))
    } else {
        (s.format.fstype(), format!("/dev/disk/by-uuid/{}", s.uuid.as_deref().unwrap_or_default()))
    }
}

/// `provd/stack` of a private partition: its layers, bottom first, one
/// `<shared index> <layer>` per line (bare layer names on one partition).
pub(crate) fn stack_file(m: &PrivateManifest) -> String {
    if m.one_partition_format() {
        return m.stack.iter().map(|s| format!("{}\n", s.layer)).collect();
    }
    m.stack.iter().map(|s| format!("{} {}\n", s.shared, s.layer)).collect()
}

/// `provd/shared` of a private partition: how its guest finds each shared
/// partition, one `<index> <fstype> <device>` per line (`fstype=` and
/// `device=` lines for one partition).
pub(crate) fn shared_file(m: &PrivateManifest) -> String {
    if m.one_partition_format() {
        return match m.shared.first() {
            None => String::new(),
            Some(s) => {
                let (fstype, device) = mount_source(s);
                format!("fstype={fstype}\ndevice={device}\n")
            }
        };
    }
    m.shared
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (fstype, device) = mount_source(s);
            format!("{i} {fstype} {device}\n")
        })
        .collect()
}

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
fn new_layers(plan: &Plan) -> impl Iterator<Item = &provd_dedup::PlannedLayer> {
    plan.layers.iter().filter(|l| l.node.is_none())
}

/// A VM and its image.
#[derive(Debug, Clone)]
pub struct VmImage {
    pub vm: String,
    pub image: ImageRecord,
}

/// A filesystem UUID derived from the partition id, so a rebuild of the
/// same partition keeps it and two partitions never share one.
fn uuid_bytes(id: &str) -> [u8; 16] {
    let h = blake3::hash(id.as_bytes());
    let mut bytes = [0u8; 16];
    for (out, b) in bytes.iter_mut().zip(h.as_bytes()) {
        *out = *b;
    }
    // RFC 4122 version 4 and variant bits.
    if let Some(b) = bytes.get_mut(6) {
        *b = (*b & 0x0f) | 0x40;
    }
    if let Some(b) = bytes.get_mut(8) {
        *b = (*b & 0x3f) | 0x80;
    }
    bytes
}

fn uuid_for(id: &str) -> String {
    let bytes = uuid_bytes(id);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        hex.get(0..8).unwrap_or(""),
        hex.get(8..12).unwrap_or(""),
        hex.get(12..16).unwrap_or(""),
        hex.get(16..20).unwrap_or(""),
        hex.get(20..32).unwrap_or("")
    )
}

fn valid_layer_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// An entry as a partition can reproduce it: the modification time is not
/// part of a file's identity (see the dedup crate), and a hard link is a
/// regular file with its target's content.
fn identity(e: &Entry) -> Entry {
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

/// Deletes a build directory unless the build published it.
struct BuildDir<'s> {
    store: &'s Store,
    name: String,
    path: PathBuf,
    published: bool,
    /// Taken before anything of the build is written, for its sync.
    point: provd_store::SyncPoint,
}

impl<'s> BuildDir<'s> {
    fn new(store: &'s Store) -> Result<BuildDir<'s>, PartitionError> {
        let point = store.sync_point()?;
        let (name, path) = store.create_temp_dir()?;
        Ok(BuildDir { store, name, path, published: false, point })
    }

    fn stager(&self, specials: Specials) -> Result<Stager<'s>, PartitionError> {
        let staging = self.store.staging_dir();
        let io = |e| PartitionError::Io { what: "creating the staging tree".into(), source: e };
        staging.create_dir(format!("{}/tree", self.name)).map_err(io)?;
        let root = staging.open_dir(format!("{}/tree", self.name)).map_err(io)?;
        Ok(Stager::new(self.store, root, specials))
    }

    fn remove_tree(&self) -> Result<(), PartitionError> {
        self.store
            .staging_dir()
            .remove_dir_all(format!("{}/tree", self.name))
            .map_err(|e| PartitionError::Io { what: "removing the staging tree".into(), source: e })
    }

    fn publish(mut self, new: &NewPartition) -> Result<PartitionRecord, PartitionError> {
        let rec = self.store.publish_partition(&self.name, new, &self.point)?;
        self.published = true;
        Ok(rec)
    }
}

impl Drop for BuildDir<'_> {
    fn drop(&mut self) {
        if !self.published {
            self.store.remove_temp(&self.name);
        }
    }
}

/// Bytes allocated to a file or, for a directory, to everything under it
/// (each inode once).
fn allocated(path: &std::path::Path) -> Result<(u64, u64), PartitionError> {
    use std::os::unix::fs::MetadataExt;
    let io = |e| PartitionError::Io { what: format!("measuring {}", path.display()), source: e };
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    if !meta.is_dir() {
        return Ok((meta.blocks() * 512, meta.len()));
    }
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let m = entry.metadata().map_err(io)?;
            if seen.insert(m.ino()) {
                total += m.blocks() * 512;
            }
            if m.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((total, total))
}

fn check_room(
    store: &Store,
    what: &str,
    needed: u64,
    apparent: u64,
    opts: &BuildOptions,
) -> Result<(), PartitionError> {
    if apparent > opts.quota_bytes {
        return Err(PartitionError::QuotaExceeded {
            what: what.to_string(),
            needed: apparent,
            quota: opts.quota_bytes,
        });
    }
    let free = store.free_bytes()?.saturating_sub(store.min_free_bytes);
    if needed > free {
        return Err(PartitionError::DiskFull { what: what.to_string(), needed, free });
    }
    Ok(())
}

/// Inodes of a private partition holding `staged` inodes: room for the
/// files the guest will create.
fn private_inodes(staged: u64) -> u64 {
    staged.saturating_mul(2).max(staged.saturating_add(16384))
}

/// Size of a writable ext4 for `data_blocks` of content and `inodes`
/// inodes (256 bytes each), with mke2fs's journal (at most 64 MiB below
/// 16 GiB, 256 MiB above).
fn private_bytes(data_blocks: u64, inodes: u64) -> u64 {
    let base = ext4_bytes(data_blocks, inodes);
    let journal: u64 = if base > (16 << 30) { 256 << 20 } else { 64 << 20 };
    base.saturating_add(journal)
}

/// ext4 image size for `data_blocks` of content in `inodes` inodes, with
/// room for the filesystem's own metadata.
fn ext4_bytes(data_blocks: u64, inodes: u64) -> u64 {
    let data = data_blocks.saturating_mul(4096);
    let size = data
        .saturating_add(data / 16)
        .saturating_add(inodes.saturating_mul(256 + 64))
        .saturating_add(32 << 20);
    size.checked_next_multiple_of(4 << 20).unwrap_or(size)
}

fn write_small(
    dir: &cap_std::fs::Dir,
    name: &str,
    text: &str,
    mode: u32,
) -> Result<(), PartitionError> {
    use cap_std::fs::PermissionsExt;
    let io = |e| PartitionError::Io { what: format!("writing {name}"), source: e };
    dir.write(name, text).map_err(io)?;
    dir.set_permissions(name, cap_std::fs::Permissions::from_mode(mode)).map_err(io)
}

/// Hard links to one inode before a new one is started: below ext4's limit
/// of 65000 and EROFS's compact-inode limit of 65535.
const MAX_LINKS_PER_INODE: u32 = 60_000;

/// Writes the shared partition of `plan` as an uncompressed EROFS image
/// straight from the store: every file with the same content, mode and
/// owner is one inode, layer directories are 0755 root.
fn write_shared_erofs(
    store: &Store,
    plan: &Plan,
    image: &std::path::Path,
    id: &str,
    manifest_json: &str,
) -> Result<erofs_writer::WriteFigures, PartitionError> {
    use erofs_writer::{Content, Node};
    let mut inodes: std::collections::HashMap<
        (provd_domain::image::Hash, u32, u64, u64),
        (u64, u32),
    > = std::collections::HashMap::new();
    let mut next_inode = 0u64;
    let mut nodes =
        Vec::with_capacity(new_layers(plan).map(|l| l.entries.len()).sum::<usize>() + 1);
    let owner = |e: &Entry| -> Result<(u32, u32), PartitionError> {
        match (u32::try_from(e.uid), u32::try_from(e.gid)) {
            (Ok(u), Ok(g)) => Ok((u, g)),
            _ => Err(PartitionError::InvalidEntry {
                path: e.path.clone(),
                reason: format!("owner {}:{} does not fit in 32 bits", e.uid, e.gid),
            }),
        }
    };
    for layer in new_layers(plan) {
        for e in &layer.entries {
            let (uid, gid) = owner(e)?;
            let path = format!("layers/{}/{}", layer.id, e.path);
            let mode = e.mode & 0o7777;
            let mut node = Node {
                path,
                kind: e.kind,
                mode,
                uid,
                gid,
                mtime: e.mtime,
                size: 0,
                content: None,
                link_target: None,
                device: None,
                inode: None,
            };
            match e.kind {
                EntryKind::File | EntryKind::Hardlink => {
                    let hash = stage::content_hash(e)?;
                    let slot = inodes.entry((hash, mode, e.uid, e.gid)).or_insert((next_inode, 0));
                    if slot.1 >= MAX_LINKS_PER_INODE {
                        next_inode += 1;
                        *slot = (next_inode, 0);
                    }
                    if slot.0 == next_inode {
                        next_inode += 1;
                    }
                    slot.1 += 1;
                    node.kind = EntryKind::File;
                    node.size = e.size;
                    node.content = (e.size > 0).then_some(Content::Object(hash));
                    node.inode = Some(slot.0);
                }
                EntryKind::Symlink => node.link_target = e.link_target.clone(),
                EntryKind::CharDevice | EntryKind::BlockDevice => node.device = e.device,
                EntryKind::Fifo | EntryKind::Dir => {}
            }
            nodes.push(node);
        }
    }
    nodes.push(Node {
        path: "provd-shared.json".into(),
        kind: EntryKind::File,
        mode: 0o444,
        uid: 0,
        gid: 0,
        mtime: 0,
        size: manifest_json.len() as u64,
        content: Some(Content::Bytes(manifest_json.as_bytes().to_vec())),
        link_target: None,
        device: None,
        inode: None,
    });
    let mut open = |hash: &provd_domain::image::Hash| -> std::io::Result<std::fs::File> {
        store.open_object(hash).map(|f| f.into_std()).map_err(std::io::Error::other)
    };
    erofs_writer::write_image(image, &nodes, uuid_bytes(id), "provd-shared", 0, &mut open).map_err(
        |e| match e {
            erofs_writer::ErofsWriteError::Invalid { path, reason } => {
                PartitionError::InvalidEntry { path, reason }
            }
            other => PartitionError::Io {
                what: "writing the EROFS image".into(),
                source: std::io::Error::other(other.to_string()),
            },
        },
    )
}

/// Builds the shared partition of `plan` in `format` from the images of
/// `vms`, and publishes it.
pub fn build_shared(
    store: &Store,
    plan: &Plan,
    vms: &[VmImage],
    format: SharedFormat,
    opts: &BuildOptions,
) -> Result<PartitionRecord, PartitionError> {
    check_plan(store, plan, vms, None)?;
    if new_layers(plan).next().is_none() {
        return Err(PartitionError::NothingShared);
    }
    let tools = opts.tools();
    match format {
        SharedFormat::ErofsLz4 | SharedFormat::ErofsLz4hc => {
            tools.find(MKFS_EROFS)?;
        }
        SharedFormat::Erofs => {}
        SharedFormat::Ext4 => {
            tools.find(MKE2FS)?;
        }
        SharedFormat::Dir => {}
    }
    // Upper bound before anything is written: every layer byte copied once
    // into the tree and once into the image.
    let files: u64 = new_layers(plan).map(|l| l.files).sum();
    let estimate = ext4_bytes(plan.layer_bytes.div_ceil(4096) + files / 8, files);
    let needed = if format == SharedFormat::Dir { estimate } else { estimate * 2 };
    check_room(store, "the shared partition", needed, estimate, opts)?;

    let id = provd_store::new_partition_id();
    let uuid = (format != SharedFormat::Dir).then(|| uuid_for(&id));
    let started = std::time::Instant::now();
    let build = BuildDir::new(store)?;
    let manifest = SharedManifest {
        partition: id.clone(),
        format,
        uuid: uuid.clone(),
        layers: new_layers(plan)
            .map(|l| LayerInfo {
                id: l.id.clone(),
                vms: l.vms.clone(),
                files: l.files,
                bytes: l.bytes,
                digest: layer_digest(&l.entries),
            })
            .collect(),
    };
    let manifest_json = serde_json::to_string_pretty(&manifest)
        .map_err(|e| PartitionError::InvalidPlan(format!("encoding the manifest: {e}")))?;
    let image = build.path.join(format.file_name());
    if format == SharedFormat::Erofs {
        // Written straight from the store: no staging tree at all.
        let figures = write_shared_erofs(store, plan, &image, &id, &manifest_json)?;
        tracing::debug!(elapsed = ?started.elapsed(), ?figures, "shared image written");
        return finish_shared(build, plan, format, id, manifest_json, opts);
    }
    let specials = match format {
        SharedFormat::Ext4 => Specials::Defer,
        SharedFormat::Dir => Specials::Refuse,
        // mkfs.erofs 1.5 can only copy them from the tree; the tree is in a
        // root-only build directory and deleted as soon as mkfs is done.
        _ => Specials::Create,
    };
    let mut stager = build.stager(specials)?;
    for layer in new_layers(plan) {
        let prefix = format!("layers/{}/", layer.id);
        stager.dir(&format!("layers/{}", layer.id))?;
        for e in &layer.entries {
            stager.add(&format!("{prefix}{}", e.path), e)?;
        }
    }
    write_small(stager.dir("")?, "provd-shared.json", &manifest_json, 0o444)?;
    let deferred = std::mem::take(&mut stager.deferred);
    let figures = stager.finish()?;
    tracing::debug!(elapsed = ?started.elapsed(), ?figures, "shared tree staged");

    let tree = build.path.join("tree");
    match format {
        SharedFormat::Erofs | SharedFormat::ErofsLz4 | SharedFormat::ErofsLz4hc => {
            let mut args: Vec<std::ffi::OsString> = vec!["--quiet".into()];
            match format {
                SharedFormat::ErofsLz4 => args.push("-zlz4".into()),
                SharedFormat::ErofsLz4hc => args.push("-zlz4hc".into()),
                _ => {}
            }
            args.push(format!("-U{}", uuid.as_deref().unwrap_or_default()).into());
            args.push(image.clone().into());
            args.push(tree.clone().into());
            tools.run(MKFS_EROFS, args)?;
            build.remove_tree()?;
        }
        SharedFormat::Ext4 => {
            let size = ext4_bytes(figures.data_blocks, figures.inodes);
            check_room(store, "the shared partition", size, size, opts)?;
            mke2fs(
                &tools,
                &image,
                &tree,
                size,
                figures.inodes + 1024,
                "provd-shared",
                uuid.as_deref().unwrap_or_default(),
                false,
            )?;
            build.remove_tree()?;
            apply_deferred(&tools, &image, &deferred, &build.path)?;
        }
        SharedFormat::Dir => {}
    }
    tracing::debug!(elapsed = ?started.elapsed(), "shared image built");
    finish_shared(build, plan, format, id, manifest_json, opts)
}

/// Measures a built shared image and publishes it.
fn finish_shared(
    build: BuildDir<'_>,
    plan: &Plan,
    format: SharedFormat,
    id: String,
    manifest_json: String,
    opts: &BuildOptions,
) -> Result<PartitionRecord, PartitionError> {
    let image = build.path.join(format.file_name());
    let (bytes, apparent) = allocated(&image)?;
    if apparent > opts.quota_bytes {
        return Err(PartitionError::QuotaExceeded {
            what: "the shared partition".into(),
            needed: apparent,
            quota: opts.quota_bytes,
        });
    }
    // Its users are the stacks that will name its layers.
    let layers = new_layers(plan)
        .map(|l| NewLayer {
            name: l.id.clone(),
            digest: layer_digest(&l.entries),
            files: l.files,
            bytes: l.bytes,
            entries: l.entries.clone(),
        })
        .collect();
    build.publish(&NewPartition {
        id,
        role: "shared".into(),
        format: format.as_str().into(),
        file: format.file_name().into(),
        bytes,
        apparent_bytes: apparent,
        operation: opts.operation.clone(),
        manifest: manifest_json,
        vms: Vec::new(),
        layers,
        stack: Vec::new(),
        domain: opts.domain.clone(),
    })
}

/// Adds to an ext4 image what its staging tree left out (devices, FIFOs,
/// setuid and setgid bits) with `debugfs`, then reads the image back to
/// check every one: debugfs reports a failed command on stderr and still
/// exits 0.
fn apply_deferred(
    tools: &Tools,
    image: &std::path::Path,
    deferred: &[Deferred],
    scratch: &std::path::Path,
) -> Result<(), PartitionError> {
    if deferred.is_empty() {
        return Ok(());
    }
    tools.find(DEBUGFS)?;
    let mut script = String::new();
    for d in deferred {
        // debugfs takes double-quoted arguments but has no escape for a
        // quote inside one.
        if d.at.contains('"') || d.at.contains('\\') || d.at.chars().any(char::is_control) {
            return Err(PartitionError::InvalidEntry {
                path: d.at.clone(),
                reason: format!(
                    "a {} whose name holds a quote, a backslash or a control character cannot be written into ext4 here",
                    d.kind.as_str()
                ),
            });
        }
        let q = format!("\"/{}\"", d.at);
        // mknod takes a name in the current directory, not a path.
        let (parent, name) = d.at.rsplit_once('/').unwrap_or(("", d.at.as_str()));
        let at_parent = |args: String| format!("cd \"/{parent}\"\nmknod \"{name}\" {args}\ncd /\n");
        let (type_bits, make) = match (d.kind, d.device) {
            (EntryKind::Fifo, _) => (0o010000, at_parent("p".into())),
            (EntryKind::CharDevice, Some((ma, mi))) => {
                (0o020000, at_parent(format!("c {ma} {mi}")))
            }
            (EntryKind::BlockDevice, Some((ma, mi))) => {
                (0o060000, at_parent(format!("b {ma} {mi}")))
            }
            (EntryKind::File, _) => (0o100000, String::new()),
            (kind, _) => {
                return Err(PartitionError::InvalidEntry {
                    path: d.at.clone(),
                    reason: format!("a {} without what it needs", kind.as_str()),
                });
            }
        };
        script.push_str(&make);
        script.push_str(&format!(
            "sif {q} mode 0{:o}\nsif {q} uid {}\nsif {q} gid {}\n",
            type_bits | d.mode,
            d.uid,
            d.gid
        ));
    }
    let script_path = scratch.join("deferred.debugfs");
    std::fs::write(&script_path, script)
        .map_err(|e| PartitionError::Io { what: "writing the debugfs script".into(), source: e })?;
    let mut arg = std::ffi::OsString::from("-f");
    arg.push(&script_path);
    tools.run(DEBUGFS, [std::ffi::OsStr::new("-w"), arg.as_os_str(), image.as_os_str()])?;
    let unreadable = |e: ext4::Ext4Error| PartitionError::Unreadable {
        partition: image.display().to_string(),
        reason: e.to_string(),
    };
    let entries =
        ext4::Ext4Image::open(image).and_then(|fs| fs.entries(true)).map_err(unreadable)?;
    let by_path: std::collections::HashMap<&str, &reader::FsEntry> =
        entries.iter().map(|e| (e.path.as_str(), e)).collect();
    for d in deferred {
        let ok = by_path.get(d.at.as_str()).is_some_and(|e| {
            e.kind == d.kind
                && e.mode == d.mode
                && e.uid == u64::from(d.uid)
                && e.gid == u64::from(d.gid)
                && (d.device.is_none() || e.device == d.device)
        });
        if !ok {
            return Err(PartitionError::ToolFailed {
                tool: "debugfs",
                status: "exit status: 0".into(),
                stderr: format!(
                    "{} was not written as a {} with mode {:04o}",
                    d.at,
                    d.kind.as_str(),
                    d.mode
                ),
            });
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn mke2fs(
    tools: &Tools,
    image: &std::path::Path,
    tree: &std::path::Path,
    size: u64,
    inodes: u64,
    label: &str,
    uuid: &str,
    writable: bool,
) -> Result<(), PartitionError> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "-q".into(),
        "-F".into(),
        "-t".into(),
        "ext4".into(),
        "-b".into(),
        "4096".into(),
        "-m".into(),
        "0".into(),
        "-N".into(),
        inodes.to_string().into(),
        "-L".into(),
        label.into(),
        "-U".into(),
        uuid.into(),
        "-E".into(),
        "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1,nodiscard".into(),
        "-d".into(),
        tree.into(),
        image.into(),
        format!("{}k", size / 1024).into(),
    ];
    if !writable {
        // Nothing writes to a shared partition, so it needs no journal.
        args.splice(0..0, ["-O".into(), "^has_journal".into()]);
    }
    tools.run(MKE2FS, args)
}

/// The nodes of a private partition: the VM's own entries under `upper/`
/// (only the image's own hard links kept: the partition is writable, and
/// files that were separate must stay separate), its whiteouts, `work/`
/// for overlayfs, and `provd/` with what the guest needs to stack its
/// layers.
fn private_nodes(
    private: &[Entry],
    whiteouts: &[String],
    manifest: &PrivateManifest,
    manifest_json: &str,
) -> Result<Vec<ext4_writer::Node>, PartitionError> {
    use ext4_writer::{Content, Node};
    let dir = |path: &str, mode: u32| Node {
        path: path.into(),
        kind: EntryKind::Dir,
        mode,
        uid: 0,
        gid: 0,
        mtime: 0,
        size: 0,
        content: None,
        link_target: None,
        device: None,
        inode: None,
    };
    let small = |path: &str, text: &str, mode: u32| Node {
        kind: EntryKind::File,
        size: text.len() as u64,
        content: Some(Content::Bytes(text.as_bytes().to_vec())),
        ..dir(path, mode)
    };
    let mut nodes = Vec::with_capacity(private.len() + whiteouts.len() + 8);
    nodes.push(dir("upper", 0o755));
    nodes.push(dir("work", 0o755));
    // Image path -> (inode key, content key) of each file written, for the
    // image's own hard links.
    type ContentKey = (provd_domain::image::Hash, u32, u64, u64);
    let mut files: std::collections::HashMap<&str, (u64, ContentKey)> =
        std::collections::HashMap::new();
    let owned: Vec<Entry> = whiteouts.iter().map(|p| whiteout(p)).collect();
    for (k, e) in private.iter().chain(&owned).enumerate() {
        let (uid, gid) = match (u32::try_from(e.uid), u32::try_from(e.gid)) {
            (Ok(u), Ok(g)) if u != u32::MAX && g != u32::MAX => (u, g),
            _ => {
                return Err(PartitionError::InvalidEntry {
                    path: e.path.clone(),
                    reason: format!("owner {}:{} is not a settable 32-bit id", e.uid, e.gid),
                });
            }
        };
        let mode = e.mode & 0o7777;
        let mut node = Node {
            path: format!("upper/{}", e.path),
            kind: e.kind,
            mode,
            uid,
            gid,
            mtime: e.mtime,
            ..dir("", 0)
        };
        match e.kind {
            EntryKind::File | EntryKind::Hardlink => {
                let hash = stage::content_hash(e)?;
                let key = (hash, mode, e.uid, e.gid);
                let linked = (e.kind == EntryKind::Hardlink)
                    .then(|| e.link_target.as_deref().and_then(|t| files.get(t)))
                    .flatten()
                    .filter(|(_, k)| *k == key)
                    .map(|(inode, _)| *inode);
                let inode = linked.unwrap_or(k as u64);
                node.kind = EntryKind::File;
                node.size = e.size;
                node.content = (e.size > 0).then_some(Content::Object(hash));
                node.inode = Some(inode);
                files.insert(e.path.as_str(), (inode, key));
            }
            EntryKind::Symlink => node.link_target = e.link_target.clone(),
            EntryKind::CharDevice | EntryKind::BlockDevice => node.device = e.device,
            EntryKind::Fifo | EntryKind::Dir => {}
        }
        nodes.push(node);
    }
    nodes.push(dir("provd", 0o755));
    nodes.push(small("provd/partition.json", manifest_json, 0o444));
    nodes.push(small("provd/stack", &stack_file(manifest), 0o444));
    nodes.push(small("provd/shared", &shared_file(manifest), 0o444));
    nodes.push(small("provd/provd-overlay-root", OVERLAY_ROOT_SCRIPT, 0o555));
    Ok(nodes)
}

/// Builds the private partition of `vm`: its own files plus what its guest
/// needs to stack its layers from `shared` at boot. `size_bytes` is the
/// size the guest sees (default: the content plus a quarter, at least 256
/// MiB free).
#[allow(clippy::too_many_arguments)]
pub fn build_private(
    store: &Store,
    plan: &Plan,
    vms: &[VmImage],
    vm: &str,
    shared: Option<&PartitionRecord>,
    format: PrivateFormat,
    size_bytes: Option<u64>,
    opts: &BuildOptions,
) -> Result<PartitionRecord, PartitionError> {
    let image = vms
        .iter()
        .find(|v| v.vm == vm)
        .ok_or_else(|| PartitionError::NotFound(format!("no image was given for VM {vm:?}")))?;
    check_plan(store, plan, vms, Some(vm))?;
    let stack_ids = plan.stacks.get(vm).cloned().unwrap_or_default();
    let private = plan.private.get(vm).cloned().unwrap_or_default();
    let whiteouts = plan.whiteouts.get(vm).cloned().unwrap_or_default();
    let (shared_refs, stack, stack_rows) =
        resolve_stack(store, plan, vm, &stack_ids, shared, &opts.domain)?;
    let tools = opts.tools();
    if format == PrivateFormat::Qcow2 {
        tools.find(QEMU_IMG)?;
    }
    if let Some(existing) = store.partitions_of_vm(vm)?.into_iter().find(|p| p.role == "private") {
        // One private partition per VM: which one the VM boots and which
        // one is verified must never be in doubt.
        return Err(PartitionError::InvalidPlan(format!(
            "VM {vm:?} already has private partition {}; release it first",
            existing.id
        )));
    }
    // A first estimate, before anything is written: every file rounded up
    // to a block, twice the inodes, the journal.
    let blocks: u64 =
        private.iter().filter(|e| e.kind == EntryKind::File).map(|e| e.size.div_ceil(4096)).sum();
    let entries = private.len() as u64 + 8;
    let estimate = private_bytes(blocks + entries / 8, private_inodes(entries));
    let apparent = |needed: u64| -> Result<u64, PartitionError> {
        match size_bytes {
            Some(s) if s < needed => {
                Err(PartitionError::TooSmall { vm: vm.to_string(), requested: s, needed })
            }
            Some(s) => Ok(s.checked_next_multiple_of(4096).unwrap_or(s - s % 4096)),
            None => Ok(needed.saturating_add((needed / 4).max(256 << 20))),
        }
    };
    check_room(
        store,
        &format!("the private partition of {vm}"),
        estimate.saturating_mul(2),
        apparent(estimate)?,
        opts,
    )?;

    let id = provd_store::new_partition_id();
    let uuid = uuid_for(&id);
    let started = std::time::Instant::now();
    let build = BuildDir::new(store)?;
    let manifest = PrivateManifest {
        partition: id.clone(),
        vm: vm.to_string(),
        format,
        uuid: uuid.clone(),
        image: image.image.reference.clone(),
        image_digest: image.image.digest.clone(),
        shared: shared_refs,
        stack,
        whiteouts: whiteouts.len() as u64,
        added: Vec::new(),
    };
    let manifest_json = serde_json::to_string_pretty(&manifest)
        .map_err(|e| PartitionError::InvalidPlan(format!("encoding the manifest: {e}")))?;
    let nodes = private_nodes(&private, &whiteouts, &manifest, &manifest_json)?;
    // Sized from the nodes: each inode's blocks, the inode table, the
    // journal.
    let mut counted = std::collections::HashSet::new();
    let data_blocks: u64 = nodes
        .iter()
        .map(|n| match n.kind {
            EntryKind::File if n.inode.is_none_or(|k| counted.insert(k)) => n.size.div_ceil(4096),
            EntryKind::Dir => 1,
            EntryKind::Symlink => 1,
            _ => 0,
        })
        .sum();
    let inodes = private_inodes(nodes.len() as u64 + 16);
    let needed = private_bytes(data_blocks, inodes);
    let apparent = apparent(needed)?;
    check_room(store, &format!("the private partition of {vm}"), needed, apparent, opts)?;
    let raw = build.path.join("private.ext4");
    let mut open = |hash: &provd_domain::image::Hash| -> std::io::Result<std::fs::File> {
        store.open_object(hash).map(|f| f.into_std()).map_err(std::io::Error::other)
    };
    let ext4_opts = ext4_writer::Ext4Options {
        size_bytes: apparent,
        inodes,
        uuid: uuid_bytes(&id),
        label: "provd-private".into(),
        hash_seed: uuid_bytes(&format!("{id}/hash-seed")),
        now: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
    };
    let figures =
        ext4_writer::write_image(&raw, &nodes, &ext4_opts, &mut open).map_err(|e| match e {
            ext4_writer::Ext4WriteError::Io { what, source } => PartitionError::Io { what, source },
            ext4_writer::Ext4WriteError::Invalid { path, reason } => {
                PartitionError::InvalidEntry { path, reason }
            }
            other => {
                PartitionError::InvalidEntry { path: String::new(), reason: other.to_string() }
            }
        })?;
    tracing::debug!(vm, elapsed = ?started.elapsed(), ?figures, "private image written");
    let file = if format == PrivateFormat::Qcow2 {
        let qcow = build.path.join("private.qcow2");
        tools.run(
            QEMU_IMG,
            [
                std::ffi::OsStr::new("convert"),
                "-f".as_ref(),
                "raw".as_ref(),
                "-O".as_ref(),
                "qcow2".as_ref(),
                raw.as_os_str(),
                qcow.as_os_str(),
            ],
        )?;
        std::fs::remove_file(&raw)
            .map_err(|e| PartitionError::Io { what: "removing the raw image".into(), source: e })?;
        "private.qcow2"
    } else {
        "private.ext4"
    };
    let (bytes, size) = allocated(&build.path.join(file))?;
    let mut users = vec![vm.to_string()];
    users.dedup();
    tracing::debug!(vm, elapsed = ?started.elapsed(), "private image built");
    build.publish(&NewPartition {
        id,
        role: "private".into(),
        format: format.as_str().into(),
        file: file.into(),
        bytes,
        apparent_bytes: size.max(apparent),
        operation: opts.operation.clone(),
        manifest: manifest_json,
        vms: users,
        layers: Vec::new(),
        stack: stack_rows,
        domain: opts.domain.clone(),
    })
}

/// An overlay whiteout: a character device 0:0 in the upper layer hides
/// the path in every layer below.
pub fn whiteout(path: &str) -> Entry {
    Entry {
        path: path.to_string(),
        kind: EntryKind::CharDevice,
        mode: 0,
        uid: 0,
        gid: 0,
        mtime: 0,
        size: 0,
        hash: None,
        link_target: None,
        device: Some((0, 0)),
    }
}

/// The manifest of a shared partition.
pub fn shared_manifest(rec: &PartitionRecord) -> Result<SharedManifest, PartitionError> {
    serde_json::from_str(&rec.manifest).map_err(|e| {
        PartitionError::NotFound(format!("partition {} is not a shared partition: {e}", rec.id))
    })
}

/// What a stack is made of.
type ResolvedStack = (Vec<SharedRef>, Vec<StackItem>, Vec<StackedLayer>);

/// Finds each layer `vm` stacks: a layer the node already holds (still
/// there, with the digest the plan was made against) or one of `shared`,
/// the shared partition this plan built. Returns the shared partitions in
/// the order the stack first uses them, the stack as the manifest records
/// it, and as the store does.
fn resolve_stack(
    store: &Store,
    plan: &Plan,
    vm: &str,
    ids: &[String],
    shared: Option<&PartitionRecord>,
    domain: &str,
) -> Result<ResolvedStack, PartitionError> {
    let on_node = if plan.layers.iter().any(|l| l.node.is_some()) {
        store.layers(false)?
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
        let digest = layer_digest(&layer.entries);
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
                if node.digest != digest {
                    return Err(PartitionError::InvalidPlan(format!(
                        "layer {id:?} does not have the entries of node layer {}/{}",
                        node.partition, node.name
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

/// The partitions of a set of VMs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Layout {
    pub shared: Option<PartitionRecord>,
    pub private: Vec<PartitionRecord>,
}

/// Builds the shared partition of `plan` (when it keeps a layer) and every
/// VM's private partition. On any failure the partitions already built are
/// removed, so the node is left as it was.
pub fn build_all(
    store: &Store,
    plan: &Plan,
    vms: &[VmImage],
    shared_format: SharedFormat,
    private_format: PrivateFormat,
    private_size: Option<u64>,
    opts: &BuildOptions,
) -> Result<Layout, PartitionError> {
    let mut built: Vec<String> = Vec::new();
    let result = (|| {
        let mut quota = opts.quota_bytes;
        let shared = if new_layers(plan).next().is_none() {
            None
        } else {
            let rec = build_shared(store, plan, vms, shared_format, opts)?;
            built.push(rec.id.clone());
            quota = quota.saturating_sub(rec.apparent_bytes);
            Some(rec)
        };
        let mut private = Vec::new();
        for v in vms {
            let step = BuildOptions { quota_bytes: quota, ..opts.clone() };
            let rec = build_private(
                store,
                plan,
                vms,
                &v.vm,
                shared.as_ref(),
                private_format,
                private_size,
                &step,
            )?;
            built.push(rec.id.clone());
            quota = quota.saturating_sub(rec.apparent_bytes);
            private.push(rec);
        }
        Ok(Layout { shared, private })
    })();
    if result.is_err() {
        for id in built.iter().rev() {
            if let Err(e) = store.remove_partition(id) {
                tracing::warn!(partition = %id, error = %e, "cannot roll back a partition");
            }
        }
    }
    result
}

#[cfg(test)]
mod manifest_tests {
    // Tests: a failed unwrap is a failed test.
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A private partition built before layers were node-wide keeps its
    /// manifest and the boot files it carries.
    #[test]
    fn an_earlier_manifest_parses_and_gives_back_its_boot_files() {
        let old = r#"{"partition":"p-0000000000000002","vm":"web","format":"ext4","uuid":"u2",
            "image":"dir:/a","image_digest":"x",
            "shared":{"partition":"p-0000000000000001","format":"erofs","uuid":"1234"},
            "stack":["layer-0","layer-1"]}"#;
        let m: PrivateManifest = serde_json::from_str(old).unwrap();
        assert_eq!(m.shared.len(), 1);
        assert_eq!(
            m.stack[1],
            StackItem { shared: 0, layer: "layer-1".into(), digest: String::new() }
        );
        assert_eq!(stack_file(&m), "layer-0\nlayer-1\n");
        assert_eq!(shared_file(&m), "fstype=erofs\ndevice=/dev/disk/by-uuid/1234\n");
        let none: PrivateManifest = serde_json::from_str(
            r#"{"partition":"p","vm":"v","format":"ext4","uuid":"u","image":"i","image_digest":"d",
                "shared":null,"stack":[]}"#,
        )
        .unwrap();
        assert!(none.shared.is_empty());
        assert_eq!((stack_file(&none), shared_file(&none)), (String::new(), String::new()));
        // Two partitions: the indexed format; it round-trips.
        let mut two = m.clone();
        two.shared.push(SharedRef {
            partition: "p-0000000000000009".into(),
            format: SharedFormat::Dir,
            uuid: None,
        });
        two.stack[1].shared = 1;
        assert_eq!(stack_file(&two), "0 layer-0\n1 layer-1\n");
        assert_eq!(
            shared_file(&two),
            "0 erofs /dev/disk/by-uuid/1234\n1 virtiofs provd-p-0000000000000009\n"
        );
        let back: PrivateManifest =
            serde_json::from_str(&serde_json::to_string(&two).unwrap()).unwrap();
        assert_eq!(back, two);
    }
}
