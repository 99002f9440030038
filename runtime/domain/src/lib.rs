//! provd's vocabulary, free of I/O.
//!
//! This crate says *what* a plugin asks for and *what* a node allows; it never
//! touches a file, a socket, a clock or a WebAssembly engine. Everything that
//! crosses a trust boundary is parsed into these types first:
//!
//! * [`Manifest`] — a plugin's `plugin.toml`: its name, version, the
//!   capabilities (host interfaces) it requests with their parameters, and the
//!   limits it wants to run under. Unknown fields are rejected and every
//!   validation error names the field.
//! * [`NodePolicy`] — the ceilings a node puts on any plugin.
//! * [`Grant`] — the result of checking a manifest against a policy: the exact
//!   capabilities and limits one plugin runs with. The engine links the
//!   interfaces of a grant and nothing else.
//!
//! ```
//! use provd_domain::{Manifest, NodePolicy};
//!
//! let manifest = Manifest::from_toml(r#"
//!     name = "hello"
//!     version = "0.1.0"
//!     [capabilities.log]
//!     [limits]
//!     memory-mib = 32
//! "#).unwrap();
//! let grant = manifest.grant(&NodePolicy::default()).unwrap();
//! assert_eq!(grant.limits.memory_bytes, 32 << 20);
//! assert!(grant.capabilities.log.is_some());
//! ```

pub mod attach;
mod capability;
pub mod image;
pub mod lru;
mod manifest;
mod pattern;
mod policy;
pub mod trust;

pub use capability::{
    ALWAYS_LINKED, Capability, HYPERVISORS, HashingGrant, ImagesGrant, LogGrant, PartitionsGrant,
    VM_SPEC_FIELDS, VmGrant, WASI_INTERFACES,
};
pub use manifest::{
    CapabilityRequests, DedupRequest, HashingRequest, ImagesRequest, LimitRequests, LogRequest,
    MAX_PATTERN_LEN, Manifest, ManifestError, ProgressRequest,
};
pub use pattern::{PATTERN_SCHEMES, check_pattern, glob_match, local_root, wildcard_match};
pub use policy::{
    CapabilityGrants, CpuMode, DomainType, Grant, HypervisorAccess, Limits, Machine, NodeCapacity,
    NodePolicy, PolicyViolation, PolicyViolations, VmAllow,
};
