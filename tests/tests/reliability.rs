//! Builds that go on through agent loss, coordinator crashes, frozen agents
//! and registry outages; many builds at once; cache affinity. Real
//! processes, real signals, every wait bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use braid_tests::{
    AgentSpec, FAST_FAILURE, Farm, Registry, RunningBuild, dockerfile_context, eventually, require_environment,
};

/// These tests time heartbeats; run them one at a time so they do not
/// starve each other of the machine's two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn metadata(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn setup(dir: &Path, with_base: bool) -> (Registry, String) {
    require_environment();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = if with_base { registry.push_base_image("base/busybox:latest").unwrap() } else { String::new() };
    (registry, base)
}

#[test]
fn a_killed_agent_s_job_finishes_on_the_other() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (registry, base) = setup(tmp.path(), true);
    let agents = [AgentSpec::new("arm64-a", &["linux/arm64"]), AgentSpec::new("arm64-b", &["linux/arm64"])];
    let farm = Farm::start_with(tmp.path(), Some(&registry.addr), &agents, FAST_FAILURE).unwrap();
    farm.wait_for_agents(2).unwrap();
    let ctx = dockerfile_context(tmp.path(), "ctx", &format!("FROM {base}\nRUN sleep 5 && uname -m > /arch\n"));
    let meta = tmp.path().join("meta.json");
    let tag = format!("{}/rel/killed:1", registry.addr);
    let mut build = RunningBuild::start(
        &farm,
        &[
            "build",
            "--platform",
            "linux/arm64",
            "-t",
            &tag,
            "--push",
            "--progress",
            "plain",
            "--metadata-file",
            meta.to_str().unwrap(),
            &ctx,
        ],
    );
    let line = build.wait_for("linux/arm64 building on", Duration::from_secs(60));
    let victim = if line.contains("arm64-a") { "arm64-a" } else { "arm64-b" };
    let survivor = if victim == "arm64-a" { "arm64-b" } else { "arm64-a" };
    farm.signal_agent(victim, "KILL");
    let (code, out) = build.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "the build survives losing an agent:\n{out}");
    assert!(out.contains(&format!("linux/arm64 building on {survivor} (attempt 2)")), "{out}");
    assert_eq!(metadata(&meta)["braid.platforms"]["linux/arm64"]["agent"], survivor);
    let index = registry.manifest("rel/killed:1").unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap();
    assert_eq!(
        registry.read_file("rel/killed", digest, "arch", &tmp.path().join("scratch")).unwrap().trim(),
        "aarch64"
    );
}

/// An amd64 and an arm64 agent; a build for both (with the flags `output`
/// gives for the test registry) whose coordinator is killed once amd64 is
/// verified, while arm64 still builds, and started again. Returns the farm,
/// the registry, the build id, and how `braid build` ended.
fn crash_mid_build(
    dir: &Path,
    output: impl FnOnce(&Registry) -> Vec<String>,
) -> (Farm, Registry, String, Option<i32>, String) {
    let (registry, base) = setup(dir, true);
    let agents = [AgentSpec::new("amd64-agent", &[]), AgentSpec::new("arm64-agent", &["linux/arm64"])];
    let mut farm = Farm::start_with(dir, Some(&registry.addr), &agents, FAST_FAILURE).unwrap();
    farm.wait_for_agents(2).unwrap();
    let dockerfile = format!(
        "FROM {base}\nARG TARGETARCH\nRUN if [ \"$TARGETARCH\" = arm64 ]; then sleep 6; fi; uname -m > /arch\n"
    );
    let ctx = dockerfile_context(dir, "ctx", &dockerfile);
    let output = output(&registry);
    let mut args = vec!["build", "--platform", "linux/amd64,linux/arm64", "--progress", "plain"];
    args.extend(output.iter().map(String::as_str));
    args.push(&ctx);
    let mut build = RunningBuild::start(&farm, &args);
    let build_id = build.build_id();
    build.wait_for("linux/amd64 verified", Duration::from_secs(60));
    farm.crash_coordinator();
    std::thread::sleep(Duration::from_millis(500));
    farm.start_coordinator().unwrap();
    let (code, out) = build.finish(Duration::from_secs(120));
    (farm, registry, build_id, code, out)
}

