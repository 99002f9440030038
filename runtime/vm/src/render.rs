//! Renderers: the configuration each hypervisor consumes, made from a
//! validated spec and the host paths provd resolved for it.
//!
//! A renderer never touches the file system: every host path arrives in a
//! [`RenderInput`], already resolved under provd's data directory. What is
//! checked here is what a spec alone cannot know: that the input agrees with
//! the spec (one private root, one attached disk per data disk, kernel paths
//! for kernel boot) and that the hypervisor can do what the spec asks
//! (Firecracker: tap only, kernel boot only, raw disks, no virtio-fs).
//!
//! Errors name a spec field (`nics[1].bridge`, `boot.firmware`) when the
//! spec asks for something the hypervisor lacks, and an `input.` field
//! (`input.disks[2].path`) when the render input is at fault.

use std::path::{Path, PathBuf};

use crate::spec::{Boot, Firmware, Hypervisor, SpecError, VmSpec, is_forbidden_char};

pub use crate::spec::DiskFormat;

mod cloud_hypervisor;
mod firecracker;
mod libvirt;

pub use cloud_hypervisor::cloud_hypervisor_json;
pub use firecracker::{FIRECRACKER_MAX_VCPUS, firecracker_json};
pub use libvirt::{LABELS_NAMESPACE, QEMU_NAMESPACE, libvirt_xml, pmem_qemu_args};

/// What a disk is to the VM; decides its order and its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskRole {
    /// The shared partition (image layers), read-only and shareable.
    Shared,
    /// The VM's private partition; its root disk, writable, attached first.
    Private,
    /// A data disk from the spec's `disks`.
    Data,
    /// The cloud-init NoCloud seed, read-only.
    Seed,
}

/// How a disk reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskDevice {
    /// A virtio disk, read through the host's page cache.
    #[default]
    Virtio,
    /// A virtio disk read past the host's page cache (`O_DIRECT`): no
    /// host page it reads is one another VM's process reads too.
    VirtioDirect,
    /// Persistent memory (virtio-pmem) of `bytes`, the file mapped
    /// read-only and private: the guest maps its pages with DAX, and
    /// every VM mapping the file reads the same host pages. Shared
    /// partitions only; `bytes` is the file's size, a multiple of 2 MiB.
    Pmem { bytes: u64 },
}

/// A multiple of which persistent memory is sized.
pub const PMEM_ALIGN: u64 = 2 << 20;

/// Largest guest memory whose RAM lies all below 4 GiB on every
/// renderer's machine. Persistent memory sits above 4 GiB (QEMU's device
/// memory), and a Linux guest that may see memory there reserves 64 MiB of
/// bounce buffers (swiotlb) at boot, more than DAX saves it on a small
/// image. Its virtio devices never use them (virtio does not go through
/// the DMA API) and its RAM needs none, so a kernel-booted guest of at
/// most this much memory that attaches persistent memory boots with
/// `swiotlb=noforce`, unless its command line sets `swiotlb=` itself.
pub const NO_BOUNCE_BELOW_MIB: u64 = 2048;

/// A disk provd attaches, with its resolved host path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedDisk {
    /// Its role.
    pub role: DiskRole,
    /// Its name, used as the device id: `root`, `shared-<n>` (from 0, in
    /// the order the VM's boot files list its shared partitions), `seed`,
    /// and `data-<name>` for the spec's data disk `<name>`.
    pub name: String,
    /// Absolute host path.
    pub path: PathBuf,
    /// Image format.
    pub format: DiskFormat,
    /// Attach read-only. Must be true for the shared partition and the
    /// seed and false for the private root; a data disk may be either.
    pub read_only: bool,
    /// How it reaches the guest; other than [`DiskDevice::Virtio`] only
    /// for a shared partition.
    pub device: DiskDevice,
}

/// A virtio-fs export of a directory-format shared partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedDir {
    /// Directory exported (libvirt starts virtiofsd on it itself).
    pub path: PathBuf,
    /// Mount tag the guest mounts by, 1 to 36 bytes of `[A-Za-z0-9._-]`.
    pub tag: String,
    /// vhost-user socket of the virtiofsd provd runs (Cloud Hypervisor).
    pub socket: PathBuf,
}

