//! Layer 1, what the relay counts: the typed label values ([`labels`]) and the Prometheus
//! registry with each consumer's series ([`metrics`]). Every layer above records into it; it
//! imports nothing of theirs.

mod labels;
pub mod metrics;

pub use labels::{ApiOp, ApiResult, DeliveryOutcome, ReleaseReason, StatusClass};
pub use metrics::{ConsumerMetrics, Metrics};
