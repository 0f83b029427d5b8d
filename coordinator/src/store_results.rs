//! The SQLite store's part of the result cache (issue 22): one platform's
//! earlier image by its key (resultcache.rs), at most
//! `limits::RESULT_CACHE_ENTRIES` of them.

use rusqlite::{OptionalExtension, params};

use crate::error::Result;
use crate::resultcache::Entry;
use crate::store::Sqlite;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS result_cache (
    key        TEXT PRIMARY KEY,
    build_id   TEXT NOT NULL,
    platform   TEXT NOT NULL,
    image      TEXT NOT NULL,
    provenance TEXT NOT NULL,
    stored     INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS result_cache_stored ON result_cache (stored);
";

impl Sqlite {
    /// The entry stored under `key`, if any (one that no longer parses is none).
    pub fn result_get(&self, key: &str) -> Result<Option<Entry>> {
        let row: Option<(String, String, String, String)> = self.with(|c| {
            c.query_row(
                "SELECT build_id, platform, image, provenance FROM result_cache WHERE key = ?1",
                params![key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
        })?;
        let Some((build_id, platform, image, provenance)) = row else { return Ok(None) };
        let (Ok(image), Ok(provenance)) = (serde_json::from_str(&image), serde_json::from_str(&provenance)) else {
            return Ok(None);
        };
        Ok(Some(Entry { key: key.to_owned(), build_id, platform, image, provenance }))
    }

    /// Stores entries (a later build's result replaces an earlier one's).
    pub fn result_put(&self, entries: &[Entry], now_ms: i64) -> Result<()> {
        let rows: Vec<(&Entry, String, String)> = entries
            .iter()
            .filter_map(|e| {
                Some((e, serde_json::to_string(&e.image).ok()?, serde_json::to_string(&e.provenance).ok()?))
            })
            .collect();
        self.with(|c| {
            let tx = c.transaction()?;
            for (e, image, provenance) in &rows {
                tx.execute(
                    "INSERT INTO result_cache (key, build_id, platform, image, provenance, stored)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT(key) DO UPDATE SET build_id = excluded.build_id, platform = excluded.platform,
                       image = excluded.image, provenance = excluded.provenance, stored = excluded.stored",
                    params![e.key, e.build_id, e.platform, image, provenance, now_ms],
                )?;
            }
            // Bounded: past the limit the oldest entries go.
            tx.execute(
                "DELETE FROM result_cache WHERE key IN \
                 (SELECT key FROM result_cache ORDER BY stored DESC LIMIT -1 OFFSET ?1)",
                params![braid_shared::limits::RESULT_CACHE_ENTRIES as i64],
            )?;
            tx.commit()
        })
    }
}
