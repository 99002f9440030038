// Integration tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! The ext4 writer against the real tools: `e2fsck -fn` finds nothing to
//! fix, provd's own reader reads back every node as written, and the
//! kernel mounts the image read-write, sees every name, mode, owner, time
//! and byte, takes new files and directories, and leaves a filesystem
//! e2fsck still passes.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use provd_domain::image::{EntryKind, Hash};
use provd_formats::ext4::Ext4Image;
use provd_formats::ext4_writer::{Content, Ext4Options, Node, write_image};

fn node(path: &str, kind: EntryKind, mode: u32) -> Node {
    Node {
        path: path.into(),
        kind,
        mode,
        uid: 0,
        gid: 0,
        mtime: 1_700_000_000,
        size: 0,
        content: None,
        link_target: None,
        device: None,
        inode: None,
    }
}

fn file(path: &str, data: &[u8]) -> Node {
    Node {
        size: data.len() as u64,
        content: Some(Content::Bytes(data.to_vec())),
        ..node(path, EntryKind::File, 0o644)
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

fn opts(size_bytes: u64, inodes: u64) -> Ext4Options {
    Ext4Options {
        size_bytes,
        inodes,
        uuid: *b"provd-ext4-test!",
        label: "provd-private".into(),
        hash_seed: *b"0123456789abcdef",
        now: 1_750_000_000,
    }
}

fn e2fsck(image: &Path) {
    let out = Command::new("e2fsck").args(["-f", "-n"]).arg(image).output().unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn: {:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every kind of node, at the edges the format has.
fn corpus(big: &Path) -> (Vec<Node>, BTreeMap<String, Vec<u8>>) {
    let mut nodes = Vec::new();
    let mut contents = BTreeMap::new();
    for (path, len) in [
        ("upper/empty", 0usize),
        ("upper/one", 1),
        ("upper/block", 4096),
        ("upper/block-and-one", 4097),
        ("upper/usr/lib/libbig.so", 3 << 20),
    ] {
        let data = pattern(len, len as u64);
        contents.insert(path.to_string(), data.clone());
        nodes.push(file(path, &data));
    }
    // A file crossing a block group (128 MiB), from an object.
    let big_len = std::fs::metadata(big).unwrap().len();
    nodes.push(Node {
        size: big_len,
        content: Some(Content::Object(Hash([7; 32]))),
        ..node("upper/var/big.img", EntryKind::File, 0o600)
    });
    nodes.push(Node { mode: 0o4755, ..file("upper/usr/bin/su", b"#!/bin/sh\n") });
    nodes.push(Node { mode: 0o2755, uid: 100_000, gid: 70_000, ..file("upper/usr/bin/g", b"x") });
    nodes.push(node("upper/etc", EntryKind::Dir, 0o750));
    nodes.push(Node { mtime: 0, ..node("upper/tmp", EntryKind::Dir, 0o1777) });
    nodes.push(Node { mtime: -86_400, ..file("upper/etc/before-1970", b"old\n") });
    nodes.push(Node { mtime: 5_000_000_000, ..file("upper/etc/after-2038", b"new\n") });
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        nodes.push(Node { inode: Some(9), ..file(&format!("upper/links/{name}"), b"linked\n") });
        let _ = i;
    }
    contents.insert("upper/links/a".into(), b"linked\n".to_vec());
    nodes.push(Node {
        link_target: Some("../lib/libbig.so".into()),
        ..node("upper/usr/bin/short", EntryKind::Symlink, 0o777)
    });
    let long = format!("/{}", "long/".repeat(40));
    nodes.push(Node {
        link_target: Some(long.clone()),
        ..node("upper/usr/bin/long", EntryKind::Symlink, 0o777)
    });
    nodes.push(Node { device: Some((0, 0)), ..node("upper/gone", EntryKind::CharDevice, 0) });
    nodes.push(Node {
        device: Some((1, 3)),
        ..node("upper/dev/null", EntryKind::CharDevice, 0o666)
    });
    nodes.push(Node {
        device: Some((259, 70_000)),
        ..node("upper/dev/nvme", EntryKind::BlockDevice, 0o660)
    });
    nodes.push(node("upper/run/fifo", EntryKind::Fifo, 0o644));
    // A directory of many blocks, with names up to 255 bytes.
    for i in 0..600 {
        let name = format!("{i:04}-{}", "n".repeat(i % 250));
        nodes.push(file(&format!("upper/many/{name}"), b""));
    }
    nodes.push(node("work", EntryKind::Dir, 0o700));
    (nodes, contents)
}

#[test]
fn an_image_of_every_kind_of_node_passes_e2fsck_and_reads_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.obj");
    std::fs::write(&big, pattern(130 << 20, 42)).unwrap();
    let (nodes, contents) = corpus(&big);
    let image = dir.path().join("private.ext4");
    let figures = write_image(&image, &nodes, &opts(1 << 30, 20_000), &mut |h| {
        assert_eq!(h, &Hash([7; 32]));
        std::fs::File::open(&big)
    })
    .unwrap();
    println!("{figures:?}");
    e2fsck(&image);

    let fs = Ext4Image::open(&image).unwrap();
    let entries = fs.entries(false).unwrap();
    let by_path: BTreeMap<&str, _> = entries.iter().map(|e| (e.path.as_str(), e)).collect();
    for n in &nodes {
        let e = by_path.get(n.path.as_str()).unwrap_or_else(|| panic!("{} not read back", n.path));
        assert_eq!(e.kind, n.kind, "{}", n.path);
        if n.kind != EntryKind::Symlink {
            assert_eq!(e.mode, n.mode & 0o7777, "{}", n.path);
        }
        assert_eq!((e.uid, e.gid), (u64::from(n.uid), u64::from(n.gid)), "{}", n.path);
        assert_eq!(e.link_target, n.link_target, "{}", n.path);
        assert_eq!(e.device, n.device, "{}", n.path);
        if n.kind == EntryKind::File {
            assert_eq!(e.size, n.size, "{}", n.path);
            let mut got = Vec::new();
            fs.read_file(e.ino, &mut got).unwrap();
            let want = match &n.content {
                Some(Content::Bytes(b)) => b.clone(),
                Some(Content::Object(_)) => std::fs::read(&big).unwrap(),
                None => Vec::new(),
            };
            assert!(got == want, "{}: content differs", n.path);
        }
    }
    assert!(contents.contains_key("upper/links/a"));
    let links: Vec<_> =
        ["a", "b", "c"].map(|n| by_path[format!("upper/links/{n}").as_str()]).into();
    assert!(links.iter().all(|l| l.ino == links[0].ino && l.nlink == 3), "{links:?}");
    assert!(by_path.contains_key("lost+found"));
    // Small directories live in their inodes (inline_data); as e2fsprogs
    // sees them.
    for (dir, inline) in [("upper/tmp", true), ("work", true), ("upper/many", false)] {
        let out = Command::new("debugfs").args(["-R", &format!("stat {dir}")]).arg(&image).output();
        let text = String::from_utf8_lossy(&out.unwrap().stdout).into_owned();
        assert_eq!(text.contains("Size of inline data: 60"), inline, "{dir}:\n{text}");
    }
    // Sparse: the unused inode tables and the journal are holes.
    let allocated = std::fs::metadata(&image).unwrap().blocks() * 512;
    assert!(allocated < (140 << 20), "{allocated} bytes allocated");
}

#[test]
fn a_large_image_keeps_its_journal_in_an_extent_tree_with_leaves() {
    // 70 GiB: a 512 MiB journal across 5 block groups, more extents than
    // an inode holds.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("large.ext4");
    let nodes = vec![file("upper/x", b"x")];
    write_image(&image, &nodes, &opts(70 << 30, 4096), &mut |_| unreachable!()).unwrap();
    e2fsck(&image);
    let out = Command::new("debugfs").args(["-R", "stat <8>"]).arg(&image).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Size: 536870912"), "{text}");
    assert!(text.contains("(ETB0)"), "no extent leaf in:\n{text}");
}

#[test]
fn bad_nodes_and_sizes_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("bad.ext4");
    let cases: Vec<(Vec<Node>, Ext4Options, &str)> = vec![
        (vec![file("a", b"1"), file("a", b"2")], opts(64 << 20, 64), "given twice"),
        (vec![file("a/../b", b"1")], opts(64 << 20, 64), "not allowed"),
        (vec![file(&"n".repeat(256), b"1")], opts(64 << 20, 64), "longer than 255"),
        (vec![file("a", b"1"), file("a/b", b"2")], opts(64 << 20, 64), "not a directory"),
        (vec![file("lost+found/x", b"1")], opts(64 << 20, 64), "stays empty"),
        (vec![file("big", &vec![1; 40 << 20])], opts(32 << 20, 64), "does not fit"),
        (vec![file("a", b"1")], opts(16 << 20, 64), "below"),
        (
            vec![Node { size: 5, ..file("a", b"1") }],
            opts(64 << 20, 64),
            "not the 5 its node states",
        ),
        (
            vec![
                Node { inode: Some(1), ..file("a", b"1") },
                Node {
                    inode: Some(1),
                    device: Some((0, 0)),
                    ..node("w", EntryKind::CharDevice, 0)
                },
            ],
            opts(64 << 20, 64),
            "another kind",
        ),
        (
            vec![Node { inode: Some(1), ..node("fifo", EntryKind::Fifo, 0o644) }],
            opts(64 << 20, 64),
            "cannot be hard-linked",
        ),
    ];
    for (nodes, o, want) in cases {
        let err = write_image(&image, &nodes, &o, &mut |_| unreachable!()).unwrap_err().to_string();
        assert!(err.contains(want), "{err} (wanted {want:?})");
        assert!(!image.exists(), "{err}: a partial image was left");
    }
}

/// Mounts through a loop device; unmounted when dropped.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn the_kernel_mounts_it_read_write_and_sees_exactly_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.obj");
    std::fs::write(&big, pattern(130 << 20, 42)).unwrap();
    let (nodes, _) = corpus(&big);
    let image = dir.path().join("private.ext4");
    write_image(&image, &nodes, &opts(1 << 30, 20_000), &mut |_| std::fs::File::open(&big))
        .unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let status = Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&mnt).status().unwrap();
    assert!(status.success(), "mount -o loop needs root");
    let mounted = Mounted(mnt.clone());
    for n in &nodes {
        let p = mnt.join(&n.path);
        let m = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", n.path));
        if n.kind != EntryKind::Symlink {
            assert_eq!(m.mode() & 0o7777, n.mode, "{}", n.path);
        }
        assert_eq!((m.uid(), m.gid()), (n.uid, n.gid), "{}", n.path);
        assert_eq!(m.mtime(), n.mtime, "{}", n.path);
        match &n.content {
            Some(Content::Bytes(b)) => assert!(std::fs::read(&p).unwrap() == *b, "{}", n.path),
            Some(Content::Object(_)) => {
                assert!(std::fs::read(&p).unwrap() == std::fs::read(&big).unwrap())
            }
            None => {}
        }
        if let Some(t) = &n.link_target {
            assert_eq!(std::fs::read_link(&p).unwrap().to_str().unwrap(), t);
        }
        if let Some((major, minor)) = n.device {
            let rdev = m.rdev();
            assert_eq!((libc_major(rdev), libc_minor(rdev)), (major, minor), "{}", n.path);
        }
    }
    assert_eq!(std::fs::read_dir(mnt.join("upper/many")).unwrap().count(), 600);
    // The guest writes: a new file, a directory big enough to be indexed,
    // a file in a directory the image had, a removal.
    std::fs::write(mnt.join("upper/etc/new"), pattern(5 << 20, 5)).unwrap();
    std::fs::create_dir(mnt.join("upper/indexed")).unwrap();
    for i in 0..2000 {
        std::fs::write(mnt.join(format!("upper/indexed/file-{i}")), b"x").unwrap();
    }
    std::fs::remove_file(mnt.join("upper/block")).unwrap();
    // upper/tmp is empty, so it was written inline: the kernel moves it to
    // a block as it fills.
    for i in 0..50 {
        std::fs::write(mnt.join(format!("upper/tmp/t-{i}")), b"t").unwrap();
    }
    drop(mounted);
    e2fsck(&image);
    let fs = Ext4Image::open(&image).unwrap();
    let names: Vec<String> = fs.entries(true).unwrap().into_iter().map(|e| e.path).collect();
    assert!(names.contains(&"upper/etc/new".to_string()));
    assert_eq!(names.iter().filter(|n| n.starts_with("upper/indexed/")).count(), 2000);
    assert!(!names.contains(&"upper/block".to_string()));
    assert_eq!(names.iter().filter(|n| n.starts_with("upper/tmp/t-")).count(), 50);
}

fn libc_major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)) as u32
}

fn libc_minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0xff)) as u32
}

/// More inodes asked for than a small image's groups can hold is room that
/// shrinks to what fits (32768 per group); only the inodes in use must fit.
#[test]
fn many_entries_in_a_small_image_fit_when_the_inodes_in_use_do() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("many.ext4");
    let nodes: Vec<Node> = (0..6000)
        .map(|i| Node {
            device: Some((0, 0)),
            ..node(&format!("upper/w{i}"), EntryKind::CharDevice, 0)
        })
        .collect();
    write_image(&image, &nodes, &opts(300 << 20, 500_000), &mut |_| unreachable!()).unwrap();
    e2fsck(&image);
    // One group (32 MiB) holds 32768 inodes: 33000 entries do not fit.
    let nodes: Vec<Node> = (0..33_000)
        .map(|i| Node {
            device: Some((0, 0)),
            ..node(&format!("upper/w{i}"), EntryKind::CharDevice, 0)
        })
        .collect();
    let err = write_image(&image, &nodes, &opts(32 << 20, 500_000), &mut |_| unreachable!())
        .unwrap_err()
        .to_string();
    assert!(err.contains("inodes are needed"), "{err}");
}
