//! Agent output: splitting pipes into lines, typing Claude Code stream-json
//! lines, and the per-task buffer of output the server has not acknowledged.

use std::collections::{HashMap, VecDeque};
use std::io;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use crate::pb::{MessageKind, TaskMessageInput};

/// Longest line sent as one message; longer lines are split.
pub const MAX_LINE_BYTES: usize = 256 * 1024;
/// Unacknowledged output per task above which the runner stops reading the
/// child's pipes until acknowledgements arrive.
pub const MAX_UNACKED_BYTES: usize = 64 * 1024 * 1024;
/// A batch of output sent in one `ReportTaskMessagesRequest`.
pub const BATCH_MAX_MESSAGES: usize = 200;
pub const BATCH_MAX_BYTES: usize = 256 * 1024;

/// The server's bounds on a message's tool fields: a longer tool name is
/// cut, a larger tool input is replaced by a note of its size, so a batch
/// is never refused for them.
pub const MAX_TOOL_NAME_BYTES: usize = 256;
pub const MAX_TOOL_INPUT_BYTES: usize = 256 * 1024;

/// Reads a pipe line by line, splitting lines longer than `max` bytes.
///
/// `next_line` is cancel-safe: the partial line lives in the struct, so a
/// `tokio::select!` that drops the future loses no bytes.
pub struct LineReader<R> {
    inner: BufReader<R>,
    partial: Vec<u8>,
    max: usize,
    eof: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(inner: R) -> Self {
        Self::with_max(inner, MAX_LINE_BYTES)
    }

    pub fn with_max(inner: R, max: usize) -> Self {
        Self {
            inner: BufReader::new(inner),
            partial: Vec::new(),
            max: max.max(4),
            eof: false,
        }
    }

    /// The next line without its terminator; `None` at end of input.
    pub async fn next_line(&mut self) -> io::Result<Option<String>> {
        loop {
            if self.eof {
                if self.partial.is_empty() {
                    return Ok(None);
                }
                let rest = std::mem::take(&mut self.partial);
                return Ok(Some(into_text(rest)));
            }
            let buf = self.inner.fill_buf().await?;
            if buf.is_empty() {
                self.eof = true;
                continue;
            }
            if self.partial.len() >= self.max {
                // A terminator right after a full line still ends that line.
                let terminator = if buf[0] == b'\n' {
                    1
                } else if buf.starts_with(b"\r\n") {
                    2
                } else {
                    0
                };
                if terminator > 0 {
                    self.inner.consume(terminator);
                    return Ok(Some(finish_line(std::mem::take(&mut self.partial))));
                }
                let cut = utf8_boundary(&self.partial, self.max);
                let rest = self.partial.split_off(cut);
                let line = std::mem::replace(&mut self.partial, rest);
                return Ok(Some(into_text(line)));
            }
            let room = self.max - self.partial.len();
            let window = &buf[..buf.len().min(room)];
            if let Some(pos) = window.iter().position(|&b| b == b'\n') {
                self.partial.extend_from_slice(&window[..pos]);
                self.inner.consume(pos + 1);
                return Ok(Some(finish_line(std::mem::take(&mut self.partial))));
            }
            let n = window.len();
            self.partial.extend_from_slice(window);
            self.inner.consume(n);
        }
    }
}

/// The largest cut `<= max` that does not split a UTF-8 sequence (falling
/// back to `max` for bytes that are not UTF-8 anyway).
fn utf8_boundary(bytes: &[u8], max: usize) -> usize {
    let end = max.min(bytes.len());
    let mut start = end;
    // A UTF-8 sequence is at most 4 bytes: find the lead byte of the last one.
    while start > 0 && end - start < 4 {
        start -= 1;
        let b = bytes[start];
        if b & 0xC0 != 0x80 {
            let len = match b {
                0xF0.. => 4,
                0xE0.. => 3,
                0xC0.. => 2,
                _ => 1,
            };
            return if start + len > end && start > 0 {
                start
            } else {
                end
            };
        }
    }
    end
}

/// A complete line's text, without a trailing `\r`.
fn finish_line(mut line: Vec<u8>) -> String {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    into_text(line)
}

