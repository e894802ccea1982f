//! The virtio-scsi request, response, task-management and event layouts
//! (virtio 1.2, 5.6.6), decoded and encoded by hand: the bindings' structs
//! are packed and not `ByteValued`, and a byte-wise codec cannot be fooled
//! by a short or odd-sized buffer.

/// A command request header: lun[8], tag, task attribute, prio, crn, cdb[32].
pub const CMD_REQ_LEN: usize = 51;
/// A command response header: sense_len, resid, status_qualifier, status,
/// response, sense[96].
pub const CMD_RESP_LEN: usize = 12 + SENSE_SIZE;
pub const SENSE_SIZE: usize = 96;
pub const CDB_SIZE: usize = 32;
/// A task-management request: type, subtype, lun[8], tag.
pub const TMF_REQ_LEN: usize = 24;
/// An asynchronous-notification request: type, lun[8], event_requested.
pub const AN_REQ_LEN: usize = 16;
/// An event: event, lun[8], reason.
pub const EVENT_LEN: usize = 16;

/// Response codes (`VIRTIO_SCSI_S_*`).
pub mod resp {
    pub const OK: u8 = 0;
    pub const OVERRUN: u8 = 1;
    pub const BAD_TARGET: u8 = 3;
    pub const FAILURE: u8 = 9;
    pub const FUNCTION_SUCCEEDED: u8 = 10;
    pub const FUNCTION_REJECTED: u8 = 11;
    pub const INCORRECT_LUN: u8 = 12;
}

/// Control queue request types and TMF subtypes.
pub mod ctrl {
    pub const T_TMF: u32 = 0;
    pub const T_AN_QUERY: u32 = 1;
    pub const T_AN_SUBSCRIBE: u32 = 2;
    pub const TMF_ABORT_TASK: u32 = 0;
    pub const TMF_ABORT_TASK_SET: u32 = 1;
    pub const TMF_CLEAR_ACA: u32 = 2;
    pub const TMF_CLEAR_TASK_SET: u32 = 3;
    pub const TMF_I_T_NEXUS_RESET: u32 = 4;
    pub const TMF_LOGICAL_UNIT_RESET: u32 = 5;
    pub const TMF_QUERY_TASK: u32 = 6;
    pub const TMF_QUERY_TASK_SET: u32 = 7;
}

/// Events (`VIRTIO_SCSI_T_*`) and their reasons.
pub mod event {
    pub const TRANSPORT_RESET: u32 = 1;
    pub const PARAM_CHANGE: u32 = 3;
    pub const EVENTS_MISSED: u32 = 0x8000_0000;
    pub const RESCAN: u32 = 1;
    pub const REMOVED: u32 = 2;
}

/// Where a request is addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Address {
    /// Target 0, this LUN.
    Lun(u16),
    /// The REPORT LUNS well-known LUN.
    ReportLuns,
    /// A target we do not have, or an address we cannot read.
    Bad,
}

/// Decode virtio-scsi's 8-byte LUN field: `1, target, LUN (flat or
/// peripheral addressing), 0...`.
pub fn address(lun: &[u8]) -> Address {
    if lun.len() < 4 || lun[0] != 1 {
        return Address::Bad;
    }
    if lun[1] != 0 {
        return Address::Bad;
    }
    match lun[2] >> 6 {
        _ if lun[2] == 0xC1 && lun[3] == 0x01 => Address::ReportLuns,
        0 => Address::Lun(u16::from(lun[3]) | (u16::from(lun[2]) << 8)),
        1 => Address::Lun((u16::from(lun[2] & 0x3F) << 8) | u16::from(lun[3])),
        _ => Address::Bad,
    }
}

/// The 8-byte LUN field for target 0, `lun` (flat addressing).
pub fn lun_field(lun: u16) -> [u8; 8] {
    [1, 0, 0x40 | (lun >> 8) as u8, lun as u8, 0, 0, 0, 0]
}

/// A command response header.
pub fn cmd_response(status: u8, response: u8, resid: u32, sense: &[u8]) -> [u8; CMD_RESP_LEN] {
    let mut b = [0u8; CMD_RESP_LEN];
    let n = sense.len().min(SENSE_SIZE);
    b[0..4].copy_from_slice(&(n as u32).to_le_bytes());
    b[4..8].copy_from_slice(&resid.to_le_bytes());
    b[10] = status;
    b[11] = response;
    b[12..12 + n].copy_from_slice(&sense[..n]);
    b
}

/// An event. Its LUN is encoded as REPORT LUNS lists it (peripheral
/// addressing below 256): Linux reads the two bytes as the LUN number
/// without taking the addressing method off, as QEMU's events do too.
pub fn event(kind: u32, lun: u16, reason: u32) -> [u8; EVENT_LEN] {
    let mut b = [0u8; EVENT_LEN];
    b[0..4].copy_from_slice(&kind.to_le_bytes());
    let l = crate::scsi::target::encode_lun(lun);
    b[4..12].copy_from_slice(&[1, 0, l[0], l[1], 0, 0, 0, 0]);
    b[12..16].copy_from_slice(&reason.to_le_bytes());
    b
}

pub fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luns_decode_both_addressings_and_refuse_other_targets() {
        assert_eq!(address(&lun_field(5)), Address::Lun(5));
        assert_eq!(address(&lun_field(300)), Address::Lun(300));
        assert_eq!(address(&[1, 0, 0, 7, 0, 0, 0, 0]), Address::Lun(7));
        assert_eq!(address(&[1, 1, 0x40, 0, 0, 0, 0, 0]), Address::Bad);
        assert_eq!(address(&[0, 0, 0, 0]), Address::Bad);
        assert_eq!(address(&[1, 0, 0xC1, 1, 0, 0, 0, 0]), Address::ReportLuns);
        assert_eq!(address(&[]), Address::Bad);
    }
}
