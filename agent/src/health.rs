//! The health report each heartbeat carries: free disk in the work
//! directory, the caches' sizes, running jobs, load, memory and the
//! certificate's validity. Reading /proc and statvfs and parsing the one
//! certificate are cheap and done at each heartbeat (so a renewed
//! certificate shows at once); walking the caches is not, and is done at
//! most once a minute, off the async threads.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use braid_shared::proto;

use crate::settings::Valid;

/// How long a measurement of the caches is reused.
pub const SLOW_EVERY: Duration = Duration::from_secs(60);

/// What takes a walk to know.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Slow {
    builder_cache_bytes: u64,
    context_cache_bytes: u64,
}

/// The agent's health, with the slow part cached.
#[derive(Default)]
pub struct Health {
    slow: Mutex<Option<(Instant, Slow)>>,
    /// A refresh is under way: heartbeats meanwhile use the last one.
    refreshing: std::sync::atomic::AtomicBool,
}

/// `MemTotal` and `MemAvailable` of /proc/meminfo, in bytes.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?.trim();
            let kib = rest.strip_suffix("kB").unwrap_or(rest).trim();
            kib.parse::<u64>().ok().map(|k| k.saturating_mul(1024))
        })
    };
    let total = field("MemTotal")?;
    // Kernels before 3.14 have no MemAvailable: free memory is the closest.
    let available = field("MemAvailable").or_else(|| field("MemFree"))?;
    Some((total, available.min(total)))
}

/// The 1-minute load average of /proc/loadavg.
pub fn parse_loadavg(text: &str) -> Option<f64> {
    let load: f64 = text.split_whitespace().next()?.parse().ok()?;
    (load.is_finite() && load >= 0.0).then_some(load)
}

/// Free bytes an unprivileged writer may use on the filesystem of `path`.
fn free_bytes(path: &Path) -> u64 {
    nix::sys::statvfs::statvfs(path).map(|s| s.blocks_available().saturating_mul(s.fragment_size())).unwrap_or(0)
}

fn measure_slow(settings: &Valid) -> Slow {
    let work_dir = &settings.settings.work_dir;
    // A Docker Engine's storage is its own: not measured (see `report`).
    let builder_cache_bytes = if settings.backend == "docker" { 0 } else { crate::prune::storage_bytes(work_dir) };
    let context_cache_bytes = crate::prune::disk_usage(&work_dir.join("contexts"));
    Slow { builder_cache_bytes, context_cache_bytes }
}

/// notBefore and notAfter of the certificate the agent uses now (renewal
/// replaces it in `Valid.tls`); (0, 0) without TLS.
fn certificate_validity(settings: &Valid) -> (i64, i64) {
    settings
        .tls
        .as_ref()
        .and_then(|tls| {
            let tls = tls.read().unwrap_or_else(|p| p.into_inner());
            braid_shared::pki::inspect_pem(&String::from_utf8_lossy(&tls.cert)).ok()
        })
        .map_or((0, 0), |info| (info.not_before, info.not_after))
}

impl Health {
    /// Measures the caches and the certificate again if the last
    /// measurement is older than `SLOW_EVERY`; returns at once, the new
    /// values reach a later report.
    pub fn refresh(self: &std::sync::Arc<Self>, settings: &Valid) {
        let fresh =
            self.slow.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|(at, _)| at.elapsed() < SLOW_EVERY);
        if fresh || self.refreshing.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let (me, settings) = (self.clone(), settings.clone());
        tokio::task::spawn_blocking(move || {
            let slow = measure_slow(&settings);
            *me.slow.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), slow));
            me.refreshing.store(false, std::sync::atomic::Ordering::Release);
        });
    }

    /// The report for a heartbeat now.
    pub fn report(self: &std::sync::Arc<Self>, settings: &Valid, running_jobs: usize) -> proto::AgentHealth {
        self.refresh(settings);
        let slow = self.slow.lock().unwrap_or_else(|p| p.into_inner()).map(|(_, s)| s).unwrap_or_default();
        let (memory_total_bytes, memory_available_bytes) =
            std::fs::read_to_string("/proc/meminfo").ok().as_deref().and_then(parse_meminfo).unwrap_or((0, 0));
        let load1 = std::fs::read_to_string("/proc/loadavg").ok().as_deref().and_then(parse_loadavg).unwrap_or(0.0);
        let (certificate_not_before, certificate_not_after) = certificate_validity(settings);
        proto::AgentHealth {
            disk_free_bytes: free_bytes(&settings.settings.work_dir),
            builder_cache_bytes: slow.builder_cache_bytes,
            builder_cache_unknown: settings.backend == "docker",
            context_cache_bytes: slow.context_cache_bytes,
            running_jobs: u32::try_from(running_jobs).unwrap_or(u32::MAX),
            load1,
            memory_total_bytes,
            memory_available_bytes,
            certificate_not_before,
            certificate_not_after,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn meminfo_gives_total_and_available_in_bytes() {
        let text =
            "MemTotal:        8041212 kB\nMemFree:          313464 kB\nMemAvailable:    5123456 kB\nBuffers: 1 kB\n";
        assert_eq!(parse_meminfo(text), Some((8_041_212 * 1024, 5_123_456 * 1024)));
        // An old kernel: free memory stands in for available.
        assert_eq!(parse_meminfo("MemTotal: 100 kB\nMemFree: 40 kB\n"), Some((102_400, 40_960)));
        // Never more available than there is; nothing without a total.
        assert_eq!(parse_meminfo("MemTotal: 10 kB\nMemAvailable: 20 kB\n"), Some((10_240, 10_240)));
        assert_eq!(parse_meminfo("MemFree: 40 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: lots kB\nMemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotalish: 1 kB\nMemFree: 1 kB\n"), None);
    }

    #[test]
    fn loadavg_gives_the_one_minute_average() {
        assert_eq!(parse_loadavg("0.52 0.58 0.59 1/467 12345\n"), Some(0.52));
        assert_eq!(parse_loadavg("12.00 1 1 1/1 1"), Some(12.0));
        for bad in ["", "  ", "-1 0 0", "NaN 0 0", "inf 0 0", "x 0 0"] {
            assert_eq!(parse_loadavg(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn this_host_reads() {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let (total, available) = parse_meminfo(&meminfo).unwrap();
        assert!(total > 0 && available <= total);
        assert!(parse_loadavg(&std::fs::read_to_string("/proc/loadavg").unwrap()).is_some());
        assert!(free_bytes(Path::new("/")) > 0);
    }
}
