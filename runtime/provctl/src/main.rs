//! `provctl`: the command line of provd's managers and plugin authors.
//!
//! Against nodes (`remote`): deploy signed bundles, provision, follow
//! operations, list VMs, images and bundles, roll a plugin back and read
//! the audit trail, over mutual TLS and on many nodes at once. On the local
//! machine: build a plugin crate into a component, check it against its
//! manifest and the node policy, run it through the same engine the node
//! uses, sign bundles, and manage the store of a data directory.

mod bundle;
mod dedup;
mod image;
mod partition;
mod place;
mod remote;
mod vm;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use provd_domain::{Manifest, NodePolicy};
use provd_engine::{
    CollectingObserver, EngineConfig, InvokeError, LogRecord, ProgressEvent, Request,
};
use provd_host::{Engine, Plugin};
use serde_json::json;

#[derive(Parser)]
#[command(name = "provctl", version, about = "Manage provd nodes and plugins")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build, check and run plugins locally.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Import, list, inspect and remove images in a node's data directory.
    Image {
        /// The node's data directory [env: PROVD_DATA_DIR; default: /var/lib/provd].
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
        #[command(subcommand)]
        command: image::ImageCommand,
    },
    /// Which files the VMs on a node share, and the layers to keep them in.
    Dedup {
        /// The node's data directory [env: PROVD_DATA_DIR; default: /var/lib/provd].
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
        #[command(subcommand)]
        command: DedupCommand,
    },
    /// Check VM specs; list and delete a node's VMs.
    Vm {
        /// The node's data directory [env: PROVD_DATA_DIR; default: /var/lib/provd].
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
        #[command(subcommand)]
        command: VmCommand,
    },
    /// Build, list, verify and remove the shared and private partitions of VMs.
    Partition {
        /// The node's data directory [env: PROVD_DATA_DIR; default: /var/lib/provd].
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
        #[command(subcommand)]
        command: PartitionCommand,
    },
    /// Build the initramfs that boots VMs from their partitions with a
    /// kernel the node provides.
    #[command(subcommand)]
    Boot(BootCommand),
    /// Generate an Ed25519 key pair for signing plugin bundles.
    Keygen(bundle::KeygenArgs),
    /// Build, sign, verify and audit signed plugin bundles.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    #[command(flatten)]
    Remote(remote::RemoteCommand),
}

