//! Several coordinators on one real PostgreSQL: the leader killed in the
//! middle of a three-platform build, a leader stopped past its lease, the
//! database restarted under a build. Real processes, real signals, every
//! wait bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use braid_tests::ha::{self, Postgres};
use braid_tests::{
    AgentSpec, Farm, Registry, RunningBuild, dockerfile_context, eventually, require_environment, send_signal,
};

/// These tests time outages; one at a time on the machine's two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn setup(dir: &Path) -> (Registry, String, Postgres) {
    require_environment();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let pg = Postgres::start(dir).unwrap();
    (registry, base, pg)
}

/// The build's events as `braid logs --format json` gives them: their
/// sequence numbers in order.
fn seqs(farm: &Farm, build_id: &str) -> Vec<u64> {
    let out = farm.braid(&["logs", "--format", "json", build_id]).unwrap();
    assert!(out.status.success(), "braid logs: {}", braid_tests::output_text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"].as_u64().unwrap())
        .collect()
}

fn contiguous(seqs: &[u64]) {
    let want: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, want.as_slice(), "events numbered 1..N, no gap, no duplicate");
}

fn wait_agents(farm: &Farm, names: &[&str]) {
    eventually(Duration::from_secs(60), "the agents to connect", || {
        names.iter().all(|n| farm.log(n).contains("connected")).then_some(())
    })
    .unwrap();
}

#[test]
fn leader_killed_mid_three_platform_build_a_new_one_finishes_it() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (registry, base, pg) = setup(tmp.path());
    let agents = [
        AgentSpec::new("amd64-agent", &[]),
        AgentSpec::new("arm64-agent", &["linux/arm64"]),
        AgentSpec::new("armv7-agent", &["linux/arm/v7"]),
    ];
    let (farm, mut coordinators) = ha::start_farm(tmp.path(), &pg, &registry.addr, 3, &agents).unwrap();
    wait_agents(&farm, &["amd64-agent", "arm64-agent", "armv7-agent"]);
    let leader = ha::wait_leader(&coordinators, Duration::from_secs(10)).unwrap();
    // Followers are ready but say they follow, naming the leader.
    for (i, c) in coordinators.iter().enumerate().filter(|(i, _)| *i != leader) {
        let (code, body) = c.readyz().unwrap();
        assert_eq!(code, 200, "coordinator {i}: {body}");
        assert!(body.contains("follower") && body.contains(&coordinators[leader].url), "{body}");
        assert_eq!(c.metric("braid_leader"), Some(0.0));
    }
    let term = coordinators[leader].metric("braid_leader_term").unwrap();
    let status = farm.braid(&["status", "--format", "json"]).unwrap();
    assert!(status.status.success(), "{}", braid_tests::output_text(&status));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["leader"], true, "{status}");
    assert_eq!(status["store"], "postgres", "{status}");
    assert_eq!(status["store_healthy"], true, "{status}");
    assert_eq!(status["leader_address"], coordinators[leader].url.as_str(), "{status}");
    assert_eq!(status["term"].as_f64(), Some(term), "{status}");

    let dockerfile = format!("FROM {base}\nRUN for i in $(seq 1 40); do echo tick-$i; sleep 0.25; done\n");
    let ctx = dockerfile_context(tmp.path(), "ctx", &dockerfile);
    let tag = format!("{}/ha/kill:1", registry.addr);
    let mut build = RunningBuild::start(
        &farm,
        &[
            "build",
            "--platform",
            "linux/amd64,linux/arm64,linux/arm/v7",
            "-t",
            &tag,
            "--push",
            "--progress",
            "plain",
            &ctx,
        ],
    );
    let build_id = build.build_id();
    build.wait_for("tick-5", Duration::from_secs(180));
    let killed = Instant::now();
    send_signal(coordinators[leader].proc.as_ref().unwrap().pid(), "KILL");
    coordinators[leader].proc = None;
    let next = ha::wait_leader(&coordinators, Duration::from_secs(10)).unwrap();
    assert!(killed.elapsed() < Duration::from_secs(10), "a new leader within 10 s: {:?}", killed.elapsed());
    assert_ne!(next, leader);
    assert!(coordinators[next].metric("braid_leader_term").unwrap() > term, "a newer term");

    let (code, out) = build.finish(Duration::from_secs(300));
    assert_eq!(code, Some(0), "the following CLI moves to the new leader and the build succeeds:\n{out}");
    let seen: Vec<usize> = (1..=40).map(|n| out.matches(&format!("tick-{n}\n")).count()).collect();
    assert!(seen.iter().all(|&n| n == 3), "every tick once per platform: {seen:?}\n{out}");
    let index = registry.digest_of("ha/kill:1").expect("the index is pushed");
    let pushed: usize = coordinators.iter().map(|c| c.log_text().matches("index pushed").count()).sum();
    assert_eq!(pushed, 1, "the index lands once");
    let manifest = registry.manifest(&format!("ha/kill@{index}")).unwrap();
    assert_eq!(braid_tests::platform_manifests(&manifest).len(), 3, "{manifest}");
    contiguous(&seqs(&farm, &build_id));
}

