//! `braid cache du` and `braid cache prune`: agents' builder caches, shown
//! and cleared as `docker buildx du` and `docker buildx prune` do, through
//! the coordinator (operate role).

use std::io::{BufRead, IsTerminal, Write};

use serde_json::{Value, json};

use braid_shared::health::human_bytes;
use braid_shared::proto::{self, CacheStatus};

use crate::conn::Conn;
use crate::ops::Format;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Show each agent's builder cache: one storage per platform (buildah,
    /// podman), its size, when a job last used it and the jobs using it now
    Du {
        /// Only this agent [default: every agent]
        #[arg(long, value_name = "NAME")]
        agent: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Clear builder caches: without --all, each storage's unused (dangling)
    /// images; storages a running job uses are skipped and named with its jobs
    Prune {
        /// Only this agent [default: every agent]
        #[arg(long, value_name = "NAME")]
        agent: Option<String>,
        /// Clear whole storages, not only unused images
        #[arg(long)]
        all: bool,
        /// until=DURATION: only storages no job used for that long (e.g. until=24h)
        #[arg(long, value_name = "FILTER")]
        filter: Vec<String>,
        /// Clear least recently used storages until at most SIZE remains (e.g. 10g, 512m)
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        keep_storage: Option<u64>,
        /// Do not prompt for confirmation
        #[arg(short, long)]
        force: bool,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

/// A size as docker's `--keep-storage` reads it (`braid_shared::size`).
pub fn parse_size(raw: &str) -> Result<u64, String> {
    match braid_shared::size::parse_ram(raw) {
        None => Err(format!("{raw:?}: expected a size like 512m, 10g or 1.5t")),
        Some(0) => Err(format!("{raw:?}: must be at least 1 byte")),
        Some(bytes) => Ok(bytes),
    }
}

/// `--filter` values: only `until=DURATION`, once.
fn until_seconds(filters: &[String]) -> anyhow::Result<u64> {
    let mut until = None;
    for f in filters {
        let Some(d) = f.strip_prefix("until=") else {
            anyhow::bail!("--filter {f:?}: only until=DURATION (e.g. until=24h) is supported");
        };
        if until.is_some() {
            anyhow::bail!("--filter {f:?}: until is given twice");
        }
        until = Some(braid_shared::duration::seconds(d).map_err(|e| anyhow::anyhow!("--filter {f:?}: {e}"))?);
    }
    Ok(until.unwrap_or(0))
}

fn status_word(status: i32) -> &'static str {
    match CacheStatus::try_from(status).unwrap_or(CacheStatus::Unspecified) {
        CacheStatus::Ok => "ok",
        CacheStatus::Offline => "offline",
        CacheStatus::TimedOut => "timed out",
        CacheStatus::Failed => "failed",
        CacheStatus::Unspecified => "unknown",
    }
}

fn iso(seconds: i64) -> String {
    if seconds <= 0 {
        return "-".into();
    }
    time::OffsetDateTime::from_unix_timestamp(seconds)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| "-".into())
}

fn agent_json(a: &proto::AgentCache) -> Value {
    let r = a.report.clone().unwrap_or_default();
    let entries: Vec<Value> = r
        .entries
        .iter()
        .map(|e| {
            json!({"name": e.name, "bytes": e.bytes, "last_used": e.last_used, "in_use_by": e.in_use_by,
                   "pruned": e.pruned})
        })
        .collect();
    let total: u64 = r.entries.iter().map(|e| e.bytes).sum();
    json!({
        "agent": a.agent, "status": status_word(a.status), "error": a.error, "backend": r.backend,
        "last_seen": a.last_seen, "unknown": r.unknown, "total_bytes": total,
        "reclaimed_bytes": r.reclaimed_bytes, "storages": entries,
    })
}

/// The line of an agent that did not answer, or None when it did.
fn trouble(a: &proto::AgentCache) -> Option<String> {
    match CacheStatus::try_from(a.status).unwrap_or(CacheStatus::Unspecified) {
        CacheStatus::Ok => None,
        CacheStatus::Offline => Some(format!("{}: offline (last seen {})", a.agent, iso(a.last_seen))),
        _ => Some(format!("{}: {}: {}", a.agent, status_word(a.status), a.error)),
    }
}

fn print_json(agents: &[proto::AgentCache]) {
    for a in agents {
        outln!("{}", agent_json(a));
    }
}

pub async fn run(conn: &Conn, command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Du { agent, format } => du(conn, agent, format).await,
        Command::Prune { agent, all, filter, keep_storage, force, format } => {
            let request = proto::CacheRequest {
                agent: agent.unwrap_or_default(),
                all,
                until_seconds: until_seconds(&filter)?,
                keep_storage_bytes: keep_storage.unwrap_or(0),
            };
            if !force && !confirm(&request)? {
                return Ok(1);
            }
            prune(conn, request, format).await
        }
    }
}

