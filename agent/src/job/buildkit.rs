//! The Docker backend through the Engine's BuildKit, driven by the docker
//! CLI (`DOCKER_BUILDKIT=1 docker build`): its session serves the job's
//! secrets (and, later, SSH agents) from files the agent writes, which the
//! Engine API's BuildKit session through bollard cannot. The result is
//! exported as the classic path exports it (`docker::export_layout`).
//!
//! The Engine's BuildKit (Docker 20.10) applies neither `--shm-size` nor
//! `--ulimit`: a job with `--shm-size` takes the classic builder, which
//! does; `--ulimit` is refused on both.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use braid_shared::oci::Credential;
use braid_shared::{Platform, beneath, buildargs, proto};

use super::process::{RunError, run_logged};
use super::{BuildJob, Outcome, infra, manifest_annotations};
use crate::docker;

/// What a BuildKit `docker build` is given besides the spec.
pub struct BuildkitArgs<'a> {
    pub spec: &'a proto::BuildSpec,
    pub platform: &'a Platform,
    /// The platform the agent runs on (BUILDPLATFORM).
    pub native: &'a Platform,
    /// The agent's copy of the Dockerfile, outside the context.
    pub dockerfile: &'a Path,
    pub iidfile: &'a Path,
    pub context: &'a Path,
    /// `--secret` ids and the files holding their values.
    pub secrets: &'a [(String, PathBuf)],
    /// `--ssh` ids and the job's sockets serving them (`crate::ssh`).
    pub ssh: &'a [(String, PathBuf)],
    /// `--cache-from REF` and the inline cache build argument
    /// (`cache::docker_cache_args`).
    pub cache: &'a [String],
    /// The Engine has no bridge network (`dockerd --bridge=none`): its
    /// classic builder runs RUN steps of the default network with none, and
    /// its BuildKit would fail them ("network bridge not found"), so they
    /// are given `--network none`, as the classic builder gives them.
    pub no_bridge: bool,
}

/// `docker build`'s arguments for a job. The SSH and cache flags
/// (`--ssh ID=SOCKET`, `--cache-from REF`, `--build-arg
/// BUILDKIT_INLINE_CACHE=1`) go before the context, the last argument.
pub fn docker_build_args(b: &BuildkitArgs<'_>) -> Vec<OsString> {
    let spec = b.spec;
    let mut args: Vec<OsString> = vec!["build".into(), "--progress=plain".into()];
    args.extend(["--platform".into(), b.platform.to_string().into()]);
    args.extend(["--iidfile".into(), b.iidfile.into(), "-f".into(), b.dockerfile.into()]);
    // FROM resolves to the platform's image in the registry, never a local
    // one of another platform under the same tag; `--pull` is honoured too.
    args.push("--pull".into());
    if spec.no_cache {
        args.push("--no-cache".into());
    }
    if !spec.target.is_empty() {
        args.extend(["--target".into(), spec.target.clone().into()]);
    }
    match spec.network.as_str() {
        "none" | "host" => args.extend(["--network".into(), spec.network.clone().into()]),
        _ if b.no_bridge => args.extend(["--network".into(), "none".into()]),
        _ => {}
    }
    for h in &spec.add_hosts {
        args.extend(["--add-host".into(), format!("{}:{}", h.host, h.ip).into()]);
    }
    let mut build_args: Vec<(&String, &String)> = spec.build_args.iter().collect();
    build_args.sort();
    for (k, v) in build_args {
        args.extend(["--build-arg".into(), format!("{k}={v}").into()]);
    }
    for (k, v) in buildargs::platform_args(b.platform, b.native) {
        args.extend(["--build-arg".into(), format!("{k}={v}").into()]);
    }
    let mut labels: Vec<(&String, &String)> = spec.labels.iter().collect();
    labels.sort();
    for (k, v) in labels {
        args.extend(["--label".into(), format!("{k}={v}").into()]);
    }
    for (id, file) in b.secrets {
        args.extend(["--secret".into(), format!("id={id},src={}", file.display()).into()]);
    }
    for (id, socket) in b.ssh {
        args.extend(["--ssh".into(), format!("{id}={}", socket.display()).into()]);
    }
    args.extend(b.cache.iter().map(OsString::from));
    args.push(b.context.into());
    args
}

