//! New attempts after the fact: reassigning a task whose daemon was lost,
//! continuing a finished task with a follow-up prompt, and retrying its
//! completion action. Each is a new attempt (or a command), never an edit
//! of what happened.

use std::fmt::Write;

use super::transition::new_attempt;
use super::{Domain, Error, MAX_PLAN_BYTES, Result, invalid};
use crate::model::*;
use crate::store::NewMessage;

/// The rebuilt context holds at most this much of the newest output.
pub const MAX_CONTEXT_BYTES: usize = 64 * 1024;
/// Messages read per page, newest first, to rebuild a context; each is cut
/// to its first 4096 characters in the database.
const CONTEXT_PAGE: i64 = 200;
const CONTEXT_LINE_CHARS: i64 = 4096;

impl Domain {
    /// ReassignTask: a new attempt of an interrupted or failed task, on
    /// `pin` or any suitable daemon, with the context rebuilt from its
    /// recorded output (and the agent's own session to resume, if it
    /// reported one). A task still dispatched to or running on a daemon that
    /// is offline is interrupted first; one on an online daemon is refused.
    pub async fn reassign_task(
        &self,
        p: &Principal,
        id: &str,
        pin: Option<String>,
    ) -> Result<Task> {
        let task = self.load_task(p, id).await?;
        self.check_pin(&task, pin.as_deref()).await?;
        let task = match task.status {
            TaskStatus::Interrupted | TaskStatus::Failed => task,
            TaskStatus::Dispatched | TaskStatus::Running => {
                self.take_from_lost_daemon(p, task).await?
            }
            other => {
                return Err(Error::FailedPrecondition(format!(
                    "task {id} is {other}; reassign takes interrupted or failed tasks, \
                     or tasks of an offline daemon (start it again instead)"
                )));
            }
        };
        let input = AttemptInput {
            prompt: String::new(),
            context: self.rebuild_context(&task).await?,
        };
        self.queue_with(p, task, pin, "reassigned", input).await
    }

    /// ContinueTask: a new attempt of a finished task that runs `prompt`,
    /// resuming the agent's own conversation when it reported one and
    /// carrying the context rebuilt from recorded output otherwise. The
    /// prompt is recorded in the task's output as a `user` message.
    pub async fn continue_task(
        &self,
        p: &Principal,
        id: &str,
        prompt: String,
        pin: Option<String>,
    ) -> Result<Task> {
        if prompt.trim().is_empty() {
            return Err(invalid("prompt", "is required"));
        }
        if prompt.len() > MAX_PLAN_BYTES {
            return Err(invalid("prompt", format!("over {MAX_PLAN_BYTES} bytes")));
        }
        let task = self.load_task(p, id).await?;
        self.check_pin(&task, pin.as_deref()).await?;
        if !task.status.is_finished() {
            return Err(Error::FailedPrecondition(format!(
                "task {id} is {}; only a finished task can be continued (send it a message instead)",
                task.status
            )));
        }
        let context = self.rebuild_context(&task).await?;
        let prompt = super::redact::redact(&prompt).replace('\0', "");
        // The prompt opens the new attempt's output, before any daemon can
        // number its own messages after it.
        let said = NewMessage {
            seq: task.last_seq + 1,
            kind: MessageKind::User,
            content: prompt.clone(),
            tool_name: String::new(),
            tool_input_json: String::new(),
            approval_id: String::new(),
        };
        let (old, new, _) = self
            .store
            .insert_messages(&task.id, task.attempt + 1, std::slice::from_ref(&said))
            .await?;
        if new > old {
            let said = std::slice::from_ref(&said);
            self.publish_output(
                &task.id,
                &task.workspace_id,
                task.attempt + 1,
                said,
                old,
                new,
            )
            .await?;
        }
        let input = AttemptInput { prompt, context };
        self.queue_with(p, task, pin, "continued", input).await
    }

    /// Whether the daemon has a session here or on another replica.
    pub(super) async fn daemon_online(&self, daemon_id: &str) -> Result<bool> {
        Ok(self.sessions.is_connected(daemon_id)
            || self
                .store
                .get_daemon(daemon_id)
                .await?
                .is_some_and(|d| d.state == DaemonState::Online))
    }

