//! Commands for following and inspecting builds: `logs`, `inspect`, `builds`.

use serde_json::{Value, json};

use braid_shared::Platform;
use braid_shared::health::now_seconds;
use braid_shared::proto::{self, build_event::Kind};

use crate::conn::Conn;
use crate::describe::{build_state_name, event_line, job_word, seconds};
use crate::reconnect::{self, Patience};

/// How listings print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

fn time(t: &Option<prost_types::Timestamp>) -> Value {
    t.as_ref().map_or(Value::Null, |t| json!(t.seconds as f64 + f64::from(t.nanos) / 1e9))
}

fn image_json(r: &Option<proto::ImageResult>) -> Value {
    r.as_ref().map_or(Value::Null, |r| json!({"digest": r.digest, "size": r.size, "mediaType": r.media_type}))
}

pub fn event_json(e: &proto::BuildEvent) -> Value {
    let mut v = json!({"seq": e.seq, "build_id": e.build_id, "time": time(&e.time)});
    let extra = match &e.kind {
        Some(Kind::Build(b)) => {
            json!({"type": "build", "state": build_state_name(b.state), "message": b.message, "index": image_json(&b.index)})
        }
        Some(Kind::Job(j)) => json!({
            "type": "job", "job_id": j.job_id, "platform": j.platform, "state": job_word(j.state), "agent": j.agent,
            "attempt": j.attempt, "message": j.message, "result": image_json(&j.result), "emulated": j.emulated,
            "failed_step": j.failed_step.as_ref().map(failed_step_json),
        }),
        Some(Kind::Log(l)) => json!({"type": "log", "platform": l.platform, "line": l.line}),
        Some(Kind::Notice(n)) => json!({"type": "notice", "platform": n.platform, "text": n.text}),
        None => json!({"type": "unknown"}),
    };
    if let (Value::Object(m), Value::Object(x)) = (&mut v, extra) {
        m.extend(x);
    }
    v
}

/// Where a job failed: the step and its Dockerfile excerpt.
fn failed_step_json(f: &proto::FailedStep) -> Value {
    json!({
        "step": f.step, "dockerfile": f.dockerfile, "line": f.line, "end_line": f.end_line,
        "first_line": f.first_line, "lines": f.lines,
    })
}

fn event_platform(e: &proto::BuildEvent) -> Option<&str> {
    match &e.kind {
        Some(Kind::Log(l)) => Some(&l.platform),
        Some(Kind::Job(j)) => Some(&j.platform),
        Some(Kind::Notice(n)) if !n.platform.is_empty() => Some(&n.platform),
        _ => None,
    }
}

