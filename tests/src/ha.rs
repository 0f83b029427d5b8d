//! Several coordinators on one real PostgreSQL server: Debian's `postgresql`
//! started by the test itself (initdb into a temporary directory, loopback
//! port, as the unprivileged `nobody`, since postgres refuses root).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;

use crate::{AgentSpec, Farm, Proc, eventually, free_port, run_with_timeout, send_signal};

/// The unprivileged user the server runs as.
const UID: u32 = 65534;

/// Debian's server binaries (initdb, postgres, pg_ctl).
fn pg_bin(name: &str) -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> =
        std::fs::read_dir(root).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    versions.sort();
    versions.last().map(|v| v.join("bin").join(name)).unwrap_or_else(|| PathBuf::from(name))
}

fn as_nobody(program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([&format!("--reuid={UID}"), &format!("--regid={UID}"), "--clear-groups", "--"]).arg(program);
    cmd
}

/// A PostgreSQL server of the test's own, killed when dropped.
pub struct Postgres {
    pub port: u16,
    data: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

impl Postgres {
    pub fn start(dir: &Path) -> anyhow::Result<Postgres> {
        // nobody must reach its directory through the test's temporary one.
        let mut up = Some(dir);
        while let Some(d) = up {
            if d.starts_with("/tmp") && d != Path::new("/tmp") {
                let mut perms = std::fs::metadata(d)?.permissions();
                std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
                std::fs::set_permissions(d, perms)?;
            }
            up = d.parent();
        }
        let root = dir.join("pg");
        let (data, sock) = (root.join("data"), root.join("sock"));
        std::fs::create_dir_all(&sock)?;
        for d in [&root, &sock] {
            std::os::unix::fs::chown(d, Some(UID), Some(UID))?;
        }
        let out = run_with_timeout(
            as_nobody(&pg_bin("initdb"))
                .args(["-A", "trust", "-U", "braid", "--no-sync", "--no-locale", "-E", "UTF8", "-D"])
                .arg(&data)
                .current_dir(&root),
            Duration::from_secs(120),
        )?;
        anyhow::ensure!(out.status.success(), "initdb: {}", crate::output_text(&out));
        let mut pg = Postgres { port: free_port(), data, sock, log: root.join("postgres.log"), proc: None };
        pg.run()?;
        pg.psql("postgres", "CREATE DATABASE braid")?;
        Ok(pg)
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let mut cmd = as_nobody(&pg_bin("postgres"));
        cmd.arg("-D").arg(&self.data).args(["-p", &self.port.to_string(), "-h", "127.0.0.1", "-k"]).arg(&self.sock);
        cmd.args(["-c", "fsync=off", "-c", "max_connections=200"]);
        self.proc = Some(Proc::spawn("postgres", &mut cmd, &self.log)?);
        eventually(Duration::from_secs(60), "postgres to accept connections", || self.psql("postgres", "SELECT 1").ok())
            .map(drop)
    }

    /// Stops the server (fast shutdown), waits for it, starts it again.
    pub fn restart(&mut self, down_for: Duration) -> anyhow::Result<()> {
        self.stop();
        std::thread::sleep(down_for);
        self.run()
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            send_signal(p.pid(), "INT");
            let _ = eventually(Duration::from_secs(30), "postgres to stop", || p.try_wait());
        }
    }

    /// The URL coordinators are given.
    pub fn url(&self) -> String {
        format!("postgres://braid@127.0.0.1:{}/braid", self.port)
    }

