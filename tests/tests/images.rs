// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! Images into the content-addressed store: local trees and archives, shared
//! content stored once, reference counts and gc, concurrency, and a corpus of
//! hostile archives, each refused with the entry named and nothing left
//! behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use provd_domain::image::EntryKind;
use provd_images::{Images, ImportError, ImportLimits, NoProgress};
use provd_store::Store;

struct Node {
    _dir: tempfile::TempDir,
    data: PathBuf,
    images: Images,
}

fn node_with(limits: ImportLimits) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = Arc::new(Store::open(&data).unwrap());
    // The test machine's disk may be small; the check itself is tested apart.
    Node { images: Images::new(store, limits, 4), data, _dir: dir }
}

fn node() -> Node {
    node_with(ImportLimits::default())
}

impl Node {
    async fn import(&self, reference: &str) -> Result<provd_store::ImageRecord, Arc<ImportError>> {
        self.images.import(reference, Arc::new(NoProgress)).await
    }

    fn store(&self) -> &Store {
        self.images.store()
    }

    /// Object files on disk, found by walking the data directory itself.
    fn object_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for sub in std::fs::read_dir(self.data.join("objects")).unwrap() {
            for obj in std::fs::read_dir(sub.unwrap().path()).unwrap() {
                out.push(obj.unwrap().path());
            }
        }
        out
    }

    /// Nothing of a failed import is left: no image, no object row or
    /// file, no staging file.
    fn assert_empty(&self) {
        let stats = self.store().stats().unwrap();
        assert_eq!((stats.images, stats.objects), (0, 0), "{stats:?}");
        assert!(self.object_files().is_empty(), "{:?}", self.object_files());
        assert!(self.store().staging_files().unwrap().is_empty());
    }
}

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
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o444);
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

enum Item<'a> {
    File(&'a [u8], &'a [u8]),
    Dir(&'a [u8]),
    Symlink(&'a [u8], &'a [u8]),
    Hardlink(&'a [u8], &'a [u8]),
    CharDevice(&'a [u8], u32, u32),
}

fn raw_header(name: &[u8], kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    let field = &mut h.as_old_mut().name;
    assert!(name.len() <= field.len(), "test names fit the old header");
    field[..name.len()].copy_from_slice(name);
    h
}

fn set_link(h: &mut tar::Header, target: &[u8]) {
    let field = &mut h.as_old_mut().linkname;
    field[..target.len()].copy_from_slice(target);
}

fn archive(items: &[Item<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for item in items {
        let mut h;
        let data: &[u8] = match item {
            Item::File(name, data) => {
                h = raw_header(name, tar::EntryType::Regular, data.len() as u64);
                data
            }
            Item::Dir(name) => {
                h = raw_header(name, tar::EntryType::Directory, 0);
                &[]
            }
            Item::Symlink(name, target) => {
                h = raw_header(name, tar::EntryType::Symlink, 0);
                set_link(&mut h, target);
                &[]
            }
            Item::Hardlink(name, target) => {
                h = raw_header(name, tar::EntryType::Link, 0);
                set_link(&mut h, target);
                &[]
            }
            Item::CharDevice(name, major, minor) => {
                h = raw_header(name, tar::EntryType::Char, 0);
                h.set_device_major(*major).unwrap();
                h.set_device_minor(*minor).unwrap();
                &[]
            }
        };
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

async fn import_bytes(
    node: &Node,
    bytes: &[u8],
) -> Result<provd_store::ImageRecord, Arc<ImportError>> {
    let file = node._dir.path().join(format!("in-{}.tar", blake3::hash(bytes).to_hex()));
    std::fs::write(&file, bytes).unwrap();
    node.import(file.to_str().unwrap()).await
}

/// The good content every hostile archive starts with, so that a failure
/// has objects to clean up.
const GOOD: Item<'static> = Item::File(b"etc/good", b"good content that must not stay behind");

#[tokio::test]
async fn hostile_archives_are_refused_naming_the_entry_and_leave_nothing() {
    let long = vec![b'x'; 300];
    let long_name = [b"dir/".as_slice(), &long[..90]].concat();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "absolute path",
            archive(&[GOOD, Item::File(b"/etc/passwd", b"x")]),
            "entry \"/etc/passwd\" path is absolute",
        ),
        (
            "dot-dot",
            archive(&[GOOD, Item::File(b"a/../../etc/passwd", b"x")]),
            "entry \"a/../../etc/passwd\" path has a `..` component",
        ),
        (
            "write through a symlink",
            archive(&[GOOD, Item::Symlink(b"evil", b"/etc"), Item::File(b"evil/passwd", b"x")]),
            "entry \"evil/passwd\" its parent evil is a symlink, not a directory",
        ),
        (
            "hard link outside",
            archive(&[GOOD, Item::Hardlink(b"h", b"../../etc/shadow")]),
            "entry \"h\" hard link target has a `..` component",
        ),
        (
            "hard link to a later entry",
            archive(&[GOOD, Item::Hardlink(b"h", b"later"), Item::File(b"later", b"x")]),
            "entry \"h\" hard link to later, which is not an earlier file of this image",
        ),
        (
            "hard link to a directory",
            archive(&[GOOD, Item::Dir(b"d/"), Item::Hardlink(b"h", b"d")]),
            "entry \"h\" hard link to d, which is a dir",
        ),
        (
            "file replaced by a directory",
            archive(&[GOOD, Item::File(b"x", b"1"), Item::Dir(b"x/")]),
            "entry \"x\" appears twice in the image",
        ),
        (
            "directory replaced by a file",
            archive(&[GOOD, Item::Dir(b"x/"), Item::File(b"x/y", b"1"), Item::File(b"x", b"2")]),
            "entry \"x\" appears twice in the image",
        ),
        (
            "duplicate entry",
            archive(&[GOOD, Item::File(b"etc/good", b"other")]),
            "entry \"etc/good\" appears twice",
        ),
        (
            "newline in a name",
            archive(&[GOOD, Item::File(b"a\nb", b"x")]),
            "contains a control character",
        ),
        (
            "NUL inside a name",
            archive(&[GOOD, Item::File(b"a\x01b", b"x")]),
            "contains a control character",
        ),
        (
            "invalid UTF-8",
            archive(&[GOOD, Item::File(b"caf\xe9", b"x")]),
            "name is not valid UTF-8",
        ),
        (
            "component too long",
            {
                // A long name needs a GNU long-name record, which the
                // builder writes for us.
                let mut b = tar::Builder::new(Vec::new());
                let mut h = tar::Header::new_gnu();
                h.set_size(1);
                h.set_mode(0o644);
                h.set_entry_type(tar::EntryType::Regular);
                let name = String::from_utf8([b"a/".as_slice(), &long].concat()).unwrap();
                b.append_data(&mut h, name, &b"x"[..]).unwrap();
                b.into_inner().unwrap()
            },
            "has a component of 300 bytes; at most 255",
        ),
        (
            "symlink target with NUL-like control",
            archive(&[GOOD, Item::Symlink(b"l", b"a\x07b")]),
            "symlink target contains a control character",
        ),
        (
            "root that is a file",
            archive(&[GOOD, Item::File(b"./", b"x")]),
            "names the image root but is not a directory",
        ),
        (
            "long but legal name then dup",
            archive(&[Item::File(&long_name, b"1"), Item::File(&long_name, b"2")]),
            "appears twice",
        ),
    ];
    let mut tried = 0;
    for (what, bytes, expected) in cases {
        let node = node();
        let err = import_bytes(&node, &bytes).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains(expected), "{what}: {text}");
        node.assert_empty();
        tried += 1;
    }
    println!("{tried} hostile archives refused, nothing left behind");
}

#[tokio::test]
async fn a_truncated_archive_is_refused_naming_the_entry() {
    let big = vec![9u8; 100_000];
    let bytes = archive(&[GOOD, Item::File(b"usr/lib/big.so", &big)]);
    let node = node();
    let err = import_bytes(&node, &bytes[..bytes.len() - 60_000]).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("usr/lib/big.so"), "{text}");
    node.assert_empty();
}

