//! The binary as an operator runs it: `taskmesh serve` prints a token on
//! first start and stops cleanly on SIGTERM; `taskmesh token create` prints
//! a working token alone on stdout.

use taskmesh_testkit as common;
use taskmesh_testkit::both_backends;

use std::process::Stdio;

use common::{Backend, TestDb};
use taskmesh_server::pb;
use taskmesh_server::pb::task_service_client::TaskServiceClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_taskmesh");

async fn serve_and_use(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &db.url,
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut token, mut url) = (None, None);
    while let Some(line) = lines.next_line().await.unwrap() {
        if let Some(t) = line.trim().strip_prefix("tmu_") {
            token.get_or_insert(format!("tmu_{t}"));
        }
        if let Some(rest) = line.strip_prefix("taskmesh listening on ") {
            url = Some(rest.split_whitespace().next().unwrap().to_string());
            break;
        }
    }
    let (token, url) = (
        token.expect("first start prints a token"),
        url.expect("listening line"),
    );

    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = TaskServiceClient::with_interceptor(channel.clone(), common::bearer(Some(&token)));
    let t = c
        .create_task(pb::CreateTaskRequest {
            name: "cli".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();

    // `token create` against the same database, while the server runs.
    let out = std::process::Command::new(BIN)
        .args([
            "token",
            "create",
            "--database-url",
            &db.url,
            "--name",
            "script",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let secret = stdout.trim_end_matches('\n');
    assert!(
        secret.starts_with("tmu_") && !secret.contains(char::is_whitespace),
        "{stdout:?}"
    );
    let mut c2 = TaskServiceClient::with_interceptor(channel, common::bearer(Some(secret)));
    c2.get_task(pb::GetTaskRequest { id: t.id }).await.unwrap();

    // SIGTERM: a clean exit.
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().await.unwrap();
    assert!(status.success(), "{status:?}");

    // A second start on the same database prints no new token.
    let out = std::process::Command::new(BIN)
        .args([
            "token",
            "create",
            "--database-url",
            &db.url,
            "--kind",
            "daemon",
            "--workspace",
            "lab",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8(out.stdout).unwrap().starts_with("tmd_"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("workspace lab"));
}

#[test]
fn help_explains_every_flag_and_env() {
    let out = std::process::Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--listen",
        "TASKMESH_LISTEN",
        "--database-url",
        "TASKMESH_DATABASE_URL",
        "--cors-origin",
        "127.0.0.1:7070",
    ] {
        assert!(
            help.contains(needle),
            "serve --help lacks {needle}:\n{help}"
        );
    }
    let out = std::process::Command::new(BIN)
        .args(["token", "create", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in ["--workspace", "--kind", "daemon", "TASKMESH_DATABASE_URL"] {
        assert!(
            help.contains(needle),
            "token create --help lacks {needle}:\n{help}"
        );
    }
}

#[test]
fn a_bad_database_url_is_a_clear_error() {
    let out = std::process::Command::new(BIN)
        .args([
            "token",
            "create",
            "--database-url",
            "postgres://nobody@127.0.0.1:1/none",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open the database"));
}

/// `serve --log-format json` writes one JSON object a line, for log
/// shippers, with the message and its fields.
async fn the_log_can_be_json(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (server, mut log) = common::process::ServeProcess::start_logged(
        &db.url,
        "127.0.0.1:0",
        &["--log-format", "json"],
        "info",
    )
    .await;
    let line = log
        .wait_for(&["database ready"], std::time::Duration::from_secs(30))
        .await;
    let entry: serde_json::Value = serde_json::from_str(&line).expect("a JSON object");
    assert_eq!(entry["level"], "INFO", "{entry}");
    assert_eq!(entry["fields"]["message"], "database ready", "{entry}");
    assert!(entry["fields"]["backend"].is_string(), "{entry}");
    assert!(!line.contains('\x1b'), "no colour codes: {line}");
    server.terminate().await;
}

/// A second `serve` on an address in use fails at once and says why,
/// before it mints a first-start token nobody could use; the first-start
/// banner names the dashboard's URL.
#[tokio::test]
async fn a_busy_address_fails_before_any_token() {
    let first_db = TestDb::new(Backend::Sqlite).await;
    let mut first = std::process::Command::new(BIN);
    first
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &first_db.url,
        ])
        .env("RUST_LOG", "warn");
    let first = common::process::ServeProcess::spawn(
        tokio::process::Command::from(first),
        common::process::SERVE_LISTENING,
    )
    .await
    .expect("the first server starts");
    assert!(first.token.is_some());

    let second_db = TestDb::new(Backend::Sqlite).await;
    let out = std::process::Command::new(BIN)
        .args(["serve", "--listen", &first.addr.to_string()])
        .args(["--database-url", &second_db.url])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stdout.contains("tmu_"),
        "no token for a server that never ran: {stdout}"
    );
    assert!(
        stderr.contains(&format!("cannot listen on {}", first.addr)),
        "{stderr}"
    );
    // Started again on a free port, the second database mints its token
    // then, with the URL to sign in at.
    let out = tokio::process::Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &second_db.url,
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(out.stdout.unwrap()).lines();
    let mut banner = String::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        if line.starts_with(common::process::SERVE_LISTENING) {
            break;
        }
        banner.push_str(&line);
        banner.push('\n');
    }
    assert!(banner.contains("tmu_"), "{banner}");
    assert!(
        banner.contains("Sign in to the dashboard at http://127.0.0.1:"),
        "{banner}"
    );
}

/// `token create` without a user token writes to the database, and says
/// so when the database file did not exist (run in the wrong directory, it
/// would otherwise make a token for a server that does not exist).
#[test]
fn token_create_says_when_it_made_a_new_database() {
    let dir = common::process::TempDir::new("fresh-dir");
    let create = || {
        std::process::Command::new(BIN)
            .args(["token", "create", "--kind", "daemon"])
            .current_dir(&dir.0)
            .env_remove("TASKMESH_TOKEN")
            .env_remove("TASKMESH_DATABASE_URL")
            .output()
            .unwrap()
    };
    let out = create();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("tmd_"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sqlite://taskmesh.db did not exist and was created"),
        "{stderr}"
    );
    // The second time the file is there: no such note.
    let again = create();
    assert!(!String::from_utf8_lossy(&again.stderr).contains("did not exist"));
}

both_backends!(serve_and_use, the_log_can_be_json);
