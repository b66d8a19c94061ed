//! The daemon protocol's guarantees through real gRPC on SQLite and
//! PostgreSQL: a task can never run twice, a lost `started` strands
//! nothing, reports after a task's end or for another attempt are refused
//! naming the state, StopTask sends one InterruptTask however often it is
//! called, and a batch the server would not store is refused naming the
//! seq instead of being acknowledged.

use taskmesh_testkit as common;
use taskmesh_testkit::both_backends;

use common::daemon::*;
use common::{Backend, TestServer, start_server};
use taskmesh_server::pb::session_request::Message as Up;
use taskmesh_server::pb::session_response::Message as Down;
use taskmesh_server::pb::{self, MessageKind, StopOutcome, TaskStatus, command::Kind};
use tonic::Code;

/// The (from, to, reason) of every status change of a task, in order.
async fn transitions(s: &TestServer, task_id: &str) -> Vec<(TaskStatus, TaskStatus, String)> {
    events(s, task_id)
        .await
        .into_iter()
        .filter(|e| e.from_status != e.to_status)
        .map(|e| (e.from_status(), e.to_status(), e.reason))
        .collect()
}

/// A daemon takes a task, reports `started` and 200 lines, and its stream
/// drops before the server reads any of it (here: they are never sent).
/// It reconnects and does what the proto says: lists the task as running,
/// resends the output and reports the end. The task completes once, as
/// attempt 1, with each line stored once; the liveness sweep afterwards
/// changes nothing, and the only SpawnTask sent again is the unanswered
/// one, under its own command id.
async fn a_lost_stream_after_start_never_runs_twice(backend: Backend) {
    let s = start_server(backend).await;
    let (mut dc, daemon_id) = connect_daemon(&s, "m1", 2).await;
    let mut first = Session::open(&mut dc, &daemon_id, vec![]).await;
    let task = new_task(&s, "once").await;
    start(&s, &task.id).await;
    let spawn = first.command().await;
    let first_seq = spawn_of(&spawn).first_seq;
    // Its answer to the SpawnTask was lost with the stream, too.
    drop(first);

    let mut second = Session::open(&mut dc, &daemon_id, vec![task.id.clone()]).await;
    let listed = get(&s, &task.id).await;
    assert_eq!(listed.status(), TaskStatus::Running, "{listed:?}");
    // The unanswered SpawnTask comes again under the same command id; the
    // daemon answers it without acting on it twice.
    let again = second.command().await;
    assert_eq!(again.id, spawn.id);
    second.ack(&again.id).await;
    let acked = second
        .output(&task.id, first_seq..first_seq + 200, |seq| {
            format!("line {seq}")
        })
        .await;
    assert_eq!(acked, first_seq + 199);
    second
        .send(Up::Completed(pb::CompleteTaskRequest {
            task_id: task.id.clone(),
            summary: "done".into(),
            daemon_id: daemon_id.clone(),
            attempt: 1,
            ..Default::default()
        }))
        .await;
    // A watch on the task sees the end.
    let ended = until_ended(&s, &task.id).await;
    assert_eq!(ended.status(), TaskStatus::Completed, "{ended:?}");
    assert_eq!(ended.attempt, 1);

    s.domain.sweep().await.unwrap();
    let after = get(&s, &task.id).await;
    assert_eq!(
        (after.status(), after.attempt),
        (TaskStatus::Completed, 1),
        "{after:?}"
    );
    let stored = stored_messages(&s, &task.id).await;
    assert_eq!(stored.len(), 200);
    let steps: Vec<_> = transitions(&s, &task.id)
        .await
        .into_iter()
        .map(|(from, to, _)| (from, to))
        .collect();
    assert_eq!(
        steps,
        [
            (TaskStatus::Unspecified, TaskStatus::Pending),
            (TaskStatus::Pending, TaskStatus::Queued),
            (TaskStatus::Queued, TaskStatus::Dispatched),
            (TaskStatus::Dispatched, TaskStatus::Running),
            (TaskStatus::Running, TaskStatus::Completed),
        ]
    );
    // Had a SpawnTask been queued again for this daemon, a new session would
    // get it before anything else; it gets the next task's instead.
    drop(second);
    let mut third = Session::open(&mut dc, &daemon_id, vec![]).await;
    let next = new_task(&s, "next").await;
    start(&s, &next.id).await;
    let cmd = third.command().await;
    assert_eq!(spawn_of(&cmd).task.as_ref().unwrap().id, next.id);
    s.stop().await;
}

