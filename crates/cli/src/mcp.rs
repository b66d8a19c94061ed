//! `taskmesh mcp`: an agent's taskmesh tools as a Model Context Protocol
//! server on stdin/stdout (JSON-RPC 2.0, one message a line), which the
//! daemon names in Claude Code's and Codex's MCP configuration. It acts
//! with the agent's own task token, so what it can reach is the agent's
//! task tree (`domain::agents` on the server).
//!
//! It answers `initialize`, `ping`, `tools/list` and `tools/call`;
//! notifications need no answer.

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::{CliError, Connection, Result, ServerArgs, format, pb};

/// Longest request line read; a longer one is answered with an error.
const MAX_LINE_BYTES: u64 = 1 << 20;
/// Most output a `task_output` call returns.
const MAX_OUTPUT_BYTES: usize = 64 * 1024;
const PROTOCOL_VERSION: &str = "2025-06-18";

/// Options of `taskmesh mcp`.
#[derive(clap::Args)]
pub struct McpArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// A file holding the token (its first line); the daemon writes the
    /// agent's task token there, out of the command line.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
}

/// Serves MCP on stdin/stdout until stdin ends.
pub async fn run(mut args: McpArgs) -> Result<()> {
    if let Some(path) = &args.token_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CliError::Failed(format!("cannot read {}: {e}", path.display())))?;
        args.server.token = text.lines().next().map(str::to_owned);
    }
    let conn = args.server.connect().await?;
    let mut input = BufReader::new(tokio::io::stdin());
    let mut output = tokio::io::stdout();
    loop {
        let mut line = String::new();
        let read = (&mut input)
            .take(MAX_LINE_BYTES + 1)
            .read_line(&mut line)
            .await?;
        if read == 0 {
            return Ok(());
        }
        let answer = if line.len() as u64 > MAX_LINE_BYTES {
            // Skip the rest of the oversized line.
            let mut rest = Vec::new();
            input.read_until(b'\n', &mut rest).await?;
            Some(error(Value::Null, -32600, "request over 1 MiB"))
        } else if line.trim().is_empty() {
            None
        } else {
            match serde_json::from_str::<Value>(&line) {
                Ok(request) => handle(&conn, request).await,
                Err(e) => Some(error(Value::Null, -32700, &format!("not JSON: {e}"))),
            }
        };
        if let Some(answer) = answer {
            let mut text = answer.to_string();
            text.push('\n');
            output.write_all(text.as_bytes()).await?;
            output.flush().await?;
        }
    }
}

fn error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

/// The answer to one message; `None` for a notification.
async fn handle(conn: &Connection, request: Value) -> Option<Value> {
    let id = request.get("id").cloned()?;
    let method = request.get("method").and_then(Value::as_str).unwrap_or("");
    let params = request.get("params").cloned().unwrap_or(Value::Null);
    let result = match method {
        "initialize" => json!({
            "protocolVersion": params.get("protocolVersion").and_then(Value::as_str)
                .unwrap_or(PROTOCOL_VERSION),
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "taskmesh", "version": env!("CARGO_PKG_VERSION")},
            "instructions": "Split your task into subtasks that run on other machines: \
                create_subtask starts one under your task; task_output reads what it printed; \
                you are told on your input when a subtask starts or ends.",
        }),
        "ping" => json!({}),
        "tools/list" => json!({"tools": tools()}),
        "tools/call" => {
            let name = params.get("name").and_then(Value::as_str).unwrap_or("");
            let arguments = params.get("arguments").cloned().unwrap_or(json!({}));
            let (text, failed) = match call(conn, name, &arguments).await {
                Ok(text) => (text, false),
                Err(e) => (e.to_string(), true),
            };
            json!({"content": [{"type": "text", "text": text}], "isError": failed})
        }
        _ => return Some(error(id, -32601, &format!("no method {method:?}"))),
    };
    Some(json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

fn tools() -> Value {
    let id = json!({"type": "string", "description": "The task's id."});
    let only_id = json!({"type": "object", "properties": {"id": id}, "required": ["id"]});
    json!([
        {
            "name": "create_subtask",
            "description": "Create a subtask under your task and (unless start is false) queue it for a daemon. Answers its id.",
            "inputSchema": {"type": "object", "properties": {
                "name": {"type": "string", "description": "A short name."},
                "plan": {"type": "string", "description": "The prompt for its agent (for the shell runtime: the script)."},
                "runtime": {"type": "string", "description": "claude, codex or shell (the default)."},
                "start": {"type": "boolean", "description": "Queue it now (default true)."}
            }, "required": ["name", "plan"]}
        },
        {
            "name": "list_subtasks",
            "description": "Your task's subtasks (or another task's below yours), with their states.",
            "inputSchema": {"type": "object", "properties": {
                "parent": {"type": "string", "description": "A task below yours; yours when omitted."}
            }}
        },
        {"name": "get_task", "description": "A task's fields, state and subtasks.", "inputSchema": only_id},
        {
            "name": "task_output",
            "description": "What a task printed, from after since_seq (64 KiB at most; call again from the last seq for more).",
            "inputSchema": {"type": "object", "properties": {
                "id": id, "since_seq": {"type": "integer", "description": "0 for the start."}
            }, "required": ["id"]}
        },
        {"name": "start_task", "description": "Queue a subtask (again).", "inputSchema": only_id},
        {"name": "stop_task", "description": "Stop a subtask.", "inputSchema": only_id},
        {
            "name": "send_message",
            "description": "Send a running subtask's agent a message.",
            "inputSchema": {"type": "object", "properties": {
                "id": id, "text": {"type": "string"}
            }, "required": ["id", "text"]}
        }
    ])
}

fn arg<'a>(arguments: &'a Value, name: &str) -> Result<&'a str> {
    arguments
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| CliError::Failed(format!("{name} is required (a string)")))
}

