//! The smaller findings of the hardening probe (issue 13, part 5), on the
//! real binaries: hostile platforms, label keys, ports, out-of-range numbers
//! and malformed protobuf are refused with InvalidArgument naming the field
//! and value, from the CLI and from a raw gRPC client alike; metric platform
//! labels stay bounded; the dashboard, its API and `/metrics` need an
//! operate token once the coordinator has TLS; `braid --log-format json`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use braid_shared::proto::{
    self, admin_client::AdminClient, agent_message::Kind as FromAgent, agents_client::AgentsClient,
    builds_client::BuildsClient,
};
use braid_tests::{
    Farm, Pki, Proc, bin, eventually, free_port, offline_token, output_text, require_environment, run_with_timeout,
};
use tonic::Code;

fn spec() -> proto::BuildSpec {
    proto::BuildSpec {
        platforms: vec!["linux/amd64".into()],
        context_digest: format!("sha256:{}", "0".repeat(64)),
        ..Default::default()
    }
}

fn assert_refused(result: Result<impl std::fmt::Debug, tonic::Status>, needles: &[&str]) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    for needle in needles {
        assert!(status.message().contains(needle), "{:?} lacks {needle:?}", status.message());
    }
}

/// What a raw gRPC call with `body` as its one message answers: the
/// grpc-status and grpc-message, from headers or trailers.
fn raw_grpc(addr: &str, method: &str, body: &[u8], dir: &Path) -> (String, String) {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(body);
    let file = dir.join("raw-grpc-body");
    std::fs::write(&file, framed).unwrap();
    let out = run_with_timeout(
        Command::new("curl")
            .args(["-sS", "--http2-prior-knowledge", "-D", "-", "-o", "/dev/null", "--max-time", "10"])
            .args(["-H", "content-type: application/grpc", "-H", "te: trailers", "--data-binary"])
            .arg(format!("@{}", file.display()))
            .arg(format!("http://{addr}/{method}")),
        Duration::from_secs(20),
    )
    .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("no {name} in:\n{head}{}", String::from_utf8_lossy(&out.stderr)))
    };
    (field("grpc-status:"), percent_decode(&field("grpc-message:")))
}

