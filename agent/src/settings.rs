//! The agent's settings: defaults, `--config` TOML, `BRAID_*`, flags.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use braid_shared::Platform;
use braid_shared::settings::SettingsError;
use braid_shared::telemetry::LogFormat;

/// The agent's settings, each defined once: its flag, `--help` text and
/// default (clap) are also its TOML key and `BRAID_<KEY>` variable (serde).
/// `--help` shows each default; `examples/agent.toml` lists them all.
#[derive(Debug, Clone, clap::Args, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Coordinator URL: https://HOST:PORT, or http:// with --insecure;
    /// several coordinators on one database: comma-separated, tried in turn
    /// until the one that leads answers
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:7700")]
    pub coordinator: String,
    /// Name of this agent, unique in the farm [default: the host name]
    #[arg(long, value_name = "NAME", default_value = "", hide_default_value = true)]
    pub name: String,
    /// A platform this host builds, instead of the detected one (repeatable;
    /// variable: comma-separated; e.g. an arm64 server that runs 32-bit code
    /// adds linux/arm/v7) [default: the detected native platform]
    #[arg(long = "platform", value_name = "PLATFORM")]
    pub platforms: Vec<String>,
    /// Jobs to run at once (1 to 256)
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub slots: u32,
    /// Contexts, job directories and builder storage
    #[arg(long, value_name = "DIR", default_value = "braid-agent")]
    pub work_dir: PathBuf,
    /// Dial the coordinator in plaintext; only to a loopback address
    /// [default: off]
    #[arg(long)]
    pub insecure: bool,
    /// The cluster CA (PEM) [default: WORK_DIR/tls/ca.pem, written by join]
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This agent's certificate (PEM) [default: WORK_DIR/tls/agent.pem]
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM) [default: WORK_DIR/tls/agent-key.pem]
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Builder backend: buildah, podman, docker (a Docker Engine), or auto:
    /// buildah if installed, else podman, else the Docker Engine
    #[arg(long, value_name = "BACKEND", default_value = "auto")]
    pub backend: String,
    /// The Docker Engine's API socket for the docker backend, unix://PATH or
    /// tcp://HOST:PORT [default: DOCKER_HOST, else unix:///var/run/docker.sock]
    #[arg(long, value_name = "HOST", default_value = "", hide_default_value = true)]
    pub docker_host: String,
    /// The docker CLI the docker backend builds with through the Engine's
    /// BuildKit (`DOCKER_BUILDKIT=1 docker build`: secrets, SSH, cache
    /// mounts); checked at start, and when its `build` has no --secret and
    /// --ssh or it cannot reach the Engine, the classic builder is used
    #[arg(long, value_name = "PATH", default_value = "docker")]
    pub docker_cli: PathBuf,
    /// buildah's --isolation: chroot works everywhere, including hosts with
    /// hybrid cgroups; oci isolates more where cgroup v2 is there; or rootless
    #[arg(long, value_name = "ISOLATION", default_value = "chroot")]
    pub isolation: String,
    /// buildah's storage driver: overlay or vfs
    #[arg(long, value_name = "DRIVER", default_value = "overlay")]
    pub storage_driver: String,
    /// Bytes of contexts kept in the cache (10 GiB)
    #[arg(long, value_name = "BYTES", default_value_t = 10 << 30)]
    pub context_cache_bytes: u64,
    /// Bytes of buildah/podman storage (the layer cache, one per platform)
    /// kept (20 GiB); past that, after a job, the least recently used
    /// platform's storage is cleared (a Docker Engine's images are left to
    /// the Engine)
    #[arg(long, value_name = "BYTES", default_value_t = 20 << 30)]
    pub builder_cache_bytes: u64,
    /// Report the platforms this host can run through binfmt emulation
    /// (QEMU), for builds that pass --allow-emulation; --emulation=false
    /// turns it off
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_value_t = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub emulation: bool,
    /// Let builds run RUN steps in this host's network (`braid build
    /// --network host`), as the Docker Engine's BuildKit allows by default;
    /// --allow-network-host=false fails such jobs (BuildKit's `network.host`
    /// entitlement)
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_value_t = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub allow_network_host: bool,
    /// Seconds a stopping agent (first SIGTERM) lets running jobs finish
    /// before it hands them back
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub stop_grace_seconds: u32,
    /// Seconds a push keeps retrying a registry that cannot be reached or
    /// answers 5xx, 408 or 429 (exponential backoff with jitter) before the
    /// job fails as an infrastructure failure; 401, 403 and other 4xx answers
    /// fail at once (0 to 86400)
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub push_retry_seconds: u32,
    /// Log format: pretty or json
    #[arg(long, value_name = "FORMAT", default_value = "pretty")]
    pub log_format: LogFormat,
    /// A label KEY=VALUE builds may require (`braid build --require`),
    /// repeatable (variable: comma-separated); it overrides a detected label
    /// of the same key (memory, cpus, disk, kernel, os-release, model); an
    /// operator's memory is also each job's memory limit [default: none,
    /// the detected labels only]
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        // The defaults are clap's `default_value`s; the unit tests parse them.
        #[allow(clippy::expect_used)]
        braid_shared::settings::defaults().expect("the settings' default values parse")
    }
}

