//! Steering builds: timeouts, cancellation down to the builder's processes,
//! Ctrl-C and --detach, emulation only on request, and agents that stop
//! gracefully or hand their jobs back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use braid_tests::{
    AgentSpec, FAST_FAILURE, Farm, Registry, RunningBuild, dockerfile_context, eventually, require_environment,
    send_signal,
};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn state_of(farm: &Farm, build_id: &str) -> serde_json::Value {
    let out = farm.braid(&["inspect", build_id, "--format", "json"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn processes_matching(pattern: &str) -> usize {
    let out = Command::new("pgrep").args(["-f", pattern]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn timeouts_and_cancellation_reach_the_builder() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(&tmp.path().join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let mut flags = FAST_FAILURE.to_vec();
    flags.extend(["--queue-timeout", "3"]);
    let farm =
        Farm::start_with(tmp.path(), Some(&registry.addr), &[AgentSpec::new("amd64-agent", &[])], &flags).unwrap();
    farm.wait_for_agents(1).unwrap();

    // A platform no agent ever declared is refused at submit, naming it;
    // one whose agents take nothing (cordoned) fails after the queue
    // timeout, naming it.
    let ctx = dockerfile_context(tmp.path(), "quick", "FROM scratch\nCOPY Dockerfile /\n");
    let out = farm.braid(&["build", "--platform", "linux/s390x", &ctx]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("platform linux/s390x: no agent has ever declared it"), "{err}");
    assert!(farm.braid(&["cordon", "amd64-agent"]).unwrap().status.success());
    let out = farm.braid(&["build", "--platform", "linux/amd64", &ctx]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("linux/amd64: no agent took the job within 3s"), "{err}");
    assert!(farm.braid(&["uncordon", "amd64-agent"]).unwrap().status.success());

    // --timeout fails the build and kills the builder's processes.
    let slow = dockerfile_context(tmp.path(), "slow", &format!("FROM {base}\nRUN sleep 1234\n"));
    let mut build = RunningBuild::start(
        &farm,
        &["build", "--platform", "linux/amd64", "--timeout", "4s", "--progress", "plain", &slow],
    );
    build.wait_for("RUN sleep 1234", Duration::from_secs(60));
    eventually(Duration::from_secs(10), "the RUN step to start", || {
        (processes_matching("sleep 1234") > 0).then_some(())
    })
    .unwrap();
    let (code, out) = build.finish(Duration::from_secs(60));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("timed out after 4s (--timeout)"), "{out}");
    eventually(Duration::from_secs(15), "the builder's processes to be killed", || {
        (processes_matching("sleep 1234") == 0).then_some(())
    })
    .unwrap();

    // Ctrl-C on braid build cancels the build.
    let slow2 = dockerfile_context(tmp.path(), "slow2", &format!("FROM {base}\nRUN sleep 1235\n"));
    let mut build = RunningBuild::start(&farm, &["build", "--platform", "linux/amd64", "--progress", "plain", &slow2]);
    let build_id = build.build_id();
    build.wait_for("RUN sleep 1235", Duration::from_secs(60));
    send_signal(build.child.id(), "INT");
    let (code, _) = build.finish(Duration::from_secs(30));
    assert_eq!(code, Some(130));
    assert_eq!(state_of(&farm, &build_id)["state"], "cancelled");
    eventually(Duration::from_secs(15), "the cancelled builder to be killed", || {
        (processes_matching("sleep 1235") == 0).then_some(())
    })
    .unwrap();

    // --detach returns at once with the id; the build goes on without the CLI.
    let out = farm.braid(&["build", "--platform", "linux/amd64", "--detach", "--progress", "quiet", &ctx]).unwrap();
    assert!(out.status.success());
    let build_id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    eventually(Duration::from_secs(60), "the detached build to succeed", || {
        (state_of(&farm, &build_id)["state"] == "succeeded").then_some(())
    })
    .unwrap();
}

#[test]
fn emulation_only_when_asked() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(&tmp.path().join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let mut flags = FAST_FAILURE.to_vec();
    flags.extend(["--queue-timeout", "3"]);
    // Only an amd64 agent; this machine's binfmt lets it emulate arm64.
    let farm =
        Farm::start_with(tmp.path(), Some(&registry.addr), &[AgentSpec::new("amd64-agent", &[])], &flags).unwrap();
    farm.wait_for_agents(1).unwrap();
    let ctx = dockerfile_context(tmp.path(), "ctx", &format!("FROM {base}\nRUN uname -m > /arch\n"));
    let tag = format!("{}/emu/app:1", registry.addr);

    let out = farm.braid(&["build", "--platform", "linux/arm64", "-t", &tag, "--push", &ctx]).unwrap();
    assert!(!out.status.success(), "no emulation unless asked");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("platform linux/arm64: no agent has ever declared it"), "{err}");
    assert!(err.contains("agent amd64-agent emulates it: --allow-emulation would use it"), "{err}");

    let meta = tmp.path().join("meta.json");
    let out = farm
        .braid(&[
            "build",
            "--platform",
            "linux/arm64",
            "--allow-emulation",
            "-t",
            &tag,
            "--push",
            "--metadata-file",
            meta.to_str().unwrap(),
            &ctx,
        ])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let summary = err.lines().find(|l| l.starts_with("linux/arm64 ")).unwrap();
    assert!(summary.contains("amd64-agent") && summary.contains("emulated"), "{summary}");
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    assert_eq!(meta["braid.platforms"]["linux/arm64"]["emulated"], true);
    let index = registry.manifest("emu/app:1").unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap();
    assert_eq!(registry.read_file("emu/app", digest, "arch", &tmp.path().join("scratch")).unwrap().trim(), "aarch64");
}

#[test]
fn agents_stop_gracefully_or_hand_jobs_back() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(&tmp.path().join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let agents = [AgentSpec::new("amd-a", &[]).slots(2), AgentSpec::new("amd-b", &[]).slots(2)];
    let mut farm = Farm::start_with(tmp.path(), Some(&registry.addr), &agents, FAST_FAILURE).unwrap();
    farm.wait_for_agents(2).unwrap();

    // One SIGTERM: the running job finishes there, new work goes elsewhere,
    // then the agent leaves.
    let slow = dockerfile_context(tmp.path(), "slow", &format!("FROM {base}\nRUN sleep 5 && echo done > /done\n"));
    let repo = format!("{}/stop/app", registry.addr);
    let meta1 = tmp.path().join("m1.json");
    let mut first = RunningBuild::start(
        &farm,
        &[
            "build",
            "--platform",
            "linux/amd64",
            "-t",
            &format!("{repo}:1"),
            "--push",
            "--progress",
            "plain",
            "--metadata-file",
            meta1.to_str().unwrap(),
            &slow,
        ],
    );
    let line = first.wait_for("linux/amd64 building on", Duration::from_secs(60));
    let (stopping, other) = if line.contains("amd-a") { ("amd-a", "amd-b") } else { ("amd-b", "amd-a") };
    farm.signal_agent(stopping, "TERM");
    eventually(Duration::from_secs(10), "the agent to say it is draining", || {
        farm.log("coordinator").contains("draining=true").then_some(())
    })
    .unwrap();
    let quick = dockerfile_context(tmp.path(), "quick", "FROM scratch\nCOPY Dockerfile /\n");
    let meta2 = tmp.path().join("m2.json");
    let out = farm
        .braid(&[
            "build",
            "--platform",
            "linux/amd64",
            "-t",
            &format!("{repo}:2"),
            "--push",
            "--metadata-file",
            meta2.to_str().unwrap(),
            &quick,
        ])
        .unwrap();
    assert!(out.status.success());
    let agent_of = |meta: &Path| -> String {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(meta).unwrap()).unwrap();
        v["braid.platforms"]["linux/amd64"]["agent"].as_str().unwrap().to_owned()
    };
    assert_eq!(agent_of(&meta2), other, "a draining agent takes no new job");
    let (code, out) = first.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(agent_of(&meta1), stopping, "the running job finished where it ran");
    assert!(!out.contains("attempt 2"), "{out}");
    assert!(farm.wait_agent_exit(stopping, Duration::from_secs(30)).unwrap().success());

    // Two signals: the running job is handed back and runs on the other agent.
    let slower = dockerfile_context(tmp.path(), "slower", &format!("FROM {base}\nRUN sleep 30\n"));
    let mut build = RunningBuild::start(&farm, &["build", "--platform", "linux/amd64", "--progress", "plain", &slower]);
    build.wait_for(&format!("linux/amd64 building on {other}"), Duration::from_secs(60));
    build.wait_for("RUN sleep 30", Duration::from_secs(60));
    farm.signal_agent(other, "TERM");
    std::thread::sleep(Duration::from_millis(500));
    farm.signal_agent(other, "TERM");
    let line = build.wait_for("re-queued", Duration::from_secs(30));
    assert!(line.contains("handed back"), "{line}");
    assert!(farm.wait_agent_exit(other, Duration::from_secs(30)).unwrap().success());
}
