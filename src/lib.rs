//! cfq-relay: consume Cloudflare Queues over the HTTP pull API and deliver every message to a webhook.
#![forbid(unsafe_code)]

pub mod emulator;
