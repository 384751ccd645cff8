//! One queue's state without I/O: ready, delayed and leased messages, their books and counters;
//! publish, pull, ack, retry, lease expiry and dead-lettering, each O(log n).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, SystemTime};

use crate::types::*;
use rand::RngExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

/// An HTTP pull consumer, as `GET …/queues/{id}` and `…/consumers` show it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct HttpPullConsumer {
    pub(crate) consumer_id: String,
    pub(crate) created_on: String,
    pub(crate) dead_letter_queue: String,
    pub(crate) queue_name: String,
    pub(crate) settings: ConsumerSettings,
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct ConsumerSettings {
    pub(crate) batch_size: u64,
    pub(crate) max_retries: u32,
    pub(crate) retry_delay: u64,
    pub(crate) visibility_timeout_ms: u64,
}

impl HttpPullConsumer {
    pub(crate) fn new(queue_name: &str, max_retries: u32) -> Self {
        Self {
            consumer_id: format!("{:032x}", rand::rng().random::<u128>()),
            created_on: rfc3339_now(),
            dead_letter_queue: String::new(),
            queue_name: queue_name.to_owned(),
            settings: ConsumerSettings {
                batch_size: DEFAULT_BATCH,
                max_retries,
                retry_delay: 0,
                visibility_timeout_ms: DEFAULT_VISIBILITY_MS,
            },
            kind: "http_pull",
        }
    }
}

/// A queue's `settings`, as Cloudflare shows them and `PATCH …/queues/{id}` changes them.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct QueueSettings {
    /// Seconds by which a message published without a delay is held back.
    pub(crate) delivery_delay: u64,
    /// Pulls hand out nothing while set.
    pub(crate) delivery_paused: bool,
    /// Shown, not applied: messages here never expire.
    pub(crate) message_retention_period: u64,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            delivery_delay: 0,
            delivery_paused: false,
            message_retention_period: 345_600,
        }
    }
}

/// A message checked and encoded for the wire, not yet in a queue.
pub(crate) struct Draft {
    pub(crate) content_type: Option<ContentType>,
    pub(crate) body: String,
    /// What counts towards the size limits: the payload plus [`MESSAGE_METADATA_BYTES`].
    pub(crate) size: usize,
    pub(crate) delay: Duration,
}

// ---------------------------------------------------------------------------------------------
// Queue state

#[derive(Default)]
pub(crate) struct StoredQueue {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) created_on: String,
    pub(crate) consumers: Vec<HttpPullConsumer>,
    /// When the last purge of the whole queue ran (RFC 3339).
    pub(crate) last_purge: Option<String>,
    pub(crate) settings: QueueSettings,
    pub(crate) modified_on: String,
    /// Live messages (not acked, not dead-lettered) by publish sequence number; the first is
    /// the oldest.
    pub(crate) messages: BTreeMap<u64, StoredMessage>,
    /// Ready messages in delivery order. May hold sequence numbers of messages removed
    /// meanwhile (by a stale ack); those are skipped when popped.
    pub(crate) ready: VecDeque<u64>,
    /// Delayed messages by due instant.
    pub(crate) delayed: BTreeSet<(Instant, u64)>,
    /// Leased messages by lease expiry.
    pub(crate) leased: BTreeSet<(Instant, u64)>,
    /// Sum of the wire body sizes of live messages.
    pub(crate) backlog_bytes: u64,
    pub(crate) stats: QueueStats,
    /// Indexed by sequence number.
    pub(crate) books: Vec<MessageBook>,
}

