//! A local Cloudflare Queues HTTP API (queues, consumers, pull, ack, publish, peek, purge) with
//! real lease semantics, held to Cloudflare's official SDK (`.ci/sdk_conformance.py`).
//!
//! It speaks the same wire format as `api.cloudflare.com/client/v4` (see
//! `shared/cloudflare-queues.md`): envelopes, Cloudflare's Queues error codes ([`code`]) and
//! limits, queues that exist only once created, long opaque lease ids, `attempts`, backlog
//! metrics, stale acks, retries with a delay, dead-lettering after `max_retries`. On top, it
//! keeps books (per-queue counters and one [`MessageBook`] per message, every ack and retry item
//! counted per lease and per message) so tests, the demo and benchmarks can check exactly what
//! a consumer did, a double ack included, and it can inject faults ([`Fault`]).
//!
//! Every operation costs O(log n) in the number of messages: ready messages sit in a FIFO
//! deque, delayed ones and leased ones in ordered sets keyed by their due instant, and a lease
//! id carries its message and delivery under an HMAC, so it resolves without a lookup table
//! (and an old one still names its message: that is how a double ack is caught). Leases and delays are measured with [`tokio::time::Instant`]
//! plus an offset that [`Emulator::advance`] moves forward, and are evaluated lazily at every
//! call (no background task).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, Path, Request, State as Ctx};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::{IncomingStream, Listener};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use rand::{Rng, RngExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Largest `batch_size` of a pull.
const MAX_BATCH: u64 = 100;
/// `batch_size` when the pull does not say.
const DEFAULT_BATCH: u64 = 5;
/// `visibility_timeout_ms` when the pull does not say.
const DEFAULT_VISIBILITY_MS: u64 = 30_000;
/// Largest `visibility_timeout_ms` (12 h).
const MAX_VISIBILITY_MS: u64 = 43_200_000;
/// Largest `delay_seconds` of a retry or a publish (24 h).
const MAX_DELAY_SECONDS: u64 = 86_400;
/// Largest message, its metadata included (Cloudflare: 128 KB, where 1 KB = 1,000 bytes).
pub const MAX_MESSAGE_BYTES: usize = 128_000;
/// What Cloudflare counts for a message's own metadata towards the size limits.
pub const MESSAGE_METADATA_BYTES: usize = 100;
/// Largest batch of a publish call, in messages.
const MAX_PUBLISH_BATCH: usize = 100;
/// Largest batch of a publish call, in bytes (each message's metadata included).
pub const MAX_BATCH_BYTES: usize = 256_000;

/// Cloudflare's Queues error codes (developers.cloudflare.com/queues/reference/error-codes).
pub mod code {
    /// A bad or missing API token (HTTP 403).
    pub const AUTHENTICATION: u32 = 10_000;
    /// The queue (or the account) does not exist (HTTP 404).
    pub const QUEUE_NOT_FOUND: u32 = 10_104;
    /// The queue id in the URL is not a valid identifier (HTTP 400).
    pub const QUEUE_ID_MALFORMED: u32 = 10_107;
    /// A batch's `delay_seconds` is out of bounds (HTTP 400).
    pub const BATCH_DELAY_INVALID: u32 = 10_202;
    /// A message's content type or delay is invalid (HTTP 400).
    pub const MESSAGE_METADATA_INVALID: u32 = 10_203;
    /// A message is larger than 128 KB, metadata included (HTTP 400).
    pub const MESSAGE_TOO_LARGE: u32 = 10_204;
    /// A batch is larger than 256 KB (HTTP 400).
    pub const BATCH_TOO_LARGE: u32 = 10_205;
    /// A batch holds more than 100 messages (HTTP 400).
    pub const BATCH_COUNT: u32 = 10_206;
    /// The JSON body does not match the schema (HTTP 400).
    pub const BODY_INVALID: u32 = 10_207;
    /// The body is not JSON (HTTP 400).
    pub const BODY_MALFORMED: u32 = 10_208;
    /// A queue of that name exists already (HTTP 409).
    pub const QUEUE_NAME_TAKEN: u32 = 11_009;
}
/// Request bodies up to this size are read (a full publish batch of base64 bodies fits).
const BODY_LIMIT: usize = 32 * 1024 * 1024;
/// Protected header of the lease ids: base64url of `{"alg":"dir","enc":"A256CBC-HS512"}`, the
/// header of Cloudflare's own lease JWEs.
const LEASE_HEADER: &str = "eyJhbGciOiJkaXIiLCJlbmMiOiJBMjU2Q0JDLUhTNTEyIn0";

/// How the emulator behaves.
#[derive(Clone, Debug)]
pub struct EmulatorOptions {
    /// If set, every request must carry `Authorization: Bearer <token>`, else 403 (code 10000).
    pub token: Option<String>,
    /// A message whose delivery failed (explicit retry or lease expiry) with
    /// `attempts > max_retries` is dead-lettered (counted and removed). The default of every
    /// HTTP pull consumer the emulator creates; a queue follows its first consumer's setting.
    pub max_retries: u32,
    /// Added before answering every Cloudflare API call (not the `_emulator` routes).
    pub latency: Duration,
    /// `false`: json bodies go on the wire as base64 of the JSON text (what the docs describe);
    /// `true`: as the raw JSON text (what some examples show).
    pub json_raw: bool,
    /// This share of pull and ack calls (0..1, spread evenly) answers 500 and does nothing:
    /// a flaky API for benchmarks and tests.
    pub error_ratio: f64,
    /// The account the API answers for; another account id in a URL answers 404 (code 10104).
    /// `None` answers for any account id (the in-process default).
    pub account_id: Option<String>,
    /// Queues that exist from the start, by name, each with an HTTP pull consumer (what
    /// `cfq-relay emulate --queue NAME` creates).
    pub queues: Vec<String>,
    /// `true` (the in-process default, so that a test needs no set-up): a call that names a
    /// queue that does not exist creates it, with an HTTP pull consumer. `false` (what
    /// `cfq-relay emulate` runs): such a call answers 404 with code 10104, as Cloudflare does.
    /// The in-process [`Emulator::publish`] creates its queue either way.
    pub create_queues_on_use: bool,
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        Self {
            token: None,
            max_retries: 3,
            latency: Duration::ZERO,
            json_raw: false,
            error_ratio: 0.0,
            account_id: None,
            queues: Vec::new(),
            create_queues_on_use: true,
        }
    }
}

/// The content type of a message (`metadata["CF-Content-Type"]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ContentType {
    Text,
    Json,
    Bytes,
    V8,
}

impl ContentType {
    /// The wire name: `text`, `json`, `bytes` or `v8`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
            Self::Bytes => "bytes",
            Self::V8 => "v8",
        }
    }
}

impl std::fmt::Display for ContentType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A content type name that is not `text`, `json`, `bytes` or `v8`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown content type {0:?} (expected text, json, bytes or v8)")]
pub struct UnknownContentType(pub String);

impl FromStr for ContentType {
    type Err = UnknownContentType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            "bytes" => Ok(Self::Bytes),
            "v8" => Ok(Self::V8),
            other => Err(UnknownContentType(other.to_owned())),
        }
    }
}

/// An API operation that faults can be injected into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Pull,
    Ack,
}

/// A one-shot fault for the next call of an [`Op`].
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status and body (and a `Retry-After` header if set), doing nothing.
    Status {
        status: u16,
        body: String,
        retry_after: Option<String>,
    },
    /// Wait this long, then handle the call normally.
    Delay(Duration),
    /// Never answer; at shutdown the connection is reset.
    Hang,
    /// Reset the TCP connection (RST, no answer at all). Other requests that share the
    /// connection (HTTP/2) fail with it.
    Reset,
}

/// Counters of one queue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    /// Messages published.
    pub published: u64,
    /// Messages handed out by pulls (each redelivery counts).
    pub deliveries: u64,
    /// Pull calls answered (faulted calls not included).
    pub pull_calls: u64,
    /// Pull calls that handed out nothing.
    pub empty_pulls: u64,
    /// Ack calls answered (faulted calls not included).
    pub ack_calls: u64,
    /// Acks accepted (stale ones included).
    pub acked: u64,
    /// Retries accepted.
    pub retried: u64,
    /// Leases that ran out without an ack or a retry.
    pub lease_expired: u64,
    /// Messages dropped after `max_retries`.
    pub dead_lettered: u64,
    /// Acks with a lease that was no longer the message's current one (it had expired, or the
    /// message was dead-lettered): accepted all the same, like Cloudflare.
    pub stale_acks: u64,
    /// Acks of a message that an earlier ack had already acknowledged: accepted (Cloudflare
    /// is permissive), and counted in `acked` too, so that "acked exactly once" checks fail.
    pub double_acks: u64,
    /// Ack and retry items naming a lease that an earlier item had already answered.
    pub reused_leases: u64,
    /// Acks and retries naming a lease this queue never issued (answered with a warning).
    pub unknown_leases: u64,
    /// Messages removed by a purge (of the whole queue, or by peek refs).
    pub purged: u64,
    /// Messages not yet acked or dead-lettered (ready, delayed or leased).
    pub backlog: u64,
    /// Messages currently leased.
    pub in_flight: u64,
}

/// What happened to one message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MessageBook {
    pub id: String,
    /// Times it was handed out by a pull.
    pub deliveries: u32,
    /// Ack items for it, stale and repeated ones included (1 when all goes right).
    pub acks: u32,
    pub dead_lettered: bool,
    /// `delay_seconds` of each retry item for it, in order (stale and repeated ones included).
    pub retries: Vec<u32>,
    /// Per delivery (index 0: the first), how many ack and retry items named its lease (1 when
    /// all goes right; 0 for a lease that ran out; 2 or more: a lease answered twice).
    pub lease_answers: Vec<u32>,
}

/// Why [`Emulator::publish`] refused a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("a text (or untyped) message must be UTF-8")]
    NotUtf8,
    #[error("a json message must be valid JSON: {0}")]
    InvalidJson(String),
    #[error("message of {size} bytes is larger than the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
    #[error("delay of {0:?} is longer than the 24 h maximum")]
    DelayTooLong(Duration),
}

/// A local Cloudflare Queues API. Cheap to clone: clones share the queues.
#[derive(Clone)]
pub struct Emulator {
    inner: Arc<Inner>,
}

struct Inner {
    opts: EmulatorOptions,
    /// Signs lease ids and peek refs, so that an ack can name its message and delivery
    /// without the emulator keeping every lease id it ever issued.
    key: [u8; 32],
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// By queue id.
    queues: HashMap<String, Queue>,
    /// Queue name → queue id.
    names: HashMap<String, String>,
    pull_faults: VecDeque<Fault>,
    ack_faults: VecDeque<Fault>,
    /// API calls seen, for `error_ratio`.
    calls: u64,
    /// Added to the tokio clock: see [`Emulator::advance`].
    clock_offset: Duration,
}

impl State {
    fn now(&self) -> Instant {
        Instant::now() + self.clock_offset
    }

    /// The queue a URL names: by its id, or (an emulator convenience, so that a development
    /// config can say `queue_id = "dev-queue"`) by its name.
    fn find(&mut self, key: &str) -> Option<&mut Queue> {
        let id = if self.queues.contains_key(key) {
            key.to_owned()
        } else {
            self.names.get(key)?.clone()
        };
        self.queues.get_mut(&id)
    }

    /// Create a queue named `name` (its id derived from the name); `None` if the name is taken.
    fn create(
        &mut self,
        name: &str,
        http_pull_consumer: bool,
        max_retries: u32,
    ) -> Option<&mut Queue> {
        if self.names.contains_key(name) {
            return None;
        }
        let id = queue_id_for(name);
        let mut q = Queue {
            id: id.clone(),
            name: name.to_owned(),
            created_on: rfc3339_now(),
            ..Queue::default()
        };
        if http_pull_consumer {
            q.consumers.push(HttpPullConsumer::new(name, max_retries));
        }
        self.names.insert(name.to_owned(), id.clone());
        Some(self.queues.entry(id).or_insert(q))
    }

    fn remove(&mut self, key: &str) -> Option<Queue> {
        let id = self.find(key)?.id.clone();
        let q = self.queues.remove(&id)?;
        self.names.remove(&q.name);
        Some(q)
    }
}

/// A queue's id: 32 hex characters, derived from its name so that it stays the same across
/// restarts of the emulator (a config that names the id keeps working).
fn queue_id_for(name: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(name.as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

fn rfc3339_now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// An HTTP pull consumer, as `GET …/queues/{id}` and `…/consumers` show it.
#[derive(Clone, Debug, Serialize)]
struct HttpPullConsumer {
    consumer_id: String,
    created_on: String,
    dead_letter_queue: String,
    queue_name: String,
    settings: ConsumerSettings,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Clone, Debug, Serialize)]
struct ConsumerSettings {
    batch_size: u64,
    max_retries: u32,
    retry_delay: u64,
    visibility_timeout_ms: u64,
}

impl HttpPullConsumer {
    fn new(queue_name: &str, max_retries: u32) -> Self {
        Self {
            consumer_id: format!("{:032x}", rand::rng().random::<u128>()),
            created_on: rfc3339_now(),
            dead_letter_queue: String::new(),
            queue_name: queue_name.to_owned(),
            settings: ConsumerSettings {
                batch_size: DEFAULT_BATCH,
                max_retries,
                retry_delay: 0,
                visibility_timeout_ms: DEFAULT_VISIBILITY_MS,
            },
            kind: "http_pull",
        }
    }
}

/// A queue's `settings`, as Cloudflare shows them and `PATCH …/queues/{id}` changes them.
#[derive(Clone, Debug, Serialize)]
struct QueueSettings {
    /// Seconds by which a message published without a delay is held back.
    delivery_delay: u64,
    /// Pulls hand out nothing while set.
    delivery_paused: bool,
    /// Shown, not applied: messages here never expire.
    message_retention_period: u64,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            delivery_delay: 0,
            delivery_paused: false,
            message_retention_period: 345_600,
        }
    }
}

impl Emulator {
    pub fn new(opts: EmulatorOptions) -> Self {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        let mut state = State::default();
        for name in &opts.queues {
            state.create(name, true, opts.max_retries);
        }
        Self {
            inner: Arc::new(Inner {
                opts,
                key,
                state: Mutex::new(state),
            }),
        }
    }

