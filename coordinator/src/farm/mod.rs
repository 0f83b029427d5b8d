//! The farm's state: builds, their jobs, connected agents, and every change
//! to them, written through to the store and broadcast as build events.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc};

use braid_shared::oci::{Credential, ImageDescriptor};
use braid_shared::proto::{self, build_event::Kind as EventKind, coordinator_message::Kind as ToAgent};
use braid_shared::{Digest, ImageRef, Platform};

use crate::error::{CoordinatorError, Result};
use crate::metrics::Metrics;
use crate::model::{AgentState, Caller, CertStamp, IndexFormat, Phase, timestamp};
pub use crate::model::{BuildRecord, BuildStatus, Image, JobRecord, JobStatus, PhaseRecord, now_ms};
use crate::scheduler::{self, AgentView, QueuedJob};
use crate::store::Store;

/// A build in memory: its record, spec and event channel.
pub struct BuildEntry {
    pub record: BuildRecord,
    pub spec: proto::BuildSpec,
    pub tags: Vec<ImageRef>,
    /// Credentials the client forwarded: memory only, lost on restart.
    pub credentials: Vec<Credential>,
    pub events: broadcast::Sender<proto::BuildEvent>,
}

impl BuildEntry {
    /// Where a finished image is checked: in the first repository pushed
    /// to, in the blob store when the build exports; None when neither.
    fn verify_in(&self) -> Option<VerifyIn> {
        let repository = if self.spec.push { self.push_repositories().into_iter().next().map(Box::new) } else { None };
        match (repository, self.spec.export) {
            (Some(r), false) => Some(VerifyIn::Registry(r)),
            (Some(r), true) => Some(VerifyIn::RegistryAndBlobs(r)),
            (None, true) => Some(VerifyIn::Blobs),
            (None, false) => None,
        }
    }

    /// Repositories agents push to: the first tag's per registry.
    pub fn push_repositories(&self) -> Vec<ImageRef> {
        let mut seen = HashSet::new();
        self.tags.iter().filter(|t| seen.insert(t.registry().to_owned())).cloned().collect()
    }

    fn affinity_key(&self, platform: &Platform) -> String {
        let repo = self.tags.first().map(ImageRef::name).unwrap_or_default();
        format!("{repo}|{platform}")
    }
}

pub type AgentSender = mpsc::UnboundedSender<Result<proto::CoordinatorMessage, tonic::Status>>;

/// A connected (or recently disconnected) agent.
pub struct AgentEntry {
    pub name: String,
    pub platforms: Vec<Platform>,
    pub slots: u32,
    pub backend: String,
    pub version: String,
    /// Jobs leased to it: (build id, job id).
    pub running: HashSet<(String, String)>,
    pub session: u64,
    pub sender: Option<AgentSender>,
    pub last_seen: Instant,
    pub cordoned: bool,
    /// Platforms it can run only through emulation.
    pub emulates: Vec<Platform>,
    /// Stopping: takes no new jobs.
    pub draining: bool,
    /// Declared lost (kept so operators see it until it comes back).
    pub lost: bool,
    /// The certificate its session presented (None in plaintext mode and
    /// for agents re-adopted after a restart until they reconnect).
    pub cert: Option<CertStamp>,
}

impl AgentEntry {
    /// Idle, busy, cordoned, draining or lost, as `braid agents` shows it.
    pub fn state(&self) -> AgentState {
        if self.lost {
            AgentState::Lost
        } else if self.draining {
            AgentState::Draining
        } else if self.cordoned {
            AgentState::Cordoned
        } else if self.running.is_empty() {
            AgentState::Idle
        } else {
            AgentState::Busy
        }
    }
}

/// Everything a merge reads from the farm.
pub struct MergeInputs {
    pub tags: Vec<ImageRef>,
    /// The repositories agents pushed to, one per registry.
    pub pushed_to: Vec<ImageRef>,
    pub images: Vec<(Platform, Image)>,
    pub annotations: Vec<proto::Annotation>,
    pub push: bool,
    pub export: bool,
    pub format: IndexFormat,
}

/// Where a finished image is checked; at least one place.
#[derive(Debug, Clone)]
pub enum VerifyIn {
    /// In the registry it was pushed to.
    Registry(Box<ImageRef>),
    /// In the blob store (the build exports).
    Blobs,
    /// In both: the registry first.
    RegistryAndBlobs(Box<ImageRef>),
}

/// Work the caller must do outside the lock, after a state change.
#[derive(Debug)]
pub enum FollowUp {
    /// Check a finished image: in the registry it was pushed to, and in
    /// the blob store when the build exports.
    Verify { build_id: String, job_id: String, at: VerifyIn, digest: Digest, platform: Platform },
    /// Merge a build's verified images into an index.
    Merge { build_id: String },
}

pub struct Farm {
    pub builds: HashMap<String, BuildEntry>,
    /// By name, in name order: the scheduler breaks ties by name and takes
    /// the agents in this order.
    pub agents: BTreeMap<String, AgentEntry>,
    /// Affinity key -> the agent that last built it.
    last_agent: HashMap<String, String>,
    store: Arc<Store>,
    next_order: u64,
    next_session: u64,
    max_attempts: u32,
    insecure_registries: Vec<String>,
    /// Credentials from the coordinator's settings.
    configured: Vec<Credential>,
    metrics: Arc<Metrics>,
    /// Job id -> build id, for the messages agents send about a job.
    job_index: HashMap<String, String>,
    /// Builds that have not ended: what scheduling and gauges look at.
    active: std::collections::BTreeSet<String>,
    /// Events kept per build (`limits::BUILD_EVENTS`; smaller in tests).
    pub max_build_events: u64,
    /// Agents an operator cordoned; kept in the store, so neither an agent's
    /// reconnect nor a coordinator restart lifts a cordon.
    cordons: HashSet<String>,
}

