//! One consumer (one queue → one webhook): wires the poller, the worker pool and the acker
//! together and runs them until shutdown, then drains.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::cloudflare::QueueClient;
use crate::config::ConsumerConfig;
use crate::pipeline::acker::{AckItem, Acker};
use crate::pipeline::ctx::PollCtx;
use crate::telemetry::ConsumerMetrics;
use crate::webhook::delivery::Webhook;

pub use crate::config::lease_margin;
pub use crate::pipeline::ctx::Readiness;

/// A configured consumer, ready to run.
pub struct Consumer {
    config: ConsumerConfig,
    ctx: PollCtx,
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
        let ctx = PollCtx::new(
            &config,
            client,
            webhook,
            metrics,
            readiness,
            tx,
            (shutdown, hard_stop),
        );
        Self {
            config,
            ctx,
            acker,
            rx,
        }
    }

    /// Run until shutdown, then drain: finish pulls in flight (handing their messages back),
    /// let deliveries finish (until the hard stop), flush every ack and retry.
    pub async fn run(self) {
        let Consumer {
            config,
            ctx,
            acker,
            rx,
        } = self;
        let acker = tokio::spawn(acker.run(rx));
        let delivery = ctx.delivery.clone();
        delivery
            .metrics
            .concurrency_limit
            .set(i64::try_from(delivery.limiter.request_limit()).unwrap_or(i64::MAX));
        // The one start-up line per consumer (the whole config is logged at DEBUG only).
        info!(queue = %delivery.label, queue_id = %config.queue_id,
            webhook = %crate::config::url_origin(&config.webhook.url),
            batch_size = config.batch_size, concurrency = config.concurrency,
            visibility = %crate::config::fmt_duration(config.visibility_timeout),
            "consumer started");
        crate::pipeline::poller::run(Arc::new(ctx)).await;
        delivery.workers.close();
        delivery.workers.wait().await;
        let label = delivery.label.clone();
        // The last sender goes with the deliveries' context; the acker then flushes and ends.
        drop(delivery);
        if let Err(e) = acker.await {
            tracing::error!(queue = %label, error = %e, "acker task failed");
        }
        info!(queue = %label, "consumer stopped");
    }
}
