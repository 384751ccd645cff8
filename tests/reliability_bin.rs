//! Reliability (issue 4) through the real binary: SIGTERM drains and exits 0, a second signal
//! exits at once, `kill -9` loses nothing, three replicas share a queue, nothing secret is
//! printed even at trace level, every bad configuration exits 2 naming its key. The emulator
//! and the webhook receiver run inside the test; the relay is `cfq-relay run` in a child process.
//! Each scenario prints a `RESULT` line (`cargo test --test reliability_bin -- --nocapture`).

mod support;

use std::time::Duration;

use cfq_emulator::{EmulatorOptions, Fault, FaultOp};
use support::{
    ACCOUNT, Answer, Cfg, ConsumerCfg, EndState, Hook, RelayProcess, TOKEN, Tally, api_requests,
    assert_books, assert_handed_back, bin, emulator, http_status, ok_hook, publish, temp_file,
    wait_until,
};
use tokio::time::Instant;

/// The scenarios' config: API calls time out after 2 s, info logs, a 10 s grace, and `q1`.
fn cfg(api: &str, q1: ConsumerCfg) -> Cfg {
    Cfg::new(api)
        .api_timeout("2s")
        .log_level("info")
        .grace("10s")
        .consumer(q1)
}

/// The scenarios' consumer of `q1`: 16 slots, failed deliveries retried at once.
fn q1(hook: &str) -> ConsumerCfg {
    ConsumerCfg::new("q1", hook)
        .concurrency(16)
        .retry("0s", "10s")
}

// ---------------------------------------------------------------------------------------------
// Graceful stop

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_pulling_finishes_in_flight_deliveries_and_exits_0() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let (hook, tally) = ok_hook(Duration::from_millis(1500)).await;
    publish(&emu, "q1", "m", 30);
    let cfg = cfg(&api, q1(&hook.url()).concurrency(10));
    let mut relay = RelayProcess::spawn("sigterm", &cfg.text());
    let admin = relay.wait_ready().await;
    wait_until(Duration::from_secs(10), "10 deliveries in flight", || {
        hook.count() >= 10
    })
    .await;
    let pulls_before = emu.stats("q1").pull_calls;

    let t0 = Instant::now();
    relay.signal("TERM");
    let readyz = format!("http://{admin}/readyz");
    loop {
        let status = http_status(&readyz).await;
        if status == 503 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "/readyz answered {status} after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let unready_after = t0.elapsed();
    let status = relay.exit(Duration::from_secs(10)).await;
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0), "{}", relay.output());
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(relay.logged("signal received") && relay.logged("shutdown complete"));
    // A clean drain logs no error (it once claimed the consumers "stopped without a request").
    assert!(!relay.logged("ERROR"), "{}", relay.output());

    let s = emu.stats("q1");
    assert_eq!(s.pull_calls, pulls_before, "pulled after SIGTERM: {s:?}");
    assert_eq!(s.in_flight, 0, "{s:?}");
    let books = emu.books("q1");
    for b in &books[..10] {
        assert_eq!((b.deliveries, b.acks), (1, 1), "{b:?}");
    }
    assert!(books[10..].iter().all(|b| b.deliveries == 0));
    let end = EndState::report_stop(
        &emu,
        "q1",
        "SIGTERM with deliveries in flight (binary)",
        tally.total(),
        took,
    );
    assert_eq!(
        (end.acked, end.remaining, end.duplicates, end.lease_expired),
        (10, 20, 0, 0)
    );
    println!(
        "RESULT SIGTERM: exit 0, /readyz 503 after {:.0}ms",
        unready_after.as_secs_f64() * 1000.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_grace_hands_messages_back_and_exits_0() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hang = Hook::start(|_, _| Answer::ok().delayed(Duration::from_secs(60))).await;
    publish(&emu, "q1", "m", 5);
    let cfg = cfg(&api, q1(&hang.url()).timeout("20s")).grace("1s");
    let mut relay = RelayProcess::spawn("grace", &cfg.text());
    relay.wait_ready().await;
    wait_until(Duration::from_secs(10), "5 deliveries hanging", || {
        hang.count() == 5
    })
    .await;
    let t0 = Instant::now();
    relay.signal("TERM");
    let status = relay.exit(Duration::from_secs(10)).await;
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0), "{}", relay.output());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "grace 1s, took {took:?}"
    );
    assert_handed_back(&emu, "q1", 5, "SIGTERM past the grace (binary)", took);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_and_leases_bring_the_messages_back() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hang = Hook::start(|_, _| Answer::ok().delayed(Duration::from_secs(60))).await;
    publish(&emu, "q1", "m", 5);
    let cfg = cfg(&api, q1(&hang.url()).timeout("20s")).grace("20s");
    let mut relay = RelayProcess::spawn("second-signal", &cfg.text());
    relay.wait_ready().await;
    wait_until(Duration::from_secs(10), "5 deliveries hanging", || {
        hang.count() == 5
    })
    .await;
    relay.signal("TERM");
    wait_until(Duration::from_secs(5), "the first signal logged", || {
        relay.logged("signal received")
    })
    .await;
    let t0 = Instant::now();
    relay.signal("INT");
    let status = relay.exit(Duration::from_secs(5)).await;
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(130), "{}", relay.output());
    assert!(took < Duration::from_secs(1), "{took:?}");
    // Nothing was acked or handed back: the leases bring the messages back.
    assert_eq!(emu.stats("q1").in_flight, 5);
    emu.advance(Duration::from_secs(31));
    let s = emu.stats("q1");
    assert_eq!(
        (s.in_flight, s.backlog, s.lease_expired, s.acked),
        (0, 5, 5, 0),
        "{s:?}"
    );
    EndState::report_stop(&emu, "q1", "second signal (exit 130)", 0, took);
}

