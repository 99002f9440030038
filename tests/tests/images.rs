// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! Images into the content-addressed store: local trees and archives, shared
//! content stored once, reference counts and gc, concurrency, a full disk
//! and a crash's leftovers. Hostile archives are `hostile_archives.rs`'s.

mod image_store;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use image_store::{Node, archive, good, import_bytes, node};
use provd_domain::image::EntryKind;
use provd_images::{Images, ImportLimits};
use provd_store::Store;

/// A small root filesystem: nested dirs, files, an empty file, a symlink,
/// content shared under two paths, a setuid binary.
fn make_tree(root: &Path, flavour: &str) {
    std::fs::create_dir_all(root.join("etc/apt")).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::write(root.join("etc/hostname"), format!("{flavour}\n")).unwrap();
    std::fs::write(
        root.join("etc/apt/sources.list"),
        "deb http://deb.debian.org/debian bookworm main\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/empty"), "").unwrap();
    std::fs::write(root.join("usr/bin/tool"), vec![0x7fu8; 300_000]).unwrap();
    std::fs::write(root.join("usr/bin/tool-copy"), vec![0x7fu8; 300_000]).unwrap();
    std::fs::write(
        root.join("usr/bin/big"),
        (0..3_000_000u32).map(|i| (i % 253) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    std::os::unix::fs::symlink("../usr/bin/tool", root.join("etc/tool-link")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("usr/bin/tool"), std::fs::Permissions::from_mode(0o4755))
        .unwrap();
}

fn gnu_tar(args: &[&str]) {
    let status = Command::new("tar").args(args).status().unwrap();
    assert!(status.success(), "tar {args:?}");
}

#[tokio::test]
async fn a_tree_and_its_archives_import_to_the_same_image() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("rootfs");
    make_tree(&tree, "a");
    let tar = work.path().join("rootfs.tar");
    gnu_tar(&["-C", tree.to_str().unwrap(), "-cf", tar.to_str().unwrap(), "."]);
    let tgz = work.path().join("rootfs.tar.gz");
    gnu_tar(&["-C", tree.to_str().unwrap(), "-czf", tgz.to_str().unwrap(), "."]);
    // Named .tar on purpose: compression is detected from content.
    let tzst = work.path().join("rootfs-zstd.tar");
    let raw = std::fs::read(&tar).unwrap();
    std::fs::write(&tzst, zstd::encode_all(raw.as_slice(), 3).unwrap()).unwrap();

    let node = node();
    let from_dir = node.import(tree.to_str().unwrap()).await.unwrap();
    assert_eq!(from_dir.reference, format!("dir:{}", tree.display()));
    assert_eq!(from_dir.source, "dir");
    for archive in [&tar, &tgz, &tzst] {
        let image = node.import(archive.to_str().unwrap()).await.unwrap();
        assert_eq!(image.source, "tar");
        assert_eq!(image.digest, from_dir.digest, "{} differs from the tree", archive.display());
    }
    // 4 images, but the content is stored once: hostname, sources.list,
    // empty, tool (= tool-copy), big.
    let stats = node.store().stats().unwrap();
    assert_eq!((stats.images, stats.objects), (4, 5));
    assert_eq!(node.object_files().len(), 5);

    let entries = node.store().entries(&from_dir, 0, 100).unwrap();
    let get = |p: &str| entries.iter().find(|e| e.path == p).unwrap_or_else(|| panic!("{p}"));
    assert_eq!(get("usr/bin/tool").mode, 0o4755);
    assert_eq!(get("usr/bin/tool").hash, get("usr/bin/tool-copy").hash);
    assert_eq!(get("etc/tool-link").kind, EntryKind::Symlink);
    assert_eq!(get("etc/tool-link").link_target.as_deref(), Some("../usr/bin/tool"));
    assert_eq!(get("etc/empty").size, 0);
    let big = get("usr/bin/big");
    let bytes = node.store().read_object(big.hash.as_ref().unwrap(), 10 << 20).unwrap();
    assert_eq!(blake3::hash(&bytes).as_bytes(), &big.hash.unwrap().0);
    assert!(node.store().read_object(big.hash.as_ref().unwrap(), 1000).is_err());
    // Objects are read-only files.
    use std::os::unix::fs::PermissionsExt;
    for f in node.object_files() {
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o400);
    }
}

