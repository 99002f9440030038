//! `provctl place`: asks every node what it holds and has free, and
//! chooses a node for each VM (`provd-placement`); `provctl
//! provision --place` then provisions each node's VMs there.
//!
//! The manager keeps no state of its own: every decision is made from what
//! the nodes answer in this run (`GET /v1/capacity`, `GET /v1/layers` and
//! each layer's entries) and from the images' files, which the manager
//! reads once per image (a `dir:` tree where it is; any other source
//! fetched into a scratch store that is removed afterwards).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use provd_client::{Client, ClientError, TlsFiles};
use provd_placement::{Decision, File, Image, Node, Policy, Resources, Vm, place};
use provd_wire as wire;
use serde_json::{Value, json};

/// Most layer entries read from one node: a bound on what a node can make
/// the manager hold.
const MAX_ENTRIES_PER_NODE: usize = 4_000_000;
/// Layers read from one node.
const MAX_LAYERS_PER_NODE: usize = 10_000;
/// Longest entry path a node may answer (provd's own limit).
const MAX_PATH_BYTES: usize = 4096;
/// Disk a VM takes whatever the node holds, besides its data disks: its
/// private partition's directories, whiteouts and free room, as provd
/// reserves it (256 MiB of room at least).
const PRIVATE_ALLOWANCE: u64 = 320 << 20;

/// How to choose, and how long each node has to answer.
#[derive(Debug, Clone)]
pub struct Options {
    pub policy: Policy,
    pub timeout: Duration,
}

/// What placement found: a decision per VM, the nodes skipped.
#[derive(Debug)]
pub struct Placement {
    pub decisions: Vec<Decision>,
    /// Nodes that did not answer in time or answered wrongly: (node, why).
    pub skipped: Vec<(String, String)>,
    pub policy: Policy,
}

impl Placement {
    /// The specs to send to each node, in the order given.
    pub fn by_node(&self, specs: &[Value]) -> BTreeMap<String, Vec<Value>> {
        let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for (d, spec) in self.decisions.iter().zip(specs) {
            if let Some(node) = &d.node {
                out.entry(node.clone()).or_default().push(spec.clone());
            }
        }
        out
    }

    pub fn unplaced(&self) -> Vec<&Decision> {
        self.decisions.iter().filter(|d| d.node.is_none()).collect()
    }

    pub fn to_json(&self, explain: bool) -> Value {
        let decisions: Vec<Value> = self
            .decisions
            .iter()
            .map(|d| {
                let mut v = json!({"vm": d.vm, "image": d.image, "node": d.node,
                                   "new-bytes": d.new_bytes});
                if explain && let Some(m) = v.as_object_mut() {
                    let scores: Vec<Value> = d
                        .scores
                        .iter()
                        .map(|s| {
                            json!({"node": s.node, "new-bytes": s.new_bytes,
                                   "fits": s.unfit.is_none(), "why-not": s.unfit,
                                   "free": {"vcpus": s.free.vcpus, "memory-mib": s.free.memory_mib,
                                            "disk-bytes": s.free.disk_bytes}})
                        })
                        .collect();
                    m.insert("scores".into(), Value::Array(scores));
                }
                v
            })
            .collect();
        let skipped: Vec<Value> =
            self.skipped.iter().map(|(n, why)| json!({"node": n, "error": why})).collect();
        json!({"policy": self.policy.as_str(), "placements": decisions, "skipped": skipped})
    }

