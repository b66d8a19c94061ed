//! Workspaces, users and memberships.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Error, ID_CHUNK, Result, Store, placeholders};
use crate::model::*;

impl Store {
    /// Creates the workspace if missing; answers it and whether it was new.
    pub async fn ensure_workspace(&self, name: &str) -> Result<(Workspace, bool)> {
        let id = uuid::Uuid::now_v7().to_string();
        let inserted = sqlx::query(
            "INSERT INTO workspaces (id, name, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&id)
        .bind(name)
        .bind(now_micros())
        .execute(&self.writer)
        .await?
        .rows_affected()
            == 1;
        let ws = self
            .workspace_by_name(name)
            .await?
            .ok_or_else(|| Error::Corrupt(format!("workspace {name} vanished")))?;
        Ok((ws, inserted))
    }

    pub async fn workspace_by_name(&self, name: &str) -> Result<Option<Workspace>> {
        let row = sqlx::query("SELECT id, name, created_at FROM workspaces WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.writer)
            .await?;
        row.as_ref().map(workspace_from_row).transpose()
    }

    /// Creates the user if missing and answers its id.
    pub async fn ensure_user(&self, name: &str) -> Result<String> {
        sqlx::query(
            "INSERT INTO users (id, name, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(name)
        .bind(now_micros())
        .execute(&self.writer)
        .await?;
        let row = sqlx::query("SELECT id FROM users WHERE name = $1")
            .bind(name)
            .fetch_one(&self.writer)
            .await?;
        Ok(row.try_get("id")?)
    }

    pub async fn add_member(&self, workspace_id: &str, user_id: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO memberships (workspace_id, user_id) VALUES ($1, $2) \
             ON CONFLICT (workspace_id, user_id) DO NOTHING",
        )
        .bind(workspace_id)
        .bind(user_id)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    pub async fn user_workspaces(&self, user_id: &str) -> Result<Vec<Workspace>> {
        let rows = sqlx::query(
            "SELECT w.id, w.name, w.created_at FROM workspaces w \
             JOIN memberships m ON m.workspace_id = w.id WHERE m.user_id = $1 ORDER BY w.name",
        )
        .bind(user_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(workspace_from_row).collect()
    }

    pub async fn workspace_by_id(&self, id: &str) -> Result<Option<Workspace>> {
        let row = sqlx::query("SELECT id, name, created_at FROM workspaces WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(workspace_from_row).transpose()
    }

    /// Which (user, workspace) memberships among `pairs` still exist.
    pub async fn memberships_among(
        &self,
        pairs: &[(String, String)],
    ) -> Result<Vec<(String, String)>> {
        let mut kept = Vec::new();
        for chunk in pairs.chunks(ID_CHUNK) {
            let users: Vec<&String> = chunk.iter().map(|(u, _)| u).collect();
            let sql = format!(
                "SELECT user_id, workspace_id FROM memberships WHERE user_id IN ({})",
                placeholders(1, users.len())
            );
            let mut q = sqlx::query(&sql);
            for u in users {
                q = q.bind(u);
            }
            for row in q.fetch_all(&self.reader).await? {
                let pair = (row.try_get::<String, _>(0)?, row.try_get::<String, _>(1)?);
                if chunk.contains(&pair) {
                    kept.push(pair);
                }
            }
        }
        Ok(kept)
    }
}

fn workspace_from_row(r: &AnyRow) -> Result<Workspace> {
    Ok(Workspace {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        created_at: r.try_get("created_at")?,
    })
}
