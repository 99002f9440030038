//! Operations: provisioning requests that run supervised, decoupled from
//! the connection that started them.
//!
//! `start` records the operation (idempotency key and VM-name exclusion are
//! decided by the store in the same transaction) and spawns it. It waits
//! for a slot (`max-running-operations`), runs the plugin with a
//! [`Cancel`] token checked at every host call, and finishes the record in
//! one transaction that also releases its VM names. A failed, cancelled or
//! interrupted operation is rolled back (`crate::rollback`): what the
//! call's ledger recorded, and then everything the store recorded against
//! the operation's id (VMs newest first, then partitions), which is also
//! what restart recovery does for an operation a crash left `running`.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt as _;
/// What [`Meter`] is told of each host call.
pub use provd_engine::{CallOutcome, HostCall, Limit};
use provd_engine::{Cancel, InvokeError, Observer, PluginError, Request};
use provd_store::{
    NewAudit, NewOperation, OpState, OperationError, OperationRecord, Started, Store,
};
use tokio::sync::{Semaphore, watch};

use crate::{BundleRefused, Node, Selected};

mod observer;
use observer::OpObserver;

/// Where a running operation stands, as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Increases with every change.
    pub seq: u64,
    pub state: OpState,
    pub phase: Option<String>,
    pub done: u64,
    pub total: Option<u64>,
}

struct Running {
    cancel: Cancel,
    /// The VMs the operation names: the only ones it may customise.
    vms: Vec<String>,
    snapshot: watch::Sender<Snapshot>,
    /// The audit trail's row of this operation, completed at each entry.
    record: NewAudit,
    /// When it was accepted, for its duration.
    accepted: std::time::Instant,
}

/// Finished operations and refused requests between two prunings of the
/// history.
const PRUNE_EVERY: u64 = 64;

/// Why a node without `[hypervisor] libvirt-uri` cannot start or stop VMs.
pub const NO_LIBVIRT: &str = "this node does not hand its VMs to libvirt: [hypervisor] \
                              libvirt-uri in provd.toml names the libvirtd that runs them";

/// The plugin name of provd's own operations.
pub const BUILTIN: &str = "provd";

/// What a built-in operation does with the VMs it holds.
#[derive(Debug, Clone, Copy)]
pub enum Builtin {
    /// Deletes them.
    DeleteVms,
    /// Moves them (stopped) onto one new shared partition of the layers
    /// they use.
    Repack { format: provd_partitions::SharedFormat },
    /// Starts their libvirt domains.
    Start,
    /// Stops their libvirt domains.
    Stop(provd_libvirt::Stop),
}

impl Builtin {
    /// A repack into a new shared partition of format `name` (`erofs`,
    /// `erofs-lz4`, `erofs-lz4hc`, `ext4` or `dir`).
    pub fn repack(name: &str) -> Result<Builtin, String> {
        provd_partitions::SharedFormat::parse(name)
            .map(|format| Builtin::Repack { format })
            .map_err(|e| e.to_string())
    }

    /// What the audit trail calls it, and the key of its operation's input.
    pub fn function(&self) -> &'static str {
        match self {
            Builtin::DeleteVms => "delete-vm",
            Builtin::Repack { .. } => "repack",
            Builtin::Start => "start-vm",
            Builtin::Stop(_) => "stop-vm",
        }
    }
}

/// Host calls recorded one audit row each; every other call is folded into
/// one row per (function, outcome) with a count, because plugins make
/// them by the thousand (hashing, paging, logging, progress).
const DECISIONS: &[(&str, &str)] = &[
    ("images", "fetch"),
    ("images", "read-file"),
    ("hashing", "hash-file"),
    ("dedup", "analyse"),
    ("dedup", "plan"),
    ("partitions", "create-shared"),
    ("partitions", "create-private"),
    ("partitions", "create-privates"),
    ("partitions", "add-file"),
    ("vm", "configure"),
    ("vm", "configure-all"),
    ("vm", "customize"),
];
/// Individual audit rows kept per operation; beyond, calls are folded.
const MAX_AUDIT_ROWS: usize = 10_000;
/// Audit rows buffered before they are written.
const AUDIT_FLUSH_ROWS: usize = 64;

