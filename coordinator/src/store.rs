//! The coordinator's durable state: builds, jobs and events in SQLite, so a
//! restart loses nothing.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use prost::Message as _;
use rusqlite::{Connection, OptionalExtension, params};

use braid_shared::proto;

use crate::error::{CoordinatorError, Result};
use crate::model::{BuildRecord, Builder, Declared, Delivered, TokenRecord};

#[path = "store_placement.rs"]
mod placement;

/// One change of the farm to store (`Store::write`).
#[derive(Debug)]
pub enum Write<'a> {
    /// A new build and its spec.
    Insert(&'a BuildRecord, &'a proto::BuildSpec),
    /// A build's record as it now is.
    Record(&'a BuildRecord),
    Events(&'a [proto::BuildEvent]),
    /// An agent cordoned (true) or not.
    Cordon(&'a str, bool),
    /// The last message of an agent's incarnation applied (written with the
    /// events it made, so a restart neither loses nor repeats them).
    Delivered(&'a str, &'a Delivered),
    /// An agent's builder as its hello reported it (None: forgotten).
    Builder(&'a str, Option<&'a Builder>),
    /// The platforms an agent declared and when it was last seen (None:
    /// forgotten).
    Declared(&'a str, Option<&'a Declared>),
    /// What the last job of a repository and platform used (see
    /// `store_placement`).
    Footprint(&'a str, &'a crate::model::Footprint, i64),
}

pub struct Sqlite {
    conn: Mutex<Connection>,
}

/// Whether a failed write is the disk's or the system's doing (full,
/// failing, locked), so the same write can succeed later; a change SQLite
/// refuses for itself (a constraint, a type) is not.
pub fn is_transient(e: &CoordinatorError) -> bool {
    use rusqlite::ErrorCode as C;
    match e {
        CoordinatorError::Store(rusqlite::Error::SqliteFailure(f, _)) => matches!(
            f.code,
            C::DiskFull
                | C::SystemIoFailure
                | C::DatabaseBusy
                | C::DatabaseLocked
                | C::CannotOpen
                | C::ReadOnly
                | C::OutOfMemory
                | C::FileLockingProtocolFailed
                | C::OperationInterrupted
        ),
        CoordinatorError::Io(_) | CoordinatorError::DataDirFull { .. } => true,
        _ => false,
    }
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
CREATE TABLE IF NOT EXISTS deliveries (
    agent       TEXT PRIMARY KEY,
    incarnation TEXT NOT NULL,
    seq         INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_builders (
    agent        TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    version      TEXT NOT NULL,
    capabilities TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_platforms (
    agent     TEXT PRIMARY KEY,
    platforms TEXT NOT NULL,
    emulates  TEXT NOT NULL,
    last_seen INTEGER NOT NULL
);
";

/// Enrollment: every agent certificate serial the coordinator issued at a
/// Join or first saw in a session, and the names an operator forgot.
const ENROLLMENT_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS agent_certs (
    serial     TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    not_before INTEGER NOT NULL,
    not_after  INTEGER NOT NULL,
    issued_at  INTEGER NOT NULL,
    source     TEXT NOT NULL,
    revoked    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS agent_certs_name ON agent_certs (name);
CREATE TABLE IF NOT EXISTS forgotten_agents (
    name TEXT PRIMARY KEY,
    at   INTEGER NOT NULL
);
";

impl Sqlite {
    pub fn open(path: &Path) -> Result<Sqlite> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(ENROLLMENT_SCHEMA)?;
        conn.execute_batch(placement::SCHEMA)?;
        Self::add_token_binding_columns(&conn)?;
        conn.execute_batch(crate::store_results::SCHEMA)?;
        Ok(Sqlite { conn: Mutex::new(conn) })
    }

    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        // A poisoned lock means a panic mid-statement; SQLite's own
        // transaction kept the file consistent, so carry on with it.
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&mut conn)?)
    }

    /// Lets the database grow to `pages` pages at most (never below its
    /// size): past it, writes fail with SQLITE_FULL, as on a full disk.
    #[cfg(test)]
    pub fn limit_pages(&self, pages: u64) {
        self.with(|c| c.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))).unwrap();
    }

    /// Refuses every write (SQLITE_READONLY) while `on`, as a failing disk would.
    #[cfg(test)]
    pub fn refuse_writes(&self, on: bool) {
        self.with(|c| c.pragma_update(None, "query_only", on)).unwrap();
    }

    /// Writes a batch of the farm's changes in one transaction: one commit
    /// (one fsync) for however many events and records the batch holds.
    pub fn write(&self, writes: &[Write<'_>]) -> Result<()> {
        let json = |r: &BuildRecord| serde_json::to_string(r).map_err(|e| CoordinatorError::Internal(e.to_string()));
        let mut records = Vec::with_capacity(writes.len());
        for w in writes {
            records.push(match w {
                Write::Insert(r, _) | Write::Record(r) => Some(json(r)?),
                _ => None,
            });
        }
        self.with(|c| {
            let tx = c.transaction()?;
            {
                let mut insert =
                    tx.prepare_cached("INSERT INTO builds (id, created, spec, record) VALUES (?1, ?2, ?3, ?4)")?;
                let mut update = tx.prepare_cached("UPDATE builds SET record = ?2 WHERE id = ?1")?;
                let mut event = tx.prepare_cached("INSERT INTO events (build_id, seq, body) VALUES (?1, ?2, ?3)")?;
                for (w, json) in writes.iter().zip(&records) {
                    match (w, json) {
                        (Write::Insert(r, spec), Some(json)) => {
                            insert.execute(params![r.id, r.created_ms, spec.encode_to_vec(), json])?;
                        }
                        (Write::Record(r), Some(json)) => {
                            update.execute(params![r.id, json])?;
                        }
                        (Write::Events(events), _) => {
                            for e in *events {
                                event.execute(params![e.build_id, e.seq as i64, e.encode_to_vec()])?;
                            }
                        }
                        (Write::Cordon(agent, true), _) => {
                            tx.execute("INSERT OR IGNORE INTO cordons (agent) VALUES (?1)", params![agent])?;
                        }
                        (Write::Cordon(agent, false), _) => {
                            tx.execute("DELETE FROM cordons WHERE agent = ?1", params![agent])?;
                        }
                        (Write::Builder(agent, Some(b)), _) => {
                            tx.execute(
                                "INSERT INTO agent_builders (agent, name, version, capabilities) VALUES (?1, ?2, ?3, ?4) \
                                 ON CONFLICT (agent) DO UPDATE SET name = ?2, version = ?3, capabilities = ?4",
                                params![agent, b.name, b.version, b.capabilities.names().join(",")],
                            )?;
                        }
                        (Write::Builder(agent, None), _) => {
                            tx.execute("DELETE FROM agent_builders WHERE agent = ?1", params![agent])?;
                        }
                        (Write::Declared(agent, Some(d)), _) => {
                            let join = |ps: &[braid_shared::Platform]| {
                                ps.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
                            };
                            tx.execute(
                                "INSERT INTO agent_platforms (agent, platforms, emulates, last_seen) \
                                 VALUES (?1, ?2, ?3, ?4) \
                                 ON CONFLICT (agent) DO UPDATE SET platforms = ?2, emulates = ?3, last_seen = ?4",
                                params![agent, join(&d.platforms), join(&d.emulates), d.last_seen_ms],
                            )?;
                            placement::write_labels(&tx, agent, Some(&d.labels))?;
                        }
                        (Write::Declared(agent, None), _) => {
                            tx.execute("DELETE FROM agent_platforms WHERE agent = ?1", params![agent])?;
                            placement::write_labels(&tx, agent, None)?;
                        }
                        (Write::Footprint(key, f, now), _) => placement::write_footprint(&tx, key, f, *now)?,
                        (Write::Delivered(agent, d), _) => {
                            tx.prepare_cached(
                                "INSERT INTO deliveries (agent, incarnation, seq) VALUES (?1, ?2, ?3) \
                                 ON CONFLICT (agent) DO UPDATE SET incarnation = ?2, seq = ?3",
                            )?
                            .execute(params![agent, d.incarnation, d.seq as i64])?;
                        }
                        _ => {}
                    }
                }
            }
            tx.commit()
        })
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
        // Log lines do not rewrite the record: its last event is the events
        // table's.
        let last_seqs: HashMap<String, i64> = self.with(|c| {
            let mut stmt = c.prepare("SELECT build_id, MAX(seq) FROM events GROUP BY build_id")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })?;
        Ok(crate::stores::decode_builds(rows, &last_seqs))
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

    /// The last message applied per agent (`Write::Delivered`).
    pub fn deliveries(&self) -> Result<Vec<(String, Delivered)>> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT agent, incarnation, seq FROM deliveries")?;
            let rows = stmt.query_map([], |row| {
                let seq: i64 = row.get(2)?;
                Ok((row.get(0)?, Delivered { incarnation: row.get(1)?, seq: u64::try_from(seq).unwrap_or(0) }))
            })?;
            rows.collect()
        })
    }

    /// The builders agents last reported; names a newer coordinator no
    /// longer knows are dropped.
    pub fn builders(&self) -> Result<Vec<(String, Builder)>> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT agent, name, version, capabilities FROM agent_builders ORDER BY agent")?;
            let rows = stmt.query_map([], |r| {
                let caps: String = r.get(3)?;
                let capabilities = caps.split(',').filter_map(|n| n.parse().ok()).collect();
                Ok((r.get(0)?, Builder { name: r.get(1)?, version: r.get(2)?, capabilities }))
            })?;
            rows.collect()
        })
    }

    /// The platforms every agent known declared; a platform this version
    /// no longer parses is dropped.
    pub fn declared(&self) -> Result<Vec<(String, Declared)>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT p.agent, p.platforms, p.emulates, p.last_seen, l.labels FROM agent_platforms p \
                 LEFT JOIN agent_labels l ON l.agent = p.agent ORDER BY p.agent",
            )?;
            let rows = stmt.query_map([], |r| {
                let split = |s: String| s.split(',').filter_map(|p| p.parse().ok()).collect();
                let declared = Declared {
                    platforms: split(r.get(1)?),
                    emulates: split(r.get(2)?),
                    last_seen_ms: r.get(3)?,
                    labels: placement::read_labels(r.get(4)?),
                };
                Ok((r.get(0)?, declared))
            })?;
            rows.collect()
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

