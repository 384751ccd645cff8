//! The `cfq-relay` command: CLI, logging set-up, signals and exit codes. Thin on purpose.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use cfq_emulator::EmulatorOptions;
use cfq_emulator::sink::SinkOptions;
use cfq_relay::config::{ConfigError, LogFormat, check_log_filter};
use cfq_relay::{Config, Reloader};
use sd_notify::NotifyState;

mod cli;

/// Every message costs a few dozen short-lived allocations (bodies, headers, futures, in
/// reqwest and hyper mostly). jemalloc serves them with ~10 % fewer instructions per message
/// than glibc's malloc for ~2 MiB more RSS; mimalloc was faster still but doubled the RSS with
/// 1,000 deliveries in flight (README: Performance).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's compiled-in options, read before `main` (`_RJEM_MALLOC_CONF` in the environment
/// still overrides them): freed pages go back to the kernel after 1 s instead of 10 s, without
/// the intermediate "muzzy" stage. ~5 MiB less peak RSS with 1,000 deliveries in flight, no
/// measurable CPU (README: Performance).
#[allow(unsafe_code, non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: Option<&'static std::ffi::c_char> =
    // SAFETY: jemalloc declares `const char *malloc_conf` (weak) and only reads it; this is a
    // pointer to a NUL-terminated string that lives as long as the program.
    Some(unsafe { &*c"dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr() });

/// Exit code for a bad configuration (systemd: RestartPreventExitStatus=2).
const EXIT_CONFIG: u8 = 2;

/// After `run --help`: what an operator needs besides the flags.
const RUN_AFTER_HELP: &str = "\
Signals:
  SIGHUP           Re-read the configuration file and apply it; an invalid file is logged and
                   the relay keeps running on the previous configuration.
  SIGTERM, SIGINT  Stop pulling, let in-flight deliveries finish (up to shutdown.grace_period),
                   ack them, exit 0. A second signal exits at once (status 130).

Exit status:
  0    stopped by a signal after draining
  1    a failure while starting or running (e.g. the admin address is in use)
  2    configuration error: the message names the key (systemd: RestartPreventExitStatus=2)
  130  a second SIGTERM/SIGINT during the drain

Environment:
  CLOUDFLARE_API_TOKEN     The Cloudflare API token (Queues read and write). Wins over the
                           systemd credential `cloudflare-api-token`, cloudflare.api_token_file
                           and cloudflare.api_token.
  CFQ_RELAY_CONFIG         The configuration file, instead of --config.
  CFQ_RELAY__SECTION__KEY  Overrides one key of the file, e.g. CFQ_RELAY__LOG__LEVEL=debug.
  RUST_LOG                 Overrides log.level (same syntax: `info,cfq_relay=debug`).

Configuration:
  A commented example with every key: config/example.toml in the source tree, or
  /usr/share/doc/cfq-relay/examples/config.toml from the Debian package.
  Check a file without running: cfq-relay check-config --config FILE";

#[derive(Parser)]
#[command(
    name = "cfq-relay",
    version,
    about = "Relay Cloudflare Queues (HTTP pull) to a webhook",
    long_about = "Relay Cloudflare Queues (HTTP pull consumers) to a webhook.\n\n\
        Pulls each configured queue through the Cloudflare API, POSTs every message to its \
        webhook, acks what the webhook accepted and retries the rest: at least once, nothing \
        lost.",
    after_help = "Start with `cfq-relay demo` (no account needed), then `cfq-relay run --help`.\n\
        Example configuration: config/example.toml (Debian: /usr/share/doc/cfq-relay/examples/)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay daemon: pull every configured queue and deliver to its webhook.
    #[command(after_help = RUN_AFTER_HELP)]
    Run {
        /// Configuration file (TOML); see config/example.toml.
        #[arg(long, short, env = "CFQ_RELAY_CONFIG", value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a configuration file and print a one-line summary; exit 0 or 2.
    ///
    /// Reads the file and the CFQ_RELAY__* overrides as `run` would, checks every value, and
    /// resolves every secret (API token, webhook credentials, signing secrets) without calling
    /// any API (`--online` does). Exit 0 with a one-line summary, or 2 with one line naming the
    /// bad key; with `--online`, 1 when a check against the API failed.
    CheckConfig {
        /// Configuration file (TOML) to check.
        #[arg(long, short, env = "CFQ_RELAY_CONFIG", value_name = "FILE")]
        config: PathBuf,
        /// Also ask the API (read-only calls, no pull) whether the token works, the account
        /// and each consumer's queue exist and each queue has an HTTP pull consumer; one line
        /// per failing consumer, exit 1.
        #[arg(long)]
        online: bool,
    },
    /// Ask a running relay's admin server for /healthz (or /readyz); exit 0 on a 200, else 1.
    ///
    /// For container health checks (the Dockerfile's HEALTHCHECK): needs no shell, curl or wget.
    Healthcheck {
        /// Configuration file, for `admin.listen` (an unspecified address such as 0.0.0.0 is
        /// asked on loopback); without one, 127.0.0.1:9464.
        #[arg(long, short, env = "CFQ_RELAY_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
        /// Admin address to ask instead of the configured one.
        #[arg(long, value_name = "ADDR")]
        addr: Option<SocketAddr>,
        /// Ask /readyz (every consumer pulling) instead of /healthz (the process answers).
        #[arg(long)]
        ready: bool,
        /// Give up after this long (e.g. 500ms, 5s).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
        timeout: Duration,
    },
    /// Serve a local Cloudflare Queues API (pull, ack, publish) for development and tests.
    ///
    /// Point `cloudflare.api_base_url` at the printed URL (config/emulator.toml does). Runs
    /// until SIGTERM or Ctrl-C; everything is in memory.
    Emulate {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8787", value_name = "ADDR")]
        listen: SocketAddr,
        /// Require `Authorization: Bearer TOKEN` on every call (the relay's API token).
        #[arg(long, env = "CFQ_EMULATOR_TOKEN", value_name = "TOKEN")]
        token: Option<String>,
        /// Deliveries after which a failing message is dead-lettered (like the queue setting).
        #[arg(long, default_value_t = 3, value_name = "N")]
        max_retries: u32,
        /// Added latency of every API answer, in milliseconds (a realistic WAN is 50).
        #[arg(long, default_value_t = 0, value_name = "MS")]
        latency_ms: u64,
        /// Put json bodies on the wire as raw JSON instead of base64.
        #[arg(long)]
        json_raw: bool,
        /// Answer this share of pull and ack calls (0..1, spread evenly) with a 500.
        #[arg(long, default_value_t = 0.0)]
        error_ratio: f64,
        /// Create a queue of this name, with an HTTP pull consumer (repeatable). Calls may name
        /// a queue by its id or its name; any other queue answers 404 (code 10104), as on
        /// Cloudflare. More can be created through the API (POST …/queues).
        #[arg(long = "queue", value_name = "NAME")]
        queues: Vec<String>,
        /// The account id the API answers for; others answer 404 (code 10104).
        #[arg(long, default_value = "0123456789abcdef0123456789abcdef")]
        account_id: String,
    },
    /// Serve a local webhook sink that answers 200 and counts what it got.
    ///
    /// For development and benchmarks. Counts at GET /_receiver/stats. Webhook URL:
    /// http://ADDR/hook (any path works). Runs until SIGTERM or Ctrl-C.
    Receive {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        listen: SocketAddr,
        /// Wait this long before answering each request, in milliseconds (a real endpoint).
        #[arg(long, default_value_t = 0, value_name = "MS")]
        delay_ms: u64,
        /// Print one line per request: message id, attempt, content type, size, excerpt.
        #[arg(long)]
        print: bool,
        /// Serve at most this many requests at once; answer 503 at once beyond.
        #[arg(long)]
        capacity: Option<usize>,
        /// Add this many microseconds to the delay for every other request in progress (a
        /// receiver whose latency grows with load).
        #[arg(long, default_value_t = 0)]
        delay_per_in_flight_us: u64,
    },
    /// Emulator + webhook receiver + relay in one process: see the relay work, no account needed.
    ///
    /// Publishes text, JSON and binary messages, relays them to a local receiver that fails
    /// some first attempts, and prints one summary line once every message is acked. Exit 0
    /// when nothing was lost.
    Demo {
        /// Messages per content type (text, json, bytes).
        #[arg(long, default_value_t = 1000, value_name = "N")]
        messages: usize,
        /// Answer every n-th first delivery with 500, to show retries (0: never); in batch
        /// mode, list every n-th first delivery in the answer's `failed`.
        #[arg(long, default_value_t = 20, value_name = "N")]
        fail_every: u64,
        /// Deliver in batches of up to this many messages (1..=100), with per-message results.
        #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "50", value_parser = clap::value_parser!(u16).range(1..=100))]
        batch: Option<u16>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config, online } => match load_checked(&config) {
            Ok(c) => {
                for warning in readable_by_others(&c, &config) {
                    eprintln!("cfq-relay: warning: {warning}");
                }
                if online {
                    return check_online(&c);
                }
                println!("{}", c.summary());
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&e),
        },
        Command::Run { config: path } => {
            let config = match load_checked(&path) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            init_logging(&config.log.level, config.log.format);
            for warning in readable_by_others(&config, &path) {
                tracing::warn!("{warning}");
            }
            runtime(async move {
                let shutdown = CancellationToken::new();
                tokio::spawn(watch_signals(shutdown.clone()));
                // SIGHUP's default action ends the process: take it over before anything runs.
                let hangups = signal_hook_tokio::Signals::new([signal_hook::consts::SIGHUP])?;
                log_startup(&config);
                let running = cfq_relay::start(config, shutdown).await?;
                // systemd (Type=notify): started means admin bound and consumers running.
                notify(&[NotifyState::Ready, NotifyState::Status("running")]);
                tokio::spawn(reload_on_hangup(hangups, path, running.reloader()));
                running.wait().await
            })
        }
        Command::Healthcheck {
            config,
            addr,
            ready,
            timeout,
        } => {
            let addr = match (addr, config) {
                (Some(a), _) => a,
                (None, Some(path)) => match Config::load_admin_listen(&path) {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("cfq-relay: healthcheck: configuration error: {e}");
                        return ExitCode::FAILURE;
                    }
                },
                (None, None) => SocketAddr::from(([127, 0, 0, 1], 9464)),
            };
            runtime(healthcheck(addr, ready, timeout))
        }
        Command::Emulate {
            listen,
            token,
            max_retries,
            latency_ms,
            json_raw,
            error_ratio,
            queues,
            account_id,
        } => {
            init_logging("info", LogFormat::Text);
            let opts = EmulatorOptions {
                token,
                max_retries,
                latency: Duration::from_millis(latency_ms),
                json_raw,
                error_ratio,
                account_id: Some(account_id),
                queues,
                create_queues_on_use: false,
            };
            runtime(with_signals(|shutdown| {
                cli::emulate(listen, opts, shutdown)
            }))
        }
        Command::Receive {
            listen,
            delay_ms,
            print,
            capacity,
            delay_per_in_flight_us,
        } => {
            init_logging("info", LogFormat::Text);
            let opts = SinkOptions {
                delay: Duration::from_millis(delay_ms),
                print,
                capacity,
                delay_per_in_flight: Duration::from_micros(delay_per_in_flight_us),
                record: false,
            };
            runtime(with_signals(|shutdown| {
                cli::receive(listen, opts, shutdown)
            }))
        }
        Command::Demo {
            messages,
            fail_every,
            batch,
        } => {
            init_logging("error", LogFormat::Text);
            runtime(cli::demo(cli::demo::DemoOptions {
                messages_per_type: messages,
                fail_every,
                batch: batch.map(usize::from),
                ..Default::default()
            }))
        }
    }
}

