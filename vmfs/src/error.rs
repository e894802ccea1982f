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
    /// A file operation found the namespace or the file not as it needs
    /// them (what POSIX calls ENOENT, EEXIST, ENOTDIR...): the kind, and a
    /// message that names the object.
    #[error("{1}")]
    File(Fault, String),
    /// An internal signal that the operation must run again (under the
    /// volume lock, or once a file-block cluster is given back). Never
    /// leaves the filesystem crate; opaque to everyone else.
    #[error("{0}")]
    Retry(Retry),
}

/// The kinds of [`FsError::File`]. The FUSE adapter maps them to errnos
/// ([`crate::fuse::errno`]); nothing else in the crate speaks errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    NotFound,
    Exists,
    NotDir,
    IsDir,
    NotEmpty,
    NameTooLong,
    Invalid,
    /// Past the largest file size.
    TooBig,
    NotPermitted,
    NotSupported,
    TooManyLinks,
    /// A raw device mapping whose LUN cannot be reached.
    NoDevice,
    Busy,
    NoSpace,
    /// A handle that does not allow the operation (read-only).
    BadHandle,
    Io,
}

impl Fault {
    /// The message of an error that has no more to say.
    pub fn describe(self) -> &'static str {
        match self {
            Fault::NotFound => "no such file or directory",
            Fault::Exists => "file exists",
            Fault::NotDir => "not a directory",
            Fault::IsDir => "is a directory",
            Fault::NotEmpty => "directory not empty",
            Fault::NameTooLong => "file name too long",
            Fault::Invalid => "invalid argument",
            Fault::TooBig => "file too large",
            Fault::NotPermitted => "operation not permitted",
            Fault::NotSupported => "operation not supported",
            Fault::TooManyLinks => "too many links",
            Fault::NoDevice => "no such device or address",
            Fault::Busy => "device or resource busy",
            Fault::NoSpace => "no space left on the datastore",
            Fault::BadHandle => "bad file handle",
            Fault::Io => "input/output error",
        }
    }
}

/// See [`FsError::Retry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry(pub(crate) RetryKind);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetryKind {
    /// A change that an operation running without the volume lock may not
    /// make (it touches metadata that lock guards): the operation is run
    /// again under it.
    NeedVolumeLock,
    /// A file-block cluster another host holds must be given back before
    /// the operation can free into it or allocate from it: the operation
    /// waits for it and runs again.
    ClusterBusy { addr: u64, slot: u32 },
    /// A write that would change the file's layout (freeing its sub-block
    /// leaves) while holding the file's data lock only shared: run again
    /// holding it exclusively.
    NeedExclusiveData,
}

impl std::fmt::Display for Retry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            RetryKind::NeedVolumeLock => write!(f, "internal: this change needs the volume lock"),
            RetryKind::NeedExclusiveData => {
                write!(f, "internal: this write needs the file's data lock alone")
            }
            RetryKind::ClusterBusy { addr, slot } => write!(
                f,
                "internal: file-block cluster {addr:#x} is held by the host in slot {slot}"
            ),
        }
    }
}

impl FsError {
    /// What kind of failure this is, for callers that act on it (and for
    /// the FUSE adapter's errno).
    pub fn fault(&self) -> Fault {
        match self {
            FsError::File(f, _) => *f,
            FsError::NoSpace(_) => Fault::NoSpace,
            FsError::Invalid(_) => Fault::Invalid,
            FsError::ReadOnly(_) => Fault::BadHandle,
            FsError::Busy(_) | FsError::Occupied(_) => Fault::Busy,
            _ => Fault::Io,
        }
    }

    /// An error of kind `f` with its plain message.
    pub fn fault_of(f: Fault) -> FsError {
        FsError::File(f, f.describe().to_string())
    }

    pub(crate) fn need_volume_lock() -> FsError {
        FsError::Retry(Retry(RetryKind::NeedVolumeLock))
    }

    pub(crate) fn cluster_busy(addr: u64, slot: u32) -> FsError {
        FsError::Retry(Retry(RetryKind::ClusterBusy { addr, slot }))
    }
}

pub type Result<T> = std::result::Result<T, FsError>;
