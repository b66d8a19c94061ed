//! DaemonService: daemons registering, claiming and reporting tasks, and
//! the Session stream.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::access::principal;
use super::parse;
use super::session::{SessionLoop, completed, duration, failed, messages, progress, started};
use crate::domain::{Domain, invalid, parse_id};
use crate::model::{Principal, Runtime};
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

    /// The caller of a unary report, speaking for the daemon it names: a
    /// report about a task of another daemon is refused, as on a Session.
    async fn speaking_for<T>(
        &self,
        req: &Request<T>,
        daemon_id: &str,
    ) -> Result<Principal, Status> {
        let mut p = principal(req)?;
        let id = parse_id("daemon_id", daemon_id)?;
        let daemon = self.domain.load_daemon(&p, &id).await?;
        p.daemon_id = Some(daemon.id);
        Ok(p)
    }
}

#[tonic::async_trait]
impl DaemonService for DaemonApi {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let p = principal(&req)?;
        let r = req.into_inner();
        let info = DaemonInfo {
            workspace_id: String::new(),
            token_id: String::new(),
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
            work_dir: r.work_dir,
            suggested_targets: r.suggested_targets,
        };
        let daemon = self.domain.register_daemon(&p, info, &r.legacy_ids).await?;
        Ok(Response::new(pb::RegisterResponse {
            daemon: Some(wire::daemon(daemon)),
            heartbeat_interval: duration(self.domain.liveness.heartbeat),
        }))
    }

    async fn deregister(
        &self,
        req: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let p = principal(&req)?;
        let id = parse_id("daemon_id", &req.get_ref().daemon_id)?;
        self.domain.deregister_daemon(&p, &id).await?;
        Ok(Response::new(pb::DeregisterResponse {}))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let p = principal(&req)?;
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
        let p = principal(&req)?;
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
        let p = self.speaking_for(&req, &req.get_ref().daemon_id).await?;
        let task = started(&self.domain, &p, req.get_ref()).await?;
        Ok(Response::new(pb::ReportTaskStartedResponse {
            task: Some(wire::task(task)),
        }))
    }

    async fn report_task_progress(
        &self,
        req: Request<pb::ReportTaskProgressRequest>,
    ) -> Result<Response<pb::ReportTaskProgressResponse>, Status> {
        let p = self.speaking_for(&req, &req.get_ref().daemon_id).await?;
        progress(&self.domain, &p, req.get_ref()).await?;
        Ok(Response::new(pb::ReportTaskProgressResponse {}))
    }

    async fn report_task_messages(
        &self,
        req: Request<pb::ReportTaskMessagesRequest>,
    ) -> Result<Response<pb::ReportTaskMessagesResponse>, Status> {
        let p = self.speaking_for(&req, &req.get_ref().daemon_id).await?;
        let acked_seq = messages(&self.domain, &p, req.into_inner()).await?;
        Ok(Response::new(pb::ReportTaskMessagesResponse { acked_seq }))
    }

    async fn report_task_usage(
        &self,
        req: Request<pb::ReportTaskUsageRequest>,
    ) -> Result<Response<pb::ReportTaskUsageResponse>, Status> {
        let p = self.speaking_for(&req, &req.get_ref().daemon_id).await?;
        let r = req.into_inner();
        let id = parse_id("task_id", &r.task_id)?;
        let u = r.usage.into_iter().map(parse::usage).collect();
        let attempt = i64::from(r.attempt);
        let cost = parse::cost(r.cost_usd, r.turns);
        self.domain.report_usage(&p, &id, u, attempt, cost).await?;
        Ok(Response::new(pb::ReportTaskUsageResponse {}))
    }

    async fn complete_task(
        &self,
        req: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        let p = self.speaking_for(&req, &req.get_ref().daemon_id).await?;
        let r = req.into_inner();
        let id = parse_id("task_id", &r.task_id)?;
        let task = self.domain.end_task(&p, &id, completed(r)).await?;
        Ok(Response::new(pb::CompleteTaskResponse {
            task: Some(wire::task(task)),
        }))
    }

    async fn fail_task(
        &self,
        req: Request<pb::FailTaskRequest>,
    ) -> Result<Response<pb::FailTaskResponse>, Status> {
        let p = self.speaking_for(&req, &req.get_ref().daemon_id).await?;
        let r = req.into_inner();
        let id = parse_id("task_id", &r.task_id)?;
        let task = self.domain.end_task(&p, &id, failed(r)).await?;
        Ok(Response::new(pb::FailTaskResponse {
            task: Some(wire::task(task)),
        }))
    }

    async fn get_task_status(
        &self,
        req: Request<pb::GetTaskStatusRequest>,
    ) -> Result<Response<pb::GetTaskStatusResponse>, Status> {
        let p = principal(&req)?;
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
        let p = principal(&req)?;
        let mut inbound = req.into_inner();
        let open = match inbound.next().await {
            Some(Ok(pb::SessionRequest {
                message: Some(Up::Open(open)),
            })) => open,
            Some(Err(e)) => return Err(e),
            _ => return Err(invalid("open", "the first session message must be `open`").into()),
        };
        let rx = SessionLoop::start(self.domain.clone(), p, open, inbound).await?;
        let stream = ReceiverStream::new(rx).map(|m| m.map(|m| *m));
        Ok(Response::new(Box::pin(stream)))
    }
}
