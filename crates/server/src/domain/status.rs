//! The task state machine: the one table of allowed transitions.
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

use crate::model::TaskStatus::{self, *};

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

/// A task a daemon holds or is about to hold.
pub fn is_active(status: TaskStatus) -> bool {
    matches!(status, Dispatched | Running)
}

/// Finished: a new start is a new attempt.
pub fn is_finished(status: TaskStatus) -> bool {
    matches!(status, Completed | Failed | Cancelled | Interrupted)
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
            if is_finished(s) {
                assert!(can_transition(s, Queued), "{s}");
            }
        }
        assert!(can_transition(Pending, Queued));
    }

    #[test]
    fn active_states_can_always_be_stopped_or_lost() {
        for &s in TaskStatus::ALL {
            if is_active(s) {
                assert!(can_transition(s, Cancelled) && can_transition(s, Interrupted));
            }
        }
    }

    #[test]
    fn stored_names_round_trip() {
        for &s in TaskStatus::ALL {
            assert_eq!(TaskStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(TaskStatus::parse("Running"), None);
    }
}
