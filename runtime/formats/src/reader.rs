//! What the filesystem readers report: every inode reachable from the root,
//! read from the image file itself, never from a mount or an extraction.

use provd_domain::image::EntryKind;

/// One directory entry of a filesystem image and the inode it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsEntry {
    /// Relative path, `/`-separated, no leading `/`; the root is not listed.
    pub path: String,
    /// Never [`EntryKind::Hardlink`]: hard links show as entries sharing `ino`.
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Bytes of a regular file's content (0 for others but symlinks, whose
    /// size is the target's length).
    pub size: u64,
    /// Inode number (ext4) or node id (EROFS): equal for hard links.
    pub ino: u64,
    pub nlink: u32,
    /// Target of a symlink.
    pub link_target: Option<String>,
    /// Major and minor of a character or block device.
    pub device: Option<(u32, u32)>,
}

/// The entry kind of a file on the node (sockets and the like: `None`).
pub fn kind_of(t: std::fs::FileType) -> Option<EntryKind> {
    use std::os::unix::fs::FileTypeExt;
    Some(if t.is_file() {
        EntryKind::File
    } else if t.is_dir() {
        EntryKind::Dir
    } else if t.is_symlink() {
        EntryKind::Symlink
    } else if t.is_char_device() {
        EntryKind::CharDevice
    } else if t.is_block_device() {
        EntryKind::BlockDevice
    } else if t.is_fifo() {
        EntryKind::Fifo
    } else {
        return None;
    })
}
