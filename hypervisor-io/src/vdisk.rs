//! A virtual disk as a logical unit: the chain of `snapshot/` through a
//! [`snapshot::Store`] (on the datastore, the vmfs file API: no FUSE in
//! the data path), held open for writing by this host while attached.
//!
//! Operations that change the chain under a running guest (snapshot,
//! consolidate) run through [`VirtualDisk::with_closed`]: new I/O waits,
//! the I/O in flight completes, the disk is flushed and closed, the
//! operation runs, the disk is opened again (its new top layer), and I/O
//! resumes. The guest sees a pause, never an error.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use snapshot::{Disk, DiskError, Store};

use crate::backend::{Backend, BackendError, BackendResult, Identity};

pub struct VirtualDisk {
    store: Arc<dyn Store>,
    name: String,
    /// Where it is, for messages (`[datastore] dir/NAME.vmdk`).
    path: String,
    /// `None` only inside [`VirtualDisk::with_closed`] when reopening failed.
    disk: RwLock<Option<Disk>>,
    id: Identity,
    shared: bool,
    thin: AtomicBool,
    capacity: AtomicU64,
    /// A chain operation (snapshot, consolidate, resize) is running: one
    /// at a time, and the controller is not removed under it.
    busy: AtomicBool,
    /// Set when the disk is being closed: a merge running on it stops.
    closing: AtomicBool,
}

/// A chain operation on a [`VirtualDisk`]; dropping it ends it.
pub struct ChainOp(Arc<VirtualDisk>);

impl Drop for ChainOp {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}

impl std::ops::Deref for ChainOp {
    type Target = VirtualDisk;
    fn deref(&self) -> &VirtualDisk {
        &self.0
    }
}

/// Parse a `ddb.uuid` ("60 00 c2 ... - ... ") into 16 bytes.
fn uuid_bytes(text: &str) -> Option<[u8; 16]> {
    let hex: String = text.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    if hex.len() != 32 {
        return None;
    }
    let mut b = [0u8; 16];
    for (i, x) in b.iter_mut().enumerate() {
        *x = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(b)
}

fn classify(e: DiskError, what: &str) -> BackendError {
    let fault = match &e {
        DiskError::Store {
            source: snapshot::error::StoreError::Vmfs(v),
            ..
        } => Some(v.fault()),
        _ => None,
    };
    match fault {
        Some(vmfs::Fault::NoSpace) => BackendError::NoSpace(e.to_string()),
        Some(vmfs::Fault::BadHandle) => BackendError::ReadOnly(e.to_string()),
        _ if what == "read" => BackendError::Read(e.to_string()),
        _ if what == "write" => BackendError::Write(e.to_string()),
        _ => BackendError::Failed(e.to_string()),
    }
}

impl VirtualDisk {
    /// Open disk `name` of `store` for writing as this host.
    pub fn open(store: Arc<dyn Store>, name: &str, path: &str) -> snapshot::Result<VirtualDisk> {
        let disk = match Disk::open(store.clone(), name, true) {
            Ok(d) => d,
            // A consolidation interrupted where the disk cannot be written
            // (its host died): this host owns the disk now and finishes it.
            Err(e @ DiskError::Chain(_)) => {
                if snapshot::ops::finish_consolidation(store.clone(), name)?.is_none() {
                    return Err(e);
                }
                Disk::open(store.clone(), name, true)?
            }
            Err(e) => return Err(e),
        };
        let uuid = disk.layers[0]
            .desc
            .ddb("ddb.uuid")
            .and_then(uuid_bytes)
            .unwrap_or_else(|| {
                // A disk made elsewhere without one: its CID chain is stable
                // enough to name it until it gets one.
                let mut b = [0u8; 16];
                let h = crc32fast::hash(name.as_bytes());
                b[..4].copy_from_slice(&h.to_be_bytes());
                let cid = disk.layers.last().map(|l| l.desc.cid).unwrap_or(0);
                b[4..8].copy_from_slice(&cid.to_be_bytes());
                b
            });
        let shared = snapshot::ops::is_shared(&*store, &disk)?;
        Ok(VirtualDisk {
            shared,
            thin: AtomicBool::new(disk.thin()),
            capacity: AtomicU64::new(disk.capacity()),
            store,
            name: name.to_string(),
            path: path.to_string(),
            disk: RwLock::new(Some(disk)),
            busy: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            id: Identity {
                uuid,
                product: "Virtual disk".into(),
            },
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Shared by several hosts (multi-writer extents): its reservations
    /// live on the datastore, and chain operations are refused.
    pub fn shared(&self) -> bool {
        self.shared
    }

    /// Snapshots below the current layer.
    pub fn depth(&self) -> usize {
        self.disk
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |d| d.depth())
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Start a chain operation; `None` while another runs.
    pub fn begin_op(self: &Arc<Self>) -> Option<ChainOp> {
        self.busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| ChainOp(self.clone()))
    }

    /// Whether a chain operation is running.
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    /// Set once the disk is being closed (for `cancel` of a merge).
    pub fn closing(&self) -> &AtomicBool {
        &self.closing
    }

    /// Run `f` on the open disk while the guest's I/O goes on (a merge of
    /// an older snapshot: [`snapshot::merge::merge_frozen`]).
    pub fn with_open<T>(
        &self,
        f: impl FnOnce(&Disk) -> snapshot::Result<T>,
    ) -> snapshot::Result<T> {
        let g = self.disk.read().unwrap_or_else(|p| p.into_inner());
        let d = g.as_ref().ok_or_else(|| {
            DiskError::Invalid(format!("{}: the disk could not be opened again", self.path))
        })?;
        f(d)
    }

    /// The bytes the current layer holds (what merging it into the layer
    /// below would copy).
    pub fn top_bytes(&self) -> snapshot::Result<u64> {
        self.with_open(|d| Ok(d.top_ranges()?.iter().map(|r| r.end - r.start).sum()))
    }

    fn with<T>(
        &self,
        what: &str,
        f: impl FnOnce(&Disk) -> snapshot::Result<T>,
    ) -> BackendResult<T> {
        let g = self.disk.read().unwrap_or_else(|p| p.into_inner());
        let d = g.as_ref().ok_or_else(|| {
            BackendError::Failed(format!("{}: the disk could not be opened again", self.path))
        })?;
        f(d).map_err(|e| classify(e, what))
    }

    /// Run `op` with the disk closed, I/O held (see the module doc).
    /// Returns what `op` returned and how long I/O was held.
    pub fn with_closed<T>(
        &self,
        op: impl FnOnce() -> snapshot::Result<T>,
    ) -> (snapshot::Result<T>, Duration) {
        let t = Instant::now();
        let h = match self.hold() {
            Ok(h) => h,
            Err(e) => return (Err(e), t.elapsed()),
        };
        let r = op();
        h.reopen();
        (r, t.elapsed())
    }

    /// Hold the guest's I/O and close the disk (new I/O waits, the I/O in
    /// flight completes, every layer is flushed, change tracking settled)
    /// until [`Held::reopen`]. Several disks are held together (a VM's
    /// disks snapshotted at one moment) by holding each in turn.
    pub fn hold(&self) -> snapshot::Result<Held<'_>> {
        let mut g = self.disk.write().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = g.take() {
            if let Err(e) = d.close() {
                // Not closed cleanly: open it again as it was, and refuse.
                *g = Disk::open(self.store.clone(), &self.name, true).ok();
                return Err(e);
            }
        }
        Ok(Held {
            vd: self,
            g,
            reopened: false,
        })
    }
}

/// A [`VirtualDisk`] closed with its I/O held ([`VirtualDisk::hold`]);
/// dropped without [`Held::reopen`] (an error on the way), it reopens too.
pub struct Held<'a> {
    vd: &'a VirtualDisk,
    g: std::sync::RwLockWriteGuard<'a, Option<Disk>>,
    reopened: bool,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.reopen_now();
    }
}

