use thiserror::Error;

/// Errors of the filesystem library. Corruption always names the LUN, the
/// byte offset on it and the object, so a person can find and inspect it.
#[derive(Debug, Error)]
pub enum FsError {
    #[error(transparent)]
    Lun(#[from] lun::LunError),
    #[error("corrupt {object} on {lun} at offset {offset}: {reason}")]
    Corrupt {
        lun: String,
        offset: u64,
        object: String,
        reason: String,
    },
    #[error("extent {index} ({lun}): {reason}")]
    Extent {
        index: usize,
        lun: String,
        reason: String,
    },
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error(transparent)]
    Lock(#[from] locking::LockError),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Invalid(String),
    #[error("no space left on the datastore ({0})")]
    NoSpace(String),
    #[error("{0}")]
    Posix(i32, String),
}

impl FsError {
    /// The errno a FUSE reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Posix(e, _) => *e,
            FsError::NoSpace(_) => libc::ENOSPC,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::Busy(_) => libc::EBUSY,
            _ => libc::EIO,
        }
    }
    pub fn posix(e: i32) -> FsError {
        FsError::Posix(e, std::io::Error::from_raw_os_error(e).to_string())
    }
}

pub type Result<T> = std::result::Result<T, FsError>;
