//! The Cloudflare Queues HTTP pull API: lenient wire types for pull and ack, and a typed client
//! that turns every failure (status, 429, HTML page, `success: false`, transport) into an
//! [`ApiError`] the callers can log, count and back off on.

pub mod online;
pub mod retry;

use std::collections::HashMap;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

use crate::config::Secret;
use crate::pipeline::policy::retry_after_header;

/// Largest excerpt of an unexpected answer body kept for logs.
const EXCERPT: usize = 200;

/// The envelope of every Cloudflare API answer. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Envelope<T> {
    pub success: Option<bool>,
    #[serde(deserialize_with = "lenient_vec")]
    pub errors: Vec<ApiMessage>,
    pub result: Option<T>,
}

/// One entry of `errors`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct ApiMessage {
    #[serde(deserialize_with = "lenient_u64")]
    pub code: Option<u64>,
    pub message: Option<String>,
}

/// `result` of a pull.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PullResult {
    #[serde(deserialize_with = "lenient_messages")]
    pub messages: Vec<PulledMessage>,
    #[serde(deserialize_with = "lenient_u64")]
    pub message_backlog_count: Option<u64>,
    #[serde(deserialize_with = "lenient_object")]
    pub metadata: Option<PullMetadata>,
}

/// `result.metadata` of a pull.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PullMetadata {
    #[serde(deserialize_with = "lenient_object")]
    pub metrics: Option<BacklogMetrics>,
}

/// `result.metadata.metrics`: best-effort backlog figures.
#[derive(Debug, Default, Clone, Copy, PartialEq, Deserialize)]
#[serde(default)]
pub struct BacklogMetrics {
    #[serde(deserialize_with = "lenient_u64")]
    pub backlog_count: Option<u64>,
    #[serde(deserialize_with = "lenient_u64")]
    pub backlog_bytes: Option<u64>,
    #[serde(deserialize_with = "lenient_u64")]
    pub oldest_message_timestamp_ms: Option<u64>,
}

/// One pulled message as it comes off the wire; every field may be missing. Deserialized by
/// hand ([`MessageVisitor`]) in one pass over the answer: a field of the wrong type is `None`.
#[derive(Debug, Default)]
pub struct PulledMessage {
    pub id: Option<String>,
    pub body: Option<String>,
    pub attempts: Option<u64>,
    pub lease_id: Option<String>,
    pub metadata: Option<HashMap<String, serde_json::Value>>,
    pub timestamp_ms: Option<u64>,
}

impl PulledMessage {
    /// The `CF-Content-Type` metadata value, if it is a string.
    pub fn content_type(&self) -> Option<&str> {
        self.metadata
            .as_ref()?
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("CF-Content-Type"))
            .and_then(|(_, v)| v.as_str())
    }
}

impl PullResult {
    /// The backlog figures, preferring `metadata.metrics` and falling back to
    /// `message_backlog_count`.
    pub fn backlog(&self) -> BacklogMetrics {
        let mut m = self
            .metadata
            .as_ref()
            .and_then(|m| m.metrics)
            .unwrap_or_default();
        if m.backlog_count.is_none() {
            m.backlog_count = self.message_backlog_count;
        }
        m
    }
}

/// `result` of an ack call.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct AckResult {
    #[serde(rename = "ackCount", deserialize_with = "lenient_u64")]
    pub ack_count: Option<u64>,
    #[serde(rename = "retryCount", deserialize_with = "lenient_u64")]
    pub retry_count: Option<u64>,
    #[serde(deserialize_with = "lenient_warnings")]
    pub warnings: Vec<String>,
}

/// An item of the `acks` array.
#[derive(Debug, Clone, Serialize)]
pub struct AckEntry<'a> {
    pub lease_id: &'a str,
}

/// An item of the `retries` array.
#[derive(Debug, Clone, Serialize)]
pub struct RetryEntry<'a> {
    pub lease_id: &'a str,
    pub delay_seconds: u32,
}

#[derive(Serialize)]
struct PullRequest {
    batch_size: u32,
    visibility_timeout_ms: u64,
}

#[derive(Serialize)]
struct AckRequest<'a> {
    acks: &'a [AckEntry<'a>],
    retries: &'a [RetryEntry<'a>],
}

