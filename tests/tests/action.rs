//! The GitHub Action (action.yml, action/braid_action.py) against a real
//! farm, run as GitHub runs it: every declared input as an INPUT_<NAME>
//! variable (dashes kept, defaults applied), $GITHUB_OUTPUT and
//! $GITHUB_STEP_SUMMARY files. `version: path` uses the built braid; the
//! download path is served from a loopback HTTP server with a tarball and
//! its sha256 made here. SIGTERM (a cancelled job) cancels the farm build,
//! through the script and on `braid build` itself. The workflows and
//! action.yml are validated with check-jsonschema and zizmor.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use braid_tests::{
    AgentSpec, Farm, Registry, RunningBuild, bin, dockerfile_context, eventually, require, require_environment,
    run_with_timeout, send_signal, workspace,
};

const PYTHON_TOOLS: &str = "run `bash tests/env/setup.sh setup` as root, or \
    `python3 -m pip install pyyaml==6.0.3 check-jsonschema==0.39.0 zizmor==1.32.0`";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A YAML file as JSON, through PyYAML.
fn yaml(path: &Path) -> serde_json::Value {
    require("python3", PYTHON_TOOLS);
    let out = Command::new("python3")
        .args(["-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "parsing {}: {} ({PYTHON_TOOLS})", path.display(), text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn action_yml() -> serde_json::Value {
    yaml(&workspace().join("action.yml"))
}

/// One run of the action's script.
struct Run {
    out: Output,
    outputs: BTreeMap<String, String>,
    summary: String,
}

impl Run {
    fn log(&self) -> String {
        format!("{}{}", text(&self.out.stdout), text(&self.out.stderr))
    }
}

/// The script's command as GitHub's runner makes it: every input action.yml
/// declares, set (given, else its default, else empty), and nothing else
/// from this process but PATH and HOME.
fn action_command(dir: &Path, inputs: &[(&str, &str)], env: &[(&str, &str)], braid_on_path: bool) -> Command {
    let declared = action_yml();
    let mut cmd = Command::new("python3");
    cmd.arg(workspace().join("action/braid_action.py")).env_clear();
    let system_path = std::env::var("PATH").unwrap_or_default();
    let path =
        if braid_on_path { format!("{}:{system_path}", bin("braid").parent().unwrap().display()) } else { system_path };
    cmd.env("PATH", path).env("HOME", dir).env("RUNNER_TEMP", dir).current_dir(dir);
    for (name, spec) in declared["inputs"].as_object().unwrap() {
        let default = spec["default"].as_str().filter(|d| !d.contains("${{")).unwrap_or("");
        let value = inputs.iter().find(|(n, _)| n == name).map_or(default, |(_, v)| v);
        cmd.env(format!("INPUT_{}", name.to_uppercase()), value);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// GITHUB_OUTPUT's `name<<DELIMITER` blocks.
fn parse_outputs(raw: &str) -> BTreeMap<String, String> {
    let mut outputs = BTreeMap::new();
    let mut lines = raw.lines();
    while let Some(line) = lines.next() {
        let (name, delimiter) = line.split_once("<<").unwrap_or_else(|| panic!("not a heredoc output: {line:?}"));
        assert!(delimiter.starts_with("ghadelimiter_"), "{line}");
        let value: Vec<&str> = lines.by_ref().take_while(|l| *l != delimiter).collect();
        outputs.insert(name.to_owned(), value.join("\n"));
    }
    outputs
}

fn run_action(dir: &Path, inputs: &[(&str, &str)], env: &[(&str, &str)], braid_on_path: bool) -> Run {
    let output = dir.join("github-output");
    let summary = dir.join("step-summary");
    let _ = std::fs::remove_file(&output);
    let _ = std::fs::remove_file(&summary);
    let mut cmd = action_command(dir, inputs, env, braid_on_path);
    cmd.env("GITHUB_OUTPUT", &output).env("GITHUB_STEP_SUMMARY", &summary);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(600)).unwrap();
    Run {
        out,
        outputs: parse_outputs(&std::fs::read_to_string(&output).unwrap_or_default()),
        summary: std::fs::read_to_string(&summary).unwrap_or_default(),
    }
}

fn state_of(farm: &Farm, build_id: &str) -> serde_json::Value {
    let out = farm.braid(&["inspect", build_id, "--format", "json"]).unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

const SECRET: &str = "s3cret-value-do-not-print";

#[test]
fn the_action_builds_on_the_farm_from_github_inputs() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let farm = Farm::start(
        dir,
        &registry,
        &[AgentSpec::new("amd64-agent", &[]), AgentSpec::new("arm64-agent", &["linux/arm64"])],
    )
    .unwrap();
    farm.wait_for_agents(2).unwrap();
    let ctx = dockerfile_context(
        dir,
        "app",
        &format!(
            "FROM {base}\nARG TARGETARCH\nARG S6_OVERLAY_VERSION\nARG NOTE\n\
             RUN case \"$TARGETARCH\" in amd64) a=x86_64 ;; arm64) a=aarch64 ;; *) a=other ;; esac; \
             echo \"$a $S6_OVERLAY_VERSION $NOTE\" > /arch\n\
             RUN --mount=type=secret,id=tok sha256sum /run/secrets/tok | cut -d' ' -f1 > /tok.sum\n"
        ),
    );
    let tags = format!("{0}/action/app:latest\n{0}/action/app:1.2", registry.addr);
    let inputs = [
        ("context", ctx.as_str()),
        ("platforms", "linux/amd64\nlinux/arm64"),
        ("tags", tags.as_str()),
        ("build-args", "S6_OVERLAY_VERSION=3.1.6.2\nNOTE=a,b"),
        ("labels", "org.example.team=ci"),
        ("push", "true"),
        ("secrets", &format!("tok={SECRET}")),
        ("coordinator", farm.url.as_str()),
        ("version", "path"),
        ("dashboard-url", "https://braid.example.com:7701/"),
    ];
    let run = run_action(dir, &inputs, &[], true);
    let log = run.log();
    assert!(run.out.status.success(), "{log}");

    // The secret is masked, and appears nowhere else.
    assert!(log.contains(&format!("::add-mask::{SECRET}")), "{log}");
    assert_eq!(log.matches(SECRET).count(), 1, "the secret leaked into the log: {log}");

    let digest = registry.digest_of("action/app:latest").unwrap();
    assert_eq!(registry.digest_of("action/app:1.2").unwrap(), digest, "both tags pushed");
    assert_eq!(run.outputs["digest"], digest);
    assert_eq!(run.outputs["imageid"], digest);
    let metadata: serde_json::Value = serde_json::from_str(&run.outputs["metadata"]).unwrap();
    assert_eq!(metadata["containerimage.digest"], digest);
    let build_id = &run.outputs["build-id"];
    assert_eq!(metadata["braid.build.id"], build_id.as_str());
    assert_eq!(state_of(&farm, build_id)["state"], "succeeded");
    let platforms: serde_json::Value = serde_json::from_str(&run.outputs["platforms"]).unwrap();
    assert_eq!(platforms["linux/amd64"]["agent"], "amd64-agent", "{platforms}");
    assert_eq!(platforms["linux/arm64"]["agent"], "arm64-agent", "{platforms}");
    assert_eq!(platforms["linux/arm64"]["emulated"], false, "{platforms}");
    assert!(platforms["linux/amd64"]["digest"].as_str().unwrap().starts_with("sha256:"), "{platforms}");

    // TARGETARCH per platform, and the build args (one with a comma: whole lines).
    let index = registry.manifest("action/app:latest").unwrap();
    let seen = registry.per_platform("action/app", &index, &["arch", "tok.sum"], &dir.join("scratch")).unwrap();
    let sum =
        text(&Command::new("sh").arg("-c").arg(format!("printf %s {SECRET} | sha256sum")).output().unwrap().stdout);
    let sum = sum.split_whitespace().next().unwrap();
    assert_eq!(
        seen,
        [format!("amd64 x86_64 3.1.6.2 a,b {sum}"), format!("arm64 aarch64 3.1.6.2 a,b {sum}")],
        "per-platform content"
    );

    // The job summary: a row per platform and the index, the dashboard link.
    let summary = &run.summary;
    assert!(summary.contains(&format!("### braid build `{build_id}` succeeded")), "{summary}");
    assert!(summary.contains("| linux/amd64 | amd64-agent | native |"), "{summary}");
    assert!(summary.contains("| linux/arm64 | arm64-agent | native |"), "{summary}");
    assert!(summary.contains(&format!("| index | | | | `{digest}` |")), "{summary}");
    assert!(
        summary.contains(&format!("(https://braid.example.com:7701/builds/{build_id})")),
        "the dashboard link: {summary}"
    );
}

#[test]
fn bad_inputs_fail_the_step_naming_the_input() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ctx = dockerfile_context(dir, "ctx", "FROM scratch\n");
    // Refused by the script, or by braid before the upload (then named by
    // the script from the flag braid names); nothing reaches a coordinator.
    for (name, value, says) in [
        ("push", "maybe", "is not a boolean"),
        ("no-cache", "yes", "is not a boolean"),
        ("network", "bridge", "invalid value 'bridge' for '--network"),
        ("shm-size", "64x", "--shm-size"),
        ("ulimit", "files=1", "unknown name"),
        ("add-hosts", "db:300.1.1.1", "invalid IP address"),
        ("builder", "my-builder", "there is no buildx builder"),
        ("cgroup-parent", "/ci", "own cgroups"),
        ("call", "check", "braid only builds"),
        ("allow", "security.insecure", "grants no entitlement"),
        ("secrets", "novalue", "entry 1 is not KEY=VALUE"),
        ("secret-files", "key=/no/such/file", "no file"),
        ("ca", "/no/such/ca.pem", "neither PEM text nor a file"),
    ] {
        let run = run_action(
            dir,
            &[("context", ctx.as_str()), (name, value), ("version", "path"), ("coordinator", "http://127.0.0.1:9")],
            &[],
            true,
        );
        let log = run.log();
        assert!(!run.out.status.success(), "{name}={value} was accepted: {log}");
        let line = log.lines().find(|l| l.starts_with("::error title=braid::")).unwrap_or_else(|| panic!("{log}"));
        assert!(line.contains(&format!("input \"{name}\"")) && line.contains(says), "{name}={value}: {log}");
        assert!(run.outputs.is_empty(), "{name}: outputs written: {:?}", run.outputs);
    }
    // version: path with no braid on PATH.
    let run = run_action(dir, &[("context", ctx.as_str()), ("version", "path")], &[], false);
    assert!(run.log().contains("::error title=braid::input \"version\": path: no braid on PATH"), "{}", run.log());
}

/// Serves `files` (URL path -> bytes) on loopback, counting requests.
fn serve(listener: TcpListener, files: BTreeMap<String, Vec<u8>>) -> Arc<Mutex<Vec<String>>> {
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            let mut header = String::new();
            while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                header.clear();
            }
            let path = request.split_whitespace().nth(1).unwrap_or("").to_owned();
            seen.lock().unwrap().push(path.clone());
            // As GitHub: releases/latest redirects to the newest release's tag.
            let (status, body, location) = match files.get(&path) {
                Some(body) if path == "/latest" => ("302 Found", Vec::new(), text(body)),
                Some(body) => ("200 OK", body.clone(), String::new()),
                None => ("404 Not Found", b"not found".to_vec(), String::new()),
            };
            let location = if location.is_empty() { location } else { format!("Location: {location}\r\n") };
            let head =
                format!("HTTP/1.1 {status}\r\n{location}Content-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(&body));
        }
    });
    requests
}

