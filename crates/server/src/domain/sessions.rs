//! Which daemons hold a session on this server, when each was last heard
//! from, and how to wake their command pumps.
//!
//! Liveness lives here, in memory: a heartbeat is a map update, never a
//! database write. The liveness sweep (liveness.rs) reads it once per
//! interval and writes what changed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::model::Daemon;

struct Connected {
    daemon: Daemon,
    conn: u64,
    wake: Arc<Notify>,
    /// Rejected pushed work (shutting down, full): push no more to it.
    draining: bool,
}

struct Seen {
    at: Instant,
    workspace_id: String,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<String, Connected>,
    /// Every daemon heard from on this server (session or unary calls).
    last_seen: HashMap<String, Seen>,
}

#[derive(Default)]
pub struct SessionRegistry {
    inner: Mutex<Inner>,
    next_conn: AtomicU64,
}

impl SessionRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a new session of `daemon`; answers the connection number and
    /// the pump's wake-up. An older session of the same daemon is woken so
    /// it notices it was replaced and ends.
    pub fn register(&self, daemon: Daemon) -> (u64, Arc<Notify>) {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let wake = Arc::new(Notify::new());
        // A new session first delivers whatever is already in the outbox.
        wake.notify_one();
        let mut inner = self.lock();
        inner.last_seen.insert(daemon.id.clone(), seen_now(&daemon));
        let old = inner.sessions.insert(
            daemon.id.clone(),
            Connected {
                daemon,
                conn,
                wake: wake.clone(),
                draining: false,
            },
        );
        if let Some(old) = old {
            old.wake.notify_one();
        }
        (conn, wake)
    }

    /// Forgets a session unless a newer one replaced it; answers whether it did.
    pub fn unregister(&self, daemon_id: &str, conn: u64) -> bool {
        let mut inner = self.lock();
        if inner
            .sessions
            .get(daemon_id)
            .is_some_and(|c| c.conn == conn)
        {
            inner.sessions.remove(daemon_id);
            inner.last_seen.remove(daemon_id);
            return true;
        }
        false
    }

    /// Forgets a daemon entirely (it deregistered).
    pub fn remove(&self, daemon_id: &str) {
        let mut inner = self.lock();
        if let Some(old) = inner.sessions.remove(daemon_id) {
            old.wake.notify_one();
        }
        inner.last_seen.remove(daemon_id);
    }

    /// Notes a sign of life of a daemon known alive here in `workspace_id`;
    /// answers false when it is not (the caller checks it and calls
    /// [`SessionRegistry::alive`]).
    pub fn touch(&self, daemon_id: &str, workspace_id: &str) -> bool {
        match self.lock().last_seen.get_mut(daemon_id) {
            Some(seen) if seen.workspace_id == workspace_id => {
                seen.at = Instant::now();
                true
            }
            _ => false,
        }
    }

    /// Notes a sign of life of a checked daemon.
    pub fn alive(&self, daemon: &Daemon) {
        self.lock()
            .last_seen
            .insert(daemon.id.clone(), seen_now(daemon));
    }

    /// Whether `conn` is still the daemon's current session here.
    pub fn is_current(&self, daemon_id: &str, conn: u64) -> bool {
        self.lock()
            .sessions
            .get(daemon_id)
            .is_some_and(|c| c.conn == conn)
    }

    /// The daemon, if its session here takes pushed work.
    pub fn dispatchable(&self, daemon_id: &str) -> Option<Daemon> {
        match self.lock().sessions.get(daemon_id) {
            Some(c) if !c.draining => Some(c.daemon.clone()),
            _ => None,
        }
    }

    /// Pushes no more work to the daemon's current session.
    pub fn drain(&self, daemon_id: &str) {
        if let Some(c) = self.lock().sessions.get_mut(daemon_id) {
            c.draining = true;
        }
    }

    pub fn is_connected(&self, daemon_id: &str) -> bool {
        self.lock().sessions.contains_key(daemon_id)
    }

    /// Wakes the daemon's pump; answers whether it has a session here.
    pub fn wake(&self, daemon_id: &str) -> bool {
        match self.lock().sessions.get(daemon_id) {
            Some(c) => {
                c.wake.notify_one();
                true
            }
            None => false,
        }
    }

    /// Every daemon with a session here.
    pub fn all(&self) -> Vec<Daemon> {
        self.lock()
            .sessions
            .values()
            .map(|c| c.daemon.clone())
            .collect()
    }

    /// Every daemon with a session here that takes pushed work.
    pub fn taking_work(&self) -> Vec<Daemon> {
        self.lock()
            .sessions
            .values()
            .filter(|c| !c.draining)
            .map(|c| c.daemon.clone())
            .collect()
    }

    /// Connected daemons of a workspace that take pushed work.
    pub fn in_workspace(&self, workspace_id: &str) -> Vec<Daemon> {
        self.lock()
            .sessions
            .values()
            .filter(|c| c.daemon.workspace_id == workspace_id && !c.draining)
            .map(|c| c.daemon.clone())
            .collect()
    }

    /// Splits the daemons heard from here into those heard from within
    /// `window` (alive) and those silent longer (expired). Expired daemons
    /// are forgotten and their sessions woken, so each ends.
    pub fn sweep(&self, window: Duration) -> (Vec<String>, Vec<String>) {
        let now = Instant::now();
        let mut inner = self.lock();
        let (mut alive, mut expired) = (Vec::new(), Vec::new());
        for (id, seen) in &inner.last_seen {
            if now.duration_since(seen.at) <= window {
                alive.push(id.clone());
            } else {
                expired.push(id.clone());
            }
        }
        for id in &expired {
            inner.last_seen.remove(id);
            if let Some(c) = inner.sessions.remove(id) {
                c.wake.notify_one();
            }
        }
        (alive, expired)
    }
}

