//! braid's benchmarks. Run them all with `bash tests/bench.sh` (it builds
//! release binaries first); each prints a table and ratios against a
//! baseline measured in the same run. Nothing here fails on a number.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use braid_shared::context::{self, ContextLimits, HashingWriter};
use braid_shared::dockerignore::DockerIgnore;
use braid_shared::limits;
use braid_tests::Farm;

const MIB: f64 = 1024.0 * 1024.0;

#[path = "../bench/scale.rs"]
mod scale;

#[path = "../bench/events.rs"]
mod events;

#[path = "../bench/cache.rs"]
mod cache;

#[path = "../bench/limit.rs"]
mod limit;

#[path = "../bench/instructions.rs"]
mod instructions;

#[path = "../bench/concurrent.rs"]
mod concurrent;

fn main() -> anyhow::Result<()> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let known = [
        "all",
        "users",
        "limit",
        "noop",
        "many",
        "instructions",
        "overhead",
        "scale",
        "events",
        "context",
        "footprint",
        "emulation",
        "cache",
    ];
    if !known.contains(&which.as_str()) {
        anyhow::bail!("unknown benchmark {which:?}: one of {}", known.join(", "));
    }
    let run = |name: &str| which == "all" || which == name;
    println!("Machine: {}\n", machine_and_builders());
    if run("users") || run("limit") || run("noop") {
        let bench = limit::Bench::start()?;
        if run("users") {
            users_bench(&bench)?;
        }
        if run("limit") {
            limit_bench(&bench)?;
        }
        if run("noop") {
            noop_bench(&bench)?;
        }
    }
    if run("overhead") {
        overhead_bench()?;
    }
    if run("scale") {
        scale_bench()?;
    }
    if run("events") {
        events_bench()?;
    }
    if run("context") {
        context_bench()?;
    }
    if run("footprint") {
        footprint_bench()?;
    }
    if run("emulation") {
        emulation_bench()?;
    }
    if run("cache") {
        cache::run(&machine())?;
    }
    if run("many") {
        concurrent::run(&machine())?;
    }
    if run("instructions") {
        instructions::run(&machine())?;
    }
    Ok(())
}

/// The machine, its kernel and the builders' versions.
fn machine_and_builders() -> String {
    let version = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_owned())
            .unwrap_or_default()
    };
    format!(
        "{}; kernel {}; {}; {}; {}",
        machine(),
        version("uname", "-r"),
        limit::buildah_version(),
        version("podman", "--version"),
        version("/usr/bin/docker", "--version")
    )
}

/// Table 1: braid against what a buildah user types.
fn users_bench(b: &limit::Bench) -> anyhow::Result<()> {
    let workloads = [
        ("small image (COPY)", format!("FROM {}\nCOPY data.txt /data.txt\n", b.base)),
        (
            "a few seconds of RUN work",
            format!("FROM {}\nRUN i=0; while [ $i -lt 150000 ]; do i=$((i+1)); done; echo $i > /n\n", b.base),
        ),
    ];
    println!("## Against what users type (3 platforms, amd64 + arm64 + arm/v7)\n");
    println!(
        "Baseline: `buildah bud --platform {} --jobs 3 --manifest LIST` + `buildah manifest push --all LIST docker://...` ({}).\n",
        limit::PLATFORMS,
        limit::buildah_version()
    );
    println!("| workload | buildah bud --jobs 3 + manifest push (s) | braid (s) | braid / baseline |");
    println!("| --- | ---: | ---: | ---: |");
    let reg = &b.registry.addr;
    for (i, (name, dockerfile)) in workloads.iter().enumerate() {
        let ctx = b.context(&format!("users{i}"), dockerfile)?;
        let root = b.tmp.path().join(format!("users-buildah{i}"));
        let (mut base, mut braid) = (Vec::new(), Vec::new());
        for round in 0..3 {
            base.push(limit::users_buildah(&root, &ctx, reg, &format!("{reg}/bench/users{i}:{round}"))?);
            braid.push(b.build(&ctx, &format!("{reg}/bench/braid-users{i}:{round}"), &["--no-cache"])?.0);
        }
        let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let (x, y) = (best(&base), best(&braid));
        println!("| {name} | {x:.2} | {y:.2} | {:.2} |", y / x);
    }
    println!(
        "\nBest of three runs each (the first pulls the base for buildah), `--no-cache` on both sides, same machine, same registry. Target <= 1.05.\n"
    );
    Ok(())
}

