//! What the filesystem writers take: the nodes of an image, each checked
//! the same way whatever format is written, and what both formats share
//! of Linux's file types.

use provd_domain::image::{EntryKind, Hash};

/// Longest name of one path component.
pub(crate) const NAME_MAX: usize = 255;
/// Longest symlink target.
pub(crate) const SYMLINK_MAX: usize = 4095;
/// Largest device numbers either format encodes.
pub(crate) const MAX_MAJOR: u32 = 0xfff;
pub(crate) const MAX_MINOR: u32 = 0xf_ffff;

/// Directory entry file types (the same numbers in ext4 and EROFS).
pub(crate) const FT_REG_FILE: u8 = 1;
pub(crate) const FT_DIR: u8 = 2;
pub(crate) const FT_CHRDEV: u8 = 3;
pub(crate) const FT_BLKDEV: u8 = 4;
pub(crate) const FT_FIFO: u8 = 5;
pub(crate) const FT_SYMLINK: u8 = 7;

/// The file type bits of an inode's mode.
pub(crate) const S_IFIFO: u16 = 0o010_000;
pub(crate) const S_IFCHR: u16 = 0o020_000;
pub(crate) const S_IFDIR: u16 = 0o040_000;
pub(crate) const S_IFBLK: u16 = 0o060_000;
pub(crate) const S_IFREG: u16 = 0o100_000;
pub(crate) const S_IFLNK: u16 = 0o120_000;

/// Where a regular file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Bytes(Vec<u8>),
    Object(Hash),
}

/// One entry of the image to write.
#[derive(Debug, Clone)]
pub struct Node {
    /// Relative path, '/'-separated, no leading '/', no empty/"."/".."
    /// components. Not the root.
    pub path: String,
    /// File, Dir, Symlink, CharDevice, BlockDevice or Fifo (Hardlink is
    /// refused: use `inode`).
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky; bits beyond
    /// `0o7777` are ignored.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    /// Regular files: content length; must equal what `open`/Bytes yields.
    /// Ignored for other kinds.
    pub size: u64,
    /// Regular files only (`None` is allowed for an empty file).
    pub content: Option<Content>,
    /// Symlinks only.
    pub link_target: Option<String>,
    /// Char/block devices only: (major, minor).
    pub device: Option<(u32, u32)>,
    /// Regular files (or character devices, such as overlay whiteouts)
    /// with the same `Some(key)` are hard links to one inode (metadata and
    /// content taken from the first; nlink = number of names). Refused on
    /// other kinds, and across kinds.
    pub inode: Option<u64>,
}

/// Why a node cannot be written, in any format.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// a node cannot be written
    #[error("invalid node {path:?}: {reason}")]
    Invalid { path: String, reason: String },
    /// a file's content does not have the size its node states
    #[error("content of {path:?} is {got} bytes, not the {expected} its node states")]
    ContentMismatch { path: String, expected: u64, got: u64 },
}

fn invalid(path: &str, reason: impl Into<String>) -> NodeError {
    NodeError::Invalid { path: path.to_string(), reason: reason.into() }
}

pub(crate) fn check_path(path: &str) -> Result<(), NodeError> {
    if path.is_empty() {
        return Err(invalid(path, "the root cannot be given as a node"));
    }
    for c in path.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return Err(invalid(path, format!("path component {c:?} is not allowed")));
        }
        if c.len() > NAME_MAX {
            return Err(invalid(
                path,
                format!("name of {} bytes is longer than {NAME_MAX}", c.len()),
            ));
        }
        if c.contains('\0') {
            return Err(invalid(path, "name contains a nul byte"));
        }
    }
    Ok(())
}

