//! Shared by the reliability tests: reading metrics out of the Prometheus text, publishing
//! batches, and the end state of a scenario as the emulator's books tell it (printed as one
//! `RESULT` line, so `cargo test --test reliability -- --nocapture` collects the figures).
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cfq_emulator::{ContentType, Emulator};

/// The value of one sample of the Prometheus text `text`: metric `name` whose label set
/// contains every pair of `labels` (0 if there is none).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Publish `n` text messages `"{prefix}-{i}"`; returns their ids in order.
pub fn publish(emu: &Emulator, queue: &str, prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            emu.publish(
                queue,
                Some(ContentType::Text),
                format!("{prefix}-{i}").as_bytes(),
                Duration::ZERO,
            )
            .unwrap()
        })
        .collect()
}

/// Counts, per message id, the webhook answers that said "delivered" and reached the relay.
#[derive(Clone, Default)]
pub struct Tally(Arc<Mutex<HashMap<String, u32>>>);

impl Tally {
    pub fn record(&self, id: &str) {
        *self.0.lock().unwrap().entry(id.to_owned()).or_default() += 1;
    }
    pub fn total(&self) -> u64 {
        self.0.lock().unwrap().values().map(|v| u64::from(*v)).sum()
    }
    pub fn get(&self, id: &str) -> u32 {
        self.0.lock().unwrap().get(id).copied().unwrap_or(0)
    }
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
