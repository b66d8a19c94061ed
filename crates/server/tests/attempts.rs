//! New attempts after the fact, through real gRPC on SQLite and
//! PostgreSQL: ReassignTask moves a lost daemon's task to another daemon
//! with its context rebuilt from recorded output; ContinueTask resumes a
//! finished task's conversation with a follow-up prompt; RetryCompletion
//! reaches the daemon that holds the worktree, and its answer is recorded.

use taskmesh_testkit as common;
use taskmesh_testkit::both_backends;

use common::daemon::*;
use common::tasks::until_event;
use common::{Backend, TestServer, start_server};
use taskmesh_server::pb::session_request::Message as Up;
use taskmesh_server::pb::{self, TaskStatus, command::Kind};
use tonic::Code;

/// The session takes the SpawnTask, reports the task started and prints
/// `lines` numbered lines (seqs from the spawn's first_seq).
async fn take_and_print(session: &mut Session, task_id: &str, lines: i64) -> pb::SpawnTask {
    let cmd = session.command().await;
    let spawn = spawn_of(&cmd).clone();
    assert_eq!(spawn.task.as_ref().unwrap().id, task_id);
    session.ack(&cmd.id).await;
    session
        .started(task_id, spawn.task.as_ref().unwrap().attempt)
        .await;
    let first = spawn.first_seq;
    let last = first + lines - 1;
    let acked = session
        .output(task_id, first..=last, |seq| format!("line {seq}"))
        .await;
    assert_eq!(acked, last);
    spawn
}

async fn reassign(s: &TestServer, id: &str) -> Result<pb::Task, tonic::Status> {
    s.tasks()
        .await
        .reassign_task(pb::ReassignTaskRequest {
            id: id.into(),
            daemon_id: String::new(),
        })
        .await
        .map(|r| r.into_inner().task.unwrap())
}

/// A task running on a daemon that went away is reassigned at once (no
/// waiting for the grace): it becomes a new attempt on another daemon,
/// whose SpawnTask carries the earlier output as context and numbers on
/// from the stored output. A task on an online daemon is refused.
async fn reassign_moves_a_lost_daemons_task(backend: Backend) {
    let s = start_server(backend).await;
    let (mut a, a_id) = connect_daemon(&s, "lost", 1).await;
    let mut a_session = Session::open(&mut a, &a_id, vec![]).await;
    let task = new_task(&s, "moves").await;
    start(&s, &task.id).await;
    take_and_print(&mut a_session, &task.id, 3).await;

    let err = reassign(&s, &task.id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("online"), "{err:?}");

    drop(a_session);
    let (mut b, b_id) = connect_daemon(&s, "takes over", 1).await;
    let mut b_session = Session::open(&mut b, &b_id, vec![]).await;
    let queued = reassign(&s, &task.id).await.unwrap();
    assert_eq!(queued.attempt, 2);

    let spawn = take_and_print(&mut b_session, &task.id, 2).await;
    assert_eq!(spawn.task.as_ref().unwrap().attempt, 2);
    assert_eq!(
        spawn.first_seq, 4,
        "numbering goes on after the stored output"
    );
    assert!(spawn.prompt.is_empty());
    for needle in ["echo hi", "line 1", "line 3"] {
        assert!(
            spawn.context.contains(needle),
            "{needle:?} in {}",
            spawn.context
        );
    }
    let t = get(&s, &task.id).await;
    assert_eq!((t.status, t.daemon_id), (TaskStatus::Running as i32, b_id));

    let events = events(&s, &task.id).await;
    let path: Vec<(i32, &str)> = events
        .iter()
        .map(|e| (e.to_status, e.reason.as_str()))
        .filter(|(_, r)| r.starts_with("reassigned"))
        .collect();
    assert_eq!(path.len(), 2, "interrupted, then queued: {events:?}");
    assert_eq!(path[0].0, TaskStatus::Interrupted as i32);
    assert_eq!(path[1].0, TaskStatus::Queued as i32);
}

