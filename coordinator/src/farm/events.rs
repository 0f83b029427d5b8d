//! A build's events: numbered here, appended and shown to watchers by the
//! executor (`Effect::Append`), after they are written.

use braid_shared::proto::{self, build_event::Kind as EventKind};

use super::{BuildEntry, Effect, Farm, FarmError, Result, Subscription};
use crate::metrics::Metrics;
use crate::model::{BuildRecord, Caller, Image, JobRecord, timestamp};

impl Farm {
    /// Appends events to a build and stores its record: for changes of
    /// state.
    pub(super) fn emit(&mut self, build_id: &str, kinds: Vec<EventKind>) {
        self.append(build_id, kinds);
        if let Some(b) = self.builds.get(build_id) {
            self.out.push(Effect::Persist(Box::new(b.record.clone())));
        }
    }

    /// Appends events to a build without storing its record (log lines:
    /// the record's `last_seq` may lag, loading takes the events' own).
    pub(super) fn append(&mut self, build_id: &str, kinds: Vec<EventKind>) {
        let now = timestamp(self.now());
        let Some(b) = self.builds.get_mut(build_id) else {
            return;
        };
        let events: Vec<proto::BuildEvent> = kinds
            .into_iter()
            .map(|kind| {
                b.record.last_seq += 1;
                proto::BuildEvent {
                    seq: b.record.last_seq,
                    build_id: build_id.to_owned(),
                    time: Some(now),
                    kind: Some(kind),
                }
            })
            .collect();
        if b.record.status.is_terminal() {
            // A build that ended needs its secret values no more.
            for s in &mut b.secrets {
                zeroize::Zeroize::zeroize(&mut s.value);
            }
            b.secrets = Vec::new();
            b.secrets_lost_ms = None;
        }
        if b.record.status.is_terminal() && self.active.remove(build_id) {
            Self::observe_end(&self.metrics, &b.record, self.clock.now_ms());
        }
        self.out.push(Effect::Append { events, live: b.events.clone(), delivered: None });
    }

    /// Build duration and per-job results, once per build, when it ends.
    fn observe_end(metrics: &Metrics, record: &BuildRecord, now: i64) {
        let seconds = (record.finished_ms.unwrap_or(now) - record.created_ms) as f64 / 1000.0;
        metrics.observe("braid_build_duration_seconds", vec![("result", record.status.as_str().into())], seconds);
        for j in &record.jobs {
            let result = j.status.result_word();
            metrics.inc("braid_jobs_total", vec![("platform", j.platform.to_string()), ("result", result.into())]);
        }
    }

    pub(super) fn job_event(job: &JobRecord) -> EventKind {
        EventKind::Job(proto::JobStateChanged {
            job_id: job.id.clone(),
            platform: job.platform.to_string(),
            state: job.status.to_proto() as i32,
            agent: job.shown_agent().to_owned(),
            attempt: job.attempt,
            message: job.message.clone(),
            result: job.result.as_ref().map(Image::to_proto),
            emulated: job.emulated,
            failed_step: job.failed_step.as_ref().map(crate::model::FailedStep::to_proto),
        })
    }

    pub(super) fn build_event(record: &BuildRecord) -> EventKind {
        EventKind::Build(proto::BuildStateChanged {
            state: record.status.to_proto() as i32,
            message: record.message.clone(),
            index: record.index.as_ref().map(Image::to_proto),
        })
    }

    pub fn subscribe(&self, build_id: &str) -> Result<Subscription> {
        let b = self.build(build_id)?;
        Ok(Subscription {
            live: b.events.subscribe(),
            last_seq: b.record.last_seq,
            terminal: b.record.status.is_terminal(),
        })
    }

    /// A build the caller may see: its own, or any for an operator.
    pub fn build_for(&self, build_id: &str, caller: &Caller) -> Result<&BuildEntry> {
        let b = self.build(build_id)?;
        if !caller.owns(b.record.owner.as_deref()) {
            return Err(FarmError::PermissionDenied(format!(
                "build {build_id} was submitted with another token; the submit role sees only its own"
            )));
        }
        Ok(b)
    }

    pub fn build(&self, build_id: &str) -> Result<&BuildEntry> {
        self.builds
            .get(build_id)
            .ok_or_else(|| FarmError::NotFound(format!("build {:?} not found", braid_shared::shorten(build_id, 80))))
    }
}