/// Which API call failed; also the `op` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Pull,
    Ack,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Pull => "pull",
            Op::Ack => "ack",
        }
    }
}

/// Cloudflare's limit of one message body (128 KB).
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024;
/// What one message may take in a pull answer: its body base64-encoded (4/3 of the body), its
/// id, lease id (a few hundred characters) and metadata, with slack.
const ANSWER_BYTES_PER_MESSAGE: usize = MAX_MESSAGE_BYTES * 4 / 3 + 16 * 1024;
/// The largest ack answer read (it lists at most a warning per item of 100).
pub const ACK_ANSWER_LIMIT: usize = 1024 * 1024;

/// The largest pull answer read for a pull of `batch_size` messages (~18 MB for 100): a larger
/// answer is an API error, refused before it is allocated.
pub fn pull_answer_limit(batch_size: u32) -> usize {
    (batch_size.max(1) as usize) * ANSWER_BYTES_PER_MESSAGE + 64 * 1024
}

/// A failed API call. `Display` is one line of context, never the token.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("rate limited (HTTP 429){}", fmt_retry_after(.retry_after))]
    RateLimited { retry_after: Option<Duration> },
    #[error(
        "HTTP {status}: authentication failed; check that the API token is valid and has Queues read and write permission (Account > Queues > Edit){}",
        fmt_errors(.errors)
    )]
    Auth {
        status: u16,
        errors: Vec<ApiMessage>,
    },
    #[error("HTTP {status}{}{}", fmt_errors(.errors), fmt_excerpt(.excerpt))]
    Status {
        status: u16,
        errors: Vec<ApiMessage>,
        excerpt: String,
        retry_after: Option<Duration>,
    },
    #[error("answer was not the expected JSON ({reason}){}", fmt_excerpt(.excerpt))]
    Malformed { reason: String, excerpt: String },
    #[error("API answered success=false{}", fmt_errors(.errors))]
    Unsuccessful { errors: Vec<ApiMessage> },
    #[error(
        "answer larger than {limit} bytes: refused unread (the messages it leased return when their leases expire)"
    )]
    TooLarge { limit: usize },
    #[error("request timed out")]
    Timeout,
    #[error("transport error: {0}")]
    Transport(String),
}

impl ApiError {
    /// The `result` metric label.
    pub fn class(&self) -> &'static str {
        match self {
            ApiError::RateLimited { .. } => "429",
            ApiError::Auth { .. } => "4xx",
            ApiError::Status { status, .. } if *status >= 500 => "5xx",
            ApiError::Status { .. } => "4xx",
            ApiError::Malformed { .. }
            | ApiError::Unsuccessful { .. }
            | ApiError::TooLarge { .. } => "malformed",
            ApiError::Timeout | ApiError::Transport(_) => "transport_error",
        }
    }

    /// A server-given minimum wait, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::RateLimited { retry_after } | ApiError::Status { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    pub fn is_auth(&self) -> bool {
        matches!(self, ApiError::Auth { .. })
    }
}

fn fmt_retry_after(d: &Option<Duration>) -> String {
    d.map(|d| format!(", retry after {}s", d.as_secs()))
        .unwrap_or_default()
}

fn fmt_errors(errors: &[ApiMessage]) -> String {
    if errors.is_empty() {
        return String::new();
    }
    // The messages come from the answer: keep them short and on one line (a newline in them
    // would split, or forge, a log line).
    let parts: Vec<String> = errors
        .iter()
        .take(5)
        .map(|e| {
            let message: String = e
                .message
                .as_deref()
                .unwrap_or("")
                .chars()
                .take(EXCERPT)
                .collect();
            let message = one_line(&message);
            format!(
                "{} {}",
                e.code.map(|c| c.to_string()).unwrap_or_else(|| "?".into()),
                message
            )
        })
        .collect();
    format!(": {}", parts.join("; "))
}

fn fmt_excerpt(excerpt: &str) -> String {
    if excerpt.is_empty() {
        String::new()
    } else {
        format!(": {excerpt:?}")
    }
}

/// `s` with its control characters (newlines included) escaped, for a single log line.
pub fn one_line(s: &str) -> String {
    crate::logs::one_line(s)
}

