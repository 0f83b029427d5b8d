//! The coordinator's settings: defaults, `--config` TOML, `BRAID_*`, flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use braid_shared::settings::SettingsError;
use braid_shared::telemetry::LogFormat;

/// The coordinator's settings, each defined once: its flag, `--help` text and
/// default (clap) are also its TOML key and `BRAID_<KEY>` variable (serde).
/// `--help` shows each default; `examples/coordinator.toml` lists them all.
#[derive(Debug, Clone, clap::Args, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// gRPC listen address
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7700")]
    pub listen: String,
    /// HTTP listen address for the dashboard, /metrics, /healthz and /readyz
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7701")]
    pub http_listen: String,
    /// Where builds, events, contexts and blobs are kept
    #[arg(long, value_name = "DIR", default_value = "braid-data")]
    pub data_dir: PathBuf,
    /// Reach this registry (host:port) over plain HTTP; passed on to agents
    /// (repeatable; variable: comma-separated) [default: none]
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,
    /// Serve plaintext gRPC without tokens; only allowed on a loopback
    /// address [default: off]
    #[arg(long)]
    pub insecure: bool,
    /// TLS certificate of the coordinator (PEM; `braid certs init` makes
    /// one) [default: none]
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of that certificate (PEM) [default: none]
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM) agents' certificates must chain to [default: none]
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// The cluster CA's key, to sign the certificates of agents that join
    /// with a token [default: none: agents then get certificates from
    /// `braid certs issue`]
    #[arg(long, value_name = "FILE")]
    pub tls_ca_key: Option<PathBuf>,
    /// Seconds between agent heartbeats
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub heartbeat_seconds: u32,
    /// Seconds without a heartbeat before an agent is lost and its jobs go
    /// back to the queue
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub agent_lost_seconds: u32,
    /// Attempts per job before an agent or network failure fails the build
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub max_attempts: u32,
    /// Largest context accepted, in bytes (4 GiB)
    #[arg(long, value_name = "BYTES", default_value_t = braid_shared::limits::CONTEXT_BYTES)]
    pub max_context_bytes: u64,
    /// Bytes of stored contexts kept (20 GiB); past that the least recently
    /// used ones no unfinished build needs are removed
    #[arg(long, value_name = "BYTES", default_value_t = 20 << 30)]
    pub context_store_bytes: u64,
    /// Bytes of image blobs kept for exporting builds (`--output type=oci`,
    /// `--load`) (20 GiB); past that the least recently used are removed
    /// (never one written in the last hour)
    #[arg(long, value_name = "BYTES", default_value_t = 20 << 30)]
    pub blob_store_bytes: u64,
    /// Seconds a job may wait for an agent before its build fails; 0 waits
    /// forever (a platform no agent ever declared is refused at submit
    /// instead)
    #[arg(long = "queue-timeout", value_name = "SECONDS", default_value_t = 1800)]
    pub queue_timeout_seconds: u32,
    /// Seconds a build whose `--secret` values were lost in a restart (they
    /// live only in memory) waits for its `braid build` to reconnect and send
    /// them again; then it fails, saying it must be submitted again
    #[arg(long = "secrets-grace", value_name = "SECONDS", default_value_t = 60)]
    pub secrets_grace_seconds: u32,
    /// Credentials per registry (`[registry_credentials."ghcr.io"]` with
    /// `username` and `password`), used to verify and merge and handed to
    /// the agents whose jobs pull from or push to that registry. Only in the
    /// file or variables: a password on the command line is visible to every
    /// local user. Keep the file private (0600, or vaulted). Default none.
    #[arg(skip)]
    #[serde(skip_serializing)]
    pub registry_credentials: std::collections::BTreeMap<String, CredentialSetting>,
    /// Log format: pretty or json
    #[arg(long, value_name = "FORMAT", default_value = "pretty")]
    pub log_format: LogFormat,
    /// Open connections per listener (gRPC and HTTP each), those still in
    /// their TLS handshake included; lowered at start to fit the open-file
    /// limit
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub max_connections: u32,
    /// Seconds a new connection has to finish its TLS handshake and send its
    /// first bytes; past it, or when newer ones need the place, it is closed
    #[arg(long = "handshake-timeout", value_name = "SECONDS", default_value_t = 10)]
    pub handshake_timeout_seconds: u32,
    /// Seconds an HTTP/1 request on the HTTP port has to send all its headers
    #[arg(long = "header-timeout", value_name = "SECONDS", default_value_t = 10)]
    pub header_timeout_seconds: u32,
    /// Seconds a stopping coordinator (SIGTERM, Ctrl-C) waits for open
    /// calls to end; then it closes agent sessions and followers' streams
    /// (agents keep building and reconnect once it is back), stores what is
    /// queued and exits
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub shutdown_grace_seconds: u32,
    /// Seconds an agent certificate signed at join or renewal is valid (365
    /// days); agents renew theirs at two thirds of its life (60 to 10 years)
    #[arg(long, value_name = "SECONDS", default_value_t = 365 * 86400)]
    pub agent_cert_seconds: u32,
    /// Private key (PEM) that signs provenance statements: each is also
    /// attached as a DSSE envelope verifiable against the cluster CA
    /// (`braid imagetools verify`) [default: none: statements are unsigned]
    #[arg(long, value_name = "FILE")]
    pub provenance_key: Option<PathBuf>,
    /// Its certificate (PEM), issued by the cluster CA with `braid certs
    /// issue --kind provenance` [default: none]
    #[arg(long, value_name = "FILE")]
    pub provenance_cert: Option<PathBuf>,
    /// Where builds, events and tokens are kept: `sqlite` (braid.db in
    /// --data-dir, one coordinator) or postgres://USER@HOST:PORT/DB (any
    /// number of coordinators on one database, one of them leading; the
    /// password from --store-password-file or PGPASSWORD, never the URL)
    #[arg(long, value_name = "sqlite|URL", default_value = "sqlite")]
    pub store: String,
    /// File holding the PostgreSQL password [default: PGPASSWORD, or none]
    #[arg(long, value_name = "FILE")]
    pub store_password_file: Option<PathBuf>,
    /// Seconds a leader's lease lasts without renewal (PostgreSQL store):
    /// a stopped or cut-off leader is replaced after about this long (2 to 60)
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub lease_seconds: u32,
    /// The gRPC address other coordinators name as the leader's when this
    /// one leads [default: http(s)://<listen>]
    #[arg(long, value_name = "URL")]
    pub advertise: Option<String>,
    /// Also keep contexts in this registry repository
    /// (registry://HOST[:PORT]/REPO, credentials from registry_credentials):
    /// coordinators on PostgreSQL then need no shared --data-dir
    /// [default: none: contexts only in --data-dir]
    #[arg(long, value_name = "registry://HOST/REPO")]
    pub blob_store: Option<String>,
}

