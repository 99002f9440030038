//! A staging tree: image entries written into a build directory with their
//! exact type, ownership and permissions, ready for a filesystem builder.
//!
//! File contents come from the content store. Identical files are written
//! once: every later file with the same content and metadata becomes a
//! hard link to the first, so the built filesystem stores it once. (The
//! tree serves the shared formats built by external tools; private
//! partitions are written by `ext4_writer` without a tree.)

use std::collections::HashMap;
use std::os::fd::AsFd;

use cap_std::fs::Dir;
use provd_domain::image::{Entry, EntryKind, Hash};
use provd_store::Store;
use rustix::fs::{AtFlags, FileType, Mode, Timestamps};

use crate::PartitionError;

type InodeKey = (Hash, u32, u64, u64);

/// What a staging tree leaves out so that nothing special ever exists on
/// the node's filesystem: devices and FIFOs are not created, and files are
/// written without setuid/setgid bits. The filesystem image gets them
/// afterwards (see `Deferred`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Specials {
    /// Create them in the staging tree (for builders that cannot be told
    /// afterwards; the tree is private to root and deleted after the build).
    Create,
    /// Leave them out and record them in `Stager::deferred`.
    Defer,
    /// Refuse them: the tree is the partition (virtio-fs export), and a
    /// device node there would let a guest open host devices.
    Refuse,
}

/// An entry the staging tree does not hold as it is, for the image builder
/// to add afterwards.
#[derive(Debug, Clone)]
pub(crate) struct Deferred {
    /// Path inside the tree.
    pub at: String,
    pub kind: EntryKind,
    /// Full permission bits, setuid and setgid included.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub device: Option<(u32, u32)>,
}

pub(crate) struct Stager<'s> {
    store: &'s Store,
    specials: Specials,
    /// Entries left for the image builder (with `Specials::Defer`).
    pub deferred: Vec<Deferred>,
    /// Directories created so far, by path relative to the tree root.
    dirs: HashMap<String, Dir>,
    /// First path written for an inode, and how many names it has.
    inodes: HashMap<InodeKey, (String, u32)>,
    dir_times: Vec<(String, i64)>,
    /// Filesystem blocks (4 KiB) the content needs, counted once per inode.
    pub data_blocks: u64,
    /// Inodes created, directories included.
    pub inode_count: u64,
    /// Bytes copied from the store.
    pub bytes_copied: u64,
}

impl std::fmt::Debug for Stager<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stager").field("inodes", &self.inode_count).finish_non_exhaustive()
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PartitionError {
    let what = what.into();
    move |source| PartitionError::Io { what, source }
}

fn errno(what: impl Into<String>) -> impl FnOnce(rustix::io::Errno) -> PartitionError {
    let what = what.into();
    move |e| {
        let source: std::io::Error = e.into();
        if source.kind() == std::io::ErrorKind::PermissionDenied || e == rustix::io::Errno::PERM {
            PartitionError::Privilege { what, source }
        } else {
            PartitionError::Io { what, source }
        }
    }
}

fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

fn blocks(size: u64) -> u64 {
    size.div_ceil(4096)
}

fn ids(
    uid: u64,
    gid: u64,
    path: &str,
) -> Result<(rustix::fs::Uid, rustix::fs::Gid), PartitionError> {
    let bad = || PartitionError::InvalidEntry {
        path: path.to_string(),
        reason: format!("owner {uid}:{gid} is not a settable 32-bit id"),
    };
    // u32::MAX means "leave unchanged" to chown(2), so it cannot be set.
    let uid = u32::try_from(uid).ok().filter(|&u| u != u32::MAX).ok_or_else(bad)?;
    let gid = u32::try_from(gid).ok().filter(|&g| g != u32::MAX).ok_or_else(bad)?;
    Ok((rustix::fs::Uid::from_raw(uid), rustix::fs::Gid::from_raw(gid)))
}