impl Held<'_> {
    /// Open the disk again (its chain as the operation left it) and let
    /// I/O resume. A failure to open is logged: I/O then fails until the
    /// controller is removed.
    pub fn reopen(mut self) {
        self.reopen_now();
    }

    fn reopen_now(&mut self) {
        if std::mem::replace(&mut self.reopened, true) {
            return;
        }
        let vd = self.vd;
        if vd.closing.load(Ordering::Acquire) {
            return;
        }
        match Disk::open(vd.store.clone(), &vd.name, true) {
            Ok(d) => {
                vd.thin.store(d.thin(), Ordering::Relaxed);
                vd.capacity.store(d.capacity(), Ordering::Relaxed);
                *self.g = Some(d);
            }
            Err(e) => {
                tracing::error!(
                    "{}: opening the disk again after an operation: {e}",
                    vd.path
                );
            }
        }
    }
}

impl Backend for VirtualDisk {
    fn describe(&self) -> String {
        self.path.clone()
    }
    fn identity(&self) -> Identity {
        self.id.clone()
    }
    fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }
    fn thin(&self) -> bool {
        self.thin.load(Ordering::Relaxed)
    }
    fn discard_granularity(&self) -> u64 {
        // A sparse grain (64 KiB); a flat thin extent frees whole 4 KiB
        // blocks but the grain is what deltas free.
        64 << 10
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> BackendResult<()> {
        self.with("read", |d| d.read_at(buf, off))
    }
    fn write_at(&self, buf: &[u8], off: u64) -> BackendResult<()> {
        self.with("write", |d| d.write_at(buf, off))
    }
    fn flush(&self) -> BackendResult<()> {
        self.with("flush", |d| d.flush())
    }
    fn discard(&self, off: u64, len: u64) -> BackendResult<()> {
        self.with("write", |d| d.discard(off, len))
    }
    fn mapped(&self, off: u64, len: u64) -> BackendResult<Vec<std::ops::Range<u64>>> {
        let end = off + len;
        let all = self.with("read", |d| d.allocated_ranges())?;
        Ok(all
            .into_iter()
            .filter(|r| r.end > off && r.start < end)
            .map(|r| r.start.max(off)..r.end.min(end))
            .collect())
    }
}

impl VirtualDisk {
    /// Close the disk now (the controller stopped): later I/O fails. Not
    /// left to the last reference, which a thread of the vhost-user library
    /// may drop after the datastore is unmounted.
    pub fn close(&self) -> snapshot::Result<()> {
        self.closing.store(true, Ordering::Release);
        let d = self.disk.write().unwrap_or_else(|p| p.into_inner()).take();
        match d {
            Some(d) => d.close(),
            None => Ok(()),
        }
    }
}

impl Drop for VirtualDisk {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!("{}: closing: {e}", self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddb_uuids_parse() {
        let b = uuid_bytes("60 00 c2 9d 01 02 03 04-05 06 07 08 09 0a 0b 0c").unwrap();
        assert_eq!(b[0], 0x60);
        assert_eq!(b[15], 0x0c);
        assert!(uuid_bytes("nope").is_none());
    }
}
