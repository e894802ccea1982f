//! The per-host metadata journal.
//!
//! A journal is a run of 4 KiB blocks on one LUN: block 0 is the journal
//! superblock, blocks `1..n` a circular log. A **transaction** is the set of
//! metadata blocks one or more filesystem operations changed. It is written
//! to the log as descriptor blocks (target addresses and per-block checksums),
//! the block images, and a commit block whose checksum covers the whole
//! transaction; then the LUN is flushed. Only then may the caller write the
//! blocks in place. The superblock's tail (the first transaction replay must
//! apply) moves only at a checkpoint, after the target was flushed, so every
//! transaction between the tail and the end of the log is either already in
//! place or still replayable.
//!
//! **Replay** applies every committed transaction from the tail in sequence
//! order and stops at the first block that is not the next valid record: a
//! stale record of an earlier lap (older sequence), a torn or garbage block
//! (bad checksum), a descriptor whose blocks do not match their checksums, a
//! commit missing. Nothing of a record that failed a check is written.
//! Replaying twice writes the same images again: harmless.
//!
//! This crate knows LUNs and 4 KiB blocks, not files: where a block goes is
//! the [`Target`]'s business (the filesystem maps its logical addresses to
//! extents). The byte layout is in `docs/FORMAT.md`.

use std::sync::Arc;

use lun::{Lun, LunError};

pub const BLOCK: usize = 4096;
pub const VERSION: u16 = 1;
pub const MAGIC_SUPER: u32 = u32::from_le_bytes(*b"VJSB");
pub const MAGIC_DESC: u32 = u32::from_le_bytes(*b"VJDS");
pub const MAGIC_COMMIT: u32 = u32::from_le_bytes(*b"VJCM");
/// Block-image entries in one descriptor block.
pub const DESC_ENTRIES: usize = (BLOCK - 64) / 16;
/// The smallest journal: superblock + 255 log blocks (1 MiB).
pub const MIN_BLOCKS: u32 = 256;

/// An error from the target while applying or flushing.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Lun(#[from] LunError),
    #[error("journal of slot {slot}: writing block {addr:#x} in place: {source}")]
    Target {
        slot: u32,
        addr: u64,
        source: BoxError,
    },
    #[error("journal of slot {slot} at {lun} offset {offset}: {reason}")]
    Corrupt {
        slot: u32,
        lun: String,
        offset: u64,
        reason: String,
    },
    #[error("journal of slot {slot}: a transaction of {blocks} blocks does not fit a journal of {capacity} log blocks")]
    TooLarge {
        slot: u32,
        blocks: u64,
        capacity: u64,
    },
    #[error(
        "journal of slot {slot} holds {records} committed transaction(s) that were not replayed"
    )]
    NotReplayed { slot: u32, records: usize },
}

pub type Result<T> = std::result::Result<T, JournalError>;

/// Where committed blocks go: the volume, by 4K address.
pub trait Target {
    /// Write `body` at byte `body_off` of the 4 KiB block at 4K address `addr`.
    fn write_block(
        &self,
        addr: u64,
        body_off: u32,
        body: &[u8],
    ) -> std::result::Result<(), BoxError>;
    /// Make every completed write durable.
    fn flush(&self) -> std::result::Result<(), BoxError>;
}

/// Where a journal lives.
#[derive(Clone)]
pub struct Region {
    pub lun: Arc<dyn Lun>,
    /// Byte offset of block 0 on the LUN.
    pub lun_offset: u64,
    /// The volume's 4K address of block 0 (what self addresses hold).
    pub addr: u64,
    /// Blocks in the region, superblock included.
    pub nblocks: u32,
    /// The host slot the journal belongs to (for messages and the superblock).
    pub slot: u32,
}

