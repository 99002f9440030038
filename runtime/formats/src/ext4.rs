//! A read-only ext2/ext3/ext4 image reader: lists every inode reachable from
//! the root and streams regular files' content straight from the image file,
//! without mounting it and without e2fsprogs.
//!
//! Every number read from the image is untrusted. Offsets are range-checked
//! against the filesystem, loops are bounded by what the image can really
//! hold (a directory tree never spans more blocks than the filesystem has,
//! an extent tree never visits a block twice), so a corrupt or hostile image
//! yields [`Ext4Error::Corrupt`] rather than a panic, a hang or an
//! allocation out of proportion to the image.
//!
//! Checksums (`metadata_csum`, `gdt_csum`) are not verified: the reader
//! trusts structure checks instead, which keeps images with stale checksums
//! readable and costs nothing in safety since every field is checked anyway.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use provd_domain::image::{EntryKind, MAX_DEPTH, MAX_LINK_TARGET_BYTES, MAX_PATH_BYTES};

use crate::reader::FsEntry;

/// Why an image could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    /// reading the image or writing a file's content failed
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// the file holds no ext2/3/4 filesystem
    #[error("not an ext4 image: {0}")]
    NotExt4(String),
    /// a feature this reader refuses rather than misreads
    #[error("unsupported ext4 image: {0}")]
    Unsupported(String),
    /// the image contradicts itself or points outside itself
    #[error("corrupt ext4 image: {0}")]
    Corrupt(String),
}

impl Ext4Error {
    /// Prefixes the message with the path the failure was met at.
    fn at(self, path: &str) -> Ext4Error {
        let path = shown(path);
        match self {
            Ext4Error::NotExt4(m) => Ext4Error::NotExt4(format!("{path}: {m}")),
            Ext4Error::Unsupported(m) => Ext4Error::Unsupported(format!("{path}: {m}")),
            Ext4Error::Corrupt(m) => Ext4Error::Corrupt(format!("{path}: {m}")),
            io @ Ext4Error::Io { .. } => io,
        }
    }
}

fn corrupt(message: String) -> Ext4Error {
    Ext4Error::Corrupt(message)
}

fn shown(path: &str) -> &str {
    if path.is_empty() { "/" } else { path }
}

const SUPERBLOCK_OFFSET: u64 = 1024;
const SUPERBLOCK_SIZE: usize = 1024;
const MAGIC: u16 = 0xEF53;
const ROOT_INO: u64 = 2;
/// The part of an inode every revision has; nothing beyond it is needed.
const INODE_BASE_SIZE: usize = 128;
/// `i_block`: 15 block pointers, or an extent tree root, or a fast symlink.
const I_BLOCK_SIZE: usize = 60;
/// The kernel's `EXT4_MAX_EXTENT_DEPTH`.
const MAX_EXTENT_DEPTH: u16 = 5;
const EXTENT_MAGIC: u16 = 0xF30A;
/// How much of a file is read from the image per write to the output.
const CHUNK: u64 = 1 << 20;
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

const COMPAT_SPARSE_SUPER2: u32 = 0x200;

const INCOMPAT_COMPRESSION: u32 = 0x1;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_MMP: u32 = 0x100;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_EA_INODE: u32 = 0x400;
const INCOMPAT_DIRDATA: u32 = 0x1000;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_LARGEDIR: u32 = 0x4000;
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
const INCOMPAT_ENCRYPT: u32 = 0x10000;
const INCOMPAT_CASEFOLD: u32 = 0x20000;
/// Features that change nothing this reader looks at, or that it handles
/// inode by inode (inline data is read, encryption refused).
const INCOMPAT_UNDERSTOOD: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD;

const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const RO_COMPAT_BIGALLOC: u32 = 0x200;

const FL_ENCRYPT: u32 = 0x800;
const FL_HUGE_FILE: u32 = 0x40000;
const FL_EXTENTS: u32 = 0x80000;
const FL_EA_INODE: u32 = 0x200000;
const FL_INLINE_DATA: u32 = 0x1000_0000;

/// In-inode extended attributes: their magic, and `system.` as an index
/// (inline data continues in `system.data`).
const XATTR_MAGIC: u32 = 0xEA02_0000;
const XATTR_INDEX_SYSTEM: u8 = 7;

const S_IFMT: u16 = 0xF000;
const S_IFIFO: u16 = 0x1000;
const S_IFCHR: u16 = 0x2000;
const S_IFDIR: u16 = 0x4000;
const S_IFBLK: u16 = 0x6000;
const S_IFREG: u16 = 0x8000;
const S_IFLNK: u16 = 0xA000;
const S_IFSOCK: u16 = 0xC000;

const CREATOR_OS_HURD: u32 = 1;

// Short buffers read as zero instead of panicking; every caller checks the
// length of what it parses before relying on the values.
fn le16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = off.checked_add(2).and_then(|end| b.get(off..end)) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = off.checked_add(4).and_then(|end| b.get(off..end)) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn usize_of(v: u64) -> Result<usize, Ext4Error> {
    usize::try_from(v).map_err(|_| corrupt(format!("{v} does not fit in memory")))
}

fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<(), Ext4Error> {
    let len = buf.len();
    file.read_exact_at(buf, offset).map_err(|source| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            corrupt(format!("{len} bytes at byte {offset} lie past the end of the image"))
        } else {
            Ext4Error::Io { what: format!("reading {} at byte {offset}", path.display()), source }
        }
    })
}

/// What the reader needs of the superblock, validated.
#[derive(Debug, Clone)]
struct Superblock {
    block_size: u64,
    blocks_count: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    group_count: u64,
    inodes_count: u64,
    inodes_per_group: u64,
    inode_size: u64,
    desc_size: u64,
    cluster_size: u64,
    compat: u32,
    incompat: u32,
    ro_compat: u32,
    first_meta_bg: u64,
    backup_bgs: [u64; 2],
}

impl Superblock {
    fn parse(raw: &[u8], image_len: u64) -> Result<Superblock, Ext4Error> {
        if raw.len() < SUPERBLOCK_SIZE {
            return Err(Ext4Error::NotExt4("too short for a superblock".into()));
        }
        let magic = le16(raw, 0x38);
        if magic != MAGIC {
            return Err(Ext4Error::NotExt4(format!(
                "no superblock magic at byte 1080 (found 0x{magic:04x})"
            )));
        }
        let log_block = le32(raw, 0x18);
        if log_block > 6 {
            return Err(corrupt(format!(
                "superblock: block size 2^{} is impossible",
                log_block + 10
            )));
        }
        let block_size = 1024u64 << log_block;
        let compat = le32(raw, 0x5C);
        let incompat = le32(raw, 0x60);
        let ro_compat = le32(raw, 0x64);

        if incompat & INCOMPAT_RECOVER != 0 {
            return Err(Ext4Error::Unsupported(
                "the journal holds transactions not yet replayed (run e2fsck on the image first)"
                    .into(),
            ));
        }
        if incompat & INCOMPAT_JOURNAL_DEV != 0 {
            return Err(Ext4Error::Unsupported(
                "this is an external journal device, not a filesystem".into(),
            ));
        }
        if incompat & INCOMPAT_COMPRESSION != 0 {
            return Err(Ext4Error::Unsupported("ext2 compression".into()));
        }
        if incompat & INCOMPAT_DIRDATA != 0 {
            return Err(Ext4Error::Unsupported("directory entries with data (dirdata)".into()));
        }
        let unknown = incompat & !INCOMPAT_UNDERSTOOD;
        if unknown != 0 {
            return Err(Ext4Error::Unsupported(format!("incompatible features 0x{unknown:x}")));
        }
        if le32(raw, 0x48) == CREATOR_OS_HURD {
            // The Hurd lays out the owner's high bits elsewhere in the inode.
            return Err(Ext4Error::Unsupported("filesystems created by the hurd".into()));
        }

        let is_64bit = incompat & INCOMPAT_64BIT != 0;
        let blocks_count = u64::from(le32(raw, 0x04))
            | if is_64bit { u64::from(le32(raw, 0x150)) << 32 } else { 0 };
        let first_data_block = u64::from(le32(raw, 0x14));
        if first_data_block >= blocks_count {
            return Err(corrupt(format!(
                "superblock: first data block {first_data_block} is not below the block count \
                 {blocks_count}"
            )));
        }
        let fs_bytes = blocks_count
            .checked_mul(block_size)
            .ok_or_else(|| corrupt(format!("superblock: {blocks_count} blocks overflow")))?;
        if fs_bytes > image_len {
            return Err(corrupt(format!(
                "the superblock declares {fs_bytes} bytes but the image has {image_len} \
                 (truncated?)"
            )));
        }

        let cluster_size = if ro_compat & RO_COMPAT_BIGALLOC != 0 {
            let log_cluster = le32(raw, 0x1C);
            if log_cluster > 29 || (1024u64 << log_cluster) < block_size {
                return Err(corrupt(format!("superblock: cluster size 2^{log_cluster} KiB")));
            }
            1024u64 << log_cluster
        } else {
            block_size
        };
        let blocks_per_group = u64::from(le32(raw, 0x20));
        let max_per_group = 8 * cluster_size;
        if !(8..=max_per_group).contains(&blocks_per_group) {
            return Err(corrupt(format!("superblock: {blocks_per_group} blocks per group")));
        }
        let group_count = (blocks_count - first_data_block).div_ceil(blocks_per_group);

        let inodes_per_group = u64::from(le32(raw, 0x28));
        if !(1..=8 * block_size).contains(&inodes_per_group) {
            return Err(corrupt(format!("superblock: {inodes_per_group} inodes per group")));
        }
        let inodes_count = u64::from(le32(raw, 0x00));
        if inodes_count < ROOT_INO || inodes_count > inodes_per_group.saturating_mul(group_count) {
            return Err(corrupt(format!(
                "superblock: {inodes_count} inodes do not fit {group_count} groups of \
                 {inodes_per_group}"
            )));
        }

        let rev_level = le32(raw, 0x4C);
        let inode_size = if rev_level == 0 { 128 } else { u64::from(le16(raw, 0x58)) };
        if inode_size < INODE_BASE_SIZE as u64
            || inode_size > block_size
            || !inode_size.is_power_of_two()
        {
            return Err(corrupt(format!("superblock: inode size {inode_size}")));
        }

        let desc_size = if is_64bit { u64::from(le16(raw, 0xFE)) } else { 32 };
        if desc_size < 32
            || (is_64bit && desc_size < 64)
            || desc_size > block_size
            || !desc_size.is_power_of_two()
        {
            return Err(corrupt(format!("superblock: group descriptor size {desc_size}")));
        }

        Ok(Superblock {
            block_size,
            blocks_count,
            first_data_block,
            blocks_per_group,
            group_count,
            inodes_count,
            inodes_per_group,
            inode_size,
            desc_size,
            cluster_size,
            compat,
            incompat,
            ro_compat,
            first_meta_bg: u64::from(le32(raw, 0x104)),
            backup_bgs: [u64::from(le32(raw, 0x24C)), u64::from(le32(raw, 0x250))],
        })
    }

