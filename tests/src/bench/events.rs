//! Events through the coordinator: fake agents on the real Agents API stream
//! log lines for several builds at once, as fast as the coordinator takes
//! them, while a Watch per build follows them and `braid builds` is timed.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use braid_shared::proto::{self, agent_message::Kind as Up, coordinator_message::Kind as Down};

/// Lines per JobLog message: what the real agent batches at most.
pub const LINES_PER_MESSAGE: usize = 64;
/// Bytes of one log line, about a compiler's output line.
pub const LINE_BYTES: usize = 80;
/// Each build's platforms, one job and one fake agent each.
pub const PLATFORMS: [&str; 3] = ["linux/amd64", "linux/arm64", "linux/arm/v7"];
/// How often `braid builds` is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// Idle samples taken before the flood.
const IDLE_SAMPLES: usize = 15;
/// Bound on the whole flood, past which whatever arrived is reported.
const FLOOD_DEADLINE: Duration = Duration::from_secs(150);
/// Bound on one `braid builds`.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// Latencies of `braid builds`, in milliseconds, sorted.
pub struct Latencies(pub Vec<f64>);

impl Latencies {
    pub fn pct(&self, p: f64) -> f64 {
        let v = &self.0;
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1))).copied().unwrap_or(f64::NAN)
    }
    pub fn max(&self) -> f64 {
        self.0.last().copied().unwrap_or(f64::NAN)
    }
}

pub struct EventsResult {
    pub lines_sent: u64,
    pub lines_received: u64,
    /// Builds whose Watch stream saw the build end.
    pub builds_ended: usize,
    /// From the first line sent to the last line received.
    pub seconds: f64,
    /// The coordinator's utime + stime over the flood.
    pub cpu_seconds: f64,
    /// Time the coordinator's threads waited for a CPU over the flood.
    pub cpu_wait_seconds: f64,
    /// Bytes the coordinator caused to be written to disk over the flood.
    pub write_bytes: u64,
    pub idle: Latencies,
    pub flood: Latencies,
}

/// One log line of about `LINE_BYTES`, different for every line.
fn line(agent: usize, n: usize) -> String {
    let mut s = format!("[{agent:02}] cc -O2 -c src/module_{n:06}.c -o build/module_{n:06}.o");
    while s.len() < LINE_BYTES {
        s.push_str(" -g");
    }
    s.truncate(LINE_BYTES);
    s
}

/// Bytes a process caused to be written to storage (/proc/PID/io).
fn write_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("write_bytes:")?.trim().parse().ok()))
        .unwrap_or(0)
}

/// What a fake agent tells the benchmark, and its start signal.
#[derive(Clone)]
struct Links {
    welcomed: mpsc::Sender<()>,
    assigned: mpsc::Sender<String>,
    go: watch::Receiver<bool>,
    /// Log lines sent by every agent.
    sent: Arc<AtomicU64>,
}

/// Nanoseconds the process's threads spent runnable but waiting for a CPU
/// (/proc/PID/task/*/schedstat): how much other load held it back.
fn runqueue_wait_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// One fake agent with one slot for `platform`: takes an assignment, says it is building,
/// waits for `go`, streams `lines` log lines in batches (each send waits
/// while the coordinator has not read the earlier ones: HTTP/2 flow
/// control), then reports an image.
async fn fake_agent(
    url: String,
    index: usize,
    platform: &'static str,
    lines: usize,
    mut links: Links,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(url)?.connect().await?;
    let (tx, rx) = mpsc::channel::<proto::AgentMessage>(8);
    tx.send(proto::AgentMessage {
        kind: Some(Up::Hello(proto::Hello {
            name: format!("events-{index}"),
            platforms: vec![platform.into()],
            slots: 1,
            backend: "fake".into(),
            version: braid_shared::VERSION.into(),
            running: vec![],
            emulated_platforms: vec![],
            incarnation: String::new(),
            builder: None,
            labels: Default::default(),
        })),
        seq: 0,
    })
    .await?;
    let mut client = proto::agents_client::AgentsClient::new(channel);
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    let assignment = loop {
        let Some(message) = inbound.message().await? else { anyhow::bail!("session closed before an assignment") };
        match message.kind {
            Some(Down::Welcome(_)) => links.welcomed.send(()).await?,
            Some(Down::Assign(a)) => break a,
            _ => {}
        }
    };
    links.assigned.send(assignment.build_id.clone()).await?;
    let progress = proto::JobProgress {
        job_id: assignment.job_id.clone(),
        attempt: assignment.attempt,
        state: proto::JobState::Building as i32,
    };
    tx.send(proto::AgentMessage { kind: Some(Up::Progress(progress)), seq: 0 }).await?;
    links.go.wait_for(|go| *go).await?;
    for start in (0..lines).step_by(LINES_PER_MESSAGE) {
        let batch = (start..(start + LINES_PER_MESSAGE).min(lines)).map(|n| line(index, n)).collect::<Vec<_>>();
        let n = batch.len() as u64;
        let log = proto::JobLog { job_id: assignment.job_id.clone(), attempt: assignment.attempt, lines: batch };
        tx.send(proto::AgentMessage { kind: Some(Up::Log(log)), seq: 0 }).await?;
        links.sent.fetch_add(n, Ordering::Relaxed);
    }
    let result = proto::JobResult {
        job_id: assignment.job_id,
        attempt: assignment.attempt,
        lease_id: assignment.lease_id,
        outcome: Some(proto::job_result::Outcome::Image(proto::ImageResult {
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 1,
            media_type: braid_shared::oci::OCI_MANIFEST.into(),
            ..Default::default()
        })),
        phases: vec![],
        provenance: None,
        footprint: None,
    };
    tx.send(proto::AgentMessage { kind: Some(Up::Result(result)), seq: 0 }).await?;
    // Keep the session open until the coordinator or the benchmark ends it.
    while inbound.message().await?.is_some() {}
    Ok(())
}

