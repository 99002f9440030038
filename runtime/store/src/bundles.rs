//! Accepted plugin bundles, and the rules that keep a node from going
//! back: per plugin the highest version accepted is kept in the same
//! transaction that accepts a bundle, and only a higher version, or the same
//! one with the identical digest (an idempotent re-upload), is accepted.
//! The node's clock as it has seen it is kept too and never runs backwards,
//! so a bundle's expiry cannot be dodged by setting the clock back.

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use crate::db::to_i64;
use crate::{Store, StoreError};

/// A verified bundle to record.
#[derive(Debug, Clone)]
pub struct NewBundle {
    pub name: String,
    pub version: String,
    /// `blake3:<hex>` of the component.
    pub digest: String,
    /// Key id of the signer whose signature was trusted.
    pub signer: String,
    pub manifest: String,
    /// What the node granted (capabilities with parameters, limits), as
    /// readable text, for the audit trail.
    pub grant: String,
    pub component: Vec<u8>,
    pub created: u64,
    pub expires: u64,
}

/// An accepted bundle.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BundleRecord {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub signer: String,
    pub manifest: String,
    pub grant: String,
    pub created: u64,
    pub expires: u64,
    pub accepted_at: i64,
    /// Whether new operations get this version.
    pub active: bool,
}

/// What accepting did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acceptance {
    /// Recorded; it is now the active version.
    Accepted,
    /// The same bundle was accepted before; nothing changed.
    AlreadyAccepted,
}

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// an older version than one already accepted (a replay or downgrade)
    #[error("{name} {offered} is older than {highest}, the highest version this node has accepted")]
    Downgrade { name: String, offered: String, highest: String },
    /// the same version with other content
    #[error("{name} {version} was accepted with digest {accepted}; this bundle has {offered}")]
    Conflict { name: String, version: String, accepted: String, offered: String },
    /// past its expiry by the node's clock
    #[error("the bundle expired at {expires} (unix seconds); the node's clock reads {now}")]
    Expired { expires: u64, now: u64 },
    /// a version that is not semver
    #[error("version {0:?} is not a semantic version")]
    BadVersion(String),
    /// the store failed
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn parse(version: &str) -> Result<semver::Version, AcceptError> {
    semver::Version::parse(version).map_err(|_| AcceptError::BadVersion(version.to_string()))
}

impl Store {
    /// The later of `now` and the latest time the store has recorded,
    /// without recording anything: what a check at every run reads (a
    /// write there would cost every operation one more durable commit).
    pub fn clock_at_least(&self, now: u64) -> Result<u64, StoreError> {
        self.clock_in(&self.lock_db(), now)
    }

    fn clock_in(&self, db: &rusqlite::Connection, now: u64) -> Result<u64, StoreError> {
        let seen: Option<i64> = db
            .query_row("SELECT last_seen FROM clock WHERE id = 1", [], |r| r.get(0))
            .optional()
            .map_err(|e| self.db_error(e))?;
        Ok(seen.map(|s| s.max(0) as u64).unwrap_or(0).max(now))
    }

    /// Advances the node's clock as the store has seen it to `now` and
    /// returns the later of the two: the clock never runs backwards.
    pub fn observe_clock(&self, now: u64) -> Result<u64, StoreError> {
        // Read and written under one lock, so two observers cannot move it
        // back.
        let db = self.lock_db();
        let later = self.clock_in(&db, now)?;
        db.execute(
            "INSERT INTO clock (id, last_seen) VALUES (1, ?1)
             ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen",
            [to_i64(later)],
        )
        .map_err(|e| self.db_error(e))?;
        Ok(later)
    }

