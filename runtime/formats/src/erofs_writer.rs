//! Writer of uncompressed EROFS images, fed from a list of nodes and
//! streaming file content straight from the content store into the image,
//! so that no staging tree is needed.
//!
//! The image follows the layout `mkfs.erofs` produces for an uncompressed
//! tree with 4 KiB blocks:
//!
//! ```text
//! block 0      bytes 0..1024 zero, superblock at 1024..1152
//! meta area    starts in block 0 (meta_blkaddr 0) at byte 1152, so the root,
//!              placed first, has nid 36; every inode is extended (64 bytes,
//!              32-byte aligned, never crossing a block boundary), followed
//!              by its inline tail when it has one
//! data blocks  after the meta area, one run of whole blocks per inode, in
//!              the order of the inodes
//! ```
//!
//! Data layouts: a file, directory or symlink whose last partial block is
//! at most 4032 bytes (a block less one inode) keeps that tail inline, right
//! after its inode (`FLAT_INLINE`), and its whole blocks in the data area;
//! any other (sizes that are a multiple of 4096, or tails of 4033..4095
//! bytes) is `FLAT_PLAIN`, all of its data in whole blocks. Empty files,
//! devices and fifos have no data. Inodes are laid out breadth first, so
//! the entries of one directory sit next to each other.
//!
//! With [`ErofsOptions::dax`], every regular file is `FLAT_PLAIN` (its
//! tail too takes a whole block, so that the kernel can map all of it
//! with DAX: it maps no inline data) and the image's size is a multiple of
//! 2 MiB, as a persistent-memory device needs; the padding is a hole.
//!
//! Limits: the image holds at most 2^32 blocks (16 TiB), the root is always
//! `0755 root:root`, no extended attributes, no sockets.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use provd_domain::image::{EntryKind, Hash};

use crate::erofs_format::{
    DIRENT_SIZE, EXTENDED_INODE_SIZE as INODE_SIZE, ISLOT_SIZE, LAYOUT_FLAT_INLINE,
    LAYOUT_FLAT_PLAIN, MAGIC, NULL_ADDR, SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE,
};
pub use crate::writer_input::{Content, Node};
use crate::writer_input::{
    Dirs, FT_BLKDEV, FT_CHRDEV, FT_DIR, FT_FIFO, FT_REG_FILE, FT_SYMLINK, NodeError, S_IFBLK,
    S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG, file_name, put16, put32, put64,
};

const BLKSZ_BITS: u8 = 12;
const BLKSZ: u64 = 1 << BLKSZ_BITS;
/// Like mkfs.erofs, the metadata area starts at block 0 and its first
/// inode right after the superblock.
const META_BLKADDR: u32 = 0;
const FIRST_INODE: u64 = SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE as u64;
/// The largest tail kept inline: it must share a block with its inode.
const MAX_INLINE: u64 = BLKSZ - INODE_SIZE;
/// Inodes carry their own modification times.
const FEATURE_COMPAT_MTIME: u32 = 0x2;
const INODE_EXTENDED: u16 = 1;
/// Largest device numbers the kernel's `new_encode_dev` keeps.
/// Metadata is gathered in memory and written out in pieces of this size.
const META_FLUSH: usize = 1 << 20;

/// How an image is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErofsOptions {
    /// Keep every regular file's data in whole blocks (`FLAT_PLAIN`), no
    /// tail inline: the kernel maps only such files with DAX.
    pub plain_files: bool,
    /// The image's size is rounded up to a multiple of this (a power of
    /// two, at least the block size), the padding left a hole.
    pub size_multiple: u64,
}

/// The size a persistent-memory device maps in: virtio-pmem and NVDIMM
/// regions are 2 MiB aligned.
pub const PMEM_ALIGN: u64 = 2 << 20;

impl Default for ErofsOptions {
    /// `mkfs.erofs`'s layout: tails inline where they fit, no padding.
    fn default() -> Self {
        ErofsOptions { plain_files: false, size_multiple: BLKSZ }
    }
}

impl ErofsOptions {
    /// The layout a guest maps with DAX from a persistent-memory device.
    pub fn dax() -> Self {
        ErofsOptions { plain_files: true, size_multiple: PMEM_ALIGN }
    }
}

/// What a write produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFigures {
    /// Inodes in the image, the root included.
    pub inodes: u64,
    /// Bytes of regular-file content, each hard-linked inode counted once.
    pub data_bytes: u64,
    /// Size of the image file, padding included.
    pub image_bytes: u64,
    /// Bytes of the whole blocks that regular files' tails take where they
    /// would have been kept inline (what [`ErofsOptions::plain_files`]
    /// adds, less the inline bytes it saves in the metadata).
    pub plain_tail_bytes: u64,
}

/// Why an image could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ErofsWriteError {
    /// reading a store object or writing the image failed
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// a node cannot be written
    #[error("invalid node {path:?}: {reason}")]
    Invalid { path: String, reason: String },
    /// a file's content does not have the size its node states
    #[error("content of {path:?} is {got} bytes, not the {expected} its node states")]
    ContentMismatch { path: String, expected: u64, got: u64 },
}

impl From<NodeError> for ErofsWriteError {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::Invalid { path, reason } => ErofsWriteError::Invalid { path, reason },
            NodeError::ContentMismatch { path, expected, got } => {
                ErofsWriteError::ContentMismatch { path, expected, got }
            }
        }
    }
}

fn invalid(path: &str, reason: impl Into<String>) -> ErofsWriteError {
    ErofsWriteError::Invalid { path: path.to_string(), reason: reason.into() }
}

fn internal(reason: &str) -> ErofsWriteError {
    invalid("", format!("internal error of the erofs writer: {reason}"))
}

/// Writes an uncompressed EROFS image of `nodes` to `out` (created or
/// truncated).
///
/// Parent directories missing from `nodes` are created `0755 root:root`
/// with mtime 0; the root directory is always `0755 root:root` with mtime
/// `root_mtime`, which is also the superblock's build time. `open` opens a
/// store object by digest; its content is streamed into the image. `uuid`
/// is the filesystem UUID, `volume_name` at most 16 bytes.
///
/// The nodes are checked before `out` is touched; when writing fails
/// afterwards, the partial image is removed.
pub fn write_image(
    out: &Path,
    nodes: &[Node],
    uuid: [u8; 16],
    volume_name: &str,
    root_mtime: i64,
    options: ErofsOptions,
    open: &mut dyn FnMut(&Hash) -> std::io::Result<File>,
) -> Result<WriteFigures, ErofsWriteError> {
    if !options.size_multiple.is_power_of_two() || options.size_multiple < BLKSZ {
        return Err(invalid(
            "",
            format!(
                "size multiple {} is not a power of two of at least {BLKSZ}",
                options.size_multiple
            ),
        ));
    }
    if volume_name.len() > 16 {
        return Err(invalid(
            "",
            format!("volume name {volume_name:?} is {} bytes, longer than 16", volume_name.len()),
        ));
    }
    let mut inodes = build_tree(nodes, root_mtime)?;
    let layout = lay_out(&mut inodes, options)?;
    let file = File::create(out).map_err(|source| ErofsWriteError::Io {
        what: format!("creating {}", out.display()),
        source,
    })?;
    let sb = SuperInfo { uuid, volume_name, build_time: root_mtime };
    match write_all(&file, out, &inodes, &layout, &sb, open) {
        Ok(figures) => Ok(figures),
        Err(e) => {
            drop(file);
            if let Err(rm) = std::fs::remove_file(out) {
                tracing::warn!(path = %out.display(), error = %rm, "cannot remove a partial erofs image");
            }
            Err(e)
        }
    }
}