/// Waits for the task to reach a final status through WatchTask.
async fn until_ended(s: &TestServer, id: &str) -> pb::Task {
    use tokio_stream::StreamExt;
    let mut watch = s
        .tasks()
        .await
        .watch_task(pb::WatchTaskRequest {
            task_id: id.into(),
            since_seq: i64::MAX,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        if let Some(pb::watch_task_response::Event::Task(t)) =
            watch.next().await.expect("watch open").unwrap().event
            && matches!(
                t.status(),
                TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
            )
        {
            return t;
        }
    }
}

/// A claimed task for unary reports: (daemon client, daemon id, task id).
async fn claimed(s: &TestServer, name: &str) -> (Daemons, String, String) {
    let (mut dc, daemon_id) = connect_daemon(s, name, 4).await;
    let id = claimed_task(s, &mut dc, &daemon_id, name).await;
    (dc, daemon_id, id)
}

/// Output that arrives before `started`, or an end that arrives before
/// either, starts the task first: each step is an event saying why.
async fn output_or_end_first_starts_the_task(backend: Backend) {
    let s = start_server(backend).await;
    let (mut dc, daemon_id, output_first) = claimed(&s, "output-first").await;
    let acked = dc
        .report_task_messages(pb::ReportTaskMessagesRequest {
            task_id: output_first.clone(),
            messages: vec![stdout(1, "hello")],
            daemon_id: daemon_id.clone(),
            attempt: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .acked_seq;
    assert_eq!(acked, 1);
    assert_eq!(get(&s, &output_first).await.status(), TaskStatus::Running);
    let started = transitions(&s, &output_first).await;
    let (_, to, reason) = started.last().unwrap();
    assert_eq!(*to, TaskStatus::Running);
    assert!(reason.contains("output arrived first"), "{reason}");

    let (mut dc, daemon_id, end_first) = claimed(&s, "end-first").await;
    let done = dc
        .complete_task(pb::CompleteTaskRequest {
            task_id: end_first.clone(),
            daemon_id: daemon_id.clone(),
            attempt: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(done.status(), TaskStatus::Completed);
    let steps = transitions(&s, &end_first).await;
    let n = steps.len();
    assert_eq!(
        (steps[n - 2].0, steps[n - 2].1, steps[n - 1].1),
        (
            TaskStatus::Dispatched,
            TaskStatus::Running,
            TaskStatus::Completed
        )
    );
    assert!(steps[n - 2].2.contains("end arrived first"), "{steps:?}");
    s.stop().await;
}

/// After a task's end: output and a different end are refused with
/// FAILED_PRECONDITION naming the state; the same end again is answered
/// with the recorded end (a resend after a reconnect). A report for
/// another attempt is refused too, on the unary path and the Session.
async fn reports_after_the_end_or_for_another_attempt_are_refused(backend: Backend) {
    let s = start_server(backend).await;
    let (mut dc, daemon_id, id) = claimed(&s, "ended").await;
    let messages = |attempt: i32, seq: i64| pb::ReportTaskMessagesRequest {
        task_id: id.clone(),
        messages: vec![stdout(seq, "late")],
        daemon_id: daemon_id.clone(),
        attempt,
    };
    let err = dc.report_task_messages(messages(2, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("attempt"), "{err:?}");

    let complete = pb::CompleteTaskRequest {
        task_id: id.clone(),
        summary: "done".into(),
        daemon_id: daemon_id.clone(),
        attempt: 1,
        ..Default::default()
    };
    dc.complete_task(complete.clone()).await.unwrap();
    let again = dc.complete_task(complete).await.unwrap().into_inner();
    assert_eq!(again.task.unwrap().status(), TaskStatus::Completed);

    let err = dc
        .fail_task(pb::FailTaskRequest {
            task_id: id.clone(),
            reason: "changed my mind".into(),
            daemon_id: daemon_id.clone(),
            attempt: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("completed"), "{err:?}");

    let err = dc.report_task_messages(messages(1, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("completed"), "{err:?}");

    // The same refusals on the Session.
    let mut session = Session::open(&mut dc, &daemon_id, vec![]).await;
    match session.report(&id, vec![stdout(1, "late")]).await {
        Down::Error(e) => {
            assert_eq!(e.task_id, id);
            assert_eq!(e.code, Code::FailedPrecondition as i32, "{e:?}");
            assert!(e.message.contains("completed"), "{e:?}");
        }
        other => panic!("output after the end was answered {other:?}"),
    }
    let got = get(&s, &id).await;
    assert_eq!((got.status(), got.last_seq), (TaskStatus::Completed, 0));
    s.stop().await;
}

/// StopTask on a running task sends one InterruptTask and says so; asked
/// again it answers ALREADY_STOPPING and sends nothing more (the next
/// command the daemon gets is the SendInput that follows).
async fn stop_task_twice_interrupts_once(backend: Backend) {
    let s = start_server(backend).await;
    let (mut dc, daemon_id) = connect_daemon(&s, "m1", 1).await;
    let mut session = Session::open(&mut dc, &daemon_id, vec![]).await;
    let task = session.run_task(&s, "stoppable").await;

    let stop = || async {
        s.tasks()
            .await
            .stop_task(pb::StopTaskRequest {
                id: task.id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .outcome()
    };
    assert_eq!(stop().await, StopOutcome::Interrupting);
    assert_eq!(stop().await, StopOutcome::AlreadyStopping);
    assert_eq!(stop().await, StopOutcome::AlreadyStopping);
    let interrupt = session.command().await;
    assert!(
        matches!(interrupt.kind, Some(Kind::InterruptTask(_))),
        "{interrupt:?}"
    );
    s.tasks()
        .await
        .send_message(pb::SendMessageRequest {
            task_id: task.id.clone(),
            text: "still there?".into(),
        })
        .await
        .unwrap();
    let next = session.command().await;
    assert!(matches!(next.kind, Some(Kind::SendInput(_))), "{next:?}");
    s.stop().await;
}

fn message(seq: i64, kind: MessageKind) -> pb::TaskMessageInput {
    pb::TaskMessageInput {
        seq,
        kind: kind as i32,
        content: format!("message {seq}"),
        ..Default::default()
    }
}

/// Batches the server would not store as sent are refused whole, naming
/// the seq, on the unary path (INVALID_ARGUMENT) and the Session (a
/// SessionError), and nothing of them is stored or acknowledged.
async fn bad_batches_are_refused_naming_the_seq(backend: Backend) {
    let s = start_server(backend).await;
    let (mut dc, daemon_id, id) = claimed(&s, "batches").await;
    let kindless = message(2, MessageKind::Unspecified);
    let long_tool = pb::TaskMessageInput {
        tool_name: "t".repeat(257),
        ..message(3, MessageKind::ToolUse)
    };
    let big_input = pb::TaskMessageInput {
        tool_name: "Bash".into(),
        tool_input_json: format!("\"{}\"", "x".repeat(256 * 1024)),
        ..message(4, MessageKind::ToolUse)
    };
    let cases: Vec<(Vec<pb::TaskMessageInput>, &str)> = vec![
        (vec![message(1, MessageKind::Stdout), kindless], "seq 2"),
        (vec![message(0, MessageKind::Stdout)], "seq 0"),
        (vec![message(-5, MessageKind::Stdout)], "seq -5"),
        (vec![message(100_001, MessageKind::Stdout)], "seq 100001"),
        (vec![long_tool], "seq 3"),
        (vec![big_input], "seq 4"),
    ];
    let mut session = Session::open(&mut dc, &daemon_id, vec![id.clone()]).await;
    for (batch, names) in cases {
        let err = dc
            .report_task_messages(pb::ReportTaskMessagesRequest {
                task_id: id.clone(),
                messages: batch.clone(),
                daemon_id: daemon_id.clone(),
                attempt: 1,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{names}: {err:?}");
        assert!(err.message().contains(names), "{names}: {err:?}");
        match session.report(&id, batch).await {
            Down::Error(e) => {
                assert_eq!(e.code, Code::InvalidArgument as i32, "{names}: {e:?}");
                assert!(e.message.contains(names), "{names}: {e:?}");
            }
            other => panic!("{names}: answered {other:?}"),
        }
    }
    let too_many: Vec<_> = (1..=5001).map(|seq| stdout(seq, "x")).collect();
    let err = dc
        .report_task_messages(pb::ReportTaskMessagesRequest {
            task_id: id.clone(),
            messages: too_many,
            daemon_id: daemon_id.clone(),
            attempt: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("5000"), "{err:?}");

    assert_eq!(get(&s, &id).await.last_seq, 0, "nothing was stored");
    assert_eq!(session.output(&id, 1..=2, |_| "ok".into()).await, 2);
    s.stop().await;
}

both_backends!(
    a_lost_stream_after_start_never_runs_twice,
    output_or_end_first_starts_the_task,
    reports_after_the_end_or_for_another_attempt_are_refused,
    stop_task_twice_interrupts_once,
    bad_batches_are_refused_naming_the_seq,
);
