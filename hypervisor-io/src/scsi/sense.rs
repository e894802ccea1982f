//! SCSI status and sense data (SPC-4 4.5): what a failed command tells the
//! initiator, in fixed format (what Linux's `sd` and sg3_utils read first),
//! or descriptor format when the initiator asks for it.

/// The status byte of a completed command (SAM-5 5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Good = 0x00,
    CheckCondition = 0x02,
    Busy = 0x08,
    ReservationConflict = 0x18,
    TaskSetFull = 0x28,
}

/// Sense keys (SPC-4 table 48).
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const ABORTED_COMMAND: u8 = 0xB;
    pub const MISCOMPARE: u8 = 0xE;
}

/// One sense condition: key, additional sense code and qualifier, and for
/// an invalid field, where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// The byte and bit of the CDB (or of the parameter list) at fault.
    pub field: Option<Field>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// In the CDB (else in the parameter data).
    pub in_cdb: bool,
    pub byte: u16,
    /// The bit, when the fault is one bit (else the whole byte).
    pub bit: Option<u8>,
}

macro_rules! sense {
    ($($(#[$m:meta])* $name:ident = ($k:ident, $asc:expr, $ascq:expr);)*) => {
        impl Sense {
            $($(#[$m])* pub const $name: Sense = Sense { key: key::$k, asc: $asc, ascq: $ascq, field: None };)*
        }
    };
}

sense! {
    NONE = (NO_SENSE, 0x00, 0x00);
    INVALID_OPCODE = (ILLEGAL_REQUEST, 0x20, 0x00);
    LBA_OUT_OF_RANGE = (ILLEGAL_REQUEST, 0x21, 0x00);
    INVALID_FIELD_IN_CDB = (ILLEGAL_REQUEST, 0x24, 0x00);
    LUN_NOT_SUPPORTED = (ILLEGAL_REQUEST, 0x25, 0x00);
    INVALID_FIELD_IN_PARAMETERS = (ILLEGAL_REQUEST, 0x26, 0x00);
    PARAMETER_LIST_LENGTH = (ILLEGAL_REQUEST, 0x1A, 0x00);
    SAVING_NOT_SUPPORTED = (ILLEGAL_REQUEST, 0x39, 0x00);
    INSUFFICIENT_REGISTRATION_RESOURCES = (ILLEGAL_REQUEST, 0x55, 0x04);
    /// The command needs more data than the initiator's buffers hold.
    INVALID_TRANSFER = (ILLEGAL_REQUEST, 0x24, 0x00);
    POWER_ON_RESET = (UNIT_ATTENTION, 0x29, 0x00);
    MODE_PARAMETERS_CHANGED = (UNIT_ATTENTION, 0x2A, 0x01);
    RESERVATIONS_PREEMPTED = (UNIT_ATTENTION, 0x2A, 0x03);
    RESERVATIONS_RELEASED = (UNIT_ATTENTION, 0x2A, 0x04);
    REGISTRATIONS_PREEMPTED = (UNIT_ATTENTION, 0x2A, 0x05);
    CAPACITY_CHANGED = (UNIT_ATTENTION, 0x2A, 0x09);
    REPORTED_LUNS_CHANGED = (UNIT_ATTENTION, 0x3F, 0x0E);
    UNRECOVERED_READ_ERROR = (MEDIUM_ERROR, 0x11, 0x00);
    WRITE_ERROR = (MEDIUM_ERROR, 0x0C, 0x00);
    INTERNAL_TARGET_FAILURE = (HARDWARE_ERROR, 0x44, 0x00);
    WRITE_PROTECTED = (DATA_PROTECT, 0x27, 0x00);
    SPACE_ALLOCATION_FAILED = (DATA_PROTECT, 0x27, 0x07);
    MISCOMPARE_DURING_VERIFY = (MISCOMPARE, 0x1D, 0x00);
    LUN_NOT_READY_BECOMING = (NOT_READY, 0x04, 0x01);
    COMMAND_ABORTED = (ABORTED_COMMAND, 0x00, 0x00);
}

impl Sense {
    /// ILLEGAL REQUEST, INVALID FIELD IN CDB at `byte` (and `bit`).
    pub fn cdb_field(byte: u16, bit: Option<u8>) -> Sense {
        Sense {
            field: Some(Field {
                in_cdb: true,
                byte,
                bit,
            }),
            ..Sense::INVALID_FIELD_IN_CDB
        }
    }

    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST at `byte`.
    pub fn param_field(byte: u16) -> Sense {
        Sense {
            field: Some(Field {
                in_cdb: false,
                byte,
                bit: None,
            }),
            ..Sense::INVALID_FIELD_IN_PARAMETERS
        }
    }

    /// Fixed-format sense data (SPC-4 4.5.3), 18 bytes.
    pub fn fixed(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70; // current error, fixed format
        b[2] = self.key & 0x0F;
        b[7] = 10; // additional sense length
        b[12] = self.asc;
        b[13] = self.ascq;
        if let Some(f) = self.field {
            // Sense-key specific: field pointer (SPC-4 4.5.2.4.2).
            b[15] = 0x80
                | if f.in_cdb { 0x40 } else { 0 }
                | f.bit.map(|bit| 0x08 | (bit & 7)).unwrap_or(0);
            b[16..18].copy_from_slice(&f.byte.to_be_bytes());
        }
        b
    }

    /// Descriptor-format sense data (SPC-4 4.5.2), with a sense-key
    /// specific descriptor for a field pointer.
    pub fn descriptor(&self) -> Vec<u8> {
        let mut b = vec![0x72, self.key & 0x0F, self.asc, self.ascq, 0, 0, 0, 0];
        if self.field.is_some() {
            let fixed = self.fixed();
            b.extend_from_slice(&[0x02, 0x06, 0, 0]);
            b.extend_from_slice(&fixed[15..18]);
            b.push(0);
        }
        b[7] = (b.len() - 8) as u8;
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_sense_carries_key_codes_and_the_field_pointer() {
        let s = Sense::cdb_field(2, Some(5)).fixed();
        assert_eq!(s[0], 0x70);
        assert_eq!(s[2], key::ILLEGAL_REQUEST);
        assert_eq!((s[12], s[13]), (0x24, 0x00));
        assert_eq!(s[15], 0x80 | 0x40 | 0x08 | 5);
        assert_eq!(&s[16..18], &[0, 2]);
        let d = Sense::cdb_field(2, None).descriptor();
        assert_eq!(d[0], 0x72);
        assert_eq!(d[7] as usize, d.len() - 8);
        assert_eq!(Sense::CAPACITY_CHANGED.fixed()[2], key::UNIT_ATTENTION);
    }
}
