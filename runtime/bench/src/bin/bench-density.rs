//! Host memory per VM: guests of one image (and of the three demo images
//! mixed) booted together, each reading every file of its root once, on
//! three layouts in the same run on the same roots. Run with:
//!
//! ```text
//! cargo build --release -p provd-daemon -p provd-bench
//! target/release/bench-density     # NS=1,2,4,8 MEM=512 CACHE=/var/tmp/provd-bench-boot
//! ```
//!
//! Layouts:
//! - **provd pmem**: VMs provisioned by a real `provd serve` with the
//!   shared-partition plugin (its defaults), `shared-attach = "pmem"`: the
//!   shared partition is persistent memory the guest maps with DAX;
//! - **provd block**: the same, `shared-attach = "block"`: a read-only
//!   virtio disk, as provd attached it before;
//! - **qcow2**: the peer, each root as an ext4 qcow2 base and one overlay
//!   per guest (`qemu-img create -b`), booted with the same kernel and
//!   initramfs (which leaves a root without provd's files alone).
//!
//! Every guest runs `provd-check` as its first process: it reads every file
//! of its root (`cat`, a directory at a time), reports its `/proc/meminfo`
//! and waits.
//! Once all of a set have reported, the host measures:
//! - the QEMU processes' proportional memory (`/proc/PID/smaps`, PSS), less
//!   their mappings of the VMs' files;
//! - the host page cache of the VMs' files (`fincore`): the shared
//!   partition or qcow2 base, private partitions, overlays, seeds, kernel
//!   and initramfs, each page once, mapped or not;
//!
//! and prints their sum per set, per VM, the marginal MiB of each added
//! guest, the shared files' host cache (shared partition or base) and the
//! guests' own `Cached` and memory in use (`MemTotal` less `MemFree`),
//! medians; `DETAIL=1` also prints each QEMU's largest mappings and each
//! guest's `meminfo`. The VM files' cache is dropped
//! (`POSIX_FADV_DONTNEED` through `dd iflag=nocache`) before each set.
//! Under emulation (TCG) QEMU's translation cache is capped at 64 MiB for
//! every layout alike.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use provd_bench::run;
use provd_client::{Client, TlsFiles};
use provd_tests::SHARED_PARTITION;
use provd_tests::boot::{add_check, demo_roots, guest_kernel, install_boot_files};
use provd_tests::daemon::TestNode;
use provd_tests::smaps::mappings;
use provd_vm::qemu::{Accel, Domain, QemuDisk, parse_domain, qemu_args, qemu_binary};
use serde_json::json;

const IMAGES: [&str; 3] = ["web", "api", "db"];
const TIMEOUT: Duration = Duration::from_secs(1800);
const MIB: f64 = 1048576.0;

/// One guest to boot: its domain and the host files it reads.
struct Guest {
    name: String,
    domain: Domain,
}

/// What one set of guests, booted together, holds in host memory.
struct Measured {
    /// QEMU processes' PSS, their mappings of VM files left out.
    qemu_bytes: u64,
    /// Host page cache of the VMs' files.
    cache_bytes: u64,
    /// Of that, the shared files' (shared partition or qcow2 base).
    shared_cache_bytes: u64,
    /// Each guest's `Cached`, kB.
    guest_cached_kb: Vec<u64>,
    /// Each guest's memory in use (`MemTotal` less `MemFree`), kB.
    guest_used_kb: Vec<u64>,
}

/// Field `field` of the `meminfo` a guest reported on its console.
fn meminfo(console: &str, field: &str) -> Result<u64> {
    let prefix = format!("provd-check: meminfo {field} ");
    console
        .lines()
        .find_map(|l| l.trim_end().strip_prefix(prefix.as_str()))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| anyhow!("a guest reported no {field}:\n{console}"))
}

fn files_of(d: &Domain) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = d.disks.iter().map(|k| k.file.clone()).collect();
    v.extend(d.pmem.iter().map(|p| p.file.clone()));
    v.push(d.kernel.clone());
    v.extend(d.initrd.clone());
    v
}

/// Drops the host page cache of `file` (`POSIX_FADV_DONTNEED`).
fn drop_cache(file: &Path) -> Result<()> {
    run(Command::new("dd").arg(format!("if={}", file.display())).args([
        "iflag=nocache",
        "count=0",
        "status=none",
    ]))
}

