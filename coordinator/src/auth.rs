//! Who is calling: bearer tokens with a role for clients, certificates for
//! agents. Tokens are stored only as their sha256.

use std::sync::Arc;

use rand::RngCore;
use tonic::{Request, Status};

use crate::error::{CoordinatorError, Result};
pub use crate::model::{Caller, Role, TokenRecord};
use crate::model::{now_ms, valid_agent_name};
use crate::stores::Store;

/// Only join tokens are bound to a name, and only a bound one may replace:
/// an unbound `--replace` token would let its holder take over every name.
fn check_binding(role: Role, agent_name: Option<&str>, replace: bool) -> Result<()> {
    let invalid = |m: String| Err(CoordinatorError::InvalidArgument(m));
    if let Some(name) = agent_name {
        if role != Role::Agent {
            return invalid(format!(
                "agent_name: only a join token (role agent) is bound to a name, not role {}",
                role.name()
            ));
        }
        if !valid_agent_name(name) {
            return invalid(format!(
                "agent_name: {:?} must be 1 to {} letters, digits, '.', '_' or '-'",
                braid_shared::shorten(name, 80),
                braid_shared::limits::AGENT_NAME_BYTES
            ));
        }
    }
    if replace && role != Role::Agent {
        return invalid(format!("replace: only a join token (role agent) may replace, not role {}", role.name()));
    }
    if replace && agent_name.is_none() {
        return invalid("replace: needs agent_name (--name): a token that could re-enroll any name would let its holder take over every agent".into());
    }
    Ok(())
}

fn hash(token: &str) -> String {
    braid_shared::Digest::of(token.as_bytes()).to_string()
}

pub struct Tokens {
    store: Arc<Store>,
    /// Tokens are required (TLS mode); in the plaintext loopback mode a
    /// call without one acts as an operator.
    required: bool,
}

impl Tokens {
    pub fn new(store: Arc<Store>, required: bool) -> Tokens {
        Tokens { store, required }
    }

    /// Creates a token; returns its record and its secret (shown once).
    /// `agent_name` binds a join token to the one name it may enroll;
    /// `replace` lets it enroll that name although it is enrolled.
    pub fn create(
        &self,
        role: Role,
        ttl_seconds: u32,
        single_use: bool,
        description: &str,
        agent_name: Option<&str>,
        replace: bool,
    ) -> Result<(TokenRecord, String)> {
        if description.len() > 256 {
            return Err(CoordinatorError::InvalidArgument("description: at most 256 bytes".into()));
        }
        check_binding(role, agent_name, replace)?;
        // A token that takes over an enrolled name works once, whatever was asked.
        let single_use = single_use || replace;
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let token = format!("braid_{id}_{}", hex::encode(secret));
        let now = now_ms();
        let record = TokenRecord {
            id,
            role: role.name().to_owned(),
            created_ms: now,
            expires_ms: (ttl_seconds > 0).then(|| now + i64::from(ttl_seconds) * 1000),
            single_use,
            used: false,
            revoked: false,
            description: description.to_owned(),
            agent_name: agent_name.map(str::to_owned),
            replace,
        };
        self.store.token_insert(&record, &hash(&token))?;
        tracing::info!(
            token_id = %record.id,
            role = role.name(),
            single_use,
            ttl_seconds,
            agent_name = agent_name.unwrap_or_default(),
            replace,
            "token created"
        );
        Ok((record, token))
    }

    /// Whether calls need a token (TLS mode).
    pub fn required(&self) -> bool {
        self.required
    }

    /// The valid token behind `secret`, or why not.
    fn check(&self, secret: &str) -> std::result::Result<(TokenRecord, Role), Status> {
        if secret.len() > 200 {
            return Err(Status::unauthenticated("invalid token"));
        }
        self.check_hash(&hash(secret))
    }

    /// The valid token whose stored hash is `token_hash`, or why not.
    fn check_hash(&self, token_hash: &str) -> std::result::Result<(TokenRecord, Role), Status> {
        let record = self
            .store
            .token_by_hash(token_hash)
            .map_err(Status::from)?
            .ok_or_else(|| Status::unauthenticated("invalid token"))?;
        if record.revoked {
            return Err(Status::unauthenticated(format!("token {} was revoked", record.id)));
        }
        if record.expires_ms.is_some_and(|e| e < now_ms()) {
            return Err(Status::unauthenticated(format!("token {} has expired", record.id)));
        }
        if record.single_use && record.used {
            return Err(Status::unauthenticated(format!("token {} was already used", record.id)));
        }
        let role = Role::parse(&record.role).ok_or_else(|| Status::internal("stored token has an unknown role"))?;
        Ok((record, role))
    }

    /// Authorizes a client call that needs `needed` (operate satisfies submit).
    pub fn authorize<T>(&self, req: &Request<T>, needed: Role) -> std::result::Result<Caller, Status> {
        let header = req.metadata().get("authorization").map(|v| v.to_str().unwrap_or_default());
        self.authorize_header(header, needed)
    }

