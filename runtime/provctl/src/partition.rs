//! `provctl partition`: build, list, verify and remove the partitions of
//! VMs whose images are in a data directory.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use provd_dedup::Policy;
use provd_partitions::{BuildOptions, PrivateFormat, SharedFormat, VmImage};
use provd_store::Store;
use serde_json::json;

#[derive(Args)]
pub struct BuildArgs {
    /// A VM and its image: `NAME=REFERENCE` (the image must be imported).
    #[arg(long = "vm", required = true, value_name = "NAME=REFERENCE")]
    vms: Vec<String>,
    /// Layers with fewer file bytes are folded into the VMs' private sets.
    #[arg(long, default_value_t = 1 << 20)]
    min_layer_bytes: u64,
    /// Most layers under one VM.
    #[arg(long, default_value_t = 8)]
    max_layers: usize,
    /// Also share content found under other paths (one more layer per VM).
    #[arg(long)]
    share_across_paths: bool,
    /// Plan against the layers the node's shared partitions already hold:
    /// each VM stacks those giving it at least --min-layer-bytes of its files.
    #[arg(long)]
    node_layers: bool,
    /// Put each VM's files no other VM of the plan holds into a layer of
    /// their own, for later VMs of the same image to stack.
    #[arg(long)]
    layer_unique_files: bool,
    /// erofs, erofs-lz4, erofs-lz4hc, ext4 or dir.
    #[arg(long, default_value = "erofs")]
    shared_format: String,
    /// ext4 or qcow2.
    #[arg(long, default_value = "ext4")]
    private_format: String,
    /// Size of each private partition as the guest sees it, in bytes
    /// (default: its content plus a quarter, at least 256 MiB free).
    #[arg(long)]
    private_size: Option<u64>,
    /// Verify every VM after building.
    #[arg(long)]
    verify: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// VMs to verify (default: every VM with a private partition).
    #[arg(long = "vm", value_name = "NAME")]
    vms: Vec<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RemoveArgs {
    /// The VM whose partitions to release; partitions no other VM uses are deleted.
    #[arg(long = "vm", required = true, value_name = "NAME")]
    vms: Vec<String>,
}

fn open(data_dir: &Path) -> Result<Store> {
    Store::open(data_dir).with_context(|| format!("opening the store in {}", data_dir.display()))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

pub fn build(args: BuildArgs, data_dir: &Path) -> Result<ExitCode> {
    let shared_format = SharedFormat::parse(&args.shared_format)?;
    let private_format = PrivateFormat::parse(&args.private_format)?;
    let store = open(data_dir)?;
    let mut vms = Vec::new();
    let mut entries = Vec::new();
    for spec in &args.vms {
        let Some((name, reference)) = spec.split_once('=') else {
            bail!("--vm {spec:?}: write NAME=REFERENCE");
        };
        if !store.partitions_of_vm(name)?.is_empty() {
            bail!(
                "VM {name:?} already has partitions; release them with `provctl partition rm --vm {name}`"
            );
        }
        let image = crate::image::find(&store, reference)?;
        entries.push((name.to_string(), store.entries(&image, 0, u64::MAX)?));
        vms.push(VmImage { vm: name.to_string(), image });
    }
    let started = std::time::Instant::now();
    let policy = Policy {
        min_layer_bytes: args.min_layer_bytes,
        max_layers_per_vm: args.max_layers,
        share_across_paths: args.share_across_paths,
        layer_unique_files: args.layer_unique_files,
        max_shared_partitions: provd_partitions::MAX_SHARED_PER_VM,
    };
    let node = if args.node_layers {
        provd_partitions::node_layers(&store, crate::dedup::NODE_LAYER_ENTRIES, &|d| {
            provd_domain::trust::may_see(provd_domain::trust::DEFAULT_TENANT, d)
        })?
    } else {
        Vec::new()
    };
    let plan = provd_dedup::plan_on_node(&entries, &node, &policy)?;
    drop(entries);
    let planned = started.elapsed();
    let mut layout = provd_partitions::build_all(
        &store,
        &plan,
        &vms,
        shared_format,
        private_format,
        args.private_size,
        &BuildOptions::default(),
    )?;
    let built = started.elapsed();
    // The shared partition's users are the stacks built after it.
    if let Some(s) = layout.shared.take() {
        layout.shared = Some(store.partition(&s.id)?.unwrap_or(s));
    }
    let mut verifications = Vec::new();
    if args.verify {
        for v in &vms {
            verifications.push(provd_partitions::verify_vm(
                &store,
                &v.vm,
                &BuildOptions::default(),
            )?);
        }
    }
    let exact = verifications.iter().all(|v| v.is_exact());
    let naive = plan.naive_bytes;
    let on_disk: u64 = layout.shared.iter().chain(&layout.private).map(|p| p.bytes).sum();
    if args.json {
        println!(
            "{:#}",
            json!({
                "shared": layout.shared,
                "private": layout.private,
                "naive_file_bytes": naive,
                "bytes_on_disk": on_disk,
                "plan_seconds": planned.as_secs_f64(),
                "build_seconds": built.as_secs_f64(),
                "verifications": verifications,
            })
        );
    } else {
        if let Some(s) = &layout.shared {
            println!(
                "shared {} ({}): {} layers, {:.1} MiB on disk, VMs {}",
                s.id,
                s.format,
                plan.layers.len(),
                mib(s.bytes),
                s.vms.join(", ")
            );
        } else {
            println!("no layer kept: no shared partition");
        }
        for p in &layout.private {
            println!(
                "private {} ({}) for {}: {:.1} MiB on disk, {:.1} MiB for the guest",
                p.id,
                p.format,
                p.vms.join(", "),
                mib(p.bytes),
                mib(p.apparent_bytes)
            );
        }
        println!(
            "{:.1} MiB on disk for {:.1} MiB of files as copies; planned in {:.2} s, built in {:.2} s",
            mib(on_disk),
            mib(naive),
            planned.as_secs_f64(),
            built.as_secs_f64()
        );
        println!("partitions are in {}", data_dir.join("partitions").display());
        print_verifications(&verifications);
    }
    Ok(if exact { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn print_verifications(verifications: &[provd_partitions::Verification]) {
    for v in verifications {
        if v.is_exact() {
            println!(
                "verified {}: {} entries of {} exact ({} files, {:.1} MiB hashed)",
                v.vm,
                v.entries,
                v.image,
                v.files_hashed,
                mib(v.bytes_hashed)
            );
        } else {
            println!("VM {} differs from {} in {} places:", v.vm, v.image, v.mismatch_count);
            for m in &v.mismatches {
                println!("  {m}");
            }
        }
    }
}

pub fn verify(args: VerifyArgs, data_dir: &Path) -> Result<ExitCode> {
    let store = open(data_dir)?;
    let vms = if args.vms.is_empty() {
        let mut all: Vec<String> = store
            .partitions()?
            .into_iter()
            .filter(|p| p.role == provd_store::PartitionRole::Private)
            .flat_map(|p| p.vms)
            .collect();
        all.sort();
        all.dedup();
        all
    } else {
        args.vms
    };
    let mut out = Vec::new();
    for vm in &vms {
        out.push(provd_partitions::verify_vm(&store, vm, &BuildOptions::default())?);
    }
    if args.json {
        println!("{:#}", json!(out));
    } else {
        print_verifications(&out);
    }
    Ok(if out.iter().all(|v| v.is_exact()) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

pub fn list(json_out: bool, data_dir: &Path) -> Result<ExitCode> {
    let store = open(data_dir)?;
    let all = store.partitions()?;
    if json_out {
        println!("{:#}", json!(all));
    } else {
        for p in &all {
            println!(
                "{}  {:<7} {:<11} {:>9.1} MiB  {:<16} {}",
                p.id,
                p.role,
                p.format,
                mib(p.bytes),
                p.domain,
                p.vms.join(",")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct RepackArgs {
    /// A stopped VM to move (repeat).
    #[arg(long = "vm", value_name = "NAME", required_unless_present = "all")]
    vms: Vec<String>,
    /// Every VM with a private partition, all of them stopped.
    #[arg(long, conflicts_with = "vms")]
    all: bool,
    /// erofs, erofs-lz4, erofs-lz4hc, ext4 or dir.
    #[arg(long, default_value = "erofs")]
    shared_format: String,
    #[arg(long)]
    json: bool,
}

pub fn repack(args: RepackArgs, data_dir: &Path) -> Result<ExitCode> {
    let store = open(data_dir)?;
    let format = SharedFormat::parse(&args.shared_format)?;
    let only = (!args.all).then_some(args.vms.as_slice());
    let started = std::time::Instant::now();
    let done = provd_node::repack::repack(&store, only, format, &BuildOptions::default())?;
    let secs = started.elapsed().as_secs_f64();
    if args.json {
        println!("{:#}", json!({"repack": done, "seconds": secs}));
    } else {
        println!(
            "moved {} VM(s) onto {} in {secs:.2} s, freed {} shared partition(s); shared partitions {:.1} MiB -> {:.1} MiB",
            done.moved.len(),
            done.partition.as_ref().map(|p| p.id.as_str()).unwrap_or("no new partition"),
            done.freed.len(),
            mib(done.shared_bytes_before),
            mib(done.shared_bytes_after)
        );
        for (vm, why) in &done.skipped {
            println!("skipped {vm}: {why}");
        }
        for (vm, why) in &done.failed {
            println!("failed {vm}: {why}");
        }
    }
    Ok(if done.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

pub fn layers(json_out: bool, data_dir: &Path) -> Result<ExitCode> {
    let store = open(data_dir)?;
    let layers = store.layers(false)?;
    let usage = store.layer_usage()?;
    if json_out {
        println!(
            "{:#}",
            json!({"layers": layers, "usage": usage, "fragmented_bytes": usage.fragmented_bytes()})
        );
        return Ok(ExitCode::SUCCESS);
    }
    for l in &layers {
        println!(
            "{}/{:<10} {:>7} files {:>9.1} MiB  {:<16} {}{}",
            l.partition,
            l.name,
            l.files,
            mib(l.bytes),
            l.domain,
            if l.vms.is_empty() { "(no VM)".to_string() } else { l.vms.join(",") },
            if l.recorded { "" } else { "  (entries not on record: not offered to new VMs)" }
        );
    }
    println!(
        "{} layers, {:.1} MiB: {:.1} MiB stacked by two or more VMs, {:.1} MiB by one, {:.1} MiB by none; \
         fragmented (fewer than two VMs): {:.1} MiB",
        usage.layers,
        mib(usage.bytes),
        mib(usage.shared_bytes),
        mib(usage.single_bytes),
        mib(usage.unused_bytes),
        mib(usage.fragmented_bytes())
    );
    Ok(ExitCode::SUCCESS)
}

pub fn remove(args: RemoveArgs, data_dir: &Path) -> Result<ExitCode> {
    let store = open(data_dir)?;
    for vm in &args.vms {
        let removed = store.release_vm(vm)?;
        for p in removed {
            println!("removed {} partition {}", p.role, p.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}