async fn call(conn: &Connection, tool: &str, a: &Value) -> Result<String> {
    let mut tasks = conn.tasks();
    let id = || arg(a, "id").map(str::to_owned);
    match tool {
        "create_subtask" => {
            let task = tasks
                .create_task(pb::CreateTaskRequest {
                    name: arg(a, "name")?.into(),
                    plan: arg(a, "plan")?.into(),
                    runtime: a
                        .get("runtime")
                        .and_then(Value::as_str)
                        .unwrap_or("shell")
                        .into(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .task
                .ok_or(CliError::Incomplete("task"))?;
            if a.get("start").and_then(Value::as_bool).unwrap_or(true) {
                tasks
                    .start_task(pb::StartTaskRequest {
                        id: task.id.clone(),
                        daemon_id: String::new(),
                    })
                    .await?;
                return Ok(format!("created and queued subtask {}", task.id));
            }
            Ok(format!("created subtask {}", task.id))
        }
        "list_subtasks" => {
            let listed = tasks
                .list_tasks(pb::ListTasksRequest {
                    parent_task_id: a.get("parent").and_then(Value::as_str).unwrap_or("").into(),
                    page_size: 1000,
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok(format::task_table(&listed.tasks, format::now()))
        }
        "get_task" => {
            let task = tasks
                .get_task(pb::GetTaskRequest { id: id()? })
                .await?
                .into_inner()
                .task
                .ok_or(CliError::Incomplete("task"))?;
            let usage = pb::GetTaskUsageResponse::default();
            Ok(format::task_details(&task, &usage, format::now()))
        }
        "task_output" => {
            let since_seq = a.get("since_seq").and_then(Value::as_i64).unwrap_or(0);
            let page = tasks
                .list_task_messages(pb::ListTaskMessagesRequest {
                    task_id: id()?,
                    since_seq,
                    limit: 1000,
                })
                .await?
                .into_inner();
            let mut out = String::new();
            let mut last = since_seq;
            for m in &page.messages {
                if out.len() + m.content.len() > MAX_OUTPUT_BYTES {
                    out.push_str(&format!("(more after seq {last})\n"));
                    return Ok(out);
                }
                out.push_str(&m.content);
                out.push('\n');
                last = m.seq;
            }
            if page.messages.is_empty() {
                out.push_str("(no output after this seq yet)\n");
            }
            Ok(out)
        }
        "start_task" => {
            tasks
                .start_task(pb::StartTaskRequest {
                    id: id()?,
                    daemon_id: String::new(),
                })
                .await?;
            Ok("queued".into())
        }
        "stop_task" => {
            tasks.stop_task(pb::StopTaskRequest { id: id()? }).await?;
            Ok("stopping".into())
        }
        "send_message" => {
            tasks
                .send_message(pb::SendMessageRequest {
                    task_id: id()?,
                    text: arg(a, "text")?.into(),
                })
                .await?;
            Ok("sent".into())
        }
        other => Err(CliError::Failed(format!("no tool {other:?}"))),
    }
}
