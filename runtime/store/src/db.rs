//! The SQLite schema and every statement that touches it.

use std::collections::HashSet;
use std::path::Path;

use provd_domain::image::{Entry, EntryKind, Hash};
use rusqlite::{Connection, OptionalExtension, params};

use crate::{Stats, StoreError};

/// Schema migrations, applied in order; `PRAGMA user_version` records how
/// many have run. Never edit one that has shipped: add another.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE images (
        id            INTEGER PRIMARY KEY,
        reference     TEXT NOT NULL UNIQUE,
        digest        TEXT NOT NULL,
        source        TEXT NOT NULL,
        source_digest TEXT,
        entries       INTEGER NOT NULL,
        files         INTEGER NOT NULL,
        bytes         INTEGER NOT NULL,
        created_at    INTEGER NOT NULL
    );
    CREATE TABLE entries (
        image_id    INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        path        TEXT NOT NULL,
        kind        TEXT NOT NULL,
        mode        INTEGER NOT NULL,
        uid         INTEGER NOT NULL,
        gid         INTEGER NOT NULL,
        mtime       INTEGER NOT NULL,
        size        INTEGER NOT NULL,
        hash        BLOB,
        link_target TEXT,
        dev_major   INTEGER,
        dev_minor   INTEGER,
        PRIMARY KEY (image_id, path)
    ) WITHOUT ROWID;
    CREATE TABLE objects (
        hash BLOB PRIMARY KEY,
        size INTEGER NOT NULL,
        refs INTEGER NOT NULL CHECK (refs >= 0)
    ) WITHOUT ROWID;
