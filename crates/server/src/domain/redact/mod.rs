//! Secret redaction for agent output.
//!
//! What an agent prints is stored and broadcast to every watcher, and neither
//! can be taken back, so secrets are replaced before either happens. Where a
//! pattern has to guess, it errs towards redacting too much.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::{Captures, Regex};

/// What every marker starts with; `[REDACTED:<kind>]` in full.
const MARKER_PREFIX: &str = "[REDACTED:";

/// The key of a `key = value` assignment: any identifier (`DB_PASSWORD`,
/// `x-api-key`, `"clientSecret"`) that ends in the keyword that follows.
const KEY: &str = r"[A-Za-z0-9_.-]*";
/// Between the key and its value: an optional closing quote, then `=`, `:`,
/// `:=` or `=>`, staying on one line.
const SEP: &str = r#"["']?[ \t]*(?::=|=>|[:=])[ \t]*"#;
/// The value of an assignment: quoted, or 8+ characters up to white space.
const VALUE: &str = r#"(?:"(?P<s>[^"\r\n]{8,})"|'(?P<s>[^'\r\n]{8,})'|(?P<s>[^\s"']{8,}))"#;

/// One kind of secret. When the pattern has groups named `s`, only the text
/// they capture is replaced; otherwise the whole match is.
struct Rule {
    kind: &'static str,
    pattern: Cow<'static, str>,
}

fn rule(kind: &'static str, pattern: &'static str) -> Rule {
    Rule {
        kind,
        pattern: Cow::Borrowed(pattern),
    }
}

/// A `key = value` rule whose key ends in one of `keywords`.
fn assignment(kind: &'static str, keywords: &str) -> Rule {
    Rule {
        kind,
        pattern: Cow::Owned(format!("{KEY}(?i-u:{keywords}){SEP}{VALUE}")),
    }
}

/// The rules in priority order: where two match at the same place, the
/// earlier one wins. Rules naming a key come before the bare token formats
/// so that `token=ghp_…` keeps its key.
fn rules() -> Vec<Rule> {
    vec![
        // A whole PEM block; one cut short (output arrives in pieces) from
        // its BEGIN line on, or up to its END line.
        rule(
            "private_key",
            r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----(?s:.)*?-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----",
        ),
        rule(
            "private_key",
            r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----(?:\r?\n[A-Za-z0-9+/=]+)+",
        ),
        rule(
            "private_key",
            r"(?m:^)(?:[A-Za-z0-9+/=]+\r?\n)+-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----",
        ),
        rule(
            "aws_key",
            r#"[A-Za-z0-9_.-]*(?i-u:secret[_-]?access[_-]?key)["']?[ \t]*[:=][ \t]*["']?(?P<s>[A-Za-z0-9/+=]{16,})"#,
        ),
        rule(
            "bearer",
            r#"(?i-u:authorization)["']?[ \t]*[:=][ \t]*["']?(?i-u:bearer)[ \t]+(?P<s>[A-Za-z0-9._~+/-]+=*)"#,
        ),
        rule(
            "basic_auth",
            r#"(?i-u:authorization)["']?[ \t]*[:=][ \t]*["']?(?i-u:basic)[ \t]+(?P<s>[A-Za-z0-9+/]+=*)"#,
        ),
        assignment("password", "passw(?:or)?d|passphrase"),
        assignment("api_key", "api[_-]?key|access[_-]?key"),
        assignment("secret", "secret(?:[_-]?key)?|private[_-]?key"),
        assignment("token", "token"),
        // scheme://user:password@host
        rule(
            "password",
            r#"[A-Za-z][A-Za-z0-9+.-]*://[^\s:@/?#"'<>]*:(?P<s>[^\s@/?#"'<>]+)@"#,
        ),
        rule(
            "jwt",
            r"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*",
        ),
        rule(
            "github_token",
            r"(?-u:\b)(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})",
        ),
        rule(
            "gitlab_token",
            r"(?-u:\b)gl(?:pat|ptt|dt|rt|soat|cbt)-[A-Za-z0-9_-]{20,}",
        ),
        rule(
            "slack_token",
            r"(?-u:\b)(?:xox[abprs]-[A-Za-z0-9-]{10,}|xapp-[0-9]-[A-Za-z0-9-]{10,})",
        ),
        rule("google_api_key", r"(?-u:\b)AIza[A-Za-z0-9_-]{35}"),
        rule(
            "stripe_key",
            r"(?-u:\b)(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{10,}",
        ),
        rule("npm_token", r"(?-u:\b)npm_[A-Za-z0-9]{36,}"),
        rule("taskmesh_token", r"(?-u:\b)tm[a-z]_[0-9a-fA-F]{64,}"),
        rule("aws_key", r"(?-u:\b)(?:AKIA|ASIA)[A-Z0-9]{16}(?-u:\b)"),
        // sk-…, sk-ant-…, sk-proj-…, but not the tail of `task-sk-…`.
        rule(
            "api_key",
            r"(?:^|[^A-Za-z0-9_-])(?P<s>sk-[A-Za-z0-9_-]{20,})",
        ),
        // Outside an Authorization header, only a token long enough not to
        // be a word ("bearer authentication").
        rule(
            "bearer",
            r"(?-u:\b)(?i-u:bearer)[ \t]+(?P<s>[A-Za-z0-9._~+/-]{16,}=*)",
        ),
    ]
}

