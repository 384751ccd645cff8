//! `cfq-bench`: the helper of `bench/run.sh`, the relay's benchmark.
//!
//! `run` drives the whole benchmark: it starts the emulator, the webhook receiver and the relay
//! as processes of their own (`cfq-relay emulate`, `cfq-relay receive`, `cfq-relay run`), so
//! each one's CPU seconds (`/proc/PID/stat`) and peak RSS (`VmHWM` in `/proc/PID/status`) are
//! its own; publishes through the emulator's batch endpoint; measures the relay's throughput;
//! runs `wrk` against the same receiver with the same request for the machine's limit, and a
//! naive sequential consumer for the floor; and prints one Markdown table. `publish` and
//! `naive` are its parts, usable alone. Every target is on 127.0.0.1 and every loop is bounded
//! in count and time.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use serde_json::{Value, json};

#[path = "cfq_bench/sim.rs"]
mod sim;

const ACCOUNT: &str = "0123456789abcdef0123456789abcdef";
const TOKEN: &str = "bench-token";
/// Cloudflare's throughput ceiling of one queue (pull and ack included).
const QUEUE_CEILING: f64 = 5000.0;

#[derive(Parser)]
#[command(name = "cfq-bench", about = "The relay's benchmark (see bench/run.sh)")]
struct Cli {
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
    let cli = Cli::parse();
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
        } => rt.block_on(run_all(RunOptions {
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
            let api = Api::new(api);
            publish(&api, &queue, messages, size, concurrency).await?;
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
            let api = Api::new(api);
            let (delivered, secs) =
                naive(&api, &queue, &webhook, messages, Duration::from_secs(max_seconds)).await?;
            let cpu = cpu_seconds(std::process::id()).unwrap_or(0.0);
            let rss = peak_rss_mib(std::process::id()).unwrap_or(0.0);
            println!(
                "{}",
                json!({"delivered": delivered, "seconds": secs, "cpu_seconds": cpu, "peak_rss_mib": rss})
            );
            Ok(())
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// The emulator's API, as a producer and an observer

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(base: String) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("a plain HTTP client builds"),
        }
    }

    fn queue_url(&self, queue: &str, op: &str) -> String {
        format!(
            "{}/accounts/{ACCOUNT}/queues/{queue}/messages{op}",
            self.base
        )
    }

    async fn post(&self, url: &str, body: &Value) -> anyhow::Result<Value> {
        let resp = self
            .http
            .post(url)
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = resp.status();
        let value: Value = resp.json().await.with_context(|| format!("POST {url}"))?;
        if !status.is_success() {
            bail!("POST {url}: {status}: {value}");
        }
        Ok(value)
    }

    /// Create `queue` unless it exists (the emulator, like Cloudflare, answers 404 for a queue
    /// never created).
    async fn create_queue(&self, queue: &str) -> anyhow::Result<()> {
        let url = format!("{}/accounts/{ACCOUNT}/queues", self.base);
        let resp = self
            .http
            .post(&url)
            .bearer_auth(TOKEN)
            .json(&json!({"queue_name": queue}))
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = resp.status();
        // 409: it exists already.
        if !status.is_success() && status.as_u16() != 409 {
            let text = resp.text().await.unwrap_or_default();
            bail!("POST {url}: {status}: {text}");
        }
        Ok(())
    }

    /// The emulator's counters of a queue (`published`, `acked`, `pull_calls`, …).
    async fn stats(&self, queue: &str) -> anyhow::Result<Value> {
        let url = format!("{}/_emulator/queues/{queue}/stats", self.base);
        let resp = self.http.get(&url).bearer_auth(TOKEN).send().await?;
        Ok(resp.error_for_status()?.json().await?)
    }
}

