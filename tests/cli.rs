//! The real binary: `check-config` and `run` exit codes and messages, example configs, `demo`.

mod support;

use std::path::Path;
use std::process::Output;

use support::{bin, temp_file};

fn run(args: &[&str], path: &Path) -> Output {
    bin().args(args).arg("--config").arg(path).output().unwrap()
}

const BASE: &str = r#"
[cloudflare]
account_id = "0123456789abcdef0123456789abcdef"
api_token = "tok-123"
[[consumers]]
queue_id = "q1"
BATCH
[consumers.webhook]
url = "http://127.0.0.1:9/hook"
"#;

#[test]
fn example_configs_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            cfq_relay::Config::from_toml(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let out = bin()
                .args(["check-config", "--config"])
                .arg(&path)
                .env("CLOUDFLARE_API_TOKEN", "t")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            seen += 1;
        }
    }
    assert!(seen >= 2, "expected the example configs in config/");
}

#[test]
fn check_config_prints_one_line_summary() {
    let path = temp_file("good.toml", &BASE.replace("BATCH", ""));
    let out = run(&["check-config"], &path);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with("config ok: "), "{stdout}");
    assert!(
        !stdout.contains("tok-123"),
        "the token never shows: {stdout}"
    );
}

#[test]
fn bad_configs_exit_2_naming_the_key() {
    // (file, text replaced in BASE, by what, what stderr must name); the syntax error is a
    // file of its own.
    #[rustfmt::skip]
    let cases = [
        ("batch0.toml", "BATCH", "batch_size = 0", "consumers[0].batch_size"),
        ("batch101.toml", "BATCH", "batch_size = 101", "must be between 1 and 100, got 101"),
        ("vis.toml", "BATCH", "visibility_timeout = \"13h\"", "consumers[0].visibility_timeout"),
        ("unknown.toml", "BATCH", "colour = \"red\"", "colour"),
        ("noaccount.toml", "account_id = \"0123456789abcdef0123456789abcdef\"", "", "cloudflare.account_id"),
        ("url.toml", "http://127.0.0.1:9/hook", "ftp://x/y", "consumers[0].webhook.url"),
        ("notoken.toml", "api_token = \"tok-123\"", "", "no API token"),
        ("tokenfile.toml", "api_token = \"tok-123\"", "api_token_file = \"/nonexistent/token\"", "cloudflare.api_token_file"),
        // Above 0, but one request per 1e300 s is no Duration: `run` panicked building the gate.
        ("rps.toml", "/hook\"", "/hook\"\nmax_requests_per_second = 1e-300", "consumers[0].webhook.max_requests_per_second"),
        ("syntax.toml", "", "", "TOML"),
    ];
    for (name, from, to, want) in cases {
        let text = match name {
            "syntax.toml" => "[cloudflare\n".to_owned(),
            _ => BASE.replace(from, to).replace("BATCH", ""),
        };
        let path = temp_file(name, &text);
        for cmd in ["check-config", "run"] {
            let stderr = exits_2_saying(cmd, &path, name, want);
            let lines: Vec<&str> = stderr.trim_end().lines().collect();
            if name == "syntax.toml" {
                // One message line, then a gutter with a caret under the column, the line's
                // text left out (it may hold a secret).
                assert_eq!(lines.len(), 4, "message and caret: {stderr:?}");
                assert!(lines[0].contains("line 1, column 12"), "{stderr:?}");
                assert_eq!(lines[3].find('^'), Some("1 | ".len() + 11), "{stderr:?}");
            } else {
                assert_eq!(lines.len(), 1, "one line: {stderr:?}");
            }
            assert!(!stderr.contains("backtrace"), "{stderr}");
            assert!(!stderr.contains("tok-123"), "{stderr}");
        }
    }
}

/// Run `cmd` on the config at `path` (case `name`): it must exit 2 with `want` in its stderr,
/// which is returned.
fn exits_2_saying(cmd: &str, path: &Path, name: &str, want: &str) -> String {
    let out = run(&[cmd], path);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{cmd} {name}: {stderr}");
    assert!(
        stderr.contains(want),
        "{cmd} {name}: want {want:?} in {stderr:?}"
    );
    stderr
}

