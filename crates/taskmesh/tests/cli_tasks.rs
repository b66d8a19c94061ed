//! The `taskmesh task …` and `taskmesh daemons` verbs as people run them:
//! the built binary against a real server, on SQLite and PostgreSQL. Task
//! output comes from a daemon scripted with the unary DaemonService calls.

use taskmesh_testkit as common;
use taskmesh_testkit::both_backends;

use std::process::Stdio;
use std::time::Duration;

use common::{Backend, TestServer, start_server, start_server_at};
use taskmesh_server::model::TokenKind;
use taskmesh_server::pb::daemon_service_client::DaemonServiceClient;
use taskmesh_server::pb::{self, MessageKind};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_taskmesh");
/// A guard against a hung test, never a way to wait for something.
const PATIENCE: Duration = Duration::from_secs(60);

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn command(url: &str, token: Option<&str>, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env("TASKMESH_SERVER", url)
        .env_remove("TASKMESH_TOKEN")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(t) = token {
        c.env("TASKMESH_TOKEN", t);
    }
    c
}

async fn run_as(s: &TestServer, token: Option<&str>, args: &[&str]) -> Output {
    let out = tokio::time::timeout(PATIENCE, command(&s.url(), token, args).output())
        .await
        .unwrap_or_else(|_| panic!("taskmesh {args:?} did not finish"))
        .expect("run taskmesh");
    Output {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("utf-8 stderr"),
    }
}

/// Runs the CLI with the server's user token and expects success.
async fn ok(s: &TestServer, args: &[&str]) -> String {
    let out = run_as(s, Some(&s.token), args).await;
    assert_eq!(
        out.code,
        Some(0),
        "taskmesh {args:?} failed: {}{}",
        out.stdout,
        out.stderr
    );
    out.stdout
}

/// Runs the CLI and expects exit code 1 with one `taskmesh: …` line on stderr.
async fn fails(s: &TestServer, token: Option<&str>, args: &[&str]) -> String {
    let out = run_as(s, token, args).await;
    assert_eq!(
        out.code,
        Some(1),
        "taskmesh {args:?}: {out:?}",
        out = out.stderr
    );
    assert_eq!(out.stdout, "", "taskmesh {args:?} printed to stdout");
    let err = out.stderr.trim_end();
    assert!(
        err.starts_with("taskmesh: ") && !err.contains('\n'),
        "one readable line expected: {err:?}"
    );
    err.to_owned()
}

fn row_of<'a>(table: &'a str, id: &str) -> Option<&'a str> {
    table.lines().find(|l| l.starts_with(id))
}

type Daemons = DaemonServiceClient<InterceptedService<Channel, common::Bearer>>;

/// A daemon played by the test, one unary call at a time.
struct ScriptedDaemon {
    client: Daemons,
    token: String,
    id: String,
}

impl ScriptedDaemon {
    async fn register(s: &TestServer, hostname: &str) -> ScriptedDaemon {
        let token = s.token_in("default", TokenKind::Daemon).await;
        let mut client =
            DaemonServiceClient::with_interceptor(s.channel().await, common::bearer(Some(&token)));
        let daemon = client
            .register(pb::RegisterRequest {
                machine_id: uuid::Uuid::new_v4().to_string(),
                hostname: hostname.into(),
                version: "0".into(),
                runtimes: vec![pb::Runtime {
                    name: "shell".into(),
                    version: "builtin".into(),
                }],
                max_concurrent_tasks: 2,
                ..Default::default()
            })
            .await
            .expect("register")
            .into_inner()
            .daemon
            .expect("daemon");
        ScriptedDaemon {
            client,
            token,
            id: daemon.id,
        }
    }

    /// The same daemon talking to another server (on the same database).
    async fn reconnect(&mut self, s: &TestServer) {
        self.client = DaemonServiceClient::with_interceptor(
            s.channel().await,
            common::bearer(Some(&self.token)),
        );
    }

    /// Claims the queued task `id` and reports it started.
    async fn run(&mut self, id: &str) {
        let claim = self
            .client
            .claim_task(pb::ClaimTaskRequest {
                daemon_id: self.id.clone(),
            })
            .await
            .expect("claim")
            .into_inner();
        let task = claim.task.expect("a queued task");
        assert_eq!(task.id, id);
        assert_eq!(claim.first_seq, 1);
        self.client
            .report_task_started(pb::ReportTaskStartedRequest {
                task_id: id.into(),
                attempt: task.attempt,
                pid: 1,
                daemon_id: self.id.clone(),
            })
            .await
            .expect("started");
    }

