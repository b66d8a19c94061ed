//! Floors: what each figure would cost with nothing of taskmesh in the way.
//!
//! - Transport floors come from [`FloorServer`], a bare tonic service
//!   (taskmesh.bench.v1) run as its own process by `taskmesh bench
//!   --floor-server`, so its memory is measured apart from the clients.
//! - Database floors ([`FloorDb`]) run the SQL directly with sqlx against a
//!   database of the same kind, the same schema and the same settings as the
//!   server's (for SQLite: WAL, `synchronous = NORMAL`, one writer).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor, Row};
use tokio::sync::broadcast;
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use super::BenchResult;
use taskmesh_server::store::Store;
use taskmesh_testkit::{DbKind, TestDb};

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("taskmesh.bench.v1");
}

use pb::floor_service_server::{FloorService, FloorServiceServer};

/// The floor server's first line on stdout, followed by its address.
pub const LISTENING: &str = "floor listening on ";

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The bare service: each RPC does the least its shape allows.
pub struct FloorServer {
    published: broadcast::Sender<pb::SubscribeResponse>,
}

impl Default for FloorServer {
    fn default() -> Self {
        FloorServer {
            published: broadcast::channel(1024).0,
        }
    }
}

#[tonic::async_trait]
impl FloorService for FloorServer {
    async fn ping(
        &self,
        req: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        Ok(Response::new(pb::PingResponse {
            payload: req.into_inner().payload,
        }))
    }

    type PingPongStream = Stream_<pb::PingPongResponse>;

    async fn ping_pong(
        &self,
        req: Request<Streaming<pb::PingPongRequest>>,
    ) -> Result<Response<Self::PingPongStream>, Status> {
        let echo = req
            .into_inner()
            .map(|m| m.map(|m| pb::PingPongResponse { payload: m.payload }));
        Ok(Response::new(Box::pin(echo)))
    }

    type SubscribeStream = Stream_<pb::SubscribeResponse>;

