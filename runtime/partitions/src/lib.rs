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
//!   upper/<path>                 the VM's own files, whiteouts, and the
//!                                directories they sit in or that its
//!                                layers do not show as the image has them
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

mod attach;
mod boot;
mod customize;
mod error;
mod manifest;
mod plan;
mod private;
pub mod repack;
mod shared;
mod space;
mod stack;
mod stage;
mod tools;
mod verify;

// The formats live in provd-formats; their paths here stay as they were.
pub use provd_formats::{erofs, erofs_writer, ext4, ext4_writer, reader};

use std::path::PathBuf;

use provd_dedup::Plan;
use provd_store::{ImageRecord, NewPartition, PartitionRecord, Store};

pub use attach::attachments;
pub use boot::OVERLAY_ROOT_SCRIPT;
pub use customize::{AddedFile, MAX_ADDED_FILE_BYTES, add_file};
pub use error::PartitionError;
pub use manifest::{
    LayerInfo, MAX_SHARED_PER_VM, PrivateFormat, PrivateManifest, SharedFormat, SharedManifest,
    SharedRef, StackItem, layer_digest, shared_manifest,
};
pub use plan::{
    CheckedPlan, MAX_NODE_LAYERS, check_plan, considered_layers, image_entries, node_layer,
    node_layers,
};
pub use private::{build_private, build_private_checked, whiteout};
pub use shared::{build_shared, build_shared_checked};
pub use tools::DEFAULT_TOOL_DIRS;
pub use verify::{Verification, verify_vm};

use boot::{shared_file, stack_file};
use plan::new_layers;
use space::allocated;
use stage::{Specials, Stager};
use tools::Tools;

/// Most layers one VM may stack. The guest mounts its overlay with one
/// `mount(2)` call whose options must fit in a page (4096 bytes); with the
/// shared partition at `/run/provd/s` each lower directory takes at most 30
/// bytes (`/run/provd/s/layers/layer-127:`), so 128 layers leave room for
/// the upper and work directories.
pub const MAX_LAYERS_PER_VM: usize = 128;

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
    /// Lay an uncompressed EROFS shared partition out for DAX, so that a
    /// guest may map it from persistent memory (every regular file in
    /// whole blocks, the size a multiple of 2 MiB: 3–5 % more disk). A node
    /// that attaches shared partitions only as disks does without.
    pub dax_layout: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            operation: None,
            quota_bytes: u64::MAX,
            tool_dirs: DEFAULT_TOOL_DIRS.iter().map(PathBuf::from).collect(),
            tool_timeout: std::time::Duration::from_secs(30 * 60),
            domain: provd_domain::trust::LEGACY_DOMAIN.to_string(),
            dax_layout: true,
        }
    }
}

impl BuildOptions {
    fn tools(&self) -> Tools {
        Tools { dirs: self.tool_dirs.clone(), timeout: self.tool_timeout }
    }
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
