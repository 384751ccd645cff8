//! One worker of the pool: takes a held message, checks its lease still leaves time, delivers
//! it, applies the outcome policy and hands the verdict to the acker.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::{debug, error, warn};

use crate::logs::{Event, esc};
use crate::ops::metrics::status_class;
use crate::pipeline::acker::{AckItem, AckKind};
use crate::pipeline::ctx::Ctx;
use crate::pipeline::policy::{Attempt, Decision, delay_seconds, jitter};
use crate::webhook::delivery::{Message, decode_body};

/// Deliver one message; `slot` is its place in the pool and is released when this ends.
pub async fn deliver(ctx: Arc<Ctx>, mut msg: Message, mut slot: OwnedSemaphorePermit) {
    let _in_flight = InFlight::new(&ctx);
    if let Some(at) = msg.not_before {
        // The rate limiter's turn for this message (at most one horizon away: the poller
        // pulled only what fits).
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {}
            _ = ctx.hard_stop.cancelled() => {
                release(&ctx, msg, "shutdown").await;
                return;
            }
        }
    }
    if ctx.gate.is_open() {
        // The receiver is failing: give the message back to wait in the queue until the
        // breaker's next probe instead of spending an attempt on a doomed delivery.
        let delay = delay_seconds(ctx.gate.open_remaining(Instant::now()));
        ctx.metrics.released("breaker");
        send(
            &ctx,
            msg,
            AckKind::Retry {
                delay_seconds: delay,
            },
        )
        .await;
        return;
    }
    // Start only if the webhook can answer and the ack can land before the lease ends;
    // otherwise hand the message back now rather than deliver it twice.
    if Instant::now() + ctx.config.webhook.timeout + ctx.lease_margin > msg.deadline {
        if ctx.logs.allow(Event::LeaseTooClose) {
            warn!(queue = %ctx.label, id = %esc(&msg.id), attempt = msg.attempts,
                "lease too close to its end to deliver; handing the message back");
        }
        release(&ctx, msg, "lease").await;
        return;
    }
    // The body moves into the request: no copy of it is made on the way to the socket.
    let body = std::mem::take(&mut msg.body);
    let mut took: Option<std::time::Duration> = None;
    let mut resends = 0u32;
    // Refused before any request: an id that cannot be a header, an undecodable or oversized
    // body (crate::webhook::guard).
    let checked = match crate::webhook::guard::check_id(&msg.id) {
        Err(r) => Err((r.to_string(), r.outcome())),
        Ok(()) => match decode_body(msg.content_type.as_deref(), body) {
            Err(e) => Err((e.to_string(), "undecodable")),
            Ok(p) => match crate::webhook::guard::check_body(p.bytes.len()) {
                Err(r) => Err((r.to_string(), r.outcome())),
                Ok(()) => Ok(p),
            },
        },
    };
    let (attempt, detail, outcome) = match checked {
        Err((detail, outcome)) => (Attempt::Undecodable, detail, outcome),
        Ok(payload) => loop {
            let started = Instant::now();
            // The payload is reference-counted: a copy for a second send costs no body copy.
            let response = tokio::select! {
                r = ctx.webhook.post(&msg, payload.clone()) => r,
                _ = ctx.hard_stop.cancelled() => {
                    warn!(queue = %ctx.label, id = %esc(&msg.id), "shutdown grace over: abandoning the delivery and handing the message back");
                    release(&ctx, msg, "shutdown").await;
                    return;
                }
            };
            let elapsed = started.elapsed();
            ctx.metrics
                .webhook(status_class(&response.attempt), elapsed.as_secs_f64());
            if resends < MAX_RESENDS && turned_away_at_capacity(&ctx, elapsed, &response.attempt) {
                // The receiver did not take it because it is full right now, not because it
                // is down: send it again in a slot of the shrunk limit, without spending one
                // of the message's Cloudflare attempts on a retry delay.
                resends += 1;
                slot = match retake_slot(&ctx, slot, &msg).await {
                    Ok(s) => s,
                    Err(reason) => {
                        release(&ctx, msg, reason).await;
                        return;
                    }
                };
                debug!(queue = %ctx.label, id = %esc(&msg.id), attempt = msg.attempts, resends,
                    "webhook at its capacity: sending again in a slot of the shrunk limit");
                continue;
            }
            took = Some(elapsed);
            observe_age(&ctx, msg.timestamp_ms);
            break (response.attempt, response.detail, "");
        },
    };
    let decision = ctx.policy.decide(&attempt, msg.attempts, jitter());
    let limit_before = took.map(|rtt| sample(&ctx, rtt, &attempt));
    slow_down(&ctx, &attempt);
    if attempt == Attempt::Undecodable {
        ctx.gate.probe_unused();
    } else {
        let failed = matches!(decision, Decision::Retry { .. });
        if let Some(t) = judge(&ctx, &attempt, failed, limit_before) {
            breaker_changed(&ctx, t);
        }
    }
    let kind = match decision {
        Decision::Ack => {
            ctx.metrics.delivered("acked");
            debug!(queue = %ctx.label, id = %esc(&msg.id), attempt = msg.attempts,
                status = http_status(&attempt), duration_ms = took_ms(took), "delivered");
            AckKind::Ack
        }
        Decision::Drop => {
            ctx.metrics.delivered("dropped");
            warn!(queue = %ctx.label, id = %esc(&msg.id), attempt = msg.attempts, result = ?attempt,
                status = http_status(&attempt), duration_ms = took_ms(took), response = %esc(&detail),
                "webhook status is configured to drop: acking without delivery");
            AckKind::Ack
        }
        Decision::Retry { delay } => {
            let outcome = if outcome.is_empty() {
                "retried"
            } else {
                outcome
            };
            ctx.metrics.delivered(outcome);
            let event = match outcome {
                "oversized" => Event::Oversized,
                "invalid_id" => Event::BadId,
                _ => Event::DeliveryFailed,
            };
            if ctx.logs.allow(event) {
                warn!(queue = %ctx.label, id = %esc(&msg.id), attempt = msg.attempts, result = ?attempt,
                    status = http_status(&attempt), duration_ms = took_ms(took), detail = %esc(&detail),
                    delay_s = delay_seconds(delay), outcome, "delivery failed; retrying later");
            }
            AckKind::Retry {
                delay_seconds: delay_seconds(delay),
            }
        }
    };
    send(&ctx, msg, kind).await;
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
fn turned_away_at_capacity(ctx: &Ctx, rtt: std::time::Duration, attempt: &Attempt) -> bool {
    // A resend would not wait for the rate limiter's turn: with a rate limit, none.
    if ctx.config.concurrency_mode == crate::config::ConcurrencyMode::Fixed
        || ctx.config.webhook.max_requests_per_second.is_some()
        || !matches!(
            attempt,
            Attempt::Status {
                status: 429 | 503,
                retry_after: None
            }
        )
    {
        return false;
    }
    // Our own requests filled the receiver only if they used the limit: a 503 while a handful
    // is in flight under a large limit is the receiver's own trouble, not its capacity.
    let filled = ctx.limiter.in_use() * 2 >= ctx.limiter.limit();
    let limit_before = sample(ctx, rtt, attempt);
    if let Some(t) = judge(ctx, attempt, true, Some(limit_before)) {
        breaker_changed(ctx, t);
        return false;
    }
    filled
        && ctx.limiter.request_limit() > crate::pipeline::concurrency::MIN_LIMIT
        && ctx
            .gate
            .at_capacity(Instant::now(), back_pressure_quiet(ctx))
}

