//! `braid cache du` and `braid cache prune`: the coordinator asks each
//! agent over its session (`CacheCommand`) and waits, bounded, for its
//! `CacheReport`. An agent that is not connected is reported offline, not
//! waited for; one that does not answer in time is reported timed out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use braid_shared::limits;
use braid_shared::proto::{self, CacheStatus, coordinator_message::Kind as ToAgent};

use crate::auth::Role;
use crate::model::valid_agent_name;
use crate::state::Coordinator;

/// Requests sent to agents and not answered yet: id -> (agent, waiter).
#[derive(Default)]
pub struct Pending {
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, (String, oneshot::Sender<proto::CacheReport>)>>,
}

impl Pending {
    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (String, oneshot::Sender<proto::CacheReport>)>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, agent: &str) -> (u64, oneshot::Receiver<proto::CacheReport>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        self.waiting().insert(id, (agent.to_owned(), tx));
        (id, rx)
    }

    fn forget(&self, id: u64) {
        self.waiting().remove(&id);
    }

    /// An agent's answer; kept only when that agent was asked under that
    /// id, and only within the report limits.
    pub fn answer(&self, agent: &str, report: proto::CacheReport) {
        let mut waiting = self.waiting();
        if waiting.get(&report.request_id).is_none_or(|(asked, _)| asked != agent) {
            tracing::debug!(agent, request_id = report.request_id, "an unasked cache report dropped");
            return;
        }
        if let Some((_, tx)) = waiting.remove(&report.request_id) {
            let _ = tx.send(checked(report));
        }
    }
}

/// Bounds what an agent reports: entries, names and error text.
fn checked(mut report: proto::CacheReport) -> proto::CacheReport {
    report.entries.truncate(limits::CACHE_STORAGES);
    for e in &mut report.entries {
        e.name = braid_shared::shorten(&e.name, 128);
        e.in_use_by.truncate(limits::AGENT_SLOTS as usize);
        e.in_use_by.iter_mut().for_each(|j| *j = braid_shared::shorten(j, 64));
    }
    report.error = braid_shared::shorten(&report.error, 1024);
    report.backend = braid_shared::shorten(&report.backend, 32);
    report
}

/// Refuses what the request cannot mean, naming the field.
fn check(r: &proto::CacheRequest, prune: bool) -> Result<(), Status> {
    if !r.agent.is_empty() && !valid_agent_name(&r.agent) {
        return Err(Status::invalid_argument(format!(
            "agent: {:?} must be 1 to {} letters, digits, '.', '_' or '-'",
            braid_shared::shorten(&r.agent, 80),
            limits::AGENT_NAME_BYTES
        )));
    }
    if !prune && (r.all || r.until_seconds != 0 || r.keep_storage_bytes != 0) {
        return Err(Status::invalid_argument("all, until_seconds, keep_storage_bytes: only for PruneCache"));
    }
    if r.until_seconds > limits::TOKEN_TTL_SECONDS {
        return Err(Status::invalid_argument(format!(
            "until_seconds: {} is more than the limit of {} (10 years)",
            r.until_seconds,
            limits::TOKEN_TTL_SECONDS
        )));
    }
    Ok(())
}

/// An agent to ask: its session if it is connected.
struct Target {
    name: String,
    session: Option<u64>,
    last_seen_ms: i64,
}

/// `CacheUsage` (prune false) and `PruneCache`, for the operate role.
pub async fn run(
    c: &Arc<Coordinator>,
    req: Request<proto::CacheRequest>,
    prune: bool,
) -> Result<Response<proto::CacheResponse>, Status> {
    c.tokens.authorize(&req, Role::Operate)?;
    let r = req.into_inner();
    check(&r, prune)?;
    let targets: Vec<Target> = {
        let farm = c.farm();
        farm.agent_list()
            .into_iter()
            .filter(|a| r.agent.is_empty() || a.name == r.agent)
            .take(limits::METRIC_AGENTS)
            .map(|a| Target {
                name: a.name.clone(),
                session: (a.connected && !a.lost).then_some(a.session),
                last_seen_ms: a.last_seen_ms,
            })
            .collect()
    };
    if !r.agent.is_empty() && targets.is_empty() {
        return Err(Status::not_found(format!("agent {:?} is not known to the coordinator", r.agent)));
    }
    let command = proto::CacheCommand {
        request_id: 0,
        prune,
        all: r.all,
        until_seconds: r.until_seconds,
        keep_storage_bytes: r.keep_storage_bytes,
    };
    let wait = Duration::from_secs(if prune { limits::CACHE_PRUNE_SECONDS } else { limits::CACHE_DU_SECONDS });
    let agents = futures::future::join_all(targets.into_iter().map(|t| ask(c, t, command, wait))).await;
    for a in &agents {
        if prune && a.status == CacheStatus::Ok as i32 {
            let reclaimed = a.report.as_ref().map_or(0, |r| r.reclaimed_bytes);
            tracing::info!(agent = %a.agent, reclaimed, "builder cache pruned");
        }
    }
    Ok(Response::new(proto::CacheResponse { agents }))
}

async fn ask(c: &Arc<Coordinator>, t: Target, mut command: proto::CacheCommand, wait: Duration) -> proto::AgentCache {
    let mut out = proto::AgentCache { agent: t.name.clone(), ..Default::default() };
    let Some(session) = t.session else {
        out.status = CacheStatus::Offline as i32;
        out.last_seen = t.last_seen_ms / 1000;
        return out;
    };
    let (id, answer) = c.cache_requests.register(&t.name);
    command.request_id = id;
    c.send(session, ToAgent::Cache(command));
    match tokio::time::timeout(wait, answer).await {
        Ok(Ok(report)) if report.error.is_empty() => {
            out.status = CacheStatus::Ok as i32;
            out.report = Some(report);
        }
        Ok(Ok(report)) => {
            out.status = CacheStatus::Failed as i32;
            out.error = report.error.clone();
            out.report = Some(report);
        }
        Ok(Err(_)) | Err(_) => {
            c.cache_requests.forget(id);
            out.status = CacheStatus::TimedOut as i32;
            out.error = format!("no answer within {} seconds", wait.as_secs());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_asked_agent_answers_and_reports_are_bounded() {
        let p = Pending::default();
        let (id, mut rx) = p.register("a");
        p.answer("b", proto::CacheReport { request_id: id, ..Default::default() });
        assert!(rx.try_recv().is_err(), "another agent's answer must be dropped");
        let entries = vec![proto::CacheEntry { name: "x".repeat(500), ..Default::default() }; 1000];
        p.answer("a", proto::CacheReport { request_id: id, entries, ..Default::default() });
        let got = rx.try_recv().unwrap();
        assert_eq!(got.entries.len(), limits::CACHE_STORAGES);
        assert!(got.entries[0].name.len() <= 132, "{}", got.entries[0].name.len());
    }

    #[test]
    fn du_refuses_prune_fields_naming_them() {
        let r = proto::CacheRequest { all: true, ..Default::default() };
        let e = check(&r, false).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("all"), "{}", e.message());
        assert!(check(&r, true).is_ok());
        let e = check(&proto::CacheRequest { agent: "a b".into(), ..Default::default() }, true).unwrap_err();
        assert!(e.message().starts_with("agent:"), "{}", e.message());
    }
}
