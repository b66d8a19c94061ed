//! DaemonService: daemons registering, claiming and reporting tasks, and
//! the Session stream.

use super::parse;
use std::pin::Pin;
use std::sync::Arc;

use prost::Message;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::authenticate;
use crate::domain::{self, Domain, SHUTTING_DOWN, TaskEnd, invalid, parse_id};
use crate::model::{Principal, Runtime};
use crate::pb::session_response::Message as Down;
use crate::pb::{self, daemon_service_server::DaemonService, session_request::Message as Up};
use crate::store::DaemonInfo;
use crate::wire;

pub struct DaemonApi {
    domain: Arc<Domain>,
}

impl DaemonApi {
    pub fn new(domain: Arc<Domain>) -> Self {
        DaemonApi { domain }
    }
}

fn duration(d: std::time::Duration) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}

fn end(success: bool, reason: String, resume: Option<pb::AgentResume>) -> TaskEnd {
    let resume = resume.unwrap_or_default();
    TaskEnd {
        success,
        reason,
        agent_session_id: resume.agent_session_id,
        working_directory: resume.working_directory,
    }
}

fn fail_reason(r: &pb::FailTaskRequest) -> String {
    match (r.reason.is_empty(), r.exit_code) {
        (true, 0) => "failed".into(),
        (true, code) => format!("exit status {code}"),
        (false, _) => r.reason.clone(),
    }
}

