//! The config's tests through whole files: defaults, each bad value naming its key, secrets kept
//! out of errors and `Debug`, token precedence, environment overrides.

use std::path::Path;
use std::time::Duration;

use super::*;

const GOOD: &str = r#"
[cloudflare]
account_id = "0123456789abcdef0123456789abcdef"
api_token = "secret-token-value"

[[consumers]]
queue_id = "q1"
[consumers.webhook]
url = "http://127.0.0.1:8080/hook"
"#;

fn with(extra_cloudflare: &str, consumer: &str) -> String {
    format!(
        "[cloudflare]\naccount_id = \"abc\"\napi_token = \"t\"\n{extra_cloudflare}\n[[consumers]]\nqueue_id = \"q1\"\n{consumer}\n[consumers.webhook]\nurl = \"http://127.0.0.1/h\"\n"
    )
}

#[test]
fn defaults_apply() {
    let c = Config::from_toml(GOOD).unwrap();
    let q = &c.consumers[0];
    assert_eq!(q.batch_size, 100);
    assert_eq!(q.visibility_timeout, Duration::from_secs(60));
    assert_eq!(q.concurrency, 1000);
    assert_eq!(q.concurrency_mode, ConcurrencyMode::Adaptive);
    assert_eq!(q.webhook.timeout, Duration::from_secs(10));
    assert_eq!(q.retry.base_delay, Duration::from_secs(5));
    assert_eq!(q.retry.max_delay, Duration::from_secs(3600));
    assert_eq!(c.admin.listen, "127.0.0.1:9464".parse().unwrap());
    assert_eq!(c.shutdown.grace_period, Duration::from_secs(25));
    assert_eq!(
        &*c.cloudflare.api_base_url,
        "https://api.cloudflare.com/client/v4"
    );
    assert_eq!(q.label(), "q1");
}

fn err_of(text: &str) -> String {
    Config::from_toml(text).unwrap_err().to_string()
}

#[test]
fn each_bad_value_names_its_key() {
    let cases: &[(String, &str)] = &[
        (
            GOOD.replace("account_id = \"0123456789abcdef0123456789abcdef\"", ""),
            "`cloudflare.account_id` is required",
        ),
        (
            with("", "batch_size = 0"),
            "`consumers[0].batch_size` must be between 1 and 100, got 0",
        ),
        (
            with("", "batch_size = 101"),
            "`consumers[0].batch_size` must be between 1 and 100, got 101",
        ),
        (
            with("", "visibility_timeout = \"13h\""),
            "`consumers[0].visibility_timeout` must be between 1s and 12h, got 13h",
        ),
        (
            with("", "concurrency = 0"),
            "`consumers[0].concurrency` must be between 1 and 10000",
        ),
        (
            format!(
                "{}timeout = \"10s\"\n",
                with("", "visibility_timeout = \"10s\"")
            ),
            "`consumers[0].webhook.timeout` must be shorter than visibility_timeout (10s), got 10s",
        ),
        (
            format!(
                "{}timeout = \"10s\"\n",
                with("", "visibility_timeout = \"11s\"")
            ),
            "`consumers[0].webhook.timeout` must leave room for the pull and the ack within visibility_timeout (11s): at most 8s 800ms, got 10s",
        ),
        (
            with("", "").replace("http://127.0.0.1/h", "ftp://example.com/x"),
            "`consumers[0].webhook.url` must be an http or https URL, got scheme \"ftp\"",
        ),
        (
            with("", "").replace("http://127.0.0.1/h", "not a url"),
            "`consumers[0].webhook.url` is not a valid URL",
        ),
        (
            with("api_base_url = \"file:///x\"", ""),
            "`cloudflare.api_base_url` must be an http or https URL",
        ),
        (
            with("", "").replace("url = \"http://127.0.0.1/h\"", ""),
            "`consumers[0].webhook.url` is required",
        ),
        (
            format!("{}\n[consumers.retry]\nmax_delay = \"13h\"\n", with("", "")),
            "`consumers[0].retry.max_delay` must be between 0s and 12h, got 13h",
        ),
        (
            format!("{}\n[consumers.retry]\nbase_delay = \"2h\"\n", with("", "")),
            "`consumers[0].retry.base_delay` must be between 0s and retry.max_delay (1h), got 2h",
        ),
        (
            with("", "").replace("api_token = \"t\"", "api_token = \"  \""),
            "`cloudflare.api_token` is empty",
        ),
        (
            format!("{}\n[shutdown]\ngrace_period = \"60s\"\n", with("", "")),
            "`shutdown.grace_period` must be shorter than the visibility_timeout of consumers[0] (1m), got 1m",
        ),
        (
            "[cloudflare]\naccount_id = \"abc\"\n".to_string(),
            "`consumers` needs at least one [[consumers]] entry",
        ),
        (
            format!(
                "{}\n[consumers.webhook.headers]\n\"bad name\" = \"x\"\n",
                with("", "")
            )
            .replace(
                "[consumers.webhook]\nurl = \"http://127.0.0.1/h\"\n\n[consumers.webhook.headers]",
                "[consumers.webhook]\nurl = \"http://127.0.0.1/h\"\n[consumers.webhook.headers]",
            ),
            "`consumers[0].webhook.headers` has an invalid header name",
        ),
        (
            format!("{}drop_statuses = [200]\n", with("", "")),
            "`consumers[0].webhook.drop_statuses` 200 already counts as delivered",
        ),
        (
            format!("{}success_statuses = [700]\n", with("", "")),
            "`consumers[0].webhook.success_statuses` must hold HTTP statuses between 100 and 599, got 700",
        ),
        (
            with("", "name = \"a b\""),
            "`consumers[0].name` must be 1 to 64 characters",
        ),
        (
            with("", "").replace("http://127.0.0.1/h", "http://user:pw@127.0.0.1/h"),
            "`consumers[0].webhook.url` must not contain a user name or password: use [consumers.webhook.basic_auth]",
        ),
        (
            with("", "").replace("http://127.0.0.1/h", "http://user@127.0.0.1/h"),
            "`consumers[0].webhook.url` must not contain a user name or password",
        ),
        (
            with("", "max_pulls_in_flight = 0"),
            "`consumers[0].max_pulls_in_flight` must be between 1 and 32",
        ),
        (
            format!("{}\n[log]\nlevel = \"loud=?=\"\n", with("", "")),
            "`log.level` directive 1 is not a known level",
        ),
    ];
    for (text, want) in cases {
        let got = err_of(text);
        assert!(
            got.contains(want),
            "config:\n{text}\nwant error containing {want:?}\ngot {got:?}"
        );
        assert!(!got.contains('\n'), "error must be one line: {got:?}");
    }
}

