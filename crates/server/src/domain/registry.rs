//! Daemons as the server knows them: registration, heartbeats, sessions
//! opening and closing, and reads for people (ListDaemons, GetDaemon).

use super::streams::StreamEnd;
use super::tasks::next_page;
use super::validate::{MAX_PATH_BYTES, identifier, quote, text};
use super::{Domain, Error, Result, check_runtime, invalid, parse_id};

/// Bounds on what a daemon registers.
pub const MAX_HOSTNAME_BYTES: usize = 255;
pub const MAX_VERSION_BYTES: usize = 128;
pub const MAX_RUNTIMES: usize = 64;
pub const MAX_LEGACY_IDS: usize = 16;
use crate::model::*;
use crate::store::DaemonInfo;

/// Most suggested targets a daemon names.
const MAX_TARGETS: usize = 16;

impl Domain {
    /// The one workspace of a daemon token; user tokens are refused.
    pub(super) fn daemon_workspace<'p>(&self, p: &'p Principal) -> Result<&'p Workspace> {
        match (p.kind, p.workspaces.as_slice()) {
            (TokenKind::Daemon, [ws]) => Ok(ws),
            _ => Err(Error::PermissionDenied(
                "DaemonService needs a daemon token".into(),
            )),
        }
    }

    /// A daemon of the caller's workspace that the caller's token may
    /// still speak for.
    pub async fn load_daemon(&self, p: &Principal, id: &str) -> Result<Daemon> {
        let ws = self.daemon_workspace(p)?;
        match self.store.get_daemon(id).await? {
            Some(d) if d.workspace_id == ws.id => {
                if d.blocked_token_id.as_deref() == Some(p.token_id.as_str()) {
                    return Err(StreamEnd::Disconnected { daemon_id: d.id }.into());
                }
                Ok(d)
            }
            _ => Err(Error::NotFound(format!("daemon {id} not found"))),
        }
    }

    pub async fn register_daemon(
        &self,
        p: &Principal,
        mut info: DaemonInfo,
        legacy_ids: &[String],
    ) -> Result<Daemon> {
        info.workspace_id = self.daemon_workspace(p)?.id.clone();
        info.token_id = p.token_id.clone();
        info.machine_id = identifier("machine_id", info.machine_id.trim(), 256)?;
        info.hostname = text("hostname", &info.hostname, MAX_HOSTNAME_BYTES)?;
        info.version = text("version", &info.version, MAX_VERSION_BYTES)?;
        if !(1..=1024).contains(&info.max_concurrent_tasks) {
            return Err(invalid("max_concurrent_tasks", "must be in 1..=1024"));
        }
        if info.runtimes.len() > MAX_RUNTIMES {
            return Err(invalid(
                "runtimes",
                format!("{} runtimes; at most {MAX_RUNTIMES}", info.runtimes.len()),
            ));
        }
        for r in &mut info.runtimes {
            check_runtime("runtimes.name", &r.name)?;
            r.version = text("runtimes.version", &r.version, MAX_VERSION_BYTES)?;
        }
        info.work_dir = text("work_dir", &info.work_dir, MAX_PATH_BYTES)?;
        if info.suggested_targets.len() > MAX_TARGETS {
            return Err(invalid(
                "suggested_targets",
                format!(
                    "{} paths; at most {MAX_TARGETS}",
                    info.suggested_targets.len()
                ),
            ));
        }
        for t in &mut info.suggested_targets {
            *t = text("suggested_targets", t, MAX_PATH_BYTES)?.replace('\n', " ");
        }
        if legacy_ids.len() > MAX_LEGACY_IDS {
            return Err(invalid(
                "legacy_ids",
                format!("{} ids; at most {MAX_LEGACY_IDS}", legacy_ids.len()),
            ));
        }
        let legacy_ids = legacy_ids
            .iter()
            .map(|id| parse_id("legacy_ids", id))
            .collect::<Result<Vec<_>>>()?;
        let machine = info.machine_id.clone();
        self.store
            .register_daemon(&info, &legacy_ids)
            .await?
            .ok_or_else(|| {
                Error::PermissionDenied(format!(
                    "the daemon of machine {} was disconnected from this token by an admin; \
                     start it with a new daemon token",
                    quote(&machine)
                ))
            })
    }

    /// DisconnectDaemon: ends the daemon's session now and refuses the
    /// token it used until it comes back with another.
    pub async fn disconnect_daemon(&self, p: &Principal, id: &str) -> Result<Daemon> {
        let daemon = self.get_daemon(p, id).await?;
        let daemon = self
            .store
            .block_daemon(&daemon.id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("daemon {id} not found")))?;
        let why = StreamEnd::Disconnected {
            daemon_id: daemon.id.clone(),
        };
        // Its session ends through its stream guard, with this reason; the
        // session's own close then forgets it here.
        self.streams.end_daemon(&daemon.id, why);
        tracing::info!(daemon_id = %daemon.id, by = %p.subject, "daemon disconnected");
        Ok(daemon)
    }

    pub async fn deregister_daemon(&self, p: &Principal, id: &str) -> Result<()> {
        let d = self.load_daemon(p, id).await?;
        self.sessions.remove(&d.id);
        self.store
            .set_daemon_state(&d.id, DaemonState::Gone)
            .await?;
        Ok(())
    }

    /// Heartbeats only touch memory; the database hears of a daemon when
    /// its state changes and from the liveness sweep.
    pub async fn heartbeat(&self, p: &Principal, id: &str) -> Result<()> {
        let ws = self.daemon_workspace(p)?;
        if self.sessions.touch(id, &ws.id) {
            return Ok(());
        }
        let daemon = self.load_daemon(p, id).await?;
        if daemon.state != DaemonState::Online {
            self.store
                .set_daemon_state(&daemon.id, DaemonState::Online)
                .await?;
        }
        self.sessions.alive(&daemon);
        Ok(())
    }

    /// Notes a sign of life from a daemon's session.
    pub fn session_alive(&self, p: &Principal, daemon_id: &str) {
        if let [ws] = p.workspaces.as_slice() {
            self.sessions.touch(daemon_id, &ws.id);
        }
    }

    /// Whether `conn` is still the daemon's session: false once a newer
    /// session replaced it, the daemon deregistered, or it fell silent.
    pub fn session_current(&self, daemon_id: &str, conn: u64) -> bool {
        self.sessions.is_current(daemon_id, conn)
    }

    /// A session opened: the daemon is online here, gets what is queued for
    /// it, and tasks it no longer runs are not left hanging.
    pub async fn open_session(
        &self,
        p: &Principal,
        daemon_id: &str,
        running: &[String],
    ) -> Result<(Daemon, u64, std::sync::Arc<tokio::sync::Notify>)> {
        if self.is_draining() {
            return Err(Error::Unavailable(
                "this replica is shutting down: open the session on another".into(),
            ));
        }
        let daemon = self.load_daemon(p, daemon_id).await?;
        self.store
            .set_daemon_state(&daemon.id, DaemonState::Online)
            .await?;
        let (conn, wake) = self.sessions.register(daemon.clone());
        for task in self.store.active_tasks_of(&daemon.id).await? {
            let listed = running.contains(&task.id);
            match task.status {
                TaskStatus::Running if !listed => {
                    let reason = "the daemon reconnected without it";
                    self.transition("system", task, TaskStatus::Interrupted, reason, |t| {
                        t.status_reason = reason.into();
                        t.ended_at = Some(t.updated_at);
                    })
                    .await?;
                }
                // It started, though its `started` was lost on the way.
                TaskStatus::Dispatched if listed => {
                    self.started(task, "started (its daemon lists it running)")
                        .await?;
                }
                _ => {}
            }
        }
        self.dispatch_to(&daemon.id).await?;
        Ok((daemon, conn, wake))
    }

    /// Forgets a session that ended. The daemon is marked offline, unless
    /// this replica is draining: then it is moving to another, which marks
    /// it online (and if it never arrives, liveness finds it silent).
    pub async fn close_session(&self, daemon_id: &str, conn: u64) -> Result<()> {
        if self.sessions.unregister(daemon_id, conn) && !self.is_draining() {
            self.store
                .set_daemon_state(daemon_id, DaemonState::Offline)
                .await?;
        }
        Ok(())
    }

    pub async fn list_daemons(
        &self,
        p: &Principal,
        workspace: &str,
        page_size: i64,
        page_token: Option<String>,
    ) -> Result<(Vec<Daemon>, Option<String>)> {
        let ws = self.resolve_workspace(p, workspace)?;
        let after = page_token.unwrap_or_default();
        let mut daemons = self
            .store
            .list_daemons(&ws.id, &after, page_size + 1)
            .await?;
        Ok(next_page(
            &mut daemons,
            page_size,
            |d| {
                d.hostname.len()
                    + d.version.len()
                    + d.runtimes
                        .iter()
                        .map(|r| r.name.len() + r.version.len() + 8)
                        .sum::<usize>()
                    + 256
            },
            |d| d.id.clone(),
        ))
    }

    pub async fn get_daemon(&self, p: &Principal, id: &str) -> Result<Daemon> {
        match self.store.get_daemon(id).await? {
            Some(d) if p.sees(&d.workspace_id) => Ok(d),
            _ => Err(Error::NotFound(format!("daemon {id} not found"))),
        }
    }
}
