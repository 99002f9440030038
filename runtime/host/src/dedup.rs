//! `provd:plugin/dedup`: the sharing analysis and layer plans, computed
//! from the manifests of images fetched in this request.

use provd_bindings::dedup::{self as wit, Layer, Policy, Summary, VmFigures, VmImage};
use provd_bindings::images::Entry as WitEntry;
use provd_bindings::types::Error as WitError;
use provd_domain::image::Entry;

use provd_engine::CallContext;
use provd_store::ImageRecord;

use crate::images::{check_page, entry_of};
use crate::{Scope, plan_cache};
use provd_partitions::CheckedPlan;

/// `dedup`'s view of a call: the call's context, the node's scope, the
/// images this request fetched (read) and the plans it keeps.
pub(crate) struct DedupView<'a> {
    pub ctx: &'a mut CallContext,
    pub scope: &'a Scope,
    pub fetched: &'a std::collections::HashMap<String, ImageRecord>,
    pub plans: &'a mut Vec<KeptPlan>,
}

pub(crate) struct DedupData;

impl wasmtime::component::HasData for DedupData {
    type Data<'a> = DedupView<'a>;
}

/// A plan made in this request, with what the partition builder needs.
pub(crate) struct KeptPlan {
    /// `plan-N`, the id the plugin names it by.
    pub id: String,
    /// Checked when made, with its VMs' images.
    pub plan: std::sync::Arc<CheckedPlan>,
    /// `plan.held_bytes()`, counted once when it is kept.
    pub held_bytes: u64,
    /// The trust domain of the layers it builds (`provd_domain::trust`).
    pub domain: String,
}

/// VMs one call may analyse.
pub(crate) const MAX_VMS: usize = 64;
/// Plans one request may keep.
pub(crate) const MAX_PLANS: usize = 16;
/// Host memory the plans one request keeps may hold together (entries and
/// paths, `Plan::held_bytes`): with the default 16 operations running at
/// once, 4 GiB at worst on the node. A Debian root is ~40 000 entries, a
/// few MiB in a plan.
pub(crate) const MAX_KEPT_PLAN_BYTES: u64 = 256 << 20;
/// Entries one call may analyse, summed over its VMs. Each entry costs the
/// host a few hundred bytes while the analysis runs; a plugin listing the
/// same large image for many VMs must not make that unbounded.
pub(crate) const MAX_ANALYSED_ENTRIES: u64 = 8_000_000;

impl DedupView<'_> {
    /// The image each of `vms` runs, each fetched in this request.
    fn vm_images(&self, vms: &[VmImage]) -> Result<Vec<ImageRecord>, WitError> {
        vms.iter().map(|v| crate::fetched_image(self.fetched, &v.image)).collect()
    }

    /// The images of `vms`, each fetched in this request, once their names
    /// and their entries in all are within bounds.
    fn checked_vms(&self, vms: &[VmImage]) -> Result<Vec<ImageRecord>, WitError> {
        if vms.len() > MAX_VMS {
            return Err(WitError::InvalidInput(format!("at most {MAX_VMS} VMs per call")));
        }
        // A plan's VM names become partition manifests and later name VMs:
        // only names a VM can have are taken.
        for (i, v) in vms.iter().enumerate() {
            provd_vm::spec::check_dns_label(&v.vm)
                .map_err(|e| WitError::InvalidInput(format!("vms[{i}].vm: {e}")))?;
            self.scope.operation_vm(&v.vm)?;
        }
        if self.scope.node.images.is_none() {
            return Err(WitError::Denied("this node has no image store".into()));
        }
        let records = self.vm_images(vms)?;
        let total: u64 = records.iter().map(|r| r.entries).sum();
        if total > MAX_ANALYSED_ENTRIES {
            return Err(WitError::QuotaExceeded(format!(
                "{total} entries over these VMs; one call analyses at most {MAX_ANALYSED_ENTRIES}"
            )));
        }
        Ok(records)
    }

    /// Every VM's entries, from images fetched in this request, read on a
    /// blocking thread: an analysis may load millions of rows.
    async fn vm_entries(
        &mut self,
        vms: &[VmImage],
    ) -> wasmtime::Result<Result<Vec<(String, Vec<Entry>)>, WitError>> {
        let records = match self.checked_vms(vms) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let store = match self.scope.store() {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        load_entries(store, vms, records).await
    }
}

