//! `cfq-relay check-config --online` (the real binary) against the bundled emulator run as
//! `cfq-relay emulate` runs it (one account, queues only when created): one test per failure,
//! each a line naming the consumer, and never a pull.

mod common;

use std::path::PathBuf;

use cfq_emulator::{Emulator, EmulatorOptions};
use common::{ACCOUNT, TOKEN};
use tokio_util::sync::CancellationToken;

/// The emulator as `emulate --queue orders --queue audit` runs it; `bare` exists too, created
/// through the API without a consumer.
async fn emulator(stop: &CancellationToken) -> (Emulator, String) {
    let (emu, api) = common::emulator(
        EmulatorOptions {
            account_id: Some(ACCOUNT.into()),
            queues: vec!["orders".into(), "audit".into()],
            create_queues_on_use: false,
            ..EmulatorOptions::default()
        },
        stop,
    )
    .await;
    let resp = reqwest::Client::new()
        .post(format!("{api}/accounts/{ACCOUNT}/queues"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"queue_name": "bare"}))
        .send()
        .await
        .expect("create queue");
    assert_eq!(resp.status(), 200);
    (emu, api)
}

fn config(name: &str, api: &str, account: &str, token: &str, queues: &[(&str, &str)]) -> PathBuf {
    let mut text = format!(
        "[cloudflare]\naccount_id = \"{account}\"\napi_base_url = \"{api}\"\napi_token = \"{token}\"\napi_timeout = \"2s\"\n"
    );
    for (label, queue) in queues {
        text.push_str(&format!(
            "[[consumers]]\nname = \"{label}\"\nqueue_id = \"{queue}\"\n[consumers.webhook]\nurl = \"http://127.0.0.1:9/{label}\"\n"
        ));
    }
    let dir = std::env::temp_dir().join(format!("cfq-relay-online-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    // It holds a token: readable by its owner only (else check-config warns, rightly).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Exit code, stdout, stderr.
async fn check(path: &PathBuf) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cfq-relay"))
        .env_remove("CLOUDFLARE_API_TOKEN")
        .env_remove("RUST_LOG")
        .args(["check-config", "--online", "--config"])
        .arg(path)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_when_every_queue_exists_with_an_http_pull_consumer() {
    let stop = CancellationToken::new();
    let (emu, api) = emulator(&stop).await;
    let id = emu.queue_id("audit").unwrap();
    // By name (an emulator convenience) and by id (as on Cloudflare).
    let path = config(
        "ok.toml",
        &api,
        ACCOUNT,
        TOKEN,
        &[("o", "orders"), ("a", &id)],
    );
    let (code, out, err) = check(&path).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("online: the token works"), "{out}");
    for q in ["orders", "audit"] {
        assert_eq!(
            emu.stats(q).pull_calls,
            0,
            "no pull: it would lease messages"
        );
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_one_line_per_consumer_without_the_token() {
    let stop = CancellationToken::new();
    let (_emu, api) = emulator(&stop).await;
    let path = config(
        "token.toml",
        &api,
        ACCOUNT,
        "wrong-secret-token",
        &[("o", "orders"), ("a", "audit")],
    );
    let (code, _, err) = check(&path).await;
    assert_eq!(code, 1, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].contains("consumer \"o\"")
            && lines[0].contains("API token was refused (HTTP 403)"),
        "{err}"
    );
    assert!(lines[1].contains("consumer \"a\""), "{err}");
    assert!(!err.contains("wrong-secret-token"), "{err}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_account_is_named() {
    let stop = CancellationToken::new();
    let (_emu, api) = emulator(&stop).await;
    let path = config(
        "account.toml",
        &api,
        "ffffffffffffffffffffffffffffffff",
        TOKEN,
        &[("o", "orders")],
    );
    let (code, _, err) = check(&path).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.trim().ends_with("account \"ffffffffffffffffffffffffffffffff\" was not found (or the token cannot see it): check `cloudflare.account_id`")
            && err.contains("consumer \"o\""),
        "{err}"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_queue_and_a_queue_without_http_pull_consumer_are_named() {
    let stop = CancellationToken::new();
    let (emu, api) = emulator(&stop).await;
    let path = config(
        "queues.toml",
        &api,
        ACCOUNT,
        TOKEN,
        &[
            ("good", "orders"),
            ("typo", "ordres"),
            ("workers-only", "bare"),
        ],
    );
    let (code, _, err) = check(&path).await;
    assert_eq!(code, 1, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "one line per failing consumer: {err}");
    assert!(
        lines[0].contains("consumer \"typo\": queue_id \"ordres\" does not exist"),
        "{err}"
    );
    assert!(
        lines[1].contains("consumer \"workers-only\": queue \"bare\" has no HTTP pull consumer"),
        "{err}"
    );
    assert_eq!(emu.stats("bare").pull_calls, 0);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_is_named() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let api = format!("http://127.0.0.1:{port}/client/v4");
    let path = config("down.toml", &api, ACCOUNT, TOKEN, &[("o", "orders")]);
    let (code, _, err) = check(&path).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("consumer \"o\": cannot reach the API at http://127.0.0.1:"),
        "{err}"
    );
}

/// `cfq-relay emulate --queue NAME` (repeatable): those queues exist, each with an HTTP pull
/// consumer, and `check-config --online` passes against them; any other queue, or another
/// account, answers 404 / 10104.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulate_creates_the_queues_it_is_given() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cfq-relay"))
        .args(["emulate", "--listen", "127.0.0.1:0", "--token", TOKEN])
        .args(["--queue", "orders", "--queue", "audit"])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut head = Vec::new();
    for _ in 0..3 {
        let line = tokio::time::timeout(std::time::Duration::from_secs(20), lines.next_line())
            .await
            .expect("the emulator prints its address and queues")
            .unwrap()
            .unwrap_or_default();
        head.push(line);
    }
    let api = head[0]
        .split('"')
        .nth(1)
        .expect("api_base_url = \"…\"")
        .to_owned();
    assert!(
        head[0].contains(&format!("account_id = \"{ACCOUNT}\"")),
        "{head:?}"
    );
    assert!(
        head[1].starts_with("queue \"orders\": queue_id = \""),
        "{head:?}"
    );
    assert!(
        head[2].starts_with("queue \"audit\": queue_id = \""),
        "{head:?}"
    );

    let http = reqwest::Client::new();
    let get = |url: String| {
        let req = http.get(url).bearer_auth(TOKEN);
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (st, v) = get(format!("{api}/accounts/{ACCOUNT}/queues")).await;
    assert_eq!(st, 200, "{v}");
    let names: Vec<&str> = v["result"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|q| q["queue_name"].as_str())
        .collect();
    assert_eq!(names, ["audit", "orders"]);
    let (st, v) = get(format!("{api}/accounts/{ACCOUNT}/queues/orders/consumers")).await;
    assert_eq!(
        (st, &v["result"][0]["type"]),
        (200, &serde_json::json!("http_pull")),
        "{v}"
    );
    for url in [
        format!("{api}/accounts/{ACCOUNT}/queues/dev-queue"),
        format!("{api}/accounts/ffffffffffffffffffffffffffffffff/queues/orders"),
    ] {
        let (st, v) = get(url).await;
        assert_eq!(
            (st, &v["errors"][0]["code"]),
            (404, &serde_json::json!(10104)),
            "{v}"
        );
    }

    let path = config(
        "emulate.toml",
        &api,
        ACCOUNT,
        TOKEN,
        &[("o", "orders"), ("a", "audit")],
    );
    let (code, out, err) = check(&path).await;
    assert_eq!(code, 0, "{out}{err}");
    let path = config(
        "emulate-typo.toml",
        &api,
        ACCOUNT,
        TOKEN,
        &[("d", "dev-queue")],
    );
    let (code, _, err) = check(&path).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("consumer \"d\": queue_id \"dev-queue\" does not exist"),
        "{err}"
    );
    child.kill().await.unwrap();
}
