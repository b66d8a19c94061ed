//! Who may do what, and for how long: every RPC against every token kind;
//! revocation, a removed membership and DisconnectDaemon ending open
//! streams; the per-token stream cap; failed authentications throttled.

use prost::Message as _;
use taskmesh_server::domain::Limits;
use taskmesh_server::model::TokenKind;
use taskmesh_server::pb;
use taskmesh_testkit::daemon::*;
use taskmesh_testkit::raw::{Shape, call, every_rpc, stream_end};
use taskmesh_testkit::{
    Backend, TestDb, TestServer, both_backends, start_replica, start_server,
    start_server_with_limits,
};
use tokio_stream::StreamExt;
use tonic::{Code, Status};

/// The policy, written here apart from the server's table: users call
/// TaskService and WorkspaceService; viewers only list, get and watch,
/// except the workspace's tokens, which are an admin's business;
/// daemons only DaemonService; an agent reads, makes and steers the tasks
/// of its own task's tree and reports its progress.
fn may_call(kind: TokenKind, path: &str) -> bool {
    let method = path.rsplit('/').next().unwrap();
    let daemon_service = path.starts_with("/taskmesh.v1.DaemonService/");
    let task_service = path.starts_with("/taskmesh.v1.TaskService/");
    match kind {
        TokenKind::Agent => {
            (task_service
                && [
                    "CreateTask",
                    "GetTask",
                    "GetTaskDiff",
                    "ListTasks",
                    "StartTask",
                    "StopTask",
                    "SendMessage",
                    "ListTaskMessages",
                    "WatchTask",
                    "ListTaskEvents",
                    "GetTaskUsage",
                ]
                .contains(&method))
                || path == "/taskmesh.v1.DaemonService/ReportTaskProgress"
        }
        TokenKind::Daemon => daemon_service,
        TokenKind::User => !daemon_service,
        TokenKind::Viewer => {
            !daemon_service
                && method != "ListTokens"
                && ["Get", "List", "Watch"]
                    .iter()
                    .any(|p| method.starts_with(p))
        }
    }
}

