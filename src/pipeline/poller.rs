//! The pull loop of one consumer: pulls only as many messages as there are free delivery slots,
//! keeps several pulls in flight when the free slots exceed one batch, backs off on empty
//! queues and API errors, and hands each pulled message to a worker.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tracing::{debug, error, info, warn};

use crate::cloudflare::retry::{Failures, Rest, jittered_backoff};
use crate::cloudflare::{ApiError, PulledMessage};
use crate::logs::{Event, esc};
use crate::pipeline::ctx::PollCtx;
use crate::pipeline::gate::Admit;
use crate::telemetry::{ApiOp, ApiResult, ReleaseReason};
use crate::webhook::delivery::Message;

/// Pull failures in a row after which the consumer reports not ready.
const UNREADY_AFTER_FAILURES: u32 = 3;

/// Backoff between pulls of an empty queue: 50 ms doubling, jittered, up to `max` (with the
/// jitter, the wait at the cap lies between `max/2` and `max`).
pub fn idle_backoff(max: Duration) -> impl Iterator<Item = Duration> + Send {
    let half = max / 2;
    jittered_backoff(Duration::from_millis(50).min(half), half).map(move |d| d.min(max))
}

/// How long a trickling queue is left to gather messages between pulls.
const TRICKLE_GATHER: Duration = Duration::from_millis(20);

/// How one pull call ended.
enum Pulled {
    Messages { got: usize, asked: usize },
    Empty,
    Failed(ApiError),
}

