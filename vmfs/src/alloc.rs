//! Allocation of file blocks (per-extent file-block clusters) and of small
//! resources (file descriptors, sub-blocks, pointer blocks) kept in resource
//! clusters listed in the resource table. Each cluster has its own bitmap and
//! lock sector; a host keeps allocating near where it last did (affinity).
//!
//! **Cluster mode** ([`Locks`]): a host allocates file blocks only from
//! file-block clusters whose lock it holds (exclusive, in the cluster
//! block's lock sector). It takes a cluster's lock under the volume lock and
//! keeps it: while it holds it, it may allocate from it — and free into it —
//! without the volume lock (a write growing a file it holds open alone).
//! A cluster nobody holds may be changed by whoever holds the volume lock.
//! A cluster another live host holds is changed by nobody else: an
//! operation that must free into it (or finds no other cluster with room)
//! stops with `FsError::Retry` (a cluster busy), asks for it in its heartbeat slot and
//! waits; the holder gives it back. So no two hosts ever change one bitmap,
//! and no block is ever handed out twice. Resource clusters stay under the
//! volume lock.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::error::{FsError, Result};
use crate::format::*;
use crate::txn::Meta;
use crate::volume::Volume;

/// In the cluster block at `addr`, take the first clear bit whose resource
/// (4K address `key(j)`) no uncommitted operation has freed: mark it used and
/// return its index and the cluster's new free count. None when there is none.
fn take_bit(
    vol: &Volume,
    meta: &mut Meta,
    addr: u64,
    magic: u32,
    count: u32,
    key: impl Fn(usize) -> u64,
) -> Result<Option<(usize, u32)>> {
    meta.get(vol, addr, magic)?; // read and verified
    let found = {
        let body = &meta.peek(addr).expect("brought in above")[LOCK_SECTOR..];
        let (n, mut j) = (count as usize, 0);
        loop {
            if j >= n {
                break None;
            }
            if j % 8 == 0 && body[CL_BITMAP + j / 8] == 0xff {
                j += 8; // a full byte: nothing free here
                continue;
            }
            if !bit_get(&body[CL_BITMAP..], j) && !meta.is_pending_free(key(j)) {
                break Some(j);
            }
            j += 1;
        }
    };
    let Some(j) = found else { return Ok(None) };
    let body = &mut meta.get_mut(vol, addr, magic)?[LOCK_SECTOR..];
    bit_set(&mut body[CL_BITMAP..], j, true);
    let free = get32(body, CL_FREE) - 1;
    put32(body, CL_FREE, free);
    Ok(Some((j, free)))
}

#[derive(Debug, Clone)]
pub struct Fbc {
    pub addr: u64,
    pub first: u64,
    pub count: u32,
    pub free: u32,
}

#[derive(Debug, Clone)]
pub struct RCluster {
    pub addr: u64,
    pub rtype: ResType,
    pub res_size: u32,
    pub count: u32,
    pub free: u32,
}

/// Cluster mode: the file-block clusters this host holds the lock of.
#[derive(Debug, Clone)]
pub struct Locks {
    pub me: locking::Holder,
    /// 4K addresses of the file-block clusters this host holds.
    pub held: BTreeSet<u64>,
    /// Clusters given back to a host that asked, and when: taken again only
    /// when no other cluster will do for [`YIELD_GRACE`] (the asker must get
    /// its turn).
    yielded: HashMap<u64, Instant>,
    /// The running operation holds the volume lock.
    vl: bool,
    /// The running operation's view of the heartbeat slots (read once).
    table: Option<Vec<HostSlot>>,
    /// Clusters the running operation found nobody else holds.
    unheld_ok: HashSet<u64>,
}

/// How long a cluster given back to a waiting host is left to it.
const YIELD_GRACE: Duration = Duration::from_secs(1);

impl Locks {
    pub fn new(me: locking::Holder) -> Locks {
        Locks {
            me,
            held: BTreeSet::new(),
            yielded: HashMap::new(),
            vl: false,
            table: None,
            unheld_ok: HashSet::new(),
        }
    }
}