/// A printable excerpt of an answer body, cut at a char boundary.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(EXCERPT * 4)]);
    let mut s: String = text.chars().take(EXCERPT).collect();
    if text.chars().count() > EXCERPT {
        s.push('…');
    }
    s
}

/// A client for one queue: pull and ack URLs are built once.
#[derive(Clone)]
pub struct QueueClient {
    http: reqwest::Client,
    pull_url: reqwest::Url,
    ack_url: reqwest::Url,
    auth: HeaderValue,
    timeout: Duration,
}

impl std::fmt::Debug for QueueClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueClient")
            .field(
                "pull_url",
                &crate::config::redact_url(self.pull_url.as_str()),
            )
            .field("auth", &"[REDACTED]")
            .finish()
    }
}

impl QueueClient {
    pub fn new(
        http: reqwest::Client,
        api_base_url: &str,
        account_id: &str,
        queue_id: &str,
        token: &Secret,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let base = api_base_url.trim_end_matches('/');
        let url = |op: &str| {
            reqwest::Url::parse(&format!(
                "{base}/accounts/{account_id}/queues/{queue_id}/messages/{op}"
            ))
        };
        let mut auth =
            HeaderValue::from_str(&format!("Bearer {}", token.expose())).map_err(|_| {
                anyhow::anyhow!("the API token contains characters not allowed in an HTTP header")
            })?;
        auth.set_sensitive(true);
        Ok(Self {
            http,
            pull_url: url("pull")?,
            ack_url: url("ack")?,
            auth,
            timeout,
        })
    }

    /// Pull up to `batch_size` messages with a lease of `visibility_timeout`.
    pub async fn pull(
        &self,
        batch_size: u32,
        visibility_timeout: Duration,
    ) -> Result<PullResult, ApiError> {
        let req = PullRequest {
            batch_size,
            visibility_timeout_ms: visibility_timeout.as_millis() as u64,
        };
        self.call(&self.pull_url, &req, pull_answer_limit(batch_size))
            .await
    }

