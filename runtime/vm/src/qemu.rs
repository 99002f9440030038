//! Boots a libvirt domain provd wrote under plain `qemu-system-x86_64`,
//! without libvirt: the smoke test of a VM's configuration on a node (or a
//! CI machine) that runs no libvirtd.
//!
//! Only what the domain says is used: memory, vCPUs, machine type, kernel,
//! initrd and command line, and every disk with its format, read-only flag
//! and serial (the guest finds its partitions by them). The serial console
//! goes to standard output. Network interfaces are left out (a bridge needs
//! the node's network set up) and said so; firmware boot and virtio-fs
//! shares are refused, naming what is missing.

use std::path::{Path, PathBuf};

use quick_xml::Reader;
use quick_xml::XmlVersion;
use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::{BytesStart, Event};

/// Largest domain XML read; provd's own are a few KiB.
const MAX_XML_BYTES: usize = 1 << 20;

/// How qemu runs the guest's CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// Software emulation (TCG): slower, runs anywhere.
    Tcg,
}

impl Accel {
    /// KVM when `/dev/kvm` opens for reading and writing and the CPU
    /// advertises virtualisation (`vmx` or `svm` in `/proc/cpuinfo`), TCG
    /// otherwise. A nested VM may offer `/dev/kvm` without the extensions;
    /// its vCPUs then fail or hang, so the device alone is not enough.
    pub fn detect() -> Accel {
        let opens = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
        let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let extensions = cpu
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        if opens && extensions { Accel::Kvm } else { Accel::Tcg }
    }

    /// Its name on qemu's command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The domain type and CPU mode a libvirt domain provd wrote asks for, so
/// that writing it again (a repack's new disks) keeps the machine it was
/// configured with. `None` when the XML does not say or names values
/// provd does not write.
pub fn domain_machine(xml: &str) -> Option<provd_domain::Machine> {
    use provd_domain::{CpuMode, DomainType, Machine};
    if xml.len() > MAX_XML_BYTES {
        return None;
    }
    let mut reader = Reader::from_str(xml);
    let (mut domain_type, mut cpu_mode) = (None, None);
    // Elements open around the reader: `<domain>` at 0, `<cpu>` at 1.
    let mut depth = 0usize;
    loop {
        let (e, opens) = match reader.read_event().ok()? {
            Event::Start(e) => (e, true),
            Event::Empty(e) => (e, false),
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                continue;
            }
            Event::Eof => break,
            _ => continue,
        };
        match (depth, e.name().as_ref()) {
            (0, "domain") => {
                domain_type = match attr(&e, "type").ok()??.as_str() {
                    "kvm" => Some(DomainType::Kvm),
                    "qemu" => Some(DomainType::Qemu),
                    _ => return None,
                };
            }
            (1, "cpu") => {
                cpu_mode = match attr(&e, "mode").ok()??.as_str() {
                    "host-passthrough" => Some(CpuMode::HostPassthrough),
                    "host-model" => Some(CpuMode::HostModel),
                    "maximum" => Some(CpuMode::Maximum),
                    _ => return None,
                };
            }
            _ => {}
        }
        if opens {
            depth += 1;
        }
    }
    Machine::new(domain_type?, cpu_mode).ok()
}

/// Why a domain cannot be booted under plain qemu.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QemuError {
    /// The XML does not parse or lacks what a boot needs.
    #[error("domain XML: {0}")]
    Invalid(String),
    /// The domain asks for something this runner does not do.
    #[error("not supported by a plain qemu boot: {0}")]
    Unsupported(String),
}

/// One disk of the domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QemuDisk {
    /// Host path.
    pub file: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
    /// Attached read-only.
    pub read_only: bool,
    /// The serial the guest sees (`root`, `shared-0`, `seed`…).
    pub serial: String,
    /// Read past the host's page cache (`cache='none'`).
    pub direct: bool,
}

/// A persistent-memory device of the domain: a file QEMU maps read-only
/// and private.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QemuPmem {
    /// Device id (`shared-0`).
    pub id: String,
    /// Host path.
    pub file: PathBuf,
    /// Bytes mapped: the file's size.
    pub bytes: u64,
}

/// What a domain gives qemu.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Domain {
    /// Domain name.
    pub name: String,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Machine type (`q35`).
    pub machine: String,
    /// Kernel path.
    pub kernel: PathBuf,
    /// Initrd path, if any.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Disks in the domain's order.
    pub disks: Vec<QemuDisk>,
    /// Persistent-memory devices in the domain's order.
    pub pmem: Vec<QemuPmem>,
    /// Network interfaces the domain has and the boot leaves out.
    pub nics_left_out: usize,
}

