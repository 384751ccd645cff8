//! The process's log output: `tracing` to stderr, text or JSON, at the configured level unless
//! `RUST_LOG` says otherwise.

use cfq_relay::config::LogFormat;
use tracing_subscriber::EnvFilter;

/// `RUST_LOG`, unless unset or blank (`RUST_LOG= cfq-relay …` means "not set").
pub fn rust_log() -> Option<String> {
    std::env::var(EnvFilter::DEFAULT_ENV)
        .ok()
        .filter(|f| !f.trim().is_empty())
}

/// Install the global subscriber; `RUST_LOG` wins over the configured level.
pub fn init_logging(level: &str, format: LogFormat) {
    let filter = rust_log()
        .map_or_else(|| EnvFilter::try_new(level), EnvFilter::try_new)
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: not in journald, files or a container's log.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
}