    /// Whether `group` starts with a superblock copy, which shifts meta_bg
    /// descriptor blocks by one.
    fn group_has_super(&self, group: u64) -> bool {
        if group == 0 {
            return true;
        }
        if self.compat & COMPAT_SPARSE_SUPER2 != 0 {
            return group == self.backup_bgs[0] || group == self.backup_bgs[1];
        }
        if group == 1 || self.ro_compat & RO_COMPAT_SPARSE_SUPER == 0 {
            return true;
        }
        if group.is_multiple_of(2) {
            return false;
        }
        [3u64, 5, 7].into_iter().any(|base| {
            let mut p = base;
            while p < group {
                p = match p.checked_mul(base) {
                    Some(next) => next,
                    None => return false,
                };
            }
            p == group
        })
    }

    /// The block holding descriptor block number `index` (of the table of
    /// all group descriptors), as `ext2fs_descriptor_block_loc2` places it.
    fn descriptor_block(&self, index: u64) -> Result<u64, Ext4Error> {
        let base = if self.first_data_block == 0 && self.block_size == 1024 {
            // bigalloc with 1 KiB blocks: the superblock still takes block 1
            1
        } else {
            self.first_data_block
        };
        if self.incompat & INCOMPAT_META_BG == 0 || index < self.first_meta_bg {
            return base
                .checked_add(1)
                .and_then(|b| b.checked_add(index))
                .ok_or_else(|| corrupt(format!("descriptor block {index} overflows")));
        }
        let per_block = self.block_size / self.desc_size;
        let group = index
            .checked_mul(per_block)
            .ok_or_else(|| corrupt(format!("descriptor block {index} overflows")))?;
        let first = group
            .checked_mul(self.blocks_per_group)
            .and_then(|b| b.checked_add(self.first_data_block))
            .ok_or_else(|| corrupt(format!("meta_bg group {group} overflows")))?;
        let adjust = u64::from(group == 0 && self.first_data_block == 0 && self.block_size == 1024);
        Ok(first + u64::from(self.group_has_super(group)) + adjust)
    }
}

/// What the reader needs of an inode.
#[derive(Debug, Clone)]
struct Inode {
    ino: u64,
    mode: u16,
    uid: u64,
    gid: u64,
    /// As the kernel's `ext4_isize` reads it: 64 bits for regular files
    /// (and for directories with `largedir`), 32 bits for the others.
    size: u64,
    links: u16,
    flags: u32,
    /// 512-byte sectors (or blocks with `HUGE_FILE_FL`) held by the inode.
    blocks: u64,
    file_acl: u64,
    block: [u8; I_BLOCK_SIZE],
    /// With `FL_INLINE_DATA`: the value of the inode's `system.data`
    /// attribute, where inline data continues past `i_block`.
    inline_more: Vec<u8>,
}

/// A stretch of a file's logical blocks: `len` blocks stored from physical
/// block `phys`, or read as zeros when `phys` is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    len: u64,
    phys: Option<u64>,
}

/// Turns a block map or extent tree into runs covering exactly the logical
/// blocks `0..nblocks`, in order, merged where contiguous.
struct Walk<'a> {
    ino: u64,
    nblocks: u64,
    /// The next logical block to hand out.
    pos: u64,
    mapped: u64,
    fs_blocks: u64,
    pending: Option<Run>,
    /// Extent tree blocks already read: a legitimate tree never shares one.
    visited: HashSet<u64>,
    sink: &'a mut dyn FnMut(Run) -> Result<(), Ext4Error>,
}

impl Walk<'_> {
    fn done(&self) -> bool {
        self.pos >= self.nblocks
    }

    fn push(&mut self, len: u64, phys: Option<u64>) -> Result<(), Ext4Error> {
        let len = len.min(self.nblocks.saturating_sub(self.pos));
        if len == 0 {
            return Ok(());
        }
        if phys.is_some() {
            // Without this, blocks shared between many extents or indirect
            // pointers would multiply the image's data without bound.
            self.mapped = self.mapped.saturating_add(len);
            if self.mapped > self.fs_blocks {
                return Err(corrupt(format!(
                    "inode {} maps more blocks than the filesystem has",
                    self.ino
                )));
            }
        }
        self.pos += len;
        let run = Run { len, phys };
        match self.pending.as_mut() {
            Some(p) if contiguous(p, &run) => p.len += len,
            Some(p) => {
                let done = *p;
                self.pending = Some(run);
                (self.sink)(done)?;
            }
            None => self.pending = Some(run),
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), Ext4Error> {
        let rest = self.nblocks.saturating_sub(self.pos);
        self.push(rest, None)?;
        if let Some(p) = self.pending.take() {
            (self.sink)(p)?;
        }
        Ok(())
    }
}

fn contiguous(a: &Run, b: &Run) -> bool {
    match (a.phys, b.phys) {
        (None, None) => true,
        (Some(x), Some(y)) => x.checked_add(a.len) == Some(y),
        _ => false,
    }
}

/// A read-only view of an ext2, ext3 or ext4 filesystem image.
pub struct Ext4Image {
    file: File,
    path: PathBuf,
    sb: Superblock,
    /// First block of each group's inode table.
    inode_tables: Vec<u64>,
}

impl fmt::Debug for Ext4Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ext4Image")
            .field("path", &self.path)
            .field("block_size", &self.sb.block_size)
            .field("blocks_count", &self.sb.blocks_count)
            .field("group_count", &self.sb.group_count)
            .field("inodes_count", &self.sb.inodes_count)
            .finish_non_exhaustive()
    }
}

impl Ext4Image {
    /// Opens an image and checks its superblock and group descriptors.
    pub fn open(path: &Path) -> Result<Ext4Image, Ext4Error> {
        let io = |what: &str, source| Ext4Error::Io {
            what: format!("{what} {}", path.display()),
            source,
        };
        let file = File::open(path).map_err(|e| io("opening", e))?;
        let image_len = file.metadata().map_err(|e| io("reading the metadata of", e))?.len();
        if image_len < SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE as u64 {
            return Err(Ext4Error::NotExt4(format!(
                "{} is {image_len} bytes, too short for a superblock",
                path.display()
            )));
        }
        let mut raw = [0u8; SUPERBLOCK_SIZE];
        read_exact_at(&file, path, &mut raw, SUPERBLOCK_OFFSET)?;
        let sb = Superblock::parse(&raw, image_len)?;

        let table_blocks = (sb.inodes_per_group * sb.inode_size).div_ceil(sb.block_size);
        let per_block = sb.block_size / sb.desc_size;
        let mut inode_tables = Vec::with_capacity(usize_of(sb.group_count)?);
        let mut desc_block = vec![0u8; usize_of(sb.block_size)?];
        let mut loaded = None;
        for group in 0..sb.group_count {
            let index = group / per_block;
            let block = sb.descriptor_block(index)?;
            if block >= sb.blocks_count {
                return Err(corrupt(format!(
                    "descriptor of group {group} would be at block {block}, outside the \
                     filesystem"
                )));
            }
            if loaded != Some(block) {
                read_exact_at(&file, path, &mut desc_block, block * sb.block_size)?;
                loaded = Some(block);
            }
            let off = usize_of((group % per_block) * sb.desc_size)?;
            let desc = desc_block.get(off..).unwrap_or_default();
            let mut table = u64::from(le32(desc, 0x08));
            if sb.desc_size >= 64 {
                table |= u64::from(le32(desc, 0x28)) << 32;
            }
            if table == 0 || table.checked_add(table_blocks).is_none_or(|end| end > sb.blocks_count)
            {
                return Err(corrupt(format!(
                    "group {group}: inode table at block {table} lies outside the filesystem"
                )));
            }
            inode_tables.push(table);
        }
        Ok(Ext4Image { file, path: path.to_path_buf(), sb, inode_tables })
    }

