//! A task's repository: its clone and working branch, what an attempt
//! changed, and the completion action (push, or merge and push).
//!
//! The daemon's own git configuration and credential helpers give access;
//! git never prompts (`GIT_TERMINAL_PROMPT=0`). Where the task's branch
//! started is kept in the clone's config (`taskmesh.base`), so every
//! attempt's diff covers all the task's work.

use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::process::{describe_status, exit_code_of, scrub_env};
use super::{Control, RunnerEvent, StartError, TaskSpec};
use crate::pb::{CompletionAction, FileChange, TaskChanges};

/// Largest patch reported; longer ones are cut (and say so).
pub(crate) const MAX_PATCH_BYTES: usize = 1 << 20;
/// Most files listed; the counts cover all of them.
const MAX_FILES: usize = 1000;
/// Longest git error kept in a failure reason.
const MAX_GIT_ERROR_CHARS: usize = 2000;
/// History fetched with each branch: enough to merge recent work.
const DEPTH: &str = "50";

/// The working branch of a task: its own, or `taskmesh/<short id>`.
pub(crate) fn working_branch(task_id: &str, branch: &str) -> String {
    if !branch.is_empty() {
        return branch.to_owned();
    }
    let short: String = task_id.chars().filter(|c| *c != '-').collect();
    format!("taskmesh/{}", &short[short.len().saturating_sub(8)..])
}

/// Runs git in `dir` and answers its stdout, or why it failed (its
/// stderr's tail).
async fn git(dir: &Path, args: &[&str], hidden: &[String]) -> Result<String, String> {
    let mut cmd = Command::new("git");
    scrub_env(&mut cmd, hidden);
    cmd.args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = cmd
        .output()
        .await
        .map_err(|e| format!("running git failed: {e}"))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(format!(
        "git {} failed ({}): {}",
        args.first().unwrap_or(&""),
        describe_status(out.status),
        tail(&String::from_utf8_lossy(&out.stderr))
    ))
}

fn tail(text: &str) -> String {
    let text = text.trim();
    let skip = text.chars().count().saturating_sub(MAX_GIT_ERROR_CHARS);
    text.chars().skip(skip).collect()
}

/// Clones the repository and checks out the task's working branch: the
/// remote's when it has one, else a new one from the default branch. An
/// interrupt cancels it.
pub(super) async fn prepare(
    spec: &TaskSpec,
    control: &mut mpsc::Receiver<Control>,
    events: &mpsc::Sender<RunnerEvent>,
) -> Result<(), StartError> {
    let setup = async {
        clone(spec).await?;
        let dir = spec.dir.as_path();
        let hidden = &spec.hidden_secrets;
        let branch = spec.branch.as_str();
        let fetch = format!("+refs/heads/{branch}:refs/remotes/origin/{branch}");
        let remote = git(
            dir,
            &["fetch", "-q", "--depth", DEPTH, "origin", &fetch],
            hidden,
        )
        .await;
        let checkout = match remote {
            Ok(_) => {
                let start = format!("origin/{branch}");
                git(dir, &["checkout", "-q", "-B", branch, &start], hidden).await
            }
            Err(_) => {
                if git(dir, &["rev-parse", "--verify", "-q", "HEAD"], hidden)
                    .await
                    .is_err()
                {
                    return Err(StartError::new(format!(
                        "the repository's default branch has no commit to start {branch} from; push one first, or name a branch it has"
                    )));
                }
                git(dir, &["checkout", "-q", "-b", branch], hidden).await
            }
        };
        checkout.map_err(StartError::new)?;
        let base = git(dir, &["rev-parse", "HEAD"], hidden)
            .await
            .map_err(StartError::new)?;
        git(dir, &["config", "taskmesh.base", base.trim()], hidden)
            .await
            .map_err(StartError::new)?;
        info!(branch, base = base.trim(), "working branch ready");
        Ok(())
    };
    tokio::pin!(setup);
    loop {
        tokio::select! {
            done = &mut setup => return done,
            ctrl = control.recv() => match ctrl {
                Some(Control::Input { command_id, .. } | Control::Decide { command_id, .. }) => {
                    let _ = events
                        .send(RunnerEvent::CommandDone {
                            command_id,
                            result: Err("the agent has not started yet (cloning)".into()),
                        })
                        .await;
                }
                // Dropping `setup` kills git (kill_on_drop).
                Some(Control::Interrupt { .. } | Control::Kill) | None => {
                    return Err(StartError::new("interrupted"));
                }
            }
        }
    }
}

