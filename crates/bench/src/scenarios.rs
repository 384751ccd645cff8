//! `cfq-bench run`: the scenarios of the table, one function each, run in turn on processes of
//! their own (see [`crate::bed`]); each returns its table rows.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::api::publish;
use crate::bed::{Bed, Profile};
use crate::report::{Row, RunSummary, Table, mib, thousands, write_results};
use crate::runs::{Measured, idle_run, naive_run, producer_run, relay_run};
use crate::wrk::wrk_run;

/// Cloudflare's throughput ceiling of one queue (pull and ack included).
const QUEUE_CEILING: f64 = 5000.0;

/// What `cfq-bench run` was asked for.
pub struct RunOptions {
    pub messages: usize,
    pub size: usize,
    pub quick: bool,
    pub only: Vec<String>,
    pub out: Option<PathBuf>,
    pub work_dir: Option<PathBuf>,
}

/// A run under way: its options, the relay binary and the directory of logs and configs.
struct Plan {
    opts: RunOptions,
    bin: PathBuf,
    dir: PathBuf,
}

impl Plan {
    fn new(opts: RunOptions) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let bin = exe
            .parent()
            .context("no directory of cfq-bench")?
            .join("cfq-relay");
        if !bin.exists() {
            bail!(
                "{} not found: build it first (cargo build --release -p cfq-relay)",
                bin.display()
            );
        }
        let dir = match &opts.work_dir {
            Some(d) => d.clone(),
            None => std::env::temp_dir().join(format!("cfq-bench-{}", std::process::id())),
        };
        std::fs::create_dir_all(&dir)?;
        Ok(Self { opts, bin, dir })
    }

    /// `--only` names this scenario.
    fn wants(&self, scenario: &str) -> bool {
        self.opts.only.iter().any(|o| o == scenario)
    }

    /// `--only` names this part of `scenario`, or the whole scenario.
    fn wants_part(&self, scenario: &str, part: &str) -> bool {
        self.wants(scenario) || self.wants(part)
    }

    /// A scenario's processes, named `name`.
    fn bed(&self, name: &str, latency_ms: u64, delay_ms: u64) -> anyhow::Result<Bed> {
        Bed::start(&self.dir, &self.bin, name, latency_ms, delay_ms)
    }

    /// `quick` in a quick run, `full` otherwise.
    fn pick<T>(&self, quick: T, full: T) -> T {
        if self.opts.quick { quick } else { full }
    }
}

/// Run the scenarios asked for, print the table, and write it to `--out` if given.
pub async fn run_all(opts: RunOptions) -> anyhow::Result<()> {
    let plan = Plan::new(opts)?;
    let started = Instant::now();
    eprintln!("cfq-bench: logs and configs in {}", plan.dir.display());
    let mut table = Table::default();
    table.rows.extend(cpu_bound(&plan).await?);
    table.rows.extend(latency_bound(&plan).await?);
    if plan.wants("knee") {
        table.rows.extend(knee(&plan).await?);
    }
    if plan.wants("producer") {
        table.rows.extend(producer(&plan).await?);
    }
    if plan.wants("batch") {
        table.rows.extend(batch(&plan).await?);
    }
    if plan.wants("idle") {
        table.rows.extend(idle(&plan).await?);
    }

    let md = table.markdown();
    println!("{md}");
    if let Some(out) = &plan.opts.out {
        let summary = RunSummary {
            messages: plan.opts.messages,
            size: plan.opts.size,
            seconds: started.elapsed().as_secs_f64(),
            quick: plan.opts.quick,
        };
        write_results(out, &md, &summary)?;
        eprintln!("cfq-bench: table written to {}", out.display());
    }
    Ok(())
}

