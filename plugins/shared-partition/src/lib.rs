//! The method of US 10,365,935 as a provd plugin.
//!
//! Input (the daemon's operation document: its `params`, with the VM specs
//! under `vms`):
//!
//! ```json
//! {"vms": [{"name": "web-1", "image": "oci://…", "hypervisor": "libvirt", …}, …],
//!  "min-layer-bytes": 1048576, "max-layers-per-vm": 16,
//!  "shared-format": "erofs", "private-format": "ext4", "private-size-bytes": 0,
//!  "share-across-paths": false, "node-layers": true, "layer-unique-files": true,
//!  "hypervisor": "libvirt", "shared-attach": "pmem"}
//! ```
//!
//! Every parameter but `vms` is optional. Steps, each reported as progress:
//!
//! 1. `fetch-images`: every distinct image of the VMs, through the host;
//! 2. `plan`: the host plans each VM against the layers the node already
//!    holds (`node-layers`): it stacks those giving it enough of its files
//!    exactly as its image has them; of the rest, files several VMs of the
//!    request share form new layers, and with `layer-unique-files` each
//!    VM's remaining files form a layer of their own, so that the next VM
//!    of its image, arriving alone, stores nothing again;
//! 3. `shared-partition`: one new shared partition holding the new layers,
//!    built by the host (skipped when the plan builds none);
//!
//! Steps 2 and 3 run once per tenant of the request's VMs (a spec's
//! `tenant`, `default` when absent): a plan's layers belong to one trust
//! domain, and a VM stacks only public layers and its own tenant's;
//! 4. `private-partitions`: per VM, a private partition with only its own
//!    files, whiteouts for what its layers hold that its image lacks, and
//!    what its guest needs to stack its layers (the host builds them side
//!    by side);
//! 5. `configure-vms`: per VM, its hypervisor configuration with the
//!    private partition as root disk and every shared partition its layers
//!    are on attached read-only (the host configures them side by side):
//!    as persistent memory the guest maps with DAX (`shared-attach`
//!    `pmem`, the node's default for kernel-booted VMs) where the partition is uncompressed
//!    EROFS, the hypervisor maps it and the node's policy allows it, as a
//!    read-only disk otherwise (the lz4 formats always: the kernel maps
//!    no compressed file with DAX); each VM's report says which;
//!
//! then a report: per layer its VMs, files, bytes and where it is; per VM
//! the bytes its image takes from layers already on the node, from new
//! shared layers and from its private partition; totals naive against
//! stored anew, and the saving.
//!
//! Existing VMs and their partitions are never modified: a request only
//! adds partitions and VMs, and a shared partition stays as long as a VM
//! stacks one of its layers. If anything fails, the host rolls back every
//! partition and VM this request built.

use std::collections::BTreeMap;

use provd_sdk::{Error, Plugin, Report, Request, dedup, images, log, partitions, progress, vm};
use serde::{Deserialize, Serialize};

