//! `check-config --online`: asks Cloudflare's read-only endpoints (never a pull, which would
//! lease messages) whether the token works, the account and each consumer's queue exist, and
//! each queue has an HTTP pull consumer. One [`Problem`] per failing consumer.

use std::time::Duration;

use anyhow::Context;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::cloudflare::{ApiError, interpret};
use crate::config::{Config, Secret};

/// A queue as `GET /accounts/{account_id}/queues/{queue_id}` shows it (the fields read here).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct QueueInfo {
    pub queue_id: Option<String>,
    pub queue_name: Option<String>,
    pub consumers: Option<Vec<ConsumerInfo>>,
}

/// One consumer of a queue: `type` is `http_pull` or `worker`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ConsumerInfo {
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

impl QueueInfo {
    pub fn has_http_pull_consumer(&self) -> bool {
        self.consumers
            .iter()
            .flatten()
            .any(|c| c.kind.as_deref() == Some("http_pull"))
    }
}

/// What is wrong for one consumer: `Display` is the one line to print (never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The consumer's label (its `name`, or its `queue_id`).
    pub consumer: String,
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "consumer {:?}: {}", self.consumer, self.what)
    }
}

/// Check every consumer of `config` against the API it names, with `token`. `Ok` holds the
/// problems found (empty: all good); `Err` only when the check itself cannot be set up.
pub async fn check(config: &Config, token: &Secret) -> anyhow::Result<Vec<Problem>> {
    let cf = &config.cloudflare;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .timeout(cf.api_timeout)
        .build()
        .context("building the API HTTP client")?;
    let mut auth = HeaderValue::from_str(&Zeroizing::new(format!("Bearer {}", token.expose())))
        .map_err(|_| {
            anyhow::anyhow!("the API token contains characters not allowed in an HTTP header")
        })?;
    auth.set_sensitive(true);
    let base = format!(
        "{}/accounts/{}/queues",
        cf.api_base_url.trim_end_matches('/'),
        cf.account_id
    );
    let get = |url: String| {
        let req = http.get(url).header(AUTHORIZATION, auth.clone());
        async move {
            let resp = req.send().await.map_err(|e| {
                if e.is_timeout() {
                    ApiError::Timeout
                } else {
                    ApiError::Transport(crate::cloudflare::error_chain(&e.without_url()))
                }
            })?;
            let status = resp.status().as_u16();
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| ApiError::Transport(e.to_string()))?;
            interpret::<serde_json::Value>(status, None, &bytes)
        }
    };

    let mut problems = Vec::new();
    let labels = config.consumers.iter().map(|c| c.label().to_owned());
    // The account and the token, once: List Queues.
    if let Err(e) = get(base.clone()).await {
        let what = account_problem(&cf.account_id, &cf.api_base_url, &e);
        problems.extend(labels.map(|consumer| Problem {
            consumer,
            what: what.clone(),
        }));
        return Ok(problems);
    }
    for c in &config.consumers {
        let problem = match get(format!("{base}/{}", c.queue_id)).await {
            Ok(v) => {
                let info: QueueInfo = serde_json::from_value(v).unwrap_or_default();
                (!info.has_http_pull_consumer()).then(|| {
                    let name = info.queue_name.as_deref().unwrap_or(&c.queue_id);
                    format!(
                        "queue {name:?} has no HTTP pull consumer, so pulls are refused: add one \
                         (`wrangler queues consumer http add {name}`, or the dashboard: Queues > \
                         {name} > Settings > Consumers)"
                    )
                })
            }
            Err(e) if not_found(&e) => Some(format!(
                "queue_id {:?} does not exist in account {:?}: `queue_id` is the queue's id \
                 (32 hex characters, `wrangler queues list` or the dashboard shows it), not its name",
                c.queue_id, cf.account_id
            )),
            Err(e) => Some(format!("cannot read queue {:?}: {e}", c.queue_id)),
        };
        if let Some(what) = problem {
            problems.push(Problem {
                consumer: c.label().to_owned(),
                what,
            });
        }
    }
    Ok(problems)
}

/// A 404, or Cloudflare's "queue not found" / "malformed queue id" (10104 / 10107) whatever
/// the status: what Cloudflare answers for a `queue_id` that is a name or a typo.
fn not_found(e: &ApiError) -> bool {
    match e {
        ApiError::Status { status: 404, .. } => true,
        ApiError::Status { errors, .. } | ApiError::Unsuccessful { errors } => errors
            .iter()
            .any(|m| matches!(m.code, Some(10_104 | 10_107))),
        _ => false,
    }
}

fn account_problem(account_id: &str, api_base_url: &str, e: &ApiError) -> String {
    match e {
        ApiError::Auth { status, .. } => format!(
            "the API token was refused (HTTP {status}): check that it is valid, not expired, and \
             has Queues read and write permission on account {account_id:?}"
        ),
        e if not_found(e) => format!(
            "account {account_id:?} was not found (or the token cannot see it): check \
             `cloudflare.account_id`"
        ),
        ApiError::Timeout | ApiError::Transport(_) => format!(
            "cannot reach the API at {}: {e}",
            crate::config::redact_url(api_base_url)
        ),
        e => format!("listing the account's queues failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloudflare::ApiMessage;

    #[test]
    fn a_queue_needs_an_http_pull_consumer() {
        let info = |v: serde_json::Value| serde_json::from_value::<QueueInfo>(v).unwrap();
        assert!(
            info(serde_json::json!({"consumers": [{"type": "worker"}, {"type": "http_pull"}]}))
                .has_http_pull_consumer()
        );
        assert!(
            !info(serde_json::json!({"consumers": [{"type": "worker", "script_name": "w"}]}))
                .has_http_pull_consumer()
        );
        assert!(!info(serde_json::json!({"consumers": []})).has_http_pull_consumer());
        assert!(!info(serde_json::json!({})).has_http_pull_consumer());
    }

    #[test]
    fn a_missing_or_malformed_queue_id_reads_as_not_found() {
        let status = |status, code| ApiError::Status {
            status,
            errors: vec![ApiMessage {
                code: Some(code),
                message: None,
            }],
            excerpt: String::new(),
            retry_after: None,
        };
        assert!(not_found(&status(404, 10_104)));
        assert!(not_found(&status(400, 10_107)));
        assert!(not_found(&status(400, 10_104)));
        assert!(!not_found(&status(400, 10_207)));
        assert!(!not_found(&status(500, 10_001)));
        assert!(!not_found(&ApiError::Timeout));
    }
}