#[derive(Default)]
pub struct Alloc {
    pub fbc: Vec<Fbc>,
    pub clusters: Vec<RCluster>,
    pub rt_blocks: Vec<u64>,
    fb_hint: usize,
    res_hint: [usize; 4],
    /// Cluster mode (mounted with other hosts possible).
    pub locks: Option<Locks>,
}

impl Alloc {
    /// Read every cluster summary. Verifies every allocation block it reads.
    pub fn load(vol: &Volume, meta: &mut Meta) -> Result<Alloc> {
        let mut a = Alloc::default();
        a.load_fbcs(vol, meta)?;
        a.load_resources(vol, meta)?;
        Ok(a)
    }

    /// After another host held the volume lock: re-read what it may have
    /// changed. In cluster mode the file-block cluster summaries stay (those
    /// this host holds are exact; the others are hints, re-read when they
    /// fail it) unless an extent was added; the resource clusters, which
    /// only the volume lock guards, are re-read.
    pub fn reload(vol: &Volume, meta: &mut Meta, old: &Alloc) -> Result<Alloc> {
        let covered = old.fbc.last().map(|c| c.first + u64::from(c.count));
        if old.locks.is_none() || covered != Some(vol.header.total_blocks()) {
            let mut a = Alloc::load(vol, meta)?;
            a.keep_hints(old);
            return Ok(a);
        }
        let mut a = Alloc {
            fbc: old.fbc.clone(),
            ..Alloc::default()
        };
        a.load_resources(vol, meta)?;
        a.keep_hints(old);
        Ok(a)
    }

    fn load_fbcs(&mut self, vol: &Volume, meta: &mut Meta) -> Result<()> {
        let a = self;
        for (i, e) in vol.header.extents.iter().enumerate() {
            let base = vol.extent_addr(i) + u64::from(e.fbc_off) / MD as u64;
            let per = vol.fbc_blocks();
            for k in 0..e.nblocks.div_ceil(per) {
                let addr = base + k;
                let b = &meta.get(vol, addr, MAGIC_FBC)?[LOCK_SECTOR..];
                let (first, count, free) =
                    (get64(b, CL_FIRST), get32(b, CL_COUNT), get32(b, CL_FREE));
                let want_first = e.first_block + k * per;
                if first != want_first
                    || u64::from(count) != (e.nblocks - k * per).min(per)
                    || free > count
                {
                    let (lun, off) = vol.where_is(addr * MD as u64);
                    return Err(corrupt(&lun, off, format!("file-block cluster {addr:#x}"), format!("covers {count} blocks from {first} with {free} free; expected blocks from {want_first}")));
                }
                a.fbc.push(Fbc {
                    addr,
                    first,
                    count,
                    free,
                });
            }
        }
        Ok(())
    }

    fn load_resources(&mut self, vol: &Volume, meta: &mut Meta) -> Result<()> {
        let a = self;
        let rt0 = vol.header.rt_off / MD as u64;
        for k in 0..u64::from(vol.header.rt_blocks) {
            a.rt_blocks.push(rt0 + k);
            let b = meta.get(vol, rt0 + k, MAGIC_RTABLE)?[LOCK_SECTOR..].to_vec();
            let n = get32(&b, 32) as usize;
            if n > RT_ENTRIES {
                let (lun, off) = vol.where_is((rt0 + k) * MD as u64);
                return Err(corrupt(
                    &lun,
                    off,
                    format!("resource table block {}", k),
                    format!("{n} entries, at most {RT_ENTRIES}"),
                ));
            }
            for j in 0..n {
                let addr = get64(&b, 40 + j * 8);
                let c = Self::read_cluster(vol, meta, addr)?;
                a.clusters.push(c);
            }
        }
        Ok(())
    }

