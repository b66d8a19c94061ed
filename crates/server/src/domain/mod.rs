//! The domain: every rule of taskmesh. Handlers call one method here per
//! RPC; validation, the transition table, who may see what, dispatch and
//! output are enforced in this module and nowhere else.
//!
//! - [`error`], [`validate`]: the error enum and the checks on input.
//! - [`workspaces`], [`tokens`]: tenancy and authentication.
//! - [`tasks`], [`transition`], [`watch`], [`attempts`], [`approvals`]: the
//!   task API, the state machine, watching output, new attempts after the
//!   fact, and permissions agents ask a person for.
//! - [`registry`], [`dispatch`], [`reports`], [`ingest`], [`outbox`]: the
//!   daemon side: who is connected, handing out work, lifecycle reports,
//!   output, and durable commands.
//! - [`liveness`]: heartbeats, offline daemons and their tasks.
//! - [`streams`]: the open streams by token, ended when access goes.
//! - [`peers`]: what replicas tell each other (the cluster bridge carries it).
//! - [`hub`], [`sessions`], [`marks`]: in-memory state: live fan-out, the
//!   session registry, the ingest fast path's marks.
//! - [`redact`]: secrets out of everything derived from agent output.

mod agents;
mod approvals;
mod attempts;
mod changes;
mod dispatch;
mod error;
pub mod hub;
mod ingest;
mod liveness;
mod marks;
mod outbox;
mod peers;
pub mod redact;
mod registry;
mod reports;
mod retention;
mod sessions;
mod streams;
mod tasks;
mod tokens;
pub mod transition;
mod validate;
mod watch;
mod workspaces;
mod worktrees;

use std::sync::{Arc, OnceLock};

use crate::store::{Backend, Store};

pub use approvals::Decision;
pub use dispatch::Assignment;
pub use error::{Error, Result, SHUTTING_DOWN, invalid};
use error::{shutting_down, version_conflict};
pub use hub::{OutputHub, TaskUpdate, WorkspaceUpdate};
pub use ingest::MAX_BATCH;
pub use liveness::{Liveness, SweepReport};
pub use peers::PeerEvent;
pub use reports::TaskEnd;
pub use retention::RetentionReport;
pub use sessions::SessionRegistry;
pub use streams::{StreamEnd, StreamGuard};
pub use tasks::{ListTasks, MessagesPage, NewTask, TaskPatch};
pub use tokens::hash_secret;
pub use validate::{
    MAX_DEPTH, MAX_NAME_CHARS, MAX_PLAN_BYTES, check_runtime, page_size, parse_id,
    parse_optional_id, quote,
};
pub use workspaces::{DEFAULT_WORKSPACE, require_user};

pub struct Domain {
    store: Store,
    hub: OutputHub,
    sessions: SessionRegistry,
    /// Set on shutdown: every stream the server holds open ends.
    closing: tokio::sync::watch::Sender<bool>,
    /// Set when shutdown begins: daemons are asked to move to another
    /// replica, and new sessions are refused.
    draining: tokio::sync::watch::Sender<bool>,
    pub liveness: Liveness,
    /// Where each task's output stands, for the ingest fast path.
    marks: marks::Marks,
    /// Tasks in the middle of printing a private key.
    key_blocks: marks::KeyBlocks,
    /// Fills of one daemon's free slots run one at a time (striped by
    /// daemon id): two at once would both count its slots free.
    fill_locks: dispatch::FillLocks,
    /// Other replicas on the same PostgreSQL database, once joined.
    peers: OnceLock<peers::Peers>,
    /// Every long-lived stream, by token.
    streams: Arc<streams::StreamRegistry>,
    pub limits: Limits,
    /// The key agent tokens are signed with (`agents`), read once.
    agent_key: tokio::sync::OnceCell<Vec<u8>>,
}

/// What one caller may hold on a server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Streams (sessions and watches) one token may hold open.
    pub max_streams_per_token: usize,
    /// Output a watcher may hold undelivered before it falls back to
    /// catching up from the database.
    pub watcher_budget_bytes: usize,
    /// Output of tasks that ended longer ago than this is removed.
    pub retain_output: Option<std::time::Duration>,
    /// Tasks that ended longer ago than this are removed whole.
    pub retain_tasks: Option<std::time::Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_streams_per_token: streams::MAX_STREAMS_PER_TOKEN,
            watcher_budget_bytes: 8 << 20,
            retain_output: None,
            retain_tasks: None,
        }
    }
}

impl Domain {
    pub fn new(store: Store) -> Arc<Domain> {
        Self::with_liveness(store, Liveness::default())
    }

    pub fn with_liveness(store: Store, liveness: Liveness) -> Arc<Domain> {
        Self::with_limits(store, liveness, Limits::default())
    }

    pub fn with_limits(store: Store, liveness: Liveness, limits: Limits) -> Arc<Domain> {
        Arc::new(Domain {
            store,
            hub: OutputHub::default(),
            sessions: SessionRegistry::default(),
            closing: tokio::sync::watch::channel(false).0,
            draining: tokio::sync::watch::channel(false).0,
            liveness,
            peers: OnceLock::new(),
            marks: marks::Marks::default(),
            key_blocks: marks::KeyBlocks::default(),
            streams: Arc::new(streams::StreamRegistry::new(limits.max_streams_per_token)),
            limits,
            agent_key: tokio::sync::OnceCell::new(),
            fill_locks: dispatch::FillLocks::default(),
        })
    }

    /// Which database holds the truth; replicas share only PostgreSQL.
    pub fn backend(&self) -> Backend {
        self.store.backend()
    }

    /// The metrics, with what the database and this replica's streams
    /// say now.
    pub async fn metrics_text(&self) -> Result<String> {
        let census = self.store.census().await?;
        let m = &crate::metrics::METRICS;
        m.tasks.clear();
        for (status, runtime, n) in census.tasks {
            let labels = crate::metrics::TaskLabels { status, runtime };
            m.tasks.get_or_create(&labels).set(n);
        }
        m.daemons.clear();
        for (state, n) in census.daemons {
            m.daemons
                .get_or_create(&crate::metrics::StateLabels { state })
                .set(n);
        }
        m.outbox_pending.set(census.pending_commands);
        let age = census.oldest_command.map_or(0.0, |at| {
            (crate::model::now_micros() - at).max(0) as f64 / 1e6
        });
        m.outbox_oldest_seconds.set(age);
        m.approvals_pending.set(census.pending_approvals);
        let (sessions, watchers) = self.streams.counts();
        m.sessions.set(sessions as i64);
        m.watchers.set(watchers as i64);
        Ok(m.render())
    }

    /// Asks every daemon with a session here to move to another replica
    /// (a Drain message) and refuses new sessions; the sessions go on until
    /// their daemons leave or [`Domain::close_streams`].
    pub fn drain_sessions(&self) {
        self.draining.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Completes once `drain_sessions` was called.
    pub fn drained(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.draining.subscribe();
        async move {
            let _ = rx.wait_for(|c| *c).await;
        }
    }

    /// How many daemons hold a session here.
    pub fn session_count(&self) -> usize {
        self.streams.counts().0
    }

    /// Ends every open watch and session, so a graceful shutdown can finish.
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    /// Completes once `close_streams` was called.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.closing.subscribe();
        async move {
            let _ = rx.wait_for(|c| *c).await;
        }
    }
}
