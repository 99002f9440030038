//! The manager's commands: talk to one or many provd nodes over mutual TLS.
//!
//! Every command takes `--node URL` (repeatable) or `--inventory FILE`, runs
//! against all nodes at once, and prints one result per node (`--json`: one
//! document with a `nodes` array). Exit codes scripts can rely on:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | every node did what was asked |
//! | 1 | an operation ended failed or cancelled |
//! | 3 | a node could not be reached (connection, TLS, timeout) |
//! | 4 | a node refused the request (its error code is printed) |
//! | 5 | a local problem: a file, the inventory, a spec, `--params` |
//!
//! Arguments clap cannot parse exit 2.
//!
//! With several nodes the highest code wins.
//!
//! One file per command group: `operations` (provision, place, status,
//! cancel), `vms` (list, delete, repack), `plugins` (deploy, bundles,
//! rollback), `records` (images, audit, health). Answers are
//! `provd_wire`'s types; `--json` prints them as the node sent them.

mod operations;
mod plugins;
mod records;
mod vms;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use provd_client::{Answer, Client, ClientError, TlsFiles};
use serde::{Deserialize, Serialize};
use serde_json::json;

pub const EXIT_OPERATION_FAILED: u8 = 1;
pub const EXIT_UNREACHABLE: u8 = 3;
pub const EXIT_REFUSED: u8 = 4;
pub const EXIT_LOCAL: u8 = 5;

