//! gRPC handlers, one struct per service. [`AccessLayer`] has already
//! authenticated the caller and checked its token kind; each RPC validates
//! what only the wire format can tell (enum values, ids), calls one domain
//! method and converts the result. Domain errors become a Status here, once.

mod access;
mod daemon;
mod parse;
mod session;
mod task;
mod workspace;

pub use access::{AccessLayer, RULES, kinds_for};
pub use daemon::DaemonApi;
pub use session::SessionEnd;
pub use task::TaskApi;
pub use workspace::WorkspaceApi;

use tonic::Status;

use crate::domain::Error;

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
