//! `cfq-relay demo`: the emulator, a local webhook receiver that checks every body byte for
//! byte, and the relay, in one process — the whole thing working with no Cloudflare account.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use cfq_emulator::sink::{Answer, HEADER_ATTEMPT, HEADER_MESSAGE_ID, Received, Sink, SinkOptions};
use cfq_emulator::{ContentType, Emulator, EmulatorOptions};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Messages per decodable content type (text, json, bytes).
    pub messages_per_type: usize,
    /// Every n-th first delivery is answered 500, to show retries (0: never). Not 503: a 503
    /// from a receiver that takes the other deliveries reads as "at capacity", and its message
    /// is sent again at once instead of retried.
    pub fail_every: u64,
    /// Give up after this long.
    pub deadline: Duration,
    /// Deliver in batches of up to this many messages (`demo --batch`); the receiver reports
    /// the messages it fails on purpose in `{"failed": [...]}`.
    pub batch: Option<usize>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            messages_per_type: 1000,
            fail_every: 20,
            deadline: Duration::from_secs(120),
            batch: None,
        }
    }
}

/// What a message must arrive as.
struct Expected {
    payload: Vec<u8>,
    /// The `Content-Type` of a single delivery.
    mime: &'static str,
    /// Cloudflare's content type (a batch entry's `content_type`).
    cf: &'static str,
}

/// The demo's check of every body the sink receives, byte for byte; its answers fail every
/// n-th first delivery on purpose.
#[derive(Default)]
struct Checker {
    expected: Mutex<HashMap<String, Expected>>,
    /// Messages checked (a batch counts its messages).
    messages: AtomicU64,
    exact: AtomicU64,
    corrupted: AtomicU64,
    failed_on_purpose: AtomicU64,
    fail_every: u64,
}

impl Checker {
    /// The sink's script: check one request, decide its answer.
    fn answer(&self, req: &Received) -> Answer {
        if req.batch_len().is_some() {
            return self.answer_batch(&req.body);
        }
        let n = self.messages.fetch_add(1, Ordering::Relaxed) + 1;
        let attempt = req
            .header(HEADER_ATTEMPT)
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(1);
        if self.fail_on_purpose(attempt, n) {
            return Answer::status(500);
        }
        let id = req.header(HEADER_MESSAGE_ID).unwrap_or("");
        let content_type = req.header("content-type").unwrap_or("");
        let ok = match self.expected.lock() {
            Ok(map) => map.get(id).is_some_and(|e| {
                e.payload.as_slice() == req.body.as_ref() && e.mime == content_type
            }),
            Err(_) => false,
        };
        self.count(ok);
        Answer::ok()
    }

    /// A batch: check every message byte for byte, and list the ones failed on purpose
    /// (every n-th first delivery) in `{"failed": [...]}`: only those come back.
    fn answer_batch(&self, body: &[u8]) -> Answer {
        #[derive(serde::Deserialize)]
        struct DemoBatch {
            messages: Vec<Item>,
        }
        #[derive(serde::Deserialize)]
        struct Item {
            id: String,
            attempts: u32,
            content_type: Option<String>,
            body: String,
        }
        let Ok(batch) = serde_json::from_slice::<DemoBatch>(body) else {
            self.corrupted.fetch_add(1, Ordering::Relaxed);
            return Answer::status(400);
        };
        let mut failed = Vec::new();
        for item in batch.messages {
            let n = self.messages.fetch_add(1, Ordering::Relaxed) + 1;
            if self.fail_on_purpose(item.attempts, n) {
                failed.push(item.id);
                continue;
            }
            let bytes = base64::engine::general_purpose::STANDARD.decode(&item.body);
            let ok = match (self.expected.lock(), bytes) {
                (Ok(map), Ok(bytes)) => map.get(&item.id).is_some_and(|e| {
                    e.payload == bytes && item.content_type.as_deref() == Some(e.cf)
                }),
                _ => false,
            };
            self.count(ok);
        }
        Answer::failed(&failed)
    }