/// Bytes of `file` in the host page cache.
fn cached(file: &Path) -> Result<u64> {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(file)
        .output()
        .context("fincore (util-linux)")?;
    String::from_utf8_lossy(&out.stdout).trim().parse().context("fincore's output")
}

/// PSS bytes of `pid`, less its mappings of files with inodes `skip`.
fn pss_without(pid: u32, skip: &BTreeSet<u64>) -> Result<u64> {
    Ok(mappings(pid)?.iter().filter(|m| !skip.contains(&m.inode)).map(|m| m.pss_kib * 1024).sum())
}

/// The mappings of `pid` with the most PSS, for `DETAIL=1`.
fn largest_mappings(pid: u32) -> Result<String> {
    let mut maps = mappings(pid)?;
    maps.sort_by_key(|m| std::cmp::Reverse(m.pss_kib));
    Ok(maps
        .iter()
        .take(6)
        .map(|m| format!("  pid {pid}: PSS {} kB of {} kB {}", m.pss_kib, m.size_kib, m.name))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Boots `guests` together, waits for each to report, measures, stops
/// them.
fn measure(guests: &[Guest], shared: &[PathBuf], work: &Path) -> Result<Measured> {
    // The shared files too: a qcow2 base is no disk of the domain.
    let files: BTreeSet<PathBuf> =
        guests.iter().flat_map(|g| files_of(&g.domain)).chain(shared.iter().cloned()).collect();
    for f in &files {
        drop_cache(f)?;
    }
    let inodes: BTreeSet<u64> =
        files.iter().map(|f| std::fs::metadata(f).map(|m| m.ino())).collect::<Result<_, _>>()?;
    let qemu = qemu_binary()?;
    let accel = Accel::detect();
    let mut running: Vec<(Child, PathBuf)> = Vec::new();
    let stop = |running: &mut Vec<(Child, PathBuf)>| {
        for (c, _) in running.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    };
    for g in guests {
        let mut args = qemu_args(&g.domain, accel);
        // The translation cache, not the guest, would dominate otherwise.
        if let Some(a) = args.iter_mut().find(|a| a.as_str() == "tcg") {
            *a = "tcg,tb-size=64".into();
        }
        // Held, not ended at the check's end: no -no-reboot matters.
        let console = work.join(format!("console-{}.txt", g.name));
        let child = Command::new(&qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&console)?)
            .stderr(Stdio::null())
            .spawn()?;
        running.push((child, console));
    }
    let started = Instant::now();
    let texts = loop {
        let texts: Vec<String> =
            running.iter().map(|(_, c)| std::fs::read_to_string(c).unwrap_or_default()).collect();
        if texts.iter().all(|t| t.contains("provd-check: end")) {
            break texts;
        }
        let exited = running.iter_mut().any(|(c, _)| c.try_wait().ok().flatten().is_some());
        if exited || started.elapsed() > TIMEOUT {
            stop(&mut running);
            bail!("a guest did not report within {TIMEOUT:?} or ended:\n{}", texts.join("\n---\n"));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    std::thread::sleep(Duration::from_secs(2));
    let mut qemu_bytes = 0;
    for (c, _) in &running {
        qemu_bytes += pss_without(c.id(), &inodes)?;
        if std::env::var_os("DETAIL").is_some() {
            eprintln!("{}", largest_mappings(c.id())?);
        }
    }
    let mut cache_bytes = 0;
    for f in &files {
        cache_bytes += cached(f)?;
    }
    let mut shared_cache_bytes = 0;
    for f in shared {
        shared_cache_bytes += cached(f)?;
    }
    stop(&mut running);
    if std::env::var_os("DETAIL").is_some() {
        for t in &texts {
            let lines: Vec<&str> = t.lines().filter(|l| l.contains("meminfo")).collect();
            eprintln!("{}", lines.join("\n"));
        }
    }
    let guest_cached_kb = texts.iter().map(|t| meminfo(t, "Cached")).collect::<Result<_>>()?;
    let guest_used_kb = texts
        .iter()
        .map(|t| Ok(meminfo(t, "MemTotal")?.saturating_sub(meminfo(t, "MemFree")?)))
        .collect::<Result<_>>()?;
    Ok(Measured { qemu_bytes, cache_bytes, shared_cache_bytes, guest_cached_kb, guest_used_kb })
}

fn median(v: &[u64]) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len() / 2).copied().unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let ns: Vec<usize> = std::env::var("NS")
        .unwrap_or_else(|_| "1,2,4,8".into())
        .split(',')
        .map(|n| n.trim().parse().context("NS: comma-separated counts"))
        .collect::<Result<_>>()?;
    let most = ns.iter().copied().max().unwrap_or(1).max(1);
    let mem: u64 = std::env::var("MEM").ok().and_then(|m| m.parse().ok()).unwrap_or(512);
    let cache = PathBuf::from(
        std::env::var("CACHE").unwrap_or_else(|_| "/var/tmp/provd-bench-boot".into()),
    );
    std::fs::create_dir_all(&cache)?;
    let provd = std::env::current_exe()?.with_file_name("provd");
    if !provd.exists() {
        bail!("{} is missing: cargo build --release -p provd-daemon", provd.display());
    }
    let kernel = guest_kernel(&cache.join("kernel")).map_err(|e| anyhow!(e))?;
    let work = tempfile::Builder::new().prefix("provd-bench-density-").tempdir_in("/var/tmp")?;
    demo_roots(&work.path().join("demo")).map_err(|e| anyhow!(e))?;
    let roots: Vec<(&str, PathBuf)> =
        IMAGES.iter().map(|n| (*n, work.path().join("demo").join(n))).collect();
    for (_, root) in &roots {
        add_check(root, &[]).map_err(|e| anyhow!(e))?;
        std::fs::write(root.join("etc/provd-check.read-all"), "")?;
        std::fs::write(root.join("etc/provd-check.hold"), "")?;
    }

    let sources: Vec<String> =
        roots.iter().map(|(_, r)| format!("\"dir:{}\"", r.display())).collect();
    let extra = format!(
        "[policy]\nimage-sources = [{}]\n[capacity]\nvcpus = 256\nmemory-mib = 1048576\n\
         disk-bytes = 1099511627776\n",
        sources.join(", ")
    );
    let node = TestNode::start(&provd, &work.path().join("node"), &extra)?;
    install_boot_files(&kernel, &node.data).map_err(|e| anyhow!(e))?;
    let (ca, cert, key) = node.tls();
    let c = Client::new(&node.url, &TlsFiles { ca, cert: Some(cert), key: Some(key) })?;
    let manifest = std::fs::read_to_string(SHARED_PARTITION.dir().join("plugin.toml"))?;
    c.deploy(node.bundle(&manifest, &SHARED_PARTITION.wasm())).await?;
    // Per layout, `most` VMs of web and one of api and db.
    let mut names: BTreeMap<(&str, &str), Vec<String>> = BTreeMap::new();
    for attach in ["pmem", "block"] {
        let mut vms = Vec::new();
        for (image, root) in &roots {
            let count = if *image == "web" { most } else { 1 };
            for i in 1..=count {
                let name = format!("{attach}-{image}-{i}");
                names.entry((attach, *image)).or_default().push(name.clone());
                vms.push(json!({"name": name, "hypervisor": "libvirt", "vcpus": 1,
                    "memory-mib": mem, "image": format!("dir:{}", root.display()),
                    "boot": {"kernel": "vmlinuz", "initrd": "provd-initrd.img",
                             "cmdline": "console=ttyS0 panic=-1 init=/usr/sbin/provd-check"}}));
            }
        }
        let started = c
            .provision(&json!({"plugin": "shared-partition", "vms": vms,
                                "params": {"shared-attach": attach}}))
            .await?;
        let id = started
            .body
            .pointer("/operation/id")
            .and_then(serde_json::Value::as_str)
            .context("no operation id")?
            .to_string();
        let done = c.wait(&id, |_| {}).await?;
        if done.state != provd_wire::OperationState::Succeeded {
            bail!("provisioning failed: {done:#?}");
        }
    }
    let domain_of = |name: &str| -> Result<Domain> {
        let xml = std::fs::read_to_string(node.data.join("vms").join(name).join("domain.xml"))?;
        Ok(parse_domain(&xml)?)
    };
    let shared_files = |d: &Domain| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = d.pmem.iter().map(|p| p.file.clone()).collect();
        v.extend(
            d.disks.iter().filter(|k| k.serial.starts_with("shared-")).map(|k| k.file.clone()),
        );
        v
    };

    // The peer: each root an ext4 qcow2 base.
    let peer = work.path().join("qcow2");
    std::fs::create_dir_all(&peer)?;
    for (image, root) in &roots {
        let raw = peer.join(format!("{image}.raw"));
        let bytes = provd_bench::allocated(root)?;
        let size = bytes + bytes / 4 + (64 << 20);
        run(Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-d"])
            .arg(root)
            .arg(&raw)
            .arg(format!("{}k", size / 1024)))?;
        run(Command::new("qemu-img")
            .args(["convert", "-q", "-O", "qcow2"])
            .arg(&raw)
            .arg(peer.join(format!("{image}.qcow2"))))?;
        std::fs::remove_file(&raw)?;
    }
    // A qcow2 guest: the pmem layout's domain of that image, its root an
    // overlay of the base, no shared partition.
    let qcow2_guest = |image: &str, i: usize| -> Result<Guest> {
        let mut d = domain_of(&format!("pmem-{image}-1"))?;
        d.pmem.clear();
        d.disks.retain(|k| k.serial != "root" && !k.serial.starts_with("shared-"));
        let overlay = peer.join(format!("{image}-{i}.qcow2"));
        let _ = std::fs::remove_file(&overlay);
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(peer.join(format!("{image}.qcow2")))
            .arg(&overlay))?;
        d.disks.insert(
            0,
            QemuDisk {
                file: overlay,
                format: "qcow2".into(),
                read_only: false,
                serial: "root".into(),
                direct: false,
            },
        );
        d.name = format!("qcow2-{image}-{i}");
        Ok(Guest { name: d.name.clone(), domain: d })
    };

    println!(
        "memory of guests booted together under qemu ({}), {mem} MiB each, every file read once",
        Accel::detect().as_str()
    );
    println!(
        "{:<12} {:<6} {:>10} {:>10} {:>10} {:>10} {:>13} {:>13} {:>11}",
        "layout",
        "set",
        "total MiB",
        "MiB/VM",
        "marginal",
        "qemu PSS",
        "shared cache",
        "guest Cached",
        "guest used"
    );
    let mut sets: Vec<(String, Vec<(&str, usize)>)> =
        ns.iter().map(|&n| (format!("web×{n}"), (1..=n).map(|i| ("web", i)).collect())).collect();
    sets.push(("mixed".into(), IMAGES.iter().map(|i| (*i, 1)).collect()));
    for layout in ["pmem", "block", "qcow2"] {
        let mut previous: Option<(usize, f64)> = None;
        for (label, members) in &sets {
            let mut guests = Vec::new();
            for (image, i) in members {
                guests.push(match layout {
                    "qcow2" => qcow2_guest(image, *i)?,
                    _ => {
                        let name = names
                            .get(&(layout, *image))
                            .and_then(|v| v.get(i - 1))
                            .context("no such VM")?;
                        Guest { name: name.clone(), domain: domain_of(name)? }
                    }
                });
            }
            let shared: BTreeSet<PathBuf> = match layout {
                "qcow2" => members.iter().map(|(im, _)| peer.join(format!("{im}.qcow2"))).collect(),
                _ => guests.iter().flat_map(|g| shared_files(&g.domain)).collect(),
            };
            let shared: Vec<PathBuf> = shared.into_iter().collect();
            let m = measure(&guests, &shared, work.path())?;
            let total = (m.qemu_bytes + m.cache_bytes) as f64 / MIB;
            let n = guests.len();
            let marginal = match previous {
                Some((pn, pt)) if label != "mixed" && n > pn => {
                    format!("{:.1}", (total - pt) / (n - pn) as f64)
                }
                _ => "-".into(),
            };
            if label != "mixed" {
                previous = Some((n, total));
            }
            println!(
                "{:<12} {:<6} {:>10.1} {:>10.1} {:>10} {:>10.1} {:>13.1} {:>13.1} {:>11.1}",
                format!("provd {layout}").replace("provd qcow2", "qcow2"),
                label,
                total,
                total / n as f64,
                marginal,
                m.qemu_bytes as f64 / MIB,
                m.shared_cache_bytes as f64 / MIB,
                median(&m.guest_cached_kb) as f64 / 1024.0,
                median(&m.guest_used_kb) as f64 / 1024.0
            );
        }
    }
    drop(node);
    Ok(())
}