    /// Every entry reachable from the root, depth-first, each directory
    /// before its content; not the root itself, nor "." and "..". The
    /// top-level "lost+found" directory and its content are left out when
    /// `skip_lost_found` is set.
    pub fn entries(&self, skip_lost_found: bool) -> Result<Vec<FsEntry>, Ext4Error> {
        struct Frame {
            path: String,
            depth: usize,
            children: std::vec::IntoIter<(String, u64)>,
        }
        let root = self.read_inode(ROOT_INO).map_err(|e| e.at(""))?;
        if root.mode & S_IFMT != S_IFDIR {
            return Err(corrupt(format!(
                "the root inode is not a directory (mode 0o{:o})",
                root.mode
            )));
        }
        let mut visited = HashSet::from([ROOT_INO]);
        // Directory blocks left to read: each is a distinct block of a sane
        // filesystem, so this bounds the listing by the image's size.
        let mut budget = self.sb.blocks_count;
        let children = self.read_dir(&root, &mut budget).map_err(|e| e.at(""))?;
        let mut stack =
            vec![Frame { path: String::new(), depth: 0, children: children.into_iter() }];
        let mut out = Vec::new();
        while let Some(frame) = stack.last_mut() {
            let Some((name, ino)) = frame.children.next() else {
                stack.pop();
                continue;
            };
            let top = frame.depth == 0;
            let depth = frame.depth + 1;
            let path =
                if frame.path.is_empty() { name.clone() } else { format!("{}/{name}", frame.path) };
            if depth > MAX_DEPTH {
                return Err(corrupt(format!("{path}: nested deeper than {MAX_DEPTH} directories")));
            }
            if path.len() > MAX_PATH_BYTES {
                return Err(Ext4Error::Unsupported(format!(
                    "{path}: path longer than {MAX_PATH_BYTES} bytes"
                )));
            }
            let inode = self.read_inode(ino).map_err(|e| e.at(&path))?;
            let entry = self.entry(path, &inode)?;
            if entry.kind != EntryKind::Dir {
                out.push(entry);
                continue;
            }
            if skip_lost_found && top && name == "lost+found" {
                continue;
            }
            if !visited.insert(ino) {
                return Err(corrupt(format!(
                    "{}: directory inode {ino} is reachable twice (a directory cycle or hard link)",
                    entry.path
                )));
            }
            let children = self.read_dir(&inode, &mut budget).map_err(|e| e.at(&entry.path))?;
            stack.push(Frame { path: entry.path.clone(), depth, children: children.into_iter() });
            out.push(entry);
        }
        Ok(out)
    }

    /// The root directory's metadata, with path "".
    pub fn root(&self) -> Result<FsEntry, Ext4Error> {
        let root = self.read_inode(ROOT_INO).map_err(|e| e.at(""))?;
        let entry = self.entry(String::new(), &root)?;
        if entry.kind != EntryKind::Dir {
            return Err(corrupt(format!(
                "the root inode is not a directory (mode 0o{:o})",
                root.mode
            )));
        }
        Ok(entry)
    }

    /// Streams the content of regular file `ino` into `out`; holes and
    /// uninitialised extents read as zeros. Returns the bytes written.
    pub fn read_file(&self, ino: u64, out: &mut dyn Write) -> Result<u64, Ext4Error> {
        let inode = self.read_inode(ino)?;
        if inode.mode & S_IFMT != S_IFREG {
            return Err(Ext4Error::Unsupported(format!(
                "inode {ino} is not a regular file (mode 0o{:o})",
                inode.mode
            )));
        }
        if inode.flags & FL_ENCRYPT != 0 {
            return Err(Ext4Error::Unsupported(format!("inode {ino}: encrypted content")));
        }
        if inode.flags & FL_INLINE_DATA != 0 {
            let data = inline_data(&inode)?;
            out.write_all(&data).map_err(|source| Ext4Error::Io {
                what: format!("writing the content of inode {ino}"),
                source,
            })?;
            return Ok(data.len() as u64);
        }
        let size = inode.size;
        let bs = self.sb.block_size;
        let nblocks = self.block_count(&inode)?;
        let mut remaining = size;
        let mut buf = Vec::new();
        let write_err =
            |source| Ext4Error::Io { what: format!("writing the content of inode {ino}"), source };
        self.walk_blocks(&inode, nblocks, &mut |run| {
            let mut bytes = run.len.saturating_mul(bs).min(remaining);
            remaining -= bytes;
            match run.phys {
                None => {
                    while bytes > 0 {
                        let n = bytes.min(ZEROS.len() as u64);
                        out.write_all(ZEROS.get(..usize_of(n)?).unwrap_or_default())
                            .map_err(write_err)?;
                        bytes -= n;
                    }
                }
                Some(phys) => {
                    let mut offset = self.block_offset(phys)?;
                    while bytes > 0 {
                        let n = bytes.min(CHUNK);
                        buf.resize(usize_of(n)?, 0);
                        self.read_at(&mut buf, offset)?;
                        out.write_all(&buf).map_err(write_err)?;
                        bytes -= n;
                        offset += n;
                    }
                }
            }
            Ok(())
        })?;
        Ok(size - remaining)
    }

