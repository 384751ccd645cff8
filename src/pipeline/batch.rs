//! Batch delivery (`[consumers.webhook.batch]`): many messages per webhook request, with a
//! result per message. The batcher groups one consumer's pulled messages (up to
//! `max_messages` / `max_bytes`, never held past `max_wait` nor past the point where a lease
//! could no longer cover the request and the ack); `deliver` POSTs a batch as
//! `{"messages": [...]}`, signed over the whole body, and turns the answer into one verdict per
//! message: a 2xx acks all but the ids listed in `{"failed": [...]}`, any other answer applies
//! the status policy to the whole batch.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, warn};

use crate::logs::{Event, esc};
use crate::pipeline::acker::AckKind;
use crate::pipeline::ctx::DeliveryCtx;
use crate::pipeline::policy::{Decision, backoff, delay_seconds, jitter};
use crate::pipeline::worker::{
    InFlight, Refused, breaker_changed, decode_checked, headroom, hold_back, judge, observe_age,
    pause, release, sample, settle, to_acker,
};
use crate::telemetry::ReleaseReason;
use crate::webhook::Attempt;
use crate::webhook::delivery::{Message, Response};

pub use crate::config::BatchConfig;
pub use crate::webhook::delivery::{HEADER_BATCH_ID, HEADER_BATCH_SIZE};

/// A pulled message on its way into a batch, with its place in the pool.
pub struct Held {
    pub msg: Message,
    pub slot: OwnedSemaphorePermit,
}

/// A message in a batch: its metadata, its slot, and its encoded JSON entry.
struct Entry {
    msg: Message,
    slot: OwnedSemaphorePermit,
    json: Vec<u8>,
}

/// `{"id", "attempts", "timestamp_ms", "content_type", "body"}` with `body` the base64 of the
/// message's original bytes (decoded by content type, so byte-exact for every type).
fn encode_entry(msg: &Message, bytes: &[u8]) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Item<'a> {
        id: &'a str,
        attempts: u32,
        timestamp_ms: Option<u64>,
        content_type: Option<&'a str>,
        body: String,
    }
    serde_json::to_vec(&Item {
        id: &msg.id,
        attempts: msg.attempts,
        timestamp_ms: msg.timestamp_ms,
        content_type: msg.content_type.as_deref(),
        body: STANDARD.encode(bytes),
    })
    .unwrap_or_default()
}

/// The request body for entries already encoded.
fn encode_body<'a>(entries: impl Iterator<Item = &'a [u8]>) -> Bytes {
    let mut body = Vec::from(&b"{\"messages\":["[..]);
    for (i, e) in entries.enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(e);
    }
    body.extend_from_slice(b"]}");
    Bytes::from(body)
}

/// Bytes of the body around the entries, and per entry separator.
const BODY_OVERHEAD: usize = b"{\"messages\":[]}".len();

/// A stable id for a batch: the same messages in the same order give the same id (a
/// redelivered batch may hold other messages, so receivers deduplicate by message id).
pub fn batch_id<'a>(ids: impl Iterator<Item = &'a str>) -> String {
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.as_bytes());
        h.update(b"\n");
    }
    format!("batch_{}", URL_SAFE_NO_PAD.encode(&h.finalize()[..18]))
}

/// What a 2xx answer's body says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchAnswer {
    /// No body, a body that is not JSON, or JSON without `failed`: every message is delivered.
    AllDelivered,
    /// These ids must be retried; the others are delivered.
    Failed(Vec<String>),
    /// `failed` is present but not a list of strings: the receiver meant something the relay
    /// cannot read, so nothing is taken as delivered.
    Unreadable,
}

