//! The builds table: submission, placement, results, verification,
//! merging, failure and cancellation.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::broadcast;

use braid_shared::capability::CapSet;
use braid_shared::oci::{Credential, ImageDescriptor};
use braid_shared::placement::{self, Requirement};
use braid_shared::proto::{self, build_event::Kind as EventKind};
use braid_shared::{ImageRef, Platform};

use super::{BuildEntry, Effect, Effects, Farm, MergeInputs, Result};
use crate::model::{BuildRecord, BuildStatus, Image, IndexFormat, JobRecord, JobStatus, Phase, PhaseRecord, timestamp};

/// A build made but not yet in the farm: stored first, then admitted.
pub struct NewBuild {
    entry: BuildEntry,
    first: proto::BuildEvent,
    /// Jobs answered from the result cache, applied at `admit`.
    reused: Vec<(String, crate::resultcache::Entry)>,
}

impl NewBuild {
    /// What is stored: its record, its spec and its first event.
    pub fn parts(&self) -> (&BuildRecord, &proto::BuildSpec, &proto::BuildEvent) {
        (&self.entry.record, &self.entry.spec, &self.first)
    }

    /// Its jobs: (job id, platform).
    pub fn jobs(&self) -> Vec<(String, Platform)> {
        self.entry.record.jobs.iter().map(|j| (j.id.clone(), j.platform.clone())).collect()
    }

    pub fn spec(&self) -> &proto::BuildSpec {
        &self.entry.spec
    }

    /// The repositories its images go to (checked before reusing a result).
    pub fn push_repositories(&self) -> Vec<ImageRef> {
        self.entry.push_repositories()
    }

    /// Each job's result-cache key (job id -> key).
    pub fn set_result_keys(&mut self, keys: HashMap<String, String>) {
        self.entry.result_keys = keys;
    }

    /// Answers a job with an earlier build's image (checked still valid).
    pub fn reuse(&mut self, job_id: &str, entry: crate::resultcache::Entry) {
        self.entry.result_keys.remove(job_id);
        self.reused.push((job_id.to_owned(), entry));
    }
}
use crate::scheduler::{self, AgentView, QueuedJob};

impl Farm {
    /// Makes a validated build, one pending job per platform, with its
    /// first event; the build joins the farm at `admit`, once stored.
    pub fn new_build(
        &mut self,
        spec: proto::BuildSpec,
        platforms: Vec<Platform>,
        tags: Vec<ImageRef>,
        owner: Option<String>,
        credentials: Vec<Credential>,
        secrets: Vec<proto::SecretValue>,
    ) -> NewBuild {
        let now = self.now();
        let id = uuid::Uuid::new_v4().simple().to_string();
        let jobs =
            platforms.into_iter().map(|p| JobRecord::new(uuid::Uuid::new_v4().simple().to_string(), p, now)).collect();
        let record = BuildRecord {
            id: id.clone(),
            order: self.next_order,
            created_ms: now,
            finished_ms: None,
            status: BuildStatus::Queued,
            message: String::new(),
            jobs,
            index: None,
            last_seq: 1,
            owner,
            merge_started_ms: None,
        };
        self.next_order += 1;
        let first = proto::BuildEvent {
            seq: 1,
            build_id: id,
            time: Some(timestamp(now)),
            kind: Some(Self::build_event_of(BuildStatus::Queued)),
        };
        let (events, _) = broadcast::channel(1024);
        NewBuild {
            entry: BuildEntry {
                record,
                spec,
                tags,
                events,
                credentials,
                secrets,
                secrets_lost_ms: None,
                result_keys: HashMap::new(),
            },
            first,
            reused: Vec::new(),
        }
    }

    /// Puts a stored build in the farm, to be scheduled. Returns its id.
    pub fn admit(&mut self, new: NewBuild) -> (String, Effects) {
        let id = new.entry.record.id.clone();
        for j in &new.entry.record.jobs {
            self.job_index.insert(j.id.clone(), id.clone());
        }
        self.active.insert(id.clone());
        self.builds.insert(id.clone(), new.entry);
        // Before any scheduling pass: a reused job is never offered to an agent.
        for (job_id, entry) in new.reused {
            self.reuse_result(&id, &job_id, entry);
        }
        (id, self.take())
    }

