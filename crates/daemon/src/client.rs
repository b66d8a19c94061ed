//! Reaching the server: the authenticated DaemonService client, the
//! jittered backoff between attempts, and opening a session (Register, then
//! the Session stream with `open` as its first message).

use std::fmt;
use std::time::Duration;

use rand::Rng;
use taskmesh_proto::Bearer;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

use crate::pb::daemon_service_client::DaemonServiceClient;
use crate::pb::session_request::Message as Up;
use crate::pb::{RegisterRequest, SessionOpen, SessionRequest, SessionResponse};

pub(crate) type Client = DaemonServiceClient<InterceptedService<Channel, Bearer>>;

/// Largest message accepted from the server (a plan is up to 1 MiB, plus
/// the rebuilt context).
const MAX_DECODING_MESSAGE: usize = 16 * 1024 * 1024;
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const BACKOFF_START: Duration = Duration::from_millis(200);
pub(crate) const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// Requests queued for the stream; small, so "queued" is close to "sent".
const OUTBOUND_CAPACITY: usize = 16;

/// A client of `endpoint` that sends `bearer` with every call. The channel
/// connects lazily and reconnects by itself on the next call after a
/// failure.
pub(crate) fn connect(endpoint: Endpoint, bearer: Bearer) -> Client {
    let endpoint = endpoint
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect_timeout(Duration::from_secs(5));
    DaemonServiceClient::with_interceptor(endpoint.connect_lazy(), bearer)
        .max_decoding_message_size(MAX_DECODING_MESSAGE)
}

/// Jittered exponential backoff ("full jitter": uniform in 0..=current).
pub(crate) struct Backoff {
    current: Duration,
    start: Duration,
    cap: Duration,
}

impl Backoff {
    pub(crate) fn new(start: Duration, cap: Duration) -> Self {
        Self {
            current: start,
            start,
            cap,
        }
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let max_ms = u64::try_from(self.current.as_millis()).unwrap_or(u64::MAX);
        let delay = Duration::from_millis(rand::thread_rng().gen_range(0..=max_ms));
        self.current = (self.current * 2).min(self.cap);
        delay
    }

    pub(crate) fn reset(&mut self) {
        self.current = self.start;
    }
}

/// An open session before `SessionReady`.
pub(crate) struct Conn {
    pub daemon_id: String,
    pub heartbeat: Option<Duration>,
    pub tx: mpsc::Sender<SessionRequest>,
    pub inbound: Streaming<SessionResponse>,
}

/// Why a session could not be opened.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// Register or the Session call took longer than [`RPC_TIMEOUT`].
    TimedOut(&'static str),
    /// The server answered with an error.
    Refused { call: &'static str, status: Status },
    /// Register answered without a daemon id.
    NoDaemonId,
}

impl OpenError {
    /// The server will not take this daemon with this token: retrying
    /// cannot help.
    pub(crate) fn is_final(&self) -> bool {
        matches!(
            self,
            OpenError::Refused { status, .. }
                if matches!(status.code(), Code::Unauthenticated | Code::PermissionDenied)
        )
    }
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::TimedOut(call) => write!(f, "{call} timed out"),
            OpenError::Refused { call, status } => {
                write!(
                    f,
                    "{call} failed: {:?}: {}",
                    status.code(),
                    status.message()
                )
            }
            OpenError::NoDaemonId => f.write_str("Register answered without a daemon id"),
        }
    }
}

pub(crate) fn to_duration(d: Option<prost_types::Duration>) -> Option<Duration> {
    let d = d?;
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    let d = Duration::new(secs, nanos.min(999_999_999));
    (!d.is_zero()).then_some(d)
}

/// Registers and opens the stream with `open` as its first message.
pub(crate) async fn open_session(
    mut client: Client,
    register: RegisterRequest,
    running_task_ids: Vec<String>,
) -> Result<Conn, OpenError> {
    let resp = timeout(RPC_TIMEOUT, client.register(register))
        .await
        .map_err(|_| OpenError::TimedOut("Register"))?
        .map_err(|status| OpenError::Refused {
            call: "Register",
            status,
        })?
        .into_inner();
    let daemon_id = resp
        .daemon
        .map(|d| d.id)
        .filter(|id| !id.is_empty())
        .ok_or(OpenError::NoDaemonId)?;
    let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
    let open = SessionRequest {
        message: Some(Up::Open(SessionOpen {
            daemon_id: daemon_id.clone(),
            running_task_ids,
        })),
    };
    // A fresh channel has room for its first message.
    let _ = tx.try_send(open);
    let inbound = timeout(RPC_TIMEOUT, client.session(ReceiverStream::new(rx)))
        .await
        .map_err(|_| OpenError::TimedOut("opening the session"))?
        .map_err(|status| OpenError::Refused {
            call: "opening the session",
            status,
        })?
        .into_inner();
    Ok(Conn {
        daemon_id,
        heartbeat: to_duration(resp.heartbeat_interval),
        tx,
        inbound,
    })
}
