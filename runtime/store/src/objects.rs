//! Object files: writing, reading, deleting, listing.
//!
//! An object is written to a generated name in `staging/`, hashed on the
//! way, made read-only and renamed to `objects/<first two hex>/<hex>`.
//! Objects are never written in place or through a link, so a shared
//! object can never be changed by whoever uses it.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use cap_std::fs::{Dir, OpenOptions, Permissions};
use provd_domain::image::Hash;

use crate::{Store, StoreError};

/// Contents up to this size are read into memory and hashed before anything
/// is written, so content already in the store costs no disk write at all.
const IN_MEMORY_BYTES: u64 = 1 << 20;
/// How often, in bytes written, free space is checked during an import.
const SPACE_CHECK_EVERY: u64 = 64 << 20;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

pub(crate) fn temp_name() -> String {
    format!("obj-{}-{}", std::process::id(), TEMP_COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn object_dir(hash: &Hash) -> String {
    hash.to_hex().get(..2).unwrap_or("00").to_string()
}

/// Writes the objects of one import. Dropped without
/// [`Store::commit_image`], it removes the objects that only it needed.
#[derive(Debug)]
pub struct ObjectWriter<'s> {
    store: &'s Store,
    /// Distinct objects this import relies on, pinned against deletion.
    pinned: Vec<Hash>,
    /// Bytes written to disk by this import (new objects only).
    written: u64,
    next_space_check: u64,
    /// Set at commit: the objects the committed image uses.
    committed: Option<std::collections::HashSet<Hash>>,
    /// Where this import's sync starts from (`Store::sync_point`).
    point: Option<crate::SyncPoint>,
}

impl<'s> ObjectWriter<'s> {
    pub(crate) fn new(store: &'s Store) -> Self {
        ObjectWriter {
            store,
            pinned: Vec::new(),
            written: 0,
            next_space_check: 0,
            committed: None,
            // Taken before the first object is written: the import's sync
            // hears of every failed write-back since, whoever synced first
            // (the store's own handle is the fallback if it cannot open).
            point: store.sync_point().ok(),
        }
    }

    /// Bytes of new object content this import wrote.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Stores the content read from `reader`, which must be exactly
    /// `size` bytes, and returns its digest. `what` names the content in
    /// errors.
    pub fn add(
        &mut self,
        reader: &mut dyn Read,
        size: u64,
        what: &str,
    ) -> Result<Hash, StoreError> {
        self.check_space()?;
        if size <= IN_MEMORY_BYTES {
            let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            reader
                .take(size + 1)
                .read_to_end(&mut buf)
                .map_err(|e| self.store.io_error(format!("reading {what}"), e))?;
            check_length(what, buf.len() as u64, size)?;
            let hash = Hash(*blake3::hash(&buf).as_bytes());
            if self.pin(hash) {
                return Ok(hash);
            }
            let tmp = temp_name();
            let result = self.write_temp(&tmp, &mut buf.as_slice(), size, what);
            self.publish(hash, &tmp, result.map(|_| hash))
        } else {
            let tmp = temp_name();
            let result = self.write_temp(&tmp, reader, size, what);
            let hash = match result {
                Ok(hash) => hash,
                Err(e) => {
                    let _ = self.store.staging.remove_file(&tmp);
                    return Err(e);
                }
            };
            if self.pin(hash) {
                let _ = self.store.staging.remove_file(&tmp);
                return Ok(hash);
            }
            self.publish(hash, &tmp, Ok(hash))
        }
    }

    /// Pins `hash` for this import; returns whether its object is already
    /// on disk (and so needs no writing).
    fn pin(&mut self, hash: Hash) -> bool {
        let mut pins = self.store.lock_pins();
        if !self.pinned.contains(&hash) {
            *pins.entry(hash).or_insert(0) += 1;
            self.pinned.push(hash);
        }
        // Checked while holding the pins: removal deletes only unpinned
        // objects, so an object seen here stays until this import ends.
        self.store.objects.exists(format!("{}/{}", object_dir(&hash), hash.to_hex()))
    }

    /// Copies `reader` into a new staging file, hashing it, and returns the
    /// digest.
    fn write_temp(
        &mut self,
        tmp: &str,
        reader: &mut dyn Read,
        size: u64,
        what: &str,
    ) -> Result<Hash, StoreError> {
        let store = self.store;
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        let mut file = store
            .staging
            .open_with(tmp, &opts)
            .map_err(|e| store.io_error(format!("creating a staging file for {what}"), e))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0u64;
        let mut limited = reader.take(size + 1);
        loop {
            let n =
                limited.read(&mut buf).map_err(|e| store.io_error(format!("reading {what}"), e))?;
            if n == 0 {
                break;
            }
            let chunk = buf.get(..n).unwrap_or_default();
            hasher.update(chunk);
            file.write_all(chunk)
                .map_err(|e| store.io_error(format!("writing {what} to staging"), e))?;
            total += n as u64;
            self.written += n as u64;
            if self.written >= self.next_space_check {
                self.check_space()?;
            }
        }
        check_length(what, total, size)?;
        // Read-only, and the node's own (docs/security.md).
        file.set_permissions(Permissions::from_std(std::os::unix::fs::PermissionsExt::from_mode(
            0o400,
        )))
        .map_err(|e| store.io_error(format!("making {what} read-only"), e))?;
        Ok(Hash(*hasher.finalize().as_bytes()))
    }

    /// Moves a finished staging file to its place in `objects/`.
    fn publish(
        &mut self,
        hash: Hash,
        tmp: &str,
        written: Result<Hash, StoreError>,
    ) -> Result<Hash, StoreError> {
        let store = self.store;
        if let Err(e) = written {
            let _ = store.staging.remove_file(tmp);
            return Err(e);
        }
        let sub = object_dir(&hash);
        if let Err(e) = store.objects.create_dir(&sub)
            && e.kind() != std::io::ErrorKind::AlreadyExists
        {
            let _ = store.staging.remove_file(tmp);
            return Err(store.io_error("creating an object directory", e));
        }
        store.staging.rename(tmp, &store.objects, format!("{sub}/{}", hash.to_hex())).map_err(
            |e| {
                let _ = store.staging.remove_file(tmp);
                store.io_error(format!("publishing object {hash}"), e)
            },
        )?;
        Ok(hash)
    }

    fn check_space(&mut self) -> Result<(), StoreError> {
        let store = self.store;
        let stat = rustix::fs::fstatvfs(&store.lock)
            .map_err(|e| store.io_error("checking free space", e.into()))?;
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        if free < store.min_free_bytes {
            return Err(StoreError::DiskFull {
                dir: store.path.display().to_string(),
                free,
                needed: store.min_free_bytes,
            });
        }
        self.next_space_check = self.written + SPACE_CHECK_EVERY;
        Ok(())
    }

    /// Makes every object of this import durable.
    pub(crate) fn sync(&mut self) -> Result<(), StoreError> {
        // One syncfs flushes every object written, far cheaper than an
        // fsync per file for images of tens of thousands of files.
        match &self.point {
            Some(point) => point.syncfs(),
            None => rustix::fs::syncfs(&self.store.lock),
        }
        .map_err(|e| self.store.io_error("syncing objects", e.into()))
    }

    pub(crate) fn committed(&mut self, used: std::collections::HashSet<Hash>) {
        self.committed = Some(used);
    }
}

impl Drop for ObjectWriter<'_> {
    fn drop(&mut self) {
        let mut pins = self.store.lock_pins();
        let mut released = Vec::new();
        for hash in self.pinned.drain(..) {
            if let Some(count) = pins.get_mut(&hash) {
                *count -= 1;
                if *count == 0 {
                    pins.remove(&hash);
                    released.push(hash);
                }
            }
        }
        // Objects this import stored that its image does not use (a failed
        // import, or content a later OCI layer hid) go, unless another image
        // uses them or another import relies on them.
        let unused: Vec<Hash> = match &self.committed {
            Some(used) => released.into_iter().filter(|h| !used.contains(h)).collect(),
            None => released,
        };
        if unused.is_empty() {
            return;
        }
        let db = self.store.lock_db();
        for hash in unused {
            match crate::db::is_kept(&db, &hash) {
                Ok(true) => {}
                Ok(false) => {
                    if let Err(e) = delete(self.store, &hash) {
                        tracing::warn!(error = %e, %hash, "cannot remove an unused object; gc will");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot check an object's use; gc will"),
            }
        }
    }
}

fn check_length(what: &str, got: u64, expected: u64) -> Result<(), StoreError> {
    if got > expected {
        return Err(StoreError::TooLarge { what: what.into(), limit: expected });
    }
    if got < expected {
        return Err(StoreError::Io {
            what: format!("reading {what}"),
            dir: String::new(),
            source: std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("content ended after {got} of {expected} bytes"),
            ),
        });
    }
    Ok(())
}

fn path_of(hash: &Hash) -> String {
    format!("{}/{}", object_dir(hash), hash.to_hex())
}

pub(crate) fn open(store: &Store, hash: &Hash) -> Result<cap_std::fs::File, StoreError> {
    store.objects.open(path_of(hash)).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            StoreError::NotFound(format!("object {hash}"))
        } else {
            store.io_error(format!("opening object {hash}"), e)
        }
    })
}

