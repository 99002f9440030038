//! Operations: `provision` (with `--place`), `place`, `status`, `cancel`.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use provd_client::{Client, ClientError, encode};
use provd_wire as wire;
use serde_json::Value;

use super::{
    EXIT_REFUSED, PlaceOptions, ProvisionArgs, Target, decoded, exit_of, fan_out, load_target,
    print,
};

fn finished_badly(op: &wire::Operation) -> bool {
    matches!(op.state, wire::OperationState::Failed | wire::OperationState::Cancelled)
}

/// An operation as the node answered it, marked failed when it ended so.
fn judged(r: Result<wire::Operation, ClientError>) -> (Result<wire::Operation, ClientError>, bool) {
    match r {
        Ok(op) => {
            let bad = finished_badly(&op);
            (Ok(op), bad)
        }
        Err(e) => (Err(e), false),
    }
}

/// Follows an operation, with a progress bar when `bar` is given.
async fn follow(
    c: &Client,
    id: &str,
    bar: Option<indicatif::ProgressBar>,
) -> Result<wire::Operation, ClientError> {
    let done = c
        .wait(id, |op| {
            if let Some(bar) = &bar {
                let done = op.done.unwrap_or(0);
                if let Some(total) = op.total {
                    bar.set_length(total);
                }
                bar.set_position(done);
                bar.set_message(format!("{} {}", c.base(), op.phase.as_deref().unwrap_or("-")));
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

pub(super) fn read_spec(path: &Path) -> Result<Value> {
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

fn describe_operation(op: &wire::Operation) -> String {
    let mut line = format!(
        "{} {} {}@{} vms=[{}]",
        op.id,
        op.state.as_str(),
        op.plugin,
        op.version,
        op.vms.join(",")
    );
    if let Some(summary) = op.report_field("summary").as_str() {
        line.push_str(&format!("\n  {summary}"));
    }
    if let Some(fields) = op.report_field("fields").as_object() {
        for (k, v) in fields {
            line.push_str(&format!("\n  {k}: {}", v.as_str().unwrap_or_default()));
        }
    }
    if let Some(code) = op.error_code() {
        line.push_str(&format!("\n  error {code}: {}", op.error_message().unwrap_or("-")));
    }
    line
}

pub(super) async fn provision(args: ProvisionArgs) -> Result<u8> {
    let (nodes, tls) = load_target(&args.target)?;
    let specs = args
        .vms
        .iter()
        .chain(&args.spec_files)
        .map(|p| read_spec(p))
        .collect::<Result<Vec<_>>>()?;
    let request = wire::OperationRequest {
        plugin: args.plugin.clone(),
        version: args.version.clone(),
        vms: specs.clone(),
        params: read_params(&args.params)?,
        idempotency_key: args.idempotency_key.clone(),
        allow_inactive: false,
        start: args.start,
    };
    // With --place: each node gets its own VMs, and its own key.
    let mut requests: std::collections::BTreeMap<String, wire::OperationRequest> =
        nodes.iter().map(|n| (n.clone(), request.clone())).collect();
    let mut nodes = nodes;
    if args.place {
        let placement = crate::place::run(&nodes, &tls, &specs, &args.how.options()?).await?;
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
            let idempotency_key =
                args.idempotency_key.as_ref().map(|k| crate::place::key_for(k, &node));
            requests
                .insert(node, wire::OperationRequest { vms, idempotency_key, ..request.clone() });
        }
        nodes = requests.keys().cloned().collect();
    }
    let multi = bars(args.target.json || args.no_wait);
    let results = fan_out(&nodes, &tls, |c| {
        // Every node has its request (nodes were normalised like the
        // client's base); a miss would send every VM to it.
        let request = requests.get(c.base()).cloned();
        let bar = new_bar(&multi);
        let no_wait = args.no_wait;
        async move {
            let Some(request) = request else {
                let message = "no request was prepared for this node".to_string();
                return (Err(ClientError::Connect { url: c.base().into(), message }), false);
            };
            let started = match c.start(&request).await {
                Ok((op, _)) => op,
                Err(e) => return (Err(e), false),
            };
            if no_wait {
                return (Ok(started), false);
            }
            judged(follow(&c, &started.id, bar).await)
        }
    })
    .await;
    print(&results, args.target.json, describe_operation);
    Ok(exit_of(&results))
}

pub(super) async fn place(
    specs: &[PathBuf],
    how: &PlaceOptions,
    explain: bool,
    target: &Target,
) -> Result<u8> {
    let (nodes, tls) = load_target(target)?;
    let specs = specs.iter().map(|p| read_spec(p)).collect::<Result<Vec<_>>>()?;
    let placement = crate::place::run(&nodes, &tls, &specs, &how.options()?).await?;
    if target.json {
        println!("{:#}", placement.to_json(explain));
    } else {
        print!("{}", placement.describe(explain));
    }
    Ok(if placement.unplaced().is_empty() { 0 } else { EXIT_REFUSED })
}

/// One operation, or the latest ones.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Status {
    One(Box<wire::Operation>),
    Latest(wire::OperationList),
}

pub(super) async fn status(operation: Option<String>, wait: bool, target: &Target) -> Result<u8> {
    let (nodes, tls) = load_target(target)?;
    let multi = bars(target.json || !wait);
    let results = fan_out(&nodes, &tls, |c| {
        let operation = operation.clone();
        let bar = new_bar(&multi);
        async move {
            let (result, bad) = match operation {
                Some(id) if wait => judged(follow(&c, &id, bar).await),
                Some(id) => judged(c.operation(&id, None).await),
                None => {
                    let (list, bad) = decoded(c.get("/v1/operations?limit=20").await);
                    return (list.map(Status::Latest), bad);
                }
            };
            (result.map(|op| Status::One(Box::new(op))), bad)
        }
    })
    .await;
    print(&results, target.json, |v| match v {
        Status::One(op) => describe_operation(op),
        Status::Latest(list) => {
            list.operations.iter().map(describe_operation).collect::<Vec<_>>().join("\n")
        }
    });
    Ok(exit_of(&results))
}

pub(super) async fn cancel(operation: &str, target: &Target) -> Result<u8> {
    let (nodes, tls) = load_target(target)?;
    let results =
        fan_out(&nodes, &tls, |c| {
            let path = format!("/v1/operations/{}/cancel", encode(operation));
            async move {
                decoded::<wire::CancelAnswer>(c.post_json(&path, &serde_json::json!({})).await)
            }
        })
        .await;
    print(&results, target.json, |v| format!("{}: cancel requested", v.operation.id));
    Ok(exit_of(&results))
}
