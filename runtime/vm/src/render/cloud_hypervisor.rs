//! Cloud Hypervisor: the body of `PUT /api/v1/vm.create`.
//!
//! Field names follow the `VmConfig` schema of Cloud Hypervisor's API
//! (`vmm/src/api/openapi/cloud-hypervisor.yaml`, checked against v51's
//! `vmm/src/vm_config.rs`); only fields provd sets are written, the rest
//! keep Cloud Hypervisor's defaults.

use serde_json::{Map, Value, json};

use super::{BootPlan, DiskDevice, DiskFormat, NicBackend, RenderError, RenderInput, plan};
use crate::spec::Firmware;

/// The `vm.create` body for `input`.
pub fn cloud_hypervisor_json(input: &RenderInput) -> Result<Value, RenderError> {
    let p = plan(input)?;
    let spec = p.spec;
    let mut vm = Map::new();

    let mut cpus = Map::new();
    cpus.insert("boot_vcpus".into(), json!(spec.vcpus));
    cpus.insert("max_vcpus".into(), json!(spec.vcpus));
    if let Some(t) = &spec.topology {
        cpus.insert(
            "topology".into(),
            json!({
                "threads_per_core": t.threads,
                "cores_per_die": t.cores,
                "dies_per_package": 1,
                "packages": t.sockets,
            }),
        );
    }
    vm.insert("cpus".into(), Value::Object(cpus));
    vm.insert(
        "memory".into(),
        json!({
            // Bytes; validation bounds memory-mib to 2^20, so no overflow.
            "size": spec.memory_mib.saturating_mul(1024 * 1024),
            // vhost-user (virtiofsd) maps guest memory: it must be shared.
            "shared": !p.shared_dirs.is_empty(),
        }),
    );

    let payload = match &p.boot {
        BootPlan::Kernel { kernel, initrd, cmdline } => {
            let mut m = Map::new();
            m.insert("kernel".into(), json!(kernel));
            if let Some(i) = initrd {
                m.insert("initramfs".into(), json!(i));
            }
            if let Some(c) = cmdline {
                m.insert("cmdline".into(), json!(c));
            }
            m
        }
        BootPlan::Firmware { firmware: Firmware::Bios, .. } => {
            return Err(RenderError::field(
                "boot.firmware",
                "cloud-hypervisor has no bios; use uefi (with a CLOUDHV.fd firmware image) or kernel boot",
            ));
        }
        BootPlan::Firmware { firmware: Firmware::Uefi, image } => {
            let image = image.ok_or_else(|| {
                RenderError::field(
                    "input.firmware",
                    "uefi boot on cloud-hypervisor needs the path of a firmware image",
                )
            })?;
            let mut m = Map::new();
            m.insert("firmware".into(), json!(image));
            m
        }
    };
    vm.insert("payload".into(), Value::Object(payload));

    let mut disks = Vec::with_capacity(p.disks.len());
    let mut pmem = Vec::new();
    for d in &p.disks {
        if let DiskDevice::Pmem { bytes } = d.device {
            // discard_writes: the file is opened read-only and mapped
            // private, so that a guest's writes never reach it.
            pmem.push(json!({
                "id": d.name, "file": d.path, "size": bytes, "discard_writes": true,
            }));
            continue;
        }
        let mut disk = json!({
            "id": d.name,
            "path": d.path,
            "readonly": d.read_only,
            // The guest finds the disk by it (/dev/disk/by-id/virtio-<name>).
            "serial": d.name,
            // Explicit, so a raw image whose first bytes look like a
            // qcow2 header is never probed as one.
            "image_type": match d.format {
                DiskFormat::Raw => "Raw",
                DiskFormat::Qcow2 => "Qcow2",
            },
        });
        if d.device == DiskDevice::VirtioDirect
            && let Some(m) = disk.as_object_mut()
        {
            // O_DIRECT: past the host's page cache.
            m.insert("direct".into(), json!(true));
        }
        disks.push(disk);
    }
    vm.insert("disks".into(), Value::Array(disks));
    if !pmem.is_empty() {
        vm.insert("pmem".into(), Value::Array(pmem));
    }

    let mut net = Vec::with_capacity(p.nics.len());
    for nic in &p.nics {
        match nic.backend {
            NicBackend::Bridge(_) => {
                return Err(RenderError::field(
                    format!("nics[{}].bridge", nic.index),
                    "cloud-hypervisor attaches to tap devices only; put a tap on the bridge and name it in tap",
                ));
            }
            NicBackend::Tap(tap) => {
                // No ip/mask: the tap exists and provd configured the host
                // side; Cloud Hypervisor then leaves it as it is.
                net.push(json!({ "id": format!("net{}", nic.index), "tap": tap, "mac": nic.mac }));
            }
        }
    }
    if !net.is_empty() {
        vm.insert("net".into(), Value::Array(net));
    }

    if !p.shared_dirs.is_empty() {
        let fs: Vec<Value> = p
            .shared_dirs
            .iter()
            .enumerate()
            .map(|(i, sd)| {
                json!({
                    "id": format!("fs{i}"),
                    "tag": sd.tag,
                    "socket": sd.socket,
                    // Required by the OpenAPI schema; these are the VMM's defaults.
                    "num_queues": 1,
                    "queue_size": 1024,
                })
            })
            .collect();
        vm.insert("fs".into(), Value::Array(fs));
    }

    // A `File` serial grows without bound as the guest prints. The VMM
    // listens on a socket beside the log instead, and the console reader
    // (`provctl vm console-log`, see `crate::console`) keeps the log capped
    // and rotated.
    let serial = match p.serial_log {
        Some(file) => {
            let socket = match file.rsplit_once('/') {
                Some((dir, _)) => format!("{dir}/{}", crate::console::SOCKET_NAME),
                None => crate::console::SOCKET_NAME.to_string(),
            };
            if socket.len() > crate::console::MAX_SOCKET_PATH {
                return Err(RenderError::field(
                    "input.serial_log",
                    format!(
                        "the serial socket {socket} is longer than a Unix socket path \
                         holds ({} bytes)",
                        crate::console::MAX_SOCKET_PATH
                    ),
                ));
            }
            json!({ "mode": "Socket", "socket": socket })
        }
        None => json!({ "mode": "Pty" }),
    };
    vm.insert("serial".into(), serial);
    // One console is enough: the serial port, which every kernel has early.
    vm.insert("console".into(), json!({ "mode": "Off" }));
    Ok(Value::Object(vm))
}
