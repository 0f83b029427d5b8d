//! Instructions per job: the coordinator under `valgrind --tool=callgrind`
//! (instruction counts repeat on a noisy machine, where times do not),
//! driven by the scale benchmark's fake agents at a low rate. Two runs that
//! differ only in the number of builds; the difference of their totals over
//! the difference of their builds is the cost of one scheduled job at steady
//! state (start-up, sessions and shutdown cancel out).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use braid_tests::{Proc, bin, eventually, free_port, send_signal};

use super::scale;

const AGENTS: usize = 10;
const RATE: f64 = 5.0;

/// The instructions callgrind counted for a coordinator that scheduled `builds`.
fn instructions(dir: &Path, builds: usize) -> anyhow::Result<u64> {
    std::fs::create_dir_all(dir)?;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let out = dir.join("callgrind.out");
    let mut cmd = Command::new("valgrind");
    cmd.args(["--tool=callgrind", "--quiet"])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(bin("braid-coordinator"))
        .args(["--insecure", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.join("coordinator"))
        .args(["--http-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--heartbeat-seconds", "30", "--agent-lost-seconds", "120"]);
    let log = dir.join("coordinator.log");
    let mut proc = Proc::spawn("coordinator", &mut cmd, &log)?;
    eventually(Duration::from_secs(120), "the coordinator under callgrind to listen", || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("coordinator listening").then_some(())
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let r = runtime.block_on(scale::run(&url, proc.pid(), AGENTS, builds, RATE))?;
    anyhow::ensure!(r.builds == builds, "only {} of {builds} builds were assigned under callgrind", r.builds);
    drop(runtime);
    send_signal(proc.pid(), "TERM");
    eventually(Duration::from_secs(120), "the coordinator to stop", || proc.try_wait())?;
    let text = std::fs::read_to_string(&out)?;
    text.lines()
        .find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no totals in {}", out.display()))
}

pub fn run(machine: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        Command::new("valgrind").arg("--version").output().is_ok_and(|o| o.status.success()),
        "valgrind is missing (apt-get install valgrind)"
    );
    let tmp = tempfile::tempdir()?;
    let (few, many) = (20usize, 80usize);
    let a = instructions(&tmp.path().join("few"), few)?;
    let b = instructions(&tmp.path().join("many"), many)?;
    let per_job = b.saturating_sub(a) as f64 / (many - few) as f64;
    println!("## Instructions per job (coordinator under callgrind)\n");
    println!("Machine: {machine}.\n");
    println!("| builds | coordinator instructions (millions) |");
    println!("| ---: | ---: |");
    println!("| {few} | {:.1} |", a as f64 / 1e6);
    println!("| {many} | {:.1} |", b as f64 / 1e6);
    println!("| **per scheduled job** | **{:.0} thousand** |", per_job / 1e3);
    println!(
        "\nOne-platform builds submitted at {RATE}/s to {AGENTS} fake agents that answer at once (the scale \
         benchmark's), SQLite store; (instructions of {many} builds - of {few}) / {}.\n",
        many - few
    );
    Ok(())
}
