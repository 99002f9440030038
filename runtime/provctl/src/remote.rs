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

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use provd_client::{Client, ClientError, TlsFiles, encode};
use serde::Deserialize;
use serde_json::{Value, json};

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
    /// Lists the images of every node.
    Images {
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
struct NodeResult {
    node: String,
    result: Result<Value, ClientError>,
    /// Set when the node answered but the operation failed.
    failed: bool,
}

fn exit_of(results: &[NodeResult]) -> u8 {
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

fn print(results: &[NodeResult], json: bool, human: impl Fn(&Value) -> String) {
    if json {
        let nodes: Vec<Value> = results
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
async fn fan_out<F, Fut>(nodes: &[String], tls: &TlsFiles, f: F) -> Vec<NodeResult>
where
    F: Fn(Client) -> Fut,
    Fut: std::future::Future<Output = (Result<Value, ClientError>, bool)>,
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

fn ok_body(r: Result<provd_client::Answer, ClientError>) -> (Result<Value, ClientError>, bool) {
    (r.map(|a| a.body), false)
}

/// `v[key]` without the panic of indexing a non-object.
fn at<'a>(v: &'a Value, key: &str) -> &'a Value {
    v.get(key).unwrap_or(&Value::Null)
}

fn str_of<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("-")
}

fn describe_operation(op: &Value) -> String {
    let mut line = format!(
        "{} {} {}@{} vms=[{}]",
        str_of(op, "/id"),
        str_of(op, "/state"),
        str_of(op, "/plugin"),
        str_of(op, "/version"),
        op.get("vms")
            .and_then(Value::as_array)
            .map(|v| v.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","))
            .unwrap_or_default()
    );
    if let Some(summary) = op.pointer("/report/summary").and_then(Value::as_str) {
        line.push_str(&format!("\n  {summary}"));
    }
    if let Some(fields) = op.pointer("/report/fields").and_then(Value::as_object) {
        for (k, v) in fields {
            line.push_str(&format!("\n  {k}: {}", v.as_str().unwrap_or_default()));
        }
    }
    if let Some(code) = op.pointer("/error/code").and_then(Value::as_str) {
        line.push_str(&format!("\n  error {code}: {}", str_of(op, "/error/message")));
    }
    line
}

fn finished_badly(op: &Value) -> bool {
    matches!(op.get("state").and_then(Value::as_str), Some("failed" | "cancelled"))
}

/// Follows an operation, with a progress bar when `bar` is given.
async fn follow(
    c: &Client,
    id: &str,
    bar: Option<indicatif::ProgressBar>,
) -> Result<Value, ClientError> {
    let done = c
        .wait(id, |op| {
            if let Some(bar) = &bar {
                let phase = str_of(op, "/phase");
                let done = op.get("done").and_then(Value::as_u64).unwrap_or(0);
                match op.get("total").and_then(Value::as_u64) {
                    Some(total) => {
                        bar.set_length(total);
                        bar.set_position(done);
                    }
                    None => bar.set_position(done),
                }
                bar.set_message(format!("{} {phase}", c.base()));
            }
        })
        .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    done
}

fn bars(json: bool) -> Option<indicatif::MultiProgress> {
    (!json && std::io::stderr().is_terminal()).then(indicatif::MultiProgress::new)
}

fn new_bar(multi: &Option<indicatif::MultiProgress>) -> Option<indicatif::ProgressBar> {
    multi.as_ref().map(|m| {
        let bar = m.add(indicatif::ProgressBar::new(0));
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg:40} [{bar:30}] {pos}/{len} {elapsed}")
        {
            bar.set_style(style);
        }
        bar
    })
}

fn read_params(params: &Option<String>) -> Result<Option<Value>> {
    let Some(p) = params else { return Ok(None) };
    let text = match p.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        None => p.clone(),
    };
    let v: Value = serde_json::from_str(&text).context("--params: not JSON")?;
    if !v.is_object() {
        bail!("--params: must be a JSON object");
    }
    Ok(Some(v))
}

