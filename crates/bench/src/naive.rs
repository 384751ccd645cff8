//! The naive sequential consumer (`cfq-bench naive`), as in Cloudflare's pull-consumer example:
//! pull a batch, POST its messages one by one, ack the batch. The benchmark's floor.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::api::Api;

/// Consume `queue` into `webhook` until `messages` are delivered, `max` has passed or 50 pulls
/// came back empty. Returns the messages delivered and the seconds it took.
pub async fn naive(
    api: &Api,
    queue: &str,
    webhook: &str,
    messages: usize,
    max: Duration,
) -> anyhow::Result<(usize, f64)> {
    let started = Instant::now();
    let pull_url = api.queue_url(queue, "/pull");
    let ack_url = api.queue_url(queue, "/ack");
    let mut delivered = 0usize;
    let mut empty_pulls = 0;
    while delivered < messages && started.elapsed() < max && empty_pulls < 50 {
        let pulled = api
            .post(
                &pull_url,
                &json!({"batch_size": 100, "visibility_timeout_ms": 60_000}),
            )
            .await?;
        let batch = pulled["result"]["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if batch.is_empty() {
            empty_pulls += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let mut acks = Vec::new();
        let mut retries = Vec::new();
        for m in batch {
            let lease = m["lease_id"].as_str().unwrap_or_default().to_owned();
            let body = m["body"].as_str().unwrap_or_default().to_owned();
            let ct = m["metadata"]["CF-Content-Type"].as_str();
            let ok = match cfq_relay::delivery::decode_body(ct, body) {
                Ok(p) => api
                    .http
                    .post(webhook)
                    .header("content-type", p.content_type)
                    .body(p.bytes)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success()),
                Err(_) => false,
            };
            if ok {
                acks.push(json!({"lease_id": lease}));
                delivered += 1;
            } else {
                retries.push(json!({"lease_id": lease, "delay_seconds": 0}));
            }
        }
        api.post(&ack_url, &json!({"acks": acks, "retries": retries}))
            .await?;
    }
    Ok((delivered, started.elapsed().as_secs_f64()))
}
