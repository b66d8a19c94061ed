//! Where each task's output stands, as its session last left it, so the
//! usual batch (the next seqs, in order) is stored without reading first.
//! Only a hint: the store moves a mark only from the value cached here, for
//! the same daemon and attempt, so a stale entry costs one slow path.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use crate::model::Task;

/// Entries kept at most; past this the cache starts afresh.
const MAX_MARKS: usize = 100_000;

#[derive(Debug, Clone)]
pub struct Mark {
    /// The task's highest contiguous seq, with nothing stored above it.
    pub seq: i64,
    pub attempt: i64,
    pub workspace_id: String,
    pub daemon_id: String,
}

#[derive(Default)]
pub struct Marks(Mutex<HashMap<String, Mark>>);

impl Marks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Mark>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, task_id: &str) -> Option<Mark> {
        self.lock().get(task_id).cloned()
    }

    pub fn remember(&self, task: &Task, daemon_id: &str, seq: i64) {
        let mut map = self.lock();
        if map.len() >= MAX_MARKS {
            map.clear();
        }
        map.insert(
            task.id.clone(),
            Mark {
                seq,
                attempt: task.attempt,
                workspace_id: task.workspace_id.clone(),
                daemon_id: daemon_id.to_string(),
            },
        );
    }

    pub fn advance(&self, task_id: &str, seq: i64) {
        if let Some(m) = self.lock().get_mut(task_id) {
            m.seq = seq;
        }
    }

    pub fn forget(&self, task_id: &str) {
        self.lock().remove(task_id);
    }
}

/// Tasks whose output left a private key block open (a key printed a line
/// per message): their next messages are redacted up to its END line.
#[derive(Default)]
pub struct KeyBlocks(Mutex<HashSet<String>>);

impl KeyBlocks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_open(&self, task_id: &str) -> bool {
        self.lock().contains(task_id)
    }

    pub fn set(&self, task_id: &str, open: bool) {
        let mut set = self.lock();
        if !open {
            set.remove(task_id);
            return;
        }
        if set.len() >= MAX_MARKS {
            set.clear();
        }
        set.insert(task_id.to_string());
    }

    pub fn forget(&self, task_id: &str) {
        self.set(task_id, false);
    }
}
