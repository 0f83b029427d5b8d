//! `braid-agent`: builds the platforms of this host for a braid coordinator.
#![forbid(unsafe_code)]

mod cache;
mod docker;
mod job;
mod join;
mod prune;
mod session;
mod settings;
mod upload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use braid_shared::settings::Override;
use braid_shared::telemetry::{self, LogFormat};

/// Dials a braid coordinator, takes the jobs for this host's platforms,
/// builds them natively (buildah, podman or a Docker Engine) and pushes
/// them by digest.
///
/// Every flag is also a key of the --config TOML file and a BRAID_<KEY>
/// environment variable (e.g. BRAID_SLOTS); flags win over variables,
/// variables over the file.
#[derive(Debug, Parser)]
#[command(name = "braid-agent", version)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Coordinator URL [default: http://127.0.0.1:7700]
    #[arg(long, value_name = "URL")]
    coordinator: Option<String>,
    /// Name of this agent in the farm [default: the host name]
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// A platform this host builds, instead of the detected one (repeatable;
    /// e.g. an arm64 server that runs 32-bit code adds linux/arm/v7)
    #[arg(long = "platform", value_name = "PLATFORM")]
    platforms: Vec<String>,
    /// Jobs to run at once [default: 1]
    #[arg(long, value_name = "N")]
    slots: Option<u32>,
    /// Contexts, job directories and builder storage [default: ./braid-agent]
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// TOML settings file
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Dial the coordinator in plaintext; only to a loopback address
    #[arg(long)]
    insecure: bool,
    /// The cluster CA (PEM) [default: WORK_DIR/tls/ca.pem, written by join]
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// This agent's certificate (PEM) [default: WORK_DIR/tls/agent.pem]
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM) [default: WORK_DIR/tls/agent-key.pem]
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Builder backend: buildah, podman, docker or auto [default: auto:
    /// buildah if installed, else podman, else the Docker Engine]
    #[arg(long, value_name = "BACKEND")]
    backend: Option<String>,
    /// The Docker Engine's socket for the docker backend, unix://PATH or
    /// tcp://HOST:PORT [default: DOCKER_HOST, else unix:///var/run/docker.sock]
    #[arg(long, value_name = "HOST")]
    docker_host: Option<String>,
    /// Log format: pretty or json [default: pretty]
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
}

impl Args {
    fn overrides(&self) -> Vec<Override> {
        let mut o: Vec<Override> = Vec::new();
        if let Some(v) = &self.backend {
            o.push(("backend", v.clone().into()));
        }
        if let Some(v) = &self.docker_host {
            o.push(("docker_host", v.clone().into()));
        }
        if let Some(v) = &self.coordinator {
            o.push(("coordinator", v.clone().into()));
        }
        if let Some(v) = &self.name {
            o.push(("name", v.clone().into()));
        }
        if !self.platforms.is_empty() {
            o.push(("platforms", self.platforms.clone().into()));
        }
        if let Some(v) = self.slots {
            o.push(("slots", v.into()));
        }
        if let Some(v) = &self.work_dir {
            o.push(("work_dir", v.display().to_string().into()));
        }
        if self.insecure {
            o.push(("insecure", true.into()));
        }
        for (key, value) in [("tls_ca", &self.tls_ca), ("tls_cert", &self.tls_cert), ("tls_key", &self.tls_key)] {
            if let Some(v) = value {
                o.push((key, v.display().to_string().into()));
            }
        }
        if let Some(v) = self.log_format {
            o.push(("log_format", v.name().into()));
        }
        o
    }
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Enroll with a join token: get this agent's certificate from the
    /// coordinator and keep it in WORK_DIR/tls (once: an enrolled agent
    /// is left as it is)
    Join {
        /// A join token (`braid token create --role agent --single-use`)
        #[arg(long, env = "BRAID_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// The cluster CA (PEM), to verify the coordinator
        #[arg(long, value_name = "FILE")]
        ca: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let loaded: settings::Settings =
        braid_shared::settings::load(args.config.as_deref(), settings::KEYS, settings::LIST_KEYS, args.overrides())?;
    if let Some(Command::Join { token, ca }) = &args.command {
        return join::run(&loaded, token, ca).await;
    }
    telemetry::init(loaded.log_format);
    // Builders, layers and contexts can hold many files open at once.
    if let Err(e) = telemetry::raise_open_file_limit() {
        tracing::warn!(error = %e, "raising the open-file limit failed");
    }
    let valid = loaded.validate()?;
    let builder = check_backend(&valid).await?;
    std::fs::create_dir_all(&valid.settings.work_dir)?;
    // What a killed agent's jobs left: none of them runs any more.
    job::clear_job_dirs(&valid.settings.work_dir);
    tracing::info!(
        name = %valid.settings.name,
        platforms = ?valid.platforms.iter().map(ToString::to_string).collect::<Vec<_>>(),
        native = %valid.native,
        slots = valid.settings.slots,
        %builder,
        "agent starting"
    );
    let grace = Duration::from_secs(valid.settings.stop_grace_seconds.into());
    let stop = CancellationToken::new();
    let agent = session::Agent::new(valid);
    let run = tokio::spawn(agent.clone().run(stop.clone()));
    telemetry::shutdown_signal().await;
    stop_gracefully(&agent, grace).await;
    stop.cancel();
    let _ = run.await;
    Ok(())
}

/// First signal: take no new jobs and let running ones finish (up to
/// `grace`); a second signal, or the grace running out, cancels them and
/// hands them back to the coordinator.
async fn stop_gracefully(agent: &Arc<session::Agent>, grace: Duration) {
    agent.drain();
    tracing::info!(
        running = agent.running_jobs(),
        ?grace,
        "stopping: finishing running jobs (signal again to hand them back)"
    );
    let finished = tokio::select! {
        () = wait_idle(agent) => true,
        () = tokio::time::sleep(grace) => false,
        () = telemetry::shutdown_signal() => false,
    };
    if !finished {
        tracing::warn!(running = agent.running_jobs(), "handing running jobs back to the coordinator");
        agent.hand_back_all();
        let _ = tokio::time::timeout(Duration::from_secs(15), wait_idle(agent)).await;
    }
    // Let the session send what is queued.
    tokio::time::sleep(Duration::from_millis(500)).await;
    tracing::info!("agent stopped");
}

async fn wait_idle(agent: &session::Agent) {
    while !agent.idle() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Fails early, with how to fix it, when the builder is missing or broken;
/// returns its name and version.
async fn check_backend(valid: &settings::Valid) -> anyhow::Result<String> {
    let backend = valid.backend.as_str();
    if backend == "docker" {
        return match docker::check(&valid.docker_host).await {
            Ok(version) => Ok(format!("Docker Engine {version} at {}", valid.docker_host)),
            Err(e) if valid.backend_detected => anyhow::bail!(
                "no builder found: buildah and podman are not installed, and {e}; \
                 install one (apt-get install buildah) or start a Docker Engine"
            ),
            Err(e) => anyhow::bail!("the docker backend cannot reach the Engine: {e}; is dockerd running?"),
        };
    }
    let output = tokio::process::Command::new(backend).arg("--version").output().await;
    match output {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned()),
        Ok(o) => anyhow::bail!("{backend} --version failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => anyhow::bail!("{backend} not found ({e}); install it, e.g. apt-get install {backend}"),
    }
}
