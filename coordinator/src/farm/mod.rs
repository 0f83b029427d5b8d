//! The farm's state: builds, their jobs, connected agents and the events of
//! each build. Its transitions change that state and return what must
//! happen because of it ([`Effect`]s: messages to agents, store writes,
//! verifications, merges); they perform no I/O themselves and read the time
//! from a [`Clock`]. `state::Coordinator` performs the effects.
//!
//! Split by table: `builds` (submission, results, merges, failures, the
//! queue), `agents` (sessions, leases, loss), `events` (numbering and
//! appending a build's events).

mod agents;
pub use agents::Connected;
mod builds;
mod declared;
mod placement;
pub use placement::{
    NO_LABELS, free_memory as placement_free_memory, memory_of as placement_memory_of,
    requirements as placement_requirements,
};
mod events;
mod jobs;
mod secrets;

pub use builds::NewBuild;
pub use declared::utc;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::broadcast;

use braid_shared::oci::Credential;
use braid_shared::placement::Labels;
use braid_shared::proto;
use braid_shared::{Digest, ImageRef, Platform};

use crate::metrics::Metrics;
use crate::model::{AgentState, CertStamp, Clock, Delivered, IndexFormat};
pub use crate::model::{BuildRecord, BuildStatus, Image, JobRecord, JobStatus, PhaseRecord};

/// Why a transition was refused; mapped once to a gRPC status
/// (`error.rs`).
#[derive(Debug, thiserror::Error)]
pub enum FarmError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
}

pub type Result<T, E = FarmError> = std::result::Result<T, E>;

/// A build in memory: its record, spec and event channel.
pub struct BuildEntry {
    pub record: BuildRecord,
    pub spec: proto::BuildSpec,
    pub tags: Vec<ImageRef>,
    /// Credentials the client forwarded: memory only, lost on restart.
    pub credentials: Vec<Credential>,
    /// Its `--secret` values: memory only, never stored, shown or logged;
    /// dropped when the build ends. Empty after a restart until the client
    /// sends them again (`ProvideSecrets`).
    pub secrets: Vec<proto::SecretValue>,
    /// Since when (farm clock, ms) the build lacks the values of secrets its
    /// spec lists as provided (a restart lost them); None while it has them.
    pub secrets_lost_ms: Option<i64>,
    /// Where stored events are shown to watchers (by the executor, after
    /// they are written).
    pub events: broadcast::Sender<proto::BuildEvent>,
    /// Each job's result-cache key (job id -> key), memory only: a job
    /// built by an agent stores its result under it when the build
    /// succeeds. None for a build that bypasses the cache or reused it.
    pub result_keys: HashMap<String, String>,
}

/// The spec lists secrets whose values the client sent.
pub fn needs_secrets(spec: &proto::BuildSpec) -> bool {
    spec.secrets.iter().any(|s| s.provided)
}

impl BuildEntry {
    /// It waits for its `--secret` values (lost in a restart): no job of it
    /// is placed until they come back.
    pub fn lacks_secrets(&self) -> bool {
        self.secrets_lost_ms.is_some()
    }

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

/// A connected (or recently disconnected) agent.
pub struct AgentEntry {
    pub name: String,
    pub platforms: Vec<Platform>,
    pub slots: u32,
    pub backend: String,
    pub version: String,
    /// Jobs leased to it: (build id, job id).
    pub running: HashSet<(String, String)>,
    /// Its latest session; messages for it go there.
    pub session: u64,
    /// That session is open.
    pub connected: bool,
    /// When it was last heard of, by the farm's clock (ms).
    pub last_seen_ms: i64,
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
    /// Its builder and what it can do (None: not reported, so nothing a
    /// build may need).
    pub builder: Option<crate::model::Builder>,
    /// Its latest health report (checked); memory only, None until a
    /// heartbeat of this session brings one.
    pub health: Option<proto::AgentHealth>,
    /// Its labels as its last hello declared them (empty for an agent
    /// re-adopted from the store until it reconnects), and its `memory`
    /// label read once: each placement pass reads every agent's.
    pub labels: Labels,
    pub memory_label: Option<u64>,
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
    /// Each platform's provenance statement (empty: none asked for).
    pub provenance: Vec<braid_shared::slsa::StatementInput>,
}

/// Where a finished image is checked; at least one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyIn {
    /// In the registry it was pushed to.
    Registry(Box<ImageRef>),
    /// In the blob store (the build exports).
    Blobs,
    /// In both: the registry first.
    RegistryAndBlobs(Box<ImageRef>),
}

