//! The Cloudflare Queues HTTP pull API: lenient wire types for pull and ack, and a typed client
//! that turns every failure (status, 429, HTML page, `success: false`, transport) into an
//! [`ApiError`] the callers can log, count and back off on.

mod ack_body;
pub mod online;
pub mod retry;
mod wire;

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde::Serialize;
use zeroize::Zeroizing;

use crate::config::Secret;
use crate::retry_after::retry_after_header;
use crate::telemetry::ApiResult;

pub use wire::{
    AckResult, ApiEnvelope, ApiMessage, BacklogMetrics, MessageMetadata, PullMetadata, PullResult,
    PulledMessage, short_lease,
};

/// Largest excerpt of an unexpected answer body kept for logs.
const EXCERPT: usize = 200;

/// An item of the `acks` array.
#[derive(Debug, Clone)]
pub struct AckEntry<'a> {
    pub lease_id: &'a str,
}

/// An item of the `retries` array.
#[derive(Debug, Clone)]
pub struct RetryEntry<'a> {
    pub lease_id: &'a str,
    pub delay_seconds: u32,
}

#[derive(Serialize)]
struct PullRequest {
    batch_size: u32,
    visibility_timeout_ms: u64,
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

/// The longest an API `Retry-After` is believed: Cloudflare's rate limit counts over five
/// minutes, so a longer wait (a broken proxy, a hostile answer) would only park the consumer;
/// after it the call is tried again and a real limit answers 429 again.
pub const MAX_API_RETRY_AFTER: Duration = Duration::from_secs(300);

impl ApiError {
    /// How the call ended, for the `result` metric label.
    pub fn class(&self) -> ApiResult {
        match self {
            ApiError::RateLimited { .. } => ApiResult::RateLimited,
            ApiError::Auth { .. } => ApiResult::ClientError,
            ApiError::Status { status, .. } if *status >= 500 => ApiResult::ServerError,
            ApiError::Status { .. } => ApiResult::ClientError,
            ApiError::Malformed { .. }
            | ApiError::Unsuccessful { .. }
            | ApiError::TooLarge { .. } => ApiResult::Malformed,
            ApiError::Timeout | ApiError::Transport(_) => ApiResult::TransportError,
        }
    }

    /// A server-given minimum wait, if any, at most [`MAX_API_RETRY_AFTER`].
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::RateLimited { retry_after } | ApiError::Status { retry_after, .. } => {
                retry_after.map(|d| d.min(MAX_API_RETRY_AFTER))
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
        let mut auth = HeaderValue::from_str(&Zeroizing::new(format!("Bearer {}", token.expose())))
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
        let body = serde_json::to_vec(&req).map_err(|e| ApiError::Transport(e.to_string()))?;
        self.call(&self.pull_url, body, pull_answer_limit(batch_size))
            .await
    }

    /// Acknowledge and retry leases in one call.
    pub async fn ack(
        &self,
        acks: &[AckEntry<'_>],
        retries: &[RetryEntry<'_>],
    ) -> Result<AckResult, ApiError> {
        let body = ack_body::encode(acks, retries);
        self.call(&self.ack_url, body, ACK_ANSWER_LIMIT).await
    }

    async fn call<T: serde::de::DeserializeOwned + Default>(
        &self,
        url: &reqwest::Url,
        body: Vec<u8>,
        limit: usize,
    ) -> Result<T, ApiError> {
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
    let parsed: Result<ApiEnvelope<T>, _> = serde_json::from_slice(body);
    let errors = |p: &Result<ApiEnvelope<T>, _>| match p {
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
        assert_eq!(
            ApiError::TooLarge { limit: 1 }.class(),
            ApiResult::Malformed
        );
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
            Err(e @ ApiError::Malformed { .. }) => assert_eq!(e.class(), ApiResult::Malformed),
            other => panic!("{other:?}"),
        }
        match interpret::<PullResult>(429, Some(Duration::from_secs(3)), b"") {
            Err(e @ ApiError::RateLimited { .. }) => {
                assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
                assert_eq!(e.class(), ApiResult::RateLimited);
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
            Err(e @ ApiError::Status { status: 404, .. }) => {
                assert_eq!(e.class(), ApiResult::ClientError)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn request_bodies_match_the_api() {
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
