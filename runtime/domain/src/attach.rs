//! What a VM attaches from the node's partitions, as plain data.
//!
//! The partitions crate answers it (which files, of which format, checked
//! against the VM's name and tenant); the VM crate turns it into disks and
//! virtio-fs exports of a hypervisor's configuration. Neither needs the
//! other: this is the whole of what passes between them.

use std::path::PathBuf;

/// How a disk image is stored on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

/// The VM's private partition: its root disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootDisk {
    pub partition: String,
    pub path: PathBuf,
    pub format: ImageFormat,
    /// The size the guest sees, which the VM's disk reservation counts.
    pub apparent_bytes: u64,
}

/// How a shared partition reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedDevice {
    /// A read-only raw disk (EROFS or ext4 image).
    Disk,
    /// A directory exported over virtio-fs, with tag `provd-<partition>`.
    VirtioFs,
}

/// One shared partition a VM's stack reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedAttachment {
    pub partition: String,
    pub path: PathBuf,
    pub device: SharedDevice,
}

/// Everything a VM attaches from partitions, in the order its boot files
/// list the shared ones (the guest finds them by that order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachments {
    pub root: RootDisk,
    pub shared: Vec<SharedAttachment>,
}
