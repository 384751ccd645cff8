//! Cloudflare's wire conventions: the `{success, errors, messages, result}` envelope, error
//! answers with Queues codes, lenient body parsing, and the gate (latency, token, faults) in
//! front of every API call.

use std::time::Duration;

use crate::conn::*;
use crate::handle::*;
use crate::store::*;
use crate::types::*;
use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

// ---------------------------------------------------------------------------------------------
// HTTP

#[derive(Clone)]
pub(crate) struct EmuApp {
    pub(crate) emu: Emulator,
    pub(crate) shutdown: CancellationToken,
}

#[derive(Serialize)]
pub(crate) struct CfEnvelope<T> {
    pub(crate) success: bool,
    pub(crate) errors: Vec<CfError>,
    pub(crate) messages: Vec<String>,
    pub(crate) result: Option<T>,
}

#[derive(Serialize)]
pub(crate) struct CfError {
    pub(crate) code: u32,
    pub(crate) message: String,
}

pub(crate) fn ok<T: Serialize>(result: T) -> Response {
    axum::Json(CfEnvelope {
        success: true,
        errors: Vec::new(),
        messages: Vec::new(),
        result: Some(result),
    })
    .into_response()
}

pub(crate) fn fail(status: StatusCode, code: u32, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(CfEnvelope::<()> {
            success: false,
            errors: vec![CfError {
                code,
                message: message.into(),
            }],
            messages: Vec::new(),
            result: None,
        }),
    )
        .into_response()
}

/// An error answer: HTTP status, one of Cloudflare's error codes, and a message.
#[derive(Debug)]
pub(crate) struct CfRefusal {
    pub(crate) status: StatusCode,
    pub(crate) code: u32,
    pub(crate) message: String,
}

impl CfRefusal {
    pub(crate) fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for CfRefusal {
    fn into_response(self) -> Response {
        fail(self.status, self.code, self.message)
    }
}

/// A 400 answer with one of Cloudflare's Queues error codes.
pub(crate) fn refuse(code: u32, message: impl Into<String>) -> CfRefusal {
    CfRefusal::new(StatusCode::BAD_REQUEST, code, message)
}

/// [`refuse`], as an answer.
pub(crate) fn bad_request(code: u32, message: impl Into<String>) -> Response {
    refuse(code, message).into_response()
}

pub(crate) fn shutting_down() -> Response {
    fail(
        StatusCode::SERVICE_UNAVAILABLE,
        7010,
        "emulator shutting down",
    )
}

/// Parse a JSON request body; an empty body or `null` is the default. `Err` is the 400 answer:
/// code 10208 for a body that is not JSON, 10207 for JSON that does not match the schema.
pub(crate) fn parse<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, CfRefusal> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice::<Option<T>>(body)
        .map(Option::unwrap_or_default)
        .map_err(body_error)
}

/// A JSON request body read as [`parse`] reads it; the rejection is the 400 answer.
pub(crate) struct Body<T>(pub(crate) T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = CfRefusal;

    async fn from_request(req: Request, state: &S) -> Result<Self, CfRefusal> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| CfRefusal::new(e.status(), code::BODY_INVALID, e.body_text()))?;
        parse(&bytes).map(Body)
    }
}

/// A handler's result as an answer: the envelope around it, or the error answer.
pub(crate) fn reply<T: Serialize>(r: Result<T, CfRefusal>) -> Response {
    match r {
        Ok(v) => ok(v),
        Err(r) => r.into_response(),
    }
}

pub(crate) fn body_error(e: serde_json::Error) -> CfRefusal {
    if e.is_syntax() || e.is_eof() {
        refuse(
            code::BODY_MALFORMED,
            format!("Request body is not valid JSON: {e}"),
        )
    } else {
        refuse(
            code::BODY_INVALID,
            format!("Request JSON body does not match expected schema: {e}"),
        )
    }
}

/// Latency and authentication, before every Cloudflare API call (a route layer).
pub(crate) async fn api_gate(State(app): State<EmuApp>, req: Request, next: Next) -> Response {
    let latency = app.emu.inner.opts.latency;
    if !latency.is_zero() && !sleep_or_shutdown(latency, &app.shutdown).await {
        return shutting_down();
    }
    if !app.emu.authorized(req.headers()) {
        return auth_error();
    }
    next.run(req).await
}

/// An injected fault for this call of `op`, if one is queued: `Some` is the answer to give
/// instead of handling it.
pub(crate) async fn fault(app: &EmuApp, op: FaultOp, conn: &ResetSwitch) -> Option<Response> {
    let fault = app.emu.take_fault(op)?;
    debug!(?op, ?fault, "emulator: injecting a fault");
    match fault {
        Fault::Status {
            status,
            body,
            retry_after,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let content_type = if serde_json::from_str::<serde::de::IgnoredAny>(&body).is_ok() {
                "application/json"
            } else {
                "text/plain; charset=utf-8"
            };
            let mut resp = (status, [(header::CONTENT_TYPE, content_type)], body).into_response();
            if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            Some(resp)
        }
        Fault::Delay(d) => {
            if sleep_or_shutdown(d, &app.shutdown).await {
                None
            } else {
                Some(shutting_down())
            }
        }
        Fault::Hang => {
            app.shutdown.cancelled().await;
            conn.reset();
            Some(shutting_down())
        }
        Fault::Reset => {
            conn.reset();
            // Never written: the connection refuses every write from now on and closes.
            Some(StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
    }
}

/// Sleep `d`; `false` if shutdown came first.
pub(crate) async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = shutdown.cancelled() => false,
    }
}

