//! The configuration error and how parse errors are told: one line that names the key (or the
//! line and column), never a value from the file, which may be a secret.

use std::fmt;

/// A configuration error. Its `Display` is one line that names the key (and, for a syntax error,
/// the line and column); it never contains a value from the file, which may be a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read, or a key has the wrong type or is unknown.
    #[error("{0}")]
    Parse(String),
    /// The text is not valid TOML. Only the position and the parser's message are kept: the
    /// offending line may hold the API token.
    #[error("TOML syntax error at line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    /// A value is out of its allowed range or otherwise invalid.
    #[error("`{key}` {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    /// The value of `key` is invalid: `message` says why (and never quotes a secret value).
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }

    /// Lines to print under the error on a terminal: for a syntax error, a gutter with the line
    /// number and a caret under the column, with the line's text left out (it may be a secret).
    pub fn detail(&self) -> Option<String> {
        let ConfigError::Syntax { line, column, .. } = self else {
            return None;
        };
        let gutter = line.to_string().len();
        Some(format!(
            "{:gutter$} |\n{line} | (line not shown: it may hold a secret)\n{:gutter$} | {:>column$}",
            "", "", "^"
        ))
    }
}

/// Messages of I/O errors and of things that are not about a value, folded into one line.
pub(super) fn parse_error(e: impl fmt::Display) -> ConfigError {
    let text = e.to_string();
    ConfigError::Parse(text.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Check the TOML syntax first, so a syntax error is reported by position alone: the `config`
/// crate's message quotes the offending line, which may be `api_token = "…`.
pub(super) fn check_syntax(text: &str) -> Result<(), ConfigError> {
    let Err(e) = toml::from_str::<toml::Table>(text) else {
        return Ok(());
    };
    let offset = e.span().map(|s| s.start).unwrap_or(0).min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    let message = crate::logs::one_line(e.message().trim());
    Err(ConfigError::Syntax {
        line,
        column,
        message,
    })
}

/// A `config` crate error without the value it quotes: the key, what was expected, and the
/// kind of value found (never the value: `signing_secrets = "whsec_…"` must not echo it).
pub(super) fn config_error(e: config::ConfigError) -> ConfigError {
    ConfigError::Parse(describe(&e, None))
}

fn describe(e: &config::ConfigError, outer_key: Option<&str>) -> String {
    let wrong_type = |key: Option<&str>, expected: &str, kind: &str| match key {
        Some(k) => format!(
            "`{}` has the wrong type: expected {expected}, found a {kind}",
            key_path(k)
        ),
        None => format!("wrong type: expected {expected}, found a {kind}"),
    };
    match e {
        config::ConfigError::Type {
            unexpected,
            expected,
            key,
            ..
        } => {
            // `Unexpected` displays as `string "value"` or "64-bit integer `5`": keep the kind.
            let found = unexpected.to_string();
            let kind = found.split(['"', '`']).next().unwrap_or("value").trim();
            wrong_type(key.as_deref().or(outer_key), expected, kind)
        }
        config::ConfigError::At { error, key, .. } => describe(error, key.as_deref().or(outer_key)),
        config::ConfigError::Message(m) => {
            // serde's "invalid type: string \"v\", expected a sequence": keep the kind only.
            if let Some(rest) = m.strip_prefix("invalid type: ")
                && let Some((found, expected)) = rest.split_once(", expected ")
            {
                let kind = found.split(['"', '`']).next().unwrap_or("value").trim();
                return wrong_type(outer_key, &redact_quoted(expected), kind);
            }
            let m = redact_quoted(m);
            match outer_key {
                Some(k) => format!("`{}`: {m}", key_path(k)),
                None => m,
            }
        }
        other => redact_quoted(&other.to_string()),
    }
}

/// `consumers[0]webhook.url` (as the `config` crate writes paths) → `consumers[0].webhook.url`.
fn key_path(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    let mut chars = key.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == ']' && chars.peek().is_some_and(|n| *n != '.' && *n != '[') {
            out.push('.');
        }
    }
    out
}

/// Replace double-quoted parts of a message (where serde and humantime put values) with `"…"`,
/// and fix key paths in backquotes; everything else (field names, expectations) stays.
fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut parts = message.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    for (i, part) in parts.enumerate() {
        if i % 2 == 0 {
            out.push_str("\"…\"");
        } else {
            out.push_str(part);
        }
    }
    let out = out.split_whitespace().collect::<Vec<_>>().join(" ");
    out.split('`')
        .enumerate()
        .map(|(i, p)| {
            if i % 2 == 1 {
                key_path(p)
            } else {
                p.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("`")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_have_their_dots() {
        assert_eq!(
            key_path("consumers[0]webhook.url"),
            "consumers[0].webhook.url"
        );
        assert_eq!(
            key_path("consumers[0].webhook.url"),
            "consumers[0].webhook.url"
        );
        assert_eq!(key_path("a[1][2]b"), "a[1][2].b");
    }
}
