//! What the figures run against: the server under test and the floor
//! server as child processes (so their memory is theirs alone), each on a
//! database made for the run and removed after it, and authenticated
//! clients.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use taskmesh_proto::Bearer;
use taskmesh_testkit::process::{SERVE_LISTENING, ServeProcess, serve_command};
use taskmesh_testkit::{DbKind, TestDb};
use tokio::process::Command;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::BenchResult;
use crate::pb;
use crate::pb::daemon_service_client::DaemonServiceClient;
use crate::pb::task_service_client::TaskServiceClient;
use crate::pb::workspace_service_client::WorkspaceServiceClient;

/// `taskmesh serve` (this very binary) on a fresh database, its log
/// appended to `log` when given. The idle-session figure holds up to 10,000
/// sessions on one daemon token, past the default cap of streams a token
/// may hold, which is raised for it.
pub async fn serve(db: &TestDb, log: Option<&PathBuf>) -> BenchResult<ServeProcess> {
    let mut cmd = serve_command(
        &db.url,
        "127.0.0.1:0",
        &["--max-streams-per-token", "20000"],
    );
    cmd.stderr(match log {
        Some(path) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ),
        None => Stdio::null(),
    });
    let server = ServeProcess::spawn(cmd, SERVE_LISTENING).await?;
    if server.token.is_none() {
        return Err("the server printed no first-start token".into());
    }
    Ok(server)
}

/// The bare floor server (`taskmesh bench --floor-server`).
pub async fn floor_server() -> BenchResult<ServeProcess> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["bench", "--floor-server"]).stderr(Stdio::null());
    ServeProcess::spawn(cmd, super::floor::LISTENING).await
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

pub type Authed = InterceptedService<Channel, Bearer>;
pub type Tasks = TaskServiceClient<Authed>;
pub type Daemons = DaemonServiceClient<Authed>;

/// The server under test with its database (dropped after it), and a user
/// client.
pub struct Sut {
    pub server: ServeProcess,
    pub db: TestDb,
    pub user: Bearer,
    pub tasks: Tasks,
    /// Workspace names taken.
    names: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// A workspace of its own for one figure, so daemons of one figure never
/// see another's tasks, and a daemon token for it.
pub struct Workspace {
    pub name: String,
    pub daemon: Bearer,
}

impl Sut {
    pub async fn start(kind: &DbKind, log: Option<&PathBuf>) -> BenchResult<Sut> {
        let db = TestDb::create(kind, "bench_sut").await?;
        let server = serve(&db, log).await?;
        let user = Bearer::new(server.token.as_deref().unwrap_or_default())?;
        let tasks = TaskServiceClient::with_interceptor(channel(server.addr).await?, user.clone());
        Ok(Sut {
            server,
            db,
            user,
            tasks,
            names: Default::default(),
        })
    }

    /// A new workspace named `name`, or `name-2`, `name-3`… when a figure
    /// runs more than once (`--history` measures twice).
    pub async fn workspace(&self, name: &str) -> BenchResult<Workspace> {
        let name = {
            let mut used = self.names.lock().unwrap_or_else(|e| e.into_inner());
            let mut unique = name.to_string();
            let mut n = 1;
            while !used.insert(unique.clone()) {
                n += 1;
                unique = format!("{name}-{n}");
            }
            unique
        };
        let name = name.as_str();
        let mut ws = WorkspaceServiceClient::with_interceptor(
            channel(self.server.addr).await?,
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
            channel(self.server.addr).await?,
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
