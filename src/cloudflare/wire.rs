//! What the Cloudflare Queues API answers: the envelope, the pull and ack results, and their
//! lenient decoding (a field of the wrong type is absent, never an error), read in one pass.

use serde::Deserialize;
use serde::de::{self, Deserializer};

/// The envelope of every Cloudflare API answer. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ApiEnvelope<T> {
    pub success: Option<bool>,
    #[serde(deserialize_with = "lenient_vec")]
    pub errors: Vec<ApiMessage>,
    pub result: Option<T>,
}

/// One entry of `errors`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct ApiMessage {
    #[serde(deserialize_with = "lenient_u64")]
    pub code: Option<u64>,
    pub message: Option<String>,
}

/// `result` of a pull.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PullResult {
    #[serde(deserialize_with = "lenient_messages")]
    pub messages: Vec<PulledMessage>,
    #[serde(deserialize_with = "lenient_u64")]
    pub message_backlog_count: Option<u64>,
    #[serde(deserialize_with = "lenient_object")]
    pub metadata: Option<PullMetadata>,
}

/// `result.metadata` of a pull.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PullMetadata {
    #[serde(deserialize_with = "lenient_object")]
    pub metrics: Option<BacklogMetrics>,
}

/// `result.metadata.metrics`: best-effort backlog figures.
#[derive(Debug, Default, Clone, Copy, PartialEq, Deserialize)]
#[serde(default)]
pub struct BacklogMetrics {
    #[serde(deserialize_with = "lenient_u64")]
    pub backlog_count: Option<u64>,
    #[serde(deserialize_with = "lenient_u64")]
    pub backlog_bytes: Option<u64>,
    #[serde(deserialize_with = "lenient_u64")]
    pub oldest_message_timestamp_ms: Option<u64>,
}

/// One pulled message as it comes off the wire; every field may be missing. Deserialized by
/// hand (`MessageVisitor`) in one pass over the answer: a field of the wrong type is `None`.
#[derive(Debug, Default)]
pub struct PulledMessage {
    pub id: Option<String>,
    /// `None` when missing or not a string (a number, an object, `null`): the message cannot
    /// be read, and must never be taken for an empty one (`""`).
    pub body: Option<String>,
    pub attempts: Option<u64>,
    pub lease_id: Option<String>,
    /// `None` when absent or not an object.
    pub metadata: Option<MessageMetadata>,
    pub timestamp_ms: Option<u64>,
}

impl PulledMessage {
    /// The `CF-Content-Type` metadata value, if it is a string.
    pub fn content_type(&self) -> Option<&str> {
        self.metadata.as_ref()?.content_type.as_deref()
    }

    /// The same, taken out of the message (no copy).
    pub fn take_content_type(&mut self) -> Option<String> {
        self.metadata.as_mut()?.content_type.take()
    }
}

/// What the relay reads of a message's `metadata` object (read in the same pass, without a
/// map of it): the content type.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MessageMetadata {
    /// The `CF-Content-Type` value (the key in any case), if it is a string.
    pub content_type: Option<String>,
}

impl PullResult {
    /// The backlog figures, preferring `metadata.metrics` and falling back to
    /// `message_backlog_count`.
    pub fn backlog(&self) -> BacklogMetrics {
        let mut m = self
            .metadata
            .as_ref()
            .and_then(|m| m.metrics)
            .unwrap_or_default();
        if m.backlog_count.is_none() {
            m.backlog_count = self.message_backlog_count;
        }
        m
    }
}

/// `result` of an ack call.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct AckResult {
    #[serde(rename = "ackCount", deserialize_with = "lenient_u64")]
    pub ack_count: Option<u64>,
    #[serde(rename = "retryCount", deserialize_with = "lenient_u64")]
    pub retry_count: Option<u64>,
    #[serde(deserialize_with = "lenient_warnings")]
    pub warnings: Vec<String>,
}

// ---- lenient deserializers: a wrong type becomes "absent", never an error ----

// A pull answer carries up to 100 messages of up to 128 KB each: these read it in one pass,
// without building a `serde_json::Value` of it first.

