//! The scripted daemon: registers, opens a session and speaks it message
//! by message, so tests can hold the daemon's side of the protocol exactly
//! (and the benchmark can drive thousands of sessions). The `try_` forms
//! answer errors; the others panic, for tests.

use taskmesh_server::pb::daemon_service_client::DaemonServiceClient;
use taskmesh_server::pb::session_request::Message as Up;
use taskmesh_server::pb::session_response::Message as Down;
use taskmesh_server::pb::{self, MessageKind, command::Kind};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use taskmesh_server::model::TokenKind;

use super::{Bearer, TestServer};
use crate::db::Error;

pub type Daemons = DaemonServiceClient<InterceptedService<Channel, Bearer>>;

pub async fn daemon_client(s: &TestServer, token: &str) -> Daemons {
    DaemonServiceClient::with_interceptor(s.channel().await, super::bearer(Some(token)))
}

pub async fn register(c: &mut Daemons, machine: &str, max: i32) -> String {
    try_register(c, machine, max).await.expect("register")
}

/// Registers a daemon offering the `shell` runtime; answers its id.
pub async fn try_register(c: &mut Daemons, machine: &str, max: i32) -> Result<String, Error> {
    let daemon = c
        .register(pb::RegisterRequest {
            machine_id: machine.into(),
            hostname: "test".into(),
            version: "0".into(),
            runtimes: vec![pb::Runtime {
                name: "shell".into(),
                version: "builtin".into(),
            }],
            max_concurrent_tasks: max,
            legacy_ids: vec![],
            ..Default::default()
        })
        .await?
        .into_inner()
        .daemon
        .ok_or("Register answered no daemon")?;
    Ok(daemon.id)
}

/// A scripted daemon session.
pub struct Session {
    pub up: mpsc::Sender<pb::SessionRequest>,
    pub down: tonic::Streaming<pb::SessionResponse>,
    /// What arrived while [`Session::started`] waited for its ack.
    pending: std::collections::VecDeque<Down>,
}

impl Session {
    pub async fn open(c: &mut Daemons, daemon_id: &str, running: Vec<String>) -> Session {
        Session::try_open(c, daemon_id, running, 64)
            .await
            .expect("open a session")
    }

    /// Opens the session and waits for `ready`; `queue` bounds what waits to
    /// go up.
    pub async fn try_open(
        c: &mut Daemons,
        daemon_id: &str,
        running: Vec<String>,
        queue: usize,
    ) -> Result<Session, Error> {
        let (up, rx) = mpsc::channel(queue);
        up.send(pb::SessionRequest {
            message: Some(Up::Open(pb::SessionOpen {
                daemon_id: daemon_id.into(),
                running_task_ids: running,
            })),
        })
        .await
        .map_err(|_| "the session closed before it opened")?;
        let mut down = c.session(ReceiverStream::new(rx)).await?.into_inner();
        match down.next().await {
            Some(Ok(pb::SessionResponse {
                message: Some(Down::Ready(r)),
            })) if r.daemon_id == daemon_id => Ok(Session {
                up,
                down,
                pending: Default::default(),
            }),
            other => Err(format!("session of {daemon_id} did not open: {other:?}").into()),
        }
    }

    pub async fn send(&self, m: Up) {
        self.up
            .send(pb::SessionRequest { message: Some(m) })
            .await
            .unwrap();
    }

    pub async fn next(&mut self) -> Down {
        if let Some(m) = self.pending.pop_front() {
            return m;
        }
        self.down
            .next()
            .await
            .expect("stream open")
            .expect("no error")
            .message
            .unwrap()
    }

    pub async fn command(&mut self) -> pb::Command {
        match self.next().await {
            Down::Command(c) => c,
            other => panic!("expected a command, got {other:?}"),
        }
    }

    /// Creates and starts a task named `name`, takes its SpawnTask on this
    /// session, acknowledges it and reports it started (attempt 1).
    pub async fn run_task(&mut self, s: &TestServer, name: &str) -> pb::Task {
        let task = new_task(s, name).await;
        start(s, &task.id).await;
        let spawn = self.command().await;
        assert_eq!(
            spawn_of(&spawn).task.as_ref().map(|t| t.id.as_str()),
            Some(task.id.as_str()),
            "spawned another task"
        );
        self.ack(&spawn.id).await;
        self.started(&task.id, 1).await;
        task
    }

    /// Reports the task completed and waits for the ack that records its end.
    pub async fn complete(&mut self, task_id: &str) {
        self.send(Up::Completed(pb::CompleteTaskRequest {
            task_id: task_id.into(),
            ..Default::default()
        }))
        .await;
        match self.next().await {
            Down::OutputAck(a) => assert!(a.task_ended, "the end is recorded: {a:?}"),
            other => panic!("expected the end's OutputAck, got {other:?}"),
        }
    }

