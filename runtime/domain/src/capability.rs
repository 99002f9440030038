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
}

impl Capability {
    /// Every capability, in a stable order.
    pub const ALL: [Capability; 3] = [Capability::Log, Capability::Progress, Capability::Hashing];

    /// The name used in `plugin.toml` and in the WIT interface.
    pub fn name(self) -> &'static str {
        match self {
            Capability::Log => "log",
            Capability::Progress => "progress",
            Capability::Hashing => "hashing",
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
