//! Changed-block tracking: which 64 KiB blocks of a disk were written since
//! a change ID, right after any crash (VMware's CBT and
//! `QueryChangedDiskAreas`; the format is ours, see docs/FORMAT.md).
//!
//! **History.** A disk's tracking history has a random 64-bit id and a
//! current *epoch* `C` (from 1). A change ID `ID/n` names the end of epoch
//! `n`: `snapshot` ends the current epoch and prints its ID. For every block
//! the file keeps the last epoch that changed it and the one before
//! (`last`, `prev`; 0 = not since tracking began), so
//! `changed --since ID/x` is the blocks with `last > x`, and with
//! `--until ID/y` the blocks changed in `(x, y]`: `last` in it, or `last`
//! after it and `prev` in it or after it (a block written twice after `y` is
//! reported: a superset, never a miss).
//!
//! **Durable before acknowledged, once per region.** A write to a block not
//! yet recorded in the current epoch first sets the bit of its *intent
//! region* (64 MiB, or more on disks over 1 TiB, so the bitmap stays 2 KiB)
//! in the header and makes that durable; the block's own entry is updated in
//! memory and written at the next checkpoint (a disk flush at most once a
//! second, a snapshot, a close), after which the intent bits are cleared.
//! After a crash every block of a region whose bit is set counts as changed
//! in the epoch of the crash: a superset of what was written, 64 MiB-grained
//! only where writes were in flight, and the history is kept, never reset.
//!
//! **Layout.** Two 4 KiB header slots (written alternately, each followed
//! by a flush, so the other slot always holds the last durable header; the
//! valid one with the higher generation wins), then pages of 511 entries.
//! Every header and page has a CRC32 keyed by the history id; a damaged page
//! counts as changed in every epoch.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{at, DiskError, Result};
use crate::store::{DiskFile, Store};

pub const MAGIC: &[u8; 8] = b"VMFSCTK\0";
pub const VERSION: u32 = 1;
/// The tracking granularity: a block of 64 KiB (the grain of our deltas).
pub const BLOCK: u64 = 64 << 10;
const SLOT: u64 = 4096;
const PAGE: u64 = 4096;
/// Entries (two u32 each) in a page after its 8-byte head.
pub const PER_PAGE: u64 = 511;
const PAGES_AT: u64 = 2 * SLOT;
const MAX_REGIONS: u64 = 16384;
const MIN_REGION_BLOCKS: u64 = 1024;
/// Test knobs (the crash harness): smaller intent regions so that a small
/// disk has several, and a checkpoint at every flush so that runs do not
/// depend on the clock. Never changed outside tests.
static TEST_REGION_BLOCKS: AtomicU64 = AtomicU64::new(0);
static TEST_EVERY_FLUSH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// For tests: intent regions of `blocks` blocks for histories created from
/// now on (0: the default), and a checkpoint at every flush.
#[doc(hidden)]
pub fn test_knobs(blocks: u64, every_flush: bool) {
    TEST_REGION_BLOCKS.store(blocks, Ordering::Relaxed);
    TEST_EVERY_FLUSH.store(every_flush, Ordering::Relaxed);
}
const REASON_MAX: usize = 512;
const INTENT_AT: usize = 1024;
const NO_CID: u32 = 0xffff_ffff;
/// A flush checkpoints the block entries at most this often.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// A point in a disk's change history, as printed: `HISTORY/EPOCH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeId {
    pub history: u64,
    pub epoch: u32,
}

impl std::fmt::Display for ChangeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}/{}", self.history, self.epoch)
    }
}

impl std::str::FromStr for ChangeId {
    type Err = DiskError;
    fn from_str(s: &str) -> Result<ChangeId> {
        let bad = || {
            DiskError::Invalid(format!(
                "{s:?} is not a change ID (HISTORY/EPOCH as `vmfs disk snapshot` prints it, or '*')"
            ))
        };
        let (h, e) = s.split_once('/').ok_or_else(bad)?;
        if h.len() != 16 {
            return Err(bad());
        }
        Ok(ChangeId {
            history: u64::from_str_radix(h, 16).map_err(|_| bad())?,
            epoch: e.parse().map_err(|_| bad())?,
        })
    }
}

/// What `changed` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// The ranges are whole blocks of this many bytes (clipped at the end).
    pub granularity: u64,
    /// Byte ranges of the disk that may differ, in order, merged.
    pub ranges: Vec<Range<u64>>,
    /// Set when the history cannot answer (tracking restarted, off, or a
    /// writer that does not keep it wrote the disk): `ranges` is then the
    /// whole disk, and this says why.
    pub whole_disk: Option<String>,
}

