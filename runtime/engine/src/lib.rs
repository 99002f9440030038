//! The plugin engine: runs untrusted provisioning plugins on wasmtime.
//!
//! A plugin arrives as a manifest and a component. [`Engine::load`] checks the
//! manifest against the node's [`NodePolicy`], compiles the component once
//! (cached on disk by content digest and engine configuration), refuses it if
//! it imports anything its grant does not allow, and pre-links it against a
//! linker that holds exactly the granted interfaces. [`Engine::provision`]
//! then runs one request in a fresh store:
//!
//! * memory: one total for the whole instance, enforced by a custom limiter;
//! * time: an epoch deadline for wasm code plus a wall-clock timeout around
//!   the whole call, because epochs do not interrupt host code;
//! * stack: a fixed WebAssembly stack well below the async stack;
//! * host calls: bounded bytes per call (hostcall fuel) and bounded handles;
//! * failures: a limit breach, a trap or even a host panic ends that call
//!   with a typed [`InvokeError`]; the engine keeps serving.
//!
//! The pooling allocator with copy-on-write memory images is used when the
//! machine has the address space for it; otherwise the engine falls back to
//! on-demand allocation and says so in the log.
//!
//! ```no_run
//! # async fn run(wasm: Vec<u8>) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use provd_domain::Manifest;
//! use provd_engine::{Engine, EngineConfig, Request, TracingObserver};
//!
//! let engine = Engine::new(EngineConfig::default())?;
//! let manifest = Manifest::from_toml("name = \"hello\"\nversion = \"0.1.0\"\n[capabilities.log]\n")?;
//! let plugin = engine.load(&manifest, wasm).await?;
//! let request = Request { operation_id: "op-1".into(), input: "{}".into() };
//! let outcome = engine.provision(&plugin, request, Arc::new(TracingObserver)).await?;
//! println!("{}", outcome.report.summary);
//! # Ok(()) }
//! ```

mod cache;
mod error;
mod host;
mod observe;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use provd_bindings::ProvisionerPre;
use provd_domain::{Capability, Grant, Manifest, NodePolicy};
use wasmtime::component::Component;

pub use cache::{CacheOutcome, Digest};
pub use error::{InvokeError, Limit, LoadError, PluginError};
pub use host::{Call, CallContext, HostInterfaces, LogStats, Parts, bounded};
pub use observe::{
    CallOutcome, CollectingObserver, HostCall, Level, LogRecord, MAX_ARGS_SUMMARY, Observer,
    ProgressEvent, Source, TracingObserver,
};
pub use provd_bindings::{Report, Request};

/// Runs `f` on tokio's blocking pool inside the caller's tracing span.
///
/// `tokio::task::spawn_blocking` starts the closure with no span, so what a
/// blocking step logs (a partition written, a VM handed to libvirt, an
/// object that could not be removed) would lose the operation, actor and
/// plugin a log pipeline groups an operation's events by.
pub fn spawn_blocking<F, R>(f: F) -> tokio::task::JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
}

/// Settings of an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Ceilings and defaults for every plugin.
    pub policy: NodePolicy,
    /// Directory for precompiled artifacts; `None` compiles into memory only.
    pub cache_dir: Option<PathBuf>,
    /// Whether to try the pooling allocator.
    pub pooling: bool,
    /// Granularity of deadlines: how often the epoch advances.
    pub epoch_tick: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            policy: NodePolicy::default(),
            cache_dir: None,
            pooling: true,
            epoch_tick: Duration::from_millis(10),
        }
    }
}

/// Bytes of native stack an async call has beyond the WebAssembly stack, so
/// that host functions called from wasm never run out of stack.
const HOST_STACK_HEADROOM: usize = 1 << 20;
/// Bytes of each pooled table reset by memset rather than returned to the
/// kernel between calls.
const TABLE_KEEP_RESIDENT: usize = 64 << 10;
/// Time a call may run past its deadline before it is dropped. Wasm
/// code stops at the epoch deadline; this only catches host code that does
/// not return.
const HOST_GRACE: Duration = Duration::from_secs(2);
/// How often a running call checks whether it was cancelled.
const CANCEL_POLL: Duration = Duration::from_millis(20);
/// Epoch ticks in one slice of a running plugin, after which it yields and
/// its cancel and deadline are checked (with the default 10 ms tick, 50 ms).
const CANCEL_CHECK_TICKS: u64 = 5;

