//! The images' lifecycle: which images are in use, deleting one that is
//! not, and collecting those nobody used for a while or past a byte
//! budget.
//!
//! An image is in use while a VM's spec or a VM's private partition names
//! it (`provctl partition verify` compares the partitions with it), and
//! while a running operation holds it (`Store::hold_image`, taken before
//! the fetch): such an image is never removed. The check against running
//! operations and the removal happen under one lock, so a collection and
//! a fetch of the same image never interleave.

use std::collections::HashSet;

use provd_store::{ImageRecord, PartitionRole, Store, StoreError};
use provd_wire as wire;

use crate::Node;

/// What a collection removes; both unset removes only object files
/// nothing references.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcPolicy {
    /// Unused images not fetched for this many seconds.
    pub max_age_secs: Option<u64>,
    /// Unused images, least recently used first, until the store's object
    /// files take at most this many bytes.
    pub max_bytes: Option<u64>,
}

/// Why an image was not deleted.
#[derive(Debug, thiserror::Error)]
pub enum DeleteImageError {
    #[error("no image {0} on this node")]
    NotFound(String),
    #[error("{0}")]
    InUse(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The canonical form of a reference, or the text itself when it does
/// not parse (it then matches only an image recorded under that text).
fn canonical(reference: &str) -> String {
    provd_images::Reference::parse(reference)
        .map(|r| r.to_string())
        .unwrap_or_else(|_| reference.into())
}

/// Images the node's VMs use, each with a VM that does: named by a VM's
/// spec or by a private partition's manifest. A record that cannot be
/// read fails the whole: what it names cannot be known, so nothing may be
/// removed on its account.
fn used_by_vms(store: &Store) -> Result<Vec<(String, String)>, StoreError> {
    let unreadable = |what: String| {
        StoreError::InUse(format!("{what} cannot be read: no image is removed while it is"))
    };
    let mut used = Vec::new();
    for vm in store.vms()? {
        // Only the image is read, without the spec's checks: a spec a
        // later version would check more strictly still names its image.
        let image = spec_image(&vm.spec)
            .ok_or_else(|| unreadable(format!("the image of VM {:?}'s spec", vm.name)))?;
        used.push((canonical(&image), vm.name.clone()));
    }
    for p in store.partitions()? {
        if p.role != PartitionRole::Private {
            continue;
        }
        let manifest = serde_json::from_str::<serde_json::Value>(&p.manifest)
            .map_err(|e| unreadable(format!("the manifest of partition {} ({e})", p.id)))?;
        let image = manifest
            .get("image")
            .and_then(|i| i.as_str())
            .ok_or_else(|| unreadable(format!("the image of partition {}", p.id)))?;
        let vm = manifest.get("vm").and_then(|v| v.as_str()).unwrap_or(&p.id).to_string();
        used.push((image.to_string(), vm));
    }
    Ok(used)
}

/// The `image` of a VM spec as a manager wrote it, in JSON or TOML.
fn spec_image(text: &str) -> Option<String> {
    if text.trim_start().starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        v.get("image")?.as_str().map(str::to_string)
    } else {
        let v: toml::Table = text.parse().ok()?;
        v.get("image")?.as_str().map(str::to_string)
    }
}

/// When an image was last used: its last fetch, or its import.
fn last_use(image: &ImageRecord) -> u64 {
    u64::try_from(image.used_at.unwrap_or(image.created_at).max(image.created_at)).unwrap_or(0)
}

impl Node {
    /// The images VMs or running operations use.
    pub fn images_in_use(&self) -> Result<HashSet<String>, StoreError> {
        let mut used: HashSet<String> =
            used_by_vms(&self.store)?.into_iter().map(|(image, _)| image).collect();
        used.extend(self.store.held_images());
        Ok(used)
    }

    /// Deletes image `reference` and the object files no other image uses,
    /// unless a VM or a running operation uses it.
    pub fn delete_image(&self, reference: &str) -> Result<wire::ImageDeleted, DeleteImageError> {
        // Read before looking at what VMs use (`Store::hold_clock`).
        let clock = self.store.hold_clock();
        let wanted = canonical(reference);
        let image = match self.store.image(&wanted)? {
            Some(i) => i,
            None => match self.store.image(reference)? {
                Some(i) => i,
                None => return Err(DeleteImageError::NotFound(reference.to_string())),
            },
        };
        let used = used_by_vms(&self.store).map_err(|e| match e {
            StoreError::InUse(why) => DeleteImageError::InUse(why),
            e => e.into(),
        })?;
        if let Some((_, vm)) = used.into_iter().find(|(i, _)| *i == image.reference) {
            return Err(DeleteImageError::InUse(format!(
                "image {} is in use by VM {vm:?}: delete the VM first",
                image.reference
            )));
        }
        let freed = match clock.remove_unheld_image(&image.reference) {
            Ok(f) => f,
            Err(StoreError::InUse(why)) => return Err(DeleteImageError::InUse(why)),
            Err(StoreError::NotFound(_)) => {
                return Err(DeleteImageError::NotFound(reference.to_string()));
            }
            Err(e) => return Err(e.into()),
        };
        Ok(wire::ImageDeleted {
            reference: image.reference,
            objects: freed.objects,
            bytes: freed.bytes,
        })
    }

    /// Removes the unused images `policy` names, then every object file
    /// nothing references. Staging is left alone: operations running
    /// meanwhile write there, and the start clears what a crash left.
    pub fn collect_images(&self, policy: GcPolicy) -> Result<wire::GcReport, StoreError> {
        let store = &self.store;
        // Read before looking at what VMs use (`Store::hold_clock`).
        let clock = store.hold_clock();
        let vm_used: HashSet<String> =
            used_by_vms(store)?.into_iter().map(|(image, _)| image).collect();
        let mut images: Vec<ImageRecord> = store.images()?;
        // Least recently used first: the budget removes those first.
        images.sort_by_key(|i| (last_use(i), i.id));
        let mut report = wire::GcReport {
            max_age_secs: policy.max_age_secs,
            max_bytes: policy.max_bytes,
            ..wire::GcReport::default()
        };
        let now = crate::operations::unix_now();
        let mut object_bytes = store.sizes()?.objects.1;
        for image in images {
            if vm_used.contains(&image.reference) {
                report.in_use += 1;
                continue;
            }
            let age = now.saturating_sub(last_use(&image));
            let reason = if policy.max_age_secs.is_some_and(|max| age >= max) {
                "age"
            } else if policy.max_bytes.is_some_and(|max| object_bytes > max) {
                "budget"
            } else {
                continue;
            };
            match clock.remove_unheld_image(&image.reference) {
                Ok(freed) => {
                    object_bytes = object_bytes.saturating_sub(freed.bytes);
                    report.objects += freed.objects;
                    report.bytes += freed.bytes;
                    report.images.push(wire::RemovedImage {
                        reference: image.reference,
                        reason: reason.into(),
                        freed_bytes: freed.bytes,
                    });
                }
                // Held by a running operation, or gone meanwhile.
                Err(StoreError::InUse(_)) => report.in_use += 1,
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let freed = store.gc_objects()?;
        report.objects += freed.objects;
        report.bytes += freed.bytes;
        report.object_bytes = store.sizes()?.objects.1;
        Ok(report)
    }
}
