//! Mutual TLS, join tokens, roles and secrets, on the real binaries: a
//! coordinator serving TLS with the cluster CA, an agent that enrolls with a
//! single-use token, clients with bearer tokens, and every refusal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use braid_tests::{
    Pki, Proc, Registry, bin, eventually, free_port, offline_token, output_text, require_environment, run_with_timeout,
};

struct Tls {
    dir: PathBuf,
    url: String,
    certs: PathBuf,
    registry: String,
}

impl Tls {
    fn braid(&self, token: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("braid"));
        cmd.args(["--coordinator", &self.url, "--ca"]).arg(self.certs.join("ca.pem"));
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        cmd.args(args).env_remove("BRAID_TOKEN");
        run_with_timeout(&mut cmd, Duration::from_secs(300)).unwrap()
    }

    fn agent(&self, name: &str, work: &str, extra: &[&str]) -> Command {
        let mut cmd = Command::new(bin("braid-agent"));
        cmd.args(["--coordinator", &self.url, "--name", name, "--work-dir"]).arg(self.dir.join(work)).args(extra);
        cmd
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }
}

fn token_from(out: &Output) -> String {
    assert!(out.status.success(), "{}", output_text(out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn mutual_tls_tokens_and_roles() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let certs = dir.join("certs");

    // The cluster CA and the coordinator's certificate; keys are 0600.
    let pki = Pki::init(&certs);
    for key in ["ca-key.pem", "coordinator-key.pem"] {
        assert_eq!(mode(&certs.join(key)), 0o600, "{key}");
    }

    let data = dir.join("data");
    let operate = offline_token(&data, "operate");

    let port = free_port();
    let http = free_port();
    let mut coordinator_cmd = Command::new(bin("braid-coordinator"));
    coordinator_cmd
        .args(["--listen", &format!("127.0.0.1:{port}"), "--http-listen", &format!("127.0.0.1:{http}")])
        .arg("--data-dir")
        .arg(&data)
        .args(pki.coordinator_flags(true))
        .args(["--insecure-registry", &registry.addr]);
    let _coordinator = Proc::spawn("coordinator", &mut coordinator_cmd, &dir.join("coordinator.log")).unwrap();
    eventually(Duration::from_secs(20), "the coordinator to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(drop)
    })
    .unwrap();
    // The HTTP port speaks TLS with the same certificate.
    let health = eventually(Duration::from_secs(20), "https /healthz", || {
        let out = Command::new("curl")
            .args(["-fsS", "--cacert"])
            .arg(certs.join("ca.pem"))
            .arg(format!("https://127.0.0.1:{http}/healthz"))
            .output()
            .ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .unwrap();
    assert_eq!(health.trim(), "ok");
    let plain = Command::new("curl").args(["-fsS", &format!("http://127.0.0.1:{http}/healthz")]).output().unwrap();
    assert!(!plain.status.success(), "no plaintext on the TLS port");

    let tls = Tls {
        dir: dir.clone(),
        url: format!("https://127.0.0.1:{port}"),
        certs: certs.clone(),
        registry: registry.addr.clone(),
    };

    // Enrollment: a single-use join token gets agent-1 its certificate once.
    let join_token =
        token_from(&tls.braid(Some(&operate), &["token", "create", "--role", "agent", "--single-use", "--ttl", "1h"]));
    let join = |name: &str, work: &str, token: &str| {
        let mut cmd = tls.agent(name, work, &[]);
        cmd.args(["join", "--token", token, "--ca"]).arg(certs.join("ca.pem"));
        run_with_timeout(&mut cmd, Duration::from_secs(30)).unwrap()
    };
    let out = join("agent-1", "agent-1", &join_token);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(mode(&dir.join("agent-1/tls/agent-key.pem")), 0o600);
    let again = join("agent-1", "agent-1", &join_token);
    assert!(again.status.success() && output_text(&again).contains("already enrolled"), "{}", output_text(&again));
    let reused = join("agent-x", "agent-x", &join_token);
    assert!(!reused.status.success() && output_text(&reused).contains("already used"), "{}", output_text(&reused));

    let mut agent_cmd = tls.agent("agent-1", "agent-1", &[]);
    let _agent = Proc::spawn("agent-1", &mut agent_cmd, &dir.join("agent-1.log")).unwrap();
    eventually(Duration::from_secs(30), "agent-1 to connect over mTLS", || {
        std::fs::read_to_string(dir.join("coordinator.log")).ok()?.contains("agent connected").then_some(())
    })
    .unwrap();

    // A build with a submit token.
    let submit =
        token_from(&tls.braid(Some(&operate), &["token", "create", "--role", "submit", "--description", "ci"]));
    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\nCOPY Dockerfile /\n").unwrap();
    let tag = format!("{}/secure/app:1", tls.registry);
    let meta = dir.join("meta.json");
    let out = tls.braid(
        Some(&submit),
        &[
            "build",
            "--platform",
            "linux/amd64",
            "-t",
            &tag,
            "--push",
            "--metadata-file",
            meta.to_str().unwrap(),
            ctx.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    let build_id =
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(&meta).unwrap()).unwrap()["braid.build.id"]
            .as_str()
            .unwrap()
            .to_owned();
    assert!(registry.manifest("secure/app:1").is_some());

    // Roles, each refused with the right status.
    let refused = |token: Option<&str>, args: &[&str], want: &str| {
        let out = tls.braid(token, args);
        assert!(!out.status.success(), "{args:?} should be refused");
        assert!(output_text(&out).contains(want), "{args:?}: wanted {want:?} in {}", output_text(&out));
    };
    refused(None, &["builds"], "missing bearer token");
    refused(Some("braid_nope_0000"), &["builds"], "invalid token");
    refused(Some(&submit), &["token", "list"], "has the submit role; this needs operate");
    refused(Some(&join_token), &["builds"], "was already used");
    let agent_role = token_from(&tls.braid(Some(&operate), &["token", "create", "--role", "agent"]));
    refused(Some(&agent_role), &["builds"], "has the agent role; this needs submit");
    refused(Some(&agent_role), &["token", "create", "--role", "operate"], "has the agent role; this needs operate");
    refused(Some(&submit), &["token", "create", "--role", "operate"], "has the submit role; this needs operate");
    refused(Some(&submit), &["token", "revoke", "x"], "has the submit role; this needs operate");
    let other_submit = token_from(&tls.braid(Some(&operate), &["token", "create", "--role", "submit"]));
    refused(Some(&other_submit), &["inspect", &build_id], "submitted with another token");
    refused(Some(&other_submit), &["cancel", &build_id], "submitted with another token");
    assert!(tls.braid(Some(&submit), &["inspect", &build_id]).status.success(), "its own build");
    assert!(tls.braid(Some(&operate), &["inspect", &build_id]).status.success(), "operate sees all");
    let short = token_from(&tls.braid(Some(&operate), &["token", "create", "--role", "submit", "--ttl", "1s"]));
    std::thread::sleep(Duration::from_millis(2100));
    refused(Some(&short), &["builds"], "has expired");
    let list = tls.braid(Some(&operate), &["token", "list", "--format", "json"]);
    let tokens: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let submit_id = submit.split('_').nth(1).unwrap();
    assert!(tokens.as_array().unwrap().iter().any(|t| t["token_id"] == submit_id));
    assert!(tls.braid(Some(&operate), &["token", "revoke", submit_id]).status.success());
    refused(Some(&submit), &["builds"], "was revoked");

    // Agents: another CA, an expired certificate, a client certificate, a
    // hello under another name: each refused, none ever connected.
    let other = dir.join("other-ca");
    let out = run_with_timeout(
        Command::new(bin("braid")).args(["certs", "init", "--dir"]).arg(&other),
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(out.status.success());
    let issue = |certs_dir: &Path, name: &str, kind: &str, days: &str| {
        let out = run_with_timeout(
            Command::new(bin("braid"))
                .args(["certs", "issue", "--dir"])
                .arg(certs_dir)
                .args(["--name", name, "--kind", kind, "--days", days]),
            Duration::from_secs(30),
        )
        .unwrap();
        assert!(out.status.success(), "{}", output_text(&out));
        (certs_dir.join(format!("{name}.pem")), certs_dir.join(format!("{name}-key.pem")))
    };
    let cases = [
        ("foreign", issue(&other, "foreign", "agent", "30"), "foreign", ""),
        ("expired", issue(&certs, "expired", "agent", "0"), "expired", ""),
        ("client-cert", issue(&certs, "client-cert", "client", "30"), "client-cert", "not an agent certificate"),
        ("impostor", issue(&certs, "agent-2", "agent", "30"), "agent-evil", "but the certificate is for"),
    ];
    std::thread::sleep(Duration::from_secs(1));
    let mut procs = Vec::new();
    for (label, (cert, key), name, _) in &cases {
        let mut cmd = tls.agent(name, label, &[]);
        cmd.arg("--tls-ca").arg(certs.join("ca.pem")).arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        procs.push(Proc::spawn(label, &mut cmd, &dir.join(format!("{label}.log"))).unwrap());
    }
    for (label, _, name, want) in &cases {
        eventually(Duration::from_secs(30), "the agent to be refused", || {
            tls.log(label).contains("coordinator session ended").then_some(())
        })
        .unwrap();
        assert!(tls.log(label).contains(want), "{label}: {}", tls.log(label));
        let coordinator = tls.log("coordinator");
        let accepted =
            coordinator.lines().any(|l| l.contains("agent connected") && l.contains(&format!("agent={name}")));
        assert!(!accepted, "{label} was let in");
    }
    drop(procs);

    // No secret in any log or in the database.
    let mut haystacks: Vec<(String, Vec<u8>)> = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            haystacks.push((path.display().to_string(), std::fs::read(&path).unwrap()));
        }
    }
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("braid.db") {
            haystacks.push((path.display().to_string(), std::fs::read(&path).unwrap()));
        }
    }
    assert!(haystacks.len() >= 3);
    for secret in [&operate, &submit, &join_token, &other_submit] {
        let secret_part = secret.rsplit('_').next().unwrap();
        for (name, bytes) in &haystacks {
            let found = bytes.windows(secret_part.len()).any(|w| w == secret_part.as_bytes());
            assert!(!found, "a token secret appears in {name}");
        }
    }
}
