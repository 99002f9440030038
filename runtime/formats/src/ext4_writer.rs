//! Writes a writable ext4 image straight from a list of nodes: what a
//! private partition holds, without a staging tree and without a `mke2fs`
//! process.
//!
//! The image is what `mke2fs -t ext4 -b 4096 -I 256 -O ^resize_inode,
//! ^flex_bg,^metadata_csum,^64bit` would make and fill: 4 KiB blocks,
//! 32768-block groups each with its bitmaps and inode table at its start
//! (superblock and descriptor backups in groups 0, 1 and the powers of 3,
//! 5 and 7), 256-byte inodes, extent-mapped files and directories, linear
//! directories (the kernel indexes a directory itself once it grows, as
//! `dir_index` allows) or, when its entries fit in the inode, inline
//! (`inline_data`: no block for the many empty or nearly empty directories
//! of a private partition), a jbd2 journal in inode 8 of the size `mke2fs`
//! picks, and `lost+found`. Unused inode table blocks, unused journal
//! blocks and the tail of every file's last block are never written: the
//! file is sparse and they read as zeros, as `lazy_itable_init` and
//! `lazy_journal_init` leave them.
//!
//! Blocks are handed out in order, so every file is one extent per block
//! group it crosses. Checksummed metadata (`metadata_csum`) is not written:
//! the guest's kernel mounts the image read-write either way, and every
//! block this writer lays out is checked by `e2fsck -fn` in the tests.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use provd_domain::image::{EntryKind, Hash};

pub use crate::writer_input::{Content, Node};
use crate::writer_input::{
    Dirs, FT_BLKDEV, FT_CHRDEV, FT_DIR, FT_FIFO, FT_REG_FILE, FT_SYMLINK, NodeError, S_IFBLK,
    S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG, file_name, put_bytes, put16, put32,
};

const BS: u64 = 4096;
const BLOCKS_PER_GROUP: u64 = 32768;
const INODE_SIZE: u64 = 256;
const INODES_PER_BLOCK: u64 = BS / INODE_SIZE;
const DESC_SIZE: u64 = 32;
const EXTRA_ISIZE: u16 = 32;
const ROOT_INO: u32 = 2;
const JOURNAL_INO: u32 = 8;
const FIRST_INO: u32 = 11;
const LOST_FOUND_BLOCKS: u64 = 4;
const MAX_EXTENT_LEN: u64 = 32768;
const EXTENTS_IN_INODE: usize = 4;
const EXTENTS_PER_BLOCK: usize = ((BS - 12) / 12) as usize;
const EXTENT_MAGIC: u16 = 0xF30A;
const MAX_LINKS: u32 = 65000;
const FAST_SYMLINK_MAX: usize = 59;
/// Smallest image: one group with room for the journal and the root.
const MIN_BLOCKS: u64 = 8192;

const MAGIC: u16 = 0xEF53;
const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_EXT_ATTR: u32 = 0x8;
const COMPAT_DIR_INDEX: u32 = 0x20;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
const FL_INLINE_DATA: u32 = 0x1000_0000;
/// `i_block`'s bytes: an inline directory's parent number, then entries.
const INLINE_BYTES: usize = 60;
/// An inline directory's parent inode number, before its entries.
const INLINE_DOTDOT: usize = 4;
/// In-inode extended attributes: their magic, and `system.` as an index.
const XATTR_MAGIC: u32 = 0xEA02_0000;
const XATTR_INDEX_SYSTEM: u8 = 7;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_LARGE_FILE: u32 = 0x2;
const RO_COMPAT_DIR_NLINK: u32 = 0x20;
const RO_COMPAT_EXTRA_ISIZE: u32 = 0x40;
const DEFM_XATTR_USER: u32 = 0x4;
const DEFM_ACL: u32 = 0x8;
const FLAGS_SIGNED_HASH: u32 = 0x1;
const HASH_HALF_MD4: u8 = 1;
const JNL_BACKUP_BLOCKS: u8 = 1;
const FL_EXTENTS: u32 = 0x80000;

const JBD2_MAGIC: u32 = 0xC03B_3998;
const JBD2_SUPERBLOCK_V2: u32 = 4;

/// What the image looks like apart from its nodes.
#[derive(Debug, Clone)]
pub struct Ext4Options {
    /// Size of the image; whole 4 KiB blocks are used.
    pub size_bytes: u64,
    /// Inodes to make room for (at least the nodes plus the 11 reserved).
    pub inodes: u64,
    pub uuid: [u8; 16],
    /// At most 16 bytes.
    pub label: String,
    /// Seed of the directory hash the kernel uses once it indexes a
    /// directory; any value but zero.
    pub hash_seed: [u8; 16],
    /// Creation time of the filesystem, and the root's and `lost+found`'s
    /// time.
    pub now: i64,
}

/// What a write produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ext4Figures {
    /// Inodes in use, the 10 reserved ones and `lost+found` included.
    pub inodes: u64,
    /// Blocks in use, metadata and journal included.
    pub used_blocks: u64,
    /// Blocks of the image.
    pub blocks: u64,
    /// Bytes of regular-file content written, each inode once.
    pub data_bytes: u64,
}

/// Why an image could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Ext4WriteError {
    /// reading content or writing the image failed
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
    /// the nodes do not fit the requested size or inode count
    #[error("the ext4 image does not fit: {0}")]
    TooSmall(String),
}

impl From<NodeError> for Ext4WriteError {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::Invalid { path, reason } => Ext4WriteError::Invalid { path, reason },
            NodeError::ContentMismatch { path, expected, got } => {
                Ext4WriteError::ContentMismatch { path, expected, got }
            }
        }
    }
}

fn invalid(path: &str, reason: impl Into<String>) -> Ext4WriteError {
    Ext4WriteError::Invalid { path: path.to_string(), reason: reason.into() }
}

