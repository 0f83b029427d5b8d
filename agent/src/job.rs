//! One job: fetch the context, unpack it, build (buildah, podman or a
//! Docker Engine), export an OCI layout, push it by digest, report.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::BufReader;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use backon::BackoffBuilder as _;
use base64::Engine as _;
use braid_shared::context::{self, ContextLimits};
use braid_shared::oci::{self, Credential, ImageDescriptor, Registry};
use braid_shared::proto::{self, agent_message::Kind as ToCoordinator};
use braid_shared::{Digest, ImageRef, Platform, beneath, buildargs, limits};

use crate::cache::ContextCache;
use crate::joblog::{self, JobLog, Outgoing};
use crate::settings::Valid;
use crate::{docker, prune, upload};

/// How a job ended, in the coordinator's terms.
#[derive(Debug)]
pub enum Outcome {
    Image(ImageDescriptor),
    Failed(proto::FailureKind, String),
}

/// What a job needs from the agent around it.
pub struct JobEnv {
    pub settings: Valid,
    pub cache: Arc<ContextCache>,
    pub outbox: mpsc::UnboundedSender<Outgoing>,
    /// The agent-wide budget of log bytes queued for the coordinator.
    pub log_budget: Arc<tokio::sync::Semaphore>,
    pub engine_gate: Arc<docker::PlatformGate>,
    pub storage_locks: Arc<prune::StorageLocks>,
}

pub async fn run(env: Arc<JobEnv>, assignment: proto::Assignment, cancel: CancellationToken) -> proto::JobResult {
    let span = tracing::info_span!(
        "job",
        build_id = %assignment.build_id,
        job_id = %assignment.job_id,
        attempt = assignment.attempt,
        platform = %assignment.platform,
        agent = %env.settings.settings.name,
    );
    let mut phases = Phases::default();
    let outcome = async {
        tracing::info!("job started");
        let outcome = tokio::select! {
            outcome = execute(&env, &assignment, &cancel, &mut phases) => outcome,
            () = cancel.cancelled() => Outcome::Failed(proto::FailureKind::Cancelled, "cancelled".into()),
        };
        // A builder killed by the cancel fails too: it was the cancel.
        let outcome = match outcome {
            Outcome::Failed(..) if cancel.is_cancelled() => {
                Outcome::Failed(proto::FailureKind::Cancelled, "cancelled".into())
            }
            other => other,
        };
        match &outcome {
            Outcome::Image(d) => tracing::info!(digest = %d.digest, "job done"),
            Outcome::Failed(kind, message) => tracing::warn!(?kind, %message, "job failed"),
        }
        outcome
    }
    .instrument(span)
    .await;
    let outcome = match outcome {
        Outcome::Image(d) => proto::job_result::Outcome::Image(proto::ImageResult {
            digest: d.digest.to_string(),
            size: d.size,
            media_type: d.media_type,
        }),
        Outcome::Failed(kind, message) => {
            proto::job_result::Outcome::Failure(proto::JobFailure { kind: kind as i32, message })
        }
    };
    proto::JobResult {
        job_id: assignment.job_id,
        attempt: assignment.attempt,
        lease_id: assignment.lease_id,
        outcome: Some(outcome),
        phases: phases.0,
    }
}

fn infra(message: impl std::fmt::Display) -> Outcome {
    Outcome::Failed(proto::FailureKind::Infra, message.to_string())
}

fn build_failure(message: impl std::fmt::Display) -> Outcome {
    Outcome::Failed(proto::FailureKind::Build, message.to_string())
}

/// When each phase ran, reported with the result for timelines and metrics.
#[derive(Default)]
struct Phases(Vec<proto::PhaseTiming>);

