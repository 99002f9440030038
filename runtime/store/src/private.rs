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
///
/// With `handed`, the group a hypervisor running as a user of its own
/// reads VMs' files as: a file of `partitions/<id>/` or `vms/<name>/` of
/// that group may be readable and writable by it (the hypervisor reaches
/// it only through a hard link in its own folder; the data directory stays
/// closed). Nothing else may, and no folder.
pub fn check_private(data: &Path, handed: Option<u32>) -> Result<(), StoreError> {
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
    check_one(data, &meta, None)?;
    for entry in children(data)? {
        let name = entry.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let meta = lstat(&entry)?;
        check_one(&entry, &meta, None)?;
        if !meta.is_dir() {
            continue;
        }
        // How deep each folder is looked into.
        let levels = match name.as_str() {
            "partitions" | "vms" => 2,
            "objects" | "staging" | "cache" => 1,
            _ => 0,
        };
        let handed = handed.filter(|_| matches!(name.as_str(), "partitions" | "vms"));
        walk(&entry, levels, handed)?;
    }
    Ok(())
}

fn walk(dir: &Path, levels: u32, handed: Option<u32>) -> Result<(), StoreError> {
    if levels == 0 {
        return Ok(());
    }
    for entry in children(dir)? {
        let meta = lstat(&entry)?;
        check_one(&entry, &meta, handed)?;
        if meta.is_dir() {
            walk(&entry, levels - 1, handed)?;
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

fn check_one(path: &Path, meta: &std::fs::Metadata, handed: Option<u32>) -> Result<(), StoreError> {
    // A link's own mode means nothing; what it names is checked where it
    // lies, if inside.
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.mode() & 0o7777;
    // A VM's file handed to the hypervisor's group: read and write for it
    // at most, nothing for anyone else.
    let handed = meta.is_file() && handed == Some(meta.gid()) && mode & 0o017 == 0;
    if !handed && mode & SHARED_BITS != 0 {
        let fix = if meta.is_dir() { "chmod 700" } else { "chmod go-rwx" };
        return Err(StoreError::Exposed {
            path: path.display().to_string(),
            mode,
            fix: format!("{fix} {}", path.display()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn only_vm_files_of_the_hypervisors_group_may_be_open_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let part = data.join("partitions/p-1");
        std::fs::create_dir_all(&part).unwrap();
        for d in [&data, &data.join("partitions"), &part] {
            mode(d, 0o700);
        }
        let disk = part.join("private.ext4");
        std::fs::write(&disk, b"disk").unwrap();
        mode(&disk, 0o600);
        check_private(&data, None).unwrap();
        // Handed to the hypervisor's group: read and write for it.
        let gid = 4242;
        std::os::unix::fs::chown(&disk, None, Some(gid)).unwrap();
        mode(&disk, 0o660);
        check_private(&data, Some(gid)).unwrap();
        // Without a hypervisor, or to another group, it is exposed.
        assert!(matches!(check_private(&data, None), Err(StoreError::Exposed { .. })));
        assert!(matches!(check_private(&data, Some(gid + 1)), Err(StoreError::Exposed { .. })));
        // Never to others, and never executable for the group.
        for loose in [0o664, 0o670] {
            mode(&disk, loose);
            assert!(matches!(check_private(&data, Some(gid)), Err(StoreError::Exposed { .. })));
        }
        mode(&disk, 0o640);
        // Nor a folder, nor a file outside partitions/ and vms/.
        std::os::unix::fs::chown(&part, None, Some(gid)).unwrap();
        mode(&part, 0o710);
        assert!(matches!(check_private(&data, Some(gid)), Err(StoreError::Exposed { .. })));
        mode(&part, 0o700);
        let db = data.join("provd.db");
        std::fs::write(&db, b"").unwrap();
        std::os::unix::fs::chown(&db, None, Some(gid)).unwrap();
        mode(&db, 0o640);
        assert!(matches!(check_private(&data, Some(gid)), Err(StoreError::Exposed { .. })));
    }
}