    /// Bind `addr` (e.g. 127.0.0.1:0), spawn the server on the current runtime, return the
    /// bound address. The server stops when `shutdown` is cancelled.
    pub async fn start(
        &self,
        addr: SocketAddr,
        shutdown: CancellationToken,
    ) -> io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.serve(listener, shutdown).await {
                warn!(error = %e, "queues emulator stopped with an error");
            }
        });
        Ok(bound)
    }

    /// Serve on an existing listener until `shutdown` is cancelled.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> io::Result<()> {
        let app = self.router(shutdown.clone());
        axum::serve(
            ResetListener(listener),
            app.into_make_service_with_connect_info::<Conn>(),
        )
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    }

    /// `http://{addr}/client/v4` — what goes into the relay's `cloudflare.api_base_url`.
    pub fn base_url(addr: SocketAddr) -> String {
        format!("http://{addr}/client/v4")
    }

    /// Create a queue named `name` with an HTTP pull consumer (as `emulate --queue NAME`);
    /// returns its id. An existing queue of that name is kept as it is.
    pub fn create_queue(&self, name: &str) -> String {
        let max_retries = self.inner.opts.max_retries;
        let mut st = self.lock();
        if let Some(q) = st.find(name) {
            return q.id.clone();
        }
        st.create(name, true, max_retries)
            .map(|q| q.id.clone())
            .unwrap_or_default()
    }

    /// The id of the queue that `key` (an id or a name) names, if it exists.
    pub fn queue_id(&self, key: &str) -> Option<String> {
        self.lock().find(key).map(|q| q.id.clone())
    }

    /// Publish in-process. `payload` is what the webhook should finally receive; it is encoded
    /// for the wire per content type (text and untyped: the UTF-8 text; json: base64 of the
    /// JSON text, or the text itself with `json_raw`; bytes and v8: base64). `None` publishes
    /// a text body without a `CF-Content-Type` key. Returns the message id (32 hex chars).
    ///
    /// A test convenience: a queue that does not exist is created (named `queue_id`, with an
    /// HTTP pull consumer), whatever [`EmulatorOptions::create_queues_on_use`] says.
    pub fn publish(
        &self,
        queue_id: &str,
        content_type: Option<ContentType>,
        payload: &[u8],
        delay: Duration,
    ) -> Result<String, PublishError> {
        let draft = self.draft(content_type, payload, delay)?;
        self.create_queue(queue_id);
        let mut ids = self
            .publish_drafts(queue_id, vec![draft])
            .unwrap_or_default();
        Ok(ids.pop().unwrap_or_default())
    }

    /// Counters of a queue (all zero for a queue that does not exist). Due leases and delays
    /// are settled first, so the figures are those of now.
    pub fn stats(&self, queue_id: &str) -> QueueStats {
        let mut st = self.lock();
        let now = st.now();
        let max_retries = self.inner.opts.max_retries;
        match st.find(queue_id) {
            Some(q) => {
                q.settle(now, q.max_retries(max_retries));
                q.stats()
            }
            None => QueueStats::default(),
        }
    }

    /// One book per message ever published to the queue, in publish order.
    pub fn books(&self, queue_id: &str) -> Vec<MessageBook> {
        let mut st = self.lock();
        let now = st.now();
        let max_retries = self.inner.opts.max_retries;
        match st.find(queue_id) {
            Some(q) => {
                q.settle(now, q.max_retries(max_retries));
                q.books.clone()
            }
            None => Vec::new(),
        }
    }

    /// Queue a one-shot fault for the next API call of `op` on any queue (FIFO per op).
    pub fn inject_fault(&self, op: Op, fault: Fault) {
        let mut st = self.lock();
        match op {
            Op::Pull => st.pull_faults.push_back(fault),
            Op::Ack => st.ack_faults.push_back(fault),
        }
    }

    /// Move the emulator's clock forward by `by`: leases and delays that fall due by then are
    /// settled at the next call. For tests that must not wait out a visibility timeout or a
    /// retry delay (tokio's `test-util` clock is not available to this crate).
    pub fn advance(&self, by: Duration) {
        let mut st = self.lock();
        st.clock_offset += by;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Check and encode one message for the wire.
    fn draft(
        &self,
        content_type: Option<ContentType>,
        payload: &[u8],
        delay: Duration,
    ) -> Result<Draft, PublishError> {
        let size = payload.len() + MESSAGE_METADATA_BYTES;
        if size > MAX_MESSAGE_BYTES {
            return Err(PublishError::TooLarge {
                size,
                max: MAX_MESSAGE_BYTES,
            });
        }
        if delay > Duration::from_secs(MAX_DELAY_SECONDS) {
            return Err(PublishError::DelayTooLong(delay));
        }
        let body = match content_type {
            None | Some(ContentType::Text) => std::str::from_utf8(payload)
                .map_err(|_| PublishError::NotUtf8)?
                .to_owned(),
            Some(ContentType::Json) => {
                serde_json::from_slice::<serde::de::IgnoredAny>(payload)
                    .map_err(|e| PublishError::InvalidJson(e.to_string()))?;
                if self.inner.opts.json_raw {
                    std::str::from_utf8(payload)
                        .map_err(|e| PublishError::InvalidJson(e.to_string()))?
                        .to_owned()
                } else {
                    STANDARD.encode(payload)
                }
            }
            Some(ContentType::Bytes | ContentType::V8) => STANDARD.encode(payload),
        };
        Ok(Draft {
            content_type,
            body,
            size,
            delay,
        })
    }

    /// Publish checked messages under one lock; returns their ids and the queue's metrics
    /// after them, or `None` if the queue does not exist.
    fn publish_drafts(&self, queue_id: &str, drafts: Vec<Draft>) -> Option<Vec<String>> {
        self.publish_with_metrics(queue_id, drafts)
            .map(|(ids, _)| ids)
    }

    fn publish_with_metrics(
        &self,
        queue_id: &str,
        drafts: Vec<Draft>,
    ) -> Option<(Vec<String>, Metrics)> {
        let timestamp_ms = unix_ms();
        let mut st = self.lock();
        let now = st.now();
        let max_retries = self.inner.opts.max_retries;
        let q = st.find(queue_id)?;
        q.settle(now, q.max_retries(max_retries));
        let ids = drafts
            .into_iter()
            .map(|d| q.publish(now, timestamp_ms, d))
            .collect();
        Some((ids, q.metrics()))
    }

    fn take_fault(&self, op: Op) -> Option<Fault> {
        let mut st = self.lock();
        let injected = match op {
            Op::Pull => st.pull_faults.pop_front(),
            Op::Ack => st.ack_faults.pop_front(),
        };
        if injected.is_some() {
            return injected;
        }
        let ratio = self.inner.opts.error_ratio;
        if ratio <= 0.0 {
            return None;
        }
        // Evenly spread: call k fails when k × ratio crosses an integer.
        let k = st.calls as f64;
        st.calls += 1;
        (((k + 1.0) * ratio).floor() > (k * ratio).floor()).then(|| Fault::Status {
            status: 500,
            body: r#"{"success":false,"errors":[{"code":10001,"message":"internal error (injected)"}]}"#
                .into(),
            retry_after: None,
        })
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.inner.opts.token else {
            return true;
        };
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .is_some_and(|t| t.trim() == token)
    }

    /// Whether the API answers for this account id.
    fn account_known(&self, account_id: &str) -> bool {
        self.inner
            .opts
            .account_id
            .as_deref()
            .is_none_or(|a| a == account_id)
    }

    /// Run `f` on the queue a URL names, under the lock, after settling due leases and delays;
    /// creates the queue first with [`EmulatorOptions::create_queues_on_use`]. `Err`: the 404
    /// (or 400 for a malformed id) to answer.
    fn with_queue<T>(
        &self,
        account_id: &str,
        queue_id: &str,
        f: impl FnOnce(&mut Queue, Instant, u32) -> T,
    ) -> Result<T, Refusal> {
        if !self.account_known(account_id) {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                code::QUEUE_NOT_FOUND,
                "Queue does not exist: unknown account",
            ));
        }
        let max_retries = self.inner.opts.max_retries;
        let mut st = self.lock();
        let now = st.now();
        if st.find(queue_id).is_none() && self.inner.opts.create_queues_on_use {
            st.create(queue_id, true, max_retries);
        }
        match st.find(queue_id) {
            Some(q) => {
                let max_retries = q.max_retries(max_retries);
                q.settle(now, max_retries);
                Ok(f(q, now, max_retries))
            }
            None if !queue_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
            {
                Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    code::QUEUE_ID_MALFORMED,
                    "The queue ID in the request URL is not a valid queue identifier",
                ))
            }
            None => Err(Refusal::new(
                StatusCode::NOT_FOUND,
                code::QUEUE_NOT_FOUND,
                "Queue does not exist",
            )),
        }
    }

    fn router(&self, shutdown: CancellationToken) -> Router {
        let app = App {
            emu: self.clone(),
            shutdown,
        };
        let a = "/client/v4/accounts/{account_id}/queues";
        let q = "/client/v4/accounts/{account_id}/queues/{queue_id}";
        Router::new()
            .route(a, get(list_queues_handler).post(create_queue_handler))
            .route(
                q,
                get(get_queue_handler)
                    .delete(delete_queue_handler)
                    .patch(update_queue_handler)
                    .put(update_queue_handler),
            )
            .route(
                &format!("{q}/consumers"),
                get(list_consumers_handler).post(create_consumer_handler),
            )
            .route(
                &format!("{q}/consumers/{{consumer_id}}"),
                get(get_consumer_handler)
                    .put(update_consumer_handler)
                    .delete(delete_consumer_handler),
            )
            .route(&format!("{q}/metrics"), get(metrics_handler))
            .route(
                &format!("{q}/purge"),
                post(purge_queue_handler).get(purge_status_handler),
            )
            .route(&format!("{q}/messages/pull"), post(pull_handler))
            .route(&format!("{q}/messages/ack"), post(ack_handler))
            .route(&format!("{q}/messages/peek"), post(peek_handler))
            .route(&format!("{q}/messages/purge"), post(purge_messages_handler))
            .route(&format!("{q}/messages"), post(publish_handler))
            .route(&format!("{q}/messages/batch"), post(publish_batch_handler))
            .route_layer(axum::middleware::from_fn_with_state(app.clone(), api_gate))
            .route(
                "/client/v4/_emulator/queues/{queue_id}/stats",
                get(stats_handler),
            )
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(DefaultBodyLimit::max(BODY_LIMIT))
            .with_state(app)
    }

    /// A lease id (`kind` 0) or a peek ref (`kind` 1) for delivery `delivery` (0: the first)
    /// of message `seq` of queue `queue_id`: shaped like Cloudflare's (a compact JWE, `dir`,
    /// A256CBC-HS512, ~310 url-safe characters), its "ciphertext" carrying the message and
    /// delivery and its "tag" an HMAC over them, so that the emulator can tell a lease it
    /// issued (however old) from a forged one without keeping them all.
    fn token_for(&self, queue_id: &str, kind: u8, seq: u64, delivery: u32) -> String {
        let mut rng = rand::rng();
        let mut iv = [0u8; 16];
        let mut ciphertext = [0u8; 144];
        rng.fill_bytes(&mut iv);
        rng.fill_bytes(&mut ciphertext);
        ciphertext[..8].copy_from_slice(&seq.to_le_bytes());
        ciphertext[8..12].copy_from_slice(&delivery.to_le_bytes());
        ciphertext[12] = kind;
        let tag = self.tag(queue_id, &iv, &ciphertext);
        let mut s = String::with_capacity(320);
        s.push_str(LEASE_HEADER);
        s.push_str("..");
        URL_SAFE_NO_PAD.encode_string(iv, &mut s);
        s.push('.');
        URL_SAFE_NO_PAD.encode_string(ciphertext, &mut s);
        s.push('.');
        URL_SAFE_NO_PAD.encode_string(tag, &mut s);
        s
    }

    fn tag(&self, queue_id: &str, iv: &[u8], ciphertext: &[u8]) -> [u8; 32] {
        use hmac::{KeyInit, Mac};
        let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&self.inner.key)
            .expect("HMAC takes a key of any length");
        mac.update(queue_id.as_bytes());
        mac.update(&[0]);
        mac.update(iv);
        mac.update(ciphertext);
        mac.finalize().into_bytes().into()
    }

    /// `(seq, delivery)` of a lease id or peek ref this emulator issued for `queue_id`.
    fn read_token(&self, queue_id: &str, kind: u8, token: &str) -> Option<(u64, u32)> {
        let rest = token.strip_prefix(LEASE_HEADER)?.strip_prefix("..")?;
        let mut parts = rest.split('.');
        let iv = URL_SAFE_NO_PAD.decode(parts.next()?).ok()?;
        let ciphertext = URL_SAFE_NO_PAD.decode(parts.next()?).ok()?;
        let tag = URL_SAFE_NO_PAD.decode(parts.next()?).ok()?;
        if parts.next().is_some() || iv.len() != 16 || ciphertext.len() != 144 {
            return None;
        }
        if self.tag(queue_id, &iv, &ciphertext)[..] != tag[..] || ciphertext[12] != kind {
            return None;
        }
        let seq = u64::from_le_bytes(ciphertext[..8].try_into().ok()?);
        let delivery = u32::from_le_bytes(ciphertext[8..12].try_into().ok()?);
        Some((seq, delivery))
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A message checked and encoded for the wire, not yet in a queue.
struct Draft {
    content_type: Option<ContentType>,
    body: String,
    /// What counts towards the size limits: the payload plus [`MESSAGE_METADATA_BYTES`].
    size: usize,
    delay: Duration,
}

// ---------------------------------------------------------------------------------------------
// Queue state

#[derive(Default)]
struct Queue {
    id: String,
    name: String,
    created_on: String,
    consumers: Vec<HttpPullConsumer>,
    /// When the last purge of the whole queue ran (RFC 3339).
    last_purge: Option<String>,
    settings: QueueSettings,
    modified_on: String,
    /// Live messages (not acked, not dead-lettered) by publish sequence number; the first is
    /// the oldest.
    messages: BTreeMap<u64, Message>,
    /// Ready messages in delivery order. May hold sequence numbers of messages removed
    /// meanwhile (by a stale ack); those are skipped when popped.
    ready: VecDeque<u64>,
    /// Delayed messages by due instant.
    delayed: BTreeSet<(Instant, u64)>,
    /// Leased messages by lease expiry.
    leased: BTreeSet<(Instant, u64)>,
    /// Sum of the wire body sizes of live messages.
    backlog_bytes: u64,
    stats: QueueStats,
    /// Indexed by sequence number.
    books: Vec<MessageBook>,
}

struct Message {
    id: String,
    body: String,
    content_type: Option<ContentType>,
    timestamp_ms: u64,
    /// The delay it was published with, in seconds (Cloudflare's `CF-msg-delay-secs`).
    delay_secs: u64,
    /// Deliveries so far; the current lease is that of delivery `attempts - 1`.
    attempts: u32,
    place: Place,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    Ready,
    Delayed(Instant),
    Leased(Instant),
}

/// One message handed out by a pull (with a `lease_id`) or a peek (with a `ref`), as it goes
/// on the wire.
#[derive(Serialize)]
struct WireMessage {
    id: String,
    body: String,
    attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_id: Option<String>,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    peek_ref: Option<String>,
    metadata: WireMetadata,
    timestamp_ms: u64,
}

/// A message's metadata as Cloudflare sets it for messages published through the REST API.
#[derive(Serialize)]
struct WireMetadata {
    #[serde(rename = "CF-sourceMessageSource")]
    source: &'static str,
    #[serde(rename = "CF-Content-Type", skip_serializing_if = "Option::is_none")]
    content_type: Option<&'static str>,
    #[serde(rename = "CF-msg-delay-secs", skip_serializing_if = "Option::is_none")]
    delay_secs: Option<String>,
}

#[derive(Clone, Serialize)]
struct Metrics {
    backlog_count: u64,
    backlog_bytes: u64,
    oldest_message_timestamp_ms: u64,
}

/// The outcome of one ack call.
#[derive(Default)]
struct AckOutcome {
    ack_count: u64,
    retry_count: u64,
    warnings: BTreeMap<String, String>,
}

impl Queue {
    /// What lease ids and peek refs are bound to: this queue, not an earlier one of the same
    /// name (and so the same id) that was deleted.
    fn scope(&self) -> String {
        format!("{}/{}", self.id, self.created_on)
    }

    /// Deliveries after which a failing message is dead-lettered: its first HTTP pull
    /// consumer's `max_retries`, or `default` (`--max-retries`) without one.
    fn max_retries(&self, default: u32) -> u32 {
        self.consumers
            .first()
            .map_or(default, |c| c.settings.max_retries)
    }

    fn stats(&self) -> QueueStats {
        QueueStats {
            backlog: self.messages.len() as u64,
            in_flight: self.leased.len() as u64,
            ..self.stats.clone()
        }
    }

    fn metrics(&self) -> Metrics {
        Metrics {
            backlog_count: self.messages.len() as u64,
            backlog_bytes: self.backlog_bytes,
            oldest_message_timestamp_ms: self
                .messages
                .first_key_value()
                .map_or(0, |(_, m)| m.timestamp_ms),
        }
    }

    /// The queue as `GET …/queues/{id}` shows it.
    fn info(&self) -> Value {
        serde_json::json!({
            "queue_id": self.id,
            "queue_name": self.name,
            "created_on": self.created_on,
            "modified_on": if self.modified_on.is_empty() { &self.created_on } else { &self.modified_on },
            "producers": [],
            "producers_total_count": 0,
            "consumers": self.consumers,
            "consumers_total_count": self.consumers.len(),
            "settings": self.settings,
        })
    }

    fn wire(m: &Message) -> WireMessage {
        WireMessage {
            id: m.id.clone(),
            body: m.body.clone(),
            attempts: m.attempts,
            lease_id: None,
            peek_ref: None,
            metadata: WireMetadata {
                source: "api",
                content_type: m.content_type.map(ContentType::as_str),
                delay_secs: (m.delay_secs > 0).then(|| m.delay_secs.to_string()),
            },
            timestamp_ms: m.timestamp_ms,
        }
    }

    fn publish(&mut self, now: Instant, timestamp_ms: u64, mut draft: Draft) -> String {
        if draft.delay.is_zero() {
            // The queue's `delivery_delay` applies to a message published without a delay.
            draft.delay = Duration::from_secs(self.settings.delivery_delay);
        }
        let seq = self.books.len() as u64;
        let id = format!("{:032x}", rand::rng().random::<u128>());
        let place = if draft.delay.is_zero() {
            self.ready.push_back(seq);
            Place::Ready
        } else {
            let due = now + draft.delay;
            self.delayed.insert((due, seq));
            Place::Delayed(due)
        };
        self.backlog_bytes += draft.body.len() as u64;
        self.messages.insert(
            seq,
            Message {
                id: id.clone(),
                body: draft.body,
                content_type: draft.content_type,
                timestamp_ms,
                delay_secs: draft.delay.as_secs(),
                attempts: 0,
                place,
            },
        );
        self.books.push(MessageBook {
            id: id.clone(),
            deliveries: 0,
            acks: 0,
            dead_lettered: false,
            retries: Vec::new(),
            lease_answers: Vec::new(),
        });
        self.stats.published += 1;
        id
    }

    /// Expire due leases and release due delayed messages, in order of due time.
    fn settle(&mut self, now: Instant, max_retries: u32) {
        loop {
            let lease = self.leased.first().copied().filter(|(t, _)| *t <= now);
            let delay = self.delayed.first().copied().filter(|(t, _)| *t <= now);
            match (lease, delay) {
                (Some(l), Some(d)) if d < l => self.release(d),
                (Some(l), _) => self.expire(l, max_retries),
                (None, Some(d)) => self.release(d),
                (None, None) => break,
            }
        }
    }

    fn release(&mut self, key: (Instant, u64)) {
        self.delayed.remove(&key);
        if let Some(m) = self.messages.get_mut(&key.1) {
            m.place = Place::Ready;
            self.ready.push_back(key.1);
        }
    }

    fn expire(&mut self, key: (Instant, u64), max_retries: u32) {
        self.leased.remove(&key);
        let seq = key.1;
        let Some(m) = self.messages.get_mut(&seq) else {
            return;
        };
        self.stats.lease_expired += 1;
        if m.attempts > max_retries {
            self.dead_letter(seq);
        } else {
            m.place = Place::Ready;
            self.ready.push_back(seq);
        }
    }

    /// Remove a live message and everything that points to it.
    fn remove(&mut self, seq: u64) -> Option<Message> {
        let m = self.messages.remove(&seq)?;
        match m.place {
            Place::Ready => {} // its `ready` entry is skipped when popped
            Place::Delayed(t) => {
                self.delayed.remove(&(t, seq));
            }
            Place::Leased(t) => {
                self.leased.remove(&(t, seq));
            }
        }
        self.backlog_bytes = self.backlog_bytes.saturating_sub(m.body.len() as u64);
        Some(m)
    }

    fn dead_letter(&mut self, seq: u64) {
        if self.remove(seq).is_some() {
            self.stats.dead_lettered += 1;
            if let Some(b) = self.book(seq) {
                b.dead_lettered = true;
            }
        }
    }

    /// Remove every message (a purge of the whole queue).
    fn purge_all(&mut self) {
        let seqs: Vec<u64> = self.messages.keys().copied().collect();
        for seq in seqs {
            if self.remove(seq).is_some() {
                self.stats.purged += 1;
            }
        }
        self.ready.clear();
        self.last_purge = Some(rfc3339_now());
    }

    fn book(&mut self, seq: u64) -> Option<&mut MessageBook> {
        usize::try_from(seq)
            .ok()
            .and_then(|i| self.books.get_mut(i))
    }

    /// Hand out up to `batch_size` ready messages under fresh leases (`lease` makes the lease
    /// id of a message's `(seq, delivery)`).
    fn pull(
        &mut self,
        now: Instant,
        batch_size: usize,
        visibility: Duration,
        lease: impl Fn(u64, u32) -> String,
    ) -> Vec<WireMessage> {
        self.stats.pull_calls += 1;
        if self.settings.delivery_paused {
            self.stats.empty_pulls += 1;
            return Vec::new();
        }
        let until = now + visibility;
        let mut out = Vec::with_capacity(batch_size.min(self.messages.len()));
        while out.len() < batch_size {
            let Some(seq) = self.ready.pop_front() else {
                break;
            };
            let Some(m) = self.messages.get_mut(&seq) else {
                continue; // removed while ready
            };
            if m.place != Place::Ready {
                continue;
            }
            let delivery = m.attempts;
            m.attempts += 1;
            m.place = Place::Leased(until);
            self.leased.insert((until, seq));
            let mut wire = match self.messages.get(&seq) {
                Some(m) => Self::wire(m),
                None => continue,
            };
            wire.lease_id = Some(lease(seq, delivery));
            out.push(wire);
            self.stats.deliveries += 1;
            if let Some(b) = self.book(seq) {
                b.deliveries += 1;
                b.lease_answers.push(0);
            }
        }
        if out.is_empty() {
            self.stats.empty_pulls += 1;
        }
        out
    }

    /// Up to `batch_size` ready messages, oldest first, without leasing them (`peek_ref`
    /// makes the ref of a message).
    fn peek(&self, batch_size: usize, peek_ref: impl Fn(u64) -> String) -> Vec<WireMessage> {
        self.messages
            .iter()
            .filter(|(_, m)| m.place == Place::Ready)
            .take(batch_size)
            .map(|(seq, m)| {
                let mut w = Self::wire(m);
                w.peek_ref = Some(peek_ref(*seq));
                w
            })
            .collect()
    }

    /// Record that an ack or retry item named delivery `delivery`'s lease of message `seq`.
    fn answer(&mut self, seq: u64, delivery: u32) {
        let reused = self.book(seq).is_some_and(|b| {
            match usize::try_from(delivery)
                .ok()
                .and_then(|i| b.lease_answers.get_mut(i))
            {
                Some(n) => {
                    *n += 1;
                    *n > 1
                }
                None => false,
            }
        });
        if reused {
            self.stats.reused_leases += 1;
        }
    }

    /// Apply the acks, then the retries, of one call (already validated). `resolve` reads a
    /// lease id: `(seq, delivery)` if this queue issued it.
    fn ack(
        &mut self,
        now: Instant,
        acks: &[AckItem],
        retries: &[RetryItem],
        max_retries: u32,
        resolve: impl Fn(&str) -> Option<(u64, u32)>,
    ) -> AckOutcome {
        self.stats.ack_calls += 1;
        let mut out = AckOutcome::default();
        let known = |q: &mut Self, lease_id: &str, out: &mut AckOutcome| {
            let found = resolve(lease_id).filter(|(seq, _)| *seq < q.books.len() as u64);
            if found.is_none() {
                q.stats.unknown_leases += 1;
                out.warnings.insert(
                    lease_id.to_owned(),
                    "unknown lease: this queue never issued it".to_owned(),
                );
            }
            found
        };
        for a in acks {
            let Some((seq, delivery)) = known(self, &a.lease_id, &mut out) else {
                continue;
            };
            self.answer(seq, delivery);
            let earlier_acks = self.book(seq).map_or(0, |b| b.acks);
            if earlier_acks > 0 {
                self.stats.double_acks += 1;
            } else if !self.is_current(seq, delivery) {
                self.stats.stale_acks += 1;
            }
            self.remove(seq);
            self.stats.acked += 1;
            out.ack_count += 1;
            if let Some(b) = self.book(seq) {
                b.acks += 1;
            }
        }
        for r in retries {
            let Some((seq, delivery)) = known(self, &r.lease_id, &mut out) else {
                continue;
            };
            self.answer(seq, delivery);
            let delay = r.delay_seconds.unwrap_or(0);
            self.stats.retried += 1;
            out.retry_count += 1;
            if let Some(b) = self.book(seq) {
                b.retries.push(u32::try_from(delay).unwrap_or(u32::MAX));
            }
            if !self.is_current(seq, delivery) {
                // The lease already ran out (or was answered): nothing left to do.
                continue;
            }
            let Some(m) = self.messages.get_mut(&seq) else {
                continue;
            };
            if let Place::Leased(t) = m.place {
                self.leased.remove(&(t, seq));
            }
            if m.attempts > max_retries {
                self.dead_letter(seq);
            } else if delay == 0 {
                m.place = Place::Ready;
                self.ready.push_back(seq);
            } else {
                let due = now + Duration::from_secs(delay);
                m.place = Place::Delayed(due);
                self.delayed.insert((due, seq));
            }
        }
        out
    }

    /// Whether delivery `delivery` of message `seq` is still leased (its lease is current).
    fn is_current(&self, seq: u64, delivery: u32) -> bool {
        self.messages
            .get(&seq)
            .is_some_and(|m| matches!(m.place, Place::Leased(_)) && m.attempts == delivery + 1)
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

#[derive(Clone)]
struct App {
    emu: Emulator,
    shutdown: CancellationToken,
}

#[derive(Serialize)]
struct Envelope<T> {
    success: bool,
    errors: Vec<ApiError>,
    messages: Vec<String>,
    result: Option<T>,
}

#[derive(Serialize)]
struct ApiError {
    code: u32,
    message: String,
}

fn ok<T: Serialize>(result: T) -> Response {
    axum::Json(Envelope {
        success: true,
        errors: Vec::new(),
        messages: Vec::new(),
        result: Some(result),
    })
    .into_response()
}

fn fail(status: StatusCode, code: u32, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(Envelope::<()> {
            success: false,
            errors: vec![ApiError {
                code,
                message: message.into(),
            }],
            messages: Vec::new(),
            result: None,
        }),
    )
        .into_response()
}

/// An error answer: HTTP status, one of Cloudflare's error codes, and a message.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: u32,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        fail(self.status, self.code, self.message)
    }
}