/// Visitor methods for the JSON kinds a lenient reader does not want: each value is read to its
/// end (so the parse goes on) and becomes `$empty`. `skip!(None; bool, unit, seq)` writes
/// `visit_bool`, `visit_unit` and `visit_seq`.
macro_rules! skip {
    ($empty:expr; $($kind:ident),+ $(,)?) => { $( skip!(@$kind $empty); )+ };
    (@bool $empty:expr) => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> { Ok($empty) }
    };
    (@u64 $empty:expr) => {
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> { Ok($empty) }
    };
    (@i64 $empty:expr) => {
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> { Ok($empty) }
    };
    (@f64 $empty:expr) => {
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> { Ok($empty) }
    };
    (@str $empty:expr) => {
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> { Ok($empty) }
    };
    (@unit $empty:expr) => {
        fn visit_unit<E>(self) -> Result<Self::Value, E> { Ok($empty) }
    };
    (@none $empty:expr) => {
        fn visit_none<E>(self) -> Result<Self::Value, E> { Ok($empty) }
    };
    (@seq $empty:expr) => {
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<de::IgnoredAny>()?.is_some() {}
            Ok($empty)
        }
    };
    (@map $empty:expr) => {
        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<de::IgnoredAny, de::IgnoredAny>()?.is_some() {}
            Ok($empty)
        }
    };
}

fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct V;
    impl<'de> de::Visitor<'de> for V {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("anything (a number or a numeric string counts)")
        }
        fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
            Ok(u64::try_from(v).ok())
        }
        fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
            Ok((v >= 0.0).then_some(v as u64))
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(v.trim().parse::<u64>().ok())
        }
        skip!(None; bool, unit, none, seq, map);
    }
    d.deserialize_any(V)
}

fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    d.deserialize_any(LenientString)
}

/// A string, or `None` for any other JSON value.
struct LenientString;

impl<'de> de::Visitor<'de> for LenientString {
    type Value = Option<String>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("anything (a string counts)")
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Some(v))
    }
    skip!(None; u64, i64, f64, bool, unit, none, seq, map);
}

/// `messages`: an array whose objects become messages; anything else in it (or instead of it)
/// is skipped.
fn lenient_messages<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PulledMessage>, D::Error> {
    struct Items;
    impl<'de> de::Visitor<'de> for Items {
        type Value = Vec<PulledMessage>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an array of messages")
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(100));
            while let Some(item) = seq.next_element::<MaybeMessage>()? {
                out.extend(item.0);
            }
            Ok(out)
        }
        skip!(Vec::new(); map, str, bool, u64, i64, f64, unit);
    }
    d.deserialize_any(Items)
}

/// One item of `messages`: a message if it is an object, else `None`.
struct MaybeMessage(Option<PulledMessage>);

impl<'de> Deserialize<'de> for MaybeMessage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Option<PulledMessage>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a message object")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                MessageVisitor.visit_map(map).map(Some)
            }
            skip!(None; str, u64, i64, f64, bool, unit, seq);
        }
        d.deserialize_any(V).map(MaybeMessage)
    }
}

impl<'de> Deserialize<'de> for PulledMessage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(MessageVisitor)
    }
}

/// The fields of a message object; a key given twice counts once, the last one (as in a
/// JSON object read into a map); unknown keys are skipped.
struct MessageVisitor;

impl<'de> de::Visitor<'de> for MessageVisitor {
    type Value = PulledMessage;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a message object")
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<PulledMessage, A::Error> {
        /// A field's value through one of the lenient readers.
        struct Field<T>(T);
        macro_rules! lenient {
            ($t:ty, $read:path) => {
                impl<'de> Deserialize<'de> for Field<$t> {
                    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                        $read(d).map(Field)
                    }
                }
            };
        }
        lenient!(Option<String>, lenient_string);
        lenient!(Option<u64>, lenient_u64);
        lenient!(Option<MessageMetadata>, lenient_metadata);

