//! On-disk locks for hosts that share nothing but LUNs.
//!
//! A **lock sector** (512 bytes, [`LockRec`]) sits beside the object it
//! guards. It says the mode (free, exclusive, shared read-only,
//! multi-writer), the holders (host slot + slot generation) and a lock
//! generation bumped at every exclusive acquisition, which lets a host keep
//! what it cached under the lock while nobody else took it.
//!
//! A holder is **current** while its slot still has that generation and is
//! not free; the membership layer (heartbeats, recovery) answers that
//! question ([`Members`]). A dead host's locks therefore break by themselves
//! once a survivor has replayed its journal and bumped its slot's generation:
//! nobody ever writes into another host's lock to take it.
//!
//! Two ways to change a lock atomically:
//! * **compare-and-write** of the LUN block holding the sector, where the LUN
//!   has it (file LUNs; SCSI COMPARE AND WRITE);
//! * **Disk Paxos** (Gafni and Lamport; sanlock's `paxos_lease.c`) where it
//!   has not (NBD, tgt): each host has a ballot block ([`Dblock`], kept in its
//!   heartbeat sector by the caller, [`BallotBox`]); an acquisition is one
//!   Paxos instance numbered by the lock generation, decided by two rounds of
//!   "write my block, read everyone's". The lock sector is then a record the
//!   winner writes, never the source of truth.
//!
//! The datastore takes one such lock, the **volume lock** ([`VolumeLock`]),
//! for every metadata change; the locks of individual objects (a file opened
//! for writing) are then changed under it with plain writes
//! ([`acquire_under_volume_lock`]).

use std::sync::Arc;

use lun::{CompareAndWrite, Lun, LunError};
use thiserror::Error;

/// Size of a lock sector.
pub const SECTOR: usize = 512;
/// "VLCK"
pub const MAGIC: u32 = 0x564c_434b;
pub const VERSION: u16 = 1;
/// Holders one lock sector can list (shared and multi-writer modes).
pub const MAX_HOLDERS: usize = 32;
const HOLDERS_OFF: usize = 16;
const HOLDER_LEN: usize = 12;
/// The holder a free lock is kept for (volume lock hand-over): slot u32,
/// generation u64 (0: kept for nobody). Zero in sectors written before it.
const NEXT_OFF: usize = 400;
const CRC_OFF: usize = 508;

#[derive(Debug, Error)]
pub enum LockError {
    #[error(transparent)]
    Lun(#[from] LunError),
    #[error("{lun}: lock sector at offset {offset}: {reason}")]
    Corrupt {
        lun: String,
        offset: u64,
        reason: String,
    },
    #[error("{lun}: the lock at offset {offset} already lists {MAX_HOLDERS} holders")]
    TooManyHolders { lun: String, offset: u64 },
    #[error("{lun}: the lock at offset {offset} keeps changing under compare-and-write")]
    Contended { lun: String, offset: u64 },
}

pub type Result<T> = std::result::Result<T, LockError>;

/// A lock mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Free = 0,
    Exclusive = 1,
    /// Shared, read-only.
    Shared = 2,
    /// Shared by writers that coordinate among themselves (clustered guests).
    MultiWriter = 3,
}

impl Mode {
    fn from_u8(v: u8) -> Option<Mode> {
        Some(match v {
            0 => Mode::Free,
            1 => Mode::Exclusive,
            2 => Mode::Shared,
            3 => Mode::MultiWriter,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Mode::Free => "free",
            Mode::Exclusive => "exclusive",
            Mode::Shared => "shared read-only",
            Mode::MultiWriter => "multi-writer",
        }
    }
}

/// A host incarnation: its heartbeat slot and that slot's generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Holder {
    pub slot: u32,
    pub generation: u64,
}

/// Whether a holder is still the live (or not yet recovered) incarnation of
/// its slot. Implemented by the membership layer.
pub trait Members {
    fn is_current(&self, h: &Holder) -> bool;
}

impl<F: Fn(&Holder) -> bool> Members for F {
    fn is_current(&self, h: &Holder) -> bool {
        self(h)
    }
}

/// The decoded contents of a lock sector. An all-zero sector is a free lock
/// of generation 0 (what mkfs writes).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LockRec {
    pub mode: Mode,
    pub generation: u64,
    pub holders: Vec<Holder>,
    /// While free: the host its last holder handed it to (the volume lock's
    /// fair hand-over, [`VolumeLock::release_to`]); others leave it to that
    /// host until it takes it, dies, or lets the reservation lapse.
    pub next: Option<Holder>,
}

