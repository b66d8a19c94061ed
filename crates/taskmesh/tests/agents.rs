//! Claude Code and Codex end to end, through a real server and a real
//! `taskmesh daemon --runtime claude|codex` process, on SQLite and
//! PostgreSQL. The agents are the stand-ins in tests/standins/, which speak
//! Claude Code's stream-json protocol both ways and `codex exec --json`'s
//! events, and refuse what the real CLIs refuse. Claude:
//! typed output, usage and cost per model, a follow-up answered by the same
//! process, StopTask asking Claude first, permission requests approved,
//! denied and timed out, an error result failing the task, ContinueTask
//! resuming the same session in the same directory. Codex: a command
//! execution, usage, a failed turn, resume. And missing binaries not
//! offered.

use taskmesh_testkit as common;
use taskmesh_testkit::both_backends;

use std::path::PathBuf;
use std::time::Duration;

use common::process::{DaemonProcess, TempDir};
use common::watch::{PATIENCE, Watch};
use common::{Backend, Tasks, TestDb, TestServer, start_server, start_server_with};
use taskmesh_server::domain::Liveness;
use taskmesh_server::model::TokenKind;
use taskmesh_server::pb::{self, MessageKind, TaskStatus};

fn standin(agent: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/standins")
        .join(agent)
        .display()
        .to_string()
}

/// A daemon offering `claude` or `codex` (the stand-in), with the
/// stand-in's sessions and its log of command lines in a directory of its
/// own.
struct Agent {
    name: &'static str,
    daemon: DaemonProcess,
    home: TempDir,
}

impl Agent {
    async fn start(s: &TestServer, name: &'static str, extra: &[&str]) -> Agent {
        let token = s.token_in("default", TokenKind::Daemon).await;
        let home = TempDir::new("agent-home");
        let bin = standin(name);
        let bin_flag = format!("--{name}-bin");
        let mut flags = vec!["--runtime", name, bin_flag.as_str(), &bin];
        flags.extend_from_slice(extra);
        let home_dir = home.0.display().to_string();
        let log = home.0.join(format!("{name}.jsonl")).display().to_string();
        let (home_var, log_var) = match name {
            "claude" => ("CLAUDE_STANDIN_HOME", "CLAUDE_STANDIN_LOG"),
            _ => ("CODEX_STANDIN_HOME", "CODEX_STANDIN_LOG"),
        };
        let daemon = DaemonProcess::start_with_env(
            &s.url(),
            &token,
            &flags,
            &[(home_var, &home_dir), (log_var, &log)],
        );
        Agent { name, daemon, home }
    }

    /// Each start of the stand-in: its arguments and working directory.
    fn starts(&self) -> Vec<(Vec<String>, String)> {
        std::fs::read_to_string(self.home.0.join(format!("{}.jsonl", self.name)))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let args = v["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_owned())
                    .collect();
                (args, v["cwd"].as_str().unwrap().to_owned())
            })
            .collect()
    }
}

async fn claude_task(tasks: &mut Tasks, plan: &str, model: &str) -> pb::Task {
    agent_task(tasks, "claude", plan, model).await
}

