//! Where built partitions live and how they are recorded.
//!
//! A partition is built in a staging directory registered with the store
//! (so garbage collection leaves it alone while the build runs), then
//! published: the directory is renamed to `partitions/<id>/` and its row
//! committed. A crash before the rename leaves only a staging leftover,
//! removed at the next open; a crash between the rename and the commit
//! leaves a directory without a row, also removed at the next open. So a
//! partition is visible only once it is complete and recorded.

use std::collections::{BTreeMap, BTreeSet};

use provd_domain::image::Entry;
use rusqlite::{Connection, OptionalExtension, params};

use crate::db::{ENTRY_COLUMNS, entry_row, insert_entry, now, to_i64};
use crate::{Store, StoreError};

/// What a partition is to its VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionRole {
    /// Layers several VMs stack, read-only.
    Shared,
    /// One VM's own files and its root disk.
    Private,
}

/// How a partition's image is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionFormat {
    Erofs,
    ErofsLz4,
    ErofsLz4hc,
    Ext4,
    /// A directory, exported over virtio-fs.
    Dir,
    /// ext4 in a qcow2 container.
    Qcow2,
}

/// Text columns holding one of a fixed set of names.
macro_rules! named {
    ($t:ty, $($v:ident => $n:literal),* $(,)?) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(<$t>::$v => $n),* }
            }

            pub fn parse(name: &str) -> Option<$t> {
                match name { $($n => Some(<$t>::$v),)* _ => None }
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl rusqlite::types::ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }

        impl rusqlite::types::FromSql for $t {
            fn column_result(
                value: rusqlite::types::ValueRef<'_>,
            ) -> rusqlite::types::FromSqlResult<$t> {
                let text = value.as_str()?;
                <$t>::parse(text).ok_or_else(|| {
                    rusqlite::types::FromSqlError::Other(
                        format!("{text:?} is not a {}", stringify!($t)).into(),
                    )
                })
            }
        }
    };
}

named!(PartitionRole, Shared => "shared", Private => "private");
named!(
    PartitionFormat,
    Erofs => "erofs",
    ErofsLz4 => "erofs-lz4",
    ErofsLz4hc => "erofs-lz4hc",
    Ext4 => "ext4",
    Dir => "dir",
    Qcow2 => "qcow2",
);

/// A published partition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionRecord {
    /// `p-` and 16 hex digits.
    pub id: String,
    pub role: PartitionRole,
    pub format: PartitionFormat,
    /// The image file (or directory) inside the partition's directory.
    pub file: String,
    /// Bytes allocated on the node's disk.
    pub bytes: u64,
    /// Size a guest sees (the image file's length).
    pub apparent_bytes: u64,
    /// The operation that created it, if one did.
    pub operation: Option<String>,
    /// JSON describing the content (layers and VM sets, or a VM's stack).
    pub manifest: String,
    pub created_at: i64,
    /// VMs using it, sorted: a private partition's VM, or the VMs whose
    /// stacks name a layer of a shared partition.
    pub vms: Vec<String>,
    /// Its trust domain (`provd_domain::trust`): `public` or `tenant:<name>`.
    /// A shared partition's layers are all of it; a private partition's is
    /// its VM's tenant's.
    pub domain: String,
}

/// A layer a shared partition holds, as [`Store::publish_partition`]
/// records it.
#[derive(Debug, Clone)]
pub struct NewLayer {
    /// Its directory on the partition: `layers/<name>`.
    pub name: String,
    /// BLAKE3 over its entries.
    pub digest: String,
    pub files: u64,
    pub bytes: u64,
    /// Its entries, kept so that later VMs can be planned against it.
    pub entries: Vec<Entry>,
}

/// One layer of a private partition's stack.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StackedLayer {
    /// The shared partition holding it.
    pub shared: String,
    /// Its name on that partition.
    pub layer: String,
}

/// How the node's layers are used: bytes of file content they hold, by how
/// many VMs stack them. Layers that fewer than two VMs stack are
/// fragmentation: they share nothing (yet), and a repack would drop or merge
/// them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LayerUsage {
    pub layers: u64,
    pub bytes: u64,
    /// Held by layers no VM stacks (on a partition another layer keeps).
    pub unused_bytes: u64,
    /// Held by layers exactly one VM stacks.
    pub single_bytes: u64,
    /// Held by layers two or more VMs stack.
    pub shared_bytes: u64,
}

