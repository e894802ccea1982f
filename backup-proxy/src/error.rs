use thiserror::Error;

/// Errors of the backup repository. Every error about an object names it
/// (its key in the repository) and what is wrong with it.
#[derive(Debug, Error)]
pub enum BackupError {
    /// The backend (local directory or object store) failed.
    #[error("{what}: {msg}")]
    Backend { what: String, msg: String },
    /// An object that is there but damaged: a bad magic, version,
    /// checksum, length, or content that does not hash to its name.
    #[error("{what}: damaged: {why}")]
    Corrupt { what: String, why: String },
    /// An object that should be there and is not.
    #[error("{0}: not found")]
    NotFound(String),
    /// A key that does not open the repository, a wrong passphrase, a
    /// repository that is encrypted and no key given.
    #[error("{0}")]
    Key(String),
    /// The image read or written (a file, a block device, a virtual disk).
    #[error("{what}: {msg}")]
    Image { what: String, msg: String },
    /// The catalog (SQLite).
    #[error("catalog {path}: {msg}")]
    Catalog { path: String, msg: String },
    /// A request that cannot be done as asked.
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, BackupError>;

pub(crate) fn corrupt(what: impl Into<String>, why: impl Into<String>) -> BackupError {
    BackupError::Corrupt {
        what: what.into(),
        why: why.into(),
    }
}

pub(crate) fn image_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> BackupError {
    BackupError::Image {
        what: what.to_string(),
        msg: e.to_string(),
    }
}
