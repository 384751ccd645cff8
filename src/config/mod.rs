//! The configuration file: serde structs with documented defaults, loading (TOML + environment),
//! token resolution and validation that names the offending key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

pub mod secrets;

use secrets::Secret;

/// Prefix of environment variables that override configuration keys, e.g.
/// `CFQ_RELAY__CLOUDFLARE__ACCOUNT_ID` or `CFQ_RELAY__LOG__LEVEL`.
pub const ENV_PREFIX: &str = "CFQ_RELAY";
/// The environment variable that carries the Cloudflare API token (highest precedence).
pub const TOKEN_ENV: &str = "CLOUDFLARE_API_TOKEN";
/// The name of the systemd credential (`LoadCredential=cloudflare-api-token:PATH`) that carries
/// the token: read from `$CREDENTIALS_DIRECTORY/cloudflare-api-token` (after the environment).
pub const TOKEN_CREDENTIAL: &str = "cloudflare-api-token";

const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);
/// 12 h: the longest retry delay every published Cloudflare limit accepts (older pages say 12 h,
/// newer ones 24 h). One refused retry item fails the whole ack call it travels in.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(12 * 3600);
/// The default drain grace when `shutdown.grace_period` is not set: 25 s, or less when the
/// shortest lease needs it (see [`Config::grace_period_default`]).
const DEFAULT_GRACE: Duration = Duration::from_secs(25);

/// A configuration error. Its `Display` is one line that names the key (and, for a syntax error,
/// the line and column); it never contains a value from the file, which may be a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read, or a key has the wrong type or is unknown.
    #[error("{0}")]
    Parse(String),
    /// The text is not valid TOML. Only the position and the parser's message are kept: the
    /// offending line may hold the API token.
    #[error("TOML syntax error at line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    /// A value is out of its allowed range or otherwise invalid.
    #[error("`{key}` {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    /// Lines to print under the error on a terminal: for a syntax error, a gutter with the line
    /// number and a caret under the column, with the line's text left out (it may be a secret).
    pub fn detail(&self) -> Option<String> {
        let ConfigError::Syntax { line, column, .. } = self else {
            return None;
        };
        let gutter = line.to_string().len();
        Some(format!(
            "{:gutter$} |\n{line} | (line not shown: it may hold a secret)\n{:gutter$} | {:>column$}",
            "", "", "^"
        ))
    }
}

/// Messages of I/O errors and of things that are not about a value, folded into one line.
fn parse_error(e: impl fmt::Display) -> ConfigError {
    let text = e.to_string();
    ConfigError::Parse(text.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Check the TOML syntax first, so a syntax error is reported by position alone: the `config`
/// crate's message quotes the offending line, which may be `api_token = "…`.
fn check_syntax(text: &str) -> Result<(), ConfigError> {
    let Err(e) = toml::from_str::<toml::Table>(text) else {
        return Ok(());
    };
    let offset = e.span().map(|s| s.start).unwrap_or(0).min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    let message = crate::logs::one_line(e.message().trim());
    Err(ConfigError::Syntax {
        line,
        column,
        message,
    })
}

/// A `config` crate error without the value it quotes: the key, what was expected, and the
/// kind of value found (never the value: `signing_secrets = "whsec_…"` must not echo it).
fn config_error(e: config::ConfigError) -> ConfigError {
    ConfigError::Parse(describe(&e, None))
}

fn describe(e: &config::ConfigError, outer_key: Option<&str>) -> String {
    match e {
        config::ConfigError::Type {
            unexpected,
            expected,
            key,
            ..
        } => {
            // `Unexpected` displays as `string "value"` or "64-bit integer `5`": keep the kind.
            let found = unexpected.to_string();
            let kind = found
                .split(['"', '`'])
                .next()
                .unwrap_or("value")
                .trim()
                .to_owned();
            let key = key.as_deref().or(outer_key);
            match key {
                Some(k) => format!(
                    "`{}` has the wrong type: expected {expected}, found a {kind}",
                    key_path(k)
                ),
                None => format!("wrong type: expected {expected}, found a {kind}"),
            }
        }
        config::ConfigError::At { error, key, .. } => describe(error, key.as_deref().or(outer_key)),
        config::ConfigError::Message(m) => {
            // serde's "invalid type: string \"v\", expected a sequence": keep the kind only.
            if let Some(rest) = m.strip_prefix("invalid type: ")
                && let Some((found, expected)) = rest.split_once(", expected ")
            {
                let kind = found.split(['"', '`']).next().unwrap_or("value").trim();
                let expected = redact_quoted(expected);
                return match outer_key {
                    Some(k) => format!(
                        "`{}` has the wrong type: expected {expected}, found a {kind}",
                        key_path(k)
                    ),
                    None => format!("wrong type: expected {expected}, found a {kind}"),
                };
            }
            let m = redact_quoted(m);
            match outer_key {
                Some(k) => format!("`{}`: {m}", key_path(k)),
                None => m,
            }
        }
        other => redact_quoted(&other.to_string()),
    }
}

/// `consumers[0]webhook.url` (as the `config` crate writes paths) → `consumers[0].webhook.url`.
fn key_path(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    let mut chars = key.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == ']' && chars.peek().is_some_and(|n| *n != '.' && *n != '[') {
            out.push('.');
        }
    }
    out
}

/// Replace double-quoted parts of a message (where serde and humantime put values) with `"…"`,
/// and fix key paths in backquotes; everything else (field names, expectations) stays.
fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut parts = message.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    for (i, part) in parts.enumerate() {
        if i % 2 == 0 {
            out.push_str("\"…\"");
        } else {
            out.push_str(part);
        }
    }
    let out = out.split_whitespace().collect::<Vec<_>>().join(" ");
    out.split('`')
        .enumerate()
        .map(|(i, p)| {
            if i % 2 == 1 {
                key_path(p)
            } else {
                p.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("`")
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Cloudflare account and API access.
    pub cloudflare: CloudflareConfig,
    /// The admin HTTP server (/metrics, /healthz, /readyz).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Graceful shutdown.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// One entry per queue to consume; they run side by side in one process.
    #[serde(default)]
    pub consumers: Vec<ConsumerConfig>,
}

/// `[cloudflare]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudflareConfig {
    /// Cloudflare account id (32 hex characters in the dashboard URL). Required.
    #[serde(default)]
    pub account_id: String,
    /// Base URL of the API; point it at `cfq-relay emulate` for local work.
    #[serde(default = "default_api_base_url")]
    pub api_base_url: String,
    /// API token in the file itself (least preferred: use the environment or a file).
    #[serde(default)]
    pub api_token: Option<SecretString>,
    /// Path of a file that holds the API token (e.g. a systemd credential or a Kubernetes secret).
    #[serde(default)]
    pub api_token_file: Option<PathBuf>,
    /// Timeout of one pull or ack API call.
    #[serde(default = "default_api_timeout", with = "humantime_serde")]
    pub api_timeout: Duration,
}

fn default_api_base_url() -> String {
    "https://api.cloudflare.com/client/v4".into()
}
fn default_api_timeout() -> Duration {
    Duration::from_secs(15)
}

impl fmt::Debug for CloudflareConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudflareConfig")
            .field("account_id", &self.account_id)
            .field("api_base_url", &redact_url(&self.api_base_url))
            .field("api_token", &self.api_token.as_ref().map(|_| "[REDACTED]"))
            .field("api_token_file", &self.api_token_file)
            .field("api_timeout", &self.api_timeout)
            .finish()
    }
}

/// `[admin]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin HTTP server serving /metrics, /healthz and /readyz.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Level filter (`error`, `warn`, `info`, `debug`, `trace`, or a tracing directive list).
    /// `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `text` (human-readable) or `json` (one JSON object per line).
    #[serde(default)]
    pub format: LogFormat,
}

fn default_log_level() -> String {
    "info".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_log_level(),
            format: LogFormat::default(),
        }
    }
}

