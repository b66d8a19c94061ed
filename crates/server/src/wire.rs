//! The domain model as `taskmesh.v1` messages (model → pb). What clients
//! send is parsed and checked in `api::parse`.

use crate::model::{self, Micros};
use crate::pb;

pub fn timestamp(micros: Micros) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    })
}

pub fn task_status(s: model::TaskStatus) -> pb::TaskStatus {
    use model::TaskStatus::*;
    match s {
        Pending => pb::TaskStatus::Pending,
        Queued => pb::TaskStatus::Queued,
        Dispatched => pb::TaskStatus::Dispatched,
        Running => pb::TaskStatus::Running,
        Completed => pb::TaskStatus::Completed,
        Failed => pb::TaskStatus::Failed,
        Cancelled => pb::TaskStatus::Cancelled,
        Interrupted => pb::TaskStatus::Interrupted,
    }
}

pub fn stop_outcome(o: model::StopOutcome) -> pb::StopOutcome {
    use model::StopOutcome::*;
    match o {
        Cancelled => pb::StopOutcome::Cancelled,
        Interrupting => pb::StopOutcome::Interrupting,
        AlreadyStopping => pb::StopOutcome::AlreadyStopping,
        AlreadyCancelled => pb::StopOutcome::AlreadyCancelled,
    }
}

pub fn token_kind(k: model::TokenKind) -> pb::TokenKind {
    match k {
        model::TokenKind::User => pb::TokenKind::User,
        model::TokenKind::Daemon => pb::TokenKind::Daemon,
        model::TokenKind::Viewer => pb::TokenKind::Viewer,
        model::TokenKind::Agent => pb::TokenKind::Agent,
    }
}

pub fn message_kind(k: model::MessageKind) -> pb::MessageKind {
    use model::MessageKind::*;
    match k {
        Assistant => pb::MessageKind::Assistant,
        ToolUse => pb::MessageKind::ToolUse,
        ToolResult => pb::MessageKind::ToolResult,
        User => pb::MessageKind::User,
        System => pb::MessageKind::System,
        Stdout => pb::MessageKind::Stdout,
        Stderr => pb::MessageKind::Stderr,
        Approval => pb::MessageKind::Approval,
    }
}

pub fn task(t: model::Task) -> pb::Task {
    task_with_subtasks(t, Vec::new(), 0)
}

/// A task with (some of) its direct subtasks, and how many it has.
pub fn task_with_subtasks(t: model::Task, subtasks: Vec<model::Task>, count: i64) -> pb::Task {
    pb::Task {
        id: t.id,
        workspace_id: t.workspace_id,
        name: t.name,
        plan: t.plan,
        status: task_status(t.status) as i32,
        version: t.version,
        parent_task_id: t.parent_id.unwrap_or_default(),
        depth: t.depth as i32,
        daemon_id: t.daemon_id.unwrap_or_default(),
        pinned_daemon_id: t.pinned_daemon_id.unwrap_or_default(),
        runtime: t.runtime,
        repository: t.repository,
        branch: t.branch,
        attempt: t.attempt as i32,
        status_reason: t.status_reason,
        agent_session_id: t.agent_session_id,
        working_directory: t.working_directory,
        created_by: t.created_by,
        create_time: timestamp(t.created_at),
        update_time: timestamp(t.updated_at),
        start_time: t.started_at.and_then(timestamp),
        end_time: t.ended_at.and_then(timestamp),
        subtasks: subtasks.into_iter().map(task).collect(),
        last_seq: t.last_seq,
        output_pruned_seq: t.output_pruned_seq,
        progress_summary: t.progress_summary,
        progress_percent: t.progress_percent as i32,
        plan_truncated: t.plan_truncated,
        subtask_count: i32::try_from(count).unwrap_or(i32::MAX),
        model: t.model,
        permission_mode: t.permission_mode,
        pending_approvals: i32::try_from(t.pending_approvals).unwrap_or(i32::MAX),
        completion_action: completion_action(t.completion_action) as i32,
        target_branch: t.target_branch,
        changes: None,
    }
}

pub fn completion_action(a: model::CompletionAction) -> pb::CompletionAction {
    match a {
        model::CompletionAction::None => pb::CompletionAction::None,
        model::CompletionAction::Push => pb::CompletionAction::Push,
        model::CompletionAction::Merge => pb::CompletionAction::Merge,
    }
}