    /// The depth of an inode's extent tree, `None` for a block-mapped one.
    #[cfg(test)]
    pub(crate) fn extent_depth(&self, ino: u64) -> Result<Option<u16>, Ext4Error> {
        let inode = self.read_inode(ino)?;
        Ok((inode.flags & FL_EXTENTS != 0).then(|| le16(&inode.block, 6)))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Ext4Error> {
        read_exact_at(&self.file, &self.path, buf, offset)
    }

    fn block_offset(&self, block: u64) -> Result<u64, Ext4Error> {
        if block >= self.sb.blocks_count {
            return Err(corrupt(format!("block {block} lies outside the filesystem")));
        }
        Ok(block * self.sb.block_size)
    }

    fn read_block(&self, block: u64) -> Result<Vec<u8>, Ext4Error> {
        let mut buf = vec![0u8; usize_of(self.sb.block_size)?];
        self.read_at(&mut buf, self.block_offset(block)?)?;
        Ok(buf)
    }

    fn read_inode(&self, ino: u64) -> Result<Inode, Ext4Error> {
        if ino == 0 || ino > self.sb.inodes_count {
            return Err(corrupt(format!(
                "inode {ino} is out of range (the filesystem has {})",
                self.sb.inodes_count
            )));
        }
        let group = (ino - 1) / self.sb.inodes_per_group;
        let index = (ino - 1) % self.sb.inodes_per_group;
        let table = self
            .inode_tables
            .get(usize_of(group)?)
            .copied()
            .ok_or_else(|| corrupt(format!("inode {ino}: no group {group}")))?;
        let offset = self.block_offset(table)? + index * self.sb.inode_size;
        let mut raw = vec![0u8; usize_of(self.sb.inode_size)?];
        self.read_at(&mut raw, offset)?;

        let mode = le16(&raw, 0x00);
        let flags = le32(&raw, 0x20);
        let size_lo = u64::from(le32(&raw, 0x04));
        let size_hi = u64::from(le32(&raw, 0x6C));
        let kind = mode & S_IFMT;
        let size =
            if kind == S_IFREG || (kind == S_IFDIR && self.sb.incompat & INCOMPAT_LARGEDIR != 0) {
                size_lo | size_hi << 32
            } else {
                size_lo
            };
        let mut blocks = u64::from(le32(&raw, 0x1C));
        if self.sb.ro_compat & RO_COMPAT_HUGE_FILE != 0 {
            blocks |= u64::from(le16(&raw, 0x74)) << 32;
            if flags & FL_HUGE_FILE != 0 {
                blocks = blocks.saturating_mul(self.sb.block_size / 512);
            }
        }
        let mut block = [0u8; I_BLOCK_SIZE];
        block.copy_from_slice(raw.get(0x28..0x28 + I_BLOCK_SIZE).unwrap_or(&[0; I_BLOCK_SIZE]));
        let inline_more =
            if flags & FL_INLINE_DATA != 0 { inline_attribute(&raw, ino)? } else { Vec::new() };
        Ok(Inode {
            ino,
            mode,
            uid: u64::from(le16(&raw, 0x02)) | u64::from(le16(&raw, 0x78)) << 16,
            gid: u64::from(le16(&raw, 0x18)) | u64::from(le16(&raw, 0x7A)) << 16,
            size,
            links: le16(&raw, 0x1A),
            flags,
            blocks,
            file_acl: u64::from(le32(&raw, 0x68)) | u64::from(le16(&raw, 0x76)) << 32,
            block,
            inline_more,
        })
    }

    /// How many logical blocks hold the inode's `size` bytes.
    fn block_count(&self, inode: &Inode) -> Result<u64, Ext4Error> {
        let nblocks = inode.size.div_ceil(self.sb.block_size);
        // Logical block numbers are 32 bits wide in both block maps and
        // extents, so nothing larger can be real.
        if nblocks > 1 << 32 {
            return Err(corrupt(format!(
                "inode {}: size {} is beyond what ext4 can address",
                inode.ino, inode.size
            )));
        }
        Ok(nblocks)
    }

    fn entry(&self, path: String, inode: &Inode) -> Result<FsEntry, Ext4Error> {
        let ino = inode.ino;
        let kind = match inode.mode & S_IFMT {
            S_IFREG => EntryKind::File,
            S_IFDIR => EntryKind::Dir,
            S_IFLNK => EntryKind::Symlink,
            S_IFCHR => EntryKind::CharDevice,
            S_IFBLK => EntryKind::BlockDevice,
            S_IFIFO => EntryKind::Fifo,
            S_IFSOCK => {
                return Err(Ext4Error::Unsupported(format!(
                    "{}: inode {ino} is a socket",
                    shown(&path)
                )));
            }
            other => {
                return Err(corrupt(format!(
                    "{}: inode {ino} has unknown file type 0o{other:o}",
                    shown(&path)
                )));
            }
        };
        if kind == EntryKind::Dir && inode.flags & FL_ENCRYPT != 0 {
            return Err(Ext4Error::Unsupported(format!(
                "{}: directory inode {ino} is encrypted",
                shown(&path)
            )));
        }
        let link_target = match kind {
            EntryKind::Symlink => Some(self.link_target(inode).map_err(|e| e.at(&path))?),
            _ => None,
        };
        let device = match kind {
            EntryKind::CharDevice | EntryKind::BlockDevice => Some(device_number(&inode.block)),
            _ => None,
        };
        let size = match (&kind, &link_target) {
            (EntryKind::File, _) => inode.size,
            (_, Some(target)) => target.len() as u64,
            _ => 0,
        };
        Ok(FsEntry {
            path,
            kind,
            mode: u32::from(inode.mode) & 0o7777,
            uid: inode.uid,
            gid: inode.gid,
            size,
            ino,
            nlink: u32::from(inode.links),
            link_target,
            device,
        })
    }

    fn link_target(&self, inode: &Inode) -> Result<String, Ext4Error> {
        let ino = inode.ino;
        if inode.flags & FL_ENCRYPT != 0 {
            return Err(Ext4Error::Unsupported(format!("symlink inode {ino} is encrypted")));
        }
        let len = inode.size;
        if inode.flags & FL_INLINE_DATA != 0 {
            let bytes = inline_data(inode)?;
            if bytes.contains(&0) {
                return Err(corrupt(format!("symlink inode {ino}: target contains NUL")));
            }
            return String::from_utf8(bytes).map_err(|_| {
                Ext4Error::Unsupported(format!("symlink inode {ino}: target is not valid UTF-8"))
            });
        }
        if len > MAX_LINK_TARGET_BYTES as u64 || len >= self.sb.block_size {
            return Err(corrupt(format!("symlink inode {ino}: target of {len} bytes")));
        }
        let len = usize_of(len)?;
        let bytes = if self.is_fast_symlink(inode) {
            inode
                .block
                .get(..len)
                .ok_or_else(|| corrupt(format!("symlink inode {ino}: fast target of {len} bytes")))?
                .to_vec()
        } else {
            let mut bytes = Vec::with_capacity(len);
            self.walk_blocks(inode, 1, &mut |run| {
                let block = match run.phys {
                    Some(phys) => self.read_block(phys)?,
                    None => vec![0u8; len],
                };
                bytes.extend_from_slice(block.get(..len).unwrap_or_default());
                Ok(())
            })?;
            bytes
        };
        if bytes.contains(&0) {
            return Err(corrupt(format!("symlink inode {ino}: target contains NUL")));
        }
        String::from_utf8(bytes).map_err(|_| {
            Ext4Error::Unsupported(format!("symlink inode {ino}: target is not valid UTF-8"))
        })
    }

    /// The kernel's `ext4_inode_is_fast_symlink`: the target lives in
    /// `i_block` when the inode owns no block but its extended attributes'.
    fn is_fast_symlink(&self, inode: &Inode) -> bool {
        if inode.flags & FL_EA_INODE != 0 {
            return inode.size > 0 && inode.size < I_BLOCK_SIZE as u64;
        }
        let xattr_sectors = if inode.file_acl != 0 { self.sb.cluster_size / 512 } else { 0 };
        inode.blocks == xattr_sectors
    }

    /// Names and inode numbers in a directory, "." and ".." left out.
    fn read_dir(&self, dir: &Inode, budget: &mut u64) -> Result<Vec<(String, u64)>, Ext4Error> {
        let dino = dir.ino;
        let filetype = self.sb.incompat & INCOMPAT_FILETYPE != 0;
        if dir.flags & FL_INLINE_DATA != 0 {
            // The parent's number, then entries to the end of `i_block`,
            // then more in the `system.data` value ("." and ".." implied).
            let mut children = Vec::new();
            let first = dir.block.get(4..).unwrap_or_default();
            parse_dir_block(first, first.len(), filetype, dino, &mut children)?;
            if !dir.inline_more.is_empty() {
                let more = &dir.inline_more;
                parse_dir_block(more, more.len(), filetype, dino, &mut children)?;
            }
            return Ok(children);
        }
        let nblocks = self.block_count(dir)?;
        *budget = budget.checked_sub(nblocks).ok_or_else(|| {
            corrupt(format!("directory inode {dino}: directories span more blocks than the image"))
        })?;
        let bs = usize_of(self.sb.block_size)?;
        let mut children = Vec::new();
        self.walk_blocks(dir, nblocks, &mut |run| {
            // Holes in directories are skipped as empty, as e2fsck and older
            // kernels treat them.
            let Some(phys) = run.phys else { return Ok(()) };
            for i in 0..run.len {
                let block = self.read_block(phys + i)?;
                parse_dir_block(&block, bs, filetype, dino, &mut children)?;
            }
            Ok(())
        })?;
        Ok(children)
    }

    fn walk_blocks(
        &self,
        inode: &Inode,
        nblocks: u64,
        sink: &mut dyn FnMut(Run) -> Result<(), Ext4Error>,
    ) -> Result<(), Ext4Error> {
        let mut walk = Walk {
            ino: inode.ino,
            nblocks,
            pos: 0,
            mapped: 0,
            fs_blocks: self.sb.blocks_count,
            pending: None,
            visited: HashSet::new(),
            sink,
        };
        if inode.flags & FL_EXTENTS != 0 {
            self.walk_extent_node(&inode.block, None, &mut walk)?;
        } else {
            self.walk_block_map(&inode.block, &mut walk)?;
        }
        walk.finish()
    }

    fn walk_extent_node(
        &self,
        node: &[u8],
        expected_depth: Option<u16>,
        walk: &mut Walk<'_>,
    ) -> Result<(), Ext4Error> {
        let ino = walk.ino;
        let magic = le16(node, 0);
        let entries = usize::from(le16(node, 2));
        let max = usize::from(le16(node, 4));
        let depth = le16(node, 6);
        if magic != EXTENT_MAGIC {
            return Err(corrupt(format!("inode {ino}: bad extent header magic 0x{magic:04x}")));
        }
        if entries > max || (max + 1) * 12 > node.len() {
            return Err(corrupt(format!(
                "inode {ino}: extent node claims {entries} of {max} entries in {} bytes",
                node.len()
            )));
        }
        if depth > MAX_EXTENT_DEPTH || expected_depth.is_some_and(|d| d != depth) {
            return Err(corrupt(format!("inode {ino}: extent node at unexpected depth {depth}")));
        }
        for i in 0..entries {
            if walk.done() {
                break;
            }
            let at = (i + 1) * 12;
            let e = node
                .get(at..at + 12)
                .ok_or_else(|| corrupt(format!("inode {ino}: extent entry {i} out of its node")))?;
            let first = u64::from(le32(e, 0));
            if depth == 0 {
                let raw_len = le16(e, 4);
                // Above 32768 the length is biased and the extent unwritten.
                let (len, written) =
                    if raw_len > 32768 { (raw_len - 32768, false) } else { (raw_len, true) };
                let len = u64::from(len);
                let phys = u64::from(le16(e, 6)) << 32 | u64::from(le32(e, 8));
                if len == 0 {
                    return Err(corrupt(format!("inode {ino}: empty extent at block {first}")));
                }
                if first < walk.pos {
                    return Err(corrupt(format!(
                        "inode {ino}: extent at logical block {first} overlaps or is out of order"
                    )));
                }
                if phys.checked_add(len).is_none_or(|end| end > self.sb.blocks_count) {
                    return Err(corrupt(format!(
                        "inode {ino}: extent at block {phys} (+{len}) lies outside the filesystem"
                    )));
                }
                walk.push(first - walk.pos, None)?;
                walk.push(len, written.then_some(phys))?;
            } else {
                if first >= walk.nblocks {
                    break;
                }
                let child = u64::from(le16(e, 8)) << 32 | u64::from(le32(e, 4));
                if !walk.visited.insert(child) {
                    return Err(corrupt(format!(
                        "inode {ino}: extent tree reaches block {child} twice"
                    )));
                }
                let block = self.read_block(child).map_err(|e| match e {
                    Ext4Error::Corrupt(m) => corrupt(format!("inode {ino}: extent node: {m}")),
                    other => other,
                })?;
                self.walk_extent_node(&block, Some(depth - 1), walk)?;
            }
        }
        Ok(())
    }

    fn walk_block_map(&self, iblock: &[u8], walk: &mut Walk<'_>) -> Result<(), Ext4Error> {
        // 12 direct pointers, then single, double and triple indirect ones.
        for slot in 0..15usize {
            if walk.done() {
                break;
            }
            let level = u32::try_from(slot.saturating_sub(11)).unwrap_or(0);
            self.map_pointer(le32(iblock, slot * 4), level, walk)?;
        }
        Ok(())
    }

    fn map_pointer(&self, ptr: u32, level: u32, walk: &mut Walk<'_>) -> Result<(), Ext4Error> {
        let per_block = self.sb.block_size / 4;
        let span = per_block.checked_pow(level).unwrap_or(u64::MAX);
        let ptr = u64::from(ptr);
        if ptr == 0 {
            return walk.push(span, None);
        }
        if ptr >= self.sb.blocks_count {
            return Err(corrupt(format!(
                "inode {}: block pointer {ptr} lies outside the filesystem",
                walk.ino
            )));
        }
        if level == 0 {
            return walk.push(1, Some(ptr));
        }
        let block = self.read_block(ptr)?;
        for j in 0..usize_of(per_block)? {
            if walk.done() {
                break;
            }
            self.map_pointer(le32(&block, j * 4), level - 1, walk)?;
        }
        Ok(())
    }
}

/// The value of the `system.data` attribute among an inode's in-inode
/// extended attributes (`raw` is the whole inode): where inline data
/// continues past `i_block`. Empty when the inode has none.
fn inline_attribute(raw: &[u8], ino: u64) -> Result<Vec<u8>, Ext4Error> {
    let bad = |what: &str| corrupt(format!("inode {ino}: in-inode attributes: {what}"));
    if raw.len() <= INODE_BASE_SIZE + 4 {
        return Ok(Vec::new());
    }
    let area = INODE_BASE_SIZE + usize::from(le16(raw, INODE_BASE_SIZE));
    if area + 4 > raw.len() || le32(raw, area) != XATTR_MAGIC {
        return Ok(Vec::new());
    }
    let first = area + 4;
    let mut at = first;
    while at + 4 <= raw.len() && le32(raw, at) != 0 {
        let head = raw.get(at..at + 16).ok_or_else(|| bad("an entry overruns the inode"))?;
        let (name_len, index) = match head {
            [len, index, ..] => (usize::from(*len), *index),
            _ => return Err(bad("an entry overruns the inode")),
        };
        let value_offs = usize::from(le16(head, 2));
        let value_inum = le32(head, 4);
        let value_size = usize_of(u64::from(le32(head, 8)))?;
        let name = raw.get(at + 16..at + 16 + name_len).ok_or_else(|| bad("a name overruns"))?;
        if index == XATTR_INDEX_SYSTEM && name == b"data" {
            if value_inum != 0 {
                return Err(Ext4Error::Unsupported(format!(
                    "inode {ino}: inline data in an attribute inode"
                )));
            }
            if value_size == 0 {
                return Ok(Vec::new());
            }
            return raw
                .get(first + value_offs..first + value_offs + value_size)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| bad("the system.data value overruns the inode"));
        }
        at += (16 + name_len).next_multiple_of(4);
    }
    Ok(Vec::new())
}

