//! The volume: extents laid end to end into one logical address space.
//!
//! Logical addresses of metadata are in 4 KiB units ("4K addresses"); file
//! block `n` starts at logical byte `n * block_size`. Every extent begins with
//! its volume header, and its first `meta_blocks` blocks hold metadata.

use std::sync::Arc;

use lun::Lun;

use crate::error::{FsError, Result};
use crate::format::*;

/// Options of `mkfs`.
#[derive(Debug, Clone)]
pub struct MkfsOptions {
    pub label: String,
    pub block_size: u32,
    pub max_hosts: u32,
    pub rt_blocks: u32,
    /// Each host's journal, in 4 KiB blocks; 0 = 16 MiB, or 1/32 of a
    /// small volume (at least 1 MiB).
    pub journal_blocks: u32,
    /// Blocks per file-block cluster; 0 = chosen from the first LUN's size
    /// (see [`fbc_blocks_for`]).
    pub fbc_blocks: u32,
}

/// Blocks per file-block cluster for a volume whose first extent has
/// `nblocks` blocks: about 64 clusters per extent, so that hosts each
/// allocate from clusters of their own (every cluster has its own lock),
/// between [`FBC_BLOCKS_MIN`] and [`FBC_BLOCKS`] (a bitmap filling its
/// block). A 1 TiB LUN of 1 MiB blocks gets clusters of 16384 blocks.
pub fn fbc_blocks_for(nblocks: u64) -> u32 {
    let want = (nblocks / 64).max(1);
    let pow2 = 1u64 << (63 - want.leading_zeros());
    pow2.clamp(FBC_BLOCKS_MIN, FBC_BLOCKS) as u32
}

impl MkfsOptions {
    /// The checks that need no LUN: run before anything is read or written.
    pub fn check(&self, nluns: usize) -> Result<()> {
        if nluns == 0 || nluns > MAX_EXTENTS {
            return Err(FsError::Invalid(format!(
                "a datastore has 1 to {MAX_EXTENTS} extents, {nluns} given"
            )));
        }
        if !self.block_size.is_power_of_two() || !(64 << 10..=64 << 20).contains(&self.block_size) {
            return Err(FsError::Invalid(format!(
                "block size {} must be a power of two from 64K to 64M",
                self.block_size
            )));
        }
        if self.max_hosts == 0 || self.max_hosts > MAX_HOSTS_LIMIT {
            return Err(FsError::Invalid(format!(
                "--max-hosts must be 1..={MAX_HOSTS_LIMIT}"
            )));
        }
        if self.label.len() > 63 {
            return Err(FsError::Invalid("label is longer than 63 bytes".into()));
        }
        Ok(())
    }
}

impl Default for MkfsOptions {
    fn default() -> Self {
        MkfsOptions {
            label: String::new(),
            block_size: 1 << 20,
            max_hosts: 64,
            rt_blocks: 64,
            journal_blocks: 0,
            fbc_blocks: 0,
        }
    }
}

/// An opened, validated volume.
#[derive(Clone)]
pub struct Volume {
    pub header: VolumeHeader,
    pub luns: Vec<Arc<dyn Lun>>,
}

/// How another host may find this LUN: its URL, with a relative path made
/// absolute (best effort).
pub fn url_hint(name: &str) -> String {
    if name.contains("://") || name.starts_with('/') {
        return name.to_string();
    }
    std::fs::canonicalize(name)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| name.to_string())
}

pub fn uuid_str(u: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*u).to_string()
}

fn ceil_div(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}

/// Lay out one extent: returns the entry for a LUN of `lun_size` bytes.
fn plan_extent(
    index: usize,
    first_block: u64,
    lun_size: u64,
    opts: &MkfsOptions,
    lun: &str,
) -> Result<ExtentEntry> {
    let bs = u64::from(opts.block_size);
    let nblocks = lun_size / bs;
    let fbc_off = if index == 0 {
        let hb = (u64::from(opts.max_hosts) * LOCK_SECTOR as u64).next_multiple_of(MD as u64);
        MD as u64 + hb + u64::from(opts.rt_blocks) * MD as u64
    } else {
        MD as u64
    };
    let fbc_count = ceil_div(nblocks.max(1), u64::from(opts.fbc_blocks));
    let meta_blocks = ceil_div(fbc_off + fbc_count * MD as u64, bs);
    if nblocks < meta_blocks + 2 {
        return Err(FsError::Extent {
            index,
            lun: lun.into(),
            reason: format!(
                "LUN of {lun_size} bytes is too small: it needs at least {} bytes ({} blocks of {bs} bytes)",
                (meta_blocks + 2) * bs,
                meta_blocks + 2
            ),
        });
    }
    Ok(ExtentEntry {
        uuid: *uuid::Uuid::new_v4().as_bytes(),
        nblocks,
        first_block,
        meta_blocks: meta_blocks as u32,
        fbc_off: fbc_off as u32,
        lun_size,
    })
}

