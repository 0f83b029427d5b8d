//! The coordinator's durable state: builds, jobs and events in SQLite, so a
//! restart loses nothing.

use std::path::Path;
use std::sync::Mutex;

use prost::Message as _;
use rusqlite::{Connection, OptionalExtension, params};

use braid_shared::proto;

use crate::auth::TokenRecord;
use crate::error::{CoordinatorError, Result};
use crate::farm::BuildRecord;

pub struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS builds (
    id       TEXT PRIMARY KEY,
    created  INTEGER NOT NULL,
    spec     BLOB NOT NULL,
    record   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    build_id TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    body     BLOB NOT NULL,
    PRIMARY KEY (build_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tokens (
    id          TEXT PRIMARY KEY,
    hash        TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL,
    created     INTEGER NOT NULL,
    expires     INTEGER,
    single_use  INTEGER NOT NULL,
    used        INTEGER NOT NULL DEFAULT 0,
    revoked     INTEGER NOT NULL DEFAULT 0,
    description TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS contexts (
    digest    TEXT PRIMARY KEY,
    size      INTEGER NOT NULL,
    stored    INTEGER NOT NULL,
    last_used INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS cordons (
    agent TEXT PRIMARY KEY
);
";

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store { conn: Mutex::new(conn) })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        // A poisoned lock means a panic mid-statement; SQLite's own
        // transaction kept the file consistent, so carry on with it.
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&mut conn)?)
    }

    pub fn insert_build(&self, record: &BuildRecord, spec: &proto::BuildSpec) -> Result<()> {
        let json = serde_json::to_string(record).map_err(|e| CoordinatorError::Internal(e.to_string()))?;
        self.with(|c| {
            c.execute(
                "INSERT INTO builds (id, created, spec, record) VALUES (?1, ?2, ?3, ?4)",
                params![record.id, record.created_ms, spec.encode_to_vec(), json],
            )
            .map(drop)
        })
    }

    pub fn save_build(&self, record: &BuildRecord) -> Result<()> {
        let json = serde_json::to_string(record).map_err(|e| CoordinatorError::Internal(e.to_string()))?;
        self.with(|c| c.execute("UPDATE builds SET record = ?2 WHERE id = ?1", params![record.id, json]).map(drop))
    }

    /// Every build with its spec, oldest first. A build an older version
    /// stored that no longer parses (a platform now refused, say) is left
    /// out with a warning rather than keeping the coordinator from starting.
    pub fn load_builds(&self) -> Result<Vec<(BuildRecord, proto::BuildSpec)>> {
        let rows: Vec<(String, String, Vec<u8>)> = self.with(|c| {
            let mut stmt = c.prepare("SELECT id, record, spec FROM builds ORDER BY created, id")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })?;
        let mut builds = Vec::with_capacity(rows.len());
        for (id, json, spec) in rows {
            let record = serde_json::from_str(&json).map_err(|e| e.to_string());
            let spec = proto::BuildSpec::decode(spec.as_slice()).map_err(|e| e.to_string());
            match (record, spec) {
                (Ok(record), Ok(spec)) => builds.push((record, spec)),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(build_id = %id, error = %e, "stored build skipped: it no longer parses")
                }
            }
        }
        Ok(builds)
    }

    pub fn append_events(&self, events: &[proto::BuildEvent]) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            {
                let mut stmt = tx.prepare_cached("INSERT INTO events (build_id, seq, body) VALUES (?1, ?2, ?3)")?;
                for e in events {
                    stmt.execute(params![e.build_id, e.seq as i64, e.encode_to_vec()])?;
                }
            }
            tx.commit()
        })
    }

    /// Events of one build after `after_seq`, at most `limit`.
    pub fn events_after(&self, build_id: &str, after_seq: u64, limit: usize) -> Result<Vec<proto::BuildEvent>> {
        let bodies: Vec<Vec<u8>> = self.with(|c| {
            let mut stmt =
                c.prepare_cached("SELECT body FROM events WHERE build_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3")?;
            // A client's after_seq past i64 means "after everything", not a
            // negative number that replays from the start.
            let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = stmt.query_map(params![build_id, after, limit], |r| r.get(0))?;
            rows.collect()
        })?;
        bodies
            .iter()
            .map(|b| proto::BuildEvent::decode(b.as_slice()).map_err(|e| CoordinatorError::Internal(e.to_string())))
            .collect()
    }

    pub fn context_size(&self, digest: &str) -> Result<Option<u64>> {
        self.with(|c| {
            c.query_row("SELECT size FROM contexts WHERE digest = ?1", params![digest], |r| r.get::<_, i64>(0))
                .optional()
                .map(|o| o.map(|s| s as u64))
        })
    }

    pub fn context_stored(&self, digest: &str, size: u64, stored: u64, now_ms: i64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO contexts (digest, size, stored, last_used) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(digest) DO UPDATE SET last_used = excluded.last_used",
                params![digest, size as i64, stored as i64, now_ms],
            )
            .map(drop)
        })
    }

    /// Stored contexts, least recently used first, with their stored bytes.
    pub fn contexts_by_age(&self) -> Result<Vec<(String, u64)>> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT digest, stored FROM contexts ORDER BY last_used, digest")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
            rows.collect()
        })
    }

    /// Records or clears an operator's cordon on an agent.
    pub fn set_cordon(&self, agent: &str, cordoned: bool) -> Result<()> {
        self.with(|c| {
            if cordoned {
                c.execute("INSERT OR IGNORE INTO cordons (agent) VALUES (?1)", params![agent]).map(drop)
            } else {
                c.execute("DELETE FROM cordons WHERE agent = ?1", params![agent]).map(drop)
            }
        })
    }

    pub fn cordons(&self) -> Result<Vec<String>> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT agent FROM cordons ORDER BY agent")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            rows.collect()
        })
    }

    pub fn context_delete(&self, digest: &str) -> Result<()> {
        self.with(|c| c.execute("DELETE FROM contexts WHERE digest = ?1", params![digest]).map(drop))
    }

    pub fn context_touch(&self, digest: &str, now_ms: i64) -> Result<()> {
        self.with(|c| {
            c.execute("UPDATE contexts SET last_used = ?2 WHERE digest = ?1", params![digest, now_ms]).map(drop)
        })
    }
}