/// A wasmtime engine configured for provd, with its artifact cache and the
/// thread that advances epochs, serving the host interfaces `H` beside its
/// own.
pub struct Engine<H: HostInterfaces = ()> {
    inner: Arc<Inner<H>>,
}

struct Inner<H> {
    engine: wasmtime::Engine,
    config: EngineConfig,
    pooling: bool,
    cache: cache::ArtifactCache,
    slots: Arc<tokio::sync::Semaphore>,
    ticker_stop: Arc<AtomicBool>,
    host: H,
}

impl<H: HostInterfaces> std::fmt::Debug for Engine<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("pooling", &self.inner.pooling)
            .field("cache_dir", &self.inner.config.cache_dir)
            .finish_non_exhaustive()
    }
}

impl<H> Drop for Inner<H> {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// A loaded plugin: checked, compiled, pre-linked. Cheap to clone.
pub struct Plugin<H: HostInterfaces = ()> {
    inner: Arc<PluginInner<H>>,
}

impl<H: HostInterfaces> Clone for Plugin<H> {
    fn clone(&self) -> Self {
        Plugin { inner: self.inner.clone() }
    }
}

struct PluginInner<H: HostInterfaces> {
    name: String,
    version: semver::Version,
    digest: Digest,
    grant: Grant,
    imports: Vec<String>,
    pre: ProvisionerPre<Call<H::State>>,
    cache: CacheOutcome,
}

impl<H: HostInterfaces> std::fmt::Debug for Plugin<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.inner.name)
            .field("version", &self.inner.version)
            .field("digest", &self.digest_hex())
            .finish_non_exhaustive()
    }
}

impl<H: HostInterfaces> Plugin<H> {
    pub fn name(&self) -> &str {
        &self.inner.name
    }
    pub fn version(&self) -> &semver::Version {
        &self.inner.version
    }
    /// BLAKE3 digest of the component bytes, as hex.
    pub fn digest_hex(&self) -> String {
        provd_domain::image::Hash(self.inner.digest).to_hex()
    }
    /// What the plugin was granted.
    pub fn grant(&self) -> &Grant {
        &self.inner.grant
    }
    /// The interfaces the component imports, as the component names them.
    pub fn imports(&self) -> &[String] {
        &self.inner.imports
    }
    /// Where the compiled code came from when this plugin was loaded.
    pub fn cache_outcome(&self) -> CacheOutcome {
        self.inner.cache
    }
}

/// Asks a running call to stop. The plugin sees it at its next host call
/// (the step boundary): that call traps, the call ends with
/// [`InvokeError::Cancelled`] and what it built is rolled back.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What the caller of [`Engine::provision_with`] controls about a call:
/// its cancel, and what it tells the node's interfaces.
#[derive(Debug, Clone, Default)]
pub struct CallOptions<O> {
    /// Stops the call at the plugin's next host call or epoch slice.
    pub cancel: Cancel,
    /// For the node's interfaces ([`HostInterfaces::Options`]).
    pub host: O,
}

/// The result of a successful call.
#[derive(Debug)]
pub struct Outcome {
    pub report: Report,
    pub elapsed: Duration,
    pub log: LogStats,
}

impl Engine<()> {
    /// An engine that serves only its own interfaces (`log`, `progress`):
    /// plugins granted anything that touches the node are refused.
    pub fn new(config: EngineConfig) -> Result<Engine<()>, LoadError> {
        Engine::with_host(config, ())
    }
}

