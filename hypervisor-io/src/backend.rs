//! The seam under the SCSI layer: a logical unit's storage. The SCSI code
//! knows only this trait; a virtual disk ([`crate::vdisk`]), an RDM, and
//! the in-memory and null units of the tests and the bench implement it.

use std::sync::Mutex;

/// Why a backend I/O failed, as the SCSI layer reports it.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The medium could not be read at this place (MEDIUM ERROR,
    /// UNRECOVERED READ ERROR).
    #[error("reading {0}")]
    Read(String),
    /// The data could not be written (MEDIUM ERROR, WRITE ERROR).
    #[error("writing {0}")]
    Write(String),
    /// No room left on the datastore for a thin unit (DATA PROTECT,
    /// SPACE ALLOCATION FAILED WRITE PROTECT).
    #[error("no space left: {0}")]
    NoSpace(String),
    /// The unit is read-only (DATA PROTECT, WRITE PROTECTED).
    #[error("read-only: {0}")]
    ReadOnly(String),
    /// Anything else (HARDWARE ERROR, INTERNAL TARGET FAILURE).
    #[error("{0}")]
    Failed(String),
}

pub type BackendResult<T> = std::result::Result<T, BackendError>;

/// Who a unit is, the same on every host that serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// 16 bytes that name the unit (a virtual disk's `ddb.uuid`).
    pub uuid: [u8; 16],
    /// INQUIRY's product identification (at most 16 ASCII bytes).
    pub product: String,
}

impl Identity {
    /// The unit serial number (VPD page 80h): the UUID in hex.
    pub fn serial(&self) -> String {
        self.uuid.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// An NAA locally assigned designator (SPC-5 7.7.6.6.6: NAA 3, 60
    /// bits): the first 60 bits of the UUID, so the same disk has the same
    /// designator on every host. (We own no IEEE company ID for NAA 5/6;
    /// the whole UUID is in the T10 vendor ID designator beside it.)
    pub fn naa(&self) -> [u8; 8] {
        let mut d = [0u8; 8];
        d.copy_from_slice(&self.uuid[..8]);
        d[0] = 0x30 | (d[0] & 0x0F);
        d
    }
}

/// A logical unit's storage: bytes `0..capacity()`.
pub trait Backend: Send + Sync {
    /// Where it is, for logs and messages.
    fn describe(&self) -> String;
    fn identity(&self) -> Identity;
    /// Bytes; a multiple of the logical block size.
    fn capacity(&self) -> u64;
    /// Logical block size (512 for a virtual disk).
    fn block_size(&self) -> u32 {
        512
    }
    /// Blocks are allocated on first write, and a discard gives them back
    /// (LBPME): a thin virtual disk, or a delta over a snapshot.
    fn thin(&self) -> bool;
    /// The smallest range a discard frees whole (bytes); smaller parts
    /// are written as zeros.
    fn discard_granularity(&self) -> u64 {
        u64::from(self.block_size())
    }
    fn read_only(&self) -> bool {
        false
    }
    /// Read all of `buf` at `off` (inside the capacity).
    fn read_at(&self, buf: &mut [u8], off: u64) -> BackendResult<()>;
    /// Write all of `buf` at `off` (inside the capacity).
    fn write_at(&self, buf: &[u8], off: u64) -> BackendResult<()>;
    /// Make every completed write durable.
    fn flush(&self) -> BackendResult<()>;
    /// `[off, off+len)` reads as zeros afterwards; whole granules are given
    /// back to the datastore where the unit is thin.
    fn discard(&self, off: u64, len: u64) -> BackendResult<()>;
    /// Which of `[off, off+len)` is mapped (GET LBA STATUS): ranges in
    /// order; the default says all of it.
    fn mapped(&self, off: u64, len: u64) -> BackendResult<Vec<std::ops::Range<u64>>> {
        Ok(vec![off..off + len])
    }
}

/// A unit in memory (tests).
pub struct MemBackend {
    data: Mutex<Vec<u8>>,
    id: Identity,
}

impl MemBackend {
    pub fn new(capacity: u64, uuid: [u8; 16]) -> MemBackend {
        MemBackend {
            data: Mutex::new(vec![0; capacity as usize]),
            id: Identity {
                uuid,
                product: "Memory disk".into(),
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for MemBackend {
    fn describe(&self) -> String {
        "memory".into()
    }
    fn identity(&self) -> Identity {
        self.id.clone()
    }
    fn capacity(&self) -> u64 {
        self.lock().len() as u64
    }
    fn thin(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> BackendResult<()> {
        let d = self.lock();
        let o = off as usize;
        buf.copy_from_slice(&d[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> BackendResult<()> {
        let mut d = self.lock();
        let o = off as usize;
        d[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> BackendResult<()> {
        Ok(())
    }
    fn discard(&self, off: u64, len: u64) -> BackendResult<()> {
        let mut d = self.lock();
        d[off as usize..(off + len) as usize].fill(0);
        Ok(())
    }
}

/// A unit that stores nothing and reads zeros: the bench's ceiling of the
/// target itself.
pub struct NullBackend {
    pub capacity: u64,
}

impl Backend for NullBackend {
    fn describe(&self) -> String {
        "null".into()
    }
    fn identity(&self) -> Identity {
        Identity {
            uuid: [0x4E; 16],
            product: "Null disk".into(),
        }
    }
    fn capacity(&self) -> u64 {
        self.capacity
    }
    fn thin(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], _off: u64) -> BackendResult<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _off: u64) -> BackendResult<()> {
        Ok(())
    }
    fn flush(&self) -> BackendResult<()> {
        Ok(())
    }
    fn discard(&self, _off: u64, _len: u64) -> BackendResult<()> {
        Ok(())
    }
}