impl Region {
    fn cap(&self) -> u64 {
        u64::from(self.nblocks) - 1
    }
    fn read(&self, idx: u64, buf: &mut [u8]) -> Result<()> {
        Ok(self
            .lun
            .read_at(buf, self.lun_offset + idx * BLOCK as u64)?)
    }
    fn write(&self, idx: u64, buf: &[u8]) -> Result<()> {
        Ok(self
            .lun
            .write_at(buf, self.lun_offset + idx * BLOCK as u64)?)
    }
    fn corrupt(&self, idx: u64, reason: String) -> JournalError {
        JournalError::Corrupt {
            slot: self.slot,
            lun: self.lun.name().to_string(),
            offset: self.lun_offset + idx * BLOCK as u64,
            reason,
        }
    }
    /// Log position `pos` (0-based, counting from the first log block and
    /// wrapping) as a block index in the region.
    fn index(&self, pos: u64) -> u64 {
        1 + pos % self.cap()
    }
}

// ---- the common block header (same layout as every vmfs structure) ----

fn get32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn get64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}
fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

fn crc_of(b: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..8]);
    h.update(&[0; 4]);
    h.update(&b[12..]);
    h.finalize()
}

fn header(b: &mut [u8], magic: u32, self_addr: u64, seq: u64, uuid: &[u8; 16]) {
    b.fill(0);
    put32(b, 0, magic);
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    put64(b, 16, self_addr);
    put64(b, 24, seq);
    b[32..48].copy_from_slice(uuid);
}

fn seal(b: &mut [u8]) {
    let c = crc_of(b);
    put32(b, 8, c);
}

fn magic_name(m: u32) -> String {
    String::from_utf8_lossy(&m.to_le_bytes()).into_owned()
}

/// Check magic, version, checksum and self address; the sequence and volume
/// are the caller's to judge.
fn check(b: &[u8], magic: u32, self_addr: u64) -> std::result::Result<(), String> {
    if b.iter().all(|&x| x == 0) {
        return Err("an all-zero block".into());
    }
    if get32(b, 0) != magic {
        return Err(format!(
            "not a {} block (magic {:#010x})",
            magic_name(magic),
            get32(b, 0)
        ));
    }
    let v = u16::from_le_bytes([b[4], b[5]]);
    if v != VERSION {
        return Err(format!(
            "journal format version {v}, this build reads {VERSION}"
        ));
    }
    if get32(b, 8) != crc_of(b) {
        return Err(format!("{} checksum mismatch", magic_name(magic)));
    }
    if get64(b, 16) != self_addr {
        return Err(format!(
            "{} belongs at {:#x}, found at {self_addr:#x} (misdirected write)",
            magic_name(magic),
            get64(b, 16)
        ));
    }
    Ok(())
}

// ---- superblock ----

/// Superblock fields (after the common header and the volume UUID).
const SB_SLOT: usize = 48;
const SB_NBLOCKS: usize = 52;
const SB_TAIL_POS: usize = 56;
// The tail sequence is the header's sequence field (offset 24).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Super {
    tail_pos: u64,
    tail_seq: u64,
}

fn read_super(r: &Region, uuid: &[u8; 16]) -> Result<Super> {
    let mut b = vec![0u8; BLOCK];
    r.read(0, &mut b)?;
    check(&b, MAGIC_SUPER, r.addr).map_err(|e| r.corrupt(0, format!("superblock: {e}")))?;
    if b[32..48] != uuid[..] {
        return Err(r.corrupt(
            0,
            format!(
                "the journal belongs to another volume ({}), not this one ({})",
                hex(&b[32..48]),
                hex(uuid)
            ),
        ));
    }
    let nb = get32(&b, SB_NBLOCKS);
    if nb != r.nblocks {
        return Err(r.corrupt(
            0,
            format!(
                "superblock says {nb} blocks, the heartbeat slot says {}",
                r.nblocks
            ),
        ));
    }
    let tail_pos = get64(&b, SB_TAIL_POS);
    if tail_pos >= r.cap() {
        return Err(r.corrupt(0, format!("tail position {tail_pos} is beyond the log")));
    }
    Ok(Super {
        tail_pos,
        tail_seq: get64(&b, 24),
    })
}

