//! WatchTask and WatchTasks: replay from the store, then follow live, with
//! no gap and no duplicate, in bounded memory.
//!
//! A watcher holds at most [`super::Limits::watcher_budget_bytes`] of
//! undelivered output: each update takes its size from a semaphore and
//! gives it back when the client's stream takes it. A watcher that waits
//! for budget stops reading the live feed, falls behind it, and catches up
//! from the database a byte-bounded page at a time once the client reads
//! again: a slow reader never holds the server's memory.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc, watch};

use super::hub::Subscription;
use super::{
    Domain, Error, Result, StreamGuard, TaskUpdate, WorkspaceUpdate, invalid, shutting_down,
};
use crate::model::*;

/// One update for a watch's client, holding its share of the watcher's
/// byte budget until the client's stream takes it.
pub struct Delivery<T> {
    pub update: T,
    _budget: OwnedSemaphorePermit,
}

pub type Deliveries<T> = mpsc::Receiver<Result<Delivery<T>>>;

/// Updates queued for a client at most, whatever their size.
const QUEUE: usize = 64;
/// Stored output read per catch-up page, at most.
const PAGE_MESSAGES: i64 = 1000;
const PAGE_BYTES: usize = 1 << 20;
/// How long a stream that must end waits for room to say why.
const LAST_WORD: Duration = Duration::from_secs(1);

/// Why a watcher stops.
enum Stop {
    /// The client left.
    Gone,
    /// The server closes the stream with this error.
    End(Error),
}

/// What a watcher sends through: the queue, the byte budget, and the
/// signals that end it (the caller's access, the server's shutdown).
struct Outlet<T> {
    tx: mpsc::Sender<Result<Delivery<T>>>,
    budget: Arc<Semaphore>,
    limit: usize,
    access: StreamGuard,
    closing: watch::Receiver<bool>,
}

impl<T> Outlet<T> {
    fn new(domain: &Domain, access: StreamGuard) -> (Outlet<T>, Deliveries<T>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let limit = domain.limits.watcher_budget_bytes.max(1);
        let outlet = Outlet {
            tx,
            budget: Arc::new(Semaphore::new(limit)),
            limit,
            access,
            closing: domain.closing.subscribe(),
        };
        (outlet, rx)
    }

    /// Sends `update` once its `size` fits the budget.
    async fn send(&mut self, update: T, size: usize) -> std::result::Result<(), Stop> {
        let want = u32::try_from(size.clamp(1, self.limit)).unwrap_or(u32::MAX);
        let budget = self.budget.clone();
        let permit = tokio::select! {
            p = budget.acquire_many_owned(want) => p.map_err(|_| Stop::Gone)?,
            why = self.access.ended() => return Err(Stop::End(why.into())),
            _ = self.closing.wait_for(|c| *c) => return Err(Stop::End(shutting_down())),
            _ = self.tx.closed() => return Err(Stop::Gone),
        };
        let delivery = Delivery {
            update,
            _budget: permit,
        };
        self.tx.send(Ok(delivery)).await.map_err(|_| Stop::Gone)
    }

    /// Ends the stream: with `error` if the client makes room for it soon.
    async fn finish(self, stop: Stop) {
        if let Stop::End(error) = stop
            && let Ok(Ok(slot)) = tokio::time::timeout(LAST_WORD, self.tx.reserve()).await
        {
            slot.send(Err(error));
        }
    }

    /// Completes when the stream must end, with why.
    async fn stopped(&mut self) -> Stop {
        tokio::select! {
            why = self.access.ended() => Stop::End(why.into()),
            _ = self.closing.wait_for(|c| *c) => Stop::End(shutting_down()),
            _ = self.tx.closed() => Stop::Gone,
        }
    }
}

fn update_bytes(u: &TaskUpdate) -> usize {
    match u {
        TaskUpdate::Message(m) => m.content.len() + m.tool_input_json.len() + m.tool_name.len(),
        TaskUpdate::Task(t) => super::tasks::task_bytes(t),
        TaskUpdate::Stored { .. } => 0,
    }
}

/// One WatchTask stream: the last seq it delivered, and how it catches up
/// from the store when the live feed skipped ahead or it fell behind.
struct Watcher {
    domain: Arc<Domain>,
    task_id: String,
    last: i64,
    out: Outlet<TaskUpdate>,
    /// Follow across the task's end (WatchTaskRequest.follow).
    follow: bool,
    /// The last seq of the task's attempt, once it has ended.
    ended_at: Option<i64>,
}

/// A task in one of these states is done until someone starts it again;
/// a watch that does not follow ends there. (`interrupted` is not among
/// them: a task cut short by its daemon's shutdown is queued again.)
fn has_ended(status: TaskStatus) -> bool {
    matches!(
        status,
        TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
    )
}

impl Watcher {
    /// Sends the task, replays its stored output, then follows the live
    /// feed until the client leaves, its access ends or the server stops.
    async fn run(mut self, task: Task, mut live: Subscription<TaskUpdate>) {
        let stop = match self.follow(task, &mut live).await {
            Ok(()) => return,
            Err(stop) => stop,
        };
        drop(live);
        self.out.finish(stop).await;
    }

