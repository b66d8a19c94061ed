//! Every long-lived stream this server holds for a token (a daemon's
//! Session, WatchTask, WatchTasks), so that what takes a caller's access
//! away also ends its streams, and so one token cannot open without bound.
//!
//! Each stream holds a [`StreamGuard`] for its life. Revoking a token or
//! disconnecting a daemon here ends its streams at once; the liveness sweep
//! (every heartbeat interval, on every replica) asks the database about the
//! tokens, memberships and daemons behind the open streams and ends those
//! whose access is gone, wherever the change was made.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::{Domain, Error, Result};
use crate::model::{Principal, TokenKind};

/// Why a stream was ended from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    /// Its token was revoked.
    Revoked,
    /// Its user no longer belongs to the workspace it watches.
    NotAMember,
    /// An admin disconnected the daemon it speaks for.
    Disconnected { daemon_id: String },
}

impl fmt::Display for StreamEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamEnd::Revoked => f.write_str("the token was revoked"),
            StreamEnd::NotAMember => {
                f.write_str("the token's user no longer belongs to this workspace")
            }
            StreamEnd::Disconnected { daemon_id } => write!(
                f,
                "daemon {daemon_id} was disconnected by an admin; start it with a new daemon token"
            ),
        }
    }
}

impl From<StreamEnd> for Error {
    fn from(end: StreamEnd) -> Error {
        match end {
            StreamEnd::Revoked | StreamEnd::NotAMember => Error::Unauthenticated(end.to_string()),
            StreamEnd::Disconnected { .. } => Error::PermissionDenied(end.to_string()),
        }
    }
}

struct Entry {
    token_id: String,
    /// For a user token's stream: the user, and the workspace it follows.
    member: Option<(String, String)>,
    daemon_id: Option<String>,
    end: watch::Sender<Option<StreamEnd>>,
}

/// The open streams of this server, by token.
pub struct StreamRegistry {
    entries: Mutex<HashMap<u64, Entry>>,
    next: AtomicU64,
    max_per_token: usize,
}

/// Most streams one token may hold open on one server, by default.
pub const MAX_STREAMS_PER_TOKEN: usize = 1024;

impl Default for StreamRegistry {
    fn default() -> Self {
        StreamRegistry::new(MAX_STREAMS_PER_TOKEN)
    }
}