fn internal(reason: &str) -> Ext4WriteError {
    invalid("", format!("internal error of the ext4 writer: {reason}"))
}

/// Journal blocks `mke2fs` gives a filesystem of `blocks` 4 KiB blocks.
pub fn journal_blocks(blocks: u64) -> u64 {
    match blocks {
        0..32_768 => 1024,
        32_768..262_144 => 4096,
        262_144..524_288 => 8192,
        524_288..4_194_304 => 16_384,
        4_194_304..8_388_608 => 32_768,
        8_388_608..16_777_216 => 65_536,
        16_777_216..33_554_432 => 131_072,
        _ => 262_144,
    }
}

/// Where an inode's bytes come from.
#[derive(Debug, Clone, Copy)]
enum Source<'a> {
    None,
    Bytes(&'a [u8]),
    Object(&'a Hash),
    /// Directory blocks, made once numbers are known.
    Dir,
    /// A directory small enough for `i_block` (`inline_data`): its parent
    /// and entries in `dir_data`, no block of its own.
    InlineDir,
    LostFound,
    /// A symlink's target, in a block or inline.
    Target(&'a [u8]),
}

#[derive(Debug)]
struct Ino<'a> {
    path: &'a str,
    number: u32,
    ftype: u8,
    ifmt: u16,
    perm: u16,
    uid: u32,
    gid: u32,
    mtime: i64,
    size: u64,
    nlink: u32,
    device: (u32, u32),
    source: Source<'a>,
    parent: usize,
    children: Vec<(&'a [u8], usize)>,
    /// Directory blocks, once laid out.
    dir_data: Vec<u8>,
    /// Data blocks, as runs of (first block, length), in file order.
    runs: Vec<(u64, u64)>,
    /// Extent tree leaves when the runs do not fit the inode.
    leaves: Vec<u64>,
}

impl<'a> Ino<'a> {
    fn new(path: &'a str, ftype: u8, ifmt: u16, n: Option<&'a Node>, parent: usize) -> Ino<'a> {
        Ino {
            path,
            number: 0,
            ftype,
            ifmt,
            perm: n.map_or(0o755, |n| (n.mode & 0o7777) as u16),
            uid: n.map_or(0, |n| n.uid),
            gid: n.map_or(0, |n| n.gid),
            mtime: n.map_or(0, |n| n.mtime),
            size: 0,
            nlink: 1,
            device: (0, 0),
            source: Source::None,
            parent,
            children: Vec::new(),
            dir_data: Vec::new(),
            runs: Vec::new(),
            leaves: Vec::new(),
        }
    }

    fn data_blocks(&self) -> u64 {
        match self.source {
            Source::Bytes(_) | Source::Object(_) => self.size.div_ceil(BS),
            Source::Dir => self.dir_data.len() as u64 / BS,
            Source::LostFound => LOST_FOUND_BLOCKS,
            Source::Target(t) if t.len() > FAST_SYMLINK_MAX => 1,
            Source::Target(_) | Source::None | Source::InlineDir => 0,
        }
    }

    /// Inline symlinks and special files have no extent tree.
    fn has_extents(&self) -> bool {
        match self.source {
            Source::Target(t) => t.len() > FAST_SYMLINK_MAX,
            Source::None => self.ifmt == S_IFREG,
            Source::InlineDir => false,
            _ => true,
        }
    }
}

struct Tree<'a> {
    dirs: Dirs<'a>,
    inodes: Vec<Ino<'a>>,
}

/// Links inode `child` into directory `parent` under `name`, counting a
/// subdirectory in the parent's links.
fn attach<'a>(
    inodes: &mut [Ino<'a>],
    parent: usize,
    name: &'a [u8],
    child: usize,
) -> Result<(), Ext4WriteError> {
    let is_dir = inodes.get(child).is_some_and(|c| c.ftype == FT_DIR);
    let p = inodes.get_mut(parent).ok_or_else(|| internal("inode index out of range"))?;
    p.children.push((name, child));
    if is_dir {
        // Past the limit the count stays at 1, which `dir_nlink` means
        // "many".
        p.nlink = p.nlink.saturating_add(1);
    }
    Ok(())
}

impl<'a> Tree<'a> {
    fn get_mut(&mut self, i: usize) -> Result<&mut Ino<'a>, Ext4WriteError> {
        self.inodes.get_mut(i).ok_or_else(|| internal("inode index out of range"))
    }

    fn attach(
        &mut self,
        parent: usize,
        name: &'a [u8],
        child: usize,
    ) -> Result<(), Ext4WriteError> {
        attach(&mut self.inodes, parent, name, child)
    }

    /// The directory `dir`, created with its missing ancestors (`0755
    /// root`, time 0, unless a node gives them).
    fn dir(&mut self, dir: &'a str, for_path: &str) -> Result<usize, Ext4WriteError> {
        let Tree { dirs, inodes } = self;
        dirs.ensure(dir, for_path, |prefix, node, parent| {
            let mut ino = Ino::new(prefix, FT_DIR, S_IFDIR, node, parent);
            ino.nlink = 2;
            ino.source = Source::Dir;
            let i = inodes.len();
            inodes.push(ino);
            attach(inodes, parent, file_name(prefix), i)?;
            Ok(i)
        })
    }
}

