//! Codex in `codex exec --json` mode:
//!
//! ```text
//! codex exec --json --skip-git-repo-check [--model M] [--sandbox S] -
//! codex exec --json --skip-git-repo-check [--model M] [--sandbox S] resume THREAD -
//! ```
//!
//! The prompt goes in on stdin (`-`), which is then closed: exec mode runs
//! one turn and exits. Its JSONL events map to the typed messages:
//! `agent_message` → assistant, `reasoning` and `todo_list` → system,
//! `command_execution` → tool use (when it starts) and tool result with the
//! output and exit code (when it completes), `file_change` and
//! `mcp_tool_call` → tool use and result, `error` items → stderr.
//! `thread.started` names the thread a continued attempt resumes;
//! `turn.completed` carries the usage; `turn.failed` and `error` fail the
//! run. Exec mode takes no follow-ups and asks for no approvals (its
//! approval policy is `never`): both answer why.

use std::path::Path;

use serde_json::{Value, json};
use tokio::process::Command;

use super::{Agent, AgentEnd, Reading, Turn, UsageReport, user_message};
use crate::output::{MAX_TOOL_INPUT_BYTES, MAX_TOOL_NAME_BYTES};
use crate::pb::{ApprovalDecision, MessageKind, TaskMessageInput, TaskUsage};

/// The daemon's defaults for Codex tasks.
#[derive(Debug, Clone, Default)]
pub(crate) struct Settings {
    /// The `codex` executable.
    pub binary: String,
    pub model: Option<String>,
    /// `--sandbox`: read-only, workspace-write or danger-full-access.
    pub sandbox: Option<String>,
}

pub(crate) struct Codex {
    settings: Settings,
    model: String,
    thread_id: Option<String>,
    last_message: Option<String>,
    error: Option<String>,
    /// Usage of the turns so far (exec runs one; totals all the same).
    usage: TaskUsage,
}

impl Codex {
    pub(crate) fn new(settings: Settings) -> Self {
        Self {
            settings,
            model: String::new(),
            thread_id: None,
            last_message: None,
            error: None,
            usage: TaskUsage::default(),
        }
    }

