//! An orchestrating agent fans its work out with nothing but its own task
//! token, on SQLite and PostgreSQL: a real daemon runs a shell "agent"
//! that uses the `taskmesh` CLI as it is, with the TASKMESH_TOKEN,
//! TASKMESH_SERVER and TASKMESH_TASK_ID its daemon gave it. It creates two
//! subtasks (under its own task without saying so), starts them and reads
//! their output; a task outside its tree is NOT_FOUND to it; it hears about
//! its subtasks on its stdin; the daemon's token is nowhere in its
//! environment; once its attempt ended, its token is refused.

use taskmesh_testkit as common;
use taskmesh_testkit::both_backends;

use common::process::{DaemonProcess, TempDir, bin};
use common::tasks::{create_and_start, get};
use common::watch::Watch;
use common::{Backend, start_server, tasks_at};
use taskmesh_server::model::TokenKind;
use taskmesh_server::pb::{self, TaskStatus};
use tonic::Code;

async fn an_agent_fans_out_with_its_own_token(backend: Backend) {
    let s = start_server(backend).await;
    let daemon_token = s.token_in("default", TokenKind::Daemon).await;
    let bin_dir = bin().parent().unwrap().display().to_string();
    let path = format!("{bin_dir}:{}", std::env::var("PATH").unwrap_or_default());
    let daemon = DaemonProcess::start_with_env(&s.url(), &daemon_token, &[], &[("PATH", &path)]);
    let mut tasks = s.tasks().await;
    let outside = tasks
        .create_task(pb::CreateTaskRequest {
            name: "someone else's".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let keep = TempDir::new("agent-token");
    let saved = keep.0.join("token");
    let plan = format!(
        r#"A=$(taskmesh task create --name child-a --plan 'echo from a' --start)
B=$(taskmesh task create --name child-b --plan 'echo from b' --start)
taskmesh task watch "$A" && taskmesh task watch "$B"
echo "children: $(taskmesh task list | grep -c child-)"
if taskmesh task get {outside} 2>err; then echo "outside: visible"; else echo "outside: $(grep -o 'not found' err | head -1)"; fi
read -r note; echo "note: $note"
echo "daemon or user tokens: $(env | grep -c 'tm[du]_')"
echo "task id matches: $([ "$TASKMESH_TASK_ID" = "$(taskmesh task get "$A" | sed -n 's/^parent: *//p')" ] && echo yes)"
printf '%s' "$TASKMESH_TOKEN" > {saved}"#,
        outside = outside.id,
        saved = saved.display()
    );
    let request = pb::CreateTaskRequest {
        name: "orchestrator".into(),
        plan,
        ..Default::default()
    };
    let parent = create_and_start(&mut tasks, request).await;
    let mut watch = Watch::open(&mut tasks, &parent.id, 0).await;
    watch.until_status(TaskStatus::Completed).await;
    let lines: Vec<&str> = watch.messages.iter().map(|m| m.content.as_str()).collect();
    for want in [
        "from a",
        "from b",
        "children: 2",
        "outside: not found",
        "daemon or user tokens: 0",
        "task id matches: yes",
    ] {
        assert!(lines.contains(&want), "no {want:?} in {lines:?}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("note: [taskmesh] subtask \"child-")),
        "{lines:?}"
    );
    // The notes are in the parent's transcript too, as what it was told.
    assert!(
        watch
            .messages
            .iter()
            .any(|m| m.kind == pb::MessageKind::User as i32
                && m.content.starts_with("[taskmesh] subtask \"child-")),
        "{lines:?}"
    );

    let got = get(&mut tasks, &parent.id).await;
    assert_eq!(got.subtasks.len(), 2);
    for sub in &got.subtasks {
        assert_eq!(sub.status(), TaskStatus::Completed, "{sub:?}");
        assert_eq!(sub.created_by, format!("task:{}", parent.id));
    }

    // The attempt is over: its token is refused, saying so.
    let token = std::fs::read_to_string(&saved).unwrap();
    assert!(token.starts_with("tma_"), "{token}");
    let err = tasks_at(&s.url(), &token)
        .await
        .get_task(pb::GetTaskRequest { id: parent.id })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("has ended"), "{err:?}");
    daemon.stop().await;
}

/// While its attempt runs, an agent's token reaches only its own tree:
/// another task is NOT_FOUND for reading and for steering, what is not an
/// agent's business (deleting) is PERMISSION_DENIED, and its subtasks nest
/// at most 3 levels deep and number at most 100.
async fn an_agent_token_stays_in_its_tree(backend: Backend) {
    let s = start_server(backend).await;
    let (mut d, id) = common::daemon::connect_daemon(&s, "runner", 1).await;
    let mut session = common::daemon::Session::open(&mut d, &id, vec![]).await;
    let task = common::daemon::new_task(&s, "agent").await;
    let outside = common::daemon::new_task(&s, "outside").await;
    let mut tasks = s.tasks().await;
    tasks
        .start_task(pb::StartTaskRequest {
            id: task.id.clone(),
            daemon_id: String::new(),
        })
        .await
        .unwrap();
    let cmd = session.command().await;
    session.ack(&cmd.id).await;
    let token = common::daemon::spawn_of(&cmd).agent_token.clone();
    let mut agent = tasks_at(&s.url(), &token).await;
    let sub = agent
        .create_task(pb::CreateTaskRequest {
            name: "sub".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(sub.parent_task_id, task.id, "under the agent's own task");
    let err = agent
        .get_task(pb::GetTaskRequest {
            id: outside.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = agent
        .stop_task(pb::StopTaskRequest {
            id: outside.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = agent
        .create_task(pb::CreateTaskRequest {
            name: "adopted".into(),
            parent_task_id: outside.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = agent
        .delete_task(pb::DeleteTaskRequest { id: sub.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let listed = agent
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tasks;
    let names: Vec<&str> = listed.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["sub"]);

    // Three levels below its task, and no deeper.
    let mut parent = sub.id.clone();
    for level in 2..=4 {
        let made = agent
            .create_task(pb::CreateTaskRequest {
                name: format!("level {level}"),
                parent_task_id: parent.clone(),
                ..Default::default()
            })
            .await;
        if level <= 3 {
            parent = made.unwrap().into_inner().task.unwrap().id;
        } else {
            let err = made.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
            assert!(err.message().contains("3 levels"), "{err:?}");
        }
    }
    // At most 100 tasks below it in all (3 made so far).
    for i in 3..100 {
        agent
            .create_task(pb::CreateTaskRequest {
                name: format!("many {i}"),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let err = agent
        .create_task(pb::CreateTaskRequest {
            name: "one too many".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    drop(session);
}

both_backends!(
    an_agent_fans_out_with_its_own_token,
    an_agent_token_stays_in_its_tree
);
