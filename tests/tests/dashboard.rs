//! The dashboard in a real headless Chromium, driven over the DevTools
//! protocol (`braid_tests::browser`): live timeline bars that grow between
//! two captures, a failed job's building phase, a queued job's bar, the
//! time axis, one card per agent with its platforms, UTC ISO-8601 times,
//! filters and pages that narrow the builds list, and the operate actions
//! (cancel, cordon) from the page, confirmed by `braid inspect` and
//! `braid agents`; a read-only (submit token) view has no buttons and its
//! actions are refused with 403.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use braid_tests::browser::{Browser, Rect, Tab};
use braid_tests::{
    AgentSpec, Farm, Registry, RunningBuild, dockerfile_context, eventually, offline_token, require,
    require_environment,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn inspect(farm: &Farm, build_id: &str) -> Value {
    let out = farm.braid(&["inspect", build_id, "--format", "json"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn agent_state(farm: &Farm, name: &str) -> String {
    let out = farm.braid(&["agents", "--format", "json"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let agents: Value = serde_json::from_slice(&out.stdout).unwrap();
    agents.as_array().unwrap().iter().find(|a| a["name"] == name).unwrap()["state"].as_str().unwrap().to_owned()
}

/// `curl` against the coordinator's HTTP port: the status code and body.
fn curl(farm: &Farm, args: &[&str], path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .arg(format!("http://{}{path}", farm.http))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_owned())
}

fn texts(browser: &mut Browser, tab: &Tab, selector: &str) -> Vec<String> {
    let sel = serde_json::to_string(selector).unwrap();
    let v = browser.eval(tab, &format!("[...document.querySelectorAll({sel})].map(e => e.textContent)")).unwrap();
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect()
}

fn count(browser: &mut Browser, tab: &Tab, selector: &str) -> usize {
    let sel = serde_json::to_string(selector).unwrap();
    browser.eval(tab, &format!("document.querySelectorAll({sel}).length")).unwrap().as_u64().unwrap() as usize
}

fn is_iso_utc(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20
        && s.chars().enumerate().all(|(i, c)| match i {
            4 | 7 => c == '-',
            10 => c == 'T',
            13 | 16 => c == ':',
            19 => c == 'Z',
            _ => c.is_ascii_digit(),
        })
}

/// Sets the builds list's filter form and submits it; waits for the list.
fn filter(browser: &mut Browser, tab: &Tab, fields: &[(&str, &str)]) {
    let mut script = String::from("(() => { const f = document.getElementById('filters'); f.reset();");
    for (name, value) in fields {
        script.push_str(&format!("f.elements[{:?}].value = {:?};", name, value));
    }
    script.push_str("document.querySelector('#builds tbody').replaceChildren(); f.requestSubmit(); return true; })()");
    browser.eval(tab, &script).unwrap();
    browser.wait_for(tab, "document.querySelectorAll('#builds tbody tr').length > 0", WAIT).unwrap();
}

#[test]
fn the_dashboard_in_a_real_browser() {
    require_environment();
    require("chromium", "run `bash tests/env/setup.sh setup` as root (Debian package chromium)");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    // Tokens made before the start; the plaintext farm needs none, but a
    // submit bearer sees the read-only view and an operate one operates.
    let data = dir.join("coordinator");
    let submit = offline_token(&data, "submit");
    let operate = offline_token(&data, "operate");
    // amd64-agent builds its native platform and reports what it emulates.
    let agents = [AgentSpec::new("amd64-agent", &[]), AgentSpec::new("arm64-agent", &["linux/arm64"])];
    let farm = Farm::start(dir, &registry, &agents).unwrap();
    farm.wait_for_agents(2).unwrap();

    // A finished build, and one whose RUN fails after a while.
    let quick = dockerfile_context(dir, "quick", "FROM scratch\nCOPY Dockerfile /\n");
    let tag = format!("{}/dash/quick:1", registry.addr);
    // Submitted with a token: its id is the build's submitter.
    let out =
        farm.braid(&["--token", &submit, "build", "--platform", "linux/arm64", "-t", &tag, "--push", &quick]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let failing = dockerfile_context(dir, "failing", &format!("FROM {base}\nRUN sleep 2 && exit 3\n"));
    let mut failed =
        RunningBuild::start(&farm, &["build", "--platform", "linux/amd64", "--progress", "plain", &failing]);
    let failed_id = failed.build_id();
    let (code, text) = failed.finish(Duration::from_secs(60));
    assert_ne!(code, Some(0), "{text}");
    // A build that runs (amd64-agent's one slot), and one queued behind it.
    let slow = dockerfile_context(dir, "slow", &format!("FROM {base}\nRUN sleep 1239\n"));
    let mut running = RunningBuild::start(&farm, &["build", "--platform", "linux/amd64", "--progress", "plain", &slow]);
    let running_id = running.build_id();
    running.wait_for("RUN sleep 1239", Duration::from_secs(60));
    let slow_tag = format!("{}/dash/queued:7", registry.addr);
    let mut queued = RunningBuild::start(&farm, &["build", "--platform", "linux/amd64", "-t", &slow_tag, &slow]);
    let queued_id = queued.build_id();
    assert_eq!(inspect(&farm, &queued_id)["state"], "queued");

    let base_url = format!("http://{}", farm.http);
    let mut browser = Browser::start(&dir.join("chromium"), &dir.join("chromium.log")).unwrap();
    let bearer = format!("Bearer {operate}");
    let tab = browser.tab(1280, 1000, &[("Authorization", &bearer)]).unwrap();
    let loaded = "document.body.dataset.loaded === 'yes'";

    // The running build: its bar grows between two captures, by its box and
    // by the pixels of its track.
    browser.open(&tab, &format!("{base_url}/builds/{running_id}"), loaded, WAIT).unwrap();
    let bar = "[data-platform='linux/amd64'] .bar.live";
    let track = "[data-platform='linux/amd64'] .track";
    browser.wait_for(&tab, &format!("document.querySelector(\"{bar}\") !== null"), WAIT).unwrap();
    // Two captures on the same time window (it steps up as the build runs on).
    let span = "document.querySelector('.axis .track').dataset.span";
    let mut grew = None;
    for _ in 0..3 {
        let window = browser.eval(&tab, span).unwrap();
        let first = browser.rect(&tab, bar).unwrap();
        let region = browser.rect(&tab, track).unwrap();
        let shot_1 = browser.screenshot(&tab, region).unwrap();
        std::thread::sleep(Duration::from_millis(2000));
        let second = browser.rect(&tab, bar).unwrap();
        let shot_2 = browser.screenshot(&tab, region).unwrap();
        if browser.eval(&tab, span).unwrap() == window {
            grew = Some((first, second, shot_1, shot_2));
            break;
        }
    }
    let (first, second, shot_1, shot_2) = grew.expect("two captures on one time window");
    assert!(second.width > first.width + 20.0, "the running bar grows: {first:?} then {second:?}");
    assert!(shot_1.len() > 100 && shot_1 != shot_2, "the track's pixels changed between the captures");
    let artifacts = braid_tests::workspace().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    std::fs::write(artifacts.join("dashboard-running-bar.png"), &shot_2).unwrap();
    // A time axis with ticks, UTC ISO-8601 times, durations in the table.
    assert!(count(&mut browser, &tab, ".axis .tick") >= 2, "time axis ticks");
    let times = texts(&mut browser, &tab, "#times dd");
    assert!(is_iso_utc(&times[0]), "submitted at {times:?}");
    let durations = texts(&mut browser, &tab, "#jobs tbody td.num");
    assert!(durations[0].ends_with('s'), "a job's duration: {durations:?}");
    assert_eq!(count(&mut browser, &tab, "#cancel"), 1, "an operator may cancel the running build");
    let page = Rect { x: 0.0, y: 0.0, width: 1280.0, height: 1000.0 };
    std::fs::write(artifacts.join("dashboard-build-running.png"), browser.screenshot(&tab, page).unwrap()).unwrap();

    // The failed build shows its building phase; the queued one its wait.
    browser.open(&tab, &format!("{base_url}/builds/{failed_id}"), loaded, WAIT).unwrap();
    assert_eq!(count(&mut browser, &tab, "[data-platform='linux/amd64'] .bar.build"), 1, "failed job's build phase");
    assert_eq!(count(&mut browser, &tab, "#cancel"), 0, "nothing to cancel in a failed build");
    std::fs::write(artifacts.join("dashboard-build-failed.png"), browser.screenshot(&tab, page).unwrap()).unwrap();
    browser.open(&tab, &format!("{base_url}/builds/{queued_id}"), loaded, WAIT).unwrap();
    let wait = browser.rect(&tab, "[data-platform='linux/amd64'] .bar.queued.live").unwrap();
    std::fs::write(artifacts.join("dashboard-build-queued.png"), browser.screenshot(&tab, page).unwrap()).unwrap();
    assert!(wait.width > 1.0, "a queued job's bar: {wait:?}");

    // The farm: one card per agent with its platforms, plurals, ISO times.
    browser.open(&tab, &format!("{base_url}/"), loaded, WAIT).unwrap();
    assert_eq!(count(&mut browser, &tab, "article.card"), 2, "one card per agent");
    std::fs::write(artifacts.join("dashboard-index.png"), browser.screenshot(&tab, page).unwrap()).unwrap();
    let native = texts(&mut browser, &tab, "article[data-agent='amd64-agent'] .chip:not(.emulated)");
    assert!(native.contains(&"linux/amd64".to_owned()), "{native:?}");
    let emulated = texts(&mut browser, &tab, "article[data-agent='amd64-agent'] .chip.emulated");
    assert!(!emulated.is_empty() && emulated.iter().all(|c| c.starts_with('~')), "emulated platforms: {emulated:?}");
    let arm = texts(&mut browser, &tab, "article[data-agent='arm64-agent'] .chip:not(.emulated)");
    assert_eq!(arm, vec!["linux/arm64"]);
    let summary = texts(&mut browser, &tab, "#summary");
    assert!(summary[0].starts_with("2 agents connected, 1 job queued, 1 job running"), "{summary:?}");
    let submitted = texts(&mut browser, &tab, "#builds tbody tr td:nth-child(6)");
    assert_eq!(submitted.len(), 4, "{submitted:?}");
    assert!(submitted.iter().all(|t| is_iso_utc(t)), "{submitted:?}");

    // Filters and pages narrow the list (server-side).
    filter(&mut browser, &tab, &[("state", "failed")]);
    let rows = texts(&mut browser, &tab, "#builds tbody tr th");
    assert_eq!(rows, vec![failed_id[..12].to_owned()]);
    filter(&mut browser, &tab, &[("platform", "linux/arm64")]);
    assert_eq!(count(&mut browser, &tab, "#builds tbody tr[data-state='succeeded']"), 1);
    assert_eq!(count(&mut browser, &tab, "#builds tbody tr"), 1);
    let submitter = &submit[6..18];
    filter(&mut browser, &tab, &[("submitter", submitter)]);
    assert_eq!(texts(&mut browser, &tab, "#builds tbody tr td:nth-child(5)"), vec![submitter.to_owned()]);
    filter(&mut browser, &tab, &[("tag", "dash/queued")]);
    assert_eq!(texts(&mut browser, &tab, "#builds tbody tr th"), vec![queued_id[..12].to_owned()]);
    filter(&mut browser, &tab, &[("q", &running_id[..8])]);
    assert_eq!(texts(&mut browser, &tab, "#builds tbody tr th"), vec![running_id[..12].to_owned()]);
    filter(&mut browser, &tab, &[("limit", "10"), ("state", "running")]);
    assert_eq!(count(&mut browser, &tab, "#builds tbody tr"), 1);
    // Two pages of 3 and 1 (the form offers 10 at least; the API takes any bound).
    browser.eval(&tab, "(() => { const o = document.createElement('option'); o.textContent = '3'; document.querySelector('#filters [name=limit]').append(o); return true; })()").unwrap();
    filter(&mut browser, &tab, &[("limit", "3")]);
    let page_1 = texts(&mut browser, &tab, "#builds tbody tr th");
    assert_eq!(page_1.len(), 3, "{page_1:?}");
    browser.eval(&tab, "document.getElementById('older').click(), true").unwrap();
    browser.wait_for(&tab, "document.getElementById('page').textContent.startsWith('page 2 · 1 build')", WAIT).unwrap();
    let page_2 = texts(&mut browser, &tab, "#builds tbody tr th");
    assert_eq!(page_2.len(), 1);
    assert!(!page_1.contains(&page_2[0]), "{page_1:?} then {page_2:?}");
    // Bad parameters are refused, naming them.
    let (code, body) = curl(&farm, &["-H", &format!("Authorization: {bearer}")], "/api/builds?limit=1000");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("limit: \\\"1000\\\" is not a number from 1 to 100"), "{body}");
    let (code, body) = curl(&farm, &[], "/api/builds?colour=red");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("colour: unknown parameter"), "{body}");

    // Operate from the page: cancel the queued build, cordon arm64-agent.
    filter(&mut browser, &tab, &[("state", "queued")]);
    browser
        .eval(
            &tab,
            &format!(
                "document.querySelector(\"tr[data-build='{queued_id}'] button[data-action=cancel]\").click(), true"
            ),
        )
        .unwrap();
    eventually(WAIT, "the cancel from the page", || (inspect(&farm, &queued_id)["state"] == "cancelled").then_some(()))
        .unwrap();
    browser
        .eval(
            &tab,
            "document.querySelector(\"article[data-agent='arm64-agent'] button[data-action=cordon]\").click(), true",
        )
        .unwrap();
    eventually(WAIT, "the cordon from the page", || (agent_state(&farm, "arm64-agent") == "cordoned").then_some(()))
        .unwrap();
    browser
        .wait_for(
            &tab,
            "document.querySelector(\"article[data-agent='arm64-agent']\").dataset.state === 'cordoned'",
            WAIT,
        )
        .unwrap();
    assert!(farm.log("coordinator").contains("agent cordon from the dashboard"), "audited in the log");
    let (_, text) = queued.finish(Duration::from_secs(30));
    assert!(text.contains("cancel"), "{text}");

    // Read-only: a submit token's view has no buttons; its actions are 403.
    let read_only = browser.tab(1280, 1000, &[("Authorization", &format!("Bearer {submit}"))]).unwrap();
    browser.open(&read_only, &format!("{base_url}/"), loaded, WAIT).unwrap();
    assert_eq!(browser.eval(&read_only, "document.body.dataset.operate").unwrap(), "no");
    assert_eq!(count(&mut browser, &read_only, "article.card"), 2);
    assert_eq!(count(&mut browser, &read_only, "button[data-action]"), 0, "no action buttons read-only");
    browser.open(&read_only, &format!("{base_url}/builds/{running_id}"), loaded, WAIT).unwrap();
    assert_eq!(count(&mut browser, &read_only, "#cancel"), 0);
    let submit_header = format!("Authorization: Bearer {submit}");
    for path in [format!("/api/builds/{running_id}/cancel"), "/api/agents/amd64-agent/cordon".to_owned()] {
        let (code, body) = curl(&farm, &["-X", "POST", "-H", &submit_header], &path);
        assert_eq!(code, 403, "{path}: {body}");
        assert!(body.contains("this needs operate"), "{body}");
    }
    // Without credentials (the open development mode) a write needs the
    // CSRF header from /api/session.
    let (code, body) = curl(&farm, &["-X", "POST"], "/api/agents/amd64-agent/cordon");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("x-braid-csrf"), "{body}");
    assert_eq!(agent_state(&farm, "amd64-agent"), "busy");
    assert_eq!(inspect(&farm, &running_id)["state"], "running");
    drop(browser);
    assert!(farm.braid(&["cancel", &running_id]).unwrap().status.success());
    let (_, text) = running.finish(Duration::from_secs(30));
    assert!(text.contains("cancel"), "{text}");
    eventually(Duration::from_secs(15), "the cancelled builder to stop", || {
        let out = Command::new("pgrep").args(["-f", "sleep 1239"]).output().ok()?;
        out.stdout.is_empty().then_some(())
    })
    .unwrap();
    // The cancelled attempt kept the phases it ran, up to the cancel.
    let (_, body) = curl(&farm, &[], &format!("/api/builds/{running_id}"));
    let cancelled: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(cancelled["state"], "cancelled");
    let phases: Vec<&str> =
        cancelled["jobs"][0]["phases"].as_array().unwrap().iter().map(|p| p["phase"].as_str().unwrap()).collect();
    assert_eq!(phases, ["queued", "fetch", "build"], "{cancelled}");
}