fn read_spec(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // Checked here too, so a typo is reported before any node is asked.
    provd_vm::spec::parse_spec(&text).with_context(|| format!("{}", path.display()))?;
    if text.trim_start().starts_with('{') {
        Ok(serde_json::from_str(&text)?)
    } else {
        let v: toml::Value = toml::from_str(&text)?;
        Ok(serde_json::to_value(v)?)
    }
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
    let code = match command {
        RemoteCommand::Deploy { bundle, target } => {
            let (nodes, tls) = load_target(&target)?;
            let bytes =
                std::fs::read(&bundle).with_context(|| format!("reading {}", bundle.display()))?;
            let results = fan_out(&nodes, &tls, |c| {
                let bytes = bytes.clone();
                async move { ok_body(c.deploy(bytes).await) }
            })
            .await;
            print(&results, target.json, |v| {
                let b = &at(v, "bundle");
                let what = if at(b, "new") == true { "accepted" } else { "already accepted" };
                format!(
                    "{} {} {what} (signer {})",
                    str_of(b, "/name"),
                    str_of(b, "/version"),
                    str_of(b, "/signer")
                )
            });
            exit_of(&results)
        }
        RemoteCommand::Provision(args) => {
            let (nodes, tls) = load_target(&args.target)?;
            let mut request = serde_json::Map::new();
            request.insert("plugin".into(), json!(args.plugin));
            if let Some(v) = &args.version {
                request.insert("version".into(), json!(v));
            }
            let specs = args
                .vms
                .iter()
                .chain(&args.spec_files)
                .map(|p| read_spec(p))
                .collect::<Result<Vec<_>>>()?;
            if !specs.is_empty() {
                request.insert("vms".into(), Value::Array(specs.clone()));
            }
            if let Some(p) = read_params(&args.params)? {
                request.insert("params".into(), p);
            }
            if let Some(k) = &args.idempotency_key {
                request.insert("idempotency-key".into(), json!(k));
            }
            let request = Value::Object(request);
            // With --place: each node gets its own VMs, and its own key.
            let mut requests: std::collections::BTreeMap<String, Value> =
                nodes.iter().map(|n| (n.clone(), request.clone())).collect();
            let mut nodes = nodes;
            if args.place {
                let placement =
                    crate::place::run(&nodes, &tls, &specs, &args.how.options()?).await?;
                let unplaced = placement.unplaced();
                if !unplaced.is_empty() {
                    eprint!("{}", placement.describe(true));
                    let names: Vec<&str> = unplaced.iter().map(|d| d.vm.as_str()).collect();
                    eprintln!("error: no node fits {}; nothing was provisioned", names.join(", "));
                    return Ok(EXIT_REFUSED);
                }
                if !args.target.json {
                    print!("{}", placement.describe(false));
                }
                requests.clear();
                for (node, vms) in placement.by_node(&specs) {
                    let mut r = request.clone();
                    if let Some(m) = r.as_object_mut() {
                        m.insert("vms".into(), Value::Array(vms));
                        if let Some(k) = &args.idempotency_key {
                            m.insert(
                                "idempotency-key".into(),
                                json!(crate::place::key_for(k, &node)),
                            );
                        }
                    }
                    requests.insert(node, r);
                }
                nodes = requests.keys().cloned().collect();
            }
            let multi = bars(args.target.json || args.no_wait);
            let results = fan_out(&nodes, &tls, |c| {
                // Every node has its request (nodes were normalised like
                // the client's base); a miss would send every VM to it.
                let request = requests.get(c.base()).cloned();
                let bar = new_bar(&multi);
                let no_wait = args.no_wait;
                async move {
                    let Some(request) = request else {
                        let message = "no request was prepared for this node".to_string();
                        return (
                            Err(ClientError::Connect { url: c.base().into(), message }),
                            false,
                        );
                    };
                    let started = match c.provision(&request).await {
                        Ok(a) => at(&a.body, "operation").clone(),
                        Err(e) => return (Err(e), false),
                    };
                    if no_wait {
                        return (Ok(started), false);
                    }
                    let id = str_of(&started, "/id").to_string();
                    match follow(&c, &id, bar).await {
                        Ok(op) => {
                            let bad = finished_badly(&op);
                            (Ok(op), bad)
                        }
                        Err(e) => (Err(e), false),
                    }
                }
            })
            .await;
            print(&results, args.target.json, describe_operation);
            exit_of(&results)
        }
        RemoteCommand::Place { specs, how, explain, target } => {
            let (nodes, tls) = load_target(&target)?;
            let specs = specs.iter().map(|p| read_spec(p)).collect::<Result<Vec<_>>>()?;
            let placement = crate::place::run(&nodes, &tls, &specs, &how.options()?).await?;
            if target.json {
                println!("{:#}", placement.to_json(explain));
            } else {
                print!("{}", placement.describe(explain));
            }
            if placement.unplaced().is_empty() { 0 } else { EXIT_REFUSED }
        }
        RemoteCommand::Status { operation, follow: wait, target } => {
            let (nodes, tls) = load_target(&target)?;
            let multi = bars(target.json || !wait);
            let results = fan_out(&nodes, &tls, |c| {
                let operation = operation.clone();
                let bar = new_bar(&multi);
                async move {
                    match operation {
                        Some(id) if wait => match follow(&c, &id, bar).await {
                            Ok(op) => {
                                let bad = finished_badly(&op);
                                (Ok(op), bad)
                            }
                            Err(e) => (Err(e), false),
                        },
                        Some(id) => match c.operation(&id, None).await {
                            Ok(op) => {
                                let bad = finished_badly(&op);
                                (Ok(op), bad)
                            }
                            Err(e) => (Err(e), false),
                        },
                        None => ok_body(c.get("/v1/operations?limit=20").await),
                    }
                }
            })
            .await;
            print(&results, target.json, |v| match v.get("operations").and_then(Value::as_array) {
                Some(ops) => ops.iter().map(describe_operation).collect::<Vec<_>>().join("\n"),
                None => describe_operation(v),
            });
            exit_of(&results)
        }
        RemoteCommand::Cancel { operation, target } => {
            let (nodes, tls) = load_target(&target)?;
            let results = fan_out(&nodes, &tls, |c| {
                let path = format!("/v1/operations/{}/cancel", encode(&operation));
                async move { ok_body(c.post_json(&path, &json!({})).await) }
            })
            .await;
            print(&results, target.json, |v| {
                format!("{}: cancel requested", str_of(v, "/operation/id"))
            });
            exit_of(&results)
        }
        RemoteCommand::Vms { delete, target } => {
            let (nodes, tls) = load_target(&target)?;
            let results = fan_out(&nodes, &tls, |c| {
                let delete = delete.clone();
                async move {
                    match delete {
                        Some(name) => {
                            ok_body(c.delete(&format!("/v1/vms/{}", encode(&name))).await)
                        }
                        None => ok_body(c.get("/v1/vms").await),
                    }
                }
            })
            .await;
            print(&results, target.json, |v| {
                if let Some(name) = v.get("deleted").and_then(Value::as_str) {
                    return format!("deleted {name}");
                }
                let mut out = String::new();
                for vm in at(v, "vms").as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "{:20} {:>3} vCPU {:>7} MiB  {}  (operation {})\n",
                        str_of(vm, "/name"),
                        vm.pointer("/reserved/vcpus").and_then(Value::as_u64).unwrap_or(0),
                        vm.pointer("/reserved/memory-mib").and_then(Value::as_u64).unwrap_or(0),
                        str_of(vm, "/spec/hypervisor"),
                        str_of(vm, "/operation"),
                    ));
                }
                if out.is_empty() {
                    out.push_str("no VMs\n");
                }
                out
            });
            exit_of(&results)
        }
        RemoteCommand::Repack { vms, all, shared_format, target } => {
            let (nodes, tls) = load_target(&target)?;
            let body = if all {
                json!({"shared-format": shared_format, "all": true})
            } else {
                json!({"shared-format": shared_format, "vms": vms})
            };
            let results = fan_out(&nodes, &tls, |c| {
                let body = body.clone();
                async move { ok_body(c.post_json("/v1/repack", &body).await) }
            })
            .await;
            print(&results, target.json, |v| {
                let r = at(v, "repack");
                let count = |k: &str| r.get(k).and_then(Value::as_array).map(Vec::len).unwrap_or(0);
                let mib = |k: &str| {
                    r.get(k).and_then(Value::as_u64).unwrap_or(0) as f64 / f64::from(1 << 20)
                };
                let mut out = format!(
                    "moved {} VM(s) onto {}, freed {} shared partition(s); shared partitions {:.1} MiB -> {:.1} MiB\n",
                    count("moved"),
                    r.pointer("/partition/id")
                        .and_then(Value::as_str)
                        .unwrap_or("no new partition"),
                    count("freed"),
                    mib("shared_bytes_before"),
                    mib("shared_bytes_after"),
                );
                for (what, key) in [("skipped", "skipped"), ("failed", "failed")] {
                    for pair in r.get(key).and_then(Value::as_array).into_iter().flatten() {
                        out.push_str(&format!(
                            "{what} {}: {}\n",
                            pair.get(0).and_then(Value::as_str).unwrap_or(""),
                            pair.get(1).and_then(Value::as_str).unwrap_or("")
                        ));
                    }
                }
                out
            });
            exit_of(&results)
        }
        RemoteCommand::Images { target } => {
            let (nodes, tls) = load_target(&target)?;
            let results =
                fan_out(&nodes, &tls, |c| async move { ok_body(c.get("/v1/images").await) }).await;
            print(&results, target.json, |v| {
                let mut out = String::new();
                for i in at(v, "images").as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "{}  {} files, {} bytes\n",
                        str_of(i, "/reference"),
                        at(i, "files").as_u64().unwrap_or(0),
                        at(i, "bytes").as_u64().unwrap_or(0)
                    ));
                }
                if out.is_empty() {
                    out.push_str("no images\n");
                }
                out
            });
            exit_of(&results)
        }
        RemoteCommand::Bundles { target } => {
            let (nodes, tls) = load_target(&target)?;
            let results =
                fan_out(&nodes, &tls, |c| async move { ok_body(c.get("/v1/bundles").await) }).await;
            print(&results, target.json, |v| {
                let mut out = String::new();
                for b in at(v, "bundles").as_array().into_iter().flatten() {
                    let active = if at(b, "active") == true { "  (active)" } else { "" };
                    out.push_str(&format!(
                        "{} {} {} signer {}{active}\n",
                        str_of(b, "/name"),
                        str_of(b, "/version"),
                        str_of(b, "/digest"),
                        str_of(b, "/signer")
                    ));
                }
                if out.is_empty() {
                    out.push_str("no bundles\n");
                }
                out
            });
            exit_of(&results)
        }
        RemoteCommand::Rollback { plugin, to, target } => {
            let (nodes, tls) = load_target(&target)?;
            let results = fan_out(&nodes, &tls, |c| {
                let (path, body) = match &to {
                    Some(v) => {
                        (format!("/v1/plugins/{}/activate", encode(&plugin)), json!({"version": v}))
                    }
                    None => (format!("/v1/plugins/{}/rollback", encode(&plugin)), json!({})),
                };
                async move { ok_body(c.post_json(&path, &body).await) }
            })
            .await;
            print(&results, target.json, |v| {
                format!(
                    "{}: {} -> {}",
                    str_of(v, "/plugin"),
                    str_of(v, "/previous"),
                    str_of(v, "/active")
                )
            });
            exit_of(&results)
        }
        RemoteCommand::Audit { operation, plugin, kind, outcome, limit, target } => {
            let (nodes, tls) = load_target(&target)?;
            let mut query = vec![format!("limit={limit}")];
            for (k, v) in
                [("operation", operation), ("plugin", plugin), ("kind", kind), ("outcome", outcome)]
            {
                if let Some(v) = v {
                    query.push(format!("{k}={}", encode(&v)));
                }
            }
            let path = format!("/v1/audit?{}", query.join("&"));
            let results = fan_out(&nodes, &tls, |c| {
                let path = path.clone();
                async move { ok_body(c.get(&path).await) }
            })
            .await;
            print(&results, target.json, |v| {
                let mut out = String::new();
                for a in at(v, "audit").as_array().into_iter().flatten() {
                    let what = match (
                        a.get("interface").and_then(Value::as_str),
                        a.get("function").and_then(Value::as_str),
                    ) {
                        (Some(i), Some(f)) => format!("{i}.{f}"),
                        (None, Some(f)) => f.to_string(),
                        _ => str_of(a, "/kind").to_string(),
                    };
                    let count = at(a, "count").as_u64().unwrap_or(1);
                    let times = if count > 1 { format!(" x{count}") } else { String::new() };
                    out.push_str(&format!(
                        "#{} {} {} {}@{} {} {what}{times} {} {}\n",
                        at(a, "id").as_i64().unwrap_or(0),
                        at(a, "at").as_i64().unwrap_or(0),
                        str_of(a, "/actor"),
                        str_of(a, "/plugin"),
                        str_of(a, "/version"),
                        str_of(a, "/operation"),
                        str_of(a, "/outcome"),
                        a.get("args").and_then(Value::as_str).unwrap_or(""),
                    ));
                }
                out
            });
            exit_of(&results)
        }
        RemoteCommand::Health { target } => {
            let (nodes, tls) = load_target(&target)?;
            let results =
                fan_out(&nodes, &tls, |c| async move { ok_body(c.get("/healthz").await) }).await;
            print(&results, target.json, |v| {
                format!(
                    "{} (provd {}, {} running)",
                    str_of(v, "/status"),
                    str_of(v, "/version"),
                    at(v, "running-operations").as_u64().unwrap_or(0)
                )
            });
            exit_of(&results)
        }
    };
    Ok(code)
}
