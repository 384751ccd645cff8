//! Layer 4, operating the relay: the supervisor that runs the set of consumers and applies
//! reloads, the admin server (metrics, health, readiness) and the Prometheus metrics.

pub mod admin;
pub mod metrics;
pub mod supervisor;
