//! Config reload (SIGHUP): consumers added, changed or removed are drained and (re)started,
//! unchanged ones keep running, nothing in flight is lost, and a bad config changes nothing.
//! Library tests drive `Running::reload`; the last test sends SIGHUP to the real binary.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cfq_emulator::{ContentType, EmulatorOptions};
use cfq_relay::{Config, ReloadSummary};
use common::{ACCOUNT, Answer, Receiver, TOKEN, emulator, wait_until};
use tokio_util::sync::CancellationToken;

/// One `[[consumers]]` entry: queue id, webhook URL, concurrency, extra webhook keys.
struct C<'a>(&'a str, &'a str, usize, &'a str);

fn config_text(api: &str, grace: &str, consumers: &[C]) -> String {
    let mut text = format!(
        "[cloudflare]\naccount_id = \"{ACCOUNT}\"\napi_base_url = \"{api}\"\napi_token = \"{TOKEN}\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[shutdown]\ngrace_period = \"{grace}\"\n"
    );
    for C(queue, hook, concurrency, webhook_extra) in consumers {
        text.push_str(&format!(
            "[[consumers]]\nqueue_id = \"{queue}\"\nconcurrency = {concurrency}\n\
             visibility_timeout = \"30s\"\nmax_idle_backoff = \"100ms\"\n\
             [consumers.webhook]\nurl = \"{hook}\"\ntimeout = \"5s\"\n{webhook_extra}\n\
             [consumers.retry]\nbase_delay = \"1s\"\nmax_delay = \"10s\"\n"
        ));
    }
    text
}

fn config(api: &str, grace: &str, consumers: &[C]) -> Config {
    let text = config_text(api, grace, consumers);
    Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn publish(emu: &cfq_emulator::Emulator, queue: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            emu.publish(
                queue,
                Some(ContentType::Text),
                format!("{queue}-{i}").as_bytes(),
                Duration::ZERO,
            )
            .unwrap()
        })
        .collect()
}

