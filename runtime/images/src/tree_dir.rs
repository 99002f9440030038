//! Directory trees into the store.
//!
//! The walk goes through `cap_std` handles opened at the source root, so a
//! symlink inside the tree can never lead the walk outside it; symlinks are
//! recorded, never followed. Files with several names (same device and
//! inode) are stored once and recorded as hard links after the first name.

use std::collections::HashMap;

use cap_std::fs::{Dir, MetadataExt};
use provd_domain::image::{Entry, EntryKind, check_link_target, normalize_path};
use provd_store::ObjectWriter;

use crate::tree::TreeBuilder;
use crate::{ImportError, Progress};

pub(crate) fn walk(
    root: &Dir,
    tree: &mut TreeBuilder,
    objects: &mut ObjectWriter<'_>,
    reference: &str,
    progress: &dyn Progress,
) -> Result<(), ImportError> {
    let mut inodes: HashMap<(u64, u64), String> = HashMap::new();
    let mut stack: Vec<(String, Dir)> =
        vec![(String::new(), root.try_clone().map_err(|e| source_error(reference, "", e))?)];
    while let Some((prefix, dir)) = stack.pop() {
        let mut names = Vec::new();
        for entry in dir.entries().map_err(|e| source_error(reference, &prefix, e))? {
            let entry = entry.map_err(|e| source_error(reference, &prefix, e))?;
            let name = entry.file_name();
            let name = name
                .to_str()
                .ok_or_else(|| {
                    tree.entry_error(
                        &format!("{prefix}{}", name.to_string_lossy()),
                        "name is not valid UTF-8",
                    )
                })?
                .to_string();
            names.push(name);
        }
        // Sorted, so that the same tree always yields the same first name
        // for a set of hard links.
        names.sort();
        for name in names {
            let raw = format!("{prefix}{name}");
            let path = match normalize_path(&raw) {
                Ok(Some(p)) if p == raw => p,
                Ok(_) => return Err(tree.entry_error(&raw, "is not a plain name")),
                Err(problem) => return Err(tree.entry_error(&raw, format!("path {problem}"))),
            };
            let meta =
                dir.symlink_metadata(&name).map_err(|e| source_error(reference, &path, e))?;
            let ft = meta.file_type();
            let mut record = Entry {
                path: path.clone(),
                kind: EntryKind::File,
                mode: meta.mode() & 0o7777,
                uid: u64::from(meta.uid()),
                gid: u64::from(meta.gid()),
                mtime: meta.mtime(),
                size: 0,
                hash: None,
                link_target: None,
                device: None,
            };
            let size = if ft.is_file() { meta.len() } else { 0 };
            if ft.is_file()
                && meta.nlink() > 1
                && let Some(first) = inodes.get(&(meta.dev(), meta.ino()))
            {
                tree.check(&path, 0)?;
                let (hash, size) = tree.hardlink_target(&path, first)?;
                record.kind = EntryKind::Hardlink;
                record.hash = Some(hash);
                record.size = size;
                record.link_target = Some(first.clone());
                tree.push(record);
                progress.entry(0, 0);
                continue;
            }
            tree.check(&path, size)?;
            if ft.is_dir() {
                record.kind = EntryKind::Dir;
                let sub = dir.open_dir(&name).map_err(|e| source_error(reference, &path, e))?;
                stack.push((format!("{path}/"), sub));
            } else if ft.is_symlink() {
                record.kind = EntryKind::Symlink;
                let target =
                    dir.read_link_contents(&name).map_err(|e| source_error(reference, &path, e))?;
                let target = target
                    .to_str()
                    .ok_or_else(|| tree.entry_error(&path, "symlink target is not valid UTF-8"))?
                    .to_string();
                check_link_target(&target)
                    .map_err(|p| tree.entry_error(&path, format!("symlink target {p}")))?;
                record.link_target = Some(target);
            } else if ft.is_file() {
                let mut file = dir.open(&name).map_err(|e| source_error(reference, &path, e))?;
                let hash =
                    objects.add(&mut file, size, &format!("file {path}")).map_err(|e| match e {
                        provd_store::StoreError::Io { source, .. } => {
                            source_error(reference, &path, source)
                        }
                        provd_store::StoreError::TooLarge { .. } => {
                            tree.entry_error(&path, "grew while it was being read")
                        }
                        other => ImportError::Store(other),
                    })?;
                record.size = size;
                record.hash = Some(hash);
                if meta.nlink() > 1 {
                    inodes.insert((meta.dev(), meta.ino()), path.clone());
                }
            } else {
                use cap_std::fs::FileTypeExt;
                record.kind = if ft.is_char_device() {
                    EntryKind::CharDevice
                } else if ft.is_block_device() {
                    EntryKind::BlockDevice
                } else if ft.is_fifo() {
                    EntryKind::Fifo
                } else {
                    return Err(
                        tree.entry_error(&path, "is a socket or another unsupported file type")
                    );
                };
                if matches!(record.kind, EntryKind::CharDevice | EntryKind::BlockDevice) {
                    let rdev = meta.rdev();
                    record.device = Some((rustix::fs::major(rdev), rustix::fs::minor(rdev)));
                }
            }
            tree.push(record);
            progress.entry(0, size);
        }
    }
    Ok(())
}

fn source_error(reference: &str, path: &str, source: std::io::Error) -> ImportError {
    ImportError::Source {
        reference: reference.into(),
        detail: if path.is_empty() { source.to_string() } else { format!("{path}: {source}") },
    }
}
