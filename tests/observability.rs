//! Observability end to end: `/metrics` scraped over HTTP during a run and checked against what
//! the emulator reports and with an independent text-format parser; `/readyz` and `/healthz`
//! through start-up, API failures and shutdown; and the log output of the real binary (JSON
//! lines, the default text format, `RUST_LOG`, the redacted startup config).

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use cfq_emulator::{ContentType, EmulatorOptions, Fault, FaultOp};
use cfq_relay::metrics::{API_RESULTS, OUTCOMES, RELEASE_REASONS, STATUS_CLASSES};
use prometheus_parse::{LineInfo, Value};
use serde_json::Value as Json;
use support::{
    ACCOUNT, Answer, Cfg, ConsumerCfg, Hook, RelayProcess, TOKEN, config, emulator, get,
    publish_text, start, wait_for, wait_until,
};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// Helpers

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Length of the base64 (padded) encoding of `n` bytes: what the emulator keeps on the wire
/// for `bytes` and `json` bodies.
fn base64_len(n: usize) -> u64 {
    (n.div_ceil(3) * 4) as u64
}

/// One parsed `/metrics` answer.
struct Scrape {
    text: String,
    parsed: prometheus_parse::Scrape,
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .expect("the exposition parses");
        Scrape { text, parsed }
    }

    /// The value of the one sample named `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<f64> = self
            .parsed
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                ref other => panic!("{name}: not a scalar: {other:?}"),
            })
            .collect();
        assert_eq!(
            found.len(),
            1,
            "exactly one sample {name}{labels:?}\n{}",
            self.text
        );
        found[0]
    }

    /// Sum of every sample named `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.parsed
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    }

    fn int(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let v = self.value(name, labels);
        assert!(v >= 0.0 && v.fract() == 0.0, "{name}{labels:?} = {v}");
        v as u64
    }

    /// Check the exposition beyond what the (lenient) parser enforces: every line is a
    /// `# HELP`, a `# TYPE` or a well-formed sample of a declared family; every name has the
    /// `cfq_relay_` prefix and help text; label names and values come from the fixed sets
    /// (`queues` for the queue label); nothing in `forbidden` appears in a label value.
    fn check_format(&self, queues: &[&str], forbidden: &[String]) {
        let mut help: HashMap<&str, &str> = HashMap::new();
        let mut types: HashMap<&str, &str> = HashMap::new();
        for line in self.text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, text) = rest.split_once(' ').expect("HELP name text");
                assert!(!text.trim().is_empty(), "empty help: {line}");
                help.insert(name, text);
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').expect("TYPE name type");
                assert!(
                    ["counter", "gauge", "histogram"].contains(&ty),
                    "unexpected type: {line}"
                );
                assert!(help.contains_key(name), "TYPE before HELP: {line}");
                types.insert(name, ty);
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment: {line}");
            assert!(!line.trim().is_empty(), "blank line in the exposition");
            let LineInfo::Sample {
                metric_name,
                labels,
                value,
                timestamp,
            } = LineInfo::parse(line)
            else {
                panic!("not a sample line: {line}");
            };
            assert!(metric_name.starts_with("cfq_relay_"), "unprefixed: {line}");
            assert!(timestamp.is_none(), "no timestamps expected: {line}");
            assert!(value.parse::<f64>().is_ok(), "bad value: {line}");
            let family = match types.get(metric_name) {
                Some(_) => metric_name,
                None => ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| metric_name.strip_suffix(s))
                    .filter(|f| types.get(f) == Some(&"histogram"))
                    .unwrap_or_else(|| panic!("sample of an undeclared family: {line}")),
            };
            if metric_name.ends_with("_total") {
                assert_eq!(types[family], "counter", "{line}");
            }
            let labels = labels.unwrap_or("");
            if labels.is_empty() {
                continue;
            }
            for pair in labels.split(',') {
                let (k, v) = pair.split_once('=').expect("label=value");
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or_else(|| panic!("unquoted label value: {line}"));
                let allowed = match k {
                    "queue" => queues.contains(&v),
                    "outcome" => OUTCOMES.contains(&v),
                    "status_class" => STATUS_CLASSES.contains(&v),
                    "result" => API_RESULTS.contains(&v),
                    "reason" => RELEASE_REASONS.contains(&v),
                    "op" => ["pull", "ack"].contains(&v),
                    "version" => v == env!("CARGO_PKG_VERSION"),
                    "le" => v == "+Inf" || v.parse::<f64>().is_ok(),
                    _ => false,
                };
                assert!(allowed, "label {k}={v:?} outside its fixed set: {line}");
                for f in forbidden {
                    assert!(!v.contains(f.as_str()), "{f} in a label value: {line}");
                }
            }
        }
        assert!(!help.is_empty(), "no metric families at all");
        for name in help.keys() {
            assert!(name.starts_with("cfq_relay_"), "{name}");
            assert!(types.contains_key(name), "HELP without TYPE: {name}");
        }
    }
}

