//! DaemonService: daemons registering, claiming and reporting tasks.
//! The messages are final; the calls answer UNIMPLEMENTED until daemon
//! sessions land.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::authenticate;
use crate::domain::{Domain, Error};
use crate::model::TokenKind;
use crate::pb::{self, daemon_service_server::DaemonService};

pub struct DaemonApi {
    domain: Arc<Domain>,
}

impl DaemonApi {
    pub fn new(domain: Arc<Domain>) -> Self {
        DaemonApi { domain }
    }

    /// Daemon tokens only; then UNIMPLEMENTED for now.
    async fn not_yet<T, R>(&self, req: &Request<T>, rpc: &str) -> Result<R, Status> {
        let p = authenticate(&self.domain, req).await?;
        if p.kind != TokenKind::Daemon {
            return Err(
                Error::PermissionDenied("DaemonService needs a daemon token".into()).into(),
            );
        }
        Err(Status::unimplemented(format!("{rpc} is not in this build")))
    }
}

macro_rules! daemon_service_not_yet {
    ($($method:ident($req:ident) -> $resp:ident;)+) => {
        #[tonic::async_trait]
        impl DaemonService for DaemonApi {
            $(
                async fn $method(
                    &self,
                    req: Request<pb::$req>,
                ) -> Result<Response<pb::$resp>, Status> {
                    self.not_yet(&req, stringify!($method)).await
                }
            )+

            type SessionStream =
                Pin<Box<dyn Stream<Item = Result<pb::SessionResponse, Status>> + Send>>;

            async fn session(
                &self,
                req: Request<Streaming<pb::SessionRequest>>,
            ) -> Result<Response<Self::SessionStream>, Status> {
                self.not_yet(&req, "Session").await
            }
        }
    };
}

daemon_service_not_yet! {
    register(RegisterRequest) -> RegisterResponse;
    deregister(DeregisterRequest) -> DeregisterResponse;
    heartbeat(HeartbeatRequest) -> HeartbeatResponse;
    claim_task(ClaimTaskRequest) -> ClaimTaskResponse;
    report_task_started(ReportTaskStartedRequest) -> ReportTaskStartedResponse;
    report_task_progress(ReportTaskProgressRequest) -> ReportTaskProgressResponse;
    report_task_messages(ReportTaskMessagesRequest) -> ReportTaskMessagesResponse;
    report_task_usage(ReportTaskUsageRequest) -> ReportTaskUsageResponse;
    complete_task(CompleteTaskRequest) -> CompleteTaskResponse;
    fail_task(FailTaskRequest) -> FailTaskResponse;
    get_task_status(GetTaskStatusRequest) -> GetTaskStatusResponse;
}
