//! What operators see and steer: `braid agents`, cordon, drain, listings
//! that fit 80 columns, Prometheus metrics scraped by a real Prometheus and
//! checked by promtool, and the dashboard in headless Chromium.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use braid_tests::{
    AgentSpec, Farm, Proc, Registry, eventually, free_port, require, require_environment, run_with_timeout,
};

fn stdout(out: &std::process::Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_fits_80(text: &str) {
    for line in text.lines() {
        assert!(line.chars().count() <= 80, "wider than 80 columns: {line:?}");
    }
}

fn agent_state(farm: &Farm, name: &str) -> String {
    let agents: serde_json::Value =
        serde_json::from_str(&stdout(&farm.braid(&["agents", "--format", "json"]).unwrap())).unwrap();
    agents.as_array().unwrap().iter().find(|a| a["name"] == name).unwrap()["state"].as_str().unwrap().to_owned()
}

/// Chromium, headless, as this machine's network allows it.
fn chromium(profile: &Path) -> Command {
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=8000",
        "--window-size=1200,900",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

#[test]
fn operators_see_and_steer_the_farm() {
    require_environment();
    require("chromium", "run `bash tests/env/setup.sh setup` as root (Debian package chromium)");
    require("prometheus", "run `bash tests/env/setup.sh setup` as root (Debian package prometheus)");
    require("promtool", "run `bash tests/env/setup.sh setup` as root (Debian package prometheus)");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let agents = [AgentSpec::new("amd64-agent", &[]).slots(2), AgentSpec::new("arm64-agent", &["linux/arm64"])];
    let farm = Farm::start(dir, &registry, &agents).unwrap();
    farm.wait_for_agents(2).unwrap();

    // A finished two-platform build for the listings and the timeline.
    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\nCOPY Dockerfile /\n").unwrap();
    let meta = dir.join("meta.json");
    let tag = format!("{}/ops/app:1", registry.addr);
    let out = farm
        .braid(&[
            "build",
            "--platform",
            "linux/amd64,linux/arm64",
            "-t",
            &tag,
            "--push",
            "--metadata-file",
            meta.to_str().unwrap(),
            ctx.to_str().unwrap(),
        ])
        .unwrap();
    stdout(&out);
    let build_id =
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(&meta).unwrap()).unwrap()["braid.build.id"]
            .as_str()
            .unwrap()
            .to_owned();

    // Listings, in tables that fit 80 columns and in JSON.
    let table = stdout(&farm.braid(&["agents"]).unwrap());
    assert_fits_80(&table);
    assert!(table.contains("amd64-agent") && table.contains("~linux/arm64"), "emulated platforms marked:\n{table}");
    let agents: serde_json::Value =
        serde_json::from_str(&stdout(&farm.braid(&["agents", "--format", "json"]).unwrap())).unwrap();
    let arm = agents.as_array().unwrap().iter().find(|a| a["name"] == "arm64-agent").unwrap();
    assert_eq!(arm["platforms"], serde_json::json!(["linux/arm64"]));
    assert_eq!(arm["state"], "idle");
    assert_eq!(arm["backend"], "buildah");
    check_agents_health(&farm, &table);
    for args in [vec!["builds"], vec!["inspect", build_id.as_str()], vec!["token", "list"]] {
        assert_fits_80(&stdout(&farm.braid(&args).unwrap()));
    }
    let logs = stdout(&farm.braid(&["logs", &build_id, "--platform", "linux/arm64"]).unwrap());
    assert!(logs.contains("[linux/arm64]") && !logs.contains("[linux/amd64]"), "{logs}");

    // Cordon: nothing new lands there until uncordoned.
    assert!(stdout(&farm.braid(&["cordon", "arm64-agent"]).unwrap()).contains("cordoned"));
    let (mut waiting, lines) = farm
        .braid_spawn(&["build", "--platform", "linux/arm64", "--progress", "plain", ctx.to_str().unwrap()])
        .unwrap();
    let line = eventually(Duration::from_secs(30), "the build to wait", || {
        lines.try_iter().find(|l| l.contains("waiting for an agent for linux/arm64"))
    })
    .unwrap();
    assert!(line.contains("linux/arm64"));
    assert_eq!(agent_state(&farm, "arm64-agent"), "cordoned");
    stdout(&farm.braid(&["uncordon", "arm64-agent"]).unwrap());
    let status =
        eventually(Duration::from_secs(60), "the build to finish", || waiting.try_wait().ok().flatten()).unwrap();
    assert!(status.success());
    // Drain returns once nothing runs there, and leaves it cordoned.
    assert!(stdout(&farm.braid(&["drain", "amd64-agent"]).unwrap()).contains("drained"));
    assert_eq!(agent_state(&farm, "amd64-agent"), "cordoned");
    stdout(&farm.braid(&["uncordon", "amd64-agent"]).unwrap());

    // Metrics: valid for promtool, and scraped by a real Prometheus.
    let metrics = Command::new("curl").args(["-fsS", &format!("http://{}/metrics", farm.http)]).output().unwrap();
    let text = stdout(&metrics);
    for name in [
        "braid_agents{platform=\"linux/arm64\",state=\"idle\"}",
        "braid_jobs_total{platform=\"linux/arm64\",result=\"succeeded\"}",
        "braid_job_phase_seconds_bucket{platform=\"linux/amd64\",phase=\"build\"",
        "braid_build_duration_seconds_count{result=\"succeeded\"}",
        "braid_context_bytes_received_total",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    // The same commit `--version` names, and a real one (the suite runs in a checkout).
    let version = stdout(&Command::new(braid_tests::bin("braid")).arg("--version").output().unwrap());
    let commit = version.trim().rsplit_once("(commit ").and_then(|(_, c)| c.strip_suffix(')')).unwrap().to_owned();
    assert!(commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit()), "{version}");
    let info = format!("braid_build_info{{version=\"{}\",commit=\"{commit}\"}} 1", env!("CARGO_PKG_VERSION"));
    assert!(text.contains(&info), "{info} missing from:\n{text}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    check_monitoring_examples(&text);
    check_process_metrics(&farm, &text);
    for agent in ["amd64-agent", "arm64-agent"] {
        let sample = |name: &str| -> f64 {
            let series = format!("{name}{{agent=\"{agent}\"}} ");
            let line = text.lines().find(|l| l.starts_with(&series)).unwrap_or_else(|| panic!("{series}in:\n{text}"));
            line[series.len()..].parse().unwrap()
        };
        assert!(sample("braid_agent_disk_free_bytes") > 0.0);
        let total = sample("braid_agent_memory_total_bytes");
        assert!(total > 0.0 && sample("braid_agent_memory_available_bytes") <= total);
        assert!(sample("braid_agent_load1") >= 0.0);
        assert!(sample("braid_agent_builder_cache_bytes") >= 0.0, "buildah's storage is measured");
        assert!(sample("braid_agent_running_jobs") <= 2.0);
        let seen = sample("braid_agent_last_heartbeat_timestamp_seconds");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!((now - seen).abs() < 60.0, "last heartbeat {seen}, now {now}");
    }
    // Plaintext agents have no certificate: the series is declared, with no sample.
    assert!(!text.contains("braid_agent_certificate_expiry_timestamp_seconds{"), "{text}");

    let prom_port = free_port();
    let prom_dir = dir.join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let config = prom_dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: braid\n    static_configs: [{{targets: ['{}']}}]\n", farm.http),
    )
    .unwrap();
    let _prometheus = Proc::spawn(
        "prometheus",
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", prom_dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}")),
        &dir.join("prometheus.log"),
    )
    .unwrap();
    let query = format!("http://127.0.0.1:{prom_port}/api/v1/query?query=braid_agents_connected");
    let value = eventually(Duration::from_secs(60), "Prometheus to scrape the coordinator", || {
        let out = Command::new("curl").args(["-fsS", &query]).output().ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["data"]["result"][0]["value"][1].as_str().map(str::to_owned)
    })
    .unwrap();
    assert_eq!(value, "2");

    // The dashboard: agents by platform, and the build's timeline, rendered
    // by Chromium with its scripts run.
    let profile = dir.join("chromium");
    let base = format!("http://{}", farm.http);
    let dom = run_with_timeout(chromium(&profile).arg("--dump-dom").arg(format!("{base}/")), Duration::from_secs(90))
        .unwrap();
    let index = String::from_utf8_lossy(&dom.stdout);
    assert!(index.contains("data-agent=\"amd64-agent\"") && index.contains("data-platform=\"linux/arm64\""), "{index}");
    assert!(index.contains(&build_id[..12]), "recent builds listed");
    let row = index.split("data-health=\"arm64-agent\">").nth(1).expect("agents' health table").split("</tr>").next();
    let cells: Vec<&str> = row.unwrap().split("<td").skip(1).map(|c| c.split_once('>').unwrap().1).collect();
    // Agent, state, disk free, builder cache, context cache, running, load, memory, certificate.
    assert!(cells[2].ends_with("G</td>") || cells[2].ends_with("M</td>"), "disk free: {cells:?}");
    assert!(cells[7].contains(" / "), "memory available / total: {cells:?}");
    assert_eq!(cells[8], "-</td>", "no certificate in plaintext: {cells:?}");
    let page = format!("{base}/builds/{build_id}");
    let dom = run_with_timeout(chromium(&profile).arg("--dump-dom").arg(&page), Duration::from_secs(90)).unwrap();
    let html = String::from_utf8_lossy(&dom.stdout);
    for platform in ["linux/amd64 · amd64-agent", "linux/arm64 · arm64-agent"] {
        assert!(html.contains(platform), "timeline lane for {platform}:\n{html}");
    }
    for phase in ["bar queued", "bar fetch", "bar build", "bar push", "bar verify", "bar merge"] {
        assert!(html.contains(phase), "timeline has {phase} bars");
    }
    assert!(html.contains("[linux/arm64]"), "the build's log is shown");
    let artifacts = braid_tests::workspace().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("dashboard-build.png");
    let out = run_with_timeout(
        chromium(&profile).arg(format!("--screenshot={}", shot.display())).arg(&page),
        Duration::from_secs(90),
    )
    .unwrap();
    assert!(out.status.success() && shot.metadata().unwrap().len() > 10_000, "screenshot written");
    println!("dashboard screenshot: {}", shot.display());
}

