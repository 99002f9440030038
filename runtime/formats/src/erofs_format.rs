//! EROFS on-disk constants shared by the reader and the writer, as the
//! Linux kernel's `fs/erofs/erofs_fs.h` defines them.

/// The superblock's offset in the image, and its size.
pub(crate) const SUPERBLOCK_OFFSET: u64 = 1024;
pub(crate) const SUPERBLOCK_SIZE: usize = 128;
pub(crate) const MAGIC: u32 = 0xE0F5_E1E2;
/// A node id counts 32-byte slots of the metadata area.
pub(crate) const ISLOT_SIZE: u64 = 32;
pub(crate) const COMPACT_INODE_SIZE: u64 = 32;
pub(crate) const EXTENDED_INODE_SIZE: u64 = 64;
pub(crate) const DIRENT_SIZE: usize = 12;
/// The block address of data that has no block (an inline-only tail).
pub(crate) const NULL_ADDR: u32 = u32::MAX;
pub(crate) const LAYOUT_FLAT_PLAIN: u8 = 0;
pub(crate) const LAYOUT_FLAT_INLINE: u8 = 2;