/// Where an inode's data comes from.
#[derive(Debug, Clone, Copy)]
enum Source<'a> {
    None,
    Bytes(&'a [u8]),
    Object(&'a Hash),
    Dir,
}

#[derive(Debug)]
struct Ino<'a> {
    /// The first name, for messages.
    path: &'a str,
    ftype: u8,
    ifmt: u16,
    perm: u16,
    uid: u32,
    gid: u32,
    mtime: i64,
    size: u64,
    nlink: u32,
    rdev: u32,
    source: Source<'a>,
    parent: usize,
    /// Directories: every entry, "." and ".." included, sorted by name
    /// once the tree is complete.
    children: Vec<(&'a [u8], usize)>,
    // Filled by `lay_out`.
    pos: u64,
    inline: bool,
    blkaddr: u32,
}

impl Ino<'_> {
    fn nid(&self) -> u64 {
        (self.pos - u64::from(META_BLKADDR) * BLKSZ) / ISLOT_SIZE
    }

    /// Bytes kept inline after the inode.
    fn tail_len(&self) -> u64 {
        if self.inline { self.size % BLKSZ } else { 0 }
    }

    /// Bytes kept in whole blocks of the data area.
    fn block_len(&self) -> u64 {
        self.size - self.tail_len()
    }
}

fn dir_ino(path: &str, perm: u32, uid: u32, gid: u32, mtime: i64, parent: usize) -> Ino<'_> {
    Ino {
        path,
        ftype: FT_DIR,
        ifmt: S_IFDIR,
        perm: (perm & 0o7777) as u16,
        uid,
        gid,
        mtime,
        size: 0,
        nlink: 2,
        rdev: 0,
        source: Source::Dir,
        parent,
        children: Vec::new(),
        pos: 0,
        inline: false,
        blkaddr: NULL_ADDR,
    }
}

struct TreeBuilder<'a> {
    dirs: Dirs<'a>,
    inodes: Vec<Ino<'a>>,
}

impl<'a> TreeBuilder<'a> {
    fn get_mut(&mut self, i: usize) -> Result<&mut Ino<'a>, ErofsWriteError> {
        self.inodes.get_mut(i).ok_or_else(|| internal("inode index out of range"))
    }

    /// Links inode `child` into directory `parent` under `name`.
    fn attach(
        &mut self,
        parent: usize,
        name: &'a [u8],
        child: usize,
    ) -> Result<(), ErofsWriteError> {
        self.get_mut(parent)?.children.push((name, child));
        Ok(())
    }

    /// The inode of directory `dir`, creating it and its missing ancestors;
    /// `for_path` is the node that needs it.
    fn dir(&mut self, dir: &'a str, for_path: &str) -> Result<usize, ErofsWriteError> {
        let TreeBuilder { dirs, inodes } = self;
        dirs.ensure(dir, for_path, |prefix, node, parent| {
            let ino = match node {
                Some(n) => dir_ino(&n.path, n.mode, n.uid, n.gid, n.mtime, parent),
                None => dir_ino(prefix, 0o755, 0, 0, 0, parent),
            };
            let i = inodes.len();
            inodes.push(ino);
            let p = inodes.get_mut(parent).ok_or_else(|| internal("inode index out of range"))?;
            p.children.push((file_name(prefix), i));
            p.nlink =
                p.nlink.checked_add(1).ok_or_else(|| invalid(prefix, "too many subdirectories"))?;
            Ok(i)
        })
    }
}

/// Checks the nodes and builds the inode tree: index 0 is the root, every
/// directory's entries sorted by name, sizes of directories known.
fn build_tree(nodes: &[Node], root_mtime: i64) -> Result<Vec<Ino<'_>>, ErofsWriteError> {
    let mut t = TreeBuilder {
        dirs: Dirs::new(nodes)?,
        inodes: vec![dir_ino("", 0o755, 0, 0, root_mtime, 0)],
    };
    let mut links: HashMap<u64, usize> = HashMap::new();
    for n in nodes {
        let path = n.path.as_str();
        if n.kind == EntryKind::Dir {
            t.dir(path, path)?;
            continue;
        }
        let parent = match path.rsplit_once('/') {
            Some((dir, _)) => t.dir(dir, path)?,
            None => 0,
        };
        if let Some(&i) = n.inode.and_then(|key| links.get(&key)) {
            let ino = t.get_mut(i)?;
            ino.nlink = ino.nlink.checked_add(1).ok_or_else(|| invalid(path, "too many links"))?;
            t.attach(parent, file_name(path), i)?;
            continue;
        }
        let (ftype, ifmt) = match n.kind {
            EntryKind::File => (FT_REG_FILE, S_IFREG),
            EntryKind::Symlink => (FT_SYMLINK, S_IFLNK),
            EntryKind::CharDevice => (FT_CHRDEV, S_IFCHR),
            EntryKind::BlockDevice => (FT_BLKDEV, S_IFBLK),
            EntryKind::Fifo => (FT_FIFO, S_IFIFO),
            EntryKind::Dir | EntryKind::Hardlink => return Err(internal("unexpected kind")),
        };
        let (size, source) = match (n.kind, &n.content, &n.link_target) {
            (EntryKind::File, Some(Content::Bytes(b)), _) => (n.size, Source::Bytes(b)),
            (EntryKind::File, Some(Content::Object(h)), _) => (n.size, Source::Object(h)),
            (EntryKind::Symlink, _, Some(target)) => {
                (target.len() as u64, Source::Bytes(target.as_bytes()))
            }
            _ => (0, Source::None),
        };
        let rdev = n
            .device
            .map_or(0, |(major, minor)| (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12));
        let i = t.inodes.len();
        t.inodes.push(Ino {
            path,
            ftype,
            ifmt,
            perm: (n.mode & 0o7777) as u16,
            uid: n.uid,
            gid: n.gid,
            mtime: n.mtime,
            size,
            nlink: 1,
            rdev,
            source,
            parent,
            children: Vec::new(),
            pos: 0,
            inline: false,
            blkaddr: NULL_ADDR,
        });
        t.attach(parent, file_name(path), i)?;
        if let Some(key) = n.inode {
            links.insert(key, i);
        }
    }
    let mut inodes = t.inodes;
    for (i, ino) in inodes.iter_mut().enumerate() {
        if ino.ftype != FT_DIR {
            continue;
        }
        ino.children.push((b".", i));
        ino.children.push((b"..", ino.parent));
        ino.children.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let spans = dir_spans(&ino.children);
        let last = spans.last().map_or(0, |s| s.used);
        ino.size = (spans.len().saturating_sub(1) as u64) * BLKSZ + last as u64;
    }
    Ok(inodes)
}

/// One directory block: entries `start..end`, `used` bytes.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
    used: usize,
}

/// Splits a directory's sorted entries into self-contained blocks.
fn dir_spans(entries: &[(&[u8], usize)]) -> Vec<Span> {
    let mut spans = Vec::new();
    let mut start = 0;
    let mut used = 0;
    for (i, (name, _)) in entries.iter().enumerate() {
        let need = DIRENT_SIZE + name.len();
        if used + need > BLKSZ as usize {
            spans.push(Span { start, end: i, used });
            start = i;
            used = 0;
        }
        used += need;
    }
    if start < entries.len() {
        spans.push(Span { start, end: entries.len(), used });
    }
    spans
}

#[derive(Debug)]
struct Layout {
    /// Inode indexes in the order they are placed.
    order: Vec<usize>,
    blocks: u32,
    /// The file's size: the blocks, padded to the size multiple.
    image_bytes: u64,
    plain_tail_bytes: u64,
}