/// Why an operation could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no accepted plugin {0}")]
    NoPlugin(String),
    /// The bundle's signer is no longer trusted or it expired.
    #[error("{0}")]
    Distrusted(String),
    /// A version other than the active one, without `allow-inactive`.
    #[error(
        "{plugin} {version} is not the active version ({active}); set allow-inactive to run it"
    )]
    Inactive { plugin: String, version: String, active: String },
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("{0} operations are running or queued")]
    Busy(usize),
    #[error(transparent)]
    Refused(#[from] OperationError),
    #[error("{0}")]
    Internal(String),
}

/// What operations report to the node's metrics, whatever exports them
/// (the daemon's Prometheus registry).
pub trait Meter: Send + Sync {
    /// An operation started running (or queued for a slot).
    fn operation_started(&self);
    /// A started operation is no longer running.
    fn operation_stopped(&self);
    /// An operation (or a built-in one) of `plugin` ended with `outcome`,
    /// `elapsed` after it was accepted (its wait for a slot included).
    fn operation_outcome(&self, plugin: &str, outcome: &str, elapsed: Duration);
    /// An operation of `plugin` spent `elapsed` in one of provd's own
    /// phases: `queued`, `instantiate`, `sync`.
    fn phase(&self, plugin: &str, phase: &str, elapsed: Duration);
    /// An operation of `plugin` spent `elapsed` in a phase its plugin
    /// reported (the plugin's text).
    fn plugin_phase(&self, plugin: &str, phase: &str, elapsed: Duration);
    /// A plugin was stopped by one of its limits, or by a trap (`None`).
    fn plugin_stopped(&self, plugin: &str, limit: Option<&Limit>);
    /// A plugin's host call returned.
    fn host_call(&self, call: &HostCall);
    /// A plugin was instantiated for a call, in `elapsed`.
    fn instantiated(&self, plugin: &str, elapsed: Duration);
    /// A plugin's call returned after `elapsed`.
    fn called(&self, plugin: &str, elapsed: Duration);
}

/// A [`Meter`] that counts nothing.
#[derive(Debug, Default)]
pub struct NoMeter;

impl Meter for NoMeter {
    fn operation_started(&self) {}
    fn operation_stopped(&self) {}
    fn operation_outcome(&self, _: &str, _: &str, _: Duration) {}
    fn phase(&self, _: &str, _: &str, _: Duration) {}
    fn plugin_phase(&self, _: &str, _: &str, _: Duration) {}
    fn plugin_stopped(&self, _: &str, _: Option<&Limit>) {}
    fn host_call(&self, _: &HostCall) {}
    fn instantiated(&self, _: &str, _: Duration) {}
    fn called(&self, _: &str, _: Duration) {}
}

/// The node's operations.
pub struct Operations {
    node: Arc<Node>,
    store: Arc<Store>,
    meter: Arc<dyn Meter>,
    running: Mutex<HashMap<String, Arc<Running>>>,
    slots: Arc<Semaphore>,
    /// Operations running or queued at most; more are refused.
    max_held: usize,
    /// History kept: finished operations, audit rows.
    keep: (u64, u64),
    /// Operations finished since the history was last pruned.
    since_prune: std::sync::atomic::AtomicU64,
    closed: std::sync::atomic::AtomicBool,
    idle: tokio::sync::Notify,
}

impl std::fmt::Debug for Operations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operations").finish_non_exhaustive()
    }
}

/// What a start request holds once checked.
#[derive(Debug, Clone)]
pub struct StartRequest {
    pub plugin: String,
    pub version: Option<String>,
    pub input: String,
    pub request_digest: String,
    pub idempotency_key: Option<String>,
    pub vms: Vec<String>,
    pub actor: String,
    /// The request may run a version other than the active one.
    pub allow_inactive: bool,
    /// The manager's spec of each VM, by name, as validated.
    pub specs: std::collections::BTreeMap<String, provd_vm::spec::VmSpec>,
    /// Start the libvirt VMs it configures (besides the node's `start`).
    pub start: bool,
}

/// Seconds since the epoch by the system clock (0 before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_id() -> String {
    provd_store::new_id("op", 20)
}

