//! cfq-relay: consume Cloudflare Queues over the HTTP pull API and deliver every message to a
//! webhook. [`start`] / [`run`] take a validated [`Config`] and a shutdown token, so the binary
//! and the tests drive the same code.
//!
//! # Layout
//!
//! The folders are the layers; each points only down:
//!
//! | layer | folder | what it holds |
//! |---|---|---|
//! | 0 | `logs`, `retry_after` | log hygiene (one-line escaping, the per-consumer log limiter); the `Retry-After` header |
//! | 1 | [`config`] | the configuration: serde structs, defaults, validation, secrets (pure data) |
//! | 1 | `telemetry` | the typed metric labels (outcome, release reason, status class, API result) and the registry |
//! | 2 | [`cloudflare`] | the Queues HTTP pull API client, its wire types, its retry schedules, the online check |
//! | 2 | `webhook` | the webhook client: guard, delivery, signing, transport, the attempt's classification |
//! | 3 | `pipeline` | one consumer: poller, worker, batch, policy, gate, concurrency, acker |
//! | 4 | `ops` | the supervisor and the admin server |
//!
//! A module imports only from its own layer or the ones below: `python3 .ci/module_graph.py src`
//! reads this table and fails on an upward edge or a cycle (CI runs it). The modules are
//! private; the items the binary, the tests and the bench use are re-exported below under flat
//! paths. The binary sits on top: `src/main.rs` parses the arguments and dispatches to the command
//! bodies in `src/cli/` (`run` with its signals and SIGHUP reloads, `check-config`,
//! `healthcheck`, logging set-up); its tool commands (`emulate`, `receive`, `demo`) use the workspace crate
//! `cfq-emulator` (`crates/emulator`: the local Cloudflare API and the webhook sink), which the
//! library never imports.
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
//! lease still leaves time, sends through the webhook client ([`delivery`]), lets the pipeline's
//! policy decide (ack, drop, or retry after a delay; pause the consumer when the receiver asks
//! for room the adaptive limit cannot give) and hands the verdict to the acker, which
//! coalesces them into API calls before any lease runs out. The [`supervisor`] runs one such
//! pipeline per `[[consumers]]` entry and the [`admin`] server reports on them.
#![forbid(unsafe_code)]

pub mod cloudflare;
pub mod config;
mod logs;
mod ops;
mod pipeline;
mod retry_after;
mod telemetry;
mod webhook;

// The flat paths the binary, the tests and the bench use (`cfq_relay::delivery`, …), kept
// deliberately: each names a module of the layer folders above; the rest stays private.
pub use cloudflare::{online, retry};
pub use ops::{admin, supervisor};
pub use pipeline::{batch, concurrency, gate};
pub use telemetry::metrics;
pub use webhook::{delivery, signing};

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

use crate::ops::supervisor::{Resources, Supervisor};
use crate::telemetry::Metrics;
use crate::webhook::client::WebhookPool;

/// A started relay.
pub struct Running {
    admin_addr: SocketAddr,
    metrics: Metrics,
    reloader: Reloader,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
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

    /// Wait until the relay has shut down (after the token passed to [`start`] is cancelled):
    /// `Err` when it stopped because a consumer failed.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("relay task failed")?
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
    let webhook_http = WebhookPool::new().context("building the webhook HTTP client")?;

    let listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("binding the admin server to {}", config.admin.listen))?;
    let admin_addr = listener.local_addr()?;
    // Builds and starts every consumer; reloads later change the set the admin server sees.
    let readiness: admin::ConsumerSet = Arc::new(RwLock::new(Vec::new()));
    let resources = Resources {
        api_http,
        webhook_http,
        metrics: metrics.clone(),
        shutdown,
        readiness: readiness.clone(),
    };
    let supervisor = Supervisor::new(config, token, resources)?;
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
        let result = supervisor
            .run(reload_rx, || shutting_down.store(true, Ordering::Relaxed))
            .await;
        admin_stop.cancel();
        let _ = admin.await;
        info!("shutdown complete");
        result
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