/// Builds one job with the Engine's BuildKit through the docker CLI `cli`.
pub(super) async fn build(
    job: &BuildJob<'_>,
    cli: &Path,
    dockerfile: &Path,
    credentials: &[Credential],
    cancel: &CancellationToken,
) -> Result<(), Outcome> {
    let BuildJob { env, a, spec, platform, job_dir, context_dir, layout, ssh, .. } = *job;
    if let Some(why) = super::cache::docker_cache_refusal(spec) {
        return Err(super::build_failure(why));
    }
    let cache = super::cache::docker_cache_args(spec, platform);
    let cache_lines = super::cache::docker_cache_lines(spec, platform);
    if !cache_lines.is_empty() {
        super::log_lines(env, a, cache_lines);
    }
    let engine = docker::connect(&env.settings.docker_host).await.map_err(infra)?;
    let secrets = crate::secrets::write_build_secrets(job_dir.secrets(), &a.secrets).map_err(infra)?;
    let config_dir = write_docker_config(job_dir.secrets(), credentials)
        .map_err(|e| infra(format!("writing the job's Docker config: {e}")))?;
    // The context was filtered by the client already: an empty ignore file
    // next to the Dockerfile keeps the CLI from filtering it again.
    let mut ignore = dockerfile.as_os_str().to_owned();
    ignore.push(".dockerignore");
    let ignore = PathBuf::from(ignore);
    beneath::create_new_file(&ignore, b"", 0o644).map_err(|e| infra(format!("writing {}: {e}", ignore.display())))?;
    let iidfile = job_dir.path().join("iid");
    let args = docker_build_args(&BuildkitArgs {
        spec,
        platform,
        native: &env.settings.native,
        dockerfile,
        iidfile: &iidfile,
        context: context_dir,
        secrets: &secrets,
        ssh,
        cache: &cache,
        no_bridge: !env.settings.docker_bridge,
    });
    let mut cmd = Command::new(cli);
    cmd.args(&args)
        .env("DOCKER_BUILDKIT", "1")
        .env("DOCKER_HOST", &env.settings.docker_host)
        .env("DOCKER_CONFIG", &config_dir)
        .env_remove("DOCKER_CONTEXT")
        .env_remove("BUILDKIT_PROGRESS");
    if !env.engine_gate.is_open_for(platform) {
        super::log_lines(
            env,
            a,
            vec!["waiting for this agent's builds of another platform on the Docker Engine".into()],
        );
    }
    let pass = env.engine_gate.enter(platform).await;
    match run_logged(env, a, cmd, job_dir, cancel).await {
        Ok(()) => {}
        Err(RunError::Exit(message, step)) => return Err(super::step_failure(job, message, step.as_ref())),
        Err(RunError::Spawn(e)) => return Err(infra(format!("starting {}: {e}", cli.display()))),
    }
    drop(pass);
    let image_id = match tokio::fs::read_to_string(&iidfile).await {
        Ok(id) => id.trim().to_owned(),
        Err(e) => return Err(infra(format!("docker build wrote no image id: {e}"))),
    };
    docker::export_layout(&engine, &image_id, platform, manifest_annotations(spec, platform), job_dir, layout)
        .await
        .map_err(|e| infra(format!("exporting the image: {e}")))
}

/// A Docker config directory of the job's own (0700, in its secrets
/// directory) holding `config.json` (0600) with the registry logins.
fn write_docker_config(secrets_dir: &Path, credentials: &[Credential]) -> std::io::Result<PathBuf> {
    let dir = secrets_dir.join("docker-config");
    crate::secrets::private_dir(&dir)?;
    let mut auths = serde_json::Map::new();
    for c in credentials {
        let pair = zeroize::Zeroizing::new(format!("{}:{}", c.username, c.password.as_str()));
        let encoded = base64::engine::general_purpose::STANDARD.encode(pair.as_bytes());
        let key = if c.registry == "docker.io" { "https://index.docker.io/v1/".to_owned() } else { c.registry.clone() };
        auths.insert(key, serde_json::json!({ "auth": encoded }));
    }
    let config = zeroize::Zeroizing::new(serde_json::json!({ "auths": auths }).to_string());
    beneath::create_new_file(&dir.join("config.json"), config.as_bytes(), 0o600)?;
    Ok(dir)
}

