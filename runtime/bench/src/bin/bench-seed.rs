//! Time to write one VM's cloud-init NoCloud seed: provd's own ISO 9660
//! writer against `xorriso` (the tool provd ran before, with the same
//! options: volume `cidata`, Joliet, Rock Ridge, root-owned read-only
//! files), same seeds, same disk, same run. Run with:
//!
//! ```text
//! cargo build --release -p provd-bench && target/release/bench-seed    # N=200
//! ```

use std::process::Command;
use std::time::Instant;

use anyhow::{Result, bail};
use provd_vm::cloudinit::{SeedInput, SeedNic, SeedUser, seed_files, write_seed_iso};

fn main() -> Result<()> {
    let n: usize = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let work = tempfile::Builder::new().prefix("provd-bench-seed-").tempdir_in("/var/tmp")?;
    let seeds: Vec<_> = (0..n)
        .map(|i| {
            seed_files(&SeedInput {
                vm: format!("web-{i}"),
                hostname: format!("web-{i}.example"),
                users: vec![SeedUser {
                    name: "ops".into(),
                    ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJDiwd0q0EtpBdN27xv1S9+KrgNRz6jxD4skH2FHqmCr ops@example.com".into()],
                    sudo: true,
                    shell: None,
                }],
                user_data: None,
                network_config: None,
                nics: vec![SeedNic {
                    mac: format!("52:54:00:00:{:02x}:{:02x}", i / 256, i % 256),
                    ipv4: None,
                    ipv6: None,
                    dhcp4: true,
                    dhcp6: false,
                    dns: Vec::new(),
                }],
            })
        })
        .collect::<Result<_, _>>()?;

    let started = Instant::now();
    for (i, seed) in seeds.iter().enumerate() {
        write_seed_iso(seed, &work.path().join(format!("native-{i}.iso")))?;
    }
    let native = started.elapsed().as_secs_f64() / n as f64;

    let started = Instant::now();
    for (i, seed) in seeds.iter().enumerate() {
        let stage = work.path().join(format!("stage-{i}"));
        std::fs::create_dir(&stage)?;
        for (name, content) in seed.files() {
            std::fs::write(stage.join(name), content)?;
        }
        let out = work.path().join(format!("xorriso-{i}.iso"));
        let status = Command::new("/usr/bin/xorriso")
            .arg("-outdev")
            .arg(format!("stdio:{}", out.display()))
            .args(["-volid", "cidata", "-joliet", "on", "-rockridge", "on", "-map"])
            .arg(&stage)
            .args(["/", "-chown_r", "0", "/", "--", "-chgrp_r", "0", "/", "--"])
            .args(["-find", "/", "-type", "f", "-exec", "chmod", "0444", "--"])
            .args(["-find", "/", "-type", "d", "-exec", "chmod", "0555", "--", "-commit"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()?;
        if !status.success() {
            bail!("xorriso failed: {status}");
        }
        std::fs::File::open(&out)?.sync_all()?;
        std::fs::remove_dir_all(&stage)?;
    }
    let xorriso = started.elapsed().as_secs_f64() / n as f64;
    println!("seed images, {n} each, mean per seed:");
    println!("  provd (native ISO 9660 writer)  {:.2} ms", native * 1e3);
    println!("  xorriso                         {:.2} ms", xorriso * 1e3);
    println!("  ratio                           {:.3}", native / xorriso);
    Ok(())
}
