//! `provctl dedup plan`: the sharing analysis and layer plan for VMs whose
//! images are in a data directory.

use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::Args;
use provd_dedup::{Policy, analyze};
use provd_store::Store;
use serde_json::json;

#[derive(Args)]
pub struct PlanArgs {
    /// A VM and its image: `NAME=REFERENCE` (the image must be imported).
    #[arg(long = "vm", required = true, value_name = "NAME=REFERENCE")]
    vms: Vec<String>,
    /// Layers with fewer file bytes are not kept.
    #[arg(long, default_value_t = 0)]
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
    /// With --json: include every layer's and VM's entries (the whole plan).
    #[arg(long)]
    entries: bool,
    #[arg(long)]
    json: bool,
}

pub fn plan(args: PlanArgs, data_dir: &Path) -> Result<std::process::ExitCode> {
    let store = Store::open(data_dir)
        .with_context(|| format!("opening the store in {}", data_dir.display()))?;
    let mut vms = Vec::new();
    for spec in &args.vms {
        let Some((name, reference)) = spec.split_once('=') else {
            bail!("--vm {spec:?}: write NAME=REFERENCE");
        };
        let image = crate::image::find(&store, reference)?;
        let entries = store.entries(&image, 0, u64::MAX)?;
        vms.push((name.to_string(), entries));
    }
    let analysis = analyze(&vms)?;
    let policy = Policy {
        min_layer_bytes: args.min_layer_bytes,
        max_layers_per_vm: args.max_layers,
        share_across_paths: args.share_across_paths,
        layer_unique_files: args.layer_unique_files,
        max_shared_partitions: provd_partitions::MAX_SHARED_PER_VM,
    };
    let node = if args.node_layers {
        provd_partitions::node_layers(&store, NODE_LAYER_ENTRIES, &|d| {
            // Built locally, for the default tenant.
            provd_domain::trust::may_see(provd_domain::trust::DEFAULT_TENANT, d)
        })?
    } else {
        Vec::new()
    };
    let plan = provd_dedup::plan_on_node(&vms, &node, &policy)?;
    if args.json {
        let mut plan_json = json!(plan);
        if !args.entries {
            if let Some(obj) = plan_json.as_object_mut() {
                obj.remove("private");
            }
            if let Some(layers) = plan_json.get_mut("layers").and_then(|l| l.as_array_mut()) {
                for layer in layers.iter_mut().filter_map(|l| l.as_object_mut()) {
                    layer.remove("entries");
                }
            }
        }
        println!("{:#}", json!({ "analysis": analysis, "plan": plan_json }));
    } else {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "{} VMs: {:.1} MiB of files as copies, {:.1} MiB of distinct content",
            vms.len(),
            mib(analysis.naive_bytes),
            mib(analysis.distinct_content_bytes)
        );
        println!(
            "shared by two or more VMs: {:.1} MiB once, {:.1} MiB as copies",
            mib(analysis.shared_once_bytes),
            mib(analysis.shared_as_copies_bytes)
        );
        for f in &analysis.per_vm {
            println!("  {}: {:.1} MiB, {:.1} MiB shared", f.vm, mib(f.bytes), mib(f.shared_bytes));
        }
        println!(
            "plan (min layer {} bytes, at most {} layers per VM):",
            policy.min_layer_bytes, policy.max_layers_per_vm
        );
        for l in &plan.layers {
            println!(
                "  {}: {} files, {:.1} MiB, VMs {}",
                l.id,
                l.files,
                mib(l.bytes),
                l.vms.join(",")
            );
        }
        for (vm, bytes) in &plan.private_bytes {
            println!(
                "  {vm}: private {:.1} MiB, layers {}",
                mib(*bytes),
                plan.stacks.get(vm).map(|s| s.join(",")).unwrap_or_default()
            );
        }
        println!(
            "stored {:.1} MiB instead of {:.1} MiB",
            mib(plan.stored_bytes),
            mib(plan.naive_bytes)
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct ScanArgs {
    /// Directory trees to compare.
    #[arg(required = true)]
    dirs: Vec<std::path::PathBuf>,
    /// List every shared content with its paths.
    #[arg(long)]
    groups: bool,
    /// Walking and hashing threads (reads in flight).
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Keep digests in this file between scans; unchanged files are then
    /// not read again.
    #[arg(long)]
    cache: Option<std::path::PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn scan(args: ScanArgs) -> Result<std::process::ExitCode> {
    let options = provd_scan::ScanOptions { threads: args.threads, groups: args.groups };
    let started = std::time::Instant::now();
    let cache = match &args.cache {
        Some(path) => provd_scan::HashCache::load(path)?,
        None => provd_scan::HashCache::default(),
    };
    let report = provd_scan::scan_with_cache(&args.dirs, &options, &cache)?;
    if let Some(path) = &args.cache {
        cache.save(path)?;
    }
    let elapsed = started.elapsed();
    if args.json {
        let mut v = json!(report);
        if let Some(obj) = v.as_object_mut() {
            obj.insert("seconds".into(), json!(elapsed.as_secs_f64()));
        }
        println!("{v:#}");
    } else {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "{} shared contents: {:.1} MiB stored once, {:.1} MiB as copies ({:.2}s, {} files hashed, {} from the cache)",
            report.shared_contents,
            mib(report.shared_bytes_once),
            mib(report.shared_bytes_as_copies),
            elapsed.as_secs_f64(),
            report.files_hashed,
            report.files_cached
        );
        for t in &report.trees {
            println!(
                "  {}: {} files, {:.1} MiB, {:.1} MiB unique",
                t.root.display(),
                t.files,
                mib(t.bytes),
                mib(t.unique_bytes)
            );
        }
        for g in &report.groups {
            println!("{} {} bytes", g.blake3, g.size);
            for (tree, paths) in &g.paths {
                for p in paths {
                    println!("  [{tree}] {}", p.display());
                }
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Entries of the node's layers one plan reads at most.
pub(crate) const NODE_LAYER_ENTRIES: u64 = 8_000_000;