    fn read_cluster(vol: &Volume, meta: &mut Meta, addr: u64) -> Result<RCluster> {
        let bad = |why: String| {
            let (lun, off) = vol.where_is(addr * MD as u64);
            corrupt(&lun, off, format!("resource cluster {addr:#x}"), why)
        };
        if addr % vol.blocks_per_4k() != 0 {
            return Err(bad("resource table points inside a file block".into()));
        }
        let b = &meta.get(vol, addr, MAGIC_RCLUSTER)?[LOCK_SECTOR..];
        let rtype = ResType::from_u32(get32(b, CL_FIRST))
            .ok_or_else(|| bad(format!("unknown resource type {}", get32(b, CL_FIRST))))?;
        let res_size = get32(b, CL_FIRST + 4);
        let (count, free) = (get32(b, CL_COUNT), get32(b, CL_FREE));
        if res_size != Self::res_size(vol, rtype)
            || u64::from(count) != Self::res_count(vol, rtype)
            || free > count
        {
            return Err(bad(format!(
                "{} cluster with size {res_size}, count {count}, free {free}",
                rtype.name()
            )));
        }
        Ok(RCluster {
            addr,
            rtype,
            res_size,
            count,
            free,
        })
    }

    /// Keep allocating where an earlier view of the volume did (after a
    /// reload): hosts stay in "their" clusters.
    pub fn keep_hints(&mut self, old: &Alloc) {
        self.locks = old.locks.clone();
        self.fb_hint = old.fb_hint.min(self.fbc.len().saturating_sub(1));
        for (h, o) in self.res_hint.iter_mut().zip(old.res_hint) {
            *h = o.min(self.clusters.len().saturating_sub(1));
        }
    }

    /// Spread hosts over the file-block clusters: host slot `slot` of
    /// `hosts` starts its search at its share of them.
    pub fn set_affinity(&mut self, slot: u32, hosts: u32) {
        let n = self.fbc.len();
        if n > 0 && hosts > 0 {
            self.fb_hint = (slot as usize * n) / hosts as usize;
        }
    }

    pub fn res_size(vol: &Volume, t: ResType) -> u32 {
        match t {
            ResType::SubBlock => vol.header.sub_block_size,
            _ => MD as u32,
        }
    }
    pub fn res_count(vol: &Volume, t: ResType) -> u64 {
        (vol.block_size() - MD as u64) / u64::from(Self::res_size(vol, t))
    }

    pub fn free_blocks(&self) -> u64 {
        self.fbc.iter().map(|f| u64::from(f.free)).sum()
    }

    /// Allocate one file block; returns its logical block number. When the
    /// only free blocks are ones whose free is not final yet, checkpoint and
    /// retry: a full disk still frees space, it only takes a checkpoint.
    pub fn alloc_fb(&mut self, vol: &Volume, meta: &mut Meta) -> Result<u64> {
        match self.alloc_fb_once(vol, meta) {
            Err(FsError::NoSpace(_)) if meta.has_pending_free() => {
                meta.checkpoint(vol)?;
                self.alloc_fb_once(vol, meta)
            }
            r => r,
        }
    }

    fn alloc_fb_once(&mut self, vol: &Volume, meta: &mut Meta) -> Result<u64> {
        if self.locks.is_some() {
            return self.alloc_fb_locked(vol, meta);
        }
        let n = self.fbc.len();
        for step in 0..n {
            let ci = (self.fb_hint + step) % n;
            if self.fbc[ci].free == 0 {
                continue;
            }
            if let Some(b) = self.take_from(vol, meta, ci)? {
                return Ok(b);
            }
        }
        Err(self.no_space())
    }

    fn no_space(&self) -> FsError {
        FsError::NoSpace(format!(
            "all {} file blocks are in use",
            self.fbc.iter().map(|f| u64::from(f.count)).sum::<u64>()
        ))
    }

    /// Take a free block of file-block cluster `ci`, if it has one.
    fn take_from(&mut self, vol: &Volume, meta: &mut Meta, ci: usize) -> Result<Option<u64>> {
        let c = self.fbc[ci].clone();
        let bpk = vol.blocks_per_4k();
        let r = take_bit(vol, meta, c.addr, MAGIC_FBC, c.count, |j| {
            (c.first + j as u64) * bpk
        })?;
        Ok(r.map(|(j, free)| {
            self.fbc[ci].free = free;
            self.fb_hint = ci;
            c.first + j as u64
        }))
    }

