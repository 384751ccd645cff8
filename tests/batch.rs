//! Batch delivery (issue 16), end to end: the real relay (`cfq_relay::start`) against the
//! bundled emulator and a real webhook on 127.0.0.1:0 that reads `{"messages": [...]}` and
//! answers per-message results. Every test checks the emulator's books as well as what the
//! webhook saw.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use cfq_emulator::{ContentType, EmulatorOptions, Fault, FaultOp};
use cfq_relay::config::Secret;
use cfq_relay::signing::Signer;
use support::{
    Answer, Hook, Received, assert_books, config, delivered, emulator, one_consumer, publish_text,
    released, start, wait_until,
};
use support::{EndState, RawRequest, metric, publish};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One message of a batch request, as the webhook reads it.
#[derive(Debug, Clone, serde::Deserialize)]
struct Item {
    id: String,
    attempts: u32,
    timestamp_ms: Option<u64>,
    content_type: Option<String>,
    body: String,
}

fn items(r: &Received) -> Vec<Item> {
    #[derive(serde::Deserialize)]
    struct SentBatch {
        messages: Vec<Item>,
    }
    serde_json::from_slice::<SentBatch>(&r.body)
        .unwrap_or_else(|e| panic!("not a batch: {e}: {:?}", r.body))
        .messages
}

fn ids(r: &Received) -> Vec<String> {
    items(r).into_iter().map(|i| i.id).collect()
}

/// Every message id the webhook was sent, with how many times.
fn sent_counts(hook: &Hook) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for r in hook.received() {
        for id in ids(&r) {
            *counts.entry(id).or_default() += 1;
        }
    }
    counts
}

