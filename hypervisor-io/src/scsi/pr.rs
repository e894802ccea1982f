//! Persistent reservations (SPC-5 5.14): registrations and one
//! reservation per logical unit, shared by every initiator that reaches
//! the unit, on any host. The rules are here; where the state lives (in
//! memory, or a file on the datastore beside the disk so that guests on
//! several hosts see one reservation) is a [`PrStore`].
//!
//! An initiator is an I_T nexus: one controller of one host (the name is
//! `HOST-UUID/CONTROLLER`). Unit attentions meant for another initiator
//! (a registration it lost to a PREEMPT, a reservation released) wait in
//! the state until that initiator's next command.

use serde::{Deserialize, Serialize};

use super::sense::Sense;

/// Reservation types (SPC-5 table 197).
pub mod kind {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    pub const WRITE_EXCLUSIVE_REGISTRANTS_ONLY: u8 = 5;
    pub const EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: u8 = 6;
    pub const WRITE_EXCLUSIVE_ALL_REGISTRANTS: u8 = 7;
    pub const EXCLUSIVE_ACCESS_ALL_REGISTRANTS: u8 = 8;
}

fn valid_kind(k: u8) -> bool {
    matches!(k, 1 | 3 | 5 | 6 | 7 | 8)
}

/// Every registrant holds an all-registrants reservation.
fn all_registrants(k: u8) -> bool {
    matches!(k, 7 | 8)
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub nexus: String,
    pub key: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub holder: String,
    pub kind: u8,
}

/// A unit's persistent reservation state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrState {
    pub generation: u32,
    pub registrations: Vec<Registration>,
    pub reservation: Option<Reservation>,
    /// Unit attentions waiting for an initiator: (nexus, ASC, ASCQ).
    pub pending: Vec<(String, u8, u8)>,
}

/// Why a reservation command failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrFailure {
    /// RESERVATION CONFLICT status.
    Conflict,
    Check(Sense),
}

impl From<Sense> for PrFailure {
    fn from(s: Sense) -> Self {
        PrFailure::Check(s)
    }
}

/// Where a unit's state lives.
pub trait PrStore: Send + Sync {
    /// Run `f` on the state, atomically with respect to every other
    /// initiator of the unit (on any host); the state is written back when
    /// `f` says it changed it.
    fn transact(
        &self,
        f: &mut dyn FnMut(&mut PrState) -> Result<bool, PrFailure>,
    ) -> Result<(), PrFailure>;
    /// The state now (for access checks on every command).
    fn current(&self) -> Result<PrState, PrFailure>;
    /// Whether any reservation, registration or pending attention may be
    /// there (cheap; `false` lets I/O skip [`PrStore::current`]).
    fn maybe_active(&self) -> bool;
}

/// State in memory: one host's units that no other host can open.
#[derive(Default)]
pub struct MemPrStore {
    state: std::sync::Mutex<PrState>,
    active: std::sync::atomic::AtomicBool,
}