// ---------------------------------------------------------------------------------------------
// Crash safety

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_then_restart_delivers_and_acks_everything() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let (hook, tally) = ok_hook(Duration::from_millis(20)).await;
    let n = 300;
    publish(&emu, "q1", "m", n);
    let cfg = cfg(&api, q1(&hook.url()));
    let mut relay = RelayProcess::spawn("crash-1", &cfg.text());
    wait_until(Duration::from_secs(20), "100 acked", || {
        emu.stats("q1").acked >= 100
    })
    .await;
    relay.signal("KILL");
    let status = relay.exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), None, "killed by a signal");
    let at_kill = emu.stats("q1");
    assert!(at_kill.acked < n as u64, "killed mid-run: {at_kill:?}");
    // The dead relay's leases run out (30 s, skipped on the emulator's clock).
    emu.advance(Duration::from_secs(31));
    let expired = emu.stats("q1").lease_expired;
    assert_eq!(expired, at_kill.in_flight);

    let mut relay = RelayProcess::spawn("crash-2", &cfg.text());
    wait_until(
        Duration::from_secs(20),
        "all acked after the restart",
        || emu.stats("q1").acked == n as u64,
    )
    .await;
    let t0 = Instant::now();
    relay.signal("TERM");
    let status = relay.exit(Duration::from_secs(10)).await;
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0));
    assert_books(&emu, "q1", 1, |b| b.acks);
    let end =
        EndState::of(&emu, "q1", "kill -9 mid-run, restart", tally.total()).with_shutdown(took);
    end.print();
    assert_eq!((end.acked, end.remaining, end.dead_lettered), (n, 0, 0));
    // Redeliveries are exactly the leases the dead process held; duplicates at most those.
    assert_eq!(end.deliveries, n as u64 + expired);
    assert_eq!(end.lease_expired, expired);
    assert!(end.duplicates <= expired, "{end:?}");
    println!(
        "RESULT kill -9: {} acked before the kill, {} leases held by the dead process",
        at_kill.acked, at_kill.in_flight
    );
}

