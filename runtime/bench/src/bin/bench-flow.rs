//! The product's flow end to end, and how it grows with the number of VMs.
//! Run with:
//!
//! ```text
//! cargo build --release -p provd-daemon -p provd-bench
//! target/release/bench-flow        # ROOTS=/var/tmp/rootfs-a:/var/tmp/rootfs-b:/var/tmp/rootfs-c COUNTS="2 4 8 16 32"
//! ```
//!
//! A real `provd serve` (release) over mutual TLS runs the `shared-partition`
//! plugin for N VMs drawn in turn from the root filesystems in `ROOTS`
//! (by default three `debootstrap --variant=minbase` roots with different
//! package sets). For each N it prints the wall time of each phase as the
//! plugin reports it, the bytes provd puts on disk (shared partition,
//! private partitions, seeds) against the two peers measured in the same
//! run on the same roots, and the daemon's peak resident memory:
//!
//! * naive: a full ext4 image per VM (`mke2fs -d` of its root);
//! * qcow2: a qcow2 base per image (`qemu-img convert` of that ext4) and a
//!   qcow2 overlay per VM on it (`qemu-img create -b`), how Nova shares a
//!   base between VMs of one image.
//!
//! Images are imported once, in a first run with one VM per root (its
//! `fetch-images` phase is the import); every N after that finds them in the
//! store. The node is emptied (every VM deleted) between runs.
//!
//! Then (`MODE=both`, the default, or `MODE=alone`) `ALONE` VMs (32) arrive
//! one request each, in the order of the roots (web, api, db, web, …), as
//! hosting customers order them: the time of each request, the bytes on
//! disk after it against the single request of as many VMs and against
//! qcow2, then every other VM is deleted. `MODE=single` skips it.
//!
//! `MODE=tenants` instead makes three tenants' custom images (each a root
//! of `ROOTS`, which are the node's public catalogue, plus 1–3 MiB of its
//! own files) and provisions `ALONE` VMs (12) of them one request each,
//! after one VM of each public root: once with each VM's tenant, once all
//! of the default tenant, with bytes on disk against qcow2 and the median
//! one-VM request time of each.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use provd_bench::{allocated, run};
use provd_client::{Client, TlsFiles};
use provd_tests::daemon::{TestNode, rss_kib, sample_peak_rss};
use provd_tests::{SHARED_PARTITION, pseudo_random};
use serde_json::{Value, json};

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// The peers' files for one root: (naive ext4 bytes, qcow2 base bytes,
/// qcow2 overlay bytes, seconds to make the ext4, seconds to convert).
struct Peer {
    base_path: PathBuf,
    naive: u64,
    base: u64,
    overlay: u64,
    naive_secs: f64,
    base_secs: f64,
}

fn peers(root: &Path, dir: &Path, i: usize) -> Result<Peer> {
    let ext4 = dir.join(format!("root{i}.ext4"));
    // The same sizing as scripts/bench-partitions.sh: content + 30 % + 64 MiB.
    let size = allocated(root)? * 13 / 10 + (64 << 20);
    let t = Instant::now();
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(root)
        .arg(&ext4)
        .arg(format!("{}k", size / 1024)))?;
    let naive_secs = t.elapsed().as_secs_f64();
    let base = dir.join(format!("base{i}.qcow2"));
    let t = Instant::now();
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&ext4)
        .arg(&base))?;
    let base_secs = t.elapsed().as_secs_f64();
    let overlay = dir.join(format!("overlay{i}.qcow2"));
    make_overlay(&base, &overlay)?;
    Ok(Peer {
        naive: allocated(&ext4)?,
        base: allocated(&base)?,
        base_path: base,
        overlay: allocated(&overlay)?,
        naive_secs,
        base_secs,
    })
}

/// A qcow2 overlay on `base`: what Nova and Proxmox make per VM.
fn make_overlay(base: &Path, overlay: &Path) -> Result<()> {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(base)
        .args(["-F", "qcow2"])
        .arg(overlay))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn spec(name: &str, root: &Path) -> Value {
    json!({"name": name, "hypervisor": "libvirt", "vcpus": 1, "memory-mib": 256,
           "image": format!("dir:{}", root.display()), "boot": {"firmware": "uefi"},
           "nics": [{"bridge": "br0", "dhcp4": true}]})
}

