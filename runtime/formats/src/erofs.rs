//! Read-only EROFS image reader: lists every inode reachable from the root
//! and streams file content straight from the image file, without mounting.
//!
//! Everything read from the image is untrusted: offsets and lengths are
//! bounds-checked against the image length, allocations are capped, and the
//! directory walk is bounded so that a hostile image yields an error rather
//! than a panic, a hang or an exhausted memory.

use crate::erofs_format::{
    COMPACT_INODE_SIZE, DIRENT_SIZE, EXTENDED_INODE_SIZE, LAYOUT_FLAT_INLINE, LAYOUT_FLAT_PLAIN,
    MAGIC, NULL_ADDR, SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE,
};
use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use provd_domain::image::EntryKind;

use crate::reader::FsEntry;

/// Node ids count 32-byte slots from the start of the metadata area.
const ISLOT_BITS: u32 = 5;

// Incompatible features up to and including xattr name prefixes only add
// layouts that are either handled below or refused where met; anything newer
// may change the meaning of metadata, so it is refused at open.
const FEATURE_ZERO_PADDING: u32 = 0x1;
const FEATURE_DEVICE_TABLE: u32 = 0x8;
const FEATURES_KNOWN: u32 = 0x7f;

const LAYOUT_COMPRESSED_FULL: u8 = 1;
const LAYOUT_COMPRESSED_COMPACT: u8 = 3;
const LAYOUT_CHUNK_BASED: u8 = 4;

const CHUNK_FORMAT_BLKBITS_MASK: u32 = 0x1f;
const CHUNK_FORMAT_INDEXES: u32 = 0x20;

const ADVISE_COMPACTED_2B: u16 = 0x1;
const ADVISE_BIG_PCLUSTER_1: u16 = 0x2;
const ADVISE_BIG_PCLUSTER_2: u16 = 0x4;
const ADVISE_INLINE_PCLUSTER: u16 = 0x8;
const ADVISE_INTERLACED_PCLUSTER: u16 = 0x10;
const ADVISE_FRAGMENT_PCLUSTER: u16 = 0x20;
/// Bit of a non-head lcluster's first delta that marks it as holding the
/// compressed block count of a big pcluster.
const D0_CBLKCNT: u64 = 1 << 11;
const ALG_LZ4: u8 = 0;

/// Deeper trees are legal but no image we build has them; the bound keeps a
/// crafted image from exhausting the stack.
const MAX_DEPTH: usize = 128;
/// Linux refuses longer symlink targets (PATH_MAX including the NUL).
const MAX_SYMLINK_TARGET: u64 = 4095;
/// erofs-utils never writes a physical cluster above 1 MiB; anything much
/// larger can only come from a corrupt index.
const MAX_PCLUSTER_BYTES: u64 = 16 << 20;
/// Decompressed extents are buffered whole, so their size is capped; mkfs
/// extents are at most a few MiB.
const MAX_EXTENT_BYTES: u64 = 64 << 20;
/// Holes of chunk-based files are streamed as zeros; the cap keeps a forged
/// size from making a read run practically forever.
const MAX_SPARSE_FILE_BYTES: u64 = 1 << 40;
const COPY_BUFFER: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not an erofs image: {0}")]
    NotErofs(String),
    #[error("unsupported erofs image: {0}")]
    Unsupported(String),
    #[error("corrupt erofs image: {0}")]
    Corrupt(String),
}

fn corrupt(msg: impl Into<String>) -> ErofsError {
    ErofsError::Corrupt(msg.into())
}

fn unsupported(msg: impl Into<String>) -> ErofsError {
    ErofsError::Unsupported(msg.into())
}

fn le16(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2).and_then(|s| s.try_into().ok()).map_or(0, u16::from_le_bytes)
}

fn le32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4).and_then(|s| s.try_into().ok()).map_or(0, u32::from_le_bytes)
}

fn le64(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8).and_then(|s| s.try_into().ok()).map_or(0, u64::from_le_bytes)
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    v.checked_add(align - 1).map(|x| x / align * align)
}

#[derive(Debug, Clone, Copy)]
struct Superblock {
    blkszbits: u32,
    root_nid: u64,
    meta_blkaddr: u32,
    feature_incompat: u32,
    extra_devices: u16,
}