/// Separate data directories, contexts in the registry (`blob_store`): a
/// context uploaded to a leader that is then killed is served by the next
/// leader, read back from the registry and verified, to a job that had not
/// fetched it yet.
#[test]
fn contexts_survive_the_leader_without_a_shared_disk() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (registry, base, pg) = setup(tmp.path());
    let agents = [AgentSpec::new("amd64-agent", &[]), AgentSpec::new("arm64-agent", &["linux/arm64"])];
    let store = format!("registry://{}/braid/contexts", registry.addr);
    let (farm, mut coordinators) =
        ha::start_farm_with(tmp.path(), &pg, &registry.addr, 3, &agents, Some(&store)).unwrap();
    wait_agents(&farm, &["amd64-agent", "arm64-agent"]);
    let leader = ha::wait_leader(&coordinators, Duration::from_secs(10)).unwrap();
    let ctx = dockerfile_context(tmp.path(), "ctx", &format!("FROM {base}\nRUN echo built-from-the-registry\n"));
    let first_tag = format!("{}/ha/blobs:amd64", registry.addr);
    let out = farm.braid(&["build", "--platform", "linux/amd64", "-t", &first_tag, "--push", &ctx]).unwrap();
    assert!(out.status.success(), "{}", braid_tests::output_text(&out));
    let tags = std::process::Command::new("curl")
        .args(["-fsS", &format!("http://{}/v2/braid/contexts/tags/list", registry.addr)])
        .output()
        .unwrap();
    let tags = String::from_utf8_lossy(&tags.stdout).into_owned();
    assert!(tags.contains("\"context-"), "the context is in the registry: {tags}");

    send_signal(coordinators[leader].proc.as_ref().unwrap().pid(), "KILL");
    coordinators[leader].proc = None;
    let next = ha::wait_leader(&coordinators, Duration::from_secs(15)).unwrap();
    assert_ne!(next, leader);
    let local = std::fs::read_dir(tmp.path().join(format!("coordinator-{next}/contexts")))
        .map(|d| d.filter_map(|e| e.ok()).filter(|e| e.path().extension().is_some_and(|x| x == "zst")).count())
        .unwrap_or(0);
    assert_eq!(local, 0, "the new leader's own data dir has no context");

    // The arm64 agent never fetched it: its job reads it from the new leader.
    let second_tag = format!("{}/ha/blobs:arm64", registry.addr);
    let out = farm
        .braid(&["build", "--platform", "linux/arm64", "-t", &second_tag, "--push", "--progress", "plain", &ctx])
        .unwrap();
    let text = braid_tests::output_text(&out);
    assert!(out.status.success(), "the build succeeds on the new leader:\n{text}");
    assert!(text.contains("built-from-the-registry"), "{text}");
    let log = coordinators[next].log_text();
    assert!(log.contains("context read from the blob_store registry"), "{log}");
    assert!(registry.digest_of("ha/blobs:arm64").is_some(), "the image is pushed");
}

