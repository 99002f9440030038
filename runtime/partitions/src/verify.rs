//! Proof that a VM's partitions give back its image: its private partition
//! on top of its layers equals the image entry by entry (type, content
//! digest, permission bits, owner, group, link target, device numbers).
//!
//! Images are read with this crate's own ext4 and EROFS readers, from the
//! inodes themselves: extraction tools drop setuid bits and device nodes,
//! and a mount needs privileges a verifier should not. The readers decode
//! lz4 and lz4hc EROFS content themselves: nothing is extracted onto the
//! node.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use provd_domain::image::{Entry, EntryKind, Hash};
use provd_store::{PartitionFormat, PartitionRecord, PartitionRole, Store};

use crate::erofs::ErofsImage;
use crate::ext4::Ext4Image;
use crate::reader::FsEntry;
use crate::tools::{QEMU_IMG, Tools};
use crate::{BuildOptions, PartitionError, PrivateManifest, SharedManifest};

/// Mismatches listed in full; beyond this only counted.
const MAX_LISTED: usize = 100;

/// The outcome of verifying one VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verification {
    pub vm: String,
    pub image: String,
    pub private: String,
    /// The shared partitions its layers are on.
    pub shared: Vec<String>,
    /// Its layers, bottom first, as `<shared partition>/<layer>`.
    pub layers: Vec<String>,
    /// Image entries compared.
    pub entries: u64,
    /// Distinct inodes whose content was hashed.
    pub files_hashed: u64,
    pub bytes_hashed: u64,
    /// Every difference found (the first hundred), empty when exact.
    pub mismatches: Vec<String>,
    pub mismatch_count: u64,
}

impl Verification {
    pub fn is_exact(&self) -> bool {
        self.mismatch_count == 0
    }
}

fn unreadable(partition: &str, reason: impl std::fmt::Display) -> PartitionError {
    PartitionError::Unreadable { partition: partition.to_string(), reason: reason.to_string() }
}

/// A filesystem image opened for reading.
enum Fs {
    Ext4(Ext4Image),
    Erofs(ErofsImage),
    Dir(PathBuf),
}

/// One entry as read back, with its content digest for files.
#[derive(Debug, Clone)]
struct Found {
    entry: FsEntry,
    hash: Option<Hash>,
    /// Which partition it came from (for hard-link checks).
    private: bool,
}

/// What a guest sees through its overlay root, as read back.
#[derive(Default)]
struct View {
    slots: BTreeMap<String, Found>,
}

impl View {
    /// Removes `path` and everything below it.
    fn hide(&mut self, path: &str) {
        provd_dedup::remove_tree(&mut self.slots, path);
    }

    /// Puts `f` on top of what is there, with the overlay's rules (the
    /// same as the planner's model).
    fn place(&mut self, f: Found) {
        let (path, dir) = (f.entry.path.clone(), f.entry.kind == EntryKind::Dir);
        provd_dedup::place(&mut self.slots, &path, dir, f, |s| s.entry.kind == EntryKind::Dir);
    }
}

struct Reader<'s> {
    store: &'s Store,
    tools: Tools,
    /// Build directories to remove when done (raw copies of qcow2 images,
    /// EROFS extractions).
    temps: Vec<String>,
    files_hashed: u64,
    bytes_hashed: u64,
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        for t in &self.temps {
            self.store.remove_temp(t);
        }
    }
}

