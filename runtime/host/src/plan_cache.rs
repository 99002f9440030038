//! Plans of one VM kept across requests.
//!
//! A VM whose image the node's layers hold arrives one request at a time,
//! and its plan is the plan of the last VM of that image: which layers it
//! stacks and what its private set holds depend only on its image, the
//! policy, the layers its tenant may see and the order they are considered
//! in, never on its name. So the first such plan, checked
//! ([`provd_partitions::CheckedPlan`]), is kept without the entries of the
//! node's layers, keyed by the image's digest, the policy and the tenants,
//! beside the layers it was made against (partition, name, digest: a
//! layer's digest covers its entries). A later request reuses it when the
//! layers considered are the same; when they changed, the plan stays the
//! one a new plan would be as long as every layer it stacks is still
//! considered and no layer added since could be stacked
//! ([`provd_dedup::could_stack`], which reads only the added layers and the
//! image); otherwise it is made again. Only plans that build no layer are
//! kept: a plan that builds one changes the node's layers.
//!
//! Bounded: at most [`MAX_CACHED_PLANS`] plans holding
//! [`MAX_CACHED_PLAN_BYTES`] together, the least recently used dropped
//! first.

use std::sync::Mutex;

use provd_bindings::dedup::Summary;
use provd_domain::lru::Lru;
use provd_partitions::CheckedPlan;
use provd_store::{ImageRecord, LayerRecord};

/// Plans kept at most.
pub(crate) const MAX_CACHED_PLANS: usize = 256;
/// Host memory the kept plans may hold together (`Plan::held_bytes`): a VM
/// of a 20,000-entry Debian root whose image the node holds keeps a few
/// hundred directories and whiteouts, 50–300 KiB.
pub(crate) const MAX_CACHED_PLAN_BYTES: u64 = 4 << 20;

/// What a kept plan is the plan of.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PlanKey {
    /// The image's digest: its entries.
    pub image: String,
    /// `min_layer_bytes`, `max_layers_per_vm`, `share_across_paths`,
    /// `layer_unique_files`, `max_shared_partitions`.
    pub policy: (u64, usize, bool, bool, usize),
    /// The tenants whose VMs the plan is for: which layers they may see.
    pub tenants: Vec<String>,
}

impl PlanKey {
    pub fn new(image: &ImageRecord, policy: &provd_dedup::Policy, tenants: Vec<String>) -> Self {
        PlanKey {
            image: image.digest.clone(),
            policy: (
                policy.min_layer_bytes,
                policy.max_layers_per_vm,
                policy.share_across_paths,
                policy.layer_unique_files,
                policy.max_shared_partitions,
            ),
            tenants,
        }
    }
}

/// A node layer, as a plan depends on it.
pub(crate) type LayerId = (String, String, String);

fn layer_id(r: &LayerRecord) -> LayerId {
    (r.partition.clone(), r.name.clone(), r.digest.clone())
}

struct Kept {
    /// The layers considered when it was made, in order.
    considered: Vec<LayerId>,
    plan: CheckedPlan,
    /// The analysis figures of its one VM.
    figures: Summary,
}

/// What [`PlanCache::lookup`] found.
pub(crate) enum Lookup {
    /// A plan for the VM asked, and its figures.
    Hit(Box<(CheckedPlan, Summary)>),
    /// A plan made against the layers `since`, before the layers `added`
    /// came: reusable if none of them could be stacked, confirmed with
    /// [`PlanCache::confirm`].
    Added {
        added: Vec<LayerRecord>,
        since: Vec<LayerId>,
    },
    Miss,
}

pub(crate) struct PlanCache {
    plans: Mutex<Lru<PlanKey, Kept>>,
}

impl Default for PlanCache {
    fn default() -> Self {
        PlanCache { plans: Mutex::new(Lru::new(MAX_CACHED_PLANS, MAX_CACHED_PLAN_BYTES)) }
    }
}

