//! The binary in a child process: `cfq-relay run` as a [`RelayProcess`] (its output, its
//! signals, its exit, its peak memory and descriptors), and [`bin`] for the one-shot commands.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{http_status, wait_for, wait_until};

/// The test process's own temporary directory.
fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cfq-relay-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The path `name` in the test process's temporary directory.
pub fn temp_path(name: &str) -> PathBuf {
    temp_dir().join(name)
}

/// `text` written to the file `name` of the test process's temporary directory, readable by
/// its owner only (a config holds a token: the relay warns about a file others can read).
pub fn temp_file(name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = temp_dir().join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The `cfq-relay` binary with an environment of its own (see [`own_env`]).
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cfq-relay"));
    own_env(&mut c);
    c
}

/// Nothing of the test's environment (no token, `RUST_LOG`, `CFQ_RELAY_*` or systemd
/// variables), `PATH` kept, colours off.
fn own_env(c: &mut Command) {
    c.env_clear().env("NO_COLOR", "1");
    if let Some(path) = std::env::var_os("PATH") {
        c.env("PATH", path);
    }
}

/// `cfq-relay check-config` of `text` (written to a file named after `name`).
pub fn check_config(name: &str, text: &str) -> Output {
    let path = temp_file(&format!("{name}.toml"), text);
    bin()
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap()
}

/// `cfq-relay run` with its stdout and stderr collected line by line; killed when dropped.
pub struct RelayProcess {
    child: Child,
    config: PathBuf,
    output: Arc<Mutex<Vec<String>>>,
}

/// How to start a [`RelayProcess`]: [`RelayProcess::launch`], then `env`/`nofile`, then `spawn`.
pub struct Launch {
    config: PathBuf,
    env: Vec<(String, String)>,
    nofile: Option<u64>,
}

impl Launch {
    /// One more environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Launch {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Run under this descriptor limit (soft and hard), through `prlimit`.
    pub fn nofile(mut self, n: u64) -> Launch {
        self.nofile = Some(n);
        self
    }

    pub fn spawn(self) -> RelayProcess {
        let mut cmd = match self.nofile {
            Some(n) => {
                // prlimit execs the relay in place: the pid stays the relay's.
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(env!("CARGO_BIN_EXE_cfq-relay"));
                own_env(&mut c);
                c
            }
            None => bin(),
        };
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .envs(self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().unwrap(), output.clone());
        collect(child.stderr.take().unwrap(), output.clone());
        RelayProcess {
            child,
            config: self.config,
            output,
        }
    }
}

impl RelayProcess {
    /// `run` on the config `text`, written to a file named after `name`.
    pub fn launch(name: &str, text: &str) -> Launch {
        Launch {
            config: temp_file(&format!("{name}.toml"), text),
            env: Vec::new(),
            nofile: None,
        }
    }

    /// `run` on the config `text` with nothing else set.
    pub fn spawn(name: &str, text: &str) -> RelayProcess {
        Self::launch(name, text).spawn()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Every output line so far, stdout and stderr as they came.
    pub fn lines(&self) -> Vec<String> {
        self.output.lock().unwrap().clone()
    }

    /// The output so far as one text.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    pub fn logged(&self, needle: &str) -> bool {
        self.output
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }

    /// The first line that `pred` accepts, waiting for it up to 20 s.
    pub async fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        wait_until(Duration::from_secs(20), what, || {
            self.output.lock().unwrap().iter().any(|l| pred(l))
        })
        .await;
        self.lines().into_iter().find(|l| pred(l)).unwrap()
    }

    /// The first line that contains `needle`, waiting for it up to 20 s.
    pub async fn wait_logged(&self, needle: &str) -> String {
        self.wait_line(needle, |l| l.contains(needle)).await
    }

    /// Replace its config file with `text` and send SIGHUP.
    pub fn reload_file(&self, text: &str) {
        std::fs::write(&self.config, text).unwrap();
        self.signal("HUP");
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig}");
    }

    /// The admin address, from the start-up log line (the configs ask for port 0).
    pub async fn admin(&self) -> SocketAddr {
        let line = self
            .wait_line("the admin server log line", |l| {
                l.contains("admin server listening") && l.contains("127.0.0.1:")
            })
            .await;
        let at = line.find("127.0.0.1:").unwrap();
        let addr: String = line[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        addr.parse()
            .unwrap_or_else(|e| panic!("{e}: no address in {line}"))
    }

    /// The admin address once `/readyz` answers 200.
    pub async fn wait_ready(&self) -> SocketAddr {
        let admin = self.admin().await;
        let url = format!("http://{admin}/readyz");
        let what = format!("/readyz 200; output so far:\n{}", self.output());
        wait_for(Duration::from_secs(10), &what, || async {
            http_status(&url).await == 200
        })
        .await;
        admin
    }

    /// Wait (at most `limit`) for the process to end.
    pub async fn exit(&mut self, limit: Duration) -> ExitStatus {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < end,
                "relay still running after {limit:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM; the relay must drain and exit 0 within 30 s. Returns every output line.
    pub async fn terminate(mut self) -> Vec<String> {
        self.signal("TERM");
        let status = self.exit(Duration::from_secs(30)).await;
        // The collectors end with the pipes: wait for the last lines.
        let end = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&self.output) > 1 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(status.success(), "exit {status:?}\n{}", self.output());
        self.lines()
    }

    /// Peak resident memory in KiB (`VmHWM` of `/proc/<pid>/status`).
    pub fn vm_hwm_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Open descriptors.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        // A failed test must not leave its relay behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Collect `stream` line by line into `into` on a thread of its own (which holds a clone of
/// `into` until the stream ends).
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
