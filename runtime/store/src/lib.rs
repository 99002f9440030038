//! The node's state, rooted in its data directory.
//!
//! ```text
//! <data>/provd.lock        exclusive lock: one provd per data directory
//! <data>/provd.db          SQLite (WAL, synchronous=FULL): images, entries, objects
//! <data>/objects/ab/cd…    file contents, one read-only file per BLAKE3 digest
//! <data>/staging/          temporary files of imports and builds in progress
//! <data>/partitions/<id>/  published partitions (see `partitions`)
//! ```
//!
//! **Every file access goes through `cap_std` directory handles opened at
//! the data directory**, and the only names ever written are digests and
//! generated temporary names: nothing an image or a plugin supplies becomes a
//! path on the node.
//!
//! An import writes objects through an [`ObjectWriter`] and then commits the
//! image in one transaction with [`Store::commit_image`]. Objects are synced
//! to disk before the transaction commits, so the database never references
//! a missing object. A writer dropped without committing removes the
//! objects that only it needed, so a failed import leaves nothing behind;
//! after a crash, [`Store::gc`] (run at open) removes unreferenced objects
//! and staging leftovers. Objects are counted once per image that uses them;
//! removing an image frees exactly the objects no other image uses and no
//! layer's entry names (a repack rebuilds layers from them).

mod bundles;
mod db;
mod objects;
mod operations;
mod partitions;
mod private;
mod restack;
mod vms;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cap_std::fs::Dir;
use provd_domain::image::{Entry, Hash};

pub use bundles::{AcceptError, Acceptance, BundleRecord, NewBundle};
pub use db::{ImageRecord, NewImage};
pub use objects::ObjectWriter;
pub use private::check_private;

pub use operations::{
    AuditQuery, AuditRecord, NewAudit, NewOperation, OpState, OperationError, OperationRecord,
    Started,
};
pub use partitions::{
    LayerRecord, LayerUsage, NewLayer, NewPartition, PartitionFormat, PartitionRecord,
    PartitionRole, StackedLayer, new_id, new_partition_id, valid_partition_id,
};
pub use vms::{NewVm, ReserveError, Resources, VmRecord};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// a file operation in the data directory failed
    #[error("{what} in {dir}: {source}")]
    Io { what: String, dir: String, source: std::io::Error },
    /// the database failed
    #[error("database {path}: {source}")]
    Db { path: String, source: rusqlite::Error },
    /// the database failed its integrity check
    #[error("database {path} failed its integrity check: {detail}")]
    Corrupt { path: String, detail: String },
    /// another process holds the data directory
    #[error("data directory {0} is in use by another provd process")]
    Locked(String),
    /// a content exceeded a size limit
    #[error("{what} is larger than {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    /// the disk is too full to continue safely
    #[error("only {free} bytes free in {dir}; at least {needed} must stay free")]
    DiskFull { dir: String, free: u64, needed: u64 },
    /// the image already exists
    #[error("image {0} already exists")]
    Exists(String),
    /// no such image or object
    #[error("{0} not found")]
    NotFound(String),
    /// something still uses what was to be removed
    #[error("{0}")]
    InUse(String),
    /// a path in the data directory is open to other users
    #[error(
        "{path} is mode {mode:04o}: other users may reach or read it, and the node's data must \
         be its own ({fix})"
    )]
    Exposed { path: String, mode: u32, fix: String },
}

/// Figures of a removal or a garbage collection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Freed {
    /// Objects deleted.
    pub objects: u64,
    /// Bytes of content deleted.
    pub bytes: u64,
    /// Temporary files removed from staging.
    pub staging: u64,
}

/// Counts over the whole store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub images: u64,
    pub objects: u64,
    pub object_bytes: u64,
}

/// What the store holds, by kind: how many, and how many bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sizes {
    /// Object files and their bytes (what image content takes on disk).
    pub objects: (u64, u64),
    /// Images and the bytes of their files' content (before
    /// de-duplication).
    pub images: (u64, u64),
    /// Layers of shared partitions and their files' bytes.
    pub layers: (u64, u64),
    /// Partitions and the bytes their files take.
    pub partitions: (u64, u64),
    /// VMs and the bytes of their private partitions.
    pub vms: (u64, u64),
}

