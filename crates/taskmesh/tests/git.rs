//! A task's work comes back through git, with a real `taskmesh daemon` and
//! real git (local bare repositories as remotes), on SQLite and PostgreSQL:
//! the agent's commit and what it left uncommitted are pushed to the task's
//! branch, and GetTask, GetTaskDiff and `taskmesh task diff` tell what
//! changed; a merge completion action, and a conflicting one that is
//! retried after the conflict is gone; a retry whose daemon is offline
//! answers UNAVAILABLE naming it; a token in a repository URL is never
//! stored, shown or logged; task directories copied (CloneWorktree), paths
//! looked up (CheckTargetExists) and directories cleaned up.

use taskmesh_testkit as common;
use taskmesh_testkit::both_backends;

use std::path::Path;

use common::git::{IDENTITY, git, remote, show};
use common::process::{DaemonProcess, ServeProcess, TempDir, bin};
use common::tasks::{create_and_start, event_reasons, get, until_event};
use common::watch::{PATIENCE, Watch};
use common::{Backend, Tasks, TestDb, start_server};
use taskmesh_server::model::TokenKind;
use taskmesh_server::pb::{self, TaskStatus};
use tonic::Code;

async fn create(
    tasks: &mut Tasks,
    name: &str,
    plan: &str,
    repo: &Path,
    action: pb::CompletionAction,
) -> pb::Task {
    let request = pb::CreateTaskRequest {
        name: name.into(),
        plan: plan.into(),
        repository: repo.display().to_string(),
        completion_action: action as i32,
        ..Default::default()
    };
    create_and_start(tasks, request).await
}

