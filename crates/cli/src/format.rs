//! Everything the verbs print: tables, a task's details, output lines and
//! error lines. Pure functions of their input (the current time is passed
//! in), so they are tested here.

use std::error::Error;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use prost_types::Timestamp;
use tonic::{Code, Status};

use crate::pb::{self, DaemonState, MessageKind, TaskStatus};

/// Widest a free-text cell (a task's name) gets in a table.
const MAX_CELL: usize = 40;

/// Seconds since the epoch, for "5m ago".
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A gRPC code as the protocol spells it: `NOT_FOUND`.
pub fn code_name(code: Code) -> String {
    let mut name = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if i > 0 && c.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// `task 0193… not found (NOT_FOUND)`.
pub fn status(s: &Status) -> String {
    let message = s.message().trim();
    let message = if message.is_empty() {
        s.code().description()
    } else {
        message
    };
    format!("{message} ({})", code_name(s.code()))
}

/// An error and its sources, `: `-separated, without repeats (transport
/// errors often wrap an error that says the same thing).
pub fn causes(e: &dyn Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// `running`, from the wire value.
pub fn status_name(status: i32) -> String {
    let name = TaskStatus::try_from(status).map_or("unknown", |s| s.as_str_name());
    name.trim_start_matches("TASK_STATUS_").to_ascii_lowercase()
}

fn daemon_state_name(state: i32) -> String {
    let name = DaemonState::try_from(state).map_or("unknown", |s| s.as_str_name());
    name.trim_start_matches("DAEMON_STATE_")
        .to_ascii_lowercase()
}

/// The tail of `task … ended failed: exit code 2`.
pub fn ending(status: TaskStatus, reason: &str) -> String {
    let name = status_name(status as i32);
    if reason.is_empty() {
        name
    } else {
        format!("{name}: {reason}")
    }
}

/// The confirmation of a start: `task <id> queued`.
pub fn status_line(task: &pb::Task) -> String {
    format!("task {} {}", task.id, status_name(task.status))
}

/// A stop either ends the task at once or asks its daemon to interrupt it.
pub fn stop_line(task: &pb::Task, outcome: pb::StopOutcome) -> String {
    match outcome {
        pb::StopOutcome::AlreadyStopping => format!(
            "task {} is already stopping: its daemon was asked before (still {})",
            task.id,
            status_name(task.status)
        ),
        pb::StopOutcome::AlreadyCancelled => format!("task {} was already cancelled", task.id),
        _ if is_finished(task.status()) => status_line(task),
        _ => format!(
            "task {} stopping: its daemon was asked to interrupt it (still {})",
            task.id,
            status_name(task.status)
        ),
    }
}

fn approval_state(state: i32) -> String {
    pb::ApprovalState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("APPROVAL_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| state.to_string())
}

/// One line for a decided approval.
pub fn approval_line(a: &pb::Approval) -> String {
    let mut line = format!(
        "approval {} ({}) {} by {}",
        a.id,
        a.tool_name,
        approval_state(a.state),
        a.decided_by
    );
    if !a.message.is_empty() {
        let _ = write!(line, ": {}", a.message);
    }
    line
}

pub fn approval_table(approvals: &[pb::Approval], now: i64) -> String {
    let rows: Vec<[String; 6]> = approvals
        .iter()
        .map(|a| {
            [
                a.id.clone(),
                approval_state(a.state),
                a.tool_name.clone(),
                cell(&a.tool_input_json),
                ago(a.create_time.as_ref(), now),
                or_dash(&a.decided_by).to_string(),
            ]
        })
        .collect();
    table(
        ["ID", "STATE", "TOOL", "INPUT", "ASKED", "DECIDED BY"],
        &rows,
    )
}

pub fn is_finished(status: TaskStatus) -> bool {
    matches!(
        status,
        TaskStatus::Completed
            | TaskStatus::Failed
            | TaskStatus::Cancelled
            | TaskStatus::Interrupted
    )
}

/// `[status] running (attempt 1)`, for `watch` on stderr.
pub fn status_change(task: &pb::Task) -> String {
    let mut line = format!("[status] {}", status_name(task.status));
    if task.attempt > 0 {
        let _ = write!(line, " (attempt {})", task.attempt);
    }
    if !task.status_reason.is_empty() {
        let _ = write!(line, ": {}", task.status_reason);
    }
    line
}

/// Where a piece of agent output goes, and as what text (no final newline).
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    Stdout(String),
    Stderr(String),
}

pub fn message(m: &pb::TaskMessage) -> Output {
    let content = m.content.strip_suffix('\n').unwrap_or(&m.content);
    let prefixed = |label: &str| {
        let label = if m.tool_name.is_empty() {
            format!("[{label}]")
        } else {
            format!("[{label} {}]", m.tool_name)
        };
        if content.is_empty() {
            label
        } else {
            format!("{label} {content}")
        }
    };
    match m.kind() {
        MessageKind::Stdout | MessageKind::Assistant => Output::Stdout(content.to_owned()),
        MessageKind::Stderr => Output::Stderr(content.to_owned()),
        MessageKind::ToolUse => {
            let input = if m.tool_input_json.is_empty() {
                content
            } else {
                &m.tool_input_json
            };
            let label = format!("[tool_use {}]", m.tool_name);
            Output::Stdout(if input.is_empty() {
                label
            } else {
                format!("{label} {input}")
            })
        }
        MessageKind::ToolResult => Output::Stdout(prefixed("tool_result")),
        MessageKind::User => Output::Stdout(prefixed("user")),
        MessageKind::System => Output::Stdout(prefixed("system")),
        MessageKind::Approval => Output::Stdout(format!(
            "[approval {}] {} asks to run: {} (taskmesh task approve|deny {} --approval {})",
            m.approval_id, m.tool_name, m.tool_input_json, m.task_id, m.approval_id
        )),
        MessageKind::Unspecified => Output::Stdout(prefixed("message")),
    }
}

/// `12s ago`, `5m ago`, `3h ago`, `2d ago`; `-` when unset.
pub fn ago(ts: Option<&Timestamp>, now: i64) -> String {
    let Some(ts) = ts else {
        return "-".into();
    };
    let secs = (now - ts.seconds).max(0);
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86_400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// RFC 3339 to the second, with the age: `2025-01-02T03:04:05Z (5m ago)`.
fn when(ts: &Timestamp, now: i64) -> String {
    let whole = Timestamp {
        seconds: ts.seconds,
        nanos: 0,
    };
    format!("{whole} ({})", ago(Some(ts), now))
}

/// One line of free text fit for a table cell.
fn cell(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_CELL)
        .collect();
    if text.chars().count() > MAX_CELL {
        out.pop();
        out.push('…');
    }
    if out.is_empty() { "-".into() } else { out }
}

fn or_dash(text: &str) -> &str {
    if text.is_empty() { "-" } else { text }
}

/// Columns padded to their widest cell; the last column is not padded.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, c) in cells.enumerate() {
            if i + 1 < N {
                let _ = write!(text, "{c:<width$}  ", width = widths[i]);
            } else {
                text.push_str(c);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

pub fn task_table(tasks: &[pb::Task], now: i64) -> String {
    let rows: Vec<[String; 6]> = tasks
        .iter()
        .map(|t| {
            [
                t.id.clone(),
                status_name(t.status),
                cell(&t.runtime),
                cell(&t.name),
                or_dash(&t.daemon_id).to_owned(),
                ago(t.update_time.as_ref(), now),
            ]
        })
        .collect();
    table(
        ["ID", "STATUS", "RUNTIME", "NAME", "DAEMON", "UPDATED"],
        &rows,
    )
}

/// `daemons get`: one daemon's fields, a line each.
pub fn daemon_details(d: &pb::Daemon, now: i64) -> String {
    let state = pb::DaemonState::try_from(d.state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("DAEMON_STATE_")
                .to_lowercase()
        })
        .unwrap_or_default();
    let runtimes: Vec<String> = d
        .runtimes
        .iter()
        .map(|r| format!("{} {}", r.name, r.version))
        .collect();
    let seen = d
        .last_seen_time
        .as_ref()
        .map(|t| when(t, now))
        .unwrap_or_default();
    let fields = [
        ("id", d.id.clone()),
        ("hostname", d.hostname.clone()),
        ("state", state),
        (
            "tasks",
            format!("{} of {}", d.active_tasks, d.max_concurrent_tasks),
        ),
        ("runtimes", runtimes.join(", ")),
        ("version", d.version.clone()),
        ("last seen", seen),
        ("work dir", d.work_dir.clone()),
        ("clone targets", d.suggested_targets.join(", ")),
    ];
    let mut out = String::new();
    for (name, value) in fields.iter().filter(|(_, v)| !v.is_empty()) {
        let _ = writeln!(out, "{:<14} {value}", format!("{name}:"));
    }
    out
}

pub fn daemon_table(daemons: &[pb::Daemon], now: i64) -> String {
    let rows: Vec<[String; 6]> = daemons
        .iter()
        .map(|d| {
            // `claude 2.0.14`: the name and the first word of its version.
            let runtimes: Vec<String> = d
                .runtimes
                .iter()
                .map(|r| match r.version.split_whitespace().next() {
                    Some(v) if v != "builtin" && v != "unknown" => format!("{} {v}", r.name),
                    _ => r.name.clone(),
                })
                .collect();
            [
                d.id.clone(),
                cell(&d.hostname),
                daemon_state_name(d.state),
                or_dash(&runtimes.join(",")).to_owned(),
                format!("{}/{}", d.active_tasks, d.max_concurrent_tasks),
                ago(d.last_seen_time.as_ref(), now),
            ]
        })
        .collect();
    table(
        [
            "ID",
            "HOSTNAME",
            "STATE",
            "RUNTIMES",
            "RUNNING",
            "LAST SEEN",
        ],
        &rows,
    )
}

/// `user`, `daemon`, `viewer`, `agent`.
pub fn token_kind(kind: pb::TokenKind) -> &'static str {
    match kind {
        pb::TokenKind::User => "user",
        pb::TokenKind::Daemon => "daemon",
        pb::TokenKind::Viewer => "viewer",
        pb::TokenKind::Agent => "agent",
        pb::TokenKind::Unspecified => "-",
    }
}

/// `token list`: one line a token, revoked ones saying since when.
pub fn tokens(tokens: &[pb::Token], now: i64) -> String {
    let rows: Vec<[String; 6]> = tokens
        .iter()
        .map(|t| {
            [
                t.id.clone(),
                token_kind(t.kind()).to_owned(),
                cell(&t.name),
                or_dash(&t.user_name).to_owned(),
                ago(t.create_time.as_ref(), now),
                t.revoke_time
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |r| ago(Some(r), now)),
            ]
        })
        .collect();
    table(["ID", "KIND", "NAME", "USER", "CREATED", "REVOKED"], &rows)
}

