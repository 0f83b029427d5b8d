//! Issue 22's end-to-end tables on a real farm (three agents: amd64 native,
//! arm64 and arm/v7 under QEMU here): braid against what a buildah user
//! types, the distance from the limit (wall time less the slowest
//! platform's own builder time, split by phase) and the no-op rebuild the
//! result cache answers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use braid_shared::proto;
use braid_tests::{AgentSpec, Farm, Registry};

pub const PLATFORMS: &str = "linux/amd64,linux/arm64,linux/arm/v7";

/// A farm of three agents, one per platform, with its registry and base image.
pub struct Bench {
    pub tmp: tempfile::TempDir,
    pub registry: Registry,
    pub farm: Farm,
    pub base: String,
}

impl Bench {
    pub fn start() -> anyhow::Result<Bench> {
        braid_tests::require_environment();
        let tmp = tempfile::tempdir()?;
        let registry = Registry::start(&tmp.path().join("registry"))?;
        let base = registry.push_base_image("base/busybox:latest")?;
        let agents = [
            AgentSpec::new("amd64-agent", &[]),
            AgentSpec::new("arm64-agent", &["linux/arm64"]),
            AgentSpec::new("armv7-agent", &["linux/arm/v7"]),
        ];
        let farm = Farm::start(&tmp.path().join("farm"), &registry, &agents)?;
        farm.wait_for_agents(3)?;
        Ok(Bench { tmp, registry, farm, base })
    }

    /// A context directory holding `dockerfile` and a small data file.
    pub fn context(&self, name: &str, dockerfile: &str) -> anyhow::Result<PathBuf> {
        let ctx = self.tmp.path().join(name);
        std::fs::create_dir_all(&ctx)?;
        std::fs::write(ctx.join("Dockerfile"), dockerfile)?;
        std::fs::write(ctx.join("data.txt"), "bench")?;
        Ok(ctx)
    }

    /// `braid build` of the three platforms, pushed to `tag`: its wall
    /// seconds and build id.
    pub fn build(&self, ctx: &Path, tag: &str, extra: &[&str]) -> anyhow::Result<(f64, String)> {
        let mut args = vec!["build", "--platform", PLATFORMS, "-t", tag, "--push", "--progress", "plain"];
        args.extend_from_slice(extra);
        args.push(ctx.to_str().unwrap_or_default());
        let start = Instant::now();
        let out = self.farm.braid(&args)?;
        let wall = start.elapsed().as_secs_f64();
        let stderr = String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(out.status.success(), "braid build failed: {stderr}");
        let id = stderr
            .lines()
            .find_map(|l| Some(l.split_once("#2 build ")?.1.split_whitespace().next()?.to_owned()))
            .ok_or_else(|| anyhow::anyhow!("no build id in {stderr}"))?;
        Ok((wall, id))
    }
}

/// buildah's version line.
pub fn buildah_version() -> String {
    Command::new("buildah")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "buildah (version unknown)".into())
}

/// What a buildah user types: one `buildah bud` for every platform into a
/// manifest list, then `buildah manifest push --all`. Its wall seconds.
pub fn users_buildah(root: &Path, ctx: &Path, registry: &str, tag: &str) -> anyhow::Result<f64> {
    let conf = root.join("registries.conf");
    std::fs::create_dir_all(root)?;
    std::fs::write(&conf, format!("[[registry]]\nlocation = \"{registry}\"\ninsecure = true\n"))?;
    let buildah = |args: &[&str]| {
        let mut c = Command::new("buildah");
        c.arg("--root").arg(root.join("root")).arg("--runroot").arg(root.join("run"));
        c.env("CONTAINERS_REGISTRIES_CONF", &conf).args(args);
        c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
        c
    };
    let list = format!("localhost/bench-users-{}", std::process::id());
    let _ = buildah(&["manifest", "rm", &list]).output();
    let start = Instant::now();
    let ctx = ctx.to_str().unwrap_or_default();
    let bud = ["bud", "--isolation", "chroot", "--no-cache", "--platform", PLATFORMS, "--jobs", "3", "--manifest"];
    let mut args = bud.to_vec();
    args.extend_from_slice(&[&list, ctx]);
    let out = buildah(&args).output()?;
    anyhow::ensure!(out.status.success(), "buildah bud failed: {}", String::from_utf8_lossy(&out.stderr));
    let dest = format!("docker://{tag}");
    let out = buildah(&["manifest", "push", "--all", "--tls-verify=false", &list, &dest]).output()?;
    anyhow::ensure!(out.status.success(), "buildah manifest push failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(start.elapsed().as_secs_f64())
}

/// A build as the coordinator recorded it.
pub async fn get(url: &str, build_id: &str) -> anyhow::Result<proto::Build> {
    let mut client = proto::builds_client::BuildsClient::connect(url.to_owned()).await?;
    Ok(client.get(proto::GetBuildRequest { build_id: build_id.to_owned() }).await?.into_inner())
}

/// One build's distance from the limit, in ms: wall time less the slowest
/// platform's builder time, and the parts of it the farm records.
#[derive(Debug, Clone, Copy, Default)]
pub struct Distance {
    pub total: f64,
    /// Submit (the build's creation) to the slowest job's first phase on its agent.
    pub submit_to_start: f64,
    pub fetch: f64,
    pub push: f64,
    pub verify: f64,
    pub merge: f64,
    /// The rest: the CLI's context upload and watch, and gaps between phases.
    pub other: f64,
}

fn ms(t: &Option<prost_types::Timestamp>) -> Option<f64> {
    t.as_ref().map(|t| t.seconds as f64 * 1000.0 + f64::from(t.nanos) / 1e6)
}

fn phase(job: &proto::Job, name: &str) -> Option<(f64, f64)> {
    let p = job.phases.iter().find(|p| p.phase == name)?;
    Some((ms(&p.start)?, ms(&p.end)?))
}

/// A job's phase `name` in ms (0 when it has none).
pub fn phase_ms(job: &proto::Job, name: &str) -> f64 {
    phase(job, name).map_or(0.0, |(s, e)| e - s)
}

pub fn distance(wall_ms: f64, b: &proto::Build) -> Distance {
    let dur = |j: &proto::Job, n: &str| phase(j, n).map_or(0.0, |(s, e)| e - s);
    let Some(slowest) = b.jobs.iter().max_by(|a, c| dur(a, "build").total_cmp(&dur(c, "build"))) else {
        return Distance::default();
    };
    let created = ms(&b.created).unwrap_or(0.0);
    let first = ["fetch", "build"].iter().find_map(|n| phase(slowest, n)).map_or(created, |(s, _)| s);
    let merge = match (ms(&b.merge_started), ms(&b.finished)) {
        (Some(s), Some(e)) => e - s,
        _ => 0.0,
    };
    let total = wall_ms - dur(slowest, "build");
    let mut d = Distance {
        total,
        submit_to_start: first - created,
        fetch: dur(slowest, "fetch"),
        push: dur(slowest, "push"),
        verify: dur(slowest, "verify"),
        merge,
        other: 0.0,
    };
    d.other = total - d.submit_to_start - d.fetch - d.push - d.verify - d.merge;
    d
}

/// The `q` quantile (nearest rank) of `v`.
pub fn pct(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return 0.0;
    }
    s[((s.len() as f64 * q).ceil() as usize).clamp(1, s.len()) - 1]
}