/// Table 2: wall time less the slowest platform's builder time.
fn limit_bench(b: &limit::Bench) -> anyhow::Result<()> {
    const BUILDS: usize = 20;
    let ctx = b.context("limit", &format!("FROM {}\nCOPY data.txt /data.txt\nRUN echo $(uname -m) > /m\n", b.base))?;
    let reg = &b.registry.addr;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // Warm the agents (base pulled, context path exercised).
    b.build(&ctx, &format!("{reg}/bench/limit:warm"), &["--no-cache"])?;
    let mut rows = Vec::new();
    for i in 0..BUILDS {
        let (wall, id) = b.build(&ctx, &format!("{reg}/bench/limit:{i}"), &["--no-cache"])?;
        let build = runtime.block_on(limit::get(&b.farm.url, &id))?;
        rows.push(limit::distance(wall * 1000.0, &build));
    }
    println!("## Distance from the limit ({BUILDS} builds of 3 platforms on warm agents)\n");
    println!("| ms | total | submit to start | context fetch | push | verify | merge | other (upload, watch, gaps) |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
        let col = |f: fn(&limit::Distance) -> f64| limit::pct(&rows.iter().map(f).collect::<Vec<_>>(), q);
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            col(|d| d.total),
            col(|d| d.submit_to_start),
            col(|d| d.fetch),
            col(|d| d.push),
            col(|d| d.verify),
            col(|d| d.merge),
            col(|d| d.other)
        );
    }
    println!(
        "\nTotal = the CLI's wall time less the slowest platform's `build` phase as its agent measured it (PhaseTiming); the phases are that platform's. `--no-cache` so every build runs on the agents. Targets: total < 300 ms p50, each phase < 100 ms.\n"
    );
    Ok(())
}

/// Table 3: the same build again, nothing changed (the result cache).
fn noop_bench(b: &limit::Bench) -> anyhow::Result<()> {
    const ROUNDS: usize = 10;
    let ctx = b.context("noop", &format!("FROM {}\nCOPY data.txt /data.txt\nRUN echo $(uname -m) > /m\n", b.base))?;
    let tag = format!("{}/bench/noop:1", b.registry.addr);
    let (first, _) = b.build(&ctx, &tag, &[])?;
    let mut cached = Vec::new();
    let mut layer_cached = Vec::new();
    for _ in 0..ROUNDS {
        cached.push(b.build(&ctx, &tag, &[])?.0 * 1000.0);
        // Bypassing the result cache (--pull) while every layer is cached.
        layer_cached.push(b.build(&ctx, &tag, &["--pull"])?.0 * 1000.0);
    }
    println!("## No-op rebuild (3 platforms, nothing changed)\n");
    println!("| build | p50 (ms) | p99 (ms) |");
    println!("| --- | ---: | ---: |");
    println!("| first build | {:.0} | - |", first * 1000.0);
    println!(
        "| again, result cache bypassed (`--pull`: agents run, every step cached) | {:.0} | {:.0} |",
        limit::pct(&layer_cached, 0.5),
        limit::pct(&layer_cached, 0.99)
    );
    println!(
        "| again, answered by the result cache | {:.0} | {:.0} |",
        limit::pct(&cached, 0.5),
        limit::pct(&cached, 0.99)
    );
    println!(
        "\n{ROUNDS} rounds, the CLI's wall time from start to exit (context hashed and stat'ed, build submitted and watched, index merged). Target < 250 ms.\n"
    );
    Ok(())
}

fn seconds_of(mut cmd: Command) -> anyhow::Result<f64> {
    let start = Instant::now();
    let out = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).output()?;
    if !out.status.success() {
        anyhow::bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(start.elapsed().as_secs_f64())
}

