//! Nothing lost under faults: followers that wait for a restarted
//! coordinator, pushes that outlast a registry outage, an agent that stays
//! small under a log flood and leaves nothing behind when killed. Real
//! processes, real signals, every wait bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use braid_tests::{AgentSpec, Farm, Registry, RunningBuild, dockerfile_context, eventually, require_environment};

/// These tests time outages; one at a time on the machine's two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn setup(dir: &Path) -> (Registry, String) {
    require_environment();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    (registry, base)
}

/// How many times each `tick-N` appears in `out`.
fn ticks(out: &str) -> BTreeMap<u32, usize> {
    let mut seen = BTreeMap::new();
    for word in out.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
        if let Some(n) = word.strip_prefix("tick-").and_then(|n| n.parse().ok()) {
            *seen.entry(n).or_insert(0) += 1;
        }
    }
    seen
}

#[test]
fn followers_ride_out_a_coordinator_crash_without_gap_or_duplicate() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (registry, base) = setup(tmp.path());
    let mut farm = Farm::start(tmp.path(), &registry, &[AgentSpec::new("amd64-agent", &[]).slots(3)]).unwrap();
    farm.wait_for_agents(1).unwrap();
    let mut builds = Vec::new();
    for i in 0..3 {
        // Numbered lines, slowly enough that the crash falls in the middle.
        let dockerfile =
            format!("FROM {base}\nRUN echo build-{i} && for i in $(seq 1 200); do echo tick-$i; sleep 0.05; done\n");
        let ctx = dockerfile_context(tmp.path(), &format!("ctx{i}"), &dockerfile);
        let tag = format!("{}/faults/follow{i}:1", registry.addr);
        let build = RunningBuild::start(
            &farm,
            &["build", "--platform", "linux/amd64", "-t", &tag, "--push", "--progress", "plain", &ctx],
        );
        builds.push((build, format!("faults/follow{i}:1")));
    }
    for (build, _) in &mut builds {
        build.wait_for("tick-10", Duration::from_secs(120));
    }
    farm.crash_coordinator();
    // The outage itself: followers must wait it out.
    std::thread::sleep(Duration::from_secs(3));
    farm.start_coordinator().unwrap();
    for (mut build, tag) in builds {
        let mut stdout = build.child.stdout.take().unwrap();
        let (code, out) = build.finish(Duration::from_secs(180));
        let mut printed = String::new();
        stdout.read_to_string(&mut printed).unwrap();
        assert_eq!(code, Some(0), "the follower waits for the coordinator and the build succeeds:\n{out}");
        let index = registry.digest_of(&tag).unwrap();
        assert_eq!(printed.trim(), format!("index {index}"), "the follower prints its build's index digest");
        let seen = ticks(&out);
        let wrong: Vec<_> = (1..=200).filter(|n| seen.get(n) != Some(&1)).collect();
        assert!(wrong.is_empty(), "every line printed exactly once; not so for {wrong:?}:\n{out}");
        assert_eq!(out.matches("reconnecting").count(), 1, "the outage is announced once:\n{out}");
        assert_eq!(out.matches("reachable again").count(), 1, "and its end once:\n{out}");
    }
}

/// A Dockerfile whose RUN leaves time to stop the registry before the push.
fn slow_dockerfile(base: &str, i: usize) -> String {
    format!("FROM {base}\nRUN echo push-{i} > /id && sleep 4\n")
}