    /// Every n-th message, on its first delivery.
    fn fail_on_purpose(&self, attempt: u32, n: u64) -> bool {
        let fail = self.fail_every > 0 && attempt == 1 && n.is_multiple_of(self.fail_every);
        if fail {
            self.failed_on_purpose.fetch_add(1, Ordering::Relaxed);
        }
        fail
    }

    fn count(&self, exact: bool) {
        let counter = if exact { &self.exact } else { &self.corrupted };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The demo's final figures.
#[derive(Debug)]
pub struct Summary {
    pub published: u64,
    /// Webhook requests made (fewer than messages in batch mode).
    pub requests: u64,
    /// Messages those requests carried.
    pub messages: u64,
    pub acked: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub exact: u64,
    pub corrupted: u64,
    pub duplicates: u64,
    pub lease_expired: u64,
    /// Until every decodable message was acked.
    pub delivered_in: Duration,
    /// Until the v8 ones were dead-lettered too.
    pub elapsed: Duration,
}

impl Summary {
    pub fn line(&self) -> String {
        let rate = self.acked as f64 / self.delivered_in.as_secs_f64().max(1e-3);
        format!(
            "demo: {} published, {} delivered byte-exact and acked, {} retried, {} v8 dead-lettered (undecodable by design), {} corrupted, {} duplicates, {} leases expired, {:.0} messages/s (all acked in {:.1}s, done in {:.1}s), {} webhook requests ({:.1} messages each)",
            self.published,
            self.acked,
            self.retried,
            self.dead_lettered,
            self.corrupted,
            self.duplicates,
            self.lease_expired,
            rate,
            self.delivered_in.as_secs_f64(),
            self.elapsed.as_secs_f64(),
            self.requests,
            self.messages as f64 / self.requests.max(1) as f64
        )
    }
}

fn sample(kind: ContentType, i: usize) -> (Vec<u8>, &'static str) {
    match kind {
        ContentType::Text => (
            format!("order {i} shipped ✓ — ünïcødé and \"quotes\"").into_bytes(),
            "text/plain; charset=utf-8",
        ),
        ContentType::Json => (
            format!(
                r#"{{"order":{i},"items":[{{"sku":"A-{i}","qty":2}}],"note":"ü ✓","ok":true}}"#
            )
            .into_bytes(),
            "application/json",
        ),
        ContentType::Bytes => (
            (0..64 + i % 200)
                .map(|b| ((b * 31 + i) % 256) as u8)
                .collect(),
            "application/octet-stream",
        ),
        ContentType::V8 => (vec![0xff, 0x0f, 0x6f, 0x22, 0x01, 0x61], ""),
    }
}

/// Run the demo; prints progress to stdout and returns the summary.
pub async fn run(opts: DemoOptions) -> anyhow::Result<Summary> {
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    let token = "demo-token";
    let queue = "demo-queue";
    // Strict, as `cfq-relay emulate` runs: one account, and the demo's queue created up front.
    let emulator = Emulator::new(EmulatorOptions {
        token: Some(token.into()),
        max_retries: 3,
        account_id: Some("0123456789abcdef0123456789abcdef".into()),
        queues: vec![queue.into()],
        create_queues_on_use: false,
        ..EmulatorOptions::default()
    });
    let api = emulator
        .start(SocketAddr::from(([127, 0, 0, 1], 0)), stop.clone())
        .await
        .context("starting the emulator")?;

    let checker = Arc::new(Checker {
        fail_every: opts.fail_every,
        ..Checker::default()
    });
    let script = {
        let checker = checker.clone();
        move |req: &Received, _: usize| checker.answer(req)
    };
    let sink = Sink::start_scripted(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SinkOptions::default(),
        script,
        stop.clone(),
    )
    .await
    .context("starting the webhook receiver")?;
    let hook = sink.url();

    let mut published = 0u64;
    {
        let mut expected = checker
            .expected
            .lock()
            .map_err(|_| anyhow::anyhow!("receiver state poisoned"))?;
        for i in 0..opts.messages_per_type {
            for kind in [ContentType::Text, ContentType::Json, ContentType::Bytes] {
                let (payload, mime) = sample(kind, i);
                let id = emulator.publish(queue, Some(kind), &payload, Duration::ZERO)?;
                let cf = kind.as_str();
                expected.insert(id, Expected { payload, mime, cf });
                published += 1;
            }
        }
    }
    // Two v8 messages: a Worker-only format the relay cannot decode. It retries them so that
    // Cloudflare dead-letters them after max_retries, and counts them.
    let v8 = 2u64;
    for i in 0..v8 as usize {
        let (payload, _) = sample(ContentType::V8, i);
        emulator.publish(queue, Some(ContentType::V8), &payload, Duration::ZERO)?;
    }
    println!(
        "demo: emulator at {}, webhook at {hook}, {published} messages (text, json, bytes) + {v8} v8 published",
        Emulator::base_url(api)
    );

    let config = cfq_relay::Config::from_toml(&format!(
        r#"
[cloudflare]
account_id = "0123456789abcdef0123456789abcdef"
api_base_url = "{base}"
api_token = "{token}"
[admin]
listen = "127.0.0.1:0"
[shutdown]
grace_period = "5s"
[[consumers]]
name = "demo"
queue_id = "{queue}"
batch_size = 100
visibility_timeout = "30s"
concurrency = 64
[consumers.webhook]
url = "{hook}"
timeout = "5s"
{batch}
[consumers.retry]
base_delay = "1s"
max_delay = "2s"
"#,
        base = Emulator::base_url(api),
        batch = opts
            .batch
            .map(|n| format!("batch = {{ max_messages = {n}, max_wait = \"20ms\" }}"))
            .unwrap_or_default(),
    ))?;
    let relay_stop = CancellationToken::new();
    let started = Instant::now();
    let relay = cfq_relay::start(config, relay_stop.clone()).await?;
    println!(
        "demo: relay running, metrics at http://{}/metrics",
        relay.admin_addr()
    );

    let mut last_print = Instant::now();
    let mut delivered_in = None;
    let result = loop {
        let s = emulator.stats(queue);
        if delivered_in.is_none() && s.acked >= published {
            delivered_in = Some(started.elapsed());
        }
        let done = s.acked >= published && s.dead_lettered >= v8 && s.backlog == 0;
        if done {
            break Ok(());
        }
        if started.elapsed() > opts.deadline {
            break Err(anyhow::anyhow!(
                "not finished after {:?}: {} of {published} acked, backlog {}",
                opts.deadline,
                s.acked,
                s.backlog
            ));
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            println!(
                "demo: {:>5.1}s  acked {:>6}/{published}  retried {:>4}  backlog {:>6}  in flight {:>4}",
                started.elapsed().as_secs_f64(),
                s.acked,
                s.retried,
                s.backlog,
                s.in_flight
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let elapsed = started.elapsed();
    relay_stop.cancel();
    relay.wait().await?;
    result?;

    let s = emulator.stats(queue);
    let duplicates = emulator
        .books(queue)
        .iter()
        .map(|b| u64::from(b.acks.saturating_sub(1)))
        .sum();
    let summary = Summary {
        published,
        requests: sink.stats().requests,
        messages: sink.stats().messages,
        acked: s.acked,
        retried: s.retried,
        dead_lettered: s.dead_lettered,
        exact: checker.exact.load(Ordering::Relaxed),
        corrupted: checker.corrupted.load(Ordering::Relaxed),
        duplicates,
        lease_expired: s.lease_expired,
        delivered_in: delivered_in.unwrap_or(elapsed),
        elapsed,
    };
    if summary.corrupted > 0 || summary.exact < published {
        bail!(
            "{} bodies arrived corrupted, {} of {published} arrived exact",
            summary.corrupted,
            summary.exact
        );
    }
    Ok(summary)
}