#[test]
fn a_leader_stopped_past_its_lease_wakes_deposed_and_writes_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (registry, base, pg) = setup(tmp.path());
    let (farm, mut coordinators) =
        ha::start_farm(tmp.path(), &pg, &registry.addr, 3, &[AgentSpec::new("amd64-agent", &[])]).unwrap();
    wait_agents(&farm, &["amd64-agent"]);
    let old = ha::wait_leader(&coordinators, Duration::from_secs(10)).unwrap();
    let old_term = pg.number("SELECT term FROM braid_leader");
    // A build goes on while the leader is stopped: its agent keeps
    // sending lines the old leader would write if it could.
    let dockerfile = format!("FROM {base}\nRUN for i in $(seq 1 60); do echo tick-$i; sleep 0.2; done\n");
    let ctx = dockerfile_context(tmp.path(), "ctx", &dockerfile);
    let tag = format!("{}/ha/stop:1", registry.addr);
    let mut build = RunningBuild::start(
        &farm,
        &["build", "--platform", "linux/amd64", "-t", &tag, "--push", "--progress", "plain", &ctx],
    );
    let build_id = build.build_id();
    build.wait_for("tick-3", Duration::from_secs(120));
    let pid = coordinators[old].proc.as_ref().unwrap().pid();
    send_signal(pid, "STOP");
    let new = ha::wait_leader(&coordinators, Duration::from_secs(15)).unwrap();
    assert_ne!(new, old);
    let new_term = pg.number("SELECT term FROM braid_leader");
    assert!(new_term > old_term, "{new_term} > {old_term}");
    send_signal(pid, "CONT");
    let status = eventually(Duration::from_secs(15), "the old leader to exit", || {
        coordinators[old].proc.as_mut().unwrap().try_wait()
    })
    .unwrap();
    assert_eq!(status.code(), Some(75), "a deposed leader exits with 75");
    assert!(coordinators[old].log_text().contains("no longer the leader"), "{}", coordinators[old].log_text());
    coordinators[old].proc = None;
    // Nothing with its term after the new leader took over.
    let since = "(SELECT since FROM braid_leader)";
    for table in ["events", "builds"] {
        let n = pg.number(&format!("SELECT count(*) FROM {table} WHERE term = {old_term} AND written > {since}"));
        assert_eq!(n, 0, "{table}: rows of the deposed term written after the new leader's start");
    }
    let (code, out) = build.finish(Duration::from_secs(180));
    assert_eq!(code, Some(0), "{out}");
    assert!((1..=60).all(|n| out.matches(&format!("tick-{n}\n")).count() == 1), "{out}");
    contiguous(&seqs(&farm, &build_id));
    assert!(registry.digest_of("ha/stop:1").is_some());
}

#[test]
fn postgres_restarted_during_a_build_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (registry, base, mut pg) = setup(tmp.path());
    let (farm, coordinators) =
        ha::start_farm(tmp.path(), &pg, &registry.addr, 2, &[AgentSpec::new("amd64-agent", &[])]).unwrap();
    wait_agents(&farm, &["amd64-agent"]);
    let dockerfile = format!("FROM {base}\nRUN for i in $(seq 1 60); do echo tick-$i; sleep 0.2; done\n");
    let ctx = dockerfile_context(tmp.path(), "ctx", &dockerfile);
    let tag = format!("{}/ha/pgrestart:1", registry.addr);
    let mut build = RunningBuild::start(
        &farm,
        &["build", "--platform", "linux/amd64", "-t", &tag, "--push", "--progress", "plain", &ctx],
    );
    let build_id = build.build_id();
    build.wait_for("tick-5", Duration::from_secs(120));
    pg.restart(Duration::from_secs(1)).unwrap();
    let (code, out) = build.finish(Duration::from_secs(180));
    assert_eq!(code, Some(0), "the build rides out the database's restart:\n{out}");
    let wrong: Vec<u32> = (1..=60).filter(|n| out.matches(&format!("tick-{n}\n")).count() != 1).collect();
    assert!(wrong.is_empty(), "every line once; not so for {wrong:?}:\n{out}");
    contiguous(&seqs(&farm, &build_id));
    assert!(registry.digest_of("ha/pgrestart:1").is_some());
    ha::wait_leader(&coordinators, Duration::from_secs(15)).unwrap();
    let saw: usize =
        coordinators.iter().map(|c| c.log_text().matches("the lease could not be read or renewed").count()).sum();
    assert!(saw >= 1, "the outage was seen (and ridden out)");
}

