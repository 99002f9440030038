// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! Shared and private partitions built from a plan over real images, in
//! every format, verified by reading the images back without mounting; and
//! the bad inputs, each refused with nothing left behind.

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use provd_dedup::{Plan, Policy, analyze};
use provd_images::{Images, ImportLimits, NoProgress};
use provd_partitions::{
    BuildOptions, PartitionError, PrivateFormat, SharedFormat, VmImage, build_all, build_private,
    build_shared, verify_vm,
};
use provd_store::{ImageRecord, PartitionRecord, Store};

struct Node {
    dir: tempfile::TempDir,
    data: PathBuf,
    images: Images,
}

fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = Arc::new(Store::open(&data).unwrap());
    Node { images: Images::new(store, ImportLimits::default(), 2), data, dir }
}

fn write(path: &Path, content: &[u8], mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

fn mknod(path: &Path, kind: &str, major: u32, minor: u32) {
    let mut cmd = std::process::Command::new("mknod");
    cmd.arg(path).arg(kind);
    if kind != "p" {
        cmd.arg(major.to_string()).arg(minor.to_string());
    }
    assert!(cmd.status().unwrap().success());
}

/// Pseudo-random bytes, so content does not compress away.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Three VM trees: a base every VM has, a part two of them share, each
/// one's own files, and every kind of entry.
/// With `specials`, the trees also hold device nodes, a FIFO and setuid and
/// setgid files, shared and private.
fn trees(root: &Path, specials: bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for (i, name) in ["web", "db", "dev"].iter().enumerate() {
        let t = root.join(name);
        // Shared by all three.
        write(&t.join("usr/lib/libbase.so"), &noise(1, 300_000), 0o644);
        write(&t.join("usr/bin/tool"), &noise(2, 120_000), 0o755);
        let (suid, sgid) = if specials { (0o4755, 0o2755) } else { (0o755, 0o755) };
        write(&t.join("usr/bin/su"), &noise(3, 40_000), suid);
        write(&t.join("usr/bin/wall"), &noise(4, 20_000), sgid);
        write(&t.join("usr/share/doc/empty"), b"", 0o644);
        write(&t.join("usr/share/doc/readme"), b"read me\n", 0o644);
        write(&t.join("etc/owned"), &noise(5, 9000), 0o640);
        chown(&t.join("etc/owned"), 70_000, 1000);
        std::os::unix::fs::symlink("../lib/libbase.so", t.join("usr/bin/libbase-link")).unwrap();
        std::os::unix::fs::symlink("x".repeat(100), t.join("usr/bin/long-link")).unwrap();
        std::fs::hard_link(t.join("usr/bin/tool"), t.join("usr/bin/tool-alias")).unwrap();
        std::fs::create_dir_all(t.join("dev")).unwrap();
        if specials {
            mknod(&t.join("dev/null"), "c", 1, 3);
            mknod(&t.join("dev/loop0"), "b", 7, 0);
            mknod(&t.join("dev/initctl"), "p", 0, 0);
            // Private ones, one with a space in its name.
            mknod(&t.join(format!("dev/tty {i}")), "c", 4, i as u32);
            write(
                &t.join(format!("usr/local/bin/own-{name}")),
                &noise(30 + i as u64, 5000),
                0o4750,
            );
            chown(&t.join(format!("usr/local/bin/own-{name}")), 0, 70_000);
        }
        std::fs::create_dir_all(t.join("tmp")).unwrap();
        std::fs::set_permissions(t.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        // Same content as the shared base, different metadata per VM: not
        // shareable as a file, stored once by content within a partition.
        write(&t.join("opt/copy"), &noise(1, 300_000), 0o600 + (i as u32) * 0o10);
        // Shared by web and db only.
        if i < 2 {
            write(&t.join("srv/www/big.bin"), &noise(6, 500_000), 0o644);
        }
        // The shared library's content again, under a path of this VM's own.
        write(&t.join(format!("srv/{name}/libcopy.so")), &noise(1, 300_000), 0o644);
        // Own files.
        write(&t.join("etc/hostname"), name.as_bytes(), 0o644);
        write(&t.join(format!("var/lib/{name}/data")), &noise(10 + i as u64, 200_000), 0o600);
        write(&t.join("home/ünïcode name"), &noise(20 + i as u64, 100), 0o644);
        out.push(t);
    }
    out
}

struct Built {
    node: Node,
    vms: Vec<VmImage>,
    plan: Plan,
}

async fn prepared() -> Built {
    prepared_with(true).await
}

async fn prepared_with(specials: bool) -> Built {
    let node = node();
    let trees = trees(&node.dir.path().join("trees"), specials);
    let mut vms = Vec::new();
    let mut entries = Vec::new();
    for (t, name) in trees.iter().zip(["web", "db", "dev"]) {
        let image = node
            .images
            .import(&format!("dir:{}", t.display()), Arc::new(NoProgress))
            .await
            .unwrap();
        entries.push((name.to_string(), node.images.store().entries(&image, 0, u64::MAX).unwrap()));
        vms.push(VmImage { vm: name.to_string(), image });
    }
    let plan = analyze(&entries).unwrap().plan(&Policy {
        min_layer_bytes: 0,
        max_layers_per_vm: 8,
        share_across_paths: false,
        ..Policy::default()
    });
    assert!(plan.layers.len() >= 2, "{:?}", plan.stacks);
    Built { node, vms, plan }
}

impl Built {
    fn store(&self) -> &Store {
        self.node.images.store()
    }

    /// Builds every partition of the plan with default options.
    fn build(
        &self,
        shared: SharedFormat,
        private: PrivateFormat,
    ) -> Result<provd_partitions::Layout, PartitionError> {
        build_all(self.store(), &self.plan, &self.vms, shared, private, None, &opts())
    }

    /// Nothing but the images is left: no partition row or directory, no
    /// staging leftover.
    fn assert_no_partitions(&self) {
        assert_eq!(self.store().partitions().unwrap(), vec![]);
        assert_eq!(std::fs::read_dir(self.node.data.join("partitions")).unwrap().count(), 0);
        assert_eq!(self.store().staging_files().unwrap(), Vec::<String>::new());
    }
}

fn opts() -> BuildOptions {
    BuildOptions::default()
}

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

/// An entry as the overlay can show it: no modification time, hard links
/// as the files they name (identical shared files are one inode).
fn comparable(e: &provd_domain::image::Entry) -> String {
    use provd_domain::image::EntryKind;
    let kind = if e.kind == EntryKind::Hardlink { EntryKind::File } else { e.kind };
    let mode = if kind == EntryKind::Symlink { 0 } else { e.mode & 0o7777 };
    let target = if kind == EntryKind::Symlink { e.link_target.clone() } else { None };
    format!(
        "{} {} {:o} {}:{} {:?} {:?} {:?}",
        e.path,
        kind.as_str(),
        mode,
        e.uid,
        e.gid,
        e.hash,
        target,
        e.device
    )
}

/// Assembles `private`'s root with the boot script in a private mount
/// namespace, each shared partition `i` of its boot files mounted from
/// `shared[i]` (a loop mount of the image file), and copies the root out.
/// Returns what the guest sees, or `None` where this environment cannot
/// mount.
async fn assemble(b: &Built, private: &PartitionRecord, shared: &[PathBuf]) -> Option<Vec<String>> {
    let script = b.node.dir.path().join("provd-overlay-root");
    write(&script, provd_partitions::OVERLAY_ROOT_SCRIPT.as_bytes(), 0o755);
    let image = b.store().partition_path(&private.id).unwrap().join(&private.file);
    let work = b.node.dir.path().join(format!("boot-{}", private.id));
    std::fs::create_dir_all(work.join("root")).unwrap();
    let devices: String = shared
        .iter()
        .enumerate()
        .map(|(i, p)| format!("PROVD_SHARED_DEVICE_{i}={} ", p.display()))
        .collect();
    // As the initramfs would: mount the private partition as the root,
    // run the script, copy the assembled root out.
    let shell = format!(
        "set -e; mount {image} {work}/root; rootmnt={work}/root PROVD_RUN={work}/run \
         {devices}sh {script}; cp -a {work}/root/. {work}/copy",
        image = image.display(),
        work = work.display(),
        script = script.display()
    );
    let out =
        std::process::Command::new("unshare").args(["-m", "sh", "-c", &shell]).output().unwrap();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("permission denied")
            || err.contains("Operation not permitted")
            || err.contains("failed to setup loop device")
        {
            eprintln!("skipping the mount check: this environment cannot mount ({err})");
            return None;
        }
        panic!("assembling the root of {} failed: {err}", private.id);
    }
    let seen = b
        .node
        .images
        .import(&format!("dir:{}", work.join("copy").display()), Arc::new(NoProgress))
        .await
        .unwrap();
    Some(b.store().entries(&seen, 0, u64::MAX).unwrap().iter().map(comparable).collect())
}

fn partition_file(store: &Store, rec: &PartitionRecord) -> PathBuf {
    store.partition_path(&rec.id).unwrap().join(&rec.file)
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

/// One request of one VM on the node as it stands: planned against the
/// layers the node holds, built, and its figures.
fn one_vm_request(b: &Built, vm: &str, image: &ImageRecord) -> (Plan, provd_partitions::Layout) {
    let vms = vec![VmImage { vm: vm.to_string(), image: image.clone() }];
    let entries = vec![(vm.to_string(), b.store().entries(image, 0, u64::MAX).unwrap())];
    let node = provd_partitions::node_layers(b.store(), 1_000_000, &|_| true).unwrap();
    let policy = Policy { min_layer_bytes: 0, layer_unique_files: true, ..Policy::default() };
    let plan = provd_dedup::plan_on_node(&entries, &node, &policy).unwrap();
    let layout =
        build_all(b.store(), &plan, &vms, SharedFormat::Erofs, PrivateFormat::Ext4, None, &opts())
            .unwrap();
    (plan, layout)
}

#[tokio::test(flavor = "multi_thread")]
async fn vms_arriving_one_at_a_time_stack_what_the_node_holds_and_boot_exactly() {
    let b = prepared().await;
    let (web, db) = (b.vms[0].image.clone(), b.vms[1].image.clone());
    let image_bytes = |image: &ImageRecord| image.bytes;

    // web-1 alone: its files form a layer of its own on a new partition.
    let (plan, first) = one_vm_request(&b, "web-1", &web);
    let p1 = first.shared.clone().unwrap();
    assert_eq!(plan.shares["web-1"].new_shared_bytes, image_bytes(&web));
    assert_eq!(plan.shares["web-1"].private_bytes, 0);

    // web-2 alone: everything from the node; no shared partition built,
    // not one file byte stored again.
    let (plan, second) = one_vm_request(&b, "web-2", &web);
    assert!(second.shared.is_none());
    assert_eq!(plan.stored_bytes, 0);
    assert_eq!(plan.shares["web-2"].node_bytes, image_bytes(&web));
    assert_eq!(b.store().stack_of(&second.private[0].id).unwrap()[0].shared, p1.id);

    // db alone: web's layer with what db lacks hidden, and db's own files
    // on a second shared partition.
    let (plan, third) = one_vm_request(&b, "db-1", &db);
    let p3 = third.shared.clone().unwrap();
    let share = &plan.shares["db-1"];
    assert!(share.whiteouts > 0, "{share:?}");
    assert!(share.node_bytes > 0 && share.new_shared_bytes > 0, "{share:?}");
    assert_eq!(share.node_bytes + share.new_shared_bytes + share.private_bytes, image_bytes(&db));
    assert_eq!(plan.stored_bytes, share.new_shared_bytes + share.private_bytes);
    let db_partitions: Vec<String> =
        b.store().partitions_of_vm("db-1").unwrap().into_iter().map(|p| p.id).collect();
    assert!(db_partitions.contains(&p1.id) && db_partitions.contains(&p3.id));
    assert_eq!(b.store().partition(&p1.id).unwrap().unwrap().vms, ["db-1", "web-1", "web-2"]);

    for vm in ["web-1", "web-2", "db-1"] {
        let report = verify_vm(b.store(), vm, &opts()).unwrap();
        assert!(report.is_exact(), "{vm}: {:#?}", report.mismatches);
    }
    assert_eq!(
        verify_vm(b.store(), "db-1", &opts()).unwrap().shared,
        [p1.id.clone(), p3.id.clone()]
    );

    // The kernel's overlay shows db exactly its image from two shared
    // partitions and its whiteouts.
    let shared = [partition_file(b.store(), &p1), partition_file(b.store(), &p3)];
    if let Some(seen) = assemble(&b, &third.private[0], &shared).await {
        let want: Vec<String> =
            b.store().entries(&db, 0, u64::MAX).unwrap().iter().map(comparable).collect();
        assert_eq!(seen, want);
    }

    // A shared partition a stack names cannot go; it goes with the last
    // VM stacking it, and nothing else is left.
    let err = b.store().remove_partition(&p1.id).unwrap_err();
    assert!(err.to_string().contains("stack"), "{err}");
    b.store().release_vm("web-1").unwrap();
    b.store().release_vm("web-2").unwrap();
    assert!(b.store().partition(&p1.id).unwrap().is_some(), "db-1 still stacks it");
    assert!(verify_vm(b.store(), "db-1", &opts()).unwrap().is_exact());
    let removed = b.store().release_vm("db-1").unwrap();
    assert_eq!(removed.len(), 3, "db's private partition and both shared ones");
    b.assert_no_partitions();
}

#[tokio::test(flavor = "multi_thread")]
async fn added_files_are_checked_recorded_and_verified() {
    let b = prepared().await;
    let layout = b.build(SharedFormat::Erofs, PrivateFormat::Ext4).unwrap();
    let web = &layout.private[0];
    assert_eq!(web.vms, vec!["web"]);
    let add = |path: &str, content: &[u8], mode: u32| {
        provd_partitions::add_file(b.store(), &web.id, path, content, mode, &opts())
    };
    add("etc/hostname", b"web-7\n", 0o644).unwrap();
    add("var/lib/web/seed.txt", b"seed", 0o600).unwrap();
    let report = verify_vm(b.store(), "web", &opts()).unwrap();
    assert!(report.is_exact(), "{:#?}", report.mismatches);
    let before = std::fs::read(b.store().partition_path(&web.id).unwrap().join(&web.file)).unwrap();
    for (path, mode, expected) in [
        ("../etc/passwd", 0o644, "not a normalised relative path"),
        ("etc/$(reboot)", 0o644, "only A-Z a-z 0-9"),
        ("etc/shadow", 0o4755, "only permission bits 0777"),
        ("no/such/dir/file", 0o644, "parent directory is not in"),
        ("usr/bin", 0o644, "a dir is there"),
    ] {
        let err = add(path, b"x", mode).unwrap_err();
        assert!(err.to_string().contains(expected), "{path}: {err}");
    }
    let err =
        add("etc/big", &vec![0; provd_partitions::MAX_ADDED_FILE_BYTES + 1], 0o644).unwrap_err();
    assert!(err.to_string().contains("at most"), "{err}");
    let shared = layout.shared.as_ref().unwrap();
    let err = provd_partitions::add_file(b.store(), &shared.id, "etc/x", b"x", 0o644, &opts())
        .unwrap_err();
    assert!(err.to_string().contains("is shared"), "{err}");
    // The refusals changed nothing.
    let after = std::fs::read(b.store().partition_path(&web.id).unwrap().join(&web.file)).unwrap();
    assert!(before == after);
    assert_eq!(b.store().staging_files().unwrap(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_gets_one_private_partition_stacked_only_on_its_own_plans_layers() {
    let b = prepared().await;
    let shared = build_shared(b.store(), &b.plan, &b.vms, SharedFormat::Erofs, &opts()).unwrap();
    // Another plan (web and dev only) numbers its layers from 0 too, with
    // other content.
    let entries: Vec<_> = b
        .vms
        .iter()
        .filter(|v| v.vm != "db")
        .map(|v| (v.vm.clone(), b.store().entries(&v.image, 0, u64::MAX).unwrap()))
        .collect();
    let other = analyze(&entries).unwrap().plan(&Policy {
        min_layer_bytes: 0,
        max_layers_per_vm: 8,
        share_across_paths: false,
        ..Policy::default()
    });
    assert_eq!(other.layers[0].id, b.plan.layers[0].id);
    assert_ne!(other.layers[0].entries, b.plan.layers[0].entries);
    let err = build_private(
        b.store(),
        &other,
        &b.vms,
        "web",
        Some(&shared),
        PrivateFormat::Ext4,
        None,
        &opts(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("of this plan"), "{err}");
    // Its own plan: one private partition, and no second one.
    build_private(
        b.store(),
        &b.plan,
        &b.vms,
        "web",
        Some(&shared),
        PrivateFormat::Ext4,
        None,
        &opts(),
    )
    .unwrap();
    let err = build_private(
        b.store(),
        &b.plan,
        &b.vms,
        "web",
        Some(&shared),
        PrivateFormat::Ext4,
        None,
        &opts(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("already has private partition"), "{err}");
    // Deleting by a name that is not a VM name touches nothing.
    for bad in ["..", "/", "", "a/b"] {
        assert!(provd_vm::delete(b.store(), bad).is_err(), "{bad:?}");
    }
    assert!(b.node.data.join("partitions").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn content_under_other_paths_is_stored_once_and_every_vm_verifies() {
    let b = prepared().await;
    let entries: Vec<_> = b
        .vms
        .iter()
        .map(|v| (v.vm.clone(), b.store().entries(&v.image, 0, u64::MAX).unwrap()))
        .collect();
    let wide =
        analyze(&entries).unwrap().plan(&Policy { share_across_paths: true, ..Policy::default() });
    // Each VM's copy of the library under its own path moved into its alias
    // layer, stored once with the shared one.
    assert!(
        wide.stored_bytes + 3 * 300_000 - 300_000 <= b.plan.stored_bytes + 300_000,
        "{} vs {}",
        wide.stored_bytes,
        b.plan.stored_bytes
    );
    assert!(wide.stored_bytes < b.plan.stored_bytes);
    for v in &b.vms {
        assert!(!wide.private[&v.vm].iter().any(|e| e.path.ends_with("libcopy.so")));
    }
    let layout = build_all(
        b.store(),
        &wide,
        &b.vms,
        SharedFormat::Erofs,
        PrivateFormat::Ext4,
        None,
        &opts(),
    )
    .unwrap();
    for v in &b.vms {
        let report = verify_vm(b.store(), &v.vm, &opts()).unwrap();
        assert!(report.is_exact(), "{}: {:#?}", v.vm, report.mismatches);
    }
    // The shared partition holds the library's bytes once, not four times.
    let shared = layout.shared.unwrap();
    assert!(shared.bytes < 2 * 300_000 + 1_000_000, "{}", shared.bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repack_packs_the_layers_in_use_into_one_partition_and_every_vm_sees_the_same() {
    let b = prepared().await;
    let (web, db, dev) = (b.vms[0].image.clone(), b.vms[1].image.clone(), b.vms[2].image.clone());
    // One request per VM: web, db, dev, web, db, dev.
    for (i, image) in [&web, &db, &dev, &web, &db, &dev].into_iter().enumerate() {
        let (plan, _) = one_vm_request(&b, &format!("vm-{i}"), image);
        // Each image's files are stored once however many of its VMs come.
        if i >= 3 {
            assert_eq!(plan.stored_bytes, 0, "vm-{i}: {:?}", plan.shares);
        }
    }
    let shared_before: Vec<PartitionRecord> = b
        .store()
        .partitions()
        .unwrap()
        .into_iter()
        .filter(|p| p.role == provd_store::PartitionRole::Shared)
        .collect();
    assert_eq!(shared_before.len(), 3, "web's, db's own and dev's own layers");
    // Half the VMs go: web's first layer is still used, partly.
    for vm in ["vm-0", "vm-2", "vm-4"] {
        b.store().release_vm(vm).unwrap();
    }
    let usage = b.store().layer_usage().unwrap();
    let before: u64 = b
        .store()
        .partitions()
        .unwrap()
        .iter()
        .filter(|p| p.role == provd_store::PartitionRole::Shared)
        .map(|p| p.bytes)
        .sum();

    let done = provd_node::repack::repack(b.store(), None, SharedFormat::Erofs, &opts()).unwrap();
    assert_eq!(done.moved, ["vm-1", "vm-3", "vm-5"], "{done:#?}");
    assert!(done.failed.is_empty() && done.skipped.is_empty(), "{done:#?}");
    let shared_after: Vec<PartitionRecord> = b
        .store()
        .partitions()
        .unwrap()
        .into_iter()
        .filter(|p| p.role == provd_store::PartitionRole::Shared)
        .collect();
    assert_eq!(shared_after.len(), 1, "every old shared partition freed");
    assert_eq!(Some(&shared_after[0]), done.partition.as_ref());
    assert_eq!(done.shared_bytes_before, before);
    assert!(done.shared_bytes_after <= before, "{done:#?}");
    assert_eq!(shared_after[0].vms, ["vm-1", "vm-3", "vm-5"]);
    let after = b.store().layer_usage().unwrap();
    assert!(after.unused_bytes == 0 && after.bytes <= usage.bytes, "{usage:?} → {after:?}");
    for vm in ["vm-1", "vm-3", "vm-5"] {
        let report = verify_vm(b.store(), vm, &opts()).unwrap();
        assert!(report.is_exact(), "{vm}: {:#?}", report.mismatches);
        assert_eq!(report.shared, [shared_after[0].id.clone()]);
    }
    // The kernel's overlay agrees for the VM with whiteouts (db on web's
    // layer, now cut to what db sees).
    let private = b
        .store()
        .partitions_of_vm("vm-1")
        .unwrap()
        .into_iter()
        .find(|p| p.role == provd_store::PartitionRole::Private)
        .unwrap();
    if let Some(seen) = assemble(&b, &private, &[partition_file(b.store(), &shared_after[0])]).await
    {
        let want: Vec<String> =
            b.store().entries(&db, 0, u64::MAX).unwrap().iter().map(comparable).collect();
        assert_eq!(seen, want);
    }
    // A VM arriving after the repack stacks the repacked layers.
    let (plan, _) = one_vm_request(&b, "vm-6", &dev);
    assert_eq!(plan.stored_bytes, 0, "{:?}", plan.shares);
    assert!(verify_vm(b.store(), "vm-6", &opts()).unwrap().is_exact());
    for vm in ["vm-1", "vm-3", "vm-5", "vm-6"] {
        b.store().release_vm(vm).unwrap();
    }
    b.assert_no_partitions();
}

/// A repack stopped at each of its steps (as a crash would leave it) is
/// settled at the next start: every VM boots from a complete stack it
/// carries, and no shared partition is left that nothing names.
#[tokio::test(flavor = "multi_thread")]
async fn a_repack_interrupted_at_any_step_is_settled_at_the_next_start() {
    use provd_partitions::repack::{moved_manifest, plan_repack, rewrite_boot_files};
    let b = prepared().await;
    let (web, db) = (b.vms[0].image.clone(), b.vms[1].image.clone());
    for (i, image) in [&web, &db, &web].into_iter().enumerate() {
        one_vm_request(&b, &format!("vm-{i}"), image);
    }
    b.store().release_vm("vm-0").unwrap();
    let shared_ids = |store: &Store| -> Vec<String> {
        let mut ids: Vec<String> = store
            .partitions()
            .unwrap()
            .into_iter()
            .filter(|p| p.role == provd_store::PartitionRole::Shared)
            .map(|p| p.id)
            .collect();
        ids.sort();
        ids
    };
    let before = shared_ids(b.store());
    let all_exact = |b: &Built| {
        for vm in ["vm-1", "vm-2"] {
            let report = verify_vm(b.store(), vm, &opts()).unwrap();
            assert!(report.is_exact(), "{vm}: {:#?}", report.mismatches);
        }
    };
    for step in 0..3 {
        let planned = plan_repack(b.store(), None).unwrap();
        assert_eq!(planned.moves.len(), 2);
        let shared =
            build_shared(b.store(), &planned.plan, &planned.vms, SharedFormat::Erofs, &opts())
                .unwrap();
        let mv = &planned.moves[0];
        let (manifest, rows) = moved_manifest(mv, &planned.plan, &shared).unwrap();
        if step >= 1 {
            let json = serde_json::to_string_pretty(&manifest).unwrap();
            b.store().begin_restack(&mv.private.id, &rows, &json).unwrap();
        }
        // At step 2 the boot files are rewritten, with what the partition
        // carries changed as a guest could change it (its image and digest
        // here): the node keeps its own manifest, not that text.
        let mut tampered = manifest.clone();
        tampered.image = "dir:/guest-says-so".into();
        tampered.image_digest = "0".repeat(64);
        if step >= 2 {
            rewrite_boot_files(b.store(), &mv.private, &tampered, &opts()).unwrap();
        }
        // The next start: moves settled, unused shared partitions freed.
        provd_node::repack::recover(b.store()).unwrap();
        b.store().free_unused_shared().unwrap();
        all_exact(&b);
        assert!(b.store().pending_restacks().unwrap().is_empty());
        let now = shared_ids(b.store());
        if step < 2 {
            assert_eq!(now, before, "step {step}: the new partition is gone, nothing moved");
        } else {
            assert!(now.contains(&shared.id), "step {step}: {} carries it", mv.vm);
            assert_eq!(b.store().stack_of(&mv.private.id).unwrap()[0].shared, shared.id);
            let stored = b.store().partition(&mv.private.id).unwrap().unwrap().manifest;
            let stored: provd_partitions::PrivateManifest = serde_json::from_str(&stored).unwrap();
            assert_eq!(stored, manifest, "step {step}: the node's own manifest is stored");
        }
    }
    // A full repack then leaves one shared partition.
    let done = provd_node::repack::repack(b.store(), None, SharedFormat::Erofs, &opts()).unwrap();
    assert_eq!(done.moved.len(), 2, "{done:#?}");
    assert_eq!(shared_ids(b.store()).len(), 1);
    all_exact(&b);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stack_reaching_another_tenants_partition_is_refused_whatever_the_plan_says() {
    let b = prepared().await;
    let web = b.vms[0].image.clone();
    // web-1 of tenant a: its files on a shared partition of domain tenant:a.
    let of = |t: &str| BuildOptions { domain: format!("tenant:{t}"), ..opts() };
    let vms = vec![VmImage { vm: "web-1".into(), image: web.clone() }];
    let entries = vec![("web-1".to_string(), b.store().entries(&web, 0, u64::MAX).unwrap())];
    let policy = Policy { min_layer_bytes: 0, layer_unique_files: true, ..Policy::default() };
    let plan = provd_dedup::plan_on_node(&entries, &[], &policy).unwrap();
    let shared =
        provd_partitions::build_shared(b.store(), &plan, &vms, SharedFormat::Erofs, &of("a"))
            .unwrap();
    assert_eq!(shared.domain, "tenant:a");

    // A plan for tenant b made against every layer, as a forged plan would
    // be: it stacks a's layer, and building b's private partition on it is
    // refused, naming the partition and its domain.
    let vms = vec![VmImage { vm: "web-2".into(), image: web.clone() }];
    let entries = vec![("web-2".to_string(), b.store().entries(&web, 0, u64::MAX).unwrap())];
    let all = provd_partitions::node_layers(b.store(), 1_000_000, &|_| true).unwrap();
    let forged = provd_dedup::plan_on_node(&entries, &all, &policy).unwrap();
    assert_eq!(forged.shares["web-2"].node_bytes, web.bytes);
    let err =
        build_private(b.store(), &forged, &vms, "web-2", None, PrivateFormat::Ext4, None, &of("b"))
            .unwrap_err();
    assert!(matches!(err, PartitionError::OtherDomain { .. }), "{err}");
    assert!(err.to_string().contains(&shared.id) && err.to_string().contains("tenant:a"), "{err}");
    assert!(b.store().partitions_of_vm("web-2").unwrap().is_empty());

    // The layers tenant b may see hold nothing of a's; tenant a's own VM
    // stacks them.
    let visible_to_b = provd_partitions::node_layers(b.store(), 1_000_000, &|d| {
        provd_domain::trust::may_see("b", d)
    })
    .unwrap();
    assert!(visible_to_b.is_empty());
    let private =
        build_private(b.store(), &forged, &vms, "web-2", None, PrivateFormat::Ext4, None, &of("a"))
            .unwrap();
    assert_eq!(private.domain, "tenant:a");
}
