//! Pure decisions: what a webhook attempt's result means for its message (ack, drop or retry
//! after a delay), whether it pauses the whole consumer, and the retry backoff. No I/O, so
//! every branch is table-tested.

use std::time::Duration;

use crate::config::ConsumerConfig;
use crate::webhook::Attempt;

/// What to tell Cloudflare about the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Delivered: acknowledge.
    Ack,
    /// The operator's policy says to drop it: acknowledge without delivery.
    Drop,
    /// Hand it back to the queue; it is redelivered after the delay.
    Retry { delay: Duration },
}

/// Whether the adaptive limit can still take back-pressure by shrinking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Headroom {
    /// Adaptive and above its floor: the limit shrinks, the consumer goes on.
    CanShrink,
    /// At its floor, or fixed (`concurrency_mode = "fixed"`): only a pause slows the relay.
    AtFloor,
}

/// The policy's verdict on one webhook request: what to tell Cloudflare about its message,
/// and whether the whole consumer pauses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// Pause every pull and delivery of the consumer for this long: the receiver asked for
    /// room (429/503 with `Retry-After`) and the adaptive limit cannot give it by shrinking.
    pub pause: Option<Duration>,
}

/// The per-consumer outcome policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub success_statuses: Vec<u16>,
    pub drop_statuses: Vec<u16>,
    pub retry_statuses: Vec<u16>,
}

impl Policy {
    pub fn from_config(c: &ConsumerConfig) -> Self {
        Self {
            base_delay: c.retry.base_delay,
            max_delay: c.retry.max_delay,
            success_statuses: c.webhook.success_statuses.clone(),
            drop_statuses: c.webhook.drop_statuses.clone(),
            retry_statuses: c.webhook.retry_statuses.clone(),
        }
    }

    /// Decide for a message delivered for the `attempts`-th time (Cloudflare counts from 1).
    /// `jitter` is a number in `[0, 1)`; callers pass a random one, tests a fixed one.
    pub fn decide(&self, attempt: &Attempt, attempts: u32, jitter: f64) -> Decision {
        let backoff = || Decision::Retry {
            delay: backoff(self.base_delay, self.max_delay, attempts, jitter),
        };
        match attempt {
            Attempt::Status {
                status,
                retry_after,
            } => {
                let status = *status;
                let forced_retry = self.retry_statuses.contains(&status);
                if !forced_retry
                    && ((200..300).contains(&status) || self.success_statuses.contains(&status))
                {
                    Decision::Ack
                } else if !forced_retry && self.drop_statuses.contains(&status) {
                    Decision::Drop
                } else if let Some(after) = retry_after {
                    // The receiver said when it can take the message again: believe it, up to
                    // the cap. (408, 429, 5xx and, by default, every other status retry.)
                    Decision::Retry {
                        delay: (*after).min(self.max_delay),
                    }
                } else {
                    backoff()
                }
            }
            Attempt::Timeout | Attempt::Connect | Attempt::Transport | Attempt::Undecodable => {
                backoff()
            }
        }
    }

    /// The verdict on a request: [`Policy::decide`] for its message, and the consumer-wide
    /// pause a 429/503 with `Retry-After` asks for (at most `max_delay`) when the adaptive limit
    /// has no `headroom` left: the floor under the adaptive limit.
    pub fn verdict(
        &self,
        attempt: &Attempt,
        attempts: u32,
        jitter: f64,
        headroom: Headroom,
    ) -> Verdict {
        let pause = match (attempt, headroom) {
            (
                Attempt::Status {
                    status: 429 | 503,
                    retry_after: Some(after),
                },
                Headroom::AtFloor,
            ) => Some((*after).min(self.max_delay)),
            _ => None,
        };
        Verdict {
            decision: self.decide(attempt, attempts, jitter),
            pause,
        }
    }
}

/// Exponential backoff in the message's attempt count: `base * 2^(attempts-1)`, capped at `max`,
/// with "equal jitter" (a value in `[d/2, d]`), so retries of many messages that failed together
/// spread out but never wait much less than the schedule says.
pub fn backoff(base: Duration, max: Duration, attempts: u32, jitter: f64) -> Duration {
    let exp = attempts.saturating_sub(1).min(40);
    let full = base.saturating_mul(1u32 << exp.min(31)).min(max);
    let full = if exp > 31 { max } else { full };
    let jitter = jitter.clamp(0.0, 1.0);
    full.mul_f64(0.5 + 0.5 * jitter).min(max)
}

/// The largest `delay_seconds` sent: 12 h, valid under every published Cloudflare limit (one
/// refused retry item fails the whole ack call it travels in).
pub const MAX_DELAY_SECONDS: u32 = 43_200;

/// `delay_seconds` for the ack API: whole seconds, rounded up, at most 12 h.
pub fn delay_seconds(delay: Duration) -> u32 {
    let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    secs.min(u64::from(MAX_DELAY_SECONDS)) as u32
}

