//! Why a build, a verification or an attachment failed.

use provd_store::StoreError;

/// Why a build or a verification failed.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// a file operation failed
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// the build lacks a privilege it needs (root: chown, mknod)
    #[error("{what}: {source} (building partitions needs CAP_CHOWN, CAP_FOWNER and CAP_MKNOD)")]
    Privilege { what: String, source: std::io::Error },
    /// the store failed
    #[error(transparent)]
    Store(#[from] StoreError),
    /// a filesystem tool is not installed
    #[error("{tool} not found: install the Debian package {package}")]
    MissingTool { tool: &'static str, package: &'static str },
    /// a filesystem tool failed
    #[error("{tool} failed ({status}): {stderr}")]
    ToolFailed { tool: &'static str, status: String, stderr: String },
    /// an entry cannot be written to the partition
    #[error("entry {path:?}: {reason}")]
    InvalidEntry { path: String, reason: String },
    /// the plan does not describe the images it is applied to
    #[error("the plan does not match the image of VM {vm:?}: {reason}")]
    PlanMismatch { vm: String, reason: String },
    /// the plan itself is malformed
    #[error("invalid plan: {0}")]
    InvalidPlan(String),
    /// a VM stacks more layers than an overlay can mount
    #[error("VM {vm:?} stacks {layers} layers; at most {max} can be mounted as one overlay")]
    TooManyLayers { vm: String, layers: usize, max: usize },
    /// a VM would stack layers from more shared partitions than it attaches
    #[error(
        "VM {vm:?} would attach {partitions} shared partitions; at most {max} are attached to one VM"
    )]
    TooManyShared { vm: String, partitions: usize, max: usize },
    /// the partitions would exceed the caller's byte quota
    #[error("{what} needs {needed} bytes; the quota leaves {quota}")]
    QuotaExceeded { what: String, needed: u64, quota: u64 },
    /// the node's disk cannot hold the build
    #[error("{what} needs {needed} bytes of free space; {free} are free beyond the reserve")]
    DiskFull { what: String, needed: u64, free: u64 },
    /// the requested size cannot hold the content
    #[error("a private partition of {requested} bytes cannot hold VM {vm:?}'s {needed} bytes")]
    TooSmall { vm: String, requested: u64, needed: u64 },
    /// a partition the request names does not exist or does not fit
    #[error("{0}")]
    NotFound(String),
    /// an unknown format name
    #[error("unknown {role} partition format {name:?}; expected one of {expected}")]
    UnknownFormat { role: &'static str, name: String, expected: &'static str },
    /// the plan has no layer to put on a shared partition
    #[error("the plan keeps no layer, so there is nothing to put on a shared partition")]
    NothingShared,
    /// the request the build served ended first; its result was removed
    #[error("the request ended before the build did; its partition was removed")]
    Cancelled,
    /// an image could not be read back
    #[error("reading partition {partition}: {reason}")]
    Unreadable { partition: String, reason: String },
    /// a VM would stack a partition of a trust domain its tenant may not see
    #[error(
        "VM {vm:?} of tenant {tenant:?} may not stack shared partition {partition} (domain {domain}); \
         a VM stacks only public layers and its own tenant's"
    )]
    OtherDomain { vm: String, tenant: String, partition: String, domain: String },
    /// a partition is not the VM's to attach; `field` names the spec field
    #[error("{field}: {reason}")]
    Denied { field: &'static str, reason: String },
}
