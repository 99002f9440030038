//! The node's executor, below any transport: what the daemon's HTTP API
//! (and tests, without HTTP) call.
//!
//! Accepting a bundle runs every check before anything is recorded:
//!
//! 1. `provd_bundle::verify`: signature by a pinned key over the exact
//!    header, digest, manifest, capabilities, validity window;
//! 2. the manifest against the node's policy (`Manifest::grant`): anything
//!    over a ceiling refuses the bundle with the exact list;
//! 3. `Engine::load`: the component's imports against the grant, then
//!    compilation into the artifact cache;
//! 4. `Store::accept_bundle`: in one transaction, the version against the
//!    highest accepted for that plugin (a replay or downgrade is refused,
//!    an identical re-upload is idempotent) and the record itself.
//!
//! A refusal at any step records nothing (a compiled artifact left in the
//! cache is keyed by the component's digest and harmless).

pub mod call;
mod images;
mod open;
pub mod operations;
mod plugins;
pub mod queries;
pub mod repack;
pub mod rollback;

use std::sync::{Arc, Mutex};

pub use images::{DeleteImageError, GcPolicy};
pub use open::{NodeConfig, OpenError, Opened};
pub use plugins::{ActivateError, Refusal};
pub use provd_libvirt::{DomainState, Libvirt, LibvirtError, Stop};
/// The records the node's API takes and returns, as its store keeps them.
pub use provd_store::{
    AuditQuery, LayerUsage, NewAudit, OpState, OperationError, OperationRecord,
    Sizes as StoreSizes, StoreError, valid_partition_id,
};

/// The node's policy, as a configuration file sets it.
pub mod policy {
    pub use provd_domain::attach::{SharedAttach, SharingPolicy, firecracker_has_pmem};
    pub use provd_domain::{
        CpuMode, DomainType, HypervisorAccess, MAX_PATTERN_LEN, Machine, NodeCapacity, NodePolicy,
        VmAllow, check_pattern,
    };
}

/// Unix seconds as an RFC 3339 UTC date (the daemon's JSON log).
pub use provd_bundle::utc;
/// Blocking work that keeps the caller's tracing span (its operation, actor and
/// plugin in the log).
pub use provd_engine::spawn_blocking;

/// VM specs as managers send them.
pub mod spec {
    pub use provd_vm::spec::{VmSpec, check_dns_label, parse_spec};
}

/// Makes every file and directory the process creates private to its
/// user, before anything is written.
pub fn own_files_only() {
    provd_store::own_files_only();
}

use provd_bundle::PublicKey;
use provd_domain::lru::Lru;
use provd_engine::LoadError;
use provd_host::{Engine, Plugin};
use provd_store::{AcceptError, Acceptance, NewBundle, Store};

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleRefused {
    /// the bundle itself failed verification
    #[error("bundle refused: {0}")]
    Invalid(#[from] provd_bundle::BundleError),
    /// the node's policy or the engine refused the plugin
    #[error("bundle refused: {0}")]
    Load(#[from] LoadError),
    /// the version or the clock refused it
    #[error("bundle refused: {0}")]
    Version(#[from] AcceptError),
    /// recording it failed inside the node
    #[error("accepting the bundle failed: {0}")]
    Internal(String),
    /// the key that signed an accepted bundle is no longer trusted
    #[error(
        "{name} {version} was signed by key {signer}, which this node no longer trusts; \
         upload it signed by a trusted key"
    )]
    Untrusted { name: String, version: String, signer: String },
    /// an accepted bundle's validity ended
    #[error("{name} {version} expired at {expires} (unix seconds; now {now}); upload a new bundle")]
    Expired { name: String, version: String, expires: u64, now: u64 },
}

/// The plugin an operation runs, as [`Node::plugin_at`] chose it.
#[derive(Debug, Clone)]
pub struct Selected {
    pub version: String,
    pub plugin: Plugin,
    /// The version new operations get by default, if the plugin has one.
    pub active: Option<String>,
}

/// A bundle the node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub signer: String,
    /// False when the same bundle had been accepted before.
    pub new: bool,
}

/// The node: an engine, a store and the keys it trusts.
pub struct Node {
    engine: Engine,
    store: Arc<Store>,
    trusted: Vec<PublicKey>,
    /// The node's libvirtd, when provd hands it the VMs it configures.
    libvirt: Option<provd_libvirt::Libvirt>,
    /// Whether VMs handed to libvirt are started at once.
    start_vms: bool,
    /// Loaded plugins by (name, version): a version keeps serving the
    /// operations that started on it after a newer one is accepted.
    loaded: Mutex<Lru<(String, String), Plugin>>,
}

/// Plugins kept loaded at most; the least recently run goes first and is
/// loaded again from the store (its compiled artifact on disk) when next
/// run. An operation running a plugin keeps its own handle.
pub const MAX_LOADED_PLUGINS: usize = 16;

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("trusted", &self.trusted.len()).finish_non_exhaustive()
    }
}

impl Node {
    pub fn new(engine: Engine, store: Arc<Store>, trusted: Vec<PublicKey>) -> Node {
        Node {
            engine,
            store,
            trusted,
            libvirt: None,
            start_vms: false,
            loaded: Mutex::new(Lru::new(MAX_LOADED_PLUGINS, u64::MAX)),
        }
    }

