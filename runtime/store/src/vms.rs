//! VM records and the node resources they reserve.
//!
//! A VM's record, its reservations (vCPUs, memory, disk) and its MAC
//! addresses are written in one `IMMEDIATE` transaction after checking, in
//! that same transaction, that the node still has room: two requests racing
//! for the last capacity are serialised by SQLite's write lock, so one wins
//! and the other is refused with what is missing. Deleting the record
//! releases exactly its reservations (they cascade with it).

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::db::{now, to_i64};
use crate::{Store, StoreError};

/// Resources a node offers or a VM takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Resources {
    pub vcpus: u64,
    pub memory_mib: u64,
    pub disk_bytes: u64,
}

impl Resources {
    fn named(&self) -> [(&'static str, u64); 3] {
        [("vcpus", self.vcpus), ("memory-mib", self.memory_mib), ("disk-bytes", self.disk_bytes)]
    }
}

/// What [`Store::reserve_vm`] records.
#[derive(Debug, Clone)]
pub struct NewVm {
    pub name: String,
    /// The validated spec, as JSON.
    pub spec: String,
    pub operation: Option<String>,
    /// Effective MAC addresses, lowercase.
    pub macs: Vec<String>,
    pub needs: Resources,
}

/// A VM as recorded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VmRecord {
    pub name: String,
    pub spec: String,
    pub operation: Option<String>,
    pub macs: Vec<String>,
    pub reserved: Resources,
    pub created_at: i64,
}

/// Why a reservation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// a VM of that name exists
    #[error("a VM named {0:?} already exists")]
    Exists(String),
    /// a MAC address is taken
    #[error("MAC address {mac} is already used by VM {vm:?}")]
    MacInUse { mac: String, vm: String },
    /// the node has not enough left
    #[error("VM {vm:?} does not fit on this node: {}", .missing.iter().map(|(r, need, free)| format!("{r}: needs {need}, {free} free")).collect::<Vec<_>>().join("; "))]
    DoesNotFit { vm: String, missing: Vec<(String, u64, u64)> },
    /// the store failed
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn used(conn: &Connection) -> rusqlite::Result<Resources> {
    let mut out = Resources::default();
    let mut stmt = conn.prepare_cached(
        "SELECT resource, coalesce(sum(amount), 0) FROM reservations GROUP BY resource",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        let (resource, amount) = row?;
        let amount = amount.max(0) as u64;
        match resource.as_str() {
            "vcpus" => out.vcpus = amount,
            "memory-mib" => out.memory_mib = amount,
            "disk-bytes" => out.disk_bytes = amount,
            _ => {}
        }
    }
    Ok(out)
}

fn record(conn: &Connection, name: &str) -> rusqlite::Result<Option<VmRecord>> {
    let Some((name, spec, operation, created_at)) = conn
        .query_row(
            "SELECT name, spec, operation, created_at FROM vms WHERE name = ?1",
            [name],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            },
        )
        .optional()?
    else {
        return Ok(None);
    };
    let mut macs_stmt =
        conn.prepare_cached("SELECT mac FROM vm_macs WHERE vm = ?1 ORDER BY mac")?;
    let macs = macs_stmt.query_map([&name], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    let mut reserved = Resources::default();
    let mut res_stmt =
        conn.prepare_cached("SELECT resource, amount FROM reservations WHERE vm = ?1")?;
    for row in res_stmt.query_map([&name], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
        let (resource, amount) = row?;
        let amount = amount.max(0) as u64;
        match resource.as_str() {
            "vcpus" => reserved.vcpus = amount,
            "memory-mib" => reserved.memory_mib = amount,
            "disk-bytes" => reserved.disk_bytes = amount,
            _ => {}
        }
    }
    Ok(Some(VmRecord { name, spec, operation, macs, reserved, created_at }))
}

