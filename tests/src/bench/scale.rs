//! Scheduler scale: N real agent sessions over gRPC with fake builders that
//! answer at once, and builds submitted at a fixed rate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use braid_shared::proto::{self, agent_message::Kind as Up, coordinator_message::Kind as Down};

/// Submit time and assignment time per build id.
type Clock = Arc<Mutex<HashMap<String, (Option<Instant>, Option<Instant>)>>>;

pub struct ScaleResult {
    pub agents: usize,
    pub builds: usize,
    pub seconds: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub rss_base_kib: u64,
    pub rss_agents_kib: u64,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// One fake agent: hello, then answer every assignment with an image at once.
async fn fake_agent(channel: tonic::transport::Channel, name: String, clock: Clock) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel::<proto::AgentMessage>(64);
    tx.send(proto::AgentMessage {
        kind: Some(Up::Hello(proto::Hello {
            name,
            platforms: vec!["linux/riscv64".into()],
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
    while let Some(message) = inbound.message().await? {
        if let Some(Down::Assign(a)) = message.kind {
            // The assignment can arrive before Submit's answer does.
            let now = Instant::now();
            clock
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(a.build_id.clone())
                .or_insert((None, None))
                .1
                .get_or_insert(now);
            let result = proto::JobResult {
                job_id: a.job_id,
                attempt: a.attempt,
                lease_id: a.lease_id,
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
        }
    }
    Ok(())
}

/// Uploads a context of one empty file and returns its digest.
pub async fn put_empty_context(
    client: &mut proto::builds_client::BuildsClient<tonic::transport::Channel>,
) -> anyhow::Result<String> {
    let tar = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "empty", std::io::empty())?;
        b.into_inner()?
    };
    let digest = braid_shared::Digest::of(&tar).to_string();
    let chunk = zstd::encode_all(&tar[..], 3)?;
    client.put_context(tokio_stream::iter(vec![proto::PutContextRequest { digest: digest.clone(), chunk }])).await?;
    Ok(digest)
}

pub async fn run(
    url: &str,
    coordinator_pid: u32,
    agents: usize,
    builds: usize,
    rate: f64,
) -> anyhow::Result<ScaleResult> {
    let rss_base_kib = rss_kib(coordinator_pid);
    let clock: Clock = Arc::new(Mutex::new(HashMap::new()));
    // 100 sessions share a connection: h2 caps concurrent streams per connection.
    let mut channels = Vec::new();
    for _ in 0..agents.div_ceil(100) {
        channels.push(tonic::transport::Endpoint::from_shared(url.to_owned())?.connect().await?);
    }
    for i in 0..agents {
        let channel = channels[i / 100].clone();
        let clock = clock.clone();
        tokio::spawn(async move {
            let _ = fake_agent(channel, format!("fake-{i}"), clock).await;
        });
    }
    // Let every session say hello.
    tokio::time::sleep(Duration::from_secs(2 + (agents / 1000) as u64)).await;
    let rss_agents_kib = rss_kib(coordinator_pid);

    let mut client = proto::builds_client::BuildsClient::connect(url.to_owned()).await?;
    let digest = put_empty_context(&mut client).await?;
    let spec = proto::BuildSpec {
        platforms: vec!["linux/riscv64".into()],
        context_digest: digest,
        dockerfile_inline: b"FROM scratch\n".to_vec(),
        ..Default::default()
    };
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut submitters = Vec::new();
    for n in 0..builds {
        let due = start + interval * n as u32;
        tokio::time::sleep_until(due.into()).await;
        let mut c = client.clone();
        let spec = spec.clone();
        let clock = clock.clone();
        submitters.push(tokio::spawn(async move {
            let sent = Instant::now();
            if let Ok(r) =
                c.submit(proto::SubmitRequest { spec: Some(spec), credentials: vec![], secrets: vec![] }).await
            {
                let id = r.into_inner().build_id;
                let mut map = clock.lock().unwrap_or_else(|p| p.into_inner());
                map.entry(id).or_insert((None, None)).0 = Some(sent);
            }
        }));
    }
    for s in submitters {
        let _ = s.await;
    }
    // Wait (bounded) for the assignments to arrive.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = clock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|(s, a)| s.is_some() && a.is_some())
            .count();
        if done >= builds || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut latencies: Vec<f64> = clock
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .filter_map(|(s, a)| Some(a.as_ref()?.duration_since(*s.as_ref()?).as_secs_f64() * 1000.0))
        .collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok(ScaleResult {
        agents,
        builds: latencies.len(),
        seconds,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        rss_base_kib,
        rss_agents_kib,
    })
}
