//! A DaemonService that records what a daemon sends and lets a test speak
//! the server's side of the Session stream.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic::{Request, Status, Streaming};

use crate::pb::daemon_service_server::{DaemonService, DaemonServiceServer};
use crate::pb::session_request::Message as Up;
use crate::pb::session_response::Message as Down;
use crate::pb::{self, *};

#[derive(Debug)]
pub(super) enum MockEvent {
    Registered(RegisterRequest, String),
    Connected(
        usize,
        mpsc::UnboundedSender<Result<SessionResponse, Status>>,
    ),
    Up(usize, SessionRequest),
    Deregistered(String),
}

pub(super) struct Mock {
    events: mpsc::UnboundedSender<MockEvent>,
    conns: std::sync::atomic::AtomicUsize,
    /// Register answers this instead of a daemon.
    refuse: Option<Status>,
}

#[tonic::async_trait]
impl DaemonService for Mock {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<tonic::Response<pb::RegisterResponse>, Status> {
        let auth = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let _ = self
            .events
            .send(MockEvent::Registered(req.into_inner(), auth));
        if let Some(status) = &self.refuse {
            return Err(status.clone());
        }
        Ok(tonic::Response::new(pb::RegisterResponse {
            daemon: Some(pb::Daemon {
                id: "d1".into(),
                ..Default::default()
            }),
            heartbeat_interval: None,
        }))
    }

    async fn deregister(
        &self,
        req: Request<DeregisterRequest>,
    ) -> Result<tonic::Response<pb::DeregisterResponse>, Status> {
        let _ = self
            .events
            .send(MockEvent::Deregistered(req.into_inner().daemon_id));
        Ok(tonic::Response::new(pb::DeregisterResponse {}))
    }

    async fn heartbeat(
        &self,
        _: Request<HeartbeatRequest>,
    ) -> Result<tonic::Response<pb::HeartbeatResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn claim_task(
        &self,
        _: Request<pb::ClaimTaskRequest>,
    ) -> Result<tonic::Response<pb::ClaimTaskResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn report_task_started(
        &self,
        _: Request<ReportTaskStartedRequest>,
    ) -> Result<tonic::Response<pb::ReportTaskStartedResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn report_task_progress(
        &self,
        _: Request<pb::ReportTaskProgressRequest>,
    ) -> Result<tonic::Response<pb::ReportTaskProgressResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn report_task_messages(
        &self,
        _: Request<ReportTaskMessagesRequest>,
    ) -> Result<tonic::Response<pb::ReportTaskMessagesResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn report_task_usage(
        &self,
        _: Request<pb::ReportTaskUsageRequest>,
    ) -> Result<tonic::Response<pb::ReportTaskUsageResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn complete_task(
        &self,
        _: Request<CompleteTaskRequest>,
    ) -> Result<tonic::Response<pb::CompleteTaskResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn fail_task(
        &self,
        _: Request<FailTaskRequest>,
    ) -> Result<tonic::Response<pb::FailTaskResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn get_task_status(
        &self,
        _: Request<pb::GetTaskStatusRequest>,
    ) -> Result<tonic::Response<pb::GetTaskStatusResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    type SessionStream = futures_util::stream::BoxStream<'static, Result<SessionResponse, Status>>;

    async fn session(
        &self,
        req: Request<Streaming<SessionRequest>>,
    ) -> Result<tonic::Response<Self::SessionStream>, Status> {
        let conn = self.conns.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let mut inbound = req.into_inner();
        let (down_tx, down_rx) = mpsc::unbounded_channel();
        let _ = self.events.send(MockEvent::Connected(conn, down_tx));
        let events = self.events.clone();
        let (closed_tx, closed_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            while let Ok(Some(req)) = inbound.message().await {
                let _ = events.send(MockEvent::Up(conn, req));
            }
            let _ = closed_tx.send(());
        });
        // The response stream ends when the daemon ends its side.
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(down_rx)
            .take_until(closed_rx)
            .boxed();
        Ok(tonic::Response::new(stream))
    }
}

pub(super) async fn start_mock() -> (SocketAddr, mpsc::UnboundedReceiver<MockEvent>) {
    start_mock_with(None).await
}

/// A mock whose Register answers `refuse` when given.
pub(super) async fn start_mock_with(
    refuse: Option<Status>,
) -> (SocketAddr, mpsc::UnboundedReceiver<MockEvent>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    let mock = Mock {
        events: tx,
        conns: Default::default(),
        refuse,
    };
    tokio::spawn(
        Server::builder()
            .add_service(DaemonServiceServer::new(mock))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (addr, rx)
}

pub(super) async fn next_event(rx: &mut mpsc::UnboundedReceiver<MockEvent>) -> MockEvent {
    timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("mock event in time")
        .expect("mock alive")
}

/// The next upstream message of a session (skipping heartbeats).
pub(super) async fn next_up(rx: &mut mpsc::UnboundedReceiver<MockEvent>, conn: usize) -> Up {
    loop {
        match next_event(rx).await {
            MockEvent::Up(c, SessionRequest { message: Some(m) }) if c == conn => {
                if !matches!(m, Up::Heartbeat(_)) {
                    return m;
                }
            }
            other => panic!("expected a message on session {conn}, got {other:?}"),
        }
    }
}

pub(super) async fn connect(
    rx: &mut mpsc::UnboundedReceiver<MockEvent>,
) -> (
    usize,
    mpsc::UnboundedSender<Result<SessionResponse, Status>>,
    SessionOpen,
) {
    match next_event(rx).await {
        MockEvent::Registered(reg, auth) => {
            assert_eq!(auth, "Bearer tmd_test");
            assert_eq!(reg.runtimes[0].name, "shell");
            assert_eq!(reg.runtimes[0].version, "builtin");
        }
        other => panic!("expected Register, got {other:?}"),
    }
    let (conn, down) = match next_event(rx).await {
        MockEvent::Connected(conn, down) => (conn, down),
        other => panic!("expected a session, got {other:?}"),
    };
    let open = match next_up(rx, conn).await {
        Up::Open(open) => open,
        other => panic!("expected SessionOpen first, got {other:?}"),
    };
    assert_eq!(open.daemon_id, "d1");
    let ready = SessionResponse {
        message: Some(Down::Ready(pb::SessionReady {
            daemon_id: "d1".into(),
            heartbeat_interval: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
        })),
    };
    down.send(Ok(ready)).expect("send ready");
    (conn, down, open)
}

pub(super) fn down(message: Down) -> Result<SessionResponse, Status> {
    Ok(SessionResponse {
        message: Some(message),
    })
}