impl<H: HostInterfaces> Engine<H> {
    /// Builds the engine with a node's host interfaces, trying the pooling
    /// allocator first when asked.
    pub fn with_host(config: EngineConfig, host: H) -> Result<Engine<H>, LoadError> {
        let (engine, pooling) = if config.pooling {
            match wasmtime::Engine::new(&wasmtime_config(&config, true)) {
                Ok(engine) => (engine, true),
                Err(e) => {
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        "pooling allocator unavailable (too little address space?); \
                         falling back to on-demand allocation"
                    );
                    (build_engine(&config, false)?, false)
                }
            }
        } else {
            (build_engine(&config, false)?, false)
        };
        let cache = cache::ArtifactCache::new(&engine, config.cache_dir.as_deref())?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        spawn_ticker(engine.clone(), config.epoch_tick, ticker_stop.clone());
        let slots = Arc::new(tokio::sync::Semaphore::new(
            usize::try_from(config.policy.max_concurrent_invocations).unwrap_or(1),
        ));
        Ok(Engine {
            inner: Arc::new(Inner { engine, config, pooling, cache, slots, ticker_stop, host }),
        })
    }

    /// Whether the pooling allocator is in use.
    pub fn pooling(&self) -> bool {
        self.inner.pooling
    }

    /// The node policy this engine enforces.
    pub fn policy(&self) -> &NodePolicy {
        &self.inner.config.policy
    }

    /// The node's host interfaces.
    pub fn host(&self) -> &H {
        &self.inner.host
    }

    /// Checks, compiles and pre-links a plugin. Nothing of the component runs.
    pub async fn load(
        &self,
        manifest: &Manifest,
        wasm: impl Into<Arc<[u8]>>,
    ) -> Result<Plugin<H>, LoadError> {
        let wasm: Arc<[u8]> = wasm.into();
        let policy = &self.inner.config.policy;
        manifest.validate()?;
        let grant = manifest.grant(policy)?;
        let size = wasm.len() as u64;
        if size > policy.max_component_bytes {
            return Err(LoadError::TooLarge { size, limit: policy.max_component_bytes });
        }
        check_header(&wasm)?;
        self.inner.host.check(&grant.capabilities)?;

        let digest: Digest = *blake3::hash(&wasm).as_bytes();
        let engine = &self.inner.engine;
        let (component, outcome) =
            self.inner.cache.get(engine, digest, wasm, policy.compile_timeout).await?;

        let imports = check_imports(engine, &component, &grant)?;
        let linker = host::linker::<H>(engine, &grant.capabilities)
            .map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        let instance_pre = linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        let pre = ProvisionerPre::new(instance_pre)
            .map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        Ok(Plugin {
            inner: Arc::new(PluginInner {
                name: manifest.name.clone(),
                version: manifest.version.clone(),
                digest,
                grant,
                imports,
                pre,
                cache: outcome,
            }),
        })
    }

    /// Runs one `provision` call of `plugin` in a fresh store.
    pub async fn provision(
        &self,
        plugin: &Plugin<H>,
        request: Request,
        observer: Arc<dyn Observer>,
    ) -> Result<Outcome, InvokeError> {
        self.provision_with(plugin, request, observer, CallOptions::default()).await
    }

    /// [`Engine::provision`] with the caller's options: a cancel token and
    /// what the node's interfaces are told about the call. Whatever the
    /// call built on the node is the caller's to keep or undo: the node's
    /// interfaces record it where the caller can read it.
    pub async fn provision_with(
        &self,
        plugin: &Plugin<H>,
        request: Request,
        observer: Arc<dyn Observer>,
        options: CallOptions<H::Options>,
    ) -> Result<Outcome, InvokeError> {
        let cancel = options.cancel.clone();
        let allowed = self.inner.config.policy.max_concurrent_invocations;
        let _slot = self
            .inner
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| InvokeError::Limit(Limit::Concurrency { allowed }))?;
        let started = Instant::now();
        let timeout = plugin.inner.grant.limits.timeout;
        // The call runs on this task: spawning a task per call costs a
        // cross-thread wake-up, a large share of a warm call. A panic in host
        // code is caught here instead, and ends only this call.
        let call = AssertUnwindSafe(invoke(&self.inner, plugin, request, observer, options))
            .catch_unwind();
        // A cancel takes effect at the plugin's next host call; a plugin
        // that makes none within the grace is dropped like one past its
        // deadline.
        let watch_cancel = async {
            while !cancel.is_cancelled() {
                tokio::time::sleep(CANCEL_POLL).await;
            }
            tokio::time::sleep(HOST_GRACE).await;
        };
        let timed = async {
            tokio::select! {
                r = tokio::time::timeout(timeout + HOST_GRACE, call) => r.map_err(|_| false),
                () = watch_cancel => Err(true),
            }
        };
        match timed.await {
            Err(true) => Err(InvokeError::Cancelled),
            // Dropping the call future on timeout unwinds the plugin's fiber
            // and drops its store.
            Err(false) => Err(InvokeError::Limit(Limit::Deadline { timeout })),
            Ok(Err(panic)) => {
                let message = panic_message(panic);
                tracing::error!(plugin = %plugin.name(), %message, "host panicked serving a plugin");
                Err(InvokeError::Host(format!("host panic: {message}")))
            }
            Ok(Ok((result, log))) => {
                result.map(|report| Outcome { report, elapsed: started.elapsed(), log })
            }
        }
    }
}

