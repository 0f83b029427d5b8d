//! Placement by what a build needs: two agents of one platform, one
//! declaring 256 MiB (`--label memory=256MiB`, which also caps its jobs
//! with a cgroup) and one 2 GiB. A requirement routes to the right one; an
//! unsatisfiable one fails at once naming it and each agent's value; a RUN
//! that exhausts the small agent's memory is named out of memory and
//! succeeds on the larger one; the learned peak shows in `braid inspect`,
//! outlasts a coordinator restart and steers the next build of the
//! repository to the agent whose memory covers it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use braid_tests::{AgentSpec, Farm, Registry, dockerfile_context, output_text, require_environment};
use serde_json::Value;

/// The build id from `#2 build ID submitted` in a build's output.
fn build_id(out: &str) -> String {
    let line = out.lines().find(|l| l.starts_with("#2 build ")).unwrap_or_else(|| panic!("no build id: {out}"));
    line.split_whitespace().nth(2).unwrap().to_owned()
}

fn inspect(farm: &Farm, id: &str) -> Value {
    let out = farm.braid(&["inspect", id, "--format", "json"]).unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", output_text(&out)))
}

/// Builds and returns the build's output and its first job as `braid inspect` shows it.
fn build(farm: &Farm, args: &[&str]) -> (bool, String, Value) {
    let out = farm.braid(args).unwrap();
    let text = output_text(&out);
    let id = build_id(&text);
    let job = inspect(farm, &id)["jobs"][0].clone();
    (out.status.success(), text, job)
}

#[test]
fn requirements_route_out_of_memory_is_named_and_retried_and_footprints_steer() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let agents = [
        AgentSpec::new("a-small", &["linux/amd64"]).flag("--label", "memory=256MiB").flag("--label", "zone=rack-1"),
        AgentSpec::new("b-big", &["linux/amd64"]).flag("--label", "memory=2GiB"),
    ];
    let mut farm = Farm::start(dir, &registry, &agents).unwrap();
    farm.wait_for_agents(2).unwrap();

    // Labels: the operator's over the detected ones, in `braid agents`.
    let wide = output_text(&farm.braid(&["agents", "--wide"]).unwrap());
    assert!(wide.lines().next().unwrap().ends_with("LABELS"), "{wide}");
    let small_row = wide.lines().find(|l| l.starts_with("a-small")).unwrap_or_else(|| panic!("{wide}"));
    assert!(small_row.contains("memory=256MiB") && small_row.contains("zone=rack-1"), "{wide}");
    let json: Value = serde_json::from_slice(&farm.braid(&["agents", "--format", "json"]).unwrap().stdout).unwrap();
    let big = json.as_array().unwrap().iter().find(|a| a["name"] == "b-big").unwrap();
    assert_eq!(big["labels"]["memory"], "2GiB");
    assert!(big["labels"]["kernel"].as_str().is_some_and(|k| !k.is_empty()), "detected: {big}");
    assert!(big["labels"]["cpus"].as_str().is_some_and(|c| c.parse::<u32>().is_ok()), "detected: {big}");

    // A requirement routes: a-small comes first by name, but only b-big has 1 GiB.
    let ctx = dockerfile_context(dir, "small", &format!("FROM {base}\nRUN echo small > /small\n"));
    let (ok, out, job) = build(&farm, &["build", "--platform", "linux/amd64", "--require", "memory>=1GiB", &ctx]);
    assert!(ok, "{out}");
    assert_eq!(job["agent"], "b-big", "{job}");
    let (ok, out, job) = build(&farm, &["build", "--platform", "linux/amd64", "--require", "zone=rack-1", &ctx]);
    assert!(ok, "{out}");
    assert_eq!(job["agent"], "a-small", "{job}");

    // None satisfies it: refused at once, naming it and each agent's value.
    let started = Instant::now();
    let out = farm.braid(&["build", "--platform", "linux/amd64", "--require", "memory>=64GiB", &ctx]).unwrap();
    let err = output_text(&out);
    assert!(!out.status.success(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "at once: {err}");
    assert!(err.contains("linux/amd64: memory>=64GiB: agents a-small has 256.0 MiB, b-big has 2.0 GiB"), "{err}");
    // Bad input is refused by the CLI, naming the flag.
    let out = farm.braid(&["build", "--require", "memory>=lots", &ctx]).unwrap();
    assert!(!out.status.success() && output_text(&out).contains("--require \"memory>=lots\""), "{}", output_text(&out));
    let out = farm.braid(&["build", "--platform", "linux/amd64", "--require", "linux/arm64:memory>=1G", &ctx]).unwrap();
    assert!(output_text(&out).contains("the build has no platform linux/arm64"), "{}", output_text(&out));

    // A RUN that needs 400 MiB: out of memory on a-small (its cgroup holds
    // it to 256 MiB), named, retried once on b-big, where it succeeds.
    let tag = format!("{}/placement/hungry:1", registry.addr);
    let hungry = dockerfile_context(
        dir,
        "hungry",
        &format!("FROM {base}\nRUN dd if=/dev/zero of=/dev/null bs=400M count=1 && echo fed > /fed\n"),
    );
    let (ok, out, job) =
        build(&farm, &["build", "--platform", "linux/amd64", "--progress", "plain", "-t", &tag, "--push", &hungry]);
    assert!(ok, "{out}");
    assert_eq!(job["agent"], "b-big", "{job}");
    assert_eq!(job["attempt"], 2, "{job}");
    assert!(out.contains("linux/amd64: out of memory on a-small (256.0 MiB, peak "), "{out}");
    assert!(out.contains("limits memory (the agent's memory label) 256.0 MiB on agent a-small"), "{out}");
    let peak = job["footprint"]["peak_memory_bytes"].as_u64().unwrap();
    assert!(peak > 400 << 20 && peak < 2 << 30, "{job}");
    assert_eq!(job["footprint"]["agent"], "b-big");
    let id = build_id(&out);
    let table = output_text(&farm.braid(&["inspect", &id]).unwrap());
    assert!(table.contains("PEAK MEMORY") && table.contains(" b-big "), "{table}");

    // The learned peak is stored: after a restart (no warm agent in
    // memory) the next build of the repository goes to b-big, whose
    // memory covers it, though a-small comes first by name, as it does for
    // a repository with nothing learned.
    farm.crash_coordinator();
    farm.start_coordinator().unwrap();
    // Both again (the log keeps the first two connections): a build
    // placed while only a-small is back would prove nothing.
    farm.wait_for_agents(4).unwrap();
    let light = dockerfile_context(dir, "light", &format!("FROM {base}\nRUN echo light > /light\n"));
    let (ok, out, job) = build(&farm, &["build", "--platform", "linux/amd64", "-t", &tag, "--push", &light]);
    assert!(ok, "{out}");
    assert_eq!(job["agent"], "b-big", "steered by the footprint: {job}");
    let other = format!("{}/placement/other:1", registry.addr);
    let (ok, out, job) = build(&farm, &["build", "--platform", "linux/amd64", "-t", &other, "--push", &light]);
    assert!(ok, "{out}");
    assert_eq!(job["agent"], "a-small", "nothing learned: {job}");

    // Out of memory where no larger agent exists: failed, with the hint.
    let out = farm
        .braid(&["build", "--platform", "linux/amd64", "--require", "memory<=512MiB", "-t", &tag, "--push", &hungry])
        .unwrap();
    let err = output_text(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("linux/amd64: out of memory on a-small (256.0 MiB, peak "), "{err}");
    assert!(err.contains("add --require linux/amd64:memory>="), "{err}");
}

