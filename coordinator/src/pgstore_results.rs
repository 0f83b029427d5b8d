//! The PostgreSQL store's part of the result cache (store_results.rs is
//! SQLite's). A cache: an entry a deposed leader writes can only make a
//! later build check the registry for an image it then finds or not.

use crate::error::Result;
use crate::pgstore::{Postgres, pg_error};
use crate::resultcache::Entry;

/// Migration 3: the result cache.
pub const MIGRATION: &str = "
CREATE TABLE result_cache (
    key TEXT PRIMARY KEY, build_id TEXT NOT NULL, platform TEXT NOT NULL,
    image TEXT NOT NULL, provenance TEXT NOT NULL, stored BIGINT NOT NULL
);
CREATE INDEX result_cache_stored ON result_cache (stored);
";

impl Postgres {
    /// The entry stored under `key`, if any (one that no longer parses is none).
    pub fn result_get(&self, key: &str) -> Result<Option<Entry>> {
        let key = key.to_owned();
        self.with(move |c| {
            let row = c
                .query_opt("SELECT build_id, platform, image, provenance FROM result_cache WHERE key = $1", &[&key])
                .map_err(pg_error)?;
            let Some(row) = row else { return Ok(None) };
            let (image, provenance): (String, String) = (row.get(2), row.get(3));
            let (Ok(image), Ok(provenance)) = (serde_json::from_str(&image), serde_json::from_str(&provenance)) else {
                return Ok(None);
            };
            Ok(Some(Entry { key, build_id: row.get(0), platform: row.get(1), image, provenance }))
        })
    }

    /// Stores entries (a later build's result replaces an earlier one's).
    pub fn result_put(&self, entries: &[Entry], now_ms: i64) -> Result<()> {
        let rows: Vec<(String, String, String, String, String)> = entries
            .iter()
            .filter_map(|e| {
                let image = serde_json::to_string(&e.image).ok()?;
                let provenance = serde_json::to_string(&e.provenance).ok()?;
                Some((e.key.clone(), e.build_id.clone(), e.platform.clone(), image, provenance))
            })
            .collect();
        self.with(move |c| {
            let mut tx = c.transaction().map_err(pg_error)?;
            for (key, build_id, platform, image, provenance) in &rows {
                tx.execute(
                    "INSERT INTO result_cache (key, build_id, platform, image, provenance, stored) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (key) DO UPDATE SET build_id = $2, platform = $3, \
                     image = $4, provenance = $5, stored = $6",
                    &[key, build_id, platform, image, provenance, &now_ms],
                )
                .map_err(pg_error)?;
            }
            // Bounded: past the limit the oldest entries go.
            tx.execute(
                "DELETE FROM result_cache WHERE key IN (SELECT key FROM result_cache ORDER BY stored DESC OFFSET $1)",
                &[&(braid_shared::limits::RESULT_CACHE_ENTRIES as i64)],
            )
            .map_err(pg_error)?;
            tx.commit().map_err(pg_error)
        })
    }
}
