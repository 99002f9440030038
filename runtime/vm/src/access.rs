//! A VM's files handed to a hypervisor that runs as a user of its own
//! (libvirt's QEMU as `libvirt-qemu`), without opening the data directory.
//!
//! Each file the VM uses is hard-linked into `<dir>/<vm>/`: the root disk
//! and data disks (its group may read and write them), its shared
//! partitions, seed, kernel and initramfs (read only). The folders are
//! `0710 root:<group>`, so the group reaches a file only by its name, and
//! files are `root:<group>`: never owned by the hypervisor's user, who
//! could otherwise make a shared partition writable. The domain runs as
//! that user and group with relabelling off, so libvirt never changes an
//! owner, which matters for shared partitions many VMs use at once. The
//! data directory stays `0700`; its copies of these files carry the group
//! (`provd_store::check_private` allows exactly that).

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use provd_domain::HypervisorAccess;

use crate::VmError;

/// Makes the folder VMs' files are handed to the hypervisor in: `0710`
/// to its group, outside the data directory and on its filesystem (the
/// files are hard links), and reached only through folders no one but
/// root (or provd's own user) may change.
pub fn prepare_handover(access: &HypervisorAccess, data: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let dir = &access.dir;
    let shown = dir.display();
    if dir.starts_with(data) {
        return Err(format!(
            "{shown} is inside the data directory, which only provd may enter; name a folder \
             beside it"
        ));
    }
    let parent = dir.parent().ok_or_else(|| format!("{shown} has no parent folder"))?;
    // provd changes owners and modes under this folder by path: a user
    // who could replace a folder on the way could point that at any file.
    let parent = std::fs::canonicalize(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let me = rustix::process::geteuid().as_raw();
    for folder in parent.ancestors() {
        let meta = std::fs::metadata(folder).map_err(|e| format!("{}: {e}", folder.display()))?;
        let sticky = meta.mode() & 0o1000 != 0;
        if (meta.uid() != 0 && meta.uid() != me) || (meta.mode() & 0o022 != 0 && !sticky) {
            return Err(format!(
                "{shown} is reached through {}, which user {} or others may change (mode \
                 {:04o}): every folder above vm-dir must be root's and writable by it alone",
                folder.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ));
        }
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("creating {shown}: {e}")),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{shown}: {e}"))?;
    if !meta.is_dir() {
        return Err(format!("{shown} is not a folder (a symbolic link is not followed)"));
    }
    if meta.uid() != me {
        return Err(format!("{shown} belongs to user {}, not to provd's ({me})", meta.uid()));
    }
    let data_dev = std::fs::metadata(data).map_err(|e| format!("{}: {e}", data.display()))?.dev();
    if meta.dev() != data_dev {
        return Err(format!(
            "{shown} is on another filesystem than the data directory {}; VMs' files are \
             handed over as hard links, which need one",
            data.display()
        ));
    }
    std::os::unix::fs::chown(dir, None, Some(access.gid))
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE)))
        .map_err(|e| format!("handing {shown} to group {}: {e}", access.gid))
}

/// Where a VM's folder records to whom its files were handed, so that
/// writing them again (a repack, a customised seed) hands them the same way.
pub(crate) const RECORD: &str = "access.json";

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    uid: u32,
    gid: u32,
    dir: PathBuf,
}

/// Folders the group may only traverse.
const DIR_MODE: u32 = 0o710;
/// What the VM writes: its root and data disks.
const WRITABLE_MODE: u32 = 0o660;
/// Everything else it reads.
const READ_ONLY_MODE: u32 = 0o440;

fn failed(what: &str, path: &Path, e: std::io::Error) -> VmError {
    VmError::Failed(format!("{what} {}: {e}", path.display()))
}

/// Records `access` in the VM's folder `vm_dir`.
pub(crate) fn record(vm_dir: &Path, access: &HypervisorAccess) -> Result<(), VmError> {
    let text = serde_json::to_string(&Record {
        uid: access.uid,
        gid: access.gid,
        dir: access.dir.clone(),
    })
    .map_err(|e| VmError::Failed(format!("recording the hypervisor's access: {e}")))?;
    let path = vm_dir.join(RECORD);
    std::fs::write(&path, text).map_err(|e| failed("writing", &path, e))
}

/// What was recorded in `vm_dir`, if its files were handed over.
pub(crate) fn recorded(vm_dir: &Path) -> Result<Option<HypervisorAccess>, VmError> {
    let path = vm_dir.join(RECORD);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let r: Record = serde_json::from_str(&text)
                .map_err(|e| VmError::Failed(format!("{}: {e}", path.display())))?;
            Ok(Some(HypervisorAccess { uid: r.uid, gid: r.gid, dir: r.dir }))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(failed("reading", &path, e)),
    }
}

