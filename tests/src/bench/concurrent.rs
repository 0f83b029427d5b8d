//! Many builds at once: 40 two-platform builds submitted together to two
//! amd64 and two arm64 agents of two slots each; the makespan against the
//! ideal (the builders' own time spread over every slot) and how evenly the
//! agents were used.

use std::collections::BTreeMap;
use std::time::Instant;

use braid_tests::{AgentSpec, Farm, Registry};

use super::limit;

const BUILDS: usize = 40;
const SLOTS: u32 = 2;

pub fn run(machine: &str) -> anyhow::Result<()> {
    braid_tests::require_environment();
    let tmp = tempfile::tempdir()?;
    let registry = Registry::start(&tmp.path().join("registry"))?;
    let base = registry.push_base_image("base/busybox:latest")?;
    let agents = [
        AgentSpec::new("amd64-a", &["linux/amd64"]).slots(SLOTS),
        AgentSpec::new("amd64-b", &["linux/amd64"]).slots(SLOTS),
        AgentSpec::new("arm64-a", &["linux/arm64"]).slots(SLOTS),
        AgentSpec::new("arm64-b", &["linux/arm64"]).slots(SLOTS),
    ];
    let farm = Farm::start(&tmp.path().join("farm"), &registry, &agents)?;
    farm.wait_for_agents(agents.len())?;
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx)?;
    std::fs::write(ctx.join("Dockerfile"), format!("FROM {base}\nRUN echo $(uname -m) > /m\n"))?;
    let ctx = ctx.to_str().unwrap_or_default().to_owned();
    let reg = registry.addr.clone();
    let start = Instant::now();
    let ids: Vec<anyhow::Result<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..BUILDS)
            .map(|i| {
                let (farm, ctx, tag) = (&farm, &ctx, format!("{reg}/bench/many:{i}"));
                s.spawn(move || {
                    let args = ["build", "--platform", "linux/amd64,linux/arm64", "--no-cache", "-t", &tag];
                    let mut all = args.to_vec();
                    all.extend_from_slice(&["--push", "--progress", "plain", ctx]);
                    let out = farm.braid(&all)?;
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    anyhow::ensure!(out.status.success(), "build {i} failed: {stderr}");
                    stderr
                        .lines()
                        .find_map(|l| Some(l.split_once("#2 build ")?.1.split_whitespace().next()?.to_owned()))
                        .ok_or_else(|| anyhow::anyhow!("no build id"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))).collect()
    });
    let makespan = start.elapsed().as_secs_f64();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut builder_s = 0.0;
    let mut per_agent: BTreeMap<String, (u32, f64)> = BTreeMap::new();
    let mut failed = 0;
    for id in ids {
        let Ok(id) = id else {
            failed += 1;
            continue;
        };
        let b = runtime.block_on(limit::get(&farm.url, &id))?;
        for j in &b.jobs {
            let s = limit::phase_ms(j, "build") / 1000.0;
            builder_s += s;
            let e = per_agent.entry(j.agent.clone()).or_default();
            e.0 += 1;
            e.1 += s;
        }
    }
    let slots = agents.len() as f64 * f64::from(SLOTS);
    let ideal = builder_s / slots;
    println!("## Many builds at once ({BUILDS} builds of linux/amd64 + linux/arm64, 2+2 agents of {SLOTS} slots)\n");
    println!("Machine: {machine}.\n");
    println!("| makespan (s) | ideal: builder time / slots (s) | makespan / ideal | failed builds |");
    println!("| ---: | ---: | ---: | ---: |");
    println!("| {makespan:.1} | {ideal:.1} | {:.2} | {failed} |", makespan / ideal);
    println!("\n| agent | jobs | builder seconds | share of its platform's builder time |");
    println!("| --- | ---: | ---: | ---: |");
    for (agent, (jobs, s)) in &per_agent {
        let platform_total: f64 =
            per_agent.iter().filter(|(a, _)| a[..5] == agent[..5]).map(|(_, (_, s))| s).sum::<f64>();
        println!("| {agent} | {jobs} | {s:.1} | {:.0} % |", s / platform_total.max(f64::EPSILON) * 100.0);
    }
    println!(
        "\nAll {BUILDS} `braid build` processes start together (`--no-cache`, a one-step RUN); makespan is the first \
         start to the last exit; builder time is each job's `build` phase as its agent measured it. Both slots of \
         an agent share the machine's 2 cores with every other agent, so builder time itself grows with load.\n"
    );
    Ok(())
}
