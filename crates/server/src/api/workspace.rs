//! WorkspaceService: workspaces, tokens and daemons, for user tokens.

use super::parse;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::access::principal;
use crate::domain::{Domain, page_size, parse_id, parse_optional_id};
use crate::pb::{self, workspace_service_server::WorkspaceService};
use crate::wire;

pub struct WorkspaceApi {
    domain: Arc<Domain>,
}

impl WorkspaceApi {
    pub fn new(domain: Arc<Domain>) -> Self {
        WorkspaceApi { domain }
    }
}

#[tonic::async_trait]
impl WorkspaceService for WorkspaceApi {
    async fn list_workspaces(
        &self,
        req: Request<pb::ListWorkspacesRequest>,
    ) -> Result<Response<pb::ListWorkspacesResponse>, Status> {
        let p = principal(&req)?;
        Ok(Response::new(pb::ListWorkspacesResponse {
            workspaces: p.workspaces.into_iter().map(wire::workspace).collect(),
        }))
    }

    async fn create_workspace(
        &self,
        req: Request<pb::CreateWorkspaceRequest>,
    ) -> Result<Response<pb::CreateWorkspaceResponse>, Status> {
        let p = principal(&req)?;
        let ws = self
            .domain
            .create_workspace(&p, &req.get_ref().name)
            .await?;
        Ok(Response::new(pb::CreateWorkspaceResponse {
            workspace: Some(wire::workspace(ws)),
        }))
    }

    async fn list_daemons(
        &self,
        req: Request<pb::ListDaemonsRequest>,
    ) -> Result<Response<pb::ListDaemonsResponse>, Status> {
        let p = principal(&req)?;
        let r = req.get_ref();
        let size = page_size("page_size", r.page_size, 100, 1000)?;
        let token = parse_optional_id("page_token", &r.page_token)?;
        let (daemons, next) = self
            .domain
            .list_daemons(&p, &r.workspace, size, token)
            .await?;
        Ok(Response::new(pb::ListDaemonsResponse {
            daemons: daemons.into_iter().map(wire::daemon).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn get_daemon(
        &self,
        req: Request<pb::GetDaemonRequest>,
    ) -> Result<Response<pb::GetDaemonResponse>, Status> {
        let p = principal(&req)?;
        let id = parse_id("id", &req.get_ref().id)?;
        let daemon = self.domain.get_daemon(&p, &id).await?;
        Ok(Response::new(pb::GetDaemonResponse {
            daemon: Some(wire::daemon(daemon)),
        }))
    }

    async fn check_target_exists(
        &self,
        req: Request<pb::CheckTargetExistsRequest>,
    ) -> Result<Response<pb::CheckTargetExistsResponse>, Status> {
        let p = principal(&req)?;
        let r = req.into_inner();
        let id = parse_id("daemon_id", &r.daemon_id)?;
        let (exists, is_directory) = self.domain.check_target_exists(&p, &id, &r.path).await?;
        Ok(Response::new(pb::CheckTargetExistsResponse {
            exists,
            is_directory,
        }))
    }

    async fn disconnect_daemon(
        &self,
        req: Request<pb::DisconnectDaemonRequest>,
    ) -> Result<Response<pb::DisconnectDaemonResponse>, Status> {
        let p = principal(&req)?;
        let id = parse_id("id", &req.get_ref().id)?;
        let daemon = self.domain.disconnect_daemon(&p, &id).await?;
        Ok(Response::new(pb::DisconnectDaemonResponse {
            daemon: Some(wire::daemon(daemon)),
        }))
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let p = principal(&req)?;
        let r = req.get_ref();
        let kind = parse::token_kind("kind", r.kind)?;
        let (token, secret) = self
            .domain
            .create_token(&p, &r.workspace, kind, &r.name)
            .await?;
        Ok(Response::new(pb::CreateTokenResponse {
            token: Some(wire::token(token)),
            secret,
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let p = principal(&req)?;
        let tokens = self
            .domain
            .list_tokens(&p, &req.get_ref().workspace)
            .await?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens.into_iter().map(wire::token).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let p = principal(&req)?;
        let id = parse_id("id", &req.get_ref().id)?;
        let token = self.domain.revoke_token(&p, &id).await?;
        Ok(Response::new(pb::RevokeTokenResponse {
            token: Some(wire::token(token)),
        }))
    }
}
