//! The guest boot ABI: what a private partition tells its guest's
//! initramfs (`provd/stack`, `provd/shared`) and the script that reads it.

use crate::{PrivateManifest, SharedFormat, SharedRef};

/// The boot script installed into guests, also written into every private
/// partition.
pub const OVERLAY_ROOT_SCRIPT: &str = include_str!("../assets/provd-overlay-root");

/// How a guest finds a shared partition: the fstype and the device (or
/// virtio-fs tag) it mounts.
pub(crate) fn mount_source(s: &SharedRef) -> (&'static str, String) {
    if s.format == SharedFormat::Dir {
        ("virtiofs", format!("provd-{}", s.partition))
    } else {
        (s.format.fstype(), format!("/dev/disk/by-uuid/{}", s.uuid.as_deref().unwrap_or_default()))
    }
}

/// `provd/stack` of a private partition: its layers, bottom first, one
/// `<shared index> <layer>` per line (bare layer names on one partition).
pub(crate) fn stack_file(m: &PrivateManifest) -> String {
    if m.one_partition_format() {
        return m.stack.iter().map(|s| format!("{}\n", s.layer)).collect();
    }
    m.stack.iter().map(|s| format!("{} {}\n", s.shared, s.layer)).collect()
}

/// `provd/shared` of a private partition: how its guest finds each shared
/// partition, one `<index> <fstype> <device>` per line (`fstype=` and
/// `device=` lines for one partition).
pub(crate) fn shared_file(m: &PrivateManifest) -> String {
    if m.one_partition_format() {
        return match m.shared.first() {
            None => String::new(),
            Some(s) => {
                let (fstype, device) = mount_source(s);
                format!("fstype={fstype}\ndevice={device}\n")
            }
        };
    }
    m.shared
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (fstype, device) = mount_source(s);
            format!("{i} {fstype} {device}\n")
        })
        .collect()
}
