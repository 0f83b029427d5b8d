//! `braid cache du` and `braid cache prune` on the real binaries: buildah
//! agents' per-platform storages measured and cleared through the
//! coordinator, a storage a running build holds left alone and named with
//! its job, an offline agent reported as such, bad flags refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Output;
use std::time::Duration;

use braid_tests::{AgentSpec, Farm, Registry, RunningBuild, dockerfile_context, output_text, require_environment};
use serde_json::Value;

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn agent<'a>(answers: &'a [Value], name: &str) -> &'a Value {
    answers.iter().find(|a| a["agent"] == name).unwrap_or_else(|| panic!("{name} in {answers:?}"))
}

fn storage<'a>(answer: &'a Value, name: &str) -> Option<&'a Value> {
    answer["storages"].as_array().unwrap().iter().find(|s| s["name"] == name)
}

#[test]
fn operators_measure_and_prune_agents_builder_caches() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let agents = [AgentSpec::new("cache-amd64", &[]).slots(2), AgentSpec::new("cache-arm64", &["linux/arm64"])];
    let mut farm = Farm::start(dir, &registry, &agents).unwrap();
    farm.wait_for_agents(2).unwrap();

    // A build on each agent fills its platform's storage.
    let ctx = dockerfile_context(dir, "warm", &format!("FROM {base}\nRUN echo warm > /warm\n"));
    let out = farm.braid(&["build", "--platform", "linux/amd64,linux/arm64", &ctx]).unwrap();
    assert!(out.status.success(), "{}", output_text(&out));

    let out = farm.braid(&["cache", "du", "--format", "json"]).unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let answers = json_lines(&out);
    let amd = storage(agent(&answers, "cache-amd64"), "linux-amd64").expect("amd64 storage").clone();
    let arm = storage(agent(&answers, "cache-arm64"), "linux-arm64").expect("arm64 storage").clone();
    assert!(amd["bytes"].as_u64().unwrap() > 100_000, "{amd}");
    assert!(arm["bytes"].as_u64().unwrap() > 100_000, "{arm}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((now - amd["last_used"].as_i64().unwrap()).abs() < 600, "{amd}");
    assert_eq!(agent(&answers, "cache-amd64")["backend"], "buildah");
    let table = String::from_utf8_lossy(&farm.braid(&["cache", "du"]).unwrap().stdout).into_owned();
    assert!(table.starts_with("AGENT") && table.contains("cache-arm64") && table.contains("Total: "), "{table}");

    // Bad flags are refused before anything is asked, naming the flag.
    let out = farm.braid(&["cache", "prune", "--force", "--filter", "type=regular"]).unwrap();
    assert!(!out.status.success() && output_text(&out).contains("--filter \"type=regular\""), "{}", output_text(&out));
    let out = farm.braid(&["cache", "prune", "--force", "--keep-storage", "ten"]).unwrap();
    assert!(!out.status.success() && output_text(&out).contains("--keep-storage"), "{}", output_text(&out));
    let out = farm.braid(&["cache", "du", "--agent", "no-such-agent"]).unwrap();
    assert!(!out.status.success() && output_text(&out).contains("no-such-agent"), "{}", output_text(&out));
    // Without a terminal to confirm on, --force is required.
    let out = farm.braid(&["cache", "prune", "--all"]).unwrap();
    assert!(!out.status.success() && output_text(&out).contains("--force"), "{}", output_text(&out));

    // While a build holds the amd64 storage, pruning skips it and names the job.
    let slow = dockerfile_context(dir, "slow", &format!("FROM {base}\nRUN echo started-slow && sleep 20\n"));
    let mut running = RunningBuild::start(&farm, &["build", "--platform", "linux/amd64", "--progress", "plain", &slow]);
    let build_id = running.build_id();
    running.wait_for("started-slow", Duration::from_secs(120));
    let out =
        farm.braid(&["cache", "prune", "--agent", "cache-amd64", "--all", "--force", "--format", "json"]).unwrap();
    assert_eq!(out.status.code(), Some(1), "a skipped storage: {}", output_text(&out));
    let answer = json_lines(&out).remove(0);
    let held = storage(&answer, "linux-amd64").unwrap();
    assert_eq!(held["pruned"], false, "{answer}");
    assert!(held["bytes"].as_u64().unwrap() > 100_000, "{answer}");
    let users = held["in_use_by"].as_array().unwrap();
    assert_eq!(users.len(), 1, "{answer}");
    let inspect: Value =
        serde_json::from_slice(&farm.braid(&["inspect", &build_id, "--format", "json"]).unwrap().stdout).unwrap();
    assert_eq!(users[0], inspect["jobs"][0]["job_id"], "the running job named: {answer}\n{inspect}");
    let (code, lines) = running.finish(Duration::from_secs(180));
    assert_eq!(code, Some(0), "the build under the prune finished: {lines}");

    // Idle now: --all clears the storage and says how much it freed.
    let out = farm.braid(&["cache", "prune", "--agent", "cache-amd64", "--all", "--force"]).unwrap();
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("cache-amd64: reclaimed ") && text.contains("from linux-amd64"), "{text}");
    assert!(!dir.join("cache-amd64/storage/linux-amd64").exists(), "the storage is gone");
    let answers = json_lines(&farm.braid(&["cache", "du", "--agent", "cache-amd64", "--format", "json"]).unwrap());
    assert!(storage(&answers[0], "linux-amd64").is_none(), "{answers:?}");
    // The other agent's storage was not touched.
    let answers = json_lines(&farm.braid(&["cache", "du", "--agent", "cache-arm64", "--format", "json"]).unwrap());
    assert_eq!(storage(&answers[0], "linux-arm64").unwrap()["bytes"], arm["bytes"]);

    // The cleared agent builds again (the base image is fetched anew).
    let out = farm.braid(&["build", "--platform", "linux/amd64", &ctx]).unwrap();
    assert!(out.status.success(), "{}", output_text(&out));

    // Without --all only unused images go; --filter until spares young storages.
    let out = farm.braid(&["cache", "prune", "--force", "--format", "json", "--filter", "until=1h", "--all"]).unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    for a in json_lines(&out) {
        assert_eq!(a["reclaimed_bytes"], 0, "nothing is an hour old: {a}");
    }
    let out = farm.braid(&["cache", "prune", "--agent", "cache-arm64", "--force", "--format", "json"]).unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let answer = json_lines(&out).remove(0);
    assert_eq!(storage(&answer, "linux-arm64").unwrap()["pruned"], true, "{answer}");

    // An agent that is gone is reported offline at once, not waited for.
    farm.signal_agent("cache-arm64", "TERM");
    farm.wait_agent_exit("cache-arm64", Duration::from_secs(60)).unwrap();
    let started = std::time::Instant::now();
    let out = farm.braid(&["cache", "du"]).unwrap();
    assert!(started.elapsed() < Duration::from_secs(20));
    let table = output_text(&out);
    assert!(out.status.success(), "{table}");
    assert!(table.contains("cache-arm64: offline (last seen 20"), "{table}");
    let out = farm.braid(&["cache", "prune", "--agent", "cache-arm64", "--force"]).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(output_text(&out).contains("cache-arm64: offline"), "{}", output_text(&out));
}

