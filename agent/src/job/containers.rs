//! buildah and podman: build into the platform's own storage, then export
//! the image as an OCI layout.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use braid_shared::oci::Credential;
use braid_shared::{Platform, beneath};

use super::cache::{CacheTally, buildah_cache};
use super::process::{RunError, run_logged, run_logged_watching};
use super::{BuildJob, JobEnv, Outcome, build_failure, infra, log_lines, manifest_annotations};
use crate::jobdir::JobDir;
use crate::prune;

/// buildah or podman: build into this platform's storage, then export.
pub(super) async fn build_with_containers(
    job: &BuildJob<'_>,
    dockerfile: &Path,
    insecure: &[String],
    credentials: &[Credential],
    cancel: &CancellationToken,
) -> Result<(), Outcome> {
    let BuildJob { env, a, spec, platform, job_dir, context_dir, layout, ssh, build_contexts, .. } = *job;
    // Keeps the storage from being cleared under this job.
    let storage_lock = env.storage_locks.for_storage(&prune::storage_name(platform));
    let _using = storage_lock.read().await;
    prune::touch(&prune::storage_dir(&env.settings.settings.work_dir, platform));
    let conf = match write_containers_conf(job_dir, insecure, credentials) {
        Ok(c) => c,
        Err(e) => return Err(infra(format!("writing registries.conf: {e}"))),
    };
    let secret_files = crate::secrets::write_build_secrets(job_dir.secrets(), &a.secrets).map_err(infra)?;
    if env.settings.settings.isolation == "chroot" {
        chroot_can_honour(spec, &env.settings.backend)?;
    }
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
    run_flags(&mut bud, spec);
    let limits = super::joblimits::Limits::of(spec, env.settings.memory_cap);
    super::joblimits::builder_flags(&mut bud, limits, &env.settings.settings.isolation);
    // The job's own sockets (crate::ssh), relayed to the client's agents.
    for (id, socket) in ssh {
        bud.arg("--ssh").arg(format!("{id}={}", socket.display()));
    }
    // RUN --mount=type=secret,id=ID sees them (paths without commas: the
    // secrets directory is braid's own).
    for (id, file) in &secret_files {
        bud.arg("--secret").arg(format!("id={id},src={}", file.display()));
    }
    for (name, value) in build_contexts {
        bud.arg("--build-context").arg(format!("{name}={value}"));
    }
    let cache = buildah_cache(spec, platform, &env.settings.backend).map_err(build_failure)?;
    bud.args(&cache.args);
    let mut args: Vec<(&String, &String)> = spec.build_args.iter().collect();
    args.sort();
    for (k, v) in args {
        bud.arg("--build-arg").arg(format!("{k}={v}"));
    }
    for (k, v) in super::declared_platform_args(job, &env.settings.native) {
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
    if !cache.lines.is_empty() {
        log_lines(env, a, cache.lines.clone());
    }
    let mut tally = CacheTally::default();
    let built = run_logged_watching(env, a, bud, job_dir, cancel, &mut |line| tally.observe(line)).await;
    let said = tally.summary(&cache, platform);
    if !said.is_empty() {
        log_lines(env, a, said);
    }
    match built {
        Ok(()) => {}
        Err(RunError::Exit(message, step)) => return Err(super::step_failure(job, message, step.as_ref())),
        Err(RunError::Spawn(e)) => return Err(infra(format!("starting {}: {e}", env.settings.backend))),
    }
    let image_id = match tokio::fs::read_to_string(&iidfile).await {
        Ok(id) => id.trim().to_owned(),
        Err(e) => return Err(infra(format!("{} wrote no image id: {e}", env.settings.backend))),
    };
    export(job, &conf, &image_id, cancel).await?;
    // The exported config says which platform the image declares: read
    // there rather than by asking the builder (a process per job).
    match braid_shared::oci::layout_config_platform(layout).await {
        Ok(found) if found == *platform => return Ok(()),
        Ok(found) => tracing::info!(%found, wanted = %platform, "rewriting the image config's platform"),
        Err(e) => return Err(infra(format!("reading the exported image's platform: {e}"))),
    }
    let image_id = match stamp_platform(env, &conf, platform, image_id).await {
        Ok(id) => id,
        Err(e) => return Err(infra(format!("setting the image's platform: {e}"))),
    };
    if let Err(e) = tokio::fs::remove_dir_all(layout).await {
        return Err(infra(format!("replacing the exported image {}: {e}", layout.display())));
    }
    export(job, &conf, &image_id, cancel).await
}

/// Writes the built image to the job's OCI layout.
async fn export(
    job: &BuildJob<'_>,
    conf: &ContainersConf,
    image_id: &str,
    cancel: &CancellationToken,
) -> Result<(), Outcome> {
    let BuildJob { env, a, platform, job_dir, layout, .. } = *job;
    let mut export = buildah(env, conf, platform);
    export
        .arg("push")
        .arg("--signature-policy")
        .arg(&conf.policy)
        .arg("--format")
        .arg("oci")
        .arg("--quiet")
        .arg(image_id)
        .arg(format!("oci:{}:image", layout.display()));
    run_logged(env, a, export, job_dir, cancel).await.map_err(|e| infra(format!("exporting the image: {e}")))
}

/// With `--isolation chroot`, buildah runs RUN steps in the host's network
/// and with the host's /dev/shm, whatever it is asked: refuse rather than
/// build without what the flag asks.
fn chroot_can_honour(spec: &braid_shared::proto::BuildSpec, backend: &str) -> Result<(), Outcome> {
    let refuse = |flag: &str, what: &str| {
        Err(build_failure(format!(
            "{flag}: this agent's {backend} runs RUN steps with --isolation chroot, {what}; \
             it needs an agent with isolation oci"
        )))
    };
    if spec.network == "none" {
        return refuse("--network none", "in the host's network");
    }
    if spec.shm_size_bytes != 0 {
        return refuse("--shm-size", "with the host's /dev/shm");
    }
    Ok(())
}

/// `--pull`, `--network`, `--add-host`, `--ulimit`, `--shm-size` as buildah
/// and podman spell them (`--pull=always` from buildah 1.23 on).
fn run_flags(bud: &mut Command, spec: &braid_shared::proto::BuildSpec) {
    if spec.pull {
        bud.arg("--pull=always");
    }
    match spec.network.as_str() {
        "none" | "host" => {
            bud.arg("--network").arg(&spec.network);
        }
        _ => {}
    }
    for h in &spec.add_hosts {
        bud.arg("--add-host").arg(format!("{}:{}", h.host, h.ip));
    }
    for u in &spec.ulimits {
        bud.arg("--ulimit").arg(format!("{}={}:{}", u.name, u.soft, u.hard));
    }
    if spec.shm_size_bytes != 0 {
        bud.arg("--shm-size").arg(format!("{}b", spec.shm_size_bytes));
    }
}

/// Makes the image's config name the target platform, as BuildKit does
/// (called when the exported config names another). buildah 1.28 writes
/// `arm/v7` for `--platform linux/arm/v6` when the base image (or
/// `scratch`) carries no variant of its own.
async fn stamp_platform(
    env: &JobEnv,
    conf: &ContainersConf,
    platform: &Platform,
    image_id: String,
) -> Result<String, String> {
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