/// How a consumer's deliveries in flight are bounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConcurrencyMode {
    #[default]
    Adaptive,
    Fixed,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[shutdown]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long in-flight deliveries may take to finish after SIGTERM/SIGINT before they are
    /// abandoned and their messages handed back. Must be shorter than every visibility timeout.
    /// Unset: 25s, or half the shortest `visibility_timeout` when that is less.
    #[serde(default = "default_grace_period", with = "humantime_serde")]
    pub grace_period: Duration,
}

fn default_grace_period() -> Duration {
    Duration::from_secs(25)
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace_period: default_grace_period(),
        }
    }
}

/// `[[consumers]]`: one queue delivered to one webhook.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// A short name used in logs and as the `queue` metric label; defaults to `queue_id`.
    #[serde(default)]
    pub name: Option<String>,
    /// The queue id (32 hex characters; `wrangler queues info NAME` shows it). Required.
    #[serde(default)]
    pub queue_id: String,
    /// Messages asked for per pull, 1..=100.
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Lease length of a pulled message, 1s..=12h. A message not acked in time is redelivered.
    #[serde(default = "default_visibility_timeout", with = "humantime_serde")]
    pub visibility_timeout: Duration,
    /// Upper bound of deliveries in flight (and messages held) for this consumer, 1..=10000
    /// (with `webhook.batch`, messages held in batches and in flight).
    /// With `concurrency_mode = "adaptive"` (the default) the relay finds the webhook's limit
    /// below it; with `"fixed"` it always uses this many.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// `adaptive` (default): deliveries in flight follow the webhook's latency and its 429/503
    /// answers, up to `concurrency`. `fixed`: always `concurrency`.
    #[serde(default)]
    pub concurrency_mode: ConcurrencyMode,
    /// Maximum pull calls in flight at once, 1..=32; several are used when the free
    /// delivery slots exceed one batch.
    #[serde(default = "default_max_pulls_in_flight")]
    pub max_pulls_in_flight: usize,
    /// Upper bound of the (jittered, exponential) wait between pulls of an empty queue.
    #[serde(default = "default_max_idle_backoff", with = "humantime_serde")]
    pub max_idle_backoff: Duration,
    /// The webhook every message is POSTed to.
    #[serde(default)]
    pub webhook: WebhookConfig,
    /// Delays of retried messages.
    #[serde(default)]
    pub retry: RetryConfig,
    /// The circuit breaker that stops pulling while the webhook keeps failing.
    #[serde(default)]
    pub breaker: crate::pipeline::gate::BreakerConfig,
}

fn default_batch_size() -> u32 {
    100
}
fn default_visibility_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_concurrency() -> usize {
    // 5,000 msg/s (Cloudflare's per-queue ceiling) at 150 ms round trips needs 750 in flight.
    1000
}
fn default_max_pulls_in_flight() -> usize {
    4
}
fn default_max_idle_backoff() -> Duration {
    Duration::from_secs(2)
}

impl ConsumerConfig {
    /// The label used for this consumer in logs and metrics.
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.queue_id)
    }
}

/// `[consumers.webhook]`
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// URL the bodies are POSTed to (http or https). Required.
    #[serde(default)]
    pub url: String,
    /// Timeout of one webhook request (connect to last response byte); shorter than
    /// `visibility_timeout`. Unset: 10s, or less when the lease needs it.
    #[serde(default = "default_webhook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Extra request headers, e.g. `{ "X-Tenant" = "blue" }`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Statuses besides 2xx that count as delivered (e.g. `[409]` for idempotent receivers).
    #[serde(default)]
    pub success_statuses: Vec<u16>,
    /// Statuses that drop the message: it is acked without delivery, counted and logged.
    /// Empty by default: nothing is dropped unless configured.
    #[serde(default)]
    pub drop_statuses: Vec<u16>,
    /// Statuses that always retry, even if listed as success (e.g. `[202]` for a receiver
    /// that only queued the work).
    #[serde(default)]
    pub retry_statuses: Vec<u16>,
    /// Standard Webhooks signing secrets (`whsec_…`), inline. Several → several signatures.
    #[serde(default)]
    pub signing_secrets: Vec<Secret>,
    /// A file with signing secrets, one per line (wins over `signing_secrets`).
    #[serde(default)]
    pub signing_secret_file: Option<PathBuf>,
    /// An environment variable with signing secrets, separated by spaces (wins over the file).
    #[serde(default)]
    pub signing_secret_env: Option<String>,
    /// `Authorization: Bearer …` token, inline (or `bearer_token_file`, `bearer_token_env`).
    #[serde(default)]
    pub bearer_token: Option<Secret>,
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    #[serde(default)]
    pub bearer_token_env: Option<String>,
    /// HTTP basic auth.
    #[serde(default)]
    pub basic_auth: Option<BasicAuthConfig>,
    /// PEM bundle of extra CA certificates trusted for the webhook (private receivers).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS; needs `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// POST a JSON envelope `{id, queue, attempts, timestamp_ms, content_type, body}` instead of
    /// the raw body.
    #[serde(default)]
    pub envelope: bool,
    /// Upper bound of requests per second to this webhook (unset: no limit).
    #[serde(default)]
    pub max_requests_per_second: Option<f64>,
    /// Speak HTTP/2 to an `http://` webhook without negotiation (h2c prior knowledge). Over
    /// `https://` HTTP/2 is used whenever the receiver offers it (ALPN); no key needed.
    #[serde(default)]
    pub http2_prior_knowledge: bool,
    /// Batch delivery: many messages per request with per-message results (unset: one
    /// message per request).
    #[serde(default)]
    pub batch: Option<BatchConfig>,
}

/// `[consumers.webhook.batch]`: opt-in batch delivery.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Messages per webhook request, 1..=100.
    #[serde(default = "default_max_messages")]
    pub max_messages: usize,
    /// How long a partial batch may wait for more messages, 0s..=10s.
    #[serde(default = "default_max_wait", with = "humantime_serde")]
    pub max_wait: Duration,
    /// Cap on the request body in bytes (unset: no cap beyond `max_messages`); a message larger
    /// than the cap on its own travels alone.
    #[serde(default)]
    pub max_bytes: Option<usize>,
}

fn default_max_messages() -> usize {
    50
}
fn default_max_wait() -> Duration {
    Duration::from_millis(50)
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_messages: default_max_messages(),
            max_wait: default_max_wait(),
            max_bytes: None,
        }
    }
}

/// `[consumers.webhook.basic_auth]`
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuthConfig {
    pub username: String,
    /// The password inline (or `password_file`, `password_env`).
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values often carry credentials, and URLs may too: show neither.
        let headers: Vec<&str> = self.headers.keys().map(String::as_str).collect();
        f.debug_struct("WebhookConfig")
            .field("url", &redact_url(&self.url))
            .field("timeout", &self.timeout)
            .field("headers", &headers)
            .field("success_statuses", &self.success_statuses)
            .field("drop_statuses", &self.drop_statuses)
            .field("retry_statuses", &self.retry_statuses)
            .field("signing_secrets", &self.signing_secrets)
            .field("signing_secret_file", &self.signing_secret_file)
            .field("signing_secret_env", &self.signing_secret_env)
            .field("bearer_token", &self.bearer_token)
            .field("bearer_token_file", &self.bearer_token_file)
            .field("bearer_token_env", &self.bearer_token_env)
            .field("basic_auth", &self.basic_auth)
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .field("client_key_file", &self.client_key_file)
            .field("envelope", &self.envelope)
            .field("max_requests_per_second", &self.max_requests_per_second)
            .field("http2_prior_knowledge", &self.http2_prior_knowledge)
            .field("batch", &self.batch)
            .finish()
    }
}

fn default_webhook_timeout() -> Duration {
    Duration::from_secs(10)
}

