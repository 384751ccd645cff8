//! The routes of queues and their HTTP pull consumers: list, create, show, update, delete.

use crate::store::*;
use crate::types::*;
use crate::wire::*;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;

// Queues and their consumers -------------------------------------------------------------------

pub(crate) fn unknown_account() -> Response {
    fail(
        StatusCode::NOT_FOUND,
        code::QUEUE_NOT_FOUND,
        "Queue does not exist: unknown account",
    )
}

pub(crate) async fn list_queues_handler(
    State(app): State<EmuApp>,
    Path(account): Path<String>,
) -> Response {
    if !app.emu.account_known(&account) {
        return unknown_account();
    }
    let mut queues: Vec<(String, Value)> = app
        .emu
        .lock()
        .queues
        .values()
        .map(|q| (q.name.clone(), q.info()))
        .collect();
    queues.sort_by(|a, b| a.0.cmp(&b.0));
    let queues: Vec<Value> = queues.into_iter().map(|(_, v)| v).collect();
    let n = queues.len();
    axum::Json(serde_json::json!({
        "success": true,
        "errors": [],
        "messages": [],
        "result": queues,
        "result_info": {"page": 1, "per_page": n, "count": n, "total_count": n, "total_pages": 1},
    }))
    .into_response()
}

#[derive(Deserialize, Default)]
pub(crate) struct CreateQueueRequest {
    pub(crate) queue_name: String,
}

/// Cloudflare's queue names: 1 to 63 lowercase letters, digits and dashes.
pub(crate) fn valid_queue_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

pub(crate) async fn create_queue_handler(
    State(app): State<EmuApp>,
    Path(account): Path<String>,
    Body(req): Body<CreateQueueRequest>,
) -> Response {
    if !app.emu.account_known(&account) {
        return unknown_account();
    }
    if !valid_queue_name(&req.queue_name) {
        return bad_request(
            code::BODY_INVALID,
            "queue_name must be 1 to 63 lowercase letters, digits and dashes",
        );
    }
    let mut st = app.emu.lock();
    match st.create(&req.queue_name, false, app.emu.inner.opts.max_retries) {
        Some(q) => ok(q.info()),
        None => fail(
            StatusCode::CONFLICT,
            code::QUEUE_NAME_TAKEN,
            "A queue with this name already exists",
        ),
    }
}

pub(crate) async fn get_queue_handler(
    State(app): State<EmuApp>,
    Path((account, queue_id)): QueuePath,
) -> Response {
    reply(app.emu.with_queue(&account, &queue_id, |q, _, _| q.info()))
}

#[derive(Deserialize, Default)]
pub(crate) struct UpdateQueueRequest {
    pub(crate) queue_name: Option<String>,
    pub(crate) settings: Option<UpdateSettings>,
}

#[derive(Deserialize, Default)]
pub(crate) struct UpdateSettings {
    pub(crate) delivery_delay: Option<serde_json::Number>,
    pub(crate) delivery_paused: Option<bool>,
    pub(crate) message_retention_period: Option<serde_json::Number>,
}

/// `PUT` and `PATCH …/queues/{id}`: rename, and change the settings given (others are kept).
pub(crate) async fn update_queue_handler(
    State(app): State<EmuApp>,
    Path((account, queue_id)): QueuePath,
    Body(req): Body<UpdateQueueRequest>,
) -> Response {
    let settings = req.settings.unwrap_or_default();
    let delay = settings
        .delivery_delay
        .as_ref()
        .map(|n| whole("delivery_delay", Some(n), 0, 0..=MAX_DELAY_SECONDS))
        .transpose();
    let retention = settings
        .message_retention_period
        .as_ref()
        .map(|n| whole("message_retention_period", Some(n), 0, 60..=1_209_600))
        .transpose();
    let (delay, retention) = match (delay, retention) {
        (Ok(d), Ok(r)) => (d, r),
        (Err(e), _) | (_, Err(e)) => return bad_request(code::BODY_INVALID, e),
    };
    if let Some(name) = &req.queue_name
        && !valid_queue_name(name)
    {
        return bad_request(
            code::BODY_INVALID,
            "queue_name must be 1 to 63 lowercase letters, digits and dashes",
        );
    }
    let (id, old_name) = match app.emu.with_queue(&account, &queue_id, |q, _, _| {
        (q.id.clone(), q.name.clone())
    }) {
        Ok(found) => found,
        Err(r) => return r.into_response(),
    };
    let mut st = app.emu.lock();
    if let Some(name) = &req.queue_name
        && *name != old_name
    {
        if st.names.contains_key(name) {
            return fail(
                StatusCode::CONFLICT,
                code::QUEUE_NAME_TAKEN,
                "A queue with this name already exists",
            );
        }
        st.names.remove(&old_name);
        st.names.insert(name.clone(), id.clone());
    }
    let Some(q) = st.queues.get_mut(&id) else {
        return fail(
            StatusCode::NOT_FOUND,
            code::QUEUE_NOT_FOUND,
            "Queue does not exist",
        );
    };
    if let Some(name) = req.queue_name {
        for c in &mut q.consumers {
            c.queue_name.clone_from(&name);
        }
        q.name = name;
    }
    if let Some(d) = delay {
        q.settings.delivery_delay = d;
    }
    if let Some(p) = settings.delivery_paused {
        q.settings.delivery_paused = p;
    }
    if let Some(r) = retention {
        q.settings.message_retention_period = r;
    }
    q.modified_on = rfc3339_now();
    ok(q.info())
}

