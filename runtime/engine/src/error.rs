//! The engine's errors: why a plugin could not be loaded, and why a call
//! did not return a report.

use std::time::Duration;

use provd_domain::{ManifestError, PolicyViolations};

/// Why a component was refused before it could run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// the manifest is invalid
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// the manifest asks for more than the node allows
    #[error(transparent)]
    Policy(#[from] PolicyViolations),
    /// the file is larger than the node accepts for compilation
    #[error("component is {size} bytes; this node compiles at most {limit}")]
    TooLarge { size: u64, limit: u64 },
    /// the file is not WebAssembly at all
    #[error("not a WebAssembly component: the file does not start with the wasm magic bytes")]
    NotWasm,
    /// the file is a core module; provd runs components
    #[error(
        "this is a core WebAssembly module, not a component: build for wasm32-wasip2, \
         or encode the module with the WASI reactor adapter (provctl plugin build does both)"
    )]
    CoreModule,
    /// the component imports interfaces it was not granted
    #[error("component imports interfaces its grant does not allow: {}", .0.join(", "))]
    UndeclaredImports(Vec<String>),
    /// the component does not export what the provisioner world requires
    #[error("component does not fit the provd:plugin/provisioner world: {0}")]
    WrongWorld(String),
    /// wasmtime rejected or failed to compile the component
    #[error("component failed to compile: {0}")]
    Compile(String),
    /// compilation ran past the node's compile timeout
    #[error("component compilation ran longer than {0:?}")]
    CompileTimeout(Duration),
    /// the plugin needs a capability this node does not offer
    #[error("capability `{0}` is not available on this node")]
    Unavailable(&'static str),
    /// the precompiled-artifact cache could not be used
    #[error("artifact cache at {path}: {source}")]
    Cache { path: String, source: std::io::Error },
}

/// A limit a plugin ran into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limit {
    /// The instance-wide memory total.
    Memory { requested: u64, allowed: u64 },
    /// The wall-clock deadline of one call.
    Deadline { timeout: Duration },
    /// The WebAssembly stack.
    Stack,
    /// Elements of one table.
    TableElements { requested: u64, allowed: u64 },
    /// Bytes passed to the host in one call.
    HostcallBytes,
    /// A capability parameter, e.g. `hashing.max-input-bytes`.
    Capability { name: &'static str, requested: u64, allowed: u64 },
    /// Live resource handles, core instances, tables or memories.
    Count { what: String },
    /// Concurrent invocations on this node.
    Concurrency { allowed: u32 },
}

impl Limit {
    /// Every value of [`Limit::kind`].
    pub const KINDS: [&'static str; 8] = [
        "memory",
        "deadline",
        "stack",
        "table",
        "hostcall-bytes",
        "capability",
        "count",
        "concurrency",
    ];

    /// The limit's kind, one of [`Limit::KINDS`]: a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Limit::Memory { .. } => "memory",
            Limit::Deadline { .. } => "deadline",
            Limit::Stack => "stack",
            Limit::TableElements { .. } => "table",
            Limit::HostcallBytes => "hostcall-bytes",
            Limit::Capability { .. } => "capability",
            Limit::Count { .. } => "count",
            Limit::Concurrency { .. } => "concurrency",
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Memory { requested, allowed } => write!(
                f,
                "memory limit: the instance asked for {requested} bytes in total, \
                 its limit is {allowed}"
            ),
            Limit::Deadline { timeout } => write!(f, "deadline: the call ran past {timeout:?}"),
            Limit::Stack => write!(f, "stack limit: the WebAssembly stack overflowed"),
            Limit::TableElements { requested, allowed } => {
                write!(f, "table limit: {requested} elements asked for, at most {allowed}")
            }
            Limit::HostcallBytes => {
                write!(f, "host-call limit: too many bytes passed to the host in one call")
            }
            Limit::Capability { name, requested, allowed } => {
                write!(f, "{name} limit: {requested} asked for, at most {allowed}")
            }
            Limit::Count { what } => write!(f, "count limit: {what}"),
            Limit::Concurrency { allowed } => {
                write!(f, "concurrency limit: {allowed} invocations already running")
            }
        }
    }
}

/// Why a `provision` call did not produce a report.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The plugin returned an error value.
    #[error("plugin refused the request: {0}")]
    Plugin(PluginError),
    /// The plugin ran into one of its limits and was stopped.
    #[error("plugin stopped: {0}")]
    Limit(Limit),
    /// The plugin trapped: a panic, an `unreachable`, a bad memory access.
    #[error("plugin trapped: {0}")]
    Trap(String),
    /// provd itself failed while serving the call.
    #[error("host failure while running the plugin: {0}")]
    Host(String),
    /// The call was cancelled; it stopped at a host call.
    #[error("cancelled at the plugin's next host call")]
    Cancelled,
}

/// The WIT `error` a plugin returned, as host-side data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("denied: {0}")]
    Denied(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    #[error("failed: {0}")]
    Failed(String),
}

impl From<provd_bindings::types::Error> for PluginError {
    fn from(e: provd_bindings::types::Error) -> Self {
        use provd_bindings::types::Error as E;
        match e {
            E::InvalidInput(m) => PluginError::InvalidInput(m),
            E::Denied(m) => PluginError::Denied(m),
            E::NotFound(m) => PluginError::NotFound(m),
            E::QuotaExceeded(m) => PluginError::QuotaExceeded(m),
            E::Failed(m) => PluginError::Failed(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_limit_kind_is_listed_once() {
        let all = [
            Limit::Memory { requested: 1, allowed: 0 },
            Limit::Deadline { timeout: Duration::from_secs(1) },
            Limit::Stack,
            Limit::TableElements { requested: 1, allowed: 0 },
            Limit::HostcallBytes,
            Limit::Capability { name: "x", requested: 1, allowed: 0 },
            Limit::Count { what: "x".into() },
            Limit::Concurrency { allowed: 0 },
        ];
        let kinds: Vec<&str> = all.iter().map(Limit::kind).collect();
        assert_eq!(kinds, Limit::KINDS);
    }
}