fn ids(hooks: &[&Receiver]) -> Vec<String> {
    hooks
        .iter()
        .flat_map(|h| h.received())
        .map(|r| r.header("cfq-message-id").unwrap().to_owned())
        .collect()
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_change_remove_while_delivering_loses_nothing() {
    let stop = CancellationToken::new();
    let (emu, api) = emulator(EmulatorOptions::default(), &stop).await;
    // qa: unchanged by the reload, each delivery takes longer than the 2 s grace period: were
    // it drained, its deliveries would be abandoned and redelivered.
    let hook_a = Receiver::start(|_, _| Answer::ok().delayed(Duration::from_secs(3))).await;
    // qb: changed (new webhook); qd: removed. Both slow enough to be busy at the reload.
    let hook_b = Receiver::start(|_, _| Answer::ok().delayed(Duration::from_millis(300))).await;
    let hook_b2 = Receiver::start(|_, _| Answer::ok()).await;
    let hook_d = Receiver::start(|_, _| Answer::ok().delayed(Duration::from_millis(300))).await;
    // qc: added.
    let hook_c = Receiver::start(|_, _| Answer::ok()).await;

    let a = publish(&emu, "qa", 20);
    let b = publish(&emu, "qb", 50);
    let c = publish(&emu, "qc", 30);
    publish(&emu, "qd", 50);

    let before = config(
        &api,
        "2s",
        &[
            C("qa", &hook_a.url(), 20, ""),
            C("qb", &hook_b.url(), 5, ""),
            C("qd", &hook_d.url(), 5, ""),
        ],
    );
    let relay_stop = CancellationToken::new();
    let relay = cfq_relay::start(before, relay_stop.clone()).await.unwrap();
    wait_until(Duration::from_secs(10), "deliveries in flight", || {
        hook_a.count() == 20 && hook_b.count() >= 5 && hook_d.count() >= 5
    })
    .await;
    assert_eq!(emu.stats("qc").pull_calls, 0, "qc is not configured yet");

    let after = config(
        &api,
        "2s",
        &[
            C("qa", &hook_a.url(), 20, ""),
            C("qb", &hook_b2.url(), 5, ""),
            C("qc", &hook_c.url(), 5, ""),
        ],
    );
    let summary = relay.reload(after).await.unwrap();
    assert_eq!(
        summary,
        ReloadSummary {
            added: names(&["qc"]),
            changed: names(&["qb"]),
            removed: names(&["qd"]),
            unchanged: names(&["qa"]),
            needs_restart: vec![],
        }
    );

    wait_until(
        Duration::from_secs(20),
        "everything configured acked",
        || {
            emu.stats("qa").acked == 20
                && emu.stats("qb").acked == 50
                && emu.stats("qc").acked == 30
        },
    )
    .await;
    wait_until(Duration::from_secs(10), "qd drained and forgotten", || {
        emu.stats("qd").in_flight == 0 && !relay.metrics().render().contains("queue=\"qd\"")
    })
    .await;

    // qa kept running: every slow delivery finished where it started, none was redelivered.
    let got_a = ids(&[&hook_a]);
    assert_eq!(got_a.len(), 20, "qa was not restarted");
    assert_eq!(got_a.iter().collect::<HashSet<_>>().len(), 20);
    for book in emu.books("qa") {
        assert_eq!((book.deliveries, book.acks), (1, 1), "{book:?}");
    }
    assert!(a.iter().all(|id| got_a.contains(id)));

    // qb: the old consumer finished its deliveries in flight and handed back what it held;
    // the new one took over only after that, and no message reached the receivers twice.
    let got_b = ids(&[&hook_b, &hook_b2]);
    assert_eq!(got_b.len(), 50, "each qb message delivered once: {got_b:?}");
    assert_eq!(got_b.iter().collect::<HashSet<_>>().len(), 50);
    assert!(b.iter().all(|id| got_b.contains(id)));
    assert!(
        hook_b2.count() > 0,
        "the changed consumer delivers to its new webhook"
    );
    let last_old = hook_b.received().iter().map(|r| r.at).max().unwrap();
    let first_new = hook_b2.received().iter().map(|r| r.at).min().unwrap();
    assert!(
        last_old < first_new,
        "old and new qb consumers never deliver side by side"
    );
    for book in emu.books("qb") {
        assert_eq!(book.acks, 1, "{book:?}");
    }

    // qc: started by the reload.
    let got_c = ids(&[&hook_c]);
    assert_eq!(got_c.len(), 30);
    assert!(c.iter().all(|id| got_c.contains(id)));

    // qd: removed; what it delivered was acked, the rest is back in the queue, not lost.
    let d = emu.stats("qd");
    assert_eq!(d.acked, hook_d.count() as u64, "{d:?}");
    assert_eq!(d.acked + d.backlog, 50, "{d:?}");
    assert!(d.backlog > 0, "qd stopped consuming: {d:?}");
    for book in emu.books("qd") {
        assert!(book.acks <= 1, "{book:?}");
    }

    for q in ["qa", "qb", "qc", "qd"] {
        let s = emu.stats(q);
        assert_eq!(
            (s.lease_expired, s.dead_lettered, s.stale_acks),
            (0, 0, 0),
            "{q}: {s:?}"
        );
    }

    // Readiness follows the live set: qd is gone from it, qc is in it.
    let ready = reqwest::get(format!("http://{}/readyz", relay.admin_addr()))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "{:?}", ready.text().await);
    let metrics = relay.metrics().render();
    assert!(metrics.contains("cfq_relay_concurrency{queue=\"qc\"} 5"));
    assert!(
        metrics.contains("cfq_relay_messages_delivered_total{outcome=\"acked\",queue=\"qa\"} 20")
    );

    relay_stop.cancel();
    relay.wait().await.unwrap();
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_changes_nothing() {
    let stop = CancellationToken::new();
    let (emu, api) = emulator(EmulatorOptions::default(), &stop).await;
    let hook = Receiver::start(|_, _| Answer::ok()).await;
    let other = Receiver::start(|_, _| Answer::ok()).await;
    let relay_stop = CancellationToken::new();
    let relay = cfq_relay::start(
        config(&api, "2s", &[C("qa", &hook.url(), 8, "")]),
        relay_stop.clone(),
    )
    .await
    .unwrap();
    publish(&emu, "qa", 10);
    wait_until(Duration::from_secs(10), "first batch acked", || {
        emu.stats("qa").acked == 10
    })
    .await;

    // The token cannot be resolved: refused before anything changes.
    let text = config_text(&api, "2s", &[C("qa", &other.url(), 8, "")]).replace(
        &format!("api_token = \"{TOKEN}\""),
        "api_token_file = \"/nonexistent/cfq-relay-token\"",
    );
    let err = relay
        .reload(Config::from_toml(&text).unwrap())
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("`cloudflare.api_token_file` cannot be read"),
        "{err:#}"
    );

    // One consumer builds, the next does not (unreadable secret): all or nothing.
    let bad = config(
        &api,
        "2s",
        &[
            C("qb", &other.url(), 8, ""),
            C(
                "qa",
                &other.url(),
                8,
                "bearer_token_file = \"/nonexistent/bearer\"",
            ),
        ],
    );
    let err = relay.reload(bad).await.unwrap_err();
    assert!(format!("{err:#}").contains("bearer_token_file"), "{err:#}");
    publish(&emu, "qb", 3);

    publish(&emu, "qa", 10);
    wait_until(Duration::from_secs(10), "second batch acked", || {
        emu.stats("qa").acked == 20
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.count(), 20, "qa still delivers to its old webhook");
    assert_eq!(other.count(), 0);
    assert_eq!(emu.stats("qb").pull_calls, 0, "qb was never started");
    assert!(
        !relay.metrics().render().contains("queue=\"qb\""),
        "no series left behind by the refused reload"
    );

    // A good reload after the bad ones applies normally.
    let summary = relay
        .reload(config(
            &api,
            "2s",
            &[C("qa", &hook.url(), 8, ""), C("qb", &other.url(), 8, "")],
        ))
        .await
        .unwrap();
    assert_eq!(summary.added, names(&["qb"]));
    assert_eq!(summary.unchanged, names(&["qa"]));
    wait_until(Duration::from_secs(10), "qb acked", || {
        emu.stats("qb").acked == 3
    })
    .await;

    // Settings that only apply at a restart are reported, not half-applied.
    let mut moved = config(
        &api,
        "2s",
        &[C("qa", &hook.url(), 8, ""), C("qb", &other.url(), 8, "")],
    );
    moved.admin.listen = "127.0.0.1:1".parse().unwrap();
    let summary = relay.reload(moved).await.unwrap();
    assert_eq!(summary.needs_restart, names(&["admin"]));
    assert_eq!(summary.unchanged, names(&["qa", "qb"]));
    let health = reqwest::get(format!("http://{}/healthz", relay.admin_addr()))
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "the admin server stays where it was");

    relay_stop.cancel();
    relay.wait().await.unwrap();
    for q in ["qa", "qb"] {
        for book in emu.books(q) {
            assert_eq!(book.acks, 1, "{q}: {book:?}");
        }
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_cloudflare_section_restarts_every_consumer() {
    let stop = CancellationToken::new();
    let (emu, api) = emulator(EmulatorOptions::default(), &stop).await;
    let hook = Receiver::start(|_, _| Answer::ok()).await;
    let relay_stop = CancellationToken::new();
    let url = hook.url();
    let consumers = |h| [C("qa", h, 4, ""), C("qb", h, 4, "")];
    let relay = cfq_relay::start(config(&api, "2s", &consumers(&url)), relay_stop.clone())
        .await
        .unwrap();
    let text = config_text(&api, "2s", &consumers(&url))
        .replace("[admin]", "api_timeout = \"20s\"\n[admin]");
    let summary = relay
        .reload(Config::from_toml(&text).unwrap())
        .await
        .unwrap();
    assert_eq!(summary.changed, names(&["qa", "qb"]));
    assert!(summary.unchanged.is_empty());
    publish(&emu, "qa", 5);
    publish(&emu, "qb", 5);
    wait_until(Duration::from_secs(10), "acked after the restart", || {
        emu.stats("qa").acked == 5 && emu.stats("qb").acked == 5
    })
    .await;
    relay_stop.cancel();
    relay.wait().await.unwrap();
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_file_restarts_its_consumer() {
    let stop = CancellationToken::new();
    let (emu, api) = emulator(EmulatorOptions::default(), &stop).await;
    let hook = Receiver::start(|_, _| Answer::ok()).await;
    let dir = TempDir::new("rotate");
    let token = dir.0.join("bearer");
    std::fs::write(&token, "first-secret\n").unwrap();
    let extra = format!("bearer_token_file = {:?}", token.display().to_string());
    let url = hook.url();
    let consumers = [C("qa", &url, 4, &extra), C("qb", &url, 4, "")];
    let relay_stop = CancellationToken::new();
    let relay = cfq_relay::start(config(&api, "2s", &consumers), relay_stop.clone())
        .await
        .unwrap();
    publish(&emu, "qa", 1);
    wait_until(Duration::from_secs(10), "first acked", || {
        emu.stats("qa").acked == 1
    })
    .await;

    // Same config, same file name, new content: qa restarts with the new secret.
    let summary = relay.reload(config(&api, "2s", &consumers)).await.unwrap();
    assert!(summary.changed.is_empty(), "nothing changed yet: {summary}");
    std::fs::write(&token, "second-secret\n").unwrap();
    let summary = relay.reload(config(&api, "2s", &consumers)).await.unwrap();
    assert_eq!(summary.changed, names(&["qa"]));
    assert_eq!(summary.unchanged, names(&["qb"]));
    publish(&emu, "qa", 1);
    wait_until(Duration::from_secs(10), "second acked", || {
        emu.stats("qa").acked == 2
    })
    .await;
    let auth: Vec<String> = hook
        .received()
        .iter()
        .map(|r| r.header("authorization").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(auth, ["Bearer first-secret", "Bearer second-secret"]);
    relay_stop.cancel();
    relay.wait().await.unwrap();
    stop.cancel();
}

// ---- the real binary ----

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("cfq-relay-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

async fn log_contains(path: &Path, what: &str) {
    let path = path.to_owned();
    wait_until(Duration::from_secs(10), what, || {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .contains(what)
    })
    .await;
}

/// Reads systemd notifications (`sd_notify`) the binary sends to `NOTIFY_SOCKET`.
struct Notifications(tokio::net::UnixDatagram);

impl Notifications {
    /// The next datagram that contains `want`; panics after 10 s.
    async fn expect(&self, want: &str) -> String {
        let mut buf = vec![0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let n = tokio::time::timeout_at(deadline, self.0.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {want} notification"))
                .unwrap();
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.lines().any(|l| l == want) {
                return msg;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file_and_a_bad_edit_keeps_the_running_config() {
    let stop = CancellationToken::new();
    let (emu, api) = emulator(EmulatorOptions::default(), &stop).await;
    let hook = Receiver::start(|_, _| Answer::ok()).await;
    let dir = TempDir::new("sighup");
    let path = dir.0.join("config.toml");
    let log = dir.0.join("stderr.log");
    let notify = Notifications(tokio::net::UnixDatagram::bind(dir.0.join("notify.sock")).unwrap());
    let url = hook.url();
    std::fs::write(&path, config_text(&api, "2s", &[C("q1", &url, 4, "")])).unwrap();

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cfq-relay"))
        .arg("run")
        .arg("--config")
        .arg(&path)
        .env_remove("CLOUDFLARE_API_TOKEN")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("RUST_LOG")
        .env("NOTIFY_SOCKET", dir.0.join("notify.sock"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    notify.expect("READY=1").await;

    publish(&emu, "q1", 5);
    wait_until(Duration::from_secs(10), "q1 acked", || {
        emu.stats("q1").acked == 5
    })
    .await;

    // Add a consumer in the file and send SIGHUP.
    std::fs::write(
        &path,
        config_text(&api, "2s", &[C("q1", &url, 4, ""), C("q2", &url, 4, "")]),
    )
    .unwrap();
    signal(pid, "HUP");
    let reloading = notify.expect("RELOADING=1").await;
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    notify.expect("READY=1").await;
    log_contains(
        &log,
        "added: q2; changed: none; removed: none; unchanged: q1",
    )
    .await;
    publish(&emu, "q2", 5);
    wait_until(Duration::from_secs(10), "q2 acked", || {
        emu.stats("q2").acked == 5
    })
    .await;

    // A broken edit: refused with the key named, and both consumers keep running.
    std::fs::write(
        &path,
        config_text(&api, "2s", &[C("q1", &url, 0, ""), C("q2", &url, 4, "")]),
    )
    .unwrap();
    signal(pid, "HUP");
    notify.expect("READY=1").await;
    log_contains(&log, "configuration reload failed").await;
    log_contains(
        &log,
        "`consumers[0].concurrency` must be between 1 and 10000",
    )
    .await;
    publish(&emu, "q1", 5);
    publish(&emu, "q2", 5);
    wait_until(Duration::from_secs(10), "still delivering", || {
        emu.stats("q1").acked == 10 && emu.stats("q2").acked == 10
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "still running");

    signal(pid, "TERM");
    notify.expect("STOPPING=1").await;
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(hook.count(), 20);
    for q in ["q1", "q2"] {
        for book in emu.books(q) {
            assert_eq!(book.acks, 1, "{q}: {book:?}");
        }
    }
    stop.cancel();
}
