//! The admin HTTP server: Prometheus text at `/metrics`, liveness at `/healthz`, readiness at
//! `/readyz`; bounded in connections, header-read time and connection age, so idle or slow
//! clients cannot starve the health checks or the process's descriptors.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::pipeline::Readiness;
use crate::telemetry::Metrics;

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

/// Connections the admin server holds at once. At the cap, a new connection takes the place of
/// the oldest one that is not serving a request (idle or still sending its headers: the shape
/// of a slowloris attack); when every one is busy, the new one is closed at once (refused, not
/// queued). Health checks thus get through while any number of idle connections are open, and
/// the admin port never holds more than this many descriptors.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection must send a complete request head this soon after it opens or after its
/// previous answer (so this is also the keep-alive idle timeout).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest life of one connection: then it is closed after its current answer (a client
/// that keeps one open for scraping reconnects).
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(120);

/// A live admin connection, as the accept loop sees it.
struct Connection {
    id: u64,
    /// Requests in progress on it.
    busy: Arc<AtomicUsize>,
    close: CancellationToken,
}

/// Serve on `listener` until `stop` is cancelled, within the limits above.
pub async fn serve(listener: TcpListener, state: AdminState, stop: CancellationToken) {
    let app = router(state);
    let slots: Arc<Mutex<Vec<Connection>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = JoinSet::new();
    let mut next_id = 0u64;
    let mut refused = 0u64;
    let logs = crate::logs::LogLimiter::new("admin");
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors (EMFILE) and the like: wait a little rather than spin.
                if logs.allow(crate::logs::Event::AcceptFailed) {
                    tracing::warn!(error = %e, "admin server: accept failed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let busy = Arc::new(AtomicUsize::new(0));
        let close = CancellationToken::new();
        {
            let mut live = slots.lock().unwrap_or_else(PoisonError::into_inner);
            if live.len() >= MAX_CONNECTIONS {
                // The oldest connection with no request in progress makes room.
                match live
                    .iter()
                    .position(|s| s.busy.load(Ordering::Relaxed) == 0)
                {
                    Some(i) => {
                        live.remove(i).close.cancel();
                    }
                    None => {
                        refused += 1;
                        if refused.is_power_of_two() {
                            tracing::warn!(
                                refused,
                                max = MAX_CONNECTIONS,
                                "admin server: connection limit reached, every connection busy; refusing"
                            );
                        }
                        drop(stream);
                        continue;
                    }
                }
            }
            next_id += 1;
            live.push(Connection {
                id: next_id,
                busy: busy.clone(),
                close: close.clone(),
            });
        }
        let id = next_id;
        let app = app.clone();
        let slots = slots.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            serve_connection(stream, app, busy, close, stop).await;
            slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|s| s.id != id);
        });
    }
    // Stop: connections finish their current answer and close.
    for s in slots.lock().unwrap_or_else(PoisonError::into_inner).iter() {
        s.close.cancel();
    }
    while tasks.join_next().await.is_some() {}
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    app: Router,
    busy: Arc<AtomicUsize>,
    close: CancellationToken,
    stop: CancellationToken,
) {
    let serving = busy.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let app = app.clone();
        let busy = busy.clone();
        busy.fetch_add(1, Ordering::Relaxed);
        async move {
            let answer = app.oneshot(req).await;
            busy.fetch_sub(1, Ordering::Relaxed);
            answer
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(conn);
    let age = tokio::time::sleep(MAX_CONNECTION_AGE);
    tokio::pin!(age);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "admin connection ended");
            }
            return;
        }
        _ = close.cancelled() => {
            // Evicted for a new connection: closed at once unless an answer is under way. A
            // graceful shutdown waits for a half-sent request head, so a slowloris connection
            // kept its descriptor until the header timeout, past the cap.
            if serving.load(Ordering::Relaxed) == 0 {
                return;
            }
        }
        _ = stop.cancelled() => {}
        _ = &mut age => {}
    }
    conn.as_mut().graceful_shutdown();
    // An answer in progress gets a moment to finish; an idle connection closes at once.
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
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
