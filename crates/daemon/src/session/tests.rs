//! The session against a mock server: commands answered once, capacity
//! and shutdown refusals, a task run and its output resent after a
//! reconnect, and a graceful stop that interrupts and reports.

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::sync::oneshot;
use tokio::time::timeout;
use tonic::transport::Endpoint;

use super::mock::*;
use super::uplink::CODE_NOT_FOUND;
use super::*;
use crate::RuntimeDef;
use crate::client::open_session;
use crate::pb::daemon_service_client::DaemonServiceClient;
use crate::pb::{
    Command, CommandResultStatus, InterruptTask, OutputAck, SendInput, SessionError, SpawnTask,
    Task, command,
};
use taskmesh_proto::Bearer;

fn test_config(max_tasks: usize) -> (Arc<Config>, PathBuf) {
    let dir = std::env::temp_dir().join(format!("taskmesh-session-{}", uuid::Uuid::new_v4()));
    let cfg = Config {
        machine_id: uuid::Uuid::new_v4().to_string(),
        hostname: "test-host".into(),
        work_dir: dir.clone(),
        runtimes: vec![RuntimeDef {
            name: "shell".into(),
            agent: crate::agents::AgentKind::Shell,
            version: "builtin".into(),
        }],
        max_tasks,
        interrupt_grace: Duration::from_secs(1),
        silence_limit: None,
        shutdown_grace: Duration::from_secs(5),
        hidden_secrets: Vec::new(),
        server_url: String::new(),
        ca_cert: None,
        keep_worktrees: None,
        clone_targets: Vec::new(),
        _state_lock: None,
    };
    (Arc::new(cfg), dir)
}

fn client_for(url: &str) -> Client {
    let channel = Endpoint::from_shared(url.to_owned())
        .expect("endpoint")
        .connect_lazy();
    DaemonServiceClient::with_interceptor(channel, Bearer::new("tmd_test").expect("token"))
}

/// The client of the server the session would try next.
async fn current_client(s: &mut Session) -> Client {
    s.choose_server()
        .await
        .flatten()
        .expect("a client for the mock server")
}

/// The servers of a daemon that knows the mock servers at `addrs`.
fn servers_for(addrs: &[SocketAddr]) -> Servers {
    let urls = addrs.iter().map(|a| format!("http://{a}")).collect();
    Servers::new(urls, Box::new(|url, _| Ok(client_for(url))))
}

fn offline_session(max_tasks: usize) -> (Session, PathBuf) {
    let (cfg, dir) = test_config(max_tasks);
    let client = servers_for(&[SocketAddr::from(([127, 0, 0, 1], 9))]);
    (
        Session::new(cfg, client, Box::pin(futures_util::stream::pending())),
        dir,
    )
}

fn spawn_cmd(id: &str, task_id: &str, plan: &str, first_seq: i64) -> Command {
    Command {
        id: id.into(),
        task_id: task_id.into(),
        kind: Some(command::Kind::SpawnTask(SpawnTask {
            task: Some(Task {
                id: task_id.into(),
                plan: plan.into(),
                runtime: "shell".into(),
                attempt: 2,
                ..Default::default()
            }),
            first_seq,
            ..Default::default()
        })),
    }
}

fn results(s: &mut Session) -> Vec<(String, CommandResultStatus, String)> {
    s.control_out
        .drain(..)
        .filter_map(|r| match r.message {
            Some(Up::CommandResult(c)) => Some((
                c.command_id,
                CommandResultStatus::try_from(c.status).unwrap_or_default(),
                c.message,
            )),
            _ => None,
        })
        .collect()
}

/// `cfg` with this shutdown wait, a short interrupt grace and no
/// watchdog.
fn shutting_down_in(cfg: &Config, wait: Duration) -> Arc<Config> {
    Arc::new(Config {
        shutdown_grace: wait,
        interrupt_grace: Duration::from_millis(200),
        silence_limit: None,
        ..cfg.clone()
    })
}

async fn pump_until(s: &mut Session, stop: impl Fn(&RunnerEvent) -> bool) {
    loop {
        let ev = timeout(Duration::from_secs(30), s.events_rx.recv())
            .await
            .expect("runner event in time")
            .expect("channel open");
        let done = stop(&ev);
        s.on_runner_event(ev);
        if done {
            return;
        }
    }
}

