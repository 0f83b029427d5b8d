//! What an agent reports reaches the coordinator exactly once: log lines
//! and results survive quick coordinator restarts without gap or double,
//! and a coordinator asked to stop does so within its grace, its running
//! builds going on after it comes back. Real processes, every wait bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use braid_tests::{AgentSpec, Farm, Registry, RunningBuild, dockerfile_context, require_environment, send_signal};

/// These tests time restarts; one at a time on the machine's two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn setup(dir: &Path) -> (Registry, String) {
    require_environment();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    (registry, base)
}

/// How many times each `n-N` line appears in `braid logs` output.
fn numbers(out: &str) -> BTreeMap<u32, usize> {
    let mut seen = BTreeMap::new();
    for line in out.lines() {
        if let Some(n) = line.strip_prefix("[linux/amd64] n-").and_then(|n| n.trim().parse().ok()) {
            *seen.entry(n).or_insert(0) += 1;
        }
    }
    seen
}

fn logs(farm: &Farm, build_id: &str) -> String {
    let out = farm.braid(&["logs", build_id]).unwrap();
    assert!(out.status.success(), "braid logs: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const LINES: u32 = 3000;

#[test]
fn no_log_line_or_result_is_lost_or_doubled_across_quick_coordinator_restarts() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (registry, base) = setup(tmp.path());
    let mut farm = Farm::start(tmp.path(), &registry, &[AgentSpec::new("amd64-agent", &[]).slots(3)]).unwrap();
    farm.wait_for_agents(1).unwrap();
    let mut builds = Vec::new();
    for i in 0..3 {
        // Numbered lines in bursts, spread over several seconds so the
        // restarts fall in the middle of them.
        let dockerfile = format!(
            "FROM {base}\nRUN echo build-{i} && for i in $(seq 1 {LINES}); do echo n-$i; \
             if [ $((i % 20)) -eq 0 ]; then sleep 0.02; fi; done\n"
        );
        let ctx = dockerfile_context(tmp.path(), &format!("ctx{i}"), &dockerfile);
        let tag = format!("{}/delivery/restarts{i}:1", registry.addr);
        let mut build = RunningBuild::start(
            &farm,
            &["build", "--platform", "linux/amd64", "-t", &tag, "--push", "--progress", "plain", &ctx],
        );
        let id = build.build_id();
        builds.push((build, id, format!("delivery/restarts{i}:1")));
    }
    for (build, ..) in &mut builds {
        build.wait_for("n-200", Duration::from_secs(180));
    }
    for _ in 0..3 {
        // Hung for half a second first, so messages pile up on the way to
        // it (in the connection, not read), then killed and started again.
        send_signal(farm.coordinator.as_ref().unwrap().pid(), "STOP");
        std::thread::sleep(Duration::from_millis(500));
        farm.crash_coordinator();
        farm.start_coordinator().unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    for (build, build_id, tag) in builds {
        let (code, out) = build.finish(Duration::from_secs(300));
        assert_eq!(code, Some(0), "the build succeeds:\n{out}");
        assert!(registry.digest_of(&tag).is_some(), "its index is pushed");
        let out = logs(&farm, &build_id);
        let seen = numbers(&out);
        let wrong: Vec<_> = (1..=LINES).filter(|n| seen.get(n) != Some(&1)).collect();
        assert!(
            wrong.is_empty(),
            "every line stored exactly once; not so for {} numbers, from {:?}:\n{out}",
            wrong.len(),
            wrong.first()
        );
        assert_eq!(out.matches("#  build succeeded").count(), 1, "the build succeeds once:\n{out}");
        assert_eq!(out.matches("#  linux/amd64 pushed").count(), 1, "its result is applied once:\n{out}");
        assert!(!out.contains("(attempt 2)"), "no result was lost (the job ran once):\n{out}");
    }
}

#[test]
fn a_stopping_coordinator_exits_within_its_grace_and_its_build_goes_on_after_a_restart() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (registry, base) = setup(tmp.path());
    let grace = 3;
    let mut farm = Farm::start_with(
        tmp.path(),
        Some(&registry.addr),
        &[AgentSpec::new("amd64-agent", &[])],
        &["--shutdown-grace-seconds", &grace.to_string()],
    )
    .unwrap();
    farm.wait_for_agents(1).unwrap();
    let dockerfile = format!("FROM {base}\nRUN for i in $(seq 1 100); do echo n-$i; sleep 0.1; done\n");
    let ctx = dockerfile_context(tmp.path(), "ctx", &dockerfile);
    let tag = format!("{}/delivery/term:1", registry.addr);
    let mut build = RunningBuild::start(
        &farm,
        &["build", "--platform", "linux/amd64", "-t", &tag, "--push", "--progress", "plain", &ctx],
    );
    let build_id = build.build_id();
    build.wait_for("n-5", Duration::from_secs(180));
    let coordinator = farm.coordinator.as_mut().unwrap();
    send_signal(coordinator.pid(), "TERM");
    let asked = Instant::now();
    let deadline = Duration::from_secs(grace + 2);
    let status = braid_tests::eventually(deadline + Duration::from_secs(5), "the coordinator to exit", || {
        coordinator.try_wait()
    })
    .unwrap();
    let took = asked.elapsed();
    assert!(took <= deadline, "the coordinator exited after {took:?}, more than its grace and 2 s");
    assert!(status.success(), "a stop on request is a clean exit: {status:?}");
    farm.coordinator = None;
    farm.start_coordinator().unwrap();
    let (code, out) = build.finish(Duration::from_secs(300));
    assert_eq!(code, Some(0), "the build completes after the restart:\n{out}");
    let out = logs(&farm, &build_id);
    let seen = numbers(&out);
    let wrong: Vec<_> = (1..=100).filter(|n| seen.get(n) != Some(&1)).collect();
    assert!(wrong.is_empty(), "every line stored once; not so for {wrong:?}:\n{out}");
    assert!(!out.contains("(attempt 2)"), "the job was re-adopted, not run again:\n{out}");
}