    /// Cluster mode: from a cluster this host holds; else (under the volume
    /// lock only) take the lock of another with room, preferring those near
    /// where this host last allocated and not just given to a host that
    /// asked for them.
    fn alloc_fb_locked(&mut self, vol: &Volume, meta: &mut Meta) -> Result<u64> {
        let n = self.fbc.len();
        for step in 0..n {
            let ci = (self.fb_hint + step) % n;
            if self.fbc[ci].free > 0 && self.holds(ci) {
                if let Some(b) = self.take_from(vol, meta, ci)? {
                    return Ok(b);
                }
            }
        }
        self.need_volume_lock()?;
        // A full cluster is no use to keep.
        for ci in 0..n {
            if self.fbc[ci].free == 0 && self.holds(ci) {
                self.release_cluster(vol, self.fbc[ci].addr)?;
            }
        }
        let mut busy = None;
        for attempt in 0..2 {
            let mut order: Vec<usize> = (0..n)
                .map(|s| (self.fb_hint + s) % n)
                .filter(|&ci| self.fbc[ci].free > 0 && !self.holds(ci))
                .collect();
            order.sort_by_key(|&ci| self.recently_yielded(self.fbc[ci].addr));
            for ci in order {
                match self.take_cluster(vol, meta, ci)? {
                    Err(slot) => {
                        busy.get_or_insert((self.fbc[ci].addr, slot));
                    }
                    Ok(()) => {
                        if let Some(b) = self.take_from(vol, meta, ci)? {
                            return Ok(b);
                        }
                        self.release_cluster(vol, self.fbc[ci].addr)?;
                    }
                }
            }
            if attempt == 0 {
                // Other hosts' clusters change without the volume lock:
                // their free counts here may be old.
                self.refresh_unheld(vol, meta)?;
            }
        }
        match busy {
            Some((addr, slot)) => Err(FsError::cluster_busy(addr, slot)),
            None => Err(self.no_space()),
        }
    }

    fn holds(&self, ci: usize) -> bool {
        self.locks
            .as_ref()
            .is_some_and(|l| l.held.contains(&self.fbc[ci].addr))
    }

    fn recently_yielded(&self, addr: u64) -> bool {
        self.locks.as_ref().is_some_and(|l| {
            l.yielded
                .get(&addr)
                .is_some_and(|t| t.elapsed() < YIELD_GRACE)
        })
    }

    /// In cluster mode, an operation without the volume lock may not go on.
    fn need_volume_lock(&self) -> Result<()> {
        match &self.locks {
            Some(l) if !l.vl => Err(FsError::need_volume_lock()),
            _ => Ok(()),
        }
    }

    /// Start of an operation (cluster mode): whether it holds the volume lock.
    pub fn begin_op(&mut self, vl: bool) {
        if let Some(l) = &mut self.locks {
            l.vl = vl;
            l.table = None;
            l.unheld_ok.clear();
        }
    }

    /// The heartbeat slots as this operation first read them.
    fn slots(&mut self, vol: &Volume) -> Result<&[HostSlot]> {
        let l = self.locks.as_mut().expect("cluster mode");
        if l.table.is_none() {
            l.table = Some(crate::cluster::slot_table(vol)?);
        }
        Ok(l.table.as_deref().expect("read above"))
    }

    /// Cluster mode, before changing the cluster block at `addr`: the slot
    /// of a live host other than this one that holds it (nobody may change
    /// it then). One this host does not hold needs the volume lock, and is
    /// read afresh the first time an operation changes it.
    fn other_holder(&mut self, vol: &Volume, meta: &mut Meta, addr: u64) -> Result<Option<u32>> {
        let Some(l) = &self.locks else {
            return Ok(None);
        };
        if l.held.contains(&addr) || l.unheld_ok.contains(&addr) {
            return Ok(None);
        }
        self.need_volume_lock()?;
        let me = l.me;
        let (lun, off) = vol.lock_sector(addr)?;
        let rec = locking::read_lock(&*lun, off)?;
        let table = self.slots(vol)?;
        let other = rec
            .holders
            .iter()
            .find(|h| **h != me && crate::cluster::is_current(table, h))
            .map(|h| h.slot);
        if other.is_none() {
            self.locks
                .as_mut()
                .expect("cluster mode")
                .unheld_ok
                .insert(addr);
            meta.uncache(addr);
        }
        Ok(other)
    }

