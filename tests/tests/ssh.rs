//! `--ssh` through the real binaries: a real `ssh-agent` (OpenSSH) holding a
//! key made with `ssh-keygen` serves a `RUN --mount=type=ssh` step on a
//! buildah agent, through the coordinator; the key file form starts a
//! private agent; without `--ssh` the step runs as BuildKit runs it (no
//! socket; `required=true` fails with BuildKit's message); the private key
//! is nowhere on the farm's side and the agent's socket goes with the job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use braid_tests::{AgentSpec, Farm, Proc, Registry, copy_host_binary, eventually, require, require_environment};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A new ed25519 key at `path`; its SHA256 fingerprint as `ssh-keygen -lf` prints it.
fn keygen(path: &Path, comment: &str) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "ssh-keygen: {}", text(&out.stderr));
    let out = Command::new("ssh-keygen").arg("-lf").arg(path.with_extension("pub")).output().unwrap();
    let line = text(&out.stdout);
    line.split_whitespace().nth(1).expect("a fingerprint").to_owned()
}

/// A real `ssh-agent` of the test's (the client's side) in `dir`, holding
/// `key`; its socket.
fn client_agent(dir: &Path, key: &Path) -> (Proc, PathBuf) {
    let socket = dir.join("agent.sock");
    let agent = Proc::spawn(
        "ssh-agent",
        Command::new("ssh-agent").arg("-D").arg("-a").arg(&socket),
        &dir.join("ssh-agent.log"),
    )
    .unwrap();
    eventually(Duration::from_secs(10), "ssh-agent to listen", || socket.exists().then_some(())).unwrap();
    let added = Command::new("ssh-add").arg("-q").arg(key).env("SSH_AUTH_SOCK", &socket).output().unwrap();
    assert!(added.status.success(), "ssh-add: {}", text(&added.stderr));
    (agent, socket)
}

/// A context whose layer `root/` holds the host's ssh-add and its libraries.
fn context(dir: &Path, name: &str, dockerfile: &str) -> String {
    let ctx = dir.join(name);
    copy_host_binary(&ctx.join("root"), "/usr/bin/ssh-add").unwrap();
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    ctx.display().to_string()
}

/// Every file under `dir` that contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file()
                && let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                found.push(path);
            }
        }
    }
    found
}

/// The socket paths the agent logged for its jobs' `--ssh` ids.
fn logged_sockets(log: &str) -> Vec<PathBuf> {
    log.lines()
        .filter(|l| l.contains("ssh sockets ready"))
        .filter_map(|l| l.split("paths=[").nth(1)?.split(']').next().map(str::to_owned))
        .flat_map(|list| list.split(',').map(|p| PathBuf::from(p.trim().trim_matches('"'))).collect::<Vec<_>>())
        .collect()
}