fn write_super(r: &Region, uuid: &[u8; 16], s: Super) -> Result<()> {
    let mut b = vec![0u8; BLOCK];
    header(&mut b, MAGIC_SUPER, r.addr, s.tail_seq, uuid);
    put32(&mut b, SB_SLOT, r.slot);
    put32(&mut b, SB_NBLOCKS, r.nblocks);
    put64(&mut b, SB_TAIL_POS, s.tail_pos);
    seal(&mut b);
    r.write(0, &b)
}

/// Move the tail (the first record replay applies) and make it durable.
fn set_tail(r: &Region, uuid: &[u8; 16], tail_pos: u64, tail_seq: u64) -> Result<()> {
    write_super(r, uuid, Super { tail_pos, tail_seq })?;
    Ok(r.lun.flush()?)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ---- records ----

/// Descriptor fields.
const D_COUNT: usize = 48;
const D_INDEX: usize = 52;
const D_ENTRIES: usize = 64;
/// Commit fields.
const C_BLOCKS: usize = 48;
const C_DESCS: usize = 52;
const C_CRC: usize = 56;

/// One block image of a transaction: `data` (the whole 4 KiB) whose bytes
/// from `body_off` on go to 4K address `addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub addr: u64,
    pub body_off: u32,
    pub data: Vec<u8>,
}

/// A committed transaction read back from the log.
#[derive(Debug, Clone)]
pub struct Record {
    pub seq: u64,
    pub images: Vec<Image>,
    /// Log blocks it occupies.
    len: u64,
}

/// What a scan of the log found.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub records: Vec<Record>,
    /// Why the scan stopped somewhere other than a clean end of the log
    /// (a torn or corrupt record, a sequence gap): what was skipped.
    pub stopped: Option<String>,
    end_pos: u64,
    next_seq: u64,
}

/// How many log blocks a transaction of `n` images takes.
pub fn record_len(n: usize) -> u64 {
    (n.div_ceil(DESC_ENTRIES).max(1) + n + 1) as u64
}

