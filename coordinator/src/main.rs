//! `braid-coordinator`: the farm's gRPC server.

use std::path::PathBuf;

use anyhow::Context as _;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use braid_coordinator::auth::{Role, Tokens};
use braid_coordinator::store::Store;

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
    #[command(subcommand)]
    command: Option<Command>,
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
    /// Serve plaintext gRPC without tokens; only allowed on a loopback address
    #[arg(long)]
    insecure: bool,
    /// TLS certificate of the coordinator (PEM; `braid certs init` makes one)
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Private key of that certificate (PEM)
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The cluster CA (PEM) agents' certificates must chain to
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// The cluster CA's key, to sign the certificates of agents that join with a token
    #[arg(long, value_name = "FILE")]
    tls_ca_key: Option<PathBuf>,
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
    /// Open connections per listener (gRPC, HTTP), handshaking ones included;
    /// lowered to fit the open-file limit [default: 4096]
    #[arg(long, value_name = "N")]
    max_connections: Option<u32>,
    /// Seconds a new connection has for its TLS handshake and first bytes [default: 10]
    #[arg(long = "handshake-timeout", value_name = "SECONDS")]
    handshake_timeout_seconds: Option<u32>,
    /// Seconds an HTTP/1 request on the HTTP port has to send its headers [default: 10]
    #[arg(long = "header-timeout", value_name = "SECONDS")]
    header_timeout_seconds: Option<u32>,
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
        for (key, value) in [
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
            ("tls_ca", &self.tls_ca),
            ("tls_ca_key", &self.tls_ca_key),
        ] {
            if let Some(v) = value {
                o.push((key, v.display().to_string().into()));
            }
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
            o.push(("log_format", v.name().into()));
        }
        for (key, value) in [
            ("max_connections", self.max_connections),
            ("handshake_timeout_seconds", self.handshake_timeout_seconds),
            ("header_timeout_seconds", self.header_timeout_seconds),
        ] {
            if let Some(v) = value {
                o.push((key, v.into()));
            }
        }
        o
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage tokens directly in the data directory (to make the first
    /// operator token; afterwards use `braid token`)
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token and print it (shown once)
    Create {
        /// submit, operate or agent
        #[arg(long)]
        role: String,
        /// Seconds until it expires; 0 never [default: 0]
        #[arg(long = "ttl", default_value_t = 0)]
        ttl_seconds: u32,
        /// It works once (join tokens)
        #[arg(long)]
        single_use: bool,
        /// A note for operators
        #[arg(long, default_value = "")]
        description: String,
        /// Bind a join token (role agent) to one agent name: it enrolls only NAME
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// The join token may enroll NAME although it is enrolled, revoking its
        /// earlier certificates (needs --name; such a token is always single-use)
        #[arg(long, requires = "name")]
        replace: bool,
    },
}

/// Writes a token into the store; safe while the coordinator runs (SQLite).
fn create_token_offline(settings: &Settings, create: &TokenCommand) -> anyhow::Result<()> {
    let TokenCommand::Create { role, ttl_seconds, single_use, description, name, replace } = create;
    let role = Role::parse(role).ok_or_else(|| anyhow::anyhow!("invalid role {role:?}: submit, operate or agent"))?;
    std::fs::create_dir_all(&settings.data_dir)?;
    let store = Arc::new(Store::open(&settings.data_dir.join("braid.db"))?);
    let (record, token) =
        Tokens::new(store, true).create(role, *ttl_seconds, *single_use, description, name.as_deref(), *replace)?;
    eprintln!("token {} ({}) created", record.id, role.name());
    println!("{token}");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings: Settings =
        braid_shared::settings::load(args.config.as_deref(), settings::KEYS, settings::LIST_KEYS, args.overrides())?;
    if let Some(Command::Token { command }) = &args.command {
        return create_token_offline(&settings, command);
    }
    telemetry::init(settings.log_format);
    match braid_shared::telemetry::raise_open_file_limit() {
        Ok(open_files) => tracing::info!(open_files, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "raising the open-file limit failed"),
    }
    let (addr, http_addr) = settings.validate()?;
    let coordinator = Coordinator::open(settings).context("opening the coordinator's data directory")?;
    server::serve(coordinator, addr, http_addr, telemetry::shutdown_signal()).await?;
    tracing::info!("coordinator stopped");
    Ok(())
}