/// The agent commits one file and leaves another uncommitted; the daemon
/// commits that too, pushes the task's branch, and reports what changed.
async fn a_tasks_work_is_pushed_to_its_branch(backend: Backend) {
    let root = TempDir::new("git-push");
    let bare = remote(&root.0);
    let s = start_server(backend).await;
    let token = s.token_in("default", TokenKind::Daemon).await;
    let daemon = DaemonProcess::start_with_env(&s.url(), &token, &[], IDENTITY);
    let mut tasks = s.tasks().await;
    let plan = "printf 'hello\\n' > new.txt && git add new.txt && git commit -qm 'add new.txt' \
                && printf 'left over\\n' > left.txt";
    let task = create(&mut tasks, "push", plan, &bare, pb::CompletionAction::Push).await;
    Watch::open(&mut tasks, &task.id, 0)
        .await
        .until_status(TaskStatus::Completed)
        .await;

    let got = get(&mut tasks, &task.id).await;
    let c = got.changes.expect("GetTask has the changes");
    let short: String = task.id.replace('-', "");
    let branch = format!("taskmesh/{}", &short[short.len() - 8..]);
    assert_eq!(c.branch, branch);
    assert_eq!(
        (c.commits, c.files_changed, c.insertions, c.deletions),
        (2, 2, 2, 0)
    );
    let files: Vec<&str> = c.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(files, ["left.txt", "new.txt"]);
    assert_eq!(c.completion_state, "ok", "{}", c.completion_detail);
    assert!(
        c.completion_detail
            .starts_with(&format!("pushed {branch} at ")),
        "{}",
        c.completion_detail
    );
    assert_eq!(show(&bare, &branch, "new.txt"), "hello\n");
    assert_eq!(show(&bare, &branch, "left.txt"), "left over\n");
    let log = git(&bare, &["log", "--format=%s", &branch]);
    assert!(log.starts_with("Work of taskmesh task"), "{log}");
    assert!(log.contains("add new.txt"), "{log}");
    assert!(
        event_reasons(&mut tasks, &task.id)
            .await
            .iter()
            .any(|r| r.starts_with("push done: pushed")),
    );

    let diff = tasks
        .get_task_diff(pb::GetTaskDiffRequest {
            id: task.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        diff.patch.contains("+hello") && diff.patch.contains("+left over"),
        "{}",
        diff.patch
    );

    // The CLI prints the same.
    let cli = |extra: &[&str]| {
        let mut args = vec!["task", "diff", task.id.as_str()];
        args.extend_from_slice(extra);
        std::process::Command::new(bin())
            .args(&args)
            .args(["--server", &s.url(), "--token", &s.token])
            .output()
            .expect("run taskmesh task diff")
    };
    let out = cli(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains(&format!("{branch}: 2 commits, 2 files, +2 -0")),
        "{stdout}"
    );
    assert!(stdout.contains("+hello"), "{stdout}");
    let stat = String::from_utf8_lossy(&cli(&["--stat"]).stdout).into_owned();
    assert!(
        stat.contains("new.txt") && !stat.contains("+hello"),
        "{stat}"
    );
    daemon.stop().await;
}

/// A merge completion action merges into the default branch and pushes
/// it; a conflicting one is refused with the file, the task still
/// completed; once the conflict is gone, RetryCompletion merges it; with
/// the daemon gone, a retry says which daemon holds the worktree.
async fn merges_conflicts_and_retries(backend: Backend) {
    let root = TempDir::new("git-merge");
    let bare = remote(&root.0);
    let s = start_server(backend).await;
    let token = s.token_in("default", TokenKind::Daemon).await;
    let daemon = DaemonProcess::start_with_env(&s.url(), &token, &[], IDENTITY);
    let mut tasks = s.tasks().await;

    let plan = "sed -i 's/two/TWO/' a.txt && git commit -qam 'shout two'";
    let clean = create(
        &mut tasks,
        "merge",
        plan,
        &bare,
        pb::CompletionAction::Merge,
    )
    .await;
    Watch::open(&mut tasks, &clean.id, 0)
        .await
        .until_status(TaskStatus::Completed)
        .await;
    let c = get(&mut tasks, &clean.id).await.changes.unwrap();
    assert_eq!(c.completion_state, "ok", "{}", c.completion_detail);
    assert!(
        c.completion_detail.contains("into main"),
        "{}",
        c.completion_detail
    );
    assert_eq!(show(&bare, "main", "a.txt"), "one\nTWO\nthree\n");

    // This one changes line three, and meanwhile someone else changes it
    // on main (the plan pushes that from a clone of its own).
    let other = root.0.join("other");
    let plan = format!(
        "sed -i 's/three/three (task)/' a.txt && git commit -qam 'annotate three' && \
         git clone -q {remote} {other} && cd {other} && sed -i 's/three/3/' a.txt && \
         git commit -qam 'three as a digit' && git push -q origin main",
        remote = bare.display(),
        other = other.display()
    );
    let conflicted = create(
        &mut tasks,
        "conflict",
        &plan,
        &bare,
        pb::CompletionAction::Merge,
    )
    .await;
    Watch::open(&mut tasks, &conflicted.id, 0)
        .await
        .until_status(TaskStatus::Completed)
        .await;
    let c = get(&mut tasks, &conflicted.id).await.changes.unwrap();
    assert_eq!(c.completion_state, "failed");
    assert!(
        c.completion_detail.contains("conflict in a.txt"),
        "{}",
        c.completion_detail
    );
    assert!(
        event_reasons(&mut tasks, &conflicted.id)
            .await
            .iter()
            .any(|r| r.starts_with("merge failed: merge of")),
    );
    assert_eq!(
        show(&bare, "main", "a.txt"),
        "one\nTWO\n3\n",
        "main is untouched"
    );

    // The conflicting commit goes; the retry merges.
    git(&bare, &["update-ref", "refs/heads/main", "main~1"]);
    tasks
        .retry_completion(pb::RetryCompletionRequest {
            id: conflicted.id.clone(),
        })
        .await
        .unwrap();
    let reasons = until_event(&mut tasks, &conflicted.id, "merge done on retry").await;
    let done = reasons
        .iter()
        .find(|r| r.starts_with("merge done on retry"));
    assert!(done.is_some_and(|d| d.contains("into main")), "{reasons:?}");
    assert_eq!(show(&bare, "main", "a.txt"), "one\nTWO\nthree (task)\n");
    let c = get(&mut tasks, &conflicted.id).await.changes.unwrap();
    assert_eq!(c.completion_state, "ok");

    // With its daemon gone, a retry names it.
    let daemon_id = get(&mut tasks, &conflicted.id).await.daemon_id;
    daemon.stop().await;
    let err = tasks
        .retry_completion(pb::RetryCompletionRequest {
            id: conflicted.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(&daemon_id), "{err:?}");
}

/// Git fields that do not go together are refused, saying why.
async fn git_fields_are_checked_together(backend: Backend) {
    let s = start_server(backend).await;
    let mut tasks = s.tasks().await;
    for (request, field, why) in [
        (
            pb::CreateTaskRequest {
                branch: "feature".into(),
                ..Default::default()
            },
            "branch",
            "needs a repository",
        ),
        (
            pb::CreateTaskRequest {
                completion_action: pb::CompletionAction::Push as i32,
                ..Default::default()
            },
            "completion_action",
            "push needs a repository",
        ),
        (
            pb::CreateTaskRequest {
                repository: "/srv/r.git".into(),
                completion_action: pb::CompletionAction::Push as i32,
                target_branch: "main".into(),
                ..Default::default()
            },
            "target_branch",
            "set completion_action to merge",
        ),
        (
            pb::CreateTaskRequest {
                repository: "/srv/r.git".into(),
                branch: "two words".into(),
                ..Default::default()
            },
            "branch",
            "not a branch name",
        ),
    ] {
        let err = tasks
            .create_task(pb::CreateTaskRequest {
                name: "n".into(),
                ..request
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().starts_with(field) && err.message().contains(why),
            "{err:?}"
        );
    }
}

/// A token written into a repository URL is dropped when the task is
/// created: no response carries it and no log line shows it, also when a
/// daemon tries the repository and fails.
async fn a_token_in_a_repository_url_is_never_kept(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (server, log) = ServeProcess::start_logged(&db.url, "127.0.0.1:0", &[], "debug").await;
    let user = server.token.clone().expect("first start prints a token");
    let daemon_token = common::process::create_token(&db.url, "daemon").await;
    let daemon = DaemonProcess::start_with_env(&server.url(), &daemon_token, &[], IDENTITY);
    let mut tasks = common::tasks_at(&server.url(), &user).await;
    let secrets = ["s3cr3t-pass", "ghp_16C7e42F292c6912E7710c838347Ae178B4a"];
    let mut ids = Vec::new();
    for (url, stored) in [
        (
            "https://robot:s3cr3t-pass@git.invalid/team/repo.git",
            "https://git.invalid/team/repo.git",
        ),
        (
            "https://ghp_16C7e42F292c6912E7710c838347Ae178B4a@git.invalid/team/repo.git",
            "https://git.invalid/team/repo.git",
        ),
        (
            "ssh://git:s3cr3t-pass@git.invalid/repo.git",
            "ssh://git@git.invalid/repo.git",
        ),
    ] {
        let task = tasks
            .create_task(pb::CreateTaskRequest {
                name: "private".into(),
                plan: "true".into(),
                repository: url.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        assert_eq!(task.repository, stored);
        ids.push(task.id);
    }
    tasks
        .start_task(pb::StartTaskRequest {
            id: ids[0].clone(),
            daemon_id: String::new(),
        })
        .await
        .unwrap();
    let failed = Watch::open(&mut tasks, &ids[0], 0)
        .await
        .until_status(TaskStatus::Failed)
        .await;
    assert!(
        failed.status_reason.contains("git clone failed"),
        "{}",
        failed.status_reason
    );
    let listed = tasks
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    let got = get(&mut tasks, &ids[1]).await;
    let shown = format!("{listed:?} {got:?} {failed:?}");
    daemon.stop().await;
    server.terminate().await;
    let lines = log.rest().await;
    assert!(
        lines.iter().any(|l| l.contains("CreateTask")),
        "the log was read"
    );
    for secret in secrets {
        assert!(!shown.contains(secret), "a response shows {secret}");
        let leaked: Vec<&String> = lines.iter().filter(|l| l.contains(secret)).collect();
        assert!(leaked.is_empty(), "logged: {leaked:?}");
    }
}

/// A finished task's directory is copied elsewhere on its daemon's machine
/// with its git state; paths there are looked up; GetDaemon tells where
/// the daemon keeps its directories; a directory unused for
/// `--keep-worktrees` is removed while one with a running agent stays; a
/// deleted task's goes at once; with the daemon gone, both calls name it.
async fn worktrees_are_copied_checked_and_cleaned_up(backend: Backend) {
    let root = TempDir::new("worktrees");
    let bare = remote(&root.0);
    let targets = root.0.join("targets");
    std::fs::create_dir_all(&targets).unwrap();
    let s = start_server(backend).await;
    let token = s.token_in("default", TokenKind::Daemon).await;
    let targets_arg = targets.display().to_string();
    let extra = ["--keep-worktrees", "2s", "--clone-target", &targets_arg];
    let (mut daemon, mut log) = DaemonProcess::start_logged(&s.url(), &token, &extra, "info");
    let work = daemon.dir.0.join("work");
    let mut tasks = s.tasks().await;
    let plan = "echo hi > x.txt";
    let done = create(
        &mut tasks,
        "copied",
        plan,
        &bare,
        pb::CompletionAction::None,
    )
    .await;
    Watch::open(&mut tasks, &done.id, 0)
        .await
        .until_status(TaskStatus::Completed)
        .await;
    let daemon_id = get(&mut tasks, &done.id).await.daemon_id;
    let mut ws = s.workspaces().await;
    let d = ws
        .get_daemon(pb::GetDaemonRequest {
            id: daemon_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .daemon
        .unwrap();
    assert_eq!(Path::new(&d.work_dir), work);
    assert_eq!(d.suggested_targets, std::slice::from_ref(&targets_arg));

    let copy = targets.join("copy");
    let check = |path: &Path| pb::CheckTargetExistsRequest {
        daemon_id: daemon_id.clone(),
        path: path.display().to_string(),
    };
    let found = ws
        .check_target_exists(check(&copy))
        .await
        .unwrap()
        .into_inner();
    assert!(!found.exists);
    let cloned = tasks
        .clone_worktree(pb::CloneWorktreeRequest {
            id: done.id.clone(),
            path: copy.display().to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cloned.detail.starts_with("copied"), "{}", cloned.detail);
    assert_eq!(std::fs::read_to_string(copy.join("x.txt")).unwrap(), "hi\n");
    assert!(git(&copy, &["log", "--format=%s"]).starts_with("Work of taskmesh task"));
    let found = ws
        .check_target_exists(check(&copy))
        .await
        .unwrap()
        .into_inner();
    assert!(found.exists && found.is_directory);
    let err = tasks
        .clone_worktree(pb::CloneWorktreeRequest {
            id: done.id.clone(),
            path: copy.display().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not an empty directory"), "{err:?}");

    // An agent that waits for a line keeps its directory through sweeps;
    // the finished task's goes once unused for 2 s.
    let waiting = create(
        &mut tasks,
        "waits",
        "read line; echo got $line",
        &bare,
        pb::CompletionAction::None,
    )
    .await;
    let mut watch = Watch::open(&mut tasks, &waiting.id, 0).await;
    watch.until_status(TaskStatus::Running).await;
    log.wait_for(&["removed the task's directory", &done.id], PATIENCE)
        .await;
    assert!(!work.join(&done.id).exists());
    log.wait_for(&["worktree sweep", "in_use=1"], PATIENCE)
        .await;
    assert!(
        work.join(&waiting.id).is_dir(),
        "a running agent's directory stays"
    );
    tasks
        .send_message(pb::SendMessageRequest {
            task_id: waiting.id.clone(),
            text: "go".into(),
        })
        .await
        .unwrap();
    watch.until_status(TaskStatus::Completed).await;
    tasks
        .delete_task(pb::DeleteTaskRequest {
            id: waiting.id.clone(),
        })
        .await
        .unwrap();
    log.wait_for(
        &["removed the deleted task's directory", &waiting.id],
        PATIENCE,
    )
    .await;
    assert!(!work.join(&waiting.id).exists());

    daemon.signal(libc::SIGTERM);
    assert!(daemon.exit_status(PATIENCE).await.success());
    let err = tasks
        .clone_worktree(pb::CloneWorktreeRequest {
            id: done.id.clone(),
            path: targets.join("again").display().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(&daemon_id), "{err:?}");
    let err = ws.check_target_exists(check(&copy)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}

both_backends!(
    worktrees_are_copied_checked_and_cleaned_up,
    a_tasks_work_is_pushed_to_its_branch,
    merges_conflicts_and_retries,
    git_fields_are_checked_together,
    a_token_in_a_repository_url_is_never_kept,
);
