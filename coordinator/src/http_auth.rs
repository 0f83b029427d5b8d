//! Who may read the HTTP port. With TLS (tokens required), everything but
//! `/healthz`, `/readyz` and the login page needs an `operate` token: build
//! logs, job errors (agent paths) and metrics are for operators. A token
//! comes as `Authorization: Bearer`, or once through the login form, which
//! opens a session: the browser keeps only an opaque random id (HttpOnly,
//! Secure, SameSite=Strict cookie); the coordinator keeps, in memory, the
//! id's hash and the token's hash, so a revoked or expired token ends its
//! sessions and a leaked cookie never reveals the token. In the plaintext
//! loopback development mode everything stays open, except that a request
//! carrying a `submit` bearer token reads without operating (the
//! dashboard's read-only view).
//!
//! The dashboard's actions (cancel, cordon, drain) are POSTs that need the
//! operate role and, unless they come with a bearer header, the caller's
//! CSRF token in `X-Braid-CSRF` (from `GET /api/session`, same-origin only):
//! a cross-site page can neither read it nor send a custom header without a
//! preflight this server never answers; the cookie is SameSite=Strict too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Form;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::RngCore;
use tonic::{Code, Status};

use braid_shared::limits;

use crate::auth::Role;
use crate::state::Coordinator;

/// The cookie that carries a session id.
const COOKIE: &str = "braid_session";

/// Paths anyone may read: probes, and what logging in needs.
const OPEN_PATHS: &[&str] = &["/healthz", "/readyz", "/login", "/logout", "/static/style.css"];

/// The header that carries the CSRF token of a cookie or open-mode caller.
pub const CSRF_HEADER: &str = "x-braid-csrf";

struct Session {
    token_hash: String,
    csrf: String,
    expires: Instant,
}

/// Who is asking, put in the request's extensions by `guard`: the caller,
/// and the CSRF token its writes must carry (None with a bearer header).
#[derive(Clone, Debug)]
pub struct Viewer {
    pub caller: crate::model::Caller,
    pub csrf: Option<String>,
}

impl Viewer {
    pub fn operates(&self) -> bool {
        self.caller.role == Role::Operate
    }
}

fn random_hex() -> String {
    let mut id = [0u8; 32];
    rand::rng().fill_bytes(&mut id);
    hex::encode(id)
}

/// Dashboard sessions, keyed by the sha256 of their id; bounded in number
/// and lifetime (`limits::HTTP_SESSIONS`, `limits::HTTP_SESSION_SECONDS`).
pub struct HttpAuth {
    coordinator: Arc<Coordinator>,
    sessions: Mutex<HashMap<String, Session>>,
    /// The CSRF token of callers without credentials (development mode).
    open_csrf: String,
}

fn id_hash(id: &str) -> String {
    braid_shared::Digest::of(id.as_bytes()).to_string()
}

