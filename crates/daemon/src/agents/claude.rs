//! Claude Code in its headless stream-json protocol, both ways:
//!
//! ```text
//! claude -p --input-format stream-json --output-format stream-json --verbose
//!        --permission-prompt-tool stdio [--model M] [--permission-mode P]
//!        [--allowedTools T] [--resume SESSION]
//! ```
//!
//! - stdin: an `initialize` control request, then every prompt (the plan,
//!   then each follow-up) as a `user` message line. Each prompt is one turn
//!   that ends with a `result` line; once every turn asked for has its
//!   result, stdin is closed and Claude exits.
//! - stdout: `system` (init, with the session id), `assistant` (text and
//!   tool_use blocks), `user` (tool_result blocks), `result` (the turn's
//!   end: `is_error`, `num_turns`, `total_cost_usd`, `usage`, `modelUsage`)
//!   and `control_request` lines. A `can_use_tool` request becomes an
//!   APPROVAL message; a person's decision goes back as its
//!   `control_response`.
//! - interrupts: a `control_request` of subtype `interrupt` first; the
//!   runner signals the process group after the grace.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Value, json};
use tokio::process::Command;

use super::{Agent, AgentEnd, Reading, Turn, UsageReport, user_message};
use crate::output::{MAX_TOOL_INPUT_BYTES, MAX_TOOL_NAME_BYTES, StreamParser};
use crate::pb::{ApprovalDecision, MessageKind, TaskMessageInput, TaskUsage};

/// The daemon's defaults for Claude tasks.
#[derive(Debug, Clone, Default)]
pub(crate) struct Settings {
    /// The `claude` executable.
    pub binary: String,
    /// For tasks that name none.
    pub model: Option<String>,
    pub permission_mode: Option<String>,
    /// `--allowedTools`: tools that never ask.
    pub allowed_tools: Option<String>,
}

/// Permission requests remembered for their answer; more are refused.
const MAX_PENDING_REQUESTS: usize = 256;

pub(crate) struct Claude {
    settings: Settings,
    parser: StreamParser,
    /// Prompts written whose `result` has not come yet.
    open_turns: usize,
    stdin_closed: bool,
    /// request id → the tool input asked for (an allow sends it back).
    pending: HashMap<String, Value>,
    error: Option<String>,
    model: Option<String>,
    next_request: u64,
}

impl Claude {
    pub(crate) fn new(settings: Settings) -> Self {
        Self {
            settings,
            parser: StreamParser::default(),
            open_turns: 0,
            stdin_closed: false,
            pending: HashMap::new(),
            error: None,
            model: None,
            next_request: 0,
        }
    }

    fn request_id(&mut self, what: &str) -> String {
        self.next_request += 1;
        format!("taskmesh_{what}_{}", self.next_request)
    }

    fn user_line(&mut self, text: &str) -> String {
        self.open_turns += 1;
        json!({
            "type": "user",
            "message": {"role": "user", "content": text},
            "parent_tool_use_id": null,
            "session_id": "default",
        })
        .to_string()
    }