"#,
    r#"
    CREATE TABLE partitions (
        id             TEXT PRIMARY KEY,
        role           TEXT NOT NULL CHECK (role IN ('shared', 'private')),
        format         TEXT NOT NULL,
        file           TEXT NOT NULL,
        bytes          INTEGER NOT NULL,
        apparent_bytes INTEGER NOT NULL,
        operation      TEXT,
        manifest       TEXT NOT NULL,
        created_at     INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE partition_vms (
        partition TEXT NOT NULL REFERENCES partitions(id) ON DELETE CASCADE,
        vm        TEXT NOT NULL,
        PRIMARY KEY (partition, vm)
    ) WITHOUT ROWID;
    CREATE INDEX partition_vms_by_vm ON partition_vms (vm);
"#,
    r#"
    CREATE TABLE vms (
        name       TEXT PRIMARY KEY,
        spec       TEXT NOT NULL,
        operation  TEXT,
        created_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE reservations (
        vm       TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
        resource TEXT NOT NULL CHECK (resource IN ('vcpus', 'memory-mib', 'disk-bytes')),
        amount   INTEGER NOT NULL CHECK (amount >= 0),
        PRIMARY KEY (vm, resource)
    ) WITHOUT ROWID;
    CREATE TABLE vm_macs (
        mac TEXT PRIMARY KEY,
        vm  TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE
    ) WITHOUT ROWID;
"#,
    r#"
    CREATE TABLE bundles (
        name        TEXT NOT NULL,
        version     TEXT NOT NULL,
        digest      TEXT NOT NULL,
        signer      TEXT NOT NULL,
        manifest    TEXT NOT NULL,
        grant_json  TEXT NOT NULL,
        component   BLOB NOT NULL,
        created     INTEGER NOT NULL,
        expires     INTEGER NOT NULL,
        accepted_at INTEGER NOT NULL,
        PRIMARY KEY (name, version)
    ) WITHOUT ROWID;
    CREATE TABLE plugin_heads (
        name    TEXT PRIMARY KEY,
        highest TEXT NOT NULL,
        digest  TEXT NOT NULL,
        active  TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE clock (
        id        INTEGER PRIMARY KEY CHECK (id = 1),
        last_seen INTEGER NOT NULL
    );
"#,
    r#"
    CREATE TABLE operations (
        id              TEXT PRIMARY KEY,
        idempotency_key TEXT UNIQUE,
        request_digest  TEXT NOT NULL,
        plugin          TEXT NOT NULL,
        version         TEXT NOT NULL,
        input           TEXT NOT NULL,
        actor           TEXT NOT NULL,
        state           TEXT NOT NULL
                        CHECK (state IN ('running', 'succeeded', 'failed', 'cancelled')),
        phase           TEXT,
        done            INTEGER,
        total           INTEGER,
        report          TEXT,
        error_code      TEXT,
        error           TEXT,
        created_at      INTEGER NOT NULL,
        finished_at     INTEGER
    ) WITHOUT ROWID;
    CREATE INDEX operations_by_state ON operations (state);
    CREATE TABLE operation_vms (
        operation TEXT NOT NULL REFERENCES operations(id) ON DELETE CASCADE,
        vm        TEXT NOT NULL,
        active    INTEGER NOT NULL CHECK (active IN (0, 1)),
        PRIMARY KEY (operation, vm)
    ) WITHOUT ROWID;
    -- Two operations for one VM name never run at once: the database
    -- refuses the second while the first holds the name.
    CREATE UNIQUE INDEX one_running_operation_per_vm ON operation_vms (vm) WHERE active = 1;
    CREATE TABLE audit (
        id        INTEGER PRIMARY KEY,
        at        INTEGER NOT NULL,
        actor     TEXT NOT NULL,
        kind      TEXT NOT NULL,
        plugin    TEXT,
        version   TEXT,
        operation TEXT,
        interface TEXT,
        function  TEXT,
        args      TEXT,
        outcome   TEXT NOT NULL,
        detail    TEXT,
        count     INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX audit_by_operation ON audit (operation);
"#,
    // Layers become node-wide: each shared partition's layers are recorded
    // with their entries, and each private partition's stack names the
    // layers it stacks, so that a shared partition is kept while any stack
    // names one of its layers and new VMs can be planned against them.
    // Partitions built before keep working; their layers' entries were
    // never recorded, so they are not offered to new VMs.
    r#"
    CREATE TABLE layers (
        partition TEXT NOT NULL REFERENCES partitions(id) ON DELETE CASCADE,
        name      TEXT NOT NULL,
        digest    TEXT NOT NULL,
        files     INTEGER NOT NULL,
        bytes     INTEGER NOT NULL,
        recorded  INTEGER NOT NULL DEFAULT 0 CHECK (recorded IN (0, 1)),
        PRIMARY KEY (partition, name)
    ) WITHOUT ROWID;
    CREATE INDEX layers_by_digest ON layers (digest);
    CREATE TABLE layer_entries (
        partition   TEXT NOT NULL,
        layer       TEXT NOT NULL,
        path        TEXT NOT NULL,
        kind        TEXT NOT NULL,
        mode        INTEGER NOT NULL,
        uid         INTEGER NOT NULL,
        gid         INTEGER NOT NULL,
        mtime       INTEGER NOT NULL,
        size        INTEGER NOT NULL,
        hash        BLOB,
        link_target TEXT,
        dev_major   INTEGER,
        dev_minor   INTEGER,
        PRIMARY KEY (partition, layer, path),
        FOREIGN KEY (partition, layer) REFERENCES layers (partition, name) ON DELETE CASCADE
    ) WITHOUT ROWID;
    -- No cascade towards the layer: a shared partition some stack still
    -- names cannot be deleted.
    -- A repack writes a private partition's new stack as pending rows
    -- before it rewrites the partition, and drops the old rows after: both
    -- stacks keep their partitions while the move is under way.
    CREATE TABLE partition_stack (
        private  TEXT NOT NULL REFERENCES partitions(id) ON DELETE CASCADE,
        pending  INTEGER NOT NULL DEFAULT 0 CHECK (pending IN (0, 1)),
        position INTEGER NOT NULL,
        shared   TEXT NOT NULL,
        layer    TEXT NOT NULL,
        PRIMARY KEY (private, pending, position),
        FOREIGN KEY (shared, layer) REFERENCES layers (partition, name)
    ) WITHOUT ROWID;
    CREATE INDEX partition_stack_by_shared ON partition_stack (shared, layer);
    INSERT INTO layers (partition, name, digest, files, bytes)
        SELECT p.id, json_extract(l.value, '$.id'), coalesce(json_extract(l.value, '$.digest'), ''),
               coalesce(json_extract(l.value, '$.files'), 0), coalesce(json_extract(l.value, '$.bytes'), 0)
        FROM partitions p, json_each(p.manifest, '$.layers') l
        WHERE p.role = 'shared';
    INSERT INTO partition_stack (private, position, shared, layer)
        SELECT p.id, s.key, json_extract(p.manifest, '$.shared.partition'), s.value
        FROM partitions p, json_each(p.manifest, '$.stack') s
        WHERE p.role = 'private'
          AND EXISTS (SELECT 1 FROM layers
                      WHERE partition = json_extract(p.manifest, '$.shared.partition')
                        AND name = s.value);
    DELETE FROM partition_vms WHERE partition IN (SELECT id FROM partitions WHERE role = 'shared');
"#,
    // The manifest a repack move computed, kept beside its pending stack:
    // recovery stores the node's own text, never what it reads back from
    // the guest-writable partition.
    r#"
    CREATE TABLE pending_manifests (
        private  TEXT PRIMARY KEY REFERENCES partitions (id) ON DELETE CASCADE,
        manifest TEXT NOT NULL
    ) WITHOUT ROWID;
"#,
    // Every partition has a trust domain: a shared partition holds layers of
    // one domain only, and a VM of tenant T stacks only `public` and
    // `tenant:T`. Partitions built before belong to the default tenant.
    r#"
    ALTER TABLE partitions ADD COLUMN domain TEXT NOT NULL DEFAULT 'tenant:default'
        CHECK (domain = 'public' OR domain GLOB 'tenant:?*');
"#,
    // When an operation last fetched an image: image collection by age
    // counts from its last use, not from its import.
    r#"
    ALTER TABLE images ADD COLUMN used_at INTEGER;
"#,
    // A layer's files are kept while the layer is: a repack rebuilds
    // layers from their objects after the images they came from are gone.
    r#"
    CREATE INDEX layer_entries_by_hash ON layer_entries (hash) WHERE hash IS NOT NULL;
"#,
];

/// An image as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub id: i64,
    /// The reference it was imported under, canonical form.
    pub reference: String,
    /// BLAKE3 over the canonical listing of its entries: equal images have
    /// equal digests whatever their source.
    pub digest: String,
    /// `dir`, `tar`, `http`, `oci`.
    pub source: String,
    /// Verified digest of what was downloaded, when something was.
    pub source_digest: Option<String>,
    pub entries: u64,
    /// Regular files (hard links not counted).
    pub files: u64,
    /// Bytes of regular-file content.
    pub bytes: u64,
    /// Seconds since the epoch.
    pub created_at: i64,
    /// When an operation last fetched it, in seconds since the epoch.
    pub used_at: Option<i64>,
}

/// What an import hands to [`crate::Store::commit_image`].
#[derive(Debug, Clone)]
pub struct NewImage {
    pub reference: String,
    pub source: String,
    pub source_digest: Option<String>,
}

/// A read-only connection to the database [`open`] prepared. Reads that
/// scan whole tables for monitoring go through it: in WAL mode it sees the
/// last commit while a write goes on, so a scrape never holds the writer's
/// connection (a count over a million objects takes about 0.1 s).
pub(crate) fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let err = |source| StoreError::Db { path: path.display().to_string(), source };
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(err)?;
    Ok(conn)
}

pub(crate) fn open(path: &Path) -> Result<Connection, StoreError> {
    let err = |source| StoreError::Db { path: path.display().to_string(), source };
    let conn = Connection::open(path).map_err(err)?;
    // WAL keeps readers off the writer's back; FULL makes a commit durable
    // before it returns, which acceptance and provisioning state need.
    conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(err)?;
    conn.pragma_update(None, "foreign_keys", true).map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(err)?;
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).map_err(err)?;
    if check != "ok" {
        return Err(StoreError::Corrupt { path: path.display().to_string(), detail: check });
    }
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(err)?;
    let done = usize::try_from(version).unwrap_or(0);
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(done) {
        let tx = conn.unchecked_transaction().map_err(err)?;
        tx.execute_batch(migration).map_err(err)?;
        tx.pragma_update(None, "user_version", i64::try_from(i + 1).unwrap_or(i64::MAX))
            .map_err(err)?;
        tx.commit().map_err(err)?;
    }
    Ok(conn)
}