fn token_counts(u: &pb::TaskUsage) -> String {
    format!(
        "{} input, {} output, {} cache read, {} cache write tokens",
        u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens
    )
}

/// `task usage`: per model, the total, and the cost.
pub fn usage_lines(usage: &pb::GetTaskUsageResponse) -> String {
    let mut out = String::new();
    for u in &usage.usage {
        let _ = writeln!(out, "{}: {}", u.model, token_counts(u));
    }
    let (total, cost) = usage_fields(usage);
    if !total.is_empty() {
        let _ = writeln!(out, "total: {total}");
    }
    if !cost.is_empty() {
        let _ = writeln!(out, "cost: {cost}");
    }
    if out.is_empty() {
        out.push_str("no usage reported\n");
    }
    out
}

/// `task events`: a line each, oldest first.
pub fn event_lines(events: &[pb::TaskEvent], now: i64) -> String {
    let mut out = String::new();
    for e in events {
        let time = e
            .create_time
            .as_ref()
            .map(|t| when(t, now))
            .unwrap_or_default();
        let change = if e.from_status == e.to_status {
            String::new()
        } else if e.from_status == 0 {
            format!("{} ", status_name(e.to_status))
        } else {
            format!(
                "{} -> {} ",
                status_name(e.from_status),
                status_name(e.to_status)
            )
        };
        let _ = writeln!(
            out,
            "{time}  attempt {}  {change}{}: {}",
            e.attempt, e.actor, e.reason
        );
    }
    out
}

