//! The reference daemon end to end, as a real `taskmesh daemon` process
//! running shell tasks against a real server, on SQLite and PostgreSQL:
//! 10,000 lines reach a watcher once and in order; the server is SIGKILLed
//! mid-task and restarted, and nothing is lost or doubled; an interrupt
//! kills the task's whole process group; SendMessage reaches stdin; no
//! task sees the daemon's token; one daemon per state directory; a refused
//! token ends the daemon; SIGTERM drains and a second one interrupts, the
//! task going back to the queue.

use taskmesh_testkit as common;
use taskmesh_testkit::both_backends;

use std::process::Stdio;
use std::time::Duration;

use common::process::{DaemonProcess, ServeProcess, create_token, is_dead};
use common::watch::{PATIENCE, Watch};
use common::{Backend, Tasks, TestDb, start_server};
use taskmesh_server::model::TokenKind;
use taskmesh_server::pb::task_service_client::TaskServiceClient;
use taskmesh_server::pb::{self, TaskStatus, watch_task_response::Event};
use tokio_stream::StreamExt;
use tonic::transport::Endpoint;

async fn create_and_start(tasks: &mut Tasks, name: &str, plan: &str) -> pb::Task {
    let task = tasks
        .create_task(pb::CreateTaskRequest {
            name: name.into(),
            plan: plan.into(),
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

/// Every stored message of a task, paging through ListTaskMessages.
async fn stored(tasks: &mut Tasks, task_id: &str) -> Vec<pb::TaskMessage> {
    let mut all: Vec<pb::TaskMessage> = Vec::new();
    loop {
        let since_seq = all.last().map_or(0, |m| m.seq);
        let page = tasks
            .list_task_messages(pb::ListTaskMessagesRequest {
                task_id: task_id.into(),
                since_seq,
                limit: 5000,
            })
            .await
            .unwrap()
            .into_inner();
        if page.messages.is_empty() {
            return all;
        }
        all.extend(page.messages);
    }
}

/// Messages 1..=n are exactly `line 1` … `line n`, numbered 1..=n.
fn assert_numbered_lines(messages: &[pb::TaskMessage], n: usize) {
    let lines: Vec<&pb::TaskMessage> = messages
        .iter()
        .filter(|m| m.kind == pb::MessageKind::Stdout as i32)
        .collect();
    assert_eq!(lines.len(), n, "stdout messages");
    for (i, m) in lines.iter().enumerate() {
        assert_eq!(m.content, format!("line {}", i + 1), "message {i}");
    }
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(m.seq, i as i64 + 1, "seqs are contiguous from 1");
    }
}

/// A task printing 10,000 numbered lines: a watcher opened before it
/// starts receives every line once, in order, then the completion.
async fn ten_thousand_lines_reach_a_watcher(backend: Backend) {
    let s = start_server(backend).await;
    let token = s.token_in("default", TokenKind::Daemon).await;
    let daemon = DaemonProcess::start(&s.url(), &token, &[]);
    let mut tasks = s.tasks().await;
    let task = tasks
        .create_task(pb::CreateTaskRequest {
            name: "ten thousand".into(),
            plan: "seq 1 10000 | sed 's/^/line /'".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let mut watch = Watch::open(&mut tasks, &task.id, 0).await;
    tasks
        .start_task(pb::StartTaskRequest {
            id: task.id.clone(),
            daemon_id: String::new(),
        })
        .await
        .unwrap();
    let done = watch
        .until("completion", |t, _| {
            t.status != TaskStatus::Pending as i32
                && t.status != TaskStatus::Queued as i32
                && t.status != TaskStatus::Dispatched as i32
                && t.status != TaskStatus::Running as i32
        })
        .await;
    assert_eq!(done.status, TaskStatus::Completed as i32, "{done:?}");
    assert_numbered_lines(&watch.messages, 10_000);
    assert_numbered_lines(&stored(&mut tasks, &task.id).await, 10_000);
    daemon.stop().await;
}

/// The server is SIGKILLed while the task is printing and restarted on the
/// same database and address: the daemon reconnects, resends what was not
/// acknowledged, the task completes, and the stored output has every line
/// once, with no gap.
async fn server_killed_mid_task(backend: Backend) {
    let db = TestDb::new(backend).await;
    let flags = ["--heartbeat", "200ms"];
    let server = ServeProcess::start(&db.url, "127.0.0.1:0", &flags).await;
    let user = server.token.clone().expect("first start prints a token");
    let daemon_token = create_token(&db.url, "daemon").await;
    let daemon = DaemonProcess::start(&server.url(), &daemon_token, &[]);
    let client = |url: String, token: String| async move {
        let channel = Endpoint::from_shared(url).unwrap().connect().await.unwrap();
        TaskServiceClient::with_interceptor(channel, common::bearer(Some(&token)))
    };
    let mut tasks = client(server.url(), user.clone()).await;
    // 3,000 lines, a pause for input, then 7,000 more in slow chunks, so the
    // server dies while output is still flowing.
    let plan = "seq 1 3000 | sed 's/^/line /'\n\
                read go\n\
                for start in $(seq 3001 500 9501); do\n\
                  seq $start $((start + 499)) | sed 's/^/line /'\n\
                  sleep 0.2\n\
                done";
    let task = create_and_start(&mut tasks, "survives a crash", plan).await;
    let mut watch = Watch::open(&mut tasks, &task.id, 0).await;
    watch.until_line("line 3000").await;
    tasks
        .send_message(pb::SendMessageRequest {
            task_id: task.id.clone(),
            text: "go".into(),
        })
        .await
        .unwrap();
    watch.until_line("line 3600").await;
    let addr = server.addr.to_string();
    server.kill().await;

    let server = ServeProcess::start(&db.url, &addr, &flags).await;
    let mut tasks = client(server.url(), user).await;
    let mut watch = Watch::open(&mut tasks, &task.id, i64::MAX).await;
    let done = watch
        .until("the end", |t, _| {
            t.status == TaskStatus::Completed as i32 || t.status == TaskStatus::Failed as i32
        })
        .await;
    assert_eq!(done.status, TaskStatus::Completed as i32, "{done:?}");
    assert_numbered_lines(&stored(&mut tasks, &task.id).await, 10_000);
    daemon.stop().await;
    drop(server);
}

/// Stopping a running task interrupts its whole process group: the shell,
/// its child and its grandchild all die, and the task ends cancelled.
async fn interrupt_kills_the_process_group(backend: Backend) {
    let s = start_server(backend).await;
    let token = s.token_in("default", TokenKind::Daemon).await;
    let daemon = DaemonProcess::start(&s.url(), &token, &["--interrupt-grace-secs", "1"]);
    let mut tasks = s.tasks().await;
    let plan = "sleep 300 &\n\
                echo \"child $!\"\n\
                sh -c 'sleep 300 & echo \"grandchild $!\"; wait' &\n\
                wait";
    let task = create_and_start(&mut tasks, "a family", plan).await;
    let mut watch = Watch::open(&mut tasks, &task.id, 0).await;
    let pid_of = |watch: &Watch, who: &str| -> Option<i32> {
        watch.messages.iter().find_map(|m| {
            m.content
                .strip_prefix(&format!("{who} "))
                .and_then(|p| p.parse().ok())
        })
    };
    let pids = tokio::time::timeout(PATIENCE, async {
        loop {
            if let (Some(c), Some(g)) = (pid_of(&watch, "child"), pid_of(&watch, "grandchild")) {
                return [c, g];
            }
            match watch
                .stream
                .next()
                .await
                .expect("watch open")
                .unwrap()
                .event
            {
                Some(Event::Message(m)) => watch.messages.push(m),
                _ => continue,
            }
        }
    })
    .await
    .expect("the task prints its children's pids");
    assert!(
        pids.iter().all(|p| !is_dead(*p)),
        "both run before the stop"
    );

    tasks
        .stop_task(pb::StopTaskRequest {
            id: task.id.clone(),
        })
        .await
        .unwrap();
    watch.until_status(TaskStatus::Cancelled).await;
    // The group was signalled before the task ended; the kernel may still be
    // tearing the processes down, so allow it a moment.
    let gone = async {
        while !pids.iter().all(|p| is_dead(*p)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gone)
        .await
        .unwrap_or_else(|_| panic!("processes {pids:?} survived the interrupt"));
    daemon.stop().await;
}

/// SendMessage text arrives on the agent's stdin.
async fn send_message_reaches_stdin(backend: Backend) {
    let s = start_server(backend).await;
    let token = s.token_in("default", TokenKind::Daemon).await;
    let daemon = DaemonProcess::start(&s.url(), &token, &[]);
    let mut tasks = s.tasks().await;
    let task = create_and_start(&mut tasks, "listens", "read line\necho \"got: $line\"").await;
    let mut watch = Watch::open(&mut tasks, &task.id, 0).await;
    watch.until_status(TaskStatus::Running).await;
    tasks
        .send_message(pb::SendMessageRequest {
            task_id: task.id.clone(),
            text: "hello agent".into(),
        })
        .await
        .unwrap();
    let done = watch.until_status(TaskStatus::Completed).await;
    assert_eq!(done.status, TaskStatus::Completed as i32);
    let contents: Vec<&str> = watch.messages.iter().map(|m| m.content.as_str()).collect();
    // What was sent is in the transcript, as a user message, then the answer.
    assert_eq!(contents, ["hello agent", "got: hello agent"]);
    assert_eq!(watch.messages[0].kind(), pb::MessageKind::User);
    daemon.stop().await;
}

/// The daemon's token reaches it through `TASKMESH_TOKEN` here, as in a
/// shell where an admin exported theirs; no task sees it, under that name
/// or any other (the task's TASKMESH_TOKEN is its own agent token) (checked inside the task: stored output would be redacted
/// anyway).
async fn tasks_never_see_the_daemons_token(backend: Backend) {
    let s = start_server(backend).await;
    let token = s.token_in("default", TokenKind::Daemon).await;
    let daemon = DaemonProcess::start(&s.url(), &token, &[]);
    let mut tasks = s.tasks().await;
    let plan = r#"echo "TASKMESH_TOKEN:${TASKMESH_TOKEN%%_*}"; echo "vars holding a token: $(env | grep -c tm[a-z]_)""#;
    let task = create_and_start(&mut tasks, "looks around", plan).await;
    let mut watch = Watch::open(&mut tasks, &task.id, 0).await;
    watch.until_status(TaskStatus::Completed).await;
    let contents: Vec<&str> = watch.messages.iter().map(|m| m.content.as_str()).collect();
    // Its own attempt's agent token, and no other.
    assert_eq!(contents, ["TASKMESH_TOKEN:tma", "vars holding a token: 1"]);
    daemon.stop().await;
}

/// Its log, when stderr is not a terminal, has no colour codes; a second
/// daemon on the same state directory stops at once, naming --state-dir,
/// while the first goes on taking work.
async fn one_daemon_per_state_dir(backend: Backend) {
    let s = start_server(backend).await;
    let token = s.token_in("default", TokenKind::Daemon).await;
    let (first, mut log) = DaemonProcess::start_logged(&s.url(), &token, &[], "info");
    let line = log.wait_for(&["session ready"], PATIENCE).await;
    assert!(
        !line.contains('\x1b'),
        "colour codes in a piped log: {line:?}"
    );
    let second = DaemonProcess::command(&s.url(), &token, &first.dir.0, &[])
        .stderr(Stdio::piped())
        .output();
    let out = tokio::time::timeout(PATIENCE, second)
        .await
        .expect("the second daemon stops at once")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        err.contains("another taskmesh daemon is using the state directory")
            && err.contains("--state-dir"),
        "{err}"
    );
    let mut tasks = s.tasks().await;
    let task = create_and_start(&mut tasks, "still here", "echo still here").await;
    Watch::open(&mut tasks, &task.id, 0)
        .await
        .until_status(TaskStatus::Completed)
        .await;
    first.stop().await;
}

/// A token the server refuses (revoked, a user's, unknown) ends the daemon
/// with a non-zero exit and a reason that says what to check, instead of
/// retrying forever.
async fn a_refused_daemon_exits_and_says_why(backend: Backend) {
    let s = start_server(backend).await;
    let mut ws = s.workspaces().await;
    let created = ws
        .create_token(pb::CreateTokenRequest {
            kind: pb::TokenKind::Daemon as i32,
            name: "retired box".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    ws.revoke_token(pb::RevokeTokenRequest {
        id: created.token.unwrap().id,
    })
    .await
    .unwrap();
    let user = s.token_in("default", TokenKind::User).await;
    for (token, what) in [
        (created.secret.as_str(), "a revoked token"),
        (user.as_str(), "a user token"),
        ("tmd_nobody_issued_this", "an unknown token"),
    ] {
        let dir = common::process::TempDir::new("refused");
        let run = DaemonProcess::command(&s.url(), token, &dir.0, &[])
            .stderr(Stdio::piped())
            .output();
        let out = tokio::time::timeout(PATIENCE, run)
            .await
            .unwrap_or_else(|_| panic!("with {what} the daemon kept retrying"))
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: {out:?}");
        assert!(
            err.contains("the server refused this daemon") && err.contains("check its token"),
            "{what}: {err}"
        );
    }
}

/// The first SIGTERM drains: no new work, and the running task goes on
/// (the daemon's wait is ten minutes). The second interrupts it, and
/// instead of ending failed it goes back to the queue, where another
/// daemon takes it as a new attempt and finishes it.
async fn sigterm_drains_and_a_second_interrupts(backend: Backend) {
    let s = start_server(backend).await;
    let token = s.token_in("default", TokenKind::Daemon).await;
    let (mut first, mut log) =
        DaemonProcess::start_logged(&s.url(), &token, &["--shutdown-secs", "600"], "info");
    let mut tasks = s.tasks().await;
    let plan = r#"echo "attempt $TASKMESH_ATTEMPT"; if [ "$TASKMESH_ATTEMPT" = 1 ]; then sleep 600; fi; echo finished"#;
    let task = create_and_start(&mut tasks, "long", plan).await;
    let mut watch = Watch::open(&mut tasks, &task.id, 0).await;
    watch.until_line("attempt 1").await;

    first.signal(libc::SIGTERM);
    log.wait_for(&["shutting down: no new tasks"], PATIENCE)
        .await;
    let other = create_and_start(&mut tasks, "later", "echo later").await;
    let got = |t: pb::Task| (t.status(), t.attempt);
    let now = tasks
        .get_task(pb::GetTaskRequest {
            id: task.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(
        got(now),
        (TaskStatus::Running, 1),
        "the first SIGTERM let it run"
    );

    first.signal(libc::SIGTERM);
    log.wait_for(&["interrupting running tasks now"], PATIENCE)
        .await;
    watch.until_status(TaskStatus::Queued).await;
    let status = first.exit_status(PATIENCE).await;
    assert!(status.success(), "the daemon exits cleanly: {status:?}");

    let second = DaemonProcess::start(&s.url(), &token, &[]);
    watch.until_status(TaskStatus::Completed).await;
    let lines: Vec<&str> = watch
        .messages
        .iter()
        .map(|m| m.content.as_str())
        .filter(|c| c.starts_with("attempt") || *c == "finished")
        .collect();
    assert_eq!(lines, ["attempt 1", "attempt 2", "finished"]);
    let events = tasks
        .list_task_events(pb::ListTaskEventsRequest {
            task_id: task.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let reasons: Vec<&str> = events.iter().map(|e| e.reason.as_str()).collect();
    assert!(
        reasons.contains(&"interrupted: its daemon shut down")
            && reasons.contains(&"queued again: its daemon shut down before it finished"),
        "{reasons:?}"
    );
    // The task started while the first daemon drained ran on the second.
    Watch::open(&mut tasks, &other.id, 0)
        .await
        .until_status(TaskStatus::Completed)
        .await;
    second.stop().await;
}

both_backends!(
    one_daemon_per_state_dir,
    a_refused_daemon_exits_and_says_why,
    sigterm_drains_and_a_second_interrupts,
    tasks_never_see_the_daemons_token,
    ten_thousand_lines_reach_a_watcher,
    server_killed_mid_task,
    interrupt_kills_the_process_group,
    send_message_reaches_stdin,
);
