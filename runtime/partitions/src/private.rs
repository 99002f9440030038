//! Building a private partition: a VM's own files and what its guest needs
//! to stack its layers at boot.

use provd_dedup::Plan;
use provd_domain::image::{Entry, EntryKind};
use provd_store::{NewPartition, PartitionRecord, PartitionRole, Store};

use crate::space::{check_room, private_bytes, private_inodes};
use crate::stack::resolve_stack;
use crate::tools::QEMU_IMG;
use crate::{
    BuildDir, BuildOptions, CheckedPlan, OVERLAY_ROOT_SCRIPT, PartitionError, PrivateFormat,
    PrivateManifest, VmImage, allocated, check_plan, ext4_writer, shared_file, stack_file, stage,
    uuid_bytes, uuid_for,
};

/// Names one whiteout inode takes, below ext4's link limit (65,000).
const WHITEOUTS_PER_INODE: u64 = 60_000;

/// The nodes of a private partition: the VM's own entries under `upper/`
/// (only the image's own hard links kept: the partition is writable, and
/// files that were separate must stay separate), its whiteouts, `work/`
/// for overlayfs, and `provd/` with what the guest needs to stack its
/// layers.
pub(crate) fn private_nodes(
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
            EntryKind::CharDevice if k >= private.len() => {
                // Whiteouts share inodes, as overlayfs makes its own: a
                // VM hiding thousands of its layers' files costs their
                // names, not an inode each.
                node.device = e.device;
                let w = (k - private.len()) as u64;
                node.inode = Some(u64::MAX - w / WHITEOUTS_PER_INODE);
            }
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
    let image = vm_image(vms, vm)?;
    check_plan(store, plan, vms, Some(vm))?;
    write_private(store, plan, image, shared, format, size_bytes, opts)
}

/// [`build_private`] from a plan already checked.
pub fn build_private_checked(
    store: &Store,
    plan: &CheckedPlan,
    vm: &str,
    shared: Option<&PartitionRecord>,
    format: PrivateFormat,
    size_bytes: Option<u64>,
    opts: &BuildOptions,
) -> Result<PartitionRecord, PartitionError> {
    let image = vm_image(plan.vms(), vm)?;
    write_private(store, plan.plan(), image, shared, format, size_bytes, opts)
}

/// The image `vm` runs, among `vms`.
fn vm_image<'a>(vms: &'a [VmImage], vm: &str) -> Result<&'a VmImage, PartitionError> {
    vms.iter()
        .find(|v| v.vm == vm)
        .ok_or_else(|| PartitionError::NotFound(format!("no image was given for VM {vm:?}")))
}

/// The build of the private partition of `image`'s VM, once its plan is
/// checked.
fn write_private(
    store: &Store,
    plan: &Plan,
    image: &VmImage,
    shared: Option<&PartitionRecord>,
    format: PrivateFormat,
    size_bytes: Option<u64>,
    opts: &BuildOptions,
) -> Result<PartitionRecord, PartitionError> {
    let vm = image.vm.as_str();
    let stack_ids = plan.stacks.get(vm).cloned().unwrap_or_default();
    let private = plan.private.get(vm).cloned().unwrap_or_default();
    let whiteouts = plan.whiteouts.get(vm).cloned().unwrap_or_default();
    let (shared_refs, stack, stack_rows) =
        resolve_stack(store, plan, vm, &stack_ids, shared, &opts.domain)?;
    let tools = opts.tools();
    if format == PrivateFormat::Qcow2 {
        tools.find(QEMU_IMG)?;
    }
    if let Some(existing) =
        store.partitions_of_vm(vm)?.into_iter().find(|p| p.role == PartitionRole::Private)
    {
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
        role: PartitionRole::Private,
        format: format.stored(),
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
