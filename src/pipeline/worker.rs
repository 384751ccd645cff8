//! One worker of the pool: delivers one held message in four named steps — [`admit`] (its
//! rate-limit turn, the breaker, its lease), [`prepare`] and [`post`] (refuse what cannot
//! travel, else send it), [`decide`] (the policy's verdict, fed to the adaptive limit and the
//! breaker) and [`report`] (count, log, and hand the verdict to the acker). The batch path
//! shares the steps it has in common.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::{debug, error, warn};

use crate::logs::{Event, esc};
use crate::pipeline::acker::{AckItem, AckKind};
use crate::pipeline::concurrency::{MIN_LIMIT, Outcome as Control};
use crate::pipeline::ctx::DeliveryCtx;
use crate::pipeline::gate::{BreakerState, Transition};
use crate::pipeline::policy::{Decision, Headroom, delay_seconds, jitter};
use crate::telemetry::{DeliveryOutcome, ReleaseReason};
use crate::webhook::Attempt;
use crate::webhook::delivery::{Message, Payload, decode_body};

/// Deliver one message; `slot` is its place in the pool and is released when this ends.
pub async fn deliver(ctx: Arc<DeliveryCtx>, mut msg: Message, slot: OwnedSemaphorePermit) {
    let _in_flight = InFlight::new(&ctx, 1);
    match admit(&ctx, &msg).await {
        Admission::Go => {}
        Admission::Release(reason) => {
            // Handed back unsent: if it was the half-open breaker's probe, the next pull probes.
            ctx.gate.probe_unused();
            release(&ctx, msg, reason).await;
            return ctx.limiter.release(slot);
        }
        Admission::BreakerOpen { delay_seconds } => {
            hold_back(&ctx, msg, delay_seconds).await;
            return ctx.limiter.release(slot);
        }
    }
    // `fed`: the answer was already fed to the limit and the breaker (weighed for a resend).
    let (tried, fed) = match prepare(&mut msg) {
        Err(refused) => (Tried::Refused(refused), false),
        Ok(payload) => {
            let mut resends = 0u32;
            loop {
                // The payload is reference-counted: a copy for a second send costs no body copy.
                let Some(tried) = post(&ctx, &msg, payload.clone()).await else {
                    release(&ctx, msg, ReleaseReason::Shutdown).await;
                    return ctx.limiter.release(slot);
                };
                let capacity = if resends < MAX_RESENDS {
                    turned_away_at_capacity(&ctx, &tried)
                } else {
                    None
                };
                if capacity == Some(true) {
                    // The receiver did not take it because it is full right now, not because
                    // it is down: send it again a round trip later, without spending one of the
                    // message's Cloudflare attempts on a retry delay.
                    resends += 1;
                    if let Err(reason) = wait_a_round_trip(&ctx, &msg).await {
                        ctx.limiter.release(slot);
                        return release(&ctx, msg, reason).await;
                    }
                    debug!(queue = %ctx.label, id = %esc(&msg.id), attempt = msg.attempts, resends,
                        "webhook at its capacity: sending again after a round trip");
                    continue;
                }
                observe_age(&ctx, msg.timestamp_ms);
                break (tried, capacity.is_some());
            }
        }
    };
    let decision = decide(&ctx, &tried, msg.attempts, fed);
    report(&ctx, msg, &tried, decision).await;
    ctx.limiter.release(slot);
}

/// Sends of one message, after the first, that a receiver at its capacity may turn away before
/// the message takes the retry policy's way (a Cloudflare retry after a delay). A receiver
/// that answers 503 to one message for its own reasons while taking the others sees it at
/// most 6 times per attempt, a round trip apart; the lease check bounds them in time.
const MAX_RESENDS: u32 = 5;

