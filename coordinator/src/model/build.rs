//! Builds, their jobs (one per platform), the phases a job went through and
//! the images it made, as kept in memory and in the store.

use serde::{Deserialize, Serialize};

use braid_shared::oci::ImageDescriptor;
use braid_shared::proto;
use braid_shared::{Digest, Platform};

use super::time::timestamp;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuildStatus {
    Queued,
    Running,
    Merging,
    Succeeded,
    Failed,
    Cancelled,
}

impl BuildStatus {
    /// Whether the build has ended: the one test of it.
    pub fn is_terminal(self) -> bool {
        matches!(self, BuildStatus::Succeeded | BuildStatus::Failed | BuildStatus::Cancelled)
    }

    pub fn to_proto(self) -> proto::BuildState {
        match self {
            BuildStatus::Queued => proto::BuildState::Queued,
            BuildStatus::Running => proto::BuildState::Running,
            BuildStatus::Merging => proto::BuildState::Merging,
            BuildStatus::Succeeded => proto::BuildState::Succeeded,
            BuildStatus::Failed => proto::BuildState::Failed,
            BuildStatus::Cancelled => proto::BuildState::Cancelled,
        }
    }

    /// The state a wire build state names (None for unspecified).
    pub fn from_proto(state: i32) -> Option<BuildStatus> {
        Some(match proto::BuildState::try_from(state).ok()? {
            proto::BuildState::Unspecified => return None,
            proto::BuildState::Queued => BuildStatus::Queued,
            proto::BuildState::Running => BuildStatus::Running,
            proto::BuildState::Merging => BuildStatus::Merging,
            proto::BuildState::Succeeded => BuildStatus::Succeeded,
            proto::BuildState::Failed => BuildStatus::Failed,
            proto::BuildState::Cancelled => BuildStatus::Cancelled,
        })
    }

    /// The one word for each state, in the dashboard and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Queued => "queued",
            BuildStatus::Running => "running",
            BuildStatus::Merging => "merging",
            BuildStatus::Succeeded => "succeeded",
            BuildStatus::Failed => "failed",
            BuildStatus::Cancelled => "cancelled",
        }
    }
}

/// A job's state; the agent and lease travel with the states that have one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobStatus {
    Pending,
    Assigned { agent: String, lease: String },
    Building { agent: String, lease: String },
    Pushed { agent: String },
    Verified { agent: String },
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn to_proto(&self) -> proto::JobState {
        match self {
            JobStatus::Pending => proto::JobState::Pending,
            JobStatus::Assigned { .. } => proto::JobState::Assigned,
            JobStatus::Building { .. } => proto::JobState::Building,
            JobStatus::Pushed { .. } => proto::JobState::Pushed,
            JobStatus::Verified { .. } => proto::JobState::Verified,
            JobStatus::Failed => proto::JobState::Failed,
            JobStatus::Cancelled => proto::JobState::Cancelled,
        }
    }

    /// The one word for each state, in the dashboard.
    pub fn as_str(&self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Assigned { .. } => "assigned",
            JobStatus::Building { .. } => "building",
            JobStatus::Pushed { .. } => "pushed",
            JobStatus::Verified { .. } => "verified",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// How a finished job is counted in `braid_jobs_total`.
    pub fn result_word(&self) -> &'static str {
        match self {
            JobStatus::Verified { .. } => "succeeded",
            JobStatus::Failed => "failed",
            _ => "cancelled",
        }
    }

    /// The agent holding a lease on this job, and the lease.
    pub fn leased(&self) -> Option<(&str, &str)> {
        match self {
            JobStatus::Assigned { agent, lease } | JobStatus::Building { agent, lease } => Some((agent, lease)),
            _ => None,
        }
    }

    pub fn agent(&self) -> Option<&str> {
        match self {
            JobStatus::Assigned { agent, .. }
            | JobStatus::Building { agent, .. }
            | JobStatus::Pushed { agent }
            | JobStatus::Verified { agent } => Some(agent),
            _ => None,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, JobStatus::Verified { .. } | JobStatus::Failed | JobStatus::Cancelled)
    }
}

/// One image a job or a merge made: a manifest, or the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    /// The image config's digest, as the agent reported it (none for an
    /// index, or from an agent that does not report it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<Digest>,
}

impl From<ImageDescriptor> for Image {
    fn from(d: ImageDescriptor) -> Self {
        Image { digest: d.digest, size: d.size, media_type: d.media_type, config_digest: None }
    }
}

impl From<&Image> for ImageDescriptor {
    fn from(i: &Image) -> Self {
        ImageDescriptor { digest: i.digest.clone(), size: i.size, media_type: i.media_type.clone() }
    }
}

