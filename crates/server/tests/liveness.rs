//! Liveness through real gRPC on SQLite and PostgreSQL: silent daemons go
//! offline, their tasks are given up after the grace unless the daemon
//! comes back with them, and dispatches nobody took are queued again.
//! Intervals are milliseconds here; every wait is on an observable event
//! (a stream ending, a status change), bounded by a timeout.

use taskmesh_testkit as common;
use taskmesh_testkit::both_backends;

use std::time::Duration;

use common::daemon::*;
use common::{Backend, TestDb, TestServer, start_server_with};
use taskmesh_server::domain::Liveness;
use taskmesh_server::model::TokenKind;
use taskmesh_server::pb::session_request::Message as Up;
use taskmesh_server::pb::session_response::Message as Down;
use taskmesh_server::pb::{self, TaskStatus};
use tokio_stream::StreamExt;
use tonic::Code;

const HEARTBEAT: Duration = Duration::from_millis(100);
/// Bounds every wait; far above what the sweeps need.
const PATIENCE: Duration = Duration::from_secs(20);

async fn server(backend: Backend, grace_ms: u64, dispatch_timeout_ms: u64) -> TestServer {
    let liveness = Liveness {
        heartbeat: HEARTBEAT,
        grace: Duration::from_millis(grace_ms),
        dispatch_timeout: Duration::from_millis(dispatch_timeout_ms),
        ..Liveness::default()
    };
    start_server_with(TestDb::new(backend).await, liveness).await
}

/// Sends a heartbeat every interval, as a live daemon does, until dropped.
struct Beating(tokio::task::JoinHandle<()>);

impl Drop for Beating {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn keep_beating(session: &Session, daemon_id: &str) -> Beating {
    let up = session.up.clone();
    let daemon_id = daemon_id.to_string();
    Beating(tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT);
        loop {
            tick.tick().await;
            let beat = pb::SessionRequest {
                message: Some(Up::Heartbeat(pb::HeartbeatRequest {
                    daemon_id: daemon_id.clone(),
                    running_task_ids: vec![],
                })),
            };
            if up.send(beat).await.is_err() {
                return;
            }
        }
    }))
}

