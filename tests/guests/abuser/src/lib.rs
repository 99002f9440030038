//! A plugin that calls one host function with the arguments its input
//! describes and reports what the host answered: the hostile-plugin corpus
//! (`tests/tests/abuse.rs`) drives every host function with every kind of
//! bad argument through it.
//!
//! Input: `{"call": "<interface>.<function>", "args": [<arg>, ...],
//! "fetch": [<reference>, ...]}` (images fetched first). An
//! argument is a JSON string or number, or `{"repeat": [text, n]}` (text n
//! times), `{"bytes": n}` (n bytes), `{"pairs": [[a, b], ...]}`,
//! `{"pairs-repeat": [[a, b], n]}`, `{"list": [...]}`,
//! `{"list-repeat": [text, n]}`. The report's `outcome` is `ok` or the
//! error's kind, and `message` what came with it.

#![allow(clippy::indexing_slicing)]
// Forging resource handles by number needs `from_handle`, which is unsafe
// by design: that forgery is what the host must survive.
#![allow(unsafe_code)]

use provd_sdk::{
    Error, Plugin, Report, Request, dedup, hashing, images, log, partitions, progress, vm,
};
use serde_json::Value;

struct Abuser;

fn text(v: &Value) -> Result<String, Error> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Object(m) if m.contains_key("repeat") => {
            let r = &m["repeat"];
            let s = r[0].as_str().unwrap_or_default();
            let n = r[1].as_u64().unwrap_or(0) as usize;
            Ok(s.repeat(n))
        }
        other => Err(Error::InvalidInput(format!("not a text argument: {other}"))),
    }
}

fn number(v: &Value) -> Result<u64, Error> {
    v.as_u64().ok_or_else(|| Error::InvalidInput(format!("not a number: {v}")))
}

fn small(v: &Value) -> Result<u32, Error> {
    u32::try_from(number(v)?).map_err(|_| Error::InvalidInput(format!("not a u32: {v}")))
}

fn bytes(v: &Value) -> Result<Vec<u8>, Error> {
    match v.get("bytes").and_then(Value::as_u64) {
        Some(n) => Ok((0..n).map(|i| (i % 251) as u8).collect()),
        None => Ok(text(v)?.into_bytes()),
    }
}

fn pairs(v: &Value) -> Result<Vec<(String, String)>, Error> {
    let pair = |p: &Value| -> Result<(String, String), Error> { Ok((text(&p[0])?, text(&p[1])?)) };
    if let Some(list) = v.get("pairs").and_then(Value::as_array) {
        return list.iter().map(pair).collect();
    }
    if let Some(r) = v.get("pairs-repeat") {
        let one = pair(&r[0])?;
        let n = r[1].as_u64().unwrap_or(0) as usize;
        return Ok(vec![one; n]);
    }
    Err(Error::InvalidInput(format!("not pairs: {v}")))
}

fn list(v: &Value) -> Result<Vec<String>, Error> {
    if let Some(items) = v.get("list").and_then(Value::as_array) {
        return items.iter().map(text).collect();
    }
    if let Some(r) = v.get("list-repeat") {
        let one = text(&r[0])?;
        let n = r[1].as_u64().unwrap_or(0) as usize;
        return Ok(vec![one; n]);
    }
    Err(Error::InvalidInput(format!("not a list: {v}")))
}

fn opt(v: &Value) -> Result<Option<String>, Error> {
    if v.is_null() { Ok(None) } else { text(v).map(Some) }
}

fn refs(p: &[(String, String)]) -> Vec<(&str, &str)> {
    p.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect()
}

fn policy(v: &Value) -> dedup::Policy {
    dedup::Policy {
        min_layer_bytes: v["min-layer-bytes"].as_u64().unwrap_or(0),
        max_layers_per_vm: v["max-layers"].as_u64().unwrap_or(8) as u32,
        share_across_paths: v["share-across-paths"].as_bool().unwrap_or(false),
        node_layers: v["node-layers"].as_bool().unwrap_or(false),
        layer_unique_files: v["layer-unique-files"].as_bool().unwrap_or(false),
    }
}