    /// Hands the libvirt VMs operations configure to `libvirt`, starting
    /// them with `start`.
    pub fn with_libvirt(mut self, libvirt: provd_libvirt::Libvirt, start: bool) -> Node {
        self.libvirt = Some(libvirt);
        self.start_vms = start;
        self
    }

    pub fn libvirt(&self) -> Option<&provd_libvirt::Libvirt> {
        self.libvirt.as_ref()
    }

    pub fn start_vms(&self) -> bool {
        self.start_vms
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru<(String, String), Plugin>> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Verifies, checks, compiles and records a bundle (see the crate doc).
    pub async fn accept_bundle(&self, bytes: &[u8], now: u64) -> Result<Accepted, BundleRefused> {
        let store = self.store.clone();
        let now = provd_engine::spawn_blocking(move || store.observe_clock(now))
            .await
            .map_err(|e| BundleRefused::Internal(e.to_string()))?
            .map_err(AcceptError::from)?;
        let verified = provd_bundle::verify(bytes, &self.trusted, now)?;
        let name = verified.name.clone();
        let version = verified.version.to_string();
        let grant = verified.manifest.grant(self.engine.policy()).map_err(LoadError::from)?;
        let plugin = self.engine.load(&verified.manifest, verified.component.clone()).await?;
        let record = NewBundle {
            name: name.clone(),
            version: version.clone(),
            digest: verified.digest.clone(),
            signer: verified.signer.clone(),
            manifest: verified.manifest_text.clone(),
            grant: format!("{grant:?}"),
            component: verified.component,
            created: verified.created,
            expires: verified.expires,
        };
        let store = self.store.clone();
        let outcome = provd_engine::spawn_blocking(move || store.accept_bundle(&record, now))
            .await
            .map_err(|e| BundleRefused::Internal(e.to_string()))??;
        self.lock().insert((name.clone(), version.clone()), plugin, 0);
        tracing::info!(plugin = %name, %version, signer = %verified.signer, ?outcome, "bundle accepted");
        Ok(Accepted {
            name,
            version,
            digest: verified.digest,
            signer: verified.signer,
            new: outcome == Acceptance::Accepted,
        })
    }

    /// The plugin new operations run: the active version of `name`, at
    /// `now` (unix seconds).
    pub async fn plugin(
        &self,
        name: &str,
        now: u64,
    ) -> Result<Option<(String, Plugin)>, BundleRefused> {
        Ok(self.plugin_at(name, None, now).await?.map(|s| (s.version, s.plugin)))
    }

    /// Version `version` of plugin `name`, or its active version when
    /// `None`; only versions this node has accepted, and only while the
    /// key that signed them is still trusted and they have not expired:
    /// trust is checked at every run, not only at upload. `now` is unix
    /// seconds.
    pub async fn plugin_at(
        &self,
        name: &str,
        version: Option<&str>,
        now: u64,
    ) -> Result<Option<Selected>, BundleRefused> {
        // SQLite off the async runtime's threads. The store's clock never
        // runs backwards, so setting the system clock back cannot revive an
        // expired bundle.
        let store = self.store.clone();
        let (bundles, now) = provd_engine::spawn_blocking(move || {
            let now = store.clock_at_least(now)?;
            store.bundles().map(|b| (b, now))
        })
        .await
        .map_err(|e| BundleRefused::Internal(e.to_string()))?
        .map_err(AcceptError::from)?;
        let active = bundles.iter().find(|b| b.name == name && b.active).map(|b| b.version.clone());
        let wanted = bundles
            .into_iter()
            .find(|b| b.name == name && version.map_or(b.active, |v| b.version == v));
        let Some(record) = wanted else {
            return Ok(None);
        };
        if !self.trusted.iter().any(|k| k.key_id() == record.signer) {
            return Err(BundleRefused::Untrusted {
                name: record.name,
                version: record.version,
                signer: record.signer,
            });
        }
        if record.expires <= now {
            return Err(BundleRefused::Expired {
                name: record.name,
                version: record.version,
                expires: record.expires,
                now,
            });
        }
        let key = (record.name.clone(), record.version.clone());
        let cached = self.lock().get(&key).cloned();
        let plugin = match cached {
            Some(p) => p,
            None => {
                // Accepted in an earlier run of the daemon: load it again
                // (the artifact cache spares the compilation).
                let manifest =
                    provd_domain::Manifest::from_toml(&record.manifest).map_err(LoadError::from)?;
                let store = self.store.clone();
                let (name, version) = (record.name.clone(), record.version.clone());
                let component =
                    provd_engine::spawn_blocking(move || store.bundle_component(&name, &version))
                        .await
                        .map_err(|e| BundleRefused::Internal(e.to_string()))?
                        .map_err(AcceptError::from)?
                        .unwrap_or_default();
                let plugin = self.engine.load(&manifest, component).await?;
                self.lock().insert(key, plugin.clone(), 0);
                plugin
            }
        };
        Ok(Some(Selected { version: record.version, plugin, active }))
    }
}