    /// One query's rows, `|`-separated, through `psql`.
    pub fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let out = run_with_timeout(
            Command::new(pg_bin("psql"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "braid", "-d", db, "-At", "-c", sql])
                .env("PGCONNECT_TIMEOUT", "5"),
            Duration::from_secs(30),
        )?;
        anyhow::ensure!(out.status.success(), "psql {sql:?}: {}", crate::output_text(&out));
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// A number a query returns.
    pub fn number(&self, sql: &str) -> i64 {
        let text = self.psql("braid", sql).unwrap_or_else(|e| panic!("{e}"));
        text.parse().unwrap_or_else(|_| panic!("{sql}: {text:?} is not a number"))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One of several coordinators on the database.
pub struct Coordinator {
    pub url: String,
    pub http: String,
    pub log: PathBuf,
    pub proc: Option<Proc>,
}

impl Coordinator {
    /// `/readyz`'s status code and body, or None when nothing answers.
    pub fn readyz(&self) -> Option<(u16, String)> {
        let out = Command::new("curl")
            .args(["-sS", "-m", "2", "-w", "\n%{http_code}", &format!("http://{}/readyz", self.http)])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n')?;
        Some((code.trim().parse().ok()?, body.to_owned()))
    }

    /// One sample of a metric, None when it does not answer.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let out =
            Command::new("curl").args(["-fsS", "-m", "2", &format!("http://{}/metrics", self.http)]).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A farm of `n` coordinators on `pg`, sharing one data directory for
/// contexts and blobs, and agents given every coordinator's address; the
/// farm's URL (for the CLI) names them all, comma-separated.
pub fn start_farm(
    dir: &Path,
    pg: &Postgres,
    registry: &str,
    n: usize,
    agents: &[AgentSpec],
) -> anyhow::Result<(Farm, Vec<Coordinator>)> {
    start_farm_with(dir, pg, registry, n, agents, None)
}

/// As [`start_farm`]; with `blob_store` (registry://HOST/REPO) each
/// coordinator has its own data directory and shares contexts only
/// through that registry repository.
pub fn start_farm_with(
    dir: &Path,
    pg: &Postgres,
    registry: &str,
    n: usize,
    agents: &[AgentSpec],
    blob_store: Option<&str>,
) -> anyhow::Result<(Farm, Vec<Coordinator>)> {
    std::fs::create_dir_all(dir)?;
    let mut coordinators = Vec::new();
    for i in 0..n {
        let (port, http) = (free_port(), free_port());
        let log = dir.join(format!("coordinator-{i}.log"));
        let mut cmd = Command::new(crate::bin("braid-coordinator"));
        cmd.args(["--insecure", "--listen", &format!("127.0.0.1:{port}"), "--http-listen"])
            .arg(format!("127.0.0.1:{http}"))
            .arg("--data-dir")
            .arg(match blob_store {
                Some(_) => dir.join(format!("coordinator-{i}")),
                None => dir.join("coordinator"),
            })
            .args(["--insecure-registry", registry, "--store", &pg.url(), "--lease-seconds", "3"])
            .args(["--heartbeat-seconds", "1", "--agent-lost-seconds", "20"]);
        if let Some(store) = blob_store {
            cmd.args(["--blob-store", store]);
        }
        let proc = Proc::spawn(&format!("coordinator-{i}"), &mut cmd, &log)?;
        coordinators.push(Coordinator {
            url: format!("http://127.0.0.1:{port}"),
            http: format!("127.0.0.1:{http}"),
            log,
            proc: Some(proc),
        });
    }
    let first = wait_leader(&coordinators, Duration::from_secs(30))?;
    let url = coordinators.iter().map(|c| c.url.as_str()).collect::<Vec<_>>().join(",");
    let mut farm = Farm {
        dir: dir.to_owned(),
        url,
        http: coordinators[first].http.clone(),
        agents: Vec::new(),
        coordinator: None,
        coordinator_args: Vec::new(),
        agent_commands: Vec::new(),
    };
    farm.start_agents(agents)?;
    Ok((farm, coordinators))
}

/// Waits for one coordinator (of those running) to lead; its index.
pub fn wait_leader(coordinators: &[Coordinator], timeout: Duration) -> anyhow::Result<usize> {
    eventually(timeout, "a coordinator to lead and listen", || {
        coordinators.iter().position(|c| {
            c.proc.is_some() && c.metric("braid_leader") == Some(1.0) && c.log_text().contains("coordinator listening")
        })
    })
    .context("no leader")
}
