//! Boot time of a guest on provd's layout against the same image copied to
//! a plain ext4 disk, same kernel, same initramfs, same run. Run with:
//!
//! ```text
//! cargo build --release -p provd-daemon -p provd-bench
//! target/release/bench-boot        # RUNS=3 CACHE=/var/tmp/provd-bench-boot
//! ```
//!
//! Two roots, as in the boot test: `web` (this machine's Debian packages,
//! scripts/demo-images.sh) and `cloud` (debootstrap minbase with
//! cloud-init, scripts/cloud-root.sh). A real `provd serve` provisions one
//! VM of each with the shared-partition plugin (its defaults: node layers,
//! each VM's own files in a layer of their own) to boot Debian's cloud
//! kernel with provd's initramfs. The peer is what a provider does without
//! provd: the same root as one ext4 disk (`mke2fs -d`), booted with the
//! same kernel, initramfs and seed (the boot script leaves a root without
//! provd's files alone).
//!
//! Each boot starts from the disks as built (they are restored between
//! runs), so every run is a first boot. It prints, per root and layout,
//! the median and fastest of `RUNS` boots of: qemu start to the guest's
//! first line (`provd-check: begin`, its first process running), to the
//! end of its check (cloud-init included on `cloud`), and to qemu's exit;
//! with KVM or TCG as detected.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use provd_bench::{allocated, run};
use provd_client::{Client, TlsFiles};
use provd_tests::SHARED_PARTITION;
use provd_tests::boot::{
    Console, add_check, boot_domain, cloud_root, demo_roots, guest_kernel, install_boot_files,
};
use provd_tests::daemon::TestNode;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(600);

/// A copy of `file` beside it, to restore it from between boots.
fn keep(file: &Path) -> Result<PathBuf> {
    let copy = file.with_extension("pristine");
    run(Command::new("cp").arg("--sparse=always").arg(file).arg(&copy))?;
    Ok(copy)
}

fn restore(pristine: &Path, file: &Path) -> Result<()> {
    run(Command::new("cp").arg("--sparse=always").arg(pristine).arg(file))
}

#[derive(Default)]
struct Times {
    first: Vec<f64>,
    end: Vec<f64>,
    exit: Vec<f64>,
}

impl Times {
    fn add(&mut self, c: &Console) -> Result<()> {
        if !c.finished() {
            bail!("a boot did not finish its check:\n{}", c.text());
        }
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN);
        self.first.push(secs(c.first_check_line));
        self.end.push(secs(c.check_end));
        self.exit.push(c.elapsed.as_secs_f64());
        Ok(())
    }
}

