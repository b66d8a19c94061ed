//! The connections `serve` accepts: TCP with TCP_NODELAY, the TLS
//! handshake (when serving TLS) on a task of its own so a slow client never
//! holds up the accept loop, what every request learns of its connection
//! ([`ConnInfo`], in its extensions), and idle connections closed.
//!
//! A connection is idle while it carries no request: [`ActivityLayer`]
//! counts the requests of each connection from the call until their
//! response body is done (a stream counts until it ends), and the
//! connection reads end of file once it has carried none for
//! `--idle-timeout`. Keepalive pings and their answers do not count, so an
//! idle HTTP/2 connection closes even though it is alive.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tower::{Layer, Service};

/// A client gets this long to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepted connections waiting for the server to take them.
const BACKLOG: usize = 128;
/// Bytes read this recently keep an idle connection open a little longer:
/// they may be a request the server has read but not yet started.
const READ_GRACE: Duration = Duration::from_secs(1);

/// What a request knows of its connection; in every request's extensions.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The client's address.
    pub remote_addr: SocketAddr,
    /// Over TLS with `--client-ca`: the client presented a certificate that
    /// verified against it (a failed verification fails the handshake).
    pub client_certified: bool,
    activity: Arc<Activity>,
}

/// The requests a connection carries, and since when it carries none.
#[derive(Debug)]
struct Activity {
    born: Instant,
    /// Requests called and not yet answered in full.
    open: AtomicUsize,
    /// Milliseconds after `born` when `open` last fell to zero.
    idle_since: AtomicU64,
    /// Milliseconds after `born` of the last read that returned bytes.
    last_read: AtomicU64,
    /// The connection's task, woken when it falls idle to arm its timer.
    waker: Mutex<Option<Waker>>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            born: Instant::now(),
            open: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            last_read: AtomicU64::new(0),
            waker: Mutex::new(None),
        }
    }

    fn millis(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    fn at(&self, millis: u64) -> Instant {
        self.born + Duration::from_millis(millis)
    }

    fn started(&self) {
        self.open.fetch_add(1, Ordering::AcqRel);
    }

    fn finished(&self) {
        if self.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle_since.store(self.millis(), Ordering::Release);
            let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

/// Plain TCP or TLS over TCP.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection as tonic serves it.
pub struct Conn {
    stream: Stream,
    info: ConnInfo,
    idle_timeout: Option<Duration>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Conn {
    fn new(stream: Stream, remote_addr: SocketAddr, idle_timeout: Option<Duration>) -> Conn {
        let client_certified = match &stream {
            Stream::Plain(_) => false,
            Stream::Tls(tls) => tls
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty()),
        };
        Conn {
            stream,
            info: ConnInfo {
                remote_addr,
                client_certified,
                activity: Arc::new(Activity::new()),
            },
            idle_timeout,
            timer: None,
        }
    }

    /// Whether the connection has been idle for its timeout; if not, arms
    /// the timer (or asks to be woken when the last request ends).
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(timeout) = self.idle_timeout else {
            return false;
        };
        let activity = &self.info.activity;
        if activity.open.load(Ordering::Acquire) > 0 {
            let mut waker = activity.waker.lock().unwrap_or_else(|e| e.into_inner());
            if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *waker = Some(cx.waker().clone());
            }
            drop(waker);
            // It may have ended between the load and the registration.
            if activity.open.load(Ordering::Acquire) > 0 {
                return false;
            }
        }
        let idle = activity.at(activity.idle_since.load(Ordering::Acquire)) + timeout;
        let read =
            activity.at(activity.last_read.load(Ordering::Acquire)) + READ_GRACE.min(timeout);
        let deadline = idle.max(read);
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx).is_ready()
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        };
        match read {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let activity = &self.info.activity;
                    activity
                        .last_read
                        .store(activity.millis(), Ordering::Release);
                }
                Poll::Ready(r)
            }
            // Nothing to read and idle too long: end of file, which ends
            // the connection as if the client had closed it.
            Poll::Pending if self.idle_expired(cx) => {
                tracing::debug!(peer = %self.info.remote_addr, "closing an idle connection");
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Accepts connections on `listener` until the returned stream is dropped
/// (then the listener is closed at once): TCP_NODELAY on each, and with
/// `tls` the handshake on a task of its own, bounded by a timeout.
pub fn incoming(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    idle_timeout: Option<Duration>,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(BACKLOG);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                // The server stopped taking connections: stop listening.
                _ = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors, most likely: let some close.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Without it, a small frame written while the previous one
            // awaits a delayed ACK waits ~40 ms (Nagle).
            let _ = tcp.set_nodelay(true);
            match &tls {
                None => {
                    let conn = Conn::new(Stream::Plain(tcp), peer, idle_timeout);
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Some(acceptor) => {
                    let (acceptor, tx) = (acceptor.clone(), tx.clone());
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => {
                                let conn =
                                    Conn::new(Stream::Tls(Box::new(tls)), peer, idle_timeout);
                                let _ = tx.send(Ok(conn)).await;
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Counts each connection's open requests, for its idle timeout; see the
/// module docs. Outermost, so that every request counts.
#[derive(Clone, Copy)]
pub struct ActivityLayer;

impl<S> Layer<S> for ActivityLayer {
    type Service = ActivityService<S>;
    fn layer(&self, inner: S) -> ActivityService<S> {
        ActivityService { inner }
    }
}

#[derive(Clone)]
pub struct ActivityService<S> {
    inner: S,
}

impl<S, B, RB> Service<http::Request<B>> for ActivityService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Counted<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let open = req
            .extensions()
            .get::<ConnInfo>()
            .map(|c| Open::new(c.activity.clone()));
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            Ok(res.map(|body| Counted {
                body: Box::pin(body),
                _open: open,
            }))
        })
    }
}

/// One open request of a connection, until dropped.
struct Open(Arc<Activity>);

impl Open {
    fn new(activity: Arc<Activity>) -> Open {
        activity.started();
        Open(activity)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.finished();
    }
}

/// A response body that keeps its request open until it is dropped.
pub struct Counted<B> {
    body: Pin<Box<B>>,
    _open: Option<Open>,
}

impl<B: http_body::Body> http_body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.body.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