/// Everything a renderer needs: the spec and what provd resolved for it.
#[derive(Debug, Clone)]
pub struct RenderInput<'a> {
    /// The spec; validated again by every renderer.
    pub spec: &'a VmSpec,
    /// The domain UUID, canonical 8-4-4-4-12 hex form.
    pub uuid: String,
    /// Every disk to attach, in any order: renderers order them root,
    /// shared, data (in spec order), seed.
    pub disks: Vec<AttachedDisk>,
    /// virtio-fs exports, one per directory-format shared partition.
    pub shared_dirs: Vec<SharedDir>,
    /// Resolved absolute kernel path; set exactly when the spec boots a kernel.
    pub kernel: Option<PathBuf>,
    /// Resolved absolute initrd path; set exactly when the spec names one.
    pub initrd: Option<PathBuf>,
    /// Firmware image for Cloud Hypervisor's UEFI boot (`CLOUDHV.fd`);
    /// libvirt selects its firmware itself and Firecracker boots no
    /// firmware, so both ignore it.
    pub firmware: Option<PathBuf>,
    /// Where the serial console is logged; a pty when absent. libvirt hands
    /// it to virtlogd, which caps and rotates it. Cloud Hypervisor listens on
    /// `serial.sock` beside it, for the console reader that keeps it capped
    /// (`crate::console`). Firecracker's config file cannot name one (its
    /// serial goes to the process's stdout), so it ignores this.
    pub serial_log: Option<PathBuf>,
    /// How the node's QEMU runs the guest: libvirt's domain type and CPU
    /// mode. Cloud Hypervisor and Firecracker always use KVM and ignore it.
    pub machine: provd_domain::Machine,
    /// The user and group libvirt runs QEMU as for this VM, with
    /// relabelling off (its files were handed to them); `None` leaves both
    /// to libvirt's configuration.
    pub run_as: Option<(u32, u32)>,
}

/// A rendered configuration and the file name it is written under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// `domain.xml`, `vm.json` or `firecracker.json`.
    pub file_name: &'static str,
    /// The configuration text, ending in a newline.
    pub text: String,
}

/// Why a configuration could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The spec does not validate.
    #[error("invalid spec: {0}")]
    Spec(#[from] SpecError),
    /// The spec asks for something the hypervisor cannot do, or the render
    /// input disagrees with the spec. `field` is a spec path or an
    /// `input.` path.
    #[error("{field}: {message}")]
    Field {
        /// Spec field (`nics[0].bridge`) or input field (`input.kernel`).
        field: String,
        /// What is wrong, lowercase.
        message: String,
    },
    /// Writing the output failed (not expected for in-memory output).
    #[error("writing the {what}: {message}")]
    Write {
        /// Which document.
        what: &'static str,
        /// The writer's error.
        message: String,
    },
}

impl RenderError {
    fn field(field: impl Into<String>, message: impl Into<String>) -> RenderError {
        RenderError::Field { field: field.into(), message: message.into() }
    }

    /// The field this error names, when it names one.
    pub fn field_name(&self) -> Option<&str> {
        match self {
            RenderError::Field { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// Renders the configuration of the spec's hypervisor.
pub fn render(input: &RenderInput) -> Result<Rendered, RenderError> {
    let (file_name, text) = match input.spec.hypervisor {
        Hypervisor::Libvirt => ("domain.xml", libvirt_xml(input)?),
        Hypervisor::CloudHypervisor => ("vm.json", json_text(&cloud_hypervisor_json(input)?)?),
        Hypervisor::Firecracker => ("firecracker.json", json_text(&firecracker_json(input)?)?),
    };
    Ok(Rendered { file_name, text })
}

fn json_text(value: &serde_json::Value) -> Result<String, RenderError> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| RenderError::Write { what: "json", message: e.to_string() })?;
    text.push('\n');
    Ok(text)
}

/// A disk in attach order, with its checked path.
#[derive(Debug)]
struct Disk<'a> {
    role: DiskRole,
    name: &'a str,
    path: &'a str,
    format: DiskFormat,
    read_only: bool,
    device: DiskDevice,
    /// Field an error about this disk names: the spec's `disks[i]` for a
    /// data disk, the input's entry otherwise.
    field: String,
}

#[derive(Debug)]
enum NicBackend<'a> {
    Bridge(&'a str),
    Tap(&'a str),
}

#[derive(Debug)]
struct NicPlan<'a> {
    index: usize,
    mac: String,
    backend: NicBackend<'a>,
}

#[derive(Debug)]
enum BootPlan<'a> {
    Kernel { kernel: &'a str, initrd: Option<&'a str>, cmdline: Option<String> },
    Firmware { firmware: Firmware, image: Option<&'a str> },
}

#[derive(Debug)]
struct SharedDirPlan<'a> {
    path: &'a str,
    tag: &'a str,
    socket: &'a str,
}