fn attr(e: &BytesStart, name: &str) -> Result<Option<String>, QemuError> {
    for a in e.attributes() {
        let a = a.map_err(|e| QemuError::Invalid(e.to_string()))?;
        if a.key.as_ref() == name {
            let v = a
                .normalized_value(XmlVersion::Implicit1_0)
                .map_err(|e| QemuError::Invalid(e.to_string()))?;
            return Ok(Some(v.into_owned()));
        }
    }
    Ok(None)
}

/// Reads the parts of a libvirt domain XML a qemu boot needs.
pub fn parse_domain(xml: &str) -> Result<Domain, QemuError> {
    if xml.len() > MAX_XML_BYTES {
        return Err(QemuError::Invalid(format!(
            "{} bytes; the limit is {MAX_XML_BYTES}",
            xml.len()
        )));
    }
    let mut reader = Reader::from_str(xml);
    let mut d = Domain::default();
    // Where the reader is, `domain/devices/disk`, kept by pushing and
    // truncating: each event costs its own name, whatever the depth.
    let mut at = String::new();
    let mut starts: Vec<usize> = Vec::new();
    let mut disk: Option<QemuDisk> = None;
    let mut qemu_args: Vec<String> = Vec::new();
    let mut memory_unit = String::from("KiB");
    let mut kernel = None;
    let mut firmware = None;
    // Text of the element being read: text events with the references
    // between them resolved.
    let mut text = String::new();
    loop {
        let event = reader.read_event().map_err(|e| {
            QemuError::Invalid(format!("at byte {}: {e}", reader.buffer_position()))
        })?;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                text.clear();
                starts.push(at.len());
                if !at.is_empty() {
                    at.push('/');
                }
                at.push_str(e.name().as_ref());
                match at.as_str() {
                    "domain/memory" => {
                        memory_unit = attr(e, "unit")?.unwrap_or_else(|| "KiB".into());
                    }
                    "domain/os" => firmware = attr(e, "firmware")?,
                    "domain/os/type" => d.machine = attr(e, "machine")?.unwrap_or_default(),
                    "domain/os/loader" => firmware = Some("loader".into()),
                    "domain/devices/disk" => {
                        if attr(e, "type")?.as_deref() != Some("file") {
                            return Err(QemuError::Unsupported("a disk that is not a file".into()));
                        }
                        disk = Some(QemuDisk::default());
                    }
                    "domain/devices/disk/driver" => {
                        if let Some(k) = disk.as_mut() {
                            k.format = attr(e, "type")?.unwrap_or_else(|| "raw".into());
                            k.direct = attr(e, "cache")?.as_deref() == Some("none");
                        }
                    }
                    "domain/qemu:commandline/qemu:arg" => {
                        qemu_args.push(attr(e, "value")?.unwrap_or_default());
                    }
                    "domain/devices/memory" => {
                        return Err(QemuError::Unsupported(
                            "a memory device of libvirt's (provd passes persistent memory as \
                             qemu arguments)"
                                .into(),
                        ));
                    }
                    "domain/devices/disk/source" => {
                        if let Some(k) = disk.as_mut() {
                            k.file = attr(e, "file")?.unwrap_or_default().into();
                        }
                    }
                    "domain/devices/disk/readonly" => {
                        if let Some(k) = disk.as_mut() {
                            k.read_only = true;
                        }
                    }
                    "domain/devices/filesystem" => {
                        return Err(QemuError::Unsupported(
                            "a virtio-fs share (a shared partition of format dir) needs virtiofsd"
                                .into(),
                        ));
                    }
                    "domain/devices/interface" => d.nics_left_out += 1,
                    _ => {}
                }
                if matches!(event, Event::Empty(_)) {
                    if at == "domain/devices/disk" {
                        // An empty <disk/> has no source.
                        return Err(QemuError::Invalid("a disk without a source".into()));
                    }
                    at.truncate(starts.pop().unwrap_or(0));
                }
            }
            Event::Text(t) => text.push_str(&t.xml_content(XmlVersion::Implicit1_0)),
            Event::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref() {
                    Ok(Some(c)) => Some(c.to_string()),
                    _ => resolve_predefined_entity(&r.xml_content(XmlVersion::Implicit1_0))
                        .map(str::to_string),
                };
                let resolved = resolved.ok_or_else(|| {
                    QemuError::Invalid(format!(
                        "unknown entity at byte {}",
                        reader.buffer_position()
                    ))
                })?;
                text.push_str(&resolved);
            }
            Event::End(_) => {
                let text = std::mem::take(&mut text).trim().to_string();
                match at.as_str() {
                    "domain/name" => d.name = text,
                    "domain/memory" => {
                        let n: u64 = text
                            .parse()
                            .map_err(|_| QemuError::Invalid(format!("memory {text:?}")))?;
                        d.memory_mib = match memory_unit.as_str() {
                            "MiB" | "M" => n,
                            "GiB" | "G" => n.saturating_mul(1024),
                            "KiB" | "k" | "K" => n / 1024,
                            u => return Err(QemuError::Invalid(format!("memory unit {u:?}"))),
                        };
                    }
                    "domain/vcpu" => {
                        d.vcpus = text
                            .parse()
                            .map_err(|_| QemuError::Invalid(format!("vcpu {text:?}")))?;
                    }
                    "domain/os/kernel" => kernel = Some(PathBuf::from(text)),
                    "domain/os/initrd" => d.initrd = Some(PathBuf::from(text)),
                    "domain/os/cmdline" => d.cmdline = text,
                    "domain/devices/disk/serial" => {
                        if let Some(k) = disk.as_mut() {
                            k.serial = text;
                        }
                    }
                    _ => {}
                }
                if at == "domain/devices/disk"
                    && let Some(k) = disk.take()
                {
                    if k.file.as_os_str().is_empty() {
                        return Err(QemuError::Invalid("a disk without a source file".into()));
                    }
                    d.disks.push(k);
                }
                at.truncate(starts.pop().unwrap_or(0));
            }
            Event::Eof => break,
            _ => {}
        }
    }
    d.kernel = match (kernel, firmware) {
        (Some(k), _) => k,
        (None, f) => {
            return Err(QemuError::Unsupported(format!(
                "the domain boots through firmware ({}); boot it with a kernel (boot.kernel in the spec)",
                f.unwrap_or_else(|| "bios".into())
            )));
        }
    };
    if d.name.is_empty() || d.memory_mib == 0 || d.vcpus == 0 {
        return Err(QemuError::Invalid("name, memory or vcpu missing".into()));
    }
    d.pmem = pmem_of(&qemu_args)?;
    Ok(d)
}

