//! `[consumers.webhook]`: where and how each message is delivered — the URL, timeout, headers,
//! which statuses count as what, credentials and signing secrets (as [`SecretSource`]s), TLS
//! files, envelope and batch delivery.

use std::path::PathBuf;
use std::time::Duration;

use educe::Educe;
use reqwest::header::{HeaderName, HeaderValue};
use serde::Deserialize;

use super::checks::{check_between, check_http_url, check_range};
use super::consumer::lease_margin;
use super::{
    ConfigError, ExtraHeaders, RedactedUrl, Secret, SecretSource, Validate, decode_secret,
};

/// The webhook timeout when neither it nor a short lease says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Headers that frame the request body or manage the connection: never from `headers`.
const FRAMING_HEADERS: [&str; 8] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// `[consumers.webhook]`
#[derive(Debug, Clone, PartialEq, Deserialize, Educe)]
#[educe(Default)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// URL the bodies are POSTed to (http or https). Required.
    pub url: RedactedUrl,
    /// Timeout of one webhook request (connect to last response byte), 100ms..=12h; shorter
    /// than `visibility_timeout`. Unset: 10s, or less when the lease needs it
    /// ([`webhook_timeout_default`]).
    #[educe(Default(expression = DEFAULT_TIMEOUT))]
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Extra request headers, e.g. `{ "X-Tenant" = "blue" }`.
    pub headers: ExtraHeaders,
    /// Statuses besides 2xx that count as delivered (e.g. `[409]` for idempotent receivers).
    pub success_statuses: Vec<u16>,
    /// Statuses that drop the message: it is acked without delivery, counted and logged.
    /// Empty by default: nothing is dropped unless configured.
    pub drop_statuses: Vec<u16>,
    /// Statuses that always retry, even if listed as success (e.g. `[202]` for a receiver
    /// that only queued the work).
    pub retry_statuses: Vec<u16>,
    /// Standard Webhooks signing secrets (`whsec_…`), inline. Several → several signatures.
    pub signing_secrets: Vec<Secret>,
    /// A file with signing secrets, one per line (wins over `signing_secrets`).
    pub signing_secret_file: Option<PathBuf>,
    /// An environment variable with signing secrets, separated by spaces (wins over the file).
    pub signing_secret_env: Option<String>,
    /// `Authorization: Bearer …` token, inline (or `bearer_token_file`, `bearer_token_env`).
    pub bearer_token: Option<Secret>,
    pub bearer_token_file: Option<PathBuf>,
    pub bearer_token_env: Option<String>,
    /// HTTP basic auth.
    pub basic_auth: Option<BasicAuthConfig>,
    /// PEM bundle of extra CA certificates trusted for the webhook (private receivers).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS; needs `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
    /// POST a JSON envelope `{id, queue, attempts, timestamp_ms, content_type, body}` instead of
    /// the raw body.
    pub envelope: bool,
    /// Upper bound of requests per second to this webhook, in (0, 100000] (unset: no limit).
    pub max_requests_per_second: Option<f64>,
    /// Speak HTTP/2 to an `http://` webhook without negotiation (h2c prior knowledge). Over
    /// `https://` HTTP/2 is used whenever the receiver offers it (ALPN); no key needed.
    pub http2_prior_knowledge: bool,
    /// Batch delivery: many messages per request with per-message results (unset: one
    /// message per request).
    pub batch: Option<BatchConfig>,
}

