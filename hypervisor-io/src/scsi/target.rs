//! The target: logical units by LUN, REPORT LUNS, commands to LUNs that
//! are not there, and unit attentions (power on, capacity changed, LUNs
//! added or removed). One target per controller; its initiator is the
//! guest behind that controller.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use super::cdb::{self, Command};
use super::disk::{Buffers, DiskUnit, Outcome};
use super::sense::Sense;

/// The most LUNs a target has (virtio-scsi's flat LUN space).
pub const MAX_LUNS: u16 = 16384;

/// A unit the target passes commands to as they are (a physical-mode raw
/// device mapping); only REPORT LUNS is the target's.
pub trait RawUnit: Send + Sync {
    fn execute(&self, cdb: &[u8], io: Buffers<'_>) -> Outcome;
}

/// What a LUN is.
#[derive(Clone)]
pub enum Unit {
    Emulated(Arc<DiskUnit>),
    Raw(Arc<dyn RawUnit>),
}

#[derive(Default)]
pub struct Target {
    luns: RwLock<BTreeMap<u16, Unit>>,
    /// Unit attentions waiting, per LUN (one initiator per target).
    attentions: Mutex<BTreeMap<u16, VecDeque<Sense>>>,
    /// Whether any may be waiting: every command asks, and most find none
    /// without taking the lock.
    pending: std::sync::atomic::AtomicBool,
}

impl Target {
    pub fn new() -> Target {
        Target::default()
    }

    /// Add a unit at `lun`; it starts with POWER ON OCCURRED, and every
    /// other unit learns that the LUN inventory changed.
    pub fn add(&self, lun: u16, unit: Arc<DiskUnit>) {
        self.add_unit(lun, Unit::Emulated(unit))
    }

    /// Add a unit that commands pass through to.
    pub fn add_raw(&self, lun: u16, unit: Arc<dyn RawUnit>) {
        self.add_unit(lun, Unit::Raw(unit))
    }

    fn add_unit(&self, lun: u16, unit: Unit) {
        let mut luns = self.luns.write().unwrap_or_else(|p| p.into_inner());
        let mut ua = self.attentions.lock().unwrap_or_else(|p| p.into_inner());
        for l in luns.keys() {
            push(ua.entry(*l).or_default(), Sense::REPORTED_LUNS_CHANGED);
        }
        luns.insert(lun, unit);
        ua.insert(lun, VecDeque::from([Sense::POWER_ON_RESET]));
        self.flag();
    }

    pub fn remove(&self, lun: u16) -> Option<Unit> {
        let mut luns = self.luns.write().unwrap_or_else(|p| p.into_inner());
        let u = luns.remove(&lun);
        let mut ua = self.attentions.lock().unwrap_or_else(|p| p.into_inner());
        ua.remove(&lun);
        for l in luns.keys() {
            push(ua.entry(*l).or_default(), Sense::REPORTED_LUNS_CHANGED);
        }
        self.flag();
        u
    }

    pub fn unit(&self, lun: u16) -> Option<Unit> {
        self.luns
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&lun)
            .cloned()
    }

    /// Queue a unit attention for `lun` (the capacity changed...).
    pub fn attention(&self, lun: u16, s: Sense) {
        let mut ua = self.attentions.lock().unwrap_or_else(|p| p.into_inner());
        push(ua.entry(lun).or_default(), s);
        self.flag();
    }

    /// A LUN reset: what was pending is dropped, POWER ON, RESET remains.
    pub fn reset(&self, lun: u16) {
        let mut ua = self.attentions.lock().unwrap_or_else(|p| p.into_inner());
        ua.insert(lun, VecDeque::from([Sense::POWER_ON_RESET]));
        self.flag();
    }

    fn take_attention(&self, lun: u16) -> Option<Sense> {
        use std::sync::atomic::Ordering;
        if !self.pending.load(Ordering::Acquire) {
            return None;
        }
        let mut ua = self.attentions.lock().unwrap_or_else(|p| p.into_inner());
        let s = ua.get_mut(&lun).and_then(|q| q.pop_front());
        if ua.values().all(|q| q.is_empty()) {
            self.pending.store(false, Ordering::Release);
        }
        s
    }

