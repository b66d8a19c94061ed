//! Checks on what clients send: ids, names, sizes. Each failure names the
//! field and quotes at most [`MAX_QUOTE`] bytes of what was sent.
//!
//! One text rule for both databases: free text has NUL bytes stripped
//! ([`text`]) before it reaches SQL (PostgreSQL refuses them, SQLite would
//! keep them), and identifiers with control characters are refused
//! ([`identifier`]).

use super::{Result, invalid};
use crate::model::{CompletionAction, Task};

/// Limits on what clients may send.
pub const MAX_PLAN_BYTES: usize = 1 << 20;
/// What one answer may carry (estimated), under the 4 MiB gRPC clients
/// accept by default.
pub const RESPONSE_BUDGET_BYTES: usize = 3 << 20;
/// Most bytes of a client's input an error message repeats.
pub const MAX_QUOTE: usize = 128;

pub const MAX_NAME_CHARS: usize = 256;

pub const MAX_DEPTH: i64 = 16;
/// Longest file path a daemon reports or a client names on a daemon's
/// machine.
pub const MAX_PATH_BYTES: usize = 4096;

/// Parses a UUID given for `field`, answering its canonical text.
pub fn parse_id(field: &'static str, s: &str) -> Result<String> {
    if s.is_empty() {
        return Err(invalid(field, "is required"));
    }
    uuid::Uuid::parse_str(s)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| invalid(field, format!("{} is not a valid id", quote(s))))
}

/// Parses an optional UUID: empty means none.
pub fn parse_optional_id(field: &'static str, s: &str) -> Result<Option<String>> {
    if s.is_empty() {
        Ok(None)
    } else {
        parse_id(field, s).map(Some)
    }
}

/// Resolves `page_size`: 0 means `default`, otherwise 1..=max.
pub fn page_size(field: &'static str, size: i32, default: i64, max: i64) -> Result<i64> {
    match i64::from(size) {
        0 => Ok(default),
        n if (1..=max).contains(&n) => Ok(n),
        n => Err(invalid(field, format!("{n} is out of range 1..={max}"))),
    }
}

