//! Configuring a VM on the node: the spec checked against the plugin's
//! grant and the node's capacity, resources reserved with the VM's record,
//! its cloud-init seed and data disks created, its partitions attached and
//! the hypervisor's configuration written under `<data>/vms/<name>/`.
//!
//! The reservation is the first side effect and is undone, with the VM's
//! directory, when any later step fails: a refused or failed configuration
//! leaves nothing reserved and nothing written.

use std::path::{Path, PathBuf};

use provd_domain::{NodeCapacity, VmGrant};
use provd_partitions::{PrivateManifest, SharedFormat, SharedManifest};
use provd_store::{NewVm, PartitionRecord, ReserveError, Resources, Store};

use crate::cloudinit::{
    SeedInput, SeedNic, SeedUser, seed_files, write_seed_iso, write_seed_iso_with,
};
use crate::render::{AttachedDisk, DiskFormat, DiskRole, RenderInput, SharedDir, render};
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
    /// building the configuration failed
    #[error("{0}")]
    Failed(String),
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

fn vm_dir(store: &Store, name: &str) -> PathBuf {
    store.path().join("vms").join(name)
}

/// Beside a VM's seed while an operation's customisation of it is not
/// settled: the operation, the spec and (in `UNDO_SEED`) the seed before.
const UNDO_RECORD: &str = "customize.undo.json";
const UNDO_SEED: &str = "seed.iso.undo";

#[derive(serde::Serialize, serde::Deserialize)]
struct UndoRecord {
    operation: String,
    spec: String,
}