/// Replay and live events for one Watch.
pub struct Subscription {
    pub live: broadcast::Receiver<proto::BuildEvent>,
    pub last_seq: u64,
    pub terminal: bool,
}

impl Farm {
    /// The farm as the store left it: unfinished builds go on, their running
    /// jobs stay leased until their agents come back or are declared lost.
    pub fn load(
        store: Arc<Store>,
        max_attempts: u32,
        insecure_registries: Vec<String>,
        metrics: Arc<Metrics>,
    ) -> Result<Farm> {
        let mut farm = Farm {
            builds: HashMap::new(),
            agents: BTreeMap::new(),
            last_agent: HashMap::new(),
            store: store.clone(),
            next_order: 1,
            next_session: 1,
            max_attempts,
            insecure_registries,
            configured: Vec::new(),
            metrics,
            job_index: HashMap::new(),
            active: Default::default(),
            max_build_events: braid_shared::limits::BUILD_EVENTS,
            cordons: store.cordons()?.into_iter().collect(),
        };
        for (record, spec) in store.load_builds()? {
            farm.next_order = farm.next_order.max(record.order + 1);
            for j in &record.jobs {
                farm.job_index.insert(j.id.clone(), record.id.clone());
            }
            if !record.status.is_terminal() {
                farm.active.insert(record.id.clone());
            }
            let tags = spec.tags.iter().filter_map(|t| t.parse::<ImageRef>().ok()).collect();
            let (events, _) = broadcast::channel(1024);
            farm.builds.insert(record.id.clone(), BuildEntry { record, spec, tags, events, credentials: Vec::new() });
        }
        Ok(farm)
    }

    /// Jobs whose agents we have not heard from since a restart; they get
    /// `lost_after` to reconnect like any agent that goes quiet.
    pub fn adopt_orphans(&mut self) {
        let now = Instant::now();
        let mut orphans: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for b in self.builds.values() {
            for j in &b.record.jobs {
                if let Some((agent, _)) = j.status.leased() {
                    orphans.entry(agent.to_owned()).or_default().push((b.record.id.clone(), j.id.clone()));
                }
            }
        }
        for (name, jobs) in orphans {
            let cordoned = self.cordons.contains(&name);
            self.agents.insert(
                name.clone(),
                AgentEntry {
                    name,
                    platforms: Vec::new(),
                    slots: 0,
                    backend: String::new(),
                    version: String::new(),
                    running: jobs.into_iter().collect(),
                    session: 0,
                    sender: None,
                    last_seen: now,
                    cordoned,
                    emulates: Vec::new(),
                    draining: false,
                    lost: false,
                    cert: None,
                },
            );
        }
    }

    pub fn set_configured_credentials(&mut self, credentials: Vec<Credential>) {
        self.configured = credentials;
    }

    /// Credentials a build's jobs and merge use: those it forwarded, then
    /// the configured ones for other registries.
    pub fn credentials_for(&self, build_id: &str) -> Vec<Credential> {
        let mut out = self.builds.get(build_id).map(|b| b.credentials.clone()).unwrap_or_default();
        for c in &self.configured {
            if !out.iter().any(|o| o.registry == c.registry) {
                out.push(c.clone());
            }
        }
        out
    }

    /// Every known agent, by name.
    pub fn agent_list(&self) -> Vec<&AgentEntry> {
        let mut agents: Vec<&AgentEntry> = self.agents.values().collect();
        agents.sort_by(|a, b| a.name.cmp(&b.name));
        agents
    }

    /// Sets or clears an operator's cordon.
    pub fn set_cordoned(&mut self, name: &str, cordoned: bool) -> Result<&AgentEntry> {
        let agent = self.agents.get_mut(name).ok_or_else(|| {
            CoordinatorError::NotFound(format!("agent {:?} not found", braid_shared::shorten(name, 80)))
        })?;
        self.store.set_cordon(name, cordoned)?;
        agent.cordoned = cordoned;
        if cordoned {
            self.cordons.insert(name.to_owned());
        } else {
            self.cordons.remove(name);
        }
        tracing::info!(agent = name, cordoned, "agent cordon changed");
        Ok(agent)
    }

    /// The image manifests of exporting builds that have not ended or ended
    /// in the last hour (their client is fetching them): blobs not to evict.
    pub fn exporting_images(&self) -> Vec<Digest> {
        let recent = now_ms() - 3_600_000;
        self.builds
            .values()
            .filter(|b| b.spec.export && b.record.finished_ms.is_none_or(|f| f >= recent))
            .flat_map(|b| b.record.jobs.iter().filter_map(|j| Some(j.result.as_ref()?.digest.clone())))
            .collect()
    }

    /// Contexts of builds that have not ended.
    pub fn needed_contexts(&self) -> HashSet<String> {
        self.builds.values().filter(|b| !b.record.status.is_terminal()).map(|b| b.spec.context_digest.clone()).collect()
    }

    /// Connected agents, queued jobs and running jobs, for metrics.
    pub fn gauges(&self) -> crate::metrics::Gauges {
        let mut g = crate::metrics::Gauges {
            agents_connected: self.agents.values().filter(|a| a.sender.is_some()).count() as u64,
            ..Default::default()
        };
        let now = now_ms();
        for b in self.active.iter().filter_map(|id| self.builds.get(id)).filter(|b| !b.record.status.is_terminal()) {
            for j in &b.record.jobs {
                match j.status {
                    JobStatus::Pending => {
                        g.jobs_queued += 1;
                        let waited = (now - j.queued_ms.unwrap_or(b.record.created_ms)) as f64 / 1000.0;
                        let entry = g.queues.entry(j.platform.to_string()).or_insert((0, 0.0));
                        entry.0 += 1;
                        entry.1 = entry.1.max(waited);
                    }
                    JobStatus::Assigned { .. } | JobStatus::Building { .. } => g.jobs_running += 1,
                    _ => {}
                }
            }
        }
        for a in self.agents.values() {
            for p in &a.platforms {
                *g.agents.entry((p.to_string(), a.state().as_str().to_owned())).or_default() += 1;
            }
        }
        g
    }

