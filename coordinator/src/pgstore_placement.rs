//! The PostgreSQL store's part of placement (store_placement.rs is
//! SQLite's): agents' labels beside their declared platforms, and the
//! footprints jobs leave per repository and platform.

use postgres::Transaction;

use braid_shared::placement::Labels;

use crate::error::Result;
use crate::model::Footprint;
use crate::pgstore::{Postgres, pg_error};

/// Migration 2: placement's tables.
pub const MIGRATION: &str = "
CREATE TABLE agent_labels (agent TEXT PRIMARY KEY, labels TEXT NOT NULL);
CREATE TABLE footprints (key TEXT PRIMARY KEY, footprint TEXT NOT NULL, updated BIGINT NOT NULL);
CREATE INDEX footprints_updated ON footprints (updated);
";

pub fn write_labels(tx: &mut Transaction<'_>, agent: &str, labels: Option<&Labels>) -> Result<(), postgres::Error> {
    match labels {
        Some(l) => {
            // A map of strings always serializes.
            let json = serde_json::to_string(l).unwrap_or_default();
            tx.execute(
                "INSERT INTO agent_labels (agent, labels) VALUES ($1, $2) ON CONFLICT (agent) DO UPDATE SET labels = $2",
                &[&agent, &json],
            )?;
        }
        None => {
            tx.execute("DELETE FROM agent_labels WHERE agent = $1", &[&agent])?;
        }
    }
    Ok(())
}

pub fn write_footprint(tx: &mut Transaction<'_>, key: &str, f: &Footprint, now: i64) -> Result<(), postgres::Error> {
    let json = serde_json::to_string(f).unwrap_or_default();
    tx.execute(
        "INSERT INTO footprints (key, footprint, updated) VALUES ($1, $2, $3) \
         ON CONFLICT (key) DO UPDATE SET footprint = $2, updated = $3",
        &[&key, &json, &now],
    )?;
    // Bounded: past the limit the least recently updated go.
    tx.execute(
        "DELETE FROM footprints WHERE key IN (SELECT key FROM footprints ORDER BY updated DESC OFFSET $1)",
        &[&(braid_shared::limits::FOOTPRINTS as i64)],
    )?;
    Ok(())
}

impl Postgres {
    /// The footprints jobs left, by "repository|platform".
    pub fn footprints(&self) -> Result<Vec<(String, Footprint)>> {
        self.with(|c| {
            let rows = c.query("SELECT key, footprint FROM footprints ORDER BY updated", &[]).map_err(pg_error)?;
            Ok(rows
                .iter()
                .filter_map(|r| {
                    let json: String = r.get(1);
                    serde_json::from_str(&json).ok().map(|f| (r.get(0), f))
                })
                .collect())
        })
    }
}