impl Superblock {
    fn blksz(&self) -> u64 {
        1u64 << self.blkszbits
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileType {
    Reg,
    Dir,
    Lnk,
    Chr,
    Blk,
    Fifo,
    Sock,
}

#[derive(Debug, Clone)]
struct Inode {
    nid: u64,
    ftype: FileType,
    mode: u32,
    nlink: u32,
    size: u64,
    uid: u64,
    gid: u64,
    /// Block address, device number, compressed block count or chunk format,
    /// depending on the file type and data layout.
    i_u: u32,
    layout: u8,
    /// First byte after the inode and its inline xattrs.
    data_start: u64,
}

/// A read-only EROFS image opened from a file.
#[derive(Debug)]
pub struct ErofsImage {
    file: File,
    len: u64,
    sb: Superblock,
}

struct Walk {
    /// Directories seen so far, to refuse cycles and directory hard links.
    visited: HashSet<u64>,
    /// Directory bytes that may still be read.
    dir_budget: u64,
}

struct Dirent {
    nid: u64,
    name: String,
}

impl ErofsImage {
    pub fn open(path: &Path) -> Result<ErofsImage, ErofsError> {
        let file = File::open(path).map_err(|source| ErofsError::Io {
            context: format!("opening {}", path.display()),
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| ErofsError::Io {
                context: format!("reading the size of {}", path.display()),
                source,
            })?
            .len();
        let sb_end = SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE as u64;
        if len < sb_end {
            return Err(ErofsError::NotErofs(format!(
                "{} is {len} bytes, too small to hold a superblock",
                path.display()
            )));
        }
        let mut raw = [0u8; SUPERBLOCK_SIZE];
        file.read_exact_at(&mut raw, SUPERBLOCK_OFFSET).map_err(|source| ErofsError::Io {
            context: format!("reading the superblock of {}", path.display()),
            source,
        })?;
        let magic = le32(&raw, 0);
        if magic != MAGIC {
            return Err(ErofsError::NotErofs(format!(
                "{} has magic {magic:#010x} at byte 1024, not {MAGIC:#010x}",
                path.display()
            )));
        }
        let blkszbits = u32::from(raw.get(12).copied().unwrap_or(0));
        if !(9..=16).contains(&blkszbits) {
            return Err(corrupt(format!("superblock block size bits {blkszbits} outside 9..=16")));
        }
        let feature_incompat = le32(&raw, 80);
        if feature_incompat & !FEATURES_KNOWN != 0 {
            return Err(unsupported(format!(
                "incompatible features {:#x} in superblock",
                feature_incompat & !FEATURES_KNOWN
            )));
        }
        let sb = Superblock {
            blkszbits,
            root_nid: u64::from(le16(&raw, 14)),
            meta_blkaddr: le32(&raw, 40),
            feature_incompat,
            extra_devices: le16(&raw, 86),
        };
        let blocks = u64::from(le32(&raw, 36));
        let claimed = blocks << blkszbits;
        if claimed > len {
            return Err(corrupt(format!(
                "superblock claims {blocks} blocks ({claimed} bytes) but the image has {len} bytes (truncated?)"
            )));
        }
        Ok(ErofsImage { file, len, sb })
    }

    /// Every entry reachable from the root, parents before children; excludes
    /// ".", ".." and the root itself.
    pub fn entries(&self) -> Result<Vec<FsEntry>, ErofsError> {
        let root = self.root_inode()?;
        let mut out = Vec::new();
        let mut walk = Walk { visited: HashSet::from([root.nid]), dir_budget: self.len };
        self.walk(&root, "", 1, &mut walk, &mut out)?;
        Ok(out)
    }

    /// The root directory as an FsEntry with path "".
    pub fn root(&self) -> Result<FsEntry, ErofsError> {
        let root = self.root_inode()?;
        self.entry_for(&root, String::new())
    }

    /// Whether a regular file's data is compressed (so read_file may need a
    /// fallback when it reports the layout unsupported).
    pub fn is_compressed(&self, ino: u64) -> Result<bool, ErofsError> {
        let inode = self.inode(ino)?;
        Ok(matches!(inode.layout, LAYOUT_COMPRESSED_FULL | LAYOUT_COMPRESSED_COMPACT))
    }

    /// Streams a regular file's content (by nid) into `out`; returns bytes
    /// written.
    pub fn read_file(&self, ino: u64, out: &mut dyn Write) -> Result<u64, ErofsError> {
        let inode = self.inode(ino)?;
        if inode.ftype != FileType::Reg {
            return Err(unsupported(format!("reading content of nid {ino}: not a regular file")));
        }
        let mut sink = |buf: &[u8]| -> Result<(), ErofsError> {
            out.write_all(buf).map_err(|source| ErofsError::Io {
                context: format!("writing content of nid {ino}"),
                source,
            })
        };
        self.stream_data(&inode, &mut sink)
    }

    fn root_inode(&self) -> Result<Inode, ErofsError> {
        let root = self.inode(self.sb.root_nid)?;
        if root.ftype != FileType::Dir {
            return Err(corrupt(format!("root nid {} is not a directory", self.sb.root_nid)));
        }
        Ok(root)
    }

    fn walk(
        &self,
        dir: &Inode,
        path: &str,
        depth: usize,
        walk: &mut Walk,
        out: &mut Vec<FsEntry>,
    ) -> Result<(), ErofsError> {
        if depth > MAX_DEPTH {
            return Err(unsupported(format!(
                "directory nesting deeper than {MAX_DEPTH} at {path}"
            )));
        }
        // Directory data is never shared, so all of it fits in the image;
        // more means forged block addresses that would multiply the entries.
        walk.dir_budget = walk.dir_budget.checked_sub(dir.size).ok_or_else(|| {
            corrupt(format!(
                "directories up to {path} (nid {}) hold more data than the image",
                dir.nid
            ))
        })?;
        for de in self.read_dir(dir, path)? {
            if de.name == "." || de.name == ".." {
                continue;
            }
            let child_path = if path.is_empty() { de.name } else { format!("{path}/{}", de.name) };
            let inode = self.inode(de.nid)?;
            let entry = self.entry_for(&inode, child_path)?;
            if inode.ftype == FileType::Dir {
                // A directory reached twice is a cycle or a directory hard
                // link; either way the tree is not a tree.
                if !walk.visited.insert(inode.nid) {
                    return Err(corrupt(format!(
                        "directory nid {} reached a second time at {}",
                        inode.nid, entry.path
                    )));
                }
                let child_path = entry.path.clone();
                out.push(entry);
                self.walk(&inode, &child_path, depth + 1, walk, out)?;
            } else {
                out.push(entry);
            }
        }
        Ok(())
    }

    fn entry_for(&self, inode: &Inode, path: String) -> Result<FsEntry, ErofsError> {
        let mut link_target = None;
        let mut device = None;
        let mut size = 0;
        let kind = match inode.ftype {
            FileType::Reg => {
                size = inode.size;
                EntryKind::File
            }
            FileType::Dir => EntryKind::Dir,
            FileType::Lnk => {
                let target = self.symlink_target(inode, &path)?;
                size = target.len() as u64;
                link_target = Some(target);
                EntryKind::Symlink
            }
            FileType::Chr => {
                device = Some(decode_dev(inode.i_u));
                EntryKind::CharDevice
            }
            FileType::Blk => {
                device = Some(decode_dev(inode.i_u));
                EntryKind::BlockDevice
            }
            FileType::Fifo => EntryKind::Fifo,
            FileType::Sock => {
                return Err(unsupported(format!("socket at {path} (nid {})", inode.nid)));
            }
        };
        Ok(FsEntry {
            path,
            kind,
            mode: inode.mode & 0o7777,
            uid: inode.uid,
            gid: inode.gid,
            size,
            ino: inode.nid,
            nlink: inode.nlink,
            link_target,
            device,
        })
    }

    fn symlink_target(&self, inode: &Inode, path: &str) -> Result<String, ErofsError> {
        if inode.size == 0 || inode.size > MAX_SYMLINK_TARGET {
            return Err(corrupt(format!(
                "symlink {path} (nid {}) has a target of {} bytes",
                inode.nid, inode.size
            )));
        }
        let raw = self.read_all(inode, MAX_SYMLINK_TARGET)?;
        if raw.contains(&0) {
            return Err(corrupt(format!(
                "symlink target of {path} (nid {}) contains a nul byte",
                inode.nid
            )));
        }
        String::from_utf8(raw).map_err(|_| {
            unsupported(format!("symlink target of {path} (nid {}) is not utf-8", inode.nid))
        })
    }

    fn read_dir(&self, dir: &Inode, path: &str) -> Result<Vec<Dirent>, ErofsError> {
        let data = self.read_all(dir, self.len)?;
        let blksz = usize::try_from(self.sb.blksz()).unwrap_or(usize::MAX);
        let shown = if path.is_empty() { "/" } else { path };
        let mut out = Vec::new();
        for (blk, chunk) in data.chunks(blksz).enumerate() {
            let bad = |why: &str| {
                corrupt(format!("directory {shown} (nid {}) block {blk}: {why}", dir.nid))
            };
            if chunk.len() < DIRENT_SIZE {
                return Err(bad("shorter than one entry"));
            }
            let first = usize::from(le16(chunk, 8));
            if first < DIRENT_SIZE || first % DIRENT_SIZE != 0 || first >= chunk.len() {
                return Err(bad(&format!("first name offset {first}")));
            }
            let count = first / DIRENT_SIZE;
            for i in 0..count {
                let at = i * DIRENT_SIZE;
                let nid = le64(chunk, at);
                let nameoff = usize::from(le16(chunk, at + 8));
                let last = i + 1 == count;
                let end =
                    if last { chunk.len() } else { usize::from(le16(chunk, at + DIRENT_SIZE + 8)) };
                if nameoff < first || nameoff >= end || end > chunk.len() {
                    return Err(bad(&format!("entry {i} has name bounds {nameoff}..{end}")));
                }
                let mut name = chunk.get(nameoff..end).ok_or_else(|| bad("name out of range"))?;
                // Only the last name of a block is padded, with nuls up to the
                // block end.
                if last && let Some(nul) = name.iter().position(|&b| b == 0) {
                    name = name.get(..nul).unwrap_or_default();
                }
                if name.is_empty() {
                    return Err(bad(&format!("entry {i} has an empty name")));
                }
                if name.contains(&b'/') || name.contains(&0) {
                    return Err(bad(&format!(
                        "entry {i} (nid {nid}) has a name containing '/' or a nul byte"
                    )));
                }
                let name = String::from_utf8(name.to_vec()).map_err(|_| {
                    unsupported(format!("name of nid {nid} in directory {shown} is not utf-8"))
                })?;
                out.push(Dirent { nid, name });
            }
        }
        Ok(out)
    }

    fn inode(&self, nid: u64) -> Result<Inode, ErofsError> {
        let meta = u64::from(self.sb.meta_blkaddr) << self.sb.blkszbits;
        let iloc = nid
            .checked_mul(1 << ISLOT_BITS)
            .and_then(|o| o.checked_add(meta))
            .ok_or_else(|| corrupt(format!("nid {nid} out of range")))?;
        let mut raw = [0u8; EXTENDED_INODE_SIZE as usize];
        let (compact, _) = raw.split_at_mut(COMPACT_INODE_SIZE as usize);
        self.read_at(iloc, compact, &format!("inode of nid {nid}"))?;
        let format = le16(&raw, 0);
        let extended = format & 1 != 0;
        let layout = ((format >> 1) & 7) as u8;
        let isize = if extended {
            self.read_at(iloc, &mut raw, &format!("inode of nid {nid}"))?;
            EXTENDED_INODE_SIZE
        } else {
            COMPACT_INODE_SIZE
        };
        let xattr_icount = u64::from(le16(&raw, 2));
        let xattr_size = if xattr_icount == 0 { 0 } else { 12 + (xattr_icount - 1) * 4 };
        let mode = u32::from(le16(&raw, 4));
        let (nlink, size, uid, gid) = if extended {
            (le32(&raw, 44), le64(&raw, 8), u64::from(le32(&raw, 24)), u64::from(le32(&raw, 28)))
        } else {
            (
                u32::from(le16(&raw, 6)),
                u64::from(le32(&raw, 8)),
                u64::from(le16(&raw, 24)),
                u64::from(le16(&raw, 26)),
            )
        };
        let ftype = match mode & 0o170000 {
            0o100000 => FileType::Reg,
            0o040000 => FileType::Dir,
            0o120000 => FileType::Lnk,
            0o020000 => FileType::Chr,
            0o060000 => FileType::Blk,
            0o010000 => FileType::Fifo,
            0o140000 => FileType::Sock,
            other => {
                return Err(corrupt(format!(
                    "nid {nid} has unknown file type {other:#o} in its mode"
                )));
            }
        };
        if layout > LAYOUT_CHUNK_BASED {
            return Err(unsupported(format!("nid {nid} has data layout {layout}")));
        }
        let data_start = iloc + isize + xattr_size;
        Ok(Inode {
            nid,
            ftype,
            mode,
            nlink,
            size,
            uid,
            gid,
            i_u: le32(&raw, 16),
            layout,
            data_start,
        })
    }

    fn read_at(&self, off: u64, buf: &mut [u8], what: &str) -> Result<(), ErofsError> {
        let end = off.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(corrupt(format!(
                "{what} at byte {off} (+{}) lies beyond the end of the image ({} bytes)",
                buf.len(),
                self.len
            )));
        }
        self.file.read_exact_at(buf, off).map_err(|source| ErofsError::Io {
            context: format!("reading {what} at byte {off}"),
            source,
        })
    }

    fn read_vec(&self, off: u64, len: u64, what: &str) -> Result<Vec<u8>, ErofsError> {
        if len > self.len {
            return Err(corrupt(format!(
                "{what} at byte {off} claims {len} bytes, more than the image"
            )));
        }
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        self.read_at(off, &mut buf, what)?;
        Ok(buf)
    }

    /// All of an inode's data, refused when larger than `limit`.
    fn read_all(&self, inode: &Inode, limit: u64) -> Result<Vec<u8>, ErofsError> {
        if inode.size > limit {
            return Err(corrupt(format!(
                "nid {} claims {} bytes of data, more than {limit}",
                inode.nid, inode.size
            )));
        }
        // The claimed size is untrusted; let the buffer grow with real data.
        let mut data =
            Vec::with_capacity(usize::try_from(inode.size.min(COPY_BUFFER)).unwrap_or(0));
        let mut sink = |buf: &[u8]| -> Result<(), ErofsError> {
            data.extend_from_slice(buf);
            Ok(())
        };
        self.stream_data(inode, &mut sink)?;
        Ok(data)
    }

    /// Feeds an inode's data to `sink` in order and checks that exactly
    /// `size` bytes came out.
    fn stream_data(
        &self,
        inode: &Inode,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), ErofsError>,
    ) -> Result<u64, ErofsError> {
        let mut written = 0u64;
        let mut counting = |buf: &[u8]| -> Result<(), ErofsError> {
            written += buf.len() as u64;
            if written > inode.size {
                return Err(corrupt(format!(
                    "nid {} yields more data than its size {}",
                    inode.nid, inode.size
                )));
            }
            sink(buf)
        };
        match inode.layout {
            LAYOUT_FLAT_PLAIN => self.stream_flat(inode, false, &mut counting)?,
            LAYOUT_FLAT_INLINE => self.stream_flat(inode, true, &mut counting)?,
            LAYOUT_CHUNK_BASED => self.stream_chunked(inode, &mut counting)?,
            _ => self.stream_compressed(inode, &mut counting)?,
        }
        if written != inode.size {
            return Err(corrupt(format!(
                "nid {} yields {written} bytes of data, not its size {}",
                inode.nid, inode.size
            )));
        }
        Ok(written)
    }

    fn copy_range(
        &self,
        off: u64,
        len: u64,
        what: &str,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), ErofsError>,
    ) -> Result<(), ErofsError> {
        // Empty ranges may carry a null block address.
        if len == 0 {
            return Ok(());
        }
        if off.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(corrupt(format!(
                "{what} at byte {off} (+{len}) lies beyond the end of the image ({} bytes)",
                self.len
            )));
        }
        let mut buf = vec![0u8; usize::try_from(len.min(COPY_BUFFER)).unwrap_or(0)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(COPY_BUFFER);
            let part = buf
                .get_mut(..usize::try_from(n).unwrap_or(0))
                .ok_or_else(|| corrupt("copy buffer too small"))?;
            self.read_at(off + done, part, what)?;
            sink(part)?;
            done += n;
        }
        Ok(())
    }

    fn stream_flat(
        &self,
        inode: &Inode,
        inline: bool,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), ErofsError>,
    ) -> Result<(), ErofsError> {
        let size = inode.size;
        if size == 0 {
            return Ok(());
        }
        let what = format!("data of nid {}", inode.nid);
        let start = u64::from(inode.i_u) << self.sb.blkszbits;
        if !inline {
            return self.copy_range(start, size, &what, sink);
        }
        let blksz = self.sb.blksz();
        let full = (size - 1) / blksz * blksz;
        self.copy_range(start, full, &what, sink)?;
        let tail = size - full;
        if inode.data_start % blksz + tail > blksz {
            return Err(corrupt(format!(
                "inline tail of nid {} ({tail} bytes) crosses a block boundary",
                inode.nid
            )));
        }
        self.copy_range(inode.data_start, tail, &format!("inline data of nid {}", inode.nid), sink)
    }

    fn stream_chunked(
        &self,
        inode: &Inode,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), ErofsError>,
    ) -> Result<(), ErofsError> {
        let nid = inode.nid;
        let format = inode.i_u & 0xffff;
        if format & !(CHUNK_FORMAT_BLKBITS_MASK | CHUNK_FORMAT_INDEXES) != 0 {
            return Err(unsupported(format!("chunk format {format:#x} of nid {nid}")));
        }
        if inode.size > MAX_SPARSE_FILE_BYTES {
            return Err(unsupported(format!(
                "chunk-based nid {nid} of {} bytes, larger than {MAX_SPARSE_FILE_BYTES}",
                inode.size
            )));
        }
        let chunkbits = self.sb.blkszbits + (format & CHUNK_FORMAT_BLKBITS_MASK);
        let chunk = 1u64 << chunkbits;
        let indexes = format & CHUNK_FORMAT_INDEXES != 0;
        let unit: u64 = if indexes { 8 } else { 4 };
        let nchunks = inode.size.div_ceil(chunk);
        let table = align_up(inode.data_start, unit)
            .ok_or_else(|| corrupt(format!("chunk table of nid {nid} out of range")))?;
        let what = format!("chunk table of nid {nid}");
        if nchunks.saturating_mul(unit) > self.len {
            return Err(corrupt(format!("{what} claims {nchunks} chunks")));
        }
        let zeros = vec![0u8; usize::try_from(chunk.min(COPY_BUFFER)).unwrap_or(0)];
        // The table is read in slices so that a large file costs bounded
        // memory.
        const BATCH: u64 = 4096;
        let mut i = 0u64;
        while i < nchunks {
            let n = (nchunks - i).min(BATCH);
            let raw = self.read_vec(table + i * unit, n * unit, &what)?;
            for (j, ent) in raw.chunks(usize::try_from(unit).unwrap_or(8)).enumerate() {
                let idx = i + j as u64;
                let lstart = idx * chunk;
                let len = (inode.size - lstart).min(chunk);
                let (blkaddr, device) =
                    if indexes { (le32(ent, 4), le16(ent, 2)) } else { (le32(ent, 0), 0) };
                if blkaddr == NULL_ADDR {
                    let mut left = len;
                    while left > 0 {
                        let n = left.min(zeros.len() as u64);
                        sink(zeros.get(..usize::try_from(n).unwrap_or(0)).unwrap_or_default())?;
                        left -= n;
                    }
                    continue;
                }
                // Without extra devices the kernel masks the device id away.
                if device != 0
                    && (self.sb.extra_devices != 0
                        || self.sb.feature_incompat & FEATURE_DEVICE_TABLE != 0)
                {
                    return Err(unsupported(format!(
                        "chunk {idx} of nid {nid} lives on extra device {device}"
                    )));
                }
                self.copy_range(
                    u64::from(blkaddr) << self.sb.blkszbits,
                    len,
                    &format!("chunk {idx} of nid {nid}"),
                    sink,
                )?;
            }
            i += n;
        }
        Ok(())
    }

    fn stream_compressed(
        &self,
        inode: &Inode,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), ErofsError>,
    ) -> Result<(), ErofsError> {
        let nid = inode.nid;
        if inode.size == 0 {
            return Ok(());
        }
        let zmap = self.zmap(inode)?;
        // Without deduplication every pcluster is read once, so a file reading
        // far more than the image holds has forged indexes pointing many
        // extents at the same large pcluster.
        let mut cache = ZState {
            blk: None,
            data: Vec::new(),
            budget: self.len.saturating_mul(4).saturating_add(MAX_PCLUSTER_BYTES),
        };
        let lcsize = 1u64 << zmap.lclusterbits;
        let mut pending: Option<Extent> = None;
        for lcn in 0..zmap.totalidx {
            let lc = self.load_lcluster(&zmap, &mut cache, lcn)?;
            if lc.ty == LcType::NonHead {
                if lcn == 0 {
                    return Err(corrupt(format!(
                        "compressed nid {nid} starts with a non-head lcluster"
                    )));
                }
                continue;
            }
            if lc.clusterofs >= lcsize || (lcn == 0 && lc.clusterofs != 0) {
                return Err(corrupt(format!(
                    "lcluster {lcn} of compressed nid {nid} has cluster offset {}",
                    lc.clusterofs
                )));
            }
            let lstart = lcn * lcsize + lc.clusterofs;
            if lstart >= inode.size {
                continue;
            }
            let next = Extent { lcn, lstart, ty: lc.ty, pblk: lc.pblk };
            if let Some(prev) = pending.replace(next) {
                self.emit_extent(inode, &zmap, &mut cache, &prev, lstart, sink)?;
            }
        }
        match pending {
            Some(last) => self.emit_extent(inode, &zmap, &mut cache, &last, inode.size, sink),
            None => Err(corrupt(format!("compressed nid {nid} has no extents"))),
        }
    }

    fn zmap(&self, inode: &Inode) -> Result<ZMap, ErofsError> {
        let nid = inode.nid;
        let hdr_pos = align_up(inode.data_start, 8)
            .ok_or_else(|| corrupt(format!("map header of nid {nid} out of range")))?;
        let mut hdr = [0u8; 8];
        self.read_at(hdr_pos, &mut hdr, &format!("map header of nid {nid}"))?;
        let advise = le16(&hdr, 4);
        let algs = hdr.get(6).copied().unwrap_or(0);
        let clusterbits = hdr.get(7).copied().unwrap_or(0);
        let refused = ADVISE_INTERLACED_PCLUSTER | ADVISE_FRAGMENT_PCLUSTER;
        if advise & refused != 0 || clusterbits & 0x80 != 0 {
            return Err(unsupported(format!(
                "compressed data of nid {nid} uses interlaced or fragment pclusters (advise {advise:#x})"
            )));
        }
        let lclusterbits = self.sb.blkszbits + u32::from(clusterbits & 7);
        let compact = inode.layout == LAYOUT_COMPRESSED_COMPACT;
        let ebase = hdr_pos + if compact { 8 } else { 16 };
        let totalidx = inode.size.div_ceil(1u64 << lclusterbits);
        // Every lcluster takes at least two bytes of index in the image.
        if totalidx.saturating_mul(2) > self.len {
            return Err(corrupt(format!(
                "compressed nid {nid} of {} bytes needs more index than the image holds",
                inode.size
            )));
        }
        let (initial_4b, compacted_2b) = if compact {
            let initial = ((32 - ebase % 32) / 4) & 7;
            let twob = if advise & ADVISE_COMPACTED_2B != 0 && initial < totalidx {
                (totalidx - initial) / 16 * 16
            } else {
                0
            };
            (initial, twob)
        } else {
            (0, 0)
        };
        let mut zmap = ZMap {
            nid,
            compact,
            advise,
            algs,
            lclusterbits,
            ebase,
            totalidx,
            initial_4b,
            compacted_2b,
            tail: None,
        };
        if advise & ADVISE_INLINE_PCLUSTER != 0 {
            // A tail-packed last pcluster sits right after the index entry
            // (or pack) of the last lcluster, within the same block.
            let last = totalidx.saturating_sub(1);
            let after = if compact {
                let (pos, shift, vcnt) = zmap.compact_pos(last)?;
                let packsize = vcnt << shift;
                pos / packsize * packsize + packsize
            } else {
                ebase + last * 8 + 8
            };
            let size = u64::from(le16(&hdr, 2));
            let blksz = self.sb.blksz();
            if size == 0 || after % blksz + size > blksz {
                return Err(corrupt(format!(
                    "inline pcluster of nid {nid} ({size} bytes at byte {after}) crosses a block boundary"
                )));
            }
            zmap.tail = Some((after, size));
        }
        Ok(zmap)
    }

    fn load_lcluster(
        &self,
        zmap: &ZMap,
        cache: &mut ZState,
        lcn: u64,
    ) -> Result<Lcluster, ErofsError> {
        let nid = zmap.nid;
        if lcn >= zmap.totalidx {
            return Err(corrupt(format!(
                "lcluster {lcn} of compressed nid {nid} past its last ({})",
                zmap.totalidx
            )));
        }
        let big = zmap.advise & (ADVISE_BIG_PCLUSTER_1 | ADVISE_BIG_PCLUSTER_2) != 0;
        if !zmap.compact {
            let pos = zmap.ebase + lcn * 8;
            let di = self.index_bytes(cache, pos, 8, nid)?;
            let ty = LcType::from_bits(le16(&di, 0));
            return match ty {
                LcType::NonHead => {
                    let d0 = u64::from(le16(&di, 4));
                    let cblks = if d0 & D0_CBLKCNT != 0 {
                        if !big {
                            return Err(corrupt(format!(
                                "lcluster {lcn} of nid {nid} has a block count without big pclusters"
                            )));
                        }
                        Some(d0 & !D0_CBLKCNT)
                    } else {
                        None
                    };
                    Ok(Lcluster { ty, clusterofs: 0, pblk: 0, cblks })
                }
                _ => Ok(Lcluster {
                    ty,
                    clusterofs: u64::from(le16(&di, 2)),
                    pblk: u64::from(le32(&di, 4)),
                    cblks: None,
                }),
            };
        }
        // Compacted indexes: a few 4-byte entries up to 32-byte alignment,
        // then 2-byte entries in packs of 16, then 4-byte entries in packs
        // of 2; each pack ends with a 32-bit block address.
        let (pos, shift, vcnt) = zmap.compact_pos(lcn)?;
        let packsize = vcnt << shift;
        let pack_start = pos / packsize * packsize;
        let pack = self.index_bytes(cache, pack_start, packsize, nid)?;
        let i = i64::try_from((pos - pack_start) >> shift).unwrap_or(0);
        let encodebits = (packsize - 4) * 8 / vcnt;
        let lobits = zmap.lclusterbits.max(12);
        let decode = |j: i64| -> (u64, LcType) {
            let bitpos = encodebits * u64::try_from(j).unwrap_or(0);
            let v =
                u64::from(le32(&pack, usize::try_from(bitpos / 8).unwrap_or(0))) >> (bitpos % 8);
            let lo = v & ((1u64 << lobits) - 1);
            (lo, LcType::from_bits((v >> lobits) as u16))
        };
        let (lo, ty) = decode(i);
        if ty == LcType::NonHead {
            let big1 = zmap.advise & ADVISE_BIG_PCLUSTER_1 != 0;
            let cblks = if lo & D0_CBLKCNT != 0 {
                if !big1 {
                    return Err(corrupt(format!(
                        "lcluster {lcn} of nid {nid} has a block count without big pclusters"
                    )));
                }
                Some(lo & !D0_CBLKCNT)
            } else {
                None
            };
            return Ok(Lcluster { ty, clusterofs: 0, pblk: 0, cblks });
        }
        // A head's physical block is the pack's base address plus the blocks
        // of the pclusters headed earlier in the same pack.
        let mut nblk: u64;
        let mut j = i;
        if zmap.advise & ADVISE_BIG_PCLUSTER_1 == 0 {
            nblk = 1;
            while j > 0 {
                j -= 1;
                let (lo, t) = decode(j);
                if t == LcType::NonHead {
                    j -= i64::try_from(lo).unwrap_or(i64::MAX);
                }
                if j >= 0 {
                    nblk += 1;
                }
            }
        } else {
            nblk = 0;
            while j > 0 {
                j -= 1;
                let (lo, t) = decode(j);
                if t == LcType::NonHead {
                    if lo & D0_CBLKCNT != 0 {
                        j -= 1;
                        nblk += lo & !D0_CBLKCNT;
                        continue;
                    }
                    if lo <= 1 {
                        return Err(corrupt(format!(
                            "lcluster {lcn} of nid {nid}: big pcluster delta {lo}"
                        )));
                    }
                    j -= i64::try_from(lo - 2).unwrap_or(i64::MAX);
                    continue;
                }
                nblk += 1;
            }
        }
        let base = u64::from(le32(&pack, usize::try_from(packsize - 4).unwrap_or(0)));
        Ok(Lcluster { ty, clusterofs: lo, pblk: base + nblk, cblks: None })
    }

    fn index_bytes(
        &self,
        cache: &mut ZState,
        pos: u64,
        len: u64,
        nid: u64,
    ) -> Result<Vec<u8>, ErofsError> {
        let what = format!("compression index of nid {nid}");
        let blk = pos >> self.sb.blkszbits;
        let blksz = self.sb.blksz();
        let off = pos - (blk << self.sb.blkszbits);
        if off + len > blksz {
            return self.read_vec(pos, len, &what);
        }
        if cache.blk != Some(blk) {
            let start = blk << self.sb.blkszbits;
            let n = blksz.min(self.len.saturating_sub(start));
            cache.data = self.read_vec(start, n, &what)?;
            cache.blk = Some(blk);
        }
        let (off, end) = (
            usize::try_from(off).unwrap_or(usize::MAX),
            usize::try_from(off + len).unwrap_or(usize::MAX),
        );
        cache.data.get(off..end).map(<[u8]>::to_vec).ok_or_else(|| {
            corrupt(format!("{what} at byte {pos} (+{len}) lies beyond the end of the image"))
        })
    }

    /// Blocks of the physical cluster headed at `lcn`: one lcluster unless
    /// big pclusters are on, in which case the next lcluster says.
    fn pcluster_blocks(
        &self,
        zmap: &ZMap,
        cache: &mut ZState,
        lcn: u64,
        ty: LcType,
    ) -> Result<u64, ErofsError> {
        let one = 1u64 << (zmap.lclusterbits - self.sb.blkszbits);
        let big = match ty {
            LcType::Head1 => zmap.advise & ADVISE_BIG_PCLUSTER_1 != 0,
            LcType::Head2 => zmap.advise & ADVISE_BIG_PCLUSTER_2 != 0,
            LcType::Plain | LcType::NonHead => false,
        };
        if !big {
            return Ok(one);
        }
        let next = self.load_lcluster(zmap, cache, lcn + 1)?;
        match (next.ty, next.cblks) {
            (LcType::NonHead, Some(n)) if n > 0 => Ok(n),
            (LcType::NonHead, _) => Err(corrupt(format!(
                "big pcluster at lcluster {lcn} of nid {} has no block count",
                zmap.nid
            ))),
            _ => Ok(one),
        }
    }

    fn emit_extent(
        &self,
        inode: &Inode,
        zmap: &ZMap,
        cache: &mut ZState,
        ext: &Extent,
        end: u64,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), ErofsError>,
    ) -> Result<(), ErofsError> {
        let nid = inode.nid;
        let len = end - ext.lstart;
        if len > MAX_EXTENT_BYTES {
            return Err(corrupt(format!(
                "extent at byte {} of nid {nid} decompresses to {len} bytes",
                ext.lstart
            )));
        }
        let what = format!("pcluster at byte {} of nid {nid}", ext.lstart);
        let (raw, plen) = match zmap.tail {
            Some((at, plen)) if end == inode.size => (self.read_vec(at, plen, &what)?, plen),
            _ => {
                let cblks = self.pcluster_blocks(zmap, cache, ext.lcn, ext.ty)?;
                let plen = cblks
                    .checked_shl(self.sb.blkszbits)
                    .filter(|&p| p <= MAX_PCLUSTER_BYTES)
                    .ok_or_else(|| corrupt(format!("{what} spans {cblks} blocks")))?;
                let paddr = ext
                    .pblk
                    .checked_shl(self.sb.blkszbits)
                    .ok_or_else(|| corrupt(format!("{what} at block {}", ext.pblk)))?;
                if plen > cache.budget {
                    return Err(corrupt(format!(
                        "compressed nid {nid} reads more pcluster data than four times the image"
                    )));
                }
                cache.budget -= plen;
                (self.read_vec(paddr, plen, &what)?, plen)
            }
        };
        let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
        if ext.ty == LcType::Plain {
            let data = raw.get(..len_usize).ok_or_else(|| {
                corrupt(format!("uncompressed {what} holds {plen} bytes, fewer than its {len}"))
            })?;
            return sink(data);
        }
        let alg = if ext.ty == LcType::Head1 { zmap.algs & 0xf } else { zmap.algs >> 4 };
        if alg != ALG_LZ4 {
            return Err(unsupported(format!(
                "compressed data of nid {nid} uses algorithm {alg}; only lz4 is supported"
            )));
        }
        let zero_padding = self.sb.feature_incompat & FEATURE_ZERO_PADDING != 0;
        let src = if zero_padding {
            // The stream is aligned to the end of the pcluster; mkfs pads
            // the front with nuls, which never exceed the first block.
            let first = usize::try_from(self.sb.blksz().min(plen)).unwrap_or(0);
            let skip = raw
                .iter()
                .take(first)
                .position(|&b| b != 0)
                .ok_or_else(|| corrupt(format!("{what} starts with a block of nuls")))?;
            raw.get(skip..).unwrap_or_default()
        } else {
            raw.as_slice()
        };
        let data = lz4_decompress(src, len_usize, zero_padding)
            .map_err(|why| corrupt(format!("lz4 {what}: {why}")))?;
        sink(&data)
    }
}

