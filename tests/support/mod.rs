//! The one test kit of the integration tests (`mod support;` in each): the webhook sink, the
//! emulator and its books, the typed config builder, the relay as a child process, and the ways
//! to wait and to read metrics, each once.
//!
//! - [`hook`]: the webhook sink a test scripts ([`Hook`], [`Answer`], [`Received`], [`Tally`]).
//! - [`config`]: [`Cfg`] and [`ConsumerCfg`], the one way to write a relay config.
//! - [`child`]: [`RelayProcess`], `cfq-relay run` in a child process; [`bin`] for the other
//!   commands.
//! - [`books`]: the emulator on `127.0.0.1:0`, publishing, and a scenario's [`EndState`].
//! - [`inproc`]: the relay in the test's process (`cfq_relay::start`), stopped on request.
//! - this file: waiting on a condition, HTTP probes and reading the Prometheus text.
// Each test binary compiles the kit on its own and uses a part of it.
#![allow(dead_code, unused_imports)]

pub mod books;
pub mod child;
pub mod config;
pub mod hook;
pub mod inproc;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

pub use books::{
    EndState, TestEmulator, assert_books, assert_handed_back, emulator, publish, publish_and_ack,
    publish_text,
};
pub use child::{RelayProcess, bin, check_config, temp_file, temp_path};
pub use config::{Cfg, ConsumerCfg, config, one_consumer};
pub use hook::{Answer, Hook, RawRequest, Received, Tally, ok_hook};
pub use inproc::{InProcess, start};

/// The API token every test emulator accepts.
pub const TOKEN: &str = "test-token-7f3a9c";
/// The account of the test configs.
pub const ACCOUNT: &str = "0123456789abcdef0123456789abcdef";

/// Poll `cond` every 10 ms until it holds; panics naming `what` once `limit` (tokio time) passed.
pub async fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(limit, what, || std::future::ready(cond())).await;
}

/// [`wait_until`] for a condition that has to await (an HTTP probe, a scrape).
pub async fn wait_for<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The status of a GET of `url`; 0 when there was no answer.
pub async fn http_status(url: &str) -> u16 {
    match reqwest::get(url).await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// Status and body of a GET of `path` on `addr`; panics when nothing answers.
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let resp = reqwest::get(format!("http://{addr}{path}"))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// The Prometheus text of a relay's admin server.
pub async fn scrape(admin: SocketAddr) -> String {
    let (status, text) = get(admin, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    text
}

/// The value of one sample of the Prometheus text `text`: metric `name` whose label set
/// contains every pair of `labels` (the sum of all that match; 0 if none does).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `cfq_relay_messages_delivered_total` of one outcome (all queues).
pub fn delivered(text: &str, outcome: &str) -> f64 {
    metric(
        text,
        "cfq_relay_messages_delivered_total",
        &[("outcome", outcome)],
    )
}

/// `cfq_relay_messages_released_total` of one reason (all queues).
pub fn released(text: &str, reason: &str) -> f64 {
    metric(
        text,
        "cfq_relay_messages_released_total",
        &[("reason", reason)],
    )
}

/// `cfq_relay_api_requests_total` of one API operation and result (all queues).
pub fn api_requests(text: &str, op: &str, result: &str) -> f64 {
    metric(
        text,
        "cfq_relay_api_requests_total",
        &[("op", op), ("result", result)],
    )
}
