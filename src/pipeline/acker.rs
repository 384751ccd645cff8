//! The one owner of a consumer's ack traffic: coalesces acks and retries from the workers into
//! calls of at most 100 items, flushes when 100 are held, after a short interval, and before any
//! held lease runs out; retries failed calls with backoff until the items' leases expire.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::cloudflare::retry::{api_backoff, retry_wait};
use crate::cloudflare::{AckEntry, ApiError, QueueClient, RetryEntry, short_lease};
use crate::logs::{Event, esc};
use crate::telemetry::{ApiOp, ApiResult, ConsumerMetrics};

/// Items per ack call.
pub const MAX_ITEMS_PER_CALL: usize = 100;
/// How long an item may wait for companions before it is flushed.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Ack calls in flight at once per consumer, at least: one call at a time would cap throughput
/// at 100 items per round trip. A consumer allowed more pulls in flight gets as many ack calls
/// (every pulled message needs one ack item): see [`calls_in_flight`].
pub const MAX_CALLS_IN_FLIGHT: usize = 4;

/// Ack calls in flight for a consumer with `max_pulls_in_flight`: acks keep pace with pulls
/// (4 calls of 100 items at 50 ms a call would cap a consumer at 8,000 messages/s).
pub fn calls_in_flight(max_pulls_in_flight: usize) -> usize {
    MAX_CALLS_IN_FLIGHT.max(max_pulls_in_flight)
}

/// What to tell Cloudflare about one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    Ack,
    Retry { delay_seconds: u32 },
}

/// One lease to acknowledge or retry.
#[derive(Debug)]
pub struct AckItem {
    pub lease_id: String,
    pub kind: AckKind,
    /// The lease's end; the item must reach Cloudflare before it.
    pub deadline: Instant,
}

/// Everything the acker needs; `run` consumes it.
pub struct Acker {
    pub queue: String,
    pub client: QueueClient,
    pub metrics: ConsumerMetrics,
    /// Flush this long before the earliest held lease expires.
    pub lease_margin: Duration,
    /// Cancelled when the shutdown grace has run out: make one last attempt, no more retries.
    pub hard_stop: CancellationToken,
    /// Ack calls in flight at once ([`calls_in_flight`]).
    pub calls_in_flight: usize,
    /// Rate limit of repeated failure lines.
    pub logs: crate::logs::LogLimiter,
}

impl Acker {
    /// Run until every sender of `rx` is gone and every item is sent (or its lease expired).
    pub async fn run(self, mut rx: mpsc::Receiver<AckItem>) {
        let this = Arc::new(self);
        let permits = Arc::new(Semaphore::new(this.calls_in_flight.max(1)));
        let mut calls = JoinSet::new();
        let mut pending: Vec<AckItem> = Vec::with_capacity(MAX_ITEMS_PER_CALL);
        // When the oldest pending item arrived, and the earliest pending deadline.
        let mut oldest: Option<Instant> = None;
        let mut earliest: Option<Instant> = None;
        loop {
            let flush_at = oldest.map(|o| {
                let by_interval = o + FLUSH_INTERVAL;
                match earliest {
                    Some(d) => by_interval.min(d.checked_sub(this.lease_margin).unwrap_or(d)),
                    None => by_interval,
                }
            });
            tokio::select! {
                item = rx.recv() => match item {
                    Some(item) => {
                        oldest.get_or_insert_with(Instant::now);
                        earliest = Some(earliest.map_or(item.deadline, |e| e.min(item.deadline)));
                        pending.push(item);
                        if pending.len() >= MAX_ITEMS_PER_CALL {
                            let batch = std::mem::replace(&mut pending, Vec::with_capacity(MAX_ITEMS_PER_CALL));
                            (oldest, earliest) = (None, None);
                            this.dispatch(batch, &permits, &mut calls).await;
                        }
                    }
                    None => break,
                },
                _ = sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {
                    let batch = std::mem::replace(&mut pending, Vec::with_capacity(MAX_ITEMS_PER_CALL));
                    (oldest, earliest) = (None, None);
                    this.dispatch(batch, &permits, &mut calls).await;
                }
                Some(_) = calls.join_next(), if !calls.is_empty() => {}
            }
        }
        if !pending.is_empty() {
            this.dispatch(pending, &permits, &mut calls).await;
        }
        while calls.join_next().await.is_some() {}
        debug!(queue = %this.queue, "acker finished");
    }

