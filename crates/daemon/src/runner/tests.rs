//! One agent process end to end: exit statuses and both streams, seqs
//! without gaps, stdin, interrupts of the whole group, templates, resume,
//! clone failures and backpressure.

use std::os::unix::process::ExitStatusExt;

use super::*;
use crate::agents::shell::shell_quote;

struct Harness {
    events: mpsc::Receiver<RunnerEvent>,
    control: mpsc::Sender<Control>,
    _pressure: watch::Sender<bool>,
    _dir: TempDir,
}

/// A directory removed on drop (no tempfile crate here).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spec(plan: &str, first_seq: i64, dir: &TempDir) -> TaskSpec {
    TaskSpec {
        run_id: 7,
        task_id: "t1".into(),
        agent: AgentKind::Shell,
        turn: Turn {
            prompt: plan.into(),
            ..Turn::default()
        },
        repository: String::new(),
        branch: String::new(),
        completion_action: crate::pb::CompletionAction::None,
        target_branch: String::new(),
        dir: dir.0.join("t1"),
        first_seq,
        default_grace: Duration::from_secs(10),
        silence_limit: None,
        attempt: 1,
        hidden_secrets: Vec::new(),
        agent_env: Vec::new(),
        work_dir: dir.0.clone(),
    }
}

fn temp_dir() -> TempDir {
    let dir = std::env::temp_dir().join(format!("taskmesh-runner-{}", uuid::Uuid::new_v4()));
    TempDir(dir)
}

fn start_with(spec_fn: impl FnOnce(&TempDir) -> TaskSpec) -> Harness {
    let dir = temp_dir();
    let spec = spec_fn(&dir);
    let (ev_tx, ev_rx) = mpsc::channel(64);
    let (ctl_tx, ctl_rx) = mpsc::channel(8);
    let (p_tx, p_rx) = watch::channel(false);
    tokio::spawn(run_task(spec, ev_tx, ctl_rx, p_rx));
    Harness {
        events: ev_rx,
        control: ctl_tx,
        _pressure: p_tx,
        _dir: dir,
    }
}

fn start(plan: &str, first_seq: i64) -> Harness {
    start_with(|d| spec(plan, first_seq, d))
}

impl Harness {
    async fn next(&mut self) -> RunnerEvent {
        let ev = tokio::time::timeout(Duration::from_secs(30), self.events.recv()).await;
        ev.expect("runner event in time").expect("runner alive")
    }

    /// Collects output until the end.
    async fn until_end(&mut self, out: &mut Vec<TaskMessageInput>) -> TaskEnd {
        loop {
            match self.next().await {
                RunnerEvent::Output { messages, .. } => out.extend(messages),
                RunnerEvent::Ended { end, .. } => return end,
                _ => {}
            }
        }
    }
}

fn kind(m: &TaskMessageInput) -> MessageKind {
    MessageKind::try_from(m.kind).unwrap_or(MessageKind::Unspecified)
}

#[tokio::test]
async fn exit_status_and_both_streams() {
    let mut h = start("echo a; echo b >&2; exit 3", 1);
    assert!(matches!(h.next().await, RunnerEvent::Started { pid, .. } if pid > 0));
    let mut out = Vec::new();
    let end = h.until_end(&mut out).await;
    assert_eq!(out.len(), 2, "{out:?}");
    let mut seqs: Vec<i64> = out.iter().map(|m| m.seq).collect();
    seqs.sort();
    assert_eq!(seqs, [1, 2]);
    let a = out.iter().find(|m| m.content == "a").expect("stdout line");
    assert_eq!(kind(a), MessageKind::Stdout);
    let b = out.iter().find(|m| m.content == "b").expect("stderr line");
    assert_eq!(kind(b), MessageKind::Stderr);
    assert_eq!(
        end.outcome,
        Outcome::Failed {
            reason: "exit status 3".into(),
            exit_code: 3
        }
    );
}

