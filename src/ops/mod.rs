//! Layer 4, operating the relay: the supervisor that runs the set of consumers and applies
//! reloads, the admin server (metrics, health, readiness), the Prometheus metrics and the log
//! hygiene helpers.

pub mod admin;
pub mod logs;
pub mod metrics;
pub mod supervisor;
