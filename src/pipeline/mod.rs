//! Layer 3, the pipeline of one consumer: pull → admit → deliver → decide → ack.
//!
//! - [`consumer`]: builds a consumer's tasks and channels and runs them until the drain is done.
//! - [`ctx`]: what those tasks share (config, clients, limiter, gate, tokens).
//! - [`poller`]: pulls as many messages as there are free delivery slots.
//! - [`worker`] / [`batch`]: deliver one message, or a batch of them, through the webhook client.
//! - [`policy`]: what an attempt's result means (ack, drop, retry after a delay) — pure.
//! - [`gate`]: circuit breaker, receiver-requested pause and rate limit.
//! - [`concurrency`]: the adaptive limit of requests in flight — pure.
//! - [`acker`]: coalesces acks and retries into API calls of at most 100 items.

pub mod acker;
pub mod batch;
pub mod concurrency;
pub mod consumer;
pub mod ctx;
pub mod gate;
pub mod policy;
pub mod poller;
pub mod worker;
