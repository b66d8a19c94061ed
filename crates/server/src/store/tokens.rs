//! Tokens: only the hash of a secret is stored.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{ID_CHUNK, Result, Store, parse_enum, placeholders};
use crate::model::*;

const TOKEN_SELECT: &str = "SELECT t.id, t.kind, t.name, t.workspace_id, t.user_id, u.name AS user_name, \
    t.created_at, t.revoked_at FROM tokens t LEFT JOIN users u ON u.id = t.user_id";

fn token_from_row(r: &AnyRow) -> Result<Token> {
    Ok(Token {
        id: r.try_get("id")?,
        kind: parse_enum(&r.try_get::<String, _>("kind")?)?,
        name: r.try_get("name")?,
        workspace_id: r.try_get("workspace_id")?,
        user_id: r.try_get("user_id")?,
        user_name: r.try_get("user_name")?,
        created_at: r.try_get("created_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

impl Store {
    pub async fn insert_token(&self, token: &Token, secret_hash: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO tokens (id, kind, name, secret_hash, workspace_id, user_id, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&token.id)
        .bind(token.kind.as_str())
        .bind(&token.name)
        .bind(secret_hash)
        .bind(&token.workspace_id)
        .bind(token.user_id.clone())
        .bind(token.created_at)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    pub async fn token_by_hash(&self, secret_hash: &str) -> Result<Option<Token>> {
        let row = sqlx::query(&format!("{TOKEN_SELECT} WHERE t.secret_hash = $1"))
            .bind(secret_hash)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    pub async fn token_by_id(&self, id: &str) -> Result<Option<Token>> {
        let row = sqlx::query(&format!("{TOKEN_SELECT} WHERE t.id = $1"))
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    pub async fn list_tokens(&self, workspace_id: &str) -> Result<Vec<Token>> {
        let rows = sqlx::query(&format!(
            "{TOKEN_SELECT} WHERE t.workspace_id = $1 ORDER BY t.created_at, t.id"
        ))
        .bind(workspace_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(token_from_row).collect()
    }

    /// Marks the token revoked (keeping the first revocation time).
    pub async fn revoke_token(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
            .bind(id)
            .bind(now_micros())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    pub async fn count_tokens(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM tokens")
            .fetch_one(&self.writer)
            .await?;
        Ok(row.try_get("n")?)
    }

    /// The revoked tokens among `ids`.
    pub async fn revoked_among(&self, ids: &[String]) -> Result<Vec<String>> {
        let mut revoked = Vec::new();
        for chunk in ids.chunks(ID_CHUNK) {
            let sql = format!(
                "SELECT id FROM tokens WHERE revoked_at IS NOT NULL AND id IN ({})",
                placeholders(1, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id);
            }
            for row in q.fetch_all(&self.reader).await? {
                revoked.push(row.try_get(0)?);
            }
        }
        Ok(revoked)
    }

    /// The secret named `name`, made (random, 256 bits, hex) on first use;
    /// replicas racing to make it all end up with the first one written.
    pub async fn server_secret(&self, name: &str) -> Result<String> {
        use rand::RngCore;
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let fresh: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        sqlx::query(
            "INSERT INTO server_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(&fresh)
        .execute(&self.writer)
        .await?;
        let row = sqlx::query("SELECT value FROM server_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(&self.writer)
            .await?;
        Ok(row.try_get(0)?)
    }
}