/// `[consumers.webhook.batch]`: opt-in batch delivery.
#[derive(Debug, Clone, PartialEq, Deserialize, Educe)]
#[educe(Default)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Messages per webhook request, 1..=100.
    #[educe(Default = 50)]
    pub max_messages: usize,
    /// How long a partial batch may wait for more messages, 0s..=10s.
    #[educe(Default(expression = Duration::from_millis(50)))]
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Cap on the request body in bytes, 1024..=104857600 (unset: no cap beyond
    /// `max_messages`); a message larger than the cap on its own travels alone.
    pub max_bytes: Option<usize>,
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

/// The webhook timeout when none is configured: 10 s, or what the lease leaves after the pull
/// and ack margins when that is less (so `visibility_timeout = "5s"` alone is valid).
pub fn webhook_timeout_default(visibility_timeout: Duration) -> Duration {
    let margin = lease_margin(visibility_timeout);
    DEFAULT_TIMEOUT
        .min(visibility_timeout.saturating_sub(margin * 2))
        .max(Duration::from_millis(100))
}

impl WebhookConfig {
    /// The bearer token's places; `at` is the webhook's key (e.g. `consumers[0].webhook`).
    pub fn bearer_token_source(&self, at: &str) -> SecretSource<'_> {
        SecretSource::keys(
            &format!("{at}.bearer_token"),
            self.bearer_token.as_ref(),
            self.bearer_token_file.as_deref(),
            self.bearer_token_env.as_deref(),
        )
    }

    /// The basic-auth password's places (none without `basic_auth`).
    pub fn password_source(&self, at: &str) -> SecretSource<'_> {
        match &self.basic_auth {
            Some(b) => SecretSource::keys(
                &format!("{at}.basic_auth.password"),
                b.password.as_ref(),
                b.password_file.as_deref(),
                b.password_env.as_deref(),
            ),
            None => SecretSource::default(),
        }
    }

    /// The places of the signing secrets given as one text (separated by white space): the
    /// variable, then the file. When neither is set, `signing_secrets` holds them.
    pub fn signing_secret_source(&self, at: &str) -> SecretSource<'_> {
        SecretSource::keys(
            &format!("{at}.signing_secret"),
            None,
            self.signing_secret_file.as_deref(),
            self.signing_secret_env.as_deref(),
        )
    }

    /// The mTLS private key's place (a file only: `client_key_file`).
    pub fn client_key_source(&self, at: &str) -> SecretSource<'_> {
        SecretSource::keys(
            &format!("{at}.client_key"),
            None,
            self.client_key_file.as_deref(),
            None,
        )
    }

    /// The signing secrets, read from their source: the variable or the file (split on white
    /// space) if set, else `signing_secrets`.
    pub fn resolve_signing_secrets(&self, at: &str) -> Result<Vec<Secret>, ConfigError> {
        Ok(match self.signing_secret_source(at).resolve()? {
            Some(text) => text.expose().split_whitespace().map(Secret::new).collect(),
            None => self.signing_secrets.clone(),
        })
    }

    /// Every secret of this webhook that the config holds or points at: whether one is written
    /// inline (the extra headers count: they often carry credentials), and the secret files as
    /// (key, path), the mTLS key among them. A new secret joins here as one more source.
    pub fn secret_places(&self, at: &str) -> (bool, Vec<(String, PathBuf)>) {
        let sources = [
            self.signing_secret_source(at),
            self.bearer_token_source(at),
            self.password_source(at),
            self.client_key_source(at),
        ];
        let inline = !self.signing_secrets.is_empty()
            || !self.headers.is_empty()
            || sources.iter().any(SecretSource::is_inline);
        let files = sources
            .iter()
            .flat_map(|s| s.files().map(|(k, p)| (k.to_owned(), p.to_owned())))
            .collect();
        (inline, files)
    }

    /// Every file this webhook reads when its consumer is built (secrets, certificates). A
    /// config reload restarts the consumer when one of them changed, so a rotated secret or
    /// certificate takes effect on SIGHUP.
    pub fn files(&self) -> Vec<PathBuf> {
        let (_, secrets) = self.secret_places("");
        let mut files: Vec<PathBuf> = secrets.into_iter().map(|(_, p)| p).collect();
        files.extend(self.ca_file.clone());
        files.extend(self.client_cert_file.clone());
        files
    }
}

