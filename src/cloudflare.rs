//! The Cloudflare Queues HTTP pull API: lenient wire types for pull and ack, and a typed client
//! that turns every failure (status, 429, HTML page, `success: false`, transport) into an
//! [`ApiError`] the callers can log, count and back off on.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

use crate::policy::retry_after_header;

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
    #[serde(deserialize_with = "lenient_vec")]
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

/// One pulled message as it comes off the wire; every field may be missing.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PulledMessage {
    #[serde(deserialize_with = "lenient_string")]
    pub id: Option<String>,
    #[serde(deserialize_with = "lenient_string")]
    pub body: Option<String>,
    #[serde(deserialize_with = "lenient_u64")]
    pub attempts: Option<u64>,
    #[serde(deserialize_with = "lenient_string")]
    pub lease_id: Option<String>,
    #[serde(deserialize_with = "lenient_object")]
    pub metadata: Option<HashMap<String, serde_json::Value>>,
    #[serde(deserialize_with = "lenient_u64")]
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
            ApiError::Malformed { .. } | ApiError::Unsuccessful { .. } => "malformed",
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
    s.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
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
        token: &SecretString,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let base = api_base_url.trim_end_matches('/');
        let url = |op: &str| {
            reqwest::Url::parse(&format!(
                "{base}/accounts/{account_id}/queues/{queue_id}/messages/{op}"
            ))
        };
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
            .map_err(|_| {
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
        self.call(&self.pull_url, &req).await
    }

    /// Acknowledge and retry leases in one call.
    pub async fn ack(
        &self,
        acks: &[AckEntry<'_>],
        retries: &[RetryEntry<'_>],
    ) -> Result<AckResult, ApiError> {
        self.call(&self.ack_url, &AckRequest { acks, retries })
            .await
    }

    async fn call<T: serde::de::DeserializeOwned + Default>(
        &self,
        url: &reqwest::Url,
        body: &impl Serialize,
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
        let bytes = resp.bytes().await.map_err(transport_error)?;
        interpret(status, retry_after, &bytes)
    }
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

fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(match v {
        serde_json::Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        serde_json::Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    })
}

fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(match v {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    })
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
        let token = SecretString::from("super-secret-token");
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