/// Why the farm closes an agent's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// A newer session of the same agent took its place.
    Replaced,
    /// No heartbeat in time.
    Lost,
    /// Its certificate was revoked by a newer one.
    Superseded,
    /// An operator forgot the agent.
    Forgotten,
}

/// What a transition asks the executor to do, in order.
#[derive(Debug)]
pub enum Effect {
    /// Hand a job to an agent's session.
    Assign { session: u64, assignment: Box<proto::Assignment> },
    /// Tell an agent's session to stop a job.
    Cancel { session: u64, cancel: proto::CancelJob },
    /// Close an agent's session (named for the message it gets).
    Disconnect { session: u64, agent: String, why: Disconnect },
    /// Store a build's record as it now is (on state changes only).
    Persist(Box<BuildRecord>),
    /// Store a build's events (and, for those an agent's message made, the
    /// message's number, in the same transaction), then show them to its
    /// watchers.
    Append {
        events: Vec<proto::BuildEvent>,
        live: broadcast::Sender<proto::BuildEvent>,
        delivered: Option<(String, Delivered)>,
    },
    /// Store an operator's cordon.
    Cordon { agent: String, cordoned: bool },
    /// Store an agent's builder (None: forget it).
    Builder { agent: String, builder: Option<crate::model::Builder> },
    /// Store the platforms an agent declared (None: forget them).
    Declared { agent: String, declared: Option<crate::model::Declared> },
    /// Store what the last job of a repository and platform used.
    Footprint { key: String, footprint: crate::model::Footprint, now_ms: i64 },
    /// Check a finished image where it was pushed or uploaded, then call
    /// `Farm::verified`.
    Verify { build_id: String, job_id: String, at: VerifyIn, digest: Digest, platform: Platform },
    /// Merge a build's verified images into an index, then call `Farm::merged`.
    Merge { build_id: String },
}

/// The effects of one transition.
pub type Effects = Vec<Effect>;

/// How the farm is set up.
pub struct FarmConfig {
    pub max_attempts: u32,
    pub insecure_registries: Vec<String>,
    /// Credentials from the coordinator's settings.
    pub configured: Vec<Credential>,
    /// How long a build whose `--secret` values a restart lost waits for its
    /// client to send them again before it fails.
    pub secrets_grace_ms: i64,
}

pub struct Farm {
    pub builds: HashMap<String, BuildEntry>,
    /// By name, in name order: the scheduler breaks ties by name and takes
    /// the agents in this order.
    pub agents: BTreeMap<String, AgentEntry>,
    /// Affinity key -> the agent that last built it.
    last_agent: HashMap<String, String>,
    next_order: u64,
    next_session: u64,
    config: FarmConfig,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    /// Job id -> build id, for the messages agents send about a job.
    job_index: HashMap<String, String>,
    /// Builds that have not ended: what scheduling and gauges look at.
    active: BTreeSet<String>,
    /// Events kept per build (`limits::BUILD_EVENTS`; smaller in tests).
    pub max_build_events: u64,
    /// Agents an operator cordoned; kept in the store, so neither an agent's
    /// reconnect nor a coordinator restart lifts a cordon.
    cordons: HashSet<String>,
    /// Effects of the transition under way; handed back at its end.
    out: Effects,
    /// Per agent, the last numbered message applied (see `accept`).
    deliveries: HashMap<String, Delivered>,
    /// Every agent known, connected or not, by the platforms it declared
    /// (kept in the store; see `declared`).
    declared: BTreeMap<String, crate::model::Declared>,
    /// What the last measured job of each "repository|platform" used
    /// (kept in the store; see `placement`).
    footprints: HashMap<String, crate::model::Footprint>,
}

/// Replay and live events for one Watch.
pub struct Subscription {
    pub live: broadcast::Receiver<proto::BuildEvent>,
    pub last_seq: u64,
    pub terminal: bool,
}

impl Farm {
    pub fn new(config: FarmConfig, clock: Arc<dyn Clock>, metrics: Arc<Metrics>) -> Farm {
        Farm {
            builds: HashMap::new(),
            agents: BTreeMap::new(),
            last_agent: HashMap::new(),
            next_order: 1,
            next_session: 1,
            config,
            metrics,
            clock,
            job_index: HashMap::new(),
            active: BTreeSet::new(),
            max_build_events: braid_shared::limits::BUILD_EVENTS,
            cordons: HashSet::new(),
            out: Vec::new(),
            deliveries: HashMap::new(),
            declared: BTreeMap::new(),
            footprints: HashMap::new(),
        }
    }

