//! `provd:plugin/partitions`: shared and private partitions built from this
//! request's plans. A plugin reaches only the partitions its own request
//! created, within the byte quota of its grant.

use provd_bindings::partitions::{self as wit, Partition};
use provd_bindings::types::Error as WitError;
use provd_partitions::{BuildOptions, PartitionError, PrivateFormat, SharedFormat};
use provd_store::PartitionRecord;

use provd_engine::CallContext;

use crate::Scope;
use crate::dedup::KeptPlan;
use crate::ledger::Ledger;

/// `partitions`' view of a call: the call's context, the node's scope, the
/// plans this request kept (read) and the bytes it has built.
pub(crate) struct PartitionsView<'a> {
    pub ctx: &'a mut CallContext,
    pub scope: &'a Scope,
    pub plans: &'a [KeptPlan],
    pub bytes: &'a mut u64,
}

pub(crate) struct PartitionsData;

impl wasmtime::component::HasData for PartitionsData {
    type Data<'a> = PartitionsView<'a>;
}

/// Partitions one request may create.
const MAX_PARTITIONS: usize = 256;

fn wit_partition(p: &PartitionRecord) -> Partition {
    Partition {
        id: p.id.clone(),
        role: p.role.as_str().into(),
        format: p.format.as_str().into(),
        bytes: p.bytes,
        apparent_bytes: p.apparent_bytes,
        vms: p.vms.clone(),
    }
}

/// The plugin-facing form of a build error: what the plugin could fix is
/// invalid input, a quota is a quota, the node's own trouble is a failure.
pub(crate) fn wit_error(e: PartitionError) -> WitError {
    let text = e.to_string();
    match e {
        PartitionError::QuotaExceeded { .. } => WitError::QuotaExceeded(text),
        PartitionError::NotFound(_) => WitError::NotFound(text),
        PartitionError::OtherDomain { .. } | PartitionError::Denied { .. } => {
            WitError::Denied(text)
        }
        PartitionError::InvalidEntry { .. }
        | PartitionError::PlanMismatch { .. }
        | PartitionError::InvalidPlan(_)
        | PartitionError::TooManyLayers { .. }
        | PartitionError::TooManyShared { .. }
        | PartitionError::TooSmall { .. }
        | PartitionError::UnknownFormat { .. }
        | PartitionError::NothingShared => WitError::InvalidInput(text),
        PartitionError::Io { .. }
        | PartitionError::Privilege { .. }
        | PartitionError::Store(_)
        | PartitionError::MissingTool { .. }
        | PartitionError::ToolFailed { .. }
        | PartitionError::DiskFull { .. }
        | PartitionError::Unreadable { .. }
        | PartitionError::Cancelled => WitError::Failed(text),
    }
}

impl PartitionsView<'_> {
    fn private_inputs(
        &self,
        plan: &str,
        shared: Option<&str>,
        format: &str,
    ) -> Result<PrivateInputs, WitError> {
        let format = PrivateFormat::parse(format).map_err(wit_error)?;
        let kept = self.kept_plan(plan)?;
        let shared = shared.map(|id| self.scope.own_partition(id)).transpose()?;
        Ok((format, kept.plan.clone(), shared))
    }

    fn kept_plan(&self, id: &str) -> Result<&KeptPlan, WitError> {
        self.plans
            .iter()
            .find(|p| p.id == id)
            .ok_or_else(|| WitError::NotFound(format!("no plan {id:?} in this request")))
    }

    /// Options for the next build: the grant's quota less what this request
    /// already built.
    fn build_options(&self) -> Result<BuildOptions, WitError> {
        let grant = self
            .ctx
            .grants
            .partitions
            .ok_or_else(|| WitError::Denied("partitions not granted".into()))?;
        if self.scope.ledger.counts().1 >= MAX_PARTITIONS {
            return Err(WitError::QuotaExceeded(format!(
                "at most {MAX_PARTITIONS} partitions per request"
            )));
        }
        Ok(BuildOptions {
            operation: Some(self.ctx.operation.clone()),
            quota_bytes: grant.max_bytes.saturating_sub(*self.bytes),
            dax_layout: self.scope.node.hosting.sharing.attach
                == provd_domain::attach::SharedAttach::Pmem,
            ..BuildOptions::default()
        })
    }

    /// Options for `vm`'s private partition: of its tenant's domain, so its
    /// stack may reach only public layers and its tenant's.
    fn private_options(&self, vm: &str) -> Result<BuildOptions, WitError> {
        Ok(BuildOptions {
            domain: provd_domain::trust::tenant_domain(&self.scope.vm_tenant(vm)),
            ..self.build_options()?
        })
    }

    fn record_built(&mut self, rec: &PartitionRecord) {
        *self.bytes = self.bytes.saturating_add(rec.apparent_bytes);
    }
}