/// Builds the inode tree of `nodes`; index 0 is the root, 1 `lost+found`.
fn build_tree<'a>(nodes: &'a [Node], now: i64) -> Result<Vec<Ino<'a>>, Ext4WriteError> {
    let dirs = Dirs::new(nodes)?;
    if let Some(n) = dirs.node("lost+found")
        && n.kind != EntryKind::Dir
    {
        return Err(invalid("lost+found", "is reserved for the filesystem's own directory"));
    }
    if let Some(n) = nodes.iter().find(|n| n.path.starts_with("lost+found/")) {
        return Err(invalid(&n.path, "lost+found is the filesystem's own, and stays empty"));
    }
    let mut root = Ino::new("", FT_DIR, S_IFDIR, None, 0);
    root.nlink = 2;
    root.mtime = now;
    root.source = Source::Dir;
    let mut t = Tree { dirs, inodes: vec![root] };
    // lost+found first, so that it is inode 11 as e2fsck expects to find
    // it; an image's own lost+found gives its metadata.
    let own = t.dirs.node("lost+found");
    let mut lf = Ino::new("lost+found", FT_DIR, S_IFDIR, own, 0);
    lf.perm = own.map_or(0o700, |n| (n.mode & 0o7777) as u16);
    lf.mtime = own.map_or(now, |n| n.mtime);
    lf.nlink = 2;
    lf.source = Source::LostFound;
    t.inodes.push(lf);
    t.attach(0, b"lost+found", 1)?;
    t.dirs.insert("lost+found", 1);

    let mut links: HashMap<u64, usize> = HashMap::new();
    for n in nodes {
        let path = n.path.as_str();
        let (parent_path, _) = path.rsplit_once('/').unwrap_or(("", path));
        if n.kind == EntryKind::Dir {
            t.dir(path, path)?;
            continue;
        }
        let parent = t.dir(parent_path, path)?;
        if let (EntryKind::File | EntryKind::CharDevice, Some(key)) = (n.kind, n.inode)
            && let Some(&first) = links.get(&key)
        {
            let ino = t.get_mut(first)?;
            if ino.nlink >= MAX_LINKS {
                return Err(invalid(path, format!("more than {MAX_LINKS} names for one inode")));
            }
            ino.nlink += 1;
            t.attach(parent, file_name(path), first)?;
            continue;
        }
        let mut ino = match n.kind {
            EntryKind::File => {
                let mut ino = Ino::new(path, FT_REG_FILE, S_IFREG, Some(n), parent);
                ino.size = n.size;
                // `check_node` saw to it that the size and the content agree.
                ino.source = match &n.content {
                    None => Source::None,
                    Some(Content::Bytes(b)) => Source::Bytes(b),
                    Some(Content::Object(h)) => Source::Object(h),
                };
                ino
            }
            EntryKind::Symlink => {
                let target = n.link_target.as_deref().unwrap_or_default();
                let mut ino = Ino::new(path, FT_SYMLINK, S_IFLNK, Some(n), parent);
                ino.perm = 0o777;
                ino.size = target.len() as u64;
                ino.source = Source::Target(target.as_bytes());
                ino
            }
            EntryKind::CharDevice | EntryKind::BlockDevice => {
                let (ft, fmt) = if n.kind == EntryKind::CharDevice {
                    (FT_CHRDEV, S_IFCHR)
                } else {
                    (FT_BLKDEV, S_IFBLK)
                };
                let mut ino = Ino::new(path, ft, fmt, Some(n), parent);
                ino.device = n.device.unwrap_or_default();
                ino
            }
            EntryKind::Fifo => Ino::new(path, FT_FIFO, S_IFIFO, Some(n), parent),
            EntryKind::Hardlink | EntryKind::Dir => {
                return Err(internal(
                    "a kind `check_node` refuses, or a directory, in the file branch",
                ));
            }
        };
        ino.parent = parent;
        let i = t.inodes.len();
        t.inodes.push(ino);
        t.attach(parent, file_name(path), i)?;
        if let (EntryKind::File | EntryKind::CharDevice, Some(key)) = (n.kind, n.inode) {
            links.insert(key, i);
        }
    }
    let mut inodes = t.inodes;
    // Numbers: the root 2, lost+found 11, then in order.
    let mut next = FIRST_INO + 1;
    for (i, ino) in inodes.iter_mut().enumerate() {
        ino.number = match i {
            0 => ROOT_INO,
            1 => FIRST_INO,
            _ => {
                let n = next;
                next = next.checked_add(1).ok_or_else(|| internal("inode numbers run out"))?;
                n
            }
        };
        if ino.ftype == FT_DIR && ino.nlink > MAX_LINKS {
            ino.nlink = 1;
        }
        ino.children.sort_unstable_by(|a, b| a.0.cmp(b.0));
    }
    // Directory blocks, now that every number is known.
    let numbers: Vec<u32> = inodes.iter().map(|i| i.number).collect();
    let ftypes: Vec<u8> = inodes.iter().map(|i| i.ftype).collect();
    for (i, ino) in inodes.iter_mut().enumerate().filter(|(_, i)| matches!(i.source, Source::Dir)) {
        let parent = *numbers.get(ino.parent).ok_or_else(|| internal("parent out of range"))?;
        let mut entries: Vec<(&[u8], u32, u8)> = Vec::with_capacity(ino.children.len() + 2);
        for &(name, child) in &ino.children {
            let number = *numbers.get(child).ok_or_else(|| internal("child out of range"))?;
            let ft = *ftypes.get(child).ok_or_else(|| internal("child out of range"))?;
            entries.push((name, number, ft));
        }
        // A directory whose entries fit in the inode takes no block (most
        // of a private partition's are empty or nearly). The root stays
        // in a block, as e2fsck expects it.
        if i != 0
            && let Some(inline) = inline_dir(parent, &entries)
        {
            ino.source = Source::InlineDir;
            ino.dir_data = inline;
            ino.size = INLINE_BYTES as u64;
            continue;
        }
        entries.splice(0..0, [(&b"."[..], ino.number, FT_DIR), (&b".."[..], parent, FT_DIR)]);
        ino.dir_data = dir_blocks(&entries);
        ino.size = ino.dir_data.len() as u64;
    }
    if let Some(lf) = inodes.get_mut(1) {
        lf.size = LOST_FOUND_BLOCKS * BS;
    }
    Ok(inodes)
}