/// Whether `cli` drives the Engine's BuildKit with secrets and SSH: `docker
/// build --help` (with BuildKit on) offers `--secret` and `--ssh`, and
/// `docker version` reaches the Engine at `host`. Returns what it found
/// (and whether the Engine has a bridge network), or why not.
pub async fn probe(cli: &Path, host: &str) -> Result<Probed, String> {
    let run = |args: &'static [&'static str]| {
        let mut cmd = Command::new(cli);
        cmd.args(args)
            .env("DOCKER_BUILDKIT", "1")
            .env("DOCKER_HOST", host)
            .env_remove("DOCKER_CONTEXT")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        async move {
            let shown = format!("DOCKER_BUILDKIT=1 {} {}", cli.display(), args.join(" "));
            match tokio::time::timeout(Duration::from_secs(20), cmd.output()).await {
                Err(_) => Err(format!("`{shown}` did not answer within 20 s")),
                Ok(Err(e)) => Err(format!("`{shown}`: {e}")),
                Ok(Ok(out)) if !out.status.success() => {
                    let said = String::from_utf8_lossy(&out.stderr);
                    let first = said.lines().find(|l| !l.trim().is_empty()).unwrap_or_default().trim().to_owned();
                    Err(format!("`{shown}` failed ({}): {first}", out.status))
                }
                Ok(Ok(out)) => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
            }
        }
    };
    let help = run(&["build", "--help"]).await?;
    for flag in ["--secret", "--ssh"] {
        if !help.contains(flag) {
            return Err(format!("`{} build --help` offers no {flag}", cli.display()));
        }
    }
    let version = run(&["version", "--format", "{{.Server.Version}}"]).await?.trim().to_owned();
    if version.is_empty() {
        return Err(format!("`{} version` did not reach the Engine at {host}", cli.display()));
    }
    let bridge = run(&["network", "inspect", "--format", "{{.Name}}", "bridge"]).await.is_ok();
    let resolved = if cli.components().count() > 1 { cli.to_owned() } else { on_path(cli).unwrap_or(cli.to_owned()) };
    Ok(Probed { cli: resolved, engine_version: version, bridge })
}

/// What the start-up probe found.
pub struct Probed {
    pub cli: PathBuf,
    pub engine_version: String,
    /// The Engine has its default bridge network.
    pub bridge: bool,
}

/// `program` resolved on PATH.
fn on_path(program: &Path) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(program)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_argument_list_carries_every_flag_and_ends_with_the_context() {
        let spec = proto::BuildSpec {
            build_args: [("B".to_owned(), "2".to_owned()), ("A".to_owned(), "1".to_owned())].into(),
            labels: [("l".to_owned(), "v".to_owned())].into(),
            target: "final".into(),
            no_cache: true,
            network: "none".into(),
            add_hosts: vec![proto::HostMapping { host: "db".into(), ip: "10.0.0.1".into() }],
            ..Default::default()
        };
        let platform: Platform = "linux/arm64".parse().unwrap();
        let native: Platform = "linux/amd64".parse().unwrap();
        let secrets = vec![("tok".to_owned(), PathBuf::from("/run/s/secret-0"))];
        let ssh = vec![("default".to_owned(), PathBuf::from("/run/s/ssh/0"))];
        let args = docker_build_args(&BuildkitArgs {
            spec: &spec,
            platform: &platform,
            native: &native,
            dockerfile: Path::new("/j/Dockerfile"),
            iidfile: Path::new("/j/iid"),
            context: Path::new("/j/context"),
            secrets: &secrets,
            ssh: &ssh,
            cache: &["--cache-from".to_owned(), "r.io/app:1".to_owned()],
            no_bridge: false,
        });
        let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        let joined = args.join(" ");
        for part in [
            "build --progress=plain --platform linux/arm64 --iidfile /j/iid -f /j/Dockerfile --pull --no-cache",
            "--target final --network none --add-host db:10.0.0.1 --build-arg A=1 --build-arg B=2",
            "--build-arg TARGETPLATFORM=linux/arm64",
            "--build-arg BUILDPLATFORM=linux/amd64",
            "--label l=v --secret id=tok,src=/run/s/secret-0 --ssh default=/run/s/ssh/0 --cache-from r.io/app:1 /j/context",
        ] {
            assert!(joined.contains(part), "{part:?} in {joined}");
        }
        assert_eq!(args.last().unwrap(), "/j/context");
    }

    #[test]
    fn the_docker_config_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let c = Credential { registry: "r.io".into(), username: "u".into(), password: "p".to_owned().into() };
        let dir = write_docker_config(tmp.path(), &[c]).unwrap();
        let file = dir.join("config.json");
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
        assert_eq!(json["auths"]["r.io"]["auth"], "dTpw");
    }

    #[tokio::test]
    async fn a_cli_without_buildkit_is_told_apart() {
        let e = probe(Path::new("/nonexistent/docker"), "unix:///nonexistent.sock").await.err().unwrap();
        assert!(e.contains("/nonexistent/docker"), "{e}");
    }
}
