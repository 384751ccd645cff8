//! One scenario's processes: the emulator and the webhook receiver (a [`Bed`]), the relay
//! configurations the table compares ([`Profile`]) and a relay started on one of them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use crate::api::{ACCOUNT, Api, TOKEN, count};
use crate::procs::{Proc, free_port, quoted};

/// The relay configurations the table compares.
#[derive(Clone, Copy)]
pub enum Profile {
    /// Only the required keys.
    Default,
    HighThroughput,
    /// `concurrency = 1000` (adaptive below it, as by default).
    Max1000,
    /// `concurrency = 1000`, `concurrency_mode = "fixed"`, breaker off: the behaviour before
    /// adaptive concurrency (and the breaker by default), for comparison.
    Fixed1000,
    /// The default config plus `[consumers.webhook.batch]` with this many messages a request.
    Batch(usize),
}

impl Profile {
    pub fn label(self) -> &'static str {
        match self {
            Profile::Default => "relay, default config",
            Profile::HighThroughput => "relay, high-throughput config",
            Profile::Max1000 => "relay, concurrency = 1000",
            Profile::Fixed1000 => {
                "relay, concurrency = 1000, concurrency_mode = fixed, breaker off (the old defaults)"
            }
            Profile::Batch(_) => "relay, default config + batch",
        }
    }

    /// Keys added to the webhook table.
    fn webhook_keys(self) -> String {
        match self {
            Profile::Batch(n) => format!("batch = {{ max_messages = {n}, max_wait = \"50ms\" }}\n"),
            Profile::Default | Profile::HighThroughput | Profile::Max1000 | Profile::Fixed1000 => {
                String::new()
            }
        }
    }

    /// Consumer keys added to the config (README: Performance).
    fn keys(self) -> &'static str {
        match self {
            Profile::Default => "",
            Profile::HighThroughput => "concurrency = 1000\nmax_pulls_in_flight = 16\n",
            Profile::Max1000 => "concurrency = 1000\n",
            // The behaviour before adaptive concurrency: a fixed pool and, as then, no breaker
            // (with the breaker on, the overloaded receiver keeps it open and the run stalls).
            Profile::Fixed1000 => {
                "concurrency = 1000\nconcurrency_mode = \"fixed\"\n[consumers.breaker]\nenabled = false\n"
            }
            Profile::Batch(_) => "",
        }
    }
}

/// The webhook receiver's counters (`GET /_receiver/stats`).
pub struct ReceiverCounts {
    /// Requests served.
    pub requests: u64,
    /// Requests turned away with 503 (`--capacity`).
    pub overloaded: u64,
    /// Messages received (a batch request carries several).
    pub messages: u64,
}

/// The processes of one scenario: emulator and receiver.
pub struct Bed {
    pub dir: PathBuf,
    bin: PathBuf,
    pub api: Api,
    pub hook: String,
    pub emulator: Proc,
    pub receiver: Proc,
}

impl Bed {
    /// An emulator whose API answers after `latency_ms` and a receiver that answers after
    /// `delay_ms`.
    pub fn start(
        dir: &Path,
        bin: &Path,
        name: &str,
        latency_ms: u64,
        delay_ms: u64,
    ) -> anyhow::Result<Self> {
        Self::start_with(dir, bin, name, latency_ms, delay_ms, &[], &[])
    }

    /// `emulate_args` and `receive_args` are added to the emulator's and the receiver's
    /// command lines (e.g. `--error-ratio 0.02`, `--capacity 200`).
    pub fn start_with(
        dir: &Path,
        bin: &Path,
        name: &str,
        latency_ms: u64,
        delay_ms: u64,
        emulate_args: &[&str],
        receive_args: &[&str],
    ) -> anyhow::Result<Self> {
        let (emulator, line) = Proc::start(
            &format!("{name}-emulator"),
            Command::new(bin)
                .args([
                    "emulate",
                    "--listen",
                    "127.0.0.1:0",
                    "--token",
                    TOKEN,
                    "--latency-ms",
                    &latency_ms.to_string(),
                ])
                .args(emulate_args),
            dir,
            Duration::from_secs(10),
        )?;
        let base = quoted(&line).context("emulator: no api_base_url on its first line")?;
        let (receiver, line) = Proc::start(
            &format!("{name}-receiver"),
            Command::new(bin)
                .args([
                    "receive",
                    "--listen",
                    "127.0.0.1:0",
                    "--delay-ms",
                    &delay_ms.to_string(),
                ])
                .args(receive_args),
            dir,
            Duration::from_secs(10),
        )?;
        let hook = quoted(&line).context("receiver: no url on its first line")?;
        Ok(Self {
            dir: dir.to_owned(),
            bin: bin.to_owned(),
            api: Api::new(base),
            hook,
            emulator,
            receiver,
        })
    }

    /// The receiver's counters.
    pub async fn receiver_counts(&self) -> anyhow::Result<ReceiverCounts> {
        let url = self.hook.replace("/hook", "/_receiver/stats");
        let v: Value = self
            .api
            .http
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(ReceiverCounts {
            requests: count(&v, "requests"),
            overloaded: count(&v, "overloaded"),
            messages: count(&v, "messages"),
        })
    }

    /// The relay's version as it sends it (`User-Agent`), e.g. `cfq-relay/0.1.0`.
    pub fn relay_user_agent(&self) -> anyhow::Result<String> {
        let out = Command::new(&self.bin).arg("--version").output()?;
        let version = String::from_utf8(out.stdout)?;
        Ok(version.trim().replacen(' ', "/", 1))
    }

    pub fn stop(self) -> anyhow::Result<()> {
        self.emulator.stop(Duration::from_secs(10))?;
        self.receiver.stop(Duration::from_secs(10))
    }

    /// Start a relay on `queue` with `profile`'s config; it runs until stopped.
    pub fn start_relay(&self, name: &str, queue: &str, profile: Profile) -> anyhow::Result<Relay> {
        let admin_port = free_port()?;
        let config = format!(
            r#"[cloudflare]
account_id = "{ACCOUNT}"
api_base_url = "{base}"
api_token = "{TOKEN}"
[admin]
listen = "127.0.0.1:{admin_port}"
[log]
level = "warn"
[[consumers]]
name = "bench"
queue_id = "{queue}"
{keys}[consumers.webhook]
url = "{hook}"
{webhook_keys}"#,
            base = self.api.base,
            keys = profile.keys(),
            webhook_keys = profile.webhook_keys(),
            hook = self.hook,
        );
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&path, config)?;
        // Profiling aid: CFQ_BENCH_RELAY_WRAPPER="valgrind --tool=callgrind" runs the relay
        // under that command (which must keep the process id, as valgrind does).
        let wrapper = std::env::var("CFQ_BENCH_RELAY_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut cmd = match words.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(words).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.args(["run", "--config"]).arg(&path);
        Ok(Relay {
            proc: Proc::spawn(name, &mut cmd, &self.dir, Stdio::null())?,
            metrics_url: format!("http://127.0.0.1:{admin_port}/metrics"),
        })
    }
}

/// A relay process and where its metrics are.
pub struct Relay {
    pub proc: Proc,
    metrics_url: String,
}

impl Relay {
    /// `cfq_relay_deliveries_in_flight` from the relay's /metrics.
    pub async fn in_flight(&self, http: &reqwest::Client) -> Option<u64> {
        let text = http
            .get(&self.metrics_url)
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find(|l| l.starts_with("cfq_relay_deliveries_in_flight{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
    }
}