/// The spec and input checked against each other, in the shape every
/// renderer walks.
#[derive(Debug)]
struct Plan<'a> {
    spec: &'a VmSpec,
    uuid: String,
    disks: Vec<Disk<'a>>,
    nics: Vec<NicPlan<'a>>,
    boot: BootPlan<'a>,
    shared_dirs: Vec<SharedDirPlan<'a>>,
    serial_log: Option<&'a str>,
    machine: provd_domain::Machine,
    run_as: Option<(u32, u32)>,
}

/// Most shared partitions (disks and virtio-fs exports together) one VM
/// attaches; provd's partition builder never stacks a VM on more.
pub const MAX_SHARED_ATTACHED: usize = 8;

/// The index of a shared disk's name `shared-<n>`.
fn shared_index(name: &str) -> Option<usize> {
    let n = name.strip_prefix("shared-")?;
    if n.is_empty() || n.len() > 3 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// A host path as the configurations need it: absolute, UTF-8, and free of
/// characters no configuration format carries safely.
fn host_path<'a>(path: &'a Path, field: &str) -> Result<&'a str, RenderError> {
    let s = path
        .to_str()
        .ok_or_else(|| RenderError::field(field, format!("{} is not utf-8", path.display())))?;
    if !path.is_absolute() {
        return Err(RenderError::field(field, format!("{s:?} is not an absolute path")));
    }
    if s.chars().any(is_forbidden_char) {
        return Err(RenderError::field(field, "must not contain control characters"));
    }
    Ok(s)
}

fn canonical_uuid(uuid: &str) -> Result<String, RenderError> {
    let groups: Vec<&str> = uuid.split('-').collect();
    let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    let hex = groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()));
    if lens != [8, 4, 4, 4, 12] || !hex {
        return Err(RenderError::field(
            "input.uuid",
            format!("{uuid:?} is not a uuid of the form 8-4-4-4-12 hex digits"),
        ));
    }
    Ok(uuid.to_ascii_lowercase())
}

fn role_rank(role: DiskRole) -> u8 {
    match role {
        DiskRole::Private => 0,
        DiskRole::Shared => 1,
        DiskRole::Data => 2,
        DiskRole::Seed => 3,
    }
}

