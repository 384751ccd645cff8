//! The typed label values of the relay's metrics: what a delivery, a release, a webhook answer
//! and an API call can end as. Each is an enum with one `as_label()`; the metrics hold one
//! series per variant, indexed by it, so a new variant is a compile error wherever it matters
//! and no value can fall into a default bucket.

/// An enum whose variants are the values of one metric label: `ALL` in declaration order (the
/// index of a variant is its place in it), `LABELS` their label values, `as_label()` one.
macro_rules! label_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$vmeta:meta])* $variant:ident => $label:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every variant, in the order of [`Self::LABELS`].
            pub const ALL: [Self; [$($label),+].len()] = [$(Self::$variant),+];
            /// The label value of each variant, as exported on `/metrics`.
            pub const LABELS: [&'static str; [$($label),+].len()] = [$($label),+];

            /// The label value exported on `/metrics`.
            pub const fn as_label(self) -> &'static str {
                Self::LABELS[self as usize]
            }

            /// The variant's place in [`Self::ALL`]: the index of its series.
            pub const fn index(self) -> usize {
                self as usize
            }
        }
    };
}

label_enum! {
    /// How the relay finished with one pulled and delivered (or refused) message: the `outcome`
    /// label of `messages_delivered_total`.
    DeliveryOutcome {
        /// The webhook accepted it (2xx or a configured success status): acked.
        Acked => "acked",
        /// Handed back to the queue with a delay, to be delivered again.
        Retried => "retried",
        /// A configured drop status: acked without delivery.
        Dropped => "dropped",
        /// Its body could not be decoded for its content type: never sent, retried.
        Undecodable => "undecodable",
        /// Its decoded body is over Cloudflare's message limit: never sent, retried.
        Oversized => "oversized",
        /// Its id cannot travel as a header value: never sent, retried.
        InvalidId => "invalid_id",
    }
}

label_enum! {
    /// Why a held message was handed back without a delivery attempt: the `reason` label of
    /// `messages_released_total`.
    ReleaseReason {
        /// Its lease had too little time left for the request and the ack (zero delay).
        Lease => "lease",
        /// The relay is shutting down (zero delay: another replica takes it at once).
        Shutdown => "shutdown",
        /// The circuit breaker is open (delayed until its next probe).
        Breaker => "breaker",
    }
}

label_enum! {
    /// The class of a webhook answer: the `status_class` label.
    StatusClass {
        /// 100–199.
        Informational => "1xx",
        /// 200–299.
        Success => "2xx",
        /// 300–399 (redirects are not followed).
        Redirection => "3xx",
        /// 400–499.
        ClientError => "4xx",
        /// 500 and above.
        ServerError => "5xx",
        /// No answer within `webhook.timeout`.
        Timeout => "timeout",
        /// No answer: the connection failed or broke.
        Error => "error",
    }
}

impl StatusClass {
    /// The class of an HTTP status code.
    pub const fn of_status(status: u16) -> Self {
        match status {
            0..=199 => StatusClass::Informational,
            200..=299 => StatusClass::Success,
            300..=399 => StatusClass::Redirection,
            400..=499 => StatusClass::ClientError,
            _ => StatusClass::ServerError,
        }
    }
}

label_enum! {
    /// How one Cloudflare API call ended: the `result` label of `api_requests_total`.
    ApiResult {
        /// A 2xx answer that parsed.
        Ok => "ok",
        /// HTTP 429.
        RateLimited => "429",
        /// Another 4xx (authentication failures included).
        ClientError => "4xx",
        /// A 5xx.
        ServerError => "5xx",
        /// An answer that was not the expected JSON, said `success: false`, or was too large.
        Malformed => "malformed",
        /// No answer: timeout, connection or TLS failure.
        TransportError => "transport_error",
    }
}

label_enum! {
    /// Which Cloudflare API call: the `op` label.
    ApiOp {
        Pull => "pull",
        Ack => "ack",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_the_exported_values_in_order() {
        assert_eq!(
            DeliveryOutcome::LABELS,
            [
                "acked",
                "retried",
                "dropped",
                "undecodable",
                "oversized",
                "invalid_id"
            ]
        );
        assert_eq!(ReleaseReason::LABELS, ["lease", "shutdown", "breaker"]);
        assert_eq!(
            StatusClass::LABELS,
            ["1xx", "2xx", "3xx", "4xx", "5xx", "timeout", "error"]
        );
        assert_eq!(
            ApiResult::LABELS,
            ["ok", "429", "4xx", "5xx", "malformed", "transport_error"]
        );
        assert_eq!(ApiOp::LABELS, ["pull", "ack"]);
        for (i, o) in DeliveryOutcome::ALL.into_iter().enumerate() {
            assert_eq!(o.index(), i);
            assert_eq!(o.as_label(), DeliveryOutcome::LABELS[i]);
        }
        assert_eq!(ApiResult::RateLimited.as_label(), "429");
        assert_eq!(StatusClass::Timeout.as_label(), "timeout");
    }

    #[test]
    fn status_classes_cover_every_code() {
        let cases = [
            (100, "1xx"),
            (199, "1xx"),
            (200, "2xx"),
            (299, "2xx"),
            (302, "3xx"),
            (404, "4xx"),
            (499, "4xx"),
            (500, "5xx"),
            (599, "5xx"),
            (999, "5xx"),
        ];
        for (status, want) in cases {
            assert_eq!(StatusClass::of_status(status).as_label(), want, "{status}");
        }
    }
}