pub(crate) enum InsertError {
    Exists,
    Db(rusqlite::Error),
}

impl From<rusqlite::Error> for InsertError {
    fn from(e: rusqlite::Error) -> Self {
        InsertError::Db(e)
    }
}

/// BLAKE3 over a canonical listing of the entries, sorted by path.
pub(crate) fn image_digest(entries: &[Entry]) -> String {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut h = blake3::Hasher::new();
    for e in sorted {
        let hash = e.hash.map(|h| h.to_hex()).unwrap_or_default();
        let dev = e.device.map(|(a, b)| format!("{a},{b}")).unwrap_or_default();
        let line = format!(
            "{}\0{}\0{:o}\0{}\0{}\0{}\0{}\0{}\0{}\0{}\n",
            e.path,
            e.kind.as_str(),
            e.mode,
            e.uid,
            e.gid,
            e.mtime,
            e.size,
            hash,
            e.link_target.as_deref().unwrap_or(""),
            dev
        );
        h.update(line.as_bytes());
    }
    format!("blake3:{}", h.finalize().to_hex())
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn insert_image(
    conn: &mut Connection,
    image: &NewImage,
    entries: &[Entry],
) -> Result<ImageRecord, InsertError> {
    let tx = conn.transaction()?;
    let exists: Option<i64> = tx
        .query_row("SELECT id FROM images WHERE reference = ?1", [&image.reference], |r| r.get(0))
        .optional()?;
    if exists.is_some() {
        return Err(InsertError::Exists);
    }
    let files = entries.iter().filter(|e| e.kind == EntryKind::File).count() as u64;
    let bytes: u64 = entries.iter().filter(|e| e.kind == EntryKind::File).map(|e| e.size).sum();
    let digest = image_digest(entries);
    let created_at = now();
    tx.execute(
        "INSERT INTO images (reference, digest, source, source_digest, entries, files, bytes, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            image.reference,
            digest,
            image.source,
            image.source_digest,
            to_i64(entries.len() as u64),
            to_i64(files),
            to_i64(bytes),
            created_at
        ],
    )?;
    let id = tx.last_insert_rowid();
    {
        let mut insert = tx.prepare(
            "INSERT INTO entries (image_id, path, kind, mode, uid, gid, mtime, size, hash, link_target, dev_major, dev_minor)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )?;
        for e in entries {
            insert_entry(&mut insert, &[&id], e)?;
        }
        // Each image counts once per object it uses, however many paths
        // share that content.
        let mut distinct: Vec<(Hash, u64)> = entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .filter_map(|e| e.hash.map(|h| (h, e.size)))
            .collect();
        distinct.sort();
        distinct.dedup_by_key(|(h, _)| *h);
        let mut upsert = tx.prepare(
            "INSERT INTO objects (hash, size, refs) VALUES (?1, ?2, 1)
             ON CONFLICT(hash) DO UPDATE SET refs = refs + 1",
        )?;
        for (hash, size) in distinct {
            upsert.execute(params![hash.0.to_vec(), to_i64(size)])?;
        }
    }
    tx.commit()?;
    Ok(ImageRecord {
        id,
        reference: image.reference.clone(),
        digest,
        source: image.source.clone(),
        source_digest: image.source_digest.clone(),
        entries: entries.len() as u64,
        files,
        bytes,
        created_at,
        used_at: None,
    })
}

fn image_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageRecord> {
    Ok(ImageRecord {
        id: r.get(0)?,
        reference: r.get(1)?,
        digest: r.get(2)?,
        source: r.get(3)?,
        source_digest: r.get(4)?,
        entries: r.get::<_, i64>(5)?.max(0) as u64,
        files: r.get::<_, i64>(6)?.max(0) as u64,
        bytes: r.get::<_, i64>(7)?.max(0) as u64,
        created_at: r.get(8)?,
        used_at: r.get(9)?,
    })
}

const IMAGE_COLUMNS: &str =
    "id, reference, digest, source, source_digest, entries, files, bytes, created_at, used_at";

pub(crate) fn image(conn: &Connection, reference: &str) -> rusqlite::Result<Option<ImageRecord>> {
    conn.query_row(
        &format!("SELECT {IMAGE_COLUMNS} FROM images WHERE reference = ?1"),
        [reference],
        image_row,
    )
    .optional()
}

pub(crate) fn images(conn: &Connection) -> rusqlite::Result<Vec<ImageRecord>> {
    let mut stmt = conn.prepare(&format!("SELECT {IMAGE_COLUMNS} FROM images ORDER BY id"))?;
    let rows = stmt.query_map([], image_row)?;
    rows.collect()
}

pub(crate) fn entry_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    let kind: String = r.get(1)?;
    let hash: Option<Vec<u8>> = r.get(7)?;
    let major: Option<u32> = r.get(9)?;
    let minor: Option<u32> = r.get(10)?;
    Ok(Entry {
        path: r.get(0)?,
        kind: EntryKind::parse(&kind).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                1,
                rusqlite::types::Type::Text,
                format!("unknown entry kind {kind:?}").into(),
            )
        })?,
        mode: r.get(2)?,
        uid: r.get::<_, i64>(3)?.max(0) as u64,
        gid: r.get::<_, i64>(4)?.max(0) as u64,
        mtime: r.get(5)?,
        size: r.get::<_, i64>(6)?.max(0) as u64,
        hash: hash.and_then(|h| <[u8; 32]>::try_from(h.as_slice()).ok()).map(Hash),
        link_target: r.get(8)?,
        device: major.zip(minor),
    })
}

