//! The one way the tests write a relay config: [`Cfg`] with its [`ConsumerCfg`]s, as TOML text
//! (for the binary, or to edit) or as a validated [`Config`].

use std::fmt::Write;
use std::path::PathBuf;

use cfq_relay::Config;

use super::{ACCOUNT, TOKEN};

/// A relay config. [`Cfg::new`] is the tests' usual one; [`Cfg::minimal`] has only the
/// required keys (and the admin port 0 the tests need). A setting left `None` is left out of
/// the text, so the relay's default applies.
#[derive(Debug, Clone)]
pub struct Cfg {
    pub api: String,
    pub account: String,
    /// `api_token` (`None`: the token comes from the environment).
    pub token: Option<String>,
    pub api_timeout: Option<&'static str>,
    /// `[admin] listen = "127.0.0.1:0"`.
    pub admin: bool,
    /// The body of `[log]`.
    pub log: Option<String>,
    pub grace: Option<&'static str>,
    pub consumers: Vec<ConsumerCfg>,
}

/// One `[[consumers]]` entry.
#[derive(Debug, Clone)]
pub struct ConsumerCfg {
    pub queue: String,
    pub name: Option<String>,
    pub concurrency: Option<usize>,
    pub visibility: Option<&'static str>,
    pub idle: Option<&'static str>,
    /// More lines of the consumer table.
    pub lines: Vec<String>,
    pub hook: String,
    pub timeout: Option<&'static str>,
    /// More lines of `[consumers.webhook]`.
    pub webhook: Vec<String>,
    /// `[consumers.retry]`: `base_delay` and `max_delay` (each left out when `None`).
    pub retry: (Option<&'static str>, Option<&'static str>),
    /// More tables of the consumer (`[consumers.breaker]` …), written last.
    pub tables: String,
}

impl Cfg {
    /// The tests' usual config: the token inline, the admin server on port 0, a 5 s grace.
    pub fn new(api: &str) -> Cfg {
        Cfg {
            grace: Some("5s"),
            ..Cfg::minimal(api)
        }
    }

    /// Only the required keys, the token inline and the admin server on port 0.
    pub fn minimal(api: &str) -> Cfg {
        Cfg {
            api: api.to_owned(),
            account: ACCOUNT.to_owned(),
            token: Some(TOKEN.to_owned()),
            api_timeout: None,
            admin: true,
            log: None,
            grace: None,
            consumers: Vec::new(),
        }
    }

    pub fn consumer(mut self, c: ConsumerCfg) -> Cfg {
        self.consumers.push(c);
        self
    }

    pub fn grace(mut self, grace: &'static str) -> Cfg {
        self.grace = Some(grace);
        self
    }

    pub fn api_timeout(mut self, timeout: &'static str) -> Cfg {
        self.api_timeout = Some(timeout);
        self
    }

    /// `[log] level = "{level}"`.
    pub fn log_level(mut self, level: &str) -> Cfg {
        self.log = Some(format!("level = \"{level}\""));
        self
    }

    /// The whole body of `[log]`.
    pub fn log(mut self, body: &str) -> Cfg {
        self.log = Some(body.to_owned());
        self
    }

    /// The token from somewhere else than the file (the environment).
    pub fn token(mut self, token: Option<&str>) -> Cfg {
        self.token = token.map(str::to_owned);
        self
    }

    pub fn account(mut self, account: &str) -> Cfg {
        self.account = account.to_owned();
        self
    }

    /// No `[admin]` table (the relay's default address).
    pub fn no_admin(mut self) -> Cfg {
        self.admin = false;
        self
    }

    /// The TOML text.
    pub fn text(&self) -> String {
        let mut t = format!(
            "[cloudflare]\naccount_id = \"{}\"\napi_base_url = \"{}\"\n",
            self.account, self.api
        );
        if let Some(token) = &self.token {
            writeln!(t, "api_token = \"{token}\"").unwrap();
        }
        if let Some(timeout) = self.api_timeout {
            writeln!(t, "api_timeout = \"{timeout}\"").unwrap();
        }
        if self.admin {
            t.push_str("[admin]\nlisten = \"127.0.0.1:0\"\n");
        }
        if let Some(log) = &self.log {
            writeln!(t, "[log]\n{log}").unwrap();
        }
        if let Some(grace) = self.grace {
            writeln!(t, "[shutdown]\ngrace_period = \"{grace}\"").unwrap();
        }
        for c in &self.consumers {
            c.write(&mut t);
        }
        t
    }

    /// The validated config (panics with the text when it is not valid).
    pub fn config(&self) -> Config {
        let text = self.text();
        Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    /// The text written to a fresh file named after `name` (see [`super::temp_file`]).
    pub fn write(&self, name: &str) -> PathBuf {
        super::temp_file(&format!("{name}.toml"), &self.text())
    }
}

impl ConsumerCfg {
    /// The tests' usual consumer: 30 s leases, idle pulls at most 200 ms apart, a 5 s webhook
    /// timeout, retries after 1 s doubling to 10 s.
    pub fn new(queue: &str, hook: &str) -> ConsumerCfg {
        ConsumerCfg {
            visibility: Some("30s"),
            idle: Some("200ms"),
            timeout: Some("5s"),
            retry: (Some("1s"), Some("10s")),
            ..ConsumerCfg::minimal(queue, hook)
        }
    }