/// The VM's folder in `access.dir`.
pub(crate) fn folder(access: &HypervisorAccess, vm: &str) -> PathBuf {
    access.dir.join(vm)
}

/// Links `files` (a name in the VM's folder, the file in the data
/// directory, whether the VM writes it) into the VM's folder, each
/// replacing the link of that name, and removes links of other names.
/// Returns where each file now is.
pub(crate) fn hand_over(
    access: &HypervisorAccess,
    vm: &str,
    files: &[(String, PathBuf, bool)],
) -> Result<Vec<PathBuf>, VmError> {
    let folder = folder(access, vm);
    match std::fs::create_dir(&folder) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(failed("creating", &folder, e)),
    }
    own(&folder, access, DIR_MODE)?;
    let mut out = Vec::with_capacity(files.len());
    for (name, source, writable) in files {
        let mode = if *writable { WRITABLE_MODE } else { READ_ONLY_MODE };
        out.push(link(access, &folder, name, source, mode)?);
    }
    // Links a repack or a smaller spec no longer uses.
    let keep: Vec<&str> = files.iter().map(|(n, _, _)| n.as_str()).collect();
    let entries = std::fs::read_dir(&folder).map_err(|e| failed("listing", &folder, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !keep.contains(&name.as_str()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(out)
}

/// Links the file `name` of `vm_dir` again after it was replaced (a
/// customised or restored seed), when the VM's files were handed over.
pub(crate) fn relink(vm_dir: &Path, vm: &str, name: &str) -> Result<(), VmError> {
    let Some(access) = recorded(vm_dir)? else { return Ok(()) };
    link(&access, &folder(&access, vm), name, &vm_dir.join(name), READ_ONLY_MODE).map(|_| ())
}

/// Links `source` into `folder` as `name` with `mode`, replacing what had
/// that name in one rename; returns the link.
fn link(
    access: &HypervisorAccess,
    folder: &Path,
    name: &str,
    source: &Path,
    mode: u32,
) -> Result<PathBuf, VmError> {
    let link = folder.join(name);
    let temp = folder.join(format!(".{name}.new"));
    let _ = std::fs::remove_file(&temp);
    std::fs::hard_link(source, &temp).map_err(|e| failed("linking", source, e))?;
    own(&temp, access, mode)?;
    std::fs::rename(&temp, &link).map_err(|e| failed("replacing", &link, e))?;
    Ok(link)
}

/// Removes the VM's folder, if its files were handed over.
pub(crate) fn withdraw(vm_dir: &Path, vm: &str) -> Result<(), VmError> {
    let Some(access) = recorded(vm_dir)? else { return Ok(()) };
    let folder = folder(&access, vm);
    match std::fs::remove_dir_all(&folder) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(failed("removing", &folder, e)),
    }
}

/// Provd's own user and `<group>`, with `mode`.
fn own(path: &Path, access: &HypervisorAccess, mode: u32) -> Result<(), VmError> {
    std::os::unix::fs::chown(path, None, Some(access.gid))
        .map_err(|e| failed("handing over", path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| failed("setting the mode of", path, e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn access(dir: PathBuf) -> HypervisorAccess {
        let me = rustix::process::geteuid().as_raw();
        HypervisorAccess { uid: me, gid: rustix::process::getegid().as_raw(), dir }
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn the_handover_folder_is_reached_only_through_folders_no_one_else_may_change() {
        let top = tempfile::tempdir().unwrap();
        let data = top.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let open = top.path().join("open");
        std::fs::create_dir(&open).unwrap();

        // A folder anyone may write: they could put a link where vm-dir is.
        chmod(&open, 0o777);
        let e = prepare_handover(&access(open.join("vms")), &data).unwrap_err();
        assert!(e.contains(&format!("through {}", open.display())) && e.contains("0777"), "{e}");
        assert!(!open.join("vms").exists(), "created before the check");
        // Group-writable is as open.
        chmod(&open, 0o775);
        assert!(prepare_handover(&access(open.join("vms")), &data).is_err());
        // Sticky, as /tmp: others may not replace what is not theirs.
        chmod(&open, 0o1777);
        prepare_handover(&access(open.join("vms")), &data).unwrap();
        let meta = std::fs::symlink_metadata(open.join("vms")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, DIR_MODE);

        // vm-dir itself a symbolic link: not followed.
        let target = top.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        std::os::unix::fs::symlink(&target, top.path().join("linked")).unwrap();
        let e = prepare_handover(&access(top.path().join("linked")), &data).unwrap_err();
        assert!(e.contains("not a folder"), "{e}");
        // Inside the data directory: refused.
        let e = prepare_handover(&access(data.join("vms")), &data).unwrap_err();
        assert!(e.contains("inside the data directory"), "{e}");
    }
}