    fn flag(&self) {
        self.pending
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Carry out one command from initiator `nexus` to `lun`.
    pub fn execute(&self, nexus: &str, lun: u16, cdb: &[u8], io: Buffers<'_>) -> Outcome {
        io.data_in.clear();
        let unit = self.unit(lun);
        if let (Some(Unit::Raw(r)), false) = (&unit, cdb.first() == Some(&cdb::op::REPORT_LUNS)) {
            let inquiry = cdb.first() == Some(&cdb::op::INQUIRY);
            if !inquiry {
                if let Some(s) = self.take_attention(lun) {
                    return Outcome::Check(s);
                }
            }
            return r.execute(cdb, io);
        }
        let cmd = match cdb::parse(cdb) {
            Ok(c) => c,
            Err(s) => {
                // REQUEST SENSE and INQUIRY never fail on a missing LUN
                // first: report the bad CDB whatever the LUN.
                return Outcome::Check(s);
            }
        };
        if let Command::ReportLuns { alloc } = cmd {
            let luns = self.luns.read().unwrap_or_else(|p| p.into_inner());
            let mut d = ((luns.len() * 8) as u32).to_be_bytes().to_vec();
            d.extend_from_slice(&[0; 4]);
            for &l in luns.keys() {
                d.extend_from_slice(&encode_lun(l));
            }
            drop(luns);
            // Reading the inventory clears the notice that it changed.
            let mut ua = self.attentions.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(q) = ua.get_mut(&lun) {
                q.retain(|s| *s != Sense::REPORTED_LUNS_CHANGED);
            }
            let n = d.len().min(alloc as usize).min(io.data_in_max);
            io.data_in.extend_from_slice(&d[..n]);
            return Outcome::Good(n);
        }
        let Some(Unit::Emulated(unit)) = unit else {
            return match cmd {
                Command::Inquiry {
                    evpd: false, alloc, ..
                } => {
                    // Peripheral qualifier 3: no unit can be here.
                    let mut d = vec![0u8; 36];
                    d[0] = 0x7F;
                    d[2] = 0x06;
                    d[3] = 0x12;
                    d[4] = 31;
                    let n = d.len().min(alloc as usize).min(io.data_in_max);
                    io.data_in.extend_from_slice(&d[..n]);
                    Outcome::Good(n)
                }
                Command::RequestSense { alloc, .. } => {
                    let d = Sense::LUN_NOT_SUPPORTED.fixed();
                    let n = d.len().min(alloc as usize).min(io.data_in_max);
                    io.data_in.extend_from_slice(&d[..n]);
                    Outcome::Good(n)
                }
                _ => Outcome::Check(Sense::LUN_NOT_SUPPORTED),
            };
        };
        match cmd {
            Command::Inquiry { .. } => {}
            Command::RequestSense { descriptor, alloc } => {
                if let Some(s) = self
                    .take_attention(lun)
                    .or_else(|| unit.pending_attention(nexus))
                {
                    let d = if descriptor {
                        s.descriptor()
                    } else {
                        s.fixed().to_vec()
                    };
                    let n = d.len().min(alloc as usize).min(io.data_in_max);
                    io.data_in.extend_from_slice(&d[..n]);
                    return Outcome::Good(n);
                }
            }
            _ => {
                if let Some(s) = self.take_attention(lun) {
                    return Outcome::Check(s);
                }
            }
        }
        unit.execute(nexus, &cmd, io)
    }
}

fn push(q: &mut VecDeque<Sense>, s: Sense) {
    if !q.contains(&s) {
        q.push_back(s);
    }
}

/// A LUN as REPORT LUNS lists it (SAM-5 4.7): peripheral device addressing
/// below 256, flat space addressing above.
pub fn encode_lun(l: u16) -> [u8; 8] {
    let mut b = [0u8; 8];
    if l < 256 {
        b[1] = l as u8;
    } else {
        b[0] = 0x40 | ((l >> 8) as u8 & 0x3F);
        b[1] = l as u8;
    }
    b
}

#[cfg(test)]
mod tests {
    use super::super::cdb::op;
    use super::super::pr::MemPrStore;
    use super::*;
    use crate::backend::{Backend, MemBackend};

    fn target() -> (Target, Arc<MemBackend>) {
        let t = Target::new();
        let b = Arc::new(MemBackend::new(8 << 20, [7; 16]));
        let u = DiskUnit::new("mem".into(), b.clone(), Arc::new(MemPrStore::default()));
        t.add(0, Arc::new(u));
        (t, b)
    }

    /// READ CAPACITY(16), 32 bytes.
    const RC16: [u8; 16] = [
        op::SERVICE_ACTION_IN_16,
        0x10,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        32,
        0,
        0,
    ];

    fn run(t: &Target, lun: u16, cdb: &[u8], out: &[u8]) -> (Outcome, Vec<u8>) {
        let mut data = Vec::new();
        let o = t.execute(
            "i",
            lun,
            cdb,
            Buffers {
                data_out: out,
                data_in: &mut data,
                data_in_max: 1 << 20,
            },
        );
        (o, data)
    }