impl std::fmt::Debug for PlanCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (plans, held) = self.lock().size();
        f.debug_struct("PlanCache").field("plans", &plans).field("held", &held).finish()
    }
}

/// `plan` and `figures` given to VM `vm` running `image`.
fn hit(kept: &Kept, vm: &str, image: &ImageRecord) -> Lookup {
    let Some(plan) = kept.plan.for_vm(vm, image.clone()) else { return Lookup::Miss };
    let mut figures = kept.figures.clone();
    for f in &mut figures.vms {
        f.vm = vm.to_string();
    }
    Lookup::Hit(Box::new((plan, figures)))
}

/// `kept`, now made against the layers `considered`, given to `vm`.
fn refresh(kept: &mut Kept, considered: Vec<LayerId>, vm: &str, image: &ImageRecord) -> Lookup {
    kept.considered = considered;
    hit(kept, vm, image)
}

impl PlanCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Lru<PlanKey, Kept>> {
        // A panic while holding it leaves whole entries: the map is only
        // ever changed by single inserts and removals.
        self.plans.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The plan kept for `key`, for VM `vm` running `image`, now that the
    /// layers considered are `considered`.
    pub fn lookup(
        &self,
        key: &PlanKey,
        vm: &str,
        image: &ImageRecord,
        considered: &[LayerRecord],
    ) -> Lookup {
        let mut plans = self.lock();
        let Some(kept) = plans.get(key) else { return Lookup::Miss };
        let ids: Vec<LayerId> = considered.iter().map(layer_id).collect();
        if ids == kept.considered {
            return hit(kept, vm, image);
        }
        let all_there = kept.plan.plan().layers.iter().filter_map(|l| l.node.as_ref()).all(|n| {
            ids.iter().any(|(p, l, d)| *p == n.partition && *l == n.name && *d == n.digest)
        });
        if !all_there {
            // A layer it stacks is gone or no longer considered: the plan
            // must be made again.
            plans.remove(key);
            return Lookup::Miss;
        }
        let added: Vec<LayerRecord> = considered
            .iter()
            .filter(|r| !kept.considered.contains(&layer_id(r)))
            .cloned()
            .collect();
        if added.is_empty() {
            // Only layers it does not stack were removed: nothing else
            // would have been chosen.
            return refresh(kept, ids, vm, image);
        }
        Lookup::Added { added, since: kept.considered.clone() }
    }

    /// The plan kept for `key` against the layers `since`, once the layers
    /// [`Lookup::Added`] named were found not to be stackable by its VM:
    /// kept from now on against `considered`. A miss when another request
    /// kept another plan for `key` meanwhile: only the plan whose added
    /// layers were read is confirmed.
    pub fn confirm(
        &self,
        key: &PlanKey,
        since: &[LayerId],
        vm: &str,
        image: &ImageRecord,
        considered: &[LayerRecord],
    ) -> Lookup {
        let mut plans = self.lock();
        match plans.get(key) {
            Some(kept) if kept.considered == since => {
                refresh(kept, considered.iter().map(layer_id).collect(), vm, image)
            }
            _ => Lookup::Miss,
        }
    }

    /// Keeps `plan`, made against `considered`, for later VMs of its image.
    /// Ignored when it builds a layer or is not a plan of one VM.
    pub fn insert(
        &self,
        key: PlanKey,
        considered: &[LayerRecord],
        plan: &CheckedPlan,
        figures: &Summary,
    ) {
        if plan.vms().len() != 1 || plan.plan().layers.iter().any(|l| l.node.is_none()) {
            return;
        }
        let held = plan.plan().held_bytes();
        let kept = Kept {
            considered: considered.iter().map(layer_id).collect(),
            plan: plan.clone(),
            figures: figures.clone(),
        };
        // One plan never takes more than a quarter of the bound.
        if held <= MAX_CACHED_PLAN_BYTES / 4 {
            self.lock().insert(key, kept, held);
        }
    }
}
