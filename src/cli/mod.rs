//! The binary's tool commands, outside the library: `emulate` (the local Cloudflare Queues
//! API), `receive` (the local webhook sink) and `demo` (both plus the relay, in one process).
//! Each runs until its shutdown token is cancelled (SIGTERM, Ctrl-C) or its work is done.

pub mod demo;

use std::net::SocketAddr;

use cfq_emulator::sink::{Sink, SinkOptions};
use cfq_emulator::{Emulator, EmulatorOptions};
use tokio_util::sync::CancellationToken;

/// `cfq-relay emulate`: serve the emulator on `listen` with `opts` (strict: one account, the
/// queues of `opts.queues`), print where, until `shutdown`.
pub async fn emulate(
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

/// `cfq-relay receive`: serve the webhook sink on `listen`, print its URL, until `shutdown`.
pub async fn receive(
    listen: SocketAddr,
    opts: SinkOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let sink = Sink::start(listen, opts, shutdown.clone()).await?;
    println!("webhook receiver: url = \"{}\"", sink.url());
    shutdown.cancelled().await;
    Ok(())
}

/// `cfq-relay demo`: run it and print its summary line.
pub async fn demo(opts: demo::DemoOptions) -> anyhow::Result<()> {
    let summary = demo::run(opts).await?;
    println!("{}", summary.line());
    Ok(())
}
