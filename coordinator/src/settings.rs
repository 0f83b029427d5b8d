//! The coordinator's settings: defaults, `--config` TOML, `BRAID_*`, flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use braid_shared::settings::SettingsError;
use braid_shared::telemetry::LogFormat;

/// Every key here is also a TOML key and a `BRAID_<KEY>` variable.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// gRPC listen address. Default `127.0.0.1:7700`.
    pub listen: String,
    /// HTTP listen address for `/metrics`, `/healthz` and `/readyz`.
    /// Default `127.0.0.1:7701`.
    pub http_listen: String,
    /// Where builds, events and contexts are kept. Default `./braid-data`.
    pub data_dir: PathBuf,
    /// Registries (`host:port`) reached over plain HTTP; passed on to agents.
    /// Default none.
    pub insecure_registries: Vec<String>,
    /// Serve plaintext gRPC (loopback only, no tokens needed). Default false.
    pub insecure: bool,
    /// The coordinator's TLS certificate (PEM), from `braid certs init`.
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): agents' certificates must chain to it.
    pub tls_ca: Option<PathBuf>,
    /// The cluster CA's key, to sign the certificates of agents that join
    /// with a token. Default none (then agents get certificates from
    /// `braid certs issue`).
    pub tls_ca_key: Option<PathBuf>,
    /// Seconds between agent heartbeats. Default 5.
    pub heartbeat_seconds: u32,
    /// Seconds without a heartbeat before an agent is lost and its jobs go
    /// back to the queue. Default 30.
    pub agent_lost_seconds: u32,
    /// Attempts per job before an infrastructure failure fails the build.
    /// Default 3.
    pub max_attempts: u32,
    /// Largest context accepted, in bytes. Default 4 GiB.
    pub max_context_bytes: u64,
    /// Bytes of stored contexts kept; past that the least recently used
    /// ones no unfinished build needs are removed. Default 20 GiB.
    pub context_store_bytes: u64,
    /// Bytes of image blobs kept for exporting builds (`--output type=oci`,
    /// `--load`); past that the least recently used are removed (never one
    /// written in the last hour). Default 20 GiB.
    pub blob_store_bytes: u64,
    /// Seconds a job may wait for an agent before its build fails; 0 waits
    /// forever. Default 1800.
    pub queue_timeout_seconds: u32,
    /// Credentials per registry (`[registry_credentials."ghcr.io"]` with
    /// `username` and `password`), used to verify and merge and handed to
    /// the agents whose jobs pull from or push to that registry. Keep this
    /// file private (0600, or vaulted). Default none.
    pub registry_credentials: std::collections::BTreeMap<String, CredentialSetting>,
    /// Log format, `pretty` or `json`. Default `pretty`.
    pub log_format: LogFormat,
    /// Open connections per listener (gRPC and HTTP each), those still in
    /// their TLS handshake included; lowered at start to fit the open-file
    /// limit. Default 4096.
    pub max_connections: u32,
    /// Seconds a new connection has to finish its TLS handshake and send its
    /// first bytes; past it, or when newer ones need the place, it is
    /// closed. Default 10.
    pub handshake_timeout_seconds: u32,
    /// Seconds an HTTP/1 request on the HTTP port has to send all its
    /// headers. Default 10.
    pub header_timeout_seconds: u32,
}

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
        Settings {
            listen: "127.0.0.1:7700".to_owned(),
            http_listen: "127.0.0.1:7701".to_owned(),
            data_dir: PathBuf::from("braid-data"),
            insecure_registries: Vec::new(),
            insecure: false,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            tls_ca_key: None,
            heartbeat_seconds: 5,
            agent_lost_seconds: 30,
            max_attempts: 3,
            max_context_bytes: braid_shared::limits::CONTEXT_BYTES,
            context_store_bytes: 20 << 30,
            blob_store_bytes: 20 << 30,
            queue_timeout_seconds: 1800,
            registry_credentials: Default::default(),
            log_format: LogFormat::Pretty,
            max_connections: 4096,
            handshake_timeout_seconds: 10,
            header_timeout_seconds: 10,
        }
    }
}

/// The keys `BRAID_*` variables may set.
pub const KEYS: &[&str] = &[
    "listen",
    "http_listen",
    "data_dir",
    "insecure_registries",
    "insecure",
    "tls_cert",
    "tls_key",
    "tls_ca",
    "tls_ca_key",
    "heartbeat_seconds",
    "agent_lost_seconds",
    "max_attempts",
    "max_context_bytes",
    "context_store_bytes",
    "blob_store_bytes",
    "queue_timeout_seconds",
    "registry_credentials",
    "log_format",
    "max_connections",
    "handshake_timeout_seconds",
    "header_timeout_seconds",
];
pub const LIST_KEYS: &[&str] = &["insecure_registries"];

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
        for (key, value) in [
            ("handshake_timeout_seconds", self.handshake_timeout_seconds),
            ("header_timeout_seconds", self.header_timeout_seconds),
        ] {
            if !(1..=300).contains(&value) {
                return Err(invalid(key, format!("{value} is not 1 to 300")));
            }
        }
        Ok((addr, http))
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

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_seconds.into())
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_seconds.into())
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
}
