//! The routes of a queue's messages: pull, ack (and retry), peek, purge, publish (one or a
//! batch), the backlog metrics and the emulator's own stats.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::conn::*;
use crate::handle::*;
use crate::store::*;
use crate::types::*;
use crate::wire::*;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::debug;

#[derive(Deserialize, Default)]
pub(crate) struct PullCall {
    pub(crate) batch_size: Option<serde_json::Number>,
    pub(crate) visibility_timeout_ms: Option<serde_json::Number>,
    /// The field's name in older docs: read as milliseconds when `visibility_timeout_ms` is
    /// absent, rather than silently ignored.
    pub(crate) visibility_timeout: Option<serde_json::Number>,
}

#[derive(Serialize)]
pub(crate) struct PullAnswer {
    pub(crate) messages: Vec<WireMessage>,
    pub(crate) message_backlog_count: u64,
    pub(crate) metadata: PulledMetadata,
}

#[derive(Serialize)]
pub(crate) struct PulledMetadata {
    pub(crate) metrics: QueueMetrics,
}

pub(crate) async fn pull_handler(
    State(app): State<EmuApp>,
    ConnectInfo(conn): ConnectInfo<ResetSwitch>,
    Path((account, queue_id)): QueuePath,
    Body(req): Body<PullCall>,
) -> Response {
    if let Some(r) = fault(&app, FaultOp::Pull, &conn).await {
        return r;
    }
    let batch_size = match batch_size(&req.batch_size) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let visibility = req
        .visibility_timeout_ms
        .as_ref()
        .or(req.visibility_timeout.as_ref());
    let visibility_ms = match whole(
        "visibility_timeout_ms",
        visibility,
        DEFAULT_VISIBILITY_MS,
        1..=MAX_VISIBILITY_MS,
    ) {
        Ok(v) => v,
        Err(e) => return bad_request(code::BODY_INVALID, e),
    };
    let emu = app.emu.clone();
    let result = app.emu.with_queue(&account, &queue_id, |q, now, _| {
        let qid = q.scope();
        let messages = q.pull(
            now,
            batch_size,
            Duration::from_millis(visibility_ms),
            |seq, delivery| emu.token_for(&qid, 0, seq, delivery),
        );
        PullAnswer {
            messages,
            message_backlog_count: q.messages.len() as u64,
            metadata: PulledMetadata {
                metrics: q.metrics(),
            },
        }
    });
    reply(result)
}

#[derive(Deserialize, Default)]
pub(crate) struct AckRequest {
    pub(crate) acks: Option<Vec<AckedLease>>,
    pub(crate) retries: Option<Vec<RetryItem>>,
}

#[derive(Serialize)]
pub(crate) struct AckAnswer {
    #[serde(rename = "ackCount")]
    pub(crate) ack_count: u64,
    #[serde(rename = "retryCount")]
    pub(crate) retry_count: u64,
    pub(crate) warnings: BTreeMap<String, String>,
}

pub(crate) async fn ack_handler(
    State(app): State<EmuApp>,
    ConnectInfo(conn): ConnectInfo<ResetSwitch>,
    Path((account, queue_id)): QueuePath,
    Body(req): Body<AckRequest>,
) -> Response {
    if let Some(r) = fault(&app, FaultOp::Ack, &conn).await {
        return r;
    }
    let acks = req.acks.unwrap_or_default();
    let retries = req.retries.unwrap_or_default();
    if retries
        .iter()
        .any(|r| r.delay_seconds.is_some_and(|d| d > MAX_DELAY_SECONDS))
    {
        return bad_request(
            code::MESSAGE_METADATA_INVALID,
            format!(
                "Invalid message metadata: delay_seconds must be a whole number between 0 and {MAX_DELAY_SECONDS}"
            ),
        );
    }
    let emu = app.emu.clone();
    let out = app
        .emu
        .with_queue(&account, &queue_id, |q, now, max_retries| {
            let qid = q.scope();
            q.ack(now, &acks, &retries, max_retries, |l| {
                emu.read_token(&qid, 0, l)
            })
        });
    let out = match out {
        Ok(o) => o,
        Err(r) => return r.into_response(),
    };
    if !out.warnings.is_empty() {
        debug!(queue = %queue_id, unknown = out.warnings.len(), "emulator: ack named unknown leases");
    }
    ok(AckAnswer {
        ack_count: out.ack_count,
        retry_count: out.retry_count,
        warnings: out.warnings,
    })
}

#[derive(Deserialize, Default)]
pub(crate) struct PeekRequest {
    pub(crate) batch_size: Option<serde_json::Number>,
}

pub(crate) async fn peek_handler(
    State(app): State<EmuApp>,
    Path((account, queue_id)): QueuePath,
    Body(req): Body<PeekRequest>,
) -> Response {
    let batch_size = match batch_size(&req.batch_size) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let emu = app.emu.clone();
    let result = app.emu.with_queue(&account, &queue_id, |q, _, _| {
        let qid = q.scope();
        let messages = q.peek(batch_size, |seq| emu.token_for(&qid, 1, seq, 0));
        serde_json::json!({
            "messages": messages,
            "metadata": {"metrics": q.metrics()},
        })
    });
    reply(result)
}

#[derive(Deserialize, Default)]
pub(crate) struct PurgeMessagesRequest {
    pub(crate) refs: Vec<PeekRef>,
}

#[derive(Deserialize)]
pub(crate) struct PeekRef {
    #[serde(rename = "ref")]
    pub(crate) peek_ref: String,
}

