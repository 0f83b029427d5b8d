//! Agents' health reports (`AgentHealth`): the bounds the coordinator
//! checks, and how the CLI and the dashboard show them.

use crate::proto::AgentHealth;

/// The most bytes any size in a report may say: 1 EiB.
pub const MAX_BYTES: u64 = 1 << 60;
/// The highest load average believed.
pub const MAX_LOAD: f64 = 1e6;
/// The latest certificate time believed: 9999-12-31T23:59:59Z.
pub const MAX_TIME_SECONDS: i64 = 253_402_300_799;
/// A certificate with less than this left is flagged, whatever its life.
pub const CERT_WARN_SECONDS: i64 = 7 * 86_400;

/// Checks a report's bounds; the error names the field.
pub fn check(h: &AgentHealth) -> Result<(), String> {
    for (field, bytes) in [
        ("disk_free_bytes", h.disk_free_bytes),
        ("builder_cache_bytes", h.builder_cache_bytes),
        ("context_cache_bytes", h.context_cache_bytes),
        ("memory_total_bytes", h.memory_total_bytes),
        ("memory_available_bytes", h.memory_available_bytes),
    ] {
        if bytes > MAX_BYTES {
            return Err(format!("heartbeat.health.{field}: {bytes} is over {MAX_BYTES}"));
        }
    }
    if h.memory_available_bytes > h.memory_total_bytes {
        return Err("heartbeat.health.memory_available_bytes: more than memory_total_bytes".into());
    }
    if h.builder_cache_unknown && h.builder_cache_bytes != 0 {
        return Err("heartbeat.health.builder_cache_bytes: must be 0 when builder_cache_unknown".into());
    }
    if h.running_jobs > crate::limits::AGENT_SLOTS {
        return Err(format!("heartbeat.health.running_jobs: over {}", crate::limits::AGENT_SLOTS));
    }
    if !(h.load1.is_finite() && (0.0..=MAX_LOAD).contains(&h.load1)) {
        return Err(format!("heartbeat.health.load1: {} is not 0 to {MAX_LOAD}", h.load1));
    }
    let (before, after) = (h.certificate_not_before, h.certificate_not_after);
    let none = before == 0 && after == 0;
    let valid = 0 <= before && before <= after && 0 < after && after <= MAX_TIME_SECONDS;
    if !(none || valid) {
        return Err(format!(
            "heartbeat.health.certificate_not_after: {before}..{after} is not a validity between 0 and {MAX_TIME_SECONDS}"
        ));
    }
    Ok(())
}

/// Whether a certificate valid from `not_before` to `not_after` (Unix
/// seconds) is close to expiry at `now`: under a third of its life or
/// under 7 days left (expired included). Unknown (0) is not.
pub fn certificate_expiring(not_before: i64, not_after: i64, now: i64) -> bool {
    if not_after == 0 {
        return false;
    }
    let left = not_after.saturating_sub(now);
    let life = not_after.saturating_sub(not_before).max(0);
    left < CERT_WARN_SECONDS || left.saturating_mul(3) < life
}

/// Now, in Unix seconds.
pub fn now_seconds() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Whole days a certificate has left at `now` (0 once expired).
pub fn certificate_days_left(not_after: i64, now: i64) -> i64 {
    not_after.saturating_sub(now).max(0) / 86_400
}

/// Bytes in at most 5 characters, binary units: `512B`, `9.5K`, `980M`, `12G`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "K", "M", "G", "T", "P"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else if value < 9.95 {
        format!("{value:.1}{}", UNITS[unit])
    } else {
        format!("{value:.0}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn good() -> AgentHealth {
        AgentHealth {
            disk_free_bytes: 50 << 30,
            builder_cache_bytes: 3 << 30,
            builder_cache_unknown: false,
            context_cache_bytes: 1 << 20,
            running_jobs: 2,
            load1: 0.5,
            memory_total_bytes: 8 << 30,
            memory_available_bytes: 4 << 30,
            certificate_not_before: 1_700_000_000,
            certificate_not_after: 1_700_000_000 + 90 * 86_400,
        }
    }

    #[test]
    fn a_report_is_checked_by_field() {
        check(&good()).unwrap();
        check(&AgentHealth::default()).unwrap();
        let cases: Vec<(AgentHealth, &str)> = vec![
            (AgentHealth { disk_free_bytes: u64::MAX, ..good() }, "disk_free_bytes"),
            (AgentHealth { context_cache_bytes: MAX_BYTES + 1, ..good() }, "context_cache_bytes"),
            (AgentHealth { memory_available_bytes: 9 << 30, ..good() }, "memory_available_bytes"),
            (AgentHealth { builder_cache_unknown: true, ..good() }, "builder_cache_bytes"),
            (AgentHealth { running_jobs: u32::MAX, ..good() }, "running_jobs"),
            (AgentHealth { load1: f64::NAN, ..good() }, "load1"),
            (AgentHealth { load1: f64::INFINITY, ..good() }, "load1"),
            (AgentHealth { load1: -0.5, ..good() }, "load1"),
            (AgentHealth { load1: 1e300, ..good() }, "load1"),
            (AgentHealth { certificate_not_after: i64::MAX, ..good() }, "certificate_not_after"),
            (AgentHealth { certificate_not_before: i64::MIN, ..good() }, "certificate_not_after"),
            (AgentHealth { certificate_not_after: 1, ..good() }, "certificate_not_after"),
            (AgentHealth { certificate_not_after: 0, ..good() }, "certificate_not_after"),
        ];
        for (bad, field) in cases {
            let e = check(&bad).unwrap_err();
            assert!(e.starts_with(&format!("heartbeat.health.{field}")), "{e}");
        }
    }

    #[test]
    fn a_certificate_is_flagged_under_a_third_of_its_life_or_a_week() {
        let day = 86_400;
        // 90 days: flagged from day 60 on.
        assert!(!certificate_expiring(0, 90 * day, 59 * day));
        assert!(certificate_expiring(0, 90 * day, 61 * day));
        // A year: flagged with a third (122 days) left.
        assert!(certificate_expiring(0, 366 * day, 250 * day));
        // A short life: flagged under 7 days left even at half of it.
        assert!(certificate_expiring(0, 12 * day, 6 * day));
        assert!(certificate_expiring(0, 90 * day, 91 * day), "expired");
        assert!(!certificate_expiring(0, 0, 5), "unknown");
        assert_eq!(certificate_days_left(90 * day, 60 * day + 1), 29);
        assert_eq!(certificate_days_left(90 * day, 91 * day), 0);
    }

    #[test]
    fn bytes_fit_five_characters() {
        for (bytes, shown) in [
            (0, "0B"),
            (999, "999B"),
            (1000, "1.0K"),
            (9 << 20, "9.0M"),
            (980 << 20, "980M"),
            (12 << 30, "12G"),
            (u64::MAX, "16384P"),
        ] {
            assert_eq!(human_bytes(bytes), shown);
        }
        for bytes in [1u64, 1023, 1024 * 1000, 5 << 40, MAX_BYTES] {
            assert!(human_bytes(bytes).len() <= 5, "{}", human_bytes(bytes));
        }
    }
}
