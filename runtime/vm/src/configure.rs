//! Configuring a VM on the node: the spec checked against the plugin's
//! grant and the node's capacity, resources reserved with the VM's record,
//! its cloud-init seed and data disks created, its partitions attached and
//! the hypervisor's configuration written under `<data>/vms/<name>/`.
//!
//! The reservation is the first side effect and is undone, with the VM's
//! directory, when any later step fails: a refused or failed configuration
//! leaves nothing reserved and nothing written.

use std::path::{Path, PathBuf};

use provd_domain::attach::{
    Attachments, ImageFormat, SharedAttach, SharedAttachment, SharedDevice, SharingPolicy,
};
use provd_domain::{HypervisorAccess, Machine, NodeCapacity, VmGrant};
use provd_store::{NewVm, ReserveError, Resources, Store};

use crate::cloudinit::{SeedInput, SeedNic, SeedUser, seed_files, write_seed_iso_with};
use crate::render::{
    AttachedDisk, DiskDevice, DiskFormat, DiskRole, RenderInput, SharedDir, render,
};
use crate::spec::{Boot, VmSpec, parse_spec};

/// Why a VM could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// the spec is malformed; the text names the field
    #[error("{0}")]
    Spec(String),
    /// the plugin's grant does not allow it
    #[error("{field}: {reason}")]
    Denied { field: String, reason: String },
    /// the node has no room, or the name or a MAC is taken
    #[error(transparent)]
    Reserve(#[from] ReserveError),
    /// a partition or file the spec needs is missing or unsuitable
    #[error("{0}")]
    NotFound(String),
    /// the node's records could not be read or written
    #[error(transparent)]
    Store(#[from] provd_store::StoreError),
    /// building the configuration failed
    #[error("{0}")]
    Failed(String),
}

/// What the node gives the VMs it configures: room, and how its
/// hypervisor runs them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hosting {
    pub capacity: NodeCapacity,
    pub machine: Machine,
    /// Whom libvirt's QEMU runs as, when not as provd's user: each libvirt
    /// VM's files are then handed to it (`crate::access`).
    pub access: Option<HypervisorAccess>,
    /// How shared partitions are attached.
    pub sharing: SharingPolicy,
}

/// Where a VM's directory records the sharing policy it was configured
/// under, so that a repack's new configuration attaches alike.
const SHARING_RECORD: &str = "sharing.json";

/// How shared partition `s` reaches the guest of `spec` on a node whose
/// policy is `sharing`.
pub fn shared_device(
    spec: &VmSpec,
    s: &SharedAttachment,
    sharing: &SharingPolicy,
) -> Result<DiskDevice, VmError> {
    use crate::spec::Hypervisor;
    if spec.shared_attach == Some(SharedAttach::Pmem) && sharing.attach == SharedAttach::Block {
        return Err(VmError::Spec(
            "shared-attach: \"pmem\", but this node attaches shared partitions as disks \
             ([policy] shared-attach = \"block\")"
                .into(),
        ));
    }
    // The public catalogue's partitions are attached to VMs of every
    // tenant: unless the node allows it, none of their host pages may be
    // one two tenants' guests read.
    if s.public && !sharing.share_public_memory {
        if spec.hypervisor == Hypervisor::Firecracker {
            return Err(VmError::Spec(format!(
                "shared partition {} is of the public catalogue, which VMs of other tenants \
                 attach, and firecracker reads disks only through the host's page cache, \
                 whose pages they would share; [sharing] share-public-memory = true allows it",
                s.partition
            )));
        }
        return Ok(DiskDevice::VirtioDirect);
    }
    // Firecracker maps persistent memory from 1.14 on: the node says
    // whether its own does.
    if spec.hypervisor == Hypervisor::Firecracker && !sharing.firecracker_pmem {
        if spec.shared_attach == Some(SharedAttach::Pmem) {
            return Err(VmError::Spec(
                "shared-attach: \"pmem\", but this node's firecracker has no pmem device \
                 (1.14 on; [hypervisor] firecracker-version names the node's)"
                    .into(),
            ));
        }
        return Ok(DiskDevice::Virtio);
    }
    // provd's initramfs loads the persistent-memory drivers and boots
    // with `swiotlb=noforce`; a firmware-booted guest's own initramfs and
    // command line may do neither (it would not find its partition, or pay
    // 64 MiB of bounce buffers for it), so it gets persistent memory only
    // when its spec asks.
    let default = match spec.boot {
        crate::spec::Boot::Kernel { .. } => sharing.attach,
        crate::spec::Boot::Firmware { .. } => SharedAttach::Block,
    };
    Ok(match (spec.shared_attach.unwrap_or(default), s.pmem_bytes) {
        (SharedAttach::Pmem, Some(bytes)) => DiskDevice::Pmem { bytes },
        _ => DiskDevice::Virtio,
    })
}