/// A docker-backend agent: its Engine's storage is not measured (`du` says
/// unknown), `prune` clears the Engine's BuildKit cache and images and says
/// how much it freed, refuses while one of the agent's jobs builds there,
/// and refuses `--keep-storage`, which the Engine's prune cannot honour.
#[test]
fn docker_backend_agents_prune_the_engines_cache() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let engine = braid_tests::DockerEngine::start(&dir.join("docker")).unwrap();
    let agents = [AgentSpec::new("cache-docker", &[])
        .backend("docker")
        .flag("--docker-host", &engine.host)
        .flag("--docker-cli", "/usr/bin/docker")];
    let farm = Farm::start(dir, &registry, &agents).unwrap();
    farm.wait_for_agents(1).unwrap();
    let ctx = dockerfile_context(dir, "warm", &format!("FROM {base}\nRUN head -c 3000000 /dev/urandom > /blob\n"));
    let out = farm.braid(&["build", "--platform", "linux/amd64", &ctx]).unwrap();
    assert!(out.status.success(), "{}", output_text(&out));

    let out = farm.braid(&["cache", "du", "--format", "json"]).unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let answer = json_lines(&out).remove(0);
    assert_eq!((answer["backend"].as_str(), answer["unknown"].as_bool()), (Some("docker"), Some(true)), "{answer}");

    let out = farm.braid(&["cache", "prune", "--force", "--keep-storage", "1g"]).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(output_text(&out).contains("keep_storage_bytes: the docker backend"), "{}", output_text(&out));

    // While its job builds on the Engine, nothing is pruned and the job is named.
    let slow = dockerfile_context(dir, "slow", &format!("FROM {base}\nRUN echo started-slow && sleep 15\n"));
    let mut running = RunningBuild::start(&farm, &["build", "--platform", "linux/amd64", "--progress", "plain", &slow]);
    let build_id = running.build_id();
    running.wait_for("started-slow", Duration::from_secs(120));
    let out = farm.braid(&["cache", "prune", "--force", "--all"]).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    let inspect: Value =
        serde_json::from_slice(&farm.braid(&["inspect", &build_id, "--format", "json"]).unwrap().stdout).unwrap();
    let job_id = inspect["jobs"][0]["job_id"].as_str().unwrap().to_owned();
    assert!(output_text(&out).contains(&format!("building this agent's jobs {job_id}")), "{}", output_text(&out));
    let (code, lines) = running.finish(Duration::from_secs(180));
    assert_eq!(code, Some(0), "{lines}");

    let out = farm.braid(&["cache", "prune", "--force", "--all", "--format", "json"]).unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let answer = json_lines(&out).remove(0);
    assert!(answer["reclaimed_bytes"].as_u64().unwrap() > 1_000_000, "the build's layers freed: {answer}");
    let names: Vec<&str> = answer["storages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["docker build cache", "docker images"], "{answer}");
}
