//! Daemons: registration, state, signs of life and free slots.

use std::sync::LazyLock;

use sqlx::Row;
use sqlx::any::AnyRow;

use super::*;
use crate::model::*;

/// What a daemon registers.
#[derive(Debug, Clone)]
pub struct DaemonInfo {
    pub workspace_id: String,
    pub machine_id: String,
    pub hostname: String,
    pub version: String,
    pub runtimes: Vec<Runtime>,
    pub max_concurrent_tasks: i64,
    /// The token the daemon registers with.
    pub token_id: String,
    pub work_dir: String,
    pub suggested_targets: Vec<String>,
}

static DAEMON_SELECT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT d.id, d.workspace_id, d.machine_id, d.hostname, d.version, \
         d.runtimes, d.max_concurrent_tasks, d.state, d.created_at, d.last_seen_at, \
         d.token_id, d.blocked_token_id, d.work_dir, d.suggested_targets, \
         (SELECT COUNT(*) FROM tasks t WHERE t.daemon_id = d.id \
         AND t.status IN {}) AS active_tasks FROM daemons d",
        *ACTIVE
    )
});

fn daemon_from_row(r: &AnyRow) -> Result<Daemon> {
    let runtimes: String = r.try_get("runtimes")?;
    Ok(Daemon {
        id: r.try_get("id")?,
        workspace_id: r.try_get("workspace_id")?,
        machine_id: r.try_get("machine_id")?,
        hostname: r.try_get("hostname")?,
        version: r.try_get("version")?,
        runtimes: runtimes_from_json(&runtimes)?,
        max_concurrent_tasks: r.try_get("max_concurrent_tasks")?,
        state: parse_enum(&r.try_get::<String, _>("state")?)?,
        active_tasks: r.try_get("active_tasks")?,
        created_at: r.try_get("created_at")?,
        last_seen_at: r.try_get("last_seen_at")?,
        token_id: r.try_get("token_id")?,
        blocked_token_id: r.try_get("blocked_token_id")?,
        work_dir: r.try_get("work_dir")?,
        suggested_targets: r
            .try_get::<String, _>("suggested_targets")?
            .lines()
            .map(str::to_owned)
            .collect(),
    })
}

/// Runtimes are stored as a JSON array of `{"name", "version"}`.
fn runtimes_to_json(runtimes: &[Runtime]) -> String {
    serde_json::Value::Array(
        runtimes
            .iter()
            .map(|r| serde_json::json!({ "name": r.name, "version": r.version }))
            .collect(),
    )
    .to_string()
}

fn runtimes_from_json(s: &str) -> Result<Vec<Runtime>> {
    let v: serde_json::Value =
        serde_json::from_str(s).map_err(|e| Error::Corrupt(format!("runtimes: {e}")))?;
    let field = |r: &serde_json::Value, k: &str| r[k].as_str().unwrap_or_default().to_string();
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .map(|r| Runtime {
                    name: field(r, "name"),
                    version: field(r, "version"),
                })
                .collect()
        })
        .unwrap_or_default())
}

impl Store {
    pub async fn list_daemons(
        &self,
        workspace_id: &str,
        after_id: &str,
        limit: i64,
    ) -> Result<Vec<Daemon>> {
        let rows = sqlx::query(&format!(
            "{} WHERE d.workspace_id = $1 AND d.id > $2 ORDER BY d.id LIMIT $3",
            *DAEMON_SELECT
        ))
        .bind(workspace_id)
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(daemon_from_row).collect()
    }

    pub async fn get_daemon(&self, id: &str) -> Result<Option<Daemon>> {
        let row = sqlx::query(&format!("{} WHERE d.id = $1", *DAEMON_SELECT))
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(daemon_from_row).transpose()
    }

