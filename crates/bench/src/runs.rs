//! One measured run each: the relay draining a queue ([`relay_run`]), the naive consumer
//! ([`naive_run`]), a relay on an empty queue ([`idle_run`]) and a relay behind a steady
//! producer ([`producer_run`]); each with the table row it makes.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::api::{count, publish};
use crate::bed::{Bed, Profile};
use crate::procs::{Proc, signal};
use crate::report::{Row, mib, thousands};

/// What one relay run measured.
pub struct Measured {
    pub messages: u64,
    pub seconds: f64,
    pub relay_cpu: f64,
    pub relay_rss: f64,
    pub emulator_cpu: f64,
    pub receiver_cpu: f64,
    pub max_in_flight: u64,
    pub retried: u64,
    pub acked: u64,
    pub dead_lettered: u64,
    pub lease_expired: u64,
}

impl Measured {
    /// Messages acked (delivered) per second.
    pub fn rate(&self) -> f64 {
        self.acked as f64 / self.seconds.max(1e-9)
    }

    pub fn cpu_per_10k(&self) -> f64 {
        self.relay_cpu / (self.messages as f64 / 10_000.0).max(1e-9)
    }

    /// "N msgs in S s", the notes' opening.
    pub fn msgs_in(&self) -> String {
        format!(
            "{} msgs in {:.1} s",
            thousands(self.messages as f64),
            self.seconds
        )
    }

    /// "retried R, leases expired L", the notes' end.
    pub fn redone(&self) -> String {
        format!(
            "retried {}, leases expired {}",
            self.retried, self.lease_expired
        )
    }

    /// A table row of this run: its rate, CPU, memory and the bed's CPU.
    pub fn row(&self, scenario: &str, run: &str, vs: String, notes: String) -> Row {
        [
            scenario.into(),
            run.into(),
            format!("{} msg/s", thousands(self.rate())),
            vs,
            format!("{:.2}", self.cpu_per_10k()),
            mib(self.relay_rss),
            format!("{:.1}", self.emulator_cpu),
            format!("{:.1}", self.receiver_cpu),
            notes,
        ]
    }
}

/// Start a relay (`{queue}-relay`) on `queue` (already holding `messages`), wait until all are
/// acked, stop it. `scrape`: read the relay's in-flight gauge every 100 ms (it costs the relay
/// some CPU).
pub async fn relay_run(
    bed: &Bed,
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
    let name = &format!("{queue}-relay");
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
        signal(p.id(), "-INT");
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
pub struct NaiveRun {
    delivered: u64,
    seconds: f64,
    cpu: f64,
    rss: f64,
    emulator_cpu: f64,
    receiver_cpu: f64,
}

impl NaiveRun {
    pub fn rate(&self) -> f64 {
        self.delivered as f64 / self.seconds.max(1e-9)
    }

    /// A table row: the naive consumer's figures after `scenario`, `result` and `vs`.
    pub fn row(&self, scenario: &str, run: &str, result: String, vs: String, notes: &str) -> Row {
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

/// Run `cfq-bench naive` (this binary) as a process of its own on `queue`.
pub async fn naive_run(
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

/// Idle: a relay on an empty queue, after its backoff reached the cap.
pub struct IdleRun {
    pub window: f64,
    pub api_calls: u64,
    pub cpu: f64,
    pub rss: f64,
}

/// A default-config relay on an empty queue: `warm_up` for its backoff to reach the cap, then
/// its API calls and CPU over `window`.
pub async fn idle_run(bed: &Bed, warm_up: Duration, window: Duration) -> anyhow::Result<IdleRun> {
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
pub struct ProducerRun {
    pub rate: f64,
    pub published: u64,
    pub acked: u64,
    pub left: u64,
    pub per_pull: f64,
    pub calls_per_message: f64,
    pub cpu: f64,
    pub rss: f64,
    pub lease_expired: u64,
}

/// Publish `rate` messages a second for `window` while a default-config relay consumes them;
/// the rate is what was acked over the window.
pub async fn producer_run(
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
