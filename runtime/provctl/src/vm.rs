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
            println!(
                "{:<24} {:>3} vCPUs {:>7} MiB {:>9.1} GiB  {}",
                vm.name,
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
        if provd_vm::node::delete(&store, name)? {
            println!("deleted VM {name}");
        } else {
            eprintln!("no VM {name}");
            code = ExitCode::FAILURE;
        }
    }
    Ok(code)
}