/// Read the transaction starting at log position `pos` with sequence `seq`.
/// Ok(None) at a clean end of the log; Err(reason) at a bad record.
fn read_record(
    r: &Region,
    uuid: &[u8; 16],
    pos: u64,
    seq: u64,
    budget: u64,
) -> Result<std::result::Result<Option<Record>, String>> {
    let mut b = vec![0u8; BLOCK];
    let mut p = pos;
    let mut images: Vec<Image> = Vec::new();
    let mut crc = crc32fast::Hasher::new();
    let mut descs = 0u32;
    loop {
        if p - pos >= budget {
            return Ok(Err(format!(
                "transaction {seq} runs past the journal's head without a commit block"
            )));
        }
        let idx = r.index(p);
        r.read(idx, &mut b)?;
        let self_addr = r.addr + idx;
        let magic = get32(&b, 0);
        let first = p == pos;
        if magic == MAGIC_COMMIT && !first {
            if let Err(e) = check(&b, MAGIC_COMMIT, self_addr) {
                return Ok(Err(format!(
                    "transaction {seq}: commit block at log block {idx}: {e}"
                )));
            }
            let bad = if get64(&b, 24) != seq {
                Some(format!(
                    "sequence {} where {seq} was expected",
                    get64(&b, 24)
                ))
            } else if b[32..48] != uuid[..] {
                Some("belongs to another volume".to_string())
            } else if u64::from(get32(&b, C_BLOCKS)) != images.len() as u64
                || get32(&b, C_DESCS) != descs
            {
                Some(format!(
                    "commit lists {} blocks in {} descriptors, the log holds {} in {descs}",
                    get32(&b, C_BLOCKS),
                    get32(&b, C_DESCS),
                    images.len()
                ))
            } else if get32(&b, C_CRC) != crc.clone().finalize() {
                Some("transaction checksum mismatch".to_string())
            } else {
                None
            };
            if let Some(why) = bad {
                return Ok(Err(format!(
                    "transaction {seq}: commit block at log block {idx}: {why}"
                )));
            }
            return Ok(Ok(Some(Record {
                seq,
                images,
                len: p + 1 - pos,
            })));
        }
        // A descriptor is expected here.
        if let Err(e) = check(&b, MAGIC_DESC, self_addr) {
            if first && (e.starts_with("an all-zero") || e.starts_with("not a")) {
                return Ok(Ok(None)); // never-written space or an old block: the end
            }
            return Ok(Err(format!("transaction {seq}: log block {idx}: {e}")));
        }
        let dseq = get64(&b, 24);
        if b[32..48] != uuid[..] {
            return Ok(Err(format!(
                "log block {idx}: a record of another volume ({})",
                hex(&b[32..48])
            )));
        }
        if dseq != seq {
            if first && dseq < seq {
                return Ok(Ok(None)); // a record of an earlier lap: the end
            }
            return Ok(Err(format!(
                "log block {idx}: sequence {dseq} where {seq} was expected"
            )));
        }
        if get32(&b, D_INDEX) != descs {
            return Ok(Err(format!(
                "transaction {seq}: descriptor {} where {descs} was expected",
                get32(&b, D_INDEX)
            )));
        }
        let count = get32(&b, D_COUNT) as usize;
        if count == 0 || count > DESC_ENTRIES {
            return Ok(Err(format!(
                "transaction {seq}: descriptor lists {count} blocks (1..={DESC_ENTRIES})"
            )));
        }
        crc.update(&b);
        descs += 1;
        let entries: Vec<(u64, u32, u32)> = (0..count)
            .map(|k| {
                let o = D_ENTRIES + k * 16;
                (get64(&b, o), get32(&b, o + 8), get32(&b, o + 12))
            })
            .collect();
        p += 1;
        let mut data = vec![0u8; BLOCK];
        for (addr, body_off, dcrc) in entries {
            if p - pos >= budget {
                return Ok(Err(format!(
                    "transaction {seq} runs past the journal's head"
                )));
            }
            let idx = r.index(p);
            r.read(idx, &mut data)?;
            if body_off as usize >= BLOCK {
                return Ok(Err(format!(
                    "transaction {seq}: block {addr:#x} has body offset {body_off}"
                )));
            }
            if crc32fast::hash(&data) != dcrc {
                return Ok(Err(format!(
                    "transaction {seq}: the image of block {addr:#x} at log block {idx} fails its checksum (a commit without its blocks)"
                )));
            }
            crc.update(&data);
            images.push(Image {
                addr,
                body_off,
                data: data.clone(),
            });
            p += 1;
        }
    }
}

/// Read every committed transaction from the tail on; writes nothing.
pub fn scan(r: &Region, uuid: &[u8; 16]) -> Result<Scan> {
    let sb = read_super(r, uuid)?;
    let mut out = Scan {
        end_pos: sb.tail_pos,
        next_seq: sb.tail_seq,
        ..Default::default()
    };
    let mut used = 0u64;
    loop {
        match read_record(r, uuid, out.end_pos, out.next_seq, r.cap() - used)? {
            Ok(None) => break,
            Ok(Some(rec)) => {
                used += rec.len;
                out.end_pos = (out.end_pos + rec.len) % r.cap();
                out.next_seq += 1;
                out.records.push(rec);
            }
            Err(why) => {
                out.stopped = Some(why);
                break;
            }
        }
    }
    Ok(out)
}

