//! The store in PostgreSQL, for several coordinators on one database: the
//! same tables as SQLite's (store.rs), versioned migrations, and every write
//! fenced by the leader's term (leader.rs), so a deposed leader changes
//! nothing.
//!
//! The client is the synchronous `postgres` crate. It runs its own small
//! runtime, which may not be entered from a tokio worker: a call made on
//! one runs on a scoped thread of its own; the journal's writer thread calls
//! it directly.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls, Transaction};
use prost::Message as _;

use braid_shared::proto;

use crate::error::{CoordinatorError, Result};
use crate::model::{BuildRecord, Builder, Declared, Delivered, TokenRecord};
use crate::store::{CertRow, JoinOutcome, OfflineOutcome, Write};

/// The schema this version knows, one entry per version, applied in order.
pub const MIGRATIONS: &[&str] = &[
    // 1: the tables SQLite has, and the leader's lease.
    "
CREATE TABLE braid_leader (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    term    BIGINT NOT NULL,
    holder  TEXT NOT NULL,
    address TEXT NOT NULL,
    since   TIMESTAMPTZ NOT NULL
);
INSERT INTO braid_leader VALUES (1, 0, '', '', 'epoch');
CREATE TABLE braid_lease (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    expires TIMESTAMPTZ NOT NULL
);
INSERT INTO braid_lease VALUES (1, 'epoch');
CREATE TABLE builds (
    id      TEXT PRIMARY KEY,
    created BIGINT NOT NULL,
    spec    BYTEA NOT NULL,
    record  TEXT NOT NULL,
    term    BIGINT NOT NULL,
    written TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE events (
    build_id TEXT NOT NULL,
    seq      BIGINT NOT NULL,
    body     BYTEA NOT NULL,
    term     BIGINT NOT NULL,
    written  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (build_id, seq)
);
CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    hash        TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL,
    created     BIGINT NOT NULL,
    expires     BIGINT,
    single_use  BOOLEAN NOT NULL,
    used        BOOLEAN NOT NULL DEFAULT false,
    revoked     BOOLEAN NOT NULL DEFAULT false,
    description TEXT NOT NULL DEFAULT '',
    agent_name  TEXT,
    may_replace BOOLEAN NOT NULL DEFAULT false
);
CREATE TABLE contexts (digest TEXT PRIMARY KEY, size BIGINT NOT NULL, stored BIGINT NOT NULL, last_used BIGINT NOT NULL);
CREATE TABLE cordons (agent TEXT PRIMARY KEY);
CREATE TABLE deliveries (agent TEXT PRIMARY KEY, incarnation TEXT NOT NULL, seq BIGINT NOT NULL);
CREATE TABLE agent_builders (agent TEXT PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL, capabilities TEXT NOT NULL);
CREATE TABLE agent_platforms (agent TEXT PRIMARY KEY, platforms TEXT NOT NULL, emulates TEXT NOT NULL, last_seen BIGINT NOT NULL);
CREATE TABLE agent_certs (
    serial     TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    not_before BIGINT NOT NULL,
    not_after  BIGINT NOT NULL,
    issued_at  BIGINT NOT NULL,
    source     TEXT NOT NULL,
    revoked    BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX agent_certs_name ON agent_certs (name);
CREATE TABLE forgotten_agents (name TEXT PRIMARY KEY, at BIGINT NOT NULL);
",
    // 2: agents' labels and jobs' footprints (placement).
    crate::pgstore_placement::MIGRATION,
    // 3: the result cache (issue 22).
    crate::pgstore_results::MIGRATION,
];

/// Serializes migrations between coordinators starting together.
const MIGRATION_LOCK: i64 = 0x0062_7261_6964;

/// Idle connections kept for reuse.
const IDLE: usize = 8;

pub struct Postgres {
    config: postgres::Config,
    idle: Mutex<Vec<Client>>,
    /// The term every write is fenced by; 0: unfenced (the offline `token
    /// create`, before any leader exists).
    term: AtomicI64,
    /// Calls that failed, and the last call's latency.
    pub errors: AtomicU64,
    pub latency_us: AtomicU64,
}

/// How a connection is made: the URL (without a password), the password
/// apart, and session settings that bound what a stalled coordinator holds.
pub fn config(url: &str, password: Option<&str>, lease: Duration) -> Result<postgres::Config> {
    let mut config: postgres::Config =
        url.parse().map_err(|e| CoordinatorError::InvalidArgument(format!("invalid setting store: {e}")))?;
    if let Some(p) = password {
        config.password(p);
    }
    let ms = lease.as_millis();
    // A leader stopped inside a transaction would hold the lease row: the
    // server ends such a transaction after one lease.
    config.options(&format!("-c idle_in_transaction_session_timeout={ms} -c statement_timeout={}", ms * 6));
    config.connect_timeout(Duration::from_secs(5));
    config.application_name("braid-coordinator");
    Ok(config)
}

pub fn pg_error(e: postgres::Error) -> CoordinatorError {
    let transient = e.is_closed()
        || e.as_db_error().is_none()
        || e.code().is_some_and(|c| {
            let c = c.code();
            c.starts_with("08") || c.starts_with("57") || c.starts_with("53") || c == "40001" || c == "40P01"
        });
    CoordinatorError::Postgres { message: e.to_string(), transient }
}

impl Postgres {
    /// Connects and brings the schema up to this version's; refuses a
    /// newer one, naming both versions.
    pub fn open(config: postgres::Config) -> Result<Postgres> {
        let pg = Postgres {
            config,
            idle: Mutex::new(Vec::new()),
            term: AtomicI64::new(0),
            errors: AtomicU64::new(0),
            latency_us: AtomicU64::new(0),
        };
        pg.with(migrate)?;
        Ok(pg)
    }

    pub fn connect(&self) -> Result<Client> {
        self.config.connect(NoTls).map_err(pg_error)
    }

    /// From now on every write checks that `term` still leads.
    pub fn fence(&self, term: i64) {
        self.term.store(term, Ordering::SeqCst);
    }

    pub fn term(&self) -> i64 {
        self.term.load(Ordering::SeqCst)
    }

    pub(crate) fn with<T: Send>(&self, f: impl FnOnce(&mut Client) -> Result<T> + Send) -> Result<T> {
        let run = || {
            let started = Instant::now();
            let taken = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
            let mut client = match taken {
                Some(c) if !c.is_closed() => c,
                _ => self.connect()?,
            };
            let out = f(&mut client);
            let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if client.is_closed() {
                // The server went away (a restart, a failover): the idle
                // connections are as dead as this one.
                idle.clear();
            } else if idle.len() < IDLE {
                idle.push(client);
            }
            drop(idle);
            self.latency_us.store(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
            out
        };
        let out = if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| s.spawn(run).join())
                .unwrap_or_else(|_| Err(CoordinatorError::Internal("a store call panicked".into())))
        } else {
            run()
        };
        if out.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    /// A transaction that first checks this coordinator still leads (the
    /// lease row locked FOR SHARE, so no new leader commits meanwhile); a
    /// deposed leader exits there, before writing anything.
    fn fenced<T: Send>(&self, f: impl FnOnce(&mut Transaction<'_>, i64) -> Result<T> + Send) -> Result<T> {
        let mine = self.term();
        self.with(|c| {
            let mut tx = c.transaction().map_err(pg_error)?;
            if mine != 0 {
                let row =
                    tx.query_one("SELECT term FROM braid_leader WHERE id = 1 FOR SHARE", &[]).map_err(pg_error)?;
                let current: i64 = row.get(0);
                if current != mine {
                    drop(tx);
                    crate::leader::deposed(mine, current);
                }
            }
            let out = f(&mut tx, mine)?;
            tx.commit().map_err(pg_error)?;
            Ok(out)
        })
    }

    pub fn write(&self, writes: &[Write<'_>]) -> Result<()> {
        let json = |r: &BuildRecord| serde_json::to_string(r).map_err(|e| CoordinatorError::Internal(e.to_string()));
        let mut records = Vec::with_capacity(writes.len());
        for w in writes {
            records.push(match w {
                Write::Insert(r, _) | Write::Record(r) => Some(json(r)?),
                _ => None,
            });
        }
        self.fenced(|tx, term| write_all(tx, term, writes, &records).map_err(pg_error))
    }

    pub fn load_builds(&self) -> Result<Vec<(BuildRecord, proto::BuildSpec)>> {
        type Rows = Vec<(String, String, Vec<u8>)>;
        let (rows, last): (Rows, HashMap<String, i64>) = self.with(|c| {
            let rows = c
                .query("SELECT id, record, spec FROM builds ORDER BY created, id", &[])
                .map_err(pg_error)?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            let last = c
                .query("SELECT build_id, MAX(seq) FROM events GROUP BY build_id", &[])
                .map_err(pg_error)?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            Ok((rows, last))
        })?;
        Ok(crate::stores::decode_builds(rows, &last))
    }

    pub fn events_after(&self, build_id: &str, after_seq: u64, limit: usize) -> Result<Vec<proto::BuildEvent>> {
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let bodies: Vec<Vec<u8>> = self.with(|c| {
            let rows = c
                .query(
                    "SELECT body FROM events WHERE build_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                    &[&build_id, &after, &limit],
                )
                .map_err(pg_error)?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })?;
        bodies
            .iter()
            .map(|b| proto::BuildEvent::decode(b.as_slice()).map_err(|e| CoordinatorError::Internal(e.to_string())))
            .collect()
    }

    fn query_col<T: for<'a> postgres::types::FromSql<'a> + Send>(
        &self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<T>> {
        self.with(|c| Ok(c.query(sql, params).map_err(pg_error)?.iter().map(|r| r.get(0)).collect()))
    }

    pub fn context_size(&self, digest: &str) -> Result<Option<u64>> {
        let sizes: Vec<i64> = self.query_col("SELECT size FROM contexts WHERE digest = $1", &[&digest])?;
        Ok(sizes.first().map(|s| *s as u64))
    }

    pub fn context_stored(&self, digest: &str, size: u64, stored: u64, now_ms: i64) -> Result<()> {
        let (size, stored) = (size as i64, stored as i64);
        self.fenced(|tx, _| {
            tx.execute(
                "INSERT INTO contexts (digest, size, stored, last_used) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (digest) DO UPDATE SET last_used = excluded.last_used",
                &[&digest, &size, &stored, &now_ms],
            )
            .map(drop)
            .map_err(pg_error)
        })
    }

    pub fn contexts_by_age(&self) -> Result<Vec<(String, u64)>> {
        self.with(|c| {
            let rows =
                c.query("SELECT digest, stored FROM contexts ORDER BY last_used, digest", &[]).map_err(pg_error)?;
            Ok(rows.iter().map(|r| (r.get(0), r.get::<_, i64>(1) as u64)).collect())
        })
    }

    pub fn deliveries(&self) -> Result<Vec<(String, Delivered)>> {
        self.with(|c| {
            let rows = c.query("SELECT agent, incarnation, seq FROM deliveries", &[]).map_err(pg_error)?;
            Ok(rows
                .iter()
                .map(|r| {
                    (r.get(0), Delivered { incarnation: r.get(1), seq: u64::try_from(r.get::<_, i64>(2)).unwrap_or(0) })
                })
                .collect())
        })
    }

    pub fn builders(&self) -> Result<Vec<(String, Builder)>> {
        self.with(|c| {
            let rows = c
                .query("SELECT agent, name, version, capabilities FROM agent_builders ORDER BY agent", &[])
                .map_err(pg_error)?;
            Ok(rows
                .iter()
                .map(|r| {
                    let caps: String = r.get(3);
                    let capabilities = caps.split(',').filter_map(|n| n.parse().ok()).collect();
                    (r.get(0), Builder { name: r.get(1), version: r.get(2), capabilities })
                })
                .collect())
        })
    }

    pub fn declared(&self) -> Result<Vec<(String, Declared)>> {
        self.with(|c| {
            let rows = c
                .query(
                    "SELECT p.agent, p.platforms, p.emulates, p.last_seen, l.labels FROM agent_platforms p \
                     LEFT JOIN agent_labels l ON l.agent = p.agent ORDER BY p.agent",
                    &[],
                )
                .map_err(pg_error)?;
            Ok(rows
                .iter()
                .map(|r| {
                    let split = |s: String| s.split(',').filter_map(|p| p.parse().ok()).collect();
                    let labels: Option<String> = r.get(4);
                    let d = Declared {
                        platforms: split(r.get(1)),
                        emulates: split(r.get(2)),
                        last_seen_ms: r.get(3),
                        // What does not parse (a newer version's) reads as none.
                        labels: labels.and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default(),
                    };
                    (r.get(0), d)
                })
                .collect())
        })
    }

    pub fn cordons(&self) -> Result<Vec<String>> {
        self.query_col("SELECT agent FROM cordons ORDER BY agent", &[])
    }

    pub fn context_delete(&self, digest: &str) -> Result<()> {
        self.fenced(|tx, _| {
            tx.execute("DELETE FROM contexts WHERE digest = $1", &[&digest]).map(drop).map_err(pg_error)
        })
    }

    pub fn context_touch(&self, digest: &str, now_ms: i64) -> Result<()> {
        self.fenced(|tx, _| {
            tx.execute("UPDATE contexts SET last_used = $2 WHERE digest = $1", &[&digest, &now_ms])
                .map(drop)
                .map_err(pg_error)
        })
    }

    pub fn token_insert(&self, t: &TokenRecord, hash: &str) -> Result<()> {
        self.fenced(|tx, _| {
            tx.execute(
                "INSERT INTO tokens (id, hash, role, created, expires, single_use, description, agent_name, may_replace)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[&t.id, &hash, &t.role, &t.created_ms, &t.expires_ms, &t.single_use, &t.description, &t.agent_name, &t.replace],
            )
            .map(drop)
            .map_err(pg_error)
        })
    }

    fn tokens_where(&self, filter: &str, params: &[&(dyn postgres::types::ToSql + Sync)]) -> Result<Vec<TokenRecord>> {
        let sql = format!(
            "SELECT id, role, created, expires, single_use, used, revoked, description, agent_name, may_replace FROM tokens {filter}"
        );
        self.with(|c| {
            let rows = c.query(&sql, params).map_err(pg_error)?;
            Ok(rows
                .iter()
                .map(|r| TokenRecord {
                    id: r.get(0),
                    role: r.get(1),
                    created_ms: r.get(2),
                    expires_ms: r.get(3),
                    single_use: r.get(4),
                    used: r.get(5),
                    revoked: r.get(6),
                    description: r.get(7),
                    agent_name: r.get(8),
                    replace: r.get(9),
                })
                .collect())
        })
    }

    pub fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>> {
        Ok(self.tokens_where("WHERE hash = $1", &[&hash])?.into_iter().next())
    }

    pub fn token_use(&self, id: &str) -> Result<bool> {
        self.fenced(|tx, _| {
            tx.execute("UPDATE tokens SET used = true WHERE id = $1 AND NOT used", &[&id])
                .map(|n| n == 1)
                .map_err(pg_error)
        })
    }

    pub fn token_revoke(&self, id: &str) -> Result<bool> {
        self.fenced(|tx, _| {
            tx.execute("UPDATE tokens SET revoked = true WHERE id = $1 AND NOT revoked", &[&id])
                .map(|n| n == 1)
                .map_err(pg_error)
        })
    }

    pub fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.tokens_where("ORDER BY created", &[])
    }

    pub fn cert_by_serial(&self, serial: &str) -> Result<Option<CertRow>> {
        self.with(|c| cert_query(c, "serial = $1", &[&serial]))
    }

    pub fn current_cert(&self, name: &str) -> Result<Option<CertRow>> {
        self.with(|c| current_cert(c, name))
    }

    pub fn enroll_with_token(
        &self,
        token_id: &str,
        single_use: bool,
        replace: bool,
        row: &CertRow,
    ) -> Result<JoinOutcome> {
        self.fenced(|tx, _| {
            if let Some(current) = current_cert(tx, &row.name)?
                && !replace
            {
                return Ok(JoinOutcome::AlreadyEnrolled(current));
            }
            if single_use
                && tx
                    .execute("UPDATE tokens SET used = true WHERE id = $1 AND NOT used", &[&token_id])
                    .map_err(pg_error)?
                    != 1
            {
                return Ok(JoinOutcome::TokenUsed);
            }
            insert_cert(tx, row)?;
            let revoked = revoke_others(tx, &row.name, &row.serial)?;
            tx.execute("DELETE FROM agent_certs WHERE revoked AND not_after < $1", &[&(row.issued_ms / 1000)])
                .map_err(pg_error)?;
            Ok(JoinOutcome::Enrolled { revoked })
        })
    }

    pub fn record_offline_cert(&self, row: &CertRow) -> Result<OfflineOutcome> {
        self.fenced(|tx, _| {
            if let Some(known) = cert_query(tx, "serial = $1", &[&row.serial])? {
                return Ok(OfflineOutcome::Known(known));
            }
            let forgotten = tx
                .query_opt("SELECT at FROM forgotten_agents WHERE name = $1", &[&row.name])
                .map_err(pg_error)?
                .map(|r| r.get::<_, i64>(0));
            if let Some(at) = forgotten
                && row.not_before <= at
            {
                return Ok(OfflineOutcome::Forgotten { at });
            }
            if let Some(current) = current_cert(tx, &row.name)?
                && row.not_before <= current.not_before
            {
                return Ok(OfflineOutcome::NotNewer(current));
            }
            insert_cert(tx, row)?;
            let revoked = revoke_others(tx, &row.name, &row.serial)?;
            Ok(OfflineOutcome::Recorded { row: row.clone(), revoked })
        })
    }

    pub fn forget_agent(&self, name: &str, at: i64) -> Result<u32> {
        self.fenced(|tx, _| {
            let revoked = tx
                .execute("UPDATE agent_certs SET revoked = true WHERE name = $1 AND NOT revoked", &[&name])
                .map_err(pg_error)?;
            tx.execute("DELETE FROM deliveries WHERE agent = $1", &[&name]).map_err(pg_error)?;
            tx.execute(
                "INSERT INTO forgotten_agents (name, at) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET at = excluded.at",
                &[&name, &at],
            )
            .map_err(pg_error)?;
            Ok(revoked as u32)
        })
    }
}

impl Drop for Postgres {
    /// A client closes by blocking on its own runtime, which may not happen
    /// on a tokio thread: the idle ones close on a thread of their own.
    fn drop(&mut self) {
        let idle = std::mem::take(self.idle.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner));
        if !idle.is_empty() {
            let _ = std::thread::spawn(move || drop(idle)).join();
        }
    }
}

/// Brings the schema to the last of `MIGRATIONS`, one transaction per
/// version, under an advisory lock so coordinators starting together take
/// turns.
fn migrate(c: &mut Client) -> Result<()> {
    let mut tx = c.transaction().map_err(pg_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).map_err(pg_error)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)").map_err(pg_error)?;
    let current: i32 =
        tx.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[]).map_err(pg_error)?.get(0);
    let known = MIGRATIONS.len() as i32;
    if current > known {
        return Err(CoordinatorError::FailedPrecondition(format!(
            "the database's schema is version {current}, newer than this coordinator's {known}: upgrade the coordinator"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as i32 + 1;
        tx.batch_execute(sql).map_err(pg_error)?;
        tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&version]).map_err(pg_error)?;
        tracing::info!(version, "store schema migrated");
    }
    tx.commit().map_err(pg_error)
}

fn write_all(
    tx: &mut Transaction<'_>,
    term: i64,
    writes: &[Write<'_>],
    records: &[Option<String>],
) -> Result<(), postgres::Error> {
    let insert = tx.prepare("INSERT INTO builds (id, created, spec, record, term) VALUES ($1, $2, $3, $4, $5)")?;
    let update = tx.prepare("UPDATE builds SET record = $2, term = $3, written = clock_timestamp() WHERE id = $1")?;
    // Every event of the batch in one statement: one round trip, not one
    // per event.
    let (mut ids, mut seqs, mut bodies) = (Vec::new(), Vec::new(), Vec::new());
    for (w, json) in writes.iter().zip(records) {
        match (w, json) {
            (Write::Insert(r, spec), Some(json)) => {
                tx.execute(&insert, &[&r.id, &r.created_ms, &spec.encode_to_vec(), json, &term])?;
            }
            (Write::Record(r), Some(json)) => {
                tx.execute(&update, &[&r.id, json, &term])?;
            }
            (Write::Events(events), _) => {
                for e in *events {
                    ids.push(e.build_id.as_str());
                    seqs.push(e.seq as i64);
                    bodies.push(e.encode_to_vec());
                }
            }
            (Write::Cordon(agent, true), _) => {
                tx.execute("INSERT INTO cordons (agent) VALUES ($1) ON CONFLICT DO NOTHING", &[agent])?;
            }
            (Write::Cordon(agent, false), _) => {
                tx.execute("DELETE FROM cordons WHERE agent = $1", &[agent])?;
            }
            (Write::Builder(agent, Some(b)), _) => {
                tx.execute(
                    "INSERT INTO agent_builders (agent, name, version, capabilities) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (agent) DO UPDATE SET name = $2, version = $3, capabilities = $4",
                    &[agent, &b.name, &b.version, &b.capabilities.names().join(",")],
                )?;
            }
            (Write::Builder(agent, None), _) => {
                tx.execute("DELETE FROM agent_builders WHERE agent = $1", &[agent])?;
            }
            (Write::Declared(agent, Some(d)), _) => {
                let join =
                    |ps: &[braid_shared::Platform]| ps.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
                tx.execute(
                    "INSERT INTO agent_platforms (agent, platforms, emulates, last_seen) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (agent) DO UPDATE SET platforms = $2, emulates = $3, last_seen = $4",
                    &[agent, &join(&d.platforms), &join(&d.emulates), &d.last_seen_ms],
                )?;
                crate::pgstore_placement::write_labels(tx, agent, Some(&d.labels))?;
            }
            (Write::Declared(agent, None), _) => {
                tx.execute("DELETE FROM agent_platforms WHERE agent = $1", &[agent])?;
                crate::pgstore_placement::write_labels(tx, agent, None)?;
            }
            (Write::Footprint(key, f, now), _) => crate::pgstore_placement::write_footprint(tx, key, f, *now)?,
            (Write::Delivered(agent, d), _) => {
                tx.execute(
                    "INSERT INTO deliveries (agent, incarnation, seq) VALUES ($1, $2, $3) \
                     ON CONFLICT (agent) DO UPDATE SET incarnation = $2, seq = $3",
                    &[agent, &d.incarnation, &(d.seq as i64)],
                )?;
            }
            _ => {}
        }
    }
    if !ids.is_empty() {
        tx.execute(
            "INSERT INTO events (build_id, seq, body, term) \
             SELECT b, s, d, $4 FROM unnest($1::text[], $2::int8[], $3::bytea[]) AS t(b, s, d)",
            &[&ids, &seqs, &bodies, &term],
        )?;
    }
    Ok(())
}

const CERT_COLUMNS: &str = "serial, name, not_before, not_after, issued_at, source, revoked";

fn cert_query(
    c: &mut impl postgres::GenericClient,
    filter: &str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
) -> Result<Option<CertRow>> {
    let row =
        c.query_opt(&format!("SELECT {CERT_COLUMNS} FROM agent_certs WHERE {filter}"), params).map_err(pg_error)?;
    Ok(row.map(|r| CertRow {
        serial: r.get(0),
        name: r.get(1),
        not_before: r.get(2),
        not_after: r.get(3),
        issued_ms: r.get(4),
        source: r.get(5),
        revoked: r.get(6),
    }))
}

fn current_cert(c: &mut impl postgres::GenericClient, name: &str) -> Result<Option<CertRow>> {
    cert_query(c, "name = $1 AND NOT revoked ORDER BY issued_at DESC LIMIT 1", &[&name])
}

fn insert_cert(tx: &mut Transaction<'_>, row: &CertRow) -> Result<()> {
    tx.execute(
        &format!("INSERT INTO agent_certs ({CERT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"),
        &[&row.serial, &row.name, &row.not_before, &row.not_after, &row.issued_ms, &row.source, &row.revoked],
    )
    .map(drop)
    .map_err(pg_error)
}

fn revoke_others(tx: &mut Transaction<'_>, name: &str, keep: &str) -> Result<u32> {
    tx.execute(
        "UPDATE agent_certs SET revoked = true WHERE name = $1 AND serial != $2 AND NOT revoked",
        &[&name, &keep],
    )
    .map(|n| n as u32)
    .map_err(pg_error)
}