fn into_text(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

/// Types stdout lines of Claude Code's `--output-format stream-json` and
/// remembers what the end report needs (the agent's session id, its result).
#[derive(Default)]
pub struct StreamParser {
    /// The agent's own session id, for `AgentResume`.
    pub session_id: Option<String>,
    /// The text of the last `result` line, or else the last plain line.
    pub last_result: Option<String>,
    /// tool_use id → tool name, so a tool_result can name its tool.
    tool_names: HashMap<String, String>,
}

/// Tool names remembered for tool results; cleared when full.
const MAX_TOOL_IDS: usize = 4096;
/// Longest tool_use summary put in `content`.
const MAX_SUMMARY_CHARS: usize = 200;

impl StreamParser {
    /// The messages one stdout line becomes (without seq). Never empty.
    pub fn parse(&mut self, line: &str) -> Vec<TaskMessageInput> {
        let typed = serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|v| self.parse_json(line, &v));
        match typed {
            Some(messages) if !messages.is_empty() => messages,
            _ => {
                if !line.trim().is_empty() {
                    self.last_result = Some(line.to_owned());
                }
                vec![message(MessageKind::Stdout, line.to_owned())]
            }
        }
    }

    fn parse_json(&mut self, line: &str, v: &Value) -> Option<Vec<TaskMessageInput>> {
        let kind = v.get("type")?.as_str()?;
        if matches!(kind, "system" | "result")
            && let Some(id) = v.get("session_id").and_then(Value::as_str)
            && !id.is_empty()
        {
            self.session_id = Some(id.to_owned());
        }
        match kind {
            "assistant" => Some(self.assistant(v)),
            "user" => Some(self.user(v)),
            "system" => Some(vec![message(MessageKind::System, system_line(line, v))]),
            "result" => {
                let text = v.get("result")?.as_str()?;
                self.last_result = Some(text.to_owned());
                Some(vec![message(MessageKind::Assistant, text.to_owned())])
            }
            _ => None,
        }
    }

    fn assistant(&mut self, v: &Value) -> Vec<TaskMessageInput> {
        let mut out = Vec::new();
        for block in content_blocks(v) {
            match block.get("type").and_then(Value::as_str) {
                Some("text") => {
                    if let Some(text) = block.get("text").and_then(Value::as_str) {
                        out.push(message(MessageKind::Assistant, text.to_owned()));
                    }
                }
                Some("tool_use") => {
                    let name = block
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let name = name[..name.floor_char_boundary(MAX_TOOL_NAME_BYTES)].to_owned();
                    if let Some(id) = block.get("id").and_then(Value::as_str) {
                        if self.tool_names.len() >= MAX_TOOL_IDS {
                            self.tool_names.clear();
                        }
                        self.tool_names.insert(id.to_owned(), name.clone());
                    }
                    let input = block.get("input").cloned().unwrap_or(Value::Null);
                    let mut input_json = input.to_string();
                    if input_json.len() > MAX_TOOL_INPUT_BYTES {
                        input_json = serde_json::json!({
                            "truncated": true,
                            "bytes": input_json.len(),
                        })
                        .to_string();
                    }
                    out.push(TaskMessageInput {
                        kind: MessageKind::ToolUse as i32,
                        content: tool_summary(&input),
                        tool_input_json: input_json,
                        tool_name: name,
                        seq: 0,
                        request_id: String::new(),
                    });
                }
                _ => {}
            }
        }
        out
    }

    fn user(&mut self, v: &Value) -> Vec<TaskMessageInput> {
        let mut out = Vec::new();
        if let Some(text) = v
            .get("message")
            .and_then(|m| m.get("content"))
            .and_then(Value::as_str)
        {
            out.push(message(MessageKind::User, text.to_owned()));
            return out;
        }
        for block in content_blocks(v) {
            match block.get("type").and_then(Value::as_str) {
                Some("tool_result") => {
                    let tool_name = block
                        .get("tool_use_id")
                        .and_then(Value::as_str)
                        .and_then(|id| self.tool_names.remove(id))
                        .unwrap_or_default();
                    out.push(TaskMessageInput {
                        kind: MessageKind::ToolResult as i32,
                        content: block.get("content").map(text_of).unwrap_or_default(),
                        tool_name,
                        ..Default::default()
                    });
                }
                Some("text") => {
                    if let Some(text) = block.get("text").and_then(Value::as_str) {
                        out.push(message(MessageKind::User, text.to_owned()));
                    }
                }
                _ => {}
            }
        }
        out
    }
}

/// A `system` line as a person reads it: Claude's init as one sentence,
/// anything else as printed.
fn system_line(line: &str, v: &Value) -> String {
    if v.get("subtype").and_then(Value::as_str) != Some("init") {
        return line.to_owned();
    }
    let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?");
    format!(
        "session {} started: model {}, permission mode {}, in {}",
        field("session_id"),
        field("model"),
        field("permissionMode"),
        field("cwd")
    )
}

fn message(kind: MessageKind, content: String) -> TaskMessageInput {
    TaskMessageInput {
        kind: kind as i32,
        content,
        ..Default::default()
    }
}