/// Give the slot back to the shrunk limit, let one round trip pass, and wait for a slot the
/// limit allows, as long as the lease leaves time for a delivery and its ack. `Err` names why
/// the message goes back instead. The round trip (the RTT baseline, 1 ms to 1 s) lets the
/// requests sent under the old limit finish: a resend in a slot that is free at once would
/// meet the receiver as full as before (knee bench: some messages were turned away five times
/// within 100 µs).
async fn retake_slot(
    ctx: &Ctx,
    slot: OwnedSemaphorePermit,
    msg: &Message,
) -> Result<OwnedSemaphorePermit, &'static str> {
    ctx.limiter.release(slot);
    let last_start = msg
        .deadline
        .checked_sub(ctx.config.webhook.timeout + ctx.lease_margin)
        .unwrap_or(msg.deadline);
    let round_trip = ctx
        .limiter
        .baseline()
        .unwrap_or_default()
        .clamp(Duration::from_millis(1), Duration::from_secs(1));
    let retake = async {
        tokio::time::sleep(round_trip).await;
        ctx.limiter.slots().clone().acquire_owned().await
    };
    tokio::select! {
        permit = retake => permit.map_err(|_| "shutdown"),
        _ = tokio::time::sleep_until(last_start) => Err("lease"),
        _ = ctx.shutdown.cancelled() => Err("shutdown"),
    }
}