/// Read a 2xx answer's body (`complete`: it was read to its end). A body that starts like a
/// JSON object but does not parse (or broke off) is unreadable: it may have listed failures.
/// So is one that broke off (or did not end in time) before its first byte.
pub fn parse_answer(body: &[u8], complete: bool) -> BatchAnswer {
    let start = body.trim_ascii_start();
    let object = start.starts_with(b"{") || (!complete && start.is_empty());
    let failed = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut map)) if complete => map.remove("failed"),
        _ if object => return BatchAnswer::Unreadable,
        _ => return BatchAnswer::AllDelivered,
    };
    match failed {
        None | Some(serde_json::Value::Null) => BatchAnswer::AllDelivered,
        Some(serde_json::Value::Array(items)) => {
            let mut ids = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    serde_json::Value::String(s) => ids.push(s),
                    _ => return BatchAnswer::Unreadable,
                }
            }
            BatchAnswer::Failed(ids)
        }
        Some(_) => BatchAnswer::Unreadable,
    }
}

/// Split `deadlines` (in batch order) into the indexes that may still be sent at `now` (the
/// request and the ack fit before their lease ends: `need`) and those to hand back.
pub fn split_by_lease(
    deadlines: impl Iterator<Item = Instant>,
    now: Instant,
    need: Duration,
) -> (Vec<usize>, Vec<usize>) {
    let mut send = Vec::new();
    let mut back = Vec::new();
    for (i, d) in deadlines.enumerate() {
        if now + need > d {
            back.push(i);
        } else {
            send.push(i);
        }
    }
    (send, back)
}

/// The batcher of one consumer: groups what the poller sends until the batch is full, its
/// first message waited `max_wait`, or its earliest lease must leave; runs until the poller
/// drops its sender. After shutdown began every partial batch leaves at once.
pub async fn batcher(ctx: Arc<DeliveryCtx>, mut rx: mpsc::Receiver<Held>) {
    let Some(cfg) = ctx.batch.clone() else {
        return;
    };
    let max_messages = cfg.max_messages.max(1);
    // A batch leaves one more margin before the point where its earliest lease could no
    // longer cover the request and the ack: room to wait for a request slot.
    let need = ctx.timeout + ctx.lease_margin * 2;
    let mut pending: Vec<Entry> = Vec::with_capacity(max_messages);
    let mut size = BODY_OVERHEAD;
    // When the first pending message arrived, and the earliest pending lease end.
    let mut first: Option<Instant> = None;
    let mut earliest: Option<Instant> = None;
    let mut open = true;
    while open || !pending.is_empty() {
        let flush_at = first.map(|f| {
            let by_wait = f + cfg.max_wait;
            earliest
                .and_then(|d| d.checked_sub(need))
                .map_or(by_wait, |l| by_wait.min(l))
        });
        let shutting = ctx.shutdown.is_cancelled();
        tokio::select! {
            biased;
            _ = sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {
                flush(&ctx, &mut pending, &mut size);
                (first, earliest) = (None, None);
            }
            _ = ctx.shutdown.cancelled(), if !shutting && !pending.is_empty() => {
                // Drain: the partial batch goes now, within the grace period.
                flush(&ctx, &mut pending, &mut size);
                (first, earliest) = (None, None);
            }
            held = rx.recv(), if open => {
                let Some(Held { mut msg, slot }) = held else {
                    open = false;
                    flush(&ctx, &mut pending, &mut size);
                    (first, earliest) = (None, None);
                    continue;
                };
                // Refused before any request, as for single deliveries: an undecodable or
                // oversized body (the id travels inside the JSON body, escaped, so any id
                // can; crate::webhook::guard).
                let payload = match decode_checked(&mut msg) {
                    Ok(p) => p,
                    Err(refused) => {
                        refuse(&ctx, msg, refused).await;
                        ctx.limiter.release(slot);
                        continue;
                    }
                };
                let json = encode_entry(&msg, &payload.bytes);
                drop(payload);
                let add = json.len() + usize::from(!pending.is_empty());
                if let Some(cap) = cfg.max_bytes
                    && !pending.is_empty()
                    && size + add > cap
                {
                    flush(&ctx, &mut pending, &mut size);
                    (first, earliest) = (None, None);
                }
                size += json.len() + usize::from(!pending.is_empty());
                first.get_or_insert_with(Instant::now);
                earliest = Some(earliest.map_or(msg.deadline, |e| e.min(msg.deadline)));
                pending.push(Entry { msg, slot, json });
                if pending.len() >= max_messages
                    || cfg.max_bytes.is_some_and(|cap| size >= cap)
                    || ctx.shutdown.is_cancelled()
                {
                    flush(&ctx, &mut pending, &mut size);
                    (first, earliest) = (None, None);
                }
            }
        }
    }
}