#[test]
fn pushes_outlast_a_registry_outage_without_burning_an_attempt() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (mut registry, base) = setup(tmp.path());
    let farm = Farm::start(tmp.path(), &registry, &[AgentSpec::new("amd64-agent", &[]).slots(2)]).unwrap();
    farm.wait_for_agents(1).unwrap();
    let mut builds = Vec::new();
    for i in 0..2 {
        let ctx = dockerfile_context(tmp.path(), &format!("ctx{i}"), &slow_dockerfile(&base, i));
        let tag = format!("{}/faults/outage{i}:1", registry.addr);
        let build = RunningBuild::start(
            &farm,
            &["build", "--platform", "linux/amd64", "-t", &tag, "--push", "--progress", "plain", &ctx],
        );
        builds.push((build, format!("faults/outage{i}:1")));
    }
    for (build, _) in &mut builds {
        build.wait_for("sleep 4", Duration::from_secs(120));
    }
    registry.stop();
    for (build, _) in &mut builds {
        build
            .wait_for(&format!("registry {} unreachable, retrying (attempt 1", registry.addr), Duration::from_secs(60));
    }
    // The outage itself, longer than the old retry budget (about 10 s).
    std::thread::sleep(Duration::from_secs(20));
    registry.restart().unwrap();
    for (build, tag) in builds {
        let (code, out) = build.finish(Duration::from_secs(180));
        assert_eq!(code, Some(0), "the push waits for the registry and the build succeeds:\n{out}");
        assert!(!out.contains("(attempt 2)"), "the outage cost no attempt of the job:\n{out}");
        assert!(registry.manifest(&tag).is_some(), "{tag} was pushed");
    }
}

#[test]
fn a_registry_that_stays_down_fails_the_build_in_bounded_time_naming_it() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (mut registry, base) = setup(tmp.path());
    let agent = AgentSpec::new("amd64-agent", &[]).flag("--push-retry-seconds", "5");
    let farm = Farm::start_with(tmp.path(), Some(&registry.addr), &[agent], &["--max-attempts", "1"]).unwrap();
    farm.wait_for_agents(1).unwrap();
    let ctx = dockerfile_context(tmp.path(), "ctx", &slow_dockerfile(&base, 0));
    let tag = format!("{}/faults/down:1", registry.addr);
    let mut build = RunningBuild::start(
        &farm,
        &["build", "--platform", "linux/amd64", "-t", &tag, "--push", "--progress", "plain", &ctx],
    );
    build.wait_for("sleep 4", Duration::from_secs(120));
    registry.stop();
    let stopped = Instant::now();
    let (code, out) = build.finish(Duration::from_secs(60));
    assert_ne!(code, Some(0), "a push that never gets through fails the build:\n{out}");
    assert!(stopped.elapsed() < Duration::from_secs(45), "it fails within the retry time: {:?}", stopped.elapsed());
    assert!(out.contains(&format!("registry {} unreachable, retrying (attempt 1", registry.addr)), "{out}");
    assert!(
        out.contains(&format!("registry {} unreachable for 5s", registry.addr)),
        "the error names the registry:\n{out}"
    );
    assert!(out.contains("gave up after 1 attempts"), "{out}");
}

/// A process's resident set, from /proc (kB): `VmRSS` or `VmHWM` (peak).
fn memory_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_log_flood_of_one_byte_lines_keeps_the_agent_small() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (registry, base) = setup(tmp.path());
    let farm = Farm::start(tmp.path(), &registry, &[AgentSpec::new("amd64-agent", &[])]).unwrap();
    farm.wait_for_agents(1).unwrap();
    let pid = farm.agents[0].pid();
    let idle = memory_kb(pid, "VmRSS");
    // 100 million one-byte lines: the old cap counted bytes only.
    let ctx = dockerfile_context(tmp.path(), "ctx", &format!("FROM {base}\nRUN yes | head -c 200000000\n"));
    let tag = format!("{}/faults/flood:1", registry.addr);
    let started = Instant::now();
    let out =
        farm.braid(&["build", "--platform", "linux/amd64", "-t", &tag, "--push", "--progress", "plain", &ctx]).unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the flooding build succeeds:\n{}",
        text.chars().rev().take(3000).collect::<String>()
    );
    eprintln!("flood build took {:?}", started.elapsed());
    let peak = memory_kb(pid, "VmHWM");
    assert!(peak < 300 * 1024, "the agent peaked at {peak} kB (idle {idle} kB)");
    let settled = eventually(Duration::from_secs(30), "the agent to return to its idle footprint", || {
        let now = memory_kb(pid, "VmRSS");
        (now < idle + 64 * 1024).then_some(now)
    })
    .unwrap();
    eprintln!("agent rss: idle {idle} kB, peak {peak} kB, after {settled} kB");
    let logs = farm.braid(&["logs", &farm_build_id(&text), "--format", "json"]).unwrap();
    let events = String::from_utf8_lossy(&logs.stdout);
    let notice = events.lines().find(|l| l.contains("more log lines") && l.contains("dropped")).unwrap_or_else(|| {
        panic!("no notice of the dropped lines in {} events", events.lines().count());
    });
    let dropped: u64 = notice.split("braid: ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(dropped > 90_000_000, "the notice counts the dropped lines: {notice}");
}