/// A 429/503 without `Retry-After`, under the adaptive limit, while at least half the limit is
/// in use and other deliveries go through ([`crate::pipeline::gate::Gate::at_capacity`]): the
/// receiver is full, not failing.
/// Feeds the answer to the limit and the breaker (as every answer) and says whether the
/// message is worth sending again at once. A `Retry-After`, the limit at its floor, the
/// fixed mode, a rate limit or a breaker that counted the answer keep the retry policy's way.
/// `None` when the answer was not such a 429/503 (and so was not fed to the limit and the
/// breaker here: [`decide`] feeds it), and when the policy does not retry it: a status listed
/// in `success_statuses` or `drop_statuses` is acked or dropped as configured, never resent.
fn turned_away_at_capacity(ctx: &DeliveryCtx, tried: &Tried) -> Option<bool> {
    let Tried::Answered { attempt, took, .. } = tried else {
        return None;
    };
    // A resend would not wait for the rate limiter's turn: with a rate limit, none.
    if ctx.fixed_limit
        || ctx.rate_limited
        || !matches!(
            attempt,
            Attempt::Status {
                status: 429 | 503,
                retry_after: None
            }
        )
        || !matches!(ctx.policy.decide(attempt, 1, 0.0), Decision::Retry { .. })
    {
        return None;
    }
    // Our own requests filled the receiver only if they used the limit: a 503 while a handful
    // is in flight under a large limit is the receiver's own trouble, not its capacity.
    let filled = ctx.limiter.in_use() * 2 >= ctx.limiter.limit();
    let limit_before = sample(ctx, *took, attempt);
    if let Some(t) = judge(ctx, attempt, true, Some(limit_before)) {
        breaker_changed(ctx, t);
        return Some(false);
    }
    Some(
        filled
            && ctx.limiter.request_limit() > MIN_LIMIT
            && ctx
                .gate
                .at_capacity(Instant::now(), back_pressure_quiet(ctx)),
    )
}

/// Let one round trip pass before a resend, as long as the lease leaves time for a delivery
/// and its ack; `Err` names why the message goes back instead. The round trip (the RTT
/// baseline, 1 ms to 1 s) lets the requests sent under the old limit finish: a resend at once
/// would meet the receiver as full as before (knee bench: some messages were turned away five
/// times within 100 µs). The message keeps its slot meanwhile, so messages held never pass
/// the pool (`concurrency` stays the bound of messages held) and the deliveries in flight
/// shrink by the ones waiting; the slot's release at the end pays any debt of the shrunk limit.
async fn wait_a_round_trip(ctx: &DeliveryCtx, msg: &Message) -> Result<(), ReleaseReason> {
    let last_start = msg
        .deadline
        .checked_sub(ctx.timeout + ctx.lease_margin)
        .unwrap_or(msg.deadline);
    let round_trip = ctx
        .limiter
        .baseline()
        .unwrap_or_default()
        .clamp(Duration::from_millis(1), Duration::from_secs(1));
    if Instant::now() + round_trip > last_start {
        return Err(ReleaseReason::Lease);
    }
    tokio::select! {
        () = tokio::time::sleep(round_trip) => Ok(()),
        () = ctx.shutdown.cancelled() => Err(ReleaseReason::Shutdown),
    }
}

/// Whether a held message may be sent now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    Go,
    /// Hand it back undelivered, with a zero-delay retry.
    Release(ReleaseReason),
    /// The breaker is open: hand it back until the breaker's next probe.
    BreakerOpen {
        delay_seconds: u32,
    },
}

/// Step 1: wait for the message's rate-limit turn (at most one horizon away: the poller pulled
/// only what fits), then let it through unless the breaker is open or its lease is too close
/// to its end for the request and the ack.
pub(super) async fn admit(ctx: &DeliveryCtx, msg: &Message) -> Admission {
    if let Some(at) = msg.not_before {
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {}
            _ = ctx.hard_stop.cancelled() => return Admission::Release(ReleaseReason::Shutdown),
        }
    }
    if ctx.gate.is_open() {
        return Admission::BreakerOpen {
            delay_seconds: delay_seconds(ctx.gate.open_remaining(Instant::now())),
        };
    }
    // Start only if the webhook can answer and the ack can land before the lease ends;
    // otherwise hand the message back now rather than deliver it twice.
    if Instant::now() + ctx.timeout + ctx.lease_margin > msg.deadline {
        if ctx.logs.allow(Event::LeaseTooClose) {
            warn!(queue = %ctx.label, id = %esc(&msg.id), attempt = msg.attempts,
                "lease too close to its end to deliver; handing the message back");
        }
        return Admission::Release(ReleaseReason::Lease);
    }
    Admission::Go
}

/// A message refused before any request: how it is counted and logged, and why.
#[derive(Debug)]
pub(super) struct Refused {
    pub(super) outcome: DeliveryOutcome,
    pub(super) event: Event,
    pub(super) detail: String,
}

/// What came of trying to deliver one message.
#[derive(Debug)]
pub(super) enum Tried {
    /// The webhook was asked; `took` is the request's duration.
    Answered {
        attempt: Attempt,
        took: Duration,
        detail: String,
    },
    Refused(Refused),
}