/// The answer of a delete: the envelope alone (the SDK's `QueueDeleteResponse`).
pub(crate) fn deleted() -> Response {
    axum::Json(serde_json::json!({"success": true, "errors": [], "messages": []})).into_response()
}

pub(crate) async fn delete_queue_handler(
    State(app): State<EmuApp>,
    Path((account, queue_id)): QueuePath,
) -> Response {
    if let Err(r) = app.emu.with_queue(&account, &queue_id, |_, _, _| ()) {
        return r.into_response();
    }
    app.emu.lock().remove(&queue_id);
    deleted()
}

pub(crate) async fn list_consumers_handler(
    State(app): State<EmuApp>,
    Path((account, queue_id)): QueuePath,
) -> Response {
    reply(
        app.emu
            .with_queue(&account, &queue_id, |q, _, _| q.consumers.clone()),
    )
}

#[derive(Deserialize, Default)]
pub(crate) struct CreateConsumerRequest {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) dead_letter_queue: Option<String>,
    #[serde(default)]
    pub(crate) settings: Option<Value>,
}

/// A consumer request's type and settings, checked; `Err` is the 400 answer (10207).
pub(crate) fn consumer_settings(
    req: &CreateConsumerRequest,
    max_retries: u32,
) -> Result<ConsumerSettings, CfRefusal> {
    if req.kind != "http_pull" {
        return Err(refuse(
            code::BODY_INVALID,
            "the emulator serves HTTP pull consumers only: type must be \"http_pull\"",
        ));
    }
    let settings = req.settings.as_ref().unwrap_or(&Value::Null);
    let number = |k: &str, default: u64, range| {
        whole(
            k,
            settings.get(k).and_then(Value::as_number),
            default,
            range,
        )
        .map_err(|e| refuse(code::BODY_INVALID, e))
    };
    Ok(ConsumerSettings {
        batch_size: number("batch_size", DEFAULT_BATCH, 1..=MAX_BATCH)?,
        max_retries: u32::try_from(number("max_retries", u64::from(max_retries), 0..=100)?)
            .unwrap_or(max_retries),
        retry_delay: number("retry_delay", 0, 0..=MAX_DELAY_SECONDS)?,
        visibility_timeout_ms: number(
            "visibility_timeout_ms",
            DEFAULT_VISIBILITY_MS,
            1..=MAX_VISIBILITY_MS,
        )?,
    })
}

pub(crate) async fn create_consumer_handler(
    State(app): State<EmuApp>,
    Path((account, queue_id)): QueuePath,
    Body(req): Body<CreateConsumerRequest>,
) -> Response {
    let max_retries = app.emu.inner.opts.max_retries;
    let settings = match consumer_settings(&req, max_retries) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    reply(app.emu.with_queue(&account, &queue_id, |q, _, _| {
        let mut c = HttpPullConsumer::new(&q.name, max_retries);
        c.settings = settings;
        c.dead_letter_queue = req.dead_letter_queue.unwrap_or_default();
        q.consumers.push(c.clone());
        c
    }))
}

/// `PUT …/consumers/{id}`: new settings (and dead-letter queue) for an HTTP pull consumer.
pub(crate) async fn update_consumer_handler(
    State(app): State<EmuApp>,
    Path((account, queue_id, consumer_id)): Path<(String, String, String)>,
    Body(req): Body<CreateConsumerRequest>,
) -> Response {
    let settings = match consumer_settings(&req, app.emu.inner.opts.max_retries) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let found = app.emu.with_queue(&account, &queue_id, |q, _, _| {
        let c = q
            .consumers
            .iter_mut()
            .find(|c| c.consumer_id == consumer_id)?;
        c.settings = settings;
        if let Some(dlq) = req.dead_letter_queue {
            c.dead_letter_queue = dlq;
        }
        Some(c.clone())
    });
    match found {
        Ok(Some(c)) => ok(c),
        Ok(None) => consumer_not_found(),
        Err(r) => r.into_response(),
    }
}

