//! Host side of the plugin interfaces: the per-invocation store state, the
//! resource limiter, and the linker assembled from a plugin's grant.

mod dedup;
mod hashing;
mod images;
mod log;
mod partitions;
mod progress;
mod vm;

use std::sync::Arc;

use provd_domain::{Capability, CapabilityGrants, Limits};
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::error::Limit;
use crate::observe::{CallOutcome, HostCall, Observer, Source};

/// `text` cut to at most [`crate::MAX_ARGS_SUMMARY`] bytes on a character
/// boundary, marked when cut.
pub(crate) fn bounded(text: &str) -> String {
    let max = crate::MAX_ARGS_SUMMARY;
    if text.len() <= max {
        return text.to_string();
    }
    let end = text.floor_char_boundary(max - 3);
    format!("{}...", text.get(..end).unwrap_or_default())
}

pub use log::LogStats;
pub(crate) use log::{LogSink, LogStream};

/// Everything one invocation's store holds. A store lives for exactly one
/// call, so nothing here outlives the request that created it.
pub(crate) struct HostState {
    pub plugin: String,
    pub grants: CapabilityGrants,
    pub observer: Arc<dyn Observer>,
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub limiter: Limiter,
    pub log: Arc<LogSink>,
    pub progress: progress::ProgressState,
    /// The limit a host call or the limiter found broken. A trap carries only
    /// a message; this keeps the typed reason for the caller.
    pub breached: Option<Limit>,
    /// The node's image service, when it has one.
    pub images: Option<Arc<provd_images::Images>>,
    /// The node's allowed image reference patterns.
    pub image_sources: Arc<Vec<String>>,
    /// The patterns of the provider's public catalogue (`[sharing]`).
    pub public_images: Arc<Vec<String>>,
    /// The host networks and boot files the node lets VMs use.
    pub vm_allow: Arc<provd_domain::VmAllow>,
    /// Images fetched in this request, by canonical reference.
    pub fetched: std::collections::HashMap<String, provd_store::ImageRecord>,
    /// Plans made in this request.
    pub plans: Vec<dedup::KeptPlan>,
    /// The operation this invocation serves.
    pub operation: String,
    /// What this request built on the node (shared with `provision`, which
    /// rolls it back if the request fails).
    pub ledger: Arc<Ledger>,
    /// Bytes (sizes guests see) of the partitions this request built.
    pub partition_bytes: u64,
    /// The node's capacity for VMs.
    pub capacity: provd_domain::NodeCapacity,
    /// Set by the caller to stop the request at its next host call.
    pub cancel: crate::Cancel,
    /// The VM names the operation is about, when it names them.
    pub operation_vms: Option<Vec<String>>,
    /// The manager's spec of each VM the operation names.
    pub operation_specs: std::collections::BTreeMap<String, provd_vm::spec::VmSpec>,
    /// Whether a host call found the request cancelled.
    pub cancelled: bool,
}

/// What one request built on the node, in order. Closed when the request
/// has failed: a build finishing after that must undo itself.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    inner: std::sync::Mutex<LedgerState>,
    /// Changes to the node running on blocking threads for this request.
    in_flight: std::sync::atomic::AtomicUsize,
    settled: tokio::sync::Notify,
}

/// One change in flight; dropping it (on its blocking thread, however the
/// change ends) tells the ledger.
pub(crate) struct InFlight(Arc<Ledger>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.0.settled.notify_waiters();
        }
    }
}

#[derive(Debug, Default)]
struct LedgerState {
    closed: bool,
    vms: Vec<String>,
    partitions: Vec<String>,
    customized: Vec<Customization>,
}

/// A VM's spec and seed as they were before this request customised it.
#[derive(Debug, Clone)]
pub(crate) struct Customization {
    pub vm: String,
    pub spec: String,
    pub seed: Vec<u8>,
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, LedgerState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a partition; `false` when the request has already ended and
    /// the caller must remove it.
    pub(crate) fn add_partition(&self, id: &str) -> bool {
        let mut s = self.lock();
        if !s.closed {
            s.partitions.push(id.to_string());
        }
        !s.closed
    }