#[test]
fn unknown_keys_are_errors() {
    let got = err_of(&format!("{}\nbogus = 1\n", GOOD));
    assert!(got.contains("bogus"), "{got}");
    let got = err_of(&with("", "batchsize = 5"));
    assert!(got.contains("batchsize"), "{got}");
    let got = err_of(&GOOD.replace("[cloudflare]", "[cloudflare]\ntypo_key = 1"));
    assert!(got.contains("typo_key"), "{got}");
}

#[test]
fn wrong_types_name_the_key() {
    let got = err_of(&with("", "batch_size = \"many\""));
    assert!(got.contains("batch_size"), "{got}");
    let got = err_of(&with("", "visibility_timeout = \"forever\""));
    assert!(got.contains("visibility_timeout"), "{got}");
}

/// Every key that holds a secret, each with a syntax error and a type error: the error
/// names the key (or the line and column) and never contains the value.
#[test]
fn no_error_prints_a_secret_value() {
    const SECRET: &str = "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=";
    let base = |cloudflare: &str, webhook: &str| {
        format!(
            "[cloudflare]\naccount_id = \"abc\"\n{cloudflare}\n[[consumers]]\nqueue_id = \"q1\"\n[consumers.webhook]\nurl = \"http://127.0.0.1/h\"\n{webhook}\n"
        )
    };
    let cases: Vec<(String, &str)> = vec![
        // Syntax errors: an unterminated string, a missing `=`, a bad escape.
        (base(&format!("api_token = \"{SECRET}"), ""), "line 3"),
        (base(&format!("api_token {SECRET}"), ""), "line 3"),
        (base(&format!("api_token = \"{SECRET}\\q\""), ""), "line 3"),
        (
            base(
                "api_token = \"t\"",
                &format!("signing_secrets = [\"{SECRET}\""),
            ),
            "line",
        ),
        (
            base("api_token = \"t\"", &format!("bearer_token = \"{SECRET}")),
            "line 8",
        ),
        (
            base(
                "api_token = \"t\"",
                &format!("[consumers.webhook.basic_auth]\nusername = \"u\"\npassword = {SECRET}"),
            ),
            "line 10",
        ),
        (
            base(
                "api_token = \"t\"",
                &format!("headers = {{ Authorization = \"{SECRET} }}"),
            ),
            "line 8",
        ),
        // Type errors: a string where a list or a table is expected, and the reverse.
        (
            base(&format!("api_token = [\"{SECRET}\"]"), ""),
            "`cloudflare.api_token`",
        ),
        (
            base(
                "api_token = \"t\"",
                &format!("signing_secrets = \"{SECRET}\""),
            ),
            "`consumers[0].webhook.signing_secrets` has the wrong type",
        ),
        (
            base(
                "api_token = \"t\"",
                &format!("bearer_token = [\"{SECRET}\"]"),
            ),
            "`consumers[0].webhook.bearer_token`",
        ),
        (
            base(
                "api_token = \"t\"",
                &format!(
                    "[consumers.webhook.basic_auth]\nusername = \"u\"\npassword = [\"{SECRET}\"]"
                ),
            ),
            "`consumers[0].webhook.basic_auth.password`",
        ),
        (
            base("api_token = \"t\"", &format!("headers = \"{SECRET}\"")),
            "`consumers[0].webhook.headers`",
        ),
        (
            base("api_token = \"t\"", &format!("basic_auth = \"{SECRET}\"")),
            "`consumers[0].webhook.basic_auth`",
        ),
        // Bad values.
        (
            base(
                "api_token = \"t\"",
                &format!("signing_secrets = [\"{SECRET}!\"]"),
            ),
            "`consumers[0].webhook.signing_secrets[0]`",
        ),
        (
            base(
                "api_token = \"t\"",
                &format!("headers = {{ Authorization = \"{SECRET}\\n\" }}"),
            ),
            "`consumers[0].webhook.headers.Authorization`",
        ),
        (
            base("api_token = \"t\"", "").replace(
                "http://127.0.0.1/h",
                &format!("http://u:{SECRET}@127.0.0.1/h"),
            ),
            "`consumers[0].webhook.url`",
        ),
        (
            base("api_token = \"t\"", "")
                .replace("http://127.0.0.1/h", &format!("http://[{SECRET}]/h")),
            "`consumers[0].webhook.url`",
        ),
    ];
    let secret_part = &SECRET[6..20];
    for (text, want) in &cases {
        let e = Config::from_toml(text).unwrap_err();
        let got = e.to_string();
        let detail = e.detail().unwrap_or_default();
        assert!(
            got.contains(want),
            "config:\n{text}\nwant {want:?}, got {got:?}"
        );
        assert!(
            !got.contains(secret_part) && !detail.contains(secret_part),
            "the secret leaked:\n{got}\n{detail}"
        );
        assert!(!got.contains('\n'), "one line: {got:?}");
    }
}

