//! End-to-end: the real relay (`cfq_relay::start`) against the bundled emulator and a real
//! webhook receiver on 127.0.0.1:0.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use cfq_emulator::sink::{SinkOptions, accept_all};
use cfq_emulator::{ContentType, EmulatorOptions};
use support::{Answer, Hook, config, emulator, one_consumer, publish_text, start, wait_until};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn every_content_type_arrives_byte_exact_with_headers() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hook = Hook::start(|_, _| Answer::ok()).await;

    let bytes: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let cases: Vec<(Option<ContentType>, Vec<u8>, &str)> = vec![
        (
            Some(ContentType::Text),
            "plain ✓ ünïcødé \"q\"\n\ttab".into(),
            "text/plain; charset=utf-8",
        ),
        (
            Some(ContentType::Text),
            Vec::new(),
            "text/plain; charset=utf-8",
        ),
        (
            Some(ContentType::Json),
            br#"{"a":[1,2.5,null],"s":"\u00fc \ud83d\ude00","n":{"deep":true}}"#.to_vec(),
            "application/json",
        ),
        (
            Some(ContentType::Json),
            b"12345".to_vec(),
            "application/json",
        ),
        (
            Some(ContentType::Bytes),
            bytes.clone(),
            "application/octet-stream",
        ),
        (
            Some(ContentType::Bytes),
            vec![0],
            "application/octet-stream",
        ),
        (
            None,
            b"no content type at all".to_vec(),
            "text/plain; charset=utf-8",
        ),
    ];
    let mut ids = HashMap::new();
    for (ct, payload, want_ct) in &cases {
        let id = emu.publish("q1", *ct, payload, Duration::ZERO).unwrap();
        ids.insert(id, (payload.clone(), *want_ct, ct.map(|c| c.as_str())));
    }
    let cfg = one_consumer(&api, &hook.url(), "headers = { X-Tenant = \"blue\" }");
    let relay = start(cfg).await;
    wait_until(Duration::from_secs(10), "all acked", || {
        emu.stats("q1").acked == cases.len() as u64
    })
    .await;
    relay.stop().await;

    let got = hook.received();
    assert_eq!(got.len(), cases.len(), "one delivery per message");
    for r in &got {
        let id = r.header("cfq-message-id").expect("message id header");
        let (payload, want_ct, cf_ct) = &ids[id];
        assert_eq!(
            r.body.as_ref(),
            payload.as_slice(),
            "body of {id} must be byte-exact"
        );
        assert_eq!(r.header("content-type"), Some(*want_ct));
        assert_eq!(r.header("cfq-attempt"), Some("1"));
        assert_eq!(r.header("cfq-queue-id"), Some("q1"));
        assert_eq!(r.header("cfq-content-type"), *cf_ct);
        assert_eq!(r.header("x-tenant"), Some("blue"));
        let ts: u64 = r.header("cfq-timestamp-ms").unwrap().parse().unwrap();
        assert!(ts > 1_700_000_000_000, "publish timestamp in ms: {ts}");
        assert!(r.header("user-agent").unwrap().starts_with("cfq-relay/"));
        assert!(
            r.header("authorization").is_none(),
            "the API token never goes to the webhook"
        );
    }
    let s = emu.stats("q1");
    assert_eq!(
        (s.acked, s.retried, s.lease_expired),
        (cases.len() as u64, 0, 0)
    );
}