impl HttpAuth {
    pub fn new(coordinator: Arc<Coordinator>) -> HttpAuth {
        HttpAuth { coordinator, sessions: Mutex::new(HashMap::new()), open_csrf: random_hex() }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A panic elsewhere leaves the map consistent: each change is one insert or remove.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a session for the token with this hash; returns the cookie value.
    fn open(&self, token_hash: String) -> String {
        let id = random_hex();
        let now = Instant::now();
        let mut sessions = self.sessions();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= limits::HTTP_SESSIONS
            && let Some(oldest) = sessions.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        let expires = now + Duration::from_secs(limits::HTTP_SESSION_SECONDS);
        sessions.insert(id_hash(&id), Session { token_hash, csrf: random_hex(), expires });
        id
    }

    /// The token hash and CSRF token of a live session.
    fn session(&self, id: &str) -> Option<(String, String)> {
        let key = id_hash(id);
        let mut sessions = self.sessions();
        match sessions.get(&key) {
            Some(s) if s.expires > Instant::now() => Some((s.token_hash.clone(), s.csrf.clone())),
            Some(_) => {
                sessions.remove(&key);
                None
            }
            None => None,
        }
    }

    fn close(&self, id: &str) {
        self.sessions().remove(&id_hash(id));
    }

    /// An operator's bearer header or session (or, in the open development
    /// mode, anyone; a submit bearer there reads only), or why not.
    fn check(&self, headers: &HeaderMap) -> Result<Viewer, Status> {
        let tokens = &self.coordinator.tokens;
        if headers.contains_key(header::AUTHORIZATION) {
            let needed = if tokens.required() { Role::Operate } else { Role::Submit };
            let caller = tokens.authorize_http(headers, needed)?;
            return Ok(Viewer { caller, csrf: None });
        }
        if !tokens.required() {
            let caller = crate::model::Caller { token_id: None, role: Role::Operate };
            return Ok(Viewer { caller, csrf: Some(self.open_csrf.clone()) });
        }
        let (token_hash, csrf) = session_cookie(headers).and_then(|id| self.session(id)).ok_or_else(|| {
            Status::unauthenticated("log in at /login, or send 'Authorization: Bearer <operate token>'")
        })?;
        let caller = tokens.authorize_hash(&token_hash, Role::Operate)?;
        Ok(Viewer { caller, csrf: Some(csrf) })
    }
}

/// The session id in the request's cookies, if any.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// Lets a request through only if its path is open or its caller operates
/// the farm; a browser asking for a page is sent to the login form. A
/// write (any method but GET and HEAD) must carry the caller's CSRF token.
pub async fn guard(State(auth): State<Arc<HttpAuth>>, mut request: Request, next: Next) -> Response {
    if OPEN_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    match auth.check(request.headers()) {
        Ok(viewer) => {
            let write = !matches!(*request.method(), axum::http::Method::GET | axum::http::Method::HEAD);
            if write && let Some(expected) = &viewer.csrf {
                let sent = request.headers().get(CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
                if !constant_time_eq(sent.as_bytes(), expected.as_bytes()) {
                    let status = Status::permission_denied(format!(
                        "missing or wrong {CSRF_HEADER} header (the dashboard sends the one GET /api/session gives)"
                    ));
                    return refusal(&status);
                }
            }
            request.extensions_mut().insert(viewer);
            next.run(request).await
        }
        Err(status) => {
            let is_page = !request.uri().path().starts_with("/api/") && request.uri().path() != "/metrics";
            if is_page && status.code() == Code::Unauthenticated {
                return Redirect::to("/login").into_response();
            }
            refusal(&status)
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn refusal(status: &Status) -> Response {
    let code = match status.code() {
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut response = (code, Json(serde_json::json!({"error": status.message()}))).into_response();
    if code == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"braid\""));
    }
    response
}

const LOGIN_HTML: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>braid: log in</title>
<link rel="stylesheet" href="/static/style.css"></head>
<body><header><a href="/">braid</a></header>
<main><form method="post" action="/login">
<p>An <code>operate</code> token (<code>braid token create --role operate</code>):</p>
<p><input type="password" name="token" autocomplete="off" size="80" autofocus required></p>
<p><button type="submit">Log in</button></p>
<!--error-->
</form></main></body></html>
"#;

fn login_page(error: Option<&str>) -> Html<String> {
    let message = error.map(|e| format!("<p class=\"error\">{}</p>", html_escape(e))).unwrap_or_default();
    Html(LOGIN_HTML.replace("<!--error-->", &message))
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(auth): State<Arc<HttpAuth>>, Form(form): Form<LoginForm>) -> Response {
    match auth.coordinator.tokens.authorize_secret(form.token.trim(), Role::Operate) {
        Ok((_, token_hash)) => {
            let id = auth.open(token_hash);
            let cookie = format!(
                "{COOKIE}={id}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
                limits::HTTP_SESSION_SECONDS
            );
            let mut response = Redirect::to("/").into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, v);
            }
            response
        }
        Err(status) => {
            let code =
                if status.code() == Code::PermissionDenied { StatusCode::FORBIDDEN } else { StatusCode::UNAUTHORIZED };
            (code, login_page(Some(status.message()))).into_response()
        }
    }
}

async fn logout(State(auth): State<Arc<HttpAuth>>, headers: HeaderMap) -> Response {
    if let Some(id) = session_cookie(&headers) {
        auth.close(id);
    }
    let mut response = Redirect::to("/login").into_response();
    let expired = format!("{COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0");
    if let Ok(v) = HeaderValue::from_str(&expired) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// `/login` (form and post) and `/logout` (post).
pub fn routes(auth: Arc<HttpAuth>) -> Router {
    Router::new()
        .route("/login", get(|| async { login_page(None) }).post(login))
        .route("/logout", post(logout))
        .with_state(auth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_session_cookie_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; braid_session=abc; b=2"));
        assert_eq!(session_cookie(&headers), Some("abc"));
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("braid_sessionx=abc"));
        assert_eq!(session_cookie(&headers), None);
    }

    #[test]
    fn login_errors_are_escaped() {
        let page = login_page(Some("<script>")).0;
        assert!(page.contains("&lt;script&gt;") && !page.contains("<script>"));
    }
}
