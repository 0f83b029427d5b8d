//! What agents say about their jobs: log lines, progress and results,
//! each applied once (see `accept`) and acknowledged.

use braid_shared::proto::{self, build_event::Kind as EventKind};

use super::{Effect, Effects, Farm};
use crate::model::{FailedStep, JobProvenance, JobStatus, Phase, PhaseRecord, from_timestamp};

impl Farm {
    pub fn job_log(&mut self, name: &str, session: u64, log: proto::JobLog) -> Effects {
        self.job_log_inner(name, session, log);
        self.mark_delivered(name);
        self.take()
    }

    fn job_log_inner(&mut self, name: &str, session: u64, log: proto::JobLog) {
        let Some(build_id) = self.build_of_job(&log.job_id) else {
            return;
        };
        if !self.leased_to(name, session, &build_id, &log.job_id, log.attempt, None) {
            return;
        }
        use braid_shared::limits::{JOB_LOG_BYTES, LOG_LINE_BYTES};
        let max_events = self.max_build_events;
        let Some(b) = self.builds.get_mut(&build_id) else { return };
        let room = max_events.saturating_sub(b.record.last_seq + 1);
        let Some(job) = b.record.jobs.iter_mut().find(|j| j.id == log.job_id) else { return };
        if job.log_cut {
            // Counted in memory; the record is stored when the result's
            // notice says how many.
            job.log_dropped += log.lines.len() as u64;
            return;
        }
        let platform = job.platform.to_string();
        let bytes_before = job.log_bytes;
        let mut kinds = Vec::new();
        let total = log.lines.len();
        for (i, line) in log.lines.into_iter().enumerate() {
            let line = braid_shared::shorten(&line, LOG_LINE_BYTES);
            let over_bytes = job.log_bytes + line.len() as u64 > JOB_LOG_BYTES as u64;
            if over_bytes || kinds.len() as u64 >= room {
                job.log_cut = true;
                job.log_dropped = (total - i) as u64;
                let why = if over_bytes {
                    format!("{} MiB per job", JOB_LOG_BYTES >> 20)
                } else {
                    format!("{max_events} events per build")
                };
                kinds.push(EventKind::Notice(proto::Notice {
                    platform: platform.clone(),
                    text: format!(
                        "log of {platform} cut at the limit of {why}; later lines are dropped and counted at the end"
                    ),
                }));
                break;
            }
            job.log_bytes += line.len() as u64;
            kinds.push(EventKind::Log(proto::LogLine { platform: platform.clone(), line }));
        }
        // Log lines leave the record as it is; a cut is a change worth
        // keeping, and so is each MiB logged (after a restart, a job's log
        // count is at most that much behind).
        let keep = job.log_cut || job.log_bytes >> 20 != bytes_before >> 20;
        self.append(&build_id, kinds);
        if keep && let Some(b) = self.builds.get(&build_id) {
            self.out.push(Effect::Persist(Box::new(b.record.clone())));
        }
    }

    /// Says once how many lines of a cut log were dropped (when the
    /// attempt's result comes).
    fn say_dropped_lines(&mut self, build_id: &str, job_id: &str) {
        let Some(job) = self.job_mut(build_id, job_id) else { return };
        if job.log_dropped == 0 {
            return;
        }
        let (platform, dropped) = (job.platform.to_string(), std::mem::take(&mut job.log_dropped));
        let text = format!("log of {platform}: {dropped} more lines dropped after the cut");
        self.emit(build_id, vec![EventKind::Notice(proto::Notice { platform, text })]);
    }

    pub fn job_progress(&mut self, name: &str, session: u64, progress: proto::JobProgress) -> Effects {
        self.job_progress_inner(name, session, progress);
        self.mark_delivered(name);
        self.take()
    }

    fn job_progress_inner(&mut self, name: &str, session: u64, progress: proto::JobProgress) {
        let Some(build_id) = self.build_of_job(&progress.job_id) else {
            return;
        };
        if !self.leased_to(name, session, &build_id, &progress.job_id, progress.attempt, None) {
            return;
        }
        let Some(job) = self.job_mut(&build_id, &progress.job_id) else {
            return;
        };
        if progress.state == proto::JobState::Building as i32
            && let JobStatus::Assigned { agent, lease } = &job.status
        {
            job.status = JobStatus::Building { agent: agent.clone(), lease: lease.clone() };
            let event = Self::job_event(job);
            self.emit(&build_id, vec![event]);
        }
    }

    /// Takes an agent's result for a job it holds; stale results are ignored.
    pub fn job_result(&mut self, name: &str, session: u64, result: proto::JobResult) -> Effects {
        self.job_result_inner(name, session, result);
        self.mark_delivered(name);
        self.take()
    }

