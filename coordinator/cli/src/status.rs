//! `braid status`: which coordinator leads, its term, and the store's kind
//! and health, as the coordinator that answered sees them.

use braid_shared::proto;
use serde_json::json;

use crate::conn::Conn;
use crate::ops::Format;

pub async fn status(conn: &Conn, format: Format) -> anyhow::Result<i32> {
    let mut admin = conn.admin_here().await?;
    let s = match admin.coordinator_status(proto::CoordinatorStatusRequest {}).await {
        Ok(s) => s.into_inner(),
        // A follower answers with where the leader is, and nothing else.
        Err(status) => match crate::conn::named_leader(&status) {
            Some(leader) => return follower(&leader, status.message(), format),
            None => return Err(status.into()),
        },
    };
    if format == Format::Json {
        let value = json!({
            "leader": s.leader, "term": s.term, "leader_address": s.leader_address, "store": s.store,
            "store_healthy": s.store_healthy, "store_errors": s.store_errors, "version": s.version,
        });
        outln!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(0);
    }
    let role = if s.leader { "leader" } else { "follower" };
    outln!("role     {role}");
    outln!("leader   {}", if s.leader_address.is_empty() { "(none)" } else { &s.leader_address });
    outln!("term     {}", s.term);
    let health = if s.store_healthy { "healthy" } else { "NOT answering" };
    outln!("store    {} ({health}, {} failed calls)", s.store, s.store_errors);
    outln!("version  {}", s.version);
    Ok(if s.store_healthy { 0 } else { 1 })
}

/// What a follower said: it follows, and which coordinator leads.
fn follower(leader: &str, message: &str, format: Format) -> anyhow::Result<i32> {
    let term: i64 =
        message.rsplit_once("(term ").and_then(|(_, t)| t.trim_end_matches(')').parse().ok()).unwrap_or_default();
    if format == Format::Json {
        let value = json!({ "leader": false, "term": term, "leader_address": leader });
        outln!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(0);
    }
    outln!("role     follower");
    outln!("leader   {leader}");
    outln!("term     {term}");
    Ok(0)
}