pub(crate) fn consumer_not_found() -> Response {
    // No Queues code is documented for this: 7003, the API's "no route" (the URI names nothing).
    fail(StatusCode::NOT_FOUND, 7003, "Consumer does not exist")
}

pub(crate) async fn get_consumer_handler(
    State(app): State<EmuApp>,
    Path((account, queue_id, consumer_id)): Path<(String, String, String)>,
) -> Response {
    match app.emu.with_queue(&account, &queue_id, |q, _, _| {
        q.consumers
            .iter()
            .find(|c| c.consumer_id == consumer_id)
            .cloned()
    }) {
        Ok(Some(c)) => ok(c),
        Ok(None) => consumer_not_found(),
        Err(r) => r.into_response(),
    }
}

pub(crate) async fn delete_consumer_handler(
    State(app): State<EmuApp>,
    Path((account, queue_id, consumer_id)): Path<(String, String, String)>,
) -> Response {
    match app.emu.with_queue(&account, &queue_id, |q, _, _| {
        let before = q.consumers.len();
        q.consumers.retain(|c| c.consumer_id != consumer_id);
        q.consumers.len() < before
    }) {
        Ok(true) => deleted(),
        Ok(false) => consumer_not_found(),
        Err(r) => r.into_response(),
    }
}

#[cfg(test)]
mod tests {

    use std::time::Duration;

    use serde_json::{Value, json};

    use super::*;
    use crate::testkit::*;

    #[tokio::test]
    async fn unknown_queues_and_accounts_answer_404_10104() {
        let h = strict(&["dev-queue"]).await;
        let not_found = |(st, v): (u16, Value)| {
            assert_eq!(
                (st, &v["errors"][0]["code"], &v["success"]),
                (404, &json!(10104), &json!(false)),
                "{v}"
            );
        };
        for tail in ["/pull", "/ack", "", "/batch", "/peek"] {
            not_found(
                h.post(&h.url("nope", tail), json!({"body": "x", "messages": []}))
                    .await,
            );
        }
        let other = format!("{}/accounts/other/queues/dev-queue/messages/pull", h.base);
        not_found(h.post(&other, json!({})).await);
        not_found(
            h.call(reqwest::Method::GET, &h.queues_url("other", ""), None)
                .await,
        );
        not_found(
            h.call(reqwest::Method::GET, &h.queues_url(ACCOUNT, "/nope"), None)
                .await,
        );
        let (st, v) = h.post(&h.url("bad%20id", "/pull"), json!({})).await;
        assert_eq!((st, &v["errors"][0]["code"]), (400, &json!(10107)), "{v}");
        assert_eq!(h.emu.stats("nope"), QueueStats::default());
        // The queue is there by name and by id.
        let id = h.emu.queue_id("dev-queue").expect("created");
        assert_eq!(id.len(), 32);
        assert_eq!(h.post(&h.url("dev-queue", "/pull"), json!({})).await.0, 200);
        assert_eq!(h.post(&h.url(&id, "/pull"), json!({})).await.0, 200);
        assert_eq!(h.emu.stats(&id).pull_calls, 2);
    }

    #[tokio::test]
    async fn queues_are_created_listed_shown_and_deleted() {
        use reqwest::Method;
        let h = strict(&["dev-queue"]).await;
        let (st, v) = h.create("orders").await;
        assert_eq!(st, 200, "{v}");
        let id = v["result"]["queue_id"]
            .as_str()
            .expect("queue_id")
            .to_owned();
        assert_eq!(v["result"]["queue_name"], "orders");
        assert_eq!(
            v["result"]["consumers"],
            json!([]),
            "a new queue has no consumer"
        );
        let (st, v) = h.create("orders").await;
        assert_eq!((st, &v["errors"][0]["code"]), (409, &json!(11009)), "{v}");
        let (st, v) = h.create("Bad Name").await;
        assert_eq!((st, &v["errors"][0]["code"]), (400, &json!(10207)), "{v}");

        let (st, v) = h.call(Method::GET, &h.queues_url(ACCOUNT, ""), None).await;
        assert_eq!(st, 200);
        let names: Vec<&str> = v["result"]
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|q| q["queue_name"].as_str())
            .collect();
        assert_eq!(names, ["dev-queue", "orders"]);