#[test]
fn a_crashed_coordinator_comes_back_and_the_build_completes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (farm, registry, build_id, code, out) = crash_mid_build(tmp.path(), |registry| {
        vec!["-t".into(), format!("{}/rel/crash:1", registry.addr), "--push".into()]
    });
    assert_eq!(code, Some(0), "the build completes after a coordinator crash:\n{out}");
    assert_eq!(braid_tests::platform_manifests(&registry.manifest("rel/crash:1").unwrap()).len(), 2);

    // Nothing built twice: each agent started exactly one job.
    for agent in ["amd64-agent", "arm64-agent"] {
        assert_eq!(farm.log(agent).matches("job started").count(), 1, "{agent} built once:\n{}", farm.log(agent));
    }
    // The event history is whole: every sequence number, in order, to the end.
    let logs = farm.braid(&["logs", &build_id, "--format", "json"]).unwrap();
    assert!(logs.status.success());
    let events: Vec<serde_json::Value> =
        String::from_utf8_lossy(&logs.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(events.last().unwrap()["state"], "succeeded");
    for platform in ["linux/amd64", "linux/arm64"] {
        let verified =
            events.iter().filter(|e| e["type"] == "job" && e["platform"] == platform && e["state"] == "verified");
        assert_eq!(verified.count(), 1, "{platform} verified once");
    }
}

#[test]
fn an_exporting_build_keeps_its_uploaded_images_across_a_coordinator_crash() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("app.tar");
    let dest = format!("type=oci,dest={}", archive.display());
    let (farm, _registry, _, code, out) = crash_mid_build(tmp.path(), |_| vec!["--output".into(), dest]);
    assert_eq!(code, Some(0), "the build and its export complete after a coordinator crash:\n{out}");
    let raw = std::process::Command::new("skopeo")
        .args(["inspect", "--raw", &format!("oci-archive:{}", archive.display())])
        .output()
        .unwrap();
    assert!(raw.status.success(), "{}", String::from_utf8_lossy(&raw.stderr));
    let index: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2, "{index}");
    assert_eq!(farm.log("amd64-agent").matches("job started").count(), 1, "amd64 was not built again");
}

#[test]
fn a_frozen_agent_is_replaced_and_its_late_result_ignored() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (registry, base) = setup(tmp.path(), true);
    let agents = [AgentSpec::new("arm64-a", &["linux/arm64"]), AgentSpec::new("arm64-b", &["linux/arm64"])];
    let farm = Farm::start_with(tmp.path(), Some(&registry.addr), &agents, FAST_FAILURE).unwrap();
    farm.wait_for_agents(2).unwrap();
    let ctx = dockerfile_context(tmp.path(), "ctx", &format!("FROM {base}\nRUN sleep 4 && uname -m > /arch\n"));
    let meta = tmp.path().join("meta.json");
    let tag = format!("{}/rel/frozen:1", registry.addr);
    let mut build = RunningBuild::start(
        &farm,
        &[
            "build",
            "--platform",
            "linux/arm64",
            "-t",
            &tag,
            "--push",
            "--progress",
            "plain",
            "--metadata-file",
            meta.to_str().unwrap(),
            &ctx,
        ],
    );
    let line = build.wait_for("linux/arm64 building on", Duration::from_secs(60));
    let frozen = if line.contains("arm64-a") { "arm64-a" } else { "arm64-b" };
    let other = if frozen == "arm64-a" { "arm64-b" } else { "arm64-a" };
    farm.signal_agent(frozen, "STOP");
    let (code, out) = build.finish(Duration::from_secs(120));
    farm.signal_agent(frozen, "CONT");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(metadata(&meta)["braid.platforms"]["linux/arm64"]["agent"], other, "the job ran elsewhere");
    let index_digest = registry.digest_of("rel/frozen:1").unwrap();
    // The thawed agent comes back with its stale job: it is told to stop it,
    // or its result is ignored; either way the index stays as it was.
    eventually(Duration::from_secs(30), "the stale job to be dropped", || {
        let coordinator = farm.log("coordinator");
        let agent = farm.log(frozen);
        (coordinator.contains("ignoring a result for a stale lease") || agent.contains("cancelling job")).then_some(())
    })
    .unwrap();
    assert_eq!(registry.digest_of("rel/frozen:1").unwrap(), index_digest);
    assert_eq!(metadata(&meta)["containerimage.digest"], index_digest.as_str());
}