pub(crate) struct StoredMessage {
    pub(crate) id: String,
    pub(crate) body: String,
    pub(crate) content_type: Option<ContentType>,
    pub(crate) timestamp_ms: u64,
    /// The delay it was published with, in seconds (Cloudflare's `CF-msg-delay-secs`).
    pub(crate) delay_secs: u64,
    /// Deliveries so far; the current lease is that of delivery `attempts - 1`.
    pub(crate) attempts: u32,
    pub(crate) place: MessageState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum MessageState {
    Ready,
    Delayed(Instant),
    Leased(Instant),
}

/// One message handed out by a pull (with a `lease_id`) or a peek (with a `ref`), as it goes
/// on the wire.
#[derive(Serialize)]
pub(crate) struct WireMessage {
    pub(crate) id: String,
    pub(crate) body: String,
    pub(crate) attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) lease_id: Option<String>,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub(crate) peek_ref: Option<String>,
    pub(crate) metadata: WireMetadata,
    pub(crate) timestamp_ms: u64,
}

/// A message's metadata as Cloudflare sets it for messages published through the REST API.
#[derive(Serialize)]
pub(crate) struct WireMetadata {
    #[serde(rename = "CF-sourceMessageSource")]
    pub(crate) source: &'static str,
    #[serde(rename = "CF-Content-Type", skip_serializing_if = "Option::is_none")]
    pub(crate) content_type: Option<&'static str>,
    #[serde(rename = "CF-msg-delay-secs", skip_serializing_if = "Option::is_none")]
    pub(crate) delay_secs: Option<String>,
}

#[derive(Clone, Serialize)]
pub(crate) struct QueueMetrics {
    pub(crate) backlog_count: u64,
    pub(crate) backlog_bytes: u64,
    pub(crate) oldest_message_timestamp_ms: u64,
}

/// The outcome of one ack call.
#[derive(Default)]
pub(crate) struct AckOutcome {
    pub(crate) ack_count: u64,
    pub(crate) retry_count: u64,
    pub(crate) warnings: BTreeMap<String, String>,
}

impl StoredQueue {
    /// What lease ids and peek refs are bound to: this queue, not an earlier one of the same
    /// name (and so the same id) that was deleted.
    pub(crate) fn scope(&self) -> String {
        format!("{}/{}", self.id, self.created_on)
    }

    /// Deliveries after which a failing message is dead-lettered: its first HTTP pull
    /// consumer's `max_retries`, or `default` (`--max-retries`) without one.
    pub(crate) fn max_retries(&self, default: u32) -> u32 {
        self.consumers
            .first()
            .map_or(default, |c| c.settings.max_retries)
    }

    pub(crate) fn stats(&self) -> QueueStats {
        QueueStats {
            backlog: self.messages.len() as u64,
            in_flight: self.leased.len() as u64,
            ..self.stats.clone()
        }
    }

    pub(crate) fn metrics(&self) -> QueueMetrics {
        QueueMetrics {
            backlog_count: self.messages.len() as u64,
            backlog_bytes: self.backlog_bytes,
            oldest_message_timestamp_ms: self
                .messages
                .first_key_value()
                .map_or(0, |(_, m)| m.timestamp_ms),
        }
    }

    /// The queue as `GET …/queues/{id}` shows it.
    pub(crate) fn info(&self) -> Value {
        serde_json::json!({
            "queue_id": self.id,
            "queue_name": self.name,
            "created_on": self.created_on,
            "modified_on": if self.modified_on.is_empty() { &self.created_on } else { &self.modified_on },
            "producers": [],
            "producers_total_count": 0,
            "consumers": self.consumers,
            "consumers_total_count": self.consumers.len(),
            "settings": self.settings,
        })
    }

    pub(crate) fn wire(m: &StoredMessage) -> WireMessage {
        WireMessage {
            id: m.id.clone(),
            body: m.body.clone(),
            attempts: m.attempts,
            lease_id: None,
            peek_ref: None,
            metadata: WireMetadata {
                source: "api",
                content_type: m.content_type.map(ContentType::as_str),
                delay_secs: (m.delay_secs > 0).then(|| m.delay_secs.to_string()),
            },
            timestamp_ms: m.timestamp_ms,
        }
    }

