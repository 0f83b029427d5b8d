//! Tokens, the roles they carry and the callers they authenticate.

use braid_shared::proto;

/// A token as stored (never its secret).
#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub id: String,
    pub role: String,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub single_use: bool,
    pub used: bool,
    pub revoked: bool,
    pub description: String,
    /// A join token bound to one agent name enrolls only that name.
    pub agent_name: Option<String>,
    /// A join token that may enroll its bound name again (`--replace`).
    pub replace: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Submit,
    Operate,
    Agent,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Submit => "submit",
            Role::Operate => "operate",
            Role::Agent => "agent",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "submit" => Some(Role::Submit),
            "operate" => Some(Role::Operate),
            "agent" => Some(Role::Agent),
            _ => None,
        }
    }

    pub fn from_proto(r: i32) -> Option<Role> {
        match proto::Role::try_from(r).ok()? {
            proto::Role::Submit => Some(Role::Submit),
            proto::Role::Operate => Some(Role::Operate),
            proto::Role::Agent => Some(Role::Agent),
            proto::Role::Unspecified => None,
        }
    }

    pub fn to_proto(self) -> proto::Role {
        match self {
            Role::Submit => proto::Role::Submit,
            Role::Operate => proto::Role::Operate,
            Role::Agent => proto::Role::Agent,
        }
    }
}

/// The authenticated caller of a client RPC.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's id; None for the loopback development mode without tokens.
    pub token_id: Option<String>,
    pub role: Role,
}

impl Caller {
    /// Whether the caller may see or steer a build owned by `owner`.
    pub fn owns(&self, owner: Option<&str>) -> bool {
        self.role == Role::Operate || self.token_id.is_none() || owner == self.token_id.as_deref()
    }
}
