//! The relay in the test's own process: [`start`] runs `cfq_relay::start` with a shutdown
//! token of its own, [`InProcess::stop`] cancels it and waits for the drain.

use std::ops::Deref;
use std::time::Duration;

use cfq_emulator::Emulator;
use cfq_relay::{Config, Running};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::wait_until;

/// A running relay (its admin address, metrics and reload through `Deref`).
pub struct InProcess {
    running: Running,
    stop: CancellationToken,
}

impl Deref for InProcess {
    type Target = Running;
    fn deref(&self) -> &Running {
        &self.running
    }
}

/// Start the relay on `config` (panics when it does not start).
pub async fn start(config: Config) -> InProcess {
    let stop = CancellationToken::new();
    let running = cfq_relay::start(config, stop.clone())
        .await
        .unwrap_or_else(|e| panic!("the relay did not start: {e:#}"));
    InProcess { running, stop }
}

impl InProcess {
    /// Ask it to stop (a SIGTERM's shutdown) without waiting.
    pub fn signal(&self) {
        self.stop.cancel();
    }

    /// Stop it and wait until it has drained; panics when the drain reports an error.
    pub async fn stop(self) {
        self.stop.cancel();
        self.running.wait().await.unwrap();
    }

    /// [`InProcess::stop`]; returns how long the drain took.
    pub async fn stop_timed(self) -> Duration {
        let t0 = Instant::now();
        self.stop().await;
        t0.elapsed()
    }

    /// Wait (at most 20 s) until `n` messages of `queue` are acked, then stop; returns the
    /// metrics' text after the drain.
    pub async fn until_acked(self, emu: &Emulator, queue: &str, n: u64) -> String {
        wait_until(
            Duration::from_secs(20),
            &format!("{n} acked on {queue}"),
            || emu.stats(queue).acked >= n,
        )
        .await;
        let metrics = self.metrics().clone();
        self.stop().await;
        metrics.render()
    }
}
