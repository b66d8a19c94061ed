//! The redactor on any text: it never panics, never leaves a NUL byte and
//! is idempotent; and a private key printed a line at a time, from its
//! BEGIN line to its END line, is hidden whole: every line between them
//! becomes the marker alone.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use regex::Regex;
use taskmesh_server::domain::redact::{redact, redact_in_stream};

static BEGIN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----").unwrap());
static END: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----").unwrap());

const MARKER: &str = "[REDACTED:private_key]";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let once = redact(&text);
    assert!(!once.contains('\0'));
    assert_eq!(redact(&once), once, "redaction is idempotent");

    let mut in_key = false;
    for line in text.split_inclusive('\n') {
        let was_in_key = in_key;
        let out = redact_in_stream(line, &mut in_key);
        assert!(!out.contains('\0'));
        if was_in_key && !END.is_match(line) {
            assert_eq!(out, MARKER, "a key's line was shown: {line:?}");
        }
        let opens = BEGIN
            .find_iter(line)
            .last()
            .is_some_and(|b| !END.is_match(&line[b.end()..]));
        if !was_in_key {
            assert_eq!(in_key, opens, "{line:?} opens a key: {opens}");
        }
    }
});