#[tokio::test]
async fn a_second_image_stores_only_its_new_content_and_removal_frees_exactly_the_unused() {
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    make_tree(&a, "a");
    make_tree(&b, "b"); // differs from a in etc/hostname only
    let node = node();
    node.import(a.to_str().unwrap()).await.unwrap();
    let after_a = node.store().stats().unwrap();
    node.import(b.to_str().unwrap()).await.unwrap();
    let after_b = node.store().stats().unwrap();
    assert_eq!(after_b.objects, after_a.objects + 1);
    assert_eq!(after_b.object_bytes, after_a.object_bytes + 2);

    let freed = node.store().remove_image(&format!("dir:{}", a.display())).unwrap();
    assert_eq!((freed.objects, freed.bytes), (1, 2)); // "a\n"
    assert_eq!(node.store().gc().unwrap(), provd_store::Freed::default());
    assert!(node.store().missing_objects().unwrap().is_empty());
    assert_eq!(node.object_files().len() as u64, after_a.objects);

    let freed = node.store().remove_image(&format!("dir:{}", b.display())).unwrap();
    assert_eq!(freed.objects, after_a.objects);
    node.assert_empty();
    assert!(node.store().remove_image("dir:/nothing").is_err());
}

#[tokio::test]
async fn twenty_concurrent_imports_of_one_image_read_it_once() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("rootfs");
    make_tree(&tree, "x");
    let tar = work.path().join("rootfs.tar.gz");
    gnu_tar(&["-C", tree.to_str().unwrap(), "-czf", tar.to_str().unwrap(), "."]);
    let node = Arc::new(node());
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let node = node.clone();
        let reference = tar.to_str().unwrap().to_string();
        tasks.push(tokio::spawn(async move { node.import(&reference).await.unwrap() }));
    }
    let mut records = Vec::new();
    for t in tasks {
        records.push(t.await.unwrap());
    }
    assert!(records.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(node.images.source_reads(), 1);
    assert_eq!(node.store().stats().unwrap().images, 1);
}

#[tokio::test]
async fn a_data_directory_has_one_owner() {
    let node = node();
    let err = Store::open(&node.data).unwrap_err();
    assert!(err.to_string().contains("is in use by another provd process"), "{err}");
}

// ---------------------------------------------------------------------
// Hostile archives, built byte by byte so that nothing sanitises them.

/// How an entry's name (and link target) is written in the archive: the
/// old header's 100-byte field, a GNU long-name record, or a PAX record.
/// A trick must be refused whichever way it is spelled.
#[tokio::test]
async fn an_import_that_would_fill_the_disk_is_refused_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("data")).unwrap();
    store.min_free_bytes = u64::MAX;
    let node = Node {
        images: Images::new(Arc::new(store), ImportLimits::default(), 1),
        data: dir.path().join("data"),
        _dir: dir,
    };
    let err = import_bytes(&node, &archive(&[good()])).await.unwrap_err();
    assert!(err.to_string().contains("must stay free"), "{err}");
    node.assert_empty();
}

#[test]
fn leftovers_of_a_crash_are_collected_when_the_store_opens() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    drop(Store::open(&data).unwrap());
    // What a crash between writing objects and committing leaves behind.
    let stray = blake3::hash(b"stray").to_hex().to_string();
    std::fs::create_dir_all(data.join("objects").join(&stray[..2])).unwrap();
    std::fs::write(data.join("objects").join(&stray[..2]).join(&stray), b"stray").unwrap();
    std::fs::write(data.join("staging/obj-1-1"), b"half written").unwrap();
    let store = Store::open(&data).unwrap();
    assert!(!data.join("objects").join(&stray[..2]).join(&stray).exists());
    assert!(store.staging_files().unwrap().is_empty());
}