/// What an answer tells the adaptive limit: back-pressure, a latency sample, or nothing.
/// Report one webhook request (a single message or a batch) to the adaptive limit.
/// Returns the limit in force before this sample.
pub fn sample(ctx: &Ctx, rtt: std::time::Duration, attempt: &Attempt) -> usize {
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

/// A 429/503 with `Retry-After`: the message(s) wait at least that long (the policy), and the
/// adaptive limit shrinks; once it is down to one request, or when the limit is fixed, the
/// whole consumer pauses: the floor under the adaptive limit.
pub fn slow_down(ctx: &Ctx, attempt: &Attempt) {
    if let Attempt::Status {
        status: 429 | 503,
        retry_after: Some(after),
    } = *attempt
        && (ctx.limiter.request_limit() <= crate::pipeline::concurrency::MIN_LIMIT
            || ctx.config.concurrency_mode == crate::config::ConcurrencyMode::Fixed)
    {
        let pause = after.min(ctx.policy.max_delay);
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
pub fn judge(
    ctx: &Ctx,
    attempt: &Attempt,
    failed: bool,
    limit_before: Option<usize>,
) -> Option<crate::pipeline::gate::Transition> {
    let now = Instant::now();
    if failed
        && ctx.config.concurrency_mode != crate::config::ConcurrencyMode::Fixed
        && control_outcome(attempt) == crate::pipeline::concurrency::Outcome::Overloaded
    {
        let limit = ctx.limiter.request_limit();
        return ctx.gate.record_back_pressure(
            now,
            limit_before.unwrap_or(limit).max(limit),
            limit <= crate::pipeline::concurrency::MIN_LIMIT,
            back_pressure_quiet(ctx),
        );
    }
    ctx.gate.record(now, failed)
}

/// With no delivery through for this long, back-pressure is all the receiver answers: 1 s, or 4
/// RTT baselines if longer.
fn back_pressure_quiet(ctx: &Ctx) -> std::time::Duration {
    ctx.limiter
        .baseline()
        .map_or(BACK_PRESSURE_QUIET, |b| (b * 4).max(BACK_PRESSURE_QUIET))
}

/// With no delivery through for this long, back-pressure answers count against the breaker.
const BACK_PRESSURE_QUIET: std::time::Duration = std::time::Duration::from_secs(1);

fn control_outcome(attempt: &Attempt) -> crate::pipeline::concurrency::Outcome {
    use crate::pipeline::concurrency::Outcome;
    match attempt {
        Attempt::Status {
            status: 408 | 429 | 503,
            ..
        }
        | Attempt::Timeout => Outcome::Overloaded,
        Attempt::Status { .. } => Outcome::Answered,
        _ => Outcome::Ignored,
    }
}

/// Record a message's end-to-end age (now − publish time) when its webhook answered.
pub fn observe_age(ctx: &Ctx, timestamp_ms: Option<u64>) {
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
pub fn breaker_changed(ctx: &Ctx, t: crate::pipeline::gate::Transition) {
    use crate::pipeline::gate::BreakerState;
    ctx.metrics.breaker_state.set(t.to as i64);
    match t.to {
        BreakerState::Open => warn!(queue = %ctx.label, from = ?t.from,
            open_for_s = ctx.config.breaker.open_for.as_secs(),
            "circuit breaker open: webhook keeps failing; pulls stop, messages wait in the queue"),
        BreakerState::HalfOpen => tracing::info!(queue = %ctx.label,
            "circuit breaker half-open: probing the webhook with one delivery"),
        BreakerState::Closed => tracing::info!(queue = %ctx.label,
            "circuit breaker closed: webhook recovered; pulling again"),
    }
}

fn took_ms(took: Option<std::time::Duration>) -> Option<u64> {
    took.map(|d| d.as_millis() as u64)
}

/// The HTTP status of an answer, for log fields (absent when there was no answer).
fn http_status(attempt: &Attempt) -> Option<u16> {
    match attempt {
        Attempt::Status { status, .. } => Some(*status),
        _ => None,
    }
}

/// Hand a held message back with a zero-delay retry, without delivering it.
pub async fn release(ctx: &Ctx, msg: Message, reason: &'static str) {
    ctx.metrics.released(reason);
    send(ctx, msg, AckKind::Retry { delay_seconds: 0 }).await;
}

/// Hand one verdict to the acker.
pub async fn send(ctx: &Ctx, msg: Message, kind: AckKind) {
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

/// Keeps the in-flight gauge right whatever path a delivery takes.
struct InFlight<'a>(&'a Ctx);

impl<'a> InFlight<'a> {
    fn new(ctx: &'a Ctx) -> Self {
        ctx.metrics.in_flight.inc();
        Self(ctx)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.metrics.in_flight.dec();
    }
}