    fn item(&mut self, event: &str, item: &Value) -> Vec<TaskMessageInput> {
        let text = |key: &str| {
            item.get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let started = event == "item.started";
        let completed = event == "item.completed";
        match item.get("type").and_then(Value::as_str) {
            Some("agent_message") if completed => {
                let t = text("text");
                self.last_message = Some(t.clone());
                vec![message(MessageKind::Assistant, t)]
            }
            Some("reasoning") if completed => vec![message(MessageKind::System, text("text"))],
            Some("command_execution") if started => {
                let command = text("command");
                vec![tool_use(
                    "command_execution",
                    &json!({"command": command}),
                    command.clone(),
                )]
            }
            Some("command_execution") if completed => {
                let exit = item
                    .get("exit_code")
                    .and_then(Value::as_i64)
                    .map_or_else(|| text("status"), |c| format!("exit code {c}"));
                let mut m = message(
                    MessageKind::ToolResult,
                    format!("{}\n({exit})", text("aggregated_output").trim_end()),
                );
                m.tool_name = "command_execution".into();
                vec![m]
            }
            Some("file_change") if completed => {
                let changes = item.get("changes").cloned().unwrap_or(json!([]));
                let summary = changes
                    .as_array()
                    .map(|cs| {
                        cs.iter()
                            .map(|c| {
                                format!(
                                    "{} {}",
                                    c.get("kind").and_then(Value::as_str).unwrap_or("change"),
                                    c.get("path").and_then(Value::as_str).unwrap_or("?")
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                let mut result = message(MessageKind::ToolResult, text("status"));
                result.tool_name = "file_change".into();
                vec![
                    tool_use("file_change", &json!({"changes": changes}), summary),
                    result,
                ]
            }
            Some("mcp_tool_call") if completed => {
                let name = format!("{}.{}", text("server"), text("tool"));
                let args = item.get("arguments").cloned().unwrap_or(Value::Null);
                let outcome = item
                    .get("error")
                    .and_then(|e| e.get("message"))
                    .or_else(|| item.get("result"))
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                    .unwrap_or_default();
                let mut result = message(MessageKind::ToolResult, outcome);
                result.tool_name = bounded_name(&name);
                vec![tool_use(&name, &args, String::new()), result]
            }
            Some("web_search") if completed => {
                vec![tool_use(
                    "web_search",
                    &json!({"query": text("query")}),
                    text("query"),
                )]
            }
            Some("todo_list") if completed => {
                let items = item.get("items").cloned().unwrap_or(json!([]));
                vec![message(MessageKind::System, format!("todo: {items}"))]
            }
            Some("error") if completed => vec![message(MessageKind::Stderr, text("message"))],
            _ => Vec::new(),
        }
    }
}

impl Agent for Codex {
    fn command(&self, turn: &Turn, _dir: &Path) -> Command {
        let mut cmd = Command::new(&self.settings.binary);
        cmd.args(["exec", "--json", "--skip-git-repo-check"]);
        let model = Some(turn.model.as_str())
            .filter(|m| !m.is_empty())
            .or(self.settings.model.as_deref());
        if let Some(model) = model {
            cmd.args(["--model", model]);
        }
        if let Some(sandbox) = &self.settings.sandbox {
            cmd.args(["--sandbox", sandbox]);
        }
        if let Some(tools) = &turn.tools {
            // TOML values: a JSON string or array of strings is one.
            let key = format!("mcp_servers.{}", super::TOOLS_NAME);
            let command = serde_json::Value::from(tools.command.as_str());
            let args = serde_json::Value::from(tools.args.clone());
            cmd.arg("-c").arg(format!("{key}.command={command}"));
            cmd.arg("-c").arg(format!("{key}.args={args}"));
        }
        if let Some(id) = &turn.resume_session_id {
            cmd.args(["resume", id]);
        }
        // The prompt comes on stdin.
        cmd.arg("-");
        cmd
    }

    fn opening(&mut self, turn: &Turn) -> (Vec<String>, Vec<TaskMessageInput>) {
        self.model = if turn.model.is_empty() {
            self.settings.model.clone().unwrap_or_default()
        } else {
            turn.model.clone()
        };
        let prompt = if turn.resume_session_id.is_none() && !turn.context.is_empty() {
            format!(
                "An earlier attempt at this task printed:\n\n{}\n\n{}",
                turn.context, turn.prompt
            )
        } else {
            turn.prompt.clone()
        };
        (vec![prompt], vec![user_message(&turn.prompt)])
    }

    /// Exec mode reads its prompt to the end of stdin: close it at once.
    fn closes_stdin_after_opening(&self) -> bool {
        true
    }

    fn follow_up(&mut self, _text: &str) -> Result<(String, TaskMessageInput), String> {
        Err(
            "Codex runs one turn in exec mode and takes no messages while it works; \
             continue the task with a new prompt (taskmesh task continue)"
                .into(),
        )
    }

    fn read_line(&mut self, line: &str) -> Reading {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            return Reading {
                messages: vec![message(MessageKind::Stdout, line.to_owned())],
                ..Reading::default()
            };
        };
        let event = v.get("type").and_then(Value::as_str).unwrap_or_default();
        match event {
            "thread.started" => {
                self.thread_id = v
                    .get("thread_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                Reading::default()
            }
            "turn.started" => Reading::default(),
            "turn.completed" => {
                let u = v.get("usage").cloned().unwrap_or(Value::Null);
                let int = |k: &str| u.get(k).and_then(Value::as_i64).unwrap_or(0).max(0);
                // Totals over the process's turns.
                self.usage.input_tokens =
                    self.usage.input_tokens.saturating_add(int("input_tokens"));
                self.usage.cache_read_tokens = self
                    .usage
                    .cache_read_tokens
                    .saturating_add(int("cached_input_tokens"));
                self.usage.output_tokens = self
                    .usage
                    .output_tokens
                    .saturating_add(int("output_tokens"));
                let usage = TaskUsage {
                    provider: "openai".into(),
                    model: if self.model.is_empty() {
                        "codex-default".into()
                    } else {
                        self.model.clone()
                    },
                    ..self.usage.clone()
                };
                Reading {
                    usage: Some(UsageReport {
                        usage: vec![usage],
                        cost_usd: 0.0,
                        turns: 0,
                    }),
                    ..Reading::default()
                }
            }
            "turn.failed" | "error" => {
                let why = v
                    .get("error")
                    .and_then(|e| e.get("message"))
                    .or_else(|| v.get("message"))
                    .and_then(Value::as_str)
                    .unwrap_or("Codex reported an error")
                    .to_owned();
                self.error = Some(why.clone());
                Reading {
                    messages: vec![message(MessageKind::Stderr, why)],
                    ..Reading::default()
                }
            }
            "item.started" | "item.updated" | "item.completed" => {
                let item = v.get("item").cloned().unwrap_or(Value::Null);
                Reading {
                    messages: self.item(event, &item),
                    ..Reading::default()
                }
            }
            _ => Reading::default(),
        }
    }

    fn decide(&mut self, _decision: &ApprovalDecision) -> Result<String, String> {
        Err("Codex in exec mode asks for no permissions".into())
    }

    fn interrupt(&mut self) -> Option<String> {
        None
    }

    fn end(&mut self) -> AgentEnd {
        AgentEnd {
            summary: self.last_message.take(),
            error: self.error.take(),
            session_id: self.thread_id.take(),
        }
    }
}

fn message(kind: MessageKind, content: String) -> TaskMessageInput {
    TaskMessageInput {
        kind: kind as i32,
        content,
        ..Default::default()
    }
}

fn bounded_name(name: &str) -> String {
    name[..name.floor_char_boundary(MAX_TOOL_NAME_BYTES)].to_owned()
}

fn tool_use(name: &str, input: &Value, summary: String) -> TaskMessageInput {
    let mut input_json = input.to_string();
    if input_json.len() > MAX_TOOL_INPUT_BYTES {
        input_json = json!({"truncated": true, "bytes": input_json.len()}).to_string();
    }
    TaskMessageInput {
        kind: MessageKind::ToolUse as i32,
        content: summary,
        tool_name: bounded_name(name),
        tool_input_json: input_json,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_events_become_typed_messages_usage_and_a_thread() {
        let mut c = Codex::new(Settings {
            binary: "codex".into(),
            ..Settings::default()
        });
        let (lines, said) = c.opening(&Turn {
            prompt: "fix it".into(),
            model: "gpt-5-codex".into(),
            ..Turn::default()
        });
        assert_eq!(
            (lines, said[0].content.as_str()),
            (vec!["fix it".to_owned()], "fix it")
        );
        assert!(
            c.read_line(r#"{"type":"thread.started","thread_id":"th_1"}"#)
                .messages
                .is_empty()
        );
        let started = c.read_line(r#"{"type":"item.started","item":{"id":"i1","type":"command_execution","command":"ls","aggregated_output":"","exit_code":null,"status":"in_progress"}}"#);
        assert_eq!(started.messages[0].kind(), MessageKind::ToolUse);
        assert_eq!(started.messages[0].tool_input_json, r#"{"command":"ls"}"#);
        let done = c.read_line(r#"{"type":"item.completed","item":{"id":"i1","type":"command_execution","command":"ls","aggregated_output":"a\nb\n","exit_code":0,"status":"completed"}}"#);
        assert_eq!(done.messages[0].kind(), MessageKind::ToolResult);
        assert_eq!(done.messages[0].content, "a\nb\n(exit code 0)");
        let said = c.read_line(
            r#"{"type":"item.completed","item":{"id":"i2","type":"agent_message","text":"Done."}}"#,
        );
        assert_eq!(said.messages[0].kind(), MessageKind::Assistant);
        let usage = c
            .read_line(r#"{"type":"turn.completed","usage":{"input_tokens":200,"cached_input_tokens":50,"output_tokens":30}}"#)
            .usage
            .unwrap();
        let u = &usage.usage[0];
        assert_eq!(
            (
                u.model.as_str(),
                u.input_tokens,
                u.cache_read_tokens,
                u.output_tokens
            ),
            ("gpt-5-codex", 200, 50, 30)
        );
        let end = c.end();
        assert_eq!(end.session_id.as_deref(), Some("th_1"));
        assert_eq!(end.summary.as_deref(), Some("Done."));
        assert!(end.error.is_none());
        assert!(c.follow_up("more").is_err());
    }

    #[test]
    fn a_failed_turn_fails_the_run() {
        let mut c = Codex::new(Settings::default());
        c.read_line(r#"{"type":"turn.failed","error":{"message":"stream disconnected"}}"#);
        assert_eq!(c.end().error.as_deref(), Some("stream disconnected"));
    }
}
