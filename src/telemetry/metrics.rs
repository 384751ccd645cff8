//! Every Prometheus metric of the relay, registered once in a per-process registry, and the
//! per-consumer handles the hot path uses (label lookups happen at start-up, not per message;
//! labelled series are arrays indexed by the typed label values of `telemetry::labels`).

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::telemetry::labels::{ApiOp, ApiResult, DeliveryOutcome, ReleaseReason, StatusClass};

const PREFIX: &str = "cfq_relay";

/// Outcomes of a delivery (the `outcome` label).
pub const OUTCOMES: [&str; DeliveryOutcome::ALL.len()] = DeliveryOutcome::LABELS;
/// Status classes of a webhook answer (the `status_class` label).
pub const STATUS_CLASSES: [&str; StatusClass::ALL.len()] = StatusClass::LABELS;
/// Results of an API call (the `result` label).
pub const API_RESULTS: [&str; ApiResult::ALL.len()] = ApiResult::LABELS;
/// Why a held message was handed back without delivery (the `reason` label).
pub const RELEASE_REASONS: [&str; ReleaseReason::ALL.len()] = ReleaseReason::LABELS;

/// The process-wide metric families.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    backlog_messages: IntGaugeVec,
    backlog_bytes: IntGaugeVec,
    oldest_age: GaugeVec,
    pulled: IntCounterVec,
    invalid: IntCounterVec,
    deliveries: IntCounterVec,
    acks_sent: IntCounterVec,
    retries_sent: IntCounterVec,
    ack_warnings: IntCounterVec,
    leases_expired: IntCounterVec,
    released: IntCounterVec,
    webhook_duration: HistogramVec,
    webhook_responses: IntCounterVec,
    api_duration: HistogramVec,
    api_requests: IntCounterVec,
    message_age: HistogramVec,
    in_flight: IntGaugeVec,
    concurrency: IntGaugeVec,
    concurrency_limit: IntGaugeVec,
    rtt_baseline: GaugeVec,
    last_pull: GaugeVec,
    breaker_state: IntGaugeVec,
    batch_messages: HistogramVec,
    batch_unknown_ids: IntCounterVec,
}

