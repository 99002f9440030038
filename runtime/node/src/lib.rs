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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use provd_bundle::PublicKey;
use provd_engine::{Engine, LoadError, Plugin};
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
}

/// A bundle the node holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
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
    /// Loaded plugins by (name, version): a version keeps serving the
    /// operations that started on it after a newer one is accepted.
    loaded: Mutex<HashMap<(String, String), Plugin>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("trusted", &self.trusted.len()).finish_non_exhaustive()
    }
}

impl Node {
    pub fn new(engine: Engine, store: Arc<Store>, trusted: Vec<PublicKey>) -> Node {
        Node { engine, store, trusted, loaded: Mutex::default() }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Plugin>> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Verifies, checks, compiles and records a bundle (see the crate doc).
    pub async fn accept_bundle(&self, bytes: &[u8], now: u64) -> Result<Accepted, BundleRefused> {
        let store = self.store.clone();
        let now = tokio::task::spawn_blocking(move || store.observe_clock(now))
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
        let outcome = tokio::task::spawn_blocking(move || store.accept_bundle(&record, now))
            .await
            .map_err(|e| BundleRefused::Internal(e.to_string()))??;
        self.lock().insert((name.clone(), version.clone()), plugin);
        tracing::info!(plugin = %name, %version, signer = %verified.signer, ?outcome, "bundle accepted");
        Ok(Accepted {
            name,
            version,
            digest: verified.digest,
            signer: verified.signer,
            new: outcome == Acceptance::Accepted,
        })
    }

    /// The plugin new operations run: the active version of `name`.
    pub async fn plugin(&self, name: &str) -> Result<Option<(String, Plugin)>, BundleRefused> {
        self.plugin_at(name, None).await
    }

    /// Version `version` of plugin `name`, or its active version when
    /// `None`; only versions this node has accepted.
    pub async fn plugin_at(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<(String, Plugin)>, BundleRefused> {
        // SQLite off the async runtime's threads.
        let store = self.store.clone();
        let bundles = tokio::task::spawn_blocking(move || store.bundles())
            .await
            .map_err(|e| BundleRefused::Internal(e.to_string()))?
            .map_err(AcceptError::from)?;
        let wanted = bundles
            .into_iter()
            .find(|b| b.name == name && version.map_or(b.active, |v| b.version == v));
        let Some(active) = wanted else {
            return Ok(None);
        };
        let key = (active.name.clone(), active.version.clone());
        if let Some(p) = self.lock().get(&key) {
            return Ok(Some((active.version, p.clone())));
        }
        // Accepted in an earlier run of the daemon: load it again (the
        // artifact cache spares the compilation).
        let manifest =
            provd_domain::Manifest::from_toml(&active.manifest).map_err(LoadError::from)?;
        let store = self.store.clone();
        let (name, version) = (active.name.clone(), active.version.clone());
        let component =
            tokio::task::spawn_blocking(move || store.bundle_component(&name, &version))
                .await
                .map_err(|e| BundleRefused::Internal(e.to_string()))?
                .map_err(AcceptError::from)?
                .unwrap_or_default();
        let plugin = self.engine.load(&manifest, component).await?;
        self.lock().insert(key, plugin.clone());
        Ok(Some((active.version, plugin)))
    }
}
