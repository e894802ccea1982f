#![no_main]
//! What an iSCSI target returns for READ CAPACITY, INQUIRY and its VPD
//! pages: parsed without panics, whatever the bytes.
use libfuzzer_sys::fuzz_target;
use lun::iscsi::scsi::*;

fuzz_target!(|data: &[u8]| {
    let _ = parse_capacity(data);
    let _ = parse_inquiry(data);
    let _ = parse_supported_pages(data);
    let _ = parse_serial(data);
    let _ = parse_identity(data);
    let _ = parse_block_limits(data);
    let _ = parse_provisioning(data);
});
