//! The process's signals and the service manager: SIGTERM/SIGINT cancel a shutdown token (a
//! second one exits at once, status 130), and state changes are reported to systemd.

use std::future::Future;

use futures_util::StreamExt;
use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Status of the process after a second SIGTERM/SIGINT during the drain.
const EXIT_SECOND_SIGNAL: i32 = 130;

/// A shutdown token that SIGTERM or Ctrl-C cancels (the handlers installed first), handed to
/// `command`.
pub async fn with_signals<F: Future<Output = anyhow::Result<()>>>(
    command: impl FnOnce(CancellationToken) -> F,
) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    command(shutdown).await
}

/// First SIGTERM/SIGINT: graceful stop. Second: exit at once.
///
/// The handlers are installed before this returns (only the waiting is spawned), so a signal
/// that arrives right after start drains instead of killing the process.
fn watch_signals(shutdown: CancellationToken) -> impl Future<Output = ()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT]);
    async move {
        match signals {
            Ok(signals) => drain_on_signals(signals, shutdown).await,
            Err(e) => tracing::error!(error = %e, "cannot install signal handlers"),
        }
    }
}

async fn drain_on_signals(mut signals: signal_hook_tokio::Signals, shutdown: CancellationToken) {
    let mut seen = 0;
    while let Some(sig) = signals.next().await {
        seen += 1;
        if seen == 1 {
            notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
            tracing::info!(
                signal = sig,
                "signal received: draining (send it again to exit at once)"
            );
            shutdown.cancel();
        } else {
            tracing::warn!(signal = sig, "second signal: exiting at once");
            std::process::exit(EXIT_SECOND_SIGNAL);
        }
    }
}

/// Tell systemd (when run with `Type=notify`) about a state change; a no-op without
/// `NOTIFY_SOCKET`.
pub fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}
