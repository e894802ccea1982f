//! The filesystem: files as pointer trees, directories as linear-hash files,
//! and the namespace operations. Every operation runs as one transaction
//! under the state lock; file data of already-mapped blocks moves without it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::alloc::Alloc;
use crate::cluster::Joined;
use crate::error::{FsError, Result};
use crate::format::*;
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

/// The journal region of a slot, checked to lie inside one extent's file blocks.
pub fn journal_region(vol: &Volume, addr: u64, nblocks: u32, slot: u32) -> Result<journal::Region> {
    let (i, off) = vol.locate(addr * MD as u64)?;
    let (j, _) = vol.locate((addr + u64::from(nblocks)) * MD as u64 - 1)?;
    if i != j {
        return Err(FsError::Corrupt {
            lun: vol.luns[0].name().to_string(),
            offset: vol.header.heartbeat_off + u64::from(slot) * LOCK_SECTOR as u64,
            object: format!("heartbeat slot {slot}"),
            reason: format!(
                "its journal at {addr:#x} (+{nblocks} blocks) crosses extents {i} and {j}"
            ),
        });
    }
    Ok(journal::Region {
        lun: vol.luns[i].clone(),
        lun_offset: off,
        addr,
        nblocks,
        slot,
    })
}

/// Replay every slot's journal that holds committed transactions. (One host
/// in this version; the cluster layer will replay only dead hosts' journals.)
pub fn replay_journals(vol: &Volume) -> Result<Vec<(u32, journal::Report)>> {
    let mut out = Vec::new();
    for (slot, (hs, _)) in (0..).zip(vol.read_slots()?) {
        let hs = hs?;
        if hs.journal == 0 {
            continue;
        }
        let r = journal_region(vol, hs.journal, hs.journal_blocks, slot)?;
        let rep = journal::replay(&r, &vol.header.uuid, vol)?;
        if rep.transactions > 0 || rep.stopped.is_some() {
            out.push((slot, rep));
        }
    }
    Ok(out)
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

fn posix(e: i32) -> FsError {
    FsError::posix(e)
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

impl State {
    // ------------------------------------------------------------ inodes

    pub fn iget(&mut self, vol: &Volume, addr: u64) -> Result<Inode> {
        if addr == 0 || addr & !PTR_ADDR_MASK != 0 {
            return Err(posix(libc::ENOENT));
        }
        let mut b = self.meta.get(vol, addr, MAGIC_FD)?;
        let fresh;
        if self
            .me
            .is_some_and(|me| exclusive_elsewhere(b, me).is_some())
        {
            // Another host holds this file alone and changes its descriptor
            // without the volume lock: what is cached may be old.
            fresh = self.meta.read_fresh(vol, addr, MAGIC_FD)?;
            b = &fresh;
        }
        let body = &b[LOCK_SECTOR..];
        if get32(body, 32) == 0 {
            return Err(posix(libc::ENOENT)); // a freed descriptor
        }
        Inode::decode(body, addr).map_err(|reason| {
            let (lun, off) = vol.where_is(addr * MD as u64);
            corrupt(
                &lun,
                off + LOCK_SECTOR as u64,
                format!("file descriptor {addr:#x}"),
                reason,
            )
        })
    }

    pub fn iput(&mut self, vol: &Volume, ino: &Inode) -> Result<()> {
        if ino.layout == Layout::Inline && ino.size > INLINE_MAX as u64 {
            // Never write a descriptor the decoder would reject.
            return Err(FsError::Invalid(format!(
                "internal error: inline file {:#x} of {} bytes",
                ino.addr, ino.size
            )));
        }
        if let Some(me) = self.me {
            let b = self.meta.get(vol, ino.addr, MAGIC_FD)?;
            if let Some(h) = exclusive_elsewhere(b, me) {
                let table = crate::cluster::slot_table(vol)?;
                if crate::cluster::is_current(&table, &h) {
                    return Err(FsError::Busy(format!(
                        "file descriptor {:#x} is open for writing by the host in slot {} (generation {}): its metadata cannot change elsewhere until that host closes it",
                        ino.addr, h.slot, h.generation
                    )));
                }
            }
        }
        let b = self.meta.get_mut(vol, ino.addr, MAGIC_FD)?;
        ino.encode(&mut b[LOCK_SECTOR..]);
        Ok(())
    }

    /// Write back a renamed file's descriptor (its new ctime), except when
    /// another host holds the file open alone: its descriptor is that
    /// host's to change, and rename need not touch it (POSIX leaves the
    /// ctime update to the implementation), so the rename goes ahead.
    fn iput_renamed(&mut self, vol: &Volume, ino: &Inode) -> Result<()> {
        if let Some(me) = self.me {
            let b = self.meta.get(vol, ino.addr, MAGIC_FD)?;
            if exclusive_elsewhere(b, me).is_some() {
                return Ok(());
            }
        }
        self.iput(vol, ino)
    }

    fn ialloc(&mut self, vol: &Volume, mode: u32, uid: u32, gid: u32) -> Result<Inode> {
        let addr = self.alloc.alloc_res(vol, &mut self.meta, ResType::Fd)?;
        self.next_gen += 1;
        let mut ino = Inode::new(addr, mode, uid, gid, now(), self.next_gen);
        if mode & S_IFMT == S_IFDIR {
            ino.layout = Layout::Tree {
                sub: true,
                depth: 0,
            };
        }
        self.meta.create(addr, MAGIC_FD, 0);
        self.iput(vol, &ino)?;
        Ok(ino)
    }

    /// Free a descriptor and everything it owns.
    fn ifree(&mut self, vol: &Volume, ino: &mut Inode) -> Result<()> {
        self.free_range(vol, ino, 0, u64::MAX)?;
        let b = self.meta.get_mut(vol, ino.addr, MAGIC_FD)?;
        let gen = ino.generation;
        init_body(&mut b[LOCK_SECTOR..], MAGIC_FD, ino.addr, 0);
        put64(&mut b[LOCK_SECTOR..], 56, gen);
        self.alloc
            .free_res(vol, &mut self.meta, ResType::Fd, ino.addr)
    }

    // ------------------------------------------------------------ pointer trees

    pub fn leaf_size(vol: &Volume, ino: &Inode) -> u64 {
        match ino.layout {
            Layout::Tree { sub: true, .. } => u64::from(vol.header.sub_block_size),
            _ => vol.block_size(),
        }
    }

    fn span(level: u8) -> u64 {
        (PB_PTRS as u64).pow(u32::from(level))
    }

    fn pb_ptr(&mut self, vol: &Volume, pb: u64, i: usize) -> Result<u64> {
        Ok(get64(self.meta.get(vol, pb, MAGIC_PTR)?, 64 + i * 8))
    }

    fn check_ptr(vol: &Volume, ino: &Inode, p: u64) -> Result<u64> {
        let a = p & PTR_ADDR_MASK;
        if a * MD as u64 >= vol.header.total_blocks() * vol.block_size() {
            let (lun, off) = vol.where_is(ino.addr * MD as u64);
            return Err(corrupt(
                &lun,
                off,
                format!("file descriptor {:#x}", ino.addr),
                format!("pointer {a:#x} is beyond the volume"),
            ));
        }
        Ok(p)
    }

    /// The pointer of leaf `li` (0: a hole).
    pub fn get_ptr(&mut self, vol: &Volume, ino: &Inode, li: u64) -> Result<u64> {
        let Layout::Tree { depth, .. } = ino.layout else {
            return Ok(0);
        };
        let span = Self::span(depth);
        let root = li / span;
        if root >= FD_PTRS as u64 {
            return Ok(0);
        }
        let mut p = ino.ptr(root as usize);
        let mut rem = li % span;
        let mut lvl = depth;
        while lvl > 0 {
            if p == 0 {
                return Ok(0);
            }
            let pb = Self::check_ptr(vol, ino, p)? & PTR_ADDR_MASK;
            lvl -= 1;
            let s = Self::span(lvl);
            p = self.pb_ptr(vol, pb, (rem / s) as usize)?;
            rem %= s;
        }
        Self::check_ptr(vol, ino, p)
    }

    /// The first byte at or after `off` that holds data (a written leaf,
    /// or inline bytes); None when no leaf past it does. Empty pointer
    /// blocks are skipped whole.
    pub fn next_data(&mut self, vol: &Volume, ino: &Inode, off: u64) -> Result<Option<u64>> {
        if ino.layout == Layout::Inline {
            return Ok((off < ino.size).then_some(off));
        }
        let leaf = Self::leaf_size(vol, ino);
        Ok(self.scan(vol, ino, off / leaf, true)?.map(|li| (li * leaf).max(off)))
    }

    /// The first byte at or after `off` in a hole (unwritten leaves read as
    /// zeros and count as holes); past the last leaf everything is one.
    pub fn next_hole(&mut self, vol: &Volume, ino: &Inode, off: u64) -> Result<u64> {
        if ino.layout == Layout::Inline {
            return Ok(off.max(ino.size));
        }
        let leaf = Self::leaf_size(vol, ino);
        Ok(match self.scan(vol, ino, off / leaf, false)? {
            Some(li) => (li * leaf).max(off),
            None => (FD_PTRS as u64 * Self::tree_span(ino)).saturating_mul(leaf).max(off),
        })
    }

    fn tree_span(ino: &Inode) -> u64 {
        match ino.layout {
            Layout::Tree { depth, .. } => Self::span(depth),
            Layout::Inline => 1,
        }
    }

    /// The first leaf at or after `from` that is data (`data`) or a hole.
    fn scan(&mut self, vol: &Volume, ino: &Inode, from: u64, data: bool) -> Result<Option<u64>> {
        let Layout::Tree { depth, .. } = ino.layout else {
            return Ok(None);
        };
        let span = Self::span(depth);
        for root in from / span..FD_PTRS as u64 {
            let found = self.scan_node(vol, ino, ino.ptr(root as usize), depth, root * span, from, data)?;
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }

    /// [`State::scan`] below pointer `p` of `level`, which covers the leaves
    /// from `base` on.
    #[allow(clippy::too_many_arguments)]
    fn scan_node(
        &mut self,
        vol: &Volume,
        ino: &Inode,
        p: u64,
        level: u8,
        base: u64,
        from: u64,
        data: bool,
    ) -> Result<Option<u64>> {
        if level == 0 {
            let is_data = p != 0 && p & PTR_UNWRITTEN == 0;
            return Ok((is_data == data).then_some(base));
        }
        if p == 0 {
            return Ok((!data).then_some(base.max(from)));
        }
        let pb = Self::check_ptr(vol, ino, p)? & PTR_ADDR_MASK;
        let s = Self::span(level - 1);
        let first = from.saturating_sub(base) / s;
        for k in first..PB_PTRS as u64 {
            let child = self.pb_ptr(vol, pb, k as usize)?;
            let r = self.scan_node(vol, ino, child, level - 1, base + k * s, from, data)?;
            if r.is_some() {
                return Ok(r);
            }
        }
        Ok(None)
    }

    fn alloc_leaf(&mut self, vol: &Volume, sub: bool) -> Result<u64> {
        if sub {
            self.alloc.alloc_res(vol, &mut self.meta, ResType::SubBlock)
        } else {
            Ok(self.alloc.alloc_fb(vol, &mut self.meta)? * vol.blocks_per_4k())
        }
    }

    fn free_leaf(&mut self, vol: &Volume, sub: bool, addr: u64) -> Result<()> {
        if sub {
            self.alloc
                .free_res(vol, &mut self.meta, ResType::SubBlock, addr)
        } else {
            self.alloc
                .free_fb(vol, &mut self.meta, addr / vol.blocks_per_4k())
        }
    }

    fn new_pb(&mut self, vol: &Volume, ino: &mut Inode) -> Result<u64> {
        let a = self
            .alloc
            .alloc_res(vol, &mut self.meta, ResType::PtrBlock)?;
        self.meta.create(a, MAGIC_PTR, ino.addr);
        ino.alloc_bytes += MD as u64;
        Ok(a)
    }

    /// Map leaf `li`, allocating what is missing. Returns the leaf's 4K
    /// address and whether it is fresh (its unwritten parts must be zeroed
    /// before anything points at it durably).
    pub fn map_alloc(&mut self, vol: &Volume, ino: &mut Inode, li: u64) -> Result<(u64, bool)> {
        let Layout::Tree { sub, mut depth } = ino.layout else {
            return Err(FsError::Invalid("map_alloc on an inline file".into()));
        };
        while li >= FD_PTRS as u64 * Self::span(depth) {
            if depth >= 4 {
                return Err(posix(libc::EFBIG));
            }
            let pb = self.new_pb(vol, ino)?;
            let b = self.meta.get_mut(vol, pb, MAGIC_PTR)?;
            for i in 0..FD_PTRS {
                put64(b, 64 + i * 8, ino.ptr(i));
            }
            ino.area[..FD_PTRS * 8].fill(0);
            ino.set_ptr(0, pb);
            depth += 1;
            ino.layout = Layout::Tree { sub, depth };
        }
        let span = Self::span(depth);
        let root = (li / span) as usize;
        let mut rem = li % span;
        // `node` = None: the descriptor's own pointers; Some(pb): a pointer block.
        let mut node: Option<u64> = None;
        let mut idx = root;
        let mut lvl = depth;
        loop {
            let p = match node {
                None => ino.ptr(idx),
                Some(pb) => self.pb_ptr(vol, pb, idx)?,
            };
            let p = if p != 0 {
                Self::check_ptr(vol, ino, p)?
            } else {
                0
            };
            if lvl == 0 {
                let leaf_sz = Self::leaf_size(vol, ino);
                let (addr, fresh, newp) = if p == 0 {
                    let a = self.alloc_leaf(vol, sub)?;
                    ino.alloc_bytes += leaf_sz;
                    (a, true, Some(a))
                } else if p & PTR_UNWRITTEN != 0 {
                    (p & PTR_ADDR_MASK, true, Some(p & PTR_ADDR_MASK))
                } else {
                    (p, false, None)
                };
                if let Some(np) = newp {
                    self.set_ptr(vol, ino, node, idx, np)?;
                }
                return Ok((addr, fresh));
            }
            let child = if p == 0 {
                let pb = self.new_pb(vol, ino)?;
                self.set_ptr(vol, ino, node, idx, pb)?;
                pb
            } else {
                p & PTR_ADDR_MASK
            };
            lvl -= 1;
            let s = Self::span(lvl);
            idx = (rem / s) as usize;
            rem %= s;
            node = Some(child);
        }
    }

    fn set_ptr(
        &mut self,
        vol: &Volume,
        ino: &mut Inode,
        node: Option<u64>,
        idx: usize,
        v: u64,
    ) -> Result<()> {
        match node {
            None => ino.set_ptr(idx, v),
            Some(pb) => put64(self.meta.get_mut(vol, pb, MAGIC_PTR)?, 64 + idx * 8, v),
        }
        Ok(())
    }

    /// Mark leaf `li` allocated-but-unwritten (fallocate), if it is a hole.
    fn prealloc_leaf(&mut self, vol: &Volume, ino: &mut Inode, li: u64) -> Result<()> {
        if self.get_ptr(vol, ino, li)? != 0 {
            return Ok(());
        }
        let (addr, _) = self.map_alloc(vol, ino, li)?;
        // map_alloc stored a plain pointer; mark it unwritten in place.
        self.rewrite_ptr(vol, ino, li, addr | PTR_UNWRITTEN)
    }

    fn rewrite_ptr(&mut self, vol: &Volume, ino: &mut Inode, li: u64, v: u64) -> Result<()> {
        let Layout::Tree { depth, .. } = ino.layout else {
            return Ok(());
        };
        let span = Self::span(depth);
        let mut node = None;
        let mut idx = (li / span) as usize;
        let mut rem = li % span;
        let mut lvl = depth;
        while lvl > 0 {
            let p = match node {
                None => ino.ptr(idx),
                Some(pb) => self.pb_ptr(vol, pb, idx)?,
            };
            lvl -= 1;
            let s = Self::span(lvl);
            node = Some(p & PTR_ADDR_MASK);
            idx = (rem / s) as usize;
            rem %= s;
        }
        self.set_ptr(vol, ino, node, idx, v)
    }

    /// Free leaves `[from, to)`; pointer blocks left empty are freed too.
    pub fn free_range(&mut self, vol: &Volume, ino: &mut Inode, from: u64, to: u64) -> Result<()> {
        let Layout::Tree { sub, depth } = ino.layout else {
            return Ok(());
        };
        let span = Self::span(depth);
        let leaf_sz = Self::leaf_size(vol, ino);
        for r in 0..FD_PTRS {
            let base = r as u64 * span;
            if base >= to || base + span <= from {
                continue;
            }
            let p = ino.ptr(r);
            if p == 0 {
                continue;
            }
            let p = Self::check_ptr(vol, ino, p)?;
            if depth == 0 {
                self.free_leaf(vol, sub, p & PTR_ADDR_MASK)?;
                ino.alloc_bytes = ino.alloc_bytes.saturating_sub(leaf_sz);
                ino.set_ptr(r, 0);
            } else if self.free_in_pb(
                vol,
                ino,
                p & PTR_ADDR_MASK,
                depth,
                base,
                from,
                to,
                sub,
                leaf_sz,
            )? {
                ino.set_ptr(r, 0);
            }
        }
        if from == 0 && to == u64::MAX {
            ino.layout = if ino.is_dir() {
                Layout::Tree {
                    sub: true,
                    depth: 0,
                }
            } else {
                Layout::Inline
            };
            ino.area.fill(0);
        }
        Ok(())
    }

    /// Returns true when the pointer block was freed (it became empty).
    #[allow(clippy::too_many_arguments)]
    fn free_in_pb(
        &mut self,
        vol: &Volume,
        ino: &mut Inode,
        pb: u64,
        lvl: u8,
        base: u64,
        from: u64,
        to: u64,
        sub: bool,
        leaf_sz: u64,
    ) -> Result<bool> {
        let s = Self::span(lvl - 1);
        let mut any_left = false;
        for i in 0..PB_PTRS {
            let p = self.pb_ptr(vol, pb, i)?;
            if p == 0 {
                continue;
            }
            let cb = base + i as u64 * s;
            if cb >= to || cb + s <= from {
                any_left = true;
                continue;
            }
            let p = Self::check_ptr(vol, ino, p)?;
            let cleared = if lvl == 1 {
                self.free_leaf(vol, sub, p & PTR_ADDR_MASK)?;
                ino.alloc_bytes = ino.alloc_bytes.saturating_sub(leaf_sz);
                true
            } else {
                self.free_in_pb(
                    vol,
                    ino,
                    p & PTR_ADDR_MASK,
                    lvl - 1,
                    cb,
                    from,
                    to,
                    sub,
                    leaf_sz,
                )?
            };
            if cleared {
                put64(self.meta.get_mut(vol, pb, MAGIC_PTR)?, 64 + i * 8, 0);
            } else {
                any_left = true;
            }
        }
        if !any_left {
            self.meta.forget(pb);
            self.alloc
                .free_res(vol, &mut self.meta, ResType::PtrBlock, pb)?;
            ino.alloc_bytes = ino.alloc_bytes.saturating_sub(MD as u64);
            return Ok(true);
        }
        Ok(false)
    }

    // ------------------------------------------------------------ file data

    /// Plan a read of `[off, off+len)` (already clamped to the size).
    pub fn plan(&mut self, vol: &Volume, ino: &Inode, off: u64, len: usize) -> Result<Vec<Seg>> {
        let leaf_sz = Self::leaf_size(vol, ino);
        let mut segs = Vec::new();
        let mut done = 0usize;
        while done < len {
            let pos = off + done as u64;
            let li = pos / leaf_sz;
            let in_leaf = pos % leaf_sz;
            let n = ((leaf_sz - in_leaf) as usize).min(len - done);
            let p = self.get_ptr(vol, ino, li)?;
            let at = (p != 0 && p & PTR_UNWRITTEN == 0).then(|| p * MD as u64 + in_leaf);
            segs.push(Seg {
                buf_off: done,
                len: n,
                at,
            });
            done += n;
        }
        Ok(segs)
    }

    /// Read with the state lock held (metadata-sized reads: directories, small files).
    /// Start a read into `buf` at `off`: clamps to the size, copies inline
    /// data at once, and returns the bytes the read yields and the segments
    /// still to fetch with [`fetch`] (which needs no lock).
    pub fn read_prepare(
        &mut self,
        vol: &Volume,
        ino: &Inode,
        off: u64,
        buf: &mut [u8],
    ) -> Result<(usize, Vec<Seg>)> {
        let n = ino.size.saturating_sub(off).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok((0, Vec::new()));
        }
        if ino.layout == Layout::Inline {
            buf[..n].copy_from_slice(&ino.area[off as usize..off as usize + n]);
            return Ok((n, Vec::new()));
        }
        Ok((n, self.plan(vol, ino, off, n)?))
    }

    /// Read with the state lock held (metadata-sized reads: directories, small files).
    pub fn read_locked(
        &mut self,
        vol: &Volume,
        ino: &Inode,
        off: u64,
        len: usize,
    ) -> Result<Vec<u8>> {
        let mut out = vec![0u8; ino.size.saturating_sub(off).min(len as u64) as usize];
        let (n, segs) = self.read_prepare(vol, ino, off, &mut out)?;
        fetch(vol, &segs, &mut out)?;
        out.truncate(n);
        Ok(out)
    }

    fn to_tree(&mut self, vol: &Volume, ino: &mut Inode, new_end: u64) -> Result<()> {
        let content = ino.area[..ino.size as usize].to_vec();
        ino.area.fill(0);
        let sb = u64::from(vol.header.sub_block_size);
        let sub = ino.is_dir() || new_end <= SB_FILE_LEAVES * sb;
        ino.layout = Layout::Tree { sub, depth: 0 };
        if content.iter().any(|&b| b != 0) {
            self.write_locked(vol, ino, 0, &content)?;
        }
        Ok(())
    }

    fn sub_to_fb(&mut self, vol: &Volume, ino: &mut Inode) -> Result<()> {
        let content = self.read_locked(vol, ino, 0, ino.size as usize)?;
        let size = ino.size;
        self.free_range(vol, ino, 0, u64::MAX)?;
        ino.layout = Layout::Tree {
            sub: false,
            depth: 0,
        };
        ino.size = size;
        if content.iter().any(|&b| b != 0) {
            self.write_locked(vol, ino, 0, &content)?;
        }
        Ok(())
    }

    /// Make the layout able to hold `end` bytes: inline while it fits, then
    /// sub-block leaves, then file-block leaves. True when still inline.
    fn prepare_layout(&mut self, vol: &Volume, ino: &mut Inode, end: u64) -> Result<bool> {
        if ino.layout == Layout::Inline {
            if end <= INLINE_MAX as u64 {
                return Ok(true);
            }
            self.to_tree(vol, ino, end)?;
        }
        if let Layout::Tree { sub: true, .. } = ino.layout {
            let sb = u64::from(vol.header.sub_block_size);
            if !ino.is_dir() && end > SB_FILE_LEAVES * sb && sb < vol.block_size() {
                self.sub_to_fb(vol, ino)?;
            }
        }
        Ok(false)
    }

    /// Write with the state lock held: allocates as needed; fresh leaves get
    /// their unwritten parts zeroed before the data, all before commit.
    pub fn write_locked(
        &mut self,
        vol: &Volume,
        ino: &mut Inode,
        off: u64,
        data: &[u8],
    ) -> Result<()> {
        let end = off
            .checked_add(data.len() as u64)
            .ok_or_else(|| posix(libc::EFBIG))?;
        if data.is_empty() {
            return Ok(());
        }
        if self.prepare_layout(vol, ino, end)? {
            ino.area[off as usize..end as usize].copy_from_slice(data);
            ino.size = ino.size.max(end);
            return Ok(());
        }
        self.zero_tail(vol, ino, off)?;
        let leaf_sz = Self::leaf_size(vol, ino);
        let mut done = 0usize;
        while done < data.len() {
            let pos = off + done as u64;
            let li = pos / leaf_sz;
            let in_leaf = pos % leaf_sz;
            let n = ((leaf_sz - in_leaf) as usize).min(data.len() - done);
            let (addr, fresh) = self.map_alloc(vol, ino, li)?;
            let base = addr * MD as u64;
            if fresh {
                vol.zero(base, in_leaf)?;
                vol.zero(base + in_leaf + n as u64, leaf_sz - in_leaf - n as u64)?;
            }
            vol.write(base + in_leaf, &data[done..done + n])?;
            done += n;
        }
        ino.size = ino.size.max(end);
        Ok(())
    }

    /// Zero `[off, end)` inside already-mapped leaves (no allocation).
    fn zero_mapped(&mut self, vol: &Volume, ino: &mut Inode, off: u64, end: u64) -> Result<()> {
        if off >= end {
            return Ok(());
        }
        if ino.layout == Layout::Inline {
            let e = end.min(INLINE_MAX as u64) as usize;
            if (off as usize) < e {
                ino.area[off as usize..e].fill(0);
            }
            return Ok(());
        }
        for s in self.plan(vol, ino, off, (end - off) as usize)? {
            if let Some(at) = s.at {
                vol.zero(at, s.len as u64)?;
            }
        }
        Ok(())
    }

    /// Before the size grows to `new_end`: zero the stale bytes between the
    /// current end of file and the end of its last leaf, which a shrinking
    /// truncate left in place. Done here and not at the truncate, so that a
    /// crash before the truncate commits finds the old contents whole; the
    /// zeros themselves stay invisible until the new size commits.
    fn zero_tail(&mut self, vol: &Volume, ino: &mut Inode, new_end: u64) -> Result<()> {
        if new_end <= ino.size || ino.layout == Layout::Inline {
            return Ok(());
        }
        let leaf_sz = Self::leaf_size(vol, ino);
        let tail_end = new_end.min(ino.size.next_multiple_of(leaf_sz));
        self.zero_mapped(vol, ino, ino.size, tail_end)
    }

    pub fn truncate(&mut self, vol: &Volume, ino: &mut Inode, size: u64) -> Result<()> {
        if size > ino.size {
            self.zero_tail(vol, ino, size)?;
        }
        if size < ino.size {
            let leaf_sz = Self::leaf_size(vol, ino);
            if ino.layout == Layout::Inline {
                // Inline bytes are metadata: zeroed atomically with the size.
                self.zero_mapped(vol, ino, size, ino.size)?;
            } else {
                self.free_range(vol, ino, size.div_ceil(leaf_sz), u64::MAX)?;
                if size == 0 && !ino.is_dir() {
                    self.free_range(vol, ino, 0, u64::MAX)?;
                }
            }
        }
        if size > (FD_PTRS as u64) * Self::span(4) * vol.block_size() {
            return Err(posix(libc::EFBIG));
        }
        if ino.layout == Layout::Inline && size > INLINE_MAX as u64 {
            self.to_tree(vol, ino, size)?;
        }
        ino.size = size;
        Ok(())
    }

    pub fn punch(&mut self, vol: &Volume, ino: &mut Inode, off: u64, len: u64) -> Result<()> {
        let end = off.saturating_add(len).min(ino.size);
        if off >= end {
            return Ok(());
        }
        if ino.layout == Layout::Inline {
            return self.zero_mapped(vol, ino, off, end);
        }
        let leaf_sz = Self::leaf_size(vol, ino);
        let first_full = off.div_ceil(leaf_sz);
        let last_full = end / leaf_sz; // exclusive
        if first_full < last_full {
            self.zero_mapped(vol, ino, off, first_full * leaf_sz)?;
            self.free_range(vol, ino, first_full, last_full)?;
            self.zero_mapped(vol, ino, last_full * leaf_sz, end)?;
        } else {
            self.zero_mapped(vol, ino, off, end)?;
        }
        Ok(())
    }

    pub fn preallocate(
        &mut self,
        vol: &Volume,
        ino: &mut Inode,
        off: u64,
        len: u64,
        keep_size: bool,
    ) -> Result<()> {
        let end = off.checked_add(len).ok_or_else(|| posix(libc::EFBIG))?;
        if self.prepare_layout(vol, ino, end)? {
            if !keep_size {
                ino.size = ino.size.max(end);
            }
            return Ok(());
        }
        if !keep_size {
            self.zero_tail(vol, ino, end)?;
        }
        let leaf_sz = Self::leaf_size(vol, ino);
        let need = (end.div_ceil(leaf_sz) - off / leaf_sz) * leaf_sz / vol.block_size();
        if need > self.alloc.free_blocks() {
            return Err(FsError::NoSpace(format!(
                "fallocate of {len} bytes needs {need} blocks"
            )));
        }
        for li in off / leaf_sz..end.div_ceil(leaf_sz) {
            self.prealloc_leaf(vol, ino, li)?;
        }
        if !keep_size {
            ino.size = ino.size.max(end);
        }
        Ok(())
    }

    // ------------------------------------------------------------ directories

    /// Where directory block `idx` is (leaf and 4 KiB within it).
    fn dir_pos(vol: &Volume, dir: &Inode, idx: u64) -> (u64, u64) {
        let leaf_sz = Self::leaf_size(vol, dir);
        (
            idx * MD as u64 / leaf_sz,
            (idx * MD as u64 % leaf_sz) / MD as u64,
        )
    }

    /// The 4K address of directory block `idx`, allocating (zeroed) if absent.
    fn dir_block_alloc(&mut self, vol: &Volume, dir: &mut Inode, idx: u64) -> Result<u64> {
        let (li, sub) = Self::dir_pos(vol, dir, idx);
        let (a, fresh) = self.map_alloc(vol, dir, li)?;
        if fresh {
            vol.zero(a * MD as u64, Self::leaf_size(vol, dir))?;
        }
        dir.size = dir.size.max((idx + 1) * MD as u64);
        Ok(a + sub)
    }

    /// The 4K address of directory block `idx`, which must exist.
    fn dir_block_ro(&mut self, vol: &Volume, dir: &Inode, idx: u64) -> Result<u64> {
        let (li, sub) = Self::dir_pos(vol, dir, idx);
        match self.get_ptr(vol, dir, li)? {
            0 => {
                let (lun, off) = vol.where_is(dir.addr * MD as u64);
                Err(corrupt(
                    &lun,
                    off,
                    format!("directory {:#x}", dir.addr),
                    format!("block {idx} is missing (a hole)"),
                ))
            }
            p => Ok((p & PTR_ADDR_MASK) + sub),
        }
    }

    fn bucket_read(
        &mut self,
        vol: &Volume,
        dir: &Inode,
        idx: u64,
    ) -> Result<(u64, Vec<DirEntry>, u32)> {
        let a = self.dir_block_ro(vol, dir, idx)?;
        let b = self.meta.get(vol, a, MAGIC_DIRBKT)?;
        let next = get32(b, 36);
        let es = bucket_entries(b).map_err(|r| {
            let (lun, off) = vol.where_is(a * MD as u64);
            corrupt(
                &lun,
                off,
                format!("directory bucket {idx} of directory {:#x}", dir.addr),
                r,
            )
        })?;
        Ok((a, es, next))
    }

    fn bucket_write(&mut self, vol: &Volume, addr: u64, es: &[DirEntry], next: u32) -> Result<()> {
        let b = self.meta.get_mut(vol, addr, MAGIC_DIRBKT)?;
        let ok = bucket_store(b, es);
        put32(b, 36, next);
        debug_assert!(ok);
        Ok(())
    }

    /// (hdr addr, level, split, entries)
    fn dir_hdr(&mut self, vol: &Volume, dir: &Inode) -> Result<(u64, u32, u32, u64)> {
        let a = self.dir_block_ro(vol, dir, 0)?;
        let b = self.meta.get(vol, a, MAGIC_DIRHDR)?;
        let (level, split, n) = (get32(b, 32), get32(b, 36), get64(b, 40));
        // Buckets are 2^level + split with split < 2^level.
        if level > 30 || u64::from(split) >= 1u64 << level {
            let (lun, off) = vol.where_is(a * MD as u64);
            return Err(corrupt(
                &lun,
                off,
                format!("directory header of {:#x}", dir.addr),
                format!("level {level} split {split}"),
            ));
        }
        Ok((a, level, split, n))
    }

    fn bucket_of(level: u32, split: u32, h: u64) -> u64 {
        let b = h & ((1u64 << level) - 1);
        if b < u64::from(split) {
            h & ((1u64 << (level + 1)) - 1)
        } else {
            b
        }
    }

    pub fn dir_init(&mut self, vol: &Volume, dir: &mut Inode, parent: u64) -> Result<()> {
        let h = self.dir_block_alloc(vol, dir, 0)?;
        let b = self.meta.create(h, MAGIC_DIRHDR, dir.addr);
        put64(b, 48, parent);
        let k = self.dir_block_alloc(vol, dir, 1)?;
        self.meta.create(k, MAGIC_DIRBKT, dir.addr);
        dir.parent = parent;
        Ok(())
    }

    pub fn dir_lookup(
        &mut self,
        vol: &Volume,
        dir: &Inode,
        name: &[u8],
    ) -> Result<Option<DirEntry>> {
        let h = name_hash(name);
        let (_, level, split, _) = self.dir_hdr(vol, dir)?;
        let mut idx = 1 + Self::bucket_of(level, split, h);
        for _ in 0..1_000_000 {
            let (_, es, next) = self.bucket_read(vol, dir, idx)?;
            if let Some(e) = es.into_iter().find(|e| e.hash == h && e.name == name) {
                return Ok(Some(e));
            }
            if next == 0 {
                return Ok(None);
            }
            idx = DIR_OVF_BASE + u64::from(next) - 1;
        }
        Err(FsError::Invalid(format!(
            "directory {:#x}: overflow chain loops",
            dir.addr
        )))
    }

    pub fn dir_list(&mut self, vol: &Volume, dir: &Inode) -> Result<Vec<DirEntry>> {
        let (_, level, split, _) = self.dir_hdr(vol, dir)?;
        let nb = (1u64 << level) + u64::from(split);
        let mut out = Vec::new();
        for b in 0..nb {
            let mut idx = 1 + b;
            let mut hops = 0;
            loop {
                let (_, es, next) = self.bucket_read(vol, dir, idx)?;
                out.extend(es);
                if next == 0 {
                    break;
                }
                hops += 1;
                if hops > 1_000_000 {
                    return Err(FsError::Invalid(format!(
                        "directory {:#x}: overflow chain loops",
                        dir.addr
                    )));
                }
                idx = DIR_OVF_BASE + u64::from(next) - 1;
            }
        }
        Ok(out)
    }

    fn ovf_alloc(&mut self, vol: &Volume, dir: &mut Inode, hdr: u64) -> Result<(u32, u64)> {
        let b = self.meta.get(vol, hdr, MAGIC_DIRHDR)?;
        let (onext, ofree) = (get32(b, 56), get32(b, 60));
        let k = if ofree != 0 {
            let a = self.dir_block_ro(vol, dir, DIR_OVF_BASE + u64::from(ofree) - 1)?;
            let nf = get32(self.meta.get(vol, a, MAGIC_DIRBKT)?, 36);
            put32(self.meta.get_mut(vol, hdr, MAGIC_DIRHDR)?, 60, nf);
            ofree
        } else {
            put32(self.meta.get_mut(vol, hdr, MAGIC_DIRHDR)?, 56, onext + 1);
            onext + 1
        };
        let a = self.dir_block_alloc(vol, dir, DIR_OVF_BASE + u64::from(k) - 1)?;
        self.meta.create(a, MAGIC_DIRBKT, dir.addr);
        Ok((k, a))
    }

    fn ovf_release(&mut self, vol: &Volume, dir: &Inode, hdr: u64, k: u32) -> Result<()> {
        let a = self.dir_block_ro(vol, dir, DIR_OVF_BASE + u64::from(k) - 1)?;
        let head = get32(self.meta.get(vol, hdr, MAGIC_DIRHDR)?, 60);
        self.bucket_write(vol, a, &[], head)?;
        put32(self.meta.get_mut(vol, hdr, MAGIC_DIRHDR)?, 60, k);
        Ok(())
    }

    /// Store `es` as the chain of bucket `b`, reusing or releasing overflow blocks.
    fn write_chain(
        &mut self,
        vol: &Volume,
        dir: &mut Inode,
        hdr: u64,
        b: u64,
        es: Vec<DirEntry>,
    ) -> Result<()> {
        let (a, _, mut next) = self.bucket_read(vol, dir, 1 + b)?;
        while next != 0 {
            let (_, _, n2) = self.bucket_read(vol, dir, DIR_OVF_BASE + u64::from(next) - 1)?;
            self.ovf_release(vol, dir, hdr, next)?;
            next = n2;
        }
        let mut groups: Vec<Vec<DirEntry>> = vec![Vec::new()];
        let mut used = 0;
        for e in es {
            if DB_ENTRIES + used + e.disk_len() > MD {
                groups.push(Vec::new());
                used = 0;
            }
            used += e.disk_len();
            groups.last_mut().expect("one").push(e);
        }
        let mut addrs = vec![a];
        let mut ks = vec![0u32];
        for _ in 1..groups.len() {
            let (k, oa) = self.ovf_alloc(vol, dir, hdr)?;
            addrs.push(oa);
            ks.push(k);
        }
        for (i, g) in groups.iter().enumerate() {
            let next = ks.get(i + 1).copied().unwrap_or(0);
            self.bucket_write(vol, addrs[i], g, next)?;
        }
        Ok(())
    }

    pub fn dir_insert(
        &mut self,
        vol: &Volume,
        dir: &mut Inode,
        name: &[u8],
        fd: u64,
        kind: u8,
    ) -> Result<()> {
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(posix(libc::ENAMETOOLONG));
        }
        let e = DirEntry {
            hash: name_hash(name),
            fd,
            kind,
            name: name.to_vec(),
        };
        let (hdr, level, split, n) = self.dir_hdr(vol, dir)?;
        let b = Self::bucket_of(level, split, e.hash);
        let mut idx = 1 + b;
        loop {
            let (a, mut es, next) = self.bucket_read(vol, dir, idx)?;
            let used: usize = es.iter().map(DirEntry::disk_len).sum();
            if DB_ENTRIES + used + e.disk_len() <= MD {
                es.push(e);
                self.bucket_write(vol, a, &es, next)?;
                break;
            }
            if next == 0 {
                let (k, oa) = self.ovf_alloc(vol, dir, hdr)?;
                self.bucket_write(vol, oa, &[e], 0)?;
                self.bucket_write(vol, a, &es, k)?;
                break;
            }
            idx = DIR_OVF_BASE + u64::from(next) - 1;
        }
        put64(self.meta.get_mut(vol, hdr, MAGIC_DIRHDR)?, 40, n + 1);
        let nb = (1u64 << level) + u64::from(split);
        if n + 1 > nb * DIR_SPLIT_LOAD {
            self.dir_split(vol, dir, hdr, level, split)?;
        }
        Ok(())
    }

    fn dir_split(
        &mut self,
        vol: &Volume,
        dir: &mut Inode,
        hdr: u64,
        level: u32,
        split: u32,
    ) -> Result<()> {
        let s = u64::from(split);
        let newb = s + (1u64 << level);
        // Gather the chain of bucket s.
        let mut all = Vec::new();
        let mut idx = 1 + s;
        loop {
            let (_, es, next) = self.bucket_read(vol, dir, idx)?;
            all.extend(es);
            if next == 0 {
                break;
            }
            idx = DIR_OVF_BASE + u64::from(next) - 1;
        }
        let a = self.dir_block_alloc(vol, dir, 1 + newb)?;
        self.meta.create(a, MAGIC_DIRBKT, dir.addr);
        let mask = (1u64 << (level + 1)) - 1;
        let (stay, go): (Vec<_>, Vec<_>) = all.into_iter().partition(|e| e.hash & mask == s);
        self.write_chain(vol, dir, hdr, s, stay)?;
        self.write_chain(vol, dir, hdr, newb, go)?;
        let (nl, ns) = if split + 1 == 1u32 << level {
            (level + 1, 0)
        } else {
            (level, split + 1)
        };
        let h = self.meta.get_mut(vol, hdr, MAGIC_DIRHDR)?;
        put32(h, 32, nl);
        put32(h, 36, ns);
        Ok(())
    }

    pub fn dir_remove(
        &mut self,
        vol: &Volume,
        dir: &mut Inode,
        name: &[u8],
    ) -> Result<Option<DirEntry>> {
        let h = name_hash(name);
        let (hdr, level, split, n) = self.dir_hdr(vol, dir)?;
        let mut idx = 1 + Self::bucket_of(level, split, h);
        loop {
            let (a, mut es, next) = self.bucket_read(vol, dir, idx)?;
            if let Some(p) = es.iter().position(|e| e.hash == h && e.name == name) {
                let e = es.remove(p);
                self.bucket_write(vol, a, &es, next)?;
                put64(
                    self.meta.get_mut(vol, hdr, MAGIC_DIRHDR)?,
                    40,
                    n.saturating_sub(1),
                );
                return Ok(Some(e));
            }
            if next == 0 {
                return Ok(None);
            }
            idx = DIR_OVF_BASE + u64::from(next) - 1;
        }
    }

    /// Entries in a directory (from its header).
    pub fn dir_count(&mut self, vol: &Volume, dir: &Inode) -> Result<u64> {
        Ok(self.dir_hdr(vol, dir)?.3)
    }

    fn set_dotdot(&mut self, vol: &Volume, dir: &mut Inode, parent: u64) -> Result<()> {
        let (hdr, ..) = self.dir_hdr(vol, dir)?;
        put64(self.meta.get_mut(vol, hdr, MAGIC_DIRHDR)?, 48, parent);
        dir.parent = parent;
        Ok(())
    }
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
    /// Format, then open (mount in the library) the new filesystem.
    pub fn mkfs(luns: Vec<Arc<dyn lun::Lun>>, opts: &MkfsOptions) -> Result<Fs> {
        let vol = Volume::mkfs(luns.clone(), opts)?;
        let fs = Fs::from_volume(vol)?;
        // The root is written in place: there is no journal yet, and an
        // interrupted mkfs leaves no root, which open refuses.
        let root = fs.op(|st, vol| {
            let mut root = st.ialloc(vol, S_IFDIR | 0o755, 0, 0)?;
            root.nlink = 2;
            let a = root.addr;
            st.dir_init(vol, &mut root, a)?;
            st.iput(vol, &root)?;
            Ok(a)
        })?;
        let mut v = Volume::clone(&fs.vol());
        v.header.root_fd = root;
        v.write_headers(None)?;
        fs.set_vol(v);
        fs.abandon();
        drop(fs);
        Fs::open(luns)
    }

    /// Open a validated volume in the library as host slot 0, without a
    /// heartbeat (tests, tools, the crash harness): replay every journal that
    /// holds committed transactions, then open slot 0's journal (allocating
    /// it on first use). `vmfs mount` uses [`Fs::mount`].
    pub fn open(luns: Vec<Arc<dyn lun::Lun>>) -> Result<Fs> {
        Self::open_inner(luns)
    }

    /// Mount as host `host`: join the heartbeat region (refused while another
    /// host is live; dead hosts are recovered), then open with every write
    /// going through this host's lease (self-fencing).
    pub fn mount(
        luns: Vec<Arc<dyn lun::Lun>>,
        host: [u8; 16],
        t: crate::cluster::Timeouts,
    ) -> Result<Fs> {
        // Check everything reading only (a journal replay goes to memory):
        // a mount refused for corruption writes nothing, not even a slot.
        // Other hosts may be changing the metadata while this reads: a
        // check that fails is tried again a few times before it counts.
        let validate = || -> Result<()> {
            let cow = luns
                .iter()
                .map(|l| Arc::new(lun::CowLun::new(l.clone())) as Arc<dyn lun::Lun>)
                .collect();
            let vol = Volume::open(cow)?;
            if vol.header.root_fd == 0 {
                return Err(FsError::Invalid(
                    "the volume has no root directory: mkfs did not finish; run mkfs again".into(),
                ));
            }
            replay_journals(&vol)?;
            let fs = Fs::from_volume(vol)?;
            fs.abandon();
            fs.check_root()
        };
        let mut tries = 0;
        while let Err(e) = validate() {
            tries += 1;
            if tries >= 5 || matches!(e, FsError::Extent { .. }) {
                return Err(e);
            }
            tracing::debug!("checking the datastore before joining failed ({e}); trying again");
            std::thread::sleep(std::time::Duration::from_millis(100 * tries));
        }
        let vol = Volume::open(luns.clone())?;
        let joined = crate::cluster::join(&vol, host, t)?;
        drop(vol);
        let lease = joined.member.lease.clone();
        let fenced: Vec<Arc<dyn lun::Lun>> = luns
            .into_iter()
            .map(|l| Arc::new(lun::FencedLun::new(l, lease.clone())) as Arc<dyn lun::Lun>)
            .collect();
        let vol = Volume::open(fenced)?;
        // Other hosts change the metadata from now on: everything is read
        // under the volume lock (the allocation summaries at the first
        // operation), nothing before.
        let mut vlock = locking::VolumeLock::new(vol.luns[0].clone(), vol.header.rt_off);
        // A host the lock is handed to takes it within microseconds when it
        // runs; a sixteenth of the lease also covers a busy CPU's delays.
        vlock.lapse = t.lease / 16;
        tracing::info!(
            "on-disk locks of this datastore: {}",
            vlock.method.describe()
        );
        let fs = Fs::with_alloc(vol, Meta::default(), Alloc::default())?;
        fs.lock().alloc_stale = true;
        let Joined {
            member,
            replays,
            unclean,
            dead,
        } = joined;
        let slot = member.slot;
        {
            let mut st = fs.lock();
            st.me = Some(member.holder());
            st.alloc.locks = Some(crate::alloc::Locks::new(member.holder()));
        }
        let _ = fs.member.set(member);
        let _ = fs.shared.set(Shared {
            vlock,
            contended: std::sync::atomic::AtomicBool::new(true),
            watched: std::sync::atomic::AtomicBool::new(false),
            monitor: Mutex::new(crate::cluster::Monitor::default()),
        });
        // Dead hosts found while joining: recovered as any member would,
        // under the volume lock (before anything here waits on it).
        let recovered = match fs.recover_slots(dead, "stopped without unmounting") {
            Ok(n) => n,
            Err(e) => {
                if let Some(m) = fs.member.get() {
                    let _ = m.leave();
                }
                fs.abandon();
                return Err(e);
            }
        };
        let mut all = replays;
        all.extend(fs.replays());
        fs.finish_open(slot, all, unclean || recovered > 0)?;
        Ok(fs)
    }

    fn open_inner(luns: Vec<Arc<dyn lun::Lun>>) -> Result<Fs> {
        let vol = Volume::open(luns)?;
        if vol.header.root_fd == 0 {
            return Err(FsError::Invalid(
                "the volume has no root directory: mkfs did not finish; run mkfs again".into(),
            ));
        }
        let unclean = vol.read_slot(0)?.state != SLOT_FREE;
        let replays = replay_journals(&vol)?;
        let fs = Fs::from_volume(vol)?;
        fs.finish_open(0, replays, unclean)?;
        Ok(fs)
    }

    /// Check the root, open this slot's journal, clean up after a crash.
    fn finish_open(
        &self,
        slot: u32,
        replays: Vec<(u32, journal::Report)>,
        unclean: bool,
    ) -> Result<()> {
        let fs = self;
        let r = (|| {
            fs.check_root()?;
            fs.start_journal(slot)?;
            if let Some(m) = fs.member.get() {
                let hosts = fs.vol().header.max_hosts;
                fs.op(|st, _| {
                    st.alloc.set_affinity(m.slot, hosts);
                    Ok(())
                })?;
            }
            if unclean {
                // Files unlinked while open live until their last close; a
                // crash leaves them with no name and no opener. Free them now.
                let n = fs.free_orphans()?;
                if n > 0 {
                    tracing::info!(
                        "freed {n} file(s) that were unlinked while open when the host stopped"
                    );
                }
                fs.sync()?;
            }
            fs.release_volume_lock()
        })();
        if let Err(e) = r {
            // Leave the slot as a clean stop would, or as it was.
            if let Some(m) = fs.member.get() {
                let _ = m.leave();
            }
            fs.abandon();
            return Err(e);
        }
        *fs.replays.lock().unwrap_or_else(|p| p.into_inner()) = replays;
        Ok(())
    }

    /// The root must be a readable directory.
    fn check_root(&self) -> Result<()> {
        self.read_op(|st, vol| {
            let root = st.iget(vol, vol.header.root_fd)?;
            if !root.is_dir() {
                return Err(FsError::Invalid(
                    "the root file descriptor is not a directory".into(),
                ));
            }
            st.dir_hdr(vol, &root)?;
            Ok(())
        })
    }

    /// Open for checking: with `repair` false, every write (journal replay
    /// included) stays in memory and the LUNs are not changed.
    pub fn open_for_check(luns: Vec<Arc<dyn lun::Lun>>, repair: bool) -> Result<Fs> {
        if repair {
            return Fs::open(luns);
        }
        let cow = luns
            .into_iter()
            .map(|l| Arc::new(lun::CowLun::new(l)) as Arc<dyn lun::Lun>)
            .collect();
        Fs::open(cow)
    }

    fn from_volume(vol: Volume) -> Result<Fs> {
        let mut meta = Meta::default();
        let alloc = Alloc::load(&vol, &mut meta)?;
        Self::with_alloc(vol, meta, alloc)
    }

    fn with_alloc(vol: Volume, meta: Meta, alloc: Alloc) -> Result<Fs> {
        let seed = now();
        Ok(Fs {
            vol: RwLock::new(Arc::new(vol)),
            st: Mutex::new(State {
                meta,
                alloc,
                open: HashMap::new(),
                orphans: HashSet::new(),
                next_gen: (seed.0 as u64) << 20 ^ u64::from(seed.1),
                vl_held: None,
                vl_since: std::time::Instant::now(),
                cache_gen: None,
                alloc_stale: false,
                flocks: HashMap::new(),
                me: None,
            }),
            data_locks: Mutex::new(HashMap::new()),
            slot: std::sync::atomic::AtomicU32::new(u32::MAX),
            closed: std::sync::atomic::AtomicBool::new(false),
            replays: Mutex::new(Vec::new()),
            member: std::sync::OnceLock::new(),
            shared: std::sync::OnceLock::new(),
            unopened_gen: std::sync::atomic::AtomicU64::new(0),
            mapped: Mutex::new(HashMap::new()),
            mapped_count: std::sync::atomic::AtomicUsize::new(0),
            rdm_luns: RwLock::new(Vec::new()),
            yield_wants: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Open (or allocate and format) slot `slot`'s journal and mark the slot live.
    fn start_journal(&self, slot: u32) -> Result<()> {
        let vol = &self.vol();
        let mut hs = vol.read_slot(slot)?;
        let uuid = vol.header.uuid;
        let jnl = if hs.journal == 0 {
            // First mount of this slot: contiguous file blocks, written in
            // place (bitmap, then journal, then the slot pointing at it; a
            // crash in between leaks blocks that fsck --repair reclaims).
            let bpk = vol.blocks_per_4k();
            let want = u64::from(vol.header.journal_blocks).div_ceil(bpk);
            let least = u64::from(JOURNAL_MIN_BLOCKS).div_ceil(bpk);
            // Where free space is left only in pieces, a smaller journal
            // (the slot records its size): joining fails only when not even
            // the smallest fits.
            let mut nfb = want;
            let first = loop {
                match self.op(|st, vol| st.alloc.alloc_run(vol, &mut st.meta, nfb)) {
                    Ok(f) => break f,
                    Err(FsError::NoSpace(_)) if nfb > least => nfb = (nfb / 2).max(least),
                    Err(e) => return Err(e),
                }
            };
            if nfb < want {
                tracing::warn!(
                    "slot {slot}: a journal of {} KiB instead of {} KiB: the free space left has no longer run of blocks",
                    nfb * vol.block_size() / 1024,
                    want * vol.block_size() / 1024
                );
            }
            vol.flush()?;
            let r = self.journal_region(first * bpk, (nfb * bpk) as u32, slot)?;
            let seed = now();
            let j = journal::Journal::format(r, &uuid, (seed.0 as u64) << 20 | 1)?;
            hs.journal = first * bpk;
            hs.journal_blocks = (nfb * bpk) as u32;
            j
        } else {
            journal::Journal::open(
                self.journal_region(hs.journal, hs.journal_blocks, slot)?,
                &uuid,
            )?
        };
        match self.member.get() {
            // Joining marked the slot live; record the journal under the heartbeat's lock.
            Some(m) => {
                let (a, n) = (hs.journal, hs.journal_blocks);
                m.update(|s| {
                    s.journal = a;
                    s.journal_blocks = n;
                })?;
            }
            None => {
                hs.state = SLOT_LIVE;
                hs.generation += 1;
                vol.write_slot(slot, &hs)?;
            }
        }
        self.lock().meta.jnl = Some(jnl);
        self.slot.store(slot, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// 4K addresses of every allocated file descriptor, cluster by cluster.
    fn allocated_fds(&self) -> Result<Vec<u64>> {
        let clusters: Vec<_> = self
            .lock()
            .alloc
            .clusters
            .iter()
            .filter(|c| c.rtype == ResType::Fd)
            .cloned()
            .collect();
        let mut out = Vec::new();
        for c in clusters {
            let bitmap = self.read_op(|st, vol| {
                Ok(st.meta.get(vol, c.addr, MAGIC_RCLUSTER)?[LOCK_SECTOR..].to_vec())
            })?;
            out.extend(
                (0..c.count as usize)
                    .filter(|&j| bit_get(&bitmap[CL_BITMAP..], j))
                    .map(|j| c.addr + 1 + j as u64),
            );
        }
        Ok(out)
    }

    /// Free every allocated file descriptor with no links (after a crash,
    /// nothing has it open). Returns how many. Reads every descriptor: the
    /// price of not keeping an on-disk orphan list, paid only after a crash.
    /// A descriptor another live host holds open (its lock) is skipped.
    pub fn free_orphans(&self) -> Result<u64> {
        let mut n = 0;
        for a in self.allocated_fds()? {
            let freed = self.op(|st, vol| match st.iget(vol, a) {
                Ok(mut i) if i.nlink == 0 && !st.open.contains_key(&a) => {
                    // Another live host may still have it open.
                    if self.shared.get().is_some() {
                        let (lun, off) = self.vol().lock_sector(a)?;
                        let rec = locking::read_lock(&*lun, off)?;
                        let t = crate::cluster::slot_table(vol)?;
                        if rec
                            .holders
                            .iter()
                            .any(|h| crate::cluster::is_current(&t, h))
                        {
                            return Ok(false);
                        }
                    }
                    st.ifree(vol, &mut i)?;
                    Ok(true)
                }
                _ => Ok(false),
            })?;
            n += u64::from(freed);
        }
        Ok(n)
    }

    fn journal_region(&self, addr: u64, nblocks: u32, slot: u32) -> Result<journal::Region> {
        journal_region(&self.vol(), addr, nblocks, slot)
    }

    /// Journal replays done when this filesystem was opened: (slot, report).
    pub fn replays(&self) -> Vec<(u32, journal::Report)> {
        self.replays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Commit every pending metadata change and make all data durable
    /// (fsync, fdatasync, syncfs, sync).
    pub fn sync(&self) -> Result<()> {
        let mut st = self.lock();
        if st.meta.dirty_len() > 0 {
            st.meta.journal_commit(&self.vol())
        } else {
            drop(st);
            self.vol().flush()
        }
    }

    /// Commit the running transaction if it has waited long enough (the
    /// mount's commit timer calls this).
    pub fn commit_pending(&self) -> Result<()> {
        let mut st = self.lock();
        st.meta.journal_commit(&self.vol())
    }

    /// Clean unmount: commit, checkpoint (the journal is left empty), mark
    /// the slot free. Idempotent.
    pub fn unmount(&self) -> Result<()> {
        if self.closed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let slot = self.slot.load(std::sync::atomic::Ordering::SeqCst);
        let mut st = if self.shared.get().is_some() {
            self.lock_with_volume_lock()?
        } else {
            self.lock()
        };
        if self.shared.get().is_some() {
            // Give back every file lock, then the volume lock (after a checkpoint).
            let me = self
                .member
                .get()
                .expect("cluster mode has a member")
                .holder();
            for addr in st.flocks.keys().copied().collect::<Vec<_>>() {
                let (lun, off) = self.vol().lock_sector(addr)?;
                locking::release_under_volume_lock(&*lun, off, me)?;
            }
            st.flocks.clear();
            st.alloc.release_all(&self.vol())?;
            self.vl_leave(&mut st, true)?;
        }
        st.meta.checkpoint(&self.vol())?;
        if let Some(m) = self.member.get() {
            m.leave()?;
        } else if slot != u32::MAX {
            let mut hs = self.vol().read_slot(slot)?;
            hs.state = SLOT_FREE;
            self.vol().write_slot(slot, &hs)?;
        }
        Ok(())
    }

    /// Drop without writing anything more, as a crash would (tests, and a
    /// filesystem whose LUNs are gone).
    pub fn abandon(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(m) = self.member.get() {
            m.stop();
        }
    }

    /// Cluster housekeeping, every heartbeat interval (the mount runs it on
    /// a thread of its own): watch the other slots; give the volume lock
    /// back when another host has arrived; recover hosts that died (journal
    /// replay, slot freed, their locks with it), then free the files they
    /// had unlinked while open.
    pub fn housekeep(&self) -> Result<()> {
        let (Some(sh), Some(m)) = (self.shared.get(), self.member.get()) else {
            return Ok(());
        };
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) || m.lease.is_fenced() {
            return Ok(());
        }
        let (others, dead) = sh
            .monitor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(&self.vol(), m.slot, &m.timeouts)?;
        let was = sh
            .contended
            .swap(others, std::sync::atomic::Ordering::SeqCst);
        if others && !was {
            tracing::info!(
                "another host is mounted: the volume lock is given back whenever another host waits for it"
            );
        }
        if others {
            self.release_volume_lock()?;
            // An extent another host added shows in statfs without waiting
            // for an operation here.
            let mut st = self.lock();
            if st.vl_held.is_none() && self.refresh_volume(&mut st)? {
                // The allocation summaries (statfs) are reloaded under the lock.
                drop(st);
                self.op(|_, _| Ok(()))?;
            }
        }
        if self.recover_slots(dead, "stopped")? > 0 {
            let n = self.free_orphans()?;
            if n > 0 {
                tracing::info!("freed {n} file(s) the dead host had unlinked while open");
            }
            self.release_volume_lock()?;
        }
        Ok(())
    }

    /// Recover dead hosts (`why` for the log): for each, take the volume
    /// lock — breaking its holds, and those of the other dead hosts: they
    /// write nothing any more (self-fencing) — then, if its slot is still
    /// as seen, mark it being replayed by this host, replay its journal,
    /// free it with generation + 1. Every recoverer goes through the volume
    /// lock, so a read-check-write of the slot suffices even on LUNs without
    /// compare-and-write: no delta-lease waits in a takeover. Returns how
    /// many this host recovered (their replays are in [`Fs::replays`]).
    fn recover_slots(&self, dead: Vec<crate::cluster::Dead>, why: &str) -> Result<usize> {
        let Some(m) = self.member.get() else {
            return Ok(0);
        };
        let breaking: Vec<u32> = dead.iter().map(|d| d.slot).collect();
        let mut done = 0;
        for d in dead {
            let mut st = self.lock();
            // Without reloading allocation summaries: the dead host may
            // have left them half written until its journal is replayed.
            self.vl_take(&mut st, &breaking, false, true)?;
            let why = format!(
                "{why}: its heartbeat has not changed for {} ms (lease {} ms)",
                d.silent.as_millis(),
                m.timeouts.lease.as_millis()
            );
            let r = crate::cluster::recover(
                &self.vol(),
                d.slot,
                &d.hs,
                &d.sector,
                m.slot,
                &m.timeouts,
                &why,
                crate::cluster::Confirm::Owned,
            );
            // What the replay wrote in place is newer than anything cached.
            st.meta.clear();
            st.alloc_stale = true;
            st.cache_gen = None;
            let left = self.vl_leave(&mut st, true);
            if let Some(rep) = r? {
                done += 1;
                if let Some(rep) = rep {
                    self.replays
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((d.slot, rep));
                }
            }
            left?;
        }
        Ok(done)
    }

    /// Set or clear a file's multi-writer flag (several hosts may then
    /// open it for writing at once). Refused while it is open for writing.
    pub fn set_multi_writer(&self, ino: u64, on: bool) -> Result<()> {
        self.op(|st, vol| {
            let mut i = st.iget(vol, ino)?;
            if i.is_dir() {
                return Err(posix(libc::EISDIR));
            }
            let open_here = st.flocks.get(&ino).is_some_and(|f| f.writers > 0);
            if open_here {
                return Err(FsError::Busy(format!(
                    "file descriptor {ino:#x} is open for writing: close it before changing its multi-writer flag"
                )));
            }
            self.check_not_open_elsewhere(ino, "change the multi-writer flag of")?;
            if on {
                i.flags |= FD_FLAG_MULTI_WRITER;
            } else {
                i.flags &= !FD_FLAG_MULTI_WRITER;
            }
            i.ctime = now();
            st.iput(vol, &i)
        })
    }

    /// Write `descriptor` as the new regular file `name` in `dir`, flag it a
    /// raw device mapping (FD flag [`FD_FLAG_RDM`]) and give it the mapped
    /// LUN's size (sparse: only the descriptor takes space).
    pub fn create_mapping(
        &self,
        dir: u64,
        name: &[u8],
        descriptor: &[u8],
        lun_size: u64,
    ) -> Result<Inode> {
        let i = self.create(dir, name, libc::S_IFREG | 0o600, 0, 0, 0, None)?;
        self.open_file(i.addr, true)?;
        let r = (|| {
            self.write(i.addr, 0, descriptor)?;
            self.op(|st, vol| {
                let mut n = st.iget(vol, i.addr)?;
                if lun_size > n.size {
                    st.truncate(vol, &mut n, lun_size)?;
                }
                n.flags |= crate::format::FD_FLAG_RDM;
                st.iput(vol, &n)?;
                Ok(n)
            })
        })();
        let closed = self.release(i.addr, true);
        let n = r?;
        closed?;
        self.sync()?;
        Ok(n)
    }

    /// The LUN URLs this host may open for raw device mappings (searched
    /// before a mapping's own URL hint).
    pub fn set_rdm_luns(&self, urls: Vec<String>) {
        *self.rdm_luns.write().unwrap_or_else(|p| p.into_inner()) = urls;
    }

    /// The descriptor of mapping `i`, as stored (not the LUN's data).
    pub fn mapping_of(&self, i: &Inode) -> Result<rdm::Mapping> {
        let len = i.size.min(rdm::MAX_DESCRIPTOR as u64 + 1) as usize;
        let text = self.read_stored(i.addr, 0, len)?;
        rdm::Mapping::parse_file(&text, &format!("mapping file {:#x}", i.addr))
            .map_err(|e| FsError::Posix(libc::ENXIO, e.to_string()))
    }

    /// After the file lock of mapping `i` is taken: open its LUN (once per
    /// host), found by identity and checked; writes go through this host's
    /// fence like every other write.
    fn attach_mapping(&self, i: &Inode) -> Result<()> {
        let mut m = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(x) = m.get_mut(&i.addr) {
            x.opens += 1;
            return Ok(());
        }
        let mapping = self.mapping_of(i)?;
        let opts = self
            .member
            .get()
            .map(|mb| mb.timeouts.lun_options())
            .unwrap_or_default();
        let list = self
            .rdm_luns
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let lun = rdm::resolve(&mapping, &list, opts).map_err(|e| {
            tracing::error!("raw device mapping {:#x}: {e}", i.addr);
            FsError::Posix(libc::ENXIO, e.to_string())
        })?;
        let lun: Arc<dyn lun::Lun> = match self.member.get() {
            Some(mb) => Arc::new(lun::FencedLun::new(lun, mb.lease.clone())),
            None => lun,
        };
        m.insert(
            i.addr,
            Mapped {
                lun,
                inode: i.clone(),
                opens: 1,
            },
        );
        self.mapped_count
            .store(m.len(), std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn detach_mapping(&self, ino: u64) {
        let mut m = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(x) = m.get_mut(&ino) {
            x.opens -= 1;
            if x.opens == 0 {
                m.remove(&ino);
                self.mapped_count
                    .store(m.len(), std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    /// The LUN of an open raw device mapping, with the mapping's inode.
    pub(crate) fn mapped_lun(&self, ino: u64) -> Option<(Arc<dyn lun::Lun>, Inode)> {
        if self.mapped_count.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return None;
        }
        let m = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&ino).map(|x| (x.lun.clone(), x.inode.clone()))
    }

    /// fsync of one file: an open mapping flushes its LUN; then the
    /// metadata is committed.
    pub fn fsync_file(&self, ino: u64) -> Result<()> {
        if let Some((lun, _)) = self.mapped_lun(ino) {
            lun.flush()?;
        }
        self.sync()
    }

    /// Every lock that is not free: the volume lock, file-block clusters, then file descriptors
    /// (object, its 4K address or 0, the lock as on disk). Holders may be
    /// stale (their slot recovered since): the caller judges them.
    pub fn held_locks(&self) -> Result<Vec<(String, locking::LockRec)>> {
        let mut out = Vec::new();
        let vl = locking::read_lock(&*self.vol().luns[0], self.vol().header.rt_off)?;
        if !vl.holders.is_empty() {
            out.push(("volume lock".to_string(), vl));
        }
        let fbcs: Vec<u64> = self.lock().alloc.fbc.iter().map(|c| c.addr).collect();
        let objects = fbcs.into_iter().map(|a| ("file-block cluster", a)).chain(
            self.allocated_fds()?
                .into_iter()
                .map(|a| ("file descriptor", a)),
        );
        for (what, a) in objects {
            let (lun, off) = self.vol().lock_sector(a)?;
            let rec = locking::read_lock(&*lun, off)?;
            if !rec.holders.is_empty() {
                out.push((format!("{what} {a:#x}"), rec));
            }
        }
        Ok(out)
    }

    /// Whether the datastore is shared with other hosts (cluster mode).
    /// This host's journal: bytes in use and its size (None: no journal).
    pub fn journal_use(&self) -> Option<(u64, u64)> {
        let st = self.lock();
        st.meta.jnl.as_ref().map(|j| (j.used() * 4096, j.capacity() * 4096))
    }

    /// Files this host has open.
    pub fn open_files(&self) -> usize {
        self.lock().open.len()
    }

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

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn root(&self) -> u64 {
        self.vol().header.root_fd
    }

    /// Run `f` as one transaction: commit on success, nothing written on
    /// error. In cluster mode, under the volume lock; when `f` must change a
    /// file-block cluster another host holds, nothing is written, this host
    /// asks for the cluster, waits until it is given back, and runs `f` again.
    pub fn op<R>(&self, mut f: impl FnMut(&mut State, &Volume) -> Result<R>) -> Result<R> {
        loop {
            let mut st = self.lock_with_volume_lock()?;
            match self.op_locked(&mut st, &mut f) {
                Err(FsError::ClusterBusy { addr, slot }) => {
                    // Its holder needs the volume lock to give it back.
                    self.vl_leave(&mut st, true)?;
                    drop(st);
                    self.wait_for_cluster(addr, slot)?;
                }
                r => {
                    let left = self.vl_leave(&mut st, false);
                    let r = r?;
                    left?;
                    return Ok(r);
                }
            }
        }
    }

    /// Wait until no live host other than this one holds file-block cluster
    /// `addr` (first seen held by the host in `slot`), asking for it in this
    /// host's heartbeat slot meanwhile.
    fn wait_for_cluster(&self, addr: u64, slot: u32) -> Result<()> {
        let Some(m) = self.member.get() else {
            return Ok(());
        };
        let me = m.holder();
        let (lun, off) = self.vol().lock_sector(addr)?;
        m.want_cluster(addr)?;
        let start = std::time::Instant::now();
        let mut said = false;
        let mut pause = std::time::Duration::from_micros(200);
        let r = loop {
            if let Err(e) = m.check_lease() {
                break Err(e);
            }
            let rec = match locking::read_lock(&*lun, off) {
                Ok(r) => r,
                Err(e) => break Err(e.into()),
            };
            let current = self.current_holders(me);
            if !rec.holders.iter().any(|h| *h != me && current(h)) {
                break Ok(());
            }
            if !said && start.elapsed() > m.timeouts.lease {
                said = true;
                tracing::warn!(
                    "waiting for file-block cluster {addr:#x}: held by {} for more than {} ms",
                    rec.holders
                        .first()
                        .map(|h| self.describe_holder(h))
                        .unwrap_or_else(|| format!("the host in slot {slot}")),
                    m.timeouts.lease.as_millis()
                );
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(5));
        };
        if said {
            tracing::info!(
                "got file-block cluster {addr:#x} after {} ms",
                start.elapsed().as_millis()
            );
        }
        let cleared = m.unwant_cluster(addr);
        r?;
        cleared
    }

    /// Run `f` on file `ino` as one transaction. When this host holds the
    /// file open alone (its exclusive lock) and does not hold the volume
    /// lock, `f` first runs without it: nobody else may change the file's
    /// descriptor and pointer blocks, and file blocks come from clusters
    /// this host holds. If `f` needs more (a resource cluster, a cluster
    /// not held, any other block), nothing is written and `f` runs again
    /// under the volume lock ([`Fs::op`]).
    pub(crate) fn file_op<R>(
        &self,
        ino: u64,
        mut f: impl FnMut(&mut State, &Volume) -> Result<R>,
    ) -> Result<R> {
        if let (Some(_), Some(m)) = (self.shared.get(), self.member.get()) {
            let mut st = self.lock();
            if st.vl_held.is_none() && Self::holds_alone(&st, ino) {
                m.check_lease()?;
                let vol = self.vol();
                st.alloc.begin_op(false);
                let r = f(&mut st, &vol);
                let rerun = match &r {
                    Ok(_) => !Self::staged_only_own(&st, ino),
                    Err(e) => matches!(e, FsError::NeedVolumeLock),
                };
                if !rerun {
                    return Self::end_txn(&mut st, &vol, r);
                }
                Self::abort_txn(&mut st, &vol);
            }
        }
        self.op(f)
    }

    /// Whether this host holds file `ino` open alone (exclusive lock).
    fn holds_alone(st: &State, ino: u64) -> bool {
        st.flocks
            .get(&ino)
            .is_some_and(|l| l.mode == locking::Mode::Exclusive)
    }

    /// Whether the running transaction changes only what this host owns
    /// while it holds file `ino` alone: the file's descriptor, pointer
    /// blocks (reached only through that descriptor) and file-block
    /// clusters whose lock it holds.
    fn staged_only_own(st: &State, ino: u64) -> bool {
        let held = st.alloc.locks.as_ref().map(|l| &l.held);
        st.meta
            .txn
            .blocks
            .iter()
            .all(|(&a, (magic, _))| match *magic {
                MAGIC_FD => a == ino,
                MAGIC_PTR => true,
                MAGIC_FBC => held.is_some_and(|h| h.contains(&a)),
                _ => false,
            })
    }

    /// [`Fs::read_op`] for reads of file `ino`: without looking at the
    /// volume lock when this host holds the file alone (nobody else changes
    /// its metadata then), so its I/O never waits for other hosts.
    pub(crate) fn file_read_op<R>(
        &self,
        ino: u64,
        mut f: impl FnMut(&mut State, &Volume) -> Result<R>,
    ) -> Result<R> {
        if self.shared.get().is_some() {
            let mut st = self.lock();
            if Self::holds_alone(&st, ino) {
                return f(&mut st, &self.vol());
            }
        }
        self.read_op(f)
    }

    fn op_locked<R>(
        &self,
        st: &mut State,
        f: impl FnOnce(&mut State, &Volume) -> Result<R>,
    ) -> Result<R> {
        st.alloc.begin_op(true);
        let vol = self.vol();
        let r = f(st, &vol);
        Self::end_txn(st, &vol, r)
    }

    /// End the running transaction as `r` says: commit it when `r` is Ok,
    /// else drop it unwritten.
    fn end_txn<R>(st: &mut State, vol: &Volume, r: Result<R>) -> Result<R> {
        match r {
            Ok(r) => match st.meta.commit(vol) {
                Ok(()) => Ok(r),
                Err(e) => {
                    // What reached the disk is uncertain: forget every cached block.
                    st.meta.clear();
                    Self::reload_after_failure(st, vol);
                    Err(e)
                }
            },
            Err(e) => {
                Self::abort_txn(st, vol);
                Err(e)
            }
        }
    }

    /// Drop the running transaction unwritten.
    fn abort_txn(st: &mut State, vol: &Volume) {
        // Allocation summaries change only together with a staged cluster
        // block: an operation that staged nothing changed none.
        let touched = !st.meta.txn.blocks.is_empty();
        st.meta.abort();
        if touched {
            Self::reload_after_failure(st, vol);
        }
    }

    /// The state, with the volume lock held (cluster mode; just the state
    /// otherwise). While another host holds the lock, the state is let go
    /// between attempts: the housekeeping thread needs it to recover a holder
    /// that died, whose lock breaks only then.
    fn lock_with_volume_lock(&self) -> Result<MutexGuard<'_, State>> {
        let mut wait = LockWait::new();
        let mut wanting = Wanting::none();
        let mut pause = std::time::Duration::from_micros(20);
        loop {
            let mut st = self.lock();
            if self.vl_take(&mut st, &[], true, false)? {
                wait.got();
                drop(wanting);
                return Ok(st);
            }
            drop(st);
            if let (Some(sh), Some(m)) = (self.shared.get(), self.member.get()) {
                // Ask the holder to give it back after its operation.
                wanting.start(m)?;
                // Hosts whose ballots collided separate by slot.
                std::thread::sleep(std::time::Duration::from_micros(
                    13 * u64::from(m.slot % 32),
                ));
                let holder = sh
                    .vlock
                    .peek()
                    .ok()
                    .and_then(|r| r.holders.first().copied().or(r.next));
                wait.still_waiting(self, m.timeouts.lease, holder.as_ref());
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(2));
        }
    }

    /// Take the volume lock (cluster mode; nothing otherwise), counting the
    /// holds of the hosts in slots `breaking` (found dead) as gone;
    /// `load_alloc`: reload stale allocation summaries.
    /// `patient`: wait until it is had; else give up (Ok(false)) as soon as
    /// another host holds it or a ballot collided, without sleeping.
    fn vl_take(
        &self,
        st: &mut State,
        breaking: &[u32],
        load_alloc: bool,
        patient: bool,
    ) -> Result<bool> {
        let (Some(sh), Some(m)) = (self.shared.get(), self.member.get()) else {
            return Ok(true);
        };
        if st.vl_held.is_some() {
            return Ok(true);
        }
        let me = m.holder();
        let ballots = crate::cluster::Ballots {
            vol: &self.vol(),
            member: m,
        };
        let mut wait = LockWait::new();
        let mut wanting = Wanting::none();
        let mut pause = std::time::Duration::from_micros(20);
        loop {
            m.check_lease()?;
            let current = self.current_holders(me);
            let members = |h: &locking::Holder| !breaking.contains(&h.slot) && current(h);
            match sh.vlock.try_acquire(me, &members, &ballots)? {
                locking::Attempt::Acquired { generation } => {
                    if st.cache_gen.is_none_or(|g| g + 1 != generation) {
                        // Someone else held it since: nothing cached is known good.
                        st.meta.clear();
                        st.alloc_stale = true;
                        self.refresh_volume(st)?;
                    }
                    st.vl_held = Some(generation);
                    st.vl_since = std::time::Instant::now();
                    st.cache_gen = Some(generation);
                    drop(wanting);
                    if st.alloc_stale && load_alloc {
                        st.alloc = Alloc::reload(&self.vol(), &mut st.meta, &st.alloc)?;
                        st.alloc_stale = false;
                    }
                    wait.got();
                    return Ok(true);
                }
                locking::Attempt::Busy(rec) => {
                    if !patient {
                        return Ok(false);
                    }
                    // Ask the holder to give it back after its operation.
                    wanting.start(m)?;
                    wait.still_waiting(
                        self,
                        m.timeouts.lease,
                        rec.holders.first().or(rec.next.as_ref()),
                    );
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_millis(2));
                }
                locking::Attempt::Collided => {
                    if !patient {
                        return Ok(false);
                    }
                    // Back off by slot so that colliding hosts separate.
                    std::thread::sleep(std::time::Duration::from_micros(
                        100 + 97 * u64::from(me.slot % 32),
                    ));
                }
            }
        }
    }

    /// Give the volume lock back after an operation when another host is
    /// mounted (`force`: in any case): commit and checkpoint first, so that
    /// the next holder reads everything in place and no replay of this
    /// host's journal can ever write over what it changes.
    fn vl_leave(&self, st: &mut State, force: bool) -> Result<()> {
        let (Some(sh), Some(m)) = (self.shared.get(), self.member.get()) else {
            return Ok(());
        };
        if st.vl_held.is_none() {
            return Ok(());
        }
        // Kept while no other host waits for it (sticky, group commit), and
        // for at least a quantum once taken: each hand-over costs a journal
        // commit and checkpoint, so a busy host does a few operations per turn.
        // Without a watcher nobody would notice a waiter while this host is
        // idle: then the lock goes back after every operation.
        let watched = sh.watched.load(std::sync::atomic::Ordering::SeqCst);
        let contended = sh.contended.load(std::sync::atomic::Ordering::SeqCst);
        let mut table = None;
        if !force {
            if !contended {
                return Ok(());
            }
            if watched {
                if st.vl_since.elapsed() < LOCK_QUANTUM {
                    return Ok(());
                }
                let t = crate::cluster::slot_table(&self.vol());
                if !Self::volume_lock_wanted(&t, m.slot) {
                    return Ok(());
                }
                table = Some(t);
            }
        }
        if !watched {
            // Nobody here would hand a file-block cluster to a host asking
            // for it: hold none between operations.
            st.alloc.release_all(&self.vol())?;
        }
        // A failed commit keeps the lock: what is on disk is uncertain,
        // and only a replay of this host's journal may fix it.
        let t0 = std::time::Instant::now();
        st.meta.checkpoint(&self.vol())?;
        // Every waiting host waits for this turn: say when it was long (a
        // slow operation, or a flush of the LUN that took this long).
        if contended && st.vl_since.elapsed() > m.timeouts.lease / 4 {
            tracing::warn!(
                "held the volume lock for {} ms, of which {} ms flushing the checkpoint to the LUN, while other hosts may wait",
                st.vl_since.elapsed().as_millis(),
                t0.elapsed().as_millis()
            );
        }
        // Handed to the next host that waits, in turn by slot: fair.
        let next = match table {
            Some(t) => Self::next_waiter(&t, m.slot),
            None if contended => {
                Self::next_waiter(&crate::cluster::slot_table(&self.vol()), m.slot)
            }
            None => None,
        };
        sh.vlock.release_to(m.holder(), next)?;
        st.vl_held = None;
        Ok(())
    }

    /// The live host that waits for the volume lock and comes first after
    /// slot `me` in slot order (wrapping): each waiting host gets the lock in
    /// turn, so none waits more than one turn of the others.
    fn next_waiter(table: &Result<Vec<HostSlot>>, me: u32) -> Option<locking::Holder> {
        let t = table.as_ref().ok()?;
        let n = t.len() as u32;
        (1..n).map(|k| (me + k) % n).find_map(|s| {
            let h = &t[s as usize];
            (h.state == crate::format::SLOT_LIVE && h.wants & 1 != 0).then_some(locking::Holder {
                slot: s,
                generation: h.generation,
            })
        })
    }

    /// Whether another live host says in `table` that it waits for the
    /// volume lock. A slot table that could not be read counts as yes (give
    /// the lock back).
    fn volume_lock_wanted(table: &Result<Vec<HostSlot>>, me: u32) -> bool {
        table.is_err() || Self::next_waiter(table, me).is_some()
    }

    /// Called between operations: if this host holds the volume lock while
    /// another waits for it, commit, checkpoint and give it back; give every
    /// file-block cluster another host asks for back (under the volume lock,
    /// after a checkpoint). Reads the heartbeat region at most once.
    pub fn yield_if_wanted(&self) -> Result<()> {
        let (Some(sh), Some(m)) = (self.shared.get(), self.member.get()) else {
            return Ok(());
        };
        if !sh.contended.load(std::sync::atomic::Ordering::SeqCst) || m.lease.is_fenced() {
            return Ok(());
        }
        let (held, vl_due): (Vec<u64>, bool) = {
            let st = self.lock();
            (
                st.alloc
                    .locks
                    .as_ref()
                    .map(|l| l.held.iter().copied().collect())
                    .unwrap_or_default(),
                st.vl_held.is_some() && st.vl_since.elapsed() >= LOCK_QUANTUM,
            )
        };
        if held.is_empty() {
            self.stop_yield_wants(m)?;
            if !vl_due {
                return Ok(());
            }
        }
        let table = crate::cluster::slot_table(&self.vol());
        let wanted: Vec<u64> = match &table {
            Ok(t) => t
                .iter()
                .enumerate()
                .filter(|(i, h)| {
                    *i as u32 != m.slot
                        && h.state == crate::format::SLOT_LIVE
                        && held.contains(&h.want_cluster)
                })
                .map(|(_, h)| h.want_cluster)
                .collect(),
            Err(_) => Vec::new(),
        };
        if wanted.is_empty() {
            self.stop_yield_wants(m)?;
        } else {
            // One try: this thread also recovers dead hosts, one of
            // which may be what holds the volume lock. Next tick again;
            // meanwhile this host says it waits, so that the lock is handed
            // to it in its turn.
            let mut st = self.lock();
            if !self.vl_take(&mut st, &[], true, false)? {
                if !self
                    .yield_wants
                    .swap(true, std::sync::atomic::Ordering::SeqCst)
                {
                    m.want_volume_lock()?;
                }
                return Ok(());
            }
            self.stop_yield_wants(m)?;
            let vol = self.vol();
            let r = wanted
                .iter()
                .try_for_each(|&a| st.alloc.yield_cluster(&vol, a));
            let left = self.vl_leave(&mut st, true);
            r?;
            left?;
            for a in wanted {
                tracing::debug!("gave file-block cluster {a:#x} to a host that waits for it");
            }
            return Ok(());
        }
        if vl_due && Self::volume_lock_wanted(&table, m.slot) {
            let mut st = self.lock();
            if st.vl_held.is_some() {
                self.vl_leave(&mut st, true)?;
            }
        }
        // An unreadable heartbeat region matters here only to hand-overs.
        if held.is_empty() {
            return Ok(());
        }
        table.map(|_| ())
    }

    /// The housekeeping thread no longer waits for the volume lock.
    fn stop_yield_wants(&self, m: &crate::cluster::Member) -> Result<()> {
        if self
            .yield_wants
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            m.unwant_volume_lock()?;
        }
        Ok(())
    }

    /// Give the volume lock back now if this host holds it.
    pub fn release_volume_lock(&self) -> Result<()> {
        let mut st = self.lock();
        self.vl_leave(&mut st, true)
    }

    /// Whether a lock holder is current (see [`crate::cluster::is_current`]),
    /// reading the slot table once, and only when asked about a host other
    /// than `me`. A table that cannot be read counts every holder as current
    /// (the safe side: wait, or refuse).
    fn current_holders(&self, me: locking::Holder) -> impl Fn(&locking::Holder) -> bool + '_ {
        let table = std::cell::OnceCell::new();
        move |h| {
            *h == me
                || match table.get_or_init(|| crate::cluster::slot_table(&self.vol()).ok()) {
                    Some(t) => crate::cluster::is_current(t, h),
                    None => true,
                }
        }
    }

    /// "host UUID (slot N)" for a lock holder.
    fn describe_holder(&self, h: &locking::Holder) -> String {
        match self.vol().read_slot(h.slot) {
            Ok(hs) => format!(
                "host {} (slot {}, generation {})",
                crate::volume::uuid_str(&hs.host),
                h.slot,
                h.generation
            ),
            Err(_) => format!("the host in slot {} (generation {})", h.slot, h.generation),
        }
    }

    /// Run a read-only `f` on metadata that is current. In cluster mode
    /// without the volume lock: the lock's sector is read before (waiting
    /// while another host holds it; the cache is dropped if its generation
    /// moved) and, if `f` read anything from disk, after; if it changed in
    /// between, `f` runs again on fresh blocks.
    pub fn read_op<R>(&self, mut f: impl FnMut(&mut State, &Volume) -> Result<R>) -> Result<R> {
        let mut st = self.lock();
        let (Some(sh), Some(m)) = (self.shared.get(), self.member.get()) else {
            return f(&mut st, &self.vol());
        };
        if st.vl_held.is_some() {
            return f(&mut st, &self.vol());
        }
        let me = m.holder();
        let mut pause = std::time::Duration::from_micros(20);
        let mut tries = 0u32;
        let mut wanting = Wanting::none();
        loop {
            let rec = sh.vlock.peek()?;
            let others: Vec<_> = rec.holders.iter().filter(|h| **h != me).collect();
            if rec.holders.is_empty() && rec.next == Some(me) {
                // Handed to this host (it said it waits): take it, read
                // under it, and pass it on, or every other host would wait
                // for the reservation to lapse.
                if self.vl_take(&mut st, &[], true, false)? {
                    drop(wanting);
                    let r = f(&mut st, &self.vol());
                    let left = self.vl_leave(&mut st, false);
                    let r = r?;
                    left?;
                    return Ok(r);
                }
            }
            if !others.is_empty() {
                let t = crate::cluster::slot_table(&self.vol())?;
                if others.iter().any(|h| crate::cluster::is_current(&t, h)) {
                    m.check_lease()?;
                    // A holder keeps the lock while nobody waits: say we do.
                    wanting.start(m)?;
                    // Let the state go while waiting (the housekeeping
                    // thread needs it to recover a holder that died).
                    drop(st);
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_millis(2));
                    st = self.lock();
                    if st.vl_held.is_some() {
                        return f(&mut st, &self.vol());
                    }
                    continue;
                }
            }
            if st.cache_gen != Some(rec.generation) {
                st.meta.clear();
                st.alloc_stale = true;
                st.cache_gen = Some(rec.generation);
                self.refresh_volume(&mut st)?;
            }
            drop(std::mem::replace(&mut wanting, Wanting::none()));
            let reads = st.meta.reads;
            let r = f(&mut st, &self.vol());
            if st.meta.reads == reads {
                return r;
            }
            let after = sh.vlock.peek()?;
            if after == rec {
                return r;
            }
            // Changed under us: what was read may be half old, half new.
            st.meta.clear();
            st.cache_gen = None;
            tries += 1;
            if tries > 1000 {
                return r;
            }
        }
    }

    fn reload_after_failure(st: &mut State, vol: &Volume) {
        match Alloc::load(vol, &mut st.meta) {
            Ok(mut a) => {
                a.keep_hints(&st.alloc);
                st.alloc = a;
            }
            Err(e) => tracing::error!("reloading allocation state after a failed operation: {e}"),
        }
    }

    pub(crate) fn file_data(&self, ino: u64) -> Arc<crate::leafmap::FileData> {
        self.data_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(ino)
            .or_default()
            .clone()
    }

    pub fn getattr(&self, ino: u64) -> Result<Inode> {
        self.read_op(|st, vol| st.iget(vol, ino))
    }

    pub fn lookup(&self, dir: u64, name: &[u8]) -> Result<Inode> {
        self.read_op(|st, _| self.lookup_locked(st, dir, name))
    }

    pub fn lookup_locked(&self, st: &mut State, dir: u64, name: &[u8]) -> Result<Inode> {
        if name.len() > NAME_MAX {
            return Err(posix(libc::ENAMETOOLONG));
        }
        let d = st.iget(&self.vol(), dir)?;
        if !d.is_dir() {
            return Err(posix(libc::ENOTDIR));
        }
        if name == b"." {
            return Ok(d);
        }
        if name == b".." {
            return st.iget(&self.vol(), d.parent);
        }
        match st.dir_lookup(&self.vol(), &d, name)? {
            Some(e) => st.iget(&self.vol(), e.fd),
            None => Err(posix(libc::ENOENT)),
        }
    }

    pub fn readdir(&self, dir: u64) -> Result<Vec<DirEntry>> {
        self.read_op(|st, vol| {
            let d = st.iget(vol, dir)?;
            if !d.is_dir() {
                return Err(posix(libc::ENOTDIR));
            }
            st.dir_list(vol, &d)
        })
    }

    fn check_name(name: &[u8]) -> Result<()> {
        if name.is_empty()
            || name == b"."
            || name == b".."
            || name.contains(&b'/')
            || name.contains(&0)
        {
            return Err(posix(libc::EINVAL));
        }
        if name.len() > NAME_MAX {
            return Err(posix(libc::ENAMETOOLONG));
        }
        Ok(())
    }

    /// Create a node of any type other than a directory.
    pub fn create(
        &self,
        dir: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        target: Option<&[u8]>,
    ) -> Result<Inode> {
        Self::check_name(name)?;
        self.op(|st, vol| {
            let mut d = st.iget(vol, dir)?;
            if !d.is_dir() {
                return Err(posix(libc::ENOTDIR));
            }
            if d.nlink == 0 {
                return Err(posix(libc::ENOENT));
            }
            if st.dir_lookup(vol, &d, name)?.is_some() {
                return Err(posix(libc::EEXIST));
            }
            let is_dir = mode & S_IFMT == S_IFDIR;
            let mut mode = mode;
            let gid = if d.mode & libc::S_ISGID != 0 {
                if is_dir {
                    mode |= libc::S_ISGID;
                }
                d.gid
            } else {
                gid
            };
            let mut ino = st.ialloc(vol, mode, uid, gid)?;
            ino.rdev = rdev;
            if is_dir {
                ino.nlink = 2;
                st.dir_init(vol, &mut ino, d.addr)?;
                d.nlink += 1;
            }
            if let Some(t) = target {
                st.write_locked(vol, &mut ino, 0, t)?;
            }
            st.iput(vol, &ino)?;
            st.dir_insert(vol, &mut d, name, ino.addr, kind_of(mode))?;
            let t = now();
            d.mtime = t;
            d.ctime = t;
            st.iput(vol, &d)?;
            Ok(ino)
        })
    }

    pub fn link(&self, ino: u64, dir: u64, name: &[u8]) -> Result<Inode> {
        Self::check_name(name)?;
        self.op(|st, vol| {
            let mut i = st.iget(vol, ino)?;
            if i.is_dir() {
                return Err(posix(libc::EPERM));
            }
            let mut d = st.iget(vol, dir)?;
            if !d.is_dir() {
                return Err(posix(libc::ENOTDIR));
            }
            if i.nlink >= 65000 {
                return Err(posix(libc::EMLINK));
            }
            if st.dir_lookup(vol, &d, name)?.is_some() {
                return Err(posix(libc::EEXIST));
            }
            st.dir_insert(vol, &mut d, name, i.addr, kind_of(i.mode))?;
            i.nlink += 1;
            let t = now();
            i.ctime = t;
            d.mtime = t;
            d.ctime = t;
            st.iput(vol, &i)?;
            st.iput(vol, &d)?;
            st.orphans.remove(&i.addr);
            Ok(i)
        })
    }

    /// Drop one link of `i`; free it when no link and no open handle remains.
    fn drop_link(st: &mut State, vol: &Volume, i: &mut Inode) -> Result<()> {
        i.nlink = i.nlink.saturating_sub(if i.is_dir() { 2 } else { 1 });
        i.ctime = now();
        if i.nlink == 0 {
            if st.open.get(&i.addr).copied().unwrap_or(0) > 0 {
                st.orphans.insert(i.addr);
                st.iput(vol, i)?;
            } else {
                st.ifree(vol, i)?;
            }
        } else {
            st.iput(vol, i)?;
        }
        Ok(())
    }

    pub fn unlink(&self, dir: u64, name: &[u8], rmdir: bool) -> Result<()> {
        if name == b"." {
            return Err(posix(libc::EINVAL));
        }
        if name == b".." {
            return Err(posix(libc::ENOTEMPTY));
        }
        self.op(|st, vol| {
            let mut d = st.iget(vol, dir)?;
            if !d.is_dir() {
                return Err(posix(libc::ENOTDIR));
            }
            let e = st
                .dir_lookup(vol, &d, name)?
                .ok_or_else(|| posix(libc::ENOENT))?;
            let mut i = st.iget(vol, e.fd)?;
            if rmdir {
                if !i.is_dir() {
                    return Err(posix(libc::ENOTDIR));
                }
                if st.dir_count(vol, &i)? > 0 {
                    return Err(posix(libc::ENOTEMPTY));
                }
                d.nlink -= 1;
            } else if i.is_dir() {
                return Err(posix(libc::EISDIR));
            } else if i.nlink <= 1 {
                self.check_not_open_elsewhere(i.addr, "remove the last name of")?;
            }
            st.dir_remove(vol, &mut d, name)?;
            let t = now();
            d.mtime = t;
            d.ctime = t;
            st.iput(vol, &d)?;
            Self::drop_link(st, vol, &mut i)
        })
    }

    /// Is `anc` an ancestor of (or equal to) `dir`?
    fn is_ancestor(
        st: &mut State,
        vol: &Volume,
        anc: u64,
        mut dir: u64,
        root: u64,
    ) -> Result<bool> {
        for _ in 0..100_000 {
            if dir == anc {
                return Ok(true);
            }
            if dir == root {
                return Ok(false);
            }
            dir = st.iget(vol, dir)?.parent;
        }
        Err(FsError::Invalid("directory parent chain loops".into()))
    }

    pub fn rename(
        &self,
        pdir: u64,
        name: &[u8],
        ndir: u64,
        nname: &[u8],
        noreplace: bool,
        exchange: bool,
    ) -> Result<()> {
        Self::check_name(nname)?;
        if name == b"." || name == b".." {
            return Err(posix(libc::EINVAL));
        }
        let root = self.root();
        self.op(|st, vol| {
            let mut src_dir = st.iget(vol, pdir)?;
            let e = st
                .dir_lookup(vol, &src_dir, name)?
                .ok_or_else(|| posix(libc::ENOENT))?;
            let mut dst_dir = if ndir == pdir {
                src_dir.clone()
            } else {
                st.iget(vol, ndir)?
            };
            if !dst_dir.is_dir() {
                return Err(posix(libc::ENOTDIR));
            }
            let mut src = st.iget(vol, e.fd)?;
            let existing = st.dir_lookup(vol, &dst_dir, nname)?;
            if src.is_dir() && Self::is_ancestor(st, vol, src.addr, ndir, root)? {
                return Err(posix(libc::EINVAL));
            }
            if let Some(x) = &existing {
                if x.fd == src.addr {
                    return Ok(()); // same file: nothing to do
                }
                if noreplace {
                    return Err(posix(libc::EEXIST));
                }
            } else if exchange {
                return Err(posix(libc::ENOENT));
            }
            let t = now();
            if exchange {
                let x = existing.expect("checked");
                let mut other = st.iget(vol, x.fd)?;
                if other.is_dir() && Self::is_ancestor(st, vol, other.addr, pdir, root)? {
                    return Err(posix(libc::EINVAL));
                }
                st.dir_remove(vol, &mut src_dir, name)?;
                if ndir == pdir {
                    st.dir_remove(vol, &mut src_dir, nname)?;
                    st.dir_insert(vol, &mut src_dir, nname, src.addr, kind_of(src.mode))?;
                    st.dir_insert(vol, &mut src_dir, name, other.addr, kind_of(other.mode))?;
                } else {
                    st.dir_remove(vol, &mut dst_dir, nname)?;
                    st.dir_insert(vol, &mut dst_dir, nname, src.addr, kind_of(src.mode))?;
                    st.dir_insert(vol, &mut src_dir, name, other.addr, kind_of(other.mode))?;
                    if src.is_dir() != other.is_dir() {
                        let (gain, lose) = if src.is_dir() {
                            (&mut dst_dir, &mut src_dir)
                        } else {
                            (&mut src_dir, &mut dst_dir)
                        };
                        gain.nlink += 1;
                        lose.nlink -= 1;
                    }
                    if src.is_dir() {
                        st.set_dotdot(vol, &mut src, ndir)?;
                    }
                    if other.is_dir() {
                        st.set_dotdot(vol, &mut other, pdir)?;
                    }
                }
                src.ctime = t;
                other.ctime = t;
                st.iput_renamed(vol, &src)?;
                st.iput_renamed(vol, &other)?;
            } else {
                if let Some(x) = &existing {
                    let mut victim = st.iget(vol, x.fd)?;
                    match (src.is_dir(), victim.is_dir()) {
                        (true, false) => return Err(posix(libc::ENOTDIR)),
                        (false, true) => return Err(posix(libc::EISDIR)),
                        (true, true) => {
                            if st.dir_count(vol, &victim)? > 0 {
                                return Err(posix(libc::ENOTEMPTY));
                            }
                        }
                        _ => {}
                    }
                    if !victim.is_dir() && victim.nlink <= 1 {
                        self.check_not_open_elsewhere(victim.addr, "replace")?;
                    }
                    st.dir_remove(vol, &mut dst_dir, nname)?;
                    if victim.is_dir() {
                        dst_dir.nlink -= 1;
                    }
                    Self::drop_link(st, vol, &mut victim)?;
                }
                if ndir == pdir {
                    st.dir_remove(vol, &mut dst_dir, name)?;
                } else {
                    st.dir_remove(vol, &mut src_dir, name)?;
                }
                st.dir_insert(vol, &mut dst_dir, nname, src.addr, kind_of(src.mode))?;
                if src.is_dir() && ndir != pdir {
                    src_dir.nlink -= 1;
                    dst_dir.nlink += 1;
                    st.set_dotdot(vol, &mut src, ndir)?;
                }
                src.ctime = t;
                st.iput_renamed(vol, &src)?;
            }
            if ndir != pdir {
                src_dir.mtime = t;
                src_dir.ctime = t;
                st.iput(vol, &src_dir)?;
            }
            dst_dir.mtime = t;
            dst_dir.ctime = t;
            st.iput(vol, &dst_dir)?;
            Ok(())
        })
    }

    pub fn setattr(&self, ino: u64, a: &SetAttr) -> Result<Inode> {
        let fd = self.file_data(ino);
        let _g = a
            .size
            .map(|_| fd.rw.write().unwrap_or_else(|p| p.into_inner()));
        // Sizes and times cached for the in-place path are forgotten.
        let _forget = Forget(&fd);
        self.op(|st, vol| {
            let mut i = st.iget(vol, ino)?;
            if a.size.is_some() && i.flags & FD_FLAG_RDM != 0 {
                return Err(FsError::Posix(
                    libc::EPERM,
                    format!("file {ino:#x} is a raw device mapping: its size is its LUN's"),
                ));
            }
            let t = now();
            if let Some(m) = a.mode {
                i.mode = (i.mode & S_IFMT) | (m & 0o7777);
            }
            if let Some(u) = a.uid {
                i.uid = u;
            }
            if let Some(g) = a.gid {
                i.gid = g;
            }
            if let Some(s) = a.size {
                if i.is_dir() {
                    return Err(posix(libc::EISDIR));
                }
                self.check_not_open_elsewhere(i.addr, "truncate")?;
                st.truncate(vol, &mut i, s)?;
                i.mtime = t;
            }
            if let Some(x) = a.atime {
                i.atime = x;
            }
            if let Some(x) = a.mtime {
                i.mtime = x;
            }
            i.ctime = a.ctime.unwrap_or(t);
            st.iput(vol, &i)?;
            Ok(i)
        })
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        self.read_op(|st, vol| {
            let i = st.iget(vol, ino)?;
            if i.mode & S_IFMT != S_IFLNK {
                return Err(posix(libc::EINVAL));
            }
            st.read_locked(vol, &i, 0, i.size as usize)
        })
    }

    /// Open a file; `write`: for writing. In cluster mode the file's lock
    /// is taken on disk: exclusive for writing (multi-writer when the file
    /// has that flag), shared for reading; a file another host holds in a
    /// mode that excludes this one is EBUSY, and the log names that host.
    /// Open file `ino` on this host: take its lock (exclusive for writing,
    /// shared for reading, or multi-writer); a raw device mapping also opens
    /// its LUN, or the open fails (ENXIO) and the lock is given back.
    pub fn open_file(&self, ino: u64, write: bool) -> Result<Inode> {
        self.open_file_as(ino, write, None)
    }

    /// Open `ino` in lock mode `mode` (None: as POSIX opens do, exclusive
    /// for writing unless the file is marked multi-writer).
    pub(crate) fn open_file_as(
        &self,
        ino: u64,
        write: bool,
        mode: Option<crate::file::LockMode>,
    ) -> Result<Inode> {
        let i = self.open_file_lock(ino, write, mode)?;
        if i.flags & FD_FLAG_RDM != 0 && !i.is_dir() {
            if let Err(e) = self.attach_mapping(&i) {
                let _ = self.release(ino, write);
                return Err(e);
            }
        }
        Ok(i)
    }

    fn open_file_lock(
        &self,
        ino: u64,
        write: bool,
        mode: Option<crate::file::LockMode>,
    ) -> Result<Inode> {
        use crate::file::LockMode;
        let check = |i: &Inode| {
            if mode == Some(LockMode::MultiWriter) && i.flags & FD_FLAG_MULTI_WRITER == 0 {
                return Err(FsError::Invalid(format!(
                    "file {:#x} is not marked multi-writer: mark it before opening it multi-writer",
                    i.addr
                )));
            }
            Ok(())
        };
        if self.shared.get().is_none() {
            let mut st = self.lock();
            let i = st.iget(&self.vol(), ino)?;
            check(&i)?;
            *st.open.entry(ino).or_default() += 1;
            let fd = self.file_data(ino);
            fd.set_holes_ok(true);
            fd.opened();
            return Ok(i);
        }
        let want = mode.map(|m| match m {
            LockMode::Exclusive => locking::Mode::Exclusive,
            LockMode::ReadOnly => locking::Mode::Shared,
            LockMode::MultiWriter => locking::Mode::MultiWriter,
        });
        self.op(|st, vol| {
            let i = st.iget(vol, ino)?;
            check(&i)?;
            if !i.is_dir() {
                self.lock_file(st, &i, write, want)?;
            }
            *st.open.entry(ino).or_default() += 1;
            self.file_data(ino).opened();
            Ok(i)
        })
    }

    /// Record one more open of `i` by this host, taking or strengthening
    /// its on-disk lock when needed (under the volume lock).
    fn lock_file(
        &self,
        st: &mut State,
        i: &Inode,
        write: bool,
        want: Option<locking::Mode>,
    ) -> Result<()> {
        use locking::Mode;
        let cur = st.flocks.get(&i.addr).copied();
        let want = want.unwrap_or(if !write {
            Mode::Shared
        } else if i.flags & FD_FLAG_MULTI_WRITER != 0 {
            Mode::MultiWriter
        } else {
            Mode::Exclusive
        });
        let mode = match (cur.map(|c| c.mode), want) {
            (None, w) => w,
            // An exclusive open asked of a file this host holds multi-writer.
            (Some(Mode::MultiWriter), Mode::Exclusive) => Mode::Exclusive,
            (Some(Mode::Exclusive), _) | (Some(Mode::MultiWriter), _) => cur.expect("some").mode,
            (Some(Mode::Shared), Mode::Shared) => Mode::Shared,
            (Some(_), w) => w,
        };
        if cur.map(|c| c.mode) != Some(mode) {
            let m = self.member.get().expect("cluster mode has a member");
            let me = m.holder();
            let (lun, off) = self.vol().lock_sector(i.addr)?;
            let members = self.current_holders(me);
            if let Err(held) = locking::acquire_under_volume_lock(&*lun, off, mode, me, &members)? {
                let who: Vec<String> = held
                    .holders
                    .iter()
                    .filter(|h| **h != me)
                    .map(|h| self.describe_holder(h))
                    .collect();
                let msg = format!(
                    "file descriptor {:#x} is open {} by {}; this host cannot open it {}",
                    i.addr,
                    held.mode.name(),
                    who.join(", "),
                    if write { "for writing" } else { "for reading" }
                );
                tracing::warn!("{msg}");
                return Err(FsError::Busy(msg));
            }
        }
        let e = st.flocks.entry(i.addr).or_insert(FileLock {
            mode,
            writers: 0,
            readers: 0,
        });
        e.mode = mode;
        if write {
            e.writers += 1;
        } else {
            e.readers += 1;
        }
        // Another host may fill holes only of a multi-writer file.
        self.file_data(i.addr)
            .set_holes_ok(mode != Mode::MultiWriter);
        Ok(())
    }

    /// One open of `addr` by this host ends: weaken or drop its lock.
    fn unlock_file(&self, st: &mut State, addr: u64, write: bool) -> Result<()> {
        use locking::Mode;
        let Some(mut fl) = st.flocks.get(&addr).copied() else {
            return Ok(());
        };
        if write {
            fl.writers = fl.writers.saturating_sub(1);
        } else {
            fl.readers = fl.readers.saturating_sub(1);
        }
        let m = self.member.get().expect("cluster mode has a member");
        let me = m.holder();
        let (lun, off) = self.vol().lock_sector(addr)?;
        if fl.writers == 0 && fl.readers == 0 {
            locking::release_under_volume_lock(&*lun, off, me)?;
            st.flocks.remove(&addr);
            return Ok(());
        }
        if fl.writers == 0 && fl.mode != Mode::Shared {
            // Only readers left: let other hosts read too.
            let all = |_: &locking::Holder| true;
            locking::release_under_volume_lock(&*lun, off, me)?;
            let _ = locking::acquire_under_volume_lock(&*lun, off, Mode::Shared, me, &all)?;
            fl.mode = Mode::Shared;
            self.file_data(addr).set_holes_ok(true);
        }
        st.flocks.insert(addr, fl);
        Ok(())
    }

    /// In cluster mode: EBUSY when a host other than this one holds the
    /// file open (removing its last name, truncating it or punching it
    /// would pull blocks from under that host's I/O).
    fn check_not_open_elsewhere(&self, addr: u64, what: &str) -> Result<()> {
        let Some(m) = self.member.get() else {
            return Ok(());
        };
        if self.shared.get().is_none() {
            return Ok(());
        }
        let me = m.holder();
        let (lun, off) = self.vol().lock_sector(addr)?;
        let rec = locking::read_lock(&*lun, off)?;
        let others: Vec<_> = rec.holders.iter().filter(|h| **h != me).collect();
        if others.is_empty() {
            return Ok(());
        }
        let table = crate::cluster::slot_table(&self.vol())?;
        let live: Vec<String> = others
            .into_iter()
            .filter(|h| crate::cluster::is_current(&table, h))
            .map(|h| self.describe_holder(h))
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        let msg = format!(
            "cannot {what} file descriptor {addr:#x}: it is open ({}) by {}",
            rec.mode.name(),
            live.join(", ")
        );
        tracing::warn!("{msg}");
        Err(FsError::Busy(msg))
    }

    /// The last close of an unlinked file frees it.
    pub fn release(&self, ino: u64, write: bool) -> Result<()> {
        self.detach_mapping(ino);
        if self.shared.get().is_some() {
            self.op(|st, _| self.unlock_file(st, ino, write))?;
        }
        let free = {
            let mut st = self.lock();
            let n = st.open.entry(ino).or_default();
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.open.remove(&ino);
                self.file_data(ino).closed();
                st.orphans.remove(&ino)
            } else {
                false
            }
        };
        if free {
            self.op(|st, vol| {
                let mut i = st.iget(vol, ino)?;
                if i.nlink == 0 {
                    st.ifree(vol, &mut i)?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    pub fn read(&self, ino: u64, off: u64, len: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        let n = self.read_into(ino, off, &mut out)?;
        out.truncate(n);
        Ok(out)
    }

    /// Read into the caller's buffer; returns the bytes read (short at EOF).
    /// An open raw device mapping reads its LUN.
    pub fn read_into(&self, ino: u64, off: u64, buf: &mut [u8]) -> Result<usize> {
        let fd = self.file_data(ino);
        self.read_with(&fd, ino, off, buf)
    }

    /// Before a write by a caller without CAP_FSETID: drop the file's
    /// set-user-ID bit, and its set-group-ID bit if it is group-executable,
    /// as the kernel does for a local filesystem (FUSE leaves this to the
    /// filesystem on direct-I/O handles). Costs nothing when neither is set.
    pub fn drop_setid_for_write(&self, ino: u64) -> Result<()> {
        fn setid(mode: u32) -> u32 {
            let mut kill = mode & libc::S_ISUID;
            if mode & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP {
                kill |= libc::S_ISGID;
            }
            if mode & S_IFMT == S_IFREG {
                kill
            } else {
                0
            }
        }
        if setid(self.getattr(ino)?.mode) == 0 {
            return Ok(());
        }
        self.op(|st, vol| {
            let mut i = st.iget(vol, ino)?;
            let kill = setid(i.mode);
            if kill != 0 {
                i.mode &= !kill;
                i.ctime = now();
                st.iput(vol, &i)?;
            }
            Ok(())
        })
    }

    /// Hint the LUNs that `len` bytes of file `ino` at `off` will be read
    /// soon (read-ahead for readers the kernel does not read ahead for).
    /// Holes, inline data and bytes past EOF are skipped; a failure only
    /// means no read-ahead.
    pub fn prefetch(&self, ino: u64, off: u64, len: u64) {
        if let Some((lun, _)) = self.mapped_lun(ino) {
            return lun.prefetch(off, len);
        }
        let segs = self.file_read_op(ino, |st, vol| {
            let i = st.iget(vol, ino)?;
            let n = i.size.saturating_sub(off).min(len) as usize;
            if i.is_dir() || i.layout == Layout::Inline || n == 0 {
                return Ok(Vec::new());
            }
            st.plan(vol, &i, off, n)
        });
        let vol = self.vol();
        for s in segs.unwrap_or_default() {
            if let Some(at) = s.at {
                vol.prefetch(at, s.len as u64);
            }
        }
    }

    /// What the file itself holds (a mapping's descriptor, not its LUN).
    pub fn read_stored(&self, ino: u64, off: u64, len: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        let n = self.read_into_stored(ino, off, &mut out)?;
        out.truncate(n);
        Ok(out)
    }

    fn read_into_stored(&self, ino: u64, off: u64, buf: &mut [u8]) -> Result<usize> {
        let fd = self.file_data(ino);
        let _g = fd.rw.read().unwrap_or_else(|p| p.into_inner());
        self.read_into_locked(ino, off, buf)
    }

    /// Read under the state lock (the caller holds the file's data lock).
    pub(crate) fn read_into_locked(&self, ino: u64, off: u64, buf: &mut [u8]) -> Result<usize> {
        let (n, segs) = self.file_read_op(ino, |st, vol| {
            let i = st.iget(vol, ino)?;
            if i.is_dir() {
                return Err(posix(libc::EISDIR));
            }
            st.read_prepare(vol, &i, off, buf)
        })?;
        fetch(&self.vol(), &segs, buf)?;
        Ok(n)
    }

    pub fn write(&self, ino: u64, off: u64, data: &[u8]) -> Result<Inode> {
        if let Some((lun, i)) = self.mapped_lun(ino) {
            // A mapping is exactly its LUN: no writing past its end.
            if off
                .checked_add(data.len() as u64)
                .is_none_or(|e| e > lun.size())
            {
                return Err(FsError::Posix(
                    libc::ENOSPC,
                    format!(
                        "write at {off} (+{} bytes) past the end of the mapped LUN ({} bytes)",
                        data.len(),
                        lun.size()
                    ),
                ));
            }
            lun.write_at(data, off)?;
            return Ok(i);
        }
        let fd = self.file_data(ino);
        let _g = fd.rw.read().unwrap_or_else(|p| p.into_inner());
        // Fast path: every byte lands in a written, mapped leaf: data moves
        // without the state lock, then the size and times are committed
        // (only if they changed: same size within one clock tick = nothing to do).
        if let Some((segs, unchanged)) = self.in_place_plan(ino, off, data.len())? {
            for s in &segs {
                self.vol()
                    .write(s.at.expect("mapped"), &data[s.buf_off..s.buf_off + s.len])?;
            }
            if let Some(i) = unchanged {
                return Ok(i);
            }
            return self.file_op(ino, |st, vol| {
                let mut i = st.iget(vol, ino)?;
                i.size = i.size.max(off + data.len() as u64);
                let t = now();
                i.mtime = t;
                i.ctime = t;
                st.iput(vol, &i)?;
                Ok(i)
            });
        }
        self.file_op(ino, |st, vol| {
            let mut i = st.iget(vol, ino)?;
            st.write_locked(vol, &mut i, off, data)?;
            let t = now();
            i.mtime = t;
            i.ctime = t;
            st.iput(vol, &i)?;
            Ok(i)
        })
    }

    /// Where a write of `len` bytes at `off` lands when every byte falls in
    /// a written, mapped leaf (no allocation, no metadata but size and
    /// times); with the inode when even those stay as they are. None when
    /// the write needs more.
    #[allow(clippy::type_complexity)]
    fn in_place_plan(
        &self,
        ino: u64,
        off: u64,
        len: usize,
    ) -> Result<Option<(Vec<Seg>, Option<Inode>)>> {
        let end = off
            .checked_add(len as u64)
            .ok_or_else(|| posix(libc::EFBIG))?;
        self.file_read_op(ino, |st, vol| {
            let i = st.iget(vol, ino)?;
            if i.is_dir() {
                return Err(posix(libc::EISDIR));
            }
            Ok(if i.layout == Layout::Inline || off > i.size {
                // Inline data is metadata; a write past EOF zeroes the gap first.
                None
            } else {
                let segs = st.plan(vol, &i, off, len)?;
                let t = now();
                let unchanged = end <= i.size && i.mtime == t && i.ctime == t;
                segs.iter()
                    .all(|s| s.at.is_some())
                    .then_some((segs, unchanged.then_some(i)))
            })
        })
    }

    /// Whether a write of `len` bytes at `off` to `ino` needs no block
    /// allocated (so it cannot fail for lack of space): the FUSE front end
    /// may then answer it before the bytes reach the LUN.
    pub fn writes_in_place(&self, ino: u64, off: u64, len: usize) -> Result<bool> {
        if self.mapped_lun(ino).is_some() {
            return Ok(false);
        }
        Ok(self.in_place_plan(ino, off, len)?.is_some())
    }

    /// fallocate: mode bits as in fallocate(2).
    pub fn fallocate(&self, ino: u64, off: u64, len: u64, mode: i32) -> Result<()> {
        if self.getattr(ino)?.flags & FD_FLAG_RDM != 0 {
            return Err(FsError::Posix(
                libc::EOPNOTSUPP,
                format!("file {ino:#x} is a raw device mapping: allocate on its LUN"),
            ));
        }
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        if mode
            & !(libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE)
            != 0
            || (punch && !keep)
            || (punch && zero)
        {
            return Err(posix(libc::EOPNOTSUPP));
        }
        if len == 0 {
            return Err(posix(libc::EINVAL));
        }
        let fd = self.file_data(ino);
        let _g = fd.rw.write().unwrap_or_else(|p| p.into_inner());
        let _forget = Forget(&fd);
        self.file_op(ino, |st, vol| {
            let mut i = st.iget(vol, ino)?;
            if i.is_dir() {
                return Err(posix(libc::EISDIR));
            }
            if punch || zero {
                self.check_not_open_elsewhere(i.addr, "punch a hole in")?;
                st.punch(vol, &mut i, off, len)?;
            }
            if !punch {
                st.preallocate(vol, &mut i, off, len, keep)?;
            }
            let t = now();
            i.mtime = t;
            i.ctime = t;
            st.iput(vol, &i)?;
            Ok(())
        })
    }

    pub fn usage(&self) -> Usage {
        let st = self.lock();
        let fds: Vec<_> = st
            .alloc
            .clusters
            .iter()
            .filter(|c| c.rtype == ResType::Fd)
            .collect();
        let fds_free: u64 = fds.iter().map(|c| u64::from(c.free)).sum();
        let fds_total: u64 = fds.iter().map(|c| u64::from(c.count)).sum();
        Usage {
            block_size: self.vol().block_size(),
            total_blocks: self.vol().header.total_blocks(),
            free_blocks: st.alloc.free_blocks(),
            fd_clusters: fds.len() as u64,
            fds_used: fds_total - fds_free,
            fds_free,
        }
    }

    /// The extents holding a file's data blocks.
    pub fn extents_of(&self, ino: u64) -> Result<std::collections::BTreeSet<usize>> {
        self.read_op(|st, vol| {
            let i = st.iget(vol, ino)?;
            let leaf = State::leaf_size(vol, &i);
            let mut out = std::collections::BTreeSet::new();
            for li in 0..i.size.div_ceil(leaf) {
                let p = st.get_ptr(vol, &i, li)?;
                if p != 0 {
                    out.insert(vol.locate((p & PTR_ADDR_MASK) * MD as u64)?.0);
                }
            }
            Ok(out)
        })
    }

    /// 4K addresses of a directory's header and first bucket.
    pub fn dir_blocks(&self, dir: u64) -> Result<(u64, u64)> {
        self.read_op(|st, vol| {
            let d = st.iget(vol, dir)?;
            Ok((st.dir_block_ro(vol, &d, 0)?, st.dir_block_ro(vol, &d, 1)?))
        })
    }

    /// Re-read allocation summaries (after fsck rewrote bitmaps).
    pub fn reload_alloc(&self) -> Result<()> {
        let mut st = self.lock();
        st.meta.clear();
        let mut a = Alloc::load(&self.vol(), &mut st.meta)?;
        a.keep_hints(&st.alloc);
        st.alloc = a;
        Ok(())
    }

    /// Grow by one extent. Mounted with other hosts, under the volume lock:
    /// they see the new configuration generation when they next take the
    /// lock or read (and every heartbeat), open the new LUN by the URL
    /// recorded in the header, check it, and use the new capacity.
    pub fn extend(&self, new: Arc<dyn lun::Lun>) -> Result<()> {
        let new = match self.member.get() {
            Some(m) => Arc::new(lun::FencedLun::new(new, m.lease.clone())) as Arc<dyn lun::Lun>,
            None => new,
        };
        let mut st = self.lock_with_volume_lock()?;
        let r = (|| -> Result<()> {
            self.refresh_volume(&mut st)?;
            let mut v = Volume::clone(&self.vol());
            v.extend(new)?;
            self.set_vol(v);
            let mut a = Alloc::load(&self.vol(), &mut st.meta)?;
            a.keep_hints(&st.alloc);
            st.alloc = a;
            Ok(())
        })();
        let left = self.vl_leave(&mut st, true);
        r?;
        left
    }

    /// In cluster mode: if another host added an extent (extent 0's header
    /// has a newer configuration), open the new LUNs by their recorded URLs,
    /// check them with the whole volume, and switch to the larger volume.
    /// A LUN this host cannot open leaves it on the old configuration, said
    /// in the log (its files there read as I/O errors here).
    fn refresh_volume(&self, st: &mut State) -> Result<bool> {
        let Some(m) = self.member.get() else {
            return Ok(false);
        };
        let cur = self.vol();
        let mut b = vec![0u8; MD];
        cur.luns[0].read_at(&mut b, 0)?;
        let Ok(h) = VolumeHeader::decode(&b, Some(0)) else {
            return Ok(false); // torn or damaged: the next look decides
        };
        if h.uuid != cur.header.uuid || h.config_gen <= cur.header.config_gen {
            return Ok(false);
        }
        let mut luns = cur.luns.clone();
        for (i, e) in h.extents.iter().enumerate().skip(luns.len()) {
            let url = h.urls.get(i).cloned().unwrap_or_default();
            let opened = if url.is_empty() {
                Err(format!("the header records no URL for extent {i}"))
            } else {
                lun::open_with(&url, m.timeouts.lun_options()).map_err(|e| e.to_string())
            };
            match opened {
                Ok(l) => luns
                    .push(Arc::new(lun::FencedLun::new(l, m.lease.clone())) as Arc<dyn lun::Lun>),
                Err(why) => {
                    let was = self
                        .unopened_gen
                        .swap(h.config_gen, std::sync::atomic::Ordering::SeqCst);
                    if was == h.config_gen {
                        return Ok(false);
                    }
                    tracing::error!(
                        "another host added extent {i} ({}) to the datastore, but this host cannot open it: {why}; remount with that LUN to use it",
                        crate::volume::uuid_str(&e.uuid)
                    );
                    return Ok(false);
                }
            }
        }
        let v = match Volume::open(luns) {
            Ok(v) => v,
            Err(e) => {
                let was = self
                    .unopened_gen
                    .swap(h.config_gen, std::sync::atomic::Ordering::SeqCst);
                if was != h.config_gen {
                    tracing::error!(
                        "another host extended the datastore (configuration {}), but the new volume does not check out here: {e}; staying on configuration {}",
                        h.config_gen,
                        cur.header.config_gen
                    );
                }
                return Ok(false);
            }
        };
        tracing::info!(
            "the datastore grew to {} extents ({} blocks): configuration generation {}",
            v.header.extents.len(),
            v.header.total_blocks(),
            v.header.config_gen
        );
        self.set_vol(v);
        st.alloc_stale = true;
        Ok(true)
    }
}