fn flush(ctx: &Arc<DeliveryCtx>, pending: &mut Vec<Entry>, size: &mut usize) {
    *size = BODY_OVERHEAD;
    if pending.is_empty() {
        return;
    }
    let cap = ctx.batch.as_ref().map_or(1, |b| b.max_messages);
    let batch = std::mem::replace(pending, Vec::with_capacity(cap));
    ctx.workers.spawn(deliver(ctx.clone(), batch));
}

/// A message that cannot travel (undecodable or oversized body) is retried by policy, like a
/// single one: the queue's `max_retries` and dead-letter queue end it.
async fn refuse(ctx: &DeliveryCtx, msg: Message, refused: Refused) {
    let decision = ctx
        .policy
        .decide(&Attempt::Undecodable, msg.attempts, jitter());
    ctx.gate.probe_unused();
    let (outcome, kind) = settle(decision, Some(refused.outcome));
    ctx.metrics.delivered(outcome);
    let delay = match kind {
        AckKind::Retry { delay_seconds } => delay_seconds,
        AckKind::Ack => 0,
    };
    if ctx.logs.allow(refused.event) {
        warn!(queue = %ctx.label, id = %esc(&msg.id), attempt = msg.attempts, detail = %esc(&refused.detail),
            delay_s = delay, outcome = outcome.as_label(), "message cannot be delivered; retrying later");
    }
    to_acker(
        ctx,
        msg,
        AckKind::Retry {
            delay_seconds: delay,
        },
    )
    .await;
}

/// Deliver one batch in the single path's steps: [`admit`] (the rate limiter's turn, the
/// breaker, the leases), POST, [`decide`] (one verdict for the request, the ids its answer
/// lists as failed) and [`report`] (one verdict per message to the acker). Each message holds
/// its slot of the adaptive limit (the pool counts messages held, as for single deliveries);
/// the request reports one sample to the controller, and the slots go back through the
/// limiter when this ends.
async fn deliver(ctx: Arc<DeliveryCtx>, batch: Vec<Entry>) {
    let Some(batch) = admit(&ctx, batch).await else {
        return;
    };
    let n = batch.len();
    let _in_flight = InFlight::new(&ctx, n);
    ctx.metrics.batch_messages.observe(n as f64);
    let id = batch_id(batch.iter().map(|e| e.msg.id.as_str()));
    let body = encode_body(batch.iter().map(|e| e.json.as_slice()));
    let started = Instant::now();
    let response = tokio::select! {
        // An answer that is there wins over the hard stop (see `worker::post`).
        biased;
        r = ctx.webhook.post_batch(&id, n, body) => r,
        _ = ctx.hard_stop.cancelled() => {
            warn!(queue = %ctx.label, batch = %id, messages = n,
                "shutdown grace over: abandoning the batch and handing its messages back");
            hand_back(&ctx, batch, ReleaseReason::Shutdown).await;
            return;
        }
    };
    let elapsed = started.elapsed();
    ctx.metrics
        .webhook(response.attempt.status_class(), elapsed.as_secs_f64());
    for e in &batch {
        observe_age(&ctx, e.msg.timestamp_ms);
    }
    let failed = decide(&ctx, &id, &batch, &response, elapsed);
    report(&ctx, &id, batch, &response, failed, elapsed).await;
}

/// Hand every message of `batch` back undelivered.
async fn hand_back(ctx: &DeliveryCtx, batch: Vec<Entry>, reason: ReleaseReason) {
    for e in batch {
        release(ctx, e.msg, reason).await;
        ctx.limiter.release(e.slot);
    }
}