/// The bare builder: one `buildah bud` per platform in parallel (each with
/// its own storage, as braid's agents have), then `buildah manifest` to
/// assemble and push the index.
fn bare_builder(work: &Path, ctx: &Path, registry: &str, tag: &str) -> anyhow::Result<f64> {
    let platforms = ["linux/amd64", "linux/arm64", "linux/arm/v7"];
    let conf = work.join("registries.conf");
    std::fs::write(&conf, format!("[[registry]]\nlocation = \"{registry}\"\ninsecure = true\n"))?;
    let buildah = |p: &str| {
        let mut c = Command::new("buildah");
        let root = work.join(p.replace('/', "-"));
        c.arg("--root")
            .arg(root.join("root"))
            .arg("--runroot")
            .arg(root.join("run"))
            .env("CONTAINERS_REGISTRIES_CONF", &conf);
        c
    };
    let start = Instant::now();
    let children: Vec<_> = platforms
        .iter()
        .map(|p| {
            let mut c = buildah(p);
            c.args(["bud", "--isolation", "chroot", "--layers", "--no-cache", "--platform", p, "--iidfile"])
                .arg(work.join(format!("{}.iid", p.replace('/', "-"))))
                .arg(ctx)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            c.spawn()
        })
        .collect::<Result<_, _>>()?;
    for mut child in children {
        anyhow::ensure!(child.wait()?.success(), "buildah bud failed");
    }
    // One storage holds the list; each image joins it through an OCI layout.
    let manifest = |args: &[&str]| {
        let mut c = buildah("linux/amd64");
        c.args(args);
        seconds_of(c)
    };
    let list = format!("localhost/bench-list-{}", std::process::id());
    let _ = manifest(&["manifest", "rm", &list]);
    manifest(&["manifest", "create", &list])?;
    for p in platforms {
        let iid = std::fs::read_to_string(work.join(format!("{}.iid", p.replace('/', "-"))))?;
        let layout = work.join(format!("layout-{}", p.replace('/', "-")));
        let _ = std::fs::remove_dir_all(&layout);
        let mut push = buildah(p);
        push.args(["push", "--format", "oci", iid.trim()]).arg(format!("oci:{}:img", layout.display()));
        seconds_of(push)?;
        manifest(&["manifest", "add", &list, &format!("oci:{}:img", layout.display())])?;
    }
    manifest(&["manifest", "push", "--all", "--tls-verify=false", &list, &format!("docker://{tag}")])?;
    Ok(start.elapsed().as_secs_f64())
}

fn overhead_bench() -> anyhow::Result<()> {
    braid_tests::require_environment();
    let tmp = tempfile::tempdir()?;
    let registry = braid_tests::Registry::start(&tmp.path().join("registry"))?;
    let base = registry.push_base_image("base/busybox:latest")?;
    let agents = [
        braid_tests::AgentSpec::new("amd64-agent", &[]),
        braid_tests::AgentSpec::new("arm64-agent", &["linux/arm64"]),
        braid_tests::AgentSpec::new("armv7-agent", &["linux/arm/v7"]),
    ];
    let farm = Farm::start(&tmp.path().join("farm"), &registry, &agents)?;
    farm.wait_for_agents(3)?;
    let workloads = [
        ("small image (COPY)", format!("FROM {base}\nCOPY data.txt /data.txt\n")),
        (
            "a few seconds of RUN work",
            format!("FROM {base}\nRUN i=0; while [ $i -lt 150000 ]; do i=$((i+1)); done; echo $i > /n\n"),
        ),
    ];
    println!("## Overhead against the bare builder (3 platforms, amd64 + arm64 + arm/v7)\n");
    println!("| workload | bare buildah + manifest (s) | braid (s) | braid / bare |");
    println!("| --- | ---: | ---: | ---: |");
    for (i, (name, dockerfile)) in workloads.iter().enumerate() {
        let ctx = tmp.path().join(format!("ctx{i}"));
        std::fs::create_dir_all(&ctx)?;
        std::fs::write(ctx.join("Dockerfile"), dockerfile)?;
        std::fs::write(ctx.join("data.txt"), "bench")?;
        let mut bare = Vec::new();
        let mut braid = Vec::new();
        for round in 0..2 {
            let work = tmp.path().join(format!("bare{i}-{round}"));
            std::fs::create_dir_all(&work)?;
            bare.push(bare_builder(&work, &ctx, &registry.addr, &format!("{}/bench/bare{i}:{round}", registry.addr))?);
            let start = Instant::now();
            let out = farm.braid(&[
                "build",
                "--platform",
                "linux/amd64,linux/arm64,linux/arm/v7",
                "--no-cache",
                "-t",
                &format!("{}/bench/braid{i}:{round}", registry.addr),
                "--push",
                "--progress",
                "quiet",
                ctx.to_str().unwrap_or_default(),
            ])?;
            anyhow::ensure!(out.status.success(), "braid build failed: {}", String::from_utf8_lossy(&out.stderr));
            braid.push(start.elapsed().as_secs_f64());
        }
        let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let (a, b) = (best(&bare), best(&braid));
        println!("| {name} | {a:.2} | {b:.2} | {:.2} |", b / a);
    }
    println!("\nBest of two runs each, `--no-cache` on both sides, same machine, same registry.\n");
    Ok(())
}

