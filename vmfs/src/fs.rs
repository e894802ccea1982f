//! The filesystem: [`Fs`] (one per datastore this process has open) and
//! its in-memory [`State`] (metadata cache, allocator, opens, the running
//! transaction). The work lives in the submodules, one concern each:
//!
//! | file | job |
//! |---|---|
//! | `inode.rs` | file descriptors: read, write back, allocate, free |
//! | `bmap.rs` | the block map: pointer trees, holes, data/hole walks |
//! | `layout.rs` | file data under the state lock: layouts, write, truncate, punch, preallocate |
//! | `dir.rs` | directories as linear-hash files |
//! | `namei.rs` | the namespace: lookup, create, link, unlink, rename, setattr |
//! | `flock.rs` | file opens and their on-disk locks (EBUSY) |
//! | `fileio.rs` | file I/O by descriptor: the in-place path and the transactional one |
//! | `vlock.rs` | how operations run: the volume lock, its hand-over, lock-free reads |
//! | `mount.rs` | lifecycle: mkfs, open, mount, unmount, housekeeping, extend, usage |
//! | `rdmio.rs` | raw device mappings open on this host |
//!
//! Every metadata change runs as one transaction under the state lock (and,
//! in cluster mode, the volume lock); file data of already-mapped blocks
//! moves without either.

mod bmap;
mod dir;
mod fileio;
mod flock;
mod inode;
mod layout;
mod mount;
mod namei;
mod rdmio;
mod vlock;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::alloc::Alloc;
use crate::cluster::Joined;
use crate::error::{Fault, FsError, Result, Retry, RetryKind};
use crate::format::*;
use crate::journals::{journal_region, replay_journals};
use crate::txn::Meta;
use crate::volume::{MkfsOptions, Volume};

/// Regular files smaller than this many sub-blocks live in sub-blocks.
const SB_FILE_LEAVES: u64 = 16;
/// Average entries per directory bucket before a bucket is split.
const DIR_SPLIT_LOAD: u64 = 24;

pub struct State {
    pub meta: Meta,
    pub alloc: Alloc,
    /// Open handles per file descriptor; an unlinked file lives until its last close.
    open: HashMap<u64, u32>,
    orphans: HashSet<u64>,
    next_gen: u64,
    /// Cluster mode: the volume lock's generation while this host holds it.
    vl_held: Option<u64>,
    /// When this host got the volume lock (for [`LOCK_QUANTUM`]).
    vl_since: std::time::Instant,
    /// How long the last checkpoint before giving the volume lock back took.
    vl_checkpoint: std::time::Duration,
    /// The volume lock generation the metadata cache is valid for.
    cache_gen: Option<u64>,
    /// The allocation summaries must be re-read under the volume lock.
    alloc_stale: bool,
    /// File locks this host holds on disk: descriptor -> its opens.
    flocks: HashMap<u64, FileLock>,
    /// Cluster mode: this host as a lock holder.
    me: Option<locking::Holder>,
}

/// This host's opens of one file, and the on-disk lock mode they need.
#[derive(Debug, Clone, Copy)]
struct FileLock {
    mode: locking::Mode,
    writers: u32,
    readers: u32,
}

/// What a host sharing the datastore keeps beside the filesystem.
///
/// Every metadata change is made under the **volume lock** (its sector is
/// the lock sector of resource-table block 0): a host takes it, checks that
/// nobody else held it since it last did (else it forgets its cached
/// metadata and allocation summaries), changes, and — when another host is
/// mounted — commits and checkpoints its journal before giving it back, so
/// no journal ever holds an image older than what another host wrote since
/// (ocfs2 checkpoints at lock downconvert for the same reason). Alone, a
/// host keeps the lock between operations (group commit as before) until
/// its monitor sees another host arrive.
///
/// Reads take no lock: they check the lock's generation before and, when
/// they read anything from disk, after (a seqlock on the disk).
pub struct Shared {
    pub vlock: locking::VolumeLock,
    /// Another host is in a slot: give the volume lock back after each operation.
    pub contended: std::sync::atomic::AtomicBool,
    /// A thread calls [`Fs::yield_if_wanted`] often (the FUSE mount's
    /// housekeeping thread): only then may an idle host keep the volume lock
    /// while other hosts are mounted.
    pub watched: std::sync::atomic::AtomicBool,
    monitor: Mutex<crate::cluster::Monitor>,
}

