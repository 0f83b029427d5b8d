//! The coordinator's HTTP side: the dashboard and its JSON API, `/metrics`,
//! `/healthz`, `/readyz`; who may read what is `http_auth`'s.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::{Path, Query};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Json};
use serde_json::{Value, json};

use axum::routing::{get, post};
use braid_shared::proto::build_event::Kind;

use crate::farm::BuildEntry;
use crate::listener::Conn;
use crate::state::Coordinator;

// Everything the dashboard needs is in the binary: it runs on networks
// without internet.
const INDEX_HTML: &str = include_str!("dashboard/index.html");
const BUILD_HTML: &str = include_str!("dashboard/build.html");
const STYLE_CSS: &str = include_str!("dashboard/style.css");
const COMMON_JS: &str = include_str!("dashboard/common.js");

fn secs(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

/// The phase a job is in now, drawn growing to the clock (`end: null`):
/// waiting in the queue, running on its agent (the agent reports its own
/// phases with its result), or being verified.
fn live_phase(j: &crate::model::JobRecord, created_ms: i64) -> Option<Value> {
    use crate::model::JobStatus;
    let last_end = j.phases.last().map(|p| p.end_ms);
    let (phase, start) = match &j.status {
        JobStatus::Pending => ("queued", j.queued_ms.unwrap_or(created_ms)),
        JobStatus::Assigned { .. } | JobStatus::Building { .. } => ("running", last_end?),
        JobStatus::Pushed { .. } => ("verify", j.result_ms.or(last_end)?),
        _ => return None,
    };
    Some(json!({"phase": phase, "start": secs(start), "end": null, "live": true}))
}

/// A build as the dashboard shows it; `now` (ms) dates the running phases.
pub(crate) fn build_json(b: &BuildEntry, now: i64) -> Value {
    let r = &b.record;
    let jobs: Vec<Value> = r
        .jobs
        .iter()
        .map(|j| {
            let mut phases: Vec<Value> = j
                .phases
                .iter()
                .map(|p| json!({"phase": p.phase.as_str(), "start": secs(p.start_ms), "end": secs(p.end_ms)}))
                .collect();
            phases.extend(live_phase(j, r.created_ms));
            let took = j.started_ms.map(|s| secs(j.finished_ms.unwrap_or(now).max(s) - s));
            json!({
                "duration": took, "started": j.started_ms.map(secs), "finished": j.finished_ms.map(secs),
                "platform": j.platform.to_string(), "state": j.status.as_str(), "agent": j.last_agent,
                "attempt": j.attempt, "emulated": j.emulated, "message": j.message, "phases": phases,
                "result": j.result.as_ref().map(|i| json!({"digest": i.digest, "size": i.size})),
            })
        })
        .collect();
    json!({
        "build_id": r.id, "state": r.status.as_str(), "message": r.message, "tags": b.spec.tags,
        "platforms": b.spec.platforms, "created": secs(r.created_ms), "finished": r.finished_ms.map(secs),
        "merge_started": r.merge_started_ms.map(secs), "submitter": r.owner,
        "duration": secs(r.finished_ms.unwrap_or(now).max(r.created_ms) - r.created_ms), "now": secs(now),
        "index": r.index.as_ref().map(|i| json!({"digest": i.digest, "size": i.size})), "jobs": jobs,
    })
}

async fn overview(State(c): State<Arc<Coordinator>>) -> Json<Value> {
    let farm = c.farm();
    let gauges = farm.gauges();
    let mut platforms: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
    for a in farm.agent_list() {
        let builder = a.builder.as_ref().map(|b| b.label()).unwrap_or_default();
        let capabilities = a.builder.as_ref().map(|b| b.capabilities.names()).unwrap_or_default();
        let labels = farm.labels_of(&a.name);
        let entry = |emulated: bool| {
            json!({"name": a.name, "state": a.state().as_str(), "running": a.running.len(), "slots": a.slots,
                "emulated": emulated, "builder": builder, "capabilities": capabilities, "labels": labels})
        };
        for p in &a.platforms {
            platforms.entry(p.to_string()).or_default().push(entry(false));
        }
        for p in &a.emulates {
            platforms.entry(p.to_string()).or_default().push(entry(true));
        }
    }
    let queue: serde_json::Map<String, Value> = gauges
        .queues
        .iter()
        .map(|(p, (depth, oldest))| (p.clone(), json!({"depth": depth, "oldest_seconds": oldest})))
        .collect();
    let agents: Vec<Value> = farm.agent_list().into_iter().map(agent_health_json).collect();
    let mut builds: Vec<&BuildEntry> = farm.builds.values().collect();
    builds.sort_by_key(|b| std::cmp::Reverse(b.record.order));
    let now = farm.now();
    let builds: Vec<Value> = builds.into_iter().take(25).map(|b| build_json(b, now)).collect();
    Json(json!({
        "agents_connected": gauges.agents_connected, "jobs_queued": gauges.jobs_queued,
        "jobs_running": gauges.jobs_running, "platforms": platforms, "queue": queue, "builds": builds,
        "agents": agents, "agent_cards": crate::dashboard_api::agent_cards(&farm), "now": secs(now),
        "leadership": c.leadership.json(),
    }))
}

/// An agent's row in the dashboard's health table: sizes shown as
/// `braid agents` shows them, `null` where not known.
pub(crate) fn agent_health_json(a: &crate::farm::AgentEntry) -> Value {
    use braid_shared::health::{certificate_days_left, certificate_expiring, human_bytes};
    let Some(h) = a.health.as_ref().filter(|_| a.connected && !a.lost) else {
        return json!({"name": a.name, "state": a.state().as_str()});
    };
    let now = braid_shared::health::now_seconds();
    let cert = (h.certificate_not_after != 0).then(|| {
        json!({"days_left": certificate_days_left(h.certificate_not_after, now),
            "expiring": certificate_expiring(h.certificate_not_before, h.certificate_not_after, now)})
    });
    json!({
        "name": a.name, "state": a.state().as_str(), "disk_free": human_bytes(h.disk_free_bytes),
        "builder_cache": (!h.builder_cache_unknown).then(|| human_bytes(h.builder_cache_bytes)),
        "context_cache": human_bytes(h.context_cache_bytes), "load1": h.load1, "running": h.running_jobs,
        "memory": format!("{} / {}", human_bytes(h.memory_available_bytes), human_bytes(h.memory_total_bytes)),
        "certificate": cert,
    })
}

async fn build(State(c): State<Arc<Coordinator>>, Path(id): Path<String>) -> impl IntoResponse {
    let farm = c.farm();
    match farm.build(&id) {
        Ok(b) => (StatusCode::OK, Json(build_json(b, farm.now()))),
        Err(e) => (StatusCode::NOT_FOUND, Json(json!({"error": e.to_string()}))),
    }
}

#[derive(serde::Deserialize)]
struct After {
    #[serde(default)]
    after: u64,
}

/// Log lines and notices after a sequence number, at most 1000 at a time.
async fn events(
    State(c): State<Arc<Coordinator>>,
    Path(id): Path<String>,
    Query(q): Query<After>,
) -> impl IntoResponse {
    if c.farm().build(&id).is_err() {
        return (StatusCode::NOT_FOUND, Json(json!([])));
    }
    let events = match c.store.events_after(&id, q.after, 1000) {
        Ok(e) => e,
        Err(_) => return (StatusCode::SERVICE_UNAVAILABLE, Json(json!([]))),
    };
    let out: Vec<Value> = events
        .iter()
        .map(|e| match &e.kind {
            Some(Kind::Log(l)) => json!({"seq": e.seq, "type": "log", "platform": l.platform, "line": l.line}),
            Some(Kind::Notice(n)) => json!({"seq": e.seq, "type": "notice", "text": n.text}),
            _ => json!({"seq": e.seq, "type": "state"}),
        })
        .collect();
    (StatusCode::OK, Json(Value::Array(out)))
}

pub fn router(coordinator: Arc<Coordinator>) -> Router {
    let auth = Arc::new(crate::http_auth::HttpAuth::new(coordinator.clone()));
    Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/builds/{id}", get(|| async { Html(BUILD_HTML) }))
        .route("/static/style.css", get(|| async { ([(header::CONTENT_TYPE, "text/css")], STYLE_CSS) }))
        .route("/static/common.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript")], COMMON_JS) }))
        .route("/api/overview", get(overview))
        .route("/api/session", get(crate::dashboard_api::session))
        .route("/api/builds", get(crate::dashboard_api::builds))
        .route("/api/builds/{id}", get(build))
        .route("/api/builds/{id}/cancel", post(crate::dashboard_api::cancel))
        .route("/api/agents/{name}/{action}", post(crate::dashboard_api::agent_action))
        .route("/api/builds/{id}/events", get(events))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(coordinator)
        .merge(crate::http_auth::routes(auth.clone()))
        .layer(axum::middleware::from_fn_with_state(auth, crate::http_auth::guard))
}