#[tokio::test]
async fn v8_is_retried_until_dead_lettered_and_never_forwarded() {
    let (emu, api) = emulator(EmulatorOptions {
        max_retries: 1,
        ..EmulatorOptions::default()
    })
    .await;
    let hook = Hook::start(|_, _| Answer::ok()).await;
    emu.publish(
        "q1",
        Some(ContentType::V8),
        b"\xff\x0fo\"\x01a",
        Duration::ZERO,
    )
    .unwrap();
    let cfg = one_consumer(&api, &hook.url(), "");
    let mut cfg = cfg;
    cfg.consumers[0].retry.base_delay = Duration::ZERO;
    let relay = start(cfg).await;
    wait_until(Duration::from_secs(10), "dead-lettered", || {
        emu.stats("q1").dead_lettered == 1
    })
    .await;
    let metrics = relay.metrics().render();
    relay.stop().await;
    assert_eq!(hook.count(), 0, "a v8 body is never sent");
    let s = emu.stats("q1");
    assert_eq!((s.acked, s.retried), (0, 2));
    assert!(
        metrics
            .contains("cfq_relay_messages_delivered_total{outcome=\"undecodable\",queue=\"q1\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn failing_twice_then_succeeding_is_delivered_thrice_with_backoff_and_acked_once() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    // 503 with no Retry-After, then a connection-level failure stand-in (500), then 200.
    let hook = Hook::start(|_, i| match i {
        0 => Answer::status(503),
        1 => Answer::status(500),
        _ => Answer::ok(),
    })
    .await;
    let id = publish_text(&emu, "q1", "third time lucky");
    let cfg = one_consumer(&api, &hook.url(), "");
    start(cfg).await.until_acked(&emu, "q1", 1).await;

    let tries = hook.for_id(&id);
    assert_eq!(tries.len(), 3);
    let attempts: Vec<&str> = tries
        .iter()
        .map(|r| r.header("cfq-attempt").unwrap())
        .collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    for r in &tries {
        assert_eq!(r.body.as_ref(), b"third time lucky");
    }
    // base_delay 1s: attempt 1 waits 0.5..1s (sent as 1s), attempt 2 waits 1..2s.
    let book = emu.books("q1").into_iter().find(|b| b.id == id).unwrap();
    assert_eq!(book.retries.len(), 2, "{book:?}");
    assert_eq!(book.retries[0], 1, "{book:?}");
    assert!((1..=2).contains(&book.retries[1]), "{book:?}");
    assert!(tries[1].at - tries[0].at >= Duration::from_secs(u64::from(book.retries[0])));
    assert!(tries[2].at - tries[1].at >= Duration::from_secs(u64::from(book.retries[1])));
    assert_eq!(book.acks, 1, "acked exactly once");
    assert_eq!(book.deliveries, 3);
}

#[tokio::test]
async fn never_acked_without_a_2xx() {
    let stop = CancellationToken::new();
    let (emu, api) = emulator(EmulatorOptions {
        max_retries: 2,
        ..EmulatorOptions::default()
    })
    .await;
    // Every failure mode but success.
    let hook = Hook::start(|_, i| Answer::status([500, 404, 400, 429, 302, 408][i % 6])).await;
    for i in 0..20 {
        publish_text(&emu, "q1", &format!("m{i}"));
    }
    let mut cfg = one_consumer(&api, &hook.url(), "");
    cfg.consumers[0].retry.base_delay = Duration::ZERO;
    // This test is about the outcome policy: every delivery must reach the webhook until the
    // queue dead-letters it, so the breaker (on by default) would stop it halfway.
    cfg.consumers[0].breaker.enabled = false;
    let relay = start(cfg).await;
    wait_until(Duration::from_secs(15), "all dead-lettered", || {
        emu.stats("q1").dead_lettered == 20
    })
    .await;
    relay.stop().await;
    let s = emu.stats("q1");
    assert_eq!(s.acked, 0, "nothing acked without a 2xx: {s:?}");
    assert_eq!(s.retried, 60, "three deliveries each, all retried: {s:?}");
    assert_eq!(hook.count(), 60);
    assert_eq!(s.lease_expired, 0);
    stop.cancel();
}

#[tokio::test]
async fn two_consumers_in_one_process() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let a = Hook::start(|_, _| Answer::ok()).await;
    let b = Hook::start(|_, _| Answer::ok()).await;
    for i in 0..300 {
        emu.publish(
            "qa",
            Some(ContentType::Json),
            format!("{{\"a\":{i}}}").as_bytes(),
            Duration::ZERO,
        )
        .unwrap();
        emu.publish(
            "qb",
            Some(ContentType::Bytes),
            &[i as u8, 0xff],
            Duration::ZERO,
        )
        .unwrap();
    }
    let cfg = config(
        &api,
        &[
            ("qa", &a.url(), "name = \"alpha\"", ""),
            ("qb", &b.url(), "name = \"beta\"\nconcurrency = 8", ""),
        ],
    );
    let relay = start(cfg).await;
    wait_until(Duration::from_secs(20), "both queues drained", || {
        emu.stats("qa").acked == 300 && emu.stats("qb").acked == 300
    })
    .await;
    let metrics = relay.metrics().render();
    relay.stop().await;
    assert_eq!(a.count(), 300);
    assert_eq!(b.count(), 300);
    assert!(
        a.received()
            .iter()
            .all(|r| r.header("cfq-queue-id") == Some("qa"))
    );
    assert!(
        b.received()
            .iter()
            .all(|r| r.header("cfq-queue-id") == Some("qb"))
    );
    assert!(b.max_in_flight() <= 8);
    for q in ["alpha", "beta"] {
        let line =
            format!("cfq_relay_messages_delivered_total{{outcome=\"acked\",queue=\"{q}\"}} 300");
        assert!(metrics.contains(&line), "{line}\n{metrics}");
    }
}

#[tokio::test]
async fn slow_webhook_never_sees_more_than_concurrency_in_flight() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hook = Hook::start(|_, _| Answer::ok().delayed(Duration::from_millis(100))).await;
    for i in 0..120 {
        publish_text(&emu, "q1", &format!("m{i}"));
    }
    let cfg = config(
        &api,
        &[("q1", &hook.url(), "concurrency = 7\nbatch_size = 5", "")],
    );
    start(cfg).await.until_acked(&emu, "q1", 120).await;
    let max = hook.max_in_flight();
    assert!(
        max <= 7,
        "at most `concurrency` requests in flight, saw {max}"
    );
    assert!(
        max >= 5,
        "the pool was actually used in parallel, saw {max}"
    );
    let s = emu.stats("q1");
    assert!(s.in_flight == 0 && s.lease_expired == 0, "{s:?}");
    // The relay never held more leases than it had slots for.
    assert_eq!(hook.count(), 120);
}

