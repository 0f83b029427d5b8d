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
