//! Repack's moves as the store records them: a private partition's new
//! stack is recorded as pending, with the manifest it will have, before the
//! partition is rewritten, and made current after. Until then both stacks
//! keep their shared partitions, so a crash leaves every VM on one complete
//! stack, and the next start settles the move (`pending_restacks`).

use rusqlite::{OptionalExtension, params};

use crate::db::to_i64;
use crate::partitions::{PartitionRecord, StackedLayer, stacked_shared};
use crate::{Store, StoreError};

impl Store {
    /// Records `stack` as the pending new stack of private partition
    /// `private`, and `manifest` as the manifest it will then have: from now
    /// on both its stacks keep their shared partitions, until
    /// [`Store::finish_restack`] or [`Store::abort_restack`].
    pub fn begin_restack(
        &self,
        private: &str,
        stack: &[StackedLayer],
        manifest: &str,
    ) -> Result<(), StoreError> {
        let mut db = self.lock_db();
        (|| {
            let tx = db.transaction()?;
            drop_pending(&tx, private)?;
            tx.execute(
                "INSERT INTO pending_manifests (private, manifest) VALUES (?1, ?2)",
                params![private, manifest],
            )?;
            let mut insert = tx.prepare(
                "INSERT INTO partition_stack (private, pending, position, shared, layer)
                 VALUES (?1, 1, ?2, ?3, ?4)",
            )?;
            for (i, s) in stack.iter().enumerate() {
                insert.execute(params![private, to_i64(i as u64), s.shared, s.layer])?;
            }
            drop(insert);
            tx.commit()
        })()
        .map_err(|e| self.db_error(e))
    }

    /// Makes the pending stack of `private` its stack, with its new
    /// manifest and allocated bytes, and removes the shared partitions no
    /// stack names any more. Returns those.
    pub fn finish_restack(
        &self,
        private: &str,
        manifest: &str,
        bytes: u64,
    ) -> Result<Vec<PartitionRecord>, StoreError> {
        self.free_in(|tx| {
            let old = stacked_shared(tx, private)?;
            tx.execute(
                "DELETE FROM partition_stack WHERE private = ?1 AND pending = 0",
                [private],
            )?;
            tx.execute(
                "UPDATE partition_stack SET pending = 0 WHERE private = ?1 AND pending = 1",
                [private],
            )?;
            tx.execute(
                "UPDATE partitions SET manifest = ?2, bytes = ?3 WHERE id = ?1",
                params![private, manifest, to_i64(bytes)],
            )?;
            tx.execute("DELETE FROM pending_manifests WHERE private = ?1", [private])?;
            Ok(old)
        })
    }

    /// Drops the pending stack of `private` (its partition was not
    /// rewritten). The shared partitions only it named stay until
    /// [`Store::free_unused_shared`]: a repack still moving other VMs onto
    /// them must not lose them to one failed move.
    pub fn abort_restack(&self, private: &str) -> Result<(), StoreError> {
        let mut db = self.lock_db();
        (|| {
            let tx = db.transaction()?;
            drop_pending(&tx, private)?;
            tx.commit()
        })()
        .map_err(|e| self.db_error(e))
    }

    /// The manifest recorded with the pending stack of `private`, if any.
    pub fn pending_manifest(&self, private: &str) -> Result<Option<String>, StoreError> {
        self.lock_db()
            .query_row(
                "SELECT manifest FROM pending_manifests WHERE private = ?1",
                [private],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.db_error(e))
    }

    /// Private partitions with a pending stack (a repack stopped midway),
    /// each with that stack.
    pub fn pending_restacks(&self) -> Result<Vec<(String, Vec<StackedLayer>)>, StoreError> {
        let db = self.lock_db();
        let mut stmt = db
            .prepare(
                "SELECT private, shared, layer FROM partition_stack WHERE pending = 1
                 ORDER BY private, position",
            )
            .map_err(|e| self.db_error(e))?;
        let rows: Vec<(String, String, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.db_error(e))?;
        let mut out: Vec<(String, Vec<StackedLayer>)> = Vec::new();
        for (private, shared, layer) in rows {
            match out.last_mut() {
                Some((p, stack)) if *p == private => stack.push(StackedLayer { shared, layer }),
                _ => out.push((private, vec![StackedLayer { shared, layer }])),
            }
        }
        Ok(out)
    }
}

/// Forgets the pending stack of `private` and the manifest recorded with it.
fn drop_pending(tx: &rusqlite::Transaction<'_>, private: &str) -> rusqlite::Result<()> {
    tx.execute("DELETE FROM partition_stack WHERE private = ?1 AND pending = 1", [private])?;
    tx.execute("DELETE FROM pending_manifests WHERE private = ?1", [private])?;
    Ok(())
}
