//! Which workspace a request means, and creating workspaces.

use super::validate::check_workspace_name;
use super::{Domain, Error, Result, invalid};
use crate::model::*;

/// The caller's user id; daemon tokens answer PERMISSION_DENIED.
pub fn require_user(p: &Principal) -> Result<&str> {
    match (p.kind, &p.user_id) {
        (TokenKind::User, Some(id)) => Ok(id),
        _ => Err(Error::PermissionDenied("this needs a user token".into())),
    }
}

pub const DEFAULT_WORKSPACE: &str = "default";

impl Domain {
    /// The workspace a request names (by id or name) among those the caller
    /// sees; an empty name is allowed when the caller sees exactly one.
    pub fn resolve_workspace(&self, p: &Principal, name: &str) -> Result<Workspace> {
        if name.is_empty() {
            return match p.workspaces.as_slice() {
                [only] => Ok(only.clone()),
                [] => Err(Error::PermissionDenied(
                    "this token's user belongs to no workspace".into(),
                )),
                many => Err(invalid(
                    "workspace",
                    format!(
                        "this token sees {} workspaces ({}); name one",
                        many.len(),
                        many.iter()
                            .map(|w| w.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )),
            };
        }
        p.workspaces
            .iter()
            .find(|w| w.id == name || w.name == name)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("workspace {name} not found")))
    }

    pub async fn create_workspace(&self, p: &Principal, name: &str) -> Result<Workspace> {
        let user_id = require_user(p)?;
        let name = check_workspace_name(name)?;
        let (ws, created) = self.store.ensure_workspace(&name).await?;
        if !created {
            return Err(Error::AlreadyExists(format!(
                "workspace {name} already exists"
            )));
        }
        self.store.add_member(&ws.id, user_id).await?;
        Ok(ws)
    }
}