fn borrow<'a>(inputs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    inputs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// A release tarball holding the built braid, as the release workflow makes it.
fn release_tarball(dir: &Path, version: &str, target: &str) -> (Vec<u8>, String) {
    let name = format!("braid-{version}-{target}");
    let stage = dir.join("stage").join(&name);
    std::fs::create_dir_all(&stage).unwrap();
    std::fs::copy(bin("braid"), stage.join("braid")).unwrap();
    // Debug info makes a tarball of hundreds of MiB; a release binary has none.
    let stripped = Command::new("strip").arg(stage.join("braid")).status().unwrap();
    assert!(stripped.success(), "strip (binutils) failed");
    let tarball = dir.join(format!("{name}.tar.gz"));
    let status =
        Command::new("tar").arg("-C").arg(dir.join("stage")).arg("-czf").arg(&tarball).arg(&name).status().unwrap();
    assert!(status.success());
    let mut bytes = Vec::new();
    std::fs::File::open(&tarball).unwrap().read_to_end(&mut bytes).unwrap();
    let sum = text(&Command::new("sha256sum").arg(&tarball).output().unwrap().stdout);
    let sum = format!("{}  {name}.tar.gz\n", sum.split_whitespace().next().unwrap());
    (bytes, sum)
}

const LOGIN_PASSWORD: &str = "login-action-password";