#[tokio::test]
async fn seqs_are_contiguous_across_stdout_stderr_and_multi_message_lines() {
    let line = r#"{"type":"assistant","message":{"content":[{"type":"text","text":"hi"},{"type":"tool_use","name":"Bash","input":{"command":"ls"}}]}}"#;
    let plan = format!(
        "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done; printf '%s\\n' {}; echo tail",
        shell_quote(line)
    );
    let mut h = start(&plan, 40);
    let mut out = Vec::new();
    let end = h.until_end(&mut out).await;
    assert!(matches!(end.outcome, Outcome::Completed { .. }));
    // 10 plain lines + 2 messages from the stream-json line + 1.
    assert_eq!(out.len(), 13);
    let seqs: Vec<i64> = out.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (40..53).collect::<Vec<_>>(), "emitted in seq order");
    let tool = out
        .iter()
        .position(|m| kind(m) == MessageKind::ToolUse)
        .expect("tool use");
    assert_eq!(kind(&out[tool - 1]), MessageKind::Assistant);
    assert_eq!(out[tool - 1].seq + 1, out[tool].seq);
}

#[tokio::test]
async fn send_input_reaches_stdin() {
    let mut h = start("read x; echo got:$x", 1);
    assert!(matches!(h.next().await, RunnerEvent::Started { .. }));
    h.control
        .send(Control::Input {
            command_id: "c1".into(),
            text: "hello".into(),
        })
        .await
        .expect("runner takes control");
    let mut out = Vec::new();
    let mut done = None;
    let end = loop {
        match h.next().await {
            RunnerEvent::Output { messages, .. } => out.extend(messages),
            RunnerEvent::CommandDone { command_id, result } => done = Some((command_id, result)),
            RunnerEvent::Ended { end, .. } => break end,
            RunnerEvent::Started { .. }
            | RunnerEvent::Usage { .. }
            | RunnerEvent::Changes { .. }
            | RunnerEvent::CommandAnswered { .. } => {}
        }
    };
    assert_eq!(done, Some(("c1".to_owned(), Ok(()))));
    // What was sent is in the transcript, then the answer.
    let said: Vec<_> = out.iter().map(|m| (m.kind(), m.content.as_str())).collect();
    assert_eq!(
        said,
        [
            (MessageKind::User, "hello"),
            (MessageKind::Stdout, "got:hello")
        ]
    );
    assert_eq!(
        end.outcome,
        Outcome::Completed {
            summary: "got:hello".into()
        }
    );
}

fn process_gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // A zombie waiting for init to reap it is dead too.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