impl LayerUsage {
    /// Bytes held by layers that fewer than two VMs stack.
    pub fn fragmented_bytes(&self) -> u64 {
        self.unused_bytes + self.single_bytes
    }
}

/// A layer on one of the node's shared partitions.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LayerRecord {
    pub partition: String,
    pub name: String,
    pub digest: String,
    pub files: u64,
    pub bytes: u64,
    /// Whether its entries are on record (layers built before they were
    /// are not offered to new VMs).
    pub recorded: bool,
    /// The shared partition's format.
    pub format: PartitionFormat,
    /// VMs whose stacks name it, sorted.
    pub vms: Vec<String>,
    /// Its shared partition's trust domain.
    pub domain: String,
}

/// What a builder hands to [`Store::publish_partition`].
#[derive(Debug, Clone)]
pub struct NewPartition {
    pub id: String,
    pub role: PartitionRole,
    pub format: PartitionFormat,
    pub file: String,
    pub bytes: u64,
    pub apparent_bytes: u64,
    pub operation: Option<String>,
    pub manifest: String,
    /// The VM of a private partition (a shared partition's users are the
    /// stacks that name its layers).
    pub vms: Vec<String>,
    /// The layers of a shared partition.
    pub layers: Vec<NewLayer>,
    /// The stack of a private partition, bottom first.
    pub stack: Vec<StackedLayer>,
    /// Its trust domain, see [`PartitionRecord::domain`].
    pub domain: String,
}

const COLUMNS: &str =
    "id, role, format, file, bytes, apparent_bytes, operation, manifest, created_at, domain";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PartitionRecord> {
    Ok(PartitionRecord {
        id: r.get(0)?,
        role: r.get(1)?,
        format: r.get(2)?,
        file: r.get(3)?,
        bytes: r.get::<_, i64>(4)?.max(0) as u64,
        apparent_bytes: r.get::<_, i64>(5)?.max(0) as u64,
        operation: r.get(6)?,
        manifest: r.get(7)?,
        created_at: r.get(8)?,
        vms: Vec::new(),
        domain: r.get(9)?,
    })
}

