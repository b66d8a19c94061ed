//! WatchTask and WatchTasks: replay from the store, then follow live, with
//! no gap and no duplicate.

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};

use super::{Domain, Result, TaskUpdate, WorkspaceUpdate, invalid, shutting_down};
use crate::model::*;

/// One WatchTask stream: the last seq it delivered, and how it catches up
/// from the store when the live feed skipped ahead or it fell behind.
struct Watcher {
    domain: Arc<Domain>,
    task_id: String,
    last: i64,
    tx: mpsc::Sender<Result<TaskUpdate>>,
}

/// The watcher's client has gone; nothing more to send.
struct Gone;

impl Watcher {
    /// Sends the task, replays its stored output, then follows the live
    /// feed until the client leaves or the server shuts down.
    async fn run(mut self, task: Task, mut live: broadcast::Receiver<TaskUpdate>) {
        let closed = self.domain.closed();
        tokio::pin!(closed);
        if self.send(TaskUpdate::Task(Box::new(task))).await.is_err()
            || self.catch_up().await.is_err()
        {
            return;
        }
        loop {
            let update = tokio::select! {
                u = live.recv() => u,
                _ = self.tx.closed() => return,
                _ = &mut closed => {
                    let _ = self.tx.send(Err(shutting_down())).await;
                    return;
                }
            };
            let sent = match update {
                Ok(TaskUpdate::Message(m)) if m.seq <= self.last => Ok(()),
                Ok(TaskUpdate::Message(m)) if m.seq == self.last + 1 => {
                    self.last = m.seq;
                    self.send(TaskUpdate::Message(m)).await
                }
                Ok(TaskUpdate::Message(_)) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.catch_up().await
                }
                Ok(TaskUpdate::Task(t)) => {
                    // Output it has not seen yet (a peer replica's, say) is
                    // read from the store.
                    let behind = t.last_seq > self.last;
                    match self.send(TaskUpdate::Task(t)).await {
                        Ok(()) if behind => self.catch_up().await,
                        sent => sent,
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if sent.is_err() {
                return;
            }
        }
    }

    async fn send(&self, update: TaskUpdate) -> std::result::Result<(), Gone> {
        self.tx.send(Ok(update)).await.map_err(|_| Gone)
    }

    /// Sends the stored messages after `last` up to the first gap: a
    /// message beyond a gap is stored but not yet acknowledged, and comes
    /// live once the gap is filled.
    async fn catch_up(&mut self) -> std::result::Result<(), Gone> {
        const PAGE: i64 = 1000;
        loop {
            let batch = match self
                .domain
                .store
                .list_messages(&self.task_id, self.last, PAGE)
                .await
            {
                Ok(batch) => batch,
                Err(e) => {
                    let _ = self.tx.send(Err(e.into())).await;
                    return Err(Gone);
                }
            };
            let full = batch.len() as i64 == PAGE;
            for m in batch {
                if m.seq != self.last + 1 {
                    return Ok(());
                }
                self.last = m.seq;
                self.send(TaskUpdate::Message(m)).await?;
            }
            if !full {
                return Ok(());
            }
        }
    }
}

impl Domain {
    /// Streams a task's output from `since_seq` on, then live, with status
    /// changes: first the task itself, then its stored messages, then what
    /// arrives. The hub is subscribed before the replay reads the store, so
    /// nothing falls between them; seqs at or below the last one sent are
    /// skipped, and a gap (a lagging watcher) is filled from the store.
    pub async fn watch_task(
        self: &Arc<Self>,
        p: &Principal,
        id: &str,
        since_seq: i64,
    ) -> Result<mpsc::Receiver<Result<TaskUpdate>>> {
        if since_seq < 0 {
            return Err(invalid("since_seq", "must not be negative"));
        }
        let live = self.hub.subscribe_task(id);
        let task = self.load_task(p, id).await?;
        let (tx, rx) = mpsc::channel(256);
        let watcher = Watcher {
            domain: self.clone(),
            task_id: task.id.clone(),
            last: since_seq,
            tx,
        };
        tokio::spawn(watcher.run(task, live));
        Ok(rx)
    }

    /// Task changes of a workspace, live.
    pub fn watch_tasks(
        &self,
        p: &Principal,
        workspace: &str,
    ) -> Result<broadcast::Receiver<WorkspaceUpdate>> {
        let ws = self.resolve_workspace(p, workspace)?;
        Ok(self.hub.subscribe_workspace(&ws.id))
    }
}