/// A random number in `[0, 1)` for jitter.
pub fn jitter() -> f64 {
    rand::random::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            base_delay: Duration::from_secs(5),
            max_delay: Duration::from_secs(3600),
            success_statuses: vec![409],
            drop_statuses: vec![410, 422],
            retry_statuses: vec![202],
        }
    }

    fn status(s: u16) -> Attempt {
        Attempt::Status {
            status: s,
            retry_after: None,
        }
    }

    fn retry(secs: u64) -> Decision {
        Decision::Retry {
            delay: Duration::from_secs(secs),
        }
    }

    #[test]
    fn policy_table() {
        let p = policy();
        let after = |s, secs| Attempt::Status {
            status: s,
            retry_after: Some(Duration::from_secs(secs)),
        };
        // (attempt, attempts, jitter, expected)
        let table = [
            (status(200), 1, 0.5, Decision::Ack),
            (status(201), 1, 0.5, Decision::Ack),
            (status(204), 7, 0.5, Decision::Ack),
            (status(202), 1, 1.0, retry(5)), // configured to always retry
            (status(299), 1, 0.5, Decision::Ack),
            (status(409), 1, 0.5, Decision::Ack), // configured extra success
            (status(410), 1, 0.5, Decision::Drop), // configured drop
            (status(422), 3, 0.5, Decision::Drop),
            (status(408), 1, 1.0, retry(5)),
            (status(429), 1, 1.0, retry(5)),
            (status(500), 1, 1.0, retry(5)),
            (status(502), 2, 1.0, retry(10)),
            (status(503), 3, 1.0, retry(20)),
            (status(400), 1, 1.0, retry(5)), // other 4xx retry by default
            (status(404), 1, 1.0, retry(5)),
            (status(301), 1, 1.0, retry(5)), // redirects are not followed: retry
            (status(100), 1, 1.0, retry(5)),
            (Attempt::Timeout, 1, 1.0, retry(5)),
            (Attempt::Connect, 2, 1.0, retry(10)),
            (Attempt::Transport, 4, 1.0, retry(40)),
            (Attempt::Undecodable, 1, 1.0, retry(5)),
            (
                Attempt::Timeout,
                1,
                0.0,
                Decision::Retry {
                    delay: Duration::from_millis(2500),
                },
            ),
            (Attempt::Timeout, 30, 1.0, retry(3600)), // capped
            (after(429, 30), 1, 0.0, retry(30)),      // Retry-After honoured as given
            (after(503, 7200), 1, 0.0, retry(3600)),  // ... up to max_delay
            (after(500, 0), 5, 0.0, retry(0)),
            (after(200, 30), 1, 0.0, Decision::Ack),
            (after(410, 30), 1, 0.0, Decision::Drop),
        ];
        for (attempt, attempts, jitter, want) in table {
            assert_eq!(
                p.decide(&attempt, attempts, jitter),
                want,
                "{attempt:?} at attempts={attempts}"
            );
        }
    }

    #[test]
    fn only_a_429_or_503_with_retry_after_at_the_floor_pauses_the_consumer() {
        let p = policy();
        let after = |s, secs| Attempt::Status {
            status: s,
            retry_after: Some(Duration::from_secs(secs)),
        };
        let pause = |a: &Attempt, h| p.verdict(a, 1, 1.0, h).pause;
        let secs = |s| Some(Duration::from_secs(s));
        // (attempt, pause at the floor); with headroom nothing pauses.
        let table = [
            (after(429, 30), secs(30)),
            (after(503, 7), secs(7)),
            (after(503, 7200), secs(3600)), // capped at max_delay
            (after(500, 30), None),
            (after(408, 30), None),
            (status(429), None), // no Retry-After: the limit and the backoff do it
            (status(503), None),
            (Attempt::Timeout, None),
        ];
        for (attempt, want) in table {
            assert_eq!(pause(&attempt, Headroom::AtFloor), want, "{attempt:?}");
            assert_eq!(pause(&attempt, Headroom::CanShrink), None, "{attempt:?}");
        }
        // The message's own decision is the plain policy's.
        let v = p.verdict(&after(429, 30), 1, 0.0, Headroom::AtFloor);
        assert_eq!(v.decision, retry(30));
    }

    #[test]
    fn nothing_dropped_without_configuration() {
        let p = Policy {
            success_statuses: vec![],
            drop_statuses: vec![],
            retry_statuses: vec![],
            ..policy()
        };
        for s in 100..600u16 {
            let d = p.decide(&status(s), 1, 0.3);
            if (200..300).contains(&s) {
                assert_eq!(d, Decision::Ack);
            } else {
                assert!(matches!(d, Decision::Retry { .. }), "{s} -> {d:?}");
            }
        }
    }

    #[test]
    fn backoff_bounds() {
        let base = Duration::from_secs(5);
        let max = Duration::from_secs(3600);
        for attempts in 0..200u32 {
            let full = if attempts <= 1 {
                base
            } else {
                base.saturating_mul(1 << (attempts - 1).min(20)).min(max)
            };
            for j in [0.0, 0.25, 0.5, 0.999, 1.0, -3.0, 7.0] {
                let d = backoff(base, max, attempts, j);
                assert!(d <= max, "attempts={attempts} {d:?}");
                assert!(d <= full, "attempts={attempts} j={j} {d:?} > {full:?}");
                assert!(
                    d >= full / 2,
                    "attempts={attempts} j={j} {d:?} < {full:?}/2"
                );
            }
        }
        assert_eq!(backoff(Duration::ZERO, max, 9, 1.0), Duration::ZERO);
        assert_eq!(backoff(base, max, u32::MAX, 1.0), max);
        let day = Duration::from_secs(86_400);
        assert_eq!(backoff(Duration::from_secs(1), day, 64, 1.0), day);
    }

    #[test]
    fn delay_seconds_rounds_up_and_caps() {
        assert_eq!(delay_seconds(Duration::ZERO), 0);
        assert_eq!(delay_seconds(Duration::from_millis(1)), 1);
        assert_eq!(delay_seconds(Duration::from_millis(2500)), 3);
        assert_eq!(delay_seconds(Duration::from_secs(5)), 5);
        assert_eq!(delay_seconds(Duration::from_secs(100_000)), 43_200);
        assert_eq!(delay_seconds(Duration::from_secs(43_201)), 43_200);
    }
}
