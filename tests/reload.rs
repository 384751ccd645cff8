//! Config reload (SIGHUP): consumers added, changed or removed are drained and (re)started,
//! unchanged ones keep running, nothing in flight is lost, and a bad config changes nothing.
//! Library tests drive `Running::reload`; the last test sends SIGHUP to the real binary.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use cfq_emulator::EmulatorOptions;
use cfq_relay::{Config, ReloadSummary};
use support::{
    Answer, Cfg, ConsumerCfg, Hook, RelayProcess, emulator, publish, start, temp_file, temp_path,
    wait_until,
};
use tokio_util::sync::CancellationToken;

/// One consumer: queue id, webhook URL, concurrency, more webhook keys; idle pulls 100 ms
/// apart.
fn consumer(queue: &str, hook: &str, concurrency: usize, webhook: &str) -> ConsumerCfg {
    ConsumerCfg::new(queue, hook)
        .concurrency(concurrency)
        .idle("100ms")
        .webhook(webhook)
}

fn cfg(api: &str, grace: &'static str, consumers: &[ConsumerCfg]) -> Cfg {
    consumers
        .iter()
        .fold(Cfg::new(api).grace(grace), |cfg, c| cfg.consumer(c.clone()))
}

fn ids(hooks: &[&Hook]) -> Vec<String> {
    hooks.iter().flat_map(|h| h.ids()).collect()
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_change_remove_while_delivering_loses_nothing() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    // qa: unchanged by the reload, each delivery takes longer than the 2 s grace period: were
    // it drained, its deliveries would be abandoned and redelivered.
    let hook_a = Hook::start(|_, _| Answer::ok().delayed(Duration::from_secs(3))).await;
    // qb: changed (new webhook); qd: removed. Both slow enough to be busy at the reload.
    let hook_b = Hook::start(|_, _| Answer::ok().delayed(Duration::from_millis(300))).await;
    let hook_b2 = Hook::start(|_, _| Answer::ok()).await;
    let hook_d = Hook::start(|_, _| Answer::ok().delayed(Duration::from_millis(300))).await;
    // qc: added.
    let hook_c = Hook::start(|_, _| Answer::ok()).await;

    let a = publish(&emu, "qa", "qa", 20);
    let b = publish(&emu, "qb", "qb", 50);
    let c = publish(&emu, "qc", "qc", 30);
    publish(&emu, "qd", "qd", 50);

    let before = cfg(
        &api,
        "2s",
        &[
            consumer("qa", &hook_a.url(), 20, ""),
            consumer("qb", &hook_b.url(), 5, ""),
            consumer("qd", &hook_d.url(), 5, ""),
        ],
    )
    .config();
    let relay = start(before).await;
    wait_until(Duration::from_secs(10), "deliveries in flight", || {
        hook_a.count() == 20 && hook_b.count() >= 5 && hook_d.count() >= 5
    })
    .await;
    assert_eq!(emu.stats("qc").pull_calls, 0, "qc is not configured yet");

    let after = cfg(
        &api,
        "2s",
        &[
            consumer("qa", &hook_a.url(), 20, ""),
            consumer("qb", &hook_b2.url(), 5, ""),
            consumer("qc", &hook_c.url(), 5, ""),
        ],
    )
    .config();
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

    relay.stop().await;
}

/// Two reloads in a row change a consumer twice while its first version still drains: the
/// third version starts only once the first has finished (the second never ran), so two
/// versions never deliver side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_changed_twice_while_draining_waits_for_the_first() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hook_a = Hook::start(|_, _| Answer::ok().delayed(Duration::from_secs(2))).await;
    let hook_b = Hook::start(|_, _| Answer::ok()).await;
    let hook_c = Hook::start(|_, _| Answer::ok()).await;
    publish(&emu, "qa", "qa", 20);
    let version = |hook: &Hook| cfg(&api, "10s", &[consumer("qa", &hook.url(), 4, "")]).config();
    let relay = start(version(&hook_a)).await;
    wait_until(Duration::from_secs(10), "4 deliveries in flight", || {
        hook_a.count() == 4
    })
    .await;
    relay.reload(version(&hook_b)).await.unwrap();
    relay.reload(version(&hook_c)).await.unwrap();
    wait_until(Duration::from_secs(20), "all acked", || {
        emu.stats("qa").acked == 20
    })
    .await;
    relay.stop().await;
    assert_eq!(hook_a.count(), 4);
    assert_eq!(hook_b.count(), 0, "the second version never ran");
    // The first version's deliveries were answered 2 s after they arrived.
    let last_a = hook_a.received().iter().map(|r| r.at).max().unwrap();
    let first_c = hook_c.received().iter().map(|r| r.at).min().unwrap();
    assert!(
        first_c.saturating_duration_since(last_a) >= Duration::from_millis(1900),
        "the third version delivered {:?} after the first's last delivery began, while it was in flight",
        first_c.saturating_duration_since(last_a)
    );
}