    fn job_result_inner(&mut self, name: &str, session: u64, result: proto::JobResult) {
        let Some(build_id) = self.build_of_job(&result.job_id) else {
            return;
        };
        // The slot is free whatever the result says.
        if let Some(agent) = self.agents.get_mut(name) {
            agent.running.remove(&(build_id.clone(), result.job_id.clone()));
        }
        if !self.leased_to(name, session, &build_id, &result.job_id, result.attempt, Some(&result.lease_id)) {
            self.keep_stopped_phases(&build_id, name, &result);
            tracing::info!(build_id, job_id = result.job_id, agent = name, "ignoring a result for a stale lease");
            return;
        }
        let job_id = result.job_id.clone();
        self.say_dropped_lines(&build_id, &job_id);
        self.record_agent_phases(&build_id, &job_id, &result.phases);
        if let Some(f) = &result.footprint {
            self.record_footprint(&build_id, &job_id, name, f);
            let cancelled = matches!(&result.outcome, Some(proto::job_result::Outcome::Failure(f))
                if f.kind == proto::FailureKind::Cancelled as i32);
            if f.out_of_memory && !cancelled && !matches!(result.outcome, Some(proto::job_result::Outcome::Image(_))) {
                return self.out_of_memory(&build_id, &job_id, name, f);
            }
        }
        match result.outcome {
            Some(proto::job_result::Outcome::Image(image)) => {
                self.record_provenance(&build_id, &job_id, name, result.provenance);
                self.image_built(&build_id, &job_id, name, image)
            }
            Some(proto::job_result::Outcome::Failure(f)) => {
                let kind = proto::FailureKind::try_from(f.kind).unwrap_or(proto::FailureKind::Infra);
                match kind {
                    proto::FailureKind::Build => {
                        if let Some(job) = self.job_mut(&build_id, &job_id) {
                            job.failed_step = f.failed_step.as_ref().and_then(FailedStep::from_proto);
                        }
                        self.fail_build(&build_id, &job_id, f.message);
                    }
                    proto::FailureKind::Cancelled => {}
                    _ => self.requeue(&build_id, &job_id, &format!("agent {name}: {}", f.message)),
                }
            }
            None => self.requeue(&build_id, &job_id, &format!("agent {name} sent an empty result")),
        }
    }

    /// Keeps what the agent reported of the attempt's inputs, with what
    /// the farm knows of the agent (its certificate and builder).
    fn record_provenance(&mut self, build_id: &str, job_id: &str, agent: &str, report: Option<proto::JobProvenance>) {
        let about = self.agents.get(agent).map(|a| {
            let identity = a.cert.as_ref().map(|c| format!("OU=agent,CN={agent} serial {}", c.serial));
            let (builder, version) = match &a.builder {
                Some(b) => (b.name.clone(), b.version.clone()),
                None => (a.backend.clone(), String::new()),
            };
            (identity.unwrap_or_default(), builder, version)
        });
        let Some(job) = self.job_mut(build_id, job_id) else { return };
        job.provenance = report.map(|r| {
            let mut p = JobProvenance::from_report(r);
            if let Some((identity, builder, version)) = about {
                (p.agent_identity, p.builder_name, p.builder_version) = (identity, builder, version);
            }
            p
        });
    }

    /// A job stopped under its agent (cancelled, or failed with its build)
    /// keeps the phases that attempt ran, up to the stop, once: the
    /// timeline shows where it was.
    fn keep_stopped_phases(&mut self, build_id: &str, name: &str, result: &proto::JobResult) {
        let Some(job) = self.job_mut(build_id, &result.job_id) else { return };
        let stopped = matches!(job.status, JobStatus::Cancelled | JobStatus::Failed);
        let agent_phases = job.phases.iter().any(|p| Phase::of_agent(p.phase.as_str()).is_some());
        if !stopped || agent_phases || job.attempt != result.attempt || job.last_agent != name {
            return;
        }
        self.record_agent_phases(build_id, &result.job_id, &result.phases);
        if let Some(b) = self.builds.get(build_id) {
            self.out.push(Effect::Persist(Box::new(b.record.clone())));
        }
    }

    /// Keeps the agent's phase times (bounded, known phases only) and
    /// observes them.
    fn record_agent_phases(&mut self, build_id: &str, job_id: &str, phases: &[proto::PhaseTiming]) {
        let now = self.now();
        let metrics = self.metrics.clone();
        let Some(job) = self.job_mut(build_id, job_id) else { return };
        job.result_ms = Some(now);
        let ms = |t: &Option<prost_types::Timestamp>| t.as_ref().map(from_timestamp);
        for p in phases.iter().take(8) {
            let Some(phase) = Phase::of_agent(&p.phase) else { continue };
            let (Some(start_ms), Some(end_ms)) = (ms(&p.start), ms(&p.end)) else { continue };
            if end_ms < start_ms {
                continue;
            }
            let record = PhaseRecord { phase, start_ms, end_ms };
            metrics.observe(
                "braid_job_phase_seconds",
                vec![("platform", job.platform.to_string()), ("phase", phase.as_str().into())],
                record.seconds(),
            );
            job.phases.push(record);
        }
    }
}
