//! Live fan-out of task changes and output to watchers.
//!
//! Publishing never waits: each channel is a bounded broadcast, and a
//! watcher that falls behind is told it lagged and catches up from the
//! database instead of slowing ingestion.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::broadcast;

use crate::model::{Task, TaskMessage};

const TASK_CAPACITY: usize = 1024;
const WORKSPACE_CAPACITY: usize = 1024;

#[derive(Debug, Clone)]
pub enum TaskUpdate {
    Message(TaskMessage),
    Task(Box<Task>),
}

#[derive(Debug, Clone)]
pub struct WorkspaceUpdate {
    pub task: Task,
    pub deleted: bool,
}

#[derive(Default)]
pub struct OutputHub {
    tasks: Mutex<HashMap<String, broadcast::Sender<TaskUpdate>>>,
    workspaces: Mutex<HashMap<String, broadcast::Sender<WorkspaceUpdate>>>,
}

fn subscribe<T: Clone>(
    map: &Mutex<HashMap<String, broadcast::Sender<T>>>,
    key: &str,
    capacity: usize,
) -> broadcast::Receiver<T> {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(key.to_string())
        .or_insert_with(|| broadcast::channel(capacity).0)
        .subscribe()
}

fn publish<T: Clone>(map: &Mutex<HashMap<String, broadcast::Sender<T>>>, key: &str, value: T) {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(tx) = map.get(key)
        && tx.send(value).is_err()
    {
        // Nobody listens any more.
        map.remove(key);
    }
}

fn has<T>(map: &Mutex<HashMap<String, broadcast::Sender<T>>>, key: &str) -> bool {
    map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains_key(key)
}

impl OutputHub {
    pub fn subscribe_task(&self, task_id: &str) -> broadcast::Receiver<TaskUpdate> {
        subscribe(&self.tasks, task_id, TASK_CAPACITY)
    }

    pub fn subscribe_workspace(&self, workspace_id: &str) -> broadcast::Receiver<WorkspaceUpdate> {
        subscribe(&self.workspaces, workspace_id, WORKSPACE_CAPACITY)
    }

    /// Whether anyone here watches this task, or its workspace.
    pub fn watched(&self, task_id: &str, workspace_id: &str) -> bool {
        has(&self.tasks, task_id) || has(&self.workspaces, workspace_id)
    }

    /// Whether anyone here watches this task.
    pub fn watched_task(&self, task_id: &str) -> bool {
        has(&self.tasks, task_id)
    }

    /// Ids of the tasks watched here.
    pub fn watched_tasks(&self) -> Vec<String> {
        let map = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        map.keys().cloned().collect()
    }

    pub fn message(&self, message: TaskMessage) {
        let id = message.task_id.clone();
        publish(&self.tasks, &id, TaskUpdate::Message(message));
    }

    pub fn task_changed(&self, task: &Task, deleted: bool) {
        publish(
            &self.tasks,
            &task.id,
            TaskUpdate::Task(Box::new(task.clone())),
        );
        publish(
            &self.workspaces,
            &task.workspace_id,
            WorkspaceUpdate {
                task: task.clone(),
                deleted,
            },
        );
    }
}
