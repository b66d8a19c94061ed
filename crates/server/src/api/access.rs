//! Who may call what: the one table from RPC to the token kinds it
//! accepts, and the layer that enforces it in front of every service.
//!
//! [`AccessLayer`] wraps each taskmesh service (inside gRPC-web, so a
//! refusal reaches a browser as gRPC-web too). For every call it reads
//! `authorization: Bearer <token>`, resolves the token to a [`Principal`],
//! checks the caller's kind against [`RULES`], and hands the principal to
//! the handler in the request's extensions ([`principal`]). A method
//! missing from the table is refused: access fails closed.
//!
//! Failed authentications are counted per client address; past a burst,
//! that address's wrong tokens are answered RESOURCE_EXHAUSTED (with the
//! time to wait) after a pause, while valid tokens pass as always.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

use crate::conn::ConnInfo;
use crate::domain::{Domain, Error, hash_secret};
use crate::model::{Principal, StoredEnum, TokenKind};

use TokenKind::{Agent, Daemon, User, Viewer};

const USER: &[TokenKind] = &[User];
const READ: &[TokenKind] = &[User, Viewer];
const DAEMON: &[TokenKind] = &[Daemon];
/// Also for an agent token, within its task's tree (`domain::agents`).
const TREE_READ: &[TokenKind] = &[User, Viewer, Agent];
const TREE_WRITE: &[TokenKind] = &[User, Agent];

/// Every taskmesh RPC and the token kinds it accepts. Users steer tasks and
/// manage workspaces; viewers read and watch; daemons run tasks; an agent
/// works on its own task's tree (`domain::agents`).
pub const RULES: &[(&str, &[TokenKind])] = &[
    ("taskmesh.v1.TaskService/CreateTask", TREE_WRITE),
    ("taskmesh.v1.TaskService/GetTask", TREE_READ),
    ("taskmesh.v1.TaskService/GetTaskDiff", TREE_READ),
    ("taskmesh.v1.TaskService/CloneWorktree", USER),
    ("taskmesh.v1.TaskService/ListTasks", TREE_READ),
    ("taskmesh.v1.TaskService/UpdateTask", USER),
    ("taskmesh.v1.TaskService/DeleteTask", USER),
    ("taskmesh.v1.TaskService/StartTask", TREE_WRITE),
    ("taskmesh.v1.TaskService/StopTask", TREE_WRITE),
    ("taskmesh.v1.TaskService/SendMessage", TREE_WRITE),
    ("taskmesh.v1.TaskService/ListTaskMessages", TREE_READ),
    ("taskmesh.v1.TaskService/WatchTask", TREE_READ),
    ("taskmesh.v1.TaskService/WatchTasks", READ),
    ("taskmesh.v1.TaskService/ListTaskEvents", TREE_READ),
    ("taskmesh.v1.TaskService/ReassignTask", USER),
    ("taskmesh.v1.TaskService/ContinueTask", USER),
    ("taskmesh.v1.TaskService/RetryCompletion", USER),
    ("taskmesh.v1.TaskService/GetTaskUsage", TREE_READ),
    ("taskmesh.v1.TaskService/DecideApproval", USER),
    ("taskmesh.v1.TaskService/ListApprovals", READ),
    ("taskmesh.v1.DaemonService/Register", DAEMON),
    ("taskmesh.v1.DaemonService/Deregister", DAEMON),
    ("taskmesh.v1.DaemonService/Heartbeat", DAEMON),
    ("taskmesh.v1.DaemonService/ClaimTask", DAEMON),
    ("taskmesh.v1.DaemonService/ReportTaskStarted", DAEMON),
    (
        "taskmesh.v1.DaemonService/ReportTaskProgress",
        &[Daemon, Agent],
    ),
    ("taskmesh.v1.DaemonService/ReportTaskMessages", DAEMON),
    ("taskmesh.v1.DaemonService/ReportTaskUsage", DAEMON),
    ("taskmesh.v1.DaemonService/CompleteTask", DAEMON),
    ("taskmesh.v1.DaemonService/FailTask", DAEMON),
    ("taskmesh.v1.DaemonService/GetTaskStatus", DAEMON),
    ("taskmesh.v1.DaemonService/Session", DAEMON),
    ("taskmesh.v1.WorkspaceService/ListWorkspaces", READ),
    ("taskmesh.v1.WorkspaceService/CreateWorkspace", USER),
    ("taskmesh.v1.WorkspaceService/ListDaemons", READ),
    ("taskmesh.v1.WorkspaceService/GetDaemon", READ),
    ("taskmesh.v1.WorkspaceService/CheckTargetExists", USER),
    ("taskmesh.v1.WorkspaceService/DisconnectDaemon", USER),
    ("taskmesh.v1.WorkspaceService/CreateToken", USER),
    ("taskmesh.v1.WorkspaceService/ListTokens", USER),
    ("taskmesh.v1.WorkspaceService/RevokeToken", USER),
];