#[tonic::async_trait]
impl DaemonService for DaemonApi {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let p = authenticate(&self.domain, &req).await?;
        let r = req.into_inner();
        let legacy = r
            .legacy_ids
            .iter()
            .map(|id| parse_id("legacy_ids", id))
            .collect::<domain::Result<Vec<_>>>()?;
        let info = DaemonInfo {
            workspace_id: String::new(),
            machine_id: r.machine_id,
            hostname: r.hostname,
            version: r.version,
            runtimes: r
                .runtimes
                .into_iter()
                .map(|r| Runtime {
                    name: r.name,
                    version: r.version,
                })
                .collect(),
            max_concurrent_tasks: i64::from(r.max_concurrent_tasks),
        };
        let daemon = self.domain.register_daemon(&p, info, &legacy).await?;
        Ok(Response::new(pb::RegisterResponse {
            daemon: Some(wire::daemon(daemon)),
            heartbeat_interval: duration(self.domain.liveness.heartbeat),
        }))
    }

    async fn deregister(
        &self,
        req: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let p = authenticate(&self.domain, &req).await?;
        let id = parse_id("daemon_id", &req.get_ref().daemon_id)?;
        self.domain.deregister_daemon(&p, &id).await?;
        Ok(Response::new(pb::DeregisterResponse {}))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let p = authenticate(&self.domain, &req).await?;
        let id = parse_id("daemon_id", &req.get_ref().daemon_id)?;
        self.domain.heartbeat(&p, &id).await?;
        Ok(Response::new(pb::HeartbeatResponse {
            heartbeat_interval: duration(self.domain.liveness.heartbeat),
        }))
    }

    async fn claim_task(
        &self,
        req: Request<pb::ClaimTaskRequest>,
    ) -> Result<Response<pb::ClaimTaskResponse>, Status> {
        let p = authenticate(&self.domain, &req).await?;
        let id = parse_id("daemon_id", &req.get_ref().daemon_id)?;
        let claimed = self.domain.claim_task(&p, &id).await?;
        Ok(Response::new(match claimed {
            None => pb::ClaimTaskResponse::default(),
            Some(a) => pb::ClaimTaskResponse {
                first_seq: a.first_seq,
                resume: (!a.task.agent_session_id.is_empty()).then(|| pb::AgentResume {
                    agent_session_id: a.task.agent_session_id.clone(),
                    working_directory: a.task.working_directory.clone(),
                }),
                task: Some(wire::task(a.task)),
                context: a.input.context,
                prompt: a.input.prompt,
            },
        }))
    }

    async fn report_task_started(
        &self,
        req: Request<pb::ReportTaskStartedRequest>,
    ) -> Result<Response<pb::ReportTaskStartedResponse>, Status> {
        let p = authenticate(&self.domain, &req).await?;
        let task = started(&self.domain, &p, req.get_ref()).await?;
        Ok(Response::new(pb::ReportTaskStartedResponse {
            task: Some(wire::task(task)),
        }))
    }

    async fn report_task_progress(
        &self,
        req: Request<pb::ReportTaskProgressRequest>,
    ) -> Result<Response<pb::ReportTaskProgressResponse>, Status> {
        let p = authenticate(&self.domain, &req).await?;
        progress(&self.domain, &p, req.get_ref()).await?;
        Ok(Response::new(pb::ReportTaskProgressResponse {}))
    }

    async fn report_task_messages(
        &self,
        req: Request<pb::ReportTaskMessagesRequest>,
    ) -> Result<Response<pb::ReportTaskMessagesResponse>, Status> {
        let p = authenticate(&self.domain, &req).await?;
        let acked_seq = messages(&self.domain, &p, req.into_inner()).await?;
        Ok(Response::new(pb::ReportTaskMessagesResponse { acked_seq }))
    }

    async fn report_task_usage(
        &self,
        req: Request<pb::ReportTaskUsageRequest>,
    ) -> Result<Response<pb::ReportTaskUsageResponse>, Status> {
        let p = authenticate(&self.domain, &req).await?;
        let r = req.into_inner();
        let id = parse_id("task_id", &r.task_id)?;
        let u = r.usage.into_iter().map(parse::usage).collect();
        self.domain.report_usage(&p, &id, u).await?;
        Ok(Response::new(pb::ReportTaskUsageResponse {}))
    }

    async fn complete_task(
        &self,
        req: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        let p = authenticate(&self.domain, &req).await?;
        let r = req.into_inner();
        let id = parse_id("task_id", &r.task_id)?;
        let task = self
            .domain
            .end_task(&p, &id, end(true, r.summary, r.resume))
            .await?;
        Ok(Response::new(pb::CompleteTaskResponse {
            task: Some(wire::task(task)),
        }))
    }

    async fn fail_task(
        &self,
        req: Request<pb::FailTaskRequest>,
    ) -> Result<Response<pb::FailTaskResponse>, Status> {
        let p = authenticate(&self.domain, &req).await?;
        let r = req.into_inner();
        let id = parse_id("task_id", &r.task_id)?;
        let reason = fail_reason(&r);
        let task = self
            .domain
            .end_task(&p, &id, end(false, reason, r.resume))
            .await?;
        Ok(Response::new(pb::FailTaskResponse {
            task: Some(wire::task(task)),
        }))
    }

    async fn get_task_status(
        &self,
        req: Request<pb::GetTaskStatusRequest>,
    ) -> Result<Response<pb::GetTaskStatusResponse>, Status> {
        let p = authenticate(&self.domain, &req).await?;
        let id = parse_id("task_id", &req.get_ref().task_id)?;
        let task = self.domain.task_status(&p, &id).await?;
        Ok(Response::new(pb::GetTaskStatusResponse {
            status: wire::task_status(task.status) as i32,
            version: task.version,
        }))
    }

    type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::SessionResponse, Status>> + Send>>;

    async fn session(
        &self,
        req: Request<Streaming<pb::SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let p = authenticate(&self.domain, &req).await?;
        let mut inbound = req.into_inner();
        let open = match inbound.next().await {
            Some(Ok(pb::SessionRequest {
                message: Some(Up::Open(open)),
            })) => open,
            Some(Err(e)) => return Err(e),
            _ => return Err(invalid("open", "the first session message must be `open`").into()),
        };
        let daemon_id = parse_id("open.daemon_id", &open.daemon_id)?;
        let (daemon, conn, wake) = self
            .domain
            .open_session(&p, &daemon_id, &open.running_task_ids)
            .await?;
        let (tx, rx) = mpsc::channel(256);
        let ready = pb::SessionReady {
            daemon_id: daemon.id.clone(),
            heartbeat_interval: duration(self.domain.liveness.heartbeat),
        };
        let _ = tx.send(Ok(Box::new(down(Down::Ready(ready))))).await;
        let mut principal = p;
        principal.daemon_id = Some(daemon.id.clone());
        let session = SessionLoop {
            domain: self.domain.clone(),
            principal,
            daemon_id: daemon.id.clone(),
            conn,
            wake,
            inbound,
            tx,
        };
        let span = tracing::info_span!("session", daemon_id = %daemon.id);
        tokio::spawn(session.run().instrument(span));
        let stream = ReceiverStream::new(rx).map(|m| m.map(|m| *m));
        Ok(Response::new(Box::pin(stream)))
    }
}