fn plan_disks<'a>(input: &'a RenderInput) -> Result<Vec<Disk<'a>>, RenderError> {
    let spec = input.spec;
    let mut disks = Vec::with_capacity(input.disks.len());
    let mut names = std::collections::BTreeSet::new();
    for (k, d) in input.disks.iter().enumerate() {
        let f = format!("input.disks[{k}]");
        let path = host_path(&d.path, &format!("{f}.path"))?;
        if d.name.is_empty()
            || d.name.len() > 63
            || !d.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(RenderError::field(
                format!("{f}.name"),
                format!("{:?} is not 1 to 63 of [a-z0-9-]", d.name),
            ));
        }
        if !names.insert(d.name.as_str()) {
            return Err(RenderError::field(
                format!("{f}.name"),
                format!("{:?} is attached twice", d.name),
            ));
        }
        let expected_name = match d.role {
            DiskRole::Private => Some("root"),
            DiskRole::Shared if shared_index(&d.name).is_some() => None,
            DiskRole::Shared => Some("shared-<n>"),
            DiskRole::Seed => Some("seed"),
            DiskRole::Data => None,
        };
        if let Some(expected) = expected_name
            && d.name != expected
        {
            return Err(RenderError::field(
                format!("{f}.name"),
                format!("a {:?} disk is named {expected:?}, not {:?}", d.role, d.name),
            ));
        }
        let field = match d.role {
            DiskRole::Data => {
                let idx = d
                    .name
                    .strip_prefix("data-")
                    .and_then(|n| spec.disks.iter().position(|s| s.name == n))
                    .ok_or_else(|| {
                        RenderError::field(
                            format!("{f}.name"),
                            format!(
                                "{:?} names no data disk of the spec (data disks are named data-<name>)",
                                d.name
                            ),
                        )
                    })?;
                let want = spec.disks.get(idx).map(|s| s.format).unwrap_or_default();
                if d.format != want {
                    return Err(RenderError::field(
                        format!("{f}.format"),
                        format!(
                            "{} but the spec's disks[{idx}] is {}",
                            d.format.as_str(),
                            want.as_str()
                        ),
                    ));
                }
                format!("disks[{idx}]")
            }
            _ => f.clone(),
        };
        match (d.role, d.read_only) {
            (DiskRole::Private, true) => {
                return Err(RenderError::field(
                    format!("{f}.read_only"),
                    "the private root disk is writable",
                ));
            }
            (DiskRole::Shared, false) => {
                return Err(RenderError::field(
                    format!("{f}.read_only"),
                    "the shared partition is attached read-only to every vm using it",
                ));
            }
            (DiskRole::Seed, false) => {
                return Err(RenderError::field(
                    format!("{f}.read_only"),
                    "the cloud-init seed is attached read-only",
                ));
            }
            _ => {}
        }
        match d.device {
            DiskDevice::Virtio => {}
            _ if d.role != DiskRole::Shared => {
                return Err(RenderError::field(
                    format!("{f}.device"),
                    "only a shared partition is attached other than as a virtio disk",
                ));
            }
            DiskDevice::VirtioDirect => {}
            DiskDevice::Pmem { bytes } => {
                if d.format != DiskFormat::Raw {
                    return Err(RenderError::field(
                        format!("{f}.format"),
                        "persistent memory maps a raw image",
                    ));
                }
                if bytes == 0 || bytes % PMEM_ALIGN != 0 {
                    return Err(RenderError::field(
                        format!("{f}.device"),
                        format!("persistent memory of {bytes} bytes: not a multiple of 2 MiB"),
                    ));
                }
            }
        }
        disks.push(Disk {
            role: d.role,
            name: &d.name,
            path,
            format: d.format,
            read_only: d.read_only,
            device: d.device,
            field,
        });
    }
    let count = |role| disks.iter().filter(|d| d.role == role).count();
    if count(DiskRole::Private) != 1 {
        return Err(RenderError::field(
            "input.disks",
            format!("needs exactly one private root disk, has {}", count(DiskRole::Private)),
        ));
    }
    for (i, s) in spec.disks.iter().enumerate() {
        let name = format!("data-{}", s.name);
        if !disks.iter().any(|d| d.role == DiskRole::Data && d.name == name) {
            return Err(RenderError::field(
                format!("disks[{i}]"),
                format!("no attached disk named {name:?} in the render input"),
            ));
        }
    }
    if count(DiskRole::Shared) + input.shared_dirs.len() > MAX_SHARED_ATTACHED {
        return Err(RenderError::field(
            "input.disks",
            format!(
                "{} shared partitions; at most {MAX_SHARED_ATTACHED} are attached to one vm",
                count(DiskRole::Shared) + input.shared_dirs.len()
            ),
        ));
    }
    // Names are unique, so roles are at most one each apart from data,
    // and the stable sort keeps data disks in the order given; put them in
    // spec order so device names do not depend on provd's ordering.
    disks.sort_by_key(|d| {
        let data_idx = d
            .name
            .strip_prefix("data-")
            .and_then(|n| spec.disks.iter().position(|s| s.name == n))
            .unwrap_or(0);
        let index = match d.role {
            DiskRole::Data => data_idx,
            DiskRole::Shared => shared_index(d.name).unwrap_or(0),
            _ => 0,
        };
        (role_rank(d.role), index)
    });
    Ok(disks)
}