#[derive(Debug)]
struct ZMap {
    nid: u64,
    compact: bool,
    advise: u16,
    algs: u8,
    lclusterbits: u32,
    /// First byte of the index array.
    ebase: u64,
    totalidx: u64,
    initial_4b: u64,
    compacted_2b: u64,
    /// Position and size of a tail-packed last pcluster.
    tail: Option<(u64, u64)>,
}

impl ZMap {
    /// Byte position, entry size shift and pack entry count of a compacted
    /// index: a few 4-byte entries up to 32-byte alignment, then 2-byte
    /// entries in packs of 16, then 4-byte entries in packs of 2; each pack
    /// ends with a 32-bit block address.
    fn compact_pos(&self, lcn: u64) -> Result<(u64, u32, u64), ErofsError> {
        let (pos, shift) = if lcn < self.initial_4b {
            (self.ebase + lcn * 4, 2)
        } else if lcn - self.initial_4b < self.compacted_2b {
            (self.ebase + self.initial_4b * 4 + (lcn - self.initial_4b) * 2, 1)
        } else {
            (
                self.ebase
                    + self.initial_4b * 4
                    + self.compacted_2b * 2
                    + (lcn - self.initial_4b - self.compacted_2b) * 4,
                2,
            )
        };
        let (vcnt, max_bits) = if shift == 2 { (2, 14) } else { (16, 12) };
        if self.lclusterbits > max_bits {
            return Err(unsupported(format!(
                "compacted {}-byte indexes of nid {} with lcluster bits {}",
                1 << shift,
                self.nid,
                self.lclusterbits
            )));
        }
        Ok((pos, shift, vcnt))
    }
}