#[derive(Subcommand)]
enum VmCommand {
    /// Check a VM spec (TOML or JSON): every problem, with its field.
    Check {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List the VMs and what they reserve.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Delete VMs: their files, reservations, and partitions no other VM uses.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Keep a Cloud Hypervisor VM's serial console in a log of bounded size:
    /// read the VMM's serial.sock in the VM's directory and write serial.log
    /// beside it, rotated at --max-bytes with --keep older files. Run it
    /// beside the VMM (for example as a service of its own); without it the
    /// console's output is not kept.
    ConsoleLog {
        /// The VM's directory, <data>/vms/<name>.
        vm_dir: PathBuf,
        /// Bytes in one log file before it is rotated.
        #[arg(long, default_value_t = provd_vm::console::DEFAULT_MAX_BYTES)]
        max_bytes: u64,
        /// Older files kept (serial.log.1 is the newest of them).
        #[arg(long, default_value_t = provd_vm::console::DEFAULT_KEEP)]
        keep: u32,
        /// Seconds to wait for the VMM's socket to appear.
        #[arg(long, default_value_t = 60)]
        wait: u64,
        /// Stop when the VMM closes the console instead of waiting for it to
        /// listen again.
        #[arg(long)]
        once: bool,
    },
}

#[derive(Subcommand)]
enum BootCommand {
    /// Build the initramfs for one kernel: static busybox, the modules of
    /// that kernel a guest needs (virtio, EROFS, overlayfs, virtio-fs) with
    /// their dependencies, /init and the overlay boot script.
    Initramfs {
        /// The kernel's modules: /lib/modules/<version> of the kernel package
        /// (Debian's linux-image-cloud-amd64, for example).
        #[arg(long, value_name = "DIR")]
        modules_dir: PathBuf,
        /// A statically linked busybox (Debian's busybox-static).
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        /// Where to write it, for example <data>/boot/provd-initrd.img.
        #[arg(short, long, value_name = "FILE")]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Boot a VM from the libvirt domain XML provd wrote for it, under plain
    /// qemu-system-x86_64 (no libvirtd): its disks with their serials, its
    /// kernel, initrd and command line, its console on standard output.
    /// Network interfaces are left out. For smoke tests of a VM's layout.
    Run {
        /// <data>/vms/<name>/domain.xml of a VM that boots a kernel.
        domain: PathBuf,
        /// kvm, tcg, or auto: KVM where /dev/kvm opens and the CPU has
        /// virtualisation extensions, TCG (software) otherwise.
        #[arg(long, default_value = "auto")]
        accel: String,
        /// Stop the guest after this many seconds (exit status 124).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Print the qemu command instead of running it.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum PartitionCommand {
    /// Plan layers for some VMs and build their shared and private partitions.
    Build(partition::BuildArgs),
    /// Prove, without mounting, that each VM's partitions equal its image.
    Verify(partition::VerifyArgs),
    /// List the partitions.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Release VMs' partitions, deleting those no VM uses any more.
    Rm(partition::RemoveArgs),
    /// Pack the layers the (stopped) VMs use into one new shared partition,
    /// move them onto it and free what nothing uses any more.
    Repack(partition::RepackArgs),
    /// List the layers on the node's shared partitions, the VMs stacking
    /// each, and the bytes held by layers fewer than two VMs stack.
    Layers {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DedupCommand {
    /// Analyse the images of some VMs and choose layers.
    Plan(dedup::PlanArgs),
    /// Find the file contents that directory trees share.
    Scan(dedup::ScanArgs),
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Build a plugin crate into a WebAssembly component.
    Build {
        /// The plugin crate (holding Cargo.toml and plugin.toml).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Load a plugin as a node would and show what it may do and imports.
    Check {
        #[command(flatten)]
        source: PluginSource,
        /// The node's provd.toml, whose [policy] the plugin is checked
        /// against; provd's default policy without it.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Run a plugin once, in this process, with a request from a file.
    Run {
        #[command(flatten)]
        source: PluginSource,
        /// Request file: `{"operation_id": "...", "input": <JSON>}`; `-` reads stdin.
        #[arg(long)]
        input: PathBuf,
        /// Directory for the compiled-artifact cache; without it, nothing is written.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// Where a plugin comes from: a crate directory (built on the fly), or a
/// component file with its manifest.
#[derive(Args)]
struct PluginSource {
    /// The plugin crate; built first, its plugin.toml used as the manifest.
    dir: Option<PathBuf>,
    /// A component file, instead of a crate.
    #[arg(long, requires = "manifest", conflicts_with = "dir")]
    component: Option<PathBuf>,
    /// The plugin.toml for --component.
    #[arg(long)]
    manifest: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PROVD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<std::process::ExitCode> {
    // Commands that write a node's data directory keep what they create
    // the node's own, as provd does.
    if matches!(
        cli.command,
        Command::Image { .. }
            | Command::Dedup { .. }
            | Command::Vm { .. }
            | Command::Partition { .. }
            | Command::Plugin(PluginCommand::Run { .. })
    ) {
        provd_store::own_files_only();
    }
    match cli.command {
        Command::Plugin(PluginCommand::Build { dir, json }) => build(&dir, json),
        Command::Plugin(PluginCommand::Check { source, config, json }) => {
            check(&source, config.as_deref(), json).await
        }
        Command::Plugin(PluginCommand::Run { source, input, data_dir, json }) => {
            run_plugin(&source, &input, data_dir, json).await
        }
        Command::Image { data_dir, command } => {
            image::run(command, &image::data_dir(data_dir)).await
        }
        Command::Dedup { data_dir, command: DedupCommand::Plan(args) } => {
            dedup::plan(args, &image::data_dir(data_dir))
        }
        Command::Dedup { command: DedupCommand::Scan(args), .. } => dedup::scan(args),
        Command::Vm { data_dir, command } => {
            let dir = image::data_dir(data_dir);
            match command {
                VmCommand::Check { file, json } => vm::check(&file, json),
                VmCommand::Ls { json } => vm::list(json, &dir),
                VmCommand::Rm { names } => vm::remove(&names, &dir),
                VmCommand::ConsoleLog { vm_dir, max_bytes, keep, wait, once } => {
                    vm::console_log(&vm_dir, max_bytes, keep, wait, once)
                }
            }
        }
        Command::Boot(BootCommand::Initramfs { modules_dir, busybox, out, json }) => {
            let built = provd_vm::boot::build_initramfs(
                &modules_dir,
                &busybox,
                provd_partitions::OVERLAY_ROOT_SCRIPT,
                &out,
            )?;
            if json {
                println!("{:#}", serde_json::json!(built));
            } else {
                println!(
                    "{}: {} bytes, modules {}",
                    built.path.display(),
                    built.bytes,
                    built.modules.join(" ")
                );
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Boot(BootCommand::Run { domain, accel, timeout, dry_run }) => {
            vm::boot_run(&domain, &accel, timeout, dry_run)
        }
        Command::Keygen(args) => bundle::keygen(args),
        Command::Bundle(command) => bundle::run(command),
        Command::Remote(command) => remote::run(command).await,
        Command::Partition { data_dir, command } => {
            let dir = image::data_dir(data_dir);
            match command {
                PartitionCommand::Build(args) => partition::build(args, &dir),
                PartitionCommand::Verify(args) => partition::verify(args, &dir),
                PartitionCommand::Ls { json } => partition::list(json, &dir),
                PartitionCommand::Rm(args) => partition::remove(args, &dir),
                PartitionCommand::Layers { json } => partition::layers(json, &dir),
                PartitionCommand::Repack(args) => partition::repack(args, &dir),
            }
        }
    }
}

fn build(dir: &Path, json: bool) -> Result<std::process::ExitCode> {
    let component = provd_testkit::build_crate(dir)
        .with_context(|| format!("building the plugin crate {}", dir.display()))?;
    let bytes =
        std::fs::read(&component).with_context(|| format!("reading {}", component.display()))?;
    let digest = blake3::hash(&bytes).to_hex().to_string();
    if json {
        let out = json!({ "component": component, "bytes": bytes.len(), "blake3": digest });
        println!("{out:#}");
    } else {
        println!("{} ({} bytes, blake3 {digest})", component.display(), bytes.len());
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Builds (for a crate) and loads the plugin.
async fn load(source: &PluginSource, engine: &Engine) -> Result<Plugin> {
    let (manifest_path, component) = match (&source.dir, &source.component, &source.manifest) {
        (_, Some(component), Some(manifest)) => (manifest.clone(), component.clone()),
        (dir, None, manifest) => {
            let dir = dir.clone().unwrap_or_else(|| PathBuf::from("."));
            let component = provd_testkit::build_crate(&dir)
                .with_context(|| format!("building the plugin crate {}", dir.display()))?;
            (manifest.clone().unwrap_or_else(|| dir.join("plugin.toml")), component)
        }
        (_, Some(_), None) => bail!("--component needs --manifest"),
    };
    let text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let manifest =
        Manifest::from_toml(&text).with_context(|| format!("{}", manifest_path.display()))?;
    let wasm =
        std::fs::read(&component).with_context(|| format!("reading {}", component.display()))?;
    let plugin = engine
        .load(&manifest, wasm)
        .await
        .with_context(|| format!("loading {}", component.display()))?;
    Ok(plugin)
}

fn describe(plugin: &Plugin) -> serde_json::Value {
    let grant = plugin.grant();
    let c = &grant.capabilities;
    let l = &grant.limits;
    json!({
        "name": plugin.name(),
        "version": plugin.version().to_string(),
        "blake3": plugin.digest_hex(),
        "capabilities": {
            "log": c.log.map(|g| json!({ "max-bytes": g.max_bytes })),
            "progress": c.progress.then(|| json!({})),
            "hashing": c.hashing.map(|g| json!({ "max-input-bytes": g.max_input_bytes })),
            "images": c.images.as_ref().map(|g| json!({
                "sources": g.sources, "max-read-bytes": g.max_read_bytes })),
            "dedup": c.dedup.then(|| json!({})),
            "partitions": c.partitions.map(|g| json!({ "max-bytes": g.max_bytes })),
            "vm": c.vm.as_ref().map(|g| json!({
                "max-vcpus": g.max_vcpus, "max-memory-mib": g.max_memory_mib,
                "hypervisors": g.hypervisors, "may-set": g.may_set })),
        },
        "limits": {
            "memory-bytes": l.memory_bytes,
            "timeout-ms": l.timeout.as_millis() as u64,
            "instances": l.instances,
            "tables": l.tables,
            "table-elements": l.table_elements,
            "memories": l.memories,
        },
        "imports": plugin.imports(),
    })
}

async fn check(
    source: &PluginSource,
    config: Option<&Path>,
    json: bool,
) -> Result<std::process::ExitCode> {
    let (policy, against) = match config {
        Some(path) => {
            let config = provd_daemon::Config::load(path)?;
            (config.node_policy(), format!("the policy of {}", path.display()))
        }
        None => (NodePolicy::default(), "provd's default policy".to_string()),
    };
    // Node services over a scratch store, so that a plugin declaring
    // images, dedup, partitions or vm loads as a node would load it;
    // nothing runs, so nothing is ever written there.
    let scratch = tempfile::tempdir().context("a scratch directory")?;
    let store = Arc::new(provd_store::Store::open(&scratch.path().join("data"))?);
    let images = provd_images::Images::new(store, provd_images::ImportLimits::default(), 1)
        .with_local_sources(provd_images::LocalSources::from_patterns(&policy.image_sources));
    let engine = provd_host::engine(
        EngineConfig { policy, ..EngineConfig::default() },
        Some(Arc::new(images)),
    )?;
    let plugin = load(source, &engine).await?;
    let mut d = describe(&plugin);
    if let Some(m) = d.as_object_mut() {
        m.insert("checked-against".into(), json!(against));
    }
    if json {
        println!("{d:#}");
    } else {
        println!("plugin {} {} (blake3 {})", plugin.name(), plugin.version(), plugin.digest_hex());
        println!("checked against {against}");
        println!("capabilities: {}", d.get("capabilities").unwrap_or(&json!(null)));
        println!("limits: {}", d.get("limits").unwrap_or(&json!(null)));
        println!("imports:");
        for i in plugin.imports() {
            println!("  {i}");
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// A request file: the operation id and the plugin's input as any JSON.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestFile {
    #[serde(default = "default_operation_id")]
    operation_id: String,
    input: serde_json::Value,
}

fn default_operation_id() -> String {
    "local".into()
}

fn read_request(path: &Path) -> Result<Request> {
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin().read_to_string(&mut text).context("reading the request from stdin")?;
    } else {
        text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the request {}", path.display()))?;
    }
    let file: RequestFile =
        serde_json::from_str(&text).with_context(|| format!("request {}", path.display()))?;
    // A string input is passed as it is; anything else as its JSON text.
    let input = match file.input {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    };
    Ok(Request { operation_id: file.operation_id, input })
}

async fn run_plugin(
    source: &PluginSource,
    input: &Path,
    data_dir: Option<PathBuf>,
    json: bool,
) -> Result<std::process::ExitCode> {
    let request = read_request(input)?;
    let cache_dir = data_dir.map(|d| d.join("cache"));
    let engine = provd_host::engine(
        EngineConfig { policy: NodePolicy::default(), cache_dir, ..Default::default() },
        None,
    )?;
    let plugin = load(source, &engine).await?;
    let observer = Arc::new(CollectingObserver::default());
    let result = provd_node::call::run(
        &engine,
        &plugin,
        request,
        observer.clone(),
        provd_node::call::CallOptions::default(),
    )
    .await;
    let logs = observer.logs();
    let progress = observer.progress_events();
    if json {
        let out = match &result {
            Ok(o) => json!({
                "plugin": describe(&plugin),
                "report": {
                    "summary": o.report.summary,
                    "fields": o.report.fields.iter().map(|f| (f.key.clone(), json!(f.value))).collect::<serde_json::Map<_, _>>(),
                    "output": serde_json::from_str::<serde_json::Value>(&o.report.output).unwrap_or(serde_json::Value::String(o.report.output.clone())),
                },
                "elapsed_us": o.elapsed.as_micros() as u64,
                "dropped_log_records": o.log.dropped_records,
                "logs": logs.iter().map(log_json).collect::<Vec<_>>(),
                "progress": progress.iter().map(progress_json).collect::<Vec<_>>(),
            }),
            Err(e) => json!({
                "plugin": describe(&plugin),
                "error": { "kind": error_kind(e), "message": e.to_string() },
                "logs": logs.iter().map(log_json).collect::<Vec<_>>(),
                "progress": progress.iter().map(progress_json).collect::<Vec<_>>(),
            }),
        };
        println!("{out:#}");
    } else {
        println!("plugin {} {} (blake3 {})", plugin.name(), plugin.version(), plugin.digest_hex());
        for r in &logs {
            let fields: Vec<String> = r.fields.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            println!("  [{}] {} {}", r.level.as_str(), r.message, fields.join(" "));
        }
        for p in &progress {
            match p.total {
                Some(t) => println!("  [progress] {} {}/{}", p.phase, p.done, t),
                None => println!("  [progress] {} {}", p.phase, p.done),
            }
        }
        if let Ok(o) = &result {
            println!("report: {}", o.report.summary);
            for f in &o.report.fields {
                println!("  {} = {}", f.key, f.value);
            }
            println!("output: {}", o.report.output);
            println!("elapsed: {:?}", o.elapsed);
        }
    }
    match result {
        Ok(_) => Ok(std::process::ExitCode::SUCCESS),
        // With --json the error is already in the printed document.
        Err(_) if json => Ok(std::process::ExitCode::FAILURE),
        Err(e) => Err(e.into()),
    }
}

fn error_kind(e: &InvokeError) -> &'static str {
    match e {
        InvokeError::Plugin(_) => "plugin",
        InvokeError::Limit(_) => "limit",
        InvokeError::Trap(_) => "trap",
        InvokeError::Host(_) => "host",
        InvokeError::Cancelled => "cancelled",
    }
}

fn log_json(r: &LogRecord) -> serde_json::Value {
    json!({
        "level": r.level.as_str(),
        "source": format!("{:?}", r.source).to_lowercase(),
        "message": r.message,
        "fields": r.fields.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
    })
}

fn progress_json(p: &ProgressEvent) -> serde_json::Value {
    json!({ "phase": p.phase, "done": p.done, "total": p.total })
}