    /// A job answered from the result cache: verified at once with the
    /// earlier build's image and provenance; the merge runs as usual.
    fn reuse_result(&mut self, build_id: &str, job_id: &str, entry: crate::resultcache::Entry) {
        let now = self.now();
        let Some(job) = self.job_mut(build_id, job_id) else { return };
        let short = &entry.build_id[..entry.build_id.len().min(8)];
        let platform = job.platform.to_string();
        let text = format!("{platform}: unchanged since build {}, reusing {}", entry.build_id, entry.image.digest);
        job.status = JobStatus::Verified { agent: format!("cache:{short}") };
        job.message = text.clone();
        job.result = Some(entry.image);
        job.provenance = Some(entry.provenance);
        job.started_ms = Some(now);
        job.finished_ms = Some(now);
        let event = Self::job_event(job);
        tracing::info!(build_id, job_id, from = entry.build_id, "result reused");
        self.emit(build_id, vec![EventKind::Notice(proto::Notice { platform, text }), event]);
        self.maybe_merge(build_id)
    }

    /// What a succeeded build stores in the result cache: each job an agent
    /// built whose provenance names every base image's digest.
    pub fn result_entries(&self, build_id: &str) -> Vec<crate::resultcache::Entry> {
        let Some(b) = self.builds.get(build_id).filter(|b| b.record.status == BuildStatus::Succeeded) else {
            return Vec::new();
        };
        b.record
            .jobs
            .iter()
            .filter(|j| crate::resultcache::storable(j.provenance.as_ref()))
            .filter_map(|j| {
                Some(crate::resultcache::Entry {
                    key: b.result_keys.get(&j.id)?.clone(),
                    build_id: build_id.to_owned(),
                    platform: j.platform.to_string(),
                    image: j.result.clone()?,
                    provenance: j.provenance.clone()?,
                })
            })
            .collect()
    }

    fn build_event_of(state: BuildStatus) -> EventKind {
        EventKind::Build(proto::BuildStateChanged {
            state: state.to_proto() as i32,
            message: String::new(),
            index: None,
        })
    }

    /// Places what can be placed; sends assignments; notes platforms that
    /// no connected agent builds.
    pub fn schedule(&mut self) -> Effects {
        // Most wake-ups (results, logs) find nothing queued: skip the views.
        let anything_pending = self.active.iter().filter_map(|id| self.builds.get(id)).any(|b| {
            b.record.status != BuildStatus::Merging && b.record.jobs.iter().any(|j| j.status == JobStatus::Pending)
        });
        if !anything_pending {
            return Vec::new();
        }
        let mut queue = Vec::new();
        let mut waiting: Vec<(String, String, Platform, bool)> = Vec::new();
        let views: Vec<AgentView> = self
            .agents
            .values()
            .filter(|a| a.connected)
            .map(|a| AgentView {
                name: &a.name,
                platforms: &a.platforms,
                emulates: &a.emulates,
                slots: a.slots,
                running: a.running.len() as u32,
                schedulable: !a.cordoned && !a.draining,
                capabilities: a.builder.as_ref().map(|b| b.capabilities).unwrap_or_default(),
                labels: &a.labels,
                memory: super::placement::free_memory(a.memory_label, a.health.as_ref()),
            })
            .collect();
        // Whether any agent serves a platform, asked once per pass, not per job.
        let mut served_by: HashMap<(&Platform, bool, CapSet, Vec<Requirement>), bool> = HashMap::new();
        for b in self.active.iter().filter_map(|id| self.builds.get(id)) {
            // A build whose --secret values a restart lost waits for them.
            if b.record.status.is_terminal() || b.record.status == BuildStatus::Merging || b.lacks_secrets() {
                continue;
            }
            let requirements = super::placement::requirements(&b.spec);
            for j in b.record.jobs.iter().filter(|j| j.status == JobStatus::Pending) {
                let mut requires: Vec<Requirement> =
                    requirements.iter().filter(|r| r.applies_to(&j.platform)).cloned().collect();
                if j.memory_floor != 0 {
                    // After running out of memory: only a larger agent.
                    requires.extend(placement::parse_requirement(&format!("memory>{}", j.memory_floor)).ok());
                }
                let key = b.affinity_key(&j.platform);
                queue.push(QueuedJob {
                    job_id: j.id.clone(),
                    build_order: b.record.order,
                    platform: j.platform.clone(),
                    affinity_key: b.affinity_key(&j.platform),
                    allow_emulation: b.spec.allow_emulation,
                    submitter: b.record.owner.clone().unwrap_or_default(),
                    // Validated at submit; a stored spec's names are ours.
                    needs: CapSet::parse(&b.spec.needs).unwrap_or_default(),
                    requires: requires.clone(),
                    prefer_memory: self.preferred_memory(&key),
                });
                let needs = queue.last().map(|q| q.needs).unwrap_or_default();
                if j.waiting_noticed {
                    continue;
                }
                // Cordoned and stopping agents do not count: they take nothing new.
                let served_key = (&j.platform, b.spec.allow_emulation, needs, requires);
                let served = *served_by.entry(served_key.clone()).or_insert_with(|| {
                    views.iter().any(|a| {
                        a.schedulable
                            && a.meets(needs, &served_key.3)
                            && (a.builds(&j.platform) || (b.spec.allow_emulation && a.emulates(&j.platform)))
                    })
                });
                if !served {
                    waiting.push((b.record.id.clone(), j.id.clone(), j.platform.clone(), b.spec.allow_emulation));
                }
            }
        }
        let placements =
            if queue.is_empty() { Vec::new() } else { scheduler::assign(&queue, &views, &self.last_agent) };
        drop(views);
        for (build_id, job_id, platform, allow_emulation) in waiting {
            let text = self.waiting_text(&platform, allow_emulation);
            if let Some(j) = self.job_mut(&build_id, &job_id) {
                j.waiting_noticed = true;
            }
            self.emit(&build_id, vec![EventKind::Notice(proto::Notice { platform: platform.to_string(), text })]);
        }
        for placement in placements {
            if let Some(build_id) = self.build_of_job(&placement.job_id) {
                self.lease(&build_id, &placement.job_id, &placement.agent, placement.emulated);
            }
        }
        self.take()
    }