fn batch(max_messages: usize, max_wait: &str) -> String {
    format!("batch = {{ max_messages = {max_messages}, max_wait = \"{max_wait}\" }}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_content_type_arrives_byte_exact_inside_signed_batches() {
    // Raw JSON on the wire for this emulator: the relay must not base64-decode it twice.
    for json_raw in [false, true] {
        let (emu, api) = emulator(EmulatorOptions {
            json_raw,
            ..Default::default()
        })
        .await;
        let hook = Hook::start(|_, _| Answer::ok()).await;
        let bytes: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        let cases: Vec<(Option<ContentType>, Vec<u8>)> = vec![
            (
                Some(ContentType::Text),
                "plain ✓ ünïcødé \"q\"\n\ttab".into(),
            ),
            (Some(ContentType::Text), Vec::new()),
            (
                Some(ContentType::Json),
                br#"{"a":[1,2.5,null],"s":"\u00fc \ud83d\ude00","n":{"deep":true}}"#.to_vec(),
            ),
            (Some(ContentType::Json), b"12345".to_vec()),
            (Some(ContentType::Bytes), bytes.clone()),
            (Some(ContentType::Bytes), vec![0]),
            (None, b"no content type at all".to_vec()),
        ];
        let mut want = HashMap::new();
        for (ct, payload) in &cases {
            let id = emu.publish("q1", *ct, payload, Duration::ZERO).unwrap();
            want.insert(id, (payload.clone(), ct.map(|c| c.as_str().to_owned())));
        }
        let cfg = one_consumer(
            &api,
            &hook.url(),
            &format!(
                "signing_secrets = [\"{SECRET}\"]\nheaders = {{ X-Tenant = \"blue\" }}\n{}",
                batch(100, "300ms")
            ),
        );
        start(cfg)
            .await
            .until_acked(&emu, "q1", cases.len() as u64)
            .await;

        let got = hook.received();
        assert!(
            got.len() < cases.len(),
            "messages travel together: {} requests for {} messages",
            got.len(),
            cases.len()
        );
        let signer = Signer::new(&[Secret::new(SECRET)]).unwrap();
        let mut seen = HashSet::new();
        for r in &got {
            let items = items(r);
            assert_eq!(r.header("content-type"), Some("application/json"));
            assert_eq!(
                r.header("cfq-batch-size"),
                Some(items.len().to_string().as_str())
            );
            assert_eq!(r.header("cfq-queue-id"), Some("q1"));
            assert_eq!(r.header("x-tenant"), Some("blue"));
            assert!(r.header("cfq-message-id").is_none());
            // Signed over the whole body, with the batch id as webhook-id.
            let batch_id = r.header("webhook-id").unwrap();
            assert_eq!(r.header("cfq-batch-id"), Some(batch_id));
            let ts: u64 = r.header("webhook-timestamp").unwrap().parse().unwrap();
            assert_eq!(
                r.header("webhook-signature").unwrap(),
                signer.sign(batch_id, ts, &r.body)
            );
            assert_eq!(
                batch_id,
                cfq_relay::batch::batch_id(items.iter().map(|i| i.id.as_str()))
            );
            for item in items {
                let (payload, ct) = &want[&item.id];
                assert_eq!(
                    STANDARD.decode(&item.body).unwrap(),
                    *payload,
                    "body of {} must be byte-exact (json_raw {json_raw})",
                    item.id
                );
                assert_eq!(&item.content_type, ct);
                assert_eq!(item.attempts, 1);
                assert!(item.timestamp_ms.unwrap() > 1_700_000_000_000);
                assert!(seen.insert(item.id.clone()), "{} sent twice", item.id);
            }
        }
        assert_eq!(seen.len(), cases.len());
        let s = emu.stats("q1");
        assert_eq!(
            (s.acked, s.retried, s.lease_expired),
            (cases.len() as u64, 0, 0)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_ids_listed_as_failed_come_back() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let published = publish(&emu, "q1", "m", 20);
    let failed: Vec<String> = published.iter().step_by(7).cloned().collect(); // 3 ids
    let listed = failed.clone();
    // The first batch reports 3 of its messages failed, plus an id it never had; every
    // later request succeeds.
    let hook = Hook::start(move |r, i| {
        if i == 0 {
            let mut f: Vec<String> = ids(r)
                .into_iter()
                .filter(|id| listed.contains(id))
                .collect();
            f.push("not-in-this-batch".into());
            Answer::ok().with_body(serde_json::json!({ "failed": f }).to_string())
        } else {
            Answer::ok()
        }
    })
    .await;
    let cfg = one_consumer(&api, &hook.url(), &batch(100, "300ms"));
    let text = start(cfg).await.until_acked(&emu, "q1", 20).await;

    let first = ids(&hook.received()[0]);
    let failed: Vec<String> = failed.into_iter().filter(|id| first.contains(id)).collect();
    assert!(!failed.is_empty(), "the first batch held a listed id");
    let counts = sent_counts(&hook);
    for b in emu.books("q1") {
        let again = failed.contains(&b.id);
        let sent = counts.get(&b.id).copied().unwrap_or(0);
        if again {
            assert_eq!((b.deliveries, b.acks, sent), (2, 1, 2), "{b:?}");
            assert_eq!(b.retries.len(), 1, "{b:?}");
            assert!(b.retries[0] >= 1, "retried with the backoff: {b:?}");
        } else {
            assert_eq!(
                (b.deliveries, b.acks, sent, b.retries.len()),
                (1, 1, 1, 0),
                "not listed: acked once, never sent again: {b:?}"
            );
        }
    }
    assert_eq!(
        metric(&text, "cfq_relay_batch_unknown_ids_total", &[]),
        1.0,
        "{text}"
    );
    assert_eq!(delivered(&text, "retried"), failed.len() as f64);
    let end = EndState::report(
        &emu,
        "q1",
        "batch partial failure",
        20 + failed.len() as u64,
    );
    // 2xx answers said "delivered" for 20 messages once each, and for the retried ones a
    // second time (their first 2xx listed them as failed, so it was not a delivery).
    assert_eq!((end.acked, end.acked_twice, end.lease_expired), (20, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_alone_change_nothing_and_malformed_results_retry_the_batch() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    publish(&emu, "q1", "m", 5);
    let hook = Hook::start(|_, i| match i {
        0 => Answer::ok().with_body(r#"{"failed": ["ghost-1", "ghost-2"]}"#),
        _ => Answer::ok(),
    })
    .await;
    let cfg = one_consumer(&api, &hook.url(), &batch(10, "300ms"));
    let relay = start(cfg).await;
    let metrics = relay.metrics().clone();
    wait_until(Duration::from_secs(10), "all acked", || {
        emu.stats("q1").acked == 5
    })
    .await;
    assert_eq!(hook.count(), 1, "nothing came back");
    assert_eq!(
        metric(&metrics.render(), "cfq_relay_batch_unknown_ids_total", &[]),
        2.0
    );

    relay.stop().await;
    assert_eq!(emu.stats("q1").retried, 0);

    // A `failed` the relay cannot read: nothing is taken as delivered.
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    publish(&emu, "q1", "m", 4);
    let hook = Hook::start(|_, i| match i {
        0 => Answer::ok().with_body(r#"{"failed": "everything"}"#),
        _ => Answer::ok(),
    })
    .await;
    let cfg = one_consumer(&api, &hook.url(), &batch(10, "300ms"));
    let _ = start(cfg).await.until_acked(&emu, "q1", 4).await;
    assert_books(&emu, "q1", (2, 1, 1), |b| {
        (b.deliveries, b.acks, b.retries.len())
    });
}

/// A 2xx whose body never arrives (it did not end within `webhook.timeout`, or broke off before
/// its first byte) may have listed failures: nothing is taken as delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2xx_whose_body_never_arrives_takes_nothing_as_delivered() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    publish(&emu, "q1", "m", 3);
    // The first request gets a 200 head at once and its body (listing its first message as
    // failed) only after the webhook timeout; later requests get an empty 200.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let counter = served.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let Some(request) = RawRequest::read(&mut s).await else {
                    return;
                };
                if n == 0 {
                    let sent: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
                    let first = &sent["messages"][0]["id"];
                    let body = format!(r#"{{"failed":[{first}]}}"#);
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.flush().await;
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    let _ = s.write_all(body.as_bytes()).await;
                } else {
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                }
            });
        }
    });
    let mut cfg = one_consumer(&api, &format!("http://{addr}/hook"), &batch(10, "300ms"));
    cfg.consumers[0].webhook.timeout = Duration::from_secs(1);
    cfg.consumers[0].retry.base_delay = Duration::ZERO;
    let _ = start(cfg).await.until_acked(&emu, "q1", 3).await;
    // The first message was not delivered (the answer said so, too late): every message of
    // that request must have come back.
    let books = emu.books("q1");
    assert!(
        books
            .iter()
            .all(|b| b.deliveries == 2 && b.retries.len() == 1),
        "taken as delivered on a 2xx whose body never came: {books:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_whole_is_redelivered_whole() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    publish(&emu, "q1", "m", 10);
    let hook = Hook::failing_first(1, Answer::status(503).with_body("down for maintenance")).await;
    let cfg = one_consumer(&api, &hook.url(), &batch(10, "300ms"));
    let text = start(cfg).await.until_acked(&emu, "q1", 10).await;
    let got = hook.received();
    assert_eq!(ids(&got[0]).len(), 10, "one batch of all ten");
    let counts = sent_counts(&hook);
    for b in emu.books("q1") {
        // Retried with the policy's backoff (base 1 s), then delivered once more.
        assert_eq!((b.deliveries, b.acks, b.retries.len()), (2, 1, 1), "{b:?}");
        assert!(b.retries[0] >= 1, "{b:?}");
        assert_eq!(counts[&b.id], 2, "{b:?}");
    }
    assert_eq!(
        metric(
            &text,
            "cfq_relay_webhook_responses_total",
            &[("status_class", "5xx")]
        ),
        1.0,
        "one request, one answer: {text}"
    );
    assert_eq!(delivered(&text, "retried"), 10.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_leases_are_near_their_end_is_handed_back() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    // The first pull answers 2 s late: of its 3 s leases (counted from the request), less than
    // webhook timeout (1 s) + ack margin (300 ms) is left when the messages arrive.
    emu.inject_fault(FaultOp::Pull, Fault::Delay(Duration::from_secs(2)));
    publish(&emu, "q1", "m", 6);
    let hook = Hook::start(|_, _| Answer::ok()).await;
    let mut cfg = one_consumer(&api, &hook.url(), &batch(10, "5s"));
    cfg.shutdown.grace_period = Duration::from_secs(2);
    // 10 messages held (one request of 10 at a time): the first pull asks for all of them.
    cfg.consumers[0].concurrency = 10;
    cfg.consumers[0].visibility_timeout = Duration::from_secs(3);
    cfg.consumers[0].webhook.timeout = Duration::from_secs(1);
    cfg.validate().unwrap();
    let relay = start(cfg).await;
    let metrics = relay.metrics().clone();
    let started = Instant::now();
    wait_until(Duration::from_secs(15), "all acked", || {
        emu.stats("q1").acked == 6
    })
    .await;
    // Fresh leases leave 1.4 s before a batch must go: max_wait (5 s) never holds it that long.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    relay.stop().await;
    let text = metrics.render();
    assert_eq!(released(&text, "lease"), 6.0, "{text}");
    assert_books(&emu, "q1", (2, 1, vec![0]), |b| {
        (b.deliveries, b.acks, b.retries.clone())
    });
    // Each was sent once, on its second lease.
    let counts = sent_counts(&hook);
    assert_eq!(counts.len(), 6);
    assert!(counts.values().all(|c| *c == 1), "{counts:?}");
    assert!(
        hook.received()
            .iter()
            .flat_map(items)
            .all(|i| i.attempts == 2)
    );
    assert_eq!(emu.stats("q1").lease_expired, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_a_partial_batch_at_once() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    publish(&emu, "q1", "m", 5);
    let hook = Hook::start(|_, _| Answer::ok()).await;
    // A batch of 5 out of 100 would wait 10 s for company.
    let cfg = one_consumer(&api, &hook.url(), &batch(100, "10s"));
    let relay = start(cfg).await;
    let metrics = relay.metrics().clone();
    wait_until(Duration::from_secs(10), "5 pulled", || {
        metric(&metrics.render(), "cfq_relay_messages_pulled_total", &[]) == 5.0
    })
    .await;
    assert_eq!(hook.count(), 0, "the partial batch waits for company");
    let signalled = Instant::now();
    relay.stop().await;
    let took = signalled.elapsed();
    assert!(took < Duration::from_secs(3), "drain took {took:?}");
    assert_eq!(hook.count(), 1);
    assert_eq!(ids(&hook.received()[0]).len(), 5);
    let s = emu.stats("q1");
    assert_eq!((s.acked, s.retried, s.lease_expired), (5, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grace_period_that_runs_out_hands_the_batch_back() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    publish(&emu, "q1", "m", 4);
    let hook = Hook::start(|_, _| Answer::ok().delayed(Duration::from_secs(8))).await;
    let mut cfg = one_consumer(&api, &hook.url(), &batch(10, "50ms"));
    cfg.shutdown.grace_period = Duration::from_millis(500);
    cfg.consumers[0].webhook.timeout = Duration::from_secs(10);
    cfg.validate().unwrap();
    let relay = start(cfg).await;
    wait_until(Duration::from_secs(10), "the batch is in flight", || {
        hook.count() == 1
    })
    .await;
    let signalled = Instant::now();
    relay.stop().await;
    assert!(signalled.elapsed() < Duration::from_secs(4));
    // Handed back with a zero-delay retry: ready for another replica at once.
    let s = emu.stats("q1");
    assert_eq!((s.acked, s.retried, s.lease_expired), (0, 4, 0), "{s:?}");
    assert_books(&emu, "q1", vec![0], |b| b.retries.clone());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_counts_messages_and_batches_fill_up() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    publish(&emu, "q1", "m", 60);
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let s = sizes.clone();
    let hook = Hook::start(move |r, _| {
        s.lock().unwrap().push((ids(r).len(), r.at));
        Answer::ok()
    })
    .await;
    // 40 messages a second: 60 messages need at least 1 s, whatever the batch size.
    let cfg = one_consumer(
        &api,
        &hook.url(),
        &format!("max_requests_per_second = 40.0\n{}", batch(20, "100ms")),
    );
    let relay_stop = CancellationToken::new();
    let started = Instant::now();
    let relay = cfq_relay::start(cfg, relay_stop.clone()).await.unwrap();
    let metrics = relay.metrics().clone();
    wait_until(Duration::from_secs(15), "all acked", || {
        emu.stats("q1").acked == 60
    })
    .await;
    let took = started.elapsed();
    relay_stop.cancel();
    relay.wait().await.unwrap();
    assert!(took >= Duration::from_millis(900), "{took:?}");
    let sizes = sizes.lock().unwrap().clone();
    assert_eq!(sizes.iter().map(|(n, _)| n).sum::<usize>(), 60);
    assert!(sizes.len() < 60, "batched: {} requests", sizes.len());
    let text = metrics.render();
    assert_eq!(
        metric(&text, "cfq_relay_batch_messages_count", &[]),
        sizes.len() as f64
    );
    assert_eq!(metric(&text, "cfq_relay_batch_messages_sum", &[]), 60.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_counts_one_outcome_per_request() {
    let stop = CancellationToken::new();
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    publish(&emu, "q1", "m", 30);
    // The receiver is down for its first 2 requests, then recovers.
    let hook = Hook::failing_first(2, Answer::status(500)).await;
    let cfg = config(
        &api,
        &[(
            "q1",
            &hook.url(),
            "concurrency = 10\n[consumers.breaker]\nenabled = true\nconsecutive_failures = 2\nopen_for = \"1s\"\n",
            &batch(10, "20ms"),
        )],
    );
    let relay = start(cfg).await;
    let metrics = relay.metrics().clone();
    // Two failed requests (20 messages) open it: pulls stop.
    wait_until(Duration::from_secs(10), "breaker open", || {
        metric(&metrics.render(), "cfq_relay_breaker_state", &[]) == 1.0
    })
    .await;
    assert_eq!(hook.count(), 2);
    // The probe (one message) succeeds, the breaker closes, everything arrives.
    wait_until(Duration::from_secs(20), "all acked", || {
        emu.stats("q1").acked == 30
    })
    .await;
    relay.stop().await;
    let got = hook.received();
    assert_eq!(
        ids(&got[2]).len(),
        1,
        "the half-open probe carries one message"
    );
    assert_eq!(
        metric(&metrics.render(), "cfq_relay_breaker_state", &[]),
        0.0
    );
    let counts = sent_counts(&hook);
    for b in emu.books("q1") {
        let sent = counts.get(&b.id).copied().unwrap_or(0);
        assert_eq!(b.acks, 1, "{b:?}");
        // Never sent beyond its leases (handed back by the open breaker: leased, not sent).
        assert!(sent as u32 <= b.deliveries, "{b:?}");
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_on_a_batch_delays_every_message_and_pauses_pulls() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    publish(&emu, "q1", "m", 6);
    let hook = Hook::failing_first(1, Answer::status(429).with_header("retry-after", "2")).await;
    let cfg = one_consumer(&api, &hook.url(), &batch(10, "300ms"));
    let started = Instant::now();
    start(cfg).await.until_acked(&emu, "q1", 6).await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_books(&emu, "q1", (2, 1, vec![2]), |b| {
        (b.deliveries, b.acks, b.retries.clone())
    });
    let got = hook.received();
    assert_eq!(got.len(), 2, "one refused batch, one accepted");
    assert!(got[1].at - got[0].at >= Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_bytes_caps_the_body_and_a_larger_message_travels_alone() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let mut small = Vec::new();
    for i in 0..12 {
        let body = format!("{i:03}-{}", "x".repeat(200));
        small.push(publish_text(&emu, "q1", &body));
    }
    let big = publish_text(&emu, "q1", &"y".repeat(3000));
    let hook = Hook::start(|_, _| Answer::ok()).await;
    let cfg = one_consumer(
        &api,
        &hook.url(),
        "batch = { max_messages = 100, max_wait = \"300ms\", max_bytes = 1024 }",
    );
    start(cfg).await.until_acked(&emu, "q1", 13).await;
    let got = hook.received();
    let mut seen = 0;
    for r in &got {
        let in_batch = ids(r);
        seen += in_batch.len();
        if in_batch.contains(&big) {
            assert_eq!(
                in_batch,
                vec![big.clone()],
                "the large message travels alone"
            );
        } else {
            assert!(r.body.len() <= 1024, "{} bytes", r.body.len());
            // Each entry is ~330 bytes: 3 fit under 1024, 4 would not.
            assert!(in_batch.len() <= 3, "{}", in_batch.len());
        }
    }
    assert_eq!(seen, 13);
    let counts = sent_counts(&hook);
    assert!(
        small.iter().all(|id| counts.get(id) == Some(&1)),
        "{counts:?}"
    );
    assert!(
        got.len() >= 5,
        "12 messages in batches of at most 3, and the large one"
    );
}