/// Where the nodes are and how to prove who we are.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// A node's API, `https://host:port`; repeat for several.
    #[arg(long = "node", value_name = "URL")]
    nodes: Vec<String>,
    /// A TOML file listing nodes and the TLS files (see docs/api.md).
    #[arg(long)]
    inventory: Option<PathBuf>,
    /// CA certificate that signed the nodes' certificates.
    #[arg(long, env = "PROVCTL_CA")]
    ca: Option<PathBuf>,
    /// The manager's certificate.
    #[arg(long, env = "PROVCTL_CERT")]
    cert: Option<PathBuf>,
    /// The manager's private key.
    #[arg(long, env = "PROVCTL_KEY")]
    key: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Inventory {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    nodes: Vec<InventoryNode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InventoryNode {
    url: String,
}

#[derive(Subcommand, Debug)]
pub enum RemoteCommand {
    /// Uploads a signed bundle to every node.
    Deploy {
        bundle: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Starts an operation on every node and follows it to the end; with
    /// --place, each VM on the node `place` chooses, one operation per node.
    Provision(ProvisionArgs),
    /// Chooses a node for each VM: where it fits and its image adds the
    /// fewest bytes to what the node's layers hold (ties: the most free
    /// vCPUs). Asks every node at once; a node that does not answer in
    /// time is reported and skipped.
    Place {
        /// VM spec files (TOML or JSON), placed in this order.
        #[arg(value_name = "SPEC", required = true)]
        specs: Vec<PathBuf>,
        #[command(flatten)]
        how: PlaceOptions,
        /// Print every node's score for every VM.
        #[arg(long)]
        explain: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Shows one operation (following it with --follow), or the latest ones.
    Status {
        operation: Option<String>,
        /// Wait until the operation finishes, with a progress bar on a terminal.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Asks a running operation to stop at its next step.
    Cancel {
        operation: String,
        #[command(flatten)]
        target: Target,
    },
    /// Lists the VMs of every node, or deletes one with --delete.
    Vms {
        #[arg(long, value_name = "NAME")]
        delete: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Starts a VM's domain in the node's libvirt.
    Start {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Stops a VM's domain in the node's libvirt: asks the guest to shut
    /// down (ACPI) and waits for it, or with --force ends it at once.
    Stop {
        name: String,
        /// End the guest at once, as pulling its power cord.
        #[arg(long, conflicts_with = "timeout")]
        force: bool,
        /// Seconds the guest has to shut down (1 to 600; 60 unless given).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// Packs the layers the node's stopped VMs use into one new shared
    /// partition (each layer cut to what they see), moves those VMs onto it
    /// and frees the shared partitions nothing uses any more.
    Repack {
        /// A stopped VM to move (repeat). provd rewrites the boot files of
        /// each VM's root disk: stop the VMs first.
        #[arg(long = "vm", value_name = "NAME", required_unless_present = "all")]
        vms: Vec<String>,
        /// Every VM of the node, all of them stopped.
        #[arg(long, conflicts_with = "vms")]
        all: bool,
        /// erofs, erofs-lz4, erofs-lz4hc, ext4 or dir.
        #[arg(long, default_value = "erofs")]
        shared_format: String,
        #[command(flatten)]
        target: Target,
    },
    /// Lists the images of every node (and whether a VM or a running
    /// operation uses each), or deletes one with --delete.
    Images {
        /// An image reference, as the list shows it; refused while in use.
        #[arg(long, value_name = "REFERENCE")]
        delete: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Collects the images nothing uses on every node, by age or byte
    /// budget (the node's [images] settings where not given), then the
    /// object files nothing references.
    Gc {
        /// Remove unused images not fetched for this many seconds.
        #[arg(long)]
        max_age_secs: Option<u64>,
        /// Remove unused images, least recently used first, until the
        /// node's object files take at most this many bytes.
        #[arg(long)]
        max_bytes: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// Lists the bundles of every node and which version is active.
    Bundles {
        #[command(flatten)]
        target: Target,
    },
    /// Makes the previous accepted version of a plugin the active one.
    Rollback {
        plugin: String,
        /// A specific accepted version instead of the previous one.
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Reads the audit trail.
    Audit {
        #[arg(long)]
        operation: Option<String>,
        #[arg(long)]
        plugin: Option<String>,
        /// host-call, bundle, operation or plugin.
        #[arg(long)]
        kind: Option<String>,
        /// e.g. denied, refused.
        #[arg(long)]
        outcome: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        target: Target,
    },
    /// Checks that every node answers.
    Health {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Args, Debug)]
pub struct ProvisionArgs {
    /// The plugin to run.
    #[arg(long)]
    plugin: String,
    /// A specific accepted version; the active one by default.
    #[arg(long)]
    version: Option<String>,
    /// A VM spec file (TOML or JSON); repeat for several.
    #[arg(long = "vm", value_name = "FILE")]
    vms: Vec<PathBuf>,
    /// More VM spec files, as plain arguments.
    #[arg(value_name = "SPEC")]
    spec_files: Vec<PathBuf>,
    /// Plugin parameters: a JSON object, or @FILE.
    #[arg(long)]
    params: Option<String>,
    /// Makes retries safe: the same key returns the same operation.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Return once the operation is started instead of following it.
    #[arg(long)]
    no_wait: bool,
    /// Start the VMs in the node's libvirt once they are configured.
    #[arg(long)]
    start: bool,
    /// Send each VM to the node `provctl place` chooses for it
    /// (one operation per node) instead of every VM to every node.
    #[arg(long)]
    place: bool,
    #[command(flatten)]
    how: PlaceOptions,
    #[command(flatten)]
    target: Target,
}

/// How `place` chooses.
#[derive(Args, Debug, Clone)]
pub struct PlaceOptions {
    /// sharing (fewest new bytes), round-robin or most-free (memory).
    #[arg(long, default_value = "sharing")]
    policy: String,
    /// Seconds each node has to answer.
    #[arg(long, default_value_t = 30)]
    node_timeout: u64,
}

impl PlaceOptions {
    fn options(&self) -> Result<crate::place::Options> {
        let Some(policy) = provd_placement::Policy::parse(&self.policy) else {
            bail!("--policy {:?}: write sharing, round-robin or most-free", self.policy);
        };
        Ok(crate::place::Options {
            policy,
            timeout: std::time::Duration::from_secs(self.node_timeout.max(1)),
        })
    }
}

fn load_target(t: &Target) -> Result<(Vec<String>, TlsFiles)> {
    let mut nodes = t.nodes.clone();
    let (mut ca, mut cert, mut key) = (t.ca.clone(), t.cert.clone(), t.key.clone());
    if let Some(path) = &t.inventory {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the inventory {}", path.display()))?;
        let inv: Inventory =
            toml::from_str(&text).with_context(|| format!("inventory {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        ca = ca.or(inv.ca.map(rel));
        cert = cert.or(inv.cert.map(rel));
        key = key.or(inv.key.map(rel));
        nodes.extend(inv.nodes.into_iter().map(|n| n.url));
    }
    // One spelling per node, each once: the answers are matched to nodes by
    // URL, and a node listed twice would be asked (and counted) twice.
    let mut seen = std::collections::HashSet::new();
    let nodes: Vec<String> = nodes
        .into_iter()
        .map(|n| n.trim_end_matches('/').to_string())
        .filter(|n| seen.insert(n.clone()))
        .collect();
    if nodes.is_empty() {
        bail!("no node: give --node URL or --inventory FILE");
    }
    let Some(ca) = ca else { bail!("no CA: give --ca, PROVCTL_CA or `ca` in the inventory") };
    Ok((nodes, TlsFiles { ca, cert, key }))
}

/// One node's outcome.
struct NodeResult<T> {
    node: String,
    result: Result<T, ClientError>,
    /// Set when the node answered but the operation failed.
    failed: bool,
}

fn exit_of<T>(results: &[NodeResult<T>]) -> u8 {
    results
        .iter()
        .map(|r| match &r.result {
            Ok(_) if r.failed => EXIT_OPERATION_FAILED,
            Ok(_) => 0,
            Err(ClientError::Api { .. }) => EXIT_REFUSED,
            Err(ClientError::File { .. }) => EXIT_LOCAL,
            Err(_) => EXIT_UNREACHABLE,
        })
        .max()
        .unwrap_or(0)
}

fn print<T: Serialize>(results: &[NodeResult<T>], json: bool, human: impl Fn(&T) -> String) {
    if json {
        let nodes: Vec<serde_json::Value> = results
            .iter()
            .map(|r| match &r.result {
                Ok(v) => json!({"node": r.node, "ok": !r.failed, "result": v}),
                Err(e) => {
                    let code = match e {
                        ClientError::File { .. } => "local",
                        _ => e.code().unwrap_or("unreachable"),
                    };
                    json!({"node": r.node, "ok": false,
                           "error": {"code": code, "message": e.to_string()}})
                }
            })
            .collect();
        println!("{:#}", json!({"nodes": nodes}));
        return;
    }
    for r in results {
        let prefix = if results.len() > 1 { format!("{}: ", r.node) } else { String::new() };
        match &r.result {
            Ok(v) => {
                for line in human(v).lines() {
                    println!("{prefix}{line}");
                }
            }
            Err(e) => eprintln!("{prefix}error: {e}"),
        }
    }
}

/// Runs `f` against every node at once.
async fn fan_out<T, F, Fut>(nodes: &[String], tls: &TlsFiles, f: F) -> Vec<NodeResult<T>>
where
    F: Fn(Client) -> Fut,
    Fut: std::future::Future<Output = (Result<T, ClientError>, bool)>,
{
    let calls = nodes.iter().map(|node| {
        let client = Client::new(node, tls);
        let f = &f;
        async move {
            let (result, failed) = match client {
                Ok(c) => f(c).await,
                Err(e) => (Err(e), false),
            };
            NodeResult { node: node.clone(), result, failed }
        }
    });
    futures::future::join_all(calls).await
}

/// An answer as the API's type `T`, the operation not failed.
fn decoded<T: serde::de::DeserializeOwned>(
    r: Result<Answer, ClientError>,
) -> (Result<T, ClientError>, bool) {
    (r.and_then(|a| a.decode()), false)
}

/// Runs a manager command; a local problem (arguments, files, inventory)
/// is reported here and exits 5.
pub async fn run(command: RemoteCommand) -> Result<ExitCode> {
    match run_command(command).await {
        Ok(code) => Ok(ExitCode::from(code)),
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(EXIT_LOCAL))
        }
    }
}

async fn run_command(command: RemoteCommand) -> Result<u8> {
    match command {
        RemoteCommand::Deploy { bundle, target } => plugins::deploy(&bundle, &target).await,
        RemoteCommand::Provision(args) => operations::provision(args).await,
        RemoteCommand::Place { specs, how, explain, target } => {
            operations::place(&specs, &how, explain, &target).await
        }
        RemoteCommand::Status { operation, follow, target } => {
            operations::status(operation, follow, &target).await
        }
        RemoteCommand::Cancel { operation, target } => {
            operations::cancel(&operation, &target).await
        }
        RemoteCommand::Vms { delete, target } => vms::vms(delete, &target).await,
        RemoteCommand::Start { name, target } => vms::power(&name, None, &target).await,
        RemoteCommand::Stop { name, force, timeout, target } => {
            let stop = provd_wire::StopRequest { force, timeout_seconds: timeout };
            vms::power(&name, Some(stop), &target).await
        }
        RemoteCommand::Repack { vms, all, shared_format, target } => {
            vms::repack(vms, all, shared_format, &target).await
        }
        RemoteCommand::Images { delete, target } => records::images(delete, &target).await,
        RemoteCommand::Gc { max_age_secs, max_bytes, target } => {
            records::gc(provd_wire::GcRequest { max_age_secs, max_bytes }, &target).await
        }
        RemoteCommand::Bundles { target } => plugins::bundles(&target).await,
        RemoteCommand::Rollback { plugin, to, target } => {
            plugins::rollback(&plugin, to, &target).await
        }
        RemoteCommand::Audit { operation, plugin, kind, outcome, limit, target } => {
            records::audit(
                [
                    ("operation", operation),
                    ("plugin", plugin),
                    ("kind", kind),
                    ("outcome", outcome),
                ],
                limit,
                &target,
            )
            .await
        }
        RemoteCommand::Health { target } => records::health(&target).await,
    }
}
