//! The emulator's test harness: an emulator on 127.0.0.1:0 with a client that speaks its wire
//! format, shared by the tests of every module.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::{ContentType, Emulator, EmulatorOptions};

pub(crate) const TOKEN: &str = "s3cret-token";

/// An emulator on 127.0.0.1:0 and a client for it; the server stops when dropped.
pub(crate) struct Harness {
    pub(crate) emu: Emulator,
    pub(crate) http: reqwest::Client,
    pub(crate) base: String,
    pub(crate) stop: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub(crate) async fn harness(opts: EmulatorOptions) -> Harness {
    let stop = CancellationToken::new();
    let emu = Emulator::new(EmulatorOptions {
        token: Some(TOKEN.into()),
        ..opts
    });
    let addr = emu
        .start(SocketAddr::from(([127, 0, 0, 1], 0)), stop.clone())
        .await
        .expect("emulator starts");
    Harness {
        emu,
        http: client(),
        base: Emulator::base_url(addr),
        stop,
    }
}

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("http client")
}

impl Harness {
    pub(crate) fn url(&self, queue: &str, tail: &str) -> String {
        format!(
            "{}/accounts/acc123/queues/{queue}/messages{tail}",
            self.base
        )
    }

    /// POST a raw body with the right token; status, Retry-After and JSON answer.
    pub(crate) async fn raw(&self, url: &str, body: &str) -> (u16, Option<String>, Value) {
        let resp = self
            .http
            .post(url)
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("answer");
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp.text().await.expect("body");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, retry_after, value)
    }

    pub(crate) async fn post(&self, url: &str, body: Value) -> (u16, Value) {
        let (status, _, v) = self.raw(url, &body.to_string()).await;
        (status, v)
    }

    /// A successful pull's `result`.
    pub(crate) async fn pull(&self, queue: &str, body: Value) -> Value {
        let (status, v) = self.post(&self.url(queue, "/pull"), body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["success"], true, "{v}");
        v["result"].clone()
    }

    /// Pulled messages of a successful pull.
    pub(crate) async fn pull_messages(&self, queue: &str, body: Value) -> Vec<Value> {
        self.pull(queue, body).await["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// A successful ack call's `result`.
    pub(crate) async fn ack(&self, queue: &str, acks: &[&str], retries: &[(&str, u64)]) -> Value {
        let body = json!({
            "acks": acks.iter().map(|l| json!({"lease_id": l})).collect::<Vec<_>>(),
            "retries": retries
                .iter()
                .map(|(l, d)| json!({"lease_id": l, "delay_seconds": d}))
                .collect::<Vec<_>>(),
        });
        let (status, v) = self.post(&self.url(queue, "/ack"), body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["success"], true, "{v}");
        v["result"].clone()
    }
}

pub(crate) fn lease(m: &Value) -> String {
    m["lease_id"].as_str().expect("lease_id").to_owned()
}

pub(crate) fn text(emu: &Emulator, queue: &str, body: &str) -> String {
    emu.publish(
        queue,
        Some(ContentType::Text),
        body.as_bytes(),
        Duration::ZERO,
    )
    .expect("publish")
}

pub(crate) const ACCOUNT: &str = "acc123";

/// An emulator as `cfq-relay emulate` runs it: one account, queues only when created.
pub(crate) async fn strict(queues: &[&str]) -> Harness {
    harness(EmulatorOptions {
        account_id: Some(ACCOUNT.into()),
        queues: queues.iter().map(|q| (*q).to_owned()).collect(),
        create_queues_on_use: false,
        ..EmulatorOptions::default()
    })
    .await
}

impl Harness {
    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, url).bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("answer");
        let st = resp.status().as_u16();
        (st, resp.json().await.unwrap_or(Value::Null))
    }

    /// `POST …/queues` creating `name` in [`ACCOUNT`]: status and answer.
    pub(crate) async fn create(&self, name: &str) -> (u16, Value) {
        let body = json!({ "queue_name": name });
        let url = self.queues_url(ACCOUNT, "");
        self.call(reqwest::Method::POST, &url, Some(body)).await
    }

    pub(crate) fn queues_url(&self, account: &str, tail: &str) -> String {
        format!("{}/accounts/{account}/queues{tail}", self.base)
    }
}
