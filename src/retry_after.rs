//! Layer 0, the `Retry-After` header: parsed as delta-seconds or an HTTP date, for the API
//! client (a 429 from Cloudflare) and the webhook client (a 429/503 from the receiver) alike.

use std::time::{Duration, SystemTime};

/// Parse a `Retry-After` header: delta-seconds or an HTTP date (relative to `now`).
/// A date in the past means "now" (zero). Garbage yields `None`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    // At most 1e9 s (~31 years) either way: every caller adds it to an `Instant`, which panics
    // past its range (`u64::MAX` seconds did, and killed the consumer that read it).
    if value.bytes().all(|b| b.is_ascii_digit()) {
        return value
            .parse::<u64>()
            .ok()
            .map(|secs| Duration::from_secs(secs.min(1_000_000_000)));
    }
    if let Ok(secs) = value.parse::<f64>()
        && secs.is_finite()
        && secs >= 0.0
    {
        return Some(Duration::from_secs_f64(secs.min(1e9)));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The `Retry-After` of an answer, parsed (see [`parse_retry_after`]).
pub fn retry_after_header(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_parsing() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        let cases = [
            ("120", Some(120)),
            ("0", Some(0)),
            (" 7 ", Some(7)),
            ("1.5", Some(1)),
            ("Sun, 06 Nov 1994 08:50:37 GMT", Some(60)),
            ("Sun, 06 Nov 1994 08:49:37 GMT", Some(0)),
            ("Sun, 06 Nov 1994 07:00:00 GMT", Some(0)), // in the past
            ("Sunday, 06-Nov-94 08:49:47 GMT", Some(10)), // RFC 850 form
            ("Sun Nov  6 08:49:57 1994", Some(20)),     // asctime form
            ("", None),
            ("soon", None),
            ("-5", None),
            ("99999999999999999999999", None),
            ("18446744073709551615", Some(1_000_000_000)),
        ];
        for (value, want) in cases {
            let got = parse_retry_after(value, now).map(|d| d.as_secs());
            assert_eq!(got, want, "{value:?}");
        }
    }
}
