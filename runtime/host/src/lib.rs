//! The node-side host interfaces of provd's plugins: `images`, `dedup`,
//! `partitions`, `vm` and `hashing`.
//!
//! The engine core ([`provd_engine`]) runs plugins and serves `log` and
//! `progress`; this crate adds what touches the node, as wasmtime-wasi adds
//! WASI to wasmtime. Each interface is linked over its own view of the call:
//! the call's context (plugin, operation, grant, observer, cancel,
//! deadline), the node's [`Scope`] for this call (its services, the VMs the
//! operation names and their specs, the ledger), and only the state it owns
//! or reads:
//!
//! | interface    | owns                    | reads                  |
//! |--------------|-------------------------|------------------------|
//! | `images`     | the images fetched      |                        |
//! | `hashing`    | its hasher handles      | the images fetched     |
//! | `dedup`      | the plans kept          | the images fetched     |
//! | `partitions` | the bytes built         | the plans kept         |
//! | `vm`         |                         | the ledger's partitions|
//!
//! Every change to the node runs through [`Ledger`]: on a blocking thread,
//! counted in flight, recorded from that thread. What a call built is its
//! caller's to keep or undo (`provd_node` does both).

mod dedup;
mod hashing;
mod images;
mod ledger;
mod partitions;
mod plan_cache;
mod vm;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use provd_bindings::types::Error as WitError;
use provd_domain::{Capability, CapabilityGrants, NodePolicy};
use provd_engine::{Call, CallContext, EngineConfig, HostInterfaces, LoadError};
use provd_store::ImageRecord;
use wasmtime::component::Linker;

pub use ledger::{Built, Customization, Ledger};

/// The engine with a node's interfaces.
pub type Engine = provd_engine::Engine<NodeInterfaces>;
/// A plugin loaded on [`Engine`].
pub type Plugin = provd_engine::Plugin<NodeInterfaces>;
/// What a caller says about one call on [`Engine`].
pub type CallOptions = provd_engine::CallOptions<NodeCall>;

/// An engine whose plugins reach the node through `images`: without an
/// image service, plugins granted `images`, `dedup`, `partitions` or `vm`
/// are refused when loaded.
pub fn engine(
    config: EngineConfig,
    images: Option<Arc<provd_images::Images>>,
) -> Result<Engine, LoadError> {
    let host = NodeInterfaces::new(images, &config.policy);
    provd_engine::Engine::with_host(config, host)
}

/// What the node lends to every call: its image service (and through it the
/// store) and the bounds its policy sets.
#[derive(Clone, Default)]
pub struct NodeInterfaces {
    images: Option<Arc<provd_images::Images>>,
    /// The node's allowed image reference patterns.
    image_sources: Arc<Vec<String>>,
    /// The patterns of the provider's public catalogue (`[sharing]`).
    public_images: Arc<Vec<String>>,
    /// The host networks and boot files the node lets VMs use.
    vm_allow: Arc<provd_domain::VmAllow>,
    /// The node's capacity for VMs and how its hypervisor runs them.
    hosting: provd_vm::Hosting,
    /// Plans of one VM kept across requests (`plan_cache`).
    plans: Arc<plan_cache::PlanCache>,
}

impl std::fmt::Debug for NodeInterfaces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeInterfaces")
            .field("images", &self.images.is_some())
            .finish_non_exhaustive()
    }
}

impl NodeInterfaces {
    pub fn new(images: Option<Arc<provd_images::Images>>, policy: &NodePolicy) -> NodeInterfaces {
        NodeInterfaces {
            images,
            image_sources: Arc::new(policy.image_sources.clone()),
            public_images: Arc::new(policy.public_images.clone()),
            vm_allow: Arc::new(policy.vm_allow.clone()),
            hosting: provd_vm::Hosting {
                capacity: policy.capacity,
                machine: policy.machine,
                access: policy.hypervisor_access.clone(),
                sharing: policy.sharing,
            },
            plans: Arc::default(),
        }
    }

    /// The node's store, when it has one.
    pub fn store(&self) -> Option<&Arc<provd_store::Store>> {
        self.images.as_ref().map(|i| i.store())
    }
}

/// What the caller tells the node's interfaces about one call.
#[derive(Debug, Clone, Default)]
pub struct NodeCall {
    /// The VM names the operation is about (the daemon holds them for it):
    /// when given, the only VMs the plugin may plan, build or configure for.
    /// `None` (local tools, tests) leaves the names free.
    pub vms: Option<Vec<String>>,
    /// The manager's spec of each VM the operation names: a plugin
    /// configures or customises such a VM only with this spec, apart from
    /// the fields its grant's `may-set` lists.
    pub specs: BTreeMap<String, provd_vm::spec::VmSpec>,
    /// Where the call records what it builds; the caller closes it.
    pub ledger: Arc<Ledger>,
}

/// The node's side of one call: what every interface shares, and each
/// interface's own state.
pub struct NodeState {
    scope: Scope,
    /// `images`: images fetched in this request, by canonical reference.
    fetched: HashMap<String, ImageRecord>,
    /// Holds on the images this request fetched (or is fetching): no
    /// collection removes them until the call ends.
    holds: Vec<provd_store::ImageHold>,
    /// `dedup`: plans made in this request.
    plans: Vec<dedup::KeptPlan>,
    /// `partitions`: bytes (sizes guests see) of the partitions built.
    partition_bytes: u64,
}

impl std::fmt::Debug for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeState")
            .field("fetched", &self.fetched.len())
            .field("plans", &self.plans.len())
            .field("partition_bytes", &self.partition_bytes)
            .finish_non_exhaustive()
    }
}