/// The stable code and message of a failed call.
pub fn failure(e: &InvokeError) -> (&'static str, String) {
    let code = match e {
        InvokeError::Plugin(p) => match p {
            PluginError::InvalidInput(_) => "plugin-invalid-input",
            PluginError::Denied(_) => "plugin-denied",
            PluginError::NotFound(_) => "plugin-not-found",
            PluginError::QuotaExceeded(_) => "plugin-quota-exceeded",
            PluginError::Failed(_) => "plugin-failed",
        },
        InvokeError::Limit(_) => "plugin-limit",
        InvokeError::Trap(_) => "plugin-trap",
        InvokeError::Host(_) => "host-failure",
        InvokeError::Cancelled => "cancelled",
    };
    (code, e.to_string())
}

impl Operations {
    pub fn new(
        node: Arc<Node>,
        store: Arc<Store>,
        meter: Arc<dyn Meter>,
        max_running: u32,
        max_queued: u32,
        keep: (u64, u64),
    ) -> Arc<Operations> {
        Arc::new(Operations {
            node,
            store,
            meter,
            running: Mutex::default(),
            slots: Arc::new(Semaphore::new(usize::try_from(max_running.max(1)).unwrap_or(1))),
            max_held: usize::try_from(max_running.saturating_add(max_queued)).unwrap_or(usize::MAX),
            keep,
            since_prune: std::sync::atomic::AtomicU64::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
            idle: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Running>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rolls back every operation a previous run of the daemon left
    /// running and records it as failed. Runs before the API listens.
    pub fn recover(
        store: &Store,
        libvirt: Option<&provd_libvirt::Libvirt>,
    ) -> Result<usize, provd_store::StoreError> {
        let stale = store.operations(Some(OpState::Running), u32::MAX)?;
        for op in &stale {
            let (vms, partitions) = crate::rollback::operation(store, libvirt, &op.id);
            let message = format!(
                "provd stopped while the operation ran; on restart it was rolled back \
                 ({vms} VM(s), {partitions} partition(s) removed)"
            );
            let row = NewAudit {
                actor: "provd".into(),
                kind: "operation".into(),
                plugin: Some(op.plugin.clone()),
                version: Some(op.version.clone()),
                operation: Some(op.id.clone()),
                outcome: "rolled-back".into(),
                detail: Some(message.clone()),
                count: 1,
                ..NewAudit::default()
            };
            store.finish_operation(
                &op.id,
                OpState::Failed,
                None,
                Some(("interrupted", &message)),
                None,
                &[row],
            )?;
            tracing::warn!(operation = %op.id, %message, "recovered an interrupted operation");
        }
        Ok(stale.len())
    }

    /// An audit row about a request before it became an operation: a
    /// refusal, or a version run on explicit request.
    async fn audit_refusal(&self, req: &StartRequest, outcome: &str, detail: &str) {
        let row = NewAudit {
            actor: req.actor.clone(),
            kind: "operation".into(),
            plugin: Some(req.plugin.clone()),
            version: req.version.clone(),
            args: Some(format!("vms={}", req.vms.join(","))),
            outcome: outcome.into(),
            detail: Some(detail.into()),
            count: 1,
            ..NewAudit::default()
        };
        let store = self.store.clone();
        match provd_engine::spawn_blocking(move || store.append_audit(&[row])).await {
            Ok(Ok(())) => {}
            failed => tracing::error!(?failed, "recording an audit row"),
        }
    }

    /// Records and starts an operation, or returns the one its
    /// idempotency key names (`false` then).
    pub async fn start(
        self: &Arc<Self>,
        req: StartRequest,
    ) -> Result<(OperationRecord, bool), StartError> {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StartError::ShuttingDown);
        }
        let held = self.running_count();
        if held >= self.max_held {
            return Err(StartError::Busy(held));
        }
        let found = match self.node.plugin_at(&req.plugin, req.version.as_deref(), unix_now()).await
        {
            Ok(found) => found,
            Err(e @ (BundleRefused::Untrusted { .. } | BundleRefused::Expired { .. })) => {
                let message = e.to_string();
                tracing::warn!(actor = %req.actor, plugin = %req.plugin, %message, "operation refused");
                self.audit_refusal(&req, "untrusted-bundle", &message).await;
                return Err(StartError::Distrusted(message));
            }
            Err(e) => return Err(StartError::Internal(e.to_string())),
        };
        let Some(Selected { version, plugin, active }) = found else {
            let what = match &req.version {
                Some(v) => format!("{} {v}", req.plugin),
                None => req.plugin.clone(),
            };
            return Err(StartError::NoPlugin(what));
        };
        if active.as_deref() != Some(version.as_str()) {
            let current = active.unwrap_or_else(|| "none".into());
            if !req.allow_inactive {
                return Err(StartError::Inactive {
                    plugin: req.plugin.clone(),
                    version,
                    active: current,
                });
            }
            let message = format!(
                "{} {version} runs instead of the active version ({current}), as the request allowed",
                req.plugin
            );
            tracing::warn!(actor = %req.actor, %message, "inactive version");
            self.audit_refusal(&req, "inactive-version", &message).await;
        }
        let new = NewOperation {
            id: new_id(),
            idempotency_key: req.idempotency_key.clone(),
            request_digest: req.request_digest.clone(),
            plugin: req.plugin.clone(),
            version: version.clone(),
            input: req.input.clone(),
            actor: req.actor.clone(),
            vms: req.vms.clone(),
        };
        let record = NewAudit {
            actor: req.actor.clone(),
            kind: "operation".into(),
            plugin: Some(req.plugin.clone()),
            version: Some(version.clone()),
            operation: Some(new.id.clone()),
            args: Some(format!("vms={}", req.vms.join(","))),
            count: 1,
            ..NewAudit::default()
        };
        let mut started_row = record.clone();
        started_row.function = Some("start".into());
        started_row.outcome = "started".into();
        let store = self.store.clone();
        let started =
            provd_engine::spawn_blocking(move || store.start_operation(&new, &[started_row]))
                .await
                .map_err(|e| StartError::Internal(e.to_string()))??;
        let rec = match started {
            Started::Existing(rec) => return Ok((rec, false)),
            Started::New(rec) => rec,
        };
        let (tx, _) = watch::channel(Snapshot {
            seq: 0,
            state: OpState::Running,
            phase: Some("queued".into()),
            done: 0,
            total: None,
        });
        let running = Arc::new(Running {
            cancel: Cancel::default(),
            vms: rec.vms.clone(),
            snapshot: tx,
            record,
            accepted: std::time::Instant::now(),
        });
        self.lock().insert(rec.id.clone(), running.clone());
        self.meter.operation_started();
        let this = self.clone();
        let id = rec.id.clone();
        // Every event of the operation's task carries who asked for what.
        let span = tracing::info_span!(
            "operation",
            operation = %rec.id,
            actor = %req.actor,
            plugin = %req.plugin
        );
        let task = async move {
            let job = AssertUnwindSafe(this.run(&id, &version, plugin, req, running.clone()));
            let (state, report, error, audit) = match job.catch_unwind().await {
                Ok(done) => done,
                Err(_) => {
                    // The engine catches panics in host code; this guards
                    // the daemon's own code around it.
                    let store = this.store.clone();
                    let libvirt = this.node.libvirt().cloned();
                    let op = id.clone();
                    let _ = provd_engine::spawn_blocking(move || {
                        crate::rollback::operation(&store, libvirt.as_ref(), &op)
                    })
                    .await;
                    (
                        OpState::Failed,
                        None,
                        Some(("internal", "the operation panicked".to_string())),
                        Vec::new(),
                    )
                }
            };
            this.finish(&id, state, report, error, audit, &running).await;
        };
        tokio::spawn(tracing::Instrument::instrument(task, span));
        Ok((rec, true))
    }

    async fn run(
        &self,
        id: &str,
        version: &str,
        plugin: provd_host::Plugin,
        req: StartRequest,
        running: Arc<Running>,
    ) -> (OpState, Option<String>, Option<(&'static str, String)>, Vec<NewAudit>) {
        let permit = tokio::select! {
            p = self.slots.clone().acquire_owned() => p.ok(),
            _ = cancelled(&running.cancel) => None,
        };
        self.meter.phase(&req.plugin, "queued", running.accepted.elapsed());
        let Some(_permit) = permit else {
            return (
                OpState::Cancelled,
                None,
                Some(("cancelled", "cancelled while queued".into())),
                Vec::new(),
            );
        };
        running.snapshot.send_modify(|s| {
            s.seq += 1;
            s.phase = Some("started".into());
        });
        let observer = Arc::new(OpObserver {
            operation: id.to_string(),
            plugin: req.plugin.clone(),
            version: version.to_string(),
            actor: req.actor.clone(),
            store: self.store.clone(),
            meter: self.meter.clone(),
            running: running.clone(),
            audit: Mutex::default(),
            persisted: Mutex::default(),
            phase: Mutex::default(),
        });
        let request = Request { operation_id: id.to_string(), input: req.input.clone() };
        // Taken before the plugin writes anything, so that the sync at the
        // end hears of every failed write since (see `Store::sync_point`).
        let point = self.store.sync_point();
        let started = std::time::Instant::now();
        let result = crate::call::run(
            self.node.engine(),
            &plugin,
            request,
            observer.clone(),
            crate::call::CallOptions {
                cancel: running.cancel.clone(),
                vms: Some(req.vms.clone()),
                specs: req.specs.clone(),
                libvirt: self.node.libvirt().cloned(),
                start: self.node.start_vms() || req.start,
            },
        )
        .await;
        self.meter.called(&req.plugin, started.elapsed());
        observer.end_phase();
        match &result {
            Err(InvokeError::Trap(_)) => self.meter.plugin_stopped(&req.plugin, None),
            Err(InvokeError::Limit(limit)) => self.meter.plugin_stopped(&req.plugin, Some(limit)),
            _ => {}
        }
        let audit = observer.drain(true);
        // What the operation wrote becomes durable here, with one syncfs,
        // before its success is recorded; a failed sync fails it and rolls
        // it back.
        let result = match result {
            Ok(outcome) => {
                let store = self.store.clone();
                let synced = move || match point {
                    Ok(point) => store.sync_since(&point),
                    Err(e) => Err(e),
                };
                let syncing = std::time::Instant::now();
                let synced = provd_engine::spawn_blocking(synced).await;
                self.meter.phase(&req.plugin, "sync", syncing.elapsed());
                match synced {
                    Ok(Ok(())) => Ok(outcome),
                    Ok(Err(e)) => Err(InvokeError::Host(e.to_string())),
                    Err(e) => Err(InvokeError::Host(format!("syncing the data directory: {e}"))),
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(outcome) => {
                let r = &outcome.report;
                let output = serde_json::from_str::<serde_json::Value>(&r.output)
                    .unwrap_or_else(|_| serde_json::Value::String(r.output.clone()));
                let report = serde_json::json!({
                    "summary": r.summary,
                    "fields": r
                        .fields
                        .iter()
                        .map(|f| (f.key.clone(), serde_json::Value::String(f.value.clone())))
                        .collect::<serde_json::Map<_, _>>(),
                    "output": output,
                    "elapsed-ms": outcome.elapsed.as_millis() as u64,
                });
                (OpState::Succeeded, Some(report.to_string()), None, audit)
            }
            Err(e) => {
                // The call has rolled back what its ledger recorded; this
                // removes anything else recorded against the operation.
                let store = self.store.clone();
                let libvirt = self.node.libvirt().cloned();
                let op = id.to_string();
                let _ = provd_engine::spawn_blocking(move || {
                    crate::rollback::operation(&store, libvirt.as_ref(), &op)
                })
                .await;
                let state = if matches!(e, InvokeError::Cancelled) {
                    OpState::Cancelled
                } else {
                    OpState::Failed
                };
                let (code, message) = failure(&e);
                (state, None, Some((code, message)), audit)
            }
        }
    }

    async fn finish(
        &self,
        id: &str,
        state: OpState,
        report: Option<String>,
        error: Option<(&'static str, String)>,
        mut audit: Vec<NewAudit>,
        running: &Running,
    ) {
        let store = self.store.clone();
        let op = id.to_string();
        let err = error.clone();
        let mut row = running.record.clone();
        row.function = Some("finish".into());
        row.outcome = state.as_str().into();
        row.detail = error.as_ref().map(|(c, m)| format!("{c}: {m}"));
        audit.push(row);
        let (phase, done, total) = {
            let snap = running.snapshot.borrow();
            (snap.phase.clone(), snap.done, snap.total)
        };
        let vms = running.vms.clone();
        let written = provd_engine::spawn_blocking(move || {
            // The end must be on record: an operation left `running` would be
            // rolled back at the next start, successful or not. A store that
            // fails (a full disk) gets a few more chances.
            let mut last = None;
            for attempt in 0..5u32 {
                if attempt > 0 {
                    std::thread::sleep(Duration::from_millis(200 << attempt));
                }
                // One transaction: the last progress, the end, the release
                // of the names and the operation's remaining audit rows.
                let result = store.finish_operation(
                    &op,
                    state,
                    report.as_deref(),
                    err.as_ref().map(|(c, m)| (*c, m.as_str())),
                    phase.as_deref().map(|p| (p, done, total)),
                    &audit,
                );
                match result {
                    Ok(_) => {
                        // Its end is on record: what it customised stays
                        // if it succeeded and is put back from its journal
                        // otherwise (whatever undid it already, or not).
                        let keep = state == OpState::Succeeded;
                        for vm in &vms {
                            if let Err(e) = provd_vm::end_customization(&store, vm, &op, keep) {
                                tracing::warn!(operation = %op, %vm, error = %e, "closing a customisation's journal");
                            }
                        }
                        // A shared partition the operation built and no
                        // stack names (a plugin that never stacked it)
                        // goes now, not at the next start.
                        if let Err(e) = store.free_unused_shared_of(&op) {
                            tracing::warn!(operation = %op, error = %e, "freeing unused shared partitions");
                        }
                        return Ok(());
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(last)
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::error!(operation = %id, ?written, "recording the end of an operation failed");
        }
        let plugin = running.record.plugin.as_deref().unwrap_or_default();
        self.meter.operation_outcome(plugin, state.as_str(), running.accepted.elapsed());
        self.meter.operation_stopped();
        self.prune_now_and_then().await;
        match &error {
            None => tracing::info!(operation = %id, state = state.as_str(), "operation finished"),
            Some((code, message)) => {
                tracing::warn!(operation = %id, state = state.as_str(), code, %message, "operation finished")
            }
        }
        running.snapshot.send_modify(|s| {
            s.seq += 1;
            s.state = state;
        });
        let empty = {
            let mut map = self.lock();
            map.remove(id);
            map.is_empty()
        };
        if empty {
            self.idle.notify_waiters();
        }
    }

    /// Runs one of provd's own operations (deleting VMs, a repack) to the
    /// end, under the same record, name exclusion and audit as a
    /// plugin's: it holds the names of `req.vms`, so no provisioning or
    /// deletion of them runs meanwhile.
    pub async fn run_builtin(
        &self,
        req: StartRequest,
        action: Builtin,
    ) -> Result<OperationRecord, StartError> {
        let accepted = std::time::Instant::now();
        let new = NewOperation {
            id: new_id(),
            idempotency_key: None,
            request_digest: req.request_digest.clone(),
            plugin: BUILTIN.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            input: req.input.clone(),
            actor: req.actor.clone(),
            vms: req.vms.clone(),
        };
        let store = self.store.clone();
        let id = new.id.clone();
        let actor = req.actor.clone();
        let names = req.vms.clone();
        let libvirt = self.node.libvirt().cloned();
        let dax_layout =
            self.node.engine().policy().sharing.attach == crate::policy::SharedAttach::Pmem;
        let done = provd_engine::spawn_blocking(move || {
            // Taken before the builtin writes anything (`Store::sync_point`).
            let point = store.sync_point()?;
            store.start_operation(&new, &[])?;
            // Asked of libvirt once, before a repack moves anything.
            let running = if matches!(action, Builtin::Repack { .. }) {
                running(libvirt.as_ref(), &names)
            } else {
                Vec::new()
            };
            let (result, report): (Result<(), (&str, String)>, Option<String>) = match action {
                Builtin::DeleteVms => {
                    let mut result = Ok(());
                    for name in &names {
                        // The domain first: a VM libvirt still runs
                        // must not lose its disks under it.
                        if let Some(libvirt) = &libvirt
                            && let Err(e) = libvirt.remove(name, &provd_vm::domain_uuid(name))
                        {
                            result = Err(("delete-failed", e.to_string()));
                            break;
                        }
                        if let Err(e) = provd_vm::delete(&store, name) {
                            result = Err(("delete-failed", e.to_string()));
                            break;
                        }
                    }
                    (result, None)
                }
                Builtin::Start | Builtin::Stop(_) => power(libvirt.as_ref(), &names, action),
                Builtin::Repack { .. } if !running.is_empty() => (
                    Err((
                        "vm-running",
                        format!(
                            "{} run in libvirt: a repack moves only stopped VMs, since \
                                     a running guest's writes after the copy would be lost",
                            running.join(", ")
                        ),
                    )),
                    None,
                ),
                Builtin::Repack { format } => {
                    let opts = provd_partitions::BuildOptions {
                        operation: Some(id.clone()),
                        dax_layout,
                        ..provd_partitions::BuildOptions::default()
                    };
                    let repacked = crate::repack::repack(&store, Some(&names), format, &opts)
                        .and_then(|done| {
                            // The moved VMs' configurations, durable
                            // before the repack is on record as done.
                            store.sync_since(&point).map(|()| done).map_err(Into::into)
                        });
                    match repacked {
                        Ok(done) => {
                            // Their domains name the new disks.
                            let redefined = redefine(&store, libvirt.as_ref(), &done.moved);
                            let report = serde_json::to_string(&done).ok();
                            let result = if let Err(e) = redefined {
                                Err(("repack-incomplete", e))
                            } else if done.failed.is_empty() {
                                Ok(())
                            } else {
                                let failed: Vec<String> = done
                                    .failed
                                    .iter()
                                    .map(|(vm, e)| format!("{vm}: {e}"))
                                    .collect();
                                Err(("repack-incomplete", failed.join("; ")))
                            };
                            (result, report)
                        }
                        Err(e) => (Err(("repack-failed", e.to_string())), None),
                    }
                }
            };
            let (state, error) = match &result {
                Ok(()) => (OpState::Succeeded, None),
                Err((code, m)) => (OpState::Failed, Some((*code, m.as_str()))),
            };
            let row = NewAudit {
                actor,
                kind: "operation".into(),
                plugin: Some(BUILTIN.into()),
                operation: Some(id.clone()),
                function: Some(action.function().into()),
                args: Some(names.join(" ")),
                outcome: state.as_str().into(),
                detail: result.as_ref().err().map(|(_, m)| m.clone()),
                count: 1,
                ..NewAudit::default()
            };
            store.finish_operation(&id, state, report.as_deref(), error, None, &[row])?;
            store
                .operation(&id)?
                .ok_or_else(|| OperationError::Store(provd_store::StoreError::NotFound(id)))
        })
        .await
        .map_err(|e| StartError::Internal(e.to_string()))??;
        self.meter.operation_outcome(BUILTIN, done.state.as_str(), accepted.elapsed());
        Ok(done)
    }

    /// Forgets the oldest history past its bounds, every `PRUNE_EVERY`
    /// calls: after each operation and each refused request's audit row.
    pub async fn prune_now_and_then(&self) {
        let n = self.since_prune.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !n.is_multiple_of(PRUNE_EVERY) {
            return;
        }
        let store = self.store.clone();
        let (ops, rows) = self.keep;
        match provd_engine::spawn_blocking(move || store.prune_history(ops, rows)).await {
            Ok(Ok((0, 0))) => {}
            Ok(Ok((ops, rows))) => {
                tracing::info!(operations = ops, audit_rows = rows, "old history forgotten")
            }
            other => tracing::warn!(?other, "pruning the history failed"),
        }
    }

    /// A watch on a running operation; `None` once it has finished.
    pub fn watch(&self, id: &str) -> Option<watch::Receiver<Snapshot>> {
        self.lock().get(id).map(|r| r.snapshot.subscribe())
    }

    /// Asks a running operation to stop at its next step; `false` when it
    /// is not running.
    pub fn cancel(&self, id: &str) -> bool {
        match self.lock().get(id) {
            Some(r) => {
                r.cancel.cancel();
                true
            }
            None => false,
        }
    }

    pub fn running_count(&self) -> usize {
        self.lock().len()
    }

    /// Stops taking operations, waits up to `grace` for the running ones,
    /// then cancels them and waits for their rollback.
    pub async fn shut_down(&self, grace: Duration) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        if self.wait_idle(grace).await {
            return;
        }
        let ids: Vec<String> = self.lock().keys().cloned().collect();
        tracing::warn!(operations = ids.len(), "cancelling operations still running at shutdown");
        for id in &ids {
            self.cancel(id);
        }
        // A plugin stops at its next host call or at its deadline.
        self.wait_idle(Duration::from_secs(600)).await;
    }

    async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.idle.notified();
            if self.running_count() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.running_count() == 0;
            }
        }
    }
}

/// Those of `vms` libvirt runs (or has paused), by name.
fn running(libvirt: Option<&provd_libvirt::Libvirt>, vms: &[String]) -> Vec<String> {
    let Some(libvirt) = libvirt else { return Vec::new() };
    let names: Vec<&str> = vms.iter().map(String::as_str).collect();
    match libvirt.states(&names) {
        Ok(states) => vms
            .iter()
            .zip(states)
            .filter(|(_, s)| s.is_some_and(|s| s.is_active()))
            .map(|(vm, _)| vm.clone())
            .collect(),
        // Unknown is not stopped: the repack waits for an answer.
        Err(_) => vms.to_vec(),
    }
}

/// What one VM's start or stop did: `changed` is false when its domain
/// already was as asked. A start's or stop's report is a list of these,
/// one per VM.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Powered {
    pub vm: String,
    /// The domain's state afterwards, in `virsh domstate`'s words.
    pub state: String,
    pub changed: bool,
}

/// Starts or stops the domains of `vms` (`action` is `Start` or `Stop`),
/// each defined by provd (its UUID); stops at the first failure. Returns
/// the outcome and the report: one `Powered` per VM.
fn power(
    libvirt: Option<&provd_libvirt::Libvirt>,
    vms: &[String],
    action: Builtin,
) -> (Result<(), (&'static str, String)>, Option<String>) {
    let Some(libvirt) = libvirt else {
        return (Err(("no-libvirt", NO_LIBVIRT.into())), None);
    };
    let mut done = Vec::new();
    for vm in vms {
        let uuid = provd_vm::domain_uuid(vm);
        let changed = match action {
            Builtin::Stop(how) => libvirt.stop(vm, &uuid, how),
            _ => libvirt.start(vm, &uuid),
        };
        let state = changed.and_then(|changed| {
            let state = libvirt.state(vm)?.unwrap_or(provd_libvirt::DomainState::Unknown);
            Ok(Powered { vm: vm.clone(), state: state.as_str().into(), changed })
        });
        match state {
            Ok(p) => done.push(p),
            Err(e) => {
                let code = match (&e, action) {
                    (provd_libvirt::LibvirtError::NotOurs { .. }, _) => "vm-not-defined",
                    (provd_libvirt::LibvirtError::StillRunning { .. }, _) => "vm-running",
                    (_, Builtin::Start) => "start-failed",
                    _ => "stop-failed",
                };
                let report = serde_json::to_string(&done).ok();
                return (Err((code, format!("VM {vm}: {e}"))), report);
            }
        }
    }
    (Ok(()), serde_json::to_string(&done).ok())
}

/// Defines `vms` in libvirt again from their rewritten domains.
fn redefine(
    store: &Store,
    libvirt: Option<&provd_libvirt::Libvirt>,
    vms: &[String],
) -> Result<(), String> {
    let Some(libvirt) = libvirt else { return Ok(()) };
    for vm in vms {
        crate::call::define(store, libvirt, vm)?;
    }
    Ok(())
}

async fn cancelled(cancel: &Cancel) {
    while !cancel.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
