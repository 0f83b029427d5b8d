//! A full data directory: the coordinator on an 8 MiB tmpfs filled while a
//! build runs and clients upload. Clients are refused with the reason, the
//! agent stays connected, `/readyz` says not ready until space returns, the
//! build then ends as it should, and a restart shows exactly what the
//! client saw, with contiguous event numbers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use braid_tests::{AgentSpec, Farm, Registry, RunningBuild, dockerfile_context, eventually, require_environment};

/// A tmpfs mounted for the test, unmounted when dropped (also when the
/// test fails), after everything declared later is dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("mount(8) from util-linux: apt-get install mount");
        assert!(out.status.success(), "mounting a tmpfs needs root: {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs(path.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success());
        if !ok {
            // Something still holds a file open: detach it anyway.
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// `/readyz`'s HTTP status and body.
fn readyz(farm: &Farm) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", &format!("http://{}/readyz", farm.http)])
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = body.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_owned())
}

/// Fills the file system of `dir` with one file until it is full; its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xa5u8; 64 << 10];
    for _ in 0..10_000 {
        if let Err(e) = file.write_all(&chunk).and_then(|()| file.sync_all()) {
            assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
            // Whatever a partial write left: fill the last bytes too.
            while file.write_all(&[0u8; 512]).is_ok() {}
            return path;
        }
    }
    panic!("{} never filled up", dir.display());
}

fn assert_refused_for_space(out: &Output, what: &str) {
    let text = text(out);
    assert!(!out.status.success(), "{what} is refused while the disk is full:\n{text}");
    assert!(text.contains("coordinator data dir full (") && text.contains(" bytes free)"), "{what}:\n{text}");
    // The coordinator's message alone (its code, ResourceExhausted, is not printed).
    assert!(text.contains("error: coordinator data dir full ("), "{what}:\n{text}");
    assert!(!text.contains("i/o error"), "{what}:\n{text}");
}

#[test]
fn a_full_data_dir_refuses_clients_keeps_agents_and_loses_nothing() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("coordinator");
    let _tmpfs = Tmpfs::mount(&data, "8m");
    let registry = Registry::start(&tmp.path().join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    let mut farm = Farm::start(tmp.path(), &registry, &[AgentSpec::new("amd64-a", &[])]).unwrap();
    farm.wait_for_agents(1).unwrap();

    // A build that logs, pauses (the disk fills meanwhile), logs and ends.
    let dockerfile = format!(
        "FROM {base}\nRUN for i in $(seq 1 100); do echo line-$i; done; sleep 6; \
         for i in $(seq 101 300); do echo line-$i; done\n"
    );
    let ctx = dockerfile_context(tmp.path(), "ctx", &dockerfile);
    let tag = format!("{}/disk/a:1", registry.addr);
    let mut build = RunningBuild::start(
        &farm,
        &["build", "--platform", "linux/amd64", "-t", &tag, "--push", "--progress", "plain", &ctx],
    );
    let build_id = build.build_id();
    build.wait_for("line-100", Duration::from_secs(120));
    let filler = fill(&data);

    // A new context (its upload needs space) and a build of a stored one
    // (its submit needs space): both refused with the reason.
    let other = dockerfile_context(tmp.path(), "other", &format!("FROM {base}\nCOPY blob /blob\n"));
    let noise: Vec<u8> = (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(Path::new(&other).join("blob"), &noise).unwrap();
    let other_tag = format!("{}/disk/b:1", registry.addr);
    let upload = farm.braid(&["build", "--platform", "linux/amd64", "-t", &other_tag, "--push", &other]).unwrap();
    assert_refused_for_space(&upload, "a context upload");
    let again = farm.braid(&["build", "--platform", "linux/amd64", "-t", &tag, "--push", &ctx]).unwrap();
    assert_refused_for_space(&again, "a submit");

    let (code, body) = readyz(&farm);
    assert_eq!(code, 503, "not ready while full: {body}");
    assert!(body.contains("coordinator data dir full"), "{body}");
    assert_eq!(farm.metric("braid_store_writable"), 0.0);
    assert!(farm.metric("braid_store_write_errors_total") >= 1.0);

    // The job ends meanwhile; the client is shown nothing that is not stored.
    eventually(Duration::from_secs(120), "the agent to finish the job", || {
        farm.log("amd64-a").contains("job done").then_some(())
    })
    .unwrap();
    eventually(Duration::from_secs(60), "the build to succeed in memory", || {
        farm.log("coordinator").contains("build succeeded").then_some(())
    })
    .unwrap();
    assert!(build.child.try_wait().unwrap().is_none(), "the follower waits for the stored end");
    // Listed as stored, not as memory has it: a restart now would show the same.
    let listed = text(&farm.braid(&["builds"]).unwrap());
    assert!(listed.contains(&build_id) && listed.contains("running") && !listed.contains("succeeded"), "{listed}");
    // A history is what is stored, at once, not a wait for room.
    let mut history = Command::new(braid_tests::bin("braid"));
    history.args(["--coordinator", &farm.url, "logs", &build_id]);
    let history = braid_tests::run_with_timeout(&mut history, Duration::from_secs(20)).unwrap();
    assert!(history.status.success(), "{}", text(&history));
    assert!(text(&history).contains("line-100"), "{}", text(&history));

    // Room again: ready, and the follower gets every line and the end.
    std::fs::remove_file(&filler).unwrap();
    eventually(Duration::from_secs(20), "/readyz to be 200 again", || (readyz(&farm).0 == 200).then_some(())).unwrap();
    assert_eq!(farm.metric("braid_store_writable"), 1.0);
    let (code, out) = build.finish(Duration::from_secs(60));
    assert_eq!(code, Some(0), "the build succeeds once its events are stored:\n{out}");
    assert!(out.contains("line-300"), "{out}");
    let retried = farm.braid(&["build", "--platform", "linux/amd64", "-t", &other_tag, "--push", &other]).unwrap();
    assert!(retried.status.success(), "a refused build goes through once there is room:\n{}", text(&retried));

    // The agent never lost its session over the full disk.
    let log = farm.log("coordinator");
    assert_eq!(log.matches("agent connected").count(), 1, "{log}");

    // A restart shows what the client saw: every event once, in order, to the end.
    farm.crash_coordinator();
    farm.start_coordinator().unwrap();
    let logs = farm.braid(&["logs", &build_id, "--format", "json"]).unwrap();
    assert!(logs.status.success(), "{}", text(&logs));
    let events: Vec<serde_json::Value> =
        String::from_utf8_lossy(&logs.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "contiguous from 1");
    assert_eq!(events.last().unwrap()["state"], "succeeded");
    let lines = events.iter().filter(|e| e["line"].as_str().is_some_and(|l| l.starts_with("line-"))).count();
    assert_eq!(lines, 300, "every log line, once");
    let builds = farm.braid(&["builds"]).unwrap();
    let listed = text(&builds);
    assert_eq!(listed.matches("succeeded").count(), 2, "the refused builds never existed:\n{listed}");
    assert!(!listed.contains("running") && !listed.contains("queued"), "{listed}");
}