/// The entries of each VM's image, read on a blocking thread.
async fn load_entries(
    store: std::sync::Arc<provd_store::Store>,
    vms: &[VmImage],
    records: Vec<ImageRecord>,
) -> wasmtime::Result<Result<Vec<(String, Vec<Entry>)>, WitError>> {
    let names: Vec<String> = vms.iter().map(|v| v.vm.clone()).collect();
    let loaded = provd_engine::spawn_blocking(move || {
        // Several VMs often run one image: read its entries once.
        let mut loaded: std::collections::HashMap<i64, Vec<Entry>> = Default::default();
        let mut out = Vec::with_capacity(names.len());
        for (vm, record) in names.into_iter().zip(&records) {
            let entries = match loaded.entry(record.id) {
                std::collections::hash_map::Entry::Occupied(e) => e.get().clone(),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    let entries = store
                        .entries(record, 0, u64::MAX)
                        .map_err(|e| WitError::Failed(e.to_string()))?;
                    slot.insert(entries).clone()
                }
            };
            out.push((vm, entries));
        }
        Ok(out)
    })
    .await?;
    Ok(loaded)
}

impl DedupView<'_> {
    /// The trust domain of the layers a plan of `vms` builds, and the VMs'
    /// tenants: `public` when every VM runs an image of the public
    /// catalogue, else the one tenant's domain all of them belong to. A
    /// plan mixing tenants over images that are not all public is refused:
    /// its layers would hold one tenant's files for another's VMs.
    fn plan_domain(
        &self,
        vms: &[VmImage],
    ) -> Result<(String, std::collections::BTreeSet<String>), WitError> {
        let mut tenants = std::collections::BTreeSet::new();
        let mut all_public = true;
        for v in vms {
            tenants.insert(self.scope.vm_tenant(&v.vm));
            let image = crate::fetched_image(self.fetched, &v.image)?;
            let public = provd_domain::trust::is_public_image(
                &self.scope.node.public_images,
                &image.reference,
            );
            // A VM gets the files of the image its manager's spec names, or
            // of the public catalogue: never another tenant's image.
            if let Some(named) = self.scope.spec_image(&v.vm)
                && named != image.reference
                && !public
            {
                return Err(WitError::Denied(format!(
                    "VM {:?} runs {named} in its operation; a plan gives it that image's \
                     files or the public catalogue's, not {}",
                    v.vm, image.reference
                )));
            }
            all_public &= public;
        }
        if all_public {
            return Ok((provd_domain::trust::PUBLIC.to_string(), tenants));
        }
        match tenants.first() {
            Some(one) if tenants.len() == 1 => {
                Ok((provd_domain::trust::tenant_domain(one), tenants.clone()))
            }
            _ => Err(WitError::InvalidInput(format!(
                "these VMs belong to tenants {} and not all of them run images of the public \
                 catalogue: a plan's layers are of one trust domain; plan each tenant's VMs \
                 separately",
                tenants.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

fn analysis_summary(a: &provd_dedup::Analysis) -> Summary {
    Summary {
        plan: String::new(),
        naive_bytes: a.naive_bytes,
        distinct_content_bytes: a.distinct_content_bytes,
        shared_once_bytes: a.shared_once_bytes,
        shared_as_copies_bytes: a.shared_as_copies_bytes,
        layers: a
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| Layer {
                id: format!("candidate-{i}"),
                vms: l.vms.clone(),
                files: l.files,
                bytes: l.bytes,
                partition: None,
                domain: String::new(),
            })
            .collect(),
        vms: a
            .per_vm
            .iter()
            .map(|f| VmFigures {
                vm: f.vm.clone(),
                bytes: f.bytes,
                shared_bytes: f.shared_bytes,
                private_bytes: 0,
                layers: Vec::new(),
                node_bytes: 0,
                new_shared_bytes: 0,
                whiteouts: 0,
            })
            .collect(),
        stored_bytes: 0,
    }
}

/// A new plan of `vms` against the node layers `considered`, checked,
/// without the node layers' entries, and the analysis's figures.
async fn make_plan(
    vms: &[VmImage],
    records: Vec<ImageRecord>,
    considered: Vec<provd_store::LayerRecord>,
    policy: provd_dedup::Policy,
    store: std::sync::Arc<provd_store::Store>,
) -> wasmtime::Result<Result<(CheckedPlan, Summary), WitError>> {
    let entries = match load_entries(store.clone(), vms, records.clone()).await? {
        Ok(e) => e,
        Err(e) => return Ok(Err(e)),
    };
    let vm_images: Vec<provd_partitions::VmImage> = vms
        .iter()
        .zip(records)
        .map(|(v, image)| provd_partitions::VmImage { vm: v.vm.clone(), image })
        .collect();
    let made = provd_engine::spawn_blocking(move || {
        let node = considered
            .into_iter()
            .map(|r| provd_partitions::node_layer(&store, r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| WitError::Failed(e.to_string()))?;
        // The analysis's figures only, so that it is gone before the
        // plan, which holds the entries again, is made.
        let invalid = |e: provd_dedup::DedupError| WitError::InvalidInput(e.to_string());
        let figures = analysis_summary(&provd_dedup::analyze(&entries).map_err(invalid)?);
        let plan = provd_dedup::plan_on_node(&entries, &node, &policy).map_err(invalid)?;
        drop((entries, node));
        // Proved once, here: every partition built from it relies on it.
        let plan =
            CheckedPlan::check(&store, plan, vm_images).map_err(crate::partitions::wit_error)?;
        Ok((plan.without_node_entries(), figures))
    })
    .await?;
    Ok(made)
}

/// What the plugin learns of plan `id`: the analysis's `figures`, the
/// plan's layers (ids prefixed with the plan's, unique in the request) and
/// where each VM's bytes come from.
fn plan_summary(id: &str, figures: Summary, plan: &provd_dedup::Plan, domain: &str) -> Summary {
    let prefix = format!("{id}-");
    let mut summary = figures;
    summary.stored_bytes = plan.stored_bytes;
    summary.plan = id.to_string();
    summary.layers = plan
        .layers
        .iter()
        .map(|l| Layer {
            id: format!("{prefix}{}", l.id),
            vms: l.vms.clone(),
            files: l.files,
            bytes: l.bytes,
            partition: l.node.as_ref().map(|n| n.partition.clone()),
            domain: l.node.as_ref().map_or_else(|| domain.to_string(), |n| n.domain.clone()),
        })
        .collect();
    for f in summary.vms.iter_mut() {
        let share = plan.shares.get(&f.vm).cloned().unwrap_or_default();
        f.private_bytes = share.private_bytes;
        f.node_bytes = share.node_bytes;
        f.new_shared_bytes = share.new_shared_bytes;
        f.whiteouts = share.whiteouts;
        f.layers = plan
            .stacks
            .get(&f.vm)
            .map(|s| s.iter().map(|id| format!("{prefix}{id}")).collect())
            .unwrap_or_default();
    }
    summary
}

impl DedupView<'_> {
    async fn analyse_call(
        &mut self,
        vms: Vec<VmImage>,
    ) -> wasmtime::Result<Result<Summary, WitError>> {
        let entries = match self.vm_entries(&vms).await? {
            Ok(e) => e,
            Err(e) => return Ok(Err(e)),
        };
        let result = provd_engine::spawn_blocking(move || provd_dedup::analyze(&entries)).await?;
        Ok(result.map(|a| analysis_summary(&a)).map_err(|e| WitError::InvalidInput(e.to_string())))
    }

    /// A plan of `vms`, and whether it was made or reused (the audit
    /// trail says which).
    async fn plan_call(
        &mut self,
        vms: Vec<VmImage>,
        policy: Policy,
    ) -> wasmtime::Result<(Result<Summary, WitError>, &'static str)> {
        if self.plans.len() >= MAX_PLANS {
            return Ok((
                Err(WitError::QuotaExceeded(format!("at most {MAX_PLANS} plans per request"))),
                "none",
            ));
        }
        let records = match self.checked_vms(&vms) {
            Ok(r) => r,
            Err(e) => return Ok((Err(e), "none")),
        };
        let (domain, tenants) = match self.plan_domain(&vms) {
            Ok(d) => d,
            Err(e) => return Ok((Err(e), "none")),
        };
        let store = match self.scope.store() {
            Ok(s) => s,
            Err(e) => return Ok((Err(e), "none")),
        };
        let use_node = policy.node_layers;
        let policy = provd_dedup::Policy {
            min_layer_bytes: policy.min_layer_bytes,
            // Past what an overlay mounts, the build would refuse the plan.
            max_layers_per_vm: usize::try_from(policy.max_layers_per_vm)
                .unwrap_or(usize::MAX)
                .min(provd_partitions::MAX_LAYERS_PER_VM),
            share_across_paths: policy.share_across_paths,
            layer_unique_files: policy.layer_unique_files,
            max_shared_partitions: provd_partitions::MAX_SHARED_PER_VM,
        };
        let considered = if use_node {
            let budget =
                MAX_ANALYSED_ENTRIES.saturating_sub(records.iter().map(|r| r.entries).sum());
            // Only layers every VM of the plan may see: the others are
            // neither stacked nor counted in the plan's figures.
            let seen = tenants.clone();
            let visible = move |d: &str| seen.iter().all(|t| provd_domain::trust::may_see(t, d));
            let store = store.clone();
            match provd_engine::spawn_blocking(move || {
                provd_partitions::considered_layers(&store, budget, &visible)
            })
            .await?
            {
                Ok(layers) => layers,
                Err(e) => return Ok((Err(WitError::Failed(e.to_string())), "none")),
            }
        } else {
            Vec::new()
        };
        let key = match (vms.as_slice(), records.as_slice()) {
            ([vm], [image]) if use_node => Some((
                plan_cache::PlanKey::new(image, &policy, tenants.iter().cloned().collect()),
                vm.vm.clone(),
                image.clone(),
            )),
            _ => None,
        };
        let reused = match &key {
            Some((key, vm, image)) => {
                match self.reuse(key, vm, image, &considered, &policy, &store, &vms).await? {
                    Ok(found) => found,
                    Err(e) => return Ok((Err(e), "none")),
                }
            }
            None => None,
        };
        let how = if reused.is_some() { "reused" } else { "made" };
        let (plan, figures) = match reused {
            Some(found) => found,
            None => {
                let made = make_plan(&vms, records, considered.clone(), policy, store).await?;
                let (plan, figures) = match made {
                    Ok(m) => m,
                    Err(e) => return Ok((Err(e), "none")),
                };
                if let Some((key, _, _)) = key {
                    self.scope.node.plans.insert(key, &considered, &plan, &figures);
                }
                (plan, figures)
            }
        };
        let held: u64 = self.plans.iter().map(|k| k.held_bytes).sum();
        let more = plan.plan().held_bytes();
        if held.saturating_add(more) > MAX_KEPT_PLAN_BYTES {
            return Ok((
                Err(WitError::QuotaExceeded(format!(
                    "this plan would hold {more} bytes of host memory beside the {held} the \
                 request's plans hold; at most {MAX_KEPT_PLAN_BYTES} in all"
                ))),
                "none",
            ));
        }
        // Layer ids are unique within the request: plan number + layer.
        let id = format!("plan-{}", self.plans.len());
        let summary = plan_summary(&id, figures, plan.plan(), &domain);
        self.plans.push(KeptPlan { id, plan: std::sync::Arc::new(plan), held_bytes: more, domain });
        Ok((Ok(summary), how))
    }

    /// The plan kept for `key` (one VM against the node's layers), given
    /// to `vm`, if it is still the plan the node would make.
    #[allow(clippy::too_many_arguments)]
    async fn reuse(
        &self,
        key: &plan_cache::PlanKey,
        vm: &str,
        image: &ImageRecord,
        considered: &[provd_store::LayerRecord],
        policy: &provd_dedup::Policy,
        store: &std::sync::Arc<provd_store::Store>,
        vms: &[VmImage],
    ) -> wasmtime::Result<Result<Option<(CheckedPlan, Summary)>, WitError>> {
        let cache = &self.scope.node.plans;
        let (added, since) = match cache.lookup(key, vm, image, considered) {
            plan_cache::Lookup::Hit(found) => return Ok(Ok(Some(*found))),
            plan_cache::Lookup::Miss => return Ok(Ok(None)),
            plan_cache::Lookup::Added { added, since } => (added, since),
        };
        // Layers were added since: the plan stands unless one of them
        // could be stacked, which only they and the image tell.
        let entries = match load_entries(store.clone(), vms, vec![image.clone()]).await? {
            Ok(mut e) => e.pop().map(|(_, es)| es).unwrap_or_default(),
            Err(e) => return Ok(Err(e)),
        };
        let store = store.clone();
        let policy = policy.clone();
        let stackable = provd_engine::spawn_blocking(move || {
            for record in added {
                let layer = provd_partitions::node_layer(&store, record)?;
                if provd_dedup::could_stack(&entries, &layer.entries, &policy) {
                    return Ok(true);
                }
            }
            Ok::<_, provd_store::StoreError>(false)
        })
        .await?;
        match stackable {
            Ok(true) => Ok(Ok(None)),
            Ok(false) => match cache.confirm(key, &since, vm, image, considered) {
                plan_cache::Lookup::Hit(found) => Ok(Ok(Some(*found))),
                _ => Ok(Ok(None)),
            },
            Err(e) => Ok(Err(WitError::Failed(e.to_string()))),
        }
    }

    async fn layer_entries_call(
        &mut self,
        layer: String,
        offset: u64,
        limit: u32,
    ) -> wasmtime::Result<Result<Vec<WitEntry>, WitError>> {
        if let Err(e) = check_page(limit) {
            return Ok(Err(e));
        }
        let found = self.plans.iter().find_map(|kept| {
            let id = layer.strip_prefix(kept.id.as_str())?.strip_prefix('-')?;
            kept.plan.plan().layers.iter().find(|l| l.id == id)
        });
        let Some(found) = found else {
            return Ok(Err(WitError::NotFound(format!(
                "no layer {layer:?} in this request's plans"
            ))));
        };
        if found.node.is_some() {
            // Built for other requests' VMs: what it holds beyond what this
            // request's images hold is theirs to know.
            return Ok(Err(WitError::Denied(format!(
                "layer {layer:?} is one the node already holds; only layers this request builds are listed"
            ))));
        }
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        Ok(Ok(found
            .entries
            .iter()
            .skip(start)
            .take(limit as usize)
            .cloned()
            .map(entry_of)
            .collect()))
    }
}

/// The audit summary of a list of VM images: `vm=image` pairs.
fn vms_summary(vms: &[VmImage]) -> String {
    vms.iter().map(|v| format!("{}={}", v.vm, v.image)).collect::<Vec<_>>().join(" ")
}

impl wit::Host for DedupView<'_> {
    async fn analyse(&mut self, vms: Vec<VmImage>) -> wasmtime::Result<Result<Summary, WitError>> {
        self.ctx.step()?;
        let args = vms_summary(&vms);
        let result = self.analyse_call(vms).await?;
        self.ctx.audit("dedup", "analyse", args, &result);
        Ok(result)
    }

    async fn plan(
        &mut self,
        vms: Vec<VmImage>,
        policy: Policy,
    ) -> wasmtime::Result<Result<Summary, WitError>> {
        self.ctx.step()?;
        let args = format!(
            "min-layer-bytes={} max-layers-per-vm={} share-across-paths={} node-layers={} layer-unique-files={} {}",
            policy.min_layer_bytes,
            policy.max_layers_per_vm,
            policy.share_across_paths,
            policy.node_layers,
            policy.layer_unique_files,
            vms_summary(&vms),
        );
        let (result, how) = self.plan_call(vms, policy).await?;
        // Whether the plan was made now or is one the node made for an
        // earlier VM of the image: first, so a long VM list cannot hide it.
        let args = format!("plan={how} {args}");
        let saved =
            result.as_ref().map(|s| s.naive_bytes.saturating_sub(s.stored_bytes)).unwrap_or(0);
        self.ctx.audit_bytes("dedup", "plan", args, &result, saved);
        Ok(result)
    }

    async fn layer_entries(
        &mut self,
        layer: String,
        offset: u64,
        limit: u32,
    ) -> wasmtime::Result<Result<Vec<WitEntry>, WitError>> {
        self.ctx.step()?;
        let args = format!("{layer} offset={offset} limit={limit}");
        let result = self.layer_entries_call(layer, offset, limit).await?;
        self.ctx.audit("dedup", "layer-entries", args, &result);
        Ok(result)
    }
}
