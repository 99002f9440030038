//! Opening `dir:` and `tar:` sources on the node.
//!
//! The daemon opens a local reference only beneath a root its policy names
//! (the literal directory before a pattern's first wildcard, see
//! `provd_domain::local_root`): the root is opened as the administrator
//! wrote it, and the rest of the path with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`, so a symbolic link
//! anywhere past the root, the image's own folder or archive included, is
//! refused by the kernel rather than followed out. The administrator's own
//! tools (`provctl image import`, placement) open a path as they are given
//! it.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

use crate::ImportError;

/// Where `dir:` and `tar:` references may be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalSources {
    /// Wherever the process may read, symbolic links followed: for the
    /// local administrator's own commands, never for the daemon.
    Ambient,
    /// Only beneath these roots, nothing past a root followed through a
    /// link. No roots: no local image at all.
    Beneath(Vec<PathBuf>),
}

impl LocalSources {
    /// The roots of a node's `policy.image-sources` patterns; patterns of
    /// other schemes add none.
    pub fn from_patterns(patterns: &[String]) -> LocalSources {
        let mut roots: Vec<PathBuf> = patterns
            .iter()
            .filter_map(|p| provd_domain::local_root(p))
            .map(PathBuf::from)
            .collect();
        roots.sort();
        roots.dedup();
        LocalSources::Beneath(roots)
    }
}

/// What a reference must open as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    Dir,
    File,
}

fn source_error(key: &str, detail: impl Into<String>) -> ImportError {
    ImportError::Source { reference: key.to_string(), detail: detail.into() }
}

/// Opens `path` as `want` under `sources`; `key` names the reference in
/// errors.
pub(crate) fn open(
    sources: &LocalSources,
    path: &Path,
    want: Want,
    key: &str,
) -> Result<std::fs::File, ImportError> {
    let fd = match sources {
        LocalSources::Ambient => rustix::fs::open(path, base_flags(want), Mode::empty())
            .map_err(|e| source_error(key, std::io::Error::from(e).to_string()))?,
        LocalSources::Beneath(roots) => open_beneath(roots, path, want, key)?,
    };
    check_type(&fd, want, key)?;
    Ok(std::fs::File::from(fd))
}

fn base_flags(want: Want) -> OFlags {
    // O_NONBLOCK: a FIFO named as an archive must not hang the import; the
    // type is checked right after.
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
    match want {
        Want::Dir => flags | OFlags::DIRECTORY,
        Want::File => flags,
    }
}

fn open_beneath(
    roots: &[PathBuf],
    path: &Path,
    want: Want,
    key: &str,
) -> Result<OwnedFd, ImportError> {
    // The longest root the path lies in, compared by whole components
    // (`/srv/images` does not hold `/srv/images-secret`).
    let Some((root, rest)) = roots
        .iter()
        .filter_map(|r| path.strip_prefix(r).ok().map(|rest| (r, rest)))
        .max_by_key(|(r, _)| r.as_os_str().len())
    else {
        return Err(source_error(key, "not beneath any image root this node's policy names"));
    };
    if rest.as_os_str().is_empty() {
        // The pattern names this one path; it is the administrator's own.
        return rustix::fs::open(root, base_flags(want), Mode::empty())
            .map_err(|e| source_error(key, std::io::Error::from(e).to_string()));
    }
    let root_fd =
        rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| {
            source_error(key, format!("image root {}: {}", root.display(), std::io::Error::from(e)))
        })?;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    // The final component itself, without opening what it is: a link is
    // refused by name rather than as "not a directory".
    let itself = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    if let Ok(fd) = rustix::fs::openat2(&root_fd, rest, itself, Mode::empty(), resolve)
        && rustix::fs::fstat(&fd)
            .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
    {
        return Err(source_error(
            key,
            format!(
                "is a symbolic link beneath the image root {} (links are not followed)",
                root.display()
            ),
        ));
    }
    rustix::fs::openat2(&root_fd, rest, base_flags(want) | OFlags::NOFOLLOW, Mode::empty(), resolve)
        .map_err(|e| {
            let detail = match e {
                rustix::io::Errno::LOOP => format!(
                    "a symbolic link lies on the way beneath the image root {} (links are not \
                     followed)",
                    root.display()
                ),
                rustix::io::Errno::XDEV => {
                    format!("leads outside the image root {}", root.display())
                }
                rustix::io::Errno::NOSYS => {
                    "the kernel lacks openat2 (Linux 5.6), which confines local images to \
                     their root"
                        .to_string()
                }
                e => std::io::Error::from(e).to_string(),
            };
            source_error(key, detail)
        })
}

fn check_type(fd: &OwnedFd, want: Want, key: &str) -> Result<(), ImportError> {
    let io = |e: rustix::io::Errno| source_error(key, std::io::Error::from(e).to_string());
    let stat = rustix::fs::fstat(fd).map_err(io)?;
    match (want, FileType::from_raw_mode(stat.st_mode)) {
        (Want::Dir, FileType::Directory) | (Want::File, FileType::RegularFile) => {}
        (Want::Dir, _) => return Err(source_error(key, "not a directory")),
        (Want::File, _) => return Err(source_error(key, "not a regular file")),
    }
    // Reads block as usual from here on.
    let flags = rustix::fs::fcntl_getfl(fd).map_err(io)?;
    rustix::fs::fcntl_setfl(fd, flags - OFlags::NONBLOCK).map_err(io)
}
