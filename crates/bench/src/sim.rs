//! `cfq-bench simulate`: the evidence for the adaptive concurrency algorithm. Runs candidate
//! controllers against simulated receivers (event-driven, simulated time: deterministic and
//! instant) and prints one Markdown table. The sender always has messages waiting, as a
//! consumer with a backlog does; each request's round trip is decided by the receiver model.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use cfq_relay::concurrency::{Controller, Mode, Outcome};
use tokio::time::Instant;

/// How a simulated receiver answers a request that arrives while `others` are being served.
#[derive(Clone, Copy)]
pub enum Receiver {
    /// Serves `capacity` at once in `latency` each; beyond that answers 503 after 1 ms.
    Knee { capacity: usize, latency: Duration },
    /// Answers after `base + per_other × others` (latency grows with load).
    Growing { base: Duration, per_other: Duration },
}

impl Receiver {
    fn answer(&self, others: usize) -> (Duration, bool) {
        match *self {
            Receiver::Knee { capacity, latency } => {
                if others >= capacity {
                    (Duration::from_millis(1), true)
                } else {
                    (latency, false)
                }
            }
            Receiver::Growing { base, per_other } => (base + per_other * others as u32, false),
        }
    }

    fn name(&self) -> String {
        match *self {
            Receiver::Knee { capacity, latency } => format!(
                "capacity knee: {capacity} at once, {} ms, 503 beyond",
                latency.as_millis()
            ),
            Receiver::Growing { base, per_other } => format!(
                "latency grows: {} ms + {} µs per request in progress",
                base.as_millis(),
                per_other.as_micros()
            ),
        }
    }
}

/// A controller under test.
trait Candidate {
    fn limit(&self) -> usize;
    fn sample(&mut self, now: Instant, rtt: Duration, overloaded: bool, in_use: usize);
}

/// The relay's controller (`cfq_relay::concurrency`).
struct Ours(Controller);

impl Candidate for Ours {
    fn limit(&self) -> usize {
        self.0.limit()
    }
    fn sample(&mut self, now: Instant, rtt: Duration, overloaded: bool, in_use: usize) {
        self.0.in_use(in_use);
        let o = if overloaded {
            Outcome::Overloaded
        } else {
            Outcome::Answered
        };
        self.0.sample(now, rtt, o);
    }
}

/// AIMD on back-pressure only (TCP Reno without a latency signal): +1 per window of one
/// RTT, ×0.5 on a window with a 503.
struct AimdLoss {
    limit: f64,
    max: f64,
    window_start: Option<Instant>,
    overloaded: bool,
}

impl Candidate for AimdLoss {
    fn limit(&self) -> usize {
        self.limit as usize
    }
    fn sample(&mut self, now: Instant, rtt: Duration, overloaded: bool, _in_use: usize) {
        self.overloaded |= overloaded;
        let start = *self.window_start.get_or_insert(now);
        if now - start >= rtt.max(Duration::from_millis(10)) {
            self.limit = if self.overloaded {
                (self.limit * 0.5).max(1.0)
            } else {
                (self.limit + 1.0).min(self.max)
            };
            self.overloaded = false;
            self.window_start = Some(now);
        }
    }
}

/// A Netflix concurrency-limits algorithm: the next limit from an RTT sample. A 503 counts as
/// a drop for all of them (×0.9 here: Vegas itself only reacts to drops by reducing).
trait RttRule {
    fn next(&mut self, limit: f64, rtt: Duration) -> f64;
}

/// A limit driven by an [`RttRule`], between 1 and `max`.
struct Netflix<R> {
    limit: f64,
    max: f64,
    rule: R,
}

impl<R: RttRule> Netflix<R> {
    fn new(max: usize, rule: R) -> Self {
        Self {
            limit: 32.0,
            max: max as f64,
            rule,
        }
    }
}

impl<R: RttRule> Candidate for Netflix<R> {
    fn limit(&self) -> usize {
        self.limit as usize
    }
    fn sample(&mut self, _now: Instant, rtt: Duration, overloaded: bool, _in_use: usize) {
        self.limit = if overloaded {
            (self.limit * 0.9).max(1.0)
        } else {
            self.rule.next(self.limit, rtt).clamp(1.0, self.max)
        };
    }
}

