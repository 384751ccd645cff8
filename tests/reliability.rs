//! Reliability (issue 4), in process: the real relay (`cfq_relay::start`) against the bundled
//! emulator, a scripted webhook, a webhook that misbehaves at the TCP level, and a small proxy
//! in front of the emulator that can hold pulls or take the ack API down. Every test asserts
//! the end state from the emulator's books and prints it as a `RESULT` line
//! (`cargo test --test reliability -- --nocapture`).
//!
//! The signal, `kill -9`, replica and secret scenarios run the real binary: `reliability_bin.rs`.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use cfq_emulator::{Emulator, EmulatorOptions, Fault, FaultOp};
use cfq_relay::Config;
use cfq_relay::cloudflare::ApiError;
use cfq_relay::retry::retry_wait;
use support::{
    Answer, Cfg, ConsumerCfg, EndState, Hook, InProcess, RawRequest, Tally, TestEmulator,
    api_requests, assert_books, assert_handed_back, config, emulator, http_status, metric, ok_hook,
    publish, publish_and_ack, released, start, wait_until,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One consumer of `q1` delivering to `hook`, adjusted by `tweak` and validated again.
fn relay_config(api: &str, hook: &str, tweak: impl FnOnce(&mut Config)) -> Config {
    let mut c = config(api, &[("q1", hook, "", "")]);
    tweak(&mut c);
    c.validate().unwrap_or_else(|e| panic!("test config: {e}"));
    c
}

// ---------------------------------------------------------------------------------------------
// Graceful stop

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_finishes_in_flight_deliveries_and_stops_pulling_at_once() {
    let stop = CancellationToken::new();
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let (hook, tally) = ok_hook(Duration::from_millis(1000)).await;
    let ids = publish(&emu, "q1", "m", 30);
    let cfg = relay_config(&api, &hook.url(), |c| {
        c.consumers[0].concurrency = 10;
        c.consumers[0].batch_size = 10;
    });
    let relay_stop = CancellationToken::new();
    let relay = cfq_relay::start(cfg, relay_stop.clone()).await.unwrap();
    let readyz = format!("http://{}/readyz", relay.admin_addr());
    wait_until(Duration::from_secs(10), "10 deliveries in flight", || {
        hook.count() >= 10
    })
    .await;
    assert_eq!(http_status(&readyz).await, 200);
    let pulls_before = emu.stats("q1").pull_calls;

    let t0 = Instant::now();
    relay_stop.cancel();
    // Readiness drops the moment shutdown starts, while deliveries are still in flight.
    loop {
        if http_status(&readyz).await == 503 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "/readyz still 200"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        emu.stats("q1").acked < 10,
        "deliveries were still in flight"
    );
    relay.wait().await.unwrap();
    let took = t0.elapsed();

    let s = emu.stats("q1");
    assert_eq!(s.pull_calls, pulls_before, "no pull after the stop: {s:?}");
    assert_eq!(s.in_flight, 0, "every lease settled: {s:?}");
    assert_eq!(hook.count(), 10);
    let books = emu.books("q1");
    for b in &books[..10] {
        assert_eq!((b.deliveries, b.acks, b.retries.len()), (1, 1, 0), "{b:?}");
    }
    for b in &books[10..] {
        assert_eq!(b.deliveries, 0, "never pulled, still queued: {b:?}");
    }
    assert_eq!(books.len(), ids.len());
    assert!(
        took < Duration::from_secs(4),
        "in-flight work took {took:?}"
    );
    let end = EndState::report_stop(
        &emu,
        "q1",
        "graceful stop, deliveries in flight",
        tally.total(),
        took,
    );
    assert_eq!(
        (end.acked, end.remaining, end.duplicates, end.lease_expired),
        (10, 20, 0, 0)
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_over_abandons_deliveries_and_hands_their_messages_back() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hang = Hook::start(|_, _| Answer::ok().delayed(Duration::from_secs(60))).await;
    publish(&emu, "q1", "m", 5);
    let cfg = relay_config(&api, &hang.url(), |c| {
        c.shutdown.grace_period = Duration::from_secs(1);
        c.consumers[0].webhook.timeout = Duration::from_secs(20);
    });
    let relay = start(cfg).await;
    let metrics = relay.metrics().clone();
    wait_until(Duration::from_secs(10), "5 deliveries hanging", || {
        hang.count() == 5
    })
    .await;
    let took = relay.stop_timed().await;
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "grace 1s, shutdown took {took:?}"
    );
    let text = metrics.render();
    let released = metric(
        &text,
        "cfq_relay_messages_released_total",
        &[("queue", "q1"), ("reason", "shutdown")],
    );
    assert_eq!(released, 5.0, "{text}");
    // Handed back with a zero-delay retry: ready again now, not after a lease expiry.
    let scenario = "grace over: abandoned and handed back";
    assert_handed_back(&emu, "q1", 5, scenario, took);

    // Another relay (a replica, or this one restarted) gets them at once.
    let (hook, tally) = ok_hook(Duration::ZERO).await;
    start(relay_config(&api, &hook.url(), |_| {}))
        .await
        .until_acked(&emu, "q1", 5)
        .await;
    assert!(hook.headers("cfq-attempt").iter().all(|a| a == "2"));
    let end = EndState::report(&emu, "q1", "grace over, then redelivered", tally.total());
    assert_eq!((end.acked, end.duplicates, end.lease_expired), (5, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_in_flight_at_shutdown_hands_its_messages_back() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let proxy = Proxy::start(&api, Duration::from_secs(1)).await;
    proxy.hold_pulls.store(1, Ordering::SeqCst);
    let (hook, _) = ok_hook(Duration::ZERO).await;
    publish(&emu, "q1", "m", 8);
    let relay = start(relay_config(&proxy.base, &hook.url(), |_| {})).await;
    let metrics = relay.metrics().clone();
    wait_until(
        Duration::from_secs(5),
        "the first pull is in flight",
        || proxy.pulls_started.load(Ordering::SeqCst) >= 1,
    )
    .await;
    let took = relay.stop_timed().await;
    // The pull answered 1 s after it started; its 8 messages were leased meanwhile.
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(hook.count(), 0, "nothing delivered after the stop");
    let text = metrics.render();
    assert_eq!(released(&text, "shutdown"), 8.0, "{text}");
    assert_handed_back(&emu, "q1", 8, "pull in flight at shutdown", took);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_pull_is_abandoned_when_the_grace_is_over() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    emu.inject_fault(FaultOp::Pull, Fault::Hang);
    let proxy = Proxy::start(&api, Duration::ZERO).await;
    let (hook, _) = ok_hook(Duration::ZERO).await;
    let relay = start(relay_config(&proxy.base, &hook.url(), |c| {
        c.cloudflare.api_timeout = Duration::from_secs(30);
        c.shutdown.grace_period = Duration::from_secs(1);
    }))
    .await;
    wait_until(
        Duration::from_secs(5),
        "the first pull is in flight",
        || proxy.pulls_started.load(Ordering::SeqCst) >= 1,
    )
    .await;
    let took = relay.stop_timed().await;
    // The grace (1 s) bounds the stop, not the API timeout (30 s).
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "took {took:?}"
    );
    println!(
        "RESULT hung pull at shutdown: shutdown={:.2}s (api_timeout 30s, grace 1s)",
        took.as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// Lease awareness

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_too_short_to_finish_is_released_not_delivered() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    // The first pull answers 2 s late: of its 3 s leases, less than webhook timeout (1 s) +
    // ack margin (300 ms) is left.
    let proxy = Proxy::start(&api, Duration::from_secs(2)).await;
    proxy.hold_pulls.store(1, Ordering::SeqCst);
    let (hook, tally) = ok_hook(Duration::ZERO).await;
    publish(&emu, "q1", "m", 6);
    let cfg = relay_config(&proxy.base, &hook.url(), |c| {
        c.shutdown.grace_period = Duration::from_secs(2);
        c.consumers[0].visibility_timeout = Duration::from_secs(3);
        c.consumers[0].webhook.timeout = Duration::from_secs(1);
    });
    let relay = start(cfg).await;
    let metrics = relay.metrics().clone();
    wait_until(Duration::from_secs(10), "all acked", || {
        emu.stats("q1").acked == 6
    })
    .await;
    relay.stop().await;
    let text = metrics.render();
    assert_eq!(released(&text, "lease"), 6.0, "{text}");
    assert_books(&emu, "q1", (2, 1, vec![0]), |b| {
        (b.deliveries, b.acks, b.retries.clone())
    });
    // Each was POSTed once, on its second lease.
    assert_eq!(hook.count(), 6);
    assert!(hook.headers("cfq-attempt").iter().all(|a| a == "2"));
    let end = EndState::report(&emu, "q1", "lease too short: released", tally.total());
    assert_eq!((end.acked, end.duplicates, end.lease_expired), (6, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_webhook_with_short_leases_lets_no_lease_expire() {
    let (emu, api) = emulator(EmulatorOptions {
        latency: Duration::from_millis(20),
        ..EmulatorOptions::default()
    })
    .await;
    let (hook, tally) = ok_hook(Duration::from_millis(1000)).await;
    publish(&emu, "q1", "m", 24);
    let cfg = relay_config(&api, &hook.url(), |c| {
        c.shutdown.grace_period = Duration::from_secs(1);
        // A delivery starts only with timeout + ack margin (1.8 s) left: 1.2 s for the pull.
        c.consumers[0].visibility_timeout = Duration::from_secs(3);
        c.consumers[0].webhook.timeout = Duration::from_millis(1500);
        c.consumers[0].concurrency = 8;
    });
    let relay = start(cfg).await;
    let metrics = relay.metrics().clone();
    let mut max_leased = 0;
    wait_until(Duration::from_secs(20), "all acked", || {
        let s = emu.stats("q1");
        max_leased = max_leased.max(s.in_flight);
        s.acked == 24
    })
    .await;
    relay.stop().await;
    let in_flight = hook.max_in_flight();
    assert!(in_flight <= 8, "{in_flight}");
    // Leases held = deliveries in flight + acks on their way (flushed within 100 ms).
    assert!(
        max_leased <= 16,
        "the relay pulled more than it could deliver: {max_leased}"
    );
    let released = metric(&metrics.render(), "cfq_relay_messages_released_total", &[]);
    assert_eq!(released, 0.0);
    assert_books(&emu, "q1", (1, 1), |b| (b.deliveries, b.acks));
    let end = EndState::report(&emu, "q1", "slow webhook (1s), 3s leases", tally.total());
    assert_eq!((end.acked, end.duplicates, end.lease_expired), (24, 0, 0));
    println!(
        "RESULT slow webhook: max leases held {max_leased}, max webhook requests in flight {in_flight}"
    );
}

// ---------------------------------------------------------------------------------------------
// Cloudflare API faults

fn status_fault(status: u16, body: &str, retry_after: Option<&str>) -> Fault {
    Fault::Status {
        status,
        body: body.into(),
        retry_after: retry_after.map(Into::into),
    }
}

const HTML: &str =
    "<html><head><title>502 Bad Gateway</title></head><body>cloudflare</body></html>";

/// `(name, fault, result label it must be counted under)`
/// The [`api_faults`] counted as one of `classes`.
fn api_faults_of(classes: &[&str]) -> Vec<(&'static str, Fault, &'static str)> {
    api_faults()
        .into_iter()
        .filter(|(_, _, class)| classes.contains(class))
        .collect()
}

fn api_faults() -> Vec<(&'static str, Fault, &'static str)> {
    vec![
        ("500 HTML page", status_fault(500, HTML, None), "5xx"),
        (
            "502 error envelope",
            status_fault(
                502,
                r#"{"success":false,"errors":[{"code":10013,"message":"upstream"}]}"#,
                None,
            ),
            "5xx",
        ),
        ("429 Retry-After 2", status_fault(429, "", Some("2")), "429"),
        ("connection reset", Fault::Reset, "transport_error"),
        ("hang past api_timeout", Fault::Hang, "transport_error"),
        ("200 HTML page", status_fault(200, HTML, None), "malformed"),
        (
            "200 success:false",
            status_fault(
                200,
                r#"{"success":false,"errors":[{"code":7003,"message":"No route"}],"result":null}"#,
                None,
            ),
            "malformed",
        ),
        (
            "404 no route",
            status_fault(
                404,
                r#"{"success":false,"errors":[{"code":7003,"message":"No route for that URI"}]}"#,
                None,
            ),
            "4xx",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_api_error_statuses_are_counted_backed_off_and_lose_nothing() {
    let faults = api_faults_of(&["5xx", "4xx", "429"]);
    pull_faults("pull API error statuses", faults, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_api_transport_faults_and_malformed_answers_lose_nothing() {
    let mut faults = api_faults_of(&["transport_error", "malformed"]);
    faults.push((
        "200 with messages missing fields",
        status_fault(
            200,
            r#"{"success":true,"result":{"messages":[{"id":"abc","body":"x"},{"body":5,"lease_id":7},"junk"]}}"#,
            None,
        ),
        "ok",
    ));
    faults.push((
        "200 without result",
        status_fault(200, r#"{"success":true}"#, None),
        "ok",
    ));
    pull_faults("pull API transport faults, malformed answers", faults, 2.0).await;
}

/// A pulled message whose `body` is not a string (a number, an object, `null`) or is missing
/// cannot be read. It must never reach the webhook as an empty body and be acked on its 2xx:
/// that would destroy it. (An empty message has `"body": ""`, which is delivered.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_a_string_is_never_delivered_empty_nor_acked() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let (hook, _tally) = ok_hook(Duration::ZERO).await;
    emu.inject_fault(
        FaultOp::Pull,
        status_fault(
            200,
            r#"{"success":true,"result":{"messages":[
              {"id":"m-num","body":12345,"lease_id":"L-num","attempts":1,"metadata":{"CF-Content-Type":"text"}},
              {"id":"m-obj","body":{"order":42},"lease_id":"L-obj","attempts":1,"metadata":{"CF-Content-Type":"bytes"}},
              {"id":"m-null","body":null,"lease_id":"L-null","attempts":1,"metadata":{"CF-Content-Type":"text"}},
              {"id":"m-none","lease_id":"L-none","attempts":1,"metadata":{"CF-Content-Type":"json"}},
              {"id":"m-empty","body":"","lease_id":"L-empty","attempts":1,"metadata":{"CF-Content-Type":"text"}}]}}"#,
            None,
        ),
    );
    let relay = start(relay_config(&api, &hook.url(), |_| {})).await;
    wait_until(Duration::from_secs(10), "the five leases answered", || {
        emu.stats("q1").unknown_leases >= 5
    })
    .await;
    let text = relay.metrics().render();
    relay.stop().await;
    let sent: Vec<(String, usize)> = hook
        .received()
        .iter()
        .map(|r| {
            (
                r.header("cfq-message-id").unwrap_or("?").to_owned(),
                r.body.len(),
            )
        })
        .collect();
    assert_eq!(
        sent,
        [("m-empty".to_owned(), 0)],
        "delivered (id, body length)"
    );
    assert_eq!(support::delivered(&text, "acked"), 1.0, "{text}");
    assert_eq!(support::delivered(&text, "undecodable"), 4.0, "{text}");
}

/// Inject each pull fault in turn; after each, 3 new messages must go through. `invalid`:
/// how many pulled messages without a usable lease id the faults hold.
async fn pull_faults(scenario: &str, faults: Vec<(&str, Fault, &str)>, invalid: f64) {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let (hook, tally) = ok_hook(Duration::ZERO).await;
    let cfg = relay_config(&api, &hook.url(), |c| {
        c.cloudflare.api_timeout = Duration::from_secs(1);
    });
    let relay = start(cfg).await;
    let metrics = relay.metrics().clone();
    let pulls = |result: &str| api_requests(&metrics.render(), "pull", result);
    let mut published = 0;
    for (step, (name, fault, class)) in faults.into_iter().enumerate() {
        let before = pulls(class);
        let ok_calls = emu.stats("q1").pull_calls;
        emu.inject_fault(FaultOp::Pull, fault);
        wait_until(
            Duration::from_secs(10),
            &format!("{name} counted as {class}"),
            || pulls(class) > before,
        )
        .await;
        let seen = Instant::now();
        let prefix = format!("step{step}");
        publish_and_ack(
            &emu,
            "q1",
            &prefix,
            3,
            &mut published,
            Duration::from_secs(10),
        )
        .await;
        if name.starts_with("429") {
            // The next pull honoured Retry-After: nothing reached the emulator for 2 s.
            let next = emu.stats("q1").pull_calls;
            assert!(next > ok_calls);
            assert!(
                seen.elapsed() >= Duration::from_millis(1900),
                "{:?}",
                seen.elapsed()
            );
        }
        println!(
            "RESULT pull fault {name}: counted as result=\"{class}\", 3 messages after it acked"
        );
    }
    let text = metrics.render();
    relay.stop().await;
    assert_eq!(
        metric(&text, "cfq_relay_messages_invalid_total", &[]),
        invalid,
        "{text}"
    );
    let end = EndState::report(&emu, "q1", scenario, tally.total());
    assert_eq!(
        (
            end.acked,
            end.acked_twice,
            end.duplicates,
            end.lease_expired,
            end.remaining
        ),
        (published as usize, 0, 0, 0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_api_error_statuses_lose_nothing_and_never_ack_a_failed_delivery() {
    let mut faults = api_faults_of(&["5xx", "4xx"]);
    faults.push(("429 Retry-After 1", status_fault(429, "", Some("1")), "429"));
    ack_faults("ack API error statuses", faults).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_api_transport_faults_and_malformed_answers_lose_nothing() {
    let mut faults = api_faults_of(&["transport_error", "malformed"]);
    // Maybe applied by the emulator after the relay gave up waiting: the answer is lost, the
    // relay sends again (and may hear about unknown leases).
    faults.push((
        "answer lost (delay past api_timeout)",
        Fault::Delay(Duration::from_millis(1200)),
        "transport_error",
    ));
    ack_faults("ack API transport faults, malformed answers", faults).await;
}

/// Inject each ack fault in turn, with 6 new messages behind it (every third failing its
/// first delivery, so retries ride in the failing calls); all must end acked exactly once,
/// each after a 2xx.
async fn ack_faults(scenario: &str, faults: Vec<(&str, Fault, &str)>) {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    // Every third message fails its first delivery, so retries ride in the failing ack calls.
    let tally = Tally::default();
    let t = tally.clone();
    let hook = Hook::start(move |r, _| {
        let body = String::from_utf8_lossy(&r.body).to_string();
        let n: usize = body
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if n.is_multiple_of(3) && r.header("cfq-attempt") == Some("1") {
            Answer::status(500)
        } else {
            t.record(r.header("cfq-message-id").unwrap_or("?"));
            Answer::ok()
        }
    })
    .await;
    let cfg = relay_config(&api, &hook.url(), |c| {
        c.cloudflare.api_timeout = Duration::from_secs(1);
        c.consumers[0].retry.base_delay = Duration::ZERO;
    });
    let relay = start(cfg).await;
    let metrics = relay.metrics().clone();
    let acks = |result: &str| api_requests(&metrics.render(), "ack", result);
    let mut published = 0;
    for (step, (name, fault, class)) in faults.into_iter().enumerate() {
        let before = acks(class);
        emu.inject_fault(FaultOp::Ack, fault);
        let prefix = format!("step{step}");
        publish_and_ack(
            &emu,
            "q1",
            &prefix,
            6,
            &mut published,
            Duration::from_secs(15),
        )
        .await;
        assert!(acks(class) > before, "{name} counted as {class}");
        println!(
            "RESULT ack fault {name}: counted as result=\"{class}\", its 6 messages acked once"
        );
    }
    let text = metrics.render();
    relay.stop().await;
    // Whether a late ack was applied depends on the server noticing the client left.
    let warnings = metric(&text, "cfq_relay_ack_warnings_total", &[]);
    println!("RESULT {scenario}: {warnings} unknown-lease warnings on resends");
    assert_eq!(
        metric(&text, "cfq_relay_leases_expired_total", &[]),
        0.0,
        "{text}"
    );
    for b in emu.books("q1") {
        assert_eq!(b.acks, 1, "{b:?}");
        assert!(tally.get(&b.id) >= 1, "acked without a 2xx: {b:?}");
    }
    let end = EndState::report(&emu, "q1", scenario, tally.total());
    assert_eq!(
        (
            end.acked,
            end.duplicates,
            end.lease_expired,
            end.dead_lettered
        ),
        (published as usize, 0, 0, 0)
    );
}

/// `n` messages, the ack API down behind the proxy, and the relay on the proxy with leases of
/// `visibility_s`, a webhook timeout of `timeout_s` and a 2 s grace.
async fn ack_api_down(
    n: usize,
    visibility_s: u64,
    timeout_s: u64,
) -> (TestEmulator, Proxy, Hook, Tally, InProcess) {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let proxy = Proxy::start(&api, Duration::ZERO).await;
    let (hook, tally) = ok_hook(Duration::ZERO).await;
    publish(&emu, "q1", "m", n);
    proxy.ack_down.store(true, Ordering::SeqCst);
    let cfg = relay_config(&proxy.base, &hook.url(), |c| {
        c.shutdown.grace_period = Duration::from_secs(2);
        c.consumers[0].visibility_timeout = Duration::from_secs(visibility_s);
        c.consumers[0].webhook.timeout = Duration::from_secs(timeout_s);
    });
    let relay = start(cfg).await;
    (emu, proxy, hook, tally, relay)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_outage_shorter_than_the_lease_still_acks_in_time() {
    let (emu, proxy, hook, tally, relay) = ack_api_down(5, 6, 2).await;
    wait_until(Duration::from_secs(5), "delivered", || hook.count() == 5).await;
    let down_since = Instant::now();
    // The ack API is down for 4 s of the 6 s leases. Backoff alone (0.5-1, 1-2, 2-4 s, ...)
    // can sleep past the end of the lease; the acker makes a last attempt before it.
    wait_until(Duration::from_secs(10), "ack outage of 4s", || {
        down_since.elapsed() >= Duration::from_secs(4)
    })
    .await;
    proxy.ack_down.store(false, Ordering::SeqCst);
    wait_until(Duration::from_secs(10), "acked", || {
        emu.stats("q1").acked == 5
    })
    .await;
    relay.stop().await;
    assert!(proxy.acks_refused.load(Ordering::SeqCst) >= 2);
    let end = EndState::report(&emu, "q1", "ack API down 4s of a 6s lease", tally.total());
    assert_eq!(
        (end.acked, end.duplicates, end.lease_expired, end.deliveries),
        (5, 0, 0, 5)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_outage_past_the_lease_gives_up_counts_and_redelivers() {
    let (emu, proxy, _hook, tally, relay) = ack_api_down(6, 3, 1).await;
    let metrics = relay.metrics().clone();
    let given_up = || metric(&metrics.render(), "cfq_relay_leases_expired_total", &[]);
    wait_until(
        Duration::from_secs(10),
        "the relay gave the acks up",
        || given_up() == 6.0,
    )
    .await;
    proxy.ack_down.store(false, Ordering::SeqCst);
    wait_until(Duration::from_secs(15), "all acked", || {
        emu.stats("q1").acked == 6
    })
    .await;
    relay.stop().await;
    let s = emu.stats("q1");
    assert_eq!(s.lease_expired, 6, "{s:?}");
    assert_books(&emu, "q1", (2, 1), |b| (b.deliveries, b.acks));
    let end = EndState::report(&emu, "q1", "ack API down past the lease", tally.total());
    // Every duplicate is one lease expiry: the ack that could not be sent.
    assert_eq!((end.acked, end.duplicates, end.lease_expired), (6, 6, 6));
    assert_eq!(given_up(), 6.0);
}

/// On tokio's paused clock (it jumps ahead whenever every task waits), so the whole 30 s floor
/// is watched in an instant: no second pull before it, and one after it (not a dead consumer).
#[tokio::test(start_paused = true)]
async fn auth_failure_is_retried_slowly_not_in_a_loop() {
    let stop = CancellationToken::new();
    let emu = Emulator::new(EmulatorOptions {
        token: Some("a-different-token".into()),
        ..EmulatorOptions::default()
    });
    let addr = emu
        .start("127.0.0.1:0".parse().unwrap(), stop.clone())
        .await
        .unwrap();
    let (hook, _) = ok_hook(Duration::ZERO).await;
    publish(&emu, "q1", "m", 3);
    let relay = start(relay_config(&Emulator::base_url(addr), &hook.url(), |_| {})).await;
    let metrics = relay.metrics().clone();
    let rejected = || api_requests(&metrics.render(), "pull", "4xx");
    wait_until(Duration::from_secs(5), "first pull rejected", || {
        rejected() == 1.0
    })
    .await;
    // `wait_until` looks every 10 ms: the rejection came at most that long before `first`.
    let first = Instant::now();
    let floor = Duration::from_secs(30) - Duration::from_millis(20);
    tokio::time::sleep_until(first + floor).await;
    assert_eq!(rejected(), 1.0, "retried sooner than 30 s");
    let readyz = format!("http://{}/readyz", relay.admin_addr());
    assert_eq!(http_status(&readyz).await, 503);
    wait_until(
        Duration::from_secs(60),
        "the second pull, after the floor",
        || rejected() == 2.0,
    )
    .await;
    let gap = first.elapsed();
    assert!(
        gap >= floor && gap <= Duration::from_secs(31),
        "second pull {gap:?} after the first"
    );
    let t0 = Instant::now();
    relay.stop().await;
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(emu.stats("q1").deliveries, 0);
    println!(
        "RESULT auth failure (403): the second pull {:.1}s after the first, not ready, stopped in {:.2}s, 3 messages untouched",
        gap.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    stop.cancel();
}

#[test]
fn api_retry_waits_honour_retry_after_floor_auth_and_cap() {
    let mut backoff = cfq_relay::retry::api_backoff();
    let rate = ApiError::RateLimited {
        retry_after: Some(Duration::from_secs(7)),
    };
    assert!(retry_wait(&rate, &mut backoff) >= Duration::from_secs(7));
    let auth = ApiError::Auth {
        status: 401,
        errors: Vec::new(),
    };
    for _ in 0..5 {
        assert!(retry_wait(&auth, &mut backoff) >= Duration::from_secs(30));
    }
    let mut backoff = cfq_relay::retry::api_backoff();
    let waits: Vec<Duration> = (0..60)
        .map(|_| retry_wait(&ApiError::Timeout, &mut backoff))
        .collect();
    assert!(waits[0] >= Duration::from_millis(500) && waits[0] <= Duration::from_secs(1));
    assert!(
        waits.iter().all(|w| *w <= Duration::from_secs(60)),
        "{waits:?}"
    );
    let distinct: HashSet<u128> = waits[20..].iter().map(Duration::as_millis).collect();
    assert!(distinct.len() > 5, "jittered at the cap: {waits:?}");
}

/// One in five pull and ack calls answers 500 (the emulator's `error_ratio`): each failed call
/// rests on its own and is retried long before the leases end, so every message reaches the
/// webhook once and is acked once, and none comes back by lease expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_of_failing_ack_calls_costs_only_those_calls() {
    const N: usize = 1500;
    let opts = EmulatorOptions {
        error_ratio: 0.2,
        ..Default::default()
    };
    let (emu, api) = emulator(opts).await;
    let (hook, tally) = ok_hook(Duration::ZERO).await;
    let ids = publish(&emu, "q1", "m", N);
    // Two ack calls fail for sure (the ratio alone may spare every one of the ~20 calls), fewer
    // than the failures in a row that back every call off.
    for _ in 0..2 {
        emu.inject_fault(
            FaultOp::Ack,
            Fault::Status {
                status: 500,
                body: "injected".into(),
                retry_after: None,
            },
        );
    }
    // Smaller calls: more of them, so more fail.
    let cfg = relay_config(&api, &hook.url(), |c| c.consumers[0].batch_size = 25);
    let relay_stop = CancellationToken::new();
    let started = Instant::now();
    let relay = cfq_relay::start(cfg, relay_stop.clone()).await.unwrap();
    let metrics = relay.metrics().clone();
    wait_until(Duration::from_secs(90), "every message acked", || {
        emu.stats("q1").acked as usize >= N
    })
    .await;
    let took = started.elapsed();
    let text = metrics.render();
    relay_stop.cancel();
    relay.wait().await.unwrap();
    let failed = |op| {
        metric(
            &text,
            "cfq_relay_api_requests_total",
            &[("op", op), ("result", "5xx")],
        )
    };
    let ok_acks = metric(
        &text,
        "cfq_relay_api_requests_total",
        &[("op", "ack"), ("result", "ok")],
    );
    println!(
        "RESULT 20 % of API calls answering 500: {N} messages in {took:.1?}, {} ack calls failed, {ok_acks} landed, {} pulls failed",
        failed("ack"),
        failed("pull")
    );
    assert!(failed("ack") >= 2.0, "ack calls failed: {text}");
    assert_eq!(
        metric(&text, "cfq_relay_leases_expired_total", &[]),
        0.0,
        "{text}"
    );
    let books = emu.books("q1");
    assert_eq!(books.len(), ids.len());
    for b in books {
        assert_eq!(
            (b.acks, b.deliveries),
            (1, 1),
            "acked once, never redelivered: {b:?}"
        );
        assert!(b.retries.is_empty(), "{b:?}");
    }
    assert_eq!(
        tally.total(),
        N as u64,
        "each message reached the webhook once"
    );
    let s = emu.stats("q1");
    assert_eq!((s.lease_expired, s.double_acks, s.dead_lettered), (0, 0, 0));
}

// ---------------------------------------------------------------------------------------------
// Webhook faults

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_faults_each_map_to_an_outcome_and_stall_nothing() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let elsewhere = Hook::start(|_, _| Answer::ok()).await;
    let raw = RawHook::start(elsewhere.addr()).await;
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    // (body, deliveries, webhook acks it)
    let kinds = [
        ("hang", 2),     // no answer before the timeout: retried
        ("reset", 2),    // RST in the middle of the status line: retried
        ("cut200", 1),   // 200, then RST mid-body: the receiver has it, acked
        ("cut500", 2),   // 500, then RST mid-body: retried
        ("redirect", 2), // 302 to another host: not followed, retried
        ("huge200", 1),  // 200 with a 1 GiB body: 64 KiB read, acked
        ("huge500", 2),  // 500 with a 1 GiB body: retried
        ("slow200", 1),  // 200, body one byte per 200 ms: acked at the timeout
        ("slow500", 2),  // 500, body one byte per 200 ms: retried
    ];
    let mut ids = Vec::new();
    for (kind, _) in kinds {
        ids.push(publish(&emu, "q1", kind, 1).remove(0));
    }
    let ok_ids = publish(&emu, "q1", "ok", 20);
    let refused_ids = publish(&emu, "q2", "ok", 3);
    let q1 = ConsumerCfg::minimal("q1", &format!("http://{}/hook", raw.addr))
        .concurrency(16)
        .idle("200ms")
        .timeout("3s")
        .retry_base("0s");
    let q2 = ConsumerCfg::minimal("q2", &format!("http://{refused}/hook"))
        .idle("200ms")
        .timeout("3s")
        .retry_base("0s")
        .table("[consumers.breaker]\nenabled = false");
    let cfg = Cfg::minimal(&api)
        .grace("2s")
        .consumer(q1)
        .consumer(q2)
        .config();
    let relay_stop = CancellationToken::new();
    let started = Instant::now();
    let relay = cfq_relay::start(cfg, relay_stop.clone()).await.unwrap();
    let metrics = relay.metrics().clone();
    let responses = |queue: &str, class: &str| {
        metric(
            &metrics.render(),
            "cfq_relay_webhook_responses_total",
            &[("queue", queue), ("status_class", class)],
        )
    };
    // The well-behaved messages go through while the hanging ones still hold their slots.
    wait_until(
        Duration::from_secs(10),
        "the 20 ok messages delivered",
        || ok_ids.iter().all(|id| raw.tally.get(id) >= 1),
    )
    .await;
    let ok_after = started.elapsed();
    assert_eq!(
        responses("q1", "timeout"),
        0.0,
        "ok messages waited for a timeout"
    );
    wait_until(Duration::from_secs(20), "everything settled", || {
        let s1 = emu.stats("q1");
        let s2 = emu.stats("q2");
        s1.acked == 29 && s2.dead_lettered == 3
    })
    .await;
    relay_stop.cancel();
    relay.wait().await.unwrap();

    let books = emu.books("q1");
    for ((kind, deliveries), id) in kinds.iter().zip(&ids) {
        let b = books.iter().find(|b| &b.id == id).unwrap();
        assert_eq!((b.deliveries, b.acks), (*deliveries, 1), "{kind}: {b:?}");
    }
    assert_eq!(elsewhere.count(), 0, "a redirect is never followed");
    // Both huge answers (the 200 and the 500) were written and recorded: a loop over no
    // entries would assert nothing.
    wait_until(
        Duration::from_secs(10),
        "both huge answers recorded",
        || raw.huge.lock().unwrap().len() >= 2,
    )
    .await;
    assert_eq!(
        raw.huge.lock().unwrap().len(),
        2,
        "huge answers recorded: {:?}",
        raw.huge.lock().unwrap()
    );
    for (written, client_closed) in raw.huge.lock().unwrap().iter() {
        assert!(*client_closed, "the relay closed the huge answer");
        assert!(
            *written < 64 << 20,
            "the relay read {written} bytes of a huge answer"
        );
    }
    assert_eq!(responses("q1", "timeout"), 1.0);
    assert_eq!(responses("q1", "3xx"), 1.0);
    assert_eq!(responses("q1", "error"), 1.0);
    assert_eq!(responses("q1", "5xx"), 3.0);
    // Connection refused: retried until the queue dead-letters it, never acked (q2 opts out
    // of the breaker, which would otherwise stop delivering after 10 failures in a row).
    assert_eq!(responses("q2", "error"), 12.0);
    for b in emu.books("q2") {
        assert!(refused_ids.contains(&b.id));
        assert_eq!(
            (b.deliveries, b.acks, b.dead_lettered),
            (4, 0, true),
            "{b:?}"
        );
    }
    let huge = raw.huge.lock().unwrap().clone();
    println!(
        "RESULT webhook faults: 20 ok messages delivered in {:.2}s while faults held slots; huge answers: {:?} bytes written before the relay closed",
        ok_after.as_secs_f64(),
        huge.iter().map(|(w, _)| *w).collect::<Vec<_>>()
    );
    let end = EndState::report(&emu, "q1", "webhook faults", raw.tally.total());
    assert_eq!((end.acked, end.duplicates, end.lease_expired), (29, 0, 0));
    EndState::of(&emu, "q2", "webhook connection refused", 0).print();
}

/// A webhook that misbehaves at the TCP level, by message body (`{kind}-{n}`), on the first
/// attempt only; later attempts get a 200. One request per connection.
struct RawHook {
    addr: SocketAddr,
    /// 200 answers that reached the relay, per message id.
    tally: Tally,
    /// Bytes written of each huge answer, and whether the relay closed the connection.
    huge: Arc<Mutex<Vec<(u64, bool)>>>,
}

impl RawHook {
    async fn start(redirect_to: SocketAddr) -> RawHook {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tally = Tally::default();
        let huge = Arc::new(Mutex::new(Vec::new()));
        let (t, h) = (tally.clone(), huge.clone());
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(raw_answer(s, redirect_to, t.clone(), h.clone()));
            }
        });
        RawHook { addr, tally, huge }
    }
}

async fn raw_answer(
    mut s: TcpStream,
    redirect_to: SocketAddr,
    tally: Tally,
    huge: Arc<Mutex<Vec<(u64, bool)>>>,
) {
    let Some(request) = RawRequest::read(&mut s).await else {
        return;
    };
    let body = String::from_utf8_lossy(&request.body).to_string();
    let header = |name: &str| request.header(name);
    let id = header("cfq-message-id").unwrap_or_default();
    let first = header("cfq-attempt").as_deref() == Some("1");
    let kind = if first {
        body.split('-').next().unwrap_or("ok").to_owned()
    } else {
        "ok".to_owned()
    };
    let head_of = |status: &str, len: u64| {
        format!("HTTP/1.1 {status}\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n")
    };
    let rst = |s: TcpStream| {
        let _ = s.set_zero_linger();
        drop(s);
    };
    // The status line of the 200 and 500 flavours of a fault (`cut200` / `cut500`, …); the
    // relay is told "delivered" by the 200 ones, so those are tallied.
    let status = if kind.ends_with("200") {
        tally.record(&id);
        "200 OK"
    } else {
        "500 Oops"
    };
    match kind.as_str() {
        "hang" => tokio::time::sleep(Duration::from_secs(60)).await,
        "reset" => {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-le").await;
            rst(s);
        }
        "cut200" | "cut500" => {
            let _ = s.write_all(head_of(status, 100_000).as_bytes()).await;
            let _ = s.write_all(&[b'x'; 100]).await;
            let _ = s.flush().await;
            // Let the head reach the relay before the reset.
            tokio::time::sleep(Duration::from_millis(50)).await;
            rst(s);
        }
        "redirect" => {
            let a = format!(
                "HTTP/1.1 302 Found\r\nlocation: http://{redirect_to}/hook\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
            let _ = s.write_all(a.as_bytes()).await;
        }
        "huge200" | "huge500" => {
            let total: u64 = 1 << 30;
            let _ = s.write_all(head_of(status, total).as_bytes()).await;
            let block = vec![b'y'; 64 * 1024];
            let mut written = 0u64;
            let mut closed = false;
            while written < total {
                match tokio::time::timeout(Duration::from_secs(10), s.write_all(&block)).await {
                    Ok(Ok(())) => written += block.len() as u64,
                    Ok(Err(_)) => {
                        closed = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            huge.lock().unwrap().push((written, closed));
        }
        "slow200" | "slow500" => {
            let _ = s.write_all(head_of(status, 1000).as_bytes()).await;
            for _ in 0..1000 {
                if s.write_all(b"z").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        _ => {
            tally.record(&id);
            let _ = s
                .write_all(format!("{}ok", head_of("200 OK", 2)).as_bytes())
                .await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A proxy in front of the emulator: holds pulls, takes the ack API down.

#[derive(Clone)]
struct Proxy {
    /// `api_base_url` for the relay.
    base: String,
    upstream: String,
    http: reqwest::Client,
    /// Answer every ack call with a 503 HTML page while set.
    ack_down: Arc<AtomicBool>,
    acks_refused: Arc<AtomicUsize>,
    pulls_started: Arc<AtomicUsize>,
    /// The next this-many pulls are answered `hold` late (the emulator handles them at once).
    hold_pulls: Arc<AtomicUsize>,
    hold: Duration,
}

impl Proxy {
    async fn start(emulator_base: &str, hold: Duration) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = Proxy {
            base: Emulator::base_url(addr),
            upstream: emulator_base.trim_end_matches("/client/v4").to_owned(),
            http: reqwest::Client::new(),
            ack_down: Arc::default(),
            acks_refused: Arc::default(),
            pulls_started: Arc::default(),
            hold_pulls: Arc::default(),
            hold,
        };
        let app = axum::Router::new()
            .fallback(proxy_handler)
            .with_state(proxy.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        proxy
    }
}

async fn proxy_handler(
    State(p): State<Proxy>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    if path.ends_with("/messages/ack") && p.ack_down.load(Ordering::SeqCst) {
        p.acks_refused.fetch_add(1, Ordering::SeqCst);
        return (StatusCode::SERVICE_UNAVAILABLE, HTML).into_response();
    }
    let mut hold = Duration::ZERO;
    if path.ends_with("/messages/pull") {
        p.pulls_started.fetch_add(1, Ordering::SeqCst);
        if p.hold_pulls
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            hold = p.hold;
        }
    }
    let mut req = p.http.post(format!("{}{path}", p.upstream)).body(body);
    for name in ["authorization", "content-type"] {
        if let Some(v) = headers.get(name) {
            req = req.header(name, v);
        }
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
    let bytes = resp.bytes().await.unwrap_or_default();
    tokio::time::sleep(hold).await;
    (status, [("content-type", "application/json")], bytes).into_response()
}
