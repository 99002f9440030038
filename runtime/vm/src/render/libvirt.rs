//! libvirt domain XML (QEMU/KVM, q35, x86_64).
//!
//! Written with quick-xml's writer so every attribute and text is escaped
//! by the library, never by string formatting; labels are user text.

use std::io;

use quick_xml::Writer;
use quick_xml::events::{BytesDecl, BytesText, Event};

use super::{BootPlan, DiskDevice, DiskRole, NicBackend, Plan, RenderError, RenderInput, plan};
use crate::spec::Firmware;

/// XML namespace of the labels in a domain's `<metadata>`.
pub const LABELS_NAMESPACE: &str = "https://provd.invalid/xmlns/labels/1";
/// libvirt's namespace for arguments passed to QEMU as they are.
pub const QEMU_NAMESPACE: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// The persistent-memory disks of a plan: (id, path, bytes), in attach
/// order.
fn pmem_disks<'a>(p: &'a Plan) -> Vec<(&'a str, &'a str, u64)> {
    p.disks
        .iter()
        .filter_map(|d| match d.device {
            DiskDevice::Pmem { bytes } => Some((d.name, d.path, bytes)),
            _ => None,
        })
        .collect()
}

/// QEMU's arguments for persistent memory: each file a
/// `memory-backend-file` opened read-only and mapped private
/// (`readonly=on,share=off`), so that no guest write reaches it, on a
/// `virtio-pmem-pci` device. libvirt's own `<memory model='virtio-pmem'>`
/// maps the file shared and writable (libvirt 9 refuses private access
/// for it), which would let a guest change what other VMs map; so the
/// devices are passed to QEMU as arguments, as JSON, whose quoting is
/// the library's. `<maxMemory>` and a NUMA cell give QEMU the room for
/// device memory they need.
pub fn pmem_qemu_args(id: &str, index: usize, path: &str, bytes: u64) -> [String; 4] {
    let memdev = format!("provd-pmem{index}");
    let object = serde_json::json!({
        "qom-type": "memory-backend-file", "id": memdev, "mem-path": path,
        "size": bytes, "share": false, "readonly": true,
    });
    let device = serde_json::json!({"driver": "virtio-pmem-pci", "memdev": memdev, "id": id});
    ["-object".into(), object.to_string(), "-device".into(), device.to_string()]
}

type W = Writer<Vec<u8>>;

