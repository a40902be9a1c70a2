//! The library's error type.

use serde::{Deserialize, Serialize};

/// Errors of the store library. They cross the wire (as [`WireError`]), so a
/// replica's refusal reaches the writer with its meaning intact.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("volume {0:?} not found")]
    NotFound(String),
    #[error("{0:?} already exists")]
    Exists(String),
    /// The request carried an older epoch than the replica's (or, to take
    /// an epoch, one not newer): the writer has been replaced and must stop.
    #[error("fenced: request epoch {request}, replica epoch {current} (another writer took over)")]
    Fenced { request: u64, current: u64 },
    /// The request carried a newer epoch than the replica knows: the writer
    /// must raise the replica's epoch first.
    #[error("replica epoch {current} is behind request epoch {request}")]
    EpochAhead { request: u64, current: u64 },
    #[error("I/O error: {0}")]
    Io(String),
    #[error("metadata database error: {0}")]
    Meta(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("replica unavailable: {0}")]
    Unavailable(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}

macro_rules! meta_err {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Meta(e.to_string())
            }
        }
    )*};
}
meta_err!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The serializable form of [`Error`] carried in replies.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WireError {
    Invalid(String),
    NotFound(String),
    Exists(String),
    Fenced { request: u64, current: u64 },
    EpochAhead { request: u64, current: u64 },
    Io(String),
    Meta(String),
    Protocol(String),
    Unavailable(String),
}

impl From<Error> for WireError {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid(s) => WireError::Invalid(s),
            Error::NotFound(s) => WireError::NotFound(s),
            Error::Exists(s) => WireError::Exists(s),
            Error::Fenced { request, current } => WireError::Fenced { request, current },
            Error::EpochAhead { request, current } => WireError::EpochAhead { request, current },
            Error::Io(s) => WireError::Io(s),
            Error::Meta(s) => WireError::Meta(s),
            Error::Protocol(s) => WireError::Protocol(s),
            Error::Unavailable(s) => WireError::Unavailable(s),
        }
    }
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Invalid(s) => Error::Invalid(s),
            WireError::NotFound(s) => Error::NotFound(s),
            WireError::Exists(s) => Error::Exists(s),
            WireError::Fenced { request, current } => Error::Fenced { request, current },
            WireError::EpochAhead { request, current } => Error::EpochAhead { request, current },
            WireError::Io(s) => Error::Io(s),
            WireError::Meta(s) => Error::Meta(s),
            WireError::Protocol(s) => Error::Protocol(s),
            WireError::Unavailable(s) => Error::Unavailable(s),
        }
    }
}
