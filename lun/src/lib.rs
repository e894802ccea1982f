//! Block access to LUNs.
//!
//! One trait, [`Lun`], for every kind of block storage the datastore sits on:
//! local files and block devices ([`FileLun`]), NBD exports ([`NbdLun`]),
//! iSCSI LUNs through libiscsi ([`IscsiLun`]), and
//! for tests an in-memory LUN ([`MemLun`]) and a fault-injecting wrapper
//! ([`FaultLun`]). LUNs are addressed in bytes; [`open`] takes a path or a URL
//! written the way QEMU writes it.
//!
//! This crate knows nothing of filesystems: it moves bytes and reports, for
//! every failure, which LUN, which offset and what went wrong.

mod cow;
mod error;
mod fault;
mod fence;
mod file;
pub mod iscsi;
mod mem;
pub mod nbd;
pub mod nbd_proto;
pub mod probe;
mod tracked;
mod url;

use std::sync::Arc;

pub use cow::{CowLun, Event, Pages, RecordingLun, WriteLog};
pub use error::{LunError, Result};
pub use fault::{FaultLun, FaultPlan};
pub use fence::{FencedLun, Lease};
pub use file::FileLun;
pub use iscsi::{IscsiLun, IscsiOptions};
pub use mem::MemLun;
pub use nbd::NbdLun;
pub use tracked::FlushTracked;
pub use url::{redact, IscsiUrl, LunUrl, NbdAddr};

/// The result of a one-sector compare-and-write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareAndWrite {
    /// The sector held the expected bytes and now holds the new ones.
    Written,
    /// The sector did not hold the expected bytes; nothing was written.
    Mismatch,
}

/// A block device as the datastore sees it.
///
/// All offsets and lengths are in bytes. Implementations are safe to call
/// from many threads at once; a backend that can keep several requests in
/// flight (NBD) does so.
pub trait Lun: Send + Sync {
    /// How the LUN was named by the user (its URL): used in every message.
    fn name(&self) -> &str;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// The logical block size: the unit of atomic writes (512 or 4096).
    fn block_size(&self) -> u32;
    /// Read exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Write all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Make `len` bytes at `offset` read as zeros; `unmap` allows the backend
    /// to deallocate them (thin provisioning) instead of writing zeros.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()>;
    /// A stable identity: a UUID kept with a file, a device serial or WWN, or
    /// for network LUNs the server's name of the export.
    fn identity(&self) -> Result<String>;
    /// A hint that `len` bytes at `offset` will be read soon: a backend
    /// with a cache may start reading them now. Never fails and never
    /// changes what a read returns; the default does nothing.
    fn prefetch(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }
    /// Whether [`Lun::compare_and_write`] is atomic on this LUN.
    fn has_compare_and_write(&self) -> bool {
        false
    }
    /// Why this LUN has no compare-and-write although its device advertises
    /// one (a known non-atomic implementation), for `vmfs info`.
    fn compare_and_write_note(&self) -> Option<String> {
        None
    }
    /// Send one SCSI command as it is, for a physical-mode raw device
    /// mapping's pass-through: no retry, no interpretation. `data_out`
    /// non-empty: a write of those bytes; else `data_in` bytes are read.
    /// `None`: this LUN is no SCSI device (a file, NBD).
    fn passthrough(
        &self,
        cdb: &[u8],
        data_out: &[u8],
        data_in: usize,
    ) -> Option<Result<ScsiReply>> {
        let _ = (cdb, data_out, data_in);
        None
    }
    /// Atomically: if the `expect.len()` bytes at `offset` equal `expect`,
    /// replace them with `new`. `expect` and `new` must be one logical block.
    fn compare_and_write(&self, offset: u64, expect: &[u8], new: &[u8]) -> Result<CompareAndWrite> {
        let _ = (offset, expect, new);
        Err(LunError::Unsupported {
            lun: self.name().to_string(),
            what: "compare-and-write",
        })
    }
}

/// How a passed-through SCSI command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiReply {
    pub status: u8,
    pub sense_key: u8,
    /// Additional sense code (high byte) and qualifier (low byte).
    pub ascq: u16,
    pub data_in: Vec<u8>,
}

/// Check that `[offset, offset+len)` lies inside a LUN of `size` bytes.
pub(crate) fn check_range(lun: &str, size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(LunError::OutOfRange {
            lun: lun.to_string(),
            offset,
            len,
            size,
        }),
    }
}

/// Check the arguments of a compare-and-write against the LUN's block size.
pub(crate) fn check_caw(lun: &dyn Lun, offset: u64, expect: &[u8], new: &[u8]) -> Result<()> {
    let bs = lun.block_size() as usize;
    if expect.len() != bs || new.len() != bs || offset % bs as u64 != 0 {
        return Err(LunError::InvalidArgument {
            lun: lun.name().to_string(),
            what: format!(
                "compare-and-write must cover exactly one aligned {bs}-byte block \
                 (offset {offset}, {} and {} bytes)",
                expect.len(),
                new.len()
            ),
        });
    }
    check_range(lun.name(), lun.size(), offset, bs as u64)
}

/// How to open a LUN.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// The longest one I/O may take on network LUNs, which send a command
    /// again on a new connection when one drops (NBD, iSCSI): re-sends
    /// included; `None` for the backend's default (30 s). A
    /// mounted host sets it from its lease (see `vmfs::cluster::Timeouts`).
    pub io_timeout: Option<std::time::Duration>,
}

/// Open a LUN by path or URL: `/path`, `file:///path`,
/// `nbd://host[:port]/export`, `nbd+unix:///export?socket=/path`,
/// `iscsi://[user[%password]@]host[:port]/target-iqn/lun`.
pub fn open(spec: &str) -> Result<Arc<dyn Lun>> {
    open_with(spec, OpenOptions::default())
}

/// [`open`] with options.
/// Every LUN opened this way skips flushes that follow no write
/// ([`FlushTracked`]).
pub fn open_with(spec: &str, opts: OpenOptions) -> Result<Arc<dyn Lun>> {
    let lun: Arc<dyn Lun> = match LunUrl::parse(spec)? {
        LunUrl::File(path) => Arc::new(FileLun::open(&path, spec)?),
        LunUrl::Nbd { addr, export } => Arc::new(NbdLun::connect(
            addr,
            &export,
            spec,
            opts.io_timeout.unwrap_or(nbd::DEFAULT_IO_TIMEOUT),
        )?),
        LunUrl::Iscsi(url) => {
            let mut o = IscsiOptions::default();
            if let Some(t) = opts.io_timeout {
                o.io_timeout = t;
            }
            Arc::new(IscsiLun::connect(&url, &url.redacted(), o)?)
        }
    };
    Ok(Arc::new(FlushTracked::new(lun)))
}
