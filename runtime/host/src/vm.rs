//! `provd:plugin/vm`: VMs configured on the node from specs, within the
//! plugin's grant and the node's capacity, on partitions of this request.

use provd_bindings::types::Error as WitError;
use provd_bindings::vm::{self as wit, Configured};
use provd_vm::VmError;

use provd_engine::CallContext;

use crate::Scope;
use crate::ledger::{Customization, Ledger};

/// `vm`'s view of a call: the call's context and the node's scope (whose
/// ledger lists the partitions this request built).
pub(crate) struct VmView<'a> {
    pub ctx: &'a mut CallContext,
    pub scope: &'a Scope,
}

pub(crate) struct VmData;

impl wasmtime::component::HasData for VmData {
    type Data<'a> = VmView<'a>;
}

/// VMs one request may configure.
const MAX_VMS: usize = 64;
/// Longest spec accepted.
const MAX_SPEC_BYTES: usize = 256 << 10;

fn wit_error(e: VmError) -> WitError {
    let text = e.to_string();
    match e {
        VmError::Spec(_) => WitError::InvalidInput(text),
        VmError::Denied { .. } => WitError::Denied(text),
        VmError::Reserve(provd_store::ReserveError::DoesNotFit { .. }) => {
            WitError::QuotaExceeded(text)
        }
        VmError::Reserve(provd_store::ReserveError::Store(_))
        | VmError::Store(_)
        | VmError::Failed(_) => WitError::Failed(text),
        VmError::Reserve(_) => WitError::InvalidInput(text),
        VmError::NotFound(_) => WitError::NotFound(text),
    }
}

impl VmView<'_> {
    /// A spec the plugin passes, against the node's `vm_allow` (bridges,
    /// taps, boot files, command lines), then against the manager's spec of
    /// that VM: every top-level field must be the manager's, but those the
    /// grant's `may-set` lists. A VM the manager sent no spec for (local
    /// tools) is not compared.
    fn as_the_manager_asked(
        &self,
        spec: &str,
        grant: &provd_domain::VmGrant,
    ) -> Result<(), WitError> {
        // A spec that does not parse is refused where it is used, after the
        // checks of the partition and the VM's name.
        let Ok(parsed) = provd_vm::spec::parse_spec(spec) else {
            return Ok(());
        };
        // The node's own bounds first: they hold whoever wrote the spec.
        let beyond = provd_vm::spec::beyond_node(&parsed, &self.scope.node.vm_allow);
        if !beyond.is_empty() {
            return Err(WitError::Denied(beyond.join("; ")));
        }
        let Some(asked) = self.scope.operation_specs.get(&parsed.name) else {
            return Ok(());
        };
        let differ: Vec<String> = provd_vm::spec::differing_fields(&parsed, asked)
            .into_iter()
            .filter(|f| !grant.may_set.contains(f))
            .collect();
        if differ.is_empty() {
            return Ok(());
        }
        Err(WitError::Denied(format!(
            "the spec of VM {:?} differs from the one its operation was given in {}; this \
             plugin may set {}",
            parsed.name,
            differ.join(", "),
            if grant.may_set.is_empty() { "none".to_string() } else { grant.may_set.join(", ") }
        )))
    }

    /// The plugin's `vm` grant, for a spec within the size bound.
    fn vm_grant(&self, spec: &str) -> Result<provd_domain::VmGrant, WitError> {
        let grant =
            self.ctx.grants.vm.clone().ok_or_else(|| WitError::Denied("vm not granted".into()))?;
        if spec.len() > MAX_SPEC_BYTES {
            return Err(WitError::InvalidInput(format!(
                "spec is {} bytes; at most {MAX_SPEC_BYTES}",
                spec.len()
            )));
        }
        Ok(grant)
    }

    async fn configure_call(
        &mut self,
        spec: String,
        private: String,
    ) -> wasmtime::Result<Result<Configured, WitError>> {
        let prepared = (|| {
            let grant = self.vm_grant(&spec)?;
            if self.scope.ledger.counts().0 >= MAX_VMS {
                return Err(WitError::QuotaExceeded(format!("at most {MAX_VMS} VMs per request")));
            }
            let rec = self.scope.own_partition(&private)?;
            self.as_the_manager_asked(&spec, &grant)?;
            Ok((grant, rec, self.scope.store()?))
        })();
        let (grant, rec, store) = match prepared {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        let hosting = self.scope.node.hosting.clone();
        let operation = self.ctx.operation.clone();
        let done = self
            .scope
            .ledger
            .blocking(move |ledger| {
                configure_recorded(&store, ledger, &spec, &rec, &grant, &hosting, &operation)
            })
            .await?;
        Ok(done.map(wit_configured))
    }
}

