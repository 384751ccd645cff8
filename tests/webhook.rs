//! Webhook features end to end: Standard Webhooks signatures checked by an independent verifier
//! (the `standardwebhooks` crate, a dev-dependency), outbound auth, status policy, envelope mode,
//! circuit breaker, rate limit.

mod support;

use std::time::Duration;

use base64::Engine;
use cfq_emulator::{ContentType, EmulatorOptions};
use support::{
    Answer, Hook, Received, config, emulator, one_consumer, publish_text, start, wait_until,
};
use tokio_util::sync::CancellationToken;

const SECRET_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SECRET_B: &str = "whsec_c2Vjb25kLXNlY3JldC1mb3Itcm90YXRpb24=";

/// Verify each (secret, request, tamper) with the `standardwebhooks` crate (the Standard Webhooks
/// project's Rust implementation, not the relay's code); returns whether each verified.
fn reference_verify(cases: &[(&str, &Received, bool)]) -> Vec<bool> {
    cases
        .iter()
        .map(|(secret, req, tamper)| {
            let webhook = standardwebhooks::Webhook::new(secret).expect("a valid whsec_ secret");
            let mut body = req.body.to_vec();
            if *tamper {
                body.push(b' ');
            }
            webhook.verify(&body, &req.headers).is_ok()
        })
        .collect()
}

#[tokio::test]
async fn signatures_verify_with_the_reference_implementation_and_rotate() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hook = Hook::start(|_, _| Answer::ok()).await;
    emu.publish(
        "q1",
        Some(ContentType::Json),
        br#"{"order":1,"note":"\u00fc"}"#,
        Duration::ZERO,
    )
    .unwrap();
    publish_text(&emu, "q1", "plain ✓ text");
    let webhook = format!("signing_secrets = [\"{SECRET_A}\", \"{SECRET_B}\"]");
    let cfg = one_consumer(&api, &hook.url(), &webhook);
    start(cfg).await.until_acked(&emu, "q1", 2).await;

    let got = hook.received();
    assert_eq!(got.len(), 2);
    let mut cases = Vec::new();
    for r in &got {
        assert_eq!(r.header("webhook-id"), r.header("cfq-message-id"));
        let sig = r.header("webhook-signature").unwrap();
        assert_eq!(sig.split(' ').count(), 2, "one signature per secret: {sig}");
        // Either secret alone verifies (rotation without downtime) ...
        cases.push((SECRET_A, r, false));
        cases.push((SECRET_B, r, false));
        // ... an altered body does not, nor does an unrelated secret.
        cases.push((SECRET_A, r, true));
        cases.push(("whsec_dW5yZWxhdGVkLXNlY3JldC1rZXktMTIzNDU2", r, false));
    }
    let results = reference_verify(&cases);
    assert_eq!(results.len(), cases.len());
    for (i, ok) in results.iter().enumerate() {
        let want = i % 4 < 2;
        assert_eq!(
            *ok, want,
            "case {i}: secret {} tamper {}",
            cases[i].0, cases[i].2
        );
    }
}

#[tokio::test]
async fn signing_secret_id_is_stable_across_retries() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hook = Hook::failing_first(1, Answer::status(500)).await;
    publish_text(&emu, "q1", "x");
    let mut cfg = one_consumer(
        &api,
        &hook.url(),
        &format!("signing_secrets = [\"{SECRET_A}\"]"),
    );
    cfg.consumers[0].retry.base_delay = Duration::ZERO;
    start(cfg).await.until_acked(&emu, "q1", 1).await;
    let got = hook.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
    let results = reference_verify(&[(SECRET_A, &got[0], false), (SECRET_A, &got[1], false)]);
    assert_eq!(results, vec![true, true]);
}