/// The keys only the file and variables set (no flag), named in `--help`.
pub const FILE_ONLY_KEYS: &[&str] = &["registry_credentials"];

#[derive(Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSetting {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for CredentialSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialSetting").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

impl Default for Settings {
    fn default() -> Self {
        // The defaults are clap's `default_value`s; the unit tests parse them.
        #[allow(clippy::expect_used)]
        braid_shared::settings::defaults().expect("the settings' default values parse")
    }
}

impl Settings {
    /// Checks every value, naming the key that is wrong; returns the gRPC
    /// and HTTP addresses.
    pub fn validate(&self) -> Result<(SocketAddr, SocketAddr), SettingsError> {
        let invalid = |key, message: String| SettingsError::Invalid { key, message };
        let addr: SocketAddr = self
            .listen
            .parse()
            .map_err(|_| invalid("listen", format!("{:?} is not an ip:port address", self.listen)))?;
        let http: SocketAddr = self
            .http_listen
            .parse()
            .map_err(|_| invalid("http_listen", format!("{:?} is not an ip:port address", self.http_listen)))?;
        if self.provenance_key.is_some() != self.provenance_cert.is_some() {
            let key = if self.provenance_key.is_some() { "provenance_cert" } else { "provenance_key" };
            return Err(invalid(key, "give both provenance_key and provenance_cert, or neither".into()));
        }
        let tls = [&self.tls_cert, &self.tls_key, &self.tls_ca];
        let tls_given = tls.iter().filter(|t| t.is_some()).count();
        match (self.insecure, tls_given) {
            (true, 0) => {
                for (key, a) in [("listen", addr), ("http_listen", http)] {
                    if !a.ip().is_loopback() {
                        return Err(invalid(
                            key,
                            format!("plaintext (--insecure) may only listen on loopback, not {a}"),
                        ));
                    }
                }
            }
            (true, _) => return Err(invalid("insecure", "give either --insecure or the TLS files, not both".into())),
            (false, 3) => {}
            (false, 0) => {
                return Err(invalid(
                    "tls_cert",
                    "no TLS files: give --tls-cert, --tls-key and --tls-ca (see braid certs init), or --insecure for plaintext on loopback".into(),
                ));
            }
            (false, _) => return Err(invalid("tls_cert", "tls_cert, tls_key and tls_ca go together".into())),
        }
        for r in &self.insecure_registries {
            if r.is_empty() || r.contains('/') || r.contains("://") {
                return Err(invalid("insecure_registries", format!("{r:?} is not host[:port]")));
            }
        }
        if self.heartbeat_seconds == 0 || self.heartbeat_seconds > 3600 {
            return Err(invalid("heartbeat_seconds", "must be 1 to 3600".into()));
        }
        if self.agent_lost_seconds <= self.heartbeat_seconds {
            return Err(invalid("agent_lost_seconds", "must be larger than heartbeat_seconds".into()));
        }
        if !(1..=20).contains(&self.max_attempts) {
            return Err(invalid("max_attempts", "must be 1 to 20".into()));
        }
        if self.max_context_bytes == 0 {
            return Err(invalid("max_context_bytes", "must be above 0".into()));
        }
        if self.context_store_bytes < self.max_context_bytes {
            return Err(invalid("context_store_bytes", "must be at least max_context_bytes".into()));
        }
        if self.blob_store_bytes < 1 << 20 {
            return Err(invalid("blob_store_bytes", "must be at least 1 MiB".into()));
        }
        if !(16..=1_000_000).contains(&self.max_connections) {
            return Err(invalid("max_connections", format!("{} is not 16 to 1000000", self.max_connections)));
        }
        if !(60..=10 * 366 * 86400).contains(&self.agent_cert_seconds) {
            return Err(invalid("agent_cert_seconds", format!("{} is not 60 to 316224000", self.agent_cert_seconds)));
        }
        for (key, value) in [
            ("handshake_timeout_seconds", self.handshake_timeout_seconds),
            ("header_timeout_seconds", self.header_timeout_seconds),
            ("shutdown_grace_seconds", self.shutdown_grace_seconds),
        ] {
            if !(1..=300).contains(&value) {
                return Err(invalid(key, format!("{value} is not 1 to 300")));
            }
        }
        if !(2..=60).contains(&self.lease_seconds) {
            return Err(invalid("lease_seconds", format!("{} is not 2 to 60", self.lease_seconds)));
        }
        self.postgres()?;
        self.blob_store_repository()?;
        Ok((addr, http))
    }

