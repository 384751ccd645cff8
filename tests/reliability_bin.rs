//! Reliability (issue 4) through the real binary: SIGTERM drains and exits 0, a second signal
//! exits at once, `kill -9` loses nothing, three replicas share a queue, nothing secret is
//! printed even at trace level, every bad configuration exits 2 naming its key. The emulator
//! and the webhook receiver run inside the test; the relay is `cfq-relay run` in a child process.
//! Each scenario prints a `RESULT` line (`cargo test --test reliability_bin -- --nocapture`).

mod common;
mod reliability_kit;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cfq_emulator::{EmulatorOptions, Fault, FaultOp};
use common::{ACCOUNT, Answer, Receiver, TOKEN, emulator, wait_until};
use reliability_kit::{EndState, Tally, metric, publish};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// A relay in a child process

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cfq-relay-reliability-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_config(name: &str, text: &str) -> PathBuf {
    let path = temp_dir().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cfq-relay"));
    c.env_remove("CLOUDFLARE_API_TOKEN")
        .env_remove("RUST_LOG")
        .env_remove("CFQ_RELAY_CONFIG")
        .env("NO_COLOR", "1");
    c
}

/// `cfq-relay run` with its output collected line by line.
struct Relay {
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
}

impl Relay {
    fn spawn(name: &str, config: &str, env: &[(&str, &str)]) -> Relay {
        let path = write_config(&format!("{name}.toml"), config);
        let mut cmd = bin();
        cmd.args(["run", "--config"])
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().unwrap(), output.clone());
        collect(child.stderr.take().unwrap(), output.clone());
        Relay { child, output }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig}");
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    fn logged(&self, needle: &str) -> bool {
        self.output
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }

    /// The admin address, from the start-up log line (the config asks for port 0).
    async fn admin(&self) -> SocketAddr {
        let mut found = None;
        wait_until(Duration::from_secs(10), "the admin server log line", || {
            found = self
                .output
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains("admin server listening"))
                .and_then(|l| {
                    let at = l.find("127.0.0.1:")?;
                    let addr: String = l[at..]
                        .chars()
                        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                        .collect();
                    addr.parse().ok()
                });
            found.is_some()
        })
        .await;
        found.unwrap()
    }

    async fn wait_ready(&self) -> SocketAddr {
        let admin = self.admin().await;
        let url = format!("http://{admin}/readyz");
        let end = Instant::now() + Duration::from_secs(10);
        while http_status(&url).await != 200 {
            assert!(
                Instant::now() < end,
                "relay never ready:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        admin
    }

    /// Wait (at most `limit`) for the process to end.
    async fn exit(&mut self, limit: Duration) -> ExitStatus {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < end,
                "relay still running after {limit:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // A failed test must not leave its relay behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn collect(stream: impl Read + Send + 'static, into: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let text = String::from_utf8_lossy(&line).trim_end().to_owned();
            into.lock().unwrap().push(text);
            line.clear();
        }
    });
}

