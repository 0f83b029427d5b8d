//! Enrollment on the real binaries, against a TLS farm: join tokens bound to
//! a name, no second enrollment of a name, `braid agents forget` revoking
//! certificate serials, `--replace` tokens, sessions that may not take over
//! a connected agent, and contexts served only under a lease.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use braid_shared::proto::{self, agents_client::AgentsClient};
use braid_tests::{
    Pki, Proc, Registry, bin, eventually, free_port, offline_token, output_text, require_environment, run_with_timeout,
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A coordinator serving TLS with a fresh cluster CA that signs joins, a
/// registry, and an operate token.
struct TlsFarm {
    dir: PathBuf,
    certs: PathBuf,
    url: String,
    /// The coordinator's HTTP address (/metrics).
    http: String,
    operate: String,
    registry: Registry,
    _coordinator: Proc,
}

fn run(cmd: &mut Command) -> Output {
    run_with_timeout(cmd, Duration::from_secs(300)).unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "{}", output_text(out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl TlsFarm {
    /// `before_start` runs once the CA exists, before the coordinator does.
    fn start(dir: &Path, before_start: impl FnOnce(&Path)) -> TlsFarm {
        TlsFarm::start_with(dir, &[], before_start)
    }

    /// With more coordinator flags.
    fn start_with(dir: &Path, flags: &[&str], before_start: impl FnOnce(&Path)) -> TlsFarm {
        let registry = Registry::start(&dir.join("registry")).unwrap();
        let pki = Pki::init(&dir.join("certs"));
        let certs = pki.dir.clone();
        before_start(&certs);
        let data = dir.join("data");
        let operate = offline_token(&data, "operate");
        let port = free_port();
        let http = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(bin("braid-coordinator"));
        cmd.arg("--data-dir")
            .arg(&data)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--http-listen", &http])
            .args(["--insecure-registry", &registry.addr, "--agent-lost-seconds", "60"]);
        cmd.args(pki.coordinator_flags(true)).args(flags);
        let coordinator = Proc::spawn("coordinator", &mut cmd, &dir.join("coordinator.log")).unwrap();
        eventually(Duration::from_secs(20), "the coordinator to listen", || {
            std::fs::read_to_string(dir.join("coordinator.log")).ok()?.contains("coordinator listening").then_some(())
        })
        .unwrap();
        TlsFarm {
            dir: dir.to_owned(),
            certs,
            url: format!("https://127.0.0.1:{port}"),
            http,
            operate,
            registry,
            _coordinator: coordinator,
        }
    }

    fn braid(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("braid"));
        cmd.args(["--coordinator", &self.url, "--token", &self.operate, "--ca"]).arg(self.certs.join("ca.pem"));
        run(cmd.args(args).env_remove("BRAID_TOKEN"))
    }

    fn token(&self, args: &[&str]) -> String {
        stdout(&self.braid(&[&["token", "create", "--role", "agent"], args].concat()))
    }

    fn agent(&self, name: &str, work: &str) -> Command {
        let mut cmd = Command::new(bin("braid-agent"));
        cmd.args(["--coordinator", &self.url, "--name", name, "--work-dir"]).arg(self.dir.join(work));
        cmd
    }

    /// `braid-agent join` as `name` into work dir `work`.
    fn join(&self, name: &str, work: &str, token: &str) -> Output {
        run(self.agent(name, work).args(["join", "--token", token, "--ca"]).arg(self.certs.join("ca.pem")))
    }

    fn spawn(&self, label: &str, mut cmd: Command) -> Proc {
        Proc::spawn(label, &mut cmd, &self.dir.join(format!("{label}.log"))).unwrap()
    }

    fn log(&self, label: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{label}.log"))).unwrap_or_default()
    }

    /// How many sessions of `name` the coordinator accepted.
    fn sessions_of(&self, name: &str) -> usize {
        let needle = format!("agent={name}");
        self.log("coordinator").lines().filter(|l| l.contains("agent connected") && l.contains(&needle)).count()
    }

    fn agents(&self) -> serde_json::Value {
        serde_json::from_str(&stdout(&self.braid(&["agents", "--format", "json"]))).unwrap()
    }

    /// Builds a one-platform image; returns the build as `braid inspect` shows it.
    fn build(&self, n: u32) -> serde_json::Value {
        let ctx = self.dir.join(format!("ctx-{n}"));
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(ctx.join("Dockerfile"), format!("FROM scratch\nCOPY Dockerfile /build-{n}\n")).unwrap();
        let meta = self.dir.join(format!("meta-{n}.json"));
        let tag = format!("{}/enroll/app:{n}", self.registry.addr);
        let out = self.braid(&[
            "build",
            "--platform",
            "linux/amd64",
            "-t",
            &tag,
            "--push",
            "--metadata-file",
            meta.to_str().unwrap(),
            ctx.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "build {n}: {}", output_text(&out));
        let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
        let id = meta["braid.build.id"].as_str().unwrap();
        serde_json::from_str(&stdout(&self.braid(&["inspect", id, "--format", "json"]))).unwrap()
    }

    /// The sample of `series` (name and labels) in /metrics, if any.
    fn metric(&self, series: &str) -> Option<f64> {
        let out = run(Command::new("curl")
            .args(["-fsS", "-H", &format!("Authorization: Bearer {}", self.operate), "--cacert"])
            .arg(self.certs.join("ca.pem"))
            .arg(format!("https://{}/metrics", self.http)));
        let text = stdout(&out);
        let line = text.lines().find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))?;
        line[series.len()..].trim().parse().ok()
    }

    fn wait_connected(&self, name: &str, sessions: usize) {
        eventually(Duration::from_secs(30), "the agent's session", || {
            (self.sessions_of(name) >= sessions).then_some(())
        })
        .unwrap();
    }
}

/// Jobs the agent process logging to `label` ran.
fn jobs_done(farm: &TlsFarm, label: &str) -> usize {
    farm.log(label).matches("job done").count()
}

fn refused(out: &Output, wants: &[&str]) {
    assert!(!out.status.success(), "should be refused: {}", output_text(out));
    for want in wants {
        assert!(output_text(out).contains(want), "wanted {want:?} in {}", output_text(out));
    }
}

#[test]
fn join_tokens_never_take_over_an_enrolled_name() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    // An offline certificate for agent-a, issued before agent-a joins: older
    // than the one the join records.
    let farm = TlsFarm::start(tmp.path(), |certs| {
        let out = run(Command::new(bin("braid"))
            .args(["certs", "issue", "--dir"])
            .arg(certs)
            .args(["--name", "agent-a", "--kind", "agent"]));
        stdout(&out);
    });

    // --name and --replace are for join tokens, and --replace needs --name.
    refused(&farm.braid(&["token", "create", "--role", "submit", "--name", "x"]), &["need --role agent"]);
    refused(&farm.braid(&["token", "create", "--role", "agent", "--replace"]), &["--name"]);
    let offline = run(Command::new(bin("braid-coordinator"))
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .args(["token", "create", "--role", "operate", "--name", "agent-a"]));
    refused(&offline, &["agent_name: only a join token (role agent)"]);

    // 1. A token bound to agent-a does not enroll agent-z, and is not spent by trying.
    let bound = farm.token(&["--name", "agent-a", "--single-use"]);
    refused(&farm.join("agent-z", "z", &bound), &["bound to agent \"agent-a\"", "\"agent-z\""]);
    stdout(&farm.join("agent-a", "a1", &bound));
    let tokens: serde_json::Value =
        serde_json::from_str(&stdout(&farm.braid(&["token", "list", "--format", "json"]))).unwrap();
    let bound_id = bound.split('_').nth(1).unwrap();
    let listed = tokens.as_array().unwrap().iter().find(|t| t["token_id"] == bound_id).unwrap();
    assert_eq!(listed["agent_name"], "agent-a", "{listed}");
    assert!(stdout(&farm.braid(&["token", "list"])).lines().any(|l| l.starts_with(bound_id) && l.contains("agent-a")));

    let _a1 = farm.spawn("a1", farm.agent("agent-a", "a1"));
    farm.wait_connected("agent-a", 1);

    // 2. Another valid join token cannot enroll agent-a again; the real agent keeps its jobs.
    let any = farm.token(&[]);
    refused(&farm.join("agent-a", "thief", &any), &["already enrolled", "braid agents forget agent-a", "--replace"]);
    assert!(!tmp.path().join("thief/tls/agent.pem").exists());
    farm.build(1);
    assert_eq!(jobs_done(&farm, "a1"), 1, "the real agent-a built it");

    // 4. A session with an older, unrecorded certificate of agent-a is
    // refused; agent-a stays connected and keeps building.
    let mut cmd = farm.agent("agent-a", "offline");
    cmd.arg("--tls-ca").arg(farm.certs.join("ca.pem"));
    cmd.arg("--tls-cert").arg(farm.certs.join("agent-a.pem")).arg("--tls-key").arg(farm.certs.join("agent-a-key.pem"));
    let offline_agent = farm.spawn("offline", cmd);
    eventually(Duration::from_secs(30), "the offline certificate's session to be refused", || {
        farm.log("offline").contains("coordinator session ended").then_some(())
    })
    .unwrap();
    assert!(farm.log("offline").contains("is not newer and was never recorded"), "{}", farm.log("offline"));
    assert_eq!(farm.sessions_of("agent-a"), 1, "the real session was not replaced");
    let agents = farm.agents();
    let a = agents.as_array().unwrap().iter().find(|a| a["name"] == "agent-a").unwrap();
    assert!(a["state"] == "idle" || a["state"] == "busy", "{a}");
    farm.build(2);
    assert_eq!(jobs_done(&farm, "a1"), 2);
    assert_eq!(jobs_done(&farm, "offline"), 0);
    drop(offline_agent);

    // 5. A --replace token bound to agent-a re-enrolls it; the old
    // certificate is revoked and its process refused from then on.
    let replace = farm.token(&["--name", "agent-a", "--replace", "--single-use"]);
    stdout(&farm.join("agent-a", "a2", &replace));
    eventually(Duration::from_secs(30), "the replaced agent to be refused", || {
        farm.log("a1").contains("was revoked").then_some(())
    })
    .unwrap();
    // It says what to do, and knocks again less and less often.
    let log = farm.log("a1");
    assert!(log.contains("enroll it again") && log.contains("retry_in=10s"), "{log}");
    let _a2 = farm.spawn("a2", farm.agent("agent-a", "a2"));
    farm.wait_connected("agent-a", 2);
    farm.build(3);
    assert_eq!((jobs_done(&farm, "a1"), jobs_done(&farm, "a2")), (2, 1));

    // 3. Forgetting agent-a revokes its certificate: the running a2 is cut
    // off and refused on reconnect, and a fresh token enrolls the name again.
    let out = farm.braid(&["agents", "forget", "agent-a"]);
    assert!(stdout(&out).contains("1 certificate(s) revoked, its session closed"), "{}", output_text(&out));
    eventually(Duration::from_secs(30), "the forgotten agent's reconnect to be refused", || {
        let log = farm.log("a2");
        (log.contains("was forgotten by an operator") && log.contains("was revoked")).then_some(())
    })
    .unwrap();
    assert!(farm.agents().as_array().unwrap().iter().all(|a| a["name"] != "agent-a"));
    stdout(&farm.join("agent-a", "a3", &any));
    let _a3 = farm.spawn("a3", farm.agent("agent-a", "a3"));
    farm.wait_connected("agent-a", 3);
    let build = farm.build(4);
    assert_eq!(
        (jobs_done(&farm, "a1"), jobs_done(&farm, "a2"), jobs_done(&farm, "a3")),
        (2, 1, 1),
        "only the newly enrolled agent got the job"
    );

    // 6. FetchContext: a valid agent certificate without a lease on a job of
    // that context is refused; a revoked certificate is refused outright.
    let context = build["context"].as_str().unwrap().to_owned();
    let job_id = build["jobs"][0]["job_id"].as_str().unwrap().to_owned();
    let fetch = |work: &str, job_id: &str, lease_id: &str| {
        let tls = tmp.path().join(work).join("tls");
        let ca = std::fs::read(farm.certs.join("ca.pem")).unwrap();
        let identity = Identity::from_pem(
            std::fs::read(tls.join("agent.pem")).unwrap(),
            std::fs::read(tls.join("agent-key.pem")).unwrap(),
        );
        let request = proto::FetchContextRequest {
            digest: context.clone(),
            job_id: job_id.to_owned(),
            attempt: 1,
            lease_id: lease_id.to_owned(),
        };
        let url = farm.url.clone();
        tokio::runtime::Runtime::new().unwrap().block_on(async move {
            let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).identity(identity);
            let channel = Endpoint::from_shared(url).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
            AgentsClient::new(channel).fetch_context(request).await.map(drop).unwrap_err()
        })
    };
    let no_job = fetch("a3", "", "");
    assert_eq!(no_job.code(), tonic::Code::PermissionDenied, "{no_job:?}");
    assert!(no_job.message().contains("job_id: required"), "{no_job:?}");
    // The build is over: its job's lease is gone.
    let stale = fetch("a3", &job_id, "not-the-lease");
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition, "{stale:?}");
    assert!(stale.message().contains(&format!("job {job_id} attempt 1: no such lease")), "{stale:?}");
    let revoked = fetch("a2", &job_id, "not-the-lease");
    assert_eq!(revoked.code(), tonic::Code::Unauthenticated, "{revoked:?}");
    assert!(revoked.message().contains("of agent \"agent-a\" was revoked"), "{revoked:?}");
}