/// Settings after validation, with parsed values.
#[derive(Debug, Clone)]
pub struct Valid {
    pub settings: Settings,
    pub platforms: Vec<Platform>,
    /// The platform this binary runs on, for BUILDPLATFORM.
    pub native: Platform,
    /// Platforms runnable only through binfmt emulation.
    pub emulates: Vec<Platform>,
    /// TLS material for an https:// coordinator.
    /// Shared with the renewal task, which swaps in a renewed certificate.
    pub tls: Option<std::sync::Arc<std::sync::RwLock<TlsFiles>>>,
    /// The builder in use: buildah, podman or docker.
    pub backend: String,
    /// The Docker Engine to build with, for the docker backend.
    pub docker_host: String,
    /// Whether `auto` chose the backend, for a start-up error that says so.
    pub backend_detected: bool,
    /// Where jobs keep secret files (registry logins): this agent's own
    /// directory on a tmpfs (see `leftovers`).
    pub secrets_dir: PathBuf,
    /// The docker backend builds with the Engine's BuildKit through this
    /// docker CLI; None: the classic builder (probed at start).
    pub docker_buildkit: Option<PathBuf>,
    /// The Engine has its default bridge network (probed with BuildKit).
    pub docker_bridge: bool,
    /// The builder's name, version and capabilities, probed at start
    /// (`builder::probe`); empty until then.
    pub builder: braid_shared::proto::BuilderInfo,
    /// Its labels: detected, then the operator's over them (`labels`).
    pub labels: braid_shared::placement::Labels,
    /// The operator's `memory` label in bytes (0: none): also each job's
    /// memory limit here when its build sets no --memory, so a declared
    /// size is what a job gets.
    pub memory_cap: u64,
}

/// Whether `program` is an executable on PATH.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0)
        })
    })
}

/// The PEM files an agent dials with: the cluster CA and its own
/// certificate and key.
#[derive(Clone)]
pub struct TlsFiles {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: zeroize::Zeroizing<Vec<u8>>,
    /// The certificate is the one `join` wrote (no --tls-cert/--tls-key):
    /// the agent renews it itself.
    pub renewable: bool,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsFiles { key: <redacted> }")
    }
}

impl Valid {
    /// A channel to the coordinator, over TLS with this agent's certificate
    /// when the URL is https://.
    /// With several coordinators, each is tried in turn from the one that
    /// answered last: only the leader listens for gRPC.
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        static LAST: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        // The leader a follower named is dialed first, configured or not.
        if let Some(leader) = leader_hint() {
            match self.connect_to(&leader).await {
                Ok(channel) => return Ok(channel),
                Err(e) => tracing::warn!(leader = %leader, error = %e, "the leader a follower named does not answer"),
            }
        }
        let urls = coordinator_urls(&self.settings.coordinator);
        let first = LAST.load(std::sync::atomic::Ordering::Relaxed);
        let mut last_error = None;
        for i in 0..urls.len() {
            let at = (first + i) % urls.len();
            match self.connect_to(urls[at]).await {
                Ok(channel) => {
                    LAST.store(at, std::sync::atomic::Ordering::Relaxed);
                    return Ok(channel);
                }
                Err(e) => last_error = Some(e),
            }
        }
        match last_error {
            Some(e) => Err(e),
            None => self.connect_to(&self.settings.coordinator).await,
        }
    }

    async fn connect_to(&self, url: &str) -> Result<Channel, tonic::transport::Error> {
        let mut endpoint = Endpoint::from_shared(url.to_owned())?
            .connect_timeout(std::time::Duration::from_secs(10))
            .http2_keep_alive_interval(std::time::Duration::from_secs(20));
        if let Some(tls) = &self.tls {
            let tls = tls.read().unwrap_or_else(|p| p.into_inner()).clone();
            endpoint = endpoint.tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&tls.ca))
                    .identity(Identity::from_pem(&tls.cert, tls.key.as_slice())),
            )?;
        }
        endpoint.connect().await
    }
}

