//! What a VM attaches: its private partition as the root disk and every
//! shared partition its stack reaches, checked against the VM's name and
//! tenant whatever built them.

use provd_domain::attach::{Attachments, ImageFormat, RootDisk, SharedAttachment, SharedDevice};
use provd_domain::trust::{may_see, tenant_domain};
use provd_store::{PartitionFormat, PartitionRecord, PartitionRole, Store};

use crate::{PartitionError, PrivateManifest, SharedFormat, shared_manifest};

/// The attachments of VM `vm` of `tenant` on `private` (its record, whose
/// manifest may be newer than the one on record during a repack move).
pub fn attachments(
    store: &Store,
    private: &PartitionRecord,
    vm: &str,
    tenant: &str,
) -> Result<Attachments, PartitionError> {
    if private.role != PartitionRole::Private {
        return Err(PartitionError::NotFound(format!(
            "partition {} is not a private partition",
            private.id
        )));
    }
    let manifest: PrivateManifest = serde_json::from_str(&private.manifest).map_err(|e| {
        PartitionError::Unreadable { partition: private.id.clone(), reason: e.to_string() }
    })?;
    if manifest.vm != vm {
        return Err(PartitionError::Denied {
            field: "name",
            reason: format!(
                "partition {} was built for VM {:?}, not {vm:?}",
                private.id, manifest.vm
            ),
        });
    }
    // The tenant decides whose bytes the guest may read: its private
    // partition must be of its tenant and each shared partition it attaches
    // public or its tenant's.
    if private.domain != tenant_domain(tenant) {
        return Err(PartitionError::Denied {
            field: "tenant",
            reason: format!(
                "partition {} was built for domain {}, not for tenant {tenant:?}",
                private.id, private.domain
            ),
        });
    }
    let root = RootDisk {
        partition: private.id.clone(),
        path: path_of(store, &private.id)?.join(&private.file),
        format: if private.format == PartitionFormat::Qcow2 {
            ImageFormat::Qcow2
        } else {
            ImageFormat::Raw
        },
        apparent_bytes: private.apparent_bytes,
    };
    let mut shared = Vec::with_capacity(manifest.shared.len());
    for s in &manifest.shared {
        let rec = store.partition(&s.partition)?.ok_or_else(|| {
            PartitionError::NotFound(format!("shared partition {} is gone", s.partition))
        })?;
        if !may_see(tenant, &rec.domain) {
            return Err(PartitionError::Denied {
                field: "tenant",
                reason: format!(
                    "a VM of tenant {tenant:?} may not attach shared partition {} (domain {})",
                    rec.id, rec.domain
                ),
            });
        }
        let manifest = shared_manifest(&rec)?;
        let device = match manifest.format {
            SharedFormat::Dir => SharedDevice::VirtioFs,
            _ => SharedDevice::Disk,
        };
        // A size that is not the 2 MiB multiple the layout promised (a
        // record from another version) is attached as a disk.
        let pmem_bytes = (manifest.dax
            && manifest.format == SharedFormat::Erofs
            && rec.apparent_bytes > 0
            && rec.apparent_bytes % provd_formats::erofs_writer::PMEM_ALIGN == 0)
            .then_some(rec.apparent_bytes);
        shared.push(SharedAttachment {
            path: path_of(store, &rec.id)?.join(&rec.file),
            public: rec.domain == provd_domain::trust::PUBLIC,
            partition: rec.id,
            device,
            pmem_bytes,
        });
    }
    Ok(Attachments { root, shared })
}

fn path_of(store: &Store, id: &str) -> Result<std::path::PathBuf, PartitionError> {
    store.partition_path(id).map_err(|e| PartitionError::NotFound(e.to_string()))
}