/// GET /metrics over HTTP, check the content type, parse.
async fn scrape(addr: SocketAddr) -> Scrape {
    let resp = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    Scrape::parse(resp.text().await.unwrap())
}

// ---------------------------------------------------------------------------------------------
// /metrics

#[tokio::test]
async fn scraped_metrics_match_the_emulator_and_parse() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    // The first two requests fail (retried after ~1 s); every other one succeeds.
    let hook = Hook::failing_first(2, Answer::status(503)).await;
    const READY: u64 = 20;
    for i in 0..READY {
        publish_text(&emu, "q1", &format!("ready {i}"));
    }
    // Published with an hour's delay: in the backlog, but no pull hands them out.
    let before_ms = unix_ms();
    let bytes_body: Vec<u8> = (0..10).collect();
    let delayed: [(ContentType, &[u8], u64); 3] = [
        (ContentType::Text, b"later-1", 7),
        (ContentType::Bytes, &bytes_body, base64_len(10)),
        (ContentType::Json, br#"{"k":"later"}"#, base64_len(13)),
    ];
    for (ct, body, _) in &delayed {
        emu.publish("q1", Some(*ct), body, Duration::from_secs(3600))
            .unwrap();
    }
    let after_ms = unix_ms();
    let want_bytes: u64 = delayed.iter().map(|(_, _, wire)| wire).sum();
    // One failed pull and one failed ack call, to see the result label move.
    emu.inject_fault(
        FaultOp::Pull,
        Fault::Status {
            status: 500,
            body: r#"{"success":false,"errors":[{"code":10001,"message":"boom"}]}"#.into(),
            retry_after: None,
        },
    );
    emu.inject_fault(
        FaultOp::Ack,
        Fault::Status {
            status: 502,
            body: "bad gateway".into(),
            retry_after: None,
        },
    );

    // One pull at a time, so "a pull counted after X" means "the pull before it is recorded".
    let cfg = config(
        &api,
        &[(
            "q1",
            &hook.url(),
            "name = \"orders\"\nmax_pulls_in_flight = 1",
            "",
        )],
    );
    let started_unix = unix_ms() as f64 / 1000.0;
    let relay = start(cfg).await;
    let admin = relay.admin_addr();

    wait_until(Duration::from_secs(20), "all ready messages acked", || {
        let s = emu.stats("q1");
        s.acked == READY && s.retried == 2
    })
    .await;
    // Every pull the emulator answers from now on reports the drained queue; once the relay
    // has counted two more than this, the gauges of at least one of them are set.
    let pulls_at_drain = emu.stats("q1").pull_calls as f64;
    wait_for(
        Duration::from_secs(20),
        "acks recorded and a pull after the drain",
        || async {
            let s = scrape(admin).await;
            s.value("cfq_relay_acks_sent_total", &[("queue", "orders")]) == READY as f64
                && s.value("cfq_relay_retries_sent_total", &[("queue", "orders")]) == 2.0
                && s.value(
                    "cfq_relay_api_requests_total",
                    &[("queue", "orders"), ("op", "pull"), ("result", "ok")],
                ) >= pulls_at_drain + 2.0
        },
    )
    .await;

    let e1 = emu.stats("q1");
    let s = scrape(admin).await;
    let e2 = emu.stats("q1");

    // What the emulator itself answers a pull now (nothing is pullable: no lease is taken).
    let answer: Json = reqwest::Client::new()
        .post(format!("{api}/accounts/{ACCOUNT}/queues/q1/messages/pull"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"batch_size": 10, "visibility_timeout_ms": 1000}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let result = &answer["result"];
    assert_eq!(result["messages"].as_array().unwrap().len(), 0, "{answer}");
    let m = &result["metadata"]["metrics"];
    let oldest_ts = m["oldest_message_timestamp_ms"].as_u64().unwrap();
    assert!(
        (before_ms..=after_ms).contains(&oldest_ts),
        "the oldest live message is the first delayed one: {answer}"
    );

    let q = [("queue", "orders")];
    // Backlog gauges: what the emulator reported.
    assert_eq!(s.int("cfq_relay_queue_backlog_messages", &q), 3);
    assert_eq!(m["backlog_count"], 3);
    assert_eq!(result["message_backlog_count"], 3);
    assert_eq!(e2.backlog, 3);
    assert_eq!(s.int("cfq_relay_queue_backlog_bytes", &q), want_bytes);
    assert_eq!(m["backlog_bytes"].as_u64(), Some(want_bytes));
    let last_pull = s.value("cfq_relay_last_successful_pull_timestamp_seconds", &q);
    let now = unix_ms() as f64 / 1000.0;
    assert!(
        last_pull >= started_unix && last_pull <= now,
        "{last_pull} {started_unix} {now}"
    );
    // The age is computed from the same clock reading as the last-pull timestamp, so the two
    // agree to the millisecond when a scrape reads both from one pull (the poller sets them
    // one after the other, so a scrape can straddle two pulls: look again then).
    let age_of = |s: &Scrape| {
        let last = s.value("cfq_relay_last_successful_pull_timestamp_seconds", &q);
        let age = s.value("cfq_relay_queue_oldest_message_age_seconds", &q);
        (age, last - oldest_ts as f64 / 1000.0)
    };
    let (age, want_age) = age_of(&s);
    assert!(
        age > 0.0 && (age - want_age).abs() < 1.0,
        "oldest message age {age}, expected {want_age}"
    );
    wait_for(
        Duration::from_secs(10),
        "a scrape whose age and last pull come from one pull",
        || async {
            let (age, want) = age_of(&scrape(admin).await);
            (age - want).abs() < 0.002
        },
    )
    .await;

    // Flow counters: what was processed.
    assert_eq!(s.int("cfq_relay_messages_pulled_total", &q), e2.deliveries);
    assert_eq!(e2.deliveries, READY + 2);
    let delivered = |o: &str| {
        s.int(
            "cfq_relay_messages_delivered_total",
            &[q[0], ("outcome", o)],
        )
    };
    assert_eq!(delivered("acked"), READY);
    assert_eq!(delivered("retried"), 2);
    assert_eq!(delivered("dropped"), 0);
    assert_eq!(delivered("undecodable"), 0);
    assert_eq!(s.int("cfq_relay_acks_sent_total", &q), e2.acked);
    assert_eq!(s.int("cfq_relay_retries_sent_total", &q), e2.retried);
    for zero in [
        "cfq_relay_messages_invalid_total",
        "cfq_relay_ack_warnings_total",
        "cfq_relay_leases_expired_total",
        "cfq_relay_deliveries_in_flight",
    ] {
        assert_eq!(s.int(zero, &q), 0, "{zero}");
    }
    assert_eq!(s.sum("cfq_relay_messages_released_total", &q), 0.0);
    assert_eq!(s.int("cfq_relay_concurrency", &q), 1000);
    // The adaptive limit is exported and stays within its bounds.
    let limit = s.int("cfq_relay_concurrency_limit", &q);
    assert!((1..=1000).contains(&limit), "limit {limit}");
    assert_eq!(
        s.value(
            "cfq_relay_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // Webhook answers by class, and the histogram beside them.
    assert_eq!(hook.count() as u64, READY + 2);
    for class in STATUS_CLASSES {
        let want = match class {
            "2xx" => READY,
            "5xx" => 2,
            _ => 0,
        };
        let l = [q[0], ("status_class", class)];
        assert_eq!(
            s.int("cfq_relay_webhook_responses_total", &l),
            want,
            "{class}"
        );
        assert_eq!(
            s.int("cfq_relay_webhook_request_duration_seconds_count", &l),
            want,
            "{class}"
        );
    }
    assert_eq!(
        s.int("cfq_relay_message_age_at_delivery_seconds_count", &q),
        READY + 2
    );

    // API calls by op and result. Acks are over: exact. Pulls go on: the relay counts a pull
    // after the emulator answered it, and one is in flight at most.
    let api = |op: &str, r: &str| {
        s.int(
            "cfq_relay_api_requests_total",
            &[q[0], ("op", op), ("result", r)],
        )
    };
    assert_eq!(api("ack", "ok"), e2.ack_calls);
    assert_eq!(api("ack", "5xx"), 1);
    assert_eq!(api("pull", "5xx"), 1);
    for r in ["429", "4xx", "malformed", "transport_error"] {
        assert_eq!((api("pull", r), api("ack", r)), (0, 0), "{r}");
    }
    let pull_ok = api("pull", "ok");
    assert!(
        pull_ok + 1 >= e1.pull_calls && pull_ok <= e2.pull_calls,
        "pull calls: relay {pull_ok}, emulator {} .. {}",
        e1.pull_calls,
        e2.pull_calls
    );
    let dur = |op: &str| {
        s.int(
            "cfq_relay_api_request_duration_seconds_count",
            &[q[0], ("op", op)],
        )
    };
    assert_eq!(dur("ack"), e2.ack_calls + 1);
    assert!(dur("pull").abs_diff(pull_ok + 1) <= 1);

    // The format: strict line checks, fixed label sets, no message id or URL in a label.
    let mut forbidden: Vec<String> = hook
        .received()
        .iter()
        .filter_map(|r| r.header("cfq-message-id").map(str::to_owned))
        .collect();
    forbidden.extend(emu.books("q1").into_iter().map(|b| b.id));
    forbidden.extend(["://".to_owned(), "127.0.0.1".to_owned(), "/hook".to_owned()]);
    s.check_format(&["orders"], &forbidden);
    // `promtool check metrics` runs in .ci/run on a live scrape of the binary (the README's
    // `cargo test` needs nothing but the Rust toolchain).

    let registry = relay.metrics().clone();
    relay.stop().await;
    // After the drain nothing moves: every pull the emulator answered is counted (but ours).
    let end = Scrape::parse(registry.render());
    let e3 = emu.stats("q1");
    let pulls = |r: &str| {
        end.int(
            "cfq_relay_api_requests_total",
            &[q[0], ("op", "pull"), ("result", r)],
        )
    };
    assert_eq!(pulls("ok"), e3.pull_calls - 1);
    assert_eq!(
        end.int(
            "cfq_relay_api_request_duration_seconds_count",
            &[q[0], ("op", "pull")]
        ),
        pulls("ok") + pulls("5xx")
    );
    assert_eq!(end.int("cfq_relay_queue_backlog_messages", &q), 3);
    end.check_format(&["orders"], &forbidden);
}

// ---------------------------------------------------------------------------------------------
// /readyz and /healthz

/// A webhook that holds every request until the test opens the gate.
struct HeldAnswers {
    arrived: AtomicUsize,
    open: tokio::sync::Semaphore,
}

async fn gated(State(g): State<Arc<HeldAnswers>>) -> StatusCode {
    g.arrived.fetch_add(1, Ordering::SeqCst);
    let _pass = g.open.acquire().await.unwrap();
    StatusCode::OK
}

async fn gated_hook() -> (Arc<HeldAnswers>, String) {
    let gate = Arc::new(HeldAnswers {
        arrived: AtomicUsize::new(0),
        open: tokio::sync::Semaphore::new(0),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/hook", post(gated))
        .with_state(gate.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (gate, format!("http://{addr}/hook"))
}

fn pull_fault() -> Fault {
    Fault::Status {
        status: 500,
        body: "internal error".into(),
        retry_after: None,
    }
}

#[tokio::test]
async fn readiness_follows_pulls_and_shutdown() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let (gate, hook) = gated_hook().await;
    // The first two pulls fail.
    emu.inject_fault(FaultOp::Pull, pull_fault());
    emu.inject_fault(FaultOp::Pull, pull_fault());
    let mut cfg = config(&api, &[("q1", &hook, "", "")]);
    // Room to hold a delivery open through the shutdown checks below.
    cfg.consumers[0].webhook.timeout = Duration::from_secs(20);
    cfg.shutdown.grace_period = Duration::from_secs(20);
    let relay_stop = CancellationToken::new();
    let relay = cfq_relay::start(cfg, relay_stop.clone()).await.unwrap();
    let admin = relay.admin_addr();

    // Before the first successful pull: not ready, but alive.
    let (status, body) = get(admin, "/readyz").await;
    assert_eq!(
        emu.stats("q1").pull_calls,
        0,
        "no pull may have succeeded before this check"
    );
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("q1") && body.len() < 200,
        "short reason: {body}"
    );
    assert_eq!(get(admin, "/healthz").await, (200, "ok\n".into()));

    wait_for(
        Duration::from_secs(15),
        "ready after the first pull",
        || async { get(admin, "/readyz").await.0 == 200 },
    )
    .await;
    assert!(emu.stats("q1").pull_calls >= 1);
    assert_eq!(get(admin, "/readyz").await, (200, "ready\n".into()));
    let s = scrape(admin).await;
    let failed = |s: &Scrape| {
        s.int(
            "cfq_relay_api_requests_total",
            &[("queue", "q1"), ("op", "pull"), ("result", "5xx")],
        )
    };
    assert_eq!(failed(&s), 2);

    // While the API keeps failing (three pulls in a row), not ready; ready again after.
    for _ in 0..3 {
        emu.inject_fault(FaultOp::Pull, pull_fault());
    }
    wait_for(
        Duration::from_secs(15),
        "not ready while pulls fail",
        || async { get(admin, "/readyz").await.0 == 503 },
    )
    .await;
    assert!(failed(&scrape(admin).await) >= 2 + 3);
    assert_eq!(get(admin, "/healthz").await.0, 200);
    wait_for(Duration::from_secs(15), "ready again", || async {
        get(admin, "/readyz").await.0 == 200
    })
    .await;

    // Shutdown: hold one delivery in flight, stop, and look while the drain waits for it.
    publish_text(&emu, "q1", "held");
    wait_until(Duration::from_secs(10), "delivery in flight", || {
        gate.arrived.load(Ordering::SeqCst) == 1
    })
    .await;
    let q = [("queue", "q1")];
    assert_eq!(
        scrape(admin)
            .await
            .int("cfq_relay_deliveries_in_flight", &q),
        1
    );
    relay_stop.cancel();
    wait_for(
        Duration::from_secs(10),
        "not ready during shutdown",
        || async { get(admin, "/readyz").await == (503, "shutting down\n".into()) },
    )
    .await;
    // The delivery is still held, so the drain cannot have finished: the process is alive.
    assert_eq!(emu.stats("q1").acked, 0);
    assert_eq!(get(admin, "/healthz").await, (200, "ok\n".into()));
    let s = scrape(admin).await;
    assert_eq!(s.int("cfq_relay_deliveries_in_flight", &q), 1);
    assert_eq!(get(admin, "/readyz").await.0, 503);

    gate.open.add_permits(1000);
    tokio::time::timeout(Duration::from_secs(20), relay.wait())
        .await
        .expect("the drain ends once the delivery is answered")
        .unwrap();
    assert_eq!(emu.stats("q1").acked, 1, "the held delivery was acked");
    assert!(
        reqwest::get(format!("http://{admin}/healthz"))
            .await
            .is_err(),
        "the admin server stops with the relay"
    );
}

// ---------------------------------------------------------------------------------------------
// Logs of the real binary

const HOOK_HEADER_SECRET: &str = "header-secret-3456";
const HOOK_URL_PASSWORD: &str = "hookpass-5678";
const HOOK_QUERY_SECRET: &str = "query-secret-9012";

/// A config for the binary: one consumer of `q1`, webhook credentials in basic auth (a URL with
/// a password is refused), the URL's query and a header (all secrets that must not be logged);
/// `log` is the `[log]` table's body.
fn bin_config(api: &str, hook: SocketAddr, log: &str) -> String {
    let url = format!("http://{hook}/hook?sig={HOOK_QUERY_SECRET}");
    let q1 = ConsumerCfg::new("q1", &url)
        .webhook(&format!(
            "basic_auth = {{ username = \"hookuser\", password = \"{HOOK_URL_PASSWORD}\" }}"
        ))
        .webhook(&format!(
            "headers = {{ X-Hook-Secret = \"{HOOK_HEADER_SECRET}\" }}"
        ))
        .retry("1s", "2s");
    Cfg::new(api).log(log).consumer(q1).text()
}

fn assert_no_secrets(lines: &[String]) {
    for line in lines {
        for secret in [
            TOKEN,
            HOOK_HEADER_SECRET,
            HOOK_URL_PASSWORD,
            HOOK_QUERY_SECRET,
        ] {
            assert!(!line.contains(secret), "{secret} logged: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_fields() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hook = Hook::failing_first(1, Answer::status(503)).await;
    for i in 0..3 {
        publish_text(&emu, "q1", &format!("m{i}"));
    }
    let bin = RelayProcess::spawn(
        "json",
        &bin_config(&api, hook.addr(), "format = \"json\"\nlevel = \"info\""),
    );
    wait_until(Duration::from_secs(20), "all acked", || {
        emu.stats("q1").acked == 3
    })
    .await;
    bin.wait_line("the retry line", |l| l.contains("delivery failed"))
        .await;
    // The admin server of the binary, from its own log line.
    let listening = bin
        .wait_line("admin line", |l| l.contains("admin server listening"))
        .await;
    let admin: SocketAddr = serde_json::from_str::<Json>(&listening).unwrap()["admin"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(get(admin, "/readyz").await.0, 200);
    wait_for(
        Duration::from_secs(10),
        "acks in the binary's metrics",
        || async {
            scrape(admin)
                .await
                .value("cfq_relay_acks_sent_total", &[("queue", "q1")])
                == 3.0
        },
    )
    .await;
    let lines = bin.terminate().await;

    let events: Vec<serde_json::Map<String, Json>> = lines
        .iter()
        .map(|l| match serde_json::from_str::<Json>(l) {
            Ok(Json::Object(o)) => o,
            other => panic!("not a JSON object ({other:?}): {l}"),
        })
        .collect();
    for (e, line) in events.iter().zip(&lines) {
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&e["level"].as_str().unwrap()),
            "{line}"
        );
        assert!(
            e["target"].as_str().unwrap().starts_with("cfq_relay"),
            "{line}"
        );
        assert!(
            e["timestamp"].is_string() && e["message"].is_string(),
            "{line}"
        );
    }
    let find = |message: &str| -> Vec<&serde_json::Map<String, Json>> {
        events
            .iter()
            .filter(|e| e["message"].as_str().unwrap().starts_with(message))
            .collect()
    };

    // Startup: one short line, one per consumer; the effective config only at DEBUG.
    let startup = find("cfq-relay starting");
    assert_eq!(startup.len(), 1, "{lines:#?}");
    assert_eq!(startup[0]["level"], "INFO");
    assert_eq!(startup[0]["version"], env!("CARGO_PKG_VERSION"));
    let consumer = find("consumer started");
    assert_eq!(consumer.len(), 1, "{lines:#?}");
    let c = consumer[0];
    assert_eq!(c["level"], "INFO");
    assert_eq!(c["queue"], "q1");
    assert_eq!(c["queue_id"], "q1");
    assert_eq!(c["webhook"], format!("http://{}", hook.addr()).as_str());
    assert_eq!(c["batch_size"], 100);
    assert_eq!(c["concurrency"], 1000);
    assert_eq!(c["visibility"], "30s");
    assert!(find("effective configuration").is_empty(), "{lines:#?}");

    // The failed delivery: one line with queue, message id, attempt, status, delay, duration.
    let failed_id = hook.received()[0]
        .header("cfq-message-id")
        .unwrap()
        .to_owned();
    let failures = find("delivery failed; retrying later");
    assert_eq!(failures.len(), 1, "{lines:#?}");
    let f = failures[0];
    assert_eq!(f["level"], "WARN");
    assert_eq!(f["target"], "cfq_relay::pipeline::worker");
    assert_eq!(f["queue"], "q1");
    assert_eq!(f["id"], failed_id.as_str());
    assert_eq!(f["attempt"], 1);
    assert_eq!(f["status"], 503);
    assert!(f["delay_s"].as_u64().is_some_and(|d| d >= 1), "{f:?}");
    assert!(f["duration_ms"].is_u64(), "{f:?}");

    // Per-message success is logged at debug only, so not at `level = "info"`.
    assert!(find("delivered").is_empty(), "{lines:#?}");
    // Shutdown is logged.
    for m in ["signal received", "shutting down", "shutdown complete"] {
        assert!(!find(m).is_empty(), "{m}: {lines:#?}");
    }
    assert_no_secrets(&lines);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_are_the_default_and_rust_log_wins() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hook = Hook::start(|_, _| Answer::ok()).await;
    let id = publish_text(&emu, "q1", "hello");
    // No `format` key: text. `level = "error"` would hide everything below; RUST_LOG wins.
    let bin = RelayProcess::launch("text", &bin_config(&api, hook.addr(), "level = \"error\""))
        .env("RUST_LOG", "info,cfq_relay=debug")
        .spawn();
    wait_until(Duration::from_secs(20), "acked", || {
        emu.stats("q1").acked == 1
    })
    .await;
    let delivered = bin
        .wait_line("the debug success line", |l| l.contains("delivered"))
        .await;
    let lines = bin.terminate().await;

    for line in &lines {
        assert!(!line.starts_with('{'), "text, not JSON: {line}");
        assert!(
            !line.contains('\u{1b}'),
            "no colour codes off a terminal: {line:?}"
        );
    }
    assert!(delivered.contains("DEBUG") && delivered.contains("cfq_relay::pipeline::worker"));
    for field in [
        "queue=q1",
        &format!("id={id}"),
        "attempt=1",
        "status=200",
        "duration_ms=",
    ] {
        assert!(delivered.contains(field), "{field} in {delivered}");
    }
    let startup = lines
        .iter()
        .find(|l| l.contains("cfq-relay starting"))
        .expect("startup line");
    assert!(startup.contains(" INFO "), "{startup}");
    // At DEBUG (RUST_LOG): the effective configuration, redacted.
    let effective = lines
        .iter()
        .find(|l| l.contains("effective configuration"))
        .expect("the effective configuration at DEBUG");
    assert!(effective.contains(" DEBUG "), "{effective}");
    for part in [
        "config=Config {",
        "api_token: Some(\"[REDACTED]\")",
        "queue_id: \"q1\"",
        "X-Hook-Secret",
        "visibility_timeout: 30s",
    ] {
        assert!(effective.contains(part), "{part} in {effective}");
    }
    assert_no_secrets(&lines);
}

#[test]
fn config_debug_redacts_the_api_base_url_credentials() {
    let cfg = config(
        "https://proxyuser:proxypass@proxy.example/client/v4?key=apikey",
        &[("q1", "http://127.0.0.1:1/hook", "", "")],
    );
    let debug = format!("{cfg:?}");
    for secret in ["proxypass", "apikey", TOKEN] {
        assert!(!debug.contains(secret), "{secret} in {debug}");
    }
    assert!(debug.contains("proxy.example"), "{debug}");
}
