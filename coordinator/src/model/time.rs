//! Milliseconds since the epoch, the clock that gives them, and their one
//! conversion to and from protobuf timestamps.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The wall clock now, in milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Milliseconds since the epoch as a protobuf timestamp.
pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

/// A protobuf timestamp in milliseconds since the epoch.
pub fn from_timestamp(t: &prost_types::Timestamp) -> i64 {
    t.seconds.saturating_mul(1000).saturating_add(i64::from(t.nanos) / 1_000_000)
}

/// Where the farm's transitions read the time: the system's in the
/// coordinator, one the test moves by hand in tests.
pub trait Clock: Send + Sync {
    /// Milliseconds since the epoch; never goes back.
    fn now_ms(&self) -> i64;
}

/// The wall clock read at start, advanced by a monotonic clock since: a
/// wall-clock step (NTP) neither declares agents lost nor revives them.
pub struct SystemClock {
    start_ms: i64,
    start: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock { start_ms: now_ms(), start: Instant::now() }
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        self.start_ms.saturating_add(i64::try_from(self.start.elapsed().as_millis()).unwrap_or(i64::MAX))
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn at(ms: i64) -> Self {
        ManualClock(AtomicI64::new(ms))
    }

    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_before_and_after_the_epoch() {
        for ms in [0, 1, 999, 1000, 1_700_000_000_123, -1, -1001] {
            assert_eq!(from_timestamp(&timestamp(ms)), ms, "{ms}");
        }
    }
}
