//! The task's checkout: a shallow clone of its repository and branch,
//! which an interrupt cancels.

use std::process::Stdio;

use tokio::process::Command;
use tokio::sync::mpsc;
use tracing::info;

use super::process::{describe_status, exit_code_of, scrub_env};
use super::{Control, RunnerEvent, StartError, TaskSpec};

/// `git clone --branch <branch> --depth 50 -- <repository> <dir>`, which an
/// interrupt cancels.
pub(super) async fn clone_repository(
    spec: &TaskSpec,
    control: &mut mpsc::Receiver<Control>,
    events: &mpsc::Sender<RunnerEvent>,
) -> Result<(), StartError> {
    let mut cmd = Command::new("git");
    scrub_env(&mut cmd, &spec.hidden_secrets);
    cmd.arg("clone");
    if !spec.branch.is_empty() {
        cmd.arg("--branch").arg(&spec.branch);
    }
    // `--` keeps a repository string from the server from being read as an
    // option (such as --upload-pack).
    cmd.arg("--depth")
        .arg("50")
        .arg("--")
        .arg(&spec.repository)
        .arg(&spec.dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    info!(repository = %spec.repository, branch = %spec.branch, "cloning");
    let child = cmd
        .spawn()
        .map_err(|e| StartError::new(format!("running git clone failed: {e}")))?;
    let output = child.wait_with_output();
    tokio::pin!(output);
    loop {
        tokio::select! {
            res = &mut output => {
                let out = res.map_err(|e| StartError::new(format!("git clone failed: {e}")))?;
                if out.status.success() {
                    return Ok(());
                }
                let stderr = String::from_utf8_lossy(&out.stderr);
                let stderr = stderr.trim();
                let tail: String = {
                    let skip = stderr.chars().count().saturating_sub(MAX_GIT_ERROR_CHARS);
                    stderr.chars().skip(skip).collect()
                };
                return Err(StartError {
                    reason: format!("git clone failed ({}): {tail}", describe_status(out.status)),
                    exit_code: exit_code_of(out.status),
                });
            }
            ctrl = control.recv() => match ctrl {
                Some(Control::Input { command_id, .. } | Control::Decide { command_id, .. }) => {
                    let _ = events
                        .send(RunnerEvent::CommandDone {
                            command_id,
                            result: Err("the agent has not started yet (cloning)".into()),
                        })
                        .await;
                }
                // Dropping `output` kills git (kill_on_drop).
                Some(Control::Interrupt { .. } | Control::Kill) | None => {
                    return Err(StartError::new("interrupted"));
                }
            }
        }
    }
}

/// Longest git error kept in a failure reason.
const MAX_GIT_ERROR_CHARS: usize = 2000;