    /// Only the required keys.
    pub fn minimal(queue: &str, hook: &str) -> ConsumerCfg {
        ConsumerCfg {
            queue: queue.to_owned(),
            name: None,
            concurrency: None,
            visibility: None,
            idle: None,
            lines: Vec::new(),
            hook: hook.to_owned(),
            timeout: None,
            webhook: Vec::new(),
            retry: (None, None),
            tables: String::new(),
        }
    }

    pub fn name(mut self, name: &str) -> ConsumerCfg {
        self.name = Some(name.to_owned());
        self
    }

    pub fn concurrency(mut self, n: usize) -> ConsumerCfg {
        self.concurrency = Some(n);
        self
    }

    pub fn visibility(mut self, v: &'static str) -> ConsumerCfg {
        self.visibility = Some(v);
        self
    }

    /// `max_idle_backoff`.
    pub fn idle(mut self, v: &'static str) -> ConsumerCfg {
        self.idle = Some(v);
        self
    }

    /// The webhook's `timeout`.
    pub fn timeout(mut self, v: &'static str) -> ConsumerCfg {
        self.timeout = Some(v);
        self
    }

    /// More TOML in the consumer table (`batch_size = 5`, …); empty lines are left out.
    pub fn line(mut self, line: &str) -> ConsumerCfg {
        if !line.is_empty() {
            self.lines.push(line.to_owned());
        }
        self
    }

    /// More TOML in `[consumers.webhook]` (`envelope = true`, …); empty lines are left out.
    pub fn webhook(mut self, line: &str) -> ConsumerCfg {
        if !line.is_empty() {
            self.webhook.push(line.to_owned());
        }
        self
    }

    /// `[consumers.retry]` `base_delay` and `max_delay`.
    pub fn retry(mut self, base: &'static str, max: &'static str) -> ConsumerCfg {
        self.retry = (Some(base), Some(max));
        self
    }

    /// `[consumers.retry]` `base_delay` alone.
    pub fn retry_base(mut self, base: &'static str) -> ConsumerCfg {
        self.retry = (Some(base), None);
        self
    }

    /// One more table of the consumer, e.g. `"[consumers.breaker]\nenabled = false"`.
    pub fn table(mut self, text: &str) -> ConsumerCfg {
        writeln!(self.tables, "{text}").unwrap();
        self
    }

    fn write(&self, t: &mut String) {
        writeln!(t, "[[consumers]]\nqueue_id = \"{}\"", self.queue).unwrap();
        let keys = [
            ("name", self.name.as_ref().map(|n| format!("\"{n}\""))),
            ("concurrency", self.concurrency.map(|n| n.to_string())),
            (
                "visibility_timeout",
                self.visibility.map(|v| format!("\"{v}\"")),
            ),
            ("max_idle_backoff", self.idle.map(|v| format!("\"{v}\""))),
        ];
        for (key, value) in keys {
            if let Some(value) = value {
                writeln!(t, "{key} = {value}").unwrap();
            }
        }
        for line in &self.lines {
            writeln!(t, "{line}").unwrap();
        }
        writeln!(t, "[consumers.webhook]\nurl = \"{}\"", self.hook).unwrap();
        if let Some(timeout) = self.timeout {
            writeln!(t, "timeout = \"{timeout}\"").unwrap();
        }
        for line in &self.webhook {
            writeln!(t, "{line}").unwrap();
        }
        if self.retry != (None, None) {
            t.push_str("[consumers.retry]\n");
            if let Some(base) = self.retry.0 {
                writeln!(t, "base_delay = \"{base}\"").unwrap();
            }
            if let Some(max) = self.retry.1 {
                writeln!(t, "max_delay = \"{max}\"").unwrap();
            }
        }
        t.push_str(&self.tables);
    }
}

/// The usual config ([`Cfg::new`]) with one usual [`ConsumerCfg`] per `(queue, hook, consumer
/// lines, webhook lines)`.
pub fn config(api: &str, consumers: &[(&str, &str, &str, &str)]) -> Config {
    consumers
        .iter()
        .fold(Cfg::new(api), |cfg, (queue, hook, lines, webhook)| {
            cfg.consumer(ConsumerCfg::new(queue, hook).line(lines).webhook(webhook))
        })
        .config()
}

/// The usual config with one usual consumer of `q1` delivering to `hook`; `webhook` is more
/// TOML for its `[consumers.webhook]`.
pub fn one_consumer(api: &str, hook: &str, webhook: &str) -> Config {
    config(api, &[("q1", hook, "", webhook)])
}
