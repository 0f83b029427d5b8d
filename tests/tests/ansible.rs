//! The Ansible roles: lint (production profile), syntax, and a real apply on
//! this machine (connection local, services off) after which the installed
//! agent enrolls and a build succeeds; a second apply changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use braid_tests::{
    Proc, Registry, bin, eventually, free_port, require, require_environment, run_with_timeout, workspace,
};

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn ansible(args: &[&str], inventory: Option<&Path>) -> Output {
    let dir = workspace().join("ansible");
    let mut cmd = Command::new(args[0]);
    cmd.current_dir(&dir).env("ANSIBLE_CONFIG", dir.join("ansible.cfg")).env("ANSIBLE_NOCOLOR", "1").args(&args[1..]);
    if let Some(i) = inventory {
        cmd.arg("-i").arg(i);
    }
    run_with_timeout(&mut cmd, Duration::from_secs(600)).unwrap()
}

#[test]
fn roles_lint_apply_enroll_build_and_stay_idempotent() {
    require_environment();
    let hint = "run `bash tests/env/setup.sh setup` as root (installs ansible-core and ansible-lint from PyPI)";
    require("ansible-playbook", hint);
    require("ansible-lint", hint);

    let lint = ansible(&["ansible-lint", "--profile", "production", "--nocolor"], None);
    assert!(lint.status.success(), "ansible-lint:\n{}", text(&lint));
    let syntax = ansible(
        &["ansible-playbook", "--syntax-check", "site.yml"],
        Some(&workspace().join("ansible/inventory.example.yml")),
    );
    assert!(syntax.status.success(), "{}", text(&syntax));

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let root = dir.join("root");
    let port = free_port();
    let http = free_port();
    let inventory = dir.join("inventory.yml");
    std::fs::write(
        &inventory,
        format!(
            r#"all:
  vars:
    ansible_connection: local
    ansible_become: false
    ansible_python_interpreter: /usr/bin/python3
    braid_prefix: "{root}"
    braid_manage_service: false
    braid_coordinator_binary_src: "{coordinator}"
    braid_coordinator_cli_binary_src: "{cli}"
    braid_agent_binaries: {{amd64: {{src: "{agent}"}}}}
    braid_coordinator_listen: "127.0.0.1:{port}"
    braid_coordinator_http_listen: "127.0.0.1:{http}"
    braid_coordinator_hosts: [localhost]
    braid_coordinator_insecure_registries: ["{registry}"]
    braid_coordinator_tokens: [{{name: ci, role: submit}}]
    braid_agent_coordinator_url: "https://localhost:{port}"
    braid_agent_packages: []
    braid_agent_labels: {{zone: rack-2}}
  children:
    braid_coordinator: {{hosts: {{localhost: {{}}}}}}
    braid_agents: {{hosts: {{localhost: {{}}}}}}
"#,
            root = root.display(),
            coordinator = bin("braid-coordinator").display(),
            cli = bin("braid").display(),
            agent = bin("braid-agent").display(),
            registry = registry.addr,
        ),
    )
    .unwrap();

    // The coordinator first; start it from what the role installed.
    let out = ansible(&["ansible-playbook", "site.yml", "--tags", "coordinator"], Some(&inventory));
    assert!(out.status.success(), "{}", text(&out));
    let installed = |p: &str| root.join(p.trim_start_matches('/'));
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(installed("/etc/braid/certs/ca-key.pem")).unwrap().permissions()
        ) & 0o777,
        0o600
    );
    let mut coordinator_cmd = Command::new(installed("/usr/local/bin/braid-coordinator"));
    coordinator_cmd.arg("--config").arg(installed("/etc/braid/coordinator.toml")).env("RUST_LOG", "info");
    let _coordinator = Proc::spawn("coordinator", &mut coordinator_cmd, &dir.join("coordinator.log")).unwrap();
    eventually(Duration::from_secs(20), "the installed coordinator to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(drop)
    })
    .unwrap();

    // Then the agent: it enrolls with the join token the coordinator role made.
    let out = ansible(&["ansible-playbook", "site.yml", "--tags", "agents"], Some(&inventory));
    assert!(out.status.success(), "{}", text(&out));
    assert!(installed("/var/lib/braid-agent/tls/agent.pem").exists(), "enrolled");
    let mut agent_cmd = Command::new(installed("/usr/local/bin/braid-agent"));
    agent_cmd.arg("--config").arg(installed("/etc/braid/agent.toml"));
    let _agent = Proc::spawn("agent", &mut agent_cmd, &dir.join("agent.log")).unwrap();
    eventually(Duration::from_secs(30), "the installed agent to connect", || {
        std::fs::read_to_string(dir.join("coordinator.log")).ok()?.contains("agent connected").then_some(())
    })
    .unwrap();

    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\nCOPY Dockerfile /\n").unwrap();
    let token = std::fs::read_to_string(installed("/etc/braid/tokens/ci")).unwrap();
    let tag = format!("{}/ansible/app:1", registry.addr);
    let out = run_with_timeout(
        Command::new(bin("braid"))
            .args(["--coordinator", &format!("https://localhost:{port}"), "--ca"])
            .arg(installed("/etc/braid/certs/ca.pem"))
            // The label the role set reaches the scheduler.
            .args(["--token", token.trim(), "build", "--platform", "linux/amd64", "--require", "zone=rack-2"])
            .args(["-t", &tag, "--push"])
            .arg(&ctx),
        Duration::from_secs(300),
    )
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(registry.manifest("ansible/app:1").is_some());

    // A second apply changes nothing.
    let out = ansible(&["ansible-playbook", "site.yml"], Some(&inventory));
    let recap = text(&out);
    assert!(out.status.success(), "{recap}");
    let line = recap
        .lines()
        .find(|l| l.starts_with("localhost") && l.contains("changed="))
        .unwrap_or_else(|| panic!("no recap:\n{recap}"));
    assert!(line.contains("changed=0") && line.contains("failed=0"), "not idempotent: {line}\n{recap}");
}