fn put_be32(buf: &mut [u8], at: usize, v: u32) {
    put_bytes(buf, at, &v.to_be_bytes());
}

/// An inline directory's `i_block`, as the kernel lays it out: the parent's
/// number, then the entries ("." and ".." are implied), the last stretched
/// to the end; an empty one is one unused entry. `None` when the entries
/// do not fit.
fn inline_dir(parent: u32, entries: &[(&[u8], u32, u8)]) -> Option<Vec<u8>> {
    let lens: Vec<usize> = entries.iter().map(|e| (8 + e.0.len()).next_multiple_of(4)).collect();
    if INLINE_DOTDOT + lens.iter().sum::<usize>() > INLINE_BYTES {
        return None;
    }
    let mut out = vec![0u8; INLINE_BYTES];
    put32(&mut out, 0, parent);
    let mut at = INLINE_DOTDOT;
    if entries.is_empty() {
        put16(&mut out, at + 4, (INLINE_BYTES - at) as u16);
        return Some(out);
    }
    for (k, (&(name, number, ft), &len)) in entries.iter().zip(&lens).enumerate() {
        let len = if k + 1 == entries.len() { INLINE_BYTES - at } else { len };
        put32(&mut out, at, number);
        put16(&mut out, at + 4, len as u16);
        put_bytes(&mut out, at + 6, &[name.len() as u8, ft]);
        put_bytes(&mut out, at + 8, name);
        at += len;
    }
    Some(out)
}

/// Linear directory blocks: each entry 8 bytes and its name padded to 4,
/// the last one of a block stretched to the block's end.
fn dir_blocks(entries: &[(&[u8], u32, u8)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut block = vec![0u8; BS as usize];
    let mut at = 0usize;
    let mut last = 0usize;
    for &(name, number, ft) in entries {
        let len = (8 + name.len()).next_multiple_of(4);
        if at + len > BS as usize {
            put16(&mut block, last + 4, (BS as usize - last) as u16);
            out.extend_from_slice(&block);
            block.fill(0);
            at = 0;
        }
        put32(&mut block, at, number);
        put16(&mut block, at + 4, len as u16);
        put_bytes(&mut block, at + 6, &[name.len() as u8]);
        put_bytes(&mut block, at + 7, &[ft]);
        put_bytes(&mut block, at + 8, name);
        last = at;
        at += len;
    }
    put16(&mut block, last + 4, (BS as usize - last) as u16);
    out.extend_from_slice(&block);
    out
}

/// The blocks and block groups of an image.
#[derive(Debug)]
struct Geometry {
    blocks: u64,
    groups: u64,
    inodes_per_group: u64,
    itable_blocks: u64,
    gdt_blocks: u64,
}

fn has_super(group: u64) -> bool {
    fn power_of(mut g: u64, base: u64) -> bool {
        while g > 1 && g.is_multiple_of(base) {
            g /= base;
        }
        g == 1
    }
    group <= 1 || power_of(group, 3) || power_of(group, 5) || power_of(group, 7)
}

impl Geometry {
    fn new(size_bytes: u64, inodes: u64) -> Result<Geometry, Ext4WriteError> {
        let mut blocks = size_bytes / BS;
        if blocks < MIN_BLOCKS {
            return Err(Ext4WriteError::TooSmall(format!(
                "{size_bytes} bytes is below the {} an ext4 with a journal needs",
                MIN_BLOCKS * BS
            )));
        }
        if blocks > u64::from(u32::MAX) {
            return Err(Ext4WriteError::TooSmall(format!(
                "{size_bytes} bytes is past the 16 TiB of 32-bit block numbers"
            )));
        }
        loop {
            let groups = blocks.div_ceil(BLOCKS_PER_GROUP);
            // The inodes asked for are room to grow; a group's inode bitmap
            // holds at most 32768, so a small image gets fewer. Whether the
            // inodes in use fit is checked by the caller.
            let inodes_per_group = inodes
                .div_ceil(groups)
                .next_multiple_of(INODES_PER_BLOCK)
                .clamp(INODES_PER_BLOCK, BLOCKS_PER_GROUP);
            let g = Geometry {
                blocks,
                groups,
                inodes_per_group,
                itable_blocks: inodes_per_group / INODES_PER_BLOCK,
                gdt_blocks: (groups * DESC_SIZE).div_ceil(BS),
            };
            // A last group too small for its own metadata is left out, as
            // mke2fs does.
            let last = blocks - (groups - 1) * BLOCKS_PER_GROUP;
            if groups > 1 && last < g.overhead(groups - 1) + 50 {
                blocks = (groups - 1) * BLOCKS_PER_GROUP;
                continue;
            }
            return Ok(g);
        }
    }

    fn group_start(&self, g: u64) -> u64 {
        g * BLOCKS_PER_GROUP
    }

    fn group_blocks(&self, g: u64) -> u64 {
        BLOCKS_PER_GROUP.min(self.blocks - self.group_start(g))
    }

    /// Blocks at a group's start: superblock and descriptors (if a backup
    /// is kept there), the two bitmaps, the inode table.
    fn overhead(&self, g: u64) -> u64 {
        let sb = if has_super(g) { 1 + self.gdt_blocks } else { 0 };
        sb + 2 + self.itable_blocks
    }

    fn block_bitmap(&self, g: u64) -> u64 {
        self.group_start(g) + self.overhead(g) - 2 - self.itable_blocks
    }

    fn inode_bitmap(&self, g: u64) -> u64 {
        self.block_bitmap(g) + 1
    }

    fn inode_table(&self, g: u64) -> u64 {
        self.block_bitmap(g) + 2
    }

    fn inodes_count(&self) -> u64 {
        self.groups * self.inodes_per_group
    }
}

/// Hands out blocks in order, skipping each group's metadata.
struct Allocator<'g> {
    geo: &'g Geometry,
    group: u64,
    next: u64,
    used: u64,
}

