//! What this host knows of one open file's block map, so that reads and
//! writes of blocks the file already has go to the LUN without the state
//! lock and without allocating: the in-place path of [`crate::file::File`]
//! (virtual disks, the backup proxy) and of the FUSE adapter.
//!
//! **What may be cached.** Only files laid out as a pointer tree of
//! file-block leaves (every file past 16 sub-blocks; inline and sub-block
//! files are small and take the locked path). A leaf is cached as
//! *mapped* (its logical byte address) when it is allocated and written,
//! and as a *hole* only while no other host can fill it (this host holds the
//! file exclusive or read-only shared, or the filesystem is not shared).
//! Unwritten (preallocated) leaves are never cached: the first write turns
//! them into written ones under the state lock.
//!
//! **Why a cached leaf stays true.** A mapped leaf moves or goes away only by
//! punch, truncate or free, which this host does under the file's data lock
//! held for writing (the in-place path holds it for reading) and which
//! another host may not do while this host has the file open (EBUSY, see
//! `check_not_open_elsewhere`). A cached hole is filled only by this host's
//! own allocating writes, which invalidate the leaves they touch.
//!
//! **Races with filling.** A miss is filled from metadata read under the
//! state lock, after which a concurrent invalidation may already have run.
//! Every invalidation takes the map's write lock and bumps `seq`; a filler
//! reads `seq` before it looks at the metadata, and stores only under the
//! map's read lock after checking `seq` has not moved. So an entry is
//! never older than the last invalidation, and a read that starts after a
//! write returned never sees a hole that write filled.
//!
//! **Size.** The map is sparse (chunks of 1024 leaves, at most 1024 chunks
//! per file; past that it starts over), so a read at the end of a huge thin
//! file costs one chunk.
//!
//! `size_lb` is a lower bound of the file's size: sizes shrink only under
//! the data lock held for writing (which invalidates everything), so a range
//! below it is inside the file.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::RwLock;

/// Unknown: ask the metadata.
const UNKNOWN: u64 = 0;
/// A hole (reads as zeros).
const HOLE: u64 = u64::MAX;
/// Leaves per chunk of the map: the map is sparse (a 64 TiB thin disk read
/// at its end costs one chunk, not a slot per leaf before it).
const CHUNK: u64 = 1024;
/// Chunks kept per file (8 MiB of entries; 4 TiB of file at 4 MiB blocks,
/// 1 TiB at 1 MiB): past it, the map starts over.
const MAX_CHUNKS: usize = 1024;

/// One leaf as the cache knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    Unknown,
    Hole,
    /// Logical byte address of the leaf's first byte.
    At(u64),
}

/// Per open file on this host: the data lock and the leaf cache.
#[derive(Default)]
pub struct FileData {
    /// Held for reading by reads and writes, for writing by anything that
    /// frees or moves the file's blocks (truncate, punch, fallocate, a
    /// change of layout).
    pub rw: RwLock<()>,
    map: RwLock<Leaves>,
    seq: AtomicU64,
    size_lb: AtomicU64,
    /// A hole may be cached (no other host can fill one).
    holes_ok: AtomicBool,
    /// The file is open on this host: only then is anything cached (a
    /// closed file may be freed and its descriptor reused).
    open: AtomicBool,
    /// The file times this host last stamped (packed; 0: none), so that
    /// in-place writes within one clock tick commit nothing.
    pub stamp: AtomicU64,
}

#[derive(Default)]
struct Leaves {
    /// Leaf size in bytes (0: nothing cached).
    leaf: u64,
    chunks: HashMap<u64, Box<[AtomicU64]>>,
}

impl Leaves {
    fn get(&self, li: u64) -> u64 {
        self.chunks
            .get(&(li / CHUNK))
            .map_or(UNKNOWN, |c| c[(li % CHUNK) as usize].load(SeqCst))
    }
}

/// A filler's ticket: the sequence number it started at.
pub struct Ticket(u64);

impl FileData {
    pub fn size_lb(&self) -> u64 {
        self.size_lb.load(SeqCst)
    }

