// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! Shared and private partitions built from a plan over real images, in
//! every format, verified by reading the images back without mounting; and
//! the bad inputs, each refused with nothing left behind.

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use provd_partitions::{
    BuildOptions, PartitionError, PrivateFormat, SharedFormat, build_all, build_private,
    build_shared, verify_vm,
};
use provd_store::Store;

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn every_format_gives_back_every_image_exactly() {
    let b = prepared().await;
    let formats = [
        (SharedFormat::Erofs, PrivateFormat::Ext4),
        (SharedFormat::ErofsLz4hc, PrivateFormat::Ext4),
        (SharedFormat::Ext4, PrivateFormat::Qcow2),
    ];
    for (shared, private) in formats {
        let layout = b.build(shared, private).unwrap();
        let s = layout.shared.as_ref().unwrap();
        assert_eq!(s.format, shared.stored());
        // Its users are the VMs whose stacks name its layers.
        let users = b.store().partition(&s.id).unwrap().unwrap().vms;
        assert_eq!(users, vec!["db", "dev", "web"]);
        assert_eq!(layout.private.len(), 3);
        for v in &b.vms {
            let report = verify_vm(b.store(), &v.vm, &opts()).unwrap();
            assert!(report.is_exact(), "{shared:?}/{private:?} {}: {:#?}", v.vm, report.mismatches);
            assert_eq!(
                report.entries,
                b.store().entries(&v.image, 0, u64::MAX).unwrap().len() as u64
            );
            assert!(report.files_hashed > 5);
        }
        // Every VM gone: every partition gone, nothing left.
        for v in &b.vms {
            b.store().release_vm(&v.vm).unwrap();
        }
        b.assert_no_partitions();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_directory_partition_never_puts_a_device_or_setuid_file_on_the_node() {
    // A virtio-fs export of a device node would let a guest open a host
    // device: refused, naming the entry, nothing left.
    let b = prepared().await;
    let err = build_shared(b.store(), &b.plan, &b.vms, SharedFormat::Dir, &opts()).unwrap_err();
    assert!(
        matches!(&err, PartitionError::InvalidEntry { path, reason }
            if path == "dev/loop0" && reason.contains("directory partition")),
        "{err}"
    );
    b.assert_no_partitions();
    // Images without them are exported and give back every VM exactly.
    let b = prepared_with(false).await;
    b.build(SharedFormat::Dir, PrivateFormat::Ext4).unwrap();
    for v in &b.vms {
        let report = verify_vm(b.store(), &v.vm, &opts()).unwrap();
        assert!(report.is_exact(), "{}: {:#?}", v.vm, report.mismatches);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_device_or_setuid_file_is_ever_created_on_the_node_for_ext4() {
    // Watch the build directory while ext4 partitions are built: the
    // staging tree never holds a device, a FIFO or a setuid/setgid file.
    let b = prepared().await;
    let staging = b.node.data.join("staging");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut stack = vec![staging.clone()];
                while let Some(d) = stack.pop() {
                    let Ok(items) = std::fs::read_dir(&d) else { continue };
                    for item in items.flatten() {
                        let Ok(m) = item.metadata() else { continue };
                        let ft = m.file_type();
                        use std::os::unix::fs::FileTypeExt;
                        if ft.is_char_device()
                            || ft.is_block_device()
                            || ft.is_fifo()
                            || m.mode() & 0o6000 != 0
                        {
                            seen.push(item.path());
                        }
                        if ft.is_dir() {
                            stack.push(item.path());
                        }
                    }
                }
            }
            seen
        })
    };
    b.build(SharedFormat::Ext4, PrivateFormat::Ext4).unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(watcher.join().unwrap(), Vec::<PathBuf>::new());
    for v in &b.vms {
        let report = verify_vm(b.store(), &v.vm, &opts()).unwrap();
        assert!(report.is_exact(), "{}: {:#?}", v.vm, report.mismatches);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn identical_files_are_stored_once_in_the_shared_partition() {
    let b = prepared_with(false).await;
    let shared = build_shared(b.store(), &b.plan, &b.vms, SharedFormat::Dir, &opts()).unwrap();
    let root = b.store().partition_path(&shared.id).unwrap().join("tree");
    // The base library is in the layer of all three VMs; the hard link pair
    // and the `tool` file have one inode.
    let mut inodes = HashSet::new();
    let mut names = 0;
    for layer in std::fs::read_dir(root.join("layers")).unwrap() {
        let l = layer.unwrap().path();
        for rel in ["usr/bin/tool", "usr/bin/tool-alias"] {
            if let Ok(m) = std::fs::symlink_metadata(l.join(rel)) {
                inodes.insert(m.ino());
                names += 1;
            }
        }
    }
    assert_eq!((names, inodes.len()), (2, 1));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("provd-shared.json")).unwrap()).unwrap();
    assert_eq!(manifest["layers"].as_array().unwrap().len(), b.plan.layers.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_partition_fails_verification_naming_the_entry() {
    let b = prepared_with(false).await;
    b.build(SharedFormat::Dir, PrivateFormat::Ext4).unwrap();
    let shared = b
        .store()
        .partitions()
        .unwrap()
        .into_iter()
        .find(|p| p.role == provd_store::PartitionRole::Shared)
        .unwrap();
    let layers = b.store().partition_path(&shared.id).unwrap().join("tree/layers");
    let layer0 = layers.join(&b.plan.stacks["web"][0]);
    let target = walkdir_first_file(&layer0);
    let rel = target.strip_prefix(&layer0).unwrap().to_string_lossy().into_owned();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o666)).unwrap();
    let report = verify_vm(b.store(), "web", &opts()).unwrap();
    assert!(!report.is_exact());
    assert!(
        report.mismatches.iter().any(|m| m.starts_with(&format!("{rel}: mode 0666"))),
        "{:#?}",
        report.mismatches
    );
    // The files the guest's boot script reads are checked too: a dropped
    // stack file, or a stray file beside upper/, is reported.
    let private = b
        .store()
        .partitions_of_vm("db")
        .unwrap()
        .into_iter()
        .find(|p| p.role == provd_store::PartitionRole::Private)
        .unwrap();
    let image = b.store().partition_path(&private.id).unwrap().join(&private.file);
    let out = std::process::Command::new("debugfs")
        .args(["-w", "-R", "rm /provd/stack"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = std::process::Command::new("debugfs")
        .args(["-w", "-R", "mkdir /extra"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(out.status.success());
    let report = verify_vm(b.store(), "db", &opts()).unwrap();
    assert!(
        report.mismatches.iter().any(|m| m.starts_with("provd/stack: missing")),
        "{:#?}",
        report.mismatches
    );
    assert!(
        report.mismatches.iter().any(|m| m.starts_with("extra: unexpected")),
        "{:#?}",
        report.mismatches
    );
}

fn walkdir_first_file(dir: &Path) -> PathBuf {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut items: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().path()).collect();
        items.sort();
        for p in items {
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_file() && m.len() > 0 {
                return p;
            }
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    panic!("no file under {}", dir.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plan_for_other_images_is_refused_and_nothing_is_built() {
    let b = prepared().await;
    // The plan says web runs what db runs.
    let mut swapped = b.vms.clone();
    swapped[0].image = b.vms[1].image.clone();
    let err = build_shared(b.store(), &b.plan, &swapped, SharedFormat::Erofs, &opts()).unwrap_err();
    assert!(matches!(&err, PartitionError::PlanMismatch { vm, .. } if vm == "web"), "{err}");
    // An entry smuggled into a layer with a path that climbs out.
    let mut evil = b.plan.clone();
    let mut e = evil.layers[0].entries[0].clone();
    e.path = "../../../../etc/evil".into();
    evil.layers[0].entries.push(e);
    let err = build_shared(b.store(), &evil, &b.vms, SharedFormat::Dir, &opts()).unwrap_err();
    assert!(matches!(err, PartitionError::PlanMismatch { .. }), "{err}");
    // A layer id that is not a plain name.
    let mut evil = b.plan.clone();
    let old = evil.layers[0].id.clone();
    evil.layers[0].id = "../up".into();
    for s in evil.stacks.values_mut() {
        for id in s.iter_mut().filter(|id| **id == old) {
            *id = "../up".into();
        }
    }
    let err = build_shared(b.store(), &evil, &b.vms, SharedFormat::Dir, &opts()).unwrap_err();
    assert!(err.to_string().contains("\"../up\""), "{err}");
    b.assert_no_partitions();
    assert!(!b.node.dir.path().join("etc/evil").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn more_layers_than_an_overlay_mounts_are_refused() {
    let b = prepared().await;
    let mut plan = b.plan.clone();
    let stack = plan.stacks.get_mut("web").unwrap();
    while stack.len() <= provd_partitions::MAX_LAYERS_PER_VM {
        stack.push(stack[0].clone());
    }
    let err = build_shared(b.store(), &plan, &b.vms, SharedFormat::Erofs, &opts()).unwrap_err();
    assert!(
        matches!(err, PartitionError::TooManyLayers { ref vm, max: 128, .. } if vm == "web"),
        "{err}"
    );
    b.assert_no_partitions();
}

#[tokio::test(flavor = "multi_thread")]
async fn quotas_free_space_and_sizes_are_checked_before_building() {
    let b = prepared().await;
    let small = BuildOptions { quota_bytes: 1 << 20, ..opts() };
    let err = build_all(
        b.store(),
        &b.plan,
        &b.vms,
        SharedFormat::Erofs,
        PrivateFormat::Ext4,
        None,
        &small,
    )
    .unwrap_err();
    assert!(
        matches!(err, PartitionError::QuotaExceeded { quota, .. } if quota == 1 << 20),
        "{err}"
    );
    // Enough for the shared partition but not for all private ones: the
    // shared one is rolled back.
    let shared_only = BuildOptions { quota_bytes: 300 << 20, ..opts() };
    let err = build_all(
        b.store(),
        &b.plan,
        &b.vms,
        SharedFormat::Erofs,
        PrivateFormat::Ext4,
        None,
        &shared_only,
    )
    .unwrap_err();
    assert!(matches!(err, PartitionError::QuotaExceeded { .. }), "{err}");
    b.assert_no_partitions();
    let err = build_private(
        b.store(),
        &b.plan,
        &b.vms,
        "web",
        None,
        PrivateFormat::Ext4,
        Some(4096),
        &opts(),
    )
    .unwrap_err();
    assert!(matches!(err, PartitionError::TooSmall { .. } | PartitionError::NotFound(_)), "{err}");
    b.assert_no_partitions();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_is_refused_before_anything_is_written() {
    let Built { node, vms, plan } = prepared().await;
    let Node { dir: _dir, data, images } = node;
    drop(images);
    // Import tasks drop their handle on the store a moment after they finish.
    let mut store = (0..100)
        .find_map(|_| match Store::open(&data) {
            Ok(s) => Some(s),
            Err(_) => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                None
            }
        })
        .unwrap();
    // A reserve larger than the disk: the build must not start.
    store.min_free_bytes = u64::MAX / 4;
    let err = build_shared(&store, &plan, &vms, SharedFormat::Erofs, &opts()).unwrap_err();
    assert!(matches!(err, PartitionError::DiskFull { .. }), "{err}");
    assert_eq!(store.partitions().unwrap(), vec![]);
    assert_eq!(store.staging_files().unwrap(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_tool_is_named_with_its_package() {
    let b = prepared().await;
    let empty = tempfile::tempdir().unwrap();
    let no_tools = BuildOptions { tool_dirs: vec![empty.path().to_path_buf()], ..opts() };
    let err =
        build_shared(b.store(), &b.plan, &b.vms, SharedFormat::ErofsLz4, &no_tools).unwrap_err();
    assert_eq!(err.to_string(), "mkfs.erofs not found: install the Debian package erofs-utils");
    let err = build_shared(b.store(), &b.plan, &b.vms, SharedFormat::Ext4, &no_tools).unwrap_err();
    assert_eq!(err.to_string(), "mke2fs not found: install the Debian package e2fsprogs");
    b.assert_no_partitions();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_builder_dying_mid_write_leaves_nothing_behind() {
    let b = prepared().await;
    // A stand-in mkfs.erofs that writes half an image and then dies, as a
    // full disk or a kill would leave it.
    let tools = tempfile::tempdir().unwrap();
    let fake = tools.path().join("mkfs.erofs");
    write(
        &fake,
        b"#!/bin/sh\nfor a; do last2=$last; last=$a; done\nhead -c 1000000 /dev/zero > \"$last2\"\nkill -9 $$\n",
        0o755,
    );
    let dying = BuildOptions { tool_dirs: vec![tools.path().to_path_buf()], ..opts() };
    let err = build_shared(b.store(), &b.plan, &b.vms, SharedFormat::ErofsLz4, &dying).unwrap_err();
    assert!(matches!(err, PartitionError::ToolFailed { tool: "mkfs.erofs", .. }), "{err}");
    b.assert_no_partitions();
    // One that hangs is killed at the tool deadline.
    write(&fake, b"#!/bin/sh\necho working >&2\nexec sleep 60\n", 0o755);
    let hanging = BuildOptions { tool_timeout: std::time::Duration::from_secs(1), ..dying };
    let started = std::time::Instant::now();
    let err =
        build_shared(b.store(), &b.plan, &b.vms, SharedFormat::ErofsLz4, &hanging).unwrap_err();
    assert!(err.to_string().contains("killed after 1 s"), "{err}");
    assert!(err.to_string().contains("working"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    b.assert_no_partitions();
}

#[tokio::test(flavor = "multi_thread")]
async fn content_lost_from_the_store_mid_write_leaves_nothing_behind() {
    let b = prepared_with(false).await;
    // The largest layer file's content disappears behind provd's back: the
    // EROFS writer, streaming from the store, fails part-way through.
    let victim = b.plan.layers.iter().flat_map(|l| &l.entries).max_by_key(|e| e.size).unwrap();
    let hex = victim.hash.unwrap().to_hex();
    std::fs::remove_file(b.node.data.join("objects").join(&hex[..2]).join(&hex)).unwrap();
    for format in [SharedFormat::Erofs, SharedFormat::Ext4, SharedFormat::Dir] {
        let err = build_shared(b.store(), &b.plan, &b.vms, format, &opts()).unwrap_err();
        assert!(err.to_string().contains(&hex), "{format:?}: {err}");
        b.assert_no_partitions();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_mid_build_leaves_nothing_visible_after_restart() {
    let b = prepared().await;
    let data = b.node.data.clone();
    // What a crash leaves: a build directory in staging, and a partition
    // directory renamed into place whose row was never committed.
    std::fs::create_dir_all(data.join("staging/part-obj-1-1/tree/layers")).unwrap();
    std::fs::write(data.join("staging/part-obj-1-1/shared.erofs"), b"half").unwrap();
    std::fs::create_dir_all(data.join("partitions/p-0123456789abcdef")).unwrap();
    std::fs::write(data.join("partitions/p-0123456789abcdef/shared.erofs"), b"whole").unwrap();
    let Built { node, .. } = b;
    let Node { dir: _dir, images, .. } = node;
    drop(images);
    let store = (0..100)
        .find_map(|_| match Store::open(&data) {
            Ok(s) => Some(s),
            Err(_) => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                None
            }
        })
        .unwrap();
    assert_eq!(store.partitions().unwrap(), vec![]);
    assert_eq!(std::fs::read_dir(data.join("partitions")).unwrap().count(), 0);
    assert_eq!(store.staging_files().unwrap(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shared_partition_is_removed_with_its_last_vm() {
    let b = prepared().await;
    let layout = b.build(SharedFormat::Erofs, PrivateFormat::Ext4).unwrap();
    let shared = layout.shared.unwrap();
    let removed = b.store().release_vm("web").unwrap();
    assert_eq!(removed.len(), 1, "only web's private partition goes");
    assert_eq!(removed[0].role, provd_store::PartitionRole::Private);
    b.store().release_vm("db").unwrap();
    assert!(b.store().partition(&shared.id).unwrap().is_some());
    assert!(verify_vm(b.store(), "dev", &opts()).unwrap().is_exact());
    let removed = b.store().release_vm("dev").unwrap();
    assert_eq!(removed.len(), 2);
    b.assert_no_partitions();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_boot_script_assembles_each_vms_root_from_its_partitions() {
    let b = prepared().await;
    let layout = b.build(SharedFormat::Erofs, PrivateFormat::Ext4).unwrap();
    let shared = layout.shared.unwrap();
    let shared_image = partition_file(b.store(), &shared);
    for (v, private) in b.vms.iter().zip(&layout.private) {
        provd_partitions::add_file(
            b.store(),
            &private.id,
            "etc/hostname",
            b"booted\n",
            0o644,
            &opts(),
        )
        .unwrap();
        let Some(seen) = assemble(&b, private, std::slice::from_ref(&shared_image)).await else {
            return;
        };
        // What the guest sees: its image, with the hostname written above.
        let mut want: Vec<provd_domain::image::Entry> =
            b.store().entries(&v.image, 0, u64::MAX).unwrap();
        let hostname = want.iter_mut().find(|e| e.path == "etc/hostname").unwrap();
        hostname.hash = Some(provd_domain::image::Hash(*blake3::hash(b"booted\n").as_bytes()));
        hostname.size = 7;
        let want: Vec<String> = want.iter().map(comparable).collect();
        assert_eq!(seen, want, "{}", v.vm);
    }
}