/// An inline inode's bytes: `i_block`, then the `system.data` value, cut
/// to its size.
fn inline_data(inode: &Inode) -> Result<Vec<u8>, Ext4Error> {
    let size = usize_of(inode.size)?;
    let mut data: Vec<u8> = inode.block.iter().chain(&inode.inline_more).copied().collect();
    if size > data.len() {
        return Err(corrupt(format!(
            "inode {}: {size} bytes of inline data, {} stored",
            inode.ino,
            data.len()
        )));
    }
    data.truncate(size);
    Ok(data)
}

/// The kernel's `ext4_rec_len_from_disk`: 64 KiB blocks need 17 bits.
fn rec_len(raw: u16, block_size: usize) -> usize {
    if block_size < 65536 {
        return usize::from(raw);
    }
    if raw == u16::MAX || raw == 0 {
        return block_size;
    }
    usize::from(raw & 0xFFFC) | (usize::from(raw & 3) << 16)
}

/// Appends the live entries of one directory block to `children`. Htree
/// index blocks need no special case: the root's index hides in the spare
/// room of "..", and interior index blocks look like one unused entry.
fn parse_dir_block(
    block: &[u8],
    block_size: usize,
    filetype: bool,
    dino: u64,
    children: &mut Vec<(String, u64)>,
) -> Result<(), Ext4Error> {
    let mut off = 0usize;
    while off < block_size {
        let head = off.checked_add(8).and_then(|end| block.get(off..end)).ok_or_else(|| {
            corrupt(format!("directory inode {dino}: entry at byte {off} overruns its block"))
        })?;
        let ino = u64::from(le32(head, 0));
        let len = rec_len(le16(head, 4), block_size);
        let name_len =
            if filetype { usize::from(le16(head, 6) & 0xFF) } else { usize::from(le16(head, 6)) };
        if len < 8 || !len.is_multiple_of(4) || off + len > block_size {
            return Err(corrupt(format!(
                "directory inode {dino}: entry at byte {off} has record length {len}"
            )));
        }
        if ino != 0 {
            if name_len == 0 || name_len + 8 > len {
                return Err(corrupt(format!(
                    "directory inode {dino}: entry at byte {off} has name length {name_len}"
                )));
            }
            let name = block.get(off + 8..off + 8 + name_len).ok_or_else(|| {
                corrupt(format!("directory inode {dino}: entry at byte {off} overruns its block"))
            })?;
            if name != b"." && name != b".." {
                if name.contains(&b'/') || name.contains(&0) {
                    return Err(corrupt(format!(
                        "directory inode {dino}: name {:?} contains '/' or NUL",
                        String::from_utf8_lossy(name)
                    )));
                }
                let name = std::str::from_utf8(name).map_err(|_| {
                    Ext4Error::Unsupported(format!(
                        "directory inode {dino}: the name of inode {ino} ({:?}) is not valid UTF-8",
                        String::from_utf8_lossy(name)
                    ))
                })?;
                children.push((name.to_owned(), ino));
            }
        }
        off += len;
    }
    Ok(())
}