#[tokio::test]
async fn bearer_basic_and_custom_headers_arrive() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let bearer_hook = Hook::start(|_, _| Answer::ok()).await;
    let basic_hook = Hook::start(|_, _| Answer::ok()).await;
    publish_text(&emu, "qa", "a");
    publish_text(&emu, "qb", "b");
    let dir = std::env::temp_dir().join(format!("cfq-relay-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pw = dir.join("password");
    std::fs::write(&pw, "s3cret-pass\n").unwrap();
    let cfg = config(
        &api,
        &[
            (
                "qa",
                &bearer_hook.url(),
                "",
                "bearer_token = \"bearer-tok-1\"\nheaders = { X-Custom = \"yes\", X-Other = \"1\" }",
            ),
            (
                "qb",
                &basic_hook.url(),
                "",
                &format!(
                    "basic_auth = {{ username = \"relay\", password_file = \"{}\" }}",
                    pw.display()
                ),
            ),
        ],
    );
    let stop_relay = CancellationToken::new();
    let relay = cfq_relay::start(cfg, stop_relay.clone()).await.unwrap();
    wait_until(Duration::from_secs(10), "both acked", || {
        emu.stats("qa").acked == 1 && emu.stats("qb").acked == 1
    })
    .await;
    stop_relay.cancel();
    relay.wait().await.unwrap();
    let a = &bearer_hook.received()[0];
    assert_eq!(a.header("authorization"), Some("Bearer bearer-tok-1"));
    assert_eq!(a.header("x-custom"), Some("yes"));
    assert_eq!(a.header("x-other"), Some("1"));
    let b = &basic_hook.received()[0];
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("relay:s3cret-pass")
    );
    assert_eq!(b.header("authorization"), Some(expected.as_str()));
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn status_policy_branches() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    // Answer by body: the status to return on the first attempt; 200 afterwards.
    let hook = Hook::start(|r, _| {
        let first = r.header("cfq-attempt") == Some("1");
        let want: u16 = std::str::from_utf8(&r.body).unwrap().parse().unwrap();
        Answer::status(if first { want } else { 200 })
    })
    .await;
    let mut ids = std::collections::HashMap::new();
    for status in [200u16, 409, 410, 202, 404] {
        let id = publish_text(&emu, "q1", &status.to_string());
        ids.insert(status, id);
    }
    let mut cfg = config(
        &api,
        &[(
            "q1",
            &hook.url(),
            "",
            "success_statuses = [409]\ndrop_statuses = [410]\nretry_statuses = [202]",
        )],
    );
    cfg.consumers[0].retry.base_delay = Duration::ZERO;
    let metrics = start(cfg).await.until_acked(&emu, "q1", 5).await;
    let books = emu.books("q1");
    let book = |s: u16| books.iter().find(|b| b.id == ids[&s]).unwrap().clone();
    // (status, (deliveries, acks), why)
    for (status, want, why) in [
        (200, (1, 1), "2xx: acked"),
        (409, (1, 1), "configured success: acked"),
        (410, (1, 1), "configured drop: acked once, not retried"),
        (202, (2, 1), "configured retry: retried, then acked"),
        (404, (2, 1), "other 4xx: retried by default"),
    ] {
        assert_eq!((book(status).deliveries, book(status).acks), want, "{why}");
    }
    for (outcome, n) in [("acked", 4), ("dropped", 1), ("retried", 2)] {
        let line =
            format!("cfq_relay_messages_delivered_total{{outcome=\"{outcome}\",queue=\"q1\"}} {n}");
        assert!(metrics.contains(&line), "{line}\n{metrics}");
    }
}

#[tokio::test]
async fn envelope_mode_wraps_the_body_with_metadata() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hook = Hook::start(|_, _| Answer::ok()).await;
    let json_id = emu
        .publish(
            "q1",
            Some(ContentType::Json),
            br#"{"k":[1,2]}"#,
            Duration::ZERO,
        )
        .unwrap();
    let bytes_id = emu
        .publish("q1", Some(ContentType::Bytes), &[0, 255, 7], Duration::ZERO)
        .unwrap();
    let text_id = publish_text(&emu, "q1", "hi");
    let cfg = config(
        &api,
        &[("q1", &hook.url(), "name = \"orders\"", "envelope = true")],
    );
    start(cfg).await.until_acked(&emu, "q1", 3).await;
    for r in hook.received() {
        assert_eq!(r.header("content-type"), Some("application/json"));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let id = v["id"].as_str().unwrap();
        assert_eq!(v["queue"], "orders");
        assert_eq!(v["attempts"], 1);
        assert!(v["timestamp_ms"].as_u64().unwrap() > 1_700_000_000_000);
        if id == json_id {
            assert_eq!(v["content_type"], "json");
            assert_eq!(v["body"], serde_json::json!({"k": [1, 2]}));
        } else if id == bytes_id {
            assert_eq!(v["content_type"], "bytes");
            assert_eq!(v["body"], "AP8H");
        } else {
            assert_eq!(id, text_id);
            assert_eq!(v["content_type"], "text");
            assert_eq!(v["body"], "hi");
        }
    }
}