    pub fn describe(&self, explain: bool) -> String {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let mut out = String::new();
        for d in &self.decisions {
            match &d.node {
                Some(n) => out.push_str(&format!(
                    "{} ({}) -> {n}, adds {:.1} MiB\n",
                    d.vm,
                    d.image,
                    mib(d.new_bytes)
                )),
                None => out.push_str(&format!("{} ({}) fits no node\n", d.vm, d.image)),
            }
            if explain {
                for s in &d.scores {
                    match &s.unfit {
                        None => out.push_str(&format!(
                            "    {}: adds {:.1} MiB; free {} vCPUs, {} MiB, {:.1} GiB\n",
                            s.node,
                            mib(s.new_bytes),
                            s.free.vcpus,
                            s.free.memory_mib,
                            s.free.disk_bytes as f64 / (1u64 << 30) as f64
                        )),
                        Some(why) => {
                            out.push_str(&format!("    {}: does not fit: {why}\n", s.node))
                        }
                    }
                }
            }
        }
        for (n, why) in &self.skipped {
            out.push_str(&format!("skipped {n}: {why}\n"));
        }
        out
    }
}

fn digest_of(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// What one node holds and has free, read page by page.
async fn survey(c: &Client) -> Result<Node, String> {
    let err = |e: ClientError| e.to_string();
    let cap: wire::Capacity = c.get("/v1/capacity").await.and_then(|a| a.decode()).map_err(err)?;
    let free = Resources {
        vcpus: cap.vcpus.free,
        memory_mib: cap.memory_mib.free,
        disk_bytes: cap.disk_bytes.free,
    };
    // (partition, layer, trust domain)
    let mut layers: Vec<(String, String, String)> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/v1/layers?limit=500&after={}", provd_client::encode(a)),
            None => "/v1/layers?limit=500".to_string(),
        };
        let page: wire::LayerPage = c.get(&path).await.and_then(|a| a.decode()).map_err(err)?;
        let listed = page.layers.len();
        if listed > 500 {
            return Err(format!("a page of {listed} layers, past the 500 asked for"));
        }
        for l in page.layers {
            let (p, n, d) = (l.partition, l.layer, l.domain);
            if !provd_domain::trust::valid_domain(&d) {
                return Err(format!(
                    "layer {p}/{n}: domain {d:?} is neither public nor tenant:<name>"
                ));
            }
            layers.push((p, n, d));
        }
        if layers.len() > MAX_LAYERS_PER_NODE {
            return Err(format!("more than {MAX_LAYERS_PER_NODE} layers"));
        }
        match page.next {
            Some(next) if after.as_deref() != Some(next.as_str()) => after = Some(next),
            _ => break,
        }
    }
    let mut held: HashMap<String, HashSet<(String, [u8; 32])>> = HashMap::new();
    let mut read = 0usize;
    for (partition, layer, domain) in &layers {
        let mut offset = 0u64;
        loop {
            let path = format!(
                "/v1/layers/{}/{}/entries?limit=5000&after={offset}",
                provd_client::encode(partition),
                provd_client::encode(layer)
            );
            let page: wire::EntryPage = c.get(&path).await.and_then(|a| a.decode()).map_err(err)?;
            let entries = page.entries;
            if entries.len() > 5000 {
                return Err(format!(
                    "a page of {} entries, past the 5000 asked for",
                    entries.len()
                ));
            }
            read += entries.len();
            if read > MAX_ENTRIES_PER_NODE {
                return Err(format!("more than {MAX_ENTRIES_PER_NODE} layer entries"));
            }
            for e in entries {
                match digest_of(&e.blake3) {
                    Some(d) if e.path.len() <= MAX_PATH_BYTES => {
                        held.entry(domain.clone()).or_default().insert((e.path, d));
                    }
                    _ => {
                        return Err(
                            "an entry without a path of at most 4096 bytes and a BLAKE3 digest"
                                .into(),
                        );
                    }
                }
            }
            match page.next {
                Some(next) if next > offset => offset = next,
                _ => break,
            }
        }
    }
    Ok(Node { name: c.base().to_string(), free, held })
}