    /// Records a VM; `false` when the request has already ended.
    pub(crate) fn add_vm(&self, name: &str) -> bool {
        let mut s = self.lock();
        if !s.closed {
            s.vms.push(name.to_string());
        }
        !s.closed
    }

    /// Records a customisation to undo if the request fails; `false` when
    /// the request has already ended.
    pub(crate) fn add_customization(&self, c: Customization) -> bool {
        let mut s = self.lock();
        if !s.closed {
            s.customized.push(c);
        }
        !s.closed
    }

    pub(crate) fn has_vm(&self, name: &str) -> bool {
        self.lock().vms.iter().any(|v| v == name)
    }

    pub(crate) fn has_partition(&self, id: &str) -> bool {
        self.lock().partitions.iter().any(|p| p == id)
    }

    pub(crate) fn counts(&self) -> (usize, usize) {
        let s = self.lock();
        (s.vms.len(), s.partitions.len())
    }

    /// Ends the request: returns what it built and refuses anything more.
    pub(crate) fn close(&self) -> (Vec<String>, Vec<String>) {
        let mut s = self.lock();
        s.closed = true;
        (std::mem::take(&mut s.vms), std::mem::take(&mut s.partitions))
    }

    /// Counts a change that is about to run on a blocking thread.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// Waits until no change of this request is running any more: a request
    /// that was stopped keeps its slot until its builds have finished (and,
    /// seeing the ledger closed, removed their own results).
    pub(crate) async fn settle(&self) {
        loop {
            let notified = self.settled.notified();
            if self.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// The customisations of a closed request, to undo.
    pub(crate) fn take_customized(&self) -> Vec<Customization> {
        std::mem::take(&mut self.lock().customized)
    }
}

/// Runs `run(0..count)` on up to four threads (the node's cores) and
/// returns the results in order. After the first failure no new item is
/// started; items never started are absent from the result.
pub(crate) fn side_by_side<T: Send, E: Send>(
    count: usize,
    run: impl Fn(usize) -> Result<T, E> + Sync,
) -> Vec<Result<T, E>> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 4);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: std::sync::Mutex<Vec<Option<Result<T, E>>>> =
        std::sync::Mutex::new((0..count).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..workers.min(count) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= count || failed.load(Ordering::SeqCst) {
                        break;
                    }
                    let result = run(i);
                    if result.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                    let mut all = results.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(slot) = all.get_mut(i) {
                        *slot = Some(result);
                    }
                }
            });
        }
    });
    results.into_inner().unwrap_or_else(|p| p.into_inner()).into_iter().flatten().collect()
}

/// What the node lends to every invocation.
#[derive(Clone, Default)]
pub(crate) struct NodeServices {
    pub images: Option<Arc<provd_images::Images>>,
    pub image_sources: Arc<Vec<String>>,
    pub public_images: Arc<Vec<String>>,
    pub capacity: provd_domain::NodeCapacity,
    pub vm_allow: Arc<provd_domain::VmAllow>,
}