    /// Interrupts a task whose daemon is offline, so it can be reassigned
    /// before the grace runs out.
    async fn take_from_lost_daemon(&self, p: &Principal, task: Task) -> Result<Task> {
        let daemon_id = task.daemon_id.clone().unwrap_or_default();
        if self.daemon_online(&daemon_id).await? {
            return Err(Error::FailedPrecondition(format!(
                "task {} is {} on daemon {daemon_id}, which is online; stop it first",
                task.id, task.status
            )));
        }
        let id = task.id.clone();
        let reason = format!("reassigned away from offline daemon {daemon_id}");
        self.give_up(&p.subject, task, TaskStatus::Interrupted, &reason)
            .await?
            .ok_or_else(|| Error::Aborted(format!("task {id} changed meanwhile; look again")))
    }

    /// Records the new attempt's input, queues the attempt and dispatches.
    async fn queue_with(
        &self,
        p: &Principal,
        task: Task,
        pin: Option<String>,
        reason: &str,
        input: AttemptInput,
    ) -> Result<Task> {
        // Written first: the attempt may be claimed the moment it is queued.
        self.store
            .put_attempt_input(&task.id, task.attempt + 1, &input)
            .await?;
        let (id, attempt) = (task.id.clone(), task.attempt);
        let unchanged = |t: &Task| t.attempt == attempt;
        let task = self
            .transition_when(
                &p.subject,
                task,
                TaskStatus::Queued,
                reason,
                unchanged,
                |t| new_attempt(t, &pin),
            )
            .await?
            .ok_or_else(|| {
                Error::Aborted(format!("task {id} was started meanwhile; look again"))
            })?;
        self.dispatch_workspace(&task.workspace_id).await?;
        Ok(self.store.get_task(&task.id).await?.unwrap_or(task))
    }

    /// A plain-text transcript of the task's newest output, for an agent
    /// that starts afresh: what it was asked, then what it said and did.
    async fn rebuild_context(&self, task: &Task) -> Result<String> {
        // The newest lines that fit, read a page at a time from the end.
        let mut newest_first: Vec<String> = Vec::new();
        let mut budget = MAX_CONTEXT_BYTES;
        let mut before = i64::MAX;
        let mut omitted = 0;
        'pages: loop {
            let page = self
                .store
                .newest_messages(&task.id, before, CONTEXT_PAGE, CONTEXT_LINE_CHARS)
                .await?;
            let full = page.len() as i64 == CONTEXT_PAGE;
            for m in page {
                let mut line = match m.kind {
                    MessageKind::ToolUse => {
                        format!("[tool_use {}] {}", m.tool_name, m.tool_input_json)
                    }
                    MessageKind::ToolResult => {
                        format!("[tool_result {}] {}", m.tool_name, m.content)
                    }
                    kind => format!("[{kind}] {}", m.content),
                };
                line.truncate(floor_char_boundary(&line, 4096));
                match budget.checked_sub(line.len() + 1) {
                    Some(rest) => budget = rest,
                    None => {
                        // Output is numbered from 1 without gaps: what lies
                        // below this message is its seq minus one.
                        omitted = m.seq;
                        break 'pages;
                    }
                }
                before = m.seq;
                newest_first.push(line);
            }
            if !full {
                break;
            }
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "This continues task \"{}\" (attempt {} so far). Its plan was:\n{}\n",
            task.name,
            task.attempt,
            &task.plan[..floor_char_boundary(&task.plan, 8192)]
        );
        if omitted > 0 {
            let _ = writeln!(out, "[{omitted} earlier output lines omitted]");
        }
        let _ = writeln!(out, "Output recorded so far, oldest first:");
        for line in newest_first.iter().rev() {
            out.push_str(line);
            out.push('\n');
        }
        Ok(out)
    }
}

/// The largest index ≤ `max` on a char boundary of `s`.
fn floor_char_boundary(s: &str, max: usize) -> usize {
    if max >= s.len() {
        return s.len();
    }
    (0..=max)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::floor_char_boundary;

    #[test]
    fn cuts_land_on_char_boundaries() {
        assert_eq!(floor_char_boundary("héllo", 2), 1);
        assert_eq!(floor_char_boundary("héllo", 3), 3);
        assert_eq!(floor_char_boundary("abc", 10), 3);
    }
}
