//! Retry schedules of the Cloudflare API calls (pull, ack, retry), shared by the poller and the
//! acker: the backoff of failed calls, the wait before the next attempt, and [`Failures`], which
//! decides whether a failure costs only its own call or backs every call of its kind off.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use crate::cloudflare::ApiError;

/// Backoff of failed API calls: 500 ms doubling to 30 s, jittered.
pub fn api_backoff() -> ExponentialBackoff {
    jittered_backoff(Duration::from_millis(500), Duration::from_secs(30))
}

/// An endless backoff from `min` doubling to `max`, each step jittered (backon's jitter adds
/// up to one step on top).
pub fn jittered_backoff(min: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Backoff of one call after a failure of its own: 100 ms doubling to 2 s, jittered.
pub fn isolated_backoff() -> ExponentialBackoff {
    jittered_backoff(Duration::from_millis(100), Duration::from_secs(2))
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

/// Failed calls in a row after which every call of the kind backs off (before that, each failed
/// call only delays its own retry).
pub const PERSISTENT_AFTER_FAILURES: u32 = 3;

/// How long a failed call rests before its next attempt, and who rests with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rest {
    /// Only the failed call: the other calls go on.
    Own(Duration),
    /// Every call of its kind: failures persist, or the server asked for it (429, auth).
    All(Duration),
}

impl Rest {
    pub fn wait(self) -> Duration {
        match self {
            Rest::Own(d) | Rest::All(d) => d,
        }
    }
}

/// The failure record of one kind of call (pulls, or ack calls) of one consumer. A lone failure
/// costs only its own call, which retries after a short backoff of its own ([`isolated_backoff`])
/// while the other calls go on. Failures in a row, a 429 (at least its `Retry-After`) and an
/// authentication error back every call of the kind off ([`api_backoff`], [`retry_wait`]).
/// A success resets both schedules.
#[derive(Debug)]
pub struct Failures {
    in_row: u32,
    own: ExponentialBackoff,
    all: ExponentialBackoff,
}

impl Default for Failures {
    fn default() -> Self {
        Self {
            in_row: 0,
            own: isolated_backoff(),
            all: api_backoff(),
        }
    }
}

impl Failures {
    /// A call of the kind succeeded.
    pub fn succeeded(&mut self) {
        *self = Self::default();
    }

    /// A call failed with `err`; `others_go_on` is false when it is the only call of its kind
    /// (nothing else would go on while it rests, so it takes the whole kind's backoff).
    pub fn failed(&mut self, err: &ApiError, others_go_on: bool) -> Rest {
        self.in_row += 1;
        let persistent = self.in_row >= PERSISTENT_AFTER_FAILURES
            || err.retry_after().is_some()
            || err.is_auth()
            || !others_go_on;
        if persistent {
            Rest::All(retry_wait(err, &mut self.all))
        } else {
            Rest::Own(self.own.next().unwrap_or(Duration::from_secs(2)))
        }
    }

    /// Failed calls since the last success.
    pub fn in_row(&self) -> u32 {
        self.in_row
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_failure_rests_alone_and_persistent_ones_rest_all() {
        let mut f = Failures::default();
        let first = f.failed(&ApiError::Timeout, true);
        assert!(
            matches!(first, Rest::Own(d) if d >= Duration::from_millis(100) && d <= Duration::from_secs(2)),
            "{first:?}"
        );
        assert!(matches!(f.failed(&ApiError::Timeout, true), Rest::Own(_)));
        // The third failure in a row backs every call off.
        let third = f.failed(&ApiError::Timeout, true);
        assert!(
            matches!(third, Rest::All(d) if d >= Duration::from_millis(500)),
            "{third:?}"
        );
        assert_eq!(f.in_row(), 3);
        // A success resets the run.
        f.succeeded();
        assert_eq!(f.in_row(), 0);
        assert!(matches!(f.failed(&ApiError::Timeout, true), Rest::Own(_)));
        // A single call of its kind has nobody to let go on.
        let mut single = Failures::default();
        assert!(matches!(
            single.failed(&ApiError::Timeout, false),
            Rest::All(_)
        ));
    }

    #[test]
    fn a_429_and_an_auth_error_back_everything_off_at_once() {
        let mut f = Failures::default();
        let limited = ApiError::RateLimited {
            retry_after: Some(Duration::from_secs(7)),
        };
        assert!(matches!(f.failed(&limited, true), Rest::All(d) if d >= Duration::from_secs(7)));
        let mut f = Failures::default();
        let auth = ApiError::Auth {
            status: 403,
            errors: Vec::new(),
        };
        assert!(matches!(f.failed(&auth, true), Rest::All(d) if d >= Duration::from_secs(30)));
    }

    #[test]
    fn an_api_retry_after_is_believed_up_to_five_minutes() {
        let mut backoff = jittered_backoff(Duration::from_millis(100), Duration::from_secs(2));
        for (asked, waited) in [(7, 7), (300, 300), (301, 300), (1_000_000_000, 300)] {
            let limited = ApiError::RateLimited {
                retry_after: Some(Duration::from_secs(asked)),
            };
            assert_eq!(
                retry_wait(&limited, &mut backoff),
                Duration::from_secs(waited),
                "Retry-After: {asked}"
            );
        }
    }
}