fn now_timestamp() -> prost_types::Timestamp {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

impl Phases {
    fn done(&mut self, phase: &str, start: prost_types::Timestamp) {
        self.0.push(proto::PhaseTiming { phase: phase.to_owned(), start: Some(start), end: Some(now_timestamp()) });
    }
}

async fn execute(env: &JobEnv, a: &proto::Assignment, cancel: &CancellationToken, phases: &mut Phases) -> Outcome {
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

    let fetch_start = now_timestamp();
    let compressed = match env.cache.get(&digest, a).await {
        Ok(path) => path,
        Err(e) => return infra(format!("fetching context {digest}: {e}")),
    };
    let unpack_dir = context_dir.clone();
    let unpacked = job_dir
        .blocking(move || -> Result<_, String> {
            let file = std::fs::File::open(&compressed).map_err(|e| e.to_string())?;
            let decoder = braid_shared::compression::zstd_reader(file).map_err(|e| e.to_string())?;
            context::unpack(decoder, &unpack_dir, ContextLimits::default()).map_err(|e| e.to_string())
        })
        .await;
    match unpacked {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return build_failure(format!("unpacking the context: {e}")),
        Err(e) => return infra(format!("unpacking the context: {e}")),
    }

    phases.done("fetch", fetch_start);
    let build_start = now_timestamp();
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

    let insecure: Vec<String> = a.insecure_registries.clone();
    let credentials: Vec<Credential> = a.credentials.iter().map(Credential::from).collect();
    let layout = job_dir.path().join("layout");
    let job =
        BuildJob { env, a, spec, platform: &platform, job_dir: &job_dir, context_dir: &context_dir, layout: &layout };
    let built = if env.settings.backend == "docker" {
        build_with_docker(&job, &dockerfile_text, &credentials).await
    } else {
        build_with_containers(&job, &dockerfile, &insecure, &credentials, cancel).await
    };
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
    phases.done("build", build_start);
    let push_start = now_timestamp();
    let mut outcome = match oci::layout_descriptor(&layout).await {
        Ok(d) => Outcome::Image(d),
        Err(e) => infra(e),
    };
    if !a.push_repositories.is_empty() {
        outcome = push_everywhere(env, a, &layout, Registry::with_credentials(&insecure, credentials)).await;
    }
    if spec.export && matches!(outcome, Outcome::Image(_)) {
        match upload::upload_layout(&env.settings, a, &layout).await {
            Ok(bytes) => log_lines(env, a, vec![format!("uploaded {bytes} bytes of image blobs to the coordinator")]),
            Err(e) => outcome = infra(format!("uploading the image to the coordinator: {e}")),
        }
    }
    if !a.push_repositories.is_empty() || spec.export {
        phases.done("push", push_start);
    }
    outcome
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

/// buildah or podman: build into this platform's storage, then export.
async fn build_with_containers(
    job: &BuildJob<'_>,
    dockerfile: &Path,
    insecure: &[String],
    credentials: &[Credential],
    cancel: &CancellationToken,
) -> Result<(), Outcome> {
    let BuildJob { env, a, spec, platform, job_dir, context_dir, layout } = *job;
    // Keeps the storage from being cleared under this job.
    let storage_lock = env.storage_locks.for_storage(&prune::storage_name(platform));
    let _using = storage_lock.read().await;
    prune::touch(&prune::storage_dir(&env.settings.settings.work_dir, platform));
    let conf = match write_containers_conf(job_dir, insecure, credentials) {
        Ok(c) => c,
        Err(e) => return Err(infra(format!("writing registries.conf: {e}"))),
    };
    let iidfile = job_dir.path().join("iid");
    let mut bud = buildah(env, &conf, platform);
    bud.arg(if env.settings.backend == "podman" { "build" } else { "bud" })
        .arg("--signature-policy")
        .arg(&conf.policy)
        .arg("--platform")
        .arg(platform.to_string())
        .arg("--isolation")
        .arg(&env.settings.settings.isolation)
        .arg("--layers")
        .arg("--ignorefile")
        .arg(&conf.empty_ignore)
        .arg("--iidfile")
        .arg(&iidfile)
        .arg("-f")
        .arg(dockerfile);
    if spec.no_cache {
        bud.arg("--no-cache");
    }
    if !spec.target.is_empty() {
        bud.arg("--target").arg(&spec.target);
    }
    let mut args: Vec<(&String, &String)> = spec.build_args.iter().collect();
    args.sort();
    for (k, v) in args {
        bud.arg("--build-arg").arg(format!("{k}={v}"));
    }
    for (k, v) in buildargs::platform_args(platform, &env.settings.native) {
        bud.arg("--build-arg").arg(format!("{k}={v}"));
    }
    let mut labels: Vec<(&String, &String)> = spec.labels.iter().collect();
    labels.sort();
    for (k, v) in labels {
        bud.arg("--label").arg(format!("{k}={v}"));
    }
    for (key, value) in manifest_annotations(spec, platform) {
        bud.arg("--annotation").arg(format!("{key}={value}"));
    }
    bud.arg(context_dir);
    match run_logged(env, a, bud, job_dir, cancel).await {
        Ok(()) => {}
        Err(RunError::Exit(tail)) => return Err(build_failure(tail)),
        Err(RunError::Spawn(e)) => return Err(infra(format!("starting {}: {e}", env.settings.backend))),
    }
    let image_id = match tokio::fs::read_to_string(&iidfile).await {
        Ok(id) => id.trim().to_owned(),
        Err(e) => return Err(infra(format!("{} wrote no image id: {e}", env.settings.backend))),
    };
    let image_id = match stamp_platform(env, &conf, platform, image_id).await {
        Ok(id) => id,
        Err(e) => return Err(infra(format!("setting the image's platform: {e}"))),
    };

    let mut export = buildah(env, &conf, platform);
    export
        .arg("push")
        .arg("--signature-policy")
        .arg(&conf.policy)
        .arg("--format")
        .arg("oci")
        .arg("--quiet")
        .arg(&image_id)
        .arg(format!("oci:{}:image", layout.display()));
    run_logged(env, a, export, job_dir, cancel).await.map_err(|e| infra(format!("exporting the image: {e}")))
}

/// The Docker Engine: build through its API, then save and convert.
async fn build_with_docker(job: &BuildJob<'_>, dockerfile: &[u8], credentials: &[Credential]) -> Result<(), Outcome> {
    let BuildJob { env, a, spec, platform, job_dir, context_dir, layout } = *job;
    let engine = docker::connect(&env.settings.docker_host).await.map_err(infra)?;
    let mut build_args = spec.build_args.clone();
    build_args
        .extend(buildargs::platform_args(platform, &env.settings.native).into_iter().map(|(k, v)| (k.to_owned(), v)));
    let build = docker::BuildSpec {
        context_dir,
        dockerfile,
        platform,
        build_args,
        labels: spec.labels.clone(),
        target: &spec.target,
        no_cache: spec.no_cache,
        credentials,
    };
    if !env.engine_gate.is_open_for(platform) {
        log_lines(env, a, vec!["waiting for this agent's builds of another platform on the Docker Engine".into()]);
    }
    let pass = env.engine_gate.enter(platform).await;
    let mut log = JobLog::new(a, env.outbox.clone(), env.log_budget.clone());
    let built = docker::build(&engine, build, job_dir, &mut log).await;
    log.finish();
    let image_id = built.map_err(|e| match e {
        docker::DockerError::Build(message) => build_failure(message),
        other => infra(other),
    })?;
    drop(pass);
    docker::export_layout(&engine, &image_id, platform, manifest_annotations(spec, platform), job_dir, layout)
        .await
        .map_err(|e| infra(format!("exporting the image: {e}")))
}

/// Pushes to every repository, retrying registry errors with backoff.
async fn push_everywhere(env: &JobEnv, a: &proto::Assignment, layout: &Path, registry: Registry) -> Outcome {
    let mut descriptor = None;
    let patience = Duration::from_secs(env.settings.settings.push_retry_seconds.into());
    for raw in &a.push_repositories {
        let repository: ImageRef = match raw.parse() {
            Ok(r) => r,
            Err(e) => return build_failure(e),
        };
        match push_with_retries(env, a, layout, &registry, &repository, patience).await {
            Ok(d) => {
                log_lines(env, a, vec![format!("pushed {} to {}", d.digest, repository.name())]);
                descriptor = Some(d);
            }
            Err(outcome) => return outcome,
        }
    }
    match descriptor {
        Some(d) => Outcome::Image(d),
        None => infra("no repository to push to"),
    }
}

/// Pushes to one repository, retrying a registry that cannot be reached (or
/// answers 5xx, 408, 429) with exponential backoff and jitter for up to
/// `patience`: an outage shorter than that costs no attempt of the job. A
/// registry's refusal (401, 403, another 4xx) will not change by waiting or
/// on another agent: it fails the build at once, with its message.
async fn push_with_retries(
    env: &JobEnv,
    a: &proto::Assignment,
    layout: &Path,
    registry: &Registry,
    repository: &ImageRef,
    patience: Duration,
) -> Result<ImageDescriptor, Outcome> {
    let started = Instant::now();
    let mut delays = backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(30))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build();
    let mut attempt = 1;
    loop {
        let e = match registry.push_layout(layout, repository).await {
            Ok(d) => return Ok(d),
            Err(e) => e,
        };
        if !e.is_transient() {
            return Err(build_failure(format!("pushing to {}: {e}", repository.name())));
        }
        let left = patience.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(infra(format!(
                "pushing to {}: registry {} unreachable for {}s ({attempt} tries): {e}",
                repository.name(),
                repository.registry(),
                patience.as_secs()
            )));
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(30)).min(left);
        log_lines(
            env,
            a,
            vec![format!(
                "registry {} unreachable, retrying (attempt {attempt}, next in {:.1}s): {e}",
                repository.registry(),
                delay.as_secs_f64()
            )],
        );
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

/// Makes the image's config name the target platform, as BuildKit does.
/// buildah 1.28 writes `arm/v7` for `--platform linux/arm/v6` when the base
/// image (or `scratch`) carries no variant of its own.
async fn stamp_platform(
    env: &JobEnv,
    conf: &ContainersConf,
    platform: &Platform,
    image_id: String,
) -> Result<String, String> {
    let mut inspect = buildah(env, conf, platform);
    if env.settings.backend == "podman" {
        inspect.args(["image", "inspect", "--format", "{{.Os}}/{{.Architecture}}/{{.Variant}}"]);
    } else {
        inspect.args([
            "inspect",
            "--type",
            "image",
            "--format",
            "{{.OCIv1.OS}}/{{.OCIv1.Architecture}}/{{.OCIv1.Variant}}",
        ]);
    }
    let inspect = inspect.arg(&image_id).output().await.map_err(|e| e.to_string())?;
    let found = String::from_utf8_lossy(&inspect.stdout).trim().trim_end_matches('/').to_owned();
    if found.parse::<Platform>().is_ok_and(|p| p == *platform) {
        return Ok(image_id);
    }
    tracing::info!(%found, wanted = %platform, "rewriting the image config's platform");
    let run = |args: Vec<String>| {
        // The fix goes through buildah whatever the backend: podman shares
        // its storage, and has no command to rewrite an image's config.
        let mut cmd = buildah_on_storage(env, conf, platform);
        cmd.args(&args);
        async move {
            let out = cmd.output().await.map_err(|e| e.to_string())?;
            if out.status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
            }
        }
    };
    let container = run(vec!["from".into(), "--pull-never".into(), image_id.clone()]).await?;
    let mut config =
        vec!["config".into(), "--os".into(), platform.os().into(), "--arch".into(), platform.arch().into()];
    config.extend(["--variant".into(), platform.variant().unwrap_or_default().into()]);
    config.push(container.clone());
    let result = async {
        run(config).await?;
        run(vec![
            "commit".into(),
            "--quiet".into(),
            "--signature-policy".into(),
            conf.policy.display().to_string(),
            container.clone(),
        ])
        .await
    }
    .await;
    let _ = run(vec!["rm".into(), container]).await;
    result
}

/// Per-job containers configuration: which registries are plain HTTP, and
/// an accept-anything signature policy so no host-wide policy is needed.
struct ContainersConf {
    registries: PathBuf,
    policy: PathBuf,
    empty_ignore: PathBuf,
    /// Registry logins for pulls (0600, in the job's secrets directory on
    /// a tmpfs, removed with the job).
    auth: PathBuf,
}

/// Written without an await, each file new (`O_EXCL`, `O_NOFOLLOW`).
fn write_containers_conf(
    dir: &JobDir,
    insecure: &[String],
    credentials: &[Credential],
) -> std::io::Result<ContainersConf> {
    let job_dir = dir.path();
    let mut registries = String::from("unqualified-search-registries = [\"docker.io\"]\n");
    for r in insecure {
        registries.push_str(&format!("\n[[registry]]\nlocation = \"{r}\"\ninsecure = true\n"));
    }
    let conf = ContainersConf {
        registries: job_dir.join("registries.conf"),
        policy: job_dir.join("policy.json"),
        // The context was filtered by the client already; filtering again
        // with the root .dockerignore would undo a Dockerfile-specific one.
        empty_ignore: job_dir.join("empty.dockerignore"),
        auth: dir.secrets().join("auth.json"),
    };
    let mut auths = serde_json::Map::new();
    for c in credentials {
        let pair = zeroize::Zeroizing::new(format!("{}:{}", c.username, c.password.as_str()));
        let encoded = base64::engine::general_purpose::STANDARD.encode(pair.as_bytes());
        auths.insert(c.registry.clone(), serde_json::json!({ "auth": encoded }));
    }
    let auth = zeroize::Zeroizing::new(serde_json::json!({ "auths": auths }).to_string());
    beneath::create_new_file(&conf.auth, auth.as_bytes(), 0o600)?;
    beneath::create_new_file(&conf.registries, registries.as_bytes(), 0o644)?;
    beneath::create_new_file(&conf.policy, br#"{"default":[{"type":"insecureAcceptAnything"}]}"#, 0o644)?;
    beneath::create_new_file(&conf.empty_ignore, b"", 0o644)?;
    Ok(conf)
}

/// buildah with this agent's storage for `platform`. One storage per
/// platform: buildah's layer cache does not key on the platform (a
/// `FROM scratch` step cached for amd64 is reused for 386), and the
/// coordinator would rightly refuse the result.
fn buildah(env: &JobEnv, conf: &ContainersConf, platform: &Platform) -> Command {
    storage_command(&env.settings.backend, env, conf, platform)
}

fn buildah_on_storage(env: &JobEnv, conf: &ContainersConf, platform: &Platform) -> Command {
    storage_command("buildah", env, conf, platform)
}

/// `program` (buildah or podman, which share containers/storage) with this
/// agent's storage for `platform`.
fn storage_command(program: &str, env: &JobEnv, conf: &ContainersConf, platform: &Platform) -> Command {
    let s = &env.settings.settings;
    let storage = prune::storage_dir(&s.work_dir, platform);
    let mut cmd = Command::new(program);
    cmd.arg("--root")
        .arg(storage.join("root"))
        .arg("--runroot")
        .arg(prune::runroot(&storage))
        .arg("--storage-driver")
        .arg(&s.storage_driver)
        .env("CONTAINERS_REGISTRIES_CONF", &conf.registries)
        .env("REGISTRY_AUTH_FILE", &conf.auth)
        .env("BUILDAH_ISOLATION", &s.isolation);
    cmd
}

enum RunError {
    /// It ran and failed: the last lines of its output.
    Exit(String),
    Spawn(std::io::Error),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Exit(tail) => f.write_str(tail),
            RunError::Spawn(e) => write!(f, "{e}"),
        }
    }
}