/// `braid logs`: a build's events from the start; `--follow` keeps going
/// until the build ends.
pub async fn logs(
    conn: &Conn,
    build_id: &str,
    platform: Option<&str>,
    follow: bool,
    format: Format,
) -> anyhow::Result<i32> {
    let only: Option<Platform> = platform.map(str::parse).transpose()?;
    if !follow {
        let mut client = conn.builds().await?;
        let request = proto::WatchRequest { build_id: build_id.to_owned(), after_seq: 0, history_only: true };
        let mut stream = client.watch(request).await?.into_inner();
        while let Some(event) = stream.message().await? {
            print_log_event(&event, only.as_ref(), format);
        }
        return Ok(0);
    }
    // Following: a coordinator that goes away is waited for, and the stream
    // resumes after the last event printed.
    let mut patience = Patience::new(reconnect::limit(None));
    let client = patience.connect(|| conn.builds()).await?;
    let mut after = 0;
    loop {
        let request = proto::WatchRequest { build_id: build_id.to_owned(), after_seq: after, history_only: false };
        let mut stream = patience
            .retry(|| {
                let (mut c, r) = (client.clone(), request.clone());
                async move { c.watch(r).await }
            })
            .await?
            .into_inner();
        loop {
            match stream.message().await {
                Ok(Some(event)) if event.seq <= after => {}
                Ok(Some(event)) => {
                    after = event.seq;
                    print_log_event(&event, only.as_ref(), format);
                    if build_ended(&event) {
                        return Ok(0);
                    }
                }
                // The build's last event ends the stream: one that ends
                // before it was cut short.
                Ok(None) => {
                    patience.wait(&"the event stream ended before the build did").await?;
                    break;
                }
                Err(e) if reconnect::transient(&e) => {
                    patience.wait(&e.message()).await?;
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn build_ended(event: &proto::BuildEvent) -> bool {
    let Some(Kind::Build(b)) = &event.kind else { return false };
    matches!(
        proto::BuildState::try_from(b.state).unwrap_or_default(),
        proto::BuildState::Succeeded | proto::BuildState::Failed | proto::BuildState::Cancelled
    )
}

fn print_log_event(event: &proto::BuildEvent, only: Option<&Platform>, format: Format) {
    if let Some(want) = only
        && event_platform(event).is_some_and(|p| p.parse::<Platform>().ok().as_ref() != Some(want))
    {
        return;
    }
    match format {
        Format::Json => outln!("{}", event_json(event)),
        Format::Table => {
            if let Some(line) = event_line(event, true) {
                outln!("{line}");
            }
        }
    }
}

pub fn build_json(b: &proto::Build) -> Value {
    let jobs: Vec<Value> = b
        .jobs
        .iter()
        .map(|j| {
            json!({
                "job_id": j.job_id, "platform": j.platform, "state": job_word(j.state), "agent": j.agent,
                "attempt": j.attempt, "emulated": j.emulated, "message": j.message, "result": image_json(&j.result),
                "started": time(&j.started), "finished": time(&j.finished), "seconds": seconds(j),
                "failed_step": j.failed_step.as_ref().map(failed_step_json),
                "footprint": j.footprint.as_ref().map(|f| json!({
                    "peak_memory_bytes": f.peak_memory_bytes, "cpu_millis": f.cpu_millis,
                    "out_of_memory": f.out_of_memory, "memory_limit_bytes": f.memory_limit_bytes, "agent": f.agent,
                })),
            })
        })
        .collect();
    let spec = b.spec.clone().unwrap_or_default();
    json!({
        "build_id": b.build_id, "state": build_state_name(b.state), "message": b.message,
        "tags": spec.tags, "platforms": spec.platforms, "context": spec.context_digest,
        "index": if b.index_digest.is_empty() { Value::Null } else {
            json!({"digest": b.index_digest, "size": b.index_size, "mediaType": b.index_media_type})
        },
        "created": time(&b.created), "finished": time(&b.finished), "jobs": jobs,
        "requirements": spec.requirements,
    })
}

/// `braid inspect`: one build, per platform.
pub async fn inspect(conn: &Conn, build_id: &str, format: Format) -> anyhow::Result<i32> {
    let mut client = conn.builds().await?;
    let b = client.get(proto::GetBuildRequest { build_id: build_id.to_owned() }).await?.into_inner();
    if format == Format::Json {
        outln!("{}", serde_json::to_string_pretty(&build_json(&b))?);
        return Ok(0);
    }
    outln!("build    {}", b.build_id);
    outln!("state    {}", build_state_name(b.state));
    if !b.message.is_empty() {
        outln!("message  {}", b.message);
    }
    if let Some(spec) = &b.spec {
        outln!("tags     {}", spec.tags.join(", "));
    }
    if !b.index_digest.is_empty() {
        outln!("index    {}", b.index_digest);
    }
    outln!();
    outln!("{:<14} {:<10} {:<16} {:>3} {:>7}  DIGEST", "PLATFORM", "STATE", "AGENT", "TRY", "SECONDS");
    for j in &b.jobs {
        let digest = j.result.as_ref().map_or("-", |r| r.digest.as_str());
        let short = digest.strip_prefix("sha256:").map_or(digest, |h| &h[..h.len().min(12)]);
        let agent = if j.emulated { format!("{}*", j.agent) } else { j.agent.clone() };
        outln!(
            "{:<14} {:<10} {:<16} {:>3} {:>7.1}  {}",
            j.platform,
            job_word(j.state),
            agent,
            j.attempt,
            seconds(j),
            short
        );
    }
    if b.jobs.iter().any(|j| j.emulated) {
        outln!("\n* emulated");
    }
    // Platforms the result cache answered (the coordinator's own words).
    for j in b.jobs.iter().filter(|j| j.message.contains(": unchanged since build ")) {
        outln!("{}", j.message);
    }
    for j in &b.jobs {
        if let Some(step) = &j.failed_step {
            outln!("\n{} failed at {}", j.platform, step.step);
            for line in crate::describe::excerpt(step) {
                outln!("{line}");
            }
        }
    }
    print_footprints(&b);
    Ok(0)
}

/// What each job used, as its agent measured it, and the build's
/// requirements: what `--require` and `--memory` are chosen from.
fn print_footprints(b: &proto::Build) {
    use braid_shared::placement::format_bytes;
    let spec = b.spec.clone().unwrap_or_default();
    if !spec.requirements.is_empty() {
        outln!("\nrequires {}", spec.requirements.join(" "));
    }
    if !b.jobs.iter().any(|j| j.footprint.is_some()) {
        return;
    }
    outln!("\n{:<14} {:>12} {:>9} {:<16} NOTE", "PLATFORM", "PEAK MEMORY", "CPU", "MEASURED ON");
    for j in &b.jobs {
        let Some(f) = &j.footprint else { continue };
        let cpu = if f.cpu_millis == 0 { "-".to_owned() } else { format!("{:.1}s", f.cpu_millis as f64 / 1000.0) };
        let mut note = Vec::new();
        if f.memory_limit_bytes != 0 {
            note.push(format!("limit {}", format_bytes(f.memory_limit_bytes)));
        }
        if f.out_of_memory {
            note.push("out of memory".to_owned());
        }
        let note = if note.is_empty() { "-".to_owned() } else { note.join(", ") };
        outln!("{:<14} {:>12} {:>9} {:<16} {note}", j.platform, format_bytes(f.peak_memory_bytes), cpu, f.agent);
    }
}

/// `braid builds`: recent builds, newest first.
pub async fn builds(conn: &Conn, state: Option<&str>, limit: u32, format: Format, wide: bool) -> anyhow::Result<i32> {
    let state = match state {
        None => proto::BuildState::Unspecified,
        Some(s) => {
            proto::BuildState::from_str_name(&format!("BUILD_STATE_{}", s.to_ascii_uppercase())).ok_or_else(|| {
                anyhow::anyhow!("unknown state {s:?}: queued, running, merging, succeeded, failed or cancelled")
            })?
        }
    };
    let mut client = conn.builds().await?;
    let list = client.list(proto::ListBuildsRequest { limit: limit.into(), state: state as i32 }).await?.into_inner();
    if format == Format::Json {
        let all: Vec<Value> = list.builds.iter().map(build_json).collect();
        outln!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(0);
    }
    out!("{}", crate::listing::builds_table(&list.builds, wide));
    Ok(0)
}

fn agent_json(a: &proto::AgentInfo) -> Value {
    json!({
        "name": a.name, "state": a.state, "platforms": a.platforms, "emulated_platforms": a.emulated_platforms,
        "backend": a.backend, "version": a.version, "slots": a.slots, "running": a.running,
        "last_heartbeat": time(&a.last_heartbeat), "running_jobs": a.running_jobs,
        "builder": a.builder.as_ref().map(|b| json!({
            "name": b.name, "version": b.version, "capabilities": b.capabilities,
        })),
        "health": a.health.as_ref().map(health_json),
        "connected": a.connected, "session": a.session,
        "labels": a.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
    })
}

fn health_json(h: &proto::AgentHealth) -> Value {
    use braid_shared::health::{certificate_days_left, certificate_expiring};
    let known = h.certificate_not_after != 0;
    let now = now_seconds();
    json!({
        "disk_free_bytes": h.disk_free_bytes,
        "builder_cache_bytes": (!h.builder_cache_unknown).then_some(h.builder_cache_bytes),
        "context_cache_bytes": h.context_cache_bytes, "running_jobs": h.running_jobs, "load1": h.load1,
        "memory_total_bytes": h.memory_total_bytes, "memory_available_bytes": h.memory_available_bytes,
        "certificate_not_before": known.then_some(h.certificate_not_before),
        "certificate_not_after": known.then_some(h.certificate_not_after),
        "certificate_days_left": known.then(|| certificate_days_left(h.certificate_not_after, now)),
        "certificate_expiring": certificate_expiring(h.certificate_not_before, h.certificate_not_after, now),
    })
}

/// `items` joined by commas, in lines of at most `width` characters (an
/// item longer than that alone on its line); none for no items.
fn wrap_list(items: &[String], width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let piece = if i + 1 < items.len() { format!("{item},") } else { item.clone() };
        match lines.last_mut() {
            Some(line) if line.chars().count() + piece.chars().count() <= width => line.push_str(&piece),
            _ => lines.push(piece),
        }
    }
    lines
}

/// The CERT column: days left, `!` when close to expiry; `-` unknown.
fn cert_cell(h: Option<&proto::AgentHealth>) -> String {
    use braid_shared::health::{certificate_days_left, certificate_expiring};
    let Some(h) = h.filter(|h| h.certificate_not_after != 0) else { return "-".into() };
    let now = now_seconds();
    let flag = if certificate_expiring(h.certificate_not_before, h.certificate_not_after, now) { "!" } else { "" };
    format!("{}d{flag}", certificate_days_left(h.certificate_not_after, now))
}

fn ago(t: &Option<prost_types::Timestamp>) -> String {
    let Some(t) = t else { return "-".into() };
    let s = (now_seconds() - t.seconds).max(0);
    match s {
        0..=99 => format!("{s}s"),
        100..=5999 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

/// `braid agents`: every agent, its platforms, state and load.
pub async fn agents(conn: &Conn, format: Format, wide: bool) -> anyhow::Result<i32> {
    let mut admin = conn.admin().await?;
    let agents = admin.list_agents(proto::ListAgentsRequest {}).await?.into_inner().agents;
    if format == Format::Json {
        let all: Vec<Value> = agents.iter().map(agent_json).collect();
        outln!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(0);
    }
    // 80 columns: emulated platforms carry a leading '~' and wrap in their
    // column, never cut. What each builder can do and the rest of the health
    // report: `--format json` (builder, health). DISK: free in the work dir;
    // CERT: days left, `!` under a third of its life or a week.
    outln!(
        "{:<14} {:<8} {:>5} {:>4} {:>4} {:>4} {:<15} PLATFORMS{}",
        "NAME",
        "STATE",
        "SLOTS",
        "SEEN",
        "DISK",
        "CERT",
        "BUILDER",
        if wide { "  LABELS" } else { "" }
    );
    for a in &agents {
        let mut platforms: Vec<String> = a.platforms.clone();
        platforms.extend(a.emulated_platforms.iter().map(|p| format!("~{p}")));
        let builder = match &a.builder {
            Some(b) => braid_shared::shorten(&format!("{} {}", b.name, b.version), 15),
            None => a.backend.clone(),
        };
        let name = if a.name.len() > 14 { format!("{}…", &a.name[..13]) } else { a.name.clone() };
        let disk =
            a.health.as_ref().map_or_else(|| "-".into(), |h| braid_shared::health::human_bytes(h.disk_free_bytes));
        let row = format!(
            "{:<14} {:<8} {:>5} {:>4} {:>4} {:>4} {:<15} ",
            name,
            a.state,
            format!("{}/{}", a.running, a.slots),
            ago(&a.last_heartbeat),
            disk,
            cert_cell(a.health.as_ref()),
            builder,
        );
        if wide {
            // One line per agent, whatever its width: platforms, then labels.
            let labels: std::collections::BTreeMap<_, _> = a.labels.iter().collect();
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            outln!("{row}{}  {}", platforms.join(","), if labels.is_empty() { "-".into() } else { labels.join(",") });
            continue;
        }
        let lines = wrap_list(&platforms, 80usize.saturating_sub(row.chars().count()));
        outln!("{row}{}", lines.first().map_or("-", String::as_str));
        for line in lines.iter().skip(1) {
            outln!("{:width$}{line}", "", width = row.chars().count());
        }
    }
    // Said in words too, on stderr: the table stays parseable.
    for a in &agents {
        if let Some(h) = a.health.as_ref().filter(|h| {
            braid_shared::health::certificate_expiring(h.certificate_not_before, h.certificate_not_after, now_seconds())
        }) {
            let days = braid_shared::health::certificate_days_left(h.certificate_not_after, now_seconds());
            errln!(
                "warning: agent {}'s certificate expires in {days} day(s) (at two thirds of its life it renews \
                 itself: see the agent's log; one given with --tls-cert needs `braid certs issue`)",
                a.name
            );
        }
    }
    Ok(0)
}

/// `braid cordon|uncordon|drain AGENT`; drain waits until the agent's
/// running jobs have finished.
pub async fn steer(conn: &Conn, name: &str, action: &str) -> anyhow::Result<i32> {
    let mut admin = conn.admin().await?;
    let request = proto::AgentRequest { name: name.to_owned() };
    let info = match action {
        "cordon" => admin.cordon(request).await?.into_inner(),
        "uncordon" => admin.uncordon(request).await?.into_inner(),
        _ => admin.drain(request).await?.into_inner(),
    };
    if action != "drain" {
        outln!("agent {} {}", info.name, info.state);
        return Ok(0);
    }
    let mut running = info.running;
    while running > 0 {
        crate::diag::note(&format!("draining {name}: {running} job(s) still running"));
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let agents = admin.list_agents(proto::ListAgentsRequest {}).await?.into_inner().agents;
        running = agents.iter().find(|a| a.name == name).map_or(0, |a| a.running);
    }
    outln!("agent {name} drained: no job running, no new job will be placed (uncordon to resume)");
    Ok(0)
}

/// `braid agents forget NAME`: revoke the agent's certificates and forget
/// its enrollment.
pub async fn forget(conn: &Conn, name: &str) -> anyhow::Result<i32> {
    let mut admin = conn.admin().await?;
    let r = admin.forget_agent(proto::AgentRequest { name: name.to_owned() }).await?.into_inner();
    outln!(
        "agent {name} forgotten: {} certificate(s) revoked, {}, {} running job(s) re-queued",
        r.revoked_serials,
        if r.disconnected { "its session closed" } else { "no live session" },
        r.requeued_jobs
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn platforms_wrap_at_commas_within_their_column() {
        let items: Vec<String> =
            ["linux/amd64", "~linux/arm64", "~linux/arm/v7", "~linux/riscv64"].map(String::from).to_vec();
        assert_eq!(super::wrap_list(&items, 26), ["linux/amd64,~linux/arm64,", "~linux/arm/v7,", "~linux/riscv64"]);
        assert_eq!(super::wrap_list(&items, 5), ["linux/amd64,", "~linux/arm64,", "~linux/arm/v7,", "~linux/riscv64"]);
        assert!(super::wrap_list(&[], 10).is_empty());
    }
}