impl Tried {
    fn attempt(&self) -> &Attempt {
        match self {
            Tried::Answered { attempt, .. } => attempt,
            Tried::Refused(_) => &Attempt::Undecodable,
        }
    }

    fn took_ms(&self) -> Option<u64> {
        match self {
            Tried::Answered { took, .. } => Some(took.as_millis() as u64),
            Tried::Refused(_) => None,
        }
    }

    fn detail(&self) -> &str {
        match self {
            Tried::Answered { detail, .. } | Tried::Refused(Refused { detail, .. }) => detail,
        }
    }
}

/// Step 2a: take the body out of `msg` (it moves into the request: no copy of it is made on the
/// way to the socket) and check that the id can be a header and the body decodes within the
/// size limit (crate::webhook::guard).
pub(super) fn prepare(msg: &mut Message) -> Result<Payload, Refused> {
    if let Err(r) = crate::webhook::guard::check_id(&msg.id) {
        return Err(Refused {
            outcome: r.outcome(),
            event: r.event(),
            detail: r.to_string(),
        });
    }
    decode_checked(msg)
}

/// The body of `msg`, taken out, decoded for its content type and within the size limit.
pub(super) fn decode_checked(msg: &mut Message) -> Result<Payload, Refused> {
    let Some(body) = msg.body.take() else {
        return Err(Refused {
            outcome: DeliveryOutcome::Undecodable,
            event: Event::DeliveryFailed,
            detail: "the pulled message's body is missing or not a string".into(),
        });
    };
    let payload = decode_body(msg.content_type.as_deref(), body).map_err(|e| Refused {
        outcome: DeliveryOutcome::Undecodable,
        event: Event::DeliveryFailed,
        detail: e.to_string(),
    })?;
    crate::webhook::guard::check_body(payload.bytes.len()).map_err(|r| Refused {
        outcome: r.outcome(),
        event: r.event(),
        detail: r.to_string(),
    })?;
    Ok(payload)
}

/// Step 2b: POST it and record the answer; `None` when the shutdown grace ran out first.
async fn post(ctx: &DeliveryCtx, msg: &Message, payload: Payload) -> Option<Tried> {
    let started = Instant::now();
    let response = tokio::select! {
        // An answer that is there wins over the hard stop: handing back a message the webhook
        // took would only deliver it twice.
        biased;
        r = ctx.webhook.post(msg, payload) => r,
        _ = ctx.hard_stop.cancelled() => {
            warn!(queue = %ctx.label, id = %esc(&msg.id), "shutdown grace over: abandoning the delivery and handing the message back");
            return None;
        }
    };
    let took = started.elapsed();
    ctx.metrics
        .webhook(response.attempt.status_class(), took.as_secs_f64());
    Some(Tried::Answered {
        attempt: response.attempt,
        took,
        detail: response.detail,
    })
}

/// Step 3: the policy's verdict on the message. An answer also feeds the adaptive limit, may
/// pause the consumer (the verdict says so) and counts for the breaker, once: not again when
/// it was `fed` already; a refused message leaves the breaker's probe unused.
fn decide(ctx: &DeliveryCtx, tried: &Tried, attempts: u32, fed: bool) -> Decision {
    match tried {
        Tried::Refused(_) => {
            ctx.gate.probe_unused();
            ctx.policy.decide(&Attempt::Undecodable, attempts, jitter())
        }
        Tried::Answered { attempt, took, .. } => {
            let limit_before = (!fed).then(|| sample(ctx, *took, attempt));
            let verdict = ctx
                .policy
                .verdict(attempt, attempts, jitter(), headroom(ctx));
            pause(ctx, attempt, verdict.pause);
            let failed = matches!(verdict.decision, Decision::Retry { .. });
            if let Some(limit_before) = limit_before
                && let Some(t) = judge(ctx, attempt, failed, Some(limit_before))
            {
                breaker_changed(ctx, t);
            }
            verdict.decision
        }
    }
}

/// How a message is counted and what Cloudflare is told, from the policy's decision;
/// `refused` is the outcome of a message refused before sending (it keeps its own label).
pub(super) fn settle(
    decision: Decision,
    refused: Option<DeliveryOutcome>,
) -> (DeliveryOutcome, AckKind) {
    match decision {
        Decision::Ack => (DeliveryOutcome::Acked, AckKind::Ack),
        Decision::Drop => (DeliveryOutcome::Dropped, AckKind::Ack),
        Decision::Retry { delay } => (
            refused.unwrap_or(DeliveryOutcome::Retried),
            AckKind::Retry {
                delay_seconds: delay_seconds(delay),
            },
        ),
    }
}

