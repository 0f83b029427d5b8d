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