    /// Records `bundle` if it is newer than every version of its plugin
    /// accepted so far (or identical to the highest), all in one
    /// transaction with the version check.
    pub fn accept_bundle(&self, bundle: &NewBundle, now: u64) -> Result<Acceptance, AcceptError> {
        let offered = parse(&bundle.version)?;
        let mut db = self.lock_db();
        let err = |e| AcceptError::Store(self.db_error(e));
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let seen: Option<i64> = tx
            .query_row("SELECT last_seen FROM clock WHERE id = 1", [], |r| r.get(0))
            .optional()
            .map_err(err)?;
        let now = now.max(seen.map(|s| s.max(0) as u64).unwrap_or(0));
        if bundle.expires <= now {
            return Err(AcceptError::Expired { expires: bundle.expires, now });
        }
        tx.execute(
            "INSERT INTO clock (id, last_seen) VALUES (1, ?1)
             ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen",
            [to_i64(now)],
        )
        .map_err(err)?;
        let head: Option<(String, String)> = tx
            .query_row(
                "SELECT highest, digest FROM plugin_heads WHERE name = ?1",
                [&bundle.name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(err)?;
        if let Some((highest, digest)) = head {
            let highest_v = parse(&highest)?;
            if offered < highest_v {
                return Err(AcceptError::Downgrade {
                    name: bundle.name.clone(),
                    offered: bundle.version.clone(),
                    highest,
                });
            }
            if offered == highest_v {
                if digest == bundle.digest {
                    return Ok(Acceptance::AlreadyAccepted);
                }
                return Err(AcceptError::Conflict {
                    name: bundle.name.clone(),
                    version: bundle.version.clone(),
                    accepted: digest,
                    offered: bundle.digest.clone(),
                });
            }
        }
        tx.execute(
            "INSERT INTO bundles (name, version, digest, signer, manifest, grant_json, component, created, expires, accepted_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                bundle.name,
                bundle.version,
                bundle.digest,
                bundle.signer,
                bundle.manifest,
                bundle.grant,
                bundle.component,
                to_i64(bundle.created),
                to_i64(bundle.expires),
                to_i64(now)
            ],
        )
        .map_err(err)?;
        tx.execute(
            "INSERT INTO plugin_heads (name, highest, digest, active) VALUES (?1, ?2, ?3, ?2)
             ON CONFLICT (name) DO UPDATE SET highest = excluded.highest, digest = excluded.digest,
                                              active = excluded.active",
            params![bundle.name, bundle.version, bundle.digest],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(Acceptance::Accepted)
    }

    /// Every accepted bundle, by name then acceptance.
    pub fn bundles(&self) -> Result<Vec<BundleRecord>, StoreError> {
        let db = self.lock_db();
        let mut stmt = db
            .prepare(
                "SELECT b.name, b.version, b.digest, b.signer, b.manifest, b.grant_json, b.created,
                        b.expires, b.accepted_at, coalesce(h.active = b.version, 0)
                 FROM bundles b LEFT JOIN plugin_heads h ON h.name = b.name
                 ORDER BY b.name, b.accepted_at, b.version",
            )
            .map_err(|e| self.db_error(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(BundleRecord {
                    name: r.get(0)?,
                    version: r.get(1)?,
                    digest: r.get(2)?,
                    signer: r.get(3)?,
                    manifest: r.get(4)?,
                    grant: r.get(5)?,
                    created: r.get::<_, i64>(6)?.max(0) as u64,
                    expires: r.get::<_, i64>(7)?.max(0) as u64,
                    accepted_at: r.get(8)?,
                    active: r.get::<_, i64>(9)? != 0,
                })
            })
            .map_err(|e| self.db_error(e))?;
        rows.collect::<rusqlite::Result<_>>().map_err(|e| self.db_error(e))
    }

    /// The component of an accepted bundle.
    pub fn bundle_component(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.lock_db()
            .query_row(
                "SELECT component FROM bundles WHERE name = ?1 AND version = ?2",
                [name, version],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.db_error(e))
    }
}

impl Store {
    /// Makes `version` of plugin `name` the one new operations get: an
    /// operator's rollback (or roll-forward) to a version this node has
    /// accepted. The highest accepted version is unchanged, so a bundle
    /// can still never bring an older one back. Returns the version that
    /// was active before.
    pub fn activate_plugin(&self, name: &str, version: &str) -> Result<String, AcceptError> {
        let mut db = self.lock_db();
        let err = |e| AcceptError::Store(self.db_error(e));
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let active: Option<String> = tx
            .query_row("SELECT active FROM plugin_heads WHERE name = ?1", [name], |r| r.get(0))
            .optional()
            .map_err(err)?;
        let Some(active) = active else {
            return Err(AcceptError::Store(StoreError::NotFound(format!("plugin {name}"))));
        };
        let known: Option<String> = tx
            .query_row(
                "SELECT version FROM bundles WHERE name = ?1 AND version = ?2",
                [name, version],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        if known.is_none() {
            return Err(AcceptError::Store(StoreError::NotFound(format!(
                "plugin {name} version {version}"
            ))));
        }
        tx.execute("UPDATE plugin_heads SET active = ?2 WHERE name = ?1", [name, version])
            .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(active)
    }

    /// The newest accepted version of `name` older than its active one:
    /// what a rollback returns to.
    pub fn previous_version(&self, name: &str) -> Result<Option<String>, AcceptError> {
        let bundles = self.bundles()?;
        let Some(active) = bundles.iter().find(|b| b.name == name && b.active) else {
            return Ok(None);
        };
        let active = parse(&active.version)?;
        let mut best: Option<semver::Version> = None;
        for b in bundles.iter().filter(|b| b.name == name) {
            let v = parse(&b.version)?;
            if v < active && best.as_ref().is_none_or(|best| v > *best) {
                best = Some(v);
            }
        }
        Ok(best.map(|v| v.to_string()))
    }
}
