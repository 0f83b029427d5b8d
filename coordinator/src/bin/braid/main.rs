//! `braid`: submit multi-platform builds to a braid farm and follow them.

mod build;
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
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build(args) => build::run(&cli.coordinator, *args).await,
        Command::Cancel { build_id } => build::cancel(&cli.coordinator, &build_id).await,
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
