//! What the figures run against: a database made for the run and removed
//! after it, the server under test and the floor server as child processes
//! (so their memory is theirs alone), and authenticated clients.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use super::BenchResult;
use crate::pb;
use crate::pb::daemon_service_client::DaemonServiceClient;
use crate::pb::task_service_client::TaskServiceClient;
use crate::pb::workspace_service_client::WorkspaceServiceClient;

/// Which database the run uses: SQLite files in a temporary directory, or
/// fresh databases on a PostgreSQL server.
#[derive(Debug, Clone)]
pub enum DbKind {
    Sqlite { dir: PathBuf },
    Postgres { admin_url: String },
}

impl DbKind {
    pub fn name(&self) -> &'static str {
        match self {
            DbKind::Sqlite { .. } => "SQLite",
            DbKind::Postgres { .. } => "PostgreSQL",
        }
    }
}

/// A database that exists for one run and is removed when dropped.
pub struct BenchDb {
    pub url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    Files(PathBuf),
    Postgres { admin_url: String, name: String },
}

impl BenchDb {
    pub async fn create(kind: &DbKind, label: &str) -> BenchResult<BenchDb> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        match kind {
            DbKind::Sqlite { dir } => {
                let path = dir.join(format!("taskmesh-bench-{label}-{}.db", &id[..8]));
                Ok(BenchDb {
                    url: format!("sqlite://{}", path.display()),
                    cleanup: Cleanup::Files(path),
                })
            }
            DbKind::Postgres { admin_url } => {
                let name = format!("taskmesh_bench_{label}_{}", &id[..12]);
                let mut conn = admin(admin_url).await?;
                sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
                    .await
                    .map_err(|e| format!("cannot create database {name}: {e}"))?;
                Ok(BenchDb {
                    url: with_database(admin_url, &name),
                    cleanup: Cleanup::Postgres {
                        admin_url: admin_url.clone(),
                        name,
                    },
                })
            }
        }
    }
}

async fn admin(url: &str) -> BenchResult<sqlx::PgConnection> {
    use sqlx::Connection;
    Ok(sqlx::PgConnection::connect(url)
        .await
        .map_err(|e| format!("PostgreSQL is not reachable at {url}: {e}"))?)
}

/// The same server URL with another database name.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_part = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    format!("{host_part}/{name}{query}")
}

impl Drop for BenchDb {
    fn drop(&mut self) {
        match &self.cleanup {
            Cleanup::Files(path) => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            Cleanup::Postgres { admin_url, name } => {
                let (admin_url, name) = (admin_url.clone(), name.clone());
                // Drop may run inside the runtime, which cannot block on
                // itself: a private one on its own thread does the drop.
                let _ = std::thread::spawn(move || {
                    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    else {
                        return;
                    };
                    rt.block_on(async {
                        if let Ok(mut conn) = admin(&admin_url).await {
                            let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                            let _ = sqlx::Executor::execute(&mut conn, sql.as_str()).await;
                        }
                    });
                })
                .join();
            }
        }
    }
}

/// A child process of this binary that serves on an ephemeral port. It is
/// killed when dropped, and (on Linux) when this process dies.
pub struct ChildServer {
    child: Child,
    pub addr: SocketAddr,
    /// The first-start user token `serve` prints.
    pub token: Option<String>,
}

impl ChildServer {
    /// `taskmesh serve` on a fresh database.
    pub async fn serve(db: &BenchDb, log: Option<&PathBuf>) -> BenchResult<ChildServer> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &db.url,
        ]);
        let stderr = match log {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
            None => Stdio::null(),
        };
        cmd.stderr(stderr);
        let server = Self::spawn(cmd, "taskmesh listening on http://").await?;
        if server.token.is_none() {
            return Err("the server printed no first-start token".into());
        }
        Ok(server)
    }

    /// The bare floor server (`taskmesh bench --floor-server`).
    pub async fn floor() -> BenchResult<ChildServer> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["bench", "--floor-server"]).stderr(Stdio::null());
        Self::spawn(cmd, super::floor::LISTENING).await
    }

    async fn spawn(mut cmd: Command, listening: &str) -> BenchResult<ChildServer> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut token = None;
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                let line = line.trim();
                if line.starts_with("tmu_") {
                    token = Some(line.to_string());
                }
                if let Some(rest) = line.strip_prefix(listening) {
                    let addr = rest.split_whitespace().next().unwrap_or_default();
                    return Ok::<_, super::BenchError>(addr.parse::<SocketAddr>()?);
                }
            }
            Err("the server exited before listening".into())
        })
        .await
        .map_err(|_| "the server did not start listening within 60 s")??;
        // Nothing more is expected, but a full pipe must never block it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(ChildServer { child, addr, token })
    }

    /// Resident memory of the server process.
    pub fn rss_bytes(&self) -> BenchResult<u64> {
        let pid = self.child.id().ok_or("the server has exited")?;
        rss_bytes(pid)
    }

    pub async fn channel(&self) -> BenchResult<Channel> {
        channel(self.addr).await
    }
}