async fn http_status(url: &str) -> u16 {
    match reqwest::get(url).await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// The settings a scenario varies; `text()` is the TOML file.
struct Cfg {
    api: String,
    hook: String,
    grace: &'static str,
    visibility: &'static str,
    timeout: &'static str,
    concurrency: usize,
    /// Extra lines of `[consumers.webhook]`.
    webhook_extra: String,
    /// The token line of `[cloudflare]` (empty: the token comes from the environment).
    token: String,
    log_level: &'static str,
}

impl Cfg {
    fn new(api: &str, hook: &str) -> Cfg {
        Cfg {
            api: api.to_owned(),
            hook: hook.to_owned(),
            grace: "10s",
            visibility: "30s",
            timeout: "5s",
            concurrency: 16,
            webhook_extra: String::new(),
            token: format!("api_token = \"{TOKEN}\""),
            log_level: "info",
        }
    }

    fn text(&self) -> String {
        format!(
            "[cloudflare]\naccount_id = \"{ACCOUNT}\"\napi_base_url = \"{api}\"\n{token}\napi_timeout = \"2s\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"{log}\"\n\
             [shutdown]\ngrace_period = \"{grace}\"\n\
             [[consumers]]\nqueue_id = \"q1\"\nvisibility_timeout = \"{vis}\"\nconcurrency = {conc}\nmax_idle_backoff = \"200ms\"\n\
             [consumers.webhook]\nurl = \"{hook}\"\ntimeout = \"{timeout}\"\n{extra}\n\
             [consumers.retry]\nbase_delay = \"0s\"\nmax_delay = \"10s\"\n",
            api = self.api,
            token = self.token,
            log = self.log_level,
            grace = self.grace,
            vis = self.visibility,
            conc = self.concurrency,
            hook = self.hook,
            timeout = self.timeout,
            extra = self.webhook_extra,
        )
    }
}

/// A webhook receiver answering 200 after `delay`, tallying the answers.
async fn ok_hook(delay: Duration) -> (Receiver, Tally) {
    let tally = Tally::default();
    let t = tally.clone();
    let hook = Receiver::start(move |r, _| {
        t.record(r.header("cfq-message-id").unwrap_or("?"));
        Answer::ok().delayed(delay)
    })
    .await;
    (hook, tally)
}

// ---------------------------------------------------------------------------------------------
// Graceful stop

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_pulling_finishes_in_flight_deliveries_and_exits_0() {
    let stop = CancellationToken::new();
    let (emu, api) = emulator(EmulatorOptions::default(), &stop).await;
    let (hook, tally) = ok_hook(Duration::from_millis(1500)).await;
    publish(&emu, "q1", "m", 30);
    let mut cfg = Cfg::new(&api, &hook.url());
    cfg.concurrency = 10;
    let mut relay = Relay::spawn("sigterm", &cfg.text(), &[]);
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
    let end = EndState::of(
        &emu,
        "q1",
        "SIGTERM with deliveries in flight (binary)",
        tally.total(),
    )
    .with_shutdown(took)
    .print()
    .clone();
    assert_eq!(
        (end.acked, end.remaining, end.duplicates, end.lease_expired),
        (10, 20, 0, 0)
    );
    println!(
        "RESULT SIGTERM: exit 0, /readyz 503 after {:.0}ms",
        unready_after.as_secs_f64() * 1000.0
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_grace_hands_messages_back_and_exits_0() {
    let stop = CancellationToken::new();
    let (emu, api) = emulator(EmulatorOptions::default(), &stop).await;
    let hang = Receiver::start(|_, _| Answer::ok().delayed(Duration::from_secs(60))).await;
    publish(&emu, "q1", "m", 5);
    let mut cfg = Cfg::new(&api, &hang.url());
    cfg.grace = "1s";
    cfg.timeout = "20s";
    let mut relay = Relay::spawn("grace", &cfg.text(), &[]);
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
    let s = emu.stats("q1");
    assert_eq!(
        (s.in_flight, s.backlog, s.lease_expired),
        (0, 5, 0),
        "{s:?}"
    );
    for b in emu.books("q1") {
        assert_eq!(
            (b.deliveries, b.acks, b.retries.clone()),
            (1, 0, vec![0]),
            "{b:?}"
        );
    }
    EndState::of(&emu, "q1", "SIGTERM past the grace (binary)", 0)
        .with_shutdown(took)
        .print();
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_and_leases_bring_the_messages_back() {
    let stop = CancellationToken::new();
    let (emu, api) = emulator(EmulatorOptions::default(), &stop).await;
    let hang = Receiver::start(|_, _| Answer::ok().delayed(Duration::from_secs(60))).await;
    publish(&emu, "q1", "m", 5);
    let mut cfg = Cfg::new(&api, &hang.url());
    cfg.grace = "20s";
    cfg.timeout = "20s";
    let mut relay = Relay::spawn("second-signal", &cfg.text(), &[]);
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
    EndState::of(&emu, "q1", "second signal (exit 130)", 0)
        .with_shutdown(took)
        .print();
    stop.cancel();
}

// ---------------------------------------------------------------------------------------------
// Crash safety

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_then_restart_delivers_and_acks_everything() {
    let stop = CancellationToken::new();
    let (emu, api) = emulator(EmulatorOptions::default(), &stop).await;
    let (hook, tally) = ok_hook(Duration::from_millis(20)).await;
    let n = 300;
    publish(&emu, "q1", "m", n);
    let cfg = Cfg::new(&api, &hook.url());
    let mut relay = Relay::spawn("crash-1", &cfg.text(), &[]);
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

    let mut relay = Relay::spawn("crash-2", &cfg.text(), &[]);
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
    for b in emu.books("q1") {
        assert_eq!(b.acks, 1, "{b:?}");
    }
    let end = EndState::of(&emu, "q1", "kill -9 mid-run, restart", tally.total())
        .with_shutdown(took)
        .print()
        .clone();
    assert_eq!((end.acked, end.remaining, end.dead_lettered), (n, 0, 0));
    // Redeliveries are exactly the leases the dead process held; duplicates at most those.
    assert_eq!(end.deliveries, n as u64 + expired);
    assert_eq!(end.lease_expired, expired);
    assert!(end.duplicates <= expired, "{end:?}");
    println!(
        "RESULT kill -9: {} acked before the kill, {} leases held by the dead process",
        at_kill.acked, at_kill.in_flight
    );
    stop.cancel();
}

// ---------------------------------------------------------------------------------------------
// Multiple replicas

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_the_work_and_a_killed_one_leaves_nothing_behind() {
    let stop = CancellationToken::new();
    let (emu, api) = emulator(EmulatorOptions::default(), &stop).await;
    let (hook, tally) = ok_hook(Duration::from_millis(50)).await;
    let n = 900;
    publish(&emu, "q1", "m", n);
    let mut replicas = Vec::new();
    for r in 0..3 {
        let mut cfg = Cfg::new(&api, &hook.url());
        cfg.visibility = "4s";
        cfg.timeout = "1s";
        cfg.grace = "2s";
        cfg.concurrency = 8;
        cfg.webhook_extra = format!("headers = {{ X-Replica = \"r{r}\" }}");
        replicas.push(Relay::spawn(&format!("replica-{r}"), &cfg.text(), &[]));
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
    for b in emu.books("q1") {
        assert_eq!(b.acks, 1, "{b:?}");
    }
    let end = EndState::of(&emu, "q1", "three replicas, one killed", tally.total())
        .with_shutdown(took)
        .print()
        .clone();
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
    stop.cancel();
}

// ---------------------------------------------------------------------------------------------
// Secrets

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_any_output_at_trace_level_and_auth_failures_are_loud() {
    const HEADER_SECRET: &str = "hdr-5ecret-9d1e7c";
    const QUERY_SECRET: &str = "qs-5ecret-41b2";
    let stop = CancellationToken::new();
    let (emu, api) = emulator(EmulatorOptions::default(), &stop).await;
    // First deliveries fail, so error paths log too; the failure's body tries to forge a log
    // line.
    let hook = FailingOnceHook::start().await;
    let tally = hook.tally.clone();
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
    let mut cfg = Cfg::new(&api, &format!("{}?sig={QUERY_SECRET}", hook.url()));
    cfg.token = String::new();
    cfg.webhook_extra = format!("headers = {{ X-Webhook-Secret = \"{HEADER_SECRET}\" }}");
    let mut relay = Relay::spawn(
        "secrets",
        &cfg.text(),
        &[("RUST_LOG", "trace"), ("CLOUDFLARE_API_TOKEN", TOKEN)],
    );
    let admin = relay.admin().await;
    wait_until(Duration::from_secs(20), "all acked", || {
        emu.stats("q1").acked == 5
    })
    .await;
    assert!(
        hook.secrets
            .lock()
            .unwrap()
            .iter()
            .all(|s| s == HEADER_SECRET),
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
    assert_eq!(
        metric(
            &metrics,
            "cfq_relay_api_requests_total",
            &[("op", "pull"), ("result", "4xx")]
        ),
        1.0
    );
    println!(
        "RESULT secrets: {lines} output lines at trace level and /metrics checked: no token, header or query secret"
    );
    EndState::of(&emu, "q1", "trace-level run with faults", tally.total()).print();
    stop.cancel();
}

// ---------------------------------------------------------------------------------------------
// Bad configuration

#[test]
fn every_bad_value_fails_check_config_and_run_with_one_line_naming_the_key() {
    let dir = temp_dir();
    let empty_token = dir.join("empty-token");
    std::fs::write(&empty_token, "  \n").unwrap();
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
        let path = write_config(&format!("bad-{}.toml", name.replace(' ', "-")), text);
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
struct FailingOnceHook {
    addr: SocketAddr,
    tally: Tally,
    /// `X-Webhook-Secret` of every request.
    secrets: Arc<Mutex<Vec<String>>>,
}

impl FailingOnceHook {
    async fn start() -> FailingOnceHook {
        use axum::http::{HeaderMap, StatusCode};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tally = Tally::default();
        let secrets = Arc::new(Mutex::new(Vec::new()));
        let (t, sec) = (tally.clone(), secrets.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap| {
                let (t, sec) = (t.clone(), sec.clone());
                async move {
                    let h = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    sec.lock().unwrap().push(h("x-webhook-secret"));
                    if h("cfq-attempt") == "1" {
                        (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "oops\nFORGED 2026-01-01T00:00:00Z ERROR cfq_relay: all good\r\n",
                        )
                    } else {
                        t.record(&h("cfq-message-id"));
                        (StatusCode::OK, "ok")
                    }
                }
            }),
        );
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FailingOnceHook {
            addr,
            tally,
            secrets,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_a_partial_batch_at_once_and_exits_0() {
    let stop = CancellationToken::new();
    let (emu, api) = emulator(EmulatorOptions::default(), &stop).await;
    let hook = Receiver::start(|_, _| Answer::ok()).await;
    publish(&emu, "q1", "m", 5);
    let mut cfg = Cfg::new(&api, &hook.url());
    // 5 messages of a batch of 100 would wait 10 s for company.
    cfg.webhook_extra = "batch = { max_messages = 100, max_wait = \"10s\" }".into();
    let mut relay = Relay::spawn("batch-sigterm", &cfg.text(), &[]);
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
    EndState::of(&emu, "q1", "SIGTERM with a partial batch (binary)", 5)
        .with_shutdown(took)
        .print();
    stop.cancel();
}
