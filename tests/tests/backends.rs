//! The podman and Docker Engine backends: the same multi-arch build
//! through agents that build with `podman build` or the Engine API,
//! indistinguishable in the registry from buildah's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use braid_tests::{AgentSpec, DockerEngine, Farm, Registry, require, require_environment};

/// The docker CLI with BuildKit built in (Docker 20.10): the Engine agents
/// build with the Engine's BuildKit through it.
const DOCKER_CLI: &str = "/usr/bin/docker";

#[test]
fn podman_agents_build_the_multiarch_image() {
    require_environment();
    require("podman", "run `bash tests/env/setup.sh setup` as root (Debian package podman)");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let agents = [
        AgentSpec::new("podman-amd64", &[]).backend("podman"),
        AgentSpec::new("podman-arm64", &["linux/arm64"]).backend("podman"),
        AgentSpec::new("podman-armv7", &["linux/arm/v7"]).backend("podman"),
    ];
    let farm = Farm::start(dir, &registry, &agents).unwrap();
    build_multiarch_and_check(dir, &registry, &base, &farm, "podman");
}

#[test]
fn docker_engine_agents_build_the_multiarch_image() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    // One Engine per host, as on a real farm; the arm host builds arm64 and
    // arm/v7 on its one Engine, two jobs at once, one platform at a time.
    let x86 = DockerEngine::start(&dir.join("docker-x86")).unwrap();
    let arm = DockerEngine::start(&dir.join("docker-arm")).unwrap();
    // With neither buildah nor podman on its PATH, `auto` takes the Engine.
    let no_builders = dir.join("empty-bin");
    std::fs::create_dir_all(&no_builders).unwrap();
    let agents = [
        AgentSpec::new("docker-amd64", &[])
            .backend("docker")
            .flag("--docker-host", &x86.host)
            .flag("--docker-cli", DOCKER_CLI),
        // A docker CLI without BuildKit (Docker 28 without buildx): the
        // classic builder, and the log says why.
        AgentSpec::new("auto-amd64", &[])
            .env("PATH", no_builders.to_str().unwrap())
            .env("DOCKER_HOST", &x86.host)
            .flag("--docker-cli", "/usr/local/bin/docker"),
        AgentSpec::new("docker-arm", &["linux/arm64", "linux/arm/v7"])
            .slots(2)
            .backend("docker")
            .flag("--docker-host", &arm.host)
            .flag("--docker-cli", DOCKER_CLI),
    ];
    let farm = Farm::start(dir, &registry, &agents).unwrap();
    let output = build_multiarch_and_check(dir, &registry, &base, &farm, "docker");
    for agent in ["docker-amd64", "docker-arm"] {
        let log = farm.log(agent);
        assert!(log.contains("building with the Engine's BuildKit through /usr/bin/docker"), "{agent}: {log}");
    }
    let log = farm.log("auto-amd64");
    assert!(
        log.contains("the Engine's classic builder") && log.contains("/usr/local/bin/docker build --help` failed"),
        "{log}"
    );
    assert!(
        output.contains("waiting for this agent's builds of another platform"),
        "the arm agent ran its two platforms one at a time:\n{output}"
    );

    // A Dockerfile on stdin: sent beside the context, which the Engine
    // filters with the same .dockerignore the client used.
    let ctx = dir.join("copy-ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("message.txt"), "hello\n").unwrap();
    std::fs::write(ctx.join("secret.txt"), "no\n").unwrap();
    std::fs::write(ctx.join(".dockerignore"), "secret.txt\n").unwrap();
    let tag = format!("{}/docker/copy:1", registry.addr);
    let out = farm
        .braid_with_stdin(
            &["build", "--platform", "linux/arm64", "-t", &tag, "--push", "-f", "-", ctx.to_str().unwrap()],
            format!("FROM {base}\nCOPY . /ctx/\n").into_bytes(),
        )
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let index = registry.manifest("docker/copy:1").unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap();
    let files = registry.list_files("docker/copy", digest, &dir.join("scratch")).unwrap();
    let copied: Vec<&String> = files.iter().filter(|f| f.starts_with("ctx/")).collect();
    assert_eq!(copied, ["ctx/.dockerignore", "ctx/message.txt"], "{files:?}");
}

#[test]
fn a_docker_agent_without_an_engine_stops_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("none.sock");
    let out = braid_tests::run_with_timeout(
        std::process::Command::new(braid_tests::bin("braid-agent"))
            .args(["--insecure", "--name", "a1", "--backend", "docker", "--docker-host"])
            .arg(format!("unix://{}", socket.display()))
            .arg("--work-dir")
            .arg(tmp.path().join("work")),
        std::time::Duration::from_secs(30),
    )
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach the Engine") && stderr.contains("none.sock"), "{stderr}");

    // `auto` with no builder installed and no Engine says what to install.
    let out = braid_tests::run_with_timeout(
        std::process::Command::new(braid_tests::bin("braid-agent"))
            .args(["--insecure", "--name", "a1", "--docker-host"])
            .arg(format!("unix://{}", socket.display()))
            .arg("--work-dir")
            .arg(tmp.path().join("work"))
            .env("PATH", tmp.path()),
        std::time::Duration::from_secs(30),
    )
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no builder found") && stderr.contains("apt-get install buildah"), "{stderr}");
}

/// Builds the seed-style Dockerfile for three platforms and checks each
/// image ran natively-or-emulated code of its own architecture.
/// Returns what `braid build` printed.
fn build_multiarch_and_check(dir: &Path, registry: &Registry, base: &str, farm: &Farm, backend: &str) -> String {
    farm.wait_for_agents(farm.agents.len()).unwrap();
    let listed = farm.braid(&["agents", "--format", "json"]).unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert!(listed.as_array().unwrap().iter().all(|a| a["backend"] == backend), "{listed}");

    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {base}\nARG TARGETARCH\nRUN uname -m > /arch && echo \"$TARGETARCH\" > /targetarch\n"),
    )
    .unwrap();
    let tag = format!("{}/{backend}/app:1", registry.addr);
    let out = farm
        .braid(&[
            "build",
            "--platform",
            "linux/amd64,linux/arm64,linux/arm/v7",
            "-t",
            &tag,
            "--push",
            ctx.to_str().unwrap(),
        ])
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let index = registry.manifest(&format!("{backend}/app:1")).unwrap();
    let seen = registry
        .per_platform(&format!("{backend}/app"), &index, &["arch", "targetarch"], &dir.join("scratch"))
        .unwrap();
    assert_eq!(seen, ["amd64 x86_64 amd64", "arm/v7 armv7l arm", "arm64 aarch64 arm64"]);
    String::from_utf8_lossy(&out.stderr).into_owned()
}
