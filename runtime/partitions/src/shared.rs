//! Building a shared partition: every new layer of a plan, each file
//! stored once, as EROFS (written directly), ext4 (mke2fs) or a directory.

use provd_dedup::Plan;
use provd_domain::image::{Entry, EntryKind};
use provd_store::{NewLayer, NewPartition, PartitionRecord, PartitionRole, Store};

use crate::space::{check_room, ext4_bytes};
use crate::stage::Deferred;
use crate::tools::{DEBUGFS, MKE2FS, MKFS_EROFS, Tools};
use crate::{
    BuildDir, BuildOptions, CheckedPlan, LayerInfo, PartitionError, SharedFormat, SharedManifest,
    Specials, VmImage, allocated, check_plan, erofs_writer, ext4, layer_digest, new_layers, reader,
    stage, uuid_bytes, uuid_for, write_small,
};

/// Hard links to one inode before a new one is started: below ext4's limit
/// of 65000 and EROFS's compact-inode limit of 65535.
pub(crate) const MAX_LINKS_PER_INODE: u32 = 60_000;

/// Writes the shared partition of `plan` as an uncompressed EROFS image
/// straight from the store: every file with the same content, mode and
/// owner is one inode, layer directories are 0755 root.
pub(crate) fn write_shared_erofs(
    store: &Store,
    plan: &Plan,
    image: &std::path::Path,
    id: &str,
    manifest_json: &str,
    dax_layout: bool,
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
    let options = if dax_layout {
        erofs_writer::ErofsOptions::dax()
    } else {
        erofs_writer::ErofsOptions::default()
    };
    erofs_writer::write_image(image, &nodes, uuid_bytes(id), "provd-shared", 0, options, &mut open)
        .map_err(|e| match e {
            erofs_writer::ErofsWriteError::Invalid { path, reason } => {
                PartitionError::InvalidEntry { path, reason }
            }
            other => PartitionError::Io {
                what: "writing the EROFS image".into(),
                source: std::io::Error::other(other.to_string()),
            },
        })
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
    write_shared(store, plan, format, opts)
}

/// [`build_shared`] from a plan already checked.
pub fn build_shared_checked(
    store: &Store,
    plan: &CheckedPlan,
    format: SharedFormat,
    opts: &BuildOptions,
) -> Result<PartitionRecord, PartitionError> {
    write_shared(store, plan.plan(), format, opts)
}

/// The build of a shared partition, once its plan is checked.
fn write_shared(
    store: &Store,
    plan: &Plan,
    format: SharedFormat,
    opts: &BuildOptions,
) -> Result<PartitionRecord, PartitionError> {
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
        dax: format == SharedFormat::Erofs && opts.dax_layout,
    };
    let manifest_json = serde_json::to_string_pretty(&manifest)
        .map_err(|e| PartitionError::InvalidPlan(format!("encoding the manifest: {e}")))?;
    let image = build.path.join(format.file_name());
    if format == SharedFormat::Erofs {
        // Written straight from the store: no staging tree at all.
        let figures =
            write_shared_erofs(store, plan, &image, &id, &manifest_json, opts.dax_layout)?;
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
pub(crate) fn finish_shared(
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
        role: PartitionRole::Shared,
        format: format.stored(),
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
pub(crate) fn apply_deferred(
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
pub(crate) fn mke2fs(
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
    Ok(tools.run(MKE2FS, args)?)
}
