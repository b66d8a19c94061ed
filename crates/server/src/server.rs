//! The server: every service, gRPC-web, reflection, health and the page at
//! `/` on one port.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::response::{Html, IntoResponse};
use http::{HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_web::GrpcWebLayer;
use tower::{Layer, Service};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::api::{AccessLayer, DaemonApi, TaskApi, WorkspaceApi};
use crate::cluster;
use crate::conn::{self, ActivityLayer};
use crate::domain::Domain;
use crate::pb;
use crate::pb::daemon_service_server::DaemonServiceServer;
use crate::pb::task_service_server::TaskServiceServer;
use crate::pb::workspace_service_server::WorkspaceServiceServer;
use crate::store::Backend;
use crate::tls::ServerTls;

#[derive(Clone)]
pub struct ServerConfig {
    /// Origins browsers may call from; empty allows any (tokens travel in a
    /// header, never in cookies, so `*` grants a page nothing by itself).
    pub cors_origins: Vec<String>,
    /// HTTP/2 keepalive ping interval and timeout, to catch half-open
    /// connections sooner than heartbeats do.
    pub keepalive: Duration,
    /// Serve over TLS with this; plaintext when `None`. (`serve` reloads
    /// its certificate: see [`ServerTls::spawn_reloader`].)
    pub tls: Option<ServerTls>,
    /// Largest request message a service decodes.
    pub max_message_bytes: usize,
    /// HTTP/2 streams one connection may hold open at once.
    pub max_streams_per_connection: u32,
    /// Close a connection that has carried no request for this long.
    pub idle_timeout: Option<Duration>,
    /// Serve `/metrics` on this port too (not when `serve
    /// --metrics-listen` moved them).
    pub metrics_here: bool,
}

/// gRPC's own default: every client library accepts this much.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 << 20;
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 1024;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            cors_origins: Vec::new(),
            keepalive: Duration::from_secs(20),
            tls: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            metrics_here: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid CORS origin {0:?}")]
    BadOrigin(String),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cluster listener: {0}")]
    Cluster(#[from] sqlx::Error),
}

// The dashboard, built from web/ (`npm run build` there) and committed.
const INDEX_HTML: &str = include_str!("../../../web/dist/index.html");
const APP_JS: &[u8] = include_bytes!("../../../web/dist/app.js");
const APP_CSS: &[u8] = include_bytes!("../../../web/dist/app.css");

/// Serves until `shutdown` completes, then stops accepting and drains.
pub async fn run(
    listener: TcpListener,
    domain: Arc<Domain>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<TaskServiceServer<TaskApi>>().await;
    health.set_serving::<DaemonServiceServer<DaemonApi>>().await;
    health
        .set_serving::<WorkspaceServiceServer<WorkspaceApi>>()
        .await;

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let closing = domain.clone();
    let sweeper = domain.clone();
    let shutdown = async move {
        shutdown.await;
        closing.close_streams();
    };
    let web = GrpcWebLayer::new();
    // Inside gRPC-web, so a refusal reaches a browser as gRPC-web.
    let verifies_clients = config.tls.as_ref().is_some_and(ServerTls::verifies_clients);
    let access = AccessLayer::new(domain.clone(), verifies_clients);
    let max = config.max_message_bytes;
    let tasks = TaskServiceServer::new(TaskApi::new(domain.clone())).max_decoding_message_size(max);
    let daemons =
        DaemonServiceServer::new(DaemonApi::new(domain.clone())).max_decoding_message_size(max);
    let scraped = domain.clone();
    let workspaces =
        WorkspaceServiceServer::new(WorkspaceApi::new(domain)).max_decoding_message_size(max);
    let routes = Routes::builder()
        .add_service(web.layer(access.layer(tasks)))
        .add_service(web.layer(access.layer(daemons)))
        .add_service(web.layer(access.layer(workspaces)))
        .add_service(web.layer(health_service))
        .add_service(web.layer(reflection().build_v1()?))
        .add_service(web.layer(reflection().build_v1alpha()?))
        .clone()
        .routes()
        .into_axum_router()
        .fallback(page);
    let routes = if config.metrics_here {
        routes.merge(metrics_router(scraped))
    } else {
        routes
    };

    // With PostgreSQL, replicas may share the database: listen to them.
    // Started first: it is the step that can fail.
    let peers = match sweeper.backend() {
        Backend::Postgres => {
            let url = sweeper.database_url().to_string();
            Some(cluster::start(sweeper.clone(), &url).await?)
        }
        Backend::Sqlite => None,
    };
    let liveness = sweeper.spawn_liveness();
    let retention = sweeper.spawn_retention();
    // Our own listener (tonic applies its socket options only to its own):
    // TCP_NODELAY, and the TLS handshakes off the accept loop; see `conn`.
    let incoming = conn::incoming(
        listener,
        config.tls.as_ref().map(ServerTls::acceptor),
        config.idle_timeout,
    );
    let served = tonic::transport::Server::builder()
        .accept_http1(true)
        .http2_keepalive_interval(Some(config.keepalive))
        .http2_keepalive_timeout(Some(config.keepalive))
        .max_concurrent_streams(config.max_streams_per_connection)
        .layer(ActivityLayer)
        .layer(cors(&config.cors_origins)?)
        .layer(RpcLogLayer)
        .add_routes(Routes::from(routes))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    liveness.abort();
    if let Some(retention) = retention {
        retention.abort();
    }
    if let Some(peers) = peers {
        peers.abort();
    }
    Ok(served?)
}

/// `GET /metrics`: this replica's metrics in the Prometheus (OpenMetrics)
/// text format.
pub fn metrics_router(domain: Arc<Domain>) -> axum::Router {
    let scrape = move || {
        let domain = domain.clone();
        async move {
            match domain.metrics_text().await {
                Ok(text) => {
                    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the metrics failed");
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("metrics unavailable: {e}\n"),
                    )
                        .into_response()
                }
            }
        }
    };
    axum::Router::new().route("/metrics", axum::routing::get(scrape))
}

