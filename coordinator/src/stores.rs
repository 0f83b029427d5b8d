//! The one store boundary: the coordinator calls `Store`, which is SQLite
//! (store.rs, one coordinator, the default) or PostgreSQL (pgstore.rs,
//! several coordinators, writes fenced by the leader's term). Both hold the
//! same tables and answer the same calls, so the journal, the load at start
//! and every service are shared.

use std::path::Path;

use braid_shared::proto;

use crate::error::{CoordinatorError, Result};
use crate::model::{BuildRecord, Builder, Declared, Delivered, TokenRecord};
use crate::pgstore::Postgres;
use crate::store::{CertRow, JoinOutcome, OfflineOutcome, Sqlite, Write};

pub enum Store {
    Sqlite(Sqlite),
    Postgres(Box<Postgres>),
}

/// Whether a failed write may succeed later as it is (a full disk, a
/// database that is restarting); a change the store refuses for itself is not.
pub fn is_transient(e: &CoordinatorError) -> bool {
    match e {
        CoordinatorError::Postgres { transient, .. } => *transient,
        e => crate::store::is_transient(e),
    }
}

macro_rules! delegate {
    ($( $(#[$m:meta])* fn $name:ident(&self $(, $a:ident: $t:ty)*) -> $r:ty; )*) => {
        impl Store { $(
            $(#[$m])*
            pub fn $name(&self $(, $a: $t)*) -> $r {
                match self {
                    Store::Sqlite(s) => s.$name($($a),*),
                    Store::Postgres(p) => p.$name($($a),*),
                }
            }
        )* }
    };
}

delegate! {
    /// Writes a batch of the farm's changes in one transaction.
    fn write(&self, writes: &[Write<'_>]) -> Result<()>;
    /// Every build with its spec, oldest first.
    fn load_builds(&self) -> Result<Vec<(BuildRecord, proto::BuildSpec)>>;
    /// Events of one build after `after_seq`, at most `limit`.
    fn events_after(&self, build_id: &str, after_seq: u64, limit: usize) -> Result<Vec<proto::BuildEvent>>;
    fn context_size(&self, digest: &str) -> Result<Option<u64>>;
    fn context_stored(&self, digest: &str, size: u64, stored: u64, now_ms: i64) -> Result<()>;
    /// Stored contexts, least recently used first, with their stored bytes.
    fn contexts_by_age(&self) -> Result<Vec<(String, u64)>>;
    fn deliveries(&self) -> Result<Vec<(String, Delivered)>>;
    fn builders(&self) -> Result<Vec<(String, Builder)>>;
    fn declared(&self) -> Result<Vec<(String, Declared)>>;
    /// The footprints jobs left, by "repository|platform".
    fn footprints(&self) -> Result<Vec<(String, crate::model::Footprint)>>;
    /// The result cache's entry under `key`, if any.
    fn result_get(&self, key: &str) -> Result<Option<crate::resultcache::Entry>>;
    /// Stores result cache entries (a later build's replaces an earlier one's).
    fn result_put(&self, entries: &[crate::resultcache::Entry], now_ms: i64) -> Result<()>;
    fn cordons(&self) -> Result<Vec<String>>;
    fn context_delete(&self, digest: &str) -> Result<()>;
    fn context_touch(&self, digest: &str, now_ms: i64) -> Result<()>;
    fn token_insert(&self, t: &TokenRecord, hash: &str) -> Result<()>;
    fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>>;
    fn token_use(&self, id: &str) -> Result<bool>;
    fn token_revoke(&self, id: &str) -> Result<bool>;
    fn tokens(&self) -> Result<Vec<TokenRecord>>;
    fn cert_by_serial(&self, serial: &str) -> Result<Option<CertRow>>;
    fn current_cert(&self, name: &str) -> Result<Option<CertRow>>;
    fn enroll_with_token(&self, token_id: &str, single_use: bool, replace: bool, row: &CertRow) -> Result<JoinOutcome>;
    fn record_offline_cert(&self, row: &CertRow) -> Result<OfflineOutcome>;
    fn forget_agent(&self, name: &str, at: i64) -> Result<u32>;
}

impl Store {
    /// The embedded SQLite store at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        Ok(Store::Sqlite(Sqlite::open(path)?))
    }

    /// The store the settings name: SQLite in the data directory, or the
    /// PostgreSQL database (migrated to this version's schema).
    pub fn open_settings(settings: &crate::settings::Settings) -> Result<Store> {
        match settings.postgres().map_err(|e| CoordinatorError::InvalidArgument(e.to_string()))? {
            None => {
                std::fs::create_dir_all(&settings.data_dir)?;
                Store::open(&settings.data_dir.join("braid.db"))
            }
            Some(config) => Ok(Store::Postgres(Box::new(Postgres::open(config)?))),
        }
    }

    /// "sqlite" or "postgres", for /metrics and `braid status`.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    pub fn postgres(&self) -> Option<&Postgres> {
        match self {
            Store::Postgres(p) => Some(p),
            Store::Sqlite(_) => None,
        }
    }

    #[cfg(test)]
    pub fn limit_pages(&self, pages: u64) {
        if let Store::Sqlite(s) = self {
            s.limit_pages(pages)
        }
    }

    #[cfg(test)]
    pub fn refuse_writes(&self, on: bool) {
        if let Store::Sqlite(s) = self {
            s.refuse_writes(on)
        }
    }
}

/// Stored builds (id, record JSON, encoded spec), with each build's last
/// event number from the events table (log lines do not rewrite the
/// record), as both stores load them. A build an older version stored that
/// no longer parses is left out with a warning rather than keeping the
/// coordinator from starting.
pub(crate) fn decode_builds(
    rows: Vec<(String, String, Vec<u8>)>,
    last_seqs: &std::collections::HashMap<String, i64>,
) -> Vec<(BuildRecord, proto::BuildSpec)> {
    use prost::Message as _;
    let mut builds = Vec::with_capacity(rows.len());
    for (id, json, spec) in rows {
        let record = serde_json::from_str::<BuildRecord>(&json).map_err(|e| e.to_string()).map(|mut r| {
            let stored = last_seqs.get(&id).and_then(|s| u64::try_from(*s).ok()).unwrap_or(0);
            r.last_seq = r.last_seq.max(stored);
            r
        });
        let spec = proto::BuildSpec::decode(spec.as_slice()).map_err(|e| e.to_string());
        match (record, spec) {
            (Ok(record), Ok(spec)) => builds.push((record, spec)),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(build_id = %id, error = %e, "stored build skipped: it no longer parses")
            }
        }
    }
    builds
}
