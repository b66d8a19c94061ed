//! Retention with a clock the test controls, on SQLite and PostgreSQL:
//! output of tasks that ended longer ago than --retain-output is removed
//! (in batches, past one statement's worth) while the task, its events and
//! a running task's output stay; reading it says it was pruned; whole
//! tasks past --retain-tasks go, subtasks before their parent.

use std::time::Duration;

use taskmesh_testkit as common;
use taskmesh_testkit::both_backends;

use common::daemon::*;
use common::{Backend, TestDb, start_server_with_limits};
use taskmesh_server::domain::{Limits, RetentionReport};
use taskmesh_server::model::now_micros;
use taskmesh_server::pb::session_request::Message as Up;
use taskmesh_server::pb::session_response::Message as Down;
use taskmesh_server::pb::{self, TaskStatus, watch_task_response::Event};
use tokio_stream::StreamExt;
use tonic::Code;

const DAY: i64 = 86_400 * 1_000_000;

async fn retention(backend: Backend) {
    let limits = Limits {
        retain_output: Some(Duration::from_secs(30 * 86_400)),
        retain_tasks: Some(Duration::from_secs(90 * 86_400)),
        ..Limits::default()
    };
    let s = start_server_with_limits(TestDb::new(backend).await, limits).await;
    let (mut dc, daemon_id) = connect_daemon(&s, "m1", 4).await;
    let mut session = Session::open(&mut dc, &daemon_id, vec![]).await;
    let line = |seq: i64| format!("line {seq}");

    // One task runs to its end with 1,200 lines; another keeps running.
    let mut tasks = s.tasks().await;
    let run = |name: &'static str| {
        let s = &s;
        async move {
            let task = new_task(s, name).await;
            start(s, &task.id).await;
            task
        }
    };
    let done = run("done").await;
    let cmd = session.command().await;
    session.ack(&cmd.id).await;
    session.started(&done.id, 1).await;
    assert_eq!(session.output(&done.id, 1..=1200, line).await, 1200);
    session
        .send(Up::Completed(pb::CompleteTaskRequest {
            task_id: done.id.clone(),
            summary: "done".into(),
            ..Default::default()
        }))
        .await;
    match session.next().await {
        Down::OutputAck(a) => assert!(a.task_ended),
        other => panic!("{other:?}"),
    }
    let running = run("running").await;
    let cmd = session.command().await;
    session.ack(&cmd.id).await;
    session.started(&running.id, 1).await;
    assert_eq!(session.output(&running.id, 1..=10, line).await, 10);
    // A parent and its subtask, both cancelled before they ran.
    let parent = new_task(&s, "parent").await;
    let child = new_subtask(&s, "child", &parent.id).await;
    for id in [&child.id, &parent.id] {
        tasks
            .stop_task(pb::StopTaskRequest { id: id.clone() })
            .await
            .unwrap();
    }
    let now = now_micros();

    // Not old enough yet: nothing goes.
    let nothing = s.domain.apply_retention(now + 29 * DAY).await.unwrap();
    assert_eq!(nothing, RetentionReport::default());

    // 31 days on: the ended task's output goes, all of it.
    let pruned = s.domain.apply_retention(now + 31 * DAY).await.unwrap();
    assert_eq!(
        (
            pruned.outputs_pruned,
            pruned.messages_deleted,
            pruned.tasks_deleted
        ),
        (1, 1200, 0),
        "{pruned:?}"
    );
    let page = first_page(&s, &done.id).await;
    assert!(page.messages.is_empty());
    assert_eq!((page.pruned_through_seq, page.last_seq), (1200, 1200));
    let task = get(&s, &done.id).await;
    assert_eq!(task.status, TaskStatus::Completed as i32, "the task stays");
    assert_eq!(task.output_pruned_seq, 1200);
    assert!(events(&s, &done.id).await.len() >= 4, "its events stay");
    // The running task's output is untouched.
    assert_eq!(stored_messages(&s, &running.id).await.len(), 10);
    // A watch of the pruned task says so and ends: nothing to replay.
    let mut watch = tasks
        .watch_task(pb::WatchTaskRequest {
            task_id: done.id.clone(),
            since_seq: 0,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    match watch.next().await.unwrap().unwrap().event {
        Some(Event::Task(t)) => assert_eq!(t.output_pruned_seq, 1200),
        other => panic!("{other:?}"),
    }
    assert!(watch.next().await.is_none(), "no message to replay");
    // Done is done: a second sweep finds nothing.
    let again = s.domain.apply_retention(now + 31 * DAY).await.unwrap();
    assert_eq!(again, RetentionReport::default());

    // 91 days on: the ended tasks go whole, the subtask before its parent
    // in the same sweep; the running one stays.
    let gone = s.domain.apply_retention(now + 91 * DAY).await.unwrap();
    assert_eq!(gone.tasks_deleted, 3, "{gone:?}");
    for id in [&done.id, &parent.id, &child.id] {
        let err = tasks
            .get_task(pb::GetTaskRequest { id: id.clone() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    }
    assert_eq!(
        get(&s, &running.id).await.status,
        TaskStatus::Running as i32
    );
    s.stop().await;
}

both_backends!(retention);