/// Lines kept for a failure message.
const TAIL_LINES: usize = 12;

/// Runs a builder command in its own process group, streaming its output
/// as log lines; cancellation kills the whole group. The job directory
/// outlives the group: its output readers hold it until every process
/// that could write there has closed its output.
async fn run_logged(
    env: &JobEnv,
    a: &proto::Assignment,
    mut cmd: Command,
    job_dir: &JobDir,
    cancel: &CancellationToken,
) -> Result<(), RunError> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).kill_on_drop(true);
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    let pgid = child.id();
    let guard = KillGroupOnDrop(pgid);
    let mut log = JobLog::new(a, env.outbox.clone(), env.log_budget.clone());
    let (line_tx, mut line_rx) = mpsc::channel::<String>(joblog::CHANNEL_LINES);
    for reader in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = line_tx.clone();
        let keep = job_dir.clone();
        let shared = log.shared();
        tokio::spawn(async move {
            // Reads to the end even when no one listens any more (the job
            // was cancelled), so the directory lives as long as the group.
            joblog::read_lines(BufReader::new(reader), tx, shared).await;
            drop(keep);
        });
    }
    drop(line_tx);
    let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::with_capacity(TAIL_LINES);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            line = line_rx.recv() => match line {
                Some(line) => {
                    let line = braid_shared::shorten(&line, limits::LOG_LINE_BYTES);
                    if tail.len() == TAIL_LINES { tail.pop_front(); }
                    tail.push_back(line.clone());
                    log.push(line);
                }
                None => break,
            },
            _ = tick.tick() => log.flush(),
            () = cancel.cancelled() => break,
        }
    }
    log.finish();
    let status = tokio::select! {
        status = child.wait() => status.map_err(RunError::Spawn)?,
        () = cancel.cancelled() => {
            drop(guard);
            return Err(RunError::Exit("cancelled".into()));
        }
    };
    std::mem::forget(guard);
    if status.success() {
        return Ok(());
    }
    Err(RunError::Exit(failure_summary(&tail, status)))
}