/// `--memory` on a job: enforced (the job's log says how), and a build
/// that exceeds it fails naming it, with no retry (a larger agent would
/// hold it to the same limit).
#[test]
fn a_jobs_memory_limit_is_enforced_and_named() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let farm = Farm::start(dir, &registry, &[AgentSpec::new("solo", &["linux/amd64"])]).unwrap();
    farm.wait_for_agents(1).unwrap();
    let hungry =
        dockerfile_context(dir, "hungry", &format!("FROM {base}\nRUN dd if=/dev/zero of=/dev/null bs=300M count=1\n"));
    let out = farm
        .braid(&["build", "--platform", "linux/amd64", "--memory", "128MiB", "--progress", "plain", &hungry])
        .unwrap();
    let err = output_text(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("limits --memory 128.0 MiB on agent solo, enforced by a cgroup"), "{err}");
    assert!(
        err.contains("linux/amd64: out of memory on solo (128.0 MiB, peak ") && err.contains("raise --memory"),
        "{err}"
    );
    // --cpus: enforced on a cgroup v2 host, said not to be on a v1 host.
    let light = dockerfile_context(dir, "light", &format!("FROM {base}\nRUN echo light > /light\n"));
    let out =
        farm.braid(&["build", "--platform", "linux/amd64", "--cpus", "1.5", "--progress", "plain", &light]).unwrap();
    let log = output_text(&out);
    assert!(out.status.success(), "{log}");
    if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        assert!(log.contains("limits --cpus 1.5 on agent solo, enforced by a cgroup v2"), "{log}");
    } else {
        assert!(log.contains("--cpus not enforced on agent solo: cgroup v1 hosts limit memory only"), "{log}");
        assert!(!log.contains("limits --cpus"), "not said to be enforced too: {log}");
    }
    let out = farm.braid(&["build", "--platform", "linux/amd64", "--memory", "1k", &hungry]).unwrap();
    assert!(output_text(&out).contains("--memory \"1k\""), "{}", output_text(&out));
}