/// Step 1: wait for the rate limiter's turn (the rate limit counts messages: the batch leaves
/// at the turn of its last message), then hand back what the breaker or the leases forbid.
/// What may be sent, if anything.
async fn admit(ctx: &DeliveryCtx, batch: Vec<Entry>) -> Option<Vec<Entry>> {
    if let Some(at) = batch.iter().filter_map(|e| e.msg.not_before).max() {
        tokio::select! {
            _ = sleep_until(at) => {}
            _ = ctx.hard_stop.cancelled() => {
                hand_back(ctx, batch, ReleaseReason::Shutdown).await;
                return None;
            }
        }
    }
    if ctx.gate.is_open() {
        let delay = delay_seconds(ctx.gate.open_remaining(Instant::now()));
        for e in batch {
            hold_back(ctx, e.msg, delay).await;
            ctx.limiter.release(e.slot);
        }
        return None;
    }
    // Send only what the request and the ack still fit in; hand the rest back now.
    let need = ctx.timeout + ctx.lease_margin;
    let (keep, back) = split_by_lease(batch.iter().map(|e| e.msg.deadline), Instant::now(), need);
    let batch = if back.is_empty() {
        batch
    } else {
        if ctx.logs.allow(Event::LeaseTooClose) {
            warn!(queue = %ctx.label, messages = back.len(), batch = batch.len(),
                "leases too close to their end to deliver; handing these messages back");
        }
        let back: HashSet<usize> = back.into_iter().collect();
        let mut sending = Vec::with_capacity(keep.len());
        for (i, e) in batch.into_iter().enumerate() {
            if back.contains(&i) {
                release(ctx, e.msg, ReleaseReason::Lease).await;
                ctx.limiter.release(e.slot);
            } else {
                sending.push(e);
            }
        }
        sending
    };
    if batch.is_empty() {
        // Handed back unsent: if it held the half-open breaker's probe, the next pull probes.
        ctx.gate.probe_unused();
    }
    (!batch.is_empty()).then_some(batch)
}

/// Step 3: one verdict for the request (by the first message's attempts; each message's own
/// attempts set its delay in [`report`]), fed to the adaptive limit, the pause and the
/// breaker; and, for a 2xx, the ids its answer lists as failed.
fn decide(
    ctx: &DeliveryCtx,
    id: &str,
    batch: &[Entry],
    response: &Response,
    elapsed: Duration,
) -> Option<HashSet<String>> {
    let attempt = &response.attempt;
    // One request, one sample of the adaptive limit, however many messages it carried.
    let limit_before = sample(ctx, elapsed, attempt);
    let whole = ctx.policy.verdict(attempt, 1, 0.0, headroom(ctx));
    pause(ctx, attempt, whole.pause);
    let success_2xx = matches!(attempt, Attempt::Status { status, .. } if (200..300).contains(status))
        && whole.decision == Decision::Ack;
    let failed = if success_2xx {
        failed_ids(ctx, id, batch, response)
    } else {
        None
    };
    let request_failed = matches!(whole.decision, Decision::Retry { .. });
    if let Some(t) = judge(ctx, attempt, request_failed, Some(limit_before)) {
        breaker_changed(ctx, t);
    }
    failed
}

/// The ids a 2xx answer lists as failed (every id when the list cannot be read); `None` when
/// all were delivered.
fn failed_ids(
    ctx: &DeliveryCtx,
    id: &str,
    batch: &[Entry],
    response: &Response,
) -> Option<HashSet<String>> {
    match parse_answer(&response.answer, response.answer_complete) {
        BatchAnswer::AllDelivered => None,
        BatchAnswer::Failed(ids) => {
            let known: HashSet<&str> = batch.iter().map(|e| e.msg.id.as_str()).collect();
            let unknown: Vec<&String> = ids
                .iter()
                .filter(|id| !known.contains(id.as_str()))
                .collect();
            if !unknown.is_empty() {
                ctx.metrics.batch_unknown_ids.inc_by(unknown.len() as u64);
                if ctx.logs.allow(Event::DeliveryFailed) {
                    warn!(queue = %ctx.label, batch = %id, unknown = unknown.len(),
                        first = %esc(&unknown[0].chars().take(80).collect::<String>()),
                        "webhook listed ids in `failed` that were not in the batch; ignored");
                }
            }
            Some(ids.into_iter().collect())
        }
        BatchAnswer::Unreadable => {
            if ctx.logs.allow(Event::DeliveryFailed) {
                warn!(queue = %ctx.label, batch = %id, messages = batch.len(),
                    "webhook answered 2xx with a `failed` that is not a list of ids; retrying the whole batch");
            }
            Some(batch.iter().map(|e| e.msg.id.clone()).collect())
        }
    }
}

