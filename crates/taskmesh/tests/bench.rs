//! `taskmesh bench` runs end to end: a few iterations of every figure
//! against a real server child on SQLite, and prints the whole table.

use std::process::Stdio;

use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_taskmesh");

#[tokio::test]
async fn bench_smoke_prints_every_figure() {
    let out = Command::new(BIN)
        .args(["bench", "--smoke"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run taskmesh bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stderr}\n{stdout}");
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
