//! Memory a client can make the server hold stays bounded: measured as the
//! resident size of a real `taskmesh serve` process (its memory alone),
//! on SQLite and PostgreSQL.
//!
//! - WatchTask on ids that do not exist allocates nothing.
//! - Watches opened and dropped leave nothing behind: round after round of
//!   a thousand watches, the server stays where the first round left it.
//! - A watcher that never reads, while a task prints large output, holds
//!   at most its byte budget, not the output.
//! - Over 96 MiB of stored output, a watch from seq 0, ContinueTask's
//!   context and ListTaskMessages each peak at a few MiB: they read in
//!   byte-bounded pages (measured as the high-water mark, so no peak
//!   between samples is missed).
//! - A WatchTasks client that never reads, while tasks with 1 MiB plans
//!   are renamed 600 times, costs the server tens of MiB, not the 600 MiB
//!   of plans: its channel holds 4 KiB previews, its stream a byte budget.

use std::time::Duration;

use taskmesh_server::pb::daemon_service_client::DaemonServiceClient;
use taskmesh_server::pb::task_service_client::TaskServiceClient;
use taskmesh_server::pb::workspace_service_client::WorkspaceServiceClient;
use taskmesh_server::pb::{self, command::Kind};
use taskmesh_testkit::daemon::{Daemons, Session, try_register};
use taskmesh_testkit::process::{ServeProcess, peak_rss_bytes, reset_peak_rss};
use taskmesh_testkit::{Backend, Bearer, TestDb, both_backends};
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

type Tasks = TaskServiceClient<InterceptedService<Channel, Bearer>>;

const MIB: u64 = 1 << 20;

struct Server {
    process: ServeProcess,
    token: String,
    _db: TestDb,
}

impl Server {
    async fn start(backend: Backend) -> Server {
        let db = TestDb::new(backend).await;
        let process = ServeProcess::start(&db.url, "127.0.0.1:0", &[]).await;
        let token = process.token.clone().expect("a first-start token");
        Server {
            process,
            token,
            _db: db,
        }
    }

    async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.process.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn tasks(&self) -> Tasks {
        TaskServiceClient::with_interceptor(self.channel().await, Bearer::new(&self.token).unwrap())
    }

    fn rss(&self) -> u64 {
        self.process.rss_bytes().expect("the server's RSS")
    }

    /// How far above its size before `work` the server's peak went.
    async fn peak_during(&self, work: impl AsyncFnOnce()) -> u64 {
        let pid = self.process.pid();
        reset_peak_rss(pid).expect("reset the peak");
        let before = self.rss();
        work().await;
        peak_rss_bytes(pid)
            .expect("the peak")
            .saturating_sub(before)
    }

