//! `braid-agent`: builds the platforms of this host for a braid coordinator.
#![forbid(unsafe_code)]

mod builder;
mod cache;
mod cachecmd;
mod docker;
mod health;
mod job;
mod jobdir;
mod joblog;
mod join;
mod labels;
mod leftovers;
mod outbox;
mod prune;
mod renew;
mod secrets;
mod session;
mod settings;
mod ssh;
mod tlsfiles;
mod upload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};
use tokio_util::sync::CancellationToken;

use braid_shared::telemetry;

/// Dials a braid coordinator, takes the jobs for this host's platforms,
/// builds them natively (buildah, podman or a Docker Engine) and pushes
/// them by digest.
///
/// Every setting is a flag, a key of the --config TOML file and a
/// BRAID_<KEY> environment variable (e.g. BRAID_SLOTS); flags win over
/// variables, variables over the file, the file over the defaults.
/// examples/agent.toml lists every key.
#[derive(Debug, Parser)]
#[command(name = "braid-agent", version = braid_build_info::LONG_VERSION)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML settings file [default: none]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: settings::Settings,
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
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let loaded: settings::Settings = braid_shared::settings::load(args.config.as_deref(), &args.settings, &matches)?;
    if let Some(Command::Join { token, ca }) = &args.command {
        return join::run(&loaded, token, ca).await;
    }
    telemetry::init(loaded.log_format);
    // Builders, layers and contexts can hold many files open at once.
    if let Err(e) = telemetry::raise_open_file_limit() {
        tracing::warn!(error = %e, "raising the open-file limit failed");
    }
    let mut valid = loaded.validate()?;
    if valid.backend == "docker"
        && let Some(found) = probe_buildkit(&valid).await
    {
        valid.docker_buildkit = Some(found.cli);
        valid.docker_bridge = found.bridge;
    }
    valid.builder = builder::probe(&valid).await?;
    let builder =
        format!("{} {} ({})", valid.builder.name, valid.builder.version, valid.builder.capabilities.join(", "));
    std::fs::create_dir_all(&valid.settings.work_dir)?;
    // What a killed agent's jobs left: none of them runs any more.
    leftovers::sweep(&valid.settings.work_dir, &valid.secrets_dir);
    job::sweep_cgroups();
    if !secrets::in_memory(&valid.secrets_dir) {
        tracing::warn!(
            path = %valid.secrets_dir.display(),
            "no tmpfs for registry logins ($XDG_RUNTIME_DIR, /run, /dev/shm): they are written to disk for each job"
        );
    }
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
    let secrets_dir = valid.secrets_dir.clone();
    let renewing = valid.clone();
    let agent = session::Agent::new(valid);
    let run = tokio::spawn(agent.clone().run(stop.clone()));
    tokio::spawn(renew::run(renewing, agent.clone(), stop.clone()));
    telemetry::shutdown_signal().await;
    stop_gracefully(&agent, grace).await;
    stop.cancel();
    let _ = run.await;
    // Empty once every job has gone; nothing to leave in memory.
    let _ = std::fs::remove_dir(&secrets_dir);
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

/// Whether the docker backend builds with the Engine's BuildKit (through
/// the docker CLI) or the classic builder; the log says which and why.
async fn probe_buildkit(valid: &settings::Valid) -> Option<job::buildkit::Probed> {
    let cli = &valid.settings.docker_cli;
    match job::buildkit::probe(cli, &valid.docker_host).await {
        Ok(found) => {
            tracing::info!(
                cli = %found.cli.display(),
                engine = %found.engine_version,
                "docker backend: building with the Engine's BuildKit through {} (its build offers --secret and --ssh)",
                found.cli.display()
            );
            if !found.bridge {
                tracing::warn!(
                    "the Engine has no bridge network (dockerd --bridge=none): RUN steps of --network default \
                     run with none, as its classic builder runs them"
                );
            }
            Some(found)
        }
        Err(why) => {
            tracing::warn!(
                cli = %cli.display(),
                "docker backend: the Engine's classic builder (no --secret, --ssh or RUN --mount): {why}; \
                 set docker_cli to a docker CLI with BuildKit (Docker 20.10's own, or one with buildx)"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: &[&str], vars: &[(&str, &str)]) -> settings::Settings {
        let m =
            Args::command().try_get_matches_from(std::iter::once("braid-agent").chain(args.iter().copied())).unwrap();
        let args = Args::from_arg_matches(&m).unwrap();
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        braid_shared::settings::load_with_env(args.config.as_deref(), &args.settings, &m, vars.into_iter()).unwrap()
    }

    /// Every key is a documented flag, with its default.
    #[test]
    fn help_documents_every_key() {
        let gaps = braid_shared::settings::help_gaps::<settings::Settings>(&mut Args::command(), &[]);
        assert!(gaps.is_empty(), "{gaps:#?}");
    }

    /// examples/agent.toml names every key, loads through the real loader and
    /// validates, and sets only keys it says differ from the default.
    #[test]
    fn example_config_is_complete_and_true() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/agent.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let missing = braid_shared::settings::example_gaps::<settings::Settings>(&text);
        assert!(missing.is_empty(), "examples/agent.toml lacks {missing:?}");
        let config = path.to_str().unwrap();
        let (loaded, defaults) = (load(&["--config", config], &[]), settings::Settings::default());
        let (loaded, defaults) = (serde_json::to_value(loaded).unwrap(), serde_json::to_value(defaults).unwrap());
        let differ: Vec<&String> =
            defaults.as_object().unwrap().iter().filter(|(k, v)| loaded[k.as_str()] != **v).map(|(k, _)| k).collect();
        assert_eq!(differ, ["coordinator", "work_dir"], "a default changed?");
        // With the files `join` writes beneath a work dir that exists here.
        let work = tempfile::tempdir().unwrap();
        let tls = settings::tls_dir(work.path());
        std::fs::create_dir_all(&tls).unwrap();
        for file in ["ca.pem", "agent.pem", "agent-key.pem"] {
            std::fs::write(tls.join(file), "PEM").unwrap();
        }
        let work = work.path().to_str().unwrap();
        let valid = load(&["--config", config, "--work-dir", work, "--name", "pi-01"], &[]).validate().unwrap();
        assert!(valid.tls.is_some());
    }

    /// The keys that had no flag have one now; the old ones keep their spelling.
    #[test]
    fn flags_win_only_where_given() {
        let s = load(
            &["--emulation=false", "--stop-grace-seconds", "5", "--isolation", "oci", "--platform", "linux/arm64"],
            &[("BRAID_SLOTS", "3"), ("BRAID_BUILDER_CACHE_BYTES", "1"), ("BRAID_PLATFORMS", "linux/amd64,linux/386")],
        );
        assert_eq!((s.emulation, s.stop_grace_seconds, s.isolation.as_str()), (false, 5, "oci"));
        assert_eq!(
            (s.slots, s.builder_cache_bytes, s.platforms.as_slice()),
            (3, 1, ["linux/arm64".to_owned()].as_slice())
        );
        let s = load(&["--emulation", "--storage-driver", "vfs"], &[("BRAID_EMULATION", "false")]);
        assert!(s.emulation && s.storage_driver == "vfs");
        let s = load(&["join", "--token", "t", "--ca", "ca.pem"], &[("BRAID_EMULATION", "false")]);
        assert!(!s.emulation, "a variable stands when no flag is given");
        assert_eq!(load(&[], &[("BRAID_PLATFORMS", "linux/amd64,linux/386")]).platforms, ["linux/amd64", "linux/386"]);
    }
}