/// The builder's own error line if it printed one, else its last lines.
fn failure_summary(tail: &std::collections::VecDeque<String>, status: std::process::ExitStatus) -> String {
    if let Some(err) = tail.iter().rev().find(|l| l.starts_with("Error: ")) {
        return err.trim_start_matches("Error: ").to_owned();
    }
    let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
    format!("builder exited with {status}: {}", lines.join(" | "))
}

/// A few lines of braid's own: they go past the log budget.
fn log_lines(env: &JobEnv, a: &proto::Assignment, lines: Vec<String>) {
    let message = proto::AgentMessage {
        kind: Some(ToCoordinator::Log(proto::JobLog { job_id: a.job_id.clone(), attempt: a.attempt, lines })),
    };
    let _ = env.outbox.send(message.into());
}

fn send_progress(env: &JobEnv, a: &proto::Assignment, state: proto::JobState) {
    let message = proto::AgentMessage {
        kind: Some(ToCoordinator::Progress(proto::JobProgress {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            state: state as i32,
        })),
    };
    let _ = env.outbox.send(message.into());
}

/// Kills a builder's whole process group when its job is dropped (cancelled).
struct KillGroupOnDrop(Option<u32>);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// A job's directory, removed when the last holder lets go: the job
/// itself, and any blocking task or builder process still writing under it
/// after the job was cancelled (removing it under such a writer would leave
/// what it wrote behind).
#[derive(Clone)]
pub struct JobDir(Arc<RemoveOnDrop>);