impl Reader<'_> {
    fn temp(&mut self) -> Result<PathBuf, PartitionError> {
        let (name, path) = self.store.create_temp_dir()?;
        self.temps.push(name);
        Ok(path)
    }

    fn open(&mut self, rec: &PartitionRecord) -> Result<Fs, PartitionError> {
        let path = self.store.partition_path(&rec.id)?.join(&rec.file);
        match rec.format {
            PartitionFormat::Ext4 => {
                Ok(Fs::Ext4(Ext4Image::open(&path).map_err(|e| unreadable(&rec.id, e))?))
            }
            PartitionFormat::Qcow2 => {
                let raw = self.temp()?.join("raw.ext4");
                self.tools.run(
                    QEMU_IMG,
                    [
                        std::ffi::OsStr::new("convert"),
                        "-f".as_ref(),
                        "qcow2".as_ref(),
                        "-O".as_ref(),
                        "raw".as_ref(),
                        path.as_os_str(),
                        raw.as_os_str(),
                    ],
                )?;
                Ok(Fs::Ext4(Ext4Image::open(&raw).map_err(|e| unreadable(&rec.id, e))?))
            }
            PartitionFormat::Erofs | PartitionFormat::ErofsLz4 | PartitionFormat::ErofsLz4hc => {
                Ok(Fs::Erofs(ErofsImage::open(&path).map_err(|e| unreadable(&rec.id, e))?))
            }
            PartitionFormat::Dir => Ok(Fs::Dir(path)),
        }
    }

    /// Every entry of `fs` that `keep` maps to a path in the VM's view,
    /// content hashed (each inode once).
    fn read(
        &mut self,
        id: &str,
        fs: &mut Fs,
        keep: &dyn Fn(&str) -> Option<String>,
        private: bool,
    ) -> Result<Vec<Found>, PartitionError> {
        let entries = match fs {
            Fs::Ext4(img) => img.entries(true).map_err(|e| unreadable(id, e))?,
            Fs::Erofs(image) => image.entries().map_err(|e| unreadable(id, e))?,
            Fs::Dir(root) => walk(root).map_err(|e| unreadable(id, e))?,
        };
        let mut hashes: HashMap<u64, Hash> = HashMap::new();
        let mut out = Vec::new();
        for entry in entries {
            let Some(rest) = keep(&entry.path) else { continue };
            let hash = if entry.kind == EntryKind::File {
                if let Some(h) = hashes.get(&entry.ino) {
                    Some(*h)
                } else {
                    let h = self.hash(id, fs, &entry)?;
                    hashes.insert(entry.ino, h);
                    Some(h)
                }
            } else {
                None
            };
            let mut entry = entry;
            entry.path = rest;
            out.push(Found { entry, hash, private });
        }
        Ok(out)
    }

    fn hash(&mut self, id: &str, fs: &mut Fs, e: &FsEntry) -> Result<Hash, PartitionError> {
        let mut hasher = blake3::Hasher::new();
        let n = match fs {
            Fs::Ext4(img) => {
                img.read_file(e.ino, &mut hasher).map_err(|err| unreadable(id, err))?
            }
            // lz4 and lz4hc content is decoded by the reader itself, so
            // nothing is ever extracted onto the node.
            Fs::Erofs(image) => {
                image.read_file(e.ino, &mut hasher).map_err(|err| unreadable(id, err))?
            }
            Fs::Dir(root) => {
                hash_path(&root.join(&e.path), &mut hasher).map_err(|err| unreadable(id, err))?
            }
        };
        if n != e.size {
            return Err(unreadable(id, format!("{}: read {n} bytes of {}", e.path, e.size)));
        }
        self.files_hashed += 1;
        self.bytes_hashed += n;
        Ok(Hash(*hasher.finalize().as_bytes()))
    }
}

fn hash_path(path: &Path, hasher: &mut blake3::Hasher) -> std::io::Result<u64> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)?;
    std::io::copy(&mut f, hasher)
}

use std::os::unix::fs::OpenOptionsExt as _;

