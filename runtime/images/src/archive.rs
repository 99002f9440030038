//! Tar archives (plain, gzip, zstd) into the store, with caps that defuse
//! decompression bombs.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use provd_domain::image::{Entry, EntryKind, check_link_target, normalize_path};
use provd_store::ObjectWriter;

use crate::tree::TreeBuilder;
use crate::{ImportError, ImportLimits, Progress};

/// Compression of an archive, detected from its first bytes rather than
/// trusted from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

pub(crate) fn detect(magic: &[u8]) -> Compression {
    match magic {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
        _ => Compression::None,
    }
}

/// Counts bytes read through it into a shared counter.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Enforces the caps on the decompressed stream: an absolute size, and a
/// ratio to the compressed bytes once past a grace amount (small archives
/// of zeros legitimately compress very well).
struct Bounded<R> {
    inner: R,
    compressed: Arc<AtomicU64>,
    produced: u64,
    limits: ImportLimits,
    breached: Arc<std::sync::Mutex<Option<(String, u64)>>>,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.produced += n as u64;
        let compressed = self.compressed.load(Ordering::Relaxed).max(1);
        let breach = if self.produced > self.limits.max_unpacked_bytes {
            Some(("unpacked bytes".to_string(), self.limits.max_unpacked_bytes))
        } else if compressed > self.limits.max_archive_bytes {
            Some(("archive bytes".to_string(), self.limits.max_archive_bytes))
        } else if self.produced > self.limits.ratio_grace_bytes
            && self.produced / compressed > self.limits.max_ratio
        {
            Some(("decompression ratio".to_string(), self.limits.max_ratio))
        } else {
            None
        };
        if let Some(b) = breach {
            if let Ok(mut slot) = self.breached.lock() {
                slot.get_or_insert(b);
            }
            return Err(std::io::Error::other("import limit reached"));
        }
        Ok(n)
    }
}

/// Reads every entry of a tar stream into `tree`, storing file contents.
#[allow(clippy::too_many_arguments)]
pub(crate) fn unpack(
    reader: Box<dyn Read>,
    compression: Compression,
    tree: &mut TreeBuilder,
    objects: &mut ObjectWriter<'_>,
    limits: &ImportLimits,
    reference: &str,
    progress: &dyn Progress,
    layered: bool,
) -> Result<(), ImportError> {
    let compressed = Arc::new(AtomicU64::new(0));
    let counted = Counting { inner: reader, count: compressed.clone() };
    let decompressed: Box<dyn Read> = match compression {
        Compression::None => Box::new(counted),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(counted)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(counted).map_err(|e| {
            ImportError::Archive { reference: reference.into(), problem: format!("zstd: {e}") }
        })?),
    };
    let breached = Arc::default();
    let bounded = Bounded {
        inner: decompressed,
        compressed: compressed.clone(),
        produced: 0,
        limits: limits.clone(),
        breached: Arc::clone(&breached),
    };
    let mut archive = tar::Archive::new(bounded);
    let mut last_entry = String::new();
    let result = read_entries(
        &mut archive,
        tree,
        objects,
        reference,
        &mut last_entry,
        progress,
        &compressed,
        layered,
    );
    // A cap hit inside the decompressor surfaces as an I/O error of the tar
    // reader; report the cap instead.
    if let Some((what, limit)) = breached.lock().ok().and_then(|b| b.clone()) {
        return Err(ImportError::Limit { reference: reference.into(), what, limit });
    }
    result.map_err(|e| match e {
        ImportError::Archive { reference, problem } if !last_entry.is_empty() => {
            ImportError::Archive {
                reference,
                problem: format!("{problem} (after entry {last_entry})"),
            }
        }
        other => other,
    })
}

/// Longest parser message quoted in an error.
const MAX_PROBLEM_CHARS: usize = 160;

fn archive_error(reference: &str, e: impl std::fmt::Display) -> ImportError {
    // The tar parser quotes the bytes it could not parse; for a file that is
    // not an archive at all those are its contents, which do not belong in
    // logs. Keep one short line.
    let text = e.to_string();
    let mut problem: String = text
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(MAX_PROBLEM_CHARS)
        .collect();
    if text.chars().count() > problem.chars().count() {
        problem.push('…');
    }
    ImportError::Archive { reference: reference.into(), problem }
}

/// OCI whiteouts: `.wh..wh..opq` makes its directory opaque, `.wh.<name>`
/// deletes `<name>` of the layers below. Returns whether `path` was one.
/// Other `.wh.` names are refused, not guessed at.
fn apply_whiteout(tree: &mut TreeBuilder, path: &str) -> Result<bool, ImportError> {
    const PREFIX: &str = ".wh.";
    const OPAQUE: &str = ".wh..wh..opq";
    let (dir, name) = match path.rsplit_once('/') {
        Some((dir, name)) => (dir, name),
        None => ("", path),
    };
    if dir.split('/').any(|c| c.starts_with(PREFIX)) {
        return Err(tree.entry_error(path, "lies under a whiteout name"));
    }
    if name == OPAQUE {
        tree.opaque(dir);
        return Ok(true);
    }
    let Some(hidden) = name.strip_prefix(PREFIX) else { return Ok(false) };
    if hidden.is_empty() || hidden.starts_with(PREFIX) || hidden == "." || hidden == ".." {
        return Err(tree.entry_error(path, "is not a whiteout provd understands"));
    }
    let target = if dir.is_empty() { hidden.to_string() } else { format!("{dir}/{hidden}") };
    tree.whiteout(&target);
    Ok(true)
}

