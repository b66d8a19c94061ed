//! Dispatch: queued tasks pushed to connected daemons with free slots, or
//! claimed by polling daemons. Each claim is atomic in the store.

use prost::Message;

use super::Domain;
use super::Result;
use crate::model::*;
use crate::pb;
use crate::store::{NewCommand, SpawnMaker};
use crate::wire;

/// One lock per stripe of daemon ids, held while a daemon's free slots
/// are filled: the claim counts the daemon's active tasks and then takes
/// that many, so two fills of one daemon at once would both see the same
/// slots free. A daemon's session, and so its fills, lives on one replica.
pub(super) struct FillLocks([tokio::sync::Mutex<()>; 64]);

impl Default for FillLocks {
    fn default() -> Self {
        FillLocks(std::array::from_fn(|_| tokio::sync::Mutex::new(())))
    }
}

impl FillLocks {
    fn of(&self, daemon_id: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        daemon_id.hash(&mut h);
        &self.0[(h.finish() % 64) as usize]
    }
}

/// A task handed to a daemon, with what it needs to start.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub task: Task,
    pub first_seq: i64,
    pub input: AttemptInput,
}

impl Domain {
    /// ClaimTask: the oldest queued task this daemon can run, atomically.
    pub async fn claim_task(&self, p: &Principal, daemon_id: &str) -> Result<Option<Assignment>> {
        let daemon = self.load_daemon(p, daemon_id).await?;
        if self
            .store
            .with_free_slots(vec![daemon.clone()])
            .await?
            .is_empty()
        {
            return Ok(None);
        }
        let Some((task, input)) = self.store.claim_tasks(&daemon, 1, None).await?.pop() else {
            return Ok(None);
        };
        self.task_changed(&task, false);
        Ok(Some(Assignment {
            first_seq: task.last_seq + 1,
            task,
            input,
        }))
    }

    /// Pushes queued work to a connected daemon while it has free slots:
    /// each claim writes its SpawnTask into the outbox in the same
    /// transaction, then the session's pump is woken.
    pub async fn dispatch_to(&self, daemon_id: &str) -> Result<usize> {
        let Some(daemon) = self.sessions.dispatchable(daemon_id) else {
            return Ok(0);
        };
        let mut n = 0;
        for (daemon, free) in self.store.with_free_slots(vec![daemon]).await? {
            n += self.fill(&daemon, free).await?;
        }
        Ok(n)
    }

    /// Claims up to `free` queued tasks for a connected daemon in one
    /// transaction, each with its SpawnTask, then wakes the daemon's
    /// session.
    pub(super) async fn fill(&self, daemon: &Daemon, free: i64) -> Result<usize> {
        let key = self.agent_key().await?;
        let daemon_id = daemon.id.clone();
        let make: SpawnMaker = Box::new(move |task: &Task, input: &AttemptInput| {
            spawn_command(&daemon_id, task, input, &key)
        });
        let _one_at_a_time = self.fill_locks.of(&daemon.id).lock().await;
        let claimed = self.store.claim_tasks(daemon, free, Some(make)).await?;
        for (task, _) in &claimed {
            crate::metrics::METRICS.claimed(&task.id, task.queued_at);
            self.task_changed(task, false);
        }
        if !claimed.is_empty() {
            self.sessions.wake(&daemon.id);
        }
        Ok(claimed.len())
    }

    /// Offers a workspace's queue to each of its connected daemons.
    pub async fn dispatch_workspace(&self, workspace_id: &str) -> Result<()> {
        // Most connected daemons are usually busy: one read finds the free
        // ones, rather than a read per daemon.
        let daemons = self.sessions.in_workspace(workspace_id);
        for (daemon, free) in self.store.with_free_slots(daemons).await? {
            self.fill(&daemon, free).await?;
        }
        Ok(())
    }

    /// Offers the queue of every workspace that has queued tasks to its
    /// daemons connected here with a free slot: what a dispatch that never
    /// ran left behind (a StartTask whose caller went away after the task
    /// was queued, before its dispatch). Answers how many were claimed.
    pub(super) async fn dispatch_missed(&self) -> Result<usize> {
        let daemons = self.sessions.taking_work();
        let mut has_queued = std::collections::HashMap::new();
        let mut n = 0;
        for (daemon, free) in self.store.with_free_slots(daemons).await? {
            let ws = &daemon.workspace_id;
            if !has_queued.contains_key(ws) {
                has_queued.insert(ws.clone(), self.store.has_queued(ws).await?);
            }
            if has_queued[ws] {
                n += self.fill(&daemon, free).await?;
            }
        }
        Ok(n)
    }
}

pub(super) fn spawn_command(
    daemon_id: &str,
    task: &Task,
    input: &AttemptInput,
    agent_key: &[u8],
) -> NewCommand {
    let id = uuid::Uuid::now_v7().to_string();
    let resume = (!task.agent_session_id.is_empty()).then(|| pb::AgentResume {
        agent_session_id: task.agent_session_id.clone(),
        working_directory: task.working_directory.clone(),
    });
    let command = pb::Command {
        id: id.clone(),
        task_id: task.id.clone(),
        kind: Some(pb::command::Kind::SpawnTask(pb::SpawnTask {
            task: Some(wire::task(task.clone())),
            first_seq: task.last_seq + 1,
            resume,
            context: input.context.clone(),
            prompt: input.prompt.clone(),
            agent_token: super::agents::mint(agent_key, &task.id, task.attempt),
        })),
    };
    NewCommand {
        id,
        daemon_id: daemon_id.to_string(),
        task_id: task.id.clone(),
        payload: command.encode_to_vec(),
    }
}