/// Configures a VM and records it in the request's ledger from the same
/// blocking thread, so that a request that ended meanwhile still removes
/// it; a closed ledger means remove it now.
fn configure_recorded(
    store: &provd_store::Store,
    ledger: &Ledger,
    spec: &str,
    private: &provd_store::PartitionRecord,
    grant: &provd_domain::VmGrant,
    hosting: &provd_vm::Hosting,
    operation: &str,
) -> Result<provd_vm::Configured, WitError> {
    // The order of the checks is the order of the refusals a plugin sees:
    // the spec, the grant, then the partition it names.
    let parsed = provd_vm::parse(spec).map_err(wit_error)?;
    provd_vm::check_grant(&parsed, grant).map_err(wit_error)?;
    let attached = provd_partitions::attachments(store, private, &parsed.name, parsed.tenant())
        .map_err(crate::partitions::wit_error)?;
    let c = provd_vm::configure(store, &parsed, spec, &attached, grant, hosting, Some(operation))
        .map_err(wit_error)?;
    if !ledger.add_vm(&c.name) {
        let _ = provd_vm::delete(store, &c.name);
        return Err(wit_error(VmError::Failed(
            "the request ended before the VM was configured".into(),
        )));
    }
    Ok(c)
}

fn wit_configured(c: provd_vm::Configured) -> Configured {
    Configured {
        name: c.name,
        hypervisor: c.hypervisor,
        vcpus: c.vcpus,
        memory_mib: c.memory_mib,
        macs: c.macs,
        config_file: c.config_file,
        config: c.config,
        disks: c.disks,
    }
}

impl VmView<'_> {
    async fn configure_all_call(
        &mut self,
        vms: Vec<(String, String)>,
    ) -> wasmtime::Result<Result<Vec<Configured>, WitError>> {
        let prepared = (|| {
            if self.scope.ledger.counts().0.saturating_add(vms.len()) > MAX_VMS {
                return Err(WitError::QuotaExceeded(format!("at most {MAX_VMS} VMs per request")));
            }
            let mut items = Vec::with_capacity(vms.len());
            for (spec, private) in &vms {
                let grant = self.vm_grant(spec)?;
                let name = provd_vm::spec::parse_spec(spec)
                    .map(|s| s.name)
                    .map_err(|e| WitError::InvalidInput(e.to_string()))?;
                self.scope.operation_vm(&name)?;
                let rec = self.scope.own_partition(private)?;
                self.as_the_manager_asked(spec, &grant)?;
                items.push((spec.clone(), rec, grant));
            }
            Ok((items, self.scope.store()?))
        })();
        let (items, store) = match prepared {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        let hosting = self.scope.node.hosting.clone();
        let operation = self.ctx.operation.clone();
        let done = self
            .scope
            .ledger
            .blocking(move |ledger| {
                crate::ledger::side_by_side(items.len(), |i| {
                    let Some((spec, rec, grant)) = items.get(i) else {
                        return Err(WitError::Failed("no such item".into()));
                    };
                    configure_recorded(&store, ledger, spec, rec, grant, &hosting, &operation)
                })
            })
            .await?;
        let mut out = Vec::with_capacity(done.len());
        for result in done {
            match result {
                Ok(c) => out.push(wit_configured(c)),
                Err(e) => return Ok(Err(e)),
            }
        }
        Ok(Ok(out))
    }
}

