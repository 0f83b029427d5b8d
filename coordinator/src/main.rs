//! `braid-coordinator`: the farm's gRPC server.

use std::path::PathBuf;

use anyhow::Context as _;
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use braid_coordinator::auth::{Role, Tokens};
use braid_coordinator::leader;
use braid_coordinator::stores::Store;

use braid_coordinator::server::{self, Coordinator};
use braid_coordinator::settings::Settings;
use braid_shared::telemetry;

/// Takes multi-platform builds and splits them across native agents.
///
/// Every setting is a flag, a key of the --config TOML file and a
/// BRAID_<KEY> environment variable (e.g. BRAID_DATA_DIR; `__` nests);
/// flags win over variables, variables over the file, the file over the
/// defaults. examples/coordinator.toml lists every key.
#[derive(Debug, Parser)]
#[command(name = "braid-coordinator", version = braid_build_info::LONG_VERSION, after_help = AFTER_HELP)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML settings file [default: none]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

/// The keys without a flag (`settings::FILE_ONLY_KEYS`), for `--help`.
const AFTER_HELP: &str = r#"Only in the --config file, never a flag (every local user can read a command line):
  registry_credentials  Credentials per registry, used to verify and merge and handed
                        to the agents whose jobs pull from or push to that registry
                        [default: none], e.g.
                          [registry_credentials."ghcr.io"]
                          username = "ci"
                          password = "..."
"#;

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
        /// Lifetime, e.g. 24h, 30m or 7d (a bare number is seconds; 0 never
        /// expires) [default: no expiry]
        #[arg(long = "ttl", value_name = "DURATION", value_parser = braid_shared::duration::token_ttl)]
        ttl_seconds: Option<u32>,
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
    let store = Arc::new(Store::open_settings(settings)?);
    let (record, token) = Tokens::new(store, true).create(
        role,
        ttl_seconds.unwrap_or(0),
        *single_use,
        description,
        name.as_deref(),
        *replace,
    )?;
    eprintln!("token {} ({}) created", record.id, role.name());
    println!("{token}");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let settings: Settings = braid_shared::settings::load(args.config.as_deref(), &args.settings, &matches)?;
    if let Some(Command::Token { command }) = &args.command {
        return create_token_offline(&settings, command);
    }
    telemetry::init(settings.log_format);
    match braid_shared::telemetry::raise_open_file_limit() {
        Ok(open_files) => tracing::info!(open_files, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "raising the open-file limit failed"),
    }
    let (addr, http_addr) = settings.validate()?;
    let store = Arc::new(
        Store::open_settings(&settings)
            .with_context(|| format!("opening the store {}", braid_coordinator::settings::redact(&settings.store)))?,
    );
    let leadership = match (store.postgres(), settings.postgres()?) {
        (Some(pg), Some(config)) => {
            let lease = std::time::Duration::from_secs(settings.lease_seconds.into());
            let (leadership, became) = leader::start(config, settings.advertised(), lease)?;
            tracing::info!(store = %braid_coordinator::settings::redact(&settings.store), "following until this coordinator leads");
            let redirect = braid_coordinator::redirect::serve(addr, &settings, leadership.clone()).await?;
            let followed = leader::follow(http_addr, leadership.clone(), became).await;
            redirect.abort();
            let Some(term) = followed? else {
                return Ok(());
            };
            pg.fence(term);
            leadership
        }
        _ => leader::Leadership::alone(settings.advertised()),
    };
    let coordinator =
        Coordinator::open_with(settings, store, leadership).context("opening the coordinator's data directory")?;
    let leadership = coordinator.leadership.clone();
    server::serve(coordinator, addr, http_addr, telemetry::shutdown_signal()).await?;
    // Everything is stored: a follower may lead at once.
    let _ = tokio::task::spawn_blocking(move || leadership.give_up(std::time::Duration::from_secs(3))).await;
    tracing::info!("coordinator stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(args: &[&str]) -> clap::ArgMatches {
        Args::command().try_get_matches_from(std::iter::once("braid-coordinator").chain(args.iter().copied())).unwrap()
    }

    /// Every key is a documented flag (or named in --help), with its default.
    #[test]
    fn help_documents_every_key() {
        let gaps = braid_shared::settings::help_gaps::<Settings>(
            &mut Args::command(),
            braid_coordinator::settings::FILE_ONLY_KEYS,
        );
        assert!(gaps.is_empty(), "{gaps:#?}");
        let help = Args::command().render_long_help().to_string();
        for spelled in ["--insecure-registry", "--queue-timeout", "--handshake-timeout", "--header-timeout"] {
            assert!(help.contains(spelled), "{spelled} is in users' scripts: keep it");
        }
        let token_help = Args::command()
            .find_subcommand_mut("token")
            .and_then(|t| t.find_subcommand_mut("create"))
            .map(|c| c.render_long_help().to_string())
            .unwrap();
        assert_eq!(token_help.matches("[default:").count(), 2, "--ttl's default once, --description's: {token_help}");
    }

    /// examples/coordinator.toml names every key, loads through the real
    /// loader and validates, and sets only keys it says differ from the default.
    #[test]
    fn example_config_is_complete_and_true() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/coordinator.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let missing = braid_shared::settings::example_gaps::<Settings>(&text);
        assert!(missing.is_empty(), "examples/coordinator.toml lacks {missing:?}");
        let m = matches(&["--config", path.to_str().unwrap()]);
        let args = Args::from_arg_matches(&m).unwrap();
        let loaded: Settings =
            braid_shared::settings::load_with_env(args.config.as_deref(), &args.settings, &m, std::iter::empty())
                .unwrap();
        loaded.validate().unwrap();
        let (loaded, defaults) =
            (serde_json::to_value(&loaded).unwrap(), serde_json::to_value(Settings::default()).unwrap());
        let differ: Vec<&String> =
            defaults.as_object().unwrap().iter().filter(|(k, v)| loaded[k.as_str()] != **v).map(|(k, _)| k).collect();
        assert_eq!(differ, ["data_dir", "tls_ca", "tls_ca_key", "tls_cert", "tls_key"], "a default changed?");
    }

    /// Flags override the file only where given; the old spellings still work.
    #[test]
    fn flags_win_only_where_given() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "max_attempts = 7\nqueue_timeout_seconds = 60\ninsecure = true\n").unwrap();
        let m = matches(&[
            "--config",
            file.to_str().unwrap(),
            "--queue-timeout",
            "90",
            "--insecure-registry",
            "r:5000",
            "--blob-store-bytes",
            "2097152",
            "token",
            "create",
            "--role",
            "submit",
            "--ttl",
            "24h",
        ]);
        let args = Args::from_arg_matches(&m).unwrap();
        let vars = [("BRAID_HEARTBEAT_SECONDS".to_owned(), "2".to_owned())];
        let s: Settings =
            braid_shared::settings::load_with_env(args.config.as_deref(), &args.settings, &m, vars.into_iter())
                .unwrap();
        assert_eq!((s.max_attempts, s.queue_timeout_seconds, s.heartbeat_seconds), (7, 90, 2));
        assert_eq!((s.insecure, s.insecure_registries.as_slice()), (true, ["r:5000".to_owned()].as_slice()));
        assert_eq!((s.blob_store_bytes, s.agent_lost_seconds), (2 << 20, 30));
        let Some(Command::Token { command: TokenCommand::Create { ttl_seconds, .. } }) = args.command else {
            panic!("token create")
        };
        assert_eq!(ttl_seconds, Some(86400));
    }
}
