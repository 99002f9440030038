//! `provctl vm`: check VM specs, and list or delete the VMs of a data
//! directory.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use provd_store::Store;
use serde_json::json;

/// Parses and validates a spec file; prints every problem with its field.
pub fn check(file: &Path, json_out: bool) -> Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    match provd_vm::spec::parse_spec(&text) {
        Ok(spec) => {
            if json_out {
                println!(
                    "{:#}",
                    json!({"name": spec.name, "hypervisor": spec.hypervisor.as_str(),
                           "vcpus": spec.vcpus, "memory_mib": spec.memory_mib, "macs": spec.macs(),
                           "hostname": spec.hostname()})
                );
            } else {
                println!(
                    "{}: {} on {}, {} vCPUs, {} MiB, MACs {}",
                    file.display(),
                    spec.name,
                    spec.hypervisor.as_str(),
                    spec.vcpus,
                    spec.memory_mib,
                    spec.macs().join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Lists the VMs with their reservations.
pub fn list(json_out: bool, data_dir: &Path) -> Result<ExitCode> {
    let store = Store::open(data_dir)
        .with_context(|| format!("opening the store in {}", data_dir.display()))?;
    let vms = store.vms()?;
    if json_out {
        println!("{:#}", json!(vms));
    } else {
        for vm in &vms {
            // The tenant as recorded in its spec; a spec that no longer
            // parses (written by another version) shows `?`.
            let tenant = provd_vm::spec::parse_spec(&vm.spec)
                .map(|s| s.tenant().to_string())
                .unwrap_or_else(|_| "?".into());
            println!(
                "{:<24} {:<12} {:>3} vCPUs {:>7} MiB {:>9.1} GiB  {}",
                vm.name,
                tenant,
                vm.reserved.vcpus,
                vm.reserved.memory_mib,
                vm.reserved.disk_bytes as f64 / (1u64 << 30) as f64,
                vm.macs.join(",")
            );
        }
        let total = store.reserved()?;
        println!(
            "reserved: {} vCPUs, {} MiB, {:.1} GiB",
            total.vcpus,
            total.memory_mib,
            total.disk_bytes as f64 / (1u64 << 30) as f64
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Deletes VMs: their files, reservations and the partitions no other VM uses.
pub fn remove(names: &[String], data_dir: &Path) -> Result<ExitCode> {
    let store = Store::open(data_dir)
        .with_context(|| format!("opening the store in {}", data_dir.display()))?;
    let mut code = ExitCode::SUCCESS;
    for name in names {
        if provd_vm::delete(&store, name)? {
            println!("deleted VM {name}");
        } else {
            eprintln!("no VM {name}");
            code = ExitCode::FAILURE;
        }
    }
    Ok(code)
}

/// `provctl boot run`: boots the VM a domain XML describes under plain
/// qemu, its console on standard output, for at most `timeout` seconds.
pub fn boot_run(domain: &Path, accel: &str, timeout: u64, dry_run: bool) -> Result<ExitCode> {
    use provd_vm::qemu::{Accel, parse_domain, qemu_args, qemu_binary};
    let accel = match accel {
        "auto" => Accel::detect(),
        "kvm" => Accel::Kvm,
        "tcg" => Accel::Tcg,
        other => anyhow::bail!("--accel {other:?}: use kvm, tcg or auto"),
    };
    let xml =
        std::fs::read_to_string(domain).with_context(|| format!("reading {}", domain.display()))?;
    let parsed = parse_domain(&xml).with_context(|| domain.display().to_string())?;
    let args = qemu_args(&parsed, accel);
    let qemu = qemu_binary()?;
    if dry_run {
        println!("{} {}", qemu.display(), args.join(" "));
        return Ok(ExitCode::SUCCESS);
    }
    if parsed.nics_left_out > 0 {
        eprintln!(
            "provctl: {}: {} network interface(s) left out; the guest boots without network",
            parsed.name, parsed.nics_left_out
        );
    }
    eprintln!("provctl: booting {} under qemu ({})", parsed.name, accel.as_str());
    let mut child = std::process::Command::new(&qemu)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", qemu.display()))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout);
    loop {
        if let Some(status) = child.try_wait().context("waiting for qemu")? {
            return Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
        if std::time::Instant::now() >= deadline {
            // The guest is a throwaway: stopping qemu is the power button.
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("provctl: {} still running after {timeout} s; stopped", parsed.name);
            return Ok(ExitCode::from(124));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Copies the VMM's serial console into a capped, rotated log until the VMM
/// closes it (`once`) or forever, waiting for it to listen again after each
/// close. Fails when no VMM listens within `wait` seconds of the start.
pub fn console_log(
    vm_dir: &Path,
    max_bytes: u64,
    keep: u32,
    wait: u64,
    once: bool,
) -> Result<ExitCode> {
    use provd_vm::console::{RotatingLog, SOCKET_NAME, connect, copy_connection};
    let socket = vm_dir.join(SOCKET_NAME);
    let log_path = vm_dir.join("serial.log");
    let mut log = RotatingLog::open(&log_path, max_bytes, keep)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let wait = std::time::Duration::from_secs(wait);
    let mut first = true;
    loop {
        // Bounded at the start; after a close the VMM may take as long as it
        // likes to listen again (`connect` polls, it does not spin).
        let patience = if first { wait } else { std::time::Duration::MAX };
        let stream = connect(&socket, patience)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        let Some(mut stream) = stream else {
            anyhow::bail!("no VMM listens on {} after {} s", socket.display(), wait.as_secs());
        };
        first = false;
        copy_connection(&mut stream, &mut log)
            .with_context(|| format!("copying {} into {}", socket.display(), log_path.display()))?;
        if once {
            return Ok(ExitCode::SUCCESS);
        }
    }
}