#[tokio::test]
async fn breaker_opens_under_a_failing_receiver_and_closes_on_recovery() {
    let (emu, api) = emulator(EmulatorOptions {
        max_retries: 100,
        ..EmulatorOptions::default()
    })
    .await;
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = healthy.clone();
    let hook = Hook::start(move |_, _| {
        if h.load(std::sync::atomic::Ordering::SeqCst) {
            Answer::ok()
        } else {
            Answer::status(503)
        }
    })
    .await;
    for i in 0..50 {
        publish_text(&emu, "q1", &format!("m{i}"));
    }
    let mut cfg = config(
        &api,
        &[("q1", &hook.url(), "concurrency = 4\nbatch_size = 4", "")],
    );
    cfg.consumers[0].retry.base_delay = Duration::ZERO;
    cfg.consumers[0].breaker = cfq_relay::config::BreakerConfig {
        enabled: true,
        consecutive_failures: 4,
        open_for: Duration::from_secs(1),
        ..Default::default()
    };
    let stop_relay = CancellationToken::new();
    let relay = cfq_relay::start(cfg, stop_relay.clone()).await.unwrap();
    let scrape = |r: &cfq_relay::Running| r.metrics().render();
    wait_until(Duration::from_secs(10), "breaker open", || {
        scrape(&relay).contains("cfq_relay_breaker_state{queue=\"q1\"} 1")
    })
    .await;
    // While open, the backlog waits in the queue: attempts are not burned.
    let during = emu.stats("q1");
    let requests_when_open = hook.count();
    assert!(
        requests_when_open <= 8,
        "a handful of failures opened it: {requests_when_open}"
    );
    assert_eq!(during.acked, 0);
    assert_eq!(during.backlog, 50, "backlog preserved");
    // Probes fail while the receiver is down: at most one request per open period.
    wait_until(Duration::from_secs(10), "a failed probe", || {
        hook.count() > requests_when_open
    })
    .await;
    let books = emu.books("q1");
    let max_deliveries = books.iter().map(|b| b.deliveries).max().unwrap();
    assert!(max_deliveries <= 3, "attempts not burned: {max_deliveries}");
    // Recovery: the next probe succeeds, the breaker closes, everything is delivered.
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_until(Duration::from_secs(20), "all acked", || {
        emu.stats("q1").acked == 50
    })
    .await;
    assert!(scrape(&relay).contains("cfq_relay_breaker_state{queue=\"q1\"} 0"));
    stop_relay.cancel();
    relay.wait().await.unwrap();
    let s = emu.stats("q1");
    assert_eq!((s.acked, s.dead_lettered, s.lease_expired), (50, 0, 0));
}

/// One failed request is one failure for the breaker: a 503 without `Retry-After` (which the
/// worker weighs for a resend before the policy decides) must not count twice.
#[tokio::test]
async fn one_503_counts_once_against_the_breaker() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hook = Hook::start(|_, _| Answer::status(503)).await;
    publish_text(&emu, "q1", "m0");
    let mut cfg = config(
        &api,
        &[("q1", &hook.url(), "concurrency = 1\nbatch_size = 1", "")],
    );
    cfg.consumers[0].retry.base_delay = Duration::from_secs(60);
    cfg.consumers[0].breaker = cfq_relay::config::BreakerConfig {
        enabled: true,
        consecutive_failures: 2,
        open_for: Duration::from_secs(30),
        ..Default::default()
    };
    let stop_relay = CancellationToken::new();
    let relay = cfq_relay::start(cfg, stop_relay.clone()).await.unwrap();
    wait_until(
        Duration::from_secs(10),
        "the 503 answered with a retry",
        || emu.stats("q1").retried == 1,
    )
    .await;
    let text = relay.metrics().render();
    stop_relay.cancel();
    relay.wait().await.unwrap();
    assert_eq!(hook.count(), 1);
    assert!(
        text.contains("cfq_relay_breaker_state{queue=\"q1\"} 0"),
        "one failure of the two configured opened the breaker:\n{text}"
    );
}