/// Runs a blocking build off the async runtime and records what it
/// published in the request's ledger from the blocking thread itself, so a
/// request that ends meanwhile (timeout, panic) still rolls it back; if the
/// ledger is already closed, the build removes its own partition.
async fn build(
    ledger: &std::sync::Arc<Ledger>,
    store: std::sync::Arc<provd_store::Store>,
    f: impl FnOnce(&provd_store::Store) -> Result<PartitionRecord, PartitionError> + Send + 'static,
) -> wasmtime::Result<Result<PartitionRecord, WitError>> {
    let done = ledger.blocking(move |ledger| keep_or_remove(ledger, &store, f(&store)?)).await?;
    Ok(done.map_err(wit_error))
}

/// Records a partition a build just published in the request's ledger,
/// from the build's own thread, so that a request that ended meanwhile still
/// rolls it back; if the ledger is already closed, removes it now.
fn keep_or_remove(
    ledger: &Ledger,
    store: &provd_store::Store,
    rec: PartitionRecord,
) -> Result<PartitionRecord, PartitionError> {
    if ledger.add_partition(&rec.id) {
        Ok(rec)
    } else {
        let _ = store.remove_partition(&rec.id);
        Err(PartitionError::Cancelled)
    }
}

/// What a private-partition build takes from the request: the format, the
/// kept plan, checked, with its VMs, and the shared partition to stack on.
type PrivateInputs =
    (PrivateFormat, std::sync::Arc<provd_partitions::CheckedPlan>, Option<PartitionRecord>);