/// What one provisioning took: phase → seconds, total seconds, the
/// report, the daemon's peak RSS in KiB.
type Provisioned = (BTreeMap<String, f64>, f64, Value, u64);

/// One provisioning of `n` VMs, `vm-0`… drawn in turn from `roots`.
async fn provision(c: &Client, pid: u32, roots: &[PathBuf], n: usize) -> Result<Provisioned> {
    let vms: Vec<Value> =
        (0..n).zip(roots.iter().cycle()).map(|(i, root)| spec(&format!("vm-{i}"), root)).collect();
    provision_specs(c, pid, vms).await
}

/// One provisioning of the VMs `vms` describes.
async fn provision_specs(c: &Client, pid: u32, vms: Vec<Value>) -> Result<Provisioned> {
    let n = vms.len();
    let request = json!({"plugin": "shared-partition", "vms": vms,
                         "params": {"shared-format": "erofs", "private-format": "ext4"}});
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_peak_rss(pid, stop.clone());
    let started = Instant::now();
    let op = c.provision(&request).await?;
    let id = op.body.pointer("/operation/id").and_then(Value::as_str).context("no id")?.to_string();
    let mut marks: Vec<(String, Instant)> = Vec::new();
    let done = c
        .wait(&id, |op| {
            if let Some(p) = op.phase.as_deref()
                && marks.last().map(|(m, _)| m.as_str()) != Some(p)
            {
                marks.push((p.to_string(), Instant::now()));
            }
        })
        .await?;
    let end = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap_or(0);
    if done.state != provd_wire::OperationState::Succeeded {
        bail!("provisioning {n} VMs: {done:#?}");
    }
    let mut phases = BTreeMap::new();
    for (i, (phase, at)) in marks.iter().enumerate() {
        let next = marks.get(i + 1).map(|(_, t)| *t).unwrap_or(end);
        *phases.entry(phase.clone()).or_insert(0.0) += (next - *at).as_secs_f64();
    }
    let report = done.report.clone().unwrap_or_default();
    Ok((phases, (end - started).as_secs_f64(), report, peak))
}

async fn empty(c: &Client, n: usize) -> Result<()> {
    for i in 0..n {
        c.delete(&format!("/v1/vms/vm-{i}")).await?;
    }
    Ok(())
}

/// Bytes provd holds for its VMs: partitions, seeds and configurations.
fn node_bytes(data: &Path) -> Result<u64> {
    Ok(allocated(&data.join("partitions"))? + allocated(&data.join("vms"))?)
}

