//! The on-disk manifests of shared and private partitions, and their
//! formats: what the store records and what a private partition carries.

use provd_domain::image::Entry;
use provd_store::{PartitionFormat, PartitionRecord};

use crate::plan::identity;
use crate::{AddedFile, PartitionError};

/// Formats of the shared partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SharedFormat {
    /// EROFS, uncompressed.
    Erofs,
    /// EROFS with lz4 compression (fast to build).
    ErofsLz4,
    /// EROFS with lz4hc compression (smaller, slower to build).
    ErofsLz4hc,
    /// ext4 without a journal.
    Ext4,
    /// A plain directory, for export over virtio-fs.
    Dir,
}

impl SharedFormat {
    pub const NAMES: &'static str = "erofs, erofs-lz4, erofs-lz4hc, ext4, dir";

    pub fn as_str(self) -> &'static str {
        match self {
            SharedFormat::Erofs => "erofs",
            SharedFormat::ErofsLz4 => "erofs-lz4",
            SharedFormat::ErofsLz4hc => "erofs-lz4hc",
            SharedFormat::Ext4 => "ext4",
            SharedFormat::Dir => "dir",
        }
    }

    /// The format the store records.
    pub fn stored(self) -> PartitionFormat {
        match self {
            SharedFormat::Erofs => PartitionFormat::Erofs,
            SharedFormat::ErofsLz4 => PartitionFormat::ErofsLz4,
            SharedFormat::ErofsLz4hc => PartitionFormat::ErofsLz4hc,
            SharedFormat::Ext4 => PartitionFormat::Ext4,
            SharedFormat::Dir => PartitionFormat::Dir,
        }
    }

    pub fn parse(name: &str) -> Result<SharedFormat, PartitionError> {
        [
            SharedFormat::Erofs,
            SharedFormat::ErofsLz4,
            SharedFormat::ErofsLz4hc,
            SharedFormat::Ext4,
            SharedFormat::Dir,
        ]
        .into_iter()
        .find(|f| f.as_str() == name)
        .ok_or_else(|| PartitionError::UnknownFormat {
            role: "shared",
            name: name.to_string(),
            expected: Self::NAMES,
        })
    }

    pub(crate) fn file_name(self) -> &'static str {
        match self {
            SharedFormat::Erofs | SharedFormat::ErofsLz4 | SharedFormat::ErofsLz4hc => {
                "shared.erofs"
            }
            SharedFormat::Ext4 => "shared.ext4",
            SharedFormat::Dir => "tree",
        }
    }

    /// The `fstype` a guest mounts it with.
    pub(crate) fn fstype(self) -> &'static str {
        match self {
            SharedFormat::Erofs | SharedFormat::ErofsLz4 | SharedFormat::ErofsLz4hc => "erofs",
            SharedFormat::Ext4 => "ext4",
            SharedFormat::Dir => "virtiofs",
        }
    }
}

/// Formats of a private partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrivateFormat {
    /// A raw ext4 image (sparse).
    Ext4,
    /// The same ext4 filesystem in a qcow2 container.
    Qcow2,
}

impl PrivateFormat {
    pub const NAMES: &'static str = "ext4, qcow2";

    pub fn as_str(self) -> &'static str {
        match self {
            PrivateFormat::Ext4 => "ext4",
            PrivateFormat::Qcow2 => "qcow2",
        }
    }

    /// The format the store records.
    pub fn stored(self) -> PartitionFormat {
        match self {
            PrivateFormat::Ext4 => PartitionFormat::Ext4,
            PrivateFormat::Qcow2 => PartitionFormat::Qcow2,
        }
    }

    pub fn parse(name: &str) -> Result<PrivateFormat, PartitionError> {
        match name {
            "ext4" => Ok(PrivateFormat::Ext4),
            "qcow2" => Ok(PrivateFormat::Qcow2),
            _ => Err(PartitionError::UnknownFormat {
                role: "private",
                name: name.to_string(),
                expected: Self::NAMES,
            }),
        }
    }
}

/// One layer as the shared partition's manifest names it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerInfo {
    pub id: String,
    pub vms: Vec<String>,
    pub files: u64,
    pub bytes: u64,
    /// BLAKE3 over the layer's entries ([`layer_digest`]): a private
    /// partition stacks a layer only if its plan has exactly this one.
    #[serde(default)]
    pub digest: String,
}

/// BLAKE3 over a layer's entries as a partition reproduces them, in path
/// order.
pub fn layer_digest(entries: &[Entry]) -> String {
    let mut ids: Vec<Entry> = entries.iter().map(identity).collect();
    ids.sort_by(|a, b| a.path.cmp(&b.path));
    let mut h = blake3::Hasher::new();
    for e in &ids {
        let line = serde_json::to_string(e).unwrap_or_default();
        h.update(&(line.len() as u64).to_le_bytes());
        h.update(line.as_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// `provd-shared.json`, also the shared partition's database manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedManifest {
    pub partition: String,
    pub format: SharedFormat,
    /// Filesystem UUID (none for a directory).
    pub uuid: Option<String>,
    pub layers: Vec<LayerInfo>,
    /// Laid out to be mapped with DAX from a persistent-memory device:
    /// every regular file in whole blocks, the image a multiple of 2 MiB.
    /// Uncompressed EROFS partitions are; older ones and other formats
    /// are attached as disks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dax: bool,
}

/// Where a private partition finds one of its shared partitions.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedRef {
    pub partition: String,
    pub format: SharedFormat,
    pub uuid: Option<String>,
}

/// One layer of a private partition's stack.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackItem {
    /// Index into the manifest's `shared` list.
    pub shared: usize,
    /// The layer's directory on that partition: `layers/<layer>`.
    pub layer: String,
    /// Its digest ([`layer_digest`]); empty in manifests written before
    /// layers were node-wide.
    #[serde(default)]
    pub digest: String,
}