/// State of one compressed-file read: the index block last read, and how
/// many more pcluster bytes may be read.
#[derive(Debug)]
struct ZState {
    blk: Option<u64>,
    data: Vec<u8>,
    budget: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LcType {
    /// Head of an uncompressed physical cluster.
    Plain,
    /// Head of a pcluster compressed with the first algorithm.
    Head1,
    NonHead,
    /// Head of a pcluster compressed with the second algorithm.
    Head2,
}

impl LcType {
    fn from_bits(v: u16) -> LcType {
        match v & 3 {
            0 => LcType::Plain,
            1 => LcType::Head1,
            2 => LcType::NonHead,
            _ => LcType::Head2,
        }
    }
}

#[derive(Debug)]
struct Lcluster {
    ty: LcType,
    /// Offset of the head within the lcluster (heads only).
    clusterofs: u64,
    /// Physical block of the pcluster (heads only).
    pblk: u64,
    /// Compressed block count carried by the first non-head of a big
    /// pcluster.
    cblks: Option<u64>,
}

#[derive(Debug)]
struct Extent {
    lcn: u64,
    lstart: u64,
    ty: LcType,
    pblk: u64,
}

/// Linux `new_encode_dev` as stored in `i_u` of device inodes.
fn decode_dev(rdev: u32) -> (u32, u32) {
    let major = (rdev & 0xf_ff00) >> 8;
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xf_ff00);
    (major, minor)
}