/// Stops the agents the play started (their pid files) when the test ends.
struct PidFiles(Vec<std::path::PathBuf>);

impl Drop for PidFiles {
    fn drop(&mut self) {
        for f in &self.0 {
            if let Some(pid) = std::fs::read_to_string(f).ok().and_then(|p| p.trim().parse::<u32>().ok()) {
                let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
            }
        }
    }
}

fn agents_json(cli: &Path, port: u16, ca: &Path, token: &str) -> serde_json::Value {
    let out = run_with_timeout(
        Command::new(cli)
            .args(["--coordinator", &format!("https://localhost:{port}"), "--ca"])
            .arg(ca)
            .args(["--token", token, "agents", "--format", "json"]),
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_owned()
}

/// Two agents installed by the play, restarted by a command (no systemd
/// here). A new binary rolls one host at a time: each agent is drained (a
/// running build finishes on it first), restarted on the new binary, seen
/// reconnected and uncordoned before the next. Then a re-imaged host (its
/// key and certificate gone) enrolls again with a fresh token and builds.
#[test]
fn agents_upgrade_one_at_a_time_drained_and_reimaged_hosts_reenroll() {
    require_environment();
    require("ansible-playbook", "run `bash tests/env/setup.sh setup` as root (installs ansible-core from PyPI)");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let root = dir.join("root");
    let (port, http) = (free_port(), free_port());
    // Two "versions": the same agent, the second with bytes appended (a
    // different file that runs the same).
    let v1 = dir.join("v1/braid-agent");
    let v2 = dir.join("v2/braid-agent");
    std::fs::create_dir_all(v1.parent().unwrap()).unwrap();
    std::fs::create_dir_all(v2.parent().unwrap()).unwrap();
    std::fs::copy(bin("braid-agent"), &v1).unwrap();
    let mut bytes = std::fs::read(&v1).unwrap();
    bytes.extend_from_slice(b"\0braid-test-v2\0");
    std::fs::write(&v2, bytes).unwrap();
    std::fs::set_permissions(&v2, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = dir.join("restart-agent.sh");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
# restart-agent.sh PREFIX NAME: stop the agent of PREFIX (TERM, then wait), start it again.
set -eu
prefix=$1
pidfile=$prefix/agent.pid
if [ -f "$pidfile" ]; then
  pid=$(cat "$pidfile")
  if kill -TERM "$pid" 2>/dev/null; then
    while kill -0 "$pid" 2>/dev/null && ! grep -q ') Z' "/proc/$pid/stat" 2>/dev/null; do sleep 0.2; done
  fi
fi
echo "$(date +%s) $2" >> {restarts}
setsid "$prefix/usr/local/bin/braid-agent" --config "$prefix/etc/braid/agent.toml" >> "$prefix/agent.log" 2>&1 < /dev/null &
echo $! > "$pidfile"
"#,
            restarts = dir.join("restarts.log").display()
        ),
    )
    .unwrap();
    let agent_root = |name: &str| root.join(name);
    let _agents = PidFiles(vec![agent_root("agent-a").join("agent.pid"), agent_root("agent-b").join("agent.pid")]);
    let inventory = dir.join("inventory.yml");
    let agent_host = |name: &str| {
        format!(
            "{name}: {{braid_agent_prefix: \"{p}\", braid_agent_restart_command: [sh, \"{s}\", \"{p}\", {name}]}}",
            p = agent_root(name).display(),
            s = script.display()
        )
    };
    std::fs::write(
        &inventory,
        format!(
            r#"all:
  vars:
    ansible_connection: local
    ansible_become: false
    ansible_python_interpreter: /usr/bin/python3
    braid_prefix: "{coord}"
    braid_manage_service: false
    braid_coordinator_binary_src: "{coordinator}"
    braid_coordinator_cli_binary_src: "{cli}"
    braid_agent_binaries: {{amd64: {{src: "{v1}"}}}}
    braid_coordinator_listen: "127.0.0.1:{port}"
    braid_coordinator_http_listen: "127.0.0.1:{http}"
    braid_coordinator_hosts: [localhost]
    braid_coordinator_insecure_registries: ["{registry}"]
    braid_coordinator_tokens: [{{name: ci, role: submit}}]
    braid_agent_coordinator_url: "https://localhost:{port}"
    braid_agent_packages: []
    braid_agent_drain_timeout: 300
  children:
    braid_coordinator: {{hosts: {{coord: {{}}}}}}
    braid_agents:
      hosts:
        {a}
        {b}
"#,
            coord = root.join("coord").display(),
            coordinator = bin("braid-coordinator").display(),
            cli = bin("braid").display(),
            v1 = v1.display(),
            registry = registry.addr,
            a = agent_host("agent-a"),
            b = agent_host("agent-b"),
        ),
    )
    .unwrap();
    let coord = |p: &str| root.join("coord").join(p.trim_start_matches('/'));

    let out = ansible(&["ansible-playbook", "site.yml", "--tags", "coordinator"], Some(&inventory));
    assert!(out.status.success(), "{}", text(&out));
    let mut coordinator_cmd = Command::new(coord("/usr/local/bin/braid-coordinator"));
    coordinator_cmd.arg("--config").arg(coord("/etc/braid/coordinator.toml")).env("RUST_LOG", "info");
    let _coordinator = Proc::spawn("coordinator", &mut coordinator_cmd, &dir.join("coordinator.log")).unwrap();
    eventually(Duration::from_secs(20), "the installed coordinator to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(drop)
    })
    .unwrap();
    let cli = coord("/usr/local/bin/braid");
    let ca = coord("/etc/braid/certs/ca.pem");
    let operate = std::fs::read_to_string(coord("/etc/braid/tokens/ansible-operate")).unwrap().trim().to_owned();
    let submit = std::fs::read_to_string(coord("/etc/braid/tokens/ci")).unwrap().trim().to_owned();
    let agent = |all: &serde_json::Value, name: &str| -> serde_json::Value {
        all.as_array().unwrap().iter().find(|a| a["name"] == name).cloned().unwrap_or_default()
    };

    // First install: both enroll with tokens the play makes, and the play
    // returns once the coordinator sees them.
    let out = ansible(&["ansible-playbook", "site.yml", "--tags", "agents"], Some(&inventory));
    assert!(out.status.success(), "{}", text(&out));
    let before = agents_json(&cli, port, &ca, &operate);
    for name in ["agent-a", "agent-b"] {
        let a = agent(&before, name);
        assert_eq!(a["connected"], true, "{name} connected once the play ended: {before}");
        assert_eq!(a["state"], "idle", "{before}");
    }

    // A build running while the upgrade rolls.
    let slow = dir.join("slow");
    std::fs::create_dir_all(&slow).unwrap();
    std::fs::write(slow.join("Dockerfile"), format!("FROM {base}\nRUN echo started-slow && sleep 15\n")).unwrap();
    let meta = dir.join("slow.json");
    let mut build = Command::new(bin("braid"))
        .args(["--coordinator", &format!("https://localhost:{port}"), "--ca"])
        .arg(&ca)
        .args(["--token", &submit, "build", "--platform", "linux/amd64", "--metadata-file"])
        .arg(&meta)
        .arg(&slow)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let busy = eventually(Duration::from_secs(120), "the build to run on an agent", || {
        let all = agents_json(&cli, port, &ca, &operate);
        all.as_array()
            .unwrap()
            .iter()
            .find(|a| a["running"].as_u64() > Some(0))
            .map(|a| a["name"].as_str().unwrap().to_owned())
    })
    .unwrap();

    let upgrade = format!(r#"{{"braid_agent_binaries": {{"amd64": {{"src": "{}"}}}}}}"#, v2.display());
    let out = ansible(&["ansible-playbook", "site.yml", "--tags", "agents", "-e", &upgrade], Some(&inventory));
    let played = text(&out);
    assert!(out.status.success(), "{played}");
    assert_eq!(played.matches("PLAY [Install braid agents]").count(), 2, "one host per batch:\n{played}");
    assert!(played.contains("RUNNING HANDLER [braid_agent : Drain braid-agent]"), "{played}");
    let status = build.wait().unwrap();
    assert!(status.success(), "the build finished on its agent during the roll");
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let build_id = meta["braid.build.id"].as_str().unwrap();
    let out = run_with_timeout(
        Command::new(&cli)
            .args(["--coordinator", &format!("https://localhost:{port}"), "--ca"])
            .arg(&ca)
            .args(["--token", &operate, "inspect", build_id, "--format", "json"]),
        Duration::from_secs(60),
    )
    .unwrap();
    let inspect: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let job = &inspect["jobs"][0];
    assert_eq!(job["agent"], busy.as_str(), "not re-placed: {inspect}");
    assert_eq!(job["attempt"], 1, "not re-placed: {inspect}");
    // The busy agent was restarted only after its job ended.
    let restarts = std::fs::read_to_string(dir.join("restarts.log")).unwrap();
    let restarted_at: Vec<f64> = restarts
        .lines()
        .filter(|l| l.ends_with(&format!(" {busy}")))
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(restarted_at.len(), 2, "installed, then upgraded once:\n{restarts}");
    assert!(
        restarted_at[1] + 1.0 >= job["finished"].as_f64().unwrap(),
        "restarted before its job ended: {restarts}\n{job}"
    );
    let after = agents_json(&cli, port, &ca, &operate);
    for name in ["agent-a", "agent-b"] {
        let (was, now) = (agent(&before, name), agent(&after, name));
        assert_eq!(now["connected"], true, "{after}");
        assert_ne!(now["session"], was["session"], "{name} reconnected: {after}");
        assert_eq!(now["state"], "idle", "uncordoned after the drain: {after}");
        let pid = std::fs::read_to_string(agent_root(name).join("agent.pid")).unwrap();
        let exe = std::path::PathBuf::from(format!("/proc/{}/exe", pid.trim()));
        assert_eq!(sha256(&exe), sha256(&v2), "{name} runs the new binary");
    }

    // Re-imaged: agent-b's host comes back blank (no key, no certificate).
    let pid: u32 = std::fs::read_to_string(agent_root("agent-b").join("agent.pid")).unwrap().trim().parse().unwrap();
    braid_tests::send_signal(pid, "KILL");
    std::fs::remove_dir_all(agent_root("agent-b")).unwrap();
    let out = ansible(&["ansible-playbook", "site.yml", "--tags", "agents", "-e", &upgrade], Some(&inventory));
    let played = text(&out);
    assert!(out.status.success(), "{played}");
    let recap = |host: &str| played.lines().find(|l| l.starts_with(host) && l.contains("changed=")).unwrap().to_owned();
    assert!(recap("agent-a").contains("changed=0"), "agent-a untouched: {}", recap("agent-a"));
    assert!(agent_root("agent-b").join("var/lib/braid-agent/tls/agent.pem").exists(), "re-enrolled");
    let now = agent(&agents_json(&cli, port, &ca, &operate), "agent-b");
    assert_eq!(now["connected"], true, "{now}");
    // It builds: with agent-a cordoned the build can only go there.
    let steer = |action: &str| {
        let out = run_with_timeout(
            Command::new(&cli)
                .args(["--coordinator", &format!("https://localhost:{port}"), "--ca"])
                .arg(&ca)
                .args(["--token", &operate, action, "agent-a"]),
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    };
    steer("cordon");
    let quick = dir.join("quick");
    std::fs::create_dir_all(&quick).unwrap();
    std::fs::write(quick.join("Dockerfile"), "FROM scratch\nCOPY Dockerfile /\n").unwrap();
    let out = run_with_timeout(
        Command::new(bin("braid"))
            .args(["--coordinator", &format!("https://localhost:{port}"), "--ca"])
            .arg(&ca)
            .args(["--token", &submit, "build", "--platform", "linux/amd64"])
            .arg(&quick),
        Duration::from_secs(300),
    )
    .unwrap();
    assert!(out.status.success(), "the re-imaged agent builds: {}", text(&out));
    steer("uncordon");

    // `braid cache du` over TLS: for the operate role only.
    let du = |token: &str| {
        run_with_timeout(
            Command::new(&cli)
                .args(["--coordinator", &format!("https://localhost:{port}"), "--ca"])
                .arg(&ca)
                .args(["--token", token, "cache", "du", "--format", "json"]),
            Duration::from_secs(60),
        )
        .unwrap()
    };
    let out = du(&submit);
    assert!(!out.status.success() && text(&out).contains("operate"), "{}", text(&out));
    let out = du(&operate);
    assert!(out.status.success(), "{}", text(&out));
    let listed: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let b = listed.iter().find(|a| a["agent"] == "agent-b").unwrap();
    assert_eq!(b["status"], "ok", "{b}");
    assert!(b["storages"].as_array().unwrap().iter().any(|s| s["name"] == "linux-amd64"), "{b}");
}

/// The binary follows the userland, not `uname -m`: an armhf userland on an
/// aarch64 kernel gets the armv7 build; dpkg's answer wins where there is one.
#[test]
fn the_agent_binary_follows_the_userland_architecture() {
    require("ansible-playbook", "run `bash tests/env/setup.sh setup` as root (installs ansible-core from PyPI)");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A 32-bit ELF header is all the probe reads.
    let elf32 = dir.join("sh32");
    std::fs::write(&elf32, b"\x7fELF\x01\x01\x01\0\0\0\0\0\0\0\0\0").unwrap();
    let playbook = dir.join("arch.yml");
    std::fs::write(
        &playbook,
        format!(
            "- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n\
             \x20   - ansible.builtin.include_tasks: {tasks}\n\
             \x20   - ansible.builtin.debug:\n        msg: \"ARCH={{{{ braid_agent_arch }}}} PLATFORM={{{{ braid_agent_native_platform }}}} TARGET={{{{ braid_agent_target }}}}\"\n",
            tasks = workspace().join("ansible/roles/braid_agent/tasks/arch.yml").display()
        ),
    )
    .unwrap();
    let run = |vars: &str| {
        let out = ansible(&["ansible-playbook", playbook.to_str().unwrap(), "-e", vars], None);
        assert!(out.status.success(), "{}", text(&out));
        let t = text(&out);
        t.lines()
            .find_map(|l| l.trim().strip_prefix("\"msg\": \"").map(|m| m.trim_end_matches('"').to_owned()))
            .unwrap()
    };
    let armhf = format!(
        r#"{{"braid_agent_probe_dpkg": false, "braid_agent_kernel_arch": "aarch64", "braid_agent_userland_elf": "{}"}}"#,
        elf32.display()
    );
    assert_eq!(run(&armhf), "ARCH=armv7 PLATFORM=linux/arm/v7 TARGET=armv7-unknown-linux-musleabihf");
    let arm64 = r#"{"braid_agent_probe_dpkg": false, "braid_agent_kernel_arch": "aarch64", "braid_agent_userland_elf": "/bin/sh"}"#;
    assert_eq!(run(arm64), "ARCH=arm64 PLATFORM=linux/arm64 TARGET=aarch64-unknown-linux-musl");
    // This Debian amd64 machine: dpkg answers, whatever the kernel says.
    let dpkg = r#"{"braid_agent_probe_dpkg": true, "braid_agent_kernel_arch": "aarch64", "braid_agent_userland_elf": "/bin/sh"}"#;
    assert_eq!(run(dpkg), "ARCH=amd64 PLATFORM=linux/amd64 TARGET=x86_64-unknown-linux-musl");
}
