//! Load on a real `provd serve` over mutual TLS on 127.0.0.1. Run with:
//!
//! ```text
//! cargo build --release -p provd-daemon -p provd-bench
//! target/release/bench-daemon            # SECONDS=5 OPS=400 by default
//! METRICS=both ROUNDS=2 target/release/bench-daemon
//! ```
//!
//! Prints requests/s and p50/p99 latency of status reads
//! (`GET /v1/operations/{id}`) at several concurrencies, provisioning
//! operations per second with the trivial `hello` plugin (start, then
//! follow by long poll until succeeded), and the daemon's resident memory
//! at rest and at its peak under each load. The load generator shares the
//! machine with the daemon.
//!
//! `METRICS=on` (the default) runs the daemon as configured by default,
//! with a scrape of `/metrics` every second meanwhile, as Prometheus would;
//! `off` with `[metrics] enabled = false`; `both` alternates the two
//! `ROUNDS` times on fresh nodes and ends with each figure's median with
//! and without metrics and their ratio.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use provd_bench::{ms, percentile};
use provd_client::{Client, TlsFiles};
use provd_tests::HELLO;
use provd_tests::daemon::{DEFAULT_EXTRA, TestNode, rss_kib, sample_peak_rss};
use serde_json::json;

const HELLO_MANIFEST: &str = "name = \"hello\"\nversion = \"1.0.0\"\n[capabilities.log]\n\
     [capabilities.progress]\n[capabilities.hashing]\n[limits]\nmemory-mib = 16\n";

/// One row of figures: what was measured, per second, p50 and p99.
type Row = (String, f64, f64, f64);

