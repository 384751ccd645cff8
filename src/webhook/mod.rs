//! Layer 2, the webhook client: how one message (or one batch) becomes an HTTP request to the
//! receiver and how its answer is classified.
//!
//! - [`attempt`]: what one request came to (an answer's status, a timeout, a broken connection).
//! - [`guard`]: what a pulled message must satisfy before it is sent (id, body size).
//! - [`delivery`]: decode the body, POST it with its headers and auth, classify the answer.
//! - [`client`]: the HTTP transport: a pooled hyper client, the URL parsed once.
//! - [`signing`]: Standard Webhooks signatures over the request body.
//!
//! It depends on the config and the Cloudflare wire types below it, never on the pipeline.

mod attempt;
pub mod client;
pub mod delivery;
pub(crate) mod guard;
pub mod signing;

pub use attempt::Attempt;