    async fn output(&mut self, id: &str, messages: Vec<pb::TaskMessageInput>) {
        let last = messages.iter().map(|m| m.seq).max().unwrap_or(0);
        let acked = self
            .client
            .report_task_messages(pb::ReportTaskMessagesRequest {
                task_id: id.into(),
                messages,
                daemon_id: self.id.clone(),
                ..Default::default()
            })
            .await
            .expect("report messages")
            .into_inner()
            .acked_seq;
        assert!(acked >= last, "acked {acked}, sent up to {last}");
    }

    /// Stdout lines `line <seq>` for each seq.
    async fn lines(&mut self, id: &str, seqs: std::ops::RangeInclusive<i64>) {
        let messages = seqs
            .map(|seq| stdout(seq, &format!("line {seq}")))
            .collect();
        self.output(id, messages).await;
    }

    async fn complete(&mut self, id: &str) {
        self.client
            .complete_task(pb::CompleteTaskRequest {
                task_id: id.into(),
                summary: "done".into(),
                resume: None,
                daemon_id: self.id.clone(),
                ..Default::default()
            })
            .await
            .expect("complete");
    }

    async fn fail(&mut self, id: &str, reason: &str) {
        self.client
            .fail_task(pb::FailTaskRequest {
                task_id: id.into(),
                reason: reason.into(),
                exit_code: 3,
                resume: None,
                daemon_id: self.id.clone(),
                ..Default::default()
            })
            .await
            .expect("fail");
    }
}

fn stdout(seq: i64, text: &str) -> pb::TaskMessageInput {
    pb::TaskMessageInput {
        seq,
        kind: MessageKind::Stdout as i32,
        content: text.into(),
        ..Default::default()
    }
}

fn expected_lines(seqs: std::ops::RangeInclusive<i64>) -> Vec<String> {
    seqs.map(|seq| format!("line {seq}")).collect()
}

/// A running `taskmesh task watch`, its output read line by line as it
/// arrives.
struct Watch {
    child: Child,
    stdout: mpsc::UnboundedReceiver<String>,
    stderr: mpsc::UnboundedReceiver<String>,
    /// Every stdout line so far.
    printed: Vec<String>,
}

