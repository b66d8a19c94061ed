//! The dashboard in a real Chromium (web/test/dashboard.mjs, playwright-core)
//! against a real server and a real daemon offering `shell` and the Claude
//! stand-in, on SQLite and PostgreSQL: sign in, create and watch a task,
//! reload its deep link, allow a permission request, message and stop an
//! agent, a task's work pushed to its branch with the diff shown, tokens
//! and daemons, 50,000 lines, a server restart mid-stream,
//! a viewer's read-only views; then the same over HTTPS with a test CA. Screenshots land in target/dashboard-<backend>/.
//!
//! Needs `npm ci` in web/ and Chromium; `.ci/run` provides both. Outside CI
//! a machine without them skips with a message; in CI it fails.

use taskmesh_testkit as common;
use taskmesh_testkit::both_backends;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::certs::Ca;
use common::process::{DaemonProcess, ServeProcess, TempDir, create_token};
use common::{Backend, TestDb, start_server, start_server_at};
use taskmesh_server::model::TokenKind;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Why the browser test cannot run here, if it cannot.
fn missing() -> Option<String> {
    let web = repo().join("web");
    if !web.join("node_modules/playwright-core").is_dir() {
        return Some("web/node_modules is missing (run `npm ci` in web/)".into());
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        return Some(format!(
            "no Chromium at {chromium} (apt-get install chromium)"
        ));
    }
    None
}

/// `env` and the git identity the agents' commits carry.
fn with_git_identity<'a>(env: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    env.iter().chain(common::git::IDENTITY).copied().collect()
}

async fn the_dashboard_works_in_chromium(backend: Backend) {
    if let Some(why) = missing() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the dashboard test must run in CI: {why}"
        );
        eprintln!("skipping the dashboard test: {why}");
        return;
    }
    let s = start_server(backend).await;
    let daemon_token = s.token_in("default", TokenKind::Daemon).await;
    let viewer = s.token_in("default", TokenKind::Viewer).await;
    let standin = repo().join("crates/taskmesh/tests/standins/claude");
    let home = TempDir::new("dashboard-claude");
    let daemon = DaemonProcess::start_with_env(
        &s.url(),
        &daemon_token,
        &[
            "--runtime",
            "claude",
            "--claude-bin",
            &standin.display().to_string(),
        ],
        &with_git_identity(&[("CLAUDE_STANDIN_HOME", &home.0.display().to_string())]),
    );
    let git_root = TempDir::new("dashboard-git");
    let remote = common::git::remote(&git_root.0);
    let shots = repo().join(format!("target/dashboard-{backend:?}").to_lowercase());
    std::fs::create_dir_all(&shots).unwrap();
    let mut node = tokio::process::Command::new("node")
        .current_dir(repo().join("web"))
        .args(["test/dashboard.mjs", &s.url(), &s.token, &viewer])
        .arg(&shots)
        .env("DASHBOARD_REPO", &remote)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run node");
    let mut stdin = node.stdin.take().unwrap();
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut said = String::new();
    let mut s = Some(s);
    let run = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line == "RESTART" {
                // The same database and address: the page and the daemon
                // reconnect by themselves.
                let old = s.take().unwrap();
                let addr = old.addr;
                let db = old.stop_keeping_db().await;
                s = Some(start_server_at(db, addr).await);
                stdin.write_all(b"restarted\n").await.unwrap();
            }
            if line == "SEED" {
                let mut tasks = s.as_ref().unwrap().tasks().await;
                for i in 0..1000 {
                    tasks
                        .create_task(taskmesh_server::pb::CreateTaskRequest {
                            name: format!("seeded {i}"),
                            plan: "true".into(),
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                }
                stdin.write_all(b"seeded\n").await.unwrap();
            }
            said.push_str(&line);
            said.push('\n');
        }
    };
    tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("the dashboard test finishes");
    let out = node.wait_with_output().await.unwrap();
    said.push_str(&String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the dashboard test failed:\n{said}");
    assert!(said.contains("dashboard: ok"), "{said}");
    // The figures, for whoever reads the test's output.
    for line in said.lines().filter(|l| l.contains(" ms")) {
        eprintln!("{line}");
    }
    daemon.stop().await;
    s.unwrap().stop().await;
}

/// The same suite over HTTPS (`serve --tls-cert`), the browser told to
/// trust the test CA's server certificate, the daemon given the CA. Steps
/// that need the in-process server (a restart, seeding 1,000 tasks) run in
/// the HTTP suite only.
async fn the_dashboard_works_over_https(backend: Backend) {
    if let Some(why) = missing() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the dashboard test must run in CI: {why}"
        );
        eprintln!("skipping the dashboard test: {why}");
        return;
    }
    let db = TestDb::new(backend).await;
    let files = TempDir::new("dashboard-tls");
    let ca = Ca::new("taskmesh test CA");
    let (cert, key) = ca.server(1);
    let write = |name: &str, text: &str| {
        let path = files.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let (cert, key, ca_pem) = (
        write("server.pem", &cert),
        write("server.key", &key),
        write("ca.pem", &ca.pem),
    );
    let server = ServeProcess::start(
        &db.url,
        "127.0.0.1:0",
        &["--tls-cert", &cert, "--tls-key", &key],
    )
    .await;
    assert!(server.url().starts_with("https://"), "{}", server.url());
    let user = server.token.clone().expect("a first-start token");
    let viewer = create_token(&db.url, "viewer").await;
    let daemon_token = create_token(&db.url, "daemon").await;
    let standin = repo()
        .join("crates/taskmesh/tests/standins/claude")
        .display()
        .to_string();
    let home = TempDir::new("dashboard-tls-claude");
    let daemon = DaemonProcess::start_with_env(
        &server.url(),
        &daemon_token,
        &[
            "--ca-cert",
            &ca_pem,
            "--runtime",
            "claude",
            "--claude-bin",
            &standin,
        ],
        &with_git_identity(&[("CLAUDE_STANDIN_HOME", &home.0.display().to_string())]),
    );
    let git_root = TempDir::new("dashboard-tls-git");
    let remote = common::git::remote(&git_root.0);
    let shots = repo().join(format!("target/dashboard-https-{backend:?}").to_lowercase());
    std::fs::create_dir_all(&shots).unwrap();
    let out = tokio::process::Command::new("node")
        .current_dir(repo().join("web"))
        .args(["test/dashboard.mjs", &server.url(), &user, &viewer])
        .arg(&shots)
        .env("DASHBOARD_CERT", &cert)
        .env("DASHBOARD_REPO", &remote)
        .env("DASHBOARD_SKIP", "restart,seed")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(600), out)
        .await
        .expect("the dashboard test finishes")
        .expect("run node");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the dashboard test over HTTPS failed:\n{said}"
    );
    assert!(said.contains("dashboard: ok"), "{said}");
    daemon.stop().await;
    server.kill().await;
}

both_backends!(
    the_dashboard_works_in_chromium,
    the_dashboard_works_over_https
);