/// Calls `call` with `a`; the host's answer, summarised.
fn run(call: &str, a: &[Value]) -> Result<String, Error> {
    let arg = |i: usize| a.get(i).cloned().unwrap_or(Value::Null);
    Ok(match call {
        "log.write" => {
            let fields: Vec<(String, String)> =
                if arg(1).is_null() { Vec::new() } else { pairs(&arg(1))? };
            let shown: Vec<(&str, &dyn std::fmt::Display)> =
                fields.iter().map(|(k, v)| (k.as_str(), v as &dyn std::fmt::Display)).collect();
            log::info(&text(&arg(0))?, &shown);
            "logged".into()
        }
        "progress.report" => {
            let total = if arg(2).is_null() { None } else { Some(number(&arg(2))?) };
            progress::report(&text(&arg(0))?, number(&arg(1))?, total)?;
            "reported".into()
        }
        "hashing.blake3" => hashing::blake3(&bytes(&arg(0))?)?,
        "hashing.hash-file" => hashing::hash_file(&text(&arg(0))?, &text(&arg(1))?)?,
        "hashing.hasher-update" => {
            let mut h = hashing::Hasher::new();
            for _ in 0..number(&arg(1))?.max(1) {
                h.update(&bytes(&arg(0))?)?;
            }
            h.finish()
        }
        "hashing.hashers" => {
            // Many live handles at once.
            let n = number(&arg(0))?;
            let mut live = Vec::new();
            for _ in 0..n {
                live.push(hashing::Hasher::new());
            }
            format!("{} hashers", live.len())
        }
        "images.fetch" => images::fetch(&text(&arg(0))?)?.reference,
        "images.entries" => {
            let e = images::entries(&text(&arg(0))?, number(&arg(1))?, small(&arg(2))?)?;
            format!("{} entries", e.len())
        }
        "images.read-file" => {
            format!("{} bytes", images::read_file(&text(&arg(0))?, &text(&arg(1))?)?.len())
        }
        "dedup.analyse" => {
            let p = pairs(&arg(0))?;
            format!("{} layers", dedup::analyse(&refs(&p))?.layers.len())
        }
        "dedup.plan" => {
            let p = pairs(&arg(0))?;
            let s = dedup::plan(&refs(&p), policy(&arg(1)))?;
            format!("plan {}", s.plan)
        }
        "dedup.layer-entries" => {
            let e = dedup::layer_entries(&text(&arg(0))?, number(&arg(1))?, small(&arg(2))?)?;
            format!("{} entries", e.len())
        }
        "partitions.create-shared" => {
            partitions::create_shared(&text(&arg(0))?, &text(&arg(1))?)?.id
        }
        "partitions.create-private" => {
            partitions::create_private(
                &text(&arg(0))?,
                &text(&arg(1))?,
                opt(&arg(2))?.as_deref(),
                &text(&arg(3))?,
                number(&arg(4))?,
            )?
            .id
        }
        "partitions.create-privates" => {
            let vms = list(&arg(1))?;
            let vms: Vec<&str> = vms.iter().map(String::as_str).collect();
            let built = partitions::create_privates(
                &text(&arg(0))?,
                &vms,
                opt(&arg(2))?.as_deref(),
                &text(&arg(3))?,
                number(&arg(4))?,
            )?;
            format!("{} partitions", built.len())
        }
        "partitions.add-file" => {
            partitions::add_file(
                &text(&arg(0))?,
                &text(&arg(1))?,
                &bytes(&arg(2))?,
                small(&arg(3))?,
            )?;
            "added".into()
        }
        "vm.configure" => vm::configure(&text(&arg(0))?, &text(&arg(1))?)?.config_file,
        "vm.configure-all" => {
            let p = pairs(&arg(0))?;
            format!("{} configured", vm::configure_all(&refs(&p))?.len())
        }
        "vm.customize" => vm::customize(&text(&arg(0))?)?,
        // Deeper calls: a real plan (and partitions) first, so that the
        // hostile argument reaches the checks behind the plan's.
        "after-plan.create-shared" => {
            let p = pairs(&arg(0))?;
            let s = dedup::plan(&refs(&p), policy(&Value::Null))?;
            partitions::create_shared(&s.plan, &text(&arg(1))?)?.id
        }
        "after-plan.create-private" => {
            let p = pairs(&arg(0))?;
            let s = dedup::plan(&refs(&p), policy(&Value::Null))?;
            partitions::create_private(
                &s.plan,
                &text(&arg(1))?,
                None,
                &text(&arg(2))?,
                number(&arg(3))?,
            )?
            .id
        }
        "after-build.add-file" => {
            let p = pairs(&arg(0))?;
            let s = dedup::plan(&refs(&p), policy(&Value::Null))?;
            let private = partitions::create_private(&s.plan, &p[0].0, None, "ext4", 0)?;
            partitions::add_file(&private.id, &text(&arg(1))?, &bytes(&arg(2))?, small(&arg(3))?)?;
            "added".into()
        }
        "after-build.configure" => {
            let p = pairs(&arg(0))?;
            let s = dedup::plan(&refs(&p), policy(&Value::Null))?;
            let private = partitions::create_private(&s.plan, &p[0].0, None, "ext4", 0)?;
            vm::configure(&text(&arg(1))?, &private.id)?.config_file
        }
        other => return wasi(other, a),
    })
}