/// Waits until the task reaches `status`; answers it.
async fn until_status(s: &TestServer, id: &str, status: TaskStatus) -> pb::Task {
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
    tokio::time::timeout(PATIENCE, async {
        while let Some(ev) = watch.next().await {
            if let Some(pb::watch_task_response::Event::Task(t)) = ev.unwrap().event
                && t.status == status as i32
            {
                return t;
            }
        }
        panic!("the watch ended before task {id} became {status:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("task {id} did not become {status:?}"))
}

/// A connected daemon takes the task and reports it started.
async fn run_on(session: &mut Session, s: &TestServer, name: &str) -> pb::Task {
    let task = new_task(s, name).await;
    start(s, &task.id).await;
    let spawn = session.command().await;
    assert_eq!(spawn_of(&spawn).task.as_ref().unwrap().id, task.id);
    session.ack(&spawn.id).await;
    session.started(&task.id, 1).await;
    until_status(s, &task.id, TaskStatus::Running).await
}

/// A daemon that stops beating loses its session (the stream ends
/// UNAVAILABLE), goes offline, and after the grace its running task is
/// interrupted, with the reason recorded.
async fn silent_daemon_goes_offline(backend: Backend) {
    let s = server(backend, 300, 60_000).await;
    let (mut d, id) = connect_daemon(&s, "silent", 1).await;
    let mut session = Session::open(&mut d, &id, vec![]).await;
    let task = run_on(&mut session, &s, "left behind").await;

    let end = tokio::time::timeout(PATIENCE, session.down.next())
        .await
        .expect("the server ends a silent session");
    let status = end.expect("an error, not a clean end").unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("silent"), "{status:?}");

    let t = until_status(&s, &task.id, TaskStatus::Interrupted).await;
    assert!(t.status_reason.contains("lost"), "{t:?}");
    let daemon = s
        .workspaces()
        .await
        .get_daemon(pb::GetDaemonRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner()
        .daemon
        .unwrap();
    assert_eq!(daemon.state, pb::DaemonState::Offline as i32, "{daemon:?}");
}

/// Two daemons drop their sessions; one comes back within the grace and
/// reports its task running, the other stays away. Only the absent one's
/// task is interrupted, and the returning daemon's task still completes.
async fn a_daemon_back_within_the_grace_keeps_its_task(backend: Backend) {
    let s = server(backend, 1_000, 60_000).await;
    let token = s.token_in("default", TokenKind::Daemon).await;
    let mut a = daemon_client(&s, &token).await;
    let mut b = daemon_client(&s, &token).await;
    let a_id = register(&mut a, "returns", 1).await;
    let b_id = register(&mut b, "stays away", 1).await;

    let mut a_session = Session::open(&mut a, &a_id, vec![]).await;
    let a_task = run_on(&mut a_session, &s, "kept").await;
    let mut b_session = Session::open(&mut b, &b_id, vec![]).await;
    let b_task = run_on(&mut b_session, &s, "lost").await;
    drop(a_session);
    drop(b_session);

    let a_session = Session::open(&mut a, &a_id, vec![a_task.id.clone()]).await;
    let _beating = keep_beating(&a_session, &a_id);
    let lost = until_status(&s, &b_task.id, TaskStatus::Interrupted).await;
    assert!(lost.status_reason.contains(&b_id), "{lost:?}");

    let kept = get(&s, &a_task.id).await;
    assert_eq!(kept.status, TaskStatus::Running as i32, "{kept:?}");
    a_session
        .send(Up::Completed(pb::CompleteTaskRequest {
            task_id: a_task.id.clone(),
            ..Default::default()
        }))
        .await;
    until_status(&s, &a_task.id, TaskStatus::Completed).await;
}

/// A SpawnTask the daemon never acknowledges is taken back after the
/// dispatch timeout and the task is dispatched afresh, under a new command.
async fn an_untaken_dispatch_is_queued_again(backend: Backend) {
    let s = server(backend, 60_000, 300).await;
    let (mut d, id) = connect_daemon(&s, "forgetful", 1).await;
    let mut session = Session::open(&mut d, &id, vec![]).await;
    let _beating = keep_beating(&session, &id);
    let task = new_task(&s, "retried").await;
    start(&s, &task.id).await;
    let first = session.command().await;
    assert_eq!(spawn_of(&first).task.as_ref().unwrap().id, task.id);

    let second = tokio::time::timeout(PATIENCE, session.command())
        .await
        .expect("the task is dispatched again");
    assert_eq!(spawn_of(&second).task.as_ref().unwrap().id, task.id);
    assert_ne!(second.id, first.id, "a new command, not a redelivery");

    let events = events(&s, &task.id).await;
    let requeue = events
        .iter()
        .find(|e| {
            e.from_status == TaskStatus::Dispatched as i32
                && e.to_status == TaskStatus::Queued as i32
        })
        .expect("a dispatched -> queued event");
    assert!(requeue.reason.contains("never took it"), "{requeue:?}");

    session.ack(&second.id).await;
    session.started(&task.id, 1).await;
    until_status(&s, &task.id, TaskStatus::Running).await;
}

/// A lost daemon's dispatched (never started) task goes to another daemon
/// after the grace, and the lost daemon's late report is refused.
async fn a_lost_daemons_dispatch_moves_to_another(backend: Backend) {
    let s = server(backend, 300, 60_000).await;
    let token = s.token_in("default", TokenKind::Daemon).await;
    let mut a = daemon_client(&s, &token).await;
    let mut b = daemon_client(&s, &token).await;
    let a_id = register(&mut a, "lost", 1).await;
    let b_id = register(&mut b, "healthy", 1).await;

    let mut a_session = Session::open(&mut a, &a_id, vec![]).await;
    let task = new_task(&s, "moves").await;
    start(&s, &task.id).await;
    a_session.command().await;
    drop(a_session);

    let mut b_session = Session::open(&mut b, &b_id, vec![]).await;
    let _beating = keep_beating(&b_session, &b_id);
    let spawn = tokio::time::timeout(PATIENCE, b_session.command())
        .await
        .expect("the task reaches the healthy daemon");
    assert_eq!(spawn_of(&spawn).task.as_ref().unwrap().id, task.id);
    assert_eq!(get(&s, &task.id).await.daemon_id, b_id);

    let mut late = Session::open(&mut a, &a_id, vec![]).await;
    late.started(&task.id, 1).await;
    match late.next().await {
        Down::Error(e) => {
            assert_eq!(e.code, Code::FailedPrecondition as i32, "{e:?}");
            assert!(e.message.contains("another daemon"), "{e:?}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A SpawnTask the daemon answers FAILED fails its task with the reason.
async fn a_refused_spawn_fails_the_task(backend: Backend) {
    let s = server(backend, 60_000, 60_000).await;
    let (mut d, id) = connect_daemon(&s, "picky", 1).await;
    let mut session = Session::open(&mut d, &id, vec![]).await;
    let task = new_task(&s, "refused").await;
    start(&s, &task.id).await;
    let spawn = session.command().await;
    session
        .send(Up::CommandResult(pb::CommandResult {
            command_id: spawn.id.clone(),
            status: pb::CommandResultStatus::Failed as i32,
            message: "unknown runtime \"shell\"".into(),
            ..Default::default()
        }))
        .await;
    let t = until_status(&s, &task.id, TaskStatus::Failed).await;
    assert!(t.status_reason.contains("unknown runtime"), "{t:?}");
}

/// A SpawnTask rejected for now (the daemon is shutting down, or full) is
/// queued again and taken by another daemon; the task does not fail.
async fn a_rejected_spawn_goes_elsewhere(backend: Backend) {
    let s = server(backend, 60_000, 60_000).await;
    let (mut a, a_id) = connect_daemon(&s, "draining", 1).await;
    let mut a_session = Session::open(&mut a, &a_id, vec![]).await;
    let task = new_task(&s, "moves on").await;
    start(&s, &task.id).await;
    let spawn = a_session.command().await;
    a_session
        .send(Up::CommandResult(pb::CommandResult {
            command_id: spawn.id.clone(),
            status: pb::CommandResultStatus::Rejected as i32,
            message: "daemon is shutting down".into(),
            ..Default::default()
        }))
        .await;
    until_status(&s, &task.id, TaskStatus::Queued).await;

    let (mut b, b_id) = connect_daemon(&s, "healthy", 1).await;
    let mut b_session = Session::open(&mut b, &b_id, vec![]).await;
    let spawn = b_session.command().await;
    assert_eq!(spawn_of(&spawn).task.as_ref().unwrap().id, task.id);
    let t = get(&s, &task.id).await;
    assert_eq!(
        (t.status, t.daemon_id),
        (TaskStatus::Dispatched as i32, b_id)
    );
}

/// A task queued while a daemon with a free slot is connected, whose
/// dispatch never ran (its StartTask's caller went away after the task was
/// queued), is offered by the next sweep.
async fn a_missed_dispatch_is_made_by_the_sweep(backend: Backend) {
    let s = server(backend, 60_000, 60_000).await;
    let (mut d, id) = connect_daemon(&s, "waiting", 1).await;
    let mut session = Session::open(&mut d, &id, vec![]).await;
    let _beating = keep_beating(&session, &id);
    let task = new_task(&s, "missed").await;
    // What a StartTask writes before it dispatches, and nothing after.
    let mut queued = s.store.get_task(&task.id).await.unwrap().unwrap();
    let version = queued.version;
    queued.status = taskmesh_server::model::TaskStatus::Queued;
    queued.version += 1;
    queued.attempt += 1;
    queued.queued_at = Some(taskmesh_server::model::now_micros());
    assert!(s.store.save_task(&mut queued, version, None).await.unwrap());

    let spawn = tokio::time::timeout(PATIENCE, session.command())
        .await
        .expect("the sweep dispatches the queued task");
    assert_eq!(spawn_of(&spawn).task.as_ref().unwrap().id, task.id);
    session.ack(&spawn.id).await;
    session.started(&task.id, 1).await;
    until_status(&s, &task.id, TaskStatus::Running).await;
}

both_backends!(
    silent_daemon_goes_offline,
    a_daemon_back_within_the_grace_keeps_its_task,
    an_untaken_dispatch_is_queued_again,
    a_lost_daemons_dispatch_moves_to_another,
    a_refused_spawn_fails_the_task,
    a_rejected_spawn_goes_elsewhere,
    a_missed_dispatch_is_made_by_the_sweep,
);