/// The entries of a directory-format partition, without following links.
fn walk(root: &Path) -> std::io::Result<Vec<FsEntry>> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new(), 0usize)];
    while let Some((dir, rel, depth)) = stack.pop() {
        if depth > provd_domain::image::MAX_DEPTH {
            return Err(std::io::Error::other(format!("{rel}: nested too deep")));
        }
        for item in std::fs::read_dir(&dir)? {
            let item = item?;
            let name = item.file_name().into_string().map_err(|n| {
                std::io::Error::other(format!("{rel}/{}: not UTF-8", n.to_string_lossy()))
            })?;
            let path = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
            let meta = item.metadata()?;
            let ft = meta.file_type();
            let kind = crate::reader::kind_of(ft)
                .ok_or_else(|| std::io::Error::other(format!("{path}: unsupported file type")))?;
            let rdev = meta.rdev();
            let device = matches!(kind, EntryKind::CharDevice | EntryKind::BlockDevice)
                .then(|| (rustix::fs::major(rdev), rustix::fs::minor(rdev)));
            let link_target = if kind == EntryKind::Symlink {
                Some(std::fs::read_link(item.path())?.to_string_lossy().into_owned())
            } else {
                None
            };
            out.push(FsEntry {
                path: path.clone(),
                kind,
                mode: meta.mode() & 0o7777,
                uid: u64::from(meta.uid()),
                gid: u64::from(meta.gid()),
                size: if kind == EntryKind::File { meta.len() } else { 0 },
                ino: meta.ino(),
                nlink: u32::try_from(meta.nlink()).unwrap_or(u32::MAX),
                link_target,
                device,
            });
            if kind == EntryKind::Dir {
                stack.push((item.path(), path, depth + 1));
            }
        }
    }
    Ok(out)
}

fn key_of(e: &Entry) -> (Option<Hash>, u32, u64, u64) {
    (e.hash, e.mode & 0o7777, e.uid, e.gid)
}

fn octal(mode: u32) -> String {
    format!("{mode:04o}")
}

/// Compares one image entry with what the partitions give at its path.
fn compare(want: &Entry, got: &Found, out: &mut Vec<String>) {
    let path = &want.path;
    let g = &got.entry;
    let want_kind = if want.kind == EntryKind::Hardlink { EntryKind::File } else { want.kind };
    if g.kind != want_kind {
        out.push(format!(
            "{path}: a {} in the partition, a {} in the image",
            g.kind.as_str(),
            want_kind.as_str()
        ));
        return;
    }
    // Linux has no permission bits on symlinks.
    if want_kind != EntryKind::Symlink && g.mode != want.mode & 0o7777 {
        out.push(format!(
            "{path}: mode {} in the partition, {} in the image",
            octal(g.mode),
            octal(want.mode & 0o7777)
        ));
    }
    if g.uid != want.uid || g.gid != want.gid {
        out.push(format!(
            "{path}: owner {}:{} in the partition, {}:{} in the image",
            g.uid, g.gid, want.uid, want.gid
        ));
    }
    match want_kind {
        EntryKind::File if got.hash != want.hash => out.push(format!(
            "{path}: content {} in the partition, {} in the image",
            got.hash.map(|h| h.to_string()).unwrap_or_default(),
            want.hash.map(|h| h.to_string()).unwrap_or_default()
        )),
        EntryKind::Symlink if g.link_target != want.link_target => out.push(format!(
            "{path}: link to {:?} in the partition, to {:?} in the image",
            g.link_target, want.link_target
        )),
        EntryKind::CharDevice | EntryKind::BlockDevice if g.device != want.device => {
            out.push(format!(
                "{path}: device {:?} in the partition, {:?} in the image",
                g.device, want.device
            ))
        }
        _ => {}
    }
}

