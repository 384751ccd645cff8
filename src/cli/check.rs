//! `cfq-relay check-config`, and the loading every configuration-reading command shares: the
//! file, its overrides, every secret and `RUST_LOG` checked, a bad one reported as exit 2.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use cfq_relay::Config;
use cfq_relay::config::{ConfigError, check_log_filter};
use tracing_subscriber::EnvFilter;

use super::logging::rust_log;

/// Exit code for a bad configuration (systemd: RestartPreventExitStatus=2).
const EXIT_CONFIG: u8 = 2;

/// `check-config`: the warnings, then the one-line summary (or, `online`, the API's answers).
pub fn check_config(path: &Path, online: bool) -> ExitCode {
    let config = match load_checked(path) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    for warning in readable_by_others(&config, path) {
        eprintln!("cfq-relay: warning: {warning}");
    }
    if online {
        return check_online(&config);
    }
    println!("{}", config.summary());
    ExitCode::SUCCESS
}

/// `check-config --online`: the summary, then one line per failing consumer (exit 1).
fn check_online(config: &Config) -> ExitCode {
    let token = match config.resolve_token() {
        Ok(t) => t,
        Err(e) => return config_error(&e),
    };
    super::block_on(async {
        let problems = cfq_relay::online::check(config, &token)
            .await
            .context("check-config --online")?;
        println!("{}", config.summary());
        if problems.is_empty() {
            println!("online: the token works; every queue exists and has an HTTP pull consumer");
            return Ok(ExitCode::SUCCESS);
        }
        for p in &problems {
            eprintln!("cfq-relay: check-config --online: {p}");
        }
        Ok(ExitCode::FAILURE)
    })
}

/// What `run` and `check-config` both check: the file with its overrides, every secret, and
/// `RUST_LOG` (which replaces `log.level`, so a typo in it would silence the daemon as well).
pub fn load_checked(path: &Path) -> Result<Config, ConfigError> {
    let config = Config::load(path)?;
    cfq_relay::supervisor::check_secrets(&config)?;
    if let Some(filter) = rust_log() {
        check_log_filter(EnvFilter::DEFAULT_ENV, &filter)?;
    }
    Ok(config)
}

/// Report a bad configuration (the key, then any detail) on stderr; exit 2.
pub fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("cfq-relay: configuration error: {e}");
    if let Some(detail) = e.detail() {
        eprintln!("{detail}");
    }
    ExitCode::from(EXIT_CONFIG)
}

/// Secrets readable by every local account: said at start, not refused (the operator decides).
pub fn readable_by_others(config: &Config, path: &Path) -> Vec<String> {
    config
        .readable_by_others(path)
        .into_iter()
        .map(|(key, file)| {
            format!(
                "{key} ({}) is readable by other users; it holds a secret: chmod o-r it",
                file.display()
            )
        })
        .collect()
}