impl wit::Host for VmView<'_> {
    async fn configure_all(
        &mut self,
        vms: Vec<(String, String)>,
    ) -> wasmtime::Result<Result<Vec<Configured>, WitError>> {
        self.ctx.step()?;
        let names: Vec<String> = vms
            .iter()
            .map(|(spec, private)| {
                let name =
                    provd_vm::spec::parse_spec(spec).map(|s| s.name).unwrap_or_else(|_| "?".into());
                format!("{name}:{private}")
            })
            .collect();
        let args = format!("vms={}", names.join(","));
        let result = self.configure_all_call(vms).await?;
        self.ctx.audit("vm", "configure-all", args, &result);
        Ok(result)
    }

    async fn configure(
        &mut self,
        spec: String,
        private: String,
    ) -> wasmtime::Result<Result<Configured, WitError>> {
        self.ctx.step()?;
        // The spec's name identifies the VM; the spec itself may hold
        // user-data and keys, which stay out of the audit trail.
        let name = provd_vm::spec::parse_spec(&spec).map(|s| s.name).unwrap_or_else(|_| "?".into());
        let args = format!("vm={name} private={private} spec-bytes={}", spec.len());
        // When the operation names its VMs (the daemon holds those names
        // for it), a plugin configures only those.
        if let Err(e) = self.scope.operation_vm(&name) {
            let result: Result<Configured, WitError> = Err(e);
            self.ctx.audit("vm", "configure", args, &result);
            return Ok(result);
        }
        let result = self.configure_call(spec, private).await?;
        self.ctx.audit("vm", "configure", args, &result);
        Ok(result)
    }

    async fn customize(&mut self, spec: String) -> wasmtime::Result<Result<String, WitError>> {
        self.ctx.step()?;
        let name = provd_vm::spec::parse_spec(&spec).map(|s| s.name).unwrap_or_else(|_| "?".into());
        let args = format!("vm={name} spec-bytes={}", spec.len());
        let result = self.customize_call(name, spec).await?;
        self.ctx.audit("vm", "customize", args, &result);
        Ok(result)
    }
}

impl VmView<'_> {
    async fn customize_call(
        &mut self,
        name: String,
        spec: String,
    ) -> wasmtime::Result<Result<String, WitError>> {
        let prepared = (|| {
            let grant = self.vm_grant(&spec)?;
            // A plugin changes only the VMs its operation is about: those
            // the operation names (and the daemon holds for it), or, when
            // it names none (local tools), those this request configured.
            let allowed = match &self.scope.operation_vms {
                Some(vms) => vms.contains(&name),
                None => self.scope.ledger.has_vm(&name),
            };
            if !allowed {
                return Err(WitError::Denied(format!(
                    "VM {name:?} is neither configured by this request nor named by its operation"
                )));
            }
            self.as_the_manager_asked(&spec, &grant)?;
            Ok((grant, self.scope.store()?))
        })();
        let (grant, store) = match prepared {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        // Journalled when the daemon runs the operation: it settles the
        // undo once the operation's end is on record.
        let journal = self.scope.operation_vms.is_some().then(|| self.ctx.operation.clone());
        let done = self
            .scope
            .ledger
            .blocking(move |ledger| {
                let c = provd_vm::customize(&store, &spec, &grant, journal.as_deref())?;
                // Recorded from this thread, so that a request that ended
                // meanwhile still undoes it; a closed ledger means undo it now.
                let undo = Customization {
                    vm: c.name.clone(),
                    spec: c.previous_spec.clone(),
                    seed: c.previous_seed.clone(),
                };
                if !ledger.add_customization(undo) {
                    let _ =
                        provd_vm::restore_seed(&store, &c.name, &c.previous_spec, &c.previous_seed);
                    return Err(VmError::Failed(
                        "the request ended before the VM was customised".into(),
                    ));
                }
                Ok(c)
            })
            .await?;
        Ok(done.map(|c| c.instance_id).map_err(wit_error))
    }
}
