//! The first hour with the real binary: the help a new user reads, the mistakes they make
//! (a mistyped log level, two consumers on one queue) and what the start-up log tells them.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::{RelayProcess, bin, temp_file};

const TOKEN: &str = "tok-first-hour-5ecret";

/// A valid file; `EXTRA` is replaced by more TOML at the end.
const BASE: &str = r#"
[cloudflare]
account_id = "0123456789abcdef0123456789abcdef"
api_base_url = "http://127.0.0.1:9/client/v4"
api_token = "TOKEN"

[admin]
listen = "127.0.0.1:0"

[[consumers]]
name = "orders"
queue_id = "0123456789abcdef0123456789abcd01"
batch_size = 50
concurrency = 32
visibility_timeout = "2m"
[consumers.webhook]
url = "https://hooks.example.com:8443/in/path-5ecret?sig=query-5ecret"
EXTRA
"#;

fn base(extra: &str) -> String {
    BASE.replace("TOKEN", TOKEN).replace("EXTRA", extra)
}

fn check(path: &Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = bin();
    cmd.args(["check-config", "--config"]).arg(path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out: Output = cmd.output().unwrap();
    (out.status.code(), String::from_utf8(out.stderr).unwrap())
}

fn help(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn run_help_lists_signals_exit_codes_environment_and_the_example_config() {
    for flag in ["--help", "-h"] {
        let text = help(&["run", flag]);
        for want in [
            "SIGHUP",
            "SIGTERM",
            "SIGINT",
            "Exit status",
            "  0 ",
            "  2 ",
            "130",
            "CLOUDFLARE_API_TOKEN",
            "CFQ_RELAY_CONFIG",
            "CFQ_RELAY__SECTION__KEY",
            "RUST_LOG",
            "config/example.toml",
            "/usr/share/doc/cfq-relay/examples/config.toml",
        ] {
            assert!(text.contains(want), "run {flag}: no {want:?} in\n{text}");
        }
    }
}

#[test]
fn every_subcommand_and_flag_is_described() {
    let top = help(&["--help"]);
    let commands = [
        "run",
        "check-config",
        "healthcheck",
        "emulate",
        "receive",
        "demo",
    ];
    for cmd in commands {
        let line = top
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{cmd} ")))
            .unwrap_or_else(|| panic!("{cmd} not listed in\n{top}"));
        assert!(line.split_whitespace().count() > 3, "{cmd}: no description");
        // `-h`: every option's line carries a description after its name and value.
        let short = help(&[cmd, "-h"]);
        let options = short.split("Options:").nth(1).expect("an Options section");
        for line in options.lines().take_while(|l| !l.trim().is_empty()) {
            let line = line.trim();
            if !line.starts_with('-') {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            let described = words
                .iter()
                .skip(1)
                .any(|w| !w.starts_with('-') && !w.starts_with('<'));
            assert!(described, "{cmd}: option without a description: {line:?}");
        }
    }
}

#[test]
fn a_mistyped_log_level_exits_2_naming_the_key_in_the_file_and_the_environment() {
    let good = temp_file("level-good.toml", &base(""));
    for level in ["warning", "verbose", "inof", "info,cfq_relay=loud"] {
        // In the file ...
        let path = temp_file(
            &format!("level-{level}.toml"),
            &base(&format!("[log]\nlevel = \"{level}\"")),
        );
        let (code, stderr) = check(&path, &[]);
        assert_eq!(code, Some(2), "{level}: {stderr}");
        assert!(
            stderr.starts_with("cfq-relay: configuration error: `log.level` directive"),
            "{level}: {stderr}"
        );
        assert!(stderr.contains("not a known level"), "{stderr}");
        // ... through the environment ...
        let (code, stderr) = check(&good, &[("CFQ_RELAY__LOG__LEVEL", level)]);
        assert_eq!(code, Some(2), "env {level}: {stderr}");
        assert!(stderr.contains("`log.level` directive"), "{stderr}");
        // ... and RUST_LOG, which replaces it.
        let (code, stderr) = check(&good, &[("RUST_LOG", level)]);
        assert_eq!(code, Some(2), "RUST_LOG {level}: {stderr}");
        assert!(stderr.contains("`RUST_LOG` directive"), "{stderr}");
        // `run` refuses to start as well (before logging anything).
        let out = bin()
            .args(["run", "--config"])
            .arg(&good)
            .env("CFQ_RELAY__LOG__LEVEL", level)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "run {level}");
        assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    }
    for level in ["warn", "DEBUG", "info,cfq_relay=debug,hyper=off"] {
        let (code, stderr) = check(&good, &[("CFQ_RELAY__LOG__LEVEL", level)]);
        assert_eq!(code, Some(0), "{level}: {stderr}");
        let (code, stderr) = check(&good, &[("RUST_LOG", level)]);
        assert_eq!(code, Some(0), "RUST_LOG {level}: {stderr}");
    }
    // A blank RUST_LOG counts as unset.
    let (code, stderr) = check(&good, &[("RUST_LOG", "")]);
    assert_eq!(code, Some(0), "blank RUST_LOG: {stderr}");
}

#[test]
fn two_consumers_on_one_queue_exit_2_and_point_to_the_alternatives() {
    let second = r#"
[[consumers]]
name = "audit"
queue_id = "0123456789abcdef0123456789abcd01"
[consumers.webhook]
url = "http://127.0.0.1:9/audit"
"#;
    let path = temp_file("two-on-one.toml", &base(second));
    for cmd in ["check-config", "run"] {
        let out = bin().args([cmd, "--config"]).arg(&path).output().unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(2), "{cmd}: {stderr}");
        assert!(
            stderr.starts_with(
                "cfq-relay: configuration error: `consumers[1].queue_id` is also the queue of consumers[0]: \
                 two consumers of one queue compete for its messages"
            ),
            "{cmd}: {stderr}"
        );
        assert!(stderr.contains("its own queue"), "{stderr}");
        assert!(stderr.contains("raise `concurrency`"), "{stderr}");
        assert!(!stderr.contains("distinct"), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

/// `run` until a line matches `done`; returns the output up to that line. The API answers
/// nothing (port 9), which the relay logs and retries: the start-up lines come first regardless.
async fn startup_output(name: &str, extra: &str, done: impl Fn(&str) -> bool) -> Vec<String> {
    let relay = RelayProcess::spawn(name, &base(extra));
    let line = relay.wait_line("the expected start-up line", &done).await;
    let lines = relay.lines();
    let end = lines.iter().position(|l| *l == line).unwrap();
    lines[..=end].to_vec()
}

#[tokio::test]
async fn start_up_logs_one_short_line_per_consumer_and_the_config_only_at_debug() {
    let lines = startup_output("startup-info", "", |l| l.contains("consumer started")).await;
    let consumer: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("consumer started"))
        .collect();
    assert_eq!(consumer.len(), 1, "{lines:#?}");
    let line = consumer[0];
    for want in [
        "INFO",
        "queue=orders",
        "queue_id=0123456789abcdef0123456789abcd01",
        "webhook=https://hooks.example.com:8443",
        "batch_size=50",
        "concurrency=32",
        "visibility=2m",
    ] {
        assert!(line.contains(want), "{want:?} not in {line}");
    }
    assert!(line.len() < 220, "{} characters: {line}", line.len());
    let all = lines.join("\n");
    assert!(lines.iter().all(|l| l.len() < 300), "a long line:\n{all}");
    assert!(
        !all.contains("Config {"),
        "the config dump is DEBUG only:\n{all}"
    );
    for secret in [TOKEN, "path-5ecret", "query-5ecret"] {
        assert!(!all.contains(secret), "{secret} in\n{all}");
    }

    // At DEBUG: the effective configuration, redacted.
    let lines = startup_output("startup-debug", "[log]\nlevel = \"debug\"", |l| {
        l.contains("effective configuration")
    })
    .await;
    let all = lines.join("\n");
    let dump = lines
        .iter()
        .find(|l| l.contains("effective configuration"))
        .unwrap();
    assert!(
        dump.contains("DEBUG") && dump.contains("Config {"),
        "{dump}"
    );
    assert!(dump.contains("batch_size: 50"), "{dump}");
    // (The dump keeps URL paths, as every other log line does; queries are redacted.)
    for secret in [TOKEN, "query-5ecret"] {
        assert!(!all.contains(secret), "{secret} in\n{all}");
    }
}

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The value of the first `key: value` line in a YAML file (the manifests are plain).
fn yaml_value<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no {key} in the manifest"))
        .trim()
}

#[test]
fn kubernetes_pod_can_read_its_token_and_runs_the_image_the_script_builds() {
    let deployment = repo_file("deploy/kubernetes/deployment.yaml");
    // The image's user (Dockerfile) is the pod's user, and the Secret's files are readable
    // by it: group fsGroup with a group-readable mode (the kubelet chowns them to fsGroup).
    let dockerfile = repo_file("Dockerfile");
    assert!(dockerfile.contains("\nUSER 65532:65532\n"));
    assert_eq!(yaml_value(&deployment, "runAsUser"), "65532");
    assert_eq!(yaml_value(&deployment, "fsGroup"), "65532");
    let mode = u32::from_str_radix(yaml_value(&deployment, "defaultMode"), 8).unwrap();
    assert_eq!(
        mode & 0o040,
        0o040,
        "the group must read the token: {mode:o}"
    );
    assert_eq!(mode & 0o007, 0, "others must not: {mode:o}");
    // The image the manifest runs is the one scripts/image.sh builds and pushes.
    let built = stdout_of(
        Command::new("sh")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/image.sh"))
            .arg("--print")
            .env_remove("IMAGE"),
    );
    assert_eq!(
        built.trim(),
        format!("ghcr.io/cfq-relay/cfq-relay:{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(yaml_value(&deployment, "image"), built.trim());
}

/// The stdout of `cmd`, which must succeed.
fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn parse_version(v: &str) -> (u64, u64) {
    let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[test]
fn rust_version_covers_every_dependency() {
    let declared = parse_version(env!("CARGO_PKG_RUST_VERSION"));
    assert!(declared >= (1, 85), "edition 2024 needs 1.85");
    let out = stdout_of(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["metadata", "--format-version", "1", "--locked", "--offline"])
            .current_dir(env!("CARGO_MANIFEST_DIR")),
    );
    let meta: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut checked = 0;
    for p in meta["packages"].as_array().unwrap() {
        if let Some(v) = p["rust_version"].as_str() {
            checked += 1;
            assert!(
                parse_version(v) <= declared,
                "{} {} needs Rust {v}, Cargo.toml says {}",
                p["name"],
                p["version"],
                env!("CARGO_PKG_RUST_VERSION")
            );
        }
    }
    assert!(
        checked > 50,
        "only {checked} packages declare a rust-version"
    );
}

#[test]
fn readme_says_how_to_build_install_and_develop_without_an_account() {
    let readme = repo_file("README.md");
    for want in [
        "cargo install --path .",
        "target/release/cfq-relay",
        "a C\ncompiler and `make`",
        "on 2 cores",
        &format!(
            "Rust toolchain ({} or newer",
            env!("CARGO_PKG_RUST_VERSION")
        ),
        "scripts/dev-loop.sh",
        "scripts/image.sh",
    ] {
        assert!(readme.contains(want), "README: no {want:?}");
    }
    // The stats call needs the token, in the README and in the script CI runs.
    let stats_call = "curl -s -H 'Authorization: Bearer dev-token' \\\n  http://127.0.0.1:8787/client/v4/_emulator/queues/dev-queue/stats";
    assert!(
        readme.contains(stats_call),
        "README: the stats curl lacks the bearer header"
    );
    let script = repo_file("scripts/dev-loop.sh");
    let stats = script
        .lines()
        .filter(|l| l.contains("/_emulator/queues/$queue/stats") && l.contains("curl -sf"))
        .collect::<Vec<_>>();
    assert!(!stats.is_empty());
    assert!(
        stats
            .iter()
            .all(|l| l.contains("Authorization: Bearer $token")),
        "{stats:?}"
    );
    // The emulator's arguments sit in one place.
    assert_eq!(script.matches("emulate_args=(").count(), 1);
    assert!(script.contains("\"$relay\" emulate \"${emulate_args[@]}\""));
}