#[tokio::test]
async fn rate_limit_holds_within_ten_percent() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hook = Hook::start(|_, _| Answer::ok()).await;
    let n = 61;
    for i in 0..n {
        publish_text(&emu, "q1", &format!("m{i}"));
    }
    let cfg = one_consumer(&api, &hook.url(), "max_requests_per_second = 20");
    start(cfg).await.until_acked(&emu, "q1", n).await;
    let got = hook.received();
    assert_eq!(got.len() as u64, n);
    let span = got.last().unwrap().at - got.first().unwrap().at;
    let rate = (n - 1) as f64 / span.as_secs_f64();
    assert!(
        (18.0..=22.0).contains(&rate),
        "rate {rate:.2}/s over {span:?}"
    );
    // Never a burst: no second holds more than the limit and ten percent. The limiter spaces
    // sends exactly (unit-tested in `gate.rs`); what arrives here also carries the scheduling
    // jitter of a loaded machine, which can bunch two sends. Without the limit all 61 arrive
    // within a second.
    for (i, r) in got.iter().enumerate() {
        let in_window = got[i..]
            .iter()
            .take_while(|o| o.at - r.at < Duration::from_secs(1))
            .count();
        assert!(in_window <= 22, "burst of {in_window} within a second");
    }
}

#[tokio::test]
async fn retry_after_pauses_the_whole_consumer() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hook = Hook::failing_first(1, Answer::status(503).with_header("retry-after", "2")).await;
    let a = publish_text(&emu, "q1", "a");
    let b = publish_text(&emu, "q1", "b");
    // One at a time, so the second message is pulled only after the first answer.
    let cfg = config(
        &api,
        &[("q1", &hook.url(), "concurrency = 1\nbatch_size = 1", "")],
    );
    start(cfg).await.until_acked(&emu, "q1", 2).await;
    let first_a = hook.for_id(&a)[0].at;
    let second_a = hook.for_id(&a)[1].at;
    let first_b = hook.for_id(&b)[0].at;
    let gap_b = first_b - first_a;
    let gap_a = second_a - first_a;
    // Without the pause, b would follow a within milliseconds.
    assert!(gap_b >= Duration::from_secs(2), "b came {gap_b:?} after a");
    // Retry-After honoured to within a second.
    assert!(
        gap_a >= Duration::from_secs(2) && gap_a < Duration::from_secs(3),
        "a retried after {gap_a:?}"
    );
}

/// The webhook sink (`cfq-emulator`, which never imports the relay) reads the relay's headers
/// by names of its own: they must stay the relay's.
#[test]
fn the_sinks_header_names_are_the_relays() {
    use cfq_emulator::sink;
    use cfq_relay::{delivery, signing};
    assert_eq!(sink::HEADER_MESSAGE_ID, delivery::HEADER_MESSAGE_ID);
    assert_eq!(sink::HEADER_ATTEMPT, delivery::HEADER_ATTEMPT);
    assert_eq!(sink::HEADER_BATCH_SIZE, delivery::HEADER_BATCH_SIZE);
    assert_eq!(sink::HEADER_BATCH_ID, delivery::HEADER_BATCH_ID);
    assert_eq!(sink::HEADER_WEBHOOK_ID, signing::HEADER_ID);
    assert_eq!(sink::HEADER_WEBHOOK_TIMESTAMP, signing::HEADER_TIMESTAMP);
    assert_eq!(sink::HEADER_WEBHOOK_SIGNATURE, signing::HEADER_SIGNATURE);
}
