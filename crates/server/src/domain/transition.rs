//! The task state machine: the one table of allowed transitions, and the
//! engine that applies them (compare-and-swap on the version, with the event).
//!
//! ```text
//! pending ──start──> queued ──dispatch/claim──> dispatched ──started──> running
//!    │                 │ ^                          │   │                 │
//!    └──stop──┐   stop │ └──requeue (never started)─┘   │      complete / fail / stop / lost
//!             v        v                                v                 v
//!          cancelled <─┴──────── stop ──────────────────┘   completed | failed | cancelled | interrupted
//! ```
//! A finished task (completed, failed, cancelled, interrupted) can be started
//! again: that is a new attempt, not an edit of the old one. An interrupted
//! task whose daemon comes back and reports it still running returns to
//! running.

use super::{Domain, Error, Result};
use crate::model::TaskStatus::{self, *};
use crate::model::{Task, now_micros};
use crate::store::NewEvent;

/// Every allowed `(from, to)` pair. Anything else is an illegal transition.
pub const TRANSITIONS: &[(TaskStatus, TaskStatus)] = &[
    (Pending, Queued),
    (Pending, Cancelled),
    (Queued, Dispatched),
    (Queued, Cancelled),
    (Dispatched, Running),
    (Dispatched, Queued),
    (Dispatched, Failed),
    (Dispatched, Cancelled),
    (Dispatched, Interrupted),
    (Running, Completed),
    (Running, Failed),
    (Running, Cancelled),
    (Running, Interrupted),
    (Interrupted, Running),
    (Interrupted, Queued),
    (Interrupted, Cancelled),
    (Completed, Queued),
    (Failed, Queued),
    (Cancelled, Queued),
];

pub fn can_transition(from: TaskStatus, to: TaskStatus) -> bool {
    TRANSITIONS.contains(&(from, to))
}

/// The edit that opens a new attempt of a task: queued afresh, optionally
/// pinned to a daemon.
pub(super) fn new_attempt(t: &mut Task, pin: &Option<String>) {
    t.attempt += 1;
    t.pinned_daemon_id = pin.clone();
    t.daemon_id = None;
    t.status_reason.clear();
    t.queued_at = Some(t.updated_at);
    t.started_at = None;
    t.ended_at = None;
    t.stop_requested_at = None;
}

/// How often a contended task write is re-evaluated before giving up.
const CAS_RETRIES: usize = 8;

impl Domain {
    /// Moves `task` to `to` if the transition table allows it, applying
    /// `edit` to the new row. The write is a compare-and-swap on the version;
    /// when another writer got there first the task is reloaded and the
    /// transition judged again on the fresh state.
    pub(super) async fn transition(
        &self,
        actor: &str,
        task: Task,
        to: TaskStatus,
        reason: &str,
        edit: impl Fn(&mut Task),
    ) -> Result<Task> {
        let id = task.id.clone();
        self.transition_when(actor, task, to, reason, |_| true, edit)
            .await?
            .ok_or_else(|| Error::Aborted(format!("task {id} changed meanwhile")))
    }

    /// [`Domain::transition`] that applies only while `when` holds: a
    /// concurrent change is re-read and judged again. Answers `None` when
    /// `when` no longer holds.
    pub(super) async fn transition_when(
        &self,
        actor: &str,
        mut task: Task,
        to: TaskStatus,
        reason: &str,
        when: impl Fn(&Task) -> bool,
        edit: impl Fn(&mut Task),
    ) -> Result<Option<Task>> {
        for _ in 0..CAS_RETRIES {
            if !when(&task) {
                return Ok(None);
            }
            if !can_transition(task.status, to) {
                return Err(Error::FailedPrecondition(format!(
                    "task {} is {}; it cannot become {to}",
                    task.id, task.status
                )));
            }
            let mut next = task.clone();
            next.status = to;
            next.version = task.version + 1;
            next.updated_at = now_micros();
            edit(&mut next);
            let event = NewEvent {
                from: Some(task.status),
                to,
                actor: actor.to_string(),
                reason: reason.to_string(),
            };
            if self
                .store
                .save_task(&mut next, task.version, Some(&event))
                .await?
            {
                self.task_changed(&next, false);
                if task.status.is_active() && !next.status.is_active() {
                    // The attempt's agent token stops working: so do its streams.
                    let agent = super::agents::token_id(&task.id, task.attempt);
                    self.streams
                        .end_token(&agent, super::streams::StreamEnd::Revoked);
                }
                if task.status != next.status {
                    self.note_parent(&next).await;
                }
                return Ok(Some(next));
            }
            task = self
                .store
                .get_task(&task.id)
                .await?
                .ok_or_else(|| Error::NotFound(format!("task {} not found", task.id)))?;
        }
        Err(Error::Aborted(format!(
            "task {} is changing too often; try again",
            task.id
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::StoredEnum;

    /// The whole table, spelled out: every pair of states is either listed
    /// here as allowed or must be refused.
    #[test]
    fn every_pair_of_states_is_decided() {
        let allowed = [
            "pending>queued",
            "pending>cancelled",
            "queued>dispatched",
            "queued>cancelled",
            "dispatched>running",
            "dispatched>queued",
            "dispatched>failed",
            "dispatched>cancelled",
            "dispatched>interrupted",
            "running>completed",
            "running>failed",
            "running>cancelled",
            "running>interrupted",
            "interrupted>running",
            "interrupted>queued",
            "interrupted>cancelled",
            "completed>queued",
            "failed>queued",
            "cancelled>queued",
        ];
        let mut checked = 0;
        for &from in TaskStatus::ALL {
            for &to in TaskStatus::ALL {
                let key = format!("{from}>{to}");
                assert_eq!(
                    can_transition(from, to),
                    allowed.contains(&key.as_str()),
                    "{key}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 64);
    }

    #[test]
    fn nothing_moves_to_pending_or_stays_put() {
        for &from in TaskStatus::ALL {
            assert!(!can_transition(from, Pending));
            assert!(!can_transition(from, from));
        }
    }

    #[test]
    fn every_finished_state_can_start_again() {
        for &s in TaskStatus::ALL {
            if s.is_finished() {
                assert!(can_transition(s, Queued), "{s}");
            }
        }
        assert!(can_transition(Pending, Queued));
    }

    #[test]
    fn active_states_can_always_be_stopped_or_lost() {
        for &s in TaskStatus::ALL {
            if s.is_active() {
                assert!(can_transition(s, Cancelled) && can_transition(s, Interrupted));
            }
        }
    }

    /// The store claims a task in one statement, beside this engine; the
    /// move it makes must still be one the table allows.
    #[test]
    fn the_claim_is_an_allowed_transition() {
        let (from, to) = crate::store::CLAIM;
        assert!(can_transition(from, to), "{from} > {to}");
    }

    #[test]
    fn stored_names_round_trip() {
        for &s in TaskStatus::ALL {
            assert_eq!(TaskStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(TaskStatus::parse("Running"), None);
    }
}