fn times(mtime: i64) -> Timestamps {
    let t = rustix::fs::Timespec { tv_sec: mtime, tv_nsec: 0 };
    Timestamps { last_access: t, last_modification: t }
}

impl<'s> Stager<'s> {
    pub fn new(store: &'s Store, root: Dir, specials: Specials) -> Stager<'s> {
        let mut dirs = HashMap::new();
        dirs.insert(String::new(), root);
        Stager {
            store,
            specials,
            deferred: Vec::new(),
            dirs,
            inodes: HashMap::new(),
            dir_times: Vec::new(),
            data_blocks: 0,
            inode_count: 0,
            bytes_copied: 0,
        }
    }

    /// The directory at `path`, created (0755, root) with its parents when
    /// missing. Fails when something else already stands there.
    pub fn dir(&mut self, path: &str) -> Result<&Dir, PartitionError> {
        if !self.dirs.contains_key(path) {
            let (parent, name) = split(path);
            self.dir(parent)?;
            let parent_dir = self.dirs.get(parent).ok_or_else(|| missing(parent))?;
            parent_dir.create_dir(name).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    PartitionError::InvalidEntry {
                        path: path.to_string(),
                        reason: "a directory is needed here but another entry holds the path"
                            .into(),
                    }
                } else {
                    io(format!("creating directory {path}"))(e)
                }
            })?;
            // Explicitly 0755 root, whatever the daemon's umask and user:
            // an implied directory may become part of a guest's root, which
            // its plan takes for root's 0755.
            rustix::fs::chownat(
                parent_dir,
                name,
                Some(rustix::fs::Uid::ROOT),
                Some(rustix::fs::Gid::ROOT),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(errno(format!("owning {path}")))?;
            rustix::fs::chmodat(parent_dir, name, Mode::from_raw_mode(0o755), AtFlags::empty())
                .map_err(errno(format!("setting the mode of {path}")))?;
            let dir = parent_dir.open_dir(name).map_err(io(format!("opening directory {path}")))?;
            self.inode_count += 1;
            self.data_blocks += 1;
            self.dirs.insert(path.to_string(), dir);
        }
        self.dirs.get(path).ok_or_else(|| missing(path))
    }

    /// Writes `e` at `at` (a path under the tree root). `image_prefix` is
    /// what `at` has in front of `e.path`, for resolving hard links.
    pub fn add(&mut self, at: &str, e: &Entry) -> Result<(), PartitionError> {
        if at.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return Err(PartitionError::InvalidEntry {
                path: e.path.clone(),
                reason: "not a normalised relative path".into(),
            });
        }
        let (uid, gid) = ids(e.uid, e.gid, &e.path)?;
        let mode = Mode::from_raw_mode(e.mode & 0o7777);
        if e.kind == EntryKind::Dir {
            self.dir(at)?;
            let (parent, name) = split(at);
            let pdir = self.dirs.get(parent).ok_or_else(|| missing(parent))?;
            // Directory handles are O_PATH descriptors, so ownership and
            // mode are set through the parent.
            rustix::fs::chownat(pdir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(errno(format!("owning {at}")))?;
            rustix::fs::chmodat(pdir, name, mode, AtFlags::empty())
                .map_err(errno(format!("setting the mode of {at}")))?;
            self.dir_times.push((at.to_string(), e.mtime));
            return Ok(());
        }
        let (parent, name) = split(at);
        self.dir(parent)?;
        let pdir = self.dirs.get(parent).ok_or_else(|| missing(parent))?;
        match e.kind {
            EntryKind::File | EntryKind::Hardlink => {
                let hash = content_hash(e)?;
                let key = (hash, e.mode & 0o7777, e.uid, e.gid);
                let link_from = self
                    .inodes
                    .get(&key)
                    .filter(|(_, links)| *links < crate::shared::MAX_LINKS_PER_INODE)
                    .map(|(p, _)| p.clone());
                if let Some(from) = link_from {
                    let (fparent, fname) = split(&from);
                    let fdir = self.dirs.get(fparent).ok_or_else(|| missing(fparent))?;
                    rustix::fs::linkat(fdir, fname, pdir, name, AtFlags::empty())
                        .map_err(errno(format!("linking {at} to {from}")))?;
                    if let Some(slot) = self.inodes.get_mut(&key) {
                        slot.1 += 1;
                    }
                } else {
                    let copied = self.copy(pdir.as_fd(), name, at, e, hash)?;
                    self.bytes_copied += copied;
                    let special_bits = e.mode & 0o6000;
                    let mode = if special_bits != 0 && self.specials != Specials::Create {
                        // Never a setuid or setgid file on the node: the
                        // bits are set in the image afterwards (ext4) or
                        // ... refused for a directory export below.
                        if self.specials == Specials::Refuse {
                            return Err(PartitionError::InvalidEntry {
                                path: e.path.clone(),
                                reason: "setuid and setgid files cannot be placed in a directory partition on the node; use erofs or ext4".into(),
                            });
                        }
                        self.deferred.push(Deferred {
                            at: at.to_string(),
                            kind: EntryKind::File,
                            mode: e.mode & 0o7777,
                            uid: uid.as_raw(),
                            gid: gid.as_raw(),
                            device: None,
                        });
                        Mode::from_raw_mode(e.mode & 0o1777)
                    } else {
                        mode
                    };
                    rustix::fs::chownat(
                        pdir,
                        name,
                        Some(uid),
                        Some(gid),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(errno(format!("owning {at}")))?;
                    rustix::fs::chmodat(pdir, name, mode, AtFlags::empty())
                        .map_err(errno(format!("setting the mode of {at}")))?;
                    rustix::fs::utimensat(pdir, name, &times(e.mtime), AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(errno(format!("setting the time of {at}")))?;
                    self.inodes.insert(key, (at.to_string(), 1));
                    self.inode_count += 1;
                    self.data_blocks += blocks(e.size);
                }
            }
            EntryKind::Symlink => {
                let target =
                    e.link_target.as_deref().ok_or_else(|| PartitionError::InvalidEntry {
                        path: e.path.clone(),
                        reason: "a symlink without a target".into(),
                    })?;
                rustix::fs::symlinkat(target, pdir, name)
                    .map_err(errno(format!("creating symlink {at}")))?;
                rustix::fs::chownat(pdir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(errno(format!("owning {at}")))?;
                rustix::fs::utimensat(pdir, name, &times(e.mtime), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(errno(format!("setting the time of {at}")))?;
                self.inode_count += 1;
                // Targets past 60 bytes take a block in ext4.
                if target.len() >= 60 {
                    self.data_blocks += 1;
                }
            }
            EntryKind::CharDevice | EntryKind::BlockDevice | EntryKind::Fifo
                if self.specials != Specials::Create =>
            {
                if self.specials == Specials::Refuse && e.kind != EntryKind::Fifo {
                    return Err(PartitionError::InvalidEntry {
                        path: e.path.clone(),
                        reason: format!(
                            "a {} cannot be placed in a directory partition on the node, where a guest could open it through virtio-fs; use erofs or ext4",
                            e.kind.as_str()
                        ),
                    });
                }
                if self.specials == Specials::Defer {
                    self.deferred.push(Deferred {
                        at: at.to_string(),
                        kind: e.kind,
                        mode: e.mode & 0o7777,
                        uid: uid.as_raw(),
                        gid: gid.as_raw(),
                        device: e.device,
                    });
                    self.inode_count += 1;
                    return Ok(());
                }
                mknod(pdir, name, at, e, uid, gid, mode)?;
                self.inode_count += 1;
            }
            EntryKind::CharDevice | EntryKind::BlockDevice | EntryKind::Fifo => {
                mknod(pdir, name, at, e, uid, gid, mode)?;
                self.inode_count += 1;
            }
            EntryKind::Dir => {}
        }
        Ok(())
    }

    fn copy(
        &self,
        parent: std::os::fd::BorrowedFd<'_>,
        name: &str,
        at: &str,
        e: &Entry,
        hash: Hash,
    ) -> Result<u64, PartitionError> {
        let fd = rustix::fs::openat(
            parent,
            name,
            rustix::fs::OFlags::WRONLY
                | rustix::fs::OFlags::CREATE
                | rustix::fs::OFlags::EXCL
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(errno(format!("creating {at}")))?;
        let mut out = std::fs::File::from(fd);
        if e.size == 0 {
            return Ok(0);
        }
        let mut object = self.store.open_object(&hash)?.into_std();
        // std::io::copy between two files uses copy_file_range: the content
        // never passes through this process.
        let copied = std::io::copy(&mut object, &mut out).map_err(io(format!("writing {at}")))?;
        if copied != e.size {
            return Err(PartitionError::InvalidEntry {
                path: e.path.clone(),
                reason: format!(
                    "the stored content {hash} has {copied} bytes, the entry says {}",
                    e.size
                ),
            });
        }
        Ok(copied)
    }

    /// Sets the directories' modification times, children first, now that
    /// nothing more is written into them.
    pub fn finish(mut self) -> Result<StageFigures, PartitionError> {
        self.dir_times.sort_by(|a, b| b.0.cmp(&a.0));
        for (path, mtime) in &self.dir_times {
            let (parent, name) = split(path);
            let pdir = self.dirs.get(parent).ok_or_else(|| missing(parent))?;
            rustix::fs::utimensat(pdir, name, &times(*mtime), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(errno(format!("setting the time of {path}")))?;
        }
        Ok(StageFigures {
            data_blocks: self.data_blocks,
            inodes: self.inode_count,
            bytes_copied: self.bytes_copied,
        })
    }
}

/// What a staged tree needs from a filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StageFigures {
    pub data_blocks: u64,
    pub inodes: u64,
    /// Bytes copied from the store (the build's read cost).
    #[allow(dead_code)]
    pub bytes_copied: u64,
}

/// The content digest of a file or hard link entry.
pub(crate) fn content_hash(e: &Entry) -> Result<Hash, PartitionError> {
    e.hash.ok_or_else(|| PartitionError::InvalidEntry {
        path: e.path.clone(),
        reason: "a file without a content digest".into(),
    })
}

fn missing(path: &str) -> PartitionError {
    PartitionError::InvalidEntry {
        path: path.to_string(),
        reason: "parent directory missing".into(),
    }
}

/// Creates a device node or FIFO in the staging tree (only with
/// `Specials::Create`).
fn mknod(
    pdir: &Dir,
    name: &str,
    at: &str,
    e: &Entry,
    uid: rustix::fs::Uid,
    gid: rustix::fs::Gid,
    mode: Mode,
) -> Result<(), PartitionError> {
    let (kind, dev) = match e.kind {
        EntryKind::Fifo => (FileType::Fifo, 0),
        other => {
            let (major, minor) = e.device.ok_or_else(|| PartitionError::InvalidEntry {
                path: e.path.clone(),
                reason: "a device without major and minor numbers".into(),
            })?;
            let kind = if other == EntryKind::CharDevice {
                FileType::CharacterDevice
            } else {
                FileType::BlockDevice
            };
            (kind, rustix::fs::makedev(major, minor))
        }
    };
    rustix::fs::mknodat(pdir, name, kind, Mode::from_raw_mode(0o600), dev)
        .map_err(errno(format!("creating {} {at}", e.kind.as_str())))?;
    rustix::fs::chownat(pdir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
        .map_err(errno(format!("owning {at}")))?;
    rustix::fs::chmodat(pdir, name, mode, AtFlags::empty())
        .map_err(errno(format!("setting the mode of {at}")))?;
    Ok(())
}
