//! cfq-relay: consume Cloudflare Queues over the HTTP pull API and deliver every message to a
//! webhook. [`start`] / [`run`] take a validated [`Config`] and a shutdown token, so the binary
//! and the tests drive the same code.
//!
//! # Layout
//!
//! The folders are the layers; each points only down (`python3 .ci/module_graph.py src` checks
//! that the module graph has no cycle, and CI runs it):
//!
//! | layer | folder | what it holds |
//! |---|---|---|
//! | 0 | [`logs`] | log hygiene: one-line escaping and the per-consumer log limiter |
//! | 1 | [`config`] | the configuration: serde structs, defaults, validation, secrets (pure data) |
//! | 2 | [`cloudflare`] | the Queues HTTP pull API client, its retry schedules, the online check |
//! | 2 | [`webhook`] | the webhook client: guard, delivery, signing |
//! | 3 | [`pipeline`] | one consumer: poller, worker, batch, policy, gate, concurrency, acker |
//! | 4 | [`ops`] | the supervisor, the admin server and the metrics |
//!
//! The binary (`src/main.rs`) parses arguments and wires these together; its tool commands
//! (`emulate`, `receive`, `demo`, in `src/cli/`) use the workspace crate `cfq-emulator`
//! (`crates/emulator`: the local Cloudflare API and the webhook sink), which the library never
//! imports.
//!
//! # Data flow of one consumer
//!
//! ```text
//!   Cloudflare Queue ──pull──▶ poller ──(slot from the limiter, gate admits)──▶ worker / batch
//!         ▲                                                                     │  POST
//!         │                                                                     ▼
//!         └──── ack / retry (≤ 100 per call) ◀── acker ◀── verdict ◀── policy ◀── webhook
//! ```
//!
//! The poller pulls only as many messages as there are free delivery slots; a worker checks the
//! lease still leaves time, sends through [`webhook::delivery`], lets [`pipeline::policy`]
//! decide (ack, drop, or retry after a delay) and hands the verdict to the [`pipeline::acker`],
//! which coalesces them into API calls before any lease runs out. The [`ops::supervisor`] runs
//! one such pipeline per `[[consumers]]` entry and the [`ops::admin`] server reports on them.
#![forbid(unsafe_code)]

pub mod cloudflare;
pub mod config;
pub mod logs;
pub mod ops;
pub mod pipeline;
pub mod webhook;

// The flat paths the binary, the tests and the bench use (`cfq_relay::delivery`, …), kept
// deliberately: each names a module of the layer folders above.
pub use cloudflare::{online, retry};
pub use ops::{admin, metrics, supervisor};
pub use pipeline::{acker, batch, concurrency, consumer, ctx, gate, policy, poller, worker};
pub use webhook::{delivery, guard, signing};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::Config;
pub use supervisor::{ReloadSummary, Reloader};

use crate::ops::metrics::Metrics;
use crate::ops::supervisor::Supervisor;

/// A started relay.
pub struct Running {
    admin_addr: SocketAddr,
    metrics: Metrics,
    reloader: Reloader,
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

    /// A handle that applies new configurations to this relay (SIGHUP in the binary).
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Apply a new configuration: consumers added, removed or changed are drained and
    /// (re)started, unchanged ones keep running. On error nothing changed.
    pub async fn reload(&self, config: Config) -> anyhow::Result<ReloadSummary> {
        self.reloader.reload(config).await
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

    let listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("binding the admin server to {}", config.admin.listen))?;
    let admin_addr = listener.local_addr()?;
    // Builds and starts every consumer; reloads later change the set the admin server sees.
    let readiness: admin::ConsumerSet = Arc::new(RwLock::new(Vec::new()));
    let supervisor = Supervisor::new(
        config,
        token,
        api_http,
        webhook_http,
        metrics.clone(),
        shutdown,
        readiness.clone(),
    )?;
    let shutting_down = Arc::new(AtomicBool::new(false));
    let admin_stop = CancellationToken::new();
    let admin = tokio::spawn(admin::serve(
        listener,
        admin::AdminState {
            metrics: metrics.clone(),
            consumers: readiness,
            shutting_down: shutting_down.clone(),
        },
        admin_stop.clone(),
    ));
    info!(admin = %admin_addr, "admin server listening (/metrics /healthz /readyz)");

    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
    let task = tokio::spawn(async move {
        // Readiness turns 503 as soon as the drain begins.
        supervisor
            .run(reload_rx, || shutting_down.store(true, Ordering::Relaxed))
            .await;
        admin_stop.cancel();
        let _ = admin.await;
        info!("shutdown complete");
    });
    Ok(Running {
        admin_addr,
        metrics,
        reloader: Reloader { tx: reload_tx },
        task,
    })
}

/// Run the relay until `shutdown` is cancelled and the drain is done.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    start(config, shutdown).await?.wait().await
}
