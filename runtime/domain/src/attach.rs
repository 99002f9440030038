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
    /// The image's size when it is laid out for DAX (every regular file
    /// in whole blocks, the size a multiple of 2 MiB), so that it may be
    /// attached as persistent memory; `None` otherwise.
    pub pmem_bytes: Option<u64>,
    /// Whether it is of the public catalogue (domain `public`): VMs of
    /// every tenant may attach it.
    pub public: bool,
}

/// How a VM's shared partitions reach its guest, as a VM's spec or the
/// node asks.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum SharedAttach {
    /// Persistent memory (virtio-pmem) the guest maps with DAX: the VMs
    /// mapping one partition read the same host pages, and no guest keeps
    /// the shared files in its own page cache.
    #[default]
    Pmem,
    /// A read-only virtio disk: each guest caches what it reads.
    Block,
}

impl SharedAttach {
    pub fn as_str(self) -> &'static str {
        match self {
            SharedAttach::Pmem => "pmem",
            SharedAttach::Block => "block",
        }
    }
}

/// The node's rules for how shared partitions are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SharingPolicy {
    /// `pmem`: a VM's spec may ask for either, and gets persistent memory
    /// where it asks nothing and its hypervisor has it. `block`: every
    /// shared partition is a disk; a spec asking for `pmem` is refused.
    pub attach: SharedAttach,
    /// Whether partitions of the public catalogue may share host pages
    /// across tenants (persistent memory, or a disk through the host's
    /// page cache). Off, they are disks read past the host's page cache
    /// (`O_DIRECT`), so that no two tenants' guests touch the same host
    /// page: shared pages are a timing side channel (Flush+Reload).
    pub share_public_memory: bool,
    /// Whether the node's Firecracker maps persistent memory (1.14 on,
    /// `[hypervisor] firecracker-version`). Without it a Firecracker VM's
    /// shared partitions are disks, and a spec asking for `pmem` is refused.
    #[serde(default)]
    pub firecracker_pmem: bool,
}

/// The first Firecracker release with a pmem device.
pub const FIRECRACKER_PMEM_SINCE: (u32, u32) = (1, 14);

/// Whether Firecracker `version` (`MAJOR.MINOR` or `MAJOR.MINOR.PATCH`, a
/// leading `v` allowed) maps persistent memory; an error names what does
/// not parse.
pub fn firecracker_has_pmem(version: &str) -> Result<bool, String> {
    let v = version.strip_prefix('v').unwrap_or(version);
    let parts: Vec<&str> = v.split('.').collect();
    let num = |s: &&str| s.parse::<u32>().ok().filter(|_| !s.is_empty() && s.len() <= 6);
    match parts.as_slice() {
        [major, minor] | [major, minor, _] if parts.iter().all(|p| num(p).is_some()) => {
            let (major, minor) = (num(major).unwrap_or(0), num(minor).unwrap_or(0));
            Ok((major, minor) >= FIRECRACKER_PMEM_SINCE)
        }
        _ => Err(format!("{version:?} is not a version MAJOR.MINOR[.PATCH]")),
    }
}

/// Everything a VM attaches from partitions, in the order its boot files
/// list the shared ones (the guest finds them by that order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachments {
    pub root: RootDisk,
    pub shared: Vec<SharedAttachment>,
}
