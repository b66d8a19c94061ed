//! TaskService and WorkspaceService through real gRPC clients, on SQLite and
//! PostgreSQL.

use taskmesh_testkit as common;
use taskmesh_testkit::both_backends;

use common::{Backend, start_server};
use taskmesh_server::model::TokenKind;
use taskmesh_server::pb::{self, TaskStatus};
use tonic::Code;

fn create(name: &str) -> pb::CreateTaskRequest {
    pb::CreateTaskRequest {
        name: name.into(),
        plan: format!("echo {name}"),
        ..Default::default()
    }
}

fn status(t: &pb::Task) -> TaskStatus {
    TaskStatus::try_from(t.status).unwrap()
}

fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needle: &str) {
    let err = r.expect_err("expected an error");
    assert_eq!(err.code(), code, "{err:?}");
    assert!(
        err.message().contains(needle),
        "message {:?} should mention {needle:?}",
        err.message()
    );
}

async fn lifecycle(backend: Backend) {
    let s = start_server(backend).await;
    let mut c = s.tasks().await;

    let parent = c
        .create_task(create("parent"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(status(&parent), TaskStatus::Pending);
    assert_eq!((parent.version, parent.depth, parent.attempt), (1, 0, 0));
    assert_eq!(parent.created_by, "user:admin");

    let child = c
        .create_task(pb::CreateTaskRequest {
            parent_task_id: parent.id.clone(),
            runtime: "claude".into(),
            ..create("child")
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!((child.depth, child.runtime.as_str()), (1, "claude"));
    assert_eq!(child.parent_task_id, parent.id);

    let got = c
        .get_task(pb::GetTaskRequest {
            id: parent.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(got.subtasks.len(), 1);
    assert_eq!(got.subtasks[0].id, child.id);

    // Start: pending -> queued, a first attempt.
    let started = c
        .start_task(pb::StartTaskRequest {
            id: parent.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(status(&started), TaskStatus::Queued);
    assert_eq!((started.attempt, started.version), (1, 2));

    // Starting a queued task again is illegal and names the current state.
    assert_code(
        c.start_task(pb::StartTaskRequest {
            id: parent.id.clone(),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        "queued",
    );

    let stopped = c
        .stop_task(pb::StopTaskRequest {
            id: parent.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(status(&stopped), TaskStatus::Cancelled);
    assert!(stopped.end_time.is_some());
    // Stopping is idempotent: a second stop changes nothing and says so.
    let again = c
        .stop_task(pb::StopTaskRequest {
            id: parent.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.outcome(), pb::StopOutcome::AlreadyCancelled);
    assert_eq!(again.task.unwrap().version, stopped.version);

    // A restart is a new attempt.
    let again = c
        .start_task(pb::StartTaskRequest {
            id: parent.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!((status(&again), again.attempt), (TaskStatus::Queued, 2));

    // The audit trail has every transition with who caused it.
    let events = c
        .list_task_events(pb::ListTaskEventsRequest {
            task_id: parent.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let trail: Vec<_> = events
        .iter()
        .map(|e| {
            (
                TaskStatus::try_from(e.from_status).unwrap(),
                TaskStatus::try_from(e.to_status).unwrap(),
                e.attempt,
            )
        })
        .collect();
    assert_eq!(
        trail,
        vec![
            (TaskStatus::Unspecified, TaskStatus::Pending, 0),
            (TaskStatus::Pending, TaskStatus::Queued, 1),
            (TaskStatus::Queued, TaskStatus::Cancelled, 1),
            (TaskStatus::Cancelled, TaskStatus::Queued, 2),
        ]
    );
    assert!(events.iter().all(|e| e.actor == "user:admin"));

    // Events page.
    let page = c
        .list_task_events(pb::ListTaskEventsRequest {
            task_id: parent.id.clone(),
            page_size: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.events.len(), 3);
    let rest = c
        .list_task_events(pb::ListTaskEventsRequest {
            task_id: parent.id.clone(),
            page_size: 3,
            page_token: page.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.events.len(), 1);
    assert!(rest.next_page_token.is_empty());

    // Delete takes the subtasks along.
    c.delete_task(pb::DeleteTaskRequest {
        id: parent.id.clone(),
    })
    .await
    .unwrap();
    for id in [&parent.id, &child.id] {
        assert_code(
            c.get_task(pb::GetTaskRequest { id: id.clone() }).await,
            Code::NotFound,
            id,
        );
    }
    s.stop().await;
}

async fn update_with_versions(backend: Backend) {
    let s = start_server(backend).await;
    let mut c = s.tasks().await;
    let t = c
        .create_task(create("v"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();

    let update = |name: &str, version: i64, paths: &[&str]| pb::UpdateTaskRequest {
        task: Some(pb::Task {
            id: t.id.clone(),
            name: name.into(),
            plan: "new plan".into(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
        expected_version: version,
    };
    let u = c
        .update_task(update("renamed", 1, &["name"]))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!((u.name.as_str(), u.version), ("renamed", 2));
    assert_eq!(u.plan, "echo v", "fields outside the mask are kept");

    assert_code(
        c.update_task(update("stale", 1, &["name"])).await,
        Code::Aborted,
        "expected version 1, actual version 2",
    );
    // Version 0 means "whatever the current version is".
    let u = c
        .update_task(update("any", 0, &["name", "plan"]))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(
        (u.name.as_str(), u.plan.as_str(), u.version),
        ("any", "new plan", 3)
    );

    assert_code(
        c.update_task(update("x", 0, &[])).await,
        Code::InvalidArgument,
        "update_mask",
    );
    assert_code(
        c.update_task(update("x", 0, &["status"])).await,
        Code::InvalidArgument,
        "update_mask",
    );
    assert_code(
        c.update_task(update(" ", 0, &["name"])).await,
        Code::InvalidArgument,
        "task.name",
    );

    // Concurrent updates with the same expected version: exactly one wins.
    let mut handles = Vec::new();
    for i in 0..8 {
        let mut c = c.clone();
        let req = update(&format!("racer-{i}"), 3, &["name"]);
        handles.push(tokio::spawn(async move { c.update_task(req).await }));
    }
    let mut won = 0;
    for h in handles {
        match h.await.unwrap() {
            Ok(_) => won += 1,
            Err(e) => assert_eq!(e.code(), Code::Aborted, "{e:?}"),
        }
    }
    assert_eq!(won, 1);
    let final_task = c
        .get_task(pb::GetTaskRequest { id: t.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(final_task.version, 4);
    s.stop().await;
}

async fn list_filters_and_pages(backend: Backend) {
    let s = start_server(backend).await;
    let mut c = s.tasks().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(
            c.create_task(create(&format!("t{i}")))
                .await
                .unwrap()
                .into_inner()
                .task
                .unwrap()
                .id,
        );
    }
    c.start_task(pb::StartTaskRequest {
        id: ids[2].clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.start_task(pb::StartTaskRequest {
        id: ids[5].clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let sub = c
        .create_task(pb::CreateTaskRequest {
            parent_task_id: ids[0].clone(),
            ..create("sub")
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();

    // Pages of 3 walk all 8 tasks newest first, each once.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_tasks(pb::ListTasksRequest {
                page_size: 3,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.tasks.len() <= 3);
        seen.extend(page.tasks.into_iter().map(|t| t.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut expected: Vec<_> = ids.iter().cloned().chain([sub.id.clone()]).collect();
    expected.reverse();
    assert_eq!(seen, expected);

    let queued = c
        .list_tasks(pb::ListTasksRequest {
            statuses: vec![TaskStatus::Queued as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(
        queued.iter().map(|t| &t.id).collect::<Vec<_>>(),
        vec![&ids[5], &ids[2]]
    );

    let children = c
        .list_tasks(pb::ListTasksRequest {
            parent_task_id: ids[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(children.len(), 1);
    assert_eq!(children[0].id, sub.id);

    let by_workspace = c
        .list_tasks(pb::ListTasksRequest {
            workspace: "default".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(by_workspace.len(), 8);
    s.stop().await;
}

async fn bad_input_is_invalid_argument(backend: Backend) {
    let s = start_server(backend).await;
    let mut c = s.tasks().await;
    let keep = c
        .create_task(create("keep"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();

    assert_code(
        c.get_task(pb::GetTaskRequest { id: "nope".into() }).await,
        Code::InvalidArgument,
        "id",
    );
    assert_code(
        c.get_task(pb::GetTaskRequest { id: String::new() }).await,
        Code::InvalidArgument,
        "id",
    );
    assert_code(
        c.create_task(create("")).await,
        Code::InvalidArgument,
        "name",
    );
    assert_code(
        c.create_task(create("  \t ")).await,
        Code::InvalidArgument,
        "name",
    );
    assert_code(
        c.create_task(create(&"n".repeat(300))).await,
        Code::InvalidArgument,
        "name",
    );
    assert_code(
        c.create_task(pb::CreateTaskRequest {
            plan: "x".repeat((1 << 20) + 1),
            ..create("big")
        })
        .await,
        Code::InvalidArgument,
        "plan",
    );
    // Exactly 1 MiB is fine.
    c.create_task(pb::CreateTaskRequest {
        plan: "x".repeat(1 << 20),
        ..create("big")
    })
    .await
    .unwrap();
    assert_code(
        c.create_task(pb::CreateTaskRequest {
            runtime: "Claude Code".into(),
            ..create("r")
        })
        .await,
        Code::InvalidArgument,
        "runtime",
    );
    assert_code(
        c.create_task(pb::CreateTaskRequest {
            parent_task_id: "123".into(),
            ..create("p")
        })
        .await,
        Code::InvalidArgument,
        "parent_task_id",
    );
    assert_code(
        c.create_task(pb::CreateTaskRequest {
            parent_task_id: uuid::Uuid::new_v4().to_string(),
            ..create("p")
        })
        .await,
        Code::NotFound,
        "not found",
    );
    assert_code(
        c.list_tasks(pb::ListTasksRequest {
            statuses: vec![42],
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "statuses",
    );
    assert_code(
        c.list_tasks(pb::ListTasksRequest {
            statuses: vec![0],
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "statuses",
    );
    for size in [-1, 1001] {
        assert_code(
            c.list_tasks(pb::ListTasksRequest {
                page_size: size,
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            "page_size",
        );
    }
    assert_code(
        c.list_tasks(pb::ListTasksRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "page_token",
    );
    assert_code(
        c.list_task_events(pb::ListTaskEventsRequest {
            task_id: keep.id.clone(),
            page_token: "x".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "page_token",
    );
    assert_code(
        c.list_task_messages(pb::ListTaskMessagesRequest {
            task_id: keep.id.clone(),
            limit: 20_000,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "limit",
    );
    assert_code(
        c.list_task_messages(pb::ListTaskMessagesRequest {
            task_id: keep.id.clone(),
            since_seq: -5,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "since_seq",
    );
    assert_code(
        c.update_task(pb::UpdateTaskRequest::default()).await,
        Code::InvalidArgument,
        "task",
    );
    assert_code(
        c.start_task(pb::StartTaskRequest {
            id: keep.id.clone(),
            daemon_id: "zz".into(),
        })
        .await,
        Code::InvalidArgument,
        "daemon_id",
    );
    assert_code(
        c.start_task(pb::StartTaskRequest {
            id: keep.id.clone(),
            daemon_id: uuid::Uuid::new_v4().to_string(),
        })
        .await,
        Code::NotFound,
        "daemon",
    );
    assert_code(
        c.list_tasks(pb::ListTasksRequest {
            workspace: "elsewhere".into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "workspace",
    );

    // Nothing above changed the stored task.
    let after = c
        .get_task(pb::GetTaskRequest {
            id: keep.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(
        after,
        pb::Task {
            subtasks: vec![],
            ..keep
        }
    );
    s.stop().await;
}

async fn authentication(backend: Backend) {
    let s = start_server(backend).await;
    let list = pb::ListTasksRequest::default();

    let mut anonymous = s.tasks_as(None).await;
    assert_code(
        anonymous.list_tasks(list.clone()).await,
        Code::Unauthenticated,
        "authorization",
    );
    let mut wrong = s.tasks_as(Some("tmu_not-a-real-token")).await;
    assert_code(
        wrong.list_tasks(list.clone()).await,
        Code::Unauthenticated,
        "token",
    );

    // A new token works; revoked, it stops at once.
    let mut ws = s.workspaces().await;
    let created = ws
        .create_token(pb::CreateTokenRequest {
            kind: pb::TokenKind::User as i32,
            name: "laptop".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.secret.starts_with("tmu_"));
    let mut laptop = s.tasks_as(Some(&created.secret)).await;
    laptop.list_tasks(list.clone()).await.unwrap();

    let tokens = ws
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(tokens.len(), 2);
    let token_id = created.token.unwrap().id;
    assert!(
        tokens
            .iter()
            .any(|t| t.id == token_id && t.name == "laptop" && t.revoke_time.is_none())
    );

    let revoked = ws
        .revoke_token(pb::RevokeTokenRequest {
            id: token_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    assert!(revoked.revoke_time.is_some());
    assert_code(
        laptop.list_tasks(list.clone()).await,
        Code::Unauthenticated,
        "revoked",
    );

    assert_code(
        ws.create_token(pb::CreateTokenRequest {
            kind: 7,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "kind",
    );
    assert_code(
        ws.create_token(pb::CreateTokenRequest::default()).await,
        Code::InvalidArgument,
        "kind",
    );

    // Daemon tokens cannot administer the workspace.
    let daemon = ws
        .create_token(pb::CreateTokenRequest {
            kind: pb::TokenKind::Daemon as i32,
            name: "box".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    assert!(daemon.starts_with("tmd_"));
    let mut as_daemon = s.workspaces_as(Some(&daemon)).await;
    assert_code(
        as_daemon
            .list_tokens(pb::ListTokensRequest::default())
            .await,
        Code::PermissionDenied,
        "user token",
    );
    s.stop().await;
}

/// A token of another workspace sees none of this workspace's objects: every
/// task RPC answers NOT_FOUND, and lists leave them out.
async fn tenancy(backend: Backend) {
    let s = start_server(backend).await;
    let mut mine = s.tasks().await;
    let task = mine
        .create_task(create("secret"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let id = task.id.clone();

    // Another workspace's task is NOT_FOUND for every token that may call
    // TaskService; a viewer's writes are refused before that.
    for kind in [TokenKind::User, TokenKind::Viewer] {
        let other = s.token_in("other", kind).await;
        let mut c = s.tasks_as(Some(&other)).await;
        let nf = Code::NotFound;
        let (wc, wn) = match kind {
            TokenKind::Viewer => (Code::PermissionDenied, "viewer"),
            _ => (nf, id.as_str()),
        };
        assert_code(
            c.get_task(pb::GetTaskRequest { id: id.clone() }).await,
            nf,
            &id,
        );
        assert_code(
            c.update_task(pb::UpdateTaskRequest {
                task: Some(pb::Task {
                    id: id.clone(),
                    name: "stolen".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["name".into()],
                }),
                expected_version: 0,
            })
            .await,
            wc,
            wn,
        );
        assert_code(
            c.start_task(pb::StartTaskRequest {
                id: id.clone(),
                ..Default::default()
            })
            .await,
            wc,
            wn,
        );
        assert_code(
            c.stop_task(pb::StopTaskRequest { id: id.clone() }).await,
            wc,
            wn,
        );
        assert_code(
            c.delete_task(pb::DeleteTaskRequest { id: id.clone() })
                .await,
            wc,
            wn,
        );
        assert_code(
            c.list_task_events(pb::ListTaskEventsRequest {
                task_id: id.clone(),
                ..Default::default()
            })
            .await,
            nf,
            &id,
        );
        assert_code(
            c.list_task_messages(pb::ListTaskMessagesRequest {
                task_id: id.clone(),
                ..Default::default()
            })
            .await,
            nf,
            &id,
        );
        assert_code(
            c.get_task_usage(pb::GetTaskUsageRequest {
                task_id: id.clone(),
            })
            .await,
            nf,
            &id,
        );
        assert_code(
            c.create_task(pb::CreateTaskRequest {
                parent_task_id: id.clone(),
                ..create("sub")
            })
            .await,
            wc,
            wn,
        );
        assert_code(
            c.list_tasks(pb::ListTasksRequest {
                workspace: "default".into(),
                ..Default::default()
            })
            .await,
            nf,
            "workspace",
        );
        let theirs = c
            .list_tasks(pb::ListTasksRequest::default())
            .await
            .unwrap()
            .into_inner()
            .tasks;
        assert!(theirs.is_empty());
    }
    // Nothing was touched.
    let after = mine
        .get_task(pb::GetTaskRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(after, task);
    s.stop().await;
}

async fn workspaces_and_daemons(backend: Backend) {
    let s = start_server(backend).await;
    let mut ws = s.workspaces().await;
    let list = ws
        .list_workspaces(pb::ListWorkspacesRequest {})
        .await
        .unwrap()
        .into_inner()
        .workspaces;
    assert_eq!(
        list.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
        ["default"]
    );

    let created = ws
        .create_workspace(pb::CreateWorkspaceRequest {
            name: "team-b".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    assert_code(
        ws.create_workspace(pb::CreateWorkspaceRequest {
            name: "team-b".into(),
        })
        .await,
        Code::AlreadyExists,
        "team-b",
    );
    assert_code(
        ws.create_workspace(pb::CreateWorkspaceRequest {
            name: "no spaces".into(),
        })
        .await,
        Code::InvalidArgument,
        "name",
    );

    // The caller now sees two workspaces: an unnamed workspace is ambiguous.
    let mut c = s.tasks().await;
    assert_code(
        c.list_tasks(pb::ListTasksRequest::default()).await,
        Code::InvalidArgument,
        "workspace",
    );
    let t = c
        .create_task(pb::CreateTaskRequest {
            workspace: created.id.clone(),
            ..create("in-b")
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(t.workspace_id, created.id);
    let in_b = c
        .list_tasks(pb::ListTasksRequest {
            workspace: "team-b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(in_b.len(), 1);

    let daemons = ws
        .list_daemons(pb::ListDaemonsRequest {
            workspace: "default".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(daemons.daemons.is_empty() && daemons.next_page_token.is_empty());
    assert_code(
        ws.get_daemon(pb::GetDaemonRequest {
            id: uuid::Uuid::new_v4().to_string(),
        })
        .await,
        Code::NotFound,
        "daemon",
    );
    s.stop().await;
}

both_backends!(
    lifecycle,
    update_with_versions,
    list_filters_and_pages,
    bad_input_is_invalid_argument,
    authentication,
    tenancy,
    workspaces_and_daemons,
);