/// Places every inode in the metadata area and its whole blocks after it.
fn lay_out(inodes: &mut [Ino<'_>], options: ErofsOptions) -> Result<Layout, ErofsWriteError> {
    let mut order = Vec::with_capacity(inodes.len());
    let mut seen = vec![false; inodes.len()];
    if let Some(s) = seen.first_mut() {
        *s = true;
    }
    let mut queue = VecDeque::from([0usize]);
    while let Some(i) = queue.pop_front() {
        order.push(i);
        let ino = inodes.get(i).ok_or_else(|| internal("inode index out of range"))?;
        for &(_, c) in &ino.children {
            let s = seen.get_mut(c).ok_or_else(|| internal("child index out of range"))?;
            if !*s {
                *s = true;
                queue.push_back(c);
            }
        }
    }
    if order.len() != inodes.len() {
        return Err(internal("an inode is not reachable from the root"));
    }
    let too_big = || invalid("", "the image would exceed 2^32 blocks (16 TiB)");
    let mut plain_tail_bytes = 0u64;
    let mut cursor = FIRST_INODE;
    for &i in &order {
        let ino = inodes.get_mut(i).ok_or_else(|| internal("inode index out of range"))?;
        let tail = ino.size % BLKSZ;
        let fits = tail > 0 && tail <= MAX_INLINE;
        if fits && options.plain_files && ino.ftype == FT_REG_FILE {
            plain_tail_bytes += BLKSZ;
        }
        ino.inline = fits && !(options.plain_files && ino.ftype == FT_REG_FILE);
        let len = INODE_SIZE + ino.tail_len();
        let mut pos = cursor.div_ceil(ISLOT_SIZE) * ISLOT_SIZE;
        if pos % BLKSZ + len > BLKSZ {
            pos = pos.div_ceil(BLKSZ) * BLKSZ;
        }
        ino.pos = pos;
        cursor = pos.checked_add(len).ok_or_else(too_big)?;
    }
    let mut block = cursor.div_ceil(BLKSZ);
    for &i in &order {
        let ino = inodes.get_mut(i).ok_or_else(|| internal("inode index out of range"))?;
        let n = ino.block_len().div_ceil(BLKSZ);
        if n > 0 {
            ino.blkaddr = u32::try_from(block).map_err(|_| too_big())?;
            block = block.checked_add(n).ok_or_else(too_big)?;
        } else if ino.inline {
            ino.blkaddr = NULL_ADDR;
        } else {
            ino.blkaddr = 0;
        }
    }
    let blocks = u32::try_from(block).map_err(|_| too_big())?;
    let image_bytes = (u64::from(blocks) * BLKSZ)
        .checked_next_multiple_of(options.size_multiple)
        .ok_or_else(too_big)?;
    Ok(Layout { order, blocks, image_bytes, plain_tail_bytes })
}

struct SuperInfo<'a> {
    uuid: [u8; 16],
    volume_name: &'a str,
    build_time: i64,
}

/// Gathers the metadata area in memory and writes it out in large pieces;
/// inodes arrive in ascending position.
struct MetaWriter<'f> {
    file: &'f File,
    out: &'f Path,
    start: u64,
    buf: Vec<u8>,
}

impl MetaWriter<'_> {
    fn put(&mut self, pos: u64, bytes: &[u8]) -> Result<(), ErofsWriteError> {
        if self.buf.is_empty() {
            self.start = pos;
        }
        let at = pos
            .checked_sub(self.start)
            .and_then(|d| usize::try_from(d).ok())
            .filter(|&d| d >= self.buf.len())
            .ok_or_else(|| internal("metadata written out of order"))?;
        self.buf.resize(at, 0);
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= META_FLUSH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ErofsWriteError> {
        write_at(self.file, self.out, &self.buf, self.start)?;
        self.start += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

fn write_at(file: &File, out: &Path, bytes: &[u8], at: u64) -> Result<(), ErofsWriteError> {
    file.write_all_at(bytes, at).map_err(|source| ErofsWriteError::Io {
        what: format!("writing {} bytes at byte {at} of {}", bytes.len(), out.display()),
        source,
    })
}

/// The extended (64-byte) on-disk inode.
fn inode_bytes(ino: &Ino<'_>, seq: u32) -> [u8; INODE_SIZE as usize] {
    let mut b = [0u8; INODE_SIZE as usize];
    let layout = if ino.inline { LAYOUT_FLAT_INLINE } else { LAYOUT_FLAT_PLAIN };
    put16(&mut b, 0, INODE_EXTENDED | (u16::from(layout) << 1));
    // i_xattr_icount stays 0
    put16(&mut b, 4, ino.ifmt | ino.perm);
    put64(&mut b, 8, ino.size);
    let i_u = match ino.ftype {
        FT_CHRDEV | FT_BLKDEV => ino.rdev,
        FT_FIFO => 0,
        _ => ino.blkaddr,
    };
    put32(&mut b, 16, i_u);
    put32(&mut b, 20, seq);
    put32(&mut b, 24, ino.uid);
    put32(&mut b, 28, ino.gid);
    put64(&mut b, 32, ino.mtime as u64);
    // i_mtime_nsec stays 0
    put32(&mut b, 44, ino.nlink);
    b
}

fn superblock_bytes(
    sb: &SuperInfo<'_>,
    root_nid: u16,
    inos: u64,
    blocks: u32,
) -> [u8; SUPERBLOCK_SIZE] {
    let mut b = [0u8; SUPERBLOCK_SIZE];
    put32(&mut b, 0, MAGIC);
    // checksum (4) stays 0: no EROFS_FEATURE_COMPAT_SB_CHKSUM
    put32(&mut b, 8, FEATURE_COMPAT_MTIME);
    if let Some(v) = b.get_mut(12) {
        *v = BLKSZ_BITS;
    }
    put16(&mut b, 14, root_nid);
    put64(&mut b, 16, inos);
    put64(&mut b, 24, sb.build_time as u64);
    put32(&mut b, 36, blocks);
    put32(&mut b, 40, META_BLKADDR);
    // xattr_blkaddr (44) stays 0
    if let Some(s) = b.get_mut(48..64) {
        s.copy_from_slice(&sb.uuid);
    }
    let name = sb.volume_name.as_bytes();
    if let Some(s) = b.get_mut(64..64 + name.len().min(16)) {
        s.copy_from_slice(name.get(..s.len()).unwrap_or_default());
    }
    // feature_incompat (80) and the rest stay 0
    b
}

/// A directory's data: its blocks, each self-contained, the last one
/// unpadded.
fn dir_bytes(dir: &Ino<'_>, inodes: &[Ino<'_>]) -> Result<Vec<u8>, ErofsWriteError> {
    let spans = dir_spans(&dir.children);
    let mut data = Vec::with_capacity(usize::try_from(dir.size).unwrap_or(0));
    let count = spans.len();
    for (k, span) in spans.into_iter().enumerate() {
        let block_start = data.len();
        let entries = dir
            .children
            .get(span.start..span.end)
            .ok_or_else(|| internal("directory span out of range"))?;
        let mut nameoff = entries.len() * DIRENT_SIZE;
        for &(name, c) in entries {
            let child = inodes.get(c).ok_or_else(|| internal("child index out of range"))?;
            data.extend_from_slice(&child.nid().to_le_bytes());
            let off = u16::try_from(nameoff).map_err(|_| internal("name offset overflow"))?;
            data.extend_from_slice(&off.to_le_bytes());
            data.push(child.ftype);
            data.push(0);
            nameoff += name.len();
        }
        for &(name, _) in entries {
            data.extend_from_slice(name);
        }
        if k + 1 < count {
            data.resize(block_start + BLKSZ as usize, 0);
        }
    }
    if data.len() as u64 != dir.size {
        return Err(internal("directory size changed between layout and write"));
    }
    Ok(data)
}

/// Reads until `buf` is full or the source ends.
fn fill(src: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let Some(rest) = buf.get_mut(n..) else { break };
        match src.read(rest) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Streams a store object into the image: its whole blocks into the data
/// area, its tail (if inline) returned.
fn stream_object(
    file: &File,
    out: &Path,
    ino: &Ino<'_>,
    hash: &Hash,
    open: &mut dyn FnMut(&Hash) -> std::io::Result<File>,
) -> Result<Vec<u8>, ErofsWriteError> {
    let read_err = |source| ErofsWriteError::Io {
        what: format!("reading object {} for {:?}", hash.to_hex(), ino.path),
        source,
    };
    let mut src = open(hash).map_err(|source| ErofsWriteError::Io {
        what: format!("opening object {} for {:?}", hash.to_hex(), ino.path),
        source,
    })?;
    let block_len = ino.block_len();
    let mut got = 0;
    if block_len > 0 {
        let at = u64::from(ino.blkaddr) * BLKSZ;
        let mut dst = file;
        dst.seek(SeekFrom::Start(at)).map_err(|source| ErofsWriteError::Io {
            what: format!("seeking to byte {at} of {}", out.display()),
            source,
        })?;
        // File to file: the kernel copies (copy_file_range) where it can.
        got = std::io::copy(&mut (&mut src).take(block_len), &mut dst).map_err(|source| {
            ErofsWriteError::Io {
                what: format!(
                    "copying object {} for {:?} into {}",
                    hash.to_hex(),
                    ino.path,
                    out.display()
                ),
                source,
            }
        })?;
    }
    let mut tail = vec![0u8; usize::try_from(ino.tail_len()).unwrap_or(0)];
    if got == block_len {
        let n = fill(&mut src, &mut tail).map_err(read_err)?;
        got += n as u64;
        if got == ino.size {
            // Count what lies beyond the stated size, for the message.
            got += std::io::copy(&mut src, &mut std::io::sink()).map_err(read_err)?;
        }
    }
    if got != ino.size {
        return Err(ErofsWriteError::ContentMismatch {
            path: ino.path.to_string(),
            expected: ino.size,
            got,
        });
    }
    Ok(tail)
}

/// Writes in-memory data: whole blocks into the data area, the tail (if
/// inline) returned.
fn place_bytes<'b>(
    file: &File,
    out: &Path,
    ino: &Ino<'_>,
    bytes: &'b [u8],
) -> Result<&'b [u8], ErofsWriteError> {
    if bytes.len() as u64 != ino.size {
        return Err(ErofsWriteError::ContentMismatch {
            path: ino.path.to_string(),
            expected: ino.size,
            got: bytes.len() as u64,
        });
    }
    let split = usize::try_from(ino.block_len()).map_err(|_| internal("size overflow"))?;
    let (blocks, tail) =
        bytes.split_at_checked(split).ok_or_else(|| internal("split out of range"))?;
    if !blocks.is_empty() {
        write_at(file, out, blocks, u64::from(ino.blkaddr) * BLKSZ)?;
    }
    Ok(tail)
}