fn get32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn get64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

impl LockRec {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SECTOR];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6] = self.mode as u8;
        b[7] = self.holders.len().min(MAX_HOLDERS) as u8;
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        for (i, h) in self.holders.iter().take(MAX_HOLDERS).enumerate() {
            let o = HOLDERS_OFF + i * HOLDER_LEN;
            b[o..o + 4].copy_from_slice(&h.slot.to_le_bytes());
            b[o + 4..o + 12].copy_from_slice(&h.generation.to_le_bytes());
        }
        if let Some(n) = self.next {
            b[NEXT_OFF..NEXT_OFF + 4].copy_from_slice(&n.slot.to_le_bytes());
            b[NEXT_OFF + 4..NEXT_OFF + 12].copy_from_slice(&n.generation.to_le_bytes());
        }
        let crc = crc32fast::hash(&b[..CRC_OFF]);
        b[CRC_OFF..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode a sector; `Err(reason)` when it is neither zero nor a valid lock.
    pub fn decode(b: &[u8]) -> std::result::Result<LockRec, String> {
        if b.len() < SECTOR {
            return Err(format!("{} bytes, a lock sector has {SECTOR}", b.len()));
        }
        let b = &b[..SECTOR];
        if b.iter().all(|&x| x == 0) {
            return Ok(LockRec::default());
        }
        if get32(b, 0) != MAGIC {
            return Err(format!("bad magic {:#010x}", get32(b, 0)));
        }
        let v = u16::from_le_bytes([b[4], b[5]]);
        if v != VERSION {
            return Err(format!(
                "lock format version {v}, this program knows {VERSION}"
            ));
        }
        let crc = crc32fast::hash(&b[..CRC_OFF]);
        if get32(b, CRC_OFF) != crc {
            return Err("checksum mismatch".into());
        }
        let mode = Mode::from_u8(b[6]).ok_or_else(|| format!("unknown lock mode {}", b[6]))?;
        let n = b[7] as usize;
        if n > MAX_HOLDERS {
            return Err(format!("{n} holders, at most {MAX_HOLDERS}"));
        }
        if (mode == Mode::Free) != (n == 0) || (mode == Mode::Exclusive && n != 1) {
            return Err(format!("mode {} with {n} holders", mode.name()));
        }
        let holders = (0..n)
            .map(|i| {
                let o = HOLDERS_OFF + i * HOLDER_LEN;
                Holder {
                    slot: get32(b, o),
                    generation: get64(b, o + 4),
                }
            })
            .collect();
        let next = Some(Holder {
            slot: get32(b, NEXT_OFF),
            generation: get64(b, NEXT_OFF + 4),
        })
        .filter(|n| n.generation != 0);
        Ok(LockRec {
            mode,
            generation: get64(b, 8),
            holders,
            next,
        })
    }

    /// The same lock with holders that are no longer current removed.
    pub fn live(&self, m: &dyn Members) -> LockRec {
        self.keep(|h| m.is_current(h))
    }

    /// The same lock with only the holders `f` keeps (free when none).
    fn keep(&self, f: impl Fn(&Holder) -> bool) -> LockRec {
        let holders: Vec<Holder> = self.holders.iter().copied().filter(|h| f(h)).collect();
        LockRec {
            mode: if holders.is_empty() {
                Mode::Free
            } else {
                self.mode
            },
            generation: self.generation,
            holders,
            next: self.next,
        }
    }

    /// Whether `mode` can be granted to `me` beside the current holders.
    pub fn grants(&self, mode: Mode, me: &Holder) -> bool {
        let others = self.holders.iter().any(|h| h != me);
        match (self.mode, mode) {
            (_, Mode::Free) => true,
            (Mode::Free, _) => true,
            _ if !others => true, // only this host holds it: any change is its own
            (Mode::Shared, Mode::Shared) | (Mode::MultiWriter, Mode::MultiWriter) => true,
            _ => false,
        }
    }

    /// Add `me` in `mode` (the caller checked [`LockRec::grants`]).
    pub fn with(&self, mode: Mode, me: Holder) -> LockRec {
        let mut holders: Vec<Holder> = self.holders.iter().copied().filter(|h| *h != me).collect();
        holders.push(me);
        LockRec {
            mode,
            generation: self.generation + u64::from(mode == Mode::Exclusive),
            holders,
            next: None,
        }
    }

    /// Remove `me`.
    pub fn without(&self, me: &Holder) -> LockRec {
        self.keep(|h| h != me)
    }
}

