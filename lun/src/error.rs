use thiserror::Error;

/// Everything that can go wrong talking to a LUN. Each variant names the LUN
/// (as the user wrote it) and, where there is one, the offset.
#[derive(Debug, Error)]
pub enum LunError {
    // The OS error is part of the message, not a source: shown once, not
    // again by a caller that prints the chain.
    #[error("{lun}: I/O error at offset {offset} (+{len} bytes): {cause}")]
    Io {
        lun: String,
        offset: u64,
        len: u64,
        cause: std::io::Error,
    },
    #[error("{lun}: {what}: {cause}")]
    Open {
        lun: String,
        what: String,
        cause: std::io::Error,
    },
    #[error("{lun}: access at offset {offset} (+{len} bytes) is beyond the end of the LUN ({size} bytes)")]
    OutOfRange {
        lun: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{lun}: {what} is not supported by this LUN")]
    Unsupported { lun: String, what: &'static str },
    #[error("{lun}: {what}")]
    InvalidArgument { lun: String, what: String },
    #[error("{url}: not a LUN URL: {reason} (expected a path, file:///path, nbd://host[:port]/export, nbd+unix:///export?socket=/path or iscsi://[user[%password]@]host[:port]/target-iqn/lun)")]
    BadUrl { url: String, reason: String },
    #[error("{lun}: NBD protocol error: {what}")]
    Protocol { lun: String, what: String },
    #[error("{lun}: the NBD server refused {what}: {message}")]
    Refused {
        lun: String,
        what: String,
        message: String,
    },
    #[error("{lun}: the server reported error {errno} ({message}) at offset {offset}")]
    Remote {
        lun: String,
        offset: u64,
        errno: u32,
        message: String,
    },
    #[error("{lun}: SCSI {command} at offset {offset} failed: {status}")]
    Scsi {
        lun: String,
        command: &'static str,
        offset: u64,
        status: String,
    },
    #[error("{lun}: iSCSI: {what}")]
    Iscsi { lun: String, what: String },
    #[error("{lun}: connection lost: {what}")]
    Disconnected { lun: String, what: String },
    #[error("{lun}: this host is fenced and writes nothing more to the datastore: {why}")]
    Fenced { lun: String, why: String },
    #[error("{lun}: injected fault at offset {offset} ({op})")]
    Injected {
        lun: String,
        offset: u64,
        op: &'static str,
    },
}

pub type Result<T> = std::result::Result<T, LunError>;