/// The webhook timeout when none is configured: 10 s, or what the lease leaves after the pull
/// and ack margins when that is less (so `visibility_timeout = "5s"` alone is valid).
pub fn webhook_timeout_default(visibility_timeout: Duration) -> Duration {
    let margin = lease_margin(visibility_timeout);
    default_webhook_timeout()
        .min(visibility_timeout.saturating_sub(margin * 2))
        .max(Duration::from_millis(100))
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            timeout: default_webhook_timeout(),
            headers: BTreeMap::new(),
            success_statuses: Vec::new(),
            drop_statuses: Vec::new(),
            retry_statuses: Vec::new(),
            signing_secrets: Vec::new(),
            signing_secret_file: None,
            signing_secret_env: None,
            bearer_token: None,
            bearer_token_file: None,
            bearer_token_env: None,
            basic_auth: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            envelope: false,
            max_requests_per_second: None,
            http2_prior_knowledge: false,
            batch: None,
        }
    }
}

impl WebhookConfig {
    /// Every file this webhook reads when its consumer is built (secrets, certificates). A
    /// config reload restarts the consumer when one of them changed, so a rotated secret or
    /// certificate takes effect on SIGHUP: list new file-valued keys here.
    pub fn files(&self) -> Vec<&Path> {
        [
            self.signing_secret_file.as_deref(),
            self.bearer_token_file.as_deref(),
            self.basic_auth
                .as_ref()
                .and_then(|b| b.password_file.as_deref()),
            self.ca_file.as_deref(),
            self.client_cert_file.as_deref(),
            self.client_key_file.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// `[consumers.retry]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Delay before the first redelivery of a failed message; doubles with each attempt.
    #[serde(default = "default_base_delay", with = "humantime_serde")]
    pub base_delay: Duration,
    /// Cap of the retry delay (and of a webhook's Retry-After), at most 12h.
    #[serde(default = "default_max_delay", with = "humantime_serde")]
    pub max_delay: Duration,
}

fn default_base_delay() -> Duration {
    Duration::from_secs(5)
}
fn default_max_delay() -> Duration {
    Duration::from_secs(3600)
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            base_delay: default_base_delay(),
            max_delay: default_max_delay(),
        }
    }
}

impl Config {
    /// Read `path` (TOML), apply `CFQ_RELAY__SECTION__KEY` environment overrides, and validate.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let raw = std::fs::read_to_string(path)
            .map_err(|e| parse_error(format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml_with_env(&raw)
    }

    /// Only `admin.listen` of the file at `path` (environment overrides applied), without
    /// validating the rest: `healthcheck` must find a running relay even when the file on disk
    /// has since been edited into something a reload would refuse.
    pub fn load_admin_listen(path: &Path) -> Result<SocketAddr, ConfigError> {
        let raw = std::fs::read_to_string(path)
            .map_err(|e| parse_error(format!("cannot read {}: {e}", path.display())))?;
        let env = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__");
        check_syntax(&raw)?;
        let built = config::Config::builder()
            .add_source(config::File::from_str(&raw, config::FileFormat::Toml))
            .add_source(env)
            .build()
            .map_err(config_error)?;
        match built.get_string("admin.listen") {
            Ok(text) => text.parse().map_err(|e| {
                invalid(
                    "admin.listen",
                    format!("must be an address like 127.0.0.1:9464, got {text:?}: {e}"),
                )
            }),
            Err(config::ConfigError::NotFound(_)) => Ok(default_admin_listen()),
            Err(e) => Err(config_error(e)),
        }
    }

    /// Parse TOML text, apply environment overrides, validate.
    pub fn from_toml_with_env(text: &str) -> Result<Config, ConfigError> {
        let env = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true);
        check_syntax(text)?;
        let built = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(env)
            .build()
            .map_err(config_error)?;
        Self::finish(built)
    }