/// What a replay did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub transactions: usize,
    pub blocks: usize,
    pub first_seq: u64,
    pub stopped: Option<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.transactions == 0 {
            write!(f, "nothing to replay")?;
        } else {
            write!(
                f,
                "replayed {} transaction(s) ({}..={}), {} block(s)",
                self.transactions,
                self.first_seq,
                self.first_seq + self.transactions as u64 - 1,
                self.blocks
            )?;
        }
        if let Some(s) = &self.stopped {
            write!(f, "; skipped the rest: {s}")?;
        }
        Ok(())
    }
}

fn apply(r: &Region, records: &[Record], target: &dyn Target) -> Result<usize> {
    let mut n = 0;
    for rec in records {
        for im in &rec.images {
            target
                .write_block(im.addr, im.body_off, &im.data[im.body_off as usize..])
                .map_err(|source| JournalError::Target {
                    slot: r.slot,
                    addr: im.addr,
                    source,
                })?;
            n += 1;
        }
    }
    target.flush().map_err(|source| JournalError::Target {
        slot: r.slot,
        addr: 0,
        source,
    })?;
    Ok(n)
}

/// Replay a journal (this host's at mount, or a dead host's): apply every
/// committed transaction in order, flush, then empty the log. Any host may
/// call it for any slot's region.
pub fn replay(r: &Region, uuid: &[u8; 16], target: &dyn Target) -> Result<Report> {
    let s = scan(r, uuid)?;
    let first_seq = s.records.first().map_or(0, |x| x.seq);
    let blocks = apply(r, &s.records, target)?;
    if !s.records.is_empty() || s.stopped.is_some() {
        // Empty the log: the tail moves past what was applied (now flushed).
        set_tail(r, uuid, s.end_pos, s.next_seq)?;
    }
    let rep = Report {
        transactions: s.records.len(),
        blocks,
        first_seq,
        stopped: s.stopped,
    };
    if rep.transactions > 0 || rep.stopped.is_some() {
        tracing::debug!("journal of slot {}: {rep}", r.slot);
    }
    Ok(rep)
}

/// An open journal this host writes.
pub struct Journal {
    r: Region,
    uuid: [u8; 16],
    tail_pos: u64,
    head_pos: u64,
    next_seq: u64,
    /// Log blocks between tail and head.
    used: u64,
    /// Commits and checkpoints, for statistics.
    pub commits: u64,
    pub checkpoints: u64,
}

impl Journal {
    /// Write a fresh, empty journal: the superblock, and a zeroed first log
    /// block so that nothing older can look like a record.
    pub fn format(r: Region, uuid: &[u8; 16], first_seq: u64) -> Result<Journal> {
        if r.nblocks < MIN_BLOCKS {
            return Err(r.corrupt(
                0,
                format!(
                    "a journal needs at least {MIN_BLOCKS} blocks, not {}",
                    r.nblocks
                ),
            ));
        }
        r.write(1, &[0u8; BLOCK])?;
        set_tail(&r, uuid, 0, first_seq)?;
        Self::open(r, uuid)
    }

    /// Open a journal for writing; it must hold nothing to replay.
    pub fn open(r: Region, uuid: &[u8; 16]) -> Result<Journal> {
        let s = scan(&r, uuid)?;
        if !s.records.is_empty() {
            return Err(JournalError::NotReplayed {
                slot: r.slot,
                records: s.records.len(),
            });
        }
        if s.stopped.is_some() {
            // A torn record past the end: start a clean log after a checkpoint.
            set_tail(&r, uuid, s.end_pos, s.next_seq)?;
        }
        Ok(Journal {
            uuid: *uuid,
            tail_pos: s.end_pos,
            head_pos: s.end_pos,
            next_seq: s.next_seq,
            used: 0,
            r,
            commits: 0,
            checkpoints: 0,
        })
    }

