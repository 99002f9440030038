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
mod local;
pub mod oci;
mod reference;
mod tree;
mod tree_dir;

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use provd_store::{ImageRecord, NewImage, Store, StoreError};

pub use local::LocalSources;
pub use reference::{Digest, OciRef, Reference, ReferenceError};

/// How HTTP(S) archives are fetched.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// PEM root certificates to trust besides the built-in web roots (a
    /// provider's own image server, a test server).
    pub extra_roots_pem: Vec<Vec<u8>>,
    pub connect_timeout: std::time::Duration,
    /// A download that receives nothing for this long is abandoned.
    pub stall_timeout: std::time::Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            extra_roots_pem: Vec::new(),
            connect_timeout: std::time::Duration::from_secs(10),
            stall_timeout: std::time::Duration::from_secs(30),
        }
    }
}

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
    /// `Err` holds why the HTTP client could not be built; HTTP imports
    /// then fail with that reason.
    http: Result<reqwest::Client, String>,
    http_config: HttpConfig,
    local: LocalSources,
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
            http: http_client(&HttpConfig::default()),
            http_config: HttpConfig::default(),
            local: LocalSources::Ambient,
        }
    }

    /// Where `dir:` and `tar:` references may be opened: a daemon passes
    /// its policy's roots ([`LocalSources::from_patterns`]); without this
    /// call a path is opened as given, for the administrator's own tools.
    pub fn with_local_sources(mut self, local: LocalSources) -> Images {
        self.local = local;
        self
    }

    /// Sets how HTTP(S) archives are fetched.
    pub fn with_http(mut self, config: HttpConfig) -> Result<Images, ImportError> {
        let client = http_client(&config).map_err(|detail| ImportError::Source {
            reference: "HTTP configuration".into(),
            detail,
        })?;
        self.http = Ok(client);
        self.http_config = config;
        Ok(self)
    }

    fn client(&self, key: &str) -> Result<&reqwest::Client, ImportError> {
        self.http.as_ref().map_err(|detail| ImportError::Source {
            reference: key.into(),
            detail: format!("no HTTP client: {detail}"),
        })
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
                match self.store.image(&key) {
                    Ok(Some(record)) => return Ok(record),
                    Ok(None) => {}
                    Err(e) => return Err(Arc::new(e.into())),
                }
                self.reads.fetch_add(1, Ordering::Relaxed);
                let fetched = match &reference {
                    Reference::Http { url, digest } => {
                        let d = self.download(&key, url, digest, None).await.map_err(Arc::new)?;
                        let source_digest = Some(d.digest.clone());
                        Fetched { layers: vec![d], source_digest }
                    }
                    Reference::Oci(r) => {
                        let (layers, manifest) = self.fetch_oci(&key, r).await.map_err(Arc::new)?;
                        Fetched { layers, source_digest: Some(manifest) }
                    }
                    Reference::Dir(_) | Reference::Tar(_) => Fetched::default(),
                };
                let store = self.store.clone();
                let limits = self.limits.clone();
                let reference = reference.clone();
                let local = self.local.clone();
                let task = tokio::task::spawn_blocking(move || {
                    let source = Source { reference: &reference, local: &local, fetched };
                    import_blocking(&store, source, &limits, progress.as_ref())
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

fn http_client(config: &HttpConfig) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        // Redirects could lead outside the patterns a plugin was allowed;
        // a reference names the final location.
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    for pem in &config.extra_roots_pem {
        let cert = reqwest::Certificate::from_pem(pem)
            .map_err(|e| format!("extra root certificate: {e}"))?;
        builder = builder.add_root_certificate(cert);
    }
    builder.build().map_err(|e| e.to_string())
}

/// What was downloaded for an import: the archive or the layers, in order.
#[derive(Default)]
struct Fetched {
    layers: Vec<Download>,
    source_digest: Option<String>,
}

/// A verified download in staging, removed when dropped.
struct Download {
    store: Arc<Store>,
    name: String,
    digest: String,
}

impl Drop for Download {
    fn drop(&mut self) {
        self.store.remove_temp(&self.name);
    }
}

enum DigestState {
    Sha256(sha2::Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl Images {
    /// Streams `url` to a private staging file, hashing on the way, and
    /// keeps it only if it has the expected digest. A failure removes the
    /// partial file, so a retry starts clean.
    async fn download(
        &self,
        key: &str,
        url: &str,
        digest: &Digest,
        expected_size: Option<u64>,
    ) -> Result<Download, ImportError> {
        use sha2::Digest as _;
        use std::io::Write as _;
        let source = |detail: String| ImportError::Source { reference: key.to_string(), detail };
        let stall = self.http_config.stall_timeout;
        let mut response = tokio::time::timeout(stall, self.client(key)?.get(url).send())
            .await
            .map_err(|_| source(format!("no response within {stall:?}")))?
            .map_err(|e| source(format!("request failed: {}", error_chain(&e))))?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(source(format!("server answered {}", response.status())));
        }
        let announced = response.content_length();
        let limit = self.limits.max_archive_bytes;
        if let Some(len) = announced
            && len > limit
        {
            return Err(ImportError::Limit {
                reference: key.into(),
                what: "archive bytes".into(),
                limit,
            });
        }
        let (name, file) = self.store.create_temp()?;
        let mut guard = Download { store: self.store.clone(), name, digest: String::new() };
        let mut file = file.into_std();
        let mut state = match digest.algorithm {
            "sha256" => DigestState::Sha256(sha2::Sha256::new()),
            _ => DigestState::Blake3(Box::default()),
        };
        let mut total = 0u64;
        loop {
            let chunk = tokio::time::timeout(stall, response.chunk())
                .await
                .map_err(|_| {
                    source(format!(
                        "download stalled: nothing received for {stall:?} after {total} bytes"
                    ))
                })?
                .map_err(|e| {
                    source(format!("download failed after {total} bytes: {}", error_chain(&e)))
                })?;
            let Some(chunk) = chunk else { break };
            total += chunk.len() as u64;
            if total > limit {
                return Err(ImportError::Limit {
                    reference: key.into(),
                    what: "archive bytes".into(),
                    limit,
                });
            }
            match &mut state {
                DigestState::Sha256(h) => h.update(&chunk),
                DigestState::Blake3(h) => {
                    h.update(&chunk);
                }
            }
            file.write_all(&chunk).map_err(|e| source(format!("writing the download: {e}")))?;
        }
        if let Some(len) = announced
            && total != len
        {
            return Err(source(format!("server announced {len} bytes and sent {total}")));
        }
        if let Some(size) = expected_size
            && total != size
        {
            return Err(source(format!("expected {size} bytes, the download has {total}")));
        }
        let actual = match state {
            DigestState::Sha256(h) => {
                h.finalize().iter().map(|b| format!("{b:02x}")).collect::<String>()
            }
            DigestState::Blake3(h) => h.finalize().to_hex().to_string(),
        };
        if actual != digest.hex {
            return Err(source(format!(
                "digest mismatch: expected {digest}, the download has {}:{actual}",
                digest.algorithm
            )));
        }
        guard.digest = digest.to_string();
        Ok(guard)
    }
}

/// An error with its sources, one line: reqwest's own message is terse.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// What an import reads: the reference, where local ones may be opened,
/// and what was downloaded for a remote one.
struct Source<'a> {
    reference: &'a Reference,
    local: &'a LocalSources,
    fetched: Fetched,
}

fn import_blocking(
    store: &Store,
    source: Source<'_>,
    limits: &ImportLimits,
    progress: &dyn Progress,
) -> Result<ImageRecord, ImportError> {
    let Source { reference, local, fetched } = source;
    let key = reference.to_string();
    let mut objects = store.writer();
    let mut tree = tree::TreeBuilder::new(key.clone(), limits.clone());
    match reference {
        Reference::Dir(path) => {
            let file = local::open(local, path, local::Want::Dir, &key)?;
            let root = cap_std::fs::Dir::from_std_file(file);
            tree_dir::walk(&root, &mut tree, &mut objects, &key, progress)?;
        }
        Reference::Tar(path) => {
            let file = local::open(local, path, local::Want::File, &key)?;
            let layer = Layer { file, layered: false };
            unpack_file(layer, &mut tree, &mut objects, limits, &key, progress)?;
        }
        Reference::Http { .. } | Reference::Oci(_) => {
            let layered = matches!(reference, Reference::Oci(_));
            for download in &fetched.layers {
                let file = store.open_temp(&download.name)?.into_std();
                tree.begin_layer();
                unpack_file(
                    Layer { file, layered },
                    &mut tree,
                    &mut objects,
                    limits,
                    &key,
                    progress,
                )?;
            }
        }
    }
    let entries = tree.finish();
    let image = NewImage {
        reference: key.clone(),
        source: reference.source().into(),
        source_digest: fetched.source_digest.clone(),
    };
    match store.commit_image(objects, &image, &entries) {
        Ok(record) => Ok(record),
        // Raced with another process's import of the same reference.
        Err(StoreError::Exists(_)) => store.image(&key)?.ok_or(ImportError::Interrupted(key)),
        Err(e) => Err(e.into()),
    }
}

/// One archive to unpack; `layered` for an OCI layer, whose whiteouts
/// apply to the layers before it.
struct Layer {
    file: std::fs::File,
    layered: bool,
}

fn unpack_file(
    layer: Layer,
    tree: &mut tree::TreeBuilder,
    objects: &mut provd_store::ObjectWriter<'_>,
    limits: &ImportLimits,
    key: &str,
    progress: &dyn Progress,
) -> Result<(), ImportError> {
    let mut file = layer.file;
    let mut magic = [0u8; 4];
    let n = read_up_to(&mut file, &mut magic)
        .map_err(|e| ImportError::Source { reference: key.to_string(), detail: e.to_string() })?;
    let head = magic.get(..n).unwrap_or_default().to_vec();
    let compression = archive::detect(&head);
    let reader: Box<dyn Read> = Box::new(std::io::Cursor::new(head).chain(file));
    archive::unpack(reader, compression, tree, objects, limits, key, progress, layer.layered)
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