/// Run the pull loop until shutdown; returns after every pull in flight has finished and its
/// messages were dispatched (or handed back).
pub async fn run(ctx: Arc<PollCtx>) {
    let batch = ctx.batch_size as usize;
    let max_pulls = ctx.max_pulls_in_flight;
    let mut pulls: JoinSet<Pulled> = JoinSet::new();
    let mut next_pull_at = Instant::now();
    let mut idle = idle_backoff(ctx.max_idle_backoff);
    // A failed pull rests only its own slot unless failures persist (shared with the acker).
    let mut failures = Failures::default();
    // Pull slots resting after a failed call of their own, until these instants.
    let mut resting: Vec<Instant> = Vec::new();
    // The last pull came back less than half full: the queue trickles, so one pull at a time
    // gathers fuller batches (fewer API calls per message) without slowing delivery.
    let mut trickling = false;
    // Batch mode: pulled messages go to the consumer's batcher, which ends once this sender
    // (and the pulls' clones) are gone, after sending or handing back what it holds.
    let batches = ctx.delivery.batch.as_ref().map(|_| {
        let (tx, rx) = tokio::sync::mpsc::channel(ctx.concurrency.max(1));
        ctx.delivery
            .workers
            .spawn(crate::pipeline::batch::batcher(ctx.delivery.clone(), rx));
        tx
    });

    loop {
        let now = Instant::now();
        resting.retain(|t| *t > now);
        let wanted_pulls = if trickling { 1 } else { max_pulls };
        let can_launch = pulls.len() + resting.len() < wanted_pulls;
        let next_rest_end = resting.iter().min().copied();
        // Do not pull a handful of messages per round trip: wait until a useful share of a
        // batch is free (pulls are billed operations and each costs a round trip).
        let min_chunk = (batch.min(ctx.delivery.limiter.limit()) / 4).max(1);
        tokio::select! {
            biased;
            _ = ctx.delivery.shutdown.cancelled() => break,
            Some(done) = pulls.join_next(), if !pulls.is_empty() => {
                let outcome = match done {
                    Ok(o) => o,
                    Err(e) => {
                        error!(queue = %ctx.label(), error = %e, "pull task failed");
                        continue;
                    }
                };
                ctx.delivery.logs.flush();
                match outcome {
                    Pulled::Messages { got, asked } => {
                        debug!(queue = %ctx.label(), messages = got, asked, "pulled");
                        idle = idle_backoff(ctx.max_idle_backoff);
                        failures.succeeded();
                        ctx.readiness.ready.store(true, Ordering::Relaxed);
                        trickling = got * 2 < asked;
                        if trickling {
                            next_pull_at = next_pull_at.max(Instant::now() + TRICKLE_GATHER);
                        }
                    }
                    Pulled::Empty => {
                        ctx.delivery.gate.probe_unused();
                        trickling = true;
                        failures.succeeded();
                        ctx.readiness.ready.store(true, Ordering::Relaxed);
                        let wait = idle.next().unwrap_or(ctx.max_idle_backoff);
                        next_pull_at = next_pull_at.max(Instant::now() + wait);
                    }
                    Pulled::Failed(err) => {
                        ctx.delivery.gate.probe_unused();
                        // A lone failure costs only its own pull slot, which retries after
                        // a short backoff of its own while the other pulls go on. Failures in a
                        // row, a 429 and an authentication error back the whole consumer off.
                        let rest = failures.failed(&err, max_pulls > 1);
                        if failures.in_row() >= UNREADY_AFTER_FAILURES {
                            ctx.readiness.ready.store(false, Ordering::Relaxed);
                        }
                        let wait = rest.wait();
                        match rest {
                            Rest::All(_) => next_pull_at = next_pull_at.max(Instant::now() + wait),
                            Rest::Own(_) => resting.push(Instant::now() + wait),
                        }
                        if err.is_auth() {
                            error!(queue = %ctx.label(), error = %err, retry_in = ?wait, "pull rejected");
                        } else if ctx.delivery.logs.allow(Event::PullFailed) {
                            warn!(queue = %ctx.label(), error = %err, retry_in = ?wait, "pull failed");
                        }
                    }
                }
            }
            _ = sleep_until(next_pull_at), if can_launch && Instant::now() < next_pull_at => {}
            _ = sleep_until(next_rest_end.unwrap_or(now)), if next_rest_end.is_some() => {}
            // A limit that shrank below what the wait below asks for must not strand it.
            _ = ctx.delivery.limiter.changed() => {}
            permit = ctx.delivery.limiter.slots().clone().acquire_many_owned(min_chunk as u32),
                if can_launch && Instant::now() >= next_pull_at =>
            {
                let Ok(mut permit) = permit else { break };
                // Top up to a whole batch with whatever else is free right now.
                let extra = ctx.delivery.limiter.slots().available_permits().min(batch - min_chunk);
                if extra > 0
                    && let Ok(more) = ctx.delivery.limiter.slots().clone().try_acquire_many_owned(extra as u32)
                {
                    permit.merge(more);
                }
                // The breaker, a receiver's Retry-After and the rate limit may allow less.
                let (admit, transition) = ctx.delivery.gate.admit(Instant::now(), permit.num_permits());
                if let Some(t) = transition {
                    crate::pipeline::worker::breaker_changed(&ctx.delivery, t);
                }
                match admit {
                    Admit::Later(at) => {
                        next_pull_at = next_pull_at.max(at);
                        ctx.delivery.limiter.release(permit);
                    }
                    Admit::Now { max, first_send, pace } => {
                        if permit.num_permits() > max
                            && let Some(extra) = permit.split(permit.num_permits() - max)
                        {
                            ctx.delivery.limiter.release(extra);
                        }
                        let pacing = first_send.zip(pace);
                        pulls.spawn(pull(ctx.clone(), permit, pacing, batches.clone()));
                    }
                }
            }
        }
    }
    info!(queue = %ctx.label(), pulls_in_flight = pulls.len(), "stopped pulling");
    // Pulls in flight finish; their messages are handed back since shutdown has begun. Once the
    // grace is over, a pull still waiting for its answer is abandoned: whatever it would have
    // leased returns when the leases expire, as after a crash.
    loop {
        tokio::select! {
            done = pulls.join_next() => if done.is_none() { break },
            _ = ctx.delivery.hard_stop.cancelled() => {
                if !pulls.is_empty() {
                    warn!(queue = %ctx.label(), pulls_in_flight = pulls.len(),
                        "shutdown grace over: abandoning pulls still waiting for an answer");
                }
                pulls.abort_all();
                while pulls.join_next().await.is_some() {}
                break;
            }
        }
    }
}