async fn agent_task(tasks: &mut Tasks, runtime: &str, plan: &str, model: &str) -> pb::Task {
    let task = tasks
        .create_task(pb::CreateTaskRequest {
            name: plan.into(),
            plan: plan.into(),
            runtime: runtime.into(),
            model: model.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    tasks
        .start_task(pb::StartTaskRequest {
            id: task.id.clone(),
            daemon_id: String::new(),
        })
        .await
        .unwrap();
    task
}

fn said(watch: &Watch) -> Vec<(MessageKind, String)> {
    watch
        .messages
        .iter()
        .map(|m| (m.kind(), m.content.clone()))
        .collect()
}

/// The task's usage: (model, input, output, cache read, cache write) per
/// model, and the cost and turns.
async fn usage(tasks: &mut Tasks, id: &str) -> (Vec<(String, i64, i64, i64, i64)>, f64, i32) {
    let usage = tasks
        .get_task_usage(pb::GetTaskUsageRequest { task_id: id.into() })
        .await
        .unwrap()
        .into_inner();
    let per_model = usage
        .usage
        .iter()
        .map(|u| {
            (
                u.model.clone(),
                u.input_tokens,
                u.output_tokens,
                u.cache_read_tokens,
                u.cache_write_tokens,
            )
        })
        .collect();
    (per_model, usage.cost_usd, usage.turns)
}

/// The value after `flag` in a command line.
fn arg<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// A tool call, typed output, usage and cost per model; then ContinueTask
/// resumes the same conversation, in the same directory.
async fn a_claude_task_runs_and_continues(backend: Backend) {
    let s = start_server(backend).await;
    let claude = Agent::start(
        &s,
        "claude",
        &["--claude-permission-mode", "bypassPermissions"],
    )
    .await;
    let mut tasks = s.tasks().await;
    let task = claude_task(&mut tasks, "run: ls", "claude-opus-4-1").await;
    let mut watch = Watch::open(&mut tasks, &task.id, 0).await;
    let done = watch.until_status(TaskStatus::Completed).await;
    let kinds: Vec<MessageKind> = said(&watch).into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        kinds,
        [
            MessageKind::User,
            MessageKind::System,
            MessageKind::ToolUse,
            MessageKind::ToolResult,
            MessageKind::Assistant
        ],
        "{:?}",
        said(&watch)
    );
    let tool = &watch.messages[2];
    assert_eq!(tool.tool_name, "Bash");
    assert_eq!(tool.tool_input_json, r#"{"command":"ls"}"#);
    assert!(watch.messages[4].content.starts_with("Done: ran ls"));
    assert!(done.agent_session_id.len() > 8, "{done:?}");

    let (per_model, cost, turns) = usage(&mut tasks, &task.id).await;
    assert_eq!(per_model, [("claude-opus-4-1".into(), 100, 20, 5, 10)]);
    assert_eq!((cost, turns), (0.0125, 1));
    // `task watch` ends with the usage per model and the cost.
    let watched = std::process::Command::new(common::process::bin())
        .args([
            "task",
            "watch",
            &task.id,
            "--server",
            &s.url(),
            "--token",
            &s.token,
        ])
        .output()
        .unwrap();
    assert!(watched.status.success(), "{watched:?}");
    let stderr = String::from_utf8_lossy(&watched.stderr);
    assert!(
        stderr.contains("usage: claude-opus-4-1: 100 input, 20 output, 5 cache read, 10 cache write tokens; cost $0.0125 over 1 turns"),
        "{stderr}"
    );

    let starts = claude.starts();
    let (args, first_dir) = &starts[0];
    assert_eq!(arg(args, "--model"), Some("claude-opus-4-1"));
    assert_eq!(arg(args, "--permission-mode"), Some("bypassPermissions"));
    assert_eq!(arg(args, "--input-format"), Some("stream-json"));
    assert_eq!(arg(args, "--resume"), None);

    // A follow-up prompt later: the same session, the same directory.
    tasks
        .continue_task(pb::ContinueTaskRequest {
            id: task.id.clone(),
            prompt: "what did I ask?".into(),
            daemon_id: String::new(),
        })
        .await
        .unwrap();
    let mut watch = Watch::open(&mut tasks, &task.id, done.last_seq).await;
    let again = watch
        .until("the continued attempt's end", |t, _| {
            t.attempt == 2 && t.status == TaskStatus::Completed as i32
        })
        .await;
    let answer = said(&watch)
        .into_iter()
        .rfind(|(k, _)| *k == MessageKind::Assistant)
        .unwrap()
        .1;
    assert!(
        answer.contains("earlier you said: run: ls"),
        "the conversation was lost: {answer}"
    );
    let starts = claude.starts();
    let (args, dir) = &starts[1];
    assert_eq!(arg(args, "--resume"), Some(done.agent_session_id.as_str()));
    assert_eq!(dir, first_dir);
    assert_eq!(again.agent_session_id, done.agent_session_id);
    claude.daemon.stop().await;
    s.stop().await;
}

/// The pid an answer names.
fn pid_in(text: &str) -> &str {
    text.split("(pid ")
        .nth(1)
        .and_then(|t| t.split(')').next())
        .unwrap_or_else(|| panic!("no pid in {text:?}"))
}

/// A message sent while Claude works is a user message on its stdin: the
/// same process answers it, the transcript shows it, and the task ends once
/// both turns are done.
async fn a_follow_up_reaches_the_same_process(backend: Backend) {
    let s = start_server(backend).await;
    let claude = Agent::start(&s, "claude", &[]).await;
    let mut tasks = s.tasks().await;
    let task = claude_task(&mut tasks, "hold", "").await;
    let mut watch = Watch::open(&mut tasks, &task.id, 0).await;
    watch
        .until_message("the agent holding", |m| m.content.starts_with("holding"))
        .await;
    tasks
        .send_message(pb::SendMessageRequest {
            task_id: task.id.clone(),
            text: "one more thing".into(),
        })
        .await
        .unwrap();
    watch.until_status(TaskStatus::Completed).await;
    let messages = said(&watch);
    let holding = &messages
        .iter()
        .find(|(_, t)| t.starts_with("holding"))
        .unwrap()
        .1;
    let follow_up = messages
        .iter()
        .position(|m| *m == (MessageKind::User, "one more thing".to_owned()))
        .expect("the follow-up is in the transcript");
    let answer = &messages[follow_up + 1..]
        .iter()
        .find(|(k, _)| *k == MessageKind::Assistant)
        .expect("an answer")
        .1;
    assert!(answer.starts_with("You said: one more thing"), "{answer}");
    assert_eq!(
        pid_in(answer),
        pid_in(holding),
        "answered by another process"
    );
    assert_eq!(claude.starts().len(), 1);
    let (_, cost, turns) = usage(&mut tasks, &task.id).await;
    assert_eq!((cost, turns), (0.025, 2));
    claude.daemon.stop().await;
    s.stop().await;
}

/// StopTask asks Claude to stop in its own protocol (an interrupt
/// control request): it ends its turn and exits long before the grace
/// (60 s here) would have it signalled, and the task is cancelled.
async fn stop_asks_claude_first(backend: Backend) {
    let s = start_server(backend).await;
    let claude = Agent::start(&s, "claude", &["--interrupt-grace-secs", "60"]).await;
    let mut tasks = s.tasks().await;
    let task = claude_task(&mut tasks, "hold", "").await;
    let mut watch = Watch::open(&mut tasks, &task.id, 0).await;
    watch
        .until_message("the agent holding", |m| m.content.starts_with("holding"))
        .await;
    tasks
        .stop_task(pb::StopTaskRequest {
            id: task.id.clone(),
        })
        .await
        .unwrap();
    let stopped = tokio::time::timeout(
        Duration::from_secs(30),
        watch.until_status(TaskStatus::Cancelled),
    )
    .await
    .expect("Claude stopped when asked, before any signal");
    assert_eq!(stopped.status(), TaskStatus::Cancelled);
    claude.daemon.stop().await;
    s.stop().await;
}

/// Waits for the task's approval request; answers its id.
async fn approval_of(watch: &mut Watch) -> pb::TaskMessage {
    watch
        .until_message("a permission request", |m| {
            m.kind() == MessageKind::Approval
        })
        .await;
    watch
        .messages
        .iter()
        .find(|m| m.kind() == MessageKind::Approval)
        .cloned()
        .unwrap()
}

/// In Claude's default mode a tool call asks; the request reaches a
/// person as an approval, and the answer (allow, deny with a message, or
/// none before the timeout) reaches Claude.
async fn permissions_reach_a_person(backend: Backend) {
    let liveness = Liveness {
        heartbeat: Duration::from_millis(200),
        approval_timeout: Duration::from_secs(2),
        ..Liveness::default()
    };
    let s = start_server_with(TestDb::new(backend).await, liveness).await;
    let claude = Agent::start(&s, "claude", &[]).await;
    let mut tasks = s.tasks().await;
    for (plan, decision, expect) in [
        (
            "run: rm -rf build",
            Some(pb::Decision::Allow),
            "Done: ran rm -rf build",
        ),
        (
            "run: curl evil.example",
            Some(pb::Decision::Deny),
            "Not allowed: not on my watch",
        ),
        ("run: sleep 1", None, "Not allowed: "),
    ] {
        let task = claude_task(&mut tasks, plan, "").await;
        let mut watch = Watch::open(&mut tasks, &task.id, 0).await;
        let asked = approval_of(&mut watch).await;
        assert_eq!(asked.tool_name, "Bash");
        assert!(asked.tool_input_json.contains(&plan["run: ".len()..]));
        let waiting = tasks
            .get_task(pb::GetTaskRequest {
                id: task.id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        assert_eq!(waiting.pending_approvals, 1, "{plan}");
        if let Some(decision) = decision {
            tasks
                .decide_approval(pb::DecideApprovalRequest {
                    task_id: task.id.clone(),
                    decision: decision as i32,
                    message: "not on my watch".into(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        watch.until_status(TaskStatus::Completed).await;
        let last = said(&watch)
            .into_iter()
            .rfind(|(k, _)| *k == MessageKind::Assistant)
            .unwrap()
            .1;
        assert!(last.starts_with(expect), "{plan}: {last}");
    }
    claude.daemon.stop().await;
    s.stop().await;
}

/// A result with is_error fails the task with Claude's reason.
async fn an_error_result_fails_the_task(backend: Backend) {
    let s = start_server(backend).await;
    let claude = Agent::start(&s, "claude", &[]).await;
    let mut tasks = s.tasks().await;
    let task = claude_task(&mut tasks, "fail", "").await;
    let mut watch = Watch::open(&mut tasks, &task.id, 0).await;
    let failed = watch.until_status(TaskStatus::Failed).await;
    assert!(
        failed.status_reason.contains("the API is overloaded"),
        "{failed:?}"
    );
    claude.daemon.stop().await;
    s.stop().await;
}

/// Codex in exec mode: a command execution with its output and exit code,
/// usage for the task's model, a failed turn failing the task, and
/// ContinueTask resuming the thread in the same directory.
async fn a_codex_task_runs_and_continues(backend: Backend) {
    let s = start_server(backend).await;
    let codex = Agent::start(&s, "codex", &[]).await;
    let mut tasks = s.tasks().await;
    let task = agent_task(&mut tasks, "codex", "run: echo hello", "gpt-5-codex").await;
    let mut watch = Watch::open(&mut tasks, &task.id, 0).await;
    let done = watch.until_status(TaskStatus::Completed).await;
    assert_eq!(
        said(&watch),
        [
            (MessageKind::User, "run: echo hello".to_owned()),
            (MessageKind::System, "**Reading the prompt**".to_owned()),
            (MessageKind::ToolUse, "echo hello".to_owned()),
            (MessageKind::ToolResult, "hello\n(exit code 0)".to_owned()),
            (MessageKind::Assistant, "Ran echo hello: exit 0".to_owned()),
        ]
    );
    assert_eq!(
        watch.messages[2].tool_input_json,
        r#"{"command":"echo hello"}"#
    );
    let (per_model, _, _) = usage(&mut tasks, &task.id).await;
    assert_eq!(per_model, [("gpt-5-codex".into(), 200, 30, 50, 0)]);

    tasks
        .continue_task(pb::ContinueTaskRequest {
            id: task.id.clone(),
            prompt: "what did I ask?".into(),
            daemon_id: String::new(),
        })
        .await
        .unwrap();
    let mut watch = Watch::open(&mut tasks, &task.id, done.last_seq).await;
    watch
        .until("the continued attempt's end", |t, _| {
            t.attempt == 2 && t.status == TaskStatus::Completed as i32
        })
        .await;
    let answer = said(&watch)
        .into_iter()
        .rfind(|(k, _)| *k == MessageKind::Assistant)
        .unwrap()
        .1;
    assert!(
        answer.contains("earlier you said: run: echo hello"),
        "{answer}"
    );
    let starts = codex.starts();
    let resumed = &starts[1].0;
    let at = resumed.iter().position(|a| a == "resume").expect("resume");
    assert_eq!(resumed[at + 1], done.agent_session_id);
    assert_eq!(starts[0].1, starts[1].1, "resumed in another directory");

    let failing = agent_task(&mut tasks, "codex", "fail", "").await;
    let mut watch = Watch::open(&mut tasks, &failing.id, 0).await;
    let failed = watch.until_status(TaskStatus::Failed).await;
    assert!(
        failed.status_reason.contains("stream disconnected"),
        "{failed:?}"
    );
    codex.daemon.stop().await;
    s.stop().await;
}

/// A daemon whose `claude` and `codex` are missing offers only what it can run, with
/// versions, and says why in its log.
async fn a_missing_claude_is_not_offered(backend: Backend) {
    let s = start_server(backend).await;
    let token = s.token_in("default", TokenKind::Daemon).await;
    let with = Agent::start(&s, "claude", &[]).await;
    let without = DaemonProcess::start(
        &s.url(),
        &token,
        &[
            "--runtime",
            "claude,codex",
            "--claude-bin",
            "/nonexistent/claude",
            "--codex-bin",
            "/nonexistent/codex",
        ],
    );
    let mut workspaces = s.workspaces().await;
    let daemons = tokio::time::timeout(PATIENCE, async {
        loop {
            let daemons = workspaces
                .list_daemons(pb::ListDaemonsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .daemons;
            if daemons.len() == 2 {
                return daemons;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("both daemons register");
    let mut offered: Vec<Vec<(String, String)>> = daemons
        .iter()
        .map(|d| {
            d.runtimes
                .iter()
                .map(|r| (r.name.clone(), r.version.clone()))
                .collect()
        })
        .collect();
    offered.sort();
    let shell = ("shell".to_owned(), "builtin".to_owned());
    let claude = ("claude".to_owned(), "2.0.14 (Claude Code)".to_owned());
    assert_eq!(offered, [vec![shell.clone()], vec![shell, claude]]);
    without.stop().await;
    with.daemon.stop().await;
    s.stop().await;
}

/// Claude and Codex reach taskmesh as MCP tools (`taskmesh mcp`, named in
/// their MCP configuration by the daemon) with their task's token: each
/// creates a subtask under its own task, which another daemon runs. The
/// token is on no command line, and the files that carry it are gone
/// when the run ends.
async fn agents_call_taskmesh_over_mcp(backend: Backend) {
    let s = start_server(backend).await;
    let shell = s.token_in("default", TokenKind::Daemon).await;
    let runner = DaemonProcess::start(&s.url(), &shell, &[]);
    let mut tasks = s.tasks().await;
    for name in ["claude", "codex"] {
        let agent = Agent::start(&s, name, &[]).await;
        let plan = format!(
            r#"mcp: create_subtask {{"name": "from {name}", "plan": "echo made by {name}"}}"#
        );
        let task = agent_task(&mut tasks, name, &plan, "").await;
        let mut watch = Watch::open(&mut tasks, &task.id, 0).await;
        watch.until_status(TaskStatus::Completed).await;
        let result = watch
            .messages
            .iter()
            .find(|m| m.kind == MessageKind::ToolResult as i32)
            .unwrap_or_else(|| panic!("{name}: no tool result in {:?}", watch.messages));
        assert!(
            result.content.contains("created and queued subtask"),
            "{name}: {result:?}"
        );
        let parent = tasks
            .get_task(pb::GetTaskRequest {
                id: task.id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        let sub = parent
            .subtasks
            .first()
            .expect("the subtask is under the agent's task");
        assert_eq!(sub.name, format!("from {name}"));
        assert_eq!(sub.created_by, format!("task:{}", task.id));
        let mut sub_watch = Watch::open(&mut tasks, &sub.id, 0).await;
        sub_watch.until_line(&format!("made by {name}")).await;
        for (args, _) in agent.starts() {
            assert!(
                !args.iter().any(|a| a.contains("tma_")),
                "{name}: token in {args:?}"
            );
        }
        let work = agent.daemon.dir.0.join("work");
        for leftover in ["agent-token", "mcp.json"] {
            assert!(
                !work.join(format!("{}.{leftover}", task.id)).exists(),
                "{leftover} stays"
            );
        }
        agent.daemon.stop().await;
    }
    runner.stop().await;
}

both_backends!(
    agents_call_taskmesh_over_mcp,
    a_claude_task_runs_and_continues,
    a_follow_up_reaches_the_same_process,
    stop_asks_claude_first,
    permissions_reach_a_person,
    an_error_result_fails_the_task,
    a_codex_task_runs_and_continues,
    a_missing_claude_is_not_offered,
);