async fn started(
    domain: &Domain,
    p: &Principal,
    r: &pb::ReportTaskStartedRequest,
) -> Result<crate::model::Task, Status> {
    let id = parse_id("task_id", &r.task_id)?;
    Ok(domain.report_started(p, &id).await?)
}

async fn progress(
    domain: &Domain,
    p: &Principal,
    r: &pb::ReportTaskProgressRequest,
) -> Result<(), Status> {
    let id = parse_id("task_id", &r.task_id)?;
    domain
        .report_progress(p, &id, &r.summary, r.percent)
        .await?;
    Ok(())
}

async fn messages(
    domain: &Domain,
    p: &Principal,
    r: pb::ReportTaskMessagesRequest,
) -> Result<i64, Status> {
    let id = parse_id("task_id", &r.task_id)?;
    Ok(domain.ingest(p, &id, r.messages).await?)
}

fn down(m: Down) -> pb::SessionResponse {
    pb::SessionResponse { message: Some(m) }
}

/// One daemon's session: reads lifecycle reports from the daemon and pumps
/// its outbox down. Commands are read from the store (not from memory) each
/// time the pump is woken, so a slow daemon's backlog waits in the
/// database; each is resent on every new session until acknowledged.
struct SessionLoop {
    domain: Arc<Domain>,
    principal: Principal,
    daemon_id: String,
    conn: u64,
    wake: Arc<Notify>,
    inbound: Streaming<pb::SessionRequest>,
    /// Boxed: the channel allocates its slots 32 at a time up front, and a
    /// SessionResponse is ~600 bytes inline; every idle session paid ~20 KB.
    tx: mpsc::Sender<Result<Box<pb::SessionResponse>, Status>>,
}

impl SessionLoop {
    async fn run(mut self) {
        tracing::info!("session opened");
        let mut cursor = 0i64;
        let closed = self.domain.closed();
        tokio::pin!(closed);
        // handle() and pump() are boxed while they run: inline, their
        // database futures would size every idle session's task for the
        // busiest moment of any session.
        let why = loop {
            tokio::select! {
                _ = &mut closed => {
                    let _ = self.tx.send(Err(Status::unavailable(SHUTTING_DOWN))).await;
                    break SHUTTING_DOWN.to_string();
                }
                up = self.inbound.next() => match up {
                    Some(Ok(m)) => {
                        self.domain.session_alive(&self.principal, &self.daemon_id);
                        if let Err(why) = Box::pin(self.handle(m)).await {
                            break why;
                        }
                    }
                    Some(Err(e)) => break format!("stream error: {e}"),
                    None => break "the daemon closed the stream".to_string(),
                },
                _ = self.wake.notified() => {
                    if !self.domain.session_current(&self.daemon_id, self.conn) {
                        let why = "session ended: replaced by a newer one, deregistered, \
                                   or silent for 3 heartbeat intervals";
                        let _ = self.tx.send(Err(Status::unavailable(why))).await;
                        break why.to_string();
                    }
                    match Box::pin(self.pump(&mut cursor)).await {
                        Ok(()) => {}
                        Err(why) => break why,
                    }
                }
                _ = self.tx.closed() => break "the daemon went away".to_string(),
            }
        };
        if let Err(e) = self.domain.close_session(&self.daemon_id, self.conn).await {
            tracing::warn!(error = %e, "could not mark the daemon offline");
        }
        tracing::info!(reason = %why, "session closed");
    }