    pub(crate) fn publish(&mut self, now: Instant, timestamp_ms: u64, mut draft: Draft) -> String {
        if draft.delay.is_zero() {
            // The queue's `delivery_delay` applies to a message published without a delay.
            draft.delay = Duration::from_secs(self.settings.delivery_delay);
        }
        let seq = self.books.len() as u64;
        let id = format!("{:032x}", rand::rng().random::<u128>());
        let place = if draft.delay.is_zero() {
            self.ready.push_back(seq);
            MessageState::Ready
        } else {
            let due = now + draft.delay;
            self.delayed.insert((due, seq));
            MessageState::Delayed(due)
        };
        self.backlog_bytes += draft.body.len() as u64;
        self.messages.insert(
            seq,
            StoredMessage {
                id: id.clone(),
                body: draft.body,
                content_type: draft.content_type,
                timestamp_ms,
                delay_secs: draft.delay.as_secs(),
                attempts: 0,
                place,
            },
        );
        self.books.push(MessageBook {
            id: id.clone(),
            deliveries: 0,
            acks: 0,
            dead_lettered: false,
            retries: Vec::new(),
            lease_answers: Vec::new(),
        });
        self.stats.published += 1;
        id
    }

    /// Expire due leases and release due delayed messages, in order of due time.
    pub(crate) fn settle(&mut self, now: Instant, max_retries: u32) {
        loop {
            let lease = self.leased.first().copied().filter(|(t, _)| *t <= now);
            let delay = self.delayed.first().copied().filter(|(t, _)| *t <= now);
            match (lease, delay) {
                (Some(l), Some(d)) if d < l => self.release(d),
                (Some(l), _) => self.expire(l, max_retries),
                (None, Some(d)) => self.release(d),
                (None, None) => break,
            }
        }
    }

    pub(crate) fn release(&mut self, key: (Instant, u64)) {
        self.delayed.remove(&key);
        if let Some(m) = self.messages.get_mut(&key.1) {
            m.place = MessageState::Ready;
            self.ready.push_back(key.1);
        }
    }

    pub(crate) fn expire(&mut self, key: (Instant, u64), max_retries: u32) {
        self.leased.remove(&key);
        let seq = key.1;
        let Some(m) = self.messages.get_mut(&seq) else {
            return;
        };
        self.stats.lease_expired += 1;
        if m.attempts > max_retries {
            self.dead_letter(seq);
        } else {
            m.place = MessageState::Ready;
            self.ready.push_back(seq);
        }
    }

    /// Remove a live message and everything that points to it.
    pub(crate) fn remove(&mut self, seq: u64) -> Option<StoredMessage> {
        let m = self.messages.remove(&seq)?;
        match m.place {
            MessageState::Ready => {} // its `ready` entry is skipped when popped
            MessageState::Delayed(t) => {
                self.delayed.remove(&(t, seq));
            }
            MessageState::Leased(t) => {
                self.leased.remove(&(t, seq));
            }
        }
        self.backlog_bytes = self.backlog_bytes.saturating_sub(m.body.len() as u64);
        Some(m)
    }

    pub(crate) fn dead_letter(&mut self, seq: u64) {
        if self.remove(seq).is_some() {
            self.stats.dead_lettered += 1;
            if let Some(b) = self.book(seq) {
                b.dead_lettered = true;
            }
        }
    }

    /// Remove every message (a purge of the whole queue).
    pub(crate) fn purge_all(&mut self) {
        let seqs: Vec<u64> = self.messages.keys().copied().collect();
        for seq in seqs {
            if self.remove(seq).is_some() {
                self.stats.purged += 1;
            }
        }
        self.ready.clear();
        self.last_purge = Some(rfc3339_now());
    }

    pub(crate) fn book(&mut self, seq: u64) -> Option<&mut MessageBook> {
        usize::try_from(seq)
            .ok()
            .and_then(|i| self.books.get_mut(i))
    }