/// The files of an image, read once by the manager: a `dir:` tree is
/// walked and hashed where it is; any other reference (`tar:`, HTTP(S),
/// OCI) is imported as a node would import it, into a store in a temporary
/// directory removed afterwards, so the paths are normalised exactly as
/// the nodes normalise them.
async fn image_files(reference: &str) -> Result<Image> {
    let files: Vec<File> = if let Some(dir) = reference.strip_prefix("dir:") {
        provd_scan::file_digests(&PathBuf::from(dir), 4)
            .with_context(|| format!("reading the files of {reference}"))?
            .into_iter()
            .map(|f| File { path: f.path, size: f.size, digest: f.digest })
            .collect()
    } else {
        let scratch = tempfile::tempdir().context("making a scratch directory")?;
        let store = std::sync::Arc::new(
            provd_store::Store::open(&scratch.path().join("data"))
                .context("opening a scratch store")?,
        );
        let images =
            provd_images::Images::new(store.clone(), provd_images::ImportLimits::default(), 2);
        let image = images
            .import(reference, std::sync::Arc::new(provd_images::NoProgress))
            .await
            .with_context(|| format!("fetching {reference} to read its files"))?;
        store
            .entries(&image, 0, u64::MAX)?
            .into_iter()
            .filter(|e| e.size > 0)
            .filter_map(|e| e.hash.map(|h| File { path: e.path, size: e.size, digest: h.0 }))
            .collect()
    };
    Ok(Image { reference: reference.to_string(), files })
}

/// The VMs of `specs` and their images, each image read once.
pub async fn vms_of(specs: &[Value]) -> Result<(Vec<Vm>, Vec<Image>)> {
    let mut images: Vec<Image> = Vec::new();
    let mut vms = Vec::with_capacity(specs.len());
    for spec in specs {
        let name = spec.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
        let reference = spec
            .get("image")
            .and_then(Value::as_str)
            .with_context(|| format!("VM {name:?} names no image"))?;
        let image = match images.iter().position(|i| i.reference == reference) {
            Some(i) => i,
            None => {
                images.push(image_files(reference).await?);
                images.len() - 1
            }
        };
        let data: u64 = spec
            .get("disks")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|d| d.get("size-gib").and_then(Value::as_u64))
            .map(|g| g.saturating_mul(1 << 30))
            .sum();
        let tenant = spec.get("tenant").and_then(Value::as_str).unwrap_or("default").to_string();
        vms.push(Vm {
            name,
            tenant,
            image,
            vcpus: spec.get("vcpus").and_then(Value::as_u64).unwrap_or(1),
            memory_mib: spec.get("memory-mib").and_then(Value::as_u64).unwrap_or(0),
            disk_bytes: PRIVATE_ALLOWANCE.saturating_add(data),
        });
    }
    Ok((vms, images))
}

/// Asks every node at once (each bounded by the timeout), then places.
pub async fn run(
    nodes: &[String],
    tls: &TlsFiles,
    specs: &[Value],
    options: &Options,
) -> Result<Placement> {
    let (vms, images) = vms_of(specs).await?;
    let answers = futures::future::join_all(nodes.iter().map(|url| async move {
        let answer = match Client::new(url, tls) {
            Ok(c) => match tokio::time::timeout(options.timeout, survey(&c)).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {} s", options.timeout.as_secs())),
            },
            Err(e) => Err(e.to_string()),
        };
        (url.clone(), answer)
    }))
    .await;
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    for (url, answer) in answers {
        match answer {
            Ok(mut n) => {
                n.name = url;
                found.push(n);
            }
            Err(why) => skipped.push((url, why)),
        }
    }
    if found.is_empty() {
        bail!("no node answered: {skipped:?}");
    }
    let decisions = place(&vms, &images, &mut found, options.policy);
    Ok(Placement { decisions, skipped, policy: options.policy })
}

/// The idempotency key for one node's share of a placed request: the
/// caller's key and the node, so that a retry of the same request reaches
/// the same operation on every node.
pub fn key_for(key: &str, node: &str) -> String {
    let h = blake3::hash(node.as_bytes()).to_hex();
    format!("{key}.{}", h.get(..12).unwrap_or_default())
}
