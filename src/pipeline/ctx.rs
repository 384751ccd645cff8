//! What the tasks of one consumer are given: the deliveries' context (webhook, policy, limiter,
//! gate, the acker's channel), the poller's (the API client, the pull settings, and the
//! deliveries' context it hands each message to), and the consumer's readiness flag. The acker
//! gets its own ([`crate::pipeline::acker::Acker`]). Fields are private to the pipeline.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cloudflare::QueueClient;
use crate::config::{BatchConfig, ConcurrencyMode, ConsumerConfig};
use crate::logs::LogLimiter;
use crate::pipeline::acker::AckItem;
use crate::pipeline::concurrency::{Limiter, Mode};
use crate::pipeline::gate::Gate;
use crate::pipeline::policy::Policy;
use crate::telemetry::ConsumerMetrics;
use crate::webhook::delivery::Webhook;

/// Readiness of one consumer: true after a successful pull, false again after several
/// failures in a row.
#[derive(Debug, Default)]
pub struct Readiness {
    pub ready: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// What a delivery (one message, or a batch) uses: the webhook client, the policy, the pool's
/// limiter, the gate, the acker's channel and the stop tokens.
pub struct DeliveryCtx {
    pub(super) label: String,
    pub(super) webhook: Webhook,
    pub(super) policy: Policy,
    pub(super) metrics: ConsumerMetrics,
    /// Sends verdicts to the acker.
    pub(super) acks: mpsc::Sender<AckItem>,
    /// Bounds deliveries in flight plus messages held: one permit per message; the number of
    /// permits follows the adaptive limit.
    pub(super) limiter: Limiter,
    /// Breaker, receiver-requested pause and rate limit.
    pub(super) gate: Gate,
    /// Rate limit of repeated log lines (the metrics count every event); the poller's too.
    pub(super) logs: LogLimiter,
    /// Deliveries (and the batcher) in progress.
    pub(super) workers: TaskTracker,
    /// Stop pulling (first signal): the batcher sends what it holds.
    pub(super) shutdown: CancellationToken,
    /// Grace over: abandon deliveries, hand their messages back.
    pub(super) hard_stop: CancellationToken,
    /// `webhook.timeout`: a delivery starts only if it and `lease_margin` fit before the lease
    /// ends.
    pub(super) timeout: Duration,
    pub(super) lease_margin: Duration,
    /// `concurrency_mode = "fixed"`: the limit never shrinks, back-pressure counts as failure.
    pub(super) fixed_limit: bool,
    /// `webhook.max_requests_per_second` is set: every request waits for its turn.
    pub(super) rate_limited: bool,
    /// `breaker.open_for`, for the log line when the breaker opens.
    pub(super) breaker_open_for: Duration,
    /// `webhook.batch`: messages go to the batcher instead of one worker each.
    pub(super) batch: Option<BatchConfig>,
}

/// What the pull loop uses: the API client, the pull settings, readiness, and the deliveries'
/// context it dispatches to.
pub struct PollCtx {
    pub(super) client: QueueClient,
    pub(super) metrics: ConsumerMetrics,
    pub(super) readiness: Arc<Readiness>,
    pub(super) batch_size: u32,
    pub(super) max_pulls_in_flight: usize,
    pub(super) max_idle_backoff: Duration,
    pub(super) visibility_timeout: Duration,
    /// Room of the batcher's channel (batch mode).
    pub(super) concurrency: usize,
    pub(super) delivery: Arc<DeliveryCtx>,
}

impl PollCtx {
    /// Both contexts of one consumer, from its configuration.
    pub(super) fn new(
        config: &ConsumerConfig,
        client: QueueClient,
        webhook: Webhook,
        metrics: ConsumerMetrics,
        readiness: Arc<Readiness>,
        acks: mpsc::Sender<AckItem>,
        stop: (CancellationToken, CancellationToken),
    ) -> Self {
        let label = config.label().to_owned();
        let (shutdown, hard_stop) = stop;
        let delivery = DeliveryCtx {
            logs: LogLimiter::new(label.clone()),
            label,
            webhook,
            policy: Policy::from_config(config),
            metrics: metrics.clone(),
            acks,
            limiter: Limiter::new(
                match config.concurrency_mode {
                    ConcurrencyMode::Adaptive => Mode::Adaptive,
                    ConcurrencyMode::Fixed => Mode::Fixed,
                },
                config.concurrency,
                // In batch mode the limit counts requests of up to `max_messages` each.
                config.webhook.batch.as_ref().map_or(1, |b| b.max_messages),
            ),
            gate: Gate::new(
                config.breaker.clone(),
                config.webhook.max_requests_per_second,
            ),
            workers: TaskTracker::new(),
            shutdown,
            hard_stop,
            timeout: config.webhook.timeout,
            lease_margin: crate::config::lease_margin(config.visibility_timeout),
            fixed_limit: config.concurrency_mode == ConcurrencyMode::Fixed,
            rate_limited: config.webhook.max_requests_per_second.is_some(),
            breaker_open_for: config.breaker.open_for,
            batch: config.webhook.batch.clone(),
        };
        Self {
            client,
            metrics,
            readiness,
            batch_size: config.batch_size,
            max_pulls_in_flight: config.max_pulls_in_flight,
            max_idle_backoff: config.max_idle_backoff,
            visibility_timeout: config.visibility_timeout,
            concurrency: config.concurrency,
            delivery: Arc::new(delivery),
        }
    }

    pub(super) fn label(&self) -> &str {
        &self.delivery.label
    }
}

/// A consumer's delivery context for unit tests of the pipeline's steps (base delay 4 s, max
/// 1 h, 410 dropped; `consumer_extra` adds keys to `[[consumers]]`), its acker's channel and
/// its metrics. The webhook's address (port 9, discard) is never connected to by these tests.
#[cfg(test)]
pub(super) fn fixture(
    consumer_extra: &str,
) -> (
    Arc<DeliveryCtx>,
    mpsc::Receiver<AckItem>,
    crate::telemetry::Metrics,
) {
    let cfg = crate::Config::from_toml(&format!(
        "[cloudflare]\naccount_id = \"abc\"\napi_token = \"t\"\n\
         [[consumers]]\nqueue_id = \"q1\"\n{consumer_extra}\n\
         [consumers.webhook]\nurl = \"http://127.0.0.1:9/hook\"\ndrop_statuses = [410]\n\
         [consumers.retry]\nbase_delay = \"4s\"\nmax_delay = \"1h\"\n"
    ))
    .unwrap();
    let c = &cfg.consumers[0];
    let http = reqwest::Client::new();
    let client = QueueClient::new(
        http.clone(),
        "http://127.0.0.1:9/client/v4",
        "abc",
        "q1",
        &cfg.resolve_token().unwrap(),
        Duration::from_secs(1),
    )
    .unwrap();
    let webhook = Webhook::new(&crate::webhook::client::WebhookPool::new().unwrap(), c).unwrap();
    let metrics = crate::telemetry::Metrics::new();
    let (tx, rx) = mpsc::channel(16);
    let poll = PollCtx::new(
        c,
        client,
        webhook,
        metrics.consumer("q1", c.concurrency),
        Arc::default(),
        tx,
        (CancellationToken::new(), CancellationToken::new()),
    );
    (poll.delivery.clone(), rx, metrics)
}
