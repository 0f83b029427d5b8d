//! A build's `--secret` values: held with the build in memory only (see
//! `BuildEntry::secrets`), lost in a restart, sent again by the client.

use braid_shared::proto;

use super::{BuildEntry, Farm, FarmError, Result};
use crate::model::JobStatus;

impl Farm {
    /// A client sends a build's `--secret` values again (after a restart
    /// lost them). Values already held are kept. Returns whether the build
    /// now holds its values.
    pub fn provide_secrets(&mut self, build_id: &str, secrets: Vec<proto::SecretValue>) -> Result<bool> {
        self.build(build_id)?;
        let Some(b) = self.builds.get_mut(build_id) else {
            return Ok(false);
        };
        if b.record.status.is_terminal() {
            return Err(FarmError::FailedPrecondition(format!("build {build_id} has ended")));
        }
        if b.secrets_lost_ms.is_none() {
            return Ok(true);
        }
        b.secrets = secrets;
        b.secrets_lost_ms = None;
        tracing::info!(build_id, count = b.secrets.len(), "build's secret values provided again");
        Ok(true)
    }

    /// Why a build fails now because a restart lost its `--secret` values
    /// and no client sent them within the grace while a job waits for them.
    pub(super) fn secrets_expired(&self, b: &BuildEntry, now: i64) -> Option<String> {
        let lost = b.secrets_lost_ms?;
        if now - lost <= self.config.secrets_grace_ms || !b.record.jobs.iter().any(|j| j.status == JobStatus::Pending) {
            return None;
        }
        let ids: Vec<&str> = b.spec.secrets.iter().filter(|s| s.provided).map(|s| s.id.as_str()).collect();
        Some(format!(
            "the --secret values ({}) were lost when the coordinator restarted and no client sent them again \
             within {}s; submit the build again",
            ids.join(", "),
            self.config.secrets_grace_ms / 1000
        ))
    }
}