/// libvirt's name for the n-th disk on a bus with prefix `vd`/`sd`:
/// a..z, then aa..zz, as `virDiskNameParse` reads them back.
fn disk_target(prefix: &str, mut n: usize) -> String {
    let mut letters = Vec::new();
    loop {
        // n % 26 < 26, so the cast cannot truncate.
        letters.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    letters.reverse();
    format!("{prefix}{}", String::from_utf8_lossy(&letters))
}

/// The domain XML for `input`.
pub fn libvirt_xml(input: &RenderInput) -> Result<String, RenderError> {
    let plan = plan(input)?;
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    write_domain(&mut w, &plan)
        .map_err(|e| RenderError::Write { what: "domain xml", message: e.to_string() })?;
    let mut text = String::from_utf8(w.into_inner())
        .map_err(|e| RenderError::Write { what: "domain xml", message: e.to_string() })?;
    text.push('\n');
    Ok(text)
}

fn write_domain(w: &mut W, p: &Plan) -> io::Result<()> {
    let spec = p.spec;
    let mem = spec.memory_mib.to_string();
    let vcpus = spec.vcpus.to_string();
    w.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))?;
    let domain_type = p.machine.domain_type.as_str();
    let domain = w.create_element("domain").with_attribute(("type", domain_type));
    let domain = if pmem_disks(p).is_empty() {
        domain
    } else {
        domain.with_attribute(("xmlns:qemu", QEMU_NAMESPACE))
    };
    domain.write_inner_content(|w| {
        text(w, "name", &spec.name)?;
        text(w, "uuid", &p.uuid)?;
        if !spec.labels.is_empty() {
            w.create_element("metadata").write_inner_content(|w| {
                w.create_element("provd:labels")
                    .with_attribute(("xmlns:provd", LABELS_NAMESPACE))
                    .write_inner_content(|w| {
                        for (k, v) in &spec.labels {
                            w.create_element("provd:label")
                                .with_attribute(("key", k.as_str()))
                                .write_text_content(BytesText::new(v))?;
                        }
                        Ok(())
                    })?;
                Ok(())
            })?;
        }
        let pmem = pmem_disks(p);
        if !pmem.is_empty() {
            // Room for every device in whole MiB beyond the guest's memory.
            let extra: u64 = pmem.iter().map(|(_, _, b)| b.div_ceil(1 << 20)).sum();
            w.create_element("maxMemory")
                .with_attribute(("slots", pmem.len().to_string().as_str()))
                .with_attribute(("unit", "MiB"))
                .write_text_content(BytesText::new(
                    &spec.memory_mib.saturating_add(extra).to_string(),
                ))?;
        }
        w.create_element("memory")
            .with_attribute(("unit", "MiB"))
            .write_text_content(BytesText::new(&mem))?;
        w.create_element("currentMemory")
            .with_attribute(("unit", "MiB"))
            .write_text_content(BytesText::new(&mem))?;
        if !p.shared_dirs.is_empty() {
            // virtiofsd maps guest memory, so it must be shared, file-backed.
            w.create_element("memoryBacking").write_inner_content(|w| {
                w.create_element("source").with_attribute(("type", "memfd")).write_empty()?;
                w.create_element("access").with_attribute(("mode", "shared")).write_empty()?;
                Ok(())
            })?;
        }
        w.create_element("vcpu")
            .with_attribute(("placement", "static"))
            .write_text_content(BytesText::new(&vcpus))?;
        write_os(w, p)?;
        w.create_element("features").write_inner_content(|w| {
            w.create_element("acpi").write_empty()?;
            w.create_element("apic").write_empty()?;
            Ok(())
        })?;
        // Never QEMU's default model (qemu64): it lacks the x86-64-v2
        // features current distributions require.
        let cpu = w
            .create_element("cpu")
            .with_attribute(("mode", p.machine.cpu_mode.as_str()))
            .with_attribute(("check", "none"));
        if spec.topology.is_none() && pmem.is_empty() {
            cpu.write_empty()?;
        } else {
            cpu.write_inner_content(|w| {
                if let Some(t) = &spec.topology {
                    w.create_element("topology")
                        .with_attribute(("sockets", t.sockets.to_string().as_str()))
                        .with_attribute(("cores", t.cores.to_string().as_str()))
                        .with_attribute(("threads", t.threads.to_string().as_str()))
                        .write_empty()?;
                }
                if !pmem.is_empty() {
                    // libvirt wants a NUMA node wherever device memory is.
                    let cpus = format!("0-{}", spec.vcpus.saturating_sub(1));
                    w.create_element("numa").write_inner_content(|w| {
                        w.create_element("cell")
                            .with_attribute(("id", "0"))
                            .with_attribute(("cpus", cpus.as_str()))
                            .with_attribute(("memory", mem.as_str()))
                            .with_attribute(("unit", "MiB"))
                            .write_empty()?;
                        Ok(())
                    })?;
                }
                Ok(())
            })?;
        }
        w.create_element("clock").with_attribute(("offset", "utc")).write_empty()?;
        text(w, "on_poweroff", "destroy")?;
        text(w, "on_reboot", "restart")?;
        text(w, "on_crash", "destroy")?;
        w.create_element("devices").write_inner_content(|w| write_devices(w, p))?;
        if let Some((uid, gid)) = p.run_as {
            // The files were handed to this user and group by provd; libvirt
            // must not relabel them, least of all a shared partition other
            // running VMs read.
            let label = format!("+{uid}:+{gid}");
            w.create_element("seclabel")
                .with_attribute(("type", "static"))
                .with_attribute(("model", "dac"))
                .with_attribute(("relabel", "no"))
                .write_inner_content(|w| text(w, "label", &label))?;
        }
        if !pmem.is_empty() {
            w.create_element("qemu:commandline").write_inner_content(|w| {
                for (index, (id, path, bytes)) in pmem.iter().enumerate() {
                    for arg in pmem_qemu_args(id, index, path, *bytes) {
                        w.create_element("qemu:arg")
                            .with_attribute(("value", arg.as_str()))
                            .write_empty()?;
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    })?;
    Ok(())
}

fn text(w: &mut W, name: &str, value: &str) -> io::Result<()> {
    w.create_element(name).write_text_content(BytesText::new(value))?;
    Ok(())
}

fn write_os(w: &mut W, p: &Plan) -> io::Result<()> {
    let os = w.create_element("os");
    let os = match &p.boot {
        BootPlan::Firmware { firmware: Firmware::Uefi, .. } => {
            // Firmware autoselection: libvirt picks an OVMF build and its
            // NVRAM template from the host's firmware descriptors.
            os.with_attribute(("firmware", "efi"))
        }
        _ => os,
    };
    os.write_inner_content(|w| {
        w.create_element("type")
            .with_attribute(("arch", "x86_64"))
            .with_attribute(("machine", "q35"))
            .write_text_content(BytesText::new("hvm"))?;
        match &p.boot {
            BootPlan::Kernel { kernel, initrd, cmdline } => {
                text(w, "kernel", kernel)?;
                if let Some(i) = initrd {
                    text(w, "initrd", i)?;
                }
                if let Some(c) = cmdline {
                    text(w, "cmdline", c)?;
                }
            }
            BootPlan::Firmware { .. } => {
                w.create_element("boot").with_attribute(("dev", "hd")).write_empty()?;
            }
        }
        Ok(())
    })?;
    Ok(())
}

fn write_devices(w: &mut W, p: &Plan) -> io::Result<()> {
    // Every disk, the seed too, is a virtio disk: cloud-init finds its seed
    // by the label `cidata` on any block device, and kernels built for
    // virtual machines (Debian's cloud kernel) have no SATA driver for a
    // CD-ROM on q35.
    // Persistent memory is no disk: it is QEMU's arguments (see
    // `pmem_qemu_args`), and takes no disk name.
    let disks = p.disks.iter().filter(|d| !matches!(d.device, DiskDevice::Pmem { .. }));
    for (i, d) in disks.enumerate() {
        let target = disk_target("vd", i);
        w.create_element("disk")
            .with_attribute(("type", "file"))
            .with_attribute(("device", "disk"))
            .write_inner_content(|w| {
                let driver = w
                    .create_element("driver")
                    .with_attribute(("name", "qemu"))
                    .with_attribute(("type", d.format.as_str()));
                // cache='none' opens the file O_DIRECT, past the host's
                // page cache.
                let driver = if d.device == DiskDevice::VirtioDirect {
                    driver.with_attribute(("cache", "none")).with_attribute(("io", "native"))
                } else {
                    driver
                };
                driver.write_empty()?;
                w.create_element("source").with_attribute(("file", d.path)).write_empty()?;
                w.create_element("target")
                    .with_attribute(("dev", target.as_str()))
                    .with_attribute(("bus", "virtio"))
                    .write_empty()?;
                if d.read_only {
                    w.create_element("readonly").write_empty()?;
                }
                if d.role == DiskRole::Shared {
                    w.create_element("shareable").write_empty()?;
                }
                // The guest finds the disk by it (/dev/disk/by-id/virtio-<name>).
                w.create_element("serial").write_text_content(BytesText::new(d.name))?;
                Ok(())
            })?;
    }
    for sd in &p.shared_dirs {
        w.create_element("filesystem")
            .with_attribute(("type", "mount"))
            .with_attribute(("accessmode", "passthrough"))
            .write_inner_content(|w| {
                w.create_element("driver").with_attribute(("type", "virtiofs")).write_empty()?;
                w.create_element("source").with_attribute(("dir", sd.path)).write_empty()?;
                w.create_element("target").with_attribute(("dir", sd.tag)).write_empty()?;
                w.create_element("readonly").write_empty()?;
                Ok(())
            })?;
    }
    for nic in &p.nics {
        let kind = match nic.backend {
            NicBackend::Bridge(_) => "bridge",
            NicBackend::Tap(_) => "ethernet",
        };
        w.create_element("interface").with_attribute(("type", kind)).write_inner_content(|w| {
            w.create_element("mac").with_attribute(("address", nic.mac.as_str())).write_empty()?;
            match nic.backend {
                NicBackend::Bridge(b) => {
                    w.create_element("source").with_attribute(("bridge", b)).write_empty()?;
                }
                NicBackend::Tap(t) => {
                    // managed='no': provd creates the tap and owns it.
                    w.create_element("target")
                        .with_attribute(("dev", t))
                        .with_attribute(("managed", "no"))
                        .write_empty()?;
                }
            }
            w.create_element("model").with_attribute(("type", "virtio")).write_empty()?;
            Ok(())
        })?;
    }
    w.create_element("serial").with_attribute(("type", "pty")).write_inner_content(|w| {
        if let Some(log) = p.serial_log {
            w.create_element("log")
                .with_attribute(("file", log))
                .with_attribute(("append", "on"))
                .write_empty()?;
        }
        w.create_element("target").with_attribute(("port", "0")).write_empty()?;
        Ok(())
    })?;
    w.create_element("console").with_attribute(("type", "pty")).write_inner_content(|w| {
        w.create_element("target")
            .with_attribute(("type", "serial"))
            .with_attribute(("port", "0"))
            .write_empty()?;
        Ok(())
    })?;
    // Entropy for early boot (cloud-init generates host keys).
    w.create_element("rng").with_attribute(("model", "virtio")).write_inner_content(|w| {
        w.create_element("backend")
            .with_attribute(("model", "random"))
            .write_text_content(BytesText::new("/dev/urandom"))?;
        Ok(())
    })?;
    w.create_element("memballoon").with_attribute(("model", "none")).write_empty()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use super::disk_target;

    #[test]
    fn disk_targets_follow_libvirt_naming() {
        assert_eq!(disk_target("vd", 0), "vda");
        assert_eq!(disk_target("vd", 25), "vdz");
        assert_eq!(disk_target("vd", 26), "vdaa");
        assert_eq!(disk_target("vd", 27), "vdab");
        assert_eq!(disk_target("vd", 701), "vdzz");
        assert_eq!(disk_target("vd", 702), "vdaaa");
    }
}