    fn lease(&mut self, build_id: &str, job_id: &str, agent_name: &str, emulated: bool) {
        let lease = uuid::Uuid::new_v4().simple().to_string();
        let insecure = self.config.insecure_registries.clone();
        let now = self.now();
        // Every credential the build forwarded (for its tags' registries and
        // its --cache-from/--cache-to refs'), then the configured ones.
        let credentials: Vec<proto::RegistryCredential> =
            self.credentials_for(build_id).iter().map(proto::RegistryCredential::from).collect();
        let Some(b) = self.builds.get_mut(build_id) else {
            return;
        };
        // Every attempt, retries too, carries the values (memory only).
        let secrets = b.secrets.clone();
        let push_repositories: Vec<String> =
            if b.spec.push { b.push_repositories().iter().map(ImageRef::name).collect() } else { Vec::new() };
        let spec = b.spec.clone();
        let first_start = b.record.status == BuildStatus::Queued;
        if first_start {
            b.record.status = BuildStatus::Running;
        }
        let Some(job) = b.record.jobs.iter_mut().find(|j| j.id == job_id) else {
            return;
        };
        job.attempt += 1;
        job.status = JobStatus::Assigned { agent: agent_name.to_owned(), lease: lease.clone() };
        let queued =
            PhaseRecord { phase: Phase::Queued, start_ms: job.queued_ms.unwrap_or(b.record.created_ms), end_ms: now };
        let platform_label = job.platform.to_string();
        self.metrics.observe(
            "braid_job_phase_seconds",
            vec![("platform", platform_label.clone()), ("phase", Phase::Queued.as_str().into())],
            queued.seconds(),
        );
        if emulated {
            self.metrics.inc("braid_jobs_emulated_total", vec![("platform", platform_label)]);
        }
        job.phases = vec![queued];
        job.result_ms = None;
        job.last_agent = agent_name.to_owned();
        job.emulated = emulated;
        job.started_ms.get_or_insert(now);
        job.waiting_noticed = false;
        let assignment = proto::Assignment {
            job_id: job_id.to_owned(),
            build_id: build_id.to_owned(),
            attempt: job.attempt,
            lease_id: lease,
            platform: job.platform.to_string(),
            spec: Some(spec),
            push_repositories,
            insecure_registries: insecure,
            emulated,
            credentials,
            secrets,
        };
        let mut events = vec![Self::job_event(job)];
        if first_start {
            events.insert(0, Self::build_event(&b.record));
        }
        let syntax = assignment.spec.as_ref().map(|s| s.syntax_directive.as_str()).unwrap_or_default();
        events.extend(crate::needs::syntax_notice(syntax, &assignment.platform, self.agents.get(agent_name)));
        if let Some(agent) = self.agents.get_mut(agent_name) {
            agent.running.insert((build_id.to_owned(), job_id.to_owned()));
            if agent.connected {
                self.out.push(Effect::Assign { session: agent.session, assignment: Box::new(assignment) });
            }
        }
        tracing::info!(build_id, job_id, agent = agent_name, "job assigned");
        self.emit(build_id, events)
    }