/// A bare repository at `dir/git/owner/app.git` (file:// as a
/// GITHUB_SERVER_URL) with two commits of docker/Dockerfile; the server URL
/// and the first commit.
fn git_server(dir: &Path, base: &str) -> (String, String) {
    let work = dir.join("git-work");
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(["-c", "user.name=ci", "-c", "user.email=ci@localhost", "-C"])
            .arg(&work)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", text(&out.stderr));
        text(&out.stdout).trim().to_owned()
    };
    std::fs::create_dir_all(work.join("docker")).unwrap();
    git(&["init", "-q"]);
    std::fs::write(work.join("docker/Dockerfile"), format!("FROM {base}\nRUN echo one > /rev\n")).unwrap();
    git(&["add", "."]);
    git(&["commit", "-qm", "one"]);
    let first = git(&["rev-parse", "HEAD"]);
    std::fs::write(work.join("docker/Dockerfile"), "FROM scratch-the-tip-is-not-built\n").unwrap();
    git(&["commit", "-qam", "two"]);
    let bare = dir.join("git/owner/app.git");
    std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
    git(&["clone", "-q", "--bare", ".", bare.to_str().unwrap()]);
    (format!("file://{}", dir.join("git").display()), first)
}

#[test]
fn the_action_installs_braid_from_release_assets() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let target = "x86_64-unknown-linux-musl";
    let (good, good_sum) = release_tarball(dir, "9.9.9", target);
    let (bad, _) = release_tarball(dir, "9.9.8", target);
    let wrong_sum = format!("{}  braid-9.9.8-{target}.tar.gz\n", "0".repeat(64));
    let mut files = BTreeMap::from([
        (format!("/download/v9.9.9/braid-9.9.9-{target}.tar.gz"), good),
        (format!("/download/v9.9.9/braid-9.9.9-{target}.tar.gz.sha256"), good_sum.into_bytes()),
        (format!("/download/v9.9.8/braid-9.9.8-{target}.tar.gz"), bad),
        (format!("/download/v9.9.8/braid-9.9.8-{target}.tar.gz.sha256"), wrong_sum.into_bytes()),
    ]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    files.insert("/latest".to_owned(), format!("{url}/tag/v9.9.9").into_bytes());
    files.insert("/tag/v9.9.9".to_owned(), b"the release page".to_vec());
    let requests = serve(listener, files);
    let cache = dir.join("toolcache");
    let cache_s = cache.display().to_string();
    let runner = [("RUNNER_OS", "Linux"), ("RUNNER_ARCH", "X64"), ("RUNNER_TOOL_CACHE", cache_s.as_str())];

    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let private = Registry::start_with_auth(&dir.join("private"), "ci", LOGIN_PASSWORD).unwrap();
    let farm = Farm::start_with(
        dir,
        Some(&registry.addr),
        &[AgentSpec::new("amd64-agent", &[])],
        &["--insecure-registry", &private.addr],
    )
    .unwrap();
    farm.wait_for_agents(1).unwrap();
    let ctx = dockerfile_context(dir, "app", &format!("FROM {base}\nRUN echo hi > /hi\n"));
    let tag = format!("{}/action/dl:1", registry.addr);
    let inputs = |version: &'static str| {
        [
            ("context", ctx.clone()),
            ("platforms", "linux/amd64".to_owned()),
            ("tags", tag.clone()),
            ("push", "true".to_owned()),
            ("coordinator", farm.url.clone()),
            ("version", version.to_owned()),
            ("releases-url", url.clone()),
        ]
    };

    // Downloaded, checked, cached; the build runs with it.
    let given = inputs("v9.9.9");
    let run = run_action(dir, &borrow(&given), &runner, false);
    assert!(run.out.status.success(), "{}", run.log());
    assert!(run.log().contains("braid 9.9.9 installed from"), "{}", run.log());
    assert_eq!(run.outputs["digest"], registry.digest_of("action/dl:1").unwrap());
    assert!(cache.join("braid/9.9.9/X64/braid").exists());
    let fetched = requests.lock().unwrap().len();
    assert_eq!(fetched, 2, "the tarball and its sha256: {:?}", requests.lock().unwrap());

    // The second run takes it from the tool cache: no download.
    let run = run_action(dir, &borrow(&given), &runner, false);
    assert!(run.out.status.success(), "{}", run.log());
    assert!(run.log().contains("braid 9.9.9 from the tool cache"), "{}", run.log());
    assert_eq!(requests.lock().unwrap().len(), fetched);

    // version: latest (the default) follows releases/latest to v9.9.9, cached.
    let latest: Vec<(&str, String)> = given.iter().filter(|(k, _)| *k != "version").cloned().collect();
    let run = run_action(dir, &borrow(&latest), &runner, false);
    assert!(run.out.status.success(), "{}", run.log());
    assert!(run.log().contains("braid 9.9.9 from the tool cache"), "{}", run.log());
    assert_eq!(requests.lock().unwrap()[fetched..], ["/latest", "/tag/v9.9.9"]);

    // A tarball that does not match its sha256 is not installed.
    let run = run_action(dir, &borrow(&inputs("9.9.8")), &runner, false);
    assert_eq!(run.out.status.code(), Some(1));
    let log = run.log();
    assert!(
        log.contains("::error title=braid::input \"version\": braid-9.9.8-x86_64-unknown-linux-musl.tar.gz: sha256 "),
        "{log}"
    );
    assert!(log.contains("does not match") && log.contains("not installed"), "{log}");
    assert!(!cache.join("braid/9.9.8").exists(), "a mismatched binary was cached");

    // As build-push-action's Git context: no context input, the workflow's
    // commit (not the branch tip) fetched from GITHUB_SERVER_URL; pushed
    // with the login docker/login-action left in $DOCKER_CONFIG.
    let (server, first) = git_server(dir, &base);
    let docker_config = dir.join("docker-config");
    std::fs::create_dir_all(&docker_config).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("ci:{LOGIN_PASSWORD}"));
    let config = format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, private.addr);
    std::fs::write(docker_config.join("config.json"), config).unwrap();
    let private_tag = format!("{}/action/git:1", private.addr);
    let git_inputs: Vec<(&str, String)> = given
        .iter()
        .filter(|(k, _)| *k != "context" && *k != "tags")
        .cloned()
        .chain([("tags", private_tag.clone()), ("file", "docker/Dockerfile".to_owned())])
        .collect();
    let docker_config_s = docker_config.display().to_string();
    let github = [
        ("GITHUB_SERVER_URL", server.as_str()),
        ("GITHUB_REPOSITORY", "owner/app"),
        ("GITHUB_SHA", first.as_str()),
        ("DOCKER_CONFIG", docker_config_s.as_str()),
    ];
    let run = run_action(dir, &borrow(&git_inputs), &[&runner[..], &github[..]].concat(), false);
    assert!(run.out.status.success(), "{}", run.log());
    assert!(run.log().contains(&format!("context: {server}/owner/app.git at {first}")), "{}", run.log());
    let pushed = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", "--creds", &format!("ci:{LOGIN_PASSWORD}")])
        .arg(format!("docker://{private_tag}"))
        .output()
        .unwrap();
    assert!(pushed.status.success(), "pushed with the forwarded login: {}", text(&pushed.stderr));
    std::fs::write(dir.join("pushed-index"), &pushed.stdout).unwrap();
    let sum = text(&Command::new("sha256sum").arg(dir.join("pushed-index")).output().unwrap().stdout);
    assert_eq!(run.outputs["digest"], format!("sha256:{}", sum.split_whitespace().next().unwrap()));
    assert!(!run.log().contains(LOGIN_PASSWORD) && !run.log().contains(&auth), "{}", run.log());

    // No such release, and no asset for the runner's architecture.
    let run = run_action(dir, &borrow(&inputs("9.9.7")), &runner, false);
    assert!(run.log().contains("HTTP 404 (no such release asset?)"), "{}", run.log());
    let s390 = [("RUNNER_OS", "Linux"), ("RUNNER_ARCH", "s390x"), ("RUNNER_TOOL_CACHE", cache_s.as_str())];
    let run = run_action(dir, &borrow(&given), &s390, false);
    assert!(run.log().contains("no braid release asset for Linux/s390x"), "{}", run.log());
    assert!(run.log().contains("set version: path"), "{}", run.log());
}