#[tokio::test]
async fn webhook_retry_after_sets_the_retry_delay() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hook = Hook::failing_first(1, Answer::status(429).with_header("retry-after", "3")).await;
    let id = publish_text(&emu, "q1", "x");
    let cfg = one_consumer(&api, &hook.url(), "");
    start(cfg).await.until_acked(&emu, "q1", 1).await;
    let book = emu.books("q1").into_iter().find(|b| b.id == id).unwrap();
    assert_eq!(book.retries, vec![3]);
    let tries = hook.for_id(&id);
    assert!(tries[1].at - tries[0].at >= Duration::from_secs(3));
}

/// A small receiver (50 requests at once, 503 at once beyond): with only the required keys the
/// adaptive limit finds its capacity, so few requests are turned away and none of the messages
/// is dead-lettered (the fixed default of old put 64 in flight and dead-lettered a share).
#[tokio::test]
async fn adaptive_concurrency_finds_a_small_receivers_capacity() {
    let stop = CancellationToken::new();
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let opts = SinkOptions {
        delay: Duration::from_millis(50),
        capacity: Some(50),
        ..Default::default()
    };
    let hook = Hook::start_with(opts, accept_all).await;
    let n = 1_500u64;
    for i in 0..n {
        publish_text(&emu, "q1", &format!("m{i}"));
    }
    let cfg = one_consumer(&api, &hook.url(), "");
    // The defaults, breaker on: the slow start's overshoot past the capacity is a burst of
    // 503s that the limit handles; it must not open the breaker (which would stall 30 s).
    assert!(cfg.consumers[0].breaker.enabled);
    let began = std::time::Instant::now();
    let relay = cfq_relay::start(cfg, stop.clone()).await.unwrap();
    wait_until(Duration::from_secs(90), "every message handled", || {
        let s = emu.stats("q1");
        s.acked + s.dead_lettered >= n
    })
    .await;
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "back-pressure stalled the consumer (breaker opened?): {:?}",
        began.elapsed()
    );
    let s = emu.stats("q1");
    let (served, overloaded) = (hook.stats().requests, hook.stats().overloaded);
    assert_eq!((s.acked, s.dead_lettered), (n, 0), "{s:?}");
    assert!(
        overloaded * 10 <= served + overloaded,
        "{overloaded} of {} requests turned away",
        served + overloaded
    );
    let metrics = relay.metrics().render();
    let limit: f64 = metrics
        .lines()
        .find(|l| l.starts_with("cfq_relay_concurrency_limit{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!((1.0..=80.0).contains(&limit), "limit {limit}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("cfq_relay_breaker_state{") && l.ends_with(" 0")),
        "breaker closed at the end"
    );
    stop.cancel();
    relay.wait().await.unwrap();
}

