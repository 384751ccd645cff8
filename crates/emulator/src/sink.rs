//! The webhook sink: the one local webhook receiver of the workspace (`cfq-relay receive`, the
//! demo, the bench and the tests). It counts requests, messages and body bytes
//! (`GET /_receiver/stats`), can record every request (headers, body, arrival instant), and
//! answers each one as a script says ([`Answer`]: status, headers, body, delay) or, without a
//! script, with 200 (`{"failed": []}` to a batch request: every message delivered). It can
//! also play a small receiver: one that serves `capacity` requests at once and answers 503 at
//! once beyond that, and one whose latency grows with the requests it is serving. It speaks
//! HTTP/1.1 and cleartext HTTP/2, and is kept small so that it is never the bottleneck.
//!
//! It knows the relay's wire only by the header names below, its own constants (a test of the
//! relay checks that they equal the relay's).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The message's id (Cloudflare's), on a single delivery.
pub const HEADER_MESSAGE_ID: &str = "cfq-message-id";
/// The delivery attempt (Cloudflare's `attempts`), on a single delivery.
pub const HEADER_ATTEMPT: &str = "cfq-attempt";
/// The number of messages in a batch request; its presence marks a batch.
pub const HEADER_BATCH_SIZE: &str = "cfq-batch-size";
/// The id of a batch request.
pub const HEADER_BATCH_ID: &str = "cfq-batch-id";
/// Standard Webhooks' message id (the same for every attempt of a message).
pub const HEADER_WEBHOOK_ID: &str = "webhook-id";
/// Standard Webhooks' signing timestamp.
pub const HEADER_WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// Standard Webhooks' signatures.
pub const HEADER_WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// Longest body excerpt that `print` shows, in characters.
const EXCERPT_CHARS: usize = 200;

/// How the sink answers.
#[derive(Debug, Clone, Default)]
pub struct SinkOptions {
    /// Wait this long before answering each request (added to the script's [`Answer::delay`]).
    pub delay: Duration,
    /// Print one line per request (method, path, message id, content type, size, excerpt).
    pub print: bool,
    /// Serve at most this many requests at once; answer 503 at once beyond (no `Retry-After`).
    /// Those requests are counted in `overloaded`, neither recorded nor scripted.
    pub capacity: Option<usize>,
    /// Added to `delay` for every other request being served when this one arrives: a
    /// receiver whose latency grows with its load.
    pub delay_per_in_flight: Duration,
    /// Keep every request served (see [`Sink::received`]); off for long runs (the bench).
    pub record: bool,
}

/// What the sink has seen (`GET /_receiver/stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkStats {
    /// Requests served (answered as the script said).
    pub requests: u64,
    /// Messages received: one per single request, the batch's size per batch request.
    pub messages: u64,
    pub bytes: u64,
    /// Requests turned away with 503 because `capacity` was reached.
    pub overloaded: u64,
}

/// One request the sink served.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When it arrived (tokio time).
    pub at: Instant,
}

impl Received {
    /// A header's value, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The number of messages of a batch request (`None`: a single delivery).
    pub fn batch_len(&self) -> Option<usize> {
        self.headers
            .contains_key(HEADER_BATCH_SIZE)
            .then(|| batch_len(&self.body))
            .flatten()
    }
}

/// What the sink answers to one request: status, extra headers, a body, and a delay before
/// answering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub delay: Duration,
    pub body: String,
}

impl Answer {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            delay: Duration::ZERO,
            body: String::new(),
        }
    }
    pub fn ok() -> Self {
        Self::status(200)
    }
    pub fn delayed(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
    pub fn with_body(mut self, body: impl Into<String>) -> Self {
        self.body = body.into();
        self
    }
    pub fn with_header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.into()));
        self
    }
    /// A batch answer: 200 with `{"failed": [ids]}` (only those messages come back).
    pub fn failed(ids: &[String]) -> Self {
        Self::ok()
            .with_header("content-type", "application/json")
            .with_body(serde_json::json!({ "failed": ids }).to_string())
    }
}

/// The answer without a script: 200, and `{"failed": []}` to a batch request.
pub fn accept_all(req: &Received, _index: usize) -> Answer {
    match req.batch_len() {
        Some(_) => Answer::failed(&[]),
        None => Answer::ok(),
    }
}

/// The number of messages in a batch request's body (`None`: not a batch).
pub fn batch_len(body: &[u8]) -> Option<usize> {
    #[derive(Deserialize)]
    struct ReceivedBatch {
        messages: Vec<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<ReceivedBatch>(body)
        .ok()
        .map(|b| b.messages.len())
}

type Script = dyn Fn(&Received, usize) -> Answer + Send + Sync;

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    messages: AtomicU64,
    bytes: AtomicU64,
    overloaded: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// One request being served; leaves the count when the answer is sent (or the client left).
struct Serving<'a>(&'a AtomicUsize);

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct SinkState {
    opts: SinkOptions,
    counters: Counters,
    log: Mutex<Vec<Received>>,
    script: Box<Script>,
}