/// Every rule in one alternation, so clean text is scanned once.
struct Matcher {
    regex: Regex,
    /// Per rule: its kind, the index of the group around it, and the
    /// indices of its `s` groups.
    groups: Vec<(&'static str, usize, Vec<usize>)>,
}

static MATCHER: LazyLock<Matcher> = LazyLock::new(|| {
    let rules = rules();
    let pattern = rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            // Group names must be unique across the alternation.
            let mut parts = r.pattern.split("(?P<s>");
            let mut numbered = parts.next().unwrap_or_default().to_string();
            for (j, part) in parts.enumerate() {
                numbered.push_str(&format!("(?P<s{i}_{j}>{part}"));
            }
            format!("(?P<r{i}>{numbered})")
        })
        .collect::<Vec<_>>()
        .join("|");
    let regex = Regex::new(&pattern).expect("redaction patterns compile");
    let names: Vec<Option<&str>> = regex.capture_names().collect();
    let groups = rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let whole = format!("r{i}");
            let secret = format!("s{i}_");
            let outer = names
                .iter()
                .position(|n| *n == Some(whole.as_str()))
                .expect("every rule has its group");
            let inner = (0..names.len())
                .filter(|&g| names[g].is_some_and(|n| n.starts_with(&secret)))
                .collect();
            (r.kind, outer, inner)
        })
        .collect();
    Matcher { regex, groups }
});

impl Matcher {
    /// The kind and byte range to replace for one match.
    fn secret(&self, caps: &Captures<'_>) -> Option<(&'static str, std::ops::Range<usize>)> {
        let (kind, outer, inner) = self
            .groups
            .iter()
            .find(|(_, outer, _)| caps.get(*outer).is_some())?;
        let span = if inner.is_empty() {
            caps.get(*outer)?.range()
        } else {
            inner.iter().find_map(|&g| caps.get(g))?.range()
        };
        Some((kind, span))
    }
}

/// `text` without NUL bytes and with every secret replaced by
/// `[REDACTED:<kind>]`; borrowed when nothing had to change.
pub fn redact(text: &str) -> Cow<'_, str> {
    let text: Cow<'_, str> = if text.contains('\0') {
        Cow::Owned(text.replace('\0', ""))
    } else {
        Cow::Borrowed(text)
    };
    // A replacement can expose a secret the match before it swallowed the
    // separator of (`Bearer abc=sk-…`): look again until nothing changes,
    // so that redacting is idempotent.
    let Some(mut out) = replace_secrets(&text) else {
        return text;
    };
    for _ in 0..MAX_PASSES {
        match replace_secrets(&out) {
            Some(again) => out = again,
            None => break,
        }
    }
    Cow::Owned(out)
}

/// Passes after the first; one only runs when the last replaced something,
/// and markers are never matched again, so this is a bound, not a cost.
const MAX_PASSES: usize = 8;

static KEY_BEGIN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----").expect("pattern compiles")
});
static KEY_END: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----").expect("pattern compiles")
});

/// [`redact`] for one message of a stream in which a private key may be
/// printed a line (a message) at a time. `in_key` says whether an earlier
/// message opened a key block that has not ended; it is updated. Inside a
/// block everything up to its END line is replaced.
pub fn redact_in_stream<'a>(text: &'a str, in_key: &mut bool) -> Cow<'a, str> {
    let marker = || format!("{MARKER_PREFIX}private_key]");
    if *in_key {
        let Some(end) = KEY_END.find(text) else {
            return Cow::Owned(marker());
        };
        *in_key = false;
        let mut out = marker();
        out.push_str(&redact(&text[end.end()..]));
        return Cow::Owned(out);
    }
    let opened = KEY_BEGIN
        .find_iter(text)
        .last()
        .filter(|begin| KEY_END.find_at(text, begin.end()).is_none());
    let Some(begin) = opened else {
        return redact(text);
    };
    *in_key = true;
    let mut out = redact(&text[..begin.start()]).into_owned();
    out.push_str(&marker());
    Cow::Owned(out)
}

/// The text with its secrets replaced, or `None` when it has none.
fn replace_secrets(text: &str) -> Option<String> {
    let matcher = &*MATCHER;
    if !matcher.regex.is_match(text) {
        return None;
    }
    let mut out: Option<String> = None;
    let mut copied = 0;
    for caps in matcher.regex.captures_iter(text) {
        let Some((kind, span)) = matcher.secret(&caps) else {
            continue;
        };
        // A value that is already a marker stays, which keeps redaction
        // idempotent.
        if text[span.clone()].starts_with(MARKER_PREFIX) {
            continue;
        }
        let out = out.get_or_insert_with(|| String::with_capacity(text.len()));
        out.push_str(&text[copied..span.start]);
        out.push_str(MARKER_PREFIX);
        out.push_str(kind);
        out.push(']');
        copied = span.end;
    }
    let mut out = out?;
    out.push_str(&text[copied..]);
    Some(out)
}

#[cfg(test)]
mod tests;
