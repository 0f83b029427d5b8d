//! A small toolkit for braid's end-to-end tests: a real `docker-registry` on
//! loopback, the real `braid-coordinator` and `braid-agent` binaries, and the
//! `braid` CLI, all started as processes and waited on by health, not sleeps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod ha;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

pub mod browser;

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// A braid binary built by `cargo build --workspace`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // Tests run from target/<profile>/deps/, binaries from target/<profile>/.
    let here = exe.parent().unwrap();
    let path = [here.join(name), here.parent().unwrap().join(name)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| here.join(name));
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` before the end-to-end tests (tests/run.sh does)",
        path.display()
    );
    path
}

/// Fails the test, saying how to install it, when a tool is missing.
pub fn require(tool: &str, hint: &str) {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success());
    assert!(found.unwrap_or(false), "{tool} is not installed: {hint}");
}

/// Checks everything the end-to-end tests need, with the fix for each.
pub fn require_environment() {
    let setup = "run `bash tests/env/setup.sh setup` as root";
    require("buildah", setup);
    require("docker-registry", setup);
    require("skopeo", setup);
    require("curl", setup);
    require("htpasswd", setup);
    for entry in ["qemu-aarch64", "qemu-arm"] {
        let path = format!("/proc/sys/fs/binfmt_misc/{entry}");
        let enabled = std::fs::read_to_string(&path).map(|s| s.starts_with("enabled")).unwrap_or(false);
        assert!(enabled, "binfmt entry {entry} is not enabled ({path}): {setup}");
    }
}

/// A free loopback port (released before use; good enough for tests).
/// A loopback port nothing listens on, never one handed out before in this
/// process: tests run in parallel, and a port freed here but not yet bound
/// by the child it is for would otherwise go to the next test too.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Polls `f` every 100 ms until it returns Some or `timeout` passes.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process killed when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Proc> {
        // Append: a restarted process keeps its earlier lines.
        let file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc { name: name.to_owned(), child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command to completion with a time bound.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    run_with_input(cmd, None, timeout)
}

/// Runs a command to completion with a time bound, writing `input` (if
/// any) to its standard input while its output is read.
pub fn run_with_input(cmd: &mut Command, input: Option<Vec<u8>>, timeout: Duration) -> anyhow::Result<Output> {
    let stdin = if input.is_some() { Stdio::piped() } else { Stdio::null() };
    let mut child = cmd.stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    if let (Some(mut pipe), Some(bytes)) = (child.stdin.take(), input) {
        // A command that exits without reading it all closes the pipe: ignored.
        std::thread::spawn(move || pipe.write_all(&bytes));
    }
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    // Bytes, not text: some commands write archives to stdout.
    let read_all = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = r.read_to_end(&mut bytes);
            bytes
        })
    };
    let out_thread = read_all(Box::new(stdout));
    let err_thread = read_all(Box::new(stderr));
    // Waits for the exit itself, not by polling: benchmarks time these
    // commands, and a poll interval would be added to every wall time.
    let Some(status) = wait_timeout::ChildExt::wait_timeout(&mut child, timeout)? else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("{cmd:?} did not finish within {timeout:?}");
    };
    Ok(Output { status, stdout: out_thread.join().unwrap(), stderr: err_thread.join().unwrap() })
}

/// A finished command's stdout and stderr, for assertion messages.
pub fn output_text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A TLS test cluster's PKI: `braid certs init` into one directory, for a
/// coordinator on 127.0.0.1.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn init(dir: &Path) -> Pki {
        let out = run_with_timeout(
            Command::new(bin("braid")).args(["certs", "init", "--dir"]).arg(dir).args(["--host", "127.0.0.1"]),
            Duration::from_secs(30),
        )
        .unwrap();
        assert!(out.status.success(), "braid certs init: {}", output_text(&out));
        Pki { dir: dir.to_owned() }
    }

    /// The cluster CA's certificate, for `--ca` and curl's `--cacert`.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The coordinator's TLS flags; with `signs_joins`, also the CA key that
    /// lets it sign joining agents' certificates.
    pub fn coordinator_flags(&self, signs_joins: bool) -> Vec<std::ffi::OsString> {
        let mut files =
            vec![("--tls-cert", "coordinator.pem"), ("--tls-key", "coordinator-key.pem"), ("--tls-ca", "ca.pem")];
        if signs_joins {
            files.push(("--tls-ca-key", "ca-key.pem"));
        }
        files.into_iter().flat_map(|(flag, file)| [flag.into(), self.dir.join(file).into_os_string()]).collect()
    }
}

/// A token made offline: `braid-coordinator --data-dir DATA token create
/// --role ROLE`, as an operator bootstraps a farm.
pub fn offline_token(data: &Path, role: &str) -> String {
    let out = run_with_timeout(
        Command::new(bin("braid-coordinator")).arg("--data-dir").arg(data).args(["token", "create", "--role", role]),
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(out.status.success(), "token create: {}", output_text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// A Docker Engine (`dockerd` from Debian's docker.io) of the test's own,
/// on a socket in its directory, with no network set-up of its own.
pub struct DockerEngine {
    /// `unix://DIR/docker.sock`, for `--docker-host` and `DOCKER_HOST`.
    pub host: String,
    proc: Option<Proc>,
}

impl DockerEngine {
    pub fn start(dir: &Path) -> anyhow::Result<DockerEngine> {
        require("dockerd", "run `bash tests/env/setup.sh setup` as root (Debian package docker.io)");
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("docker.sock");
        let mut cmd = Command::new("dockerd");
        cmd.arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .arg("--data-root")
            .arg(dir.join("root"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none"]);
        let proc = Proc::spawn("dockerd", &mut cmd, &dir.join("dockerd.log"))?;
        let engine = DockerEngine { host: format!("unix://{}", socket.display()), proc: Some(proc) };
        eventually(Duration::from_secs(60), "dockerd to answer", || {
            let out = Command::new("curl")
                .args(["-fsS", "--max-time", "2", "--unix-socket"])
                .arg(&socket)
                .arg("http://docker/_ping")
                .output()
                .ok()?;
            out.status.success().then_some(())
        })
        .with_context(|| std::fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default())?;
        Ok(engine)
    }
}

impl Drop for DockerEngine {
    /// SIGTERM, so dockerd stops the containerd it started.
    fn drop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            send_signal(proc.pid(), "TERM");
            let _ = eventually(Duration::from_secs(20), "dockerd to stop", || proc.try_wait());
        }
    }
}

/// A `docker-registry` (the CNCF distribution registry) on loopback.
pub struct Registry {
    pub addr: String,
    proc: Option<Proc>,
    config: PathBuf,
    log: PathBuf,
}

impl Registry {
    pub fn start(dir: &Path) -> anyhow::Result<Registry> {
        Registry::start_inner(dir, None)
    }

    /// A registry that requires `user`/`password` (htpasswd, bcrypt).
    pub fn start_with_auth(dir: &Path, user: &str, password: &str) -> anyhow::Result<Registry> {
        std::fs::create_dir_all(dir)?;
        let out =
            Command::new("htpasswd").args(["-Bbn", user, password]).output().context("htpasswd (apache2-utils)")?;
        if !out.status.success() {
            bail!("htpasswd failed");
        }
        let file = dir.join("htpasswd");
        std::fs::write(&file, &out.stdout)?;
        Registry::start_inner(dir, Some(&file))
    }

    fn start_inner(dir: &Path, htpasswd: Option<&Path>) -> anyhow::Result<Registry> {
        std::fs::create_dir_all(dir.join("data"))?;
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.join("config.yml");
        let mut f = std::fs::File::create(&config)?;
        writeln!(
            f,
            "version: 0.1\nlog: {{level: warn, accesslog: {{disabled: true}}}}\nstorage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\nhttp: {{addr: {addr}, secret: braid-tests}}",
            dir.join("data").display()
        )?;
        if let Some(file) = htpasswd {
            writeln!(f, "auth: {{htpasswd: {{realm: braid-tests, path: {}}}}}", file.display())?;
        }
        drop(f);
        let mut registry = Registry { addr, proc: None, config, log: dir.join("registry.log") };
        registry.restart()?;
        Ok(registry)
    }

    /// Stops the registry (as an outage would).
    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Starts a stopped registry again: same address, same data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.proc = None;
        let proc =
            Proc::spawn("docker-registry", Command::new("docker-registry").arg("serve").arg(&self.config), &self.log)?;
        self.proc = Some(proc);
        let url = format!("http://{}/v2/", self.addr);
        eventually(Duration::from_secs(20), "the registry to answer", || {
            // 200, or 401 from a registry that wants a login: it is up.
            let out =
                Command::new("curl").args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", &url]).output().ok()?;
            matches!(&out.stdout[..], b"200" | b"401").then_some(())
        })
    }

    /// Pushes the offline multi-platform busybox base image.
    pub fn push_base_image(&self, repo_tag: &str) -> anyhow::Result<String> {
        let script = workspace().join("tests/env/setup.sh");
        let out = run_with_timeout(
            Command::new("bash").arg(script).arg("make-base-image").arg(&self.addr).arg(repo_tag),
            Duration::from_secs(300),
        )?;
        if !out.status.success() {
            bail!("making the base image failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(format!("{}/{repo_tag}", self.addr))
    }

    /// The raw bytes of the manifest or index at `reference` (tag or digest).
    fn raw_manifest(&self, reference: &str) -> Option<Vec<u8>> {
        let out = Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false", &format!("docker://{}/{reference}", self.addr)])
            .output()
            .ok()?;
        out.status.success().then_some(out.stdout)
    }

    /// The manifest or index at `reference`, if present.
    pub fn manifest(&self, reference: &str) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.raw_manifest(reference)?).ok()
    }

    /// The digest of what a tag points at.
    pub fn digest_of(&self, reference: &str) -> Option<String> {
        self.raw_manifest(reference).map(|bytes| braid_sha256(&bytes))
    }

    /// "arch[/variant] FILES..." for each image `index` lists, sorted: the
    /// trimmed contents of each of `files` in that image.
    pub fn per_platform(
        &self,
        repository: &str,
        index: &serde_json::Value,
        files: &[&str],
        scratch: &Path,
    ) -> anyhow::Result<Vec<String>> {
        let mut seen = Vec::new();
        index["manifests"].as_array().context("an index without manifests")?;
        for m in &platform_manifests(index) {
            let digest = m["digest"].as_str().context("a descriptor without a digest")?;
            let mut line = format!(
                "{}{}",
                m["platform"]["architecture"].as_str().unwrap_or_default(),
                m["platform"]["variant"].as_str().map(|v| format!("/{v}")).unwrap_or_default()
            );
            for file in files {
                line.push(' ');
                line.push_str(self.read_file(repository, digest, file, scratch)?.trim());
            }
            seen.push(line);
        }
        seen.sort();
        Ok(seen)
    }

    /// Every regular file's path in an image, across its layers.
    pub fn list_files(&self, repository: &str, digest: &str, scratch: &Path) -> anyhow::Result<Vec<String>> {
        let dir = self.copy_image(repository, digest, scratch)?;
        let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json"))?)?;
        let mut files = Vec::new();
        for layer in manifest["layers"].as_array().context("manifest without layers")? {
            let hex = layer["digest"].as_str().unwrap().trim_start_matches("sha256:");
            let out = Command::new("tar").arg("-tvzf").arg(dir.join(hex)).output()?;
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if line.starts_with('-') {
                    files.push(line.split_whitespace().last().unwrap_or_default().trim_start_matches("./").to_owned());
                }
            }
        }
        files.sort();
        Ok(files)
    }

    fn copy_image(&self, repository: &str, digest: &str, scratch: &Path) -> anyhow::Result<PathBuf> {
        let dir = scratch.join(digest.replace(':', "-"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(scratch)?;
        let out = run_with_timeout(
            Command::new("skopeo").args([
                "copy",
                "--src-tls-verify=false",
                &format!("docker://{}/{repository}@{digest}", self.addr),
                &format!("dir:{}", dir.display()),
            ]),
            Duration::from_secs(120),
        )?;
        if !out.status.success() {
            bail!("skopeo copy failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(dir)
    }

    /// Reads one file out of an image (by repository and manifest digest),
    /// searching its layers from the top.
    pub fn read_file(&self, repository: &str, digest: &str, file: &str, scratch: &Path) -> anyhow::Result<String> {
        let dir = self.copy_image(repository, digest, scratch)?;
        let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json"))?)?;
        let layers = manifest["layers"].as_array().context("manifest without layers")?;
        for layer in layers.iter().rev() {
            let hex = layer["digest"].as_str().unwrap().trim_start_matches("sha256:");
            let out = Command::new("tar").arg("-xzOf").arg(dir.join(hex)).arg(file).output()?;
            if out.status.success() {
                return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
            }
        }
        bail!("{file} not found in {repository}@{digest}")
    }
}

fn braid_sha256(bytes: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(bytes)?;
            c.wait_with_output()
        })
        .unwrap();
    format!("sha256:{}", String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default())
}

/// The platform images an index lists: its descriptors less the
/// attestation manifests (`vnd.docker.reference.type:
/// attestation-manifest`, as BuildKit and braid add for provenance).
pub fn platform_manifests(index: &serde_json::Value) -> Vec<serde_json::Value> {
    index["manifests"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter(|m| m["annotations"]["vnd.docker.reference.type"] != "attestation-manifest")
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// One agent to start: its name, declared platforms (empty: detected) and slots.
pub struct AgentSpec {
    pub name: &'static str,
    pub platforms: &'static [&'static str],
    pub slots: u32,
    pub backend: Option<&'static str>,
    /// Extra agent flags.
    pub flags: Vec<String>,
    /// Environment variables set for the agent.
    pub env: Vec<(String, String)>,
}

impl AgentSpec {
    pub const fn new(name: &'static str, platforms: &'static [&'static str]) -> AgentSpec {
        AgentSpec { name, platforms, slots: 1, backend: None, flags: Vec::new(), env: Vec::new() }
    }

    pub fn backend(self, backend: &'static str) -> AgentSpec {
        AgentSpec { backend: Some(backend), ..self }
    }

    pub fn slots(self, slots: u32) -> AgentSpec {
        AgentSpec { slots, ..self }
    }

    pub fn env(mut self, key: &str, value: &str) -> AgentSpec {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn flag(mut self, flag: &str, value: &str) -> AgentSpec {
        self.flags.extend([flag.to_owned(), value.to_owned()]);
        self
    }
}

/// A coordinator and agents on loopback, sharing one registry.
pub struct Farm {
    pub dir: PathBuf,
    pub url: String,
    /// The coordinator's HTTP address (metrics, health).
    pub http: String,
    pub agents: Vec<Proc>,
    pub coordinator: Option<Proc>,
    coordinator_args: Vec<String>,
    /// Each agent's arguments and environment, to start it again.
    agent_commands: Vec<AgentCommand>,
}

/// An agent's name, arguments and environment variables.
type AgentCommand = (String, Vec<std::ffi::OsString>, Vec<(String, String)>);

impl Farm {
    pub fn start(dir: &Path, registry: &Registry, agents: &[AgentSpec]) -> anyhow::Result<Farm> {
        Farm::start_with(dir, Some(&registry.addr), agents, &[])
    }

    /// A farm with extra coordinator flags, and a registry address or none.
    pub fn start_with(
        dir: &Path,
        registry: Option<&str>,
        agents: &[AgentSpec],
        extra: &[&str],
    ) -> anyhow::Result<Farm> {
        std::fs::create_dir_all(dir)?;
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let http = format!("127.0.0.1:{}", free_port());
        let coordinator_args = vec![
            "--insecure".to_owned(),
            "--listen".to_owned(),
            format!("127.0.0.1:{port}"),
            "--data-dir".to_owned(),
            dir.join("coordinator").display().to_string(),
            "--http-listen".to_owned(),
            http.clone(),
        ];
        let mut coordinator_args = coordinator_args;
        if let Some(addr) = registry {
            coordinator_args.extend(["--insecure-registry".to_owned(), addr.to_owned()]);
        }
        coordinator_args.extend(extra.iter().map(|s| s.to_string()));
        let mut farm = Farm {
            dir: dir.to_owned(),
            url,
            http,
            agents: Vec::new(),
            coordinator: None,
            coordinator_args,
            agent_commands: Vec::new(),
        };
        farm.start_coordinator()?;
        farm.start_agents(agents)?;
        Ok(farm)
    }

    /// Starts `agents`, each given the farm's URL (every coordinator's).
    pub fn start_agents(&mut self, agents: &[AgentSpec]) -> anyhow::Result<()> {
        let dir = self.dir.clone();
        for spec in agents {
            let mut cmd = Command::new(bin("braid-agent"));
            cmd.args(["--insecure", "--coordinator", &self.url, "--name", spec.name, "--work-dir"])
                .arg(dir.join(spec.name));
            for p in spec.platforms {
                cmd.args(["--platform", p]);
            }
            cmd.args(["--slots", &spec.slots.to_string()]);
            if let Some(backend) = spec.backend {
                cmd.args(["--backend", backend]);
            }
            cmd.args(&spec.flags);
            cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
            self.agents.push(Proc::spawn(spec.name, &mut cmd, &dir.join(format!("{}.log", spec.name)))?);
            let args = cmd.get_args().map(ToOwned::to_owned).collect();
            self.agent_commands.push((spec.name.to_owned(), args, spec.env.clone()));
        }
        Ok(())
    }

    /// Starts agent `name` again with its first arguments (after a crash,
    /// or killing it first if it still runs); its log goes on.
    pub fn restart_agent(&mut self, name: &str) -> anyhow::Result<()> {
        let (_, args, env) =
            self.agent_commands.iter().find(|(n, ..)| n == name).with_context(|| format!("no agent {name}"))?;
        let mut cmd = Command::new(bin("braid-agent"));
        cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
        let proc = Proc::spawn(name, &mut cmd, &self.dir.join(format!("{name}.log")))?;
        self.agents.retain(|a| a.name != name);
        self.agents.push(proc);
        Ok(())
    }

    pub fn start_coordinator(&mut self) -> anyhow::Result<()> {
        let log = self.dir.join("coordinator.log");
        let mut cmd = Command::new(bin("braid-coordinator"));
        cmd.args(&self.coordinator_args);
        let before = std::fs::read_to_string(&log).map(|l| l.matches("coordinator listening").count()).unwrap_or(0);
        self.coordinator = Some(Proc::spawn("coordinator", &mut cmd, &log)?);
        let addr = self.url.trim_start_matches("http://").to_owned();
        // Its own log line, not only an open port: something else could
        // hold the port.
        eventually(Duration::from_secs(20), "the coordinator to listen", || {
            let text = std::fs::read_to_string(&log).ok()?;
            let listening = text.matches("coordinator listening").count() > before;
            (listening && std::net::TcpStream::connect(&addr).is_ok()).then_some(())
        })
    }

    /// Sends `signal` (e.g. "KILL", "STOP", "CONT", "TERM") to an agent.
    pub fn signal_agent(&self, name: &str, signal: &str) {
        let agent = self.agents.iter().find(|a| a.name == name).unwrap_or_else(|| panic!("no agent {name}"));
        send_signal(agent.pid(), signal);
    }

    /// Waits for an agent process to exit on its own.
    pub fn wait_agent_exit(&mut self, name: &str, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let agent = self.agents.iter_mut().find(|a| a.name == name).unwrap_or_else(|| panic!("no agent {name}"));
        eventually(timeout, "the agent to exit", || agent.try_wait())
    }

    /// kill -9 the coordinator, as a crash would.
    pub fn crash_coordinator(&mut self) {
        if let Some(c) = &self.coordinator {
            send_signal(c.pid(), "KILL");
        }
        self.coordinator = None;
    }

    /// The text of a process's log so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Waits until the coordinator's log shows `count` agents connected.
    pub fn wait_for_agents(&self, count: usize) -> anyhow::Result<()> {
        let log = self.dir.join("coordinator.log");
        eventually(Duration::from_secs(30), "agents to connect", || {
            let text = std::fs::read_to_string(&log).ok()?;
            (text.matches("agent connected").count() >= count).then_some(())
        })
    }

    /// One sample of a coordinator metric, from a real scrape of `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        let out = Command::new("curl").args(["-fsS", &format!("http://{}/metrics", self.http)]).output().unwrap();
        assert!(out.status.success(), "scraping /metrics failed");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
    }

    /// `braid ... ARGS` with `stdin` as its standard input.
    pub fn braid_with_stdin(&self, args: &[&str], stdin: Vec<u8>) -> anyhow::Result<Output> {
        let mut cmd = Command::new(bin("braid"));
        cmd.arg("--coordinator").arg(&self.url).args(args);
        run_with_input(&mut cmd, Some(stdin), Duration::from_secs(600))
    }

    /// `braid ... ARGS` with extra environment variables.
    pub fn braid_env(&self, args: &[&str], env: &[(&str, &Path)]) -> anyhow::Result<Output> {
        let mut cmd = Command::new(bin("braid"));
        cmd.arg("--coordinator").arg(&self.url).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run_with_timeout(&mut cmd, Duration::from_secs(600))
    }

    /// `braid --coordinator URL ARGS...`, bounded in time.
    pub fn braid(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = Command::new(bin("braid"));
        cmd.arg("--coordinator").arg(&self.url).args(args);
        run_with_timeout(&mut cmd, Duration::from_secs(600))
    }

    /// Starts `braid build ...` and returns it with its stderr as lines.
    pub fn braid_spawn(&self, args: &[&str]) -> anyhow::Result<(Child, std::sync::mpsc::Receiver<String>)> {
        let mut child = Command::new(bin("braid"))
            .arg("--coordinator")
            .arg(&self.url)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok((child, rx))
    }
}

/// A `braid build` running in the background, its stderr read line by line.
pub struct RunningBuild {
    pub child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl RunningBuild {
    pub fn start(farm: &Farm, args: &[&str]) -> RunningBuild {
        let (child, lines) = farm.braid_spawn(args).unwrap();
        RunningBuild { child, lines, seen: Vec::new() }
    }

    /// Waits for a stderr line containing `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                self.seen.push(line.clone());
                if line.contains(needle) {
                    return line;
                }
            }
        }
        panic!("no line with {needle:?} within {timeout:?}; saw:\n{}", self.seen.join("\n"));
    }

    /// The build id from `#2 build ID submitted`.
    pub fn build_id(&mut self) -> String {
        let line = self.wait_for("#2 build ", Duration::from_secs(60));
        line.split_whitespace().nth(2).unwrap().to_owned()
    }

    /// Waits for the command to exit; its exit code and every line it printed.
    pub fn finish(mut self, timeout: Duration) -> (Option<i32>, String) {
        let status = eventually(timeout, "braid build to exit", || self.child.try_wait().ok().flatten()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        self.seen.extend(self.lines.try_iter());
        (status.code(), self.seen.join("\n"))
    }
}

impl Drop for RunningBuild {
    /// A test that fails half-way leaves no `braid build` behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Coordinator flags for tests that time failure detection: heartbeat every
/// second, an agent is lost after three.
pub const FAST_FAILURE: &[&str] = &["--heartbeat-seconds", "1", "--agent-lost-seconds", "3"];

/// A context directory `dir/name` holding only `dockerfile`; its path.
pub fn dockerfile_context(dir: &Path, name: &str, dockerfile: &str) -> String {
    let ctx = dir.join(name);
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    ctx.display().to_string()
}

/// Copies a host binary and the shared libraries `ldd` says it loads into
/// `root` at their own paths, so a context's `COPY root/ /` layer can run
/// it in a busybox image (for host-native platforms).
pub fn copy_host_binary(root: &Path, binary: &str) -> anyhow::Result<()> {
    let out = Command::new("ldd").arg(binary).output().context("ldd")?;
    let listing = String::from_utf8_lossy(&out.stdout);
    let libraries = listing.split_whitespace().filter(|w| w.starts_with('/')).map(str::to_owned);
    for file in std::iter::once(binary.to_owned()).chain(libraries) {
        let target = root.join(file.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().context("a file has a parent")?)?;
        // Through links: the layer holds the files themselves.
        std::fs::copy(&file, &target).with_context(|| format!("copying {file}"))?;
    }
    Ok(())
}
