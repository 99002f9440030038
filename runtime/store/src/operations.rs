//! Operations (provisioning requests run by the daemon), the exclusion of
//! VM names between running operations, and the audit trail.
//!
//! An operation is recorded before it starts and finished in one
//! transaction with the release of its VM names. What it builds on the node
//! is recorded against its id by the tables that own those effects
//! (`partitions.operation`, `vms.operation`), each published only after
//! the effect exists under a temporary name; so after a crash an operation
//! still `running` names exactly what must be rolled back.

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use crate::db::now;
use crate::{Store, StoreError};

/// Where an operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl OpState {
    pub fn as_str(self) -> &'static str {
        match self {
            OpState::Running => "running",
            OpState::Succeeded => "succeeded",
            OpState::Failed => "failed",
            OpState::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> OpState {
        match s {
            "succeeded" => OpState::Succeeded,
            "failed" => OpState::Failed,
            "cancelled" => OpState::Cancelled,
            _ => OpState::Running,
        }
    }

    pub fn finished(self) -> bool {
        self != OpState::Running
    }
}

/// An operation to record.
#[derive(Debug, Clone)]
pub struct NewOperation {
    pub id: String,
    pub idempotency_key: Option<String>,
    /// BLAKE3 of the canonical request: the same key with another request
    /// is a conflict, not a replay.
    pub request_digest: String,
    pub plugin: String,
    pub version: String,
    /// What the plugin receives.
    pub input: String,
    /// Who asked (the manager certificate's subject, or `local`).
    pub actor: String,
    /// The VM names the request is about.
    pub vms: Vec<String>,
}

/// A recorded operation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct OperationRecord {
    pub id: String,
    pub idempotency_key: Option<String>,
    #[serde(skip)]
    pub request_digest: String,
    pub plugin: String,
    pub version: String,
    #[serde(skip)]
    pub input: String,
    pub actor: String,
    pub state: OpState,
    pub phase: Option<String>,
    pub done: Option<u64>,
    pub total: Option<u64>,
    /// The plugin's report (JSON text), when it succeeded.
    pub report: Option<String>,
    pub error_code: Option<String>,
    pub error: Option<String>,
    pub vms: Vec<String>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
}

/// What recording an operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    /// A new operation; the caller runs it.
    New(OperationRecord),
    /// The idempotency key names an operation with the same request.
    Existing(OperationRecord),
}

/// Why an operation was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum OperationError {
    /// the key was used for another request
    #[error("idempotency key {key:?} was used by operation {operation} for a different request")]
    KeyReused { key: String, operation: String },
    /// a running operation holds one of the VM names
    #[error("VM {vm:?} is in operation {operation}, which is still running")]
    VmBusy { vm: String, operation: String },
    /// the store failed
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An audit entry to record.
#[derive(Debug, Clone, Default)]
pub struct NewAudit {
    pub actor: String,
    /// `host-call`, `bundle`, `operation`, `plugin`.
    pub kind: String,
    pub plugin: Option<String>,
    pub version: Option<String>,
    pub operation: Option<String>,
    pub interface: Option<String>,
    pub function: Option<String>,
    pub args: Option<String>,
    pub outcome: String,
    pub detail: Option<String>,
    /// Identical calls folded into this entry.
    pub count: u64,
}

/// A recorded audit entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AuditRecord {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub kind: String,
    pub plugin: Option<String>,
    pub version: Option<String>,
    pub operation: Option<String>,
    pub interface: Option<String>,
    pub function: Option<String>,
    pub args: Option<String>,
    pub outcome: String,
    pub detail: Option<String>,
    pub count: u64,
}

/// Which audit entries to read.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub operation: Option<String>,
    pub plugin: Option<String>,
    pub kind: Option<String>,
    pub outcome: Option<String>,
    /// Only entries with a larger id.
    pub after: Option<i64>,
    pub limit: u32,
}

/// Most audit entries one query returns.
pub const MAX_AUDIT_PAGE: u32 = 1000;

const OP_COLUMNS: &str = "id, idempotency_key, request_digest, plugin, version, input, actor, \
     state, phase, done, total, report, error_code, error, created_at, finished_at";

fn op_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OperationRecord> {
    let opt_u64 = |v: Option<i64>| v.map(|v| v.max(0) as u64);
    Ok(OperationRecord {
        id: r.get(0)?,
        idempotency_key: r.get(1)?,
        request_digest: r.get(2)?,
        plugin: r.get(3)?,
        version: r.get(4)?,
        input: r.get(5)?,
        actor: r.get(6)?,
        state: OpState::parse(&r.get::<_, String>(7)?),
        phase: r.get(8)?,
        done: opt_u64(r.get(9)?),
        total: opt_u64(r.get(10)?),
        report: r.get(11)?,
        error_code: r.get(12)?,
        error: r.get(13)?,
        vms: Vec::new(),
        created_at: r.get(14)?,
        finished_at: r.get(15)?,
    })
}