/// A `Retry-After` too large to add to a clock (`u64::MAX` seconds) on a 429 of the pull API is
/// bad input like any other: the consumer must not panic on it (and so stop for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_retry_after_from_the_api_does_not_kill_the_consumer() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let (hook, _tally) = ok_hook(Duration::ZERO).await;
    let cfg = cfg(&api, q1(&hook.url()));
    let mut relay = RelayProcess::spawn("huge-retry-after", &cfg.text());
    let admin = relay.wait_ready().await;
    emu.inject_fault(
        FaultOp::Pull,
        Fault::Status {
            status: 429,
            body: String::new(),
            retry_after: Some(u64::MAX.to_string()),
        },
    );
    let scrape = || async {
        match reqwest::get(format!("http://{admin}/metrics")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    };
    let mut seen = false;
    for _ in 0..1000 {
        if api_requests(&scrape().await, "pull", "429") >= 1.0 || !relay.running() {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen, "the 429 was never counted");
    // Give a panic time to print.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(relay.running(), "the relay exited:\n{}", relay.output());
    relay.signal("TERM");
    let status = relay.exit(Duration::from_secs(15)).await;
    let output = relay.output();
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(
        !output.contains("panicked") && !output.contains("consumer task failed"),
        "{output}"
    );
}

// ---------------------------------------------------------------------------------------------
// Multiple replicas

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_the_work_and_a_killed_one_leaves_nothing_behind() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let (hook, tally) = ok_hook(Duration::from_millis(50)).await;
    let n = 900;
    publish(&emu, "q1", "m", n);
    let mut replicas = Vec::new();
    for r in 0..3 {
        let replica = q1(&hook.url())
            .visibility("4s")
            .timeout("1s")
            .concurrency(8)
            .webhook(&format!("headers = {{ X-Replica = \"r{r}\" }}"));
        let cfg = cfg(&api, replica).grace("2s");
        replicas.push(RelayProcess::spawn(&format!("replica-{r}"), &cfg.text()));
    }
    let by_replica = |r: &str| {
        hook.received()
            .iter()
            .filter(|q| q.header("x-replica") == Some(r))
            .count()
    };
    wait_until(Duration::from_secs(20), "every replica at work", || {
        ["r0", "r1", "r2"].iter().all(|r| by_replica(r) >= 5) && emu.stats("q1").acked >= 150
    })
    .await;
    replicas[1].signal("KILL");
    replicas[1].exit(Duration::from_secs(5)).await;
    let at_kill = emu.stats("q1");
    assert!(at_kill.acked < n as u64, "killed mid-run: {at_kill:?}");
    let r1_deliveries = by_replica("r1");
    // The killed replica's leases run out after 4 s; the others pick the messages up.
    wait_until(Duration::from_secs(30), "all acked", || {
        emu.stats("q1").acked == n as u64
    })
    .await;
    let mut took = Duration::ZERO;
    for r in [0, 2] {
        let t0 = Instant::now();
        replicas[r].signal("TERM");
        let status = replicas[r].exit(Duration::from_secs(10)).await;
        took = took.max(t0.elapsed());
        assert_eq!(status.code(), Some(0), "{}", replicas[r].output());
    }
    let shares: Vec<usize> = ["r0", "r1", "r2"].iter().map(|r| by_replica(r)).collect();
    assert_books(&emu, "q1", 1, |b| b.acks);
    let end =
        EndState::of(&emu, "q1", "three replicas, one killed", tally.total()).with_shutdown(took);
    end.print();
    assert_eq!((end.acked, end.remaining), (n, 0));
    // Every redelivery is a lease that expired (the killed replica's), nothing else.
    assert_eq!(end.deliveries, n as u64 + end.lease_expired, "{end:?}");
    assert_eq!(end.retries, 0);
    assert!(end.duplicates <= end.lease_expired, "{end:?}");
    // The killed replica held at most: its 8 deliveries in flight, the acks of its last 100 ms
    // flush interval (2 × 50 ms deliveries per slot: 16) and one pull answered but unread (8).
    assert!(end.lease_expired <= 32, "{end:?}");
    println!(
        "RESULT replicas: webhook requests per replica {shares:?} (r1 killed after {r1_deliveries})"
    );
}