fn name(n: &str) -> String {
    format!("{PREFIX}_{n}")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let q = &["queue"];
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("metric definition is valid");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric registered once");
                m
            }};
        }
        let build_info = reg!(IntGaugeVec::new(
            Opts::new(name("build_info"), "Build information; always 1."),
            &["version"]
        ));
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let webhook_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let age_buckets = vec![
            0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0,
            86400.0,
        ];
        Self {
            backlog_messages: reg!(IntGaugeVec::new(
                Opts::new(
                    name("queue_backlog_messages"),
                    "Unacknowledged messages in the queue, as reported by the last pull."
                ),
                q
            )),
            backlog_bytes: reg!(IntGaugeVec::new(
                Opts::new(
                    name("queue_backlog_bytes"),
                    "Bytes of unacknowledged messages in the queue, as reported by the last pull."
                ),
                q
            )),
            oldest_age: reg!(GaugeVec::new(
                Opts::new(
                    name("queue_oldest_message_age_seconds"),
                    "Age of the oldest unacknowledged message at the last pull (0 when unknown or empty)."
                ),
                q
            )),
            pulled: reg!(IntCounterVec::new(
                Opts::new(
                    name("messages_pulled_total"),
                    "Messages received from pulls."
                ),
                q
            )),
            invalid: reg!(IntCounterVec::new(
                Opts::new(
                    name("messages_invalid_total"),
                    "Pulled messages skipped because they had no lease id (they return by lease expiry)."
                ),
                q
            )),
            deliveries: reg!(IntCounterVec::new(
                Opts::new(
                    name("messages_delivered_total"),
                    "Messages handled, by outcome: acked (webhook 2xx), retried, dropped by policy, or refused before sending and retried (undecodable, oversized, invalid_id)."
                ),
                &["queue", "outcome"]
            )),
            acks_sent: reg!(IntCounterVec::new(
                Opts::new(name("acks_sent_total"), "Acks accepted by the ack API."),
                q
            )),
            retries_sent: reg!(IntCounterVec::new(
                Opts::new(
                    name("retries_sent_total"),
                    "Retries (with delay_seconds) accepted by the ack API."
                ),
                q
            )),
            ack_warnings: reg!(IntCounterVec::new(
                Opts::new(
                    name("ack_warnings_total"),
                    "Warnings returned by the ack API."
                ),
                q
            )),
            leases_expired: reg!(IntCounterVec::new(
                Opts::new(
                    name("leases_expired_total"),
                    "Acks or retries given up because their lease expired before the ack API took them."
                ),
                q
            )),
            released: reg!(IntCounterVec::new(
                Opts::new(
                    name("messages_released_total"),
                    "Held messages handed back without a delivery attempt, by reason: lease and shutdown with a zero-delay retry, breaker delayed until the breaker's next probe."
                ),
                &["queue", "reason"]
            )),
            webhook_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    name("webhook_request_duration_seconds"),
                    "Webhook request duration, by status class."
                )
                .buckets(webhook_buckets.clone()),
                &["queue", "status_class"]
            )),
            webhook_responses: reg!(IntCounterVec::new(
                Opts::new(
                    name("webhook_responses_total"),
                    "Webhook answers, by status class."
                ),
                &["queue", "status_class"]
            )),
            api_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    name("api_request_duration_seconds"),
                    "Cloudflare API call duration, by op (pull, ack)."
                )
                .buckets(webhook_buckets),
                &["queue", "op"]
            )),
            api_requests: reg!(IntCounterVec::new(
                Opts::new(
                    name("api_requests_total"),
                    "Cloudflare API calls, by op and result."
                ),
                &["queue", "op", "result"]
            )),
            message_age: reg!(HistogramVec::new(
                HistogramOpts::new(
                    name("message_age_at_delivery_seconds"),
                    "End-to-end age of a message when its webhook answered (now - publish time)."
                )
                .buckets(age_buckets),
                q
            )),
            in_flight: reg!(IntGaugeVec::new(
                Opts::new(
                    name("deliveries_in_flight"),
                    "Webhook deliveries in progress."
                ),
                q
            )),
            concurrency: reg!(IntGaugeVec::new(
                Opts::new(
                    name("concurrency"),
                    "Configured maximum deliveries in flight."
                ),
                q
            )),
            concurrency_limit: reg!(IntGaugeVec::new(
                Opts::new(
                    name("concurrency_limit"),
                    "Webhook requests allowed in flight now: the adaptive limit (at most `concurrency`)."
                ),
                q
            )),
            rtt_baseline: reg!(GaugeVec::new(
                Opts::new(
                    name("webhook_rtt_baseline_seconds"),
                    "The webhook's unloaded round-trip time as the adaptive limit sees it (0 until known)."
                ),
                q
            )),
            breaker_state: reg!(IntGaugeVec::new(
                Opts::new(
                    name("breaker_state"),
                    "Circuit breaker of the webhook: 0 closed, 1 open (no pulls), 2 half-open (probing)."
                ),
                q
            )),
            last_pull: reg!(GaugeVec::new(
                Opts::new(
                    name("last_successful_pull_timestamp_seconds"),
                    "Unix time of the last successful pull."
                ),
                q
            )),
            batch_messages: reg!(HistogramVec::new(
                HistogramOpts::new(
                    name("batch_messages"),
                    "Messages per batch webhook request (batch mode only)."
                )
                .buckets(vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]),
                q
            )),
            batch_unknown_ids: reg!(IntCounterVec::new(
                Opts::new(
                    name("batch_unknown_ids_total"),
                    "Ids in a batch answer's `failed` list that were not in the batch (ignored)."
                ),
                q
            )),
            registry,
        }
    }

    /// Resolve every labelled child for one consumer.
    pub fn consumer(&self, queue: &str, concurrency: usize) -> ConsumerMetrics {
        let q = [queue];
        self.concurrency
            .with_label_values(&q)
            .set(i64::try_from(concurrency).unwrap_or(i64::MAX));
        let api = |op: ApiOp| {
            ApiResult::ALL.map(|r| {
                self.api_requests
                    .with_label_values(&[queue, op.as_label(), r.as_label()])
            })
        };
        ConsumerMetrics {
            backlog_messages: self.backlog_messages.with_label_values(&q),
            backlog_bytes: self.backlog_bytes.with_label_values(&q),
            oldest_age: self.oldest_age.with_label_values(&q),
            pulled: self.pulled.with_label_values(&q),
            invalid: self.invalid.with_label_values(&q),
            deliveries: DeliveryOutcome::ALL
                .map(|o| self.deliveries.with_label_values(&[queue, o.as_label()])),
            acks_sent: self.acks_sent.with_label_values(&q),
            retries_sent: self.retries_sent.with_label_values(&q),
            ack_warnings: self.ack_warnings.with_label_values(&q),
            leases_expired: self.leases_expired.with_label_values(&q),
            released: ReleaseReason::ALL
                .map(|r| self.released.with_label_values(&[queue, r.as_label()])),
            webhook_duration: StatusClass::ALL.map(|c| {
                self.webhook_duration
                    .with_label_values(&[queue, c.as_label()])
            }),
            webhook_responses: StatusClass::ALL.map(|c| {
                self.webhook_responses
                    .with_label_values(&[queue, c.as_label()])
            }),
            api_duration: ApiOp::ALL
                .map(|op| self.api_duration.with_label_values(&[queue, op.as_label()])),
            api_results: ApiOp::ALL.map(api),
            message_age: self.message_age.with_label_values(&q),
            in_flight: self.in_flight.with_label_values(&q),
            concurrency_limit: self.concurrency_limit.with_label_values(&q),
            rtt_baseline: self.rtt_baseline.with_label_values(&q),
            last_pull: self.last_pull.with_label_values(&q),
            breaker_state: self.breaker_state.with_label_values(&q),
            batch_messages: self.batch_messages.with_label_values(&q),
            batch_unknown_ids: self.batch_unknown_ids.with_label_values(&q),
        }
    }

    /// Drop every series of a consumer that no longer runs (removed by a config reload), so that
    /// its last backlog figure does not linger for alerts and autoscalers. A consumer started
    /// again under the same label gets fresh series from [`Metrics::consumer`].
    pub fn forget_consumer(&self, queue: &str) {
        let q = [queue];
        // A missing child is not an error here: the series is gone either way.
        let _ = self.backlog_messages.remove_label_values(&q);
        let _ = self.backlog_bytes.remove_label_values(&q);
        let _ = self.oldest_age.remove_label_values(&q);
        let _ = self.pulled.remove_label_values(&q);
        let _ = self.invalid.remove_label_values(&q);
        let _ = self.acks_sent.remove_label_values(&q);
        let _ = self.retries_sent.remove_label_values(&q);
        let _ = self.ack_warnings.remove_label_values(&q);
        let _ = self.leases_expired.remove_label_values(&q);
        let _ = self.message_age.remove_label_values(&q);
        let _ = self.in_flight.remove_label_values(&q);
        let _ = self.concurrency.remove_label_values(&q);
        let _ = self.concurrency_limit.remove_label_values(&q);
        let _ = self.rtt_baseline.remove_label_values(&q);
        let _ = self.last_pull.remove_label_values(&q);
        let _ = self.breaker_state.remove_label_values(&q);
        let _ = self.batch_messages.remove_label_values(&q);
        let _ = self.batch_unknown_ids.remove_label_values(&q);
        for o in OUTCOMES {
            let _ = self.deliveries.remove_label_values(&[queue, o]);
        }
        for r in RELEASE_REASONS {
            let _ = self.released.remove_label_values(&[queue, r]);
        }
        for c in STATUS_CLASSES {
            let _ = self.webhook_duration.remove_label_values(&[queue, c]);
            let _ = self.webhook_responses.remove_label_values(&[queue, c]);
        }
        for op in ApiOp::LABELS {
            let _ = self.api_duration.remove_label_values(&[queue, op]);
            for r in API_RESULTS {
                let _ = self.api_requests.remove_label_values(&[queue, op, r]);
            }
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One consumer's metric children.
#[derive(Clone)]
pub struct ConsumerMetrics {
    pub backlog_messages: IntGauge,
    pub backlog_bytes: IntGauge,
    pub oldest_age: Gauge,
    pub pulled: IntCounter,
    pub invalid: IntCounter,
    deliveries: [IntCounter; DeliveryOutcome::ALL.len()],
    pub acks_sent: IntCounter,
    pub retries_sent: IntCounter,
    pub ack_warnings: IntCounter,
    pub leases_expired: IntCounter,
    released: [IntCounter; ReleaseReason::ALL.len()],
    webhook_duration: [Histogram; StatusClass::ALL.len()],
    webhook_responses: [IntCounter; StatusClass::ALL.len()],
    /// By [`ApiOp`].
    api_duration: [Histogram; ApiOp::ALL.len()],
    /// By [`ApiOp`], then [`ApiResult`].
    api_results: [[IntCounter; ApiResult::ALL.len()]; ApiOp::ALL.len()],
    pub message_age: Histogram,
    pub in_flight: IntGauge,
    pub concurrency_limit: IntGauge,
    pub rtt_baseline: Gauge,
    pub last_pull: Gauge,
    pub breaker_state: IntGauge,
    pub batch_messages: Histogram,
    pub batch_unknown_ids: IntCounter,
}

impl ConsumerMetrics {
    /// Count one handled message by outcome.
    pub fn delivered(&self, outcome: DeliveryOutcome) {
        self.deliveries[outcome.index()].inc();
    }

    /// Count a message handed back without a delivery attempt.
    pub fn released(&self, reason: ReleaseReason) {
        self.released[reason.index()].inc();
    }

    /// Record one webhook answer.
    pub fn webhook(&self, class: StatusClass, seconds: f64) {
        self.webhook_duration[class.index()].observe(seconds);
        self.webhook_responses[class.index()].inc();
    }

    /// Record one API call.
    pub fn api(&self, op: ApiOp, result: ApiResult, seconds: f64) {
        self.api_duration[op.index()].observe(seconds);
        self.api_results[op.index()][result.index()].inc();
    }

    /// The value of a delivery outcome counter.
    #[cfg(test)]
    pub fn delivered_count(&self, outcome: DeliveryOutcome) -> u64 {
        self.deliveries[outcome.index()].get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forget_consumer_removes_every_series_of_it_and_only_it() {
        let m = Metrics::new();
        let gone = m.consumer("gone", 4);
        let _kept = m.consumer("kept", 4);
        gone.delivered(DeliveryOutcome::Acked);
        gone.webhook(StatusClass::ServerError, 0.5);
        m.forget_consumer("gone");
        let text = m.render();
        assert!(
            !text.contains("queue=\"gone\""),
            "a family is missing from forget_consumer:\n{text}"
        );
        assert!(text.contains("cfq_relay_concurrency{queue=\"kept\"} 4"));
        // Registering the label again gives fresh, working series.
        let again = m.consumer("gone", 2);
        again.delivered(DeliveryOutcome::Acked);
        assert_eq!(again.delivered_count(DeliveryOutcome::Acked), 1);
        assert!(
            m.render()
                .contains("cfq_relay_concurrency{queue=\"gone\"} 2")
        );
    }

    #[test]
    fn families_render_with_prefix_and_help() {
        let m = Metrics::new();
        let c = m.consumer("orders", 8);
        c.delivered(DeliveryOutcome::Acked);
        c.webhook(StatusClass::Success, 0.01);
        c.api(ApiOp::Pull, ApiResult::Ok, 0.02);
        let text = m.render();
        assert!(text.contains("cfq_relay_build_info{version=\""));
        assert!(
            text.contains(
                "cfq_relay_messages_delivered_total{outcome=\"acked\",queue=\"orders\"} 1"
            )
        );
        assert!(text.contains("cfq_relay_concurrency{queue=\"orders\"} 8"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("cfq_relay_"), "{line}");
        }
        assert_eq!(c.delivered_count(DeliveryOutcome::Acked), 1);
    }

    #[test]
    fn readme_metrics_table_matches_the_registry() {
        let m = Metrics::new();
        // Children must exist for a family to be gathered.
        let _ = m.consumer("q", 1);
        let mut registered: Vec<String> = m
            .registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        registered.sort();
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let mut documented: Vec<String> = readme
            .lines()
            .filter_map(|l| l.strip_prefix("| `cfq_relay_"))
            .filter_map(|l| l.split('`').next())
            .map(|n| format!("cfq_relay_{n}"))
            .collect();
        documented.sort();
        assert_eq!(documented, registered);
    }
}