/// One pull call for `permit.num_permits()` messages; dispatches what it gets.
async fn pull(
    ctx: Arc<PollCtx>,
    mut permit: OwnedSemaphorePermit,
    pacing: Option<(Instant, Duration)>,
    batches: Option<mpsc::Sender<crate::pipeline::batch::Held>>,
) -> Pulled {
    let n = permit.num_permits() as u32;
    let visibility = ctx.visibility_timeout;
    let started = Instant::now();
    let result = ctx.client.pull(n, visibility).await;
    let elapsed = started.elapsed().as_secs_f64();
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            ctx.metrics.api(ApiOp::Pull, e.class(), elapsed);
            ctx.delivery.limiter.release(permit);
            return Pulled::Failed(e);
        }
    };
    ctx.metrics.api(ApiOp::Pull, ApiResult::Ok, elapsed);
    let now_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    ctx.metrics.last_pull.set(now_unix.as_secs_f64());
    let backlog = result.backlog();
    if let Some(count) = backlog.backlog_count {
        ctx.metrics.backlog_messages.set(clamp_i64(count));
    }
    if let Some(bytes) = backlog.backlog_bytes {
        ctx.metrics.backlog_bytes.set(clamp_i64(bytes));
    }
    let oldest_age = match backlog.oldest_message_timestamp_ms {
        Some(ts) if ts > 0 => (now_unix.as_millis() as f64 - ts as f64).max(0.0) / 1000.0,
        _ => 0.0,
    };
    ctx.metrics.oldest_age.set(oldest_age);

    let count = result.messages.len();
    if count == 0 {
        ctx.delivery.limiter.release(permit);
        return Pulled::Empty;
    }
    ctx.metrics.pulled.inc_by(count as u64);
    // The lease started no later than our request did: a conservative deadline.
    let deadline = started + visibility;
    let mut index = 0u32;
    let mut usable = 0usize;
    for raw in result.messages {
        let Some(mut msg) = to_message(&ctx, raw, deadline) else {
            continue;
        };
        msg.not_before = pacing.map(|(first, pace)| first + pace * index);
        index += 1;
        usable += 1;
        // One slot per message; a server that sent more than asked gets the extra back.
        let Some(slot) = permit.split(1) else {
            warn!(queue = %ctx.label(), id = %esc(&msg.id), "pull returned more messages than asked for; handing the extra back");
            crate::pipeline::worker::release(&ctx.delivery, msg, ReleaseReason::Lease).await;
            continue;
        };
        if ctx.delivery.shutdown.is_cancelled() {
            crate::pipeline::worker::release(&ctx.delivery, msg, ReleaseReason::Shutdown).await;
            ctx.delivery.limiter.release(slot);
            continue;
        }
        if let Some(tx) = &batches {
            if let Err(mpsc::error::SendError(held)) =
                tx.send(crate::pipeline::batch::Held { msg, slot }).await
            {
                crate::pipeline::worker::release(&ctx.delivery, held.msg, ReleaseReason::Shutdown)
                    .await;
                ctx.delivery.limiter.release(held.slot);
            }
            continue;
        }
        ctx.delivery.workers.spawn(crate::pipeline::worker::deliver(
            ctx.delivery.clone(),
            msg,
            slot,
        ));
    }
    // Slots asked for but not filled go back (or away, if the limit shrank meanwhile).
    ctx.delivery.limiter.release(permit);
    if usable == 0 {
        // Nothing in the answer could be leased (no lease ids): back off as after an empty
        // pull rather than pull again at once.
        return Pulled::Empty;
    }
    Pulled::Messages {
        got: count,
        asked: n as usize,
    }
}

fn to_message(ctx: &PollCtx, mut raw: PulledMessage, deadline: Instant) -> Option<Message> {
    let content_type = raw.take_content_type();
    let Some(lease_id) = raw.lease_id.filter(|l| !l.is_empty()) else {
        ctx.metrics.invalid.inc();
        if ctx.delivery.logs.allow(Event::NoLease) {
            warn!(queue = %ctx.label(), id = %esc(raw.id.as_deref().unwrap_or("?")),
                "pulled message has no lease_id: it cannot be acked; skipped (it returns when its lease expires)");
        }
        return None;
    };
    Some(Message {
        id: raw.id.unwrap_or_default(),
        lease_id,
        attempts: raw
            .attempts
            .map(|a| u32::try_from(a).unwrap_or(u32::MAX))
            .unwrap_or(1)
            .max(1),
        timestamp_ms: raw.timestamp_ms.filter(|t| *t > 0),
        content_type,
        body: raw.body,
        deadline,
        not_before: None,
    })
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_backoff_grows_and_caps() {
        let max = Duration::from_secs(2);
        let waits: Vec<Duration> = idle_backoff(max).take(30).collect();
        assert!(waits[0] < Duration::from_millis(200), "{waits:?}");
        for w in &waits {
            assert!(*w <= max, "{w:?}");
        }
        for w in &waits[20..] {
            assert!(*w >= max / 2, "{w:?}");
        }
    }

    #[test]
    fn api_backoff_is_bounded() {
        let waits: Vec<Duration> = crate::cloudflare::retry::api_backoff().take(40).collect();
        assert!(waits[0] >= Duration::from_millis(500));
        for w in &waits {
            assert!(*w <= Duration::from_secs(60), "{w:?}");
        }
    }
}
