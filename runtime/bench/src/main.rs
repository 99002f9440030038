//! Prints the engine's figures. Run with:
//!
//! ```text
//! cargo run --release -p provd-bench            # everything
//! cargo run --release -p provd-bench -- calls   # warm calls only
//! ```
//!
//! Sections: `calls` (warm instantiate + one provision call, pooling and
//! on-demand), `cold` (first load and call with an empty and a warm artifact
//! cache), `hashing` (64 MiB through the host versus inside the guest),
//! `deadline` (how far past its deadline an infinite loop is stopped),
//! `images` (importing root filesystems versus `tar -x` and `tar -x` +
//! `b3sum`; set `PROVD_BENCH_ROOTFS=dir1:dir2:...`, default
//! `/var/tmp/rootfs-{a,b,c}` as built by `debootstrap --variant=minbase`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use provd_domain::Manifest;
use provd_engine::{CollectingObserver, EngineConfig, Observer, Request};
use provd_host::{Engine, Plugin};
use provd_tests::{Fixture, HASHBENCH, HELLO, HOSTILE, IMAGER};

/// An observer that drops everything, so the figures measure the engine
/// rather than the collection of logs.
struct Discard;
impl Observer for Discard {
    fn log(&self, _: &provd_engine::LogRecord) {}
    fn progress(&self, _: &provd_engine::ProgressEvent) {}
}

const MINIMAL_MANIFEST: &str = "name = \"minimal\"\nversion = \"0.1.0\"\n\
    [capabilities.log]\n[capabilities.progress]\n[capabilities.hashing]\n";
const HASHBENCH_MANIFEST: &str = "name = \"hashbench\"\nversion = \"0.1.0\"\n\
    [capabilities.hashing]\nmax-input-bytes = 134217728\n[limits]\nmemory-mib = 512\n";

#[tokio::main]
async fn main() -> Result<()> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    println!("provd-bench: fixtures built with {}", provd_tests::TOOLCHAIN);
    if which == "all" || which == "calls" {
        calls().await?;
    }
    if which == "profile-minimal" {
        // For `perf record`: only warm calls of the minimal plugin.
        let engine = provd_host::engine(EngineConfig::default(), None)?;
        let plugin = load(&engine, &Manifest::from_toml(MINIMAL_MANIFEST)?, HOSTILE).await?;
        let mut samples = Vec::new();
        for _ in 0..20_000 {
            samples.push(call(&engine, &plugin, "ok").await?);
        }
        println!("minimal warm call median {:.1} µs", us(stats(samples).median));
    }
    if which == "all" || which == "cold" {
        cold().await?;
    }
    if which == "all" || which == "hashing" {
        hashing().await?;
    }
    if which == "all" || which == "deadline" {
        deadline().await?;
    }
    if which == "all" || which == "images" {
        images().await?;
    }
    Ok(())
}

fn hello_manifest() -> Result<Manifest> {
    let text = std::fs::read_to_string(HELLO.dir().join("plugin.toml"))?;
    Ok(Manifest::from_toml(&text)?)
}

const HELLO_INPUT: &str = r#"{"name":"bench","items":["vm-a","vm-b","vm-c"]}"#;

async fn load(engine: &Engine, manifest: &Manifest, fixture: Fixture) -> Result<Plugin> {
    Ok(engine.load(manifest, fixture.wasm()).await?)
}

async fn call(engine: &Engine, plugin: &Plugin, input: &str) -> Result<Duration> {
    let request = Request { operation_id: "bench".into(), input: input.into() };
    let start = Instant::now();
    engine.provision(plugin, request, Arc::new(Discard)).await.context("provision")?;
    Ok(start.elapsed())
}

struct Stats {
    median: Duration,
    p90: Duration,
    p99: Duration,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let at = |q: f64| {
        samples.get(((samples.len() as f64 - 1.0) * q) as usize).copied().unwrap_or_default()
    };
    Stats { median: at(0.5), p90: at(0.9), p99: at(0.99) }
}