#[tokio::test]
async fn devices_are_recorded_never_created() {
    let node = node();
    let record =
        import_bytes(&node, &archive(&[Item::Dir(b"dev/"), Item::CharDevice(b"dev/null", 1, 3)]))
            .await
            .unwrap();
    let e = node.store().entry(&record, "dev/null").unwrap().unwrap();
    assert_eq!((e.kind, e.device), (EntryKind::CharDevice, Some((1, 3))));
    assert!(node.object_files().is_empty());
}

#[tokio::test]
async fn implied_directories_are_recorded() {
    let node = node();
    let record = import_bytes(&node, &archive(&[Item::File(b"a/b/c", b"x")])).await.unwrap();
    let paths: Vec<String> =
        node.store().entries(&record, 0, 10).unwrap().into_iter().map(|e| e.path).collect();
    assert_eq!(paths, ["a", "a/b", "a/b/c"]);
}

#[tokio::test]
async fn compression_bombs_are_stopped_by_ratio_and_by_size() {
    let zeros = vec![0u8; 16 << 20];
    let tar = archive(&[GOOD, Item::File(b"bomb", &zeros)]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(tar.as_slice(), 19).unwrap();
    println!("bomb: {} bytes unpack from {} (gzip) and {} (zstd)", tar.len(), gz.len(), zst.len());

    let by_ratio =
        ImportLimits { ratio_grace_bytes: 1 << 20, max_ratio: 100, ..ImportLimits::default() };
    for bytes in [&gz, &zst] {
        let node = node_with(by_ratio.clone());
        let err = import_bytes(&node, bytes).await.unwrap_err();
        assert!(
            err.to_string().contains("more decompression ratio than the limit of 100"),
            "{err}"
        );
        node.assert_empty();
    }
    let by_size = ImportLimits { max_unpacked_bytes: 4 << 20, ..ImportLimits::default() };
    let node = node_with(by_size);
    let err = import_bytes(&node, &tar).await.unwrap_err();
    assert!(err.to_string().contains("more unpacked bytes than the limit of 4194304"), "{err}");
    node.assert_empty();

    let by_file = ImportLimits { max_file_bytes: 1 << 20, ..ImportLimits::default() };
    let node = node_with(by_file);
    let err = import_bytes(&node, &tar).await.unwrap_err();
    assert!(
        err.to_string().contains("entry \"bomb\" is 16777216 bytes; files may be at most 1048576"),
        "{err}"
    );
    node.assert_empty();
}

#[tokio::test]
async fn too_many_entries_are_refused() {
    let limits = ImportLimits { max_entries: 3, ..ImportLimits::default() };
    let node = node_with(limits);
    let err = import_bytes(
        &node,
        &archive(&[GOOD, Item::File(b"b", b"1"), Item::File(b"c", b"2"), Item::File(b"d", b"3")]),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("more entries than the limit of 3"), "{err}");
    node.assert_empty();
}

#[tokio::test]
async fn garbage_is_refused_as_a_malformed_archive() {
    let node = node();
    let mut bytes = archive(&[GOOD]);
    bytes[148..156].copy_from_slice(b"99999999"); // break the header checksum
    let err = import_bytes(&node, &bytes).await.unwrap_err();
    assert!(matches!(*err, ImportError::Archive { .. }), "{err}");
    node.assert_empty();
}

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
    let err = import_bytes(&node, &archive(&[GOOD])).await.unwrap_err();
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
