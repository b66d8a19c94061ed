//! Output from daemons: redacted, stored once per (task, seq), acknowledged
//! up to the highest contiguous seq, and published to watchers.

use std::sync::Arc;

use super::redact::{redact, redact_in_stream};
use super::{Domain, Error, Result, invalid};
use crate::model::*;
use crate::pb;
use crate::store::NewMessage;

/// Most output messages in one report; larger batches are refused.
pub const MAX_BATCH: usize = 5000;

/// Largest single message content, tool name and tool input.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
pub const MAX_TOOL_NAME_BYTES: usize = 256;
pub const MAX_TOOL_INPUT_BYTES: usize = 256 * 1024;
/// How far a batch's seqs may run ahead of the stored output.
pub const SEQ_WINDOW: i64 = 100_000;

impl Domain {
    /// Stores a batch of output (redacted, NUL-free) and answers the highest
    /// contiguous seq stored. The batch is checked whole first: a message
    /// without a kind, with a seq that is not positive or beyond the
    /// acceptance window, or over its size bounds refuses the batch, naming
    /// the seq. Output of a task still dispatched starts it; output of a
    /// task that ended is refused.
    pub async fn ingest(
        &self,
        p: &Principal,
        task_id: &str,
        attempt: i64,
        input: Vec<pb::TaskMessageInput>,
    ) -> Result<i64> {
        if input.len() > MAX_BATCH {
            return Err(Error::ResourceExhausted(format!(
                "{} messages in one batch; at most {MAX_BATCH}",
                input.len()
            )));
        }
        let mut input = input.into_iter().map(checked).collect::<Result<Vec<_>>>()?;
        input.sort_by_key(|(m, _)| m.seq);
        // The usual batch continues where the last one from this session
        // ended: two statements, no reads.
        let known = self.marks.get(task_id).filter(|m| {
            p.sees(&m.workspace_id)
                && p.daemon_id.as_deref() == Some(m.daemon_id.as_str())
                && (attempt == 0 || attempt == m.attempt)
        });
        let asks = input.iter().any(|(_, kind)| *kind == MessageKind::Approval);
        if let Some(mark) = known.filter(|_| !asks) {
            within_window(&input, mark.seq)?;
            let messages: Arc<[NewMessage]> = self.clean(task_id, &input, mark.seq).into();
            if messages.is_empty() {
                return Ok(mark.seq);
            }
            let continues = messages
                .iter()
                .enumerate()
                .all(|(i, m)| m.seq == mark.seq + 1 + i as i64);
            if continues
                && self
                    .store
                    .append_messages(
                        task_id,
                        &mark.daemon_id,
                        mark.attempt,
                        mark.seq,
                        messages.clone(),
                    )
                    .await?
            {
                let new = messages.last().map_or(mark.seq, |m| m.seq);
                self.marks.advance(task_id, new);
                self.publish_output(
                    task_id,
                    &mark.workspace_id,
                    mark.attempt,
                    &messages,
                    mark.seq,
                    new,
                )
                .await?;
                return Ok(new);
            }
            self.marks.forget(task_id);
        }
        let task = self.reported_task(p, task_id, attempt).await?;
        within_window(&input, task.last_seq)?;
        if input.iter().all(|(m, _)| m.seq <= task.last_seq) {
            // A resend of what is stored: acknowledged again.
            return Ok(task.last_seq);
        }
        let task = match task.status {
            TaskStatus::Running => task,
            TaskStatus::Dispatched | TaskStatus::Interrupted => {
                self.started(task, "started (its output arrived first)")
                    .await?
            }
            status => {
                return Err(Error::FailedPrecondition(format!(
                    "task {task_id} is {status}; output after its end is refused"
                )));
            }
        };
        let mut messages = self.clean(&task.id, &input, task.last_seq);
        if asks {
            self.open_approvals(&task, &input, &mut messages).await?;
        }
        let (old, new, clean) = self
            .store
            .insert_messages(&task.id, task.attempt, &messages)
            .await?;
        if let (true, Some(daemon_id)) = (clean, &task.daemon_id) {
            self.marks.remember(&task, daemon_id, new);
        }
        // The task shows its pending approvals before anyone can see the
        // request in its output.
        if asks {
            self.recount_approvals(&task.id).await?;
        }
        if new > old {
            self.publish_output(
                &task.id,
                &task.workspace_id,
                task.attempt,
                &messages,
                old,
                new,
            )
            .await?;
        }
        Ok(new)
    }

    /// Opens the approvals the batch's approval messages ask for and names
    /// each in its message.
    async fn open_approvals(
        &self,
        task: &Task,
        input: &[(pb::TaskMessageInput, MessageKind)],
        messages: &mut [NewMessage],
    ) -> Result<()> {
        for m in messages
            .iter_mut()
            .filter(|m| m.kind == MessageKind::Approval)
        {
            let Some((asked, _)) = input.iter().find(|(i, _)| i.seq == m.seq) else {
                continue;
            };
            m.approval_id = self
                .open_approval(
                    task,
                    m.seq,
                    &asked.request_id,
                    &m.tool_name,
                    &m.tool_input_json,
                )
                .await?;
        }
        Ok(())
    }

