//! `cfq-relay receive`: a local webhook sink. It answers every request with 200 (after an
//! optional delay, to stand in for a real endpoint's latency) and counts requests, messages
//! and body bytes; `GET /_receiver/stats` reports them. It understands batch requests
//! (`cfq-batch-size` and a `{"messages": [...]}` body): it counts their messages and answers
//! `{"failed": []}`, every message delivered. It can also play a small receiver: one that
//! serves `capacity` requests at once and answers 503 at once beyond that, and one whose
//! latency grows with the requests it is serving. It speaks HTTP/1.1 and cleartext HTTP/2.
//! The other end of the relay for development, the
//! demo flow of the README and the benchmark (`bench/`), kept small so it is never the
//! bottleneck.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How the receiver answers.
#[derive(Debug, Clone, Default)]
pub struct ReceiverOptions {
    /// Wait this long before answering each request.
    pub delay: Duration,
    /// Print one line per request (method, path, message id, content type, size, excerpt).
    pub print: bool,
    /// Serve at most this many requests at once; answer 503 at once beyond (no `Retry-After`).
    pub capacity: Option<usize>,
    /// Added to `delay` for every other request being served when this one arrives: a
    /// receiver whose latency grows with its load.
    pub delay_per_in_flight: Duration,
}

/// What the receiver has seen (`GET /_receiver/stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ReceiverStats {
    /// Requests served (answered 200).
    pub requests: u64,
    /// Messages received: one per single request, the batch's size per batch request.
    pub messages: u64,
    pub bytes: u64,
    /// Requests turned away with 503 because `capacity` was reached.
    pub overloaded: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    messages: AtomicU64,
    bytes: AtomicU64,
    overloaded: AtomicU64,
    in_flight: AtomicU64,
}

/// One request being served; leaves the count when the answer is sent (or the client left).
struct Serving<'a>(&'a AtomicU64);

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The number of messages in a batch request's body (`None`: not a batch).
pub fn batch_len(body: &[u8]) -> Option<usize> {
    #[derive(serde::Deserialize)]
    struct Batch {
        messages: Vec<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Batch>(body)
        .ok()
        .map(|b| b.messages.len())
}

#[derive(Clone)]
struct App {
    opts: ReceiverOptions,
    counters: Arc<Counters>,
}

/// Bind `addr` and serve until `shutdown` is cancelled; returns the bound address once
/// listening (the server runs on a spawned task).
pub async fn start(
    addr: SocketAddr,
    opts: ReceiverOptions,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/_receiver/stats", get(stats))
        .fallback(receive)
        .with_state(App {
            opts,
            counters: Arc::default(),
        });
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "webhook receiver stopped with an error");
        }
    });
    Ok(bound)
}

async fn receive(
    State(app): State<App>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let others = app.counters.in_flight.fetch_add(1, Ordering::Relaxed);
    let _serving = Serving(&app.counters.in_flight);
    if app.opts.capacity.is_some_and(|c| others >= c as u64) {
        app.counters.overloaded.fetch_add(1, Ordering::Relaxed);
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    app.counters.requests.fetch_add(1, Ordering::Relaxed);
    let batch = headers
        .contains_key(crate::pipeline::batch::HEADER_BATCH_SIZE)
        .then(|| batch_len(&body))
        .flatten();
    app.counters
        .messages
        .fetch_add(batch.unwrap_or(1) as u64, Ordering::Relaxed);
    app.counters
        .bytes
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    if app.opts.print {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        let excerpt = crate::cloudflare::one_line(&crate::cloudflare::excerpt(&body[..]));
        match batch {
            Some(n) => println!(
                "{method} {} batch={} messages={n} {} bytes: {excerpt}",
                uri.path(),
                header(crate::pipeline::batch::HEADER_BATCH_ID),
                body.len(),
            ),
            None => println!(
                "{method} {} id={} attempt={} type={} {} bytes: {excerpt}",
                uri.path(),
                header(crate::webhook::delivery::HEADER_MESSAGE_ID),
                header(crate::webhook::delivery::HEADER_ATTEMPT),
                header("content-type"),
                body.len(),
            ),
        }
    }
    let delay = app.opts.delay + app.opts.delay_per_in_flight * others as u32;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match batch {
        // Per-message results: none failed.
        Some(_) => (
            StatusCode::OK,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            r#"{"failed":[]}"#,
        )
            .into_response(),
        None => StatusCode::OK.into_response(),
    }
}

async fn stats(State(app): State<App>) -> Response {
    axum::Json(ReceiverStats {
        requests: app.counters.requests.load(Ordering::Relaxed),
        messages: app.counters.messages.load(Ordering::Relaxed),
        bytes: app.counters.bytes.load(Ordering::Relaxed),
        overloaded: app.counters.overloaded.load(Ordering::Relaxed),
    })
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn fetch_stats(http: &reqwest::Client, addr: SocketAddr) -> serde_json::Value {
        http.get(format!("http://{addr}/_receiver/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn answers_200_and_counts() {
        let stop = CancellationToken::new();
        let addr = start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            ReceiverOptions::default(),
            stop.clone(),
        )
        .await
        .unwrap();
        let http = reqwest::Client::new();
        for body in ["one", "three"] {
            let r = http
                .post(format!("http://{addr}/hook"))
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
        let stats = fetch_stats(&http, addr).await;
        assert_eq!(
            stats,
            serde_json::json!({"requests": 2, "messages": 2, "bytes": 8, "overloaded": 0})
        );
        // A batch counts its messages and gets per-message results.
        let batch = r#"{"messages":[{"id":"a"},{"id":"b"},{"id":"c"}]}"#;
        let r = http
            .post(format!("http://{addr}/hook"))
            .header(crate::pipeline::batch::HEADER_BATCH_SIZE, "3")
            .body(batch)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            crate::pipeline::batch::parse_answer(&r.bytes().await.unwrap(), true),
            crate::pipeline::batch::Answer::Failed(vec![])
        );
        let stats = fetch_stats(&http, addr).await;
        assert_eq!(
            (&stats["requests"], &stats["messages"]),
            (&3.into(), &5.into())
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn beyond_its_capacity_it_answers_503_at_once() {
        let stop = CancellationToken::new();
        let opts = ReceiverOptions {
            delay: Duration::from_secs(30),
            capacity: Some(2),
            ..ReceiverOptions::default()
        };
        let addr = start(SocketAddr::from(([127, 0, 0, 1], 0)), opts, stop.clone())
            .await
            .unwrap();
        let http = reqwest::Client::new();
        let url = format!("http://{addr}/hook");
        // Two slow requests take the capacity...
        let held: Vec<_> = (0..2)
            .map(|_| tokio::spawn(http.post(&url).body("x").send()))
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let s = fetch_stats(&http, addr).await;
            if s["requests"] == 2 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "requests never arrived"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // ...so the third is turned away without waiting.
        let started = std::time::Instant::now();
        let r = http.post(&url).body("x").send().await.unwrap();
        assert_eq!(r.status(), 503);
        assert!(started.elapsed() < Duration::from_secs(5));
        let s = fetch_stats(&http, addr).await;
        assert_eq!(s["overloaded"], 1);
        for h in held {
            h.abort();
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn speaks_cleartext_http2() {
        let stop = CancellationToken::new();
        let addr = start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            ReceiverOptions::default(),
            stop.clone(),
        )
        .await
        .unwrap();
        let h2 = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap();
        let r = h2
            .post(format!("http://{addr}/hook"))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        stop.cancel();
    }
}
