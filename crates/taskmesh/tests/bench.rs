//! `taskmesh bench` runs end to end: a few iterations of every figure
//! against a real server child on SQLite, and prints the whole table.

use std::process::Stdio;

use taskmesh_testkit::db::DbKind;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_taskmesh");

/// Runs `taskmesh ARGS`, which must succeed; answers its stdout and stderr.
async fn bench(args: &[&str]) -> (String, String) {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run taskmesh bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "bench failed:\n{stderr}\n{stdout}");
    (stdout, stderr)
}

#[tokio::test]
async fn bench_smoke_prints_every_figure() {
    let (stdout, _) = bench(&["bench", "--smoke"]).await;
    for figure in [
        "dispatch latency, idle",
        "dispatch latency, 2 daemons busy",
        "cancel latency",
        "dispatch throughput, 1 daemons",
        "dispatch throughput, 2 daemons",
        "output ingest, batches of 10",
        "output ingest, 2 daemons, batches of 1",
        "output ack, 2 daemons, batches of 1",
        "fan-out latency, 3 watchers",
        "heartbeat latency at 100/s",
        "idle daemon sessions, 20",
    ] {
        assert!(stdout.contains(figure), "no row {figure:?} in:\n{stdout}");
    }
    assert!(stdout.contains("backend SQLite"), "{stdout}");
    assert!(!stdout.contains("DOUBLE"), "{stdout}");
    assert!(!stdout.contains("MISSED SOME"), "{stdout}");
}

/// `bench --history` writes its history with bulk SQL (generate_series on
/// PostgreSQL, a recursive CTE on SQLite) and prints each figure beside
/// itself before the history, on both backends.
#[tokio::test]
async fn bench_history_smoke_on_both_backends() {
    let mut runs = vec![(vec!["bench", "--smoke", "--history"], "SQLite")];
    let pg = taskmesh_testkit::postgres_enabled().then(|| {
        match DbKind::for_tests(taskmesh_testkit::Backend::Postgres) {
            DbKind::Postgres { admin_url } => admin_url,
            DbKind::Sqlite { .. } => unreachable!("asked for PostgreSQL"),
        }
    });
    if let Some(url) = &pg {
        runs.push((
            vec![
                "bench",
                "--smoke",
                "--history",
                "--database-url",
                url.as_str(),
            ],
            "PostgreSQL",
        ));
    }
    for (args, backend) in runs {
        let (stdout, stderr) = bench(&args).await;
        assert!(stdout.contains(&format!("backend {backend}")), "{stdout}");
        assert!(
            stderr.contains("1000 of 1000 tasks written"),
            "no history written:\n{stderr}"
        );
        for figure in [
            "dispatch latency, idle, with history",
            "output ingest, batches of 10, with history",
            "WatchTask catch-up of 100 messages, with history",
        ] {
            assert!(stdout.contains(figure), "no row {figure:?} in:\n{stdout}");
        }
        assert!(
            !stdout.contains("dispatch throughput"),
            "only the history family runs"
        );
    }
}
