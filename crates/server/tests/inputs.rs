//! What clients and daemons send, through real gRPC on SQLite and
//! PostgreSQL: one text rule for both databases (NUL bytes stripped from
//! free text, refused in names), secrets redacted in every field derived
//! from agent output, every string and list bounded, and every answer
//! bounded in bytes however large what is stored.

use taskmesh_testkit as common;
use taskmesh_testkit::both_backends;

use common::daemon::*;
use common::{Backend, start_server};
use prost::Message as _;
use taskmesh_server::model::TokenKind;
use taskmesh_server::pb::session_request::Message as Up;
use taskmesh_server::pb::{self, TaskStatus};
use tokio_stream::StreamExt;
use tonic::Code;

/// Secrets an agent might print, each with the part that must never be
/// shown again.
fn secrets(daemon_token: &str) -> Vec<(String, String)> {
    let body = daemon_token.split('_').nth(1).unwrap_or(daemon_token);
    [
        (format!("deploying with {daemon_token}"), body.to_string()),
        (
            "export ANTHROPIC_API_KEY=sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789".into(),
            "abcdefghijklmnopqrstuvwxyz0123456789".into(),
        ),
        (
            "aws AKIAIOSFODNN7EXAMPLE in use".into(),
            "AKIAIOSFODNN7EXAMPLE".into(),
        ),
        (
            "git push https://bob:hunter2hunter2@example.com/r.git".into(),
            "hunter2hunter2".into(),
        ),
        (
            "gh ghp_abcdefghijklmnopqrstuvwxyz0123456789AB".into(),
            "ghp_abcdefghijklmnopqrstuvwxyz0123456789AB".into(),
        ),
        (
            "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----"
                .into(),
            "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC".into(),
        ),
    ]
    .into_iter()
    .collect()
}

