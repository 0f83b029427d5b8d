//! One job: fetch the context, unpack it, build (buildah, podman or a
//! Docker Engine), export an OCI layout, push it by digest, report.

pub mod buildkit;
pub mod cache;
mod containers;
mod joblimits;
mod named;
mod process;
mod provenance;
mod push;

use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use braid_shared::context::{self, ContextLimits};
use braid_shared::oci::{self, Credential, ImageDescriptor, Registry};
use braid_shared::proto::{self, agent_message::Kind as ToCoordinator};
use braid_shared::{Digest, Platform, beneath, buildargs, limits};

use crate::cache::ContextCache;
use crate::jobdir::JobDir;
use crate::joblog::JobLog;
use crate::outbox::Outbox;
use crate::settings::Valid;
use crate::{docker, prune, upload};

/// How a job ended, in the coordinator's terms.
#[derive(Debug)]
pub enum Outcome {
    /// The image, and its config's digest when the layout was read.
    Image(ImageDescriptor, Option<Digest>),
    Failed(proto::FailureKind, String),
    /// A build step failed: why, and where in the Dockerfile.
    StepFailed(String, Box<proto::FailedStep>),
}

/// What a job needs from the agent around it.
pub struct JobEnv {
    pub settings: Valid,
    pub cache: Arc<ContextCache>,
    pub outbox: Arc<Outbox>,
    /// The agent-wide budget of log bytes queued for the coordinator.
    pub log_budget: Arc<tokio::sync::Semaphore>,
    pub engine_gate: Arc<docker::PlatformGate>,
    pub storage_locks: Arc<prune::StorageLocks>,
}

pub async fn run(env: Arc<JobEnv>, mut assignment: proto::Assignment, cancel: CancellationToken) -> proto::JobResult {
    let span = tracing::info_span!(
        "job",
        build_id = %assignment.build_id,
        job_id = %assignment.job_id,
        attempt = assignment.attempt,
        platform = %assignment.platform,
        agent = %env.settings.settings.name,
    );
    let mut phases = Phases::default();
    let mut report = None;
    let mut footprint = None;
    let outcome = async {
        tracing::info!("job started");
        let outcome = tokio::select! {
            outcome = execute(&env, &assignment, &cancel, &mut phases, &mut report, &mut footprint) => outcome,
            () = cancel.cancelled() => Outcome::Failed(proto::FailureKind::Cancelled, "cancelled".into()),
        };
        // A builder killed by the cancel fails too: it was the cancel.
        let outcome = match outcome {
            Outcome::Failed(..) | Outcome::StepFailed(..) if cancel.is_cancelled() => {
                Outcome::Failed(proto::FailureKind::Cancelled, "cancelled".into())
            }
            other => other,
        };
        match &outcome {
            Outcome::Image(d, _) => tracing::info!(digest = %d.digest, "job done"),
            Outcome::Failed(kind, message) => tracing::warn!(?kind, %message, "job failed"),
            Outcome::StepFailed(message, step) => tracing::warn!(%message, step = %step.step, "job failed"),
        }
        outcome
    }
    .instrument(span)
    .await;
    // A failed or cancelled attempt keeps the phase it stopped in, up to now.
    phases.finish();
    // The files went with the job directory; the values go now.
    for s in &mut assignment.secrets {
        zeroize::Zeroize::zeroize(&mut s.value);
    }
    let outcome = match outcome {
        Outcome::Image(d, config) => proto::job_result::Outcome::Image(proto::ImageResult {
            digest: d.digest.to_string(),
            size: d.size,
            media_type: d.media_type,
            config_digest: config.map(|c| c.to_string()).unwrap_or_default(),
        }),
        Outcome::Failed(kind, message) => {
            proto::job_result::Outcome::Failure(proto::JobFailure { kind: kind as i32, message, failed_step: None })
        }
        Outcome::StepFailed(message, step) => proto::job_result::Outcome::Failure(proto::JobFailure {
            kind: proto::FailureKind::Build as i32,
            message,
            failed_step: Some(*step),
        }),
    };
    proto::JobResult {
        job_id: assignment.job_id,
        attempt: assignment.attempt,
        lease_id: assignment.lease_id,
        outcome: Some(outcome),
        phases: phases.0,
        provenance: report,
        footprint,
    }
}

