//! Daemon sessions through real gRPC: push dispatch, durable commands,
//! gapless output, atomic claims, tenancy and redaction; SQLite and
//! PostgreSQL. The daemon here is scripted message by message.

use taskmesh_testkit as common;
use taskmesh_testkit::both_backends;

use std::collections::HashSet;
use std::sync::Arc;

use common::daemon::*;
use common::{Backend, start_server};
use taskmesh_server::model::{MessageKind, TokenKind};
use taskmesh_server::pb::session_request::Message as Up;
use taskmesh_server::pb::session_response::Message as Down;
use taskmesh_server::pb::{self, TaskStatus, command::Kind};
use taskmesh_server::store::{Append, NewMessage};
use tokio_stream::StreamExt;
use tonic::Code;

/// StartTask reaches a connected daemon at once over its session; output
/// with repeats and out-of-order batches is stored once, without gaps, and
/// a watcher sees every line once, in order; the end is acknowledged.
async fn push_dispatch_and_gapless_output(backend: Backend) {
    let s = start_server(backend).await;
    let (mut dc, daemon_id) = connect_daemon(&s, "m1", 4).await;
    let mut session = Session::open(&mut dc, &daemon_id, vec![]).await;

    let task = new_task(&s, "push").await;
    let mut tasks = s.tasks().await;
    let mut watch = tasks
        .watch_task(pb::WatchTaskRequest {
            task_id: task.id.clone(),
            since_seq: 0,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    start(&s, &task.id).await;

    let cmd = session.command().await;
    let spawn = spawn_of(&cmd);
    assert_eq!(spawn.task.as_ref().unwrap().id, task.id);
    assert_eq!(spawn.first_seq, 1);
    session.ack(&cmd.id).await;
    session.started(&task.id, 1).await;

    let line = |seq: i64| format!("line {seq}");
    assert_eq!(session.output(&task.id, 1..=100, line).await, 100);
    // A gap: 151..=200 are stored but not acknowledged past 100.
    assert_eq!(session.output(&task.id, 151..=200, line).await, 100);
    // A resend overlapping what is stored, filling the gap.
    assert_eq!(session.output(&task.id, 90..=160, line).await, 200);
    assert_eq!(session.output(&task.id, 201..=300, line).await, 300);

    session
        .send(Up::Completed(pb::CompleteTaskRequest {
            task_id: task.id.clone(),
            summary: "done".into(),
            resume: Some(pb::AgentResume {
                agent_session_id: "abc".into(),
                working_directory: "/w".into(),
            }),
            ..Default::default()
        }))
        .await;
    match session.next().await {
        Down::OutputAck(a) => assert!(a.task_ended && a.acked_seq == 300),
        other => panic!("{other:?}"),
    }
    // A repeated end report is answered the same way.
    session.complete(&task.id).await;

    let mut seqs = Vec::new();
    let mut statuses = Vec::new();
    while let Some(ev) = watch.next().await {
        match ev.unwrap().event.unwrap() {
            pb::watch_task_response::Event::Message(m) => {
                assert_eq!(m.content, line(m.seq));
                seqs.push(m.seq);
            }
            pb::watch_task_response::Event::Task(t) => {
                statuses.push(TaskStatus::try_from(t.status).unwrap());
                if t.status == TaskStatus::Completed as i32 {
                    break;
                }
            }
        }
    }
    assert_eq!(seqs, (1..=300).collect::<Vec<_>>());
    assert_eq!(statuses.first(), Some(&TaskStatus::Pending));
    assert!(statuses.contains(&TaskStatus::Running));

    let done = get(&s, &task.id).await;
    assert_eq!(
        TaskStatus::try_from(done.status).unwrap(),
        TaskStatus::Completed
    );
    assert_eq!(
        (done.last_seq, done.agent_session_id.as_str()),
        (300, "abc")
    );

    // A late watcher replays from any seq.
    let mut late = tasks
        .watch_task(pb::WatchTaskRequest {
            task_id: task.id.clone(),
            since_seq: 295,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while got.len() < 5 {
        if let Some(pb::watch_task_response::Event::Message(m)) =
            late.next().await.unwrap().unwrap().event
        {
            got.push(m.seq);
        }
    }
    assert_eq!(got, vec![296, 297, 298, 299, 300]);
    // The task has ended and everything was sent: both watches end, OK.
    for stream in [&mut watch, &mut late] {
        let end = tokio::time::timeout(PATIENCE, stream.next()).await;
        assert!(
            matches!(end, Ok(None)),
            "the watch of an ended task ends: {end:?}"
        );
    }
    // A watch that asks to follow stays, and sees the next attempt.
    let mut follower = tasks
        .watch_task(pb::WatchTaskRequest {
            task_id: task.id.clone(),
            since_seq: 300,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let first = follower.next().await.unwrap().unwrap().event;
    assert!(
        matches!(&first, Some(pb::watch_task_response::Event::Task(t)) if t.status == TaskStatus::Completed as i32),
        "{first:?}"
    );
    start(&s, &task.id).await;
    let next = tokio::time::timeout(PATIENCE, follower.next())
        .await
        .expect("the follower hears of the new attempt")
        .unwrap()
        .unwrap()
        .event;
    assert!(
        matches!(&next, Some(pb::watch_task_response::Event::Task(t)) if t.attempt == 2),
        "{next:?}"
    );
    s.stop().await;
}

const PATIENCE: std::time::Duration = std::time::Duration::from_secs(20);

/// StopTask of a running task pushes InterruptTask; the daemon's failure
/// report then ends it cancelled. SendMessage issued while the daemon is
/// away is delivered once after it reconnects.
async fn stop_and_durable_commands(backend: Backend) {
    let s = start_server(backend).await;
    let (mut dc, daemon_id) = connect_daemon(&s, "m1", 4).await;
    let mut session = Session::open(&mut dc, &daemon_id, vec![]).await;
    let task = new_task(&s, "stoppable").await;
    let mut tasks = s.tasks().await;
    start(&s, &task.id).await;
    let spawn = session.command().await;
    session.ack(&spawn.id).await;
    session.started(&task.id, 1).await;
    // The Started report is ordered before this output on the stream.
    assert_eq!(session.output(&task.id, [1], |_| "x".into()).await, 1);

    // The daemon goes away; a message waits in the outbox.
    drop(session);
    let sent = tasks
        .send_message(pb::SendMessageRequest {
            task_id: task.id.clone(),
            text: "hello agent".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .command_id;

    let mut session = Session::open(&mut dc, &daemon_id, vec![task.id.clone()]).await;
    let cmd = session.command().await;
    assert_eq!(cmd.id, sent);
    match &cmd.kind {
        Some(Kind::SendInput(i)) => assert_eq!(i.text, "hello agent"),
        other => panic!("{other:?}"),
    }
    session.ack(&cmd.id).await;
    assert_eq!(
        TaskStatus::try_from(get(&s, &task.id).await.status).unwrap(),
        TaskStatus::Running
    );

    // Once acknowledged, a reconnect does not deliver it again.
    drop(session);
    let mut session = Session::open(&mut dc, &daemon_id, vec![task.id.clone()]).await;
    let stopped = tasks
        .stop_task(pb::StopTaskRequest {
            id: task.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(
        TaskStatus::try_from(stopped.status).unwrap(),
        TaskStatus::Running,
        "waits for the daemon"
    );
    let cmd = session.command().await;
    assert!(matches!(cmd.kind, Some(Kind::InterruptTask(_))), "{cmd:?}");
    session.ack(&cmd.id).await;
    session
        .send(Up::Failed(pb::FailTaskRequest {
            task_id: task.id.clone(),
            reason: "interrupted".into(),
            exit_code: 130,
            resume: None,
            ..Default::default()
        }))
        .await;
    match session.next().await {
        Down::OutputAck(a) => assert!(a.task_ended),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        TaskStatus::try_from(get(&s, &task.id).await.status).unwrap(),
        TaskStatus::Cancelled
    );

    // With the daemon away, stopping a task cancels it at once.
    let t2 = new_task(&s, "orphan").await;
    tasks
        .start_task(pb::StartTaskRequest {
            id: t2.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let spawn = session.command().await;
    assert_eq!(spawn_of(&spawn).task.as_ref().unwrap().id, t2.id);
    drop(session);
    // Wait until the server has noticed the session is gone.
    let mut dc2 = s.workspaces().await;
    loop {
        let d = dc2
            .get_daemon(pb::GetDaemonRequest {
                id: daemon_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .daemon
            .unwrap();
        if d.state == pb::DaemonState::Offline as i32 {
            break;
        }
        tokio::task::yield_now().await;
    }
    let t2s = tasks
        .stop_task(pb::StopTaskRequest { id: t2.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(
        TaskStatus::try_from(t2s.status).unwrap(),
        TaskStatus::Cancelled
    );
    s.stop().await;
}

/// 32 claimers race over 1,000 queued tasks: every task is claimed once.
async fn concurrent_claims(backend: Backend) {
    let s = start_server(backend).await;
    let token = s.token_in("default", TokenKind::Daemon).await;
    let mut tasks = s.tasks().await;
    let mut ids = HashSet::new();
    for i in 0..1000 {
        let t = tasks
            .create_task(pb::CreateTaskRequest {
                name: format!("t{i}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        tasks
            .start_task(pb::StartTaskRequest {
                id: t.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        ids.insert(t.id);
    }
    let mut handles = Vec::new();
    for d in 0..32 {
        let mut c = daemon_client(&s, &token).await;
        let daemon_id = register(&mut c, &format!("claimer-{d}"), 1000).await;
        handles.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let r = c
                    .claim_task(pb::ClaimTaskRequest {
                        daemon_id: daemon_id.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                match r.task {
                    Some(t) => {
                        assert_eq!(t.status, TaskStatus::Dispatched as i32);
                        mine.push(t.id);
                    }
                    None => return mine,
                }
            }
        }));
    }
    let mut claimed = Vec::new();
    for h in handles {
        claimed.extend(h.await.unwrap());
    }
    assert_eq!(claimed.len(), 1000, "every task claimed exactly once");
    assert_eq!(claimed.into_iter().collect::<HashSet<_>>(), ids);
    s.stop().await;
}

/// A daemon token of another workspace gets NOT_FOUND for every task RPC.
async fn daemon_tenancy(backend: Backend) {
    let s = start_server(backend).await;
    let task = new_task(&s, "private").await;
    let id = task.id.clone();
    let other = s.token_in("other", TokenKind::Daemon).await;
    let mut c = daemon_client(&s, &other).await;
    let daemon_id = register(&mut c, "intruder", 1).await;
    fn nf<T>(r: Result<tonic::Response<T>, tonic::Status>) {
        assert_eq!(r.map(|_| ()).unwrap_err().code(), Code::NotFound);
    }
    nf(c.report_task_started(pb::ReportTaskStartedRequest {
        task_id: id.clone(),
        daemon_id: daemon_id.clone(),
        ..Default::default()
    })
    .await);
    nf(c.report_task_progress(pb::ReportTaskProgressRequest {
        task_id: id.clone(),
        daemon_id: daemon_id.clone(),
        ..Default::default()
    })
    .await);
    nf(c.report_task_messages(pb::ReportTaskMessagesRequest {
        task_id: id.clone(),
        daemon_id: daemon_id.clone(),
        messages: vec![],
        ..Default::default()
    })
    .await);
    nf(c.report_task_usage(pb::ReportTaskUsageRequest {
        task_id: id.clone(),
        daemon_id: daemon_id.clone(),
        usage: vec![],
        ..Default::default()
    })
    .await);
    nf(c.complete_task(pb::CompleteTaskRequest {
        task_id: id.clone(),
        daemon_id: daemon_id.clone(),
        ..Default::default()
    })
    .await);
    nf(c.fail_task(pb::FailTaskRequest {
        task_id: id.clone(),
        daemon_id: daemon_id.clone(),
        ..Default::default()
    })
    .await);
    nf(c.get_task_status(pb::GetTaskStatusRequest {
        task_id: id.clone(),
        daemon_id: daemon_id.clone(),
    })
    .await);
    // TaskService is not a daemon token's to call at all, in any workspace.
    fn denied<T>(r: Result<tonic::Response<T>, tonic::Status>) {
        assert_eq!(r.map(|_| ()).unwrap_err().code(), Code::PermissionDenied);
    }
    let mut tc = s.tasks_as(Some(&other)).await;
    denied(tc.get_task(pb::GetTaskRequest { id: id.clone() }).await);
    denied(
        tc.send_message(pb::SendMessageRequest {
            task_id: id.clone(),
            text: "x".into(),
        })
        .await,
    );
    denied(
        tc.watch_task(pb::WatchTaskRequest {
            task_id: id.clone(),
            since_seq: 0,
            follow: false,
        })
        .await,
    );
    // Its daemon never gets the task, queued or not.
    s.tasks()
        .await
        .start_task(pb::StartTaskRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        c.claim_task(pb::ClaimTaskRequest { daemon_id })
            .await
            .unwrap()
            .into_inner()
            .task
            .is_none()
    );
    // And a user token cannot act as a daemon.
    let mut as_user = daemon_client(&s, &s.token).await;
    let e = as_user
        .claim_task(pb::ClaimTaskRequest {
            daemon_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    s.stop().await;
}

/// Secrets are redacted before storage and before broadcast.
async fn secrets_are_redacted(backend: Backend) {
    let s = start_server(backend).await;
    let (mut dc, daemon_id) = connect_daemon(&s, "m1", 1).await;
    let mut session = Session::open(&mut dc, &daemon_id, vec![]).await;
    let task = new_task(&s, "leaky").await;
    let mut tasks = s.tasks().await;
    let mut watch = tasks
        .watch_task(pb::WatchTaskRequest {
            task_id: task.id.clone(),
            since_seq: 0,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    start(&s, &task.id).await;
    let spawn = session.command().await;
    session.ack(&spawn.id).await;
    session.started(&task.id, 1).await;
    let secrets = [
        "export OPENAI_API_KEY=sk-proj-abcdefghijklmnopqrstuvwxyz0123456789",
        "git clone https://bob:hunter2hunter2@example.com/repo.git",
        "token ghp_abcdefghijklmnopqrstuvwxyz0123456789AB",
        "nul\0byte",
    ];
    let acked = session
        .output(&task.id, 1..=4, |seq| secrets[seq as usize - 1].to_string())
        .await;
    assert_eq!(acked, 4);
    let check = |content: &str| {
        for leaked in [
            "abcdefghijklmnopqrstuvwxyz0123456789",
            "hunter2hunter2",
            "\0",
        ] {
            assert!(!content.contains(leaked), "{content:?} leaks {leaked:?}");
        }
    };
    let stored = tasks
        .list_task_messages(pb::ListTaskMessagesRequest {
            task_id: task.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .messages;
    assert_eq!(stored.len(), 4);
    for m in &stored {
        check(&m.content);
    }
    assert!(stored[0].content.contains("REDACTED"));
    assert!(stored[1].content.contains("bob:") && stored[1].content.contains("@example.com"));
    assert_eq!(stored[3].content, "nulbyte");
    let mut live = 0;
    while live < 4 {
        if let Some(pb::watch_task_response::Event::Message(m)) =
            watch.next().await.unwrap().unwrap().event
        {
            check(&m.content);
            live += 1;
        }
    }
    s.stop().await;
}

/// ReportTaskProgress shows on the task (redacted, first line only) without
/// changing its version; bad percentages and finished tasks are refused.
async fn progress_is_shown_on_the_task(backend: Backend) {
    let s = start_server(backend).await;
    let (mut dc, daemon_id) = connect_daemon(&s, "m1", 1).await;
    let task = new_task(&s, "progress").await;
    start(&s, &task.id).await;
    let claimed = dc
        .claim_task(pb::ClaimTaskRequest {
            daemon_id: daemon_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(claimed.task.unwrap().id, task.id);
    dc.report_task_started(pb::ReportTaskStartedRequest {
        task_id: task.id.clone(),
        attempt: 1,
        pid: 1,
        daemon_id: daemon_id.clone(),
    })
    .await
    .unwrap();
    let before = get(&s, &task.id).await;
    assert_eq!(
        (before.progress_summary.as_str(), before.progress_percent),
        ("", -1)
    );

    let progress = |summary: &str, percent: i32| pb::ReportTaskProgressRequest {
        task_id: task.id.clone(),
        summary: summary.into(),
        percent,
        daemon_id: daemon_id.clone(),
        ..Default::default()
    };
    let secret = "sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789";
    dc.report_task_progress(progress(&format!("testing with {secret}\nsecond line"), 40))
        .await
        .unwrap();
    let after = get(&s, &task.id).await;
    assert_eq!(after.progress_percent, 40);
    assert!(
        after.progress_summary.starts_with("testing with "),
        "{after:?}"
    );
    assert!(!after.progress_summary.contains(secret), "{after:?}");
    assert!(!after.progress_summary.contains("second line"), "{after:?}");
    assert_eq!(after.version, before.version, "progress is not an edit");

    let err = dc
        .report_task_progress(progress("too far", 101))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    dc.complete_task(pb::CompleteTaskRequest {
        task_id: task.id.clone(),
        daemon_id: daemon_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let err = dc
        .report_task_progress(progress("late", 100))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    s.stop().await;
}

/// Output past a gap is stored but neither listed nor watched until the gap
/// is filled; then a live watcher gets the rest in order. When the server
/// shuts down, open watches end UNAVAILABLE so clients know to reconnect.
async fn gaps_hold_output_back_until_filled(backend: Backend) {
    let s = start_server(backend).await;
    let (mut dc, daemon_id) = connect_daemon(&s, "m1", 1).await;
    let task = new_task(&s, "gappy").await;
    let mut tasks = s.tasks().await;
    start(&s, &task.id).await;
    dc.claim_task(pb::ClaimTaskRequest {
        daemon_id: daemon_id.clone(),
    })
    .await
    .unwrap();
    let report = |seqs: &[i64]| pb::ReportTaskMessagesRequest {
        task_id: task.id.clone(),
        messages: seqs
            .iter()
            .map(|&seq| pb::TaskMessageInput {
                seq,
                kind: pb::MessageKind::Stdout as i32,
                content: format!("line {seq}"),
                ..Default::default()
            })
            .collect(),
        daemon_id: daemon_id.clone(),
        ..Default::default()
    };
    let acked = dc.report_task_messages(report(&[1, 2, 4])).await.unwrap();
    assert_eq!(acked.into_inner().acked_seq, 2);
    let listed = first_page(&s, &task.id).await;
    let seqs: Vec<i64> = listed.messages.iter().map(|m| m.seq).collect();
    assert_eq!((seqs, listed.last_seq), (vec![1, 2], 2));

    let mut watch = tasks
        .watch_task(pb::WatchTaskRequest {
            task_id: task.id.clone(),
            since_seq: 0,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut next_seq = async || loop {
        match watch.next().await.unwrap().unwrap().event {
            Some(pb::watch_task_response::Event::Message(m)) => return m.seq,
            _ => continue,
        }
    };
    assert_eq!(next_seq().await, 1);
    assert_eq!(next_seq().await, 2);
    let acked = dc.report_task_messages(report(&[3])).await.unwrap();
    assert_eq!(acked.into_inner().acked_seq, 4);
    assert_eq!(next_seq().await, 3);
    assert_eq!(next_seq().await, 4);

    s.domain.close_streams();
    let end = loop {
        match watch.next().await {
            Some(Ok(_)) => continue,
            other => break other,
        }
    };
    let status = end.expect("an error, not a clean end").unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    s.stop().await;
}

/// A daemon that connects to a queue longer than its free slots gets that
/// many tasks in one claim, the oldest first, each with its own SpawnTask
/// and dispatch event; the rest stay queued.
async fn a_claim_fills_the_free_slots_oldest_first(backend: Backend) {
    let s = start_server(backend).await;
    let mut queued = Vec::new();
    for i in 0..6 {
        let task = new_task(&s, &format!("t{i}")).await;
        start(&s, &task.id).await;
        queued.push(task.id);
    }
    let (mut dc, daemon_id) = connect_daemon(&s, "m1", 4).await;
    let mut session = Session::open(&mut dc, &daemon_id, vec![]).await;
    let mut spawned = Vec::new();
    for _ in 0..4 {
        let cmd = session.command().await;
        spawned.push(spawn_of(&cmd).task.as_ref().unwrap().id.clone());
    }
    assert_eq!(spawned, queued[..4], "the oldest four, in order");
    for id in &queued[..4] {
        assert_eq!(get(&s, id).await.status, TaskStatus::Dispatched as i32);
        let dispatched = events(&s, id)
            .await
            .iter()
            .filter(|e| e.to_status == TaskStatus::Dispatched as i32)
            .count();
        assert_eq!(dispatched, 1, "one dispatch event");
    }
    for id in &queued[4..] {
        assert_eq!(get(&s, id).await.status, TaskStatus::Queued as i32);
    }
    s.stop().await;
}

/// A permission request still waiting when its task ends is closed
/// (expired), and the task no longer counts it.
async fn an_open_approval_closes_with_its_task(backend: Backend) {
    let s = start_server(backend).await;
    let (mut dc, daemon_id) = connect_daemon(&s, "m1", 2).await;
    let mut session = Session::open(&mut dc, &daemon_id, vec![]).await;
    let asking = session.run_task(&s, "asks").await;
    let ask = pb::TaskMessageInput {
        seq: 1,
        kind: pb::MessageKind::Approval as i32,
        tool_name: "Bash".into(),
        tool_input_json: r#"{"command":"rm -rf build"}"#.into(),
        request_id: "req-1".into(),
        ..Default::default()
    };
    match session.report(&asking.id, vec![ask]).await {
        Down::OutputAck(a) => assert_eq!(a.acked_seq, 1),
        other => panic!("{other:?}"),
    }
    assert_eq!(get(&s, &asking.id).await.pending_approvals, 1);
    session.complete(&asking.id).await;
    let task = get(&s, &asking.id).await;
    assert_eq!(task.status, TaskStatus::Completed as i32);
    assert_eq!(task.pending_approvals, 0);
    let approvals = s
        .tasks()
        .await
        .list_approvals(pb::ListApprovalsRequest {
            task_id: asking.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .approvals;
    assert_eq!(approvals.len(), 1);
    assert_eq!(approvals[0].state, pb::ApprovalState::Expired as i32);
    s.stop().await;
}

/// Appends of several tasks committed as one group: each is stored only if
/// its task's mark is where it expects and the task is active on its daemon
/// in its attempt; the others in the group are stored all the same.
async fn appends_of_many_tasks_commit_as_one_group(backend: Backend) {
    let s = start_server(backend).await;
    let (mut dc, daemon_id) = connect_daemon(&s, "m1", 4).await;
    let mut session = Session::open(&mut dc, &daemon_id, vec![]).await;
    let mut ids = Vec::new();
    for name in ["fresh", "stale", "elsewhere", "also-fresh"] {
        ids.push(session.run_task(&s, name).await.id);
    }
    let lines = |from: i64, n: i64| -> Arc<[NewMessage]> {
        (from..from + n)
            .map(|seq| NewMessage {
                seq,
                kind: MessageKind::Stdout,
                content: format!("line {seq}"),
                tool_name: String::new(),
                tool_input_json: String::new(),
                approval_id: String::new(),
            })
            .collect()
    };
    let append = |task: &str, daemon: &str, old: i64, n: i64| Append {
        task_id: task.into(),
        daemon_id: daemon.into(),
        attempt: 1,
        old,
        messages: lines(old + 1, n),
    };
    let group = [
        append(&ids[0], &daemon_id, 0, 2),
        append(&ids[1], &daemon_id, 5, 1),
        append(&ids[2], "another-daemon", 0, 1),
        append(&ids[3], &daemon_id, 0, 3),
    ];
    let stored = s.store.commit_group(&group).await.unwrap();
    assert_eq!(stored, [true, false, false, true]);
    for (id, want) in ids.iter().zip([2, 0, 0, 3]) {
        let page = first_page(&s, id).await;
        let seqs: Vec<i64> = page.messages.iter().map(|m| m.seq).collect();
        assert_eq!((seqs, page.last_seq), ((1..=want).collect(), want), "{id}");
    }
    s.stop().await;
}

/// Eight daemons print at once, a line a batch, sending every line before
/// reading an ack: each task's lines are stored once, in order, its acks
/// rise to its last line, and its mark ends there.
async fn output_from_many_sessions_at_once(backend: Backend) {
    const LINES: i64 = 40;
    let s = start_server(backend).await;
    let mut printers = tokio::task::JoinSet::new();
    for i in 0..8 {
        let (mut dc, daemon_id) = connect_daemon(&s, &format!("m{i}"), 1).await;
        let mut session = Session::open(&mut dc, &daemon_id, vec![]).await;
        let task = session.run_task(&s, &format!("t{i}")).await;
        printers.spawn(async move {
            for seq in 1..=LINES {
                session
                    .send(Up::Messages(pb::ReportTaskMessagesRequest {
                        task_id: task.id.clone(),
                        messages: vec![pb::TaskMessageInput {
                            seq,
                            kind: pb::MessageKind::Stdout as i32,
                            content: format!("line {seq}"),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }))
                    .await;
            }
            let mut acked = 0;
            while acked < LINES {
                match session.next().await {
                    Down::OutputAck(a) if a.task_id == task.id => {
                        assert!(
                            a.acked_seq > acked,
                            "acks rise: {} after {acked}",
                            a.acked_seq
                        );
                        acked = a.acked_seq;
                    }
                    other => panic!("{other:?}"),
                }
            }
            drop(dc);
            task.id
        });
    }
    while let Some(id) = printers.join_next().await {
        let id = id.unwrap();
        let page = first_page(&s, &id).await;
        let lines: Vec<(i64, String)> = page
            .messages
            .into_iter()
            .map(|m| (m.seq, m.content))
            .collect();
        let want: Vec<(i64, String)> = (1..=LINES)
            .map(|seq| (seq, format!("line {seq}")))
            .collect();
        assert_eq!((lines, page.last_seq), (want, LINES), "{id}");
    }
    s.stop().await;
}

both_backends!(
    output_from_many_sessions_at_once,
    appends_of_many_tasks_commit_as_one_group,
    an_open_approval_closes_with_its_task,
    a_claim_fills_the_free_slots_oldest_first,
    push_dispatch_and_gapless_output,
    stop_and_durable_commands,
    concurrent_claims,
    daemon_tenancy,
    secrets_are_redacted,
    progress_is_shown_on_the_task,
    gaps_hold_output_back_until_filled,
);