/// The persistent memory that `<qemu:commandline>` arguments give, in
/// the form `render::libvirt::pmem_qemu_args` writes them: anything else
/// is refused, since a plain boot passes on nothing it does not check.
fn pmem_of(args: &[String]) -> Result<Vec<QemuPmem>, QemuError> {
    use serde_json::Value;
    let unsupported = |arg: &str| {
        QemuError::Unsupported(format!(
            "qemu argument {arg:?}: only provd's read-only persistent memory is passed on"
        ))
    };
    let mut backends: Vec<(String, PathBuf, u64)> = Vec::new();
    let mut pmem = Vec::new();
    for pair in args.chunks(2) {
        let [flag, value] = pair else {
            return Err(unsupported(pair.first().map(String::as_str).unwrap_or_default()));
        };
        let v: Value = serde_json::from_str(value).map_err(|_| unsupported(value))?;
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        match (flag.as_str(), text("qom-type").as_deref(), text("driver").as_deref()) {
            ("-object", Some("memory-backend-file"), None) => {
                if v.get("readonly") != Some(&Value::Bool(true))
                    || v.get("share") != Some(&Value::Bool(false))
                {
                    return Err(unsupported(value));
                }
                let (Some(id), Some(path), Some(bytes)) =
                    (text("id"), text("mem-path"), v.get("size").and_then(Value::as_u64))
                else {
                    return Err(unsupported(value));
                };
                backends.push((id, path.into(), bytes));
            }
            ("-device", None, Some("virtio-pmem-pci")) => {
                let memdev = text("memdev").unwrap_or_default();
                let (_, file, bytes) = backends
                    .iter()
                    .find(|(id, _, _)| *id == memdev)
                    .cloned()
                    .ok_or_else(|| unsupported(value))?;
                pmem.push(QemuPmem { id: text("id").unwrap_or_default(), file, bytes });
            }
            _ => return Err(unsupported(value)),
        }
    }
    if pmem.len() != backends.len() {
        return Err(QemuError::Invalid("a memory backend without its device".into()));
    }
    Ok(pmem)
}

