//! Running a fleet: a platform no agent ever declared is refused at once,
//! naming what the farm has (and `--allow-emulation` where an agent
//! emulates it); what agents declared outlasts a coordinator restart, so a
//! build for a platform whose agents are offline waits, naming who is known
//! and when each was last seen; `braid builds --wide` shows platforms and
//! tags whole.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use braid_tests::{
    AgentSpec, FAST_FAILURE, Farm, Registry, RunningBuild, dockerfile_context, output_text, require_environment,
};

#[test]
fn an_undeclared_platform_fails_at_once_and_a_known_one_waits_across_a_restart() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(&tmp.path().join("registry")).unwrap();
    let mut farm =
        Farm::start_with(tmp.path(), Some(&registry.addr), &[AgentSpec::new("amd64-agent", &[])], FAST_FAILURE)
            .unwrap();
    farm.wait_for_agents(1).unwrap();
    let agents = output_text(&farm.braid(&["agents", "--format", "json"]).unwrap());
    let emulates_riscv = agents.contains("linux/riscv64");
    let ctx = dockerfile_context(tmp.path(), "ctx", "FROM scratch\nCOPY Dockerfile /\n");

    // Never declared: refused at once, naming the platform and the farm's.
    let started = Instant::now();
    let out = farm.braid(&["build", "--platform", "linux/riscv64", &ctx]).unwrap();
    let err = output_text(&out);
    assert!(!out.status.success(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "at once, not after a queue timeout");
    assert!(err.contains("platform linux/riscv64: no agent has ever declared it; the farm has linux/amd64"), "{err}");
    assert_eq!(
        err.contains("agent amd64-agent emulates it: --allow-emulation would use it"),
        emulates_riscv,
        "the hint appears exactly when the agent emulates riscv64: {err}\n{agents}"
    );
    // Two platforms: each is named; the known one does not stop the refusal.
    let out = farm.braid(&["build", "--platform", "linux/amd64,linux/s390x", &ctx]).unwrap();
    let err = output_text(&out);
    assert!(!out.status.success() && err.contains("platform linux/s390x: no agent has ever declared it"), "{err}");
    assert!(!err.contains("platform linux/amd64:"), "{err}");

    // The agent stops, the coordinator restarts: amd64 is still known, so
    // a build for it waits, naming the agent and when it was last seen.
    farm.signal_agent("amd64-agent", "KILL");
    std::thread::sleep(Duration::from_millis(500));
    farm.crash_coordinator();
    farm.start_coordinator().unwrap();
    let out = farm.braid(&["build", "--platform", "linux/riscv64", &ctx]).unwrap();
    let err = output_text(&out);
    assert!(err.contains("platform linux/riscv64: no agent has ever declared it; the farm has linux/amd64"), "{err}");
    let mut build = RunningBuild::start(&farm, &["build", "--platform", "linux/amd64", "--progress", "plain", &ctx]);
    let line = build.wait_for(
        "waiting for an agent for linux/amd64: 1 agent is known for it: amd64-agent (last seen 20",
        Duration::from_secs(60),
    );
    assert!(line.trim_end().ends_with("Z)"), "a UTC time: {line}");
    // The agent comes back and the build runs.
    farm.restart_agent("amd64-agent").unwrap();
    let (code, out) = build.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{out}");

    // `braid builds` counts platforms and shortens the first tag;
    // `--wide` shows them all, whole.
    let first = format!("{}/a-rather-long-team-name/a-rather-long-repository:first", registry.addr);
    let second = format!("{}/fleet/app:second", registry.addr);
    let out = farm.braid(&["build", "--platform", "linux/amd64", "-t", &first, "-t", &second, "--push", &ctx]).unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let narrow = output_text(&farm.braid(&["builds"]).unwrap());
    let row = narrow.lines().find(|l| l.contains("(+1)")).unwrap_or_else(|| panic!("{narrow}"));
    assert!(row.contains('…') && row.contains(" succeeded ") && !row.contains(&first), "{narrow}");
    let wide = output_text(&farm.braid(&["builds", "--wide"]).unwrap());
    let row = wide.lines().find(|l| l.contains(&first)).unwrap_or_else(|| panic!("{wide}"));
    assert!(row.contains(" linux/amd64 ") && row.ends_with(&format!("{first},{second}")), "{wide}");
    assert!(wide.lines().next().unwrap().ends_with("TAGS"), "{wide}");
}