/// A header slot, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub gen: u64,
    pub history: u64,
    pub capacity: u64,
    /// Blocks per intent region.
    pub region_blocks: u64,
    /// The current epoch.
    pub epoch: u32,
    /// A writer has the disk open (after a crash: still set).
    pub open: bool,
    /// The CID of the current descriptor this history belongs to, and one
    /// being committed (a snapshot's new layer) that is accepted as well.
    pub cid: u32,
    pub pending_cid: Option<u32>,
    /// A stamp of the chain's files (lengths and modification times) when
    /// the last writer closed it cleanly.
    pub stamp: u64,
    /// Why this history started (for messages about older IDs).
    pub reason: String,
    /// Intent regions written in the current epoch whose block entries may
    /// not be durable.
    pub intent: Vec<u8>,
}

fn crc(history: u64, b: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&history.to_le_bytes());
    h.update(b);
    h.finalize()
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

impl Header {
    pub fn new(history: u64, capacity: u64, cid: u32, reason: &str) -> Header {
        let blocks = capacity.div_ceil(BLOCK);
        Header {
            gen: 1,
            history,
            capacity,
            region_blocks: region_blocks(blocks),
            epoch: 1,
            open: false,
            cid,
            pending_cid: None,
            stamp: 0,
            reason: clip(reason, REASON_MAX),
            intent: vec![0; (MAX_REGIONS / 8) as usize],
        }
    }