/// The WASI subset every plugin is linked with, and handles forged by
/// number: what the canonical ABI and wasmtime-wasi must refuse.
fn wasi(call: &str, a: &[Value]) -> Result<String, Error> {
    use wasip2::{cli, clocks, filesystem, io, random};
    let arg = |i: usize| a.get(i).cloned().unwrap_or(Value::Null);
    Ok(match call {
        "wasi.random-bytes" => {
            format!("{} bytes", random::random::get_random_bytes(number(&arg(0))?).len())
        }
        "wasi.insecure-random-bytes" => {
            format!("{} bytes", random::insecure::get_insecure_random_bytes(number(&arg(0))?).len())
        }
        "wasi.environment" => format!(
            "{} variables, {} arguments, cwd {:?}",
            cli::environment::get_environment().len(),
            cli::environment::get_arguments().len(),
            cli::environment::initial_cwd()
        ),
        "wasi.preopens" => {
            format!("{} directories", filesystem::preopens::get_directories().len())
        }
        "wasi.stdin-read" => match cli::stdin::get_stdin().blocking_read(number(&arg(0))?) {
            Ok(b) => format!("{} bytes", b.len()),
            Err(e) => format!("stream error {e:?}"),
        },
        "wasi.stdout-write" | "wasi.stderr-write" => {
            let out = if call == "wasi.stdout-write" {
                cli::stdout::get_stdout()
            } else {
                cli::stderr::get_stderr()
            };
            let chunk = bytes(&arg(0))?;
            let times = number(&arg(1))?;
            let mut written = 0u64;
            for _ in 0..times {
                if let Err(e) = out.blocking_write_and_flush(&chunk) {
                    return Ok(format!("stream error after {written} bytes: {e:?}"));
                }
                written += chunk.len() as u64;
            }
            format!("{written} bytes written")
        }
        "wasi.sleep" => {
            clocks::monotonic_clock::subscribe_duration(number(&arg(0))?).block();
            "woke".into()
        }
        "wasi.pollables" => {
            // Many live host resources at once, then one poll over all.
            let n = number(&arg(0))?;
            let mut live = Vec::new();
            for _ in 0..n {
                live.push(clocks::monotonic_clock::subscribe_duration(0));
            }
            let refs: Vec<&io::poll::Pollable> = live.iter().collect();
            format!("{} ready", io::poll::poll(&refs).len())
        }
        "wasi.exit" => {
            let ok = arg(0).as_bool().unwrap_or(false);
            cli::exit::exit(if ok { Ok(()) } else { Err(()) });
            "returned from exit".into()
        }
        "wasi.forged-descriptor" => {
            // SAFETY: deliberately not; the host must refuse the handle.
            let d = unsafe { filesystem::types::Descriptor::from_handle(small(&arg(0))?) };
            format!("{:?}", d.stat().map(|s| s.size))
        }
        "handle.forged-hasher" => {
            // SAFETY: deliberately not; the host must refuse the handle.
            let h = unsafe {
                provd_sdk::wit::provd::plugin::hashing::Hasher::from_handle(small(&arg(0))?)
            };
            format!("{:?}", h.finish())
        }
        "handle.hasher-after-drop" => {
            let h = provd_sdk::wit::provd::plugin::hashing::Hasher::new();
            let n = h.handle();
            drop(h);
            // SAFETY: deliberately not: the handle was dropped.
            let again = unsafe { provd_sdk::wit::provd::plugin::hashing::Hasher::from_handle(n) };
            format!("{:?}", again.finish())
        }
        "handle.pollable-as-hasher" => {
            let p = clocks::monotonic_clock::subscribe_duration(0);
            let n = p.take_handle();
            // SAFETY: deliberately not: the handle is a pollable's.
            let h = unsafe { provd_sdk::wit::provd::plugin::hashing::Hasher::from_handle(n) };
            format!("{:?}", h.finish())
        }
        "handle.hasher-as-pollable" => {
            let h = provd_sdk::wit::provd::plugin::hashing::Hasher::new();
            let n = h.take_handle();
            // SAFETY: deliberately not: the handle is a hasher's.
            let p = unsafe { io::poll::Pollable::from_handle(n) };
            format!("ready {}", p.ready())
        }
        other => return Err(Error::InvalidInput(format!("no call {other:?}"))),
    })
}

impl Plugin for Abuser {
    fn provision(request: Request) -> Result<Report, Error> {
        let input: Value = request.input()?;
        let call = input["call"].as_str().unwrap_or_default().to_string();
        let args = input["args"].as_array().cloned().unwrap_or_default();
        // Images the call needs fetched in this request first.
        for reference in input["fetch"].as_array().into_iter().flatten() {
            images::fetch(reference.as_str().unwrap_or_default())?;
        }
        let (outcome, message) = match run(&call, &args) {
            Ok(summary) => ("ok", summary),
            Err(Error::InvalidInput(m)) => ("invalid-input", m),
            Err(Error::Denied(m)) => ("denied", m),
            Err(Error::NotFound(m)) => ("not-found", m),
            Err(Error::QuotaExceeded(m)) => ("quota-exceeded", m),
            Err(Error::Failed(m)) => ("failed", m),
        };
        // Long answers are cut: the report has a size limit of its own.
        let message: String = message.chars().take(300).collect();
        Ok(Report::new(outcome).field("message", message))
    }
}

provd_sdk::export_plugin!(Abuser);