/// Remove peeked messages by their refs; a ref whose message is gone (or that this queue
/// never issued) answers a warning.
pub(crate) async fn purge_messages_handler(
    State(app): State<EmuApp>,
    Path((account, queue_id)): QueuePath,
    Body(req): Body<PurgeMessagesRequest>,
) -> Response {
    let emu = app.emu.clone();
    let result = app.emu.with_queue(&account, &queue_id, |q, _, _| {
        let qid = q.scope();
        let mut warnings = BTreeMap::new();
        for r in &req.refs {
            let removed = emu
                .read_token(&qid, 1, &r.peek_ref)
                .and_then(|(seq, _)| q.remove(seq));
            match removed {
                Some(_) => q.stats.purged += 1,
                None => {
                    warnings.insert(
                        r.peek_ref.clone(),
                        "message not found: already acknowledged or purged, or an unknown ref"
                            .to_owned(),
                    );
                }
            }
        }
        serde_json::json!({"errors": [], "warnings": warnings})
    });
    reply(result)
}

#[derive(Deserialize, Default)]
pub(crate) struct PurgeQueueRequest {
    pub(crate) delete_messages_permanently: Option<bool>,
}

pub(crate) async fn purge_queue_handler(
    State(app): State<EmuApp>,
    Path((account, queue_id)): QueuePath,
    Body(req): Body<PurgeQueueRequest>,
) -> Response {
    if req.delete_messages_permanently != Some(true) {
        return bad_request(
            code::BODY_INVALID,
            "delete_messages_permanently must be true to confirm that every message is deleted",
        );
    }
    reply(app.emu.with_queue(&account, &queue_id, |q, _, _| {
        q.purge_all();
        q.info()
    }))
}

pub(crate) async fn purge_status_handler(
    State(app): State<EmuApp>,
    Path((account, queue_id)): QueuePath,
) -> Response {
    // A purge completes within its call here.
    reply(app.emu.with_queue(&account, &queue_id, |q, _, _| {
        serde_json::json!({
            "completed": if q.last_purge.is_some() { "true" } else { "false" },
            "started_at": q.last_purge,
        })
    }))
}

pub(crate) async fn metrics_handler(
    State(app): State<EmuApp>,
    Path((account, queue_id)): QueuePath,
) -> Response {
    reply(
        app.emu
            .with_queue(&account, &queue_id, |q, _, _| q.metrics()),
    )
}

// Producers ------------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
pub(crate) struct PublishRequest {
    pub(crate) body: Option<Value>,
    pub(crate) content_type: Option<String>,
    pub(crate) delay_seconds: Option<serde_json::Number>,
}

#[derive(Deserialize, Default)]
pub(crate) struct PublishBatchRequest {
    pub(crate) messages: Vec<PublishRequest>,
    pub(crate) delay_seconds: Option<serde_json::Number>,
}

/// Turn one HTTP publish request into a draft; `batch_delay` applies unless the message has
/// its own. `Err` is the 400 answer (codes 10203, 10204, 10207).
pub(crate) fn draft_from_request(
    emu: &Emulator,
    req: PublishRequest,
    batch_delay: u64,
) -> Result<Draft, CfRefusal> {
    const NOT_BASE64: &str = "a bytes or v8 message's body must be a base64 string";
    let schema = |m: &str| refuse(code::BODY_INVALID, m.to_owned());
    let content_type = match req.content_type.as_deref() {
        None => ContentType::Json,
        Some(s) => s.parse().map_err(|e: UnknownContentType| {
            refuse(
                code::MESSAGE_METADATA_INVALID,
                format!("Invalid message metadata: {e}"),
            )
        })?,
    };
    let delay = match req.delay_seconds {
        None => batch_delay,
        Some(n) => whole("delay_seconds", Some(&n), 0, 0..=MAX_DELAY_SECONDS).map_err(|e| {
            refuse(
                code::MESSAGE_METADATA_INVALID,
                format!("Invalid message metadata: {e}"),
            )
        })?,
    };
    let Some(body) = req.body else {
        return Err(schema("a message needs a body"));
    };
    let payload = match (content_type, body) {
        (ContentType::Text, Value::String(s)) => s.into_bytes(),
        (ContentType::Text, _) => {
            return Err(schema("a text message's body must be a JSON string"));
        }
        (ContentType::Json, v) => serde_json::to_vec(&v)
            .map_err(|e| schema(&format!("cannot serialize the body: {e}")))?,
        (ContentType::Bytes | ContentType::V8, Value::String(s)) => {
            decode_base64(&s).ok_or_else(|| schema(NOT_BASE64))?
        }
        (ContentType::Bytes | ContentType::V8, _) => return Err(schema(NOT_BASE64)),
    };
    emu.draft(Some(content_type), &payload, Duration::from_secs(delay))
        .map_err(|e| match e {
            PublishError::TooLarge { .. } => refuse(
                code::MESSAGE_TOO_LARGE,
                format!("Message size out of bounds: {e} (128 KB, metadata included)"),
            ),
            PublishError::DelayTooLong(_) => refuse(
                code::MESSAGE_METADATA_INVALID,
                format!("Invalid message metadata: {e}"),
            ),
            PublishError::NotUtf8 | PublishError::InvalidJson(_) => {
                refuse(code::BODY_INVALID, e.to_string())
            }
        })
}

/// Base64 in any usual flavour: standard or URL-safe alphabet, padded or not.
pub(crate) fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(s).ok())
}