#[test]
fn syntax_errors_give_line_and_column_with_an_aligned_caret() {
    let text = "[cloudflare]\naccount_id = \"abc\"\napi_token = \"tok\n";
    let e = Config::from_toml(text).unwrap_err();
    let ConfigError::Syntax { line, column, .. } = &e else {
        panic!("not a syntax error: {e}");
    };
    assert_eq!(*line, 3);
    assert!(*column > 12, "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("TOML syntax error at line 3, column {column}: ")),
        "{e}"
    );
    let detail = e.detail().unwrap();
    let caret = detail.lines().last().unwrap();
    // The caret sits under column `column` of the line, after the `3 | ` gutter.
    assert_eq!(caret.find('^'), Some("3 | ".len() + column - 1), "{detail}");
    assert!(!detail.contains("tok"), "{detail}");
}

#[test]
fn wrong_type_errors_name_the_whole_key_path() {
    let got = err_of(&with("", "batch_size = \"many\""));
    assert!(got.contains("`consumers[0].batch_size`"), "{got}");
    assert!(!got.contains("many"), "{got}");
}

#[test]
fn a_short_lease_alone_is_valid_and_the_grace_fits_it() {
    let c = Config::from_toml(&with("", "visibility_timeout = \"5s\"")).unwrap();
    assert!(c.shutdown.grace_period < Duration::from_secs(5));
    assert_eq!(c.consumers[0].webhook.timeout, Duration::from_secs(4));
    assert_eq!(c.shutdown.grace_period, Duration::from_millis(2500));
    let c = Config::from_toml(GOOD).unwrap();
    assert_eq!(c.shutdown.grace_period, Duration::from_secs(25));
    // Two consumers: each timeout fits its own lease, the grace fits the shortest.
    let two = format!(
        "{GOOD}[[consumers]]\nqueue_id = \"q2\"\nvisibility_timeout = \"3s\"\n[consumers.webhook]\nurl = \"http://127.0.0.1/2\"\n"
    );
    let c = Config::from_toml(&two).unwrap();
    assert_eq!(c.consumers[0].webhook.timeout, Duration::from_secs(10));
    assert_eq!(c.consumers[1].webhook.timeout, Duration::from_millis(2400));
    assert_eq!(c.shutdown.grace_period, Duration::from_millis(1500));
    // Set explicitly, it is still validated.
    let got = err_of(&format!(
        "{}\n[shutdown]\ngrace_period = \"6s\"\n",
        with("", "visibility_timeout = \"5s\"")
    ));
    assert!(
        got.contains("`shutdown.grace_period` must be shorter"),
        "{got}"
    );
}

