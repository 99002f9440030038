//! Reading a cloud-init seed image back with Debian's `xorriso`, a reader
//! independent of provd's own ISO9660 writer: what tests compare a VM's
//! seed against.

use std::ffi::OsString;
use std::io::{Error, ErrorKind};
use std::path::Path;
use std::process::{Command, Stdio};

/// Largest image read: a seed of `provd_vm::cloudinit::MAX_SEED_BYTES`
/// makes one well under 2 MiB.
const MAX_IMAGE_BYTES: u64 = 16 << 20;

/// An image's files: path relative to the root and content.
pub type SeedImageFiles = Vec<(String, Vec<u8>)>;

fn bad(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::InvalidData, format!("seed image {}: {reason}", path.display()))
}

/// The volume id of the seed image at `path` and its files, by path
/// relative to the root (`meta-data`, ...), sorted by name.
pub fn read_seed_iso(path: &Path) -> std::io::Result<(String, SeedImageFiles)> {
    let xorriso = Path::new("/usr/bin/xorriso");
    if !xorriso.is_file() {
        return Err(Error::new(
            ErrorKind::NotFound,
            "/usr/bin/xorriso not found: install the Debian package xorriso",
        ));
    }
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(bad(path, "not a regular file"));
    }
    if meta.len() > MAX_IMAGE_BYTES {
        return Err(bad(path, format!("larger than {MAX_IMAGE_BYTES} bytes")));
    }
    let work = tempfile::Builder::new().prefix("provd-seed-read-").tempdir()?;
    // `stdio:` makes xorriso treat the path as a plain file, never as an
    // optical drive.
    let mut indev = OsString::from("stdio:");
    indev.push(std::path::absolute(path)?);
    let out = Command::new(xorriso)
        .args(["-osirrox", "on", "-indev"])
        .arg(indev)
        .args(["-pvd_info", "-extract", "/", "root"])
        .current_dir(work.path())
        .stdin(Stdio::null())
        .env_clear()
        .env("LC_ALL", "C")
        .output()?;
    let result = (|| {
        if !out.status.success() {
            return Err(bad(path, format!("xorriso failed ({})", out.status)));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        // A blank or foreign file loads as an empty medium, which has no
        // primary volume descriptor to report.
        if !stdout.lines().any(|l| l.starts_with("PVD address")) {
            return Err(bad(path, "no ISO9660 volume"));
        }
        let volume = stdout
            .lines()
            .find_map(|l| l.strip_prefix("Volume Id    :"))
            .map(|v| v.trim().to_string())
            .ok_or_else(|| bad(path, "no volume id"))?;
        let mut files = Vec::new();
        collect_files(&work.path().join("root"), "", &mut files)?;
        files.sort();
        Ok((volume, files))
    })();
    // Extracted directories keep the image's read-only modes; they are made
    // writable again so the temporary directory can be removed.
    make_writable(&work.path().join("root"));
    result
}

fn collect_files(dir: &Path, prefix: &str, files: &mut SeedImageFiles) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            collect_files(&entry.path(), &format!("{name}/"), files)?;
        } else if kind.is_file() {
            files.push((name, std::fs::read(entry.path())?));
        } else {
            return Err(bad(&entry.path(), "neither a file nor a directory"));
        }
    }
    Ok(())
}

fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else { return };
    if !meta.is_dir() {
        return;
    }
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            make_writable(&entry.path());
        }
    }
}