fn count(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// One message of `size` payload bytes; the content type goes text, json, bytes in turn.
fn message(i: usize, size: usize, bytes_b64: &str) -> Value {
    match i % 3 {
        0 => {
            let mut s = format!("message {i:09} ");
            while s.len() < size {
                s.push_str("lorem ipsum dolor sit amet ");
            }
            s.truncate(size);
            json!({"body": s, "content_type": "text"})
        }
        1 => {
            let head = format!(r#"{{"order":{i},"items":[{{"sku":"A-{i}","qty":2}}],"pad":""#);
            let pad = size.saturating_sub(head.len() + 2);
            let doc = format!("{head}{}\"}}", "x".repeat(pad));
            let value: Value = serde_json::from_str(&doc).unwrap_or(Value::Null);
            json!({"body": value, "content_type": "json"})
        }
        _ => json!({"body": bytes_b64, "content_type": "bytes"}),
    }
}

async fn publish(
    api: &Api,
    queue: &str,
    messages: usize,
    size: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let raw: Vec<u8> = (0..size).map(|b| (b * 31 % 251) as u8).collect();
    let b64 = STANDARD.encode(raw);
    api.create_queue(queue).await?;
    let url = api.queue_url(queue, "/batch");
    // A batch holds at most 100 messages and 256 KB (each message's ~100 bytes of metadata
    // included); bytes bodies go as base64, but the limit counts the payload.
    let per_batch = (250_000 / (size + 100)).clamp(1, 100);
    let batches: Vec<(usize, usize)> = (0..messages)
        .step_by(per_batch)
        .map(|start| (start, (start + per_batch).min(messages)))
        .collect();
    let mut calls = futures_util::stream::iter(batches)
        .map(|(start, end)| {
            let body = json!({"messages": (start..end).map(|i| message(i, size, &b64)).collect::<Vec<_>>()});
            let url = url.clone();
            async move { api.post(&url, &body).await }
        })
        .buffer_unordered(concurrency.max(1));
    while let Some(done) = calls.next().await {
        done?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The naive consumer

async fn naive(
    api: &Api,
    queue: &str,
    webhook: &str,
    messages: usize,
    max: Duration,
) -> anyhow::Result<(usize, f64)> {
    let started = Instant::now();
    let pull_url = api.queue_url(queue, "/pull");
    let ack_url = api.queue_url(queue, "/ack");
    let mut delivered = 0usize;
    let mut empty_pulls = 0;
    while delivered < messages && started.elapsed() < max && empty_pulls < 50 {
        let pulled = api
            .post(
                &pull_url,
                &json!({"batch_size": 100, "visibility_timeout_ms": 60_000}),
            )
            .await?;
        let batch = pulled["result"]["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if batch.is_empty() {
            empty_pulls += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let mut acks = Vec::new();
        let mut retries = Vec::new();
        for m in batch {
            let lease = m["lease_id"].as_str().unwrap_or_default().to_owned();
            let body = m["body"].as_str().unwrap_or_default().to_owned();
            let ct = m["metadata"]["CF-Content-Type"].as_str();
            let ok = match cfq_relay::delivery::decode_body(ct, body) {
                Ok(p) => api
                    .http
                    .post(webhook)
                    .header("content-type", p.content_type)
                    .body(p.bytes)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success()),
                Err(_) => false,
            };
            if ok {
                acks.push(json!({"lease_id": lease}));
                delivered += 1;
            } else {
                retries.push(json!({"lease_id": lease, "delay_seconds": 0}));
            }
        }
        api.post(&ack_url, &json!({"acks": acks, "retries": retries}))
            .await?;
    }
    Ok((delivered, started.elapsed().as_secs_f64()))
}

// ---------------------------------------------------------------------------------------------
// Processes and /proc

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// User + system CPU seconds of a running process.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from the closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// Peak resident set size (VmHWM) of a running process, MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// A child process whose stderr goes to a log file; killed if dropped while running.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Start `cmd` and wait (up to `wait`) for its first stdout line; later lines are drained.
    fn start(
        name: &str,
        cmd: &mut Command,
        dir: &Path,
        wait: Duration,
    ) -> anyhow::Result<(Self, String)> {
        let log = dir.join(format!("{name}.log"));
        let mut child = cmd
            .env_remove("CLOUDFLARE_API_TOKEN")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut first = String::new();
            let _ = reader.read_line(&mut first);
            let _ = tx.send(first);
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let mut proc = Self {
            name: name.to_owned(),
            child,
            log,
        };
        match rx.recv_timeout(wait) {
            Ok(line) if !line.is_empty() => Ok((proc, line.trim().to_owned())),
            _ => {
                let _ = proc.child.kill();
                let _ = proc.child.wait();
                bail!(
                    "{name} printed nothing within {wait:?}; its log: {}",
                    proc.tail()
                )
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn cpu(&self) -> f64 {
        cpu_seconds(self.pid()).unwrap_or(0.0)
    }

    fn peak_rss(&self) -> f64 {
        peak_rss_mib(self.pid()).unwrap_or(0.0)
    }

    fn tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// SIGTERM, then up to `grace` for a clean exit, then SIGKILL. `Ok` only for exit 0.
    fn stop(mut self, grace: Duration) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("{} exited with {status}; log: {}", self.name, self.tail());
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        bail!("{} did not stop within {grace:?}", self.name)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?
        .local_addr()?
        .port())
}

// ---------------------------------------------------------------------------------------------
// The scenarios

struct RunOptions {
    messages: usize,
    size: usize,
    quick: bool,
    only: Vec<String>,
    out: Option<PathBuf>,
    work_dir: Option<PathBuf>,
}

/// The relay configurations the table compares.
#[derive(Clone, Copy)]
enum Profile {
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
    fn label(self) -> &'static str {
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

/// The processes of one scenario: emulator and receiver.
struct Bed {
    dir: PathBuf,
    bin: PathBuf,
    api: Api,
    hook: String,
    emulator: Proc,
    receiver: Proc,
}

impl Bed {
    fn start(
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
    fn start_with(
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

    /// The receiver's counters: (requests served, requests turned away with 503).
    async fn receiver_stats(&self) -> anyhow::Result<(u64, u64)> {
        let url = self.hook.replace("/hook", "/_receiver/stats");
        let v: Value = self.api.http.get(&url).send().await?.json().await?;
        Ok((count(&v, "requests"), count(&v, "overloaded")))
    }

    fn stop(self) -> anyhow::Result<()> {
        self.emulator.stop(Duration::from_secs(10))?;
        self.receiver.stop(Duration::from_secs(10))
    }

    fn start_relay(&self, name: &str, queue: &str, profile: Profile) -> anyhow::Result<Relay> {
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
        let log = self.dir.join(format!("{name}.log"));
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
        let child = cmd
            .args(["run", "--config"])
            .arg(&path)
            .env_remove("CLOUDFLARE_API_TOKEN")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting the relay")?;
        Ok(Relay {
            proc: Proc {
                name: name.to_owned(),
                child,
                log,
            },
            metrics_url: format!("http://127.0.0.1:{admin_port}/metrics"),
        })
    }
}

struct Relay {
    proc: Proc,
    metrics_url: String,
}

impl Relay {
    /// `cfq_relay_deliveries_in_flight` from the relay's /metrics.
    async fn in_flight(&self, http: &reqwest::Client) -> Option<u64> {
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

fn quoted(line: &str) -> Option<String> {
    let start = line.find('"')? + 1;
    let end = start + line[start..].find('"')?;
    Some(line[start..end].to_owned())
}

/// What one relay run measured.
struct Measured {
    messages: u64,
    seconds: f64,
    relay_cpu: f64,
    relay_rss: f64,
    emulator_cpu: f64,
    receiver_cpu: f64,
    max_in_flight: u64,
    retried: u64,
    acked: u64,
    dead_lettered: u64,
    lease_expired: u64,
}

impl Measured {
    /// Messages acked (delivered) per second.
    fn rate(&self) -> f64 {
        self.acked as f64 / self.seconds.max(1e-9)
    }

    fn cpu_per_10k(&self) -> f64 {
        self.relay_cpu / (self.messages as f64 / 10_000.0).max(1e-9)
    }
}

/// Start a relay on `queue` (already holding `messages`), wait until all are acked, stop it.
/// `scrape`: read the relay's in-flight gauge every 100 ms (it costs the relay some CPU).
async fn relay_run(
    bed: &Bed,
    name: &str,
    queue: &str,
    profile: Profile,
    messages: u64,
    scrape: bool,
) -> anyhow::Result<Measured> {
    let timeout = Duration::from_secs(300);
    let before = bed.api.stats(queue).await?;
    let acked_before = count(&before, "acked");
    let (emu0, recv0) = (bed.emulator.cpu(), bed.receiver.cpu());
    let started = Instant::now();
    let mut relay = bed.start_relay(name, queue, profile)?;
    // Profiling aid: CFQ_BENCH_PROFILE='perf record -g -p $PID -o /tmp/$NAME.perf' runs while
    // the relay works (started with its pid and run name, stopped with SIGINT).
    let profiler = match std::env::var("CFQ_BENCH_PROFILE") {
        Ok(cmd) if !cmd.trim().is_empty() => Some(
            Command::new("sh")
                .args(["-c", &format!("exec {cmd}")])
                .env("PID", relay.proc.pid().to_string())
                .env("NAME", name)
                .stdin(Stdio::null())
                .spawn()
                .context("starting CFQ_BENCH_PROFILE")?,
        ),
        _ => None,
    };
    let metrics_http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()?;
    let mut max_in_flight = 0;
    let mut last_sample = Instant::now();
    let dead_before = count(&before, "dead_lettered");
    let stats = loop {
        let s = bed.api.stats(queue).await?;
        let done = count(&s, "acked") - acked_before + count(&s, "dead_lettered") - dead_before;
        if done >= messages {
            break s;
        }
        if started.elapsed() > timeout {
            bail!(
                "{name}: {} of {messages} acked after {timeout:?}; relay log: {}",
                count(&s, "acked") - acked_before,
                relay.proc.tail()
            );
        }
        if let Ok(Some(status)) = relay.proc.child.try_wait() {
            bail!(
                "{name}: the relay exited early ({status}); log: {}",
                relay.proc.tail()
            );
        }
        // Only where asked (latency-bound): a scrape costs the relay CPU.
        if scrape && last_sample.elapsed() >= Duration::from_millis(100) {
            last_sample = Instant::now();
            if let Some(n) = relay.in_flight(&metrics_http).await {
                max_in_flight = max_in_flight.max(n);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    if let Some(mut p) = profiler {
        // perf record writes its data on SIGINT.
        let _ = Command::new("kill")
            .args(["-INT", &p.id().to_string()])
            .status();
        let _ = p.wait();
    }
    let relay_cpu = relay.proc.cpu();
    let relay_rss = relay.proc.peak_rss();
    let m = Measured {
        messages,
        seconds,
        relay_cpu,
        relay_rss,
        emulator_cpu: bed.emulator.cpu() - emu0,
        receiver_cpu: bed.receiver.cpu() - recv0,
        max_in_flight,
        retried: count(&stats, "retried") - count(&before, "retried"),
        acked: count(&stats, "acked") - acked_before,
        dead_lettered: count(&stats, "dead_lettered") - dead_before,
        lease_expired: count(&stats, "lease_expired") - count(&before, "lease_expired"),
    };
    relay.proc.stop(Duration::from_secs(30))?;
    Ok(m)
}

/// What the naive consumer reported.
struct NaiveRun {
    delivered: u64,
    seconds: f64,
    cpu: f64,
    rss: f64,
    emulator_cpu: f64,
    receiver_cpu: f64,
}

impl NaiveRun {
    fn rate(&self) -> f64 {
        self.delivered as f64 / self.seconds.max(1e-9)
    }

    /// A table row: the naive consumer's figures after `scenario`, `result` and `vs`.
    fn row(
        &self,
        scenario: &str,
        run: &str,
        result: String,
        vs: String,
        notes: &str,
    ) -> [String; 9] {
        [
            scenario.into(),
            run.into(),
            result,
            vs,
            format!(
                "{:.2}",
                self.cpu / (self.delivered as f64 / 10_000.0).max(1e-9)
            ),
            mib(self.rss),
            format!("{:.1}", self.emulator_cpu),
            format!("{:.1}", self.receiver_cpu),
            format!(
                "{} msgs in {:.1} s{notes}",
                thousands(self.delivered as f64),
                self.seconds
            ),
        ]
    }
}

async fn naive_run(
    bed: &Bed,
    queue: &str,
    messages: usize,
    max: Duration,
) -> anyhow::Result<NaiveRun> {
    let (emu0, recv0) = (bed.emulator.cpu(), bed.receiver.cpu());
    let exe = std::env::current_exe()?;
    let (proc, line) = Proc::start(
        "naive",
        Command::new(exe).args([
            "naive",
            "--api",
            &bed.api.base,
            "--queue",
            queue,
            "--webhook",
            &bed.hook,
            "--messages",
            &messages.to_string(),
            "--max-seconds",
            &max.as_secs().to_string(),
        ]),
        &bed.dir,
        max + Duration::from_secs(30),
    )?;
    let v: Value = serde_json::from_str(&line).with_context(|| format!("naive said {line:?}"))?;
    let run = NaiveRun {
        delivered: count(&v, "delivered"),
        seconds: v["seconds"].as_f64().unwrap_or(1.0),
        cpu: v["cpu_seconds"].as_f64().unwrap_or(0.0),
        rss: v["peak_rss_mib"].as_f64().unwrap_or(0.0),
        emulator_cpu: bed.emulator.cpu() - emu0,
        receiver_cpu: bed.receiver.cpu() - recv0,
    };
    drop(proc);
    Ok(run)
}

/// What wrk reached against the receiver.
struct WrkRun {
    rate: f64,
    requests: u64,
    /// Every shape tried and its rate.
    shapes: String,
    args: String,
    wrk_cpu: f64,
    receiver_cpu: f64,
}

async fn wrk_run(bed: &Bed, size: usize, seconds: u64) -> anyhow::Result<WrkRun> {
    // The same request the relay sends: a 1 KB text body and the relay's headers.
    let script = bed.dir.join("post.lua");
    std::fs::write(
        &script,
        format!(
            r#"wrk.method = "POST"
wrk.body = string.rep("x", {size})
wrk.headers["Content-Type"] = "text/plain; charset=utf-8"
wrk.headers["User-Agent"] = "cfq-relay/{version}"
wrk.headers["cfq-queue-id"] = "bench-cpu"
wrk.headers["cfq-message-id"] = "0123456789abcdef0123456789abcdef"
wrk.headers["cfq-attempt"] = "1"
wrk.headers["cfq-timestamp-ms"] = "1767225600000"
wrk.headers["cfq-content-type"] = "text"
"#,
            version = env!("CARGO_PKG_VERSION")
        ),
    )?;
    let mut best: Option<WrkRun> = None;
    let mut seen = Vec::new();
    // Several shapes (threads × connections); the best one is the limit. On loopback fewer
    // connections often go faster: each event-loop wake-up then finds more work.
    let shapes: &[(u32, u32)] = if seconds < 5 {
        &[(2, 32), (2, 64)]
    } else {
        &[(2, 16), (2, 32), (2, 64), (1, 64)]
    };
    for &(threads, conns) in shapes {
        let args = format!("-t{threads} -c{conns} -d{seconds}s");
        let recv0 = bed.receiver.cpu();
        let mut child = Command::new("wrk")
            .args([
                format!("-t{threads}"),
                format!("-c{conns}"),
                format!("-d{seconds}s"),
                "-s".into(),
            ])
            .arg(&script)
            .arg(&bed.hook)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting wrk (apt-get install wrk)")?;
        let pid = child.id();
        let mut wrk_cpu = 0.0;
        let deadline = Instant::now() + Duration::from_secs(seconds + 30);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("wrk did not finish");
            }
            if let Some(c) = cpu_seconds(pid) {
                wrk_cpu = c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut out = String::new();
        if let Some(mut o) = child.stdout.take() {
            o.read_to_string(&mut out)?;
        }
        if !status.success() {
            bail!("wrk failed: {out}");
        }
        let rate = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .with_context(|| format!("no Requests/sec in wrk's output: {out}"))?;
        let requests = out
            .lines()
            .find_map(|l| {
                l.split(" requests in ")
                    .next()
                    .filter(|_| l.contains(" requests in "))
            })
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        seen.push(format!("c{conns}/t{threads} {}", thousands(rate)));
        let run = WrkRun {
            rate,
            requests,
            shapes: String::new(),
            args,
            wrk_cpu,
            receiver_cpu: bed.receiver.cpu() - recv0,
        };
        if best.as_ref().is_none_or(|b| run.rate > b.rate) {
            best = Some(run);
        }
    }
    let mut best = best.context("wrk ran no shape")?;
    best.shapes = seen.join(", ");
    Ok(best)
}

/// Idle: a relay on an empty queue, after its backoff reached the cap.
struct IdleRun {
    window: f64,
    api_calls: u64,
    cpu: f64,
    rss: f64,
}

async fn idle_run(bed: &Bed, warm_up: Duration, window: Duration) -> anyhow::Result<IdleRun> {
    let queue = "bench-idle";
    bed.api.create_queue(queue).await?;
    let relay = bed.start_relay("idle-relay", queue, Profile::Default)?;
    tokio::time::sleep(warm_up).await;
    let s0 = bed.api.stats(queue).await?;
    let cpu0 = relay.proc.cpu();
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let s1 = bed.api.stats(queue).await?;
    let run = IdleRun {
        window: t0.elapsed().as_secs_f64(),
        api_calls: count(&s1, "pull_calls") + count(&s1, "ack_calls")
            - count(&s0, "pull_calls")
            - count(&s0, "ack_calls"),
        cpu: relay.proc.cpu() - cpu0,
        rss: relay.proc.peak_rss(),
    };
    relay.proc.stop(Duration::from_secs(30))?;
    Ok(run)
}

/// What a steady producer run measured.
struct ProducerRun {
    rate: f64,
    published: u64,
    acked: u64,
    left: u64,
    per_pull: f64,
    calls_per_message: f64,
    cpu: f64,
    rss: f64,
    lease_expired: u64,
}

/// Publish `rate` messages a second for `window` while a default-config relay consumes them;
/// the rate is what was acked over the window.
async fn producer_run(
    bed: &Bed,
    queue: &str,
    rate: usize,
    window: Duration,
    size: usize,
) -> anyhow::Result<ProducerRun> {
    // The queue exists before the relay pulls it (the emulator, like Cloudflare, answers 404
    // for a queue that was never created).
    bed.api.create_queue(queue).await?;
    let relay = bed.start_relay(&format!("{queue}-relay"), queue, Profile::Default)?;
    let s0 = bed.api.stats(queue).await?;
    let cpu0 = relay.proc.cpu();
    let started = Instant::now();
    let tick = Duration::from_millis(50);
    let per_tick = rate * tick.as_millis() as usize / 1000;
    let mut published = 0u64;
    let mut next = tokio::time::Instant::now();
    while started.elapsed() < window {
        publish(&bed.api, queue, per_tick, size, 1).await?;
        published += per_tick as u64;
        next += tick;
        tokio::time::sleep_until(next).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let s1 = bed.api.stats(queue).await?;
    let diff = |k: &str| count(&s1, k) - count(&s0, k);
    let acked = diff("acked");
    let pulls = diff("pull_calls");
    let run = ProducerRun {
        rate: acked as f64 / seconds,
        published,
        acked,
        left: published.saturating_sub(acked),
        per_pull: diff("deliveries") as f64 / pulls.max(1) as f64,
        calls_per_message: (pulls + diff("ack_calls")) as f64 / acked.max(1) as f64,
        cpu: relay.proc.cpu() - cpu0,
        rss: relay.proc.peak_rss(),
        lease_expired: diff("lease_expired"),
    };
    relay.proc.stop(Duration::from_secs(30))?;
    Ok(run)
}

/// The webhook receiver's counters (`GET /_receiver/stats`): requests and messages.
async fn receiver_counts(hook: &str) -> anyhow::Result<(u64, u64)> {
    let base = hook.trim_end_matches("/hook");
    let v: Value = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?
        .get(format!("{base}/_receiver/stats"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok((count(&v, "requests"), count(&v, "messages")))
}

/// Scenario 6, batch vs single over a WAN-like link (API answers after 50 ms, webhook after
/// 100 ms): throughput, webhook requests per message and the relay's memory, one message per
/// request (default and high-throughput configs) against batches (default config plus a
/// `[consumers.webhook.batch]` table). Returns the table rows.
async fn batch_scenario(
    dir: &Path,
    bin: &Path,
    quick: bool,
    size: usize,
) -> anyhow::Result<Vec<[String; 9]>> {
    eprintln!(
        "cfq-bench: 6. batch vs single, WAN-like: API answers after 50 ms, webhook after 100 ms"
    );
    let bed = Bed::start(dir, bin, "batch", 50, 100)?;
    let scale = if quick { 1 } else { 4 };
    let mut rows = Vec::new();
    for (queue, profile, count) in [
        ("bench-wan-single", Profile::Default, 2_500 * scale),
        (
            "bench-wan-single-high",
            Profile::HighThroughput,
            15_000 * scale,
        ),
        ("bench-wan-batch-50", Profile::Batch(50), 15_000 * scale),
        ("bench-wan-batch", Profile::Batch(100), 15_000 * scale),
    ] {
        publish(&bed.api, queue, count, size, 16).await?;
        let (req0, msg0) = receiver_counts(&bed.hook).await?;
        let m = relay_run(
            &bed,
            &format!("{queue}-relay"),
            queue,
            profile,
            count as u64,
            true,
        )
        .await?;
        let (req1, msg1) = receiver_counts(&bed.hook).await?;
        let (requests, received) = (req1 - req0, msg1 - msg0);
        let per_request = received as f64 / requests.max(1) as f64;
        eprintln!(
            "  {}: {:.0} messages/s, {requests} requests for {received} messages ({per_request:.1} per request), peak RSS {:.1} MiB",
            profile.label(),
            m.rate(),
            m.relay_rss,
        );
        rows.push([
            "6. batch vs single (WAN-like)".into(),
            match profile {
                Profile::Batch(n) => format!("{} (max_messages = {n})", profile.label()),
                _ => profile.label().into(),
            },
            format!("{} msg/s", thousands(m.rate())),
            format!(
                "{:.0} % of 5,000/s; {:.3} requests/msg ({per_request:.1} msgs/request)",
                100.0 * m.rate() / QUEUE_CEILING,
                requests as f64 / received.max(1) as f64
            ),
            format!("{:.2}", m.cpu_per_10k()),
            mib(m.relay_rss),
            format!("{:.1}", m.emulator_cpu),
            format!("{:.1}", m.receiver_cpu),
            format!(
                "{} msgs in {:.1} s; {} webhook requests; up to {} messages in flight; retried {}, leases expired {}",
                thousands(m.messages as f64),
                m.seconds,
                thousands(requests as f64),
                m.max_in_flight,
                m.retried,
                m.lease_expired
            ),
        ]);
    }
    bed.stop()?;
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// The table

struct Table {
    rows: Vec<[String; 9]>,
}

const HEADER: [&str; 9] = [
    "scenario",
    "run",
    "result",
    "vs. reference",
    "relay CPU s / 10k msgs",
    "relay peak RSS",
    "emulator CPU s",
    "receiver CPU s",
    "notes",
];

impl Table {
    fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "| {} |", HEADER.join(" | "));
        let _ = writeln!(s, "|{}", HEADER.iter().map(|_| "---|").collect::<String>());
        for r in &self.rows {
            let _ = writeln!(s, "| {} |", r.join(" | "));
        }
        s
    }
}

fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mib(v: f64) -> String {
    format!("{v:.1} MiB")
}

async fn run_all(opts: RunOptions) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .context("no directory of cfq-bench")?
        .join("cfq-relay");
    if !bin.exists() {
        bail!(
            "{} not found: build it first (cargo build --release)",
            bin.display()
        );
    }
    let dir = match &opts.work_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("cfq-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let want = |s: &str| opts.only.iter().any(|o| o == s);
    let mut table = Table { rows: Vec::new() };
    let n = opts.messages as u64;
    let started = Instant::now();
    eprintln!("cfq-bench: logs and configs in {}", dir.display());

    // Scenario 1 may also run in parts: wrk, relay-default, relay-high, naive.
    let part = |p: &str| want("cpu") || want(p);
    if ["wrk", "relay-default", "relay-high", "naive"]
        .iter()
        .any(|p| part(p))
    {
        eprintln!("cfq-bench: 1. CPU-bound: emulator and receiver without added latency");
        let bed = Bed::start(&dir, &bin, "cpu", 0, 0)?;
        let mut limit = None;
        if part("wrk") {
            let wrk_secs = if opts.quick { 2 } else { 5 };
            let wrk = wrk_run(&bed, opts.size, wrk_secs).await?;
            eprintln!("  wrk {}: {:.0} requests/s", wrk.args, wrk.rate);
            limit = Some(wrk.rate);
            table.rows.push([
                "1. CPU-bound".into(),
                "wrk → receiver: the limit".into(),
                format!("{} req/s", thousands(wrk.rate)),
                "100 %".into(),
                "–".into(),
                "–".into(),
                "–".into(),
                format!("{:.1}", wrk.receiver_cpu),
                format!(
                    "best of wrk shapes ({}); best: wrk {}, {} requests, wrk CPU {:.1} s; same body size and headers as the relay's",
                    wrk.shapes,
                    wrk.args,
                    thousands(wrk.requests as f64),
                    wrk.wrk_cpu
                ),
            ]);
        }
        let of_limit = |rate: f64| match limit {
            Some(l) => format!("{:.0} % of the limit", 100.0 * rate / l),
            None => "–".to_owned(),
        };
        let mut relay_rates = Vec::new();
        for (queue, profile, sub) in [
            ("bench-cpu-default", Profile::Default, "relay-default"),
            ("bench-cpu-high", Profile::HighThroughput, "relay-high"),
        ] {
            if !part(sub) {
                continue;
            }
            // Best of several runs, as wrk's best shape: the machine may be shared.
            let repeats = if opts.quick { 1 } else { 3 };
            let mut runs: Vec<Measured> = Vec::new();
            for i in 0..repeats {
                let queue = format!("{queue}-{i}");
                publish(&bed.api, &queue, opts.messages, opts.size, 4).await?;
                let m =
                    relay_run(&bed, &format!("{queue}-relay"), &queue, profile, n, false).await?;
                eprintln!(
                    "  {}: {:.0} messages/s, {:.2} CPU s / 10k, peak RSS {:.1} MiB",
                    profile.label(),
                    m.rate(),
                    m.cpu_per_10k(),
                    m.relay_rss
                );
                runs.push(m);
            }
            let rates: Vec<String> = runs.iter().map(|m| thousands(m.rate())).collect();
            let peak_rss = runs.iter().map(|m| m.relay_rss).fold(0.0, f64::max);
            let Some(m) = runs
                .into_iter()
                .max_by(|a, b| a.rate().total_cmp(&b.rate()))
            else {
                continue;
            };
            relay_rates.push(m.rate());
            table.rows.push([
                "1. CPU-bound".into(),
                profile.label().into(),
                format!("{} msg/s", thousands(m.rate())),
                of_limit(m.rate()),
                format!("{:.2}", m.cpu_per_10k()),
                mib(peak_rss),
                format!("{:.1}", m.emulator_cpu),
                format!("{:.1}", m.receiver_cpu),
                format!(
                    "{} ({} msg/s): {} msgs in {:.1} s; relay CPU {:.1} s; retried {}, leases expired {}",
                    if rates.len() == 1 { "1 run".to_owned() } else { format!("best of {} runs", rates.len()) },
                    rates.join(", "),
                    thousands(m.messages as f64),
                    m.seconds,
                    m.relay_cpu,
                    m.retried,
                    m.lease_expired
                ),
            ]);
        }
        if part("naive") {
            let naive_n = if opts.quick { 2_000 } else { 10_000 };
            publish(&bed.api, "bench-naive", naive_n, opts.size, 4).await?;
            let naive = naive_run(&bed, "bench-naive", naive_n, Duration::from_secs(60)).await?;
            let rate = naive.rate();
            eprintln!("  naive: {rate:.0} messages/s");
            let best = relay_rates.iter().cloned().fold(0.0, f64::max);
            let mut vs = of_limit(rate);
            if best > 0.0 {
                let _ = write!(vs, "; the relay is {:.1}× this", best / rate.max(1e-9));
            }
            table.rows.push(naive.row(
                "1. CPU-bound",
                "naive sequential consumer: the floor",
                format!("{} msg/s", thousands(rate)),
                vs,
                ": pull 100, POST each in turn, ack the batch",
            ));
        }
        bed.stop()?;
    }

    // Scenario 2 may also run in parts: lat-default, lat-high, lat-naive.
    let part = |p: &str| want("latency") || want(p);
    if ["lat-default", "lat-high", "lat-naive"]
        .iter()
        .any(|p| part(p))
    {
        eprintln!("cfq-bench: 2. latency-bound: API answers after 50 ms, webhook after 100 ms");
        let bed = Bed::start(&dir, &bin, "latency", 50, 100)?;
        // The default config now reaches the ceiling too: as many messages as the tuned one.
        let (n_default, n_high) = if opts.quick {
            (15_000, 15_000)
        } else {
            (60_000, 60_000)
        };
        for (queue, profile, count, sub) in [
            (
                "bench-lat-default",
                Profile::Default,
                n_default,
                "lat-default",
            ),
            (
                "bench-lat-high",
                Profile::HighThroughput,
                n_high,
                "lat-high",
            ),
        ] {
            if !part(sub) {
                continue;
            }
            publish(&bed.api, queue, count, opts.size, 16).await?;
            let m = relay_run(
                &bed,
                &format!("{queue}-relay"),
                queue,
                profile,
                count as u64,
                true,
            )
            .await?;
            eprintln!(
                "  {}: {:.0} messages/s, peak RSS {:.1} MiB, max in flight {}",
                profile.label(),
                m.rate(),
                m.relay_rss,
                m.max_in_flight
            );
            table.rows.push([
                "2. latency-bound".into(),
                profile.label().into(),
                format!("{} msg/s", thousands(m.rate())),
                format!("{:.0} % of 5,000/s", 100.0 * m.rate() / QUEUE_CEILING),
                format!("{:.2}", m.cpu_per_10k()),
                mib(m.relay_rss),
                format!("{:.1}", m.emulator_cpu),
                format!("{:.1}", m.receiver_cpu),
                format!(
                    "{} msgs in {:.1} s; up to {} deliveries in flight; retried {}, leases expired {}",
                    thousands(m.messages as f64),
                    m.seconds,
                    m.max_in_flight,
                    m.retried,
                    m.lease_expired
                ),
            ]);
        }
        if part("lat-naive") {
            let secs = if opts.quick { 5 } else { 10 };
            publish(&bed.api, "bench-lat-naive", 1_000, opts.size, 16).await?;
            let naive =
                naive_run(&bed, "bench-lat-naive", 1_000, Duration::from_secs(secs)).await?;
            let rate = naive.rate();
            eprintln!("  naive: {rate:.0} messages/s");
            table.rows.push(naive.row(
                "2. latency-bound",
                "naive sequential consumer",
                format!("{rate:.0} msg/s"),
                format!("{:.1} % of 5,000/s", 100.0 * rate / QUEUE_CEILING),
                "",
            ));
        }
        bed.stop()?;
    }

    if want("knee") {
        eprintln!(
            "cfq-bench: 4. capacity knee: a receiver that serves 200 at once (100 ms each) and answers 503 beyond"
        );
        let n_knee = if opts.quick { 2_000 } else { 20_000 };
        // The fixed run turns most requests away and waits for their retries: the full run only.
        let profiles: &[Profile] = if opts.quick {
            &[Profile::Default]
        } else {
            &[Profile::Fixed1000, Profile::Max1000, Profile::Default]
        };
        for (i, &profile) in profiles.iter().enumerate() {
            // A receiver of its own per run: its counters are the run's.
            let bed = Bed::start_with(
                &dir,
                &bin,
                &format!("knee{i}"),
                0,
                100,
                &[],
                &["--capacity", "200"],
            )?;
            let queue = format!("bench-knee-{i}");
            publish(&bed.api, &queue, n_knee, opts.size, 8).await?;
            let m = relay_run(
                &bed,
                &format!("{queue}-relay"),
                &queue,
                profile,
                n_knee as u64,
                false,
            )
            .await?;
            let (served, overloaded) = bed.receiver_stats().await?;
            let over_pct = 100.0 * overloaded as f64 / (served + overloaded).max(1) as f64;
            eprintln!(
                "  {}: {:.0} messages/s, {overloaded} overload answers ({over_pct:.1} %), {} dead-lettered",
                profile.label(),
                m.rate(),
                m.dead_lettered
            );
            table.rows.push([
                "4. capacity knee (200 at once, 100 ms; 2,000/s)".into(),
                profile.label().into(),
                format!("{} msg/s", thousands(m.rate())),
                format!("{:.0} % of the knee", 100.0 * m.rate() / 2000.0),
                format!("{:.2}", m.cpu_per_10k()),
                mib(m.relay_rss),
                format!("{:.1}", m.emulator_cpu),
                format!("{:.1}", m.receiver_cpu),
                format!(
                    "{} msgs in {:.1} s; {} overload answers ({over_pct:.1} % of requests); {} dead-lettered; retried {}, leases expired {}",
                    thousands(m.messages as f64),
                    m.seconds,
                    thousands(overloaded as f64),
                    m.dead_lettered,
                    m.retried,
                    m.lease_expired
                ),
            ]);
            bed.stop()?;
        }
    }

    if want("producer") {
        eprintln!(
            "cfq-bench: 5. producer at 2,000 msg/s, webhook 20 ms, default config; fault-free and with 2 % of API calls answering 500"
        );
        let secs = if opts.quick { 8 } else { 30 };
        let mut fault_free = None;
        for (i, ratio) in [0.0, 0.02].into_iter().enumerate() {
            let ratio_arg = ratio.to_string();
            let bed = Bed::start_with(
                &dir,
                &bin,
                &format!("producer{i}"),
                0,
                20,
                &["--error-ratio", &ratio_arg],
                &[],
            )?;
            let queue = format!("bench-producer-{i}");
            let p = producer_run(&bed, &queue, 2_000, Duration::from_secs(secs), opts.size).await?;
            let vs = match fault_free {
                None => "100 %".to_owned(),
                Some(r) => format!("{:.0} % of fault-free", 100.0 * p.rate / r),
            };
            fault_free.get_or_insert(p.rate);
            eprintln!(
                "  {:.0} % API errors: {:.0} messages/s, {} left queued, {:.3} API calls per message",
                ratio * 100.0,
                p.rate,
                p.left,
                p.calls_per_message
            );
            table.rows.push([
                "5. producer 2,000 msg/s, webhook 20 ms".into(),
                format!("relay, default config, {:.0} % API errors", ratio * 100.0),
                format!("{} msg/s", thousands(p.rate)),
                vs,
                format!("{:.2}", p.cpu / (p.acked as f64 / 10_000.0).max(1e-9)),
                mib(p.rss),
                "–".into(),
                "–".into(),
                format!(
                    "{} published and {} acked in {secs} s; {} still queued at the end; {:.1} messages a pull; {:.3} API calls per message (pull + ack); leases expired {}",
                    thousands(p.published as f64),
                    thousands(p.acked as f64),
                    thousands(p.left as f64),
                    p.per_pull,
                    p.calls_per_message,
                    p.lease_expired
                ),
            ]);
            bed.stop()?;
        }
    }

    if want("batch") {
        table
            .rows
            .extend(batch_scenario(&dir, &bin, opts.quick, opts.size).await?);
    }

    if want("idle") {
        eprintln!("cfq-bench: 3. idle: an empty queue, default config, API answers after 50 ms");
        let bed = Bed::start(&dir, &bin, "idle", 50, 100)?;
        let (warm, window) = if opts.quick { (5, 10) } else { (10, 60) };
        let idle = idle_run(&bed, Duration::from_secs(warm), Duration::from_secs(window)).await?;
        bed.stop()?;
        let per_min = idle.api_calls as f64 * 60.0 / idle.window;
        eprintln!(
            "  {per_min:.0} API calls/min, {:.2} CPU s over {:.0} s",
            idle.cpu, idle.window
        );
        table.rows.push([
            "3. idle".into(),
            "relay, default config, empty queue".into(),
            format!("{per_min:.0} API calls/min"),
            format!("{:.2} pulls/s (target ≤ 1)", per_min / 60.0),
            format!(
                "{:.2} s per minute ({:.2} % of a core)",
                idle.cpu * 60.0 / idle.window,
                100.0 * idle.cpu / idle.window
            ),
            mib(idle.rss),
            "–".into(),
            "–".into(),
            format!(
                "measured over {:.0} s after {warm} s of backoff",
                idle.window
            ),
        ]);
    }

    let md = table.markdown();
    println!("{md}");
    if let Some(out) = &opts.out {
        let mut doc = String::new();
        let _ = writeln!(doc, "# cfq-relay benchmark\n");
        let _ = writeln!(
            doc,
            "`bash bench/run.sh` on {} ({} CPUs), {} messages of {} bytes, {:.0} s in all{}.\n",
            machine(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            thousands(n as f64),
            opts.size,
            started.elapsed().as_secs_f64(),
            if opts.quick {
                " (--quick: not figures to quote)"
            } else {
                ""
            }
        );
        doc.push_str(&md);
        std::fs::write(out, doc)?;
        eprintln!("cfq-bench: table written to {}", out.display());
    }
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    format!("{cpu}, Linux {kernel}")
}