impl Store {
    pub fn token_insert(&self, t: &TokenRecord, hash: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO tokens (id, hash, role, created, expires, single_use, description)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![t.id, hash, t.role, t.created_ms, t.expires_ms, t.single_use, t.description],
            )
            .map(drop)
        })
    }

    fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
        Ok(TokenRecord {
            id: r.get(0)?,
            role: r.get(1)?,
            created_ms: r.get(2)?,
            expires_ms: r.get(3)?,
            single_use: r.get(4)?,
            used: r.get(5)?,
            revoked: r.get(6)?,
            description: r.get(7)?,
        })
    }

    pub fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>> {
        self.with(|c| {
            c.query_row(
                "SELECT id, role, created, expires, single_use, used, revoked, description FROM tokens WHERE hash = ?1",
                params![hash],
                Self::token_row,
            )
            .optional()
        })
    }

    /// Marks a single-use token used; false if it already was.
    pub fn token_use(&self, id: &str) -> Result<bool> {
        self.with(|c| c.execute("UPDATE tokens SET used = 1 WHERE id = ?1 AND used = 0", params![id]).map(|n| n == 1))
    }

    pub fn token_revoke(&self, id: &str) -> Result<bool> {
        self.with(|c| {
            c.execute("UPDATE tokens SET revoked = 1 WHERE id = ?1 AND revoked = 0", params![id]).map(|n| n == 1)
        })
    }

    pub fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, role, created, expires, single_use, used, revoked, description FROM tokens ORDER BY created",
            )?;
            let rows = stmt.query_map([], Self::token_row)?;
            rows.collect()
        })
    }
}