fn plan_boot<'a>(input: &'a RenderInput) -> Result<BootPlan<'a>, RenderError> {
    match &input.spec.boot {
        Boot::Kernel { initrd, cmdline, .. } => {
            let kernel = input.kernel.as_deref().ok_or_else(|| {
                RenderError::field(
                    "input.kernel",
                    "the spec boots a kernel (boot.kernel) but no resolved path was given",
                )
            })?;
            let kernel = host_path(kernel, "input.kernel")?;
            let initrd = match (initrd, &input.initrd) {
                (Some(_), Some(p)) => Some(host_path(p, "input.initrd")?),
                (None, None) => None,
                (Some(_), None) => {
                    return Err(RenderError::field(
                        "input.initrd",
                        "the spec names an initrd (boot.initrd) but no resolved path was given",
                    ));
                }
                (None, Some(_)) => {
                    return Err(RenderError::field(
                        "input.initrd",
                        "set although the spec names no initrd",
                    ));
                }
            };
            Ok(BootPlan::Kernel { kernel, initrd, cmdline: cmdline.clone() })
        }
        Boot::Firmware { firmware } => {
            if input.kernel.is_some() || input.initrd.is_some() {
                return Err(RenderError::field(
                    if input.kernel.is_some() { "input.kernel" } else { "input.initrd" },
                    "set although the spec boots through firmware",
                ));
            }
            let image = match &input.firmware {
                Some(p) => Some(host_path(p, "input.firmware")?),
                None => None,
            };
            Ok(BootPlan::Firmware { firmware: *firmware, image })
        }
    }
}

fn plan<'a>(input: &'a RenderInput<'a>) -> Result<Plan<'a>, RenderError> {
    let spec = input.spec;
    spec.validate()?;
    let uuid = canonical_uuid(&input.uuid)?;
    let disks = plan_disks(input)?;
    let nics = spec
        .macs()
        .into_iter()
        .zip(&spec.nics)
        .enumerate()
        .map(|(index, (mac, nic))| {
            // Validation guarantees exactly one of bridge and tap.
            let backend = match (&nic.bridge, &nic.tap) {
                (Some(b), _) => NicBackend::Bridge(b),
                (None, Some(t)) => NicBackend::Tap(t),
                (None, None) => {
                    return Err(RenderError::field(format!("nics[{index}]"), "set bridge or tap"));
                }
            };
            Ok(NicPlan { index, mac, backend })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut boot = plan_boot(input)?;
    if let BootPlan::Kernel { cmdline, .. } = &mut boot
        && spec.memory_mib <= NO_BOUNCE_BELOW_MIB
        && disks.iter().any(|d| matches!(d.device, DiskDevice::Pmem { .. }))
        && !cmdline.as_deref().unwrap_or_default().contains("swiotlb=")
    {
        let mut c = cmdline.take().unwrap_or_default();
        if !c.is_empty() {
            c.push(' ');
        }
        c.push_str("swiotlb=noforce");
        *cmdline = Some(c);
    }
    let mut shared_dirs = Vec::with_capacity(input.shared_dirs.len());
    for (k, sd) in input.shared_dirs.iter().enumerate() {
        let f = format!("input.shared_dirs[{k}]");
        let tag = sd.tag.as_str();
        if tag.is_empty()
            || tag.len() > 36
            || !tag.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            // 36 bytes is the virtio-fs config space's tag field.
            return Err(RenderError::field(
                format!("{f}.tag"),
                format!("{tag:?} is not 1 to 36 of [A-Za-z0-9._-]"),
            ));
        }
        if shared_dirs.iter().any(|d: &SharedDirPlan| d.tag == tag) {
            return Err(RenderError::field(
                format!("{f}.tag"),
                format!("{tag:?} is exported twice"),
            ));
        }
        shared_dirs.push(SharedDirPlan {
            path: host_path(&sd.path, &format!("{f}.path"))?,
            tag,
            socket: host_path(&sd.socket, &format!("{f}.socket"))?,
        });
    }
    let serial_log = match &input.serial_log {
        Some(p) => Some(host_path(p, "input.serial_log")?),
        None => None,
    };
    Ok(Plan {
        spec,
        uuid,
        disks,
        nics,
        boot,
        shared_dirs,
        serial_log,
        machine: input.machine,
        run_as: input.run_as,
    })
}
