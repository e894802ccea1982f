//! A direct-access logical unit (SBC-4) emulated over a
//! [`Backend`]: what each command does, the pages INQUIRY and MODE SENSE
//! answer, the write cache, discard, and the reservation check. The anchor
//! is QEMU's `hw/scsi/scsi-disk.c`; this goes past it with VPD 0x83
//! designators that are the same on every host, GET LBA STATUS and
//! persistent reservations.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::cdb::{self, Blocks, Command, Lba};
use super::pr::{Access, PrFailure, PrState, PrStore};
use super::sense::{Sense, Status};
use crate::backend::{Backend, BackendError};

/// The most blocks one READ or WRITE may move (VPD B0h): 16 MiB of 512.
pub const MAX_TRANSFER_BLOCKS: u32 = 32768;
/// The most blocks one UNMAP or WRITE SAME may cover (VPD B0h).
pub const MAX_UNMAP_BLOCKS: u32 = 1 << 22;
/// The most descriptors one UNMAP may carry.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;

/// How a command ended, before the transport adds its framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// GOOD, with this many bytes of data-in.
    Good(usize),
    Check(Sense),
    Conflict,
    /// What a LUN passed through answered: any status, its sense, and
    /// this many bytes of data-in.
    Raw {
        status: u8,
        sense: Option<Sense>,
        len: usize,
    },
}

impl Outcome {
    /// The status byte.
    pub fn status(&self) -> u8 {
        match self {
            Outcome::Good(_) => Status::Good as u8,
            Outcome::Check(_) => Status::CheckCondition as u8,
            Outcome::Conflict => Status::ReservationConflict as u8,
            Outcome::Raw { status, .. } => *status,
        }
    }

    /// Bytes of data-in.
    pub fn data_len(&self) -> usize {
        match self {
            Outcome::Good(n) | Outcome::Raw { len: n, .. } => *n,
            _ => 0,
        }
    }

    /// The sense data, when there is one.
    pub fn sense(&self) -> Option<Sense> {
        match self {
            Outcome::Check(s) => Some(*s),
            Outcome::Raw { sense, .. } => *sense,
            _ => None,
        }
    }
}

impl From<PrFailure> for Outcome {
    fn from(f: PrFailure) -> Self {
        match f {
            PrFailure::Conflict => Outcome::Conflict,
            PrFailure::Check(s) => Outcome::Check(s),
        }
    }
}

impl From<Sense> for Outcome {
    fn from(s: Sense) -> Self {
        Outcome::Check(s)
    }
}

fn backend_sense(e: &BackendError, unit: &str) -> Sense {
    tracing::warn!("{unit}: {e}");
    match e {
        BackendError::Read(_) => Sense::UNRECOVERED_READ_ERROR,
        BackendError::Write(_) => Sense::WRITE_ERROR,
        BackendError::NoSpace(_) => Sense::SPACE_ALLOCATION_FAILED,
        BackendError::ReadOnly(_) => Sense::WRITE_PROTECTED,
        BackendError::Failed(_) => Sense::INTERNAL_TARGET_FAILURE,
    }
}

/// Counters `scsi list` shows.
#[derive(Debug, Default)]
pub struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub errors: AtomicU64,
    pub discards: AtomicU64,
}

/// One I/O's buffers: what the initiator sent, and where the data-in goes
/// (cleared and filled; at most `data_in_max` bytes are wanted).
pub struct Buffers<'a> {
    pub data_out: &'a [u8],
    pub data_in: &'a mut Vec<u8>,
    pub data_in_max: usize,
}

/// An emulated disk.
pub struct DiskUnit {
    backend: Arc<dyn Backend>,
    pr: Arc<dyn PrStore>,
    /// WCE: writes may be acknowledged before they are durable.
    write_cache: AtomicBool,
    pub counters: Counters,
    name: String,
}