impl Sqlite {
    /// Databases made before join tokens could be bound to a name lack
    /// these columns.
    fn add_token_binding_columns(conn: &Connection) -> rusqlite::Result<()> {
        let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('tokens')")?;
        let columns = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<_>>>()?;
        if !columns.iter().any(|c| c == "agent_name") {
            conn.execute_batch("ALTER TABLE tokens ADD COLUMN agent_name TEXT")?;
        }
        if !columns.iter().any(|c| c == "may_replace") {
            conn.execute_batch("ALTER TABLE tokens ADD COLUMN may_replace INTEGER NOT NULL DEFAULT 0")?;
        }
        Ok(())
    }

    pub fn token_insert(&self, t: &TokenRecord, hash: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO tokens (id, hash, role, created, expires, single_use, description, agent_name, may_replace)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    t.id,
                    hash,
                    t.role,
                    t.created_ms,
                    t.expires_ms,
                    t.single_use,
                    t.description,
                    t.agent_name,
                    t.replace
                ],
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
            agent_name: r.get(8)?,
            replace: r.get(9)?,
        })
    }

    pub fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>> {
        self.with(|c| {
            c.query_row(
                "SELECT id, role, created, expires, single_use, used, revoked, description, agent_name, may_replace FROM tokens WHERE hash = ?1",
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
                "SELECT id, role, created, expires, single_use, used, revoked, description, agent_name, may_replace FROM tokens ORDER BY created",
            )?;
            let rows = stmt.query_map([], Self::token_row)?;
            rows.collect()
        })
    }
}

