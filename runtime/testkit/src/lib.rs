//! Run and test provd plugins in-process, without a daemon.
//!
//! A [`Harness`] owns a temporary node data directory and an engine with the
//! node's default policy (or one you give it). It builds a plugin crate into
//! a component, loads it with its `plugin.toml`, calls it, and hands back the
//! report together with everything the plugin logged and reported as
//! progress.
//!
//! ```no_run
//! # async fn t() -> Result<(), Box<dyn std::error::Error>> {
//! let harness = provd_testkit::Harness::new()?;
//! let plugin = harness.load_crate(env!("CARGO_MANIFEST_DIR")).await?;
//! let run = harness.run(&plugin, r#"{"name":"x"}"#).await;
//! let outcome = run.result?;
//! assert!(outcome.report.summary.contains("hello"));
//! assert!(run.observer.logs().iter().any(|r| r.message == "hello"));
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use provd_domain::{Manifest, NodePolicy};
use provd_engine::{CollectingObserver, EngineConfig, InvokeError, LoadError, Outcome, Request};
use provd_guest_build::{BuildError, BuildRequest, Toolchain};
use provd_host::{Engine, Plugin};

pub use {provd_engine, provd_host};

/// Why the harness could not get a plugin ready.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{path}: {source}")]
    Manifest { path: PathBuf, source: provd_domain::ManifestError },
    #[error("cannot locate the cargo workspace of {0}")]
    Workspace(PathBuf),
    #[error("the harness's store: {0}")]
    Store(#[from] provd_store::StoreError),
}

/// An engine over a temporary data directory.
#[derive(Debug)]
pub struct Harness {
    engine: Engine,
    data_dir: tempfile::TempDir,
}

/// One call's result plus what the plugin reported on the way.
#[derive(Debug)]
pub struct Run {
    pub result: Result<Outcome, InvokeError>,
    pub observer: Arc<CollectingObserver>,
}

impl Harness {
    /// A harness with the default node policy.
    pub fn new() -> Result<Harness, HarnessError> {
        Harness::with_config(EngineConfig::default())
    }

    /// A harness with a policy of your own.
    pub fn with_policy(policy: NodePolicy) -> Result<Harness, HarnessError> {
        Harness::with_config(EngineConfig { policy, ..EngineConfig::default() })
    }

    /// A harness with an engine configuration of your own; its cache
    /// directory is replaced by one inside the harness's data directory.
    pub fn with_config(mut config: EngineConfig) -> Result<Harness, HarnessError> {
        let data_dir = tempfile::Builder::new()
            .prefix("provd-test-")
            .tempdir()
            .map_err(|source| HarnessError::Io { path: std::env::temp_dir(), source })?;
        config.cache_dir = Some(data_dir.path().join("cache"));
        let engine = provd_host::engine(config, None)?;
        Ok(Harness { engine, data_dir })
    }

