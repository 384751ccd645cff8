//! The bundled emulator on `127.0.0.1:0`, publishing into it, and the end state of a scenario
//! as its books tell it (printed as one `RESULT` line, which `cargo test -- --nocapture`
//! collects for the notes).

use std::fmt::Debug;
use std::ops::Deref;
use std::time::Duration;

use cfq_emulator::{ContentType, Emulator, EmulatorOptions, MessageBook};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::TOKEN;

/// An emulator on 127.0.0.1:0 (accepting [`TOKEN`]); it stops when dropped, at the end of
/// the test.
pub struct TestEmulator {
    emu: Emulator,
    _stop: DropGuard,
}

impl Deref for TestEmulator {
    type Target = Emulator;
    fn deref(&self) -> &Emulator {
        &self.emu
    }
}

/// Start a [`TestEmulator`]; returns it and its base URL.
pub async fn emulator(opts: EmulatorOptions) -> (TestEmulator, String) {
    let emu = Emulator::new(EmulatorOptions {
        token: Some(TOKEN.into()),
        ..opts
    });
    let stop = CancellationToken::new();
    let addr = emu
        .start("127.0.0.1:0".parse().unwrap(), stop.clone())
        .await
        .unwrap();
    let guard = TestEmulator {
        emu,
        _stop: stop.drop_guard(),
    };
    (guard, Emulator::base_url(addr))
}

/// Assert that `f` of every message book of `queue` is `want` (and that there are books).
pub fn assert_books<T: PartialEq + Debug>(
    emu: &Emulator,
    queue: &str,
    want: T,
    f: impl Fn(&MessageBook) -> T,
) {
    let books = emu.books(queue);
    assert!(!books.is_empty(), "no message in {queue}");
    for b in &books {
        assert_eq!(f(b), want, "{b:?}");
    }
}

/// Every message of `queue` (`n` of them) handed back at once: none leased, none lost to a
/// lease expiry, each delivered once, never acked and retried with no delay. Prints the
/// scenario's end state with the shutdown's duration `took`.
pub fn assert_handed_back(emu: &Emulator, queue: &str, n: u64, scenario: &str, took: Duration) {
    let s = emu.stats(queue);
    assert_eq!(
        (s.in_flight, s.backlog, s.lease_expired),
        (0, n, 0),
        "{s:?}"
    );
    assert_books(emu, queue, (1, 0, vec![0]), |b| {
        (b.deliveries, b.acks, b.retries.clone())
    });
    EndState::report_stop(emu, queue, scenario, 0, took);
}

/// Publish `n` more text messages `"{prefix}-{i}"` and wait (at most `limit`) until every
/// message published so far (`published`, which counts these too) is acked.
pub async fn publish_and_ack(
    emu: &Emulator,
    queue: &str,
    prefix: &str,
    n: usize,
    published: &mut u64,
    limit: Duration,
) {
    publish(emu, queue, prefix, n);
    *published += n as u64;
    let all = *published;
    let what = format!("{all} acked on {queue} ({prefix})");
    super::wait_until(limit, &what, || emu.stats(queue).acked == all).await;
}

/// Publish one text message; returns its id.
pub fn publish_text(emu: &Emulator, queue: &str, body: &str) -> String {
    emu.publish(
        queue,
        Some(ContentType::Text),
        body.as_bytes(),
        Duration::ZERO,
    )
    .unwrap()
}

/// Publish `n` text messages `"{prefix}-{i}"`; returns their ids in order.
pub fn publish(emu: &Emulator, queue: &str, prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| publish_text(emu, queue, &format!("{prefix}-{i}")))
        .collect()
}
/// The end state of one scenario, from the emulator's books.
#[derive(Debug, Clone)]
pub struct EndState {
    pub scenario: String,
    pub messages: usize,
    /// Messages acked exactly once.
    pub acked: usize,
    /// Messages acked more than once (the emulator removes a message on its first ack, so this
    /// stays 0 unless something is badly wrong).
    pub acked_twice: usize,
    pub dead_lettered: usize,
    /// Messages neither acked nor dead-lettered (still in the queue).
    pub remaining: usize,
    /// Pull hand-outs, redeliveries included.
    pub deliveries: u64,
    /// Successful (2xx) webhook deliveries beyond one per acked message.
    pub duplicates: u64,
    pub lease_expired: u64,
    pub retries: u64,
    pub shutdown: Option<Duration>,
}

impl EndState {
    /// `delivered_ok`: webhook answers that said "delivered" (a [`Tally`] total, or the
    /// receiver's request count when it always says yes).
    pub fn of(emu: &Emulator, queue: &str, scenario: &str, delivered_ok: u64) -> Self {
        let books = emu.books(queue);
        let stats = emu.stats(queue);
        let acked = books.iter().filter(|b| b.acks == 1).count();
        Self {
            scenario: scenario.to_owned(),
            messages: books.len(),
            acked,
            acked_twice: books.iter().filter(|b| b.acks > 1).count(),
            dead_lettered: books.iter().filter(|b| b.dead_lettered).count(),
            remaining: books
                .iter()
                .filter(|b| b.acks == 0 && !b.dead_lettered)
                .count(),
            deliveries: books.iter().map(|b| u64::from(b.deliveries)).sum(),
            duplicates: delivered_ok.saturating_sub(acked as u64),
            lease_expired: stats.lease_expired,
            retries: books.iter().map(|b| b.retries.len() as u64).sum(),
            shutdown: None,
        }
    }

    /// [`EndState::of`], printed.
    pub fn report(emu: &Emulator, queue: &str, scenario: &str, delivered_ok: u64) -> Self {
        let end = Self::of(emu, queue, scenario, delivered_ok);
        end.print();
        end
    }

    /// [`EndState::report`] of a scenario whose shutdown took `took`.
    pub fn report_stop(
        emu: &Emulator,
        queue: &str,
        scenario: &str,
        delivered_ok: u64,
        took: Duration,
    ) -> Self {
        let end = Self::of(emu, queue, scenario, delivered_ok).with_shutdown(took);
        end.print();
        end
    }

    pub fn with_shutdown(mut self, d: Duration) -> Self {
        self.shutdown = Some(d);
        self
    }

    /// Print the one-line summary the closing note collects.
    pub fn print(&self) -> &Self {
        println!(
            "RESULT {}: messages={} acked={} acked_twice={} dead_lettered={} remaining={} \
             deliveries={} duplicates={} lease_expiries={} retries={} shutdown={}",
            self.scenario,
            self.messages,
            self.acked,
            self.acked_twice,
            self.dead_lettered,
            self.remaining,
            self.deliveries,
            self.duplicates,
            self.lease_expired,
            self.retries,
            self.shutdown
                .map(|d| format!("{:.2}s", d.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
        );
        self
    }
}