/// Every RPC with every kind of token: refused with PERMISSION_DENIED
/// exactly where the policy says; without a token, UNAUTHENTICATED.
async fn every_rpc_checks_the_token_kind(backend: Backend) {
    let s = start_server(backend).await;
    let (agent, _runs_it) = agent_token(&s).await;
    let tokens = [
        (TokenKind::User, s.token.clone()),
        (
            TokenKind::Viewer,
            s.token_in("default", TokenKind::Viewer).await,
        ),
        (
            TokenKind::Daemon,
            s.token_in("default", TokenKind::Daemon).await,
        ),
        (TokenKind::Agent, agent.clone()),
    ];
    let mut checked = 0;
    for (path, shape) in every_rpc() {
        let anonymous = call(&s, &path, shape, None, Vec::new()).await;
        assert_eq!(
            anonymous.code(),
            Code::Unauthenticated,
            "{path} without a token: {anonymous:?}"
        );
        for (kind, token) in &tokens {
            let got = call(&s, &path, shape, Some(token), Vec::new()).await;
            if may_call(*kind, &path) {
                assert!(
                    !matches!(got.code(), Code::PermissionDenied | Code::Unauthenticated),
                    "a {kind} token should reach {path}: {got:?}"
                );
            } else {
                assert_eq!(
                    got.code(),
                    Code::PermissionDenied,
                    "a {kind} token on {path}: {got:?}"
                );
                assert!(got.message().contains(kind.to_string().as_str()), "{got:?}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 38 * 4);
    s.stop().await;
}

/// The agent token of a task a scripted daemon took (its SpawnTask carries
/// it), and that daemon's session, which keeps the task (and the token)
/// alive.
async fn agent_token(s: &TestServer) -> (String, Session) {
    let (mut d, id) = connect_daemon(s, "runner", 1).await;
    let mut session = Session::open(&mut d, &id, vec![]).await;
    let task = new_task(s, "agent at work").await;
    s.tasks()
        .await
        .start_task(pb::StartTaskRequest {
            id: task.id.clone(),
            daemon_id: String::new(),
        })
        .await
        .unwrap();
    let cmd = session.command().await;
    session.ack(&cmd.id).await;
    let token = spawn_of(&cmd).agent_token.clone();
    assert!(token.starts_with("tma_"), "{token}");
    (token, session)
}

/// A request that does not decode is the caller's mistake.
async fn undecodable_requests_are_invalid(backend: Backend) {
    let s = start_server(backend).await;
    let got = call(
        &s,
        "/taskmesh.v1.TaskService/GetTask",
        Shape::Unary,
        Some(&s.token),
        vec![0xff, 0xff, 0xff],
    )
    .await;
    assert_eq!(got.code(), Code::InvalidArgument, "{got:?}");

    // On a Session: it opens, then a frame that does not decode ends it
    // with INVALID_ARGUMENT, not OK.
    let token = s.token_in("default", TokenKind::Daemon).await;
    let daemon_id = register(&mut daemon_client(&s, &token).await, "m1", 1).await;
    let open = pb::SessionRequest {
        message: Some(pb::session_request::Message::Open(pb::SessionOpen {
            daemon_id,
            running_task_ids: vec![],
        })),
    };
    let end = stream_end(
        &s,
        "/taskmesh.v1.DaemonService/Session",
        Some(&token),
        vec![open.encode_to_vec(), vec![0xff, 0xff, 0xff]],
    )
    .await;
    assert_eq!(end.code(), Code::InvalidArgument, "{end:?}");
    s.stop().await;
}

/// Past a burst of failed authentications an address waits; a token that
/// works keeps working.
async fn failed_authentications_are_throttled(backend: Backend) {
    let s = start_server(backend).await;
    let mut last = Status::ok("");
    for _ in 0..25 {
        last = call(
            &s,
            "/taskmesh.v1.TaskService/ListTasks",
            Shape::Unary,
            Some("tmu_wrong"),
            Vec::new(),
        )
        .await;
    }
    assert_eq!(last.code(), Code::ResourceExhausted, "{last:?}");
    assert!(last.message().contains("retry in"), "{last:?}");
    let ok = call(
        &s,
        "/taskmesh.v1.TaskService/ListTasks",
        Shape::Unary,
        Some(&s.token),
        Vec::new(),
    )
    .await;
    assert_eq!(ok.code(), Code::Ok, "{ok:?}");
    s.stop().await;
}

/// Reads a stream until it ends with an error; answers it.
async fn ended<T: std::fmt::Debug>(stream: &mut tonic::Streaming<T>) -> Status {
    let read = async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return e,
                None => panic!("the stream ended without a status"),
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), read)
        .await
        .expect("the stream ends")
}

async fn watch(
    s: &TestServer,
    token: &str,
    task_id: &str,
) -> tonic::Streaming<pb::WatchTaskResponse> {
    let mut w = s
        .tasks_as(Some(token))
        .await
        .watch_task(pb::WatchTaskRequest {
            task_id: task_id.into(),
            since_seq: 0,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    w.next().await.unwrap().unwrap();
    w
}

async fn watch_all(s: &TestServer, token: &str) -> tonic::Streaming<pb::WatchTasksResponse> {
    s.tasks_as(Some(token))
        .await
        .watch_tasks(pb::WatchTasksRequest::default())
        .await
        .unwrap()
        .into_inner()
}

async fn token_id(s: &TestServer, secret_name: &str) -> String {
    s.workspaces()
        .await
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tokens
        .into_iter()
        .rev()
        .find(|t| t.name == secret_name)
        .expect("the token is listed")
        .id
}

/// Revoking a token ends its open WatchTask, WatchTasks and Session with
/// UNAUTHENTICATED, at once on this server.
async fn revocation_ends_open_streams(backend: Backend) {
    let s = start_server(backend).await;
    let task = new_task(&s, "watched").await;
    let mut ws = s.workspaces().await;
    let created = ws
        .create_token(pb::CreateTokenRequest {
            kind: pb::TokenKind::User as i32,
            name: "laptop".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut one = watch(&s, &created.secret, &task.id).await;
    let mut all = watch_all(&s, &created.secret).await;
    let daemon_token = ws
        .create_token(pb::CreateTokenRequest {
            kind: pb::TokenKind::Daemon as i32,
            name: "worker".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let mut dc = daemon_client(&s, &daemon_token).await;
    let daemon_id = register(&mut dc, "m1", 1).await;
    let mut session = Session::open(&mut dc, &daemon_id, vec![]).await;

    ws.revoke_token(pb::RevokeTokenRequest {
        id: created.token.unwrap().id,
    })
    .await
    .unwrap();
    for e in [ended(&mut one).await, ended(&mut all).await] {
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("revoked"), "{e:?}");
    }
    ws.revoke_token(pb::RevokeTokenRequest {
        id: token_id(&s, "worker").await,
    })
    .await
    .unwrap();
    let e = ended(&mut session.down).await;
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // And the token cannot open a new one.
    let e = dc
        .register(pb::RegisterRequest {
            machine_id: "m1".into(),
            max_concurrent_tasks: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    s.stop().await;
}

/// A user removed from the workspace loses its streams at the next sweep.
async fn a_removed_membership_ends_streams(backend: Backend) {
    let s = start_server(backend).await;
    let secret = s.token_in("default", TokenKind::User).await;
    let mut all = watch_all(&s, &secret).await;
    sqlx::any::install_default_drivers();
    let mut db = <sqlx::AnyConnection as sqlx::Connection>::connect(&s.db.url)
        .await
        .unwrap();
    sqlx::query(
        "DELETE FROM memberships WHERE user_id = (SELECT id FROM users WHERE name = 'user-default')",
    )
    .execute(&mut db)
    .await
    .unwrap();
    s.domain.sweep().await.unwrap();
    let e = ended(&mut all).await;
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("no longer belongs"), "{e:?}");
    s.stop().await;
}

/// A revocation made on one replica ends streams held on another at its
/// next sweep (PostgreSQL: replicas share the database).
async fn revocation_reaches_every_replica(backend: Backend) {
    if backend != Backend::Postgres {
        return;
    }
    let a = start_server(backend).await;
    let b = start_replica(&a).await;
    let secret = a.token_in("default", TokenKind::Viewer).await;
    let mut on_b = watch_all(&b, &secret).await;
    let id = token_id(&a, "test").await;
    a.workspaces()
        .await
        .revoke_token(pb::RevokeTokenRequest { id })
        .await
        .unwrap();
    b.domain.sweep().await.unwrap();
    let e = ended(&mut on_b).await;
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    b.stop().await;
    a.stop().await;
}

/// DisconnectDaemon ends the daemon's session with PERMISSION_DENIED and
/// refuses its token for it; a new token brings it back.
async fn disconnect_cuts_a_daemon_off(backend: Backend) {
    let s = start_server(backend).await;
    let (mut dc, daemon_id) = connect_daemon(&s, "lab-1", 1).await;
    let mut session = Session::open(&mut dc, &daemon_id, vec![]).await;
    let daemon = s
        .workspaces()
        .await
        .disconnect_daemon(pb::DisconnectDaemonRequest {
            id: daemon_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .daemon
        .unwrap();
    assert_eq!(daemon.id, daemon_id);
    let e = ended(&mut session.down).await;
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("disconnected"), "{e:?}");
    let again = pb::RegisterRequest {
        machine_id: "lab-1".into(),
        hostname: "lab-1".into(),
        max_concurrent_tasks: 1,
        ..Default::default()
    };
    let e = dc.register(again.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let fresh = s.token_in("default", TokenKind::Daemon).await;
    let mut dc2 = daemon_client(&s, &fresh).await;
    let back = dc2
        .register(again)
        .await
        .unwrap()
        .into_inner()
        .daemon
        .unwrap();
    assert_eq!(back.id, daemon_id, "the same machine, with a new token");
    Session::open(&mut dc2, &daemon_id, vec![]).await;
    s.stop().await;
}

/// One token holds at most --max-streams-per-token streams.
async fn streams_per_token_are_capped(backend: Backend) {
    let limits = Limits {
        max_streams_per_token: 3,
        ..Limits::default()
    };
    let s = start_server_with_limits(TestDb::new(backend).await, limits).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(watch_all(&s, &s.token).await);
    }
    let e = s
        .tasks()
        .await
        .watch_tasks(pb::WatchTasksRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("--max-streams-per-token"), "{e:?}");
    // Another token is not held back by this one, and a closed stream
    // makes room.
    let other = s.token_in("default", TokenKind::Viewer).await;
    open.push(watch_all(&s, &other).await);
    drop(open.remove(0));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match s
            .tasks()
            .await
            .watch_tasks(pb::WatchTasksRequest::default())
            .await
        {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the closed stream freed no room"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
    s.stop().await;
}

both_backends!(
    every_rpc_checks_the_token_kind,
    undecodable_requests_are_invalid,
    failed_authentications_are_throttled,
    revocation_ends_open_streams,
    a_removed_membership_ends_streams,
    revocation_reaches_every_replica,
    disconnect_cuts_a_daemon_off,
    streams_per_token_are_capped,
);
