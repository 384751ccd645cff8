//! Adaptive concurrency: how many webhook requests one consumer keeps in flight. A pure
//! controller (no I/O, no clock of its own) that the worker feeds one sample per finished
//! request — its round-trip time and its outcome class — and that answers with the new limit.
//!
//! The algorithm is AIMD on latency and back-pressure, the shape of TCP and of Vector's
//! Adaptive Request Concurrency, with a slow start so that a far-away receiver is reached in a
//! few round trips instead of minutes:
//! - time is cut into windows of about one round trip (the RTT baseline);
//! - a back-pressure answer (429, 503, 408, a timeout) shrinks the limit by
//!   `BACK_PRESSURE_DECREASE` at once, then, for one round trip, each further back-pressure
//!   answer removes its own slot (a receiver past its capacity answers 503 in a millisecond,
//!   so an excess slot would spin), down to at most half the limit before the decrease;
//! - a window whose mean RTT climbed past `baseline × (1 + RTT_TOLERANCE)`, and by more than
//!   `RTT_SLACK`, shrinks it too;
//! - otherwise, if the window used the limit (requests really waited on it), the limit grows:
//!   it doubles while in slow start (until the first congestion signal), else grows by one
//!   request plus a share that scales with √limit (so a large limit regains its room in tens
//!   of round trips, not hundreds).
//! - the RTT baseline is the lowest window mean seen, drifting slowly up towards newer means so
//!   that a receiver that became slower for good is not read as congested forever.
//!
//! One sample is one *request*: a request carrying N messages (batch delivery) takes one slot
//! and reports one sample.
//!
//! `cfq-bench simulate` runs this controller and the other candidates against simulated
//! receivers; the README's Performance section has the figures that chose it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, futures::Notified};
use tokio::time::Instant;

/// How a request ended, as far as the controller cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver answered (any status that is not back-pressure): the RTT is a sample.
    Answered,
    /// The receiver pushed back: 429, 503, 408, or the request timed out.
    Overloaded,
    /// Nothing to learn from it (connection refused, a body that could not be sent...): the
    /// breaker and the retry policy deal with those.
    Ignored,
}

/// How the limit moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Follow the receiver, between `MIN_LIMIT` and the configured maximum.
    Adaptive,
    /// Always the configured maximum.
    Fixed,
}

/// The smallest limit the controller goes down to.
pub const MIN_LIMIT: usize = 1;
/// The limit a consumer starts with (capped by the maximum).
pub const INITIAL_LIMIT: usize = 64;
/// Multiplicative decrease on a window whose latency climbed past the baseline.
pub const DECREASE: f64 = 0.75;
/// Multiplicative decrease on a back-pressure answer (429, 503, 408, a timeout): gentler than
/// on latency, since the answer is exact and immediate (the receiver is at its capacity now,
/// not somewhere above it), and the round trip after it takes one more slot per further
/// answer anyway. With 0.75 the limit of the knee receiver (200 at once) swung between 150 and
/// 200, a mean of ~175; with 0.9 it keeps ~190 of the 200 (`cfq-bench simulate`).
pub const BACK_PRESSURE_DECREASE: f64 = 0.9;
/// A window's mean RTT this much above the baseline counts as congestion.
pub const RTT_TOLERANCE: f64 = 0.5;
/// ...and at least this much above it: a fast receiver's RTT of a millisecond or two wanders
/// by more than `RTT_TOLERANCE` with the scheduler of a busy machine (ours or the receiver's),
/// and a few milliseconds of queueing cost no throughput worth shrinking for. Without it, a
/// 1 ms receiver on a loaded machine drove the limit to ~10, the pulls to a handful of messages
/// and the relay's CPU per message up (bench scenario 1).
pub const RTT_SLACK: Duration = Duration::from_millis(5);
/// How far the baseline drifts towards a higher window mean per uncongested window.
const BASELINE_DRIFT: f64 = 0.005;
/// Windows never shorter than this, so that a 1 ms receiver does not adjust on noise.
const MIN_WINDOW: Duration = Duration::from_millis(10);

