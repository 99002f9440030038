//! Small files added to a built private partition: a hostname, a
//! cloud-init seed, a key. The change is made on a sparse copy of the image
//! with `debugfs`, read back with this crate's ext4 reader, and only then
//! renamed over the original, so a failed write leaves the partition as it
//! was. Each added file is recorded in the partition's manifest, and
//! verification expects it on top of the image.

use std::os::unix::fs::FileExt;
use std::path::Path;

use provd_domain::image::{EntryKind, Hash};
use provd_store::{ImageRecord, PartitionFormat, PartitionRecord, PartitionRole, Store};

use crate::ext4::Ext4Image;
use crate::tools::DEBUGFS;
use crate::{BuildOptions, PartitionError, PrivateManifest};

/// Largest file `add_file` writes.
pub const MAX_ADDED_FILE_BYTES: usize = 1 << 20;
/// Most files added to one partition.
pub const MAX_ADDED_FILES: usize = 256;
/// Longest path accepted.
const MAX_ADDED_PATH: usize = 1024;

/// A file added to a private partition after it was built.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddedFile {
    pub path: String,
    pub mode: u32,
    pub size: u64,
    pub hash: Hash,
}

fn invalid(path: &str, reason: impl Into<String>) -> PartitionError {
    PartitionError::InvalidEntry { path: path.to_string(), reason: reason.into() }
}

/// Paths are passed to `debugfs` as command arguments, so only characters
/// that need no quoting there are accepted.
fn check_path(path: &str) -> Result<(), PartitionError> {
    if path.is_empty() || path.len() > MAX_ADDED_PATH {
        return Err(invalid(path, format!("a path of 1 to {MAX_ADDED_PATH} bytes is needed")));
    }
    if !path.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b)) {
        return Err(invalid(path, "only A-Z a-z 0-9 . _ - / may be used"));
    }
    if path.split('/').any(|c| c.is_empty() || c == "." || c == ".." || c.len() > 255) {
        return Err(invalid(path, "not a normalised relative path"));
    }
    Ok(())
}

