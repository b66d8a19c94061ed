//! Lines, stream-json typing and the unacknowledged-output buffer.

use super::*;

fn kinds(ms: &[TaskMessageInput]) -> Vec<MessageKind> {
    ms.iter()
        .map(|m| MessageKind::try_from(m.kind).unwrap_or(MessageKind::Unspecified))
        .collect()
}

#[test]
fn assistant_line_with_text_and_tool_use_blocks() {
    let mut p = StreamParser::default();
    let line = r#"{"type":"assistant","message":{"content":[{"type":"text","text":"Let me look."},{"type":"tool_use","id":"tu_1","name":"Bash","input":{"command":"ls -la","description":"List files"}},{"type":"text","text":"Done."}]}}"#;
    let ms = p.parse(line);
    assert_eq!(
        kinds(&ms),
        [
            MessageKind::Assistant,
            MessageKind::ToolUse,
            MessageKind::Assistant
        ]
    );
    assert_eq!(ms[0].content, "Let me look.");
    assert_eq!(ms[1].tool_name, "Bash");
    assert_eq!(
        ms[1].tool_input_json,
        r#"{"command":"ls -la","description":"List files"}"#
    );
    assert_eq!(ms[1].content, "List files");
    assert_eq!(ms[2].content, "Done.");
}

#[test]
fn tool_fields_stay_within_the_servers_bounds() {
    let mut p = StreamParser::default();
    let name = "é".repeat(300);
    let input = "x".repeat(MAX_TOOL_INPUT_BYTES);
    let line = serde_json::json!({
        "type": "assistant",
        "message": {"content": [{"type": "tool_use", "id": "big", "name": name,
                                 "input": {"command": input}}]},
    })
    .to_string();
    let ms = p.parse(&line);
    assert_eq!(kinds(&ms), [MessageKind::ToolUse]);
    assert!(ms[0].tool_name.len() <= MAX_TOOL_NAME_BYTES);
    assert!(ms[0].tool_name.starts_with("éé"));
    let input: serde_json::Value = serde_json::from_str(&ms[0].tool_input_json).unwrap();
    assert_eq!(input["truncated"], true, "{input}");
    // The result names the tool as cut.
    let result = r#"{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"big","content":"ok"}]}}"#;
    let ms2 = p.parse(result);
    assert_eq!(ms2[0].tool_name, ms[0].tool_name);
}