#[test]
fn secrets_readable_by_others_are_found() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("cfq-relay-perms-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    let config_path = dir.join("config.toml");
    std::fs::write(&token, "t").unwrap();
    std::fs::write(&config_path, GOOD).unwrap();
    let mut c = Config::from_toml(GOOD).unwrap();
    c.cloudflare.api_token_file = Some(token.clone());
    let set = |p: &Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    set(&token, 0o644);
    set(&config_path, 0o644);
    let keys: Vec<String> = c
        .readable_by_others(&config_path)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["the config file", "cloudflare.api_token_file"]);
    set(&token, 0o600);
    set(&config_path, 0o640);
    assert!(c.readable_by_others(&config_path).is_empty());
    // A config without an inline secret may be world-readable.
    set(&config_path, 0o644);
    c.cloudflare.api_token = None;
    assert!(c.readable_by_others(&config_path).is_empty());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_breaker_is_on_by_default() {
    let c = Config::from_toml(GOOD).unwrap();
    assert!(c.consumers[0].breaker.enabled);
    let off = format!("{}\n[consumers.breaker]\nenabled = false\n", with("", ""));
    assert!(
        !Config::from_toml(&off).unwrap().consumers[0]
            .breaker
            .enabled
    );
}

#[test]
fn debug_and_summary_hide_secrets() {
    assert_eq!(
        redact_url("https://user:pw@example.com/hook?sig=abc"),
        "https://example.com/hook?REDACTED"
    );
    let mut text = GOOD.replace(
        "http://127.0.0.1:8080/hook",
        "https://example.com/hook?sig=abc",
    );
    text.push_str("[consumers.webhook.headers]\nAuthorization = \"Bearer hunter2\"\n");
    let c = Config::from_toml(&text).unwrap();
    let debug = format!("{c:?}");
    for secret in ["secret-token-value", "pw@", "sig=abc", "hunter2"] {
        assert!(!debug.contains(secret), "{debug}");
    }
    let summary = c.summary();
    for secret in ["secret-token-value", "pw@", "sig=abc", "hunter2"] {
        assert!(!summary.contains(secret), "{summary}");
    }
    assert!(summary.starts_with("config ok: account 0123456789abcdef0123456789abcdef"));
}

#[test]
fn two_consumers_of_one_queue_are_refused() {
    let two = |a: &str, b: &str| {
        format!(
            "{GOOD}\n[[consumers]]\n{a}\n[consumers.webhook]\nurl = \"http://127.0.0.1/b\"\n\n[[consumers]]\n{b}\n[consumers.webhook]\nurl = \"http://127.0.0.1/c\"\n"
        )
    };
    // Distinct names do not help: they would still split the queue's messages.
    let e = err_of(&two(
        "name = \"b\"\nqueue_id = \"shared\"",
        "name = \"c\"\nqueue_id = \"SHARED\"",
    ));
    assert!(
        e.starts_with("`consumers[2].queue_id` is also the queue of consumers[1]: "),
        "{e}"
    );
    assert!(e.contains("compete for its messages"), "{e}");
    assert!(e.contains("its own queue"), "{e}");
    assert!(e.contains("raise `concurrency`"), "{e}");
    assert!(!e.contains("shared") && !e.contains("SHARED"), "{e}");
    // Nor does leaving the names out.
    let e = err_of(&two("queue_id = \"q9\"", "queue_id = \"q9\""));
    assert!(
        e.starts_with("`consumers[2].queue_id` is also the queue"),
        "{e}"
    );
    // Same name, different queues: the name is the problem, and no talk of distinct names
    // for one queue.
    let e = err_of(&two(
        "name = \"x\"\nqueue_id = \"q8\"",
        "name = \"x\"\nqueue_id = \"q9\"",
    ));
    assert!(
        e.starts_with("`consumers[2].name` is also the name of consumers[1]: "),
        "{e}"
    );
    // Distinct queues, distinct names: fine.
    Config::from_toml(&two("queue_id = \"q8\"", "queue_id = \"q9\"")).unwrap();
}

