//! Two replicas on one PostgreSQL database, as `taskmesh serve` runs them
//! to scale out: a daemon holds its session on replica A while a user works
//! on replica B. A task started on B reaches the daemon on A; its output
//! and status changes reach B's watchers; a stop on B interrupts it on A.
//! PostgreSQL only: LISTEN/NOTIFY is the bridge (SQLite has one process).

use taskmesh_testkit as common;

use common::daemon::*;
use common::{Backend, postgres_enabled, start_replica, start_server};
use taskmesh_server::model::TokenKind;
use taskmesh_server::pb::session_request::Message as Up;
use taskmesh_server::pb::{self, TaskStatus, command::Kind, watch_task_response::Event};
use tokio_stream::StreamExt;

const PATIENCE: std::time::Duration = std::time::Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_dispatch_output_and_commands() {
    if !postgres_enabled() {
        return;
    }
    let a = start_server(Backend::Postgres).await;
    let b = start_replica(&a).await;

    let token = a.token_in("default", TokenKind::Daemon).await;
    let mut dc = daemon_client(&a, &token).await;
    let daemon_id = register(&mut dc, "on-a", 2).await;
    let mut session = Session::open(&mut dc, &daemon_id, vec![]).await;

    let mut on_b = b.tasks().await;
    let mut changes = on_b
        .watch_tasks(pb::WatchTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    let task = new_task(&b, "across replicas").await;
    let mut watch = on_b
        .watch_task(pb::WatchTaskRequest {
            task_id: task.id.clone(),
            since_seq: 0,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    on_b.start_task(pb::StartTaskRequest {
        id: task.id.clone(),
        daemon_id: String::new(),
    })
    .await
    .unwrap();

    // Started on B, pushed to the daemon on A.
    let spawn = tokio::time::timeout(PATIENCE, session.command())
        .await
        .expect("the daemon on A gets the task started on B");
    assert_eq!(spawn_of(&spawn).task.as_ref().unwrap().id, task.id);
    // B's workspace watcher hears of the dispatch that happened on A.
    tokio::time::timeout(PATIENCE, async {
        while let Some(c) = changes.next().await {
            let t = c.unwrap().task.unwrap();
            if t.id == task.id && t.status == TaskStatus::Dispatched as i32 {
                return;
            }
        }
    })
    .await
    .expect("WatchTasks on B sees the dispatch on A");

    session.ack(&spawn.id).await;
    session.started(&task.id, 1).await;
    for chunk in 0..5 {
        let first = chunk * 10 + 1;
        let acked = session
            .output(&task.id, first..first + 10, |seq| format!("line {seq}"))
            .await;
        assert_eq!(acked, first + 9);
    }

    // Output ingested on A reaches B's watcher, in order, once.
    let mut seen = Vec::new();
    let mut running = false;
    tokio::time::timeout(PATIENCE, async {
        while seen.len() < 50 {
            match watch.next().await.expect("watch open").unwrap().event {
                Some(Event::Message(m)) => seen.push((m.seq, m.content)),
                Some(Event::Task(t)) => running |= t.status == TaskStatus::Running as i32,
                None => {}
            }
        }
    })
    .await
    .expect("B's watcher gets the output stored on A");
    let expected: Vec<(i64, String)> = (1..=50).map(|s| (s, format!("line {s}"))).collect();
    assert_eq!(seen, expected);
    assert!(running, "B's watcher saw the task start on A");

    // A stop on B: the daemon is online (on A), so it is interrupted, not
    // cancelled out from under it.
    let stopped = on_b
        .stop_task(pb::StopTaskRequest {
            id: task.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(stopped.status, TaskStatus::Running as i32, "{stopped:?}");
    let interrupt = tokio::time::timeout(PATIENCE, session.command())
        .await
        .expect("the InterruptTask issued on B reaches the daemon on A");
    assert!(
        matches!(interrupt.kind, Some(Kind::InterruptTask(_))),
        "{interrupt:?}"
    );
    session.ack(&interrupt.id).await;
    session
        .send(Up::Failed(pb::FailTaskRequest {
            task_id: task.id.clone(),
            reason: "interrupted".into(),
            ..Default::default()
        }))
        .await;
    tokio::time::timeout(PATIENCE, async {
        while let Some(ev) = watch.next().await {
            if let Some(Event::Task(t)) = ev.unwrap().event
                && t.status == TaskStatus::Cancelled as i32
            {
                return;
            }
        }
    })
    .await
    .expect("B's watcher sees the task end cancelled");
    b.stop().await;
    a.stop().await;
}