/// One recorded agent certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRow {
    /// Lowercase hex of the certificate's serial.
    pub serial: String,
    pub name: String,
    /// notBefore and notAfter, seconds since the epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// When the coordinator recorded it (Join, or the first call that
    /// presented an offline-issued certificate), milliseconds.
    pub issued_ms: i64,
    /// "join" or "offline".
    pub source: String,
    pub revoked: bool,
}

/// What an attempt to enroll a name with a join token came to.
#[derive(Debug, PartialEq, Eq)]
pub enum JoinOutcome {
    /// Recorded; this many earlier serials of the name were revoked.
    Enrolled { revoked: u32 },
    /// The name has a live (unrevoked) certificate and the token may not replace it.
    AlreadyEnrolled(CertRow),
    /// A single-use token another Join spent first.
    TokenUsed,
}

/// What presenting an unrecorded (offline-issued) certificate came to.
#[derive(Debug, PartialEq, Eq)]
pub enum OfflineOutcome {
    /// Recorded as the name's current certificate; this many earlier serials were revoked.
    Recorded { row: CertRow, revoked: u32 },
    /// The name's current certificate is not older than this one.
    NotNewer(CertRow),
    /// The certificate dates from before an operator forgot the name (seconds).
    Forgotten { at: i64 },
    /// Recorded meanwhile (another call raced this one).
    Known(CertRow),
}