/// (median, fastest) of some seconds.
fn stats(v: &[f64]) -> (f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let median = s.get(s.len() / 2).copied().unwrap_or(f64::NAN);
    (median, s.first().copied().unwrap_or(f64::NAN))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let runs: usize = std::env::var("RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
    let cache = PathBuf::from(
        std::env::var("CACHE").unwrap_or_else(|_| "/var/tmp/provd-bench-boot".into()),
    );
    std::fs::create_dir_all(&cache)?;
    let provd = std::env::current_exe()?.with_file_name("provd");
    if !provd.exists() {
        bail!("{} is missing: cargo build --release -p provd-daemon", provd.display());
    }
    let kernel = guest_kernel(&cache.join("kernel")).map_err(|e| anyhow!(e))?;
    let cloud_cached = cloud_root(&cache.join("cloud-root")).map_err(|e| anyhow!(e))?;
    let work = tempfile::Builder::new().prefix("provd-bench-boot-").tempdir_in("/var/tmp")?;
    demo_roots(&work.path().join("demo")).map_err(|e| anyhow!(e))?;
    let web = work.path().join("demo/web");
    let cloud = work.path().join("cloud");
    run(Command::new("cp").arg("-a").arg(&cloud_cached).arg(&cloud))?;
    let roots = [("web", web), ("cloud", cloud)];
    for (_, root) in &roots {
        add_check(root, &[]).map_err(|e| anyhow!(e))?;
    }

    let sources: Vec<String> =
        roots.iter().map(|(_, r)| format!("\"dir:{}\"", r.display())).collect();
    let extra = format!(
        "[policy]\nimage-sources = [{}]\n[capacity]\nvcpus = 16\nmemory-mib = 32768\n\
         disk-bytes = 107374182400\n",
        sources.join(", ")
    );
    let node = TestNode::start(&provd, &work.path().join("node"), &extra)?;
    install_boot_files(&kernel, &node.data).map_err(|e| anyhow!(e))?;
    let (ca, cert, key) = node.tls();
    let c = Client::new(&node.url, &TlsFiles { ca, cert: Some(cert), key: Some(key) })?;
    let manifest = std::fs::read_to_string(SHARED_PARTITION.dir().join("plugin.toml"))?;
    c.deploy(node.bundle(&manifest, &SHARED_PARTITION.wasm())).await?;
    let vms: Vec<_> = roots
        .iter()
        .map(|(name, root)| {
            json!({"name": name, "hypervisor": "libvirt", "vcpus": 1, "memory-mib": 512,
                   "image": format!("dir:{}", root.display()),
                   "boot": {"kernel": "vmlinuz", "initrd": "provd-initrd.img",
                            "cmdline": "console=ttyS0 panic=-1 init=/usr/sbin/provd-check"},
                   "cloud-init": {"hostname": format!("{name}.example")}})
        })
        .collect();
    let started = c
        .provision(&json!({"plugin": "shared-partition", "vms": vms,
                            "params": {"shared-format": "erofs", "private-format": "ext4"}}))
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

    let accel = provd_vm::qemu::Accel::detect();
    println!(
        "boot under qemu ({}), {runs} runs each, median (fastest) seconds from qemu's start",
        accel.as_str()
    );
    println!(
        "{:<6} {:<22} {:>16} {:>16} {:>16}",
        "root", "layout", "first guest line", "check done", "qemu exit"
    );
    for (name, root) in &roots {
        let xml = std::fs::read_to_string(node.data.join("vms").join(name).join("domain.xml"))?;
        let provd_domain = provd_vm::qemu::parse_domain(&xml)?;
        let private = provd_domain
            .disks
            .iter()
            .find(|d| d.serial == "root")
            .context("no root disk")?
            .file
            .clone();
        // The peer: one ext4 disk with the whole root, sized as provd sizes
        // a private partition (content plus a quarter, 256 MiB free).
        let plain = work.path().join(format!("{name}.ext4"));
        let bytes = allocated(root)?;
        let size = bytes + bytes / 4 + (256 << 20);
        run(Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-d"])
            .arg(root)
            .arg(&plain)
            .arg(format!("{}k", size / 1024)))?;
        let mut plain_domain = provd_domain.clone();
        plain_domain.disks.retain(|d| d.serial != "root" && !d.serial.starts_with("shared-"));
        plain_domain.pmem.clear();
        plain_domain.disks.insert(
            0,
            provd_vm::qemu::QemuDisk {
                file: plain.clone(),
                format: "raw".into(),
                read_only: false,
                serial: "root".into(),
                direct: false,
            },
        );
        let layouts = [
            ("provd (overlay)", &provd_domain, private),
            ("plain ext4 copy", &plain_domain, plain),
        ];
        for (label, domain, disk) in layouts {
            let pristine = keep(&disk)?;
            let mut t = Times::default();
            for _ in 0..runs {
                restore(&pristine, &disk)?;
                let console = boot_domain(domain, TIMEOUT).map_err(|e| anyhow!(e))?;
                t.add(&console)?;
            }
            restore(&pristine, &disk)?;
            std::fs::remove_file(&pristine)?;
            let (f, ff) = stats(&t.first);
            let (e, ef) = stats(&t.end);
            let (x, xf) = stats(&t.exit);
            println!(
                "{name:<6} {label:<22} {:>16} {:>16} {:>16}",
                format!("{f:.2} ({ff:.2})"),
                format!("{e:.2} ({ef:.2})"),
                format!("{x:.2} ({xf:.2})")
            );
        }
    }
    Ok(())
}