impl PartitionsView<'_> {
    async fn create_shared_call(
        &mut self,
        plan: String,
        format: String,
    ) -> wasmtime::Result<Result<Partition, WitError>> {
        let prepared = (|| {
            let format = SharedFormat::parse(&format).map_err(wit_error)?;
            let kept = self.kept_plan(&plan)?;
            // The plan's layers are all of its domain, and so is the partition.
            let opts = BuildOptions { domain: kept.domain.clone(), ..self.build_options()? };
            Ok::<_, WitError>((format, kept.plan.clone(), opts, self.scope.store()?))
        })();
        let (format, plan, opts, store) = match prepared {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        let built = build(&self.scope.ledger, store, move |store| {
            provd_partitions::build_shared_checked(store, &plan, format, &opts)
        })
        .await?;
        Ok(built.map(|rec| {
            self.record_built(&rec);
            wit_partition(&rec)
        }))
    }

    async fn create_private_call(
        &mut self,
        plan: String,
        vm: String,
        shared: Option<String>,
        format: String,
        size_bytes: u64,
    ) -> wasmtime::Result<Result<Partition, WitError>> {
        let prepared = (|| {
            self.scope.operation_vm(&vm)?;
            let inputs = self.private_inputs(&plan, shared.as_deref(), &format)?;
            Ok::<_, WitError>((inputs, self.private_options(&vm)?, self.scope.store()?))
        })();
        let ((format, plan, shared), opts, store) = match prepared {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        let size = (size_bytes > 0).then_some(size_bytes);
        let built = build(&self.scope.ledger, store, move |store| {
            provd_partitions::build_private_checked(
                store,
                &plan,
                &vm,
                shared.as_ref(),
                format,
                size,
                &opts,
            )
        })
        .await?;
        Ok(built.map(|rec| {
            self.record_built(&rec);
            wit_partition(&rec)
        }))
    }

    async fn create_privates_call(
        &mut self,
        plan: String,
        names: Vec<String>,
        shared: Option<String>,
        format: String,
        size_bytes: u64,
    ) -> wasmtime::Result<Result<Vec<Partition>, WitError>> {
        let prepared = (|| {
            let inputs = self.private_inputs(&plan, shared.as_deref(), &format)?;
            if self.scope.ledger.counts().1.saturating_add(names.len()) > MAX_PARTITIONS {
                return Err(WitError::QuotaExceeded(format!(
                    "at most {MAX_PARTITIONS} partitions per request"
                )));
            }
            let mut seen = std::collections::BTreeSet::new();
            if let Some(dup) = names.iter().find(|n| !seen.insert(n.as_str())) {
                return Err(WitError::InvalidInput(format!("VM {dup:?} is listed twice")));
            }
            let mut options = Vec::with_capacity(names.len());
            for name in &names {
                self.scope.operation_vm(name)?;
                options.push(self.private_options(name)?);
            }
            Ok::<_, WitError>((inputs, options, self.scope.store()?))
        })();
        let ((format, plan, shared), options, store) = match prepared {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        let size = (size_bytes > 0).then_some(size_bytes);
        let built = self
            .scope
            .ledger
            .blocking(move |ledger| {
                crate::ledger::side_by_side(names.len(), |i| {
                    let vm = names.get(i).map(String::as_str).unwrap_or_default();
                    let opts = options.get(i).ok_or_else(|| {
                        PartitionError::InvalidPlan(format!("no build options for VM {vm:?}"))
                    })?;
                    let rec = provd_partitions::build_private_checked(
                        &store,
                        &plan,
                        vm,
                        shared.as_ref(),
                        format,
                        size,
                        opts,
                    )?;
                    keep_or_remove(ledger, &store, rec)
                })
            })
            .await?;
        let mut out = Vec::new();
        let mut first_error = None;
        for result in built {
            match result {
                Ok(rec) => {
                    self.record_built(&rec);
                    out.push(wit_partition(&rec));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Ok(Err(wit_error(e)));
        }
        // Each build checked the quota left when the batch began; together
        // they must fit it too.
        let max = self.ctx.grants.partitions.map(|g| g.max_bytes).unwrap_or(0);
        if *self.bytes > max {
            return Ok(Err(WitError::QuotaExceeded(format!(
                "the partitions of this request take {} bytes; its grant allows {max}",
                self.bytes
            ))));
        }
        Ok(Ok(out))
    }

    async fn add_file_call(
        &mut self,
        partition: String,
        path: String,
        content: Vec<u8>,
        mode: u32,
    ) -> wasmtime::Result<Result<(), WitError>> {
        let prepared = (|| {
            let rec = self.scope.own_partition(&partition)?;
            Ok::<_, WitError>((rec, self.build_options()?, self.scope.store()?))
        })();
        let (rec, opts, store) = match prepared {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        let done = self
            .scope
            .ledger
            .blocking(move |_| {
                provd_partitions::add_file(&store, &rec.id, &path, &content, mode, &opts)
                    .map(|_| ())
            })
            .await?;
        Ok(done.map_err(wit_error))
    }
}

impl wit::Host for PartitionsView<'_> {
    async fn create_shared(
        &mut self,
        plan: String,
        format: String,
    ) -> wasmtime::Result<Result<Partition, WitError>> {
        self.ctx.step()?;
        let args = format!("{plan} format={format}");
        let result = self.create_shared_call(plan, format).await?;
        self.ctx.audit("partitions", "create-shared", args, &result);
        Ok(result)
    }

    async fn create_private(
        &mut self,
        plan: String,
        vm: String,
        shared: Option<String>,
        format: String,
        size_bytes: u64,
    ) -> wasmtime::Result<Result<Partition, WitError>> {
        self.ctx.step()?;
        let args = format!(
            "{plan} vm={vm} shared={} format={format} size-bytes={size_bytes}",
            shared.as_deref().unwrap_or("-")
        );
        let result = self.create_private_call(plan, vm, shared, format, size_bytes).await?;
        self.ctx.audit("partitions", "create-private", args, &result);
        Ok(result)
    }

    async fn create_privates(
        &mut self,
        plan: String,
        vms: Vec<String>,
        shared: Option<String>,
        format: String,
        size_bytes: u64,
    ) -> wasmtime::Result<Result<Vec<Partition>, WitError>> {
        self.ctx.step()?;
        let args = format!(
            "{plan} vms={} shared={} format={format} size-bytes={size_bytes}",
            vms.join(","),
            shared.as_deref().unwrap_or("-")
        );
        let result = self.create_privates_call(plan, vms, shared, format, size_bytes).await?;
        self.ctx.audit("partitions", "create-privates", args, &result);
        Ok(result)
    }

    async fn add_file(
        &mut self,
        partition: String,
        path: String,
        content: Vec<u8>,
        mode: u32,
    ) -> wasmtime::Result<Result<(), WitError>> {
        self.ctx.step()?;
        let args = format!("{partition} {path} bytes={} mode={mode:o}", content.len());
        let result = self.add_file_call(partition, path, content, mode).await?;
        self.ctx.audit("partitions", "add-file", args, &result);
        Ok(result)
    }
}
