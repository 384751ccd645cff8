//! The `cfq-relay` command: CLI, logging set-up, signals and exit codes. Thin on purpose.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use cfq_relay::Config;
use cfq_relay::config::{ConfigError, LogFormat};
use cfq_relay::emulator::{Emulator, EmulatorOptions};

/// Exit code for a bad configuration (systemd: RestartPreventExitStatus=2).
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "cfq-relay",
    version,
    about = "Relay Cloudflare Queues (HTTP pull) to a webhook"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay daemon.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short, env = "CFQ_RELAY_CONFIG")]
        config: PathBuf,
    },
    /// Validate a configuration file and print a one-line summary; exit 0 or 2.
    CheckConfig {
        #[arg(long, short, env = "CFQ_RELAY_CONFIG")]
        config: PathBuf,
    },
    /// Serve a local Cloudflare Queues API (pull, ack, publish) for development and tests.
    Emulate {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8787")]
        listen: SocketAddr,
        /// Require `Authorization: Bearer TOKEN` on every call.
        #[arg(long, env = "CFQ_EMULATOR_TOKEN")]
        token: Option<String>,
        /// Deliveries after which a failing message is dead-lettered (like the queue setting).
        #[arg(long, default_value_t = 3)]
        max_retries: u32,
        /// Added latency of every API answer, in milliseconds (a realistic WAN is 50).
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Put json bodies on the wire as raw JSON instead of base64.
        #[arg(long)]
        json_raw: bool,
    },
    /// Emulator + webhook receiver + relay in one process: see the relay work, no account needed.
    Demo {
        /// Messages per content type (text, json, bytes).
        #[arg(long, default_value_t = 1000)]
        messages: usize,
        /// Answer every n-th first delivery with 503, to show retries (0: never).
        #[arg(long, default_value_t = 20)]
        fail_every: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => match c.check_secrets() {
                Ok(_) => {
                    println!("{}", c.summary());
                    ExitCode::SUCCESS
                }
                Err(e) => config_error(&e),
            },
            Err(e) => config_error(&e),
        },
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            if let Err(e) = config.check_secrets() {
                return config_error(&e);
            }
            init_logging(&config.log.level, config.log.format);
            runtime(async move {
                let shutdown = CancellationToken::new();
                tokio::spawn(watch_signals(shutdown.clone()));
                // The effective config (file + environment), secrets redacted by its `Debug`.
                tracing::info!(version = env!("CARGO_PKG_VERSION"), config = ?config, "{}", config.summary());
                cfq_relay::run(config, shutdown).await
            })
        }
        Command::Emulate {
            listen,
            token,
            max_retries,
            latency_ms,
            json_raw,
        } => {
            init_logging("info", LogFormat::Text);
            runtime(async move {
                let shutdown = CancellationToken::new();
                tokio::spawn(watch_signals(shutdown.clone()));
                let emulator = Emulator::new(EmulatorOptions {
                    token,
                    max_retries,
                    latency: Duration::from_millis(latency_ms),
                    json_raw,
                });
                let addr = emulator.start(listen, shutdown.clone()).await?;
                println!(
                    "Cloudflare Queues emulator: api_base_url = \"{}\"",
                    Emulator::base_url(addr)
                );
                shutdown.cancelled().await;
                Ok(())
            })
        }
        Command::Demo {
            messages,
            fail_every,
        } => {
            init_logging("error", LogFormat::Text);
            runtime(async move {
                let summary = cfq_relay::demo::run(cfq_relay::demo::DemoOptions {
                    messages_per_type: messages,
                    fail_every,
                    ..Default::default()
                })
                .await?;
                println!("{}", summary.line());
                Ok(())
            })
        }
    }
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("cfq-relay: configuration error: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn runtime(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cfq-relay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the context chain on one line, without a backtrace.
            eprintln!("cfq-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `RUST_LOG` wins over the configured level.
fn init_logging(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
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

/// First SIGTERM/SIGINT: graceful stop. Second: exit at once.
async fn watch_signals(shutdown: CancellationToken) {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook_tokio::Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return;
        }
    };
    let mut seen = 0;
    while let Some(sig) = signals.next().await {
        seen += 1;
        if seen == 1 {
            tracing::info!(
                signal = sig,
                "signal received: draining (send it again to exit at once)"
            );
            shutdown.cancel();
        } else {
            tracing::warn!(signal = sig, "second signal: exiting at once");
            std::process::exit(130);
        }
    }
}