    /// Creates or refreshes the daemon keyed by (workspace, machine id) and
    /// merges `legacy_ids` (their tasks and pending commands) into it.
    /// Answers `None`, changing nothing, when the daemon was disconnected
    /// from the token it registers with.
    pub async fn register_daemon(
        &self,
        info: &DaemonInfo,
        legacy_ids: &[String],
    ) -> Result<Option<Daemon>> {
        let now = now_micros();
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(
            "INSERT INTO daemons (id, workspace_id, machine_id, hostname, version, runtimes, \
             max_concurrent_tasks, state, created_at, last_seen_at, token_id, work_dir, \
             suggested_targets) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'online', $8, $8, $9, $10, $11) \
             ON CONFLICT (workspace_id, machine_id) DO UPDATE SET hostname = $4, version = $5, \
             runtimes = $6, max_concurrent_tasks = $7, state = 'online', last_seen_at = $8, \
             token_id = $9, work_dir = $10, suggested_targets = $11 \
             WHERE daemons.blocked_token_id IS NULL OR daemons.blocked_token_id <> $9 \
             RETURNING id",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(&info.workspace_id)
        .bind(&info.machine_id)
        .bind(&info.hostname)
        .bind(&info.version)
        .bind(runtimes_to_json(&info.runtimes))
        .bind(info.max_concurrent_tasks)
        .bind(now)
        .bind(&info.token_id)
        .bind(&info.work_dir)
        .bind(info.suggested_targets.join("\n"))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let id: String = row.try_get("id")?;
        for legacy in legacy_ids.iter().filter(|l| **l != id) {
            let owned = sqlx::query("SELECT id FROM daemons WHERE id = $1 AND workspace_id = $2")
                .bind(legacy)
                .bind(&info.workspace_id)
                .fetch_optional(&mut *tx)
                .await?;
            if owned.is_none() {
                continue;
            }
            for sql in [
                "UPDATE tasks SET daemon_id = $1 WHERE daemon_id = $2",
                "UPDATE tasks SET pinned_daemon_id = $1 WHERE pinned_daemon_id = $2",
                "UPDATE commands SET daemon_id = $1 WHERE daemon_id = $2",
                "DELETE FROM daemons WHERE id = $2 AND $1 <> $2",
            ] {
                sqlx::query(sql)
                    .bind(&id)
                    .bind(legacy)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        self.get_daemon(&id)
            .await?
            .ok_or_else(|| Error::Corrupt(format!("daemon {id} vanished")))
            .map(Some)
    }

    pub async fn set_daemon_state(&self, id: &str, state: DaemonState) -> Result<()> {
        sqlx::query("UPDATE daemons SET state = $2, last_seen_at = $3 WHERE id = $1")
            .bind(id)
            .bind(state.as_str())
            .bind(now_micros())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// The daemons among `daemons` with a free slot, and how many, in one
    /// read (a chunk of ids per statement). Dispatch claims only for them,
    /// so a full daemon never waits for the (SQLite: single) writer; the
    /// count inside the claim's transaction still decides.
    pub async fn with_free_slots(&self, daemons: Vec<Daemon>) -> Result<Vec<(Daemon, i64)>> {
        let mut active = std::collections::HashMap::new();
        for chunk in daemons.chunks(ID_CHUNK) {
            let sql = format!(
                "SELECT daemon_id, COUNT(*) AS n FROM tasks WHERE status IN {} \
                 AND daemon_id IN ({}) GROUP BY daemon_id",
                *ACTIVE,
                placeholders(1, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for d in chunk {
                q = q.bind(&d.id);
            }
            for row in q.fetch_all(&self.reader).await? {
                active.insert(row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?);
            }
        }
        Ok(daemons
            .into_iter()
            .filter_map(|d| {
                let free = d.max_concurrent_tasks - active.get(&d.id).copied().unwrap_or(0);
                (free > 0).then_some((d, free))
            })
            .collect())
    }

    pub(super) async fn active_count<'e>(
        &self,
        db: impl sqlx::Executor<'e, Database = sqlx::Any>,
        daemon: &Daemon,
    ) -> Result<i64> {
        Ok(sqlx::query(&format!(
            "SELECT COUNT(*) AS n FROM tasks WHERE daemon_id = $1 AND status IN {}",
            *ACTIVE
        ))
        .bind(&daemon.id)
        .fetch_one(db)
        .await?
        .try_get("n")?)
    }

    /// Records that these daemons are alive as of `now`: one statement per
    /// chunk, once per heartbeat interval, however often they beat.
    pub async fn touch_daemons(&self, ids: &[String], now: Micros) -> Result<()> {
        for chunk in ids.chunks(ID_CHUNK) {
            let sql = format!(
                "UPDATE daemons SET last_seen_at = $1, state = 'online' \
                 WHERE state <> 'gone' AND id IN ({})",
                placeholders(2, chunk.len())
            );
            let mut q = sqlx::query(&sql).bind(now);
            for id in chunk {
                q = q.bind(id);
            }
            q.execute(&self.writer).await?;
        }
        Ok(())
    }

    /// Marks offline the online daemons not seen since `cutoff` (whichever
    /// replica held them); answers their ids. `last_seen_at` is kept: the
    /// grace before their tasks are interrupted counts from it.
    pub async fn expire_daemons(&self, cutoff: Micros, also: &[String]) -> Result<Vec<String>> {
        let mut expired: Vec<String> = sqlx::query(
            "UPDATE daemons SET state = 'offline' \
             WHERE state = 'online' AND last_seen_at < $1 RETURNING id",
        )
        .bind(cutoff)
        .fetch_all(&self.writer)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>(0))
        .collect::<std::result::Result<_, _>>()?;
        for chunk in also.chunks(ID_CHUNK) {
            let sql = format!(
                "UPDATE daemons SET state = 'offline' \
                 WHERE state = 'online' AND id IN ({}) RETURNING id",
                placeholders(1, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id);
            }
            for r in q.fetch_all(&self.writer).await? {
                expired.push(r.try_get(0)?);
            }
        }
        Ok(expired)
    }

    /// Cuts a daemon off from the token it registered with: it goes
    /// offline and that token may not speak for it again.
    pub async fn block_daemon(&self, id: &str) -> Result<Option<Daemon>> {
        sqlx::query(
            "UPDATE daemons SET blocked_token_id = token_id, state = 'offline' WHERE id = $1",
        )
        .bind(id)
        .execute(&self.writer)
        .await?;
        self.get_daemon(id).await
    }

    /// Which (daemon, token) pairs among `pairs` are cut off.
    pub async fn blocked_among(&self, pairs: &[(String, String)]) -> Result<Vec<(String, String)>> {
        let mut blocked = Vec::new();
        for chunk in pairs.chunks(ID_CHUNK) {
            let ids: Vec<&String> = chunk.iter().map(|(d, _)| d).collect();
            let sql = format!(
                "SELECT id, blocked_token_id FROM daemons WHERE blocked_token_id IS NOT NULL \
                 AND id IN ({})",
                placeholders(1, ids.len())
            );
            let mut q = sqlx::query(&sql);
            for id in ids {
                q = q.bind(id);
            }
            for row in q.fetch_all(&self.reader).await? {
                let pair = (row.try_get::<String, _>(0)?, row.try_get::<String, _>(1)?);
                if chunk.contains(&pair) {
                    blocked.push(pair);
                }
            }
        }
        Ok(blocked)
    }

    /// Whether any daemon of the workspace (that has not deregistered)
    /// offers `runtime`.
    pub async fn runtime_offered(&self, workspace_id: &str, runtime: &str) -> Result<bool> {
        let rows =
            sqlx::query("SELECT runtimes FROM daemons WHERE workspace_id = $1 AND state <> 'gone'")
                .bind(workspace_id)
                .fetch_all(&self.reader)
                .await?;
        for row in &rows {
            let runtimes: String = row.try_get(0)?;
            if runtimes_from_json(&runtimes)?
                .iter()
                .any(|r| r.name == runtime)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