/// Step 4: count the message under its outcome, log it, and hand the verdict to the acker.
async fn report(ctx: &DeliveryCtx, msg: Message, tried: &Tried, decision: Decision) {
    let refused = match tried {
        Tried::Refused(r) => Some(r),
        Tried::Answered { .. } => None,
    };
    let (outcome, kind) = settle(decision, refused.map(|r| r.outcome));
    ctx.metrics.delivered(outcome);
    let attempt = tried.attempt();
    let (status, duration_ms) = (attempt.http_status(), tried.took_ms());
    match decision {
        Decision::Ack => {
            debug!(queue = %ctx.label, id = %esc(&msg.id), attempt = msg.attempts,
                status, duration_ms, "delivered");
        }
        Decision::Drop => {
            warn!(queue = %ctx.label, id = %esc(&msg.id), attempt = msg.attempts, result = ?attempt,
                status, duration_ms, response = %esc(tried.detail()),
                "webhook status is configured to drop: acking without delivery");
        }
        Decision::Retry { delay } => {
            if ctx
                .logs
                .allow(refused.map_or(Event::DeliveryFailed, |r| r.event))
            {
                warn!(queue = %ctx.label, id = %esc(&msg.id), attempt = msg.attempts, result = ?attempt,
                    status, duration_ms, detail = %esc(tried.detail()),
                    delay_s = delay_seconds(delay), outcome = outcome.as_label(), "delivery failed; retrying later");
            }
        }
    }
    to_acker(ctx, msg, kind).await;
}

/// Whether the adaptive limit can still shrink under back-pressure.
pub(super) fn headroom(ctx: &DeliveryCtx) -> Headroom {
    if ctx.fixed_limit || ctx.limiter.request_limit() <= MIN_LIMIT {
        Headroom::AtFloor
    } else {
        Headroom::CanShrink
    }
}

/// Report one webhook request (a single message or a batch) to the adaptive limit.
/// Returns the limit in force before this sample.
pub(super) fn sample(ctx: &DeliveryCtx, rtt: Duration, attempt: &Attempt) -> usize {
    let before = ctx.limiter.request_limit();
    let limit = ctx.limiter.sample(rtt, control_outcome(attempt));
    ctx.metrics
        .concurrency_limit
        .set(i64::try_from(limit).unwrap_or(i64::MAX));
    if let Some(b) = ctx.limiter.baseline() {
        ctx.metrics.rtt_baseline.set(b.as_secs_f64());
    }
    before
}

/// Apply the pause a verdict asks for: the receiver wants room the adaptive limit cannot give.
pub(super) fn pause(ctx: &DeliveryCtx, attempt: &Attempt, pause: Option<Duration>) {
    if let Some(pause) = pause {
        ctx.gate.pause(Instant::now() + pause);
        warn!(queue = %ctx.label, status = ?attempt, pause_s = pause.as_secs(), "webhook asked to slow down: pausing pulls");
    }
}

/// Tell the breaker how a request ended. A failed request that is back-pressure under the
/// adaptive limit (429/503/408/timeout) shrinks the limit instead of counting against the
/// breaker, unless back-pressure is all the receiver answers: the limit at its floor, a whole
/// limit's worth of them in a row, or nothing through for a while (a real outage; see
/// `Gate::record_back_pressure`). Everything else counts as it always did. `limit_before` is
/// the limit in force when the request ended (from `sample`).
pub(super) fn judge(
    ctx: &DeliveryCtx,
    attempt: &Attempt,
    failed: bool,
    limit_before: Option<usize>,
) -> Option<Transition> {
    let now = Instant::now();
    if failed && !ctx.fixed_limit && control_outcome(attempt) == Control::Overloaded {
        let limit = ctx.limiter.request_limit();
        return ctx.gate.record_back_pressure(
            now,
            limit_before.unwrap_or(limit).max(limit),
            limit <= MIN_LIMIT,
            back_pressure_quiet(ctx),
        );
    }
    ctx.gate.record(now, failed)
}

/// With no delivery through for this long, back-pressure is all the receiver answers: 1 s, or 4
/// RTT baselines if longer.
fn back_pressure_quiet(ctx: &DeliveryCtx) -> Duration {
    ctx.limiter
        .baseline()
        .map_or(BACK_PRESSURE_QUIET, |b| (b * 4).max(BACK_PRESSURE_QUIET))
}

