//! Checks and formats shared by the sections: ranges of numbers and durations, http(s) URLs,
//! human-readable durations. Each error names the key and the allowed range.

use std::fmt::Display;
use std::time::Duration;

use super::ConfigError;

/// `key` must be within `min..=max`: "must be between 1 and 100, got 0".
pub(super) fn check_between<T: PartialOrd + Display>(
    key: &str,
    v: T,
    min: T,
    max: T,
) -> Result<(), ConfigError> {
    if v < min || v > max {
        return Err(ConfigError::invalid(
            key,
            format!("must be between {min} and {max}, got {v}"),
        ));
    }
    Ok(())
}

/// A duration within `min..=max`: "must be between 1s and 12h, got 13h".
pub(super) fn check_range(
    key: &str,
    v: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    check_between(key, Human(v), Human(min), Human(max))
}

/// A duration that displays as `1h 30m`.
#[derive(PartialEq, PartialOrd)]
struct Human(Duration);

impl Display for Human {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        humantime::format_duration(self.0).fmt(f)
    }
}

/// An absolute `http://` or `https://` URL with a host.
pub(super) fn check_http_url(key: &str, url: &str) -> Result<(), ConfigError> {
    match reqwest::Url::parse(url) {
        Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => Ok(()),
        Ok(u) => Err(ConfigError::invalid(
            key,
            format!("must be an http or https URL, got scheme {:?}", u.scheme()),
        )),
        // The URL parser's message names the problem, never the URL.
        Err(e) => Err(ConfigError::invalid(
            key,
            format!("is not a valid URL: {e}"),
        )),
    }
}

/// Human-readable duration, e.g. `1h 30m`, `250ms`.
pub fn fmt_duration(d: Duration) -> String {
    Human(d).to_string()
}