/// The controller of one consumer.
#[derive(Debug, Clone)]
pub struct Controller {
    mode: Mode,
    max: usize,
    limit: f64,
    slow_start: bool,
    baseline: Option<Duration>,
    window_start: Instant,
    window_sum: Duration,
    window_count: u32,
    window_overloaded: bool,
    /// The most slots in use seen during the window (reported by `in_use`).
    window_peak: usize,
    /// After a decrease on back-pressure, further back-pressure answers until this instant
    /// come from requests sent under the old limit: they do not shrink it again.
    recovering_until: Instant,
    /// The lowest the limit goes while recovering: half of what it was before the decrease.
    recovery_floor: f64,
}

impl Controller {
    pub fn new(mode: Mode, max: usize, now: Instant) -> Self {
        let max = max.max(MIN_LIMIT);
        let limit = match mode {
            Mode::Adaptive => INITIAL_LIMIT.clamp(MIN_LIMIT, max),
            Mode::Fixed => max,
        };
        Self {
            mode,
            max,
            limit: limit as f64,
            slow_start: true,
            baseline: None,
            window_start: now,
            window_sum: Duration::ZERO,
            window_count: 0,
            window_overloaded: false,
            window_peak: 0,
            recovering_until: now,
            recovery_floor: MIN_LIMIT as f64,
        }
    }

    /// Requests that may be in flight now.
    pub fn limit(&self) -> usize {
        self.limit as usize
    }

    /// The configured upper bound.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The RTT the receiver answers in when not loaded, once known.
    pub fn baseline(&self) -> Option<Duration> {
        self.baseline
    }

    /// `n` slots are in use right now: the limit grows only in windows where it was used.
    pub fn in_use(&mut self, n: usize) {
        self.window_peak = self.window_peak.max(n);
    }

    /// A request ended after `rtt` with `outcome`; returns the limit afterwards.
    pub fn sample(&mut self, now: Instant, rtt: Duration, outcome: Outcome) -> usize {
        if self.mode == Mode::Fixed {
            return self.limit();
        }
        match outcome {
            Outcome::Answered => {
                self.window_sum += rtt;
                self.window_count += 1;
            }
            Outcome::Overloaded => {
                // React at once, not at the end of the window: a receiver past its capacity
                // answers 503 in a millisecond, so every excess slot would spin on 503s.
                if now >= self.recovering_until {
                    self.recovery_floor = (self.limit * 0.5).max(MIN_LIMIT as f64);
                    self.window_overloaded = true;
                    let window = self.baseline.unwrap_or(rtt).max(MIN_WINDOW);
                    self.end_window(now);
                    self.recovering_until = now + window;
                } else {
                    // Within the round trip after a decrease, each further back-pressure
                    // answer gives up its own slot: a slot past the receiver's capacity
                    // would otherwise be refilled at once and turned away again.
                    // At most a halving per round trip, though: the answers of one burst
                    // must not take the limit to nothing.
                    self.limit = (self.limit - 1.0).max(self.recovery_floor);
                }
                return self.limit();
            }
            Outcome::Ignored => {}
        }
        let window = self.baseline.unwrap_or(rtt).max(MIN_WINDOW);
        if now.saturating_duration_since(self.window_start) >= window {
            self.end_window(now);
        }
        self.limit()
    }

    fn end_window(&mut self, now: Instant) {
        let mean = (self.window_count > 0).then(|| self.window_sum / self.window_count);
        let baseline = match (self.baseline, mean) {
            (None, Some(m)) => Some(m),
            (Some(b), Some(m)) if m < b => Some(m),
            (b, _) => b,
        };
        let slow = match (baseline, mean) {
            (Some(b), Some(m)) => {
                m.as_secs_f64() > b.as_secs_f64() * (1.0 + RTT_TOLERANCE) && m > b + RTT_SLACK
            }
            _ => false,
        };
        if self.window_overloaded || slow {
            let factor = if self.window_overloaded && !slow {
                BACK_PRESSURE_DECREASE
            } else {
                DECREASE
            };
            self.limit = (self.limit * factor).max(MIN_LIMIT as f64);
            self.slow_start = false;
            self.baseline = baseline;
        } else {
            // Follow a receiver that became slower for good, a little at a time.
            self.baseline = match (baseline, mean) {
                (Some(b), Some(m)) if m > b => Some(b + (m - b).mul_f64(BASELINE_DRIFT)),
                (b, _) => b,
            };
            // Grow only when the limit was what held requests back.
            if mean.is_some() && self.window_peak as f64 >= self.limit * 0.9 {
                self.limit = if self.slow_start {
                    self.limit * 2.0
                } else {
                    self.limit + 1.0 + self.limit.sqrt() / 4.0
                };
            }
        }
        self.limit = self.limit.clamp(MIN_LIMIT as f64, self.max as f64);
        self.window_start = now;
        self.window_sum = Duration::ZERO;
        self.window_count = 0;
        self.window_overloaded = false;
        self.window_peak = 0;
    }
}