    /// Acknowledge and retry leases in one call.
    pub async fn ack(
        &self,
        acks: &[AckEntry<'_>],
        retries: &[RetryEntry<'_>],
    ) -> Result<AckResult, ApiError> {
        self.call(
            &self.ack_url,
            &AckRequest { acks, retries },
            ACK_ANSWER_LIMIT,
        )
        .await
    }

    async fn call<T: serde::de::DeserializeOwned + Default>(
        &self,
        url: &reqwest::Url,
        body: &impl Serialize,
        limit: usize,
    ) -> Result<T, ApiError> {
        let body = serde_json::to_vec(body).map_err(|e| ApiError::Transport(e.to_string()))?;
        let resp = self
            .http
            .post(url.clone())
            .header(AUTHORIZATION, self.auth.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .timeout(self.timeout)
            .body(body)
            .send()
            .await
            .map_err(transport_error)?;
        let status = resp.status().as_u16();
        let retry_after = retry_after_header(resp.headers());
        let bytes = read_bounded(resp, limit).await?;
        interpret(status, retry_after, &bytes)
    }
}

/// The answer body, read chunk by chunk and refused as soon as it passes `limit` bytes (or
/// announces more): a hostile or broken API cannot make the relay allocate without bound.
async fn read_bounded(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, ApiError> {
    let announced = resp.content_length().unwrap_or(0);
    if announced > limit as u64 {
        return Err(ApiError::TooLarge { limit });
    }
    if announced > 0 {
        let mut body = Vec::with_capacity(announced as usize);
        while let Some(chunk) = resp.chunk().await.map_err(transport_error)? {
            if body.len() + chunk.len() > limit {
                return Err(ApiError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        return Ok(body);
    }
    // No length announced (chunked): keep the chunks as they come and join them once, so the
    // peak is the answer plus one copy, never a doubling buffer's spare half on top.
    let mut chunks = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = resp.chunk().await.map_err(transport_error)? {
        total += chunk.len();
        if total > limit {
            return Err(ApiError::TooLarge { limit });
        }
        chunks.push(chunk);
    }
    let mut body = Vec::with_capacity(total);
    for chunk in chunks.drain(..) {
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Turn a status and body into the result or an error. Pure, so the odd answers are unit-tested.
pub fn interpret<T: serde::de::DeserializeOwned + Default>(
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<T, ApiError> {
    let parsed: Result<Envelope<T>, _> = serde_json::from_slice(body);
    let errors = |p: &Result<Envelope<T>, _>| match p {
        Ok(env) => env.errors.clone(),
        Err(_) => Vec::new(),
    };
    if status == 429 {
        return Err(ApiError::RateLimited { retry_after });
    }
    if status == 401 || status == 403 {
        return Err(ApiError::Auth {
            status,
            errors: errors(&parsed),
        });
    }
    if !(200..300).contains(&status) {
        return Err(ApiError::Status {
            status,
            errors: errors(&parsed),
            excerpt: if parsed.is_ok() {
                String::new()
            } else {
                excerpt(body)
            },
            retry_after,
        });
    }
    let env = parsed.map_err(|e| ApiError::Malformed {
        reason: e.to_string(),
        excerpt: excerpt(body),
    })?;
    if env.success == Some(false) {
        return Err(ApiError::Unsuccessful { errors: env.errors });
    }
    Ok(env.result.unwrap_or_default())
}

fn transport_error(e: reqwest::Error) -> ApiError {
    if e.is_timeout() {
        ApiError::Timeout
    } else {
        // without_url: URLs carry no secret here, but keep messages short and uniform.
        ApiError::Transport(error_chain(&e.without_url()))
    }
}

/// An error and its sources on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

// ---- lenient deserializers: a wrong type becomes "absent", never an error ----

// A pull answer carries up to 100 messages of up to 128 KB each: these read it in one pass,
// without building a `serde_json::Value` of it first.

/// The visitor methods for the JSON values a lenient field does not want: each one is read to
/// its end (so the parse goes on) and becomes `None`. Strings and numbers are left to the
/// visitor.
macro_rules! forward_to_none {
    () => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<de::IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map
                .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                .is_some()
            {}
            Ok(None)
        }
    };
}

fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct V;
    impl<'de> de::Visitor<'de> for V {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("anything (a number or a numeric string counts)")
        }
        fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
            Ok(u64::try_from(v).ok())
        }
        fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
            Ok((v >= 0.0).then_some(v as u64))
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(v.trim().parse::<u64>().ok())
        }
        forward_to_none!();
    }
    d.deserialize_any(V)
}

fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    d.deserialize_any(LenientString)
}

/// A string, or `None` for any other JSON value.
struct LenientString;

impl<'de> de::Visitor<'de> for LenientString {
    type Value = Option<String>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("anything (a string counts)")
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Some(v))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    forward_to_none!();
}

/// `messages`: an array whose objects become messages; anything else in it (or instead of it)
/// is skipped.
fn lenient_messages<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PulledMessage>, D::Error> {
    struct Items;
    impl<'de> de::Visitor<'de> for Items {
        type Value = Vec<PulledMessage>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an array of messages")
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(100));
            while let Some(item) = seq.next_element::<MaybeMessage>()? {
                out.extend(item.0);
            }
            Ok(out)
        }
        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map
                .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                .is_some()
            {}
            Ok(Vec::new())
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
    }
    d.deserialize_any(Items)
}

/// One item of `messages`: a message if it is an object, else `None`.
struct MaybeMessage(Option<PulledMessage>);

impl<'de> Deserialize<'de> for MaybeMessage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Option<PulledMessage>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a message object")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                MessageVisitor.visit_map(map).map(Some)
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(None)
            }
        }
        d.deserialize_any(V).map(MaybeMessage)
    }
}

impl<'de> Deserialize<'de> for PulledMessage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(MessageVisitor)
    }
}

/// The fields of a message object; a key given twice counts once, the last one (as in a
/// JSON object read into a map); unknown keys are skipped.
struct MessageVisitor;

impl<'de> de::Visitor<'de> for MessageVisitor {
    type Value = PulledMessage;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a message object")
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<PulledMessage, A::Error> {
        /// A field's value through one of the lenient readers.
        struct Field<T>(T);
        macro_rules! lenient {
            ($t:ty, $read:path) => {
                impl<'de> Deserialize<'de> for Field<$t> {
                    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                        $read(d).map(Field)
                    }
                }
            };
        }
        lenient!(Option<String>, lenient_string);
        lenient!(Option<u64>, lenient_u64);
        lenient!(Option<HashMap<String, serde_json::Value>>, lenient_object);