const CERT_COLUMNS: &str = "serial, name, not_before, not_after, issued_at, source, revoked";

fn cert_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CertRow> {
    Ok(CertRow {
        serial: r.get(0)?,
        name: r.get(1)?,
        not_before: r.get(2)?,
        not_after: r.get(3)?,
        issued_ms: r.get(4)?,
        source: r.get(5)?,
        revoked: r.get(6)?,
    })
}

fn cert_by_serial(c: &Connection, serial: &str) -> rusqlite::Result<Option<CertRow>> {
    c.query_row(&format!("SELECT {CERT_COLUMNS} FROM agent_certs WHERE serial = ?1"), params![serial], cert_row)
        .optional()
}

/// The name's unrevoked certificate, the most recently recorded first.
fn current_cert(c: &Connection, name: &str) -> rusqlite::Result<Option<CertRow>> {
    c.query_row(
        &format!(
            "SELECT {CERT_COLUMNS} FROM agent_certs WHERE name = ?1 AND revoked = 0 ORDER BY issued_at DESC LIMIT 1"
        ),
        params![name],
        cert_row,
    )
    .optional()
}

fn insert_cert(c: &Connection, row: &CertRow) -> rusqlite::Result<()> {
    c.execute(
        &format!("INSERT INTO agent_certs ({CERT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
        params![row.serial, row.name, row.not_before, row.not_after, row.issued_ms, row.source, row.revoked],
    )
    .map(drop)
}

/// Revokes every serial of `name` but `keep`; returns how many.
fn revoke_others(c: &Connection, name: &str, keep: &str) -> rusqlite::Result<u32> {
    c.execute(
        "UPDATE agent_certs SET revoked = 1 WHERE name = ?1 AND serial != ?2 AND revoked = 0",
        params![name, keep],
    )
    .map(|n| n as u32)
}

impl Sqlite {
    pub fn cert_by_serial(&self, serial: &str) -> Result<Option<CertRow>> {
        self.with(|c| cert_by_serial(c, serial))
    }

    pub fn current_cert(&self, name: &str) -> Result<Option<CertRow>> {
        self.with(|c| current_cert(c, name))
    }

    /// In one transaction: refuses a name already enrolled unless `replace`,
    /// spends a single-use token, records the new serial and revokes the
    /// name's earlier ones. Nothing is spent or recorded when refused.
    pub fn enroll_with_token(
        &self,
        token_id: &str,
        single_use: bool,
        replace: bool,
        row: &CertRow,
    ) -> Result<JoinOutcome> {
        self.with(|c| {
            let tx = c.transaction()?;
            if let Some(current) = current_cert(&tx, &row.name)?
                && !replace
            {
                return Ok(JoinOutcome::AlreadyEnrolled(current));
            }
            if single_use
                && tx.execute("UPDATE tokens SET used = 1 WHERE id = ?1 AND used = 0", params![token_id])? != 1
            {
                return Ok(JoinOutcome::TokenUsed);
            }
            insert_cert(&tx, row)?;
            let revoked = revoke_others(&tx, &row.name, &row.serial)?;
            // Revoked and expired: refused by the TLS handshake already, so
            // the row can go. An expired current certificate stays: it still
            // holds its name against older offline certificates.
            tx.execute("DELETE FROM agent_certs WHERE revoked = 1 AND not_after < ?1", params![row.issued_ms / 1000])?;
            tx.commit()?;
            Ok(JoinOutcome::Enrolled { revoked })
        })
    }

    /// Records a certificate issued offline (with the CA key) the first time
    /// it is presented, if it is newer than the name's current one and than
    /// the last time an operator forgot the name; it then supersedes the
    /// name's earlier serials.
    pub fn record_offline_cert(&self, row: &CertRow) -> Result<OfflineOutcome> {
        self.with(|c| {
            let tx = c.transaction()?;
            if let Some(known) = cert_by_serial(&tx, &row.serial)? {
                return Ok(OfflineOutcome::Known(known));
            }
            let forgotten: Option<i64> = tx
                .query_row("SELECT at FROM forgotten_agents WHERE name = ?1", params![row.name], |r| r.get(0))
                .optional()?;
            if let Some(at) = forgotten
                && row.not_before <= at
            {
                return Ok(OfflineOutcome::Forgotten { at });
            }
            if let Some(current) = current_cert(&tx, &row.name)?
                && row.not_before <= current.not_before
            {
                return Ok(OfflineOutcome::NotNewer(current));
            }
            insert_cert(&tx, row)?;
            let revoked = revoke_others(&tx, &row.name, &row.serial)?;
            tx.commit()?;
            Ok(OfflineOutcome::Recorded { row: row.clone(), revoked })
        })
    }

    /// Revokes every serial of `name`, drops its delivery record, and remembers when (`at`, seconds), so
    /// an offline certificate issued before it is refused too; returns how
    /// many serials were revoked.
    pub fn forget_agent(&self, name: &str, at: i64) -> Result<u32> {
        self.with(|c| {
            let tx = c.transaction()?;
            let revoked = tx.execute("UPDATE agent_certs SET revoked = 1 WHERE name = ?1 AND revoked = 0", params![name])?;
            // Its message numbering goes with it: a new enrollment is a new process.
            tx.execute("DELETE FROM deliveries WHERE agent = ?1", params![name])?;
            tx.execute(
                "INSERT INTO forgotten_agents (name, at) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET at = excluded.at",
                params![name, at],
            )?;
            tx.commit()?;
            Ok(revoked as u32)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn forgetting_an_agent_drops_its_delivery_record_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(&dir.path().join("braid.db")).unwrap();
        let d = Delivered { incarnation: "abc".into(), seq: 7 };
        store.write(&[Write::Delivered("pi-01", &d), Write::Delivered("pi-02", &d)]).unwrap();
        store.forget_agent("pi-01", 1).unwrap();
        let left: Vec<String> = store.deliveries().unwrap().into_iter().map(|(name, _)| name).collect();
        assert_eq!(left, ["pi-02"]);
    }
}
