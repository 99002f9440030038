//! Customising a configured VM's cloud-init seed, journalled so that an
//! operation that does not succeed leaves the seed and spec as they were:
//! the undo record and the seed before are written durably beside the seed
//! first, and closed (kept or undone) once the operation's end is known,
//! at the latest at the next start.

use std::path::{Path, PathBuf};

use provd_domain::VmGrant;
use provd_store::Store;

use crate::VmError;
use crate::cloudinit::{seed_files, write_seed_iso};
use crate::configure::{check_grant, seed_input, vm_dir};
use crate::spec::{VmSpec, parse_spec};

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
            .operation(&other.operation)?
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
        .vm(&new.name)?
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
        return Err(e.into());
    }
    if let Err(e) = std::fs::rename(&temp, &path) {
        let _ = std::fs::remove_file(&temp);
        let _ = store.update_vm_spec(&new.name, &rec.spec);
        return Err(VmError::Failed(format!("replacing seed.iso: {e}")));
    }
    // The hypervisor's link still names the old seed.
    crate::access::relink(&dir, &new.name, "seed.iso")?;
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
    crate::access::relink(&dir, name, "seed.iso")?;
    store.update_vm_spec(name, spec)?;
    Ok(())
}
