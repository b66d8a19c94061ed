//! Group commit of output appends: every append waiting when the writer is
//! free goes into one transaction (one UPDATE of their tasks' marks, one
//! multi-row INSERT of their rows, one commit), however many sessions they
//! came from. An append waits for no timer: when nothing else is waiting
//! it commits alone, exactly as it would without the group.

use std::collections::HashSet;
use std::sync::Arc;

use sqlx::Row;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::messages::NewMessage;
use super::{ACTIVE, Result, Store};
use crate::model::now_micros;

/// Most appends in one group; a group also stops growing at
/// [`MAX_GROUP_ROWS`] (the first append always goes in).
const MAX_GROUP: usize = 256;
const MAX_GROUP_ROWS: usize = 5000;

/// Appends a committer holds at most before senders wait: a bound on what
/// waits in memory, far above the sessions one server holds in flight.
const QUEUE: usize = 4096;

/// One batch that continues a task's output exactly: rows `old + 1 ..`,
/// stored only if the task's mark is still `old` and the task is still
/// active on `daemon_id` in `attempt`.
pub struct Append {
    pub task_id: String,
    pub daemon_id: String,
    pub attempt: i64,
    pub old: i64,
    pub messages: Arc<[NewMessage]>,
}

struct Waiting {
    append: Append,
    done: oneshot::Sender<Result<bool>>,
}

/// Where appends queue for the committer.
#[derive(Clone)]
pub(super) struct Appends(mpsc::Sender<Waiting>);

impl Appends {
    /// Starts `committers` committers over `store` (a store without a
    /// queue of its own): while one commits, the next gathers its group.
    /// They end when the last `Appends` is dropped.
    pub(super) fn start(store: Store, committers: usize) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..committers.max(1) {
            tokio::spawn(commit_loop(store.clone(), rx.clone()));
        }
        Self(tx)
    }

    /// Queues `append` and answers whether it was stored once its group is
    /// committed. If the committers are gone (the server is closing) it was
    /// not: the caller takes the full path, or the daemon sends it again.
    pub(super) async fn append(&self, append: Append) -> Result<bool> {
        let (done, answer) = oneshot::channel();
        if self.0.send(Waiting { append, done }).await.is_err() {
            return Ok(false);
        }
        answer.await.unwrap_or(Ok(false))
    }
}

async fn commit_loop(store: Store, rx: Arc<Mutex<mpsc::Receiver<Waiting>>>) {
    let mut deferred: Vec<Waiting> = Vec::new();
    loop {
        let mut pending = std::mem::take(&mut deferred);
        {
            let mut rx = rx.lock().await;
            if pending.is_empty() {
                match rx.recv().await {
                    Some(w) => pending.push(w),
                    None => return,
                }
            }
            // Then whatever else is waiting, up to the group's bounds.
            while pending.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(w) => pending.push(w),
                    Err(_) => break,
                }
            }
        }
        let group = take_group(pending, &mut deferred);
        let (appends, answers): (Vec<Append>, Vec<_>) =
            group.into_iter().map(|w| (w.append, w.done)).unzip();
        match store.commit_group(&appends).await {
            Ok(stored) => {
                for (done, stored) in answers.into_iter().zip(stored) {
                    let _ = done.send(Ok(stored));
                }
            }
            // One bad append must not fail the others: each is tried
            // alone and answered with its own result.
            Err(e) if appends.len() == 1 => {
                let _ = answers.into_iter().next().map(|done| done.send(Err(e)));
            }
            Err(_) => {
                for (done, append) in answers.into_iter().zip(appends) {
                    let alone = store.commit_group(std::slice::from_ref(&append)).await;
                    let _ = done.send(alone.map(|s| s[0]));
                }
            }
        }
    }
}