/// The process collector's series, as Prometheus' client libraries name
/// them, describe the coordinator process itself.
fn check_process_metrics(farm: &Farm, text: &str) {
    let sample = |name: &str| -> f64 {
        let line =
            text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}:\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(text.contains("# TYPE process_cpu_seconds_total counter"), "{text}");
    assert!(sample("process_cpu_seconds_total") > 0.0, "the coordinator has run a build");
    let rss = sample("process_resident_memory_bytes");
    assert!(rss > 1e6 && sample("process_virtual_memory_bytes") >= rss, "{text}");
    assert!(sample("process_open_fds") >= 3.0 && sample("process_max_fds") >= sample("process_open_fds"));
    // The coordinator's own start, not the test's: within the farm's life.
    let pid = farm.coordinator.as_ref().unwrap().pid();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as f64;
    assert!((sample("process_open_fds") - fds).abs() < 20.0, "{fds} fds in /proc/{pid}/fd");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let started = sample("process_start_time_seconds");
    assert!(started <= now && now - started < 600.0, "started {started}, now {now}");
}

/// Each agent's health report reaches `braid agents`: DISK and CERT in the
/// table, every field in JSON, with values this host can have.
fn check_agents_health(farm: &Farm, table: &str) {
    let header = table.lines().next().unwrap();
    assert!(header.contains(" DISK ") && header.contains(" CERT "), "{header}");
    let row = table.lines().find(|l| l.starts_with("arm64-agent ")).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    // NAME STATE SLOTS SEEN DISK CERT BUILDER PLATFORMS
    assert!(cells[4].ends_with(['K', 'M', 'G', 'T', 'P']), "disk free in binary units: {row}");
    assert_eq!(cells[5], "-", "a plaintext agent has no certificate: {row}");
    let agents: serde_json::Value =
        serde_json::from_str(&stdout(&farm.braid(&["agents", "--format", "json"]).unwrap())).unwrap();
    for a in agents.as_array().unwrap() {
        let h = &a["health"];
        assert!(h["disk_free_bytes"].as_u64().unwrap() > 0, "{a}");
        let total = h["memory_total_bytes"].as_u64().unwrap();
        assert!(total > 0 && h["memory_available_bytes"].as_u64().unwrap() <= total, "{a}");
        assert!(h["load1"].as_f64().unwrap() >= 0.0, "{a}");
        assert!(h["builder_cache_bytes"].is_u64() && h["context_cache_bytes"].is_u64(), "buildah measured: {a}");
        assert!(h["running_jobs"].as_u64().unwrap() <= a["slots"].as_u64().unwrap(), "{a}");
        assert!(h["certificate_not_after"].is_null() && h["certificate_days_left"].is_null(), "{a}");
        assert_eq!(h["certificate_expiring"], false, "{a}");
    }
}

/// examples/monitoring: the alert rules pass `promtool check rules` and their
/// own `promtool test rules` cases, and every braid metric they and the
/// Grafana dashboard name is one a real coordinator exports.
fn check_monitoring_examples(scraped: &str) {
    let dir = braid_tests::workspace().join("examples/monitoring");
    for args in [vec!["check", "rules", "braid-alerts.yml"], vec!["test", "rules", "braid-alerts.test.yml"]] {
        let out = Command::new("promtool").args(&args).current_dir(&dir).output().unwrap();
        assert!(out.status.success(), "promtool {args:?}: {}", braid_tests::output_text(&out));
    }
    let mut named = std::collections::BTreeSet::new();
    for file in ["braid-alerts.yml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("braid_") {
            let tail = &rest[at..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            let name = &tail[..end];
            let base = ["_bucket", "_count", "_sum"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            named.insert(base.to_owned());
            rest = &tail[end..];
        }
    }
    assert!(named.len() >= 10, "{named:?}");
    for name in &named {
        assert!(scraped.contains(&format!("# HELP {name} ")), "{name} (named in examples/monitoring) is not exported");
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("grafana-dashboard.json")).unwrap()).unwrap();
    assert!(dashboard["panels"].as_array().unwrap().len() >= 8);
}
