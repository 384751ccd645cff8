//! `[consumers.breaker]`: when the circuit breaker stops a consumer's pulls while its webhook
//! keeps failing (the pipeline's gate applies it).

use std::time::Duration;

use educe::Educe;
use serde::Deserialize;

use super::checks::check_range;
use super::{ConfigError, Validate};

/// `[consumers.breaker]`
#[derive(Debug, Clone, PartialEq, Deserialize, Educe)]
#[educe(Default)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// The circuit breaker is on by default: during a receiver outage messages wait in the
    /// queue instead of spending their `max_retries` and landing in the dead-letter queue.
    /// `enabled = false` turns it off (failures then follow the retry policy alone).
    #[educe(Default = true)]
    pub enabled: bool,
    /// Consecutive failed deliveries that open the breaker, at least 1.
    #[educe(Default = 10)]
    pub consecutive_failures: u32,
    /// Failure ratio over `window` that opens the breaker (with at least `min_requests`), in
    /// (0, 1].
    #[educe(Default = 0.5)]
    pub failure_ratio: f64,
    /// Window of the failure ratio, 1s..=1h.
    #[educe(Default(expression = Duration::from_secs(30)))]
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Deliveries in `window` needed before the ratio counts.
    #[educe(Default = 20)]
    pub min_requests: u32,
    /// How long the breaker stays open before a probe delivery is tried, 1s..=1h.
    #[educe(Default(expression = Duration::from_secs(30)))]
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
}

impl Validate for BreakerConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if !(self.failure_ratio > 0.0 && self.failure_ratio <= 1.0) {
            return Err(ConfigError::invalid(
                format!("{at}.failure_ratio"),
                format!("must be above 0 and at most 1, got {}", self.failure_ratio),
            ));
        }
        if self.consecutive_failures == 0 {
            return Err(ConfigError::invalid(
                format!("{at}.consecutive_failures"),
                "must be at least 1",
            ));
        }
        let hour = Duration::from_secs(3600);
        check_range(
            &format!("{at}.open_for"),
            self.open_for,
            Duration::from_secs(1),
            hour,
        )?;
        check_range(
            &format!("{at}.window"),
            self.window,
            Duration::from_secs(1),
            hour,
        )
    }
}
