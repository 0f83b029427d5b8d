//! The shared layer cache (issue 22 item 4): agent A builds cold and exports
//! its cache to the registry; A is stopped and its storage removed; a fresh
//! agent B builds the same with `--cache-from`; a fresh agent C builds it
//! without a cache. All three in one run, on fresh farms, same registry.

use std::path::Path;
use std::time::Instant;

use braid_tests::{AgentSpec, Farm, Registry};

/// Iterations of the RUN loop: 13 to 20 s on the 2-core test VM, with its load.
const WORK: u64 = 10_000_000;

/// One build on a fresh one-agent farm in `dir`: seconds end to end, stderr.
fn timed_build(dir: &Path, registry: &Registry, agent: &'static str, extra: &[&str]) -> anyhow::Result<(f64, String)> {
    let farm = Farm::start(dir, registry, &[AgentSpec::new(agent, &[])])?;
    farm.wait_for_agents(1)?;
    let ctx = dir.parent().map(|p| p.join("ctx")).unwrap_or_default();
    let tag = format!("{}/bench/cache-{agent}:1", registry.addr);
    let mut args = vec!["build", "--platform", "linux/amd64", "-t", &tag, "--push", "--progress", "plain"];
    args.extend_from_slice(extra);
    let ctx = ctx.display().to_string();
    args.push(&ctx);
    let start = Instant::now();
    let out = farm.braid(&args)?;
    let seconds = start.elapsed().as_secs_f64();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    anyhow::ensure!(out.status.success(), "braid build on {agent} failed: {log}");
    drop(farm);
    // The agent is stopped: its storage goes, so nothing is cached locally.
    std::fs::remove_dir_all(dir)?;
    Ok((seconds, log))
}

pub fn run(machine: &str) -> anyhow::Result<()> {
    braid_tests::require_environment();
    let tmp = tempfile::tempdir()?;
    let registry = Registry::start(&tmp.path().join("registry"))?;
    let base = registry.push_base_image("base/busybox:latest")?;
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx)?;
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {base}\nRUN i=0; while [ $i -lt {WORK} ]; do i=$((i+1)); done; echo $i > /n\n"),
    )?;
    let cache = format!("{}/bench/cache", registry.addr);
    let to = format!("type=registry,ref={cache},mode=max");
    let (cold, _) = timed_build(&tmp.path().join("a"), &registry, "agent-a", &["--cache-to", &to])?;
    let from = format!("type=registry,ref={cache}");
    let (warm, log) = timed_build(&tmp.path().join("b"), &registry, "agent-b", &["--cache-from", &from])?;
    anyhow::ensure!(log.contains("took 1 step from"), "agent B did not use the cache: {log}");
    let (fresh, _) = timed_build(&tmp.path().join("c"), &registry, "agent-c", &[])?;
    println!("## Shared layer cache (one platform, a RUN of {WORK} loop iterations)\n");
    println!("Machine: {machine}; buildah {}.\n", buildah_version());
    println!("| build | seconds | vs A cold | vs fresh agent without cache |");
    println!("| --- | ---: | ---: | ---: |");
    println!("| A: cold, `--cache-to type=registry,mode=max` | {cold:.2} | 1.00 | {:.2} |", cold / fresh);
    println!("| B: fresh agent, `--cache-from type=registry` | {warm:.2} | {:.2} | {:.2} |", warm / cold, warm / fresh);
    println!("| C: fresh agent, no cache | {fresh:.2} | {:.2} | 1.00 |", fresh / cold);
    println!(
        "\nEach build on its own fresh farm (coordinator and agent, empty storage), same registry, wall time of \
         `braid build --push` end to end; target B <= 0.2x A.\n"
    );
    Ok(())
}

fn buildah_version() -> String {
    std::process::Command::new("buildah")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().nth(2).map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}