#[test]
fn sigterm_cancels_the_farm_build() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let farm = Farm::start(dir, &registry, &[AgentSpec::new("amd64-agent", &[]).slots(2)]).unwrap();
    farm.wait_for_agents(1).unwrap();

    // `braid build` itself: SIGTERM, as a CI runner sends, cancels.
    let slow = dockerfile_context(dir, "slow", &format!("FROM {base}\nRUN sleep 1237\n"));
    let mut build = RunningBuild::start(&farm, &["build", "--platform", "linux/amd64", "--progress", "plain", &slow]);
    let build_id = build.build_id();
    build.wait_for("RUN sleep 1237", Duration::from_secs(60));
    send_signal(build.child.id(), "TERM");
    let (code, out) = build.finish(Duration::from_secs(30));
    assert_eq!(code, Some(143), "{out}");
    assert!(out.contains(&format!("interrupted: cancelling build {build_id}")), "{out}");
    assert_eq!(state_of(&farm, &build_id)["state"], "cancelled");

    // Through the action's script: it forwards the signal to braid.
    let slow = dockerfile_context(dir, "slow2", &format!("FROM {base}\nRUN sleep 1238\n"));
    let mut cmd = action_command(
        dir,
        &[("context", slow.as_str()), ("platforms", "linux/amd64"), ("coordinator", &farm.url), ("version", "path")],
        &[],
        true,
    );
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let mut build_id = None;
    let found = eventually(Duration::from_secs(120), "the RUN step under the script", || {
        while let Ok(line) = rx.try_recv() {
            if let Some(rest) = line.strip_prefix("#2 build ") {
                build_id = rest.split_whitespace().next().map(str::to_owned);
            }
            seen.push(line);
        }
        (build_id.is_some() && seen.iter().any(|l| l.contains("RUN sleep 1238"))).then_some(())
    });
    found.unwrap_or_else(|e| panic!("{e}: {}", seen.join("\n")));
    send_signal(child.id(), "TERM");
    let status = eventually(Duration::from_secs(30), "the script to exit", || child.try_wait().ok().flatten()).unwrap();
    assert_eq!(status.code(), Some(143), "braid's exit code, passed on");
    assert_eq!(state_of(&farm, build_id.as_ref().unwrap())["state"], "cancelled");
}

