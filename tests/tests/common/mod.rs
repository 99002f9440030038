//! What the partition tests share: a node with an image service, three
//! generated trees with every kind of entry, and a plan over them.

// Each test binary uses a part of these.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use provd_dedup::{Plan, Policy, analyze};
use provd_images::{Images, ImportLimits, NoProgress};
use provd_partitions::{
    BuildOptions, PartitionError, PrivateFormat, SharedFormat, VmImage, build_all,
};
use provd_store::{PartitionRecord, Store};

pub struct Node {
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub images: Images,
}

pub fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = Arc::new(Store::open(&data).unwrap());
    Node { images: Images::new(store, ImportLimits::default(), 2), data, dir }
}

pub fn write(path: &Path, content: &[u8], mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

pub fn mknod(path: &Path, kind: &str, major: u32, minor: u32) {
    let mut cmd = std::process::Command::new("mknod");
    cmd.arg(path).arg(kind);
    if kind != "p" {
        cmd.arg(major.to_string()).arg(minor.to_string());
    }
    assert!(cmd.status().unwrap().success());
}

/// Pseudo-random bytes, so content does not compress away.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
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
pub fn trees(root: &Path, specials: bool) -> Vec<PathBuf> {
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

pub struct Built {
    pub node: Node,
    pub vms: Vec<VmImage>,
    pub plan: Plan,
}

pub async fn prepared() -> Built {
    prepared_with(true).await
}

pub async fn prepared_with(specials: bool) -> Built {
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
    pub fn store(&self) -> &Store {
        self.node.images.store()
    }

    /// Builds every partition of the plan with default options.
    pub fn build(
        &self,
        shared: SharedFormat,
        private: PrivateFormat,
    ) -> Result<provd_partitions::Layout, PartitionError> {
        build_all(self.store(), &self.plan, &self.vms, shared, private, None, &opts())
    }

    /// Nothing but the images is left: no partition row or directory, no
    /// staging leftover.
    pub fn assert_no_partitions(&self) {
        assert_eq!(self.store().partitions().unwrap(), vec![]);
        assert_eq!(std::fs::read_dir(self.node.data.join("partitions")).unwrap().count(), 0);
        assert_eq!(self.store().staging_files().unwrap(), Vec::<String>::new());
    }
}

pub fn opts() -> BuildOptions {
    BuildOptions::default()
}

/// An entry as the overlay can show it: no modification time, hard links
/// as the files they name (identical shared files are one inode).
pub fn comparable(e: &provd_domain::image::Entry) -> String {
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
pub async fn assemble(
    b: &Built,
    private: &PartitionRecord,
    shared: &[PathBuf],
) -> Option<Vec<String>> {
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

pub fn partition_file(store: &Store, rec: &PartitionRecord) -> PathBuf {
    store.partition_path(&rec.id).unwrap().join(&rec.file)
}