/// The build id from `#2 build ID submitted`.
fn farm_build_id(stderr: &str) -> String {
    let line = stderr.lines().find(|l| l.starts_with("#2 build ")).unwrap();
    line.split_whitespace().nth(2).unwrap().to_owned()
}

/// The mount points under `dir` in this process's mount table.
fn mounts_under(dir: &Path) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let prefix = format!("{}/", dir.display());
    table.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&prefix)).map(str::to_owned).collect()
}

/// Every path under `dir` named `name`.
fn find_named(dir: &Path, name: &str) -> Vec<std::path::PathBuf> {
    let out = std::process::Command::new("find").arg(dir).args(["-xdev", "-name", name]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(Into::into).collect()
}

#[test]
fn a_killed_agent_leaves_no_job_dir_credentials_or_mounts_after_its_restart() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (registry, base) = setup(tmp.path());
    let mut farm = Farm::start(tmp.path(), &registry, &[AgentSpec::new("amd64-agent", &[])]).unwrap();
    farm.wait_for_agents(1).unwrap();
    let work = tmp.path().join("amd64-agent");
    // Where the agent keeps its secrets: its own directory on a tmpfs.
    let name = braid_shared::Digest::of(work.as_os_str().as_encoded_bytes()).hex()[..16].to_owned();
    let secrets = ["/run", "/dev/shm"]
        .iter()
        .map(|t| Path::new(t).join("braid-agent-secrets").join(&name))
        .find(|p| p.is_dir())
        .expect("the agent's secrets directory on /run or /dev/shm");
    let ctx = dockerfile_context(tmp.path(), "ctx", &format!("FROM {base}\nRUN echo started && sleep 30\n"));
    let tag = format!("{}/faults/killed:1", registry.addr);
    let mut build = RunningBuild::start(
        &farm,
        &["build", "--platform", "linux/amd64", "-t", &tag, "--push", "--progress", "plain", &ctx],
    );
    let build_id = build.build_id();
    build.wait_for("started", Duration::from_secs(120));
    // Mid-build: the login is on the tmpfs, never under the work dir.
    assert_eq!(find_named(&secrets, "auth.json").len(), 1, "one job's login in {}", secrets.display());
    assert!(find_named(&work, "auth.json").is_empty(), "no login under the work dir");
    let mounted = mounts_under(&work);
    farm.signal_agent("amd64-agent", "KILL");
    farm.wait_agent_exit("amd64-agent", Duration::from_secs(10)).unwrap();
    let jobs: Vec<_> = std::fs::read_dir(work.join("jobs")).unwrap().collect();
    assert!(!jobs.is_empty(), "the killed agent left its job directory");
    assert!(!mounted.is_empty(), "the killed builder left mounts under the work dir");
    // No new attempt of the job after the restart: only leftovers are looked at.
    assert!(farm.braid(&["cancel", &build_id]).unwrap().status.success());

    let before = farm.log("amd64-agent").matches("agent starting").count();
    farm.restart_agent("amd64-agent").unwrap();
    eventually(Duration::from_secs(30), "the agent to start again", || {
        (farm.log("amd64-agent").matches("agent starting").count() > before).then_some(())
    })
    .unwrap();
    let left: Vec<_> =
        std::fs::read_dir(work.join("jobs")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "no job directory after the restart: {left:?}");
    assert!(find_named(&work, "auth.json").is_empty(), "no login under the work dir");
    assert!(find_named(&secrets, "auth.json").is_empty(), "no login left on the tmpfs");
    let mounts = mounts_under(&work);
    assert!(mounts.is_empty(), "no mount left under the work dir (had {mounted:?}): {mounts:?}");
    drop(build);
}