    /// Fails builds past their `--timeout` and jobs that waited longer than
    /// `queue_timeout` for an agent.
    pub fn check_timeouts(&mut self, queue_timeout: Option<Duration>) -> Effects {
        self.check_timeouts_inner(queue_timeout);
        self.take()
    }

    fn check_timeouts_inner(&mut self, queue_timeout: Option<Duration>) {
        let now = self.now();
        let mut expired: Vec<(String, String, String)> = Vec::new();
        for b in self.active.iter().filter_map(|id| self.builds.get(id)).filter(|b| !b.record.status.is_terminal()) {
            let limit = b.spec.timeout_seconds;
            let limit_ms = i64::try_from(limit.saturating_mul(1000)).unwrap_or(i64::MAX);
            if limit > 0 && now - b.record.created_ms > limit_ms {
                expired.push((b.record.id.clone(), String::new(), format!("timed out after {limit}s (--timeout)")));
                continue;
            }
            if let Some(message) = self.secrets_expired(b, now) {
                expired.push((b.record.id.clone(), String::new(), message));
                continue;
            }
            let Some(wait) = queue_timeout else { continue };
            for j in b.record.jobs.iter().filter(|j| j.status == JobStatus::Pending) {
                let since = j.queued_ms.unwrap_or(b.record.created_ms);
                if now - since > wait.as_millis() as i64 {
                    let message = format!("no agent took the job within {}s (queue_timeout_seconds)", wait.as_secs());
                    expired.push((b.record.id.clone(), j.id.clone(), message));
                    break;
                }
            }
        }
        for (build_id, job_id, message) in expired {
            self.fail_build(&build_id, &job_id, message);
        }
    }

    /// Puts a leased job back in the queue, or fails it after too many attempts.
    pub(super) fn requeue(&mut self, build_id: &str, job_id: &str, why: &str) {
        let max = self.config.max_attempts;
        let metrics = self.metrics.clone();
        let now = self.now();
        let Some(job) = self.job_mut(build_id, job_id) else {
            return;
        };
        if job.status.leased().is_none() {
            return;
        }
        if job.attempt >= max {
            let message = format!("{why}; gave up after {max} attempts");
            return self.fail_build(build_id, job_id, message);
        }
        job.status = JobStatus::Pending;
        job.queued_ms = Some(now);
        metrics.inc("braid_job_retries_total", vec![("platform", job.platform.to_string())]);
        job.message = format!("{why}; re-queued");
        let event = Self::job_event(job);
        tracing::info!(build_id, job_id, why, "job re-queued");
        self.emit(build_id, vec![event])
    }