impl Volume {
    pub fn block_size(&self) -> u64 {
        u64::from(self.header.block_size)
    }
    /// Blocks per file-block cluster.
    pub fn fbc_blocks(&self) -> u64 {
        u64::from(self.header.fbc_blocks)
    }
    pub fn blocks_per_4k(&self) -> u64 {
        self.block_size() / MD as u64
    }

    /// Which extent holds logical byte `off`, and where on its LUN.
    pub fn locate(&self, off: u64) -> Result<(usize, u64)> {
        let blk = off / self.block_size();
        for (i, e) in self.header.extents.iter().enumerate() {
            if blk >= e.first_block && blk < e.first_block + e.nblocks {
                return Ok((i, off - e.first_block * self.block_size()));
            }
        }
        Err(FsError::Invalid(format!(
            "logical offset {off} is beyond the volume ({} blocks)",
            self.header.total_blocks()
        )))
    }

    /// Read `buf.len()` bytes at logical `off`; the range must not cross an extent.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let (i, o) = self.locate(off)?;
        Ok(self.luns[i].read_at(buf, o)?)
    }
    pub fn write(&self, off: u64, buf: &[u8]) -> Result<()> {
        let (i, o) = self.locate(off)?;
        Ok(self.luns[i].write_at(buf, o)?)
    }
    /// The LUN and byte offset of the lock sector of the lockable block
    /// (cluster, descriptor) at 4K address `addr`.
    pub fn lock_sector(&self, addr: u64) -> Result<(std::sync::Arc<dyn lun::Lun>, u64)> {
        let (i, off) = self.locate(addr * MD as u64)?;
        Ok((self.luns[i].clone(), off))
    }

    /// Hint the extent's LUN that `len` bytes at `off` will be read soon
    /// (callers pass pieces of one file block, which lie in one extent).
    pub fn prefetch(&self, off: u64, len: u64) {
        if let Ok((i, o)) = self.locate(off) {
            self.luns[i].prefetch(o, len)
        }
    }
    pub fn zero(&self, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (i, o) = self.locate(off)?;
        Ok(self.luns[i].write_zeroes(o, len, true)?)
    }
    pub fn flush(&self) -> Result<()> {
        for l in &self.luns {
            l.flush()?;
        }
        Ok(())
    }
    /// The LUN name and LUN offset of a logical byte, for error messages.
    pub fn where_is(&self, off: u64) -> (String, u64) {
        match self.locate(off) {
            Ok((i, o)) => (self.luns[i].name().to_string(), o),
            Err(_) => ("<beyond volume>".into(), off),
        }
    }
    /// Heartbeat slot `slot`, verified.
    pub fn read_slot(&self, slot: u32) -> Result<HostSlot> {
        let mut b = vec![0u8; LOCK_SECTOR];
        let mut tries = 0;
        loop {
            self.luns[0].read_at(&mut b, self.slot_off(slot))?;
            match self.decode_slot(slot, &b) {
                Err(_) if tries < locking::TORN_READ_RETRIES => {
                    tries += 1;
                    locking::torn_read_pause(tries);
                }
                r => return r,
            }
        }
    }

    /// Every heartbeat slot in one read: each one decoded (or why not) with
    /// its raw sector.
    ///
    /// Other hosts rewrite their sectors while this reads; on a LUN that is
    /// a file (or is served from one) such a read can come back torn, so a
    /// region with a sector failing its checksum is read again a few times
    /// before the failure is reported.
    pub fn read_slots(&self) -> Result<Vec<(Result<HostSlot>, Vec<u8>)>> {
        let n = self.header.max_hosts;
        let mut b = vec![0u8; n as usize * LOCK_SECTOR];
        let mut tries = 0;
        loop {
            self.luns[0].read_at(&mut b, self.header.heartbeat_off)?;
            let slots: Vec<_> = b
                .chunks_exact(LOCK_SECTOR)
                .zip(0..n)
                .map(|(sec, s)| (self.decode_slot(s, sec), sec.to_vec()))
                .collect();
            if tries >= locking::TORN_READ_RETRIES || slots.iter().all(|(r, _)| r.is_ok()) {
                return Ok(slots);
            }
            tries += 1;
            locking::torn_read_pause(tries);
        }
    }

    /// Byte offset of heartbeat slot `slot` on extent 0's LUN.
    pub fn slot_off(&self, slot: u32) -> u64 {
        self.header.heartbeat_off + u64::from(slot) * LOCK_SECTOR as u64
    }

    fn decode_slot(&self, slot: u32, sector: &[u8]) -> Result<HostSlot> {
        HostSlot::decode(sector, self.header.heartbeat_off / MD as u64, slot).map_err(|reason| {
            FsError::Corrupt {
                lun: self.luns[0].name().to_string(),
                offset: self.slot_off(slot),
                object: format!("heartbeat slot {slot}"),
                reason,
            }
        })
    }

    /// Write heartbeat slot `slot` (one sector, atomic) and flush it.
    pub fn write_slot(&self, slot: u32, s: &HostSlot) -> Result<()> {
        let off = self.slot_off(slot);
        self.luns[0].write_at(&s.encode(self.header.heartbeat_off / MD as u64, slot), off)?;
        Ok(self.luns[0].flush()?)
    }

    /// 4K address of extent `i`'s first byte.
    pub fn extent_addr(&self, i: usize) -> u64 {
        self.header.extents[i].first_block * self.blocks_per_4k()
    }

    /// Format `luns` as a new volume. Writes only after every check passed.
    pub fn mkfs(luns: Vec<Arc<dyn Lun>>, opts: &MkfsOptions) -> Result<Volume> {
        opts.check(luns.len())?;
        let total: u64 = luns.iter().map(|l| l.size()).sum();
        let mut opts = opts.clone();
        if opts.journal_blocks == 0 {
            opts.journal_blocks =
                ((total / MD as u64 / 32) as u32).clamp(JOURNAL_MIN_BLOCKS, JOURNAL_DEFAULT_BLOCKS);
        }
        let opts = &opts;
        if !(JOURNAL_MIN_BLOCKS..=JOURNAL_MAX_BLOCKS).contains(&opts.journal_blocks) {
            return Err(FsError::Invalid(format!(
                "the journal size must be {} KiB to {} MiB",
                JOURNAL_MIN_BLOCKS * 4,
                JOURNAL_MAX_BLOCKS / 256
            )));
        }
        let mut ids = std::collections::HashSet::new();
        for l in &luns {
            if !ids.insert(l.identity()?) {
                return Err(FsError::Invalid(format!("{} is given twice", l.name())));
            }
        }
        let mut opts = opts.clone();
        if opts.fbc_blocks == 0 {
            opts.fbc_blocks = fbc_blocks_for(luns[0].size() / u64::from(opts.block_size));
        }
        check_fbc_blocks(opts.fbc_blocks).map_err(FsError::Invalid)?;
        let opts = &opts;
        let mut extents = Vec::new();
        let mut first = 0;
        for (i, l) in luns.iter().enumerate() {
            let e = plan_extent(i, first, l.size(), opts, l.name())?;
            first += e.nblocks;
            extents.push(e);
        }
        let header = VolumeHeader {
            uuid: *uuid::Uuid::new_v4().as_bytes(),
            label: opts.label.clone(),
            config_gen: 1,
            block_size: opts.block_size,
            sub_block_size: (64 << 10).min(opts.block_size / 16),
            max_hosts: opts.max_hosts,
            extent_index: 0,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            root_fd: 0,
            heartbeat_off: MD as u64,
            rt_off: MD as u64
                + (u64::from(opts.max_hosts) * LOCK_SECTOR as u64).next_multiple_of(MD as u64),
            rt_blocks: opts.rt_blocks,
            journal_blocks: opts.journal_blocks,
            fbc_blocks: opts.fbc_blocks,
            urls: luns.iter().map(|l| url_hint(l.name())).collect(),
            extents,
        };
        let vol = Volume { header, luns };
        // Heartbeat slots and the resource table on extent 0.
        let mut hb = vec![
            0u8;
            (u64::from(opts.max_hosts) * LOCK_SECTOR as u64).next_multiple_of(MD as u64)
                as usize
        ];
        for s in 0..opts.max_hosts as usize {
            hb[s * LOCK_SECTOR..(s + 1) * LOCK_SECTOR].copy_from_slice(
                &HostSlot::default().encode(vol.header.heartbeat_off / MD as u64, s as u32),
            );
        }
        vol.luns[0].write_at(&hb, vol.header.heartbeat_off)?;
        for k in 0..u64::from(opts.rt_blocks) {
            let mut b = vec![0u8; MD];
            let addr = vol.header.rt_off / MD as u64 + k;
            init_body(&mut b[LOCK_SECTOR..], MAGIC_RTABLE, addr, 0);
            seal(&mut b[LOCK_SECTOR..]);
            vol.luns[0].write_at(&b, addr * MD as u64)?;
        }
        for i in 0..vol.luns.len() {
            vol.write_fbcs(i)?;
        }
        vol.write_headers(None)?;
        Ok(vol)
    }

    /// Write extent `i`'s file-block cluster blocks, its metadata blocks marked used.
    fn write_fbcs(&self, i: usize) -> Result<()> {
        let e = self.header.extents[i];
        let base = self.extent_addr(i);
        let per = self.fbc_blocks();
        let n = ceil_div(e.nblocks, per);
        let mut area = vec![0u8; n as usize * MD];
        for k in 0..n {
            let b = &mut area[k as usize * MD..(k as usize + 1) * MD];
            let addr = base + u64::from(e.fbc_off) / MD as u64 + k;
            let body = &mut b[LOCK_SECTOR..];
            init_body(body, MAGIC_FBC, addr, 0);
            let first = e.first_block + k * per;
            let count = (e.nblocks - k * per).min(per);
            put64(body, CL_FIRST, first);
            put32(body, CL_COUNT, count as u32);
            let mut used = 0;
            for j in 0..count {
                if k * per + j < u64::from(e.meta_blocks) {
                    bit_set(&mut body[CL_BITMAP..], j as usize, true);
                    used += 1;
                }
            }
            put32(body, CL_FREE, (count - used) as u32);
            seal(body);
        }
        self.luns[i].write_at(&area, u64::from(e.fbc_off))?;
        Ok(())
    }

    /// Write the header to every extent (or only to `only`), then flush.
    pub fn write_headers(&self, only: Option<usize>) -> Result<()> {
        for i in 0..self.luns.len() {
            if only.is_some_and(|o| o != i) {
                continue;
            }
            let mut h = self.header.clone();
            h.extent_index = i as u32;
            self.luns[i].write_at(&h.encode(self.extent_addr(i)), 0)?;
        }
        self.flush()
    }

    /// Open and validate: every LUN must be the right extent of one volume,
    /// in order, none missing, none extra. Nothing is written.
    pub fn open(luns: Vec<Arc<dyn Lun>>) -> Result<Volume> {
        if luns.is_empty() {
            return Err(FsError::Invalid("no LUN given".into()));
        }
        let mut headers = Vec::new();
        for (i, l) in luns.iter().enumerate() {
            if l.size() < MD as u64 {
                return Err(FsError::Extent {
                    index: i,
                    lun: l.name().into(),
                    reason: format!("LUN is only {} bytes", l.size()),
                });
            }
            let mut b = vec![0u8; MD];
            l.read_at(&mut b, 0)?;
            let h = VolumeHeader::decode(&b, None).map_err(|r| FsError::Extent {
                index: i,
                lun: l.name().into(),
                reason: format!("volume header at offset 0: {r}"),
            })?;
            headers.push(h);
        }
        // The reference: the newest configuration among the LUNs of the first LUN's volume.
        let vid = headers[0].uuid;
        let reference = headers
            .iter()
            .filter(|h| h.uuid == vid)
            .max_by_key(|h| h.config_gen)
            .expect("first is one")
            .clone();
        let order_hint = || {
            reference
                .extents
                .iter()
                .enumerate()
                .map(|(k, e)| format!("extent {k} = {}", uuid_str(&e.uuid)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (i, (h, l)) in headers.iter().zip(&luns).enumerate() {
            let err = |reason: String| FsError::Extent {
                index: i,
                lun: l.name().into(),
                reason,
            };
            if h.uuid != vid {
                return Err(err(format!(
                    "belongs to another datastore (volume {} \"{}\"), not to volume {} \"{}\"",
                    uuid_str(&h.uuid),
                    h.label,
                    uuid_str(&vid),
                    reference.label
                )));
            }
            if h.config_gen != reference.config_gen {
                return Err(err(format!(
                    "has configuration generation {} but another extent has {}: an extend was interrupted; run `vmfs extend` again or fsck",
                    h.config_gen, reference.config_gen
                )));
            }
            let idx = h.extent_index as usize;
            if idx != i {
                return Err(err(format!("is extent {idx} of the volume but was given in position {i}; give the extents in order ({})", order_hint())));
            }
            if h.extents[idx].uuid != reference.extents[idx].uuid {
                return Err(err(
                    "extent identity does not match the volume's extent list".into(),
                ));
            }
            let e = &reference.extents[i];
            if l.size() < e.nblocks * u64::from(reference.block_size) {
                return Err(err(format!(
                    "LUN is {} bytes but the volume header says this extent holds {} bytes: the LUN was truncated or is the wrong one",
                    l.size(),
                    e.nblocks * u64::from(reference.block_size)
                )));
            }
        }
        if luns.len() < reference.extents.len() {
            let missing: Vec<String> = (luns.len()..reference.extents.len())
                .map(|k| format!("extent {k} ({})", uuid_str(&reference.extents[k].uuid)))
                .collect();
            return Err(FsError::Invalid(format!(
                "volume {} \"{}\" has {} extents but {} LUNs were given: missing {}",
                uuid_str(&vid),
                reference.label,
                reference.extents.len(),
                luns.len(),
                missing.join(", ")
            )));
        }
        let mut header = reference;
        header.extent_index = 0;
        Ok(Volume { header, luns })
    }

    /// Grow the volume by one extent. The new LUN must not hold a datastore.
    pub fn extend(&mut self, new: Arc<dyn Lun>) -> Result<()> {
        let i = self.luns.len();
        if i >= MAX_EXTENTS {
            return Err(FsError::Invalid(format!(
                "the volume already has the maximum of {MAX_EXTENTS} extents"
            )));
        }
        let id = new.identity()?;
        for l in &self.luns {
            if l.identity()? == id {
                return Err(FsError::Invalid(format!(
                    "{} is already an extent of this datastore",
                    new.name()
                )));
            }
        }
        let mut b = vec![0u8; MD];
        new.read_at(&mut b, 0)?;
        if get32(&b, 0) == MAGIC_VOLUME {
            return Err(FsError::Extent {
                index: i,
                lun: new.name().into(),
                reason: "holds a datastore volume header: refusing to overwrite it (wipe its first 4 KiB if you mean it)".into(),
            });
        }
        let opts = MkfsOptions {
            block_size: self.header.block_size,
            max_hosts: self.header.max_hosts,
            rt_blocks: self.header.rt_blocks,
            fbc_blocks: self.header.fbc_blocks,
            ..Default::default()
        };
        let e = plan_extent(i, self.header.total_blocks(), new.size(), &opts, new.name())?;
        self.header.extents.push(e);
        self.header.urls.resize(i, String::new());
        self.header.urls.push(url_hint(new.name()));
        self.header.config_gen += 1;
        self.luns.push(new);
        self.write_fbcs(i)?;
        // The new extent first, then the others: a crash in between leaves the
        // old volume whole, and the new LUN reported as not (yet) part of it.
        self.write_headers(Some(i))?;
        for k in 0..i {
            self.write_headers(Some(k))?;
        }
        Ok(())
    }
}

/// The journal writes committed blocks in place through the volume.
impl journal::Target for Volume {
    fn write_block(
        &self,
        addr: u64,
        body_off: u32,
        body: &[u8],
    ) -> std::result::Result<(), journal::BoxError> {
        Ok(self.write(addr * MD as u64 + u64::from(body_off), body)?)
    }
    fn flush(&self) -> std::result::Result<(), journal::BoxError> {
        Ok(Volume::flush(self)?)
    }
}
