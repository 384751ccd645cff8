//! Safe by default, bounded everywhere (issue 11): a receiver outage under a config with only
//! the required keys dead-letters nothing; what the API sends is bounded (huge answers and
//! bodies, lease-less messages, ids that cannot be headers); the admin server survives idle
//! connections under a 1,024 descriptor limit; logs stay bounded and unforgeable; an ack call
//! refused for one item still lands the others; no config or reload error prints a secret.
//!
//! The relay runs as the real binary where the test needs its memory, descriptors or log
//! output (`cfq-relay run` in a child process), and as `cfq_relay::start` otherwise. A small fake
//! Cloudflare API inside the test serves the answers the emulator would never give. Each
//! scenario prints a `FIGURES` line: `cargo test --test bounds -- --nocapture`.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use cfq_emulator::EmulatorOptions;
use serde_json::{Value, json};
use support::{
    ACCOUNT, Answer, Cfg, ConsumerCfg, EndState, Hook, RelayProcess, TOKEN, api_requests,
    check_config, delivered, emulator, metric, publish, released, scrape, wait_for, wait_until,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// A fake Cloudflare API: answers pulls from a script, records ack calls.

type PullScript = dyn Fn(usize) -> Response + Send + Sync;
type AckScript = dyn Fn(&Value) -> u16 + Send + Sync;

struct FakeApi {
    base_url: String,
    pulls: Arc<AtomicUsize>,
    /// Bodies of the ack calls that were answered 200.
    acks: Arc<Mutex<Vec<Value>>>,
}

impl FakeApi {
    async fn start(
        pull: impl Fn(usize) -> Response + Send + Sync + 'static,
        ack: impl Fn(&Value) -> u16 + Send + Sync + 'static,
    ) -> FakeApi {
        let pulls = Arc::new(AtomicUsize::new(0));
        let acks = Arc::new(Mutex::new(Vec::new()));
        let pull: Arc<PullScript> = Arc::new(pull);
        let ack: Arc<AckScript> = Arc::new(ack);
        let (p, a) = (pulls.clone(), acks.clone());
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri, body: Bytes| {
            let (pull, ack, pulls, acks) = (pull.clone(), ack.clone(), p.clone(), a.clone());
            async move {
                if uri.path().ends_with("/messages/pull") {
                    let n = pulls.fetch_add(1, Ordering::SeqCst);
                    return pull(n);
                }
                let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let status = ack(&value);
                if status == 200 {
                    acks.lock().unwrap().push(value);
                    return axum::Json(json!({"success": true, "errors": [], "messages": [],
                        "result": {"ackCount": 0, "retryCount": 0, "warnings": []}}))
                    .into_response();
                }
                (
                    axum::http::StatusCode::from_u16(status).unwrap(),
                    axum::Json(json!({"success": false, "errors": [{"code": 10000, "message": "bad request"}]})),
                )
                    .into_response()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeApi {
            base_url: format!("http://{addr}/client/v4"),
            pulls,
            acks,
        }
    }

    fn pulls(&self) -> usize {
        self.pulls.load(Ordering::SeqCst)
    }

    /// (lease, delay_seconds) of every retry item of the answered ack calls.
    fn retried(&self) -> Vec<(String, u64)> {
        self.acks
            .lock()
            .unwrap()
            .iter()
            .flat_map(|v| v["retries"].as_array().cloned().unwrap_or_default())
            .map(|r| {
                (
                    r["lease_id"].as_str().unwrap_or("").to_owned(),
                    r["delay_seconds"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }

    fn acked(&self) -> BTreeSet<String> {
        self.acks
            .lock()
            .unwrap()
            .iter()
            .flat_map(|v| v["acks"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a["lease_id"].as_str().map(str::to_owned))
            .collect()
    }
}

/// A pull answer holding `messages`.
fn pull_answer(messages: Vec<Value>) -> Response {
    axum::Json(json!({"success": true, "errors": [], "messages": [],
        "result": {"message_backlog_count": messages.len(), "messages": messages}}))
    .into_response()
}

fn text_message(id: &str, lease: Option<&str>, body: &str) -> Value {
    let mut m = json!({"id": id, "body": body, "attempts": 1, "timestamp_ms": 1_700_000_000_000u64,
        "metadata": {"CF-Content-Type": "text"}});
    if let Some(l) = lease {
        m["lease_id"] = json!(l);
    }
    m
}

/// A config with only the required keys (plus the admin port 0 and the token): one consumer of
/// `q1` delivering to `hook`.
fn minimal(api: &str, hook: &str) -> Cfg {
    Cfg::minimal(api).consumer(ConsumerCfg::minimal("q1", hook))
}

// ---------------------------------------------------------------------------------------------
// Safe defaults

/// The issue's outage: 2,000 messages, the webhook answering 503 for 6 s while the emulator's
/// clock of leases and retry delays runs 100× fast (a 10-minute outage at the default
/// `base_delay` of 5 s), the queue's `max_retries` at Cloudflare's default of 3, and a config
/// with only the required keys. The breaker (on by default) keeps the messages in the queue:
/// nothing is dead-lettered, everything is acked once the receiver is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_under_a_minimal_config_dead_letters_nothing() {
    let stop = CancellationToken::new();
    let (emu, api) = emulator(EmulatorOptions {
        max_retries: 3,
        ..Default::default()
    })
    .await;
    let down = Arc::new(AtomicBool::new(true));
    let ok = Arc::new(AtomicUsize::new(0));
    let (d, o) = (down.clone(), ok.clone());
    let hook = Hook::start(move |_, _| {
        if d.load(Ordering::SeqCst) {
            Answer::status(503)
        } else {
            o.fetch_add(1, Ordering::SeqCst);
            Answer::ok()
        }
    })
    .await;
    let ids = publish(&emu, "q1", "outage", 2000);
    let config = minimal(&api, &hook.url()).config();
    assert!(config.consumers[0].breaker.enabled);
    let relay = cfq_relay::start(config, stop.clone()).await.unwrap();

    // The outage: 6 s of 503s while the emulated clock runs 100× fast.
    let outage_end = Instant::now() + Duration::from_secs(6);
    while Instant::now() < outage_end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        emu.advance(Duration::from_secs(10));
    }
    down.store(false, Ordering::SeqCst);
    let started = Instant::now();
    wait_until(
        Duration::from_secs(120),
        "every message acked or dead-lettered",
        || {
            emu.books("q1")
                .iter()
                .filter(|b| b.acks >= 1 || b.dead_lettered)
                .count()
                == ids.len()
        },
    )
    .await;
    let end = EndState::of(
        &emu,
        "q1",
        "outage_minimal_config",
        ok.load(Ordering::SeqCst) as u64,
    );
    end.print();
    let text = relay.metrics().render();
    println!(
        "FIGURES outage: messages=2000 acked={} dead_lettered={} webhook_requests={} released_breaker={} recovered_in={:.1}s",
        end.acked,
        end.dead_lettered,
        hook.count(),
        released(&text, "breaker"),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(end.dead_lettered, 0, "{end:?}");
    assert_eq!(end.acked, 2000, "{end:?}");
    stop.cancel();
}

// ---------------------------------------------------------------------------------------------
// Bounded inputs

/// Answers whose messages carry no `lease_id` are backed off like empty pulls: the pull rate
/// stays at the idle backoff's, not a tight loop (38 pulls/s before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_less_answers_back_off_like_empty_pulls() {
    let api = FakeApi::start(
        |_| {
            pull_answer(
                (0..5)
                    .map(|i| text_message(&format!("m{i}"), None, "x"))
                    .collect(),
            )
        },
        |_| 200,
    )
    .await;
    let hook = Hook::start(|_, _| Answer::ok()).await;
    let stop = CancellationToken::new();
    let config = minimal(&api.base_url, &hook.url()).config();
    let relay = cfq_relay::start(config, stop.clone()).await.unwrap();
    wait_until(Duration::from_secs(5), "a first pull", || api.pulls() > 0).await;
    let (from, at) = (api.pulls(), Instant::now());
    // A rate needs a window: 4 s of the relay's own pacing.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let rate = (api.pulls() - from) as f64 / at.elapsed().as_secs_f64();
    let invalid = metric(
        &relay.metrics().render(),
        "cfq_relay_messages_invalid_total",
        &[],
    );
    println!("FIGURES lease_less: pulls_per_s={rate:.1} invalid_counted={invalid}");
    assert!(
        rate <= 5.0,
        "pull rate {rate:.1}/s: lease-less answers must back off"
    );
    assert_eq!(hook.count(), 0);
    stop.cancel();
}

/// Message ids that cannot be header values (CR/LF, ESC) are neither delivered (a signature
/// without its `webhook-id` cannot be verified) nor written raw into the text log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_with_cr_lf_or_esc_are_not_delivered_and_forge_no_log_line() {
    let bad_ids = [
        "evil\r\nwebhook-id: forged",
        "evil\n2026-01-01T00:00:00.000000Z  INFO forged line",
        "evil\u{1b}[2Jclear",
    ];
    let api = FakeApi::start(
        move |n| {
            // One answer with messages, then empty ones.
            if n > 0 {
                return pull_answer(Vec::new());
            }
            let mut msgs = vec![text_message("good-1", Some("L-good"), "hello")];
            for (i, id) in bad_ids.iter().enumerate() {
                msgs.push(text_message(id, Some(&format!("L-bad-{i}")), "hello"));
            }
            pull_answer(msgs)
        },
        |_| 200,
    )
    .await;
    let hook = Hook::start(|_, _| Answer::ok()).await;
    let signed = ConsumerCfg::minimal("q1", &hook.url())
        .webhook("signing_secrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]");
    let config = Cfg::minimal(&api.base_url).consumer(signed).text();
    let relay = RelayProcess::spawn("bad-ids", &config);
    wait_until(Duration::from_secs(15), "three refused ids retried", || {
        api.retried()
            .iter()
            .filter(|(l, d)| l.starts_with("L-bad") && *d > 0)
            .count()
            == 3
    })
    .await;
    wait_until(Duration::from_secs(5), "the good message acked", || {
        api.acked().contains("L-good")
    })
    .await;
    let received = hook.received();
    assert_eq!(received.len(), 1, "only the good id is delivered");
    assert_eq!(received[0].header("webhook-id"), Some("good-1"));
    assert!(received[0].header("webhook-signature").is_some());
    let admin = relay.admin().await;
    let text = scrape(admin).await;
    let invalid = delivered(&text, "invalid_id");
    let lines = relay.lines();
    let forged = lines
        .iter()
        .filter(|l| {
            l.starts_with("2026-01-01") || l.starts_with("webhook-id") || l.contains('\u{1b}')
        })
        .count();
    println!(
        "FIGURES bad_ids: delivered={} invalid_id_counted={invalid} forged_lines={forged}",
        received.len()
    );
    assert_eq!(invalid, 3.0);
    assert_eq!(forged, 0, "{lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains("evil\\n2026-01-01")),
        "the refusal is logged with the id escaped: {lines:#?}"
    );
}

/// A stream of `total` bytes of a pull answer whose one message body is `total` bytes of text,
/// produced lazily (the test does not hold it either) and without a Content-Length.
fn huge_answer(total: usize) -> Response {
    let head = Bytes::from_static(
        br#"{"success":true,"errors":[],"messages":[],"result":{"messages":[{"id":"huge","lease_id":"L-huge","attempts":1,"metadata":{"CF-Content-Type":"text"},"body":""#,
    );
    let tail = Bytes::from_static(br#""}]}}"#);
    let chunk = Bytes::from(vec![b'a'; 64 * 1024]);
    let chunks = total / chunk.len();
    let stream = futures_util::stream::iter(
        std::iter::once(head)
            .chain(std::iter::repeat_n(chunk, chunks))
            .chain(std::iter::once(tail))
            .map(Ok::<Bytes, std::io::Error>),
    );
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// 1 MB bodies (Cloudflare's limit is 128 KB) and a 200 MB answer from the API: the answer is
/// refused unread past its cap (an API error, backed off), the 1 MB bodies are handed back with
/// a delay and counted as `oversized`, nothing is delivered, and the relay's peak RSS stays
/// under 64 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_answers_and_bodies_are_refused_within_bounded_memory() {
    let megabyte = "b".repeat(1024 * 1024);
    let api = FakeApi::start(
        move |n| match n % 3 {
            0 => pull_answer(
                (0..8)
                    .map(|i| {
                        text_message(
                            &format!("big-{n}-{i}"),
                            Some(&format!("L-big-{n}-{i}")),
                            &megabyte,
                        )
                    })
                    .collect(),
            ),
            1 => huge_answer(200 * 1024 * 1024),
            _ => pull_answer(Vec::new()),
        },
        |_| 200,
    )
    .await;
    let hook = Hook::start(|_, _| Answer::ok()).await;
    let relay = RelayProcess::spawn("huge", &minimal(&api.base_url, &hook.url()).text());
    let admin = relay.admin().await;
    println!(
        "FIGURES huge: vm_hwm_at_start={:.1}MiB",
        relay.vm_hwm_kib() as f64 / 1024.0
    );
    wait_until(
        Duration::from_secs(60),
        "several rounds of huge answers",
        || api.pulls() >= 9 && api.retried().len() >= 24,
    )
    .await;
    let text = scrape(admin).await;
    let oversized = delivered(&text, "oversized");
    let refused = api_requests(&text, "pull", "malformed");
    let hwm = relay.vm_hwm_kib();
    let delays: Vec<u64> = api.retried().iter().map(|(_, d)| *d).collect();
    println!(
        "FIGURES huge: pulls={} oversized_counted={oversized} answers_refused={refused} delivered={} vm_hwm={:.1}MiB",
        api.pulls(),
        hook.count(),
        hwm as f64 / 1024.0
    );
    assert_eq!(hook.count(), 0, "nothing oversized is delivered");
    assert!(oversized >= 24.0, "{text}");
    assert!(refused >= 3.0, "{text}");
    assert!(
        delays.iter().all(|d| *d > 0),
        "handed back with a delay: {delays:?}"
    );
    assert!(hwm < 64 * 1024, "peak RSS {hwm} KiB");
    assert!(
        relay
            .lines()
            .iter()
            .any(|l| l.contains("answer larger than")),
        "{:#?}",
        relay.lines()
    );
}

// ---------------------------------------------------------------------------------------------
// Admin server limits

/// 1,100 idle connections to the admin port of a relay limited to 1,024 descriptors: health
/// still answers within a second, deliveries continue, and the relay holds far fewer
/// descriptors than the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_cannot_starve_health_or_descriptors() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hook = Hook::start(|_, _| Answer::ok()).await;
    publish(&emu, "q1", "before", 100);
    let relay = RelayProcess::launch("admin-fds", &minimal(&api, &hook.url()).text())
        .nofile(1024)
        .spawn();
    let admin = relay.admin().await;
    wait_until(Duration::from_secs(20), "first deliveries", || {
        hook.count() >= 100
    })
    .await;

    let mut idle = Vec::with_capacity(1100);
    for _ in 0..1100 {
        idle.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let asked = Instant::now();
    let health = client.get(format!("http://{admin}/healthz")).send().await;
    let took = asked.elapsed();
    let status = health.map(|r| r.status().as_u16()).unwrap_or(0);
    publish(&emu, "q1", "during", 100);
    wait_until(
        Duration::from_secs(20),
        "deliveries during the flood",
        || hook.count() >= 200,
    )
    .await;
    let fds = relay.fd_count();
    println!(
        "FIGURES admin_flood: idle_connections=1100 nofile_limit=1024 healthz={status} in {}ms relay_fds={fds} delivered={}",
        took.as_millis(),
        hook.count()
    );
    assert_eq!(status, 200, "healthz must answer within a second");
    // At most 64 admin connections, plus one per delivery slot (64) and the API pool.
    assert!(fds < 300, "the relay holds {fds} descriptors");
    assert!(
        !relay
            .lines()
            .iter()
            .any(|l| l.contains("Too many open files")),
        "{:#?}",
        relay.lines()
    );
    drop(idle);
}

/// The same flood, each connection having sent the start of a request head (the shape of a
/// slowloris attack): an evicted connection was shut down gracefully, which waits for the
/// head, so every one of them held its descriptor until the 5 s header timeout, past the
/// 64-connection cap and up to the process's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_admin_requests_cannot_exhaust_descriptors() {
    use tokio::io::AsyncWriteExt;
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hook = Hook::start(|_, _| Answer::ok()).await;
    publish(&emu, "q1", "before", 10);
    let relay = RelayProcess::launch("admin-slowloris", &minimal(&api, &hook.url()).text())
        .nofile(1024)
        .spawn();
    let admin = relay.admin().await;
    wait_until(Duration::from_secs(20), "first deliveries", || {
        hook.count() >= 10
    })
    .await;

    let mut slow = Vec::with_capacity(1100);
    let flood = Instant::now();
    for _ in 0..1100 {
        let Ok(mut conn) = tokio::net::TcpStream::connect(admin).await else {
            continue;
        };
        let _ = conn
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
            .await;
        slow.push(conn);
    }
    // Within the header timeout of the first ones: still open were they not closed.
    let fds = relay.fd_count();
    assert!(
        flood.elapsed() < Duration::from_secs(4),
        "the flood was too slow to tell"
    );
    let health = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap()
        .get(format!("http://{admin}/healthz"))
        .send()
        .await;
    let status = health.map(|r| r.status().as_u16()).unwrap_or(0);
    println!(
        "FIGURES admin_slowloris: half_sent=1100 nofile_limit=1024 healthz={status} relay_fds={fds}"
    );
    assert!(fds < 300, "the relay holds {fds} descriptors");
    assert_eq!(status, 200, "healthz must answer within a second");
    drop(slow);
}

// ---------------------------------------------------------------------------------------------
// Log hygiene

/// A webhook failing 30 % of requests: the log shows the first few failures per window and then
/// one summary line with the count, at most one line per ten failures; the metrics count them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_stay_bounded_under_a_failing_webhook() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hook = Hook::start(|_, n| {
        if n % 10 < 3 {
            Answer::status(500)
        } else {
            Answer::ok()
        }
    })
    .await;
    publish(&emu, "q1", "flaky", 5000);
    let relay = RelayProcess::spawn("flaky", &minimal(&api, &hook.url()).text());
    let admin = relay.admin().await;
    // At least 1,000 failures and past one limiter window, so a summary line has been written.
    // (Waited for, not timed: a loaded machine takes longer to get there.)
    wait_for(
        Duration::from_secs(120),
        "1,000 failures and a suppression summary",
        || async {
            delivered(&scrape(admin).await, "retried") >= 1000.0
                && relay
                    .lines()
                    .iter()
                    .any(|l| l.contains("similar log lines suppressed"))
        },
    )
    .await;
    let text = scrape(admin).await;
    let failures = delivered(&text, "retried");
    let lines = relay.lines();
    let failure_lines = lines
        .iter()
        .filter(|l| l.contains("delivery failed") || l.contains("similar log lines suppressed"))
        .count();
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    println!(
        "FIGURES log_lines: webhook_requests={} failures={failures} failure_lines={failure_lines} all_lines={} log_bytes={bytes}",
        hook.count(),
        lines.len()
    );
    assert!(failures >= 1000.0, "{failures}");
    assert!(
        (failure_lines as f64) * 10.0 <= failures,
        "{failure_lines} lines for {failures} failures"
    );
}

// ---------------------------------------------------------------------------------------------
// Ack robustness

/// An ack call the API refuses as a bad request because of one item: the call is split until
/// that item is isolated, and the other 99 land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_batch_with_one_refused_item_lands_the_other_99() {
    let api = FakeApi::start(
        move |n| {
            // One answer with messages, then empty ones.
            if n > 0 {
                return pull_answer(Vec::new());
            }
            pull_answer(
                (0..100)
                    .map(|i| text_message(&format!("m{i}"), Some(&format!("L{i}")), "x"))
                    .collect(),
            )
        },
        |body| {
            let text = body.to_string();
            if text.contains("\"L42\"") { 400 } else { 200 }
        },
    )
    .await;
    let hook = Hook::start(|_, _| Answer::ok()).await;
    let stop = CancellationToken::new();
    // One pull of 100 and one ack call of 100: a fixed pool, not the adaptive limit's start.
    let fixed = ConsumerCfg::minimal("q1", &hook.url())
        .concurrency(100)
        .line("concurrency_mode = \"fixed\"");
    let config = Cfg::minimal(&api.base_url).consumer(fixed).config();
    let _relay = cfq_relay::start(config, stop.clone()).await.unwrap();
    wait_until(Duration::from_secs(20), "99 acks landed", || {
        api.acked().len() == 99
    })
    .await;
    let acked = api.acked();
    println!(
        "FIGURES ack_split: acked={} refused_item_acked={}",
        acked.len(),
        acked.contains("L42")
    );
    assert!(!acked.contains("L42"));
    assert_eq!(hook.count(), 100);
    stop.cancel();
}

// ---------------------------------------------------------------------------------------------
// Secret-safe errors through the binary

const SECRET: &str = "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0";

/// Syntax and type errors on secret keys, through `check-config` (stderr) and a SIGHUP reload
/// (the log): the secret is never printed; the key or the line and column are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_and_reload_errors_never_print_a_secret() {
    let fragment = &SECRET[6..24];
    let cases = [
        (
            format!("api_token = \"{SECRET}"),
            "",
            "TOML syntax error at line 4",
        ),
        (
            format!("api_token = [\"{SECRET}\"]"),
            "",
            "`cloudflare.api_token` has the wrong type",
        ),
        (
            "api_token = \"t\"".to_owned(),
            "signing_secrets = \"SECRET\"",
            "`consumers[0].webhook.signing_secrets` has the wrong type",
        ),
        (
            "api_token = \"t\"".to_owned(),
            "bearer_token = \"SECRET",
            "TOML syntax error at line",
        ),
    ];
    for (i, (token_line, webhook_line, want)) in cases.iter().enumerate() {
        let text = format!(
            "[cloudflare]\naccount_id = \"{ACCOUNT}\"\napi_base_url = \"http://127.0.0.1:9/client/v4\"\n{token_line}\n\
             [[consumers]]\nqueue_id = \"q1\"\n[consumers.webhook]\nurl = \"http://127.0.0.1:9/hook\"\n{}\n",
            webhook_line.replace("SECRET", SECRET)
        );
        let out = check_config(&format!("secret-{i}"), &text);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "want {want:?} in {stderr}");
        assert!(!stderr.contains(fragment), "secret printed: {stderr}");
    }

    // A reload of a file with a syntax error on the token line logs no secret either.
    let (_emu, api) = emulator(EmulatorOptions::default()).await;
    let hook = Hook::start(|_, _| Answer::ok()).await;
    let good = minimal(&api, &hook.url()).text();
    let relay = RelayProcess::spawn("reload-secret", &good);
    relay.admin().await;
    let broken = good.replace(
        &format!("api_token = \"{TOKEN}\""),
        &format!("api_token = \"{SECRET}"),
    );
    relay.reload_file(&broken);
    wait_until(Duration::from_secs(10), "the reload failure", || {
        relay.lines().iter().any(|l| l.contains("reload failed"))
    })
    .await;
    let lines = relay.lines();
    let line = lines.iter().find(|l| l.contains("reload failed")).unwrap();
    assert!(line.contains("TOML syntax error at line"), "{line}");
    assert!(!lines.iter().any(|l| l.contains(fragment)), "{lines:#?}");
}