/// With no delivery through for this long, back-pressure answers count against the breaker.
const BACK_PRESSURE_QUIET: Duration = Duration::from_secs(1);

/// What an answer tells the adaptive limit: back-pressure, a latency sample, or nothing.
fn control_outcome(attempt: &Attempt) -> Control {
    match attempt {
        Attempt::Status {
            status: 408 | 429 | 503,
            ..
        }
        | Attempt::Timeout => Control::Overloaded,
        Attempt::Status { .. } => Control::Answered,
        _ => Control::Ignored,
    }
}

/// Record a message's end-to-end age (now − publish time) when its webhook answered.
pub(super) fn observe_age(ctx: &DeliveryCtx, timestamp_ms: Option<u64>) {
    if let Some(ts) = timestamp_ms {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as f64;
        ctx.metrics
            .message_age
            .observe(((now_ms - ts as f64) / 1000.0).max(0.0));
    }
}

/// Log and export a change of the circuit breaker's state.
pub(super) fn breaker_changed(ctx: &DeliveryCtx, t: Transition) {
    ctx.metrics.breaker_state.set(t.to as i64);
    match t.to {
        BreakerState::Open => warn!(queue = %ctx.label, from = ?t.from,
            open_for_s = ctx.breaker_open_for.as_secs(),
            "circuit breaker open: webhook keeps failing; pulls stop, messages wait in the queue"),
        BreakerState::HalfOpen => tracing::info!(queue = %ctx.label,
            "circuit breaker half-open: probing the webhook with one delivery"),
        BreakerState::Closed => tracing::info!(queue = %ctx.label,
            "circuit breaker closed: webhook recovered; pulling again"),
    }
}

/// Hand a held message back with a zero-delay retry, without delivering it.
pub(super) async fn release(ctx: &DeliveryCtx, msg: Message, reason: ReleaseReason) {
    ctx.metrics.released(reason);
    to_acker(ctx, msg, AckKind::Retry { delay_seconds: 0 }).await;
}

/// The breaker is open: the receiver is failing, so give the message back to wait in the queue
/// until the breaker's next probe instead of spending an attempt on a doomed delivery.
pub(super) async fn hold_back(ctx: &DeliveryCtx, msg: Message, delay_seconds: u32) {
    ctx.metrics.released(ReleaseReason::Breaker);
    to_acker(ctx, msg, AckKind::Retry { delay_seconds }).await;
}

/// Hand one verdict to the acker.
pub(super) async fn to_acker(ctx: &DeliveryCtx, msg: Message, kind: AckKind) {
    let item = AckItem {
        lease_id: msg.lease_id,
        kind,
        deadline: msg.deadline,
    };
    if ctx.acks.send(item).await.is_err() {
        // Only possible if the acker died; the lease expiry returns the message.
        error!(queue = %ctx.label, id = %esc(&msg.id), "acker is gone; the message returns when its lease expires");
    }
}

/// Keeps the in-flight gauge right whatever path a delivery (of `n` messages) takes.
pub(super) struct InFlight<'a>(&'a DeliveryCtx, usize);

impl<'a> InFlight<'a> {
    pub(super) fn new(ctx: &'a DeliveryCtx, n: usize) -> Self {
        ctx.metrics.in_flight.add(n as i64);
        Self(ctx, n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.metrics.in_flight.sub(self.1 as i64);
    }
}

/// The half-open breaker's probe, for the tests of the worker and the batch path.
#[cfg(test)]
pub(super) mod probe {
    use super::*;
    use crate::pipeline::gate::Admit;

    /// A `fixture` consumer whose breaker opens on one failure, for 1 s.
    pub const BREAKER: &str = "[consumers.breaker]\nconsecutive_failures = 1\nopen_for = \"1s\"";

    /// Open the breaker of a [`BREAKER`] consumer, wait it out, and take the half-open probe's
    /// pull (one message).
    pub async fn take(ctx: &DeliveryCtx) {
        judge(ctx, &Attempt::Connect, true, None).expect("opened");
        tokio::time::advance(Duration::from_secs(1)).await;
        let (admit, t) = ctx.gate.admit(Instant::now(), 10);
        assert!(matches!(admit, Admit::Now { max: 1, .. }), "{admit:?}");
        assert_eq!(t.map(|t| t.to), Some(BreakerState::HalfOpen));
    }

