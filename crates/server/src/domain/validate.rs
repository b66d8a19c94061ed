//! Checks on what clients send: ids, names, sizes. Each failure names the
//! field.

use super::{Result, invalid};

/// Limits on what clients may send.
pub const MAX_PLAN_BYTES: usize = 1 << 20;

pub const MAX_NAME_CHARS: usize = 256;

pub const MAX_DEPTH: i64 = 16;

/// Parses a UUID given for `field`, answering its canonical text.
pub fn parse_id(field: &'static str, s: &str) -> Result<String> {
    if s.is_empty() {
        return Err(invalid(field, "is required"));
    }
    uuid::Uuid::parse_str(s)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| invalid(field, format!("{s:?} is not a valid id")))
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

pub(super) fn check_plan(plan: &str) -> Result<()> {
    if plan.len() > MAX_PLAN_BYTES {
        return Err(invalid(
            "plan",
            format!("{} bytes is over the limit of {MAX_PLAN_BYTES}", plan.len()),
        ));
    }
    Ok(())
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
            format!("{runtime:?} must be 1-32 characters of a-z, 0-9, - and _"),
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

pub(super) fn check_workspace_name(name: &str) -> Result<String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        return Err(invalid(
            "name",
            format!("{name:?} must be 1-64 characters of letters, digits, -, _ and ."),
        ));
    }
    Ok(name.to_string())
}