fn scale_bench() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    println!("## Scheduler scale (fake builders that answer at once){}\n", store_title());
    println!(
        "| agents | builds | rate (builds/s) | dispatched/s | assignment p50 (ms) | p99 (ms) | coordinator RSS (MiB) | RSS per agent (KiB) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    for (agents, builds, rate) in [(100usize, 2000usize, 1000.0), (1000, 2000, 1000.0), (10_000, 2000, 1000.0)] {
        let dir = tmp.path().join(format!("scale-{agents}"));
        let (_pg, url) = bench_store(&dir)?;
        let mut flags = vec!["--heartbeat-seconds", "30", "--agent-lost-seconds", "120"];
        flags.extend(url.iter().flat_map(|u| ["--store", u.as_str()]));
        let farm = Farm::start_with(&dir, None, &[], &flags)?;
        let pid = farm.coordinator.as_ref().map(|c| c.pid()).unwrap_or(0);
        let r = runtime.block_on(scale::run(&farm.url, pid, agents, builds, rate))?;
        let per_agent = r.rss_agents_kib.saturating_sub(r.rss_base_kib) as f64 / r.agents as f64;
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} | {:.1} |",
            r.agents,
            r.builds,
            rate,
            r.builds as f64 / r.seconds,
            r.p50_ms,
            r.p99_ms,
            r.rss_agents_kib as f64 / 1024.0,
            per_agent
        );
        drop(farm);
    }
    println!(
        "\nEach build is one job for `linux/riscv64`, which every fake agent serves; \"dispatched/s\" counts builds whose job reached an agent per second of the run.\n"
    );
    Ok(())
}

/// BRAID_BENCH_STORE=postgres runs the scale and events benchmarks on a
/// PostgreSQL server of their own (Debian's, on loopback) instead of SQLite.
fn postgres_bench() -> bool {
    std::env::var("BRAID_BENCH_STORE").is_ok_and(|s| s == "postgres")
}

fn store_title() -> &'static str {
    if postgres_bench() { " (PostgreSQL store)" } else { "" }
}

/// The PostgreSQL server and its URL when the benchmark asks for one.
fn bench_store(dir: &std::path::Path) -> anyhow::Result<(Option<braid_tests::ha::Postgres>, Option<String>)> {
    if !postgres_bench() {
        return Ok((None, None));
    }
    std::fs::create_dir_all(dir)?;
    let pg = braid_tests::ha::Postgres::start(dir)?;
    let url = pg.url();
    Ok((Some(pg), Some(url)))
}

/// The machine a table ran on: CPU model, cores and memory.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| Some(l.strip_prefix("model name")?.split_once(':')?.1.trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    format!("{model}, {cores} cores, {:.0} GiB", mem_kib / MIB)
}