    /// The PostgreSQL connection the `store` setting names (None: SQLite).
    /// A password in the URL is refused, so it never reaches a log, a
    /// command line or /proc.
    pub fn postgres(&self) -> Result<Option<postgres::Config>, SettingsError> {
        let invalid = |key, message: String| SettingsError::Invalid { key, message };
        if self.store == "sqlite" {
            return Ok(None);
        }
        if !self.store.starts_with("postgres://") && !self.store.starts_with("postgresql://") {
            return Err(invalid(
                "store",
                format!("{:?} is neither sqlite nor postgres://USER@HOST:PORT/DB", redact(&self.store)),
            ));
        }
        let parsed: postgres::Config =
            self.store.parse().map_err(|e| invalid("store", format!("{}: {e}", redact(&self.store))))?;
        if parsed.get_password().is_some() {
            return Err(invalid(
                "store",
                "a password in the URL would show in logs and process lists: put it in store_password_file or PGPASSWORD".into(),
            ));
        }
        let password = match &self.store_password_file {
            Some(file) => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| invalid("store_password_file", format!("{}: {e}", file.display())))?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
            ),
            None => std::env::var("PGPASSWORD").ok(),
        };
        let lease = Duration::from_secs(self.lease_seconds.into());
        crate::pgstore::config(&self.store, password.as_deref(), lease)
            .map(Some)
            .map_err(|e| invalid("store", e.to_string()))
    }

    /// The address other coordinators name as this one's when it leads.
    pub fn advertised(&self) -> String {
        match &self.advertise {
            Some(a) => a.clone(),
            None if self.tls() => format!("https://{}", self.listen),
            None => format!("http://{}", self.listen),
        }
    }

    /// The configured registry credentials.
    pub fn credentials(&self) -> Vec<braid_shared::oci::Credential> {
        self.registry_credentials
            .iter()
            .map(|(registry, c)| braid_shared::oci::Credential {
                registry: registry.clone(),
                username: c.username.clone(),
                password: c.password.clone().into(),
            })
            .collect()
    }

    /// The registry repository `blob_store` names, if any.
    pub fn blob_store_repository(&self) -> Result<Option<braid_shared::reference::ImageRef>, SettingsError> {
        let Some(value) = self.blob_store.as_deref().filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        crate::remote_contexts::parse(value)
            .map(Some)
            .map_err(|message| SettingsError::Invalid { key: "blob_store", message })
    }

    /// Whether gRPC is served over TLS (and tokens are required).
    pub fn tls(&self) -> bool {
        self.tls_cert.is_some()
    }

    pub fn queue_timeout(&self) -> Option<Duration> {
        (self.queue_timeout_seconds > 0).then(|| Duration::from_secs(self.queue_timeout_seconds.into()))
    }

    pub fn agent_lost_after(&self) -> Duration {
        Duration::from_secs(self.agent_lost_seconds.into())
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_seconds.into())
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_seconds.into())
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_seconds.into())
    }
}