    /// The messages above `mark`, redacted in seq order (a private key
    /// printed a line at a time spans messages).
    fn clean(
        &self,
        task_id: &str,
        input: &[(pb::TaskMessageInput, MessageKind)],
        mark: i64,
    ) -> Vec<NewMessage> {
        let mut in_key = self.key_blocks.is_open(task_id);
        let messages = input
            .iter()
            .filter(|(m, _)| m.seq > mark)
            .map(|(m, kind)| NewMessage {
                seq: m.seq,
                kind: *kind,
                content: redact_in_stream(&m.content, &mut in_key).into_owned(),
                tool_name: redact(&m.tool_name).into_owned(),
                tool_input_json: redact(&m.tool_input_json).into_owned(),
                // Approval messages get theirs in `open_approvals`.
                approval_id: String::new(),
            })
            .collect();
        self.key_blocks.set(task_id, in_key);
        messages
    }

    /// Publishes the messages that became contiguous, (old, new]. Usually
    /// they are all in this batch; when an earlier out-of-order batch filled
    /// part of the range, the range is read back from the store instead, so
    /// live watchers never wait on a message nobody will publish again.
    pub(super) async fn publish_output(
        &self,
        task_id: &str,
        workspace_id: &str,
        attempt: i64,
        batch: &[NewMessage],
        old: i64,
        new: i64,
    ) -> Result<()> {
        let fresh: Vec<&NewMessage> = batch
            .iter()
            .filter(|m| m.seq > old && m.seq <= new)
            .collect();
        let metrics = &crate::metrics::METRICS;
        metrics.output_messages.inc_by(fresh.len() as u64);
        metrics
            .output_bytes
            .inc_by(fresh.iter().map(|m| m.content.len() as u64).sum());
        self.output_grew(task_id, workspace_id, old, new);
        if fresh.len() as i64 != new - old {
            // Part of the range came in an earlier batch: watchers read it
            // from the store.
            self.hub.stored(task_id, new);
            return Ok(());
        }
        let now = now_micros();
        for m in fresh {
            self.hub.message(TaskMessage {
                task_id: task_id.to_string(),
                seq: m.seq,
                kind: m.kind,
                content: m.content.clone(),
                tool_name: m.tool_name.clone(),
                tool_input_json: m.tool_input_json.clone(),
                attempt,
                created_at: now,
                approval_id: m.approval_id.clone(),
            });
        }
        Ok(())
    }
}

/// One message checked against the protocol and its bounds, with its kind.
fn checked(m: pb::TaskMessageInput) -> Result<(pb::TaskMessageInput, MessageKind)> {
    let seq = m.seq;
    let bad = |what: String| invalid("messages", format!("seq {seq}: {what}"));
    if seq <= 0 {
        return Err(bad("seqs start at 1".into()));
    }
    let kind = match pb::MessageKind::try_from(m.kind) {
        Ok(pb::MessageKind::Assistant) => MessageKind::Assistant,
        Ok(pb::MessageKind::ToolUse) => MessageKind::ToolUse,
        Ok(pb::MessageKind::ToolResult) => MessageKind::ToolResult,
        Ok(pb::MessageKind::User) => MessageKind::User,
        Ok(pb::MessageKind::System) => MessageKind::System,
        Ok(pb::MessageKind::Stdout) => MessageKind::Stdout,
        Ok(pb::MessageKind::Stderr) => MessageKind::Stderr,
        Ok(pb::MessageKind::Approval) => {
            if m.request_id.is_empty() || m.request_id.len() > 128 {
                return Err(bad("an approval needs a request_id of 1-128 bytes".into()));
            }
            if m.tool_name.is_empty() {
                return Err(bad("an approval needs the tool_name it asks for".into()));
            }
            MessageKind::Approval
        }
        Ok(pb::MessageKind::Unspecified) => return Err(bad("kind is required".into())),
        Err(_) => return Err(bad(format!("unknown kind {}", m.kind))),
    };
    for (field, value, max) in [
        ("content", &m.content, MAX_MESSAGE_BYTES),
        ("tool_name", &m.tool_name, MAX_TOOL_NAME_BYTES),
        ("tool_input_json", &m.tool_input_json, MAX_TOOL_INPUT_BYTES),
    ] {
        if value.len() > max {
            return Err(bad(format!(
                "{field} is {} bytes; at most {max}",
                value.len()
            )));
        }
    }
    Ok((m, kind))
}

/// Seqs may run at most [`SEQ_WINDOW`] ahead of what is stored.
fn within_window(input: &[(pb::TaskMessageInput, MessageKind)], stored: i64) -> Result<()> {
    match input.last() {
        Some((m, _)) if m.seq > stored.saturating_add(SEQ_WINDOW) => Err(invalid(
            "messages",
            format!(
                "seq {}: more than {SEQ_WINDOW} ahead of the stored output (seq {stored}); \
                 send what comes before it first",
                m.seq
            ),
        )),
        _ => Ok(()),
    }
}