#[test]
fn ssh_agents_are_forwarded_read_only_and_no_key_leaves_the_client() {
    require_environment();
    require("ssh-agent", "run `bash tests/env/setup.sh setup` as root (openssh-client)");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The client's side: keys and agent, outside the farm's directories.
    let client = tempfile::tempdir().unwrap();
    let key = client.path().join("id_ed25519");
    let fingerprint = keygen(&key, "braid-test-default");
    let file_key = client.path().join("deploy_key");
    let file_fingerprint = keygen(&file_key, "braid-test-file");
    let (_agent, socket) = client_agent(client.path(), &key);

    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let farm = Farm::start(dir, &registry, &[AgentSpec::new("buildah-amd64", &["linux/amd64"])]).unwrap();
    farm.wait_for_agents(1).unwrap();
    let scratch = dir.join("scratch");
    let keys_in = |repo: &str| {
        let index = registry.manifest(&format!("{repo}:1")).unwrap();
        registry.per_platform(repo, &index, &["keys"], &scratch).unwrap()
    };

    // --ssh default: the client's SSH_AUTH_SOCK, listed inside the step.
    let listing = context(
        dir,
        "listing",
        &format!("FROM {base}\nCOPY root/ /\nRUN --mount=type=ssh ssh-add -l > /keys && (ssh-add -D || true)\n"),
    );
    let tag = format!("{}/ssh/default:1", registry.addr);
    let out = farm
        .braid_env(
            &["build", "--platform", "linux/amd64", "--ssh", "default", "-t", &tag, "--push", &listing],
            &[("SSH_AUTH_SOCK", &socket)],
        )
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let seen = keys_in("ssh/default");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].starts_with("amd64 256 ") && seen[0].contains(&fingerprint), "{seen:?} lacks {fingerprint}");
    assert!(seen[0].contains("braid-test-default"), "{seen:?}");
    // The step's `ssh-add -D` did not reach the client's agent: read-only.
    let still = Command::new("ssh-add").arg("-l").env("SSH_AUTH_SOCK", &socket).output().unwrap();
    assert!(text(&still.stdout).contains(&fingerprint), "the build removed the client's key");

    // --ssh ID=KEY: a private agent of the CLI's own holds the key file.
    let by_id = context(
        dir,
        "by-id",
        &format!("FROM {base}\nCOPY root/ /\nRUN --mount=type=ssh,id=mykey ssh-add -l > /keys\n"),
    );
    let tag = format!("{}/ssh/keyfile:1", registry.addr);
    let key_arg = format!("mykey={}", file_key.display());
    let out =
        farm.braid(&["build", "--platform", "linux/amd64", "--ssh", &key_arg, "-t", &tag, "--push", &by_id]).unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let seen = keys_in("ssh/keyfile");
    assert!(seen[0].contains(&file_fingerprint) && !seen[0].contains(&fingerprint), "{seen:?}");

    // Without --ssh, as BuildKit: the step runs with no agent socket, and
    // ssh-add finds none.
    let out = farm.braid(&["build", "--platform", "linux/amd64", "--no-cache", &listing]).unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "the step found an agent without --ssh: {err}");
    assert!(err.contains("Could not open a connection to your authentication agent"), "{err}");
    // ... and a required mount fails in BuildKit's words, before building.
    let required = context(
        dir,
        "required",
        &format!("FROM {base}\nCOPY root/ /\nRUN --mount=type=ssh,required=true ssh-add -l > /keys\n"),
    );
    let out = farm.braid(&["build", "--platform", "linux/amd64", &required]).unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("no SSH key \"default\" forwarded from the client"), "{err}");
    let out = farm
        .braid_env(&["build", "--platform", "linux/amd64", "--ssh", "other", &required], &[("SSH_AUTH_SOCK", &socket)])
        .unwrap();
    assert!(
        !out.status.success() && text(&out.stderr).contains("unset ssh forward key default"),
        "{}",
        text(&out.stderr)
    );

    // Refused before anything is uploaded: no agent to forward, a key file
    // that is not there, --detach.
    let empty = Path::new("");
    let absent = client.path().join("absent");
    let absent_arg = format!("k={}", absent.display());
    for (args, env, says) in [
        (vec!["--ssh", "default"], Some(empty), "--ssh default: SSH_AUTH_SOCK is not set"),
        (vec!["--ssh", absent_arg.as_str()], None, "--ssh k: reading key file"),
        (vec!["--ssh", "default", "--detach"], Some(socket.as_path()), "not with --detach"),
        (vec!["--ssh", "a", "--ssh", "a=/x"], Some(socket.as_path()), "--ssh: id \"a\" given twice"),
    ] {
        let mut full = vec!["build", "--platform", "linux/amd64"];
        full.extend(args.iter().copied());
        full.push(&listing);
        let vars: Vec<(&str, &Path)> = env.map(|v| ("SSH_AUTH_SOCK", v)).into_iter().collect();
        let out = farm.braid_env(&full, &vars).unwrap();
        let err = text(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("#1 context"), "{args:?} was refused only after the upload: {err}");
    }

    // The private keys appear nowhere on the farm's side: data dirs, work
    // dirs, logs, the registry.
    for private in [&key, &file_key] {
        let pem = std::fs::read_to_string(private).unwrap();
        let body = pem.lines().nth(1).expect("a key body line");
        assert!(files_containing(dir, body.as_bytes()).is_empty(), "{} leaked", private.display());
    }
    // The agent's sockets went with their jobs.
    let sockets = logged_sockets(&farm.log("buildah-amd64"));
    assert!(sockets.len() >= 2, "the agent logged no sockets: {sockets:?}");
    for s in &sockets {
        assert!(!s.exists(), "{} outlived its job", s.display());
    }
}