    /// A `control_request` from Claude: a permission request becomes an
    /// approval; anything else is answered with an error, as the Agent SDK
    /// does for subtypes it does not handle.
    fn control_request(&mut self, v: &Value) -> Reading {
        let request_id = v
            .get("request_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let request = v.get("request").cloned().unwrap_or(Value::Null);
        let subtype = request.get("subtype").and_then(Value::as_str);
        if subtype == Some("can_use_tool") && !request_id.is_empty() {
            if self.pending.len() >= MAX_PENDING_REQUESTS {
                return Reading {
                    replies: vec![control_error(&request_id, "too many pending requests")],
                    ..Reading::default()
                };
            }
            let tool = request
                .get("tool_name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let tool = tool[..tool.floor_char_boundary(MAX_TOOL_NAME_BYTES)].to_owned();
            let input = request.get("input").cloned().unwrap_or(json!({}));
            let mut input_json = input.to_string();
            if input_json.len() > MAX_TOOL_INPUT_BYTES {
                input_json = json!({"truncated": true, "bytes": input_json.len()}).to_string();
            }
            self.pending.insert(request_id.clone(), input);
            let message = TaskMessageInput {
                kind: MessageKind::Approval as i32,
                content: format!("Claude asks to use {tool}"),
                tool_name: tool,
                tool_input_json: input_json,
                request_id,
                seq: 0,
            };
            return Reading {
                messages: vec![message],
                ..Reading::default()
            };
        }
        let what = subtype.unwrap_or("(none)");
        Reading {
            replies: vec![control_error(
                &request_id,
                &format!("unsupported control request subtype: {what}"),
            )],
            ..Reading::default()
        }
    }

    /// A turn's `result`: usage and cost, an error, and whether stdin can
    /// close now.
    fn result(&mut self, v: &Value) -> Reading {
        let mut reading = Reading::default();
        if let Some(id) = v.get("session_id").and_then(Value::as_str) {
            self.parser.session_id = Some(id.to_owned());
        }
        let text = v.get("result").and_then(Value::as_str).unwrap_or_default();
        if v.get("is_error").and_then(Value::as_bool) == Some(true) {
            let subtype = v.get("subtype").and_then(Value::as_str).unwrap_or("error");
            let reason = if text.is_empty() {
                format!("Claude ended its turn with {subtype}")
            } else {
                text.to_owned()
            };
            reading.messages.push(TaskMessageInput {
                kind: MessageKind::Stderr as i32,
                content: reason.clone(),
                ..Default::default()
            });
            self.error = Some(reason);
        } else {
            self.error = None;
            if !text.is_empty() {
                self.parser.last_result = Some(text.to_owned());
            }
        }
        reading.usage = Some(usage_of(v, self.model.as_deref()));
        self.open_turns = self.open_turns.saturating_sub(1);
        if self.open_turns == 0 && !self.stdin_closed {
            self.stdin_closed = true;
            reading.close_stdin = true;
        }
        reading
    }
}

impl Agent for Claude {
    fn command(&self, turn: &Turn, _dir: &Path) -> Command {
        let mut cmd = Command::new(&self.settings.binary);
        cmd.args([
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
            "--permission-prompt-tool",
            "stdio",
        ]);
        let model = Some(turn.model.as_str())
            .filter(|m| !m.is_empty())
            .or(self.settings.model.as_deref());
        if let Some(model) = model {
            cmd.args(["--model", model]);
        }
        let mode = Some(turn.permission_mode.as_str())
            .filter(|m| !m.is_empty())
            .or(self.settings.permission_mode.as_deref());
        if let Some(mode) = mode {
            cmd.args(["--permission-mode", mode]);
        }
        // Its own taskmesh tools need no approval: they reach only its
        // task's tree.
        let allowed = match (&self.settings.allowed_tools, &turn.tools) {
            (Some(tools), Some(_)) => Some(format!("{tools},mcp__{}", super::TOOLS_NAME)),
            (Some(tools), None) => Some(tools.clone()),
            (None, Some(_)) => Some(format!("mcp__{}", super::TOOLS_NAME)),
            (None, None) => None,
        };
        if let Some(tools) = &allowed {
            cmd.args(["--allowedTools", tools]);
        }
        if let Some(tools) = &turn.tools {
            cmd.arg("--mcp-config").arg(&tools.config_file);
        }
        if let Some(id) = &turn.resume_session_id {
            cmd.args(["--resume", id]);
        }
        cmd
    }

    fn opening(&mut self, turn: &Turn) -> (Vec<String>, Vec<TaskMessageInput>) {
        let initialize = json!({
            "type": "control_request",
            "request_id": self.request_id("init"),
            "request": {"subtype": "initialize", "hooks": null},
        })
        .to_string();
        // An attempt that cannot resume the conversation gets what the
        // earlier attempts printed, ahead of its prompt.
        let prompt = if turn.resume_session_id.is_none() && !turn.context.is_empty() {
            format!(
                "An earlier attempt at this task printed:\n\n{}\n\n{}",
                turn.context, turn.prompt
            )
        } else {
            turn.prompt.clone()
        };
        let first = self.user_line(&prompt);
        (vec![initialize, first], vec![user_message(&turn.prompt)])
    }

    fn follow_up(&mut self, text: &str) -> Result<(String, TaskMessageInput), String> {
        if self.stdin_closed {
            return Err(
                "Claude finished its turns and is exiting; continue the task with a new prompt \
                 (taskmesh task continue)"
                    .into(),
            );
        }
        Ok((self.user_line(text), user_message(text)))
    }

    fn read_line(&mut self, line: &str) -> Reading {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            return Reading {
                messages: self.parser.parse(line),
                ..Reading::default()
            };
        };
        match v.get("type").and_then(Value::as_str) {
            Some("control_request") => self.control_request(&v),
            // Answers to our initialize and interrupt requests.
            Some("control_response") => Reading::default(),
            Some("control_cancel_request") => {
                if let Some(id) = v.get("request_id").and_then(Value::as_str) {
                    self.pending.remove(id);
                }
                Reading::default()
            }
            Some("result") => self.result(&v),
            Some(kind) => {
                if kind == "system"
                    && let Some(model) = v.get("model").and_then(Value::as_str)
                {
                    self.model = Some(model.to_owned());
                }
                Reading {
                    messages: self.parser.parse(line),
                    ..Reading::default()
                }
            }
            None => Reading {
                messages: self.parser.parse(line),
                ..Reading::default()
            },
        }
    }

    fn decide(&mut self, decision: &ApprovalDecision) -> Result<String, String> {
        let Some(asked) = self.pending.remove(&decision.request_id) else {
            return Err(format!(
                "Claude has no pending permission request {}",
                decision.request_id
            ));
        };
        let response = if decision.allow {
            let input = if decision.updated_input_json.is_empty() {
                asked
            } else {
                serde_json::from_str(&decision.updated_input_json)
                    .map_err(|e| format!("updated input is not JSON: {e}"))?
            };
            json!({"behavior": "allow", "updatedInput": input})
        } else {
            let message = if decision.message.is_empty() {
                "The user denied this."
            } else {
                decision.message.as_str()
            };
            json!({"behavior": "deny", "message": message})
        };
        Ok(json!({
            "type": "control_response",
            "response": {
                "subtype": "success",
                "request_id": decision.request_id,
                "response": response,
            },
        })
        .to_string())
    }

    fn interrupt(&mut self) -> Option<String> {
        Some(
            json!({
                "type": "control_request",
                "request_id": self.request_id("interrupt"),
                "request": {"subtype": "interrupt"},
            })
            .to_string(),
        )
    }

    fn end(&mut self) -> AgentEnd {
        AgentEnd {
            summary: self.parser.last_result.take(),
            error: self.error.take(),
            session_id: self.parser.session_id.take(),
        }
    }
}

fn control_error(request_id: &str, error: &str) -> String {
    json!({
        "type": "control_response",
        "response": {"subtype": "error", "request_id": request_id, "error": error},
    })
    .to_string()
}

/// Usage totals from a `result` line: per model from `modelUsage` when
/// Claude gives it, else its `usage` under the session's model.
fn usage_of(v: &Value, model: Option<&str>) -> UsageReport {
    let int = |v: Option<&Value>| v.and_then(Value::as_i64).unwrap_or(0).max(0);
    let mut usage: Vec<TaskUsage> = v
        .get("modelUsage")
        .and_then(Value::as_object)
        .map(|models| {
            models
                .iter()
                .take(64)
                .map(|(name, u)| TaskUsage {
                    provider: "anthropic".into(),
                    model: name[..name.floor_char_boundary(256)].to_owned(),
                    input_tokens: int(u.get("inputTokens")),
                    output_tokens: int(u.get("outputTokens")),
                    cache_read_tokens: int(u.get("cacheReadInputTokens")),
                    cache_write_tokens: int(u.get("cacheCreationInputTokens")),
                })
                .collect()
        })
        .unwrap_or_default();
    if usage.is_empty()
        && let Some(u) = v.get("usage")
    {
        usage.push(TaskUsage {
            provider: "anthropic".into(),
            model: model.unwrap_or("unknown").to_owned(),
            input_tokens: int(u.get("input_tokens")),
            output_tokens: int(u.get("output_tokens")),
            cache_read_tokens: int(u.get("cache_read_input_tokens")),
            cache_write_tokens: int(u.get("cache_creation_input_tokens")),
        });
    }
    let cost = v
        .get("total_cost_usd")
        .and_then(Value::as_f64)
        .filter(|c| c.is_finite() && *c >= 0.0)
        .unwrap_or(0.0);
    let turns = v
        .get("num_turns")
        .and_then(Value::as_i64)
        .map_or(0, |t| t.clamp(0, i64::from(i32::MAX)) as i32);
    UsageReport {
        usage,
        cost_usd: cost,
        turns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claude() -> Claude {
        Claude::new(Settings {
            binary: "claude".into(),
            ..Settings::default()
        })
    }

    #[test]
    fn turns_close_stdin_once_every_prompt_has_its_result() {
        let mut c = claude();
        let (lines, transcript) = c.opening(&Turn {
            prompt: "fix it".into(),
            ..Turn::default()
        });
        assert_eq!(lines.len(), 2);
        assert!(lines[0].contains(r#""subtype":"initialize""#));
        let user: Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(user["message"]["content"], "fix it");
        assert_eq!(transcript[0].kind, MessageKind::User as i32);
        let (_, said) = c.follow_up("and the tests").unwrap();
        assert_eq!(said.content, "and the tests");
        let result = r#"{"type":"result","subtype":"success","is_error":false,"result":"ok","session_id":"s1","num_turns":2,"total_cost_usd":0.5,"modelUsage":{"claude-sonnet-4-5":{"inputTokens":10,"outputTokens":3,"cacheReadInputTokens":1,"cacheCreationInputTokens":2,"costUSD":0.5}}}"#;
        let first = c.read_line(result);
        assert!(!first.close_stdin, "a follow-up is still open");
        let usage = first.usage.unwrap();
        assert_eq!((usage.cost_usd, usage.turns), (0.5, 2));
        assert_eq!(usage.usage[0].model, "claude-sonnet-4-5");
        assert_eq!(usage.usage[0].cache_write_tokens, 2);
        assert!(c.read_line(result).close_stdin);
        assert!(c.follow_up("late").is_err());
        let end = c.end();
        assert_eq!(end.summary.as_deref(), Some("ok"));
        assert_eq!(end.session_id.as_deref(), Some("s1"));
        assert!(end.error.is_none());
    }

    #[test]
    fn permission_requests_become_approvals_and_decisions_answer_them() {
        let mut c = claude();
        let asked = c.read_line(
            r#"{"type":"control_request","request_id":"r1","request":{"subtype":"can_use_tool","tool_name":"Bash","input":{"command":"rm -rf build"}}}"#,
        );
        let m = &asked.messages[0];
        assert_eq!(m.kind, MessageKind::Approval as i32);
        assert_eq!(
            (m.request_id.as_str(), m.tool_name.as_str()),
            ("r1", "Bash")
        );
        let allow = c
            .decide(&ApprovalDecision {
                request_id: "r1".into(),
                allow: true,
                ..Default::default()
            })
            .unwrap();
        let v: Value = serde_json::from_str(&allow).unwrap();
        assert_eq!(v["type"], "control_response");
        assert_eq!(v["response"]["request_id"], "r1");
        assert_eq!(v["response"]["response"]["behavior"], "allow");
        assert_eq!(
            v["response"]["response"]["updatedInput"]["command"],
            "rm -rf build"
        );
        assert!(
            c.decide(&ApprovalDecision {
                request_id: "r1".into(),
                ..Default::default()
            })
            .is_err(),
            "answered once"
        );
        c.read_line(r#"{"type":"control_request","request_id":"r2","request":{"subtype":"can_use_tool","tool_name":"Write","input":{}}}"#);
        let deny = c
            .decide(&ApprovalDecision {
                request_id: "r2".into(),
                allow: false,
                message: "not today".into(),
                ..Default::default()
            })
            .unwrap();
        let v: Value = serde_json::from_str(&deny).unwrap();
        assert_eq!(v["response"]["response"]["behavior"], "deny");
        assert_eq!(v["response"]["response"]["message"], "not today");
        let other = c.read_line(
            r#"{"type":"control_request","request_id":"r3","request":{"subtype":"mcp_message"}}"#,
        );
        assert!(other.replies[0].contains(r#""subtype":"error""#));
    }

    #[test]
    fn an_error_result_fails_the_run() {
        let mut c = claude();
        c.opening(&Turn::default());
        let r = c.read_line(
            r#"{"type":"result","subtype":"error_during_execution","is_error":true,"result":"API overloaded","usage":{"input_tokens":5,"output_tokens":0}}"#,
        );
        assert!(r.close_stdin);
        assert_eq!(r.usage.unwrap().usage[0].input_tokens, 5);
        assert_eq!(c.end().error.as_deref(), Some("API overloaded"));
    }
}
