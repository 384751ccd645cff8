//! The webhook sink of the tests: the workspace's one sink (`cfq_emulator::sink`), recording
//! every request and answering what the test's script says; and a tally of the answers that
//! said "delivered".

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use cfq_emulator::sink::{Answer, Received};
use cfq_emulator::sink::{HEADER_MESSAGE_ID, Sink, SinkOptions};
use tokio_util::sync::CancellationToken;

/// A [`Sink`] on `127.0.0.1:0` that records every request (`received`, `count`, `for_id`,
/// `max_in_flight`, `url`, `addr` through `Deref`). It serves until the test's runtime ends.
pub struct Hook {
    sink: Sink,
}

impl Deref for Hook {
    type Target = Sink;
    fn deref(&self) -> &Sink {
        &self.sink
    }
}

impl Hook {
    /// `script(request, index)` decides each answer (`index` counts requests from 0).
    pub async fn start(
        script: impl Fn(&Received, usize) -> Answer + Send + Sync + 'static,
    ) -> Hook {
        Self::start_with(SinkOptions::default(), script).await
    }

    /// [`Hook::start`] with the sink's options (a delay, a capacity, …); it always records.
    pub async fn start_with(
        opts: SinkOptions,
        script: impl Fn(&Received, usize) -> Answer + Send + Sync + 'static,
    ) -> Hook {
        let opts = SinkOptions {
            record: true,
            ..opts
        };
        let sink = Sink::start_scripted(
            "127.0.0.1:0".parse().unwrap(),
            opts,
            script,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        Hook { sink }
    }

    /// A sink that answers its first `n` requests with `first`, and 200 after.
    pub async fn failing_first(n: usize, first: Answer) -> Hook {
        Self::start(move |_, i| if i < n { first.clone() } else { Answer::ok() }).await
    }

    /// A sink that answers every request 200.
    pub async fn ok() -> Hook {
        Self::start(|_, _| Answer::ok()).await
    }

    /// The value of header `name` of every request, in arrival order ("" where absent).
    pub fn headers(&self, name: &str) -> Vec<String> {
        self.received()
            .iter()
            .map(|r| r.header(name).unwrap_or_default().to_owned())
            .collect()
    }

    /// The message id of every request, in arrival order (panics on a request without one).
    pub fn ids(&self) -> Vec<String> {
        self.received()
            .iter()
            .map(|r| {
                r.header(HEADER_MESSAGE_ID)
                    .expect("a message id")
                    .to_owned()
            })
            .collect()
    }
}

/// A sink that answers 200 after `delay`, tallying the answers.
pub async fn ok_hook(delay: Duration) -> (Hook, Tally) {
    let tally = Tally::default();
    let t = tally.clone();
    let hook = Hook::start(move |r, _| {
        t.record(r.header("cfq-message-id").unwrap_or("?"));
        Answer::ok().delayed(delay)
    })
    .await;
    (hook, tally)
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

/// One HTTP/1.1 request read off a raw socket, for the tests whose webhook must misbehave at
/// the TCP level (answer in pieces, reset, hold the body), which the sink cannot.
pub struct RawRequest {
    /// The request line and headers, lowercased.
    pub head: String,
    /// The body: `content-length` bytes.
    pub body: Vec<u8>,
}

impl RawRequest {
    /// Read one request from `s`; `None` when the connection ends first.
    pub async fn read(s: &mut tokio::net::TcpStream) -> Option<Self> {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let mut request = Self {
            head,
            body: Vec::new(),
        };
        let len: usize = request
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        request.body = buf[head_end..head_end + len].to_vec();
        Some(request)
    }

    /// The value of header `name` (lowercase), trimmed.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(|v| v.trim().to_owned())
    }
}