/// The token kinds `path` (`/package.Service/Method`) accepts; `None` for
/// a method the table does not know.
pub fn kinds_for(path: &str) -> Option<&'static [TokenKind]> {
    let method = path.strip_prefix('/')?;
    RULES
        .iter()
        .find(|(m, _)| *m == method)
        .map(|(_, kinds)| *kinds)
}

fn describe(kinds: &[TokenKind]) -> String {
    let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
    names.join(" or ")
}

/// The caller, as [`AccessLayer`] resolved it.
pub fn principal<T>(req: &tonic::Request<T>) -> Result<Principal, Status> {
    req.extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::internal("the call was not authenticated"))
}

/// Failed authentications tolerated per client address before it is
/// slowed down, and how fast that allowance refills.
const FAILURE_BURST: f64 = 20.0;
const FAILURES_PER_SEC: f64 = 2.0;
/// How long a throttled address waits for each refusal.
const THROTTLED_ANSWER: Duration = Duration::from_millis(250);
/// Addresses and recently valid tokens remembered at most.
const MAX_TRACKED: usize = 100_000;

#[derive(Default)]
struct Limiter {
    /// Per address: the failure allowance left, and when it was computed.
    failures: HashMap<IpAddr, (f64, Instant)>,
    /// Hashes of tokens that authenticated lately: they pass a throttled
    /// address without waiting.
    valid: HashMap<String, Instant>,
}

impl Limiter {
    /// The allowance left for `ip` now.
    fn allowance(&mut self, ip: IpAddr, now: Instant) -> f64 {
        match self.failures.get(&ip) {
            Some(&(left, at)) => {
                (left + now.duration_since(at).as_secs_f64() * FAILURES_PER_SEC).min(FAILURE_BURST)
            }
            None => FAILURE_BURST,
        }
    }

    fn failed(&mut self, ip: IpAddr, now: Instant) {
        if self.failures.len() >= MAX_TRACKED {
            self.failures.clear();
        }
        let left = self.allowance(ip, now) - 1.0;
        self.failures.insert(ip, (left, now));
    }

    fn succeeded(&mut self, hash: &str, now: Instant) {
        if self.valid.len() >= MAX_TRACKED {
            self.valid.clear();
        }
        self.valid.insert(hash.to_string(), now);
    }

    /// How long `ip` must wait before its next failure counts again, if it
    /// spent its allowance; `None` for a token known to be valid.
    fn wait(&mut self, ip: IpAddr, hash: &str, now: Instant) -> Option<Duration> {
        if self.valid.contains_key(hash) {
            return None;
        }
        let left = self.allowance(ip, now);
        (left < 1.0).then(|| Duration::from_secs_f64((1.0 - left) / FAILURES_PER_SEC))
    }
}

/// Authenticates every call and enforces [`RULES`]; see the module docs.
#[derive(Clone)]
pub struct AccessLayer {
    domain: Arc<Domain>,
    limiter: Arc<Mutex<Limiter>>,
    /// With `--client-ca`: DaemonService needs a verified client
    /// certificate as well as a daemon token.
    daemons_need_certificates: bool,
}

impl AccessLayer {
    pub fn new(domain: Arc<Domain>, daemons_need_certificates: bool) -> Self {
        AccessLayer {
            domain,
            limiter: Arc::default(),
            daemons_need_certificates,
        }
    }