/// Writes the undo of a customisation durably, the seed first: the record
/// is what makes it count. An undo already there for this operation stays:
/// it holds the state before the operation's first customisation.
fn write_undo(
    store: &Store,
    dir: &Path,
    operation: &str,
    spec: &str,
    seed: &[u8],
) -> Result<(), VmError> {
    let fail = |what: &str, e: std::io::Error| VmError::Failed(format!("{what}: {e}"));
    if let Some(other) = undo_record(dir)? {
        if other.operation == operation {
            return Ok(());
        }
        // The journal of an operation whose end is on record (closed just
        // after it) is stale; one of a running operation is not.
        let running = store
            .operation(&other.operation)
            .map_err(|e| VmError::Failed(e.to_string()))?
            .is_some_and(|r| r.state == provd_store::OpState::Running);
        if running {
            return Err(VmError::Failed(format!(
                "{} holds a customisation of a running operation",
                dir.display()
            )));
        }
    }
    let record = serde_json::to_vec(&UndoRecord { operation: operation.into(), spec: spec.into() })
        .map_err(|e| VmError::Failed(e.to_string()))?;
    for (name, bytes) in [(UNDO_SEED, seed), (UNDO_RECORD, record.as_slice())] {
        let temp = dir.join(format!("{name}.new"));
        let written = (|| {
            let mut f = std::fs::File::create(&temp)?;
            std::io::Write::write_all(&mut f, bytes)?;
            f.sync_all()?;
            std::fs::rename(&temp, dir.join(name))
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(fail(&format!("writing {name}"), e));
        }
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fail("syncing the VM's folder", e))
}

/// The journal of `vm`'s customisation, if one is open.
fn undo_record(dir: &Path) -> Result<Option<UndoRecord>, VmError> {
    let path = dir.join(UNDO_RECORD);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| VmError::Failed(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(VmError::Failed(format!("reading {}: {e}", path.display()))),
    }
}

/// Closes the journal of `vm`'s customisation by `operation` once that
/// operation's end is known: the customisation stays when `keep`,
/// otherwise the spec and seed from before it are put back; then the
/// journal goes. Returns whether one was undone.
pub fn end_customization(
    store: &Store,
    vm: &str,
    operation: &str,
    keep: bool,
) -> Result<bool, VmError> {
    crate::spec::check_dns_label(vm).map_err(|e| VmError::Spec(format!("VM name {vm:?}: {e}")))?;
    let dir = vm_dir(store, vm);
    let Some(record) = undo_record(&dir)? else { return Ok(false) };
    if record.operation != operation {
        return Ok(false);
    }
    if !keep {
        let seed = std::fs::read(dir.join(UNDO_SEED))
            .map_err(|e| VmError::Failed(format!("reading {UNDO_SEED} of {vm}: {e}")))?;
        restore_seed(store, vm, &record.spec, &seed)?;
    }
    // The record first: without it a leftover seed copy means nothing.
    std::fs::remove_file(dir.join(UNDO_RECORD))
        .map_err(|e| VmError::Failed(format!("removing {UNDO_RECORD} of {vm}: {e}")))?;
    let _ = std::fs::remove_file(dir.join(UNDO_SEED));
    Ok(!keep)
}

/// Closes every journal a stop left open, keeping a customisation when
/// `succeeded` says its operation succeeded and undoing it otherwise. Run
/// at start, after interrupted operations are recorded as failed. Returns
/// the VMs whose customisation was undone.
pub fn recover_customizations(
    store: &Store,
    succeeded: impl Fn(&str) -> Result<bool, VmError>,
) -> Result<Vec<String>, VmError> {
    let mut undone = Vec::new();
    let Ok(entries) = std::fs::read_dir(store.path().join("vms")) else { return Ok(undone) };
    for entry in entries.flatten() {
        let Some(record) = undo_record(&entry.path())? else {
            // A stop between the two renames of `write_undo` leaves a seed
            // copy alone, which means nothing.
            let _ = std::fs::remove_file(entry.path().join(UNDO_SEED));
            continue;
        };
        let name = entry.file_name().to_string_lossy().into_owned();
        let keep = succeeded(&record.operation)?;
        if end_customization(store, &name, &record.operation, keep)? {
            undone.push(name);
        }
    }
    Ok(undone)
}

/// A UUID derived from the VM name: stable across re-renders, distinct per
/// name.
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

fn check_grant(spec: &VmSpec, grant: &VmGrant) -> Result<(), VmError> {
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

fn seed_input(spec: &VmSpec) -> SeedInput {
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

/// What a VM's configuration is made from besides its spec: its private
/// partition, the shared partitions its stack reaches and its boot files.
struct Resolved {
    private_path: PathBuf,
    private_format: DiskFormat,
    shared: Vec<(PartitionRecord, SharedManifest)>,
    boot: BootFiles,
}

/// Resolves what `spec`'s configuration on `private` needs.
fn resolve(store: &Store, spec: &VmSpec, private: &PartitionRecord) -> Result<Resolved, VmError> {
    if private.role != "private" {
        return Err(VmError::NotFound(format!(
            "partition {} is not a private partition",
            private.id
        )));
    }
    let manifest: PrivateManifest = serde_json::from_str(&private.manifest)
        .map_err(|e| VmError::Failed(format!("partition {}: {e}", private.id)))?;
    if manifest.vm != spec.name {
        return Err(VmError::Denied {
            field: "name".into(),
            reason: format!(
                "partition {} was built for VM {:?}, not {:?}",
                private.id, manifest.vm, spec.name
            ),
        });
    }
    // The tenant decides whose bytes the guest may read: its private
    // partition must be of its tenant and each shared partition it attaches
    // public or its tenant's, whatever built them.
    let tenant = spec.tenant();
    if private.domain != provd_domain::trust::tenant_domain(tenant) {
        return Err(VmError::Denied {
            field: "tenant".into(),
            reason: format!(
                "partition {} was built for domain {}, not for tenant {tenant:?}",
                private.id, private.domain
            ),
        });
    }
    let private_path = store
        .partition_path(&private.id)
        .map_err(|e| VmError::NotFound(e.to_string()))?
        .join(&private.file);
    let private_format =
        if private.format == "qcow2" { DiskFormat::Qcow2 } else { DiskFormat::Raw };
    // Every shared partition its stack reaches, in the order its boot
    // files list them.
    let mut shared = Vec::with_capacity(manifest.shared.len());
    for s in &manifest.shared {
        let rec =
            store.partition(&s.partition).map_err(|e| VmError::Failed(e.to_string()))?.ok_or_else(
                || VmError::NotFound(format!("shared partition {} is gone", s.partition)),
            )?;
        if !provd_domain::trust::may_see(tenant, &rec.domain) {
            return Err(VmError::Denied {
                field: "tenant".into(),
                reason: format!(
                    "a VM of tenant {tenant:?} may not attach shared partition {} (domain {})",
                    rec.id, rec.domain
                ),
            });
        }
        let sm: SharedManifest = serde_json::from_str(&rec.manifest)
            .map_err(|e| VmError::Failed(format!("partition {}: {e}", rec.id)))?;
        shared.push((rec, sm));
    }
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
    Ok(Resolved {
        private_path,
        private_format,
        shared,
        boot: BootFiles { kernel, initrd, firmware },
    })
}

/// Configures the VM `spec_text` describes, with `private` as its root
/// disk, for a plugin holding `grant`, on a node of `capacity`.
pub fn configure(
    store: &Store,
    spec_text: &str,
    private: &PartitionRecord,
    grant: &VmGrant,
    capacity: &NodeCapacity,
    operation: Option<&str>,
) -> Result<Configured, VmError> {
    let spec = parse_spec(spec_text).map_err(|e| VmError::Spec(e.to_string()))?;
    check_grant(&spec, grant)?;
    let resolved = resolve(store, &spec, private)?;
    let data_bytes: u64 = spec.disks.iter().map(|d| d.size_gib.saturating_mul(1 << 30)).sum();
    let needs = Resources {
        vcpus: u64::from(spec.vcpus),
        memory_mib: spec.memory_mib,
        disk_bytes: private.apparent_bytes.saturating_add(data_bytes),
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
        &capacity_of(capacity),
    )?;
    let dir = vm_dir(store, &spec.name);
    // In an operation, the operation's end makes everything durable with
    // one syncfs; alone, the seed is synced itself.
    let built = write_vm(store, &spec, &dir, &resolved, operation.is_none());
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

/// Every disk and virtio-fs export of a VM, with their host paths.
fn attachments(
    store: &Store,
    spec: &VmSpec,
    dir: &Path,
    r: &Resolved,
) -> Result<(Vec<AttachedDisk>, Vec<SharedDir>), VmError> {
    let mut disks = vec![AttachedDisk {
        role: DiskRole::Private,
        name: "root".into(),
        path: r.private_path.clone(),
        format: r.private_format,
        read_only: false,
    }];
    let mut shared_dirs = Vec::new();
    for (i, (rec, sm)) in r.shared.iter().enumerate() {
        let path = store
            .partition_path(&rec.id)
            .map_err(|e| VmError::NotFound(e.to_string()))?
            .join(&rec.file);
        if sm.format == SharedFormat::Dir {
            shared_dirs.push(SharedDir {
                path,
                tag: format!("provd-{}", rec.id),
                socket: dir.join(format!("virtiofs-{i}.sock")),
            });
        } else {
            disks.push(AttachedDisk {
                role: DiskRole::Shared,
                name: format!("shared-{i}"),
                path,
                format: DiskFormat::Raw,
                read_only: true,
            });
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
        });
    }
    disks.push(AttachedDisk {
        role: DiskRole::Seed,
        name: "seed".into(),
        path: dir.join("seed.iso"),
        format: DiskFormat::Raw,
        read_only: true,
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
) -> Result<Written, VmError> {
    let io = |what: String| move |e: std::io::Error| VmError::Failed(format!("{what}: {e}"));
    let input = RenderInput {
        spec,
        uuid: uuid_of(&spec.name),
        disks: disks.clone(),
        shared_dirs,
        kernel: boot.kernel.clone(),
        initrd: boot.initrd.clone(),
        firmware: boot.firmware.clone(),
        serial_log: Some(dir.join("serial.log")),
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
            format!("{role}:{}", d.name)
        })
        .collect();
    Ok((rendered.file_name.to_string(), rendered.text, names))
}

fn write_vm(
    store: &Store,
    spec: &VmSpec,
    dir: &Path,
    r: &Resolved,
    durable: bool,
) -> Result<Written, VmError> {
    let io = |what: String| move |e: std::io::Error| VmError::Failed(format!("{what}: {e}"));
    // A directory left by a crash holds nothing of value: the record that
    // would own it was never committed or has been deleted.
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io(format!("clearing {}", dir.display())))?;
    }
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
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
                let status = std::process::Command::new("/usr/bin/qemu-img")
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&path)
                    .arg(bytes.to_string())
                    .env_clear()
                    .status()
                    .map_err(io("running qemu-img (Debian package qemu-utils)".into()))?;
                if !status.success() {
                    return Err(VmError::Failed(format!(
                        "qemu-img create {file} failed ({status})"
                    )));
                }
            }
        }
    }
    let seed = seed_files(&seed_input(spec)).map_err(|e| VmError::Spec(e.to_string()))?;
    write_seed_iso_with(&seed, &dir.join("seed.iso"), durable)
        .map_err(|e| VmError::Failed(e.to_string()))?;
    let (disks, shared_dirs) = attachments(store, spec, dir, r)?;
    render_config(spec, dir, disks, shared_dirs, &r.boot)
}

