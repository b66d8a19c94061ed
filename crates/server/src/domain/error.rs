//! The domain's one error enum; `api` maps each variant to one gRPC code.

use crate::store;

/// Everything that can go wrong in the domain; `api` maps each variant to
/// one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error(transparent)]
    Store(#[from] store::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

pub fn invalid(field: &'static str, message: impl Into<String>) -> Error {
    Error::InvalidArgument {
        field,
        message: message.into(),
    }
}

/// How every stream the server holds ends when it shuts down (UNAVAILABLE),
/// so clients reconnect rather than take it for a normal end.
pub const SHUTTING_DOWN: &str = "the server is shutting down; reconnect to go on";

pub(super) fn shutting_down() -> Error {
    Error::Unavailable(SHUTTING_DOWN.into())
}

pub(super) fn version_conflict(id: &str, expected: i64, actual: i64) -> Error {
    Error::Aborted(format!(
        "task {id} changed: expected version {expected}, actual version {actual}"
    ))
}