pub(crate) fn read(store: &Store, hash: &Hash, max: u64) -> Result<Vec<u8>, StoreError> {
    let file = open(store, hash)?;
    let mut buf = Vec::new();
    file.take(max.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| store.io_error(format!("reading object {hash}"), e))?;
    if buf.len() as u64 > max {
        return Err(StoreError::TooLarge { what: format!("object {hash}"), limit: max });
    }
    Ok(buf)
}

/// Deletes an object file; `false` if it was not there.
pub(crate) fn delete(store: &Store, hash: &Hash) -> Result<bool, StoreError> {
    match store.objects.remove_file(path_of(hash)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(store.io_error(format!("deleting object {hash}"), e)),
    }
}

/// Every object file with its size.
pub(crate) fn list(store: &Store) -> Result<Vec<(Hash, u64)>, StoreError> {
    let io = |e| store.io_error("listing objects", e);
    let mut out = Vec::new();
    for sub in store.objects.entries().map_err(io)? {
        let sub = sub.map_err(io)?;
        let Ok(sub_name) = sub.file_name().into_string() else { continue };
        let Ok(dir): Result<Dir, _> = store.objects.open_dir(&sub_name) else { continue };
        for obj in dir.entries().map_err(io)? {
            let obj = obj.map_err(io)?;
            let Some(hash) = obj.file_name().to_str().and_then(Hash::from_hex) else { continue };
            let size = obj.metadata().map(|m| m.len()).unwrap_or(0);
            out.push((hash, size));
        }
    }
    Ok(out)
}

pub(crate) fn staging_names(store: &Store) -> Result<Vec<String>, StoreError> {
    let io = |e| store.io_error("listing staging", e);
    let mut out = Vec::new();
    for entry in store.staging.entries().map_err(io)? {
        out.push(entry.map_err(io)?.file_name().to_string_lossy().into_owned());
    }
    Ok(out)
}

pub(crate) fn clear_staging(
    store: &Store,
    keep: &std::collections::HashSet<String>,
) -> Result<u64, StoreError> {
    let mut removed = 0;
    for name in staging_names(store)? {
        if keep.contains(&name) {
            continue;
        }
        let gone =
            store.staging.remove_file(&name).or_else(|_| store.staging.remove_dir_all(&name));
        if gone.is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}
