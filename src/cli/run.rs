//! `cfq-relay run`: the daemon's life around [`cfq_relay::start`]: configuration checked,
//! logging set up, SIGTERM/SIGINT drain, SIGHUP reloads, systemd told each change.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use cfq_relay::{Config, Reloader};
use sd_notify::NotifyState;

use super::check::{config_error, load_checked, readable_by_others};
use super::logging::init_logging;
use super::signals::{notify, with_signals};

/// Run the relay on the file at `path` until a signal stops it (exit 0 after draining).
pub fn run(path: PathBuf) -> ExitCode {
    let config = match load_checked(&path) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    init_logging(&config.log.level, config.log.format);
    for warning in readable_by_others(&config, &path) {
        tracing::warn!("{warning}");
    }
    super::runtime(with_signals(|shutdown| async move {
        // SIGHUP's default action ends the process: take it over before anything runs.
        let hangups = signal_hook_tokio::Signals::new([signal_hook::consts::SIGHUP])?;
        log_startup(&config);
        let running = cfq_relay::start(config, shutdown.clone()).await?;
        // systemd (Type=notify): started means admin bound and consumers running.
        notify(&[NotifyState::Ready, NotifyState::Status("running")]);
        tokio::spawn(reload_on_hangup(
            hangups,
            path,
            running.reloader(),
            shutdown,
        ));
        running.wait().await
    }))
}

/// One short line for the process (each consumer logs its own when it starts); the whole
/// effective configuration (file + environment, secrets redacted by its `Debug`) only at DEBUG.
fn log_startup(config: &Config) {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        consumers = config.consumers.len(),
        "cfq-relay starting"
    );
    tracing::debug!(config = ?config, "effective configuration");
}

/// SIGHUP: re-read and validate the file, apply it if valid; otherwise keep running on the
/// previous configuration and say why. Once the drain has begun a SIGHUP is ignored: there is
/// nothing to reload into, and systemd must not hear "ready" from a stopping relay.
async fn reload_on_hangup(
    mut hangups: signal_hook_tokio::Signals,
    path: PathBuf,
    reloader: Reloader,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use futures_util::StreamExt;
    while hangups.next().await.is_some() {
        if shutdown.is_cancelled() {
            tracing::info!("SIGHUP during the shutdown: ignored");
            continue;
        }
        tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
        let mut states = vec![NotifyState::Reloading];
        // systemd wants the time of the reload request with RELOADING=1.
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        notify(&states);
        match reload(&path, &reloader).await {
            Ok(summary) => {
                tracing::info!(%summary, "configuration reloaded");
                if !summary.needs_restart.is_empty() {
                    tracing::warn!(
                        sections = %summary.needs_restart.join(", "),
                        "these settings changed but apply only after a restart; the running values stay"
                    );
                }
            }
            // The drain began while the file was read: nothing changed, nothing to say.
            Err(_) if shutdown.is_cancelled() => {
                tracing::info!("SIGHUP during the shutdown: ignored");
                continue;
            }
            Err(e) => tracing::error!(
                error = %format!("{e:#}"),
                "configuration reload failed: still running on the previous configuration"
            ),
        }
        notify(&[NotifyState::Ready, NotifyState::Status("running")]);
    }
}

/// The file checked as at start (`RUST_LOG` is the start's, so it passes again), then applied.
async fn reload(path: &Path, reloader: &Reloader) -> anyhow::Result<cfq_relay::ReloadSummary> {
    let config = load_checked(path).map_err(|e| anyhow::anyhow!("configuration error: {e}"))?;
    reloader.reload(config).await
}
