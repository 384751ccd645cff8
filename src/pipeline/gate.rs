//! What a consumer may send to its webhook right now: the circuit breaker (stop pulling while
//! the receiver keeps failing, probe with single deliveries, resume on success), a pause asked
//! for by the receiver's `Retry-After`, and the request-rate limit. The poller asks the gate how
//! much to pull, so waiting happens in Cloudflare's backlog, never against a held lease.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::BreakerConfig;

/// Breaker states; the numbers are the `cfq_relay_breaker_state` gauge values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

/// The poller's answer from the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Pull up to this many now; `pace` is the spacing to keep between their sends (rate limit).
    Now {
        max: usize,
        first_send: Option<Instant>,
        pace: Option<Duration>,
    },
    /// Ask again at this instant.
    Later(Instant),
}

/// A change of breaker state, for the caller to log and export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
}

#[derive(Debug)]
struct GateState {
    state: BreakerState,
    open_until: Instant,
    consecutive: u32,
    /// (when, failed) of recent deliveries inside the window.
    recent: VecDeque<(Instant, bool)>,
    probe_in_flight: bool,
    paused_until: Option<Instant>,
    /// Rate limit: the earliest instant the next send may start.
    next_send: Instant,
    /// The last delivery the webhook took (or the gate's creation).
    last_good: Instant,
    /// Back-pressure answers since `last_good`, and the largest limit in force meanwhile.
    overload_run: u32,
    overload_peak: usize,
    /// The webhook has taken a delivery since the gate was made.
    took_any: bool,
}

/// The gate of one consumer.
#[derive(Debug)]
pub struct Gate {
    breaker: BreakerConfig,
    /// Spacing between sends, if rate-limited.
    interval: Option<Duration>,
    inner: Mutex<GateState>,
}

/// How far ahead the rate limiter hands out send slots: what the poller pulls never waits
/// longer than this for its turn.
pub const RATE_HORIZON: Duration = Duration::from_secs(1);

