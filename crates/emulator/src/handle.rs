//! [`Emulator`]: the shared state behind every route, and the in-process API that tests, the
//! demo and the bench use (publish, stats, books, faults, the clock, lease ids).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::store::*;
use crate::types::*;
use axum::http::{HeaderMap, header};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rand::Rng;
use tokio::time::Instant;

/// A local Cloudflare Queues API. Cheap to clone: clones share the queues.
#[derive(Clone)]
pub struct Emulator {
    pub(crate) inner: Arc<EmulatorShared>,
}

pub(crate) struct EmulatorShared {
    pub(crate) opts: EmulatorOptions,
    /// Signs lease ids and peek refs, so that an ack can name its message and delivery
    /// without the emulator keeping every lease id it ever issued.
    pub(crate) key: [u8; 32],
    pub(crate) state: Mutex<EmulatorState>,
}

#[derive(Default)]
pub(crate) struct EmulatorState {
    /// By queue id.
    pub(crate) queues: HashMap<String, StoredQueue>,
    /// Queue name → queue id.
    pub(crate) names: HashMap<String, String>,
    pub(crate) pull_faults: VecDeque<Fault>,
    pub(crate) ack_faults: VecDeque<Fault>,
    /// API calls seen, for `error_ratio`.
    pub(crate) calls: u64,
    /// Added to the tokio clock: see [`Emulator::advance`].
    pub(crate) clock_offset: Duration,
}

impl EmulatorState {
    pub(crate) fn now(&self) -> Instant {
        Instant::now() + self.clock_offset
    }

    /// The queue a URL names: by its id, or (an emulator convenience, so that a development
    /// config can say `queue_id = "dev-queue"`) by its name.
    pub(crate) fn find(&mut self, key: &str) -> Option<&mut StoredQueue> {
        let id = if self.queues.contains_key(key) {
            key.to_owned()
        } else {
            self.names.get(key)?.clone()
        };
        self.queues.get_mut(&id)
    }

    /// Create a queue named `name` (its id derived from the name); `None` if the name is taken.
    pub(crate) fn create(
        &mut self,
        name: &str,
        http_pull_consumer: bool,
        max_retries: u32,
    ) -> Option<&mut StoredQueue> {
        if self.names.contains_key(name) {
            return None;
        }
        let id = queue_id_for(name);
        let mut q = StoredQueue {
            id: id.clone(),
            name: name.to_owned(),
            created_on: rfc3339_now(),
            ..StoredQueue::default()
        };
        if http_pull_consumer {
            q.consumers.push(HttpPullConsumer::new(name, max_retries));
        }
        self.names.insert(name.to_owned(), id.clone());
        Some(self.queues.entry(id).or_insert(q))
    }

    pub(crate) fn remove(&mut self, key: &str) -> Option<StoredQueue> {
        let id = self.find(key)?.id.clone();
        let q = self.queues.remove(&id)?;
        self.names.remove(&q.name);
        Some(q)
    }
}

/// A queue's id: 32 hex characters, derived from its name so that it stays the same across
/// restarts of the emulator (a config that names the id keeps working).
pub(crate) fn queue_id_for(name: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(name.as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

impl Emulator {
    pub fn new(opts: EmulatorOptions) -> Self {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        let mut state = EmulatorState::default();
        for name in &opts.queues {
            state.create(name, true, opts.max_retries);
        }
        Self {
            inner: Arc::new(EmulatorShared {
                opts,
                key,
                state: Mutex::new(state),
            }),
        }
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
        self.settled(queue_id, |q| q.stats()).unwrap_or_default()
    }

    /// One book per message ever published to the queue, in publish order.
    pub fn books(&self, queue_id: &str) -> Vec<MessageBook> {
        self.settled(queue_id, |q| q.books.clone())
            .unwrap_or_default()
    }

    /// `f` of a queue once its due leases and delays are settled (`None`: no such queue).
    fn settled<T>(&self, queue_id: &str, f: impl FnOnce(&StoredQueue) -> T) -> Option<T> {
        let mut st = self.lock();
        let now = st.now();
        let max_retries = self.inner.opts.max_retries;
        st.find(queue_id).map(|q| {
            q.settle(now, q.max_retries(max_retries));
            f(q)
        })
    }

    /// Queue a one-shot fault for the next API call of `op` on any queue (FIFO per op).
    pub fn inject_fault(&self, op: FaultOp, fault: Fault) {
        let mut st = self.lock();
        match op {
            FaultOp::Pull => st.pull_faults.push_back(fault),
            FaultOp::Ack => st.ack_faults.push_back(fault),
        }
    }

    /// Move the emulator's clock forward by `by`: leases and delays that fall due by then are
    /// settled at the next call. For tests that must not wait out a visibility timeout or a
    /// retry delay (tokio's `test-util` clock is not available to this crate).
    pub fn advance(&self, by: Duration) {
        let mut st = self.lock();
        st.clock_offset += by;
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, EmulatorState> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Check and encode one message for the wire.
    pub(crate) fn draft(
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
    pub(crate) fn publish_drafts(&self, queue_id: &str, drafts: Vec<Draft>) -> Option<Vec<String>> {
        self.publish_with_metrics(queue_id, drafts)
            .map(|(ids, _)| ids)
    }

    pub(crate) fn publish_with_metrics(
        &self,
        queue_id: &str,
        drafts: Vec<Draft>,
    ) -> Option<(Vec<String>, QueueMetrics)> {
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

    pub(crate) fn take_fault(&self, op: FaultOp) -> Option<Fault> {
        let mut st = self.lock();
        let injected = match op {
            FaultOp::Pull => st.pull_faults.pop_front(),
            FaultOp::Ack => st.ack_faults.pop_front(),
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

    pub(crate) fn authorized(&self, headers: &HeaderMap) -> bool {
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
    pub(crate) fn account_known(&self, account_id: &str) -> bool {
        self.inner
            .opts
            .account_id
            .as_deref()
            .is_none_or(|a| a == account_id)
    }

    /// A lease id (`kind` 0) or a peek ref (`kind` 1) for delivery `delivery` (0: the first)
    /// of message `seq` of queue `queue_id`: shaped like Cloudflare's (a compact JWE, `dir`,
    /// A256CBC-HS512, ~310 url-safe characters), its "ciphertext" carrying the message and
    /// delivery and its "tag" an HMAC over them, so that the emulator can tell a lease it
    /// issued (however old) from a forged one without keeping them all.
    pub(crate) fn token_for(&self, queue_id: &str, kind: u8, seq: u64, delivery: u32) -> String {
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

    pub(crate) fn tag(&self, queue_id: &str, iv: &[u8], ciphertext: &[u8]) -> [u8; 32] {
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
    pub(crate) fn read_token(&self, queue_id: &str, kind: u8, token: &str) -> Option<(u64, u32)> {
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

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