impl Store {
    /// Records `vm` and reserves its resources out of `capacity`, all or
    /// nothing.
    pub fn reserve_vm(&self, vm: &NewVm, capacity: &Resources) -> Result<VmRecord, ReserveError> {
        let mut db = self.lock_db();
        let err = |e| ReserveError::Store(self.db_error(e));
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let exists: bool = tx
            .query_row("SELECT count(*) FROM vms WHERE name = ?1", [&vm.name], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(err)?
            > 0;
        if exists {
            return Err(ReserveError::Exists(vm.name.clone()));
        }
        for mac in &vm.macs {
            let owner: Option<String> = tx
                .query_row("SELECT vm FROM vm_macs WHERE mac = ?1", [mac], |r| r.get(0))
                .optional()
                .map_err(err)?;
            if let Some(owner) = owner {
                return Err(ReserveError::MacInUse { mac: mac.clone(), vm: owner });
            }
        }
        let taken = used(&tx).map_err(err)?;
        let mut missing = Vec::new();
        for ((resource, need), ((_, cap), (_, in_use))) in
            vm.needs.named().into_iter().zip(capacity.named().into_iter().zip(taken.named()))
        {
            let free = cap.saturating_sub(in_use);
            if need > free {
                missing.push((resource.to_string(), need, free));
            }
        }
        if !missing.is_empty() {
            return Err(ReserveError::DoesNotFit { vm: vm.name.clone(), missing });
        }
        tx.execute(
            "INSERT INTO vms (name, spec, operation, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![vm.name, vm.spec, vm.operation, now()],
        )
        .map_err(err)?;
        for (resource, amount) in vm.needs.named() {
            tx.execute(
                "INSERT INTO reservations (vm, resource, amount) VALUES (?1, ?2, ?3)",
                params![vm.name, resource, to_i64(amount)],
            )
            .map_err(err)?;
        }
        for mac in &vm.macs {
            tx.execute("INSERT INTO vm_macs (mac, vm) VALUES (?1, ?2)", params![mac, vm.name])
                .map_err(|e| match e {
                    rusqlite::Error::SqliteFailure(f, _)
                        if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                    {
                        ReserveError::MacInUse { mac: mac.clone(), vm: vm.name.clone() }
                    }
                    other => err(other),
                })?;
        }
        let rec = record(&tx, &vm.name).map_err(err)?;
        tx.commit().map_err(err)?;
        rec.ok_or_else(|| ReserveError::Store(StoreError::NotFound(format!("VM {}", vm.name))))
    }

    /// Deletes a VM's record, releasing its reservations and MACs.
    pub fn delete_vm(&self, name: &str) -> Result<Option<VmRecord>, StoreError> {
        let mut db = self.lock_db();
        let tx = db.transaction().map_err(|e| self.db_error(e))?;
        let rec = record(&tx, name).map_err(|e| self.db_error(e))?;
        tx.execute("DELETE FROM vms WHERE name = ?1", [name]).map_err(|e| self.db_error(e))?;
        tx.commit().map_err(|e| self.db_error(e))?;
        Ok(rec)
    }

    /// Replaces the recorded spec of VM `name` (its cloud-init was
    /// customised); `false` when there is no such VM.
    pub fn update_vm_spec(&self, name: &str, spec: &str) -> Result<bool, StoreError> {
        let changed = self
            .lock_db()
            .execute("UPDATE vms SET spec = ?2 WHERE name = ?1", [name, spec])
            .map_err(|e| self.db_error(e))?;
        Ok(changed == 1)
    }

    /// One VM.
    pub fn vm(&self, name: &str) -> Result<Option<VmRecord>, StoreError> {
        record(&self.lock_db(), name).map_err(|e| self.db_error(e))
    }

    /// Every VM, by name.
    pub fn vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        let db = self.lock_db();
        let names: Vec<String> = {
            let mut stmt =
                db.prepare("SELECT name FROM vms ORDER BY name").map_err(|e| self.db_error(e))?;
            stmt.query_map([], |r| r.get(0))
                .and_then(|rows| rows.collect::<rusqlite::Result<_>>())
                .map_err(|e| self.db_error(e))?
        };
        let mut out = Vec::new();
        for name in names {
            if let Some(rec) = record(&db, &name).map_err(|e| self.db_error(e))? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Resources reserved by all VMs.
    pub fn reserved(&self) -> Result<Resources, StoreError> {
        used(&self.lock_db()).map_err(|e| self.db_error(e))
    }
}