    /// Takes back what the store kept: unfinished builds go on, their
    /// running jobs stay leased to agents re-adopted as orphans, which get
    /// the time an agent has to come back before it is declared lost.
    pub fn restore(&mut self, builds: Vec<(BuildRecord, proto::BuildSpec)>, cordons: Vec<String>) {
        self.cordons = cordons.into_iter().collect();
        for (record, spec) in builds {
            self.next_order = self.next_order.max(record.order + 1);
            for j in &record.jobs {
                self.job_index.insert(j.id.clone(), record.id.clone());
            }
            if !record.status.is_terminal() {
                self.active.insert(record.id.clone());
            }
            let tags = spec.tags.iter().filter_map(|t| t.parse::<ImageRef>().ok()).collect();
            let (events, _) = broadcast::channel(1024);
            let lost = (!record.status.is_terminal() && needs_secrets(&spec)).then(|| self.now());
            let entry = BuildEntry {
                record,
                spec,
                tags,
                events,
                credentials: Vec::new(),
                secrets: Vec::new(),
                result_keys: HashMap::new(),
                secrets_lost_ms: lost,
            };
            self.builds.insert(entry.record.id.clone(), entry);
        }
        self.adopt_orphans();
    }

    pub fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    /// The effects collected since the last call, a build's record kept
    /// only in its last state.
    fn take(&mut self) -> Effects {
        let mut out = std::mem::take(&mut self.out);
        let mut persisted = HashSet::new();
        let mut keep = vec![true; out.len()];
        for (i, e) in out.iter().enumerate().rev() {
            if let Effect::Persist(r) = e {
                keep[i] = persisted.insert(r.id.clone());
            }
        }
        let mut keep = keep.into_iter();
        out.retain(|_| keep.next().unwrap_or(true));
        out
    }

    /// Credentials a build's jobs and merge use: those it forwarded, then
    /// the configured ones for other registries.
    pub fn credentials_for(&self, build_id: &str) -> Vec<Credential> {
        let mut out = self.builds.get(build_id).map(|b| b.credentials.clone()).unwrap_or_default();
        for c in &self.config.configured {
            if !out.iter().any(|o| o.registry == c.registry) {
                out.push(c.clone());
            }
        }
        out
    }

    /// The image manifests of exporting builds that have not ended or ended
    /// in the last hour (their client is fetching them): blobs not to evict.
    pub fn exporting_images(&self) -> Vec<Digest> {
        let recent = self.now() - 3_600_000;
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
            agents_connected: self.agents.values().filter(|a| a.connected).count() as u64,
            ..Default::default()
        };
        let now = self.now();
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
        // Enrolled names, so bounded already; capped all the same.
        g.agent_health = self
            .agent_list()
            .into_iter()
            .take(braid_shared::limits::METRIC_AGENTS)
            .map(|a| crate::metrics::AgentGauge {
                name: a.name.clone(),
                last_seen_seconds: a.last_seen_ms as f64 / 1000.0,
                // A lost or disconnected agent's last report is stale: no series.
                health: a.health.filter(|_| a.connected && !a.lost),
            })
            .collect();
        g
    }

    /// Verifications and merges that a restart interrupted.
    pub fn interrupted(&self) -> Effects {
        let mut out = Vec::new();
        for b in self.builds.values() {
            match b.record.status {
                BuildStatus::Merging => out.push(Effect::Merge { build_id: b.record.id.clone() }),
                BuildStatus::Running => {
                    for j in &b.record.jobs {
                        if let (JobStatus::Pushed { .. }, Some(result), Some(at)) =
                            (&j.status, &j.result, b.verify_in())
                        {
                            out.push(Effect::Verify {
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

    /// The platform of one build's job, as agents' running lists name it.
    pub fn job_platform(&self, build_id: &str, job_id: &str) -> Option<String> {
        self.builds.get(build_id)?.record.jobs.iter().find(|j| j.id == job_id).map(|j| j.platform.to_string())
    }

    fn job_mut(&mut self, build_id: &str, job_id: &str) -> Option<&mut JobRecord> {
        self.builds.get_mut(build_id)?.record.jobs.iter_mut().find(|j| j.id == job_id)
    }

    fn build_of_job(&self, job_id: &str) -> Option<String> {
        self.job_index.get(job_id).cloned()
    }
}
