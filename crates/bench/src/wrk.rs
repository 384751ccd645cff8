//! `wrk` against the webhook receiver with the relay's own request: the machine's limit, the
//! reference of the CPU-bound scenario.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::bed::Bed;
use crate::procs::cpu_seconds;
use crate::report::thousands;

/// What wrk reached against the receiver.
pub struct WrkRun {
    pub rate: f64,
    pub requests: u64,
    /// Every shape tried and its rate.
    pub shapes: String,
    pub args: String,
    pub wrk_cpu: f64,
    pub receiver_cpu: f64,
}

/// The best of several wrk shapes, `seconds` each, POSTing `size` bytes as the relay does.
pub async fn wrk_run(bed: &Bed, size: usize, seconds: u64) -> anyhow::Result<WrkRun> {
    // The same request the relay sends: a 1 KB text body and the relay's headers.
    let user_agent = bed.relay_user_agent()?;
    let script = bed.dir.join("post.lua");
    std::fs::write(
        &script,
        format!(
            r#"wrk.method = "POST"
wrk.body = string.rep("x", {size})
wrk.headers["Content-Type"] = "text/plain; charset=utf-8"
wrk.headers["User-Agent"] = "{user_agent}"
wrk.headers["cfq-queue-id"] = "bench-cpu"
wrk.headers["cfq-message-id"] = "0123456789abcdef0123456789abcdef"
wrk.headers["cfq-attempt"] = "1"
wrk.headers["cfq-timestamp-ms"] = "1767225600000"
wrk.headers["cfq-content-type"] = "text"
"#
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