/// A 400 answer with one of Cloudflare's Queues error codes.
fn refuse(code: u32, message: impl Into<String>) -> Refusal {
    Refusal::new(StatusCode::BAD_REQUEST, code, message)
}

/// [`refuse`], as an answer.
fn bad_request(code: u32, message: impl Into<String>) -> Response {
    refuse(code, message).into_response()
}

fn shutting_down() -> Response {
    fail(
        StatusCode::SERVICE_UNAVAILABLE,
        7010,
        "emulator shutting down",
    )
}

/// Parse a JSON request body; an empty body or `null` is the default. `Err` is the 400 answer:
/// code 10208 for a body that is not JSON, 10207 for JSON that does not match the schema.
fn parse<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Refusal> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice::<Option<T>>(body)
        .map(Option::unwrap_or_default)
        .map_err(body_error)
}

/// A JSON request body read as [`parse`] reads it; the rejection is the 400 answer.
struct Body<T>(T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = Refusal;

    async fn from_request(req: Request, state: &S) -> Result<Self, Refusal> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| Refusal::new(e.status(), code::BODY_INVALID, e.body_text()))?;
        parse(&bytes).map(Body)
    }
}

/// A handler's result as an answer: the envelope around it, or the error answer.
fn reply<T: Serialize>(r: Result<T, Refusal>) -> Response {
    match r {
        Ok(v) => ok(v),
        Err(r) => r.into_response(),
    }
}

fn body_error(e: serde_json::Error) -> Refusal {
    if e.is_syntax() || e.is_eof() {
        refuse(
            code::BODY_MALFORMED,
            format!("Request body is not valid JSON: {e}"),
        )
    } else {
        refuse(
            code::BODY_INVALID,
            format!("Request JSON body does not match expected schema: {e}"),
        )
    }
}

/// A request number (the schemas type them all as JSON `number`): a whole value, written as
/// an integer or as a whole float (`10.0`, what the official SDKs send for a Python float), in
/// `range`. Cloudflare's docs are silent on fractions; every one of these numbers counts
/// something whole (messages, milliseconds, seconds), so a fraction is refused like an
/// out-of-range value rather than silently rounded. `Err` is the message.
fn whole(
    field: &str,
    n: Option<&serde_json::Number>,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, String> {
    let Some(n) = n else {
        return Ok(default);
    };
    let value = n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= 9.0e15)
            .map(|f| f as u64)
    });
    match value {
        Some(v) if range.contains(&v) => Ok(v),
        _ => Err(format!(
            "{field} must be a whole number between {} and {}, got {n}",
            range.start(),
            range.end()
        )),
    }
}

/// Latency and authentication, before every Cloudflare API call (a route layer).
async fn api_gate(Ctx(app): Ctx<App>, req: Request, next: Next) -> Response {
    let latency = app.emu.inner.opts.latency;
    if !latency.is_zero() && !sleep_or_shutdown(latency, &app.shutdown).await {
        return shutting_down();
    }
    if !app.emu.authorized(req.headers()) {
        return auth_error();
    }
    next.run(req).await
}

/// An injected fault for this call of `op`, if one is queued: `Some` is the answer to give
/// instead of handling it.
async fn fault(app: &App, op: Op, conn: &Conn) -> Option<Response> {
    let fault = app.emu.take_fault(op)?;
    debug!(?op, ?fault, "emulator: injecting a fault");
    match fault {
        Fault::Status {
            status,
            body,
            retry_after,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let content_type = if serde_json::from_str::<serde::de::IgnoredAny>(&body).is_ok() {
                "application/json"
            } else {
                "text/plain; charset=utf-8"
            };
            let mut resp = (status, [(header::CONTENT_TYPE, content_type)], body).into_response();
            if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            Some(resp)
        }
        Fault::Delay(d) => {
            if sleep_or_shutdown(d, &app.shutdown).await {
                None
            } else {
                Some(shutting_down())
            }
        }
        Fault::Hang => {
            app.shutdown.cancelled().await;
            conn.reset();
            Some(shutting_down())
        }
        Fault::Reset => {
            conn.reset();
            // Never written: the connection refuses every write from now on and closes.
            Some(StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
    }
}

/// Sleep `d`; `false` if shutdown came first.
async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = shutdown.cancelled() => false,
    }
}

