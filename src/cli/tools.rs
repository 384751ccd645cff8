//! The tool commands around the relay: `emulate` (the local Cloudflare Queues API), `receive`
//! (the local webhook sink) and `demo` (both plus the relay, in one process).

use std::net::SocketAddr;
use std::process::ExitCode;

use cfq_emulator::sink::{Sink, SinkOptions};
use cfq_emulator::{Emulator, EmulatorOptions};
use cfq_relay::config::LogFormat;
use tokio_util::sync::CancellationToken;

use super::demo::{self, DemoOptions};
use super::logging::init_logging;
use super::signals::with_signals;

/// `cfq-relay emulate`: the emulator on `listen` until SIGTERM or Ctrl-C.
pub fn emulate(listen: SocketAddr, opts: EmulatorOptions) -> ExitCode {
    init_logging("info", LogFormat::Text);
    super::runtime(with_signals(|shutdown| {
        serve_emulator(listen, opts, shutdown)
    }))
}

/// `cfq-relay receive`: the webhook sink on `listen` until SIGTERM or Ctrl-C.
pub fn receive(listen: SocketAddr, opts: SinkOptions) -> ExitCode {
    init_logging("info", LogFormat::Text);
    super::runtime(with_signals(|shutdown| serve_sink(listen, opts, shutdown)))
}

/// `cfq-relay demo`: run it and print its summary line.
pub fn demo(opts: DemoOptions) -> ExitCode {
    init_logging("error", LogFormat::Text);
    super::runtime(async {
        let summary = demo::run(opts).await?;
        println!("{}", summary.line());
        Ok(())
    })
}

/// Serve the emulator on `listen` with `opts` (strict: one account, the queues of
/// `opts.queues`), print where, until `shutdown`.
async fn serve_emulator(
    listen: SocketAddr,
    opts: EmulatorOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let account_id = opts.account_id.clone().unwrap_or_default();
    let queues = opts.queues.clone();
    let emulator = Emulator::new(opts);
    let addr = emulator.start(listen, shutdown.clone()).await?;
    println!(
        "Cloudflare Queues emulator: api_base_url = \"{}\", account_id = \"{account_id}\"",
        Emulator::base_url(addr)
    );
    if queues.is_empty() {
        println!("no queue yet: add `--queue NAME`, or create one with POST …/queues");
    }
    for name in &queues {
        let id = emulator.queue_id(name).unwrap_or_default();
        println!("queue {name:?}: queue_id = \"{id}\" (the name works too)");
    }
    shutdown.cancelled().await;
    Ok(())
}

/// Serve the webhook sink on `listen`, print its URL, until `shutdown`.
async fn serve_sink(
    listen: SocketAddr,
    opts: SinkOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let sink = Sink::start(listen, opts, shutdown.clone()).await?;
    println!("webhook receiver: url = \"{}\"", sink.url());
    shutdown.cancelled().await;
    Ok(())
}
