//! gRPC handlers, one struct per service. Each RPC authenticates, validates
//! what only the wire format can tell (enum values, ids), calls one domain
//! method and converts the result. Domain errors become a Status here, once.

mod daemon;
mod parse;
mod session;
mod task;
mod workspace;

pub use daemon::DaemonApi;
pub use session::SessionEnd;
pub use task::TaskApi;
pub use workspace::WorkspaceApi;

use tonic::{Request, Status};

use crate::domain::{Domain, Error};
use crate::model::Principal;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::NotFound(m) => Status::not_found(m),
            e @ Error::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::AlreadyExists(m) => Status::already_exists(m),
            Error::Aborted(m) => Status::aborted(m),
            Error::Unavailable(m) => Status::unavailable(m),
            Error::Unauthenticated(m) => Status::unauthenticated(m),
            Error::PermissionDenied(m) => Status::permission_denied(m),
            Error::ResourceExhausted(m) => Status::resource_exhausted(m),
            Error::Store(e) => {
                tracing::error!(error = %e, "storage failure");
                Status::internal("internal storage error")
            }
        }
    }
}

/// The caller behind `authorization: Bearer <token>`.
async fn authenticate<T>(domain: &Domain, req: &Request<T>) -> Result<Principal, Status> {
    let header = req
        .metadata()
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>` header"))?;
    let value = header
        .to_str()
        .map_err(|_| Status::unauthenticated("malformed authorization header"))?;
    let secret = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
    Ok(domain.authenticate(secret).await?)
}