impl Image {
    /// The image an agent reported; its digest must parse.
    pub fn from_proto(r: proto::ImageResult) -> Result<Image, braid_shared::digest::DigestError> {
        let config_digest = match r.config_digest.as_str() {
            "" => None,
            c => Some(c.parse()?),
        };
        Ok(Image { digest: r.digest.parse()?, size: r.size, media_type: r.media_type, config_digest })
    }

    pub fn to_proto(&self) -> proto::ImageResult {
        proto::ImageResult {
            digest: self.digest.to_string(),
            size: self.size,
            media_type: self.media_type.clone(),
            config_digest: self.config_digest.as_ref().map(ToString::to_string).unwrap_or_default(),
        }
    }
}

/// The phases of a job, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Queued,
    Fetch,
    Build,
    Push,
    Verify,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Fetch => "fetch",
            Phase::Build => "build",
            Phase::Push => "push",
            Phase::Verify => "verify",
        }
    }

    /// The phases an agent reports (the others are the coordinator's).
    pub fn of_agent(word: &str) -> Option<Phase> {
        match word {
            "fetch" => Some(Phase::Fetch),
            "build" => Some(Phase::Build),
            "push" => Some(Phase::Push),
            _ => None,
        }
    }
}

/// When one phase of a job ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseRecord {
    pub phase: Phase,
    pub start_ms: i64,
    pub end_ms: i64,
}

impl PhaseRecord {
    pub fn to_proto(&self) -> proto::PhaseTiming {
        proto::PhaseTiming {
            phase: self.phase.as_str().to_owned(),
            start: Some(timestamp(self.start_ms)),
            end: Some(timestamp(self.end_ms)),
        }
    }

    pub fn seconds(&self) -> f64 {
        (self.end_ms - self.start_ms) as f64 / 1000.0
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub platform: Platform,
    pub status: JobStatus,
    pub attempt: u32,
    /// The agent that last held it, kept after it finishes for display.
    pub last_agent: String,
    pub result: Option<Image>,
    pub message: String,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub emulated: bool,
    /// Whether a "waiting for an agent" notice went out for this attempt.
    #[serde(default)]
    pub waiting_noticed: bool,
    /// When it last entered the queue.
    #[serde(default)]
    pub queued_ms: Option<i64>,
    /// Log bytes kept for it, against `limits::JOB_LOG_BYTES`.
    #[serde(default)]
    pub log_bytes: u64,
    /// Its log was cut at a limit.
    #[serde(default)]
    pub log_cut: bool,
    /// Lines dropped since the cut, said in one notice when the attempt's
    /// result comes.
    #[serde(default)]
    pub log_dropped: u64,
    /// When each phase of the current attempt ran.
    #[serde(default)]
    pub phases: Vec<PhaseRecord>,
    /// When the agent's result arrived (verification starts then).
    #[serde(default)]
    pub result_ms: Option<i64>,
    /// What the provenance statement says of the attempt that made
    /// `result` (None without provenance).
    #[serde(default)]
    pub provenance: Option<JobProvenance>,
    /// Where the step that failed it is in the Dockerfile.
    #[serde(default)]
    pub failed_step: Option<FailedStep>,
    /// What its last measured attempt used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub footprint: Option<Footprint>,
    /// After it ran out of memory: only an agent with more memory than
    /// this may take it again (0: any).
    #[serde(default)]
    pub memory_floor: u64,
}

/// One platform's build inputs and builder, for its provenance statement:
/// the agent's report, checked, with what the coordinator knew of the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobProvenance {
    pub dockerfile_digest: String,
    /// (reference as written, digest or "").
    pub base_images: Vec<(String, String)>,
    /// The agent's certificate subject and serial ("" in plaintext mode).
    pub agent_identity: String,
    pub builder_name: String,
    pub builder_version: String,
}

impl JobProvenance {
    /// An agent's report, bounded; digests that do not parse are dropped
    /// (the base image stays, unresolved).
    pub fn from_report(report: proto::JobProvenance) -> JobProvenance {
        use braid_shared::limits::{PROVENANCE_BASE_IMAGES, PROVENANCE_REF_BYTES};
        let digest = |d: &str| d.parse::<Digest>().map(|d| d.to_string()).unwrap_or_default();
        JobProvenance {
            dockerfile_digest: digest(&report.dockerfile_digest),
            base_images: report
                .base_images
                .iter()
                .take(PROVENANCE_BASE_IMAGES)
                .map(|b| (braid_shared::shorten(&b.reference, PROVENANCE_REF_BYTES), digest(&b.digest)))
                .collect(),
            ..JobProvenance::default()
        }
    }
}

/// A failed step and its Dockerfile excerpt (`proto::FailedStep`), as an
/// agent reported it, cut to the limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedStep {
    pub step: String,
    pub dockerfile: String,
    pub line: u32,
    pub end_line: u32,
    pub first_line: u32,
    pub lines: Vec<String>,
}