#[test]
fn a_schema_newer_than_known_is_refused_naming_both_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let pg = Postgres::start(tmp.path()).unwrap();
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(braid_tests::bin("braid-coordinator"));
        cmd.args(["--insecure", "--listen", &format!("127.0.0.1:{}", braid_tests::free_port()), "--http-listen"])
            .arg(format!("127.0.0.1:{}", braid_tests::free_port()))
            .arg("--data-dir")
            .arg(tmp.path().join("data"))
            .args(extra)
            .args(["token", "create", "--role", "submit"]);
        braid_tests::run_with_timeout(&mut cmd, Duration::from_secs(60)).unwrap()
    };
    // A password in the URL is refused before anything connects, and not echoed.
    let out = run(&["--store", &pg.url().replace("braid@", "braid:hunter2@")]);
    let text = braid_tests::output_text(&out);
    assert!(!out.status.success() && text.contains("store_password_file") && !text.contains("hunter2"), "{text}");
    // The first start migrates (a token made offline goes into PostgreSQL).
    let out = run(&["--store", &pg.url()]);
    assert!(out.status.success(), "{}", braid_tests::output_text(&out));
    // Every migration ran, once each, in order (1..=known).
    let known = pg.number("SELECT max(version) FROM schema_version");
    assert!(known >= 1);
    assert_eq!(pg.number("SELECT count(DISTINCT version) FROM schema_version"), known, "one row per version");
    assert_eq!(pg.number("SELECT count(*) FROM tokens"), 1);
    // A newer coordinator moved the schema on: this one refuses to start.
    let newer = known + 5;
    pg.psql("braid", &format!("INSERT INTO schema_version (version) VALUES ({newer})")).unwrap();
    let out = run(&["--store", &pg.url()]);
    let text = braid_tests::output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains(&format!("schema is version {newer}, newer than this coordinator's {known}")), "{text}");
}

#[test]
fn a_leader_stopped_with_sigterm_gives_up_its_lease_at_once() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let pg = Postgres::start(tmp.path()).unwrap();
    let (_farm, mut coordinators) = ha::start_farm(tmp.path(), &pg, "127.0.0.1:1", 2, &[]).unwrap();
    let old = ha::wait_leader(&coordinators, Duration::from_secs(10)).unwrap();
    send_signal(coordinators[old].proc.as_ref().unwrap().pid(), "TERM");
    let status = eventually(Duration::from_secs(20), "the leader to stop", || {
        coordinators[old].proc.as_mut().unwrap().try_wait()
    })
    .unwrap();
    let exited_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    assert!(status.success(), "a stopping leader exits 0: {status:?}");
    assert!(coordinators[old].log_text().contains("lease given up"), "{}", coordinators[old].log_text());
    coordinators[old].proc = None;
    let next = ha::wait_leader(&coordinators, Duration::from_secs(10)).unwrap();
    assert_ne!(next, old);
    assert_eq!(pg.number("SELECT term FROM braid_leader"), 2);
    // The lease (3 s, renewed every 0.6 s) did not have to lapse: waiting
    // for it would have put the takeover 2.4 s or more after the exit.
    let since_ms = pg.number("SELECT (extract(epoch FROM since) * 1000)::bigint FROM braid_leader");
    assert!(since_ms - exited_ms < 2000, "taken over {} ms after the exit", since_ms - exited_ms);
}