/// Writes VM `name`'s hypervisor configuration again from its recorded
/// spec and the partitions its private partition's manifest names (after
/// a repack moved it onto other shared partitions). Nothing else of the VM
/// changes.
pub fn rerender(store: &Store, name: &str) -> Result<(), VmError> {
    let private = store
        .partitions_of_vm(name)
        .map_err(|e| VmError::Failed(e.to_string()))?
        .into_iter()
        .find(|p| p.role == "private")
        .ok_or_else(|| VmError::NotFound(format!("VM {name:?} has no private partition")))?;
    rerender_on(store, name, &private)
}

/// [`rerender`] with `private` as the VM's private partition record (its
/// manifest possibly newer than the one on record).
pub fn rerender_on(store: &Store, name: &str, private: &PartitionRecord) -> Result<(), VmError> {
    let rec = store
        .vm(name)
        .map_err(|e| VmError::Failed(e.to_string()))?
        .ok_or_else(|| VmError::NotFound(format!("no VM {name:?} on this node")))?;
    let spec = parse_spec(&rec.spec).map_err(|e| VmError::Failed(format!("recorded spec: {e}")))?;
    let resolved = resolve(store, &spec, private)?;
    let dir = vm_dir(store, &spec.name);
    let (disks, shared_dirs) = attachments(store, &spec, &dir, &resolved)?;
    render_config(&spec, &dir, disks, shared_dirs, &resolved.boot).map(|_| ())
}