    /// Call `f(leaf_index, leaf_size, Leaf)` for each leaf of
    /// `[off, off+len)` in order while `f` returns true; returns false at
    /// the first `f` that returned false, or (before calling `f` at all)
    /// when the range is not all known and inside `size_lb`. The map stays
    /// read-locked meanwhile, so no invalidation runs during the I/O `f`
    /// does (only fillers and invalidators wait for it).
    pub fn with_leaves(
        &self,
        off: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, Leaf) -> bool,
    ) -> bool {
        let Some(end) = off.checked_add(len) else {
            return false;
        };
        if end > self.size_lb.load(SeqCst) || len == 0 {
            return false;
        }
        let m = self.map.read().unwrap_or_else(|p| p.into_inner());
        if m.leaf == 0 {
            return false;
        }
        let (first, last) = (off / m.leaf, (end - 1) / m.leaf);
        // All known first: a half-done write is never left behind a miss.
        if (first..=last).any(|li| m.get(li) == UNKNOWN) {
            return false;
        }
        for li in first..=last {
            let leaf = match m.get(li) {
                UNKNOWN => return false,
                HOLE => Leaf::Hole,
                a => Leaf::At(a),
            };
            if !f(li, m.leaf, leaf) {
                return false;
            }
        }
        true
    }

    /// Start filling: the ticket to hand to [`FileData::fill`].
    pub fn ticket(&self) -> Ticket {
        Ticket(self.seq.load(SeqCst))
    }

    /// Store what the metadata said of leaves `first..` (leaf size `leaf`,
    /// file size `size`), unless an invalidation ran since `t`. Under the
    /// map's read lock, and invalidations take its write lock: the check
    /// of `t` and the stores cannot interleave with one.
    pub fn fill(&self, t: &Ticket, leaf: u64, size: u64, first: u64, leaves: &[Leaf]) {
        if !self.open.load(SeqCst) || leaves.is_empty() {
            return;
        }
        let holes_ok = self.holes_ok.load(SeqCst);
        let last = first.saturating_add(leaves.len() as u64 - 1);
        {
            let m = self.map.read().unwrap_or_else(|p| p.into_inner());
            let fits =
                m.leaf == leaf && (first / CHUNK..=last / CHUNK).all(|c| m.chunks.contains_key(&c));
            drop(m);
            if !fits {
                let mut m = self.map.write().unwrap_or_else(|p| p.into_inner());
                if self.seq.load(SeqCst) != t.0 {
                    return;
                }
                if m.leaf != leaf {
                    m.chunks.clear();
                    m.leaf = leaf;
                }
                let need = (first / CHUNK..=last / CHUNK)
                    .filter(|c| !m.chunks.contains_key(c))
                    .count();
                if m.chunks.len() + need > MAX_CHUNKS {
                    m.chunks.clear();
                }
                for c in first / CHUNK..=last / CHUNK {
                    m.chunks
                        .entry(c)
                        .or_insert_with(|| (0..CHUNK).map(|_| AtomicU64::new(UNKNOWN)).collect());
                }
            }
        }
        let m = self.map.read().unwrap_or_else(|p| p.into_inner());
        if m.leaf != leaf || self.seq.load(SeqCst) != t.0 {
            return;
        }
        for (k, l) in leaves.iter().enumerate() {
            let v = match *l {
                Leaf::At(a) if a != UNKNOWN && a != HOLE => a,
                Leaf::Hole if holes_ok => HOLE,
                _ => continue,
            };
            let li = first + k as u64;
            if let Some(c) = m.chunks.get(&(li / CHUNK)) {
                let _ = c[(li % CHUNK) as usize].compare_exchange(UNKNOWN, v, SeqCst, SeqCst);
            }
        }
        self.size_lb.fetch_max(size, SeqCst);
    }

    /// The file grew to at least `size` (an extending write of this host,
    /// which holds the data lock: nothing shrinks the file meanwhile).
    pub fn grew(&self, t: &Ticket, size: u64) {
        let _m = self.map.read().unwrap_or_else(|p| p.into_inner());
        if self.seq.load(SeqCst) == t.0 {
            self.size_lb.fetch_max(size, SeqCst);
        }
    }

    /// Forget leaves of `[off, off+len)` (an allocating write filled them).
    pub fn invalidate_range(&self, off: u64, len: u64) {
        let m = self.map.write().unwrap_or_else(|p| p.into_inner());
        self.seq.fetch_add(1, SeqCst);
        if m.leaf == 0 || len == 0 {
            return;
        }
        let last = (off.saturating_add(len) - 1) / m.leaf;
        let first = off / m.leaf;
        if last - first > (MAX_CHUNKS as u64) * CHUNK {
            drop(m);
            return self.invalidate();
        }
        for li in first..=last {
            if let Some(c) = m.chunks.get(&(li / CHUNK)) {
                c[(li % CHUNK) as usize].store(UNKNOWN, SeqCst);
            }
        }
    }

    /// Forget everything (truncate, punch, fallocate, times set, lock mode
    /// changed, last close).
    pub fn invalidate(&self) {
        let mut m = self.map.write().unwrap_or_else(|p| p.into_inner());
        self.seq.fetch_add(1, SeqCst);
        m.leaf = 0;
        m.chunks = HashMap::new();
        self.size_lb.store(0, SeqCst);
        self.stamp.store(0, SeqCst);
    }

    /// The file is open on this host (its first open).
    pub fn opened(&self) {
        self.open.store(true, SeqCst);
    }

    /// Its last open on this host ended: forget everything, cache nothing.
    pub fn closed(&self) {
        self.open.store(false, SeqCst);
        self.invalidate();
    }

    /// Whether holes may be cached; changing it forgets everything.
    pub fn set_holes_ok(&self, ok: bool) {
        if self.holes_ok.swap(ok, SeqCst) != ok {
            self.invalidate();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_cached_for_a_file_not_open_here() {
        let d = FileData::default();
        let t = d.ticket();
        d.fill(&t, 100, 200, 0, &[Leaf::At(1000)]);
        assert!(!d.with_leaves(0, 100, |_, _, _| true));
        d.opened();
        let t = d.ticket();
        d.fill(&t, 100, 200, 0, &[Leaf::At(1000)]);
        assert!(d.with_leaves(0, 100, |_, _, _| true));
        d.closed();
        assert!(!d.with_leaves(0, 100, |_, _, _| true));
    }

    #[test]
    fn filled_leaves_are_found_and_invalidation_forgets_them() {
        let d = FileData::default();
        d.opened();
        d.set_holes_ok(true);
        assert!(!d.with_leaves(0, 10, |_, _, _| true));
        let t = d.ticket();
        d.fill(
            &t,
            100,
            300,
            0,
            &[Leaf::At(1000), Leaf::Hole, Leaf::At(5000)],
        );
        let mut seen = Vec::new();
        assert!(d.with_leaves(50, 200, |li, l, x| {
            seen.push((li, l, x));
            true
        }));
        assert_eq!(
            seen,
            vec![
                (0, 100, Leaf::At(1000)),
                (1, 100, Leaf::Hole),
                (2, 100, Leaf::At(5000))
            ]
        );
        // Past the known size: not from the cache.
        assert!(!d.with_leaves(250, 100, |_, _, _| true));
        d.invalidate_range(150, 10);
        assert!(!d.with_leaves(0, 300, |_, _, _| true));
        assert!(d.with_leaves(0, 100, |_, _, _| true));
        d.invalidate();
        assert!(!d.with_leaves(0, 100, |_, _, _| true));
    }

    #[test]
    fn a_read_far_into_a_huge_file_costs_one_chunk() {
        let d = FileData::default();
        d.opened();
        let t = d.ticket();
        d.fill(&t, 1 << 20, 1 << 62, 1 << 40, &[Leaf::At(4096)]);
        assert!(d.with_leaves(1 << 60, 100, |_, _, _| true));
        assert_eq!(d.map.read().unwrap().chunks.len(), 1);
    }

    #[test]
    fn a_fill_that_raced_an_invalidation_stores_nothing() {
        let d = FileData::default();
        d.opened();
        let t = d.ticket();
        d.invalidate_range(0, 1);
        d.fill(&t, 100, 200, 0, &[Leaf::At(1000), Leaf::At(2000)]);
        assert!(!d.with_leaves(0, 100, |_, _, _| true));
        assert_eq!(d.size_lb(), 0);
    }

    #[test]
    fn holes_are_cached_only_when_no_other_host_can_fill_them() {
        let d = FileData::default();
        d.opened();
        let t = d.ticket();
        d.fill(&t, 100, 200, 0, &[Leaf::Hole, Leaf::At(2000)]);
        assert!(!d.with_leaves(0, 100, |_, _, _| true));
        assert!(d.with_leaves(100, 100, |_, _, _| true));
    }
}