    /// Nothing judged the webhook: the next pull must be able to probe again.
    pub async fn assert_next_pull_probes(ctx: &DeliveryCtx) {
        tokio::time::advance(Duration::from_secs(5)).await;
        let (admit, _) = ctx.gate.admit(Instant::now(), 10);
        assert!(
            matches!(admit, Admit::Now { max: 1, .. }),
            "the consumer never pulls again: {admit:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    //! The worker's steps with fakes: a real context whose webhook is never asked (the answers
    //! are given), the acker's channel read directly. No request leaves the process.

    use super::*;
    use crate::pipeline::ctx::fixture;
    use crate::pipeline::gate::Admit;
    use crate::telemetry::Metrics;

    fn message(id: &str, content_type: Option<&str>, body: String) -> Message {
        Message {
            id: id.into(),
            lease_id: format!("lease-{id}"),
            attempts: 1,
            timestamp_ms: None,
            content_type: content_type.map(str::to_owned),
            body: Some(body),
            deadline: Instant::now() + Duration::from_secs(600),
            not_before: None,
        }
    }

    /// A 429/503 the user listed in `drop_statuses` or `success_statuses` takes the policy's
    /// way (drop, ack) and is never weighed for a resend at capacity.
    #[tokio::test]
    async fn a_503_the_policy_drops_or_acks_is_never_resent() {
        for (list, expected) in [("drop", Decision::Drop), ("success", Decision::Ack)] {
            let (mut ctx, _rx, _metrics) = fixture("");
            let policy = &mut Arc::get_mut(&mut ctx).expect("the only handle").policy;
            match list {
                "drop" => policy.drop_statuses = vec![503],
                _ => policy.success_statuses = vec![503],
            }
            let tried = answered(503, None);
            assert_eq!(turned_away_at_capacity(&ctx, &tried), None, "{list}");
            assert_eq!(decide(&ctx, &tried, 1, false), expected, "{list}");
        }
        // Without the lists, the same answer is weighed (and fed to the limit there).
        let (ctx, _rx, _metrics) = fixture("");
        assert!(turned_away_at_capacity(&ctx, &answered(503, None)).is_some());
    }

    fn answered(status: u16, retry_after: Option<u64>) -> Tried {
        Tried::Answered {
            attempt: Attempt::Status {
                status,
                retry_after: retry_after.map(Duration::from_secs),
            },
            took: Duration::from_millis(20),
            detail: String::new(),
        }
    }

    fn count(metrics: &Metrics, outcome: DeliveryOutcome) -> u64 {
        let line = format!(
            "cfq_relay_messages_delivered_total{{outcome=\"{}\",queue=\"q1\"}} ",
            outcome.as_label()
        );
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(&line).map(|v| v.parse().unwrap()))
            .unwrap_or(0)
    }

    /// The backoff of a first attempt with base 4 s: 2–4 s with jitter, in whole seconds.
    fn first_backoff(kind: AckKind) -> bool {
        matches!(
            kind,
            AckKind::Retry {
                delay_seconds: 2..=4
            }
        )
    }

    #[tokio::test]
    async fn each_answer_maps_to_its_outcome_and_ack() {
        let (ctx, mut rx, metrics) = fixture("");
        // (answer, outcome counted, check of what the acker is told)
        type Check = fn(AckKind) -> bool;
        let cases: [(Tried, DeliveryOutcome, Check); 6] = [
            (answered(200, None), DeliveryOutcome::Acked, |k| {
                k == AckKind::Ack
            }),
            (answered(204, Some(30)), DeliveryOutcome::Acked, |k| {
                k == AckKind::Ack
            }),
            (answered(500, None), DeliveryOutcome::Retried, first_backoff),
            // The receiver's Retry-After is the message's delay.
            (answered(429, Some(30)), DeliveryOutcome::Retried, |k| {
                k == AckKind::Retry { delay_seconds: 30 }
            }),
            (answered(503, Some(7200)), DeliveryOutcome::Retried, |k| {
                k == AckKind::Retry {
                    delay_seconds: 3600,
                }
            }),
            // A configured drop status: acked without delivery.
            (answered(410, None), DeliveryOutcome::Dropped, |k| {
                k == AckKind::Ack
            }),
        ];
        for (i, (tried, outcome, want)) in cases.into_iter().enumerate() {
            let before = count(&metrics, outcome);
            let msg = message(&format!("m{i}"), None, String::new());
            let decision = decide(&ctx, &tried, msg.attempts, false);
            report(&ctx, msg, &tried, decision).await;
            let item = rx.try_recv().expect("one verdict per message");
            assert_eq!(item.lease_id, format!("lease-m{i}"));
            assert!(want(item.kind), "{tried:?}: {:?}", item.kind);
            assert_eq!(count(&metrics, outcome), before + 1, "{tried:?}");
        }
        assert!(rx.try_recv().is_err(), "exactly one verdict per message");
    }

    #[tokio::test]
    async fn refused_messages_are_retried_under_their_own_outcome_without_a_request() {
        let (ctx, mut rx, metrics) = fixture("");
        let oversized = "x".repeat(crate::cloudflare::MAX_MESSAGE_BYTES + 1);
        let cases = [
            (
                message("bad\nid", None, "hi".into()),
                DeliveryOutcome::InvalidId,
            ),
            (
                message("v8", Some("v8"), "AAAA".into()),
                DeliveryOutcome::Undecodable,
            ),
            (
                message("b64", Some("bytes"), "not base64!".into()),
                DeliveryOutcome::Undecodable,
            ),
            (
                message("big", Some("text"), oversized),
                DeliveryOutcome::Oversized,
            ),
        ];
        for (msg, outcome) in cases {
            let id = msg.id.clone();
            let before = count(&metrics, outcome);
            let slot = ctx.limiter.slots().clone().acquire_owned().await.unwrap();
            deliver(ctx.clone(), msg, slot).await;
            let item = rx.try_recv().expect("a verdict");
            assert!(first_backoff(item.kind), "{id:?}: {:?}", item.kind);
            assert_eq!(count(&metrics, outcome), before + 1, "{id:?}");
        }
        // Nothing was sent: no answer of any class, no other outcome.
        let text = metrics.render();
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("cfq_relay_webhook_responses_total{") && !l.ends_with(" 0")),
            "{text}"
        );
        assert_eq!(count(&metrics, DeliveryOutcome::Retried), 0);
        assert_eq!(ctx.metrics.in_flight.get(), 0);
    }

