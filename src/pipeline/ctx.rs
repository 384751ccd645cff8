//! What every task of one consumer shares: its configuration, clients, limiter, gate, channels
//! and cancellation tokens (the pipeline's context), and the consumer's readiness flag.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cloudflare::QueueClient;
use crate::config::ConsumerConfig;
use crate::ops::metrics::ConsumerMetrics;
use crate::pipeline::acker::AckItem;
use crate::pipeline::concurrency::Limiter;
use crate::pipeline::policy::Policy;
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

/// What every task of one consumer shares.
pub struct Ctx {
    pub label: String,
    pub config: ConsumerConfig,
    pub client: QueueClient,
    pub webhook: Webhook,
    pub policy: Policy,
    pub metrics: ConsumerMetrics,
    pub readiness: Arc<Readiness>,
    /// Sends outcomes to the acker.
    pub acks: mpsc::Sender<AckItem>,
    /// Bounds deliveries in flight plus messages held: one permit per message; the number of
    /// permits follows the adaptive limit.
    pub limiter: Limiter,
    /// Deliveries in progress.
    pub workers: TaskTracker,
    /// Stop pulling (first signal).
    pub shutdown: CancellationToken,
    /// Grace over: abandon deliveries, hand their messages back.
    pub hard_stop: CancellationToken,
    /// A delivery starts only if `webhook.timeout + lease_margin` fit before the lease ends.
    pub lease_margin: Duration,
    /// Breaker, receiver-requested pause and rate limit.
    pub gate: crate::pipeline::gate::Gate,
    /// Rate limit of repeated log lines (the metrics count every event).
    pub logs: crate::logs::LogLimiter,
}