/// Deletes a VM: its directory, its record and reservations, and every
/// partition no other VM uses. Returns whether there was such a VM.
pub fn delete(store: &Store, name: &str) -> Result<bool, VmError> {
    // The name becomes a path under the data directory: only a VM name.
    crate::spec::check_dns_label(name)
        .map_err(|e| VmError::Spec(format!("VM name {name:?}: {e}")))?;
    let existed = store.delete_vm(name).map_err(|e| VmError::Failed(e.to_string()))?.is_some();
    // The partitions before the directory: a directory that cannot be
    // removed is only a leftover (configuring the name again clears it),
    // while unreleased partitions would hold disk with no VM to find them.
    let released = store.release_vm(name).map_err(|e| VmError::Failed(e.to_string()))?;
    let dir = vm_dir(store, name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .map_err(|e| VmError::Failed(format!("removing {}: {e}", dir.display())))?;
    }
    Ok(existed || !released.is_empty())
}

/// A VM's seed rewritten by [`customize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customized {
    pub name: String,
    /// The new seed's instance id: cloud-init applies the seed at the next
    /// boot because it differs from the last one.
    pub instance_id: String,
    /// The seed image, attached to the VM since it was configured.
    pub seed: PathBuf,
    /// What [`restore_seed`] needs to undo it: the spec and seed before.
    pub previous_spec: String,
    pub previous_seed: Vec<u8>,
}

/// The part of a spec that `customize` may not change: everything but the
/// cloud-init section and the NICs' addressing.
fn fixed_part(spec: &VmSpec) -> VmSpec {
    let mut fixed = spec.clone();
    fixed.cloud_init = None;
    for nic in &mut fixed.nics {
        nic.ipv4 = None;
        nic.ipv6 = None;
        nic.dhcp4 = false;
        nic.dhcp6 = false;
        nic.dns.clear();
    }
    fixed
}

