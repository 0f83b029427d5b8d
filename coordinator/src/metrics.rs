//! Every metric the coordinator exports, in Prometheus' text format.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bucket bounds, in seconds, for every duration histogram: builds take from
/// seconds (a cached step) to an hour (an emulated toolchain).
const BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

#[derive(Default, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (i, bound) in BUCKETS.iter().enumerate() {
            if v <= *bound {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

type Labels = Vec<(&'static str, String)>;

fn label_text(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")))
        .collect::<Vec<_>>()
        .join(",")
}

/// Counters and histograms updated where things happen; gauges are read
/// from the farm at scrape time.
#[derive(Default)]
pub struct Metrics {
    pub context_uploads: AtomicU64,
    pub context_bytes_received: AtomicU64,
    pub context_fetches: AtomicU64,
    pub context_bytes_served: AtomicU64,
    pub contexts_evicted: AtomicU64,
    pub blob_bytes_received: AtomicU64,
    pub export_bytes_served: AtomicU64,
    pub builds_submitted: AtomicU64,
    pub agents_lost: AtomicU64,
    /// Writes to the data directory that failed (full disk, I/O error),
    /// each retry of the journal included.
    pub store_write_errors: AtomicU64,
    labeled: Mutex<BTreeMap<(&'static str, String), u64>>,
    histograms: Mutex<BTreeMap<(&'static str, String), Histogram>>,
    /// Platforms some agent declared: with `KNOWN_PLATFORMS`, the only
    /// values a `platform` label takes, so a submitter cannot create series.
    declared: Mutex<BTreeSet<String>>,
}

/// Platforms that always get their own label.
const KNOWN_PLATFORMS: &[&str] = &[
    "linux/amd64",
    "linux/amd64/v2",
    "linux/amd64/v3",
    "linux/amd64/v4",
    "linux/arm64",
    "linux/arm/v7",
    "linux/arm/v6",
    "linux/arm/v5",
    "linux/386",
    "linux/ppc64le",
    "linux/s390x",
    "linux/riscv64",
    "windows/amd64",
    "windows/arm64",
];

/// The label of every platform neither well known nor declared by an agent.
pub const OTHER_PLATFORM: &str = "other";

/// Gauges taken from the farm under its lock.
#[derive(Debug, Default)]
pub struct Gauges {
    pub agents_connected: u64,
    pub jobs_queued: u64,
    pub jobs_running: u64,
    /// (platform, state) -> agents.
    pub agents: BTreeMap<(String, String), u64>,
    /// platform -> (queued jobs, seconds the oldest has waited).
    pub queues: BTreeMap<String, (u64, f64)>,
    /// Bytes of image blobs held for exporting builds.
    pub blob_store_bytes: u64,
    /// The data directory takes writes (`DataDir::writable`).
    pub store_writable: bool,
    /// Per agent, by name, at most `limits::METRIC_AGENTS`.
    pub agent_health: Vec<AgentGauge>,
}

/// One agent's series: when it was last heard of, and its latest health
/// report while it is connected.
#[derive(Debug, Default)]
pub struct AgentGauge {
    pub name: String,
    pub last_seen_seconds: f64,
    pub health: Option<braid_shared::proto::AgentHealth>,
}

/// Per-agent gauges: name, help, and the value of a report (None: not
/// known, no sample).
type AgentSeries = (&'static str, &'static str, fn(&braid_shared::proto::AgentHealth) -> Option<f64>);

const AGENT_SERIES: &[AgentSeries] = &[
    ("braid_agent_disk_free_bytes", "Free bytes on the filesystem of the agent's work directory.", |h| {
        Some(h.disk_free_bytes as f64)
    }),
    (
        "braid_agent_builder_cache_bytes",
        "Bytes of the builder storage the agent manages (none for a Docker Engine's own).",
        |h| (!h.builder_cache_unknown).then_some(h.builder_cache_bytes as f64),
    ),
    ("braid_agent_context_cache_bytes", "Bytes of the agent's context cache.", |h| Some(h.context_cache_bytes as f64)),
    ("braid_agent_load1", "The agent host's 1-minute load average.", |h| Some(h.load1)),
    ("braid_agent_memory_total_bytes", "The agent host's memory (MemTotal).", |h| Some(h.memory_total_bytes as f64)),
    ("braid_agent_memory_available_bytes", "The agent host's available memory (MemAvailable).", |h| {
        Some(h.memory_available_bytes as f64)
    }),
    ("braid_agent_running_jobs", "Jobs the agent reports running.", |h| Some(f64::from(h.running_jobs))),
    (
        "braid_agent_certificate_expiry_timestamp_seconds",
        "When the agent's certificate expires (notAfter), Unix seconds; none without TLS.",
        |h| (h.certificate_not_after != 0).then_some(h.certificate_not_after as f64),
    ),
];

/// Labeled counters, with their help text.
const LABELED: &[(&str, &str)] = &[
    ("braid_jobs_total", "Jobs that ended, by platform and result (succeeded, failed, cancelled)."),
    ("braid_job_retries_total", "Jobs put back in the queue after an agent or network failure."),
    ("braid_jobs_emulated_total", "Jobs placed on an agent that emulates their platform."),
];

/// Histograms, with their help text.
const HISTOGRAMS: &[(&str, &str)] = &[
    ("braid_job_phase_seconds", "Time per job phase (queued, fetch, build, push, verify), by platform."),
    ("braid_build_duration_seconds", "Time from submission to the end of a build, by result."),
    ("braid_build_merge_seconds", "Time to write the index and push it under every tag."),
];

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Metrics are advisory: a panic elsewhere must not stop the scrape.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn counter(out: &mut String, name: &str, help: &str, value: &AtomicU64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", value.load(Ordering::Relaxed));
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(&self, name: &'static str, labels: Labels) {
        let labels = self.bounded(labels);
        *lock(&self.labeled).entry((name, label_text(&labels))).or_default() += 1;
    }

    pub fn observe(&self, name: &'static str, labels: Labels, seconds: f64) {
        let labels = self.bounded(labels);
        lock(&self.histograms).entry((name, label_text(&labels))).or_default().observe(seconds.max(0.0));
    }

    /// Records the platforms an agent declared as label values, up to
    /// `limits::METRIC_PLATFORMS` of them.
    pub fn declare_platforms(&self, platforms: impl IntoIterator<Item = String>) {
        let mut declared = lock(&self.declared);
        let mut labeled = lock(&self.labeled);
        for p in platforms {
            if declared.len() >= braid_shared::limits::METRIC_PLATFORMS {
                break;
            }
            if declared.insert(p.clone()) {
                // Each series exists from the first agent of its platform on:
                // a counter with no samples cannot be alerted on (`increase`).
                let platform = ("platform", p);
                for result in ["succeeded", "failed", "cancelled"] {
                    let labels = vec![platform.clone(), ("result", result.to_owned())];
                    labeled.entry(("braid_jobs_total", label_text(&labels))).or_default();
                }
                for name in ["braid_job_retries_total", "braid_jobs_emulated_total"] {
                    labeled.entry((name, label_text(&vec![platform.clone()]))).or_default();
                }
            }
        }
    }

    /// `platform` if it is well known or declared, else `other`.
    pub fn platform_label(&self, platform: &str) -> String {
        if KNOWN_PLATFORMS.contains(&platform) || lock(&self.declared).contains(platform) {
            platform.to_owned()
        } else {
            OTHER_PLATFORM.to_owned()
        }
    }

    /// Every `platform` label bounded by `platform_label`.
    fn bounded(&self, mut labels: Labels) -> Labels {
        for (key, value) in &mut labels {
            if *key == "platform" {
                *value = self.platform_label(value);
            }
        }
        labels
    }

    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        let mut agents: BTreeMap<(String, &str), u64> = BTreeMap::new();
        for ((platform, state), n) in &gauges.agents {
            *agents.entry((self.platform_label(platform), state.as_str())).or_default() += n;
        }
        // Every declared platform has a queue, empty or not.
        let mut queues: BTreeMap<String, (u64, f64)> =
            lock(&self.declared).iter().map(|p| (p.clone(), (0, 0.0))).collect();
        for (platform, (n, oldest)) in &gauges.queues {
            let entry = queues.entry(self.platform_label(platform)).or_default();
            entry.0 += n;
            entry.1 = entry.1.max(*oldest);
        }
        counter(
            &mut out,
            "braid_context_uploads_total",
            "Contexts uploaded (PutContext calls that stored one).",
            &self.context_uploads,
        );
        counter(
            &mut out,
            "braid_context_bytes_received_total",
            "Compressed context bytes received from clients.",
            &self.context_bytes_received,
        );
        counter(&mut out, "braid_context_fetches_total", "Contexts streamed to agents.", &self.context_fetches);
        counter(
            &mut out,
            "braid_blob_bytes_received_total",
            "Image blob bytes agents uploaded for exporting builds.",
            &self.blob_bytes_received,
        );
        counter(
            &mut out,
            "braid_export_bytes_served_total",
            "OCI layout bytes streamed to clients (--output type=oci, --load).",
            &self.export_bytes_served,
        );
        counter(
            &mut out,
            "braid_context_bytes_served_total",
            "Compressed context bytes streamed to agents.",
            &self.context_bytes_served,
        );
        counter(
            &mut out,
            "braid_contexts_evicted_total",
            "Contexts removed to stay under context_store_bytes.",
            &self.contexts_evicted,
        );
        counter(&mut out, "braid_builds_submitted_total", "Builds accepted.", &self.builds_submitted);
        counter(
            &mut out,
            "braid_agents_lost_total",
            "Agents declared lost after missing heartbeats.",
            &self.agents_lost,
        );
        counter(
            &mut out,
            "braid_store_write_errors_total",
            "Failed writes to the data directory (full disk, i/o error); the journal's retries count too.",
            &self.store_write_errors,
        );
        // Label values are the build's own constants: no escaping needed.
        let _ = writeln!(
            out,
            "# HELP braid_build_info The coordinator's version and git commit (always 1).\n# TYPE braid_build_info gauge\nbraid_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            braid_build_info::VERSION,
            braid_build_info::COMMIT
        );
        gauge(
            &mut out,
            "braid_store_writable",
            "1 when the data directory takes writes, 0 while it is full or failing (/readyz is 503 then).",
            u64::from(gauges.store_writable),
        );
        gauge(&mut out, "braid_agents_connected", "Agents with a live session.", gauges.agents_connected);
        // Jobs queued in all: sum(braid_queue_depth), not a series of its own.
        gauge(&mut out, "braid_jobs_running", "Jobs leased to an agent.", gauges.jobs_running);
        gauge(
            &mut out,
            "braid_blob_store_bytes",
            "Bytes of image blobs the coordinator holds for exporting builds (bounded by blob_store_bytes).",
            gauges.blob_store_bytes,
        );

        let _ = writeln!(out, "# HELP braid_agents Agents by platform and state.\n# TYPE braid_agents gauge");
        for ((platform, state), n) in &agents {
            let _ = writeln!(out, "braid_agents{{platform=\"{platform}\",state=\"{state}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP braid_queue_depth Jobs waiting for an agent, by platform.\n# TYPE braid_queue_depth gauge"
        );
        for (platform, (n, _)) in &queues {
            let _ = writeln!(out, "braid_queue_depth{{platform=\"{platform}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP braid_queue_oldest_seconds How long the oldest queued job has waited, by platform.\n# TYPE braid_queue_oldest_seconds gauge"
        );
        for (platform, (_, oldest)) in &queues {
            let _ = writeln!(out, "braid_queue_oldest_seconds{{platform=\"{platform}\"}} {oldest:.3}");
        }

        render_agents(&mut out, &gauges.agent_health);

        let labeled = lock(&self.labeled);
        for (name, help) in LABELED {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for ((_, labels), n) in labeled.range((*name, String::new())..).take_while(|((n, _), _)| n == name) {
                let _ = writeln!(out, "{name}{{{labels}}} {n}");
            }
        }
        drop(labeled);
        let histograms = lock(&self.histograms);
        for (name, help) in HISTOGRAMS {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for ((_, labels), h) in histograms.range((*name, String::new())..).take_while(|((n, _), _)| n == name) {
                let sep = if labels.is_empty() { "" } else { "," };
                for (bound, count) in BUCKETS.iter().zip(&h.counts) {
                    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
                }
                let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
                let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
                let _ = writeln!(out, "{name}_sum{braces} {}", h.sum);
                let _ = writeln!(out, "{name}_count{braces} {}", h.count);
            }
        }
        out
    }
}

/// Each per-agent gauge, HELP and TYPE always (so rules naming them check
/// against any coordinator), a sample per agent that has the value.
fn render_agents(out: &mut String, agents: &[AgentGauge]) {
    let label = |a: &AgentGauge| label_text(&vec![("agent", a.name.clone())]);
    let name = "braid_agent_last_heartbeat_timestamp_seconds";
    let _ = writeln!(out, "# HELP {name} When the agent was last heard of, Unix seconds.\n# TYPE {name} gauge");
    for a in agents {
        let _ = writeln!(out, "{name}{{{}}} {:.3}", label(a), a.last_seen_seconds);
    }
    for (name, help, value) in AGENT_SERIES {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for a in agents {
            if let Some(v) = a.health.as_ref().and_then(value) {
                let _ = writeln!(out, "{name}{{{}}} {v}", label(a));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labeled_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.inc("braid_jobs_total", vec![("platform", "linux/arm64".into()), ("result", "succeeded".into())]);
        m.observe("braid_job_phase_seconds", vec![("platform", "linux/arm64".into()), ("phase", "build".into())], 3.0);
        m.observe("braid_job_phase_seconds", vec![("platform", "linux/arm64".into()), ("phase", "build".into())], 0.2);
        let text = m.render(&Gauges::default());
        assert!(text.contains("braid_jobs_total{platform=\"linux/arm64\",result=\"succeeded\"} 1"), "{text}");
        assert!(text.contains("braid_job_phase_seconds_bucket{platform=\"linux/arm64\",phase=\"build\",le=\"0.5\"} 1"));
        assert!(text.contains("braid_job_phase_seconds_bucket{platform=\"linux/arm64\",phase=\"build\",le=\"5\"} 2"));
        assert!(text.contains("braid_job_phase_seconds_count{platform=\"linux/arm64\",phase=\"build\"} 2"));
    }

    #[test]
    fn platform_labels_are_bounded() {
        let m = Metrics::default();
        m.inc("braid_jobs_total", vec![("platform", "linux/amd64".into()), ("result", "failed".into())]);
        m.inc("braid_jobs_total", vec![("platform", "evil/x1".into()), ("result", "failed".into())]);
        m.inc("braid_jobs_total", vec![("platform", "evil/x2".into()), ("result", "failed".into())]);
        m.declare_platforms(["linux/mips64le".to_owned()]);
        m.inc("braid_job_retries_total", vec![("platform", "linux/mips64le".into())]);
        let mut gauges = Gauges::default();
        gauges.queues.insert("evil/x3".into(), (2, 1.0));
        gauges.queues.insert("evil/x4".into(), (3, 5.0));
        let text = m.render(&gauges);
        assert!(text.contains("braid_jobs_total{platform=\"other\",result=\"failed\"} 2"), "{text}");
        assert!(text.contains("braid_jobs_total{platform=\"linux/amd64\",result=\"failed\"} 1"), "{text}");
        assert!(text.contains("braid_job_retries_total{platform=\"linux/mips64le\"} 1"), "{text}");
        assert!(text.contains("braid_queue_depth{platform=\"other\"} 5"), "{text}");
        assert!(text.contains("braid_queue_oldest_seconds{platform=\"other\"} 5.000"), "{text}");
        assert!(!text.contains("evil"), "{text}");
    }

    #[test]
    fn a_declared_platform_has_every_series_from_the_start_and_none_is_duplicated() {
        let m = Metrics::default();
        m.declare_platforms(["linux/arm64".to_owned()]);
        let text = m.render(&Gauges::default());
        for series in [
            "braid_jobs_total{platform=\"linux/arm64\",result=\"succeeded\"} 0",
            "braid_jobs_total{platform=\"linux/arm64\",result=\"failed\"} 0",
            "braid_jobs_total{platform=\"linux/arm64\",result=\"cancelled\"} 0",
            "braid_job_retries_total{platform=\"linux/arm64\"} 0",
            "braid_jobs_emulated_total{platform=\"linux/arm64\"} 0",
            "braid_queue_depth{platform=\"linux/arm64\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
        // Counting goes on from the seeded zero; declaring again resets nothing.
        m.inc("braid_job_retries_total", vec![("platform", "linux/arm64".into())]);
        m.declare_platforms(["linux/arm64".to_owned()]);
        assert!(m.render(&Gauges::default()).contains("braid_job_retries_total{platform=\"linux/arm64\"} 1"));
        assert!(!text.contains("braid_jobs_queued"), "the sum of braid_queue_depth is not a series of its own");
    }

    #[test]
    fn agents_have_health_series_where_known() {
        let health = braid_shared::proto::AgentHealth {
            disk_free_bytes: 5 << 30,
            builder_cache_unknown: true,
            load1: 0.25,
            memory_total_bytes: 100,
            memory_available_bytes: 40,
            running_jobs: 1,
            ..Default::default()
        };
        let gauges = Gauges {
            agent_health: vec![
                AgentGauge { name: "board-1".into(), last_seen_seconds: 1_700_000_000.5, health: Some(health) },
                AgentGauge { name: "gone".into(), last_seen_seconds: 1_600_000_000.0, health: None },
            ],
            ..Default::default()
        };
        let text = Metrics::default().render(&gauges);
        for series in [
            "braid_agent_last_heartbeat_timestamp_seconds{agent=\"board-1\"} 1700000000.500",
            "braid_agent_last_heartbeat_timestamp_seconds{agent=\"gone\"} 1600000000.000",
            "braid_agent_disk_free_bytes{agent=\"board-1\"} 5368709120",
            "braid_agent_load1{agent=\"board-1\"} 0.25",
            "braid_agent_memory_available_bytes{agent=\"board-1\"} 40",
            "braid_agent_running_jobs{agent=\"board-1\"} 1",
            "# HELP braid_agent_certificate_expiry_timestamp_seconds ",
            "# HELP braid_agent_builder_cache_bytes ",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
        // Unknown values have no sample; an agent without a report has only its last heartbeat.
        assert!(!text.contains("braid_agent_builder_cache_bytes{"), "{text}");
        assert!(!text.contains("braid_agent_certificate_expiry_timestamp_seconds{"), "{text}");
        assert!(!text.contains("braid_agent_disk_free_bytes{agent=\"gone\"}"), "{text}");
    }
}
