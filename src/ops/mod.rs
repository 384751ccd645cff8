//! Layer 4, operating the relay: the supervisor that runs the set of consumers and applies
//! reloads, and the admin server (metrics, health, readiness). The metrics themselves live in
//! `telemetry`, below the pipeline that records into them.

pub mod admin;
pub mod supervisor;