/// Serves only `/metrics` on `listener` (`serve --metrics-listen`) until
/// `shutdown` completes.
pub async fn serve_metrics(
    listener: TcpListener,
    domain: Arc<Domain>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let incoming = conn::incoming(listener, None, Some(DEFAULT_IDLE_TIMEOUT));
    tonic::transport::Server::builder()
        .accept_http1(true)
        .add_routes(Routes::from(metrics_router(domain)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// The dashboard: its views (deep links included) get index.html, never
/// cached; its assets are named by content hash in index.html, so they are
/// cached for good.
async fn page(method: Method, uri: Uri) -> axum::response::Response {
    const IMMUTABLE: &str = "public, max-age=31536000, immutable";
    let asset = |kind: &'static str, body: &'static [u8]| {
        (
            [
                (header::CONTENT_TYPE, kind),
                (header::CACHE_CONTROL, IMMUTABLE),
            ],
            body,
        )
            .into_response()
    };
    if !matches!(method, Method::GET | Method::HEAD) {
        return (StatusCode::METHOD_NOT_ALLOWED, "GET only\n").into_response();
    }
    match uri.path() {
        "/assets/app.js" => asset("text/javascript; charset=utf-8", APP_JS),
        "/assets/app.css" => asset("text/css; charset=utf-8", APP_CSS),
        "/" | "/index.html" | "/new" | "/daemons" => view(),
        path if path.starts_with("/tasks/") => view(),
        _ => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}

fn view() -> axum::response::Response {
    ([(header::CACHE_CONTROL, "no-cache")], Html(INDEX_HTML)).into_response()
}

fn cors(origins: &[String]) -> Result<CorsLayer, ServeError> {
    let allow = if origins.is_empty() || origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let list = origins
            .iter()
            .map(|o| HeaderValue::from_str(o).map_err(|_| ServeError::BadOrigin(o.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(list)
    };
    Ok(CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        // Mirrored, because a wildcard never covers `authorization`.
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers([
            HeaderName::from_static("grpc-status"),
            HeaderName::from_static("grpc-message"),
            HeaderName::from_static("grpc-status-details-bin"),
        ])
        .max_age(Duration::from_secs(3600)))
}

/// Logs one line per request: the RPC (or path), its gRPC code (or HTTP
/// status) and how long it took to answer. For streams the time is to the
/// response headers.
#[derive(Clone, Copy)]
struct RpcLogLayer;

impl<S> Layer<S> for RpcLogLayer {
    type Service = RpcLog<S>;
    fn layer(&self, inner: S) -> RpcLog<S> {
        RpcLog { inner }
    }
}

#[derive(Clone)]
struct RpcLog<S> {
    inner: S,
}

impl<S, B, RB> Service<http::Request<B>> for RpcLog<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let start = Instant::now();
        let path = req.uri().path().to_string();
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            if let Ok(r) = &res {
                if grpc {
                    let code = r
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map_or(tonic::Code::Ok, tonic::Code::from_i32);
                    tracing::info!(rpc = %path, code = ?code, ms = format_args!("{ms:.2}"), "rpc");
                    // Known methods only: a label per made-up path would
                    // grow without bound.
                    let known =
                        crate::api::kinds_for(&path).is_some() || path.starts_with("/grpc.");
                    let method = if known {
                        path.trim_start_matches('/')
                    } else {
                        "other"
                    };
                    let m = &crate::metrics::METRICS;
                    let labels = crate::metrics::RpcLabels {
                        method: method.to_owned(),
                        code: format!("{code:?}"),
                    };
                    m.rpcs.get_or_create(&labels).inc();
                    let labels = crate::metrics::MethodLabels {
                        method: method.to_owned(),
                    };
                    m.rpc_seconds.get_or_create(&labels).observe(ms / 1000.0);
                } else {
                    tracing::info!(path = %path, status = r.status().as_u16(), ms = format_args!("{ms:.2}"), "http");
                }
            }
            res
        })
    }
}