/// Checks what can be checked of one node on its own.
pub(crate) fn check_node(n: &Node) -> Result<(), NodeError> {
    let path = n.path.as_str();
    check_path(path)?;
    if n.kind == EntryKind::Hardlink {
        return Err(invalid(path, "hard links are given as files sharing an `inode` key"));
    }
    let is_file = n.kind == EntryKind::File;
    let is_link = n.kind == EntryKind::Symlink;
    let is_dev = matches!(n.kind, EntryKind::CharDevice | EntryKind::BlockDevice);
    if n.content.is_some() && !is_file {
        return Err(invalid(path, format!("a {} has no content", n.kind.as_str())));
    }
    if n.link_target.is_some() && !is_link {
        return Err(invalid(path, format!("a {} has no link target", n.kind.as_str())));
    }
    if n.device.is_some() && !is_dev {
        return Err(invalid(path, format!("a {} has no device numbers", n.kind.as_str())));
    }
    if n.inode.is_some() && !is_file && n.kind != EntryKind::CharDevice {
        return Err(invalid(
            path,
            format!(
                "a {} cannot be hard-linked; only regular files and character devices can",
                n.kind.as_str()
            ),
        ));
    }
    if is_file {
        match &n.content {
            None if n.size > 0 => {
                return Err(invalid(path, format!("a file of {} bytes has no content", n.size)));
            }
            Some(Content::Bytes(b)) if b.len() as u64 != n.size => {
                return Err(NodeError::ContentMismatch {
                    path: path.to_string(),
                    expected: n.size,
                    got: b.len() as u64,
                });
            }
            _ => {}
        }
    }
    if is_link {
        let target = n.link_target.as_deref().unwrap_or_default();
        if target.is_empty() {
            return Err(invalid(path, "a symlink needs a non-empty target"));
        }
        if target.len() > SYMLINK_MAX {
            return Err(invalid(
                path,
                format!("symlink target of {} bytes is longer than {SYMLINK_MAX}", target.len()),
            ));
        }
        if target.contains('\0') {
            return Err(invalid(path, "symlink target contains a nul byte"));
        }
    }
    if is_dev {
        match n.device {
            None => return Err(invalid(path, "a device needs its major and minor numbers")),
            Some((major, minor)) if major > MAX_MAJOR || minor > MAX_MINOR => {
                return Err(invalid(
                    path,
                    format!(
                        "device {major}:{minor} does not fit (major at most {MAX_MAJOR}, minor at most {MAX_MINOR})"
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

pub(crate) fn file_name(path: &str) -> &[u8] {
    path.rsplit_once('/').map_or(path, |(_, name)| name).as_bytes()
}

/// Little-endian fields in a buffer laid out in full beforehand: an offset
/// past the end writes nothing (every caller's offsets are constants within
/// its buffer, checked by the image readers in the tests).
pub(crate) fn put16(b: &mut [u8], at: usize, v: u16) {
    put_bytes(b, at, &v.to_le_bytes());
}

pub(crate) fn put32(b: &mut [u8], at: usize, v: u32) {
    put_bytes(b, at, &v.to_le_bytes());
}

pub(crate) fn put64(b: &mut [u8], at: usize, v: u64) {
    put_bytes(b, at, &v.to_le_bytes());
}

pub(crate) fn put_bytes(b: &mut [u8], at: usize, v: &[u8]) {
    if let Some(s) = b.get_mut(at..at + v.len()) {
        s.copy_from_slice(v);
    }
}

/// The nodes of an image by path, and the directories a writer has created
/// so far, by their index in its inode list: what both writers need to
/// build their tree the same way (missing ancestors created `0755 root`,
/// time 0; a parent that is not a directory refused by name).
pub(crate) struct Dirs<'a> {
    by_path: std::collections::HashMap<&'a str, &'a Node>,
    index: std::collections::HashMap<&'a str, usize>,
}

impl<'a> Dirs<'a> {
    /// Checks every node (`check_node`, no path twice) and indexes them;
    /// the root is index 0.
    pub(crate) fn new(nodes: &'a [Node]) -> Result<Dirs<'a>, NodeError> {
        let mut by_path = std::collections::HashMap::with_capacity(nodes.len());
        let mut kinds = std::collections::HashMap::new();
        for n in nodes {
            check_node(n)?;
            if by_path.insert(n.path.as_str(), n).is_some() {
                return Err(invalid(&n.path, "the path is given twice"));
            }
            if let Some(key) = n.inode
                && *kinds.entry(key).or_insert(n.kind) != n.kind
            {
                return Err(invalid(&n.path, "hard-linked to an entry of another kind"));
            }
        }
        Ok(Dirs { by_path, index: std::collections::HashMap::from([("", 0)]) })
    }

    /// The node at `path`, if the image gives one.
    pub(crate) fn node(&self, path: &str) -> Option<&'a Node> {
        self.by_path.get(path).copied()
    }

    /// Records that directory `path` is the writer's inode `index`.
    pub(crate) fn insert(&mut self, path: &'a str, index: usize) {
        self.index.insert(path, index);
    }

    /// The index of directory `dir`, creating it and its missing ancestors,
    /// parents first, with `create(path, its node if the image gives one,
    /// parent index)`. `for_path` is the node that needs it, named when an
    /// ancestor is not a directory.
    pub(crate) fn ensure<E: From<NodeError>>(
        &mut self,
        dir: &'a str,
        for_path: &str,
        mut create: impl FnMut(&'a str, Option<&'a Node>, usize) -> Result<usize, E>,
    ) -> Result<usize, E> {
        if let Some(&i) = self.index.get(dir) {
            return Ok(i);
        }
        let ends = dir.match_indices('/').map(|(i, _)| i).chain(std::iter::once(dir.len()));
        let mut parent = 0;
        for end in ends {
            let prefix = dir.get(..end).ok_or_else(|| invalid(dir, "path prefix out of range"))?;
            if let Some(&i) = self.index.get(prefix) {
                parent = i;
                continue;
            }
            let node = match self.by_path.get(prefix) {
                Some(n) if n.kind == EntryKind::Dir => Some(*n),
                Some(n) => {
                    return Err(invalid(
                        for_path,
                        format!("its parent {prefix:?} is a {}, not a directory", n.kind.as_str()),
                    )
                    .into());
                }
                None => None,
            };
            let i = create(prefix, node, parent)?;
            self.index.insert(prefix, i);
            parent = i;
        }
        Ok(parent)
    }
}