/// Scenario 1, CPU-bound (emulator and receiver without added latency): wrk for the limit,
/// the relay with the default and the high-throughput config, the naive consumer for the floor.
/// It may also run in parts: wrk, relay-default, relay-high, naive.
async fn cpu_bound(plan: &Plan) -> anyhow::Result<Vec<Row>> {
    let part = |p: &str| plan.wants_part("cpu", p);
    if !["wrk", "relay-default", "relay-high", "naive"]
        .iter()
        .any(|p| part(p))
    {
        return Ok(Vec::new());
    }
    eprintln!("cfq-bench: 1. CPU-bound: emulator and receiver without added latency");
    let bed = plan.bed("cpu", 0, 0)?;
    let mut rows = Vec::new();
    let mut limit = None;
    if part("wrk") {
        let wrk = wrk_run(&bed, plan.opts.size, plan.pick(2, 5)).await?;
        eprintln!("  wrk {}: {:.0} requests/s", wrk.args, wrk.rate);
        limit = Some(wrk.rate);
        rows.push([
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
        let (m, rates) = cpu_best_of(plan, &bed, queue, profile).await?;
        relay_rates.push(m.rate());
        let runs = if rates.len() == 1 {
            "1 run".to_owned()
        } else {
            format!("best of {} runs", rates.len())
        };
        let notes = format!(
            "{runs} ({} msg/s): {}; relay CPU {:.1} s; {}",
            rates.join(", "),
            m.msgs_in(),
            m.relay_cpu,
            m.redone()
        );
        rows.push(m.row("1. CPU-bound", profile.label(), of_limit(m.rate()), notes));
    }
    if part("naive") {
        let naive_n = plan.pick(2_000, 10_000);
        publish(&bed.api, "bench-naive", naive_n, plan.opts.size, 4).await?;
        let naive = naive_run(&bed, "bench-naive", naive_n, Duration::from_secs(60)).await?;
        let rate = naive.rate();
        eprintln!("  naive: {rate:.0} messages/s");
        let best = relay_rates.iter().cloned().fold(0.0, f64::max);
        let mut vs = of_limit(rate);
        if best > 0.0 {
            let _ = write!(vs, "; the relay is {:.1}× this", best / rate.max(1e-9));
        }
        rows.push(naive.row(
            "1. CPU-bound",
            "naive sequential consumer: the floor",
            format!("{} msg/s", thousands(rate)),
            vs,
            ": pull 100, POST each in turn, ack the batch",
        ));
    }
    bed.stop()?;
    Ok(rows)
}

/// The best of several relay runs on fresh queues (one in a quick run), as wrk's best shape:
/// the machine may be shared. Its peak RSS is the highest of the runs; also every run's rate.
async fn cpu_best_of(
    plan: &Plan,
    bed: &Bed,
    queue: &str,
    profile: Profile,
) -> anyhow::Result<(Measured, Vec<String>)> {
    let mut runs: Vec<Measured> = Vec::new();
    for i in 0..plan.pick(1, 3) {
        let queue = format!("{queue}-{i}");
        publish(&bed.api, &queue, plan.opts.messages, plan.opts.size, 4).await?;
        let n = plan.opts.messages as u64;
        let m = relay_run(bed, &queue, profile, n, false).await?;
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
    let mut best = runs
        .into_iter()
        .max_by(|a, b| a.rate().total_cmp(&b.rate()))
        .context("no relay run")?;
    best.relay_rss = peak_rss;
    Ok((best, rates))
}

/// Scenario 2, latency-bound (API answers after 50 ms, webhook after 100 ms): the relay with
/// the default and the high-throughput config, and the naive consumer. It may also run in
/// parts: lat-default, lat-high, lat-naive.
async fn latency_bound(plan: &Plan) -> anyhow::Result<Vec<Row>> {
    let part = |p: &str| plan.wants_part("latency", p);
    if !["lat-default", "lat-high", "lat-naive"]
        .iter()
        .any(|p| part(p))
    {
        return Ok(Vec::new());
    }
    eprintln!("cfq-bench: 2. latency-bound: API answers after 50 ms, webhook after 100 ms");
    let bed = plan.bed("latency", 50, 100)?;
    let mut rows = Vec::new();
    // The default config now reaches the ceiling too: as many messages as the tuned one.
    let count = plan.pick(15_000, 60_000);
    for (queue, profile, sub) in [
        ("bench-lat-default", Profile::Default, "lat-default"),
        ("bench-lat-high", Profile::HighThroughput, "lat-high"),
    ] {
        if !part(sub) {
            continue;
        }
        publish(&bed.api, queue, count, plan.opts.size, 16).await?;
        let m = relay_run(&bed, queue, profile, count as u64, true).await?;
        eprintln!(
            "  {}: {:.0} messages/s, peak RSS {:.1} MiB, max in flight {}",
            profile.label(),
            m.rate(),
            m.relay_rss,
            m.max_in_flight
        );
        let notes = format!(
            "{}; up to {} deliveries in flight; {}",
            m.msgs_in(),
            m.max_in_flight,
            m.redone()
        );
        rows.push(m.row(
            "2. latency-bound",
            profile.label(),
            of_ceiling(m.rate()),
            notes,
        ));
    }
    if part("lat-naive") {
        let secs = plan.pick(5, 10);
        publish(&bed.api, "bench-lat-naive", 1_000, plan.opts.size, 16).await?;
        let naive = naive_run(&bed, "bench-lat-naive", 1_000, Duration::from_secs(secs)).await?;
        let rate = naive.rate();
        eprintln!("  naive: {rate:.0} messages/s");
        rows.push(naive.row(
            "2. latency-bound",
            "naive sequential consumer",
            format!("{rate:.0} msg/s"),
            format!("{:.1} % of 5,000/s", 100.0 * rate / QUEUE_CEILING),
            "",
        ));
    }
    bed.stop()?;
    Ok(rows)
}

/// "N % of 5,000/s": a rate against Cloudflare's per-queue ceiling.
fn of_ceiling(rate: f64) -> String {
    format!("{:.0} % of 5,000/s", 100.0 * rate / QUEUE_CEILING)
}

/// Scenario 4, the capacity knee: a receiver that serves 200 at once (100 ms each) and answers
/// 503 beyond, against the old fixed defaults, `concurrency = 1000` and the default config.
async fn knee(plan: &Plan) -> anyhow::Result<Vec<Row>> {
    eprintln!(
        "cfq-bench: 4. capacity knee: a receiver that serves 200 at once (100 ms each) and answers 503 beyond"
    );
    let n_knee = plan.pick(2_000, 20_000);
    // The fixed run turns most requests away and waits for their retries: the full run only.
    let profiles = plan.pick(
        &[Profile::Default][..],
        &[Profile::Fixed1000, Profile::Max1000, Profile::Default][..],
    );
    let mut rows = Vec::new();
    for (i, &profile) in profiles.iter().enumerate() {
        // A receiver of its own per run: its counters are the run's.
        let bed = Bed::start_with(
            &plan.dir,
            &plan.bin,
            &format!("knee{i}"),
            0,
            100,
            &[],
            &["--capacity", "200"],
        )?;
        let queue = format!("bench-knee-{i}");
        publish(&bed.api, &queue, n_knee, plan.opts.size, 8).await?;
        let m = relay_run(&bed, &queue, profile, n_knee as u64, false).await?;
        let counts = bed.receiver_counts().await?;
        let (served, overloaded) = (counts.requests, counts.overloaded);
        let over_pct = 100.0 * overloaded as f64 / (served + overloaded).max(1) as f64;
        eprintln!(
            "  {}: {:.0} messages/s, {overloaded} overload answers ({over_pct:.1} %), {} dead-lettered",
            profile.label(),
            m.rate(),
            m.dead_lettered
        );
        let notes = format!(
            "{}; {} overload answers ({over_pct:.1} % of requests); {} dead-lettered; {}",
            m.msgs_in(),
            thousands(overloaded as f64),
            m.dead_lettered,
            m.redone()
        );
        rows.push(m.row(
            "4. capacity knee (200 at once, 100 ms; 2,000/s)",
            profile.label(),
            format!("{:.0} % of the knee", 100.0 * m.rate() / 2000.0),
            notes,
        ));
        bed.stop()?;
    }
    Ok(rows)
}

/// Scenario 5: a producer at 2,000 msg/s, webhook 20 ms, default config; fault-free and with
/// 2 % of API calls answering 500.
async fn producer(plan: &Plan) -> anyhow::Result<Vec<Row>> {
    eprintln!(
        "cfq-bench: 5. producer at 2,000 msg/s, webhook 20 ms, default config; fault-free and with 2 % of API calls answering 500"
    );
    let secs = plan.pick(8, 30);
    let mut fault_free = None;
    let mut rows = Vec::new();
    for (i, ratio) in [0.0, 0.02].into_iter().enumerate() {
        let ratio_arg = ratio.to_string();
        let bed = Bed::start_with(
            &plan.dir,
            &plan.bin,
            &format!("producer{i}"),
            0,
            20,
            &["--error-ratio", &ratio_arg],
            &[],
        )?;
        let queue = format!("bench-producer-{i}");
        let p = producer_run(
            &bed,
            &queue,
            2_000,
            Duration::from_secs(secs),
            plan.opts.size,
        )
        .await?;
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
        rows.push([
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
    Ok(rows)
}

/// Scenario 6, batch vs single over a WAN-like link (API answers after 50 ms, webhook after
/// 100 ms): throughput, webhook requests per message and the relay's memory, one message per
/// request (default and high-throughput configs) against batches (default config plus a
/// `[consumers.webhook.batch]` table).
async fn batch(plan: &Plan) -> anyhow::Result<Vec<Row>> {
    eprintln!(
        "cfq-bench: 6. batch vs single, WAN-like: API answers after 50 ms, webhook after 100 ms"
    );
    let bed = plan.bed("batch", 50, 100)?;
    let scale = plan.pick(1, 4);
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
        publish(&bed.api, queue, count, plan.opts.size, 16).await?;
        let c0 = bed.receiver_counts().await?;
        let m = relay_run(&bed, queue, profile, count as u64, true).await?;
        let c1 = bed.receiver_counts().await?;
        let (requests, received) = (c1.requests - c0.requests, c1.messages - c0.messages);
        let per_request = received as f64 / requests.max(1) as f64;
        eprintln!(
            "  {}: {:.0} messages/s, {requests} requests for {received} messages ({per_request:.1} per request), peak RSS {:.1} MiB",
            profile.label(),
            m.rate(),
            m.relay_rss,
        );
        let run = match profile {
            Profile::Batch(n) => format!("{} (max_messages = {n})", profile.label()),
            _ => profile.label().into(),
        };
        let vs = format!(
            "{}; {:.3} requests/msg ({per_request:.1} msgs/request)",
            of_ceiling(m.rate()),
            requests as f64 / received.max(1) as f64
        );
        let notes = format!(
            "{}; {} webhook requests; up to {} messages in flight; {}",
            m.msgs_in(),
            thousands(requests as f64),
            m.max_in_flight,
            m.redone()
        );
        rows.push(m.row("6. batch vs single (WAN-like)", &run, vs, notes));
    }
    bed.stop()?;
    Ok(rows)
}

/// Scenario 3, idle: a default-config relay on an empty queue, API answers after 50 ms: API
/// calls a minute and CPU once its backoff reached the cap.
async fn idle(plan: &Plan) -> anyhow::Result<Vec<Row>> {
    eprintln!("cfq-bench: 3. idle: an empty queue, default config, API answers after 50 ms");
    let bed = plan.bed("idle", 50, 100)?;
    let (warm, window) = plan.pick((5, 10), (10, 60));
    let idle = idle_run(&bed, Duration::from_secs(warm), Duration::from_secs(window)).await?;
    bed.stop()?;
    let per_min = idle.api_calls as f64 * 60.0 / idle.window;
    eprintln!(
        "  {per_min:.0} API calls/min, {:.2} CPU s over {:.0} s",
        idle.cpu, idle.window
    );
    Ok(vec![[
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
    ]])
}
