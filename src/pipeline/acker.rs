//! The one owner of a consumer's ack traffic: coalesces acks and retries from the workers into
//! calls of at most 100 items, flushes when 100 are held, after a short interval, and before any
//! held lease runs out; retries a failed call on its own schedule while the other calls go on,
//! and pauses them all only when failures persist, until the items' leases expire.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::cloudflare::retry::{Failures, Rest};
use crate::cloudflare::{AckEntry, AckResult, ApiError, QueueClient, RetryEntry, short_lease};
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

/// The one call the acker makes: [`QueueClient::ack`] in the relay, a fake in unit tests.
pub trait AckApi: Send + Sync + 'static {
    fn ack(
        &self,
        acks: &[AckEntry<'_>],
        retries: &[RetryEntry<'_>],
    ) -> impl Future<Output = Result<AckResult, ApiError>> + Send;
}

impl AckApi for QueueClient {
    fn ack(
        &self,
        acks: &[AckEntry<'_>],
        retries: &[RetryEntry<'_>],
    ) -> impl Future<Output = Result<AckResult, ApiError>> + Send {
        QueueClient::ack(self, acks, retries)
    }
}

/// Everything the acker needs; `run` consumes it.
pub struct Acker<C = QueueClient> {
    pub queue: String,
    pub client: C,
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

impl<C: AckApi> Acker<C> {
    /// Run until every sender of `rx` is gone and every item is sent (or its lease expired).
    pub async fn run(self, mut rx: mpsc::Receiver<AckItem>) {
        let this = Arc::new(self);
        let calls = Arc::new(Calls::new(this.calls_in_flight));
        let mut tasks = JoinSet::new();
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
                            this.dispatch(batch, &calls, &mut tasks).await;
                        }
                    }
                    None => break,
                },
                _ = sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {
                    let batch = std::mem::replace(&mut pending, Vec::with_capacity(MAX_ITEMS_PER_CALL));
                    (oldest, earliest) = (None, None);
                    this.dispatch(batch, &calls, &mut tasks).await;
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        if !pending.is_empty() {
            this.dispatch(pending, &calls, &mut tasks).await;
        }
        while tasks.join_next().await.is_some() {}
        debug!(queue = %this.queue, "acker finished");
    }

    async fn dispatch(
        self: &Arc<Self>,
        batch: Vec<AckItem>,
        calls: &Arc<Calls>,
        tasks: &mut JoinSet<()>,
    ) {
        // Waiting for a call slot here stops the acker from reading its channel; the bounded
        // channel then holds the workers back, which holds the poller back: backpressure.
        let Ok(permit) = calls.slots.clone().acquire_owned().await else {
            return;
        };
        let (this, calls) = (self.clone(), calls.clone());
        tasks.spawn(async move {
            drop(this.send(batch, &calls, Some(permit)).await);
        });
    }

    /// Send one batch, retrying until it lands or its items' leases expire; gives up on items
    /// whose lease has expired. A failed call rests on its own schedule without its call slot,
    /// so the other calls go on; failures that persist (or a 429, an authentication error)
    /// pause every call of the acker ([`Failures`], as the poller's pulls). `permit` is the
    /// call slot held, if any; the one held at the end is returned.
    async fn send(
        &self,
        mut batch: Vec<AckItem>,
        calls: &Calls,
        mut permit: Option<OwnedSemaphorePermit>,
    ) -> Option<OwnedSemaphorePermit> {
        let mut just_rested = false;
        loop {
            self.give_up_expired(&mut batch);
            if batch.is_empty() {
                return permit;
            }
            // A pause of every call (failures persisted): wait it out, but not past the last
            // chance of a held lease. A call that just rested on its own failure goes now.
            let paused = calls.pause_remaining(Instant::now());
            if !std::mem::take(&mut just_rested)
                && !paused.is_zero()
                && !self.hard_stop.is_cancelled()
            {
                let wait = match last_chance(
                    batch.iter().map(|i| i.deadline),
                    self.lease_margin,
                    Instant::now(),
                ) {
                    Some(t) => paused.min(t.saturating_duration_since(Instant::now())),
                    None => paused,
                };
                if !self.rest(&mut batch, wait).await {
                    return permit;
                }
            }
            let slot = match permit.take() {
                Some(p) => p,
                None => match calls.slots.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return None,
                },
            };
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
                    calls.succeeded();
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
                    return Some(slot);
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
                    let slot = Box::pin(self.send(batch, calls, Some(slot))).await;
                    return Box::pin(self.send(right, calls, slot)).await;
                }
                self.metrics.ack_warnings.inc();
                if self.logs.allow(Event::AckFailed) {
                    error!(queue = %self.queue, error = %err, lease = %esc(&short_lease(&batch[0].lease_id)),
                        kind = ?batch[0].kind,
                        "the ack API refuses this item; its message returns when its lease expires");
                }
                return Some(slot);
            }
            if self.hard_stop.is_cancelled() {
                error!(queue = %self.queue, items = batch.len(), error = %err,
                    first_lease = %short_lease(&batch[0].lease_id),
                    "ack call failed during shutdown; these messages return when their leases expire");
                return Some(slot);
            }
            let rest = calls.failed(&err, self.calls_in_flight > 1, Instant::now());
            let wait = cap_to_leases(
                rest.wait(),
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
            // Resting alone, the call gives its slot to the others; in a pause of every call
            // it keeps it (the acker then stops reading its channel: backpressure).
            match rest {
                Rest::Own(_) => drop(slot),
                Rest::All(_) => permit = Some(slot),
            }
            if !self.rest(&mut batch, wait).await {
                return permit;
            }
            just_rested = true;
        }
    }

    /// Sleep `wait` before the next attempt, waking at each lease end on the way to give up
    /// (and count) what can no longer be acked. False when nothing is left to send; a hard stop
    /// ends the rest early for one last attempt.
    async fn rest(&self, batch: &mut Vec<AckItem>, wait: Duration) -> bool {
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
                    return true;
                }
            }
            if Instant::now() >= next {
                return true;
            }
            self.give_up_expired(batch);
            if batch.is_empty() {
                return false;
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

/// The ack calls of one acker: their slots, and their shared failure record (the poller's
/// mechanism: [`Failures`]) with the instant until which every call rests.
struct Calls {
    slots: Arc<Semaphore>,
    health: Mutex<(Failures, Option<Instant>)>,
}

impl Calls {
    fn new(in_flight: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(in_flight.max(1))),
            health: Mutex::new((Failures::default(), None)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Failures, Option<Instant>)> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A call landed: the API works, so the failure run and any pause end.
    fn succeeded(&self) {
        let mut g = self.lock();
        g.0.succeeded();
        g.1 = None;
    }

    /// A call failed: how it rests. A rest of every call becomes the acker's pause.
    fn failed(&self, err: &ApiError, others_go_on: bool, now: Instant) -> Rest {
        let mut g = self.lock();
        let rest = g.0.failed(err, others_go_on);
        if let Rest::All(wait) = rest {
            let until = now + wait;
            g.1 = Some(g.1.map_or(until, |u| u.max(until)));
        }
        rest
    }

    /// How long every call still rests.
    fn pause_remaining(&self, now: Instant) -> Duration {
        self.lock()
            .1
            .map_or(Duration::ZERO, |u| u.saturating_duration_since(now))
    }
}

/// The last moment to send items with these lease ends: `margin` before the earliest lease
/// that still has that much time left.
fn last_chance(
    deadlines: impl Iterator<Item = Instant>,
    margin: Duration,
    now: Instant,
) -> Option<Instant> {
    deadlines
        .filter_map(|d| d.checked_sub(margin))
        .filter(|t| *t > now)
        .min()
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
    let Some(last_chance) = last_chance(deadlines, margin, now) else {
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

    /// One call the fake API saw.
    #[derive(Debug, Clone)]
    struct Call {
        at: Instant,
        acks: Vec<String>,
        retries: Vec<(String, u32)>,
        ok: bool,
    }

    impl Call {
        fn leases(&self) -> impl Iterator<Item = &str> {
            self.acks
                .iter()
                .map(String::as_str)
                .chain(self.retries.iter().map(|(l, _)| l.as_str()))
        }
    }

    type Rule = dyn Fn(&[Call], &Call) -> Option<ApiError> + Send + Sync;

    /// A fake ack API: records every call (each takes `CALL_TIME`) and answers by `rule`, which sees
    /// the calls before and the one at hand; a call carrying the lease `bad` answers 400.
    #[derive(Clone)]
    struct FakeAckApi {
        calls: Arc<Mutex<Vec<Call>>>,
        rule: Arc<Rule>,
    }

    impl FakeAckApi {
        fn new(rule: impl Fn(&[Call], &Call) -> Option<ApiError> + Send + Sync + 'static) -> Self {
            Self {
                calls: Arc::default(),
                rule: Arc::new(rule),
            }
        }

        fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }

        /// The leases of the calls that succeeded, each as often as it was acked or retried.
        fn landed(&self) -> Vec<String> {
            let mut l: Vec<String> = self
                .calls()
                .iter()
                .filter(|c| c.ok)
                .flat_map(|c| c.leases().map(str::to_owned).collect::<Vec<_>>())
                .collect();
            l.sort();
            l
        }
    }

    impl AckApi for FakeAckApi {
        async fn ack(
            &self,
            acks: &[AckEntry<'_>],
            retries: &[RetryEntry<'_>],
        ) -> Result<AckResult, ApiError> {
            let mut call = Call {
                at: Instant::now(),
                acks: acks.iter().map(|a| a.lease_id.to_owned()).collect(),
                retries: retries
                    .iter()
                    .map(|r| (r.lease_id.to_owned(), r.delay_seconds))
                    .collect(),
                ok: false,
            };
            let err = if call.leases().any(|l| l == "bad") {
                Some(status(400, None))
            } else {
                (self.rule)(&self.calls(), &call)
            };
            call.ok = err.is_none();
            self.calls.lock().unwrap().push(call);
            tokio::time::sleep(CALL_TIME).await;
            match err {
                Some(e) => Err(e),
                None => Ok(AckResult {
                    ack_count: Some(acks.len() as u64),
                    retry_count: Some(retries.len() as u64),
                    warnings: Vec::new(),
                }),
            }
        }
    }

    fn status(status: u16, retry_after: Option<Duration>) -> ApiError {
        ApiError::Status {
            status,
            errors: Vec::new(),
            excerpt: String::new(),
            retry_after,
        }
    }

    const MARGIN: Duration = Duration::from_secs(5);
    /// How long each call of the fake takes.
    const CALL_TIME: Duration = Duration::from_millis(10);

    /// An acker over `api` with 4 calls in flight, and the sender of its channel.
    fn start(
        api: &FakeAckApi,
    ) -> (
        mpsc::Sender<AckItem>,
        tokio::task::JoinHandle<()>,
        ConsumerMetrics,
    ) {
        let metrics = crate::telemetry::Metrics::new().consumer("q", 100);
        let acker = Acker {
            queue: "q".into(),
            client: api.clone(),
            metrics: metrics.clone(),
            lease_margin: MARGIN,
            hard_stop: CancellationToken::new(),
            calls_in_flight: 4,
            logs: crate::logs::LogLimiter::new("q"),
        };
        let (tx, rx) = mpsc::channel(1000);
        (tx, tokio::spawn(acker.run(rx)), metrics)
    }

    fn ack(lease: &str, deadline: Instant) -> AckItem {
        AckItem {
            lease_id: lease.into(),
            kind: AckKind::Ack,
            deadline,
        }
    }

    /// Send `n` acks of leases `{prefix}{i}` whose leases end in a minute.
    async fn send_acks(tx: &mpsc::Sender<AckItem>, prefix: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut leases = Vec::new();
        for i in 0..n {
            let lease = format!("{prefix}{i}");
            tx.send(ack(&lease, deadline)).await.unwrap();
            leases.push(lease);
        }
        leases
    }

    /// Wait (in paused time, bounded) until the fake has seen `n` calls.
    async fn calls_seen(api: &FakeAckApi, n: usize) {
        for _ in 0..100_000 {
            if api.calls().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("never saw {n} calls: {:?}", api.calls());
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    #[tokio::test(start_paused = true)]
    async fn acks_and_retries_ride_in_one_call_with_their_exact_delays() {
        let api = FakeAckApi::new(|_, _| None);
        let (tx, task, metrics) = start(&api);
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(60);
        let retry = |lease: &str, delay_seconds| AckItem {
            lease_id: lease.into(),
            kind: AckKind::Retry { delay_seconds },
            deadline,
        };
        tx.send(ack("a", deadline)).await.unwrap();
        tx.send(retry("b", 7)).await.unwrap();
        tx.send(ack("c", deadline)).await.unwrap();
        tx.send(retry("d", 0)).await.unwrap();
        tx.send(retry("e", 43_200)).await.unwrap();
        calls_seen(&api, 1).await;
        let calls = api.calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0].acks, ["a", "c"]);
        assert_eq!(
            calls[0].retries,
            [
                ("b".to_owned(), 7),
                ("d".to_owned(), 0),
                ("e".to_owned(), 43_200)
            ]
        );
        // Held for companions for the flush interval, no longer.
        assert_eq!(calls[0].at - t0, FLUSH_INTERVAL);
        drop(tx);
        task.await.unwrap();
        assert_eq!(api.calls().len(), 1);
        assert_eq!(
            (metrics.acks_sent.get(), metrics.retries_sent.get()),
            (2, 3)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_call_carries_more_than_100_items_and_full_calls_go_at_once() {
        let api = FakeAckApi::new(|_, _| None);
        let (tx, task, _) = start(&api);
        let t0 = Instant::now();
        let leases = send_acks(&tx, "m", 250).await;
        calls_seen(&api, 3).await;
        let calls = api.calls();
        let sizes: Vec<usize> = calls.iter().map(|c| c.acks.len()).collect();
        assert_eq!(sizes, [100, 100, 50]);
        assert_eq!(
            (calls[0].at - t0, calls[1].at - t0),
            (Duration::ZERO, Duration::ZERO)
        );
        assert_eq!(calls[2].at - t0, FLUSH_INTERVAL);
        drop(tx);
        task.await.unwrap();
        assert_eq!(api.landed(), sorted(leases));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_near_its_end_is_flushed_before_its_margin() {
        let api = FakeAckApi::new(|_, _| None);
        let (tx, task, _) = start(&api);
        let t0 = Instant::now();
        let soon = Duration::from_millis(30);
        tx.send(ack("far", t0 + Duration::from_secs(60)))
            .await
            .unwrap();
        tx.send(ack("near", t0 + MARGIN + soon)).await.unwrap();
        calls_seen(&api, 1).await;
        let call = &api.calls()[0];
        assert_eq!(call.acks, ["far", "near"]);
        assert_eq!(
            call.at - t0,
            soon,
            "flushed {MARGIN:?} before the lease ends"
        );
        drop(tx);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_item_is_split_off_and_the_rest_land() {
        let api = FakeAckApi::new(|_, _| None);
        let (tx, task, metrics) = start(&api);
        let mut leases = send_acks(&tx, "m", 3).await;
        tx.send(ack("bad", Instant::now() + Duration::from_secs(60)))
            .await
            .unwrap();
        leases.extend(send_acks(&tx, "n", 4).await);
        drop(tx);
        task.await.unwrap();
        // Every other item lands exactly once; the refused one alone ends as a warning.
        assert_eq!(api.landed(), sorted(leases));
        assert_eq!(metrics.ack_warnings.get(), 1);
        let refused: Vec<usize> = api
            .calls()
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.acks.len())
            .collect();
        assert_eq!(refused, [8, 4, 2, 1], "halved down to the one refused item");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_call_rests_alone_while_the_other_calls_go_on() {
        // The first call carrying `a0` fails once.
        let api = FakeAckApi::new(|before, call| {
            let first = call.leases().any(|l| l == "a0")
                && !before.iter().any(|c| c.leases().any(|l| l == "a0"));
            first.then(|| status(500, None))
        });
        let (tx, task, _) = start(&api);
        let a = send_acks(&tx, "a", 100).await;
        calls_seen(&api, 1).await;
        // Once the failure is known, two more full calls.
        tokio::time::sleep(CALL_TIME).await;
        let t1 = Instant::now();
        let b = send_acks(&tx, "b", 100).await;
        let c = send_acks(&tx, "c", 100).await;
        calls_seen(&api, 4).await;
        drop(tx);
        task.await.unwrap();
        let calls = api.calls();
        let first_of = |p: &str| {
            calls
                .iter()
                .filter(|c| c.leases().any(|l| l.starts_with(p)))
                .map(|c| c.at.saturating_duration_since(t1))
                .collect::<Vec<_>>()
        };
        // The other calls went at once, while the failed one rested.
        assert_eq!(first_of("b"), [Duration::ZERO]);
        assert_eq!(first_of("c"), [Duration::ZERO]);
        // Its own retry came after its own short backoff (100 ms doubling, jittered), not
        // after the consumer-wide backoff of persistent failures (500 ms and up).
        let tries = first_of("a");
        assert_eq!(tries.len(), 2, "{calls:?}");
        let rest = tries[1] - tries[0];
        assert!(
            rest >= Duration::from_millis(100) && rest < Duration::from_millis(500),
            "{rest:?}"
        );
        assert_eq!(api.landed(), sorted([a, b, c].concat()));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_pause_every_call() {
        // The first three calls fail; the ones after succeed.
        let api = FakeAckApi::new(|before, _| (before.len() < 3).then(|| status(502, None)));
        let (tx, task, _) = start(&api);
        let a = send_acks(&tx, "a", 100).await;
        calls_seen(&api, 3).await;
        tokio::time::sleep(CALL_TIME).await;
        let third = api.calls()[2].at + CALL_TIME;
        // A new call during the pause waits for it, as does the retry of the failed one.
        let b = send_acks(&tx, "b", 100).await;
        drop(tx);
        task.await.unwrap();
        let calls = api.calls();
        assert_eq!(calls.len(), 5, "{calls:?}");
        for c in &calls[3..] {
            assert!(c.ok);
            assert!(
                c.at - third >= Duration::from_millis(500),
                "{:?} after the third failure",
                c.at - third
            );
        }
        assert_eq!(api.landed(), sorted([a, b].concat()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_retry_after_holds_back_every_call() {
        let after = Duration::from_secs(3);
        let api = FakeAckApi::new(move |before, _| {
            before.is_empty().then_some(ApiError::RateLimited {
                retry_after: Some(after),
            })
        });
        let (tx, task, _) = start(&api);
        let a = send_acks(&tx, "a", 100).await;
        calls_seen(&api, 1).await;
        tokio::time::sleep(CALL_TIME).await;
        let limited = api.calls()[0].at + CALL_TIME;
        let b = send_acks(&tx, "b", 100).await;
        drop(tx);
        task.await.unwrap();
        let calls = api.calls();
        assert_eq!(calls.len(), 3, "{calls:?}");
        for c in &calls[1..] {
            assert!(
                c.at - limited >= after,
                "{:?} after the 429",
                c.at - limited
            );
        }
        assert_eq!(api.landed(), sorted([a, b].concat()));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_api_gives_up_on_items_at_their_lease_end() {
        let api = FakeAckApi::new(|_, _| Some(ApiError::Timeout));
        let (tx, task, metrics) = start(&api);
        let t0 = Instant::now();
        for i in 0..5 {
            tx.send(ack(&format!("m{i}"), t0 + MARGIN + Duration::from_secs(3)))
                .await
                .unwrap();
        }
        drop(tx);
        task.await.unwrap();
        assert_eq!(metrics.leases_expired.get(), 5);
        let calls = api.calls();
        // Retried until the lease margin, then one last chance; none after the lease ended.
        assert!(calls.len() >= 3, "{calls:?}");
        assert!(
            calls
                .iter()
                .all(|c| c.at - t0 < MARGIN + Duration::from_secs(3))
        );
        assert!(api.landed().is_empty());
    }

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
