//! What the DAX layout of an uncompressed EROFS image costs on disk: each
//! root written by provd's EROFS writer with tails inline (`mkfs.erofs`'s
//! layout) and with every regular file in whole blocks and the size padded
//! to 2 MiB (what persistent memory and DAX need). Run with:
//!
//! ```text
//! cargo build --release -p provd-bench
//! ROOTS=/var/tmp/bench-roots/web:/var/tmp/bench-roots/api target/release/bench-erofs-layout
//! ```
//!
//! Identical files (content, mode, owner) are one inode, as on a shared
//! partition. Prints per root: files, the image's size both ways (apparent
//! and allocated: the padding is a hole), and the bytes the tails' blocks
//! add.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use provd_domain::image::{EntryKind, Hash};
use provd_formats::erofs_writer::{Content, ErofsOptions, Node, write_image};

/// Where each content digest's file is.
type Objects = HashMap<[u8; 32], PathBuf>;

/// Every entry under `root` as a writer node, and where each content is.
fn nodes_of(root: &Path) -> Result<(Vec<Node>, Objects)> {
    let mut nodes = Vec::new();
    let mut objects = HashMap::new();
    let mut inodes: HashMap<([u8; 32], u32, u32, u32), u64> = HashMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir)? {
            let path = e?.path();
            let m = path.symlink_metadata()?;
            let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
            let Some(kind) = provd_formats::reader::kind_of(m.file_type()) else { continue };
            if kind == EntryKind::Dir {
                todo.push(path.clone());
            }
            let mut node = Node {
                path: rel,
                kind,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                mtime: m.mtime(),
                size: 0,
                content: None,
                link_target: None,
                device: None,
                inode: None,
            };
            match kind {
                EntryKind::File => {
                    let digest = *blake3::hash(&std::fs::read(&path)?).as_bytes();
                    node.size = m.len();
                    node.content = Some(Content::Object(Hash(digest)));
                    let next = inodes.len() as u64;
                    node.inode = Some(
                        *inodes.entry((digest, node.mode, node.uid, node.gid)).or_insert(next),
                    );
                    objects.insert(digest, path.clone());
                }
                EntryKind::Symlink => {
                    node.link_target = Some(std::fs::read_link(&path)?.to_string_lossy().into());
                }
                EntryKind::CharDevice | EntryKind::BlockDevice => {
                    let rdev = m.rdev();
                    node.device = Some((rustix::fs::major(rdev), rustix::fs::minor(rdev)));
                }
                _ => {}
            }
            nodes.push(node);
        }
    }
    Ok((nodes, objects))
}

fn main() -> Result<()> {
    let roots = std::env::var("ROOTS").context("ROOTS: colon-separated directories")?;
    let work = tempfile::Builder::new().prefix("provd-bench-erofs-").tempdir_in("/var/tmp")?;
    println!(
        "{:<28} {:>7} {:>14} {:>14} {:>14} {:>14} {:>10}",
        "root", "files", "inline MiB", "dax MiB", "dax on disk", "tail blocks", "added"
    );
    for root in roots.split(':').filter(|r| !r.is_empty()) {
        let (nodes, objects) = nodes_of(Path::new(root))?;
        let mut open = |h: &Hash| {
            let path = objects.get(&h.0).ok_or_else(|| std::io::Error::other("no object"))?;
            std::fs::File::open(path)
        };
        let inline = work.path().join("inline.erofs");
        let dax = work.path().join("dax.erofs");
        let a =
            write_image(&inline, &nodes, [7; 16], "inline", 0, ErofsOptions::default(), &mut open)?;
        let b = write_image(&dax, &nodes, [7; 16], "dax", 0, ErofsOptions::dax(), &mut open)?;
        let on_disk = std::fs::metadata(&dax)?.blocks() * 512;
        let mib = |b: u64| b as f64 / 1048576.0;
        println!(
            "{:<28} {:>7} {:>14.2} {:>14.2} {:>14.2} {:>14.2} {:>9.1}%",
            root,
            nodes.iter().filter(|n| n.kind == EntryKind::File).count(),
            mib(a.image_bytes),
            mib(b.image_bytes),
            mib(on_disk),
            mib(b.plain_tail_bytes),
            (on_disk as f64 / a.image_bytes as f64 - 1.0) * 100.0
        );
    }
    Ok(())
}