fn content_blocks(v: &Value) -> &[Value] {
    v.get("message")
        .and_then(|m| m.get("content"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// A tool result's text: a string, or the text blocks of an array joined.
fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .filter_map(|item| match item {
                Value::String(s) => Some(s.as_str()),
                _ => item.get("text").and_then(Value::as_str),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A one-line hint of what a tool call does, from its usual input fields.
fn tool_summary(input: &Value) -> String {
    const FIELDS: [&str; 8] = [
        "description",
        "command",
        "file_path",
        "path",
        "pattern",
        "url",
        "query",
        "prompt",
    ];
    let Some(text) = FIELDS
        .iter()
        .find_map(|f| input.get(*f).and_then(Value::as_str))
    else {
        return String::new();
    };
    let line = text.lines().next().unwrap_or_default();
    let mut summary: String = line.chars().take(MAX_SUMMARY_CHARS).collect();
    if summary.len() < text.len() {
        summary.push('…');
    }
    summary
}

/// What a message weighs in the buffer and in a batch.
pub fn message_size(m: &TaskMessageInput) -> usize {
    m.content.len() + m.tool_name.len() + m.tool_input_json.len() + 16
}

/// One task's output that the server has not acknowledged yet.
///
/// The server stores output idempotently by (task, seq) and acknowledges the
/// highest contiguous seq. Everything above `acked_seq` stays here, and a
/// new session resends it from `acked_seq + 1` (`rewind`), so a broken
/// stream loses nothing and the server sees no gap.
#[derive(Debug)]
pub struct OutputBuffer {
    /// Messages with seq > acked_seq, in seq order.
    msgs: VecDeque<TaskMessageInput>,
    bytes: usize,
    acked_seq: i64,
    /// Highest seq written to the current stream.
    sent_seq: i64,
    /// Highest seq ever pushed.
    last_seq: i64,
    unsent: usize,
    unsent_bytes: usize,
    limit: usize,
}

impl OutputBuffer {
    /// A buffer for an attempt whose first message has seq `first_seq`.
    pub fn new(first_seq: i64) -> Self {
        Self::with_limit(first_seq, MAX_UNACKED_BYTES)
    }

    pub fn with_limit(first_seq: i64, limit: usize) -> Self {
        let before = first_seq.saturating_sub(1);
        Self {
            msgs: VecDeque::new(),
            bytes: 0,
            acked_seq: before,
            sent_seq: before,
            last_seq: before,
            unsent: 0,
            unsent_bytes: 0,
            limit,
        }
    }

    /// Appends a message; seqs must increase (others are ignored).
    pub fn push(&mut self, m: TaskMessageInput) -> bool {
        if m.seq <= self.last_seq {
            return false;
        }
        let size = message_size(&m);
        self.last_seq = m.seq;
        self.bytes += size;
        self.unsent += 1;
        self.unsent_bytes += size;
        self.msgs.push_back(m);
        true
    }

    /// Drops everything up to `acked_seq`. An ack beyond what was pushed is
    /// clamped: the server cannot have stored what it never got.
    pub fn ack(&mut self, acked_seq: i64) {
        let acked = acked_seq.min(self.last_seq);
        if acked <= self.acked_seq {
            return;
        }
        self.acked_seq = acked;
        while let Some(front) = self.msgs.front() {
            if front.seq > acked {
                break;
            }
            let size = message_size(front);
            if front.seq > self.sent_seq {
                self.unsent -= 1;
                self.unsent_bytes -= size;
            }
            self.bytes -= size;
            self.msgs.pop_front();
        }
        self.sent_seq = self.sent_seq.max(acked);
    }

    /// Marks everything unacknowledged as unsent, for a new session.
    pub fn rewind(&mut self) {
        self.sent_seq = self.acked_seq;
        self.unsent = self.msgs.len();
        self.unsent_bytes = self.bytes;
    }

    /// The next unsent messages in seq order: at most `max_messages`, and
    /// at most `max_bytes` unless a single message is larger.
    pub fn next_batch(&mut self, max_messages: usize, max_bytes: usize) -> Vec<TaskMessageInput> {
        let start = self.msgs.partition_point(|m| m.seq <= self.sent_seq);
        let mut batch = Vec::new();
        let mut bytes = 0;
        for m in self.msgs.range(start..) {
            let size = message_size(m);
            if batch.len() >= max_messages || (!batch.is_empty() && bytes + size > max_bytes) {
                break;
            }
            bytes += size;
            batch.push(m.clone());
        }
        if let Some(last) = batch.last() {
            self.sent_seq = last.seq;
            self.unsent -= batch.len();
            self.unsent_bytes -= bytes;
        }
        batch
    }

    pub fn has_unsent(&self) -> bool {
        self.unsent > 0
    }

    /// Enough unsent output for a full batch: send without waiting.
    pub fn batch_full(&self) -> bool {
        self.unsent >= BATCH_MAX_MESSAGES || self.unsent_bytes >= BATCH_MAX_BYTES
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    pub fn acked_seq(&self) -> i64 {
        self.acked_seq
    }

    /// Above the limit: the runner must stop reading until acks arrive.
    pub fn over_limit(&self) -> bool {
        self.bytes > self.limit
    }
}

#[cfg(test)]
mod tests;
