//! The set of running consumers: starts one task per `[[consumers]]` entry, applies a reloaded
//! configuration (drains and restarts what changed or went away, leaves the rest running), and
//! drains them all at shutdown.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::Config;
use crate::cloudflare::QueueClient;
use crate::config::{ConsumerConfig, Secret};
use crate::ops::admin::ConsumerSet;
use crate::pipeline::{Consumer, Readiness};
use crate::telemetry::Metrics;
use crate::webhook::delivery::Webhook;

/// What a reload did, by consumer label (each list in config order).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadSummary {
    /// New consumers, started.
    pub added: Vec<String>,
    /// Consumers whose settings (or the `[cloudflare]` section) changed: drained, then started
    /// again with the new settings.
    pub changed: Vec<String>,
    /// Consumers no longer configured: drained and stopped.
    pub removed: Vec<String>,
    /// Consumers left running untouched.
    pub unchanged: Vec<String>,
    /// Keys that changed but only take effect at the next restart (e.g. `admin.listen`).
    pub needs_restart: Vec<String>,
}

impl fmt::Display for ReloadSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(", ")
            }
        };
        write!(
            f,
            "added: {}; changed: {}; removed: {}; unchanged: {}",
            list(&self.added),
            list(&self.changed),
            list(&self.removed),
            list(&self.unchanged)
        )?;
        if !self.needs_restart.is_empty() {
            write!(
                f,
                "; not applied until restart: {}",
                self.needs_restart.join(", ")
            )?;
        }
        Ok(())
    }
}

/// A request to apply a new configuration, answered once the new set runs (removed and changed
/// consumers may still be draining then).
pub(crate) struct ReloadRequest {
    pub config: Config,
    pub reply: oneshot::Sender<anyhow::Result<ReloadSummary>>,
}

/// Hands new configurations to a running relay. Cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    pub(crate) tx: mpsc::Sender<ReloadRequest>,
}

impl Reloader {
    /// Apply `config` (already parsed and validated, e.g. by [`Config::load`]). On error nothing
    /// changed: the relay keeps running on its previous configuration.
    pub async fn reload(&self, config: Config) -> anyhow::Result<ReloadSummary> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(ReloadRequest { config, reply })
            .await
            .map_err(|_| anyhow::anyhow!("the relay is shutting down"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the relay is shutting down"))?
    }
}

/// How long a stopping consumer gets: the current `shutdown.grace_period` for deliveries in
/// flight, then a budget for the final ack flush.
#[derive(Debug, Clone, Copy)]
struct Timing {
    grace: Duration,
    drain_budget: Duration,
}

impl Timing {
    fn of(config: &Config) -> Self {
        Self {
            grace: config.shutdown.grace_period,
            drain_budget: config.cloudflare.api_timeout * 2 + Duration::from_secs(1),
        }
    }
}

/// One live consumer.
struct LiveConsumer {
    config: ConsumerConfig,
    /// Of the files its webhook read when it was built (see [`files_fingerprint`]).
    files: Vec<u8>,
    generation: u64,
    /// Cancelled to drain this consumer alone (a child of the process shutdown token).
    stop: CancellationToken,
    /// Cancelled when its task has ended (drained), whatever the path.
    finished: CancellationToken,
    ready: Arc<Readiness>,
}

/// A consumer built for a reload but not started yet.
struct Prepared {
    label: String,
    config: ConsumerConfig,
    files: Vec<u8>,
    consumer: Consumer,
    stop: CancellationToken,
    hard_stop: CancellationToken,
    ready: Arc<Readiness>,
}

/// What every consumer is built with, whatever the configuration: the process's HTTP clients,
/// metrics, shutdown token and the consumer set the admin server reports on. A reload keeps
/// them.
pub(crate) struct Resources {
    pub api_http: reqwest::Client,
    pub webhook_http: crate::webhook::client::WebhookPool,
    pub metrics: Metrics,
    /// The process's shutdown; each consumer stops on a child of it.
    pub shutdown: CancellationToken,
    pub readiness: ConsumerSet,
}

/// Owner of the consumer tasks.
pub(crate) struct Supervisor {
    /// The configuration in effect (its `admin` and `log` are those of the start: they are
    /// not reloaded).
    config: Config,
    token: Secret,
    res: Resources,
    timing: watch::Sender<Timing>,
    /// Live consumers by label.
    slots: HashMap<String, LiveConsumer>,
    /// Every consumer task, draining ones included; each returns (label, generation).
    tasks: JoinSet<(String, u64)>,
    /// By label, when the last consumer stopped under it will have finished draining: the next
    /// one of that label starts after it, even if a reload in between removed the label.
    draining: HashMap<String, CancellationToken>,
    next_generation: u64,
}

impl Supervisor {
    /// Build every consumer of `config` (all or none) and start them; [`Supervisor::run`] then
    /// serves reloads and the shutdown.
    pub fn new(config: Config, token: Secret, res: Resources) -> anyhow::Result<Self> {
        let mut this = Self {
            timing: watch::Sender::new(Timing::of(&config)),
            config,
            token,
            res,
            slots: HashMap::new(),
            tasks: JoinSet::new(),
            draining: HashMap::new(),
            next_generation: 0,
        };
        let prepared = this
            .config
            .consumers
            .iter()
            .map(|c| this.prepare(&this.config, &this.token, c))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for p in prepared {
            this.launch(p, None);
        }
        this.publish_readiness();
        Ok(this)
    }