/// Every secret of the corpus through every field derived from agent
/// output: the failure reason, the completion summary, the progress text,
/// and a daemon's refusal of a SpawnTask. None is shown on the task.
async fn secrets_never_reach_the_status_reason(backend: Backend) {
    let s = start_server(backend).await;
    let daemon_token = s.token_in("default", TokenKind::Daemon).await;
    let mut dc = daemon_client(&s, &daemon_token).await;
    let daemon_id = register(&mut dc, "m1", 64).await;
    for (i, (secret, body)) in secrets(&daemon_token).into_iter().enumerate() {
        let shown = |t: &pb::Task| format!("{}\n{}", t.status_reason, t.progress_summary);
        let check = |t: pb::Task| {
            let shown = shown(&t);
            assert!(!shown.contains(&body), "secret {i} shown: {shown:?}");
            assert!(shown.contains("REDACTED"), "secret {i}: {shown:?}");
        };
        let failed = claimed_task(&s, &mut dc, &daemon_id, &format!("fails {i}")).await;
        dc.report_task_progress(pb::ReportTaskProgressRequest {
            task_id: failed.clone(),
            summary: secret.lines().next().unwrap().into(),
            percent: 10,
            daemon_id: daemon_id.clone(),
            attempt: 1,
        })
        .await
        .unwrap();
        if !secret.starts_with("-----BEGIN") {
            check(get(&s, &failed).await);
        }
        let t = dc
            .fail_task(pb::FailTaskRequest {
                task_id: failed,
                reason: secret.clone(),
                exit_code: 1,
                daemon_id: daemon_id.clone(),
                attempt: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        check(t);

        let completed = claimed_task(&s, &mut dc, &daemon_id, &format!("completes {i}")).await;
        let t = dc
            .complete_task(pb::CompleteTaskRequest {
                task_id: completed.clone(),
                summary: secret.clone(),
                daemon_id: daemon_id.clone(),
                attempt: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        check(t);
        check(get(&s, &completed).await);
    }

    // A refused SpawnTask fails its task with the daemon's words, redacted.
    let mut session = Session::open(&mut dc, &daemon_id, vec![]).await;
    let (secret, body) = secrets(&daemon_token).swap_remove(0);
    let refused = new_task(&s, "refused").await;
    start(&s, &refused.id).await;
    let spawn = session.command().await;
    session
        .send(Up::CommandResult(pb::CommandResult {
            command_id: spawn.id.clone(),
            status: pb::CommandResultStatus::Failed as i32,
            message: format!("cannot start: {secret}\0"),
            ..Default::default()
        }))
        .await;
    let mut watch = s
        .tasks()
        .await
        .watch_task(pb::WatchTaskRequest {
            task_id: refused.id.clone(),
            since_seq: i64::MAX,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let failed = loop {
        if let Some(pb::watch_task_response::Event::Task(t)) =
            watch.next().await.unwrap().unwrap().event
            && t.status() == TaskStatus::Failed
        {
            break t;
        }
    };
    assert!(failed.status_reason.contains("cannot start"), "{failed:?}");
    assert!(!failed.status_reason.contains(&body), "{failed:?}");
    assert!(!failed.status_reason.contains('\0'), "{failed:?}");
    s.stop().await;
}

/// A private key printed a line at a time (one message each, across two
/// batches) is hidden whole: every line from BEGIN to END is the marker.
async fn a_private_key_printed_line_by_line_is_hidden_whole(backend: Backend) {
    let s = start_server(backend).await;
    let token = s.token_in("default", TokenKind::Daemon).await;
    let mut dc = daemon_client(&s, &token).await;
    let daemon_id = register(&mut dc, "keys", 1).await;
    let id = claimed_task(&s, &mut dc, &daemon_id, "prints a key").await;
    let lines = [
        "cat id_ed25519",
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW",
        "QyNTUxOQAAACDnQ2Fz5bL0f6Pp2c3Yk8oN8kE1y9yG0W3cVQmGzW2XHgAAAJg2gE5FNoBO",
        "-----END OPENSSH PRIVATE KEY-----",
        "done",
    ];
    for (range, seqs) in [(0..3, 1..=3), (3..6, 4..=6)] {
        let messages = lines[range]
            .iter()
            .zip(seqs)
            .map(|(line, seq)| stdout(seq, line))
            .collect();
        dc.report_task_messages(pb::ReportTaskMessagesRequest {
            task_id: id.clone(),
            messages,
            daemon_id: daemon_id.clone(),
            attempt: 1,
        })
        .await
        .unwrap();
    }
    let stored: Vec<String> = stored_messages(&s, &id)
        .await
        .into_iter()
        .map(|m| m.content)
        .collect();
    let marker = "[REDACTED:private_key]";
    assert_eq!(
        stored,
        ["cat id_ed25519", marker, marker, marker, marker, "done"]
    );
    s.stop().await;
}

/// A NUL byte in any free text a client or daemon sends is stripped, the
/// same on both databases, and never leaves a task stuck; in a name or an
/// identifier it is refused with INVALID_ARGUMENT naming the field.
async fn nul_bytes_store_the_same_everywhere(backend: Backend) {
    let s = start_server(backend).await;
    let mut tasks = s.tasks().await;
    let task = tasks
        .create_task(pb::CreateTaskRequest {
            name: "nul".into(),
            plan: "echo a\0b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(task.plan, "echo ab");
    for (field, request) in [
        (
            "name",
            pb::CreateTaskRequest {
                name: "a\0b".into(),
                ..Default::default()
            },
        ),
        (
            "branch",
            pb::CreateTaskRequest {
                name: "n".into(),
                repository: "https://example.com/r.git".into(),
                branch: "main\0".into(),
                ..Default::default()
            },
        ),
    ] {
        let err = tasks.create_task(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {err:?}");
    }

    let token = s.token_in("default", TokenKind::Daemon).await;
    let mut dc = daemon_client(&s, &token).await;
    let daemon = dc
        .register(pb::RegisterRequest {
            machine_id: "nul-machine".into(),
            hostname: "host\0name".into(),
            version: "1.0\0".into(),
            runtimes: vec![pb::Runtime {
                name: "shell".into(),
                version: "bash\0 5".into(),
            }],
            max_concurrent_tasks: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .daemon
        .unwrap();
    assert_eq!(
        (
            daemon.hostname.as_str(),
            daemon.version.as_str(),
            daemon.runtimes[0].version.as_str()
        ),
        ("hostname", "1.0", "bash 5")
    );
    let err = dc
        .register(pb::RegisterRequest {
            machine_id: "bad\0machine".into(),
            max_concurrent_tasks: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("machine_id"), "{err:?}");

    let daemon_id = daemon.id;
    let id = claimed_task(&s, &mut dc, &daemon_id, "prints nul").await;
    dc.report_task_progress(pb::ReportTaskProgressRequest {
        task_id: id.clone(),
        summary: "half\0way".into(),
        percent: 50,
        daemon_id: daemon_id.clone(),
        attempt: 1,
    })
    .await
    .unwrap();
    assert_eq!(get(&s, &id).await.progress_summary, "halfway");
    // `printf 'done\000tail\n'`, as the agent's last words.
    let acked = dc
        .report_task_messages(pb::ReportTaskMessagesRequest {
            task_id: id.clone(),
            messages: vec![stdout(1, "done\0tail\n")],
            daemon_id: daemon_id.clone(),
            attempt: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .acked_seq;
    assert_eq!(acked, 1);
    dc.report_task_usage(pb::ReportTaskUsageRequest {
        task_id: id.clone(),
        usage: vec![pb::TaskUsage {
            provider: "anthropic\0".into(),
            model: "claude\0-sonnet".into(),
            input_tokens: 10,
            output_tokens: 5,
            ..Default::default()
        }],
        daemon_id: daemon_id.clone(),
        attempt: 1,
        cost_usd: 0.01,
        turns: 1,
    })
    .await
    .unwrap();
    let done = dc
        .complete_task(pb::CompleteTaskRequest {
            task_id: id.clone(),
            summary: "done\0tail".into(),
            resume: Some(pb::AgentResume {
                agent_session_id: "session\0-1".into(),
                working_directory: "/work/\0dir".into(),
            }),
            daemon_id: daemon_id.clone(),
            attempt: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(done.status(), TaskStatus::Completed);
    assert_eq!(done.status_reason, "donetail");
    let usage = tasks
        .get_task_usage(pb::GetTaskUsageRequest {
            task_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let models: Vec<_> = usage.usage.iter().map(|u| u.model.as_str()).collect();
    assert_eq!(models, ["claude-sonnet"], "{usage:?}");
    let stored = stored_messages(&s, &id).await;
    assert_eq!(stored[0].content, "donetail\n");

    let failed = claimed_task(&s, &mut dc, &daemon_id, "fails with nul").await;
    let t = dc
        .fail_task(pb::FailTaskRequest {
            task_id: failed,
            reason: "exit\0 1".into(),
            exit_code: 1,
            daemon_id: daemon_id.clone(),
            attempt: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(
        (t.status(), t.status_reason.as_str()),
        (TaskStatus::Failed, "exit 1")
    );
    s.stop().await;
}

/// Register's strings and lists have bounds; each is answered
/// INVALID_ARGUMENT naming the field, and the largest allowed passes.
async fn register_is_bounded(backend: Backend) {
    let s = start_server(backend).await;
    let token = s.token_in("default", TokenKind::Daemon).await;
    let mut dc = daemon_client(&s, &token).await;
    let ok = || pb::RegisterRequest {
        machine_id: "bounded".into(),
        hostname: "h".repeat(255),
        version: "v".repeat(128),
        runtimes: (0..64)
            .map(|i| pb::Runtime {
                name: format!("rt{i}"),
                version: "1".into(),
            })
            .collect(),
        max_concurrent_tasks: 1,
        legacy_ids: (0..16).map(|_| uuid::Uuid::new_v4().to_string()).collect(),
        work_dir: "/".repeat(4096),
        suggested_targets: vec!["/t".repeat(2048); 16],
    };
    dc.register(ok()).await.unwrap();
    let cases = [
        (
            "hostname",
            pb::RegisterRequest {
                hostname: "h".repeat(256),
                ..ok()
            },
        ),
        (
            "version",
            pb::RegisterRequest {
                version: "v".repeat(129),
                ..ok()
            },
        ),
        (
            "runtimes",
            pb::RegisterRequest {
                runtimes: (0..65)
                    .map(|i| pb::Runtime {
                        name: format!("rt{i}"),
                        version: "1".into(),
                    })
                    .collect(),
                ..ok()
            },
        ),
        (
            "legacy_ids",
            pb::RegisterRequest {
                legacy_ids: (0..17).map(|_| uuid::Uuid::new_v4().to_string()).collect(),
                ..ok()
            },
        ),
        (
            "machine_id",
            pb::RegisterRequest {
                machine_id: "m".repeat(1 << 20),
                ..ok()
            },
        ),
        (
            "work_dir",
            pb::RegisterRequest {
                work_dir: "/".repeat(4097),
                ..ok()
            },
        ),
        (
            "suggested_targets",
            pb::RegisterRequest {
                suggested_targets: vec!["/t".into(); 17],
                ..ok()
            },
        ),
        (
            "suggested_targets",
            pb::RegisterRequest {
                suggested_targets: vec!["/t".repeat(2049)],
                ..ok()
            },
        ),
    ];
    for (field, request) in cases {
        let err = dc.register(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {err:?}");
        assert!(
            err.message().len() < 512,
            "{field}: {} bytes",
            err.message().len()
        );
    }
    s.stop().await;
}

/// An error quotes at most 128 bytes of what was sent: a 1 MB id is
/// answered with a short message the client can read.
async fn errors_quote_little(backend: Backend) {
    let s = start_server(backend).await;
    let huge = "x".repeat(1 << 20);
    let err = s
        .tasks()
        .await
        .get_task(pb::GetTaskRequest { id: huge })
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::InvalidArgument | Code::NotFound),
        "{err:?}"
    );
    assert!(err.message().len() < 512, "{} bytes", err.message().len());
    s.stop().await;
}

/// ListTaskMessages over ten 1 MiB messages answers fewer than ten, under
/// every client's 4 MiB default, and paging by since_seq gets them all.
async fn lists_are_bounded_in_bytes(backend: Backend) {
    let s = start_server(backend).await;
    let token = s.token_in("default", TokenKind::Daemon).await;
    let mut dc = daemon_client(&s, &token).await;
    let daemon_id = register(&mut dc, "big", 4).await;
    let id = claimed_task(&s, &mut dc, &daemon_id, "big output").await;
    for seq in 1..=10 {
        let content = char::from(b'a' + seq as u8).to_string().repeat(1 << 20);
        dc.report_task_messages(pb::ReportTaskMessagesRequest {
            task_id: id.clone(),
            messages: vec![stdout(seq, &content)],
            daemon_id: daemon_id.clone(),
            attempt: 1,
        })
        .await
        .unwrap();
    }
    let mut tasks = s.tasks().await;
    let mut since = 0;
    let mut pages = 0;
    while since < 10 {
        let page = tasks
            .list_task_messages(pb::ListTaskMessagesRequest {
                task_id: id.clone(),
                since_seq: since,
                limit: 0,
            })
            .await
            .unwrap()
            .into_inner();
        // The budget is 3 MiB of estimated size; what matters is that every
        // client's 4 MiB default takes it.
        assert!(page.encoded_len() < 4 << 20, "{} bytes", page.encoded_len());
        assert!(!page.messages.is_empty());
        for m in &page.messages {
            assert_eq!(m.seq, since + 1);
            assert_eq!(m.content.len(), 1 << 20);
            since = m.seq;
        }
        pages += 1;
    }
    assert!(pages >= 4, "{pages} pages");

    // Tasks with 1 MiB plans: lists show a 4 KiB preview, GetTask the plan.
    for i in 0..8 {
        tasks
            .create_task(pb::CreateTaskRequest {
                name: format!("big plan {i}"),
                plan: "p".repeat(1 << 20),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let listed = tasks
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.encoded_len() < 4 << 20);
    let big: Vec<_> = listed
        .tasks
        .iter()
        .filter(|t| t.name.starts_with("big plan"))
        .collect();
    assert_eq!(big.len(), 8);
    assert!(big.iter().all(|t| t.plan.len() <= 4096 && t.plan_truncated));
    let full = get(&s, &big[0].id).await;
    assert_eq!((full.plan.len(), full.plan_truncated), (1 << 20, false));
    s.stop().await;
}

/// GetTask lists the first 100 direct subtasks and counts them all.
async fn subtasks_are_listed_up_to_a_bound(backend: Backend) {
    let s = start_server(backend).await;
    let mut tasks = s.tasks().await;
    let parent = new_task(&s, "parent").await;
    for i in 0..120 {
        tasks
            .create_task(pb::CreateTaskRequest {
                name: format!("child {i}"),
                plan: "q".repeat(64 * 1024),
                parent_task_id: parent.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let got = tasks
        .get_task(pb::GetTaskRequest {
            id: parent.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let task = got.task.unwrap();
    assert_eq!((task.subtasks.len(), task.subtask_count), (100, 120));
    assert!(task.subtasks.iter().all(|t| t.plan_truncated));
    s.stop().await;
}

both_backends!(
    secrets_never_reach_the_status_reason,
    a_private_key_printed_line_by_line_is_hidden_whole,
    nul_bytes_store_the_same_everywhere,
    register_is_bounded,
    errors_quote_little,
    lists_are_bounded_in_bytes,
    subtasks_are_listed_up_to_a_bound,
);
