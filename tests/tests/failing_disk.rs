// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! A data directory on a disk whose writes start failing: a real ext4
//! (`mkfs.ext4`, mounted through a loop device) whose backing file lives on
//! a tmpfs that the test sizes so that the device runs out of blocks after
//! a chosen number of bytes. From then on, the block layer fails every
//! write: the kernel logs an I/O error, ext4 fails `fsync` and aborts its
//! journal, exactly as on a disk that went bad. The test sweeps that point
//! across a whole provisioning flow (two image imports, their commits, a
//! plan, the shared and private partitions) so that the failure lands in
//! each step. The build runs in a journalled operation and is synced once
//! before the operation's success is recorded, as the daemon does.
//!
//! At every point, each step either succeeds or fails with an error that
//! names the I/O failure; nothing panics. Then the disk is "replaced" as an
//! operator would: unmounted, given room, `e2fsck -fy`, mounted again, and
//! the store reopened. After that:
//! - every image the store lists has every object, each of the right
//!   content; every import that reported success is there;
//! - a build that reported success verifies file by file; one that failed
//!   left no partition, row or file;
//! - nothing is left in staging and nothing for a second collection;
//! - the same store then imports and builds again.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use provd_dedup::{Policy, analyze};
use provd_images::{Images, ImportLimits, NoProgress};
use provd_partitions::{BuildOptions, PrivateFormat, SharedFormat, VmImage, build_all, verify_vm};
use provd_store::{Freed, NewOperation, OpState, Store};

const DEVICE_BYTES: u64 = 2 << 30;

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// An ext4 on a loop device over a sparse file on a tmpfs.
struct FailingDisk {
    _dir: tempfile::TempDir,
    back: PathBuf,
    image: PathBuf,
    mount: PathBuf,
}

impl FailingDisk {
    fn new() -> FailingDisk {
        let dir = tempfile::tempdir().unwrap();
        let back = dir.path().join("back");
        let mount = dir.path().join("disk");
        std::fs::create_dir(&back).unwrap();
        std::fs::create_dir(&mount).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512m,mode=0700", "provd-failing-disk"])
            .arg(&back)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs needs root (as building partitions does)");
        let image = back.join("disk.img");
        std::fs::File::create(&image).unwrap().set_len(DEVICE_BYTES).unwrap();
        // Every block the file system needs is written now, not lazily by
        // the kernel later, so that the sweep's budget counts only what
        // provd writes.
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-N", "8192", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&image));
        let disk = FailingDisk { _dir: dir, back, image, mount };
        disk.mount();
        disk
    }

    fn mount(&self) {
        run(Command::new("mount")
            .args(["-o", "loop,errors=continue"])
            .arg(&self.image)
            .arg(&self.mount));
    }

    fn data(&self) -> PathBuf {
        self.mount.join("data")
    }

    /// Bytes the backing file holds.
    fn used(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.image).unwrap().blocks() * 512
    }

    /// Lets the device write `bytes` more, then fail.
    fn fail_after(&self, bytes: u64) {
        run(Command::new("sync").arg("-f").arg(&self.mount));
        let size = self.used() + bytes;
        run(Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.back));
    }

    /// The operator's repair: unmount, room again, e2fsck, mount.
    fn repair(&self) -> i32 {
        // The unmount writes what it can; what it cannot is what e2fsck
        // repairs.
        let _ = Command::new("umount").arg(&self.mount).status();
        run(Command::new("mount").args(["-o", "remount,size=512m"]).arg(&self.back));
        let fsck = Command::new("e2fsck").args(["-f", "-y"]).arg(&self.image).output().unwrap();
        let code = fsck.status.code().unwrap_or(-1);
        // 0: clean, 1: errors corrected. Anything else leaves a disk no
        // operator would mount.
        assert!(
            code == 0 || code == 1,
            "e2fsck exit {code}: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        self.mount();
        code
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = Command::new("umount").arg(&self.back).status();
    }
}

/// A tree of `files` files of `size` bytes of distinct content, and a
/// hostname.
fn tree(root: &Path, files: usize, size: usize, seed: u8) {
    provd_tests::library_tree(root, files, size, seed).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hostname"), format!("vm-{seed}\n")).unwrap();
}

