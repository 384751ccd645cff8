//! `cfq-bench`: the relay's benchmark driver (`bash bench/run.sh`); this file is its command line.
//!
//! `run` drives the whole benchmark: it starts the emulator, the webhook receiver and the relay
//! as processes of their own (`cfq-relay emulate`, `cfq-relay receive`, `cfq-relay run`), so
//! each one's CPU seconds (`/proc/PID/stat`) and peak RSS (`VmHWM` in `/proc/PID/status`) are
//! its own; publishes through the emulator's batch endpoint; measures the relay's throughput;
//! runs `wrk` against the same receiver with the same request for the machine's limit, and a
//! naive sequential consumer for the floor; and prints one Markdown table. `publish` and
//! `naive` are its parts, usable alone. Every target is on 127.0.0.1 and every loop is bounded
//! in count and time.
//!
//! The modules, from the bottom up:
//! - [`procs`]: child processes (start, stop, logs) and what `/proc` says of them (CPU, RSS);
//! - [`api`]: the emulator's API as a producer and an observer (`publish`);
//! - [`naive`]: the naive sequential consumer (`naive`);
//! - [`bed`]: one scenario's processes (emulator, receiver) and the relay configs compared;
//! - [`runs`]: one measured run each: the relay, the naive consumer, idle, a steady producer;
//! - [`wrk`]: `wrk` against the receiver, the machine's limit;
//! - [`report`]: the Markdown table and the results file;
//! - [`scenarios`]: `run`, one step per scenario;
//! - [`sim`]: `simulate`, the adaptive concurrency candidates in simulated time.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::json;

mod api;
mod bed;
mod naive;
mod procs;
mod report;
mod runs;
mod scenarios;
mod sim;
mod wrk;

#[derive(Parser)]
#[command(name = "cfq-bench", about = "The relay's benchmark (see bench/run.sh)")]
struct BenchCli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Simulate the adaptive concurrency candidates against model receivers (simulated time:
    /// instant and deterministic) and print one Markdown table.
    Simulate {
        /// The upper bound of every candidate (`concurrency`).
        #[arg(long, default_value_t = 1000)]
        max: usize,
        /// Simulated seconds per run.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Run every scenario and print one Markdown table.
    Run {
        /// Messages of the CPU-bound scenario.
        #[arg(long, default_value_t = 100_000)]
        messages: usize,
        /// Payload size of every message, in bytes.
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Smaller counts and shorter windows: a check that everything works, not figures.
        #[arg(long)]
        quick: bool,
        /// Only these scenarios (comma-separated: cpu, latency, knee, producer, idle, batch).
        #[arg(long, default_value = "cpu,latency,knee,producer,idle,batch")]
        only: String,
        /// Also write the table (and the run's details) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Where the processes' logs and configs go (default: a new directory under /tmp).
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
    /// Publish messages (text, json and bytes in turn) through the batch endpoint.
    Publish {
        #[arg(long)]
        api: String,
        #[arg(long)]
        queue: String,
        #[arg(long, default_value_t = 10_000)]
        messages: usize,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Publish calls in flight.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
    /// A naive sequential consumer, as in Cloudflare's pull-consumer example: pull a batch,
    /// POST its messages one by one, ack the batch. Prints one JSON line at the end.
    Naive {
        #[arg(long)]
        api: String,
        #[arg(long)]
        queue: String,
        #[arg(long)]
        webhook: String,
        /// Stop after this many messages...
        #[arg(long, default_value_t = 10_000)]
        messages: usize,
        /// ...or after this long.
        #[arg(long, default_value_t = 30)]
        max_seconds: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = BenchCli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Cmd::Simulate { max, seconds } => {
            print!("{}", sim::table(max, seconds));
            Ok(())
        }
        Cmd::Run {
            messages,
            size,
            quick,
            only,
            out,
            work_dir,
        } => rt.block_on(scenarios::run_all(scenarios::RunOptions {
            messages: if quick { messages.min(20_000) } else { messages },
            size,
            quick,
            only: only.split(',').map(|s| s.trim().to_owned()).collect(),
            out,
            work_dir,
        })),
        Cmd::Publish {
            api,
            queue,
            messages,
            size,
            concurrency,
        } => rt.block_on(async {
            let api = api::Api::new(api);
            api::publish(&api, &queue, messages, size, concurrency).await?;
            println!("published {messages} messages to {queue}");
            Ok(())
        }),
        Cmd::Naive {
            api,
            queue,
            webhook,
            messages,
            max_seconds,
        } => rt.block_on(async {
            let api = api::Api::new(api);
            let (delivered, secs) =
                naive::naive(&api, &queue, &webhook, messages, Duration::from_secs(max_seconds)).await?;
            let cpu = procs::cpu_seconds(std::process::id()).unwrap_or(0.0);
            let rss = procs::peak_rss_mib(std::process::id()).unwrap_or(0.0);
            println!(
                "{}",
                json!({"delivered": delivered, "seconds": secs, "cpu_seconds": cpu, "peak_rss_mib": rss})
            );
            Ok(())
        }),
    }
}
