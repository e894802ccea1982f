#![no_main]
//! Any 512 bytes must decode to a heartbeat slot or an error, never a
//! panic, the mailbox fields (another host writes them, any version)
//! included; a slot that decodes encodes back to one that decodes the
//! same. The header and checksum are made right half the time so that the
//! field checks are reached.
use libfuzzer_sys::fuzz_target;
use vmfs::format::{init_body, seal, HostSlot, MAGIC_HEARTBEAT};

const REGION: u64 = 8;
const SLOT: u32 = 3;

fuzz_target!(|data: &[u8]| {
    let mut b = data.to_vec();
    b.resize(512, 0);
    if data.first().is_some_and(|x| x & 1 == 1) {
        let body = b[32..].to_vec();
        init_body(&mut b, MAGIC_HEARTBEAT, REGION, u64::from(SLOT));
        b[32..].copy_from_slice(&body);
        seal(&mut b);
    }
    if let Ok(s) = HostSlot::decode(&b, REGION, SLOT) {
        let again =
            HostSlot::decode(&s.encode(REGION, SLOT), REGION, SLOT).expect("an encoded slot decodes");
        assert_eq!(again, s);
    }
});