/// Copies `src` to a new file `dst` keeping holes, so a sparse image stays
/// sparse.
pub(crate) fn sparse_copy(src: &Path, dst: &Path) -> std::io::Result<()> {
    let input = std::fs::File::open(src)?;
    let len = input.metadata()?.len();
    let output = std::fs::OpenOptions::new().write(true).create_new(true).open(dst)?;
    output.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: u64 = 0;
    while pos < len {
        let data = match rustix::fs::seek(&input, rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = rustix::fs::seek(&input, rustix::fs::SeekFrom::Hole(data))
            .map_err(std::io::Error::from)?;
        let mut at = data;
        while at < hole {
            let want = usize::try_from((hole - at).min(buf.len() as u64)).unwrap_or(buf.len());
            let chunk = buf.get_mut(..want).unwrap_or_default();
            let n = input.read_at(chunk, at)?;
            if n == 0 {
                break;
            }
            output.write_all_at(chunk.get(..n).unwrap_or_default(), at)?;
            at += n as u64;
        }
        pos = hole;
    }
    output.sync_all()
}

/// Opens an ext4 image of partition `id` and lists it.
pub(crate) fn read_ext4(
    image: &Path,
    id: &str,
) -> Result<(Ext4Image, Vec<crate::reader::FsEntry>), PartitionError> {
    let unreadable = |e: crate::ext4::Ext4Error| PartitionError::Unreadable {
        partition: id.into(),
        reason: e.to_string(),
    };
    let fs = Ext4Image::open(image).map_err(unreadable)?;
    let entries = fs.entries(true).map_err(unreadable)?;
    Ok((fs, entries))
}

/// The image the private partition was built from, as the store still
/// holds it, or why it cannot be known.
fn built_from(store: &Store, manifest: &PrivateManifest) -> Result<ImageRecord, String> {
    store
        .image(&manifest.image)
        .map_err(|e| e.to_string())?
        .filter(|i| i.digest == manifest.image_digest)
        .ok_or_else(|| {
            format!(
                "the image the VM's partition was built from ({}) is no longer in the store, \
                 so what the VM sees at that path cannot be checked",
                manifest.image
            )
        })
}

/// Writes `content` at `path` of the VM's root in private partition `id`
/// (raw ext4), owned by root with permission bits `mode`.
pub fn add_file(
    store: &Store,
    id: &str,
    path: &str,
    content: &[u8],
    mode: u32,
    opts: &BuildOptions,
) -> Result<PartitionRecord, PartitionError> {
    check_path(path)?;
    if content.len() > MAX_ADDED_FILE_BYTES {
        return Err(invalid(
            path,
            format!("{} bytes; at most {MAX_ADDED_FILE_BYTES}", content.len()),
        ));
    }
    if mode & !0o777 != 0 {
        return Err(invalid(path, format!("mode {mode:o}: only permission bits 0777 may be set")));
    }
    let rec = store
        .partition(id)?
        .ok_or_else(|| PartitionError::NotFound(format!("no partition {id}")))?;
    let mut manifest: PrivateManifest = match (rec.role, rec.format) {
        (PartitionRole::Private, PartitionFormat::Ext4) => serde_json::from_str(&rec.manifest)
            .map_err(|e| PartitionError::Unreadable {
                partition: id.into(),
                reason: e.to_string(),
            })?,
        (PartitionRole::Private, _) => {
            return Err(invalid(
                path,
                format!("partition {id} is {}; files can be added to raw ext4 only", rec.format),
            ));
        }
        _ => {
            return Err(invalid(
                path,
                format!("partition {id} is shared; files go into private partitions"),
            ));
        }
    };
    if manifest.added.len() >= MAX_ADDED_FILES && !manifest.added.iter().any(|a| a.path == path) {
        return Err(invalid(
            path,
            format!("partition {id} already has {MAX_ADDED_FILES} added files"),
        ));
    }
    let tools = opts.tools();
    tools.find(DEBUGFS)?;
    let dir = store.partition_path(id)?;
    let image = dir.join(&rec.file);
    let upper = format!("upper/{path}");
    let (parent, _) = upper.rsplit_once('/').unwrap_or(("upper", ""));
    // The folders above the file that upper/ lacks, outermost first: the
    // VM sees them from its layers, as its image has them, and they are
    // made in upper/ with the image's metadata, which leaves its view as
    // it was.
    let mut folders: Vec<provd_domain::image::Entry> = Vec::new();
    {
        let (_, entries) = read_ext4(&image, id)?;
        let built = built_from(store, &manifest).map_err(|why| invalid(path, why))?;
        let seen_at = |at: &str| store.entry(&built, at).map_err(|e| invalid(path, e.to_string()));
        let in_upper =
            |dir: &str| entries.iter().any(|e| e.path == dir && e.kind == EntryKind::Dir);
        let mut missing = parent;
        while missing != "upper" && !in_upper(missing) {
            let inside = missing.strip_prefix("upper/").unwrap_or(missing);
            match seen_at(inside)? {
                Some(d) if d.kind == EntryKind::Dir => folders.push(d),
                _ => {
                    return Err(invalid(
                        path,
                        format!("its folder {inside} is not a directory of the VM's image"),
                    ));
                }
            }
            missing = missing.rsplit_once('/').map_or("upper", |(up, _)| up);
        }
        folders.reverse();
        // What the VM sees at the path may come from its layers: only a
        // regular file is replaced there too.
        if let Some(seen) = seen_at(path)?
            && !matches!(seen.kind, EntryKind::File | EntryKind::Hardlink)
        {
            return Err(invalid(
                path,
                format!("a {} is there; only a regular file may be replaced", seen.kind.as_str()),
            ));
        }
        if let Some(existing) = entries.iter().find(|e| e.path == upper)
            && existing.kind != EntryKind::File
        {
            return Err(invalid(
                path,
                format!(
                    "a {} is there; only a regular file may be replaced",
                    existing.kind.as_str()
                ),
            ));
        }
    }

    let (temp, temp_path) = store.create_temp_dir()?;
    let result = (|| {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| PartitionError::Io { what, source }
        };
        let source = temp_path.join("content");
        std::fs::write(&source, content).map_err(io("writing the content"))?;
        let copy = temp_path.join("image");
        sparse_copy(&image, &copy).map_err(io("copying the image"))?;
        let script = temp_path.join("script");
        let mut commands = String::new();
        for d in &folders {
            let at = format!("upper/{}", d.path);
            commands.push_str(&format!(
                "mkdir {at}\nsif {at} mode 0{:o}\nsif {at} uid {}\nsif {at} gid {}\nsif {at} mtime @{}\n",
                0o040000 | (d.mode & 0o7777),
                d.uid,
                d.gid,
                d.mtime.max(0)
            ));
        }
        commands.push_str(&format!(
            "rm {upper}\nwrite {} {upper}\nsif {upper} mode 0{:o}\nsif {upper} uid 0\nsif {upper} gid 0\n",
            source.display(),
            0o100000 | mode
        ));
        std::fs::write(&script, commands).map_err(io("writing the debugfs script"))?;
        let mut script_arg = std::ffi::OsString::from("-f");
        script_arg.push(&script);
        tools
            .run(DEBUGFS, [std::ffi::OsStr::new("-w"), script_arg.as_os_str(), copy.as_os_str()])?;
        // debugfs reports failed commands on stderr but exits 0: read the
        // result back before trusting it.
        let (fs, entries) = read_ext4(&copy, id)?;
        for d in &folders {
            let at = format!("upper/{}", d.path);
            let made = entries.iter().find(|e| e.path == at);
            if !made.is_some_and(|e| {
                e.kind == EntryKind::Dir
                    && e.mode == d.mode & 0o7777
                    && (e.uid, e.gid) == (d.uid, d.gid)
            }) {
                return Err(invalid(path, format!("debugfs did not make the folder {}", d.path)));
            }
        }
        let written = entries
            .iter()
            .find(|e| e.path == upper)
            .ok_or_else(|| invalid(path, "debugfs did not create the file"))?;
        let mut hasher = blake3::Hasher::new();
        fs.read_file(written.ino, &mut hasher).map_err(|e| PartitionError::Unreadable {
            partition: id.into(),
            reason: e.to_string(),
        })?;
        let hash = Hash(*hasher.finalize().as_bytes());
        if written.kind != EntryKind::File
            || written.mode != mode
            || written.uid != 0
            || written.gid != 0
            || hash.0 != *blake3::hash(content).as_bytes()
        {
            return Err(invalid(path, "the file read back differs from what was written"));
        }
        std::fs::rename(&copy, &image).map_err(io("replacing the image"))?;
        Ok(hash)
    })();
    store.remove_temp(&temp);
    let hash = result?;
    manifest.added.retain(|a| a.path != path);
    manifest.added.push(AddedFile {
        path: path.to_string(),
        mode,
        size: content.len() as u64,
        hash,
    });
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| PartitionError::InvalidPlan(format!("encoding the manifest: {e}")))?;
    let (bytes, _) = crate::allocated(&image)?;
    store.update_partition(id, &text, bytes)?;
    Ok(store.partition(id)?.unwrap_or(rec))
}