        let mut m = PulledMessage::default();
        while let Some(key) = map.next_key::<MessageKey>()? {
            match key {
                MessageKey::Id => m.id = map.next_value::<Field<_>>()?.0,
                MessageKey::Body => m.body = map.next_value::<Field<_>>()?.0,
                MessageKey::Attempts => m.attempts = map.next_value::<Field<_>>()?.0,
                MessageKey::LeaseId => m.lease_id = map.next_value::<Field<_>>()?.0,
                MessageKey::Metadata => m.metadata = map.next_value::<Field<_>>()?.0,
                MessageKey::TimestampMs => m.timestamp_ms = map.next_value::<Field<_>>()?.0,
                MessageKey::Other => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(m)
    }
}

/// The keys of a message object, matched without allocating.
enum MessageKey {
    Id,
    Body,
    Attempts,
    LeaseId,
    Metadata,
    TimestampMs,
    Other,
}

impl<'de> Deserialize<'de> for MessageKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = MessageKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E>(self, v: &str) -> Result<MessageKey, E> {
                Ok(match v {
                    "id" => MessageKey::Id,
                    "body" => MessageKey::Body,
                    "attempts" => MessageKey::Attempts,
                    "lease_id" => MessageKey::LeaseId,
                    "metadata" => MessageKey::Metadata,
                    "timestamp_ms" => MessageKey::TimestampMs,
                    _ => MessageKey::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

fn lenient_vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: de::DeserializeOwned,
{
    let v = serde_json::Value::deserialize(d)?;
    Ok(match v {
        serde_json::Value::Array(items) => items
            .into_iter()
            .filter_map(|item| serde_json::from_value(item).ok())
            .collect(),
        _ => Vec::new(),
    })
}

fn lenient_object<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: de::DeserializeOwned,
{
    let v = serde_json::Value::deserialize(d)?;
    Ok(match v {
        serde_json::Value::Object(_) => serde_json::from_value(v).ok(),
        _ => None,
    })
}

/// `warnings`: a map lease_id → message (current schema), a list of strings (older SDKs), or null.
fn lenient_warnings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    let text = |v: serde_json::Value| match v {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    };
    Ok(match v {
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| format!("{}: {}", short_lease(&k), text(v)))
            .collect(),
        serde_json::Value::Array(items) => items.into_iter().map(text).collect(),
        serde_json::Value::Null => Vec::new(),
        other => vec![text(other)],
    })
}

/// Lease ids are hundreds of bytes; logs get their head only.
pub fn short_lease(lease: &str) -> String {
    let head: String = lease.chars().take(16).collect();
    if lease.len() > head.len() {
        format!("{head}…")
    } else {
        head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(body: reqwest::Body) -> reqwest::Response {
        reqwest::Response::from(axum::http::Response::new(body))
    }

    fn chunked(chunks: usize, size: usize) -> reqwest::Body {
        let stream = futures_util::stream::iter(
            (0..chunks).map(move |_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; size]))),
        );
        reqwest::Body::wrap_stream(stream)
    }

    #[tokio::test]
    async fn answers_are_read_up_to_their_cap() {
        // Announced length: refused before reading; within the cap: read whole.
        let big = answer(reqwest::Body::from(vec![b'x'; 2000]));
        assert!(matches!(
            read_bounded(big, 1000).await,
            Err(ApiError::TooLarge { limit: 1000 })
        ));
        let small = answer(reqwest::Body::from(vec![b'x'; 1000]));
        assert_eq!(read_bounded(small, 1000).await.unwrap().len(), 1000);
        // No length (chunked): refused as soon as the chunks pass the cap.
        assert!(matches!(
            read_bounded(answer(chunked(100, 64)), 1000).await,
            Err(ApiError::TooLarge { .. })
        ));
        assert_eq!(
            read_bounded(answer(chunked(10, 64)), 1000).await.unwrap(),
            vec![b'x'; 640]
        );
        assert_eq!(
            pull_answer_limit(100),
            100 * (131_072 * 4 / 3 + 16_384) + 65_536
        );
        assert_eq!(ApiError::TooLarge { limit: 1 }.class(), "malformed");
    }