#[tokio::test]
async fn unsupported_commands_and_redelivery() {
    let (mut s, _dir) = offline_session(4);
    let cmd = Command {
        id: "c1".into(),
        task_id: "t".into(),
        // A kind this daemon does not know (a newer server's).
        kind: None,
    };
    s.on_command(cmd.clone());
    s.on_command(cmd);
    let r = results(&mut s);
    assert_eq!(r.len(), 2);
    assert!(r.iter().all(|(id, st, msg)| id == "c1"
        && *st == CommandResultStatus::Unsupported
        && msg.contains("unknown command kind")));

    s.on_command(Command {
        id: "c2".into(),
        task_id: "nope".into(),
        kind: Some(command::Kind::InterruptTask(InterruptTask {
            grace_seconds: 1,
        })),
    });
    s.on_command(Command {
        id: "c3".into(),
        task_id: "nope".into(),
        kind: Some(command::Kind::SendInput(SendInput { text: "x".into() })),
    });
    s.on_command(Command {
        id: String::new(),
        task_id: "nope".into(),
        kind: None,
    });
    let r = results(&mut s);
    assert_eq!(r.len(), 2, "a command without id is not answered");
    assert!(
        r.iter()
            .all(|(_, st, msg)| *st == CommandResultStatus::Failed && msg.contains("not running"))
    );
}

#[tokio::test]
async fn spawn_is_refused_at_capacity_when_running_and_on_shutdown() {
    let (mut s, dir) = offline_session(1);
    s.on_command(spawn_cmd("c1", "t1", "read x", 1));
    pump_until(&mut s, |e| matches!(e, RunnerEvent::Started { .. })).await;
    let r = results(&mut s);
    assert_eq!(r[0].1, CommandResultStatus::Ok);

    s.on_command(spawn_cmd("c2", "t1", "true", 1));
    s.on_command(spawn_cmd("c3", "t2", "true", 1));
    s.on_command(spawn_cmd("c4", "../evil", "true", 1));
    let r = results(&mut s);
    assert!(r[0].2.contains("already running"), "{r:?}");
    assert!(r[1].2.contains("limit of 1"), "{r:?}");
    assert_eq!(
        r[1].1,
        CommandResultStatus::Rejected,
        "full: run it elsewhere"
    );
    assert!(r[2].2.contains("invalid task id"), "{r:?}");
    assert_eq!(r[2].1, CommandResultStatus::Failed);

    s.begin_shutdown();
    s.on_command(spawn_cmd("c5", "t3", "true", 1));
    let r = results(&mut s);
    assert_eq!(r[0].2, "daemon is shutting down");
    assert_eq!(r[0].1, CommandResultStatus::Rejected);

    // The server no longer knows t1: it is forgotten and its agent killed.
    s.on_session_error(SessionError {
        task_id: "t1".into(),
        code: CODE_NOT_FOUND,
        message: "gone".into(),
    });
    assert!(s.tasks.is_empty());
    pump_until(&mut s, |e| matches!(e, RunnerEvent::Ended { .. })).await;
    let _ = std::fs::remove_dir_all(dir);
}

// --- an in-process server speaking the session protocol ---