pub(crate) fn auth_error() -> Response {
    fail(
        StatusCode::FORBIDDEN,
        code::AUTHENTICATION,
        "Authentication error",
    )
}

/// `batch_size` of a pull or a peek: 1 to 100, default 5; `Err` is the 400 answer (10207).
pub(crate) fn batch_size(n: &Option<serde_json::Number>) -> Result<usize, CfRefusal> {
    whole("batch_size", n.as_ref(), DEFAULT_BATCH, 1..=MAX_BATCH)
        .map(|v| usize::try_from(v).unwrap_or(1))
        .map_err(|e| refuse(code::BODY_INVALID, e))
}

pub(crate) async fn not_found() -> Response {
    fail(StatusCode::NOT_FOUND, 7003, "No route for that URI")
}

pub(crate) async fn method_not_allowed() -> Response {
    fail(
        StatusCode::METHOD_NOT_ALLOWED,
        7001,
        "Method not allowed for this route",
    )
}

/// `Path` of the routes under `…/queues/{queue_id}`.
pub(crate) type QueuePath = Path<(String, String)>;

impl Emulator {
    /// Run `f` on the queue a URL names, under the lock, after settling due leases and delays;
    /// creates the queue first with [`EmulatorOptions::create_queues_on_use`]. `Err`: the 404
    /// (or 400 for a malformed id) to answer.
    pub(crate) fn with_queue<T>(
        &self,
        account_id: &str,
        queue_id: &str,
        f: impl FnOnce(&mut StoredQueue, Instant, u32) -> T,
    ) -> Result<T, CfRefusal> {
        if !self.account_known(account_id) {
            return Err(CfRefusal::new(
                StatusCode::NOT_FOUND,
                code::QUEUE_NOT_FOUND,
                "Queue does not exist: unknown account",
            ));
        }
        let max_retries = self.inner.opts.max_retries;
        let mut st = self.lock();
        let now = st.now();
        if st.find(queue_id).is_none() && self.inner.opts.create_queues_on_use {
            st.create(queue_id, true, max_retries);
        }
        match st.find(queue_id) {
            Some(q) => {
                let max_retries = q.max_retries(max_retries);
                q.settle(now, max_retries);
                Ok(f(q, now, max_retries))
            }
            None if !queue_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
            {
                Err(CfRefusal::new(
                    StatusCode::BAD_REQUEST,
                    code::QUEUE_ID_MALFORMED,
                    "The queue ID in the request URL is not a valid queue identifier",
                ))
            }
            None => Err(CfRefusal::new(
                StatusCode::NOT_FOUND,
                code::QUEUE_NOT_FOUND,
                "Queue does not exist",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use serde_json::{Value, json};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::testkit::*;
    use crate::{Emulator, EmulatorOptions, Fault, FaultOp};

    #[tokio::test]
    async fn token_is_required() {
        let h = harness(EmulatorOptions::default()).await;
        let url = h.url("q", "/pull");
        for auth in [None, Some("Bearer wrong"), Some(TOKEN)] {
            let mut req = h.http.post(&url).body("{}");
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let resp = req.send().await.expect("answer");
            assert_eq!(resp.status().as_u16(), 403, "{auth:?}");
            let v: Value = resp.json().await.expect("json");
            assert_eq!(v["success"], false);
            assert_eq!(v["errors"][0]["code"], 10000);
            assert_eq!(v["errors"][0]["message"], "Authentication error");
        }
        let stats_url = format!("{}/_emulator/queues/q/stats", h.base);
        let resp = h.http.get(&stats_url).send().await.expect("answer");
        assert_eq!(resp.status().as_u16(), 403);
        // Refused calls did nothing.
        assert_eq!(h.emu.stats("q"), QueueStats::default());

        let resp = h
            .http
            .get(&stats_url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("answer");
        assert_eq!(resp.status().as_u16(), 200);
        let v: Value = resp.json().await.expect("json");
        assert_eq!(v["published"], 0);

        // Without a token option, anything goes.
        let open = Emulator::new(EmulatorOptions::default());
        let stop = CancellationToken::new();
        let addr = open
            .start(SocketAddr::from(([127, 0, 0, 1], 0)), stop.clone())
            .await
            .expect("start");
        let resp = client()
            .post(format!(
                "{}/accounts/a/queues/q/messages/pull",
                Emulator::base_url(addr)
            ))
            .send()
            .await
            .expect("answer");
        assert_eq!(resp.status().as_u16(), 200);
        stop.cancel();
    }

    #[tokio::test]
    async fn fault_status_answers_without_doing_anything() {
        let h = harness(EmulatorOptions::default()).await;
        text(&h.emu, "q", "x");
        h.emu.inject_fault(
            FaultOp::Pull,
            Fault::Status {
                status: 429,
                body: r#"{"success":false,"errors":[{"code":971,"message":"slow down"}]}"#.into(),
                retry_after: Some("7".into()),
            },
        );
        let (st, retry_after, v) = h.raw(&h.url("q", "/pull"), "{}").await;
        assert_eq!((st, retry_after.as_deref()), (429, Some("7")));
        assert_eq!(v["errors"][0]["code"], 971);
        let s = h.emu.stats("q");
        assert_eq!((s.pull_calls, s.deliveries), (0, 0));

        let m = h.pull_messages("q", json!({})).await.remove(0);
        h.emu.inject_fault(
            FaultOp::Ack,
            Fault::Status {
                status: 502,
                body: "bad gateway".into(),
                retry_after: None,
            },
        );
        let (st, v) = h
            .post(
                &h.url("q", "/ack"),
                json!({"acks": [{"lease_id": lease(&m)}]}),
            )
            .await;
        assert_eq!((st, v), (502, json!("bad gateway")));
        assert_eq!(h.emu.stats("q").acked, 0);
        assert_eq!(h.ack("q", &[&lease(&m)], &[]).await["ackCount"], 1);
    }

    #[tokio::test]
    async fn faults_are_one_shot_and_fifo_per_op() {
        let h = harness(EmulatorOptions::default()).await;
        for status in [500, 503] {
            h.emu.inject_fault(
                FaultOp::Pull,
                Fault::Status {
                    status,
                    body: String::new(),
                    retry_after: None,
                },
            );
        }
        // Pull faults do not touch acks.
        h.ack("q", &[], &[]).await;
        let (a, _) = h.post(&h.url("q", "/pull"), json!({})).await;
        let (b, _) = h.post(&h.url("q", "/pull"), json!({})).await;
        let (c, _) = h.post(&h.url("q", "/pull"), json!({})).await;
        assert_eq!((a, b, c), (500, 503, 200));
    }

    #[tokio::test]
    async fn fault_delay_waits_then_handles_the_call() {
        let h = harness(EmulatorOptions::default()).await;
        text(&h.emu, "q", "x");
        h.emu
            .inject_fault(FaultOp::Pull, Fault::Delay(Duration::from_millis(300)));
        let started = std::time::Instant::now();
        let msgs = h.pull_messages("q", json!({})).await;
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(msgs.len(), 1);
        let started = std::time::Instant::now();
        h.pull_messages("q", json!({})).await;
        assert!(started.elapsed() < Duration::from_millis(300), "one-shot");
    }

    #[tokio::test]
    async fn fault_hang_never_answers_until_shutdown() {
        let h = harness(EmulatorOptions::default()).await;
        text(&h.emu, "q", "x");
        h.emu.inject_fault(FaultOp::Ack, Fault::Hang);
        h.emu.inject_fault(FaultOp::Pull, Fault::Hang);
        let err = h
            .http
            .post(h.url("q", "/pull"))
            .bearer_auth(TOKEN)
            .timeout(Duration::from_millis(300))
            .send()
            .await
            .expect_err("no answer");
        assert!(err.is_timeout(), "{err}");
        assert_eq!(h.emu.stats("q").deliveries, 0);

        // A hung call ends with the server's shutdown, without an answer.
        let url = h.url("q", "/ack");
        let pending = tokio::spawn(client().post(url).bearer_auth(TOKEN).body("{}").send());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!pending.is_finished());
        h.stop.cancel();
        let res = tokio::time::timeout(Duration::from_secs(5), pending)
            .await
            .expect("ends at shutdown")
            .expect("task");
        assert!(res.is_err(), "{res:?}");
    }

    #[tokio::test]
    async fn latency_is_added_to_every_api_call() {
        let h = harness(EmulatorOptions {
            latency: Duration::from_millis(150),
            ..EmulatorOptions::default()
        })
        .await;
        let started = std::time::Instant::now();
        h.pull("q", json!({})).await;
        h.ack("q", &[], &[]).await;
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn unknown_routes_answer_with_an_envelope() {
        let h = harness(EmulatorOptions::default()).await;
        let resp = h
            .http
            .get(format!("{}/accounts/a/nothing", h.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("answer");
        assert_eq!(resp.status().as_u16(), 404);
        let v: Value = resp.json().await.expect("json");
        assert_eq!(
            (v["success"].clone(), v["errors"][0]["code"].clone()),
            (json!(false), json!(7003))
        );
        let resp = h
            .http
            .get(h.url("q", "/pull"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("answer");
        assert_eq!(resp.status().as_u16(), 405);
    }
}