        let mut m = PulledMessage::default();
        while let Some(Key(key)) = map.next_key::<Key<MessageKey>>()? {
            match key {
                MessageKey::Id => m.id = map.next_value::<Field<_>>()?.0,
                MessageKey::Body => m.body = map.next_value::<Field<_>>()?.0,
                MessageKey::Attempts => m.attempts = map.next_value::<Field<_>>()?.0,
                MessageKey::LeaseId => m.lease_id = map.next_value::<Field<_>>()?.0,
                MessageKey::Metadata => m.metadata = map.next_value::<Field<_>>()?.0,
                MessageKey::TimestampMs => m.timestamp_ms = map.next_value::<Field<_>>()?.0,
                MessageKey::Other => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(m)
    }
}

/// The keys of a message object, matched without allocating.
enum MessageKey {
    Id,
    Body,
    Attempts,
    LeaseId,
    Metadata,
    TimestampMs,
    Other,
}

impl From<&str> for MessageKey {
    fn from(key: &str) -> Self {
        match key {
            "id" => MessageKey::Id,
            "body" => MessageKey::Body,
            "attempts" => MessageKey::Attempts,
            "lease_id" => MessageKey::LeaseId,
            "metadata" => MessageKey::Metadata,
            "timestamp_ms" => MessageKey::TimestampMs,
            _ => MessageKey::Other,
        }
    }
}

/// A message's `metadata`: an object (its `CF-Content-Type` string kept, everything else
/// skipped), else `None`.
fn lenient_metadata<'de, D: Deserializer<'de>>(d: D) -> Result<Option<MessageMetadata>, D::Error> {
    struct V;
    impl<'de> de::Visitor<'de> for V {
        type Value = Option<MessageMetadata>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a metadata object")
        }
        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut meta = MessageMetadata::default();
            while let Some(Key(ContentTypeKey(is_content_type))) = map.next_key()? {
                if is_content_type {
                    meta.content_type = map.next_value_seed(LenientSeed)?;
                } else {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
            Ok(Some(meta))
        }
        skip!(None; str, u64, i64, f64, bool, unit, none, seq);
    }
    d.deserialize_any(V)
}

/// A metadata key: whether it is `CF-Content-Type` (in any case).
struct ContentTypeKey(bool);

impl From<&str> for ContentTypeKey {
    fn from(key: &str) -> Self {
        ContentTypeKey(key.eq_ignore_ascii_case("CF-Content-Type"))
    }
}

/// An object key, read without allocating and turned into a `T` (e.g. [`MessageKey`]).
struct Key<T>(T);

impl<'de, T: for<'a> From<&'a str>> Deserialize<'de> for Key<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<T: for<'a> From<&'a str>> de::Visitor<'_> for V<T> {
            type Value = Key<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<T>, E> {
                Ok(Key(T::from(v)))
            }
        }
        d.deserialize_identifier(V(std::marker::PhantomData))
    }
}

/// [`lenient_string`] as a seed, for `next_value_seed`.
struct LenientSeed;

impl<'de> de::DeserializeSeed<'de> for LenientSeed {
    type Value = Option<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        lenient_string(d)
    }
}

fn lenient_vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: de::DeserializeOwned,
{
    let v = serde_json::Value::deserialize(d)?;
    Ok(match v {
        serde_json::Value::Array(items) => items
            .into_iter()
            .filter_map(|item| serde_json::from_value(item).ok())
            .collect(),
        _ => Vec::new(),
    })
}

fn lenient_object<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: de::DeserializeOwned,
{
    let v = serde_json::Value::deserialize(d)?;
    Ok(match v {
        serde_json::Value::Object(_) => serde_json::from_value(v).ok(),
        _ => None,
    })
}

/// `warnings`: a map lease_id → message (current schema), a list of strings (older SDKs), or null.
fn lenient_warnings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    let text = |v: serde_json::Value| match v {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    };
    Ok(match v {
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| format!("{}: {}", short_lease(&k), text(v)))
            .collect(),
        serde_json::Value::Array(items) => items.into_iter().map(text).collect(),
        serde_json::Value::Null => Vec::new(),
        other => vec![text(other)],
    })
}

