//! The engine's side of a call: the per-invocation store state, the
//! context every host call shares, the resource limiter, and the linker
//! assembled from a plugin's grant. The engine serves `log` and `progress`
//! itself; a node's [`HostInterfaces`] add the rest.

mod log;
mod progress;

use std::sync::Arc;

use provd_domain::{Capability, CapabilityGrants, Limits};
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::error::Limit;
use crate::observe::{CallOutcome, HostCall, Observer, Source};

/// `text` cut to at most [`crate::MAX_ARGS_SUMMARY`] bytes on a character
/// boundary, marked when cut.
pub fn bounded(text: &str) -> String {
    let max = crate::MAX_ARGS_SUMMARY;
    if text.len() <= max {
        return text.to_string();
    }
    let end = text.floor_char_boundary(max - 3);
    format!("{}...", text.get(..end).unwrap_or_default())
}

pub use log::LogStats;
pub(crate) use log::{LogSink, LogStream};

/// The host interfaces a node adds to the engine's own (`log`, `progress`,
/// `types` and the WASI subset): the engine core runs plugins and knows
/// nothing of images, partitions or VMs, as wasmtime knows nothing of WASI.
/// `provd-host` implements this for a node; `()` adds nothing.
pub trait HostInterfaces: Send + Sync + 'static {
    /// What these interfaces hold for one call, beside the call's context.
    type State: Send + 'static;
    /// What the caller of one call says to these interfaces (for a node:
    /// the operation's VMs and their specs, and the call's ledger).
    type Options: Default + Send + 'static;
    /// Refuses a grant of a capability these interfaces cannot serve on
    /// this node, naming it. Called when a plugin is loaded.
    fn check(&self, grants: &CapabilityGrants) -> Result<(), crate::LoadError>;
    /// Adds `capability` to the linker, or returns `false` when these
    /// interfaces do not provide it.
    fn link(
        linker: &mut Linker<Call<Self::State>>,
        capability: Capability,
    ) -> wasmtime::Result<bool>;
    /// The state of one call.
    fn state(&self, call: &CallContext, options: Self::Options) -> Self::State;
}

impl HostInterfaces for () {
    type State = ();
    type Options = ();
    fn check(&self, grants: &CapabilityGrants) -> Result<(), crate::LoadError> {
        let served_here = |c: &Capability| matches!(c, Capability::Log | Capability::Progress);
        match Capability::ALL.into_iter().find(|c| grants.allows(*c) && !served_here(c)) {
            Some(c) => Err(crate::LoadError::Unavailable(c.name())),
            None => Ok(()),
        }
    }
    fn link(_: &mut Linker<Call<()>>, _: Capability) -> wasmtime::Result<bool> {
        Ok(false)
    }
    fn state(&self, _: &CallContext, (): ()) {}
}

/// What every host call of one invocation shares: who calls, for which
/// operation, under which grant, and how to stop and account for it.
pub struct CallContext {
    pub plugin: String,
    pub operation: String,
    pub grants: CapabilityGrants,
    pub observer: Arc<dyn Observer>,
    /// Set by the caller to stop the request at its next host call.
    pub cancel: crate::Cancel,
    /// When the call's time is up.
    pub deadline: std::time::Instant,
    /// Whether a host call found the request cancelled.
    cancelled: bool,
    /// The limit a host call or the limiter found broken. A trap carries only
    /// a message; this keeps the typed reason for the caller.
    breached: Option<Limit>,
    /// When the host call being served started (its `step`), for its
    /// duration in the metrics.
    step_at: std::time::Instant,
}

impl std::fmt::Debug for CallContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallContext")
            .field("plugin", &self.plugin)
            .field("operation", &self.operation)
            .finish_non_exhaustive()
    }
}

impl CallContext {
    /// Records `limit` as the reason the plugin stops and returns the trap.
    pub fn breach(&mut self, limit: Limit) -> wasmtime::Error {
        let error = wasmtime::Error::msg(limit.to_string());
        self.breached.get_or_insert(limit);
        error
    }

    /// A step boundary: every provd host call starts here. A cancelled
    /// request traps, so the call ends and what it built is rolled back.
    pub fn step(&mut self) -> wasmtime::Result<()> {
        self.step_at = std::time::Instant::now();
        if self.cancel.is_cancelled() {
            self.cancelled = true;
            return Err(wasmtime::Error::msg("the operation was cancelled"));
        }
        Ok(())
    }

