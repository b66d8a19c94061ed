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
