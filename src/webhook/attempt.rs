//! What happened when the relay tried to deliver a message (or a batch): the webhook client's
//! classification of one request, which the pipeline's policy turns into a decision.

use std::time::Duration;

use crate::telemetry::StatusClass;

/// What happened when the relay tried to deliver one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The webhook answered with this status (and maybe a parsed `Retry-After`).
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// No answer within `webhook.timeout`.
    Timeout,
    /// The connection could not be opened (refused, DNS, TLS handshake).
    Connect,
    /// The connection broke mid-request or mid-response.
    Transport,
    /// The body could not be decoded for its content type (e.g. `v8`), so it was never sent.
    Undecodable,
}

impl Attempt {
    /// The `status_class` label of the answer.
    pub fn status_class(&self) -> StatusClass {
        match self {
            Attempt::Status { status, .. } => StatusClass::of_status(*status),
            Attempt::Timeout => StatusClass::Timeout,
            Attempt::Connect | Attempt::Transport | Attempt::Undecodable => StatusClass::Error,
        }
    }

    /// The HTTP status of an answer, for log fields (absent when there was no answer).
    pub fn http_status(&self) -> Option<u16> {
        match self {
            Attempt::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let s = |status| Attempt::Status {
            status,
            retry_after: None,
        };
        assert_eq!(s(204).status_class(), StatusClass::Success);
        assert_eq!(s(503).status_class(), StatusClass::ServerError);
        assert_eq!(Attempt::Timeout.status_class(), StatusClass::Timeout);
        assert_eq!(Attempt::Connect.status_class(), StatusClass::Error);
        assert_eq!(s(429).http_status(), Some(429));
        assert_eq!(Attempt::Transport.http_status(), None);
    }
}
