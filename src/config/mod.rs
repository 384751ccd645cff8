//! The configuration: pure data with its defaults, loading (TOML + environment), validation that
//! names the offending key, and the sources of secrets. It imports nothing above it.
//!
//! One file a section, each with its defaults beside its fields (`#[educe(Default = …)]`, read by serde
//! through `Default`) and its own [`Validate`]: `cloudflare`, `consumer` (+ `breaker`, `webhook`),
//! `daemon` (admin, log, shutdown). `error` tells what went wrong without quoting values,
//! `secret` holds and reads secrets, `redact` types the values whose `Debug` must hide
//! credentials, `checks` the range and URL checks the sections share.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

mod breaker;
mod checks;
mod cloudflare;
mod consumer;
mod daemon;
mod error;
mod redact;
mod secret;
mod webhook;

pub use breaker::BreakerConfig;
pub use checks::fmt_duration;
pub use cloudflare::{CloudflareConfig, TOKEN_CREDENTIAL, TOKEN_ENV};
pub use consumer::{ConcurrencyMode, ConsumerConfig, MAX_RETRY_DELAY, RetryConfig, lease_margin};
pub use daemon::{AdminConfig, LogConfig, LogFormat, ShutdownConfig, check_log_filter};
pub use error::ConfigError;
pub use redact::{ExtraHeaders, RedactedUrl, redact_url, url_origin};
pub use secret::{Secret, SecretSource, decode_secret};
pub use webhook::{BasicAuthConfig, BatchConfig, WebhookConfig, webhook_timeout_default};

use error::{check_syntax, config_error, parse_error};

/// Prefix of environment variables that override configuration keys, e.g.
/// `CFQ_RELAY__CLOUDFLARE__ACCOUNT_ID` or `CFQ_RELAY__LOG__LEVEL`.
pub const ENV_PREFIX: &str = "CFQ_RELAY";

/// A section that checks its own values; `at` is its key (`consumers[0].webhook`), which every
/// error names as the prefix of the offending key. The first problem wins.
pub trait Validate {
    fn validate(&self, at: &str) -> Result<(), ConfigError>;
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Cloudflare account and API access.
    pub cloudflare: CloudflareConfig,
    /// The admin HTTP server (/metrics, /healthz, /readyz).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Graceful shutdown.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// One entry per queue to consume; they run side by side in one process.
    #[serde(default)]
    pub consumers: Vec<ConsumerConfig>,
}

/// The layers of a config: the TOML text, then (optionally) the `CFQ_RELAY__…` environment.
fn layers(text: &str, with_env: bool) -> Result<config::Config, ConfigError> {
    check_syntax(text)?;
    let mut builder = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml));
    if with_env {
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                // Not parsed: every key the environment can reach is a string (durations
                // and numbers parse from strings), and parsing turned an all-digit account id
                // into a float and stripped a numeric token's leading zeros.
                .separator("__"),
        );
    }
    builder.build().map_err(config_error)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| parse_error(format!("cannot read {}: {e}", path.display())))
}