fn open_store(disk: &FailingDisk) -> Result<Arc<Store>, String> {
    let mut store = Store::open(&disk.data()).map_err(|e| e.to_string())?;
    // The device is small; its failing writes, not the reserve, are what
    // this test meets.
    store.min_free_bytes = 0;
    Ok(Arc::new(store))
}

/// What each step of the flow answered.
#[derive(Debug, Default)]
struct Flow {
    imported: Vec<String>,
    steps: Vec<(&'static str, Result<(), String>)>,
    built: bool,
}

/// Two imports, a plan and a build of both VMs' partitions.
async fn flow(store: &Arc<Store>, src: &Path) -> Flow {
    let images = Images::new(store.clone(), ImportLimits::default(), 1);
    let mut out = Flow::default();
    let mut vms = Vec::new();
    let mut entries = Vec::new();
    for name in ["web", "db"] {
        let reference = format!("dir:{}", src.join(name).display());
        match images.import(&reference, Arc::new(NoProgress)).await {
            Ok(image) => {
                out.imported.push(image.reference.clone());
                entries.push((name.to_string(), store.entries(&image, 0, u64::MAX).unwrap()));
                vms.push(VmImage { vm: name.to_string(), image });
                out.steps.push(("import", Ok(())));
            }
            Err(e) => {
                out.steps.push(("import", Err(e.to_string())));
                return out;
            }
        }
    }
    let plan = analyze(&entries).unwrap().plan(&Policy { min_layer_bytes: 0, ..Policy::default() });
    // The build runs in a journalled operation, as the daemon runs it: a
    // rollback the failing disk refuses is finished at the next start.
    let id = provd_store::new_id("op-", 16);
    let point = store.sync_point().unwrap();
    let op = NewOperation {
        id: id.clone(),
        idempotency_key: None,
        request_digest: String::new(),
        plugin: "test".into(),
        version: "0.1.0".into(),
        input: "{}".into(),
        actor: "local".into(),
        vms: vec!["web".into(), "db".into()],
    };
    if let Err(e) = store.start_operation(&op, &[]) {
        out.steps.push(("start operation", Err(e.to_string())));
        return out;
    }
    let opts = BuildOptions { operation: Some(id.clone()), ..BuildOptions::default() };
    let built =
        build_all(store, &plan, &vms, SharedFormat::Erofs, PrivateFormat::Ext4, None, &opts);
    if let Err(e) = built {
        out.steps.push(("build", Err(e.to_string())));
        let _ =
            store.finish_operation(&id, OpState::Failed, None, Some(("failed", "x")), None, &[]);
        return out;
    }
    out.steps.push(("build", Ok(())));
    // As the daemon does: one sync of everything the operation wrote, then
    // its success on record.
    if let Err(e) = store.sync_since(&point) {
        out.steps.push(("sync", Err(e.to_string())));
        let _ =
            store.finish_operation(&id, OpState::Failed, None, Some(("failed", "x")), None, &[]);
        return out;
    }
    match store.finish_operation(&id, OpState::Succeeded, Some("{}"), None, None, &[]) {
        Ok(_) => {
            out.built = true;
            out.steps.push(("finish operation", Ok(())));
        }
        Err(e) => out.steps.push(("finish operation", Err(e.to_string()))),
    }
    out
}

/// The invariants after a repair, for a flow that answered `flow`.
fn check_after_repair(store: &Store, flow: &Flow, at: &str) {
    assert!(store.staging_files().unwrap().is_empty(), "{at}: staging left");
    assert_eq!(store.gc().unwrap(), Freed::default(), "{at}: garbage left after the reopen");
    assert!(store.missing_objects().unwrap().is_empty(), "{at}: objects missing");
    let listed: Vec<String> = store.images().unwrap().into_iter().map(|i| i.reference).collect();
    for reference in &flow.imported {
        assert!(listed.contains(reference), "{at}: {reference} reported imported, then lost");
    }
    for image in store.images().unwrap() {
        for e in store.entries(&image, 0, u64::MAX).unwrap() {
            if let Some(hash) = e.hash {
                let data = store.read_object(&hash, u64::MAX).unwrap();
                assert_eq!(
                    blake3::hash(&data).as_bytes(),
                    &hash.0,
                    "{at}: {} of {} has other content than committed",
                    e.path,
                    image.reference
                );
            }
        }
    }
    let partitions = store.partitions().unwrap();
    if flow.built {
        for vm in ["web", "db"] {
            verify_vm(store, vm, &BuildOptions::default())
                .unwrap_or_else(|e| panic!("{at}: {vm} built, then does not verify: {e}"));
        }
    } else {
        assert_eq!(partitions.len(), 0, "{at}: a failed build left {partitions:?}");
        let files = std::fs::read_dir(store.path().join("partitions")).unwrap().count();
        assert_eq!(files, 0, "{at}: a failed build left partition files");
    }
}

/// The error a step gave names the failing device, not something else.
fn names_the_io_failure(err: &str) -> bool {
    [
        "Input/output error",
        "No space left on device",
        "Read-only file system",
        "disk I/O error",
        "database or disk is full",
        "exited with",
    ]
    .iter()
    .any(|s| err.contains(s))
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_failing_at_any_point_of_a_flow_lose_nothing_reported_done_and_leave_nothing() {
    let src = tempfile::tempdir().unwrap();
    tree(&src.path().join("web"), 6, 400_000, 1);
    tree(&src.path().join("web/opt"), 2, 300_000, 2);
    tree(&src.path().join("db"), 6, 400_000, 1);
    tree(&src.path().join("db/opt"), 2, 300_000, 3);

    // How much the whole flow writes on a good disk.
    let total = {
        let disk = FailingDisk::new();
        let store = open_store(&disk).unwrap();
        run(Command::new("sync").arg("-f").arg(&disk.mount));
        let before = disk.used();
        let flow = flow(&store, src.path()).await;
        assert!(flow.built, "{flow:?}");
        drop(store);
        run(Command::new("sync").arg("-f").arg(&disk.mount));
        disk.used() - before
    };
    println!("the flow writes {total} bytes on a good disk");

    // 16 points spread over the flow, more near its end where the last
    // partition and the commits are written, and one with room to spare.
    let mut budgets: Vec<u64> = (0..16).map(|k| total * k / 16).collect();
    budgets.extend([256 << 10, 64 << 10, 16 << 10, 4 << 10].map(|b| total - b));
    budgets.push(total + (1 << 20));
    let mut failed_in = std::collections::BTreeMap::<&str, usize>::new();
    let mut succeeded = 0;
    for budget in budgets {
        let at = format!("failing after {budget} bytes");
        let disk = FailingDisk::new();
        let store = open_store(&disk).unwrap();
        disk.fail_after(budget);
        let first = flow(&store, src.path()).await;
        drop(store);
        let failed = first.steps.iter().find_map(|(step, r)| r.as_ref().err().map(|e| (*step, e)));
        let fsck = disk.repair();
        match failed {
            Some((step, err)) => {
                *failed_in.entry(step).or_default() += 1;
                println!("{at}: {step} failed (e2fsck {fsck}): {err}");
                assert!(names_the_io_failure(err), "{at}: {step}: {err}");
            }
            None => {
                succeeded += 1;
                println!("{at}: every step succeeded (e2fsck {fsck})");
            }
        }
        let store = open_store(&disk).unwrap_or_else(|e| panic!("{at}: reopening: {e}"));
        let rolled_back = provd_node::operations::Operations::recover(&store, None).unwrap();
        assert!(rolled_back <= 1, "{at}");
        check_after_repair(&store, &first, &at);
        // The repaired node serves: the whole flow again, on a node
        // emptied of what the first flow built.
        let mut left = store.partitions().unwrap();
        left.sort_by_key(|p| p.role != provd_store::PartitionRole::Private);
        for p in left {
            store.remove_partition(&p.id).unwrap();
        }
        let again = flow(&store, src.path()).await;
        assert!(again.built, "{at}: after the repair: {again:?}");
        check_after_repair(&store, &again, &format!("{at}, after the repair"));
    }
    println!("failures by step: {failed_in:?}, {succeeded} flows succeeded");
    assert!(succeeded > 0, "not even with room to spare");
    assert!(failed_in.contains_key("import"), "no point failed an import: {failed_in:?}");
    assert!(
        failed_in.contains_key("build") || failed_in.contains_key("sync"),
        "no point failed a build or its sync: {failed_in:?}"
    );
}