fn record_sharing(dir: &Path, sharing: &SharingPolicy) -> Result<(), VmError> {
    let text = serde_json::to_string(sharing)
        .map_err(|e| VmError::Failed(format!("recording the sharing policy: {e}")))?;
    let path = dir.join(SHARING_RECORD);
    std::fs::write(&path, text)
        .map_err(|e| VmError::Failed(format!("writing {}: {e}", path.display())))
}

/// The policy a VM was configured under; a VM configured before it was
/// recorded attached every shared partition as a disk.
fn recorded_sharing(dir: &Path) -> Result<SharingPolicy, VmError> {
    let path = dir.join(SHARING_RECORD);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| VmError::Failed(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SharingPolicy {
            attach: SharedAttach::Block,
            share_public_memory: true,
            firecracker_pmem: false,
        }),
        Err(e) => Err(VmError::Failed(format!("reading {}: {e}", path.display()))),
    }
}

/// A VM configured on the node.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Configured {
    pub name: String,
    pub hypervisor: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub macs: Vec<String>,
    /// The VM's directory on the node.
    pub dir: PathBuf,
    pub config_file: String,
    pub config: String,
    /// `role:name`, in attachment order.
    pub disks: Vec<String>,
}

/// The node's capacity as reservations may use it.
pub fn capacity_of(node: &NodeCapacity) -> Resources {
    let (vcpus, memory_mib, disk_bytes) = node.effective();
    Resources { vcpus, memory_mib, disk_bytes }
}

pub(crate) fn vm_dir(store: &Store, name: &str) -> PathBuf {
    store.path().join("vms").join(name)
}

/// The libvirt domain XML provd wrote for VM `name`; `None` for a VM of
/// another hypervisor, which has none.
pub fn libvirt_domain(store: &Store, name: &str) -> Result<Option<String>, VmError> {
    let path = vm_dir(store, name).join("domain.xml");
    match std::fs::read_to_string(&path) {
        Ok(xml) => Ok(Some(xml)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(VmError::Failed(format!("reading {}: {e}", path.display()))),
    }
}

/// The UUID of VM `name`'s domain: derived from the name, stable across
/// re-renders, distinct per name. A domain of that name with another UUID
/// is not provd's.
pub fn domain_uuid(name: &str) -> String {
    uuid_of(name)
}

fn uuid_of(name: &str) -> String {
    let h = blake3::hash(format!("provd-vm\0{name}").as_bytes());
    let mut b = [0u8; 16];
    for (o, i) in b.iter_mut().zip(h.as_bytes()) {
        *o = *i;
    }
    if let Some(x) = b.get_mut(6) {
        *x = (*x & 0x0f) | 0x40;
    }
    if let Some(x) = b.get_mut(8) {
        *x = (*x & 0x3f) | 0x80;
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        hex.get(0..8).unwrap_or_default(),
        hex.get(8..12).unwrap_or_default(),
        hex.get(12..16).unwrap_or_default(),
        hex.get(16..20).unwrap_or_default(),
        hex.get(20..32).unwrap_or_default()
    )
}

/// Resolves a boot file the spec names relative to `<data>/boot/`.
fn boot_file(store: &Store, field: &str, rel: &str) -> Result<PathBuf, VmError> {
    let path = store.path().join("boot").join(rel);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_file() => Ok(path),
        Ok(_) => {
            Err(VmError::NotFound(format!("{field}: {} is not a regular file", path.display())))
        }
        Err(e) => Err(VmError::NotFound(format!("{field}: {}: {e}", path.display()))),
    }
}