fn auth_error() -> Response {
    fail(
        StatusCode::FORBIDDEN,
        code::AUTHENTICATION,
        "Authentication error",
    )
}

/// `batch_size` of a pull or a peek: 1 to 100, default 5; `Err` is the 400 answer (10207).
fn batch_size(n: &Option<serde_json::Number>) -> Result<usize, Refusal> {
    whole("batch_size", n.as_ref(), DEFAULT_BATCH, 1..=MAX_BATCH)
        .map(|v| usize::try_from(v).unwrap_or(1))
        .map_err(|e| refuse(code::BODY_INVALID, e))
}

/// `Path` of the routes under `…/queues/{queue_id}`.
type QueuePath = Path<(String, String)>;

#[derive(Deserialize, Default)]
struct PullRequest {
    batch_size: Option<serde_json::Number>,
    visibility_timeout_ms: Option<serde_json::Number>,
    /// The field's name in older docs: read as milliseconds when `visibility_timeout_ms` is
    /// absent, rather than silently ignored.
    visibility_timeout: Option<serde_json::Number>,
}

#[derive(Serialize)]
struct PullResult {
    messages: Vec<WireMessage>,
    message_backlog_count: u64,
    metadata: PullMetadata,
}

#[derive(Serialize)]
struct PullMetadata {
    metrics: Metrics,
}

async fn pull_handler(
    Ctx(app): Ctx<App>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    Path((account, queue_id)): QueuePath,
    Body(req): Body<PullRequest>,
) -> Response {
    if let Some(r) = fault(&app, Op::Pull, &conn).await {
        return r;
    }
    let batch_size = match batch_size(&req.batch_size) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let visibility = req
        .visibility_timeout_ms
        .as_ref()
        .or(req.visibility_timeout.as_ref());
    let visibility_ms = match whole(
        "visibility_timeout_ms",
        visibility,
        DEFAULT_VISIBILITY_MS,
        1..=MAX_VISIBILITY_MS,
    ) {
        Ok(v) => v,
        Err(e) => return bad_request(code::BODY_INVALID, e),
    };
    let emu = app.emu.clone();
    let result = app.emu.with_queue(&account, &queue_id, |q, now, _| {
        let qid = q.scope();
        let messages = q.pull(
            now,
            batch_size,
            Duration::from_millis(visibility_ms),
            |seq, delivery| emu.token_for(&qid, 0, seq, delivery),
        );
        PullResult {
            messages,
            message_backlog_count: q.messages.len() as u64,
            metadata: PullMetadata {
                metrics: q.metrics(),
            },
        }
    });
    reply(result)
}

#[derive(Deserialize, Default)]
struct AckRequest {
    acks: Option<Vec<AckItem>>,
    retries: Option<Vec<RetryItem>>,
}

#[derive(Deserialize)]
struct AckItem {
    lease_id: String,
}

#[derive(Deserialize)]
struct RetryItem {
    lease_id: String,
    #[serde(default, deserialize_with = "delay_number")]
    delay_seconds: Option<u64>,
}

/// `delay_seconds` of a retry: see [`whole`]. A value out of bounds fails the whole body
/// (checked before anything is applied); it is kept out of range here and refused by the
/// handler with code 10203.
fn delay_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let n = Option::<serde_json::Number>::deserialize(d)?;
    Ok(n.map(|n| whole("delay_seconds", Some(&n), 0, 0..=MAX_DELAY_SECONDS).unwrap_or(u64::MAX)))
}

#[derive(Serialize)]
struct AckResult {
    #[serde(rename = "ackCount")]
    ack_count: u64,
    #[serde(rename = "retryCount")]
    retry_count: u64,
    warnings: BTreeMap<String, String>,
}

async fn ack_handler(
    Ctx(app): Ctx<App>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    Path((account, queue_id)): QueuePath,
    Body(req): Body<AckRequest>,
) -> Response {
    if let Some(r) = fault(&app, Op::Ack, &conn).await {
        return r;
    }
    let acks = req.acks.unwrap_or_default();
    let retries = req.retries.unwrap_or_default();
    if retries
        .iter()
        .any(|r| r.delay_seconds.is_some_and(|d| d > MAX_DELAY_SECONDS))
    {
        return bad_request(
            code::MESSAGE_METADATA_INVALID,
            format!(
                "Invalid message metadata: delay_seconds must be a whole number between 0 and {MAX_DELAY_SECONDS}"
            ),
        );
    }
    let emu = app.emu.clone();
    let out = app
        .emu
        .with_queue(&account, &queue_id, |q, now, max_retries| {
            let qid = q.scope();
            q.ack(now, &acks, &retries, max_retries, |l| {
                emu.read_token(&qid, 0, l)
            })
        });
    let out = match out {
        Ok(o) => o,
        Err(r) => return r.into_response(),
    };
    if !out.warnings.is_empty() {
        debug!(queue = %queue_id, unknown = out.warnings.len(), "emulator: ack named unknown leases");
    }
    ok(AckResult {
        ack_count: out.ack_count,
        retry_count: out.retry_count,
        warnings: out.warnings,
    })
}

#[derive(Deserialize, Default)]
struct PeekRequest {
    batch_size: Option<serde_json::Number>,
}

async fn peek_handler(
    Ctx(app): Ctx<App>,
    Path((account, queue_id)): QueuePath,
    Body(req): Body<PeekRequest>,
) -> Response {
    let batch_size = match batch_size(&req.batch_size) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let emu = app.emu.clone();
    let result = app.emu.with_queue(&account, &queue_id, |q, _, _| {
        let qid = q.scope();
        let messages = q.peek(batch_size, |seq| emu.token_for(&qid, 1, seq, 0));
        serde_json::json!({
            "messages": messages,
            "metadata": {"metrics": q.metrics()},
        })
    });
    reply(result)
}

#[derive(Deserialize, Default)]
struct PurgeMessagesRequest {
    refs: Vec<PeekRef>,
}

#[derive(Deserialize)]
struct PeekRef {
    #[serde(rename = "ref")]
    peek_ref: String,
}

/// Remove peeked messages by their refs; a ref whose message is gone (or that this queue
/// never issued) answers a warning.
async fn purge_messages_handler(
    Ctx(app): Ctx<App>,
    Path((account, queue_id)): QueuePath,
    Body(req): Body<PurgeMessagesRequest>,
) -> Response {
    let emu = app.emu.clone();
    let result = app.emu.with_queue(&account, &queue_id, |q, _, _| {
        let qid = q.scope();
        let mut warnings = BTreeMap::new();
        for r in &req.refs {
            let removed = emu
                .read_token(&qid, 1, &r.peek_ref)
                .and_then(|(seq, _)| q.remove(seq));
            match removed {
                Some(_) => q.stats.purged += 1,
                None => {
                    warnings.insert(
                        r.peek_ref.clone(),
                        "message not found: already acknowledged or purged, or an unknown ref"
                            .to_owned(),
                    );
                }
            }
        }
        serde_json::json!({"errors": [], "warnings": warnings})
    });
    reply(result)
}

#[derive(Deserialize, Default)]
struct PurgeQueueRequest {
    delete_messages_permanently: Option<bool>,
}

async fn purge_queue_handler(
    Ctx(app): Ctx<App>,
    Path((account, queue_id)): QueuePath,
    Body(req): Body<PurgeQueueRequest>,
) -> Response {
    if req.delete_messages_permanently != Some(true) {
        return bad_request(
            code::BODY_INVALID,
            "delete_messages_permanently must be true to confirm that every message is deleted",
        );
    }
    reply(app.emu.with_queue(&account, &queue_id, |q, _, _| {
        q.purge_all();
        q.info()
    }))
}

async fn purge_status_handler(
    Ctx(app): Ctx<App>,
    Path((account, queue_id)): QueuePath,
) -> Response {
    // A purge completes within its call here.
    reply(app.emu.with_queue(&account, &queue_id, |q, _, _| {
        serde_json::json!({
            "completed": if q.last_purge.is_some() { "true" } else { "false" },
            "started_at": q.last_purge,
        })
    }))
}

async fn metrics_handler(Ctx(app): Ctx<App>, Path((account, queue_id)): QueuePath) -> Response {
    reply(
        app.emu
            .with_queue(&account, &queue_id, |q, _, _| q.metrics()),
    )
}

// Queues and their consumers -------------------------------------------------------------------

fn unknown_account() -> Response {
    fail(
        StatusCode::NOT_FOUND,
        code::QUEUE_NOT_FOUND,
        "Queue does not exist: unknown account",
    )
}

async fn list_queues_handler(Ctx(app): Ctx<App>, Path(account): Path<String>) -> Response {
    if !app.emu.account_known(&account) {
        return unknown_account();
    }
    let mut queues: Vec<(String, Value)> = app
        .emu
        .lock()
        .queues
        .values()
        .map(|q| (q.name.clone(), q.info()))
        .collect();
    queues.sort_by(|a, b| a.0.cmp(&b.0));
    let queues: Vec<Value> = queues.into_iter().map(|(_, v)| v).collect();
    let n = queues.len();
    axum::Json(serde_json::json!({
        "success": true,
        "errors": [],
        "messages": [],
        "result": queues,
        "result_info": {"page": 1, "per_page": n, "count": n, "total_count": n, "total_pages": 1},
    }))
    .into_response()
}

#[derive(Deserialize, Default)]
struct CreateQueueRequest {
    queue_name: String,
}

/// Cloudflare's queue names: 1 to 63 lowercase letters, digits and dashes.
fn valid_queue_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

async fn create_queue_handler(
    Ctx(app): Ctx<App>,
    Path(account): Path<String>,
    Body(req): Body<CreateQueueRequest>,
) -> Response {
    if !app.emu.account_known(&account) {
        return unknown_account();
    }
    if !valid_queue_name(&req.queue_name) {
        return bad_request(
            code::BODY_INVALID,
            "queue_name must be 1 to 63 lowercase letters, digits and dashes",
        );
    }
    let mut st = app.emu.lock();
    match st.create(&req.queue_name, false, app.emu.inner.opts.max_retries) {
        Some(q) => ok(q.info()),
        None => fail(
            StatusCode::CONFLICT,
            code::QUEUE_NAME_TAKEN,
            "A queue with this name already exists",
        ),
    }
}

async fn get_queue_handler(Ctx(app): Ctx<App>, Path((account, queue_id)): QueuePath) -> Response {
    reply(app.emu.with_queue(&account, &queue_id, |q, _, _| q.info()))
}

#[derive(Deserialize, Default)]
struct UpdateQueueRequest {
    queue_name: Option<String>,
    settings: Option<UpdateSettings>,
}

#[derive(Deserialize, Default)]
struct UpdateSettings {
    delivery_delay: Option<serde_json::Number>,
    delivery_paused: Option<bool>,
    message_retention_period: Option<serde_json::Number>,
}

/// `PUT` and `PATCH …/queues/{id}`: rename, and change the settings given (others are kept).
async fn update_queue_handler(
    Ctx(app): Ctx<App>,
    Path((account, queue_id)): QueuePath,
    Body(req): Body<UpdateQueueRequest>,
) -> Response {
    let settings = req.settings.unwrap_or_default();
    let delay = settings
        .delivery_delay
        .as_ref()
        .map(|n| whole("delivery_delay", Some(n), 0, 0..=MAX_DELAY_SECONDS))
        .transpose();
    let retention = settings
        .message_retention_period
        .as_ref()
        .map(|n| whole("message_retention_period", Some(n), 0, 60..=1_209_600))
        .transpose();
    let (delay, retention) = match (delay, retention) {
        (Ok(d), Ok(r)) => (d, r),
        (Err(e), _) | (_, Err(e)) => return bad_request(code::BODY_INVALID, e),
    };
    if let Some(name) = &req.queue_name
        && !valid_queue_name(name)
    {
        return bad_request(
            code::BODY_INVALID,
            "queue_name must be 1 to 63 lowercase letters, digits and dashes",
        );
    }
    let (id, old_name) = match app.emu.with_queue(&account, &queue_id, |q, _, _| {
        (q.id.clone(), q.name.clone())
    }) {
        Ok(found) => found,
        Err(r) => return r.into_response(),
    };
    let mut st = app.emu.lock();
    if let Some(name) = &req.queue_name
        && *name != old_name
    {
        if st.names.contains_key(name) {
            return fail(
                StatusCode::CONFLICT,
                code::QUEUE_NAME_TAKEN,
                "A queue with this name already exists",
            );
        }
        st.names.remove(&old_name);
        st.names.insert(name.clone(), id.clone());
    }
    let Some(q) = st.queues.get_mut(&id) else {
        return fail(
            StatusCode::NOT_FOUND,
            code::QUEUE_NOT_FOUND,
            "Queue does not exist",
        );
    };
    if let Some(name) = req.queue_name {
        for c in &mut q.consumers {
            c.queue_name.clone_from(&name);
        }
        q.name = name;
    }
    if let Some(d) = delay {
        q.settings.delivery_delay = d;
    }
    if let Some(p) = settings.delivery_paused {
        q.settings.delivery_paused = p;
    }
    if let Some(r) = retention {
        q.settings.message_retention_period = r;
    }
    q.modified_on = rfc3339_now();
    ok(q.info())
}

/// The answer of a delete: the envelope alone (the SDK's `QueueDeleteResponse`).
fn deleted() -> Response {
    axum::Json(serde_json::json!({"success": true, "errors": [], "messages": []})).into_response()
}

async fn delete_queue_handler(
    Ctx(app): Ctx<App>,
    Path((account, queue_id)): QueuePath,
) -> Response {
    if let Err(r) = app.emu.with_queue(&account, &queue_id, |_, _, _| ()) {
        return r.into_response();
    }
    app.emu.lock().remove(&queue_id);
    deleted()
}

async fn list_consumers_handler(
    Ctx(app): Ctx<App>,
    Path((account, queue_id)): QueuePath,
) -> Response {
    reply(
        app.emu
            .with_queue(&account, &queue_id, |q, _, _| q.consumers.clone()),
    )
}

#[derive(Deserialize, Default)]
struct CreateConsumerRequest {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    dead_letter_queue: Option<String>,
    #[serde(default)]
    settings: Option<Value>,
}

/// A consumer request's type and settings, checked; `Err` is the 400 answer (10207).
fn consumer_settings(
    req: &CreateConsumerRequest,
    max_retries: u32,
) -> Result<ConsumerSettings, Refusal> {
    if req.kind != "http_pull" {
        return Err(refuse(
            code::BODY_INVALID,
            "the emulator serves HTTP pull consumers only: type must be \"http_pull\"",
        ));
    }
    let settings = req.settings.as_ref().unwrap_or(&Value::Null);
    let number = |k: &str, default: u64, range| {
        whole(
            k,
            settings.get(k).and_then(Value::as_number),
            default,
            range,
        )
        .map_err(|e| refuse(code::BODY_INVALID, e))
    };
    Ok(ConsumerSettings {
        batch_size: number("batch_size", DEFAULT_BATCH, 1..=MAX_BATCH)?,
        max_retries: u32::try_from(number("max_retries", u64::from(max_retries), 0..=100)?)
            .unwrap_or(max_retries),
        retry_delay: number("retry_delay", 0, 0..=MAX_DELAY_SECONDS)?,
        visibility_timeout_ms: number(
            "visibility_timeout_ms",
            DEFAULT_VISIBILITY_MS,
            1..=MAX_VISIBILITY_MS,
        )?,
    })
}