impl Watch {
    fn start(s: &TestServer, id: &str) -> Watch {
        let mut child = command(&s.url(), Some(&s.token), &["task", "watch", id])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn watch");
        let forward = |pipe: Box<dyn tokio::io::AsyncRead + Unpin + Send>, name: &'static str| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    eprintln!("watch {name}: {line}");
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        };
        let stdout = forward(Box::new(child.stdout.take().expect("stdout")), "stdout");
        let stderr = forward(Box::new(child.stderr.take().expect("stderr")), "stderr");
        Watch {
            child,
            stdout,
            stderr,
            printed: Vec::new(),
        }
    }

    /// Reads stdout until `line` is printed.
    async fn until_stdout(&mut self, line: &str) {
        while self.printed.last().map(String::as_str) != Some(line) {
            let next = tokio::time::timeout(PATIENCE, self.stdout.recv())
                .await
                .unwrap_or_else(|_| panic!("no {line:?} on stdout; got {:?}", self.printed))
                .unwrap_or_else(|| panic!("stdout closed before {line:?}: {:?}", self.printed));
            self.printed.push(next);
        }
    }

    /// Reads stderr until a line containing `needle`.
    async fn until_stderr(&mut self, needle: &str) -> String {
        loop {
            let line = tokio::time::timeout(PATIENCE, self.stderr.recv())
                .await
                .unwrap_or_else(|_| panic!("no {needle:?} on stderr"))
                .unwrap_or_else(|| panic!("stderr closed before {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Waits for the exit; answers the exit code, all of stdout and the
    /// rest of stderr.
    async fn finish(mut self) -> (Option<i32>, Vec<String>, String) {
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("watch did not exit")
            .expect("wait");
        while let Some(line) = self.stdout.recv().await {
            self.printed.push(line);
        }
        let mut stderr = String::new();
        while let Some(line) = self.stderr.recv().await {
            stderr.push_str(&line);
            stderr.push('\n');
        }
        (status.code(), self.printed, stderr)
    }
}

async fn create_start_stop(backend: Backend) {
    let s = start_server(backend).await;

    let out = ok(
        &s,
        &["task", "create", "--name", "first", "--plan", "echo hi"],
    )
    .await;
    let id = out.strip_suffix('\n').expect("one line");
    assert!(uuid::Uuid::parse_str(id).is_ok(), "only the id: {out:?}");

    let table = ok(&s, &["task", "list"]).await;
    let header = table.lines().next().expect("a header");
    for column in ["ID", "STATUS", "RUNTIME", "NAME", "DAEMON", "UPDATED"] {
        assert!(header.contains(column), "{header}");
    }
    let row = row_of(&table, id).unwrap_or_else(|| panic!("{id} not listed:\n{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[..5], [id, "pending", "shell", "first", "-"], "{row}");
    let running = ok(&s, &["task", "list", "--status", "running,queued"]).await;
    assert!(row_of(&running, id).is_none(), "{running}");

    let details = ok(&s, &["task", "get", id]).await;
    for line in ["id:", "name:", "status:", "runtime:", "created:", "plan:"] {
        assert!(details.contains(line), "{line} missing:\n{details}");
    }
    assert!(
        details.contains(id) && details.contains("  echo hi\n"),
        "{details}"
    );
    assert!(
        details
            .lines()
            .any(|l| l.starts_with("status:") && l.ends_with(" pending")),
        "{details}"
    );

    assert_eq!(
        ok(&s, &["task", "start", id]).await,
        format!("task {id} queued\n")
    );
    let queued = ok(&s, &["task", "list", "--status", "queued"]).await;
    assert!(row_of(&queued, id).is_some(), "{queued}");
    // No daemon holds it, so a stop cancels it at once.
    assert_eq!(
        ok(&s, &["task", "stop", id]).await,
        format!("task {id} cancelled\n")
    );
    let details = ok(&s, &["task", "get", id]).await;
    assert!(
        details
            .lines()
            .any(|l| l.starts_with("status:") && l.ends_with(" cancelled")),
        "{details}"
    );

    // Created and started at once, with a limit on the listing.
    let second = ok(&s, &["task", "create", "--name", "second", "--start"]).await;
    let second = second.trim_end();
    let newest = ok(&s, &["task", "list", "--limit", "1"]).await;
    assert_eq!(newest.lines().count(), 2, "{newest}");
    assert!(
        row_of(&newest, second).is_some_and(|r| r.contains("queued")),
        "{newest}"
    );

    // Mistakes answer one readable line and exit 1.
    let err = fails(&s, Some(&s.token), &["task", "get", "not-an-id"]).await;
    assert!(
        err.contains("not a valid id") && err.ends_with("(INVALID_ARGUMENT)"),
        "{err}"
    );
    let unknown = uuid::Uuid::new_v4().to_string();
    let err = fails(&s, Some(&s.token), &["task", "get", &unknown]).await;
    assert_eq!(
        err,
        format!("taskmesh: task {unknown} not found (NOT_FOUND)")
    );
    let err = fails(&s, Some(&s.token), &["task", "send", id, "y"]).await;
    assert!(
        err.contains("is cancelled") && err.ends_with("(FAILED_PRECONDITION)"),
        "{err}"
    );
    let err = fails(&s, Some(&s.token), &["task", "reassign", id]).await;
    assert!(
        err.contains("is cancelled") && err.ends_with("(FAILED_PRECONDITION)"),
        "{err}"
    );
    // A finished task takes a follow-up prompt as a new attempt.
    assert_eq!(
        ok(&s, &["task", "continue", id, "once more"]).await,
        format!("task {id} queued\n")
    );
    let err = fails(&s, None, &["task", "list"]).await;
    assert!(
        err.contains("--token") && err.contains("TASKMESH_TOKEN"),
        "{err}"
    );
    let err = fails(&s, Some("tmu_wrong"), &["task", "list"]).await;
    assert!(err.ends_with("(UNAUTHENTICATED)"), "{err}");
    assert!(
        !err.contains("tmu_wrong"),
        "the token is never printed: {err}"
    );
    let out = run_as(
        &s,
        Some(&s.token),
        &["task", "list", "--server", "http://127.0.0.1:1"],
    )
    .await;
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .starts_with("taskmesh: cannot reach the server at http://127.0.0.1:1: "),
        "{}",
        out.stderr
    );
    let out = run_as(&s, Some(&s.token), &["task", "list", "--status", "done"]).await;
    assert_eq!(
        out.code,
        Some(2),
        "clap refuses a bad value: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("expected one of pending"),
        "{}",
        out.stderr
    );
}

async fn watch_prints_each_message_once(backend: Backend) {
    let s = start_server(backend).await;
    let mut daemon = ScriptedDaemon::register(&s, "runner").await;
    let id = ok(&s, &["task", "create", "--name", "count", "--start"]).await;
    let id = id.trim_end();
    daemon.run(id).await;
    daemon.lines(id, 1..=3).await;

    let mut watch = Watch::start(&s, id);
    watch.until_stdout("line 3").await;
    watch.until_stderr("[status] running").await;
    daemon.lines(id, 4..=5).await;
    watch.until_stdout("line 5").await;
    // A resent batch is stored once and shown once.
    daemon.lines(id, 4..=6).await;
    daemon
        .output(
            id,
            vec![
                pb::TaskMessageInput {
                    seq: 7,
                    kind: MessageKind::ToolUse as i32,
                    tool_name: "Bash".into(),
                    tool_input_json: r#"{"command":"ls"}"#.into(),
                    ..Default::default()
                },
                pb::TaskMessageInput {
                    seq: 8,
                    kind: MessageKind::Stderr as i32,
                    content: "warning: to stderr".into(),
                    ..Default::default()
                },
                stdout(9, "line 9"),
            ],
        )
        .await;
    let command_id = ok(&s, &["task", "send", id, "y"]).await;
    assert!(
        uuid::Uuid::parse_str(command_id.trim_end()).is_ok(),
        "{command_id}"
    );
    watch.until_stdout("line 9").await;
    watch.until_stderr("warning: to stderr").await;
    daemon.complete(id).await;

    let (code, printed, stderr) = watch.finish().await;
    assert_eq!(code, Some(0), "{stderr}");
    let mut expected = expected_lines(1..=6);
    expected.push(r#"[tool_use Bash] {"command":"ls"}"#.into());
    expected.push("line 9".into());
    assert_eq!(printed, expected);
    assert!(stderr.contains("[status] completed"), "{stderr}");

    // Watching an ended task replays its output, then exits.
    let again = Watch::start(&s, id);
    let (code, printed, _) = again.finish().await;
    assert_eq!((code, printed), (Some(0), expected));

    // A task that fails: the watcher, started after the end, still prints
    // all of its output before it reports the failure.
    let failing = ok(&s, &["task", "create", "--name", "fails", "--start"]).await;
    let failing = failing.trim_end();
    daemon.run(failing).await;
    daemon.lines(failing, 1..=2).await;
    daemon.fail(failing, "exit code 3").await;
    let (code, printed, stderr) = Watch::start(&s, failing).finish().await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(printed, expected_lines(1..=2));
    assert!(
        stderr.ends_with(&format!(
            "taskmesh: task {failing} ended failed: exit code 3\n"
        )),
        "{stderr}"
    );

    let unknown = uuid::Uuid::new_v4().to_string();
    let err = fails(&s, Some(&s.token), &["task", "watch", &unknown]).await;
    assert!(err.ends_with("not found (NOT_FOUND)"), "{err}");

    // Ctrl-C ends a watch of a task that has not started with 130.
    let pending = ok(&s, &["task", "create", "--name", "idle"]).await;
    let mut watch = Watch::start(&s, pending.trim_end());
    watch.until_stderr("[status] pending").await;
    let pid = watch.child.id().expect("running").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    assert!(kill.success());
    let (code, printed, _) = watch.finish().await;
    assert_eq!((code, printed), (Some(130), vec![]));
}

async fn watch_resumes_after_a_dropped_connection(backend: Backend) {
    let s = start_server(backend).await;
    let mut daemon = ScriptedDaemon::register(&s, "runner").await;
    let id = ok(&s, &["task", "create", "--name", "long", "--start"]).await;
    let id = id.trim_end().to_owned();
    daemon.run(&id).await;
    daemon.lines(&id, 1..=3).await;

    let mut watch = Watch::start(&s, &id);
    watch.until_stdout("line 3").await;

    // The server goes away while the watcher follows the task; a new one
    // comes up on the same database and address.
    let addr = s.addr;
    let db = s.stop_keeping_db().await;
    let note = watch.until_stderr("reconnecting").await;
    assert!(note.contains("from seq 3"), "{note}");
    // It keeps trying while nothing listens.
    let note = watch.until_stderr("cannot reach the server").await;
    assert!(note.contains("reconnecting"), "{note}");
    let s = start_server_at(db, addr).await;
    // The watcher still holds the first server's token.
    daemon.reconnect(&s).await;
    daemon.lines(&id, 4..=6).await;
    watch.until_stdout("line 6").await;
    daemon.lines(&id, 7..=8).await;
    daemon.complete(&id).await;

    let (code, printed, stderr) = watch.finish().await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(printed, expected_lines(1..=8), "each line once, in order");
}

/// Output stored out of order (seq 4 before 3) is printed in order: the
/// watcher waits for the hole to fill instead of skipping past it.
async fn watch_never_skips_past_a_hole(backend: Backend) {
    let s = start_server(backend).await;
    let mut daemon = ScriptedDaemon::register(&s, "runner").await;
    let id = ok(&s, &["task", "create", "--name", "holes", "--start"]).await;
    let id = id.trim_end().to_owned();
    daemon.run(&id).await;
    let acked = daemon
        .client
        .report_task_messages(pb::ReportTaskMessagesRequest {
            task_id: id.clone(),
            daemon_id: daemon.id.clone(),
            messages: vec![
                stdout(1, "line 1"),
                stdout(2, "line 2"),
                stdout(4, "line 4"),
            ],
            ..Default::default()
        })
        .await
        .expect("report")
        .into_inner()
        .acked_seq;
    assert_eq!(acked, 2);

    let mut watch = Watch::start(&s, &id);
    watch.until_stdout("line 2").await;
    daemon.lines(&id, 3..=3).await;
    watch.until_stdout("line 4").await;
    daemon.complete(&id).await;
    let (code, printed, stderr) = watch.finish().await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(printed, expected_lines(1..=4));
}

async fn daemons_lists_a_registered_daemon(backend: Backend) {
    let s = start_server(backend).await;
    let empty = ok(&s, &["daemons"]).await;
    assert_eq!(empty.lines().count(), 1, "a header only: {empty}");
    let daemon = ScriptedDaemon::register(&s, "build-01").await;
    let table = ok(&s, &["daemons", "--workspace", "default"]).await;
    let header = table.lines().next().expect("a header");
    for column in [
        "ID",
        "HOSTNAME",
        "STATE",
        "RUNTIMES",
        "RUNNING",
        "LAST SEEN",
    ] {
        assert!(header.contains(column), "{header}");
    }
    let row = row_of(&table, &daemon.id).unwrap_or_else(|| panic!("not listed:\n{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1], "build-01", "{row}");
    assert_eq!(cells[3..5], ["shell", "0/2"], "{row}");
    let err = fails(&s, Some(&s.token), &["daemons", "--workspace", "nowhere"]).await;
    assert!(err.contains("(NOT_FOUND)"), "{err}");
}

/// `task events`, `task usage` and `task delete`; TASKMESH_WORKSPACE
/// stands for --workspace on every verb that takes it.
async fn events_usage_delete_and_the_workspace_variable(backend: Backend) {
    let s = start_server(backend).await;
    let id = ok(&s, &["task", "create", "--name", "short-lived"]).await;
    let id = id.trim();
    let events = ok(&s, &["task", "events", id]).await;
    assert!(
        events.contains("pending") && events.contains("created"),
        "{events}"
    );
    let usage = ok(&s, &["task", "usage", id]).await;
    assert_eq!(usage, "no usage reported\n");
    assert_eq!(
        ok(&s, &["task", "delete", id]).await,
        format!("deleted task {id}\n")
    );
    let gone = fails(&s, Some(&s.token), &["task", "get", id]).await;
    assert!(gone.contains("not found"), "{gone}");

    let out = tokio::time::timeout(
        PATIENCE,
        command(&s.url(), Some(&s.token), &["task", "list"])
            .env("TASKMESH_WORKSPACE", "no-such-workspace")
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no-such-workspace"),
        "the variable was used: {err}"
    );
}

/// `token create`, `token list` and `token revoke` through the server
/// with the user's token: the daemon token made works until it is revoked.
async fn tokens_through_the_server(backend: Backend) {
    let s = start_server(backend).await;
    let secret = ok(
        &s,
        &["token", "create", "--kind", "daemon", "--name", "build-box"],
    )
    .await;
    let secret = secret.trim_end();
    assert!(secret.starts_with("tmd_"), "{secret}");
    let mut daemons = common::daemon::daemon_client(&s, secret).await;
    common::daemon::try_register(&mut daemons, "build-box", 1)
        .await
        .expect("the new daemon token works");

    let table = ok(&s, &["token", "list"]).await;
    let header = table.lines().next().expect("a header");
    for column in ["ID", "KIND", "NAME", "USER", "CREATED", "REVOKED"] {
        assert!(header.contains(column), "{header}");
    }
    let row = table
        .lines()
        .find(|l| l.contains("build-box"))
        .unwrap_or_else(|| panic!("not listed:\n{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1..3], ["daemon", "build-box"], "{row}");
    assert_eq!(cells.last(), Some(&"-"), "not revoked yet: {row}");
    assert!(!table.contains(secret), "a list never shows secrets");

    let revoked = ok(&s, &["token", "revoke", cells[0]]).await;
    assert!(revoked.starts_with("revoked daemon token"), "{revoked}");
    let table = ok(&s, &["token", "list"]).await;
    let row = row_of(&table, cells[0]).expect("still listed");
    assert!(row.ends_with("ago"), "revoked: {row}");
    let refused = common::daemon::try_register(&mut daemons, "build-box", 1).await;
    assert!(refused.is_err(), "a revoked token is refused");
}

both_backends!(
    tokens_through_the_server,
    events_usage_delete_and_the_workspace_variable,
    create_start_stop,
    watch_prints_each_message_once,
    watch_resumes_after_a_dropped_connection,
    watch_never_skips_past_a_hole,
    daemons_lists_a_registered_daemon,
);

/// The verbs `every_verb_explains_itself_with_an_example` reads.
const VERBS: [&[&str]; 27] = [
    &["task"],
    &["task", "create"],
    &["task", "list"],
    &["task", "get"],
    &["task", "start"],
    &["task", "stop"],
    &["task", "send"],
    &["task", "reassign"],
    &["task", "continue"],
    &["task", "watch"],
    &["task", "approve"],
    &["task", "deny"],
    &["task", "approvals"],
    &["task", "diff"],
    &["task", "retry-completion"],
    &["task", "clone-worktree"],
    &["task", "events"],
    &["task", "usage"],
    &["task", "delete"],
    &["daemons"],
    &["daemons", "disconnect"],
    &["daemons", "get"],
    &["daemons", "check-target"],
    &["token"],
    &["token", "create"],
    &["token", "list"],
    &["token", "revoke"],
];

#[test]
fn every_verb_explains_itself_with_an_example() {
    for verb in VERBS {
        let out = std::process::Command::new(BIN)
            .args(verb)
            .arg("--help")
            .output()
            .expect("run taskmesh");
        let help = String::from_utf8(out.stdout).expect("utf-8");
        assert!(out.status.success(), "{verb:?}");
        for needle in [
            "Example:",
            "--server",
            "TASKMESH_SERVER",
            "--token",
            "TASKMESH_TOKEN",
        ] {
            assert!(
                help.contains(needle),
                "{verb:?} --help lacks {needle}:\n{help}"
            );
        }
    }
    let out = std::process::Command::new(BIN)
        .arg("--help")
        .output()
        .expect("run taskmesh");
    let help = String::from_utf8(out.stdout).expect("utf-8");
    for verb in ["task", "daemons"] {
        assert!(help.contains(verb), "{help}");
    }
}

/// The examples in the help that need no variable and no quoting run as
/// written against a fresh server.
#[tokio::test]
async fn the_help_examples_work_as_written() {
    let s = start_server(Backend::Sqlite).await;
    let mut ran = 0;
    for verb in VERBS {
        let out = std::process::Command::new(BIN)
            .args(verb)
            .arg("--help")
            .output()
            .expect("run taskmesh");
        let help = String::from_utf8(out.stdout).expect("utf-8");
        let examples = help
            .lines()
            .map(|l| l.trim().trim_start_matches("Example:").trim())
            .filter(|l| l.starts_with("taskmesh "))
            .filter(|l| !l.contains(['$', '>', '\'', '"']));
        for example in examples {
            let args: Vec<&str> = example.split_whitespace().skip(1).collect();
            ok(&s, &args).await;
            ran += 1;
        }
    }
    assert!(ran >= 3, "{ran} examples ran");
}