/// Rewrites the cloud-init seed of an existing VM from `spec_text`: its
/// recorded spec with another `cloud-init` section (hostname, users, SSH
/// keys, user-data, network-config) or other NIC addresses. Any other
/// difference is refused, naming the field, because it would change what
/// the hypervisor runs rather than what the guest is told. The new seed is
/// written beside the old one and renamed over it, then the recorded spec
/// is updated; a failure leaves the old seed and spec in place.
pub fn customize(
    store: &Store,
    spec_text: &str,
    grant: &VmGrant,
    journal: Option<&str>,
) -> Result<Customized, VmError> {
    let new = parse_spec(spec_text).map_err(|e| VmError::Spec(e.to_string()))?;
    check_grant(&new, grant)?;
    let rec = store
        .vm(&new.name)
        .map_err(|e| VmError::Failed(e.to_string()))?
        .ok_or_else(|| VmError::NotFound(format!("no VM {:?} on this node", new.name)))?;
    let old = parse_spec(&rec.spec).map_err(|e| VmError::Failed(format!("recorded spec: {e}")))?;
    let (a, b) = (fixed_part(&old), fixed_part(&new));
    if a != b {
        let field = [
            ("tenant", a.tenant != b.tenant),
            ("hypervisor", a.hypervisor != b.hypervisor),
            ("vcpus", a.vcpus != b.vcpus),
            ("topology", a.topology != b.topology),
            ("memory-mib", a.memory_mib != b.memory_mib),
            ("image", a.image != b.image),
            ("disks", a.disks != b.disks),
            ("nics", a.nics != b.nics),
            ("boot", a.boot != b.boot),
            ("labels", a.labels != b.labels),
        ]
        .into_iter()
        .find(|(_, differs)| *differs)
        .map(|(f, _)| f)
        .unwrap_or("spec");
        return Err(VmError::Denied {
            field: field.into(),
            reason: "only the cloud-init section and NIC addresses of a configured VM can be \
                     changed; configure it again for anything else"
                .into(),
        });
    }
    let seed = seed_files(&seed_input(&new)).map_err(|e| VmError::Spec(e.to_string()))?;
    let dir = vm_dir(store, &new.name);
    let path = dir.join("seed.iso");
    let previous_seed = std::fs::read(&path)
        .map_err(|e| VmError::Failed(format!("reading {}: {e}", path.display())))?;
    // Before anything changes, what undoes it is on disk, so that a crash
    // of an operation that is then rolled back restores it too.
    if let Some(operation) = journal {
        write_undo(store, &dir, operation, &rec.spec, &previous_seed)?;
    }
    let temp = dir.join("seed.iso.new");
    write_seed_iso(&seed, &temp).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        VmError::Failed(e.to_string())
    })?;
    // The spec first, then the seed: if the rename fails the old spec goes
    // back, so the record always describes the seed the VM has.
    if let Err(e) = store.update_vm_spec(&new.name, spec_text) {
        let _ = std::fs::remove_file(&temp);
        return Err(VmError::Failed(e.to_string()));
    }
    if let Err(e) = std::fs::rename(&temp, &path) {
        let _ = std::fs::remove_file(&temp);
        let _ = store.update_vm_spec(&new.name, &rec.spec);
        return Err(VmError::Failed(format!("replacing seed.iso: {e}")));
    }
    Ok(Customized {
        name: new.name,
        instance_id: seed.instance_id,
        seed: path,
        previous_spec: rec.spec,
        previous_seed,
    })
}

/// Puts back the spec and seed a [`customize`] replaced (the request that
/// customised the VM failed).
pub fn restore_seed(store: &Store, name: &str, spec: &str, seed: &[u8]) -> Result<(), VmError> {
    crate::spec::check_dns_label(name)
        .map_err(|e| VmError::Spec(format!("VM name {name:?}: {e}")))?;
    let dir = vm_dir(store, name);
    let temp = dir.join("seed.iso.new");
    let io = |what: &str, e: std::io::Error| VmError::Failed(format!("{what}: {e}"));
    std::fs::write(&temp, seed).map_err(|e| io("writing seed.iso.new", e))?;
    std::fs::rename(&temp, dir.join("seed.iso")).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        io("restoring seed.iso", e)
    })?;
    store.update_vm_spec(name, spec).map_err(|e| VmError::Failed(e.to_string()))?;
    Ok(())
}