fn with_vms(conn: &Connection, mut rec: PartitionRecord) -> rusqlite::Result<PartitionRecord> {
    let mut stmt = conn.prepare_cached(
        "SELECT vm FROM partition_vms WHERE partition = ?1
         UNION
         SELECT v.vm FROM partition_stack s JOIN partition_vms v ON v.partition = s.private
         WHERE s.shared = ?1 AND s.pending = 0
         ORDER BY 1",
    )?;
    rec.vms = stmt.query_map([&rec.id], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    Ok(rec)
}

/// The shared partitions stacked by `private`.
pub(crate) fn stacked_shared(
    conn: &Connection,
    private: &str,
) -> rusqlite::Result<BTreeSet<String>> {
    let mut stmt =
        conn.prepare_cached("SELECT DISTINCT shared FROM partition_stack WHERE private = ?1")?;
    stmt.query_map([private], |r| r.get(0))?.collect()
}

/// Of `candidates`, the shared partitions no stack names any more and no
/// running operation is building on, deleted in `tx`. A shared partition
/// that an operation still running created is that operation's to keep or
/// remove.
fn delete_unused_shared(
    tx: &rusqlite::Transaction<'_>,
    candidates: &BTreeSet<String>,
) -> rusqlite::Result<Vec<PartitionRecord>> {
    let mut out = Vec::new();
    for id in candidates {
        let unused: bool = tx.query_row(
            "SELECT NOT EXISTS (SELECT 1 FROM partition_stack WHERE shared = ?1)
                AND NOT EXISTS (SELECT 1 FROM partition_vms WHERE partition = ?1)
                AND NOT EXISTS (SELECT 1 FROM partitions p JOIN operations o ON o.id = p.operation
                                WHERE p.id = ?1 AND o.state = 'running')",
            [id],
            |r| r.get(0),
        )?;
        if !unused {
            continue;
        }
        if let Some(rec) = tx
            .query_row(
                &format!("SELECT {COLUMNS} FROM partitions WHERE id = ?1 AND role = 'shared'"),
                [id],
                row,
            )
            .optional()?
        {
            tx.execute("DELETE FROM partitions WHERE id = ?1", [id])?;
            out.push(rec);
        }
    }
    Ok(out)
}

fn select(
    conn: &Connection,
    filter: &str,
    args: impl rusqlite::Params,
) -> rusqlite::Result<Vec<PartitionRecord>> {
    let mut stmt = conn
        .prepare(&format!("SELECT {COLUMNS} FROM partitions {filter} ORDER BY created_at, id"))?;
    let rows: Vec<PartitionRecord> = stmt.query_map(args, row)?.collect::<rusqlite::Result<_>>()?;
    rows.into_iter().map(|r| with_vms(conn, r)).collect()
}

/// A valid partition id: `p-` and 16 lowercase hex digits. Ids become
/// directory names, so nothing else is ever accepted.
pub fn valid_partition_id(id: &str) -> bool {
    id.strip_prefix("p-").is_some_and(|hex| {
        hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// A fresh partition id.
pub fn new_partition_id() -> String {
    new_id("p", 16)
}

/// A fresh id for a record of this node: `prefix`, `-`, then `hex_len`
/// (at most 64) hex digits of BLAKE3 over the time, this process and a
/// counter, so that ids never repeat within a process or across restarts.
pub fn new_id(prefix: &str, hex_len: usize) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h = blake3::Hasher::new();
    h.update(&t.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&crate::objects::temp_name().into_bytes());
    let hex = h.finalize().to_hex();
    format!("{prefix}-{}", hex.get(..hex_len.min(64)).unwrap_or_default())
}

impl Store {
    /// Creates an empty directory in staging for a build; gc leaves it alone
    /// until [`Store::remove_temp`] or [`Store::publish_partition`]. Returns
    /// its name and absolute path (for the external tools a build runs).
    pub fn create_temp_dir(&self) -> Result<(String, std::path::PathBuf), StoreError> {
        let name = format!("part-{}", crate::objects::temp_name());
        self.staging
            .create_dir(&name)
            .map_err(|e| self.io_error("creating a build directory", e))?;
        self.temps.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone());
        Ok((name.clone(), self.path.join("staging").join(name)))
    }

    /// The staging directory as a capability handle.
    pub fn staging_dir(&self) -> &cap_std::fs::Dir {
        &self.staging
    }

    /// Free bytes on the data directory's filesystem for unprivileged use.
    pub fn free_bytes(&self) -> Result<u64, StoreError> {
        let stat = rustix::fs::fstatvfs(&self.lock)
            .map_err(|e| self.io_error("checking free space", e.into()))?;
        Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// Absolute path of a published partition's directory.
    pub fn partition_path(&self, id: &str) -> Result<std::path::PathBuf, StoreError> {
        if !valid_partition_id(id) {
            return Err(StoreError::NotFound(format!("partition {id:?}")));
        }
        Ok(self.path.join("partitions").join(id))
    }

    /// Moves the staging directory `temp` to `partitions/<id>/` and records
    /// it, so the partition appears whole or not at all. A partition of no
    /// operation is synced first, from `since` (taken when its build
    /// started).
    pub fn publish_partition(
        &self,
        temp: &str,
        new: &NewPartition,
        since: &crate::SyncPoint,
    ) -> Result<PartitionRecord, StoreError> {
        if !valid_partition_id(&new.id) {
            return Err(StoreError::NotFound(format!("partition {:?}", new.id)));
        }
        // Sync the built files before they become visible under their final
        // name, so a crash never publishes a partition with missing data.
        // A partition of an operation is synced with everything else the
        // operation wrote, once, before its success is recorded
        // (`Store::sync_since`); until then a crash rolls the whole operation
        // back, this partition with it.
        if new.operation.is_none() {
            self.sync_since(since)?;
        }
        self.staging
            .rename(temp, &self.partitions, &new.id)
            .map_err(|e| self.io_error(format!("publishing partition {}", new.id), e))?;
        self.temps.lock().unwrap_or_else(|p| p.into_inner()).remove(temp);
        let inserted = {
            let mut db = self.lock_db();
            insert(&mut db, new)
        };
        match inserted {
            Ok(()) => {}
            Err(e) => {
                let _ = self.partitions.remove_dir_all(&new.id);
                return Err(self.db_error(e));
            }
        }
        self.partition(&new.id)?.ok_or_else(|| StoreError::NotFound(new.id.clone()))
    }

    /// Replaces a partition's manifest and allocated bytes after a change
    /// to its content.
    pub fn update_partition(&self, id: &str, manifest: &str, bytes: u64) -> Result<(), StoreError> {
        let changed = self
            .lock_db()
            .execute(
                "UPDATE partitions SET manifest = ?2, bytes = ?3 WHERE id = ?1",
                params![id, manifest, to_i64(bytes)],
            )
            .map_err(|e| self.db_error(e))?;
        if changed == 0 {
            return Err(StoreError::NotFound(format!("partition {id}")));
        }
        Ok(())
    }

    /// One partition.
    pub fn partition(&self, id: &str) -> Result<Option<PartitionRecord>, StoreError> {
        let db = self.lock_db();
        let rec = db
            .query_row(&format!("SELECT {COLUMNS} FROM partitions WHERE id = ?1"), [id], row)
            .optional()
            .map_err(|e| self.db_error(e))?;
        rec.map(|r| with_vms(&db, r)).transpose().map_err(|e| self.db_error(e))
    }

    /// Every partition, oldest first.
    pub fn partitions(&self) -> Result<Vec<PartitionRecord>, StoreError> {
        select(&self.lock_db(), "", []).map_err(|e| self.db_error(e))
    }

    /// The partitions `vm` uses, oldest first: its private partition and
    /// every shared partition its stack reaches.
    pub fn partitions_of_vm(&self, vm: &str) -> Result<Vec<PartitionRecord>, StoreError> {
        select(
            &self.lock_db(),
            "WHERE id IN (SELECT partition FROM partition_vms WHERE vm = ?1)
                OR id IN (SELECT s.shared FROM partition_stack s
                          JOIN partition_vms v ON v.partition = s.private
                          WHERE v.vm = ?1 AND s.pending = 0)",
            [vm],
        )
        .map_err(|e| self.db_error(e))
    }

    /// The stack of a private partition, bottom first.
    pub fn stack_of(&self, private: &str) -> Result<Vec<StackedLayer>, StoreError> {
        let db = self.lock_db();
        let mut stmt = db
            .prepare_cached(
                "SELECT shared, layer FROM partition_stack WHERE private = ?1 AND pending = 0
                 ORDER BY position",
            )
            .map_err(|e| self.db_error(e))?;
        stmt.query_map([private], |r| Ok(StackedLayer { shared: r.get(0)?, layer: r.get(1)? }))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.db_error(e))
    }

    /// Runs `change` in one transaction, deletes in it those of the shared
    /// partitions it returns that nothing uses any more, commits, then
    /// removes their directories (rows first: a crash in between leaves
    /// directories without rows, which the next open removes).
    pub(crate) fn free_in(
        &self,
        change: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<BTreeSet<String>>,
    ) -> Result<Vec<PartitionRecord>, StoreError> {
        let freed = {
            let mut db = self.lock_db();
            (|| {
                let tx = db.transaction()?;
                let candidates = change(&tx)?;
                let freed = delete_unused_shared(&tx, &candidates)?;
                tx.commit()?;
                Ok(freed)
            })()
            .map_err(|e| self.db_error(e))?
        };
        for rec in &freed {
            self.remove_partition_dir(&rec.id)?;
        }
        Ok(freed)
    }

    /// Every layer on the node's shared partitions, oldest first, with the
    /// VMs whose stacks name it. With `offered`, only the layers a new VM
    /// may be planned against: entries on record, on a partition that no
    /// running operation is still building.
    pub fn layers(&self, offered: bool) -> Result<Vec<LayerRecord>, StoreError> {
        let mut layers = self.layer_records(offered)?;
        let db = self.lock_db();
        // Every layer's VMs in one query, not one per layer: builds and
        // each metrics scrape read all layers.
        let mut users: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        let mut stmt = db
            .prepare_cached(
                "SELECT DISTINCT s.shared, s.layer, v.vm FROM partition_stack s
                 JOIN partition_vms v ON v.partition = s.private
                 WHERE s.pending = 0 ORDER BY s.shared, s.layer, v.vm",
            )
            .map_err(|e| self.db_error(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?)))
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.db_error(e))?;
        for (shared, layer, vm) in rows {
            users.entry((shared, layer)).or_default().push(vm);
        }
        for l in layers.iter_mut() {
            l.vms = users.remove(&(l.partition.clone(), l.name.clone())).unwrap_or_default();
        }
        Ok(layers)
    }

    /// [`Store::layers`] without the VMs of each (`vms` left empty): what
    /// a plan or a build reads on every request, at a cost that does not
    /// grow with the VMs the node holds.
    pub fn layer_records(&self, offered: bool) -> Result<Vec<LayerRecord>, StoreError> {
        let db = self.lock_db();
        let filter = if offered {
            "WHERE l.recorded = 1 AND NOT EXISTS
                (SELECT 1 FROM operations o WHERE o.id = p.operation AND o.state = 'running')"
        } else {
            ""
        };
        let mut stmt = db
            .prepare(&format!(
                "SELECT l.partition, l.name, l.digest, l.files, l.bytes, l.recorded, p.format, p.domain
                 FROM layers l JOIN partitions p ON p.id = l.partition {filter}
                 ORDER BY p.created_at, l.partition, l.name"
            ))
            .map_err(|e| self.db_error(e))?;
        stmt.query_map([], |r| {
            Ok(LayerRecord {
                partition: r.get(0)?,
                name: r.get(1)?,
                digest: r.get(2)?,
                files: r.get::<_, i64>(3)?.max(0) as u64,
                bytes: r.get::<_, i64>(4)?.max(0) as u64,
                recorded: r.get::<_, i64>(5)? == 1,
                format: r.get(6)?,
                vms: Vec::new(),
                domain: r.get(7)?,
            })
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(|e| self.db_error(e))
    }

    /// How the node's layers are used (see [`LayerUsage`]).
    pub fn layer_usage(&self) -> Result<LayerUsage, StoreError> {
        let mut usage = LayerUsage::default();
        for l in self.layers(false)? {
            usage.layers += 1;
            usage.bytes += l.bytes;
            match l.vms.len() {
                0 => usage.unused_bytes += l.bytes,
                1 => usage.single_bytes += l.bytes,
                _ => usage.shared_bytes += l.bytes,
            }
        }
        Ok(usage)
    }

    /// The entries of a layer, in path order (empty when none are on
    /// record).
    pub fn layer_entries(&self, partition: &str, layer: &str) -> Result<Vec<Entry>, StoreError> {
        let db = self.lock_db();
        let mut stmt = db
            .prepare_cached(&format!(
                "SELECT {ENTRY_COLUMNS} FROM layer_entries
                 WHERE partition = ?1 AND layer = ?2 ORDER BY path"
            ))
            .map_err(|e| self.db_error(e))?;
        stmt.query_map([partition, layer], entry_row)
            .and_then(|rows| rows.collect())
            .map_err(|e| self.db_error(e))
    }

    /// A page of a layer's entries that have content (regular files and
    /// hard links), by path, and how many there are: paged in SQL, so a
    /// page costs its own rows, not the layer's.
    pub fn layer_files_page(
        &self,
        partition: &str,
        layer: &str,
        offset: u64,
        limit: u32,
    ) -> Result<(Vec<Entry>, u64), StoreError> {
        let db = self.lock_db();
        let total: i64 = db
            .query_row(
                "SELECT count(*) FROM layer_entries
                 WHERE partition = ?1 AND layer = ?2 AND hash IS NOT NULL",
                [partition, layer],
                |r| r.get(0),
            )
            .map_err(|e| self.db_error(e))?;
        let mut stmt = db
            .prepare_cached(&format!(
                "SELECT {ENTRY_COLUMNS} FROM layer_entries
                 WHERE partition = ?1 AND layer = ?2 AND hash IS NOT NULL
                 ORDER BY path LIMIT ?3 OFFSET ?4"
            ))
            .map_err(|e| self.db_error(e))?;
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(rusqlite::params![partition, layer, i64::from(limit), offset], entry_row)
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.db_error(e))?;
        Ok((rows, total.max(0) as u64))
    }

    /// The partitions an operation created, oldest first.
    pub fn partitions_of_operation(
        &self,
        operation: &str,
    ) -> Result<Vec<PartitionRecord>, StoreError> {
        select(&self.lock_db(), "WHERE operation = ?1", [operation]).map_err(|e| self.db_error(e))
    }

    /// Stops `vm` using any partition and removes every partition no VM
    /// uses any more. Returns the removed partitions.
    pub fn release_vm(&self, vm: &str) -> Result<Vec<PartitionRecord>, StoreError> {
        let unused = {
            let mut db = self.lock_db();
            release(&mut db, vm).map_err(|e| self.db_error(e))?
        };
        // Rows go first: a crash now leaves directories without rows, which
        // the next open removes.
        for rec in &unused {
            self.remove_partition_dir(&rec.id)?;
        }
        Ok(unused)
    }

    /// Removes one partition whatever VM uses it (an operation rolling
    /// back what it built), and the shared partitions only its stack still
    /// named. A shared partition that a stack names is refused.
    pub fn remove_partition(&self, id: &str) -> Result<Option<PartitionRecord>, StoreError> {
        let Some(rec) = self.partition(id)? else { return Ok(None) };
        let freed = {
            let mut db = self.lock_db();
            remove(&mut db, id).map_err(|e| self.db_error(e))?
        };
        let freed = match freed {
            Ok(freed) => freed,
            Err(stackers) => {
                return Err(StoreError::InUse(format!(
                    "shared partition {id} holds layers that private partitions {} stack",
                    stackers.join(", ")
                )));
            }
        };
        self.remove_partition_dir(id)?;
        for other in &freed {
            self.remove_partition_dir(&other.id)?;
        }
        Ok(Some(rec))
    }

    /// Removes the shared partitions that no stack names, that no VM is
    /// recorded on and that no running operation is building on (a crash
    /// between releasing their last VM and deleting them, or a request
    /// that built one and never stacked it). Returns them.
    pub fn free_unused_shared(&self) -> Result<Vec<PartitionRecord>, StoreError> {
        self.free_in(|tx| {
            let mut stmt = tx.prepare("SELECT id FROM partitions WHERE role = 'shared'")?;
            stmt.query_map([], |r| r.get(0))?.collect()
        })
    }

    /// [`Store::free_unused_shared`] for the shared partitions operation
    /// `operation` built, when it has ended: what it left unstacked.
    pub fn free_unused_shared_of(
        &self,
        operation: &str,
    ) -> Result<Vec<PartitionRecord>, StoreError> {
        self.free_in(|tx| {
            let mut stmt =
                tx.prepare("SELECT id FROM partitions WHERE role = 'shared' AND operation = ?1")?;
            stmt.query_map([operation], |r| r.get(0))?.collect()
        })
    }

    fn remove_partition_dir(&self, id: &str) -> Result<(), StoreError> {
        match self.partitions.remove_dir_all(id) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io_error(format!("removing partition {id}"), e)),
        }
    }

    /// Removes partition directories without a row (a crash between publish
    /// and commit, or between a release's commit and its deletion). Returns
    /// how many.
    pub(crate) fn sweep_partitions(&self) -> Result<u64, StoreError> {
        let io = |e| self.io_error("listing partitions", e);
        let known: std::collections::HashSet<String> =
            self.partitions()?.into_iter().map(|p| p.id).collect();
        let mut removed = 0;
        for entry in self.partitions.entries().map_err(io)? {
            let name = entry.map_err(io)?.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) {
                tracing::info!(partition = %name, "removing a partition that was never recorded");
                self.partitions
                    .remove_dir_all(&name)
                    .or_else(|_| self.partitions.remove_file(&name))
                    .map_err(|e| self.io_error(format!("removing leftover partition {name}"), e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Deletes partition `id` and the shared partitions only it stacked;
/// `Err(stackers)` when `id` is a shared partition some stack names.
#[allow(clippy::type_complexity)]
fn remove(
    conn: &mut Connection,
    id: &str,
) -> rusqlite::Result<Result<Vec<PartitionRecord>, Vec<String>>> {
    let tx = conn.transaction()?;
    let stackers: Vec<String> = {
        let mut stmt = tx.prepare(
            "SELECT DISTINCT private FROM partition_stack WHERE shared = ?1 ORDER BY private",
        )?;
        stmt.query_map([id], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?
    };
    if !stackers.is_empty() {
        return Ok(Err(stackers));
    }
    let stacked = stacked_shared(&tx, id)?;
    tx.execute("DELETE FROM partitions WHERE id = ?1", [id])?;
    let freed = delete_unused_shared(&tx, &stacked)?;
    tx.commit()?;
    Ok(Ok(freed))
}

fn insert(conn: &mut Connection, new: &NewPartition) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    tx.execute(
        "INSERT INTO partitions (id, role, format, file, bytes, apparent_bytes, operation, manifest, created_at, domain)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            new.id,
            new.role,
            new.format,
            new.file,
            to_i64(new.bytes),
            to_i64(new.apparent_bytes),
            new.operation,
            new.manifest,
            now(),
            new.domain
        ],
    )?;
    for vm in &new.vms {
        tx.execute(
            "INSERT OR IGNORE INTO partition_vms (partition, vm) VALUES (?1, ?2)",
            params![new.id, vm],
        )?;
    }
    {
        let mut layer = tx.prepare(
            "INSERT INTO layers (partition, name, digest, files, bytes, recorded)
             VALUES (?1, ?2, ?3, ?4, ?5, 1)",
        )?;
        let mut entry = tx.prepare(
            "INSERT INTO layer_entries (partition, layer, path, kind, mode, uid, gid, mtime, size,
                                        hash, link_target, dev_major, dev_minor)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )?;
        for l in &new.layers {
            layer.execute(params![new.id, l.name, l.digest, to_i64(l.files), to_i64(l.bytes)])?;
            for e in &l.entries {
                insert_entry(&mut entry, &[&new.id, &l.name], e)?;
            }
        }
        // A layer removed since the plan was made fails the foreign key:
        // the partition is not published.
        let mut stack = tx.prepare(
            "INSERT INTO partition_stack (private, pending, position, shared, layer)
             VALUES (?1, 0, ?2, ?3, ?4)",
        )?;
        for (i, s) in new.stack.iter().enumerate() {
            stack.execute(params![new.id, to_i64(i as u64), s.shared, s.layer])?;
        }
    }
    tx.commit()
}

fn release(conn: &mut Connection, vm: &str) -> rusqlite::Result<Vec<PartitionRecord>> {
    let tx = conn.transaction()?;
    let used: Vec<String> = {
        let mut stmt = tx.prepare("SELECT partition FROM partition_vms WHERE vm = ?1")?;
        stmt.query_map([vm], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?
    };
    tx.execute("DELETE FROM partition_vms WHERE vm = ?1", [vm])?;
    let mut unused = Vec::new();
    let mut stacked = BTreeSet::new();
    for id in used {
        let users: i64 =
            tx.query_row("SELECT count(*) FROM partition_vms WHERE partition = ?1", [&id], |r| {
                r.get(0)
            })?;
        if users > 0 {
            continue;
        }
        // A private partition goes with its VM, and with it its stack.
        stacked.extend(stacked_shared(&tx, &id)?);
        if let Some(rec) = tx
            .query_row(
                &format!("SELECT {COLUMNS} FROM partitions WHERE id = ?1 AND role = 'private'"),
                [&id],
                row,
            )
            .optional()?
        {
            tx.execute("DELETE FROM partitions WHERE id = ?1", [&id])?;
            unused.push(rec);
        } else {
            stacked.insert(id);
        }
    }
    unused.extend(delete_unused_shared(&tx, &stacked)?);
    tx.commit()?;
    Ok(unused)
}
