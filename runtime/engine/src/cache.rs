//! Compile once: components are compiled at most once per content and
//! engine configuration, in memory and on disk.
//!
//! **Only this module creates precompiled artifacts, and it loads only
//! artifacts it wrote.** wasmtime's `deserialize` trusts its input: a forged
//! artifact is native code. The cache therefore lives in a directory provd
//! creates with mode 0700 inside its own data directory, and files enter it
//! only as the output of `Engine::precompile_component` on bytes provd
//! compiled itself. A `.cwasm` from anywhere else is never accepted.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use provd_domain::image::Hash as ContentHash;
use provd_domain::lru::Lru;
use wasmtime::component::Component;

use crate::error::LoadError;

/// A component's identity: the BLAKE3 digest of its bytes.
pub type Digest = [u8; 32];

/// Components kept loaded in memory at most; the least recently used goes
/// first, and is loaded again from its artifact on disk when next asked for
/// (compiled again where the engine keeps no artifacts).
/// A plugin that runs keeps its own handle, whatever this cache drops.
pub const MAX_LOADED_COMPONENTS: usize = 16;

pub(crate) struct ArtifactCache {
    /// `<root>/<engine compatibility hash>`; `None` keeps artifacts in memory
    /// only.
    dir: Option<PathBuf>,
    loaded: Mutex<Lru<Digest, Component>>,
}

/// How a component was obtained, for callers who measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Already loaded in this process.
    Memory,
    /// Loaded from a precompiled artifact on disk.
    Disk,
    /// Compiled now.
    Compiled,
}

impl ArtifactCache {
    pub(crate) fn new(engine: &wasmtime::Engine, root: Option<&Path>) -> Result<Self, LoadError> {
        let dir = match root {
            None => None,
            Some(root) => {
                // Artifacts of an engine built differently (wasmtime version,
                // settings, CPU features) are not loadable; keying the
                // directory by the compatibility hash keeps them apart.
                let mut h = std::collections::hash_map::DefaultHasher::new();
                engine.precompile_compatibility_hash().hash(&mut h);
                let dir = root.join(format!("{:016x}", h.finish()));
                create_private_dir(&dir).map_err(|source| LoadError::Cache {
                    path: dir.display().to_string(),
                    source,
                })?;
                Some(dir)
            }
        };
        Ok(ArtifactCache { dir, loaded: Mutex::new(Lru::new(MAX_LOADED_COMPONENTS, u64::MAX)) })
    }

    /// Returns the compiled component for `wasm`, compiling it at most once.
    pub(crate) async fn get(
        &self,
        engine: &wasmtime::Engine,
        digest: Digest,
        wasm: Arc<[u8]>,
        compile_timeout: Duration,
    ) -> Result<(Component, CacheOutcome), LoadError> {
        if let Some(c) = self.recall(&digest) {
            return Ok((c, CacheOutcome::Memory));
        }
        let path =
            self.dir.as_ref().map(|d| d.join(format!("{}.cwasm", ContentHash(digest).to_hex())));
        if let Some(path) = &path
            && path.exists()
        {
            let component = load_artifact(engine, path)?;
            self.remember(digest, &component);
            return Ok((component, CacheOutcome::Disk));
        }

        let engine2 = engine.clone();
        let compile = crate::spawn_blocking(move || engine2.precompile_component(&wasm));
        // A compilation that runs past the timeout is abandoned: its thread
        // finishes in the background and its result is dropped.
        let artifact = tokio::time::timeout(compile_timeout, compile)
            .await
            .map_err(|_| LoadError::CompileTimeout(compile_timeout))?
            .map_err(|e| LoadError::Compile(format!("compiler thread failed: {e}")))?
            .map_err(|e| LoadError::Compile(format!("{e:#}")))?;

        let component = match &path {
            Some(path) => {
                write_atomically(path, &artifact).map_err(|source| LoadError::Cache {
                    path: path.display().to_string(),
                    source,
                })?;
                load_artifact(engine, path)?
            }
            None => load_bytes(engine, &artifact)?,
        };
        self.remember(digest, &component);
        Ok((component, CacheOutcome::Compiled))
    }

    fn recall(&self, digest: &Digest) -> Option<Component> {
        self.loaded.lock().ok()?.get(digest).cloned()
    }

    fn remember(&self, digest: Digest, component: &Component) {
        if let Ok(mut loaded) = self.loaded.lock() {
            loaded.insert(digest, component.clone(), 0);
        }
    }

    /// Components kept loaded now.
    #[cfg(test)]
    pub(crate) fn loaded_count(&self) -> usize {
        self.loaded.lock().map_or(0, |l| l.size().0)
    }
}

#[allow(unsafe_code)]
fn load_artifact(engine: &wasmtime::Engine, path: &Path) -> Result<Component, LoadError> {
    // SAFETY: `path` is inside the private cache directory and was written by
    // `get` from `precompile_component` output (see the module comment);
    // nothing outside provd writes there.
    unsafe { Component::deserialize_file(engine, path) }
        .map_err(|e| LoadError::Compile(format!("cached artifact {}: {e:#}", path.display())))
}

#[allow(unsafe_code)]
fn load_bytes(engine: &wasmtime::Engine, artifact: &[u8]) -> Result<Component, LoadError> {
    // SAFETY: `artifact` was produced by `precompile_component` in this
    // process a moment ago.
    unsafe { Component::deserialize(engine, artifact) }
        .map_err(|e| LoadError::Compile(format!("{e:#}")))
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// temp file → fsync → rename → fsync directory, so a crash leaves either
/// no artifact or a whole one.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().ok_or_else(|| std::io::Error::other("artifact path has no parent"))?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

    use super::*;

    /// A distinct empty component per `n`: a custom section tells them apart.
    fn component(n: usize) -> Arc<[u8]> {
        // wasmtime takes the text format as it is (its `wat` feature).
        format!("(component (@custom \"n\" \"{n}\"))").into_bytes().into()
    }

    #[tokio::test]
    async fn at_most_the_bound_stays_loaded_and_a_dropped_one_loads_again_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let engine = wasmtime::Engine::default();
        let cache = ArtifactCache::new(&engine, Some(dir.path())).unwrap();
        let timeout = Duration::from_secs(60);
        let digest = |n: usize| *blake3::hash(&component(n)).as_bytes();
        for n in 0..MAX_LOADED_COMPONENTS + 4 {
            let (_, how) = cache.get(&engine, digest(n), component(n), timeout).await.unwrap();
            assert_eq!(how, CacheOutcome::Compiled);
            assert!(cache.loaded_count() <= MAX_LOADED_COMPONENTS);
        }
        assert_eq!(cache.loaded_count(), MAX_LOADED_COMPONENTS);
        // The most recent are in memory; the first ones were dropped and
        // come back from their artifacts, not compiled again.
        let last = MAX_LOADED_COMPONENTS + 3;
        let (_, how) = cache.get(&engine, digest(last), component(last), timeout).await.unwrap();
        assert_eq!(how, CacheOutcome::Memory);
        let (_, how) = cache.get(&engine, digest(0), component(0), timeout).await.unwrap();
        assert_eq!(how, CacheOutcome::Disk);
        assert_eq!(cache.loaded_count(), MAX_LOADED_COMPONENTS);
    }
}
