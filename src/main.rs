//! The `cfq-relay` command: its arguments (clap) and a dispatch to the command bodies in
//! [`cli`]; the process's allocator. Nothing else happens here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cfq_emulator::EmulatorOptions;
use cfq_emulator::sink::SinkOptions;
use clap::{Parser, Subcommand};

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

/// After `run --help`: what an operator needs besides the flags.
const RUN_AFTER_HELP: &str = "\
Signals:
  SIGHUP           Re-read the configuration file and apply it; an invalid file is logged and
                   the relay keeps running on the previous configuration.
  SIGTERM, SIGINT  Stop pulling, let in-flight deliveries finish (up to shutdown.grace_period),
                   ack them, exit 0. A second signal exits at once (status 130).

Exit status:
  0    stopped by a signal after draining
  1    a failure while starting or running (e.g. the admin address is in use), or a
       consumer that failed (a bug): every consumer drains first, then the relay exits so
       that the service manager restarts it (systemd: Restart=on-failure)
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
    /// resolves every secret (API token, webhook credentials, signing secrets) and TLS file
    /// (`ca_file`, client certificate) without calling any API (`--online` does). Exit 0 with a one-line summary, or 2 with one line naming the
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
        /// asked on loopback); without one, or when it no longer parses, the
        /// CFQ_RELAY__ADMIN__LISTEN address, else 127.0.0.1:9464.
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
    match Cli::parse().command {
        Command::Run { config } => cli::run(config),
        Command::CheckConfig { config, online } => cli::check_config(&config, online),
        Command::Healthcheck {
            config,
            addr,
            ready,
            timeout,
        } => cli::healthcheck(config.as_deref(), addr, ready, timeout),
        Command::Emulate {
            listen,
            token,
            max_retries,
            latency_ms,
            json_raw,
            error_ratio,
            queues,
            account_id,
        } => cli::emulate(
            listen,
            EmulatorOptions {
                token,
                max_retries,
                latency: Duration::from_millis(latency_ms),
                json_raw,
                error_ratio,
                account_id: Some(account_id),
                queues,
                create_queues_on_use: false,
            },
        ),
        Command::Receive {
            listen,
            delay_ms,
            print,
            capacity,
            delay_per_in_flight_us,
        } => cli::receive(
            listen,
            SinkOptions {
                delay: Duration::from_millis(delay_ms),
                print,
                capacity,
                delay_per_in_flight: Duration::from_micros(delay_per_in_flight_us),
                record: false,
            },
        ),
        Command::Demo {
            messages,
            fail_every,
            batch,
        } => cli::demo(cli::DemoOptions {
            messages_per_type: messages,
            fail_every,
            batch: batch.map(usize::from),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// clap's own consistency checks of the definitions (duplicate flags, bad defaults, …),
    /// which otherwise fire only when the faulty command is parsed.
    #[test]
    fn arguments_are_consistent() {
        Cli::command().debug_assert();
    }
}