/// `n` VMs arriving one request each, drawn in turn from `roots` (web,
/// api, db, web, …): the time of each request and the bytes on disk after
/// it; then every other VM deleted. Returns the bytes after the last
/// request.
async fn one_at_a_time(
    c: &Client,
    pid: u32,
    data: &Path,
    roots: &[PathBuf],
    n: usize,
    single_bytes: Option<u64>,
    peer: &[Peer],
) -> Result<u64> {
    let used: Vec<&Peer> = peer.iter().cycle().take(n).collect();
    let qcow2 = peer.iter().take(n.min(peer.len())).map(|p| p.base).sum::<u64>()
        + used.iter().map(|p| p.overlay).sum::<u64>();
    println!(
        "
{n} VMs, one request each (roots in turn):"
    );
    println!(
        "{:>8} {:>9} {:>8} {:>9} {:>10} {:>9} {:>11} {:>11} {:>9}",
        "request",
        "total s",
        "plan s",
        "shared s",
        "private s",
        "config s",
        "stored MiB",
        "node MiB",
        "RSS MiB"
    );
    let mut times = Vec::with_capacity(n);
    let mut parts: Vec<[f64; 4]> = Vec::with_capacity(n);
    let mut bytes = 0;
    for (i, root) in (0..n).zip(roots.iter().cycle()) {
        let (phases, total, report, peak) =
            provision_specs(c, pid, vec![spec(&format!("vm-{i}"), root)]).await?;
        times.push(total);
        bytes = node_bytes(data)?;
        let stored =
            report.pointer("/output/totals/stored_bytes").and_then(Value::as_u64).unwrap_or(0);
        let t = |p: &str| phases.get(p).copied().unwrap_or(0.0);
        let known =
            t("plan") + t("shared-partition") + t("private-partitions") + t("configure-vms");
        parts.push([t("plan"), t("private-partitions"), t("configure-vms"), total - known]);
        println!(
            "{:>8} {:>9.3} {:>8.3} {:>9.3} {:>10.3} {:>9.3} {:>11.1} {:>11.1} {:>9.1}",
            i + 1,
            total,
            t("plan"),
            t("shared-partition"),
            t("private-partitions"),
            t("configure-vms"),
            mib(stored),
            mib(bytes),
            peak as f64 / 1024.0
        );
    }
    let (second, last) =
        (times.get(1).copied().unwrap_or(0.0), times.last().copied().unwrap_or(0.0));
    let rest: Vec<f64> = times.iter().skip(roots.len()).copied().collect();
    let mean = rest.iter().sum::<f64>() / rest.len().max(1) as f64;
    println!(
        "request {n} took {last:.2} s, request 2 {second:.2} s (ratio {:.2}); \
         requests {}..{n}: mean {mean:.2} s",
        last / second.max(f64::MIN_POSITIVE),
        roots.len() + 1
    );
    print!("on disk after {n} requests: {:.1} MiB", mib(bytes));
    if let Some(single) = single_bytes {
        print!(
            ", {:.3}x the single request of {n} VMs ({:.1} MiB)",
            bytes as f64 / single as f64,
            mib(single)
        );
    }
    println!(", {:.3}x qcow2 base + overlays ({:.1} MiB)", bytes as f64 / qcow2 as f64, mib(qcow2));
    // Where a request of a VM whose layers the node holds spends its time.
    let later = parts.get(roots.len()..).unwrap_or_default();
    let col = |k: usize| later.iter().map(|p| p.get(k).copied().unwrap_or(0.0)).collect::<Vec<_>>();
    println!(
        "requests {}..{n}, median seconds: total {:.3}, plan {:.3}, private partition {:.3}, \
         configuration {:.3}, the rest (HTTP, plugin, operation records) {:.3}",
        roots.len() + 1,
        median(&rest),
        median(&col(0)),
        median(&col(1)),
        median(&col(2)),
        median(&col(3))
    );
    // The peer in the same run: an overlay per VM on its image's base.
    let dir = tempfile::Builder::new().prefix("provd-bench-overlays-").tempdir_in("/var/tmp")?;
    let mut overlay_secs = Vec::with_capacity(n);
    for (i, p) in used.iter().enumerate() {
        let t = Instant::now();
        make_overlay(&p.base_path, &dir.path().join(format!("vm-{i}.qcow2")))?;
        overlay_secs.push(t.elapsed().as_secs_f64());
    }
    let overlays: f64 = overlay_secs.iter().sum();
    let bases: f64 = peer.iter().take(n.min(peer.len())).map(|p| p.naive_secs + p.base_secs).sum();
    let provd: f64 = times.iter().sum();
    println!(
        "qcow2 overlay per VM (qemu-img create -b): median {:.3} s; provd's request of a VM \
         whose layers the node holds: median {:.3} s ({:.2}x)",
        median(&overlay_secs),
        median(&rest),
        median(&rest) / median(&overlay_secs).max(f64::MIN_POSITIVE)
    );
    println!(
        "{n} VMs: provd {provd:.2} s in {n} requests (images in the store); qcow2 {:.2} s \
         (bases: mke2fs -d + convert {bases:.2} s, overlays {overlays:.2} s): {:.2}x",
        bases + overlays,
        provd / (bases + overlays).max(f64::MIN_POSITIVE)
    );
    let t = Instant::now();
    for i in (1..n).step_by(2) {
        c.delete(&format!("/v1/vms/vm-{i}")).await?;
    }
    let left = node_bytes(data)?;
    println!(
        "every other VM deleted ({:.2} s): {:.1} MiB on disk for the {} left",
        t.elapsed().as_secs_f64(),
        mib(left),
        n.div_ceil(2)
    );
    let t = Instant::now();
    let repacked = c.post_json("/v1/repack", &json!({"all": true})).await?;
    let secs = t.elapsed().as_secs_f64();
    let r = repacked.body.get("repack").cloned().unwrap_or_default();
    let count = |k: &str| r.get(k).and_then(Value::as_array).map(Vec::len).unwrap_or(0);
    println!(
        "repack of the {} left: {secs:.2} s, {} moved, {} shared partitions freed; \
         {:.1} MiB on disk ({:.3}x before the repack); shared partitions {:.1} -> {:.1} MiB",
        n.div_ceil(2),
        count("moved"),
        count("freed"),
        mib(node_bytes(data)?),
        node_bytes(data)? as f64 / left as f64,
        mib(r.get("shared_bytes_before").and_then(Value::as_u64).unwrap_or(0)),
        mib(r.get("shared_bytes_after").and_then(Value::as_u64).unwrap_or(0)),
    );
    for i in (0..n).step_by(2) {
        c.delete(&format!("/v1/vms/vm-{i}")).await?;
    }
    Ok(bytes)
}