/// qemu's arguments for `domain`: its console on standard output, no
/// display, no network, the guest's reboot ending qemu (a test boots, reads
/// the console, and boots again if it wants).
pub fn qemu_args(domain: &Domain, accel: Accel) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-name".into(),
        domain.name.clone(),
        "-machine".into(),
        if domain.machine.is_empty() { "q35".into() } else { domain.machine.clone() },
        "-accel".into(),
        accel.as_str().into(),
        "-cpu".into(),
        // KVM passes the host's CPU through as the domain asks; TCG's
        // default model is what runs everywhere.
        if accel == Accel::Kvm { "host".into() } else { "qemu64".into() },
        "-m".into(),
        if domain.pmem.is_empty() {
            domain.memory_mib.to_string()
        } else {
            // Device memory needs room beyond the guest's own.
            let extra: u64 = domain.pmem.iter().map(|p| p.bytes.div_ceil(1 << 20)).sum();
            format!(
                "{}M,slots={},maxmem={}M",
                domain.memory_mib,
                domain.pmem.len(),
                domain.memory_mib.saturating_add(extra)
            )
        },
        "-smp".into(),
        domain.vcpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-no-reboot".into(),
        "-device".into(),
        "virtio-rng-pci".into(),
        "-kernel".into(),
        domain.kernel.display().to_string(),
    ];
    if let Some(i) = &domain.initrd {
        a.extend(["-initrd".into(), i.display().to_string()]);
    }
    if !domain.cmdline.is_empty() {
        a.extend(["-append".into(), domain.cmdline.clone()]);
    }
    for (i, d) in domain.disks.iter().enumerate() {
        // qemu's option syntax doubles a comma inside a value.
        let file = d.file.display().to_string().replace(',', ",,");
        let mut drive = format!("file={file},format={},if=none,id=disk{i}", d.format);
        if d.read_only {
            drive.push_str(",readonly=on");
        }
        if d.direct {
            drive.push_str(",cache=none");
        }
        let mut device = format!("virtio-blk-pci,drive=disk{i}");
        if !d.serial.is_empty() {
            device.push_str(&format!(",serial={}", d.serial.replace(',', ",,")));
        }
        a.extend(["-drive".into(), drive, "-device".into(), device]);
    }
    for (i, p) in domain.pmem.iter().enumerate() {
        let file = p.file.display().to_string();
        a.extend(crate::render::pmem_qemu_args(&p.id, i, &file, p.bytes));
    }
    a
}

/// The qemu binary: `qemu-system-x86_64` from Debian's `qemu-system-x86`.
pub fn qemu_binary() -> Result<PathBuf, QemuError> {
    let path = Path::new("/usr/bin/qemu-system-x86_64");
    if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        Err(QemuError::Unsupported(
            "/usr/bin/qemu-system-x86_64 is missing (Debian package qemu-system-x86; scripts/setup.sh installs it)"
                .into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

    use super::*;

    const XML: &str = r#"<domain type="kvm"><name>web-1</name>
<memory unit="MiB">512</memory><vcpu placement="static">2</vcpu>
<os><type arch="x86_64" machine="q35">hvm</type><kernel>/d/boot/vmlinuz</kernel>
<initrd>/d/boot/initrd.img</initrd><cmdline>console=ttyS0 init=/sbin/x</cmdline></os>
<devices>
<disk type="file" device="disk"><driver name="qemu" type="raw"/><source file="/d/p/a,b.ext4"/>
<target dev="vda" bus="virtio"/><serial>root</serial></disk>
<disk type="file" device="disk"><driver name="qemu" type="raw"/><source file="/d/p/shared.erofs"/>
<target dev="vdb" bus="virtio"/><readonly/><shareable/><serial>shared-0</serial></disk>
<interface type="bridge"><source bridge="br0"/></interface>
</devices></domain>"#;

    #[test]
    fn a_kernel_boot_domain_gives_its_disks_in_order_with_their_serials() {
        let d = parse_domain(XML).unwrap();
        assert_eq!((d.name.as_str(), d.memory_mib, d.vcpus), ("web-1", 512, 2));
        assert_eq!(d.cmdline, "console=ttyS0 init=/sbin/x");
        assert_eq!(d.nics_left_out, 1);
        let args = qemu_args(&d, Accel::Tcg).join(" ");
        assert!(args.contains("-accel tcg -cpu qemu64 -m 512 -smp 2"), "{args}");
        assert!(args.contains("-kernel /d/boot/vmlinuz -initrd /d/boot/initrd.img"), "{args}");
        assert!(
            args.contains(
                "file=/d/p/a,,b.ext4,format=raw,if=none,id=disk0 -device virtio-blk-pci,drive=disk0,serial=root"
            ),
            "{args}"
        );
        assert!(
            args.contains(
                "id=disk1,readonly=on -device virtio-blk-pci,drive=disk1,serial=shared-0"
            ),
            "{args}"
        );
    }

    #[test]
    fn firmware_boot_and_virtiofs_are_refused_by_name() {
        let firmware = XML.replace(
            "<kernel>/d/boot/vmlinuz</kernel>\n<initrd>/d/boot/initrd.img</initrd><cmdline>console=ttyS0 init=/sbin/x</cmdline>",
            "",
        );
        let e = parse_domain(&firmware.replace("<os>", "<os firmware=\"efi\">")).unwrap_err();
        assert!(e.to_string().contains("firmware (efi)"), "{e}");
        let fs = XML.replace("<interface", "<filesystem type=\"mount\"/><interface");
        assert!(parse_domain(&fs).unwrap_err().to_string().contains("virtio-fs"));
        assert!(parse_domain("<domain><name>x</name>").is_err());
    }
}