    /// Take the lock of file-block cluster `ci` (volume lock held) and read
    /// its block afresh (its last holder changed it without the volume
    /// lock). Ok(Err(slot)): the live host in `slot` holds it.
    fn take_cluster(
        &mut self,
        vol: &Volume,
        meta: &mut Meta,
        ci: usize,
    ) -> Result<std::result::Result<(), u32>> {
        let addr = self.fbc[ci].addr;
        let me = self.locks.as_ref().expect("cluster mode").me;
        let (lun, off) = vol.lock_sector(addr)?;
        let table = self.slots(vol)?;
        let members = |h: &locking::Holder| *h == me || crate::cluster::is_current(table, h);
        if let Err(rec) =
            locking::acquire_under_volume_lock(&*lun, off, locking::Mode::Exclusive, me, &members)?
        {
            let slot = rec
                .holders
                .iter()
                .find(|h| **h != me)
                .map_or(u32::MAX, |h| h.slot);
            return Ok(Err(slot));
        }
        self.locks.as_mut().expect("cluster mode").held.insert(addr);
        tracing::debug!("took the lock of file-block cluster {addr:#x}");
        meta.uncache(addr);
        let free = get32(&meta.get(vol, addr, MAGIC_FBC)?[LOCK_SECTOR..], CL_FREE);
        if free > self.fbc[ci].count {
            let (lun, off) = vol.where_is(addr * MD as u64);
            return Err(corrupt(
                &lun,
                off,
                format!("file-block cluster {addr:#x}"),
                format!("{free} blocks free of {}", self.fbc[ci].count),
            ));
        }
        self.fbc[ci].free = free;
        Ok(Ok(()))
    }

    /// Give back the lock of file-block cluster `addr` (volume lock held;
    /// the caller checkpoints before it gives that back, so the next
    /// holder reads every change in place).
    pub fn release_cluster(&mut self, vol: &Volume, addr: u64) -> Result<()> {
        let Some(l) = &self.locks else {
            return Ok(());
        };
        if !l.held.contains(&addr) {
            return Ok(());
        }
        let me = l.me;
        let (lun, off) = vol.lock_sector(addr)?;
        locking::release_under_volume_lock(&*lun, off, me)?;
        self.locks
            .as_mut()
            .expect("cluster mode")
            .held
            .remove(&addr);
        tracing::debug!("gave back the lock of file-block cluster {addr:#x}");
        Ok(())
    }

    /// Give cluster `addr` to a host that asked for it (volume lock held):
    /// it is not taken again for a while unless nothing else will do.
    pub fn yield_cluster(&mut self, vol: &Volume, addr: u64) -> Result<()> {
        self.release_cluster(vol, addr)?;
        if let Some(l) = &mut self.locks {
            l.yielded.retain(|_, t| t.elapsed() < YIELD_GRACE);
            l.yielded.insert(addr, Instant::now());
        }
        Ok(())
    }

    /// Give back every cluster lock (volume lock held).
    pub fn release_all(&mut self, vol: &Volume) -> Result<()> {
        let held: Vec<u64> = self
            .locks
            .as_ref()
            .map(|l| l.held.iter().copied().collect())
            .unwrap_or_default();
        for a in held {
            self.release_cluster(vol, a)?;
        }
        Ok(())
    }

    /// Re-read from disk the free counts of the file-block clusters this
    /// host does not hold (other hosts change theirs without the volume lock).
    pub fn refresh_unheld(&mut self, vol: &Volume, meta: &mut Meta) -> Result<()> {
        for ci in 0..self.fbc.len() {
            if self.holds(ci) {
                continue;
            }
            let b = meta.read_fresh(vol, self.fbc[ci].addr, MAGIC_FBC)?;
            let free = get32(&b[LOCK_SECTOR..], CL_FREE);
            if free <= self.fbc[ci].count {
                self.fbc[ci].free = free;
            }
        }
        Ok(())
    }