/// Most shared partitions one VM attaches: each is a disk (or a virtio-fs
/// export) of its hypervisor and a mount in its initramfs. Well below what
/// libvirt, Cloud Hypervisor and Firecracker attach, so that a VM keeps
/// room for its data disks; a plan never reaches past it (the files of
/// layers on further partitions are stored again).
pub const MAX_SHARED_PER_VM: usize = provd_dedup::DEFAULT_MAX_SHARED_PARTITIONS;

/// Reads `shared` as a list, or as the single partition (or null) that
/// manifests held before layers were node-wide.
pub(crate) fn shared_refs<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<SharedRef>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Any {
        Many(Vec<SharedRef>),
        One(SharedRef),
    }
    Ok(match <Option<Any> as serde::Deserialize>::deserialize(d)? {
        None => Vec::new(),
        Some(Any::Many(v)) => v,
        Some(Any::One(one)) => vec![one],
    })
}

/// Reads `stack` as items, or as the layer ids (all on one shared
/// partition) that manifests held before.
pub(crate) fn stack_items<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<StackItem>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Item {
        Legacy(String),
        Now(StackItem),
    }
    let items = <Vec<Item> as serde::Deserialize>::deserialize(d)?;
    Ok(items
        .into_iter()
        .map(|i| match i {
            Item::Legacy(layer) => StackItem { shared: 0, layer, digest: String::new() },
            Item::Now(item) => item,
        })
        .collect())
}

/// `provd/partition.json`, also the private partition's database manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivateManifest {
    pub partition: String,
    pub vm: String,
    pub format: PrivateFormat,
    pub uuid: String,
    /// The image the VM's files come from, and its digest at build time.
    pub image: String,
    pub image_digest: String,
    /// The shared partitions its layers are on, in the order the boot
    /// script mounts them.
    #[serde(deserialize_with = "shared_refs")]
    pub shared: Vec<SharedRef>,
    /// Its layers, bottom first.
    #[serde(deserialize_with = "stack_items")]
    pub stack: Vec<StackItem>,
    /// Paths of its image's root where it hides what its layers hold.
    #[serde(default)]
    pub whiteouts: u64,
    /// Files added after the build, in the VM's root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added: Vec<AddedFile>,
}

impl PrivateManifest {
    /// Its stack as (shared partition, layer) pairs, bottom first.
    pub fn stack_names(&self) -> Vec<(String, String)> {
        self.stack
            .iter()
            .map(|i| {
                let partition = self.shared.get(i.shared).map(|r| r.partition.clone());
                (partition.unwrap_or_default(), i.layer.clone())
            })
            .collect()
    }

    /// Whether its boot files take the one-partition format (`fstype=` and
    /// `device=` lines, bare layer names): whenever it stacks at most one
    /// shared partition. Guests whose initramfs carries the boot script of
    /// an earlier provd read only that format, so a VM on one shared
    /// partition (every VM after a repack) boots with either script; only
    /// a VM on several needs the current one.
    pub(crate) fn one_partition_format(&self) -> bool {
        self.shared.len() <= 1
    }
}

/// The manifest of a shared partition.
pub fn shared_manifest(rec: &PartitionRecord) -> Result<SharedManifest, PartitionError> {
    serde_json::from_str(&rec.manifest).map_err(|e| {
        PartitionError::NotFound(format!("partition {} is not a shared partition: {e}", rec.id))
    })
}

#[cfg(test)]
mod manifest_tests {
    // Tests: a failed unwrap is a failed test.
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::boot::{shared_file, stack_file};

    /// A private partition built before layers were node-wide keeps its
    /// manifest and the boot files it carries.
    #[test]
    fn an_earlier_manifest_parses_and_gives_back_its_boot_files() {
        let old = r#"{"partition":"p-0000000000000002","vm":"web","format":"ext4","uuid":"u2",
            "image":"dir:/a","image_digest":"x",
            "shared":{"partition":"p-0000000000000001","format":"erofs","uuid":"1234"},
            "stack":["layer-0","layer-1"]}"#;
        let m: PrivateManifest = serde_json::from_str(old).unwrap();
        assert_eq!(m.shared.len(), 1);
        assert_eq!(
            m.stack[1],
            StackItem { shared: 0, layer: "layer-1".into(), digest: String::new() }
        );
        assert_eq!(stack_file(&m), "layer-0\nlayer-1\n");
        assert_eq!(shared_file(&m), "fstype=erofs\ndevice=/dev/disk/by-uuid/1234\n");
        let none: PrivateManifest = serde_json::from_str(
            r#"{"partition":"p","vm":"v","format":"ext4","uuid":"u","image":"i","image_digest":"d",
                "shared":null,"stack":[]}"#,
        )
        .unwrap();
        assert!(none.shared.is_empty());
        assert_eq!((stack_file(&none), shared_file(&none)), (String::new(), String::new()));
        // Two partitions: the indexed format; it round-trips.
        let mut two = m.clone();
        two.shared.push(SharedRef {
            partition: "p-0000000000000009".into(),
            format: SharedFormat::Dir,
            uuid: None,
        });
        two.stack[1].shared = 1;
        assert_eq!(stack_file(&two), "0 layer-0\n1 layer-1\n");
        assert_eq!(
            shared_file(&two),
            "0 erofs /dev/disk/by-uuid/1234\n1 virtiofs provd-p-0000000000000009\n"
        );
        let back: PrivateManifest =
            serde_json::from_str(&serde_json::to_string(&two).unwrap()).unwrap();
        assert_eq!(back, two);
    }
}
