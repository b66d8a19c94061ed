//! A scripted daemon: a real `DaemonService.Session` over its own
//! connection that answers commands at once and reports what arrived, and
//! when, to the figure driving it.

use std::time::Instant;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

use super::BenchResult;
use crate::pb::daemon_service_client::DaemonServiceClient;
use crate::pb::session_request::Message as Up;
use crate::pb::session_response::Message as Down;
use crate::pb::{self, command};
use taskmesh_proto::Bearer;
use taskmesh_testkit::daemon::Session;
pub use taskmesh_testkit::daemon::try_register as register;

/// What the daemon saw, stamped on arrival.
#[derive(Debug)]
pub enum Event {
    Spawn {
        task_id: String,
        at: Instant,
    },
    Interrupt {
        task_id: String,
        at: Instant,
    },
    Ack {
        task_id: String,
        acked_seq: i64,
        ended: bool,
        at: Instant,
    },
    Error(String),
}

/// What the daemon does with a SpawnTask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Reports it started, then completed, at once: the slot frees again.
    Complete,
    /// Reports it started and keeps it until an InterruptTask.
    Run,
}

pub struct BenchDaemon {
    pub id: String,
    up: mpsc::Sender<pb::SessionRequest>,
    reader: JoinHandle<()>,
}

impl BenchDaemon {
    /// Opens the session on `channel` and waits for `ready`.
    pub async fn open(
        channel: tonic::transport::Channel,
        token: &Bearer,
        id: String,
        policy: Policy,
        events: mpsc::UnboundedSender<Event>,
    ) -> BenchResult<BenchDaemon> {
        let mut client = DaemonServiceClient::with_interceptor(channel, token.clone());
        let Session { up, mut down, .. } =
            Session::try_open(&mut client, &id, Vec::new(), 1024).await?;
        let replies = up.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(m)) = down.next().await {
                if !answer(m, policy, &replies, &events).await {
                    break;
                }
            }
        });
        Ok(BenchDaemon { id, up, reader })
    }

    pub async fn send(&self, m: Up) -> BenchResult<()> {
        self.up
            .send(request(m))
            .await
            .map_err(|_| "the session is closed")?;
        Ok(())
    }

    /// Reports a batch of output for a task.
    pub async fn output(
        &self,
        task_id: &str,
        messages: Vec<pb::TaskMessageInput>,
    ) -> BenchResult<()> {
        self.send(Up::Messages(pb::ReportTaskMessagesRequest {
            task_id: task_id.into(),
            messages,
            ..Default::default()
        }))
        .await
    }

    /// Ends the session: the request stream ends, as when a daemon stops.
    pub fn close(self) {
        self.reader.abort();
    }
}

fn request(m: Up) -> pb::SessionRequest {
    pb::SessionRequest { message: Some(m) }
}

/// Answers one message from the server; false once the session is gone.
async fn answer(
    m: pb::SessionResponse,
    policy: Policy,
    up: &mpsc::Sender<pb::SessionRequest>,
    events: &mpsc::UnboundedSender<Event>,
) -> bool {
    let at = Instant::now();
    let mut replies = Vec::new();
    match m.message {
        Some(Down::Command(c)) => {
            replies.push(Up::CommandResult(pb::CommandResult {
                command_id: c.id.clone(),
                status: pb::CommandResultStatus::Ok as i32,
                ..Default::default()
            }));
            match c.kind {
                Some(command::Kind::SpawnTask(spawn)) => {
                    let attempt = spawn.task.as_ref().map_or(0, |t| t.attempt);
                    let _ = events.send(Event::Spawn {
                        task_id: c.task_id.clone(),
                        at,
                    });
                    replies.push(Up::Started(pb::ReportTaskStartedRequest {
                        task_id: c.task_id.clone(),
                        attempt,
                        pid: 0,
                        ..Default::default()
                    }));
                    if policy == Policy::Complete {
                        replies.push(Up::Completed(pb::CompleteTaskRequest {
                            task_id: c.task_id,
                            summary: "done".into(),
                            resume: None,
                            ..Default::default()
                        }));
                    }
                }
                Some(command::Kind::InterruptTask(_)) => {
                    let _ = events.send(Event::Interrupt {
                        task_id: c.task_id.clone(),
                        at,
                    });
                    replies.push(Up::Failed(pb::FailTaskRequest {
                        task_id: c.task_id,
                        reason: "interrupted".into(),
                        exit_code: 130,
                        resume: None,
                        ..Default::default()
                    }));
                }
                _ => {}
            }
        }
        Some(Down::OutputAck(a)) => {
            let _ = events.send(Event::Ack {
                task_id: a.task_id,
                acked_seq: a.acked_seq,
                ended: a.task_ended,
                at,
            });
        }
        Some(Down::Error(e)) => {
            let _ = events.send(Event::Error(format!(
                "task {}: code {}: {}",
                e.task_id, e.code, e.message
            )));
        }
        Some(Down::Ready(_) | Down::StartedAck(_) | Down::Drain(_)) | None => {}
    }
    for r in replies {
        if up.send(request(r)).await.is_err() {
            return false;
        }
    }
    true
}

/// `n` output messages of about 100 bytes from `first_seq` on.
pub fn messages(first_seq: i64, n: usize) -> Vec<pb::TaskMessageInput> {
    (0..n as i64)
        .map(|i| {
            let seq = first_seq + i;
            let mut content = format!(
                "line {seq:>8}: compiling crate {} of the workspace, ",
                seq % 97
            );
            while content.len() < 100 {
                content.push('.');
            }
            pb::TaskMessageInput {
                seq,
                kind: pb::MessageKind::Stdout as i32,
                content,
                ..Default::default()
            }
        })
        .collect()
}
