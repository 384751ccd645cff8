//! Properties of the two parsers that take untrusted input (issue 4): the pull/ack answer
//! parser (`cloudflare::interpret`) never panics, whatever the status, body or shape, and maps
//! every answer to a result or a classified error; the body decoder (`delivery::decode_body`)
//! never panics and round-trips text, json and bytes bodies in every encoding Cloudflare uses.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use cfq_relay::cloudflare::{AckResult, ApiError, PullResult, interpret};
use cfq_relay::delivery::{DecodeError, decode_body};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// Keys of the real answers (so generated objects hit the real fields) and a few others.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "success", "errors", "messages", "result", "code", "message", "id", "body",
            "attempts", "lease_id", "metadata", "CF-Content-Type", "timestamp_ms",
            "message_backlog_count", "metrics", "backlog_count", "backlog_bytes",
            "oldest_message_timestamp_ms", "ackCount", "retryCount", "warnings",
        ])
        .prop_map(str::to_owned),
        1 => "[a-zA-Z_-]{0,8}",
    ]
}

/// Any JSON value, numbers of every kind included (negative, huge, fractional).
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// An object with some of `fields`, each holding a typical or an arbitrary value.
fn object_of(fields: Vec<(&'static str, BoxedStrategy<Value>)>) -> BoxedStrategy<Value> {
    let parts: Vec<BoxedStrategy<Option<(String, Value)>>> = fields
        .into_iter()
        .map(|(name, typical)| {
            prop::option::of(prop_oneof![3 => typical, 1 => value()])
                .prop_map(move |v| v.map(|v| (name.to_owned(), v)))
                .boxed()
        })
        .collect();
    parts
        .prop_map(|kv| Value::Object(kv.into_iter().flatten().collect::<Map<_, _>>()))
        .boxed()
}

fn message() -> BoxedStrategy<Value> {
    object_of(vec![
        ("id", "[0-9a-f]{32}".prop_map(Value::String).boxed()),
        ("body", ".{0,20}".prop_map(Value::String).boxed()),
        ("attempts", (0u64..5).prop_map(|n| json!(n)).boxed()),
        (
            "lease_id",
            "[A-Za-z0-9._-]{0,40}".prop_map(Value::String).boxed(),
        ),
        (
            "metadata",
            prop::sample::select(vec!["text", "json", "bytes", "v8", ""])
                .prop_map(|t| json!({ "CF-Content-Type": t }))
                .boxed(),
        ),
        ("timestamp_ms", any::<u64>().prop_map(|n| json!(n)).boxed()),
    ])
}

fn result() -> BoxedStrategy<Value> {
    object_of(vec![
        (
            "messages",
            prop::collection::vec(message(), 0..5)
                .prop_map(Value::Array)
                .boxed(),
        ),
        (
            "message_backlog_count",
            any::<u64>().prop_map(|n| json!(n)).boxed(),
        ),
        (
            "metadata",
            object_of(vec![(
                "metrics",
                object_of(vec![
                    ("backlog_count", any::<u64>().prop_map(|n| json!(n)).boxed()),
                    ("backlog_bytes", any::<u64>().prop_map(|n| json!(n)).boxed()),
                    (
                        "oldest_message_timestamp_ms",
                        any::<u64>().prop_map(|n| json!(n)).boxed(),
                    ),
                ]),
            )]),
        ),
        ("ackCount", any::<u64>().prop_map(|n| json!(n)).boxed()),
        ("retryCount", any::<u64>().prop_map(|n| json!(n)).boxed()),
        (
            "warnings",
            prop_oneof![
                prop::collection::vec(".{0,10}".prop_map(Value::String), 0..3)
                    .prop_map(Value::Array),
                prop::collection::vec((".{0,10}", ".{0,10}"), 0..3).prop_map(|kv| {
                    Value::Object(
                        kv.into_iter()
                            .map(|(k, v)| (k, Value::String(v)))
                            .collect::<Map<_, _>>(),
                    )
                }),
                Just(Value::Null),
            ]
            .boxed(),
        ),
    ])
}

fn envelope() -> BoxedStrategy<Value> {
    object_of(vec![
        ("success", any::<bool>().prop_map(Value::Bool).boxed()),
        (
            "errors",
            prop::collection::vec(
                object_of(vec![
                    ("code", any::<u32>().prop_map(|n| json!(n)).boxed()),
                    ("message", ".{0,20}".prop_map(Value::String).boxed()),
                ]),
                0..3,
            )
            .prop_map(Value::Array)
            .boxed(),
        ),
        ("result", result()),
    ])
}

fn status() -> impl Strategy<Value = u16> {
    prop_oneof![
        3 => prop::sample::select(vec![200u16, 201, 204, 301, 400, 401, 403, 404, 408, 429, 500, 502, 503]),
        1 => any::<u16>(),
    ]
}

fn retry_after() -> impl Strategy<Value = Option<Duration>> {
    prop::option::of((0u64..100_000).prop_map(Duration::from_secs))
}

/// What `interpret` must make of any answer, whatever the body: the status decides first.
fn check_classification<T: std::fmt::Debug>(
    status: u16,
    retry: Option<Duration>,
    r: &Result<T, ApiError>,
) {
    match (status, r) {
        (429, Err(ApiError::RateLimited { retry_after })) => assert_eq!(*retry_after, retry),
        (429, other) => panic!("429 gave {other:?}"),
        (401 | 403, Err(e)) => {
            assert!(e.is_auth());
            assert!(e.to_string().contains("permission"), "{e}");
        }
        (401 | 403, other) => panic!("{status} gave {other:?}"),
        (s, Err(ApiError::Status { status, .. })) if !(200..300).contains(&s) => {
            assert_eq!(*status, s)
        }
        (s, other) if !(200..300).contains(&s) => panic!("{s} gave {other:?}"),
        (_, Err(e)) => assert!(
            matches!(
                e,
                ApiError::Malformed { .. } | ApiError::Unsuccessful { .. }
            ),
            "{e:?}"
        ),
        (_, Ok(_)) => {}
    }
    if let Err(e) = r {
        // Every error has a one-line description (log lines cannot be split or forged from
        // the answer) and a metric label.
        let text = e.to_string();
        assert!(!text.contains(['\n', '\r']), "{text:?}");
        assert!(!e.class().as_label().is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn interpret_never_panics_on_any_bytes(
        status in status(),
        retry in retry_after(),
        body in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        check_classification(status, retry, &interpret::<PullResult>(status, retry, &body));
        check_classification(status, retry, &interpret::<AckResult>(status, retry, &body));
    }

    #[test]
    fn interpret_never_panics_on_any_json(
        status in status(),
        retry in retry_after(),
        v in prop_oneof![envelope(), value()],
    ) {
        let body = serde_json::to_vec(&v).unwrap();
        check_classification(status, retry, &interpret::<PullResult>(status, retry, &body));
        check_classification(status, retry, &interpret::<AckResult>(status, retry, &body));
    }

    /// A successful pull keeps every message object it carries, however odd its fields: none
    /// is lost to a parse error (those without a usable lease id are skipped later, counted).
    #[test]
    fn a_successful_pull_keeps_every_message(messages in prop::collection::vec(message(), 0..8)) {
        let n = messages.len();
        let body = serde_json::to_vec(&json!({
            "success": true, "errors": [], "result": { "messages": messages }
        }))
        .unwrap();
        let r = interpret::<PullResult>(200, None, &body).unwrap();
        prop_assert_eq!(r.messages.len(), n);
    }

    #[test]
    fn decode_never_panics(
        content_type in prop::option::of(prop_oneof![
            prop::sample::select(vec!["text", "json", "bytes", "v8", "JSON", "Bytes"])
                .prop_map(str::to_owned),
            ".{0,8}",
        ]),
        body in ".{0,200}",
    ) {
        // Whatever comes in, the answer follows the content type: v8 is refused, json and
        // bytes decode or name their error, anything else travels as the text it is.
        let kind = content_type.as_deref().map(str::to_ascii_lowercase);
        let decoded = decode_body(content_type.as_deref(), body.clone());
        match (kind.as_deref(), decoded) {
            (Some("v8"), r) => prop_assert!(matches!(r, Err(DecodeError::V8)), "{:?}", r),
            (Some("json"), Ok(p)) => {
                prop_assert_eq!(p.content_type, "application/json");
                prop_assert!(serde_json::from_slice::<Value>(&p.bytes).is_ok());
            }
            (Some("json"), Err(e)) => prop_assert!(matches!(e, DecodeError::Json), "{:?}", e),
            (Some("bytes"), Ok(p)) => prop_assert_eq!(p.content_type, "application/octet-stream"),
            (Some("bytes"), Err(e)) => {
                prop_assert!(matches!(e, DecodeError::Base64("bytes")), "{:?}", e)
            }
            (_, Ok(p)) => {
                prop_assert_eq!(p.content_type, "text/plain; charset=utf-8");
                prop_assert_eq!(p.bytes.as_ref(), body.as_bytes());
            }
            (_, Err(e)) => prop_assert!(false, "text refused: {:?}", e),
        }
    }

    #[test]
    fn text_round_trips(body in ".{0,200}", ct in prop::sample::select(vec![Some("text"), None, Some("unknown")])) {
        let p = decode_body(ct, body.clone()).unwrap();
        prop_assert_eq!(p.bytes.as_ref(), body.as_bytes());
        prop_assert_eq!(p.content_type, "text/plain; charset=utf-8");
    }

    #[test]
    fn bytes_round_trip_in_every_base64_flavour(
        raw in prop::collection::vec(any::<u8>(), 0..300),
        flavour in 0usize..4,
    ) {
        let engine = &[STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD][flavour];
        let p = decode_body(Some("bytes"), engine.encode(&raw)).unwrap();
        prop_assert_eq!(p.bytes.as_ref(), raw.as_slice());
        prop_assert_eq!(p.content_type, "application/octet-stream");
    }

    /// JSON arrives base64-encoded (any flavour) or as the raw text; either way the webhook
    /// gets the JSON text, byte for byte.
    #[test]
    fn json_round_trips_base64_or_raw(
        v in value(),
        pretty in any::<bool>(),
        flavour in 0usize..5,
    ) {
        let text = if pretty {
            serde_json::to_string_pretty(&v).unwrap()
        } else {
            serde_json::to_string(&v).unwrap()
        };
        let wire = match flavour {
            0 => STANDARD.encode(&text),
            1 => STANDARD_NO_PAD.encode(&text),
            2 => URL_SAFE.encode(&text),
            3 => URL_SAFE_NO_PAD.encode(&text),
            _ => text.clone(),
        };
        let p = decode_body(Some("json"), wire).unwrap();
        prop_assert_eq!(p.bytes.as_ref(), text.as_bytes());
        prop_assert_eq!(p.content_type, "application/json");
    }
}
