//! Uses the `images` capability as its input says:
//!
//! * `{"op":"fetch","image":R}` — fetch R, report its figures;
//! * `{"op":"list","image":R,"offset":N,"limit":N}` — fetch R, list a page;
//! * `{"op":"read","image":R,"path":P}` — fetch R, read P, report its size
//!   and BLAKE3 (hashed in the guest);
//! * `{"op":"plan","vms":[[VM,R],...],"min_layer_bytes":N,"max_layers":N}` —
//!   fetch every image, plan layers, list each layer's paths;
//! * `{"op":"partitions","vms":[[VM,R],...],"min_layer_bytes":N,"max_layers":N,
//!   "shared_format":F,"private_format":F}` — fetch, plan, build the shared
//!   partition (when a layer is kept) and every VM's private one, and write
//!   `etc/hostname` into each raw ext4 private partition;
//!   With `"specs":{VM: SPEC}`, each such VM is then configured from SPEC;
//!   with `"then_spin":true` it then loops until its deadline stops it;
//! * `{"op":"add-file","partition":ID,"path":P}` — write a file into a
//!   partition by id (which must be one this request created);
//! * `{"op":"read-unfetched","image":R,"path":P}` — read without fetching;
//! * `{"op":"hash-guest"|"hash-host","image":R,"path":P}` — fetch R, then
//!   hash P by reading it into the guest and hashing in wasm, or by asking
//!   the host to hash it by handle; reports the time of that step only.

use provd_sdk::{Error, Plugin, Report, Request, dedup, hashing, images, partitions, vm};
use serde::Deserialize;
use std::time::Instant;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    op: String,
    #[serde(default)]
    image: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    offset: u64,
    #[serde(default = "default_limit")]
    limit: u32,
    /// For `plan`: (vm, image) pairs and the policy.
    /// `[vm, image]` pairs, or VM specs as the daemon sends them (their
    /// `name` and `image`; each spec also configures its VM).
    #[serde(default)]
    vms: Vec<VmArg>,
    #[serde(default)]
    min_layer_bytes: u64,
    #[serde(default)]
    max_layers: u32,
    #[serde(default)]
    shared_format: String,
    #[serde(default)]
    private_format: String,
    #[serde(default)]
    partition: String,
    /// For `partitions`: a VM spec per VM name; each VM with one is
    /// configured on its private partition.
    #[serde(default)]
    specs: std::collections::BTreeMap<String, String>,
    /// For `partitions`: spin forever once everything is built, so the
    /// request ends at its deadline.
    #[serde(default)]
    then_spin: bool,
    /// After building, report progress in a loop until cancelled: every
    /// report is a host call, where a cancel takes effect.
    #[serde(default)]
    then_wait: bool,
    /// For `partitions`: after this many of its building or configuring
    /// host calls (0: right after the plan), report progress `paused` in
    /// a loop until cancelled or killed; the crash tests kill the daemon
    /// there, at each journalled step in turn.
    #[serde(default)]
    pause_after: Option<u32>,
    /// For `plan` and `partitions`: the policy's `node-layers` and
    /// `layer-unique-files`.
    #[serde(default)]
    node_layers: bool,
    #[serde(default)]
    layer_unique_files: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum VmArg {
    Pair(String, String),
    Spec(serde_json::Value),
}

impl Input {
    /// `(vm, image)` pairs, and the specs of VMs given as specs.
    fn normalise(&mut self) -> Result<(), Error> {
        for arg in &mut self.vms {
            if let VmArg::Spec(spec) = arg {
                let name = spec["name"].as_str().unwrap_or_default().to_string();
                let image = spec["image"].as_str().unwrap_or_default().to_string();
                if name.is_empty() || image.is_empty() {
                    return Err(Error::InvalidInput("vms: a spec needs name and image".into()));
                }
                // A spec in `specs` wins: what a plugin that rewrites the
                // manager's spec would pass.
                self.specs.entry(name.clone()).or_insert_with(|| spec.to_string());
                *arg = VmArg::Pair(name, image);
            }
        }
        Ok(())
    }

    fn pairs(&self) -> Vec<(&str, &str)> {
        self.vms
            .iter()
            .filter_map(|v| match v {
                VmArg::Pair(vm, image) => Some((vm.as_str(), image.as_str())),
                VmArg::Spec(_) => None,
            })
            .collect()
    }
}

fn default_limit() -> u32 {
    100
}

struct Imager;

/// Fetches every VM's image and plans layers for them.
fn fetch_and_plan(input: &Input) -> Result<dedup::Summary, Error> {
    let pairs = input.pairs();
    for (_, image) in &pairs {
        images::fetch(image)?;
    }
    let policy = dedup::Policy {
        min_layer_bytes: input.min_layer_bytes,
        max_layers_per_vm: input.max_layers,
        share_across_paths: false,
        node_layers: input.node_layers,
        layer_unique_files: input.layer_unique_files,
    };
    dedup::plan(&pairs, policy)
}

