//! `braid`: submit multi-platform builds to a braid farm and follow them.

mod build;
mod ops;
mod upload;

use clap::{Parser, Subcommand};

/// Builds container images for several platforms at once, each on a machine
/// that runs it natively.
#[derive(Debug, Parser)]
#[command(name = "braid", version)]
struct Cli {
    /// Coordinator URL (plaintext http:// only to a loopback address in this version)
    #[arg(long, global = true, env = "BRAID_COORDINATOR", default_value = "http://127.0.0.1:7700")]
    coordinator: String,
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
        /// Keep following until the build ends
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
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build(args) => build::run(&cli.coordinator, *args).await,
        Command::Cancel { build_id } => build::cancel(&cli.coordinator, &build_id).await,
        Command::Logs { build_id, platform, follow, format } => {
            ops::logs(&cli.coordinator, &build_id, platform.as_deref(), follow, format).await
        }
        Command::Inspect { build_id, format } => ops::inspect(&cli.coordinator, &build_id, format).await,
        Command::Builds { state, limit, format } => {
            ops::builds(&cli.coordinator, state.as_deref(), limit, format).await
        }
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