/// A mounted (or opened for checking) filesystem.
pub struct Fs {
    /// The volume: replaced whole when an extent is added (here or, seen
    /// through the volume header, by another host).
    vol: RwLock<Arc<Volume>>,
    st: Mutex<State>,
    /// Per file: the data lock and the leaf cache ([`crate::leafmap`]).
    data_locks: Mutex<HashMap<u64, Arc<crate::leafmap::FileData>>>,
    /// This host's slot (u32::MAX: none, no journal).
    slot: std::sync::atomic::AtomicU32,
    /// Unmounted or abandoned: Drop writes nothing.
    closed: std::sync::atomic::AtomicBool,
    replays: Mutex<Vec<(u32, journal::Report)>>,
    /// This host's heartbeat membership (mounted with [`Fs::mount`]).
    member: std::sync::OnceLock<crate::cluster::Member>,
    /// Cluster mode (mounted with [`Fs::mount`]).
    shared: std::sync::OnceLock<Shared>,
    /// The configuration generation whose new extent this host could not
    /// open (said once in the log, not at every look).
    unopened_gen: std::sync::atomic::AtomicU64,
    /// Raw device mappings open on this host: their LUNs, by file.
    mapped: Mutex<HashMap<u64, Mapped>>,
    /// How many entries `mapped` has: reads and writes of ordinary files
    /// skip its mutex while no mapping is open.
    mapped_count: std::sync::atomic::AtomicUsize,
    /// The LUN URLs this host may open for raw device mappings (its LUN list).
    rdm_luns: RwLock<Vec<String>>,
    /// The housekeeping thread waits for the volume lock to give file-block
    /// clusters away (counted in the member's wants).
    yield_wants: std::sync::atomic::AtomicBool,
    /// Told of namespace and size changes made through the file API (the
    /// FUSE mount drops the kernel's cached entries and attributes).
    observer: std::sync::OnceLock<Box<dyn Fn(Change) + Send + Sync>>,
    /// Requests to and from other hosts ([`crate::mailbox`]).
    pub(crate) mailbox: crate::mailbox::Mailbox,
}

/// A change made without FUSE that a FUSE mount's kernel caches must learn.
#[derive(Debug, Clone)]
pub enum Change {
    /// The name `name` in directory `dir` now means something else (or nothing).
    Entry { dir: u64, name: Vec<u8> },
    /// File `ino`'s attributes or data changed.
    Inode { ino: u64 },
}

/// Forgets a file's cached leaves when dropped (after the change that
/// made them stale, or its failure).
struct Forget<'a>(&'a crate::leafmap::FileData);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.invalidate();
    }
}

/// Waiting for the volume lock: says once, after a lease, who holds it, and
/// then how long the wait took.
struct LockWait {
    start: std::time::Instant,
    said: bool,
}

impl LockWait {
    fn new() -> LockWait {
        LockWait {
            start: std::time::Instant::now(),
            said: false,
        }
    }
    fn still_waiting(
        &mut self,
        fs: &Fs,
        lease: std::time::Duration,
        holder: Option<&locking::Holder>,
    ) {
        if !self.said && self.start.elapsed() > lease {
            self.said = true;
            let who = holder.map(|h| fs.describe_holder(h)).unwrap_or_default();
            tracing::warn!(
                "waiting for the volume lock: held by {who} for more than {} ms",
                lease.as_millis()
            );
        }
    }
    fn got(&self) {
        if self.said {
            tracing::info!(
                "got the volume lock after {} ms",
                self.start.elapsed().as_millis()
            );
        }
    }
}

/// One thread's wait for the volume lock, said in this host's heartbeat
/// sector (the wants bit) from [`Wanting::start`] until dropped.
struct Wanting<'a>(Option<&'a crate::cluster::Member>);

impl<'a> Wanting<'a> {
    fn none() -> Wanting<'a> {
        Wanting(None)
    }
    fn start(&mut self, m: &'a crate::cluster::Member) -> Result<()> {
        if self.0.is_none() {
            m.want_volume_lock()?;
            self.0 = Some(m);
        }
        Ok(())
    }
}

impl Drop for Wanting<'_> {
    fn drop(&mut self) {
        if let Some(m) = self.0.take() {
            if let Err(e) = m.unwant_volume_lock() {
                tracing::debug!("clearing the wants bit: {e}");
            }
        }
    }
}