impl JobDir {
    /// Makes `path` and its `context` directory afresh (what a crashed
    /// agent left there is removed), and `secrets` (0700, on the agent's
    /// tmpfs) for the job's secret files; both go with the job. Synchronous
    /// on purpose: no await lies between holding them and having made them.
    pub fn create(path: PathBuf, secrets: PathBuf) -> Result<JobDir, String> {
        let dir = JobDir(Arc::new(RemoveOnDrop(path, secrets)));
        for stale in [dir.path(), dir.secrets()] {
            match std::fs::remove_dir_all(stale) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(format!("clearing {}: {e}", stale.display()));
                }
                _ => {}
            }
        }
        let path = dir.path();
        std::fs::create_dir_all(path.join("context")).map_err(|e| format!("creating {}: {e}", path.display()))?;
        let secrets = dir.secrets();
        secrets
            .parent()
            .map_or(Ok(()), crate::leftovers::private_dir)
            .and_then(|()| crate::leftovers::private_dir(secrets))
            .map_err(|e| format!("creating {}: {e}", secrets.display()))?;
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0.0
    }

    /// The job's directory for secret files: never under the work dir.
    pub fn secrets(&self) -> &Path {
        &self.0.1
    }

    /// Runs `f` on a blocking thread; the directory outlives it, even when
    /// the job is dropped first.
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        let keep = self.clone();
        tokio::task::spawn_blocking(move || {
            let result = f();
            drop(keep);
            result
        })
        .await
    }

    /// Runs `work` to its end even if the job is dropped meanwhile (for
    /// short local file work only); the directory outlives it.
    pub async fn detached<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        let keep = self.clone();
        tokio::spawn(async move {
            let result = work.await;
            drop(keep);
            result
        })
        .await
    }
}

