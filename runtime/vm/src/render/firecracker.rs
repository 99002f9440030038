//! Firecracker: the document `firecracker --config-file` reads.
//!
//! Field names follow `VmmConfig` in Firecracker's
//! `src/vmm/src/resources.rs` and the structs it names in
//! `src/vmm/src/vmm_config/` (most with `deny_unknown_fields`), as in
//! `tests/framework/vm_config.json`.

use serde_json::{Map, Value, json};

use super::{
    BootPlan, DiskDevice, DiskFormat, DiskRole, NicBackend, RenderError, RenderInput, plan,
};

/// Firecracker's `MAX_SUPPORTED_VCPUS` (`vmm_config/machine_config.rs`).
pub const FIRECRACKER_MAX_VCPUS: u32 = 32;

/// The `--config-file` document for `input`.
pub fn firecracker_json(input: &RenderInput) -> Result<Value, RenderError> {
    let p = plan(input)?;
    let spec = p.spec;
    if spec.vcpus > FIRECRACKER_MAX_VCPUS {
        return Err(RenderError::field(
            "vcpus",
            format!("firecracker runs at most {FIRECRACKER_MAX_VCPUS} vcpus, not {}", spec.vcpus),
        ));
    }
    // Firecracker's only topology knob is SMT (two threads per core) in a
    // single socket.
    let smt = match &spec.topology {
        None => false,
        Some(t) => {
            if t.sockets != 1 {
                return Err(RenderError::field(
                    "topology.sockets",
                    "firecracker presents a single socket",
                ));
            }
            match t.threads {
                1 => false,
                2 => true,
                n => {
                    return Err(RenderError::field(
                        "topology.threads",
                        format!("firecracker has 1 or 2 threads per core, not {n}"),
                    ));
                }
            }
        }
    };
    let BootPlan::Kernel { kernel, initrd, cmdline } = &p.boot else {
        return Err(RenderError::field(
            "boot.firmware",
            "firecracker boots a kernel directly and has no firmware; set boot.kernel",
        ));
    };
    if !p.shared_dirs.is_empty() {
        return Err(RenderError::field(
            "input.shared_dirs",
            "firecracker has no virtio-fs; use a disk-format shared partition",
        ));
    }

    let mut boot = Map::new();
    boot.insert("kernel_image_path".into(), json!(kernel));
    if let Some(i) = initrd {
        boot.insert("initrd_path".into(), json!(i));
    }
    if let Some(c) = cmdline {
        boot.insert("boot_args".into(), json!(c));
    }

    let mut drives = Vec::with_capacity(p.disks.len());
    let mut pmem = Vec::new();
    for d in &p.disks {
        match d.device {
            DiskDevice::Virtio => {}
            DiskDevice::VirtioDirect => {
                return Err(RenderError::field(
                    format!("{}.device", d.field),
                    "firecracker cannot read a disk past the host's page cache",
                ));
            }
            DiskDevice::Pmem { .. } => {
                // Firecracker 1.14's pmem device; read_only maps the file
                // read-only, so no guest write reaches it.
                pmem.push(json!({
                    "id": d.name, "path_on_host": d.path,
                    "root_device": false, "read_only": true,
                }));
                continue;
            }
        }
        if d.format != DiskFormat::Raw {
            // d.field is the spec's disks[i] for a data disk, the input's
            // entry for provd's own disks.
            return Err(RenderError::field(
                format!("{}.format", d.field),
                format!("firecracker reads raw images only, not {}", d.format.as_str()),
            ));
        }
        drives.push(json!({
            "drive_id": d.name,
            "path_on_host": d.path,
            // The private partition is the root; the NoCloud seed is a
            // plain read-only drive (Firecracker has no cdrom), which
            // cloud-init finds by its cidata label all the same.
            "is_root_device": d.role == DiskRole::Private,
            "is_read_only": d.read_only,
        }));
    }

    let mut ifaces = Vec::with_capacity(p.nics.len());
    for nic in &p.nics {
        match nic.backend {
            NicBackend::Bridge(_) => {
                return Err(RenderError::field(
                    format!("nics[{}].bridge", nic.index),
                    "firecracker attaches to tap devices only; put a tap on the bridge and name it in tap",
                ));
            }
            NicBackend::Tap(tap) => ifaces.push(json!({
                "iface_id": format!("net{}", nic.index),
                "guest_mac": nic.mac,
                "host_dev_name": tap,
            })),
        }
    }

    let mut config = json!({
        "boot-source": Value::Object(boot),
        "drives": drives,
        "machine-config": {
            "vcpu_count": spec.vcpus,
            "mem_size_mib": spec.memory_mib,
            "smt": smt,
        },
        "network-interfaces": ifaces,
    });
    if !pmem.is_empty()
        && let Some(m) = config.as_object_mut()
    {
        m.insert("pmem".into(), Value::Array(pmem));
    }
    Ok(config)
}