    #[tokio::test]
    async fn prepare_takes_the_body_and_refuses_what_cannot_travel() {
        let mut ok = message("m1", Some("bytes"), "aGk=".into());
        let payload = prepare(&mut ok).unwrap();
        assert_eq!(&payload.bytes[..], b"hi");
        assert!(ok.body.is_none(), "the body moved into the payload");
        let refused = |mut m: Message| prepare(&mut m).unwrap_err().outcome;
        assert_eq!(
            refused(message("a\r\nb", None, "x".into())),
            DeliveryOutcome::InvalidId
        );
        assert_eq!(
            refused(message("m", Some("v8"), "x".into())),
            DeliveryOutcome::Undecodable
        );
        let big = "x".repeat(crate::cloudflare::MAX_MESSAGE_BYTES + 1);
        assert_eq!(
            refused(message("m", Some("text"), big)),
            DeliveryOutcome::Oversized
        );
    }

    #[tokio::test]
    async fn a_message_whose_lease_is_too_close_goes_back_at_once() {
        let (ctx, mut rx, metrics) = fixture("");
        let mut msg = message("m1", None, "x".into());
        // The webhook timeout and the lease margin no longer fit.
        msg.deadline = Instant::now() + Duration::from_secs(1);
        let slot = ctx.limiter.slots().clone().acquire_owned().await.unwrap();
        deliver(ctx.clone(), msg, slot).await;
        let item = rx.try_recv().unwrap();
        assert_eq!(item.kind, AckKind::Retry { delay_seconds: 0 });
        assert!(
            metrics
                .render()
                .contains("cfq_relay_messages_released_total{queue=\"q1\",reason=\"lease\"} 1")
        );
        for outcome in DeliveryOutcome::ALL {
            assert_eq!(count(&metrics, outcome), 0, "{outcome:?}");
        }
    }