/// Inserts `e` with `insert`, a statement whose parameters are `key`
/// followed by the columns of [`ENTRY_COLUMNS`] (image entries and layer
/// entries are stored alike).
pub(crate) fn insert_entry(
    insert: &mut rusqlite::Statement<'_>,
    key: &[&dyn rusqlite::ToSql],
    e: &Entry,
) -> rusqlite::Result<usize> {
    let (kind, uid, gid, size) = (e.kind.as_str(), to_i64(e.uid), to_i64(e.gid), to_i64(e.size));
    let hash = e.hash.map(|h| h.0.to_vec());
    let (major, minor) = (e.device.map(|d| d.0), e.device.map(|d| d.1));
    let columns: [&dyn rusqlite::ToSql; 11] = [
        &e.path,
        &kind,
        &e.mode,
        &uid,
        &gid,
        &e.mtime,
        &size,
        &hash,
        &e.link_target,
        &major,
        &minor,
    ];
    insert.execute(rusqlite::params_from_iter(key.iter().chain(columns.iter())))
}

pub(crate) const ENTRY_COLUMNS: &str =
    "path, kind, mode, uid, gid, mtime, size, hash, link_target, dev_major, dev_minor";

pub(crate) fn entries(
    conn: &Connection,
    image_id: i64,
    offset: u64,
    limit: u64,
) -> rusqlite::Result<Vec<Entry>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {ENTRY_COLUMNS} FROM entries WHERE image_id = ?1 ORDER BY path LIMIT ?2 OFFSET ?3"
    ))?;
    let rows = stmt.query_map(params![image_id, to_i64(limit), to_i64(offset)], entry_row)?;
    rows.collect()
}