impl HostState {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        plugin: String,
        operation: String,
        ledger: Arc<Ledger>,
        grants: CapabilityGrants,
        limits: &Limits,
        max_handles: usize,
        observer: Arc<dyn Observer>,
        node: &NodeServices,
        options: crate::CallOptions,
    ) -> (HostState, [LogStream; 2]) {
        let log_budget = grants.log.map(|l| l.max_bytes).unwrap_or(0);
        let sink = LogSink::new(plugin.clone(), observer.clone(), log_budget);
        let stdout = LogStream::new(sink.clone(), Source::Stdout);
        let stderr = LogStream::new(sink.clone(), Source::Stderr);
        // No preopened directories, no environment, no arguments, no network:
        // a plugin reaches the node only through provd's own interfaces.
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(max_handles);
        let state = HostState {
            plugin,
            grants,
            observer,
            wasi,
            table,
            limiter: Limiter::new(limits),
            log: sink,
            progress: progress::ProgressState::default(),
            breached: None,
            images: node.images.clone(),
            image_sources: node.image_sources.clone(),
            public_images: node.public_images.clone(),
            vm_allow: node.vm_allow.clone(),
            fetched: std::collections::HashMap::new(),
            plans: Vec::new(),
            operation,
            ledger,
            partition_bytes: 0,
            capacity: node.capacity,
            cancel: options.cancel,
            operation_vms: options.vms,
            operation_specs: options.specs,
            cancelled: false,
        };
        (state, [stdout, stderr])
    }

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
    pub(crate) fn operation_vm(&self, name: &str) -> Result<(), provd_bindings::types::Error> {
        match &self.operation_vms {
            Some(vms) if !vms.iter().any(|v| v == name) => {
                Err(provd_bindings::types::Error::Denied(format!(
                    "VM {name:?} is not among the VMs this operation names"
                )))
            }
            _ => Ok(()),
        }
    }

    /// Records `limit` as the reason the plugin stops and returns the trap.
    pub(crate) fn breach(&mut self, limit: Limit) -> wasmtime::Error {
        let error = wasmtime::Error::msg(limit.to_string());
        self.breached.get_or_insert(limit);
        error
    }

    /// A step boundary: every provd host call starts here. A cancelled
    /// request traps, so the call ends and what it built is rolled back.
    pub(crate) fn step(&mut self) -> wasmtime::Result<()> {
        if self.cancel.is_cancelled() {
            self.cancelled = true;
            return Err(wasmtime::Error::msg("the operation was cancelled"));
        }
        Ok(())
    }

    /// Tells the observer how a host call was answered. `args` is a
    /// summary the caller builds from references, ids and sizes; it is cut
    /// to [`crate::MAX_ARGS_SUMMARY`] bytes here.
    pub(crate) fn audit<T>(
        &self,
        interface: &'static str,
        function: &'static str,
        args: String,
        result: &Result<T, provd_bindings::types::Error>,
    ) {
        self.audit_bytes(interface, function, args, result, 0);
    }

    /// [`HostState::audit`] with the bytes the call moved.
    pub(crate) fn audit_bytes<T>(
        &self,
        interface: &'static str,
        function: &'static str,
        args: String,
        result: &Result<T, provd_bindings::types::Error>,
        bytes: u64,
    ) {
        use provd_bindings::types::Error as E;
        let outcome = match result {
            Ok(_) => CallOutcome::Ok,
            Err(E::Denied(m) | E::QuotaExceeded(m)) => CallOutcome::Denied(bounded(m)),
            Err(E::InvalidInput(m) | E::NotFound(m) | E::Failed(m)) => {
                CallOutcome::Failed(bounded(m))
            }
        };
        self.observer.host_call(&HostCall {
            plugin: self.plugin.clone(),
            operation: self.operation.clone(),
            interface,
            function,
            args: bounded(&args),
            outcome,
            bytes,
        });
    }

    pub(crate) fn log_stats(&self) -> LogStats {
        self.log.stats()
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl wasmtime_wasi_io::IoView for HostState {
    fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
}

impl provd_bindings::types::Host for HostState {}

/// Enforces an instance-wide memory total and table/instance/memory counts.
///
/// wasmtime's built-in `StoreLimits` bounds each linear memory on its own; a
/// component with several memories could then use several times its limit.
/// This limiter sums all memories of the store.
pub(crate) struct Limiter {
    memory_allowed: u64,
    memory_used: u64,
    table_elements: u64,
    instances: usize,
    tables: usize,
    memories: usize,
    pub breached: Option<Limit>,
}

impl Limiter {
    fn new(limits: &Limits) -> Limiter {
        let count = |v: u32| usize::try_from(v).unwrap_or(usize::MAX);
        Limiter {
            memory_allowed: limits.memory_bytes,
            memory_used: 0,
            table_elements: limits.table_elements,
            instances: count(limits.instances),
            tables: count(limits.tables),
            memories: count(limits.memories),
            breached: None,
        }
    }
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let grow_by = desired.saturating_sub(current) as u64;
        let requested = self.memory_used.saturating_add(grow_by);
        if requested > self.memory_allowed {
            let limit = Limit::Memory { requested, allowed: self.memory_allowed };
            let error = wasmtime::Error::msg(limit.to_string());
            self.breached.get_or_insert(limit);
            // Trapping, rather than letting `memory.grow` return -1, stops a
            // guest that would otherwise retry or spin on allocation failure
            // and gives the caller an error that names the limit.
            return Err(error);
        }
        self.memory_used = requested;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let requested = desired as u64;
        if requested > self.table_elements {
            let limit = Limit::TableElements { requested, allowed: self.table_elements };
            let error = wasmtime::Error::msg(limit.to_string());
            self.breached.get_or_insert(limit);
            return Err(error);
        }
        Ok(true)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error)
    }

    fn instances(&self) -> usize {
        self.instances
    }

    fn tables(&self) -> usize {
        self.tables
    }

    fn memories(&self) -> usize {
        self.memories
    }
}