#[tokio::test]
async fn interrupt_kills_grandchildren() {
    let mut h = start_with(|d| TaskSpec {
        default_grace: Duration::from_millis(300),
        ..spec("sleep 1000 & echo $!; wait", 1, d)
    });
    assert!(matches!(h.next().await, RunnerEvent::Started { .. }));
    let pid = match h.next().await {
        RunnerEvent::Output { messages, .. } => messages[0].content.clone(),
        other => panic!("expected the grandchild pid, got {other:?}"),
    };
    assert!(pid.parse::<u32>().is_ok(), "{pid}");
    assert!(!process_gone(&pid), "grandchild runs before the interrupt");
    h.control
        .send(Control::Interrupt {
            grace: Duration::ZERO,
        })
        .await
        .expect("runner takes control");
    let end = h.until_end(&mut Vec::new()).await;
    match end.outcome {
        Outcome::Failed { reason, .. } => assert_eq!(reason, "interrupted"),
        other => panic!("unexpected outcome {other:?}"),
    }
    // The runner ends only after the pipes close, which the grandchild
    // held; give init a moment to reap it.
    let mut gone = false;
    for _ in 0..200 {
        if process_gone(&pid) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(gone, "grandchild {pid} survived the interrupt");
}

#[tokio::test]
async fn runtime_template_gets_the_plan_as_env_and_last_argument() {
    let mut h = start_with(|d| TaskSpec {
        agent: AgentKind::Template(
            r#"f() { echo "arg:$1"; echo "env:$TASKMESH_PLAN"; echo "id:$TASKMESH_TASK_ID"; }; f"#
                .into(),
        ),
        ..spec("it's a plan; $(rm -rf /)", 1, d)
    });
    let mut out = Vec::new();
    h.until_end(&mut out).await;
    let lines: Vec<&str> = out.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(
        lines,
        [
            "arg:it's a plan; $(rm -rf /)",
            "env:it's a plan; $(rm -rf /)",
            "id:t1"
        ]
    );
}

#[tokio::test]
async fn session_id_becomes_resume() {
    let line = r#"{"type":"system","subtype":"init","session_id":"abc"}"#;
    let mut h = start(&format!("echo {}", shell_quote(line)), 1);
    let end = h.until_end(&mut Vec::new()).await;
    let resume = end.resume.expect("resume");
    assert_eq!(resume.agent_session_id, "abc");
    assert!(resume.working_directory.ends_with("/t1"));
}

#[tokio::test]
async fn clone_failure_fails_the_task_with_the_git_error() {
    let mut h = start_with(|d| TaskSpec {
        repository: d.0.join("no-such-repo").display().to_string(),
        ..spec("true", 1, d)
    });
    match h.next().await {
        RunnerEvent::Ended {
            end, before_start, ..
        } => {
            assert!(before_start);
            match end.outcome {
                Outcome::Failed { reason, exit_code } => {
                    assert!(reason.starts_with("git clone failed"), "{reason}");
                    assert_ne!(exit_code, 0);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn backpressure_stops_reading_until_released() {
    let dir = temp_dir();
    let (ev_tx, mut ev_rx) = mpsc::channel(64);
    let (_ctl_tx, ctl_rx) = mpsc::channel(8);
    let (p_tx, p_rx) = watch::channel(true);
    tokio::spawn(run_task(spec("echo one", 1, &dir), ev_tx, ctl_rx, p_rx));
    assert!(matches!(
        ev_rx.recv().await,
        Some(RunnerEvent::Started { .. })
    ));
    // While paused, the child exits but its line stays unread.
    let mut polled = 0;
    while polled < 20 {
        tokio::task::yield_now().await;
        assert!(ev_rx.try_recv().is_err(), "read while paused");
        polled += 1;
    }
    p_tx.send_replace(false);
    match ev_rx.recv().await {
        Some(RunnerEvent::Output { messages, .. }) => assert_eq!(messages[0].content, "one"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn exit_descriptions() {
    let st = |raw: i32| ExitStatus::from_raw(raw);
    assert_eq!(
        outcome_of(&Ok(st(0)), false, "s".into()),
        Outcome::Completed {
            summary: "s".into()
        }
    );
    assert_eq!(
        outcome_of(&Ok(st(3 << 8)), false, String::new()),
        Outcome::Failed {
            reason: "exit status 3".into(),
            exit_code: 3
        }
    );
    assert_eq!(
        outcome_of(&Ok(st(9)), false, String::new()),
        Outcome::Failed {
            reason: "killed by signal 9".into(),
            exit_code: 137
        }
    );
    assert_eq!(
        outcome_of(&Ok(st(0)), true, String::new()),
        Outcome::Failed {
            reason: "interrupted".into(),
            exit_code: 0
        }
    );
}

#[tokio::test]
async fn a_silent_agent_is_interrupted_and_its_task_failed() {
    let mut h = start_with(|d| TaskSpec {
        default_grace: Duration::from_millis(300),
        silence_limit: Some(Duration::from_millis(200)),
        ..spec("echo once; sleep 30", 1, d)
    });
    let mut out = Vec::new();
    let end = h.until_end(&mut out).await;
    assert_eq!(out[0].content, "once");
    match end.outcome {
        Outcome::Failed { reason, .. } => assert!(reason.contains("printed nothing"), "{reason}"),
        other => panic!("a silent agent ended {other:?}"),
    }
}