impl SinkState {
    fn stats(&self) -> SinkStats {
        let c = &self.counters;
        SinkStats {
            requests: c.requests.load(Ordering::Relaxed),
            messages: c.messages.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            overloaded: c.overloaded.load(Ordering::Relaxed),
        }
    }

    fn log(&self) -> MutexGuard<'_, Vec<Received>> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running sink; cheap to clone. It serves every path (`/hook` by convention) until the
/// shutdown token given to [`Sink::start`] is cancelled.
#[derive(Clone)]
pub struct Sink {
    addr: SocketAddr,
    state: Arc<SinkState>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").field("addr", &self.addr).finish()
    }
}

impl Sink {
    /// Bind `addr` and serve, answering as [`accept_all`]; returns once listening (the server
    /// runs on a spawned task).
    pub async fn start(
        addr: SocketAddr,
        opts: SinkOptions,
        shutdown: CancellationToken,
    ) -> std::io::Result<Sink> {
        Self::start_scripted(addr, opts, accept_all, shutdown).await
    }

    /// [`Sink::start`], answering each request as `script(request, index)` says; `index`
    /// counts the requests served from 0, in the order they are recorded.
    pub async fn start_scripted(
        addr: SocketAddr,
        opts: SinkOptions,
        script: impl Fn(&Received, usize) -> Answer + Send + Sync + 'static,
        shutdown: CancellationToken,
    ) -> std::io::Result<Sink> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(SinkState {
            opts,
            counters: Counters::default(),
            log: Mutex::default(),
            script: Box::new(script),
        });
        let app = Router::new()
            .route("/_receiver/stats", get(stats))
            .fallback(receive)
            .with_state(state.clone());
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "webhook receiver stopped with an error");
            }
        });
        Ok(Sink { addr, state })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://{addr}/hook`: the webhook URL to configure.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn stats(&self) -> SinkStats {
        self.state.stats()
    }

    /// The most requests it was serving at once (turned-away ones included).
    pub fn max_in_flight(&self) -> usize {
        self.state.counters.max_in_flight.load(Ordering::Relaxed)
    }

    /// Every request served, in arrival order (with [`SinkOptions::record`]).
    pub fn received(&self) -> Vec<Received> {
        self.state.log().clone()
    }

    /// How many requests were recorded.
    pub fn count(&self) -> usize {
        self.state.log().len()
    }

    /// Recorded requests for one message id ([`HEADER_MESSAGE_ID`]), in arrival order.
    pub fn for_id(&self, id: &str) -> Vec<Received> {
        self.state
            .log()
            .iter()
            .filter(|r| r.header(HEADER_MESSAGE_ID) == Some(id))
            .cloned()
            .collect()
    }
}

async fn receive(
    State(s): State<Arc<SinkState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let c = &s.counters;
    let others = c.in_flight.fetch_add(1, Ordering::Relaxed);
    c.max_in_flight.fetch_max(others + 1, Ordering::Relaxed);
    let _serving = Serving(&c.in_flight);
    if s.opts.capacity.is_some_and(|cap| others >= cap) {
        c.overloaded.fetch_add(1, Ordering::Relaxed);
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let req = Received {
        headers,
        body,
        at: Instant::now(),
    };
    let batch = req.batch_len();
    c.messages
        .fetch_add(batch.unwrap_or(1) as u64, Ordering::Relaxed);
    c.bytes.fetch_add(req.body.len() as u64, Ordering::Relaxed);
    if s.opts.print {
        print_line(&method, &uri, &req, batch);
    }
    let index = if s.opts.record {
        let mut log = s.log();
        log.push(req.clone());
        c.requests.fetch_add(1, Ordering::Relaxed);
        log.len() - 1
    } else {
        c.requests.fetch_add(1, Ordering::Relaxed) as usize
    };
    let answer = (s.script)(&req, index);
    let delay = s.opts.delay + s.opts.delay_per_in_flight * others as u32 + answer.delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    respond(answer)
}

fn respond(answer: Answer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, answer.body).into_response();
    for (name, value) in answer.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            resp.headers_mut().insert(name, value);
        }
    }
    resp
}

/// One line per request on stdout: `receive --print`.
fn print_line(method: &Method, uri: &Uri, req: &Received, batch: Option<usize>) {
    let header = |name: &str| req.header(name).unwrap_or("-").to_owned();
    let excerpt = excerpt(&req.body);
    match batch {
        Some(n) => println!(
            "{method} {} batch={} messages={n} {} bytes: {excerpt}",
            uri.path(),
            header(HEADER_BATCH_ID),
            req.body.len(),
        ),
        None => println!(
            "{method} {} id={} attempt={} type={} {} bytes: {excerpt}",
            uri.path(),
            header(HEADER_MESSAGE_ID),
            header(HEADER_ATTEMPT),
            header(header::CONTENT_TYPE.as_str()),
            req.body.len(),
        ),
    }
}

/// The first [`EXCERPT_CHARS`] characters of a body on one line (control characters escaped).
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(EXCERPT_CHARS * 4)]);
    let mut s: String = text
        .chars()
        .take(EXCERPT_CHARS)
        .flat_map(|c| -> Vec<char> {
            if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            }
        })
        .collect();
    if text.chars().count() > EXCERPT_CHARS {
        s.push('…');
    }
    s
}