/// The unit of /proc/PID/stat's CPU times.
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn events_bench() -> anyhow::Result<()> {
    const BUILDS: usize = 10;
    // Issue 15's flood (20,000 lines per build), and a longer one so more
    // `braid builds` samples fall inside it.
    const RUNS: [usize; 2] = [20_000, 100_000];
    // Under the per-job log and per-build event limits, so no line is cut.
    const _: () = assert!(RUNS[1].div_ceil(events::PLATFORMS.len()) * (events::LINE_BYTES + 1) < limits::JOB_LOG_BYTES);
    const _: () = assert!((RUNS[1] as u64) + 100 < limits::BUILD_EVENTS);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?").to_owned();
    let mut results = Vec::new();
    for lines in RUNS {
        let tmp = tempfile::tempdir()?;
        let (_pg, url) = bench_store(tmp.path())?;
        let mut flags = vec!["--heartbeat-seconds", "30", "--agent-lost-seconds", "120"];
        flags.extend(url.iter().flat_map(|u| ["--store", u.as_str()]));
        let farm = Farm::start_with(&tmp.path().join("farm"), None, &[], &flags)?;
        let pid = farm.coordinator.as_ref().map(|c| c.pid()).unwrap_or(0);
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        results.push(runtime.block_on(events::run(&farm.url, pid, BUILDS, lines))?);
    }
    println!("## Events through the coordinator ({} store)\n", if postgres_bench() { "PostgreSQL" } else { "SQLite" });
    println!("Machine: {}; load average {load} when the table started.\n", machine());
    println!(
        "| lines per build | lines received by followers | seconds | lines/s to followers | coordinator CPU per 10,000 lines (ms) | coordinator CPU (% of a core) | waiting for a CPU (% of a core) | disk writes per 10,000 lines (KiB) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &results {
        let per_10k = 10_000.0 / r.lines_received.max(1) as f64;
        println!(
            "| {} | {} of {} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r.lines_sent / BUILDS as u64,
            r.lines_received,
            r.lines_sent,
            r.seconds,
            r.lines_received as f64 / r.seconds,
            r.cpu_seconds * 1000.0 * per_10k,
            r.cpu_seconds / r.seconds * 100.0,
            r.cpu_wait_seconds / r.seconds * 100.0,
            r.write_bytes as f64 / 1024.0 * per_10k
        );
    }
    println!("\n| `braid builds` | samples | p50 (ms) | p99 (ms) | max (ms) | p50 vs idle | max vs idle p50 |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &results {
        let base = r.idle.pct(0.5);
        for (name, l) in [("idle, before", &r.idle), ("during", &r.flood)] {
            println!(
                "| {name} the {}-line flood | {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
                r.lines_sent / BUILDS as u64,
                l.0.len(),
                l.pct(0.5),
                l.pct(0.99),
                l.max(),
                l.pct(0.5) / base,
                l.max() / base
            );
        }
    }
    let ended: usize = results.iter().map(|r| r.builds_ended).sum();
    println!(
        "\n{BUILDS} builds of {} platforms at once; a fake agent per job on the real Agents API streams its share of \
         the build's lines ({} bytes each, {} per JobLog message, as the agent batches them) as fast as the \
         coordinator reads them, then its result. A Watch per build counts the lines from the first sent to the \
         last received ({ended} of {} builds seen to end). `braid builds` is the real CLI, timed from start to exit \
         every 200 ms; the idle rows are the same coordinator and builds just before the flood.\n",
        events::PLATFORMS.len(),
        events::LINE_BYTES,
        events::LINES_PER_MESSAGE,
        BUILDS * RUNS.len()
    );
    Ok(())
}

fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn footprint_bench() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let farm =
        Farm::start_with(&tmp.path().join("farm"), None, &[braid_tests::AgentSpec::new("idle-agent", &[])], &[])?;
    farm.wait_for_agents(1)?;
    std::thread::sleep(Duration::from_secs(3));
    let pid = farm.agents[0].pid();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(10));
    let ticks = cpu_ticks(pid) - before;
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0);
    println!("## Agent footprint\n");
    println!("| what | value |");
    println!("| --- | ---: |");
    println!("| braid-agent idle RSS | {:.1} MiB |", rss / 1024.0);
    println!("| braid-agent idle CPU over 10 s | {:.2} % of one core |", ticks as f64 / 100.0 / 10.0 * 100.0);
    for name in ["braid-agent", "braid-coordinator", "braid"] {
        let size = std::fs::metadata(braid_tests::bin(name))?.len();
        println!("| {name} binary | {:.1} MiB |", size as f64 / MIB);
    }
    println!();
    Ok(())
}

fn emulation_bench() -> anyhow::Result<()> {
    braid_tests::require_environment();
    let tmp = tempfile::tempdir()?;
    let registry = braid_tests::Registry::start(&tmp.path().join("registry"))?;
    let base = registry.push_base_image("base/busybox:latest")?;
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx)?;
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {base}\nRUN i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done\n"),
    )?;
    let conf = tmp.path().join("registries.conf");
    std::fs::write(&conf, format!("[[registry]]\nlocation = \"{}\"\ninsecure = true\n", registry.addr))?;
    println!("## Emulation cost on this machine (the same RUN loop)\n");
    println!("| platform | seconds | vs amd64 |");
    println!("| --- | ---: | ---: |");
    let mut native = 0.0;
    for p in ["linux/amd64", "linux/arm64", "linux/arm/v7"] {
        let root = tmp.path().join(p.replace('/', "-"));
        // Pull first, so only the RUN step is timed.
        let mut pull = Command::new("buildah");
        pull.arg("--root")
            .arg(root.join("root"))
            .arg("--runroot")
            .arg(root.join("run"))
            .env("CONTAINERS_REGISTRIES_CONF", &conf);
        pull.args(["pull", "--platform", p, &base]);
        seconds_of(pull)?;
        let mut bud = Command::new("buildah");
        bud.arg("--root")
            .arg(root.join("root"))
            .arg("--runroot")
            .arg(root.join("run"))
            .env("CONTAINERS_REGISTRIES_CONF", &conf);
        bud.args(["bud", "--isolation", "chroot", "--pull-never", "--no-cache", "--platform", p]).arg(&ctx);
        let s = seconds_of(bud)?;
        if p == "linux/amd64" {
            native = s;
        }
        println!("| {p} | {s:.2} | {:.1}x |", s / native);
    }
    println!("\nOn this x86 machine arm64 and arm/v7 run under QEMU: the ratio is the time a native agent saves.\n");
    Ok(())
}

/// A tree of about 256 MiB: source-like text and incompressible blobs, in
/// nested directories, like a real repository with some assets.
fn make_tree(root: &Path) -> anyhow::Result<u64> {
    let mut total = 0u64;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for d in 0..40 {
        let dir = root.join(format!("pkg{d}/src/mod{}", d % 7));
        std::fs::create_dir_all(&dir)?;
        for f in 0..50 {
            let text: String = (0..1500).map(|i| format!("fn item_{d}_{f}_{i}() -> u32 {{ {} }}\n", i * 7)).collect();
            std::fs::write(dir.join(format!("file{f}.rs")), &text)?;
            total += text.len() as u64;
        }
        let blob: Vec<u8> = (0..(2 << 20) / 8).flat_map(|_| rand().to_le_bytes()).collect();
        std::fs::write(dir.join("asset.bin"), &blob)?;
        total += blob.len() as u64;
    }
    Ok(total)
}

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = None;
    let mut last = None;
    for _ in 0..runs {
        let start = Instant::now();
        let v = f();
        let took = start.elapsed();
        best = Some(best.map_or(took, |b: Duration| b.min(took)));
        last = Some(v);
    }
    (best.unwrap(), last.unwrap())
}