/// The total tokens and the cost, each empty when there is none.
fn usage_fields(usage: &pb::GetTaskUsageResponse) -> (String, String) {
    let used = |u: &pb::TaskUsage| {
        u.input_tokens
            .saturating_add(u.output_tokens)
            .saturating_add(u.cache_read_tokens)
            .saturating_add(u.cache_write_tokens)
            > 0
    };
    let total = usage
        .total
        .as_ref()
        .filter(|u| used(u))
        .map(token_counts)
        .unwrap_or_default();
    let cost = match (usage.cost_usd > 0.0, usage.turns > 0) {
        (false, false) => String::new(),
        _ => format!("${:.4} over {} turns", usage.cost_usd, usage.turns),
    };
    (total, cost)
}

/// `task watch`'s last line for an agent task: usage per model and the
/// cost; `None` when nothing was used.
pub fn usage_summary(usage: &pb::GetTaskUsageResponse) -> Option<String> {
    let (total, cost) = usage_fields(usage);
    if total.is_empty() && cost.is_empty() {
        return None;
    }
    let models: Vec<String> = usage
        .usage
        .iter()
        .map(|u| format!("{}: {}", u.model, token_counts(u)))
        .collect();
    let mut line = format!("usage: {}", models.join("; "));
    if !cost.is_empty() {
        line.push_str(&format!("; cost {cost}"));
    }
    Some(line)
}