/// Reports progress `phase` in a loop, forever: every report is a host
/// call, where a cancel takes effect.
fn wait(phase: &str) -> Result<(), Error> {
    let mut i = 0;
    loop {
        provd_sdk::progress::report(phase, i, None)?;
        i += 1;
        for _ in 0..100_000 {
            std::hint::black_box(i);
        }
    }
}

impl Plugin for Imager {
    fn provision(request: Request) -> Result<Report, Error> {
        let mut input: Input = request.input()?;
        input.normalise()?;
        if input.op == "plan" {
            let plan = fetch_and_plan(&input)?;
            let mut layers = Vec::new();
            for layer in &plan.layers {
                let entries = dedup::layer_entries(&layer.id, 0, 1000)?;
                let paths: Vec<String> = entries.into_iter().map(|e| e.path).collect();
                layers.push(serde_json::json!({"id": layer.id, "vms": layer.vms, "bytes": layer.bytes, "paths": paths}));
            }
            return Report::new("planned")
                .field("stored_bytes", plan.stored_bytes)
                .field("naive_bytes", plan.naive_bytes)
                .output(&layers);
        }
        if input.op == "partitions" {
            let plan = fetch_and_plan(&input)?;
            let pairs = input.pairs();
            let mut steps = 0;
            let mut step = |done: u32| -> Result<(), Error> {
                steps += done;
                if input.pause_after == Some(steps) {
                    wait("paused")?;
                }
                Ok(())
            };
            step(0)?;
            let shared = if plan.layers.iter().all(|l| l.partition.is_some()) {
                None
            } else {
                let s = partitions::create_shared(&plan.plan, &input.shared_format)?;
                step(1)?;
                Some(s)
            };
            let mut built = Vec::new();
            for (name, _) in &pairs {
                let private = partitions::create_private(
                    &plan.plan,
                    name,
                    shared.as_ref().map(|s| s.id.as_str()),
                    &input.private_format,
                    0,
                )?;
                step(1)?;
                if private.format == "ext4" {
                    partitions::add_file(
                        &private.id,
                        "etc/hostname",
                        format!("{name}\n").as_bytes(),
                        0o644,
                    )?;
                    step(1)?;
                }
                let item = match input.specs.get(*name) {
                    Some(spec) => {
                        let configured = vm::configure(spec, &private.id)?;
                        step(1)?;
                        serde_json::json!({
                            "vm": name, "id": private.id, "bytes": private.bytes,
                            "config_file": configured.config_file, "config": configured.config,
                            "disks": configured.disks, "macs": configured.macs,
                        })
                    }
                    None => {
                        serde_json::json!({"vm": name, "id": private.id, "bytes": private.bytes})
                    }
                };
                built.push(item);
            }
            if input.then_wait {
                wait("waiting")?;
            }
            if input.then_spin {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            return Report::new("partitioned")
                .field("shared", shared.map(|s| s.id).unwrap_or_default())
                .output(&built);
        }
        if input.op == "add-file" {
            partitions::add_file(&input.partition, "etc/motd", b"hello\n", 0o644)?;
            return Ok(Report::new("added"));
        }
        if input.op == "read-unfetched" {
            let bytes = images::read_file(&input.image, &input.path)?;
            return Ok(Report::new("read").field("size", bytes.len()));
        }
        let image = images::fetch(&input.image)?;
        let r = &image.reference;
        match input.op.as_str() {
            "fetch" => Ok(Report::new(format!("fetched {r}"))
                .field("digest", &image.digest)
                .field("entries", image.entries)
                .field("files", image.files)
                .field("bytes", image.bytes)),
            "list" => {
                let entries = images::entries(r, input.offset, input.limit)?;
                let listed: Vec<_> = entries
                    .iter()
                    .map(|e| serde_json::json!({"path": e.path, "kind": format!("{:?}", e.kind), "size": e.size, "hash": e.hash}))
                    .collect();
                Report::new(format!("{} entries", entries.len())).output(&listed)
            }
            "read" => {
                let bytes = images::read_file(r, &input.path)?;
                Ok(Report::new("read")
                    .field("size", bytes.len())
                    .field("blake3", blake3::hash(&bytes).to_hex()))
            }
            "hash-guest" | "hash-host" => {
                let start = Instant::now();
                let digest = if input.op == "hash-guest" {
                    blake3::hash(&images::read_file(r, &input.path)?).to_hex().to_string()
                } else {
                    hashing::hash_file(r, &input.path)?
                };
                Ok(Report::new(input.op.clone())
                    .field("nanos", start.elapsed().as_nanos())
                    .field("digest", digest))
            }
            other => Err(Error::InvalidInput(format!("unknown op {other:?}"))),
        }
    }
}

provd_sdk::export_plugin!(Imager);