/// Publish checked drafts; the answer is the SDK's `MessagePushResponse` /
/// `MessageBulkPushResponse`: the queue's metrics after the publish.
pub(crate) fn publish_answer(
    app: &EmuApp,
    account: &str,
    queue_id: &str,
    drafts: Vec<Draft>,
) -> Response {
    // Resolve (or create) the queue first, so that an unknown one answers 404 / 10104.
    let key = match app
        .emu
        .with_queue(account, queue_id, |q, _, _| q.id.clone())
    {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    match app.emu.publish_with_metrics(&key, drafts) {
        Some((_, metrics)) => ok(serde_json::json!({"metadata": {"metrics": metrics}})),
        None => fail(
            StatusCode::NOT_FOUND,
            code::QUEUE_NOT_FOUND,
            "Queue does not exist",
        ),
    }
}

pub(crate) async fn publish_handler(
    State(app): State<EmuApp>,
    Path((account, queue_id)): QueuePath,
    Body(req): Body<PublishRequest>,
) -> Response {
    let draft = match draft_from_request(&app.emu, req, 0) {
        Ok(d) => d,
        Err(r) => return r.into_response(),
    };
    publish_answer(&app, &account, &queue_id, vec![draft])
}

pub(crate) async fn publish_batch_handler(
    State(app): State<EmuApp>,
    Path((account, queue_id)): QueuePath,
    Body(req): Body<PublishBatchRequest>,
) -> Response {
    if req.messages.len() > MAX_PUBLISH_BATCH {
        return bad_request(
            code::BATCH_COUNT,
            format!(
                "Batch count out of bounds: a batch holds at most {MAX_PUBLISH_BATCH} messages, got {}",
                req.messages.len()
            ),
        );
    }
    let batch_delay = match whole(
        "delay_seconds",
        req.delay_seconds.as_ref(),
        0,
        0..=MAX_DELAY_SECONDS,
    ) {
        Ok(d) => d,
        Err(e) => {
            return bad_request(
                code::BATCH_DELAY_INVALID,
                format!("Invalid batch delay: {e}"),
            );
        }
    };
    let mut drafts = Vec::with_capacity(req.messages.len());
    for m in req.messages {
        match draft_from_request(&app.emu, m, batch_delay) {
            Ok(d) => drafts.push(d),
            Err(r) => return r.into_response(),
        }
    }
    let total: usize = drafts.iter().map(|d| d.size).sum();
    if total > MAX_BATCH_BYTES {
        return bad_request(
            code::BATCH_TOO_LARGE,
            format!(
                "Batch size out of bounds: {total} bytes (metadata included) is more than the {MAX_BATCH_BYTES}-byte limit"
            ),
        );
    }
    publish_answer(&app, &account, &queue_id, drafts)
}

pub(crate) async fn stats_handler(
    State(app): State<EmuApp>,
    Path(queue_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !app.emu.authorized(&headers) {
        return auth_error();
    }
    if app.emu.queue_id(&queue_id).is_none() && !app.emu.inner.opts.create_queues_on_use {
        return fail(
            StatusCode::NOT_FOUND,
            code::QUEUE_NOT_FOUND,
            "Queue does not exist",
        );
    }
    axum::Json(app.emu.stats(&queue_id)).into_response()
}

#[cfg(test)]
mod tests {

    use std::time::Duration;

    use serde_json::{Value, json};

    use super::*;
    use crate::testkit::*;
    use crate::{ContentType, EmulatorOptions};

    #[tokio::test]
    async fn publish_pull_ack_removes_the_message() {
        let h = harness(EmulatorOptions::default()).await;
        let id = text(&h.emu, "q", "hello ✓");
        assert_eq!(id.len(), 32);
        assert!(
            id.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')),
            "{id}"
        );

        let msgs = h.pull_messages("q", json!({})).await;
        assert_eq!(msgs.len(), 1);
        let m = &msgs[0];
        assert_eq!(m["id"], id.as_str());
        assert_eq!(m["body"], "hello ✓");
        assert_eq!(m["attempts"], 1);
        assert_eq!(m["metadata"]["CF-Content-Type"], "text");
        let ts = m["timestamp_ms"].as_u64().expect("timestamp_ms");
        assert!(ts > 1_700_000_000_000 && ts <= unix_ms(), "{ts}");
        assert_eq!(h.emu.stats("q").in_flight, 1);

        let r = h.ack("q", &[&lease(m)], &[]).await;
        assert_eq!(r["ackCount"], 1);
        assert_eq!(r["retryCount"], 0);
        assert_eq!(r["warnings"], json!({}));
        assert!(h.pull_messages("q", json!({})).await.is_empty());

        let s = h.emu.stats("q");
        let expected = QueueStats {
            published: 1,
            deliveries: 1,
            pull_calls: 2,
            empty_pulls: 1,
            ack_calls: 1,
            acked: 1,
            ..QueueStats::default()
        };
        assert_eq!(s, expected);
        let books = h.emu.books("q");
        assert_eq!(
            books,
            vec![MessageBook {
                id,
                deliveries: 1,
                acks: 1,
                dead_lettered: false,
                retries: vec![],
                lease_answers: vec![1],
            }]
        );
        assert_eq!(h.emu.stats("never-used"), QueueStats::default());
    }

    #[tokio::test]
    async fn lease_ids_are_long_unique_and_url_safe() {
        let h = harness(EmulatorOptions::default()).await;
        for i in 0..50 {
            text(&h.emu, "q", &format!("m{i}"));
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5 {
            for m in h.pull_messages("q", json!({"batch_size": 10})).await {
                let l = lease(&m);
                assert!((280..=400).contains(&l.len()), "{} chars", l.len());
                assert!(
                    l.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
                    "{l}"
                );
                assert!(l.starts_with("eyJ"), "{l}");
                assert!(seen.insert(l));
            }
        }
        assert_eq!(seen.len(), 50);
    }

    #[tokio::test]
    async fn lease_expiry_redelivers_with_attempts_two() {
        let h = harness(EmulatorOptions::default()).await;
        let id = text(&h.emu, "q", "x");
        let first = h
            .pull_messages("q", json!({"visibility_timeout_ms": 30_000}))
            .await;
        assert_eq!(first.len(), 1);
        h.emu.advance(Duration::from_secs(29));
        assert!(
            h.pull_messages("q", json!({})).await.is_empty(),
            "still leased"
        );
        h.emu.advance(Duration::from_secs(2));
        let second = h.pull_messages("q", json!({})).await;
        assert_eq!(second.len(), 1);
        assert_eq!(second[0]["id"], id.as_str());
        assert_eq!(second[0]["attempts"], 2);
        assert_ne!(lease(&second[0]), lease(&first[0]));
        let s = h.emu.stats("q");
        assert_eq!((s.lease_expired, s.deliveries, s.in_flight), (1, 2, 1));
    }

    #[tokio::test]
    async fn lease_expires_in_real_time() {
        let h = harness(EmulatorOptions::default()).await;
        text(&h.emu, "q", "x");
        let first = h
            .pull_messages("q", json!({"visibility_timeout_ms": 50}))
            .await;
        assert_eq!(first.len(), 1);
        tokio::time::sleep(Duration::from_millis(120)).await;
        let second = h.pull_messages("q", json!({})).await;
        assert_eq!(second.len(), 1);
        assert_eq!(second[0]["attempts"], 2);
    }

    #[tokio::test]
    async fn retry_with_delay_holds_the_message_back() {
        let h = harness(EmulatorOptions::default()).await;
        let id = text(&h.emu, "q", "x");
        let m = h.pull_messages("q", json!({})).await.remove(0);
        let r = h.ack("q", &[], &[(&lease(&m), 10)]).await;
        assert_eq!(
            (r["ackCount"].as_u64(), r["retryCount"].as_u64()),
            (Some(0), Some(1))
        );
        assert!(h.pull_messages("q", json!({})).await.is_empty());
        h.emu.advance(Duration::from_secs(9));
        assert!(h.pull_messages("q", json!({})).await.is_empty());
        let s = h.emu.stats("q");
        assert_eq!((s.backlog, s.in_flight, s.retried), (1, 0, 1));
        h.emu.advance(Duration::from_secs(2));
        let again = h.pull_messages("q", json!({})).await;
        assert_eq!(again.len(), 1);
        assert_eq!(again[0]["id"], id.as_str());
        assert_eq!(again[0]["attempts"], 2);

        // A retry without delay is ready at once.
        h.ack("q", &[], &[(&lease(&again[0]), 0)]).await;
        let third = h.pull_messages("q", json!({})).await;
        assert_eq!(third[0]["attempts"], 3);
        assert_eq!(h.emu.books("q")[0].retries, vec![10, 0]);
        assert_eq!(h.emu.stats("q").lease_expired, 0);
    }

    #[tokio::test]
    async fn retries_past_max_retries_dead_letter() {
        let h = harness(EmulatorOptions {
            max_retries: 1,
            ..EmulatorOptions::default()
        })
        .await;
        text(&h.emu, "q", "x");
        let m = h.pull_messages("q", json!({})).await.remove(0);
        h.ack("q", &[], &[(&lease(&m), 0)]).await;
        let m = h.pull_messages("q", json!({})).await.remove(0);
        assert_eq!(m["attempts"], 2);
        let r = h.ack("q", &[], &[(&lease(&m), 0)]).await;
        assert_eq!(r["retryCount"], 1);
        assert!(h.pull_messages("q", json!({})).await.is_empty());
        let s = h.emu.stats("q");
        assert_eq!(
            (s.dead_lettered, s.retried, s.backlog, s.in_flight),
            (1, 2, 0, 0)
        );
        let b = &h.emu.books("q")[0];
        assert!(b.dead_lettered);
        assert_eq!((b.deliveries, b.acks), (2, 0));
        // A late ack of a dead-lettered message is accepted as stale, and shows in the books.
        let r = h.ack("q", &[&lease(&m)], &[]).await;
        assert_eq!(r["ackCount"], 1);
        let s = h.emu.stats("q");
        assert_eq!((s.stale_acks, s.unknown_leases, s.double_acks), (1, 0, 0));
        assert_eq!(h.emu.books("q")[0].acks, 1);
    }

    #[tokio::test]
    async fn lease_expiry_past_max_retries_dead_letters() {
        let h = harness(EmulatorOptions {
            max_retries: 0,
            ..EmulatorOptions::default()
        })
        .await;
        text(&h.emu, "q", "x");
        assert_eq!(h.pull_messages("q", json!({})).await.len(), 1);
        h.emu.advance(Duration::from_secs(31));
        let s = h.emu.stats("q");
        assert_eq!(
            (s.lease_expired, s.dead_lettered, s.backlog, s.in_flight),
            (1, 1, 0, 0)
        );
        assert!(h.pull_messages("q", json!({})).await.is_empty());
    }

    #[tokio::test]
    async fn stale_ack_is_accepted_and_counted() {
        let h = harness(EmulatorOptions::default()).await;
        text(&h.emu, "q", "x");
        let old = h
            .pull_messages("q", json!({"visibility_timeout_ms": 1000}))
            .await
            .remove(0);
        h.emu.advance(Duration::from_secs(2));
        let new = h.pull_messages("q", json!({})).await.remove(0);
        assert_eq!(new["attempts"], 2);

        let r = h.ack("q", &[&lease(&old)], &[]).await;
        assert_eq!(
            r["ackCount"], 1,
            "a late ack is accepted like on Cloudflare"
        );
        let s = h.emu.stats("q");
        assert_eq!(
            (s.acked, s.stale_acks, s.backlog, s.in_flight),
            (1, 1, 0, 0)
        );

        // The redelivery's holder now acks a message that is gone: accepted (Cloudflare is
        // permissive), and a double ack in the books and the stats.
        let r = h.ack("q", &[&lease(&new)], &[]).await;
        assert_eq!(r["ackCount"], 1);
        let s = h.emu.stats("q");
        assert_eq!((s.acked, s.double_acks, s.unknown_leases), (2, 1, 0));
        assert_eq!(h.emu.books("q")[0].acks, 2);
        assert_eq!(h.emu.books("q")[0].lease_answers, vec![1, 1]);

        // Expired but not yet redelivered: still accepted as stale.
        text(&h.emu, "q", "y");
        let m = h
            .pull_messages("q", json!({"visibility_timeout_ms": 1000}))
            .await
            .remove(0);
        h.emu.advance(Duration::from_secs(2));
        assert_eq!(h.ack("q", &[&lease(&m)], &[]).await["ackCount"], 1);
        assert_eq!(h.emu.stats("q").stale_acks, 2);
        assert!(h.pull_messages("q", json!({})).await.is_empty());
    }

    #[tokio::test]
    async fn unknown_lease_is_a_warning() {
        let h = harness(EmulatorOptions::default()).await;
        let r = h.ack("q", &["no-such-lease"], &[("other-lease", 5)]).await;
        assert_eq!(
            (r["ackCount"].as_u64(), r["retryCount"].as_u64()),
            (Some(0), Some(0))
        );
        let w = r["warnings"].as_object().expect("warnings map");
        assert!(
            w.contains_key("no-such-lease") && w.contains_key("other-lease"),
            "{r}"
        );
        let s = h.emu.stats("q");
        assert_eq!(
            (s.unknown_leases, s.ack_calls, s.acked, s.retried),
            (2, 1, 0, 0)
        );
    }

    #[tokio::test]
    async fn backlog_figures() {
        let h = harness(EmulatorOptions::default()).await;
        assert!(
            h.pull("q", json!({})).await["metadata"]["metrics"]["oldest_message_timestamp_ms"] == 0
        );
        text(&h.emu, "q", "aaaa");
        h.emu
            .publish("q", Some(ContentType::Bytes), &[1, 2, 3], Duration::ZERO)
            .expect("publish");
        h.emu
            .publish(
                "q",
                Some(ContentType::Text),
                b"later",
                Duration::from_secs(60),
            )
            .expect("publish");
        let first_ts = {
            let r = h.pull("q", json!({"batch_size": 1})).await;
            assert_eq!(r["messages"].as_array().map(Vec::len), Some(1));
            assert_eq!(r["message_backlog_count"], 3);
            let m = &r["metadata"]["metrics"];
            assert_eq!(m["backlog_count"], 3);
            // "aaaa" + base64 "AQID" + "later"
            assert_eq!(m["backlog_bytes"], 4 + 4 + 5);
            assert_eq!(
                m["oldest_message_timestamp_ms"],
                r["messages"][0]["timestamp_ms"]
            );
            r["messages"][0]["timestamp_ms"].clone()
        };
        let s = h.emu.stats("q");
        assert_eq!((s.backlog, s.in_flight, s.published), (3, 1, 3));

        // The delayed one is not handed out; acking the oldest moves the oldest timestamp on.
        let m = h.pull_messages("q", json!({"batch_size": 100})).await;
        assert_eq!(m.len(), 1);
        let leases = [lease(&m[0])];
        let r = h.pull("q", json!({})).await;
        assert_eq!(
            r["metadata"]["metrics"]["oldest_message_timestamp_ms"],
            first_ts
        );
        h.ack("q", &[leases[0].as_str()], &[]).await;
        let r = h.pull("q", json!({})).await;
        assert_eq!(r["message_backlog_count"], 2);
        assert_eq!(r["metadata"]["metrics"]["backlog_bytes"], 4 + 5);
    }

    #[tokio::test]
    async fn content_types_encode_for_the_wire() {
        let h = harness(EmulatorOptions::default()).await;
        let bytes: Vec<u8> = (0..=255u8).collect();
        let json_text = br#"{"a":[1,2.5,null],"s":"\u00fc"}"#;
        let cases: Vec<(Option<ContentType>, Vec<u8>, String)> = vec![
            (
                Some(ContentType::Text),
                "ünï \"q\"\n".into(),
                "ünï \"q\"\n".into(),
            ),
            (Some(ContentType::Text), Vec::new(), String::new()),
            (
                Some(ContentType::Json),
                json_text.to_vec(),
                STANDARD.encode(json_text),
            ),
            (
                Some(ContentType::Bytes),
                bytes.clone(),
                STANDARD.encode(&bytes),
            ),
            (Some(ContentType::V8), vec![0xff, 0x0f, 0x6f], "/w9v".into()),
            (None, b"plain".to_vec(), "plain".into()),
        ];
        for (ct, payload, _) in &cases {
            h.emu
                .publish("q", *ct, payload, Duration::ZERO)
                .expect("publish");
        }
        let msgs = h.pull_messages("q", json!({"batch_size": 100})).await;
        assert_eq!(msgs.len(), cases.len());
        for ((ct, _, wire), m) in cases.iter().zip(&msgs) {
            assert_eq!(m["body"], wire.as_str(), "{ct:?}");
            match ct {
                Some(ct) => assert_eq!(
                    m["metadata"],
                    json!({"CF-Content-Type": ct.as_str(), "CF-sourceMessageSource": "api"})
                ),
                None => assert_eq!(
                    m["metadata"],
                    json!({"CF-sourceMessageSource": "api"}),
                    "no CF-Content-Type key"
                ),
            }
        }

        let e = &h.emu;
        assert_eq!(
            e.publish("q", Some(ContentType::Text), b"\xff", Duration::ZERO),
            Err(PublishError::NotUtf8)
        );
        assert_eq!(
            e.publish("q", None, b"\xc3", Duration::ZERO),
            Err(PublishError::NotUtf8)
        );
        assert!(matches!(
            e.publish("q", Some(ContentType::Json), b"{nope", Duration::ZERO),
            Err(PublishError::InvalidJson(_))
        ));
        assert!(matches!(
            e.publish("q", Some(ContentType::Json), b"", Duration::ZERO),
            Err(PublishError::InvalidJson(_))
        ));
        assert!(matches!(
            e.publish(
                "q",
                Some(ContentType::Bytes),
                &vec![0; MAX_MESSAGE_BYTES + 1],
                Duration::ZERO
            ),
            Err(PublishError::TooLarge { .. })
        ));
        assert!(matches!(
            e.publish(
                "q",
                Some(ContentType::Text),
                b"x",
                Duration::from_secs(86_401)
            ),
            Err(PublishError::DelayTooLong(_))
        ));
        assert_eq!(e.stats("q").published, cases.len() as u64);

        for ct in [
            ContentType::Text,
            ContentType::Json,
            ContentType::Bytes,
            ContentType::V8,
        ] {
            assert_eq!(ct.as_str().parse::<ContentType>(), Ok(ct));
        }
        assert!("JSON".parse::<ContentType>().is_err());
    }

    #[tokio::test]
    async fn json_raw_puts_the_json_text_on_the_wire() {
        let h = harness(EmulatorOptions {
            json_raw: true,
            ..EmulatorOptions::default()
        })
        .await;
        h.emu
            .publish(
                "q",
                Some(ContentType::Json),
                br#"{"k": [1, 2]}"#,
                Duration::ZERO,
            )
            .expect("publish");
        let m = h.pull_messages("q", json!({})).await.remove(0);
        assert_eq!(m["body"], r#"{"k": [1, 2]}"#);
        assert_eq!(m["metadata"]["CF-Content-Type"], "json");
    }

    #[tokio::test]
    async fn http_publish_single_and_batch() {
        let h = harness(EmulatorOptions::default()).await;
        let single = h.url("q", "");
        let one = |body: Value| h.post(&single, body);
        let (st, v) = one(json!({"body": {"a": 1}})).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["success"], true);
        // The SDK's MessagePushResponse: the queue's metrics after the publish.
        assert_eq!(
            v["result"]["metadata"]["metrics"]["backlog_count"], 1,
            "{v}"
        );
        assert_eq!(
            one(json!({"body": "hi", "content_type": "text"})).await.0,
            200
        );
        assert_eq!(
            one(json!({"body": "AQID", "content_type": "bytes"}))
                .await
                .0,
            200
        );
        assert_eq!(
            one(json!({"body": "AQI", "content_type": "bytes"})).await.0,
            200
        );
        assert_eq!(
            one(json!({"body": "x", "content_type": "text", "delay_seconds": 30}))
                .await
                .0,
            200
        );
        for (bad, code) in [
            (json!({"body": 5, "content_type": "text"}), 10207),
            (json!({"body": "%%%", "content_type": "bytes"}), 10207),
            (json!({"body": 1, "content_type": "yaml"}), 10203),
            (json!({"body": 1, "delay_seconds": 86_401}), 10203),
            (json!({"body": 1, "delay_seconds": 1.5}), 10203),
            (json!({"content_type": "json"}), 10207),
        ] {
            let (st, v) = one(bad.clone()).await;
            assert_eq!(st, 400, "{bad} → {v}");
            assert_eq!(v["success"], false);
            assert_eq!(v["errors"][0]["code"], code, "{bad} → {v}");
        }
        let (st, _, _) = h.raw(&h.url("q", ""), "").await;
        assert_eq!(st, 400);

        let (st, v) = h
            .post(
                &h.url("q", "/batch"),
                json!({"messages": [
                    {"body": [1, "two"]},
                    {"body": "t", "content_type": "text", "delay_seconds": 0},
                ], "delay_seconds": 5}),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(
            v["result"]["metadata"]["metrics"]["backlog_count"], 7,
            "{v}"
        );
        // A batch with one bad message publishes nothing.
        let (st, _) = h
            .post(
                &h.url("q", "/batch"),
                json!({"messages": [{"body": "ok", "content_type": "text"}, {"body": 1, "content_type": "text"}]}),
            )
            .await;
        assert_eq!(st, 400);
        assert_eq!(h.emu.stats("q").published, 7);

        let msgs = h.pull_messages("q", json!({"batch_size": 100})).await;
        let bodies: Vec<&str> = msgs.iter().filter_map(|m| m["body"].as_str()).collect();
        // The delayed ones (single: 30 s, batch default: 5 s) are held back.
        assert_eq!(
            bodies,
            [
                STANDARD.encode(br#"{"a":1}"#).as_str(),
                "hi",
                "AQID",
                "AQI=",
                "t"
            ]
        );
        h.emu.advance(Duration::from_secs(6));
        let msgs = h.pull_messages("q", json!({})).await;
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0]["body"], STANDARD.encode(br#"[1,"two"]"#));
        assert_eq!(msgs[0]["metadata"]["CF-Content-Type"], "json");
    }

    #[tokio::test]
    async fn pull_validates_parameters_and_hands_out_five_in_fifo_order() {
        let h = harness(EmulatorOptions::default()).await;
        let ids: Vec<String> = (0..7)
            .map(|i| text(&h.emu, "q", &format!("m{i}")))
            .collect();
        for bad in [
            json!({"batch_size": 0}),
            json!({"batch_size": 101}),
            json!({"batch_size": -1}),
            json!({"batch_size": 2.5}),
            json!({"batch_size": "5"}),
            json!({"visibility_timeout_ms": 0}),
            json!({"visibility_timeout_ms": 43_200_001}),
            json!({"visibility_timeout_ms": 1000.5}),
        ] {
            let (st, v) = h.post(&h.url("q", "/pull"), bad.clone()).await;
            assert_eq!(st, 400, "{bad} → {v}");
            assert_eq!(v["success"], false);
            assert_eq!(v["errors"][0]["code"], 10207);
            assert!(
                v["errors"][0]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        }
        let (st, _, v) = h.raw(&h.url("q", "/pull"), "{not json").await;
        assert_eq!((st, &v["errors"][0]["code"]), (400, &json!(10208)));
        assert_eq!(
            h.emu.stats("q").deliveries,
            0,
            "refused pulls hand out nothing"
        );

        // An empty body is the defaults: 5 messages, oldest first.
        let (st, _, v) = h.raw(&h.url("q", "/pull"), "").await;
        assert_eq!(st, 200);
        let got: Vec<&str> = v["result"]["messages"]
            .as_array()
            .map(|a| a.iter().filter_map(|m| m["id"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(got, ids[..5].iter().map(String::as_str).collect::<Vec<_>>());
        let rest = h
            .pull_messages(
                "q",
                json!({"batch_size": 100, "visibility_timeout_ms": 43_200_000}),
            )
            .await;
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0]["id"], ids[5].as_str());
    }

    #[tokio::test]
    async fn ack_rejects_an_out_of_range_delay_without_effect() {
        let h = harness(EmulatorOptions::default()).await;
        text(&h.emu, "q", "x");
        let m = h.pull_messages("q", json!({})).await.remove(0);
        let body = json!({"acks": [{"lease_id": lease(&m)}], "retries": [{"lease_id": "z", "delay_seconds": 86_401}]});
        let (st, v) = h.post(&h.url("q", "/ack"), body).await;
        assert_eq!(st, 400, "{v}");
        let s = h.emu.stats("q");
        assert_eq!((s.acked, s.in_flight, s.unknown_leases), (0, 1, 0));
        // Empty and partial bodies are fine.
        assert_eq!(h.raw(&h.url("q", "/ack"), "").await.0, 200);
        assert_eq!(h.raw(&h.url("q", "/ack"), r#"{"acks": null}"#).await.0, 200);
        let r = h.ack("q", &[&lease(&m)], &[]).await;
        assert_eq!(r["ackCount"], 1);
    }

    #[tokio::test]
    async fn publish_limits_follow_cloudflare() {
        let h = strict(&["q"]).await;
        let code_of = |(st, v): (u16, Value)| (st, v["errors"][0]["code"].as_u64().unwrap_or(0));
        let text_of = |n: usize| "a".repeat(n);
        // 128 KB = 128,000 bytes, ~100 of them metadata.
        let fits = MAX_MESSAGE_BYTES - MESSAGE_METADATA_BYTES;
        let one = h.url("q", "");
        assert_eq!(
            code_of(
                h.post(&one, json!({"body": text_of(fits), "content_type": "text"}))
                    .await
            ),
            (200, 0)
        );
        assert_eq!(
            code_of(
                h.post(
                    &one,
                    json!({"body": text_of(fits + 1), "content_type": "text"})
                )
                .await
            ),
            (400, 10204)
        );
        assert_eq!(
            code_of(
                h.post(
                    &one,
                    json!({"body": text_of(131_072), "content_type": "text"})
                )
                .await
            ),
            (400, 10204)
        );
        // 256 KB per batch: 3 × 100 KB does not fit, 2 do.
        let batch = h.url("q", "/batch");
        let msgs = |n: usize| json!({"messages": (0..n).map(|_| json!({"body": text_of(100_000), "content_type": "text"})).collect::<Vec<_>>()});
        assert_eq!(code_of(h.post(&batch, msgs(3)).await), (400, 10205));
        assert_eq!(code_of(h.post(&batch, msgs(2)).await), (200, 0));
        let many = json!({"messages": (0..101).map(|i| json!({"body": i})).collect::<Vec<_>>()});
        assert_eq!(code_of(h.post(&batch, many).await), (400, 10206));
        assert_eq!(
            code_of(
                h.post(&batch, json!({"messages": [], "delay_seconds": 86_401}))
                    .await
            ),
            (400, 10202)
        );
        assert_eq!(
            code_of(
                h.post(
                    &batch,
                    json!({"messages": [{"body": 1}], "delay_seconds": 2.5})
                )
                .await
            ),
            (400, 10202)
        );
        let (st, _, v) = h.raw(&batch, "{\"messages\": [").await;
        assert_eq!(code_of((st, v)), (400, 10208));
        assert_eq!(
            code_of(h.post(&batch, json!({"messages": 5})).await),
            (400, 10207)
        );
        assert_eq!(
            h.emu.stats("q").published,
            3,
            "refused calls publish nothing"
        );
    }

    #[tokio::test]
    async fn whole_floats_are_numbers_and_the_legacy_visibility_field_is_read() {
        let h = strict(&["q"]).await;
        let (st, v) = h
            .post(
                &h.url("q", ""),
                json!({"body": "x", "content_type": "text", "delay_seconds": 0.0}),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        let (st, v) = h
            .post(
                &h.url("q", "/pull"),
                json!({"batch_size": 10.0, "visibility_timeout": 1000}),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        let m = v["result"]["messages"][0].clone();
        h.emu.advance(Duration::from_secs(2));
        assert_eq!(
            h.emu.stats("q").lease_expired,
            1,
            "visibility_timeout (ms) was honoured"
        );
        let m2 = h
            .pull_messages("q", json!({"visibility_timeout_ms": 60_000.0}))
            .await
            .remove(0);
        let r = h.ack("q", &[], &[(&lease(&m2), 0)]).await;
        assert_eq!(r["retryCount"], 1);
        let body = json!({"retries": [{"lease_id": lease(&m), "delay_seconds": 5.5}]});
        let (st, v) = h.post(&h.url("q", "/ack"), body).await;
        assert_eq!((st, &v["errors"][0]["code"]), (400, &json!(10203)), "{v}");
        let body = json!({"retries": [{"lease_id": lease(&m), "delay_seconds": 5.0}]});
        assert_eq!(h.post(&h.url("q", "/ack"), body).await.0, 200);
    }

    #[tokio::test]
    async fn peek_does_not_lease_and_purge_removes() {
        let h = strict(&["q"]).await;
        for i in 0..3 {
            let (st, _) = h.post(&h.url("q", ""), json!({"body": format!("m{i}"), "content_type": "text", "delay_seconds": if i == 2 { 60 } else { 0 }})).await;
            assert_eq!(st, 200);
        }
        let (st, v) = h
            .post(&h.url("q", "/peek"), json!({"batch_size": 10}))
            .await;
        assert_eq!(st, 200, "{v}");
        let peeked = v["result"]["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(peeked.len(), 2, "the delayed one is not ready: {v}");
        assert!(
            peeked[0]["lease_id"].is_null() && peeked[0]["ref"].is_string(),
            "{v}"
        );
        assert_eq!(h.emu.stats("q").deliveries, 0, "a peek leases nothing");
        // Purge the first by its ref; an unknown ref is a warning.
        let refs = json!({"refs": [{"ref": peeked[0]["ref"]}, {"ref": "nope"}]});
        let (st, v) = h.post(&h.url("q", "/purge"), refs).await;
        assert_eq!(st, 200, "{v}");
        assert!(v["result"]["warnings"]["nope"].is_string(), "{v}");
        let msgs = h.pull_messages("q", json!({})).await;
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0]["body"], "m1");
        assert_eq!(msgs[0]["metadata"]["CF-sourceMessageSource"], "api");
        // The whole queue: only when confirmed.
        let purge = format!("{}/accounts/{ACCOUNT}/queues/q/purge", h.base);
        assert_eq!(h.post(&purge, json!({})).await.0, 400);
        let (st, v) = h
            .post(&purge, json!({"delete_messages_permanently": true}))
            .await;
        assert_eq!((st, &v["result"]["queue_name"]), (200, &json!("q")), "{v}");
        let (_, v) = h.call(reqwest::Method::GET, &purge, None).await;
        assert_eq!(v["result"]["completed"], "true");
        let s = h.emu.stats("q");
        assert_eq!((s.purged, s.backlog, s.in_flight), (3, 0, 0));
    }

    #[tokio::test]
    async fn a_double_ack_shows_in_the_books_and_the_stats_endpoint() {
        let h = strict(&["q"]).await;
        text(&h.emu, "q", "once");
        let m = h.pull_messages("q", json!({})).await.remove(0);
        assert_eq!(h.ack("q", &[&lease(&m)], &[]).await["ackCount"], 1);
        let stats = |h: &Harness| {
            let url = format!("{}/_emulator/queues/q/stats", h.base);
            let http = h.http.clone();
            async move {
                let v: Value = http
                    .get(url)
                    .bearer_auth(TOKEN)
                    .send()
                    .await
                    .expect("answer")
                    .json()
                    .await
                    .expect("json");
                v
            }
        };
        let v = stats(&h).await;
        assert_eq!(
            (v["acked"].as_u64(), v["double_acks"].as_u64()),
            (Some(1), Some(0)),
            "{v}"
        );
        // The same lease once more, then in a retry: the books count each item.
        assert_eq!(
            h.ack("q", &[&lease(&m)], &[(&lease(&m), 0)]).await["ackCount"],
            1
        );
        let v = stats(&h).await;
        assert_eq!(
            (
                v["acked"].as_u64(),
                v["double_acks"].as_u64(),
                v["reused_leases"].as_u64(),
                v["retried"].as_u64()
            ),
            (Some(2), Some(1), Some(2), Some(1)),
            "{v}"
        );
        let b = &h.emu.books("q")[0];
        assert_eq!(
            (b.acks, b.lease_answers.clone(), b.retries.clone()),
            (2, vec![3], vec![0])
        );
        // A lease of another queue is unknown here.
        text(&h.emu, "other", "x");
        let o = h.pull_messages("other", json!({})).await.remove(0);
        let r = h.ack("q", &[&lease(&o)], &[]).await;
        assert_eq!(r["ackCount"], 0);
        assert!(r["warnings"][lease(&o)].is_string(), "{r}");
    }
}