/// The controller applied to a semaphore of message slots. The controller counts requests; a
/// request carries up to `per_request` messages (1 for single deliveries, `max_messages` in
/// batch mode), so the pool holds `limit × per_request` slots, never more than the configured
/// `concurrency`. A shrinking limit never takes a slot from a request (or a held message):
/// permits in use are forgotten as they come back.
#[derive(Debug)]
pub struct Limiter {
    slots: Arc<Semaphore>,
    changed: Notify,
    /// Messages one request carries at most.
    per_request: usize,
    /// The configured bound on messages held.
    max_slots: usize,
    inner: Mutex<LimiterState>,
}

#[derive(Debug)]
struct LimiterState {
    controller: Controller,
    /// Permits that exist beyond the limit (in use when the limit shrank); forgotten as they
    /// are released.
    debt: usize,
}

impl Limiter {
    /// `max_slots` messages held at most; each request carries up to `per_request` of them.
    pub fn new(mode: Mode, max_slots: usize, per_request: usize) -> Self {
        let per_request = per_request.max(1);
        let max_slots = max_slots.max(1);
        let controller = Controller::new(mode, max_slots.div_ceil(per_request), Instant::now());
        let limiter = Self {
            slots: Arc::new(Semaphore::new(0)),
            changed: Notify::new(),
            per_request,
            max_slots,
            inner: Mutex::new(LimiterState {
                controller,
                debt: 0,
            }),
        };
        limiter
            .slots
            .add_permits(limiter.pool(limiter.request_limit()));
        limiter
    }

    /// Message slots for a limit of `requests`.
    fn pool(&self, requests: usize) -> usize {
        requests
            .saturating_mul(self.per_request)
            .min(self.max_slots)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LimiterState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The permits: acquire one per slot; dropping the permit frees the slot.
    pub fn slots(&self) -> &Arc<Semaphore> {
        &self.slots
    }

    /// Message slots the limit allows now (= the request limit for single deliveries).
    pub fn limit(&self) -> usize {
        self.pool(self.request_limit())
    }

    /// Message slots taken now (deliveries in flight and messages held).
    pub fn in_use(&self) -> usize {
        let g = self.lock();
        (self.pool(g.controller.limit()) + g.debt).saturating_sub(self.slots.available_permits())
    }

    /// Requests the controller allows in flight now.
    pub fn request_limit(&self) -> usize {
        self.lock().controller.limit()
    }

    pub fn baseline(&self) -> Option<Duration> {
        self.lock().controller.baseline()
    }

    /// A request ended: feed the controller and resize the pool. Returns the new request limit.
    pub fn sample(&self, rtt: Duration, outcome: Outcome) -> usize {
        let mut g = self.lock();
        let before = self.pool(g.controller.limit());
        let in_use = (before + g.debt).saturating_sub(self.slots.available_permits());
        g.controller.in_use(in_use.div_ceil(self.per_request));
        let requests = g.controller.sample(Instant::now(), rtt, outcome);
        let after = self.pool(requests);
        if after > before {
            let grow = after - before;
            let repaid = grow.min(g.debt);
            g.debt -= repaid;
            self.slots.add_permits(grow - repaid);
        } else if after < before {
            g.debt += before - after;
        }
        Self::settle_locked(&self.slots, &mut g);
        drop(g);
        if after != before {
            self.changed.notify_waiters();
        }
        requests
    }

    /// Completes at the next change of the limit (for a waiter sized on the old one).
    pub fn changed(&self) -> Notified<'_> {
        self.changed.notified()
    }