impl Validate for WebhookConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{at}.{k}");
        if self.url.trim().is_empty() {
            return Err(ConfigError::invalid(key("url"), "is required"));
        }
        check_http_url(&key("url"), &self.url)?;
        // A password in the URL would travel into the HTTP client's debug logs (its pool
        // keys are the URL's authority): credentials have their own keys.
        if reqwest::Url::parse(&self.url)
            .is_ok_and(|u| !u.username().is_empty() || u.password().is_some())
        {
            return Err(ConfigError::invalid(
                key("url"),
                "must not contain a user name or password: use [consumers.webhook.basic_auth] (`username` with `password_file`, `password_env` or `password`)",
            ));
        }
        check_range(
            &key("timeout"),
            self.timeout,
            Duration::from_millis(100),
            Duration::from_secs(12 * 3600),
        )?;
        for (name, value) in &self.headers {
            if HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(ConfigError::invalid(
                    key("headers"),
                    format!("has an invalid header name {name:?}"),
                ));
            }
            // The HTTP client frames the body by these: a `Content-Length` of the operator's
            // made it send only that many bytes of every message (and the receiver's 2xx
            // acked the rest away).
            if FRAMING_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name)) {
                return Err(ConfigError::invalid(
                    format!("{}.{name}", key("headers")),
                    "frames the request body or the connection: the relay sets it itself; remove it",
                ));
            }
            if HeaderValue::from_str(value).is_err() {
                // The value may be a secret: name the header, never echo the value.
                return Err(ConfigError::invalid(
                    format!("{}.{name}", key("headers")),
                    "has an invalid header value (control characters or non-ASCII)",
                ));
            }
        }
        for (field, list) in [
            ("success_statuses", &self.success_statuses),
            ("drop_statuses", &self.drop_statuses),
            ("retry_statuses", &self.retry_statuses),
        ] {
            if let Some(s) = list.iter().find(|s| !(100..=599).contains(*s)) {
                return Err(ConfigError::invalid(
                    key(field),
                    format!("must hold HTTP statuses between 100 and 599, got {s}"),
                ));
            }
        }
        if let Some(s) = self
            .drop_statuses
            .iter()
            .find(|s| (200..300).contains(*s) || self.success_statuses.contains(s))
        {
            return Err(ConfigError::invalid(
                key("drop_statuses"),
                format!("{s} already counts as delivered"),
            ));
        }
        // At least one request per 1e9 s: the gate spaces requests by 1 / rate, a `Duration`
        // added to instants (a smaller rate made `run` panic instead of failing here).
        if let Some(rps) = self.max_requests_per_second
            && !((1e-9..=100_000.0).contains(&rps))
        {
            return Err(ConfigError::invalid(
                key("max_requests_per_second"),
                format!("must be between 0.000000001 and 100000, got {rps}"),
            ));
        }
        if let Some(b) = &self.batch {
            b.validate(&key("batch"))?;
            if self.envelope {
                return Err(ConfigError::invalid(
                    key("envelope"),
                    "and `webhook.batch` are both set: a batch already carries each message's metadata; choose one",
                ));
            }
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return Err(ConfigError::invalid(
                key("client_cert_file"),
                "and `client_key_file` must be set together (mutual TLS)",
            ));
        }
        for (i, secret) in self.signing_secrets.iter().enumerate() {
            if let Err(e) = decode_secret(secret.expose()) {
                return Err(ConfigError::invalid(
                    format!("{}[{i}]", key("signing_secrets")),
                    e,
                ));
            }
        }
        Ok(())
    }
}

impl Validate for BatchConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        check_between(&format!("{at}.max_messages"), self.max_messages, 1, 100)?;
        check_range(
            &format!("{at}.max_wait"),
            self.max_wait,
            Duration::ZERO,
            Duration::from_secs(10),
        )?;
        if let Some(bytes) = self.max_bytes {
            check_between(&format!("{at}.max_bytes"), bytes, 1024, 100 * 1024 * 1024)?;
        }
        Ok(())
    }
}
