//! The coordinator's HTTP side: `/metrics`, `/healthz`, `/readyz`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::server::Coordinator;

pub fn router(coordinator: Arc<Coordinator>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(coordinator)
}

async fn metrics(State(c): State<Arc<Coordinator>>) -> impl IntoResponse {
    let gauges = c.farm().gauges();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], c.metrics.render(&gauges))
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when the store answers.
async fn readyz(State(c): State<Arc<Coordinator>>) -> impl IntoResponse {
    match c.store.contexts_by_age() {
        Ok(_) => (StatusCode::OK, "ready\n"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n"),
    }
}