    /// Build one consumer (fallible: bad URL, unreadable secret file, …) without starting it.
    fn prepare(
        &self,
        config: &Config,
        token: &Secret,
        c: &ConsumerConfig,
    ) -> anyhow::Result<Prepared> {
        let label = c.label().to_owned();
        // Before the build reads them, so that a file changed in between shows at the next reload.
        let files = files_fingerprint(c);
        let cf = &config.cloudflare;
        let client = QueueClient::new(
            self.res.api_http.clone(),
            &cf.api_base_url,
            &cf.account_id,
            &c.queue_id,
            token,
            cf.api_timeout,
        )
        .with_context(|| format!("consumer {label}"))?;
        let webhook =
            Webhook::new(&self.res.webhook_http, c).with_context(|| format!("consumer {label}"))?;
        let ready = Arc::new(Readiness::default());
        let stop = self.res.shutdown.child_token();
        let hard_stop = CancellationToken::new();
        let consumer = Consumer::new(
            c.clone(),
            client,
            webhook,
            self.res.metrics.consumer(&label, c.concurrency),
            ready.clone(),
            stop.clone(),
            hard_stop.clone(),
        );
        Ok(Prepared {
            label,
            config: c.clone(),
            files,
            consumer,
            stop,
            hard_stop,
            ready,
        })
    }

    /// Start a prepared consumer; with `after`, only once that (older, draining) consumer of
    /// the same label has finished, so the two never deliver side by side.
    fn launch(&mut self, p: Prepared, after: Option<CancellationToken>) {
        let generation = self.next_generation;
        self.next_generation += 1;
        let finished = CancellationToken::new();
        self.slots.insert(
            p.label.clone(),
            LiveConsumer {
                config: p.config,
                files: p.files,
                generation,
                stop: p.stop.clone(),
                finished: finished.clone(),
                ready: p.ready,
            },
        );
        self.tasks.spawn(supervise(
            p.label,
            generation,
            p.consumer,
            after,
            p.stop,
            p.hard_stop,
            finished,
            self.timing.subscribe(),
        ));
    }

    /// The admin server's view: live consumers in config order.
    fn publish_readiness(&self) {
        let live: Vec<(String, Arc<Readiness>)> = self
            .config
            .consumers
            .iter()
            .filter_map(|c| {
                let label = c.label();
                self.slots
                    .get(label)
                    .map(|s| (label.to_owned(), s.ready.clone()))
            })
            .collect();
        *self
            .res
            .readiness
            .write()
            .unwrap_or_else(PoisonError::into_inner) = live;
    }

