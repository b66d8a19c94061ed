//! Whatever Claude Code (stream-json, control requests included) or Codex
//! (`exec --json` events) prints: the adapters never panic, every message
//! has a kind and stays within the server's bounds, and every line they
//! would answer on stdin is one line of JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use taskmesh_daemon::{MAX_LINE_BYTES, read_agent_output};

fuzz_target!(|data: &[u8]| {
    let [which, rest @ ..] = data else {
        return;
    };
    let agent = if which % 2 == 0 { "claude" } else { "codex" };
    let text = String::from_utf8_lossy(rest);
    let lines: Vec<&str> = text.lines().filter(|l| l.len() <= MAX_LINE_BYTES).collect();
    let (messages, replies) = read_agent_output(agent, &lines);
    for m in messages {
        assert!(m.kind != 0, "{agent}: a message without a kind");
        assert!(m.tool_name.len() <= 256, "{agent}: tool name");
        assert!(m.tool_input_json.len() <= 256 * 1024, "{agent}: tool input");
    }
    for r in replies {
        assert!(!r.contains('\n'), "{agent}: a reply spans lines");
        assert!(
            serde_json::from_str::<serde_json::Value>(&r).is_ok(),
            "{agent}: a reply is not JSON: {r}"
        );
    }
});
