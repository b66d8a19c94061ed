//! Three replicas on one PostgreSQL database and a daemon that knows them
//! all: SIGKILL the daemon's replica mid-task and it is on the next within
//! seconds; SIGTERM that one and the daemon moves to the third before the
//! replica exits. The task runs on through both, is never interrupted, and
//! its stored output has every line once, with no gap. PostgreSQL only:
//! replicas share one database (SQLite is one process).

use std::time::Duration;

use taskmesh_testkit as common;

use common::process::{DaemonProcess, ServeProcess, TempDir, create_token};
use common::tasks::{create_and_start, event_reasons};
use common::watch::Watch;
use common::{Backend, TestDb, postgres_enabled, tasks_at};
use taskmesh_server::pb::{self, TaskStatus};

/// "Within seconds": how long the daemon may take to be on another replica.
const MOVE_PATIENCE: Duration = Duration::from_secs(10);

/// Every stored message, paging through ListTaskMessages.
async fn stored(tasks: &mut common::Tasks, task_id: &str) -> Vec<pb::TaskMessage> {
    let mut all: Vec<pb::TaskMessage> = Vec::new();
    loop {
        let page = tasks
            .list_task_messages(pb::ListTaskMessagesRequest {
                task_id: task_id.into(),
                since_seq: all.last().map_or(0, |m| m.seq),
                limit: 1000,
            })
            .await
            .expect("ListTaskMessages")
            .into_inner();
        if page.messages.is_empty() {
            return all;
        }
        all.extend(page.messages);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_moves_between_replicas_without_losing_anything() {
    if !postgres_enabled() {
        return;
    }
    let db = TestDb::new(Backend::Postgres).await;
    let a = ServeProcess::start(&db.url, "127.0.0.1:0", &[]).await;
    let user = a.token.clone().expect("the first replica prints a token");
    let (b, mut b_log) = ServeProcess::start_logged(&db.url, "127.0.0.1:0", &[], "info").await;
    let c = ServeProcess::start(&db.url, "127.0.0.1:0", &[]).await;
    let (a_url, b_url, c_url) = (a.url(), b.url(), c.url());

    let daemon_token = create_token(&db.url, "daemon").await;
    let servers = format!("{a_url},{b_url},{c_url}");
    let (daemon, mut daemon_log) =
        DaemonProcess::start_logged(&servers, &daemon_token, &[], "info");
    daemon_log
        .wait_for(&["session ready", &a_url], MOVE_PATIENCE)
        .await;

    // A task that prints a numbered line every 20 ms until told to stop.
    let dir = TempDir::new("replicas");
    let stop = dir.0.join("stop");
    let plan = format!(
        "i=0\nwhile [ ! -e '{}' ]; do i=$((i+1)); echo \"line $i\"; sleep 0.02; done",
        stop.display()
    );
    let mut tasks = tasks_at(&c_url, &user).await;
    let task = create_and_start(
        &mut tasks,
        pb::CreateTaskRequest {
            name: "moves between replicas".into(),
            plan,
            ..Default::default()
        },
    )
    .await;
    let mut watch = Watch::open(&mut tasks, &task.id, 0).await;
    watch.until_line("line 20").await;

    // A dies: the daemon is on B within seconds; output goes on.
    a.kill().await;
    daemon_log
        .wait_for(&["session ready", &b_url], MOVE_PATIENCE)
        .await;
    let seen = watch.messages.len();
    watch.until_line(&format!("line {}", seen + 20)).await;

    // B is asked to stop: it tells the daemon to move, the daemon opens its
    // session on C, and only then does B see it leave and exit.
    let b_stopped = tokio::spawn(b.terminate());
    daemon_log
        .wait_for(
            &["moved: a session is open on another server", &c_url],
            MOVE_PATIENCE,
        )
        .await;
    b_log
        .wait_for(&["every daemon has left"], MOVE_PATIENCE)
        .await;
    b_stopped.await.expect("B exits");
    let seen = watch.messages.len();
    watch.until_line(&format!("line {}", seen + 20)).await;

    std::fs::write(&stop, b"").expect("tell the task to stop");
    let done = watch.until_status(TaskStatus::Completed).await;
    assert_eq!(done.attempt, 1, "never interrupted nor queued again");
    let reasons = event_reasons(&mut tasks, &task.id).await;
    assert!(
        !reasons.iter().any(|r| r.contains("interrupt")),
        "{reasons:?}"
    );

    // Every line once, numbered without a gap, on any replica.
    let messages = stored(&mut tasks, &task.id).await;
    assert!(messages.len() >= 60, "{} messages", messages.len());
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(m.seq, i as i64 + 1, "seqs are contiguous from 1");
        assert_eq!(m.content, format!("line {}", i + 1));
    }
    daemon.stop().await;
    drop(c);
}
