//! Live fan-out of task changes and output to watchers.
//!
//! Publishing never waits: each channel is a bounded broadcast, and a
//! watcher that falls behind is told it lagged and catches up from the
//! database instead of slowing ingestion. What a channel can hold is
//! bounded in bytes too: a large message travels as a [`TaskUpdate::Stored`]
//! marker (watchers read it from the database), and the workspace feed
//! carries each task with its plan cut to
//! [`crate::model::PLAN_PREVIEW_BYTES`]. A channel
//! goes away with its last subscriber.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::model::{Task, TaskMessage};

const TASK_CAPACITY: usize = 256;
const WORKSPACE_CAPACITY: usize = 1024;
/// Messages up to this size travel inline; larger ones as a marker.
pub const INLINE_MESSAGE_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub enum TaskUpdate {
    Message(TaskMessage),
    /// Output up to `seq` is stored; read what you have not seen from the
    /// database.
    Stored {
        seq: i64,
    },
    Task(Box<Task>),
}

#[derive(Debug, Clone)]
pub struct WorkspaceUpdate {
    pub task: Task,
    pub deleted: bool,
}

type Channels<T> = Arc<Mutex<HashMap<String, broadcast::Sender<T>>>>;

#[derive(Default)]
pub struct OutputHub {
    tasks: Channels<TaskUpdate>,
    workspaces: Channels<WorkspaceUpdate>,
}

/// One subscriber of a channel; the channel is dropped with its last one.
pub struct Subscription<T: Clone> {
    rx: Option<broadcast::Receiver<T>>,
    key: String,
    channels: Channels<T>,
}

impl<T: Clone> Subscription<T> {
    pub async fn recv(&mut self) -> Result<T, broadcast::error::RecvError> {
        match self.rx.as_mut() {
            Some(rx) => rx.recv().await,
            None => Err(broadcast::error::RecvError::Closed),
        }
    }
}

impl<T: Clone> Drop for Subscription<T> {
    fn drop(&mut self) {
        drop(self.rx.take());
        let mut map = lock(&self.channels);
        if map
            .get(&self.key)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            map.remove(&self.key);
        }
    }
}

fn lock<T>(
    channels: &Channels<T>,
) -> std::sync::MutexGuard<'_, HashMap<String, broadcast::Sender<T>>> {
    channels.lock().unwrap_or_else(|e| e.into_inner())
}

fn subscribe<T: Clone>(channels: &Channels<T>, key: &str, capacity: usize) -> Subscription<T> {
    let rx = lock(channels)
        .entry(key.to_string())
        .or_insert_with(|| broadcast::channel(capacity).0)
        .subscribe();
    Subscription {
        rx: Some(rx),
        key: key.to_string(),
        channels: channels.clone(),
    }
}

fn publish<T: Clone>(channels: &Channels<T>, key: &str, value: T) {
    if let Some(tx) = lock(channels).get(key) {
        // No receiver is fine: the channel goes with its last subscriber.
        let _ = tx.send(value);
    }
}

/// `task` with its plan cut to a preview.
fn preview(task: &Task) -> Task {
    let mut t = task.clone();
    t.cut_plan();
    t
}

impl OutputHub {
    pub fn subscribe_task(&self, task_id: &str) -> Subscription<TaskUpdate> {
        subscribe(&self.tasks, task_id, TASK_CAPACITY)
    }

    pub fn subscribe_workspace(&self, workspace_id: &str) -> Subscription<WorkspaceUpdate> {
        subscribe(&self.workspaces, workspace_id, WORKSPACE_CAPACITY)
    }

    /// Whether anyone here watches this task, or its workspace.
    pub fn watched(&self, task_id: &str, workspace_id: &str) -> bool {
        self.watched_task(task_id) || lock(&self.workspaces).contains_key(workspace_id)
    }

    /// Whether anyone here watches this task.
    pub fn watched_task(&self, task_id: &str) -> bool {
        lock(&self.tasks).contains_key(task_id)
    }

    /// Ids of the tasks watched here.
    pub fn watched_tasks(&self) -> Vec<String> {
        lock(&self.tasks).keys().cloned().collect()
    }

    /// Channels open now: (tasks, workspaces).
    pub fn channels(&self) -> (usize, usize) {
        (lock(&self.tasks).len(), lock(&self.workspaces).len())
    }

    /// A new message; large ones go as a [`TaskUpdate::Stored`] marker.
    pub fn message(&self, message: TaskMessage) {
        let id = message.task_id.clone();
        let size = message.content.len() + message.tool_input_json.len() + message.tool_name.len();
        let update = if size > INLINE_MESSAGE_BYTES {
            TaskUpdate::Stored { seq: message.seq }
        } else {
            TaskUpdate::Message(message)
        };
        publish(&self.tasks, &id, update);
    }

    /// Output up to `seq` is stored: watchers read it from the database.
    pub fn stored(&self, task_id: &str, seq: i64) {
        publish(&self.tasks, task_id, TaskUpdate::Stored { seq });
    }

    pub fn task_changed(&self, task: &Task, deleted: bool) {
        publish(
            &self.tasks,
            &task.id,
            TaskUpdate::Task(Box::new(task.clone())),
        );
        if lock(&self.workspaces).contains_key(&task.workspace_id) {
            publish(
                &self.workspaces,
                &task.workspace_id,
                WorkspaceUpdate {
                    task: preview(task),
                    deleted,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_goes_with_its_last_subscriber() {
        let hub = OutputHub::default();
        let a = hub.subscribe_task("t");
        let b = hub.subscribe_task("t");
        let w = hub.subscribe_workspace("w");
        assert_eq!(hub.channels(), (1, 1));
        drop(a);
        assert!(hub.watched_task("t"));
        drop(b);
        assert!(!hub.watched_task("t"));
        drop(w);
        assert_eq!(hub.channels(), (0, 0));
    }
}
