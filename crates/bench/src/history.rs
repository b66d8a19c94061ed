//! Costs as history grows (`taskmesh bench --history`): dispatch latency,
//! ingest rate and a WatchTask catch-up on the fresh database, then again
//! once bulk SQL has put a large finished history beside them. Each row
//! shows the figure with the history against the same figure without it
//! (the floor column), the target being within 20%.

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor};

use super::stats::{Row, Target, Value};
use super::{BenchResult, Ctx, dispatch, output, progress};
use taskmesh_server::store::Backend;

/// The workspace the history's tasks belong to.
const HISTORY_WS: &str = "00000000-0000-7000-8000-0000000000a1";

/// Tasks per bulk statement, for progress and bounded transactions.
const CHUNK: usize = 100_000;

pub async fn history(ctx: &mut Ctx) -> BenchResult<Vec<Row>> {
    let (tasks, messages) = ctx.params.history;
    let empty = measure(ctx).await?;
    build(ctx, tasks, messages).await?;
    let full = measure(ctx).await?;
    Ok(empty
        .into_iter()
        .zip(full)
        .map(|((figure, without), (_, with))| Row {
            figure: format!("{figure}, with history"),
            value: with,
            floor: without,
            target: Some(Target::WithinOfFloor(0.2)),
            note: format!(
                "{tasks} finished tasks and {messages} messages of history; floor: the same \
                 figure before the history was written"
            ),
        })
        .collect())
}

/// The figures history must not slow: (figure, value) each.
async fn measure(ctx: &mut Ctx) -> BenchResult<Vec<(String, Value)>> {
    let dispatch = dispatch::dispatch_latency(ctx, 0).await?;
    let ingest = output::ingest(ctx, 10, ctx.params.history_ingest).await?;
    let catch_up = output::catch_up(ctx, ctx.params.history_catch_up).await?;
    Ok(vec![
        (dispatch.figure, dispatch.value),
        (ingest.figure, ingest.value),
        catch_up,
    ])
}

/// Writes `tasks` completed tasks with `messages` messages of output
/// spread evenly over them into the server's database, straight with SQL
/// (generate_series on PostgreSQL, a recursive CTE on SQLite), a chunk of
/// tasks and their messages a statement each.
async fn build(ctx: &Ctx, tasks: usize, messages: usize) -> BenchResult<()> {
    progress(format!(
        "history: writing {tasks} finished tasks and {messages} messages with bulk SQL"
    ));
    let started = std::time::Instant::now();
    let backend = Backend::from_url(&ctx.sut.db.url)?;
    let pool = connect(&ctx.sut.db.url, backend).await?;
    sqlx::query("INSERT INTO workspaces (id, name, created_at) VALUES ($1, 'history', 0)")
        .bind(HISTORY_WS)
        .execute(&pool)
        .await?;
    let per_task = (messages / tasks.max(1)).max(1);
    let content = format!(
        "{:.<100}",
        "history line: compiling crate 42 of the workspace "
    );
    let mut first = 0;
    while first < tasks {
        let last = (first + CHUNK).min(tasks) - 1;
        let (task_sql, message_sql) = statements(backend, first, last, per_task, &content);
        let mut tx = pool.begin().await?;
        tx.execute(task_sql.as_str()).await?;
        tx.execute(message_sql.as_str()).await?;
        tx.commit().await?;
        first = last + 1;
        progress(format!(
            "history: {first} of {tasks} tasks written ({:.0} s)",
            started.elapsed().as_secs_f64()
        ));
    }
    if backend == Backend::Postgres {
        // Settled, as on a server that has run for a while: vacuumed and
        // analysed (autovacuum would otherwise start on the new rows in
        // the middle of the measurement) and checkpointed.
        progress("history: VACUUM ANALYZE and CHECKPOINT");
        for settle in ["VACUUM ANALYZE", "CHECKPOINT"] {
            sqlx::query(settle).execute(&pool).await?;
        }
    }
    pool.close().await;
    Ok(())
}

async fn connect(url: &str, backend: Backend) -> BenchResult<AnyPool> {
    let options = AnyPoolOptions::new().max_connections(1);
    Ok(match backend {
        Backend::Sqlite => {
            options
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        conn.execute("PRAGMA busy_timeout = 60000; PRAGMA foreign_keys = ON;")
                            .await?;
                        Ok(())
                    })
                })
                .connect(url)
                .await?
        }
        Backend::Postgres => options.connect(url).await?,
    })
}

/// The two statements that write tasks `first..=last` (numbered into
/// their ids) and `per_task` messages for each. Only numbers and a fixed
/// text are spliced in.
fn statements(
    backend: Backend,
    first: usize,
    last: usize,
    per_task: usize,
    content: &str,
) -> (String, String) {
    let tasks = "INSERT INTO tasks (id, workspace_id, depth, name, plan, status, version, \
                 runtime, repository, branch, attempt, status_reason, agent_session_id, \
                 working_directory, created_by, created_at, updated_at, queued_at, started_at, \
                 ended_at, last_seq)";
    let messages = "INSERT INTO task_messages (task_id, seq, kind, content, tool_name, \
                    tool_input_json, attempt, created_at, size, approval_id)";
    let task_values = |id: &str, n: &str| {
        format!(
            "SELECT {id}, '{HISTORY_WS}', 0, 'history', 'echo history', 'completed', 4, \
             'shell', '', '', 1, '', '', '', 'bench', {n}, {n}, {n}, {n}, {n}, {per_task}"
        )
    };
    let message_values = |id: &str, n: &str, seq: &str| {
        format!(
            "SELECT {id}, {seq}, 'stdout', '{content}', '', '', 1, {n}, {}, ''",
            content.len()
        )
    };
    match backend {
        Backend::Postgres => {
            let id = "'00000000-0000-7000-8000-' || lpad(n::text, 12, '0')";
            (
                format!(
                    "{tasks} {} FROM generate_series({first}::bigint, {last}::bigint) AS n",
                    task_values(id, "n")
                ),
                format!(
                    "{messages} {} FROM generate_series({first}::bigint, {last}::bigint) AS n, \
                     generate_series(1::bigint, {per_task}::bigint) AS s",
                    message_values(id, "n", "s")
                ),
            )
        }
        Backend::Sqlite => {
            let id = "printf('00000000-0000-7000-8000-%012d', n)";
            let numbers = format!(
                "WITH RECURSIVE t(n) AS (SELECT {first} UNION ALL SELECT n + 1 FROM t \
                 WHERE n < {last})"
            );
            (
                format!("{numbers} {tasks} {} FROM t", task_values(id, "n")),
                format!(
                    "{numbers}, m(s) AS (SELECT 1 UNION ALL SELECT s + 1 FROM m \
                     WHERE s < {per_task}) {messages} {} FROM t, m",
                    message_values(id, "n", "s")
                ),
            )
        }
    }
}
