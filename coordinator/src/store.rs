//! The coordinator's durable state: builds, jobs and events in SQLite, so a
//! restart loses nothing.

use std::path::Path;
use std::sync::Mutex;

use prost::Message as _;
use rusqlite::{Connection, OptionalExtension, params};

use braid_shared::proto;

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
CREATE TABLE IF NOT EXISTS contexts (
    digest    TEXT PRIMARY KEY,
    size      INTEGER NOT NULL,
    stored    INTEGER NOT NULL,
    last_used INTEGER NOT NULL
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

    /// Every build with its spec, oldest first.
    pub fn load_builds(&self) -> Result<Vec<(BuildRecord, proto::BuildSpec)>> {
        let rows: Vec<(String, Vec<u8>)> = self.with(|c| {
            let mut stmt = c.prepare("SELECT record, spec FROM builds ORDER BY created, id")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })?;
        rows.into_iter()
            .map(|(json, spec)| {
                let record = serde_json::from_str(&json).map_err(|e| CoordinatorError::Internal(e.to_string()))?;
                let spec =
                    proto::BuildSpec::decode(spec.as_slice()).map_err(|e| CoordinatorError::Internal(e.to_string()))?;
                Ok((record, spec))
            })
            .collect()
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
            let rows = stmt.query_map(params![build_id, after_seq as i64, limit as i64], |r| r.get(0))?;
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

    pub fn context_delete(&self, digest: &str) -> Result<()> {
        self.with(|c| c.execute("DELETE FROM contexts WHERE digest = ?1", params![digest]).map(drop))
    }

    pub fn context_touch(&self, digest: &str, now_ms: i64) -> Result<()> {
        self.with(|c| {
            c.execute("UPDATE contexts SET last_used = ?2 WHERE digest = ?1", params![digest, now_ms]).map(drop)
        })
    }
}
