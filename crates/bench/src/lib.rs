//! `taskmesh bench`: measures a real server (a child process on a fresh
//! database) with real gRPC clients acting as daemons and watchers, and
//! prints each figure beside its floor, measured in the same run on the same
//! machine, so the ratio means something even when the machine is noisy.
//!
//! - [`stats`]: percentiles and the table.
//! - [`harness`]: databases, child servers, clients.
//! - [`daemon`]: a scripted daemon on a real Session stream.
//! - [`floor`]: the bare tonic service and the raw SQL floors.
//! - [`dispatch`], [`output`], [`sessions`]: the figures, one function each.
//!
//! BENCHMARKS.md has the results and what limits each figure.

pub mod daemon;
pub mod dispatch;
pub mod floor;
pub mod harness;
pub mod history;
pub mod output;
pub mod sessions;
pub mod stats;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use harness::Sut;
use stats::Row;
use taskmesh_proto::pb;
use taskmesh_testkit::DbKind;
use taskmesh_testkit::process::ServeProcess;

pub type BenchError = Box<dyn std::error::Error + Send + Sync>;
pub type BenchResult<T> = Result<T, BenchError>;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Database for the servers under test: SQLite files in a temporary
    /// directory by default, or a PostgreSQL server
    /// (`postgres://user@host/db`) on which each run creates fresh databases
    /// and drops them afterwards.
    #[arg(long)]
    database_url: Option<String>,
    /// Fewer iterations, 1,000 idle sessions and 100 watchers at most:
    /// finishes in under a minute.
    #[arg(long)]
    quick: bool,
    /// A few iterations of everything, to check the tool works (tests).
    #[arg(long, hide = true, conflicts_with = "quick")]
    smoke: bool,
    /// Run the history family instead of the others: dispatch latency,
    /// ingest and a WatchTask catch-up on the fresh database, then again
    /// after bulk SQL wrote 1,000,000 finished tasks and 10,000,000
    /// messages (100,000 and 1,000,000 with --quick) beside them. Takes
    /// minutes and gigabytes of disk.
    #[arg(long)]
    history: bool,
    /// Run only the figures whose family is named (dispatch, cancel,
    /// throughput, ingest, fanout, idle, heartbeat); comma-separated.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Append the servers' logs (stderr) to this file.
    #[arg(long)]
    server_log: Option<PathBuf>,
    /// Serve the floor service and print its address (run by the
    /// benchmark itself).
    #[arg(long, hide = true)]
    floor_server: bool,
}

/// How much each figure does; `--quick` shrinks everything.
#[derive(Debug, Clone)]
pub struct Params {
    pub latency_samples: usize,
    pub busy_daemons: usize,
    pub throughput_tasks: usize,
    pub throughput_daemons: Vec<usize>,
    /// (batch size, messages in all)
    pub ingest: Vec<(usize, usize)>,
    /// (daemons, messages in all) sent in batches of 1 by that many
    /// daemons at once.
    pub ingest_many: (usize, usize),
    /// (finished tasks, messages) `--history` writes.
    pub history: (usize, usize),
    /// Messages the ingest figure of `--history` sends (batches of 10).
    pub history_ingest: usize,
    /// Messages of the task `--history` catches up on.
    pub history_catch_up: usize,
    pub watchers: Vec<usize>,
    pub fanout_messages: usize,
    pub idle_sessions: Vec<usize>,
    pub heartbeat_rate: usize,
    pub heartbeat_secs: u64,
}

impl Params {
    pub fn full() -> Params {
        Params {
            latency_samples: 1000,
            busy_daemons: 32,
            throughput_tasks: 2000,
            throughput_daemons: vec![1, 8, 32],
            ingest: vec![(1, 3000), (10, 20_000), (100, 100_000)],
            ingest_many: (32, 32_000),
            history: (1_000_000, 10_000_000),
            history_ingest: 20_000,
            history_catch_up: 100_000,
            watchers: vec![1, 100, 1000],
            fanout_messages: 100,
            idle_sessions: vec![1000, 10_000],
            heartbeat_rate: 1000,
            heartbeat_secs: 10,
        }
    }

    pub fn quick() -> Params {
        Params {
            latency_samples: 100,
            busy_daemons: 32,
            throughput_tasks: 300,
            throughput_daemons: vec![1, 8, 32],
            ingest: vec![(1, 500), (10, 3000), (100, 20_000)],
            ingest_many: (32, 6400),
            history: (100_000, 1_000_000),
            history_ingest: 3000,
            history_catch_up: 20_000,
            watchers: vec![1, 100],
            fanout_messages: 30,
            idle_sessions: vec![1000],
            heartbeat_rate: 1000,
            heartbeat_secs: 2,
        }
    }

