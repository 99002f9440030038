//! Space accounting: what a build allocates, what it may take of the
//! caller's quota and the node's disk, and how large its images are made.

use provd_store::Store;

use crate::{BuildOptions, PartitionError};

/// Bytes allocated to a file or, for a directory, to everything under it
/// (each inode once).
pub(crate) fn allocated(path: &std::path::Path) -> Result<(u64, u64), PartitionError> {
    use std::os::unix::fs::MetadataExt;
    let io = |e| PartitionError::Io { what: format!("measuring {}", path.display()), source: e };
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    if !meta.is_dir() {
        return Ok((meta.blocks() * 512, meta.len()));
    }
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let m = entry.metadata().map_err(io)?;
            if seen.insert(m.ino()) {
                total += m.blocks() * 512;
            }
            if m.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((total, total))
}

pub(crate) fn check_room(
    store: &Store,
    what: &str,
    needed: u64,
    apparent: u64,
    opts: &BuildOptions,
) -> Result<(), PartitionError> {
    if apparent > opts.quota_bytes {
        return Err(PartitionError::QuotaExceeded {
            what: what.to_string(),
            needed: apparent,
            quota: opts.quota_bytes,
        });
    }
    let free = store.free_bytes()?.saturating_sub(store.min_free_bytes);
    if needed > free {
        return Err(PartitionError::DiskFull { what: what.to_string(), needed, free });
    }
    Ok(())
}

/// Inodes of a private partition holding `staged` inodes: room for the
/// files the guest will create.
pub(crate) fn private_inodes(staged: u64) -> u64 {
    staged.saturating_mul(2).max(staged.saturating_add(16384))
}

/// Size of a writable ext4 for `data_blocks` of content and `inodes`
/// inodes (256 bytes each), with mke2fs's journal (at most 64 MiB below
/// 16 GiB, 256 MiB above).
pub(crate) fn private_bytes(data_blocks: u64, inodes: u64) -> u64 {
    let base = ext4_bytes(data_blocks, inodes);
    let journal: u64 = if base > (16 << 30) { 256 << 20 } else { 64 << 20 };
    base.saturating_add(journal)
}

/// ext4 image size for `data_blocks` of content in `inodes` inodes, with
/// room for the filesystem's own metadata.
pub(crate) fn ext4_bytes(data_blocks: u64, inodes: u64) -> u64 {
    let data = data_blocks.saturating_mul(4096);
    let size = data
        .saturating_add(data / 16)
        .saturating_add(inodes.saturating_mul(256 + 64))
        .saturating_add(32 << 20);
    size.checked_next_multiple_of(4 << 20).unwrap_or(size)
}