impl Config {
    /// Read `path` (TOML), apply `CFQ_RELAY__SECTION__KEY` environment overrides, and validate.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::from_toml_with_env(&read(path)?)
    }

    /// Only `admin.listen` of the file at `path` (environment overrides applied), without
    /// validating the rest: `healthcheck` must find a running relay even when the file on disk
    /// has since been edited into something a reload would refuse.
    pub fn load_admin_listen(path: &Path) -> Result<std::net::SocketAddr, ConfigError> {
        // A file that no longer reads or parses does not move the running relay: then the
        // environment's address (the container image sets one), else the default.
        let built = match read(path).and_then(|text| layers(&text, true)) {
            Ok(built) => built,
            Err(_) => layers("", true)?,
        };
        match built.get_string("admin.listen") {
            Ok(text) => text.parse().map_err(|e| {
                ConfigError::invalid(
                    "admin.listen",
                    format!("must be an address like 127.0.0.1:9464, got {text:?}: {e}"),
                )
            }),
            Err(config::ConfigError::NotFound(_)) => Ok(AdminConfig::default().listen),
            Err(e) => Err(config_error(e)),
        }
    }

    /// Parse TOML text, apply environment overrides, validate.
    pub fn from_toml_with_env(text: &str) -> Result<Config, ConfigError> {
        Self::finish(layers(text, true)?)
    }

    /// Parse TOML text without environment overrides, validate.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::finish(layers(text, false)?)
    }

    /// Deserialize, fill the defaults that depend on other keys (the webhook timeout on the
    /// lease, the grace on the shortest lease), validate.
    fn finish(built: config::Config) -> Result<Config, ConfigError> {
        let grace_set = built.get_string("shutdown.grace_period").is_ok();
        let consumers = built.get_array("consumers").map(|a| a.len()).unwrap_or(0);
        let timeout_set: Vec<bool> = (0..consumers)
            .map(|i| {
                built
                    .get_string(&format!("consumers[{i}].webhook.timeout"))
                    .is_ok()
            })
            .collect();
        let mut config: Config = built.try_deserialize().map_err(config_error)?;
        for (c, set) in config.consumers.iter_mut().zip(timeout_set) {
            if !set {
                c.webhook.timeout = webhook_timeout_default(c.visibility_timeout);
            }
        }
        if !grace_set {
            config.shutdown.grace_period = config.grace_period_default();
        }
        config.validate()?;
        Ok(config)
    }

    /// The drain grace when none is configured: 25 s, or half the shortest lease when that is
    /// shorter, so a config that sets only `visibility_timeout = "5s"` is valid as written
    /// (deliveries get 2.5 s to finish, and their acks still land inside the lease).
    pub fn grace_period_default(&self) -> Duration {
        let grace = ShutdownConfig::default().grace_period;
        self.consumers
            .iter()
            .map(|c| c.visibility_timeout / 2)
            .min()
            .unwrap_or(grace)
            .min(grace)
    }

    /// Check every value against its allowed range: each section, then what ties them (unique
    /// queues and names, the grace within every lease). The first problem wins.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.cloudflare.validate("cloudflare")?;
        self.log.validate("log")?;
        self.shutdown.validate("shutdown")?;
        if self.consumers.is_empty() {
            return Err(ConfigError::invalid(
                "consumers",
                "needs at least one [[consumers]] entry",
            ));
        }
        let mut labels = HashMap::new();
        let mut queues = HashMap::new();
        for (i, c) in self.consumers.iter().enumerate() {
            let at = format!("consumers[{i}]");
            c.validate(&at)?;
            // Checked before the names: two consumers of one queue must not be "fixed" by
            // giving them distinct names.
            if let Some(first) = queues.insert(c.queue_id.to_ascii_lowercase(), i) {
                return Err(ConfigError::invalid(
                    format!("{at}.queue_id"),
                    format!(
                        "is also the queue of consumers[{first}]: two consumers of one queue \
                         compete for its messages, so each webhook would get only part of them. \
                         For fan-out, give each destination its own queue (the producer sends to \
                         each); for more throughput, raise `concurrency` of one consumer"
                    ),
                ));
            }
            if let Some(first) = labels.insert(c.label().to_owned(), i) {
                return Err(ConfigError::invalid(
                    format!("{at}.name"),
                    format!(
                        "is also the name of consumers[{first}]: names label logs and metrics \
                         and must be unique (a consumer without `name` is named by its queue_id)"
                    ),
                ));
            }
            if self.shutdown.grace_period >= c.visibility_timeout {
                return Err(ConfigError::invalid(
                    "shutdown.grace_period",
                    format!(
                        "must be shorter than the visibility_timeout of consumers[{i}] ({}), got {}",
                        fmt_duration(c.visibility_timeout),
                        fmt_duration(self.shutdown.grace_period)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Resolve the API token: `CLOUDFLARE_API_TOKEN`, then the systemd credential
    /// `$CREDENTIALS_DIRECTORY/cloudflare-api-token`, then `api_token_file`, then `api_token`.
    pub fn resolve_token(&self) -> Result<Secret, ConfigError> {
        self.cloudflare
            .resolve_token_with(|var| std::env::var(var).ok())
    }

    /// The config file (when it holds a secret inline) and every secret file that users other
    /// than the owner and group can read, as (key, path). `run` and `check-config` warn about
    /// each: a token readable by every local account is a leaked token.
    pub fn readable_by_others(&self, config_path: &Path) -> Vec<(String, std::path::PathBuf)> {
        use std::os::unix::fs::PermissionsExt;
        let open =
            |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o004 != 0);
        let token = self.cloudflare.token_keys();
        let mut inline = token.is_inline();
        let mut files: Vec<(String, std::path::PathBuf)> = token
            .files()
            .map(|(k, p)| (k.to_owned(), p.to_owned()))
            .collect();
        for (i, c) in self.consumers.iter().enumerate() {
            let (webhook_inline, webhook_files) =
                c.webhook.secret_places(&format!("consumers[{i}].webhook"));
            inline |= webhook_inline;
            files.extend(webhook_files);
        }
        if inline {
            files.insert(0, ("the config file".into(), config_path.to_owned()));
        }
        files.retain(|(_, p)| open(p));
        files
    }

    /// One line for `check-config` and the startup log; never contains secrets.
    pub fn summary(&self) -> String {
        let consumers: Vec<String> = self
            .consumers
            .iter()
            .map(|c| {
                format!(
                    "{} (batch {}, visibility {}, concurrency {}) -> {}",
                    c.label(),
                    c.batch_size,
                    fmt_duration(c.visibility_timeout),
                    c.concurrency,
                    redact_url(&c.webhook.url)
                )
            })
            .collect();
        format!(
            "config ok: account {}, api {}, admin {}, {} consumer(s): {}",
            self.cloudflare.account_id,
            redact_url(&self.cloudflare.api_base_url),
            self.admin.listen,
            self.consumers.len(),
            consumers.join("; ")
        )
    }
}

#[cfg(test)]
mod tests;