/// Verifies the partitions of `vm` against the image its private partition
/// was built from.
pub fn verify_vm(
    store: &Store,
    vm: &str,
    opts: &BuildOptions,
) -> Result<Verification, PartitionError> {
    let mine = store.partitions_of_vm(vm)?;
    let private = mine
        .iter()
        .find(|p| p.role == PartitionRole::Private)
        .ok_or_else(|| PartitionError::NotFound(format!("VM {vm:?} has no private partition")))?;
    let manifest: PrivateManifest = serde_json::from_str(&private.manifest)
        .map_err(|e| unreadable(&private.id, format!("its manifest: {e}")))?;
    let image = store.image(&manifest.image)?.ok_or_else(|| {
        PartitionError::NotFound(format!(
            "image {} of VM {vm:?} is no longer in the store",
            manifest.image
        ))
    })?;
    let mut mismatches = Vec::new();
    if image.digest != manifest.image_digest {
        mismatches.push(format!(
            "image {} has digest {} now, {} when the partition was built",
            image.reference, image.digest, manifest.image_digest
        ));
    }
    let mut reader =
        Reader { store, tools: opts.tools(), temps: Vec::new(), files_hashed: 0, bytes_hashed: 0 };

    // The stack on record must be the one the partition carries.
    let recorded = store.stack_of(&private.id)?;
    let carried = manifest.stack_names();
    let on_record: Vec<(String, String)> =
        recorded.iter().map(|s| (s.shared.clone(), s.layer.clone())).collect();
    if carried != on_record {
        mismatches.push(format!(
            "the stack of private partition {} is {carried:?}; the node records {on_record:?}",
            private.id
        ));
    }

    // Each shared partition once, the layers it gives kept apart.
    let mut layers: HashMap<(usize, String), Vec<Found>> = HashMap::new();
    for (index, shared_ref) in manifest.shared.iter().enumerate() {
        let shared = store.partition(&shared_ref.partition)?.ok_or_else(|| {
            PartitionError::NotFound(format!(
                "shared partition {} of VM {vm:?} is gone",
                shared_ref.partition
            ))
        })?;
        let sm: SharedManifest = serde_json::from_str(&shared.manifest)
            .map_err(|e| unreadable(&shared.id, format!("its manifest: {e}")))?;
        if sm.format != shared_ref.format {
            mismatches.push(format!(
                "shared partition {} is {}, the private partition expects {}",
                shared.id,
                sm.format.as_str(),
                shared_ref.format.as_str()
            ));
        }
        let names: Vec<&str> =
            manifest.stack.iter().filter(|i| i.shared == index).map(|i| i.layer.as_str()).collect();
        for item in manifest.stack.iter().filter(|i| i.shared == index) {
            match sm.layers.iter().find(|l| l.id == item.layer) {
                None => mismatches
                    .push(format!("layer {} is not in shared partition {}", item.layer, shared.id)),
                Some(l) if !item.digest.is_empty() && l.digest != item.digest => mismatches.push(
                    format!("layer {} of shared partition {} has another digest", l.id, shared.id),
                ),
                Some(_) => {}
            }
        }
        let mut fs = reader.open(&shared)?;
        let keep = |path: &str| {
            let (layer, rest) = path.strip_prefix("layers/")?.split_once('/')?;
            names.contains(&layer).then(|| format!("{layer}/{rest}"))
        };
        for mut f in reader.read(&shared.id, &mut fs, &keep, false)? {
            let (layer, rest) = f.entry.path.split_once('/').unwrap_or_default();
            let layer = layer.to_string();
            f.entry.path = rest.to_string();
            layers.entry((index, layer)).or_default().push(f);
        }
    }
    // The overlay's view: layers bottom up, then the private partition's
    // upper directory with its whiteouts.
    let mut view = View::default();
    for item in &manifest.stack {
        let mut found = layers.remove(&(item.shared, item.layer.clone())).unwrap_or_default();
        found.sort_by(|a, b| a.entry.path.cmp(&b.entry.path));
        for f in found {
            view.place(f);
        }
    }
    let mut fs = reader.open(private)?;
    let upper = |path: &str| path.strip_prefix("upper/").map(str::to_string);
    let mut own = reader.read(&private.id, &mut fs, &upper, true)?;
    own.sort_by(|a, b| a.entry.path.cmp(&b.entry.path));
    let mut whiteouts = 0u64;
    for f in own {
        if f.entry.kind == EntryKind::CharDevice && f.entry.device == Some((0, 0)) {
            whiteouts += 1;
            view.hide(&f.entry.path);
        } else {
            view.place(f);
        }
    }
    if whiteouts != manifest.whiteouts {
        mismatches.push(format!(
            "private partition {} holds {whiteouts} whiteouts; it was built with {}",
            private.id, manifest.whiteouts
        ));
    }
    let view = view.slots;
    // What the boot script reads must say what the manifest says, and the
    // partition holds nothing else the guest would see or run.
    let boot_files = [
        ("provd/stack", crate::stack_file(&manifest)),
        ("provd/shared", crate::shared_file(&manifest)),
        ("provd/provd-overlay-root", crate::OVERLAY_ROOT_SCRIPT.to_string()),
    ];
    let boot = |path: &str| boot_files.iter().any(|(p, _)| *p == path).then(|| path.to_string());
    let found = reader.read(&private.id, &mut fs, &boot, true)?;
    for (path, text) in &boot_files {
        let want = Hash(*blake3::hash(text.as_bytes()).as_bytes());
        match found.iter().find(|f| f.entry.path == *path) {
            None => {
                mismatches.push(format!("{path}: missing from private partition {}", private.id))
            }
            Some(f) if f.hash != Some(want) => mismatches
                .push(format!("{path}: differs from what partition {} records", private.id)),
            Some(_) => {}
        }
    }
    let stray = |path: &str| {
        let top = path.split('/').next().unwrap_or_default();
        (!["upper", "work", "provd", "lost+found"].contains(&top)
            || (top == "provd"
                && path != "provd"
                && path != "provd/partition.json"
                && !boot_files.iter().any(|(p, _)| *p == path)))
        .then(|| path.to_string())
    };
    for f in reader.read(&private.id, &mut fs, &stray, true)? {
        mismatches
            .push(format!("{}: unexpected in private partition {}", f.entry.path, private.id));
    }

    let mut entries = store.entries(&image, 0, u64::MAX)?;
    // Files added after the build replace or join the image's entries.
    for added in &manifest.added {
        entries.retain(|e| e.path != added.path);
        entries.push(Entry {
            path: added.path.clone(),
            kind: EntryKind::File,
            mode: added.mode,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: added.size,
            hash: Some(added.hash),
            link_target: None,
            device: None,
        });
    }
    let by_path: HashMap<&str, &Found> = view.iter().map(|(p, f)| (p.as_str(), f)).collect();
    // A hard link is expected to stay one only when its target still has
    // the same content and metadata (a later layer may have replaced it).
    let image_keys: HashMap<&str, (Option<Hash>, u32, u64, u64)> =
        entries.iter().map(|e| (e.path.as_str(), key_of(e))).collect();
    for want in &entries {
        match by_path.get(want.path.as_str()) {
            None => mismatches.push(format!("{}: missing from the partitions", want.path)),
            Some(got) => {
                compare(want, got, &mut mismatches);
                // The image's own hard links stay hard links where both
                // names are private (layers are read-only; sharing an
                // inode there is invisible).
                if want.kind == EntryKind::Hardlink
                    && let Some(target_path) = want.link_target.as_deref()
                    && let Some(target) = by_path.get(target_path)
                    && image_keys.get(target_path) == Some(&key_of(want))
                    && got.private
                    && target.private
                    && got.entry.ino != target.entry.ino
                {
                    mismatches.push(format!(
                        "{}: not a hard link to {:?} in the private partition",
                        want.path, want.link_target
                    ));
                }
            }
        }
    }
    let wanted: std::collections::HashSet<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    for path in view.keys().filter(|p| !wanted.contains(p.as_str())) {
        mismatches.push(format!("{path}: in the partitions, not in the image"));
    }
    let count = mismatches.len() as u64;
    mismatches.truncate(MAX_LISTED);
    Ok(Verification {
        vm: vm.to_string(),
        image: image.reference.clone(),
        private: private.id.clone(),
        shared: manifest.shared.iter().map(|s| s.partition.clone()).collect(),
        layers: carried.iter().map(|(partition, layer)| format!("{partition}/{layer}")).collect(),
        entries: entries.len() as u64,
        files_hashed: reader.files_hashed,
        bytes_hashed: reader.bytes_hashed,
        mismatches,
        mismatch_count: count,
    })
}