    async fn dispatch(
        self: &Arc<Self>,
        batch: Vec<AckItem>,
        permits: &Arc<Semaphore>,
        calls: &mut JoinSet<()>,
    ) {
        // Waiting for a call slot here stops the acker from reading its channel; the bounded
        // channel then holds the workers back, which holds the poller back: backpressure.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let this = self.clone();
        calls.spawn(async move {
            this.send(batch).await;
            drop(permit);
        });
    }

    /// Send one batch, retrying with backoff; gives up on items whose lease has expired.
    async fn send(&self, mut batch: Vec<AckItem>) {
        let mut backoff = api_backoff();
        loop {
            self.give_up_expired(&mut batch);
            if batch.is_empty() {
                return;
            }
            let acks: Vec<AckEntry<'_>> = batch
                .iter()
                .filter(|i| i.kind == AckKind::Ack)
                .map(|i| AckEntry {
                    lease_id: &i.lease_id,
                })
                .collect();
            let retries: Vec<RetryEntry<'_>> = batch
                .iter()
                .filter_map(|i| match i.kind {
                    AckKind::Retry { delay_seconds } => Some(RetryEntry {
                        lease_id: &i.lease_id,
                        delay_seconds,
                    }),
                    AckKind::Ack => None,
                })
                .collect();
            let started = Instant::now();
            let result = self.client.ack(&acks, &retries).await;
            let elapsed = started.elapsed().as_secs_f64();
            let err = match result {
                Ok(r) => {
                    self.metrics.api(ApiOp::Ack, ApiResult::Ok, elapsed);
                    self.metrics.acks_sent.inc_by(acks.len() as u64);
                    self.metrics.retries_sent.inc_by(retries.len() as u64);
                    if !r.warnings.is_empty() {
                        self.metrics.ack_warnings.inc_by(r.warnings.len() as u64);
                        for w in r.warnings.iter().take(10) {
                            if self.logs.allow(Event::AckFailed) {
                                warn!(queue = %self.queue, warning = %esc(w), "ack API warning");
                            }
                        }
                    }
                    debug!(queue = %self.queue, acks = acks.len(), retries = retries.len(),
                        ack_count = ?r.ack_count, retry_count = ?r.retry_count, "ack call done");
                    return;
                }
                Err(e) => e,
            };
            self.metrics.api(ApiOp::Ack, err.class(), elapsed);
            if let ApiError::Status { status: 400, .. } = err {
                // The API refused the call as a bad request: one item may be at fault (a lease
                // id or delay it does not accept). Split to isolate it, so the rest still land.
                if batch.len() > 1 {
                    let right = batch.split_off(batch.len() / 2);
                    debug!(queue = %self.queue, items = batch.len() + right.len(),
                        "ack call refused as a bad request: splitting it to isolate the item");
                    Box::pin(self.send(batch)).await;
                    Box::pin(self.send(right)).await;
                    return;
                }
                self.metrics.ack_warnings.inc();
                if self.logs.allow(Event::AckFailed) {
                    error!(queue = %self.queue, error = %err, lease = %esc(&short_lease(&batch[0].lease_id)),
                        kind = ?batch[0].kind,
                        "the ack API refuses this item; its message returns when its lease expires");
                }
                return;
            }
            if self.hard_stop.is_cancelled() {
                error!(queue = %self.queue, items = batch.len(), error = %err,
                    first_lease = %short_lease(&batch[0].lease_id),
                    "ack call failed during shutdown; these messages return when their leases expire");
                return;
            }
            let wait = cap_to_leases(
                retry_wait(&err, &mut backoff),
                &err,
                batch.iter().map(|i| i.deadline),
                self.lease_margin,
                Instant::now(),
            );
            if err.is_auth() {
                error!(queue = %self.queue, error = %err, retry_in = ?wait, "ack call rejected");
            } else if self.logs.allow(Event::AckFailed) {
                warn!(queue = %self.queue, items = batch.len(), error = %err, retry_in = ?wait, "ack call failed; retrying");
            }
            // Sleep until the next attempt, waking at each lease end on the way to give up
            // (and count) what can no longer be acked, so a dead batch does not hold a call slot.
            let next = Instant::now() + wait;
            loop {
                let now = Instant::now();
                let wake = batch
                    .iter()
                    .map(|i| i.deadline)
                    .filter(|d| *d > now && *d < next)
                    .min()
                    .unwrap_or(next);
                tokio::select! {
                    _ = sleep_until(wake) => {}
                    _ = self.hard_stop.cancelled() => {
                        info!(queue = %self.queue, "shutdown: one last ack attempt");
                        break;
                    }
                }
                if Instant::now() >= next {
                    break;
                }
                self.give_up_expired(&mut batch);
                if batch.is_empty() {
                    return;
                }
            }
        }
    }

