//! The dashboard's JSON endpoints beyond the overview: who is looking
//! (`/api/session`), the builds list with its filters and pages
//! (`/api/builds`), the agents' cards, and the operate actions (cancel a
//! build, cordon, uncordon or drain an agent), which go through the same
//! farm functions as `braid cancel` and `braid agents cordon|drain`.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use serde_json::{Value, json};
use tonic::{Code, Status};

use braid_shared::Platform;

use crate::farm::{AgentEntry, BuildEntry, Farm};
use crate::http_auth::Viewer;
use crate::model::valid_agent_name;
use crate::state::Coordinator;

/// Builds per page: the default and the most a caller may ask for.
pub const PAGE_DEFAULT: usize = 25;
pub const PAGE_MAX: usize = 100;
/// The longest value any filter takes (bytes), and the most parameters.
const FILTER_BYTES: usize = 256;
const MAX_PARAMS: usize = 8;
const STATES: &[&str] = &["queued", "running", "merging", "succeeded", "failed", "cancelled"];

/// A refusal as the dashboard shows it: the HTTP code and the message.
pub fn status_response(status: &Status) -> Response {
    let code = match status.code() {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::FailedPrecondition | Code::AlreadyExists => StatusCode::CONFLICT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, Json(json!({"error": status.message()}))).into_response()
}

/// `GET /api/session`: whether the caller may operate, and the CSRF token
/// its actions must carry.
pub async fn session(Extension(viewer): Extension<Viewer>) -> Json<Value> {
    Json(json!({"operate": viewer.operates(), "csrf": viewer.csrf, "token_id": viewer.caller.token_id}))
}

/// The builds list's filters, each checked.
#[derive(Debug, Default, PartialEq)]
pub struct BuildFilter {
    pub state: Option<String>,
    pub platform: Option<Platform>,
    pub tag: Option<String>,
    pub submitter: Option<String>,
    pub search: Option<String>,
    pub limit: usize,
    /// Builds submitted before this one (by order) only.
    pub cursor: Option<u64>,
}

fn bad(name: &str, why: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{name}: {why}"))
}

impl BuildFilter {
    /// Parses the query parameters; unknown, repeated, empty or over-long
    /// ones are refused, naming the parameter.
    pub fn parse(params: &[(String, String)]) -> Result<BuildFilter, Status> {
        if params.len() > MAX_PARAMS {
            return Err(bad("query", format!("at most {MAX_PARAMS} parameters")));
        }
        let mut f = BuildFilter { limit: PAGE_DEFAULT, ..BuildFilter::default() };
        let mut seen = std::collections::HashSet::new();
        for (name, value) in params {
            let shown = braid_shared::shorten(name, 40);
            if !seen.insert(name.as_str()) {
                return Err(bad(&shown, "given more than once"));
            }
            if value.len() > FILTER_BYTES {
                return Err(bad(&shown, format!("longer than {FILTER_BYTES} bytes")));
            }
            if value.is_empty() {
                continue;
            }
            match name.as_str() {
                "state" => {
                    if !STATES.contains(&value.as_str()) {
                        return Err(bad("state", format!("{value:?} is not one of {}", STATES.join(", "))));
                    }
                    f.state = Some(value.clone());
                }
                "platform" => {
                    f.platform = Some(value.parse().map_err(|e| bad("platform", format!("{value:?}: {e}")))?);
                }
                "tag" => f.tag = Some(value.clone()),
                "submitter" => f.submitter = Some(value.clone()),
                "q" => f.search = Some(value.to_lowercase()),
                "limit" => {
                    f.limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|l| (1..=PAGE_MAX).contains(l))
                        .ok_or_else(|| bad("limit", format!("{value:?} is not a number from 1 to {PAGE_MAX}")))?;
                }
                "cursor" => {
                    f.cursor = Some(
                        value.parse::<u64>().map_err(|_| bad("cursor", format!("{value:?} is not a page cursor")))?,
                    );
                }
                _ => {
                    return Err(bad(&shown, "unknown parameter (state, platform, tag, submitter, q, limit, cursor)"));
                }
            }
        }
        Ok(f)
    }

    pub fn matches(&self, b: &BuildEntry) -> bool {
        let r = &b.record;
        if self.state.as_deref().is_some_and(|s| s != r.status.as_str()) {
            return false;
        }
        if let Some(p) = &self.platform
            && !r.jobs.iter().any(|j| &j.platform == p)
        {
            return false;
        }
        if let Some(t) = &self.tag
            && !b.spec.tags.iter().any(|x| x == t || x.contains(t.as_str()))
        {
            return false;
        }
        if self.submitter.as_deref().is_some_and(|s| Some(s) != r.owner.as_deref()) {
            return false;
        }
        if let Some(q) = &self.search {
            let hay = [r.id.as_str(), r.message.as_str()]
                .into_iter()
                .chain(b.spec.tags.iter().map(String::as_str))
                .chain(b.spec.platforms.iter().map(String::as_str))
                .any(|s| s.to_lowercase().contains(q.as_str()));
            if !hay {
                return false;
            }
        }
        true
    }
}

/// One page of builds, newest first: those before the cursor that match.
pub fn builds_page(farm: &Farm, f: &BuildFilter) -> Value {
    let mut builds: Vec<&BuildEntry> =
        farm.builds.values().filter(|b| f.cursor.is_none_or(|c| b.record.order < c)).filter(|b| f.matches(b)).collect();
    builds.sort_by_key(|b| std::cmp::Reverse(b.record.order));
    let more = builds.len() > f.limit;
    let page: Vec<Value> = builds.iter().take(f.limit).map(|b| crate::http::build_json(b, farm.now())).collect();
    let next = if more { builds.get(f.limit - 1).map(|b| b.record.order.to_string()) } else { None };
    json!({"builds": page, "next": next, "limit": f.limit})
}