    /// Parse TOML text without environment overrides, validate.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        check_syntax(text)?;
        let built = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .map_err(config_error)?;
        Self::finish(built)
    }

    /// Deserialize, fill the defaults that depend on other keys, validate.
    fn finish(built: config::Config) -> Result<Config, ConfigError> {
        let grace_set = built.get_string("shutdown.grace_period").is_ok();
        let consumers = built.get_array("consumers").map(|a| a.len()).unwrap_or(0);
        let timeout_set: Vec<bool> = (0..consumers)
            .map(|i| {
                built
                    .get_string(&format!("consumers[{i}].webhook.timeout"))
                    .is_ok()
            })
            .collect();
        let mut config: Config = built.try_deserialize().map_err(config_error)?;
        for (c, set) in config.consumers.iter_mut().zip(timeout_set) {
            if !set {
                c.webhook.timeout = webhook_timeout_default(c.visibility_timeout);
            }
        }
        if !grace_set {
            config.shutdown.grace_period = config.grace_period_default();
        }
        config.validate()?;
        Ok(config)
    }

    /// The drain grace when none is configured: 25 s, or half the shortest lease when that is
    /// shorter, so a config that sets only `visibility_timeout = "5s"` is valid as written
    /// (deliveries get 2.5 s to finish, and their acks still land inside the lease).
    pub fn grace_period_default(&self) -> Duration {
        self.consumers
            .iter()
            .map(|c| c.visibility_timeout / 2)
            .min()
            .unwrap_or(DEFAULT_GRACE)
            .min(DEFAULT_GRACE)
    }

    /// Check every value against its allowed range. The first problem wins.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let cf = &self.cloudflare;
        if cf.account_id.trim().is_empty() {
            return Err(invalid("cloudflare.account_id", "is required"));
        }
        if !cf.account_id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(invalid(
                "cloudflare.account_id",
                "must be letters and digits only (the 32-character id)",
            ));
        }
        check_http_url("cloudflare.api_base_url", &cf.api_base_url)?;
        check_range(
            "cloudflare.api_timeout",
            cf.api_timeout,
            Duration::from_secs(1),
            Duration::from_secs(300),
        )?;
        if let Some(token) = &cf.api_token
            && token.expose_secret().trim().is_empty()
        {
            return Err(invalid("cloudflare.api_token", "is empty"));
        }
        check_log_filter("log.level", &self.log.level)?;
        check_range(
            "shutdown.grace_period",
            self.shutdown.grace_period,
            Duration::ZERO,
            Duration::from_secs(3600),
        )?;
        if self.consumers.is_empty() {
            return Err(invalid(
                "consumers",
                "needs at least one [[consumers]] entry",
            ));
        }
        let mut labels = std::collections::HashMap::new();
        let mut queues = std::collections::HashMap::new();
        for (i, c) in self.consumers.iter().enumerate() {
            let key = |k: &str| format!("consumers[{i}].{k}");
            if c.queue_id.trim().is_empty() {
                return Err(invalid(key("queue_id"), "is required"));
            }
            if !c
                .queue_id
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
            {
                return Err(invalid(
                    key("queue_id"),
                    "must be letters, digits, '-' or '_' (the queue id, not its URL)",
                ));
            }
            if let Some(name) = &c.name
                && (name.is_empty()
                    || name.len() > 64
                    || !name
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)))
            {
                return Err(invalid(
                    key("name"),
                    format!(
                        "must be 1 to 64 characters of letters, digits, '-', '_', '.', got {name:?}"
                    ),
                ));
            }
            // Checked before the names: two consumers of one queue must not be "fixed" by
            // giving them distinct names.
            if let Some(first) = queues.insert(c.queue_id.to_ascii_lowercase(), i) {
                return Err(invalid(
                    key("queue_id"),
                    format!(
                        "is also the queue of consumers[{first}]: two consumers of one queue \
                         compete for its messages, so each webhook would get only part of them. \
                         For fan-out, give each destination its own queue (the producer sends to \
                         each); for more throughput, raise `concurrency` of one consumer"
                    ),
                ));
            }
            if let Some(first) = labels.insert(c.label().to_owned(), i) {
                return Err(invalid(
                    key("name"),
                    format!(
                        "is also the name of consumers[{first}]: names label logs and metrics \
                         and must be unique (a consumer without `name` is named by its queue_id)"
                    ),
                ));
            }
            if !(1..=100).contains(&c.batch_size) {
                return Err(invalid(
                    key("batch_size"),
                    format!("must be between 1 and 100, got {}", c.batch_size),
                ));
            }
            check_range(
                &key("visibility_timeout"),
                c.visibility_timeout,
                Duration::from_secs(1),
                MAX_VISIBILITY,
            )?;
            if !(1..=10_000).contains(&c.concurrency) {
                return Err(invalid(
                    key("concurrency"),
                    format!("must be between 1 and 10000, got {}", c.concurrency),
                ));
            }
            if !(1..=32).contains(&c.max_pulls_in_flight) {
                return Err(invalid(
                    key("max_pulls_in_flight"),
                    format!("must be between 1 and 32, got {}", c.max_pulls_in_flight),
                ));
            }
            check_range(
                &key("max_idle_backoff"),
                c.max_idle_backoff,
                Duration::from_millis(100),
                Duration::from_secs(60),
            )?;
            let w = &c.webhook;
            if w.url.trim().is_empty() {
                return Err(invalid(key("webhook.url"), "is required"));
            }
            check_http_url(&key("webhook.url"), &w.url)?;
            // A password in the URL would travel into the HTTP client's debug logs (its pool
            // keys are the URL's authority): credentials have their own keys.
            if reqwest::Url::parse(&w.url)
                .is_ok_and(|u| !u.username().is_empty() || u.password().is_some())
            {
                return Err(invalid(
                    key("webhook.url"),
                    "must not contain a user name or password: use [consumers.webhook.basic_auth] (`username` with `password_file`, `password_env` or `password`)",
                ));
            }
            check_range(
                &key("webhook.timeout"),
                w.timeout,
                Duration::from_millis(100),
                MAX_VISIBILITY,
            )?;
            if w.timeout >= c.visibility_timeout {
                return Err(invalid(
                    key("webhook.timeout"),
                    format!(
                        "must be shorter than visibility_timeout ({}), got {}",
                        fmt_duration(c.visibility_timeout),
                        fmt_duration(w.timeout)
                    ),
                ));
            }
            // A delivery starts only if the timeout plus the ack margin fit in what is left of
            // the lease after the pull; with no room, every message would be handed back
            // undelivered until the queue dead-letters it.
            let margin = lease_margin(c.visibility_timeout);
            let room = c.visibility_timeout.saturating_sub(margin * 2);
            if w.timeout > room {
                return Err(invalid(
                    key("webhook.timeout"),
                    format!(
                        "must leave room for the pull and the ack within visibility_timeout ({}): at most {}, got {}",
                        fmt_duration(c.visibility_timeout),
                        fmt_duration(room),
                        fmt_duration(w.timeout)
                    ),
                ));
            }
            if self.shutdown.grace_period >= c.visibility_timeout {
                return Err(invalid(
                    "shutdown.grace_period",
                    format!(
                        "must be shorter than the visibility_timeout of consumers[{i}] ({}), got {}",
                        fmt_duration(c.visibility_timeout),
                        fmt_duration(self.shutdown.grace_period)
                    ),
                ));
            }
            for (name, value) in &w.headers {
                if HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err(invalid(
                        key("webhook.headers"),
                        format!("has an invalid header name {name:?}"),
                    ));
                }
                if HeaderValue::from_str(value).is_err() {
                    // The value may be a secret: name the header, never echo the value.
                    return Err(invalid(
                        format!("{}.{name}", key("webhook.headers")),
                        "has an invalid header value (control characters or non-ASCII)",
                    ));
                }
            }
            for (field, list) in [
                ("webhook.success_statuses", &w.success_statuses),
                ("webhook.drop_statuses", &w.drop_statuses),
                ("webhook.retry_statuses", &w.retry_statuses),
            ] {
                if let Some(s) = list.iter().find(|s| !(100..=599).contains(*s)) {
                    return Err(invalid(
                        key(field),
                        format!("must hold HTTP statuses between 100 and 599, got {s}"),
                    ));
                }
            }
            if let Some(s) = w
                .drop_statuses
                .iter()
                .find(|s| (200..300).contains(*s) || w.success_statuses.contains(s))
            {
                return Err(invalid(
                    key("webhook.drop_statuses"),
                    format!("{s} already counts as delivered"),
                ));
            }
            if let Some(rps) = w.max_requests_per_second
                && !(rps > 0.0 && rps <= 100_000.0)
            {
                return Err(invalid(
                    key("webhook.max_requests_per_second"),
                    format!("must be above 0 and at most 100000, got {rps}"),
                ));
            }
            if let Some(b) = &w.batch {
                if !(1..=100).contains(&b.max_messages) {
                    return Err(invalid(
                        key("webhook.batch.max_messages"),
                        format!("must be between 1 and 100, got {}", b.max_messages),
                    ));
                }
                check_range(
                    &key("webhook.batch.max_wait"),
                    b.max_wait,
                    Duration::ZERO,
                    Duration::from_secs(10),
                )?;
                if let Some(bytes) = b.max_bytes
                    && !(1024..=100 * 1024 * 1024).contains(&bytes)
                {
                    return Err(invalid(
                        key("webhook.batch.max_bytes"),
                        format!("must be between 1024 and 104857600, got {bytes}"),
                    ));
                }
                if w.envelope {
                    return Err(invalid(
                        key("webhook.envelope"),
                        "and `webhook.batch` are both set: a batch already carries each message's metadata; choose one",
                    ));
                }
            }
            if w.client_cert_file.is_some() != w.client_key_file.is_some() {
                return Err(invalid(
                    key("webhook.client_cert_file"),
                    "and `client_key_file` must be set together (mutual TLS)",
                ));
            }
            for (i, secret) in w.signing_secrets.iter().enumerate() {
                if let Err(e) = secrets::decode_secret(secret.expose()) {
                    return Err(invalid(
                        format!("{}[{i}]", key("webhook.signing_secrets")),
                        e,
                    ));
                }
            }
            let b = &c.breaker;
            if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
                return Err(invalid(
                    key("breaker.failure_ratio"),
                    format!("must be above 0 and at most 1, got {}", b.failure_ratio),
                ));
            }
            if b.consecutive_failures == 0 {
                return Err(invalid(
                    key("breaker.consecutive_failures"),
                    "must be at least 1",
                ));
            }
            check_range(
                &key("breaker.open_for"),
                b.open_for,
                Duration::from_secs(1),
                Duration::from_secs(3600),
            )?;
            check_range(
                &key("breaker.window"),
                b.window,
                Duration::from_secs(1),
                Duration::from_secs(3600),
            )?;
            let r = &c.retry;
            check_range(
                &key("retry.max_delay"),
                r.max_delay,
                Duration::ZERO,
                MAX_RETRY_DELAY,
            )?;
            check_range(
                &key("retry.base_delay"),
                r.base_delay,
                Duration::ZERO,
                r.max_delay,
            )
            .map_err(|_| {
                invalid(
                    key("retry.base_delay"),
                    format!(
                        "must be between 0s and retry.max_delay ({}), got {}",
                        fmt_duration(r.max_delay),
                        fmt_duration(r.base_delay)
                    ),
                )
            })?;
        }
        Ok(())
    }

    /// Resolve the API token: `CLOUDFLARE_API_TOKEN`, then the systemd credential
    /// `$CREDENTIALS_DIRECTORY/cloudflare-api-token`, then `api_token_file`, then `api_token`.
    pub fn resolve_token(&self) -> Result<SecretString, ConfigError> {
        resolve_token_with(
            &self.cloudflare,
            std::env::var(TOKEN_ENV).ok(),
            std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
        )
    }

    /// The config file (when it holds a secret inline) and every secret file that users other
    /// than the owner and group can read, as (key, path). `run` and `check-config` warn about
    /// each: a token readable by every local account is a leaked token.
    pub fn readable_by_others(&self, config_path: &Path) -> Vec<(String, PathBuf)> {
        use std::os::unix::fs::PermissionsExt;
        let open =
            |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o004 != 0);
        let mut files: Vec<(String, &Path)> = Vec::new();
        let inline = self.cloudflare.api_token.is_some()
            || self.consumers.iter().any(|c| {
                let w = &c.webhook;
                !w.signing_secrets.is_empty()
                    || w.bearer_token.is_some()
                    || !w.headers.is_empty()
                    || w.basic_auth.as_ref().is_some_and(|b| b.password.is_some())
            });
        if inline {
            files.push(("the config file".into(), config_path));
        }
        if let Some(p) = &self.cloudflare.api_token_file {
            files.push(("cloudflare.api_token_file".into(), p));
        }
        for (i, c) in self.consumers.iter().enumerate() {
            let w = &c.webhook;
            let key = |k: &str| format!("consumers[{i}].webhook.{k}");
            if let Some(p) = &w.signing_secret_file {
                files.push((key("signing_secret_file"), p));
            }
            if let Some(p) = &w.bearer_token_file {
                files.push((key("bearer_token_file"), p));
            }
            if let Some(p) = w.basic_auth.as_ref().and_then(|b| b.password_file.as_ref()) {
                files.push((key("basic_auth.password_file"), p));
            }
            if let Some(p) = &w.client_key_file {
                files.push((key("client_key_file"), p));
            }
        }
        files
            .into_iter()
            .filter(|(_, p)| open(p))
            .map(|(k, p)| (k, p.to_path_buf()))
            .collect()
    }

    /// One line for `check-config` and the startup log; never contains secrets.
    pub fn summary(&self) -> String {
        let consumers: Vec<String> = self
            .consumers
            .iter()
            .map(|c| {
                format!(
                    "{} (batch {}, visibility {}, concurrency {}) -> {}",
                    c.label(),
                    c.batch_size,
                    fmt_duration(c.visibility_timeout),
                    c.concurrency,
                    redact_url(&c.webhook.url)
                )
            })
            .collect();
        format!(
            "config ok: account {}, api {}, admin {}, {} consumer(s): {}",
            self.cloudflare.account_id,
            redact_url(&self.cloudflare.api_base_url),
            self.admin.listen,
            self.consumers.len(),
            consumers.join("; ")
        )
    }
}

