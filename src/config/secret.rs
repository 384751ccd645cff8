//! Secrets: [`Secret`], the one type that holds a secret value (`[REDACTED]` in `Debug`), and
//! [`SecretSource`], the one way to read it from where the config says it lives (an environment
//! variable, a file, or the config itself).

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;
use zeroize::{Zeroize, Zeroizing};

use super::ConfigError;

/// A secret string. `Debug` prints `"[REDACTED]"`; the value is reachable only via [`Secret::expose`];
/// its memory is zeroed when it is dropped (so are the copies this module makes on the way).
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

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Quoted, as a string field would be: `api_token: Some("[REDACTED]")`.
        fmt::Debug::fmt("[REDACTED]", f)
    }
}

/// Where one secret comes from: the places the config names for it, highest precedence first.
/// The first place that is set wins; its value is trimmed and must not be empty. A secret key `k`
/// of the config comes with `k_env` and `k_file` ([`SecretSource::keys`]); the API token also has
/// places the relay looks at unasked ([`SecretSource::ambient_env`], [`SecretSource::ambient_file`]).
#[derive(Debug, Clone, Default)]
pub struct SecretSource<'a> {
    places: Vec<Place<'a>>,
}

/// One place a secret may be read from, and the name errors give it (a config key, or the place
/// itself when the config does not name it).
#[derive(Debug, Clone)]
struct Place<'a> {
    key: Cow<'a, str>,
    from: Origin<'a>,
    /// Absent (variable unset, file missing) falls through to the next place instead of failing:
    /// for places the relay looks at without being told to.
    ambient: bool,
}