/// Removes a job's directory and its secrets directory when dropped.
struct RemoveOnDrop(PathBuf, PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.1);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    async fn gone(path: &Path) -> bool {
        for _ in 0..500 {
            if !path.exists() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_cancelled_job_leaves_no_directory_even_behind_a_late_writer() {
        let work = tempfile::tempdir().unwrap();
        let path = work.path().join("jobs/j-1");
        std::fs::create_dir_all(path.join("stale")).unwrap();
        let secrets = work.path().join("secrets/j-1");
        let dir = JobDir::create(path.clone(), secrets.clone()).unwrap();
        assert!(path.join("context").is_dir());
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&secrets).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(!path.join("stale").exists(), "what a crashed agent left is cleared");

        // A blocking writer that is still running when its job is dropped,
        // as a cancel drops it: it makes directories under the job's.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let late = path.join("context/late/deeper");
        let mut job = Box::pin(dir.blocking(move || {
            let _ = wait.recv();
            std::fs::create_dir_all(&late)
        }));
        assert!(futures::poll!(&mut job).is_pending());
        drop(job);
        drop(dir);
        assert!(path.is_dir(), "the writer still holds the directory");
        go.send(()).unwrap();
        assert!(gone(&path).await, "removed once the last writer is done");
        assert!(!secrets.exists(), "and its secrets with it");
        assert!(std::fs::read_dir(work.path().join("jobs")).unwrap().next().is_none());
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

    #[tokio::test]
    async fn detached_work_finishes_before_the_directory_goes() {
        let work = tempfile::tempdir().unwrap();
        let path = work.path().join("jobs/j-2");
        let dir = JobDir::create(path.clone(), work.path().join("secrets/j-2")).unwrap();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let file = path.join("layout-file");
        let mut job = Box::pin(dir.detached(async move {
            let _ = wait.await;
            tokio::fs::write(&file, "x").await
        }));
        assert!(futures::poll!(&mut job).is_pending());
        drop(job);
        drop(dir);
        assert!(path.is_dir());
        go.send(()).unwrap();
        assert!(gone(&path).await);
        crate::leftovers::sweep(work.path(), &work.path().join("secrets"));
        assert!(!work.path().join("jobs").exists());
        assert!(work.path().join("secrets").is_dir(), "an empty secrets directory is ready");
    }
}