// ---------------------------------------------------------------------------------------------
// Secrets

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_any_output_at_trace_level_and_auth_failures_are_loud() {
    const HEADER_SECRET: &str = "hdr-5ecret-9d1e7c";
    const QUERY_SECRET: &str = "qs-5ecret-41b2";
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    // First deliveries fail, so error paths log too; the failure's body tries to forge a log
    // line.
    let (hook, tally) = failing_once_hook().await;
    publish(&emu, "q1", "m", 5);
    emu.inject_fault(
        FaultOp::Pull,
        Fault::Status {
            status: 502,
            body: "<html><body>502 Bad Gateway</body></html>".into(),
            retry_after: None,
        },
    );
    emu.inject_fault(FaultOp::Ack, Fault::Reset);
    let hook_url = format!("{}?sig={QUERY_SECRET}", hook.url());
    let secret_header = format!("headers = {{ X-Webhook-Secret = \"{HEADER_SECRET}\" }}");
    let cfg = cfg(&api, q1(&hook_url).webhook(&secret_header)).token(None);
    let mut relay = RelayProcess::launch("secrets", &cfg.text())
        .env("RUST_LOG", "trace")
        .env("CLOUDFLARE_API_TOKEN", TOKEN)
        .spawn();
    let admin = relay.admin().await;

    wait_until(Duration::from_secs(20), "all acked", || {
        emu.stats("q1").acked == 5
    })
    .await;
    assert!(
        hook.received()
            .iter()
            .all(|r| r.header("x-webhook-secret") == Some(HEADER_SECRET)),
        "the header does reach the webhook"
    );
    // A rejected token: logged loudly, with the permission hint.
    emu.inject_fault(
        FaultOp::Pull,
        Fault::Status {
            status: 403,
            body: r#"{"success":false,"errors":[{"code":10000,"message":"Authentication error"}]}"#
                .into(),
            retry_after: None,
        },
    );
    wait_until(Duration::from_secs(10), "the auth failure logged", || {
        relay.logged("pull rejected")
    })
    .await;
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    relay.signal("TERM");
    let status = relay.exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0));
    let output = relay.output();
    let lines = output.lines().count();
    for secret in [TOKEN, HEADER_SECRET, QUERY_SECRET] {
        assert!(!output.contains(secret), "{secret} in the output");
        assert!(!metrics.contains(secret), "{secret} in /metrics");
    }
    assert!(output.contains("TRACE"), "trace level was on");
    // Each fault left a line with its context.
    let line_with = |parts: &[&str]| {
        output
            .lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .unwrap_or_else(|| panic!("no line with {parts:?}"))
            .to_owned()
    };
    line_with(&["WARN", "pull failed", "HTTP 502", "Bad Gateway", "q1"]);
    line_with(&["WARN", "ack call failed", "transport error", "q1"]);
    line_with(&["WARN", "delivery failed", "500", "q1", "FORGED"]);
    assert!(
        !output.lines().any(|l| l.starts_with("FORGED")),
        "an answer body split a log line"
    );
    let auth = line_with(&["ERROR", "pull rejected", "q1"]);
    assert!(
        auth.contains("Queues read and write permission") && auth.contains("10000"),
        "{auth}"
    );
    assert_eq!(api_requests(&metrics, "pull", "4xx"), 1.0);
    println!(
        "RESULT secrets: {lines} output lines at trace level and /metrics checked: no token, header or query secret"
    );
    EndState::of(&emu, "q1", "trace-level run with faults", tally.total()).print();
}

// ---------------------------------------------------------------------------------------------
// Bad configuration

#[test]
fn every_bad_value_fails_check_config_and_run_with_one_line_naming_the_key() {
    let empty_token = temp_file("empty-token", "  \n");
    // A directory: it exists, but cannot be read as a token.
    let dir = empty_token.parent().unwrap().to_owned();
    let base = |cloudflare: &str, consumer: &str, webhook: &str, tail: &str| {
        format!(
            "[cloudflare]\naccount_id = \"{ACCOUNT}\"\n{cloudflare}\n\
             [[consumers]]\nqueue_id = \"q1\"\n{consumer}\n\
             [consumers.webhook]\nurl = \"http://127.0.0.1:9/hook\"\n{webhook}\n{tail}"
        )
    };
    let tok = "api_token = \"tok-abc-123\"";
    // (case, config text, environment, what the one-line error must name)
    type Case<'a> = (&'a str, String, &'a [(&'a str, &'a str)], &'a str);
    let cases: Vec<Case> = vec![
        (
            "empty token file",
            base(
                &format!("api_token_file = \"{}\"", empty_token.display()),
                "",
                "",
                "",
            ),
            &[],
            "`cloudflare.api_token_file`",
        ),
        (
            "unreadable token file",
            base(
                &format!("api_token_file = \"{}\"", dir.display()),
                "",
                "",
                "",
            ),
            &[],
            "`cloudflare.api_token_file` cannot be read",
        ),
        (
            "empty inline token",
            base("api_token = \"   \"", "", "", ""),
            &[],
            "`cloudflare.api_token`",
        ),
        (
            "empty token variable",
            base(tok, "", "", ""),
            &[("CLOUDFLARE_API_TOKEN", " ")],
            "CLOUDFLARE_API_TOKEN",
        ),
        (
            "missing account",
            base(tok, "", "", "").replace(&format!("account_id = \"{ACCOUNT}\""), ""),
            &[],
            "`cloudflare.account_id`",
        ),
        (
            "batch 0",
            base(tok, "batch_size = 0", "", ""),
            &[],
            "`consumers[0].batch_size`",
        ),
        (
            "batch 101",
            base(tok, "batch_size = 101", "", ""),
            &[],
            "`consumers[0].batch_size`",
        ),
        (
            "visibility 13h",
            base(tok, "visibility_timeout = \"13h\"", "", ""),
            &[],
            "`consumers[0].visibility_timeout`",
        ),
        (
            "timeout = visibility",
            base(tok, "visibility_timeout = \"10s\"", "timeout = \"10s\"", ""),
            &[],
            "`consumers[0].webhook.timeout`",
        ),
        (
            "timeout > visibility",
            base(tok, "visibility_timeout = \"10s\"", "timeout = \"1m\"", ""),
            &[],
            "`consumers[0].webhook.timeout`",
        ),
        (
            "timeout leaves no room for the ack",
            base(
                tok,
                "visibility_timeout = \"10s\"",
                "timeout = \"9500ms\"",
                "",
            ),
            &[],
            "`consumers[0].webhook.timeout`",
        ),
        (
            "grace >= visibility",
            base(
                tok,
                "visibility_timeout = \"20s\"",
                "",
                "[shutdown]\ngrace_period = \"25s\"\n",
            ),
            &[],
            "`shutdown.grace_period`",
        ),
        (
            "non-http webhook",
            base(tok, "", "", "").replace("http://127.0.0.1:9/hook", "ftp://127.0.0.1/x"),
            &[],
            "`consumers[0].webhook.url`",
        ),
        (
            "non-http api",
            base(
                &format!("{tok}\napi_base_url = \"file:///tmp/x\""),
                "",
                "",
                "",
            ),
            &[],
            "`cloudflare.api_base_url`",
        ),
        (
            "unknown key",
            base(&format!("{tok}\naccount = \"x\""), "", "", ""),
            &[],
            "unknown field `account`",
        ),
        (
            "unknown consumer key",
            base(tok, "visibility = \"30s\"", "", ""),
            &[],
            "unknown field `visibility`",
        ),
    ];
    let mut named = 0;
    for (name, text, env, key) in &cases {
        let path = temp_file(&format!("bad-{}.toml", name.replace(' ', "-")), text);
        for cmd in ["check-config", "run"] {
            let mut c = bin();
            c.arg(cmd).arg("--config").arg(&path);
            for (k, v) in *env {
                c.env(k, v);
            }
            let out = c.output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd} / {name}: {stderr}");
            assert_eq!(
                stderr.trim_end().lines().count(),
                1,
                "{cmd} / {name}: {stderr}"
            );
            assert!(
                stderr.contains(key),
                "{cmd} / {name}: want {key:?} in {stderr:?}"
            );
            assert!(!stderr.contains("tok-abc-123"), "{stderr}");
            assert!(out.stdout.is_empty(), "{cmd} / {name}");
            named += 1;
        }
        println!(
            "RESULT bad config {name}: exit 2, {}",
            String::from_utf8_lossy(
                &bin()
                    .arg("check-config")
                    .arg("--config")
                    .arg(&path)
                    .envs(env.iter().copied())
                    .output()
                    .unwrap()
                    .stderr
            )
            .trim_end()
        );
    }
    assert_eq!(named, cases.len() * 2);
}

