//! Allocation of file blocks (per-extent file-block clusters) and of small
//! resources (file descriptors, sub-blocks, pointer blocks) kept in resource
//! clusters listed in the resource table. Each cluster has its own bitmap and
//! lock sector, so hosts can later allocate from different clusters without
//! contending; a host keeps allocating near where it last did (affinity).

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
    meta.get_mut(vol, addr, magic)?; // stage it
    let found = {
        let body = &meta.txn.blocks[&addr].1[LOCK_SECTOR..];
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
    let body = &mut meta.txn.blocks.get_mut(&addr).expect("staged above").1[LOCK_SECTOR..];
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

#[derive(Default)]
pub struct Alloc {
    pub fbc: Vec<Fbc>,
    pub clusters: Vec<RCluster>,
    pub rt_blocks: Vec<u64>,
    fb_hint: usize,
    res_hint: [usize; 4],
}

impl Alloc {
    /// Read every cluster summary. Verifies every allocation block it reads.
    pub fn load(vol: &Volume, meta: &mut Meta) -> Result<Alloc> {
        let mut a = Alloc::default();
        for (i, e) in vol.header.extents.iter().enumerate() {
            let base = vol.extent_addr(i) + u64::from(e.fbc_off) / MD as u64;
            for k in 0..e.nblocks.div_ceil(FBC_BLOCKS) {
                let addr = base + k;
                let b = &meta.get(vol, addr, MAGIC_FBC)?[LOCK_SECTOR..];
                let (first, count, free) =
                    (get64(b, CL_FIRST), get32(b, CL_COUNT), get32(b, CL_FREE));
                let want_first = e.first_block + k * FBC_BLOCKS;
                if first != want_first
                    || u64::from(count) != (e.nblocks - k * FBC_BLOCKS).min(FBC_BLOCKS)
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
        Ok(a)
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
        let n = self.fbc.len();
        for step in 0..n {
            let ci = (self.fb_hint + step) % n;
            if self.fbc[ci].free == 0 {
                continue;
            }
            let c = self.fbc[ci].clone();
            let bpk = vol.blocks_per_4k();
            if let Some((j, free)) = take_bit(vol, meta, c.addr, MAGIC_FBC, c.count, |j| {
                (c.first + j as u64) * bpk
            })? {
                self.fbc[ci].free = free;
                self.fb_hint = ci;
                return Ok(c.first + j as u64);
            }
        }
        Err(FsError::NoSpace(format!(
            "all {} file blocks are in use",
            self.fbc.iter().map(|f| u64::from(f.count)).sum::<u64>()
        )))
    }

    /// Allocate `n` contiguous file blocks within one cluster (a journal);
    /// returns the first logical block number.
    pub fn alloc_run(&mut self, vol: &Volume, meta: &mut Meta, n: u64) -> Result<u64> {
        for ci in 0..self.fbc.len() {
            let c = self.fbc[ci].clone();
            if u64::from(c.free) < n {
                continue;
            }
            let body = &meta.get(vol, c.addr, MAGIC_FBC)?[LOCK_SECTOR..];
            let (mut start, mut len) = (0usize, 0u64);
            let mut found = None;
            for j in 0..c.count as usize {
                if bit_get(&body[CL_BITMAP..], j) {
                    len = 0;
                    continue;
                }
                if len == 0 {
                    start = j;
                }
                len += 1;
                if len == n {
                    found = Some(start);
                    break;
                }
            }
            let Some(start) = found else { continue };
            let b = meta.get_mut(vol, c.addr, MAGIC_FBC)?;
            let body = &mut b[LOCK_SECTOR..];
            for j in start..start + n as usize {
                bit_set(&mut body[CL_BITMAP..], j, true);
            }
            let free = get32(body, CL_FREE) - n as u32;
            put32(body, CL_FREE, free);
            self.fbc[ci].free = free;
            return Ok(c.first + start as u64);
        }
        Err(FsError::NoSpace(format!(
            "no run of {n} contiguous free file blocks for a journal"
        )))
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