#[test]
fn forty_builds_at_once_over_four_agents() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (registry, _) = setup(tmp.path(), false);
    let agents = [
        AgentSpec::new("amd-1", &[]).slots(2),
        AgentSpec::new("amd-2", &[]).slots(2),
        AgentSpec::new("arm-1", &["linux/arm64"]).slots(2),
        AgentSpec::new("arm-2", &["linux/arm64"]).slots(2),
    ];
    let farm = Farm::start_with(tmp.path(), Some(&registry.addr), &agents, &[]).unwrap();
    farm.wait_for_agents(4).unwrap();
    let builds: Vec<(usize, RunningBuild)> = (0..40)
        .map(|i| {
            let ctx = dockerfile_context(tmp.path(), &format!("ctx{i}"), "FROM scratch\nCOPY n.txt /n.txt\n");
            std::fs::write(Path::new(&ctx).join("n.txt"), i.to_string()).unwrap();
            let tag = format!("{}/load/app{i}:1", registry.addr);
            (
                i,
                RunningBuild::start(
                    &farm,
                    &[
                        "build",
                        "--platform",
                        "linux/amd64,linux/arm64",
                        "-t",
                        &tag,
                        "--push",
                        "--progress",
                        "quiet",
                        &ctx,
                    ],
                ),
            )
        })
        .collect();
    for (i, build) in builds {
        let (code, out) = build.finish(Duration::from_secs(600));
        assert_eq!(code, Some(0), "build {i} failed:\n{out}");
        let index = registry.manifest(&format!("load/app{i}:1")).unwrap();
        let platforms = braid_tests::platform_manifests(&index);
        let mut archs: Vec<&str> = platforms.iter().map(|m| m["platform"]["architecture"].as_str().unwrap()).collect();
        archs.sort();
        assert_eq!(archs, ["amd64", "arm64"], "build {i}");
    }
    for agent in ["amd-1", "amd-2", "arm-1", "arm-2"] {
        assert!(farm.log(agent).contains("job started"), "{agent} took part");
    }
}

#[test]
fn builds_of_one_repository_stay_warm_and_another_spreads() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (registry, _) = setup(tmp.path(), false);
    let agents = [AgentSpec::new("arm64-a", &["linux/arm64"]), AgentSpec::new("arm64-b", &["linux/arm64"])];
    let farm = Farm::start_with(tmp.path(), Some(&registry.addr), &agents, &[]).unwrap();
    farm.wait_for_agents(2).unwrap();
    let ctx = dockerfile_context(tmp.path(), "ctx", "FROM scratch\nCOPY Dockerfile /\n");
    let agent_for = |repo: &str, n: usize| {
        let meta = tmp.path().join(format!("{}-{n}.json", repo.replace('/', "-")));
        let tag = format!("{}/{repo}:{n}", registry.addr);
        // A different build arg each time: an identical build would be
        // answered by the result cache, with no agent at all.
        let revision = format!("REVISION={n}");
        let out = farm
            .braid(&[
                "build",
                "--platform",
                "linux/arm64",
                "--build-arg",
                &revision,
                "-t",
                &tag,
                "--push",
                "--metadata-file",
                meta.to_str().unwrap(),
                &ctx,
            ])
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        metadata(&meta)["braid.platforms"]["linux/arm64"]["agent"].as_str().unwrap().to_owned()
    };
    let first = agent_for("aff/one", 1);
    for n in 2..=3 {
        assert_eq!(agent_for("aff/one", n), first, "consecutive builds of one repository reuse the warm agent");
    }
    assert_ne!(agent_for("aff/two", 1), first, "a second repository goes to the other agent");
}
