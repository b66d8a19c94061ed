//! What this replica tells the others on the same PostgreSQL database, and
//! what it does with what they tell it. The events say only *where to
//! look*: the database is the truth. `crate::cluster` carries them.

use tokio::sync::mpsc;

use crate::model::*;

use super::{Domain, Result};

/// What a replica tells the others.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerEvent {
    /// A task changed (or was deleted).
    Task {
        id: String,
        workspace_id: String,
        status: TaskStatus,
        deleted: bool,
    },
    /// A task's output grew over (from, to].
    Output {
        task_id: String,
        workspace_id: String,
        from: i64,
        to: i64,
    },
    /// A daemon has new commands in the outbox.
    Command { daemon_id: String },
}

/// Where the domain drops its events for the bridge to publish.
pub(super) struct Peers(mpsc::Sender<PeerEvent>);

impl Domain {
    /// Connects this domain to its peers; until then it has none.
    pub fn join_cluster(&self, events: mpsc::Sender<PeerEvent>) {
        let _ = self.peers.set(Peers(events));
    }

    fn tell_peers(&self, event: PeerEvent) {
        if let Some(Peers(tx)) = self.peers.get()
            && tx.try_send(event).is_err()
        {
            tracing::warn!("cluster event queue full; peers will catch up later");
        }
    }

    /// The database URL, for the bridge's own listening connection.
    pub fn database_url(&self) -> &str {
        self.store.url()
    }

    /// Publishes a payload to every replica (PostgreSQL NOTIFY).
    pub async fn notify_peers(&self, channel: &str, payload: &str) -> Result<()> {
        Ok(self.store.notify(channel, payload).await?)
    }

    /// A task changed: watchers here and on every replica hear of it.
    pub(super) fn task_changed(&self, task: &Task, deleted: bool) {
        self.hub.task_changed(task, deleted);
        self.tell_peers(PeerEvent::Task {
            id: task.id.clone(),
            workspace_id: task.workspace_id.clone(),
            status: task.status,
            deleted,
        });
    }

    /// A task's output grew from `from` to `to` (already published here).
    pub(super) fn output_grew(&self, task_id: &str, workspace_id: &str, from: i64, to: i64) {
        self.tell_peers(PeerEvent::Output {
            task_id: task_id.to_string(),
            workspace_id: workspace_id.to_string(),
            from,
            to,
        });
    }

    /// A daemon has new commands: wake its session here, or wherever it is.
    pub(super) fn wake_daemon(&self, daemon_id: &str) {
        if !self.sessions.wake(daemon_id) {
            self.tell_peers(PeerEvent::Command {
                daemon_id: daemon_id.to_string(),
            });
        }
    }

    /// Whether a daemon holds a session here or (with peers) on any replica.
    pub(super) async fn daemon_connected(&self, daemon_id: &str) -> Result<bool> {
        if self.sessions.is_connected(daemon_id) {
            return Ok(true);
        }
        if self.peers.get().is_none() {
            return Ok(false);
        }
        let daemon = self.store.get_daemon(daemon_id).await?;
        Ok(daemon.is_some_and(|d| d.state == DaemonState::Online))
    }

    /// Acts on a peer's event, for the watchers and daemons held here.
    pub async fn apply_peer_event(&self, event: PeerEvent) -> Result<()> {
        match event {
            PeerEvent::Task {
                id,
                workspace_id,
                status,
                deleted: true,
            } => {
                if self.hub.watched(&id, &workspace_id) {
                    self.hub
                        .task_changed(&tombstone(id, workspace_id, status), true);
                }
            }
            PeerEvent::Task {
                id,
                workspace_id,
                status,
                deleted: false,
            } => {
                if self.hub.watched(&id, &workspace_id)
                    && let Some(task) = self.store.get_task(&id).await?
                {
                    self.hub.task_changed(&task, false);
                }
                if status == TaskStatus::Queued {
                    self.dispatch_workspace(&workspace_id).await?;
                }
            }
            PeerEvent::Output { task_id, to, .. } => {
                // Watchers here read the new range from the store.
                if self.hub.watched_task(&task_id) {
                    self.hub.stored(&task_id, to);
                }
            }
            PeerEvent::Command { daemon_id } => {
                self.sessions.wake(&daemon_id);
            }
        }
        Ok(())
    }

    /// After missing peers' events: every session here reads its outbox,
    /// every workspace with daemons here offers its queue, and every
    /// watched task is refreshed (its watchers catch up from its last_seq).
    pub async fn resync(&self) -> Result<()> {
        for daemon in self.sessions.all() {
            self.sessions.wake(&daemon.id);
            self.dispatch_to(&daemon.id).await?;
        }
        for id in self.hub.watched_tasks() {
            if let Some(task) = self.store.get_task(&id).await? {
                self.hub.task_changed(&task, false);
            }
        }
        Ok(())
    }
}

/// What peers learn of a deleted task: enough to tell watchers it is gone.
fn tombstone(id: String, workspace_id: String, status: TaskStatus) -> Task {
    Task {
        id,
        workspace_id,
        parent_id: None,
        depth: 0,
        name: String::new(),
        plan: String::new(),
        status,
        version: 0,
        runtime: String::new(),
        repository: String::new(),
        branch: String::new(),
        daemon_id: None,
        pinned_daemon_id: None,
        attempt: 0,
        status_reason: String::new(),
        agent_session_id: String::new(),
        working_directory: String::new(),
        created_by: String::new(),
        created_at: 0,
        updated_at: now_micros(),
        queued_at: None,
        started_at: None,
        ended_at: None,
        last_seq: 0,
        stop_requested_at: None,
        progress_summary: String::new(),
        progress_percent: -1,
        plan_truncated: false,
        output_pruned_seq: 0,
        model: String::new(),
        permission_mode: String::new(),
        pending_approvals: 0,
        completion_action: CompletionAction::None,
        target_branch: String::new(),
    }
}
