//! The data directory is the node's own: other local users may not reach or
//! read anything in it.
//!
//! It holds stored requests (VM specs, user-data), the hashes of every
//! layer's files, partitions and seeds. The directory is created 0700 and
//! the binaries run with umask 077, so what provd writes is owner-only;
//! [`check_private`] refuses a directory where that no longer holds (an
//! older provd, a hand-made directory, a `chmod`), naming the first path
//! that is looser.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use crate::StoreError;

/// Group and other permission bits: none may be set.
const SHARED_BITS: u32 = 0o077;

/// Checks the data directory, everything directly in it, and the folders
/// and files of `partitions/<id>/` and `vms/<name>/`, of `objects/` its
/// fan-out folders (the objects themselves are many, unreachable through
/// those, and written 0400). A directory that does not exist yet passes: it
/// is created 0700.
pub fn check_private(data: &Path) -> Result<(), StoreError> {
    let meta = match std::fs::symlink_metadata(data) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(StoreError::Io {
                what: "checking the data directory".into(),
                dir: data.display().to_string(),
                source,
            });
        }
    };
    check_one(data, &meta)?;
    for entry in children(data)? {
        let name = entry.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let meta = lstat(&entry)?;
        check_one(&entry, &meta)?;
        if !meta.is_dir() {
            continue;
        }
        // How deep each folder is looked into.
        let levels = match name.as_str() {
            "partitions" | "vms" => 2,
            "objects" | "staging" | "cache" => 1,
            _ => 0,
        };
        walk(&entry, levels)?;
    }
    Ok(())
}

fn walk(dir: &Path, levels: u32) -> Result<(), StoreError> {
    if levels == 0 {
        return Ok(());
    }
    for entry in children(dir)? {
        let meta = lstat(&entry)?;
        check_one(&entry, &meta)?;
        if meta.is_dir() {
            walk(&entry, levels - 1)?;
        }
    }
    Ok(())
}

fn children(dir: &Path) -> Result<Vec<std::path::PathBuf>, StoreError> {
    let io =
        |source| StoreError::Io { what: "listing".into(), dir: dir.display().to_string(), source };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        out.push(entry.map_err(io)?.path());
    }
    Ok(out)
}

fn lstat(path: &Path) -> Result<std::fs::Metadata, StoreError> {
    std::fs::symlink_metadata(path).map_err(|source| StoreError::Io {
        what: "checking".into(),
        dir: path.display().to_string(),
        source,
    })
}

fn check_one(path: &Path, meta: &std::fs::Metadata) -> Result<(), StoreError> {
    // A link's own mode means nothing; what it names is checked where it
    // lies, if inside.
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.mode() & 0o7777;
    if mode & SHARED_BITS != 0 {
        let fix = if meta.is_dir() { "chmod 700" } else { "chmod go-rwx" };
        return Err(StoreError::Exposed {
            path: path.display().to_string(),
            mode,
            fix: format!("{fix} {}", path.display()),
        });
    }
    Ok(())
}