/// VMs one request may provision (the host's own bound is 64).
const MAX_VMS: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Input {
    vms: Vec<serde_json::Value>,
    #[serde(default = "default_min_layer_bytes")]
    min_layer_bytes: u64,
    #[serde(default = "default_max_layers")]
    max_layers_per_vm: u32,
    #[serde(default = "default_shared_format")]
    shared_format: String,
    #[serde(default = "default_private_format")]
    private_format: String,
    #[serde(default)]
    private_size_bytes: u64,
    #[serde(default)]
    share_across_paths: bool,
    #[serde(default = "yes")]
    node_layers: bool,
    #[serde(default = "yes")]
    layer_unique_files: bool,
    /// Every VM's hypervisor: set where a spec has none, refused where a
    /// spec names another.
    #[serde(default)]
    hypervisor: Option<String>,
    /// Every VM's `shared-attach` (`pmem` or `block`): set where a spec
    /// has none, refused where a spec names another.
    #[serde(default)]
    shared_attach: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_min_layer_bytes() -> u64 {
    // A layer smaller than this costs the guest an overlay layer for little.
    64 << 10
}
fn default_max_layers() -> u32 {
    16
}
fn default_shared_format() -> String {
    "erofs".into()
}
fn default_private_format() -> String {
    "ext4".into()
}

/// One VM of the request.
struct Vm {
    name: String,
    image: String,
    /// Its spec's tenant, or `default`.
    tenant: String,
    spec: serde_json::Value,
}

#[derive(Serialize)]
struct LayerReport {
    id: String,
    vms: Vec<String>,
    files: u64,
    bytes: u64,
    /// The shared partition holding it: one the node already had, or the
    /// one this request built.
    partition: Option<String>,
    /// Whether the node already held it.
    on_node: bool,
    /// `public` or `tenant:<name>`: whose VMs may stack it.
    domain: String,
}

#[derive(Serialize)]
struct VmReport {
    name: String,
    tenant: String,
    image: String,
    /// Bytes of the VM's image.
    image_bytes: u64,
    /// Of those, bytes that layers already on the node give.
    node_layer_bytes: u64,
    /// Bytes that the layers this request built give.
    new_shared_bytes: u64,
    /// Bytes left to its private partition by the plan.
    private_bytes: u64,
    /// Paths its private partition hides from its layers.
    whiteouts: u64,
    layers: Vec<String>,
    private_partition: String,
    /// The private partition's size on the node's disk.
    private_partition_bytes: u64,
    hypervisor: String,
    config_file: String,
    macs: Vec<String>,
    disks: Vec<String>,
    /// How each of its shared partitions reaches the guest, in order:
    /// `pmem` (mapped with DAX), `block` or `block-direct` (a disk read
    /// past the host's page cache: the public catalogue's, across tenants).
    shared_attach: Vec<String>,
}

#[derive(Serialize)]
struct Totals {
    /// Every VM's image as its own copy.
    naive_bytes: u64,
    /// What this request stores anew: its new layers once, each VM's own
    /// files.
    stored_bytes: u64,
    /// Bytes of the VMs' images that layers already on the node give.
    node_layer_bytes: u64,
    saving_bytes: u64,
    /// Bytes on the node's disk: the shared partition and the private ones.
    shared_partition_bytes: u64,
    private_partitions_bytes: u64,
}

#[derive(Serialize)]
struct Output {
    /// The shared partitions this request built: one per tenant whose plan
    /// builds new layers.
    shared_partitions: Vec<String>,
    layers: Vec<LayerReport>,
    vms: Vec<VmReport>,
    totals: Totals,
}

fn vms_of(input: &Input) -> Result<Vec<Vm>, Error> {
    if input.vms.is_empty() {
        return Err(Error::InvalidInput("vms: give at least one VM spec".into()));
    }
    if input.vms.len() > MAX_VMS {
        return Err(Error::InvalidInput(format!("vms: at most {MAX_VMS} per request")));
    }
    let mut out = Vec::new();
    for (i, spec) in input.vms.iter().enumerate() {
        let text = |key: &str| spec.get(key).and_then(|v| v.as_str()).map(str::to_string);
        let name =
            text("name").ok_or_else(|| Error::InvalidInput(format!("vms[{i}].name: missing")))?;
        let image =
            text("image").ok_or_else(|| Error::InvalidInput(format!("vms[{i}].image: missing")))?;
        if out.iter().any(|v: &Vm| v.name == name) {
            return Err(Error::InvalidInput(format!("vms[{i}]: VM {name:?} appears twice")));
        }
        let mut spec = spec.clone();
        for (key, value) in
            [("hypervisor", &input.hypervisor), ("shared-attach", &input.shared_attach)]
        {
            let Some(h) = value else { continue };
            match text(key) {
                Some(own) if own != *h => {
                    return Err(Error::InvalidInput(format!(
                        "vms[{i}].{key}: {own:?}, but the request's {key} is {h:?}"
                    )));
                }
                Some(_) => {}
                None => {
                    if let Some(obj) = spec.as_object_mut() {
                        obj.insert(key.into(), serde_json::Value::String(h.clone()));
                    }
                }
            }
        }
        let tenant = text("tenant").unwrap_or_else(|| "default".into());
        out.push(Vm { name, image, tenant, spec });
    }
    Ok(out)
}

struct SharedPartition;

/// One tenant's VMs (indices into the request's), planned and built
/// together: a plan's layers belong to one trust domain, so VMs of
/// different tenants are planned apart (the host refuses a plan that mixes
/// them over images that are not all public).
struct Group {
    vms: Vec<usize>,
    plan: dedup::Summary,
    shared: Option<partitions::Partition>,
}

impl Plugin for SharedPartition {
    fn provision(request: Request) -> Result<Report, Error> {
        let input: Input = request.input()?;
        let vms = vms_of(&input)?;
        let n = vms.len() as u64;

        // 1. Images, each once.
        let mut distinct: Vec<&str> = vms.iter().map(|v| v.image.as_str()).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let total = distinct.len() as u64;
        progress::report("fetch-images", 0, Some(total))?;
        let mut image_bytes = BTreeMap::new();
        for (i, reference) in distinct.iter().enumerate() {
            let image = images::fetch(reference)?;
            log::info("image fetched", &[("reference", &image.reference), ("bytes", &image.bytes)]);
            image_bytes.insert(reference.to_string(), image.bytes);
            progress::report("fetch-images", i as u64 + 1, Some(total))?;
        }

        // 2. What the images share, and the layers: one plan per tenant.
        let mut tenants: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, v) in vms.iter().enumerate() {
            match tenants.iter_mut().find(|(t, _)| *t == v.tenant) {
                Some((_, members)) => members.push(i),
                None => tenants.push((v.tenant.as_str(), vec![i])),
            }
        }
        let plans = tenants.len() as u64;
        progress::report("plan", 0, Some(plans))?;
        let policy = dedup::Policy {
            min_layer_bytes: input.min_layer_bytes,
            max_layers_per_vm: input.max_layers_per_vm,
            share_across_paths: input.share_across_paths,
            node_layers: input.node_layers,
            layer_unique_files: input.layer_unique_files,
        };
        let mut groups = Vec::new();
        for (k, (tenant, members)) in tenants.into_iter().enumerate() {
            let pairs: Vec<(&str, &str)> = members
                .iter()
                .filter_map(|i| vms.get(*i))
                .map(|v| (v.name.as_str(), v.image.as_str()))
                .collect();
            let plan = dedup::plan(&pairs, policy)?;
            log::info(
                "plan",
                &[
                    ("tenant", &tenant),
                    ("layers", &plan.layers.len()),
                    ("naive_bytes", &plan.naive_bytes),
                    ("stored_bytes", &plan.stored_bytes),
                ],
            );
            progress::report("plan", k as u64 + 1, Some(plans))?;
            groups.push(Group { vms: members, plan, shared: None });
        }
        let new_layers = |g: &Group| g.plan.layers.iter().filter(|l| l.partition.is_none()).count();

        // 3. A new shared partition per plan for the layers the node lacks.
        let building = groups.iter().filter(|g| new_layers(g) > 0).count() as u64;
        if building == 0 {
            log::info("no new layer: no new shared partition", &[]);
        } else {
            progress::report("shared-partition", 0, Some(building))?;
            let mut built = 0;
            for g in groups.iter_mut().filter(|g| new_layers(g) > 0) {
                g.shared = Some(partitions::create_shared(&g.plan.plan, &input.shared_format)?);
                built += 1;
                progress::report("shared-partition", built, Some(building))?;
            }
        }

        // 4. A private partition per VM, built side by side by the host.
        progress::report("private-partitions", 0, Some(n))?;
        let mut privates: Vec<Option<partitions::Partition>> = vms.iter().map(|_| None).collect();
        for g in &groups {
            let names: Vec<&str> =
                g.vms.iter().filter_map(|i| vms.get(*i)).map(|v| v.name.as_str()).collect();
            let built = partitions::create_privates(
                &g.plan.plan,
                &names,
                g.shared.as_ref().map(|s| s.id.as_str()),
                &input.private_format,
                input.private_size_bytes,
            )?;
            for (i, p) in g.vms.iter().zip(built) {
                if let Some(slot) = privates.get_mut(*i) {
                    *slot = Some(p);
                }
            }
        }
        let privates: Vec<partitions::Partition> = privates.into_iter().flatten().collect();
        if privates.len() != vms.len() {
            return Err(Error::Failed("the host built fewer private partitions than asked".into()));
        }
        progress::report("private-partitions", n, Some(n))?;

        // 5. Each VM configured on its partitions, side by side by the host.
        progress::report("configure-vms", 0, Some(n))?;
        let specs: Vec<String> = vms.iter().map(|v| v.spec.to_string()).collect();
        let pairs: Vec<(&str, &str)> =
            specs.iter().zip(&privates).map(|(s, p)| (s.as_str(), p.id.as_str())).collect();
        let configured = vm::configure_all(&pairs)?;
        progress::report("configure-vms", n, Some(n))?;
        let mut reports = Vec::new();
        for (i, ((v, private), configured)) in vms.iter().zip(&privates).zip(configured).enumerate()
        {
            let figures = groups
                .iter()
                .find(|g| g.vms.contains(&i))
                .and_then(|g| g.plan.vms.iter().find(|f| f.vm == v.name));
            reports.push(VmReport {
                name: v.name.clone(),
                tenant: v.tenant.clone(),
                image: v.image.clone(),
                image_bytes: figures.map(|f| f.bytes).unwrap_or(0),
                node_layer_bytes: figures.map(|f| f.node_bytes).unwrap_or(0),
                new_shared_bytes: figures.map(|f| f.new_shared_bytes).unwrap_or(0),
                private_bytes: figures.map(|f| f.private_bytes).unwrap_or(0),
                whiteouts: figures.map(|f| f.whiteouts).unwrap_or(0),
                layers: figures.map(|f| f.layers.clone()).unwrap_or_default(),
                private_partition: private.id.clone(),
                private_partition_bytes: private.bytes,
                hypervisor: configured.hypervisor,
                config_file: configured.config_file,
                macs: configured.macs,
                shared_attach: configured
                    .disks
                    .iter()
                    .filter_map(|d| d.strip_prefix("shared:"))
                    .filter_map(|d| d.split(':').nth(1))
                    .map(str::to_string)
                    .collect(),
                disks: configured.disks,
            });
        }

        let attached = |how: &str| {
            reports.iter().flat_map(|r| &r.shared_attach).filter(|a| a.as_str() == how).count()
        };
        let (pmem, block, direct) = (attached("pmem"), attached("block"), attached("block-direct"));
        if block > 0 && input.shared_format != "erofs" {
            log::info(
                "shared partitions attached as disks",
                &[
                    ("format", &input.shared_format),
                    ("why", &"only uncompressed erofs is mapped with DAX"),
                ],
            );
        }
        let naive_bytes: u64 = groups.iter().map(|g| g.plan.naive_bytes).sum();
        let stored_bytes: u64 = groups.iter().map(|g| g.plan.stored_bytes).sum();
        let totals = Totals {
            naive_bytes,
            stored_bytes,
            node_layer_bytes: groups.iter().flat_map(|g| &g.plan.vms).map(|f| f.node_bytes).sum(),
            saving_bytes: naive_bytes.saturating_sub(stored_bytes),
            shared_partition_bytes: groups
                .iter()
                .filter_map(|g| g.shared.as_ref())
                .map(|s| s.bytes)
                .sum(),
            private_partitions_bytes: privates.iter().map(|p| p.bytes).sum(),
        };
        let percent = if totals.naive_bytes == 0 {
            0.0
        } else {
            totals.saving_bytes as f64 * 100.0 / totals.naive_bytes as f64
        };
        let all_layers: usize = groups.iter().map(|g| g.plan.layers.len()).sum();
        let all_new: usize = groups.iter().map(new_layers).sum();
        let summary = format!(
            "{n} VMs provisioned: {} of {} bytes stored, {:.1} % saved ({} from layers already on the node), {} new layer(s), {} from the node",
            totals.stored_bytes,
            totals.naive_bytes,
            percent,
            totals.node_layer_bytes,
            all_new,
            all_layers - all_new
        );
        let output = Output {
            shared_partitions: groups
                .iter()
                .filter_map(|g| g.shared.as_ref())
                .map(|s| s.id.clone())
                .collect(),
            layers: groups
                .iter()
                .flat_map(|g| {
                    g.plan.layers.iter().map(|l| LayerReport {
                        id: l.id.clone(),
                        vms: l.vms.clone(),
                        files: l.files,
                        bytes: l.bytes,
                        on_node: l.partition.is_some(),
                        domain: l.domain.clone(),
                        partition: l
                            .partition
                            .clone()
                            .or_else(|| g.shared.as_ref().map(|s| s.id.clone())),
                    })
                })
                .collect(),
            vms: reports,
            totals,
        };
        Report::new(summary)
            .field("vms", n)
            .field("layers", all_layers)
            .field("new-layers", all_new)
            .field("node-layer-bytes", output.totals.node_layer_bytes)
            .field("naive-bytes", output.totals.naive_bytes)
            .field("stored-bytes", output.totals.stored_bytes)
            .field("saving-bytes", output.totals.saving_bytes)
            .field("saving-percent", format!("{percent:.1}"))
            .field("shared-partitions", output.shared_partitions.join(","))
            .field("shared-attach", format!("pmem={pmem} block={block} block-direct={direct}"))
            .output(&output)
    }
}

provd_sdk::export_plugin!(SharedPartition);
