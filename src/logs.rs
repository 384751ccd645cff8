//! Log hygiene: the one function that makes a value from outside (a message id, a lease id, a
//! content type, an API message) safe on a text log line, and the per-consumer limiter that
//! keeps repeated events of one kind from flooding the journal. The metrics stay the exact
//! record; the log shows the first few of each kind per window and then a count.

use std::borrow::Cow;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Longest value written to a log line; longer ones are cut (a 200 KB "id" is no id).
const MAX_CHARS: usize = 200;

/// `s` as it may appear on one text log line: control characters (CR, LF, ESC, …) escaped as
/// `\n`, `\r`, `\u{1b}`, and at most [`MAX_CHARS`] characters. Every value that comes from the
/// queue or the API goes through here before it reaches a log line.
pub fn esc(s: &str) -> Cow<'_, str> {
    let clean = s.len() <= MAX_CHARS && !s.chars().any(char::is_control);
    if clean {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len().min(MAX_CHARS * 2));
    for (i, c) in s.chars().enumerate() {
        if i == MAX_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// [`esc`] without the length cut, as an owned string (for messages kept in errors).
pub fn one_line(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// Kinds of repeated events, each limited on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    DeliveryFailed,
    PullFailed,
    AckFailed,
    LeaseTooClose,
    NoLease,
    Oversized,
    BadId,
    /// The admin server could not accept a connection (out of descriptors, …).
    AcceptFailed,
}

impl Event {
    const ALL: [Event; 8] = [
        Event::DeliveryFailed,
        Event::PullFailed,
        Event::AckFailed,
        Event::LeaseTooClose,
        Event::NoLease,
        Event::Oversized,
        Event::BadId,
        Event::AcceptFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Event::DeliveryFailed => "delivery_failed",
            Event::PullFailed => "pull_failed",
            Event::AckFailed => "ack_failed",
            Event::LeaseTooClose => "lease_too_close",
            Event::NoLease => "no_lease",
            Event::Oversized => "oversized",
            Event::BadId => "bad_id",
            Event::AcceptFailed => "accept_failed",
        }
    }

    fn index(self) -> usize {
        Event::ALL.iter().position(|e| *e == self).unwrap_or(0)
    }
}

/// Lines in full per kind and window, before suppression starts.
pub const BURST: u32 = 5;
/// The window of [`BURST`].
pub const WINDOW: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Default)]
struct KindWindow {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// Per-consumer limiter of repeated log events: the first [`BURST`] of a kind in a [`WINDOW`]
/// are logged in full, the rest are counted, and the count is logged as one summary line when
/// the next event of that kind opens a new window. At most `BURST + 1` lines per kind per
/// window, whatever the failure rate: far below journald's default limit (10,000 per 30 s).
pub struct LogLimiter {
    label: String,
    burst: u32,
    window: Duration,
    slots: Mutex<[KindWindow; Event::ALL.len()]>,
}

impl std::fmt::Debug for LogLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogLimiter")
            .field("label", &self.label)
            .finish()
    }
}

impl LogLimiter {
    pub fn new(label: impl Into<String>) -> Self {
        Self::with_limits(label, BURST, WINDOW)
    }

    pub fn with_limits(label: impl Into<String>, burst: u32, window: Duration) -> Self {
        Self {
            label: label.into(),
            burst,
            window,
            slots: Mutex::new([KindWindow::default(); Event::ALL.len()]),
        }
    }

    /// Write the summary of every kind whose window has ended with suppressed events, so the
    /// count is not held back until the next event of that kind (which may never come). The
    /// poller calls it after each pull.
    pub fn flush(&self) {
        let now = Instant::now();
        let due: Vec<(Event, u64, u64)> = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            Event::ALL
                .iter()
                .zip(slots.iter_mut())
                .filter_map(|(event, slot)| {
                    let start = slot.window_start?;
                    if slot.suppressed == 0 || now.duration_since(start) < self.window {
                        return None;
                    }
                    let count = std::mem::take(&mut slot.suppressed);
                    Some((*event, count, now.duration_since(start).as_secs()))
                })
                .collect()
        };
        for (event, count, over_s) in due {
            tracing::warn!(queue = %self.label, event = event.as_str(), suppressed = count,
                over_s, "similar log lines suppressed (the metrics count every event)");
        }
    }

    /// Whether this occurrence of `event` is to be logged in full. When it opens a new window
    /// after suppressed ones, the summary line of those is written first.
    pub fn allow(&self, event: Event) -> bool {
        let now = Instant::now();
        let summary = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            let slot = &mut slots[event.index()];
            let mut summary = None;
            let expired = slot
                .window_start
                .is_none_or(|start| now.duration_since(start) >= self.window);
            if expired {
                if slot.suppressed > 0 {
                    summary = Some((slot.suppressed, slot.window_start));
                }
                *slot = KindWindow {
                    window_start: Some(now),
                    logged: 0,
                    suppressed: 0,
                };
            }
            let allowed = slot.logged < self.burst;
            if allowed {
                slot.logged += 1;
            } else {
                slot.suppressed += 1;
            }
            (allowed, summary)
        };
        if let (_, Some((count, start))) = summary {
            let over_s = start.map(|s| now.duration_since(s).as_secs()).unwrap_or(0);
            tracing::warn!(queue = %self.label, event = event.as_str(), suppressed = count,
                over_s, "similar log lines suppressed (the metrics count every event)");
        }
        summary.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn esc_escapes_controls_and_cuts() {
        assert_eq!(esc("plain-id"), "plain-id");
        assert!(matches!(esc("plain-id"), Cow::Borrowed(_)));
        assert_eq!(esc("a\nb\rc\u{1b}[31m"), "a\\nb\\rc\\u{1b}[31m");
        let long = "x".repeat(1000);
        let cut = esc(&long);
        assert_eq!(cut.chars().count(), MAX_CHARS + 1);
        assert!(cut.ends_with('…'));
        assert!(!esc("id\n2026-01-01 INFO forged").contains('\n'));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_suppression_then_a_new_window() {
        let l = LogLimiter::with_limits("q", 3, Duration::from_secs(10));
        let allowed: Vec<bool> = (0..10).map(|_| l.allow(Event::DeliveryFailed)).collect();
        assert_eq!(allowed.iter().filter(|a| **a).count(), 3);
        assert!(allowed[..3].iter().all(|a| *a));
        // Another kind has its own budget.
        assert!(l.allow(Event::PullFailed));
        tokio::time::advance(Duration::from_secs(10)).await;
        // The summary is due once the window is over, and written once.
        let suppressed =
            |l: &LogLimiter| l.slots.lock().unwrap()[Event::DeliveryFailed.index()].suppressed;
        assert_eq!(suppressed(&l), 7);
        l.flush();
        assert_eq!(suppressed(&l), 0);
        assert!(l.allow(Event::DeliveryFailed), "a new window logs again");
        let s = l.slots.lock().unwrap()[Event::DeliveryFailed.index()];
        assert_eq!((s.logged, s.suppressed), (1, 0));
    }
}
