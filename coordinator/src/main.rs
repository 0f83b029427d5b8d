//! `braid-coordinator`: the farm's gRPC server.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;

use braid_coordinator::server::{self, Coordinator};
use braid_coordinator::settings::{self, Settings};
use braid_shared::settings::Override;
use braid_shared::telemetry::{self, LogFormat};

/// Takes multi-platform builds and splits them across native agents.
///
/// Every flag is also a key of the --config TOML file and a BRAID_<KEY>
/// environment variable (e.g. BRAID_DATA_DIR); flags win over variables,
/// variables over the file.
#[derive(Debug, Parser)]
#[command(name = "braid-coordinator", version)]
struct Args {
    /// gRPC listen address [default: 127.0.0.1:7700]
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// HTTP listen address for /metrics, /healthz and /readyz [default: 127.0.0.1:7701]
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<String>,
    /// Where builds, events and contexts are kept [default: ./braid-data]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// TOML settings file
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Reach this registry over plain HTTP; passed on to agents (repeatable)
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,
    /// Serve plaintext gRPC; only allowed on a loopback address
    #[arg(long)]
    insecure: bool,
    /// Seconds without a heartbeat before an agent is lost [default: 30]
    #[arg(long, value_name = "SECONDS")]
    agent_lost_seconds: Option<u32>,
    /// Attempts per job before an agent or network failure fails the build [default: 3]
    #[arg(long, value_name = "N")]
    max_attempts: Option<u32>,
    /// Seconds between agent heartbeats [default: 5]
    #[arg(long, value_name = "SECONDS")]
    heartbeat_seconds: Option<u32>,
    /// Seconds a job may wait for an agent before its build fails; 0 waits forever [default: 1800]
    #[arg(long = "queue-timeout", value_name = "SECONDS")]
    queue_timeout_seconds: Option<u32>,
    /// Log format: pretty or json [default: pretty]
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
}

impl Args {
    fn overrides(&self) -> Vec<Override> {
        let mut o: Vec<Override> = Vec::new();
        if let Some(v) = &self.listen {
            o.push(("listen", v.clone().into()));
        }
        if let Some(v) = &self.http_listen {
            o.push(("http_listen", v.clone().into()));
        }
        if let Some(v) = &self.data_dir {
            o.push(("data_dir", v.display().to_string().into()));
        }
        if !self.insecure_registries.is_empty() {
            o.push(("insecure_registries", self.insecure_registries.clone().into()));
        }
        if self.insecure {
            o.push(("insecure", true.into()));
        }
        if let Some(v) = self.max_attempts {
            o.push(("max_attempts", v.into()));
        }
        if let Some(v) = self.heartbeat_seconds {
            o.push(("heartbeat_seconds", v.into()));
        }
        if let Some(v) = self.queue_timeout_seconds {
            o.push(("queue_timeout_seconds", v.into()));
        }
        if let Some(v) = self.agent_lost_seconds {
            o.push(("agent_lost_seconds", v.into()));
        }
        if let Some(v) = self.log_format {
            o.push((
                "log_format",
                match v {
                    LogFormat::Pretty => "pretty",
                    LogFormat::Json => "json",
                }
                .into(),
            ));
        }
        o
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings: Settings =
        braid_shared::settings::load(args.config.as_deref(), settings::KEYS, settings::LIST_KEYS, args.overrides())?;
    telemetry::init(settings.log_format);
    let (addr, http_addr) = settings.validate()?;
    let coordinator = Coordinator::open(settings).context("opening the coordinator's data directory")?;
    server::serve(coordinator, addr, http_addr, telemetry::shutdown_signal()).await?;
    tracing::info!("coordinator stopped");
    Ok(())
}