#[cfg(test)]
fn resolve_token_from(
    cf: &CloudflareConfig,
    env: Option<String>,
) -> Result<SecretString, ConfigError> {
    resolve_token_with(cf, env, None)
}

/// `credentials_dir` is systemd's `$CREDENTIALS_DIRECTORY`: a missing `cloudflare-api-token` in
/// it falls through to the config (the unit may load other credentials only).
fn resolve_token_with(
    cf: &CloudflareConfig,
    env: Option<String>,
    credentials_dir: Option<PathBuf>,
) -> Result<SecretString, ConfigError> {
    if let Some(t) = env {
        let t = t.trim().to_owned();
        if t.is_empty() {
            return Err(invalid(TOKEN_ENV, "is set but empty"));
        }
        return Ok(SecretString::from(t));
    }
    if let Some(dir) = credentials_dir {
        let path = dir.join(TOKEN_CREDENTIAL);
        let key = format!("$CREDENTIALS_DIRECTORY/{TOKEN_CREDENTIAL}");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let t = text.trim().to_owned();
                if t.is_empty() {
                    return Err(invalid(key, format!("{} is empty", path.display())));
                }
                return Ok(SecretString::from(t));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(invalid(
                    key,
                    format!("cannot be read ({}): {}", path.display(), e.kind()),
                ));
            }
        }
    }
    if let Some(path) = &cf.api_token_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            invalid(
                "cloudflare.api_token_file",
                format!("cannot be read ({}): {}", path.display(), e.kind()),
            )
        })?;
        let t = text.trim().to_owned();
        if t.is_empty() {
            return Err(invalid(
                "cloudflare.api_token_file",
                format!("{} is empty", path.display()),
            ));
        }
        return Ok(SecretString::from(t));
    }
    if let Some(t) = &cf.api_token {
        return Ok(SecretString::from(t.expose_secret().trim().to_owned()));
    }
    Err(invalid(
        "cloudflare.api_token",
        format!(
            "no API token: set {TOKEN_ENV}, the systemd credential {TOKEN_CREDENTIAL}, cloudflare.api_token_file or cloudflare.api_token"
        ),
    ))
}

/// The levels a log filter may name (`tracing`'s, case-insensitive).
const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// A log filter (`log.level`, `RUST_LOG`): a level, or a comma-separated list of directives
/// each of which is a level or `target=level`. `tracing` reads a bare word as a target name, so
/// `warning` or `verbose` would silently enable nothing: they are refused here. The message
/// names the directive's position, not its text (config values are never echoed).
pub fn check_log_filter(key: &str, filter: &str) -> Result<(), ConfigError> {
    const HINT: &str = "levels are off, error, warn, info, debug, trace (not `warning` or `verbose`); \
                        a target takes `target=level`, e.g. `info,cfq_relay=debug`";
    if filter.trim().is_empty() {
        return Err(invalid(key, "is empty"));
    }
    if filter.contains(char::is_whitespace) {
        // tracing's parser refuses them, and the daemon would fall back to `info`.
        return Err(invalid(
            key,
            "must not contain spaces (e.g. `info,cfq_relay=debug`)",
        ));
    }
    for (i, directive) in filter.split(',').enumerate() {
        let directive = directive.trim();
        let n = i + 1;
        if directive.is_empty() {
            return Err(invalid(key, format!("has an empty directive (number {n})")));
        }
        let level = match directive.rsplit_once('=') {
            Some((target, level)) if !target.trim().is_empty() => level.trim(),
            Some(_) => {
                return Err(invalid(
                    key,
                    format!("directive {n} has no target before `=`: {HINT}"),
                ));
            }
            None => directive,
        };
        if !LOG_LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
            return Err(invalid(
                key,
                format!("directive {n} is not a known level: {HINT}"),
            ));
        }
    }
    if tracing_subscriber::EnvFilter::try_new(filter).is_err() {
        return Err(invalid(key, format!("is not a valid filter: {HINT}")));
    }
    Ok(())
}

fn check_range(key: &str, v: Duration, min: Duration, max: Duration) -> Result<(), ConfigError> {
    if v < min || v > max {
        return Err(invalid(
            key,
            format!(
                "must be between {} and {}, got {}",
                fmt_duration(min),
                fmt_duration(max),
                fmt_duration(v)
            ),
        ));
    }
    Ok(())
}

fn check_http_url(key: &str, url: &str) -> Result<(), ConfigError> {
    match reqwest::Url::parse(url) {
        Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => Ok(()),
        Ok(u) => Err(invalid(
            key,
            format!("must be an http or https URL, got scheme {:?}", u.scheme()),
        )),
        // The URL parser's message names the problem, never the URL.
        Err(e) => Err(invalid(key, format!("is not a valid URL: {e}"))),
    }
}

/// The time kept free before a lease's end for the ack to reach Cloudflare.
pub fn lease_margin(visibility_timeout: Duration) -> Duration {
    (visibility_timeout / 10).clamp(Duration::from_millis(200), Duration::from_secs(5))
}

/// `scheme://host[:port]` of a URL: enough to recognise a webhook in a log line, nothing of its
/// path or query (which may carry a token).
pub fn url_origin(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{}://{h}:{p}", u.scheme()),
            (Some(h), None) => format!("{}://{h}", u.scheme()),
            _ => "<invalid url>".into(),
        },
        Err(_) => "<invalid url>".into(),
    }
}

/// Strip userinfo and query (which may carry credentials) from a URL for display.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            if u.query().is_some() {
                u.set_query(Some("REDACTED"));
            }
            u.to_string()
        }
        Err(_) => "<invalid url>".into(),
    }
}