/// `git clone --depth 50 -- <repository> <dir>`.
async fn clone(spec: &TaskSpec) -> Result<(), StartError> {
    let mut cmd = Command::new("git");
    scrub_env(&mut cmd, &spec.hidden_secrets);
    // `--` keeps a repository string from the server from being read as an
    // option (such as --upload-pack).
    cmd.args(["clone", "-q", "--depth", DEPTH, "--"])
        .arg(&spec.repository)
        .arg(&spec.dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    info!(repository = %spec.repository, branch = %spec.branch, "cloning");
    let out = cmd
        .output()
        .await
        .map_err(|e| StartError::new(format!("running git clone failed: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(StartError {
        reason: format!(
            "git clone failed ({}): {}",
            describe_status(out.status),
            tail(&String::from_utf8_lossy(&out.stderr))
        ),
        exit_code: exit_code_of(out.status),
    })
}

/// What the attempt changed: what the agent left uncommitted is committed
/// first when it completed, then the branch is compared with its base.
pub(super) async fn changes(
    dir: &Path,
    task_id: &str,
    attempt: i32,
    completed: bool,
    hidden: &[String],
) -> Result<(TaskChanges, String), String> {
    let base = git(dir, &["config", "--get", "taskmesh.base"], hidden).await?;
    let base = base.trim().to_owned();
    let branch = git(dir, &["symbolic-ref", "--short", "HEAD"], hidden)
        .await
        .unwrap_or_default()
        .trim()
        .to_owned();
    git(dir, &["add", "-A"], hidden).await?;
    let staged = git(dir, &["diff", "--cached", "--quiet"], hidden)
        .await
        .is_err();
    if completed && staged {
        let message = format!("Work of taskmesh task {task_id} (attempt {attempt})");
        commit(dir, &message, hidden).await?;
    }
    let head = git(dir, &["rev-parse", "HEAD"], hidden).await?;
    let range = format!("{base}..HEAD");
    let commits = git(dir, &["rev-list", "--count", &range], hidden).await?;
    let numstat = git(dir, &["diff", "--cached", "--numstat", "-z", &base], hidden).await?;
    let patch = git(dir, &["diff", "--cached", &base], hidden).await?;
    let files = parse_numstat_z(&numstat);
    let (patch, cut) = cut_patch(patch);
    let changes = TaskChanges {
        attempt,
        branch,
        base_commit: base,
        head_commit: head.trim().to_owned(),
        commits: commits.trim().parse().unwrap_or(0),
        files_changed: i32::try_from(files.len()).unwrap_or(i32::MAX),
        insertions: files.iter().map(|f| f.insertions).sum(),
        deletions: files.iter().map(|f| f.deletions).sum(),
        files: files.into_iter().take(MAX_FILES).collect(),
        patch_truncated: cut,
        ..Default::default()
    };
    Ok((changes, patch))
}

/// `-c user.name=… -c user.email=…` when git knows no one to commit as
/// (no `user.email` in the daemon's git configuration, nor the
/// environment's author and committer), so its own commits still work.
async fn identity(dir: &Path, hidden: &[String]) -> &'static [&'static str] {
    let from_env = std::env::var_os("GIT_AUTHOR_EMAIL").is_some()
        && std::env::var_os("GIT_COMMITTER_EMAIL").is_some();
    if from_env || git(dir, &["config", "user.email"], hidden).await.is_ok() {
        return &[];
    }
    &[
        "-c",
        "user.name=taskmesh",
        "-c",
        "user.email=taskmesh@localhost",
    ]
}

/// Commits what is staged, as the daemon's git user or, when it has none,
/// as "taskmesh".
async fn commit(dir: &Path, message: &str, hidden: &[String]) -> Result<(), String> {
    let mut args = identity(dir, hidden).await.to_vec();
    args.extend(["commit", "-q", "--no-verify", "-m", message]);
    git(dir, &args, hidden).await.map(|_| ())
}

/// `git diff --numstat -z`: "added\tdeleted\tpath\0", "-" for binary.
fn parse_numstat_z(text: &str) -> Vec<FileChange> {
    text.split('\0')
        .filter(|e| !e.is_empty())
        .filter_map(|entry| {
            let mut parts = entry.splitn(3, '\t');
            let (added, deleted, path) = (parts.next()?, parts.next()?, parts.next()?);
            Some(FileChange {
                path: path.to_owned(),
                insertions: added.parse().unwrap_or(0),
                deletions: deleted.parse().unwrap_or(0),
                binary: added == "-",
            })
        })
        .collect()
}

/// The patch cut at [`MAX_PATCH_BYTES`] on a line boundary.
fn cut_patch(patch: String) -> (String, bool) {
    if patch.len() <= MAX_PATCH_BYTES {
        return (patch, false);
    }
    let mut end = MAX_PATCH_BYTES;
    while !patch.is_char_boundary(end) {
        end -= 1;
    }
    let end = patch[..end].rfind('\n').map_or(end, |i| i + 1);
    (patch[..end].to_owned(), true)
}

/// Runs the completion action in the task's clone: `Ok(what it did)` or
/// `Err(why not)`. The clone is left on the working branch either way.
pub(crate) async fn complete(
    dir: &Path,
    action: CompletionAction,
    target: &str,
    hidden: &[String],
) -> Result<String, String> {
    let branch = git(dir, &["symbolic-ref", "--short", "HEAD"], hidden)
        .await
        .map_err(|e| format!("the worktree is not on its branch: {e}"))?;
    let branch = branch.trim();
    match action {
        CompletionAction::Push => {
            let refspec = format!("HEAD:refs/heads/{branch}");
            git(dir, &["push", "-q", "origin", &refspec], hidden).await?;
            let head = short_head(dir, hidden).await;
            Ok(format!("pushed {branch} at {head}"))
        }
        CompletionAction::Merge => {
            let target = match target {
                "" => default_branch(dir, hidden).await?,
                t => t.to_owned(),
            };
            let merged = merge(dir, branch, &target, hidden).await;
            // Back to the working branch, whatever happened.
            if let Err(e) = git(dir, &["checkout", "-q", "-f", branch], hidden).await {
                warn!(error = %e, "returning to the working branch failed");
            }
            merged
        }
        CompletionAction::None | CompletionAction::Unspecified => Ok(String::new()),
    }
}

async fn short_head(dir: &Path, hidden: &[String]) -> String {
    git(dir, &["rev-parse", "--short=12", "HEAD"], hidden)
        .await
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The remote's default branch (what `origin/HEAD` names).
async fn default_branch(dir: &Path, hidden: &[String]) -> Result<String, String> {
    let head = git(
        dir,
        &["symbolic-ref", "--short", "refs/remotes/origin/HEAD"],
        hidden,
    )
    .await
    .map_err(|e| {
        format!("cannot tell the repository's default branch; name a target branch: {e}")
    })?;
    Ok(head.trim().trim_start_matches("origin/").to_owned())
}

/// Merges `branch` into the remote's `target` on a detached HEAD and pushes
/// the merge; a conflict aborts it and names the files.
async fn merge(
    dir: &Path,
    branch: &str,
    target: &str,
    hidden: &[String],
) -> Result<String, String> {
    let fetch = format!("+refs/heads/{target}:refs/remotes/origin/{target}");
    git(
        dir,
        &["fetch", "-q", "--depth", DEPTH, "origin", &fetch],
        hidden,
    )
    .await
    .map_err(|e| format!("fetching {target} failed: {e}"))?;
    let start = format!("origin/{target}");
    git(dir, &["checkout", "-q", "--detach", &start], hidden).await?;
    let message = format!("Merge {branch} into {target}");
    let mut args = identity(dir, hidden).await.to_vec();
    args.extend([
        "merge",
        "-q",
        "--no-ff",
        "--no-edit",
        "-m",
        &message,
        branch,
    ]);
    if let Err(e) = git(dir, &args, hidden).await {
        let conflicted = git(dir, &["diff", "--name-only", "--diff-filter=U"], hidden)
            .await
            .unwrap_or_default();
        let _ = git(dir, &["merge", "--abort"], hidden).await;
        let files: Vec<&str> = conflicted.lines().filter(|l| !l.is_empty()).collect();
        return Err(if files.is_empty() {
            format!("merging {branch} into {target} failed: {e}")
        } else {
            format!(
                "merge of {branch} into {target} refused: conflict in {}; resolve it on {target} or {branch}, then retry the completion action",
                files.join(", ")
            )
        });
    }
    let merge_commit = short_head(dir, hidden).await;
    let refspec = format!("HEAD:refs/heads/{target}");
    git(dir, &["push", "-q", "origin", &refspec], hidden)
        .await
        .map_err(|e| format!("merged {branch} into {target} but the push failed: {e}"))?;
    Ok(format!(
        "merged {branch} into {target} at {merge_commit} and pushed it"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_branch_is_the_tasks_or_a_short_id() {
        assert_eq!(working_branch("id", "feature/x"), "feature/x");
        assert_eq!(
            working_branch("0194a3c2-7d1e-7a41-9b2c-3f5e6a7b8c9d", ""),
            "taskmesh/6a7b8c9d"
        );
    }

    #[test]
    fn numstat_reads_text_and_binary_files() {
        let files = parse_numstat_z("3\t1\tsrc/a b.rs\0-\t-\tlogo.png\0");
        assert_eq!(files.len(), 2);
        assert_eq!(
            (
                files[0].path.as_str(),
                files[0].insertions,
                files[0].deletions
            ),
            ("src/a b.rs", 3, 1)
        );
        assert!(files[1].binary);
    }

    #[test]
    fn a_long_patch_is_cut_on_a_line() {
        let line = "+".repeat(99) + "\n";
        let patch = line.repeat(MAX_PATCH_BYTES / 100 + 10);
        let (cut, was_cut) = cut_patch(patch);
        assert!(was_cut && cut.len() <= MAX_PATCH_BYTES && cut.ends_with('\n'));
        assert_eq!(cut_patch("small\n".into()), ("small\n".into(), false));
    }
}