/// Followers listen for gRPC too and answer every call with where the
/// leader is: a CLI and an agent given only a follower's address reach the
/// leader, and `braid status` against the follower says it follows.
#[test]
fn a_follower_sends_the_cli_and_agents_to_the_leader() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (registry, base, pg) = setup(tmp.path());
    let (mut farm, coordinators) = ha::start_farm(tmp.path(), &pg, &registry.addr, 2, &[]).unwrap();
    let leader = ha::wait_leader(&coordinators, Duration::from_secs(10)).unwrap();
    let follower = 1 - leader;
    assert!(coordinators[follower].log_text().contains("follower gRPC listening"));
    farm.url = coordinators[follower].url.clone();

    let status = farm.braid(&["status"]).unwrap();
    let text = braid_tests::output_text(&status);
    assert!(status.status.success(), "{text}");
    assert!(text.contains("role     follower"), "{text}");
    assert!(text.contains(&format!("leader   {}", coordinators[leader].url)), "{text}");

    farm.start_agents(&[AgentSpec::new("amd64-agent", &[])]).unwrap();
    wait_agents(&farm, &["amd64-agent"]);
    let log = farm.log("amd64-agent");
    assert!(log.contains("a follower answered: dialing the leader it named"), "{log}");

    let ctx = dockerfile_context(tmp.path(), "ctx", &format!("FROM {base}\nRUN echo via-the-follower\n"));
    let tag = format!("{}/ha/redirect:1", registry.addr);
    let out = farm.braid(&["build", "-t", &tag, "--push", "--progress", "plain", &ctx]).unwrap();
    let text = braid_tests::output_text(&out);
    assert!(out.status.success(), "a CLI given only a follower builds on the leader:\n{text}");
    assert!(text.contains("via-the-follower"), "{text}");
    assert!(registry.digest_of("ha/redirect:1").is_some(), "the image is pushed");
}

/// Separate data directories, `blob_store` set: the blobs an agent uploads
/// for an `--output type=oci` export are pushed to the registry too, so
/// after the leader is killed -9 the next one, whose own data dir has none of
/// them, reads them back (verified) instead of asking the agent again, and
/// serves the export.
#[test]
fn export_blobs_survive_the_leader_without_a_shared_disk() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (registry, base, pg) = setup(tmp.path());
    let store = format!("registry://{}/braid/blobs", registry.addr);
    let (farm, mut coordinators) =
        ha::start_farm_with(tmp.path(), &pg, &registry.addr, 2, &[AgentSpec::new("amd64-agent", &[])], Some(&store))
            .unwrap();
    wait_agents(&farm, &["amd64-agent"]);
    let leader = ha::wait_leader(&coordinators, Duration::from_secs(10)).unwrap();
    let ctx = dockerfile_context(tmp.path(), "ctx", &format!("FROM {base}\nRUN echo exported > /out.txt\n"));
    let first = tmp.path().join("first.tar");
    let out = farm
        .braid(&["build", "--platform", "linux/amd64", "--output", &format!("type=oci,dest={}", first.display()), &ctx])
        .unwrap();
    assert!(out.status.success(), "{}", braid_tests::output_text(&out));
    // The layout's root manifest is in the registry repository, by digest.
    let index = std::process::Command::new("tar").arg("xOf").arg(&first).arg("index.json").output().unwrap();
    let index: serde_json::Value = serde_json::from_slice(&index.stdout).unwrap();
    let root = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
    let head = std::process::Command::new("curl")
        .args(["-fsSI", &format!("http://{}/v2/braid/blobs/blobs/{root}", registry.addr)])
        .output()
        .unwrap();
    assert!(head.status.success(), "{root} is in the blob_store repository: {}", braid_tests::output_text(&head));

    send_signal(coordinators[leader].proc.as_ref().unwrap().pid(), "KILL");
    coordinators[leader].proc = None;
    let next = ha::wait_leader(&coordinators, Duration::from_secs(15)).unwrap();
    assert_ne!(next, leader);
    let second = tmp.path().join("second.tar");
    let out = farm
        .braid(&[
            "build",
            "--platform",
            "linux/amd64",
            "--output",
            &format!("type=oci,dest={}", second.display()),
            &ctx,
        ])
        .unwrap();
    assert!(out.status.success(), "the export is served by the new leader: {}", braid_tests::output_text(&out));
    let listing = std::process::Command::new("tar").arg("tf").arg(&second).output().unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    assert!(listing.contains("index.json") && listing.contains("blobs/sha256/"), "{listing}");
    let log = coordinators[next].log_text();
    assert!(log.contains("export blob read from the blob_store registry"), "{log}");
}
