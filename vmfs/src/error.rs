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
    /// A change asked of a file opened read-only.
    #[error("{0}")]
    ReadOnly(String),
    /// A LUN that mkfs or extend would overwrite holds something (a
    /// datastore, a filesystem, a partition table...) or is in use.
    #[error("{0}")]
    Occupied(String),
    #[error("no space left on the datastore ({0})")]
    NoSpace(String),
    #[error("{1}")]
    Posix(i32, String),
    /// A change that an operation running without the volume lock may not
    /// make (it touches metadata that lock guards): the operation is run
    /// again under it. Never leaves the filesystem crate.
    #[error("this change needs the volume lock")]
    NeedVolumeLock,
    /// A file-block cluster another host holds must be given back before the
    /// operation can free into it or allocate from it: the operation waits
    /// for it and runs again. Never leaves the filesystem crate.
    #[error("file-block cluster {addr:#x} is held by the host in slot {slot}")]
    ClusterBusy { addr: u64, slot: u32 },
}

impl FsError {
    /// The errno a FUSE reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Posix(e, _) => *e,
            FsError::NoSpace(_) => libc::ENOSPC,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::ReadOnly(_) => libc::EBADF,
            FsError::Busy(_) | FsError::Occupied(_) => libc::EBUSY,
            _ => libc::EIO,
        }
    }
    pub fn posix(e: i32) -> FsError {
        FsError::Posix(e, std::io::Error::from_raw_os_error(e).to_string())
    }
}

pub type Result<T> = std::result::Result<T, FsError>;