    /// Drop (and count) the items whose lease has ended: Cloudflare redelivers those messages.
    fn give_up_expired(&self, batch: &mut Vec<AckItem>) {
        let now = Instant::now();
        let before = batch.len();
        batch.retain(|i| i.deadline > now);
        let expired = before - batch.len();
        if expired > 0 {
            self.metrics.leases_expired.inc_by(expired as u64);
            error!(queue = %self.queue, items = expired,
                "ack API unreachable until these leases expired: the messages will be redelivered");
        }
    }
}

/// Shorten a retry wait so it does not sleep through the end of a held lease: the next attempt
/// comes no later than `margin` before the earliest lease that still has that much time left
/// (one last chance per lease beats a certain redelivery). Last chances closer together than
/// half the margin (at most 500 ms) collapse into one, which bounds the extra calls when held
/// leases end at many different times. A server's `Retry-After` and the authentication floor
/// stand: retrying sooner does not help there.
pub fn cap_to_leases(
    wait: Duration,
    err: &ApiError,
    deadlines: impl Iterator<Item = Instant>,
    margin: Duration,
    now: Instant,
) -> Duration {
    if err.is_auth() {
        return wait;
    }
    let Some(last_chance) = deadlines
        .filter_map(|d| d.checked_sub(margin))
        .filter(|t| *t > now)
        .min()
    else {
        return wait;
    };
    let floor = err
        .retry_after()
        .unwrap_or_default()
        .max((margin / 2).min(Duration::from_millis(500)));
    wait.min(last_chance - now).max(floor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_waits_never_sleep_through_a_lease() {
        let now = Instant::now();
        let margin = Duration::from_millis(500);
        let secs = Duration::from_secs;
        let leases = [now + secs(3), now + secs(10)];
        let cap = |wait, err: &ApiError, leases: &[Instant]| {
            cap_to_leases(wait, err, leases.iter().copied(), margin, now)
        };
        // Backoff of 8 s, earliest lease in 3 s: try again 500 ms before it ends.
        assert_eq!(cap(secs(8), &ApiError::Timeout, &leases), secs(3) - margin);
        // A short wait stays as it is.
        assert_eq!(cap(secs(1), &ApiError::Timeout, &leases), secs(1));
        // Leases already inside their margin give no last chance: the next one counts.
        let close = [now + Duration::from_millis(300), now + secs(10)];
        assert_eq!(cap(secs(30), &ApiError::Timeout, &close), secs(10) - margin);
        assert_eq!(cap(secs(4), &ApiError::Timeout, &close[..1]), secs(4));
        // Retry-After and the authentication floor are honoured.
        let limited = ApiError::RateLimited {
            retry_after: Some(secs(5)),
        };
        assert_eq!(cap(secs(5), &limited, &leases), secs(5));
        let auth = ApiError::Auth {
            status: 403,
            errors: Vec::new(),
        };
        assert_eq!(cap(secs(30), &auth, &leases), secs(30));
        // Never a busy loop: at least half the margin (at most 500 ms) between attempts.
        let edge = [now + margin + Duration::from_millis(1)];
        assert_eq!(cap(secs(2), &ApiError::Timeout, &edge), margin / 2);
    }
}
