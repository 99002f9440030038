//! What a running plugin tells the world: log records and progress events.
//!
//! The engine hands both to an [`Observer`]; the daemon turns them into its
//! log and operation progress, the CLI prints them, tests collect them.

use std::sync::Mutex;

/// Severity of a log record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// Where a log record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The `log` host interface.
    Log,
    /// A line the plugin wrote to its standard output.
    Stdout,
    /// A line the plugin wrote to its standard error (a Rust panic message
    /// lands here).
    Stderr,
}

/// One log record of a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub plugin: String,
    pub source: Source,
    pub level: Level,
    pub message: String,
    pub fields: Vec<(String, String)>,
}

/// One progress report of a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressEvent {
    pub plugin: String,
    pub phase: String,
    pub done: u64,
    pub total: Option<u64>,
}

/// How the host answered one host call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallOutcome {
    /// The call was allowed and did what was asked.
    Ok,
    /// The call was refused: outside the grant, the node's policy or a
    /// quota. The text says which.
    Denied(String),
    /// The call was allowed but failed (bad input, not found, a node error).
    Failed(String),
}

impl CallOutcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::Denied(_) => "denied",
            CallOutcome::Failed(_) => "failed",
        }
    }

    pub fn detail(&self) -> Option<&str> {
        match self {
            CallOutcome::Ok => None,
            CallOutcome::Denied(d) | CallOutcome::Failed(d) => Some(d),
        }
    }
}

/// One host-call decision, for the audit trail and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCall {
    pub plugin: String,
    pub operation: String,
    /// WIT interface, e.g. `images`.
    pub interface: &'static str,
    /// WIT function, e.g. `fetch`.
    pub function: &'static str,
    /// The arguments, summarised and bounded (`MAX_ARGS_SUMMARY` bytes):
    /// references, ids and sizes, never file contents.
    pub args: String,
    pub outcome: CallOutcome,
    /// Bytes the call moved, where that is a figure worth counting: the
    /// content of an image fetched, the bytes a plan stores once instead
    /// of once per VM. Zero otherwise.
    pub bytes: u64,
    /// How long the host took to answer.
    pub elapsed: std::time::Duration,
}

/// Longest argument summary of a [`HostCall`].
pub const MAX_ARGS_SUMMARY: usize = 256;

/// Receives what plugins report while they run. Called on the engine's
/// threads while the plugin waits, so implementations must be quick.
pub trait Observer: Send + Sync {
    fn log(&self, record: &LogRecord);
    fn progress(&self, event: &ProgressEvent);
    /// Every host call of a provd interface, once it has been answered.
    fn host_call(&self, _call: &HostCall) {}
    /// The plugin was instantiated, taking `elapsed`.
    fn instantiated(&self, _elapsed: std::time::Duration) {}
}

/// An observer that forwards to `tracing`.
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingObserver;

impl Observer for TracingObserver {
    fn log(&self, r: &LogRecord) {
        let fields =
            r.fields.iter().map(|(k, v)| format!("{k}={v:?}")).collect::<Vec<_>>().join(" ");
        let source = match r.source {
            Source::Log => "log",
            Source::Stdout => "stdout",
            Source::Stderr => "stderr",
        };
        match r.level {
            Level::Trace => tracing::trace!(plugin = %r.plugin, source, "{} {fields}", r.message),
            Level::Debug => tracing::debug!(plugin = %r.plugin, source, "{} {fields}", r.message),
            Level::Info => tracing::info!(plugin = %r.plugin, source, "{} {fields}", r.message),
            Level::Warn => tracing::warn!(plugin = %r.plugin, source, "{} {fields}", r.message),
            Level::Error => tracing::error!(plugin = %r.plugin, source, "{} {fields}", r.message),
        }
    }

    fn progress(&self, e: &ProgressEvent) {
        tracing::info!(plugin = %e.plugin, phase = %e.phase, done = e.done, total = ?e.total, "progress");
    }
}

/// An observer that keeps everything, for tests and for `provctl plugin run`.
#[derive(Debug, Default)]
pub struct CollectingObserver {
    logs: Mutex<Vec<LogRecord>>,
    progress: Mutex<Vec<ProgressEvent>>,
}

impl CollectingObserver {
    pub fn logs(&self) -> Vec<LogRecord> {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn progress_events(&self) -> Vec<ProgressEvent> {
        self.progress.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

impl Observer for CollectingObserver {
    fn log(&self, record: &LogRecord) {
        if let Ok(mut logs) = self.logs.lock() {
            logs.push(record.clone());
        }
    }

    fn progress(&self, event: &ProgressEvent) {
        if let Ok(mut progress) = self.progress.lock() {
            progress.push(event.clone());
        }
    }
}