pub(crate) use provd_domain::{ALWAYS_LINKED, WASI_INTERFACES};

/// Builds the linker for one grant: the WASI subset above, provd's type-only
/// interfaces, and exactly the capabilities granted.
pub(crate) fn linker(
    engine: &wasmtime::Engine,
    grants: &CapabilityGrants,
) -> wasmtime::Result<Linker<HostState>> {
    use wasmtime_wasi::cli::{WasiCli, WasiCliView};
    use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
    use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView};
    use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, random};
    use wasmtime_wasi::random::WasiRandom;

    let mut linker = Linker::<HostState>::new(engine);
    let l = &mut linker;
    wasmtime_wasi_io::add_to_linker_async(l)?;
    clocks::wall_clock::add_to_linker::<_, WasiClocks>(l, |t| t.clocks())?;
    clocks::monotonic_clock::add_to_linker::<_, WasiClocks>(l, |t| t.clocks())?;
    random::random::add_to_linker::<_, WasiRandom>(l, |t| t.wasi.random())?;
    random::insecure::add_to_linker::<_, WasiRandom>(l, |t| t.wasi.random())?;
    random::insecure_seed::add_to_linker::<_, WasiRandom>(l, |t| t.wasi.random())?;
    cli::exit::add_to_linker::<_, WasiCli>(l, |t| t.cli())?;
    cli::environment::add_to_linker::<_, WasiCli>(l, |t| t.cli())?;
    cli::stdin::add_to_linker::<_, WasiCli>(l, |t| t.cli())?;
    cli::stdout::add_to_linker::<_, WasiCli>(l, |t| t.cli())?;
    cli::stderr::add_to_linker::<_, WasiCli>(l, |t| t.cli())?;
    cli::terminal_input::add_to_linker::<_, WasiCli>(l, |t| t.cli())?;
    cli::terminal_output::add_to_linker::<_, WasiCli>(l, |t| t.cli())?;
    cli::terminal_stdin::add_to_linker::<_, WasiCli>(l, |t| t.cli())?;
    cli::terminal_stdout::add_to_linker::<_, WasiCli>(l, |t| t.cli())?;
    cli::terminal_stderr::add_to_linker::<_, WasiCli>(l, |t| t.cli())?;
    filesystem::types::add_to_linker::<_, WasiFilesystem>(l, |t| t.filesystem())?;
    filesystem::preopens::add_to_linker::<_, WasiFilesystem>(l, |t| t.filesystem())?;

    provd_bindings::types::add_to_linker::<_, HasSelf<HostState>>(l, |t| t)?;
    for capability in Capability::ALL {
        if !grants.allows(capability) {
            continue;
        }
        match capability {
            Capability::Log => provd_bindings::log::add_to_linker::<_, HasSelf<_>>(l, |t| t)?,
            Capability::Progress => {
                provd_bindings::progress::add_to_linker::<_, HasSelf<_>>(l, |t| t)?
            }
            Capability::Hashing => {
                provd_bindings::hashing::add_to_linker::<_, HasSelf<_>>(l, |t| t)?
            }
            Capability::Images => provd_bindings::images::add_to_linker::<_, HasSelf<_>>(l, |t| t)?,
            Capability::Dedup => provd_bindings::dedup::add_to_linker::<_, HasSelf<_>>(l, |t| t)?,
            Capability::Partitions => {
                provd_bindings::partitions::add_to_linker::<_, HasSelf<_>>(l, |t| t)?
            }
            Capability::Vm => provd_bindings::vm::add_to_linker::<_, HasSelf<_>>(l, |t| t)?,
        }
    }
    Ok(linker)
}