/// A completed task continued with a follow-up prompt: the prompt is
/// recorded as a `user` message, and the new attempt's SpawnTask carries
/// it, the agent's session to resume, and numbering after the prompt.
async fn continue_resumes_a_finished_task(backend: Backend) {
    let s = start_server(backend).await;
    let (mut d, id) = connect_daemon(&s, "agent host", 1).await;
    let mut session = Session::open(&mut d, &id, vec![]).await;
    let task = new_task(&s, "conversation").await;
    start(&s, &task.id).await;
    take_and_print(&mut session, &task.id, 2).await;

    let mut tasks = s.tasks().await;
    let cont = |prompt: &str| pb::ContinueTaskRequest {
        id: task.id.clone(),
        prompt: prompt.into(),
        daemon_id: String::new(),
    };
    let err = tasks.continue_task(cont("too soon")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    session
        .send(Up::Completed(pb::CompleteTaskRequest {
            task_id: task.id.clone(),
            summary: "done".into(),
            resume: Some(pb::AgentResume {
                agent_session_id: "sess-1".into(),
                working_directory: "/work/t".into(),
            }),
            ..Default::default()
        }))
        .await;
    session.next().await; // the final acknowledgement

    let err = tasks.continue_task(cont("  ")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let queued = tasks
        .continue_task(cont("now add tests"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(queued.attempt, 2);

    let spawn = take_and_print(&mut session, &task.id, 1).await;
    assert_eq!(spawn.prompt, "now add tests");
    assert_eq!(spawn.first_seq, 4, "after 2 lines and the prompt");
    let resume = spawn.resume.expect("the agent's session to resume");
    assert_eq!(resume.agent_session_id, "sess-1");
    assert_eq!(resume.working_directory, "/work/t");
    assert!(spawn.context.contains("line 2"), "{}", spawn.context);

    let stored = tasks
        .list_task_messages(pb::ListTaskMessagesRequest {
            task_id: task.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .messages;
    let said = &stored[2];
    assert_eq!(said.seq, 3);
    assert_eq!(said.kind, pb::MessageKind::User as i32);
    assert_eq!(said.content, "now add tests");
    assert_eq!(said.attempt, 2);
}

/// RetryCompletion sends a durable RetryCompletionAction, with the task's
/// action, to the daemon that holds its worktree, and the daemon's answer
/// becomes an event and the changes' completion result. A task without an
/// action, unfinished, or without reported changes is refused.
async fn retry_completion_reaches_the_daemon(backend: Backend) {
    let s = start_server(backend).await;
    let (mut d, id) = connect_daemon(&s, "finisher", 1).await;
    let mut session = Session::open(&mut d, &id, vec![]).await;
    let mut tasks = s.tasks().await;
    let plain = new_task(&s, "no action").await;
    let err = tasks
        .retry_completion(pb::RetryCompletionRequest {
            id: plain.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("no completion action"), "{err:?}");

    let task = tasks
        .create_task(pb::CreateTaskRequest {
            name: "ships".into(),
            repository: "/srv/repo.git".into(),
            completion_action: pb::CompletionAction::Merge as i32,
            target_branch: "release".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let retry = || pb::RetryCompletionRequest {
        id: task.id.clone(),
    };
    let err = tasks.retry_completion(retry()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    start(&s, &task.id).await;
    take_and_print(&mut session, &task.id, 1).await;
    let changes = pb::TaskChanges {
        branch: "taskmesh/0000beef".into(),
        commits: 1,
        files_changed: 1,
        insertions: 3,
        files: vec![pb::FileChange {
            path: "a.txt".into(),
            insertions: 3,
            ..Default::default()
        }],
        completion_state: "failed".into(),
        completion_detail: "merge of taskmesh/0000beef into release refused: conflict in a.txt"
            .into(),
        ..Default::default()
    };
    session
        .send(Up::Changes(pb::ReportTaskChanges {
            task_id: task.id.clone(),
            attempt: 1,
            changes: Some(changes),
            patch: "+one\n+two\n+three\n".into(),
        }))
        .await;
    session
        .send(Up::Completed(pb::CompleteTaskRequest {
            task_id: task.id.clone(),
            ..Default::default()
        }))
        .await;
    session.next().await;
    let got = get(&s, &task.id)
        .await
        .changes
        .expect("GetTask has the changes");
    assert_eq!(
        (got.commits, got.insertions, got.completion_state.as_str()),
        (1, 3, "failed")
    );
    let diff = tasks
        .get_task_diff(pb::GetTaskDiffRequest {
            id: task.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(diff.patch, "+one\n+two\n+three\n");

    let resp = tasks.retry_completion(retry()).await.unwrap().into_inner();
    let cmd = session.command().await;
    assert_eq!(cmd.id, resp.command_id);
    assert_eq!(cmd.task_id, task.id);
    let Some(Kind::RetryCompletionAction(action)) = &cmd.kind else {
        panic!("{cmd:?}");
    };
    assert_eq!(
        (action.action.as_str(), action.target_branch.as_str()),
        ("merge", "release")
    );
    session
        .send(Up::CommandResult(pb::CommandResult {
            command_id: cmd.id.clone(),
            status: pb::CommandResultStatus::Ok as i32,
            message: "merged taskmesh/0000beef into release at 0123456789ab and pushed it".into(),
            ..Default::default()
        }))
        .await;
    let reasons = until_event(&mut tasks, &task.id, "merge done on retry").await;
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("merge failed: merge of taskmesh/0000beef")),
        "{reasons:?}"
    );
    let got = get(&s, &task.id).await.changes.unwrap();
    assert_eq!(got.completion_state, "ok");
    assert!(got.completion_detail.starts_with("merged"), "{got:?}");
}

both_backends!(
    reassign_moves_a_lost_daemons_task,
    continue_resumes_a_finished_task,
    retry_completion_reaches_the_daemon,
);