pub(crate) fn entry(
    conn: &Connection,
    image_id: i64,
    path: &str,
) -> rusqlite::Result<Option<Entry>> {
    conn.query_row(
        &format!("SELECT {ENTRY_COLUMNS} FROM entries WHERE image_id = ?1 AND path = ?2"),
        params![image_id, path],
        entry_row,
    )
    .optional()
}

/// Removes an image; returns the objects it leaves unused (hash, size), or
/// `None` when there is no such image.
pub(crate) fn remove_image(
    conn: &mut Connection,
    reference: &str,
) -> rusqlite::Result<Option<Vec<(Hash, u64)>>> {
    let tx = conn.transaction()?;
    let Some(id) = tx
        .query_row("SELECT id FROM images WHERE reference = ?1", [reference], |r| {
            r.get::<_, i64>(0)
        })
        .optional()?
    else {
        return Ok(None);
    };
    tx.execute(
        "UPDATE objects SET refs = refs - 1 WHERE hash IN
            (SELECT DISTINCT hash FROM entries WHERE image_id = ?1 AND kind = 'file' AND hash IS NOT NULL)",
        [id],
    )?;
    tx.execute("DELETE FROM images WHERE id = ?1", [id])?;
    let unused = {
        // An object a layer's entry names stays on disk (`kept`), and so
        // does its row (at no references), so the store's sizes and a
        // collection's byte budget count its file; the row goes with the
        // last layer that names it (`drop_unreferenced`).
        let mut stmt =
            tx.prepare(&format!("SELECT hash, size FROM objects WHERE {UNREFERENCED}"))?;
        let rows = stmt.query_map([], |r| {
            let h: Vec<u8> = r.get(0)?;
            Ok((h, r.get::<_, i64>(1)?.max(0) as u64))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (h, size) = row?;
            if let Ok(h) = <[u8; 32]>::try_from(h.as_slice()) {
                out.push((Hash(h), size));
            }
        }
        out
    };
    tx.execute(&format!("DELETE FROM objects WHERE {UNREFERENCED}"), [])?;
    tx.commit()?;
    Ok(Some(unused))
}

/// Rows of objects no image references and no layer's entry names.
const UNREFERENCED: &str = "refs = 0
    AND NOT EXISTS (SELECT 1 FROM layer_entries l WHERE l.hash = objects.hash)";

pub(crate) fn drop_unreferenced(conn: &mut Connection) -> rusqlite::Result<()> {
    conn.execute(&format!("DELETE FROM objects WHERE {UNREFERENCED}"), [])?;
    Ok(())
}

pub(crate) fn referenced(conn: &Connection) -> rusqlite::Result<HashSet<Hash>> {
    let mut out = HashSet::new();
    add_hashes(conn, "SELECT hash FROM objects WHERE refs > 0", &mut out)?;
    Ok(out)
}

/// The objects a collection keeps: those an image references and those a
/// layer's entry names.
pub(crate) fn kept(conn: &Connection) -> rusqlite::Result<HashSet<Hash>> {
    let mut out = referenced(conn)?;
    add_hashes(conn, "SELECT DISTINCT hash FROM layer_entries WHERE hash IS NOT NULL", &mut out)?;
    Ok(out)
}

/// Adds the hashes `sql` selects to `out`.
fn add_hashes(conn: &Connection, sql: &str, out: &mut HashSet<Hash>) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
    for row in rows {
        if let Ok(h) = <[u8; 32]>::try_from(row?.as_slice()) {
            out.insert(Hash(h));
        }
    }
    Ok(())
}