impl PrStore for MemPrStore {
    fn transact(
        &self,
        f: &mut dyn FnMut(&mut PrState) -> Result<bool, PrFailure>,
    ) -> Result<(), PrFailure> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = s.clone();
        if f(&mut next)? {
            *s = next;
        }
        self.active.store(
            !s.registrations.is_empty() || !s.pending.is_empty(),
            std::sync::atomic::Ordering::Release,
        );
        Ok(())
    }
    fn current(&self) -> Result<PrState, PrFailure> {
        Ok(self.state.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
    fn maybe_active(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// What a command does to the medium, for the access check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Allowed whatever the reservation (INQUIRY, PR commands...).
    None,
    Read,
    Write,
}

impl PrState {
    fn key_of(&self, nexus: &str) -> Option<u64> {
        self.registrations
            .iter()
            .find(|r| r.nexus == nexus)
            .map(|r| r.key)
    }

    fn holds(&self, nexus: &str) -> bool {
        match &self.reservation {
            Some(r) if all_registrants(r.kind) => self.key_of(nexus).is_some(),
            Some(r) => r.holder == nexus,
            None => false,
        }
    }

    /// Whether `nexus` may do `access` under the reservation.
    pub fn allows(&self, nexus: &str, access: Access) -> bool {
        let Some(r) = &self.reservation else {
            return true;
        };
        if access == Access::None || self.holds(nexus) {
            return true;
        }
        let registered = self.key_of(nexus).is_some();
        match r.kind {
            kind::WRITE_EXCLUSIVE => access == Access::Read,
            kind::EXCLUSIVE_ACCESS => false,
            kind::WRITE_EXCLUSIVE_REGISTRANTS_ONLY | kind::WRITE_EXCLUSIVE_ALL_REGISTRANTS => {
                registered || access == Access::Read
            }
            _ => registered,
        }
    }

    /// Take the first unit attention waiting for `nexus`.
    pub fn take_pending(&mut self, nexus: &str) -> Option<Sense> {
        let i = self.pending.iter().position(|p| p.0 == nexus)?;
        let (_, asc, ascq) = self.pending.remove(i);
        Some(Sense {
            key: super::sense::key::UNIT_ATTENTION,
            asc,
            ascq,
            field: None,
        })
    }

    fn notify_others(&mut self, me: &str, who: &[String], s: Sense) {
        for n in who {
            if n != me && !self.pending.iter().any(|p| &p.0 == n && p.1 == s.asc) {
                self.pending.push((n.clone(), s.asc, s.ascq));
            }
        }
    }

    /// PERSISTENT RESERVE OUT: `sa` service action, `param` the 24-byte
    /// parameter list. Returns whether the state changed.
    pub fn out(
        &mut self,
        nexus: &str,
        sa: u8,
        scope: u8,
        kind: u8,
        param: &[u8],
    ) -> Result<bool, PrFailure> {
        if param.len() != 24 {
            return Err(Sense::PARAMETER_LIST_LENGTH.into());
        }
        let key = u64::from_be_bytes(param[0..8].try_into().expect("8 bytes"));
        let sa_key = u64::from_be_bytes(param[8..16].try_into().expect("8 bytes"));
        if param[20] & 0x08 != 0 {
            // SPEC_I_PT: registering other initiators is not supported.
            return Err(Sense::param_field(20).into());
        }
        let mine = self.key_of(nexus);
        match sa {
            // REGISTER, REGISTER AND IGNORE EXISTING KEY
            0 | 6 => {
                if sa == 0 && mine.unwrap_or(0) != key {
                    return Err(PrFailure::Conflict);
                }
                self.registrations.retain(|r| r.nexus != nexus);
                if sa_key != 0 {
                    self.registrations.push(Registration {
                        nexus: nexus.into(),
                        key: sa_key,
                    });
                } else if let Some(r) = &self.reservation {
                    // Unregistering releases what it held.
                    let gone = if all_registrants(r.kind) {
                        self.registrations.is_empty()
                    } else {
                        r.holder == nexus
                    };
                    if gone {
                        let k = r.kind;
                        self.reservation = None;
                        if matches!(k, 5 | 6) {
                            let others: Vec<String> =
                                self.registrations.iter().map(|r| r.nexus.clone()).collect();
                            self.notify_others(nexus, &others, Sense::RESERVATIONS_RELEASED);
                        }
                    }
                }
                self.generation = self.generation.wrapping_add(1);
                Ok(true)
            }
            // RESERVE
            1 => {
                if mine != Some(key) {
                    return Err(PrFailure::Conflict);
                }
                if scope != 0 {
                    return Err(Sense::cdb_field(2, Some(4)).into());
                }
                if !valid_kind(kind) {
                    return Err(Sense::cdb_field(2, Some(0)).into());
                }
                match &self.reservation {
                    None => {
                        self.reservation = Some(Reservation {
                            holder: nexus.into(),
                            kind,
                        });
                        Ok(true)
                    }
                    Some(r) if r.kind == kind && self.holds(nexus) => Ok(false),
                    Some(_) => Err(PrFailure::Conflict),
                }
            }
            // RELEASE
            2 => {
                if mine != Some(key) {
                    return Err(PrFailure::Conflict);
                }
                let Some(r) = self.reservation.clone() else {
                    return Ok(false);
                };
                if !self.holds(nexus) {
                    return Ok(false);
                }
                if r.kind != kind || scope != 0 {
                    // INVALID RELEASE OF PERSISTENT RESERVATION
                    return Err(Sense {
                        asc: 0x26,
                        ascq: 0x04,
                        ..Sense::INVALID_FIELD_IN_PARAMETERS
                    }
                    .into());
                }
                self.reservation = None;
                if !matches!(r.kind, 1 | 3) {
                    let others: Vec<String> =
                        self.registrations.iter().map(|r| r.nexus.clone()).collect();
                    self.notify_others(nexus, &others, Sense::RESERVATIONS_RELEASED);
                }
                Ok(true)
            }
            // CLEAR
            3 => {
                if mine != Some(key) {
                    return Err(PrFailure::Conflict);
                }
                let others: Vec<String> =
                    self.registrations.iter().map(|r| r.nexus.clone()).collect();
                self.registrations.clear();
                self.reservation = None;
                self.notify_others(nexus, &others, Sense::RESERVATIONS_PREEMPTED);
                self.generation = self.generation.wrapping_add(1);
                Ok(true)
            }
            // PREEMPT, PREEMPT AND ABORT
            4 | 5 => {
                if mine != Some(key) {
                    return Err(PrFailure::Conflict);
                }
                let res = self.reservation.clone();
                let all_reg = res.as_ref().is_some_and(|r| all_registrants(r.kind));
                let holder_key = res
                    .as_ref()
                    .filter(|r| !all_registrants(r.kind))
                    .and_then(|r| self.key_of(&r.holder));
                let (removed, take): (Vec<String>, bool) = if all_reg && sa_key == 0 {
                    // Everyone else goes; the preempter takes the reservation.
                    (
                        self.registrations
                            .iter()
                            .filter(|r| r.nexus != nexus)
                            .map(|r| r.nexus.clone())
                            .collect(),
                        true,
                    )
                } else {
                    if sa_key == 0 {
                        return Err(Sense::param_field(8).into());
                    }
                    let gone: Vec<String> = self
                        .registrations
                        .iter()
                        .filter(|r| r.key == sa_key && r.nexus != nexus)
                        .map(|r| r.nexus.clone())
                        .collect();
                    let take = holder_key == Some(sa_key);
                    if gone.is_empty() && !take {
                        return Err(PrFailure::Conflict);
                    }
                    (gone, take)
                };
                if take {
                    if scope != 0 || !valid_kind(kind) {
                        return Err(Sense::cdb_field(2, None).into());
                    }
                    self.reservation = Some(Reservation {
                        holder: nexus.into(),
                        kind,
                    });
                }
                self.registrations.retain(|r| !removed.contains(&r.nexus));
                self.notify_others(nexus, &removed, Sense::REGISTRATIONS_PREEMPTED);
                self.generation = self.generation.wrapping_add(1);
                Ok(true)
            }
            _ => Err(Sense::cdb_field(1, Some(4)).into()),
        }
    }

    /// PERSISTENT RESERVE IN: the parameter data of service action `sa`.
    pub fn input(&self, sa: u8) -> Vec<u8> {
        let mut b = self.generation.to_be_bytes().to_vec();
        match sa {
            // READ KEYS
            0 => {
                b.extend_from_slice(&((self.registrations.len() * 8) as u32).to_be_bytes());
                for r in &self.registrations {
                    b.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            // READ RESERVATION
            1 => match &self.reservation {
                Some(r) => {
                    b.extend_from_slice(&16u32.to_be_bytes());
                    let key = if all_registrants(r.kind) {
                        0
                    } else {
                        self.key_of(&r.holder).unwrap_or(0)
                    };
                    b.extend_from_slice(&key.to_be_bytes());
                    b.extend_from_slice(&[0, 0, 0, 0, 0, r.kind & 0x0F, 0, 0]);
                }
                None => b.extend_from_slice(&0u32.to_be_bytes()),
            },
            // REPORT CAPABILITIES
            2 => {
                b = vec![
                    0,
                    8,
                    // CRH 0, SIP_C 0, ATP_C 1, PTPL_C 1
                    0x04 | 0x01,
                    // TMV, PTPL_A (the state is on the datastore)
                    0x80 | 0x01,
                    // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX
                    0x80 | 0x40 | 0x20 | 0x08 | 0x02,
                    // EX_AC_AR
                    0x01,
                    0,
                    0,
                ];
            }
            // READ FULL STATUS
            _ => {
                let mut d = Vec::new();
                for r in &self.registrations {
                    let tid = transport_id(&r.nexus);
                    d.extend_from_slice(&r.key.to_be_bytes());
                    d.extend_from_slice(&[0; 4]);
                    let holder = self.holds(&r.nexus);
                    d.push(0x02 | u8::from(holder));
                    d.push(if holder {
                        self.reservation.as_ref().map_or(0, |x| x.kind)
                    } else {
                        0
                    });
                    d.extend_from_slice(&[0; 4]);
                    d.extend_from_slice(&1u16.to_be_bytes());
                    d.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    d.extend_from_slice(&tid);
                }
                b.extend_from_slice(&(d.len() as u32).to_be_bytes());
                b.extend_from_slice(&d);
            }
        }
        b
    }
}

/// An iSCSI-format TransportID (SPC-5 7.6.4.6) naming the initiator.
fn transport_id(nexus: &str) -> Vec<u8> {
    let mut name = format!("iqn.2026-11.org.vmfs:{nexus}").into_bytes();
    name.push(0);
    while name.len() % 4 != 0 {
        name.push(0);
    }
    let mut t = vec![0x05, 0];
    t.extend_from_slice(&(name.len() as u16).to_be_bytes());
    t.extend_from_slice(&name);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(key: u64, sa_key: u64) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p
    }

    #[test]
    fn register_reserve_conflict_preempt_as_fence_scsi_does() {
        let mut s = PrState::default();
        // Both nodes register their keys.
        s.out("a", 0, 0, 0, &param(0, 0xA)).unwrap();
        s.out("b", 0, 0, 0, &param(0, 0xB)).unwrap();
        // A wrong key is a conflict.
        assert_eq!(s.out("b", 0, 0, 0, &param(7, 9)), Err(PrFailure::Conflict));
        // a reserves write-exclusive-registrants-only.
        s.out("a", 1, 0, 5, &param(0xA, 0)).unwrap();
        assert!(s.allows("b", Access::Write));
        assert!(!s.allows("c", Access::Write));
        assert!(s.allows("c", Access::Read));
        // b fences a off: a's registration is gone, b holds the reservation.
        s.out("b", 4, 0, 5, &param(0xB, 0xA)).unwrap();
        assert!(!s.allows("a", Access::Write));
        assert_eq!(s.take_pending("a"), Some(Sense::REGISTRATIONS_PREEMPTED));
        assert_eq!(s.take_pending("a"), None);
        assert_eq!(
            s.out("a", 1, 0, 5, &param(0xA, 0)),
            Err(PrFailure::Conflict)
        );
        let keys = s.input(0);
        assert_eq!(&keys[4..8], &8u32.to_be_bytes());
        assert_eq!(&keys[8..16], &0xBu64.to_be_bytes());
        // Unregistering releases; clear empties everything.
        s.out("b", 3, 0, 0, &param(0xB, 0)).unwrap();
        assert!(s.registrations.is_empty() && s.reservation.is_none());
    }

    #[test]
    fn exclusive_access_blocks_reads_of_others() {
        let mut s = PrState::default();
        s.out("a", 0, 0, 0, &param(0, 1)).unwrap();
        s.out("a", 1, 0, kind::EXCLUSIVE_ACCESS, &param(1, 0))
            .unwrap();
        assert!(!s.allows("b", Access::Read));
        assert!(s.allows("b", Access::None));
        assert!(s.allows("a", Access::Write));
        assert_eq!(
            s.out("a", 2, 0, kind::WRITE_EXCLUSIVE, &param(1, 0)),
            Err(PrFailure::Check(Sense {
                asc: 0x26,
                ascq: 0x04,
                ..Sense::INVALID_FIELD_IN_PARAMETERS
            }))
        );
        s.out("a", 2, 0, kind::EXCLUSIVE_ACCESS, &param(1, 0))
            .unwrap();
        assert!(s.allows("b", Access::Read));
    }
}

/// The on-datastore form of a shared unit's state (`NAME.pr`, written up
/// in docs/FORMAT.md): a 32-byte header, then the state as JSON.
///
/// | offset | field |
/// |---|---|
/// | 0 | magic `VMFSPR\r\n` |
/// | 8 | format version u32 (1) |
/// | 12 | payload length u32 |
/// | 16 | change counter u64: +1 at every change (readers re-read the payload only when it moved) |
/// | 24 | CRC32 of the header (this field zero) and the payload |
/// | 28 | reserved, zero |
pub mod file {
    use super::{PrFailure, PrState};
    use crate::scsi::sense::Sense;

    pub const MAGIC: &[u8; 8] = b"VMFSPR\r\n";
    pub const VERSION: u32 = 1;
    pub const HEADER: usize = 32;
    /// A payload longer than this is damage, not state.
    pub const MAX_PAYLOAD: usize = 1 << 20;

    /// Why the state file cannot be read.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    #[error("reservation state {file}: {reason}")]
    pub struct BadState {
        pub file: String,
        pub reason: String,
    }

    impl From<BadState> for PrFailure {
        fn from(e: BadState) -> Self {
            tracing::error!("{e}");
            PrFailure::Check(Sense::INTERNAL_TARGET_FAILURE)
        }
    }

    pub fn encode(s: &PrState, counter: u64) -> Vec<u8> {
        let payload = serde_json::to_vec(s).unwrap_or_default();
        let mut b = vec![0u8; HEADER];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b[16..24].copy_from_slice(&counter.to_le_bytes());
        b.extend_from_slice(&payload);
        let crc = crc32fast::hash(&b);
        b[24..28].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The header: (payload length, change counter). An empty file (just
    /// made) is state 0 with nothing in it.
    pub fn header(b: &[u8], file: &str) -> Result<(usize, u64), BadState> {
        let bad = |reason: String| BadState {
            file: file.to_string(),
            reason,
        };
        if b.iter().all(|&x| x == 0) {
            return Ok((0, 0));
        }
        if b.len() < HEADER || &b[0..8] != MAGIC {
            return Err(bad("no reservation-state header (bad magic)".into()));
        }
        let v = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if v != VERSION {
            return Err(bad(format!(
                "format version {v}; this host reads {VERSION}"
            )));
        }
        let len = u32::from_le_bytes([b[12], b[13], b[14], b[15]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(bad(format!("a payload of {len} bytes")));
        }
        let counter = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
        Ok((len, counter))
    }

    /// The whole file (header and payload) as state.
    pub fn decode(b: &[u8], file: &str) -> Result<(PrState, u64), BadState> {
        let (len, counter) = header(b, file)?;
        if counter == 0 && len == 0 {
            return Ok((PrState::default(), 0));
        }
        let bad = |reason: String| BadState {
            file: file.to_string(),
            reason,
        };
        let Some(whole) = b.get(..HEADER + len) else {
            return Err(bad(format!(
                "{} bytes, the header says {}",
                b.len(),
                HEADER + len
            )));
        };
        let mut c = whole.to_vec();
        c[24..28].fill(0);
        let want = u32::from_le_bytes([b[24], b[25], b[26], b[27]]);
        if crc32fast::hash(&c) != want {
            return Err(bad("checksum mismatch".into()));
        }
        let s: PrState =
            serde_json::from_slice(&whole[HEADER..]).map_err(|e| bad(format!("payload: {e}")))?;
        Ok((s, counter))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn state_round_trips_and_damage_is_named() {
            let mut s = PrState::default();
            s.out("h/c", 0, 0, 0, &{
                let mut p = vec![0u8; 24];
                p[8..16].copy_from_slice(&5u64.to_be_bytes());
                p
            })
            .unwrap();
            let b = encode(&s, 9);
            assert_eq!(decode(&b, "x").unwrap(), (s, 9));
            assert_eq!(decode(&[0u8; 64], "x").unwrap().1, 0);
            let mut bad = b.clone();
            *bad.last_mut().unwrap() ^= 1;
            assert!(decode(&bad, "x").unwrap_err().reason.contains("checksum"));
            assert!(decode(&b[..20], "x").is_err());
        }
    }
}