pub fn rss_bytes(pid: u32) -> BenchResult<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or("no VmRSS in /proc/<pid>/status")?;
    Ok(kb * 1024)
}

/// One HTTP/2 connection.
pub async fn channel(addr: SocketAddr) -> BenchResult<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// Raises the soft open-files limit to the hard one, for thousands of
/// connections; children inherit it. Answers the new soft limit.
pub fn raise_open_files_limit() -> libc::rlim_t {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: both calls only read or write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Bearer {
    pub fn new(token: &str) -> BenchResult<Bearer> {
        Ok(Bearer(format!("Bearer {token}").parse()?))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Authed = InterceptedService<Channel, Bearer>;
pub type Tasks = TaskServiceClient<Authed>;
pub type Daemons = DaemonServiceClient<Authed>;

/// The server under test with its database (dropped after it), and a user
/// client.
pub struct Sut {
    pub server: ChildServer,
    pub db: BenchDb,
    pub user: Bearer,
    pub tasks: Tasks,
}

/// A workspace of its own for one figure, so daemons of one figure never
/// see another's tasks, and a daemon token for it.
pub struct Workspace {
    pub name: String,
    pub daemon: Bearer,
}

impl Sut {
    pub async fn start(kind: &DbKind, log: Option<&PathBuf>) -> BenchResult<Sut> {
        let db = BenchDb::create(kind, "sut").await?;
        let server = ChildServer::serve(&db, log).await?;
        let user = Bearer::new(server.token.as_deref().unwrap_or_default())?;
        let tasks = TaskServiceClient::with_interceptor(server.channel().await?, user.clone());
        Ok(Sut {
            server,
            db,
            user,
            tasks,
        })
    }

    pub async fn workspace(&self, name: &str) -> BenchResult<Workspace> {
        let mut ws = WorkspaceServiceClient::with_interceptor(
            self.server.channel().await?,
            self.user.clone(),
        );
        ws.create_workspace(pb::CreateWorkspaceRequest { name: name.into() })
            .await?;
        let secret = ws
            .create_token(pb::CreateTokenRequest {
                workspace: name.into(),
                kind: pb::TokenKind::Daemon as i32,
                name: "bench".into(),
            })
            .await?
            .into_inner()
            .secret;
        Ok(Workspace {
            name: name.into(),
            daemon: Bearer::new(&secret)?,
        })
    }

    pub async fn daemons(&self, ws: &Workspace) -> BenchResult<Daemons> {
        Ok(DaemonServiceClient::with_interceptor(
            self.server.channel().await?,
            ws.daemon.clone(),
        ))
    }

    /// A task created in `ws`, not started.
    pub async fn create_task(&self, ws: &Workspace, name: &str) -> BenchResult<String> {
        let task = self
            .tasks
            .clone()
            .create_task(pb::CreateTaskRequest {
                workspace: ws.name.clone(),
                name: name.into(),
                plan: "true".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .task
            .ok_or("CreateTask answered no task")?;
        Ok(task.id)
    }

    pub async fn start_task(&self, id: &str) -> BenchResult<()> {
        self.tasks
            .clone()
            .start_task(pb::StartTaskRequest {
                id: id.into(),
                daemon_id: String::new(),
            })
            .await?;
        Ok(())
    }

    /// Waits until the task is running (its daemon's Started was stored).
    pub async fn wait_running(&self, id: &str) -> BenchResult<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let task = self
                .tasks
                .clone()
                .get_task(pb::GetTaskRequest { id: id.into() })
                .await?
                .into_inner()
                .task
                .ok_or("GetTask answered no task")?;
            if task.status == pb::TaskStatus::Running as i32 {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("task {id} did not start running within 10 s").into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_urls() {
        assert_eq!(
            super::with_database("postgres://u@h:5432/postgres?sslmode=disable", "x"),
            "postgres://u@h:5432/x?sslmode=disable"
        );
        assert_eq!(
            super::with_database("postgres://u@h", "x"),
            "postgres://u@h/x"
        );
    }
}