/// A consumer removed by a reload and added back by the next one while it still drains: the
/// new one starts only once the old one has finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_removed_and_added_back_while_draining_waits_for_the_old_one() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hook_a = Hook::start(|_, _| Answer::ok().delayed(Duration::from_secs(2))).await;
    let hook_c = Hook::start(|_, _| Answer::ok()).await;
    let other = Hook::start(|_, _| Answer::ok()).await;
    publish(&emu, "qa", "qa", 20);
    let relay = start(cfg(&api, "10s", &[consumer("qa", &hook_a.url(), 4, "")]).config()).await;
    wait_until(Duration::from_secs(10), "4 deliveries in flight", || {
        hook_a.count() == 4
    })
    .await;
    let without = cfg(&api, "10s", &[consumer("qo", &other.url(), 4, "")]).config();
    let back = cfg(
        &api,
        "10s",
        &[
            consumer("qo", &other.url(), 4, ""),
            consumer("qa", &hook_c.url(), 4, ""),
        ],
    )
    .config();
    assert_eq!(relay.reload(without).await.unwrap().removed, names(&["qa"]));
    assert_eq!(relay.reload(back).await.unwrap().added, names(&["qa"]));
    wait_until(Duration::from_secs(20), "all acked", || {
        emu.stats("qa").acked == 20
    })
    .await;
    relay.stop().await;
    assert_eq!(hook_a.count(), 4);
    let last_a = hook_a.received().iter().map(|r| r.at).max().unwrap();
    let first_c = hook_c.received().iter().map(|r| r.at).min().unwrap();
    assert!(
        first_c.saturating_duration_since(last_a) >= Duration::from_millis(1900),
        "the new consumer delivered {:?} after the old one's last delivery began, while it was in flight",
        first_c.saturating_duration_since(last_a)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_changes_nothing() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hook = Hook::start(|_, _| Answer::ok()).await;
    let other = Hook::start(|_, _| Answer::ok()).await;
    let relay_stop = CancellationToken::new();
    let relay = cfq_relay::start(
        cfg(&api, "2s", &[consumer("qa", &hook.url(), 8, "")]).config(),
        relay_stop.clone(),
    )
    .await
    .unwrap();
    publish(&emu, "qa", "qa", 10);
    wait_until(Duration::from_secs(10), "first batch acked", || {
        emu.stats("qa").acked == 10
    })
    .await;

    // The token cannot be resolved: refused before anything changes.
    let text = cfg(&api, "2s", &[consumer("qa", &other.url(), 8, "")])
        .token(None)
        .text()
        .replace(
            "[admin]",
            "api_token_file = \"/nonexistent/cfq-relay-token\"\n[admin]",
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
    let bad = cfg(
        &api,
        "2s",
        &[
            consumer("qb", &other.url(), 8, ""),
            consumer(
                "qa",
                &other.url(),
                8,
                "bearer_token_file = \"/nonexistent/bearer\"",
            ),
        ],
    )
    .config();
    let err = relay.reload(bad).await.unwrap_err();
    assert!(format!("{err:#}").contains("bearer_token_file"), "{err:#}");
    publish(&emu, "qb", "qb", 3);

    publish(&emu, "qa", "qa", 10);
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
        .reload(
            cfg(
                &api,
                "2s",
                &[
                    consumer("qa", &hook.url(), 8, ""),
                    consumer("qb", &other.url(), 8, ""),
                ],
            )
            .config(),
        )
        .await
        .unwrap();
    assert_eq!(summary.added, names(&["qb"]));
    assert_eq!(summary.unchanged, names(&["qa"]));
    wait_until(Duration::from_secs(10), "qb acked", || {
        emu.stats("qb").acked == 3
    })
    .await;

    // Settings that only apply at a restart are reported, not half-applied.
    let mut moved = cfg(
        &api,
        "2s",
        &[
            consumer("qa", &hook.url(), 8, ""),
            consumer("qb", &other.url(), 8, ""),
        ],
    )
    .config();
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
}

/// The new `[cloudflare]` section points at another API (a second emulator): the restarted
/// consumers pull there, and the old ones stop pulling from the first. A consumer kept running
/// on its old client would go on pulling (and acking) on the first emulator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_cloudflare_section_restarts_every_consumer() {
    let (old_emu, old_api) = emulator(EmulatorOptions::default()).await;
    let (new_emu, new_api) = emulator(EmulatorOptions::default()).await;
    let hook = Hook::start(|_, _| Answer::ok()).await;
    let relay_stop = CancellationToken::new();
    let url = hook.url();
    let consumers = |h| [consumer("qa", h, 4, ""), consumer("qb", h, 4, "")];
    let relay = cfq_relay::start(
        cfg(&old_api, "2s", &consumers(&url)).config(),
        relay_stop.clone(),
    )
    .await
    .unwrap();
    wait_until(Duration::from_secs(10), "both consumers pulling", || {
        old_emu.stats("qa").pull_calls > 0 && old_emu.stats("qb").pull_calls > 0
    })
    .await;
    let text = cfg(&new_api, "2s", &consumers(&url)).text();
    let summary = relay
        .reload(Config::from_toml(&text).unwrap())
        .await
        .unwrap();
    assert_eq!(summary.changed, names(&["qa", "qb"]));
    assert!(summary.unchanged.is_empty());
    publish(&new_emu, "qa", "qa", 5);
    publish(&new_emu, "qb", "qb", 5);
    wait_until(Duration::from_secs(10), "acked after the restart", || {
        new_emu.stats("qa").acked == 5 && new_emu.stats("qb").acked == 5
    })
    .await;
    // The old consumers have drained by now (their successors start only then): from here on
    // the first emulator sees no pull while the new consumers go on polling the second.
    let old_pulls = |q| old_emu.stats(q).pull_calls;
    let before = (old_pulls("qa"), old_pulls("qb"));
    let polled = (
        new_emu.stats("qa").pull_calls,
        new_emu.stats("qb").pull_calls,
    );
    publish(&old_emu, "qa", "qa", 3);
    publish(&old_emu, "qb", "qb", 3);
    wait_until(
        Duration::from_secs(10),
        "five more polls of each queue",
        || {
            new_emu.stats("qa").pull_calls >= polled.0 + 5
                && new_emu.stats("qb").pull_calls >= polled.1 + 5
        },
    )
    .await;
    assert_eq!(
        (old_pulls("qa"), old_pulls("qb")),
        before,
        "an old consumer still pulls from the previous API"
    );
    assert_eq!(
        (
            old_emu.stats("qa").deliveries,
            old_emu.stats("qb").deliveries
        ),
        (0, 0),
        "an old consumer delivered from the previous API"
    );
    relay_stop.cancel();
    relay.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_file_restarts_its_consumer() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hook = Hook::start(|_, _| Answer::ok()).await;
    let token = temp_file("rotate-bearer", "first-secret\n");
    let extra = format!("bearer_token_file = {:?}", token.display().to_string());
    let url = hook.url();
    let consumers = [consumer("qa", &url, 4, &extra), consumer("qb", &url, 4, "")];
    let relay = start(cfg(&api, "2s", &consumers).config()).await;
    publish(&emu, "qa", "qa", 1);
    wait_until(Duration::from_secs(10), "first acked", || {
        emu.stats("qa").acked == 1
    })
    .await;

    // Same config, same file name, new content: qa restarts with the new secret.
    let summary = relay
        .reload(cfg(&api, "2s", &consumers).config())
        .await
        .unwrap();
    assert!(summary.changed.is_empty(), "nothing changed yet: {summary}");
    std::fs::write(&token, "second-secret\n").unwrap();
    let summary = relay
        .reload(cfg(&api, "2s", &consumers).config())
        .await
        .unwrap();
    assert_eq!(summary.changed, names(&["qa"]));
    assert_eq!(summary.unchanged, names(&["qb"]));
    publish(&emu, "qa", "qa", 1);
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
    relay.stop().await;
}

