//! Daemons as the server knows them: registration, heartbeats, sessions
//! opening and closing, and reads for people (ListDaemons, GetDaemon).

use super::tasks::next_page;
use super::{Domain, Error, Result, check_runtime, invalid};
use crate::model::*;
use crate::store::DaemonInfo;

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

    /// A daemon of the caller's workspace.
    pub async fn load_daemon(&self, p: &Principal, id: &str) -> Result<Daemon> {
        let ws = self.daemon_workspace(p)?;
        match self.store.get_daemon(id).await? {
            Some(d) if d.workspace_id == ws.id => Ok(d),
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
        if info.machine_id.trim().is_empty() || info.machine_id.len() > 256 {
            return Err(invalid("machine_id", "must be 1-256 characters"));
        }
        if !(1..=1024).contains(&info.max_concurrent_tasks) {
            return Err(invalid("max_concurrent_tasks", "must be in 1..=1024"));
        }
        for r in &info.runtimes {
            check_runtime("runtimes", &r.name)?;
        }
        Ok(self.store.register_daemon(&info, legacy_ids).await?)
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
        let daemon = self.load_daemon(p, daemon_id).await?;
        self.store
            .set_daemon_state(&daemon.id, DaemonState::Online)
            .await?;
        let (conn, wake) = self.sessions.register(daemon.clone());
        for task in self.store.active_tasks_of(&daemon.id).await? {
            if task.status == TaskStatus::Running && !running.contains(&task.id) {
                let reason = "the daemon reconnected without it";
                self.transition("system", task, TaskStatus::Interrupted, reason, |t| {
                    t.status_reason = reason.into();
                    t.ended_at = Some(t.updated_at);
                })
                .await?;
            }
        }
        self.dispatch_to(&daemon.id).await?;
        Ok((daemon, conn, wake))
    }

    pub async fn close_session(&self, daemon_id: &str, conn: u64) -> Result<()> {
        if self.sessions.unregister(daemon_id, conn) {
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
        Ok(next_page(&mut daemons, page_size, |d| d.id.clone()))
    }

    pub async fn get_daemon(&self, p: &Principal, id: &str) -> Result<Daemon> {
        match self.store.get_daemon(id).await? {
            Some(d) if p.sees(&d.workspace_id) => Ok(d),
            _ => Err(Error::NotFound(format!("daemon {id} not found"))),
        }
    }
}