fn corrupt(lun: &dyn Lun, offset: u64, reason: String) -> LockError {
    LockError::Corrupt {
        lun: lun.name().to_string(),
        offset,
        reason,
    }
}

/// Reads of a sector another host is writing may come back torn on LUNs
/// that are files (the page cache copies without a lock) or served from
/// files (qemu-nbd, nbdkit): a sector that fails its checksum is read again
/// a few times before it counts as damaged.
pub const TORN_READ_RETRIES: u32 = 20;

/// The wait before read `tries` of a sector that came back torn.
pub fn torn_read_pause(tries: u32) {
    std::thread::sleep(std::time::Duration::from_micros(50 << tries.min(6)));
}

/// Read and decode the lock sector at `off`.
pub fn read_lock(lun: &dyn Lun, off: u64) -> Result<LockRec> {
    let mut b = vec![0u8; SECTOR];
    let mut tries = 0;
    loop {
        lun.read_at(&mut b, off)?;
        match LockRec::decode(&b) {
            Ok(r) => return Ok(r),
            Err(_) if tries < TORN_READ_RETRIES => {
                tries += 1;
                torn_read_pause(tries);
            }
            Err(r) => return Err(corrupt(lun, off, r)),
        }
    }
}

/// Change the lock sector at `off` to `f(current)` (None: leave it).
/// With `caw`, by compare-and-write of the LUN block that holds it (retried
/// when only other bytes of that block moved): atomic against every other
/// host. Without, a read and a write: the caller must hold a lock that
/// excludes every other writer of this sector (the volume lock).
/// Returns the record that was there and the one written, if any.
pub fn update(
    lun: &dyn Lun,
    off: u64,
    caw: bool,
    f: impl Fn(&LockRec) -> Result<Option<LockRec>>,
) -> Result<(LockRec, Option<LockRec>)> {
    if !caw {
        let cur = read_lock(lun, off)?;
        let new = f(&cur)?;
        if let Some(n) = &new {
            lun.write_at(&n.encode(), off)?;
        }
        return Ok((cur, new));
    }
    let mut torn = 0;
    let mut seen = (LockRec::default(), None);
    caw_in_block(lun, off, SECTOR, |b| match LockRec::decode(b) {
        Ok(cur) => {
            let new = f(&cur)?;
            let d = new
                .as_ref()
                .map_or(Decision::Keep, |n| Decision::Write(n.encode()));
            seen = (cur, new);
            Ok(d)
        }
        Err(_) if torn < TORN_READ_RETRIES => {
            torn += 1;
            torn_read_pause(torn);
            Ok(Decision::ReadAgain)
        }
        Err(r) => Err(corrupt(lun, off, r)),
    })?;
    Ok(seen)
}

/// What [`caw_in_block`] does with the bytes it read.
pub enum Decision {
    /// Leave them.
    Keep,
    /// Replace them with these (same length).
    Write(Vec<u8>),
    /// Read again (a torn read).
    ReadAgain,
}

/// Change the `len` bytes at `off` by compare-and-write of the LUN block
/// that holds them: read the block, let `decide` look at the bytes, write
/// the block back with the new bytes if the whole block is unchanged, and
/// start over when other bytes of it moved meanwhile (a neighbouring sector
/// of a 4K-sector LUN). Returns whether `decide`'s bytes were written.
pub fn caw_in_block<E: From<LockError>>(
    lun: &dyn Lun,
    off: u64,
    len: usize,
    mut decide: impl FnMut(&[u8]) -> std::result::Result<Decision, E>,
) -> std::result::Result<bool, E> {
    let bs = u64::from(lun.block_size()).max(len as u64);
    let base = off - off % bs;
    let at = (off - base) as usize;
    let mut block = vec![0u8; bs as usize];
    for _ in 0..1000 {
        lun.read_at(&mut block, base).map_err(LockError::from)?;
        let new = match decide(&block[at..at + len])? {
            Decision::Keep => return Ok(false),
            Decision::ReadAgain => continue,
            Decision::Write(n) => n,
        };
        let mut nb = block.clone();
        nb[at..at + len].copy_from_slice(&new);
        match lun
            .compare_and_write(base, &block, &nb)
            .map_err(LockError::from)?
        {
            CompareAndWrite::Written => return Ok(true),
            CompareAndWrite::Mismatch => continue,
        }
    }
    Err(LockError::Contended {
        lun: lun.name().to_string(),
        offset: off,
    }
    .into())
}