    /// Give slots back. Slots the limit no longer allows are forgotten here, before a waiting
    /// poller could take them: a released permit goes straight to a waiter.
    pub fn release(&self, mut permit: OwnedSemaphorePermit) {
        let mut g = self.lock();
        let owed = g.debt.min(permit.num_permits());
        if owed > 0 {
            g.debt -= owed;
            // `owed` is at most what the permit holds, so the split succeeds.
            if let Some(p) = permit.split(owed) {
                p.forget();
            }
        }
        drop(g);
        drop(permit);
    }

    /// Forget released permits the limit no longer allows.
    pub fn settle(&self) {
        let mut g = self.lock();
        Self::settle_locked(&self.slots, &mut g);
    }

    fn settle_locked(slots: &Semaphore, g: &mut LimiterState) {
        if g.debt > 0 {
            g.debt -= slots.forget_permits(g.debt);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Runs `rounds` windows where every slot is used and each request takes `rtt(limit)`,
    /// answering with `outcome(limit)`. Returns the limits at the end of each round.
    fn drive(
        c: &mut Controller,
        t: &mut Instant,
        rounds: usize,
        rtt: impl Fn(usize) -> Duration,
        outcome: impl Fn(usize, usize) -> Outcome,
    ) -> Vec<usize> {
        let mut out = Vec::new();
        for _ in 0..rounds {
            let l = c.limit();
            let d = rtt(l);
            c.in_use(l);
            *t += d;
            for i in 0..l {
                c.sample(*t, d, outcome(l, i));
            }
            out.push(c.limit());
        }
        out
    }

    #[test]
    fn slow_start_reaches_the_maximum_in_a_few_round_trips() {
        let mut t = Instant::now();
        let mut c = Controller::new(Mode::Adaptive, 1000, t);
        assert_eq!(c.limit(), INITIAL_LIMIT);
        let limits = drive(&mut c, &mut t, 8, |_| 150 * MS, |_, _| Outcome::Answered);
        assert_eq!(*limits.last().unwrap(), 1000, "{limits:?}");
        assert_eq!(c.baseline(), Some(150 * MS));
    }

    #[test]
    fn back_pressure_shrinks_multiplicatively_then_growth_is_additive() {
        let mut t = Instant::now();
        let mut c = Controller::new(Mode::Adaptive, 1000, t);
        // A receiver that serves 200 at once and turns away the rest.
        let limits = drive(
            &mut c,
            &mut t,
            60,
            |_| 100 * MS,
            // The requests past the first 200 are turned away.
            |_, i| {
                if i >= 200 {
                    Outcome::Overloaded
                } else {
                    Outcome::Answered
                }
            },
        );
        let tail = &limits[20..];
        assert!(
            tail.iter().all(|l| (100..=260).contains(l)),
            "limit settles around the knee: {limits:?}"
        );
        let over = tail.iter().filter(|l| **l > 200).count();
        assert!(over * 4 < tail.len(), "mostly under the knee: {limits:?}");
        // A back-pressure answer is exact: the decrease is gentle, the limit stays close.
        let mean = tail.iter().sum::<usize>() as f64 / tail.len() as f64;
        assert!(mean >= 180.0, "mean {mean}: {limits:?}");
    }

    #[test]
    fn latency_climbing_past_the_baseline_shrinks_the_limit() {
        let mut t = Instant::now();
        let mut c = Controller::new(Mode::Adaptive, 1000, t);
        // 20 ms unloaded; beyond 100 in flight the receiver queues (2,000 req/s of service).
        let rtt = |l: usize| 20 * MS + MS.mul_f64((l.saturating_sub(40)) as f64 / 2.0);
        let limits = drive(&mut c, &mut t, 80, rtt, |_, _| Outcome::Answered);
        let tail = &limits[30..];
        assert!(
            tail.iter().all(|l| *l <= 110),
            "limit stays near the point where latency starts to grow: {limits:?}"
        );
        assert!(tail.iter().all(|l| *l >= 20), "{limits:?}");
    }

    #[test]
    fn an_idle_consumer_does_not_grow_its_limit() {
        let mut t = Instant::now();
        let mut c = Controller::new(Mode::Adaptive, 1000, t);
        for _ in 0..100 {
            c.in_use(1);
            t += 50 * MS;
            c.sample(t, 50 * MS, Outcome::Answered);
        }
        assert_eq!(c.limit(), INITIAL_LIMIT);
    }

    #[test]
    fn fixed_mode_never_moves() {
        let mut t = Instant::now();
        let mut c = Controller::new(Mode::Fixed, 64, t);
        let limits = drive(&mut c, &mut t, 10, |_| 10 * MS, |_, _| Outcome::Overloaded);
        assert!(limits.iter().all(|l| *l == 64));
    }

    #[test]
    fn ignored_outcomes_do_not_move_the_limit_down() {
        let mut t = Instant::now();
        let mut c = Controller::new(Mode::Adaptive, 100, t);
        let limits = drive(&mut c, &mut t, 5, |_| 10 * MS, |_, _| Outcome::Ignored);
        assert!(limits.iter().all(|l| *l == INITIAL_LIMIT), "{limits:?}");
    }

    #[test]
    fn never_below_one_nor_above_the_maximum() {
        let mut t = Instant::now();
        let mut c = Controller::new(Mode::Adaptive, 5, t);
        assert_eq!(c.limit(), 5);
        let limits = drive(&mut c, &mut t, 40, |_| 10 * MS, |_, _| Outcome::Overloaded);
        assert_eq!(*limits.last().unwrap(), MIN_LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn the_pool_follows_the_limit_without_taking_slots_in_use() {
        let l = Limiter::new(Mode::Adaptive, 100, 1);
        assert_eq!(l.slots().available_permits(), INITIAL_LIMIT);
        assert_eq!(INITIAL_LIMIT, 64);
        let held = l.slots().clone().try_acquire_many_owned(64).unwrap();
        tokio::time::advance(Duration::from_millis(20)).await;
        let after = l.sample(Duration::from_millis(20), Outcome::Overloaded);
        assert_eq!(after, 57);
        // The 7 slots too many are in use: nothing to forget yet.
        assert_eq!(l.slots().available_permits(), 0);
        // Released, they are forgotten before anyone else can take them.
        l.release(held);
        assert_eq!(l.slots().available_permits(), 57);
        // Growing again adds permits.
        let held = l.slots().clone().try_acquire_many_owned(57).unwrap();
        tokio::time::advance(Duration::from_millis(20)).await;
        let grown = l.sample(Duration::from_millis(20), Outcome::Answered);
        assert!(grown > 57, "{grown}");
        assert_eq!(l.slots().available_permits(), grown - 57);
        drop(held);
        assert_eq!(l.slots().available_permits(), grown);
    }

    #[test]
    fn scheduler_noise_on_a_fast_receiver_does_not_collapse_the_limit() {
        // A 1 ms receiver on a busy machine: the RTT wanders between 0.3 and 2.5 ms with the
        // scheduler (for about a window at a time), not with the load. Nothing is queueing at
        // the receiver: the limit must stay high enough for the pulls to stay full.
        let mut t = Instant::now();
        let mut c = Controller::new(Mode::Adaptive, 1000, t);
        let noise = [300, 2500, 700, 1900, 400, 2200, 900, 1500];
        let k = std::cell::Cell::new(0);
        let limits = drive(
            &mut c,
            &mut t,
            200,
            |_| {
                k.set(k.get() + 1);
                Duration::from_micros(noise[(k.get() / 8) % noise.len()])
            },
            |_, _| Outcome::Answered,
        );
        let tail = &limits[100..];
        assert!(tail.iter().all(|l| *l >= 32), "{limits:?}");
    }

    #[tokio::test]
    async fn batch_requests_count_once_and_hold_their_messages() {
        // 1,000 messages held at most, 50 a request: the controller counts 20 requests.
        let l = Limiter::new(Mode::Adaptive, 1000, 50);
        assert_eq!((l.request_limit(), l.limit()), (20, 1000));
        assert_eq!(l.slots().available_permits(), 1000);
        // One overloaded request shrinks the limit by whole requests' worth of messages.
        let requests = l.sample(Duration::from_millis(100), Outcome::Overloaded);
        assert_eq!(requests, 18);
        assert_eq!(l.limit(), 900);
        assert_eq!(l.slots().available_permits(), 900);
        // Fixed: always `concurrency` messages, whatever a request carries.
        let f = Limiter::new(Mode::Fixed, 1000, 30);
        assert_eq!((f.request_limit(), f.limit()), (34, 1000));
    }
}
