//! Agent tokens: one per attempt of a task, handed to its agent so it can
//! fan work out to subtasks with nothing else.
//!
//! A token is `tma_` + the task id + the attempt + an HMAC-SHA256 of both
//! under a key kept in the database (shared by replicas). Nothing per token
//! is stored: it is valid while its task is dispatched or running in that
//! attempt, so it stops working the moment the attempt ends. Its holder
//! sees its own task and the tasks below it (anything else is NOT_FOUND),
//! creates subtasks under its task (depth- and count-limited) and starts,
//! stops, messages and watches them; `api::access` lists its RPCs.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{Domain, Error, Result, invalid};
use crate::model::*;
use crate::pb;

pub const PREFIX: &str = "tma_";
/// Tasks an agent's task may have below it, all levels together.
pub const MAX_AGENT_SUBTASKS: usize = 100;
/// How many levels below its own task an agent may nest subtasks.
pub const MAX_AGENT_DEPTH: i64 = 3;
/// The database's name for the key agent tokens are signed with.
const KEY_NAME: &str = "agent_token_key";

type HmacSha256 = Hmac<Sha256>;

fn tag(key: &[u8], task_hex: &str, attempt: u32) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"taskmesh agent token v1\0");
    mac.update(task_hex.as_bytes());
    mac.update(&attempt.to_be_bytes());
    mac
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The agent token of `attempt` of `task_id`.
pub fn mint(key: &[u8], task_id: &str, attempt: i64) -> String {
    let task_hex = task_id.replace('-', "");
    let attempt = u32::try_from(attempt).unwrap_or(0);
    let mac = tag(key, &task_hex, attempt).finalize().into_bytes();
    format!("{PREFIX}{task_hex}{attempt:08x}{}", hex(&mac))
}

/// What streams held with an agent token are registered under.
pub fn token_id(task_id: &str, attempt: i64) -> String {
    format!("agent:{task_id}:{attempt}")
}