/// A host's Disk Paxos ballot block for the volume lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dblock {
    /// The Paxos instance (lock generation) this block votes in.
    pub lver: u64,
    /// The highest ballot this host started in that instance.
    pub mbal: u64,
    /// The ballot of its last accepted value (0: none).
    pub bal: u64,
    /// Its last accepted value: the host to own the lock.
    pub inp: Holder,
}

pub const DBLOCK_LEN: usize = 36;

impl Dblock {
    pub fn encode(&self) -> [u8; DBLOCK_LEN] {
        let mut b = [0u8; DBLOCK_LEN];
        b[0..8].copy_from_slice(&self.lver.to_le_bytes());
        b[8..16].copy_from_slice(&self.mbal.to_le_bytes());
        b[16..24].copy_from_slice(&self.bal.to_le_bytes());
        b[24..28].copy_from_slice(&self.inp.slot.to_le_bytes());
        b[28..36].copy_from_slice(&self.inp.generation.to_le_bytes());
        b
    }
    pub fn decode(b: &[u8]) -> Dblock {
        Dblock {
            lver: get64(b, 0),
            mbal: get64(b, 8),
            bal: get64(b, 16),
            inp: Holder {
                slot: get32(b, 24),
                generation: get64(b, 28),
            },
        }
    }
}

/// Where the hosts' ballot blocks live (the heartbeat sectors).
pub trait BallotBox {
    /// Write this host's block (only this host ever writes it).
    fn write_mine(&self, d: &Dblock) -> Result<()>;
    /// Every slot's block, indexed by slot, read in one go.
    fn read_all(&self) -> Result<Vec<Dblock>>;
}

/// The outcome of one attempt to take a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Taken; the lock's generation is now this.
    Acquired { generation: u64 },
    /// Held by a current holder (the record says who).
    Busy(LockRec),
    /// Another host was taking it at the same moment: back off and retry.
    Collided,
}

/// How a LUN's locks are changed: shown by `vmfs info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    CompareAndWrite,
    DiskPaxos,
}

impl Method {
    pub fn for_lun(lun: &dyn Lun) -> Method {
        if lun.has_compare_and_write() {
            Method::CompareAndWrite
        } else {
            Method::DiskPaxos
        }
    }
    pub fn describe(self) -> &'static str {
        match self {
            Method::CompareAndWrite => "compare-and-write (atomic test-and-set)",
            Method::DiskPaxos => "Disk Paxos over the heartbeat sectors (no compare-and-write)",
        }
    }
}

/// The one lock every metadata change of a datastore is made under.
///
/// **Fair hand-over.** A holder that gives the lock back because other hosts
/// wait for it names the next one ([`VolumeLock::release_to`]; the caller
/// picks waiters in turn, by slot). Until that host takes it, every other
/// host (the releaser included) counts the lock as busy, so no host can be
/// overtaken forever by faster or closer ones. A reservation lapses when
/// its host is no longer current, or when an observer has seen it unchanged
/// for [`VolumeLock::lapse`] on its own clock (the host stopped waiting, or
/// stalls): then anyone may take the lock again.
pub struct VolumeLock {
    pub lun: Arc<dyn Lun>,
    /// Byte offset of its lock sector.
    pub off: u64,
    pub method: Method,
    /// How long a reservation holds against this host.
    pub lapse: std::time::Duration,
    /// The reservation this host saw first, and when (its own clock).
    seen: std::sync::Mutex<Option<(u64, Holder, std::time::Instant)>>,
}

/// Ballots are `round * BALLOT_SLOTS + slot + 1`: unique per host.
const BALLOT_SLOTS: u64 = 4096;

enum Ballot {
    Won,
    Lost(Holder),
    Conflict,
    /// Some host already votes in a later instance: this one is over.
    Over,
}