/// The group to commit next, from `pending` in the order they came: the
/// first always, then the rest up to the group's bounds. An append for a
/// task already in the group goes to `deferred` for the next group (a mark
/// moves once per statement), as do those past the bounds, in order.
fn take_group(pending: Vec<Waiting>, deferred: &mut Vec<Waiting>) -> Vec<Waiting> {
    let mut group: Vec<Waiting> = Vec::with_capacity(pending.len());
    let (mut tasks, mut rows) = (HashSet::new(), 0);
    for w in pending {
        let fits = group.is_empty() || (group.len() < MAX_GROUP && rows < MAX_GROUP_ROWS);
        if fits && tasks.insert(w.append.task_id.clone()) {
            rows += w.append.messages.len();
            group.push(w);
        } else {
            deferred.push(w);
        }
    }
    group
}

impl Store {
    /// Commits `appends` (each for a different task) in one transaction:
    /// the marks that are still where each append expects move in one
    /// statement, then the rows of those appends go in. Answers, per
    /// append, whether it was stored.
    pub async fn commit_group(&self, appends: &[Append]) -> Result<Vec<bool>> {
        let mut tx = self.writer.begin().await?;
        let sql = format!(
            "UPDATE tasks SET last_seq = v.column3 FROM (VALUES {}) AS v \
             WHERE tasks.id = v.column1 AND tasks.last_seq = v.column2 \
             AND tasks.daemon_id = v.column4 AND tasks.attempt = v.column5 \
             AND tasks.status IN {} RETURNING tasks.id",
            self.rows_of(5, appends.len()),
            *ACTIVE
        );
        let mut q = sqlx::query(&sql);
        for a in appends {
            let last = a.messages.last().map_or(a.old, |m| m.seq);
            q = q
                .bind(a.task_id.clone())
                .bind(a.old)
                .bind(last)
                .bind(a.daemon_id.clone())
                .bind(a.attempt);
        }
        let moved = q
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<std::result::Result<HashSet<String>, _>>()?;
        let stored: Vec<bool> = appends.iter().map(|a| moved.contains(&a.task_id)).collect();
        let rows = appends
            .iter()
            .zip(&stored)
            .filter(|(_, stored)| **stored)
            .flat_map(|(a, _)| a.messages.iter().map(move |m| (&*a.task_id, a.attempt, m)))
            .collect::<Vec<_>>();
        self.insert_rows(&mut tx, &rows, now_micros()).await?;
        tx.commit().await?;
        Ok(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MessageKind;

    fn waiting(task: &str, rows: usize) -> Waiting {
        let message = NewMessage {
            seq: 1,
            kind: MessageKind::Stdout,
            content: String::new(),
            tool_name: String::new(),
            tool_input_json: String::new(),
            approval_id: String::new(),
        };
        Waiting {
            append: Append {
                task_id: task.into(),
                daemon_id: "d".into(),
                attempt: 1,
                old: 0,
                messages: vec![message; rows].into(),
            },
            done: oneshot::channel().0,
        }
    }

    fn tasks(ws: &[Waiting]) -> Vec<&str> {
        ws.iter().map(|w| w.append.task_id.as_str()).collect()
    }

    #[test]
    fn a_second_append_for_a_task_waits_for_the_next_group_in_order() {
        let mut deferred = Vec::new();
        let pending = ["a", "b", "a", "c", "a"].map(|t| waiting(t, 1)).into();
        let group = take_group(pending, &mut deferred);
        assert_eq!(tasks(&group), ["a", "b", "c"]);
        assert_eq!(tasks(&deferred), ["a", "a"]);
        let group = take_group(std::mem::take(&mut deferred), &mut deferred);
        assert_eq!((tasks(&group), tasks(&deferred)), (vec!["a"], vec!["a"]));
    }

    #[test]
    fn a_group_stops_at_its_bounds_but_never_empty() {
        let mut deferred = Vec::new();
        let group = take_group(
            vec![waiting("big", MAX_GROUP_ROWS + 1), waiting("b", 1)],
            &mut deferred,
        );
        assert_eq!((tasks(&group), tasks(&deferred)), (vec!["big"], vec!["b"]));

        let many: Vec<Waiting> = (0..MAX_GROUP + 3)
            .map(|i| waiting(&i.to_string(), 1))
            .collect();
        let group = take_group(many, &mut deferred);
        assert_eq!(group.len(), MAX_GROUP);
        assert_eq!(tasks(&deferred), ["b", "256", "257", "258"]);
    }
}