/// Human-readable duration, e.g. `1h 30m`, `250ms`.
pub fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[cloudflare]
account_id = "0123456789abcdef0123456789abcdef"
api_token = "secret-token-value"

[[consumers]]
queue_id = "q1"
[consumers.webhook]
url = "http://127.0.0.1:8080/hook"
"#;

    fn with(extra_cloudflare: &str, consumer: &str) -> String {
        format!(
            "[cloudflare]\naccount_id = \"abc\"\napi_token = \"t\"\n{extra_cloudflare}\n[[consumers]]\nqueue_id = \"q1\"\n{consumer}\n[consumers.webhook]\nurl = \"http://127.0.0.1/h\"\n"
        )
    }

    #[test]
    fn defaults_apply() {
        let c = Config::from_toml(GOOD).unwrap();
        let q = &c.consumers[0];
        assert_eq!(q.batch_size, 100);
        assert_eq!(q.visibility_timeout, Duration::from_secs(60));
        assert_eq!(q.concurrency, 1000);
        assert_eq!(q.concurrency_mode, ConcurrencyMode::Adaptive);
        assert_eq!(q.webhook.timeout, Duration::from_secs(10));
        assert_eq!(q.retry.base_delay, Duration::from_secs(5));
        assert_eq!(q.retry.max_delay, Duration::from_secs(3600));
        assert_eq!(c.admin.listen, "127.0.0.1:9464".parse().unwrap());
        assert_eq!(c.shutdown.grace_period, Duration::from_secs(25));
        assert_eq!(
            c.cloudflare.api_base_url,
            "https://api.cloudflare.com/client/v4"
        );
        assert_eq!(q.label(), "q1");
    }

    fn err_of(text: &str) -> String {
        Config::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn each_bad_value_names_its_key() {
        let cases: &[(String, &str)] = &[
            (
                GOOD.replace("account_id = \"0123456789abcdef0123456789abcdef\"", ""),
                "`cloudflare.account_id` is required",
            ),
            (with("", "batch_size = 0"), "`consumers[0].batch_size` must be between 1 and 100, got 0"),
            (with("", "batch_size = 101"), "`consumers[0].batch_size` must be between 1 and 100, got 101"),
            (
                with("", "visibility_timeout = \"13h\""),
                "`consumers[0].visibility_timeout` must be between 1s and 12h, got 13h",
            ),
            (with("", "concurrency = 0"), "`consumers[0].concurrency` must be between 1 and 10000"),
            (
                format!("{}timeout = \"10s\"\n", with("", "visibility_timeout = \"10s\"")),
                "`consumers[0].webhook.timeout` must be shorter than visibility_timeout (10s), got 10s",
            ),
            (
                format!("{}timeout = \"10s\"\n", with("", "visibility_timeout = \"11s\"")),
                "`consumers[0].webhook.timeout` must leave room for the pull and the ack within visibility_timeout (11s): at most 8s 800ms, got 10s",
            ),
            (
                with("", "").replace("http://127.0.0.1/h", "ftp://example.com/x"),
                "`consumers[0].webhook.url` must be an http or https URL, got scheme \"ftp\"",
            ),
            (with("", "").replace("http://127.0.0.1/h", "not a url"), "`consumers[0].webhook.url` is not a valid URL"),
            (with("api_base_url = \"file:///x\"", ""), "`cloudflare.api_base_url` must be an http or https URL"),
            (
                with("", "").replace("url = \"http://127.0.0.1/h\"", ""),
                "`consumers[0].webhook.url` is required",
            ),
            (
                format!("{}\n[consumers.retry]\nmax_delay = \"13h\"\n", with("", "")),
                "`consumers[0].retry.max_delay` must be between 0s and 12h, got 13h",
            ),
            (
                format!("{}\n[consumers.retry]\nbase_delay = \"2h\"\n", with("", "")),
                "`consumers[0].retry.base_delay` must be between 0s and retry.max_delay (1h), got 2h",
            ),
            (with("", "").replace("api_token = \"t\"", "api_token = \"  \""), "`cloudflare.api_token` is empty"),
            (
                format!("{}\n[shutdown]\ngrace_period = \"60s\"\n", with("", "")),
                "`shutdown.grace_period` must be shorter than the visibility_timeout of consumers[0] (1m), got 1m",
            ),
            (
                "[cloudflare]\naccount_id = \"abc\"\n".to_string(),
                "`consumers` needs at least one [[consumers]] entry",
            ),
            (
                format!("{}\n[consumers.webhook.headers]\n\"bad name\" = \"x\"\n", with("", "")).replace("[consumers.webhook]\nurl = \"http://127.0.0.1/h\"\n\n[consumers.webhook.headers]", "[consumers.webhook]\nurl = \"http://127.0.0.1/h\"\n[consumers.webhook.headers]"),
                "`consumers[0].webhook.headers` has an invalid header name",
            ),
            (
                format!("{}drop_statuses = [200]\n", with("", "")),
                "`consumers[0].webhook.drop_statuses` 200 already counts as delivered",
            ),
            (
                format!("{}success_statuses = [700]\n", with("", "")),
                "`consumers[0].webhook.success_statuses` must hold HTTP statuses between 100 and 599, got 700",
            ),
            (with("", "name = \"a b\""), "`consumers[0].name` must be 1 to 64 characters"),
            (
                with("", "").replace("http://127.0.0.1/h", "http://user:pw@127.0.0.1/h"),
                "`consumers[0].webhook.url` must not contain a user name or password: use [consumers.webhook.basic_auth]",
            ),
            (
                with("", "").replace("http://127.0.0.1/h", "http://user@127.0.0.1/h"),
                "`consumers[0].webhook.url` must not contain a user name or password",
            ),
            (with("", "max_pulls_in_flight = 0"), "`consumers[0].max_pulls_in_flight` must be between 1 and 32"),
            (
                format!("{}\n[log]\nlevel = \"loud=?=\"\n", with("", "")),
                "`log.level` directive 1 is not a known level",
            ),
        ];
        for (text, want) in cases {
            let got = err_of(text);
            assert!(
                got.contains(want),
                "config:\n{text}\nwant error containing {want:?}\ngot {got:?}"
            );
            assert!(!got.contains('\n'), "error must be one line: {got:?}");
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        let got = err_of(&format!("{}\nbogus = 1\n", GOOD));
        assert!(got.contains("bogus"), "{got}");
        let got = err_of(&with("", "batchsize = 5"));
        assert!(got.contains("batchsize"), "{got}");
        let got = err_of(&GOOD.replace("[cloudflare]", "[cloudflare]\ntypo_key = 1"));
        assert!(got.contains("typo_key"), "{got}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let got = err_of(&with("", "batch_size = \"many\""));
        assert!(got.contains("batch_size"), "{got}");
        let got = err_of(&with("", "visibility_timeout = \"forever\""));
        assert!(got.contains("visibility_timeout"), "{got}");
    }

    /// Every key that holds a secret, each with a syntax error and a type error: the error
    /// names the key (or the line and column) and never contains the value.
    #[test]
    fn no_error_prints_a_secret_value() {
        const SECRET: &str = "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=";
        let base = |cloudflare: &str, webhook: &str| {
            format!(
                "[cloudflare]\naccount_id = \"abc\"\n{cloudflare}\n[[consumers]]\nqueue_id = \"q1\"\n[consumers.webhook]\nurl = \"http://127.0.0.1/h\"\n{webhook}\n"
            )
        };
        let cases: Vec<(String, &str)> = vec![
            // Syntax errors: an unterminated string, a missing `=`, a bad escape.
            (base(&format!("api_token = \"{SECRET}"), ""), "line 3"),
            (base(&format!("api_token {SECRET}"), ""), "line 3"),
            (base(&format!("api_token = \"{SECRET}\\q\""), ""), "line 3"),
            (
                base(
                    "api_token = \"t\"",
                    &format!("signing_secrets = [\"{SECRET}\""),
                ),
                "line",
            ),
            (
                base("api_token = \"t\"", &format!("bearer_token = \"{SECRET}")),
                "line 8",
            ),
            (
                base(
                    "api_token = \"t\"",
                    &format!(
                        "[consumers.webhook.basic_auth]\nusername = \"u\"\npassword = {SECRET}"
                    ),
                ),
                "line 10",
            ),
            (
                base(
                    "api_token = \"t\"",
                    &format!("headers = {{ Authorization = \"{SECRET} }}"),
                ),
                "line 8",
            ),
            // Type errors: a string where a list or a table is expected, and the reverse.
            (
                base(&format!("api_token = [\"{SECRET}\"]"), ""),
                "`cloudflare.api_token`",
            ),
            (
                base(
                    "api_token = \"t\"",
                    &format!("signing_secrets = \"{SECRET}\""),
                ),
                "`consumers[0].webhook.signing_secrets` has the wrong type",
            ),
            (
                base(
                    "api_token = \"t\"",
                    &format!("bearer_token = [\"{SECRET}\"]"),
                ),
                "`consumers[0].webhook.bearer_token`",
            ),
            (
                base(
                    "api_token = \"t\"",
                    &format!(
                        "[consumers.webhook.basic_auth]\nusername = \"u\"\npassword = [\"{SECRET}\"]"
                    ),
                ),
                "`consumers[0].webhook.basic_auth.password`",
            ),
            (
                base("api_token = \"t\"", &format!("headers = \"{SECRET}\"")),
                "`consumers[0].webhook.headers`",
            ),
            (
                base("api_token = \"t\"", &format!("basic_auth = \"{SECRET}\"")),
                "`consumers[0].webhook.basic_auth`",
            ),
            // Bad values.
            (
                base(
                    "api_token = \"t\"",
                    &format!("signing_secrets = [\"{SECRET}!\"]"),
                ),
                "`consumers[0].webhook.signing_secrets[0]`",
            ),
            (
                base(
                    "api_token = \"t\"",
                    &format!("headers = {{ Authorization = \"{SECRET}\\n\" }}"),
                ),
                "`consumers[0].webhook.headers.Authorization`",
            ),
            (
                base("api_token = \"t\"", "").replace(
                    "http://127.0.0.1/h",
                    &format!("http://u:{SECRET}@127.0.0.1/h"),
                ),
                "`consumers[0].webhook.url`",
            ),
            (
                base("api_token = \"t\"", "")
                    .replace("http://127.0.0.1/h", &format!("http://[{SECRET}]/h")),
                "`consumers[0].webhook.url`",
            ),
        ];
        let secret_part = &SECRET[6..20];
        for (text, want) in &cases {
            let e = Config::from_toml(text).unwrap_err();
            let got = e.to_string();
            let detail = e.detail().unwrap_or_default();
            assert!(
                got.contains(want),
                "config:\n{text}\nwant {want:?}, got {got:?}"
            );
            assert!(
                !got.contains(secret_part) && !detail.contains(secret_part),
                "the secret leaked:\n{got}\n{detail}"
            );
            assert!(!got.contains('\n'), "one line: {got:?}");
        }
    }

    #[test]
    fn syntax_errors_give_line_and_column_with_an_aligned_caret() {
        let text = "[cloudflare]\naccount_id = \"abc\"\napi_token = \"tok\n";
        let e = Config::from_toml(text).unwrap_err();
        let ConfigError::Syntax { line, column, .. } = &e else {
            panic!("not a syntax error: {e}");
        };
        assert_eq!(*line, 3);
        assert!(*column > 12, "{e}");
        assert!(
            e.to_string()
                .starts_with(&format!("TOML syntax error at line 3, column {column}: ")),
            "{e}"
        );
        let detail = e.detail().unwrap();
        let caret = detail.lines().last().unwrap();
        // The caret sits under column `column` of the line, after the `3 | ` gutter.
        assert_eq!(caret.find('^'), Some("3 | ".len() + column - 1), "{detail}");
        assert!(!detail.contains("tok"), "{detail}");
    }

    #[test]
    fn key_paths_have_their_dots() {
        assert_eq!(
            key_path("consumers[0]webhook.url"),
            "consumers[0].webhook.url"
        );
        assert_eq!(
            key_path("consumers[0].webhook.url"),
            "consumers[0].webhook.url"
        );
        assert_eq!(key_path("a[1][2]b"), "a[1][2].b");
        let got = err_of(&with("", "batch_size = \"many\""));
        assert!(got.contains("`consumers[0].batch_size`"), "{got}");
        assert!(!got.contains("many"), "{got}");
    }

    #[test]
    fn a_short_lease_alone_is_valid_and_the_grace_fits_it() {
        let c = Config::from_toml(&with("", "visibility_timeout = \"5s\"")).unwrap();
        assert!(c.shutdown.grace_period < Duration::from_secs(5));
        assert_eq!(c.consumers[0].webhook.timeout, Duration::from_secs(4));
        assert_eq!(c.shutdown.grace_period, Duration::from_millis(2500));
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(c.shutdown.grace_period, Duration::from_secs(25));
        // Two consumers: each timeout fits its own lease, the grace fits the shortest.
        let two = format!(
            "{GOOD}[[consumers]]\nqueue_id = \"q2\"\nvisibility_timeout = \"3s\"\n[consumers.webhook]\nurl = \"http://127.0.0.1/2\"\n"
        );
        let c = Config::from_toml(&two).unwrap();
        assert_eq!(c.consumers[0].webhook.timeout, Duration::from_secs(10));
        assert_eq!(c.consumers[1].webhook.timeout, Duration::from_millis(2400));
        assert_eq!(c.shutdown.grace_period, Duration::from_millis(1500));
        // Set explicitly, it is still validated.
        let got = err_of(&format!(
            "{}\n[shutdown]\ngrace_period = \"6s\"\n",
            with("", "visibility_timeout = \"5s\"")
        ));
        assert!(
            got.contains("`shutdown.grace_period` must be shorter"),
            "{got}"
        );
    }

    #[test]
    fn secrets_readable_by_others_are_found() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cfq-relay-perms-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        let config_path = dir.join("config.toml");
        std::fs::write(&token, "t").unwrap();
        std::fs::write(&config_path, GOOD).unwrap();
        let mut c = Config::from_toml(GOOD).unwrap();
        c.cloudflare.api_token_file = Some(token.clone());
        let set = |p: &Path, mode| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        set(&token, 0o644);
        set(&config_path, 0o644);
        let keys: Vec<String> = c
            .readable_by_others(&config_path)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["the config file", "cloudflare.api_token_file"]);
        set(&token, 0o600);
        set(&config_path, 0o640);
        assert!(c.readable_by_others(&config_path).is_empty());
        // A config without an inline secret may be world-readable.
        set(&config_path, 0o644);
        c.cloudflare.api_token = None;
        assert!(c.readable_by_others(&config_path).is_empty());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn the_breaker_is_on_by_default() {
        let c = Config::from_toml(GOOD).unwrap();
        assert!(c.consumers[0].breaker.enabled);
        let off = format!("{}\n[consumers.breaker]\nenabled = false\n", with("", ""));
        assert!(
            !Config::from_toml(&off).unwrap().consumers[0]
                .breaker
                .enabled
        );
    }

    #[test]
    fn token_precedence_env_then_file_then_inline() {
        let c = Config::from_toml(GOOD).unwrap();
        let t = resolve_token_from(&c.cloudflare, Some("from-env".into())).unwrap();
        assert_eq!(t.expose_secret(), "from-env");
        let t = resolve_token_from(&c.cloudflare, None).unwrap();
        assert_eq!(t.expose_secret(), "secret-token-value");

        let dir = std::env::temp_dir().join(format!("cfq-relay-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let mut cf = c.cloudflare.clone();
        cf.api_token_file = Some(file.clone());
        assert_eq!(
            resolve_token_from(&cf, None).unwrap().expose_secret(),
            "from-file"
        );

        std::fs::write(&file, "  \n").unwrap();
        let e = resolve_token_from(&cf, None).unwrap_err().to_string();
        assert!(
            e.contains("`cloudflare.api_token_file`") && e.contains("is empty"),
            "{e}"
        );

        cf.api_token_file = Some(dir.join("missing"));
        let e = resolve_token_from(&cf, None).unwrap_err().to_string();
        assert!(
            e.contains("`cloudflare.api_token_file` cannot be read"),
            "{e}"
        );

        cf.api_token_file = None;
        cf.api_token = None;
        let e = resolve_token_from(&cf, None).unwrap_err().to_string();
        assert!(e.contains("no API token"), "{e}");
        let e = resolve_token_from(&cf, Some(" ".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("CLOUDFLARE_API_TOKEN"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn systemd_credential_after_env_before_file_and_inline() {
        let dir = std::env::temp_dir().join(format!("cfq-relay-creds-{}", std::process::id()));
        let creds = dir.join("credentials");
        std::fs::create_dir_all(&creds).unwrap();
        let file = dir.join("token-file");
        std::fs::write(&file, "from-file").unwrap();
        let mut cf = Config::from_toml(GOOD).unwrap().cloudflare;
        cf.api_token_file = Some(file);
        let resolve = |env: Option<&str>| {
            resolve_token_with(&cf, env.map(str::to_owned), Some(creds.clone()))
                .map(|t| t.expose_secret().to_owned())
                .map_err(|e| e.to_string())
        };

        // No credential file in the directory: falls through to api_token_file.
        assert_eq!(resolve(None).unwrap(), "from-file");
        std::fs::write(creds.join(TOKEN_CREDENTIAL), "from-credential\n").unwrap();
        assert_eq!(resolve(None).unwrap(), "from-credential");
        assert_eq!(resolve(Some("from-env")).unwrap(), "from-env");
        std::fs::write(creds.join(TOKEN_CREDENTIAL), " \n").unwrap();
        let e = resolve(None).unwrap_err();
        assert!(
            e.starts_with("`$CREDENTIALS_DIRECTORY/cloudflare-api-token` ")
                && e.contains("is empty"),
            "{e}"
        );
        // Without the directory (not under systemd) the credential plays no part.
        assert_eq!(
            resolve_token_with(&cf, None, None).unwrap().expose_secret(),
            "from-file"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn debug_and_summary_hide_secrets() {
        assert_eq!(
            redact_url("https://user:pw@example.com/hook?sig=abc"),
            "https://example.com/hook?REDACTED"
        );
        let mut text = GOOD.replace(
            "http://127.0.0.1:8080/hook",
            "https://example.com/hook?sig=abc",
        );
        text.push_str("[consumers.webhook.headers]\nAuthorization = \"Bearer hunter2\"\n");
        let c = Config::from_toml(&text).unwrap();
        let debug = format!("{c:?}");
        for secret in ["secret-token-value", "pw@", "sig=abc", "hunter2"] {
            assert!(!debug.contains(secret), "{debug}");
        }
        let summary = c.summary();
        for secret in ["secret-token-value", "pw@", "sig=abc", "hunter2"] {
            assert!(!summary.contains(secret), "{summary}");
        }
        assert!(summary.starts_with("config ok: account 0123456789abcdef0123456789abcdef"));
    }

    #[test]
    fn two_consumers_of_one_queue_are_refused() {
        let two = |a: &str, b: &str| {
            format!(
                "{GOOD}\n[[consumers]]\n{a}\n[consumers.webhook]\nurl = \"http://127.0.0.1/b\"\n\n[[consumers]]\n{b}\n[consumers.webhook]\nurl = \"http://127.0.0.1/c\"\n"
            )
        };
        // Distinct names do not help: they would still split the queue's messages.
        let e = err_of(&two(
            "name = \"b\"\nqueue_id = \"shared\"",
            "name = \"c\"\nqueue_id = \"SHARED\"",
        ));
        assert!(
            e.starts_with("`consumers[2].queue_id` is also the queue of consumers[1]: "),
            "{e}"
        );
        assert!(e.contains("compete for its messages"), "{e}");
        assert!(e.contains("its own queue"), "{e}");
        assert!(e.contains("raise `concurrency`"), "{e}");
        assert!(!e.contains("shared") && !e.contains("SHARED"), "{e}");
        // Nor does leaving the names out.
        let e = err_of(&two("queue_id = \"q9\"", "queue_id = \"q9\""));
        assert!(
            e.starts_with("`consumers[2].queue_id` is also the queue"),
            "{e}"
        );
        // Same name, different queues: the name is the problem, and no talk of distinct names
        // for one queue.
        let e = err_of(&two(
            "name = \"x\"\nqueue_id = \"q8\"",
            "name = \"x\"\nqueue_id = \"q9\"",
        ));
        assert!(
            e.starts_with("`consumers[2].name` is also the name of consumers[1]: "),
            "{e}"
        );
        // Distinct queues, distinct names: fine.
        Config::from_toml(&two("queue_id = \"q8\"", "queue_id = \"q9\"")).unwrap();
    }

    #[test]
    fn log_levels_must_be_real_levels() {
        for good in [
            "info",
            "WARN",
            "off",
            "trace",
            "warn,cfq_relay=debug",
            "info,reqwest=warn,hyper=error",
            "cfq_relay::pipeline::poller=trace",
        ] {
            check_log_filter("log.level", good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
        for (bad, want) in [
            ("warning", "directive 1 is not a known level"),
            ("verbose", "directive 1 is not a known level"),
            ("ifno", "directive 1 is not a known level"),
            ("info,cfq_relay=verbose", "directive 2 is not a known level"),
            ("info,,debug", "has an empty directive (number 2)"),
            ("=debug", "directive 1 has no target before `=`"),
            ("", "is empty"),
            ("info, hyper=warn", "must not contain spaces"),
        ] {
            let e = check_log_filter("log.level", bad).unwrap_err().to_string();
            assert!(e.starts_with("`log.level` "), "{bad:?}: {e}");
            assert!(e.contains(want), "{bad:?}: want {want:?}, got {e:?}");
            if want.contains("level") || want.contains("target") {
                assert!(
                    e.contains("not `warning` or `verbose`"),
                    "{bad:?}: no hint in {e:?}"
                );
            }
            assert!(!e.contains("ifno"), "the value is echoed: {e:?}");
        }
        // Through the whole config too.
        let e = err_of(&format!("{}\n[log]\nlevel = \"warning\"\n", with("", "")));
        assert!(
            e.starts_with("`log.level` directive 1 is not a known level"),
            "{e}"
        );
    }

    #[test]
    fn environment_overrides_keys() {
        // Setting variables in this process would race the other tests (and is `unsafe` in
        // edition 2024), so the test re-runs itself in a child process with the variables set.
        let exe = std::env::current_exe().unwrap();
        if std::env::var("CFQ_RELAY_ENV_CHILD").is_ok() {
            let c = Config::from_toml_with_env(GOOD).unwrap();
            assert_eq!(c.cloudflare.account_id, "fromenv");
            assert_eq!(c.log.level, "debug");
            assert_eq!(c.admin.listen, "127.0.0.1:9999".parse().unwrap());
            return;
        }
        let status = std::process::Command::new(exe)
            .args([
                "--exact",
                "config::tests::environment_overrides_keys",
                "--nocapture",
            ])
            .env("CFQ_RELAY_ENV_CHILD", "1")
            .env("CFQ_RELAY__CLOUDFLARE__ACCOUNT_ID", "fromenv")
            .env("CFQ_RELAY__LOG__LEVEL", "debug")
            .env("CFQ_RELAY__ADMIN__LISTEN", "127.0.0.1:9999")
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&status.stdout);
        assert!(status.status.success(), "{out}");
        assert!(out.contains("1 passed"), "the child ran no test: {out}");
    }
}
