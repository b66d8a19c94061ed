//! Group commit of task writes: the transitions, claims, commands and
//! command acknowledgements that arrive while the writer is busy run one
//! after another in one transaction and share its commit, however many
//! sessions and requests they came from. A write waits for no timer: when
//! nothing else is waiting it commits alone, as it would without the group.
//!
//! A commit costs far more than a statement (SQLite writes every page the
//! transaction dirtied to the WAL again, PostgreSQL waits for its WAL
//! flush), and the writes of one moment touch the same pages: the newest
//! tasks, the end of the events table, the outbox.
//!
//! Each write answers only once its group is committed. When one fails,
//! the group is rolled back and each write runs again alone, so one bad
//! write fails no other. A queued write commits even if its caller stops
//! waiting (a cancelled request): what the caller would have done next
//! does not happen, which the liveness sweep covers for the one that
//! matters (a StartTask's dispatch, `Domain::dispatch_missed`).

use std::sync::Arc;

use futures_util::future::BoxFuture;
use sqlx::Any;
use tokio::sync::{Mutex, Semaphore, mpsc, oneshot};

use super::{Result, Store};

/// The transaction a grouped write runs in.
pub(super) type Tx = sqlx::Transaction<'static, Any>;

/// Most writes in one group.
const MAX_GROUP: usize = 128;

/// Writes queued at most before callers wait.
const QUEUE: usize = 4096;

/// A write's statements, run on the group's transaction (again, alone, if
/// its group fails): a function of its data, so it can be run twice.
type Work<D, T> = for<'a> fn(&'a Store, &'a mut Tx, &'a D) -> BoxFuture<'a, Result<T>>;

/// One queued write, whatever it answers.
trait Job: Send {
    fn run<'a>(&'a mut self, store: &'a Store, tx: &'a mut Tx) -> BoxFuture<'a, Result<()>>;
    /// Sends the answer: what the last run gave once its transaction
    /// committed, or why it did not.
    fn answer(self: Box<Self>, committed: Result<()>);
}

struct Write<D, T> {
    data: D,
    work: Work<D, T>,
    out: Option<T>,
    done: oneshot::Sender<Result<T>>,
}

impl<D: Send + Sync, T: Send> Job for Write<D, T> {
    fn run<'a>(&'a mut self, store: &'a Store, tx: &'a mut Tx) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.out = Some((self.work)(store, tx, &self.data).await?);
            Ok(())
        })
    }

    fn answer(self: Box<Self>, committed: Result<()>) {
        let Write { out, done, .. } = *self;
        // A committed write has run, so `out` is set.
        let _ = done.send(committed.and_then(|()| out.ok_or(super::Error::WriterStopped)));
    }
}

/// Where writes queue for the committers.
#[derive(Clone)]
pub(super) struct Group {
    queue: mpsc::Sender<Box<dyn Job>>,
    /// One permit per transaction that may be open at once: a committer
    /// holds one while it commits a group, and a write that finds one free
    /// (nothing is committing) commits at once in its caller's task,
    /// without the hand-over to a committer and back.
    free: Arc<Semaphore>,
}