/// An image a running operation fetched, kept from removal while this
/// lives ([`Store::hold_image`]).
#[derive(Debug)]
pub struct ImageHold {
    store: std::sync::Weak<Store>,
    reference: String,
}

impl Drop for ImageHold {
    fn drop(&mut self) {
        if let Some(store) = self.store.upgrade() {
            let mut holds = store.lock_holds();
            if let Some(n) = holds.count.get_mut(&self.reference) {
                *n -= 1;
                if *n == 0 {
                    holds.count.remove(&self.reference);
                }
            }
            holds.touch(&self.reference);
        }
    }
}

/// The images running operations hold, and, while a removal is under way,
/// when each was last taken or released, on a clock of the store's own.
#[derive(Debug, Default)]
struct Holds {
    count: HashMap<String, usize>,
    touched: HashMap<String, u64>,
    clock: u64,
    /// The `since` of every [`HoldClock`] alive.
    active: Vec<u64>,
}

impl Holds {
    fn touch(&mut self, reference: &str) {
        self.clock += 1;
        // Only a removal under way compares with the stamps: with none,
        // none is kept, so they never pile up.
        if !self.active.is_empty() {
            self.touched.insert(reference.to_string(), self.clock);
        }
    }
}

/// The holds' clock, read before a caller decides which images are
/// unused ([`Store::hold_clock`]); removals go through it.
#[derive(Debug)]
pub struct HoldClock<'s> {
    store: &'s Store,
    since: u64,
}

impl HoldClock<'_> {
    /// Removes image `reference` as [`Store::remove_image`] does, unless an
    /// operation holds it, or took or released a hold on it since this
    /// clock was read: such an operation may have given a VM the image
    /// after the caller looked at what VMs use. `Err(InUse)` then.
    pub fn remove_unheld_image(&self, reference: &str) -> Result<Freed, StoreError> {
        self.store.remove_unheld_image(reference, self.since)
    }
}

impl Drop for HoldClock<'_> {
    fn drop(&mut self) {
        let mut holds = self.store.lock_holds();
        if let Some(i) = holds.active.iter().position(|s| *s == self.since) {
            holds.active.swap_remove(i);
        }
        match holds.active.iter().min().copied() {
            None => holds.touched.clear(),
            Some(oldest) => holds.touched.retain(|_, t| *t > oldest),
        }
    }
}

/// The node's content-addressed store and database.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    objects: Dir,
    staging: Dir,
    partitions: Dir,
    db: Mutex<rusqlite::Connection>,
    /// A read-only connection for whole-table counts (`Store::sizes`).
    reader: Mutex<rusqlite::Connection>,
    /// Objects an import in progress relies on, with how many imports do.
    /// Removal and gc never delete a pinned object.
    pins: Mutex<HashMap<Hash, usize>>,
    /// Staging files in use outside an object writer (downloads); gc keeps
    /// them.
    temps: Mutex<std::collections::HashSet<String>>,
    /// Images running operations fetched (canonical references), with how
    /// many hold each: [`Store::remove_unheld_image`] keeps them.
    holds: Mutex<Holds>,
    /// Free bytes an import must leave on the data directory's filesystem.
    pub min_free_bytes: u64,
    /// The lock file, held open (and locked) for the store's lifetime; also
    /// the handle for filesystem-wide calls (syncfs, statvfs), which
    /// cap-std's path-only directory handles do not support.
    lock: std::fs::File,
}

/// A handle taken when an operation starts, to sync its writes at its end
/// (`Store::sync_point`, `Store::sync_since`).
#[derive(Debug)]
pub struct SyncPoint(std::fs::File);

impl SyncPoint {
    fn syncfs(&self) -> rustix::io::Result<()> {
        rustix::fs::syncfs(&self.0)
    }
}