/// Checks `spec` against the plugin's `vm` grant (hypervisor, resources, NICs).
pub fn check_grant(spec: &VmSpec, grant: &VmGrant) -> Result<(), VmError> {
    let hypervisor = spec.hypervisor.as_str();
    if !grant.hypervisors.iter().any(|h| h == hypervisor) {
        return Err(VmError::Denied {
            field: "hypervisor".into(),
            reason: format!(
                "{hypervisor} is not among the plugin's hypervisors {:?}",
                grant.hypervisors
            ),
        });
    }
    if spec.vcpus > grant.max_vcpus {
        return Err(VmError::Denied {
            field: "vcpus".into(),
            reason: format!("{} exceeds the plugin's {}", spec.vcpus, grant.max_vcpus),
        });
    }
    if spec.memory_mib > grant.max_memory_mib {
        return Err(VmError::Denied {
            field: "memory-mib".into(),
            reason: format!("{} exceeds the plugin's {}", spec.memory_mib, grant.max_memory_mib),
        });
    }
    Ok(())
}

pub(crate) fn seed_input(spec: &VmSpec) -> SeedInput {
    let ci = spec.cloud_init.as_ref();
    let macs = spec.macs();
    SeedInput {
        vm: spec.name.clone(),
        hostname: ci.and_then(|c| c.hostname.clone()).unwrap_or_else(|| spec.name.clone()),
        users: ci
            .map(|c| {
                c.users
                    .iter()
                    .map(|u| SeedUser {
                        name: u.name.clone(),
                        ssh_authorized_keys: u.ssh_authorized_keys.clone(),
                        sudo: u.sudo,
                        shell: u.shell.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        user_data: ci.and_then(|c| c.user_data.clone()),
        network_config: ci.and_then(|c| c.network_config.clone()),
        nics: spec
            .nics
            .iter()
            .zip(macs)
            .map(|(n, mac)| SeedNic {
                mac,
                ipv4: n
                    .ipv4
                    .as_ref()
                    .map(|ip| (ip.address.to_string(), ip.gateway.map(|g| g.to_string()))),
                ipv6: n
                    .ipv6
                    .as_ref()
                    .map(|ip| (ip.address.to_string(), ip.gateway.map(|g| g.to_string()))),
                dhcp4: n.dhcp4,
                dhcp6: n.dhcp6,
                dns: n.dns.iter().map(|a| a.to_string()).collect(),
            })
            .collect(),
    }
}

/// The host files a VM's configuration names that are not partitions:
/// its kernel and initramfs, or Cloud Hypervisor's firmware.
fn boot_files(store: &Store, spec: &VmSpec) -> Result<BootFiles, VmError> {
    let (kernel, initrd) = match &spec.boot {
        Boot::Kernel { kernel, initrd, .. } => (
            Some(boot_file(store, "boot.kernel", kernel)?),
            initrd.as_deref().map(|i| boot_file(store, "boot.initrd", i)).transpose()?,
        ),
        Boot::Firmware { .. } => (None, None),
    };
    // Cloud Hypervisor loads firmware from a file the node provides; the
    // other hypervisors bring their own.
    let firmware = match (&spec.boot, spec.hypervisor.as_str()) {
        (Boot::Firmware { .. }, "cloud-hypervisor") => {
            Some(boot_file(store, "boot.firmware", CLOUD_HYPERVISOR_FIRMWARE)?)
        }
        _ => None,
    };
    Ok(BootFiles { kernel, initrd, firmware })
}

/// Parses a spec as [`configure`] takes it.
pub fn parse(spec_text: &str) -> Result<VmSpec, VmError> {
    parse_spec(spec_text).map_err(|e| VmError::Spec(e.to_string()))
}

/// Configures the VM `spec` describes (parsed from `spec_text`, which is
/// recorded as it is), attaching `attached` (its partitions, which the
/// partitions crate checked are this VM's and its tenant's to attach), for
/// a plugin holding `grant`, on a node that hosts VMs as `node` says.
pub fn configure(
    store: &Store,
    spec: &VmSpec,
    spec_text: &str,
    attached: &Attachments,
    grant: &VmGrant,
    node: &Hosting,
    operation: Option<&str>,
) -> Result<Configured, VmError> {
    check_grant(spec, grant)?;
    let boot = boot_files(store, spec)?;
    let data_bytes: u64 = spec.disks.iter().map(|d| d.size_gib.saturating_mul(1 << 30)).sum();
    let needs = Resources {
        vcpus: u64::from(spec.vcpus),
        memory_mib: spec.memory_mib,
        disk_bytes: attached.root.apparent_bytes.saturating_add(data_bytes),
    };
    let macs = spec.macs();
    store.reserve_vm(
        &NewVm {
            name: spec.name.clone(),
            spec: spec_text.to_string(),
            operation: operation.map(str::to_string),
            macs: macs.clone(),
            needs,
        },
        &capacity_of(&node.capacity),
    )?;
    let dir = vm_dir(store, &spec.name);
    // In an operation, the operation's end makes everything durable with
    // one syncfs; alone, the seed is synced itself.
    let built = write_vm(spec, &dir, attached, &boot, node, operation.is_none());
    match built {
        Ok((config_file, config, disks)) => Ok(Configured {
            name: spec.name.clone(),
            hypervisor: spec.hypervisor.as_str().to_string(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            macs,
            dir,
            config_file,
            config,
            disks,
        }),
        Err(e) => {
            let _ = crate::access::withdraw(&dir, &spec.name);
            let _ = std::fs::remove_dir_all(&dir);
            if let Err(undo) = store.delete_vm(&spec.name) {
                return Err(VmError::Failed(format!(
                    "{e}; releasing the reservation failed too: {undo}"
                )));
            }
            Err(e)
        }
    }
}

type Written = (String, String, Vec<String>);

/// Cloud Hypervisor's UEFI firmware, under `<data>/boot/`.
pub const CLOUD_HYPERVISOR_FIRMWARE: &str = "CLOUDHV.fd";

/// Host files a VM boots from, resolved under `<data>/boot/`.
struct BootFiles {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    firmware: Option<PathBuf>,
}

/// The file a data disk of the spec is kept in, in the VM's directory.
fn data_file(d: &crate::spec::DataDisk) -> (String, DiskFormat) {
    match d.format {
        crate::spec::DiskFormat::Qcow2 => (format!("data-{}.qcow2", d.name), DiskFormat::Qcow2),
        crate::spec::DiskFormat::Raw => (format!("data-{}.raw", d.name), DiskFormat::Raw),
    }
}

type Attached = (Vec<AttachedDisk>, Vec<SharedDir>);

/// Every disk and virtio-fs export of a VM, with their host paths.
fn attachments(
    spec: &VmSpec,
    dir: &Path,
    a: &Attachments,
    sharing: &SharingPolicy,
) -> Result<Attached, VmError> {
    let mut disks = vec![AttachedDisk {
        role: DiskRole::Private,
        name: "root".into(),
        path: a.root.path.clone(),
        format: match a.root.format {
            ImageFormat::Qcow2 => DiskFormat::Qcow2,
            ImageFormat::Raw => DiskFormat::Raw,
        },
        read_only: false,
        device: DiskDevice::Virtio,
    }];
    let mut shared_dirs = Vec::new();
    for (i, s) in a.shared.iter().enumerate() {
        match s.device {
            SharedDevice::VirtioFs => {
                // virtiofsd reads through the host's page cache: the
                // catalogue's pages would be one for every tenant.
                if s.public && !sharing.share_public_memory {
                    return Err(VmError::Spec(format!(
                        "shared partition {} is a directory of the public catalogue, which \
                         virtio-fs serves through the host's page cache to VMs of every tenant; \
                         [sharing] share-public-memory = true allows it, or build the \
                         catalogue's partitions in another format",
                        s.partition
                    )));
                }
                shared_dirs.push(SharedDir {
                    path: s.path.clone(),
                    tag: format!("provd-{}", s.partition),
                    socket: dir.join(format!("virtiofs-{i}.sock")),
                });
            }
            SharedDevice::Disk => disks.push(AttachedDisk {
                role: DiskRole::Shared,
                name: format!("shared-{i}"),
                path: s.path.clone(),
                format: DiskFormat::Raw,
                read_only: true,
                device: shared_device(spec, s, sharing)?,
            }),
        }
    }
    for d in &spec.disks {
        let (file, format) = data_file(d);
        disks.push(AttachedDisk {
            role: DiskRole::Data,
            name: d.name.clone(),
            path: dir.join(&file),
            format,
            read_only: false,
            device: DiskDevice::Virtio,
        });
    }
    disks.push(AttachedDisk {
        role: DiskRole::Seed,
        name: "seed".into(),
        path: dir.join("seed.iso"),
        format: DiskFormat::Raw,
        read_only: true,
        device: DiskDevice::Virtio,
    });
    Ok((disks, shared_dirs))
}

/// Renders the hypervisor's configuration and writes it beside, then over,
/// the one in `dir`. Returns its file name, text and the disks as
/// `role:name`.
fn render_config(
    spec: &VmSpec,
    dir: &Path,
    disks: Vec<AttachedDisk>,
    shared_dirs: Vec<SharedDir>,
    boot: &BootFiles,
    machine: Machine,
    access: Option<&HypervisorAccess>,
) -> Result<Written, VmError> {
    let io = |what: String| move |e: std::io::Error| VmError::Failed(format!("{what}: {e}"));
    let mut disks = disks;
    let (mut kernel, mut initrd) = (boot.kernel.clone(), boot.initrd.clone());
    // Only libvirt runs its QEMU as a user of its own; provd's other
    // hypervisors are configured for a process the node starts itself.
    let access = access.filter(|_| spec.hypervisor == crate::spec::Hypervisor::Libvirt);
    if let Some(access) = access {
        (kernel, initrd) = hand_over(access, &spec.name, &mut disks, kernel, initrd)?;
    }
    let input = RenderInput {
        spec,
        uuid: uuid_of(&spec.name),
        disks: disks.clone(),
        shared_dirs,
        kernel,
        initrd,
        firmware: boot.firmware.clone(),
        serial_log: Some(dir.join("serial.log")),
        machine,
        run_as: access.map(|a| (a.uid, a.gid)),
    };
    let rendered = render(&input).map_err(|e| VmError::Spec(e.to_string()))?;
    let temp = dir.join(format!("{}.new", rendered.file_name));
    std::fs::write(&temp, &rendered.text).map_err(io(format!("writing {}", temp.display())))?;
    std::fs::rename(&temp, dir.join(rendered.file_name))
        .map_err(io(format!("writing {}", rendered.file_name)))?;
    let names = disks
        .iter()
        .map(|d| {
            let role = match d.role {
                DiskRole::Private => "root",
                DiskRole::Shared => "shared",
                DiskRole::Data => "data",
                DiskRole::Seed => "seed",
            };
            match (d.role, d.device) {
                (DiskRole::Shared, DiskDevice::Pmem { .. }) => format!("{role}:{}:pmem", d.name),
                (DiskRole::Shared, DiskDevice::VirtioDirect) => {
                    format!("{role}:{}:block-direct", d.name)
                }
                (DiskRole::Shared, DiskDevice::Virtio) => format!("{role}:{}:block", d.name),
                _ => format!("{role}:{}", d.name),
            }
        })
        .collect();
    Ok((rendered.file_name.to_string(), rendered.text, names))
}

/// Links the VM's disks, kernel and initramfs into its folder of `access`
/// and points `disks` there; returns the kernel and initramfs paths.
fn hand_over(
    access: &HypervisorAccess,
    vm: &str,
    disks: &mut [AttachedDisk],
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
) -> Result<(Option<PathBuf>, Option<PathBuf>), VmError> {
    let ext =
        |p: &Path| p.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    let mut files: Vec<(String, PathBuf, bool)> = disks
        .iter()
        .map(|d| {
            let name = match d.role {
                DiskRole::Private => format!("root{}", ext(&d.path)),
                // By partition, so that the folder says which one it is.
                DiskRole::Shared => d
                    .path
                    .parent()
                    .and_then(Path::file_name)
                    .map(|p| format!("{}{}", p.to_string_lossy(), ext(&d.path)))
                    .unwrap_or_else(|| format!("{}{}", d.name, ext(&d.path))),
                DiskRole::Data | DiskRole::Seed => d
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| d.name.clone()),
            };
            (name, d.path.clone(), !d.read_only)
        })
        .collect();
    for (name, path) in [("kernel", &kernel), ("initrd", &initrd)] {
        if let Some(p) = path {
            files.push((name.to_string(), p.clone(), false));
        }
    }
    let linked = crate::access::hand_over(access, vm, &files)?;
    for (d, path) in disks.iter_mut().zip(&linked) {
        d.path = path.clone();
    }
    let mut rest = linked.into_iter().skip(disks.len());
    let kernel = kernel.and_then(|_| rest.next());
    let initrd = initrd.and_then(|_| rest.next());
    Ok((kernel, initrd))
}

fn write_vm(
    spec: &VmSpec,
    dir: &Path,
    attached: &Attachments,
    boot: &BootFiles,
    node: &Hosting,
    durable: bool,
) -> Result<Written, VmError> {
    let access = node.access.as_ref();
    let io = |what: String| move |e: std::io::Error| VmError::Failed(format!("{what}: {e}"));
    // A directory left by a crash holds nothing of value: the record that
    // would own it was never committed or has been deleted.
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io(format!("clearing {}", dir.display())))?;
    }
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    if let Some(access) = access.filter(|_| spec.hypervisor == crate::spec::Hypervisor::Libvirt) {
        crate::access::record(dir, access)?;
    }
    record_sharing(dir, &node.sharing)?;
    for d in &spec.disks {
        let (file, format) = data_file(d);
        let path = dir.join(&file);
        let bytes = d.size_gib.saturating_mul(1 << 30);
        match format {
            DiskFormat::Raw => {
                let f = std::fs::File::create(&path).map_err(io(format!("creating {file}")))?;
                f.set_len(bytes).map_err(io(format!("sizing {file}")))?;
            }
            DiskFormat::Qcow2 => {
                let size = bytes.to_string();
                let args: [&std::ffi::OsStr; 6] = [
                    "create".as_ref(),
                    "-q".as_ref(),
                    "-f".as_ref(),
                    "qcow2".as_ref(),
                    path.as_os_str(),
                    size.as_ref(),
                ];
                provd_tools::Tools::default()
                    .run(provd_tools::QEMU_IMG, args)
                    .map_err(|e| VmError::Failed(format!("creating {file}: {e}")))?;
            }
        }
    }
    let seed = seed_files(&seed_input(spec)).map_err(|e| VmError::Spec(e.to_string()))?;
    write_seed_iso_with(&seed, &dir.join("seed.iso"), durable)
        .map_err(|e| VmError::Failed(e.to_string()))?;
    let (disks, shared_dirs) = attachments(spec, dir, attached, &node.sharing)?;
    render_config(spec, dir, disks, shared_dirs, boot, node.machine, access)
}

/// The spec VM `name` was configured with.
pub fn recorded_spec(store: &Store, name: &str) -> Result<Option<VmSpec>, VmError> {
    let Some(rec) = store.vm(name)? else {
        return Ok(None);
    };
    parse_spec(&rec.spec).map(Some).map_err(|e| VmError::Failed(format!("recorded spec: {e}")))
}

/// Writes the hypervisor configuration of the VM `spec` describes again,
/// attaching `attached` (after a repack moved it onto other shared
/// partitions). Nothing else of the VM changes.
pub fn rerender(store: &Store, spec: &VmSpec, attached: &Attachments) -> Result<(), VmError> {
    let boot = boot_files(store, spec)?;
    let dir = vm_dir(store, &spec.name);
    // The machine the VM was configured with stays: new disks change
    // nothing of how its CPU runs.
    let machine = std::fs::read_to_string(dir.join("domain.xml"))
        .ok()
        .and_then(|xml| crate::qemu::domain_machine(&xml))
        .unwrap_or_default();
    // And so do the user and group its files were handed to.
    let access = crate::access::recorded(&dir)?;
    let (disks, shared_dirs) = attachments(spec, &dir, attached, &recorded_sharing(&dir)?)?;
    render_config(spec, &dir, disks, shared_dirs, &boot, machine, access.as_ref()).map(|_| ())
}

/// Deletes a VM: its directory, its record and reservations, and every
/// partition no other VM uses. Returns whether there was such a VM.
pub fn delete(store: &Store, name: &str) -> Result<bool, VmError> {
    // The name becomes a path under the data directory: only a VM name.
    crate::spec::check_dns_label(name)
        .map_err(|e| VmError::Spec(format!("VM name {name:?}: {e}")))?;
    let existed = store.delete_vm(name)?.is_some();
    // The partitions before the directory: a directory that cannot be
    // removed is only a leftover (configuring the name again clears it),
    // while unreleased partitions would hold disk with no VM to find them.
    let released = store.release_vm(name)?;
    let dir = vm_dir(store, name);
    crate::access::withdraw(&dir, name)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .map_err(|e| VmError::Failed(format!("removing {}: {e}", dir.display())))?;
    }
    Ok(existed || !released.is_empty())
}