async fn create_consumer_handler(
    Ctx(app): Ctx<App>,
    Path((account, queue_id)): QueuePath,
    Body(req): Body<CreateConsumerRequest>,
) -> Response {
    let max_retries = app.emu.inner.opts.max_retries;
    let settings = match consumer_settings(&req, max_retries) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    reply(app.emu.with_queue(&account, &queue_id, |q, _, _| {
        let mut c = HttpPullConsumer::new(&q.name, max_retries);
        c.settings = settings;
        c.dead_letter_queue = req.dead_letter_queue.unwrap_or_default();
        q.consumers.push(c.clone());
        c
    }))
}

/// `PUT …/consumers/{id}`: new settings (and dead-letter queue) for an HTTP pull consumer.
async fn update_consumer_handler(
    Ctx(app): Ctx<App>,
    Path((account, queue_id, consumer_id)): Path<(String, String, String)>,
    Body(req): Body<CreateConsumerRequest>,
) -> Response {
    let settings = match consumer_settings(&req, app.emu.inner.opts.max_retries) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let found = app.emu.with_queue(&account, &queue_id, |q, _, _| {
        let c = q
            .consumers
            .iter_mut()
            .find(|c| c.consumer_id == consumer_id)?;
        c.settings = settings;
        if let Some(dlq) = req.dead_letter_queue {
            c.dead_letter_queue = dlq;
        }
        Some(c.clone())
    });
    match found {
        Ok(Some(c)) => ok(c),
        Ok(None) => consumer_not_found(),
        Err(r) => r.into_response(),
    }
}

fn consumer_not_found() -> Response {
    // No Queues code is documented for this: 7003, the API's "no route" (the URI names nothing).
    fail(StatusCode::NOT_FOUND, 7003, "Consumer does not exist")
}

async fn get_consumer_handler(
    Ctx(app): Ctx<App>,
    Path((account, queue_id, consumer_id)): Path<(String, String, String)>,
) -> Response {
    match app.emu.with_queue(&account, &queue_id, |q, _, _| {
        q.consumers
            .iter()
            .find(|c| c.consumer_id == consumer_id)
            .cloned()
    }) {
        Ok(Some(c)) => ok(c),
        Ok(None) => consumer_not_found(),
        Err(r) => r.into_response(),
    }
}

async fn delete_consumer_handler(
    Ctx(app): Ctx<App>,
    Path((account, queue_id, consumer_id)): Path<(String, String, String)>,
) -> Response {
    match app.emu.with_queue(&account, &queue_id, |q, _, _| {
        let before = q.consumers.len();
        q.consumers.retain(|c| c.consumer_id != consumer_id);
        q.consumers.len() < before
    }) {
        Ok(true) => deleted(),
        Ok(false) => consumer_not_found(),
        Err(r) => r.into_response(),
    }
}

// Producers ------------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct PublishRequest {
    body: Option<Value>,
    content_type: Option<String>,
    delay_seconds: Option<serde_json::Number>,
}

#[derive(Deserialize, Default)]
struct PublishBatchRequest {
    messages: Vec<PublishRequest>,
    delay_seconds: Option<serde_json::Number>,
}

/// Turn one HTTP publish request into a draft; `batch_delay` applies unless the message has
/// its own. `Err` is the 400 answer (codes 10203, 10204, 10207).
fn draft_from_request(
    emu: &Emulator,
    req: PublishRequest,
    batch_delay: u64,
) -> Result<Draft, Refusal> {
    const NOT_BASE64: &str = "a bytes or v8 message's body must be a base64 string";
    let schema = |m: &str| refuse(code::BODY_INVALID, m.to_owned());
    let content_type = match req.content_type.as_deref() {
        None => ContentType::Json,
        Some(s) => s.parse().map_err(|e: UnknownContentType| {
            refuse(
                code::MESSAGE_METADATA_INVALID,
                format!("Invalid message metadata: {e}"),
            )
        })?,
    };
    let delay = match req.delay_seconds {
        None => batch_delay,
        Some(n) => whole("delay_seconds", Some(&n), 0, 0..=MAX_DELAY_SECONDS).map_err(|e| {
            refuse(
                code::MESSAGE_METADATA_INVALID,
                format!("Invalid message metadata: {e}"),
            )
        })?,
    };
    let Some(body) = req.body else {
        return Err(schema("a message needs a body"));
    };
    let payload = match (content_type, body) {
        (ContentType::Text, Value::String(s)) => s.into_bytes(),
        (ContentType::Text, _) => {
            return Err(schema("a text message's body must be a JSON string"));
        }
        (ContentType::Json, v) => serde_json::to_vec(&v)
            .map_err(|e| schema(&format!("cannot serialize the body: {e}")))?,
        (ContentType::Bytes | ContentType::V8, Value::String(s)) => {
            decode_base64(&s).ok_or_else(|| schema(NOT_BASE64))?
        }
        (ContentType::Bytes | ContentType::V8, _) => return Err(schema(NOT_BASE64)),
    };
    emu.draft(Some(content_type), &payload, Duration::from_secs(delay))
        .map_err(|e| match e {
            PublishError::TooLarge { .. } => refuse(
                code::MESSAGE_TOO_LARGE,
                format!("Message size out of bounds: {e} (128 KB, metadata included)"),
            ),
            PublishError::DelayTooLong(_) => refuse(
                code::MESSAGE_METADATA_INVALID,
                format!("Invalid message metadata: {e}"),
            ),
            PublishError::NotUtf8 | PublishError::InvalidJson(_) => {
                refuse(code::BODY_INVALID, e.to_string())
            }
        })
}

/// Base64 in any usual flavour: standard or URL-safe alphabet, padded or not.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(s).ok())
}