pub fn changes(c: model::TaskChanges) -> pb::TaskChanges {
    let n = |v: i64| i32::try_from(v).unwrap_or(i32::MAX);
    pb::TaskChanges {
        attempt: n(c.attempt),
        branch: c.branch,
        base_commit: c.base_commit,
        head_commit: c.head_commit,
        commits: n(c.commits),
        files_changed: n(c.files_changed),
        insertions: n(c.insertions),
        deletions: n(c.deletions),
        files: c
            .files
            .into_iter()
            .map(|f| pb::FileChange {
                path: f.path,
                insertions: n(f.insertions),
                deletions: n(f.deletions),
                binary: f.binary,
            })
            .collect(),
        patch_truncated: c.patch_truncated,
        completion_state: c.completion_state,
        completion_detail: c.completion_detail,
    }
}

pub fn task_event(e: model::TaskEvent) -> pb::TaskEvent {
    pb::TaskEvent {
        id: e.id,
        task_id: e.task_id,
        from_status: e.from.map_or(pb::TaskStatus::Unspecified, task_status) as i32,
        to_status: task_status(e.to) as i32,
        actor: e.actor,
        reason: e.reason,
        attempt: e.attempt as i32,
        create_time: timestamp(e.created_at),
    }
}

pub fn task_message(m: model::TaskMessage) -> pb::TaskMessage {
    pb::TaskMessage {
        task_id: m.task_id,
        seq: m.seq,
        kind: message_kind(m.kind) as i32,
        content: m.content,
        tool_name: m.tool_name,
        tool_input_json: m.tool_input_json,
        attempt: m.attempt as i32,
        create_time: timestamp(m.created_at),
        approval_id: m.approval_id,
    }
}

pub fn usage(u: model::Usage) -> pb::TaskUsage {
    pb::TaskUsage {
        provider: u.provider,
        model: u.model,
        input_tokens: u.input_tokens,
        output_tokens: u.output_tokens,
        cache_read_tokens: u.cache_read_tokens,
        cache_write_tokens: u.cache_write_tokens,
    }
}

pub fn approval(a: model::Approval) -> pb::Approval {
    use model::ApprovalState::*;
    let state = match a.state {
        Pending => pb::ApprovalState::Pending,
        Allowed => pb::ApprovalState::Allowed,
        Denied => pb::ApprovalState::Denied,
        Expired => pb::ApprovalState::Expired,
    };
    pb::Approval {
        id: a.id,
        task_id: a.task_id,
        attempt: a.attempt as i32,
        tool_name: a.tool_name,
        tool_input_json: a.tool_input_json,
        state: state as i32,
        decided_by: a.decided_by,
        message: a.message,
        updated_input_json: a.updated_input_json,
        create_time: timestamp(a.created_at),
        decide_time: a.decided_at.and_then(timestamp),
        expire_time: timestamp(a.expires_at),
    }
}

pub fn workspace(w: model::Workspace) -> pb::Workspace {
    pb::Workspace {
        id: w.id,
        name: w.name,
        create_time: timestamp(w.created_at),
    }
}

pub fn token(t: model::Token) -> pb::Token {
    pb::Token {
        id: t.id,
        kind: token_kind(t.kind) as i32,
        name: t.name,
        workspace_id: t.workspace_id,
        user_name: t.user_name.unwrap_or_default(),
        create_time: timestamp(t.created_at),
        revoke_time: t.revoked_at.and_then(timestamp),
    }
}

pub fn daemon(d: model::Daemon) -> pb::Daemon {
    let state = match d.state {
        model::DaemonState::Online => pb::DaemonState::Online,
        model::DaemonState::Offline => pb::DaemonState::Offline,
        model::DaemonState::Gone => pb::DaemonState::Gone,
    };
    pb::Daemon {
        id: d.id,
        workspace_id: d.workspace_id,
        machine_id: d.machine_id,
        hostname: d.hostname,
        version: d.version,
        runtimes: d
            .runtimes
            .into_iter()
            .map(|r| pb::Runtime {
                name: r.name,
                version: r.version,
            })
            .collect(),
        max_concurrent_tasks: d.max_concurrent_tasks as i32,
        state: state as i32,
        active_tasks: d.active_tasks as i32,
        create_time: timestamp(d.created_at),
        last_seen_time: timestamp(d.last_seen_at),
        work_dir: d.work_dir,
        suggested_targets: d.suggested_targets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_before_the_epoch() {
        let t = timestamp(-1).unwrap();
        assert_eq!((t.seconds, t.nanos), (-1, 999_999_000));
    }
}