/// Tenant `tenant`'s custom image: `root` (a public image) plus `own_mib`
/// MiB of the tenant's own files, written under `dir`.
fn custom_root(root: &Path, dir: &Path, tenant: u64, own_mib: u64) -> Result<PathBuf> {
    run(Command::new("cp").arg("-a").arg(root).arg(dir))?;
    let own = dir.join("srv/tenant");
    std::fs::create_dir_all(&own)?;
    for i in 0..own_mib {
        // Bytes no other tenant has: a pseudo-random stream per file.
        std::fs::write(own.join(format!("data-{i}")), pseudo_random(1 << 20, tenant << 32 | i))?;
    }
    Ok(dir.to_path_buf())
}

/// `n` VMs of three tenants, one request each, after one VM of each public
/// root: VM i is tenant `t<i mod 3>`'s, of its custom image (public root
/// i mod 3 plus 1–3 MiB of its own). Run twice on the same images: with
/// each VM's tenant, then every VM of the default tenant (`--` the sharing
/// a single-tenant node gets). Prints bytes on disk of each against qcow2
/// (a base per custom image and an overlay per VM) and the median time of a
/// request, whose difference is what the domain checks cost.
async fn tenants(
    c: &Client,
    pid: u32,
    data: &Path,
    roots: &[PathBuf],
    customs: &[PathBuf],
    n: usize,
) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("provd-bench-tenants-").tempdir_in("/var/tmp")?;
    let peer: Vec<Peer> =
        customs.iter().enumerate().map(|(i, r)| peers(r, dir.path(), i)).collect::<Result<_>>()?;
    let qcow2 = peer.iter().map(|p| p.base).sum::<u64>()
        + peer.iter().cycle().take(n).map(|p| p.overlay).sum::<u64>();
    println!(
        "
{n} VMs of 3 tenants, one request each, after one VM of each public root:"
    );
    let mut results = Vec::new();
    for tenanted in [true, false] {
        for (i, root) in roots.iter().enumerate() {
            provision_specs(c, pid, vec![spec(&format!("pub-{i}"), root)]).await?;
        }
        let start = node_bytes(data)?;
        let mut times = Vec::with_capacity(n);
        for (i, custom) in (0..n).zip(customs.iter().cycle()) {
            let mut vm = spec(&format!("vm-{i}"), custom);
            if tenanted && let Some(obj) = vm.as_object_mut() {
                obj.insert("tenant".into(), json!(format!("t{}", i % customs.len())));
            }
            let (_, total, _, _) = provision_specs(c, pid, vec![vm]).await?;
            times.push(total);
        }
        let bytes = node_bytes(data)?;
        let label = if tenanted { "3 tenants" } else { "one tenant" };
        println!(
            "  {label:>10}: {:.1} MiB on disk ({:.1} MiB the public VMs, {:.1} MiB the {n} tenants' VMs), {:.3}x qcow2 base + overlays ({:.1} MiB); one-VM request median {:.3} s",
            mib(bytes),
            mib(start),
            mib(bytes.saturating_sub(start)),
            bytes as f64 / qcow2 as f64,
            mib(qcow2),
            median(&times)
        );
        results.push((bytes, median(&times)));
        for i in 0..n {
            c.delete(&format!("/v1/vms/vm-{i}")).await?;
        }
        for i in 0..roots.len() {
            c.delete(&format!("/v1/vms/pub-{i}")).await?;
        }
    }
    if let [(tb, tt), (sb, st)] = results.as_slice() {
        println!(
            "  3 tenants against one: {:.3}x the bytes, {:.3}x the one-VM request time (the domain checks)",
            *tb as f64 / *sb as f64,
            tt / st.max(f64::MIN_POSITIVE)
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let roots: Vec<PathBuf> = std::env::var("ROOTS")
        .unwrap_or_else(|_| "/var/tmp/rootfs-a:/var/tmp/rootfs-b:/var/tmp/rootfs-c".into())
        .split(':')
        .map(PathBuf::from)
        .collect();
    let counts: Vec<usize> = std::env::var("COUNTS")
        .unwrap_or_else(|_| "2 4 8 16 32".into())
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    for r in &roots {
        if !r.is_dir() {
            bail!(
                "{} is missing: build it with debootstrap --variant=minbase (docs/benchmarks.md)",
                r.display()
            );
        }
    }
    let provd = std::env::current_exe()?.with_file_name("provd");
    if !provd.exists() {
        bail!("{} is missing: cargo build --release -p provd-daemon", provd.display());
    }
    let work = tempfile::Builder::new().prefix("provd-bench-flow-").tempdir_in("/var/tmp")?;
    let mode = std::env::var("MODE").unwrap_or_else(|_| "both".into());
    // MODE=tenants: three tenants' custom images, each a root plus 1–3 MiB
    // of its own; the roots are the public catalogue.
    let customs: Vec<PathBuf> = if mode == "tenants" {
        let dir = work.path().join("tenants");
        std::fs::create_dir_all(&dir)?;
        roots
            .iter()
            .enumerate()
            .map(|(i, r)| custom_root(r, &dir.join(format!("t{i}")), i as u64, i as u64 + 1))
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let sources: Vec<String> =
        roots.iter().chain(&customs).map(|r| format!("\"dir:{}\"", r.display())).collect();
    let public: Vec<String> = roots.iter().map(|r| format!("\"dir:{}\"", r.display())).collect();
    let extra = format!(
        "[policy]\nimage-sources = [{}]\n[sharing]\npublic-images = [{}]\n\
         [capacity]\nvcpus = 256\nmemory-mib = 1048576\ndisk-bytes = 109951162777600\n",
        sources.join(", "),
        public.join(", ")
    );
    let node = TestNode::start(&provd, work.path(), &extra).context("starting provd")?;
    let pid = node.pid().context("no pid")?;
    let (ca, cert, key) = node.tls();
    let c = Client::new(&node.url, &TlsFiles { ca, cert: Some(cert), key: Some(key) })?;
    let manifest = std::fs::read_to_string(SHARED_PARTITION.dir().join("plugin.toml"))?;
    c.deploy(node.bundle(&manifest, &SHARED_PARTITION.wasm())).await?;
    println!("provd {} on {}; roots:", provd.display(), node.url);
    for r in &roots {
        println!("  {} ({:.1} MiB allocated)", r.display(), mib(allocated(r)?));
    }
    println!("daemon RSS at rest: {:.1} MiB", rss_kib(pid) as f64 / 1024.0);

    // The peers, on the same roots.
    let peer_dir = work.path().join("peers");
    std::fs::create_dir_all(&peer_dir)?;
    let peer: Vec<Peer> =
        roots.iter().enumerate().map(|(i, r)| peers(r, &peer_dir, i)).collect::<Result<_>>()?;
    for (r, p) in roots.iter().zip(&peer) {
        println!(
            "  peer files of {}: ext4 {:.1} MiB ({:.2} s), qcow2 base {:.1} MiB (+{:.2} s), overlay {:.2} MiB",
            r.display(),
            mib(p.naive),
            p.naive_secs,
            mib(p.base),
            p.base_secs,
            mib(p.overlay)
        );
    }

    // First run: one VM per root; its fetch phase imports the images.
    let (phases, total, _, peak) = provision(&c, pid, &roots, roots.len()).await?;
    println!(
        "\nimport + first provisioning of {} VMs: {total:.2} s (fetch-images {:.2} s), peak RSS {:.1} MiB",
        roots.len(),
        phases.get("fetch-images").copied().unwrap_or(0.0),
        peak as f64 / 1024.0
    );
    empty(&c, roots.len()).await?;

    let order = ["fetch-images", "plan", "shared-partition", "private-partitions", "configure-vms"];
    println!("\nimages in the store; seconds per phase, bytes on disk, provd's peak RSS:");
    println!(
        "{:>4} {:>7} {:>6} {:>6} {:>7} {:>8} {:>9} {:>9} {:>11} {:>11} {:>7} {:>11} {:>7} {:>8}",
        "VMs",
        "fetch",
        "plan",
        "shared",
        "private",
        "config",
        "total s",
        "provd MiB",
        "naive MiB",
        "naive s*",
        "ratio",
        "qcow2 MiB",
        "ratio",
        "RSS MiB"
    );
    let mut single_bytes = BTreeMap::new();
    if mode == "tenants" {
        let n = std::env::var("ALONE").ok().and_then(|v| v.parse().ok()).unwrap_or(12usize);
        tenants(&c, pid, &node.data, &roots, &customs, n).await?;
        println!("daemon RSS at the end: {:.1} MiB", rss_kib(pid) as f64 / 1024.0);
        return Ok(());
    }
    for &n in counts.iter().filter(|_| mode != "alone") {
        let (phases, total, report, peak) = provision(&c, pid, &roots, n).await?;
        let t = |p: &str| phases.get(p).copied().unwrap_or(0.0);
        let shared = report
            .pointer("/output/totals/shared_partition_bytes")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let private = report
            .pointer("/output/totals/private_partitions_bytes")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let seeds = allocated(&node.data.join("vms"))?;
        let provd_bytes = shared + private + seeds;
        single_bytes.insert(n, node_bytes(&node.data)?);
        let used: Vec<&Peer> = peer.iter().cycle().take(n).collect();
        let naive: u64 = used.iter().map(|p| p.naive).sum();
        let naive_secs: f64 = used.iter().map(|p| p.naive_secs).sum();
        let bases: u64 = peer.iter().take(n.min(peer.len())).map(|p| p.base).sum();
        let qcow2 = bases + used.iter().map(|p| p.overlay).sum::<u64>();
        println!(
            "{:>4} {:>7.2} {:>6.2} {:>6.2} {:>7.2} {:>8.2} {:>9.2} {:>9.1} {:>11.1} {:>11.2} {:>7.3} {:>11.1} {:>7.3} {:>8.1}",
            n,
            t(order[0]),
            t(order[1]),
            t(order[2]),
            t(order[3]),
            t(order[4]),
            total,
            mib(provd_bytes),
            mib(naive),
            naive_secs,
            provd_bytes as f64 / naive as f64,
            mib(qcow2),
            provd_bytes as f64 / qcow2 as f64,
            peak as f64 / 1024.0
        );
        empty(&c, n).await?;
    }
    println!(
        "\n* naive s: the measured mke2fs time of each VM's root, summed over the VMs \
         (a full image per VM is made per VM)."
    );
    if mode != "single" {
        let n = std::env::var("ALONE").ok().and_then(|v| v.parse().ok()).unwrap_or(32usize);
        one_at_a_time(&c, pid, &node.data, &roots, n, single_bytes.get(&n).copied(), &peer).await?;
    }
    println!("daemon RSS at the end: {:.1} MiB", rss_kib(pid) as f64 / 1024.0);
    // The daemon's log (with PROVD_LOG=debug, its build timings) outlives
    // the run's directory if asked.
    if let Some(keep) = std::env::var_os("KEEP_LOG") {
        std::fs::copy(&node.log, &keep)?;
    }
    Ok(())
}
