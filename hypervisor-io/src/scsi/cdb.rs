//! Command descriptor blocks: the bytes a guest sends, parsed into a
//! [`Command`] or refused with the sense that says which byte is wrong.
//! Pure and total: any byte string gives a command or a sense, never a
//! panic (fuzzed by `fuzz/fuzz_targets/scsi_cdb.rs`).
//!
//! The layouts are SBC-4 and SPC-5's; the opcodes are listed once in
//! [`op`], and [`SUPPORTED`] is what REPORT SUPPORTED OPERATION CODES
//! answers, so the two cannot drift apart.

use super::sense::Sense;

/// A logical block address (in logical blocks of the unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lba(pub u64);

/// A number of logical blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Blocks(pub u32);

/// Operation codes.
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW: u8 = 0x1E;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const VERIFY_10: u8 = 0x2F;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5E;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5F;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8A;
    pub const VERIFY_16: u8 = 0x8F;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    pub const VERIFY_12: u8 = 0xAF;

    /// Service actions of SERVICE ACTION IN(16).
    pub const SA_READ_CAPACITY_16: u16 = 0x10;
    pub const SA_GET_LBA_STATUS: u16 = 0x12;
    /// Service action of MAINTENANCE IN.
    pub const SA_REPORT_SUPPORTED_OPCODES: u16 = 0x0C;
}

/// What REPORT SUPPORTED OPERATION CODES lists: opcode, service action
/// (when the opcode has them), CDB length.
pub const SUPPORTED: &[(u8, Option<u16>, u16)] = &[
    (op::TEST_UNIT_READY, None, 6),
    (op::REQUEST_SENSE, None, 6),
    (op::READ_6, None, 6),
    (op::WRITE_6, None, 6),
    (op::INQUIRY, None, 6),
    (op::MODE_SELECT_6, None, 6),
    (op::MODE_SENSE_6, None, 6),
    (op::START_STOP_UNIT, None, 6),
    (op::PREVENT_ALLOW, None, 6),
    (op::READ_CAPACITY_10, None, 10),
    (op::READ_10, None, 10),
    (op::WRITE_10, None, 10),
    (op::VERIFY_10, None, 10),
    (op::SYNCHRONIZE_CACHE_10, None, 10),
    (op::WRITE_SAME_10, None, 10),
    (op::UNMAP, None, 10),
    (op::MODE_SELECT_10, None, 10),
    (op::MODE_SENSE_10, None, 10),
    (op::PERSISTENT_RESERVE_IN, Some(0), 10),
    (op::PERSISTENT_RESERVE_IN, Some(1), 10),
    (op::PERSISTENT_RESERVE_IN, Some(2), 10),
    (op::PERSISTENT_RESERVE_IN, Some(3), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(0), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(1), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(2), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(3), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(4), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(5), 10),
    (op::PERSISTENT_RESERVE_OUT, Some(6), 10),
    (op::READ_16, None, 16),
    (op::WRITE_16, None, 16),
    (op::VERIFY_16, None, 16),
    (op::SYNCHRONIZE_CACHE_16, None, 16),
    (op::WRITE_SAME_16, None, 16),
    (op::SERVICE_ACTION_IN_16, Some(op::SA_READ_CAPACITY_16), 16),
    (op::SERVICE_ACTION_IN_16, Some(op::SA_GET_LBA_STATUS), 16),
    (op::REPORT_LUNS, None, 12),
    (
        op::MAINTENANCE_IN,
        Some(op::SA_REPORT_SUPPORTED_OPCODES),
        12,
    ),
    (op::READ_12, None, 12),
    (op::WRITE_12, None, 12),
    (op::VERIFY_12, None, 12),
];

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    TestUnitReady,
    RequestSense {
        descriptor: bool,
        alloc: u32,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc: u32,
    },
    ReportLuns {
        alloc: u32,
    },
    ReadCapacity10,
    ReadCapacity16 {
        alloc: u32,
    },
    GetLbaStatus {
        lba: Lba,
        alloc: u32,
    },
    ModeSense {
        ten: bool,
        dbd: bool,
        llbaa: bool,
        /// Page control: 0 current, 1 changeable, 2 default, 3 saved.
        pc: u8,
        page: u8,
        subpage: u8,
        alloc: u32,
    },
    ModeSelect {
        ten: bool,
        pf: bool,
        save: bool,
        len: u32,
    },
    Read {
        lba: Lba,
        blocks: Blocks,
        fua: bool,
    },
    Write {
        lba: Lba,
        blocks: Blocks,
        fua: bool,
    },
    Verify {
        lba: Lba,
        blocks: Blocks,
        /// 0: check the medium; 1: compare with the data sent; 3: compare
        /// every block with the one block sent.
        bytchk: u8,
    },
    SynchronizeCache {
        lba: Lba,
        blocks: Blocks,
    },
    WriteSame {
        lba: Lba,
        blocks: Blocks,
        unmap: bool,
        /// No data-out buffer: the block is zeros.
        ndob: bool,
    },
    Unmap {
        len: u32,
    },
    StartStopUnit,
    PreventAllow,
    ReportSupportedOpcodes {
        /// 0: all; 1: one opcode; 2: one opcode and service action;
        /// 3: one opcode, with or without a service action.
        options: u8,
        rctd: bool,
        opcode: u8,
        sa: u16,
        alloc: u32,
    },
    PersistentReserveIn {
        sa: u8,
        alloc: u32,
    },
    PersistentReserveOut {
        sa: u8,
        scope: u8,
        kind: u8,
        len: u32,
    },
}