/// grpc-message is percent-encoded on the wire.
fn percent_decode(s: &str) -> String {
    let mut out = Vec::new();
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex: String = bytes.by_ref().take(2).map(char::from).collect();
            out.push(u8::from_str_radix(&hex, 16).unwrap_or(b'?'));
        } else {
            out.push(b);
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn hostile_inputs_are_refused_with_the_field_and_value_named() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let farm = Farm::start_with(dir, None, &[], &[]).unwrap();
    let addr = farm.url.trim_start_matches("http://").to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut builds = BuildsClient::connect(farm.url.clone()).await.unwrap();
        let submit = |s: proto::BuildSpec| proto::SubmitRequest { spec: Some(s), credentials: vec![], secrets: vec![] };

        // Platforms: anything not [a-z0-9_]-shaped after normalization.
        for bad in [
            "../../etc",
            "linux/../etc",
            "linux/riscv64/..",
            "linux/x.y",
            "linux/a-b",
            "lin ux/amd64",
            "linux/amd64/v1/x",
        ] {
            let s = proto::BuildSpec { platforms: vec![bad.into()], ..spec() };
            assert_refused(builds.submit(submit(s)).await, &["platforms: invalid platform", &format!("{bad:?}")]);
        }
        let annotation = proto::Annotation {
            level: "manifest".into(),
            platform: "../../etc".into(),
            key: "k".into(),
            value: "v".into(),
        };
        let s = proto::BuildSpec { annotations: vec![annotation], ..spec() };
        assert_refused(builds.submit(submit(s)).await, &["annotations: invalid platform \"../../etc\""]);

        // Label, annotation and build-arg keys a builder's `k=v` would split or break.
        for key in ["a=b", "", "a\nb", "a\0b"] {
            let s = proto::BuildSpec { labels: [(key.to_owned(), "v".to_owned())].into(), ..spec() };
            assert_refused(builds.submit(submit(s)).await, &["labels: invalid name", &format!("{key:?}")]);
        }
        let s = proto::BuildSpec { build_args: [("A=B".to_owned(), "v".to_owned())].into(), ..spec() };
        assert_refused(builds.submit(submit(s)).await, &["build_args: invalid name \"A=B\""]);
        let s = proto::BuildSpec { labels: [("k".to_owned(), "a\0b".to_owned())].into(), ..spec() };
        assert_refused(builds.submit(submit(s)).await, &["labels: value of \"k\" contains a NUL byte"]);

        // Registry ports outside 1..=65535.
        for tag in ["127.0.0.1:0/app", "127.0.0.1:99999/app", "localhost:65536/app:1", "[::1]:0/app"] {
            let s = proto::BuildSpec { tags: vec![tag.into()], ..spec() };
            assert_refused(builds.submit(submit(s)).await, &["tags: invalid image reference", &format!("{tag:?}")]);
        }

        // Numbers past what a field holds are refused, not truncated (2^40 s
        // was stored as 0, no timeout; a ttl of 2^32 s as a token that never expires).
        let s = proto::BuildSpec { timeout_seconds: 1 << 40, ..spec() };
        assert_refused(builds.submit(submit(s)).await, &["timeout_seconds: 1099511627776"]);
        let list = builds.list(proto::ListBuildsRequest { limit: 1 << 32, state: 0 }).await;
        assert_refused(list, &["limit: 4294967296"]);
        let mut admin = AdminClient::connect(farm.url.clone()).await.unwrap();
        let token =
            proto::CreateTokenRequest { role: proto::Role::Submit as i32, ttl_seconds: 1 << 32, ..Default::default() };
        assert_refused(admin.create_token(token).await, &["ttl_seconds: 4294967296"]);

        // An agent's hello: hostile platforms and a slot count of 2^32 + 1.
        let mut agents = AgentsClient::connect(farm.url.clone()).await.unwrap();
        let hello = |platforms: Vec<String>, slots: u64| proto::AgentMessage {
            kind: Some(FromAgent::Hello(proto::Hello {
                name: "probe".into(),
                platforms,
                slots,
                backend: "buildah".into(),
                version: "99.0.0".into(),
                ..Default::default()
            })),
            seq: 0,
        };
        let session = agents.session(tokio_stream::iter(vec![hello(vec!["../../etc".into()], 1)])).await;
        assert_refused(session.map(drop), &["hello.platforms: invalid platform \"../../etc\""]);
        let session = agents.session(tokio_stream::iter(vec![hello(vec!["linux/amd64".into()], (1 << 32) + 1)])).await;
        assert_refused(session.map(drop), &["hello.slots: 4294967297"]);
        // A well-formed hello from a version this coordinator does not support.
        let session = agents.session(tokio_stream::iter(vec![hello(vec!["linux/amd64".into()], 1)])).await;
        let status = session.map(drop).unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        let want = format!(
            "agent version \"99.0.0\" is not supported by coordinator version {v}: this coordinator accepts agents \
             >=0.{minor}.0, <0.{next}.0",
            v = braid_shared::VERSION,
            minor = braid_shared::compat::Version::parse(braid_shared::VERSION).unwrap().minor,
            next = braid_shared::compat::Version::parse(braid_shared::VERSION).unwrap().minor + 1,
        );
        assert!(status.message().starts_with(&want), "{}", status.message());
    });

    // Malformed protobuf (a string field claiming 5 bytes, 1 present) is the
    // caller's error on every service, not the server's.
    for method in [
        "braid.v1.Builds/Get",
        "braid.v1.Builds/Submit",
        "braid.v1.Admin/ListAgents",
        "braid.v1.Builds/List",
        "grpc.health.v1.Health/Check",
    ] {
        let (status, message) = raw_grpc(&addr, method, &[0x0a, 0x05, b'a'], dir);
        assert_eq!(status, "3", "{method}: {message}");
        assert!(message.contains("failed to decode Protobuf message"), "{method}: {message}");
    }
    for method in ["braid.v1.Builds/PutContext", "braid.v1.Agents/Session"] {
        let (status, message) = raw_grpc(&addr, method, &[0xff, 0xff], dir);
        assert_eq!(status, "3", "{method}: {message}");
    }

    // The CLI: a hostile platform is refused before anything is sent, a bad
    // port by the coordinator; both name the value.
    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\n").unwrap();
    let ctx = ctx.to_str().unwrap();
    let out = farm.braid(&["build", "--platform", "linux/amd64,../../etc", ctx]).unwrap();
    assert!(
        !out.status.success() && output_text(&out).contains("invalid platform \"../../etc\""),
        "{}",
        output_text(&out)
    );
    let out = farm.braid(&["build", "--platform", "linux/amd64", "-t", "127.0.0.1:0/app", ctx]).unwrap();
    assert!(
        !out.status.success()
            && output_text(&out).contains("tags: invalid image reference")
            && output_text(&out).contains("127.0.0.1:0/app"),
        "{}",
        output_text(&out)
    );
    let out = farm.braid(&["build", "--platform", "linux/amd64", "--label", "a\rb=v", ctx]).unwrap();
    assert!(!out.status.success() && output_text(&out).contains("labels: invalid name"), "{}", output_text(&out));

    // A well-formed platform no agent declares is refused at once (no agent
    // ever connected here), and gets no metric series.
    let out = farm.braid(&["build", "--platform", "linux/evilarch_1", "--detach", ctx]).unwrap();
    assert!(
        !out.status.success()
            && output_text(&out).contains("platform linux/evilarch_1: no agent has ever connected to this coordinator"),
        "{}",
        output_text(&out)
    );
    let out = Command::new("curl").args(["-fsS", &format!("http://{}/metrics", farm.http)]).output().unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(metrics.contains("braid_") && !metrics.contains("evilarch"), "{metrics}");

    // --log-format json: the CLI's own error is one JSON object.
    let out = farm.braid(&["--log-format", "json", "inspect", "0123456789abcdef0123456789abcdef"]).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: not JSON: {stderr}"));
    assert_eq!(line["level"], "ERROR", "{stderr}");
    assert!(line["fields"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{stderr}");
    let out = farm.braid(&["--log-format", "xml", "builds"]).unwrap();
    assert!(!out.status.success() && output_text(&out).contains("expected pretty or json"), "{}", output_text(&out));

    // Plain loopback development stays open.
    let out = Command::new("curl").args(["-fsS", &format!("http://{}/api/overview", farm.http)]).output().unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
}

struct Https {
    base: String,
    ca: std::path::PathBuf,
}

impl Https {
    /// `curl` with the cluster CA; returns (status code, headers and body).
    fn curl(&self, args: &[&str], path: &str) -> (u16, String) {
        let out = run_with_timeout(
            Command::new("curl")
                .args(["-sS", "-i", "--max-time", "10", "--cacert"])
                .arg(&self.ca)
                .args(args)
                .arg(format!("{}{path}", self.base)),
            Duration::from_secs(20),
        )
        .unwrap();
        let all = String::from_utf8_lossy(&out.stdout).into_owned();
        let code = all.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (code, all)
    }
}

#[test]
fn with_tls_the_dashboard_api_and_metrics_need_an_operate_token() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::init(&dir.join("certs"));
    let data = dir.join("data");
    let operate = offline_token(&data, "operate");
    let operate_2 = offline_token(&data, "operate");
    let submit = offline_token(&data, "submit");

    let (port, http) = (free_port(), free_port());
    let mut cmd = Command::new(bin("braid-coordinator"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--http-listen", &format!("127.0.0.1:{http}")])
        .arg("--data-dir")
        .arg(&data);
    cmd.args(pki.coordinator_flags(true));
    let _coordinator = Proc::spawn("coordinator", &mut cmd, &dir.join("coordinator.log")).unwrap();
    let https = Https { base: format!("https://127.0.0.1:{http}"), ca: pki.ca() };
    eventually(Duration::from_secs(20), "https /healthz", || (https.curl(&[], "/healthz").0 == 200).then_some(()))
        .unwrap();

    // Probes stay open.
    assert_eq!(https.curl(&[], "/readyz").0, 200);
    // Without a token: the API and metrics answer 401, pages send to the login form.
    for path in ["/api/overview", "/api/builds/x/events", "/metrics"] {
        let (code, all) = https.curl(&[], path);
        assert_eq!(code, 401, "{path}: {all}");
        assert!(!all.contains("braid_builds_submitted_total"), "{all}");
    }
    for path in ["/", "/builds/x"] {
        let (code, all) = https.curl(&[], path);
        assert_eq!(code, 303, "{path}: {all}");
        assert!(all.to_ascii_lowercase().contains("location: /login"), "{all}");
    }
    // A submit token is not enough; a bad one is refused; an operate one reads.
    let bearer = |t: &str| format!("Authorization: Bearer {t}");
    assert_eq!(https.curl(&["-H", &bearer(&submit)], "/metrics").0, 403);
    assert_eq!(https.curl(&["-H", &bearer("braid_nope_0")], "/api/overview").0, 401);
    let (code, all) = https.curl(&["-H", &bearer(&operate)], "/metrics");
    assert_eq!(code, 200, "{all}");
    assert!(all.contains("braid_builds_submitted_total"), "{all}");
    assert_eq!(https.curl(&["-H", &bearer(&operate)], "/api/overview").0, 200);

    // The login form: a submit token is refused; an operate one opens a
    // session whose cookie is opaque, HttpOnly, Secure and SameSite=Strict.
    assert_eq!(https.curl(&[], "/login").0, 200);
    let (code, all) = https.curl(&["--data-urlencode", &format!("token={submit}")], "/login");
    assert_eq!(code, 403, "{all}");
    assert!(!all.contains("set-cookie"), "{all}");
    let login = |t: &str| {
        let (code, all) = https.curl(&["--data-urlencode", &format!("token={t}")], "/login");
        assert_eq!(code, 303, "{all}");
        let cookie_line = all.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).unwrap().to_owned();
        for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Max-Age="] {
            assert!(cookie_line.contains(attribute), "{cookie_line}");
        }
        assert!(!cookie_line.contains(t) && !cookie_line.contains(&t[6..18]), "the token is not in the cookie");
        let value = cookie_line.split_once(':').unwrap().1.split(';').next().unwrap().trim().to_owned();
        assert!(value.starts_with("braid_session=") && value.len() > 40, "{value}");
        value
    };
    let cookie = login(&operate);
    let with = |c: &str| vec!["-H".to_owned(), format!("Cookie: {c}")];
    let args = with(&cookie);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(https.curl(&args, "/api/overview").0, 200);
    let (code, page) = https.curl(&args, "/");
    assert_eq!(code, 200);
    assert!(page.contains("action=\"/logout\""), "{page}");
    // The dashboard's actions: a session's POST needs its CSRF token (from
    // /api/session), which then lets it through to the farm.
    let (code, all) = https.curl(&args, "/api/session");
    assert_eq!(code, 200, "{all}");
    assert!(all.contains("\"operate\":true"), "{all}");
    let csrf = all.split("\"csrf\":\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let mut post = args.clone();
    post.extend(["-X", "POST"]);
    let (code, all) = https.curl(&post, "/api/agents/no-such-agent/cordon");
    assert_eq!(code, 403, "{all}");
    assert!(all.contains("x-braid-csrf"), "{all}");
    let wrong = "X-Braid-CSRF: 00";
    let (code, _) = https.curl(&[post.as_slice(), &["-H", wrong]].concat(), "/api/agents/no-such-agent/cordon");
    assert_eq!(code, 403);
    let header = format!("X-Braid-CSRF: {csrf}");
    let (code, all) = https.curl(&[post.as_slice(), &["-H", &header]].concat(), "/api/agents/no-such-agent/cordon");
    assert_eq!(code, 404, "{all}");
    assert!(all.contains("agent \\\"no-such-agent\\\" not found"), "{all}");
    // A bearer header needs no CSRF token; a submit bearer is refused.
    let (code, all) = https.curl(&["-X", "POST", "-H", &bearer(&submit)], "/api/builds/abc/cancel");
    assert_eq!(code, 403, "{all}");
    let (code, all) = https.curl(&["-X", "POST", "-H", &bearer(&operate)], "/api/builds/abc/cancel");
    assert_eq!(code, 404, "{all}");
    assert_eq!(
        https.curl(&with("braid_session=forged").iter().map(String::as_str).collect::<Vec<_>>(), "/api/overview").0,
        401
    );
    // Logout ends the session.
    let mut logout = args.clone();
    logout.extend(["-X", "POST"]);
    assert_eq!(https.curl(&logout, "/logout").0, 303);
    assert_eq!(https.curl(&args, "/api/overview").0, 401);
    // Revoking the token ends its sessions.
    let second = login(&operate_2);
    let second = with(&second);
    let second: Vec<&str> = second.iter().map(String::as_str).collect();
    assert_eq!(https.curl(&second, "/api/overview").0, 200);
    let id = &operate_2[6..18];
    let out = run_with_timeout(
        Command::new(bin("braid"))
            .args(["--coordinator", &format!("https://127.0.0.1:{port}"), "--ca"])
            .arg(pki.ca())
            .args(["--token", &operate, "token", "revoke", id]),
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(https.curl(&second, "/api/overview").0, 401);
}