/// The store URL with any password replaced, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (auth, host) = match rest.split_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    match auth.and_then(|a| a.split_once(':')) {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(listen: &str, insecure: bool) -> Settings {
        Settings { listen: listen.into(), insecure, ..Settings::default() }
    }

    #[test]
    fn plaintext_only_on_loopback_and_only_when_asked() {
        assert!(with("127.0.0.1:7700", true).validate().is_ok());
        assert!(with("[::1]:7700", true).validate().is_ok());
        let e = with("0.0.0.0:7700", true).validate().unwrap_err().to_string();
        assert!(e.contains("invalid setting listen") && e.contains("loopback"), "{e}");
        let e = with("127.0.0.1:7700", false).validate().unwrap_err().to_string();
        assert!(e.contains("--insecure"), "{e}");
        let e = with("nonsense", true).validate().unwrap_err().to_string();
        assert!(e.contains("\"nonsense\" is not an ip:port"), "{e}");
        let bad_registry = Settings { insecure_registries: vec!["http://x".into()], ..with("127.0.0.1:1", true) };
        assert!(bad_registry.validate().unwrap_err().to_string().contains("insecure_registries"));
    }

    #[test]
    fn connection_limits_and_timeouts_are_bounded() {
        let ok = with("127.0.0.1:1", true);
        for bad in [
            Settings { max_connections: 3, ..ok.clone() },
            Settings { handshake_timeout_seconds: 0, ..ok.clone() },
            Settings { header_timeout_seconds: 301, ..ok.clone() },
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains("max_connections") || e.contains("timeout_seconds"), "{e}");
        }
        assert!(Settings { max_connections: 16, handshake_timeout_seconds: 1, ..ok }.validate().is_ok());
    }

    /// The store is SQLite unless a postgres:// URL names a database; a
    /// password never rides in the URL, and messages show none.
    #[test]
    fn store_urls_are_checked_and_never_carry_a_password() {
        let mut s = with("127.0.0.1:7700", true);
        assert!(s.postgres().unwrap().is_none());
        s.store = "postgres://braid@db.example.net:5432/braid".into();
        let config = s.postgres().unwrap().unwrap();
        assert_eq!(config.get_user(), Some("braid"));
        s.store = "postgres://braid:hunter2@db:5432/braid".into();
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.contains("invalid setting store") && e.contains("store_password_file") && !e.contains("hunter2"),
            "{e}"
        );
        s.store = "mysql://braid:hunter2@db/braid".into();
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("neither sqlite nor postgres") && !e.contains("hunter2"), "{e}");
        assert_eq!(redact("postgres://u:p@h:1/d"), "postgres://u:<redacted>@h:1/d");
        s.store = "sqlite".into();
        s.lease_seconds = 1;
        assert!(s.validate().unwrap_err().to_string().contains("lease_seconds"));
    }
}