    /// Apply `new`: everything fallible happens before anything changes, so an error leaves
    /// the running set as it was.
    fn reload(&mut self, mut new: Config) -> anyhow::Result<ReloadSummary> {
        new.validate()?;
        let token = new.resolve_token()?;
        let mut summary = ReloadSummary::default();
        if new.admin != self.config.admin {
            summary.needs_restart.push("admin".into());
        }
        if new.log != self.config.log {
            summary.needs_restart.push("log".into());
        }
        // Not reloadable: keep what runs, so that the next reload compares against it too.
        new.admin = self.config.admin.clone();
        new.log = self.config.log.clone();

        let (old_cf, new_cf) = (&self.config.cloudflare, &new.cloudflare);
        let cloudflare_changed = old_cf.account_id != new_cf.account_id
            || old_cf.api_base_url != new_cf.api_base_url
            || old_cf.api_timeout != new_cf.api_timeout
            || self.token.expose() != token.expose();

        let mut start = Vec::new();
        for c in &new.consumers {
            let label = c.label();
            match self.slots.get(label) {
                Some(slot)
                    if slot.config == *c
                        && !cloudflare_changed
                        && slot.files == files_fingerprint(c) =>
                {
                    summary.unchanged.push(label.to_owned());
                    continue;
                }
                Some(_) => summary.changed.push(label.to_owned()),
                None => summary.added.push(label.to_owned()),
            }
            match self.prepare(&new, &token, c) {
                Ok(p) => start.push(p),
                Err(e) => {
                    // Building registered metric series: put them back as they were.
                    for label in &summary.added {
                        self.res.metrics.forget_consumer(label);
                    }
                    for label in &summary.changed {
                        if let Some(slot) = self.slots.get(label) {
                            self.res.metrics.consumer(label, slot.config.concurrency);
                        }
                    }
                    return Err(e);
                }
            }
        }
        for c in &self.config.consumers {
            if !new.consumers.iter().any(|n| n.label() == c.label()) {
                summary.removed.push(c.label().to_owned());
            }
        }

        // Nothing failed: apply.
        self.timing.send_replace(Timing::of(&new));
        self.draining.retain(|_, finished| !finished.is_cancelled());
        for label in summary.removed.iter().chain(&summary.changed) {
            if let Some(slot) = self.slots.remove(label) {
                info!(queue = %label, "reload: draining the consumer");
                slot.stop.cancel();
                self.draining.insert(label.clone(), slot.finished);
            }
        }
        for p in start {
            let after = self.draining.remove(&p.label);
            self.launch(p, after);
        }
        self.config = new;
        self.token = token;
        self.publish_readiness();
        Ok(summary)
    }

    /// A consumer task ended. `Err` when it ended while it should run: only a bug gets there.
    fn on_finished(&mut self, label: &str, generation: u64) -> Result<(), String> {
        match self.slots.get(label) {
            Some(slot) if slot.generation == generation => {
                if !slot.stop.is_cancelled() {
                    return Err(format!(
                        "consumer {label} stopped without a shutdown request"
                    ));
                }
            }
            // Replaced by a newer consumer of the same label: its series live on.
            Some(_) => {}
            None => self.res.metrics.forget_consumer(label),
        }
        Ok(())
    }