fn be16(b: &[u8]) -> u32 {
    u32::from(u16::from_be_bytes([b[0], b[1]]))
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// The length of a CDB with this opcode (SPC-5 4.2.5.1), `None` for the
/// variable-length and vendor groups.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// The service action in byte 1 (five bits).
fn sa(c: &[u8]) -> u8 {
    c[1] & 0x1F
}

/// A READ/WRITE protection field (bits 5..7 of byte 1): we have no
/// protection information, so it must be zero.
fn no_protect(c: &[u8]) -> Result<(), Sense> {
    if c[1] & 0xE0 != 0 {
        return Err(Sense::cdb_field(1, Some(5)));
    }
    Ok(())
}

/// Parse one CDB. `cdb` may be longer than the command (virtio gives 32
/// bytes); shorter than its opcode's length is refused.
pub fn parse(cdb: &[u8]) -> Result<Command, Sense> {
    let Some(&opcode) = cdb.first() else {
        return Err(Sense::INVALID_OPCODE);
    };
    let Some(n) = cdb_len(opcode) else {
        return Err(Sense::INVALID_OPCODE);
    };
    if cdb.len() < n {
        return Err(Sense::INVALID_OPCODE);
    }
    let c = &cdb[..n];
    use Command as C;
    Ok(match opcode {
        op::TEST_UNIT_READY => C::TestUnitReady,
        op::REQUEST_SENSE => C::RequestSense {
            descriptor: c[1] & 1 != 0,
            alloc: u32::from(c[4]),
        },
        op::INQUIRY => {
            if c[1] & 0x02 != 0 {
                // CMDDT is obsolete.
                return Err(Sense::cdb_field(1, Some(1)));
            }
            let evpd = c[1] & 1 != 0;
            if !evpd && c[2] != 0 {
                return Err(Sense::cdb_field(2, None));
            }
            C::Inquiry {
                evpd,
                page: c[2],
                alloc: be16(&c[3..5]),
            }
        }
        op::READ_6 | op::WRITE_6 => {
            let lba = Lba(u64::from(be32(&c[0..4]) & 0x1F_FFFF));
            // A transfer length of 0 means 256 blocks.
            let blocks = Blocks(match c[4] {
                0 => 256,
                b => u32::from(b),
            });
            if opcode == op::READ_6 {
                C::Read {
                    lba,
                    blocks,
                    fua: false,
                }
            } else {
                C::Write {
                    lba,
                    blocks,
                    fua: false,
                }
            }
        }
        op::READ_10 | op::WRITE_10 | op::READ_12 | op::WRITE_12 | op::READ_16 | op::WRITE_16 => {
            no_protect(c)?;
            let (lba, blocks) = match n {
                10 => (u64::from(be32(&c[2..6])), be16(&c[7..9])),
                12 => (u64::from(be32(&c[2..6])), be32(&c[6..10])),
                _ => (be64(&c[2..10]), be32(&c[10..14])),
            };
            let (lba, blocks, fua) = (Lba(lba), Blocks(blocks), c[1] & 0x08 != 0);
            if matches!(opcode, op::READ_10 | op::READ_12 | op::READ_16) {
                C::Read { lba, blocks, fua }
            } else {
                C::Write { lba, blocks, fua }
            }
        }
        op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => {
            no_protect(c)?;
            let bytchk = (c[1] >> 1) & 3;
            if bytchk == 2 {
                return Err(Sense::cdb_field(1, Some(1)));
            }
            let (lba, blocks) = match n {
                10 => (u64::from(be32(&c[2..6])), be16(&c[7..9])),
                12 => (u64::from(be32(&c[2..6])), be32(&c[6..10])),
                _ => (be64(&c[2..10]), be32(&c[10..14])),
            };
            C::Verify {
                lba: Lba(lba),
                blocks: Blocks(blocks),
                bytchk,
            }
        }
        op::SYNCHRONIZE_CACHE_10 => C::SynchronizeCache {
            lba: Lba(u64::from(be32(&c[2..6]))),
            blocks: Blocks(be16(&c[7..9])),
        },
        op::SYNCHRONIZE_CACHE_16 => C::SynchronizeCache {
            lba: Lba(be64(&c[2..10])),
            blocks: Blocks(be32(&c[10..14])),
        },
        op::WRITE_SAME_10 | op::WRITE_SAME_16 => {
            no_protect(c)?;
            if c[1] & 0x10 != 0 {
                // ANCHOR: we do not anchor (VPD B2h ANC_SUP is 0).
                return Err(Sense::cdb_field(1, Some(4)));
            }
            let (lba, blocks, ndob) = if n == 10 {
                (u64::from(be32(&c[2..6])), be16(&c[7..9]), false)
            } else {
                (be64(&c[2..10]), be32(&c[10..14]), c[1] & 1 != 0)
            };
            C::WriteSame {
                lba: Lba(lba),
                blocks: Blocks(blocks),
                unmap: c[1] & 0x08 != 0,
                ndob,
            }
        }
        op::UNMAP => {
            if c[1] & 1 != 0 {
                return Err(Sense::cdb_field(1, Some(0)));
            }
            C::Unmap {
                len: be16(&c[7..9]),
            }
        }
        op::MODE_SENSE_6 | op::MODE_SENSE_10 => {
            let ten = opcode == op::MODE_SENSE_10;
            C::ModeSense {
                ten,
                dbd: c[1] & 0x08 != 0,
                llbaa: ten && c[1] & 0x10 != 0,
                pc: c[2] >> 6,
                page: c[2] & 0x3F,
                subpage: c[3],
                alloc: if ten { be16(&c[7..9]) } else { u32::from(c[4]) },
            }
        }
        op::MODE_SELECT_6 | op::MODE_SELECT_10 => {
            let ten = opcode == op::MODE_SELECT_10;
            C::ModeSelect {
                ten,
                pf: c[1] & 0x10 != 0,
                save: c[1] & 1 != 0,
                len: if ten { be16(&c[7..9]) } else { u32::from(c[4]) },
            }
        }
        op::START_STOP_UNIT => C::StartStopUnit,
        op::PREVENT_ALLOW => C::PreventAllow,
        op::READ_CAPACITY_10 => C::ReadCapacity10,
        op::SERVICE_ACTION_IN_16 => match u16::from(sa(c)) {
            op::SA_READ_CAPACITY_16 => C::ReadCapacity16 {
                alloc: be32(&c[10..14]),
            },
            op::SA_GET_LBA_STATUS => C::GetLbaStatus {
                lba: Lba(be64(&c[2..10])),
                alloc: be32(&c[10..14]),
            },
            _ => return Err(Sense::cdb_field(1, Some(4))),
        },
        op::REPORT_LUNS => {
            if c[2] > 2 {
                return Err(Sense::cdb_field(2, None));
            }
            C::ReportLuns {
                alloc: be32(&c[6..10]),
            }
        }
        op::MAINTENANCE_IN => {
            if u16::from(sa(c)) != op::SA_REPORT_SUPPORTED_OPCODES {
                return Err(Sense::cdb_field(1, Some(4)));
            }
            let options = c[2] & 7;
            if options > 3 {
                return Err(Sense::cdb_field(2, Some(2)));
            }
            C::ReportSupportedOpcodes {
                options,
                rctd: c[2] & 0x80 != 0,
                opcode: c[3],
                sa: be16(&c[4..6]) as u16,
                alloc: be32(&c[6..10]),
            }
        }
        op::PERSISTENT_RESERVE_IN => {
            if sa(c) > 3 {
                return Err(Sense::cdb_field(1, Some(4)));
            }
            C::PersistentReserveIn {
                sa: sa(c),
                alloc: be16(&c[7..9]),
            }
        }
        op::PERSISTENT_RESERVE_OUT => {
            if sa(c) > 6 {
                // REGISTER AND MOVE needs transport IDs we have no use for.
                return Err(Sense::cdb_field(1, Some(4)));
            }
            C::PersistentReserveOut {
                sa: sa(c),
                scope: c[2] >> 4,
                kind: c[2] & 0x0F,
                len: be32(&c[5..9]),
            }
        }
        _ => return Err(Sense::INVALID_OPCODE),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_and_write_in_every_size_parse_lba_length_and_fua() {
        assert_eq!(
            parse(&[op::READ_6, 0x01, 0x02, 0x03, 0, 0]).unwrap(),
            Command::Read {
                lba: Lba(0x010203),
                blocks: Blocks(256),
                fua: false
            }
        );
        assert_eq!(
            parse(&[op::WRITE_10, 0x08, 0, 0, 1, 0, 0, 0, 8, 0]).unwrap(),
            Command::Write {
                lba: Lba(256),
                blocks: Blocks(8),
                fua: true
            }
        );
        let mut c16 = [0u8; 16];
        c16[0] = op::READ_16;
        c16[2..10].copy_from_slice(&(5u64 << 32).to_be_bytes());
        c16[10..14].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            parse(&c16).unwrap(),
            Command::Read {
                lba: Lba(5 << 32),
                blocks: Blocks(7),
                fua: false
            }
        );
    }

    #[test]
    fn bad_cdbs_are_refused_with_the_field_at_fault() {
        assert_eq!(parse(&[]), Err(Sense::INVALID_OPCODE));
        assert_eq!(parse(&[0xC0; 16]), Err(Sense::INVALID_OPCODE));
        assert_eq!(parse(&[op::READ_10, 0, 0]), Err(Sense::INVALID_OPCODE));
        assert_eq!(
            parse(&[op::INQUIRY, 0, 0x80, 0, 36, 0]),
            Err(Sense::cdb_field(2, None))
        );
        assert_eq!(
            parse(&[op::READ_10, 0x20, 0, 0, 0, 0, 0, 0, 1, 0]),
            Err(Sense::cdb_field(1, Some(5)))
        );
    }

    #[test]
    fn every_supported_opcode_parses() {
        for &(opcode, sa, len) in SUPPORTED {
            let mut c = vec![0u8; len as usize];
            c[0] = opcode;
            if let Some(sa) = sa {
                c[1] = sa as u8;
            }
            if opcode == op::PERSISTENT_RESERVE_OUT {
                c[2] = 0;
            }
            assert!(parse(&c).is_ok(), "{opcode:#x} {sa:?}");
        }
    }
}