#[tokio::test]
async fn a_503_from_a_receiver_that_takes_the_rest_is_sent_again_at_once() {
    let stop = CancellationToken::new();
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    // Request 10 (the first after the first ten messages were taken) is turned away while the
    // other three of its pull are in flight: a receiver at its capacity, not down.
    let hook = Hook::start(|_, i| {
        if i == 10 {
            Answer::status(503)
        } else {
            Answer::ok().delayed(Duration::from_millis(200))
        }
    })
    .await;
    let publish = |from: usize| {
        (from..from + 10)
            .map(|i| {
                emu.publish(
                    "q1",
                    Some(ContentType::Text),
                    format!("m{i}").as_bytes(),
                    Duration::ZERO,
                )
                .unwrap()
            })
            .collect::<Vec<_>>()
    };
    publish(0);
    // Four in flight at most, so four fill the limit. The kit's config pulls an empty queue
    // every 200 ms at most: the 503 comes while the successes of the first ten are fresh.
    let cfg = config(&api, &[("q1", &hook.url(), "concurrency = 4", "")]);
    let relay = cfq_relay::start(cfg, stop.clone()).await.unwrap();
    wait_until(Duration::from_secs(15), "the first ten acked", || {
        emu.stats("q1").acked == 10
    })
    .await;
    let ids = publish(10);
    wait_until(Duration::from_secs(15), "all twenty acked", || {
        emu.stats("q1").acked == 20
    })
    .await;
    stop.cancel();
    relay.wait().await.unwrap();
    let turned_away = hook.received()[10]
        .header("cfq-message-id")
        .unwrap()
        .to_owned();
    assert!(ids.contains(&turned_away));
    // Sent again within the same delivery (attempt 1 both times), not retried through
    // Cloudflare with a delay.
    let tries = hook.for_id(&turned_away);
    let attempts: Vec<&str> = tries
        .iter()
        .map(|r| r.header("cfq-attempt").unwrap())
        .collect();
    assert_eq!(attempts, ["1", "1"]);
    for b in emu.books("q1") {
        assert_eq!((b.deliveries, b.acks), (1, 1), "{b:?}");
        assert!(b.retries.is_empty(), "{b:?}");
    }
    assert_eq!(emu.stats("q1").retried, 0);
}

/// `concurrency` bounds the messages held, resends included: a receiver that takes 8 at once
/// and turns the rest away makes the relay send messages again a round trip later, and while
/// they wait the poller must not pull others into their places. The deliveries in flight
/// (which count the waiting ones) are sampled every millisecond; they never pass 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_waiting_to_be_sent_again_count_against_concurrency() {
    let stop = CancellationToken::new();
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let opts = SinkOptions {
        delay: Duration::from_millis(30),
        capacity: Some(8),
        ..Default::default()
    };
    let hook = Hook::start_with(opts, accept_all).await;
    let n = 600u64;
    for i in 0..n {
        publish_text(&emu, "q1", &format!("m{i}"));
    }
    let cfg = config(&api, &[("q1", &hook.url(), "concurrency = 10", "")]);
    let relay = cfq_relay::start(cfg, stop.clone()).await.unwrap();
    let metrics = relay.metrics().clone();
    let in_flight = move || {
        metrics
            .render()
            .lines()
            .find(|l| l.starts_with("cfq_relay_deliveries_in_flight{"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let mut peak = 0.0f64;
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while emu.stats("q1").acked < n {
        assert!(std::time::Instant::now() < end, "{:?}", emu.stats("q1"));
        peak = peak.max(in_flight());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stop.cancel();
    relay.wait().await.unwrap();
    let overloaded = hook.stats().overloaded;
    println!("FIGURES held_bound: peak={peak} overloaded={overloaded}");
    assert!(
        overloaded > 0,
        "the receiver never turned one away: the test tests nothing"
    );
    assert!(peak <= 10.0, "{peak} messages held under concurrency = 10");
    assert_eq!(emu.stats("q1").dead_lettered, 0);
}
