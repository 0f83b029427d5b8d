//! Which agent versions a coordinator accepts in a session's hello.
//!
//! Policy (README "Compatibility"): an agent is accepted if it has the
//! coordinator's major version and, while the major version is 0, also
//! its minor version; patch levels (and pre-release or build suffixes) may
//! differ either way. So a 0.1.x coordinator takes 0.1.x agents, a 1.4.2
//! coordinator takes every 1.y.z agent. Upgrade the coordinator first,
//! then roll the agents.

use std::fmt;

/// A `MAJOR.MINOR.PATCH` version; a suffix after `-` or `+` is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
}

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        let core = s.split(['-', '+']).next().unwrap_or_default();
        let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
        let v = Version { major: parts.next()??, minor: parts.next()??, patch: parts.next()?? };
        parts.next().is_none().then_some(v)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The agent versions a coordinator of version `coordinator` accepts, as
/// `>=LOW, <HIGH`.
pub fn supported_range(coordinator: Version) -> String {
    if coordinator.major == 0 {
        format!(">=0.{}.0, <0.{}.0", coordinator.minor, coordinator.minor + 1)
    } else {
        format!(">={}.0.0, <{}.0.0", coordinator.major, coordinator.major + 1)
    }
}

/// Whether a coordinator of version `coordinator` accepts an agent saying
/// `agent`; if not, why, naming both versions and the supported range.
pub fn check_agent(agent: &str, coordinator: &str) -> Result<(), String> {
    let Some(ours) = Version::parse(coordinator) else {
        // Our own version is a build constant; a non-semver one (a local
        // build) accepts every agent rather than none.
        return Ok(());
    };
    let shown = crate::shorten(agent, 64);
    let accepted =
        Version::parse(agent).is_some_and(|v| v.major == ours.major && (ours.major > 0 || v.minor == ours.minor));
    if accepted {
        return Ok(());
    }
    Err(format!(
        "agent version {shown:?} is not supported by coordinator version {coordinator}: this coordinator accepts \
         agents {} (the same major version, and in 0.x the same minor version; upgrade the coordinator first, then \
         the agents)",
        supported_range(ours)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_x_accepts_the_same_minor_only() {
        assert!(check_agent("0.1.0", "0.1.0").is_ok());
        assert!(check_agent("0.1.7", "0.1.2").is_ok(), "a newer patch");
        assert!(check_agent("0.1.0-rc.1", "0.1.3").is_ok(), "a pre-release of the same minor");
        for bad in ["0.2.0", "0.0.9", "1.1.0", "99.0.0", "", "0", "1.2", "x.y.z", "1.2.3.4"] {
            let e = check_agent(bad, "0.1.3").unwrap_err();
            assert!(e.contains(&format!("agent version {bad:?}")), "{e}");
            assert!(e.contains("coordinator version 0.1.3"), "{e}");
            assert!(e.contains(">=0.1.0, <0.2.0"), "{e}");
        }
    }

    #[test]
    fn from_one_on_the_major_version_decides() {
        assert!(check_agent("1.0.0", "1.4.2").is_ok(), "an older minor");
        assert!(check_agent("1.9.0+abc", "1.4.2").is_ok(), "a newer minor");
        let e = check_agent("2.0.0", "1.4.2").unwrap_err();
        assert!(e.contains(">=1.0.0, <2.0.0"), "{e}");
        assert!(check_agent("0.9.0", "1.0.0").is_err());
    }

    #[test]
    fn a_hostile_version_is_shortened_and_a_local_build_accepts_all() {
        let long = "9".repeat(500);
        assert!(check_agent(&long, "0.1.0").unwrap_err().len() < 300);
        assert!(check_agent("0.5.0", "dev").is_ok());
    }
}