/// A webhook that answers the first delivery of each message with a 500 whose body holds a
/// newline and a would-be log line, and later ones with 200.
async fn failing_once_hook() -> (Hook, Tally) {
    let tally = Tally::default();
    let t = tally.clone();
    let hook = Hook::start(move |r, _| {
        if r.header("cfq-attempt") == Some("1") {
            Answer::status(500)
                .with_body("oops\nFORGED 2026-01-01T00:00:00Z ERROR cfq_relay: all good\r\n")
        } else {
            t.record(r.header("cfq-message-id").unwrap_or(""));
            Answer::ok().with_body("ok")
        }
    })
    .await;
    (hook, tally)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_a_partial_batch_at_once_and_exits_0() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hook = Hook::start(|_, _| Answer::ok()).await;
    publish(&emu, "q1", "m", 5);
    // 5 messages of a batch of 100 would wait 10 s for company.
    let batch = "batch = { max_messages = 100, max_wait = \"10s\" }";
    let cfg = cfg(&api, q1(&hook.url()).webhook(batch));
    let mut relay = RelayProcess::spawn("batch-sigterm", &cfg.text());
    relay.wait_ready().await;
    wait_until(Duration::from_secs(10), "5 messages held", || {
        emu.stats("q1").in_flight == 5
    })
    .await;
    assert_eq!(hook.count(), 0, "the partial batch waits for company");
    let t0 = Instant::now();
    relay.signal("TERM");
    let status = relay.exit(Duration::from_secs(10)).await;
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0), "{}", relay.output());
    assert!(took < Duration::from_secs(3), "{took:?}");
    let got = hook.received();
    assert_eq!(got.len(), 1, "one batch request");
    assert_eq!(got[0].header("cfq-batch-size"), Some("5"));
    let s = emu.stats("q1");
    assert_eq!((s.acked, s.in_flight, s.lease_expired), (5, 0, 0), "{s:?}");
    EndState::report_stop(&emu, "q1", "SIGTERM with a partial batch (binary)", 5, took);
}
