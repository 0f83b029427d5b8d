//! The coordinator's errors, mapped once to gRPC statuses.

use tonic::Status;

use crate::farm::{Disconnect, FarmError};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("store: {0}")]
    Store(#[from] rusqlite::Error),
    /// PostgreSQL refused or could not be reached; `transient`: the same
    /// call may succeed later (a restart, a lost connection).
    #[error("store (postgres): {message}")]
    Postgres { message: String, transient: bool },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The data directory's disk (or quota) is full.
    #[error("coordinator data dir full ({free} bytes free)")]
    DataDirFull { free: u64 },
    #[error("{0}")]
    Internal(String),
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        match e {
            CoordinatorError::InvalidArgument(m) => Status::invalid_argument(m),
            CoordinatorError::NotFound(m) => Status::not_found(m),
            CoordinatorError::FailedPrecondition(m) => Status::failed_precondition(m),
            CoordinatorError::ResourceExhausted(m) => Status::resource_exhausted(m),
            CoordinatorError::PermissionDenied(m) => Status::permission_denied(m),
            CoordinatorError::AlreadyExists(m) => Status::already_exists(m),
            CoordinatorError::Unauthenticated(m) => Status::unauthenticated(m),
            CoordinatorError::DataDirFull { .. } => Status::resource_exhausted(e.to_string()),
            // A full disk that no `DataDir::check` saw still says what it is.
            e @ (CoordinatorError::Store(_) | CoordinatorError::Io(_)) if e.is_disk_full() => {
                tracing::error!(error = %e, "the data directory is full");
                match crate::space::data_dir_free_bytes() {
                    Some(free) => Status::resource_exhausted(CoordinatorError::DataDirFull { free }.to_string()),
                    None => Status::resource_exhausted("coordinator data dir full"),
                }
            }
            CoordinatorError::Store(e) => {
                tracing::error!(error = %e, "store failure");
                Status::internal("the coordinator's store failed; see its log")
            }
            CoordinatorError::Postgres { message, .. } => {
                tracing::error!(error = %message, "store failure");
                Status::unavailable("the coordinator's store is unreachable; see its log")
            }
            CoordinatorError::Io(e) => {
                tracing::error!(error = %e, "i/o failure");
                Status::internal("the coordinator hit an i/o error; see its log")
            }
            CoordinatorError::Internal(m) => Status::internal(m),
        }
    }
}

impl CoordinatorError {
    /// Whether this is a full disk (or quota), by its kind or code.
    pub fn is_disk_full(&self) -> bool {
        match self {
            CoordinatorError::Io(e) => crate::space::io_is_full(e),
            CoordinatorError::Store(e) => crate::space::sqlite_is_full(e),
            CoordinatorError::DataDirFull { .. } => true,
            _ => false,
        }
    }
}

pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

impl From<FarmError> for CoordinatorError {
    fn from(e: FarmError) -> CoordinatorError {
        match e {
            FarmError::NotFound(m) => CoordinatorError::NotFound(m),
            FarmError::PermissionDenied(m) => CoordinatorError::PermissionDenied(m),
            FarmError::FailedPrecondition(m) => CoordinatorError::FailedPrecondition(m),
            FarmError::AlreadyExists(m) => CoordinatorError::AlreadyExists(m),
        }
    }
}

impl From<FarmError> for Status {
    fn from(e: FarmError) -> Status {
        CoordinatorError::from(e).into()
    }
}

/// What an agent's session is told when the farm closes it.
pub fn disconnect_status(agent: &str, why: Disconnect) -> Status {
    match why {
        Disconnect::Replaced => Status::aborted("replaced by a newer session of the same agent"),
        Disconnect::Lost => Status::unavailable("declared lost: no heartbeat in time"),
        Disconnect::Superseded => {
            Status::unauthenticated(format!("the certificate of agent {agent:?} was revoked: a newer one was enrolled"))
        }
        Disconnect::Forgotten => Status::unauthenticated(format!(
            "agent {agent:?} was forgotten by an operator; its certificates are revoked"
        )),
    }
}
