//! The webhook sink of the tests: a real HTTP server on `127.0.0.1:0` that records every
//! request and answers what the test's script says; and a tally of the answers that said
//! "delivered".

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tokio::time::Instant;

/// One request the sink got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `cfq-message-id` header (panics without one).
    pub fn id(&self) -> &str {
        self.header("cfq-message-id")
            .expect("a cfq-message-id header")
    }
}

/// What the sink answers: status, extra headers, a body, and a delay before answering.
#[derive(Debug, Clone)]
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
}

type Script = dyn Fn(&Received, usize) -> Answer + Send + Sync;

/// A webhook sink. `script(request, index)` decides each answer (`index` counts requests
/// from 0).
#[derive(Clone)]
pub struct Hook {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Received>>>,
    /// The most requests it served at once.
    pub max_in_flight: Arc<AtomicUsize>,
}

struct HookState {
    log: Arc<Mutex<Vec<Received>>>,
    in_flight: AtomicUsize,
    max_in_flight: Arc<AtomicUsize>,
    script: Box<Script>,
}

async fn handle(State(s): State<Arc<HookState>>, headers: HeaderMap, body: Bytes) -> Response {
    let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let req = Received {
        headers,
        body,
        at: Instant::now(),
    };
    let index = {
        let mut log = s.log.lock().unwrap();
        log.push(req.clone());
        log.len() - 1
    };
    let answer = (s.script)(&req, index);
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    s.in_flight.fetch_sub(1, Ordering::SeqCst);
    let mut resp = (StatusCode::from_u16(answer.status).unwrap(), answer.body).into_response();
    for (k, v) in answer.headers {
        resp.headers_mut().insert(k, v.parse().unwrap());
    }
    resp
}

impl Hook {
    pub async fn start(
        script: impl Fn(&Received, usize) -> Answer + Send + Sync + 'static,
    ) -> Hook {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let state = Arc::new(HookState {
            log: log.clone(),
            in_flight: AtomicUsize::new(0),
            max_in_flight: max_in_flight.clone(),
            script: Box::new(script),
        });
        let app = Router::new().route("/hook", post(handle)).with_state(state);
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Hook {
            addr,
            log,
            max_in_flight,
        }
    }

    /// A sink that answers its first `n` requests with `first`, and 200 after.
    pub async fn failing_first(n: usize, first: Answer) -> Hook {
        Self::start(move |_, i| if i < n { first.clone() } else { Answer::ok() }).await
    }

    /// A sink that answers every request 200.
    pub async fn ok() -> Hook {
        Self::start(|_, _| Answer::ok()).await
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// The most requests it served at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// Requests for one message id, in arrival order.
    pub fn for_id(&self, id: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.header("cfq-message-id") == Some(id))
            .collect()
    }

    /// The value of header `name` of every request, in arrival order ("" where absent).
    pub fn headers(&self, name: &str) -> Vec<String> {
        self.received()
            .iter()
            .map(|r| r.header(name).unwrap_or_default().to_owned())
            .collect()
    }

    /// The message id of every request, in arrival order.
    pub fn ids(&self) -> Vec<String> {
        self.received().iter().map(|r| r.id().to_owned()).collect()
    }
}

/// A sink that answers 200 after `delay`, tallying the answers.
pub async fn ok_hook(delay: Duration) -> (Hook, Tally) {
    let tally = Tally::default();
    let t = tally.clone();
    let hook = Hook::start(move |r, _| {
        t.record(r.header("cfq-message-id").unwrap_or("?"));
        Answer::ok().delayed(delay)
    })
    .await;
    (hook, tally)
}

/// Counts, per message id, the webhook answers that said "delivered" and reached the relay.
#[derive(Clone, Default)]
pub struct Tally(Arc<Mutex<HashMap<String, u32>>>);

impl Tally {
    pub fn record(&self, id: &str) {
        *self.0.lock().unwrap().entry(id.to_owned()).or_default() += 1;
    }
    pub fn total(&self) -> u64 {
        self.0.lock().unwrap().values().map(|v| u64::from(*v)).sum()
    }
    pub fn get(&self, id: &str) -> u32 {
        self.0.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}