pub(super) fn check_name(field: &'static str, name: &str) -> Result<String> {
    let name = name.trim();
    if name.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(invalid(
            field,
            format!("longer than {MAX_NAME_CHARS} characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(name.to_string())
}

/// A plan (or prompt, or message for an agent): the user's own words, kept
/// as written but for NUL bytes.
pub(super) fn check_plan(field: &'static str, plan: &str) -> Result<String> {
    text(field, plan, MAX_PLAN_BYTES)
}

/// Runtime names are short identifiers such as `claude` or `shell`.
pub fn check_runtime(field: &'static str, runtime: &str) -> Result<String> {
    if runtime.is_empty() {
        return Ok("shell".to_string());
    }
    let ok = runtime.len() <= 32
        && runtime
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        return Err(invalid(
            field,
            format!(
                "{} must be 1-32 characters of a-z, 0-9, - and _",
                quote(runtime)
            ),
        ));
    }
    Ok(runtime.to_string())
}

pub(super) fn check_text(field: &'static str, value: &str, max: usize) -> Result<String> {
    if value.len() > max {
        return Err(invalid(field, format!("longer than {max} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(value.trim().to_string())
}

/// A repository to clone: a URL or a path git understands. Credentials in
/// an http(s) URL are accepted but never stored: the daemon's own git
/// configuration and credential helpers provide them.
pub(super) fn check_repository(field: &'static str, value: &str) -> Result<String> {
    let repo = check_text(field, value, 2048)?;
    if repo.starts_with('-') {
        return Err(invalid(field, "must not start with '-'"));
    }
    Ok(without_credentials(&repo))
}

/// The URL without the user info of its authority (`https://TOKEN@host/…`,
/// `https://user:password@host/…`); an ssh:// URL keeps its user name.
pub fn without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let user = match scheme.to_ascii_lowercase().as_str() {
        "ssh" | "git+ssh" | "ssh+git" => {
            let name = authority[..at].split(':').next().unwrap_or_default();
            format!("{name}@")
        }
        _ => String::new(),
    };
    format!("{scheme}://{user}{}", &rest[at + 1..])
}

/// A branch name git accepts (the common rules of `git check-ref-format`).
pub(super) fn check_branch(field: &'static str, value: &str) -> Result<String> {
    let branch = check_text(field, value, 256)?;
    let bad = branch.starts_with(['-', '/', '.'])
        || branch.ends_with(['/', '.'])
        || branch.ends_with(".lock")
        || branch.contains("..")
        || branch.contains("//")
        || branch.contains("@{")
        || branch
            .chars()
            .any(|c| c.is_whitespace() || "~^:?*[\\".contains(c));
    if bad {
        return Err(invalid(
            field,
            format!("{} is not a branch name git accepts", quote(&branch)),
        ));
    }
    Ok(branch)
}

/// The git fields of a task, together: a branch or a completion action
/// needs a repository, and a target branch is for a merge.
pub(super) fn check_git_fields(t: &Task) -> Result<()> {
    if t.repository.is_empty() {
        if !t.branch.is_empty() {
            return Err(invalid(
                "branch",
                "needs a repository: the branch is made in the task's clone of it",
            ));
        }
        if t.completion_action != CompletionAction::None {
            return Err(invalid(
                "completion_action",
                format!("{} needs a repository", t.completion_action),
            ));
        }
    }
    if !t.target_branch.is_empty() && t.completion_action != CompletionAction::Merge {
        return Err(invalid(
            "target_branch",
            "is where a merge goes; set completion_action to merge, or leave it empty",
        ));
    }
    Ok(())
}

pub(super) fn check_workspace_name(name: &str) -> Result<String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        return Err(invalid(
            "name",
            format!(
                "{} must be 1-64 characters of letters, digits, -, _ and .",
                quote(name)
            ),
        ));
    }
    Ok(name.to_string())
}

/// A model name for an agent (`claude-sonnet-4-5`, `gpt-5-codex`); empty
/// means the daemon's default.
pub(super) fn check_model(field: &'static str, model: &str) -> Result<String> {
    let model = model.trim();
    if model.is_empty() {
        return Ok(String::new());
    }
    let ok = model.len() <= 128
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/[]@".contains(&b));
    if !ok {
        return Err(invalid(
            field,
            format!(
                "{} must be 1-128 characters of letters, digits and -_.:/[]@",
                quote(model)
            ),
        ));
    }
    Ok(model.to_string())
}

/// The permission modes agents accept (Claude Code's names).
pub const PERMISSION_MODES: &[&str] = &["default", "acceptEdits", "plan", "bypassPermissions"];

pub(super) fn check_permission_mode(field: &'static str, mode: &str) -> Result<String> {
    let mode = mode.trim();
    if mode.is_empty() || PERMISSION_MODES.contains(&mode) {
        return Ok(mode.to_string());
    }
    Err(invalid(
        field,
        format!(
            "{} is not one of {}",
            quote(mode),
            PERMISSION_MODES.join(", ")
        ),
    ))
}

/// Free text of at most `max` bytes, NUL bytes stripped.
pub fn text(field: &'static str, value: &str, max: usize) -> Result<String> {
    if value.len() > max {
        return Err(invalid(
            field,
            format!("{} bytes is over the limit of {max}", value.len()),
        ));
    }
    Ok(value.replace('\0', ""))
}

/// An identifier of 1 to `max` bytes without control characters.
pub fn identifier(field: &'static str, value: &str, max: usize) -> Result<String> {
    if value.is_empty() || value.len() > max {
        return Err(invalid(field, format!("must be 1-{max} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(
            field,
            format!("{} must not contain control characters", quote(value)),
        ));
    }
    Ok(value.to_string())
}

/// At most [`MAX_QUOTE`] bytes of `s`, quoted, for an error message.
pub fn quote(s: &str) -> String {
    if s.len() <= MAX_QUOTE {
        return format!("{s:?}");
    }
    let mut end = MAX_QUOTE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..end], s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_quote_at_most_128_bytes() {
        let long = "é".repeat(10_000);
        let e = parse_id("id", &long).unwrap_err().to_string();
        assert!(e.len() < 200, "{e}");
        assert!(e.contains("20000 bytes"), "{e}");
        assert_eq!(quote("abc"), "\"abc\"");
    }

    #[test]
    fn text_strips_nul_and_identifiers_refuse_it() {
        assert_eq!(text("f", "a\0b", 10).unwrap(), "ab");
        assert!(text("f", "abc", 2).is_err());
        assert!(identifier("f", "a\0b", 10).is_err());
        assert!(identifier("f", "", 10).is_err());
        assert_eq!(identifier("f", "host-1", 10).unwrap(), "host-1");
    }
}