    /// Hand out up to `batch_size` ready messages under fresh leases (`lease` makes the lease
    /// id of a message's `(seq, delivery)`).
    pub(crate) fn pull(
        &mut self,
        now: Instant,
        batch_size: usize,
        visibility: Duration,
        lease: impl Fn(u64, u32) -> String,
    ) -> Vec<WireMessage> {
        self.stats.pull_calls += 1;
        if self.settings.delivery_paused {
            self.stats.empty_pulls += 1;
            return Vec::new();
        }
        let until = now + visibility;
        let mut out = Vec::with_capacity(batch_size.min(self.messages.len()));
        while out.len() < batch_size {
            let Some(seq) = self.ready.pop_front() else {
                break;
            };
            let Some(m) = self.messages.get_mut(&seq) else {
                continue; // removed while ready
            };
            if m.place != MessageState::Ready {
                continue;
            }
            let delivery = m.attempts;
            m.attempts += 1;
            m.place = MessageState::Leased(until);
            self.leased.insert((until, seq));
            let mut wire = match self.messages.get(&seq) {
                Some(m) => Self::wire(m),
                None => continue,
            };
            wire.lease_id = Some(lease(seq, delivery));
            out.push(wire);
            self.stats.deliveries += 1;
            if let Some(b) = self.book(seq) {
                b.deliveries += 1;
                b.lease_answers.push(0);
            }
        }
        if out.is_empty() {
            self.stats.empty_pulls += 1;
        }
        out
    }

    /// Up to `batch_size` ready messages, oldest first, without leasing them (`peek_ref`
    /// makes the ref of a message).
    pub(crate) fn peek(
        &self,
        batch_size: usize,
        peek_ref: impl Fn(u64) -> String,
    ) -> Vec<WireMessage> {
        self.messages
            .iter()
            .filter(|(_, m)| m.place == MessageState::Ready)
            .take(batch_size)
            .map(|(seq, m)| {
                let mut w = Self::wire(m);
                w.peek_ref = Some(peek_ref(*seq));
                w
            })
            .collect()
    }

    /// Record that an ack or retry item named delivery `delivery`'s lease of message `seq`.
    pub(crate) fn answer(&mut self, seq: u64, delivery: u32) {
        let reused = self.book(seq).is_some_and(|b| {
            match usize::try_from(delivery)
                .ok()
                .and_then(|i| b.lease_answers.get_mut(i))
            {
                Some(n) => {
                    *n += 1;
                    *n > 1
                }
                None => false,
            }
        });
        if reused {
            self.stats.reused_leases += 1;
        }
    }

    /// Apply the acks, then the retries, of one call (already validated). `resolve` reads a
    /// lease id: `(seq, delivery)` if this queue issued it.
    pub(crate) fn ack(
        &mut self,
        now: Instant,
        acks: &[AckedLease],
        retries: &[RetryItem],
        max_retries: u32,
        resolve: impl Fn(&str) -> Option<(u64, u32)>,
    ) -> AckOutcome {
        self.stats.ack_calls += 1;
        let mut out = AckOutcome::default();
        let known = |q: &mut Self, lease_id: &str, out: &mut AckOutcome| {
            let found = resolve(lease_id).filter(|(seq, _)| *seq < q.books.len() as u64);
            if found.is_none() {
                q.stats.unknown_leases += 1;
                out.warnings.insert(
                    lease_id.to_owned(),
                    "unknown lease: this queue never issued it".to_owned(),
                );
            }
            found
        };
        for a in acks {
            let Some((seq, delivery)) = known(self, &a.lease_id, &mut out) else {
                continue;
            };
            self.answer(seq, delivery);
            let earlier_acks = self.book(seq).map_or(0, |b| b.acks);
            if earlier_acks > 0 {
                self.stats.double_acks += 1;
            } else if !self.is_current(seq, delivery) {
                self.stats.stale_acks += 1;
            }
            self.remove(seq);
            self.stats.acked += 1;
            out.ack_count += 1;
            if let Some(b) = self.book(seq) {
                b.acks += 1;
            }
        }
        for r in retries {
            let Some((seq, delivery)) = known(self, &r.lease_id, &mut out) else {
                continue;
            };
            self.answer(seq, delivery);
            let delay = r.delay_seconds.unwrap_or(0);
            self.stats.retried += 1;
            out.retry_count += 1;
            if let Some(b) = self.book(seq) {
                b.retries.push(u32::try_from(delay).unwrap_or(u32::MAX));
            }
            if !self.is_current(seq, delivery) {
                // The lease already ran out (or was answered): nothing left to do.
                continue;
            }
            let Some(m) = self.messages.get_mut(&seq) else {
                continue;
            };
            if let MessageState::Leased(t) = m.place {
                self.leased.remove(&(t, seq));
            }
            if m.attempts > max_retries {
                self.dead_letter(seq);
            } else if delay == 0 {
                m.place = MessageState::Ready;
                self.ready.push_back(seq);
            } else {
                let due = now + Duration::from_secs(delay);
                m.place = MessageState::Delayed(due);
                self.delayed.insert((due, seq));
            }
        }
        out
    }