    /// A daemon of workspace `default` with a session open.
    async fn daemon(&self) -> (Session, Daemons) {
        let mut ws = WorkspaceServiceClient::with_interceptor(
            self.channel().await,
            Bearer::new(&self.token).unwrap(),
        );
        let secret = ws
            .create_token(pb::CreateTokenRequest {
                kind: pb::TokenKind::Daemon as i32,
                name: "memory".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .secret;
        let mut client: Daemons = DaemonServiceClient::with_interceptor(
            self.channel().await,
            Bearer::new(&secret).unwrap(),
        );
        let id = try_register(&mut client, "memory", 1).await.unwrap();
        let session = Session::open(&mut client, &id, vec![]).await;
        (session, client)
    }
}

async fn create(tasks: &mut Tasks, name: &str) -> String {
    tasks
        .create_task(pb::CreateTaskRequest {
            name: name.into(),
            plan: "true".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap()
        .id
}

/// Opens a watch, reads its first event (the task), and drops it.
async fn watch_once(tasks: &mut Tasks, id: &str) {
    let mut w = tasks
        .watch_task(pb::WatchTaskRequest {
            task_id: id.into(),
            since_seq: 0,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    w.next().await.unwrap().unwrap();
}

async fn watches_leave_nothing_behind(backend: Backend) {
    let s = Server::start(backend).await;
    let mut tasks = s.tasks().await;
    let mut ids = Vec::new();
    for i in 0..1000 {
        ids.push(create(&mut tasks, &format!("t{i}")).await);
    }

    // Unknown ids: refused before anything is allocated for them.
    let before = s.rss();
    for _ in 0..2000 {
        let e = tasks
            .watch_task(pb::WatchTaskRequest {
                task_id: uuid::Uuid::new_v4().to_string(),
                since_seq: 0,
                follow: false,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
    }
    let unknown = s.rss();
    eprintln!(
        "2000 watches of unknown ids: {:.1} -> {:.1} MiB",
        before as f64 / MIB as f64,
        unknown as f64 / MIB as f64
    );
    assert!(
        unknown < before + 8 * MIB,
        "2000 refused watches grew the server from {before} to {unknown} bytes"
    );

    // Each task watched once and let go, five times over: a watch's
    // channel goes with its last watcher (it used to stay, a thousand
    // slots a task, for as long as the server ran).
    let mut rounds = Vec::new();
    for _ in 0..5 {
        for id in &ids {
            watch_once(&mut tasks, id).await;
        }
        rounds.push(s.rss());
    }
    let mib = |b: &u64| format!("{:.1}", *b as f64 / MIB as f64);
    eprintln!(
        "1000 watches opened and dropped, 5 rounds: {} MiB before, {} MiB after each",
        mib(&unknown),
        rounds.iter().map(mib).collect::<Vec<_>>().join(" / ")
    );
    let after = rounds[rounds.len() - 1];
    assert!(
        after < unknown + 8 * MIB,
        "watches opened and dropped kept memory: {unknown} -> {after} bytes"
    );
}

async fn a_slow_watcher_holds_its_budget_not_the_output(backend: Backend) {
    let s = Server::start(backend).await;
    let mut tasks = s.tasks().await;
    let (mut session, _client) = s.daemon().await;
    let id = create(&mut tasks, "loud").await;
    tasks
        .start_task(pb::StartTaskRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let spawn = session.command().await;
    assert!(matches!(spawn.kind, Some(Kind::SpawnTask(_))));
    session.ack(&spawn.id).await;
    session.started(&id, 1).await;

    // A watcher that reads its first event and then nothing more.
    let mut slow = tasks
        .watch_task(pb::WatchTaskRequest {
            task_id: id.clone(),
            since_seq: 0,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    slow.next().await.unwrap().unwrap();

    let before = s.rss();
    let chunk = "x".repeat(1 << 20);
    let mut peak = before;
    // Two messages a batch: a Session message stays under 4 MiB.
    for batch in 0..64 {
        let first = batch * 2 + 1;
        let acked = session
            .output(&id, first..first + 2, |_| chunk.clone())
            .await;
        assert_eq!(acked, first + 1);
        peak = peak.max(s.rss());
    }
    eprintln!(
        "128 MiB of output past a watcher that does not read: {:.1} MiB before, {:.1} MiB at most",
        before as f64 / MIB as f64,
        peak as f64 / MIB as f64
    );
    // The watcher's budget (8 MiB), the connection's buffers and what
    // ingesting 2 MiB batches takes (about 14 MiB with no watcher at all),
    // not the output: without a budget the watcher held every message it
    // had not sent, all 128 MiB here.
    assert!(
        peak < before + 64 * MIB,
        "a watcher that does not read grew the server from {before} to {peak} bytes"
    );

    // It still gets everything, in order, once it reads.
    let mut seen = 0;
    let read = async {
        while seen < 128 {
            if let Some(pb::watch_task_response::Event::Message(m)) =
                slow.next().await.unwrap().unwrap().event
            {
                seen += 1;
                assert_eq!(m.seq, seen);
                assert_eq!(m.content.len(), 1 << 20);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the slow watcher catches up");
}

async fn large_output_is_read_in_pages(backend: Backend) {
    let s = Server::start(backend).await;
    let mut tasks = s.tasks().await;
    let (mut session, _client) = s.daemon().await;
    let id = create(&mut tasks, "verbose").await;
    tasks
        .start_task(pb::StartTaskRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let spawn = session.command().await;
    session.ack(&spawn.id).await;
    session.started(&id, 1).await;
    let chunk = "y".repeat(1 << 20);
    for batch in 0..48 {
        let first = batch * 2 + 1;
        session
            .output(&id, first..first + 2, |_| chunk.clone())
            .await;
    }
    session
        .send(pb::session_request::Message::Completed(
            pb::CompleteTaskRequest {
                task_id: id.clone(),
                attempt: 1,
                ..Default::default()
            },
        ))
        .await;
    // The end is confirmed by an ack that says the task ended.
    loop {
        if let pb::session_response::Message::OutputAck(a) = session.next().await
            && a.task_ended
        {
            break;
        }
    }

    let mib = |b: u64| b as f64 / MIB as f64;
    // A watch from seq 0 that reads two messages and then stops reading:
    // the server loaded a page, not the 96 MiB.
    let mut watch = None;
    let watching = s
        .peak_during(async || {
            let mut w = tasks
                .watch_task(pb::WatchTaskRequest {
                    task_id: id.clone(),
                    since_seq: 0,
                    follow: false,
                })
                .await
                .unwrap()
                .into_inner();
            let mut messages = 0;
            while messages < 2 {
                if let Some(pb::watch_task_response::Event::Message(_)) =
                    w.next().await.unwrap().unwrap().event
                {
                    messages += 1;
                }
            }
            watch = Some(w);
        })
        .await;
    let listing = s
        .peak_during(async || {
            let page = tasks
                .list_task_messages(pb::ListTaskMessagesRequest {
                    task_id: id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert!(page.messages.len() < 96);
        })
        .await;
    let continuing = s
        .peak_during(async || {
            tasks
                .continue_task(pb::ContinueTaskRequest {
                    id: id.clone(),
                    prompt: "and now?".into(),
                    daemon_id: String::new(),
                })
                .await
                .unwrap();
        })
        .await;
    eprintln!(
        "over 96 MiB of stored output, the peak rose by: {:.1} MiB (a watch from seq 0), \
         {:.1} MiB (ListTaskMessages), {:.1} MiB (ContinueTask)",
        mib(watching),
        mib(listing),
        mib(continuing)
    );
    // Pages of a few MiB and the buffers around them; reading whole
    // messages by count took all 96 MiB (and more) for each.
    for (what, peak) in [
        ("a watch from seq 0", watching),
        ("ListTaskMessages", listing),
        ("ContinueTask", continuing),
    ] {
        assert!(peak < 40 * MIB, "{what} raised the peak by {peak} bytes");
    }
    drop(watch);
}

async fn a_silent_workspace_watcher_costs_little(backend: Backend) {
    let s = Server::start(backend).await;
    let mut tasks = s.tasks().await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let task = tasks
            .create_task(pb::CreateTaskRequest {
                name: format!("planned {i}"),
                plan: "p".repeat(1 << 20),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        ids.push(task.id);
    }
    let mut renames = s.tasks().await;
    let rename_all = async |renames: &mut Tasks, rounds: std::ops::Range<i32>| {
        for round in rounds {
            for id in &ids {
                renames
                    .update_task(pb::UpdateTaskRequest {
                        task: Some(pb::Task {
                            id: id.clone(),
                            name: format!("renamed {round}"),
                            ..Default::default()
                        }),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["name".into()],
                        }),
                        expected_version: 0,
                    })
                    .await
                    .unwrap();
            }
        }
    };
    // What the renames cost with nobody watching (each loads and saves a
    // 1 MiB plan), then the same with a watcher that never reads.
    let alone = s
        .peak_during(async || rename_all(&mut renames, 0..30).await)
        .await;
    let mut watcher = tasks
        .watch_tasks(pb::WatchTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    let watched = s
        .peak_during(async || rename_all(&mut renames, 30..60).await)
        .await;
    eprintln!(
        "600 renames of tasks with 1 MiB plans: the peak rose by {:.1} MiB with nobody \
         watching, {:.1} MiB past a WatchTasks client that does not read",
        alone as f64 / MIB as f64,
        watched as f64 / MIB as f64
    );
    // The workspace channel's 1024 previews, the watcher's 8 MiB budget and
    // the connection's buffers; without previews and a budget the watcher
    // held every update whole, 600 MiB here.
    assert!(
        watched < alone + 64 * MIB,
        "the silent watcher raised the peak by {watched} bytes ({alone} without it)"
    );
    // It still hears of the renames once it reads.
    let first = watcher.next().await.unwrap().unwrap().task.unwrap();
    assert!(
        first.plan.len() <= 4096 && first.plan_truncated,
        "{}",
        first.plan.len()
    );
}

both_backends!(
    watches_leave_nothing_behind,
    a_silent_workspace_watcher_costs_little,
    a_slow_watcher_holds_its_budget_not_the_output,
    large_output_is_read_in_pages,
);