/// An agent renews its certificate at two thirds of its life over its own
/// mutual-TLS session, reconnects with it (the coordinator then revokes the
/// old one), and goes on building after the first certificate expired.
#[test]
fn agents_renew_their_certificates_and_build_past_the_first_expiry() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let farm = TlsFarm::start_with(tmp.path(), &["--agent-cert-seconds", "60"], |_| {});
    let joined = std::time::Instant::now();
    stdout(&farm.join("renewer", "w1", &farm.token(&["--single-use"])));
    let tls = tmp.path().join("w1/tls");
    let first = (std::fs::read(tls.join("agent.pem")).unwrap(), std::fs::read(tls.join("agent-key.pem")).unwrap());
    let _agent = farm.spawn("r1", farm.agent("renewer", "w1"));
    farm.wait_connected("renewer", 1);
    // Its heartbeats report the certificate's expiry: 66 s after the join,
    // under a week left, so `braid agents` flags it.
    let unix = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let joined_at = unix();
    let not_after = |farm: &TlsFarm| {
        let agents = farm.agents();
        let renewer = agents.as_array().unwrap().iter().find(|a| a["name"] == "renewer").unwrap().clone();
        renewer["health"]["certificate_not_after"].as_i64().map(|t| (t, renewer))
    };
    let (first_expiry, renewer) = eventually(Duration::from_secs(30), "a health report", || not_after(&farm)).unwrap();
    assert!((joined_at - 30..=joined_at + 80).contains(&first_expiry), "{renewer}");
    assert_eq!(renewer["health"]["certificate_expiring"], true, "{renewer}");
    assert_eq!(renewer["health"]["certificate_days_left"], 0, "{renewer}");
    let listed = farm.braid(&["agents"]);
    let table = stdout(&listed);
    let row = table.lines().find(|l| l.starts_with("renewer ")).unwrap();
    assert_eq!(row.split_whitespace().nth(5), Some("0d!"), "CERT column:\n{table}");
    let warning = String::from_utf8_lossy(&listed.stderr);
    assert!(warning.contains("warning: agent renewer's certificate expires in 0 day(s)"), "{warning}");
    // And /metrics, for the certificate-expiry alert (examples/monitoring).
    let expiry_series = "braid_agent_certificate_expiry_timestamp_seconds{agent=\"renewer\"}";
    let exported = farm.metric(expiry_series).unwrap_or_else(|| panic!("{expiry_series} missing"));
    assert_eq!(exported, first_expiry as f64);
    assert!(exported - (unix() as f64) < 80.0, "seconds left {}", exported - unix() as f64);

    // Due at two thirds of 66 s (60 s and 6 s of clock skew allowance).
    eventually(Duration::from_secs(90), "the certificate to be renewed", || {
        farm.log("r1").contains("agent certificate renewed").then_some(())
    })
    .unwrap();
    farm.wait_connected("renewer", 2);
    let renewed = std::fs::read(tls.join("agent.pem")).unwrap();
    assert_ne!(renewed, first.0, "a new certificate on disk");
    assert_ne!(std::fs::read(tls.join("agent-key.pem")).unwrap(), first.1, "with a new key");
    assert!(!tls.join("renew.ready").exists() && !tls.join("agent.pem.new").exists());
    eventually(Duration::from_secs(20), "the coordinator to record it", || {
        farm.log("coordinator").contains("recorded a newer agent certificate").then_some(())
    })
    .unwrap();
    // The renewed certificate's expiry reaches the report at once.
    let (renewed_expiry, _) =
        eventually(Duration::from_secs(30), "the renewed certificate's expiry in the health report", || {
            not_after(&farm).filter(|(t, _)| *t > first_expiry)
        })
        .unwrap();
    let exported = farm.metric(expiry_series).unwrap();
    assert!(exported >= renewed_expiry as f64 && exported > first_expiry as f64, "{exported} after renewal");

    // The first certificate is revoked now that the renewed one was presented.
    let ca = std::fs::read(farm.certs.join("ca.pem")).unwrap();
    let url = farm.url.clone();
    let refused = tokio::runtime::Runtime::new().unwrap().block_on(async move {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(first.0, first.1));
        let channel = Endpoint::from_shared(url).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
        AgentsClient::new(channel).renew(proto::RenewRequest { csr_pem: String::new() }).await.unwrap_err()
    });
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("was revoked"), "{refused:?}");

    // Past the first certificate's expiry the agent still builds.
    std::thread::sleep(Duration::from_secs(70).saturating_sub(joined.elapsed()));
    let build = farm.build(1);
    assert_eq!(build["jobs"][0]["agent"], "renewer", "{build}");
    assert_eq!(jobs_done(&farm, "r1"), 1);
}