fn with_vms(
    conn: &rusqlite::Connection,
    mut rec: OperationRecord,
) -> rusqlite::Result<OperationRecord> {
    let mut stmt =
        conn.prepare_cached("SELECT vm FROM operation_vms WHERE operation = ?1 ORDER BY vm")?;
    rec.vms = stmt.query_map([&rec.id], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    Ok(rec)
}

fn operation(conn: &rusqlite::Connection, id: &str) -> rusqlite::Result<Option<OperationRecord>> {
    let rec = conn
        .query_row(&format!("SELECT {OP_COLUMNS} FROM operations WHERE id = ?1"), [id], op_row)
        .optional()?;
    rec.map(|r| with_vms(conn, r)).transpose()
}

fn insert_audit(conn: &rusqlite::Connection, entries: &[NewAudit]) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO audit (at, actor, kind, plugin, version, operation, interface,
                            function, args, outcome, detail, count)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?;
    let at = now();
    for a in entries {
        stmt.execute(params![
            at,
            a.actor,
            a.kind,
            a.plugin,
            a.version,
            a.operation,
            a.interface,
            a.function,
            a.args,
            a.outcome,
            a.detail,
            to_i64(a.count.max(1))
        ])?;
    }
    Ok(())
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Store {
    /// Records a new running operation and takes its VM names, or returns
    /// the operation its idempotency key already names; all in one
    /// transaction, with `audit` (written only for a new operation).
    pub fn start_operation(
        &self,
        op: &NewOperation,
        audit: &[NewAudit],
    ) -> Result<Started, OperationError> {
        let mut db = self.lock_db();
        let err = |e| OperationError::Store(self.db_error(e));
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        if let Some(key) = &op.idempotency_key {
            let existing: Option<(String, String)> = tx
                .query_row(
                    "SELECT id, request_digest FROM operations WHERE idempotency_key = ?1",
                    [key],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(err)?;
            if let Some((id, digest)) = existing {
                if digest != op.request_digest {
                    return Err(OperationError::KeyReused { key: key.clone(), operation: id });
                }
                let rec = operation(&tx, &id).map_err(err)?;
                return rec
                    .map(Started::Existing)
                    .ok_or_else(|| OperationError::Store(StoreError::NotFound(id)));
            }
        }
        for vm in &op.vms {
            let holder: Option<String> = tx
                .query_row(
                    "SELECT operation FROM operation_vms WHERE vm = ?1 AND active = 1",
                    [vm],
                    |r| r.get(0),
                )
                .optional()
                .map_err(err)?;
            if let Some(holder) = holder {
                return Err(OperationError::VmBusy { vm: vm.clone(), operation: holder });
            }
        }
        tx.execute(
            "INSERT INTO operations (id, idempotency_key, request_digest, plugin, version, input,
                                     actor, state, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'running', ?8)",
            params![
                op.id,
                op.idempotency_key,
                op.request_digest,
                op.plugin,
                op.version,
                op.input,
                op.actor,
                now()
            ],
        )
        .map_err(err)?;
        for vm in &op.vms {
            tx.execute(
                "INSERT INTO operation_vms (operation, vm, active) VALUES (?1, ?2, 1)",
                params![op.id, vm],
            )
            .map_err(err)?;
        }
        insert_audit(&tx, audit).map_err(err)?;
        let rec = operation(&tx, &op.id).map_err(err)?;
        tx.commit().map_err(err)?;
        rec.map(Started::New)
            .ok_or_else(|| OperationError::Store(StoreError::NotFound(op.id.clone())))
    }

    /// Records the latest progress of a running operation.
    pub fn operation_progress(
        &self,
        id: &str,
        phase: &str,
        done: u64,
        total: Option<u64>,
    ) -> Result<(), StoreError> {
        self.lock_db()
            .execute(
                "UPDATE operations SET phase = ?2, done = ?3, total = ?4
                 WHERE id = ?1 AND state = 'running'",
                params![id, phase, to_i64(done), total.map(to_i64)],
            )
            .map_err(|e| self.db_error(e))?;
        Ok(())
    }

    /// Finishes a running operation and releases its VM names, in one
    /// transaction with its last progress and `audit`. Finishing one that
    /// is already finished changes nothing and returns `false`.
    pub fn finish_operation(
        &self,
        id: &str,
        state: OpState,
        report: Option<&str>,
        error: Option<(&str, &str)>,
        progress: Option<(&str, u64, Option<u64>)>,
        audit: &[NewAudit],
    ) -> Result<bool, StoreError> {
        let mut db = self.lock_db();
        let err = |e| self.db_error(e);
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        if let Some((phase, done, total)) = progress {
            tx.execute(
                "UPDATE operations SET phase = ?2, done = ?3, total = ?4
                 WHERE id = ?1 AND state = 'running'",
                params![id, phase, to_i64(done), total.map(to_i64)],
            )
            .map_err(err)?;
        }
        let changed = tx
            .execute(
                "UPDATE operations SET state = ?2, report = ?3, error_code = ?4, error = ?5,
                                       finished_at = ?6
                 WHERE id = ?1 AND state = 'running'",
                params![id, state.as_str(), report, error.map(|e| e.0), error.map(|e| e.1), now()],
            )
            .map_err(err)?;
        tx.execute("UPDATE operation_vms SET active = 0 WHERE operation = ?1", [id])
            .map_err(err)?;
        if changed == 1 {
            insert_audit(&tx, audit).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(changed == 1)
    }

    /// One operation.
    pub fn operation(&self, id: &str) -> Result<Option<OperationRecord>, StoreError> {
        operation(&self.lock_db(), id).map_err(|e| self.db_error(e))
    }

    /// Operations, newest first; only `state` ones when given. Their
    /// `input` is left empty.
    pub fn operations(
        &self,
        state: Option<OpState>,
        limit: u32,
    ) -> Result<Vec<OperationRecord>, StoreError> {
        let db = self.lock_db();
        let err = |e| self.db_error(e);
        let mut stmt = db
            // A list leaves out each operation's input (up to a megabyte
            // each), which it does not return.
            .prepare(&format!(
                "SELECT {} FROM operations WHERE (?1 IS NULL OR state = ?1)
                 ORDER BY created_at DESC, id DESC LIMIT ?2",
                OP_COLUMNS.replace("input,", "'' AS input,")
            ))
            .map_err(err)?;
        let rows = stmt
            .query_map(params![state.map(OpState::as_str), limit], op_row)
            .map_err(err)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(err)?;
        rows.into_iter().map(|r| with_vms(&db, r).map_err(err)).collect()
    }

    /// Forgets the oldest finished operations beyond `keep_operations` and
    /// the oldest audit rows beyond `keep_audit_rows`, so that the history
    /// a remote party can make grows only so far. Running operations and
    /// the rows of the newest ones stay. Returns how many of each went.
    pub fn prune_history(
        &self,
        keep_operations: u64,
        keep_audit_rows: u64,
    ) -> Result<(u64, u64), StoreError> {
        let mut db = self.lock_db();
        let err = |e| self.db_error(e);
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let ops = tx
            .execute(
                "DELETE FROM operations WHERE id IN (
                     SELECT id FROM operations WHERE state != 'running'
                     ORDER BY finished_at DESC, id DESC LIMIT -1 OFFSET ?1)",
                [to_i64(keep_operations)],
            )
            .map_err(err)?;
        let rows = tx
            .execute(
                "DELETE FROM audit WHERE id <= (SELECT max(id) FROM audit) - ?1",
                [to_i64(keep_audit_rows)],
            )
            .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok((ops as u64, rows as u64))
    }

    /// Names of the VMs an operation configured, newest first.
    pub fn vms_of_operation(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let db = self.lock_db();
        let mut stmt = db
            .prepare("SELECT name FROM vms WHERE operation = ?1 ORDER BY created_at DESC, name")
            .map_err(|e| self.db_error(e))?;
        stmt.query_map([id], |r| r.get(0))
            .and_then(|rows| rows.collect::<rusqlite::Result<_>>())
            .map_err(|e| self.db_error(e))
    }

    /// Appends entries to the audit trail in one transaction.
    pub fn append_audit(&self, entries: &[NewAudit]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut db = self.lock_db();
        let err = |e| self.db_error(e);
        let tx = db.transaction().map_err(err)?;
        insert_audit(&tx, entries).map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Audit entries matching `q`, oldest first.
    pub fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let db = self.lock_db();
        let err = |e| self.db_error(e);
        let mut stmt = db
            .prepare(
                "SELECT id, at, actor, kind, plugin, version, operation, interface, function, args,
                        outcome, detail, count
                 FROM audit
                 WHERE (?1 IS NULL OR operation = ?1) AND (?2 IS NULL OR plugin = ?2)
                   AND (?3 IS NULL OR kind = ?3) AND (?4 IS NULL OR outcome = ?4)
                   AND id > ?5
                 ORDER BY id LIMIT ?6",
            )
            .map_err(err)?;
        let limit = if q.limit == 0 { MAX_AUDIT_PAGE } else { q.limit.min(MAX_AUDIT_PAGE) };
        stmt.query_map(
            params![q.operation, q.plugin, q.kind, q.outcome, q.after.unwrap_or(0), limit],
            |r| {
                Ok(AuditRecord {
                    id: r.get(0)?,
                    at: r.get(1)?,
                    actor: r.get(2)?,
                    kind: r.get(3)?,
                    plugin: r.get(4)?,
                    version: r.get(5)?,
                    operation: r.get(6)?,
                    interface: r.get(7)?,
                    function: r.get(8)?,
                    args: r.get(9)?,
                    outcome: r.get(10)?,
                    detail: r.get(11)?,
                    count: r.get::<_, i64>(12)?.max(0) as u64,
                })
            },
        )
        .and_then(|rows| rows.collect::<rusqlite::Result<_>>())
        .map_err(err)
    }
}
