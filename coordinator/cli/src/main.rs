//! `braid`: submit multi-platform builds to a braid farm and follow them.

#[macro_use]
mod out;
mod build;
mod buildspec;
mod cache;
mod certs;
mod conn;
mod describe;
mod diag;
mod dockerconfig;
mod docs;
mod imagetools;
mod listing;
mod needs;
mod ops;
mod output;
mod progress;
mod reconnect;
mod secrets;
mod source;
mod ssh;
mod status;
mod summary;
mod tokens;
mod tty;
mod upload;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Builds container images for several platforms at once, each on a machine
/// that runs it natively.
#[derive(Debug, Parser)]
#[command(name = "braid", version = braid_build_info::LONG_VERSION)]
pub(crate) struct Cli {
    /// Coordinator URL (plaintext http:// only to a loopback address in this version); several
    /// coordinators on one database: comma-separated, the one that leads is found in turn
    #[arg(long, global = true, env = "BRAID_COORDINATOR", default_value = "http://127.0.0.1:7700")]
    coordinator: String,
    /// Bearer token (from `braid token create` or `braid-coordinator token create`)
    #[arg(long, global = true, env = "BRAID_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The cluster CA (PEM) to verify an https:// coordinator with
    #[arg(long, global = true, env = "BRAID_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// How braid's own errors and notes are written: pretty (lines for a person) or json (one object per line)
    #[arg(long, global = true, env = "BRAID_LOG_FORMAT", value_name = "FORMAT", default_value = "pretty")]
    log_format: braid_shared::telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build an image for one or more platforms, like `docker buildx build`
    Build(Box<build::BuildArgs>),
    /// Cancel a build
    Cancel {
        /// The build id `braid build` printed
        build_id: String,
    },
    /// Print a build's events and log lines from the start
    Logs {
        build_id: String,
        /// Only this platform's lines
        #[arg(long)]
        platform: Option<String>,
        /// Keep following until the build ends (reconnecting for up to 10 minutes if the coordinator goes away)
        #[arg(short, long)]
        follow: bool,
        /// table (readable lines) or json (one event per line, with its sequence number)
        #[arg(long, value_enum, default_value = "table")]
        format: ops::Format,
    },
    /// Show one build: per-platform agent, state, attempt, time and digest
    Inspect {
        build_id: String,
        #[arg(long, value_enum, default_value = "table")]
        format: ops::Format,
    },
    /// Read and check images in a registry (provenance: `imagetools verify`)
    /// Make the cluster CA and certificates
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Create, revoke and list tokens (operate role)
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// List agents: platforms (native, ~emulated), state, slots, last heartbeat, disk free, certificate days left (! close
    /// to expiry), builder (--format json: its version and capabilities, and every health field)
    /// Which coordinator leads, its term, and the store's kind and health
    Status {
        #[arg(long, value_enum, default_value = "table")]
        format: ops::Format,
    },
    Agents {
        #[command(subcommand)]
        command: Option<AgentsCommand>,
        #[arg(long, value_enum, default_value = "table")]
        format: ops::Format,
        /// Add a LABELS column: the labels builds may --require (memory, cpus, disk, kernel, os-release, model
        /// and the operator's own)
        #[arg(long)]
        wide: bool,
    },
    /// Place no new job on an agent
    Cordon { agent: String },
    /// Place jobs on a cordoned agent again
    Uncordon { agent: String },
    /// Cordon an agent, then wait until its running jobs have finished
    Drain { agent: String },
    /// List recent builds, newest first
    Builds {
        /// Only builds in this state: queued, running, merging, succeeded, failed, cancelled
        #[arg(long)]
        state: Option<String>,
        /// At most this many
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long, value_enum, default_value = "table")]
        format: ops::Format,
        /// Every platform and every tag, whole (the table otherwise counts
        /// the platforms and shortens the first tag)
        #[arg(long)]
        wide: bool,
    },
    /// Inspect and combine images in a registry, like `docker buildx
    /// imagetools` (talks to the registry directly, with the Docker
    /// config's logins)
    Imagetools {
        #[command(subcommand)]
        command: imagetools::Command,
    },
    /// Show and clear agents' builder caches, like `docker buildx du` and
    /// `docker buildx prune` (operate role)
    Cache {
        #[command(subcommand)]
        command: cache::Command,
    },
    /// Print a shell completion script: `braid completion bash >
    /// /etc/bash_completion.d/braid` (or zsh, fish, elvish, powershell)
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (braid.1, braid-build.1, ...) into DIR
    Man {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AgentsCommand {
    /// Forget an agent's enrollment (operate role): revoke every certificate
    /// recorded for NAME, disconnect its session and re-queue its running
    /// jobs; NAME can then join again with a new token
    Forget {
        /// The agent's name
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create the cluster CA and the coordinator's certificate in DIR
    Init {
        #[arg(long, default_value = "braid-certs")]
        dir: PathBuf,
        /// A name or address the coordinator is reached by (repeatable);
        /// localhost and 127.0.0.1 are always added
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Days the coordinator's certificate is valid
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
    /// Issue an agent or client certificate signed by the CA in DIR
    Issue {
        #[arg(long, default_value = "braid-certs")]
        dir: PathBuf,
        /// The agent's (or client's) name, carried in the certificate
        #[arg(long)]
        name: String,
        /// agent, client, or provenance (the coordinator's key that signs provenance statements:
        /// its provenance_key and provenance_cert settings)
        #[arg(long, default_value = "agent")]
        kind: String,
        /// Days the certificate is valid
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token and print it (shown once)
    Create {
        /// submit (build, watch and cancel one's own), operate (everything) or agent (join)
        #[arg(long)]
        role: String,
        /// Lifetime, e.g. 24h, 30m or 7d (a bare number is seconds; 0 never
        /// expires) [default: no expiry]
        #[arg(long, value_name = "DURATION", value_parser = braid_shared::duration::token_ttl)]
        ttl: Option<u32>,
        /// The token works once (for joining agents)
        #[arg(long)]
        single_use: bool,
        /// A note for operators
        #[arg(long, default_value = "")]
        description: String,
        /// Bind a join token (--role agent) to one agent name: it enrolls only NAME
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// The join token may enroll NAME although it is already enrolled,
        /// revoking its earlier certificates (needs --name; such a token is
        /// always single-use)
        #[arg(long, requires = "name")]
        replace: bool,
    },
    /// Revoke a token by id
    Revoke { token_id: String },
    /// List tokens (never their secrets)
    List {
        #[arg(long, value_enum, default_value = "table")]
        format: ops::Format,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    diag::init(cli.log_format);
    let conn = conn::Conn { url: cli.coordinator.clone(), token: cli.token.clone(), ca: cli.ca.clone() };
    let result = match cli.command {
        Command::Build(args) => build::run(&conn, *args).await,
        Command::Cancel { build_id } => build::cancel(&conn, &build_id).await,
        Command::Logs { build_id, platform, follow, format } => {
            ops::logs(&conn, &build_id, platform.as_deref(), follow, format).await
        }
        Command::Inspect { build_id, format } => ops::inspect(&conn, &build_id, format).await,
        Command::Imagetools { command } => imagetools::run(&conn, command).await,
        Command::Certs { command: CertsCommand::Init { dir, hosts, days } } => certs::init(&dir, &hosts, days),
        Command::Certs { command: CertsCommand::Issue { dir, name, kind, days } } => {
            certs::issue(&dir, &name, &kind, days)
        }
        Command::Token { command: TokenCommand::Create { role, ttl, single_use, description, name, replace } } => {
            let new = tokens::NewToken {
                role: &role,
                ttl,
                single_use,
                description: &description,
                name: name.as_deref(),
                replace,
            };
            tokens::create(&conn, new).await
        }
        Command::Token { command: TokenCommand::Revoke { token_id } } => tokens::revoke(&conn, &token_id).await,
        Command::Token { command: TokenCommand::List { format } } => tokens::list(&conn, format).await,
        Command::Agents { command: Some(AgentsCommand::Forget { name }), .. } => ops::forget(&conn, &name).await,
        Command::Agents { command: None, format, wide } => ops::agents(&conn, format, wide).await,
        Command::Status { format } => status::status(&conn, format).await,
        Command::Cordon { agent } => ops::steer(&conn, &agent, "cordon").await,
        Command::Uncordon { agent } => ops::steer(&conn, &agent, "uncordon").await,
        Command::Drain { agent } => ops::steer(&conn, &agent, "drain").await,
        Command::Builds { state, limit, format, wide } => {
            ops::builds(&conn, state.as_deref(), limit, format, wide).await
        }
        Command::Cache { command } => cache::run(&conn, command).await,
        Command::Completion { shell } => docs::completion(shell),
        Command::Man { dir } => docs::man(&dir),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            diag::error(&diag::describe(&e));
            std::process::exit(1);
        }
    }
}
