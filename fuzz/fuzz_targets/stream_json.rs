//! Claude Code stream-json lines, whatever an agent prints: the parser
//! never panics, every line becomes at least one message with a kind, and
//! no message outgrows the bounds the server enforces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use taskmesh_daemon::{MAX_LINE_BYTES, StreamParser};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parser = StreamParser::default();
    for line in text.lines() {
        if line.len() > MAX_LINE_BYTES {
            continue;
        }
        let messages = parser.parse(line);
        if line.trim().is_empty() {
            continue;
        }
        assert!(!messages.is_empty(), "{line:?} became nothing");
        for m in messages {
            assert!(m.kind != 0, "{line:?} gave a message without a kind");
            assert!(m.tool_name.len() <= 256, "tool name of {line:?}");
            assert!(m.tool_input_json.len() <= 256 * 1024);
        }
    }
});