fn infra(message: impl std::fmt::Display) -> Outcome {
    Outcome::Failed(proto::FailureKind::Infra, message.to_string())
}

fn build_failure(message: impl std::fmt::Display) -> Outcome {
    Outcome::Failed(proto::FailureKind::Build, message.to_string())
}

/// A builder that ran and failed: its message, and the Dockerfile lines of
/// the step it failed at when the step's numbering fits the Dockerfile.
fn step_failure(job: &BuildJob<'_>, message: String, step: Option<&braid_shared::steps::Step>) -> Outcome {
    let Some(step) = step else { return build_failure(message) };
    let mut failed = proto::FailedStep {
        step: braid_shared::shorten(&step.label(), limits::FAILED_STEP_BYTES),
        dockerfile: if job.spec.dockerfile_path.is_empty() {
            "Dockerfile".to_owned()
        } else {
            braid_shared::shorten(&job.spec.dockerfile_path, limits::FAILED_STEP_BYTES)
        },
        ..Default::default()
    };
    if let Ok(listing) = braid_shared::instructions::list(job.dockerfile_text)
        && let Some(found) = listing.locate(step)
    {
        let excerpt = listing.excerpt(found);
        failed.line = excerpt.line;
        failed.end_line = excerpt.end_line;
        failed.first_line = excerpt.first_line;
        failed.lines = excerpt.lines;
    }
    Outcome::StepFailed(message, Box::new(failed))
}

/// The automatic platform ARGs (BuildKit's values) the Dockerfile declares
/// or names on a FROM line: given undeclared, buildah and the classic
/// builder warn that they were not consumed.
fn declared_platform_args(job: &BuildJob<'_>, native: &Platform) -> Vec<(String, String)> {
    let declared = braid_shared::instructions::list(job.dockerfile_text).map(|l| l.arg_names()).unwrap_or_default();
    buildargs::platform_args(job.platform, native).into_iter().filter(|(k, _)| declared.contains(k)).collect()
}