/// The metadata key a follower names the leader in.
pub const LEADER_HEADER: &str = "x-braid-leader";

static LEADER: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn leader_hint() -> Option<String> {
    LEADER.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
}

/// Remembers the leader a follower named (an `UNAVAILABLE` answer with
/// `x-braid-leader`), to be dialed first at the next connection; whether
/// `status` named one.
pub fn note_leader(status: &tonic::Status) -> bool {
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    let Some(leader) = status.metadata().get(LEADER_HEADER).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let leader = leader.trim();
    if !(leader.starts_with("http://") || leader.starts_with("https://")) || leader.len() > 512 {
        return false;
    }
    *LEADER.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(leader.to_owned());
    true
}

/// The coordinator setting's addresses (comma-separated).
pub fn coordinator_urls(setting: &str) -> Vec<&str> {
    setting.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
}

/// Where `braid-agent join` keeps what it enrolled with.
pub fn tls_dir(work_dir: &Path) -> PathBuf {
    work_dir.join("tls")
}

impl Settings {
    /// https:// with the TLS files (given, or those `join` wrote), or
    /// http:// with --insecure to a loopback address.
    fn check_transport(&mut self) -> Result<Option<TlsFiles>, SettingsError> {
        let invalid = |key, message: String| SettingsError::Invalid { key, message };
        let url = self.coordinator.clone();
        if let Some(rest) = url.strip_prefix("https://") {
            if rest.is_empty() {
                return Err(invalid("coordinator", format!("{url:?} has no host")));
            }
            if self.insecure {
                return Err(invalid("insecure", "--insecure is for http:// coordinators only".into()));
            }
            let enrolled = tls_dir(&self.work_dir);
            // A renewal that stopped half-way is finished (or undone) first.
            crate::tlsfiles::finish_pending(&enrolled).map_err(|e| invalid("tls_cert", e.to_string()))?;
            let renewable = self.tls_cert.is_none() && self.tls_key.is_none();
            let ca = self.tls_ca.clone().unwrap_or_else(|| enrolled.join("ca.pem"));
            let cert = self.tls_cert.clone().unwrap_or_else(|| enrolled.join("agent.pem"));
            let key = self.tls_key.clone().unwrap_or_else(|| enrolled.join("agent-key.pem"));
            let read = |key_name: &'static str, path: &PathBuf| {
                std::fs::read(path).map_err(|e| {
                    invalid(
                        key_name,
                        format!(
                            "{}: {e} (run braid-agent join, or give --{})",
                            path.display(),
                            key_name.replace('_', "-")
                        ),
                    )
                })
            };
            return Ok(Some(TlsFiles {
                ca: read("tls_ca", &ca)?,
                cert: read("tls_cert", &cert)?,
                key: read("tls_key", &key)?.into(),
                renewable,
            }));
        }
        let host = url
            .strip_prefix("http://")
            .ok_or_else(|| invalid("coordinator", format!("{url:?} must start with https:// or http://")))?
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        if !self.insecure {
            return Err(invalid(
                "insecure",
                "http:// needs --insecure (plaintext, loopback only); use https:// otherwise".into(),
            ));
        }
        let hostname = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(&host).trim_matches(['[', ']']);
        let loopback = hostname == "localhost" || hostname.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Err(invalid(
                "coordinator",
                format!("plaintext (--insecure) only to a loopback address, not {host:?}"),
            ));
        }
        Ok(None)
    }

    pub fn validate(mut self) -> Result<Valid, SettingsError> {
        let invalid = |key, message: String| SettingsError::Invalid { key, message };
        let all = self.coordinator.clone();
        let urls: Vec<String> = coordinator_urls(&all).into_iter().map(str::to_owned).collect();
        if urls.len() > 16 {
            return Err(invalid("coordinator", format!("{} addresses: at most 16", urls.len())));
        }
        if urls.iter().any(|u| u.starts_with("https://")) && !urls.iter().all(|u| u.starts_with("https://")) {
            return Err(invalid("coordinator", "every address https://, or every one http://".into()));
        }
        let mut tls = None;
        for url in urls.iter().skip(1) {
            self.coordinator = url.clone();
            tls = self.check_transport()?;
        }
        self.coordinator = urls.first().cloned().unwrap_or_default();
        tls = self.check_transport()?.or(tls);
        self.coordinator = all;
        if self.name.is_empty() {
            self.name = std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_owned()).unwrap_or_default();
        }
        if self.name.is_empty()
            || self.name.len() > braid_shared::limits::AGENT_NAME_BYTES
            || !self.name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(invalid("name", format!("{:?}: 1 to 128 letters, digits, '.', '_' or '-'", self.name)));
        }
        let native = Platform::host();
        let platforms = if self.platforms.is_empty() {
            vec![native.clone()]
        } else {
            self.platforms
                .iter()
                .map(|p| p.parse::<Platform>().map_err(|e| invalid("platforms", e.to_string())))
                .collect::<Result<Vec<_>, _>>()?
        };
        if !(1..=braid_shared::limits::AGENT_SLOTS).contains(&self.slots) {
            return Err(invalid("slots", "must be 1 to 256".into()));
        }
        if u64::from(self.push_retry_seconds) > braid_shared::limits::PUSH_RETRY_SECONDS {
            return Err(invalid("push_retry_seconds", format!("{}: must be 0 to 86400", self.push_retry_seconds)));
        }
        let backend = match self.backend.as_str() {
            "buildah" | "podman" | "docker" => self.backend.clone(),
            "auto" if on_path("buildah") => "buildah".to_owned(),
            "auto" if on_path("podman") => "podman".to_owned(),
            "auto" => "docker".to_owned(),
            other => return Err(invalid("backend", format!("{other:?}: buildah, podman, docker or auto"))),
        };
        let docker_host = braid_shared::engine::resolve_host(&self.docker_host);
        if backend == "docker" && !(docker_host.starts_with("unix://") || docker_host.starts_with("tcp://")) {
            return Err(invalid("docker_host", format!("{docker_host:?}: unix://PATH or tcp://HOST:PORT")));
        }
        let backend_detected = self.backend == "auto";
        if !matches!(self.isolation.as_str(), "chroot" | "oci" | "rootless") {
            return Err(invalid("isolation", format!("{:?}: chroot, oci or rootless", self.isolation)));
        }
        if !matches!(self.storage_driver.as_str(), "overlay" | "vfs") {
            return Err(invalid("storage_driver", format!("{:?}: overlay or vfs", self.storage_driver)));
        }
        let emulates = if self.emulation {
            binfmt_platforms(Path::new(BINFMT_DIR))
                .into_iter()
                .filter(|p| !platforms.iter().any(|n| n.matches(p)))
                .collect()
        } else {
            Vec::new()
        };
        let secrets_dir = crate::secrets::secrets_root(&self.work_dir);
        let mut labels = crate::labels::detect(&self.work_dir);
        for raw in &self.labels {
            let (k, v) = braid_shared::placement::parse_label(raw).map_err(|e| invalid("labels", e.to_string()))?;
            labels.insert(k, v);
        }
        braid_shared::placement::check_labels(&labels).map_err(|e| invalid("labels", e))?;
        let memory_cap = self
            .labels
            .iter()
            .filter_map(|l| l.strip_prefix("memory="))
            .next_back()
            .and_then(braid_shared::size::parse_ram)
            .unwrap_or(0);
        Ok(Valid {
            settings: self,
            platforms,
            native,
            emulates,
            tls: tls.map(|t| std::sync::Arc::new(std::sync::RwLock::new(t))),
            backend,
            docker_host,
            backend_detected,
            secrets_dir,
            docker_buildkit: None,
            docker_bridge: true,
            builder: Default::default(),
            labels,
            memory_cap,
        })
    }
}

const BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";

/// Platforms with an enabled QEMU binfmt entry (`qemu-aarch64` and so on).
pub fn binfmt_platforms(dir: &Path) -> Vec<Platform> {
    const ENTRIES: &[(&str, &str)] = &[
        ("qemu-aarch64", "linux/arm64"),
        ("qemu-arm", "linux/arm/v7"),
        ("qemu-x86_64", "linux/amd64"),
        ("qemu-i386", "linux/386"),
        ("qemu-riscv64", "linux/riscv64"),
        ("qemu-ppc64le", "linux/ppc64le"),
        ("qemu-s390x", "linux/s390x"),
        ("qemu-mips64el", "linux/mips64le"),
        ("qemu-loongarch64", "linux/loong64"),
    ];
    ENTRIES
        .iter()
        .filter(|(entry, _)| {
            std::fs::read_to_string(dir.join(entry)).is_ok_and(|s| s.lines().next() == Some("enabled"))
        })
        .filter_map(|(_, platform)| platform.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(coordinator: &str) -> Settings {
        Settings { coordinator: coordinator.into(), insecure: true, name: "a1".into(), ..Settings::default() }
    }

    #[test]
    fn reads_enabled_binfmt_entries() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("qemu-aarch64"), "enabled\ninterpreter /usr/bin/qemu-aarch64-static\n").unwrap();
        std::fs::write(dir.path().join("qemu-arm"), "disabled\n").unwrap();
        std::fs::write(dir.path().join("qemu-riscv64"), "enabled\n").unwrap();
        let found: Vec<String> = binfmt_platforms(dir.path()).iter().map(ToString::to_string).collect();
        assert_eq!(found, ["linux/arm64", "linux/riscv64"]);
    }

    /// Several coordinators: each address is checked as one would be, and
    /// they all speak the same scheme.
    #[test]
    fn several_coordinators_are_each_checked() {
        let v = with("http://127.0.0.1:7700, http://127.0.0.1:7701").validate().unwrap();
        assert_eq!(coordinator_urls(&v.settings.coordinator), ["http://127.0.0.1:7700", "http://127.0.0.1:7701"]);
        let e = with("http://127.0.0.1:7700,http://10.1.2.3:7700").validate().unwrap_err().to_string();
        assert!(e.contains("invalid setting coordinator") && e.contains("10.1.2.3"), "{e}");
        let e = with("http://127.0.0.1:7700,https://c2:7700").validate().unwrap_err().to_string();
        assert!(e.contains("every address https://"), "{e}");
    }

    #[test]
    fn validates_each_key() {
        let v = with("http://127.0.0.1:7700").validate().unwrap();
        assert_eq!(v.platforms, vec![Platform::host()], "the detected platform by default");
        assert!(with("http://localhost:7700").validate().is_ok());
        let e = with("http://10.1.2.3:7700").validate().unwrap_err().to_string();
        assert!(e.contains("invalid setting coordinator") && e.contains("loopback"), "{e}");
        let e = with("https://127.0.0.1:7700").validate().unwrap_err().to_string();
        assert!(e.contains("--insecure is for http://"), "{e}");
        let no_files = Settings { insecure: false, work_dir: "/nonexistent".into(), ..with("https://127.0.0.1:7700") };
        let e = no_files.validate().unwrap_err().to_string();
        assert!(e.contains("invalid setting tls_ca") && e.contains("braid-agent join"), "{e}");
        let declared =
            Settings { platforms: vec!["linux/aarch64".into(), "armhf".into()], ..with("http://127.0.0.1:1") };
        let names: Vec<String> = declared.validate().unwrap().platforms.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["linux/arm64", "linux/arm/v7"]);
        let bad = Settings { platforms: vec!["linux/arm/v9".into()], ..with("http://127.0.0.1:1") };
        assert!(bad.validate().unwrap_err().to_string().contains("invalid setting platforms"));
        let bad = Settings { name: "no spaces".into(), ..with("http://127.0.0.1:1") };
        assert!(bad.validate().unwrap_err().to_string().contains("invalid setting name"));
        let bad = Settings { slots: 0, ..with("http://127.0.0.1:1") };
        assert!(bad.validate().unwrap_err().to_string().contains("invalid setting slots"));
        let docker = Settings {
            backend: "docker".into(),
            docker_host: "unix:///run/d.sock".into(),
            ..with("http://127.0.0.1:1")
        };
        let v = docker.validate().unwrap();
        assert_eq!((v.backend.as_str(), v.docker_host.as_str()), ("docker", "unix:///run/d.sock"));
        assert_eq!(v.settings.docker_cli, Path::new("docker"), "the docker CLI on PATH by default");
        assert_eq!(v.docker_buildkit, None, "BuildKit only once the start-up probe found it");
        let bad =
            Settings { backend: "docker".into(), docker_host: "/run/d.sock".into(), ..with("http://127.0.0.1:1") };
        assert!(bad.validate().unwrap_err().to_string().contains("invalid setting docker_host"));
        let other =
            Settings { backend: "buildah".into(), docker_host: "ssh://host".into(), ..with("http://127.0.0.1:1") };
        assert!(other.validate().is_ok(), "an Engine address matters only to the docker backend");
        let bad = Settings { backend: "kaniko".into(), ..with("http://127.0.0.1:1") };
        assert!(bad.validate().unwrap_err().to_string().contains("buildah, podman, docker or auto"));
    }
}
