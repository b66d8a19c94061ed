//! Output from daemons: redacted, stored once per (task, seq), acknowledged
//! up to the highest contiguous seq, and published to watchers.

use super::{Domain, Error, Result};
use crate::model::*;
use crate::pb;
use crate::store::NewMessage;

/// Most output messages in one report; larger batches are refused.
pub const MAX_BATCH: usize = 5000;

/// Largest single message content.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

impl Domain {
    /// Stores a batch of output (redacted, NUL-free) and answers the highest
    /// contiguous seq stored. A message that cannot be stored as sent (bad
    /// kind, too large) is stored as a system note instead, so one bad
    /// message never fails its batch nor leaves a gap.
    pub async fn ingest(
        &self,
        p: &Principal,
        task_id: &str,
        input: Vec<pb::TaskMessageInput>,
    ) -> Result<i64> {
        if input.len() > MAX_BATCH {
            return Err(Error::ResourceExhausted(format!(
                "{} messages in one batch; at most {MAX_BATCH}",
                input.len()
            )));
        }
        // The usual batch continues where the last one from this session
        // ended: two statements, no reads.
        let known = self.marks.get(task_id).filter(|m| {
            p.sees(&m.workspace_id) && p.daemon_id.as_deref() == Some(m.daemon_id.as_str())
        });
        if let Some(mark) = known {
            let messages: Vec<NewMessage> = input
                .iter()
                .filter(|m| m.seq > mark.seq)
                .cloned()
                .map(clean_message)
                .collect();
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
                    .append_messages(task_id, &mark.daemon_id, mark.attempt, mark.seq, &messages)
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
        let task = self.reported_task(p, task_id).await?;
        let messages: Vec<NewMessage> = input
            .into_iter()
            .filter(|m| m.seq > task.last_seq)
            .map(clean_message)
            .collect();
        if messages.is_empty() {
            return Ok(task.last_seq);
        }
        let (old, new, clean) = self
            .store
            .insert_messages(&task.id, task.attempt, &messages)
            .await?;
        if let (true, Some(daemon_id)) = (clean, &task.daemon_id) {
            self.marks.remember(&task, daemon_id, new);
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
            });
        }
        Ok(())
    }
}

pub(super) fn clean_message(m: pb::TaskMessageInput) -> NewMessage {
    let kind = match pb::MessageKind::try_from(m.kind) {
        Ok(pb::MessageKind::Assistant) => Some(MessageKind::Assistant),
        Ok(pb::MessageKind::ToolUse) => Some(MessageKind::ToolUse),
        Ok(pb::MessageKind::ToolResult) => Some(MessageKind::ToolResult),
        Ok(pb::MessageKind::User) => Some(MessageKind::User),
        Ok(pb::MessageKind::System) => Some(MessageKind::System),
        Ok(pb::MessageKind::Stdout) => Some(MessageKind::Stdout),
        Ok(pb::MessageKind::Stderr) => Some(MessageKind::Stderr),
        _ => None,
    };
    let redact = |s: &str| super::redact::redact(s).into_owned();
    match kind {
        Some(kind) if m.content.len() <= MAX_MESSAGE_BYTES => NewMessage {
            seq: m.seq,
            kind,
            content: redact(&m.content),
            tool_name: redact(&m.tool_name),
            tool_input_json: redact(&m.tool_input_json),
        },
        _ => NewMessage {
            seq: m.seq,
            kind: MessageKind::System,
            content: format!(
                "[message {} dropped: unknown kind {} or over {MAX_MESSAGE_BYTES} bytes ({} bytes)]",
                m.seq,
                m.kind,
                m.content.len()
            ),
            tool_name: String::new(),
            tool_input_json: String::new(),
        },
    }
}
