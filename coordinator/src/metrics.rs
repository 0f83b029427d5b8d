//! Every metric the coordinator exports, in Prometheus' text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters updated where things happen; gauges are read from the farm at
/// scrape time.
#[derive(Default)]
pub struct Metrics {
    pub context_uploads: AtomicU64,
    pub context_bytes_received: AtomicU64,
    pub context_fetches: AtomicU64,
    pub context_bytes_served: AtomicU64,
    pub contexts_evicted: AtomicU64,
    pub builds_submitted: AtomicU64,
}

/// Gauges taken from the farm under its lock.
#[derive(Debug, Default)]
pub struct Gauges {
    pub agents_connected: u64,
    pub jobs_queued: u64,
    pub jobs_running: u64,
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

    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
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
        gauge(&mut out, "braid_agents_connected", "Agents with a live session.", gauges.agents_connected);
        gauge(&mut out, "braid_jobs_queued", "Jobs waiting for an agent.", gauges.jobs_queued);
        gauge(&mut out, "braid_jobs_running", "Jobs leased to an agent.", gauges.jobs_running);
        out
    }
}
