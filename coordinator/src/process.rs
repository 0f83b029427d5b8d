//! The Prometheus process collector's series (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, ...), named and typed as client_golang
//! and client_rust export them, read from /proc with the `procfs` crate.
//! A value /proc does not give is left out, never written as 0.

use std::fmt::Write as _;

/// The process metrics of this process, in Prometheus' text format.
pub fn render() -> String {
    let mut out = String::new();
    let Ok(me) = procfs::process::Process::myself() else { return out };
    let mut gauge = |name: &str, kind: &str, help: &str, value: Option<f64>| {
        if let Some(v) = value {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
    };
    let stat = me.stat().ok();
    let ticks = procfs::ticks_per_second() as f64;
    gauge(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        stat.as_ref().map(|s| (s.utime + s.stime) as f64 / ticks),
    );
    gauge(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        stat.as_ref().map(|s| s.rss.saturating_mul(procfs::page_size()) as f64),
    );
    gauge(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        stat.as_ref().map(|s| s.vsize as f64),
    );
    let boot = procfs::boot_time_secs().ok();
    gauge(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        stat.as_ref().zip(boot).map(|(s, boot)| boot as f64 + s.starttime as f64 / ticks),
    );
    gauge("process_open_fds", "gauge", "Number of open file descriptors.", me.fd_count().ok().map(|n| n as f64));
    let max_fds = me.limits().ok().and_then(|l| match l.max_open_files.soft_limit {
        procfs::process::LimitValue::Value(v) => Some(v as f64),
        procfs::process::LimitValue::Unlimited => None,
    });
    gauge("process_max_fds", "gauge", "Maximum number of open file descriptors.", max_fds);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_process_series_has_a_plausible_value() {
        let text = super::render();
        let value = |name: &str| -> f64 {
            let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{text}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert!(value("process_resident_memory_bytes") > 1e5, "{text}");
        assert!(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"), "{text}");
        assert!(value("process_open_fds") >= 3.0, "{text}");
        assert!(value("process_max_fds") >= value("process_open_fds"), "{text}");
        let now = braid_shared::health::now_seconds() as f64;
        let start = value("process_start_time_seconds");
        assert!(start > now - 3600.0 && start <= now + 1.0, "{start} vs {now}");
        assert!(value("process_cpu_seconds_total") >= 0.0, "{text}");
        assert!(text.contains("# TYPE process_cpu_seconds_total counter"), "{text}");
    }
}
