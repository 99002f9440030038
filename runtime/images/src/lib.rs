//! Software images: from a reference to entries and objects in the store.
//!
//! [`Images::import`] resolves a [`Reference`], reads the source once, and
//! commits the image to the [`provd_store::Store`]: every regular file's
//! content as an object keyed by BLAKE3 (hashed while it is read), every
//! entry as a row. Nothing from the image is ever created on the node as
//! what it claims to be — no directories, links or devices, only objects
//! named by digest — so path tricks in an archive have nothing to act on;
//! they are refused anyway, with the entry named, because an archive that
//! carries them is not one to trust.
//!
//! Concurrent imports of the same reference share one read and one commit;
//! imports of different references run in parallel up to a limit.

mod archive;
mod reference;
mod tree;
mod tree_dir;

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use provd_store::{ImageRecord, NewImage, Store, StoreError};

pub use reference::{Reference, ReferenceError};

/// Caps on what one import may read and store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportLimits {
    /// Entries in one image.
    pub max_entries: u64,
    /// Size of one file.
    pub max_file_bytes: u64,
    /// Total file content of one image.
    pub max_content_bytes: u64,
    /// Bytes of the (compressed) archive read.
    pub max_archive_bytes: u64,
    /// Bytes of the decompressed tar stream.
    pub max_unpacked_bytes: u64,
    /// Decompressed bytes per compressed byte, once past `ratio_grace_bytes`.
    pub max_ratio: u64,
    pub ratio_grace_bytes: u64,
}

impl Default for ImportLimits {
    fn default() -> Self {
        const GIB: u64 = 1 << 30;
        ImportLimits {
            max_entries: 2_000_000,
            max_file_bytes: 16 * GIB,
            max_content_bytes: 64 * GIB,
            max_archive_bytes: 64 * GIB,
            max_unpacked_bytes: 80 * GIB,
            // OS images compress 3-5x with gzip or zstd; 100x leaves room
            // for sparse content without letting a bomb run.
            max_ratio: 100,
            ratio_grace_bytes: 64 << 20,
        }
    }
}

/// Why an import failed. Every variant names the image reference.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// the source could not be read
    #[error("{reference}: {detail}")]
    Source { reference: String, detail: String },
    /// an entry of the image was refused
    #[error("{reference}: entry {entry:?} {problem}")]
    Entry { reference: String, entry: String, problem: String },
    /// the archive itself is malformed
    #[error("{reference}: malformed archive: {problem}")]
    Archive { reference: String, problem: String },
    /// an import cap was reached
    #[error("{reference}: more {what} than the limit of {limit}")]
    Limit { reference: String, what: String, limit: u64 },
    /// the store failed
    #[error(transparent)]
    Store(#[from] StoreError),
    /// the import task failed
    #[error("import of {0} was interrupted")]
    Interrupted(String),
}

/// Receives progress of an import: called once per entry with the archive
/// bytes read so far and the content bytes of that entry.
pub trait Progress: Send + Sync {
    fn entry(&self, archive_bytes: u64, content_bytes: u64);
}

/// A progress receiver that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn entry(&self, _: u64, _: u64) {}
}

type Shared = Arc<tokio::sync::OnceCell<Result<ImageRecord, Arc<ImportError>>>>;

/// The image service of a node.
#[derive(Debug)]
pub struct Images {
    store: Arc<Store>,
    limits: ImportLimits,
    inflight: Mutex<HashMap<String, Shared>>,
    permits: tokio::sync::Semaphore,
    reads: Arc<AtomicU64>,
}

impl Images {
    /// `parallel` imports of different images run at once.
    pub fn new(store: Arc<Store>, limits: ImportLimits, parallel: usize) -> Images {
        Images {
            store,
            limits,
            inflight: Mutex::default(),
            permits: tokio::sync::Semaphore::new(parallel.max(1)),
            reads: Arc::default(),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// How many times a source was actually read (for tests and metrics).
    pub fn source_reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Imports the image `reference` names, or returns it if the store
    /// already has it. Concurrent calls for one reference share one import.
    pub async fn import(
        &self,
        reference: &str,
        progress: Arc<dyn Progress>,
    ) -> Result<ImageRecord, Arc<ImportError>> {
        let reference = Reference::parse(reference).map_err(|e| Arc::new(e.into()))?;
        let key = reference.to_string();
        if let Some(record) = self.store.image(&key).map_err(|e| Arc::new(e.into()))? {
            return Ok(record);
        }
        let cell = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            inflight.entry(key.clone()).or_default().clone()
        };
        let result = cell
            .get_or_init(|| async {
                let Ok(_permit) = self.permits.acquire().await else {
                    return Err(Arc::new(ImportError::Interrupted(key.clone())));
                };
                let store = self.store.clone();
                let limits = self.limits.clone();
                let reads = self.reads.clone();
                let reference = reference.clone();
                let task = tokio::task::spawn_blocking(move || {
                    import_blocking(&store, &reference, &limits, progress.as_ref(), &reads)
                });
                task.await
                    .unwrap_or_else(|_| Err(ImportError::Interrupted(key.clone())))
                    .map_err(Arc::new)
            })
            .await
            .clone();
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if inflight.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            inflight.remove(&key);
        }
        result
    }
}

fn import_blocking(
    store: &Store,
    reference: &Reference,
    limits: &ImportLimits,
    progress: &dyn Progress,
    reads: &AtomicU64,
) -> Result<ImageRecord, ImportError> {
    let key = reference.to_string();
    // Another import may have finished between the caller's check and now.
    if let Some(record) = store.image(&key)? {
        return Ok(record);
    }
    reads.fetch_add(1, Ordering::Relaxed);
    let mut objects = store.writer();
    let mut tree = tree::TreeBuilder::new(key.clone(), limits.clone());
    match reference {
        Reference::Dir(path) => {
            let root =
                cap_std::fs::Dir::open_ambient_dir(path, cap_std::ambient_authority()).map_err(
                    |e| ImportError::Source { reference: key.clone(), detail: e.to_string() },
                )?;
            tree_dir::walk(&root, &mut tree, &mut objects, &key, progress)?;
        }
        Reference::Tar(path) => {
            let mut file = std::fs::File::open(path).map_err(|e| ImportError::Source {
                reference: key.clone(),
                detail: e.to_string(),
            })?;
            let mut magic = [0u8; 4];
            let n = read_up_to(&mut file, &mut magic).map_err(|e| ImportError::Source {
                reference: key.clone(),
                detail: e.to_string(),
            })?;
            let head = magic.get(..n).unwrap_or_default().to_vec();
            let compression = archive::detect(&head);
            let reader: Box<dyn Read> = Box::new(std::io::Cursor::new(head).chain(file));
            archive::unpack(reader, compression, &mut tree, &mut objects, limits, &key, progress)?;
        }
    }
    let entries = tree.finish();
    let image =
        NewImage { reference: key.clone(), source: reference.source().into(), source_digest: None };
    match store.commit_image(objects, &image, &entries) {
        Ok(record) => Ok(record),
        // Raced with another process's import of the same reference.
        Err(StoreError::Exists(_)) => store.image(&key)?.ok_or(ImportError::Interrupted(key)),
        Err(e) => Err(e.into()),
    }
}

fn read_up_to(reader: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(buf.get_mut(filled..).unwrap_or_default())? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
