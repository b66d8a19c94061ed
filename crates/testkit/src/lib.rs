//! What taskmesh's tests (and its benchmark) stand on: a throwaway database
//! ([`TestDb`]: a temporary SQLite file, or a new PostgreSQL database that
//! is dropped afterwards), the real server on an ephemeral port
//! ([`start_server`]) with real gRPC clients, the scripted daemon
//! ([`daemon`]), and `taskmesh serve` / `taskmesh daemon` as child processes
//! ([`process`]).
//!
//! PostgreSQL tests use `TASKMESH_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`). Setting it to `skip`
//! skips them locally; under CI=true a skip is a failure.

pub mod certs;
pub mod daemon;
pub mod db;
pub mod git;
pub mod http;
pub mod process;
pub mod raw;
pub mod tasks;
pub mod watch;

pub use db::{Backend, DbKind, TestDb};

use std::net::SocketAddr;
use std::sync::Arc;

pub use taskmesh_proto::Bearer;
use taskmesh_server::domain::{Domain, Limits, Liveness};
use taskmesh_server::model::TokenKind;
use taskmesh_server::pb::task_service_client::TaskServiceClient;
use taskmesh_server::pb::workspace_service_client::WorkspaceServiceClient;
use taskmesh_server::server::{self, ServerConfig};
use taskmesh_server::store::Store;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Runs `body` against each backend; a macro so each backend is its own test.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Sqlite).await
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if $crate::postgres_enabled() {
                        super::$name($crate::Backend::Postgres).await
                    }
                }
            )+
        }
    };
}

/// Whether PostgreSQL tests run: always, unless explicitly skipped outside CI.
pub fn postgres_enabled() -> bool {
    let skip = std::env::var("TASKMESH_TEST_DATABASE_URL").is_ok_and(|v| v == "skip");
    if skip && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("TASKMESH_TEST_DATABASE_URL=skip is not allowed in CI: PostgreSQL tests must run");
    }
    if skip {
        eprintln!("skipping a PostgreSQL test: TASKMESH_TEST_DATABASE_URL=skip");
    }
    !skip
}

pub struct TestServer {
    pub addr: SocketAddr,
    /// The bootstrap admin token of workspace `default`.
    pub token: String,
    pub domain: Arc<Domain>,
    pub store: Store,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
    // Dropped last: the database outlives the server.
    pub db: TestDb,
}

pub async fn start_server(backend: Backend) -> TestServer {
    start_server_on(TestDb::new(backend).await).await
}

pub async fn start_server_on(db: TestDb) -> TestServer {
    start_server_with(db, Liveness::default()).await
}

/// A server with its own liveness settings (tests use milliseconds).
pub async fn start_server_with(db: TestDb, liveness: Liveness) -> TestServer {
    launch(db, "127.0.0.1:0".parse().unwrap(), liveness).await
}

/// A second replica on the same database as `of` (PostgreSQL), as
/// `taskmesh serve` runs several against one database.
pub async fn start_replica(of: &TestServer) -> TestServer {
    let db = TestDb::borrowed(&of.db.url);
    launch(db, "127.0.0.1:0".parse().unwrap(), Liveness::default()).await
}

/// Starts a server on `db` listening on `addr` (port 0: any). The token is
/// the bootstrap token on a new database, else a new user token of
/// workspace `default`.
/// A server with its own per-caller limits.
pub async fn start_server_with_limits(db: TestDb, limits: Limits) -> TestServer {
    launch_with(
        db,
        "127.0.0.1:0".parse().unwrap(),
        Liveness::default(),
        limits,
    )
    .await
}

async fn launch(db: TestDb, addr: SocketAddr, liveness: Liveness) -> TestServer {
    launch_with(db, addr, liveness, Limits::default()).await
}

async fn launch_with(
    db: TestDb,
    addr: SocketAddr,
    liveness: Liveness,
    limits: Limits,
) -> TestServer {
    let store = Store::connect(&db.url)
        .await
        .expect("open the test database");
    let domain = Domain::with_limits(store.clone(), liveness, limits);
    let token = match domain.bootstrap().await.expect("bootstrap") {
        Some(token) => token,
        None => {
            let (_, secret, _) = domain
                .create_token_unchecked("default", TokenKind::User, "test", "admin")
                .await
                .expect("create token");
            secret
        }
    };
    // A port just released may be held a moment longer by another socket.
    let mut tries = 0;
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) if tries < 50 && addr.port() != 0 => {
                tries += 1;
                eprintln!("bind {addr}: {e}; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    };
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel();
    let handle = tokio::spawn({
        let domain = domain.clone();
        async move {
            server::run(listener, domain, ServerConfig::default(), async {
                let _ = stopped.await;
            })
            .await
            .expect("server");
        }
    });
    TestServer {
        addr,
        token,
        domain,
        store,
        stop: Some(stop),
        handle: Some(handle),
        db,
    }
}

/// The interceptor for `token`: none at all for `None`.
pub fn bearer(token: Option<&str>) -> Bearer {
    token.map_or_else(Bearer::none, |t| {
        Bearer::new(t).expect("a token that fits a header")
    })
}

pub type Tasks = TaskServiceClient<InterceptedService<Channel, Bearer>>;

/// A TaskService client for the server at `url` with `token`.
pub async fn tasks_at(url: &str, token: &str) -> Tasks {
    let channel = Endpoint::from_shared(url.to_owned())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    TaskServiceClient::with_interceptor(channel, bearer(Some(token)))
}
pub type Workspaces = WorkspaceServiceClient<InterceptedService<Channel, Bearer>>;

impl TestServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn tasks(&self) -> Tasks {
        self.tasks_as(Some(&self.token)).await
    }

    pub async fn tasks_as(&self, token: Option<&str>) -> Tasks {
        TaskServiceClient::with_interceptor(self.channel().await, bearer(token))
    }

    pub async fn workspaces(&self) -> Workspaces {
        self.workspaces_as(Some(&self.token)).await
    }

    pub async fn workspaces_as(&self, token: Option<&str>) -> Workspaces {
        WorkspaceServiceClient::with_interceptor(self.channel().await, bearer(token))
    }

    /// A new token in another (possibly new) workspace.
    pub async fn token_in(&self, workspace: &str, kind: TokenKind) -> String {
        let (_, secret, _) = self
            .domain
            .create_token_unchecked(workspace, kind, "test", &format!("user-{workspace}"))
            .await
            .expect("create token");
        secret
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("server task");
        }
        self.store.close().await;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

impl TestServer {
    /// Stops the server as `stop` does but hands its database back instead
    /// of removing it, so another server can start on it.
    pub async fn stop_keeping_db(mut self) -> TestDb {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("server task");
        }
        self.store.close().await;
        std::mem::replace(&mut self.db, TestDb::borrowed(""))
    }
}

/// Starts a server on a database that may already hold data, listening on
/// `addr`: with the database and address of a stopped server, its clients
/// find the same tasks where they left them.
pub async fn start_server_at(db: TestDb, addr: SocketAddr) -> TestServer {
    launch(db, addr, Liveness::default()).await
}
