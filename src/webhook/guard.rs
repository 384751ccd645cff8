//! What a pulled message must satisfy before it is delivered: a decoded body within
//! Cloudflare's 128 KB limit, and an id that can travel as a header value (an id with CR, LF or
//! ESC would lose its `webhook-id` header while the signature is still sent, and the receiver
//! could not verify it). A message that fails is not delivered: it is handed back with the
//! retry delay of a failed attempt (so the queue's `max_retries` and dead-letter queue end it),
//! counted under its own outcome and logged.

use reqwest::header::HeaderValue;

use crate::cloudflare::MAX_MESSAGE_BYTES;
use crate::logs::Event;
use crate::telemetry::DeliveryOutcome;

/// Why a message is refused before delivery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "body of {len} bytes is over Cloudflare's {MAX_MESSAGE_BYTES}-byte message limit: not delivered"
    )]
    Oversized { len: usize },
    #[error(
        "message id cannot be an HTTP header value (control characters): not delivered unsigned"
    )]
    BadId,
}

impl Refusal {
    /// The message's outcome.
    pub fn outcome(&self) -> DeliveryOutcome {
        match self {
            Refusal::Oversized { .. } => DeliveryOutcome::Oversized,
            Refusal::BadId => DeliveryOutcome::InvalidId,
        }
    }

    /// The log limiter's kind.
    pub fn event(&self) -> Event {
        match self {
            Refusal::Oversized { .. } => Event::Oversized,
            Refusal::BadId => Event::BadId,
        }
    }
}

/// Whether `id` can be sent as `webhook-id` / `cfq-message-id`.
pub fn check_id(id: &str) -> Result<(), Refusal> {
    match HeaderValue::from_str(id) {
        Ok(_) => Ok(()),
        Err(_) => Err(Refusal::BadId),
    }
}

/// Whether a decoded body of `len` bytes may be delivered.
pub fn check_body(len: usize) -> Result<(), Refusal> {
    if len > MAX_MESSAGE_BYTES {
        Err(Refusal::Oversized { len })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_bodies() {
        assert_eq!(check_id("a1-b2"), Ok(()));
        for bad in ["a\r\nb", "a\nx", "a\u{1b}[2J", "a\u{7f}"] {
            assert_eq!(check_id(bad), Err(Refusal::BadId), "{bad:?}");
        }
        assert_eq!(check_body(MAX_MESSAGE_BYTES), Ok(()));
        assert_eq!(
            check_body(MAX_MESSAGE_BYTES + 1).map_err(|r| r.outcome()),
            Err(DeliveryOutcome::Oversized)
        );
    }
}
