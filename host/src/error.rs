use thiserror::Error;

/// Errors of the host agent and of the operations it shares with the CLI.
/// Each has a class ([`HostError::class`]) that travels in a reply, so a
/// client can act on the kind of failure without reading the message.
#[derive(Debug, Error)]
pub enum HostError {
    #[error(transparent)]
    Fs(#[from] vmfs::FsError),
    #[error(transparent)]
    Lun(#[from] lun::LunError),
    #[error(transparent)]
    Rdm(#[from] rdm::RdmError),
    #[error(transparent)]
    Disk(snapshot::DiskError),
    /// A request the protocol cannot parse: not JSON, too long, a field of
    /// the wrong type, an argument missing or unknown.
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("unknown command {0:?} (this host knows: {1})")]
    UnknownCommand(String, String),
    /// The client speaks a protocol version this host does not.
    #[error("{0}")]
    Version(String),
    /// The control socket is root-only.
    #[error("{0}")]
    Permission(String),
    /// What the request names does not exist (a file, a datastore, a host).
    #[error("{0}")]
    NotFound(String),
    /// The host is at its limit of something (connections): try again.
    #[error("{0}")]
    Busy(String),
    /// Talking to the host agent failed (it stopped, or is not ours).
    #[error("{0}")]
    Agent(String),
    /// An error a host agent replied with, as it classed it.
    #[error("{message}")]
    Remote { class: String, message: String },
    #[error("{what}: {cause}")]
    Io { what: String, cause: std::io::Error },
}

impl HostError {
    /// The class a reply carries: `BadRequest`, `UnknownCommand`,
    /// `VersionMismatch`, `PermissionDenied`, `NotFound`, `Busy`,
    /// `Occupied`, `Invalid`, `NoSpace`, `Corrupt`, `Failed`.
    pub fn class(&self) -> &str {
        use vmfs::FsError as F;
        match self {
            HostError::BadRequest(_) => "BadRequest",
            HostError::UnknownCommand(..) => "UnknownCommand",
            HostError::Version(_) => "VersionMismatch",
            HostError::Permission(_) => "PermissionDenied",
            HostError::NotFound(_) => "NotFound",
            HostError::Busy(_) => "Busy",
            HostError::Remote { class, .. } => class,
            HostError::Fs(F::Busy(_)) => "Busy",
            HostError::Fs(F::Occupied(_)) => "Occupied",
            HostError::Fs(F::Invalid(_) | F::ReadOnly(_)) => "Invalid",
            HostError::Fs(F::NoSpace(_)) => "NoSpace",
            HostError::Fs(F::Corrupt { .. }) => "Corrupt",
            HostError::Fs(F::File(vmfs::Fault::NotFound, _)) => "NotFound",
            HostError::Fs(F::File(vmfs::Fault::Busy, _)) => "Busy",
            HostError::Fs(F::File(vmfs::Fault::NoSpace, _)) => "NoSpace",
            HostError::Fs(F::File(_, _)) => "Invalid",
            HostError::Rdm(rdm::RdmError::DatastoreLun { .. }) => "Invalid",
            HostError::Disk(snapshot::DiskError::Store { source, .. }) if source.is_not_found() => {
                "NotFound"
            }
            HostError::Disk(snapshot::DiskError::Store {
                source: snapshot::error::StoreError::Vmfs(vmfs::FsError::Busy(_)),
                ..
            }) => "Busy",
            HostError::Disk(
                snapshot::DiskError::Corrupt { .. }
                | snapshot::DiskError::Descriptor { .. }
                | snapshot::DiskError::Chain(_),
            ) => "Corrupt",
            HostError::Disk(snapshot::DiskError::Invalid(_)) => "Invalid",
            _ => "Failed",
        }
    }

    pub(crate) fn io(what: impl Into<String>, cause: std::io::Error) -> HostError {
        HostError::Io {
            what: what.into(),
            cause,
        }
    }
}

pub type Result<T> = std::result::Result<T, HostError>;