/// Vegas: queue estimate = limit × (1 − rtt_noload / rtt); grow by log10(limit) under alpha,
/// shrink over beta.
#[derive(Default)]
struct Vegas {
    rtt_noload: Option<Duration>,
}

impl RttRule for Vegas {
    fn next(&mut self, limit: f64, rtt: Duration) -> f64 {
        let noload = *self.rtt_noload.get_or_insert(rtt);
        if rtt < noload {
            self.rtt_noload = Some(rtt);
        }
        let noload = self.rtt_noload.unwrap_or(rtt).as_secs_f64();
        let queue = (limit * (1.0 - noload / rtt.as_secs_f64())).ceil();
        let log = limit.log10().max(1.0);
        let (alpha, beta) = (3.0 * log, 6.0 * log);
        // Netflix applies the change per sample, scaled down; per-sample steps of log/limit
        // make one round trip's worth of samples move the limit by about `log`.
        let step = log / limit.max(1.0);
        if queue <= alpha {
            limit + step
        } else if queue >= beta {
            limit - step
        } else {
            limit
        }
    }
}

/// Gradient2: limit ← limit·(long RTT / short RTT) + √limit, smoothed by 0.2; the long RTT is
/// an EWMA over ~600 samples.
#[derive(Default)]
struct Gradient2 {
    long: Option<f64>,
    short: Option<f64>,
}

impl RttRule for Gradient2 {
    fn next(&mut self, limit: f64, rtt: Duration) -> f64 {
        let r = rtt.as_secs_f64();
        let long = self.long.map_or(r, |l| l + (r - l) / 600.0);
        let short = self.short.map_or(r, |s| s + (r - s) / 10.0);
        self.long = Some(long);
        self.short = Some(short);
        let gradient = (long * 2.0 / short).clamp(0.5, 1.0);
        let new = limit * gradient + limit.sqrt();
        let per_sample = 0.2 / limit.max(1.0);
        limit * (1.0 - per_sample) + new * per_sample
    }
}

/// What one candidate did against one receiver.
pub struct Outcomes {
    pub served_per_s: f64,
    pub overloaded_pct: f64,
    pub mean_latency_ms: f64,
    pub mean_limit: f64,
    pub seconds_to_90pct: Option<f64>,
}

/// Run one candidate against one receiver for `secs` simulated seconds.
fn run(rx: Receiver, c: &mut dyn Candidate, secs: u64) -> Outcomes {
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(secs);
    // Statistics skip the first 20 % (the ramp).
    let measure_from = t0 + Duration::from_secs(secs) / 5;
    let mut heap: BinaryHeap<Reverse<(Instant, u64, Duration, bool)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut serving = 0usize;
    let mut now = t0;
    let (mut served, mut overloaded, mut latency_sum) = (0u64, 0u64, 0f64);
    let (mut limit_sum, mut limit_n) = (0f64, 0u64);
    let mut per_second: Vec<u64> = vec![0; secs as usize + 1];
    loop {
        // Fill up to the limit: the sender always has work.
        while heap.len() < c.limit() {
            let (rtt, over) = rx.answer(serving);
            serving += usize::from(!over);
            seq += 1;
            heap.push(Reverse((now + rtt, seq, rtt, over)));
        }
        let Some(Reverse((at, _, rtt, over))) = heap.pop() else {
            break;
        };
        if at >= end {
            break;
        }
        now = at;
        serving -= usize::from(!over);
        let in_use = heap.len() + 1;
        c.sample(now, rtt, over, in_use);
        if over {
            if now >= measure_from {
                overloaded += 1;
            }
        } else {
            per_second[(now - t0).as_secs() as usize] += 1;
            if now >= measure_from {
                served += 1;
                latency_sum += rtt.as_secs_f64() * 1000.0;
            }
        }
        if now >= measure_from {
            limit_sum += c.limit() as f64;
            limit_n += 1;
        }
    }
    let span = (end - measure_from).as_secs_f64();
    let rate = served as f64 / span;
    Outcomes {
        served_per_s: rate,
        overloaded_pct: 100.0 * overloaded as f64 / (served + overloaded).max(1) as f64,
        mean_latency_ms: latency_sum / served.max(1) as f64,
        mean_limit: limit_sum / limit_n.max(1) as f64,
        seconds_to_90pct: per_second
            .iter()
            .position(|n| *n as f64 >= 0.9 * rate)
            .map(|s| s as f64 + 1.0),
    }
}