async fn stats(State(s): State<Arc<SinkState>>) -> Response {
    axum::Json(s.stats()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn localhost() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

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
        let sink = Sink::start(localhost(), SinkOptions::default(), stop.clone())
            .await
            .unwrap();
        let addr = sink.addr();
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
        // A batch counts its messages and gets per-message results: none failed.
        let batch = r#"{"messages":[{"id":"a"},{"id":"b"},{"id":"c"}]}"#;
        let r = http
            .post(format!("http://{addr}/hook"))
            .header(HEADER_BATCH_SIZE, "3")
            .body(batch)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-type"].to_str().unwrap(),
            "application/json"
        );
        let answer: serde_json::Value = r.json().await.unwrap();
        assert_eq!(answer, serde_json::json!({"failed": []}));
        let stats = fetch_stats(&http, addr).await;
        assert_eq!(
            (&stats["requests"], &stats["messages"]),
            (&3.into(), &5.into())
        );
        assert_eq!(sink.stats().messages, 5);
        // Not recording unless asked.
        assert_eq!(sink.count(), 0);
        stop.cancel();
    }

    #[tokio::test]
    async fn records_requests_and_answers_as_the_script_says() {
        let stop = CancellationToken::new();
        let opts = SinkOptions {
            record: true,
            ..SinkOptions::default()
        };
        // The first request for each id fails with a Retry-After, later ones succeed.
        let sink = Sink::start_scripted(
            localhost(),
            opts,
            |req, index| match (req.header(HEADER_ATTEMPT), index) {
                (Some("1"), _) => Answer::status(503)
                    .with_header("retry-after", "7")
                    .with_body("busy"),
                _ => Answer::ok().with_body(format!("#{index}")),
            },
            stop.clone(),
        )
        .await
        .unwrap();
        let http = reqwest::Client::new();
        let send = |attempt: &'static str, id: &'static str| {
            http.post(sink.url())
                .header(HEADER_MESSAGE_ID, id)
                .header(HEADER_ATTEMPT, attempt)
                .body(format!("body of {id}"))
                .send()
        };
        let r = send("1", "m1").await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "7");
        assert_eq!(r.text().await.unwrap(), "busy");
        let r = send("2", "m1").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "#1");
        send("1", "m2").await.unwrap();

        assert_eq!(sink.count(), 3);
        let m1 = sink.for_id("m1");
        assert_eq!(m1.len(), 2);
        assert_eq!(m1[0].header(HEADER_ATTEMPT), Some("1"));
        assert_eq!(m1[1].header(HEADER_ATTEMPT), Some("2"));
        assert_eq!(&m1[1].body[..], b"body of m1");
        assert!(m1[0].at <= m1[1].at);
        let all = sink.received();
        assert_eq!(all[2].header(HEADER_MESSAGE_ID), Some("m2"));
        assert_eq!(sink.stats().requests, 3);
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_scripted_delay_holds_the_answer_back() {
        let stop = CancellationToken::new();
        let sink = Sink::start_scripted(
            localhost(),
            SinkOptions::default(),
            |_, _| Answer::ok().delayed(Duration::from_secs(30)),
            stop.clone(),
        )
        .await
        .unwrap();
        let http = reqwest::Client::new();
        let started = Instant::now();
        let r = http.post(sink.url()).body("x").send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(started.elapsed() >= Duration::from_secs(30));
        assert_eq!(sink.max_in_flight(), 1);
        stop.cancel();
    }

    #[tokio::test]
    async fn beyond_its_capacity_it_answers_503_at_once() {
        let stop = CancellationToken::new();
        let opts = SinkOptions {
            delay: Duration::from_secs(30),
            capacity: Some(2),
            ..SinkOptions::default()
        };
        let sink = Sink::start(localhost(), opts, stop.clone()).await.unwrap();
        let http = reqwest::Client::new();
        let url = sink.url();
        // Two slow requests take the capacity...
        let held: Vec<_> = (0..2)
            .map(|_| tokio::spawn(http.post(&url).body("x").send()))
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.stats().requests < 2 {
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
        let s = fetch_stats(&http, sink.addr()).await;
        assert_eq!(s["overloaded"], 1);
        for h in held {
            h.abort();
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn speaks_cleartext_http2() {
        let stop = CancellationToken::new();
        let sink = Sink::start(localhost(), SinkOptions::default(), stop.clone())
            .await
            .unwrap();
        let h2 = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap();
        let r = h2.post(sink.url()).body("x").send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        stop.cancel();
    }

    #[test]
    fn excerpts_are_one_line_and_cut() {
        assert_eq!(excerpt(b"a\nb"), "a\\nb");
        let long = "x".repeat(EXCERPT_CHARS + 5);
        let e = excerpt(long.as_bytes());
        assert_eq!(e.chars().count(), EXCERPT_CHARS + 1);
        assert!(e.ends_with('…'));
    }
}