/// Publish checked drafts; the answer is the SDK's `MessagePushResponse` /
/// `MessageBulkPushResponse`: the queue's metrics after the publish.
fn publish_answer(app: &App, account: &str, queue_id: &str, drafts: Vec<Draft>) -> Response {
    // Resolve (or create) the queue first, so that an unknown one answers 404 / 10104.
    let key = match app
        .emu
        .with_queue(account, queue_id, |q, _, _| q.id.clone())
    {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    match app.emu.publish_with_metrics(&key, drafts) {
        Some((_, metrics)) => ok(serde_json::json!({"metadata": {"metrics": metrics}})),
        None => fail(
            StatusCode::NOT_FOUND,
            code::QUEUE_NOT_FOUND,
            "Queue does not exist",
        ),
    }
}

async fn publish_handler(
    Ctx(app): Ctx<App>,
    Path((account, queue_id)): QueuePath,
    Body(req): Body<PublishRequest>,
) -> Response {
    let draft = match draft_from_request(&app.emu, req, 0) {
        Ok(d) => d,
        Err(r) => return r.into_response(),
    };
    publish_answer(&app, &account, &queue_id, vec![draft])
}

async fn publish_batch_handler(
    Ctx(app): Ctx<App>,
    Path((account, queue_id)): QueuePath,
    Body(req): Body<PublishBatchRequest>,
) -> Response {
    if req.messages.len() > MAX_PUBLISH_BATCH {
        return bad_request(
            code::BATCH_COUNT,
            format!(
                "Batch count out of bounds: a batch holds at most {MAX_PUBLISH_BATCH} messages, got {}",
                req.messages.len()
            ),
        );
    }
    let batch_delay = match whole(
        "delay_seconds",
        req.delay_seconds.as_ref(),
        0,
        0..=MAX_DELAY_SECONDS,
    ) {
        Ok(d) => d,
        Err(e) => {
            return bad_request(
                code::BATCH_DELAY_INVALID,
                format!("Invalid batch delay: {e}"),
            );
        }
    };
    let mut drafts = Vec::with_capacity(req.messages.len());
    for m in req.messages {
        match draft_from_request(&app.emu, m, batch_delay) {
            Ok(d) => drafts.push(d),
            Err(r) => return r.into_response(),
        }
    }
    let total: usize = drafts.iter().map(|d| d.size).sum();
    if total > MAX_BATCH_BYTES {
        return bad_request(
            code::BATCH_TOO_LARGE,
            format!(
                "Batch size out of bounds: {total} bytes (metadata included) is more than the {MAX_BATCH_BYTES}-byte limit"
            ),
        );
    }
    publish_answer(&app, &account, &queue_id, drafts)
}

async fn stats_handler(
    Ctx(app): Ctx<App>,
    Path(queue_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !app.emu.authorized(&headers) {
        return auth_error();
    }
    if app.emu.queue_id(&queue_id).is_none() && !app.emu.inner.opts.create_queues_on_use {
        return fail(
            StatusCode::NOT_FOUND,
            code::QUEUE_NOT_FOUND,
            "Queue does not exist",
        );
    }
    axum::Json(app.emu.stats(&queue_id)).into_response()
}

async fn not_found() -> Response {
    fail(StatusCode::NOT_FOUND, 7003, "No route for that URI")
}

async fn method_not_allowed() -> Response {
    fail(
        StatusCode::METHOD_NOT_ALLOWED,
        7001,
        "Method not allowed for this route",
    )
}

// ---------------------------------------------------------------------------------------------
// Connections that a handler can reset (Fault::Reset)

/// A TCP listener whose connections carry a reset switch.
struct ResetListener(TcpListener);

impl Listener for ResetListener {
    type Io = ResettableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let io = ResettableStream {
                        inner: stream,
                        reset: Arc::new(AtomicBool::new(false)),
                    };
                    return (io, addr);
                }
                Err(e) => {
                    // Typically out of file descriptors: wait instead of spinning.
                    warn!(error = %e, "emulator: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// The reset switch of the connection a request came on (a handler's `ConnectInfo`).
#[derive(Clone)]
struct Conn(Arc<AtomicBool>);

impl Conn {
    /// From now on the connection refuses every read and write, so the server drops it; with
    /// `SO_LINGER` 0 the close is a TCP RST and the client gets no answer.
    fn reset(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Connected<IncomingStream<'_, ResetListener>> for Conn {
    fn connect_info(stream: IncomingStream<'_, ResetListener>) -> Self {
        Conn(stream.io().reset.clone())
    }
}

struct ResettableStream {
    inner: TcpStream,
    reset: Arc<AtomicBool>,
}

impl ResettableStream {
    fn check(&self) -> io::Result<()> {
        if self.reset.load(Ordering::SeqCst) {
            let _ = self.inner.set_zero_linger();
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "emulator fault: connection reset",
            ));
        }
        Ok(())
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TOKEN: &str = "s3cret-token";

    /// An emulator on 127.0.0.1:0 and a client for it; the server stops when dropped.
    struct Harness {
        emu: Emulator,
        http: reqwest::Client,
        base: String,
        stop: CancellationToken,
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    async fn harness(opts: EmulatorOptions) -> Harness {
        let stop = CancellationToken::new();
        let emu = Emulator::new(EmulatorOptions {
            token: Some(TOKEN.into()),
            ..opts
        });
        let addr = emu
            .start(SocketAddr::from(([127, 0, 0, 1], 0)), stop.clone())
            .await
            .expect("emulator starts");
        Harness {
            emu,
            http: client(),
            base: Emulator::base_url(addr),
            stop,
        }
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("http client")
    }

    impl Harness {
        fn url(&self, queue: &str, tail: &str) -> String {
            format!(
                "{}/accounts/acc123/queues/{queue}/messages{tail}",
                self.base
            )
        }

        /// POST a raw body with the right token; status, Retry-After and JSON answer.
        async fn raw(&self, url: &str, body: &str) -> (u16, Option<String>, Value) {
            let resp = self
                .http
                .post(url)
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body(body.to_owned())
                .send()
                .await
                .expect("answer");
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let text = resp.text().await.expect("body");
            let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
            (status, retry_after, value)
        }

        async fn post(&self, url: &str, body: Value) -> (u16, Value) {
            let (status, _, v) = self.raw(url, &body.to_string()).await;
            (status, v)
        }

        /// A successful pull's `result`.
        async fn pull(&self, queue: &str, body: Value) -> Value {
            let (status, v) = self.post(&self.url(queue, "/pull"), body).await;
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["success"], true, "{v}");
            v["result"].clone()
        }

        /// Pulled messages of a successful pull.
        async fn pull_messages(&self, queue: &str, body: Value) -> Vec<Value> {
            self.pull(queue, body).await["messages"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        }

        /// A successful ack call's `result`.
        async fn ack(&self, queue: &str, acks: &[&str], retries: &[(&str, u64)]) -> Value {
            let body = json!({
                "acks": acks.iter().map(|l| json!({"lease_id": l})).collect::<Vec<_>>(),
                "retries": retries
                    .iter()
                    .map(|(l, d)| json!({"lease_id": l, "delay_seconds": d}))
                    .collect::<Vec<_>>(),
            });
            let (status, v) = self.post(&self.url(queue, "/ack"), body).await;
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["success"], true, "{v}");
            v["result"].clone()
        }
    }

    fn lease(m: &Value) -> String {
        m["lease_id"].as_str().expect("lease_id").to_owned()
    }

    fn text(emu: &Emulator, queue: &str, body: &str) -> String {
        emu.publish(
            queue,
            Some(ContentType::Text),
            body.as_bytes(),
            Duration::ZERO,
        )
        .expect("publish")
    }

    #[tokio::test]
    async fn publish_pull_ack_removes_the_message() {
        let h = harness(EmulatorOptions::default()).await;
        let id = text(&h.emu, "q", "hello ✓");
        assert_eq!(id.len(), 32);
        assert!(
            id.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')),
            "{id}"
        );

        let msgs = h.pull_messages("q", json!({})).await;
        assert_eq!(msgs.len(), 1);
        let m = &msgs[0];
        assert_eq!(m["id"], id.as_str());
        assert_eq!(m["body"], "hello ✓");
        assert_eq!(m["attempts"], 1);
        assert_eq!(m["metadata"]["CF-Content-Type"], "text");
        let ts = m["timestamp_ms"].as_u64().expect("timestamp_ms");
        assert!(ts > 1_700_000_000_000 && ts <= unix_ms(), "{ts}");
        assert_eq!(h.emu.stats("q").in_flight, 1);

        let r = h.ack("q", &[&lease(m)], &[]).await;
        assert_eq!(r["ackCount"], 1);
        assert_eq!(r["retryCount"], 0);
        assert_eq!(r["warnings"], json!({}));
        assert!(h.pull_messages("q", json!({})).await.is_empty());

        let s = h.emu.stats("q");
        let expected = QueueStats {
            published: 1,
            deliveries: 1,
            pull_calls: 2,
            empty_pulls: 1,
            ack_calls: 1,
            acked: 1,
            ..QueueStats::default()
        };
        assert_eq!(s, expected);
        let books = h.emu.books("q");
        assert_eq!(
            books,
            vec![MessageBook {
                id,
                deliveries: 1,
                acks: 1,
                dead_lettered: false,
                retries: vec![],
                lease_answers: vec![1],
            }]
        );
        assert_eq!(h.emu.stats("never-used"), QueueStats::default());
    }

    #[tokio::test]
    async fn lease_ids_are_long_unique_and_url_safe() {
        let h = harness(EmulatorOptions::default()).await;
        for i in 0..50 {
            text(&h.emu, "q", &format!("m{i}"));
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5 {
            for m in h.pull_messages("q", json!({"batch_size": 10})).await {
                let l = lease(&m);
                assert!((280..=400).contains(&l.len()), "{} chars", l.len());
                assert!(
                    l.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
                    "{l}"
                );
                assert!(l.starts_with("eyJ"), "{l}");
                assert!(seen.insert(l));
            }
        }
        assert_eq!(seen.len(), 50);
    }

    #[tokio::test]
    async fn lease_expiry_redelivers_with_attempts_two() {
        let h = harness(EmulatorOptions::default()).await;
        let id = text(&h.emu, "q", "x");
        let first = h
            .pull_messages("q", json!({"visibility_timeout_ms": 30_000}))
            .await;
        assert_eq!(first.len(), 1);
        h.emu.advance(Duration::from_secs(29));
        assert!(
            h.pull_messages("q", json!({})).await.is_empty(),
            "still leased"
        );
        h.emu.advance(Duration::from_secs(2));
        let second = h.pull_messages("q", json!({})).await;
        assert_eq!(second.len(), 1);
        assert_eq!(second[0]["id"], id.as_str());
        assert_eq!(second[0]["attempts"], 2);
        assert_ne!(lease(&second[0]), lease(&first[0]));
        let s = h.emu.stats("q");
        assert_eq!((s.lease_expired, s.deliveries, s.in_flight), (1, 2, 1));
    }

    #[tokio::test]
    async fn lease_expires_in_real_time() {
        let h = harness(EmulatorOptions::default()).await;
        text(&h.emu, "q", "x");
        let first = h
            .pull_messages("q", json!({"visibility_timeout_ms": 50}))
            .await;
        assert_eq!(first.len(), 1);
        tokio::time::sleep(Duration::from_millis(120)).await;
        let second = h.pull_messages("q", json!({})).await;
        assert_eq!(second.len(), 1);
        assert_eq!(second[0]["attempts"], 2);
    }

    #[tokio::test]
    async fn retry_with_delay_holds_the_message_back() {
        let h = harness(EmulatorOptions::default()).await;
        let id = text(&h.emu, "q", "x");
        let m = h.pull_messages("q", json!({})).await.remove(0);
        let r = h.ack("q", &[], &[(&lease(&m), 10)]).await;
        assert_eq!(
            (r["ackCount"].as_u64(), r["retryCount"].as_u64()),
            (Some(0), Some(1))
        );
        assert!(h.pull_messages("q", json!({})).await.is_empty());
        h.emu.advance(Duration::from_secs(9));
        assert!(h.pull_messages("q", json!({})).await.is_empty());
        let s = h.emu.stats("q");
        assert_eq!((s.backlog, s.in_flight, s.retried), (1, 0, 1));
        h.emu.advance(Duration::from_secs(2));
        let again = h.pull_messages("q", json!({})).await;
        assert_eq!(again.len(), 1);
        assert_eq!(again[0]["id"], id.as_str());
        assert_eq!(again[0]["attempts"], 2);

        // A retry without delay is ready at once.
        h.ack("q", &[], &[(&lease(&again[0]), 0)]).await;
        let third = h.pull_messages("q", json!({})).await;
        assert_eq!(third[0]["attempts"], 3);
        assert_eq!(h.emu.books("q")[0].retries, vec![10, 0]);
        assert_eq!(h.emu.stats("q").lease_expired, 0);
    }

    #[tokio::test]
    async fn retries_past_max_retries_dead_letter() {
        let h = harness(EmulatorOptions {
            max_retries: 1,
            ..EmulatorOptions::default()
        })
        .await;
        text(&h.emu, "q", "x");
        let m = h.pull_messages("q", json!({})).await.remove(0);
        h.ack("q", &[], &[(&lease(&m), 0)]).await;
        let m = h.pull_messages("q", json!({})).await.remove(0);
        assert_eq!(m["attempts"], 2);
        let r = h.ack("q", &[], &[(&lease(&m), 0)]).await;
        assert_eq!(r["retryCount"], 1);
        assert!(h.pull_messages("q", json!({})).await.is_empty());
        let s = h.emu.stats("q");
        assert_eq!(
            (s.dead_lettered, s.retried, s.backlog, s.in_flight),
            (1, 2, 0, 0)
        );
        let b = &h.emu.books("q")[0];
        assert!(b.dead_lettered);
        assert_eq!((b.deliveries, b.acks), (2, 0));
        // A late ack of a dead-lettered message is accepted as stale, and shows in the books.
        let r = h.ack("q", &[&lease(&m)], &[]).await;
        assert_eq!(r["ackCount"], 1);
        let s = h.emu.stats("q");
        assert_eq!((s.stale_acks, s.unknown_leases, s.double_acks), (1, 0, 0));
        assert_eq!(h.emu.books("q")[0].acks, 1);
    }

    #[tokio::test]
    async fn lease_expiry_past_max_retries_dead_letters() {
        let h = harness(EmulatorOptions {
            max_retries: 0,
            ..EmulatorOptions::default()
        })
        .await;
        text(&h.emu, "q", "x");
        assert_eq!(h.pull_messages("q", json!({})).await.len(), 1);
        h.emu.advance(Duration::from_secs(31));
        let s = h.emu.stats("q");
        assert_eq!(
            (s.lease_expired, s.dead_lettered, s.backlog, s.in_flight),
            (1, 1, 0, 0)
        );
        assert!(h.pull_messages("q", json!({})).await.is_empty());
    }

    #[tokio::test]
    async fn stale_ack_is_accepted_and_counted() {
        let h = harness(EmulatorOptions::default()).await;
        text(&h.emu, "q", "x");
        let old = h
            .pull_messages("q", json!({"visibility_timeout_ms": 1000}))
            .await
            .remove(0);
        h.emu.advance(Duration::from_secs(2));
        let new = h.pull_messages("q", json!({})).await.remove(0);
        assert_eq!(new["attempts"], 2);

        let r = h.ack("q", &[&lease(&old)], &[]).await;
        assert_eq!(
            r["ackCount"], 1,
            "a late ack is accepted like on Cloudflare"
        );
        let s = h.emu.stats("q");
        assert_eq!(
            (s.acked, s.stale_acks, s.backlog, s.in_flight),
            (1, 1, 0, 0)
        );

        // The redelivery's holder now acks a message that is gone: accepted (Cloudflare is
        // permissive), and a double ack in the books and the stats.
        let r = h.ack("q", &[&lease(&new)], &[]).await;
        assert_eq!(r["ackCount"], 1);
        let s = h.emu.stats("q");
        assert_eq!((s.acked, s.double_acks, s.unknown_leases), (2, 1, 0));
        assert_eq!(h.emu.books("q")[0].acks, 2);
        assert_eq!(h.emu.books("q")[0].lease_answers, vec![1, 1]);

        // Expired but not yet redelivered: still accepted as stale.
        text(&h.emu, "q", "y");
        let m = h
            .pull_messages("q", json!({"visibility_timeout_ms": 1000}))
            .await
            .remove(0);
        h.emu.advance(Duration::from_secs(2));
        assert_eq!(h.ack("q", &[&lease(&m)], &[]).await["ackCount"], 1);
        assert_eq!(h.emu.stats("q").stale_acks, 2);
        assert!(h.pull_messages("q", json!({})).await.is_empty());
    }

    #[tokio::test]
    async fn unknown_lease_is_a_warning() {
        let h = harness(EmulatorOptions::default()).await;
        let r = h.ack("q", &["no-such-lease"], &[("other-lease", 5)]).await;
        assert_eq!(
            (r["ackCount"].as_u64(), r["retryCount"].as_u64()),
            (Some(0), Some(0))
        );
        let w = r["warnings"].as_object().expect("warnings map");
        assert!(
            w.contains_key("no-such-lease") && w.contains_key("other-lease"),
            "{r}"
        );
        let s = h.emu.stats("q");
        assert_eq!(
            (s.unknown_leases, s.ack_calls, s.acked, s.retried),
            (2, 1, 0, 0)
        );
    }

    #[tokio::test]
    async fn token_is_required() {
        let h = harness(EmulatorOptions::default()).await;
        let url = h.url("q", "/pull");
        for auth in [None, Some("Bearer wrong"), Some(TOKEN)] {
            let mut req = h.http.post(&url).body("{}");
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let resp = req.send().await.expect("answer");
            assert_eq!(resp.status().as_u16(), 403, "{auth:?}");
            let v: Value = resp.json().await.expect("json");
            assert_eq!(v["success"], false);
            assert_eq!(v["errors"][0]["code"], 10000);
            assert_eq!(v["errors"][0]["message"], "Authentication error");
        }
        let stats_url = format!("{}/_emulator/queues/q/stats", h.base);
        let resp = h.http.get(&stats_url).send().await.expect("answer");
        assert_eq!(resp.status().as_u16(), 403);
        // Refused calls did nothing.
        assert_eq!(h.emu.stats("q"), QueueStats::default());

        let resp = h
            .http
            .get(&stats_url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("answer");
        assert_eq!(resp.status().as_u16(), 200);
        let v: Value = resp.json().await.expect("json");
        assert_eq!(v["published"], 0);

        // Without a token option, anything goes.
        let open = Emulator::new(EmulatorOptions::default());
        let stop = CancellationToken::new();
        let addr = open
            .start(SocketAddr::from(([127, 0, 0, 1], 0)), stop.clone())
            .await
            .expect("start");
        let resp = client()
            .post(format!(
                "{}/accounts/a/queues/q/messages/pull",
                Emulator::base_url(addr)
            ))
            .send()
            .await
            .expect("answer");
        assert_eq!(resp.status().as_u16(), 200);
        stop.cancel();
    }

    #[tokio::test]
    async fn backlog_figures() {
        let h = harness(EmulatorOptions::default()).await;
        assert!(
            h.pull("q", json!({})).await["metadata"]["metrics"]["oldest_message_timestamp_ms"] == 0
        );
        text(&h.emu, "q", "aaaa");
        h.emu
            .publish("q", Some(ContentType::Bytes), &[1, 2, 3], Duration::ZERO)
            .expect("publish");
        h.emu
            .publish(
                "q",
                Some(ContentType::Text),
                b"later",
                Duration::from_secs(60),
            )
            .expect("publish");
        let first_ts = {
            let r = h.pull("q", json!({"batch_size": 1})).await;
            assert_eq!(r["messages"].as_array().map(Vec::len), Some(1));
            assert_eq!(r["message_backlog_count"], 3);
            let m = &r["metadata"]["metrics"];
            assert_eq!(m["backlog_count"], 3);
            // "aaaa" + base64 "AQID" + "later"
            assert_eq!(m["backlog_bytes"], 4 + 4 + 5);
            assert_eq!(
                m["oldest_message_timestamp_ms"],
                r["messages"][0]["timestamp_ms"]
            );
            r["messages"][0]["timestamp_ms"].clone()
        };
        let s = h.emu.stats("q");
        assert_eq!((s.backlog, s.in_flight, s.published), (3, 1, 3));

        // The delayed one is not handed out; acking the oldest moves the oldest timestamp on.
        let m = h.pull_messages("q", json!({"batch_size": 100})).await;
        assert_eq!(m.len(), 1);
        let leases = [lease(&m[0])];
        let r = h.pull("q", json!({})).await;
        assert_eq!(
            r["metadata"]["metrics"]["oldest_message_timestamp_ms"],
            first_ts
        );
        h.ack("q", &[leases[0].as_str()], &[]).await;
        let r = h.pull("q", json!({})).await;
        assert_eq!(r["message_backlog_count"], 2);
        assert_eq!(r["metadata"]["metrics"]["backlog_bytes"], 4 + 5);
    }

    #[tokio::test]
    async fn content_types_encode_for_the_wire() {
        let h = harness(EmulatorOptions::default()).await;
        let bytes: Vec<u8> = (0..=255u8).collect();
        let json_text = br#"{"a":[1,2.5,null],"s":"\u00fc"}"#;
        let cases: Vec<(Option<ContentType>, Vec<u8>, String)> = vec![
            (
                Some(ContentType::Text),
                "ünï \"q\"\n".into(),
                "ünï \"q\"\n".into(),
            ),
            (Some(ContentType::Text), Vec::new(), String::new()),
            (
                Some(ContentType::Json),
                json_text.to_vec(),
                STANDARD.encode(json_text),
            ),
            (
                Some(ContentType::Bytes),
                bytes.clone(),
                STANDARD.encode(&bytes),
            ),
            (Some(ContentType::V8), vec![0xff, 0x0f, 0x6f], "/w9v".into()),
            (None, b"plain".to_vec(), "plain".into()),
        ];
        for (ct, payload, _) in &cases {
            h.emu
                .publish("q", *ct, payload, Duration::ZERO)
                .expect("publish");
        }
        let msgs = h.pull_messages("q", json!({"batch_size": 100})).await;
        assert_eq!(msgs.len(), cases.len());
        for ((ct, _, wire), m) in cases.iter().zip(&msgs) {
            assert_eq!(m["body"], wire.as_str(), "{ct:?}");
            match ct {
                Some(ct) => assert_eq!(
                    m["metadata"],
                    json!({"CF-Content-Type": ct.as_str(), "CF-sourceMessageSource": "api"})
                ),
                None => assert_eq!(
                    m["metadata"],
                    json!({"CF-sourceMessageSource": "api"}),
                    "no CF-Content-Type key"
                ),
            }
        }

        let e = &h.emu;
        assert_eq!(
            e.publish("q", Some(ContentType::Text), b"\xff", Duration::ZERO),
            Err(PublishError::NotUtf8)
        );
        assert_eq!(
            e.publish("q", None, b"\xc3", Duration::ZERO),
            Err(PublishError::NotUtf8)
        );
        assert!(matches!(
            e.publish("q", Some(ContentType::Json), b"{nope", Duration::ZERO),
            Err(PublishError::InvalidJson(_))
        ));
        assert!(matches!(
            e.publish("q", Some(ContentType::Json), b"", Duration::ZERO),
            Err(PublishError::InvalidJson(_))
        ));
        assert!(matches!(
            e.publish(
                "q",
                Some(ContentType::Bytes),
                &vec![0; MAX_MESSAGE_BYTES + 1],
                Duration::ZERO
            ),
            Err(PublishError::TooLarge { .. })
        ));
        assert!(matches!(
            e.publish(
                "q",
                Some(ContentType::Text),
                b"x",
                Duration::from_secs(86_401)
            ),
            Err(PublishError::DelayTooLong(_))
        ));
        assert_eq!(e.stats("q").published, cases.len() as u64);

        for ct in [
            ContentType::Text,
            ContentType::Json,
            ContentType::Bytes,
            ContentType::V8,
        ] {
            assert_eq!(ct.as_str().parse::<ContentType>(), Ok(ct));
        }
        assert!("JSON".parse::<ContentType>().is_err());
    }

    #[tokio::test]
    async fn json_raw_puts_the_json_text_on_the_wire() {
        let h = harness(EmulatorOptions {
            json_raw: true,
            ..EmulatorOptions::default()
        })
        .await;
        h.emu
            .publish(
                "q",
                Some(ContentType::Json),
                br#"{"k": [1, 2]}"#,
                Duration::ZERO,
            )
            .expect("publish");
        let m = h.pull_messages("q", json!({})).await.remove(0);
        assert_eq!(m["body"], r#"{"k": [1, 2]}"#);
        assert_eq!(m["metadata"]["CF-Content-Type"], "json");
    }

    #[tokio::test]
    async fn http_publish_single_and_batch() {
        let h = harness(EmulatorOptions::default()).await;
        let single = h.url("q", "");
        let one = |body: Value| h.post(&single, body);
        let (st, v) = one(json!({"body": {"a": 1}})).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["success"], true);
        // The SDK's MessagePushResponse: the queue's metrics after the publish.
        assert_eq!(
            v["result"]["metadata"]["metrics"]["backlog_count"], 1,
            "{v}"
        );
        assert_eq!(
            one(json!({"body": "hi", "content_type": "text"})).await.0,
            200
        );
        assert_eq!(
            one(json!({"body": "AQID", "content_type": "bytes"}))
                .await
                .0,
            200
        );
        assert_eq!(
            one(json!({"body": "AQI", "content_type": "bytes"})).await.0,
            200
        );
        assert_eq!(
            one(json!({"body": "x", "content_type": "text", "delay_seconds": 30}))
                .await
                .0,
            200
        );
        for (bad, code) in [
            (json!({"body": 5, "content_type": "text"}), 10207),
            (json!({"body": "%%%", "content_type": "bytes"}), 10207),
            (json!({"body": 1, "content_type": "yaml"}), 10203),
            (json!({"body": 1, "delay_seconds": 86_401}), 10203),
            (json!({"body": 1, "delay_seconds": 1.5}), 10203),
            (json!({"content_type": "json"}), 10207),
        ] {
            let (st, v) = one(bad.clone()).await;
            assert_eq!(st, 400, "{bad} → {v}");
            assert_eq!(v["success"], false);
            assert_eq!(v["errors"][0]["code"], code, "{bad} → {v}");
        }
        let (st, _, _) = h.raw(&h.url("q", ""), "").await;
        assert_eq!(st, 400);

        let (st, v) = h
            .post(
                &h.url("q", "/batch"),
                json!({"messages": [
                    {"body": [1, "two"]},
                    {"body": "t", "content_type": "text", "delay_seconds": 0},
                ], "delay_seconds": 5}),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(
            v["result"]["metadata"]["metrics"]["backlog_count"], 7,
            "{v}"
        );
        // A batch with one bad message publishes nothing.
        let (st, _) = h
            .post(
                &h.url("q", "/batch"),
                json!({"messages": [{"body": "ok", "content_type": "text"}, {"body": 1, "content_type": "text"}]}),
            )
            .await;
        assert_eq!(st, 400);
        assert_eq!(h.emu.stats("q").published, 7);

        let msgs = h.pull_messages("q", json!({"batch_size": 100})).await;
        let bodies: Vec<&str> = msgs.iter().filter_map(|m| m["body"].as_str()).collect();
        // The delayed ones (single: 30 s, batch default: 5 s) are held back.
        assert_eq!(
            bodies,
            [
                STANDARD.encode(br#"{"a":1}"#).as_str(),
                "hi",
                "AQID",
                "AQI=",
                "t"
            ]
        );
        h.emu.advance(Duration::from_secs(6));
        let msgs = h.pull_messages("q", json!({})).await;
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0]["body"], STANDARD.encode(br#"[1,"two"]"#));
        assert_eq!(msgs[0]["metadata"]["CF-Content-Type"], "json");
    }

    #[tokio::test]
    async fn pull_validates_parameters_and_hands_out_five_in_fifo_order() {
        let h = harness(EmulatorOptions::default()).await;
        let ids: Vec<String> = (0..7)
            .map(|i| text(&h.emu, "q", &format!("m{i}")))
            .collect();
        for bad in [
            json!({"batch_size": 0}),
            json!({"batch_size": 101}),
            json!({"batch_size": -1}),
            json!({"batch_size": 2.5}),
            json!({"batch_size": "5"}),
            json!({"visibility_timeout_ms": 0}),
            json!({"visibility_timeout_ms": 43_200_001}),
            json!({"visibility_timeout_ms": 1000.5}),
        ] {
            let (st, v) = h.post(&h.url("q", "/pull"), bad.clone()).await;
            assert_eq!(st, 400, "{bad} → {v}");
            assert_eq!(v["success"], false);
            assert_eq!(v["errors"][0]["code"], 10207);
            assert!(
                v["errors"][0]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        }
        let (st, _, v) = h.raw(&h.url("q", "/pull"), "{not json").await;
        assert_eq!((st, &v["errors"][0]["code"]), (400, &json!(10208)));
        assert_eq!(
            h.emu.stats("q").deliveries,
            0,
            "refused pulls hand out nothing"
        );

        // An empty body is the defaults: 5 messages, oldest first.
        let (st, _, v) = h.raw(&h.url("q", "/pull"), "").await;
        assert_eq!(st, 200);
        let got: Vec<&str> = v["result"]["messages"]
            .as_array()
            .map(|a| a.iter().filter_map(|m| m["id"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(got, ids[..5].iter().map(String::as_str).collect::<Vec<_>>());
        let rest = h
            .pull_messages(
                "q",
                json!({"batch_size": 100, "visibility_timeout_ms": 43_200_000}),
            )
            .await;
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0]["id"], ids[5].as_str());
    }

    #[tokio::test]
    async fn ack_rejects_an_out_of_range_delay_without_effect() {
        let h = harness(EmulatorOptions::default()).await;
        text(&h.emu, "q", "x");
        let m = h.pull_messages("q", json!({})).await.remove(0);
        let body = json!({"acks": [{"lease_id": lease(&m)}], "retries": [{"lease_id": "z", "delay_seconds": 86_401}]});
        let (st, v) = h.post(&h.url("q", "/ack"), body).await;
        assert_eq!(st, 400, "{v}");
        let s = h.emu.stats("q");
        assert_eq!((s.acked, s.in_flight, s.unknown_leases), (0, 1, 0));
        // Empty and partial bodies are fine.
        assert_eq!(h.raw(&h.url("q", "/ack"), "").await.0, 200);
        assert_eq!(h.raw(&h.url("q", "/ack"), r#"{"acks": null}"#).await.0, 200);
        let r = h.ack("q", &[&lease(&m)], &[]).await;
        assert_eq!(r["ackCount"], 1);
    }

    #[tokio::test]
    async fn fault_status_answers_without_doing_anything() {
        let h = harness(EmulatorOptions::default()).await;
        text(&h.emu, "q", "x");
        h.emu.inject_fault(
            Op::Pull,
            Fault::Status {
                status: 429,
                body: r#"{"success":false,"errors":[{"code":971,"message":"slow down"}]}"#.into(),
                retry_after: Some("7".into()),
            },
        );
        let (st, retry_after, v) = h.raw(&h.url("q", "/pull"), "{}").await;
        assert_eq!((st, retry_after.as_deref()), (429, Some("7")));
        assert_eq!(v["errors"][0]["code"], 971);
        let s = h.emu.stats("q");
        assert_eq!((s.pull_calls, s.deliveries), (0, 0));

        let m = h.pull_messages("q", json!({})).await.remove(0);
        h.emu.inject_fault(
            Op::Ack,
            Fault::Status {
                status: 502,
                body: "bad gateway".into(),
                retry_after: None,
            },
        );
        let (st, v) = h
            .post(
                &h.url("q", "/ack"),
                json!({"acks": [{"lease_id": lease(&m)}]}),
            )
            .await;
        assert_eq!((st, v), (502, json!("bad gateway")));
        assert_eq!(h.emu.stats("q").acked, 0);
        assert_eq!(h.ack("q", &[&lease(&m)], &[]).await["ackCount"], 1);
    }

    #[tokio::test]
    async fn faults_are_one_shot_and_fifo_per_op() {
        let h = harness(EmulatorOptions::default()).await;
        for status in [500, 503] {
            h.emu.inject_fault(
                Op::Pull,
                Fault::Status {
                    status,
                    body: String::new(),
                    retry_after: None,
                },
            );
        }
        // Pull faults do not touch acks.
        h.ack("q", &[], &[]).await;
        let (a, _) = h.post(&h.url("q", "/pull"), json!({})).await;
        let (b, _) = h.post(&h.url("q", "/pull"), json!({})).await;
        let (c, _) = h.post(&h.url("q", "/pull"), json!({})).await;
        assert_eq!((a, b, c), (500, 503, 200));
    }

    #[tokio::test]
    async fn fault_delay_waits_then_handles_the_call() {
        let h = harness(EmulatorOptions::default()).await;
        text(&h.emu, "q", "x");
        h.emu
            .inject_fault(Op::Pull, Fault::Delay(Duration::from_millis(300)));
        let started = std::time::Instant::now();
        let msgs = h.pull_messages("q", json!({})).await;
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(msgs.len(), 1);
        let started = std::time::Instant::now();
        h.pull_messages("q", json!({})).await;
        assert!(started.elapsed() < Duration::from_millis(300), "one-shot");
    }

    #[tokio::test]
    async fn fault_hang_never_answers_until_shutdown() {
        let h = harness(EmulatorOptions::default()).await;
        text(&h.emu, "q", "x");
        h.emu.inject_fault(Op::Ack, Fault::Hang);
        h.emu.inject_fault(Op::Pull, Fault::Hang);
        let err = h
            .http
            .post(h.url("q", "/pull"))
            .bearer_auth(TOKEN)
            .timeout(Duration::from_millis(300))
            .send()
            .await
            .expect_err("no answer");
        assert!(err.is_timeout(), "{err}");
        assert_eq!(h.emu.stats("q").deliveries, 0);

        // A hung call ends with the server's shutdown, without an answer.
        let url = h.url("q", "/ack");
        let pending = tokio::spawn(client().post(url).bearer_auth(TOKEN).body("{}").send());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!pending.is_finished());
        h.stop.cancel();
        let res = tokio::time::timeout(Duration::from_secs(5), pending)
            .await
            .expect("ends at shutdown")
            .expect("task");
        assert!(res.is_err(), "{res:?}");
    }

    #[tokio::test]
    async fn fault_reset_drops_the_connection() {
        let h = harness(EmulatorOptions::default()).await;
        text(&h.emu, "q", "x");
        h.emu.inject_fault(Op::Pull, Fault::Reset);
        let err = h
            .http
            .post(h.url("q", "/pull"))
            .bearer_auth(TOKEN)
            .body("{}")
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .expect_err("no answer");
        assert!(!err.is_timeout(), "{err}");
        assert!(err.status().is_none(), "{err}");
        assert_eq!(h.emu.stats("q").deliveries, 0);
        // The server goes on; the next call (on a new connection) is served.
        assert_eq!(h.pull_messages("q", json!({})).await.len(), 1);
    }

    #[tokio::test]
    async fn latency_is_added_to_every_api_call() {
        let h = harness(EmulatorOptions {
            latency: Duration::from_millis(150),
            ..EmulatorOptions::default()
        })
        .await;
        let started = std::time::Instant::now();
        h.pull("q", json!({})).await;
        h.ack("q", &[], &[]).await;
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn unknown_routes_answer_with_an_envelope() {
        let h = harness(EmulatorOptions::default()).await;
        let resp = h
            .http
            .get(format!("{}/accounts/a/nothing", h.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("answer");
        assert_eq!(resp.status().as_u16(), 404);
        let v: Value = resp.json().await.expect("json");
        assert_eq!(
            (v["success"].clone(), v["errors"][0]["code"].clone()),
            (json!(false), json!(7003))
        );
        let resp = h
            .http
            .get(h.url("q", "/pull"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("answer");
        assert_eq!(resp.status().as_u16(), 405);
    }

    const ACCOUNT: &str = "acc123";

    /// An emulator as `cfq-relay emulate` runs it: one account, queues only when created.
    async fn strict(queues: &[&str]) -> Harness {
        harness(EmulatorOptions {
            account_id: Some(ACCOUNT.into()),
            queues: queues.iter().map(|q| (*q).to_owned()).collect(),
            create_queues_on_use: false,
            ..EmulatorOptions::default()
        })
        .await
    }

    impl Harness {
        async fn call(
            &self,
            method: reqwest::Method,
            url: &str,
            body: Option<Value>,
        ) -> (u16, Value) {
            let mut req = self.http.request(method, url).bearer_auth(TOKEN);
            if let Some(b) = body {
                req = req.json(&b);
            }
            let resp = req.send().await.expect("answer");
            let st = resp.status().as_u16();
            (st, resp.json().await.unwrap_or(Value::Null))
        }

        fn queues_url(&self, account: &str, tail: &str) -> String {
            format!("{}/accounts/{account}/queues{tail}", self.base)
        }
    }

    #[tokio::test]
    async fn unknown_queues_and_accounts_answer_404_10104() {
        let h = strict(&["dev-queue"]).await;
        let not_found = |(st, v): (u16, Value)| {
            assert_eq!(
                (st, &v["errors"][0]["code"], &v["success"]),
                (404, &json!(10104), &json!(false)),
                "{v}"
            );
        };
        for tail in ["/pull", "/ack", "", "/batch", "/peek"] {
            not_found(
                h.post(&h.url("nope", tail), json!({"body": "x", "messages": []}))
                    .await,
            );
        }
        let other = format!("{}/accounts/other/queues/dev-queue/messages/pull", h.base);
        not_found(h.post(&other, json!({})).await);
        not_found(
            h.call(reqwest::Method::GET, &h.queues_url("other", ""), None)
                .await,
        );
        not_found(
            h.call(reqwest::Method::GET, &h.queues_url(ACCOUNT, "/nope"), None)
                .await,
        );
        let (st, v) = h.post(&h.url("bad%20id", "/pull"), json!({})).await;
        assert_eq!((st, &v["errors"][0]["code"]), (400, &json!(10107)), "{v}");
        assert_eq!(h.emu.stats("nope"), QueueStats::default());
        // The queue is there by name and by id.
        let id = h.emu.queue_id("dev-queue").expect("created");
        assert_eq!(id.len(), 32);
        assert_eq!(h.post(&h.url("dev-queue", "/pull"), json!({})).await.0, 200);
        assert_eq!(h.post(&h.url(&id, "/pull"), json!({})).await.0, 200);
        assert_eq!(h.emu.stats(&id).pull_calls, 2);
    }

    #[tokio::test]
    async fn queues_are_created_listed_shown_and_deleted() {
        use reqwest::Method;
        let h = strict(&["dev-queue"]).await;
        let (st, v) = h
            .call(
                Method::POST,
                &h.queues_url(ACCOUNT, ""),
                Some(json!({"queue_name": "orders"})),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        let id = v["result"]["queue_id"]
            .as_str()
            .expect("queue_id")
            .to_owned();
        assert_eq!(v["result"]["queue_name"], "orders");
        assert_eq!(
            v["result"]["consumers"],
            json!([]),
            "a new queue has no consumer"
        );
        let (st, v) = h
            .call(
                Method::POST,
                &h.queues_url(ACCOUNT, ""),
                Some(json!({"queue_name": "orders"})),
            )
            .await;
        assert_eq!((st, &v["errors"][0]["code"]), (409, &json!(11009)), "{v}");
        let (st, v) = h
            .call(
                Method::POST,
                &h.queues_url(ACCOUNT, ""),
                Some(json!({"queue_name": "Bad Name"})),
            )
            .await;
        assert_eq!((st, &v["errors"][0]["code"]), (400, &json!(10207)), "{v}");

        let (st, v) = h.call(Method::GET, &h.queues_url(ACCOUNT, ""), None).await;
        assert_eq!(st, 200);
        let names: Vec<&str> = v["result"]
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|q| q["queue_name"].as_str())
            .collect();
        assert_eq!(names, ["dev-queue", "orders"]);

        // `--queue` queues come with an HTTP pull consumer, as Cloudflare shows it.
        let (st, v) = h
            .call(Method::GET, &h.queues_url(ACCOUNT, "/dev-queue"), None)
            .await;
        assert_eq!(st, 200, "{v}");
        let c = &v["result"]["consumers"][0];
        assert_eq!(
            (c["type"].as_str(), c["queue_name"].as_str()),
            (Some("http_pull"), Some("dev-queue")),
            "{v}"
        );
        assert_eq!(c["settings"]["visibility_timeout_ms"], 30_000);

        // A consumer added through the API, listed, fetched and deleted.
        let consumers = h.queues_url(ACCOUNT, &format!("/{id}/consumers"));
        let (st, v) = h
            .call(Method::POST, &consumers, Some(json!({"type": "http_pull", "settings": {"batch_size": 50.0, "max_retries": 5}})))
            .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["result"]["settings"]["batch_size"], 50);
        let cid = v["result"]["consumer_id"]
            .as_str()
            .expect("consumer_id")
            .to_owned();
        let (_, v) = h.call(Method::GET, &consumers, None).await;
        assert_eq!(v["result"].as_array().map(Vec::len), Some(1));
        let one = format!("{consumers}/{cid}");
        assert_eq!(h.call(Method::GET, &one, None).await.0, 200);
        // The consumer's max_retries is the queue's: 0 dead-letters at the first failure.
        let (st, v) = h
            .call(
                Method::PUT,
                &one,
                Some(json!({"type": "http_pull", "settings": {"max_retries": 0}})),
            )
            .await;
        assert_eq!(
            (st, &v["result"]["settings"]["max_retries"]),
            (200, &json!(0)),
            "{v}"
        );
        text(&h.emu, &id, "fails once");
        let m = h.pull_messages(&id, json!({})).await.remove(0);
        h.ack(&id, &[], &[(&lease(&m), 0)]).await;
        assert_eq!(h.emu.stats(&id).dead_lettered, 1);
        assert_eq!(h.call(Method::DELETE, &one, None).await.0, 200);
        assert_eq!(h.call(Method::GET, &one, None).await.0, 404);
        let (st, _) = h
            .call(
                Method::POST,
                &consumers,
                Some(json!({"type": "worker", "script_name": "w"})),
            )
            .await;
        assert_eq!(st, 400);

        // Renamed, delayed and paused (PATCH), then resumed (PUT).
        let (st, v) = h
            .call(Method::PATCH, &h.queues_url(ACCOUNT, "/orders"), Some(json!({"queue_name": "orders-v2", "settings": {"delivery_delay": 60.0, "delivery_paused": true}})))
            .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(
            (
                v["result"]["queue_id"].as_str(),
                v["result"]["queue_name"].as_str()
            ),
            (Some(id.as_str()), Some("orders-v2"))
        );
        assert_eq!(v["result"]["settings"]["delivery_delay"], 60);
        text(&h.emu, &id, "held");
        assert!(
            h.pull_messages("orders-v2", json!({})).await.is_empty(),
            "paused"
        );
        let (st, _) = h
            .call(
                Method::PUT,
                &h.queues_url(ACCOUNT, &format!("/{id}")),
                Some(json!({"settings": {"delivery_paused": false}})),
            )
            .await;
        assert_eq!(st, 200);
        assert!(
            h.pull_messages(&id, json!({})).await.is_empty(),
            "delayed by delivery_delay"
        );
        h.emu.advance(Duration::from_secs(61));
        assert_eq!(h.pull_messages(&id, json!({})).await.len(), 1);
        let (st, v) = h
            .call(
                Method::PATCH,
                &h.queues_url(ACCOUNT, &format!("/{id}")),
                Some(json!({"queue_name": "dev-queue"})),
            )
            .await;
        assert_eq!((st, &v["errors"][0]["code"]), (409, &json!(11009)), "{v}");

        // Deleted: gone for every call.
        let (st, v) = h
            .call(
                Method::DELETE,
                &h.queues_url(ACCOUNT, &format!("/{id}")),
                None,
            )
            .await;
        assert_eq!((st, &v["success"]), (200, &json!(true)), "{v}");
        assert_eq!(h.post(&h.url(&id, "/pull"), json!({})).await.0, 404);
        // Created again under its first name: the same id, but the old leases are not its own.
        let (st, v) = h
            .call(
                Method::POST,
                &h.queues_url(ACCOUNT, ""),
                Some(json!({"queue_name": "orders"})),
            )
            .await;
        assert_eq!(
            (st, v["result"]["queue_id"].as_str()),
            (200, Some(id.as_str())),
            "{v}"
        );
        let r = h.ack(&id, &[&lease(&m)], &[]).await;
        assert_eq!(r["ackCount"], 0);
        assert!(r["warnings"][lease(&m)].is_string(), "{r}");
    }

    #[tokio::test]
    async fn publish_limits_follow_cloudflare() {
        let h = strict(&["q"]).await;
        let code_of = |(st, v): (u16, Value)| (st, v["errors"][0]["code"].as_u64().unwrap_or(0));
        let text_of = |n: usize| "a".repeat(n);
        // 128 KB = 128,000 bytes, ~100 of them metadata.
        let fits = MAX_MESSAGE_BYTES - MESSAGE_METADATA_BYTES;
        let one = h.url("q", "");
        assert_eq!(
            code_of(
                h.post(&one, json!({"body": text_of(fits), "content_type": "text"}))
                    .await
            ),
            (200, 0)
        );
        assert_eq!(
            code_of(
                h.post(
                    &one,
                    json!({"body": text_of(fits + 1), "content_type": "text"})
                )
                .await
            ),
            (400, 10204)
        );
        assert_eq!(
            code_of(
                h.post(
                    &one,
                    json!({"body": text_of(131_072), "content_type": "text"})
                )
                .await
            ),
            (400, 10204)
        );
        // 256 KB per batch: 3 × 100 KB does not fit, 2 do.
        let batch = h.url("q", "/batch");
        let msgs = |n: usize| json!({"messages": (0..n).map(|_| json!({"body": text_of(100_000), "content_type": "text"})).collect::<Vec<_>>()});
        assert_eq!(code_of(h.post(&batch, msgs(3)).await), (400, 10205));
        assert_eq!(code_of(h.post(&batch, msgs(2)).await), (200, 0));
        let many = json!({"messages": (0..101).map(|i| json!({"body": i})).collect::<Vec<_>>()});
        assert_eq!(code_of(h.post(&batch, many).await), (400, 10206));
        assert_eq!(
            code_of(
                h.post(&batch, json!({"messages": [], "delay_seconds": 86_401}))
                    .await
            ),
            (400, 10202)
        );
        assert_eq!(
            code_of(
                h.post(
                    &batch,
                    json!({"messages": [{"body": 1}], "delay_seconds": 2.5})
                )
                .await
            ),
            (400, 10202)
        );
        let (st, _, v) = h.raw(&batch, "{\"messages\": [").await;
        assert_eq!(code_of((st, v)), (400, 10208));
        assert_eq!(
            code_of(h.post(&batch, json!({"messages": 5})).await),
            (400, 10207)
        );
        assert_eq!(
            h.emu.stats("q").published,
            3,
            "refused calls publish nothing"
        );
    }

    #[tokio::test]
    async fn whole_floats_are_numbers_and_the_legacy_visibility_field_is_read() {
        let h = strict(&["q"]).await;
        let (st, v) = h
            .post(
                &h.url("q", ""),
                json!({"body": "x", "content_type": "text", "delay_seconds": 0.0}),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        let (st, v) = h
            .post(
                &h.url("q", "/pull"),
                json!({"batch_size": 10.0, "visibility_timeout": 1000}),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        let m = v["result"]["messages"][0].clone();
        h.emu.advance(Duration::from_secs(2));
        assert_eq!(
            h.emu.stats("q").lease_expired,
            1,
            "visibility_timeout (ms) was honoured"
        );
        let m2 = h
            .pull_messages("q", json!({"visibility_timeout_ms": 60_000.0}))
            .await
            .remove(0);
        let r = h.ack("q", &[], &[(&lease(&m2), 0)]).await;
        assert_eq!(r["retryCount"], 1);
        let body = json!({"retries": [{"lease_id": lease(&m), "delay_seconds": 5.5}]});
        let (st, v) = h.post(&h.url("q", "/ack"), body).await;
        assert_eq!((st, &v["errors"][0]["code"]), (400, &json!(10203)), "{v}");
        let body = json!({"retries": [{"lease_id": lease(&m), "delay_seconds": 5.0}]});
        assert_eq!(h.post(&h.url("q", "/ack"), body).await.0, 200);
    }

    #[tokio::test]
    async fn peek_does_not_lease_and_purge_removes() {
        let h = strict(&["q"]).await;
        for i in 0..3 {
            let (st, _) = h.post(&h.url("q", ""), json!({"body": format!("m{i}"), "content_type": "text", "delay_seconds": if i == 2 { 60 } else { 0 }})).await;
            assert_eq!(st, 200);
        }
        let (st, v) = h
            .post(&h.url("q", "/peek"), json!({"batch_size": 10}))
            .await;
        assert_eq!(st, 200, "{v}");
        let peeked = v["result"]["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(peeked.len(), 2, "the delayed one is not ready: {v}");
        assert!(
            peeked[0]["lease_id"].is_null() && peeked[0]["ref"].is_string(),
            "{v}"
        );
        assert_eq!(h.emu.stats("q").deliveries, 0, "a peek leases nothing");
        // Purge the first by its ref; an unknown ref is a warning.
        let refs = json!({"refs": [{"ref": peeked[0]["ref"]}, {"ref": "nope"}]});
        let (st, v) = h.post(&h.url("q", "/purge"), refs).await;
        assert_eq!(st, 200, "{v}");
        assert!(v["result"]["warnings"]["nope"].is_string(), "{v}");
        let msgs = h.pull_messages("q", json!({})).await;
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0]["body"], "m1");
        assert_eq!(msgs[0]["metadata"]["CF-sourceMessageSource"], "api");
        // The whole queue: only when confirmed.
        let purge = format!("{}/accounts/{ACCOUNT}/queues/q/purge", h.base);
        assert_eq!(h.post(&purge, json!({})).await.0, 400);
        let (st, v) = h
            .post(&purge, json!({"delete_messages_permanently": true}))
            .await;
        assert_eq!((st, &v["result"]["queue_name"]), (200, &json!("q")), "{v}");
        let (_, v) = h.call(reqwest::Method::GET, &purge, None).await;
        assert_eq!(v["result"]["completed"], "true");
        let s = h.emu.stats("q");
        assert_eq!((s.purged, s.backlog, s.in_flight), (3, 0, 0));
    }

    #[tokio::test]
    async fn a_double_ack_shows_in_the_books_and_the_stats_endpoint() {
        let h = strict(&["q"]).await;
        text(&h.emu, "q", "once");
        let m = h.pull_messages("q", json!({})).await.remove(0);
        assert_eq!(h.ack("q", &[&lease(&m)], &[]).await["ackCount"], 1);
        let stats = |h: &Harness| {
            let url = format!("{}/_emulator/queues/q/stats", h.base);
            let http = h.http.clone();
            async move {
                let v: Value = http
                    .get(url)
                    .bearer_auth(TOKEN)
                    .send()
                    .await
                    .expect("answer")
                    .json()
                    .await
                    .expect("json");
                v
            }
        };
        let v = stats(&h).await;
        assert_eq!(
            (v["acked"].as_u64(), v["double_acks"].as_u64()),
            (Some(1), Some(0)),
            "{v}"
        );
        // The same lease once more, then in a retry: the books count each item.
        assert_eq!(
            h.ack("q", &[&lease(&m)], &[(&lease(&m), 0)]).await["ackCount"],
            1
        );
        let v = stats(&h).await;
        assert_eq!(
            (
                v["acked"].as_u64(),
                v["double_acks"].as_u64(),
                v["reused_leases"].as_u64(),
                v["retried"].as_u64()
            ),
            (Some(2), Some(1), Some(2), Some(1)),
            "{v}"
        );
        let b = &h.emu.books("q")[0];
        assert_eq!(
            (b.acks, b.lease_answers.clone(), b.retries.clone()),
            (2, vec![3], vec![0])
        );
        // A lease of another queue is unknown here.
        text(&h.emu, "other", "x");
        let o = h.pull_messages("other", json!({})).await.remove(0);
        let r = h.ack("q", &[&lease(&o)], &[]).await;
        assert_eq!(r["ackCount"], 0);
        assert!(r["warnings"][lease(&o)].is_string(), "{r}");
    }

    /// The core stays O(log n) per message: 20k messages through publish, pull, retry, ack.
    #[test]
    fn many_messages_flow_through_quickly() {
        let emu = Emulator::new(EmulatorOptions::default());
        let n = 20_000u64;
        let drafts: Vec<Draft> = (0..n)
            .map(|i| {
                emu.draft(
                    Some(ContentType::Text),
                    format!("m{i}").as_bytes(),
                    Duration::ZERO,
                )
                .expect("draft")
            })
            .collect();
        emu.create_queue("q");
        emu.publish_drafts("q", drafts);
        let started = std::time::Instant::now();
        let emu2 = emu.clone();
        let mut st = emu.lock();
        let now = st.now();
        let q = st.find("q").expect("queue");
        let id = q.scope();
        let mut round = 0u32;
        while !q.messages.is_empty() {
            round += 1;
            assert!(round < 1000, "stuck");
            let batch = q.pull(now, 100, Duration::from_secs(30), |seq, d| {
                emu2.token_for(&id, 0, seq, d)
            });
            // Retry every tenth message once, ack the rest.
            let (retry, ack): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .partition(|m| m.attempts == 1 && m.id.ends_with('0'));
            let acks: Vec<AckItem> = ack
                .into_iter()
                .map(|m| AckItem {
                    lease_id: m.lease_id.unwrap_or_default(),
                })
                .collect();
            let retries: Vec<RetryItem> = retry
                .into_iter()
                .map(|m| RetryItem {
                    lease_id: m.lease_id.unwrap_or_default(),
                    delay_seconds: None,
                })
                .collect();
            let out = q.ack(now, &acks, &retries, 3, |l| emu2.read_token(&id, 0, l));
            assert!(out.warnings.is_empty());
        }
        let s = q.stats();
        assert_eq!(s.acked, n);
        assert_eq!(s.deliveries, n + s.retried);
        assert!(q.leased.is_empty() && q.ready.is_empty());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }
}