    #[test]
    fn power_on_attention_then_io_round_trips() {
        let (t, b) = target();
        let tur = [op::TEST_UNIT_READY, 0, 0, 0, 0, 0];
        assert_eq!(
            run(&t, 0, &tur, &[]).0,
            Outcome::Check(Sense::POWER_ON_RESET)
        );
        assert_eq!(run(&t, 0, &tur, &[]).0, Outcome::Good(0));
        let data: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
        let w = [op::WRITE_10, 0, 0, 0, 0, 8, 0, 0, 8, 0];
        assert_eq!(run(&t, 0, &w, &data).0, Outcome::Good(0));
        let r = [op::READ_10, 0, 0, 0, 0, 8, 0, 0, 8, 0];
        let (o, got) = run(&t, 0, &r, &[]);
        assert_eq!(o, Outcome::Good(4096));
        assert_eq!(got, data);
        let mut direct = vec![0u8; 4096];
        b.read_at(&mut direct, 8 * 512).unwrap();
        assert_eq!(direct, data);
        // Past the end.
        let far = [op::READ_10, 0, 0, 0xFF, 0xFF, 0, 0, 0, 8, 0];
        assert_eq!(
            run(&t, 0, &far, &[]).0,
            Outcome::Check(Sense::LBA_OUT_OF_RANGE)
        );
        // Unmap gives zeros back.
        let mut p = vec![0u8; 24];
        p[1] = 22;
        p[3] = 16;
        p[8..16].copy_from_slice(&8u64.to_be_bytes());
        p[16..20].copy_from_slice(&8u32.to_be_bytes());
        let u = [op::UNMAP, 0, 0, 0, 0, 0, 0, 0, 24, 0];
        assert_eq!(run(&t, 0, &u, &p).0, Outcome::Good(0));
        assert_eq!(run(&t, 0, &r, &[]).1, vec![0u8; 4096]);
    }

    #[test]
    fn missing_luns_and_report_luns() {
        let (t, _) = target();
        let inq = [op::INQUIRY, 0, 0, 0, 36, 0];
        let (o, d) = run(&t, 3, &inq, &[]);
        assert_eq!(o, Outcome::Good(36));
        assert_eq!(d[0], 0x7F);
        let tur = [op::TEST_UNIT_READY, 0, 0, 0, 0, 0];
        assert_eq!(
            run(&t, 3, &tur, &[]).0,
            Outcome::Check(Sense::LUN_NOT_SUPPORTED)
        );
        let rl = [op::REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        let (o, d) = run(&t, 3, &rl, &[]);
        assert_eq!(o, Outcome::Good(16));
        assert_eq!(&d[0..4], &8u32.to_be_bytes());
        assert_eq!(
            run(&t, 0, &[0xFF; 16], &[]).0,
            Outcome::Check(Sense::INVALID_OPCODE)
        );
    }

    #[test]
    fn disks_over_2_tib_need_the_16_byte_commands() {
        use crate::backend::NullBackend;
        let t = Target::new();
        let cap: u64 = 3 << 40;
        t.add(
            0,
            Arc::new(DiskUnit::new(
                "big".into(),
                Arc::new(NullBackend { capacity: cap }),
                Arc::new(MemPrStore::default()),
            )),
        );
        run(&t, 0, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], &[]);
        // READ CAPACITY(10) says "too big for me": 0xFFFFFFFF.
        let (_, d) = run(
            &t,
            0,
            &[op::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[],
        );
        assert_eq!(&d[0..4], &[0xFF; 4]);
        let (_, d) = run(&t, 0, &RC16, &[]);
        assert_eq!(
            u64::from_be_bytes(d[0..8].try_into().unwrap()),
            cap / 512 - 1
        );
        // A READ(16) near the end, far past 2 TiB; one past the end is refused.
        let mut r16 = [0u8; 16];
        r16[0] = op::READ_16;
        r16[2..10].copy_from_slice(&(cap / 512 - 8).to_be_bytes());
        r16[10..14].copy_from_slice(&8u32.to_be_bytes());
        assert_eq!(run(&t, 0, &r16, &[]).0, Outcome::Good(4096));
        r16[2..10].copy_from_slice(&(cap / 512 - 7).to_be_bytes());
        assert_eq!(
            run(&t, 0, &r16, &[]).0,
            Outcome::Check(Sense::LBA_OUT_OF_RANGE)
        );
    }

    #[test]
    fn vpd_pages_and_capacity() {
        let (t, _) = target();
        run(&t, 0, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], &[]); // the power-on attention
        let (_, d) = run(&t, 0, &[op::INQUIRY, 1, 0x83, 0, 255, 0], &[]);
        assert_eq!(d[1], 0x83);
        assert_eq!(d[4..8], [0x01, 0x03, 0x00, 8]);
        assert_eq!(d[8] >> 4, 3);
        let (_, d) = run(&t, 0, &RC16, &[]);
        assert_eq!(
            u64::from_be_bytes(d[0..8].try_into().unwrap()),
            (8 << 20) / 512 - 1
        );
        assert_eq!(d[14] & 0xC0, 0xC0);
        let (o, d) = run(&t, 0, &[op::MODE_SENSE_6, 0, 0x3F, 0, 255, 0], &[]);
        assert!(matches!(o, Outcome::Good(_)));
        assert_eq!(d[0] as usize, d.len() - 1);
    }
}
