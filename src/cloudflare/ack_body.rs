//! The body of an ack call, written straight to bytes: acks and retries in one buffer sized up
//! front, without a serializer's tree or per-string escaping pass where none is needed.

use super::{AckEntry, RetryEntry};

/// `{"acks":[{"lease_id":…}],"retries":[{"lease_id":…,"delay_seconds":…}]}`; a lease id is
/// copied as it is when it needs no escaping (Cloudflare's never do), else escaped by serde_json.
pub(super) fn encode(acks: &[AckEntry<'_>], retries: &[RetryEntry<'_>]) -> Vec<u8> {
    let size = 32
        + acks.iter().map(|a| a.lease_id.len() + 16).sum::<usize>()
        + retries.iter().map(|r| r.lease_id.len() + 40).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(br#"{"acks":["#);
    for (i, a) in acks.iter().enumerate() {
        open_item(&mut out, i, a.lease_id);
        out.push(b'}');
    }
    out.extend_from_slice(br#"],"retries":["#);
    for (i, r) in retries.iter().enumerate() {
        open_item(&mut out, i, r.lease_id);
        out.extend_from_slice(br#","delay_seconds":"#);
        out.extend_from_slice(r.delay_seconds.to_string().as_bytes());
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

/// `,{"lease_id":"…"` (no comma before the first item).
fn open_item(out: &mut Vec<u8>, index: usize, lease_id: &str) {
    if index > 0 {
        out.push(b',');
    }
    out.extend_from_slice(br#"{"lease_id":"#);
    json_string(out, lease_id);
}

/// `s` as a JSON string.
fn json_string(out: &mut Vec<u8>, s: &str) {
    // What serde_json escapes: control characters, `"` and `\`.
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_bodies_match_the_api() {
        let acks = [AckEntry { lease_id: "a" }];
        let retries = [RetryEntry {
            lease_id: "b",
            delay_seconds: 30,
        }];
        let json = encode(&acks, &retries);
        assert_eq!(
            String::from_utf8(json).unwrap(),
            r#"{"acks":[{"lease_id":"a"}],"retries":[{"lease_id":"b","delay_seconds":30}]}"#
        );
        // Several items, and lease ids that need escaping: the same JSON serde_json would write.
        let odd = [
            "plain",
            "quo\"te",
            "back\\slash",
            "ctl\u{1}\n",
            "ünï\u{7f}",
            "",
        ];
        let acks: Vec<_> = odd.iter().map(|l| AckEntry { lease_id: l }).collect();
        let retries: Vec<_> = odd
            .iter()
            .zip(0u32..)
            .map(|(l, d)| RetryEntry {
                lease_id: l,
                delay_seconds: d * 1000,
            })
            .collect();
        let json = encode(&acks, &retries);
        let expected = serde_json::json!({
            "acks": odd.iter().map(|l| serde_json::json!({"lease_id": l})).collect::<Vec<_>>(),
            "retries": odd.iter().zip(0u32..).map(|(l, d)| {
                serde_json::json!({"lease_id": l, "delay_seconds": d * 1000})
            }).collect::<Vec<_>>(),
        });
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&json).unwrap(),
            expected
        );
    }
}