    /// Reports `started` and waits for its StartedAck (or its refusal, left
    /// for [`Session::next`] as is what arrives meanwhile).
    pub async fn started(&mut self, task_id: &str, attempt: i32) {
        self.send(Up::Started(pb::ReportTaskStartedRequest {
            task_id: task_id.into(),
            attempt,
            pid: 1,
            ..Default::default()
        }))
        .await;
        loop {
            let m = self
                .down
                .next()
                .await
                .expect("stream open")
                .expect("no error")
                .message
                .unwrap();
            match m {
                Down::StartedAck(a) if a.task_id == task_id => {
                    assert_eq!(a.attempt, attempt, "the ack names the attempt");
                    return;
                }
                // A refusal is the test's to read.
                Down::Error(e) if e.task_id == task_id => {
                    self.pending.push_back(Down::Error(e));
                    return;
                }
                other => self.pending.push_back(other),
            }
        }
    }

    pub async fn ack(&self, command_id: &str) {
        self.send(Up::CommandResult(pb::CommandResult {
            command_id: command_id.into(),
            status: pb::CommandResultStatus::Ok as i32,
            ..Default::default()
        }))
        .await;
    }

    pub async fn output(
        &mut self,
        task_id: &str,
        seqs: impl IntoIterator<Item = i64>,
        text: impl Fn(i64) -> String,
    ) -> i64 {
        let messages = seqs
            .into_iter()
            .map(|seq| pb::TaskMessageInput {
                seq,
                kind: MessageKind::Stdout as i32,
                content: text(seq),
                ..Default::default()
            })
            .collect();
        self.send(Up::Messages(pb::ReportTaskMessagesRequest {
            task_id: task_id.into(),
            messages,
            ..Default::default()
        }))
        .await;
        match self.next().await {
            Down::OutputAck(a) => {
                assert_eq!(a.task_id, task_id);
                a.acked_seq
            }
            other => panic!("expected an ack, got {other:?}"),
        }
    }

    /// Sends `messages` for `task_id` and answers the server's reply.
    pub async fn report(&mut self, task_id: &str, messages: Vec<pb::TaskMessageInput>) -> Down {
        self.send(Up::Messages(pb::ReportTaskMessagesRequest {
            task_id: task_id.into(),
            messages,
            ..Default::default()
        }))
        .await;
        self.next().await
    }
}

/// A stdout message.
pub fn stdout(seq: i64, content: &str) -> pb::TaskMessageInput {
    pb::TaskMessageInput {
        seq,
        kind: MessageKind::Stdout as i32,
        content: content.into(),
        ..Default::default()
    }
}

pub fn spawn_of(c: &pb::Command) -> &pb::SpawnTask {
    match &c.kind {
        Some(Kind::SpawnTask(s)) => s,
        other => panic!("expected SpawnTask, got {other:?}"),
    }
}

pub async fn new_task(s: &TestServer, name: &str) -> pb::Task {
    new_subtask(s, name, "").await
}

/// A subtask of `parent` (none when empty), pending.
pub async fn new_subtask(s: &TestServer, name: &str, parent: &str) -> pb::Task {
    let mut c = s.tasks().await;
    c.create_task(pb::CreateTaskRequest {
        name: name.into(),
        plan: "echo hi".into(),
        parent_task_id: parent.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .task
    .unwrap()
}

/// A daemon registered in workspace `default` with a token of its own.
pub async fn connect_daemon(s: &TestServer, machine: &str, max: i32) -> (Daemons, String) {
    let token = s.token_in("default", TokenKind::Daemon).await;
    let mut client = daemon_client(s, &token).await;
    let id = register(&mut client, machine, max).await;
    (client, id)
}

/// Creates and starts a task and takes it with ClaimTask as `daemon_id`,
/// for tests of the unary reports; answers its id.
pub async fn claimed_task(s: &TestServer, dc: &mut Daemons, daemon_id: &str, name: &str) -> String {
    let task = new_task(s, name).await;
    start(s, &task.id).await;
    let got = dc
        .claim_task(pb::ClaimTaskRequest {
            daemon_id: daemon_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.task.map(|t| t.id),
        Some(task.id.clone()),
        "claimed another task"
    );
    task.id
}

/// The first page of a task's stored output (ListTaskMessages' defaults).
pub async fn stored_messages(s: &TestServer, task_id: &str) -> Vec<pb::TaskMessage> {
    first_page(s, task_id).await.messages
}

/// ListTaskMessages from the start, with its defaults: the whole answer.
pub async fn first_page(s: &TestServer, task_id: &str) -> pb::ListTaskMessagesResponse {
    s.tasks()
        .await
        .list_task_messages(pb::ListTaskMessagesRequest {
            task_id: task_id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// A task's audit trail.
pub async fn events(s: &TestServer, task_id: &str) -> Vec<pb::TaskEvent> {
    s.tasks()
        .await
        .list_task_events(pb::ListTaskEventsRequest {
            task_id: task_id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
}

/// StartTask as the admin.
pub async fn start(s: &TestServer, id: &str) {
    s.tasks()
        .await
        .start_task(pb::StartTaskRequest {
            id: id.into(),
            daemon_id: String::new(),
        })
        .await
        .unwrap();
}

pub async fn get(s: &TestServer, id: &str) -> pb::Task {
    s.tasks()
        .await
        .get_task(pb::GetTaskRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap()
}
