#![no_main]
//! Any 4 KiB must decode to a header or an error, never a panic. The header is
//! sealed first half the time so the field checks are reached, not just the CRC.
use libfuzzer_sys::fuzz_target;
use vmfs::format::*;

fuzz_target!(|data: &[u8]| {
    let mut b = data.to_vec();
    b.resize(MD, 0);
    let _ = VolumeHeader::decode(&b, None);
    if data.first().is_some_and(|x| x & 1 == 1) {
        put32(&mut b, 0, MAGIC_VOLUME);
        put16(&mut b, 4, VERSION);
        seal(&mut b);
        let _ = VolumeHeader::decode(&b, None);
    }
});
