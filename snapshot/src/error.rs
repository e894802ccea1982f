use thiserror::Error;

/// Errors of the virtual-disk layer. Every error about a file's content
/// names the file (and the byte offset where there is one).
#[derive(Debug, Error)]
pub enum DiskError {
    /// The datastore (or the local filesystem) under the files failed.
    #[error("{file}: {source}")]
    Store {
        file: String,
        #[source]
        source: StoreError,
    },
    /// A descriptor that does not parse or says something impossible.
    #[error("{file}: line {line}: {reason}")]
    Descriptor {
        file: String,
        line: usize,
        reason: String,
    },
    /// A sparse extent's metadata is damaged or impossible.
    #[error("{file} at offset {offset}: {reason}")]
    Corrupt {
        file: String,
        offset: u64,
        reason: String,
    },
    /// The chain is not consistent (a parent's CID differs from the one its
    /// child recorded, a missing parent, a cycle, too deep).
    #[error("{0}")]
    Chain(String),
    /// A request that cannot be done as asked (an offset past the end, a
    /// size that is not a whole number of sectors, a name with a `/`).
    #[error("{0}")]
    Invalid(String),
}

/// What a [`crate::Store`] reports: the datastore's error, or the local
/// filesystem's.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error(transparent)]
    Vmfs(#[from] vmfs::FsError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl StoreError {
    /// Whether the file was not there.
    pub fn is_not_found(&self) -> bool {
        match self {
            StoreError::Vmfs(e) => e.fault() == vmfs::Fault::NotFound,
            StoreError::Io(e) => e.kind() == std::io::ErrorKind::NotFound,
        }
    }
}

pub type Result<T> = std::result::Result<T, DiskError>;

/// Attach the file name to a store error.
pub(crate) fn at(file: &str) -> impl FnOnce(StoreError) -> DiskError + '_ {
    move |source| DiskError::Store {
        file: file.to_string(),
        source,
    }
}