/// Whether a collection keeps object `hash` ([`kept`]).
pub(crate) fn is_kept(conn: &Connection, hash: &Hash) -> rusqlite::Result<bool> {
    if is_referenced(conn, hash)? {
        return Ok(true);
    }
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM layer_entries WHERE hash = ?1)",
        [hash.0.to_vec()],
        |r| r.get(0),
    )
}

pub(crate) fn is_referenced(conn: &Connection, hash: &Hash) -> rusqlite::Result<bool> {
    let refs: Option<i64> = conn
        .query_row("SELECT refs FROM objects WHERE hash = ?1", [hash.0.to_vec()], |r| r.get(0))
        .optional()?;
    Ok(refs.is_some_and(|r| r > 0))
}

pub(crate) fn touch_image(conn: &Connection, reference: &str) -> rusqlite::Result<()> {
    conn.execute("UPDATE images SET used_at = ?2 WHERE reference = ?1", params![reference, now()])?;
    Ok(())
}

pub(crate) fn sizes(conn: &Connection) -> rusqlite::Result<crate::Sizes> {
    let pair = |sql: &str| -> rusqlite::Result<(u64, u64)> {
        conn.query_row(sql, [], |r| {
            Ok((r.get::<_, i64>(0)?.max(0) as u64, r.get::<_, i64>(1)?.max(0) as u64))
        })
    };
    Ok(crate::Sizes {
        objects: pair("SELECT count(*), coalesce(sum(size), 0) FROM objects")?,
        images: pair("SELECT count(*), coalesce(sum(bytes), 0) FROM images")?,
        layers: pair("SELECT count(*), coalesce(sum(bytes), 0) FROM layers")?,
        partitions: pair("SELECT count(*), coalesce(sum(bytes), 0) FROM partitions")?,
        vms: pair(
            "SELECT (SELECT count(*) FROM vms),
                    (SELECT coalesce(sum(bytes), 0) FROM partitions WHERE role = 'private')",
        )?,
    })
}