/// When each phase ran, reported with the result for timelines and metrics;
/// the phase under way is closed by the next one, or by `finish` when the
/// attempt ends (a failure or a cancel keeps it, up to the end).
#[derive(Default)]
struct Phases(Vec<proto::PhaseTiming>, Option<(&'static str, prost_types::Timestamp)>);

fn now_timestamp() -> prost_types::Timestamp {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

impl Phases {
    fn begin(&mut self, phase: &'static str) {
        self.finish();
        self.1 = Some((phase, now_timestamp()));
    }

    fn finish(&mut self) {
        if let Some((phase, start)) = self.1.take() {
            self.0.push(proto::PhaseTiming { phase: phase.to_owned(), start: Some(start), end: Some(now_timestamp()) });
        }
    }
}

async fn execute(
    env: &JobEnv,
    a: &proto::Assignment,
    cancel: &CancellationToken,
    phases: &mut Phases,
    report: &mut Option<proto::JobProvenance>,
    footprint: &mut Option<proto::JobFootprint>,
) -> Outcome {
    let Some(spec) = &a.spec else {
        return build_failure("assignment without a build spec");
    };
    let platform: Platform = match a.platform.parse() {
        Ok(p) => p,
        Err(e) => return build_failure(e),
    };
    let digest: Digest = match spec.context_digest.parse() {
        Ok(d) => d,
        Err(e) => return build_failure(e),
    };
    let jobs = env.settings.settings.work_dir.join("jobs");
    // Made without an await, so a cancel cannot leave a half-made
    // directory behind a blocking task that outlives the job.
    let name = format!("{}-{}", a.job_id, a.attempt);
    let job_dir = match JobDir::create(jobs.join(&name), env.settings.secrets_dir.join(&name)) {
        Ok(dir) => dir,
        Err(e) => return infra(e),
    };
    let context_dir = job_dir.path().join("context");
    send_progress(env, a, proto::JobState::Building);

    phases.begin("fetch");
    let compressed = match env.cache.get(&digest, a).await {
        Ok(path) => path,
        Err(e) => return infra(format!("fetching context {digest}: {e}")),
    };
    if let Err(failed) = unpack_context(&job_dir, compressed, context_dir.clone(), "the context").await {
        return failed;
    }

    phases.begin("build");
    let dockerfile_text = if spec.dockerfile_inline.is_empty() {
        match read_context_dockerfile(&context_dir, &spec.dockerfile_path) {
            Ok(text) => text,
            Err(failed) => return failed,
        }
    } else {
        spec.dockerfile_inline.clone()
    };
    // The builder is given this copy, outside the context, so it never
    // resolves the Dockerfile's path itself.
    let dockerfile = job_dir.path().join("Dockerfile");
    if let Err(e) = beneath::create_new_file(&dockerfile, &dockerfile_text, 0o644) {
        return infra(format!("writing {}: {e}", dockerfile.display()));
    }

    if let Err(refused) = named::check_needs(env, spec, &platform, &dockerfile_text) {
        return refused;
    }
    // Backstops of the coordinator's check (see builder.rs).
    if spec.network == "host" && !env.settings.settings.allow_network_host {
        return build_failure(format!(
            "--network host: agent {} does not let builds use its host's network (allow_network_host = false)",
            env.settings.settings.name
        ));
    }
    if let Some(message) =
        braid_shared::ssh::unserved_required_mount(&String::from_utf8_lossy(&dockerfile_text), &spec.ssh_ids)
    {
        return build_failure(message);
    }
    // Held until the job ends: the sockets and their tunnel stop with it.
    let ssh = match crate::ssh::SshSockets::start(&env.settings, a, &job_dir) {
        Ok(ssh) => ssh,
        Err(e) => return infra(e),
    };
    let ssh_sockets = ssh.as_ref().map(|s| s.sockets()).unwrap_or_default();
    let insecure: Vec<String> = a.insecure_registries.clone();
    let credentials: Vec<Credential> = a.credentials.iter().map(Credential::from).collect();
    let layout = job_dir.path().join("layout");
    let build_contexts = match named::fetch_build_contexts(env, a, spec, &job_dir).await {
        Ok(c) => c,
        Err(failed) => return failed,
    };
    let job = BuildJob {
        env,
        a,
        spec,
        platform: &platform,
        job_dir: &job_dir,
        context_dir: &context_dir,
        layout: &layout,
        ssh: ssh_sockets,
        build_contexts: &build_contexts,
        dockerfile_text: &dockerfile_text,
    };
    let (cgroup, said) = job_cgroup(env, spec, &name);
    if !said.is_empty() {
        log_lines(env, a, said);
    }
    let cgroup = cgroup.map(Arc::new);
    let built = joblimits::CGROUP
        .scope(cgroup.clone(), async {
            if env.settings.backend == "docker" {
                build_with_docker(&job, &dockerfile_text, &dockerfile, &credentials, cancel).await
            } else {
                containers::build_with_containers(&job, &dockerfile, &insecure, &credentials, cancel).await
            }
        })
        .await;
    *footprint = cgroup.as_ref().map(|c| c.footprint());
    if let Err(failed) = built {
        return failed;
    }
    if spec.format == "docker" {
        let converting = layout.clone();
        match job_dir.detached(async move { oci::layout_to_docker(&converting).await }).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return build_failure(format!("--format docker: {e}")),
            Err(e) => return infra(format!("--format docker: {e}")),
        }
    }
    phases.finish();
    if !spec.provenance_mode.is_empty() {
        let registry = Registry::with_credentials(&insecure, credentials.clone());
        *report = Some(provenance::report(spec, &dockerfile_text, &registry).await);
    }
    if !a.push_repositories.is_empty() || spec.export {
        phases.begin("push");
    }
    // Reported for the metadata file's containerimage.config.digest; the
    // layout was just written, so a failure here is the agent's.
    let config_digest = match oci::layout_config_digest(&layout).await {
        Ok(c) => c,
        Err(e) => return infra(e),
    };
    let mut outcome = match oci::layout_descriptor(&layout).await {
        Ok(d) => Outcome::Image(d, None),
        Err(e) => infra(e),
    };
    if !a.push_repositories.is_empty() {
        outcome = push::push_everywhere(env, a, &layout, Registry::with_credentials(&insecure, credentials)).await;
    }
    if let Outcome::Image(_, config) = &mut outcome {
        *config = Some(config_digest);
    }
    if spec.export && matches!(outcome, Outcome::Image(..)) {
        match upload::upload_layout(&env.settings, a, &layout).await {
            Ok(bytes) => log_lines(env, a, vec![format!("uploaded {bytes} bytes of image blobs to the coordinator")]),
            Err(e) => outcome = infra(format!("uploading the image to the coordinator: {e}")),
        }
    }
    phases.finish();
    outcome
}

/// Removes the empty job cgroups an earlier run of the agent left.
pub fn sweep_cgroups() {
    joblimits::sweep();
}

/// The job's cgroup and what to say of its limits; the docker backend's
/// builds run in the Engine, out of the agent's reach.
fn job_cgroup(env: &JobEnv, spec: &proto::BuildSpec, name: &str) -> (Option<joblimits::JobCgroup>, Vec<String>) {
    let agent = &env.settings.settings.name;
    let limits = joblimits::Limits::of(spec, env.settings.memory_cap);
    if env.settings.backend == "docker" {
        let wanted = limits.memory != 0 || limits.cpus != 0;
        let why = format!("braid: limits not enforced on agent {agent}: the docker backend builds in the Engine");
        return (None, if wanted { vec![why] } else { Vec::new() });
    }
    joblimits::start(name, limits, &env.settings.settings.isolation, agent)
}

/// Unpacks a fetched context (the zstd tar at `compressed`) into `dir`
/// beneath the job directory; `what` names it in the failure. A context
/// that does not unpack fails the build; a task that could not run, the
/// agent.
async fn unpack_context(
    job_dir: &JobDir,
    compressed: std::path::PathBuf,
    dir: std::path::PathBuf,
    what: &str,
) -> Result<(), Outcome> {
    let unpacked = job_dir
        .blocking(move || -> Result<_, String> {
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let file = std::fs::File::open(&compressed).map_err(|e| e.to_string())?;
            let decoder = braid_shared::compression::zstd_reader(file).map_err(|e| e.to_string())?;
            context::unpack(decoder, &dir, ContextLimits::default()).map_err(|e| e.to_string())
        })
        .await;
    match unpacked {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(build_failure(format!("unpacking {what}: {e}"))),
        Err(e) => Err(infra(format!("unpacking {what}: {e}"))),
    }
}

/// The context's Dockerfile, read beneath the context directory: a path
/// that is missing, or that leads out through a link (whatever lies
/// outside), or is not a regular file, fails the build, and the two
/// answers depend on the context alone.
fn read_context_dockerfile(context_dir: &Path, path: &str) -> Result<Vec<u8>, Outcome> {
    let root = beneath::Root::open(context_dir).map_err(|e| infra(format!("opening the context: {e}")))?;
    root.read_file(path, limits::DOCKERFILE_BYTES as u64).map_err(|e| match e {
        beneath::BeneathError::NotFound { .. } => {
            build_failure(format!("Dockerfile {path:?} not found in the context"))
        }
        beneath::BeneathError::Refused { .. } => build_failure(format!(
            "Dockerfile {path:?} refused: it is not a regular file inside the context (a link on its path may lead out)"
        )),
        beneath::BeneathError::TooLarge { limit, .. } => {
            build_failure(format!("Dockerfile {path:?} is larger than the limit of {limit} bytes"))
        }
        beneath::BeneathError::Io { source, .. } => build_failure(format!("reading Dockerfile {path:?}: {source}")),
    })
}

/// One job's build, whichever backend runs it: it leaves a one-image OCI
/// layout at `layout`.
struct BuildJob<'a> {
    env: &'a JobEnv,
    a: &'a proto::Assignment,
    spec: &'a proto::BuildSpec,
    platform: &'a Platform,
    job_dir: &'a JobDir,
    context_dir: &'a Path,
    layout: &'a Path,
    /// Each `--ssh` id and the socket serving it (`crate::ssh`), for the
    /// builder's `--ssh ID=PATH`.
    ssh: &'a [(String, std::path::PathBuf)],
    /// `--build-context` entries: name and what the builder is given.
    build_contexts: &'a [(String, String)],
    /// The Dockerfile's bytes (what its copy at `Dockerfile` holds).
    dockerfile_text: &'a [u8],
}

/// The `manifest`-level annotations that apply to `platform`.
fn manifest_annotations(spec: &proto::BuildSpec, platform: &Platform) -> std::collections::BTreeMap<String, String> {
    spec.annotations
        .iter()
        .filter(|an| an.level == "manifest")
        .filter(|an| an.platform.is_empty() || an.platform.parse::<Platform>().ok().as_ref() == Some(platform))
        .map(|an| (an.key.clone(), an.value.clone()))
        .collect()
}

/// The Docker Engine: its BuildKit through the docker CLI where the agent
/// found one at start, else (and for `--shm-size`, which the Engine's
/// BuildKit ignores) its classic builder through the API; then save and
/// convert.
async fn build_with_docker(
    job: &BuildJob<'_>,
    dockerfile: &[u8],
    dockerfile_path: &Path,
    credentials: &[Credential],
    cancel: &CancellationToken,
) -> Result<(), Outcome> {
    let BuildJob { env, a, spec, platform, job_dir, context_dir, layout, .. } = *job;
    if !job.build_contexts.is_empty() {
        return Err(build_failure(
            "--build-context is not supported by this agent's Docker Engine backend (neither its classic builder nor Docker 20.10's BuildKit client)",
        ));
    }
    // Neither builder applies ulimits (the API's classic builder gets none
    // from bollard, the Engine's BuildKit ignores them): fail rather than
    // build without them.
    if !spec.ulimits.is_empty() {
        return Err(build_failure(
            "--ulimit is not supported by this agent's Docker Engine backend; use a buildah or podman agent",
        ));
    }
    match &env.settings.docker_buildkit {
        Some(cli) if spec.shm_size_bytes == 0 => {
            return buildkit::build(job, cli, dockerfile_path, credentials, cancel).await;
        }
        Some(_) if !spec.secrets.is_empty() || !job.ssh.is_empty() => {
            return Err(build_failure(
                "--shm-size with --secret or --ssh: this agent's Docker Engine applies --shm-size only with its \
                 classic builder, which has neither; use a buildah agent with isolation oci",
            ));
        }
        Some(_) => log_lines(
            env,
            a,
            vec!["--shm-size: building with the Engine's classic builder (its BuildKit ignores --shm-size)".into()],
        ),
        None if !spec.secrets.is_empty() || !job.ssh.is_empty() => {
            let flag = if spec.secrets.is_empty() { "--ssh" } else { "--secret" };
            return Err(build_failure(format!(
                "{flag}: agent {} builds with the Docker Engine's classic builder, which has no secrets or SSH \
                 forwarding (its docker_cli offers no BuildKit); use a buildah agent or set docker_cli",
                env.settings.settings.name
            )));
        }
        None => {}
    }
    // The classic builder reads no registry cache and writes none.
    if !spec.cache_from.is_empty() || !spec.cache_to.is_empty() {
        return Err(build_failure(
            "--cache-from/--cache-to: this agent's Docker Engine builds with its classic builder here (no BuildKit \
             docker_cli, or --shm-size), which uses no cache; use a buildah or podman agent",
        ));
    }
    let engine = docker::connect(&env.settings.docker_host).await.map_err(infra)?;
    let mut build_args = spec.build_args.clone();
    build_args.extend(declared_platform_args(job, &env.settings.native));
    let build = docker::BuildSpec {
        context_dir,
        dockerfile,
        platform,
        build_args,
        labels: spec.labels.clone(),
        target: &spec.target,
        no_cache: spec.no_cache,
        credentials,
        network: &spec.network,
        add_hosts: &spec.add_hosts,
        shm_size_bytes: spec.shm_size_bytes,
    };
    if !env.engine_gate.is_open_for(platform) {
        log_lines(env, a, vec!["waiting for this agent's builds of another platform on the Docker Engine".into()]);
    }
    let pass = env.engine_gate.enter(platform).await;
    let mut log = JobLog::new(a, env.outbox.clone(), env.log_budget.clone());
    let mut tracker = braid_shared::steps::Tracker::default();
    let built = docker::build(&engine, build, job_dir, &mut log, &mut tracker).await;
    log.finish();
    let image_id = built.map_err(|e| match e {
        docker::DockerError::Build(message) => step_failure(job, message, tracker.failed_step()),
        other => infra(other),
    })?;
    drop(pass);
    docker::export_layout(&engine, &image_id, platform, manifest_annotations(spec, platform), job_dir, layout)
        .await
        .map_err(|e| infra(format!("exporting the image: {e}")))
}

/// A few lines of braid's own: they go past the log budget.
fn log_lines(env: &JobEnv, a: &proto::Assignment, lines: Vec<String>) {
    let message = proto::AgentMessage {
        kind: Some(ToCoordinator::Log(proto::JobLog { job_id: a.job_id.clone(), attempt: a.attempt, lines })),
        seq: 0,
    };
    env.outbox.push(message);
}

fn send_progress(env: &JobEnv, a: &proto::Assignment, state: proto::JobState) {
    let message = proto::AgentMessage {
        kind: Some(ToCoordinator::Progress(proto::JobProgress {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            state: state as i32,
        })),
        seq: 0,
    };
    env.outbox.push(message);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_phase_under_way_is_kept_when_the_attempt_stops() {
        let mut phases = Phases::default();
        phases.begin("fetch");
        phases.begin("build");
        // The build fails here: run() closes what is open.
        phases.finish();
        phases.finish();
        let names: Vec<&str> = phases.0.iter().map(|p| p.phase.as_str()).collect();
        assert_eq!(names, ["fetch", "build"]);
        assert!(phases.0.iter().all(|p| p.start.is_some() && p.end.is_some()));
    }

    fn failure_of(result: Result<Vec<u8>, Outcome>) -> String {
        match result {
            Err(Outcome::Failed(proto::FailureKind::Build, message)) => message,
            Err(other) => panic!("not a build failure: {other:?}"),
            Ok(bytes) => panic!("read {:?}", String::from_utf8_lossy(&bytes)),
        }
    }

    /// Behind the unpacker's own checks: a context whose links lead out
    /// (made here on disk directly) still cannot hand the agent a host file.
    #[test]
    fn the_dockerfile_is_read_beneath_the_context_and_answers_the_same_whatever_is_outside() {
        let outer = tempfile::tempdir().unwrap();
        std::fs::write(outer.path().join("host.Dockerfile"), "FROM scratch\n").unwrap();
        let context = outer.path().join("job/context");
        std::fs::create_dir_all(context.join("sub")).unwrap();
        std::fs::write(context.join("sub/Dockerfile"), "FROM busybox\n").unwrap();
        std::os::unix::fs::symlink(".", context.join("l0")).unwrap();
        for i in 1..7 {
            std::os::unix::fs::symlink(format!("l{}/..", i - 1), context.join(format!("l{i}"))).unwrap();
        }
        std::os::unix::fs::symlink(outer.path().join("host.Dockerfile"), context.join("abs")).unwrap();
        std::os::unix::fs::symlink("sub/Dockerfile", context.join("Dockerfile")).unwrap();

        assert_eq!(read_context_dockerfile(&context, "Dockerfile").unwrap(), b"FROM busybox\n", "a link inside");
        let existing = failure_of(read_context_dockerfile(&context, "l2/host.Dockerfile"));
        assert!(existing.contains("refused"), "{existing}");
        let missing = failure_of(read_context_dockerfile(&context, "l2/missing.Dockerfile"));
        assert_eq!(
            existing.replace("host.Dockerfile", "X"),
            missing.replace("missing.Dockerfile", "X"),
            "an escape answers the same whether the host file exists or not"
        );
        assert!(failure_of(read_context_dockerfile(&context, "abs")).contains("refused"));
        assert!(failure_of(read_context_dockerfile(&context, "sub")).contains("refused"));
        let absent = failure_of(read_context_dockerfile(&context, "nothing"));
        assert_eq!(absent, "Dockerfile \"nothing\" not found in the context");
    }
}