/// Step 4: one verdict per message (the ids listed as failed retry with their own backoff,
/// the others follow the request's status), counted, handed to the acker, its slot released;
/// one log line for the batch.
async fn report(
    ctx: &DeliveryCtx,
    id: &str,
    batch: Vec<Entry>,
    response: &Response,
    failed: Option<HashSet<String>>,
    elapsed: Duration,
) {
    let attempt = &response.attempt;
    let n = batch.len();
    let (mut acked, mut retried, mut dropped) = (0usize, 0usize, 0usize);
    for e in batch {
        let decision = match &failed {
            Some(f) if f.contains(&e.msg.id) => Decision::Retry {
                delay: backoff(
                    ctx.policy.base_delay,
                    ctx.policy.max_delay,
                    e.msg.attempts,
                    jitter(),
                ),
            },
            _ => ctx.policy.decide(attempt, e.msg.attempts, jitter()),
        };
        match decision {
            Decision::Ack => acked += 1,
            Decision::Drop => dropped += 1,
            Decision::Retry { .. } => retried += 1,
        }
        let (outcome, kind) = settle(decision, None);
        ctx.metrics.delivered(outcome);
        to_acker(ctx, e.msg, kind).await;
        ctx.limiter.release(e.slot);
    }
    let took_ms = elapsed.as_millis() as u64;
    if retried > 0 || dropped > 0 {
        if ctx.logs.allow(Event::DeliveryFailed) {
            warn!(queue = %ctx.label, batch = %id, messages = n, acked, retried, dropped,
                result = ?attempt, duration_ms = took_ms, detail = %esc(&response.detail),
                "batch delivered in part");
        }
    } else {
        debug!(queue = %ctx.label, batch = %id, messages = n, duration_ms = took_ms, "batch delivered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_conservatively() {
        let p = |b: &[u8]| parse_answer(b, true);
        assert_eq!(p(b""), BatchAnswer::AllDelivered);
        assert_eq!(p(b"OK"), BatchAnswer::AllDelivered);
        assert_eq!(p(b"[1]"), BatchAnswer::AllDelivered);
        assert_eq!(p(b"{}"), BatchAnswer::AllDelivered);
        assert_eq!(p(br#"{"failed":null}"#), BatchAnswer::AllDelivered);
        assert_eq!(p(br#"{"ok":true}"#), BatchAnswer::AllDelivered);
        assert_eq!(p(br#"{"failed":[]}"#), BatchAnswer::Failed(vec![]));
        assert_eq!(
            p(br#"{"failed":["a","b"],"other":1}"#),
            BatchAnswer::Failed(vec!["a".into(), "b".into()])
        );
        assert_eq!(p(br#"{"failed":"a"}"#), BatchAnswer::Unreadable);
        assert_eq!(p(br#"{"failed":[1]}"#), BatchAnswer::Unreadable);
        // Broken JSON, or a body cut short, may have listed failures.
        assert_eq!(p(br#" {"failed":["a",}"#), BatchAnswer::Unreadable);
        assert_eq!(
            parse_answer(br#"{"failed":["a"]}"#, false),
            BatchAnswer::Unreadable
        );
        // Nothing of it arrived: it may have listed failures too.
        assert_eq!(parse_answer(b"", false), BatchAnswer::Unreadable);
        assert_eq!(parse_answer(b" \r\n", false), BatchAnswer::Unreadable);
    }

    #[test]
    fn batch_ids_are_stable_and_differ_by_content_and_order() {
        let a = batch_id(["m1", "m2"].into_iter());
        assert_eq!(a, batch_id(["m1", "m2"].into_iter()));
        assert_ne!(a, batch_id(["m2", "m1"].into_iter()));
        assert_ne!(a, batch_id(["m1"].into_iter()));
        assert!(a.starts_with("batch_") && a.len() == 6 + 24, "{a}");
    }

    #[test]
    fn the_body_is_one_json_document_with_base64_bodies() {
        let msg = Message {
            id: "m1".into(),
            lease_id: "l".into(),
            attempts: 2,
            timestamp_ms: Some(7),
            content_type: Some("bytes".into()),
            body: Some(String::new()),
            deadline: Instant::now(),
            not_before: None,
        };
        let raw = [0u8, 255, 10, 13];
        let e1 = encode_entry(&msg, &raw);
        let e2 = encode_entry(&msg, b"");
        let body = encode_body([e1.as_slice(), e2.as_slice()].into_iter());
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v["messages"][0],
            serde_json::json!({"id": "m1", "attempts": 2, "timestamp_ms": 7,
                "content_type": "bytes", "body": STANDARD.encode(raw)})
        );
        assert_eq!(v["messages"][1]["body"], "");
        assert_eq!(
            body.len(),
            BODY_OVERHEAD + e1.len() + 1 + e2.len(),
            "size accounting"
        );
        assert_eq!(encode_body(std::iter::empty()).len(), BODY_OVERHEAD);
    }

    fn config_with(batch: &str, webhook_extra: &str) -> Result<crate::Config, String> {
        crate::Config::from_toml(&format!(
            "[cloudflare]\naccount_id = \"abc\"\napi_token = \"t\"\n[[consumers]]\nqueue_id = \"q1\"\n\
             [consumers.webhook]\nurl = \"http://127.0.0.1/h\"\n{webhook_extra}\n[consumers.webhook.batch]\n{batch}\n"
        ))
        .map_err(|e| e.to_string())
    }

    #[test]
    fn config_defaults_and_errors_name_the_key() {
        let c = config_with("", "").unwrap();
        let b = c.consumers[0].webhook.batch.clone().unwrap();
        assert_eq!(b, BatchConfig::default());
        assert_eq!(
            (b.max_messages, b.max_wait, b.max_bytes),
            (50, Duration::from_millis(50), None)
        );
        for (batch, extra, want) in [
            (
                "max_messages = 0",
                "",
                "`consumers[0].webhook.batch.max_messages` must be between 1 and 100, got 0",
            ),
            (
                "max_messages = 101",
                "",
                "`consumers[0].webhook.batch.max_messages` must be between 1 and 100, got 101",
            ),
            (
                "max_wait = \"11s\"",
                "",
                "`consumers[0].webhook.batch.max_wait` must be between 0s and 10s, got 11s",
            ),
            (
                "max_bytes = 10",
                "",
                "`consumers[0].webhook.batch.max_bytes` must be between 1024 and 104857600, got 10",
            ),
            (
                "",
                "envelope = true",
                "`consumers[0].webhook.envelope` and `webhook.batch` are both set",
            ),
            ("max_mesages = 5", "", "max_mesages"),
        ] {
            let got = config_with(batch, extra).unwrap_err();
            assert!(got.contains(want), "{batch} {extra}: {got}");
        }
    }

    fn held(id: &str) -> Message {
        Message {
            id: id.into(),
            lease_id: format!("lease-{id}"),
            attempts: 1,
            timestamp_ms: None,
            content_type: None,
            body: Some(String::new()),
            deadline: Instant::now() + Duration::from_secs(600),
            not_before: None,
        }
    }

    /// Decide and report one batch of `ids` on a given answer, as `deliver` does after the
    /// POST; the verdicts the acker gets, by lease id.
    async fn verdicts(
        ctx: &DeliveryCtx,
        rx: &mut mpsc::Receiver<crate::pipeline::acker::AckItem>,
        ids: &[&str],
        status: u16,
        answer: &[u8],
    ) -> Vec<(String, AckKind)> {
        let mut batch = Vec::new();
        for id in ids {
            let slot = ctx.limiter.slots().clone().acquire_owned().await.unwrap();
            batch.push(Entry {
                msg: held(id),
                slot,
                json: Vec::new(),
            });
        }
        let response = Response {
            attempt: Attempt::Status {
                status,
                retry_after: None,
            },
            detail: String::new(),
            answer: answer.to_vec(),
            answer_complete: true,
        };
        let took = Duration::from_millis(10);
        let failed = decide(ctx, "b1", &batch, &response, took);
        report(ctx, "b1", batch, &response, failed, took).await;
        let mut out = Vec::new();
        while let Ok(item) = rx.try_recv() {
            out.push((item.lease_id, item.kind));
        }
        out
    }

    #[tokio::test]
    async fn each_message_of_a_batch_gets_its_verdict_from_the_answer() {
        let (ctx, mut rx, metrics) = crate::pipeline::ctx::fixture("");
        let backoff = |k: &AckKind| {
            matches!(
                k,
                AckKind::Retry {
                    delay_seconds: 2..=4
                }
            )
        };
        let ids = ["m1", "m2", "m3"];
        // A 2xx acks all but the ids it lists as failed; an id not in the batch is counted.
        let got = verdicts(&ctx, &mut rx, &ids, 200, br#"{"failed":["m2","zz"]}"#).await;
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0], ("lease-m1".into(), AckKind::Ack));
        assert!(got[1].0 == "lease-m2" && backoff(&got[1].1), "{got:?}");
        assert_eq!(got[2], ("lease-m3".into(), AckKind::Ack));
        assert_eq!(ctx.metrics.batch_unknown_ids.get(), 1);
        // A 2xx whose `failed` cannot be read retries the whole batch.
        let got = verdicts(&ctx, &mut rx, &ids, 200, br#"{"failed":"m1"}"#).await;
        assert!(got.iter().all(|(_, k)| backoff(k)), "{got:?}");
        // Any other answer applies to the whole batch: a 5xx retries, a drop status acks.
        let got = verdicts(&ctx, &mut rx, &ids, 503, b"").await;
        assert!(
            got.len() == 3 && got.iter().all(|(_, k)| backoff(k)),
            "{got:?}"
        );
        let got = verdicts(&ctx, &mut rx, &ids, 410, b"").await;
        assert!(
            got.len() == 3 && got.iter().all(|(_, k)| *k == AckKind::Ack),
            "{got:?}"
        );
        let text = metrics.render();
        for (outcome, n) in [("acked", 2), ("retried", 7), ("dropped", 3)] {
            let line = format!(
                "cfq_relay_messages_delivered_total{{outcome=\"{outcome}\",queue=\"q1\"}} {n}"
            );
            assert!(text.contains(&line), "{line}\n{text}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_open_probe_handed_back_for_its_lease_lets_the_next_pull_probe() {
        use crate::pipeline::worker::probe;
        let (ctx, mut rx, _metrics) = crate::pipeline::ctx::fixture(probe::BREAKER);
        // The breaker's probe: one message pulled, in a batch of its own.
        probe::take(&ctx).await;
        // Its lease no longer leaves room for the request.
        let mut msg = held("probe");
        msg.deadline = Instant::now() + Duration::from_secs(1);
        let slot = ctx.limiter.slots().clone().acquire_owned().await.unwrap();
        let entry = Entry {
            msg,
            slot,
            json: Vec::new(),
        };
        deliver(ctx.clone(), vec![entry]).await;
        assert_eq!(
            rx.try_recv().unwrap().kind,
            AckKind::Retry { delay_seconds: 0 }
        );
        probe::assert_next_pull_probes(&ctx).await;
    }

    #[test]
    fn leases_split_a_batch() {
        let now = Instant::now();
        let s = Duration::from_secs;
        let deadlines = [now + s(10), now + s(2), now + s(5), now + s(3)];
        let (send, back) = split_by_lease(deadlines.into_iter(), now, s(3));
        assert_eq!(send, vec![0, 2, 3]);
        assert_eq!(back, vec![1]);
        let (send, back) = split_by_lease(deadlines.into_iter(), now, s(11));
        assert!(send.is_empty());
        assert_eq!(back, vec![0, 1, 2, 3]);
    }
}
