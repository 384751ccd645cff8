//! The emulator's API as the bench uses it: a producer (`publish`, queue creation) and an
//! observer (a queue's counters).

use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures_util::StreamExt;
use serde_json::{Value, json};

/// The account every bench queue lives in (the emulator takes any).
pub const ACCOUNT: &str = "0123456789abcdef0123456789abcdef";
/// The emulator's API token (`cfq-relay emulate --token`).
pub const TOKEN: &str = "bench-token";

/// A client of the emulator's API.
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(base: String) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("a plain HTTP client builds"),
        }
    }

    pub fn queue_url(&self, queue: &str, op: &str) -> String {
        format!(
            "{}/accounts/{ACCOUNT}/queues/{queue}/messages{op}",
            self.base
        )
    }

    pub async fn post(&self, url: &str, body: &Value) -> anyhow::Result<Value> {
        let resp = self
            .http
            .post(url)
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = resp.status();
        let value: Value = resp.json().await.with_context(|| format!("POST {url}"))?;
        if !status.is_success() {
            bail!("POST {url}: {status}: {value}");
        }
        Ok(value)
    }

    /// Create `queue` unless it exists (the emulator, like Cloudflare, answers 404 for a queue
    /// never created).
    pub async fn create_queue(&self, queue: &str) -> anyhow::Result<()> {
        let url = format!("{}/accounts/{ACCOUNT}/queues", self.base);
        let resp = self
            .http
            .post(&url)
            .bearer_auth(TOKEN)
            .json(&json!({"queue_name": queue}))
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = resp.status();
        // 409: it exists already.
        if !status.is_success() && status.as_u16() != 409 {
            let text = resp.text().await.unwrap_or_default();
            bail!("POST {url}: {status}: {text}");
        }
        Ok(())
    }

    /// The emulator's counters of a queue (`published`, `acked`, `pull_calls`, …).
    pub async fn stats(&self, queue: &str) -> anyhow::Result<Value> {
        let url = format!("{}/_emulator/queues/{queue}/stats", self.base);
        let resp = self.http.get(&url).bearer_auth(TOKEN).send().await?;
        Ok(resp.error_for_status()?.json().await?)
    }
}

/// A counter of a JSON object of counters (0 when absent).
pub fn count(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// One message of `size` payload bytes; the content type goes text, json, bytes in turn.
fn message(i: usize, size: usize, bytes_b64: &str) -> Value {
    match i % 3 {
        0 => {
            let mut s = format!("message {i:09} ");
            while s.len() < size {
                s.push_str("lorem ipsum dolor sit amet ");
            }
            s.truncate(size);
            json!({"body": s, "content_type": "text"})
        }
        1 => {
            let head = format!(r#"{{"order":{i},"items":[{{"sku":"A-{i}","qty":2}}],"pad":""#);
            let pad = size.saturating_sub(head.len() + 2);
            let doc = format!("{head}{}\"}}", "x".repeat(pad));
            let value: Value = serde_json::from_str(&doc).unwrap_or(Value::Null);
            json!({"body": value, "content_type": "json"})
        }
        _ => json!({"body": bytes_b64, "content_type": "bytes"}),
    }
}

/// Publish `messages` of `size` payload bytes to `queue` (created if need be), `concurrency`
/// batch calls in flight.
pub async fn publish(
    api: &Api,
    queue: &str,
    messages: usize,
    size: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let raw: Vec<u8> = (0..size).map(|b| (b * 31 % 251) as u8).collect();
    let b64 = STANDARD.encode(raw);
    api.create_queue(queue).await?;
    let url = api.queue_url(queue, "/batch");
    // A batch holds at most 100 messages and 256 KB (each message's ~100 bytes of metadata
    // included); bytes bodies go as base64, but the limit counts the payload.
    let per_batch = (250_000 / (size + 100)).clamp(1, 100);
    let batches: Vec<(usize, usize)> = (0..messages)
        .step_by(per_batch)
        .map(|start| (start, (start + per_batch).min(messages)))
        .collect();
    let mut calls = futures_util::stream::iter(batches)
        .map(|(start, end)| {
            let body = json!({"messages": (start..end).map(|i| message(i, size, &b64)).collect::<Vec<_>>()});
            let url = url.clone();
            async move { api.post(&url, &body).await }
        })
        .buffer_unordered(concurrency.max(1));
    while let Some(done) = calls.next().await {
        done?;
    }
    Ok(())
}