/// `check-config --online`: the summary, then one line per failing consumer (exit 1).
fn check_online(config: &Config) -> ExitCode {
    let token = match config.resolve_token() {
        Ok(t) => t,
        Err(e) => return config_error(&e),
    };
    let problems = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(cfq_relay::online::check(config, &token)))
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cfq-relay: check-config --online: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", config.summary());
    if problems.is_empty() {
        println!("online: the token works; every queue exists and has an HTTP pull consumer");
        return ExitCode::SUCCESS;
    }
    for p in &problems {
        eprintln!("cfq-relay: check-config --online: {p}");
    }
    ExitCode::FAILURE
}

/// What `run` and `check-config` both check: the file with its overrides, every secret, and
/// `RUST_LOG` (which replaces `log.level`, so a typo in it would silence the daemon as well).
fn load_checked(path: &Path) -> Result<Config, ConfigError> {
    let config = Config::load(path)?;
    cfq_relay::supervisor::check_secrets(&config)?;
    if let Some(filter) = rust_log() {
        check_log_filter(EnvFilter::DEFAULT_ENV, &filter)?;
    }
    Ok(config)
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

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("cfq-relay: configuration error: {e}");
    if let Some(detail) = e.detail() {
        eprintln!("{detail}");
    }
    ExitCode::from(EXIT_CONFIG)
}