    async fn follow(
        &mut self,
        task: Task,
        live: &mut Subscription<TaskUpdate>,
    ) -> std::result::Result<(), Stop> {
        self.note_status(&task);
        self.send(TaskUpdate::Task(Box::new(task))).await?;
        self.catch_up().await?;
        loop {
            if self.is_done() {
                return Ok(());
            }
            let update = tokio::select! {
                u = live.recv() => u,
                stop = self.out.stopped() => return Err(stop),
            };
            match update {
                Ok(TaskUpdate::Message(m)) if m.seq <= self.last => {}
                Ok(TaskUpdate::Message(m)) if m.seq == self.last + 1 => {
                    self.last = m.seq;
                    self.send(TaskUpdate::Message(m)).await?;
                }
                Ok(TaskUpdate::Stored { seq }) if seq <= self.last => {}
                Ok(TaskUpdate::Message(_) | TaskUpdate::Stored { .. })
                | Err(broadcast::error::RecvError::Lagged(_)) => self.catch_up().await?,
                Ok(TaskUpdate::Task(t)) => {
                    // Output it has not seen yet (a peer replica's, say) is
                    // read from the store.
                    let behind = t.last_seq > self.last;
                    self.note_status(&t);
                    self.send(TaskUpdate::Task(t)).await?;
                    if behind {
                        self.catch_up().await?;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }

    /// Notes where the task stands: whether it has ended, and output
    /// removed by retention (the replay goes on after it; the task sent
    /// to the client says how far it was removed).
    fn note_status(&mut self, task: &Task) {
        self.ended_at = has_ended(task.status).then_some(task.last_seq);
        self.last = self.last.max(task.output_pruned_seq);
    }

    /// The task has ended and its output was all sent: a watch that does
    /// not follow is over.
    fn is_done(&self) -> bool {
        !self.follow && self.ended_at.is_some_and(|last_seq| self.last >= last_seq)
    }

    async fn send(&mut self, update: TaskUpdate) -> std::result::Result<(), Stop> {
        let size = update_bytes(&update);
        self.out.send(update, size).await
    }

    /// Sends the stored messages after `last` up to the first gap, a
    /// byte-bounded page at a time: a message beyond a gap is stored but
    /// not yet acknowledged, and comes live once the gap is filled.
    async fn catch_up(&mut self) -> std::result::Result<(), Stop> {
        loop {
            let batch = self
                .domain
                .store
                .list_messages(&self.task_id, self.last, PAGE_MESSAGES, PAGE_BYTES)
                .await
                .map_err(|e| Stop::End(e.into()))?;
            if batch.is_empty() {
                return Ok(());
            }
            for m in batch {
                if m.seq != self.last + 1 {
                    return Ok(());
                }
                self.last = m.seq;
                self.send(TaskUpdate::Message(m)).await?;
            }
        }
    }
}

impl Domain {
    /// Streams a task's output from `since_seq` on, then live, with status
    /// changes: first the task itself, then its stored messages, then what
    /// arrives. The task is loaded (and the caller's access to it checked)
    /// before anything is allocated for it; the hub is subscribed before the
    /// task is read again and the replay reads the store, so nothing falls
    /// between them; seqs at or below the last one sent are skipped, and a
    /// gap (a lagging watcher) is filled from the store. Unless `follow`,
    /// the stream ends once the task has ended and its output was sent.
    pub async fn watch_task(
        self: &Arc<Self>,
        p: &Principal,
        id: &str,
        since_seq: i64,
        follow: bool,
    ) -> Result<Deliveries<TaskUpdate>> {
        if since_seq < 0 {
            return Err(invalid("since_seq", "must not be negative"));
        }
        let task = self.load_task(p, id).await?;
        let access = self.open_stream(p, &task.workspace_id, None)?;
        let live = self.hub.subscribe_task(&task.id);
        let task = self.load_task(p, id).await?;
        let (out, rx) = Outlet::new(self, access);
        let watcher = Watcher {
            domain: self.clone(),
            task_id: task.id.clone(),
            last: since_seq,
            out,
            follow,
            ended_at: None,
        };
        tokio::spawn(watcher.run(task, live));
        Ok(rx)
    }

    /// Task changes of a workspace, live (plans cut to a preview). A
    /// watcher that falls more than the feed's capacity behind is told so
    /// and should list the tasks again.
    pub fn watch_tasks(
        &self,
        p: &Principal,
        workspace: &str,
    ) -> Result<Deliveries<WorkspaceUpdate>> {
        let ws = self.resolve_workspace(p, workspace)?;
        let access = self.open_stream(p, &ws.id, None)?;
        let mut live = self.hub.subscribe_workspace(&ws.id);
        let (mut out, rx) = Outlet::new(self, access);
        tokio::spawn(async move {
            let stop = loop {
                let update = tokio::select! {
                    u = live.recv() => u,
                    stop = out.stopped() => break stop,
                };
                let sent = match update {
                    Ok(u) => {
                        let size = super::tasks::task_bytes(&u.task);
                        out.send(u, size).await
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        Err(Stop::End(Error::ResourceExhausted(format!(
                            "watcher fell {n} changes behind; list the tasks again and re-watch"
                        ))))
                    }
                    Err(broadcast::error::RecvError::Closed) => Err(Stop::Gone),
                };
                if let Err(stop) = sent {
                    break stop;
                }
            };
            drop(live);
            out.finish(stop).await;
        });
        Ok(rx)
    }
}