/// `braid build` and the agent both reopen their `--ssh` streams after the
/// coordinator restarts: a step that starts afterwards reaches the agent.
#[test]
fn ssh_forwarding_resumes_after_a_coordinator_restart() {
    require_environment();
    require("ssh-agent", "run `bash tests/env/setup.sh setup` as root (openssh-client)");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let client = tempfile::tempdir().unwrap();
    let key = client.path().join("id_ed25519");
    let fingerprint = keygen(&key, "braid-test-restart");
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let farm_dir = dir.join("farm");
    let mut farm = Farm::start(&farm_dir, &registry, &[AgentSpec::new("buildah-amd64", &["linux/amd64"])]).unwrap();
    farm.wait_for_agents(1).unwrap();
    let ctx = context(
        dir,
        "restart",
        &format!("FROM {base}\nCOPY root/ /\nRUN echo waiting; sleep 12\nRUN --mount=type=ssh ssh-add -l > /keys\n"),
    );
    let tag = format!("{}/ssh/restart:1", registry.addr);
    let key_arg = format!("default={}", key.display());
    let args =
        ["build", "--platform", "linux/amd64", "--progress", "plain", "--ssh", &key_arg, "-t", &tag, "--push", &ctx];
    let mut build = braid_tests::RunningBuild::start(&farm, &args);
    build.wait_for("waiting", Duration::from_secs(120));
    farm.crash_coordinator();
    std::thread::sleep(Duration::from_millis(500));
    farm.start_coordinator().unwrap();
    let (code, out) = build.finish(Duration::from_secs(180));
    assert_eq!(code, Some(0), "{out}");
    let index = registry.manifest("ssh/restart:1").unwrap();
    let seen = registry.per_platform("ssh/restart", &index, &["keys"], &dir.join("scratch")).unwrap();
    assert!(seen[0].contains(&fingerprint), "{seen:?}");
    let coordinator = farm.log("coordinator");
    assert!(coordinator.matches("ssh client attached").count() >= 2, "the client reattached:\n{coordinator}");
    assert!(coordinator.matches("ssh tunnel attached").count() >= 2, "the agent reattached:\n{coordinator}");
}

/// The Docker backend: the Engine's BuildKit gets the job's socket through
/// `docker build --ssh ID=SOCKET` and the step lists the client's key.
#[test]
fn ssh_reaches_the_docker_engines_buildkit() {
    require_environment();
    require("ssh-agent", "run `bash tests/env/setup.sh setup` as root (openssh-client)");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let client = tempfile::tempdir().unwrap();
    let key = client.path().join("id_ed25519");
    let fingerprint = keygen(&key, "braid-test-engine");
    let (_agent, socket) = client_agent(client.path(), &key);

    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let engine = braid_tests::DockerEngine::start(&dir.join("docker")).unwrap();
    let docker = AgentSpec::new("docker-amd64", &["linux/amd64"])
        .backend("docker")
        .flag("--docker-host", &engine.host)
        .flag("--docker-cli", "/usr/bin/docker");
    let farm = Farm::start(dir, &registry, &[docker]).unwrap();
    farm.wait_for_agents(1).unwrap();
    let listing =
        context(dir, "listing", &format!("FROM {base}\nCOPY root/ /\nRUN --mount=type=ssh ssh-add -l > /keys\n"));
    let tag = format!("{}/ssh/engine:1", registry.addr);
    let out = farm
        .braid_env(
            &["build", "--platform", "linux/amd64", "--ssh", "default", "-t", &tag, "--push", &listing],
            &[("SSH_AUTH_SOCK", &socket)],
        )
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(farm.log("docker-amd64").contains("building with the Engine's BuildKit"), "not the BuildKit path");
    let index = registry.manifest("ssh/engine:1").unwrap();
    let seen = registry.per_platform("ssh/engine", &index, &["keys"], &dir.join("scratch")).unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].contains(&fingerprint) && seen[0].contains("braid-test-engine"), "{seen:?} lacks {fingerprint}");
}
