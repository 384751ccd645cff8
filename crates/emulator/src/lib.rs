//! A local Cloudflare Queues HTTP API (queues, consumers, pull, ack, publish, peek, purge) with
//! real lease semantics, held to Cloudflare's official SDK (`.ci/sdk_conformance.py`), and a
//! local webhook sink: the two ends of cfq-relay for development, its tests, the demo and the
//! bench. It depends on nothing of the relay.
//!
//! The emulator speaks the same wire format as `api.cloudflare.com/client/v4` (see
//! `shared/cloudflare-queues.md`): envelopes, Cloudflare's Queues error codes ([`code`]) and
//! limits, queues that exist only once created, long opaque lease ids, `attempts`, backlog
//! metrics, stale acks, retries with a delay, dead-lettering after `max_retries`. On top, it
//! keeps books (per-queue counters and one [`MessageBook`] per message, every ack and retry item
//! counted per lease and per message) so tests, the demo and benchmarks can check exactly what
//! a consumer did, a double ack included, and it can inject faults ([`Fault`]).
//!
//! Every operation costs O(log n) in the number of messages: ready messages sit in a FIFO
//! deque, delayed ones and leased ones in ordered sets keyed by their due instant, and a lease
//! id carries its message and delivery under an HMAC, so it resolves without a lookup table
//! (and an old one still names its message: that is how a double ack is caught). Leases and
//! delays are measured with [`tokio::time::Instant`] plus an offset that [`Emulator::advance`]
//! moves forward, and are evaluated lazily at every call (no background task).
//!
//! # Layout
//!
//! | module | what it holds |
//! |---|---|
//! | `types` | the public vocabulary: options, limits, error codes, content types, faults, counters |
//! | `store` | one queue's messages, leases, delays and books (no I/O) |
//! | `handle` | [`Emulator`]: the shared state and the in-process API (publish, stats, faults, clock) |
//! | `wire` | Cloudflare's envelopes and errors, body parsing, the auth and fault gate |
//! | `messages` | the routes of messages: pull, ack, peek, purge, publish, metrics, stats |
//! | `queues` | the routes of queues and their consumers: list, create, show, update, delete |
//! | `server` | the route table, the listener, connections a fault can reset |
//! | [`sink`] | the webhook sink: records, counts and answers what the relay POSTs |
#![forbid(unsafe_code)]

mod conn;
mod handle;
mod messages;
mod queues;
mod server;
pub mod sink;
mod store;
#[cfg(test)]
mod testkit;
mod types;
mod wire;

pub use handle::Emulator;
pub use types::{
    ContentType, EmulatorOptions, Fault, FaultOp, MAX_BATCH_BYTES, MAX_MESSAGE_BYTES,
    MESSAGE_METADATA_BYTES, MessageBook, PublishError, QueueStats, UnknownContentType, code,
};