pub(crate) fn stats(conn: &Connection) -> rusqlite::Result<Stats> {
    let images: i64 = conn.query_row("SELECT count(*) FROM images", [], |r| r.get(0))?;
    let (objects, bytes): (i64, i64) = conn.query_row(
        "SELECT count(*), coalesce(sum(size), 0) FROM objects WHERE refs > 0",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(Stats {
        images: images.max(0) as u64,
        objects: objects.max(0) as u64,
        object_bytes: bytes.max(0) as u64,
    })
}

#[cfg(test)]
mod tests {
    // Tests: a failed unwrap is a failed test.
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    /// A node built before layers were node-wide keeps its partitions: the
    /// migration records each shared partition's layers (entries unknown)
    /// and each private partition's stack from their manifests, and a
    /// shared partition's users become the stacks naming its layers.
    #[test]
    fn partitions_of_an_earlier_version_get_their_layers_and_stacks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("provd.db");
        let conn = Connection::open(&path).unwrap();
        for m in MIGRATIONS.iter().take(5) {
            conn.execute_batch(m).unwrap();
        }
        conn.pragma_update(None, "user_version", 5).unwrap();
        let shared = r#"{"partition":"p-0000000000000001","format":"erofs","uuid":"u",
            "layers":[{"id":"layer-0","vms":["web","db"],"files":3,"bytes":300,"digest":"d0"},
                      {"id":"layer-1","vms":["web"],"files":1,"bytes":10,"digest":"d1"}]}"#;
        let web = r#"{"partition":"p-0000000000000002","vm":"web","format":"ext4","uuid":"u2",
            "image":"dir:/a","image_digest":"x",
            "shared":{"partition":"p-0000000000000001","format":"erofs","uuid":"u"},
            "stack":["layer-0","layer-1"]}"#;
        let db = r#"{"partition":"p-0000000000000003","vm":"db","format":"ext4","uuid":"u3",
            "image":"dir:/b","image_digest":"y",
            "shared":{"partition":"p-0000000000000001","format":"erofs","uuid":"u"},
            "stack":["layer-0"]}"#;
        let lone = r#"{"partition":"p-0000000000000004","vm":"lone","format":"ext4","uuid":"u4",
            "image":"dir:/c","image_digest":"z","shared":null,"stack":[]}"#;
        for (id, role, manifest, vms) in [
            ("p-0000000000000001", "shared", shared, vec!["web", "db"]),
            ("p-0000000000000002", "private", web, vec!["web"]),
            ("p-0000000000000003", "private", db, vec!["db"]),
            ("p-0000000000000004", "private", lone, vec!["lone"]),
        ] {
            conn.execute(
                "INSERT INTO partitions (id, role, format, file, bytes, apparent_bytes, operation, manifest, created_at)
                 VALUES (?1, ?2, 'erofs', 'f', 1, 1, NULL, ?3, 0)",
                params![id, role, manifest],
            )
            .unwrap();
            for vm in vms {
                conn.execute(
                    "INSERT INTO partition_vms (partition, vm) VALUES (?1, ?2)",
                    params![id, vm],
                )
                .unwrap();
            }
        }
        drop(conn);

        let conn = open(&path).unwrap();
        let layers: Vec<(String, String, i64, i64)> = conn
            .prepare("SELECT name, digest, bytes, recorded FROM layers ORDER BY name")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            layers,
            [("layer-0".into(), "d0".into(), 300, 0), ("layer-1".into(), "d1".into(), 10, 0)]
        );
        let stacks: Vec<(String, i64, String, String)> = conn
            .prepare("SELECT private, position, shared, layer FROM partition_stack ORDER BY private, position")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let row = |p: &str, i: i64, l: &str| {
            (p.to_string(), i, "p-0000000000000001".to_string(), l.to_string())
        };
        assert_eq!(
            stacks,
            [
                row("p-0000000000000002", 0, "layer-0"),
                row("p-0000000000000002", 1, "layer-1"),
                row("p-0000000000000003", 0, "layer-0"),
            ]
        );
        let shared_users: i64 = conn
            .query_row(
                "SELECT count(*) FROM partition_vms WHERE partition = 'p-0000000000000001'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(shared_users, 0, "a shared partition's users are now its stacks");
        // The stacks keep it: the database refuses to delete it.
        assert!(
            conn.execute("DELETE FROM partitions WHERE id = 'p-0000000000000001'", []).is_err()
        );
    }
}