    /// Sends every pending command after `cursor`.
    async fn pump(&self, cursor: &mut i64) -> Result<(), String> {
        loop {
            let pending = self
                .domain
                .store()
                .pending_commands(&self.daemon_id, *cursor, 100)
                .await
                .map_err(|e| format!("reading the outbox: {e}"))?;
            let n = pending.len();
            for c in pending {
                *cursor = c.seq;
                let Ok(command) = pb::Command::decode(c.payload.as_slice()) else {
                    tracing::error!(seq = c.seq, "undecodable command in the outbox");
                    continue;
                };
                self.send(Down::Command(command)).await?;
            }
            if n < 100 {
                return Ok(());
            }
        }
    }

    async fn send(&self, m: Down) -> Result<(), String> {
        self.tx
            .send(Ok(Box::new(down(m))))
            .await
            .map_err(|_| "the daemon went away".to_string())
    }

    /// Handles one upstream message. A rejected report is answered with a
    /// SessionError and the session goes on; only a broken stream ends it.
    async fn handle(&mut self, m: pb::SessionRequest) -> Result<(), String> {
        let p = &self.principal;
        let d = &self.domain;
        let (task_id, result): (String, Result<Option<Down>, Status>) = match m.message {
            None | Some(Up::Open(_)) => (
                String::new(),
                Err(Status::invalid_argument("unexpected message")),
            ),
            Some(Up::Heartbeat(_)) => {
                d.heartbeat(p, &self.daemon_id).await.ok();
                return Ok(());
            }
            Some(Up::Started(r)) => (r.task_id.clone(), started(d, p, &r).await.map(|_| None)),
            Some(Up::Progress(r)) => (r.task_id.clone(), progress(d, p, &r).await.map(|_| None)),
            Some(Up::Messages(r)) => {
                let id = r.task_id.clone();
                let acked = messages(d, p, r).await;
                (
                    id.clone(),
                    acked.map(|acked_seq| {
                        Some(Down::OutputAck(pb::OutputAck {
                            task_id: id,
                            acked_seq,
                            task_ended: false,
                        }))
                    }),
                )
            }
            Some(Up::Usage(r)) => {
                let id = r.task_id.clone();
                let res = match parse_id("task_id", &r.task_id) {
                    Ok(tid) => d
                        .report_usage(p, &tid, r.usage.into_iter().map(parse::usage).collect())
                        .await
                        .map_err(Status::from),
                    Err(e) => Err(e.into()),
                };
                (id, res.map(|_| None))
            }
            Some(Up::Completed(r)) => {
                let id = r.task_id.clone();
                (
                    id.clone(),
                    self.ended(&id, end(true, r.summary, r.resume)).await,
                )
            }
            Some(Up::Failed(r)) => {
                let id = r.task_id.clone();
                let reason = fail_reason(&r);
                (
                    id.clone(),
                    self.ended(&id, end(false, reason, r.resume)).await,
                )
            }
            Some(Up::CommandResult(r)) => (
                String::new(),
                d.command_result(&self.daemon_id, &r)
                    .await
                    .map(|_| None)
                    .map_err(Status::from),
            ),
        };
        match result {
            Ok(Some(reply)) => self.send(reply).await,
            Ok(None) => Ok(()),
            Err(status) => {
                tracing::warn!(task_id = %task_id, code = ?status.code(), message = status.message(), "report rejected");
                self.send(Down::Error(pb::SessionError {
                    task_id,
                    code: status.code() as i32,
                    message: status.message().to_string(),
                }))
                .await
            }
        }
    }

    async fn ended(&self, task_id: &str, end: TaskEnd) -> Result<Option<Down>, Status> {
        let id = parse_id("task_id", task_id)?;
        let task = self.domain.end_task(&self.principal, &id, end).await?;
        Ok(Some(Down::OutputAck(pb::OutputAck {
            task_id: task.id,
            acked_seq: task.last_seq,
            task_ended: true,
        })))
    }
}
