//! `[cloudflare]`: the account, the API's address and timeout, and where the API token comes
//! from (the environment, systemd's credential, a file, or the config).

use std::path::{Path, PathBuf};
use std::time::Duration;

use educe::Educe;
use serde::Deserialize;

use super::checks::{check_http_url, check_range};
use super::{ConfigError, RedactedUrl, Secret, SecretSource, Validate};

/// The environment variable that carries the Cloudflare API token (highest precedence).
pub const TOKEN_ENV: &str = "CLOUDFLARE_API_TOKEN";
/// The name of the systemd credential (`LoadCredential=cloudflare-api-token:PATH`) that carries
/// the token: read from `$CREDENTIALS_DIRECTORY/cloudflare-api-token` (after the environment).
pub const TOKEN_CREDENTIAL: &str = "cloudflare-api-token";

/// `[cloudflare]`
#[derive(Debug, Clone, Deserialize, Educe)]
#[educe(Default)]
#[serde(default, deny_unknown_fields)]
pub struct CloudflareConfig {
    /// Cloudflare account id (32 hex characters in the dashboard URL). Required.
    pub account_id: String,
    /// Base URL of the API; point it at `cfq-relay emulate` for local work.
    #[educe(Default(expression = RedactedUrl::new("https://api.cloudflare.com/client/v4")))]
    pub api_base_url: RedactedUrl,
    /// API token in the file itself (least preferred: use the environment or a file).
    pub api_token: Option<Secret>,
    /// Path of a file that holds the API token (e.g. a systemd credential or a Kubernetes secret).
    pub api_token_file: Option<PathBuf>,
    /// Timeout of one pull or ack API call, 1s..=5m.
    #[educe(Default(expression = Duration::from_secs(15)))]
    #[serde(with = "humantime_serde")]
    pub api_timeout: Duration,
}

impl Validate for CloudflareConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{at}.{k}");
        if self.account_id.trim().is_empty() {
            return Err(ConfigError::invalid(key("account_id"), "is required"));
        }
        if !self.account_id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(ConfigError::invalid(
                key("account_id"),
                "must be letters and digits only (the 32-character id)",
            ));
        }
        check_http_url(&key("api_base_url"), &self.api_base_url)?;
        check_range(
            &key("api_timeout"),
            self.api_timeout,
            Duration::from_secs(1),
            Duration::from_secs(300),
        )?;
        if let Some(token) = &self.api_token
            && token.expose().trim().is_empty()
        {
            return Err(ConfigError::invalid(key("api_token"), "is empty"));
        }
        Ok(())
    }
}

