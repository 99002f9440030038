//! Managers' requests while one address floods a real `provd serve` with
//! idle and slow TLS handshakes. Run with:
//!
//! ```text
//! cargo build --release -p provd-daemon -p provd-bench
//! target/release/bench-flood        # SECONDS=5 IDLE=2000 SLOW=200 by default
//! ```
//!
//! Measures authenticated `GET /v1/vms` from 127.0.0.1, requests/s and
//! p50/p99 latency, first without load, then while IDLE connections that
//! never send a byte and SLOW ones that send a ClientHello one byte every
//! 500 ms are held from 127.0.0.1 (re-opened as the node closes them). Two
//! kinds of manager: one keeping its connection (4 at once), and one
//! opening a new connection, with a full handshake, for every request.

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use provd_bench::{ms, percentile};
use provd_client::{Client, TlsFiles};
use provd_tests::daemon::{DEFAULT_EXTRA, TestNode};

/// The start of a TLS 1.2 ClientHello record, sent a byte at a time.
const HELLO: [u8; 11] = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];

fn connect(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n).filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()).collect()
}

/// Whether the node has closed `s` (without blocking).
fn open(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    if s.set_nonblocking(true).is_err() {
        return false;
    }
    match std::io::Read::read(&mut &*s, &mut b) {
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        Ok(n) => n > 0,
    }
}

/// Holds `idle` and `slow` connections until `stop`; returns how many it
/// opened in all.
fn flood(addr: SocketAddr, idle: usize, slow: usize, stop: Arc<AtomicBool>) -> u64 {
    let mut held = connect(addr, idle);
    let mut dribbling = connect(addr, slow);
    let mut opened = (held.len() + dribbling.len()) as u64;
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        for s in &mut dribbling {
            let byte = HELLO.get(i % HELLO.len()..).and_then(|b| b.get(..1)).unwrap_or_default();
            let _ = s.write_all(byte);
        }
        i += 1;
        held.retain(open);
        dribbling.retain(open);
        let more = connect(addr, idle.saturating_sub(held.len()));
        opened += more.len() as u64;
        held.extend(more);
        let more = connect(addr, slow.saturating_sub(dribbling.len()));
        opened += more.len() as u64;
        dribbling.extend(more);
        std::thread::sleep(Duration::from_millis(500));
    }
    opened
}

struct Figures {
    per_second: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
}

/// `concurrency` loops of `GET /v1/vms` for `seconds`; `fresh` makes a new
/// client (connection and handshake) for every request.
async fn load(node: &TestNode, seconds: u64, concurrency: usize, fresh: bool) -> Result<Figures> {
    let (ca, cert, key) = node.tls();
    let files = TlsFiles { ca, cert: Some(cert), key: Some(key) };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let shared = Client::new(&node.url, &files)?;
        let (url, files, errors) = (node.url.clone(), files.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let client =
                    if fresh { Client::new(&url, &files).ok() } else { Some(shared.clone()) };
                let ok = match client {
                    Some(c) => c.get("/v1/vms").await.is_ok(),
                    None => false,
                };
                if !ok {
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
    lat.sort();
    Ok(Figures {
        per_second: lat.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        errors: errors.load(Ordering::Relaxed),
    })
}

fn row(what: &str, f: &Figures) {
    println!(
        "{what:<34} {:>9.0} {:>9.2} {:>9.2} {:>7}",
        f.per_second,
        ms(f.p50),
        ms(f.p99),
        f.errors
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|s| s.parse().ok()).unwrap_or(d);
    let seconds = env("SECONDS", 5);
    let idle = usize::try_from(env("IDLE", 2000)).unwrap_or(2000);
    let slow = usize::try_from(env("SLOW", 200)).unwrap_or(200);
    let limit = provd_tests::raise_open_files();
    if (idle + slow + 256) as u64 > limit {
        bail!("{idle} + {slow} connections need more open files than the limit of {limit}");
    }
    let provd = std::env::current_exe()?.with_file_name("provd");
    if !provd.exists() {
        bail!("{} is missing: cargo build --release -p provd-daemon", provd.display());
    }
    let dir = tempfile::tempdir()?;
    let node = TestNode::start(&provd, dir.path(), DEFAULT_EXTRA).context("starting provd")?;
    let addr: SocketAddr = node.url.trim_start_matches("https://").parse()?;
    println!(
        "provd {} on {} (2 CPUs shared with the load and the flood)",
        provd.display(),
        node.url
    );
    println!("authenticated GET /v1/vms from 127.0.0.1, {seconds} s each\n");
    println!("{:<34} {:>9} {:>9} {:>9} {:>7}", "", "req/s", "p50 ms", "p99 ms", "errors");
    let quiet = [load(&node, seconds, 4, false).await?, load(&node, seconds, 1, true).await?];
    row("quiet, 4 kept connections", &quiet[0]);
    row("quiet, a new connection each", &quiet[1]);

    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        std::thread::spawn(move || flood(addr, idle, slow, stop))
    };
    // The flood's first connections are open before the managers start.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let flooded = [load(&node, seconds, 4, false).await?, load(&node, seconds, 1, true).await?];
    stop.store(true, Ordering::Relaxed);
    let opened = flooder.join().map_err(|_| anyhow::anyhow!("the flood thread panicked"))?;
    row(&format!("{idle} idle + {slow} slow, 4 kept"), &flooded[0]);
    row(&format!("{idle} idle + {slow} slow, new each"), &flooded[1]);
    println!("\nthe flood opened {opened} connections in all");
    for (what, q, f) in [("kept", &quiet[0], &flooded[0]), ("new each", &quiet[1], &flooded[1])] {
        println!(
            "{what}: throughput {:.2}x, p50 {:.2}x, p99 {:.2}x of quiet",
            f.per_second / q.per_second,
            ms(f.p50) / ms(q.p50).max(1e-9),
            ms(f.p99) / ms(q.p99).max(1e-9)
        );
    }
    Ok(())
}
