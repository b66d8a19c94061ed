//! What clients send, as the model: enum values checked (unspecified and
//! unknown values are refused, naming the field).

use crate::domain::{Result, invalid};
use crate::model;
use crate::pb;

/// A status a client sent; unspecified and unknown values are refused.
pub fn task_status(field: &'static str, v: i32) -> Result<model::TaskStatus> {
    use model::TaskStatus::*;
    Ok(
        match pb::TaskStatus::try_from(v)
            .map_err(|_| invalid(field, format!("unknown value {v}")))?
        {
            pb::TaskStatus::Unspecified => return Err(invalid(field, "must be specified")),
            pb::TaskStatus::Pending => Pending,
            pb::TaskStatus::Queued => Queued,
            pb::TaskStatus::Dispatched => Dispatched,
            pb::TaskStatus::Running => Running,
            pb::TaskStatus::Completed => Completed,
            pb::TaskStatus::Failed => Failed,
            pb::TaskStatus::Cancelled => Cancelled,
            pb::TaskStatus::Interrupted => Interrupted,
        },
    )
}

pub fn token_kind(field: &'static str, v: i32) -> Result<model::TokenKind> {
    match pb::TokenKind::try_from(v).map_err(|_| invalid(field, format!("unknown value {v}")))? {
        pb::TokenKind::Unspecified => Err(invalid(field, "must be specified")),
        pb::TokenKind::User => Ok(model::TokenKind::User),
        pb::TokenKind::Daemon => Ok(model::TokenKind::Daemon),
        pb::TokenKind::Viewer => Ok(model::TokenKind::Viewer),
        pb::TokenKind::Agent => Ok(model::TokenKind::Agent),
    }
}

/// A completion action; unspecified is none.
pub fn completion_action(field: &'static str, v: i32) -> Result<model::CompletionAction> {
    use model::CompletionAction::*;
    match pb::CompletionAction::try_from(v)
        .map_err(|_| invalid(field, format!("unknown value {v}")))?
    {
        pb::CompletionAction::Unspecified | pb::CompletionAction::None => Ok(None),
        pb::CompletionAction::Push => Ok(Push),
        pb::CompletionAction::Merge => Ok(Merge),
    }
}

/// What a daemon reports its attempt changed.
pub fn changes(c: pb::TaskChanges) -> model::TaskChanges {
    model::TaskChanges {
        attempt: i64::from(c.attempt),
        branch: c.branch,
        base_commit: c.base_commit,
        head_commit: c.head_commit,
        commits: i64::from(c.commits),
        files_changed: i64::from(c.files_changed),
        insertions: i64::from(c.insertions),
        deletions: i64::from(c.deletions),
        files: c
            .files
            .into_iter()
            .map(|f| model::FileChange {
                path: f.path,
                insertions: i64::from(f.insertions),
                deletions: i64::from(f.deletions),
                binary: f.binary,
            })
            .collect(),
        patch_truncated: c.patch_truncated,
        completion_state: c.completion_state,
        completion_detail: c.completion_detail,
    }
}

pub fn usage(u: pb::TaskUsage) -> model::Usage {
    model::Usage {
        provider: u.provider,
        model: u.model,
        input_tokens: u.input_tokens,
        output_tokens: u.output_tokens,
        cache_read_tokens: u.cache_read_tokens,
        cache_write_tokens: u.cache_write_tokens,
    }
}

/// The cost and turns of a usage report; `None` when the agent reported
/// neither.
pub fn cost(cost_usd: f64, turns: i32) -> Option<(f64, i64)> {
    (cost_usd != 0.0 || turns != 0).then_some((cost_usd, i64::from(turns)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{StoredEnum, TaskStatus};

    #[test]
    fn statuses_round_trip_through_the_wire() {
        for &s in TaskStatus::ALL {
            assert_eq!(
                task_status("s", crate::wire::task_status(s) as i32).unwrap(),
                s
            );
        }
        assert!(task_status("s", 0).is_err());
        assert!(task_status("s", 99).is_err());
    }
}