async fn calls() -> Result<()> {
    const WARMUP: usize = 200;
    const N: usize = 3000;
    println!(
        "\n## Warm instantiate + one provision call ({N} calls after {WARMUP} warm-up, one at a time)\n"
    );
    println!("| allocator | plugin | median | p90 | p99 |");
    println!("|---|---|---|---|---|");
    for pooling in [true, false] {
        let engine = provd_host::engine(EngineConfig { pooling, ..EngineConfig::default() }, None)?;
        if pooling && !engine.pooling() {
            println!("| pooling | (unavailable on this machine) | | | |");
            continue;
        }
        let hello = load(&engine, &hello_manifest()?, HELLO).await?;
        let minimal = load(&engine, &Manifest::from_toml(MINIMAL_MANIFEST)?, HOSTILE).await?;
        for (name, plugin, input) in [
            ("hello (3 hash calls, 5 progress, 5 log)", &hello, HELLO_INPUT),
            ("minimal (returns at once)", &minimal, "ok"),
        ] {
            for _ in 0..WARMUP {
                call(&engine, plugin, input).await?;
            }
            let mut samples = Vec::with_capacity(N);
            for _ in 0..N {
                samples.push(call(&engine, plugin, input).await?);
            }
            let s = stats(samples);
            let alloc = if pooling { "pooling + CoW" } else { "on-demand" };
            println!(
                "| {alloc} | {name} | {:.1} µs | {:.1} µs | {:.1} µs |",
                us(s.median),
                us(s.p90),
                us(s.p99)
            );
        }
    }
    Ok(())
}

async fn cold() -> Result<()> {
    const RUNS: usize = 5;
    println!("\n## Cold start of hello: load + first call (median of {RUNS} runs)\n");
    let manifest = hello_manifest()?;
    let mut compile = Vec::new();
    let mut disk = Vec::new();
    let mut memory = Vec::new();
    for _ in 0..RUNS {
        let dir = tempfile::tempdir()?;
        let config =
            EngineConfig { cache_dir: Some(dir.path().join("cache")), ..EngineConfig::default() };

        let engine = provd_host::engine(config.clone(), None)?;
        let start = Instant::now();
        let plugin = load(&engine, &manifest, HELLO).await?;
        call(&engine, &plugin, HELLO_INPUT).await?;
        compile.push(start.elapsed());
        if plugin.cache_outcome() != provd_engine::CacheOutcome::Compiled {
            bail!("expected a compile with an empty cache");
        }

        let start = Instant::now();
        let again = load(&engine, &manifest, HELLO).await?;
        call(&engine, &again, HELLO_INPUT).await?;
        memory.push(start.elapsed());
        drop(engine);

        let engine = provd_host::engine(config, None)?;
        let start = Instant::now();
        let plugin = load(&engine, &manifest, HELLO).await?;
        call(&engine, &plugin, HELLO_INPUT).await?;
        disk.push(start.elapsed());
        if plugin.cache_outcome() != provd_engine::CacheOutcome::Disk {
            bail!("expected a load from the artifact cache");
        }
    }
    println!("| artifact cache | load + first call |");
    println!("|---|---|");
    println!("| empty (compile) | {:.1} ms |", ms(stats(compile).median));
    println!("| on disk (new engine) | {:.2} ms |", ms(stats(disk).median));
    println!("| in memory (same engine) | {:.3} ms |", ms(stats(memory).median));
    Ok(())
}