/// The TLS files a webhook names are checked as every other value: `check-config` catches
/// them and `run` exits 2 naming the key (before, `check-config` said "config ok" and `run`
/// failed at start with exit 1).
#[test]
fn bad_tls_files_exit_2_naming_the_key() {
    let garbage = temp_file("tls-garbage.pem", "not a certificate\n");
    let garbage = garbage.display();
    let cases = [
        (
            "ca-missing.toml",
            "ca_file = \"/nonexistent/ca.pem\"".to_owned(),
            "consumers[0].webhook.ca_file",
        ),
        (
            "ca-garbage.toml",
            format!("ca_file = \"{garbage}\""),
            "consumers[0].webhook.ca_file",
        ),
        (
            "cert-garbage.toml",
            format!("client_cert_file = \"{garbage}\"\nclient_key_file = \"{garbage}\""),
            "consumers[0].webhook.client_cert_file",
        ),
    ];
    for (name, line, want) in cases {
        let text = BASE
            .replace("BATCH", "")
            .replace("/hook\"", &format!("/hook\"\n{line}"));
        let path = temp_file(name, &text);
        for cmd in ["check-config", "run"] {
            let stderr = exits_2_saying(cmd, &path, name, want);
            assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
        }
    }
}

/// `healthcheck` asks a running relay where the file and the environment say it listens; a
/// file since edited into something that does not parse does not move the running relay, and
/// the container image gives the address in the environment. Before, the probe failed
/// (exit 1, "configuration error") while the relay answered 200: an unhealthy container, and
/// under an orchestrator that replaces those, a replacement that cannot start.
#[test]
fn healthcheck_finds_the_relay_when_the_file_no_longer_parses() {
    use std::io::{Read, Write};
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = admin.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in admin.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n",
            );
        }
    });
    let broken = temp_file("health-broken.toml", "[cloudflare\n");
    let out = bin()
        .args(["healthcheck", "--timeout", "5s", "--config"])
        .arg(&broken)
        .env("CFQ_RELAY__ADMIN__LISTEN", addr.to_string())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // No relay at all: still exit 1.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = bin()
        .args(["healthcheck", "--timeout", "2s", "--config"])
        .arg(&broken)
        .env("CFQ_RELAY__ADMIN__LISTEN", closed.to_string())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn missing_config_file_exits_2() {
    let out = run(&["check-config"], Path::new("/nonexistent/cfq.toml"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cfq.toml"));
}

/// `demo --messages 200` with `more` arguments: it succeeds and its last line (returned) says
/// every message arrived byte-exact, once, and was acked.
fn demo(more: &[&str]) -> String {
    let out = bin()
        .args(["demo", "--messages", "200"])
        .args(more)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap().to_owned();
    assert!(
        last.contains("600 published, 600 delivered byte-exact and acked"),
        "{last}"
    );
    assert!(
        last.contains("0 corrupted, 0 duplicates, 0 leases expired"),
        "{last}"
    );
    last
}

#[test]
fn demo_ends_with_every_message_acked() {
    demo(&[]);
}

#[test]
fn every_commented_key_in_the_example_is_a_real_key() {
    // Uncomment every `# key = value` line and `# [table]` header: with unknown keys being
    // errors, a typo or a stale key in the documentation fails here.
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml"))
        .unwrap();
    let is_key = |l: &str| {
        let l = l.trim_start_matches("# ");
        l.starts_with('[')
            || l.split_once(" = ").is_some_and(|(k, _)| {
                !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            })
    };
    let mut uncommented = 0;
    let full: String = text
        .lines()
        .map(|l| {
            if l.starts_with("# ") && is_key(l) {
                uncommented += 1;
                l.trim_start_matches("# ")
                    .replace("whsec_...", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(uncommented > 30, "found only {uncommented} documented keys");
    if let Err(e) = cfq_relay::Config::from_toml(&full) {
        panic!("{e}\n{full}");
    }
}

#[test]
fn demo_batch_sends_fewer_requests_than_messages() {
    let last = demo(&["--batch", "20"]);
    // Every 20th first delivery is listed as failed and retried alone.
    let requests: u64 = last
        .rsplit(", ")
        .next()
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no request count in {last}"));
    assert!(
        requests < 100,
        "{requests} requests for 600+ messages: {last}"
    );
}