impl CloudflareConfig {
    /// The token's places the config names: `cloudflare.api_token_file`, then
    /// `cloudflare.api_token`.
    pub fn token_keys(&self) -> SecretSource<'_> {
        SecretSource::keys(
            "cloudflare.api_token",
            self.api_token.as_ref(),
            self.api_token_file.as_deref(),
            None,
        )
    }

    /// Every place of the token, first wins: `CLOUDFLARE_API_TOKEN`, then (under systemd, with
    /// `credentials_dir` = `$CREDENTIALS_DIRECTORY`) the credential `cloudflare-api-token`, then
    /// the config's keys. A credentials directory without the token falls through (the unit may
    /// load other credentials only).
    pub fn token_source(&self, credentials_dir: Option<&Path>) -> SecretSource<'_> {
        let mut source = SecretSource::ambient_env(TOKEN_ENV);
        if let Some(dir) = credentials_dir {
            source = source.or(SecretSource::ambient_file(
                format!("$CREDENTIALS_DIRECTORY/{TOKEN_CREDENTIAL}"),
                dir.join(TOKEN_CREDENTIAL),
            ));
        }
        source.or(self.token_keys())
    }

    /// Resolve the API token from [`CloudflareConfig::token_source`], the environment looked up
    /// through `env`.
    pub fn resolve_token_with(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Secret, ConfigError> {
        let credentials_dir = env("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        self.token_source(credentials_dir.as_deref())
            .resolve_with(env)?
            .ok_or_else(|| {
                ConfigError::invalid(
                    "cloudflare.api_token",
                    format!(
                        "no API token: set {TOKEN_ENV}, the systemd credential {TOKEN_CREDENTIAL}, cloudflare.api_token_file or cloudflare.api_token"
                    ),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The token as resolved with `env` as `CLOUDFLARE_API_TOKEN` and no other variable set.
    fn token_from(cf: &CloudflareConfig, env: Option<&str>) -> Result<Secret, ConfigError> {
        cf.resolve_token_with(|var| (var == TOKEN_ENV).then(|| env.map(str::to_owned)).flatten())
    }

    /// A `[cloudflare]` section with the token inline.
    fn inline_token() -> CloudflareConfig {
        CloudflareConfig {
            account_id: "abc".into(),
            api_token: Some(Secret::new("secret-token-value")),
            ..CloudflareConfig::default()
        }
    }

    #[test]
    fn token_precedence_env_then_file_then_inline() {
        let c = inline_token();
        let t = token_from(&c, Some("from-env")).unwrap();
        assert_eq!(t.expose(), "from-env");
        let t = token_from(&c, None).unwrap();
        assert_eq!(t.expose(), "secret-token-value");

        let dir = std::env::temp_dir().join(format!("cfq-relay-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let mut cf = c.clone();
        cf.api_token_file = Some(file.clone());
        assert_eq!(token_from(&cf, None).unwrap().expose(), "from-file");

        std::fs::write(&file, "  \n").unwrap();
        let e = token_from(&cf, None).unwrap_err().to_string();
        assert!(
            e.contains("`cloudflare.api_token_file`") && e.contains("is empty"),
            "{e}"
        );

        cf.api_token_file = Some(dir.join("missing"));
        let e = token_from(&cf, None).unwrap_err().to_string();
        assert!(
            e.contains("`cloudflare.api_token_file` cannot be read"),
            "{e}"
        );

        cf.api_token_file = None;
        cf.api_token = None;
        let e = token_from(&cf, None).unwrap_err().to_string();
        assert!(e.contains("no API token"), "{e}");
        let e = token_from(&cf, Some(" ")).unwrap_err().to_string();
        assert!(e.contains("CLOUDFLARE_API_TOKEN"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn systemd_credential_after_env_before_file_and_inline() {
        let dir = std::env::temp_dir().join(format!("cfq-relay-creds-{}", std::process::id()));
        let creds = dir.join("credentials");
        std::fs::create_dir_all(&creds).unwrap();
        let file = dir.join("token-file");
        std::fs::write(&file, "from-file").unwrap();
        let mut cf = inline_token();
        cf.api_token_file = Some(file);
        let resolve = |env: Option<&str>| {
            cf.resolve_token_with(|var| match var {
                TOKEN_ENV => env.map(str::to_owned),
                "CREDENTIALS_DIRECTORY" => Some(creds.display().to_string()),
                _ => None,
            })
            .map(|t| t.expose().to_owned())
            .map_err(|e| e.to_string())
        };

        // No credential file in the directory: falls through to api_token_file.
        assert_eq!(resolve(None).unwrap(), "from-file");
        std::fs::write(creds.join(TOKEN_CREDENTIAL), "from-credential\n").unwrap();
        assert_eq!(resolve(None).unwrap(), "from-credential");
        assert_eq!(resolve(Some("from-env")).unwrap(), "from-env");
        std::fs::write(creds.join(TOKEN_CREDENTIAL), " \n").unwrap();
        let e = resolve(None).unwrap_err();
        assert!(
            e.starts_with("`$CREDENTIALS_DIRECTORY/cloudflare-api-token` ")
                && e.contains("is empty"),
            "{e}"
        );
        // Without the directory (not under systemd) the credential plays no part.
        assert_eq!(token_from(&cf, None).unwrap().expose(), "from-file");
        std::fs::remove_dir_all(&dir).ok();
    }
}