/// build-push-action's inputs: each declared in action.yml, passed to the
/// script as GitHub would name it, and either reaching `braid build` as
/// its flag or refused by name.
#[test]
fn every_build_push_action_input_reaches_braid_or_is_refused() {
    enum Expect {
        Flag(&'static str),
        Context,
        Refused,
        /// Read by the script itself (no flag of its own).
        Script,
    }
    use Expect::*;
    let tmp = tempfile::tempdir().unwrap();
    let secret_file = tmp.path().join("npmrc");
    std::fs::write(&secret_file, "x").unwrap();
    let secret_file = format!("npm={}", secret_file.display());
    let table: Vec<(&str, &str, Expect)> = vec![
        ("context", "./app", Context),
        ("file", "./app/Dockerfile.ci", Flag("--file ./app/Dockerfile.ci")),
        ("platforms", "linux/amd64,linux/arm64\nlinux/arm/v7", Flag("--platform linux/amd64,linux/arm64,linux/arm/v7")),
        ("tags", "a/b:1,a/b:2", Flag("--tag a/b:1 --tag a/b:2")),
        ("labels", "x=1,2", Flag("--label x=1,2")),
        ("build-args", "A=1\nB=2", Flag("--build-arg A=1 --build-arg B=2")),
        ("target", "prod", Flag("--target prod")),
        ("push", "true", Flag("--push")),
        ("load", "True", Flag("--load")),
        ("outputs", "type=image,\"name=a/b:1,a/b:2\"", Flag("--output type=image,\"name=a/b:1,a/b:2\"")),
        ("no-cache", "TRUE", Flag("--no-cache")),
        ("pull", "true", Flag("--pull")),
        ("cache-from", "type=registry,ref=r/c", Flag("--cache-from type=registry,ref=r/c")),
        ("cache-to", "type=registry,ref=r/c,mode=max", Flag("--cache-to type=registry,ref=r/c,mode=max")),
        ("secrets", "tok=v", Flag("--secret id=tok,src=")),
        ("secret-files", secret_file.as_str(), Flag("--secret id=npm,src=")),
        ("secret-envs", "tok=TOKEN_VAR", Flag("--secret id=tok,env=TOKEN_VAR")),
        ("ssh", "default", Flag("--ssh default")),
        ("provenance", "mode=max", Flag("--provenance=mode=max")),
        ("sbom", "true", Flag("--sbom=true")),
        ("attests", "type=sbom,disabled=true", Flag("--attest type=sbom,disabled=true")),
        ("annotations", "index:org.example=1", Flag("--annotation index:org.example=1")),
        ("network", "host", Flag("--network host")),
        ("add-hosts", "db:10.0.0.1,cache:10.0.0.2", Flag("--add-host db:10.0.0.1 --add-host cache:10.0.0.2")),
        ("build-contexts", "lib=./lib", Flag("--build-context lib=./lib")),
        ("ulimit", "nofile=1024:2048", Flag("--ulimit nofile=1024:2048")),
        ("shm-size", "2g", Flag("--shm-size 2g")),
        ("no-cache-filters", "build", Flag("--no-cache-filter build")),
        ("allow", "network.host", Script),
        ("builder", "b", Refused),
        ("call", "outline", Refused),
        ("cgroup-parent", "/x", Refused),
        ("github-token", "ghs_tokenvalue", Script),
        ("allow-emulation", "true", Flag("--allow-emulation")),
        ("timeout", "45m", Flag("--timeout 45m")),
    ];
    let action = action_yml();
    let step = &action["runs"]["steps"][0];
    assert_eq!(action["runs"]["using"], "composite");
    let declared = action["inputs"].as_object().unwrap();
    for (name, value, expect) in &table {
        assert!(declared.contains_key(*name), "input {name} is not declared in action.yml");
        let var = format!("INPUT_{}", name.to_uppercase());
        assert_eq!(step["env"][&var], format!("${{{{ inputs.{name} }}}}"), "{var} is not passed to the script");
        let mut cmd = action_command(tmp.path(), &[(name, value)], &[("BRAID_ACTION_DRY_RUN", "1")], false);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(60)).unwrap();
        let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
        if let Refused = expect {
            assert_eq!(out.status.code(), Some(1), "{name}={value} was accepted: {log}");
            assert!(log.contains(&format!("::error title=braid::input \"{name}\"")), "{name}: {log}");
            continue;
        }
        assert!(out.status.success(), "{name}={value}: {log}");
        let plan: serde_json::Value =
            serde_json::from_str(log.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("{log}"))).unwrap();
        let args: Vec<&str> = plan["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        let line = args.join(" ");
        match expect {
            Flag(flag) => assert!(line.contains(flag), "{name}={value}: {flag:?} not in {line:?}"),
            Context => assert_eq!(plan["context"], *value),
            Script => assert!(!line.contains(value), "{name}: {line}"),
            Refused => unreachable!(),
        }
    }
    // braid's connection inputs go to its environment, never argv.
    let ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----";
    let inputs = [("coordinator", "https://braid.example.com:7700"), ("token", "tok-secret"), ("ca", ca)];
    let mut cmd = action_command(tmp.path(), &inputs, &[("BRAID_ACTION_DRY_RUN", "1")], false);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60)).unwrap();
    let log = text(&out.stdout);
    assert!(out.status.success(), "{log}");
    assert!(log.contains(r#""env": ["BRAID_CA", "BRAID_COORDINATOR", "BRAID_TOKEN"]"#), "{log}");
    assert!(log.contains("::add-mask::tok-secret"), "{log}");
    assert_eq!(log.matches("tok-secret").count(), 1, "{log}");
}

/// action.yml and every workflow: schema-valid, and zizmor finds nothing
/// above low.
#[test]
fn action_and_workflows_pass_the_linters() {
    require("check-jsonschema", PYTHON_TOOLS);
    require("zizmor", PYTHON_TOOLS);
    let root = workspace();
    let mut workflows: Vec<PathBuf> = Vec::new();
    for dir in [root.join(".github/workflows"), root.join("examples/github-actions")] {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yml") {
                workflows.push(path);
            }
        }
    }
    workflows.sort();
    let names: Vec<String> = workflows.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for expected in ["release.yml", "app.yml", "elabftw.yml"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing: {names:?}");
    }
    // Each example's diff from its QEMU version is current, and is only
    // this: the QEMU and buildx setup steps gone, `uses:` changed, and the
    // farm's address and credentials added.
    let examples = root.join("examples/github-actions");
    for name in ["app", "elabftw"] {
        let (before, after) = (format!("qemu/{name}.yml"), format!("{name}.yml"));
        let out = Command::new("diff")
            .args(["-u", "--label", &before, "--label", &after, &before, &after])
            .current_dir(&examples)
            .output()
            .unwrap();
        let diff = text(&out.stdout);
        let recorded = std::fs::read_to_string(examples.join(format!("{name}.diff"))).unwrap();
        assert_eq!(diff, recorded, "examples/github-actions/{name}.diff is stale");
        let changed: Vec<&str> = diff
            .lines()
            .filter(|l| (l.starts_with('-') || l.starts_with('+')) && !l.starts_with("---") && !l.starts_with("+++"))
            .map(str::trim)
            .collect();
        assert_eq!(
            changed,
            [
                "-      - name: Set up QEMU",
                "-        uses: docker/setup-qemu-action@v3",
                "-      - name: Set up Docker Buildx",
                "-        uses: docker/setup-buildx-action@v3",
                "-        uses: docker/build-push-action@v6",
                "+        uses: braid-build/braid@v1",
                "+          coordinator: ${{ vars.BRAID_COORDINATOR }}",
                "+          token: ${{ secrets.BRAID_TOKEN }}",
                "+          ca: ${{ vars.BRAID_CA }}",
            ]
            .map(str::trim),
            "{name}: {diff}"
        );
    }
    let check = |schema: &str, files: &[PathBuf]| {
        let out = Command::new("check-jsonschema").args(["--builtin-schema", schema]).args(files).output().unwrap();
        assert!(out.status.success(), "{schema}: {}{}", text(&out.stdout), text(&out.stderr));
    };
    check("vendor.github-actions", &[root.join("action.yml")]);
    check("vendor.github-workflows", &workflows);
    let out = Command::new("zizmor")
        .args(["--offline", "--min-severity", "medium", "--config"])
        .arg(root.join(".github/zizmor.yml"))
        .arg(root.join("action.yml"))
        .args(&workflows)
        .output()
        .unwrap();
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success() && report.contains("No findings to report"), "zizmor:\n{report}");
}