/// Asks on a terminal, as `buildx prune` does; elsewhere --force is needed.
fn confirm(r: &proto::CacheRequest) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("braid cache prune asks for confirmation on a terminal: pass --force to prune without it");
    }
    let whom = if r.agent.is_empty() { "every agent".to_owned() } else { format!("agent {}", r.agent) };
    let what = if r.all || r.keep_storage_bytes > 0 { "builder caches" } else { "unused builder images" };
    err!("WARNING! This will remove {what} on {whom}.\nAre you sure you want to continue? [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

async fn du(conn: &Conn, agent: Option<String>, format: Format) -> anyhow::Result<i32> {
    let named = agent.is_some();
    let mut admin = conn.admin().await?;
    let request = proto::CacheRequest { agent: agent.unwrap_or_default(), ..Default::default() };
    let agents = admin.cache_usage(request).await?.into_inner().agents;
    let failed = agents.iter().any(|a| {
        let s = CacheStatus::try_from(a.status).unwrap_or(CacheStatus::Unspecified);
        !(s == CacheStatus::Ok || (s == CacheStatus::Offline && !named))
    });
    if format == Format::Json {
        print_json(&agents);
        return Ok(i32::from(failed));
    }
    outln!("{:<20} {:<16} {:>8}  {:<21} IN USE BY", "AGENT", "STORAGE", "SIZE", "LAST USED");
    let mut total = 0;
    let mut notes = Vec::new();
    for a in &agents {
        if let Some(line) = trouble(a) {
            notes.push(line);
            continue;
        }
        let r = a.report.clone().unwrap_or_default();
        if r.unknown {
            outln!("{:<20} {:<16} {:>8}  {:<21} -", a.agent, format!("({})", r.backend), "?", "-");
        }
        for e in &r.entries {
            total += e.bytes;
            let users = if e.in_use_by.is_empty() { "-".to_owned() } else { e.in_use_by.join(",") };
            outln!("{:<20} {:<16} {:>8}  {:<21} {users}", a.agent, e.name, human_bytes(e.bytes), iso(e.last_used));
        }
    }
    outln!("Total: {}", human_bytes(total));
    for n in notes {
        outln!("{n}");
    }
    Ok(i32::from(failed))
}

async fn prune(conn: &Conn, request: proto::CacheRequest, format: Format) -> anyhow::Result<i32> {
    let mut admin = conn.admin().await?;
    let agents = admin.prune_cache(request).await?.into_inner().agents;
    let skipped = |a: &proto::AgentCache| -> Vec<String> {
        let r = a.report.clone().unwrap_or_default();
        r.entries
            .iter()
            .filter(|e| !e.pruned && !e.in_use_by.is_empty())
            .map(|e| format!("{} (in use by {})", e.name, e.in_use_by.join(", ")))
            .collect()
    };
    let incomplete = agents.iter().any(|a| a.status != CacheStatus::Ok as i32 || !skipped(a).is_empty());
    if format == Format::Json {
        print_json(&agents);
        return Ok(i32::from(incomplete));
    }
    let mut total = 0;
    for a in &agents {
        if let Some(line) = trouble(a) {
            outln!("{line}");
            continue;
        }
        let r = a.report.clone().unwrap_or_default();
        total += r.reclaimed_bytes;
        let pruned: Vec<&str> = r.entries.iter().filter(|e| e.pruned).map(|e| e.name.as_str()).collect();
        let mut line = format!("{}: reclaimed {}", a.agent, human_bytes(r.reclaimed_bytes));
        if !pruned.is_empty() {
            line.push_str(&format!(" from {}", pruned.join(", ")));
        }
        let skipped = skipped(a);
        if !skipped.is_empty() {
            line.push_str(&format!("; skipped {}", skipped.join(", ")));
        }
        outln!("{line}");
    }
    outln!("Total: {}", human_bytes(total));
    Ok(i32::from(incomplete))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_and_filters_read_like_buildx() {
        assert_eq!(super::parse_size("512m"), Ok(512 << 20));
        assert_eq!(super::parse_size("10GB"), Ok(10 << 30));
        assert_eq!(super::parse_size("1.5k"), Ok(1536));
        assert_eq!(super::parse_size("100"), Ok(100));
        assert!(super::parse_size("10x").unwrap_err().contains("\"10x\""));
        assert!(super::parse_size("0").is_err());
        assert_eq!(super::until_seconds(&["until=24h".into()]).unwrap(), 86_400);
        assert_eq!(super::until_seconds(&[]).unwrap(), 0);
        let e = super::until_seconds(&["type=regular".into()]).unwrap_err().to_string();
        assert!(e.contains("--filter \"type=regular\""), "{e}");
        assert!(super::until_seconds(&["until=1h".into(), "until=2h".into()]).is_err());
    }
}