    pub fn blocks(&self) -> u64 {
        self.capacity.div_ceil(BLOCK)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SLOT as usize];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.gen.to_le_bytes());
        b[24..32].copy_from_slice(&self.history.to_le_bytes());
        b[32..40].copy_from_slice(&self.capacity.to_le_bytes());
        b[40..44].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        b[44..48].copy_from_slice(&(self.region_blocks as u32).to_le_bytes());
        b[48..52].copy_from_slice(&self.epoch.to_le_bytes());
        b[52..56].copy_from_slice(&(self.open as u32).to_le_bytes());
        b[56..60].copy_from_slice(&self.cid.to_le_bytes());
        b[60..64].copy_from_slice(&self.pending_cid.unwrap_or(NO_CID).to_le_bytes());
        b[64..72].copy_from_slice(&self.stamp.to_le_bytes());
        let reason = clip(&self.reason, REASON_MAX);
        let r = reason.as_bytes();
        let n = r.len();
        b[72..74].copy_from_slice(&(n as u16).to_le_bytes());
        b[80..80 + n].copy_from_slice(&r[..n]);
        b[INTENT_AT..INTENT_AT + self.intent.len()].copy_from_slice(&self.intent);
        let c = crc(self.history, &b);
        b[12..16].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// Decode a slot; `Err` says what is wrong with it.
    pub fn decode(b: &[u8]) -> std::result::Result<Header, String> {
        if b.len() < SLOT as usize {
            return Err(format!("{} bytes, not a {SLOT}-byte header", b.len()));
        }
        let b = &b[..SLOT as usize];
        if &b[0..8] != MAGIC {
            return Err("no change-tracking magic".into());
        }
        let v = u32_at(b, 8);
        if v != VERSION {
            return Err(format!("version {v}; this host reads version {VERSION}"));
        }
        let history = u64_at(b, 24);
        let mut z = b.to_vec();
        z[12..16].fill(0);
        if crc(history, &z) != u32_at(b, 12) {
            return Err("checksum mismatch (a torn or damaged header)".into());
        }
        let capacity = u64_at(b, 32);
        if u32_at(b, 40) as u64 != BLOCK {
            return Err(format!("block size {}, not {BLOCK}", u32_at(b, 40)));
        }
        if capacity == 0 || capacity > 64 << 40 {
            return Err(format!("capacity {capacity} is impossible"));
        }
        let region_blocks = u32_at(b, 44) as u64;
        let blocks = capacity.div_ceil(BLOCK);
        if region_blocks == 0 || blocks.div_ceil(region_blocks) > MAX_REGIONS {
            return Err(format!(
                "{region_blocks} blocks per intent region do not cover {blocks} blocks"
            ));
        }
        let epoch = u32_at(b, 48);
        if epoch == 0 || epoch == u32::MAX {
            return Err(format!("epoch {epoch} is impossible"));
        }
        let n = (u16::from_le_bytes([b[72], b[73]]) as usize).min(REASON_MAX);
        let pending = u32_at(b, 60);
        Ok(Header {
            gen: u64_at(b, 16),
            history,
            capacity,
            region_blocks,
            epoch,
            open: u32_at(b, 52) != 0,
            cid: u32_at(b, 56),
            pending_cid: (pending != NO_CID).then_some(pending),
            stamp: u64_at(b, 64),
            reason: clip(&String::from_utf8_lossy(&b[80..80 + n]), REASON_MAX),
            intent: b[INTENT_AT..INTENT_AT + (MAX_REGIONS / 8) as usize].to_vec(),
        })
    }

    fn intent_set(&self, r: u64) -> bool {
        self.intent[(r / 8) as usize] & (1 << (r % 8)) != 0
    }
    fn any_intent(&self) -> bool {
        self.intent.iter().any(|&x| x != 0)
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn clip(s: &str, max: usize) -> String {
    let mut n = s.len().min(max);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    s[..n].to_string()
}

fn region_blocks(blocks: u64) -> u64 {
    let min = match TEST_REGION_BLOCKS.load(Ordering::Relaxed) {
        0 => MIN_REGION_BLOCKS,
        n => n,
    };
    blocks.div_ceil(MAX_REGIONS).max(min)
}

/// One page of block entries: `(last, prev)` epochs.
#[derive(Clone)]
struct Page(Vec<(u32, u32)>);

impl Page {
    fn encode(&self, history: u64, no: u64) -> Vec<u8> {
        let mut b = vec![0u8; PAGE as usize];
        b[4..8].copy_from_slice(&(no as u32).to_le_bytes());
        for (i, (l, p)) in self.0.iter().enumerate() {
            let o = 8 + i * 8;
            b[o..o + 4].copy_from_slice(&l.to_le_bytes());
            b[o + 4..o + 8].copy_from_slice(&p.to_le_bytes());
        }
        let c = crc(history, &b);
        b[0..4].copy_from_slice(&c.to_le_bytes());
        b
    }
    /// `None`: damaged (torn, or from elsewhere).
    fn decode(b: &[u8], history: u64, no: u64) -> Option<Page> {
        if b.iter().all(|&x| x == 0) {
            // Never written.
            return Some(Page(vec![(0, 0); PER_PAGE as usize]));
        }
        let mut z = b.to_vec();
        z[0..4].fill(0);
        if crc(history, &z) != u32_at(b, 0) || u32_at(b, 4) as u64 != no {
            return None;
        }
        Some(Page(
            (0..PER_PAGE as usize)
                .map(|i| (u32_at(b, 8 + i * 8), u32_at(b, 12 + i * 8)))
                .collect(),
        ))
    }
}

fn pages_for(blocks: u64) -> u64 {
    blocks.div_ceil(PER_PAGE)
}

/// A fresh history id.
fn new_history() -> u64 {
    let mut b = [0u8; 8];
    crate::ids::fill(&mut b);
    u64::from_le_bytes(b)
}

/// Write a new, empty history to `name` (replacing any): every block
/// unchanged since epoch 1, for the descriptor with CID `cid`. Written
/// beside it and renamed over it, so a crash leaves the old file or the new.
pub fn create(store: &dyn Store, name: &str, capacity: u64, cid: u32, reason: &str) -> Result<()> {
    let mut h = Header::new(new_history(), capacity, cid, reason);
    // Not stamped yet: the first writer's clean close stamps the chain
    // (a CID still "being committed" is not checked against a stamp).
    h.pending_cid = Some(cid);
    let tmp = format!("{name}.new");
    store.remove_if_there(&tmp).map_err(at(&tmp))?;
    let f = store.create(&tmp).map_err(at(&tmp))?;
    f.set_len(PAGES_AT + pages_for(h.blocks()) * PAGE)
        .map_err(at(&tmp))?;
    // Generation 1 goes in slot 1: the first header written after it (2)
    // goes in slot 0, and a tear there leaves this one.
    f.write_at(&h.encode(), SLOT).map_err(at(&tmp))?;
    f.flush().map_err(at(&tmp))?;
    drop(f);
    store.rename(&tmp, name).map_err(at(name))
}

struct Inner {
    h: Header,
    /// Pages changed since the last checkpoint.
    dirty: BTreeMap<u64, Page>,
    last_checkpoint: Instant,
    /// Intent regions where a block was recorded since the last
    /// checkpoint: their bits stay set through it (the writes go on there,
    /// and each new block would cost a flush again); the others are
    /// cleared.
    active: std::collections::HashSet<u64>,
}

/// An open change-tracking file.
pub struct Tracker {
    file: Arc<dyn DiskFile>,
    pub name: String,
    writable: bool,
    /// One bit per block: recorded durably in the current epoch (its
    /// region's intent bit or its page is on disk). The write path's only
    /// check when set.
    recorded: Vec<AtomicU64>,
    inner: Mutex<Inner>,
    /// [`Tracker::begin`] ran: only then may the intent bits be cleared.
    begun: std::sync::atomic::AtomicBool,
}

impl Tracker {
    /// Open the tracking file `name` (read-only, or for the writer of the
    /// disk). A file whose both header slots are damaged is an error: the
    /// caller restarts the history, saying why.
    pub fn open(store: &dyn Store, name: &str, write: bool) -> Result<Tracker> {
        let file = store.open(name, write).map_err(at(name))?;
        let mut b = vec![0u8; 2 * SLOT as usize];
        file.read_full(&mut b, 0).map_err(at(name))?;
        let a = Header::decode(&b[..SLOT as usize]);
        let c = Header::decode(&b[SLOT as usize..]);
        let h = match (a, c) {
            (Ok(a), Ok(c)) => {
                if a.history != c.history {
                    // A fresh file has one slot; another history in the
                    // other slot cannot happen: trust neither.
                    return Err(DiskError::Corrupt {
                        file: name.to_string(),
                        offset: 0,
                        reason: "its header slots belong to two histories".into(),
                    });
                }
                if a.gen >= c.gen {
                    a
                } else {
                    c
                }
            }
            (Ok(a), Err(_)) => a,
            (Err(_), Ok(c)) => c,
            (Err(ea), Err(ec)) => {
                return Err(DiskError::Corrupt {
                    file: name.to_string(),
                    offset: 0,
                    reason: format!("no valid header (slot 0: {ea}; slot 1: {ec})"),
                })
            }
        };
        // The write path's bitmap: only a writer needs it.
        let words = if write {
            h.blocks().div_ceil(64) as usize
        } else {
            0
        };
        Ok(Tracker {
            file,
            name: name.to_string(),
            writable: write,
            recorded: (0..words).map(|_| AtomicU64::new(0)).collect(),
            inner: Mutex::new(Inner {
                h,
                dirty: BTreeMap::new(),
                last_checkpoint: Instant::now(),
                active: Default::default(),
            }),
            begun: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn header(&self) -> Header {
        self.lock().h.clone()
    }

    /// The ID of the last epoch that ended (what `snapshot` printed last;
    /// epoch 0 is the start of the history).
    pub fn last_id(&self) -> ChangeId {
        let h = self.lock();
        ChangeId {
            history: h.h.history,
            epoch: h.h.epoch - 1,
        }
    }

    /// Write the header to the slot not holding the last durable one, and
    /// flush. On an error the generation is not advanced (the next write
    /// goes to the same slot, never over the durable one).
    fn write_header(&self, inner: &mut Inner) -> Result<()> {
        inner.h.gen += 1;
        let slot = inner.h.gen % 2;
        let r = self
            .file
            .write_at(&inner.h.encode(), slot * SLOT)
            .and_then(|()| self.file.flush())
            .map_err(at(&self.name));
        if r.is_err() {
            inner.h.gen -= 1;
        }
        r
    }

    fn page<'a>(&self, inner: &'a mut Inner, no: u64) -> Result<&'a mut Page> {
        if !inner.dirty.contains_key(&no) {
            let p = self.read_page(&inner.h, no)?;
            inner.dirty.insert(no, p);
        }
        Ok(inner.dirty.get_mut(&no).expect("inserted"))
    }

    /// Page `no` as on disk; a damaged one as changed in every epoch.
    fn read_page(&self, h: &Header, no: u64) -> Result<Page> {
        let mut b = vec![0u8; PAGE as usize];
        self.file
            .read_full(&mut b, PAGES_AT + no * PAGE)
            .map_err(at(&self.name))?;
        Ok(self.page_from(h, no, &b))
    }

    /// Page `no` from its bytes; a damaged one as changed in every epoch.
    fn page_from(&self, h: &Header, no: u64, b: &[u8]) -> Page {
        Page::decode(b, h.history, no).unwrap_or_else(|| {
            tracing::warn!(
                "{} page {no} (byte {}): damaged; its {PER_PAGE} blocks count as changed in every epoch",
                self.name,
                PAGES_AT + no * PAGE
            );
            Page(vec![(h.epoch, h.epoch); PER_PAGE as usize])
        })
    }

    /// Mark block `b` changed in the current epoch (in memory).
    fn mark(&self, inner: &mut Inner, b: u64) -> Result<()> {
        let e = inner.h.epoch;
        let p = self.page(inner, b / PER_PAGE)?;
        let ent = &mut p.0[(b % PER_PAGE) as usize];
        if ent.0 != e {
            *ent = (e, ent.0);
        }
        Ok(())
    }

    /// Begin writing: recover from a crash (every block of a region with
    /// its intent bit set counts as changed in the current epoch), then
    /// mark the file open for `cid`.
    pub fn begin(&self, cid: u32) -> Result<()> {
        let mut g = self.lock();
        let inner = &mut *g;
        if inner.h.any_intent() {
            let rb = inner.h.region_blocks;
            let blocks = inner.h.blocks();
            let regions: Vec<u64> = (0..blocks.div_ceil(rb))
                .filter(|&r| inner.h.intent_set(r))
                .collect();
            tracing::info!(
                "{}: {} intent region(s) were in flight at a crash: their blocks count as changed in epoch {}",
                self.name,
                regions.len(),
                inner.h.epoch
            );
            for r in regions {
                for b in r * rb..((r + 1) * rb).min(blocks) {
                    self.mark(inner, b)?;
                }
            }
            self.write_pages(inner)?;
            inner.h.intent.fill(0);
        }
        inner.h.open = true;
        inner.h.cid = cid;
        inner.h.pending_cid = None;
        self.write_header(inner)?;
        self.begun.store(true, Ordering::Release);
        Ok(())
    }

    fn check_begun(&self) -> Result<()> {
        if self.begun.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(DiskError::Invalid(format!(
                "{}: change tracking was not opened for writing",
                self.name
            )))
        }
    }

    /// Record `[off, off+len)` as changed, durably, before it is written.
    pub fn record(&self, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check_begun()?;
        let first = off / BLOCK;
        let last = (off + len - 1) / BLOCK;
        // (A block past the bitmap, after a grow, is always recorded.)
        let missing = |b: u64| {
            self.recorded
                .get((b / 64) as usize)
                .is_none_or(|w| w.load(Ordering::Acquire) & (1 << (b % 64)) == 0)
        };
        if !(first..=last).any(missing) {
            return Ok(());
        }
        let mut g = self.lock();
        let inner = &mut *g;
        let rb = inner.h.region_blocks;
        let intent_before = inner.h.intent.clone();
        let mut new_intent = false;
        for b in first..=last {
            if !missing(b) {
                continue;
            }
            let r = b / rb;
            if !inner.h.intent_set(r) {
                inner.h.intent[(r / 8) as usize] |= 1 << (r % 8);
                new_intent = true;
            }
        }
        if new_intent {
            // Durable before the data is written: the write may reach the
            // disk before any flush. Not durable: not set either (a retry
            // must write it again).
            if let Err(e) = self.write_header(inner) {
                inner.h.intent = intent_before;
                return Err(e);
            }
        }
        for b in first..=last {
            if missing(b) {
                inner.active.insert(b / rb);
                self.mark(inner, b)?;
                if let Some(w) = self.recorded.get((b / 64) as usize) {
                    w.fetch_or(1 << (b % 64), Ordering::Release);
                }
            }
        }
        Ok(())
    }

    fn write_pages(&self, inner: &mut Inner) -> Result<()> {
        for (no, p) in &inner.dirty {
            self.file
                .write_at(&p.encode(inner.h.history, *no), PAGES_AT + no * PAGE)
                .map_err(at(&self.name))?;
        }
        self.file.flush().map_err(at(&self.name))?;
        inner.dirty.clear();
        Ok(())
    }

    /// Write the entries changed in memory (`force`: now; else only if a
    /// second has passed since the last checkpoint), and clear the intent
    /// bits of regions idle since the last one (`force`: all of them).
    pub fn checkpoint(&self, force: bool) -> Result<()> {
        self.check_begun()?;
        let mut g = self.lock();
        let inner = &mut *g;
        let due = inner.last_checkpoint.elapsed() >= CHECKPOINT_EVERY
            || TEST_EVERY_FLUSH.load(Ordering::Relaxed);
        if !self.writable || (!force && !due) {
            return Ok(());
        }
        inner.last_checkpoint = Instant::now();
        if inner.dirty.is_empty() && !inner.h.any_intent() {
            return Ok(());
        }
        self.write_pages(inner)?;
        let before = inner.h.intent.clone();
        for (i, byte) in inner.h.intent.iter_mut().enumerate() {
            for bit in 0..8 {
                let r = (i * 8 + bit) as u64;
                if force || !inner.active.contains(&r) {
                    *byte &= !(1 << bit);
                }
            }
        }
        inner.active.clear();
        if inner.h.intent == before {
            return Ok(());
        }
        self.write_header(inner)
    }

    /// End the current epoch (a snapshot): everything recorded is made
    /// durable, the next write records again, and the new layer's CID
    /// `pending` is accepted from now on. Returns the ID of the epoch ended.
    pub fn end_epoch(&self, pending: u32) -> Result<ChangeId> {
        self.checkpoint(true)?;
        let mut g = self.lock();
        let inner = &mut *g;
        let id = ChangeId {
            history: inner.h.history,
            epoch: inner.h.epoch,
        };
        // Nothing is recorded in the new epoch yet (cleared first: a writer
        // must not skip a block because it was recorded in the old one).
        for w in &self.recorded {
            w.store(0, Ordering::Release);
        }
        let (old_epoch, old_pending) = (inner.h.epoch, inner.h.pending_cid);
        inner.h.epoch = inner
            .h
            .epoch
            .checked_add(1)
            .filter(|&e| e < u32::MAX)
            .ok_or_else(|| {
                DiskError::Invalid(format!(
                    "{}: the change history has run out of epochs",
                    self.name
                ))
            })?;
        inner.h.pending_cid = Some(pending);
        if let Err(e) = self.write_header(inner) {
            inner.h.epoch = old_epoch;
            inner.h.pending_cid = old_pending;
            return Err(e);
        }
        Ok(id)
    }

    /// Accept `pending` as a CID of this history (a descriptor about to be
    /// committed with it), durably.
    pub fn expect_cid(&self, pending: u32) -> Result<()> {
        self.check_begun()?;
        let mut g = self.lock();
        g.h.pending_cid = Some(pending);
        self.write_header(&mut g)
    }

    /// Whether `cid` is the descriptor's CID this history expects.
    pub fn knows_cid(&self, cid: u32) -> bool {
        let g = self.lock();
        g.h.cid == cid || g.h.pending_cid == Some(cid)
    }

    /// Close cleanly: everything durable, the chain's stamp kept (a later
    /// open that finds another stamp knows something else wrote the disk).
    /// A CID accepted with [`Tracker::expect_cid`] stays accepted (the
    /// descriptor with it is committed after this).
    pub fn close(&self, cid: u32, stamp: u64) -> Result<()> {
        self.close_as(cid, stamp, false)
    }

    /// [`Tracker::close`]; `settled`: `cid` is the descriptor an operation
    /// of ours has just committed and `stamp` its chain's: nothing is
    /// pending any more, and the next open compares the stamp.
    pub fn close_as(&self, cid: u32, stamp: u64, settled: bool) -> Result<()> {
        self.checkpoint(true)?;
        let mut g = self.lock();
        g.h.open = false;
        g.h.cid = cid;
        g.h.stamp = stamp;
        if settled {
            g.h.pending_cid = None;
        }
        self.write_header(&mut g)
    }

    /// Grow the history to `capacity` (the disk grew); the new blocks count
    /// as changed in the current epoch. No writes may be in flight.
    pub fn grow(&self, capacity: u64) -> Result<()> {
        self.checkpoint(true)?;
        let mut g = self.lock();
        let inner = &mut *g;
        // From the block the old end was in: its tail is new disk too.
        let old = inner.h.capacity / BLOCK;
        if capacity <= inner.h.capacity {
            return Ok(());
        }
        inner.h.capacity = capacity;
        inner.h.region_blocks = region_blocks(inner.h.blocks());
        self.file
            .set_len(PAGES_AT + pages_for(inner.h.blocks()) * PAGE)
            .map_err(at(&self.name))?;
        for b in old..inner.h.blocks() {
            self.mark(inner, b)?;
        }
        self.write_pages(inner)?;
        self.write_header(inner)
    }

    /// Mark `ranges` changed in the current epoch, durably (what a revert
    /// drops).
    pub fn mark_durably(&self, ranges: &[Range<u64>]) -> Result<()> {
        {
            let mut g = self.lock();
            let inner = &mut *g;
            let blocks = inner.h.blocks();
            for r in ranges {
                if r.start >= r.end {
                    continue;
                }
                for b in r.start / BLOCK..=((r.end - 1) / BLOCK).min(blocks.saturating_sub(1)) {
                    self.mark(inner, b)?;
                }
            }
        }
        self.checkpoint(true)
    }

    /// The blocks that may have changed after `since` (and, with `until`,
    /// up to it), as byte ranges; `whole_disk` (from the caller) answers
    /// the whole disk with that reason.
    pub fn changed(
        &self,
        since: ChangeId,
        until: Option<ChangeId>,
        whole_disk: Option<String>,
    ) -> Result<Changes> {
        let g = self.lock();
        let h = &g.h;
        let all = |why: String| Changes {
            granularity: BLOCK,
            ranges: vec![0..h.capacity],
            whole_disk: Some(why),
        };
        if let Some(why) = whole_disk {
            return Ok(all(why));
        }
        let ended = h.epoch - 1;
        for id in [Some(since), until].into_iter().flatten() {
            if id.history != h.history {
                return Ok(all(format!(
                    "change ID {id} is from another change history than this disk's {:016x}, which began {}; changes since then are unknown",
                    h.history, h.reason
                )));
            }
            if id.epoch > ended {
                return Err(DiskError::Invalid(format!(
                    "change ID {id} is newer than the disk's last one ({:016x}/{ended})",
                    h.history
                )));
            }
        }
        let y = until.map(|u| u.epoch);
        if let Some(y) = y {
            if y < since.epoch {
                return Err(DiskError::Invalid(format!(
                    "--until {} is before --since {since}",
                    until.expect("set")
                )));
            }
        }
        let x = since.epoch;
        let hit = |(l, p): (u32, u32)| match y {
            None => l > x,
            Some(y) => (l > x && l <= y) || (l > y && p > x),
        };
        let blocks = h.blocks();
        let rb = h.region_blocks;
        // The writer knows exactly what it recorded (its pages in memory);
        // anyone else counts the intent regions as changed now.
        let overlay = !self.begun.load(Ordering::Acquire);
        let mut out: Vec<Range<u64>> = Vec::new();
        // The pages are read 256 at a time (1 MiB), in order.
        const BATCH: u64 = 256;
        let pages = pages_for(blocks);
        let mut buf = vec![0u8; (BATCH.min(pages) * PAGE) as usize];
        let mut first = 0;
        while first < pages {
            let n = (pages - first).min(BATCH);
            let bytes = &mut buf[..(n * PAGE) as usize];
            self.file
                .read_full(bytes, PAGES_AT + first * PAGE)
                .map_err(at(&self.name))?;
            for no in first..first + n {
                let read;
                let page = match g.dirty.get(&no) {
                    Some(p) => p,
                    None => {
                        let k = ((no - first) * PAGE) as usize;
                        read = self.page_from(h, no, &bytes[k..k + PAGE as usize]);
                        &read
                    }
                };
                for i in 0..PER_PAGE {
                    let b = no * PER_PAGE + i;
                    if b >= blocks {
                        break;
                    }
                    let mut e = page.0[i as usize];
                    if overlay && h.intent_set(b / rb) && e.0 != h.epoch {
                        // In flight when the file was last written: maybe
                        // changed in the current epoch.
                        e = (h.epoch, e.0);
                    }
                    if hit(e) {
                        let (s, t) = (b * BLOCK, ((b + 1) * BLOCK).min(h.capacity));
                        match out.last_mut() {
                            Some(r) if r.end == s => r.end = t,
                            _ => out.push(s..t),
                        }
                    }
                }
            }
            first += n;
        }
        Ok(Changes {
            granularity: BLOCK,
            ranges: out,
            whole_disk: None,
        })
    }
}

/// A stamp of a chain's files: their names, lengths and modification
/// times (FNV-1a; not a security check, a "did anything else write?").
pub fn stamp(files: &[(String, u64, (i64, u32))]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for &x in b {
            h ^= x as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (n, len, (s, ns)) in files {
        eat(n.as_bytes());
        eat(&[0]);
        eat(&len.to_le_bytes());
        eat(&s.to_le_bytes());
        eat(&ns.to_le_bytes());
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    fn setup(cap: u64) -> (tempfile::TempDir, LocalStore) {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::new(d.path());
        create(&s, "d-ctk.vmdk", cap, 7, "test").unwrap();
        (d, s)
    }

    fn id(t: &Tracker, e: u32) -> ChangeId {
        ChangeId {
            history: t.header().history,
            epoch: e,
        }
    }

    #[test]
    fn since_and_until_follow_the_epochs() {
        let (_d, s) = setup(64 << 20);
        let t = Tracker::open(&s, "d-ctk.vmdk", true).unwrap();
        t.begin(7).unwrap();
        t.record(0, 4096).unwrap();
        let e1 = t.end_epoch(8).unwrap();
        assert_eq!(e1.epoch, 1);
        t.record(BLOCK * 3, BLOCK + 1).unwrap(); // blocks 3 and 4
        let e2 = t.end_epoch(9).unwrap();
        t.record(BLOCK * 3, 1).unwrap(); // block 3 again
        t.record(BLOCK * 10, 1).unwrap();
        let r = t.changed(id(&t, 0), None, None).unwrap().ranges;
        assert_eq!(
            r,
            vec![0..BLOCK, 3 * BLOCK..5 * BLOCK, 10 * BLOCK..11 * BLOCK]
        );
        let r = t.changed(e1, None, None).unwrap().ranges;
        assert_eq!(r, vec![3 * BLOCK..5 * BLOCK, 10 * BLOCK..11 * BLOCK]);
        let r = t.changed(e2, None, None).unwrap().ranges;
        assert_eq!(r, vec![3 * BLOCK..4 * BLOCK, 10 * BLOCK..11 * BLOCK]);
        // Up to e2: block 3's earlier change is in (e1, e2]; block 10's is not.
        let r = t.changed(e1, Some(e2), None).unwrap().ranges;
        assert_eq!(r, vec![3 * BLOCK..5 * BLOCK]);
        // Up to e1: block 3 was written in epochs 2 and 3 only, but the
        // entry keeps two epochs, both after e1: it may have been written
        // before too, so it is reported (a superset, never a miss).
        let r = t.changed(id(&t, 0), Some(e1), None).unwrap().ranges;
        assert_eq!(r, vec![0..BLOCK, 3 * BLOCK..4 * BLOCK]);
        assert!(t.changed(id(&t, 5), None, None).is_err());
        let other = ChangeId {
            history: 1,
            epoch: 1,
        };
        let w = t.changed(other, None, None).unwrap();
        assert_eq!(w.ranges, vec![0..64 << 20]);
        assert!(w.whole_disk.unwrap().contains("another change history"));
    }

    #[test]
    fn a_crash_keeps_the_history_and_covers_what_was_in_flight() {
        let (_d, s) = setup(256 << 20);
        let e1;
        {
            let t = Tracker::open(&s, "d-ctk.vmdk", true).unwrap();
            t.begin(7).unwrap();
            t.record(0, 1).unwrap();
            e1 = t.end_epoch(8).unwrap();
            // Epoch 2: a write in region 1 (64 MiB..128 MiB), never
            // checkpointed: the tracker is dropped as by a crash.
            t.record((64 << 20) + 5 * BLOCK, 1).unwrap();
        }
        let t = Tracker::open(&s, "d-ctk.vmdk", false).unwrap();
        let r = t.changed(e1, None, None).unwrap().ranges;
        assert_eq!(r, vec![64 << 20..128 << 20], "the whole intent region");
        drop(t);
        let t = Tracker::open(&s, "d-ctk.vmdk", true).unwrap();
        assert!(t.header().open);
        t.begin(8).unwrap();
        assert_eq!(
            t.changed(e1, None, None).unwrap().ranges,
            vec![64 << 20..128 << 20]
        );
        // Epoch 1's answer is unchanged by the crash.
        assert_eq!(
            t.changed(id(&t, 0), Some(e1), None).unwrap().ranges,
            vec![0..BLOCK]
        );
    }

    #[test]
    fn a_damaged_page_counts_as_changed_and_a_torn_header_falls_back() {
        let (d, s) = setup(64 << 20);
        let e1;
        {
            let t = Tracker::open(&s, "d-ctk.vmdk", true).unwrap();
            t.begin(7).unwrap();
            t.record(0, 1).unwrap();
            e1 = t.end_epoch(8).unwrap();
            t.close(8, 1).unwrap();
        }
        let p = d.path().join("d-ctk.vmdk");
        let mut b = std::fs::read(&p).unwrap();
        b[PAGES_AT as usize + 100] ^= 1;
        std::fs::write(&p, &b).unwrap();
        let t = Tracker::open(&s, "d-ctk.vmdk", false).unwrap();
        let r = t.changed(e1, None, None).unwrap().ranges;
        assert_eq!(r, vec![0..PER_PAGE * BLOCK]);
        drop(t);
        // The newer header slot torn: the older one answers.
        let newer = t_gen_slot(&b);
        b[(newer * SLOT) as usize + 40] ^= 0xff;
        std::fs::write(&p, &b).unwrap();
        let t = Tracker::open(&s, "d-ctk.vmdk", false).unwrap();
        assert!(t.header().gen > 1);
    }

    fn t_gen_slot(b: &[u8]) -> u64 {
        let g0 = Header::decode(&b[..4096]).map(|h| h.gen).unwrap_or(0);
        let g1 = Header::decode(&b[4096..8192]).map(|h| h.gen).unwrap_or(0);
        if g0 > g1 {
            0
        } else {
            1
        }
    }

    #[test]
    fn growing_marks_the_new_blocks() {
        let (_d, s) = setup(1 << 20);
        let t = Tracker::open(&s, "d-ctk.vmdk", true).unwrap();
        t.begin(7).unwrap();
        let e1 = t.end_epoch(7).unwrap();
        t.grow(3 << 20).unwrap();
        assert_eq!(
            t.changed(e1, None, None).unwrap().ranges,
            vec![1 << 20..3 << 20]
        );
    }

    #[test]
    fn change_ids_parse_and_print() {
        let c = ChangeId {
            history: 0xabc,
            epoch: 12,
        };
        assert_eq!(c.to_string(), "0000000000000abc/12");
        assert_eq!("0000000000000abc/12".parse::<ChangeId>().unwrap(), c);
        for bad in [
            "",
            "*",
            "abc/1",
            "0000000000000abc/",
            "0000000000000abc/x",
            "zzzzzzzzzzzzzzzz/1",
        ] {
            assert!(bad.parse::<ChangeId>().is_err(), "{bad}");
        }
    }
}