/// Every candidate against every receiver, as a Markdown table.
pub fn table(max: usize, secs: u64) -> String {
    let receivers = [
        Receiver::Knee {
            capacity: 200,
            latency: Duration::from_millis(100),
        },
        Receiver::Growing {
            base: Duration::from_millis(20),
            per_other: Duration::from_micros(500),
        },
        Receiver::Knee {
            capacity: 10_000,
            latency: Duration::from_millis(150),
        },
    ];
    let mut out = String::from(
        "| receiver | controller | served/s | overloaded % | mean latency ms | mean limit | s to 90 % |\n|---|---|---|---|---|---|---|\n",
    );
    for rx in receivers {
        let now = Instant::now();
        let mut candidates: Vec<(&str, Box<dyn Candidate>)> = vec![
            (
                "fixed",
                Box::new(Ours(Controller::new(Mode::Fixed, max, now))),
            ),
            (
                "AIMD on 503 only",
                Box::new(AimdLoss {
                    limit: 32.0,
                    max: max as f64,
                    window_start: None,
                    overloaded: false,
                }),
            ),
            ("Vegas", Box::new(Netflix::new(max, Vegas::default()))),
            (
                "Gradient2",
                Box::new(Netflix::new(max, Gradient2::default())),
            ),
            (
                "cfq-relay (AIMD: 503 + RTT, slow start)",
                Box::new(Ours(Controller::new(Mode::Adaptive, max, now))),
            ),
        ];
        for (name, c) in candidates.iter_mut() {
            let o = run(rx, c.as_mut(), secs);
            out.push_str(&format!(
                "| {} | {name} | {:.0} | {:.1} | {:.0} | {:.0} | {} |\n",
                rx.name(),
                o.served_per_s,
                o.overloaded_pct,
                o.mean_latency_ms,
                o.mean_limit,
                o.seconds_to_90pct
                    .map_or("never".to_owned(), |s| format!("{s:.0}"))
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netflix_candidates_cut_by_a_tenth_on_503_and_stay_within_bounds() {
        let now = Instant::now();
        let mut vegas = Netflix::new(40, Vegas::default());
        vegas.sample(now, Duration::from_millis(10), true, 32);
        assert_eq!(vegas.limit, 32.0 * 0.9);
        // Steady RTTs: no queue, so Vegas grows, up to the bound and no further.
        for _ in 0..10_000 {
            vegas.sample(now, Duration::from_millis(10), false, 32);
        }
        assert_eq!(vegas.limit(), 40);
        let mut gradient = Netflix::new(40, Gradient2::default());
        for _ in 0..100 {
            gradient.sample(now, Duration::from_millis(10), true, 1);
        }
        assert_eq!(gradient.limit, 1.0);
    }

    #[test]
    fn the_relay_controller_backs_off_the_knee_receiver() {
        let knee = Receiver::Knee {
            capacity: 200,
            latency: Duration::from_millis(100),
        };
        let now = Instant::now();
        let fixed = run(knee, &mut Ours(Controller::new(Mode::Fixed, 1000, now)), 10);
        let ours = run(
            knee,
            &mut Ours(Controller::new(Mode::Adaptive, 1000, now)),
            10,
        );
        assert!(fixed.overloaded_pct > 50.0, "{}", fixed.overloaded_pct);
        assert!(ours.overloaded_pct < fixed.overloaded_pct);
        assert!(ours.served_per_s > 1_000.0, "{}", ours.served_per_s);
    }
}