    /// Allocate `n` contiguous file blocks within one cluster (a journal);
    /// returns the first logical block number.
    pub fn alloc_run(&mut self, vol: &Volume, meta: &mut Meta, n: u64) -> Result<u64> {
        // A run may go on from one cluster into the next when their blocks
        // follow each other (never across extents: an extent starts with
        // its metadata blocks, in use), through clusters no other current
        // host holds.
        let (mut start, mut len) = (0u64, 0u64);
        let mut prev_end = None;
        let mut found = None;
        'clusters: for ci in 0..self.fbc.len() {
            let c = self.fbc[ci].clone();
            let usable = c.free > 0 && self.other_holder(vol, meta, c.addr)?.is_none();
            if !usable || prev_end != Some(c.first) {
                len = 0;
            }
            if !usable {
                prev_end = None;
                continue;
            }
            let body = &meta.get(vol, c.addr, MAGIC_FBC)?[LOCK_SECTOR..];
            for j in 0..c.count as usize {
                if bit_get(&body[CL_BITMAP..], j) {
                    len = 0;
                    continue;
                }
                if len == 0 {
                    start = c.first + j as u64;
                }
                len += 1;
                if len == n {
                    found = Some(start);
                    break 'clusters;
                }
            }
            prev_end = Some(c.first + u64::from(c.count));
        }
        let Some(start) = found else {
            return Err(FsError::NoSpace(format!(
                "no run of {n} contiguous free file blocks for a journal"
            )));
        };
        for ci in 0..self.fbc.len() {
            let c = self.fbc[ci].clone();
            let (lo, hi) = (
                start.max(c.first),
                (start + n).min(c.first + u64::from(c.count)),
            );
            if lo >= hi {
                continue;
            }
            let b = meta.get_mut(vol, c.addr, MAGIC_FBC)?;
            let body = &mut b[LOCK_SECTOR..];
            for blk in lo..hi {
                bit_set(&mut body[CL_BITMAP..], (blk - c.first) as usize, true);
            }
            let free = get32(body, CL_FREE) - (hi - lo) as u32;
            put32(body, CL_FREE, free);
            self.fbc[ci].free = free;
        }
        Ok(start)
    }

    pub fn free_fb(&mut self, vol: &Volume, meta: &mut Meta, lbn: u64) -> Result<()> {
        let ci = self.fbc.partition_point(|f| f.first <= lbn).checked_sub(1);
        let Some(ci) = ci.filter(|&ci| lbn < self.fbc[ci].first + u64::from(self.fbc[ci].count))
        else {
            return Err(FsError::Invalid(format!(
                "freeing block {lbn} outside the volume"
            )));
        };
        let c = self.fbc[ci].clone();
        if let Some(slot) = self.other_holder(vol, meta, c.addr)? {
            return Err(FsError::cluster_busy(c.addr, slot));
        }
        let b = meta.get_mut(vol, c.addr, MAGIC_FBC)?;
        let body = &mut b[LOCK_SECTOR..];
        let j = (lbn - c.first) as usize;
        if !bit_get(&body[CL_BITMAP..], j) {
            let (lun, off) = vol.where_is(c.addr * MD as u64);
            return Err(corrupt(
                &lun,
                off,
                format!("file-block cluster {:#x}", c.addr),
                format!("block {lbn} freed twice"),
            ));
        }
        bit_set(&mut body[CL_BITMAP..], j, false);
        let f = get32(body, CL_FREE) + 1;
        put32(body, CL_FREE, f);
        self.fbc[ci].free = f;
        meta.txn.freed.insert(lbn * vol.blocks_per_4k());
        Ok(())
    }

    /// Allocate one resource; returns its 4K address.
    pub fn alloc_res(&mut self, vol: &Volume, meta: &mut Meta, t: ResType) -> Result<u64> {
        self.need_volume_lock()?;
        let n = self.clusters.len();
        let hint = self.res_hint[t as usize];
        for step in 0..n {
            let ci = (hint + step) % n;
            let c = &self.clusters[ci];
            if c.rtype != t || c.free == 0 {
                continue;
            }
            let c = c.clone();
            let per = u64::from(c.res_size) / MD as u64;
            if let Some((j, free)) = take_bit(vol, meta, c.addr, MAGIC_RCLUSTER, c.count, |j| {
                c.addr + 1 + j as u64 * per
            })? {
                self.clusters[ci].free = free;
                self.res_hint[t as usize] = ci;
                return Ok(c.addr + 1 + j as u64 * per);
            }
        }
        // No room: make a new cluster from a file block and list it.
        let rt = self
            .rt_blocks
            .iter()
            .copied()
            .find(|&a| {
                meta.get(vol, a, MAGIC_RTABLE)
                    .map(|b| (get32(&b[LOCK_SECTOR..], 32) as usize) < RT_ENTRIES)
                    .unwrap_or(false)
            })
            .ok_or_else(|| FsError::NoSpace("the resource table is full".into()))?;
        let lbn = self.alloc_fb(vol, meta)?;
        let addr = lbn * vol.blocks_per_4k();
        // The block may have held a deleted file's data: its lock sectors
        // (the cluster's and each descriptor's) must read as free locks.
        // It is referenced by nothing until this transaction commits.
        vol.zero(addr * MD as u64, vol.block_size())?;
        let count = Self::res_count(vol, t) as u32;
        let res_size = Self::res_size(vol, t);
        let b = meta.create(addr, MAGIC_RCLUSTER, 0);
        let body = &mut b[LOCK_SECTOR..];
        put32(body, CL_FIRST, t as u32);
        put32(body, CL_FIRST + 4, res_size);
        put32(body, CL_COUNT, count);
        put32(body, CL_FREE, count);
        let r = meta.get_mut(vol, rt, MAGIC_RTABLE)?;
        let body = &mut r[LOCK_SECTOR..];
        let k = get32(body, 32) as usize;
        put64(body, 40 + k * 8, addr);
        put32(body, 32, k as u32 + 1);
        self.clusters.push(RCluster {
            addr,
            rtype: t,
            res_size,
            count,
            free: count,
        });
        self.res_hint[t as usize] = self.clusters.len() - 1;
        self.alloc_res(vol, meta, t)
    }

    pub fn free_res(&mut self, vol: &Volume, meta: &mut Meta, t: ResType, addr: u64) -> Result<()> {
        self.need_volume_lock()?;
        let bpk = vol.blocks_per_4k();
        let caddr = addr / bpk * bpk;
        let ci = self
            .clusters
            .iter()
            .position(|c| c.addr == caddr && c.rtype == t)
            .ok_or_else(|| {
                let (lun, off) = vol.where_is(addr * MD as u64);
                corrupt(
                    &lun,
                    off,
                    format!("{} {addr:#x}", t.name()),
                    format!("is not inside a {} cluster", t.name()),
                )
            })?;
        let c = self.clusters[ci].clone();
        let per = u64::from(c.res_size) / MD as u64;
        let rel = addr - caddr - 1;
        if addr <= caddr || rel % per != 0 || rel / per >= u64::from(c.count) {
            return Err(FsError::Invalid(format!(
                "{} address {addr:#x} is not a resource boundary",
                t.name()
            )));
        }
        let j = (rel / per) as usize;
        let b = meta.get_mut(vol, caddr, MAGIC_RCLUSTER)?;
        let body = &mut b[LOCK_SECTOR..];
        if !bit_get(&body[CL_BITMAP..], j) {
            let (lun, off) = vol.where_is(caddr * MD as u64);
            return Err(corrupt(
                &lun,
                off,
                format!("resource cluster {caddr:#x}"),
                format!("{} {addr:#x} freed twice", t.name()),
            ));
        }
        bit_set(&mut body[CL_BITMAP..], j, false);
        let f = get32(body, CL_FREE) + 1;
        put32(body, CL_FREE, f);
        self.clusters[ci].free = f;
        meta.txn.freed.insert(addr);
        Ok(())
    }
}
