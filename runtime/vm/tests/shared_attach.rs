// Tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

//! How a shared partition reaches a guest: the spec's `shared-attach`, the
//! node's policy, the partition's layout and domain, the hypervisor.

use provd_domain::attach::{SharedAttach, SharedAttachment, SharedDevice, SharingPolicy};
use provd_vm::render::DiskDevice;
use provd_vm::shared_device;
use provd_vm::spec::{Hypervisor, VmSpec, parse_spec};

fn spec(hypervisor: &str, attach: Option<&str>) -> VmSpec {
    spec_booting(hypervisor, attach, "kernel = \"vmlinuz\"")
}

fn spec_booting(hypervisor: &str, attach: Option<&str>, boot: &str) -> VmSpec {
    let mut text = format!(
        "name = \"vm-1\"\nhypervisor = \"{hypervisor}\"\nvcpus = 1\nmemory-mib = 512\n\
         image = \"dir:/images/web\"\n"
    );
    if let Some(a) = attach {
        text.push_str(&format!("shared-attach = \"{a}\"\n"));
    }
    text.push_str(&format!("[boot]\n{boot}\n"));
    parse_spec(&text).unwrap()
}

fn partition(pmem_bytes: Option<u64>, public: bool) -> SharedAttachment {
    SharedAttachment {
        partition: "p-0123456789abcdef".into(),
        path: "/var/lib/provd/partitions/p-0123456789abcdef/shared.erofs".into(),
        device: SharedDevice::Disk,
        pmem_bytes,
        public,
    }
}

#[test]
fn a_shared_partition_is_persistent_memory_only_where_spec_node_layout_and_domain_allow() {
    let node = SharingPolicy::default();
    let dax = partition(Some(8 << 20), false);
    let pmem = DiskDevice::Pmem { bytes: 8 << 20 };
    // The node's default: persistent memory, where the layout allows it.
    assert_eq!(shared_device(&spec("libvirt", None), &dax, &node).unwrap(), pmem);
    assert_eq!(shared_device(&spec("cloud-hypervisor", None), &dax, &node).unwrap(), pmem);
    let lz4 = partition(None, false);
    assert_eq!(shared_device(&spec("libvirt", None), &lz4, &node).unwrap(), DiskDevice::Virtio);
    assert_eq!(
        shared_device(&spec("libvirt", Some("pmem")), &lz4, &node).unwrap(),
        DiskDevice::Virtio
    );
    // A firmware-booted guest's own initramfs may lack the drivers: it
    // gets persistent memory only when it asks.
    let uefi = |attach| spec_booting("libvirt", attach, "firmware = \"uefi\"");
    assert_eq!(shared_device(&uefi(None), &dax, &node).unwrap(), DiskDevice::Virtio);
    assert_eq!(shared_device(&uefi(Some("pmem")), &dax, &node).unwrap(), pmem);
    // A spec may ask for a disk.
    assert_eq!(
        shared_device(&spec("libvirt", Some("block")), &dax, &node).unwrap(),
        DiskDevice::Virtio
    );
    // Firecracker maps pmem from 1.14 on: where the node's does not (or
    // does not say), disks, and a spec asking for pmem is refused.
    assert_eq!(shared_device(&spec("firecracker", None), &dax, &node).unwrap(), DiskDevice::Virtio);
    let e = shared_device(&spec("firecracker", Some("pmem")), &dax, &node).unwrap_err();
    assert!(e.to_string().contains("firecracker-version"), "{e}");
    let fc = SharingPolicy { firecracker_pmem: true, ..node };
    assert_eq!(shared_device(&spec("firecracker", None), &dax, &fc).unwrap(), pmem);
    assert_eq!(shared_device(&spec("firecracker", Some("pmem")), &dax, &fc).unwrap(), pmem);
    for (v, has) in [("1.14.0", true), ("v1.15", true), ("2.0", true), ("1.13.1", false)] {
        assert_eq!(provd_domain::attach::firecracker_has_pmem(v), Ok(has), "{v}");
    }
    for v in ["", "1", "1.x", "1.14.0.1", "latest"] {
        assert!(provd_domain::attach::firecracker_has_pmem(v).is_err(), "{v}");
    }
    // A node of disks refuses a spec asking for persistent memory.
    let disks = SharingPolicy { attach: SharedAttach::Block, ..node };
    assert_eq!(shared_device(&spec("libvirt", None), &dax, &disks).unwrap(), DiskDevice::Virtio);
    let e = shared_device(&spec("libvirt", Some("pmem")), &dax, &disks).unwrap_err();
    assert!(e.to_string().contains("shared-attach") && e.to_string().contains("block"), "{e}");
    // The public catalogue: read past the host's page cache, whatever the
    // spec asks, unless the node shares it across tenants.
    let public = partition(Some(8 << 20), true);
    for attach in [None, Some("pmem"), Some("block")] {
        assert_eq!(
            shared_device(&spec("libvirt", attach), &public, &node).unwrap(),
            DiskDevice::VirtioDirect
        );
    }
    let e = shared_device(&spec("firecracker", None), &public, &node).unwrap_err();
    assert!(e.to_string().contains("share-public-memory"), "{e}");
    let shared = SharingPolicy { share_public_memory: true, ..node };
    assert_eq!(shared_device(&spec("libvirt", None), &public, &shared).unwrap(), pmem);
    assert_eq!(spec("libvirt", None).hypervisor, Hypervisor::Libvirt);
}

#[test]
fn shared_attach_is_pmem_or_block() {
    let e = VmSpec::from_toml(
        "name = \"vm-1\"\nhypervisor = \"libvirt\"\nvcpus = 1\nmemory-mib = 512\n\
         image = \"x\"\nshared-attach = \"dax\"\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("shared-attach"), "{e}");
}