impl FailedStep {
    /// An agent's report, bounded (`limits::EXCERPT_*`); None when empty.
    pub fn from_proto(f: &proto::FailedStep) -> Option<FailedStep> {
        use braid_shared::{limits, shorten};
        if f.step.is_empty() && f.lines.is_empty() {
            return None;
        }
        Some(FailedStep {
            step: shorten(&f.step, limits::FAILED_STEP_BYTES),
            dockerfile: shorten(&f.dockerfile, limits::FAILED_STEP_BYTES),
            line: f.line,
            end_line: f.end_line.max(f.line),
            first_line: f.first_line,
            lines: f.lines.iter().take(limits::EXCERPT_LINES).map(|l| shorten(l, limits::EXCERPT_LINE_BYTES)).collect(),
        })
    }

    pub fn to_proto(&self) -> proto::FailedStep {
        proto::FailedStep {
            step: self.step.clone(),
            dockerfile: self.dockerfile.clone(),
            line: self.line,
            end_line: self.end_line,
            first_line: self.first_line,
            lines: self.lines.clone(),
        }
    }
}

/// What one job used, as its agent measured it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Footprint {
    pub peak_memory_bytes: u64,
    pub cpu_millis: u64,
    pub out_of_memory: bool,
    pub memory_limit_bytes: u64,
    pub agent: String,
}

impl Footprint {
    pub fn from_proto(f: &braid_shared::proto::JobFootprint, agent: &str) -> Footprint {
        Footprint {
            peak_memory_bytes: f.peak_memory_bytes,
            cpu_millis: f.cpu_millis,
            out_of_memory: f.out_of_memory,
            memory_limit_bytes: f.memory_limit_bytes,
            agent: agent.to_owned(),
        }
    }

    pub fn to_proto(&self) -> braid_shared::proto::JobFootprint {
        braid_shared::proto::JobFootprint {
            peak_memory_bytes: self.peak_memory_bytes,
            cpu_millis: self.cpu_millis,
            out_of_memory: self.out_of_memory,
            memory_limit_bytes: self.memory_limit_bytes,
            agent: self.agent.clone(),
        }
    }
}

impl JobRecord {
    /// A job just submitted, queued since `now`.
    pub fn new(id: String, platform: Platform, now: i64) -> JobRecord {
        JobRecord {
            id,
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
            queued_ms: Some(now),
            log_bytes: 0,
            log_cut: false,
            log_dropped: 0,
            phases: Vec::new(),
            result_ms: None,
            provenance: None,
            failed_step: None,
            footprint: None,
            memory_floor: 0,
        }
    }

    /// The agent shown for it: the holder, else the last one.
    pub fn shown_agent(&self) -> &str {
        self.status.agent().unwrap_or(&self.last_agent)
    }

    pub fn to_proto(&self) -> proto::Job {
        proto::Job {
            job_id: self.id.clone(),
            platform: self.platform.to_string(),
            state: self.status.to_proto() as i32,
            agent: self.shown_agent().to_owned(),
            attempt: self.attempt,
            result: self.result.as_ref().map(Image::to_proto),
            message: self.message.clone(),
            started: self.started_ms.map(timestamp),
            finished: self.finished_ms.map(timestamp),
            emulated: self.emulated,
            phases: self.phases.iter().map(PhaseRecord::to_proto).collect(),
            failed_step: self.failed_step.as_ref().map(FailedStep::to_proto),
            footprint: self.footprint.as_ref().map(Footprint::to_proto),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildRecord {
    pub id: String,
    /// Submission order, for fair scheduling.
    pub order: u64,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    pub status: BuildStatus,
    pub message: String,
    pub jobs: Vec<JobRecord>,
    pub index: Option<Image>,
    /// The last event's number. The stored record may lag behind the
    /// events table (logs do not rewrite it); loading takes the larger.
    pub last_seq: u64,
    /// The id of the token that submitted it (None without tokens).
    #[serde(default)]
    pub owner: Option<String>,
    /// When the index merge started.
    #[serde(default)]
    pub merge_started_ms: Option<i64>,
}

/// What the merged index is: an OCI image index or a Docker manifest list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexFormat {
    Oci,
    Docker,
}

impl IndexFormat {
    /// The spec's `format` as validated: empty or "oci", or "docker".
    pub fn parse(word: &str) -> Option<IndexFormat> {
        match word {
            "" | "oci" => Some(IndexFormat::Oci),
            "docker" => Some(IndexFormat::Docker),
            _ => None,
        }
    }
}

/// Where an annotation goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnnotationLevel {
    Index,
    Manifest,
    ManifestDescriptor,
}

impl AnnotationLevel {
    pub fn parse(word: &str) -> Option<AnnotationLevel> {
        match word {
            "index" => Some(AnnotationLevel::Index),
            "manifest" => Some(AnnotationLevel::Manifest),
            "manifest-descriptor" => Some(AnnotationLevel::ManifestDescriptor),
            _ => None,
        }
    }
}
