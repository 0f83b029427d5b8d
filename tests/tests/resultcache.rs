//! The result cache through the real binaries and a real registry: a
//! three-platform build submitted again with nothing changed is answered
//! by the coordinator from its earlier result, with every agent cordoned
//! (no agent is asked); `--no-cache`, a changed build arg and a changed base
//! image are built by the agents again, and the rebuild after a changed
//! base is the one reused next.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use braid_tests::{AgentSpec, Farm, Registry, dockerfile_context, require_environment};

const AGENTS: [&str; 3] = ["amd64-agent", "arm64-agent", "armv7-agent"];
const PLATFORMS: [&str; 3] = ["linux/amd64", "linux/arm64", "linux/arm/v7"];

/// `braid build` of the three platforms to `tag`: success, its build id and stderr.
fn build(farm: &Farm, tag: &str, ctx: &str, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec!["build", "--progress", "plain", "--platform", "linux/amd64,linux/arm64,linux/arm/v7"];
    args.extend_from_slice(&["--timeout", "120", "-t", tag, "--push"]);
    args.extend_from_slice(extra);
    args.push(ctx);
    let out = farm.braid(&args).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let id = stderr
        .lines()
        .find_map(|l| {
            l.split_once("#2 build ").map(|(_, rest)| rest.split_whitespace().next().unwrap_or("").to_owned())
        })
        .unwrap_or_default();
    (out.status.success(), id, stderr)
}

fn assigned(farm: &Farm) -> usize {
    farm.log("coordinator").matches("job assigned").count()
}

/// Each platform's image digest in the index at `reference`.
fn images(registry: &Registry, reference: &str) -> Vec<String> {
    let index = registry.manifest(reference).unwrap();
    let mut digests: Vec<String> =
        braid_tests::platform_manifests(&index).iter().map(|m| m["digest"].as_str().unwrap().to_owned()).collect();
    digests.sort();
    digests
}

fn cordon(farm: &Farm, verb: &str) {
    for agent in AGENTS {
        let out = farm.braid(&[verb, agent]).unwrap();
        assert!(out.status.success(), "{verb} {agent}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn a_rebuild_with_nothing_changed_is_answered_without_an_agent() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let farm = Farm::start(
        dir,
        &registry,
        &[
            AgentSpec::new(AGENTS[0], &[]),
            AgentSpec::new(AGENTS[1], &["linux/arm64"]),
            AgentSpec::new(AGENTS[2], &["linux/arm/v7"]),
        ],
    )
    .unwrap();
    farm.wait_for_agents(3).unwrap();
    let ctx = dockerfile_context(dir, "ctx", &format!("FROM {base}\nARG V=1\nRUN echo \"$V $(uname -m)\" > /v.txt\n"));
    let tag = format!("{}/app/demo:1", registry.addr);

    // The first build: every platform built by an agent.
    let (ok, first, log) = build(&farm, &tag, &ctx, &[]);
    assert!(ok, "{log}");
    assert!(!first.is_empty(), "{log}");
    assert!(!log.contains("unchanged since"), "nothing to reuse yet: {log}");
    let built = images(&registry, "app/demo:1");
    assert_eq!(built.len(), 3);

    // Again, with every agent cordoned: no agent can take a job, so the
    // build succeeds only if the coordinator answers each platform itself.
    cordon(&farm, "cordon");
    let before = assigned(&farm);
    let started = std::time::Instant::now();
    let (ok, second, log) = build(&farm, &tag, &ctx, &[]);
    let took = started.elapsed();
    assert!(ok, "{log}");
    for platform in PLATFORMS {
        let said = format!("{platform}: unchanged since build {first}, reusing sha256:");
        assert!(log.contains(&said), "no {said:?} in:\n{log}");
    }
    assert_eq!(assigned(&farm), before, "no job was assigned to an agent");
    assert_eq!(images(&registry, "app/demo:1"), built, "the index names the earlier images");
    eprintln!("no-op rebuild took {took:?}");
    let out = farm.braid(&["inspect", &second]).unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(shown.contains(&format!("linux/arm64: unchanged since build {first}")), "{shown}");
    assert!(shown.contains(&format!("cache:{}", &first[..8])), "the agent column names the cache: {shown}");
    cordon(&farm, "uncordon");

    // --no-cache bypasses it.
    let before = assigned(&farm);
    let (ok, _, log) = build(&farm, &tag, &ctx, &["--no-cache"]);
    assert!(ok, "{log}");
    assert!(!log.contains("unchanged since"), "--no-cache must not reuse: {log}");
    assert_eq!(assigned(&farm), before + 3, "each platform built by an agent");

    // A changed build arg is another build.
    let before = assigned(&farm);
    let (ok, _, log) = build(&farm, &tag, &ctx, &["--build-arg", "V=2"]);
    assert!(ok, "{log}");
    assert!(!log.contains("unchanged since"), "a changed build arg must not reuse: {log}");
    assert_eq!(assigned(&farm), before + 3);

    // The base image's tag now names another image: built again...
    let copied = Command::new("skopeo")
        .args(["copy", "--all", "--src-tls-verify=false", "--dest-tls-verify=false"])
        .arg(format!("docker://{tag}"))
        .arg(format!("docker://{base}"))
        .output()
        .unwrap();
    assert!(copied.status.success(), "{}", String::from_utf8_lossy(&copied.stderr));
    let before = assigned(&farm);
    let (ok, third, log) = build(&farm, &tag, &ctx, &[]);
    assert!(ok, "{log}");
    assert!(!log.contains("unchanged since"), "a changed base image must not reuse: {log}");
    assert_eq!(assigned(&farm), before + 3);

    // ...and that build is what the next identical one reuses.
    let before = assigned(&farm);
    let (ok, _, log) = build(&farm, &tag, &ctx, &[]);
    assert!(ok, "{log}");
    assert!(log.contains(&format!("linux/amd64: unchanged since build {third}")), "{log}");
    assert_eq!(assigned(&farm), before);
}