#[test]
fn tool_result_string_and_array_content() {
    let mut p = StreamParser::default();
    p.parse(r#"{"type":"assistant","message":{"content":[{"type":"tool_use","id":"a","name":"Read","input":{}}]}}"#);
    let ms = p.parse(r#"{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"a","content":"file body"}]}}"#);
    assert_eq!(kinds(&ms), [MessageKind::ToolResult]);
    assert_eq!(ms[0].content, "file body");
    assert_eq!(ms[0].tool_name, "Read");

    let ms = p.parse(r#"{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"b","content":[{"type":"text","text":"one"},{"type":"text","text":"two"}]},{"type":"tool_result","content":"x"}]}}"#);
    assert_eq!(
        kinds(&ms),
        [MessageKind::ToolResult, MessageKind::ToolResult]
    );
    assert_eq!(ms[0].content, "one\ntwo");
    assert_eq!(ms[1].content, "x");
}

#[test]
fn system_and_result_lines_carry_the_session_id() {
    let mut p = StreamParser::default();
    let sys = r#"{"type":"system","subtype":"init","session_id":"s-1","tools":[],"model":"m1","permissionMode":"default","cwd":"/w"}"#;
    let ms = p.parse(sys);
    assert_eq!(kinds(&ms), [MessageKind::System]);
    assert_eq!(
        ms[0].content,
        "session s-1 started: model m1, permission mode default, in /w"
    );
    let other = r#"{"type":"system","subtype":"compact_boundary"}"#;
    assert_eq!(p.parse(other)[0].content, other);
    assert_eq!(p.session_id.as_deref(), Some("s-1"));

    let ms =
        p.parse(r#"{"type":"result","subtype":"success","result":"All good","session_id":"s-2"}"#);
    assert_eq!(kinds(&ms), [MessageKind::Assistant]);
    assert_eq!(ms[0].content, "All good");
    assert_eq!(p.session_id.as_deref(), Some("s-2"));
    assert_eq!(p.last_result.as_deref(), Some("All good"));
}

#[test]
fn anything_else_is_raw_stdout() {
    let mut p = StreamParser::default();
    for line in [
        "plain text",
        "{not json",
        r#"{"type":"unknown"}"#,
        r#"[1,2]"#,
        r#"{"type":"assistant","message":{"content":[{"type":"thinking"}]}}"#,
        r#"{"type":"result","is_error":true}"#,
        "",
    ] {
        let ms = p.parse(line);
        assert_eq!(kinds(&ms), [MessageKind::Stdout], "{line}");
        assert_eq!(ms[0].content, line);
    }
    assert_eq!(p.session_id, None);
}

fn msg(seq: i64, content: &str) -> TaskMessageInput {
    TaskMessageInput {
        seq,
        kind: MessageKind::Stdout as i32,
        content: content.to_owned(),
        ..Default::default()
    }
}

fn seqs(ms: &[TaskMessageInput]) -> Vec<i64> {
    ms.iter().map(|m| m.seq).collect()
}

#[test]
fn ack_drops_up_to_acked_seq_and_resend_starts_above_it() {
    let mut b = OutputBuffer::new(5);
    for seq in 5..=9 {
        assert!(b.push(msg(seq, "x")));
    }
    assert!(!b.push(msg(9, "dup")));
    assert_eq!(seqs(&b.next_batch(3, usize::MAX)), [5, 6, 7]);
    assert_eq!(seqs(&b.next_batch(3, usize::MAX)), [8, 9]);
    assert!(!b.has_unsent());

    b.ack(6);
    assert_eq!(b.len(), 3);
    assert_eq!(b.acked_seq(), 6);
    b.ack(4); // stale acks change nothing
    assert_eq!(b.len(), 3);

    // A new session resends everything unacknowledged, in seq order.
    b.rewind();
    assert!(b.has_unsent());
    assert_eq!(seqs(&b.next_batch(100, usize::MAX)), [7, 8, 9]);
    b.push(msg(10, "new"));
    assert_eq!(seqs(&b.next_batch(100, usize::MAX)), [10]);

    // An ack beyond what exists is clamped, not trusted.
    b.ack(1_000);
    assert_eq!(b.len(), 0);
    assert_eq!(b.acked_seq(), 10);
    assert!(b.push(msg(11, "after")));
}

#[test]
fn ack_of_unsent_messages_keeps_counters_consistent() {
    let mut b = OutputBuffer::new(1);
    for seq in 1..=4 {
        b.push(msg(seq, "abc"));
    }
    b.ack(2);
    assert_eq!(seqs(&b.next_batch(10, usize::MAX)), [3, 4]);
    assert!(!b.has_unsent());
    assert_eq!(b.bytes(), 2 * message_size(&msg(0, "abc")));
}

#[test]
fn batches_respect_the_byte_limit_but_always_make_progress() {
    let mut b = OutputBuffer::new(1);
    let big = "x".repeat(1000);
    for seq in 1..=3 {
        b.push(msg(seq, &big));
    }
    assert!(b.batch_full() || b.bytes() < BATCH_MAX_BYTES);
    assert_eq!(seqs(&b.next_batch(10, 1500)), [1]);
    assert_eq!(seqs(&b.next_batch(10, 10)), [2]);
    assert_eq!(seqs(&b.next_batch(10, 5000)), [3]);
}

#[test]
fn backpressure_threshold() {
    let one = message_size(&msg(0, "0123456789"));
    let mut b = OutputBuffer::with_limit(1, 3 * one);
    for seq in 1..=3 {
        b.push(msg(seq, "0123456789"));
    }
    assert!(!b.over_limit(), "at the limit is still fine");
    b.push(msg(4, "0123456789"));
    assert!(b.over_limit());
    b.next_batch(10, usize::MAX);
    assert!(b.over_limit(), "sent is not acknowledged");
    b.ack(1);
    assert!(!b.over_limit());
}

#[test]
fn full_batch_by_count() {
    let mut b = OutputBuffer::new(1);
    for seq in 1..BATCH_MAX_MESSAGES as i64 {
        b.push(msg(seq, ""));
    }
    assert!(!b.batch_full());
    b.push(msg(BATCH_MAX_MESSAGES as i64, ""));
    assert!(b.batch_full());
    assert_eq!(b.next_batch(BATCH_MAX_MESSAGES, BATCH_MAX_BYTES).len(), 200);
}

#[tokio::test]
async fn line_reader_splits_long_lines_and_keeps_the_last_partial_line() {
    let input: &[u8] = b"short\r\n0123456789abc\n\nfour\r\nlast";
    let mut r = LineReader::with_max(input, 5);
    let mut lines = Vec::new();
    while let Some(line) = r.next_line().await.expect("read") {
        lines.push(line);
    }
    assert_eq!(
        lines,
        ["short", "01234", "56789", "abc", "", "four", "last"]
    );
}

#[tokio::test]
async fn line_reader_does_not_split_utf8_sequences() {
    let input = "aé€b\n".as_bytes();
    let mut r = LineReader::with_max(input, 4);
    let mut lines = Vec::new();
    while let Some(line) = r.next_line().await.expect("read") {
        lines.push(line);
    }
    assert_eq!(lines.concat(), "aé€b");
    assert!(lines.iter().all(|l| !l.contains('\u{FFFD}')), "{lines:?}");
}
