//! Reaching the server: the servers the daemon may use and the
//! authenticated DaemonService client of each, the jittered backoff
//! between attempts, and opening a session (Register, then the Session
//! stream with `open` as its first message).

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
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

/// Makes the client of a server URL, reached at one of the addresses its
/// host name resolves to (`None`: as the URL says).
pub(crate) type Connector =
    Box<dyn Fn(&str, Option<SocketAddr>) -> Result<Client, String> + Send + Sync>;

/// The servers a daemon may hold its session with (`--server`, repeated or
/// comma-separated), each replica of one control plane. A host name that
/// resolves to several addresses counts as one server per address, looked
/// up again before each choice. [`Servers::next`] goes round them: after a
/// server failed or drained, the daemon tries the next one.
pub(crate) struct Servers {
    urls: Vec<String>,
    connector: Connector,
    /// Clients by target, kept so a server's connection is reused.
    clients: HashMap<String, Client>,
    next: usize,
}

/// One place to reach a server: its URL and, for a name with several
/// addresses, which one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    url: String,
    addr: Option<SocketAddr>,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            Some(addr) => write!(f, "{} ({addr})", self.url),
            None => f.write_str(&self.url),
        }
    }
}

impl Servers {
    pub(crate) fn new(urls: Vec<String>, connector: Connector) -> Self {
        Self {
            urls,
            connector,
            clients: HashMap::new(),
            next: 0,
        }
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.urls.clone()
    }

    /// The next of `targets` after the last one chosen, skipping `avoid`
    /// (the server that just failed or drained) unless it is the only one;
    /// with its client. `None` when no client could be made (a TLS file
    /// became unreadable): the caller backs off and tries again.
    pub(crate) fn pick(
        &mut self,
        targets: &[Target],
        avoid: Option<&Target>,
    ) -> Option<(Target, Client)> {
        let n = targets.len();
        for _ in 0..n {
            let target = &targets[self.next % n];
            self.next = self.next.wrapping_add(1);
            if n > 1 && avoid == Some(target) {
                continue;
            }
            let key = target.to_string();
            if let Some(client) = self.clients.get(&key) {
                return Some((target.clone(), client.clone()));
            }
            match (self.connector)(&target.url, target.addr) {
                Ok(client) => {
                    self.clients.insert(key, client.clone());
                    return Some((target.clone(), client));
                }
                Err(e) => tracing::warn!(server = %target, "cannot use this server: {e}"),
            }
        }
        None
    }
}

/// Every target of `urls`, in the order given: a host name with several
/// addresses becomes one target per address; IP addresses, names that
/// resolve to one address and names that do not resolve (the connection
/// will say why) stay as given.
pub(crate) async fn targets(urls: Vec<String>) -> Vec<Target> {
    let mut targets = Vec::new();
    for url in urls {
        let addrs = match url.parse::<http::Uri>() {
            Ok(uri) => resolve(&uri).await,
            Err(_) => Vec::new(),
        };
        if addrs.len() > 1 {
            targets.extend(addrs.into_iter().map(|addr| Target {
                url: url.clone(),
                addr: Some(addr),
            }));
        } else {
            targets.push(Target { url, addr: None });
        }
    }
    targets
}

/// The addresses `uri`'s host resolves to, without repeats; none for an IP
/// address (nothing to resolve) or a name that does not resolve.
async fn resolve(uri: &http::Uri) -> Vec<SocketAddr> {
    let Some(host) = uri.host() else {
        return Vec::new();
    };
    let host = host.trim_matches(['[', ']']);
    if host.parse::<IpAddr>().is_ok() {
        return Vec::new();
    }
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let mut addrs: Vec<SocketAddr> = match tokio::net::lookup_host((host, port)).await {
        Ok(found) => found.collect(),
        Err(_) => return Vec::new(),
    };
    let mut seen = std::collections::HashSet::new();
    addrs.retain(|a| seen.insert(*a));
    addrs
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
    /// No client could be made for any server.
    NoServer,
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
            OpenError::NoServer => {
                f.write_str("no --server could be used (see the warnings above)")
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(urls: &[&str]) -> Servers {
        Servers::new(
            urls.iter().map(|u| (*u).to_owned()).collect(),
            Box::new(|url, _| {
                let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
                    .map_err(|e| e.to_string())?
                    .connect_lazy();
                Ok(DaemonServiceClient::with_interceptor(
                    channel,
                    Bearer::new("tmd_test").expect("token"),
                ))
            }),
        )
    }

    fn target(url: &str, addr: Option<&str>) -> Target {
        Target {
            url: url.to_owned(),
            addr: addr.map(|a| a.parse().expect("address")),
        }
    }

    /// Round the list; after a server that failed or drained, never that
    /// one again straight away unless it is the only one.
    #[tokio::test]
    async fn servers_are_tried_in_turn_skipping_the_one_just_left() {
        let mut s = servers(&["http://10.0.0.1:7070", "http://10.0.0.2:7070"]);
        let all = targets(s.urls()).await;
        assert_eq!(
            all,
            [
                target("http://10.0.0.1:7070", None),
                target("http://10.0.0.2:7070", None)
            ],
            "IP addresses are not resolved"
        );
        let first = s.pick(&all, None).expect("a client").0;
        assert_eq!(first, all[0]);
        let second = s.pick(&all, Some(&first)).expect("a client").0;
        assert_eq!(second, all[1]);
        // The next in turn is the first, unless it is the one just left.
        assert_eq!(s.pick(&all, Some(&all[0])).expect("a client").0, all[1]);
        assert_eq!(s.pick(&all, None).expect("a client").0, all[0]);

        let mut one = servers(&["http://10.0.0.1:7070"]);
        let only = targets(one.urls()).await;
        assert_eq!(
            one.pick(&only, Some(&only[0])).expect("a client").0,
            only[0]
        );
    }

    /// A name with several addresses is one target per address, shown
    /// with both; a name that does not resolve stays as given.
    #[tokio::test]
    async fn names_become_one_target_per_address() {
        let spread = [
            target("https://cp.example:7070", Some("10.0.0.1:7070")),
            target("https://cp.example:7070", Some("10.0.0.2:7070")),
        ];
        assert_eq!(
            spread[1].to_string(),
            "https://cp.example:7070 (10.0.0.2:7070)"
        );
        let mut s = servers(&["https://cp.example:7070"]);
        assert_eq!(
            s.pick(&spread, Some(&spread[0])).expect("a client").0,
            spread[1]
        );
        let unknown = targets(vec!["http://no-such-host.invalid:7070".into()]).await;
        assert_eq!(unknown, [target("http://no-such-host.invalid:7070", None)]);
    }
}