fn context_bench() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(&tree)?;
    let bytes = make_tree(&tree)?;
    // Warm the page cache so both sides read from memory.
    Command::new("tar").arg("-cf").arg("/dev/null").arg("-C").arg(&tree).arg(".").status()?;

    let (baseline, _) = best_of(3, || {
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!("tar -cf - -C '{}' . | sha256sum > /dev/null", tree.display()))
            .status()
            .unwrap();
        assert!(status.success());
    });
    let ignore = DockerIgnore::default();
    let (tar_hash, summary) =
        best_of(3, || context::write_tar(&tree, &ignore, ContextLimits::default(), std::io::sink()).unwrap());
    let (tar_hash_zstd, compressed) = best_of(3, || {
        let counter = HashingWriter::new(std::io::sink());
        let mut encoder = zstd::stream::write::Encoder::new(counter, 3).unwrap();
        context::write_tar(&tree, &ignore, ContextLimits::default(), &mut encoder).unwrap();
        let (_, n, _) = encoder.finish().unwrap().finish();
        n
    });
    let rate = |d: Duration| bytes as f64 / MIB / d.as_secs_f64();
    println!("## Context path ({:.0} MiB of files, {} entries)\n", bytes as f64 / MIB, summary.entries);
    println!("| what | seconds | MiB/s | vs baseline |");
    println!("| --- | ---: | ---: | ---: |");
    println!("| baseline: tar -cf - . \\| sha256sum | {:.3} | {:.0} | 1.00 |", baseline.as_secs_f64(), rate(baseline));
    for (name, d) in [("braid: tar + sha256", tar_hash), ("braid: tar + sha256 + zstd -3", tar_hash_zstd)] {
        println!("| {name} | {:.3} | {:.0} | {:.2} |", d.as_secs_f64(), rate(d), rate(d) / rate(baseline));
    }
    println!(
        "\nzstd: {:.1} MiB tar -> {:.1} MiB on the wire ({:.2}x)\n",
        summary.size as f64 / MIB,
        compressed as f64 / MIB,
        summary.size as f64 / compressed as f64
    );

    // Bytes sent, measured at a real coordinator. Each size gets its own
    // context (version.txt differs); the resubmission touches nothing.
    std::fs::write(tree.join("Dockerfile"), "FROM scratch\nCOPY . /\n")?;
    let farm = Farm::start_with(&tmp.path().join("farm"), None, &[], &[])?;
    let mut rows = Vec::new();
    for platforms in [1usize, 3, 5] {
        std::fs::write(tree.join("version.txt"), format!("{platforms}"))?;
        let list =
            ["linux/riscv64", "linux/s390x", "linux/ppc64le", "linux/mips64le", "linux/loong64"][..platforms].join(",");
        let before = farm.metric("braid_context_bytes_received_total");
        submit_refused(&farm, &tree, &list)?;
        rows.push((
            format!("{platforms} platform(s)"),
            farm.metric("braid_context_bytes_received_total") - before,
            platforms,
        ));
    }
    let before = farm.metric("braid_context_bytes_received_total");
    submit_refused(&farm, &tree, "linux/riscv64,linux/s390x,linux/ppc64le,linux/mips64le,linux/loong64")?;
    rows.push(("resubmission, 5 platforms".into(), farm.metric("braid_context_bytes_received_total") - before, 5));
    println!("| build | braid bytes sent | one upload per platform (buildx) | ratio |");
    println!("| --- | ---: | ---: | ---: |");
    for (name, sent, platforms) in rows {
        let per_node = summary.size as f64 * platforms as f64;
        println!("| {name} | {:.0} | {:.0} | {:.3} |", sent, per_node, sent / per_node);
    }
    println!();
    Ok(())
}

/// Submits a build for platforms no agent declared: the CLI uploads the
/// context, then the coordinator refuses the build (so only the context moves).
fn submit_refused(farm: &Farm, tree: &Path, platforms: &str) -> anyhow::Result<()> {
    let out = farm.braid(&["build", "--platform", platforms, "--progress", "plain", tree.to_str().unwrap()])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        !out.status.success() && stderr.contains("no agent has ever connected"),
        "expected the build to be refused after its upload: {stderr}"
    );
    Ok(())
}