/// One invocation in a fresh store.
async fn invoke<H: HostInterfaces>(
    inner: &Inner<H>,
    plugin: &Plugin<H>,
    request: Request,
    observer: Arc<dyn Observer>,
    options: CallOptions<H::Options>,
) -> (Result<Report, InvokeError>, LogStats) {
    let p = &plugin.inner;
    let policy = &inner.config.policy;
    let max_handles = usize::try_from(policy.max_handles).unwrap_or(usize::MAX);
    let (state, streams) = Call::new(
        &inner.host,
        p.name.clone(),
        request.operation_id.clone(),
        p.grant.capabilities.clone(),
        &p.grant.limits,
        max_handles,
        observer.clone(),
        options.cancel,
        options.host,
    );
    let mut store = wasmtime::Store::new(&inner.engine, state);
    store.limiter(|s| &mut s.limiter);
    store.set_hostcall_fuel(usize::try_from(policy.max_hostcall_bytes).unwrap_or(usize::MAX));
    store.set_max_component_handles(max_handles);
    // Wasm runs in slices of a few epoch ticks. At the end of each it
    // yields to the async runtime (so a plugin that never calls the host
    // does not hold a worker thread), and stops if its operation was
    // cancelled or its deadline, a fixed instant, has passed. Measuring the
    // deadline on the clock rather than in ticks charges time spent in host
    // calls too, and never fires before the timeout.
    store.set_epoch_deadline(CANCEL_CHECK_TICKS);
    store.epoch_deadline_callback(move |mut ctx| {
        let state = ctx.data_mut();
        if state.ctx().cancel.is_cancelled() {
            state.mark_cancelled();
            return Ok(wasmtime::UpdateDeadline::Interrupt);
        }
        if Instant::now() >= state.ctx().deadline {
            return Ok(wasmtime::UpdateDeadline::Interrupt);
        }
        Ok(wasmtime::UpdateDeadline::Yield(CANCEL_CHECK_TICKS))
    });

    let result = async {
        let started = Instant::now();
        let bindings = p.pre.instantiate_async(&mut store).await?;
        observer.instantiated(started.elapsed());
        bindings.call_provision(&mut store, &request).await
    }
    .await;
    for stream in &streams {
        stream.finish();
    }
    let state = store.data_mut();
    let breached = state.take_breach();
    let log = state.log_stats();
    let last_stderr = state.log.last_stderr();
    let cancelled = state.cancelled();
    let result = match result {
        Err(_) if cancelled => Err(InvokeError::Cancelled),
        Ok(Ok(report)) => Ok(report),
        Ok(Err(e)) => Err(InvokeError::Plugin(e.into())),
        Err(e) => Err(classify(e, breached, p.grant.limits.timeout, last_stderr)),
    };
    (result, log)
}

/// Turns a wasmtime error into the reason the caller sees.
fn classify(
    error: wasmtime::Error,
    breached: Option<Limit>,
    timeout: Duration,
    last_stderr: Option<String>,
) -> InvokeError {
    if let Some(limit) = breached {
        return InvokeError::Limit(limit);
    }
    let trap = error.downcast_ref::<wasmtime::Trap>();
    match trap {
        Some(wasmtime::Trap::Interrupt) => return InvokeError::Limit(Limit::Deadline { timeout }),
        Some(wasmtime::Trap::StackOverflow) => return InvokeError::Limit(Limit::Stack),
        _ => {}
    }
    let text = format!("{error:#}");
    // The whole of it (wasm backtrace included) for whoever debugs a plugin.
    tracing::debug!(error = %text, "plugin call failed");
    if text.contains("too much data is being copied between the host and the guest") {
        return InvokeError::Limit(Limit::HostcallBytes);
    }
    if text.contains("resource limit exceeded") || text.contains("table has reached its capacity") {
        return InvokeError::Limit(Limit::Count { what: first_line(&text) });
    }
    // The first line of wasmtime's message is a backtrace header; the trap
    // code or the innermost cause says what happened.
    let mut message = match trap {
        Some(trap) => trap.to_string(),
        None => first_line(&error.root_cause().to_string()),
    };
    if let Some(panic) = last_stderr {
        message.push_str(&format!("; the plugin wrote to stderr: {panic}"));
    }
    InvokeError::Trap(message)
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().trim().to_string()
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}

