//! A Python plugin next to the same plugin in Rust: `examples/image-guard-py`
//! against `examples/image-guard`, both built by provd's build (the Python
//! one with componentize-py), run by the same engine on the same images
//! with the same input. Prints, for each:
//!
//! * the component's size;
//! * cold start: load (compile with an empty artifact cache, or from the
//!   on-disk cache in a new engine) plus the first call, median of `RUNS`;
//! * warm instantiate + call: `CALLS` calls after 20 warm-up calls,
//!   median and p90;
//! * memory: the smallest `limits.memory-mib` (of 8, 16, 24, 32, 48, 64,
//!   96, 128, 192, 256) under which the call succeeds.
//!
//! `cargo build --release -p provd-bench && target/release/bench-python`
//! (`RUNS`, default 3; `CALLS`, default 200).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use provd_domain::{Manifest, NodePolicy};
use provd_engine::{CacheOutcome, CollectingObserver, EngineConfig, Request};
use provd_host::{Engine, Plugin};
use provd_images::{Images, ImportLimits};
use provd_store::Store;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn quantile(mut v: Vec<Duration>, q: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v.get(i).copied().unwrap_or_default()
}

struct Node {
    _dir: tempfile::TempDir,
    config: EngineConfig,
    images: Arc<provd_images::Images>,
    input: String,
}

fn node(cache: &Path) -> Result<Node> {
    let dir = tempfile::tempdir()?;
    for (name, key) in [("clean", false), ("leaky", true)] {
        let root = dir.path().join("images").join(name);
        std::fs::create_dir_all(root.join("etc"))?;
        std::fs::write(root.join("etc/hostname"), "vm\n")?;
        if key {
            std::fs::create_dir_all(root.join("root/.ssh"))?;
            std::fs::write(root.join("root/.ssh/id_rsa"), "-----BEGIN OPENSSH PRIVATE KEY-----\n")?;
        }
    }
    let store = Arc::new(Store::open(&dir.path().join("data"))?);
    let images = Arc::new(Images::new(store, ImportLimits::default(), 1));
    let policy = NodePolicy {
        image_sources: vec![format!("dir:{}/images/*", dir.path().display())],
        ..NodePolicy::default()
    };
    let input = serde_json::json!({
        "vms": [{"name": "a", "image": format!("dir:{}/images/clean", dir.path().display())},
                {"name": "b", "image": format!("dir:{}/images/clean", dir.path().display())}],
        "forbidden": ["root/.ssh/id_rsa", "etc/shadow-"],
    })
    .to_string();
    let config =
        EngineConfig { policy, cache_dir: Some(cache.to_path_buf()), ..EngineConfig::default() };
    Ok(Node { _dir: dir, config, images, input })
}

fn manifest(dir: &Path, memory_mib: Option<u64>) -> Result<Manifest> {
    let text = std::fs::read_to_string(dir.join("plugin.toml"))?;
    let text = match memory_mib {
        Some(m) => {
            text.lines()
                .map(|l| {
                    if l.starts_with("memory-mib") { format!("memory-mib = {m}") } else { l.into() }
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
        None => text,
    };
    Ok(Manifest::from_toml(&text)?)
}

async fn call(engine: &Engine, plugin: &Plugin, input: &str) -> Result<()> {
    let request = Request { operation_id: "bench".into(), input: input.into() };
    let outcome =
        engine.provision(plugin, request, Arc::new(CollectingObserver::default())).await?;
    if !outcome.report.summary.starts_with("2 VM(s) checked") {
        bail!("unexpected report {:?}", outcome.report.summary);
    }
    Ok(())
}

async fn measure(name: &str, dir: &Path) -> Result<()> {
    let runs = env_or("RUNS", 3);
    let calls = env_or("CALLS", 200);
    let component =
        provd_testkit::build_crate(dir).with_context(|| format!("building {}", dir.display()))?;
    let wasm = std::fs::read(&component)?;
    let manifest = manifest(dir, None)?;
    let (mut compile, mut disk) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let cache = tempfile::tempdir()?;
        let n = node(cache.path())?;
        let engine = provd_host::engine(n.config.clone(), Some(n.images.clone()))?;
        let t = Instant::now();
        let plugin = engine.load(&manifest, wasm.clone()).await?;
        call(&engine, &plugin, &n.input).await?;
        compile.push(t.elapsed());
        if plugin.cache_outcome() != CacheOutcome::Compiled {
            bail!("expected a compile");
        }
        drop(engine);
        let engine = provd_host::engine(n.config.clone(), Some(n.images.clone()))?;
        let t = Instant::now();
        let plugin = engine.load(&manifest, wasm.clone()).await?;
        call(&engine, &plugin, &n.input).await?;
        disk.push(t.elapsed());
    }
    let cache = tempfile::tempdir()?;
    let n = node(cache.path())?;
    let engine = provd_host::engine(n.config.clone(), Some(n.images.clone()))?;
    let plugin = engine.load(&manifest, wasm.clone()).await?;
    for _ in 0..20 {
        call(&engine, &plugin, &n.input).await?;
    }
    let mut warm = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        call(&engine, &plugin, &n.input).await?;
        warm.push(t.elapsed());
    }
    let mut fits = None;
    for m in [8u64, 16, 24, 32, 48, 64, 96, 128, 192, 256] {
        let Ok(plugin) = engine.load(&manifest_limits(dir, m)?, wasm.clone()).await else {
            continue;
        };
        if call(&engine, &plugin, &n.input).await.is_ok() {
            fits = Some(m);
            break;
        }
    }
    println!(
        "| {name} | {:.1} MiB | {:.0} ms | {:.1} ms | {:.2} ms | {:.2} ms | {} |",
        wasm.len() as f64 / (1 << 20) as f64,
        ms(quantile(compile, 0.5)),
        ms(quantile(disk, 0.5)),
        ms(quantile(warm.clone(), 0.5)),
        ms(quantile(warm, 0.9)),
        fits.map_or("over 256 MiB".into(), |m| format!("{m} MiB"))
    );
    Ok(())
}

fn manifest_limits(dir: &Path, memory_mib: u64) -> Result<Manifest> {
    manifest(dir, Some(memory_mib))
}

#[tokio::main]
async fn main() -> Result<()> {
    let root: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    println!(
        "| plugin | component | load + first call, empty cache (compile) | load + first call, on-disk cache | warm call, median | warm call, p90 | smallest memory-mib that runs |"
    );
    println!("|---|---|---|---|---|---|---|");
    measure("image-guard (Rust)", &root.join("examples/image-guard")).await?;
    measure("image-guard-py (Python)", &root.join("examples/image-guard-py")).await?;
    Ok(())
}
