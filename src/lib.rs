//! cfq-relay: consume Cloudflare Queues over the HTTP pull API and deliver every message to a
//! webhook. [`start`] / [`run`] take a validated [`Config`] and a shutdown token, so the binary
//! and the tests drive the same code.
#![forbid(unsafe_code)]

pub mod acker;
pub mod admin;
pub mod cloudflare;
pub mod config;
pub mod consumer;
pub mod delivery;
pub mod demo;
pub mod emulator;
pub mod gate;
pub mod metrics;
pub mod policy;
pub mod poller;
pub mod secrets;
pub mod signing;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use config::Config;

use crate::cloudflare::QueueClient;
use crate::consumer::{Consumer, Readiness};
use crate::delivery::Webhook;
use crate::metrics::Metrics;

/// A started relay.
pub struct Running {
    admin_addr: SocketAddr,
    metrics: Metrics,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Where the admin server listens (useful with port 0).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The metrics registry of this relay.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Wait until the relay has shut down (after the token passed to [`start`] is cancelled).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("relay task failed")
    }
}

/// Start every consumer and the admin server; returns once they run. Cancelling `shutdown`
/// begins the graceful stop: pulling stops, deliveries get `shutdown.grace_period` to finish,
/// acks and retries are flushed, held messages are handed back.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let token = config.resolve_token()?;
    let metrics = Metrics::new();
    let api_http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .context("building the API HTTP client")?;
    let webhook_http = delivery::client_builder()
        .build()
        .context("building the webhook HTTP client")?;

    let hard_stop = CancellationToken::new();
    let mut consumers = Vec::new();
    let mut readiness = Vec::new();
    for c in &config.consumers {
        let label = c.label().to_owned();
        let client = QueueClient::new(
            api_http.clone(),
            &config.cloudflare.api_base_url,
            &config.cloudflare.account_id,
            &c.queue_id,
            &token,
            config.cloudflare.api_timeout,
        )
        .with_context(|| format!("consumer {label}"))?;
        let webhook =
            Webhook::new(&webhook_http, c).with_context(|| format!("consumer {label}"))?;
        let ready = Arc::new(Readiness::default());
        readiness.push((label.clone(), ready.clone()));
        consumers.push(Consumer::new(
            c.clone(),
            client,
            webhook,
            metrics.consumer(&label, c.concurrency),
            ready,
            shutdown.clone(),
            hard_stop.clone(),
        ));
    }

    let listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("binding the admin server to {}", config.admin.listen))?;
    let admin_addr = listener.local_addr()?;
    let shutting_down = Arc::new(AtomicBool::new(false));
    let admin_stop = CancellationToken::new();
    let admin = tokio::spawn(admin::serve(
        listener,
        admin::AdminState {
            metrics: metrics.clone(),
            consumers: Arc::new(readiness),
            shutting_down: shutting_down.clone(),
        },
        admin_stop.clone(),
    ));
    info!(admin = %admin_addr, "admin server listening (/metrics /healthz /readyz)");

    let mut tasks = JoinSet::new();
    for c in consumers {
        tasks.spawn(c.run());
    }
    let grace = config.shutdown.grace_period;
    let drain_budget = config.cloudflare.api_timeout * 2 + Duration::from_secs(1);
    let task = tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = wait_all(&mut tasks) => {
                error!("every consumer stopped without a shutdown request");
            }
        }
        shutting_down.store(true, Ordering::Relaxed);
        info!(grace = ?grace, "shutting down: no more pulls; finishing deliveries in flight");
        if tokio::time::timeout(grace, wait_all(&mut tasks))
            .await
            .is_err()
        {
            warn!(grace = ?grace, "grace period over: abandoning deliveries in flight and handing their messages back");
            hard_stop.cancel();
            if tokio::time::timeout(drain_budget, wait_all(&mut tasks))
                .await
                .is_err()
            {
                error!(
                    "final ack flush did not finish; unacknowledged messages return when their leases expire"
                );
                tasks.abort_all();
            }
        }
        admin_stop.cancel();
        let _ = admin.await;
        info!("shutdown complete");
    });
    Ok(Running {
        admin_addr,
        metrics,
        task,
    })
}

/// Run the relay until `shutdown` is cancelled and the drain is done.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    start(config, shutdown).await?.wait().await
}

async fn wait_all(tasks: &mut JoinSet<()>) {
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            error!(error = %e, "consumer task failed");
        }
    }
}
