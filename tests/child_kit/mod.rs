//! The relay as a child process (`cfq-relay run`), for tests that need what only a process
//! has: its peak memory (`VmHWM`), its descriptors under a `RLIMIT_NOFILE` set with `prlimit`,
//! its log output, its signals.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::wait_until;

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cfq-relay-child-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cfq-relay"));
    c.env_remove("CLOUDFLARE_API_TOKEN")
        .env_remove("RUST_LOG")
        .env_remove("CFQ_RELAY_CONFIG")
        .env("NO_COLOR", "1");
    c
}

/// `cfq-relay check-config` of `text` (written to a temporary file named after `name`).
pub fn check_config(name: &str, text: &str) -> Output {
    let path = temp_dir().join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    bin()
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap()
}

/// `cfq-relay run` with its stdout and stderr collected line by line; killed when dropped.
pub struct Relay {
    child: Child,
    config: PathBuf,
    output: Arc<Mutex<Vec<String>>>,
}

impl Relay {
    /// Start the relay on `config`; with `nofile`, under that descriptor limit (soft and hard).
    pub fn spawn(name: &str, config: &str, nofile: Option<u64>) -> Relay {
        let path = temp_dir().join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(env!("CARGO_BIN_EXE_cfq-relay"))
                    .env_remove("CLOUDFLARE_API_TOKEN")
                    .env_remove("RUST_LOG")
                    .env("NO_COLOR", "1");
                c
            }
            None => bin(),
        };
        cmd.args(["run", "--config"])
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().unwrap(), output.clone());
        collect(child.stderr.take().unwrap(), output.clone());
        Relay {
            child,
            config: path,
            output,
        }
    }

    /// The process id (prlimit execs the relay in place, so it is the relay's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn config_path(&self) -> &PathBuf {
        &self.config
    }

    pub fn lines(&self) -> Vec<String> {
        self.output.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig}");
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn collect(stream: impl Read + Send + 'static, into: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let text = String::from_utf8_lossy(&line).trim_end().to_owned();
            into.lock().unwrap().push(text);
            line.clear();
        }
    });
}

/// The admin address, from the start-up log line (the configs ask for port 0).
pub async fn admin_addr(relay: &Relay) -> SocketAddr {
    let mut found = None;
    wait_until(Duration::from_secs(20), "the admin server log line", || {
        found = relay
            .lines()
            .iter()
            .find(|l| l.contains("admin server listening"))
            .and_then(|l| {
                let at = l.find("127.0.0.1:")?;
                let addr: String = l[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                    .collect();
                addr.parse().ok()
            });
        found.is_some()
    })
    .await;
    found.unwrap()
}

/// Peak resident memory of process `pid` in KiB (`VmHWM` of `/proc/<pid>/status`).
pub fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Open descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}
