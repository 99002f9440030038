//! Capabilities: the host interfaces a plugin may import.

use std::fmt;

/// WIT package every provd interface belongs to.
pub const WIT_PACKAGE: &str = "provd:plugin";

/// One host interface of the `provd:plugin` package that a plugin can be
/// granted. Each variant corresponds to exactly one WIT interface; an
/// interface that is not listed here does not exist for plugins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Capability {
    /// `provd:plugin/log`: structured log records.
    Log,
    /// `provd:plugin/progress`: progress of the running request.
    Progress,
    /// `provd:plugin/hashing`: native BLAKE3.
    Hashing,
    /// `provd:plugin/images`: fetch images and read their entries.
    Images,
    /// `provd:plugin/dedup`: sharing analysis and layer plans.
    Dedup,
    /// `provd:plugin/partitions`: build shared and private partitions.
    Partitions,
    /// `provd:plugin/vm`: configure VMs on the node.
    Vm,
}

impl Capability {
    /// Every capability, in a stable order.
    pub const ALL: [Capability; 7] = [
        Capability::Log,
        Capability::Progress,
        Capability::Hashing,
        Capability::Images,
        Capability::Dedup,
        Capability::Partitions,
        Capability::Vm,
    ];

    /// The name used in `plugin.toml` and in the WIT interface.
    pub fn name(self) -> &'static str {
        match self {
            Capability::Log => "log",
            Capability::Progress => "progress",
            Capability::Hashing => "hashing",
            Capability::Images => "images",
            Capability::Dedup => "dedup",
            Capability::Partitions => "partitions",
            Capability::Vm => "vm",
        }
    }

    /// Finds the capability whose WIT interface a component import names,
    /// e.g. `provd:plugin/log@0.1.0`. Any version of the package matches here;
    /// whether that version is served is the linker's business.
    pub fn from_import(import: &str) -> Option<Capability> {
        let rest = import.strip_prefix(WIT_PACKAGE)?.strip_prefix('/')?;
        let interface = rest.split('@').next().unwrap_or(rest);
        Capability::ALL.into_iter().find(|c| c.name() == interface)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a plugin granted `log` may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogGrant {
    /// Bytes of log text (messages, fields and stdout/stderr) kept per
    /// invocation; records past it are dropped and counted.
    pub max_bytes: u64,
}

/// What a plugin granted `hashing` may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashingGrant {
    /// Largest single input accepted by one call.
    pub max_input_bytes: u64,
}

/// What a plugin granted `images` may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagesGrant {
    /// Reference patterns the plugin may fetch (see [`glob_match`]); a
    /// reference must also match one of the node's patterns.
    pub sources: Vec<String>,
    /// Largest file `read-file` returns.
    pub max_read_bytes: u64,
}

/// What a plugin granted `partitions` may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionsGrant {
    /// Bytes (sizes guests see) the partitions of one request may total.
    pub max_bytes: u64,
}

/// What a plugin granted `vm` may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmGrant {
    /// Most vCPUs of one VM.
    pub max_vcpus: u32,
    /// Most memory of one VM.
    pub max_memory_mib: u64,
    /// Hypervisors the plugin may configure VMs for.
    pub hypervisors: Vec<String>,
    /// Top-level spec fields the plugin may set differently from the
    /// operation's spec for that VM; every other field must be the
    /// manager's.
    pub may_set: Vec<String>,
}

/// Top-level fields of a VM spec (`provd_vm::spec::VmSpec`, as its JSON
/// names them) a grant may let a plugin set: all but `name`, which is what
/// ties a configuration to the manager's spec, and `tenant`, which decides
/// whose files the VM may reach.
pub const VM_SPEC_FIELDS: [&str; 11] = [
    "hypervisor",
    "vcpus",
    "topology",
    "memory-mib",
    "image",
    "disks",
    "nics",
    "cloud-init",
    "boot",
    "labels",
    "shared-attach",
];

/// WASI interfaces (version 0.2.x) that Rust's standard library imports
/// through the preview1 adapter or the wasm32-wasip2 target: the only WASI
/// the engine links, and what a bundle audit accepts. No sockets, no HTTP.
pub const WASI_INTERFACES: &[&str] = &[
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:clocks/wall-clock",
    "wasi:clocks/monotonic-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:cli/exit",
    "wasi:cli/environment",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    // Linked with no preopened directory, so a plugin sees an empty
    // filesystem; std imports these unconditionally.
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
];

/// Interfaces of provd's package linked for every plugin: they hold only
/// types.
pub const ALWAYS_LINKED: &[&str] = &["provd:plugin/types"];

/// The hypervisors provd renders configurations for.
pub const HYPERVISORS: [&str; 3] = ["libvirt", "cloud-hypervisor", "firecracker"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_names_map_to_capabilities() {
        assert_eq!(Capability::from_import("provd:plugin/log@0.1.0"), Some(Capability::Log));
        assert_eq!(Capability::from_import("provd:plugin/hashing"), Some(Capability::Hashing));
        assert_eq!(Capability::from_import("provd:plugin/types@0.1.0"), None);
        assert_eq!(Capability::from_import("provd:pluginx/log@0.1.0"), None);
        assert_eq!(Capability::from_import("wasi:cli/stdout@0.2.0"), None);
    }
}
