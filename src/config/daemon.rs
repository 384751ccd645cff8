//! The process-wide sections: `[admin]` (the admin HTTP server), `[log]` (level and format, and
//! the check of a log filter) and `[shutdown]` (the drain grace).

use std::net::SocketAddr;
use std::time::Duration;

use educe::Educe;
use serde::Deserialize;

use super::checks::check_range;
use super::{ConfigError, Validate};

/// `[admin]`
#[derive(Debug, Clone, PartialEq, Deserialize, Educe)]
#[educe(Default)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin HTTP server serving /metrics, /healthz and /readyz.
    #[educe(Default(expression = SocketAddr::from(([127, 0, 0, 1], 9464))))]
    pub listen: SocketAddr,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Deserialize, Educe)]
#[educe(Default)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Level filter (`error`, `warn`, `info`, `debug`, `trace`, or a tracing directive list).
    /// `RUST_LOG` overrides it.
    #[educe(Default(expression = "info".to_owned()))]
    pub level: String,
    /// `text` (human-readable) or `json` (one JSON object per line).
    pub format: LogFormat,
}

impl Validate for LogConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        check_log_filter(&format!("{at}.level"), &self.level)
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[shutdown]`
#[derive(Debug, Clone, PartialEq, Deserialize, Educe)]
#[educe(Default)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long in-flight deliveries may take to finish after SIGTERM/SIGINT before they are
    /// abandoned and their messages handed back, 0s..=1h. Must be shorter than every visibility
    /// timeout. Unset: 25s, or half the shortest `visibility_timeout` when that is less
    /// ([`super::Config::grace_period_default`]).
    #[educe(Default(expression = Duration::from_secs(25)))]
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
}

impl Validate for ShutdownConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        check_range(
            &format!("{at}.grace_period"),
            self.grace_period,
            Duration::ZERO,
            Duration::from_secs(3600),
        )
    }
}

/// The levels a log filter may name (`tracing`'s, case-insensitive).
const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// A log filter (`log.level`, `RUST_LOG`): a level, or a comma-separated list of directives
/// each of which is a level or `target=level`. `tracing` reads a bare word as a target name, so
/// `warning` or `verbose` would silently enable nothing: they are refused here. The message
/// names the directive's position, not its text (config values are never echoed).
pub fn check_log_filter(key: &str, filter: &str) -> Result<(), ConfigError> {
    const HINT: &str = "levels are off, error, warn, info, debug, trace (not `warning` or `verbose`); \
                        a target takes `target=level`, e.g. `info,cfq_relay=debug`";
    let invalid = |message: String| Err(ConfigError::invalid(key, message));
    if filter.trim().is_empty() {
        return invalid("is empty".into());
    }
    if filter.contains(char::is_whitespace) {
        // tracing's parser refuses them, and the daemon would fall back to `info`.
        return invalid("must not contain spaces (e.g. `info,cfq_relay=debug`)".into());
    }
    for (i, directive) in filter.split(',').enumerate() {
        let directive = directive.trim();
        let n = i + 1;
        if directive.is_empty() {
            return invalid(format!("has an empty directive (number {n})"));
        }
        let level = match directive.rsplit_once('=') {
            Some((target, level)) if !target.trim().is_empty() => level.trim(),
            Some(_) => return invalid(format!("directive {n} has no target before `=`: {HINT}")),
            None => directive,
        };
        if !LOG_LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
            return invalid(format!("directive {n} is not a known level: {HINT}"));
        }
    }
    if tracing_subscriber::EnvFilter::try_new(filter).is_err() {
        return invalid(format!("is not a valid filter: {HINT}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels_must_be_real_levels() {
        for good in [
            "info",
            "WARN",
            "off",
            "trace",
            "warn,cfq_relay=debug",
            "info,reqwest=warn,hyper=error",
            "cfq_relay::pipeline::poller=trace",
        ] {
            check_log_filter("log.level", good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
        for (bad, want) in [
            ("warning", "directive 1 is not a known level"),
            ("verbose", "directive 1 is not a known level"),
            ("ifno", "directive 1 is not a known level"),
            ("info,cfq_relay=verbose", "directive 2 is not a known level"),
            ("info,,debug", "has an empty directive (number 2)"),
            ("=debug", "directive 1 has no target before `=`"),
            ("", "is empty"),
            ("info, hyper=warn", "must not contain spaces"),
        ] {
            let e = check_log_filter("log.level", bad).unwrap_err().to_string();
            assert!(e.starts_with("`log.level` "), "{bad:?}: {e}");
            assert!(e.contains(want), "{bad:?}: want {want:?}, got {e:?}");
            if want.contains("level") || want.contains("target") {
                assert!(
                    e.contains("not `warning` or `verbose`"),
                    "{bad:?}: no hint in {e:?}"
                );
            }
            assert!(!e.contains("ifno"), "the value is echoed: {e:?}");
        }
    }
}