async fn metrics(State(c): State<Arc<Coordinator>>) -> impl IntoResponse {
    let mut gauges = c.farm().gauges();
    gauges.blob_store_bytes = c.blobs.stored_bytes();
    gauges.store_writable = writable(&c).await;
    let mut text = c.metrics.render(&gauges);
    text.push_str(&crate::process::render());
    let (errors, latency) = c.store.postgres().map_or((0, 0), |p| {
        (p.errors.load(std::sync::atomic::Ordering::Relaxed), p.latency_us.load(std::sync::atomic::Ordering::Relaxed))
    });
    c.leadership.render(&mut text, errors, latency);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Whether the data directory takes writes (probing it is blocking work).
async fn writable(c: &Arc<Coordinator>) -> bool {
    let disk = c.disk.clone();
    tokio::task::spawn_blocking(move || disk.writable()).await.unwrap_or(false)
}

/// Ready when the store answers and the data directory takes writes: a
/// full disk takes the coordinator out of rotation until it has room.
async fn readyz(State(c): State<Arc<Coordinator>>) -> impl IntoResponse {
    if c.store.contexts_by_age().is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n".to_owned());
    }
    if !writable(&c).await {
        let free = c.disk.free_bytes();
        return (StatusCode::SERVICE_UNAVAILABLE, format!("coordinator data dir full ({free} bytes free)\n"));
    }
    (
        StatusCode::OK,
        format!(
            "ready: leader (store {}, term {})\n",
            c.leadership.store_kind,
            c.store.postgres().map_or(0, |p| p.term())
        ),
    )
}

/// Serves the connections `listener::listen` hands over: HTTP/2 when they
/// opened with its preface, else HTTP/1 with a bound on the time to send a
/// request's headers (slow senders are closed, and so are idle keep-alive
/// connections once that time passes).
pub async fn serve_conns<S>(mut conns: tokio::sync::mpsc::Receiver<Conn<S>>, router: Router, header_timeout: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    let mut h1 = Builder::new(TokioExecutor::new()).http1_only();
    h1.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let mut h2 = Builder::new(TokioExecutor::new()).http2_only();
    h2.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(64);
    let (h1, h2) = (Arc::new(h1), Arc::new(h2));
    while let Some(conn) = conns.recv().await {
        let builder = if conn.is_h2() { h2.clone() } else { h1.clone() };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            if let Err(e) = builder.serve_connection(TokioIo::new(conn), service).await {
                tracing::debug!(error = %e, "http connection ended");
            }
        });
    }
}
