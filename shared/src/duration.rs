//! Durations as flags take them: `90s`, `20m`, `1h30m`, `7d`; a bare number
//! is seconds. One parser for every binary, so `--timeout` and `--ttl` accept
//! the same spellings everywhere.
//!
//! Hand-written rather than `humantime`: that crate refuses a bare number
//! (`--ttl 86400`, which scripts and the Ansible role pass) and accepts
//! sub-second units the wire's whole seconds cannot carry.

use crate::limits;

/// A duration flag that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("invalid duration {0:?}: use e.g. 90s, 20m, 1h30m or 7d")]
    Syntax(String),
    #[error("invalid duration {raw:?}: {range}")]
    Range { raw: String, range: &'static str },
}

/// Seconds in `raw`: numbers each followed by `d`, `h`, `m` or `s` (a last
/// number without a unit is seconds). Overflow is an error, never a wrap.
pub fn seconds(raw: &str) -> Result<u64, DurationError> {
    let err = || DurationError::Syntax(raw.to_owned());
    if raw.is_empty() {
        return Err(err());
    }
    let mut total: u64 = 0;
    let mut number: Option<u64> = None;
    for c in raw.chars() {
        if let Some(digit) = c.to_digit(10) {
            let n = number.unwrap_or(0).checked_mul(10).and_then(|n| n.checked_add(u64::from(digit)));
            number = Some(n.ok_or_else(err)?);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 24 * 3600,
            _ => return Err(err()),
        };
        let n = number.take().ok_or_else(err)?;
        total = n.checked_mul(unit).and_then(|s| total.checked_add(s)).ok_or_else(err)?;
    }
    if let Some(n) = number {
        total = total.checked_add(n).ok_or_else(err)?;
    }
    Ok(total)
}

/// A build's `--timeout`: 1 second to 7 days.
pub fn build_timeout(raw: &str) -> Result<u32, DurationError> {
    bounded(raw, 1, limits::BUILD_TIMEOUT_SECONDS, "from 1s to 7 days")
}

/// A token's `--ttl`: up to 10 years; `0` means it never expires.
pub fn token_ttl(raw: &str) -> Result<u32, DurationError> {
    bounded(raw, 0, limits::TOKEN_TTL_SECONDS, "up to 10 years (0 never expires)")
}

fn bounded(raw: &str, min: u64, max: u64, range: &'static str) -> Result<u32, DurationError> {
    let out_of_range = || DurationError::Range { raw: raw.to_owned(), range };
    let total = seconds(raw)?;
    if total < min || total > max {
        return Err(out_of_range());
    }
    u32::try_from(total).map_err(|_| out_of_range())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        for (raw, want) in
            [("90", 90), ("90s", 90), ("20m", 1200), ("1h30m", 5400), ("1h30", 3630), ("24h", 86400), ("7d", 604800)]
        {
            assert_eq!(seconds(raw), Ok(want), "{raw}");
        }
        for raw in ["", "h", "1x", "-1s", "1.5h", "1 h", "m5", "99999999999999999999s", "18446744073709551615d"] {
            assert_eq!(seconds(raw), Err(DurationError::Syntax(raw.to_owned())), "{raw}");
        }
    }

    #[test]
    fn bounds() {
        assert_eq!(build_timeout("7d"), Ok(604800));
        let e = build_timeout("0s").unwrap_err().to_string();
        assert_eq!(e, r#"invalid duration "0s": from 1s to 7 days"#);
        assert!(build_timeout("169h").is_err());
        assert_eq!(token_ttl("0"), Ok(0), "0 never expires");
        assert_eq!(token_ttl("3650d"), Ok(3650 * 86400));
        assert!(token_ttl("3651d").unwrap_err().to_string().contains("10 years"));
    }

    proptest::proptest! {
        /// Whatever is typed, parsing returns, never panics; what it accepts
        /// is within bounds.
        #[test]
        fn any_input_is_bounded(raw in "[0-9smhd]{0,30}|\\PC{0,30}") {
            if let Ok(t) = token_ttl(&raw) {
                proptest::prop_assert!(u64::from(t) <= limits::TOKEN_TTL_SECONDS);
            }
            if let Ok(t) = build_timeout(&raw) {
                proptest::prop_assert!((1..=limits::BUILD_TIMEOUT_SECONDS).contains(&u64::from(t)));
            }
        }

        /// Days, hours, minutes and seconds written out parse back to their sum.
        #[test]
        fn written_durations_parse_back(d in 0u64..1000, h in 0u64..1000, m in 0u64..1000, s in 0u64..1000) {
            proptest::prop_assert_eq!(seconds(&format!("{d}d{h}h{m}m{s}s")), Ok(((d * 24 + h) * 60 + m) * 60 + s));
        }
    }
}