// ---- the real binary ----

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
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hook = Hook::start(|_, _| Answer::ok()).await;
    let socket = temp_path("sighup-notify.sock");
    let _ = std::fs::remove_file(&socket);
    let notify = Notifications(tokio::net::UnixDatagram::bind(&socket).unwrap());
    let url = hook.url();
    let mut relay = RelayProcess::launch(
        "sighup",
        &cfg(&api, "2s", &[consumer("q1", &url, 4, "")]).text(),
    )
    .env("NOTIFY_SOCKET", socket.to_str().unwrap())
    .spawn();
    notify.expect("READY=1").await;

    publish(&emu, "q1", "q1", 5);
    wait_until(Duration::from_secs(10), "q1 acked", || {
        emu.stats("q1").acked == 5
    })
    .await;

    // Add a consumer in the file and send SIGHUP.
    relay.reload_file(
        &cfg(
            &api,
            "2s",
            &[consumer("q1", &url, 4, ""), consumer("q2", &url, 4, "")],
        )
        .text(),
    );
    let reloading = notify.expect("RELOADING=1").await;
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    notify.expect("READY=1").await;
    relay
        .wait_logged("added: q2; changed: none; removed: none; unchanged: q1")
        .await;
    publish(&emu, "q2", "q2", 5);
    wait_until(Duration::from_secs(10), "q2 acked", || {
        emu.stats("q2").acked == 5
    })
    .await;

    // A broken edit: refused with the key named, and both consumers keep running.
    relay.reload_file(
        &cfg(
            &api,
            "2s",
            &[consumer("q1", &url, 0, ""), consumer("q2", &url, 4, "")],
        )
        .text(),
    );
    notify.expect("READY=1").await;
    relay.wait_logged("configuration reload failed").await;
    relay
        .wait_logged("`consumers[0].concurrency` must be between 1 and 10000")
        .await;
    publish(&emu, "q1", "q1", 5);
    publish(&emu, "q2", "q2", 5);
    wait_until(Duration::from_secs(10), "still delivering", || {
        emu.stats("q1").acked == 10 && emu.stats("q2").acked == 10
    })
    .await;
    assert!(relay.running(), "still running");

    relay.signal("TERM");
    notify.expect("STOPPING=1").await;
    let status = relay.exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}\n{}", relay.output());
    assert_eq!(hook.count(), 20);
    for q in ["q1", "q2"] {
        for book in emu.books(q) {
            assert_eq!(book.acks, 1, "{q}: {book:?}");
        }
    }
}