impl Allocator<'_> {
    fn new(geo: &Geometry) -> Allocator<'_> {
        Allocator { geo, group: 0, next: geo.overhead(0), used: 0 }
    }

    /// `n` blocks as runs of at most one extent each.
    fn take(&mut self, n: u64, what: &str) -> Result<Vec<(u64, u64)>, Ext4WriteError> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut left = n;
        while left > 0 {
            let end = self.geo.group_start(self.group) + self.geo.group_blocks(self.group);
            if self.next >= end {
                self.group += 1;
                if self.group >= self.geo.groups {
                    return Err(Ext4WriteError::TooSmall(format!(
                        "{what} needs {n} more blocks than the {} of the image allow",
                        self.geo.blocks
                    )));
                }
                self.next = self.geo.group_start(self.group) + self.geo.overhead(self.group);
                continue;
            }
            let len = left.min(end - self.next).min(MAX_EXTENT_LEN);
            match runs.last_mut() {
                Some((s, l)) if *s + *l == self.next && *l + len <= MAX_EXTENT_LEN => *l += len,
                _ => runs.push((self.next, len)),
            }
            self.next += len;
            left -= len;
        }
        self.used += n;
        Ok(runs)
    }
}

/// Gives `ino` its data blocks, and extent leaves if its runs do not fit
/// in the inode.
fn place(ino: &mut Ino<'_>, alloc: &mut Allocator<'_>) -> Result<(), Ext4WriteError> {
    let n = ino.data_blocks();
    if n == 0 {
        return Ok(());
    }
    ino.runs = alloc.take(n, ino.path)?;
    if ino.runs.len() > EXTENTS_IN_INODE {
        let leaves = ino.runs.len().div_ceil(EXTENTS_PER_BLOCK);
        if leaves > EXTENTS_IN_INODE {
            return Err(invalid(ino.path, "too fragmented for a two-level extent tree"));
        }
        ino.leaves =
            alloc.take(leaves as u64, ino.path)?.iter().flat_map(|&(s, l)| s..s + l).collect();
    }
    Ok(())
}

/// An extent header.
fn extent_header(buf: &mut [u8], at: usize, entries: usize, max: usize, depth: u16) {
    put16(buf, at, EXTENT_MAGIC);
    put16(buf, at + 2, entries as u16);
    put16(buf, at + 4, max as u16);
    put16(buf, at + 6, depth);
}

/// Extents of `runs` (logical blocks from `first_logical`) at `at`.
fn extents(buf: &mut [u8], at: usize, runs: &[(u64, u64)], mut logical: u64) {
    for (k, &(start, len)) in runs.iter().enumerate() {
        let e = at + 12 * k;
        put32(buf, e, logical as u32);
        put16(buf, e + 4, len as u16);
        put16(buf, e + 6, (start >> 32) as u16);
        put32(buf, e + 8, start as u32);
        logical += len;
    }
}

/// The 60 bytes of `i_block` for an extent-mapped inode, and its leaf
/// blocks' contents.
fn extent_tree(ino: &Ino<'_>) -> ([u8; 60], Vec<(u64, Vec<u8>)>) {
    let mut iblock = [0u8; 60];
    if ino.leaves.is_empty() {
        extent_header(&mut iblock, 0, ino.runs.len(), EXTENTS_IN_INODE, 0);
        extents(&mut iblock, 12, &ino.runs, 0);
        return (iblock, Vec::new());
    }
    extent_header(&mut iblock, 0, ino.leaves.len(), EXTENTS_IN_INODE, 1);
    let mut leaves = Vec::new();
    let mut logical = 0u64;
    for (k, (chunk, &leaf)) in ino.runs.chunks(EXTENTS_PER_BLOCK).zip(&ino.leaves).enumerate() {
        let i = 12 + 12 * k;
        put32(&mut iblock, i, logical as u32);
        put32(&mut iblock, i + 4, leaf as u32);
        put16(&mut iblock, i + 8, (leaf >> 32) as u16);
        let mut block = vec![0u8; BS as usize];
        extent_header(&mut block, 0, chunk.len(), EXTENTS_PER_BLOCK, 0);
        extents(&mut block, 12, chunk, logical);
        logical += chunk.iter().map(|&(_, l)| l).sum::<u64>();
        leaves.push((leaf, block));
    }
    (iblock, leaves)
}

/// Seconds and the `_extra` epoch bits of a time (nanoseconds 0).
fn time_fields(t: i64) -> (u32, u32) {
    let t = t.clamp(i64::from(i32::MIN), (3i64 << 32) + i64::from(i32::MAX));
    let low = t as i32;
    let epoch = ((t - i64::from(low)) >> 32) as u32 & 3;
    (low as u32, epoch)
}

/// A 256-byte inode.
fn inode_bytes(ino: &Ino<'_>, iblock: &[u8; 60], leaves: u64) -> Result<Vec<u8>, Ext4WriteError> {
    let mut b = vec![0u8; INODE_SIZE as usize];
    put16(&mut b, 0, ino.ifmt | ino.perm);
    put16(&mut b, 2, ino.uid as u16);
    put32(&mut b, 4, ino.size as u32);
    let (secs, epoch) = time_fields(ino.mtime);
    for at in [8, 12, 16, 144] {
        put32(&mut b, at, secs);
    }
    put16(&mut b, 24, ino.gid as u16);
    put16(&mut b, 26, ino.nlink as u16);
    let sectors = (ino.data_blocks() + leaves) * (BS / 512);
    let sectors = u32::try_from(sectors)
        .map_err(|_| invalid(ino.path, "larger than 2 TiB, which needs huge_file"))?;
    put32(&mut b, 28, sectors);
    let inline = matches!(ino.source, Source::InlineDir);
    if ino.has_extents() {
        put32(&mut b, 32, FL_EXTENTS);
    } else if inline {
        put32(&mut b, 32, FL_INLINE_DATA);
    }
    put_bytes(&mut b, 40, iblock);
    put32(&mut b, 108, (ino.size >> 32) as u32);
    put16(&mut b, 120, (ino.uid >> 16) as u16);
    put16(&mut b, 122, (ino.gid >> 16) as u16);
    put16(&mut b, 128, EXTRA_ISIZE);
    for at in [132, 136, 140, 148] {
        put32(&mut b, at, epoch);
    }
    if inline {
        // Inline data needs its `system.data` attribute in the inode, here
        // empty: everything fits in `i_block`. Its value offset points at
        // the inode's end, as e2fsprogs writes an empty value.
        let area = 128 + usize::from(EXTRA_ISIZE);
        put32(&mut b, area, XATTR_MAGIC);
        let entry = area + 4;
        put_bytes(&mut b, entry, &[4, XATTR_INDEX_SYSTEM]);
        put16(&mut b, entry + 2, (INODE_SIZE as usize - entry) as u16);
        put_bytes(&mut b, entry + 16, b"data");
    }
    Ok(b)
}