fn seen_now(daemon: &Daemon) -> Seen {
    Seen {
        at: Instant::now(),
        workspace_id: daemon.workspace_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DaemonState;

    fn daemon(id: &str) -> Daemon {
        Daemon {
            id: id.into(),
            workspace_id: "ws".into(),
            machine_id: id.into(),
            hostname: "h".into(),
            version: "1".into(),
            runtimes: vec![],
            max_concurrent_tasks: 1,
            state: DaemonState::Online,
            active_tasks: 0,
            created_at: 0,
            last_seen_at: 0,
            token_id: None,
            blocked_token_id: None,
            work_dir: String::new(),
            suggested_targets: vec![],
        }
    }

    #[tokio::test]
    async fn a_newer_session_replaces_and_wakes_the_older() {
        let r = SessionRegistry::default();
        let (first, wake) = r.register(daemon("d"));
        wake.notified().await; // the backlog wake-up
        let (second, _) = r.register(daemon("d"));
        wake.notified().await; // told it was replaced
        assert!(!r.is_current("d", first));
        assert!(r.is_current("d", second));
        assert!(!r.unregister("d", first));
        assert!(r.unregister("d", second));
        assert!(!r.is_connected("d"));
    }

    #[tokio::test]
    async fn sweep_expires_the_silent_and_wakes_their_sessions() {
        let r = SessionRegistry::default();
        let (conn, wake) = r.register(daemon("silent"));
        wake.notified().await;
        assert!(
            !r.touch("unary", "ws"),
            "first sign of life of a polling daemon"
        );
        r.alive(&daemon("unary"));
        assert!(r.touch("unary", "ws"));
        assert!(!r.touch("unary", "another workspace"));
        let (alive, expired) = r.sweep(Duration::from_secs(60));
        assert_eq!(alive.len(), 2);
        assert!(expired.is_empty());
        let (alive, mut expired) = r.sweep(Duration::ZERO);
        expired.sort();
        assert!(alive.is_empty());
        assert_eq!(expired, ["silent", "unary"]);
        wake.notified().await;
        assert!(!r.is_current("silent", conn));
    }
}
