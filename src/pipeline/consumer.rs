//! One consumer (one queue → one webhook): wires the poller, the worker pool and the acker
//! together and runs them until shutdown, then drains.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::cloudflare::QueueClient;
use crate::config::{ConcurrencyMode, ConsumerConfig};
use crate::ops::metrics::ConsumerMetrics;
use crate::pipeline::acker::{AckItem, Acker};
use crate::pipeline::concurrency::{Limiter, Mode};
use crate::pipeline::policy::Policy;
use crate::webhook::delivery::Webhook;

pub use crate::config::lease_margin;
pub use crate::pipeline::ctx::{Ctx, Readiness};

/// A configured consumer, ready to run.
pub struct Consumer {
    ctx: Arc<Ctx>,
    acker: Acker,
    rx: mpsc::Receiver<AckItem>,
}

impl Consumer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: ConsumerConfig,
        client: QueueClient,
        webhook: Webhook,
        metrics: ConsumerMetrics,
        readiness: Arc<Readiness>,
        shutdown: CancellationToken,
        hard_stop: CancellationToken,
    ) -> Self {
        let label = config.label().to_owned();
        // Room for every in-flight outcome plus a few batches: workers rarely wait on it, but
        // when the ack API is slow they do, and that is the backpressure we want.
        let (tx, rx) =
            mpsc::channel(config.concurrency + 4 * crate::pipeline::acker::MAX_ITEMS_PER_CALL);
        let margin = lease_margin(config.visibility_timeout);
        let acker = Acker {
            queue: label.clone(),
            client: client.clone(),
            metrics: metrics.clone(),
            lease_margin: margin,
            hard_stop: hard_stop.clone(),
            calls_in_flight: crate::pipeline::acker::calls_in_flight(config.max_pulls_in_flight),
            logs: crate::logs::LogLimiter::new(label.clone()),
        };
        let gate = crate::pipeline::gate::Gate::new(
            config.breaker.clone(),
            config.webhook.max_requests_per_second,
        );
        let ctx = Arc::new(Ctx {
            logs: crate::logs::LogLimiter::new(label.clone()),
            label,
            policy: Policy::from_config(&config),
            limiter: Limiter::new(
                match config.concurrency_mode {
                    ConcurrencyMode::Adaptive => Mode::Adaptive,
                    ConcurrencyMode::Fixed => Mode::Fixed,
                },
                config.concurrency,
                // In batch mode the limit counts requests of up to `max_messages` each.
                config.webhook.batch.as_ref().map_or(1, |b| b.max_messages),
            ),
            config,
            client,
            webhook,
            metrics,
            readiness,
            acks: tx,
            workers: TaskTracker::new(),
            shutdown,
            hard_stop,
            lease_margin: margin,
            gate,
        });
        Self { ctx, acker, rx }
    }

    /// Run until shutdown, then drain: finish pulls in flight (handing their messages back),
    /// let deliveries finish (until the hard stop), flush every ack and retry.
    pub async fn run(self) {
        let Consumer { ctx, acker, rx } = self;
        let acker = tokio::spawn(acker.run(rx));
        ctx.metrics
            .concurrency_limit
            .set(i64::try_from(ctx.limiter.request_limit()).unwrap_or(i64::MAX));
        // The one start-up line per consumer (the whole config is logged at DEBUG only).
        info!(queue = %ctx.label, queue_id = %ctx.config.queue_id,
            webhook = %crate::config::url_origin(&ctx.config.webhook.url),
            batch_size = ctx.config.batch_size, concurrency = ctx.config.concurrency,
            visibility = %crate::config::fmt_duration(ctx.config.visibility_timeout),
            "consumer started");
        crate::pipeline::poller::run(ctx.clone()).await;
        ctx.workers.close();
        ctx.workers.wait().await;
        let label = ctx.label.clone();
        // The last sender goes with the context; the acker then flushes and ends.
        drop(ctx);
        if let Err(e) = acker.await {
            tracing::error!(queue = %label, error = %e, "acker task failed");
        }
        info!(queue = %label, "consumer stopped");
    }
}