/// `i_block` of an inode without extents.
fn plain_iblock(ino: &Ino<'_>) -> [u8; 60] {
    let mut iblock = [0u8; 60];
    match ino.source {
        Source::Target(t) => put_bytes(&mut iblock, 0, t),
        Source::InlineDir => put_bytes(&mut iblock, 0, &ino.dir_data),
        _ if matches!(ino.ifmt, S_IFCHR | S_IFBLK) => {
            let (major, minor) = ino.device;
            if major < 256 && minor < 256 {
                put32(&mut iblock, 0, (major << 8) | minor);
            } else {
                put32(&mut iblock, 4, (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12));
            }
        }
        _ => {}
    }
    iblock
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> Ext4WriteError {
    move |source| Ext4WriteError::Io { what, source }
}

fn write_at(file: &File, out: &Path, data: &[u8], offset: u64) -> Result<(), Ext4WriteError> {
    file.write_all_at(data, offset).map_err(io_err(format!("writing {}", out.display())))
}

/// Writes an ext4 image of `nodes` to `out` (created or truncated).
///
/// Parent directories missing from `nodes` are created `0755 root:root`
/// with time 0. Regular files with the same `inode` key are hard links to
/// one inode. `open` opens a content object; its bytes are copied into the
/// image. The nodes and the layout are checked before `out` is touched;
/// when writing fails afterwards, the partial image is removed. The image
/// is not synced: the caller syncs what it publishes.
pub fn write_image(
    out: &Path,
    nodes: &[Node],
    opts: &Ext4Options,
    open: &mut dyn FnMut(&Hash) -> std::io::Result<File>,
) -> Result<Ext4Figures, Ext4WriteError> {
    if opts.label.len() > 16 {
        return Err(invalid("", format!("label {:?} is longer than 16 bytes", opts.label)));
    }
    let mut inodes = build_tree(nodes, opts.now)?;
    let used_inodes = u64::from(FIRST_INO) + inodes.len() as u64 - 2;
    let geo = Geometry::new(opts.size_bytes, opts.inodes.max(used_inodes))?;
    if used_inodes > geo.inodes_count() {
        return Err(Ext4WriteError::TooSmall(format!(
            "{used_inodes} inodes are needed, {} fit",
            geo.inodes_count()
        )));
    }
    let mut alloc = Allocator::new(&geo);
    // The root and lost+found first, then the journal, then every inode.
    let (head, rest) = inodes.split_at_mut(2);
    for ino in head.iter_mut() {
        place(ino, &mut alloc)?;
    }
    let mut journal = Ino::new("<journal>", FT_REG_FILE, S_IFREG, None, 0);
    journal.perm = 0o600;
    journal.mtime = opts.now;
    journal.size = journal_blocks(geo.blocks) * BS;
    journal.source = Source::Bytes(&[]);
    place(&mut journal, &mut alloc)?;
    for ino in rest.iter_mut() {
        place(ino, &mut alloc)?;
    }
    let file = File::create(out).map_err(io_err(format!("creating {}", out.display())))?;
    let written = (|| {
        file.set_len(geo.blocks * BS).map_err(io_err(format!("sizing {}", out.display())))?;
        write_all(&file, out, &geo, &inodes, &journal, used_inodes, opts, open)
    })();
    match written {
        Ok(data_bytes) => Ok(Ext4Figures {
            inodes: used_inodes,
            used_blocks: (0..geo.groups).map(|g| geo.overhead(g)).sum::<u64>() + alloc.used,
            blocks: geo.blocks,
            data_bytes,
        }),
        Err(e) => {
            drop(file);
            if let Err(rm) = std::fs::remove_file(out) {
                tracing::warn!(path = %out.display(), error = %rm, "cannot remove a partial ext4 image");
            }
            Err(e)
        }
    }
}

/// Marks `len` bits from `first` in a bitmap.
fn set_bits(bitmap: &mut [u8], first: u64, len: u64) {
    for bit in first..first + len {
        if let Some(byte) = bitmap.get_mut((bit / 8) as usize) {
            *byte |= 1 << (bit % 8);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn write_all(
    file: &File,
    out: &Path,
    geo: &Geometry,
    inodes: &[Ino<'_>],
    journal: &Ino<'_>,
    used_inodes: u64,
    opts: &Ext4Options,
    open: &mut dyn FnMut(&Hash) -> std::io::Result<File>,
) -> Result<u64, Ext4WriteError> {
    let groups = geo.groups as usize;
    let mut block_bitmaps = vec![vec![0u8; BS as usize]; groups];
    let mut inode_bitmaps = vec![vec![0u8; BS as usize]; groups];
    let mut dirs = vec![0u64; groups];
    for (g, bitmap) in block_bitmaps.iter_mut().enumerate() {
        let g = g as u64;
        set_bits(bitmap, 0, geo.overhead(g));
        // Bits past the last block of a short last group are set.
        let blocks = geo.group_blocks(g);
        set_bits(bitmap, blocks, BLOCKS_PER_GROUP - blocks);
    }
    let mut mark = |start: u64, len: u64| {
        let g = start / BLOCKS_PER_GROUP;
        if let Some(bitmap) = block_bitmaps.get_mut(g as usize) {
            set_bits(bitmap, start - g * BLOCKS_PER_GROUP, len);
        }
    };
    for ino in inodes.iter().chain(std::iter::once(journal)) {
        for &(s, l) in &ino.runs {
            mark(s, l);
        }
        for &leaf in &ino.leaves {
            mark(leaf, 1);
        }
    }
    for (g, bitmap) in inode_bitmaps.iter_mut().enumerate() {
        let first = g as u64 * geo.inodes_per_group;
        let used = used_inodes.saturating_sub(first).min(geo.inodes_per_group);
        set_bits(bitmap, 0, used);
        set_bits(bitmap, geo.inodes_per_group, BS * 8 - geo.inodes_per_group);
    }
    for ino in inodes.iter().filter(|i| i.ftype == FT_DIR) {
        let g = (u64::from(ino.number) - 1) / geo.inodes_per_group;
        if let Some(d) = dirs.get_mut(g as usize) {
            *d += 1;
        }
    }

    // Inode tables, only as far as they are used.
    let mut table = vec![0u8; (used_inodes * INODE_SIZE) as usize];
    let mut data_bytes = 0u64;
    let mut place_inode = |number: u32, bytes: &[u8]| {
        put_bytes(&mut table, (u64::from(number) - 1) as usize * INODE_SIZE as usize, bytes);
    };
    let (jblock, jleaves) = extent_tree(journal);
    place_inode(JOURNAL_INO, &inode_bytes(journal, &jblock, jleaves.len() as u64)?);
    for (leaf, block) in &jleaves {
        write_at(file, out, block, leaf * BS)?;
    }
    for ino in inodes {
        let bytes = if ino.has_extents() {
            let (iblock, leaves) = extent_tree(ino);
            for (leaf, block) in &leaves {
                write_at(file, out, block, leaf * BS)?;
            }
            inode_bytes(ino, &iblock, leaves.len() as u64)?
        } else {
            inode_bytes(ino, &plain_iblock(ino), 0)?
        };
        place_inode(ino.number, &bytes);
        match ino.source {
            Source::Dir => write_runs(file, out, &ino.runs, &ino.dir_data)?,
            Source::LostFound => {
                let mut data = dir_blocks(&[(b".", FIRST_INO, FT_DIR), (b"..", ROOT_INO, FT_DIR)]);
                for _ in 1..LOST_FOUND_BLOCKS {
                    let mut empty = vec![0u8; BS as usize];
                    put16(&mut empty, 4, BS as u16);
                    data.extend_from_slice(&empty);
                }
                write_runs(file, out, &ino.runs, &data)?;
            }
            Source::Target(t) if ino.has_extents() => write_runs(file, out, &ino.runs, t)?,
            Source::Bytes(b) => {
                write_runs(file, out, &ino.runs, b)?;
                data_bytes += b.len() as u64;
            }
            Source::Object(hash) => {
                copy_object(file, out, ino, hash, open)?;
                data_bytes += ino.size;
            }
            Source::Target(_) | Source::None | Source::InlineDir => {}
        }
    }
    for g in 0..geo.groups {
        let first = g * geo.inodes_per_group;
        let end = (first + geo.inodes_per_group).min(used_inodes);
        if end > first {
            let part = table
                .get((first * INODE_SIZE) as usize..(end * INODE_SIZE) as usize)
                .ok_or_else(|| internal("inode table out of range"))?;
            write_at(file, out, part, geo.inode_table(g) * BS)?;
        }
    }

    // Journal superblock, in the journal's first block.
    let &(jstart, _) = journal.runs.first().ok_or_else(|| internal("no journal blocks"))?;
    let mut jsb = vec![0u8; 1024];
    put_be32(&mut jsb, 0, JBD2_MAGIC);
    put_be32(&mut jsb, 4, JBD2_SUPERBLOCK_V2);
    put_be32(&mut jsb, 12, BS as u32);
    put_be32(&mut jsb, 16, (journal.size / BS) as u32);
    put_be32(&mut jsb, 20, 1);
    put_be32(&mut jsb, 24, 1);
    put_bytes(&mut jsb, 48, &opts.uuid);
    put_be32(&mut jsb, 64, 1);
    write_at(file, out, &jsb, jstart * BS)?;

    // Bitmaps, descriptors, superblocks.
    let mut free_blocks_total = 0u64;
    let mut free_inodes_total = 0u64;
    let mut gdt = vec![0u8; (geo.gdt_blocks * BS) as usize];
    for g in 0..geo.groups {
        let gi = g as usize;
        let bitmap = block_bitmaps.get(gi).ok_or_else(|| internal("bitmap out of range"))?;
        let ibitmap = inode_bitmaps.get(gi).ok_or_else(|| internal("bitmap out of range"))?;
        let used_blocks: u64 = bitmap.iter().map(|b| u64::from(b.count_ones())).sum::<u64>()
            - (BLOCKS_PER_GROUP - geo.group_blocks(g));
        let free_blocks = geo.group_blocks(g) - used_blocks;
        let used_inodes_g: u64 = ibitmap.iter().map(|b| u64::from(b.count_ones())).sum::<u64>()
            - (BS * 8 - geo.inodes_per_group);
        let free_inodes = geo.inodes_per_group - used_inodes_g;
        free_blocks_total += free_blocks;
        free_inodes_total += free_inodes;
        write_at(file, out, bitmap, geo.block_bitmap(g) * BS)?;
        write_at(file, out, ibitmap, geo.inode_bitmap(g) * BS)?;
        let d = (g * DESC_SIZE) as usize;
        put32(&mut gdt, d, geo.block_bitmap(g) as u32);
        put32(&mut gdt, d + 4, geo.inode_bitmap(g) as u32);
        put32(&mut gdt, d + 8, geo.inode_table(g) as u32);
        put16(&mut gdt, d + 12, free_blocks as u16);
        put16(&mut gdt, d + 14, free_inodes as u16);
        put16(&mut gdt, d + 16, dirs.get(gi).copied().unwrap_or(0) as u16);
    }
    let mut sb = vec![0u8; 1024];
    put32(&mut sb, 0, geo.inodes_count() as u32);
    put32(&mut sb, 4, geo.blocks as u32);
    put32(&mut sb, 12, free_blocks_total as u32);
    put32(&mut sb, 16, free_inodes_total as u32);
    put32(&mut sb, 24, 2);
    put32(&mut sb, 28, 2);
    put32(&mut sb, 32, BLOCKS_PER_GROUP as u32);
    put32(&mut sb, 36, BLOCKS_PER_GROUP as u32);
    put32(&mut sb, 40, geo.inodes_per_group as u32);
    let now = opts.now.clamp(0, i64::from(u32::MAX)) as u32;
    put32(&mut sb, 48, now);
    put16(&mut sb, 54, 0xFFFF);
    put16(&mut sb, 56, MAGIC);
    put16(&mut sb, 58, 1);
    put16(&mut sb, 60, 1);
    put32(&mut sb, 64, now);
    put32(&mut sb, 76, 1);
    put32(&mut sb, 84, FIRST_INO);
    put16(&mut sb, 88, INODE_SIZE as u16);
    put32(&mut sb, 92, COMPAT_HAS_JOURNAL | COMPAT_EXT_ATTR | COMPAT_DIR_INDEX);
    put32(&mut sb, 96, INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_INLINE_DATA);
    put32(
        &mut sb,
        100,
        RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE | RO_COMPAT_DIR_NLINK | RO_COMPAT_EXTRA_ISIZE,
    );
    put_bytes(&mut sb, 104, &opts.uuid);
    put_bytes(&mut sb, 120, opts.label.as_bytes());
    put32(&mut sb, 224, JOURNAL_INO);
    put_bytes(&mut sb, 236, &opts.hash_seed);
    put_bytes(&mut sb, 252, &[HASH_HALF_MD4, JNL_BACKUP_BLOCKS]);
    put32(&mut sb, 256, DEFM_XATTR_USER | DEFM_ACL);
    put32(&mut sb, 264, now);
    // The journal inode's block map and size, for e2fsck to restore it.
    put_bytes(&mut sb, 268, &jblock);
    put32(&mut sb, 268 + 60, (journal.size >> 32) as u32);
    put32(&mut sb, 268 + 64, journal.size as u32);
    put16(&mut sb, 348, EXTRA_ISIZE);
    put16(&mut sb, 350, EXTRA_ISIZE);
    put32(&mut sb, 352, FLAGS_SIGNED_HASH);
    for g in (0..geo.groups).filter(|&g| has_super(g)) {
        put16(&mut sb, 90, g as u16);
        let start = geo.group_start(g) * BS;
        // The primary superblock sits 1024 bytes into block 0; backups at
        // the start of their group's first block.
        let at = if g == 0 { 1024 } else { start };
        write_at(file, out, &sb, at)?;
        write_at(file, out, &gdt, start + BS)?;
    }
    Ok(data_bytes)
}

/// Writes `data` over `runs`, in order.
fn write_runs(
    file: &File,
    out: &Path,
    runs: &[(u64, u64)],
    data: &[u8],
) -> Result<(), Ext4WriteError> {
    let mut rest = data;
    for &(start, len) in runs {
        let n = rest.len().min((len * BS) as usize);
        let (now, later) = rest.split_at(n);
        write_at(file, out, now, start * BS)?;
        rest = later;
    }
    if rest.is_empty() { Ok(()) } else { Err(internal("data longer than its blocks")) }
}

/// Copies a content object over an inode's runs, checking its size.
fn copy_object(
    file: &File,
    out: &Path,
    ino: &Ino<'_>,
    hash: &Hash,
    open: &mut dyn FnMut(&Hash) -> std::io::Result<File>,
) -> Result<(), Ext4WriteError> {
    let mut src = open(hash).map_err(io_err(format!(
        "opening object {} for {:?}",
        hash.to_hex(),
        ino.path
    )))?;
    let read_err = io_err(format!("reading object {} for {:?}", hash.to_hex(), ino.path));
    let mut got = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for &(start, len) in &ino.runs {
        let mut at = start * BS;
        let mut left = (len * BS).min(ino.size - got);
        while left > 0 {
            let want = buf.len().min(left as usize);
            let chunk = buf.get_mut(..want).ok_or_else(|| internal("buffer"))?;
            let n = src.read(chunk).map_err(|e| Ext4WriteError::Io {
                what: format!("reading object {} for {:?}", hash.to_hex(), ino.path),
                source: e,
            })?;
            if n == 0 {
                return Err(Ext4WriteError::ContentMismatch {
                    path: ino.path.to_string(),
                    expected: ino.size,
                    got,
                });
            }
            write_at(file, out, buf.get(..n).ok_or_else(|| internal("buffer"))?, at)?;
            at += n as u64;
            got += n as u64;
            left -= n as u64;
        }
    }
    let extra = std::io::copy(&mut src, &mut std::io::sink()).map_err(read_err)?;
    if got != ino.size || extra > 0 {
        return Err(Ext4WriteError::ContentMismatch {
            path: ino.path.to_string(),
            expected: ino.size,
            got: got + extra,
        });
    }
    Ok(())
}