#[allow(clippy::too_many_arguments)]
fn read_entries<R: Read>(
    archive: &mut tar::Archive<R>,
    tree: &mut TreeBuilder,
    objects: &mut ObjectWriter<'_>,
    reference: &str,
    last_entry: &mut String,
    progress: &dyn Progress,
    compressed: &AtomicU64,
    layered: bool,
) -> Result<(), ImportError> {
    for entry in archive.entries().map_err(|e| archive_error(reference, e))? {
        let mut entry = entry.map_err(|e| archive_error(reference, e))?;
        // The tar reader skips a PAX record it cannot parse (it splits them
        // at newlines, where POSIX counts lengths) and falls back to the
        // header's own fields: provd would record another name than other
        // tools read. Such an entry is refused.
        let pax_broken = match entry.pax_extensions() {
            Ok(Some(mut records)) => records.any(|r| r.is_err()),
            Ok(None) => false,
            Err(_) => true,
        };
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        if pax_broken {
            return Err(tree.entry_error(&shown, "its PAX extended header has a malformed record"));
        }
        let raw = std::str::from_utf8(&raw)
            .map_err(|_| tree.entry_error(&shown, "name is not valid UTF-8"))?
            .to_string();
        let header = entry.header().clone();
        let entry_type = header.entry_type();
        // PAX global headers carry defaults for later entries; provd reads
        // each entry's own metadata and skips them.
        if entry_type == tar::EntryType::XGlobalHeader {
            continue;
        }
        let path = match normalize_path(&raw) {
            Ok(Some(p)) => p,
            // The archive's own root ("./"): nothing to record.
            Ok(None) if entry_type.is_dir() => continue,
            Ok(None) => {
                return Err(tree.entry_error(&shown, "names the image root but is not a directory"));
            }
            Err(problem) => return Err(tree.entry_error(&shown, format!("path {problem}"))),
        };
        *last_entry = path.clone();
        if layered && apply_whiteout(tree, &path)? {
            continue;
        }
        let field = |what: &str, e: std::io::Error| {
            tree.entry_error(&path, format!("bad {what} in header: {e}"))
        };
        let mode = header.mode().map_err(|e| field("mode", e))? & 0o7777;
        let uid = header.uid().map_err(|e| field("uid", e))?;
        let gid = header.gid().map_err(|e| field("gid", e))?;
        let mtime =
            i64::try_from(header.mtime().map_err(|e| field("mtime", e))?).unwrap_or(i64::MAX);
        let size = entry.size();
        let kind = match entry_type {
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => EntryKind::Symlink,
            tar::EntryType::Link => EntryKind::Hardlink,
            tar::EntryType::Char => EntryKind::CharDevice,
            tar::EntryType::Block => EntryKind::BlockDevice,
            tar::EntryType::Fifo => EntryKind::Fifo,
            other => {
                return Err(tree.entry_error(&path, format!("unsupported entry type {other:?}")));
            }
        };
        let content_size = if kind == EntryKind::File { size } else { 0 };
        tree.check(&path, content_size)?;
        let mut record = Entry {
            path: path.clone(),
            kind,
            mode,
            uid,
            gid,
            mtime,
            size: 0,
            hash: None,
            link_target: None,
            device: None,
        };
        match kind {
            EntryKind::File => {
                let hash = objects.add(&mut entry, size, &format!("entry {path}")).map_err(
                    |e| match e {
                        provd_store::StoreError::Io { source, .. }
                            if source.kind() == std::io::ErrorKind::UnexpectedEof =>
                        {
                            tree.entry_error(&path, "archive ends inside this entry's content")
                        }
                        // A cap the bounded reader hit is reported by `unpack`,
                        // which knows which one.
                        other => ImportError::Store(other),
                    },
                )?;
                record.size = size;
                record.hash = Some(hash);
            }
            EntryKind::Symlink | EntryKind::Hardlink => {
                let raw_target = entry
                    .link_name_bytes()
                    .ok_or_else(|| tree.entry_error(&path, "link without a target"))?
                    .into_owned();
                let target = std::str::from_utf8(&raw_target)
                    .map_err(|_| tree.entry_error(&path, "link target is not valid UTF-8"))?
                    .to_string();
                if kind == EntryKind::Symlink {
                    check_link_target(&target)
                        .map_err(|p| tree.entry_error(&path, format!("symlink target {p}")))?;
                    record.link_target = Some(target);
                } else {
                    let target = match normalize_path(&target) {
                        Ok(Some(t)) => t,
                        Ok(None) => {
                            return Err(tree.entry_error(&path, "hard link to the image root"));
                        }
                        Err(p) => {
                            return Err(tree.entry_error(&path, format!("hard link target {p}")));
                        }
                    };
                    let (hash, size) = tree.hardlink_target(&path, &target)?;
                    record.hash = Some(hash);
                    record.size = size;
                    record.link_target = Some(target);
                }
            }
            EntryKind::CharDevice | EntryKind::BlockDevice => {
                let major =
                    header.device_major().map_err(|e| field("device major", e))?.unwrap_or(0);
                let minor =
                    header.device_minor().map_err(|e| field("device minor", e))?.unwrap_or(0);
                record.device = Some((major, minor));
            }
            EntryKind::Dir | EntryKind::Fifo => {}
        }
        tree.push(record);
        progress.entry(compressed.load(Ordering::Relaxed), content_size);
    }
    Ok(())
}