    #[tokio::test]
    async fn an_open_breaker_holds_messages_back_until_its_probe() {
        let (ctx, mut rx, metrics) =
            fixture("[consumers.breaker]\nconsecutive_failures = 1\nopen_for = \"30s\"");
        let opened = judge(&ctx, &Attempt::Connect, true, None).expect("opened");
        assert_eq!(opened.to, BreakerState::Open);
        let slot = ctx.limiter.slots().clone().acquire_owned().await.unwrap();
        deliver(ctx.clone(), message("m1", None, "x".into()), slot).await;
        let item = rx.try_recv().unwrap();
        assert!(
            matches!(
                item.kind,
                AckKind::Retry {
                    delay_seconds: 29..=30
                }
            ),
            "{:?}",
            item.kind
        );
        assert!(
            metrics
                .render()
                .contains("cfq_relay_messages_released_total{queue=\"q1\",reason=\"breaker\"} 1")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_handed_back_unsent_pays_the_debt_of_a_shrunk_limit() {
        let (ctx, mut rx, _metrics) = fixture("");
        let limit = ctx.limiter.limit();
        // Every slot is held when the limit shrinks: the slots past it are owed.
        let mut held = ctx
            .limiter
            .slots()
            .clone()
            .try_acquire_many_owned(limit as u32)
            .unwrap();
        tokio::time::advance(Duration::from_millis(20)).await;
        let shrunk = ctx
            .limiter
            .sample(Duration::from_millis(20), Control::Overloaded);
        assert!(shrunk < limit, "{shrunk} < {limit}");
        // One of them is handed back unsent (its lease is too close).
        let mut msg = message("m1", None, "x".into());
        msg.deadline = Instant::now() + Duration::from_secs(1);
        deliver(ctx.clone(), msg, held.split(1).unwrap()).await;
        assert_eq!(
            rx.try_recv().unwrap().kind,
            AckKind::Retry { delay_seconds: 0 }
        );
        // Its slot paid the debt: more held than the limit allows, none free.
        assert_eq!(
            ctx.limiter.slots().available_permits(),
            0,
            "{} held under a limit of {shrunk}",
            limit - 1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_open_probe_handed_back_for_its_lease_lets_the_next_pull_probe() {
        let (ctx, mut rx, _metrics) = fixture(super::probe::BREAKER);
        super::probe::take(&ctx).await;
        // The pull was slow: the probe's lease no longer leaves room for the request.
        let mut msg = message("probe", None, "x".into());
        msg.deadline = Instant::now() + Duration::from_secs(1);
        let slot = ctx.limiter.slots().clone().acquire_owned().await.unwrap();
        deliver(ctx.clone(), msg, slot).await;
        assert_eq!(
            rx.try_recv().unwrap().kind,
            AckKind::Retry { delay_seconds: 0 }
        );
        super::probe::assert_next_pull_probes(&ctx).await;
    }

    #[tokio::test]
    async fn a_429_with_retry_after_pauses_the_consumer_only_when_the_limit_cannot_shrink() {
        let now = Instant::now();
        let paused = |ctx: &DeliveryCtx| matches!(ctx.gate.admit(Instant::now(), 1).0, Admit::Later(at) if at >= now + Duration::from_secs(29));
        // Fixed limit: the pause is the only way to slow down.
        let (fixed, _rx, _m) = fixture("concurrency_mode = \"fixed\"");
        decide(&fixed, &answered(429, Some(30)), 1, false);
        assert!(paused(&fixed));
        // Adaptive, above its floor: the limit shrinks, the consumer goes on.
        let (adaptive, _rx, _m) = fixture("concurrency = 64");
        let before = adaptive.limiter.request_limit();
        decide(&adaptive, &answered(429, Some(30)), 1, false);
        assert!(!paused(&adaptive));
        assert!(adaptive.limiter.request_limit() <= before);
        // A 500 with Retry-After never pauses, even at a fixed limit.
        let (fixed, _rx, _m) = fixture("concurrency_mode = \"fixed\"");
        decide(&fixed, &answered(500, Some(30)), 1, false);
        assert!(!paused(&fixed));
    }

    #[test]
    fn settle_keeps_a_refusal_s_outcome_only_when_it_retries() {
        let retry = Decision::Retry {
            delay: Duration::from_millis(2500),
        };
        assert_eq!(
            settle(retry, None),
            (
                DeliveryOutcome::Retried,
                AckKind::Retry { delay_seconds: 3 }
            )
        );
        assert_eq!(
            settle(retry, Some(DeliveryOutcome::Oversized)),
            (
                DeliveryOutcome::Oversized,
                AckKind::Retry { delay_seconds: 3 }
            )
        );
        assert_eq!(
            settle(Decision::Ack, None),
            (DeliveryOutcome::Acked, AckKind::Ack)
        );
        assert_eq!(
            settle(Decision::Drop, None),
            (DeliveryOutcome::Dropped, AckKind::Ack)
        );
    }
}
