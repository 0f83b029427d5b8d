//! `braid token`: create, revoke and list tokens (operate role).

use braid_shared::proto;

use crate::conn::Conn;
use crate::ops::Format;

/// What `braid token create` asks for.
pub struct NewToken<'a> {
    pub role: &'a str,
    pub ttl: Option<u32>,
    pub single_use: bool,
    pub description: &'a str,
    /// The one agent name a join token may enroll.
    pub name: Option<&'a str>,
    /// The join token may re-enroll `name`.
    pub replace: bool,
}

pub async fn create(conn: &Conn, new: NewToken<'_>) -> anyhow::Result<i32> {
    let NewToken { role, ttl, single_use, description, name, replace } = new;
    let role = match role {
        "submit" => proto::Role::Submit,
        "operate" => proto::Role::Operate,
        "agent" => proto::Role::Agent,
        other => anyhow::bail!("invalid role {other:?}: submit, operate or agent"),
    };
    if role != proto::Role::Agent && (name.is_some() || replace) {
        anyhow::bail!("--name and --replace bind a join token to an agent: they need --role agent");
    }
    let mut admin = conn.admin().await?;
    let request = proto::CreateTokenRequest {
        role: role as i32,
        ttl_seconds: ttl.unwrap_or(0).into(),
        single_use,
        description: description.to_owned(),
        agent_name: name.unwrap_or_default().to_owned(),
        replace,
    };
    let created = admin.create_token(request).await?.into_inner();
    crate::diag::note(&format!("token {} created (shown once; stored only hashed)", created.token_id));
    outln!("{}", created.token);
    Ok(0)
}

pub async fn revoke(conn: &Conn, id: &str) -> anyhow::Result<i32> {
    let mut admin = conn.admin().await?;
    let r = admin.revoke_token(proto::RevokeTokenRequest { token_id: id.to_owned() }).await?.into_inner();
    outln!("token {id} {}", if r.revoked { "revoked" } else { "was already revoked or does not exist" });
    Ok(0)
}

fn role_name(r: i32) -> &'static str {
    match proto::Role::try_from(r).unwrap_or_default() {
        proto::Role::Submit => "submit",
        proto::Role::Operate => "operate",
        proto::Role::Agent => "agent",
        proto::Role::Unspecified => "?",
    }
}

pub async fn list(conn: &Conn, format: Format) -> anyhow::Result<i32> {
    let mut admin = conn.admin().await?;
    let tokens = admin.list_tokens(proto::ListTokensRequest {}).await?.into_inner().tokens;
    if format == Format::Json {
        let all: Vec<serde_json::Value> = tokens
            .iter()
            .map(|t| {
                serde_json::json!({
                    "token_id": t.token_id, "role": role_name(t.role), "single_use": t.single_use,
                    "used": t.used, "revoked": t.revoked, "description": t.description,
                    "agent_name": (!t.agent_name.is_empty()).then_some(&t.agent_name), "replace": t.replace,
                    "expires": t.expires.as_ref().map(|e| e.seconds),
                })
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(0);
    }
    outln!("{:<14} {:<8} {:<10} {:<24} DESCRIPTION", "TOKEN", "ROLE", "STATUS", "AGENT");
    for t in tokens {
        let status = if t.revoked {
            "revoked"
        } else if t.used {
            "used"
        } else {
            "active"
        };
        // A bound join token shows its name; `+replace` when it may re-enroll it.
        let agent = match (t.agent_name.as_str(), t.replace) {
            ("", _) => "-".to_owned(),
            (name, true) => format!("{name} +replace"),
            (name, false) => name.to_owned(),
        };
        outln!("{:<14} {:<8} {:<10} {:<24} {}", t.token_id, role_name(t.role), status, agent, t.description);
    }
    Ok(0)
}