    /// Every figure, a handful of times: seconds, even in a debug build.
    pub fn smoke() -> Params {
        Params {
            latency_samples: 5,
            busy_daemons: 2,
            throughput_tasks: 20,
            throughput_daemons: vec![1, 2],
            ingest: vec![(10, 100)],
            ingest_many: (2, 20),
            history: (1000, 10_000),
            history_ingest: 100,
            history_catch_up: 100,
            watchers: vec![3],
            fanout_messages: 3,
            idle_sessions: vec![20],
            heartbeat_rate: 100,
            heartbeat_secs: 1,
        }
    }
}

/// What every figure gets: the parameters, the database kind, and the
/// servers (taskmesh and floor) shared by the figures that need no fresh one.
pub struct Ctx {
    pub params: Params,
    pub db: DbKind,
    pub server_log: Option<PathBuf>,
    pub sut: Sut,
    pub floor: ServeProcess,
    pub floor_db: floor::FloorDb,
}

/// Prints a progress line on stderr.
pub fn progress(msg: impl std::fmt::Display) {
    eprintln!("[bench] {msg}");
}

pub async fn run(args: BenchArgs) -> BenchResult<()> {
    if args.floor_server {
        return floor::serve().await;
    }
    // Ctrl-C drops the run, and with it the child servers and databases.
    tokio::select! {
        r = bench(args) => r,
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
    }
}

async fn bench(args: BenchArgs) -> BenchResult<()> {
    let started = Instant::now();
    let limit = harness::raise_open_files_limit();
    let tmp = TempDir::new()?;
    let db = match &args.database_url {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            DbKind::Postgres {
                admin_url: url.clone(),
            }
        }
        Some(url) => {
            return Err(format!(
                "--database-url takes postgres://…; SQLite is the default ({url:?})"
            )
            .into());
        }
        None => DbKind::Sqlite {
            dir: tmp.path.clone(),
        },
    };
    let (params, mode) = match (args.quick, args.smoke) {
        (true, _) => (Params::quick(), "quick"),
        (_, true) => (Params::smoke(), "smoke"),
        _ => (Params::full(), "full"),
    };
    let header = format!(
        "taskmesh bench: backend {}, machine {} × {}, mode {mode}, {} build, \
         open-files limit {limit}, taskmesh {}",
        db.name(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        env!("CARGO_PKG_VERSION"),
    );
    progress(&header);
    let sut = Sut::start(&db, args.server_log.as_ref()).await?;
    let floor = harness::floor_server().await?;
    let floor_db = floor::FloorDb::create(&db).await?;
    let mut ctx = Ctx {
        params,
        db,
        server_log: args.server_log.clone(),
        sut,
        floor,
        floor_db,
    };
    let wants = |family: &str| {
        !args.history && (args.only.is_empty() || args.only.iter().any(|o| o == family))
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut add = |new: Vec<Row>| {
        for r in &new {
            progress(format!("{}: done", r.figure));
        }
        rows.extend(new);
    };
    if wants("dispatch") {
        add(vec![dispatch::dispatch_latency(&mut ctx, 0).await?]);
        let busy = ctx.params.busy_daemons;
        add(vec![dispatch::dispatch_latency(&mut ctx, busy).await?]);
    }
    if wants("cancel") {
        add(vec![dispatch::cancel_latency(&mut ctx).await?]);
    }
    if wants("throughput") {
        for k in ctx.params.throughput_daemons.clone() {
            add(vec![dispatch::throughput(&mut ctx, k).await?]);
        }
    }
    if wants("ingest") {
        for (batch, total) in ctx.params.ingest.clone() {
            add(vec![output::ingest(&mut ctx, batch, total).await?]);
        }
        let (daemons, total) = ctx.params.ingest_many;
        add(output::ingest_many(&mut ctx, daemons, total).await?);
    }
    if wants("fanout") {
        for w in ctx.params.watchers.clone() {
            add(vec![output::fanout(&mut ctx, w).await?]);
        }
    }
    if wants("heartbeat") {
        add(vec![sessions::heartbeat(&mut ctx).await?]);
    }
    if wants("idle") {
        for n in ctx.params.idle_sessions.clone() {
            add(vec![sessions::idle_sessions(&mut ctx, n).await?]);
        }
    }
    if args.history {
        add(history::history(&mut ctx).await?);
    }
    drop(ctx);
    println!("{header}");
    println!();
    print!("{}", stats::table(&rows));
    println!();
    println!(
        "× floor: p99 ÷ floor p99 for latencies, floor rate ÷ rate for rates, \
         bytes ÷ floor bytes for memory (1.00 = at the floor). {:.0} s in all.",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// A directory for the run's SQLite files, removed with everything in it.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new() -> BenchResult<TempDir> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let path = std::env::temp_dir().join(format!("taskmesh-bench-{}", &id[..12]));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Waits up to `limit` for `done`, checking every millisecond.
pub async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}