/// Decodes an LZ4 block into exactly `want` bytes. With `exact`, the stream
/// must end there (zero-padded images place it at the pcluster's end);
/// otherwise decoding stops once `want` bytes are out and trailing input is
/// ignored, as the stream is followed by padding or covers more than needed.
fn lz4_decompress(src: &[u8], want: usize, exact: bool) -> Result<Vec<u8>, String> {
    fn ext_len(src: &[u8], ip: &mut usize, mut len: usize) -> Result<usize, String> {
        loop {
            let b = *src.get(*ip).ok_or("length runs past the input")?;
            *ip += 1;
            len = len.checked_add(usize::from(b)).ok_or("length overflows")?;
            if b != 255 {
                return Ok(len);
            }
        }
    }
    let mut out: Vec<u8> = Vec::with_capacity(want);
    let mut ip = 0usize;
    loop {
        let token = *src
            .get(ip)
            .ok_or_else(|| format!("input ends after {} of {want} bytes", out.len()))?;
        ip += 1;
        let mut lit = usize::from(token >> 4);
        if lit == 15 {
            lit = ext_len(src, &mut ip, lit)?;
        }
        let lit_end = ip.checked_add(lit).ok_or("literal length overflows")?;
        let lits = src.get(ip..lit_end).ok_or("literals run past the input")?;
        let room = want - out.len();
        if lits.len() > room {
            if exact {
                return Err(format!("output exceeds the expected {want} bytes"));
            }
            out.extend_from_slice(lits.get(..room).unwrap_or_default());
            return Ok(out);
        }
        out.extend_from_slice(lits);
        ip = lit_end;
        if ip == src.len() {
            if out.len() != want {
                return Err(format!("stream ends after {} of {want} bytes", out.len()));
            }
            return Ok(out);
        }
        if out.len() == want && !exact {
            return Ok(out);
        }
        let offset = usize::from(le16(src, ip));
        if src.len() - ip < 2 {
            return Err("match offset runs past the input".to_string());
        }
        ip += 2;
        if offset == 0 || offset > out.len() {
            return Err(format!("match offset {offset} with {} bytes decoded", out.len()));
        }
        let mut mlen = usize::from(token & 15);
        if mlen == 15 {
            mlen = ext_len(src, &mut ip, mlen)?;
        }
        mlen = mlen.checked_add(4).ok_or("match length overflows")?;
        let room = want - out.len();
        if mlen > room {
            if exact {
                return Err(format!("output exceeds the expected {want} bytes"));
            }
            mlen = room;
        }
        // The source may overlap what is being written; copying the
        // already-periodic prefix doubles the copyable span each round.
        let start = out.len() - offset;
        let mut left = mlen;
        while left > 0 {
            let n = left.min(out.len() - start);
            out.extend_from_within(start..start + n);
            left -= n;
        }
        if out.len() == want && !exact {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

    use super::*;
    use std::collections::{BTreeMap, HashMap};
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::PathBuf;
    use std::process::Command;

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            // xorshift64*: deterministic and good enough to defeat lz4
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| (self.next() >> 32) as u8).collect()
        }
    }

    fn is_root() -> bool {
        fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
    }

    fn run(cmd: &mut Command) {
        let out = cmd.output().expect("running a command (is erofs-utils installed?)");
        assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn mkfs(dir: &Path, img: &Path, opts: &[&str]) {
        run(Command::new("mkfs.erofs").arg("--quiet").args(opts).arg(img).arg(dir));
    }

    fn compressible(n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n);
        let mut i = 0u64;
        while v.len() < n {
            if i.is_multiple_of(97) {
                v.extend(std::iter::repeat_n(0u8, 5000));
            }
            v.extend_from_slice(format!("line {i} of a rather compressible file\n").as_bytes());
            i += 1;
        }
        v.truncate(n);
        v
    }

    fn set_mode(p: &Path, mode: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// The tree of the brief: every kind of inode, odd modes and ids, hard
    /// links, long names and targets, deep nesting and a large directory.
    fn build_tree(root: &Path) {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let w = |p: &str, data: &[u8]| fs::write(root.join(p), data).unwrap();
        w("empty", b"");
        w("one", b"x");
        w("f4095", &rng.bytes(4095));
        w("f4097", &rng.bytes(4097));
        w("big-compressible", &compressible(3 * 1024 * 1024 + 123));
        w("random-1m", &rng.bytes(1024 * 1024));
        let mut mixed = compressible(200_000);
        mixed.extend(rng.bytes(300_000));
        mixed.extend(compressible(150_001));
        w("mixed", &mixed);
        w("setuid", b"#!/bin/sh\n");
        set_mode(&root.join("setuid"), 0o4755);
        fs::create_dir(root.join("setgid-dir")).unwrap();
        set_mode(&root.join("setgid-dir"), 0o2755);
        w("setgid-dir/file", b"in setgid dir");
        fs::create_dir(root.join("sticky")).unwrap();
        set_mode(&root.join("sticky"), 0o1777);
        w("bigids", b"owned by large ids");
        w("smallids", b"owned by 1000");
        w("hard-a", &compressible(10_000));
        fs::hard_link(root.join("hard-a"), root.join("hard-b")).unwrap();
        std::os::unix::fs::symlink("one", root.join("short-link")).unwrap();
        let long: String = "long-target-component/".repeat(12) + "end";
        assert!(long.len() > 200);
        std::os::unix::fs::symlink(&long, root.join("long-link")).unwrap();
        run(Command::new("mkfifo").arg(root.join("fifo")));
        if is_root() {
            std::os::unix::fs::chown(root.join("bigids"), Some(70000), Some(70000)).unwrap();
            std::os::unix::fs::chown(root.join("smallids"), Some(1000), Some(1000)).unwrap();
            std::os::unix::fs::lchown(root.join("short-link"), Some(70001), Some(1000)).unwrap();
            run(Command::new("mknod").arg(root.join("chr")).args(["c", "1", "3"]));
            run(Command::new("mknod").arg(root.join("blk")).args(["b", "259", "300000"]));
        }
        let many = root.join("many");
        fs::create_dir(&many).unwrap();
        for i in 0..5000 {
            let name = format!("entry-with-a-longish-name-{i:05}");
            if i % 500 == 0 {
                fs::write(many.join(&name), format!("file {i}")).unwrap();
            } else {
                fs::write(many.join(&name), b"").unwrap();
            }
        }
        let mut deep = root.to_path_buf();
        for i in 0..10 {
            deep.push(format!("level{i}"));
        }
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("bottom"), b"at the bottom").unwrap();
        w("héllo-wörld-日本語.txt", "non-ascii name".as_bytes());
    }

    fn walk_source(root: &Path, dir: &Path, out: &mut BTreeMap<String, PathBuf>) {
        for de in fs::read_dir(dir).unwrap() {
            let p = de.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            let is_dir = fs::symlink_metadata(&p).unwrap().is_dir();
            out.insert(rel, p.clone());
            if is_dir {
                walk_source(root, &p, out);
            }
        }
    }

    fn expected_kind(m: &fs::Metadata) -> EntryKind {
        crate::reader::kind_of(m.file_type()).expect("unexpected source file type")
    }

    fn check_entry(e: &FsEntry, src: &Path) {
        let m = fs::symlink_metadata(src).unwrap();
        let kind = expected_kind(&m);
        assert_eq!(e.kind, kind, "{}", e.path);
        assert_eq!(e.mode, m.mode() & 0o7777, "{}", e.path);
        assert_eq!(e.uid, u64::from(m.uid()), "{}", e.path);
        assert_eq!(e.gid, u64::from(m.gid()), "{}", e.path);
        assert_eq!(u64::from(e.nlink), m.nlink(), "{}", e.path);
        match kind {
            EntryKind::File => assert_eq!(e.size, m.len(), "{}", e.path),
            EntryKind::Symlink => {
                let target = fs::read_link(src).unwrap();
                assert_eq!(e.link_target.as_deref(), target.to_str(), "{}", e.path);
                assert_eq!(e.size, m.len(), "{}", e.path);
            }
            _ => {
                assert_eq!(e.size, 0, "{}", e.path);
                assert_eq!(e.link_target, None, "{}", e.path);
            }
        }
        if matches!(kind, EntryKind::CharDevice | EntryKind::BlockDevice) {
            let rdev = m.rdev();
            let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
            let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
            assert_eq!(e.device, Some((major as u32, minor as u32)), "{}", e.path);
        } else {
            assert_eq!(e.device, None, "{}", e.path);
        }
    }

    /// Checks metadata of every entry and content of every file; returns how
    /// many regular files were compressed.
    fn check_image(img: &Path, root: &Path) -> usize {
        let image = ErofsImage::open(img).unwrap();
        let entries = image.entries().unwrap();
        let mut source = BTreeMap::new();
        walk_source(root, root, &mut source);

        let got: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        let mut sorted = got.clone();
        sorted.sort_unstable();
        let want: Vec<&str> = source.keys().map(String::as_str).collect();
        assert_eq!(sorted, want, "paths of {}", img.display());

        // Parents come before children.
        let mut seen = HashSet::new();
        for e in &entries {
            if let Some((parent, _)) = e.path.rsplit_once('/') {
                assert!(seen.contains(parent), "{} listed before its parent", e.path);
            }
            seen.insert(e.path.as_str());
        }

        let r = image.root().unwrap();
        assert_eq!(r.path, "");
        assert_eq!(r.kind, EntryKind::Dir);
        let rm = fs::metadata(root).unwrap();
        assert_eq!(r.mode, rm.mode() & 0o7777);
        assert_eq!(u64::from(r.nlink), rm.nlink());

        // Hard links share the node id exactly when they share the inode.
        let mut by_src: HashMap<u64, u64> = HashMap::new();
        let mut by_nid: HashMap<u64, u64> = HashMap::new();
        let mut compressed = 0;
        for e in &entries {
            let src = &source[&e.path];
            check_entry(e, src);
            let sino = fs::symlink_metadata(src).unwrap().ino();
            assert_eq!(*by_src.entry(sino).or_insert(e.ino), e.ino, "{}", e.path);
            assert_eq!(*by_nid.entry(e.ino).or_insert(sino), sino, "{}", e.path);
            if e.kind == EntryKind::File {
                if image.is_compressed(e.ino).unwrap() {
                    compressed += 1;
                }
                let mut buf = Vec::new();
                let n = image.read_file(e.ino, &mut buf).unwrap();
                assert_eq!(n, e.size, "{}", e.path);
                assert!(buf == fs::read(src).unwrap(), "content of {}", e.path);
            }
        }
        assert_eq!(by_src[&fs::metadata(root.join("hard-a")).unwrap().ino()], {
            entries.iter().find(|e| e.path == "hard-b").unwrap().ino
        });
        compressed
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        work: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        let work = dir.path().join("images");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&work).unwrap();
        build_tree(&root);
        Fixture { _dir: dir, root, work }
    }

    #[test]
    fn erofs_uncompressed_layouts_match_source() {
        let f = fixture();
        for (name, opts) in [
            ("plain", &[][..]),
            ("noinline", &["-Enoinline_data"][..]),
            ("extended", &["-Eforce-inode-extended"][..]),
            ("chunk-index", &["--chunksize=4096"][..]),
            ("chunk-map", &["--chunksize=8192", "-Eforce-inode-blockmap"][..]),
        ] {
            let img = f.work.join(format!("{name}.img"));
            mkfs(&f.root, &img, opts);
            assert_eq!(check_image(&img, &f.root), 0, "{name}");
        }
        // Compact inodes hold 16-bit ids only, so mkfs refuses the large ones.
        if is_root() {
            std::os::unix::fs::chown(f.root.join("bigids"), Some(65535), Some(65534)).unwrap();
            std::os::unix::fs::lchown(f.root.join("short-link"), Some(1), Some(1)).unwrap();
        }
        let img = f.work.join("compact.img");
        mkfs(&f.root, &img, &["-Eforce-inode-compact"]);
        assert_eq!(check_image(&img, &f.root), 0, "compact");
    }

    #[test]
    fn erofs_compressed_layouts_match_source() {
        let f = fixture();
        for (name, opts) in [
            ("lz4", &["-zlz4"][..]),
            ("lz4hc", &["-zlz4hc"][..]),
            ("lz4hc-12-big", &["-zlz4hc,12", "-C65536"][..]),
            ("lz4-legacy", &["-zlz4", "-Elegacy-compress"][..]),
            ("lz4-legacy-big", &["-zlz4", "-Elegacy-compress", "-C16384"][..]),
            ("lz4-ztail", &["-zlz4", "-Eztailpacking"][..]),
            ("lz4hc-ztail-big", &["-zlz4hc,12", "-C65536", "-Eztailpacking"][..]),
            ("lz4-ztail-legacy", &["-zlz4", "-Eztailpacking", "-Elegacy-compress"][..]),
        ] {
            let img = f.work.join(format!("{name}.img"));
            mkfs(&f.root, &img, opts);
            let compressed = check_image(&img, &f.root);
            assert!(compressed >= 3, "{name}: only {compressed} compressed files");
        }
    }

    fn small_tree(root: &Path) {
        fs::create_dir(root).unwrap();
        fs::write(root.join("a"), compressible(70_000)).unwrap();
        fs::write(root.join("b"), b"tiny").unwrap();
        fs::create_dir(root.join("sub")).unwrap();
        fs::write(root.join("sub/c"), compressible(5000)).unwrap();
        std::os::unix::fs::symlink("../a", root.join("sub/link")).unwrap();
    }

    #[test]
    fn erofs_refuses_non_erofs_and_truncated_images() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        small_tree(&root);
        let img = dir.path().join("img");
        mkfs(&root, &img, &["-zlz4"]);
        let bytes = fs::read(&img).unwrap();

        let cut = dir.path().join("cut");
        for len in [0, 1000, 1100, 4096, bytes.len() / 2, bytes.len() - 1] {
            fs::write(&cut, &bytes[..len]).unwrap();
            let err = ErofsImage::open(&cut).unwrap_err();
            if len < 1152 {
                assert!(matches!(err, ErofsError::NotErofs(_)), "{len}: {err}");
            } else {
                assert!(matches!(err, ErofsError::Corrupt(_)), "{len}: {err}");
            }
        }

        let mut bad = bytes.clone();
        bad[1024] ^= 0xff;
        fs::write(&cut, &bad).unwrap();
        assert!(matches!(ErofsImage::open(&cut).unwrap_err(), ErofsError::NotErofs(_)));
        assert!(matches!(
            ErofsImage::open(&dir.path().join("missing")).unwrap_err(),
            ErofsError::Io { .. }
        ));
    }

    #[test]
    fn erofs_directory_cycle_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        fs::create_dir(&root).unwrap();
        fs::create_dir(root.join("sub")).unwrap();
        fs::write(root.join("sub/f"), b"x").unwrap();
        let img = dir.path().join("img");
        mkfs(&root, &img, &[]);
        let image = ErofsImage::open(&img).unwrap();
        let sub = image.entries().unwrap()[0].clone();
        assert_eq!(sub.path, "sub");
        let root_nid = image.sb.root_nid;
        drop(image);

        // The root's third dirent is "sub": name offset 3 * 12 + 1 + 2.
        let mut bytes = fs::read(&img).unwrap();
        let mut pattern = sub.ino.to_le_bytes().to_vec();
        pattern.extend_from_slice(&39u16.to_le_bytes());
        pattern.push(2);
        let at = bytes.windows(pattern.len()).position(|w| w == pattern).expect("dirent of sub");
        bytes[at..at + 8].copy_from_slice(&root_nid.to_le_bytes());
        fs::write(&img, &bytes).unwrap();
        let err = ErofsImage::open(&img).unwrap().entries().unwrap_err();
        assert!(matches!(err, ErofsError::Corrupt(_)), "{err}");
    }

    #[test]
    fn erofs_socket_is_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        fs::create_dir_all(root.join("sub")).unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(root.join("sub/sock")).unwrap();
        let img = dir.path().join("img");
        mkfs(&root, &img, &[]);
        let err = ErofsImage::open(&img).unwrap().entries().unwrap_err();
        assert!(
            matches!(&err, ErofsError::Unsupported(msg) if msg.contains("socket at sub/sock")),
            "{err}"
        );
    }

    fn exercise(img: &Path) {
        let Ok(image) = ErofsImage::open(img) else {
            return;
        };
        let _ = image.root();
        if let Ok(entries) = image.entries() {
            for e in entries {
                if e.kind == EntryKind::File {
                    let _ = image.is_compressed(e.ino);
                    let _ = image.read_file(e.ino, &mut std::io::sink());
                }
            }
        }
    }

    #[test]
    fn erofs_random_corruption_never_panics() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        small_tree(&root);
        for opts in [
            &[][..],
            &["-zlz4"][..],
            &["-zlz4hc", "-Elegacy-compress", "-C16384"][..],
            &["-zlz4", "-Eztailpacking"][..],
        ] {
            let img = dir.path().join("img");
            mkfs(&root, &img, opts);
            let bytes = fs::read(&img).unwrap();
            let bad_img = dir.path().join("bad");
            for seed in 1..=150u64 {
                let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
                let mut bad = bytes.clone();
                let flips = 1 + rng.next() % 8;
                for _ in 0..flips {
                    // Metadata sits in the first blocks of these small
                    // images, so aim there most of the time.
                    let span = if rng.next().is_multiple_of(4) {
                        bad.len()
                    } else {
                        bad.len().min(3 * 4096)
                    };
                    let at = 1024 + (rng.next() as usize) % (span - 1024);
                    bad[at] = rng.next() as u8;
                }
                fs::write(&bad_img, &bad).unwrap();
                exercise(&bad_img);
            }
        }
    }

    #[test]
    fn erofs_lz4_decoder() {
        // token 0x40: four literals, then end of input
        assert_eq!(lz4_decompress(b"\x40abcd", 4, true).unwrap(), b"abcd");
        // one literal then a match of offset 1, length 4 + 15 + 1, then the
        // final literals
        let stream = b"\x1fa\x01\x00\x01\x10b";
        let out = lz4_decompress(stream, 1 + 20 + 1, true).unwrap();
        assert_eq!(out, [&[b'a'; 21][..], b"b"].concat());
        assert!(lz4_decompress(stream, 30, true).is_err());
        assert!(lz4_decompress(stream, 10, true).is_err());
        assert_eq!(lz4_decompress(stream, 10, false).unwrap(), vec![b'a'; 10]);
        assert!(lz4_decompress(b"\x1fa\x02\x00\x01\x10b", 22, true).is_err());
        assert!(lz4_decompress(b"\x1fa\x00\x00\x01\x10b", 22, true).is_err());
        assert!(lz4_decompress(b"\xf0\xff\xff", 100, false).is_err());
        assert!(lz4_decompress(b"", 1, false).is_err());
    }

    #[test]
    fn erofs_dev_decoding() {
        assert_eq!(decode_dev((1 << 8) | 3), (1, 3));
        let (major, minor) = (259u32, 300_000u32);
        let enc = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
        assert_eq!(decode_dev(enc), (major, minor));
    }
}