/// Rejects bytes that are not a component, with a message that says what
/// they are instead. A component's preamble is the wasm magic followed by
/// version 0x0d and layer 1; a core module has version 1 and layer 0.
fn check_header(wasm: &[u8]) -> Result<(), LoadError> {
    match wasm.get(..8) {
        Some([0, b'a', b's', b'm', _, _, 1, 0]) => Ok(()),
        Some([0, b'a', b's', b'm', _, _, 0, 0]) => Err(LoadError::CoreModule),
        _ => Err(LoadError::NotWasm),
    }
}

/// Lists the component's imports and refuses it if any is outside its grant.
fn check_imports(
    engine: &wasmtime::Engine,
    component: &Component,
    grant: &Grant,
) -> Result<Vec<String>, LoadError> {
    let mut imports = Vec::new();
    let mut offending = Vec::new();
    for (name, _) in component.component_type().imports(engine) {
        imports.push(name.to_string());
        let unversioned = name.split('@').next().unwrap_or(name);
        let wasi_ok = host::WASI_INTERFACES.contains(&unversioned)
            && name.split_once('@').is_some_and(|(_, v)| v.starts_with("0.2."));
        if wasi_ok || host::ALWAYS_LINKED.contains(&unversioned) {
            continue;
        }
        match Capability::from_import(name) {
            Some(c) if grant.capabilities.allows(c) => {}
            Some(c) => offending.push(format!(
                "{name} (capability `{c}` is not declared in plugin.toml or not granted)"
            )),
            None => offending.push(format!("{name} (not provided by provd)")),
        }
    }
    if offending.is_empty() { Ok(imports) } else { Err(LoadError::UndeclaredImports(offending)) }
}

fn build_engine(config: &EngineConfig, pooling: bool) -> Result<wasmtime::Engine, LoadError> {
    wasmtime::Engine::new(&wasmtime_config(config, pooling))
        .map_err(|e| LoadError::Compile(format!("engine configuration: {e:#}")))
}

fn wasmtime_config(config: &EngineConfig, pooling: bool) -> wasmtime::Config {
    let policy = &config.policy;
    let stack = usize::try_from(policy.wasm_stack_bytes).unwrap_or(512 << 10);
    let mut c = wasmtime::Config::new();
    c.wasm_component_model(true)
        .epoch_interruption(true)
        .max_wasm_stack(stack)
        .async_stack_size(stack + HOST_STACK_HEADROOM)
        .memory_init_cow(true)
        .parallel_compilation(true);
    if pooling {
        let concurrent = policy.max_concurrent_invocations.max(1);
        let mut pool = wasmtime::PoolingAllocationConfig::new();
        pool.total_component_instances(concurrent)
            .total_core_instances(concurrent.saturating_mul(policy.max_instances))
            .total_memories(concurrent.saturating_mul(policy.max_memories))
            .total_tables(concurrent.saturating_mul(policy.max_tables))
            .total_stacks(concurrent)
            .max_core_instances_per_component(policy.max_instances)
            .max_memories_per_component(policy.max_memories)
            .max_tables_per_component(policy.max_tables)
            .max_memory_size(usize::try_from(policy.max_memory_bytes).unwrap_or(usize::MAX))
            .table_elements(usize::try_from(policy.max_table_elements).unwrap_or(usize::MAX))
            // Tables are small and touched on every call: resetting them
            // with memset beats madvise, which costs a TLB shootdown. For
            // linear memory and stacks madvise measured faster (memset of a
            // resident prefix grows with its size; docs/benchmarks.md).
            .table_keep_resident(TABLE_KEEP_RESIDENT);
        c.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    }
    c
}

fn spawn_ticker(engine: wasmtime::Engine, tick: Duration, stop: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new().name("provd-epoch".into()).spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(tick);
            engine.increment_epoch();
        }
    });
    if let Err(e) = spawned {
        // Without the ticker no deadline fires; the wall-clock timeout in
        // `provision` still stops calls, but later and less precisely.
        tracing::error!(error = %e, "could not start the epoch thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_check_names_what_the_bytes_are() {
        assert!(matches!(check_header(b"hello world"), Err(LoadError::NotWasm)));
        assert!(matches!(check_header(b"\0asm\x01\0\0\0"), Err(LoadError::CoreModule)));
        assert!(check_header(b"\0asm\x0d\0\x01\0").is_ok());
        assert!(matches!(check_header(b""), Err(LoadError::NotWasm)));
    }
}
