//! Retry schedules of the Cloudflare API calls (pull, ack, retry), shared by the poller and the
//! acker: the backoff of failed calls and the wait before the next attempt.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::cloudflare::ApiError;

/// Backoff of failed API calls: 500 ms doubling to 30 s, jittered.
pub fn api_backoff() -> impl Iterator<Item = Duration> + Send {
    jittered_backoff(Duration::from_millis(500), Duration::from_secs(30))
}

/// An endless backoff from `min` doubling to `max`, each step jittered (backon's jitter adds
/// up to one step on top).
pub fn jittered_backoff(min: Duration, max: Duration) -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The wait before retrying a failed API call: the next backoff step, at least the server's
/// `Retry-After`, and at least 30 s after an authentication failure (a token problem is not
/// fixed by hammering the API).
pub fn retry_wait(err: &ApiError, backoff: &mut impl Iterator<Item = Duration>) -> Duration {
    let mut wait = backoff.next().unwrap_or(Duration::from_secs(30));
    if let Some(after) = err.retry_after() {
        wait = wait.max(after);
    }
    if err.is_auth() {
        wait = wait.max(Duration::from_secs(30));
    }
    wait
}