    /// The principal behind the request's token, or the status to answer.
    async fn check(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        peer: Peer,
    ) -> Result<Principal, Status> {
        let Some(kinds) = kinds_for(path) else {
            return Err(Status::permission_denied(format!(
                "{path} has no access rule"
            )));
        };
        if self.daemons_need_certificates
            && path.starts_with("/taskmesh.v1.DaemonService/")
            && !peer.certified
        {
            return Err(Status::unauthenticated(
                "DaemonService needs a client certificate signed by --client-ca",
            ));
        }
        let ip = peer.ip;
        let secret = bearer(headers)?;
        let hash = hash_secret(secret);
        let now = Instant::now();
        let throttled = ip.and_then(|ip| self.lock().wait(ip, &hash, now).map(|w| (ip, w)));
        let principal = match self.domain.authenticate(secret).await {
            Ok(p) => p,
            Err(e) => {
                if let (Error::Unauthenticated(_), Some(ip)) = (&e, ip) {
                    self.lock().failed(ip, now);
                }
                // A throttled address learns nothing more, and waits.
                if let (Error::Unauthenticated(_), Some((ip, wait))) = (&e, throttled) {
                    tokio::time::sleep(THROTTLED_ANSWER).await;
                    return Err(Status::resource_exhausted(format!(
                        "too many failed authentications from {ip}; retry in {} s",
                        wait.as_secs().max(1)
                    )));
                }
                return Err(e.into());
            }
        };
        self.lock().succeeded(&hash, now);
        if !kinds.contains(&principal.kind) {
            return Err(Status::permission_denied(format!(
                "a {} token cannot call {}; it needs a {} token",
                principal.kind,
                path.trim_start_matches('/'),
                describe(kinds)
            )));
        }
        Ok(principal)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Limiter> {
        self.limiter.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The secret of `authorization: Bearer <secret>`.
fn bearer(headers: &http::HeaderMap) -> Result<&str, Status> {
    let header = headers
        .get(http::header::AUTHORIZATION)
        .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>` header"))?;
    let value = header
        .to_str()
        .map_err(|_| Status::unauthenticated("malformed authorization header"))?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))
}

/// What the connection tells of the client.
#[derive(Debug, Clone, Copy, Default)]
struct Peer {
    ip: Option<IpAddr>,
    /// It presented a certificate the server verified (mTLS).
    certified: bool,
}

/// From `serve`'s own connections ([`ConnInfo`]), or from tonic's when
/// the services run under a plain tonic server (TCP, or TLS over TCP).
fn peer<B>(req: &http::Request<B>) -> Peer {
    let ext = req.extensions();
    if let Some(conn) = ext.get::<ConnInfo>() {
        return Peer {
            ip: Some(conn.remote_addr.ip()),
            certified: conn.client_certified,
        };
    }
    if let Some(tls) = ext.get::<TlsConnectInfo<TcpConnectInfo>>() {
        return Peer {
            ip: tls.get_ref().remote_addr().map(|a| a.ip()),
            certified: tls.peer_certs().is_some_and(|c| !c.is_empty()),
        };
    }
    Peer {
        ip: ext
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
            .map(|a| a.ip()),
        certified: false,
    }
}

impl<S> Layer<S> for AccessLayer {
    type Service = Access<S>;
    fn layer(&self, inner: S) -> Access<S> {
        Access {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Access<S> {
    inner: S,
    layer: AccessLayer,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Access<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Access<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone is the one that was made ready; keep that one for the call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let peer = peer(&req);
            match layer.check(&path, req.headers(), peer).await {
                Ok(principal) => {
                    req.extensions_mut().insert(principal);
                    let mut res = inner.call(req).await?;
                    undecodable_is_invalid(res.headers_mut());
                    Ok(res)
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// A request that does not decode is the caller's mistake: tonic answers
/// INTERNAL, this answers INVALID_ARGUMENT.
fn undecodable_is_invalid(headers: &mut http::HeaderMap) {
    let internal = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"13");
    // grpc-message is percent-encoded.
    let decode = headers.get("grpc-message").is_some_and(|v| {
        let v = v.as_bytes();
        v.starts_with(b"failed to decode") || v.starts_with(b"failed%20to%20decode")
    });
    if internal && decode {
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// Every method of every taskmesh service has exactly one rule, and
    /// every rule names a method that exists.
    #[test]
    fn the_table_covers_every_rpc() {
        let set = prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET).unwrap();
        let mut methods = Vec::new();
        for file in &set.file {
            for service in &file.service {
                for m in &service.method {
                    methods.push(format!(
                        "{}.{}/{}",
                        file.package(),
                        service.name(),
                        m.name()
                    ));
                }
            }
        }
        for m in &methods {
            let n = RULES.iter().filter(|(r, _)| r == m).count();
            assert_eq!(n, 1, "{m} has {n} rules");
        }
        for (r, _) in RULES {
            assert!(methods.iter().any(|m| m == r), "{r} is not an RPC");
        }
        assert_eq!(kinds_for("/taskmesh.v1.TaskService/Nope"), None);
    }

    #[test]
    fn failures_are_throttled_per_address_but_known_tokens_pass() {
        let mut l = Limiter::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let now = Instant::now();
        for _ in 0..FAILURE_BURST as usize {
            assert_eq!(l.wait(a, "bad", now), None);
            l.failed(a, now);
        }
        let wait = l.wait(a, "bad", now).expect("throttled");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert_eq!(l.wait(b, "bad", now), None, "another address is not");
        l.succeeded("good", now);
        assert_eq!(l.wait(a, "good", now), None, "a known token passes");
        let later = now + Duration::from_secs(1);
        assert_eq!(l.wait(a, "bad", later), None, "the allowance refills");
    }
}