    /// A harness whose node has an image store in its data directory and
    /// lets plugins fetch the images whose references match `sources`
    /// (glob patterns, e.g. `dir:/srv/images/*`); the plugin's own
    /// `capabilities.images.sources` must match too.
    pub fn with_images(sources: &[&str]) -> Result<Harness, HarnessError> {
        let data_dir = tempfile::Builder::new()
            .prefix("provd-test-")
            .tempdir()
            .map_err(|source| HarnessError::Io { path: std::env::temp_dir(), source })?;
        let store = Arc::new(provd_store::Store::open(&data_dir.path().join("data"))?);
        let policy = NodePolicy {
            image_sources: sources.iter().map(|s| s.to_string()).collect(),
            ..NodePolicy::default()
        };
        // Confined as the daemon confines them.
        let local = provd_images::LocalSources::from_patterns(&policy.image_sources);
        let images = provd_images::Images::new(store, provd_images::ImportLimits::default(), 2)
            .with_local_sources(local);
        let engine = provd_host::engine(
            EngineConfig {
                policy,
                cache_dir: Some(data_dir.path().join("cache")),
                ..EngineConfig::default()
            },
            Some(Arc::new(images)),
        )?;
        Ok(Harness { engine, data_dir })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The node data directory of this harness, removed when it drops.
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// Builds the plugin crate at `crate_dir` and loads it with the
    /// `plugin.toml` beside its `Cargo.toml`.
    pub async fn load_crate(&self, crate_dir: impl AsRef<Path>) -> Result<Plugin, HarnessError> {
        let crate_dir = crate_dir.as_ref();
        let component = build_crate(crate_dir)?;
        self.load_files(&crate_dir.join("plugin.toml"), &component).await
    }

    /// Loads a component with a manifest, both from files.
    pub async fn load_files(
        &self,
        manifest: &Path,
        component: &Path,
    ) -> Result<Plugin, HarnessError> {
        let manifest = read_manifest(manifest)?;
        let wasm = std::fs::read(component)
            .map_err(|source| HarnessError::Io { path: component.into(), source })?;
        Ok(self.engine.load(&manifest, wasm).await?)
    }

    /// Calls `plugin` with `input` (the request's JSON input) as the node
    /// would: what a failed call built is rolled back.
    pub async fn run(&self, plugin: &Plugin, input: &str) -> Run {
        let observer = Arc::new(CollectingObserver::default());
        let request = Request { operation_id: "test-op".into(), input: input.into() };
        let result = provd_node::call::run(
            &self.engine,
            plugin,
            request,
            observer.clone(),
            provd_node::call::CallOptions::default(),
        )
        .await;
        Run { result, observer }
    }
}

/// Reads and validates a `plugin.toml`.
pub fn read_manifest(path: &Path) -> Result<Manifest, HarnessError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| HarnessError::Io { path: path.into(), source })?;
    Manifest::from_toml(&text)
        .map_err(|source| HarnessError::Manifest { path: path.into(), source })
}

/// Builds the plugin crate at `crate_dir` into a component and returns its
/// path. Guest builds share one target directory per workspace
/// (`<target>/guest`), so a crate is compiled once and later calls are quick.
///
/// A Python plugin (`plugin.toml` beside `app.py`) is built with
/// componentize-py instead (`provd_guest_build::build_python`), into the
/// same guest directory (`$PROVD_GUEST_TARGET_DIR`, `$CARGO_TARGET_DIR/guest`,
/// else `target/guest` under the plugin).
pub fn build_crate(crate_dir: &Path) -> Result<PathBuf, HarnessError> {
    if provd_guest_build::is_python_plugin(crate_dir) {
        let out = match (
            std::env::var_os("PROVD_GUEST_TARGET_DIR"),
            std::env::var_os("CARGO_TARGET_DIR"),
        ) {
            (Some(d), _) => PathBuf::from(d),
            (None, Some(d)) => PathBuf::from(d).join("guest"),
            (None, None) => crate_dir.join("target").join("guest"),
        };
        return Ok(provd_guest_build::build_python(crate_dir, &out)?);
    }
    let manifest_path = crate_dir.join("Cargo.toml");
    let target_dir = guest_target_dir(&manifest_path)?;
    let toolchain = Toolchain::detect()?;
    let built = provd_guest_build::build(
        &BuildRequest { manifest_path, packages: Vec::new(), target_dir },
        toolchain,
    )?;
    built
        .into_iter()
        .next()
        .map(|b| b.component)
        .ok_or_else(|| HarnessError::Workspace(crate_dir.into()))
}

/// `$PROVD_GUEST_TARGET_DIR`, else `<cargo target dir>/guest`.
pub fn guest_target_dir(manifest_path: &Path) -> Result<PathBuf, HarnessError> {
    if let Some(dir) = std::env::var_os("PROVD_GUEST_TARGET_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return Ok(PathBuf::from(dir).join("guest"));
    }
    let out = Command::new("cargo")
        .args(["metadata", "--no-deps", "--format-version", "1", "--manifest-path"])
        .arg(manifest_path)
        .output()
        .map_err(|source| HarnessError::Io { path: "cargo".into(), source })?;
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|_| HarnessError::Workspace(manifest_path.into()))?;
    meta.get("target_directory")
        .and_then(|t| t.as_str())
        .map(|t| PathBuf::from(t).join("guest"))
        .ok_or_else(|| HarnessError::Workspace(manifest_path.into()))
}
