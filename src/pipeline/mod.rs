//! Layer 3, the pipeline of one consumer: pull → admit → deliver → decide → ack.
//!
//! - [`consumer`]: builds a consumer's tasks and channels and runs them until the drain is done.
//! - [`ctx`]: what each of those tasks is given (the deliveries' context, the poller's).
//! - [`poller`]: pulls as many messages as there are free delivery slots.
//! - [`worker`] / [`batch`]: deliver one message, or a batch of them, through the webhook client,
//!   in named steps: admit → send → decide → report.
//! - [`policy`]: what an attempt's result means (ack, drop, retry after a delay) and whether it
//!   pauses the consumer (a 429/503 with `Retry-After` the adaptive limit cannot absorb) — pure.
//! - [`gate`]: circuit breaker, receiver-requested pause and rate limit.
//! - [`concurrency`]: the adaptive limit of requests in flight — pure.
//! - [`acker`]: coalesces acks and retries into API calls of at most 100 items.

mod acker;
pub mod batch;
pub mod concurrency;
mod consumer;
mod ctx;
pub mod gate;
mod policy;
mod poller;
mod worker;

pub(crate) use consumer::{Consumer, Readiness};
