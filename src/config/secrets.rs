//! Secret values from the config (inline, a file, or an environment variable) wrapped so that
//! `Debug`, logs and errors never show them.

use std::fmt;
use std::path::Path;

use serde::Deserialize;

use super::ConfigError;
use base64::Engine;

/// A secret string. `Debug` prints `[REDACTED]`; the value is reachable only via [`Secret::expose`].
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call it only where the value is put on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// Where a secret may come from: `key` inline, `key_file`, or `key_env` (the name of an
/// environment variable). The first set one of env, file, inline wins. `Ok(None)` when none is set.
pub fn resolve(
    key: &str,
    inline: Option<&Secret>,
    file: Option<&Path>,
    env: Option<&str>,
) -> Result<Option<Secret>, ConfigError> {
    let invalid = |k: String, m: String| ConfigError::Invalid { key: k, message: m };
    if let Some(var) = env {
        let value = std::env::var(var).map_err(|_| {
            invalid(
                format!("{key}_env"),
                format!("names the environment variable {var}, which is not set"),
            )
        })?;
        let value = value.trim();
        if value.is_empty() {
            return Err(invalid(
                format!("{key}_env"),
                format!("names the environment variable {var}, which is empty"),
            ));
        }
        return Ok(Some(Secret::new(value)));
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            invalid(
                format!("{key}_file"),
                format!("cannot be read ({}): {}", path.display(), e.kind()),
            )
        })?;
        let value = text.trim();
        if value.is_empty() {
            return Err(invalid(
                format!("{key}_file"),
                format!("{} is empty", path.display()),
            ));
        }
        return Ok(Some(Secret::new(value)));
    }
    match inline {
        Some(s) if s.expose().trim().is_empty() => {
            Err(invalid(key.to_owned(), "is empty".to_owned()))
        }
        Some(s) => Ok(Some(Secret::new(s.expose().trim()))),
        None => Ok(None),
    }
}

/// The optional prefix of a Standard Webhooks signing secret.
const WHSEC_PREFIX: &str = "whsec_";

/// Decode one `whsec_<base64>` secret (the prefix is optional, padding too) into key bytes.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, &'static str> {
    let b64 = secret
        .trim()
        .strip_prefix(WHSEC_PREFIX)
        .unwrap_or(secret.trim());
    let b64 = b64.trim_end_matches('=');
    let key = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(b64)
        .map_err(|_| "must be `whsec_` followed by base64")?;
    if key.len() < 16 {
        return Err("must decode to at least 16 bytes (24 to 64 are usual)");
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "[REDACTED]");
        assert_eq!(format!("{:?}", Some(vec![s])), "Some([[REDACTED]])");
    }

    #[test]
    fn sources_and_errors() {
        assert_eq!(resolve("k", None, None, None).unwrap(), None);
        let inline = Secret::new(" v ");
        assert_eq!(
            resolve("k", Some(&inline), None, None)
                .unwrap()
                .unwrap()
                .expose(),
            "v"
        );
        let e = resolve("w.k", Some(&Secret::new(" ")), None, None).unwrap_err();
        assert_eq!(e.to_string(), "`w.k` is empty");
        let e = resolve("w.k", None, Some(Path::new("/nonexistent/x")), None).unwrap_err();
        assert!(
            e.to_string().starts_with("`w.k_file` cannot be read"),
            "{e}"
        );
        let e = resolve("w.k", None, None, Some("CFQ_RELAY_SURELY_UNSET_VAR")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("`w.k_env` names the environment variable"),
            "{e}"
        );
        // PATH is always set: env wins over file and inline.
        let v = resolve(
            "k",
            Some(&inline),
            Some(Path::new("/nonexistent")),
            Some("PATH"),
        )
        .unwrap();
        assert_eq!(v.unwrap().expose(), std::env::var("PATH").unwrap().trim());
    }
}