/// Secrets readable by every local account: said at start, not refused (the operator decides).
fn readable_by_others(config: &Config, path: &Path) -> Vec<String> {
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

/// A shutdown token that SIGTERM or Ctrl-C cancels, handed to a tool command (`cli`).
async fn with_signals<F: std::future::Future<Output = anyhow::Result<()>>>(
    command: impl FnOnce(CancellationToken) -> F,
) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    command(shutdown).await
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

/// `RUST_LOG`, unless unset or blank (`RUST_LOG= cfq-relay …` means "not set").
fn rust_log() -> Option<String> {
    std::env::var(EnvFilter::DEFAULT_ENV)
        .ok()
        .filter(|f| !f.trim().is_empty())
}

/// `RUST_LOG` wins over the configured level.
fn init_logging(level: &str, format: LogFormat) {
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

/// First SIGTERM/SIGINT: graceful stop. Second: exit at once.
///
/// The handlers are installed before this returns (only the waiting is spawned), so a signal
/// that arrives right after start drains instead of killing the process.
fn watch_signals(shutdown: CancellationToken) -> impl std::future::Future<Output = ()> {
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
            std::process::exit(130);
        }
    }
}

/// Tell systemd (when run with `Type=notify`) about a state change; a no-op without
/// `NOTIFY_SOCKET`.
fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// SIGHUP: re-read and validate the file, apply it if valid; otherwise keep running on the
/// previous configuration and say why.
async fn reload_on_hangup(
    mut hangups: signal_hook_tokio::Signals,
    path: PathBuf,
    reloader: Reloader,
) {
    while hangups.next().await.is_some() {
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
            Err(e) => tracing::error!(
                error = %format!("{e:#}"),
                "configuration reload failed: still running on the previous configuration"
            ),
        }
        notify(&[NotifyState::Ready, NotifyState::Status("running")]);
    }
}

async fn reload(path: &Path, reloader: &Reloader) -> anyhow::Result<cfq_relay::ReloadSummary> {
    let config = Config::load(path).map_err(|e| anyhow::anyhow!("configuration error: {e}"))?;
    cfq_relay::supervisor::check_secrets(&config)
        .map_err(|e| anyhow::anyhow!("configuration error: {e}"))?;
    reloader.reload(config).await
}

/// GET /healthz (or /readyz) on the admin server; `Ok` only for a 200.
async fn healthcheck(addr: SocketAddr, ready: bool, timeout: Duration) -> anyhow::Result<()> {
    // A server bound to every address is asked on loopback.
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let url = format!(
        "http://{}/{}",
        SocketAddr::new(ip, addr.port()),
        if ready { "readyz" } else { "healthz" }
    );
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .no_proxy()
        .build()?;
    let resp = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("healthcheck: {url}"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if status == reqwest::StatusCode::OK {
        println!("{url}: {}", body.trim());
        Ok(())
    } else {
        anyhow::bail!("healthcheck: {url}: {status}: {}", body.trim())
    }
}