    pub fn region(&self) -> &Region {
        &self.r
    }
    /// Log blocks available to one transaction.
    pub fn capacity(&self) -> u64 {
        self.r.cap()
    }
    /// Log blocks in use (committed, not yet checkpointed).
    pub fn used(&self) -> u64 {
        self.used
    }
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Make everything committed durable in place and empty the log: flush
    /// the target, then move the tail to the head.
    pub fn checkpoint(&mut self, target: &dyn Target) -> Result<()> {
        if self.used == 0 && self.tail_pos == self.head_pos {
            return Ok(());
        }
        target.flush().map_err(|source| JournalError::Target {
            slot: self.r.slot,
            addr: 0,
            source,
        })?;
        set_tail(&self.r, &self.uuid, self.head_pos, self.next_seq)?;
        self.tail_pos = self.head_pos;
        self.used = 0;
        self.checkpoints += 1;
        Ok(())
    }

    /// Commit one transaction: after it returns, the images are durable in
    /// the log and the caller may write them in place. The caller must have
    /// written in place every earlier transaction (a checkpoint may run here).
    /// `images`: (4K address, body offset, the whole 4 KiB block).
    pub fn commit(&mut self, images: &[(u64, u32, &[u8])], target: &dyn Target) -> Result<u64> {
        if images.is_empty() {
            return Ok(self.next_seq.saturating_sub(1));
        }
        let len = record_len(images.len());
        if len > self.capacity() {
            return Err(JournalError::TooLarge {
                slot: self.r.slot,
                blocks: len,
                capacity: self.capacity(),
            });
        }
        if self.used + len > self.capacity() {
            self.checkpoint(target)?;
        }
        let seq = self.next_seq;
        let mut out = vec![0u8; len as usize * BLOCK];
        let mut crc = crc32fast::Hasher::new();
        let mut k = 0usize; // block index in `out`
        for (di, chunk) in images.chunks(DESC_ENTRIES).enumerate() {
            let pos = self.head_pos + k as u64;
            let mut d = vec![0u8; BLOCK];
            header(
                &mut d,
                MAGIC_DESC,
                self.r.addr + self.r.index(pos),
                seq,
                &self.uuid,
            );
            put32(&mut d, D_COUNT, chunk.len() as u32);
            put32(&mut d, D_INDEX, di as u32);
            for (e, (addr, body_off, data)) in chunk.iter().enumerate() {
                debug_assert_eq!(data.len(), BLOCK);
                let o = D_ENTRIES + e * 16;
                put64(&mut d, o, *addr);
                put32(&mut d, o + 8, *body_off);
                put32(&mut d, o + 12, crc32fast::hash(data));
            }
            seal(&mut d);
            crc.update(&d);
            out[k * BLOCK..(k + 1) * BLOCK].copy_from_slice(&d);
            k += 1;
            for (_, _, data) in chunk {
                crc.update(data);
                out[k * BLOCK..(k + 1) * BLOCK].copy_from_slice(data);
                k += 1;
            }
        }
        let pos = self.head_pos + k as u64;
        let c = &mut out[k * BLOCK..(k + 1) * BLOCK];
        header(
            c,
            MAGIC_COMMIT,
            self.r.addr + self.r.index(pos),
            seq,
            &self.uuid,
        );
        put32(c, C_BLOCKS, images.len() as u32);
        put32(c, C_DESCS, images.len().div_ceil(DESC_ENTRIES) as u32);
        put32(c, C_CRC, crc.finalize());
        seal(c);
        // At most two contiguous writes (the log wraps once at most).
        let first_idx = self.r.index(self.head_pos);
        let before_wrap = (self.r.cap() + 1 - first_idx).min(len) as usize;
        self.r.write(first_idx, &out[..before_wrap * BLOCK])?;
        if before_wrap < len as usize {
            self.r.write(1, &out[before_wrap * BLOCK..])?;
        }
        self.r.lun.flush()?;
        self.head_pos = (self.head_pos + len) % self.r.cap();
        self.used += len;
        self.next_seq += 1;
        self.commits += 1;
        Ok(seq)
    }
}

#[cfg(test)]
mod tests;