/// `GET /api/builds?state=&platform=&tag=&submitter=&q=&limit=&cursor=`.
pub async fn builds(State(c): State<Arc<Coordinator>>, Query(params): Query<Vec<(String, String)>>) -> Response {
    match BuildFilter::parse(&params) {
        Ok(f) => Json(builds_page(&c.farm(), &f)).into_response(),
        Err(status) => status_response(&status),
    }
}

/// One card per agent: its platforms (native and emulated), slots, state,
/// health and the jobs it runs.
pub fn agent_cards(farm: &Farm) -> Vec<Value> {
    farm.agent_list()
        .into_iter()
        .map(|a: &AgentEntry| {
            let mut running: Vec<Value> = a
                .running
                .iter()
                .map(|(build_id, job_id)| {
                    let platform = farm.job_platform(build_id, job_id);
                    json!({"build_id": build_id, "platform": platform})
                })
                .collect();
            running.sort_by_key(|v| v.to_string());
            json!({
                "name": a.name, "state": a.state().as_str(), "slots": a.slots, "running": running,
                "platforms": a.platforms.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "emulates": a.emulates.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "builder": a.builder.as_ref().map(|b| b.label()), "version": a.version,
                "last_seen": a.last_seen_ms as f64 / 1000.0, "health": crate::http::agent_health_json(a),
            })
        })
        .collect()
}

fn require_operate(viewer: &Viewer) -> Result<(), Status> {
    if viewer.operates() {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "token {} has the {} role; this needs operate",
        viewer.caller.token_id.as_deref().unwrap_or("-"),
        viewer.caller.role.name()
    )))
}

/// `POST /api/builds/{id}/cancel`, as `braid cancel`.
pub async fn cancel(
    State(c): State<Arc<Coordinator>>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<String>,
) -> Response {
    match cancel_inner(&c, &viewer, &id).await {
        Ok(v) => Json(v).into_response(),
        Err(status) => status_response(&status),
    }
}

async fn cancel_inner(c: &Arc<Coordinator>, viewer: &Viewer, id: &str) -> Result<Value, Status> {
    require_operate(viewer)?;
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(bad("build_id", format!("{:?} is not a build id", braid_shared::shorten(id, 80))));
    }
    let state = {
        let mut farm = c.farm();
        farm.build_for(id, &viewer.caller)?;
        let effects = farm.cancel(id, "cancelled by request")?;
        c.perform(&farm, effects);
        farm.build(id)?.record.status
    };
    tracing::info!(
        build_id = id,
        token_id = viewer.caller.token_id.as_deref().unwrap_or("-"),
        "cancel from the dashboard"
    );
    c.wake.notify_one();
    c.stored().await?;
    Ok(json!({"build_id": id, "state": state.as_str()}))
}

/// `POST /api/agents/{name}/{cordon|uncordon|drain}`, as `braid agents`.
pub async fn agent_action(
    State(c): State<Arc<Coordinator>>,
    Extension(viewer): Extension<Viewer>,
    Path((name, action)): Path<(String, String)>,
) -> Response {
    match agent_action_inner(&c, &viewer, &name, &action).await {
        Ok(v) => Json(v).into_response(),
        Err(status) => status_response(&status),
    }
}

async fn agent_action_inner(c: &Arc<Coordinator>, viewer: &Viewer, name: &str, action: &str) -> Result<Value, Status> {
    require_operate(viewer)?;
    let cordoned = match action {
        "cordon" | "drain" => true,
        "uncordon" => false,
        _ => return Err(bad("action", format!("{:?}: cordon, uncordon or drain", braid_shared::shorten(action, 40)))),
    };
    if !valid_agent_name(name) {
        return Err(bad("name", format!("{:?} is not an agent name", braid_shared::shorten(name, 80))));
    }
    let state = {
        let mut farm = c.farm();
        let effects = farm.set_cordoned(name, cordoned)?;
        c.perform(&farm, effects);
        farm.agent_list().into_iter().find(|a| a.name == name).map(|a| a.state().as_str())
    };
    tracing::info!(
        agent = name,
        action,
        token_id = viewer.caller.token_id.as_deref().unwrap_or("-"),
        "agent {action} from the dashboard"
    );
    if !cordoned {
        c.wake.notify_one();
    }
    c.stored().await?;
    Ok(json!({"agent": name, "state": state}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(q: &[(&str, &str)]) -> Result<BuildFilter, Status> {
        BuildFilter::parse(&q.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>())
    }

    #[test]
    fn filters_are_checked_and_named() {
        let f = parse(&[("state", "failed"), ("platform", "linux/arm64"), ("limit", "5"), ("q", "ABC")]).unwrap();
        assert_eq!(f.state.as_deref(), Some("failed"));
        assert_eq!(f.limit, 5);
        assert_eq!(f.search.as_deref(), Some("abc"));
        assert_eq!(parse(&[]).unwrap().limit, PAGE_DEFAULT);
        for (q, needle) in [
            (vec![("state", "done")], "state:"),
            (vec![("limit", "0")], "limit:"),
            (vec![("limit", "101")], "limit:"),
            (vec![("cursor", "x")], "cursor:"),
            (vec![("platform", "nope/")], "platform:"),
            (vec![("color", "red")], "color: unknown parameter"),
            (vec![("tag", "a"), ("tag", "b")], "tag: given more than once"),
        ] {
            let e = parse(&q).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument);
            assert!(e.message().starts_with(needle), "{q:?}: {}", e.message());
        }
        let long = "x".repeat(FILTER_BYTES + 1);
        assert!(parse(&[("tag", &long)]).unwrap_err().message().contains("longer than"));
    }
}