    pub(super) fn image_built(&mut self, build_id: &str, job_id: &str, agent: &str, image: proto::ImageResult) {
        let now = self.now();
        let Some(b) = self.builds.get_mut(build_id) else {
            return;
        };
        let verify_in = b.verify_in();
        let affinity = b.tags.first().map(ImageRef::name);
        let Some(job) = b.record.jobs.iter_mut().find(|j| j.id == job_id) else {
            return;
        };
        let image = match Image::from_proto(image) {
            Ok(image) => image,
            Err(e) => {
                let message = format!("pushed image refused: {e}");
                return self.fail_build(build_id, job_id, message);
            }
        };
        let digest = image.digest.clone();
        job.result = Some(image);
        if let Some(repo) = affinity {
            let key = format!("{repo}|{}", job.platform);
            self.last_agent.insert(key, agent.to_owned());
        }
        let platform = job.platform.clone();
        if let Some(at) = verify_in {
            job.status = JobStatus::Pushed { agent: agent.to_owned() };
            let event = Self::job_event(job);
            self.emit(build_id, vec![event]);
            self.out.push(Effect::Verify {
                build_id: build_id.to_owned(),
                job_id: job_id.to_owned(),
                at,
                digest,
                platform,
            });
            return;
        }
        // Nothing was pushed or uploaded, so there is nothing to verify.
        job.status = JobStatus::Verified { agent: agent.to_owned() };
        job.finished_ms = Some(now);
        let event = Self::job_event(job);
        self.emit(build_id, vec![event]);
        self.maybe_merge(build_id)
    }

    /// The registry check of a pushed image finished.
    pub fn verified(&mut self, build_id: &str, job_id: &str, outcome: Result<ImageDescriptor, String>) -> Effects {
        self.verified_inner(build_id, job_id, outcome);
        self.take()
    }

    fn verified_inner(&mut self, build_id: &str, job_id: &str, outcome: Result<ImageDescriptor, String>) {
        let metrics = self.metrics.clone();
        let now = self.now();
        let Some(job) = self.job_mut(build_id, job_id) else {
            return;
        };
        let JobStatus::Pushed { agent } = job.status.clone() else {
            return;
        };
        match outcome {
            Ok(descriptor) => {
                // The registry's descriptor, with the config digest the agent reported.
                let config_digest = job.result.as_ref().and_then(|r| r.config_digest.clone());
                job.result = Some(Image { config_digest, ..Image::from(descriptor) });
                job.status = JobStatus::Verified { agent };
                job.finished_ms = Some(now);
                let verify = PhaseRecord { phase: Phase::Verify, start_ms: job.result_ms.unwrap_or(now), end_ms: now };
                metrics.observe(
                    "braid_job_phase_seconds",
                    vec![("platform", job.platform.to_string()), ("phase", Phase::Verify.as_str().into())],
                    verify.seconds(),
                );
                job.phases.push(verify);
                let event = Self::job_event(job);
                self.emit(build_id, vec![event]);
                self.maybe_merge(build_id)
            }
            Err(message) => {
                self.fail_build(build_id, job_id, format!("pushed image refused: {message}"));
            }
        }
    }

    fn maybe_merge(&mut self, build_id: &str) {
        let now = self.now();
        let Some(b) = self.builds.get_mut(build_id) else {
            return;
        };
        if b.record.status.is_terminal()
            || !b.record.jobs.iter().all(|j| matches!(j.status, JobStatus::Verified { .. }))
        {
            return;
        }
        if !b.spec.push && !b.spec.export {
            b.record.status = BuildStatus::Succeeded;
            b.record.finished_ms = Some(now);
            let event = Self::build_event(&b.record);
            self.emit(build_id, vec![event]);
            return;
        }
        b.record.status = BuildStatus::Merging;
        b.record.merge_started_ms = Some(now);
        let event = Self::build_event(&b.record);
        self.emit(build_id, vec![event]);
        self.out.push(Effect::Merge { build_id: build_id.to_owned() });
    }

    /// What a merge needs: tags, push repositories and each platform's image.
    pub fn merge_inputs(&self, build_id: &str) -> Option<MergeInputs> {
        let b = self.builds.get(build_id)?;
        let images =
            b.record.jobs.iter().map(|j| Some((j.platform.clone(), j.result.clone()?))).collect::<Option<Vec<_>>>()?;
        Some(MergeInputs {
            tags: b.tags.clone(),
            pushed_to: b.push_repositories(),
            images,
            annotations: b.spec.annotations.clone(),
            push: b.spec.push,
            export: b.spec.export,
            format: IndexFormat::parse(&b.spec.format)?,
            provenance: crate::attest::statements(b),
        })
    }

    pub fn merged(&mut self, build_id: &str, outcome: Result<ImageDescriptor, String>) -> Effects {
        self.merged_inner(build_id, outcome);
        self.take()
    }