    /// Whether delivery `delivery` of message `seq` is still leased (its lease is current).
    pub(crate) fn is_current(&self, seq: u64, delivery: u32) -> bool {
        self.messages.get(&seq).is_some_and(|m| {
            matches!(m.place, MessageState::Leased(_)) && m.attempts == delivery + 1
        })
    }
}

pub(crate) fn rfc3339_now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

#[derive(Deserialize)]
pub(crate) struct AckedLease {
    pub(crate) lease_id: String,
}

#[derive(Deserialize)]
pub(crate) struct RetryItem {
    pub(crate) lease_id: String,
    #[serde(default, deserialize_with = "delay_number")]
    pub(crate) delay_seconds: Option<u64>,
}

/// `delay_seconds` of a retry: see [`whole`]. A value out of bounds fails the whole body
/// (checked before anything is applied); it is kept out of range here and refused by the
/// handler with code 10203.
pub(crate) fn delay_number<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<u64>, D::Error> {
    let n = Option::<serde_json::Number>::deserialize(d)?;
    Ok(n.map(|n| whole("delay_seconds", Some(&n), 0, 0..=MAX_DELAY_SECONDS).unwrap_or(u64::MAX)))
}

#[cfg(test)]
mod tests {

    use std::time::Duration;

    use super::*;

    use crate::{ContentType, Emulator, EmulatorOptions};

    /// The core stays O(log n) per message: 20k messages through publish, pull, retry, ack.
    #[test]
    fn many_messages_flow_through_quickly() {
        let emu = Emulator::new(EmulatorOptions::default());
        let n = 20_000u64;
        let drafts: Vec<Draft> = (0..n)
            .map(|i| {
                emu.draft(
                    Some(ContentType::Text),
                    format!("m{i}").as_bytes(),
                    Duration::ZERO,
                )
                .expect("draft")
            })
            .collect();
        emu.create_queue("q");
        emu.publish_drafts("q", drafts);
        let started = std::time::Instant::now();
        let emu2 = emu.clone();
        let mut st = emu.lock();
        let now = st.now();
        let q = st.find("q").expect("queue");
        let id = q.scope();
        let mut round = 0u32;
        while !q.messages.is_empty() {
            round += 1;
            assert!(round < 1000, "stuck");
            let batch = q.pull(now, 100, Duration::from_secs(30), |seq, d| {
                emu2.token_for(&id, 0, seq, d)
            });
            // Retry every tenth message once, ack the rest.
            let (retry, ack): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .partition(|m| m.attempts == 1 && m.id.ends_with('0'));
            let acks: Vec<AckedLease> = ack
                .into_iter()
                .map(|m| AckedLease {
                    lease_id: m.lease_id.unwrap_or_default(),
                })
                .collect();
            let retries: Vec<RetryItem> = retry
                .into_iter()
                .map(|m| RetryItem {
                    lease_id: m.lease_id.unwrap_or_default(),
                    delay_seconds: None,
                })
                .collect();
            let out = q.ack(now, &acks, &retries, 3, |l| emu2.read_token(&id, 0, l));
            assert!(out.warnings.is_empty());
        }
        let s = q.stats();
        assert_eq!(s.acked, n);
        assert_eq!(s.deliveries, n + s.retried);
        assert!(q.leased.is_empty() && q.ready.is_empty());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }
}
