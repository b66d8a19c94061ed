//! Which daemons hold a session on this server, and how to wake their
//! command pumps.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

use crate::model::Daemon;

struct Connected {
    daemon: Daemon,
    conn: u64,
    wake: Arc<Notify>,
    last_seen: Instant,
}

#[derive(Default)]
pub struct SessionRegistry {
    inner: Mutex<HashMap<String, Connected>>,
    next_conn: AtomicU64,
}

impl SessionRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Connected>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a new session of `daemon`, replacing an older one; answers the
    /// connection number and the pump's wake-up.
    pub fn register(&self, daemon: Daemon) -> (u64, Arc<Notify>) {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let wake = Arc::new(Notify::new());
        // A new session first delivers whatever is already in the outbox.
        wake.notify_one();
        self.lock().insert(
            daemon.id.clone(),
            Connected {
                daemon,
                conn,
                wake: wake.clone(),
                last_seen: Instant::now(),
            },
        );
        (conn, wake)
    }

    /// Forgets a session unless a newer one replaced it; answers whether it did.
    pub fn unregister(&self, daemon_id: &str, conn: u64) -> bool {
        let mut map = self.lock();
        if map.get(daemon_id).is_some_and(|c| c.conn == conn) {
            map.remove(daemon_id);
            return true;
        }
        false
    }

    pub fn remove(&self, daemon_id: &str) {
        self.lock().remove(daemon_id);
    }

    pub fn touch(&self, daemon_id: &str) {
        if let Some(c) = self.lock().get_mut(daemon_id) {
            c.last_seen = Instant::now();
        }
    }

    pub fn get(&self, daemon_id: &str) -> Option<Daemon> {
        self.lock().get(daemon_id).map(|c| c.daemon.clone())
    }

    pub fn is_connected(&self, daemon_id: &str) -> bool {
        self.lock().contains_key(daemon_id)
    }

    pub fn wake(&self, daemon_id: &str) {
        if let Some(c) = self.lock().get(daemon_id) {
            c.wake.notify_one();
        }
    }

    /// Connected daemons of a workspace.
    pub fn in_workspace(&self, workspace_id: &str) -> Vec<Daemon> {
        self.lock()
            .values()
            .filter(|c| c.daemon.workspace_id == workspace_id)
            .map(|c| c.daemon.clone())
            .collect()
    }
}