impl Group {
    /// Starts `committers` committers over `store` (a store without a
    /// group of its own). They end when the last `Group` is dropped.
    pub(super) fn start(store: Store, committers: usize) -> Self {
        let committers = committers.max(1);
        let (queue, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let free = Arc::new(Semaphore::new(committers));
        for _ in 0..committers {
            tokio::spawn(commit_loop(store.clone(), rx.clone(), free.clone()));
        }
        Self { queue, free }
    }
}

impl Store {
    /// Runs `work` over `data` in the next group's transaction; answers
    /// what it gave once that transaction committed. Without committers
    /// (theirs is the store that runs the work, or the server is closing)
    /// it runs in a transaction of its own.
    pub(super) async fn grouped<D, T>(&self, data: D, work: Work<D, T>) -> Result<T>
    where
        D: Send + Sync + 'static,
        T: Send + 'static,
    {
        let (done, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Write {
            data,
            work,
            out: None,
            done,
        });
        let (alone, _permit) = match &self.group {
            Some(group) => match group.free.clone().try_acquire_owned() {
                Ok(permit) => (Some(job), Some(permit)),
                Err(_) => (group.queue.send(job).await.err().map(|e| e.0), None),
            },
            None => (Some(job), None),
        };
        if let Some(mut job) = alone {
            let committed = commit(self, std::slice::from_mut(&mut job)).await;
            job.answer(committed);
        }
        answer.await.unwrap_or(Err(super::Error::WriterStopped))
    }
}

/// Runs `jobs` in order in one transaction and commits it.
async fn commit(store: &Store, jobs: &mut [Box<dyn Job>]) -> Result<()> {
    let mut tx = store.writer.begin().await?;
    for job in jobs.iter_mut() {
        job.run(store, &mut tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn commit_loop(
    store: Store,
    rx: Arc<Mutex<mpsc::Receiver<Box<dyn Job>>>>,
    free: Arc<Semaphore>,
) {
    loop {
        let mut jobs: Vec<Box<dyn Job>> = Vec::new();
        let _permit = {
            let mut rx = rx.lock().await;
            match rx.recv().await {
                Some(job) => jobs.push(job),
                None => return,
            }
            // What arrives while the open transactions finish joins too.
            let Ok(permit) = free.clone().acquire_owned().await else {
                return;
            };
            while jobs.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            permit
        };
        match commit(&store, &mut jobs).await {
            Ok(()) => {
                for job in jobs {
                    job.answer(Ok(()));
                }
            }
            Err(e) if jobs.len() == 1 => {
                if let Some(job) = jobs.pop() {
                    job.answer(Err(e));
                }
            }
            // One bad write must not fail the others: each runs alone
            // and is answered with its own result.
            Err(_) => {
                for mut job in jobs {
                    let alone = commit(&store, std::slice::from_mut(&mut job)).await;
                    job.answer(alone);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use sqlx::Row;

    use super::*;

    async fn fresh() -> (Store, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "taskmesh-group-{}.db",
            uuid::Uuid::new_v4().simple()
        ));
        let store = Store::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        (store, path)
    }

    /// Stores a secret named `name`: a write that fails when the name is
    /// taken.
    async fn put(store: &Store, name: &str) -> Result<()> {
        store
            .grouped(name.to_owned(), |_, tx, name| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO server_secrets (name, value) VALUES ($1, 'v')")
                        .bind(name)
                        .execute(&mut **tx)
                        .await?;
                    Ok(())
                })
            })
            .await
    }

    async fn names(store: &Store) -> Vec<String> {
        sqlx::query("SELECT name FROM server_secrets ORDER BY name")
            .fetch_all(&store.reader)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    #[tokio::test]
    async fn one_failing_write_in_a_group_fails_no_other() {
        let (store, path) = fresh().await;
        put(&store, "taken").await.unwrap();
        let group = store.group.clone().unwrap();
        // Hold the one transaction SQLite may have open: the writes below
        // queue, and are then committed as one group.
        let busy = group.free.clone().acquire_owned().await.unwrap();
        let writes: Vec<_> = ["a", "taken", "b"]
            .into_iter()
            .map(|name| {
                let store = store.clone();
                tokio::spawn(async move { put(&store, name).await })
            })
            .collect();
        // The committer holds the first and waits for the transaction; the
        // other two wait in the queue.
        while QUEUE - group.queue.capacity() < 2 {
            tokio::task::yield_now().await;
        }
        drop(busy);
        let mut answers = Vec::new();
        for w in writes {
            answers.push(w.await.unwrap().is_ok());
        }
        assert_eq!(answers, [true, false, true]);
        assert_eq!(names(&store).await, ["a", "b", "taken"]);
        store.close().await;
        let _ = std::fs::remove_file(path);
    }
}