async fn hashing() -> Result<()> {
    const MIB: usize = 64;
    const RUNS: usize = 5;
    println!(
        "\n## BLAKE3 of {MIB} MiB (median of {RUNS}; time measured around the hashing only)\n"
    );
    let engine = provd_host::engine(EngineConfig::default(), None)?;
    let plugin = load(&engine, &Manifest::from_toml(HASHBENCH_MANIFEST)?, HASHBENCH).await?;
    let data: Vec<u8> = (0..MIB << 20).map(|i| (i % 251) as u8).collect();
    let expected = blake3::hash(&data).to_hex().to_string();
    let mut native = Vec::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        std::hint::black_box(blake3::hash(std::hint::black_box(&data)));
        native.push(start.elapsed());
    }
    let native = stats(native).median;
    println!("| where | time | MiB/s | vs in-guest |");
    println!("|---|---|---|---|");
    let mut rows = Vec::new();
    for mode in ["guest", "host", "host-chunked"] {
        let mut samples = Vec::new();
        for _ in 0..RUNS {
            let observer = Arc::new(CollectingObserver::default());
            let request = Request { operation_id: "bench".into(), input: format!("{mode}:{MIB}") };
            let outcome = engine.provision(&plugin, request, observer).await?;
            let field = |k: &str| {
                outcome.report.fields.iter().find(|f| f.key == k).map(|f| f.value.clone())
            };
            if field("digest").as_deref() != Some(expected.as_str()) {
                bail!("{mode}: wrong digest");
            }
            let nanos: u64 = field("nanos").context("nanos")?.parse()?;
            samples.push(Duration::from_nanos(nanos));
        }
        rows.push((mode, stats(samples).median));
    }
    let guest = rows.first().map(|r| r.1).unwrap_or_default();
    let label = |mode: &str| match mode {
        "guest" => "in the guest (blake3 compiled to wasm)",
        "host" => "host call, 64 MiB passed in one call",
        _ => "host hasher, fed 1 MiB per call",
    };
    for (mode, t) in &rows {
        println!(
            "| {} | {:.1} ms | {:.0} | {:.2}× |",
            label(mode),
            ms(*t),
            mib_s(MIB, *t),
            guest.as_secs_f64() / t.as_secs_f64()
        );
    }
    println!(
        "| native, no boundary (bench process) | {:.1} ms | {:.0} | {:.2}× |",
        ms(native),
        mib_s(MIB, native),
        guest.as_secs_f64() / native.as_secs_f64()
    );
    hash_by_handle(&data, &expected).await
}

