//! What the coordinator knows of an agent that is not its session.

use braid_shared::limits;

/// An agent as `braid agents` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AgentState {
    Idle,
    Busy,
    Cordoned,
    Draining,
    Lost,
}

impl AgentState {
    /// The one word for each state, in the CLI, the dashboard and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Idle => "idle",
            AgentState::Busy => "busy",
            AgentState::Cordoned => "cordoned",
            AgentState::Draining => "draining",
            AgentState::Lost => "lost",
        }
    }
}

/// The certificate an agent's session was opened with, kept with the
/// session to decide whether a later one may replace it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertStamp {
    /// Lowercase hex serial.
    pub serial: String,
    /// When the coordinator recorded it, milliseconds: later is newer.
    pub issued_ms: i64,
}

/// Agent names: what `Hello.name`, `JoinRequest.name` and a join token's
/// binding may be.
pub fn valid_agent_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= limits::AGENT_NAME_BYTES
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The last message of an agent process the coordinator applied: an
/// agent numbers what it sends within one incarnation (one process), and a
/// number at or below `seq` of the same incarnation is a resend, applied
/// already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub incarnation: String,
    pub seq: u64,
}

/// What to do with a numbered message from an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// New: apply it, then acknowledge it.
    Apply,
    /// Applied before (a resend after a reconnect): acknowledge it only.
    Duplicate,
    /// From a session that is no longer the agent's: neither (the agent
    /// sends it again on its live session).
    Stale,
}

/// The platforms an agent declared at its last hello and when it was last
/// heard of; kept in the store so that a platform some agent once built
/// is still known after a restart (a build for it waits rather than fails).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    pub platforms: Vec<braid_shared::Platform>,
    pub emulates: Vec<braid_shared::Platform>,
    pub last_seen_ms: i64,
    /// Its labels as its last hello reported them (checked).
    pub labels: braid_shared::placement::Labels,
}

/// An agent's builder, as its hello reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Builder {
    pub name: String,
    pub version: String,
    pub capabilities: braid_shared::capability::CapSet,
}

impl Builder {
    /// Checks `Hello.builder`: a short name and version, known capability
    /// names, a bounded list. Absent (an older agent): no capabilities.
    pub fn from_hello(info: Option<&braid_shared::proto::BuilderInfo>) -> Result<Option<Builder>, String> {
        let Some(info) = info else { return Ok(None) };
        let printable = |s: &str| s.chars().all(|c| c.is_ascii_graphic() || c == ' ');
        if info.name.is_empty() || info.name.len() > limits::BUILDER_NAME_BYTES || !printable(&info.name) {
            return Err(format!(
                "hello.builder.name: {:?} must be 1 to {} printable ASCII bytes",
                braid_shared::shorten(&info.name, 40),
                limits::BUILDER_NAME_BYTES
            ));
        }
        if info.version.len() > limits::BUILDER_VERSION_BYTES || !printable(&info.version) {
            return Err(format!(
                "hello.builder.version: at most {} printable ASCII bytes",
                limits::BUILDER_VERSION_BYTES
            ));
        }
        let all = braid_shared::capability::Capability::ALL.len();
        if info.capabilities.len() > all {
            return Err(format!("hello.builder.capabilities: more than the {all} known"));
        }
        let capabilities = braid_shared::capability::CapSet::parse(&info.capabilities)
            .map_err(|e| format!("hello.builder.capabilities: {e}"))?;
        Ok(Some(Builder { name: info.name.clone(), version: info.version.clone(), capabilities }))
    }

    pub fn to_proto(&self) -> braid_shared::proto::BuilderInfo {
        braid_shared::proto::BuilderInfo {
            name: self.name.clone(),
            version: self.version.clone(),
            capabilities: self.capabilities.names(),
        }
    }

    /// "buildah 1.28.2", as messages name it.
    pub fn label(&self) -> String {
        if self.version.is_empty() { self.name.clone() } else { format!("{} {}", self.name, self.version) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid_shared::proto::BuilderInfo;

    #[test]
    fn a_hello_builder_is_checked_by_field() {
        let info = |name: &str, version: &str, caps: &[&str]| BuilderInfo {
            name: name.into(),
            version: version.into(),
            capabilities: caps.iter().map(|c| (*c).to_owned()).collect(),
        };
        let b = Builder::from_hello(Some(&info("buildah", "1.28.2", &["secrets", "ssh"]))).unwrap().unwrap();
        assert_eq!((b.label().as_str(), b.capabilities.names().len()), ("buildah 1.28.2", 2));
        assert_eq!(Builder::from_hello(None).unwrap(), None, "an older agent reports none");
        for (bad, says) in [
            (info("", "1", &[]), "hello.builder.name"),
            (info(&"b".repeat(33), "1", &[]), "hello.builder.name"),
            (info("bu\nildah", "1", &[]), "hello.builder.name"),
            (info("buildah", &"1".repeat(129), &[]), "hello.builder.version"),
            (
                info("buildah", "1", &["secrets", "teleport"]),
                "hello.builder.capabilities: unknown builder capability \"teleport\"",
            ),
            (info("buildah", "1", &["ssh"; 20]), "hello.builder.capabilities: more than the 19 known"),
        ] {
            let e = Builder::from_hello(Some(&bad)).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }
}