#[derive(Debug, Clone)]
enum Origin<'a> {
    Inline(&'a Secret),
    File(Cow<'a, Path>),
    Env(Cow<'a, str>),
}

impl<'a> SecretSource<'a> {
    /// The places of config key `key`: `{key}_env` (the name of a variable), `{key}_file`, then
    /// `key` inline, each where set.
    pub fn keys(
        key: &str,
        inline: Option<&'a Secret>,
        file: Option<&'a Path>,
        env: Option<&'a str>,
    ) -> Self {
        let place = |key: String, from| Place {
            key: key.into(),
            from,
            ambient: false,
        };
        let places = [
            env.map(|v| place(format!("{key}_env"), Origin::Env(v.into()))),
            file.map(|p| place(format!("{key}_file"), Origin::File(p.into()))),
            inline.map(|s| place(key.to_owned(), Origin::Inline(s))),
        ];
        Self {
            places: places.into_iter().flatten().collect(),
        }
    }

    /// An environment variable the relay always reads (named by itself in errors); unset falls
    /// through.
    pub fn ambient_env(var: &'static str) -> Self {
        Self {
            places: vec![Place {
                key: var.into(),
                from: Origin::Env(var.into()),
                ambient: true,
            }],
        }
    }

    /// A file the relay reads when it exists (named `key` in errors); missing falls through.
    pub fn ambient_file(key: String, path: PathBuf) -> Self {
        Self {
            places: vec![Place {
                key: key.into(),
                from: Origin::File(path.into()),
                ambient: true,
            }],
        }
    }

    /// These places, then `next`'s.
    pub fn or(mut self, next: SecretSource<'a>) -> Self {
        self.places.extend(next.places);
        self
    }

    /// Whether the value is written in the config file itself.
    pub fn is_inline(&self) -> bool {
        self.places
            .iter()
            .any(|p| matches!(p.from, Origin::Inline(_)))
    }

    /// The files named by config keys, as (key, path).
    pub fn files(&self) -> impl Iterator<Item = (&str, &Path)> {
        self.places.iter().filter_map(|p| match &p.from {
            Origin::File(path) if !p.ambient => Some((p.key.as_ref(), path.as_ref())),
            _ => None,
        })
    }

    /// Read the secret from the first place that has it; `Ok(None)` when no place is set.
    pub fn resolve(&self) -> Result<Option<Secret>, ConfigError> {
        self.resolve_with(|var| std::env::var(var).ok())
    }

    /// [`SecretSource::resolve`] with the environment looked up through `env`.
    pub fn resolve_with(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Secret>, ConfigError> {
        for place in &self.places {
            if let Some(value) = place.read(&env)? {
                return Ok(Some(value));
            }
        }
        Ok(None)
    }
}

impl Place<'_> {
    fn read(&self, env: &impl Fn(&str) -> Option<String>) -> Result<Option<Secret>, ConfigError> {
        let key = self.key.as_ref();
        let (value, empty): (Zeroizing<String>, _) = match &self.from {
            Origin::Inline(s) => (s.expose().to_owned().into(), "is empty".to_owned()),
            Origin::Env(var) => match (env(var), self.ambient) {
                (Some(v), true) => (v.into(), "is set but empty".to_owned()),
                (Some(v), false) => (
                    v.into(),
                    format!("names the environment variable {var}, which is empty"),
                ),
                (None, true) => return Ok(None),
                (None, false) => {
                    return Err(ConfigError::invalid(
                        key,
                        format!("names the environment variable {var}, which is not set"),
                    ));
                }
            },
            Origin::File(path) => match std::fs::read_to_string(path) {
                Ok(text) => (text.into(), format!("{} is empty", path.display())),
                Err(e) if self.ambient && e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(None);
                }
                Err(e) => {
                    return Err(ConfigError::invalid(
                        key,
                        format!("cannot be read ({}): {}", path.display(), e.kind()),
                    ));
                }
            },
        };
        match value.trim() {
            "" => Err(ConfigError::invalid(key, empty)),
            v => Ok(Some(Secret::new(v))),
        }
    }
}

/// The optional prefix of a Standard Webhooks signing secret.
const WHSEC_PREFIX: &str = "whsec_";

/// Decode one `whsec_<base64>` secret (the prefix is optional, padding too) into key bytes
/// (zeroed when dropped).
pub fn decode_secret(secret: &str) -> Result<Zeroizing<Vec<u8>>, &'static str> {
    let b64 = secret
        .trim()
        .strip_prefix(WHSEC_PREFIX)
        .unwrap_or(secret.trim());
    let b64 = b64.trim_end_matches('=');
    let key = Zeroizing::new(
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(b64)
            .map_err(|_| "must be `whsec_` followed by base64")?,
    );
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
        assert_eq!(format!("{s:?}"), "\"[REDACTED]\"");
        assert_eq!(format!("{:?}", Some(vec![s])), "Some([\"[REDACTED]\"])");
        let inline = Secret::new("hunter2");
        let source = SecretSource::keys("k", Some(&inline), None, None);
        assert!(!format!("{source:?}").contains("hunter2"));
    }

    fn resolve(
        key: &str,
        inline: Option<&Secret>,
        file: Option<&Path>,
        env: Option<&str>,
    ) -> Result<Option<Secret>, ConfigError> {
        SecretSource::keys(key, inline, file, env).resolve()
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

    #[test]
    fn ambient_places_fall_through_when_absent_and_fail_when_empty() {
        let inline = Secret::new("inline");
        let source = SecretSource::ambient_env("SOME_TOKEN")
            .or(SecretSource::ambient_file(
                "$DIR/token".into(),
                "/nonexistent/token".into(),
            ))
            .or(SecretSource::keys("c.token", Some(&inline), None, None));
        let got = |env: Option<&str>| {
            source
                .resolve_with(|_| env.map(str::to_owned))
                .map(|s| s.map(|s| s.expose().to_owned()))
                .map_err(|e| e.to_string())
        };
        assert_eq!(got(None).unwrap().as_deref(), Some("inline"));
        assert_eq!(got(Some(" env ")).unwrap().as_deref(), Some("env"));
        assert_eq!(got(Some(" ")).unwrap_err(), "`SOME_TOKEN` is set but empty");
        assert!(source.is_inline());
        assert_eq!(
            source.files().count(),
            0,
            "ambient files are not config keys"
        );
    }
}