/// (a) A 64 MiB file of an image: read into the plugin through the host and
/// hashed in wasm, versus hashed by the host by handle.
async fn hash_by_handle(data: &[u8], expected: &str) -> Result<()> {
    const RUNS: usize = 5;
    let work = tempfile::tempdir()?;
    let tree = work.path().join("img");
    std::fs::create_dir_all(&tree)?;
    std::fs::write(tree.join("blob"), data)?;
    let store = Arc::new(provd_store::Store::open(&work.path().join("data"))?);
    let images =
        Arc::new(provd_images::Images::new(store, provd_images::ImportLimits::default(), 1));
    let policy = provd_domain::NodePolicy {
        image_sources: vec![format!("dir:{}", tree.display())],
        max_image_read_bytes: 128 << 20,
        ..provd_domain::NodePolicy::default()
    };
    let engine =
        provd_host::engine(EngineConfig { policy, ..EngineConfig::default() }, Some(images))?;
    let manifest = Manifest::from_toml(&format!(
        "name = \"imager\"\nversion = \"0.1.0\"\n[capabilities.progress]\n[capabilities.hashing]\n[capabilities.dedup]\n[capabilities.vm]\n[capabilities.partitions]\n[capabilities.images]\n\
         sources = [\"dir:{}\"]\nmax-read-bytes = 134217728\n[limits]\nmemory-mib = 512\n",
        tree.display()
    ))?;
    let plugin = load(&engine, &manifest, IMAGER).await?;
    let reference = format!("dir:{}", tree.display());
    let mut rows = Vec::new();
    for op in ["hash-guest", "hash-host"] {
        let mut samples = Vec::new();
        for _ in 0..RUNS {
            let input = format!(r#"{{"op":"{op}","image":"{reference}","path":"blob"}}"#);
            let request = Request { operation_id: "bench".into(), input };
            let outcome = engine.provision(&plugin, request, Arc::new(Discard)).await?;
            let field = |k: &str| {
                outcome.report.fields.iter().find(|f| f.key == k).map(|f| f.value.clone())
            };
            if field("digest").as_deref() != Some(expected) {
                bail!("{op}: wrong digest");
            }
            samples.push(Duration::from_nanos(field("nanos").context("nanos")?.parse()?));
        }
        rows.push((op, stats(samples).median));
    }
    println!(
        "\n## BLAKE3 of a 64 MiB file of an image (median of {RUNS}; time measured in the plugin)\n"
    );
    println!("| how | time | vs read + hash in guest |");
    println!("|---|---|---|");
    let guest = rows.first().map(|r| r.1).unwrap_or_default();
    for (op, t) in &rows {
        let label = if *op == "hash-guest" {
            "read-file into the plugin, blake3 compiled to wasm"
        } else {
            "hashing.hash-file: the host hashes the stored object by handle"
        };
        println!("| {label} | {:.1} ms | {:.2}× |", ms(*t), guest.as_secs_f64() / t.as_secs_f64());
    }
    Ok(())
}

async fn deadline() -> Result<()> {
    const RUNS: usize = 20;
    const TIMEOUT_MS: u64 = 100;
    let engine = provd_host::engine(EngineConfig::default(), None)?;
    let manifest =
        Manifest::from_toml(&format!("{MINIMAL_MANIFEST}[limits]\ntimeout-ms = {TIMEOUT_MS}\n"))?;
    let plugin = load(&engine, &manifest, HOSTILE).await?;
    let mut overshoot = Vec::new();
    for _ in 0..RUNS {
        let request = Request { operation_id: "bench".into(), input: "loop".into() };
        let start = Instant::now();
        let result = engine.provision(&plugin, request, Arc::new(Discard)).await;
        let elapsed = start.elapsed();
        if !matches!(
            result,
            Err(provd_engine::InvokeError::Limit(provd_engine::Limit::Deadline { .. }))
        ) {
            bail!("the loop was not stopped by its deadline: {result:?}");
        }
        overshoot.push(elapsed.saturating_sub(Duration::from_millis(TIMEOUT_MS)));
    }
    let max = overshoot.iter().max().copied().unwrap_or_default();
    let s = stats(overshoot);
    println!(
        "\n## Infinite loop with a {TIMEOUT_MS} ms deadline ({RUNS} runs, epoch tick 10 ms)\n"
    );
    println!("| overshoot median | p90 | max |");
    println!("|---|---|---|");
    println!("| {:.1} ms | {:.1} ms | {:.1} ms |", ms(s.median), ms(s.p90), ms(max));
    Ok(())
}

fn run(cmd: &mut std::process::Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("{cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

async fn images() -> Result<()> {
    use std::process::Command;
    const RUNS: usize = 5;
    let roots: Vec<std::path::PathBuf> = std::env::var("PROVD_BENCH_ROOTFS")
        .unwrap_or_else(|_| "/var/tmp/rootfs-a:/var/tmp/rootfs-b:/var/tmp/rootfs-c".into())
        .split(':')
        .map(std::path::PathBuf::from)
        .filter(|p| p.is_dir())
        .collect();
    if roots.is_empty() {
        println!("\n## Image import: skipped (no root filesystems; see the section comment)");
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let mut tars = Vec::new();
    for (i, root) in roots.iter().enumerate() {
        let tar = work.path().join(format!("rootfs-{i}.tar"));
        run(Command::new("tar").arg("-C").arg(root).arg("-cf").arg(&tar).arg("."))?;
        tars.push(tar);
    }
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    println!(
        "\n## Image import of {} root filesystems as tar (median of {RUNS}, warm page cache)\n",
        tars.len()
    );
    println!(
        "| image | tar size | tar -x | tar -x + b3sum | provd import (first) | ratio to tar -x |"
    );
    println!("|---|---|---|---|---|---|");
    let mut firsts = Vec::new();
    for (i, tar) in tars.iter().enumerate() {
        let (mut x, mut xb, mut imp) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let out = work.path().join("x");
            std::fs::create_dir_all(&out)?;
            let start = Instant::now();
            run(Command::new("tar").arg("-C").arg(&out).arg("-xf").arg(tar))?;
            x.push(start.elapsed());
            std::fs::remove_dir_all(&out)?;

            std::fs::create_dir_all(&out)?;
            let start = Instant::now();
            run(Command::new("tar").arg("-C").arg(&out).arg("-xf").arg(tar))?;
            run(Command::new("sh")
                .arg("-c")
                .arg("find . -type f -print0 | xargs -0 -r b3sum > /dev/null")
                .current_dir(&out))?;
            xb.push(start.elapsed());
            std::fs::remove_dir_all(&out)?;

            let data = work.path().join("data");
            let store = Arc::new(provd_store::Store::open(&data)?);
            let images = provd_images::Images::new(store, provd_images::ImportLimits::default(), 1);
            let start = Instant::now();
            images
                .import(tar.to_str().context("path")?, Arc::new(provd_images::NoProgress))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            imp.push(start.elapsed());
            drop(images);
            std::fs::remove_dir_all(&data)?;
        }
        let (x, xb, imp) = (stats(x).median, stats(xb).median, stats(imp).median);
        firsts.push(imp);
        println!(
            "| {} | {:.0} MiB | {:.2} s | {:.2} s | {:.2} s | {:.2}× |",
            roots.get(i).map(|r| r.display().to_string()).unwrap_or_default(),
            size(tar) as f64 / (1 << 20) as f64,
            x.as_secs_f64(),
            xb.as_secs_f64(),
            imp.as_secs_f64(),
            imp.as_secs_f64() / x.as_secs_f64()
        );
    }
    if tars.len() >= 2 {
        // The second and later images into a store that already holds the
        // first: only new content is written.
        let mut later = vec![Vec::new(); tars.len() - 1];
        for _ in 0..RUNS {
            let data = work.path().join("data");
            let store = Arc::new(provd_store::Store::open(&data)?);
            let images = provd_images::Images::new(store, provd_images::ImportLimits::default(), 1);
            for (i, tar) in tars.iter().enumerate() {
                let start = Instant::now();
                images
                    .import(tar.to_str().context("path")?, Arc::new(provd_images::NoProgress))
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                if let Some(slot) = i.checked_sub(1).and_then(|j| later.get_mut(j)) {
                    slot.push(start.elapsed());
                }
            }
            let s = images.store().stats()?;
            drop(images);
            std::fs::remove_dir_all(&data)?;
            if later.first().map(Vec::len) == Some(RUNS) {
                let naive: u64 = tars.iter().map(|t| size(t)).sum();
                println!(
                    "\nAll {} images in one store: {} objects, {:.0} MiB of content (tar files: {:.0} MiB together).\n",
                    tars.len(),
                    s.objects,
                    s.object_bytes as f64 / (1 << 20) as f64,
                    naive as f64 / (1 << 20) as f64
                );
            }
        }
        println!("| image imported after the others | provd import | vs its first import |");
        println!("|---|---|---|");
        for (i, samples) in later.into_iter().enumerate() {
            let t = stats(samples).median;
            let first = firsts.get(i + 1).copied().unwrap_or_default();
            println!(
                "| {} | {:.2} s | {:.2}× |",
                roots.get(i + 1).map(|r| r.display().to_string()).unwrap_or_default(),
                t.as_secs_f64(),
                t.as_secs_f64() / first.as_secs_f64()
            );
        }
    }
    oci_import(&roots, &tars, &firsts).await
}

/// The same root filesystems as one-layer OCI images in a registry on
/// 127.0.0.1 (pushed with skopeo, which gzips the layer).
async fn oci_import(
    roots: &[std::path::PathBuf],
    tars: &[std::path::PathBuf],
    firsts: &[Duration],
) -> Result<()> {
    const RUNS: usize = 3;
    if std::process::Command::new("docker-registry").arg("--version").output().is_err() {
        println!("\n(OCI import skipped: docker-registry is not installed)");
        return Ok(());
    }
    let registry = provd_tests::oci::start_registry();
    let work = tempfile::tempdir()?;
    println!(
        "\n| image as OCI (one gzip layer) | provd import from the registry | vs provd import of the tar |"
    );
    println!("|---|---|---|");
    for (i, tar) in tars.iter().enumerate() {
        let layout = work.path().join(format!("layout-{i}"));
        provd_tests::oci::oci_layout(&layout, &[std::fs::read(tar)?], "v1");
        provd_tests::oci::push(&layout, "v1", &registry, &format!("bench/rootfs{i}"));
        let reference = format!("oci+http://127.0.0.1:{}/bench/rootfs{i}:v1", registry.port);
        let mut samples = Vec::new();
        for _ in 0..RUNS {
            let data = work.path().join("data");
            let store = Arc::new(provd_store::Store::open(&data)?);
            let images = provd_images::Images::new(store, provd_images::ImportLimits::default(), 1);
            let start = Instant::now();
            images
                .import(&reference, Arc::new(provd_images::NoProgress))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            samples.push(start.elapsed());
            drop(images);
            std::fs::remove_dir_all(&data)?;
        }
        let t = stats(samples).median;
        let first = firsts.get(i).copied().unwrap_or_default();
        println!(
            "| {} | {:.2} s | {:.2}× |",
            roots.get(i).map(|r| r.display().to_string()).unwrap_or_default(),
            t.as_secs_f64(),
            t.as_secs_f64() / first.as_secs_f64()
        );
    }
    Ok(())
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
fn mib_s(mib: usize, d: Duration) -> f64 {
    mib as f64 / d.as_secs_f64()
}