/// Default free space an import must leave on the disk.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 256 << 20;

/// Makes every file and directory this process creates from now on its
/// owner's alone (umask 077). The binaries that write a data directory call
/// it first: partitions, seeds and configurations are created by several
/// crates through plain `std::fs`, and the mask is the one place that covers
/// them all. It is process-wide, so a library never calls it for its caller.
pub fn own_files_only() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

impl Store {
    /// Opens (creating if needed) the store in `path`, takes its lock,
    /// checks the database and collects garbage left by a crash.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        // The store hands out paths that VM configurations name; those must
        // be absolute whatever directory the caller started in.
        let absolute = std::path::absolute(path).map_err(|source| StoreError::Io {
            what: "resolving the data directory".into(),
            dir: path.display().to_string(),
            source,
        })?;
        let path = absolute.as_path();
        let display = path.display().to_string();
        let io = |what: &str| {
            let dir = display.clone();
            let what = what.to_string();
            move |source| StoreError::Io { what: what.clone(), dir: dir.clone(), source }
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(io("creating the data directory"))?;
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join("provd.lock"))
            .map_err(io("opening provd.lock"))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Err(StoreError::Locked(display)),
            Err(e) => return Err(io("locking provd.lock")(e.into())),
        }
        let root = Dir::open_ambient_dir(path, cap_std::ambient_authority())
            .map_err(io("opening the data directory"))?;
        for sub in ["objects", "staging", "partitions"] {
            match root.create_dir(sub) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(&format!("creating {sub}/"))(e)),
            }
        }
        // Staging and partitions hold images with other owners' files and
        // setuid bits: root only, whatever the umask or the parent's mode.
        for sub in ["objects", "staging", "partitions"] {
            use cap_std::fs::PermissionsExt;
            root.set_permissions(sub, cap_std::fs::Permissions::from_mode(0o700))
                .map_err(io(&format!("restricting {sub}/")))?;
        }
        let objects = root.open_dir("objects").map_err(io("opening objects/"))?;
        let staging = root.open_dir("staging").map_err(io("opening staging/"))?;
        let partitions = root.open_dir("partitions").map_err(io("opening partitions/"))?;
        let db = db::open(&path.join("provd.db"))?;
        // Stored requests (VM specs, user-data) and every layer's hashes:
        // the owner's alone, whatever the umask of the process that made
        // them. SQLite gives its journal files the database's mode.
        for name in ["provd.db", "provd.db-wal", "provd.db-shm", "provd.lock"] {
            use cap_std::fs::PermissionsExt;
            match root.set_permissions(name, cap_std::fs::Permissions::from_mode(0o600)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&format!("restricting {name}"))(e)),
            }
        }
        let reader = db::open_reader(&path.join("provd.db"))?;
        let store = Store {
            path: path.to_path_buf(),
            objects,
            staging,
            partitions,
            db: Mutex::new(db),
            reader: Mutex::new(reader),
            pins: Mutex::default(),
            temps: Mutex::default(),
            holds: Mutex::default(),
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
            lock,
        };
        // Partitions first: the objects only a freed layer kept go in the
        // same start.
        let swept = store.sweep_partitions()? + store.free_unused_shared()?.len() as u64;
        let freed = store.gc()?;
        if freed != Freed::default() || swept > 0 {
            tracing::info!(?freed, partitions = swept, "removed leftovers of an earlier run");
        }
        Ok(store)
    }

    /// A point to sync from: a handle on the data directory opened now.
    /// The kernel reports a failed write-back once per open file; an
    /// operation that syncs through its own handle learns of every failure
    /// since it started, even one another caller's sync reported first.
    pub fn sync_point(&self) -> Result<SyncPoint, StoreError> {
        std::fs::File::open(&self.path)
            .map(SyncPoint)
            .map_err(|e| self.io_error("opening the data directory to sync", e))
    }

    /// Makes everything written to the data directory's filesystem durable,
    /// failing if any write-back failed since `point` was taken.
    pub fn sync_since(&self, point: &SyncPoint) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        point.syncfs().map_err(|e| self.io_error("syncing the data directory", e.into()))?;
        tracing::debug!(elapsed = ?started.elapsed(), "data directory synced");
        Ok(())
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts writing the objects of one import.
    pub fn writer(&self) -> ObjectWriter<'_> {
        ObjectWriter::new(self)
    }

    fn io_error(&self, what: impl Into<String>, source: std::io::Error) -> StoreError {
        StoreError::Io { what: what.into(), dir: self.path.display().to_string(), source }
    }

    fn db_error(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Db { path: self.path.join("provd.db").display().to_string(), source }
    }

    fn lock_db(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        // A panic while holding the connection leaves no half-done
        // transaction behind (rusqlite rolls back on drop), so the
        // connection stays usable.
        self.db.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_reader(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        self.reader.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_pins(&self) -> std::sync::MutexGuard<'_, HashMap<Hash, usize>> {
        self.pins.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Commits an image whose objects `writer` holds, in one transaction.
    pub fn commit_image(
        &self,
        mut writer: ObjectWriter<'_>,
        image: &NewImage,
        entries: &[Entry],
    ) -> Result<ImageRecord, StoreError> {
        writer.sync()?;
        let record = {
            let mut db = self.lock_db();
            db::insert_image(&mut db, image, entries).map_err(|e| match e {
                db::InsertError::Exists => StoreError::Exists(image.reference.clone()),
                db::InsertError::Db(e) => self.db_error(e),
            })?
        };
        writer.committed(entries.iter().filter_map(|e| e.hash).collect());
        Ok(record)
    }

    /// The image recorded under `reference`.
    pub fn image(&self, reference: &str) -> Result<Option<ImageRecord>, StoreError> {
        db::image(&self.lock_db(), reference).map_err(|e| self.db_error(e))
    }

    /// Every image, oldest first.
    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        db::images(&self.lock_db()).map_err(|e| self.db_error(e))
    }

    /// A page of an image's entries, ordered by path.
    pub fn entries(
        &self,
        image: &ImageRecord,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<Entry>, StoreError> {
        db::entries(&self.lock_db(), image.id, offset, limit).map_err(|e| self.db_error(e))
    }

    /// One entry of an image.
    pub fn entry(&self, image: &ImageRecord, path: &str) -> Result<Option<Entry>, StoreError> {
        db::entry(&self.lock_db(), image.id, path).map_err(|e| self.db_error(e))
    }

    /// Reads an object's content, refusing one larger than `max` bytes.
    pub fn read_object(&self, hash: &Hash, max: u64) -> Result<Vec<u8>, StoreError> {
        objects::read(self, hash, max)
    }

    /// Opens an object for reading.
    pub fn open_object(&self, hash: &Hash) -> Result<cap_std::fs::File, StoreError> {
        objects::open(self, hash)
    }

    /// Removes an image and every object no other image uses and no
    /// layer's entry names.
    pub fn remove_image(&self, reference: &str) -> Result<Freed, StoreError> {
        let pins = self.lock_pins();
        let unused = self.remove_image_rows(reference)?;
        self.delete_unpinned(&pins, unused)
    }

    /// Deletes an image's rows; the objects no image uses any more.
    fn remove_image_rows(&self, reference: &str) -> Result<Vec<(Hash, u64)>, StoreError> {
        let mut db = self.lock_db();
        db::remove_image(&mut db, reference)
            .map_err(|e| self.db_error(e))?
            .ok_or_else(|| StoreError::NotFound(format!("image {reference}")))
    }

    /// Deletes the files of `unused` that no import has pinned, with the
    /// pins held: an import pins an object before it looks for its file.
    fn delete_unpinned(
        &self,
        pins: &HashMap<Hash, usize>,
        unused: Vec<(Hash, u64)>,
    ) -> Result<Freed, StoreError> {
        let mut freed = Freed::default();
        for (hash, size) in unused {
            if pins.contains_key(&hash) {
                continue;
            }
            if objects::delete(self, &hash)? {
                freed.objects += 1;
                freed.bytes += size;
            }
        }
        Ok(freed)
    }

    /// Deletes every object file no image references and no layer's entry
    /// names, and every staging leftover, and drops object rows no image
    /// uses. Objects pinned by imports in progress are kept; staging is
    /// cleared only while no import runs.
    pub fn gc(&self) -> Result<Freed, StoreError> {
        self.collect(true)
    }

    /// [`Store::gc`] without the staging leftovers: for a node whose
    /// operations may be writing there (an object's first bytes, a
    /// partition build), which only the start clears.
    pub fn gc_objects(&self) -> Result<Freed, StoreError> {
        self.collect(false)
    }

    fn collect(&self, staging: bool) -> Result<Freed, StoreError> {
        // The files are listed, and what is kept read, without holding the
        // pins: a scan of a large store must not stop imports meanwhile.
        // Each candidate is checked again under the pins and the database,
        // since an import may have pinned it or committed an image that
        // uses it since; one published after the listing is not a
        // candidate.
        let on_disk = objects::list(self)?;
        db::drop_unreferenced(&mut self.lock_db()).map_err(|e| self.db_error(e))?;
        // Read on the read-only connection: the writer's stays free for the
        // scan, and a commit after this read is caught by the checks below.
        let kept = db::kept(&self.lock_reader()).map_err(|e| self.db_error(e))?;
        let mut freed = Freed::default();
        for (hash, size) in on_disk {
            if kept.contains(&hash) {
                continue;
            }
            let pins = self.lock_pins();
            if pins.contains_key(&hash) {
                continue;
            }
            let db = self.lock_db();
            if db::is_kept(&db, &hash).map_err(|e| self.db_error(e))? {
                continue;
            }
            if objects::delete(self, &hash)? {
                freed.objects += 1;
                freed.bytes += size;
            }
        }
        let pins = self.lock_pins();
        if staging && pins.is_empty() {
            let temps = self.temps.lock().unwrap_or_else(|p| p.into_inner());
            freed.staging = objects::clear_staging(self, &temps)?;
        }
        Ok(freed)
    }

    /// Objects an image references whose file is missing: none, unless
    /// someone removed files behind provd's back. (Objects only layers
    /// name are left out: a store from before layers kept their objects
    /// lacks some of them, which is no damage to any image.)
    pub fn missing_objects(&self) -> Result<Vec<Hash>, StoreError> {
        let referenced = db::referenced(&self.lock_db()).map_err(|e| self.db_error(e))?;
        let on_disk: std::collections::HashSet<Hash> =
            objects::list(self)?.into_iter().map(|(h, _)| h).collect();
        let mut missing: Vec<Hash> = referenced.difference(&on_disk).copied().collect();
        missing.sort();
        Ok(missing)
    }

    /// Keeps image `reference` from [`Store::remove_unheld_image`] until
    /// the hold is dropped. Taken before an operation fetches the image, so
    /// that a collection running meanwhile either removed it before (and
    /// the fetch imports it again) or keeps it.
    pub fn hold_image(self: &std::sync::Arc<Self>, reference: &str) -> ImageHold {
        let mut holds = self.lock_holds();
        *holds.count.entry(reference.to_string()).or_insert(0) += 1;
        holds.touch(reference);
        ImageHold { store: std::sync::Arc::downgrade(self), reference: reference.to_string() }
    }

    /// The images running operations hold.
    pub fn held_images(&self) -> std::collections::HashSet<String> {
        self.lock_holds().count.keys().cloned().collect()
    }

    /// The holds' clock now, read before a caller decides which images are
    /// unused; its removals keep what operations touched since.
    pub fn hold_clock(&self) -> HoldClock<'_> {
        let mut holds = self.lock_holds();
        let since = holds.clock;
        holds.active.push(since);
        HoldClock { store: self, since }
    }

    fn remove_unheld_image(&self, reference: &str, since: u64) -> Result<Freed, StoreError> {
        let holds = self.lock_holds();
        if holds.count.contains_key(reference) {
            return Err(StoreError::InUse(format!(
                "image {reference} is in use by a running operation"
            )));
        }
        if holds.touched.get(reference).is_some_and(|t| *t > since) {
            return Err(StoreError::InUse(format!(
                "image {reference} was fetched by an operation meanwhile"
            )));
        }
        // The holds only until the image's rows are gone: a fetch waiting
        // for them then finds no image and imports it again. Its objects
        // go under the pins, which such an import takes before it looks
        // for a file.
        let pins = self.lock_pins();
        let unused = self.remove_image_rows(reference)?;
        drop(holds);
        self.delete_unpinned(&pins, unused)
    }

    fn lock_holds(&self) -> std::sync::MutexGuard<'_, Holds> {
        self.holds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that an operation fetched image `reference` now.
    pub fn touch_image(&self, reference: &str) -> Result<(), StoreError> {
        db::touch_image(&self.lock_db(), reference).map_err(|e| self.db_error(e))
    }

    /// What the store holds, by kind.
    pub fn sizes(&self) -> Result<Sizes, StoreError> {
        db::sizes(&self.lock_reader()).map_err(|e| self.db_error(e))
    }

    /// Whether the database answers through the writer's connection: one
    /// read of a small table, so a health probe costs the same on any
    /// store, and a node whose writer is stuck is not reported healthy.
    pub fn check_readable(&self) -> Result<(), StoreError> {
        self.lock_db()
            .query_row("SELECT count(*) FROM vms", [], |_| Ok(()))
            .map_err(|e| self.db_error(e))
    }

    /// Counts over the store.
    pub fn stats(&self) -> Result<Stats, StoreError> {
        db::stats(&self.lock_db()).map_err(|e| self.db_error(e))
    }

    /// Creates an empty private file in staging for a download; gc leaves
    /// it alone until [`Store::remove_temp`].
    pub fn create_temp(&self) -> Result<(String, cap_std::fs::File), StoreError> {
        let name = objects::temp_name();
        let mut opts = cap_std::fs::OpenOptions::new();
        opts.read(true).write(true).create_new(true);
        let file = self
            .staging
            .open_with(&name, &opts)
            .map_err(|e| self.io_error("creating a download file", e))?;
        self.temps.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone());
        Ok((name, file))
    }

    /// Reopens a file made by [`Store::create_temp`] from its start.
    pub fn open_temp(&self, name: &str) -> Result<cap_std::fs::File, StoreError> {
        self.staging.open(name).map_err(|e| self.io_error(format!("opening download {name}"), e))
    }

    /// Deletes a file made by [`Store::create_temp`] or a directory made by
    /// [`Store::create_temp_dir`].
    pub fn remove_temp(&self, name: &str) {
        self.temps.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
        if let Err(e) = self.staging.remove_file(name).or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Err(e)
            } else {
                self.staging.remove_dir_all(name)
            }
        }) && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(error = %e, name, "cannot remove a download; gc will");
        }
    }

    /// Names of files in staging (for tests that check nothing is left).
    pub fn staging_files(&self) -> Result<Vec<String>, StoreError> {
        objects::staging_names(self)
    }
}

#[cfg(test)]
mod tests {
    // Tests: a failed unwrap is a failed test.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A scrape's whole-table counts go through the read-only connection:
    /// they answer while the writer's connection is held, as a long import
    /// holds it.
    #[test]
    fn sizes_answer_while_the_writer_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(dir.path()).unwrap());
        let held = store.lock_db();
        let (tx, rx) = std::sync::mpsc::channel();
        let other = std::sync::Arc::clone(&store);
        std::thread::spawn(move || tx.send(other.sizes().map(|s| s.vms)).ok());
        let vms = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("sizes waited for the writer's connection");
        assert_eq!(vms.unwrap(), (0, 0));
        drop(held);
        store.check_readable().unwrap();
    }
}