/// The task id (as a UUID and as its 32 hex digits), the attempt and the
/// MAC of a well-formed agent token.
fn parse(secret: &str) -> Option<(String, String, u32, Vec<u8>)> {
    let body = secret.strip_prefix(PREFIX)?;
    if body.len() != 32 + 8 + 64 || !body.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let task_hex = body[..32].to_ascii_lowercase();
    let task_id = uuid::Uuid::parse_str(&task_hex).ok()?.to_string();
    let attempt = u32::from_str_radix(&body[32..40], 16).ok()?;
    let mac = (0..64)
        .step_by(2)
        .map(|i| u8::from_str_radix(&body[40 + i..42 + i], 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some((task_id, task_hex, attempt, mac))
}

impl Domain {
    /// The key agent tokens are signed with, made on first use.
    pub(super) async fn agent_key(&self) -> Result<Vec<u8>> {
        let key = self
            .agent_key
            .get_or_try_init(|| async {
                let hex = self.store.server_secret(KEY_NAME).await?;
                let key: Option<Vec<u8>> = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
                    .collect();
                key.filter(|k| k.len() >= 32).ok_or_else(|| {
                    Error::FailedPrecondition(format!("the stored {KEY_NAME} is not a hex key"))
                })
            })
            .await?;
        Ok(key.clone())
    }

    /// The caller behind an agent token: its task's workspace, scoped to
    /// its task. Refused once the attempt it was made for has ended.
    pub(super) async fn authenticate_agent(&self, secret: &str) -> Result<Principal> {
        let invalid_token = || Error::Unauthenticated("invalid agent token".into());
        let (task_id, task_hex, attempt, mac) = parse(secret).ok_or_else(invalid_token)?;
        let key = self.agent_key().await?;
        tag(&key, &task_hex, attempt)
            .verify_slice(&mac)
            .map_err(|_| invalid_token())?;
        let ended = || {
            Error::Unauthenticated(format!(
                "this agent token was for attempt {attempt} of task {task_id}, which has ended"
            ))
        };
        let task = self.store.get_task(&task_id).await?.ok_or_else(ended)?;
        if task.attempt != i64::from(attempt) || !task.status.is_active() {
            return Err(ended());
        }
        let workspaces = self
            .store
            .workspace_by_id(&task.workspace_id)
            .await?
            .into_iter()
            .collect();
        Ok(Principal {
            token_id: token_id(&task.id, task.attempt),
            kind: TokenKind::Agent,
            user_id: None,
            subject: format!("task:{}", task.id),
            workspaces,
            daemon_id: None,
            task_scope: Some(task.id),
        })
    }

    /// Whether the caller may see `task`: anyone but an agent may; an agent
    /// sees its own task and the tasks below it.
    pub(super) async fn in_scope(&self, p: &Principal, task: &Task) -> Result<bool> {
        let Some(root) = &p.task_scope else {
            return Ok(true);
        };
        if task.id == *root {
            return Ok(true);
        }
        let mut parent = task.parent_id.clone();
        for _ in 0..=super::validate::MAX_DEPTH {
            match parent {
                None => return Ok(false),
                Some(id) if id == *root => return Ok(true),
                Some(id) => parent = self.store.get_task(&id).await?.and_then(|t| t.parent_id),
            }
        }
        Ok(false)
    }

    /// The parent of a subtask an agent creates: the named task if it is in
    /// the agent's tree, else the agent's own task; within the depth and
    /// count limits.
    pub(super) async fn agent_parent(
        &self,
        p: &Principal,
        root: &str,
        named: Option<String>,
    ) -> Result<String> {
        let top = self.load_task(p, root).await?;
        let parent = match named {
            Some(id) => self.load_task(p, &id).await?,
            None => top.clone(),
        };
        if parent.depth + 1 - top.depth > MAX_AGENT_DEPTH {
            return Err(invalid(
                "parent_task_id",
                format!("an agent nests subtasks at most {MAX_AGENT_DEPTH} levels below its task"),
            ));
        }
        if self.store.subtree(&top.id).await?.len() >= MAX_AGENT_SUBTASKS {
            return Err(Error::ResourceExhausted(format!(
                "task {} already has {MAX_AGENT_SUBTASKS} tasks below it, the most an agent may make",
                top.id
            )));
        }
        Ok(parent.id)
    }

    /// Tells a running parent's agent that one of its subtasks changed
    /// state (a follow-up on its stdin, in its own format), so an
    /// orchestrating agent need not poll.
    pub(super) async fn note_parent(&self, subtask: &Task) {
        let notable = matches!(
            subtask.status,
            TaskStatus::Running
                | TaskStatus::Completed
                | TaskStatus::Failed
                | TaskStatus::Cancelled
                | TaskStatus::Interrupted
        );
        let Some(parent_id) = subtask.parent_id.as_deref().filter(|_| notable) else {
            return;
        };
        let parent = match self.store.get_task(parent_id).await {
            Ok(Some(t)) if t.status == TaskStatus::Running && t.daemon_id.is_some() => t,
            _ => return,
        };
        let reason = match subtask.status_reason.lines().next() {
            Some(r) if !r.is_empty() && subtask.status != TaskStatus::Running => {
                format!(": {}", r.chars().take(200).collect::<String>())
            }
            _ => String::new(),
        };
        let text = format!(
            "[taskmesh] subtask \"{}\" ({}) is {}{reason}",
            subtask.name, subtask.id, subtask.status
        );
        let input = pb::command::Kind::SendInput(pb::SendInput { text });
        if let Err(e) = self.send_command(&parent, input).await {
            tracing::warn!(task_id = %parent.id, error = %e, "telling the parent about its subtask failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_task_and_attempt_and_is_checked() {
        let key = [7u8; 32];
        let id = "01a20fc2-1431-7372-9955-83737638f39f";
        let token = mint(&key, id, 3);
        assert!(token.starts_with("tma_01a20fc214317372995583737638f39f00000003"));
        let (task_id, task_hex, attempt, mac) = parse(&token).expect("well-formed");
        assert_eq!((task_id.as_str(), attempt), (id, 3));
        assert!(tag(&key, &task_hex, attempt).verify_slice(&mac).is_ok());
        assert!(
            tag(&[8u8; 32], &task_hex, attempt)
                .verify_slice(&mac)
                .is_err()
        );
        // Another attempt's token is another token.
        assert!(tag(&key, &task_hex, 4).verify_slice(&mac).is_err());
        assert!(parse("tma_xyz").is_none());
        assert!(parse(&token[..token.len() - 1]).is_none());
    }
}