    /// Authorizes an HTTP request by its `Authorization` header, as
    /// `authorize` does a gRPC call.
    pub fn authorize_http(&self, headers: &axum::http::HeaderMap, needed: Role) -> std::result::Result<Caller, Status> {
        let header = headers.get(axum::http::header::AUTHORIZATION).map(|v| v.to_str().unwrap_or_default());
        self.authorize_header(header, needed)
    }

    fn authorize_header(&self, header: Option<&str>, needed: Role) -> std::result::Result<Caller, Status> {
        let Some(header) = header else {
            if self.required {
                return Err(Status::unauthenticated("missing bearer token (braid --token or BRAID_TOKEN)"));
            }
            return Ok(Caller { token_id: None, role: Role::Operate });
        };
        let secret = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| Status::unauthenticated("the authorization header must be 'Bearer <token>'"))?;
        self.authorize_secret(secret.trim(), needed).map(|(caller, _)| caller)
    }

    /// Authorizes the holder of `secret`; also returns the token's hash, which
    /// a dashboard session keeps instead of the secret.
    pub fn authorize_secret(&self, secret: &str, needed: Role) -> std::result::Result<(Caller, String), Status> {
        if secret.len() > 200 {
            return Err(Status::unauthenticated("invalid token"));
        }
        let token_hash = hash(secret);
        let caller = self.authorize_hash(&token_hash, needed)?;
        Ok((caller, token_hash))
    }

    /// Authorizes a dashboard session by the hash of the token it was opened
    /// with: a revoked or expired token ends its sessions.
    pub fn authorize_hash(&self, token_hash: &str, needed: Role) -> std::result::Result<Caller, Status> {
        let (record, role) = self.check_hash(token_hash)?;
        let allowed = role == needed || (role == Role::Operate && needed == Role::Submit);
        if !allowed {
            return Err(Status::permission_denied(format!(
                "token {} has the {} role; this needs {}",
                record.id,
                role.name(),
                needed.name()
            )));
        }
        Ok(Caller { token_id: Some(record.id), role })
    }

    /// A valid join token (agent role) that may enroll `name`; a single-use
    /// one is spent only when the enrollment is recorded
    /// (`Store::enroll_with_token`).
    pub fn join_token(&self, secret: &str, name: &str) -> std::result::Result<TokenRecord, Status> {
        let (record, role) = self.check(secret)?;
        if role != Role::Agent {
            return Err(Status::permission_denied(format!("token {} is not a join token (role agent)", record.id)));
        }
        if let Some(bound) = &record.agent_name
            && bound != name
        {
            return Err(Status::permission_denied(format!(
                "token {} is bound to agent {bound:?}; it cannot enroll {:?}",
                record.id,
                braid_shared::shorten(name, 80)
            )));
        }
        Ok(record)
    }

    pub fn revoke(&self, id: &str) -> Result<bool> {
        self.store.token_revoke(id)
    }

    pub fn list(&self) -> Result<Vec<TokenRecord>> {
        self.store.tokens()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bound_join_tokens_replace() {
        assert!(check_binding(Role::Agent, None, false).is_ok());
        assert!(check_binding(Role::Agent, Some("pi-01"), false).is_ok());
        assert!(check_binding(Role::Agent, Some("pi-01"), true).is_ok());
        let refused = |role, name, replace, want: &str| {
            let e = check_binding(role, name, replace).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        };
        refused(Role::Agent, None, true, "replace: needs agent_name");
        refused(Role::Submit, Some("pi-01"), false, "not role submit");
        refused(Role::Operate, None, true, "not role operate");
        refused(Role::Agent, Some("../x"), false, "agent_name: \"../x\"");
        refused(Role::Agent, Some(""), false, "agent_name");
    }

    #[test]
    fn a_bound_token_enrolls_its_name_only() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::new(Arc::new(Store::open(&dir.path().join("braid.db")).unwrap()), true);
        let (record, secret) = tokens.create(Role::Agent, 0, false, "", Some("pi-01"), true).unwrap();
        assert!(record.single_use, "a --replace token is single-use");
        let listed = tokens.list().unwrap();
        assert_eq!(listed[0].agent_name.as_deref(), Some("pi-01"));
        assert!(listed[0].replace);
        assert_eq!(tokens.join_token(&secret, "pi-01").unwrap().id, record.id);
        let e = tokens.join_token(&secret, "pi-02").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("\"pi-01\"") && e.message().contains("\"pi-02\""), "{}", e.message());
        let (_, unbound) = tokens.create(Role::Agent, 0, false, "", None, false).unwrap();
        assert!(tokens.join_token(&unbound, "anything").is_ok());
        let (_, submit) = tokens.create(Role::Submit, 0, false, "", None, false).unwrap();
        assert_eq!(tokens.join_token(&submit, "x").unwrap_err().code(), tonic::Code::PermissionDenied);
    }
}