        // `--queue` queues come with an HTTP pull consumer, as Cloudflare shows it.
        let (st, v) = h
            .call(Method::GET, &h.queues_url(ACCOUNT, "/dev-queue"), None)
            .await;
        assert_eq!(st, 200, "{v}");
        let c = &v["result"]["consumers"][0];
        assert_eq!(
            (c["type"].as_str(), c["queue_name"].as_str()),
            (Some("http_pull"), Some("dev-queue")),
            "{v}"
        );
        assert_eq!(c["settings"]["visibility_timeout_ms"], 30_000);

        // A consumer added through the API, listed, fetched and deleted.
        let consumers = h.queues_url(ACCOUNT, &format!("/{id}/consumers"));
        let (st, v) = h
            .call(Method::POST, &consumers, Some(json!({"type": "http_pull", "settings": {"batch_size": 50.0, "max_retries": 5}})))
            .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["result"]["settings"]["batch_size"], 50);
        let cid = v["result"]["consumer_id"]
            .as_str()
            .expect("consumer_id")
            .to_owned();
        let (_, v) = h.call(Method::GET, &consumers, None).await;
        assert_eq!(v["result"].as_array().map(Vec::len), Some(1));
        let one = format!("{consumers}/{cid}");
        assert_eq!(h.call(Method::GET, &one, None).await.0, 200);
        // The consumer's max_retries is the queue's: 0 dead-letters at the first failure.
        let (st, v) = h
            .call(
                Method::PUT,
                &one,
                Some(json!({"type": "http_pull", "settings": {"max_retries": 0}})),
            )
            .await;
        assert_eq!(
            (st, &v["result"]["settings"]["max_retries"]),
            (200, &json!(0)),
            "{v}"
        );
        text(&h.emu, &id, "fails once");
        let m = h.pull_messages(&id, json!({})).await.remove(0);
        h.ack(&id, &[], &[(&lease(&m), 0)]).await;
        assert_eq!(h.emu.stats(&id).dead_lettered, 1);
        assert_eq!(h.call(Method::DELETE, &one, None).await.0, 200);
        assert_eq!(h.call(Method::GET, &one, None).await.0, 404);
        let (st, _) = h
            .call(
                Method::POST,
                &consumers,
                Some(json!({"type": "worker", "script_name": "w"})),
            )
            .await;
        assert_eq!(st, 400);

        // Renamed, delayed and paused (PATCH), then resumed (PUT).
        let (st, v) = h
            .call(Method::PATCH, &h.queues_url(ACCOUNT, "/orders"), Some(json!({"queue_name": "orders-v2", "settings": {"delivery_delay": 60.0, "delivery_paused": true}})))
            .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(
            (
                v["result"]["queue_id"].as_str(),
                v["result"]["queue_name"].as_str()
            ),
            (Some(id.as_str()), Some("orders-v2"))
        );
        assert_eq!(v["result"]["settings"]["delivery_delay"], 60);
        text(&h.emu, &id, "held");
        assert!(
            h.pull_messages("orders-v2", json!({})).await.is_empty(),
            "paused"
        );
        let (st, _) = h
            .call(
                Method::PUT,
                &h.queues_url(ACCOUNT, &format!("/{id}")),
                Some(json!({"settings": {"delivery_paused": false}})),
            )
            .await;
        assert_eq!(st, 200);
        assert!(
            h.pull_messages(&id, json!({})).await.is_empty(),
            "delayed by delivery_delay"
        );
        h.emu.advance(Duration::from_secs(61));
        assert_eq!(h.pull_messages(&id, json!({})).await.len(), 1);
        let (st, v) = h
            .call(
                Method::PATCH,
                &h.queues_url(ACCOUNT, &format!("/{id}")),
                Some(json!({"queue_name": "dev-queue"})),
            )
            .await;
        assert_eq!((st, &v["errors"][0]["code"]), (409, &json!(11009)), "{v}");

        // Deleted: gone for every call.
        let (st, v) = h
            .call(
                Method::DELETE,
                &h.queues_url(ACCOUNT, &format!("/{id}")),
                None,
            )
            .await;
        assert_eq!((st, &v["success"]), (200, &json!(true)), "{v}");
        assert_eq!(h.post(&h.url(&id, "/pull"), json!({})).await.0, 404);
        // Created again under its first name: the same id, but the old leases are not its own.
        let (st, v) = h.create("orders").await;
        assert_eq!(
            (st, v["result"]["queue_id"].as_str()),
            (200, Some(id.as_str())),
            "{v}"
        );
        let r = h.ack(&id, &[&lease(&m)], &[]).await;
        assert_eq!(r["ackCount"], 0);
        assert!(r["warnings"][lease(&m)].is_string(), "{r}");
    }
}