/// After a phase of ballot `mbal` in instance `l` by slot `s`: why it must
/// stop, if it must. A block that moved on to a later instance no longer
/// shows its ballot in this one, so it counts as a higher ballot too
/// (checked in both phases): without that, a host could "win" an instance
/// another host had already won, released and left behind.
fn outrun(all: &[Dblock], s: usize, l: u64, mbal: u64) -> Option<Ballot> {
    if all.iter().any(|d| d.lver > l) {
        return Some(Ballot::Over);
    }
    all.iter()
        .enumerate()
        .any(|(q, d)| q != s && d.lver == l && d.mbal > mbal)
        .then_some(Ballot::Conflict)
}

impl VolumeLock {
    pub fn new(lun: Arc<dyn Lun>, off: u64) -> VolumeLock {
        let method = Method::for_lun(&*lun);
        VolumeLock {
            lun,
            off,
            method,
            lapse: std::time::Duration::from_millis(500),
            seen: std::sync::Mutex::new(None),
        }
    }

    /// The host other than `me` that the free lock `rec` is kept for, while
    /// that reservation holds (see the type's doc).
    pub fn reserved_for(&self, rec: &LockRec, me: Holder, members: &dyn Members) -> Option<Holder> {
        let n = rec.next?;
        if n == me || !rec.holders.is_empty() || !members.is_current(&n) {
            return None;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match *seen {
            Some((g, h, t)) if g == rec.generation && h == n => {
                if t.elapsed() >= self.lapse {
                    return None;
                }
            }
            _ => *seen = Some((rec.generation, n, std::time::Instant::now())),
        }
        Some(n)
    }

    /// The lock sector as it is now.
    pub fn peek(&self) -> Result<LockRec> {
        read_lock(&*self.lun, self.off)
    }

    /// One attempt to take the lock exclusively for `me`.
    pub fn try_acquire(
        &self,
        me: Holder,
        members: &dyn Members,
        ballots: &dyn BallotBox,
    ) -> Result<Attempt> {
        match self.method {
            Method::CompareAndWrite => {
                let (cur, new) = update(&*self.lun, self.off, true, |cur| {
                    let live = cur.live(members);
                    if live.holders.iter().any(|h| *h != me)
                        || self.reserved_for(&live, me, members).is_some()
                    {
                        return Ok(None);
                    }
                    Ok(Some(LockRec {
                        mode: Mode::Exclusive,
                        generation: cur.generation + 1,
                        holders: vec![me],
                        next: None,
                    }))
                })?;
                Ok(match new {
                    Some(n) => Attempt::Acquired {
                        generation: n.generation,
                    },
                    None => Attempt::Busy(cur.live(members)),
                })
            }
            Method::DiskPaxos => self.try_paxos(me, members, ballots),
        }
    }

    fn try_paxos(
        &self,
        me: Holder,
        members: &dyn Members,
        ballots: &dyn BallotBox,
    ) -> Result<Attempt> {
        let leader = self.peek()?;
        let live = leader.live(members);
        if live.holders.iter().any(|h| *h != me) || self.reserved_for(&live, me, members).is_some()
        {
            return Ok(Attempt::Busy(live));
        }
        // Instance numbers only grow; skip instances won by hosts that died
        // before recording (or using) their win.
        // A ballot block in a later instance than the lock sector shows
        // means every instance before it was decided (a host moves on only
        // then): start there.
        let newest = ballots
            .read_all()?
            .iter()
            .map(|d| d.lver)
            .max()
            .unwrap_or(0);
        let mut l = (leader.generation + 1).max(newest);
        for _ in 0..64 {
            match self.ballot(l, me, ballots)? {
                Ballot::Won => {
                    let rec = LockRec {
                        mode: Mode::Exclusive,
                        generation: l,
                        holders: vec![me],
                        next: None,
                    };
                    self.lun.write_at(&rec.encode(), self.off)?;
                    return Ok(Attempt::Acquired { generation: l });
                }
                Ballot::Lost(v) if members.is_current(&v) => {
                    return Ok(Attempt::Busy(LockRec {
                        mode: Mode::Exclusive,
                        generation: l,
                        holders: vec![v],
                        next: None,
                    }))
                }
                Ballot::Lost(_) => l += 1,
                Ballot::Conflict | Ballot::Over => return Ok(Attempt::Collided),
            }
        }
        Ok(Attempt::Collided)
    }

    /// One Disk Paxos ballot in instance `l`, proposing `me`.
    fn ballot(&self, l: u64, me: Holder, bb: &dyn BallotBox) -> Result<Ballot> {
        let all = bb.read_all()?;
        let s = me.slot as usize;
        let Some(mine) = all.get(s).copied() else {
            return Err(corrupt(
                &*self.lun,
                self.off,
                format!("no ballot block for slot {s}"),
            ));
        };
        if all.iter().any(|d| d.lver > l) {
            return Ok(Ballot::Over);
        }
        let top = all
            .iter()
            .filter(|d| d.lver == l)
            .map(|d| d.mbal)
            .max()
            .unwrap_or(0);
        let mbal = (top / BALLOT_SLOTS + 1) * BALLOT_SLOTS + u64::from(me.slot) + 1;
        let (bal, inp) = if mine.lver == l {
            (mine.bal, mine.inp)
        } else {
            (0, Holder::default())
        };
        // Phase 1: announce the ballot, then see whether a higher one exists
        // and which value, if any, may already have been chosen.
        bb.write_mine(&Dblock {
            lver: l,
            mbal,
            bal,
            inp,
        })?;
        let all = bb.read_all()?;
        if let Some(abort) = outrun(&all, s, l, mbal) {
            return Ok(abort);
        }
        let v = all
            .iter()
            .filter(|d| d.lver == l && d.bal > 0)
            .max_by_key(|d| d.bal)
            .map_or(me, |d| d.inp);
        // Phase 2: accept the value; it is chosen if no higher ballot began.
        bb.write_mine(&Dblock {
            lver: l,
            mbal,
            bal: mbal,
            inp: v,
        })?;
        let all = bb.read_all()?;
        if let Some(abort) = outrun(&all, s, l, mbal) {
            return Ok(abort);
        }
        Ok(if v == me {
            Ballot::Won
        } else {
            Ballot::Lost(v)
        })
    }

    /// Give the lock back (only its holder calls this).
    pub fn release(&self, me: Holder) -> Result<()> {
        self.release_to(me, None)
    }

    /// Give the lock back, kept for `next` (a host waiting for it) if given.
    pub fn release_to(&self, me: Holder, next: Option<Holder>) -> Result<()> {
        let caw = self.method == Method::CompareAndWrite;
        update(&*self.lun, self.off, caw, |cur| {
            if !cur.holders.contains(&me) {
                return Err(corrupt(
                    &*self.lun,
                    self.off,
                    format!(
                        "this host (slot {}, generation {}) releases the volume lock but the sector lists {:?}",
                        me.slot, me.generation, cur.holders
                    ),
                ));
            }
            let mut free = cur.without(&me);
            free.next = next.filter(|n| *n != me);
            Ok(Some(free))
        })?;
        Ok(())
    }
}

/// Change an object's lock while holding the volume lock (which orders
/// every change of lock sectors, on any LUN): grant `mode` to `me` if the
/// current holders allow it. Where the LUN has compare-and-write, the
/// change is a compare-and-write of the state read as well; without, the
/// volume lock alone (Disk Paxos) makes the read and write safe.
/// Returns Ok(Err(holders)) when the holders do not allow it.
pub fn acquire_under_volume_lock(
    lun: &dyn Lun,
    off: u64,
    mode: Mode,
    me: Holder,
    members: &dyn Members,
) -> Result<std::result::Result<LockRec, LockRec>> {
    let (cur, new) = update(lun, off, lun.has_compare_and_write(), |cur| {
        let live = cur.live(members);
        if !live.grants(mode, &me) {
            return Ok(None);
        }
        if live.holders.len() >= MAX_HOLDERS && !live.holders.contains(&me) {
            return Err(LockError::TooManyHolders {
                lun: lun.name().to_string(),
                offset: off,
            });
        }
        Ok(Some(live.with(mode, me)))
    })?;
    Ok(new.ok_or_else(|| cur.live(members)))
}

/// Drop `me` from an object's lock while holding the volume lock (by
/// compare-and-write where the LUN has it, as above).
pub fn release_under_volume_lock(lun: &dyn Lun, off: u64, me: Holder) -> Result<()> {
    update(lun, off, lun.has_compare_and_write(), |cur| {
        Ok(cur.holders.contains(&me).then(|| cur.without(&me)))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests;