#[tokio::test]
async fn session_runs_a_task_and_resends_after_a_reconnect() {
    let (addr, mut mock) = start_mock().await;
    let (cfg, dir) = test_config(4);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let session = Session::new(
        cfg,
        servers_for(&[addr]),
        Box::pin(futures_util::stream::once(async move {
            let _ = stop_rx.await;
        })),
    );
    let daemon = tokio::spawn(session.run());

    // First session: spawn a task; acknowledge nothing.
    let (c1, down1, open) = connect(&mut mock).await;
    assert!(open.running_task_ids.is_empty());
    let plan = "echo one; echo two >&2; echo three";
    down1
        .send(down(Down::Command(spawn_cmd("cmd-1", "t1", plan, 5))))
        .expect("send");
    match next_up(&mut mock, c1).await {
        Up::Started(s) => {
            assert_eq!((s.task_id.as_str(), s.attempt), ("t1", 2));
            assert!(s.pid > 0);
        }
        other => panic!("expected started, got {other:?}"),
    }
    match next_up(&mut mock, c1).await {
        Up::CommandResult(r) => {
            assert_eq!(r.command_id, "cmd-1");
            assert_eq!(r.status, CommandResultStatus::Ok as i32);
        }
        other => panic!("expected the command result, got {other:?}"),
    }
    let mut seqs = Vec::new();
    loop {
        match next_up(&mut mock, c1).await {
            Up::Messages(m) => {
                assert_eq!(m.attempt, 2, "output names its attempt");
                seqs.extend(m.messages.iter().map(|m| m.seq));
            }
            Up::Completed(c) => {
                assert_eq!((c.task_id.as_str(), c.attempt), ("t1", 2));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seqs, [5, 6, 7], "all output before the end report");

    // Acknowledge part of it, then break the stream.
    down1
        .send(down(Down::OutputAck(OutputAck {
            task_id: "t1".into(),
            acked_seq: 5,
            task_ended: false,
        })))
        .expect("send");
    down1
        .send(Err(Status::unavailable("test: connection lost")))
        .expect("send");

    // Second session: unacknowledged output, then the end, come again.
    let (c2, down2, open) = connect(&mut mock).await;
    assert!(open.running_task_ids.is_empty(), "the task has ended");
    // The spawn command is redelivered: answered, not run again.
    down2
        .send(down(Down::Command(spawn_cmd("cmd-1", "t1", plan, 5))))
        .expect("send");
    let mut seqs = Vec::new();
    let mut completed = false;
    let mut answered = false;
    while !(completed && answered) {
        match next_up(&mut mock, c2).await {
            Up::Messages(m) => {
                assert!(!completed, "output after the end report");
                seqs.extend(m.messages.iter().map(|m| m.seq));
            }
            Up::Completed(_) => completed = true,
            Up::CommandResult(r) => {
                assert_eq!(r.command_id, "cmd-1");
                assert_eq!(r.status, CommandResultStatus::Ok as i32);
                answered = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seqs, [6, 7]);
    down2
        .send(down(Down::OutputAck(OutputAck {
            task_id: "t1".into(),
            acked_seq: 7,
            task_ended: true,
        })))
        .expect("send");

    // Graceful stop: nothing runs, so the daemon deregisters and returns.
    stop_tx.send(()).expect("stop");
    loop {
        match next_event(&mut mock).await {
            MockEvent::Deregistered(id) => {
                assert_eq!(id, "d1");
                break;
            }
            MockEvent::Up(_, _) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    timeout(Duration::from_secs(30), daemon)
        .await
        .expect("daemon returns")
        .expect("no panic")
        .expect("no refusal");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn shutdown_interrupts_running_tasks_and_reports_them() {
    let (addr, mut mock) = start_mock().await;
    let (cfg, dir) = test_config(4);
    let cfg = shutting_down_in(&cfg, Duration::from_millis(50));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let session = Session::new(
        cfg,
        servers_for(&[addr]),
        Box::pin(futures_util::stream::once(async move {
            let _ = stop_rx.await;
        })),
    );
    let daemon = tokio::spawn(session.run());
    let (c1, down1, _) = connect(&mut mock).await;
    down1
        .send(down(Down::Command(spawn_cmd(
            "cmd-1",
            "t1",
            "echo started; sleep 1000",
            1,
        ))))
        .expect("send");
    // Wait for the agent's first line, so it surely runs.
    loop {
        if let Up::Messages(m) = next_up(&mut mock, c1).await {
            down1
                .send(down(Down::OutputAck(OutputAck {
                    task_id: "t1".into(),
                    acked_seq: m.messages.last().map_or(0, |m| m.seq),
                    task_ended: false,
                })))
                .expect("send");
            break;
        }
    }
    stop_tx.send(()).expect("stop");
    down1
        .send(down(Down::Command(spawn_cmd("cmd-2", "t2", "true", 1))))
        .expect("send");
    let mut refused = false;
    loop {
        match next_up(&mut mock, c1).await {
            Up::CommandResult(r) if r.command_id == "cmd-2" => {
                assert_eq!(r.status, CommandResultStatus::Rejected as i32);
                assert_eq!(r.message, "daemon is shutting down");
                refused = true;
            }
            Up::Failed(f) => {
                assert_eq!(f.task_id, "t1");
                assert_eq!(f.reason, "interrupted");
                assert!(
                    f.requeue,
                    "a task cut short by shutdown goes back to the queue"
                );
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(refused, "spawn refused before the end report");
    down1
        .send(down(Down::OutputAck(OutputAck {
            task_id: "t1".into(),
            acked_seq: 1,
            task_ended: true,
        })))
        .expect("send");
    loop {
        match next_event(&mut mock).await {
            MockEvent::Deregistered(_) => break,
            MockEvent::Up(_, _) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    timeout(Duration::from_secs(30), daemon)
        .await
        .expect("daemon returns")
        .expect("no panic")
        .expect("no refusal");
    let _ = std::fs::remove_dir_all(dir);
}

/// The first stop request drains and lets the running task go on (the
/// wait here is ten minutes); the second interrupts it at once, and its end
/// asks the server to queue it again.
#[tokio::test]
async fn a_second_stop_request_interrupts_at_once() {
    let (addr, mut mock) = start_mock().await;
    let (cfg, dir) = test_config(4);
    let cfg = shutting_down_in(&cfg, Duration::from_secs(600));
    let (stops, stop_rx) = mpsc::unbounded_channel::<()>();
    let stop_rx = futures_util::stream::unfold(stop_rx, |mut rx| async move {
        rx.recv().await.map(|()| ((), rx))
    });
    let daemon = tokio::spawn(Session::new(cfg, servers_for(&[addr]), Box::pin(stop_rx)).run());
    let (c1, down1, _) = connect(&mut mock).await;
    down1
        .send(down(Down::Command(spawn_cmd(
            "cmd-1",
            "t1",
            "echo started; sleep 1000",
            1,
        ))))
        .expect("send");
    while !matches!(next_up(&mut mock, c1).await, Up::Messages(_)) {}
    stops.send(()).expect("first stop");
    down1
        .send(down(Down::Command(spawn_cmd("cmd-2", "t2", "true", 1))))
        .expect("send");
    loop {
        match next_up(&mut mock, c1).await {
            Up::CommandResult(r) if r.command_id == "cmd-2" => {
                assert_eq!(r.status, CommandResultStatus::Rejected as i32);
                break;
            }
            Up::Failed(f) => panic!("the first stop request ended the task: {f:?}"),
            _ => {}
        }
    }
    stops.send(()).expect("second stop");
    loop {
        if let Up::Failed(f) = next_up(&mut mock, c1).await {
            assert_eq!(f.task_id, "t1");
            assert!(f.requeue, "cut short by the shutdown: queue it again");
            break;
        }
    }
    daemon.abort();
    let _ = std::fs::remove_dir_all(dir);
}

/// Each way a session ends is named, so the loop can tell a stream the
/// server closed from one that broke, and a refusal from a hiccup.
#[tokio::test]
async fn a_session_says_why_it_ended() {
    let (addr, mut mock) = start_mock().await;
    let (cfg, dir) = test_config(1);
    let mut s = Session::new(
        cfg,
        servers_for(&[addr]),
        Box::pin(futures_util::stream::pending()),
    );
    let opening = open_session(current_client(&mut s).await, s.register_request(), vec![]);
    let serving = async {
        let conn = opening.await.expect("a session opens");
        s.serve(conn).await
    };
    let server = async {
        let (_conn, down, _open) = connect(&mut mock).await;
        // The server ends the stream cleanly...
        drop(down);
    };
    let (end, ()) = tokio::join!(serving, server);
    assert!(matches!(end, SessionEnd::ServerClosed), "{end}");
    assert_eq!(end.to_string(), "the server closed the session");

    // ...or with an error.
    let opening = open_session(current_client(&mut s).await, s.register_request(), vec![]);
    let serving = async {
        let conn = opening.await.expect("a session opens");
        s.serve(conn).await
    };
    let server = async {
        let (_conn, down, _open) = connect(&mut mock).await;
        down.send(Err(Status::unavailable("going away")))
            .expect("send");
    };
    let (end, ()) = tokio::join!(serving, server);
    match end {
        SessionEnd::StreamFailed(s) => assert_eq!(s.code(), tonic::Code::Unavailable),
        other => panic!("expected a failed stream, got {other}"),
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A server that refuses the daemon's token at Register ends the daemon
/// with that refusal instead of retrying forever; a server that is merely
/// unavailable is retried.
#[tokio::test]
async fn a_refused_token_ends_the_daemon() {
    for code in [tonic::Code::Unauthenticated, tonic::Code::PermissionDenied] {
        let (addr, _mock) = start_mock_with(Some(Status::new(code, "token revoked"))).await;
        let (cfg, dir) = test_config(1);
        let s = Session::new(
            cfg,
            servers_for(&[addr]),
            Box::pin(futures_util::stream::pending()),
        );
        let err = timeout(Duration::from_secs(30), s.run())
            .await
            .expect("the daemon stops")
            .expect_err("with the refusal");
        assert!(err.is_final(), "{err}");
        assert!(err.to_string().contains("token revoked"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }
    let (addr, mut mock) = start_mock_with(Some(Status::unavailable("busy"))).await;
    let (cfg, dir) = test_config(1);
    let s = Session::new(
        cfg,
        servers_for(&[addr]),
        Box::pin(futures_util::stream::pending()),
    );
    let daemon = tokio::spawn(s.run());
    for _ in 0..2 {
        assert!(matches!(
            next_event(&mut mock).await,
            MockEvent::Registered(..)
        ));
    }
    assert!(!daemon.is_finished(), "an unavailable server is retried");
    daemon.abort();
    let _ = std::fs::remove_dir_all(dir);
}

/// A server that shuts down sends Drain: the daemon opens a session on the
/// next server it knows (naming its running task, so nothing is
/// interrupted) before it lets go of the draining one, and resends there
/// the output the draining server never acknowledged.
#[tokio::test]
async fn a_draining_server_is_left_for_the_next_one() {
    let (a, mut mock_a) = start_mock().await;
    let (b, mut mock_b) = start_mock().await;
    let (cfg, dir) = test_config(2);
    let daemon = tokio::spawn(
        Session::new(
            cfg,
            servers_for(&[a, b]),
            Box::pin(futures_util::stream::pending()),
        )
        .run(),
    );
    let (c1, down1, _) = connect(&mut mock_a).await;
    down1
        .send(down(Down::Command(spawn_cmd(
            "cmd-1",
            "t1",
            "echo started; sleep 1000",
            1,
        ))))
        .expect("send");
    // The first line reaches A, which never acknowledges it.
    let first = loop {
        if let Up::Messages(m) = next_up(&mut mock_a, c1).await {
            break m.messages[0].clone();
        }
    };
    down1
        .send(down(Down::Drain(crate::pb::Drain {
            reason: "replica shutting down".into(),
        })))
        .expect("send");
    timeout(Duration::from_secs(30), down1.closed())
        .await
        .expect("the daemon lets go of the draining server");
    // By then its session on B was open.
    assert!(
        matches!(mock_b.try_recv(), Ok(MockEvent::Registered(..))),
        "registered with B before leaving A"
    );
    let Ok(MockEvent::Connected(c2, down2)) = mock_b.try_recv() else {
        panic!("the session on B was open before A was let go");
    };
    match next_up(&mut mock_b, c2).await {
        Up::Open(open) => assert_eq!(open.running_task_ids, ["t1"], "the task runs on"),
        other => panic!("expected SessionOpen, got {other:?}"),
    }
    down2
        .send(down(Down::Ready(crate::pb::SessionReady {
            daemon_id: "d1".into(),
            heartbeat_interval: None,
        })))
        .expect("send");
    // B gets the line A never acknowledged.
    loop {
        if let Up::Messages(m) = next_up(&mut mock_b, c2).await {
            assert_eq!(m.messages[0].seq, first.seq);
            assert_eq!(m.messages[0].content, first.content);
            break;
        }
    }
    daemon.abort();
    let _ = std::fs::remove_dir_all(dir);
}

/// With one server, Drain ends the session and the daemon comes back to
/// it (when it restarts) like after any other break.
#[tokio::test]
async fn a_drain_with_nowhere_to_go_reconnects_later() {
    let (a, mut mock) = start_mock().await;
    let (cfg, dir) = test_config(1);
    let daemon = tokio::spawn(
        Session::new(
            cfg,
            servers_for(&[a]),
            Box::pin(futures_util::stream::pending()),
        )
        .run(),
    );
    let (_, down1, _) = connect(&mut mock).await;
    down1
        .send(down(Down::Drain(crate::pb::Drain {
            reason: "replica shutting down".into(),
        })))
        .expect("send");
    timeout(Duration::from_secs(30), down1.closed())
        .await
        .expect("the session ends");
    let (_, _down2, _) = connect(&mut mock).await;
    daemon.abort();
    let _ = std::fs::remove_dir_all(dir);
}
