//! Test kit: a real webhook receiver on 127.0.0.1:0 whose answers a test scripts, the bundled
//! emulator, and configs that point the relay at both.
#![allow(dead_code)]

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
use cfq_emulator::{Emulator, EmulatorOptions};
use cfq_relay::Config;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "test-token-7f3a9c";
pub const ACCOUNT: &str = "0123456789abcdef0123456789abcdef";

/// One request the receiver got.
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
}

/// What the receiver answers: status, extra headers, a body, and a delay before answering.
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

/// A webhook receiver. `script(request, index)` decides each answer (`index` counts requests
/// from 0).
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<Received>>>,
    in_flight: Arc<AtomicUsize>,
    pub max_in_flight: Arc<AtomicUsize>,
}

struct RxState {
    log: Arc<Mutex<Vec<Received>>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    script: Box<Script>,
}

async fn handle(State(s): State<Arc<RxState>>, headers: HeaderMap, body: Bytes) -> Response {
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

impl Receiver {
    pub async fn start(
        script: impl Fn(&Received, usize) -> Answer + Send + Sync + 'static,
    ) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let state = Arc::new(RxState {
            log: log.clone(),
            in_flight: in_flight.clone(),
            max_in_flight: max_in_flight.clone(),
            script: Box::new(script),
        });
        let app = Router::new().route("/hook", post(handle)).with_state(state);
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver {
            addr,
            log,
            in_flight,
            max_in_flight,
        }
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

    /// Requests for one message id, in arrival order.
    pub fn for_id(&self, id: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.header("cfq-message-id") == Some(id))
            .collect()
    }
}

/// Start an emulator on 127.0.0.1:0; returns it and its base URL.
pub async fn emulator(opts: EmulatorOptions, stop: &CancellationToken) -> (Emulator, String) {
    let e = Emulator::new(EmulatorOptions {
        token: Some(TOKEN.into()),
        ..opts
    });
    let addr = e
        .start("127.0.0.1:0".parse().unwrap(), stop.clone())
        .await
        .unwrap();
    (e, Emulator::base_url(addr))
}

/// A config for one consumer of `queue` delivering to `hook`; `extra` is TOML appended inside
/// the `[[consumers]]` table (before its webhook table), `webhook_extra` inside the webhook table.
pub fn config(api: &str, consumers: &[(&str, &str, &str, &str)]) -> Config {
    let mut text = format!(
        "[cloudflare]\naccount_id = \"{ACCOUNT}\"\napi_base_url = \"{api}\"\napi_token = \"{TOKEN}\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[shutdown]\ngrace_period = \"5s\"\n"
    );
    for (queue, hook, extra, webhook_extra) in consumers {
        text.push_str(&format!(
            "[[consumers]]\nqueue_id = \"{queue}\"\nvisibility_timeout = \"30s\"\nmax_idle_backoff = \"200ms\"\n{extra}\n\
             [consumers.webhook]\nurl = \"{hook}\"\ntimeout = \"5s\"\n{webhook_extra}\n\
             [consumers.retry]\nbase_delay = \"1s\"\nmax_delay = \"10s\"\n"
        ));
    }
    Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Poll `cond` every 10 ms until it holds or `limit` passes (in tokio time).
pub async fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