impl Gate {
    pub fn new(breaker: BreakerConfig, max_requests_per_second: Option<f64>) -> Self {
        let now = Instant::now();
        Self {
            breaker,
            interval: max_requests_per_second
                .filter(|r| *r > 0.0)
                .map(|r| Duration::from_secs_f64(1.0 / r)),
            inner: Mutex::new(GateState {
                state: BreakerState::Closed,
                open_until: now,
                consecutive: 0,
                recent: VecDeque::new(),
                probe_in_flight: false,
                paused_until: None,
                next_send: now,
                last_good: now,
                overload_run: 0,
                overload_peak: 0,
                took_any: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The receiver asked for room (Retry-After on 429/503): no pulls before `until`.
    pub fn pause(&self, until: Instant) {
        let mut g = self.lock();
        g.paused_until = Some(g.paused_until.map_or(until, |p| p.max(until)));
    }

    /// How many messages the poller may pull now (at most `wanted`), or when to ask again.
    /// Reserves the rate-limit slots and, when half-open, the single probe.
    pub fn admit(&self, now: Instant, wanted: usize) -> (Admit, Option<Transition>) {
        let mut g = self.lock();
        if let Some(p) = g.paused_until {
            if now < p {
                return (Admit::Later(p), None);
            }
            g.paused_until = None;
        }
        let mut transition = None;
        let mut max = wanted;
        match g.state {
            BreakerState::Closed => {}
            BreakerState::Open => {
                if now < g.open_until {
                    return (Admit::Later(g.open_until), None);
                }
                g.state = BreakerState::HalfOpen;
                g.probe_in_flight = false;
                transition = Some(Transition {
                    from: BreakerState::Open,
                    to: BreakerState::HalfOpen,
                });
            }
            BreakerState::HalfOpen => {}
        }
        if g.state == BreakerState::HalfOpen {
            if g.probe_in_flight {
                // Ask again soon: the probe's outcome decides.
                return (Admit::Later(now + Duration::from_millis(100)), transition);
            }
            g.probe_in_flight = true;
            max = 1;
        }
        let Some(interval) = self.interval else {
            return (
                Admit::Now {
                    max,
                    first_send: None,
                    pace: None,
                },
                transition,
            );
        };
        let start = g.next_send.max(now);
        let horizon_end = now + RATE_HORIZON;
        if start >= horizon_end {
            if g.state == BreakerState::HalfOpen {
                g.probe_in_flight = false;
            }
            // Come back when one more slot fits in the horizon.
            return (Admit::Later(start + interval - RATE_HORIZON), transition);
        }
        let room = ((horizon_end - start).as_nanos() / interval.as_nanos().max(1)) as usize;
        let n = max.min(room.max(1));
        g.next_send = start + interval * n as u32;
        (
            Admit::Now {
                max: n,
                first_send: Some(start),
                pace: Some(interval),
            },
            transition,
        )
    }

    /// Record a delivery outcome (`failed`: the webhook did not take it). Returns a state change.
    pub fn record(&self, now: Instant, failed: bool) -> Option<Transition> {
        if !self.breaker.enabled {
            return None;
        }
        let mut g = self.lock();
        let window_start = now.checked_sub(self.breaker.window).unwrap_or(now);
        while g.recent.front().is_some_and(|(t, _)| *t < window_start) {
            g.recent.pop_front();
        }
        g.recent.push_back((now, failed));
        if !failed {
            g.last_good = now;
            g.overload_run = 0;
            g.overload_peak = 0;
            g.took_any = true;
        }
        g.consecutive = if failed { g.consecutive + 1 } else { 0 };
        let from = g.state;
        match (g.state, failed) {
            (BreakerState::HalfOpen, false) => {
                g.state = BreakerState::Closed;
                g.probe_in_flight = false;
                g.recent.clear();
            }
            (BreakerState::HalfOpen, true) => {
                g.state = BreakerState::Open;
                g.open_until = now + self.breaker.open_for;
                g.probe_in_flight = false;
            }
            (BreakerState::Closed, true) => {
                let total = g.recent.len() as u32;
                let failures = g.recent.iter().filter(|(_, f)| *f).count() as f64;
                let ratio_trips = total >= self.breaker.min_requests
                    && failures / f64::from(total) >= self.breaker.failure_ratio;
                if g.consecutive >= self.breaker.consecutive_failures || ratio_trips {
                    g.state = BreakerState::Open;
                    g.open_until = now + self.breaker.open_for;
                }
            }
            _ => {}
        }
        (g.state != from).then_some(Transition { from, to: g.state })
    }

    /// Record a back-pressure answer (429, 503, 408, a timeout) under the adaptive limit, with
    /// `limit` the limit in force when it came back. Back-pressure is the limit's business, not
    /// the breaker's, while the receiver still takes deliveries: such an answer is held out of
    /// the breaker's counts (it neither fails nor resets the run). The run counts — all of it,
    /// as the consecutive failures it was — once back-pressure is the receiver's only answer:
    /// the limit is down to its floor (`at_floor`), or a whole limit's worth of answers in a row
    /// turned requests away with none taken in between, or none was taken for `quiet`. While
    /// half-open it always counts (the probe's verdict).
    pub fn record_back_pressure(
        &self,
        now: Instant,
        limit: usize,
        at_floor: bool,
        quiet: Duration,
    ) -> Option<Transition> {
        {
            let mut g = self.lock();
            g.overload_run += 1;
            g.overload_peak = g.overload_peak.max(limit);
            let outage = at_floor || !Self::at_capacity_locked(&g, now, quiet);
            if !outage {
                return None;
            }
            // The run held back so far were failures in a row too.
            g.consecutive = g.consecutive.max(g.overload_run - 1);
        }
        self.record(now, true)
    }

    /// The back-pressure answers of late came from a receiver at its capacity, not from one that
    /// is down: the breaker is closed, the webhook took a delivery within `quiet`, and fewer
    /// answers than a whole limit's worth turned requests away since (see
    /// [`Self::record_back_pressure`], which counts the answer first). Only then is a request
    /// turned away worth sending again a round trip later.
    pub fn at_capacity(&self, now: Instant, quiet: Duration) -> bool {
        let g = self.lock();
        g.took_any && Self::at_capacity_locked(&g, now, quiet)
    }

    /// Since the last delivery taken (or the gate's creation), back-pressure is not all the
    /// receiver answers.
    fn at_capacity_locked(g: &GateState, now: Instant, quiet: Duration) -> bool {
        g.state == BreakerState::Closed
            && (g.overload_run as usize) < g.overload_peak
            && now.saturating_duration_since(g.last_good) < quiet
    }

    /// The half-open probe ended without a verdict (the pull came back empty or failed, or the
    /// message could not be decoded): let the next pull probe again.
    pub fn probe_unused(&self) {
        let mut g = self.lock();
        if g.state == BreakerState::HalfOpen {
            g.probe_in_flight = false;
        }
    }

    /// While open, held messages are handed back instead of delivered.
    pub fn is_open(&self) -> bool {
        self.lock().state == BreakerState::Open
    }

    /// How long handed-back messages should wait: until the breaker's probe.
    pub fn open_remaining(&self, now: Instant) -> Duration {
        let g = self.lock();
        g.open_until.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> BreakerConfig {
        BreakerConfig {
            enabled: true,
            consecutive_failures: 3,
            failure_ratio: 0.5,
            window: Duration::from_secs(10),
            min_requests: 10,
            open_for: Duration::from_secs(5),
        }
    }

    fn now_max(a: Admit) -> usize {
        match a {
            Admit::Now { max, .. } => max,
            Admit::Later(_) => 0,
        }
    }

    #[test]
    fn opens_on_consecutive_failures_probes_and_closes() {
        let g = Gate::new(breaker(), None);
        let t0 = Instant::now();
        assert_eq!(g.record(t0, true), None);
        assert_eq!(g.record(t0, false), None); // resets the run
        assert_eq!(g.record(t0, true), None);
        assert_eq!(g.record(t0, true), None);
        let tr = g.record(t0, true).unwrap();
        assert_eq!((tr.from, tr.to), (BreakerState::Closed, BreakerState::Open));
        assert!(g.is_open());
        assert_eq!(
            g.admit(t0 + Duration::from_secs(1), 100).0,
            Admit::Later(t0 + Duration::from_secs(5))
        );
        // After open_for: one probe of one message at a time.
        let t1 = t0 + Duration::from_secs(5);
        let (a, tr) = g.admit(t1, 100);
        assert_eq!(now_max(a), 1);
        assert_eq!(tr.unwrap().to, BreakerState::HalfOpen);
        assert!(
            matches!(g.admit(t1, 100).0, Admit::Later(_)),
            "one probe at a time"
        );
        // The probe fails: open again.
        assert_eq!(g.record(t1, true).unwrap().to, BreakerState::Open);
        let t2 = t1 + Duration::from_secs(5);
        assert_eq!(now_max(g.admit(t2, 100).0), 1);
        // The probe succeeds: closed, full pulls again.
        assert_eq!(g.record(t2, false).unwrap().to, BreakerState::Closed);
        assert_eq!(now_max(g.admit(t2, 100).0), 100);
    }

    #[test]
    fn opens_on_failure_ratio() {
        let g = Gate::new(
            BreakerConfig {
                consecutive_failures: 100,
                ..breaker()
            },
            None,
        );
        let t = Instant::now();
        // Alternate, failing first: never 3 in a row, and the ratio is at or over 0.5 from the
        // first failure on. Below `min_requests` (10) it must not open; the first failure from
        // the 10th request on opens it: the 11th (the 10th succeeds).
        let opened_at = (1..=20).find(|i| g.record(t, i % 2 == 1).is_some());
        assert_eq!(opened_at, Some(11));
        assert!(g.is_open());
    }

    #[test]
    fn disabled_breaker_never_opens() {
        let off = BreakerConfig {
            enabled: false,
            ..BreakerConfig::default()
        };
        let g = Gate::new(off, None);
        let t = Instant::now();
        for _ in 0..1000 {
            assert_eq!(g.record(t, true), None);
        }
        assert_eq!(now_max(g.admit(t, 7).0), 7);
    }

    #[test]
    fn pause_defers_pulls() {
        let g = Gate::new(BreakerConfig::default(), None);
        let t = Instant::now();
        g.pause(t + Duration::from_secs(3));
        g.pause(t + Duration::from_secs(1)); // a shorter pause does not shorten it
        assert_eq!(g.admit(t, 5).0, Admit::Later(t + Duration::from_secs(3)));
        assert_eq!(now_max(g.admit(t + Duration::from_secs(3), 5).0), 5);
    }

    #[test]
    fn rate_limit_hands_out_one_horizon_of_paced_slots() {
        let g = Gate::new(BreakerConfig::default(), Some(10.0));
        let t = Instant::now();
        let (a, _) = g.admit(t, 100);
        assert_eq!(
            a,
            Admit::Now {
                max: 10,
                first_send: Some(t),
                pace: Some(Duration::from_millis(100))
            }
        );
        // The next second is taken: come back when the horizon frees up.
        assert_eq!(
            g.admit(t, 100).0,
            Admit::Later(t + Duration::from_millis(100))
        );
        let (a, _) = g.admit(t + Duration::from_millis(300), 100);
        match a {
            Admit::Now {
                max, first_send, ..
            } => {
                assert_eq!(max, 3);
                assert_eq!(first_send, Some(t + Duration::from_secs(1)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn back_pressure_between_deliveries_never_opens_but_an_outage_does() {
        let mut cfg = breaker();
        cfg.consecutive_failures = 10;
        let g = Gate::new(cfg, None);
        let t0 = Instant::now();
        let quiet = Duration::from_secs(1);
        // A receiver past its capacity: bursts of 503s (fewer than the limit) between
        // deliveries. The breaker never opens, whatever the ratio.
        for round in 0..20 {
            for _ in 0..40 {
                assert_eq!(g.record_back_pressure(t0, 64, false, quiet), None);
            }
            assert_eq!(g.record(t0, false), None, "round {round}");
        }
        assert_eq!(g.lock().state, BreakerState::Closed);
        // An outage: nothing but 503s. A limit's worth in a row counts, as the run it was.
        for i in 1..16 {
            let tr = g.record_back_pressure(t0, 16, false, quiet);
            assert_eq!(tr, None, "answer {i}");
        }
        let tr = g.record_back_pressure(t0, 16, false, quiet).unwrap();
        assert_eq!(tr.to, BreakerState::Open);
    }

    #[test]
    fn back_pressure_counts_at_the_floor_or_after_a_quiet_spell() {
        let g = Gate::new(breaker(), None);
        let t0 = Instant::now();
        let quiet = Duration::from_secs(1);
        // At the floor each answer is a failure: 3 in a row open it.
        assert_eq!(g.record_back_pressure(t0, 1, true, quiet), None);
        assert_eq!(g.record_back_pressure(t0, 1, true, quiet), None);
        assert!(g.record_back_pressure(t0, 1, true, quiet).is_some());
        // Nothing through for `quiet`: counts though the limit is high.
        let g = Gate::new(breaker(), None);
        let late = t0 + Duration::from_secs(2);
        assert_eq!(g.record_back_pressure(late, 500, false, quiet), None);
        assert_eq!(g.record_back_pressure(late, 500, false, quiet), None);
        assert!(g.record_back_pressure(late, 500, false, quiet).is_some());
    }
}
