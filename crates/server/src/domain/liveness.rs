//! Liveness: which daemons are alive, and what happens to the tasks of
//! those that are not.
//!
//! Heartbeats only touch memory ([`super::SessionRegistry`]). Once per
//! heartbeat interval [`Domain::sweep`] does the rest in a few statements:
//! 1. daemons heard from here within 3 intervals get `last_seen_at = now`;
//!    daemons silent longer lose their session and go offline, as do
//!    daemons no replica has refreshed in 3 intervals (a crashed replica's);
//! 2. once a daemon has been silent for the grace period, its running tasks
//!    become interrupted and its dispatched ones go back to the queue;
//! 3. a task dispatched longer than the dispatch timeout whose SpawnTask was
//!    never acknowledged goes back to the queue;
//! 4. open streams whose token was revoked, whose user left the workspace,
//!    or whose daemon was disconnected end ([`super::streams`]);
//! 5. queued tasks are offered to the daemons connected here with a free
//!    slot, so a dispatch that never ran (its StartTask's caller went away
//!    after the task was queued) costs at most one interval.
//!
//! A daemon that returns within the grace and reports its tasks running
//! keeps them (`open_session`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::{Domain, Result};
use crate::model::*;

/// Liveness settings.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    /// How often daemons beat, and how often the sweep runs.
    pub heartbeat: Duration,
    /// How long after a daemon's last sign of life its tasks are given up.
    pub grace: Duration,
    /// How long a dispatched task may wait for its daemon to take the
    /// SpawnTask before it is queued again.
    pub dispatch_timeout: Duration,
    /// How long an agent's permission request waits for a person before it
    /// is denied.
    pub approval_timeout: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            heartbeat: Duration::from_secs(15),
            grace: Duration::from_secs(120),
            dispatch_timeout: Duration::from_secs(60),
            approval_timeout: Duration::from_secs(600),
        }
    }
}

impl Liveness {
    /// Silence after which a daemon is offline: 3 missed heartbeats.
    pub fn offline_after(&self) -> Duration {
        self.heartbeat * 3
    }
}

/// What one sweep changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Streams whose token, membership or daemon lost its access.
    pub streams_ended: usize,
    /// Approvals nobody answered in time, denied.
    pub approvals_expired: usize,
    pub offline: usize,
    pub interrupted: usize,
    pub requeued: usize,
    /// Queued tasks that a missed dispatch had left waiting.
    pub dispatched: usize,
}

fn micros(d: Duration) -> Micros {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl Domain {
    /// Runs [`Domain::sweep`] every heartbeat interval until the streams
    /// close. Every replica runs one; each step is a conditional update, so
    /// two replicas sweeping at once change each task once.
    pub fn spawn_liveness(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let domain = self.clone();
        tokio::spawn(async move {
            let closed = domain.closed();
            tokio::pin!(closed);
            let mut tick = tokio::time::interval(domain.liveness.heartbeat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut closed => return,
                    _ = tick.tick() => {}
                }
                let swept = domain.sweep().await;
                if let Ok(r) = &swept {
                    let m = &crate::metrics::METRICS;
                    m.sweeps.inc();
                    m.swept_daemons_offline.inc_by(r.offline as u64);
                    m.swept_tasks_interrupted.inc_by(r.interrupted as u64);
                    m.swept_tasks_requeued.inc_by(r.requeued as u64);
                }
                match swept {
                    Ok(r) if r != SweepReport::default() => tracing::info!(
                        streams_ended = r.streams_ended,
                        approvals_expired = r.approvals_expired,
                        offline = r.offline,
                        interrupted = r.interrupted,
                        requeued = r.requeued,
                        dispatched = r.dispatched,
                        "liveness sweep"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "liveness sweep failed"),
                }
            }
        })
    }

    /// One liveness pass; see the module documentation.
    pub async fn sweep(&self) -> Result<SweepReport> {
        let l = self.liveness;
        let mut report = SweepReport::default();
        let now = now_micros();

        report.streams_ended = self.check_streams().await?;
        report.approvals_expired = self.expire_approvals().await?;
        let (alive, silent) = self.sessions.sweep(l.offline_after());
        self.store.touch_daemons(&alive, now).await?;
        let offline = self
            .store
            .expire_daemons(now - micros(l.offline_after()), &silent)
            .await?;
        for id in &offline {
            tracing::info!(daemon_id = %id, "daemon offline: no heartbeat for 3 intervals");
        }
        report.offline = offline.len();

        let mut requeued_in = BTreeSet::new();
        for task in self.store.orphaned_tasks(now - micros(l.grace)).await? {
            let daemon_id = task.daemon_id.clone().unwrap_or_default();
            if task.status == TaskStatus::Running {
                let reason = format!("daemon {daemon_id} was lost");
                if self
                    .give_up("system", task, TaskStatus::Interrupted, &reason)
                    .await?
                    .is_some()
                {
                    report.interrupted += 1;
                }
            } else if let Some(t) = self
                .requeue(task, "its daemon was lost before it started")
                .await?
            {
                requeued_in.insert(t.workspace_id);
                report.requeued += 1;
            }
        }
        for task in self
            .store
            .stale_dispatches(now - micros(l.dispatch_timeout))
            .await?
        {
            if let Some(t) = self.requeue(task, "its daemon never took it").await? {
                requeued_in.insert(t.workspace_id);
                report.requeued += 1;
            }
        }
        for ws in requeued_in {
            self.dispatch_workspace(&ws).await?;
        }
        report.dispatched = self.dispatch_missed().await?;
        Ok(report)
    }

    /// Moves a task off its daemon, unless it changed meanwhile (another
    /// replica swept it, or it moved on).
    pub(super) async fn give_up(
        &self,
        actor: &str,
        task: Task,
        to: TaskStatus,
        reason: &str,
    ) -> Result<Option<Task>> {
        let (from, daemon_id) = (task.status, task.daemon_id.clone());
        let still = |t: &Task| t.status == from && t.daemon_id == daemon_id;
        self.transition_when(actor, task, to, reason, still, |t| {
            t.status_reason = reason.to_string();
            if to == TaskStatus::Queued {
                t.daemon_id = None;
            } else {
                t.ended_at = Some(t.updated_at);
            }
        })
        .await
    }

    /// Queues a dispatched task again and takes its SpawnTask back out of
    /// the daemon's outbox.
    pub(super) async fn requeue(&self, task: Task, reason: &str) -> Result<Option<Task>> {
        let daemon_id = task.daemon_id.clone().unwrap_or_default();
        let Some(task) = self
            .give_up("system", task, TaskStatus::Queued, reason)
            .await?
        else {
            return Ok(None);
        };
        self.store
            .drop_commands(&task.id, &daemon_id, reason)
            .await?;
        tracing::info!(task_id = %task.id, daemon_id = %daemon_id, reason, "task queued again");
        Ok(Some(task))
    }
}