/// The filter's own cases are in `daemon`; here, through the whole config.
#[test]
fn log_levels_must_be_real_levels() {
    let e = err_of(&format!("{}\n[log]\nlevel = \"warning\"\n", with("", "")));
    assert!(
        e.starts_with("`log.level` directive 1 is not a known level"),
        "{e}"
    );
}

/// Setting variables in this process would race the other tests (and is `unsafe` in edition
/// 2024), so a test of the environment re-runs itself in a child process with `vars` set.
/// `true` in the child: the caller then checks the config; in the parent this asserts the child
/// ran that one test and it passed.
fn in_child_with_env(test: &str, vars: &[(&str, &str)]) -> bool {
    if std::env::var("CFQ_RELAY_ENV_CHILD").is_ok() {
        return true;
    }
    let exe = std::env::current_exe().unwrap();
    let status = std::process::Command::new(exe)
        .args(["--exact", &format!("config::tests::{test}"), "--nocapture"])
        .env("CFQ_RELAY_ENV_CHILD", "1")
        .envs(vars.iter().copied())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{out}");
    assert!(out.contains("1 passed"), "the child ran no test: {out}");
    false
}

#[test]
fn environment_overrides_keys() {
    let vars = [
        ("CFQ_RELAY__CLOUDFLARE__ACCOUNT_ID", "fromenv"),
        ("CFQ_RELAY__LOG__LEVEL", "debug"),
        ("CFQ_RELAY__ADMIN__LISTEN", "127.0.0.1:9999"),
    ];
    if in_child_with_env("environment_overrides_keys", &vars) {
        let c = Config::from_toml_with_env(GOOD).unwrap();
        assert_eq!(c.cloudflare.account_id, "fromenv");
        assert_eq!(c.log.level, "debug");
        assert_eq!(c.admin.listen, "127.0.0.1:9999".parse().unwrap());
    }
}

/// An override is the text of its variable, as the file's string would be: with the
/// variables parsed as numbers, an all-digit account id became a float (`0123…` turned into
/// `1234567890123456800000000000000`) and a numeric token lost its leading zeros, both passing
/// validation.
#[test]
fn environment_overrides_keep_the_text_as_written() {
    let account = "01234567890123456789012345678901";
    let vars = [
        ("CFQ_RELAY__CLOUDFLARE__ACCOUNT_ID", account),
        ("CFQ_RELAY__CLOUDFLARE__API_TOKEN", "00420"),
        ("CFQ_RELAY__SHUTDOWN__GRACE_PERIOD", "3s"),
    ];
    if in_child_with_env("environment_overrides_keep_the_text_as_written", &vars) {
        let c = Config::from_toml_with_env(GOOD).unwrap();
        assert_eq!(c.cloudflare.account_id, account);
        assert_eq!(c.cloudflare.api_token.as_ref().unwrap().expose(), "00420");
        assert_eq!(c.shutdown.grace_period, Duration::from_secs(3));
    }
}

