//! The agent as a process: its command line, signals to its process
//! group, its stdin, and what its exit status means.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use tokio::io::AsyncWriteExt;
use tokio::process::{ChildStdin, Command};
use tokio::sync::mpsc;
use tracing::warn;

use super::{Outcome, RunnerEvent};

/// Variables the daemon's own access may travel in; no child inherits them.
const DAEMON_ONLY_VARS: &[&str] = &["TASKMESH_TOKEN", "TASKMESH_TOKEN_FILE"];

/// Keeps the daemon's token out of a child's environment: the variables
/// that carry it, and any variable whose value holds one of `secrets`.
pub(crate) fn scrub_env(cmd: &mut Command, secrets: &[String]) {
    for var in DAEMON_ONLY_VARS {
        cmd.env_remove(var);
    }
    for (name, value) in std::env::vars_os() {
        let value = value.to_string_lossy();
        if secrets
            .iter()
            .any(|s| !s.is_empty() && value.contains(s.as_str()))
        {
            cmd.env_remove(name);
        }
    }
}

/// Sends `sig` to every process in the group led by `pgid`.
pub(super) fn signal_group(pgid: i32, sig: libc::c_int) {
    // pgid 0 or 1 would signal our own group or every process we may signal.
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(-pgid, sig) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ESRCH) {
            warn!(pgid, sig, error = %err, "signalling the process group failed");
        }
    }
}

pub(super) fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "unknown exit status".into(),
    }
}

/// The exit code, or 128 + signal the way shells report a signal death.
pub(super) fn exit_code_of(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// The end of an agent run from its exit status.
pub(super) fn outcome_of(
    exit: &Result<ExitStatus, String>,
    interrupted: bool,
    summary: String,
) -> Outcome {
    match exit {
        Err(e) => Outcome::Failed {
            reason: format!("waiting for the agent failed: {e}"),
            exit_code: -1,
        },
        Ok(status) if interrupted => Outcome::Failed {
            reason: "interrupted".into(),
            exit_code: exit_code_of(*status),
        },
        Ok(status) if status.success() => Outcome::Completed { summary },
        Ok(status) => Outcome::Failed {
            reason: describe_status(*status),
            exit_code: exit_code_of(*status),
        },
    }
}

/// Writes `SendInput` text to the agent's stdin off the runner loop, so a
/// child that does not read its stdin cannot stall output handling.
pub(super) fn spawn_stdin_writer(
    mut stdin: ChildStdin,
    events: mpsc::Sender<RunnerEvent>,
) -> mpsc::Sender<(String, String)> {
    let (tx, mut rx) = mpsc::channel::<(String, String)>(16);
    tokio::spawn(async move {
        while let Some((command_id, mut text)) = rx.recv().await {
            if !text.ends_with('\n') {
                text.push('\n');
            }
            let result = match stdin.write_all(text.as_bytes()).await {
                Ok(()) => stdin.flush().await,
                Err(e) => Err(e),
            }
            .map_err(|e| format!("writing to the agent's stdin failed: {e}"));
            // Lines of the agent's own protocol answer no command.
            if command_id.is_empty() {
                if let Err(e) = result {
                    warn!(error = %e, "a line for the agent was not written");
                }
                continue;
            }
            let done = RunnerEvent::CommandDone { command_id, result };
            if events.send(done).await.is_err() {
                break;
            }
        }
    });
    tx
}