/// What the followers saw, shared so a flood cut short still counts.
#[derive(Default)]
struct Tally {
    lines: AtomicU64,
    last: Mutex<Option<Instant>>,
    ended: AtomicUsize,
}

/// Follows one build to its end, counting its log lines.
async fn follow(url: String, build_id: String, tally: Arc<Tally>) -> anyhow::Result<()> {
    let mut client = proto::builds_client::BuildsClient::connect(url).await?;
    let mut stream =
        client.watch(proto::WatchRequest { build_id, after_seq: 0, history_only: false }).await?.into_inner();
    while let Some(event) = stream.message().await? {
        match event.kind {
            Some(proto::build_event::Kind::Log(_)) => {
                tally.lines.fetch_add(1, Ordering::Relaxed);
                *tally.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            }
            Some(proto::build_event::Kind::Build(b))
                if [proto::BuildState::Succeeded, proto::BuildState::Failed, proto::BuildState::Cancelled]
                    .iter()
                    .any(|s| *s as i32 == b.state) =>
            {
                tally.ended.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Times one `braid builds` (process start to exit, as a user sees it) and
/// checks it listed `builds` builds.
async fn time_builds_cli(url: &str, builds: usize) -> anyhow::Result<f64> {
    let mut cmd = tokio::process::Command::new(braid_tests::bin("braid"));
    cmd.args(["--coordinator", url, "builds"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let start = Instant::now();
    let out = tokio::time::timeout(CLI_TIMEOUT, cmd.output())
        .await
        .map_err(|_| anyhow::anyhow!("braid builds took over {CLI_TIMEOUT:?}"))??;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(out.status.success(), "braid builds failed: {}", String::from_utf8_lossy(&out.stderr));
    let listed = String::from_utf8_lossy(&out.stdout).lines().count().saturating_sub(1);
    anyhow::ensure!(listed >= builds, "braid builds listed {listed} builds, not {builds}");
    Ok(ms)
}

/// Samples `braid builds` every `SAMPLE_EVERY` until `stop` turns true (or
/// `max` samples).
async fn sample_builds(url: &str, builds: usize, max: usize, stop: watch::Receiver<bool>) -> anyhow::Result<Latencies> {
    let mut samples = Vec::new();
    let mut next = Instant::now();
    while samples.len() < max && !*stop.borrow() {
        samples.push(time_builds_cli(url, builds).await?);
        next += SAMPLE_EVERY;
        tokio::time::sleep_until(next.max(Instant::now()).into()).await;
    }
    samples.sort_by(f64::total_cmp);
    Ok(Latencies(samples))
}

/// Runs `builds` builds of every platform in `PLATFORMS`, `lines` log lines
/// per build split evenly between its jobs.
pub async fn run(url: &str, coordinator_pid: u32, builds: usize, lines: usize) -> anyhow::Result<EventsResult> {
    let jobs = builds * PLATFORMS.len();
    let (welcomed, mut welcomes) = mpsc::channel(jobs);
    let (assigned, mut assignments) = mpsc::channel(jobs);
    let (go_tx, go) = watch::channel(false);
    let sent = Arc::new(AtomicU64::new(0));
    let links = Links { welcomed, assigned, go, sent: sent.clone() };
    let mut agents = tokio::task::JoinSet::new();
    for i in 0..jobs {
        let p = i % PLATFORMS.len();
        // Every agent of a platform sends as much, so each build gets `lines`.
        let share = lines / PLATFORMS.len() + usize::from(p < lines % PLATFORMS.len());
        agents.spawn(fake_agent(url.to_owned(), i, PLATFORMS[p], share, links.clone()));
    }
    drop(links);
    let setup = Duration::from_secs(30);
    let first_error = |agents: &mut tokio::task::JoinSet<anyhow::Result<()>>| match agents.try_join_next() {
        Some(Ok(Err(e))) => anyhow::anyhow!("a fake agent failed: {e}"),
        _ => anyhow::anyhow!("a fake agent ended early"),
    };
    for _ in 0..jobs {
        if tokio::time::timeout(setup, welcomes.recv()).await.ok().flatten().is_none() {
            return Err(first_error(&mut agents));
        }
    }

    // Submit every build at once through the real API.
    let mut client = proto::builds_client::BuildsClient::connect(url.to_owned()).await?;
    let digest = super::scale::put_empty_context(&mut client).await?;
    let spec = proto::BuildSpec {
        platforms: PLATFORMS.iter().map(|p| p.to_string()).collect(),
        context_digest: digest,
        dockerfile_inline: b"FROM scratch\n".to_vec(),
        ..Default::default()
    };
    let submits = (0..builds).map(|_| {
        let mut c = client.clone();
        let spec = spec.clone();
        async move { c.submit(proto::SubmitRequest { spec: Some(spec), credentials: vec![], secrets: vec![] }).await }
    });
    let mut ids = Vec::new();
    for r in futures::future::join_all(submits).await {
        ids.push(r?.into_inner().build_id);
    }
    for _ in 0..jobs {
        if tokio::time::timeout(setup, assignments.recv()).await.ok().flatten().is_none() {
            return Err(first_error(&mut agents));
        }
    }
    let tally = Arc::new(Tally::default());
    let mut followers = tokio::task::JoinSet::new();
    for id in &ids {
        followers.spawn(follow(url.to_owned(), id.clone(), tally.clone()));
    }

    // Idle: the same builds listed and running, nothing logging.
    let (_idle_tx, idle_stop) = watch::channel(false);
    let idle = sample_builds(url, builds, IDLE_SAMPLES, idle_stop).await?;

    let (stop_tx, stop) = watch::channel(false);
    let sampler = {
        let url = url.to_owned();
        tokio::spawn(async move { sample_builds(&url, builds, usize::MAX, stop).await })
    };
    let ticks_before = super::cpu_ticks(coordinator_pid);
    let written_before = write_bytes(coordinator_pid);
    let waited_before = runqueue_wait_ns(coordinator_pid);
    let start = Instant::now();
    go_tx.send(true)?;
    let followed = tokio::time::timeout(FLOOD_DEADLINE, async {
        while let Some(r) = followers.join_next().await {
            r??;
        }
        anyhow::Ok(())
    })
    .await;
    let ticks_after = super::cpu_ticks(coordinator_pid);
    let written_after = write_bytes(coordinator_pid);
    let waited_after = runqueue_wait_ns(coordinator_pid);
    let _ = stop_tx.send(true);
    match followed {
        Ok(r) => r?,
        Err(_) => eprintln!("events: the flood did not end within {FLOOD_DEADLINE:?}; reporting what arrived"),
    }
    followers.abort_all();
    let flood = tokio::time::timeout(CLI_TIMEOUT * 2, sampler).await???;
    agents.abort_all();
    while let Some(r) = agents.join_next().await {
        if let Ok(Err(e)) = r {
            eprintln!("events: a fake agent failed: {e}");
        }
    }
    let last = tally.last.lock().unwrap_or_else(|p| p.into_inner()).unwrap_or(start);
    Ok(EventsResult {
        lines_sent: sent.load(Ordering::Relaxed),
        lines_received: tally.lines.load(Ordering::Relaxed),
        builds_ended: tally.ended.load(Ordering::Relaxed),
        seconds: last.duration_since(start).as_secs_f64(),
        cpu_wait_seconds: waited_after.saturating_sub(waited_before) as f64 / 1e9,
        write_bytes: written_after.saturating_sub(written_before),
        cpu_seconds: ticks_after.saturating_sub(ticks_before) as f64 / super::clock_ticks_per_second(),
        idle,
        flood,
    })
}