/// Major and minor from `i_block`: the old 8+8 bit encoding in the first
/// word, else the kernel's `new_encode_dev` in the second.
fn device_number(block: &[u8]) -> (u32, u32) {
    let old = le32(block, 0);
    if old != 0 {
        return ((old >> 8) & 0xFF, old & 0xFF);
    }
    let new = le32(block, 4);
    ((new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

    use super::*;
    use std::collections::{BTreeMap, HashMap};
    use std::ffi::OsStr;
    use std::fs;
    use std::io::Read;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, chown, lchown, symlink};
    use std::process::Command;

    /// xorshift64*: deterministic content and corruption without a crate.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| (self.next() >> 32) as u8).collect()
        }
    }

    const LONG_TARGET: &str =
        "../a/long/symlink/target/that/does/not/fit/in/the/sixty/bytes/of/i_block/at/all";
    const UTF8_NAME: &str = "héllo wörld ✓ 日本語.txt";
    const MANY: usize = 5000;

    fn tool(name: &str) -> PathBuf {
        ["/usr/sbin", "/sbin"]
            .iter()
            .map(|dir| Path::new(dir).join(name))
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from(name))
    }

    fn write_at(path: &Path, parts: &[(u64, &[u8])], len: u64) {
        let f = File::create(path).unwrap();
        for (offset, data) in parts {
            f.write_all_at(data, *offset).unwrap();
        }
        f.set_len(len).unwrap();
    }

    fn mknod(path: &Path, file_type: rustix::fs::FileType, major: u32, minor: u32) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            file_type,
            rustix::fs::Mode::from_raw_mode(0o640),
            rustix::fs::makedev(major, minor),
        )
        .unwrap();
    }

    /// Every kind of inode and layout the reader must get right.
    fn build_tree(root: &Path) {
        let mut rng = Rng::new(7);
        fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(root.join("empty"), b"").unwrap();
        fs::write(root.join("one"), b"x").unwrap();
        fs::write(root.join("f4097"), rng.bytes(4097)).unwrap();
        fs::write(root.join("big"), rng.bytes(3 * 1024 * 1024 + 12345)).unwrap();
        let (a, b) = (rng.bytes(5000), rng.bytes(4096));
        write_at(&root.join("sparse"), &[(0, &a), (1024 * 1024 + 7, &b)], 3 * 1024 * 1024);
        // 400 separate extents: an index level on 4 KiB blocks, two on 1 KiB.
        let islands: Vec<Vec<u8>> = (0..400).map(|_| rng.bytes(4096)).collect();
        let parts: Vec<(u64, &[u8])> =
            islands.iter().enumerate().map(|(i, d)| (i as u64 * 12288, d.as_slice())).collect();
        write_at(&root.join("islands"), &parts, 400 * 12288);
        // Direct, single, double and (with 1 KiB blocks) triple indirect.
        let far: Vec<Vec<u8>> = (0..4).map(|_| rng.bytes(4096)).collect();
        let offsets = [0u64, 100 * 1024, 1024 * 1024, 70 * 1024 * 1024];
        let parts: Vec<(u64, &[u8])> =
            offsets.iter().zip(&far).map(|(o, d)| (*o, d.as_slice())).collect();
        write_at(&root.join("far"), &parts, 70 * 1024 * 1024 + 10000);

        for (name, mode) in [("setuid", 0o4755), ("setgid", 0o2755), ("plain", 0o640)] {
            fs::write(root.join(name), name).unwrap();
            fs::set_permissions(root.join(name), fs::Permissions::from_mode(mode)).unwrap();
        }
        fs::create_dir(root.join("sticky")).unwrap();
        fs::set_permissions(root.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::write(root.join("sticky/inside"), b"inside").unwrap();

        fs::write(root.join("owned_high"), b"high").unwrap();
        chown(root.join("owned_high"), Some(70000), Some(70001)).unwrap();
        fs::write(root.join("owned_1000"), b"user").unwrap();
        chown(root.join("owned_1000"), Some(1000), Some(1000)).unwrap();
        fs::create_dir(root.join("owned_dir")).unwrap();
        chown(root.join("owned_dir"), Some(131072), Some(65536)).unwrap();

        fs::create_dir(root.join("sub")).unwrap();
        fs::write(root.join("hl_a"), b"linked content").unwrap();
        fs::hard_link(root.join("hl_a"), root.join("sub/hl_b")).unwrap();

        symlink("fast/target", root.join("fast")).unwrap();
        symlink(LONG_TARGET, root.join("slow")).unwrap();
        symlink("x".repeat(59), root.join("edge59")).unwrap();
        symlink("y".repeat(60), root.join("edge60")).unwrap();
        symlink("z".repeat(1000), root.join("long_link")).unwrap();
        lchown(root.join("fast"), Some(70002), Some(70003)).unwrap();

        use rustix::fs::FileType;
        mknod(&root.join("chr_old"), FileType::CharacterDevice, 1, 3);
        mknod(&root.join("chr_new"), FileType::CharacterDevice, 300, 70000);
        mknod(&root.join("blk"), FileType::BlockDevice, 8, 1);
        mknod(&root.join("fifo"), FileType::Fifo, 0, 0);

        fs::create_dir(root.join("many")).unwrap();
        for i in 0..MANY {
            let content = if i % 7 == 0 { format!("file {i}") } else { String::new() };
            fs::write(root.join(format!("many/entry-with-a-longish-name-{i:05}")), content)
                .unwrap();
        }

        let mut deep = root.to_path_buf();
        for level in 0..10 {
            deep.push(format!("n{level}"));
        }
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("leaf.txt"), b"deep").unwrap();
        fs::write(root.join(UTF8_NAME), "ünïcödé".as_bytes()).unwrap();
    }

    fn mkfs(img: &Path, size: u64, args: &[&str], src: Option<&Path>) {
        File::create(img).unwrap().set_len(size).unwrap();
        let mut cmd = Command::new(tool("mke2fs"));
        cmd.args(["-q", "-F"]).args(args);
        if let Some(src) = src {
            cmd.arg("-d").arg(src);
        }
        let out = cmd.arg(img).output().expect("mke2fs (e2fsprogs) runs");
        assert!(out.status.success(), "mke2fs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn debugfs(img: &Path, request: &str) -> String {
        let out = Command::new(tool("debugfs"))
            .args(["-w", "-R", request])
            .arg(img)
            .output()
            .expect("debugfs (e2fsprogs) runs");
        assert!(
            out.status.success(),
            "debugfs {request}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn source_tree(root: &Path) -> BTreeMap<String, fs::Metadata> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, fs::Metadata>) {
            for e in fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let md = fs::symlink_metadata(e.path()).unwrap();
                let rel = e.path().strip_prefix(root).unwrap().to_str().unwrap().to_owned();
                if md.is_dir() {
                    walk(root, &e.path(), out);
                }
                out.insert(rel, md);
            }
        }
        let mut out = BTreeMap::new();
        walk(root, root, &mut out);
        out
    }

    /// Compares what is written with a source file, without holding either.
    struct Compare {
        src: File,
        pos: u64,
        buf: Vec<u8>,
    }

    impl Write for Compare {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.buf.resize(data.len(), 0);
            self.src.read_exact(&mut self.buf)?;
            if self.buf != data {
                let at = self.buf.iter().zip(data).position(|(a, b)| a != b).unwrap();
                return Err(std::io::Error::other(format!(
                    "differs at byte {}",
                    self.pos + at as u64
                )));
            }
            self.pos += data.len() as u64;
            Ok(data.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn kind_of(md: &fs::Metadata) -> EntryKind {
        crate::reader::kind_of(md.file_type()).expect("unexpected file type")
    }

    /// Asserts that the image holds exactly the source tree, metadata and
    /// content alike.
    fn assert_matches(img: &Ext4Image, src: &Path) {
        let entries = img.entries(true).unwrap();
        let mut by_path = BTreeMap::new();
        let mut listed = HashSet::new();
        for e in &entries {
            if let Some((parent, _)) = e.path.rsplit_once('/') {
                assert!(listed.contains(parent), "{} listed before its directory", e.path);
            }
            listed.insert(e.path.as_str());
            assert!(by_path.insert(e.path.clone(), e).is_none(), "{} listed twice", e.path);
        }
        let source = source_tree(src);
        assert_eq!(
            by_path.keys().collect::<Vec<_>>(),
            source.keys().collect::<Vec<_>>(),
            "paths differ"
        );

        let mut subdirs: HashMap<&str, u32> = HashMap::new();
        for (path, md) in &source {
            if md.is_dir() {
                let parent = path.rsplit_once('/').map_or("", |(p, _)| p);
                *subdirs.entry(parent).or_default() += 1;
            }
        }
        let mut inodes: HashMap<u64, Vec<&str>> = HashMap::new();
        for (path, md) in &source {
            let e = by_path[path];
            inodes.entry(e.ino).or_default().push(path);
            assert_eq!(e.kind, kind_of(md), "{path}: kind");
            assert_eq!(e.mode, md.mode() & 0o7777, "{path}: mode");
            assert_eq!((e.uid, e.gid), (u64::from(md.uid()), u64::from(md.gid())), "{path}: owner");
            match e.kind {
                EntryKind::File => {
                    assert_eq!(e.size, md.len(), "{path}: size");
                    assert_eq!(u64::from(e.nlink), md.nlink(), "{path}: nlink");
                    let mut cmp = Compare {
                        src: File::open(src.join(path)).unwrap(),
                        pos: 0,
                        buf: Vec::new(),
                    };
                    let n = img
                        .read_file(e.ino, &mut cmp)
                        .unwrap_or_else(|err| panic!("{path}: {err}"));
                    assert_eq!(n, md.len(), "{path}: bytes read");
                    assert_eq!(
                        cmp.src.read(&mut [0u8; 1]).unwrap(),
                        0,
                        "{path}: content too short"
                    );
                }
                EntryKind::Dir => {
                    let expected = 2 + subdirs.get(path.as_str()).copied().unwrap_or(0);
                    assert_eq!(e.nlink, expected, "{path}: nlink");
                    assert_eq!(e.size, 0, "{path}: size");
                }
                EntryKind::Symlink => {
                    let target = fs::read_link(src.join(path)).unwrap();
                    assert_eq!(e.link_target.as_deref(), target.to_str(), "{path}: target");
                    assert_eq!(e.size, target.as_os_str().len() as u64, "{path}: size");
                }
                EntryKind::CharDevice | EntryKind::BlockDevice => {
                    let rdev = md.rdev();
                    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
                    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
                    assert_eq!(e.device, Some((major as u32, minor as u32)), "{path}: device");
                }
                EntryKind::Fifo | EntryKind::Hardlink => {}
            }
            if e.kind != EntryKind::Symlink {
                assert_eq!(e.link_target, None, "{path}: target");
            }
            if !matches!(e.kind, EntryKind::CharDevice | EntryKind::BlockDevice) {
                assert_eq!(e.device, None, "{path}: device");
            }
        }
        // Only the hard link pair shares an inode.
        for (ino, paths) in &inodes {
            if paths.len() > 1 {
                assert_eq!(paths, &["hl_a", "sub/hl_b"], "inode {ino}");
            }
        }
        assert_eq!(by_path["hl_a"].ino, by_path["sub/hl_b"].ino);
        assert_eq!(by_path["hl_a"].nlink, 2);

        let root = img.root().unwrap();
        assert_eq!((root.path.as_str(), root.kind), ("", EntryKind::Dir));
        let root_md = fs::metadata(src).unwrap();
        assert_eq!((root.mode, root.uid, root.gid), (root_md.mode() & 0o7777, 0, 0));

        let all = img.entries(false).unwrap();
        assert!(all.iter().any(|e| e.path == "lost+found" && e.kind == EntryKind::Dir));
        assert_eq!(all.len(), entries.len() + 1, "lost+found holds nothing");
    }

    fn ino_of(img: &Ext4Image, path: &str) -> u64 {
        img.entries(true).unwrap().into_iter().find(|e| e.path == path).unwrap().ino
    }

    /// Builds the source tree, an image of it with `args`, and checks one
    /// against the other; then, with `index_dirs`, has e2fsck turn the large
    /// directories into htrees (mke2fs -d writes linear ones) and checks again.
    fn roundtrip(size: u64, args: &[&str], index_dirs: bool) -> (tempfile::TempDir, Ext4Image) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir(&src).unwrap();
        build_tree(&src);
        let path = tmp.path().join("image");
        mkfs(&path, size, args, Some(&src));
        let mut img = Ext4Image::open(&path).unwrap();
        assert_matches(&img, &src);
        if index_dirs {
            let status = Command::new(tool("e2fsck")).arg("-fyD").arg(&path).output().unwrap();
            assert!(status.status.code().is_some_and(|c| c <= 1), "e2fsck: {status:?}");
            img = Ext4Image::open(&path).unwrap();
            let many = img.read_inode(ino_of(&img, "many")).unwrap();
            assert!(many.flags & INDEX_FL != 0, "e2fsck -D left many/ unindexed");
            assert_matches(&img, &src);
        }
        (tmp, img)
    }

    const INDEX_FL: u32 = 0x1000;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn ext4_defaults_match_the_source_tree() {
        // Above 512 MiB mke2fs picks its defaults for ordinary filesystems.
        let (_tmp, img) = roundtrip(600 * MIB, &["-t", "ext4"], true);
        assert_eq!(img.sb.block_size, 4096);
        assert_eq!(img.sb.desc_size, 64);
        assert!(img.sb.incompat & INCOMPAT_FLEX_BG != 0);
        assert_eq!(img.extent_depth(ino_of(&img, "islands")).unwrap(), Some(1));
        assert_eq!(img.extent_depth(ino_of(&img, "one")).unwrap(), Some(0));
    }

    #[test]
    fn ext4_small_defaults_and_1k_blocks_match_the_source_tree() {
        let (_tmp, img) = roundtrip(256 * MIB, &["-t", "ext4"], true);
        assert_eq!(img.sb.block_size, 1024);
        assert_eq!(img.extent_depth(ino_of(&img, "islands")).unwrap(), Some(2));
    }

    #[test]
    fn ext4_without_journal_matches_the_source_tree() {
        let (_tmp, img) =
            roundtrip(256 * MIB, &["-t", "ext4", "-O", "^has_journal", "-b", "4096"], false);
        assert_eq!(img.sb.block_size, 4096);
    }

    #[test]
    fn ext4_meta_bg_matches_the_source_tree() {
        let (_tmp, img) = roundtrip(
            256 * MIB,
            &["-t", "ext4", "-b", "1024", "-O", "meta_bg,^resize_inode"],
            false,
        );
        assert!(img.sb.incompat & INCOMPAT_META_BG != 0);
        assert!(img.sb.group_count > img.sb.block_size / img.sb.desc_size);
    }

    #[test]
    fn ext4_bigalloc_matches_the_source_tree() {
        let (_tmp, img) =
            roundtrip(256 * MIB, &["-t", "ext4", "-O", "bigalloc", "-C", "16384"], false);
        assert!(img.sb.cluster_size > img.sb.block_size);
    }

    #[test]
    fn ext4_64k_blocks_match_the_source_tree() {
        let (_tmp, img) = roundtrip(256 * MIB, &["-t", "ext4", "-b", "65536", "-N", "16384"], true);
        assert_eq!(img.sb.block_size, 65536);
    }

    #[test]
    fn ext2_1k_blocks_match_the_source_tree() {
        let (_tmp, img) = roundtrip(256 * MIB, &["-t", "ext2", "-b", "1024"], true);
        // 70 MiB in needs the triple indirect block with 1 KiB blocks.
        assert_eq!(img.extent_depth(ino_of(&img, "far")).unwrap(), None);
    }

    #[test]
    fn ext2_4k_blocks_match_the_source_tree() {
        roundtrip(256 * MIB, &["-t", "ext2", "-b", "4096"], false);
    }

    #[test]
    fn ext3_matches_the_source_tree() {
        roundtrip(256 * MIB, &["-t", "ext3"], false);
    }

    #[test]
    fn empty_filesystem_lists_only_lost_and_found() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("image");
        mkfs(&path, 8 * MIB, &["-t", "ext4"], None);
        let img = Ext4Image::open(&path).unwrap();
        assert!(img.entries(true).unwrap().is_empty());
        let all = img.entries(false).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].path.as_str(), all[0].mode, all[0].nlink), ("lost+found", 0o700, 2));
        assert_eq!(img.root().unwrap().nlink, 3);
    }

    #[test]
    fn unwritten_extents_read_as_zeros() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir(&src).unwrap();
        File::create(src.join("pre")).unwrap().set_len(40960).unwrap();
        let path = tmp.path().join("image");
        mkfs(&path, 64 * MIB, &["-t", "ext4", "-b", "4096"], Some(&src));
        // Unwritten blocks 0..=20, past the 10 blocks of the file's size,
        // over stale bytes that must not show.
        debugfs(&path, "fallocate /pre 0 20");
        debugfs(&path, "zap_block -f /pre -p 0xAA 3");
        assert!(debugfs(&path, "stat /pre").contains("[u]"));
        let img = Ext4Image::open(&path).unwrap();
        let mut out = Vec::new();
        assert_eq!(img.read_file(ino_of(&img, "pre"), &mut out).unwrap(), 40960);
        assert_eq!(out, vec![0u8; 40960]);
    }

    fn image_of(setup: impl FnOnce(&Path), args: &[&str]) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir(&src).unwrap();
        setup(&src);
        let path = tmp.path().join("image");
        mkfs(&path, 16 * MIB, args, Some(&src));
        (tmp, path)
    }

    #[test]
    fn sockets_are_unsupported() {
        let (_tmp, path) = image_of(
            |src| {
                fs::create_dir(src.join("run")).unwrap();
                std::os::unix::net::UnixListener::bind(src.join("run/sock")).unwrap();
            },
            &["-t", "ext4"],
        );
        let err = Ext4Image::open(&path).unwrap().entries(true).unwrap_err();
        assert!(
            matches!(&err, Ext4Error::Unsupported(m) if m.contains("run/sock") && m.contains("socket")),
            "{err}"
        );
    }

    #[test]
    fn names_that_are_not_utf8_are_unsupported() {
        let (_tmp, path) = image_of(
            |src| fs::write(src.join(OsStr::from_bytes(b"bad\xffname")), b"").unwrap(),
            &["-t", "ext4"],
        );
        let err = Ext4Image::open(&path).unwrap().entries(true).unwrap_err();
        assert!(matches!(&err, Ext4Error::Unsupported(m) if m.contains("inode")), "{err}");
    }

    #[test]
    fn inline_data_matches_the_source_tree() {
        // mke2fs -d stores small files, symlinks and directories in their
        // inodes, and what outgrows `i_block` in the system.data value.
        // (With inline_data, e2fsprogs 1.47.0's mke2fs -d records the size
        // of a file that ends in zero blocks without them: the tree's
        // three such files are left out.)
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir(&src).unwrap();
        build_tree(&src);
        for name in ["far", "islands", "sparse"] {
            fs::remove_file(src.join(name)).unwrap();
        }
        // Past `i_block`, into the attribute: a file and a directory.
        fs::write(src.join("spilled"), "s".repeat(100)).unwrap();
        fs::create_dir(src.join("five")).unwrap();
        for i in 0..5 {
            fs::write(src.join(format!("five/entry-{i}")), b"").unwrap();
        }
        let path = tmp.path().join("image");
        mkfs(&path, 64 * MIB, &["-t", "ext4", "-I", "256", "-O", "inline_data"], Some(&src));
        let img = Ext4Image::open(&path).unwrap();
        assert_matches(&img, &src);
        let inline = img
            .entries(true)
            .unwrap()
            .iter()
            .map(|e| img.read_inode(e.ino).unwrap())
            .filter(|i| i.flags & FL_INLINE_DATA != 0)
            .fold((0, 0, 0), |(f, d, more), i| match i.mode & S_IFMT {
                S_IFREG => (f + 1, d, more + usize::from(!i.inline_more.is_empty())),
                S_IFDIR => (f, d + 1, more + usize::from(!i.inline_more.is_empty())),
                _ => (f, d, more),
            });
        assert!(
            inline.0 > 0 && inline.1 > 0 && inline.2 > 0,
            "inline files, dirs, spilled: {inline:?}"
        );
    }

    /// Overwrites the first occurrence of `find` in the image file.
    fn patch(path: &Path, find: &[u8], at: isize, with: &[u8]) {
        let mut bytes = fs::read(path).unwrap();
        let pos = bytes.windows(find.len()).position(|w| w == find).unwrap();
        let start = (pos as isize + at) as usize;
        bytes[start..start + with.len()].copy_from_slice(with);
        fs::write(path, bytes).unwrap();
    }

    fn looping_tree(src: &Path) {
        fs::create_dir_all(src.join("a/loopdir")).unwrap();
        fs::write(src.join("slashXname"), b"").unwrap();
    }

    #[test]
    fn directory_cycles_are_corrupt() {
        let (_tmp, path) = image_of(looping_tree, &["-t", "ext4"]);
        // The dirent's inode field sits 8 bytes before its name.
        patch(&path, b"loopdir", -8, &2u32.to_le_bytes());
        let err = Ext4Image::open(&path).unwrap().entries(true).unwrap_err();
        assert!(matches!(&err, Ext4Error::Corrupt(m) if m.contains("a/loopdir")), "{err}");
    }

    #[test]
    fn names_with_a_slash_are_corrupt() {
        let (_tmp, path) = image_of(looping_tree, &["-t", "ext4"]);
        patch(&path, b"slashXname", 5, b"/");
        let err = Ext4Image::open(&path).unwrap().entries(true).unwrap_err();
        assert!(matches!(&err, Ext4Error::Corrupt(m) if m.contains("slash/name")), "{err}");
    }

    #[test]
    fn extent_trees_too_deep_are_corrupt() {
        let (_tmp, path) =
            image_of(|src| fs::write(src.join("f"), b"content").unwrap(), &["-t", "ext4"]);
        // i_block[1] holds eh_max (low half) and eh_depth (high half).
        debugfs(&path, "sif /f block[1] 0x00060004");
        let img = Ext4Image::open(&path).unwrap();
        let err = img.read_file(ino_of(&img, "f"), &mut Vec::new()).unwrap_err();
        assert!(matches!(&err, Ext4Error::Corrupt(m) if m.contains("depth 6")), "{err}");
    }

    #[test]
    fn extent_trees_sharing_a_node_are_corrupt() {
        let (_tmp, path) = image_of(
            |src| {
                let mut rng = Rng::new(5);
                let islands: Vec<Vec<u8>> = (0..400).map(|_| rng.bytes(4096)).collect();
                let parts: Vec<(u64, &[u8])> = islands
                    .iter()
                    .enumerate()
                    .map(|(i, d)| (i as u64 * 12288, d.as_slice()))
                    .collect();
                write_at(&src.join("islands"), &parts, 400 * 12288);
            },
            &["-t", "ext4", "-b", "4096"],
        );
        let img = Ext4Image::open(&path).unwrap();
        let ino = ino_of(&img, "islands");
        let root = img.read_inode(ino).unwrap();
        // Two leaves under the root: point the second index entry's
        // ei_leaf_lo (i_block[7]) at the first leaf (i_block[4]).
        assert_eq!((le16(&root.block, 2), le16(&root.block, 6)), (2, 1));
        debugfs(&path, &format!("sif /islands block[7] {}", le32(&root.block, 16)));
        let img = Ext4Image::open(&path).unwrap();
        let err = img.read_file(ino, &mut Capped(u64::MAX)).unwrap_err();
        assert!(matches!(&err, Ext4Error::Corrupt(m) if m.contains("twice")), "{err}");
    }

    #[test]
    fn reading_a_directory_as_a_file_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("image");
        mkfs(&path, 8 * MIB, &["-t", "ext4"], None);
        let img = Ext4Image::open(&path).unwrap();
        assert!(matches!(img.read_file(ROOT_INO, &mut Vec::new()), Err(Ext4Error::Unsupported(_))));
        assert!(matches!(img.read_file(0, &mut Vec::new()), Err(Ext4Error::Corrupt(_))));
        assert!(matches!(img.read_file(u64::MAX, &mut Vec::new()), Err(Ext4Error::Corrupt(_))));
    }

    #[test]
    fn truncated_and_foreign_images_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("image");
        mkfs(&path, 8 * MIB, &["-t", "ext4"], None);
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(4 * MIB).unwrap();
        let err = Ext4Image::open(&path).unwrap_err();
        assert!(matches!(&err, Ext4Error::Corrupt(m) if m.contains("truncated")), "{err}");
        f.set_len(1500).unwrap();
        assert!(matches!(Ext4Image::open(&path), Err(Ext4Error::NotExt4(_))));
        f.set_len(0).unwrap();
        assert!(matches!(Ext4Image::open(&path), Err(Ext4Error::NotExt4(_))));
        fs::write(&path, Rng::new(1).bytes(1 << 16)).unwrap();
        assert!(matches!(Ext4Image::open(&path), Err(Ext4Error::NotExt4(_))));
        let err = Ext4Image::open(&tmp.path().join("missing")).unwrap_err();
        assert!(matches!(&err, Ext4Error::Io { what, .. } if what.contains("missing")), "{err}");
    }

    /// Discards output but fails past a limit, as a caller bounding what it
    /// accepts would.
    struct Capped(u64);

    impl Write for Capped {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0 =
                self.0.checked_sub(data.len() as u64).ok_or(std::io::ErrorKind::FileTooLarge)?;
            Ok(data.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Everything a caller may do with an image, errors allowed.
    fn read_everything(path: &Path) {
        let Ok(img) = Ext4Image::open(path) else { return };
        let _ = img.root();
        for skip in [true, false] {
            let Ok(entries) = img.entries(skip) else { continue };
            for e in entries.iter().filter(|e| e.kind == EntryKind::File) {
                let _ = img.read_file(e.ino, &mut Capped(256 * MIB));
            }
        }
        for ino in 1..64 {
            let _ = img.read_file(ino, &mut Capped(256 * MIB));
        }
    }

    fn small_tree(src: &Path) {
        let mut rng = Rng::new(3);
        fs::create_dir(src.join("dir")).unwrap();
        for i in 0..300 {
            fs::write(src.join(format!("dir/name-{i:03}")), b"").unwrap();
        }
        let islands: Vec<Vec<u8>> = (0..40).map(|_| rng.bytes(1024)).collect();
        let parts: Vec<(u64, &[u8])> =
            islands.iter().enumerate().map(|(i, d)| (i as u64 * 3072, d.as_slice())).collect();
        write_at(&src.join("islands"), &parts, 40 * 3072);
        fs::write(src.join("data"), rng.bytes(5000)).unwrap();
        symlink(LONG_TARGET, src.join("slow")).unwrap();
        symlink("short", src.join("fast")).unwrap();
        mknod(&src.join("chr"), rustix::fs::FileType::CharacterDevice, 4, 5);
    }

    #[test]
    fn corrupted_images_never_panic() {
        for args in [&["-t", "ext4", "-b", "1024"][..], &["-t", "ext2", "-b", "1024"][..]] {
            let (tmp, path) = image_of(small_tree, args);
            let fsck = Command::new(tool("e2fsck")).arg("-fyD").arg(&path).output().unwrap();
            assert!(fsck.status.code().is_some_and(|c| c <= 1), "e2fsck: {fsck:?}");
            let img = Ext4Image::open(&path).unwrap();
            assert!(img.read_inode(ino_of(&img, "dir")).unwrap().flags & INDEX_FL != 0);
            read_everything(&path);
            let pristine = fs::read(&path).unwrap();
            // Corrupting zero blocks mostly hits free space; aim at metadata
            // and data instead.
            let used: Vec<usize> = pristine
                .chunks(1024)
                .enumerate()
                .filter(|(_, c)| c.iter().any(|b| *b != 0))
                .map(|(i, _)| i)
                .collect();
            let target = tmp.path().join("corrupt");
            for seed in 0..200u64 {
                let mut rng = Rng::new(seed + 1);
                let mut bytes = pristine.clone();
                // Few bytes keep most structure intact, so the reader gets far
                // enough to meet the damage; many bytes test early checks.
                let count = if seed % 3 == 0 { 200 } else { 1 + rng.below(8) };
                for _ in 0..count {
                    // A quarter of the hits land on the superblock and
                    // group descriptors, which are few but read first.
                    let block = if rng.below(4) == 0 {
                        rng.below(4) as usize
                    } else {
                        used[rng.below(used.len() as u64) as usize]
                    };
                    let at = block * 1024 + rng.below(1024) as usize;
                    bytes[at] = match rng.below(3) {
                        0 => 0xFF,
                        1 => bytes[at] ^ (1 << rng.below(8)),
                        _ => rng.next() as u8,
                    };
                }
                fs::write(&target, &bytes).unwrap();
                eprintln!("{args:?} seed {seed}");
                read_everything(&target);
            }
        }
    }

    #[test]
    fn record_lengths_of_64k_blocks() {
        assert_eq!(rec_len(12, 4096), 12);
        assert_eq!(rec_len(0, 65536), 65536);
        assert_eq!(rec_len(u16::MAX, 65536), 65536);
        assert_eq!(rec_len(0xFFFC, 65536), 0xFFFC);
        assert_eq!(rec_len(0x0001, 65536), 0x10000);
    }

    #[test]
    fn device_numbers_in_both_encodings() {
        let mut block = [0u8; I_BLOCK_SIZE];
        block[..4].copy_from_slice(&0x0103u32.to_le_bytes());
        assert_eq!(device_number(&block), (1, 3));
        // new_encode_dev(300, 70000)
        let new = (70000u32 & 0xff) | (300 << 8) | ((70000 & !0xff) << 12);
        block[..4].copy_from_slice(&0u32.to_le_bytes());
        block[4..8].copy_from_slice(&new.to_le_bytes());
        assert_eq!(device_number(&block), (300, 70000));
    }

    #[test]
    fn sparse_super_backup_groups() {
        let raw = {
            let mut raw = vec![0u8; SUPERBLOCK_SIZE];
            raw[0x38..0x3A].copy_from_slice(&MAGIC.to_le_bytes());
            raw[0x04..0x08].copy_from_slice(&(1u32 << 20).to_le_bytes());
            raw[0x00..0x04].copy_from_slice(&(128u32 * 1024).to_le_bytes());
            raw[0x20..0x24].copy_from_slice(&8192u32.to_le_bytes());
            raw[0x28..0x2C].copy_from_slice(&1024u32.to_le_bytes());
            raw[0x64..0x68].copy_from_slice(&RO_COMPAT_SPARSE_SUPER.to_le_bytes());
            raw
        };
        let sb = Superblock::parse(&raw, 1 << 30).unwrap();
        let with: Vec<u64> = (0..130).filter(|g| sb.group_has_super(*g)).collect();
        assert_eq!(with, [0, 1, 3, 5, 7, 9, 25, 27, 49, 81, 125]);
        assert!(matches!(Superblock::parse(&raw, 1 << 29), Err(Ext4Error::Corrupt(_))));
    }
}
