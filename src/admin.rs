//! The admin HTTP server: Prometheus text at `/metrics`, liveness at `/healthz`, readiness at
//! `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::consumer::Readiness;
use crate::metrics::Metrics;

/// The consumers that currently run, as (label, readiness); a config reload replaces it.
pub type ConsumerSet = Arc<RwLock<Vec<(String, Arc<Readiness>)>>>;

/// What the admin endpoints report on.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Metrics,
    /// The live consumers (those draining after a reload no longer count).
    pub consumers: ConsumerSet,
    pub shutting_down: Arc<AtomicBool>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serve on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, state: AdminState, stop: CancellationToken) {
    let app = router(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "admin server failed");
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, String) {
    if s.shutting_down.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
    }
    let consumers = s.consumers.read().unwrap_or_else(PoisonError::into_inner);
    let waiting: Vec<&str> = consumers
        .iter()
        .filter(|(_, r)| !r.is_ready())
        .map(|(label, _)| label.as_str())
        .collect();
    if waiting.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no successful pull yet or pulls failing: {}\n",
                waiting.join(", ")
            ),
        )
    }
}