    /// Verifications and merges that a restart interrupted.
    pub fn interrupted_follow_ups(&self) -> Vec<FollowUp> {
        let mut out = Vec::new();
        for b in self.builds.values() {
            match b.record.status {
                BuildStatus::Merging => out.push(FollowUp::Merge { build_id: b.record.id.clone() }),
                BuildStatus::Running => {
                    for j in &b.record.jobs {
                        if let (JobStatus::Pushed { .. }, Some(result), Some(at)) =
                            (&j.status, &j.result, b.verify_in())
                        {
                            out.push(FollowUp::Verify {
                                build_id: b.record.id.clone(),
                                job_id: j.id.clone(),
                                at,
                                digest: result.digest.clone(),
                                platform: j.platform.clone(),
                            });
                        }
                    }
                }
                _ => {}
            }
        }
        out
    }

    pub fn submit(
        &mut self,
        spec: proto::BuildSpec,
        platforms: Vec<Platform>,
        tags: Vec<ImageRef>,
        owner: Option<String>,
        credentials: Vec<Credential>,
    ) -> Result<String> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let jobs = platforms
            .into_iter()
            .map(|platform| JobRecord {
                id: uuid::Uuid::new_v4().simple().to_string(),
                platform,
                status: JobStatus::Pending,
                attempt: 0,
                last_agent: String::new(),
                result: None,
                message: String::new(),
                started_ms: None,
                finished_ms: None,
                emulated: false,
                waiting_noticed: false,
                queued_ms: Some(now_ms()),
                log_bytes: 0,
                log_cut: false,
                phases: Vec::new(),
                result_ms: None,
            })
            .collect();
        let record = BuildRecord {
            id: id.clone(),
            order: self.next_order,
            created_ms: now_ms(),
            finished_ms: None,
            status: BuildStatus::Queued,
            message: String::new(),
            jobs,
            index: None,
            last_seq: 0,
            owner,
            merge_started_ms: None,
        };
        self.next_order += 1;
        self.store.insert_build(&record, &spec)?;
        for j in &record.jobs {
            self.job_index.insert(j.id.clone(), id.clone());
        }
        self.active.insert(id.clone());
        let (events, _) = broadcast::channel(1024);
        self.builds.insert(id.clone(), BuildEntry { record, spec, tags, events, credentials });
        self.emit(
            &id,
            vec![EventKind::Build(proto::BuildStateChanged {
                state: proto::BuildState::Queued as i32,
                message: String::new(),
                index: None,
            })],
        )?;
        Ok(id)
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
            return Err(CoordinatorError::PermissionDenied(format!(
                "build {build_id} was submitted with another token; the submit role sees only its own"
            )));
        }
        Ok(b)
    }

    pub fn build(&self, build_id: &str) -> Result<&BuildEntry> {
        self.builds.get(build_id).ok_or_else(|| {
            CoordinatorError::NotFound(format!("build {:?} not found", braid_shared::shorten(build_id, 80)))
        })
    }

    /// Appends events to a build: stored, then broadcast.
    fn emit(&mut self, build_id: &str, kinds: Vec<EventKind>) -> Result<()> {
        let Some(b) = self.builds.get_mut(build_id) else {
            return Ok(());
        };
        let now = timestamp(now_ms());
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
        self.store.append_events(&events)?;
        self.store.save_build(&b.record)?;
        if b.record.status.is_terminal() && self.active.remove(build_id) {
            Self::observe_end(&self.metrics, &b.record);
        }
        for e in events {
            // No receiver is fine: nobody is watching.
            let _ = b.events.send(e);
        }
        Ok(())
    }

    /// Build duration and per-job results, once per build, when it ends.
    fn observe_end(metrics: &Metrics, record: &BuildRecord) {
        let result = record.status.as_str();
        let seconds = (record.finished_ms.unwrap_or_else(now_ms) - record.created_ms) as f64 / 1000.0;
        metrics.observe("braid_build_duration_seconds", vec![("result", result.into())], seconds);
        for j in &record.jobs {
            let result = j.status.result_word();
            metrics.inc("braid_jobs_total", vec![("platform", j.platform.to_string()), ("result", result.into())]);
        }
    }

    fn job_event(job: &JobRecord) -> EventKind {
        EventKind::Job(proto::JobStateChanged {
            job_id: job.id.clone(),
            platform: job.platform.to_string(),
            state: job.status.to_proto() as i32,
            agent: job.status.agent().unwrap_or(&job.last_agent).to_owned(),
            attempt: job.attempt,
            message: job.message.clone(),
            result: job.result.as_ref().map(Image::to_proto),
            emulated: job.emulated,
        })
    }

    fn build_event(record: &BuildRecord) -> EventKind {
        EventKind::Build(proto::BuildStateChanged {
            state: record.status.to_proto() as i32,
            message: record.message.clone(),
            index: record.index.as_ref().map(Image::to_proto),
        })
    }

    fn job_mut(&mut self, build_id: &str, job_id: &str) -> Option<&mut JobRecord> {
        self.builds.get_mut(build_id)?.record.jobs.iter_mut().find(|j| j.id == job_id)
    }

    /// Places what can be placed; sends assignments; notes platforms that
    /// no connected agent builds.
    pub fn schedule(&mut self) -> Result<()> {
        // Most wake-ups (results, logs) find nothing queued: skip the views.
        let anything_pending = self.active.iter().filter_map(|id| self.builds.get(id)).any(|b| {
            b.record.status != BuildStatus::Merging && b.record.jobs.iter().any(|j| j.status == JobStatus::Pending)
        });
        if !anything_pending {
            return Ok(());
        }
        let mut queue = Vec::new();
        let mut waiting: Vec<(String, String, Platform)> = Vec::new();
        let views: Vec<AgentView> = self
            .agents
            .values()
            .filter(|a| a.sender.is_some())
            .map(|a| AgentView {
                name: &a.name,
                platforms: &a.platforms,
                emulates: &a.emulates,
                slots: a.slots,
                running: a.running.len() as u32,
                schedulable: !a.cordoned && !a.draining,
            })
            .collect();
        // Whether any agent serves a platform, asked once per pass, not per job.
        let mut served_by: HashMap<(&Platform, bool), bool> = HashMap::new();
        for b in self.active.iter().filter_map(|id| self.builds.get(id)) {
            if b.record.status.is_terminal() || b.record.status == BuildStatus::Merging {
                continue;
            }
            for j in b.record.jobs.iter().filter(|j| j.status == JobStatus::Pending) {
                queue.push(QueuedJob {
                    job_id: j.id.clone(),
                    build_order: b.record.order,
                    platform: j.platform.clone(),
                    affinity_key: b.affinity_key(&j.platform),
                    allow_emulation: b.spec.allow_emulation,
                    submitter: b.record.owner.clone().unwrap_or_default(),
                });
                if j.waiting_noticed {
                    continue;
                }
                // Cordoned and stopping agents do not count: they take nothing new.
                let served = *served_by.entry((&j.platform, b.spec.allow_emulation)).or_insert_with(|| {
                    views.iter().any(|a| {
                        a.schedulable && (a.builds(&j.platform) || (b.spec.allow_emulation && a.emulates(&j.platform)))
                    })
                });
                if !served {
                    waiting.push((b.record.id.clone(), j.id.clone(), j.platform.clone()));
                }
            }
        }
        let placements =
            if queue.is_empty() { Vec::new() } else { scheduler::assign(&queue, &views, &self.last_agent) };
        drop(views);
        for (build_id, job_id, platform) in waiting {
            if let Some(j) = self.job_mut(&build_id, &job_id) {
                j.waiting_noticed = true;
            }
            self.emit(
                &build_id,
                vec![EventKind::Notice(proto::Notice {
                    platform: platform.to_string(),
                    text: format!("waiting for an agent for {platform}"),
                })],
            )?;
        }
        for placement in placements {
            if let Some(build_id) = self.build_of_job(&placement.job_id) {
                self.lease(&build_id, &placement.job_id, &placement.agent, placement.emulated)?;
            }
        }
        Ok(())
    }

    fn lease(&mut self, build_id: &str, job_id: &str, agent_name: &str, emulated: bool) -> Result<()> {
        let lease = uuid::Uuid::new_v4().simple().to_string();
        let insecure = self.insecure_registries.clone();
        let credentials: Vec<proto::RegistryCredential> =
            self.credentials_for(build_id).iter().map(proto::RegistryCredential::from).collect();
        let Some(b) = self.builds.get_mut(build_id) else {
            return Ok(());
        };
        let push_repositories: Vec<String> =
            if b.spec.push { b.push_repositories().iter().map(ImageRef::name).collect() } else { Vec::new() };
        let spec = b.spec.clone();
        let first_start = b.record.status == BuildStatus::Queued;
        if first_start {
            b.record.status = BuildStatus::Running;
        }
        let Some(job) = b.record.jobs.iter_mut().find(|j| j.id == job_id) else {
            return Ok(());
        };
        job.attempt += 1;
        job.status = JobStatus::Assigned { agent: agent_name.to_owned(), lease: lease.clone() };
        let now = now_ms();
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
        job.started_ms.get_or_insert_with(now_ms);
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
        };
        let mut events = vec![Self::job_event(job)];
        if first_start {
            events.insert(0, Self::build_event(&b.record));
        }
        if let Some(agent) = self.agents.get_mut(agent_name) {
            agent.running.insert((build_id.to_owned(), job_id.to_owned()));
            if let Some(tx) = &agent.sender {
                let _ = tx.send(Ok(proto::CoordinatorMessage { kind: Some(ToAgent::Assign(assignment)) }));
            }
        }
        tracing::info!(build_id, job_id, agent = agent_name, "job assigned");
        self.emit(build_id, events)
    }

    /// Registers an agent's session; re-adopts the jobs it still runs and
    /// hands back those it lost. A connected agent's session is replaced
    /// only by one presenting the same certificate or one recorded after
    /// it (plaintext sessions carry none and always replace).
    pub fn agent_connected(
        &mut self,
        hello: &proto::Hello,
        platforms: Vec<Platform>,
        emulates: Vec<Platform>,
        sender: AgentSender,
        cert: Option<CertStamp>,
    ) -> Result<u64> {
        if let Some(prev) = self.agents.get(&hello.name)
            && prev.sender.is_some()
            && let (Some(old), Some(new)) = (&prev.cert, &cert)
            && old.serial != new.serial
            && new.issued_ms <= old.issued_ms
        {
            return Err(CoordinatorError::AlreadyExists(format!(
                "agent {:?} is connected with certificate serial {}; a session with certificate serial {}, not \
                 issued after it, may not replace it",
                hello.name, old.serial, new.serial
            )));
        }
        self.metrics.declare_platforms(platforms.iter().chain(&emulates).map(ToString::to_string));
        let session = self.next_session;
        self.next_session += 1;
        let claimed: HashSet<(String, u32, String)> =
            hello.running.iter().map(|r| (r.job_id.clone(), r.attempt, r.lease_id.clone())).collect();
        let previous = self.agents.remove(&hello.name);
        let mut running = HashSet::new();
        let mut lost = Vec::new();
        if let Some(prev) = previous {
            if let Some(old) = prev.sender {
                let _ = old.send(Err(tonic::Status::aborted("replaced by a newer session of the same agent")));
            }
            for (build_id, job_id) in prev.running {
                let still = self
                    .builds
                    .get(&build_id)
                    .and_then(|b| b.record.jobs.iter().find(|j| j.id == job_id))
                    .and_then(|j| j.status.leased().map(|(_, lease)| (j.attempt, lease.to_owned())))
                    .is_some_and(|(attempt, lease)| claimed.contains(&(job_id.clone(), attempt, lease)));
                if still {
                    running.insert((build_id, job_id));
                } else {
                    lost.push((build_id, job_id));
                }
            }
        }
        // Jobs the agent runs that we no longer lease to it: stop them.
        for r in &hello.running {
            let ours = running.iter().any(|(_, j)| *j == r.job_id);
            if !ours {
                let _ = sender.send(Ok(proto::CoordinatorMessage {
                    kind: Some(ToAgent::Cancel(proto::CancelJob {
                        job_id: r.job_id.clone(),
                        attempt: r.attempt,
                        reason: "the coordinator no longer leases this job to this agent".into(),
                    })),
                }));
            }
        }
        self.agents.insert(
            hello.name.clone(),
            AgentEntry {
                name: hello.name.clone(),
                platforms,
                // validate_hello allows 1 to AGENT_SLOTS; the fallback is never taken.
                slots: u32::try_from(hello.slots).unwrap_or(braid_shared::limits::AGENT_SLOTS),
                backend: hello.backend.clone(),
                version: hello.version.clone(),
                running,
                session,
                sender: Some(sender),
                last_seen: Instant::now(),
                cordoned: self.cordons.contains(&hello.name),
                emulates,
                draining: false,
                lost: false,
                cert,
            },
        );
        for (build_id, job_id) in lost {
            self.requeue(&build_id, &job_id, &format!("agent {} restarted without it", hello.name))?;
        }
        Ok(session)
    }

    /// Closes the live session of `name` if it presented another certificate
    /// than `keep` (one just revoked by a newer one). Its jobs stay leased:
    /// the newer certificate's session re-adopts those it still runs, the
    /// rest are re-queued when the agent is declared lost.
    pub fn close_superseded_session(&mut self, name: &str, keep: &str) -> bool {
        let Some(agent) = self.agents.get_mut(name) else { return false };
        if agent.cert.as_ref().is_none_or(|c| c.serial == keep) {
            return false;
        }
        let Some(tx) = agent.sender.take() else { return false };
        let _ = tx.send(Err(tonic::Status::unauthenticated(format!(
            "the certificate of agent {name:?} was revoked: a newer one was enrolled"
        ))));
        tracing::warn!(agent = name, "closed a session whose certificate was superseded");
        true
    }

    /// `braid agents forget`: closes the agent's session, re-queues its
    /// running jobs as for a lost agent and drops it from the farm.
    /// Returns (a live session was closed, jobs re-queued).
    pub fn forget_agent(&mut self, name: &str) -> Result<(bool, u32)> {
        let Some(agent) = self.agents.remove(name) else {
            return Ok((false, 0));
        };
        let disconnected = match agent.sender {
            Some(tx) => {
                let _ = tx.send(Err(tonic::Status::unauthenticated(format!(
                    "agent {name:?} was forgotten by an operator; its certificates are revoked"
                ))));
                true
            }
            None => false,
        };
        let requeued = agent.running.len() as u32;
        for (build_id, job_id) in agent.running {
            self.requeue(&build_id, &job_id, &format!("agent {name} was forgotten"))?;
        }
        tracing::warn!(agent = name, disconnected, requeued, "agent forgotten");
        Ok((disconnected, requeued))
    }

    /// The session ended; the agent keeps its jobs until it is lost.
    pub fn agent_disconnected(&mut self, name: &str, session: u64) {
        if let Some(agent) = self.agents.get_mut(name)
            && agent.session == session
        {
            agent.sender = None;
        }
    }

    pub fn heartbeat(&mut self, name: &str, session: u64) {
        if let Some(agent) = self.agents.get_mut(name)
            && agent.session == session
        {
            agent.last_seen = Instant::now();
        }
    }

    /// The agent said it is stopping: no new jobs for it.
    pub fn set_draining(&mut self, name: &str, session: u64, draining: bool) {
        if let Some(agent) = self.agents.get_mut(name)
            && agent.session == session
            && agent.draining != draining
        {
            agent.draining = draining;
            tracing::info!(agent = name, draining, "agent drain state changed");
        }
    }

    /// Fails builds past their `--timeout` and jobs that waited longer than
    /// `queue_timeout` for an agent.
    pub fn check_timeouts(&mut self, queue_timeout: Option<Duration>) -> Result<()> {
        let now = now_ms();
        let mut expired: Vec<(String, String, String)> = Vec::new();
        for b in self.active.iter().filter_map(|id| self.builds.get(id)).filter(|b| !b.record.status.is_terminal()) {
            let limit = b.spec.timeout_seconds;
            let limit_ms = i64::try_from(limit.saturating_mul(1000)).unwrap_or(i64::MAX);
            if limit > 0 && now - b.record.created_ms > limit_ms {
                expired.push((b.record.id.clone(), String::new(), format!("timed out after {limit}s (--timeout)")));
                continue;
            }
            let Some(wait) = queue_timeout else { continue };
            for j in b.record.jobs.iter().filter(|j| j.status == JobStatus::Pending) {
                let since = j.queued_ms.unwrap_or(b.record.created_ms);
                if now - since > wait.as_millis() as i64 {
                    let message = format!(
                        "{}: no agent took the job within {}s (queue_timeout_seconds)",
                        j.platform,
                        wait.as_secs()
                    );
                    expired.push((b.record.id.clone(), j.id.clone(), message));
                    break;
                }
            }
        }
        for (build_id, job_id, message) in expired {
            self.fail_build(&build_id, &job_id, message)?;
        }
        Ok(())
    }

    /// Declares lost the agents unheard of for `lost_after`, and re-queues
    /// their jobs.
    pub fn reap(&mut self, lost_after: Duration) -> Result<()> {
        let now = Instant::now();
        let lost: Vec<String> = self
            .agents
            .values()
            .filter(|a| !a.lost && now.duration_since(a.last_seen) > lost_after)
            .map(|a| a.name.clone())
            .collect();
        for name in lost {
            let Some(agent) = self.agents.get_mut(&name) else {
                continue;
            };
            tracing::warn!(agent = %name, jobs = agent.running.len(), "agent lost");
            Metrics::add(&self.metrics.agents_lost, 1);
            agent.lost = true;
            if let Some(tx) = agent.sender.take() {
                let _ = tx.send(Err(tonic::Status::unavailable("declared lost: no heartbeat in time")));
            }
            let running = std::mem::take(&mut agent.running);
            for (build_id, job_id) in running {
                self.requeue(&build_id, &job_id, &format!("agent {name} was lost"))?;
            }
        }
        Ok(())
    }

    /// Puts a leased job back in the queue, or fails it after too many attempts.
    fn requeue(&mut self, build_id: &str, job_id: &str, why: &str) -> Result<()> {
        let max = self.max_attempts;
        let metrics = self.metrics.clone();
        let Some(job) = self.job_mut(build_id, job_id) else {
            return Ok(());
        };
        if job.status.leased().is_none() {
            return Ok(());
        }
        if job.attempt >= max {
            let message = format!("{why}; gave up after {max} attempts");
            return self.fail_build(build_id, job_id, message);
        }
        job.status = JobStatus::Pending;
        job.queued_ms = Some(now_ms());
        metrics.inc("braid_job_retries_total", vec![("platform", job.platform.to_string())]);
        job.message = format!("{why}; re-queued");
        let event = Self::job_event(job);
        tracing::info!(build_id, job_id, why, "job re-queued");
        self.emit(build_id, vec![event])
    }

    /// Checks that `agent` holds the current lease of a job.
    fn leased_to(
        &self,
        name: &str,
        session: u64,
        build_id: &str,
        job_id: &str,
        attempt: u32,
        lease: Option<&str>,
    ) -> bool {
        let agent_ok = self.agents.get(name).is_some_and(|a| a.session == session);
        let job_ok =
            self.builds.get(build_id).and_then(|b| b.record.jobs.iter().find(|j| j.id == job_id)).is_some_and(|j| {
                j.attempt == attempt
                    && j.status.leased().is_some_and(|(a, l)| a == name && lease.is_none_or(|want| want == l))
            });
        agent_ok && job_ok
    }

    /// The agent holding `lease` on a job's `attempt`, when the job's build
    /// exports (so it may upload blobs).
    pub fn exporting_lease_holder(&self, job_id: &str, attempt: u32, lease: &str) -> Option<String> {
        let b = self.builds.get(self.job_index.get(job_id)?)?;
        if !b.spec.export {
            return None;
        }
        let job = b.record.jobs.iter().find(|j| j.id == job_id && j.attempt == attempt)?;
        job.status.leased().filter(|(_, l)| *l == lease).map(|(agent, _)| agent.to_owned())
    }

    /// The agent holding `lease` on a job's `attempt`, and the context digest
    /// of the job's build (a context is served only to such an agent).
    pub fn lease_holder_and_context(&self, job_id: &str, attempt: u32, lease: &str) -> Option<(String, String)> {
        let b = self.builds.get(self.job_index.get(job_id)?)?;
        let job = b.record.jobs.iter().find(|j| j.id == job_id && j.attempt == attempt)?;
        let (agent, _) = job.status.leased().filter(|(_, l)| *l == lease)?;
        Some((agent.to_owned(), b.spec.context_digest.clone()))
    }

    /// A context is served only to the agent holding the current lease of a
    /// job whose build uses it (`caller` is None in plaintext mode, where the
    /// lease alone counts).
    pub fn check_context_lease(
        &self,
        caller: Option<&str>,
        job_id: &str,
        attempt: u32,
        lease: &str,
        digest: &Digest,
    ) -> Result<()> {
        if job_id.is_empty() {
            return Err(CoordinatorError::PermissionDenied(
                "job_id: required; a context is served only to the agent holding a lease on a job whose build uses it"
                    .into(),
            ));
        }
        let shown = braid_shared::shorten(job_id, 80);
        let (holder, context) = self.lease_holder_and_context(job_id, attempt, lease).ok_or_else(|| {
            CoordinatorError::FailedPrecondition(format!(
                "job {shown} attempt {attempt}: no such lease (cancelled or re-queued?); no context served"
            ))
        })?;
        if let Some(name) = caller
            && name != holder
        {
            return Err(CoordinatorError::PermissionDenied(format!(
                "job {shown} is leased to agent {holder:?}, not {name:?}"
            )));
        }
        if context != digest.to_string() {
            return Err(CoordinatorError::PermissionDenied(format!(
                "job {shown}'s build uses context {context}, not {digest}"
            )));
        }
        Ok(())
    }

    fn build_of_job(&self, job_id: &str) -> Option<String> {
        self.job_index.get(job_id).cloned()
    }

    pub fn job_log(&mut self, name: &str, session: u64, log: proto::JobLog) -> Result<()> {
        let Some(build_id) = self.build_of_job(&log.job_id) else {
            return Ok(());
        };
        if !self.leased_to(name, session, &build_id, &log.job_id, log.attempt, None) {
            return Ok(());
        }
        use braid_shared::limits::{JOB_LOG_BYTES, LOG_LINE_BYTES};
        let max_events = self.max_build_events;
        let Some(b) = self.builds.get_mut(&build_id) else { return Ok(()) };
        let room = max_events.saturating_sub(b.record.last_seq + 1);
        let Some(job) = b.record.jobs.iter_mut().find(|j| j.id == log.job_id) else { return Ok(()) };
        if job.log_cut {
            return Ok(());
        }
        let platform = job.platform.to_string();
        let mut kinds = Vec::new();
        for line in log.lines {
            let line = braid_shared::shorten(&line, LOG_LINE_BYTES);
            let over_bytes = job.log_bytes + line.len() as u64 > JOB_LOG_BYTES as u64;
            if over_bytes || kinds.len() as u64 >= room {
                job.log_cut = true;
                let why = if over_bytes {
                    format!("{} MiB per job", JOB_LOG_BYTES >> 20)
                } else {
                    format!("{max_events} events per build")
                };
                kinds.push(EventKind::Notice(proto::Notice {
                    platform: platform.clone(),
                    text: format!("log of {platform} cut at the limit of {why}; later lines are dropped"),
                }));
                break;
            }
            job.log_bytes += line.len() as u64;
            kinds.push(EventKind::Log(proto::LogLine { platform: platform.clone(), line }));
        }
        self.emit(&build_id, kinds)
    }

    pub fn job_progress(&mut self, name: &str, session: u64, progress: proto::JobProgress) -> Result<()> {
        let Some(build_id) = self.build_of_job(&progress.job_id) else {
            return Ok(());
        };
        if !self.leased_to(name, session, &build_id, &progress.job_id, progress.attempt, None) {
            return Ok(());
        }
        let Some(job) = self.job_mut(&build_id, &progress.job_id) else {
            return Ok(());
        };
        if progress.state == proto::JobState::Building as i32
            && let JobStatus::Assigned { agent, lease } = &job.status
        {
            job.status = JobStatus::Building { agent: agent.clone(), lease: lease.clone() };
            let event = Self::job_event(job);
            return self.emit(&build_id, vec![event]);
        }
        Ok(())
    }

    /// Takes an agent's result for a job it holds; stale results are ignored.
    pub fn job_result(&mut self, name: &str, session: u64, result: proto::JobResult) -> Result<Option<FollowUp>> {
        let Some(build_id) = self.build_of_job(&result.job_id) else {
            return Ok(None);
        };
        // The slot is free whatever the result says.
        if let Some(agent) = self.agents.get_mut(name) {
            agent.running.remove(&(build_id.clone(), result.job_id.clone()));
        }
        if !self.leased_to(name, session, &build_id, &result.job_id, result.attempt, Some(&result.lease_id)) {
            tracing::info!(build_id, job_id = result.job_id, agent = name, "ignoring a result for a stale lease");
            return Ok(None);
        }
        let job_id = result.job_id.clone();
        self.record_agent_phases(&build_id, &job_id, &result.phases);
        match result.outcome {
            Some(proto::job_result::Outcome::Image(image)) => self.image_built(&build_id, &job_id, name, image),
            Some(proto::job_result::Outcome::Failure(f)) => {
                let kind = proto::FailureKind::try_from(f.kind).unwrap_or(proto::FailureKind::Infra);
                match kind {
                    proto::FailureKind::Build => {
                        let platform = self.job_mut(&build_id, &job_id).map(|j| j.platform.to_string());
                        let message = format!("{}: {}", platform.unwrap_or_default(), f.message);
                        self.fail_build(&build_id, &job_id, message)?;
                    }
                    proto::FailureKind::Cancelled => {}
                    _ => self.requeue(&build_id, &job_id, &format!("agent {name}: {}", f.message))?,
                }
                Ok(None)
            }
            None => {
                self.requeue(&build_id, &job_id, &format!("agent {name} sent an empty result"))?;
                Ok(None)
            }
        }
    }

    /// Keeps the agent's phase times (bounded, known phases only) and
    /// observes them.
    fn record_agent_phases(&mut self, build_id: &str, job_id: &str, phases: &[proto::PhaseTiming]) {
        let now = now_ms();
        let metrics = self.metrics.clone();
        let Some(job) = self.job_mut(build_id, job_id) else { return };
        job.result_ms = Some(now);
        let ms =
            |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000);
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

    fn image_built(
        &mut self,
        build_id: &str,
        job_id: &str,
        agent: &str,
        image: proto::ImageResult,
    ) -> Result<Option<FollowUp>> {
        let Some(b) = self.builds.get_mut(build_id) else {
            return Ok(None);
        };
        let verify_in = b.verify_in();
        let affinity = b.tags.first().map(ImageRef::name);
        let Some(job) = b.record.jobs.iter_mut().find(|j| j.id == job_id) else {
            return Ok(None);
        };
        let image = match Image::from_proto(image) {
            Ok(image) => image,
            Err(e) => {
                let message = format!("{}: pushed image refused: {e}", job.platform);
                return self.fail_build(build_id, job_id, message).map(|()| None);
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
            self.emit(build_id, vec![event])?;
            return Ok(Some(FollowUp::Verify {
                build_id: build_id.to_owned(),
                job_id: job_id.to_owned(),
                at,
                digest,
                platform,
            }));
        }
        // Nothing was pushed or uploaded, so there is nothing to verify.
        job.status = JobStatus::Verified { agent: agent.to_owned() };
        job.finished_ms = Some(now_ms());
        let event = Self::job_event(job);
        self.emit(build_id, vec![event])?;
        self.maybe_merge(build_id)
    }

    /// The registry check of a pushed image finished.
    pub fn verified(
        &mut self,
        build_id: &str,
        job_id: &str,
        outcome: Result<ImageDescriptor, String>,
    ) -> Result<Option<FollowUp>> {
        let metrics = self.metrics.clone();
        let Some(job) = self.job_mut(build_id, job_id) else {
            return Ok(None);
        };
        let JobStatus::Pushed { agent } = job.status.clone() else {
            return Ok(None);
        };
        match outcome {
            Ok(descriptor) => {
                job.result = Some(Image::from(descriptor));
                job.status = JobStatus::Verified { agent };
                let now = now_ms();
                job.finished_ms = Some(now);
                let verify = PhaseRecord { phase: Phase::Verify, start_ms: job.result_ms.unwrap_or(now), end_ms: now };
                metrics.observe(
                    "braid_job_phase_seconds",
                    vec![("platform", job.platform.to_string()), ("phase", Phase::Verify.as_str().into())],
                    verify.seconds(),
                );
                job.phases.push(verify);
                let event = Self::job_event(job);
                self.emit(build_id, vec![event])?;
                self.maybe_merge(build_id)
            }
            Err(message) => {
                let platform = job.platform.to_string();
                self.fail_build(build_id, job_id, format!("{platform}: pushed image refused: {message}"))?;
                Ok(None)
            }
        }
    }

    fn maybe_merge(&mut self, build_id: &str) -> Result<Option<FollowUp>> {
        let Some(b) = self.builds.get_mut(build_id) else {
            return Ok(None);
        };
        if b.record.status.is_terminal()
            || !b.record.jobs.iter().all(|j| matches!(j.status, JobStatus::Verified { .. }))
        {
            return Ok(None);
        }
        if !b.spec.push && !b.spec.export {
            b.record.status = BuildStatus::Succeeded;
            b.record.finished_ms = Some(now_ms());
            let event = Self::build_event(&b.record);
            self.emit(build_id, vec![event])?;
            return Ok(None);
        }
        b.record.status = BuildStatus::Merging;
        b.record.merge_started_ms = Some(now_ms());
        let event = Self::build_event(&b.record);
        self.emit(build_id, vec![event])?;
        Ok(Some(FollowUp::Merge { build_id: build_id.to_owned() }))
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
        })
    }

    pub fn merged(&mut self, build_id: &str, outcome: Result<ImageDescriptor, String>) -> Result<()> {
        let Some(b) = self.builds.get_mut(build_id) else {
            return Ok(());
        };
        if b.record.status != BuildStatus::Merging {
            return Ok(());
        }
        if let Some(started) = b.record.merge_started_ms {
            self.metrics.observe("braid_build_merge_seconds", vec![], (now_ms() - started) as f64 / 1000.0);
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
        b.record.finished_ms = Some(now_ms());
        let event = Self::build_event(&b.record);
        self.emit(build_id, vec![event])
    }

    /// Fails a build because of one job: the job fails, the others are
    /// cancelled, and no index is pushed.
    fn fail_build(&mut self, build_id: &str, job_id: &str, message: String) -> Result<()> {
        let Some(b) = self.builds.get_mut(build_id) else {
            return Ok(());
        };
        if b.record.status.is_terminal() {
            return Ok(());
        }
        let mut events = Vec::new();
        if let Some(job) = b.record.jobs.iter_mut().find(|j| j.id == job_id) {
            job.status = JobStatus::Failed;
            job.message = message.clone();
            job.finished_ms = Some(now_ms());
            events.push(Self::job_event(job));
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
        b.record.finished_ms = Some(now_ms());
        tracing::warn!(build_id, job_id, message = %b.record.message, "build failed");
        self.stop_jobs(build_id, "another platform failed", &mut events);
        if let Some(b) = self.builds.get(build_id) {
            events.push(Self::build_event(&b.record));
        }
        self.emit(build_id, events)
    }

    /// Cancels every unfinished job of a build and tells their agents.
    fn stop_jobs(&mut self, build_id: &str, reason: &str, events: &mut Vec<EventKind>) {
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
            job.finished_ms = Some(now_ms());
            events.push(Self::job_event(job));
        }
        for (agent, job_id, attempt) in cancels {
            if let Some(tx) = self.agents.get(&agent).and_then(|a| a.sender.as_ref()) {
                let _ = tx.send(Ok(proto::CoordinatorMessage {
                    kind: Some(ToAgent::Cancel(proto::CancelJob { job_id, attempt, reason: reason.to_owned() })),
                }));
            }
        }
    }

    /// Cancels a build; a build that has ended is left as it is.
    pub fn cancel(&mut self, build_id: &str, reason: &str) -> Result<()> {
        let status = self.build(build_id)?.record.status;
        if !status.is_terminal() {
            let mut events = Vec::new();
            self.stop_jobs(build_id, reason, &mut events);
            if let Some(b) = self.builds.get_mut(build_id) {
                b.record.status = BuildStatus::Cancelled;
                b.record.message = reason.to_owned();
                b.record.finished_ms = Some(now_ms());
                events.push(Self::build_event(&b.record));
            }
            tracing::info!(build_id, reason, "build cancelled");
            self.emit(build_id, events)?;
        }
        Ok(())
    }
}