    /// Run until `shutdown` is cancelled, serving reloads; then call `draining` and drain every
    /// consumer. A consumer that fails (its task panicked, or it ended while it should run)
    /// drains them all as a shutdown does, and the result is that failure: the binary exits 1,
    /// so that the service manager restarts the relay instead of leaving a queue unconsumed
    /// behind a process that looks healthy. Nothing is lost: the failed consumer's messages
    /// come back when their leases expire, the others' are handed back by the drain.
    pub async fn run(
        mut self,
        mut reloads: mpsc::Receiver<ReloadRequest>,
        draining: impl FnOnce(),
    ) -> anyhow::Result<()> {
        let failure = loop {
            tokio::select! {
                // Shutdown first: consumers stop on the same token, and an idle one may end
                // before this loop looks; that is the drain, not "stopped without a request".
                biased;
                _ = self.res.shutdown.cancelled() => break None,
                Some(req) = reloads.recv() => {
                    let result = self.reload(req.config);
                    let _ = req.reply.send(result);
                }
                joined = self.tasks.join_next() => match joined {
                    Some(Ok((label, generation))) => {
                        if let Err(failure) = self.on_finished(&label, generation) {
                            break Some(failure);
                        }
                    }
                    Some(Err(e)) => break Some(format!("a consumer task failed: {e}")),
                    None => break Some("every consumer stopped without a shutdown request".into()),
                },
            }
        };
        if let Some(failure) = &failure {
            error!(
                error = %failure,
                "stopping the relay: every consumer drains, then it exits with an error (a service manager restarts it)"
            );
            for slot in self.slots.values() {
                slot.stop.cancel();
            }
        }
        draining();
        // Dropping the receiver answers pending reloads with "shutting down".
        drop(reloads);
        let timing = *self.timing.borrow();
        info!(grace = ?timing.grace, "shutting down: no more pulls; finishing deliveries in flight");
        // Each consumer drains within grace + drain budget (see `supervise`); this bound only
        // guards against a task that ignores them.
        let limit = timing.grace + timing.drain_budget + Duration::from_secs(2);
        let drained = timeout(limit, async {
            while let Some(r) = self.tasks.join_next().await {
                if let Err(e) = r {
                    error!(error = %e, "consumer task failed");
                }
            }
        })
        .await;
        if drained.is_err() {
            error!(
                "consumers did not stop in time; unacknowledged messages return when their leases expire"
            );
            self.tasks.abort_all();
        }
        match failure {
            Some(failure) => Err(anyhow::anyhow!(failure)),
            None => Ok(()),
        }
    }
}

/// A digest of the files a consumer's webhook reads (secrets, certificates): a reload restarts
/// the consumer when it differs, so that rotated credentials take effect.
fn files_fingerprint(c: &ConsumerConfig) -> Vec<u8> {
    use sha2::Digest;
    let mut digest = sha2::Sha256::new();
    for path in c.webhook.files() {
        digest.update(path.as_os_str().as_encoded_bytes());
        match std::fs::read(path) {
            Ok(bytes) => {
                digest.update(b"\0ok\0");
                digest.update((bytes.len() as u64).to_le_bytes());
                digest.update(&bytes);
            }
            // Unreadable now: building the consumer reports it; keep the digest distinct.
            Err(e) => digest.update(format!("\0err\0{:?}", e.kind()).as_bytes()),
        }
    }
    digest.finalize().to_vec()
}

/// One consumer's life: wait for its predecessor (reload), run until its stop token, then
/// drain within the grace period, then abandon deliveries (their messages are handed back) and
/// give the final ack flush its budget.
#[allow(clippy::too_many_arguments)]
async fn supervise(
    label: String,
    generation: u64,
    consumer: Consumer,
    after: Option<CancellationToken>,
    stop: CancellationToken,
    hard_stop: CancellationToken,
    finished: CancellationToken,
    timing: watch::Receiver<Timing>,
) -> (String, u64) {
    let _finished = finished.drop_guard();
    if let Some(previous) = after {
        tokio::select! {
            _ = previous.cancelled() => {}
            // Stopped before it ever started: nothing was pulled. Its own successor waits on
            // it, so it ends only when its predecessor has (a reload before the drain is over).
            _ = stop.cancelled() => {
                previous.cancelled().await;
                return (label, generation);
            }
        }
    }
    let mut run = tokio::spawn(consumer.run());
    tokio::select! {
        r = &mut run => {
            if let Err(e) = r {
                error!(queue = %label, error = %e, "consumer task failed");
            }
            return (label, generation);
        }
        _ = stop.cancelled() => {}
    }
    let Timing {
        grace,
        drain_budget,
    } = *timing.borrow();
    if timeout(grace, &mut run).await.is_err() {
        warn!(queue = %label, grace = ?grace,
            "grace period over: abandoning deliveries in flight and handing their messages back");
        hard_stop.cancel();
        if timeout(drain_budget, &mut run).await.is_err() {
            error!(queue = %label,
                "final ack flush did not finish; unacknowledged messages return when their leases expire");
            run.abort();
        }
    }
    (label, generation)
}

/// Resolve every secret (API token, webhook credentials and signing secrets) and read every
/// TLS file the way `run` will, so `check-config` catches an unreadable file or an unset
/// variable.
pub fn check_secrets(config: &Config) -> Result<(), crate::config::ConfigError> {
    config.resolve_token()?;
    for (i, c) in config.consumers.iter().enumerate() {
        let at = format!("consumers[{i}].webhook");
        crate::webhook::delivery::WebhookAuth::resolve(&c.webhook, &at)?;
        crate::webhook::client::check_tls_files(&c.webhook, &at)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A supervisor of two consumers whose API (a closed port) never answers a pull: they run,
    /// back off, and drain on their stop tokens.
    fn supervisor() -> (Supervisor, CancellationToken) {
        let config = Config::from_toml(
            "[cloudflare]\naccount_id = \"abc\"\napi_token = \"t\"\n\
             api_base_url = \"http://127.0.0.1:9\"\n\
             [[consumers]]\nqueue_id = \"q1\"\n[consumers.webhook]\nurl = \"http://127.0.0.1:9/a\"\n\
             [[consumers]]\nqueue_id = \"q2\"\n[consumers.webhook]\nurl = \"http://127.0.0.1:9/b\"\n",
        )
        .unwrap();
        let shutdown = CancellationToken::new();
        let res = Resources {
            api_http: reqwest::Client::new(),
            webhook_http: crate::webhook::client::WebhookPool::new().unwrap(),
            metrics: Metrics::new(),
            shutdown: shutdown.clone(),
            readiness: Arc::new(std::sync::RwLock::new(Vec::new())),
        };
        let token = config.resolve_token().unwrap();
        (Supervisor::new(config, token, res).unwrap(), shutdown)
    }

    /// Run `sup` until it returns (bounded), with no reloads.
    async fn run(sup: Supervisor) -> (anyhow::Result<()>, bool) {
        let (_reloads, rx) = mpsc::channel(1);
        let drained = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = drained.clone();
        let result = timeout(
            Duration::from_secs(30),
            sup.run(rx, move || {
                flag.store(true, std::sync::atomic::Ordering::SeqCst)
            }),
        )
        .await
        .expect("the supervisor returned");
        (result, drained.load(std::sync::atomic::Ordering::SeqCst))
    }

    #[tokio::test]
    async fn a_panicking_consumer_drains_the_others_and_fails_the_run() {
        let (mut sup, shutdown) = supervisor();
        let others: Vec<_> = sup.slots.values().map(|s| s.stop.clone()).collect();
        sup.tasks.spawn(async { panic!("injected") });
        let (result, drained) = run(sup).await;
        let e = result.expect_err("the run fails");
        assert!(e.to_string().contains("a consumer task failed"), "{e}");
        assert!(drained, "readiness turned 503 for the drain");
        assert!(others.iter().all(CancellationToken::is_cancelled));
        // The process's token is the caller's: the failure drains without cancelling it.
        assert!(!shutdown.is_cancelled());
    }

    #[tokio::test]
    async fn a_consumer_that_ends_while_it_should_run_fails_the_run() {
        let (mut sup, _shutdown) = supervisor();
        let (label, generation) = sup
            .slots
            .iter()
            .map(|(l, s)| (l.clone(), s.generation))
            .next()
            .unwrap();
        // As if that consumer's task had returned on its own.
        sup.tasks.spawn(async move { (label, generation) });
        let (result, _) = run(sup).await;
        let e = result.expect_err("the run fails");
        assert!(
            e.to_string().contains("stopped without a shutdown request"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_shutdown_drains_and_succeeds() {
        let (sup, shutdown) = supervisor();
        shutdown.cancel();
        let (result, drained) = run(sup).await;
        result.unwrap();
        assert!(drained);
    }
}
