//! Tokens: random secrets shown once, stored as SHA-256 hashes.

use rand::RngCore;
use sha2::{Digest, Sha256};

use super::{Domain, Error, Result, invalid, require_user};
use crate::model::*;

/// The user who owns the bootstrap token and tokens made from the CLI.
pub const ADMIN_USER: &str = "admin";

pub fn hash_secret(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// `tmu_…` for users, `tmd_…` for daemons, `tmv_…` for viewers, then 256
/// random bits in hex; the
/// prefix lets people and secret scanners tell what a leaked string is.
fn new_secret(kind: TokenKind) -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let prefix = match kind {
        TokenKind::User => "tmu_",
        TokenKind::Daemon => "tmd_",
        TokenKind::Viewer => "tmv_",
        TokenKind::Agent => super::agents::PREFIX,
    };
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

fn agent_tokens_are_minted() -> Error {
    invalid(
        "kind",
        "agent tokens are made for each attempt of a task and handed to its agent; create a user, daemon or viewer token",
    )
}

impl Domain {
    /// Resolves a bearer secret to the caller. Revocation is checked on
    /// every call, so a revoked token stops working at once.
    pub async fn authenticate(&self, secret: &str) -> Result<Principal> {
        if secret.starts_with(super::agents::PREFIX) {
            return self.authenticate_agent(secret).await;
        }
        let unauthenticated = || Error::Unauthenticated("invalid or revoked token".into());
        let token = self
            .store
            .token_by_hash(&hash_secret(secret))
            .await?
            .ok_or_else(unauthenticated)?;
        if token.revoked_at.is_some() {
            return Err(unauthenticated());
        }
        let (workspaces, subject) = match (token.kind, &token.user_id) {
            (TokenKind::User, Some(user_id)) => (
                self.store.user_workspaces(user_id).await?,
                format!("user:{}", token.user_name.as_deref().unwrap_or(user_id)),
            ),
            _ => (
                self.store
                    .workspace_by_id(&token.workspace_id)
                    .await?
                    .into_iter()
                    .collect(),
                format!("token:{}", token.name),
            ),
        };
        Ok(Principal {
            token_id: token.id,
            kind: token.kind,
            user_id: token.user_id,
            subject,
            workspaces,
            daemon_id: None,
            task_scope: None,
        })
    }

    /// Creates a token in `workspace` (created if missing) without a caller:
    /// the `taskmesh token create` command and the first start use this.
    /// A user token belongs to `user` (created and made a member if missing).
    pub async fn create_token_unchecked(
        &self,
        workspace: &str,
        kind: TokenKind,
        name: &str,
        user: &str,
    ) -> Result<(Token, String, Workspace)> {
        let (ws, _) = self.store.ensure_workspace(workspace).await?;
        let user_id = match kind {
            TokenKind::User => {
                let id = self.store.ensure_user(user).await?;
                self.store.add_member(&ws.id, &id).await?;
                Some(id)
            }
            TokenKind::Daemon | TokenKind::Viewer => None,
            TokenKind::Agent => return Err(agent_tokens_are_minted()),
        };
        let (token, secret) = self.insert_token(&ws, kind, name, user_id).await?;
        Ok((token, secret, ws))
    }

    /// On first start (no token at all) prints nothing itself: answers the
    /// bootstrap admin token for the default workspace, once.
    pub async fn bootstrap(&self) -> Result<Option<String>> {
        self.store
            .ensure_workspace(super::DEFAULT_WORKSPACE)
            .await?;
        if self.store.count_tokens().await? > 0 {
            return Ok(None);
        }
        let (_, secret, _) = self
            .create_token_unchecked(
                super::DEFAULT_WORKSPACE,
                TokenKind::User,
                "bootstrap",
                ADMIN_USER,
            )
            .await?;
        Ok(Some(secret))
    }

    pub async fn create_token(
        &self,
        p: &Principal,
        workspace: &str,
        kind: TokenKind,
        name: &str,
    ) -> Result<(Token, String)> {
        let user_id = require_user(p)?.to_string();
        if kind == TokenKind::Agent {
            return Err(agent_tokens_are_minted());
        }
        let ws = self.resolve_workspace(p, workspace)?;
        let name = name.trim();
        if name.chars().count() > super::MAX_NAME_CHARS || name.chars().any(char::is_control) {
            return Err(invalid("name", "must be at most 256 printable characters"));
        }
        let owner = (kind == TokenKind::User).then_some(user_id);
        self.insert_token(&ws, kind, name, owner).await
    }

    async fn insert_token(
        &self,
        ws: &Workspace,
        kind: TokenKind,
        name: &str,
        user_id: Option<String>,
    ) -> Result<(Token, String)> {
        let secret = new_secret(kind);
        let token = Token {
            id: uuid::Uuid::now_v7().to_string(),
            kind,
            name: name.to_string(),
            workspace_id: ws.id.clone(),
            user_id,
            user_name: None,
            created_at: now_micros(),
            revoked_at: None,
        };
        self.store
            .insert_token(&token, &hash_secret(&secret))
            .await?;
        let stored = self.store.token_by_id(&token.id).await?.unwrap_or(token);
        Ok((stored, secret))
    }

    pub async fn list_tokens(&self, p: &Principal, workspace: &str) -> Result<Vec<Token>> {
        require_user(p)?;
        let ws = self.resolve_workspace(p, workspace)?;
        Ok(self.store.list_tokens(&ws.id).await?)
    }

    pub async fn revoke_token(&self, p: &Principal, id: &str) -> Result<Token> {
        require_user(p)?;
        let not_found = || Error::NotFound(format!("token {id} not found"));
        let token = self.store.token_by_id(id).await?.ok_or_else(not_found)?;
        if !p.sees(&token.workspace_id) {
            return Err(not_found());
        }
        self.store.revoke_token(id).await?;
        // Streams here end now; on other replicas at their next sweep.
        self.streams.end_token(id, super::StreamEnd::Revoked);
        self.store.token_by_id(id).await?.ok_or_else(not_found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_distinct_prefixed_and_hash_stably() {
        let a = new_secret(TokenKind::User);
        let b = new_secret(TokenKind::Daemon);
        assert!(a.starts_with("tmu_") && b.starts_with("tmd_"));
        assert_eq!(a.len(), 4 + 64);
        assert_ne!(a[4..], b[4..]);
        assert_eq!(hash_secret(&a), hash_secret(&a));
        assert_ne!(hash_secret(&a), hash_secret(&b));
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