impl DiskUnit {
    pub fn new(name: String, backend: Arc<dyn Backend>, pr: Arc<dyn PrStore>) -> DiskUnit {
        DiskUnit {
            backend,
            pr,
            write_cache: AtomicBool::new(true),
            counters: Counters::default(),
            name,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    fn bs(&self) -> u64 {
        u64::from(self.backend.block_size())
    }

    fn blocks(&self) -> u64 {
        self.backend.capacity() / self.bs()
    }

    /// `lba + blocks` inside the unit.
    fn check_range(&self, lba: Lba, blocks: u64) -> Result<(), Sense> {
        match lba.0.checked_add(blocks) {
            Some(end) if end <= self.blocks() => Ok(()),
            _ => Err(Sense::LBA_OUT_OF_RANGE),
        }
    }

    /// A unit attention waiting for `nexus` from the reservation state
    /// (REQUEST SENSE asks; other commands find it in [`DiskUnit::execute`]).
    pub fn pending_attention(&self, nexus: &str) -> Option<Sense> {
        if !self.pr.maybe_active() {
            return None;
        }
        self.take_pending(nexus, &self.pr.current().ok()?)
    }

    /// Take `nexus`'s first unit attention, when `state` (just read) says
    /// it has one: the state is changed only then.
    fn take_pending(&self, nexus: &str, state: &PrState) -> Option<Sense> {
        if !state.pending.iter().any(|p| p.0 == nexus) {
            return None;
        }
        let mut got = None;
        let _ = self.pr.transact(&mut |s: &mut PrState| {
            got = s.take_pending(nexus);
            Ok(got.is_some())
        });
        got
    }

    /// Carry out `cmd` for initiator `nexus`: first a unit attention the
    /// reservation state holds for it (but for INQUIRY and REQUEST SENSE),
    /// then the reservation's access check, from one read of the state.
    pub fn execute(&self, nexus: &str, cmd: &Command, io: Buffers<'_>) -> Outcome {
        io.data_in.clear();
        let access = match cmd {
            Command::Read { .. } | Command::Verify { .. } | Command::GetLbaStatus { .. } => {
                Access::Read
            }
            Command::Write { .. }
            | Command::WriteSame { .. }
            | Command::Unmap { .. }
            | Command::SynchronizeCache { .. }
            | Command::ModeSelect { .. } => Access::Write,
            _ => Access::None,
        };
        if self.pr.maybe_active() {
            match self.pr.current() {
                Ok(s) => {
                    if !matches!(cmd, Command::Inquiry { .. } | Command::RequestSense { .. }) {
                        if let Some(ua) = self.take_pending(nexus, &s) {
                            return Outcome::Check(ua);
                        }
                    }
                    if !s.allows(nexus, access) {
                        return Outcome::Conflict;
                    }
                }
                // A state that cannot be read stops only what it guards.
                Err(f) if access != Access::None => return f.into(),
                Err(_) => {}
            }
        }
        let r = self.run(nexus, cmd, io);
        if r.status() != Status::Good as u8 {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn run(&self, nexus: &str, cmd: &Command, io: Buffers<'_>) -> Outcome {
        let bs = self.bs();
        let out = io.data_in;
        let reply = |out: &mut Vec<u8>, data: &[u8], alloc: u32| -> Outcome {
            let n = data.len().min(alloc as usize).min(io.data_in_max);
            out.extend_from_slice(&data[..n]);
            Outcome::Good(n)
        };
        match *cmd {
            // REPORT LUNS is the target's (it never reaches a unit).
            Command::TestUnitReady
            | Command::StartStopUnit
            | Command::PreventAllow
            | Command::ReportLuns { .. } => Outcome::Good(0),
            Command::SynchronizeCache { lba, blocks } => {
                if let Err(s) = self.check_range(lba, u64::from(blocks.0)) {
                    return s.into();
                }
                match self.backend.flush() {
                    Ok(()) => Outcome::Good(0),
                    Err(e) => backend_sense(&e, &self.name).into(),
                }
            }
            Command::Inquiry { evpd, page, alloc } => match self.inquiry(evpd, page) {
                Ok(d) => reply(out, &d, alloc),
                Err(s) => s.into(),
            },
            Command::ReadCapacity10 => {
                let last = self.blocks().saturating_sub(1);
                let mut d = [0u8; 8];
                d[0..4].copy_from_slice(&(last.min(0xFFFF_FFFF) as u32).to_be_bytes());
                d[4..8].copy_from_slice(&(bs as u32).to_be_bytes());
                reply(out, &d, 8)
            }
            Command::ReadCapacity16 { alloc } => {
                let mut d = [0u8; 32];
                d[0..8].copy_from_slice(&self.blocks().saturating_sub(1).to_be_bytes());
                d[8..12].copy_from_slice(&(bs as u32).to_be_bytes());
                // 4 KiB physical blocks.
                d[13] = (4096 / bs).max(1).trailing_zeros() as u8;
                if self.backend.thin() {
                    d[14] = 0x80 | 0x40; // LBPME, LBPRZ
                }
                reply(out, &d, alloc)
            }
            Command::GetLbaStatus { lba, alloc } => {
                if lba.0 >= self.blocks() {
                    return Sense::LBA_OUT_OF_RANGE.into();
                }
                match self.lba_status(lba) {
                    Ok(d) => reply(out, &d, alloc),
                    Err(e) => backend_sense(&e, &self.name).into(),
                }
            }
            Command::ModeSense {
                ten,
                dbd,
                llbaa,
                pc,
                page,
                subpage,
                alloc,
            } => match self.mode_sense(ten, dbd, llbaa, pc, page, subpage) {
                Ok(d) => reply(out, &d, alloc),
                Err(s) => s.into(),
            },
            Command::ModeSelect { ten, pf, save, len } => {
                match self.mode_select(ten, pf, save, len, io.data_out) {
                    Ok(()) => Outcome::Good(0),
                    Err(s) => s.into(),
                }
            }
            Command::Read {
                lba,
                blocks,
                fua: _,
            } => {
                if let Err(s) = self.check_transfer(lba, blocks) {
                    return s.into();
                }
                let n = (u64::from(blocks.0) * bs) as usize;
                if n > io.data_in_max {
                    return Sense::INVALID_TRANSFER.into();
                }
                out.resize(n, 0);
                match self.backend.read_at(out, lba.0 * bs) {
                    Ok(()) => {
                        self.counters.reads.fetch_add(1, Ordering::Relaxed);
                        self.counters
                            .read_bytes
                            .fetch_add(n as u64, Ordering::Relaxed);
                        Outcome::Good(n)
                    }
                    Err(e) => {
                        out.clear();
                        backend_sense(&e, &self.name).into()
                    }
                }
            }
            Command::Write { lba, blocks, fua } => {
                if let Err(s) = self.check_transfer(lba, blocks) {
                    return s.into();
                }
                let n = (u64::from(blocks.0) * bs) as usize;
                let Some(data) = io.data_out.get(..n) else {
                    return Sense::INVALID_TRANSFER.into();
                };
                let r = self.backend.write_at(data, lba.0 * bs).and_then(|()| {
                    if fua || !self.write_cache.load(Ordering::Relaxed) {
                        self.backend.flush()
                    } else {
                        Ok(())
                    }
                });
                match r {
                    Ok(()) => {
                        self.counters.writes.fetch_add(1, Ordering::Relaxed);
                        self.counters
                            .write_bytes
                            .fetch_add(n as u64, Ordering::Relaxed);
                        Outcome::Good(0)
                    }
                    Err(e) => backend_sense(&e, &self.name).into(),
                }
            }
            Command::Verify {
                lba,
                blocks,
                bytchk,
            } => self.verify(lba, blocks, bytchk, io.data_out).into_outcome(),
            Command::WriteSame {
                lba,
                blocks,
                unmap,
                ndob,
            } => self
                .write_same(lba, blocks, unmap, ndob, io.data_out)
                .into_outcome(),
            Command::Unmap { len } => self.unmap(len, io.data_out).into_outcome(),
            Command::RequestSense { descriptor, alloc } => {
                let d = if descriptor {
                    Sense::NONE.descriptor()
                } else {
                    Sense::NONE.fixed().to_vec()
                };
                reply(out, &d, alloc)
            }
            Command::ReportSupportedOpcodes {
                options,
                rctd,
                opcode,
                sa,
                alloc,
            } => match report_opcodes(options, rctd, opcode, sa) {
                Ok(d) => reply(out, &d, alloc),
                Err(s) => s.into(),
            },
            Command::PersistentReserveIn { sa, alloc } => match self.pr.current() {
                Ok(s) => reply(out, &s.input(sa), alloc),
                Err(f) => f.into(),
            },
            Command::PersistentReserveOut {
                sa,
                scope,
                kind,
                len,
            } => {
                let Some(param) = io.data_out.get(..len as usize) else {
                    return Sense::PARAMETER_LIST_LENGTH.into();
                };
                match self
                    .pr
                    .transact(&mut |s: &mut PrState| s.out(nexus, sa, scope, kind, param))
                {
                    Ok(()) => Outcome::Good(0),
                    Err(f) => f.into(),
                }
            }
        }
    }

    fn check_transfer(&self, lba: Lba, blocks: Blocks) -> Result<(), Sense> {
        if blocks.0 > MAX_TRANSFER_BLOCKS {
            return Err(Sense::cdb_field(7, None));
        }
        self.check_range(lba, u64::from(blocks.0))
    }

    fn inquiry(&self, evpd: bool, page: u8) -> Result<Vec<u8>, Sense> {
        let id = self.backend.identity();
        if !evpd {
            let mut d = vec![0u8; 36];
            d[0] = 0x00; // direct-access block device, connected
            d[2] = 0x06; // SPC-4
            d[3] = 0x12; // HISUP, response data format 2
            d[4] = 36 - 5;
            d[7] = 0x02; // CMDQUE
            d[8..16].copy_from_slice(b"VMFS    ");
            let mut p = [b' '; 16];
            let name = id.product.as_bytes();
            p[..name.len().min(16)].copy_from_slice(&name[..name.len().min(16)]);
            d[16..32].copy_from_slice(&p);
            d[32..36].copy_from_slice(b"0001");
            return Ok(d);
        }
        let mut d = vec![0x00, page, 0, 0];
        match page {
            0x00 => d.extend_from_slice(&[0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]),
            0x80 => d.extend_from_slice(id.serial().as_bytes()),
            0x83 => {
                // NAA, binary, associated with the logical unit.
                d.extend_from_slice(&[0x01, 0x03, 0x00, 8]);
                d.extend_from_slice(&id.naa());
                // T10 vendor ID, ASCII: vendor + the whole UUID.
                let t10 = format!("VMFS    {}", id.serial());
                d.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
                d.extend_from_slice(t10.as_bytes());
            }
            0xB0 => {
                let mut b = [0u8; 0x3C];
                b[0] = 0x01; // WSNZ: WRITE SAME of 0 blocks is refused
                let gran = (self.backend.discard_granularity() / self.bs()).max(1) as u32;
                b[4..8].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
                b[8..12].copy_from_slice(&(MAX_TRANSFER_BLOCKS / 4).to_be_bytes());
                if self.backend.thin() {
                    b[16..20].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
                    b[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
                    b[24..28].copy_from_slice(&gran.to_be_bytes());
                }
                b[32..40].copy_from_slice(&u64::from(MAX_UNMAP_BLOCKS).to_be_bytes());
                d.extend_from_slice(&b);
            }
            0xB1 => {
                let mut b = [0u8; 0x3C];
                b[1] = 0x01; // non-rotating medium
                d.extend_from_slice(&b);
            }
            0xB2 => {
                if self.backend.thin() {
                    // LBPU, LBPWS, LBPWS10, LBPRZ; thin provisioned.
                    d.extend_from_slice(&[0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0]);
                } else {
                    d.extend_from_slice(&[0, 0, 0, 0]);
                }
            }
            _ => return Err(Sense::cdb_field(2, None)),
        }
        let n = (d.len() - 4) as u16;
        d[2..4].copy_from_slice(&n.to_be_bytes());
        Ok(d)
    }

    fn lba_status(&self, lba: Lba) -> Result<Vec<u8>, BackendError> {
        let bs = self.bs();
        // Look at most 1 GiB ahead.
        let end = (lba.0 + (1 << 30) / bs).min(self.blocks());
        let (from, to) = (lba.0 * bs, end * bs);
        let mapped = self.backend.mapped(from, to - from)?;
        let mut d = vec![0u8; 8];
        let mut pos = from;
        let push = |a: u64, b: u64, state: u8, d: &mut Vec<u8>| {
            let mut a = a;
            while a < b && d.len() < 8 + 16 * 512 {
                let n = ((b - a) / bs).min(u64::from(u32::MAX)) as u32;
                d.extend_from_slice(&(a / bs).to_be_bytes());
                d.extend_from_slice(&n.to_be_bytes());
                d.extend_from_slice(&[state, 0, 0, 0]);
                a += u64::from(n) * bs;
            }
        };
        for r in mapped {
            let (a, b) = (r.start.max(pos), r.end.min(to));
            if a >= b {
                continue;
            }
            if a > pos {
                push(pos, a, 1, &mut d);
            }
            push(a, b, 0, &mut d);
            pos = b;
        }
        if pos < to {
            push(pos, to, 1, &mut d);
        }
        let n = (d.len() - 4) as u32;
        d[0..4].copy_from_slice(&n.to_be_bytes());
        Ok(d)
    }

    /// One mode page as `pc` asks (0 current, 1 changeable, 2 default).
    fn mode_page(&self, page: u8, pc: u8) -> Option<Vec<u8>> {
        match page {
            // Read-write error recovery: AWRE, ARRE as defaults.
            0x01 => Some(match pc {
                1 => vec![0x01, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                _ => vec![0x01, 0x0A, 0xC0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            }),
            // Caching: WCE is the one thing a MODE SELECT may change.
            0x08 => {
                let mut p = vec![0u8; 20];
                p[0] = 0x08;
                p[1] = 0x12;
                p[2] = match pc {
                    1 => 0x04,
                    2 => 0x04,
                    _ if self.write_cache.load(Ordering::Relaxed) => 0x04,
                    _ => 0,
                };
                Some(p)
            }
            // Control: unrestricted reordering, no TAS... as QEMU says.
            0x0A => {
                let mut p = vec![0u8; 12];
                p[0] = 0x0A;
                p[1] = 0x0A;
                if pc != 1 {
                    p[3] = 0x10; // queue algorithm modifier: unrestricted
                    p[8..10].copy_from_slice(&0xFFFFu16.to_be_bytes()); // busy timeout
                }
                Some(p)
            }
            _ => None,
        }
    }

    fn mode_sense(
        &self,
        ten: bool,
        dbd: bool,
        llbaa: bool,
        pc: u8,
        page: u8,
        subpage: u8,
    ) -> Result<Vec<u8>, Sense> {
        if pc == 3 {
            return Err(Sense::SAVING_NOT_SUPPORTED);
        }
        if subpage != 0 && subpage != 0xFF {
            return Err(Sense::cdb_field(3, None));
        }
        let mut pages = Vec::new();
        if page == 0x3F {
            for p in [0x01, 0x08, 0x0A] {
                pages.extend(self.mode_page(p, pc).unwrap_or_default());
            }
        } else {
            pages = self
                .mode_page(page, pc)
                .ok_or_else(|| Sense::cdb_field(2, Some(5)))?;
        }
        let blocks = self.blocks();
        let bs = self.bs() as u32;
        let bd: Vec<u8> = if dbd {
            Vec::new()
        } else if ten && llbaa {
            let mut b = blocks.to_be_bytes().to_vec();
            b.extend_from_slice(&[0, 0, 0, 0]);
            b.extend_from_slice(&bs.to_be_bytes());
            b
        } else {
            let mut b = (blocks.min(0xFFFF_FFFF) as u32).to_be_bytes().to_vec();
            b.push(0);
            b.extend_from_slice(&bs.to_be_bytes()[1..4]);
            b
        };
        // Device-specific: DPOFUA; WP for a read-only unit.
        let dsp = 0x10 | if self.backend.read_only() { 0x80 } else { 0 };
        let mut d = if ten {
            let mut h = vec![0u8; 8];
            h[3] = dsp;
            h[4] = u8::from(llbaa && !dbd);
            h[6..8].copy_from_slice(&(bd.len() as u16).to_be_bytes());
            h
        } else {
            vec![0, 0, dsp, bd.len() as u8]
        };
        d.extend_from_slice(&bd);
        d.extend_from_slice(&pages);
        if ten {
            let n = (d.len() - 2) as u16;
            d[0..2].copy_from_slice(&n.to_be_bytes());
        } else {
            d[0] = (d.len() - 1).min(255) as u8;
        }
        Ok(d)
    }

    fn mode_select(
        &self,
        ten: bool,
        pf: bool,
        save: bool,
        len: u32,
        data: &[u8],
    ) -> Result<(), Sense> {
        if save {
            return Err(Sense::SAVING_NOT_SUPPORTED);
        }
        if len == 0 {
            return Ok(());
        }
        if !pf {
            return Err(Sense::cdb_field(1, Some(4)));
        }
        let p = data
            .get(..len as usize)
            .ok_or(Sense::PARAMETER_LIST_LENGTH)?;
        let hdr = if ten { 8 } else { 4 };
        if p.len() < hdr {
            return Err(Sense::PARAMETER_LIST_LENGTH);
        }
        let bdl = if ten {
            usize::from(u16::from_be_bytes([p[6], p[7]]))
        } else {
            usize::from(p[3])
        };
        let mut i = hdr + bdl;
        if i > p.len() {
            return Err(Sense::PARAMETER_LIST_LENGTH);
        }
        // A block descriptor may only restate our block size.
        if bdl >= 8 {
            let b = &p[hdr..hdr + bdl];
            let size = u32::from_be_bytes([0, b[bdl - 3], b[bdl - 2], b[bdl - 1]]);
            if size != 0 && u64::from(size) != self.bs() {
                return Err(Sense::param_field((hdr + bdl - 3) as u16));
            }
        }
        let mut wce = None;
        while i < p.len() {
            let code = p[i] & 0x3F;
            if p[i] & 0x40 != 0 || i + 2 > p.len() {
                return Err(Sense::param_field(i as u16));
            }
            let plen = usize::from(p[i + 1]) + 2;
            let page = p.get(i..i + plen).ok_or(Sense::PARAMETER_LIST_LENGTH)?;
            let cur = self
                .mode_page(code, 0)
                .ok_or(Sense::param_field(i as u16))?;
            let can = self.mode_page(code, 1).unwrap_or_default();
            if page.len() != cur.len() {
                return Err(Sense::param_field(i as u16 + 1));
            }
            // Every bit that differs from the current value must be changeable.
            for k in 2..page.len() {
                if (page[k] ^ cur[k]) & !can[k] != 0 {
                    return Err(Sense::param_field((i + k) as u16));
                }
            }
            if code == 0x08 {
                wce = Some(page[2] & 0x04 != 0);
            }
            i += plen;
        }
        if let Some(w) = wce {
            if !w {
                // Turning the cache off: what it held becomes durable now.
                self.backend
                    .flush()
                    .map_err(|e| backend_sense(&e, &self.name))?;
            }
            self.write_cache.store(w, Ordering::Relaxed);
            tracing::info!(
                "{}: write cache {}",
                self.name,
                if w { "on" } else { "off" }
            );
        }
        Ok(())
    }

    fn verify(&self, lba: Lba, blocks: Blocks, bytchk: u8, data: &[u8]) -> Result<(), Sense> {
        if blocks.0 > MAX_TRANSFER_BLOCKS {
            return Err(Sense::cdb_field(7, None));
        }
        self.check_range(lba, u64::from(blocks.0))?;
        let bs = self.bs() as usize;
        let n = blocks.0 as usize * bs;
        let mut have = vec![0u8; n];
        self.backend
            .read_at(&mut have, lba.0 * bs as u64)
            .map_err(|e| backend_sense(&e, &self.name))?;
        let want_len = match bytchk {
            0 => return Ok(()),
            1 => n,
            _ => bs,
        };
        if n == 0 {
            return Ok(());
        }
        let want = data.get(..want_len).ok_or(Sense::INVALID_TRANSFER)?;
        let differs = |k: usize| have[k] != want[k % want_len];
        if let Some(k) = (0..n).find(|&k| differs(k)) {
            tracing::info!(
                "{}: VERIFY miscompare at block {}",
                self.name,
                lba.0 + (k / bs) as u64
            );
            return Err(Sense::MISCOMPARE_DURING_VERIFY);
        }
        Ok(())
    }

    fn write_same(
        &self,
        lba: Lba,
        blocks: Blocks,
        unmap: bool,
        ndob: bool,
        data: &[u8],
    ) -> Result<(), Sense> {
        if blocks.0 == 0 {
            // WSNZ: we do not take 0 as "to the end".
            return Err(Sense::cdb_field(10, None));
        }
        if blocks.0 > MAX_UNMAP_BLOCKS {
            return Err(Sense::cdb_field(10, None));
        }
        self.check_range(lba, u64::from(blocks.0))?;
        let bs = self.bs() as usize;
        let block: Vec<u8> = if ndob {
            vec![0; bs]
        } else {
            data.get(..bs).ok_or(Sense::INVALID_TRANSFER)?.to_vec()
        };
        let (off, len) = (lba.0 * bs as u64, u64::from(blocks.0) * bs as u64);
        let zero = block.iter().all(|&b| b == 0);
        let r = if zero && (unmap || self.backend.thin()) {
            // Zeros on a thin unit: give the space back (reads stay zeros).
            self.counters.discards.fetch_add(1, Ordering::Relaxed);
            self.backend.discard(off, len)
        } else {
            let chunk_blocks = (1 << 20) / bs;
            let buf: Vec<u8> = block.repeat(chunk_blocks);
            let mut done = 0u64;
            let mut r = Ok(());
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                r = self.backend.write_at(&buf[..n], off + done);
                if r.is_err() {
                    break;
                }
                done += n as u64;
            }
            r
        };
        let r = r.and_then(|()| {
            if self.write_cache.load(Ordering::Relaxed) {
                Ok(())
            } else {
                self.backend.flush()
            }
        });
        r.map_err(|e| backend_sense(&e, &self.name))
    }

    fn unmap(&self, len: u32, data: &[u8]) -> Result<(), Sense> {
        if len == 0 {
            return Ok(());
        }
        let p = data
            .get(..len as usize)
            .ok_or(Sense::PARAMETER_LIST_LENGTH)?;
        if p.len() < 8 {
            return Err(Sense::PARAMETER_LIST_LENGTH);
        }
        let bdl = usize::from(u16::from_be_bytes([p[2], p[3]]));
        if bdl % 16 != 0 || 8 + bdl > p.len() {
            return Err(Sense::param_field(2));
        }
        if bdl / 16 > MAX_UNMAP_DESCRIPTORS as usize {
            return Err(Sense::param_field(2));
        }
        let mut ranges = Vec::new();
        for (k, d) in p[8..8 + bdl].chunks(16).enumerate() {
            let lba = u64::from_be_bytes(d[0..8].try_into().expect("8 bytes"));
            let n = u32::from_be_bytes(d[8..12].try_into().expect("4 bytes"));
            if n > MAX_UNMAP_BLOCKS {
                return Err(Sense::param_field((8 + 16 * k + 8) as u16));
            }
            self.check_range(Lba(lba), u64::from(n))?;
            if n > 0 {
                ranges.push((lba, n));
            }
        }
        if !self.backend.thin() {
            // Nothing to give back; the data stays (LBPU is 0).
            return Ok(());
        }
        let bs = self.bs();
        for (lba, n) in ranges {
            self.counters.discards.fetch_add(1, Ordering::Relaxed);
            self.backend
                .discard(lba * bs, u64::from(n) * bs)
                .map_err(|e| backend_sense(&e, &self.name))?;
        }
        Ok(())
    }
}

trait IntoOutcome {
    fn into_outcome(self) -> Outcome;
}

impl IntoOutcome for Result<(), Sense> {
    fn into_outcome(self) -> Outcome {
        match self {
            Ok(()) => Outcome::Good(0),
            Err(s) => Outcome::Check(s),
        }
    }
}

/// REPORT SUPPORTED OPERATION CODES (SPC-5 6.34).
fn report_opcodes(options: u8, rctd: bool, opcode: u8, sa: u16) -> Result<Vec<u8>, Sense> {
    let timeouts = |d: &mut Vec<u8>| {
        if rctd {
            // Command timeouts descriptor: none given.
            d.extend_from_slice(&[0, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        }
    };
    if options == 0 {
        let mut d = vec![0u8; 4];
        for &(op, s, len) in cdb::SUPPORTED {
            d.push(op);
            d.push(0);
            d.extend_from_slice(&s.unwrap_or(0).to_be_bytes());
            d.push(0);
            d.push(u8::from(s.is_some()) | if rctd { 0x02 } else { 0 });
            d.extend_from_slice(&len.to_be_bytes());
            timeouts(&mut d);
        }
        let n = (d.len() - 4) as u32;
        d[0..4].copy_from_slice(&n.to_be_bytes());
        return Ok(d);
    }
    let has_sa = cdb::SUPPORTED
        .iter()
        .any(|e| e.0 == opcode && e.1.is_some());
    let found = cdb::SUPPORTED.iter().find(|e| {
        e.0 == opcode
            && match options {
                1 => e.1.is_none(),
                2 => e.1 == Some(sa),
                _ => e.1.is_none() || e.1 == Some(sa),
            }
    });
    if options == 1 && has_sa {
        return Err(Sense::cdb_field(2, Some(0)));
    }
    let mut d = vec![0u8, 0x01, 0, 0];
    if let Some(&(op, s, len)) = found {
        d[1] = 0x03 | if rctd { 0x80 } else { 0 };
        d[2..4].copy_from_slice(&len.to_be_bytes());
        // Usage data: every bit of every byte may be used but the opcode's
        // own and a service action's reserved bits.
        let mut usage = vec![0xFFu8; len as usize];
        usage[0] = op;
        if let Some(s) = s {
            usage[1] = s as u8 | 0xE0;
        }
        d.extend_from_slice(&usage);
        timeouts(&mut d);
    }
    Ok(d)
}