/// Sections left out, or written empty, are their `Default`: the defaults live in one place
/// (the `#[educe(Default = …)]` beside each field) and serde reads them from there.
#[test]
fn sections_left_out_are_their_defaults() {
    let c = Config::from_toml(GOOD).unwrap();
    let q = &c.consumers[0];
    assert_eq!(c.admin, AdminConfig::default());
    assert_eq!(c.log, LogConfig::default());
    assert_eq!(q.retry, RetryConfig::default());
    assert_eq!(q.breaker, BreakerConfig::default());
    assert_eq!(q.concurrency_mode, ConcurrencyMode::default());
    // The same values the docs and example.toml state.
    assert_eq!(c.log.level, "info");
    assert_eq!(q.breaker.consecutive_failures, 10);
    assert_eq!(q.breaker.window, Duration::from_secs(30));
    assert_eq!(q.max_idle_backoff, Duration::from_secs(2));
    assert_eq!(q.max_pulls_in_flight, 4);
    // A table that is present but empty takes every default too.
    let text = format!(
        "{}\n[consumers.webhook.batch]\n\n[consumers.retry]\n\n[consumers.breaker]\n",
        with("", "")
    );
    let c = Config::from_toml(&text).unwrap();
    let q = &c.consumers[0];
    assert_eq!(q.webhook.batch, Some(BatchConfig::default()));
    assert_eq!(BatchConfig::default().max_messages, 50);
    assert_eq!(q.retry, RetryConfig::default());
    assert_eq!(q.breaker, BreakerConfig::default());
}

/// Every secret key, inline: `Debug` of the whole config shows none of them (each is redacted
/// by its type: `Secret`, `RedactedUrl`, `ExtraHeaders`).
#[test]
fn debug_redacts_every_secret_by_its_type() {
    let text = "[cloudflare]\naccount_id = \"abc\"\napi_token = \"tok-1111\"\n\
         api_base_url = \"https://u:pw-2222@api.example/v4?k=q-3333\"\n\
         [[consumers]]\nqueue_id = \"q1\"\n[consumers.webhook]\n\
         url = \"https://u:pw-4444@hook.example/h?sig=s-5555\"\n\
         signing_secrets = [\"whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=\"]\n\
         bearer_token = \"bt-6666\"\nheaders = { X-Key = \"hv-7777\" }\n\
         [consumers.webhook.basic_auth]\nusername = \"user\"\npassword = \"pw-8888\"\n";
    // Parsed without validation: the URL credentials and bearer + basic are refused later.
    let c: Config = layers(text, false).unwrap().try_deserialize().unwrap();
    let debug = format!("{c:?}");
    for secret in [
        "tok-1111", "pw-2222", "q-3333", "pw-4444", "s-5555", "c2VjcmV0", "bt-6666", "hv-7777",
        "pw-8888",
    ] {
        assert!(!debug.contains(secret), "{secret} in {debug}");
    }
    for shown in [
        "api.example",
        "hook.example",
        "X-Key",
        "\"user\"",
        "[REDACTED]",
    ] {
        assert!(debug.contains(shown), "{shown} not in {debug}");
    }
}

/// The webhook's secret files (through their `SecretSource`s) and certificates: what the
/// permission check warns about and what a reload fingerprints.
#[test]
fn webhook_secret_files_are_found_by_their_sources() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("cfq-relay-wfiles-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = |name: &str| {
        let p = dir.join(name);
        std::fs::write(&p, "x").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p.display().to_string()
    };
    let (signing, bearer, password, ca, cert, key) = (
        path("signing"),
        path("bearer"),
        path("password"),
        path("ca"),
        path("cert"),
        path("key"),
    );
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, "").unwrap();
    std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = format!(
        "[cloudflare]\naccount_id = \"abc\"\n[[consumers]]\nqueue_id = \"q1\"\n\
         [consumers.webhook]\nurl = \"http://127.0.0.1/h\"\n\
         signing_secret_file = \"{signing}\"\nbearer_token_file = \"{bearer}\"\n\
         ca_file = \"{ca}\"\nclient_cert_file = \"{cert}\"\nclient_key_file = \"{key}\"\n\
         [consumers.webhook.basic_auth]\nusername = \"u\"\npassword_file = \"{password}\"\n"
    );
    let c = Config::from_toml(&text).unwrap();
    let found = c.readable_by_others(&config_path);
    let keys: Vec<&str> = found.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "consumers[0].webhook.signing_secret_file",
            "consumers[0].webhook.bearer_token_file",
            "consumers[0].webhook.basic_auth.password_file",
            "consumers[0].webhook.client_key_file",
        ],
        "no inline secret, so not the config file; the certificates are not secrets"
    );
    assert_eq!(found[3].1, Path::new(&key));
    let mut files: Vec<String> = c.consumers[0]
        .webhook
        .files()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    let mut want = vec![signing, bearer, password, ca, cert, key];
    want.sort();
    assert_eq!(files, want);
    std::fs::remove_dir_all(&dir).ok();
}