/// How long a host keeps the volume lock at least, once it has it, when
/// another host waits (see [`Fs::vl_leave`]). Each hand-over costs a
/// checkpoint and the next holder's reload of its allocation summaries:
/// with four and eight busy hosts, 30 ms made as many files as the unfair
/// 10 ms hand-over did, 10 ms a third fewer (tools/tests/multihost.rs).
const LOCK_QUANTUM: std::time::Duration = std::time::Duration::from_millis(30);

/// A raw device mapping open on this host.
struct Mapped {
    lun: Arc<dyn lun::Lun>,
    /// The mapping file's inode at open (its size is the LUN's).
    inode: Inode,
    opens: u32,
}

impl Drop for Fs {
    /// A filesystem dropped without unmount still commits what it holds.
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            tracing::error!("unmount of the datastore while closing it failed: {e}");
        }
    }
}

/// The time stamped on files: the coarse realtime clock, as the kernel uses
/// for its own file times (one tick, a few ms). Writes within one tick then
/// leave the times unchanged and need no metadata commit.
pub fn now() -> (i64, u32) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } == 0 {
        return (ts.tv_sec, ts.tv_nsec as u32);
    }
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos())
}

fn fault(f: Fault) -> FsError {
    FsError::fault_of(f)
}

pub fn kind_of(mode: u32) -> u8 {
    ((mode & S_IFMT) >> 12) as u8
}

/// One piece of a read or write: `len` bytes at `buf_off` of the caller's
/// buffer go to/come from logical byte `at` (None: a hole).
#[derive(Debug)]
pub struct Seg {
    pub buf_off: usize,
    pub len: usize,
    pub at: Option<u64>,
}

/// Fetch planned segments into `buf`; holes read as zeros.
pub fn fetch(vol: &Volume, segs: &[Seg], buf: &mut [u8]) -> Result<()> {
    for s in segs {
        let piece = &mut buf[s.buf_off..s.buf_off + s.len];
        match s.at {
            Some(at) => vol.read(at, piece)?,
            None => piece.fill(0),
        }
    }
    Ok(())
}

/// Statistics for statfs and `vmfs info`.
#[derive(Debug, Clone)]
pub struct Usage {
    pub block_size: u64,
    pub total_blocks: u64,
    pub free_blocks: u64,
    pub fd_clusters: u64,
    pub fds_used: u64,
    pub fds_free: u64,
}

/// The holder of a descriptor block's lock (its first sector) when that is
/// a host other than `me` holding it exclusively.
fn exclusive_elsewhere(block: &[u8], me: locking::Holder) -> Option<locking::Holder> {
    let rec = locking::LockRec::decode(&block[..LOCK_SECTOR]).ok()?;
    (rec.mode == locking::Mode::Exclusive)
        .then(|| rec.holders.first().copied())
        .flatten()
        .filter(|h| *h != me)
}

/// Attributes a caller may set.
#[derive(Debug, Default, Clone)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<(i64, u32)>,
    pub mtime: Option<(i64, u32)>,
    pub ctime: Option<(i64, u32)>,
}

impl Fs {
    pub fn shared(&self) -> Option<&Shared> {
        self.shared.get()
    }

    /// The heartbeat membership, when mounted with [`Fs::mount`].
    pub fn member(&self) -> Option<&crate::cluster::Member> {
        self.member.get()
    }

    /// The volume as it is now (an extent may be added while mounted).
    pub fn vol(&self) -> Arc<Volume> {
        self.vol.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_vol(&self, v: Volume) {
        *self.vol.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(v);
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Be told of changes made through the file API (once; the FUSE mount).
    pub fn set_observer(&self, f: Box<dyn Fn(Change) + Send + Sync>) {
        let _ = self.observer.set(f);
    }

    /// Tell the observer, if any. Call with no lock held: a FUSE kernel
    /// invalidation may wait for a request that waits for our locks.
    pub(crate) fn changed(&self, c: Change) {
        if let Some(f) = self.observer.get() {
            f(c);
        }
    }

    pub fn root(&self) -> u64 {
        self.vol().header.root_fd
    }

    pub(crate) fn file_data(&self, ino: u64) -> Arc<crate::leafmap::FileData> {
        self.data_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(ino)
            .or_default()
            .clone()
    }
}