    /// Tells the observer how a host call was answered. `args` is a
    /// summary the caller builds from references, ids and sizes; it is cut
    /// to [`crate::MAX_ARGS_SUMMARY`] bytes here.
    pub fn audit<T>(
        &self,
        interface: &'static str,
        function: &'static str,
        args: String,
        result: &Result<T, provd_bindings::types::Error>,
    ) {
        self.audit_bytes(interface, function, args, result, 0);
    }

    /// [`CallContext::audit`] with the bytes the call moved.
    pub fn audit_bytes<T>(
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
            elapsed: self.step_at.elapsed(),
        });
    }
}

/// Everything one invocation's store holds. A store lives for exactly one
/// call, so nothing here outlives the request that created it. Each
/// interface sees only its own part (see [`Call::parts`]).
pub struct Call<S> {
    ctx: CallContext,
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: Limiter,
    pub(crate) log: Arc<LogSink>,
    progress: progress::ProgressState,
    node: S,
}

impl<S> std::fmt::Debug for Call<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call").field("ctx", &self.ctx).finish_non_exhaustive()
    }
}

/// The parts of a [`Call`] a node's interface may see: the call's context,
/// its handle table and the node's own state.
#[derive(Debug)]
pub struct Parts<'a, S> {
    pub ctx: &'a mut CallContext,
    pub table: &'a mut ResourceTable,
    pub node: &'a mut S,
}

impl<S> Call<S> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new<H: HostInterfaces<State = S>>(
        host: &H,
        plugin: String,
        operation: String,
        grants: CapabilityGrants,
        limits: &Limits,
        max_handles: usize,
        observer: Arc<dyn Observer>,
        cancel: crate::Cancel,
        options: H::Options,
    ) -> (Call<S>, [LogStream; 2]) {
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
        let ctx = CallContext {
            plugin,
            operation,
            grants,
            observer,
            cancel,
            deadline: std::time::Instant::now() + limits.timeout,
            cancelled: false,
            breached: None,
            step_at: std::time::Instant::now(),
        };
        let node = host.state(&ctx, options);
        let call = Call {
            ctx,
            wasi,
            table,
            limiter: Limiter::new(limits),
            log: sink,
            progress: progress::ProgressState::default(),
            node,
        };
        (call, [stdout, stderr])
    }

    /// The call's context, handle table and node state, borrowed apart so
    /// that an interface's view can hold all three.
    pub fn parts(&mut self) -> Parts<'_, S> {
        Parts { ctx: &mut self.ctx, table: &mut self.table, node: &mut self.node }
    }

    pub(crate) fn ctx(&mut self) -> &mut CallContext {
        &mut self.ctx
    }

    /// Whether the call was stopped by its cancel.
    pub(crate) fn cancelled(&self) -> bool {
        self.ctx.cancelled
    }

    /// Marks the call stopped by its cancel (seen between epoch slices).
    pub(crate) fn mark_cancelled(&mut self) {
        self.ctx.cancelled = true;
    }

    /// The limit that stopped the call, if one did.
    pub(crate) fn take_breach(&mut self) -> Option<Limit> {
        self.ctx.breached.take().or_else(|| self.limiter.breached.take())
    }

    pub(crate) fn log_stats(&self) -> LogStats {
        self.log.stats()
    }
}

impl<S: Send> WasiView for Call<S> {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl<S: Send> wasmtime_wasi_io::IoView for Call<S> {
    fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
}

impl<S: Send> provd_bindings::types::Host for Call<S> {}

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
/// interfaces, and exactly the capabilities granted, each interface over
/// its own view of the call.
pub(crate) fn linker<H: HostInterfaces>(
    engine: &wasmtime::Engine,
    grants: &CapabilityGrants,
) -> wasmtime::Result<Linker<Call<H::State>>> {
    use wasmtime_wasi::cli::{WasiCli, WasiCliView};
    use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
    use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView};
    use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, random};
    use wasmtime_wasi::random::WasiRandom;

    let mut linker = Linker::<Call<H::State>>::new(engine);
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

    provd_bindings::types::add_to_linker::<_, HasSelf<Call<H::State>>>(l, |t| t)?;
    for capability in Capability::ALL {
        if !grants.allows(capability) {
            continue;
        }
        match capability {
            Capability::Log => provd_bindings::log::add_to_linker::<_, log::LogData>(l, |t| {
                log::LogView { sink: &t.log }
            })?,
            Capability::Progress => {
                provd_bindings::progress::add_to_linker::<_, progress::ProgressData>(l, |t| {
                    progress::ProgressView { ctx: &mut t.ctx, state: &mut t.progress }
                })?
            }
            other => {
                if !H::link(l, other)? {
                    return Err(wasmtime::Error::msg(format!(
                        "capability `{other}` is not provided on this node"
                    )));
                }
            }
        }
    }
    Ok(linker)
}