/// What the node's interfaces share in one call.
pub(crate) struct Scope {
    node: NodeInterfaces,
    operation_vms: Option<Vec<String>>,
    operation_specs: BTreeMap<String, provd_vm::spec::VmSpec>,
    ledger: Arc<Ledger>,
}

impl Scope {
    /// The tenant of VM `name`: its spec's, as the manager gave it, or the
    /// default tenant where the call has no spec for it (a local run).
    pub(crate) fn vm_tenant(&self, name: &str) -> String {
        self.operation_specs
            .get(name)
            .map(|s| s.tenant().to_string())
            .unwrap_or_else(|| provd_domain::trust::DEFAULT_TENANT.to_string())
    }

    /// When the operation names its VMs, `name` must be one of them: a
    /// plugin plans, builds and configures only for those.
    pub(crate) fn operation_vm(&self, name: &str) -> Result<(), WitError> {
        match &self.operation_vms {
            Some(vms) if !vms.iter().any(|v| v == name) => Err(WitError::Denied(format!(
                "VM {name:?} is not among the VMs this operation names"
            ))),
            _ => Ok(()),
        }
    }

    /// The canonical reference of the image the manager's spec of `vm`
    /// names, when the operation has one.
    pub(crate) fn spec_image(&self, vm: &str) -> Option<String> {
        let spec = self.operation_specs.get(vm)?;
        provd_images::Reference::parse(&spec.image).ok().map(|r| r.to_string())
    }

    pub(crate) fn images(&self) -> Result<&Arc<provd_images::Images>, WitError> {
        self.node
            .images
            .as_ref()
            .ok_or_else(|| WitError::Denied("this node has no image store".into()))
    }

    pub(crate) fn store(&self) -> Result<Arc<provd_store::Store>, WitError> {
        Ok(self
            .node
            .images
            .as_ref()
            .ok_or_else(|| WitError::Denied("this node has no store".into()))?
            .store()
            .clone())
    }

    /// A partition this request created.
    pub(crate) fn own_partition(&self, id: &str) -> Result<provd_store::PartitionRecord, WitError> {
        if !self.ledger.has_partition(id) {
            return Err(WitError::NotFound(format!(
                "partition {id:?} was not created by this request"
            )));
        }
        self.store()?
            .partition(id)
            .map_err(|e| WitError::Failed(e.to_string()))?
            .ok_or_else(|| WitError::NotFound(format!("partition {id:?} no longer exists")))
    }
}

impl HostInterfaces for NodeInterfaces {
    type State = NodeState;
    type Options = NodeCall;

    fn check(&self, grants: &CapabilityGrants) -> Result<(), LoadError> {
        if self.images.is_some() {
            return Ok(());
        }
        for c in [Capability::Images, Capability::Dedup, Capability::Partitions, Capability::Vm] {
            if grants.allows(c) {
                return Err(LoadError::Unavailable(c.name()));
            }
        }
        Ok(())
    }

    fn link(
        linker: &mut Linker<Call<NodeState>>,
        capability: Capability,
    ) -> wasmtime::Result<bool> {
        let l = linker;
        match capability {
            Capability::Hashing => {
                provd_bindings::hashing::add_to_linker::<_, hashing::HashingData>(l, |t| {
                    let p = t.parts();
                    hashing::HashingView {
                        ctx: p.ctx,
                        table: p.table,
                        scope: &p.node.scope,
                        fetched: &p.node.fetched,
                    }
                })?
            }
            Capability::Images => {
                provd_bindings::images::add_to_linker::<_, images::ImagesData>(l, |t| {
                    let p = t.parts();
                    images::ImagesView {
                        ctx: p.ctx,
                        scope: &p.node.scope,
                        fetched: &mut p.node.fetched,
                        holds: &mut p.node.holds,
                    }
                })?
            }
            Capability::Dedup => {
                provd_bindings::dedup::add_to_linker::<_, dedup::DedupData>(l, |t| {
                    let p = t.parts();
                    dedup::DedupView {
                        ctx: p.ctx,
                        scope: &p.node.scope,
                        fetched: &p.node.fetched,
                        plans: &mut p.node.plans,
                    }
                })?
            }
            Capability::Partitions => provd_bindings::partitions::add_to_linker::<
                _,
                partitions::PartitionsData,
            >(l, |t| {
                let p = t.parts();
                partitions::PartitionsView {
                    ctx: p.ctx,
                    scope: &p.node.scope,
                    plans: &p.node.plans,
                    bytes: &mut p.node.partition_bytes,
                }
            })?,
            Capability::Vm => provd_bindings::vm::add_to_linker::<_, vm::VmData>(l, |t| {
                let p = t.parts();
                vm::VmView { ctx: p.ctx, scope: &p.node.scope }
            })?,
            Capability::Log | Capability::Progress => return Ok(false),
        }
        Ok(true)
    }

    fn state(&self, _call: &CallContext, options: NodeCall) -> NodeState {
        NodeState {
            scope: Scope {
                node: self.clone(),
                operation_vms: options.vms,
                operation_specs: options.specs,
                ledger: options.ledger,
            },
            fetched: HashMap::new(),
            holds: Vec::new(),
            plans: Vec::new(),
            partition_bytes: 0,
        }
    }
}

/// `images.*`, `dedup.*` and `hashing.hash-file` read only images fetched
/// in this request.
pub(crate) fn fetched_image(
    fetched: &HashMap<String, ImageRecord>,
    text: &str,
) -> Result<ImageRecord, WitError> {
    let reference = images::plugin_reference(text)?;
    fetched.get(&reference.to_string()).cloned().ok_or_else(|| {
        WitError::NotFound(format!("image {reference} was not fetched in this request"))
    })
}
