//! A local Cloudflare Queues HTTP API (pull, ack, publish) with real lease semantics.
