//! The store's part of placement: agents' labels (beside their declared
//! platforms) and the footprints jobs leave, per repository and platform.

use rusqlite::{Transaction, params};

use braid_shared::placement::Labels;

use super::Sqlite;
use crate::error::Result;
use crate::model::Footprint;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS agent_labels (
    agent  TEXT PRIMARY KEY,
    labels TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS footprints (
    key       TEXT PRIMARY KEY,
    footprint TEXT NOT NULL,
    updated   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS footprints_updated ON footprints (updated);
";

pub(super) fn write_labels(tx: &Transaction<'_>, agent: &str, labels: Option<&Labels>) -> rusqlite::Result<()> {
    match labels {
        Some(l) => {
            // A map of strings always serializes.
            let json = serde_json::to_string(l).unwrap_or_default();
            tx.prepare_cached(
                "INSERT INTO agent_labels (agent, labels) VALUES (?1, ?2) ON CONFLICT (agent) DO UPDATE SET labels = ?2",
            )?
            .execute(params![agent, json])?;
        }
        None => {
            tx.execute("DELETE FROM agent_labels WHERE agent = ?1", params![agent])?;
        }
    }
    Ok(())
}

/// Stored labels; what does not parse (a newer version's) reads as none.
pub(super) fn read_labels(json: Option<String>) -> Labels {
    json.and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default()
}

pub(super) fn write_footprint(tx: &Transaction<'_>, key: &str, f: &Footprint, now: i64) -> rusqlite::Result<()> {
    let json = serde_json::to_string(f).unwrap_or_default();
    tx.prepare_cached(
        "INSERT INTO footprints (key, footprint, updated) VALUES (?1, ?2, ?3) \
         ON CONFLICT (key) DO UPDATE SET footprint = ?2, updated = ?3",
    )?
    .execute(params![key, json, now])?;
    // Bounded: past the limit the least recently updated go.
    tx.prepare_cached(
        "DELETE FROM footprints WHERE key IN (SELECT key FROM footprints ORDER BY updated DESC LIMIT -1 OFFSET ?1)",
    )?
    .execute(params![braid_shared::limits::FOOTPRINTS as i64])?;
    Ok(())
}

impl Sqlite {
    /// The footprints jobs left, by "repository|platform".
    pub fn footprints(&self) -> Result<Vec<(String, Footprint)>> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT key, footprint FROM footprints ORDER BY updated")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let rows: Vec<(String, String)> = rows.collect::<rusqlite::Result<_>>()?;
            Ok(rows.into_iter().filter_map(|(k, j)| serde_json::from_str(&j).ok().map(|f| (k, f))).collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{Declared, Footprint};
    use crate::store::Write;
    use crate::stores::Store;

    #[test]
    fn labels_and_footprints_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("braid.db");
        let store = Store::open(&path).unwrap();
        let labels = [("memory".to_owned(), "1GiB".to_owned())].into_iter().collect();
        let d =
            Declared { platforms: vec!["linux/arm/v7".parse().unwrap()], emulates: vec![], last_seen_ms: 5, labels };
        let f = Footprint {
            peak_memory_bytes: 1 << 29,
            cpu_millis: 1500,
            out_of_memory: false,
            memory_limit_bytes: 0,
            agent: "pi-01".into(),
        };
        store
            .write(&[
                Write::Declared("pi-01", Some(&d)),
                Write::Declared("pi-02", Some(&d)),
                Write::Footprint("reg/app|linux/arm/v7", &f, 1),
            ])
            .unwrap();
        store.write(&[Write::Declared("pi-02", None)]).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.declared().unwrap(), [("pi-01".to_owned(), d)]);
        assert_eq!(store.footprints().unwrap(), [("reg/app|linux/arm/v7".to_owned(), f)]);
    }
}
