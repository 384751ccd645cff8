//! The emulator's public vocabulary: its options, Cloudflare's limits and Queues error codes,
//! content types, injectable faults, and the counters and books it keeps.

use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

/// Largest `batch_size` of a pull.
pub(crate) const MAX_BATCH: u64 = 100;
/// `batch_size` when the pull does not say.
pub(crate) const DEFAULT_BATCH: u64 = 5;
/// `visibility_timeout_ms` when the pull does not say.
pub(crate) const DEFAULT_VISIBILITY_MS: u64 = 30_000;
/// Largest `visibility_timeout_ms` (12 h).
pub(crate) const MAX_VISIBILITY_MS: u64 = 43_200_000;
/// Largest `delay_seconds` of a retry or a publish (24 h).
pub(crate) const MAX_DELAY_SECONDS: u64 = 86_400;
/// Largest message, its metadata included (Cloudflare: 128 KB, where 1 KB = 1,000 bytes).
pub const MAX_MESSAGE_BYTES: usize = 128_000;
/// What Cloudflare counts for a message's own metadata towards the size limits.
pub const MESSAGE_METADATA_BYTES: usize = 100;
/// Largest batch of a publish call, in messages.
pub(crate) const MAX_PUBLISH_BATCH: usize = 100;
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
pub(crate) const BODY_LIMIT: usize = 32 * 1024 * 1024;
/// Protected header of the lease ids: base64url of `{"alg":"dir","enc":"A256CBC-HS512"}`, the
/// header of Cloudflare's own lease JWEs.
pub(crate) const LEASE_HEADER: &str = "eyJhbGciOiJkaXIiLCJlbmMiOiJBMjU2Q0JDLUhTNTEyIn0";

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
    /// The in-process [`Emulator::publish`](crate::Emulator::publish) creates its queue either way.
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
pub enum FaultOp {
    Pull,
    Ack,
}

/// A one-shot fault for the next call of an [`FaultOp`].
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

/// Why [`Emulator::publish`](crate::Emulator::publish) refused a message.
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

/// A request number (the schemas type them all as JSON `number`): a whole value, written as
/// an integer or as a whole float (`10.0`, what the official SDKs send for a Python float), in
/// `range`. Cloudflare's docs are silent on fractions; every one of these numbers counts
/// something whole (messages, milliseconds, seconds), so a fraction is refused like an
/// out-of-range value rather than silently rounded. `Err` is the message.
pub(crate) fn whole(
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