/// A SIGHUP during the drain changes nothing and tells systemd nothing: before, the reload
/// "failed" with an error log ("the relay is shutting down") and the binary then sent
/// READY=1 / STATUS=running after STOPPING=1, while it was still draining.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_during_the_drain_is_ignored() {
    let (emu, api) = emulator(EmulatorOptions::default()).await;
    let hang = Hook::start(|_, _| Answer::ok().delayed(Duration::from_secs(60))).await;
    let socket = temp_path("sighup-drain-notify.sock");
    let _ = std::fs::remove_file(&socket);
    let notify = Notifications(tokio::net::UnixDatagram::bind(&socket).unwrap());
    let text = cfg(
        &api,
        "2s",
        &[consumer("q1", &hang.url(), 4, "").timeout("20s")],
    )
    .text();
    let mut relay = RelayProcess::launch("sighup-drain", &text)
        .env("NOTIFY_SOCKET", socket.to_str().unwrap())
        .spawn();
    notify.expect("READY=1").await;
    publish(&emu, "q1", "m", 1);
    wait_until(Duration::from_secs(10), "a delivery hanging", || {
        hang.count() == 1
    })
    .await;
    relay.signal("TERM");
    notify.expect("STOPPING=1").await;
    relay.reload_file(&text);
    let status = relay.exit(Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}\n{}", relay.output());
    // Every notification sent after STOPPING=1 is in the socket by now.
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = notify.0.try_recv(&mut buf) {
        let msg = String::from_utf8_lossy(&buf[..n]);
        assert!(
            !msg.lines().any(|l| l == "READY=1"),
            "READY=1 while draining: {msg}\n{}",
            relay.output()
        );
    }
    assert!(
        !relay.logged("configuration reload failed"),
        "{}",
        relay.output()
    );
}