/// Lease ids are hundreds of bytes; logs get their head only.
pub fn short_lease(lease: &str) -> String {
    let head: String = lease.chars().take(16).collect();
    if lease.len() > head.len() {
        format!("{head}…")
    } else {
        head
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloudflare::{ApiError, interpret};

    fn pull(body: &str) -> Result<PullResult, ApiError> {
        interpret(200, None, body.as_bytes())
    }

    #[test]
    fn full_pull_answer() {
        let r = pull(
            r#"{"success":true,"errors":[],"messages":[],"result":{"messages":[
              {"id":"a1","body":"aGk=","attempts":2,"lease_id":"L1","metadata":{"CF-Content-Type":"bytes"},"timestamp_ms":1700000000000}],
              "message_backlog_count":7,
              "metadata":{"metrics":{"backlog_count":8,"backlog_bytes":100,"oldest_message_timestamp_ms":1699999999000}}}}"#,
        )
        .unwrap();
        assert_eq!(r.messages.len(), 1);
        let m = &r.messages[0];
        assert_eq!(m.id.as_deref(), Some("a1"));
        assert_eq!(m.attempts, Some(2));
        assert_eq!(m.content_type(), Some("bytes"));
        assert_eq!(m.timestamp_ms, Some(1_700_000_000_000));
        let b = r.backlog();
        assert_eq!(b.backlog_count, Some(8));
        assert_eq!(b.backlog_bytes, Some(100));
        assert_eq!(b.oldest_message_timestamp_ms, Some(1_699_999_999_000));
    }

    #[test]
    fn metadata_keeps_only_the_content_type() {
        let types = pull(
            r#"{"result":{"messages":[
              {"id":"a","metadata":{"other":{"deep":[1,{"x":null}]},"cf-content-type":"json","n":1}},
              {"id":"b","metadata":{"CF-Content-Type":7,"CF-Content-Typ":"text"}},
              {"id":"c","metadata":{"CF-Content-\u0054ype":"bytes"}},
              {"id":"d","metadata":"text"},
              {"id":"e","metadata":[{"CF-Content-Type":"text"}]},
              {"id":"f","metadata":{}}]}}"#,
        )
        .unwrap()
        .messages
        .into_iter()
        .map(|m| (m.content_type().map(str::to_owned), m.metadata.is_some()))
        .collect::<Vec<_>>();
        let some = |t: &str| (Some(t.to_owned()), true);
        assert_eq!(
            types,
            [
                some("json"),
                (None, true),
                some("bytes"),
                (None, false),
                (None, false),
                (None, true)
            ]
        );
    }

    #[test]
    fn lenient_pull_answers() {
        for body in [
            "{}",
            r#"{"result":null}"#,
            r#"{"success":true,"result":{}}"#,
            r#"{"success":true,"result":{"messages":null}}"#,
            r#"{"success":true,"result":{"messages":[]}}"#,
            r#"{"success":true,"result":{"messages":"nope","metadata":7}}"#,
            r#"{"success":true,"errors":null,"result":{"metadata":{"metrics":null}}}"#,
        ] {
            let r = pull(body).unwrap_or_else(|e| panic!("{body}: {e}"));
            assert!(r.messages.is_empty(), "{body}");
        }
        let r = pull(r#"{"result":{"message_backlog_count":"12","messages":[{"id":"x"},{"body":5},{"lease_id":"L","attempts":1.0,"timestamp_ms":"12"}]}}"#)
            .unwrap();
        assert_eq!(r.backlog().backlog_count, Some(12));
        // Fields of the wrong type or missing are None; the message itself is kept.
        assert_eq!(r.messages.len(), 3);
        assert_eq!(r.messages[0].lease_id, None);
        assert_eq!(r.messages[1].body, None, "a body of 5 is not an empty body");
        assert_eq!(r.messages[2].attempts, Some(1));
        assert_eq!(r.messages[2].timestamp_ms, Some(12));
    }

    #[test]
    fn messages_are_read_in_one_pass_as_leniently_as_before() {
        let r = pull(
            r#"{"result":{"messages":[
              7, "x", null, [1, 2], {},
              {"id":"a","id":"b","body":"esc\"aped\n","extra":{"deep":[1,{"x":null}]},
               "lease_id":["not","a","string"],"attempts":-3,"timestamp_ms":{"n":1},
               "metadata":{"CF-Content-Type":"json","CF-Content-Type":"text","other":[1]}},
              {"body":12,"attempts":"  4 ","lease_id":"L","timestamp_ms":2.5e3,"metadata":"json"}
            ]}}"#,
        )
        .unwrap();
        // Items that are not objects are skipped; an empty object is a message without fields.
        assert_eq!(r.messages.len(), 3);
        assert!(r.messages[0].id.is_none() && r.messages[0].body.is_none());
        let m = &r.messages[1];
        // A repeated key counts once, the last one, as in a JSON object read into a map.
        assert_eq!(m.id.as_deref(), Some("b"));
        assert_eq!(m.body.as_deref(), Some("esc\"aped\n"));
        assert_eq!(
            (m.lease_id.as_deref(), m.attempts, m.timestamp_ms),
            (None, None, None)
        );
        assert_eq!(m.content_type(), Some("text"));
        let m = &r.messages[2];
        assert_eq!((m.body.as_deref(), m.attempts), (None, Some(4)));
        assert_eq!(
            (m.lease_id.as_deref(), m.timestamp_ms),
            (Some("L"), Some(2500))
        );
        assert!(m.metadata.is_none());
        // Truncated JSON is still an error, never a partial batch.
        assert!(pull(r#"{"result":{"messages":[{"id":"a","body":"x"#).is_err());
    }

    #[test]
    fn ack_warnings_in_every_shape() {
        let map: AckResult = interpret(
            200,
            None,
            br#"{"success":true,"result":{"ackCount":2,"retryCount":1,"warnings":{"lease-abcdefghijklmnopqrstuvwxyz":"unknown lease"}}}"#,
        )
        .unwrap();
        assert_eq!(map.ack_count, Some(2));
        assert_eq!(map.retry_count, Some(1));
        assert_eq!(
            map.warnings,
            vec!["lease-abcdefghij…: unknown lease".to_string()]
        );
        let list: AckResult =
            interpret(200, None, br#"{"result":{"warnings":["a","b"]}}"#).unwrap();
        assert_eq!(list.warnings, vec!["a", "b"]);
        let null: AckResult =
            interpret(200, None, br#"{"result":{"ackCount":1,"warnings":null}}"#).unwrap();
        assert!(null.warnings.is_empty());
        let none: AckResult = interpret(200, None, br#"{"success":true}"#).unwrap();
        assert_eq!(none.ack_count, None);
    }
}