    fn pull(body: &str) -> Result<PullResult, ApiError> {
        interpret(200, None, body.as_bytes())
    }

    #[test]
    fn full_pull_answer() {
        let r = pull(
            r#"{"success":true,"errors":[],"messages":[],"result":{"messages":[
              {"id":"a1","body":"aGk=","attempts":2,"lease_id":"L1","metadata":{"CF-Content-Type":"bytes"},"timestamp_ms":1700000000000}],
              "message_backlog_count":7,
              "metadata":{"metrics":{"backlog_count":8,"backlog_bytes":100,"oldest_message_timestamp_ms":1699999999000}}}}"#,
        )
        .unwrap();
        assert_eq!(r.messages.len(), 1);
        let m = &r.messages[0];
        assert_eq!(m.id.as_deref(), Some("a1"));
        assert_eq!(m.attempts, Some(2));
        assert_eq!(m.content_type(), Some("bytes"));
        assert_eq!(m.timestamp_ms, Some(1_700_000_000_000));
        let b = r.backlog();
        assert_eq!(b.backlog_count, Some(8));
        assert_eq!(b.backlog_bytes, Some(100));
        assert_eq!(b.oldest_message_timestamp_ms, Some(1_699_999_999_000));
    }

    #[test]
    fn lenient_pull_answers() {
        for body in [
            "{}",
            r#"{"result":null}"#,
            r#"{"success":true,"result":{}}"#,
            r#"{"success":true,"result":{"messages":null}}"#,
            r#"{"success":true,"result":{"messages":[]}}"#,
            r#"{"success":true,"result":{"messages":"nope","metadata":7}}"#,
            r#"{"success":true,"errors":null,"result":{"metadata":{"metrics":null}}}"#,
        ] {
            let r = pull(body).unwrap_or_else(|e| panic!("{body}: {e}"));
            assert!(r.messages.is_empty(), "{body}");
        }
        let r = pull(r#"{"result":{"message_backlog_count":"12","messages":[{"id":"x"},{"body":5},{"lease_id":"L","attempts":1.0,"timestamp_ms":"12"}]}}"#)
            .unwrap();
        assert_eq!(r.backlog().backlog_count, Some(12));
        // Fields of the wrong type or missing are None; the message itself is kept.
        assert_eq!(r.messages.len(), 3);
        assert_eq!(r.messages[0].lease_id, None);
        assert_eq!(r.messages[1].body, None);
        assert_eq!(r.messages[2].attempts, Some(1));
        assert_eq!(r.messages[2].timestamp_ms, Some(12));
    }

    #[test]
    fn messages_are_read_in_one_pass_as_leniently_as_before() {
        let r = pull(
            r#"{"result":{"messages":[
              7, "x", null, [1, 2], {},
              {"id":"a","id":"b","body":"esc\"aped\n","extra":{"deep":[1,{"x":null}]},
               "lease_id":["not","a","string"],"attempts":-3,"timestamp_ms":{"n":1},
               "metadata":{"CF-Content-Type":"json","CF-Content-Type":"text","other":[1]}},
              {"body":12,"attempts":"  4 ","lease_id":"L","timestamp_ms":2.5e3,"metadata":"json"}
            ]}}"#,
        )
        .unwrap();
        // Items that are not objects are skipped; an empty object is a message without fields.
        assert_eq!(r.messages.len(), 3);
        assert!(r.messages[0].id.is_none() && r.messages[0].body.is_none());
        let m = &r.messages[1];
        // A repeated key counts once, the last one, as in a JSON object read into a map.
        assert_eq!(m.id.as_deref(), Some("b"));
        assert_eq!(m.body.as_deref(), Some("esc\"aped\n"));
        assert_eq!(
            (m.lease_id.as_deref(), m.attempts, m.timestamp_ms),
            (None, None, None)
        );
        assert_eq!(m.content_type(), Some("text"));
        let m = &r.messages[2];
        assert_eq!((m.body.as_deref(), m.attempts), (None, Some(4)));
        assert_eq!(
            (m.lease_id.as_deref(), m.timestamp_ms),
            (Some("L"), Some(2500))
        );
        assert!(m.metadata.is_none());
        // Truncated JSON is still an error, never a partial batch.
        assert!(pull(r#"{"result":{"messages":[{"id":"a","body":"x"#).is_err());
    }

    #[test]
    fn error_answers() {
        let html = b"<html><body>502 Bad Gateway</body></html>";
        match interpret::<PullResult>(502, None, html) {
            Err(ApiError::Status {
                status: 502,
                excerpt,
                ..
            }) => assert!(excerpt.contains("Bad Gateway")),
            other => panic!("{other:?}"),
        }
        match interpret::<PullResult>(200, None, html) {
            Err(e @ ApiError::Malformed { .. }) => assert_eq!(e.class(), "malformed"),
            other => panic!("{other:?}"),
        }
        match interpret::<PullResult>(429, Some(Duration::from_secs(3)), b"") {
            Err(e @ ApiError::RateLimited { .. }) => {
                assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
                assert_eq!(e.class(), "429");
            }
            other => panic!("{other:?}"),
        }
        let denied =
            br#"{"success":false,"errors":[{"code":10000,"message":"Authentication error"}]}"#;
        match interpret::<PullResult>(403, None, denied) {
            Err(e @ ApiError::Auth { .. }) => {
                let s = e.to_string();
                assert!(
                    s.contains("10000 Authentication error") && s.contains("permission"),
                    "{s}"
                );
            }
            other => panic!("{other:?}"),
        }
        let unsuccessful =
            br#"{"success":false,"errors":[{"code":7003,"message":"No route"}],"result":null}"#;
        match interpret::<PullResult>(200, None, unsuccessful) {
            Err(e @ ApiError::Unsuccessful { .. }) => {
                assert!(e.to_string().contains("7003 No route"))
            }
            other => panic!("{other:?}"),
        }
        match interpret::<PullResult>(404, None, unsuccessful) {
            Err(e @ ApiError::Status { status: 404, .. }) => assert_eq!(e.class(), "4xx"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ack_warnings_in_every_shape() {
        let map: AckResult = interpret(
            200,
            None,
            br#"{"success":true,"result":{"ackCount":2,"retryCount":1,"warnings":{"lease-abcdefghijklmnopqrstuvwxyz":"unknown lease"}}}"#,
        )
        .unwrap();
        assert_eq!(map.ack_count, Some(2));
        assert_eq!(map.retry_count, Some(1));
        assert_eq!(
            map.warnings,
            vec!["lease-abcdefghij…: unknown lease".to_string()]
        );
        let list: AckResult =
            interpret(200, None, br#"{"result":{"warnings":["a","b"]}}"#).unwrap();
        assert_eq!(list.warnings, vec!["a", "b"]);
        let null: AckResult =
            interpret(200, None, br#"{"result":{"ackCount":1,"warnings":null}}"#).unwrap();
        assert!(null.warnings.is_empty());
        let none: AckResult = interpret(200, None, br#"{"success":true}"#).unwrap();
        assert_eq!(none.ack_count, None);
    }

    #[test]
    fn request_bodies_match_the_api() {
        let acks = [AckEntry { lease_id: "a" }];
        let retries = [RetryEntry {
            lease_id: "b",
            delay_seconds: 30,
        }];
        let json = serde_json::to_string(&AckRequest {
            acks: &acks,
            retries: &retries,
        })
        .unwrap();
        assert_eq!(
            json,
            r#"{"acks":[{"lease_id":"a"}],"retries":[{"lease_id":"b","delay_seconds":30}]}"#
        );
        let json = serde_json::to_string(&PullRequest {
            batch_size: 100,
            visibility_timeout_ms: 60_000,
        })
        .unwrap();
        assert_eq!(json, r#"{"batch_size":100,"visibility_timeout_ms":60000}"#);
    }

    #[test]
    fn debug_hides_the_token() {
        let token = Secret::new("super-secret-token");
        let c = QueueClient::new(
            reqwest::Client::new(),
            "http://127.0.0.1:1/client/v4",
            "acct",
            "q",
            &token,
            Duration::from_secs(1),
        )
        .unwrap();
        let d = format!("{c:?}");
        assert!(!d.contains("super-secret-token"), "{d}");
    }
}