    fn merged_inner(&mut self, build_id: &str, outcome: Result<ImageDescriptor, String>) {
        let now = self.now();
        let Some(b) = self.builds.get_mut(build_id) else {
            return;
        };
        if b.record.status != BuildStatus::Merging {
            return;
        }
        if let Some(started) = b.record.merge_started_ms {
            self.metrics.observe("braid_build_merge_seconds", vec![], (now - started) as f64 / 1000.0);
        }
        match outcome {
            Ok(index) => {
                b.record.status = BuildStatus::Succeeded;
                tracing::info!(build_id, index = %index.digest, "build succeeded");
                b.record.index = Some(Image::from(index));
            }
            Err(message) => {
                b.record.status = BuildStatus::Failed;
                b.record.message = format!("pushing the index: {message}");
                tracing::warn!(build_id, %message, "merge failed");
            }
        }
        b.record.finished_ms = Some(now);
        let event = Self::build_event(&b.record);
        self.emit(build_id, vec![event]);
    }

    /// Fails a build because of one job: the job fails (`message` says
    /// why, without its platform: the build's message adds it), the others
    /// are cancelled, and no index is pushed.
    pub(super) fn fail_build(&mut self, build_id: &str, job_id: &str, message: String) {
        let now = self.now();
        let Some(b) = self.builds.get_mut(build_id) else {
            return;
        };
        if b.record.status.is_terminal() {
            return;
        }
        let mut events = Vec::new();
        // The job says why; the build, which platform and why.
        let mut message = message;
        if let Some(job) = b.record.jobs.iter_mut().find(|j| j.id == job_id) {
            job.status = JobStatus::Failed;
            job.message = message.clone();
            job.finished_ms = Some(now);
            events.push(Self::job_event(job));
            message = format!("{}: {message}", job.platform);
        }
        let pushed: Vec<String> = b
            .record
            .jobs
            .iter()
            .filter_map(|j| Some(format!("{} {}", j.platform, j.result.as_ref()?.digest)))
            .collect();
        b.record.status = BuildStatus::Failed;
        b.record.message = if pushed.is_empty() || !b.spec.push {
            message
        } else {
            format!("{message} (already pushed by digest, no index written: {})", pushed.join(", "))
        };
        b.record.finished_ms = Some(now);
        tracing::warn!(build_id, job_id, message = %b.record.message, "build failed");
        self.stop_jobs(build_id, "another platform failed", &mut events);
        if let Some(b) = self.builds.get(build_id) {
            events.push(Self::build_event(&b.record));
        }
        self.emit(build_id, events);
    }

    /// Cancels every unfinished job of a build and tells their agents.
    fn stop_jobs(&mut self, build_id: &str, reason: &str, events: &mut Vec<EventKind>) {
        let now = self.now();
        let Some(b) = self.builds.get_mut(build_id) else {
            return;
        };
        let mut cancels = Vec::new();
        for job in b.record.jobs.iter_mut().filter(|j| !j.status.is_done()) {
            if let Some((agent, _)) = job.status.leased() {
                cancels.push((agent.to_owned(), job.id.clone(), job.attempt));
            }
            job.status = JobStatus::Cancelled;
            job.message = reason.to_owned();
            job.finished_ms = Some(now);
            events.push(Self::job_event(job));
        }
        for (agent, job_id, attempt) in cancels {
            if let Some(a) = self.agents.get(&agent).filter(|a| a.connected) {
                let cancel = proto::CancelJob { job_id, attempt, reason: reason.to_owned() };
                self.out.push(Effect::Cancel { session: a.session, cancel });
            }
        }
    }

    /// Cancels a build; a build that has ended is left as it is.
    pub fn cancel(&mut self, build_id: &str, reason: &str) -> Result<Effects> {
        let status = self.build(build_id)?.record.status;
        let now = self.now();
        if !status.is_terminal() {
            let mut events = Vec::new();
            self.stop_jobs(build_id, reason, &mut events);
            if let Some(b) = self.builds.get_mut(build_id) {
                b.record.status = BuildStatus::Cancelled;
                b.record.message = reason.to_owned();
                b.record.finished_ms = Some(now);
                events.push(Self::build_event(&b.record));
            }
            tracing::info!(build_id, reason, "build cancelled");
            self.emit(build_id, events);
        }
        Ok(self.take())
    }
}
