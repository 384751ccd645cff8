//! Child processes and what `/proc` says of them: start one with its log, wait for its first
//! line, stop it (SIGTERM, then SIGKILL), and read its CPU seconds and peak RSS.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

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
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from the closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// Peak resident set size (VmHWM) of a running process, MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The machine, for the results file: CPU model and kernel.
pub fn machine() -> String {
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

/// Send `signal` (`-TERM`, `-INT`) to `pid` with kill(1).
pub fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status();
}

/// A child process whose stderr goes to a log file; killed if dropped while running.
pub struct Proc {
    name: String,
    pub child: Child,
    log: PathBuf,
}

impl Proc {
    /// Spawn `cmd` as `name`, its stderr to `dir/name.log`, without the relay's environment
    /// (token, log filter) so that each process runs on its own config.
    pub fn spawn(name: &str, cmd: &mut Command, dir: &Path, stdout: Stdio) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let child = cmd
            .env_remove("CLOUDFLARE_API_TOKEN")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// Start `cmd` and wait (up to `wait`) for its first stdout line; later lines are drained.
    pub fn start(
        name: &str,
        cmd: &mut Command,
        dir: &Path,
        wait: Duration,
    ) -> anyhow::Result<(Self, String)> {
        let mut proc = Self::spawn(name, cmd, dir, Stdio::piped())?;
        let stdout = proc.child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut first = String::new();
            let _ = reader.read_line(&mut first);
            let _ = tx.send(first);
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn cpu(&self) -> f64 {
        cpu_seconds(self.pid()).unwrap_or(0.0)
    }

    pub fn peak_rss(&self) -> f64 {
        peak_rss_mib(self.pid()).unwrap_or(0.0)
    }

    /// The last 15 lines of its log.
    pub fn tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// SIGTERM, then up to `grace` for a clean exit, then SIGKILL. `Ok` only for exit 0.
    pub fn stop(mut self, grace: Duration) -> anyhow::Result<()> {
        signal(self.pid(), "-TERM");
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

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?
        .local_addr()?
        .port())
}

/// The first double-quoted string of `line` (the URL a child prints on its first line).
pub fn quoted(line: &str) -> Option<String> {
    let start = line.find('"')? + 1;
    let end = start + line[start..].find('"')?;
    Some(line[start..end].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_takes_the_first_double_quoted_string() {
        assert_eq!(
            quoted(r#"emulator listening api_base_url="http://127.0.0.1:1/client/v4" x="y""#)
                .as_deref(),
            Some("http://127.0.0.1:1/client/v4")
        );
        assert_eq!(quoted("no quotes"), None);
        assert_eq!(quoted(r#"one " only"#), None);
    }

    #[test]
    fn this_process_has_cpu_seconds_and_a_peak_rss() {
        let pid = std::process::id();
        let busy = (0..2_000_000u64).fold(0u64, |a, b| a.wrapping_add(b * b));
        assert!(busy > 0);
        assert!(cpu_seconds(pid).is_some_and(|c| c >= 0.0));
        assert!(peak_rss_mib(pid).is_some_and(|m| m > 0.5));
        assert_eq!(cpu_seconds(u32::MAX), None);
    }
}
