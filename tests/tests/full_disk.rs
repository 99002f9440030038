// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! A data directory on a disk that really fills up: a small tmpfs mounted
//! by the test (root, like every partition test). The free-space reserve
//! is set to zero, so the writes themselves meet `ENOSPC`: an image import
//! and a store commit fail with the disk named, a partition build is
//! refused on its size estimate, each leaves nothing behind, and the same
//! store works once space is freed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use provd_dedup::{Policy, analyze};
use provd_images::{Images, ImportLimits, NoProgress};
use provd_partitions::{BuildOptions, PrivateFormat, SharedFormat, VmImage, build_all};
use provd_store::Store;

/// A tmpfs of `mib` MiB, unmounted when dropped.
struct SmallDisk {
    _dir: tempfile::TempDir,
    mount: PathBuf,
}

impl SmallDisk {
    fn new(mib: u64) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("disk");
        std::fs::create_dir(&mount).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700"), "provd-full-disk"])
            .arg(&mount)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs needs root (as building partitions does)");
        SmallDisk { _dir: dir, mount }
    }

    /// Fills the disk but `keep` bytes with a ballast file.
    fn fill(&self, keep: u64) -> PathBuf {
        let ballast = self.mount.join("ballast");
        let out =
            Command::new("stat").args(["-f", "-c", "%a %S"]).arg(&self.mount).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let mut fields = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
        let free = fields.next().unwrap() * fields.next().unwrap();
        let mut f = std::fs::File::create(&ballast).unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        let mut left = free.saturating_sub(keep);
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n]).unwrap();
            left -= n as u64;
        }
        f.sync_all().unwrap();
        ballast
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

/// A tree of `files` files of `size` bytes of distinct content.
fn tree(root: &Path, files: usize, size: usize, seed: u8) {
    provd_tests::library_tree(root, files, size, seed).unwrap();
}

fn store_on(disk: &SmallDisk) -> Arc<Store> {
    let mut store = Store::open(&disk.mount.join("data")).unwrap();
    // No reserve: the writes themselves must meet the full disk.
    store.min_free_bytes = 0;
    Arc::new(store)
}

fn objects(data: &Path) -> usize {
    std::fs::read_dir(data.join("objects"))
        .map(|d| d.map(|s| std::fs::read_dir(s.unwrap().path()).unwrap().count()).sum())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_fails_imports_builds_and_commits_cleanly_and_the_store_works_after() {
    let disk = SmallDisk::new(512);
    let store = store_on(&disk);
    let data = disk.mount.join("data");
    let images = Images::new(store.clone(), ImportLimits::default(), 1);
    let src = tempfile::tempdir().unwrap();
    let import = |root: PathBuf| {
        let images = &images;
        async move { images.import(&format!("dir:{}", root.display()), Arc::new(NoProgress)).await }
    };

    // Two small images fit.
    let mut vms = Vec::new();
    let mut entries = Vec::new();
    for (name, seed) in [("web", 2u8), ("db", 3)] {
        let root = src.path().join(name);
        tree(&root, 4, 1 << 20, 1);
        tree(&root.join("own"), 1, 300_000, seed);
        let image = import(root).await.unwrap();
        entries.push((name.to_string(), store.entries(&image, 0, u64::MAX).unwrap()));
        vms.push(VmImage { vm: name.to_string(), image });
    }
    let plan = analyze(&entries).unwrap().plan(&Policy { min_layer_bytes: 0, ..Policy::default() });
    let objects_before = objects(&data);

    // 8 MiB left: a 24 MiB image meets ENOSPC mid-import.
    let ballast = disk.fill(8 << 20);
    let big = src.path().join("big");
    tree(&big, 24, 1 << 20, 4);
    let err = import(big).await.unwrap_err().to_string();
    assert!(err.contains("No space left on device"), "{err}");
    println!("import on a full disk: {err}");
    assert_eq!(store.stats().unwrap().images, 2);
    assert_eq!(objects(&data), objects_before, "no object of the failed import stays");
    assert!(store.staging_files().unwrap().is_empty());

    // The partitions do not fit either: the build is refused on its size
    // estimate before it writes, and leaves no partition.
    let build = || {
        build_all(
            &store,
            &plan,
            &vms,
            SharedFormat::Erofs,
            PrivateFormat::Ext4,
            None,
            &BuildOptions::default(),
        )
    };
    let err = build().unwrap_err().to_string();
    assert!(err.contains("bytes of free space;"), "{err}");
    println!("build on a full disk: {err}");
    assert_eq!(store.partitions().unwrap(), vec![]);
    assert_eq!(std::fs::read_dir(data.join("partitions")).unwrap().count(), 0);
    assert!(store.staging_files().unwrap().is_empty());

    // Full to the last block: even a 10 kB image fails (its object or its
    // commit), and leaves the store as it was.
    std::fs::remove_file(&ballast).unwrap();
    let ballast = disk.fill(0);
    let tiny = src.path().join("tiny");
    tree(&tiny, 1, 10_000, 9);
    let err = import(tiny.clone()).await.unwrap_err().to_string();
    assert!(err.contains("No space left on device") || err.contains("full"), "{err}");
    println!("tiny import on a disk full to the last block: {err}");
    assert_eq!(store.stats().unwrap().images, 2);
    assert_eq!(objects(&data), objects_before);

    // Space freed: the same store imports and builds.
    std::fs::remove_file(&ballast).unwrap();
    import(tiny).await.unwrap();
    let layout = build().unwrap();
    assert_eq!(layout.private.len(), 2);
}