fn write_all(
    file: &File,
    out: &Path,
    inodes: &[Ino<'_>],
    layout: &Layout,
    sb: &SuperInfo<'_>,
    open: &mut dyn FnMut(&Hash) -> std::io::Result<File>,
) -> Result<WriteFigures, ErofsWriteError> {
    let root = inodes.first().ok_or_else(|| internal("no root"))?;
    let root_nid = u16::try_from(root.nid()).map_err(|_| internal("root nid beyond 16 bits"))?;
    let inos = inodes.len() as u64;
    write_at(file, out, &superblock_bytes(sb, root_nid, inos, layout.blocks), SUPERBLOCK_OFFSET)?;
    let mut meta = MetaWriter { file, out, start: 0, buf: Vec::new() };
    let mut data_bytes = 0u64;
    let mut record = Vec::with_capacity(INODE_SIZE as usize + MAX_INLINE as usize);
    for (seq, &i) in layout.order.iter().enumerate() {
        let ino = inodes.get(i).ok_or_else(|| internal("inode index out of range"))?;
        record.clear();
        record.extend_from_slice(&inode_bytes(ino, seq as u32));
        match ino.source {
            Source::None => {}
            Source::Bytes(bytes) => {
                record.extend_from_slice(place_bytes(file, out, ino, bytes)?);
            }
            Source::Object(hash) => {
                record.extend_from_slice(&stream_object(file, out, ino, hash, open)?);
            }
            Source::Dir => {
                let data = dir_bytes(ino, inodes)?;
                record.extend_from_slice(place_bytes(file, out, ino, &data)?);
            }
        }
        if ino.ftype == FT_REG_FILE {
            data_bytes = data_bytes.saturating_add(ino.size);
        }
        meta.put(ino.pos, &record)?;
    }
    meta.flush()?;
    let image_bytes = layout.image_bytes;
    file.set_len(image_bytes).map_err(|source| ErofsWriteError::Io {
        what: format!("setting the size of {}", out.display()),
        source,
    })?;
    Ok(WriteFigures {
        inodes: inos,
        data_bytes,
        image_bytes,
        plain_tail_bytes: layout.plain_tail_bytes,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

    use super::*;
    use crate::erofs::ErofsImage;
    use crate::reader::FsEntry;
    use std::collections::{BTreeMap, HashSet};
    use std::fs;
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    const MTIME: i64 = 1_700_000_000;
    const ROOT_MTIME: i64 = 1_600_000_000;
    const UUID: [u8; 16] = [
        0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0x4d, 0xef, 0x80, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66,
        0x77,
    ];

    fn pseudo(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    struct Store {
        dir: tempfile::TempDir,
    }

    impl Store {
        fn new() -> Store {
            Store { dir: tempfile::tempdir().unwrap() }
        }

        fn put(&self, bytes: &[u8]) -> Hash {
            let h = Hash(*blake3::hash(bytes).as_bytes());
            fs::write(self.dir.path().join(h.to_hex()), bytes).unwrap();
            h
        }

        /// Stores `bytes` under the digest of `claimed` (a corrupt store).
        fn put_as(&self, claimed: &[u8], bytes: &[u8]) -> Hash {
            let h = Hash(*blake3::hash(claimed).as_bytes());
            fs::write(self.dir.path().join(h.to_hex()), bytes).unwrap();
            h
        }

        fn open(&self, h: &Hash) -> std::io::Result<File> {
            File::open(self.dir.path().join(h.to_hex()))
        }
    }

    fn base(path: &str, kind: EntryKind) -> Node {
        Node {
            path: path.to_string(),
            kind,
            mode: if kind == EntryKind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            mtime: MTIME,
            size: 0,
            content: None,
            link_target: None,
            device: None,
            inode: None,
        }
    }

    fn file_bytes(path: &str, bytes: Vec<u8>) -> Node {
        Node {
            size: bytes.len() as u64,
            content: Some(Content::Bytes(bytes)),
            ..base(path, EntryKind::File)
        }
    }

    fn file_obj(store: &Store, path: &str, bytes: &[u8]) -> Node {
        Node {
            size: bytes.len() as u64,
            content: Some(Content::Object(store.put(bytes))),
            ..base(path, EntryKind::File)
        }
    }

    fn dir(path: &str) -> Node {
        base(path, EntryKind::Dir)
    }

    fn symlink(path: &str, target: &str) -> Node {
        Node { link_target: Some(target.to_string()), ..base(path, EntryKind::Symlink) }
    }

    fn device(path: &str, kind: EntryKind, major: u32, minor: u32) -> Node {
        Node { device: Some((major, minor)), mode: 0o600, ..base(path, kind) }
    }

    fn content_of(store: &Store, n: &Node) -> Vec<u8> {
        match &n.content {
            None => Vec::new(),
            Some(Content::Bytes(b)) => b.clone(),
            Some(Content::Object(h)) => fs::read(store.dir.path().join(h.to_hex())).unwrap(),
        }
    }

    /// Every kind of node the writer takes.
    fn rich_nodes(store: &Store) -> Vec<Node> {
        let mut v = Vec::new();
        // Sizes around the block size and the inline limit (4032).
        for (i, size) in
            [0usize, 1, 100, 4031, 4032, 4033, 4095, 4096, 4097, 8192 + 4032, 8192 + 4033, 3 << 20]
                .into_iter()
                .enumerate()
        {
            let data = pseudo(size, i as u64 + 1);
            v.push(file_bytes(&format!("sizes/bytes-{size}"), data.clone()));
            v.push(file_obj(store, &format!("sizes/object-{size}"), &data));
        }
        v.push(Node { mode: 0o4755, ..file_bytes("modes/setuid", b"#!/bin/sh\n".to_vec()) });
        v.push(Node { mode: 0o2755, ..file_obj(store, "modes/setgid", b"setgid") });
        v.push(Node { mode: 0o7777, ..file_bytes("modes/all-bits", b"all".to_vec()) });
        v.push(Node { mode: 0o1777, ..dir("modes/sticky-dir") });
        v.push(Node { mode: 0o000, ..file_bytes("modes/none", b"none".to_vec()) });
        v.push(Node { uid: 70000, gid: 70001, ..file_bytes("ids/big", b"big ids".to_vec()) });
        v.push(Node { uid: 1000, gid: 1000, ..file_obj(store, "ids/small", b"small ids") });
        v.push(Node { uid: 70000, gid: 70000, mode: 0o750, ..dir("ids/big-dir") });
        v.push(Node { uid: 70002, gid: 3, ..symlink("ids/big-link", "../ids/big") });
        // Hard links: the first name gives metadata and content.
        let shared = pseudo(10_000, 77);
        v.push(Node {
            inode: Some(1),
            mode: 0o640,
            uid: 1000,
            gid: 70000,
            ..file_obj(store, "hard/a", &shared)
        });
        v.push(Node { inode: Some(1), ..file_obj(store, "hard/b", &shared) });
        v.push(Node { inode: Some(1), ..base("other/c", EntryKind::File) });
        v.push(Node { inode: Some(2), ..file_bytes("hard/small-1", b"tiny".to_vec()) });
        v.push(Node { inode: Some(2), ..file_bytes("hard/small-2", b"tiny".to_vec()) });
        v.push(Node { inode: Some(2), ..file_bytes("hard/small-3", b"tiny".to_vec()) });
        v.push(Node { inode: Some(3), ..file_bytes("hard/lonely", b"one name".to_vec()) });
        v.push(symlink("links/short", "../sizes/bytes-1"));
        let long = format!("{}end", "../".repeat(99));
        assert_eq!(long.len(), 300);
        v.push(symlink("links/long-300", &long));
        v.push(symlink("links/inline-max", &"x".repeat(4032)));
        v.push(symlink("links/plain-4033", &"y".repeat(4033)));
        v.push(symlink("links/path-max", &"z".repeat(4095)));
        v.push(symlink("links/dangling", "/nowhere/at/all"));
        v.push(device("dev/null", EntryKind::CharDevice, 1, 3));
        v.push(device("dev/nvme", EntryKind::BlockDevice, 259, 300_000));
        v.push(device("dev/max", EntryKind::CharDevice, 0xfff, 0xf_ffff));
        v.push(base("dev/fifo", EntryKind::Fifo));
        for i in 0..5000 {
            let path = format!("many/entry-with-a-longish-name-{i:05}");
            if i % 1000 == 1 {
                v.push(dir(&path));
            } else if i % 500 == 0 {
                v.push(file_obj(store, &path, format!("file {i}").as_bytes()));
            } else if i % 777 == 0 {
                v.push(symlink(&path, "target"));
            } else {
                v.push(base(&path, EntryKind::File));
            }
        }
        let deep: Vec<String> = (0..10).map(|i| format!("level{i}")).collect();
        v.push(file_bytes(&format!("{}/bottom", deep.join("/")), b"at the bottom".to_vec()));
        v.push(file_bytes("héllo-wörld-日本語.txt", "non-ascii name".as_bytes().to_vec()));
        v.push(file_obj(store, "ディレクトリ/ファイル", "日本語".as_bytes()));
        // Names that sort before "." and "..".
        for name in [
            "sorting/-dash",
            "sorting/+plus",
            "sorting/ space",
            "sorting/!bang",
            "sorting/.hidden",
            "sorting/..x",
            "sorting/~tilde",
            "sorting/a",
        ] {
            v.push(file_bytes(name, name.as_bytes().to_vec()));
        }
        v.push(file_bytes(&format!("sorting/{}", "n".repeat(255)), b"longest name".to_vec()));
        // A child listed before its explicit parent.
        v.push(file_bytes("explicit/child", b"child".to_vec()));
        v.push(Node { mode: 0o700, uid: 1000, gid: 1001, mtime: 42, ..dir("explicit") });
        v.push(Node { mtime: -1, ..file_bytes("times/negative", b"before 1970".to_vec()) });
        v.push(Node { mtime: 0, ..file_bytes("times/zero", b"epoch".to_vec()) });
        v.push(Node { mtime: 1 << 40, ..dir("times/far") });
        v.push(dir("empty-dir"));
        v
    }

    #[derive(Debug, Clone)]
    struct Want {
        kind: EntryKind,
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: i64,
        size: u64,
        nlink: u32,
        link_target: Option<String>,
        device: Option<(u32, u32)>,
        content: Vec<u8>,
        group: Option<u64>,
    }

    /// What the image should hold: the nodes, hard links taking the first
    /// name's metadata, plus the implicit parents.
    fn expected(store: &Store, nodes: &[Node]) -> BTreeMap<String, Want> {
        let mut first: HashMap<u64, &Node> = HashMap::new();
        let mut names: HashMap<u64, u32> = HashMap::new();
        for n in nodes {
            if let Some(k) = n.inode {
                first.entry(k).or_insert(n);
                *names.entry(k).or_default() += 1;
            }
        }
        let mut want = BTreeMap::new();
        for n in nodes {
            let src = n.inode.map_or(n, |k| first[&k]);
            let size = match n.kind {
                EntryKind::File => src.size,
                EntryKind::Symlink => n.link_target.as_ref().unwrap().len() as u64,
                _ => 0,
            };
            want.insert(
                n.path.clone(),
                Want {
                    kind: n.kind,
                    mode: src.mode & 0o7777,
                    uid: u64::from(src.uid),
                    gid: u64::from(src.gid),
                    mtime: src.mtime,
                    size,
                    nlink: n.inode.map_or(1, |k| names[&k]),
                    link_target: n.link_target.clone(),
                    device: n.device,
                    content: content_of(store, src),
                    group: n.inode,
                },
            );
        }
        let paths: Vec<String> = want.keys().cloned().collect();
        for p in paths {
            let mut at = p.as_str();
            while let Some((parent, _)) = at.rsplit_once('/') {
                want.entry(parent.to_string()).or_insert(Want {
                    kind: EntryKind::Dir,
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                    mtime: 0,
                    size: 0,
                    nlink: 1,
                    link_target: None,
                    device: None,
                    content: Vec::new(),
                    group: None,
                });
                at = parent;
            }
        }
        let subdirs: Vec<String> = want
            .iter()
            .filter(|(_, w)| w.kind == EntryKind::Dir)
            .filter_map(|(p, _)| p.rsplit_once('/').map(|(parent, _)| parent.to_string()))
            .collect();
        for w in want.values_mut().filter(|w| w.kind == EntryKind::Dir) {
            w.nlink = 2;
        }
        for parent in subdirs {
            want.get_mut(&parent).unwrap().nlink += 1;
        }
        want
    }

    fn root_nlink(want: &BTreeMap<String, Want>) -> u32 {
        2 + want.iter().filter(|(p, w)| w.kind == EntryKind::Dir && !p.contains('/')).count() as u32
    }

    /// The mtime of nid `nid`, read from its extended inode.
    fn raw_mtime(img: &Path, nid: u64) -> i64 {
        let f = File::open(img).unwrap();
        let mut b = [0u8; 64];
        f.read_exact_at(&mut b, nid * 32).unwrap();
        assert_eq!(b[0] & 1, 1, "nid {nid} is not an extended inode");
        i64::from_le_bytes(b[32..40].try_into().unwrap())
    }

    fn write(img: &Path, store: &Store, nodes: &[Node]) -> Result<WriteFigures, ErofsWriteError> {
        write_with(img, store, nodes, ErofsOptions::default())
    }

    fn write_with(
        img: &Path,
        store: &Store,
        nodes: &[Node],
        options: ErofsOptions,
    ) -> Result<WriteFigures, ErofsWriteError> {
        write_image(img, nodes, UUID, "provd-test", ROOT_MTIME, options, &mut |h| store.open(h))
    }

    fn fsck(img: &Path) {
        let out = Command::new("fsck.erofs").arg(img).output().unwrap();
        assert!(
            out.status.success(),
            "fsck.erofs {}: {}\n{}",
            img.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn extract_and_compare(img: &Path, dest: &Path, want: &BTreeMap<String, Want>) {
        let out = Command::new("fsck.erofs")
            .arg(format!("--extract={}", dest.display()))
            .arg(img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fsck.erofs --extract: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut found = BTreeMap::new();
        let mut stack = vec![dest.to_path_buf()];
        while let Some(d) = stack.pop() {
            for de in fs::read_dir(&d).unwrap() {
                let p = de.unwrap().path();
                let rel = p.strip_prefix(dest).unwrap().to_str().unwrap().to_string();
                let m = fs::symlink_metadata(&p).unwrap();
                if m.is_dir() {
                    stack.push(p.clone());
                }
                found.insert(rel, (p, m));
            }
        }
        assert_eq!(
            found.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "extracted paths"
        );
        for (path, (p, m)) in &found {
            let w = &want[path];
            let t = m.file_type();
            let kind = crate::reader::kind_of(t).unwrap();
            assert_eq!(kind, w.kind, "{path}");
            match kind {
                EntryKind::File => assert!(fs::read(p).unwrap() == w.content, "content of {path}"),
                EntryKind::Symlink => assert_eq!(
                    fs::read_link(p).unwrap().to_str(),
                    w.link_target.as_deref(),
                    "{path}"
                ),
                EntryKind::CharDevice | EntryKind::BlockDevice => {
                    let rdev = m.rdev();
                    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
                    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
                    assert_eq!(Some((major as u32, minor as u32)), w.device, "{path}");
                }
                _ => {}
            }
        }
    }

    fn read_and_compare(img: &Path, want: &BTreeMap<String, Want>) {
        let image = ErofsImage::open(img).unwrap();
        let entries = image.entries().unwrap();
        let got: BTreeMap<&str, &FsEntry> = entries.iter().map(|e| (e.path.as_str(), e)).collect();
        assert_eq!(got.len(), entries.len(), "a path listed twice");
        assert_eq!(got.keys().copied().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());

        let root = image.root().unwrap();
        assert_eq!((root.kind, root.mode, root.uid, root.gid), (EntryKind::Dir, 0o755, 0, 0));
        assert_eq!(root.nlink, root_nlink(want));
        assert_eq!(root.ino, 36, "root nid");
        assert_eq!(raw_mtime(img, root.ino), ROOT_MTIME);

        let mut group_ino: HashMap<u64, u64> = HashMap::new();
        let mut inos = HashSet::new();
        for (path, e) in &got {
            let w = &want[*path];
            assert_eq!(e.kind, w.kind, "{path}");
            assert_eq!(e.mode, w.mode, "{path}");
            assert_eq!((e.uid, e.gid), (w.uid, w.gid), "{path}");
            assert_eq!(e.size, w.size, "{path}");
            assert_eq!(e.nlink, w.nlink, "{path}");
            assert_eq!(e.link_target, w.link_target, "{path}");
            assert_eq!(e.device, w.device, "{path}");
            assert_eq!(raw_mtime(img, e.ino), w.mtime, "{path}");
            match w.group {
                Some(k) => {
                    let first = *group_ino.entry(k).or_insert(e.ino);
                    assert_eq!(first, e.ino, "{path} is not linked to its group");
                    if first == e.ino && inos.contains(&e.ino) {
                        continue;
                    }
                    inos.insert(e.ino);
                }
                None => assert!(inos.insert(e.ino), "{path} shares nid {}", e.ino),
            }
            if e.kind == EntryKind::File {
                assert!(!image.is_compressed(e.ino).unwrap());
                let mut buf = Vec::new();
                assert_eq!(image.read_file(e.ino, &mut buf).unwrap(), w.size, "{path}");
                assert!(buf == w.content, "content of {path}");
            }
        }
    }

    /// A directory's entries (name, nid, file type) parsed straight from
    /// the image, independently of the crate's reader.
    fn raw_dir(img: &[u8], nid: u64) -> Vec<(Vec<u8>, u64, u8)> {
        let at = nid as usize * 32;
        let inode = &img[at..at + 64];
        let format = u16::from_le_bytes(inode[0..2].try_into().unwrap());
        let size = u64::from_le_bytes(inode[8..16].try_into().unwrap()) as usize;
        let blkaddr = u32::from_le_bytes(inode[16..20].try_into().unwrap()) as usize;
        let data = match (format >> 1) & 7 {
            0 => img[blkaddr * 4096..blkaddr * 4096 + size].to_vec(),
            2 => {
                let full = size - size % 4096;
                let mut d = if full > 0 {
                    img[blkaddr * 4096..blkaddr * 4096 + full].to_vec()
                } else {
                    Vec::new()
                };
                d.extend_from_slice(&img[at + 64..at + 64 + size % 4096]);
                assert!(
                    (at + 64 + size % 4096 - 1) / 4096 == at / 4096,
                    "inline tail crosses a block"
                );
                d
            }
            other => panic!("nid {nid}: layout {other}"),
        };
        let mut out = Vec::new();
        for block in data.chunks(4096) {
            let count = u16::from_le_bytes(block[8..10].try_into().unwrap()) as usize / 12;
            for i in 0..count {
                let de = &block[i * 12..i * 12 + 12];
                let start = u16::from_le_bytes(de[8..10].try_into().unwrap()) as usize;
                let end = if i + 1 == count {
                    block.len()
                } else {
                    u16::from_le_bytes(block[i * 12 + 20..i * 12 + 22].try_into().unwrap()) as usize
                };
                let mut name = block[start..end].to_vec();
                if i + 1 == count {
                    while name.last() == Some(&0) {
                        name.pop();
                    }
                }
                out.push((name, u64::from_le_bytes(de[0..8].try_into().unwrap()), de[10]));
            }
        }
        out
    }

    /// Every directory: names strictly ascending (the kernel looks names up
    /// by binary search), "." and ".." right, file types matching modes.
    fn check_raw_dirs(img: &Path) {
        let bytes = fs::read(img).unwrap();
        let image = ErofsImage::open(img).unwrap();
        let entries = image.entries().unwrap();
        let mut nids: HashMap<&str, u64> =
            entries.iter().map(|e| (e.path.as_str(), e.ino)).collect();
        nids.insert("", image.root().unwrap().ino);
        let mut dirs: Vec<&str> =
            entries.iter().filter(|e| e.kind == EntryKind::Dir).map(|e| e.path.as_str()).collect();
        dirs.push("");
        for d in dirs {
            let nid = nids[d];
            let list = raw_dir(&bytes, nid);
            for pair in list.windows(2) {
                assert!(pair[0].0 < pair[1].0, "{d:?}: {:?} before {:?}", pair[0].0, pair[1].0);
            }
            let parent = d.rsplit_once('/').map_or("", |(p, _)| p);
            let find = |n: &[u8]| list.iter().find(|e| e.0 == n).unwrap().1;
            assert_eq!(find(b"."), nid, "{d:?}");
            assert_eq!(find(b".."), nids[parent], "{d:?}");
            for (name, child, ftype) in &list {
                let at = *child as usize * 32;
                let mode = u16::from_le_bytes(bytes[at + 4..at + 6].try_into().unwrap());
                let want = match mode & 0o170000 {
                    0o100000 => 1,
                    0o040000 => 2,
                    0o020000 => 3,
                    0o060000 => 4,
                    0o010000 => 5,
                    0o120000 => 7,
                    other => panic!("mode {other:o}"),
                };
                assert_eq!(*ftype, want, "{d:?}/{}", String::from_utf8_lossy(name));
            }
        }
    }

    fn dump_super(img: &Path) -> String {
        let out = Command::new("dump.erofs").arg("-s").arg(img).output().unwrap();
        assert!(out.status.success(), "dump.erofs: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn field<'s>(dump: &'s str, name: &str) -> &'s str {
        dump.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|rest| rest.trim_start_matches(':').trim())
            .unwrap_or_else(|| panic!("no {name:?} in\n{dump}"))
    }

    fn check_all(nodes: &[Node], store: &Store) {
        check_all_with(nodes, store, ErofsOptions::default());
    }

    fn check_all_with(nodes: &[Node], store: &Store, options: ErofsOptions) {
        let work = tempfile::tempdir().unwrap();
        let img = work.path().join("img");
        let figures = write_with(&img, store, nodes, options).unwrap();
        let want = expected(store, nodes);

        let len = fs::metadata(&img).unwrap().len();
        assert_eq!(figures.image_bytes, len);
        assert_eq!(len % options.size_multiple, 0);
        let mut seen = HashSet::new();
        let unique = want.values().filter(|w| w.group.is_none_or(|k| seen.insert(k)));
        let (count, bytes) = unique.fold((1u64, 0u64), |(c, b), w| {
            (c + 1, b + if w.kind == EntryKind::File { w.size } else { 0 })
        });
        assert_eq!((figures.inodes, figures.data_bytes), (count, bytes));

        fsck(&img);
        read_and_compare(&img, &want);
        check_raw_dirs(&img);
        extract_and_compare(&img, &work.path().join("extracted"), &want);

        let dump = dump_super(&img);
        assert_eq!(field(&dump, "Filesystem magic number"), "0xE0F5E1E2");
        let blocks: u64 = field(&dump, "Filesystem blocks").parse().unwrap();
        assert!(blocks <= len / 4096 && blocks * 4096 + options.size_multiple > len, "{blocks}");
        assert_eq!(field(&dump, "Filesystem root nid"), "36");
        assert_eq!(field(&dump, "Filesystem inode count"), count.to_string());
        assert_eq!(field(&dump, "Filesystem inode metadata start block"), "0");
        assert_eq!(field(&dump, "Filesystem UUID"), "12345678-9abc-4def-8011-223344556677");
    }

    #[test]
    fn erofs_writer_every_kind_round_trips() {
        let store = Store::new();
        let nodes = rich_nodes(&store);
        check_all(&nodes, &store);

        // The layouts chosen, as erofs-utils sees them.
        let work = tempfile::tempdir().unwrap();
        let img = work.path().join("img");
        write(&img, &store, &nodes).unwrap();
        for (path, layout) in [
            ("/sizes/bytes-0", "0"),
            ("/sizes/object-1", "2"),
            ("/sizes/bytes-4032", "2"),
            ("/sizes/object-4033", "0"),
            ("/sizes/bytes-4096", "0"),
            ("/sizes/object-4097", "2"),
            ("/sizes/object-12224", "2"),
            ("/sizes/object-3145728", "0"),
            ("/links/inline-max", "2"),
            ("/links/path-max", "0"),
            ("/many", "2"),
            ("/", "2"),
        ] {
            let out = Command::new("dump.erofs")
                .arg(format!("--path={path}"))
                .arg(&img)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{path}: {}", String::from_utf8_lossy(&out.stderr));
            assert!(text.contains(&format!("Layout: {layout} ")), "{path}:\n{text}");
            assert!(text.contains("Inode size: 64 "), "{path}:\n{text}");
        }
    }

    /// For DAX every regular file's data is in whole blocks, the image a
    /// multiple of 2 MiB; directories and symlinks keep their tails inline
    /// (the kernel reads them, it does not map them).
    #[test]
    fn erofs_writer_dax_layout_keeps_no_file_tail_inline() {
        let store = Store::new();
        let nodes = rich_nodes(&store);
        check_all_with(&nodes, &store, ErofsOptions::dax());

        let work = tempfile::tempdir().unwrap();
        let (inline, dax) = (work.path().join("inline"), work.path().join("dax"));
        let a = write(&inline, &store, &nodes).unwrap();
        let b = write_with(&dax, &store, &nodes, ErofsOptions::dax()).unwrap();
        assert_eq!(a.plain_tail_bytes, 0);
        assert_eq!(b.image_bytes % PMEM_ALIGN, 0);
        // Every file tail of 1..=4032 bytes took a block of its own.
        let tails = expected(&store, &nodes)
            .values()
            .filter(|w| w.kind == EntryKind::File && w.group.is_none())
            .filter(|w| (1..=4032).contains(&(w.size % 4096)))
            .count() as u64;
        assert!(tails > 0);
        assert!(b.plain_tail_bytes >= tails * 4096, "{b:?}, {tails} tails");
        // The padding is a hole: the disk holds no more than the blocks.
        let allocated = fs::metadata(&dax).unwrap().blocks() * 512;
        assert!(allocated < b.image_bytes, "{allocated} of {}", b.image_bytes);
        for (path, layout) in [
            ("/sizes/object-1", "0"),
            ("/sizes/bytes-4032", "0"),
            ("/sizes/object-4097", "0"),
            ("/sizes/object-12224", "0"),
            ("/links/inline-max", "2"),
            ("/many", "2"),
            ("/", "2"),
        ] {
            let out = Command::new("dump.erofs")
                .arg(format!("--path={path}"))
                .arg(&dax)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{path}: {}", String::from_utf8_lossy(&out.stderr));
            assert!(text.contains(&format!("Layout: {layout} ")), "{path}:\n{text}");
        }
    }

    #[test]
    fn erofs_writer_node_order_does_not_matter() {
        let store = Store::new();
        let mut nodes = rich_nodes(&store);
        let work = tempfile::tempdir().unwrap();
        let a = work.path().join("a");
        write(&a, &store, &nodes).unwrap();
        // Same input, same bytes.
        let b = work.path().join("b");
        write(&b, &store, &nodes).unwrap();
        assert!(fs::read(&a).unwrap() == fs::read(&b).unwrap());
        // Reversed (hard-link groups keep their first name first), same tree.
        let (mut linked, mut rest): (Vec<Node>, Vec<Node>) =
            nodes.drain(..).partition(|n| n.inode.is_some());
        rest.reverse();
        linked.extend(rest);
        let c = work.path().join("c");
        write(&c, &store, &linked).unwrap();
        fsck(&c);
        read_and_compare(&c, &expected(&store, &linked));
    }

    #[test]
    fn erofs_writer_empty_image_has_only_the_root() {
        let store = Store::new();
        let work = tempfile::tempdir().unwrap();
        let img = work.path().join("img");
        let figures = write(&img, &store, &[]).unwrap();
        assert_eq!(
            figures,
            WriteFigures { inodes: 1, data_bytes: 0, image_bytes: 4096, plain_tail_bytes: 0 }
        );
        fsck(&img);
        let image = ErofsImage::open(&img).unwrap();
        assert!(image.entries().unwrap().is_empty());
        let root = image.root().unwrap();
        assert_eq!((root.mode, root.uid, root.gid, root.nlink), (0o755, 0, 0, 2));
        check_all(&[], &store);
        let dump = dump_super(&img);
        assert_eq!(field(&dump, "Filesystem inode count"), "1");
    }

    #[test]
    fn erofs_writer_large_directories_and_deep_trees() {
        let store = Store::new();
        let mut nodes = Vec::new();
        // Directory data of every length class: many blocks with a plain or
        // an inline tail.
        for (d, count) in [(0, 3000), (1, 113), (2, 1)] {
            for i in 0..count {
                nodes.push(file_bytes(&format!("d{d}/{}-{i}", "x".repeat(i % 200)), vec![i as u8]));
            }
        }
        // Extraction needs the whole path below PATH_MAX (4096 bytes).
        let deep: Vec<String> = (0..40).map(|i| format!("{i:02}{}", "é".repeat(40))).collect();
        nodes.push(file_obj(&store, &format!("{}/leaf", deep.join("/")), b"leaf"));
        check_all(&nodes, &store);
    }

    fn assert_refused(nodes: &[Node], store: &Store, what: &str) -> ErofsWriteError {
        let work = tempfile::tempdir().unwrap();
        let img = work.path().join("img");
        let err = write(&img, store, nodes).expect_err(what);
        assert!(!img.exists(), "{what}: a file was left behind");
        assert_eq!(fs::read_dir(work.path()).unwrap().count(), 0, "{what}");
        err
    }

    fn assert_invalid(nodes: &[Node], store: &Store, path: &str, what: &str) {
        match assert_refused(nodes, store, what) {
            ErofsWriteError::Invalid { path: p, reason } => {
                assert_eq!(p, path, "{what}: {reason}");
                let msg = ErofsWriteError::Invalid { path: p, reason }.to_string();
                assert!(msg.contains(&format!("{path:?}")), "{what}: {msg}");
            }
            other => panic!("{what}: {other}"),
        }
    }

    #[test]
    fn erofs_writer_refuses_invalid_nodes() {
        let store = Store::new();
        let ok = file_bytes("ok", b"ok".to_vec());
        let long = format!("a/{}", "n".repeat(256));
        let cases: Vec<(&str, Vec<Node>, &str)> = vec![
            ("duplicate", vec![ok.clone(), dir("d"), file_bytes("d", vec![])], "d"),
            ("duplicate dir", vec![dir("d"), dir("d")], "d"),
            ("under a file", vec![ok.clone(), file_bytes("ok/x", vec![])], "ok/x"),
            ("under a file, deep", vec![ok.clone(), dir("ok/x/y")], "ok/x/y"),
            ("under a symlink", vec![symlink("l", "d"), dir("l/y")], "l/y"),
            ("root", vec![dir("")], ""),
            ("leading slash", vec![file_bytes("/abs", vec![])], "/abs"),
            ("trailing slash", vec![dir("a/")], "a/"),
            ("empty component", vec![dir("a//b")], "a//b"),
            ("dot", vec![dir("a/./b")], "a/./b"),
            ("dot dot", vec![dir("a/../b")], "a/../b"),
            ("lone dot dot", vec![dir("..")], ".."),
            ("nul", vec![dir("a\0b")], "a\0b"),
            ("long name", vec![dir(&long)], &long),
            ("hardlink kind", vec![base("h", EntryKind::Hardlink)], "h"),
            ("symlink without target", vec![base("l", EntryKind::Symlink)], "l"),
            ("empty target", vec![symlink("l", "")], "l"),
            ("long target", vec![symlink("l", &"t".repeat(4096))], "l"),
            ("nul target", vec![symlink("l", "a\0b")], "l"),
            ("char device without numbers", vec![base("c", EntryKind::CharDevice)], "c"),
            ("block device without numbers", vec![base("b", EntryKind::BlockDevice)], "b"),
            ("major too large", vec![device("c", EntryKind::CharDevice, 4096, 0)], "c"),
            ("minor too large", vec![device("c", EntryKind::BlockDevice, 1, 1 << 20)], "c"),
            (
                "content on a dir",
                vec![Node { content: Some(Content::Bytes(vec![1])), ..dir("d") }],
                "d",
            ),
            (
                "content on a symlink",
                vec![Node { content: Some(Content::Bytes(vec![1])), ..symlink("l", "t") }],
                "l",
            ),
            (
                "content on a fifo",
                vec![Node { content: Some(Content::Bytes(vec![])), ..base("f", EntryKind::Fifo) }],
                "f",
            ),
            ("target on a file", vec![Node { link_target: Some("t".into()), ..ok.clone() }], "ok"),
            ("device on a file", vec![Node { device: Some((1, 3)), ..ok.clone() }], "ok"),
            ("hard link of a dir", vec![Node { inode: Some(1), ..dir("d") }], "d"),
            ("hard link of a symlink", vec![Node { inode: Some(1), ..symlink("l", "t") }], "l"),
            ("file without content", vec![Node { size: 5, ..base("f", EntryKind::File) }], "f"),
        ];
        for (what, nodes, path) in &cases {
            assert_invalid(nodes, &store, path, what);
        }
        let err = write_image(
            &tempfile::tempdir().unwrap().path().join("img"),
            &[],
            UUID,
            "seventeen-bytes!!",
            0,
            ErofsOptions::default(),
            &mut |h| store.open(h),
        )
        .unwrap_err();
        assert!(matches!(err, ErofsWriteError::Invalid { .. }), "{err}");
        let odd = ErofsOptions { plain_files: false, size_multiple: 3 << 20 };
        let err = write_with(&tempfile::tempdir().unwrap().path().join("img"), &store, &[], odd)
            .unwrap_err();
        assert!(err.to_string().contains("not a power of two"), "{err}");
    }

    #[test]
    fn erofs_writer_refuses_content_of_the_wrong_size() {
        let store = Store::new();
        let short = Node { size: 5, ..file_bytes("a/short", b"four".to_vec()) };
        let err = assert_refused(&[short], &store, "short bytes");
        assert!(
            matches!(&err, ErofsWriteError::ContentMismatch { path, expected: 5, got: 4 } if path == "a/short"),
            "{err}"
        );
        assert!(err.to_string().contains("\"a/short\""), "{err}");

        // Objects are only measured while they are copied, after earlier
        // files were written: the partial image must go.
        for (claimed, actual, stated) in [
            (pseudo(9000, 1), pseudo(8999, 1), 9000u64),
            (pseudo(9000, 2), pseudo(9001, 2), 9000),
            (pseudo(100, 3), pseudo(101, 3), 100),
            (pseudo(100, 4), pseudo(99, 4), 100),
            (pseudo(8192, 5), pseudo(8193, 5), 8192),
            (pseudo(8192, 6), vec![], 8192),
            (vec![], vec![0], 0),
        ] {
            let h = store.put_as(&claimed, &actual);
            let nodes = vec![
                file_obj(&store, "first", &pseudo(20_000, 9)),
                Node {
                    size: stated,
                    content: Some(Content::Object(h)),
                    ..base("z/bad", EntryKind::File)
                },
            ];
            let err = assert_refused(&nodes, &store, "object of the wrong size");
            match err {
                ErofsWriteError::ContentMismatch { path, expected, got } => {
                    assert_eq!(path, "z/bad");
                    assert_eq!((expected, got), (stated, actual.len() as u64));
                }
                other => panic!("{other}"),
            }
        }
    }

    #[test]
    fn erofs_writer_reports_missing_objects() {
        let store = Store::new();
        let nodes = vec![
            file_bytes("a", b"a".to_vec()),
            Node {
                size: 3,
                content: Some(Content::Object(Hash([7; 32]))),
                ..base("missing", EntryKind::File)
            },
        ];
        let err = assert_refused(&nodes, &store, "missing object");
        assert!(
            matches!(&err, ErofsWriteError::Io { what, .. } if what.contains("\"missing\"")),
            "{err}"
        );
    }

    #[test]
    fn erofs_writer_replaces_an_existing_file() {
        let store = Store::new();
        let work = tempfile::tempdir().unwrap();
        let img = work.path().join("img");
        fs::write(&img, vec![0xffu8; 100_000]).unwrap();
        let nodes = vec![file_bytes("f", b"x".to_vec())];
        let figures = write(&img, &store, &nodes).unwrap();
        assert_eq!(fs::metadata(&img).unwrap().len(), figures.image_bytes);
        fsck(&img);
        read_and_compare(&img, &expected(&store, &nodes));
    }
}