    async fn subscribe(
        &self,
        _: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let rx = self.published.subscribe();
        let stream =
            BroadcastStream::new(rx).map(|m| m.map_err(|e| Status::data_loss(e.to_string())));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn publish(
        &self,
        req: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let r = req.into_inner();
        let receivers = self
            .published
            .send(pb::SubscribeResponse {
                seq: r.seq,
                payload: r.payload,
            })
            .unwrap_or(0);
        Ok(Response::new(pb::PublishResponse {
            receivers: receivers as i64,
        }))
    }

    type HoldStream = Stream_<pb::HoldResponse>;

    async fn hold(
        &self,
        req: Request<Streaming<pb::HoldRequest>>,
    ) -> Result<Response<Self::HoldStream>, Status> {
        // One answer, then the stream lives as long as the client's half.
        let inbound = req.into_inner().filter_map(|_| None);
        let stream = tokio_stream::once(Ok(pb::HoldResponse {})).chain(inbound);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Serves the floor on an ephemeral port until killed; prints its address.
pub async fn serve() -> BenchResult<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{LISTENING}{}", listener.local_addr()?);
    // tonic's own defaults (`Server::serve` sets TCP_NODELAY), and the same
    // keepalive as `taskmesh serve`.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .accept_http1(true)
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(FloorServiceServer::new(FloorServer::default()))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

pub type FloorClient = pb::floor_service_client::FloorServiceClient<tonic::transport::Channel>;

/// Opens a bidi ping-pong stream; each `round_trip` is one message there and
/// back.
pub struct PingPong {
    up: tokio::sync::mpsc::Sender<pb::PingPongRequest>,
    down: Streaming<pb::PingPongResponse>,
}

impl PingPong {
    pub async fn open(client: &mut FloorClient) -> BenchResult<PingPong> {
        let (up, rx) = tokio::sync::mpsc::channel(16);
        let down = client
            .ping_pong(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(PingPong { up, down })
    }

    pub async fn round_trip(&mut self) -> BenchResult<()> {
        self.up
            .send(pb::PingPongRequest {
                payload: vec![0; 64],
            })
            .await
            .map_err(|_| "the ping-pong stream closed")?;
        self.down
            .next()
            .await
            .ok_or("the ping-pong stream ended")??;
        Ok(())
    }
}

/// A database like the server's, for the SQL floors. It carries the
/// taskmesh schema (migrations applied), so the statements run on the same
/// tables and indexes.
pub struct FloorDb {
    pool: AnyPool,
    backend: taskmesh_server::store::Backend,
    commits: std::sync::atomic::AtomicI64,
    _db: TestDb,
}

/// A fixed workspace row the floor's tasks hang off.
const FLOOR_WS: &str = "00000000-0000-7000-8000-000000000001";

impl FloorDb {
    pub async fn create(kind: &DbKind) -> BenchResult<FloorDb> {
        let db = TestDb::create(kind, "bench_floor").await?;
        let store = Store::connect(&db.url).await?;
        let backend = store.backend();
        store.close().await;
        let pool = match backend {
            taskmesh_server::store::Backend::Sqlite => {
                // The server's writer: one connection, the same pragmas.
                AnyPoolOptions::new()
                    .max_connections(1)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            conn.execute(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                                 PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                            )
                            .await?;
                            Ok(())
                        })
                    })
                    .connect(&format!("{}?mode=rwc", db.url))
                    .await?
            }
            // The server's pool size.
            taskmesh_server::store::Backend::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(16)
                    .connect(&db.url)
                    .await?
            }
        };
        sqlx::query("CREATE TABLE floor_commits (id BIGINT PRIMARY KEY, at BIGINT NOT NULL)")
            .execute(&pool)
            .await?;
        sqlx::query("INSERT INTO workspaces (id, name, created_at) VALUES ($1, 'floor', 0)")
            .bind(FLOOR_WS)
            .execute(&pool)
            .await?;
        Ok(FloorDb {
            pool,
            backend,
            commits: Default::default(),
            _db: db,
        })
    }

    /// One durable commit: a one-row transaction.
    pub async fn commit(&self) -> BenchResult<()> {
        let id = self
            .commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO floor_commits (id, at) VALUES ($1, $2)")
            .bind(id)
            .bind(taskmesh_server::model::now_micros())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Inserts `n` queued tasks with 100 rows per statement.
    async fn queue_tasks(&self, n: usize) -> BenchResult<()> {
        let now = taskmesh_server::model::now_micros();
        let ids: Vec<String> = (0..n).map(|_| uuid::Uuid::now_v7().to_string()).collect();
        for chunk in ids.chunks(100) {
            let values: Vec<String> = (0..chunk.len())
                .map(|i| {
                    format!(
                        "(${}, $1, 0, 'floor', '', 'queued', 1, 'shell', '', '', 0, '', '', '', \
                         'floor', $2, $2, $2)",
                        i + 3
                    )
                })
                .collect();
            let sql = format!(
                "INSERT INTO tasks (id, workspace_id, depth, name, plan, status, version, runtime, \
                 repository, branch, attempt, status_reason, agent_session_id, working_directory, \
                 created_by, created_at, updated_at, queued_at) VALUES {}",
                values.join(", ")
            );
            let mut q = sqlx::query(&sql).bind(FLOOR_WS).bind(now);
            for id in chunk {
                q = q.bind(id.clone());
            }
            q.execute(&self.pool).await?;
        }
        Ok(())
    }

    /// The claim statement of `Store::claim_tasks`, run directly by
    /// `workers` concurrent claimers, each taking up to `per` tasks a
    /// statement, until the `n` queued tasks are gone. Answers tasks
    /// claimed per second and how many were claimed twice.
    pub async fn claim_rate(
        &self,
        n: usize,
        workers: usize,
        per: usize,
    ) -> BenchResult<(f64, usize)> {
        self.queue_tasks(n).await?;
        // The server's claim statement, raw: up to `per` tasks a statement
        // (the pick in a CTE on PostgreSQL, which runs it once).
        let oldest = "SELECT id FROM tasks WHERE workspace_id = $3 AND status = 'queued' \
             AND runtime IN ($4) AND (pinned_daemon_id IS NULL OR pinned_daemon_id = $1) \
             ORDER BY queued_at, id LIMIT $5";
        let set = "UPDATE tasks SET status = 'dispatched', daemon_id = $1, \
             version = version + 1, updated_at = $2";
        let sql: Arc<str> = match self.backend {
            taskmesh_server::store::Backend::Postgres => format!(
                "WITH picked AS ({oldest} FOR UPDATE SKIP LOCKED) {set} FROM picked \
                 WHERE tasks.id = picked.id AND tasks.status = 'queued' RETURNING tasks.id"
            ),
            taskmesh_server::store::Backend::Sqlite => {
                format!("{set} WHERE status = 'queued' AND id IN ({oldest}) RETURNING id")
            }
        }
        .into();
        let start = Instant::now();
        let mut handles = Vec::new();
        for w in 0..workers {
            let pool = self.pool.clone();
            let sql = sql.clone();
            handles.push(tokio::spawn(async move {
                let claimer = format!("floor-{w}");
                let mut got = Vec::new();
                loop {
                    let rows = sqlx::query(&sql)
                        .bind(&claimer)
                        .bind(taskmesh_server::model::now_micros())
                        .bind(FLOOR_WS)
                        .bind("shell")
                        .bind(per as i64)
                        .fetch_all(&pool)
                        .await?;
                    if rows.is_empty() {
                        return Ok::<_, sqlx::Error>(got);
                    }
                    for r in rows {
                        got.push(r.try_get::<String, _>(0)?);
                    }
                }
            }));
        }
        let mut claimed = Vec::new();
        for h in handles {
            claimed.extend(h.await??);
        }
        let rate = claimed.len() as f64 / start.elapsed().as_secs_f64();
        let total = claimed.len();
        claimed.sort();
        claimed.dedup();
        sqlx::query("UPDATE tasks SET status = 'completed' WHERE workspace_id = $1")
            .bind(FLOOR_WS)
            .execute(&self.pool)
            .await?;
        Ok((rate, total - claimed.len()))
    }

    /// Inserts `total` output rows of `content` for a new task, `batch` rows
    /// per statement, each statement its own commit. Answers rows/s.
    pub async fn insert_rate(&self, total: usize, batch: usize, content: &str) -> BenchResult<f64> {
        let task_id = uuid::Uuid::now_v7().to_string();
        sqlx::query(
            "INSERT INTO tasks (id, workspace_id, depth, name, plan, status, version, runtime, \
             repository, branch, attempt, status_reason, agent_session_id, working_directory, \
             created_by, created_at, updated_at) VALUES ($1, $2, 0, 'floor', '', 'running', 1, \
             'shell', '', '', 1, '', '', '', 'floor', 0, 0)",
        )
        .bind(&task_id)
        .bind(FLOOR_WS)
        .execute(&self.pool)
        .await?;
        // Every column is a parameter, as it is for the server, and SQLite
        // gets anonymous ones (see Store::insert_messages).
        let ph = |n: usize| match self.backend {
            taskmesh_server::store::Backend::Sqlite => "?".to_string(),
            taskmesh_server::store::Backend::Postgres => format!("${n}"),
        };
        let sql_for = |rows: usize| {
            let values: Vec<String> = (0..rows)
                .map(|i| {
                    let row: Vec<String> = (1..=8).map(|k| ph(8 * i + k)).collect();
                    format!("({})", row.join(", "))
                })
                .collect();
            format!(
                "INSERT INTO task_messages (task_id, seq, kind, content, tool_name, \
                 tool_input_json, attempt, created_at) VALUES {}",
                values.join(", ")
            )
        };
        let full = sql_for(batch);
        let start = Instant::now();
        let mut seq = 0i64;
        while (seq as usize) < total {
            let rows = batch.min(total - seq as usize);
            let sql = if rows == batch {
                full.clone()
            } else {
                sql_for(rows)
            };
            let mut q = sqlx::query(&sql);
            let now = taskmesh_server::model::now_micros();
            for _ in 0..rows {
                seq += 1;
                q = q
                    .bind(task_id.clone())
                    .bind(seq)
                    .bind("stdout")
                    .bind(content.to_string())
                    .bind("")
                    .bind("")
                    .bind(1i64)
                    .bind(now);
            }
            q.execute(&self.pool).await?;
        }
        Ok(total as f64 / start.elapsed().as_secs_f64())
    }
}
