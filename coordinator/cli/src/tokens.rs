//! `braid token`: create, revoke and list tokens (operate role).

use braid_shared::proto;

use crate::conn::Conn;
use crate::ops::Format;

pub async fn create(
    conn: &Conn,
    role: &str,
    ttl: Option<u32>,
    single_use: bool,
    description: &str,
) -> anyhow::Result<i32> {
    let role = match role {
        "submit" => proto::Role::Submit,
        "operate" => proto::Role::Operate,
        "agent" => proto::Role::Agent,
        other => anyhow::bail!("invalid role {other:?}: submit, operate or agent"),
    };
    let mut admin = conn.admin().await?;
    let request = proto::CreateTokenRequest {
        role: role as i32,
        ttl_seconds: ttl.unwrap_or(0),
        single_use,
        description: description.to_owned(),
    };
    let created = admin.create_token(request).await?.into_inner();
    eprintln!("token {} created (shown once; stored only hashed)", created.token_id);
    println!("{}", created.token);
    Ok(0)
}

pub async fn revoke(conn: &Conn, id: &str) -> anyhow::Result<i32> {
    let mut admin = conn.admin().await?;
    let r = admin.revoke_token(proto::RevokeTokenRequest { token_id: id.to_owned() }).await?.into_inner();
    println!("token {id} {}", if r.revoked { "revoked" } else { "was already revoked or does not exist" });
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
                    "expires": t.expires.as_ref().map(|e| e.seconds),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(0);
    }
    println!("{:<14} {:<8} {:<10} DESCRIPTION", "TOKEN", "ROLE", "STATUS");
    for t in tokens {
        let status = if t.revoked {
            "revoked"
        } else if t.used {
            "used"
        } else {
            "active"
        };
        println!("{:<14} {:<8} {:<10} {}", t.token_id, role_name(t.role), status, t.description);
    }
    Ok(0)
}