#[tokio::main]
async fn main() -> Result<()> {
    let seconds: u64 = std::env::var("SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let ops: usize = std::env::var("OPS").ok().and_then(|s| s.parse().ok()).unwrap_or(400);
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let mode = std::env::var("METRICS").unwrap_or_else(|_| "on".into());
    let provd = std::env::current_exe()?.with_file_name("provd");
    if !provd.exists() {
        bail!("{} is missing: cargo build --release -p provd-daemon", provd.display());
    }
    let runs: Vec<bool> = match mode.as_str() {
        "on" => vec![true],
        "off" => vec![false],
        "both" => (0..rounds).flat_map(|_| [false, true]).collect(),
        other => bail!("METRICS={other}: on, off or both"),
    };
    let mut off: Vec<Vec<Row>> = Vec::new();
    let mut on: Vec<Vec<Row>> = Vec::new();
    for metrics in runs {
        println!("\n=== metrics {} ===", if metrics { "on, scraped every second" } else { "off" });
        let rows = load(&provd, metrics, seconds, ops).await?;
        if metrics { on.push(rows) } else { off.push(rows) }
    }
    if !off.is_empty() && !on.is_empty() {
        println!("\nmedians of {} rounds, metrics off and on:", off.len().min(on.len()));
        println!(
            "{:<24} {:>10} {:>10} {:>7} {:>9} {:>9} {:>9} {:>9}",
            "", "off /s", "on /s", "on/off", "off p50", "on p50", "off p99", "on p99"
        );
        let labels: Vec<String> =
            off.first().map(|r| r.iter().map(|row| row.0.clone()).collect()).unwrap_or_default();
        for (i, label) in labels.iter().enumerate() {
            let median = |runs: &[Vec<Row>], f: fn(&Row) -> f64| {
                let mut v: Vec<f64> = runs.iter().filter_map(|r| r.get(i)).map(f).collect();
                v.sort_by(f64::total_cmp);
                let n = v.len();
                let at = |k: usize| v.get(k).copied().unwrap_or(f64::NAN);
                if n % 2 == 1 {
                    at(n / 2)
                } else {
                    (at((n / 2).saturating_sub(1)) + at(n / 2)) / 2.0
                }
            };
            let (r0, r1) = (median(&off, |r| r.1), median(&on, |r| r.1));
            println!(
                "{label:<24} {r0:>10.0} {r1:>10.0} {:>7.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                r1 / r0,
                median(&off, |r| r.2),
                median(&on, |r| r.2),
                median(&off, |r| r.3),
                median(&on, |r| r.3),
            );
        }
    }
    Ok(())
}

/// The whole load on a fresh node, with metrics on or off.
async fn load(
    provd: &std::path::Path,
    metrics: bool,
    seconds: u64,
    ops: usize,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let dir = tempfile::tempdir()?;
    let extra = format!(
        "{DEFAULT_EXTRA}[limits]\nmax-running-operations = 16\n[metrics]\nenabled = {metrics}\n"
    );
    let node = TestNode::start(provd, dir.path(), &extra).context("starting provd")?;
    let pid = node.pid().context("no pid")?;
    let (ca, cert, key) = node.tls();
    let client = Client::new(&node.url, &TlsFiles { ca, cert: Some(cert), key: Some(key) })?;
    client.deploy(node.bundle(HELLO_MANIFEST, &HELLO.wasm())).await?;
    let params = json!({"name": "bench", "items": ["a", "b", "c"]});
    let first = client.provision(&json!({"plugin": "hello", "params": params})).await?;
    let id =
        first.body.pointer("/operation/id").and_then(|v| v.as_str()).context("no id")?.to_string();
    client.wait(&id, |_| {}).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // With metrics, a scraper reads them once a second throughout, as
    // Prometheus would; its reads are not counted in the figures.
    let scraping = Arc::new(AtomicBool::new(metrics));
    let scraper = {
        let c = client.clone();
        let scraping = scraping.clone();
        tokio::spawn(async move {
            let mut times = Vec::new();
            while scraping.load(Ordering::Relaxed) {
                let t = Instant::now();
                if c.get_text("/metrics").await.is_ok() {
                    times.push(t.elapsed());
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            times
        })
    };
    println!("provd {} on {} (2 CPUs shared with the load generator)", provd.display(), node.url);
    println!("daemon RSS at rest: {:.1} MiB", rss_kib(pid) as f64 / 1024.0);

    println!("\nstatus reads, GET /v1/operations/{{id}}, {seconds} s each:");
    println!(
        "{:>11} {:>10} {:>9} {:>9} {:>13}",
        "concurrency", "req/s", "p50 ms", "p99 ms", "peak RSS MiB"
    );
    for concurrency in [1usize, 16, 64] {
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = sample_peak_rss(pid, stop.clone());
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let errors = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let c = client.clone();
            let id = id.clone();
            let errors = errors.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    if c.operation(&id, None).await.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        let started = Instant::now();
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await?);
        }
        let elapsed = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        let peak = sampler.join().unwrap_or(0);
        lat.sort();
        rows.push((
            format!("status reads x{concurrency}"),
            lat.len() as f64 / elapsed.as_secs_f64(),
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99)),
        ));
        println!(
            "{:>11} {:>10.0} {:>9.2} {:>9.2} {:>13.1}{}",
            concurrency,
            lat.len() as f64 / elapsed.as_secs_f64(),
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99)),
            peak as f64 / 1024.0,
            match errors.load(Ordering::Relaxed) {
                0 => String::new(),
                n => format!("  ({n} errors)"),
            }
        );
    }

    println!("\nprovisioning with the hello plugin: {ops} operations, start + follow to the end:");
    println!(
        "{:>11} {:>10} {:>9} {:>9} {:>13}",
        "concurrency", "ops/s", "p50 ms", "p99 ms", "peak RSS MiB"
    );
    for concurrency in [1usize, 16] {
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = sample_peak_rss(pid, stop.clone());
        let next = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let c = client.clone();
            let next = next.clone();
            let failures = failures.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                while (next.fetch_add(1, Ordering::Relaxed) as usize) < ops {
                    let t = Instant::now();
                    let req = json!({"plugin": "hello", "params": {"name": "bench", "items": ["a", "b", "c"]}});
                    let ok = match c.provision(&req).await {
                        Ok(a) => {
                            let id = a.body
                                .pointer("/operation/id")
                                .and_then(|v| v.as_str())
                                .unwrap_or_default()
                                .to_string();
                            matches!(c.wait(&id, |_| {}).await, Ok(op) if op.state == provd_wire::OperationState::Succeeded)
                        }
                        Err(_) => false,
                    };
                    if !ok {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await?);
        }
        let elapsed = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        let peak = sampler.join().unwrap_or(0);
        lat.sort();
        rows.push((
            format!("provisioning x{concurrency}"),
            lat.len() as f64 / elapsed.as_secs_f64(),
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99)),
        ));
        println!(
            "{:>11} {:>10.1} {:>9.2} {:>9.2} {:>13.1}{}",
            concurrency,
            lat.len() as f64 / elapsed.as_secs_f64(),
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99)),
            peak as f64 / 1024.0,
            match failures.load(Ordering::Relaxed) {
                0 => String::new(),
                n => format!("  ({n} failed)"),
            }
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!("\ndaemon RSS after the load: {:.1} MiB", rss_kib(pid) as f64 / 1024.0);
    scraping.store(false, Ordering::Relaxed);
    let mut scrapes = scraper.await?;
    if !scrapes.is_empty() {
        scrapes.sort();
        println!(
            "{} scrapes of /metrics: p50 {:.2} ms, p99 {:.2} ms",
            scrapes.len(),
            ms(percentile(&scrapes, 0.5)),
            ms(percentile(&scrapes, 0.99))
        );
    }
    Ok(rows)
}