/// `task get`: one field per line, empty ones left out, the plan last (it
/// may be long).
fn completion(task: &pb::Task) -> String {
    match pb::CompletionAction::try_from(task.completion_action) {
        Ok(pb::CompletionAction::Push) => "push the branch".into(),
        Ok(pb::CompletionAction::Merge) if task.target_branch.is_empty() => {
            "merge into the default branch".into()
        }
        Ok(pb::CompletionAction::Merge) => format!("merge into {}", task.target_branch),
        _ => String::new(),
    }
}

/// "taskmesh/0194abcd: 2 commits, 3 files, +10 −2".
fn changes_line(c: &pb::TaskChanges) -> String {
    let plural = |n: i32, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
    format!(
        "{}: {}, {}, +{} -{}",
        c.branch,
        plural(c.commits, "commit"),
        plural(c.files_changed, "file"),
        c.insertions,
        c.deletions
    )
}

fn completion_result(c: &pb::TaskChanges) -> String {
    match c.completion_state.as_str() {
        "" => String::new(),
        state => format!("{state}: {}", c.completion_detail),
    }
}

/// `task diff --stat`: the summary, the completion's result and the files.
pub fn changes(c: &pb::TaskChanges) -> String {
    let mut out = format!("{} (attempt {})\n", changes_line(c), c.attempt);
    if !c.base_commit.is_empty() {
        let short = |s: &str| s.chars().take(12).collect::<String>();
        let _ = writeln!(out, "{}..{}", short(&c.base_commit), short(&c.head_commit));
    }
    let result = completion_result(c);
    if !result.is_empty() {
        let _ = writeln!(out, "completion {result}");
    }
    for f in &c.files {
        if f.binary {
            let _ = writeln!(out, "  {:>6} {:>6}  {} (binary)", "", "", f.path);
        } else {
            let _ = writeln!(
                out,
                "  {:>6} {:>6}  {}",
                format!("+{}", f.insertions),
                format!("-{}", f.deletions),
                f.path
            );
        }
    }
    if c.files.len() < c.files_changed as usize {
        let _ = writeln!(
            out,
            "  … and {} more",
            c.files_changed as usize - c.files.len()
        );
    }
    out
}

