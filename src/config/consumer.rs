//! `[[consumers]]`: one queue delivered to one webhook — the pull settings, the lease, the
//! bound on deliveries in flight, retry delays — and the checks that tie the webhook's timeout to
//! the lease.

use std::time::Duration;

use educe::Educe;
use serde::Deserialize;

use super::checks::{check_between, check_range, fmt_duration};
use super::{BreakerConfig, ConfigError, Validate, WebhookConfig};

/// The longest lease Cloudflare grants.
const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);
/// 12 h: the longest retry delay every published Cloudflare limit accepts (older pages say 12 h,
/// newer ones 24 h). One refused retry item fails the whole ack call it travels in.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(12 * 3600);

/// `[[consumers]]`: one queue delivered to one webhook.
#[derive(Debug, Clone, PartialEq, Deserialize, Educe)]
#[educe(Default)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerConfig {
    /// A short name used in logs and as the `queue` metric label; defaults to `queue_id`.
    pub name: Option<String>,
    /// The queue id (32 hex characters; `wrangler queues info NAME` shows it). Required.
    pub queue_id: String,
    /// Messages asked for per pull, 1..=100.
    #[educe(Default = 100)]
    pub batch_size: u32,
    /// Lease length of a pulled message, 1s..=12h. A message not acked in time is redelivered.
    #[educe(Default(expression = Duration::from_secs(60)))]
    #[serde(with = "humantime_serde")]
    pub visibility_timeout: Duration,
    /// Upper bound of deliveries in flight (and messages held) for this consumer, 1..=10000
    /// (with `webhook.batch`, messages held in batches and in flight).
    /// With `concurrency_mode = "adaptive"` (the default) the relay finds the webhook's limit
    /// below it; with `"fixed"` it always uses this many. The default: 5,000 msg/s (Cloudflare's
    /// per-queue ceiling) at 150 ms round trips needs 750 in flight.
    #[educe(Default = 1000)]
    pub concurrency: usize,
    /// `adaptive` (default): deliveries in flight follow the webhook's latency and its 429/503
    /// answers, up to `concurrency`. `fixed`: always `concurrency`.
    pub concurrency_mode: ConcurrencyMode,
    /// Maximum pull calls in flight at once, 1..=32; several are used when the free
    /// delivery slots exceed one batch.
    #[educe(Default = 4)]
    pub max_pulls_in_flight: usize,
    /// Upper bound of the (jittered, exponential) wait between pulls of an empty queue,
    /// 100ms..=60s.
    #[educe(Default(expression = Duration::from_secs(2)))]
    #[serde(with = "humantime_serde")]
    pub max_idle_backoff: Duration,
    /// The webhook every message is POSTed to.
    pub webhook: WebhookConfig,
    /// Delays of retried messages.
    pub retry: RetryConfig,
    /// The circuit breaker that stops pulling while the webhook keeps failing.
    pub breaker: BreakerConfig,
}

/// How a consumer's deliveries in flight are bounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConcurrencyMode {
    #[default]
    Adaptive,
    Fixed,
}

impl ConsumerConfig {
    /// The label used for this consumer in logs and metrics.
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.queue_id)
    }

    /// The queue id and the name.
    fn validate_identity(&self, at: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{at}.{k}");
        if self.queue_id.trim().is_empty() {
            return Err(ConfigError::invalid(key("queue_id"), "is required"));
        }
        if !self
            .queue_id
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        {
            return Err(ConfigError::invalid(
                key("queue_id"),
                "must be letters, digits, '-' or '_' (the queue id, not its URL)",
            ));
        }
        if let Some(name) = &self.name
            && (name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)))
        {
            return Err(ConfigError::invalid(
                key("name"),
                format!(
                    "must be 1 to 64 characters of letters, digits, '-', '_', '.', got {name:?}"
                ),
            ));
        }
        Ok(())
    }

    /// The webhook's timeout against this consumer's lease: a delivery starts only if the
    /// timeout plus the ack margin fit in what is left of the lease after the pull; with no room,
    /// every message would be handed back undelivered until the queue dead-letters it.
    fn validate_timeout_fits_lease(&self, at: &str) -> Result<(), ConfigError> {
        let (timeout, lease) = (self.webhook.timeout, self.visibility_timeout);
        let key = format!("{at}.webhook.timeout");
        if timeout >= lease {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "must be shorter than visibility_timeout ({}), got {}",
                    fmt_duration(lease),
                    fmt_duration(timeout)
                ),
            ));
        }
        let room = lease.saturating_sub(lease_margin(lease) * 2);
        if timeout > room {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "must leave room for the pull and the ack within visibility_timeout ({}): at most {}, got {}",
                    fmt_duration(lease),
                    fmt_duration(room),
                    fmt_duration(timeout)
                ),
            ));
        }
        Ok(())
    }
}

/// One consumer and its sections (that no two consumers share a queue or a name is the
/// whole config's check).
impl Validate for ConsumerConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{at}.{k}");
        self.validate_identity(at)?;
        check_between(&key("batch_size"), self.batch_size, 1, 100)?;
        check_range(
            &key("visibility_timeout"),
            self.visibility_timeout,
            Duration::from_secs(1),
            MAX_VISIBILITY,
        )?;
        check_between(&key("concurrency"), self.concurrency, 1, 10_000)?;
        check_between(&key("max_pulls_in_flight"), self.max_pulls_in_flight, 1, 32)?;
        check_range(
            &key("max_idle_backoff"),
            self.max_idle_backoff,
            Duration::from_millis(100),
            Duration::from_secs(60),
        )?;
        self.webhook.validate(&key("webhook"))?;
        self.validate_timeout_fits_lease(at)?;
        self.breaker.validate(&key("breaker"))?;
        self.retry.validate(&key("retry"))
    }
}

/// `[consumers.retry]`
#[derive(Debug, Clone, PartialEq, Deserialize, Educe)]
#[educe(Default)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Delay before the first redelivery of a failed message; doubles with each attempt.
    #[educe(Default(expression = Duration::from_secs(5)))]
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    /// Cap of the retry delay (and of a webhook's Retry-After), at most 12h.
    #[educe(Default(expression = Duration::from_secs(3600)))]
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
}

impl Validate for RetryConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        check_range(
            &format!("{at}.max_delay"),
            self.max_delay,
            Duration::ZERO,
            MAX_RETRY_DELAY,
        )?;
        if self.base_delay > self.max_delay {
            return Err(ConfigError::invalid(
                format!("{at}.base_delay"),
                format!(
                    "must be between 0s and retry.max_delay ({}), got {}",
                    fmt_duration(self.max_delay),
                    fmt_duration(self.base_delay)
                ),
            ));
        }
        Ok(())
    }
}

/// The time kept free before a lease's end for the ack to reach Cloudflare.
pub fn lease_margin(visibility_timeout: Duration) -> Duration {
    (visibility_timeout / 10).clamp(Duration::from_millis(200), Duration::from_secs(5))
}