impl StreamRegistry {
    pub fn new(max_per_token: usize) -> Self {
        StreamRegistry {
            entries: Mutex::default(),
            next: AtomicU64::new(1),
            max_per_token: max_per_token.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn end_where(&self, why: &StreamEnd, hit: impl Fn(&Entry) -> bool) -> usize {
        let entries = self.lock();
        let mut n = 0;
        for e in entries.values().filter(|e| hit(e)) {
            e.end.send_replace(Some(why.clone()));
            n += 1;
        }
        n
    }

    /// Ends every stream of a token.
    pub fn end_token(&self, token_id: &str, why: StreamEnd) -> usize {
        self.end_where(&why, |e| e.token_id == token_id)
    }

    /// Ends a daemon's session.
    pub fn end_daemon(&self, daemon_id: &str, why: StreamEnd) -> usize {
        self.end_where(&why, |e| e.daemon_id.as_deref() == Some(daemon_id))
    }

    /// Open daemon sessions and watches (WatchTask, WatchTasks), for the
    /// metrics.
    pub fn counts(&self) -> (usize, usize) {
        let entries = self.lock();
        let sessions = entries.values().filter(|e| e.daemon_id.is_some()).count();
        (sessions, entries.len() - sessions)
    }

    /// The tokens, (user, workspace) pairs and (daemon, token) pairs behind
    /// the open streams.
    #[allow(clippy::type_complexity)]
    fn holders(&self) -> (Vec<String>, Vec<(String, String)>, Vec<(String, String)>) {
        let entries = self.lock();
        let mut tokens: Vec<String> = entries.values().map(|e| e.token_id.clone()).collect();
        tokens.sort();
        tokens.dedup();
        let mut members: Vec<(String, String)> =
            entries.values().filter_map(|e| e.member.clone()).collect();
        members.sort();
        members.dedup();
        let mut daemons: Vec<(String, String)> = entries
            .values()
            .filter_map(|e| Some((e.daemon_id.clone()?, e.token_id.clone())))
            .collect();
        daemons.sort();
        daemons.dedup();
        (tokens, members, daemons)
    }
}

/// A stream's place in the registry; dropping it leaves.
pub struct StreamGuard {
    id: u64,
    registry: Arc<StreamRegistry>,
    end: watch::Receiver<Option<StreamEnd>>,
}

impl StreamGuard {
    /// Completes when the stream must end, with why.
    pub async fn ended(&mut self) -> StreamEnd {
        match self.end.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or(StreamEnd::Revoked),
            // The registry never drops a sender before the guard; if it did,
            // the stream's access can no longer be vouched for.
            Err(_) => StreamEnd::Revoked,
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl Domain {
    /// Registers a stream of `p` that follows `workspace_id` (or speaks for
    /// `daemon_id`); refused when the token has its fill of streams.
    pub fn open_stream(
        &self,
        p: &Principal,
        workspace_id: &str,
        daemon_id: Option<&str>,
    ) -> Result<StreamGuard> {
        let registry = &self.streams;
        let mut entries = registry.lock();
        let open = entries
            .values()
            .filter(|e| e.token_id == p.token_id)
            .count();
        if open >= registry.max_per_token {
            return Err(Error::ResourceExhausted(format!(
                "this token has {open} streams open on this server, the most it may \
                 (--max-streams-per-token); close one or use another token"
            )));
        }
        let member = match (p.kind, &p.user_id) {
            (TokenKind::User, Some(user)) => Some((user.clone(), workspace_id.to_string())),
            _ => None,
        };
        let (end, rx) = watch::channel(None);
        let id = registry.next.fetch_add(1, Ordering::Relaxed);
        entries.insert(
            id,
            Entry {
                token_id: p.token_id.clone(),
                member,
                daemon_id: daemon_id.map(String::from),
                end,
            },
        );
        Ok(StreamGuard {
            id,
            registry: registry.clone(),
            end: rx,
        })
    }

    /// Ends the open streams whose access is gone: revoked tokens, users
    /// no longer members of the workspace they follow, disconnected
    /// daemons. Answers how many ended.
    pub(super) async fn check_streams(&self) -> Result<usize> {
        let (tokens, members, daemons) = self.streams.holders();
        let mut ended = 0;
        for token_id in self.store.revoked_among(&tokens).await? {
            ended += self.streams.end_token(&token_id, StreamEnd::Revoked);
        }
        // Agent tokens live as long as their attempt (ended elsewhere, say
        // on another replica).
        for token_id in tokens.iter().filter(|t| t.starts_with("agent:")) {
            let mut parts = token_id.splitn(3, ':').skip(1);
            let (Some(task_id), Some(attempt)) = (parts.next(), parts.next()) else {
                continue;
            };
            let live = self
                .store
                .get_task(task_id)
                .await?
                .is_some_and(|t| t.status.is_active() && t.attempt.to_string() == attempt);
            if !live {
                ended += self.streams.end_token(token_id, StreamEnd::Revoked);
            }
        }
        if !members.is_empty() {
            let kept = self.store.memberships_among(&members).await?;
            for (user, ws) in members.iter().filter(|m| !kept.contains(m)) {
                ended += self.streams.end_where(&StreamEnd::NotAMember, |e| {
                    e.member.as_ref().is_some_and(|(u, w)| u == user && w == ws)
                });
            }
        }
        for (daemon_id, token_id) in self.store.blocked_among(&daemons).await? {
            let why = StreamEnd::Disconnected {
                daemon_id: daemon_id.clone(),
            };
            ended += self.streams.end_where(&why, |e| {
                e.daemon_id.as_deref() == Some(daemon_id.as_str()) && e.token_id == token_id
            });
        }
        Ok(ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(max: usize) -> Arc<StreamRegistry> {
        Arc::new(StreamRegistry::new(max))
    }

    fn guard(r: &Arc<StreamRegistry>, token: &str, daemon: Option<&str>) -> StreamGuard {
        let (end, rx) = watch::channel(None);
        let id = r.next.fetch_add(1, Ordering::Relaxed);
        r.lock().insert(
            id,
            Entry {
                token_id: token.into(),
                member: None,
                daemon_id: daemon.map(String::from),
                end,
            },
        );
        StreamGuard {
            id,
            registry: r.clone(),
            end: rx,
        }
    }

    #[tokio::test]
    async fn ending_a_token_ends_its_streams_only() {
        let r = registry(10);
        let mut a = guard(&r, "t1", None);
        let mut b = guard(&r, "t2", Some("d"));
        assert_eq!(r.end_token("t1", StreamEnd::Revoked), 1);
        assert_eq!(a.ended().await, StreamEnd::Revoked);
        assert!(b.end.borrow().is_none());
        let why = StreamEnd::Disconnected {
            daemon_id: "d".into(),
        };
        assert_eq!(r.end_daemon("d", why.clone()), 1);
        assert_eq!(b.ended().await, why);
        drop((a, b));
        assert!(r.lock().is_empty(), "guards leave when dropped");
    }
}