pub fn task_details(task: &pb::Task, usage: &pb::GetTaskUsageResponse, now: i64) -> String {
    let time = |ts: &Option<Timestamp>| ts.as_ref().map(|t| when(t, now)).unwrap_or_default();
    let attempt = if task.attempt > 0 {
        task.attempt.to_string()
    } else {
        String::new()
    };
    let (total, cost) = usage_fields(usage);
    let approvals = match task.pending_approvals {
        0 => String::new(),
        n => format!("{n} waiting (taskmesh task approvals {})", task.id),
    };
    let fields: Vec<(&str, String)> = [
        ("id", task.id.clone()),
        ("name", task.name.clone()),
        ("status", status_name(task.status)),
        ("reason", task.status_reason.clone()),
        ("attempt", attempt),
        ("runtime", task.runtime.clone()),
        ("model", task.model.clone()),
        ("permission mode", task.permission_mode.clone()),
        ("approvals", approvals),
        ("repository", task.repository.clone()),
        ("branch", task.branch.clone()),
        ("on completion", completion(task)),
        (
            "changes",
            task.changes.as_ref().map(changes_line).unwrap_or_default(),
        ),
        (
            "completion",
            task.changes
                .as_ref()
                .map(completion_result)
                .unwrap_or_default(),
        ),
        ("parent", task.parent_task_id.clone()),
        ("daemon", task.daemon_id.clone()),
        ("pinned to", task.pinned_daemon_id.clone()),
        ("agent session", task.agent_session_id.clone()),
        ("directory", task.working_directory.clone()),
        ("created by", task.created_by.clone()),
        ("created", time(&task.create_time)),
        ("updated", time(&task.update_time)),
        ("started", time(&task.start_time)),
        ("ended", time(&task.end_time)),
        (
            "output",
            match task.output_pruned_seq {
                0 => format!("{} messages", task.last_seq),
                n => format!(
                    "{} messages; 1–{n} removed by the server's retention",
                    task.last_seq
                ),
            },
        ),
        ("usage", total),
        ("cost", cost),
    ]
    .into_iter()
    .filter(|(_, v)| !v.is_empty())
    .collect();
    let width = fields.iter().map(|(n, _)| n.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (name, value) in &fields {
        let _ = writeln!(out, "{:<width$} {value}", format!("{name}:"), width = width);
    }
    if usage.usage.len() > 1 {
        out.push_str("\nusage by model:\n");
        for u in &usage.usage {
            let _ = writeln!(out, "  {}: {}", u.model, token_counts(u));
        }
    }
    if !task.subtasks.is_empty() {
        out.push_str("\nsubtasks:\n");
        out.push_str(&task_table(&task.subtasks, now));
    }
    if !task.plan.is_empty() {
        out.push_str("\nplan:\n");
        for line in task.plan.lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_spelled_as_the_protocol_does() {
        assert_eq!(code_name(Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::Unauthenticated), "UNAUTHENTICATED");
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
        assert_eq!(
            status(&Status::not_found("task x not found")),
            "task x not found (NOT_FOUND)"
        );
        assert_eq!(
            status(&Status::new(Code::Unavailable, "")),
            "The service is currently unavailable (UNAVAILABLE)"
        );
    }

    #[test]
    fn ages_round_down_to_one_unit() {
        let ts = |s| {
            Some(Timestamp {
                seconds: s,
                nanos: 0,
            })
        };
        assert_eq!(ago(ts(1000).as_ref(), 1000), "0s ago");
        assert_eq!(ago(ts(1000).as_ref(), 1059), "59s ago");
        assert_eq!(ago(ts(1000).as_ref(), 1000 + 3599), "59m ago");
        assert_eq!(ago(ts(1000).as_ref(), 1000 + 7200), "2h ago");
        assert_eq!(ago(ts(1000).as_ref(), 1000 + 86_400 * 3), "3d ago");
        assert_eq!(ago(ts(2000).as_ref(), 1000), "0s ago");
        assert_eq!(ago(None, 1000), "-");
    }

    #[test]
    fn tables_align_and_cut_long_names() {
        let out = table(
            ["ID", "NAME", "LAST"],
            &[
                ["a".into(), cell("short"), "x".into()],
                ["bbbb".into(), cell(&"n".repeat(50)), "y".into()],
                ["c".into(), cell("two\nlines"), "".into()],
            ],
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], format!("ID    NAME{}  LAST", " ".repeat(36)));
        assert_eq!(lines[1], format!("a     short{}  x", " ".repeat(35)));
        assert_eq!(lines[2], format!("bbbb  {}…  y", "n".repeat(39)));
        assert_eq!(lines[3], "c     two lines");
    }

    #[test]
    fn messages_go_to_their_stream_with_a_prefix_when_not_plain_output() {
        let m = |kind: MessageKind, content: &str, tool: &str, input: &str| pb::TaskMessage {
            kind: kind as i32,
            content: content.into(),
            tool_name: tool.into(),
            tool_input_json: input.into(),
            ..Default::default()
        };
        let out = |s: &str| Output::Stdout(s.into());
        assert_eq!(
            message(&m(MessageKind::Stdout, "hello\n", "", "")),
            out("hello")
        );
        assert_eq!(
            message(&m(MessageKind::Assistant, "I will", "", "")),
            out("I will")
        );
        assert_eq!(
            message(&m(MessageKind::ToolUse, "", "Bash", r#"{"command":"ls"}"#)),
            out(r#"[tool_use Bash] {"command":"ls"}"#)
        );
        assert_eq!(
            message(&m(MessageKind::ToolResult, "a.txt", "Bash", "")),
            out("[tool_result Bash] a.txt")
        );
        assert_eq!(
            message(&m(MessageKind::System, "init", "", "")),
            out("[system] init")
        );
        assert_eq!(
            message(&m(MessageKind::Stderr, "oops", "", "")),
            Output::Stderr("oops".into())
        );
    }

    #[test]
    fn causes_skip_repeats() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl Error for E {
            fn source(&self) -> Option<&(dyn Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let e = E(
            "transport error",
            Some(Box::new(E(
                "tcp connect error: Connection refused",
                Some(Box::new(E("Connection refused", None))),
            ))),
        );
        assert_eq!(
            causes(&e),
            "transport error: tcp connect error: Connection refused"
        );
    }
}
