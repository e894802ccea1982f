#![no_main]
//! Any 512 bytes must decode to a lock sector or an error, never a panic; a
//! sector that decodes encodes back to one that decodes the same (holders
//! and the volume lock's "kept for" field included). The CRC is made right
//! half the time so the field checks are reached.
use libfuzzer_sys::fuzz_target;
use vmfs::locking::{LockRec, SECTOR};

fuzz_target!(|data: &[u8]| {
    let mut b = data.to_vec();
    b.resize(SECTOR, 0);
    if data.first().is_some_and(|x| x & 1 == 1) {
        b[0..4].copy_from_slice(&vmfs::locking::MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&vmfs::locking::VERSION.to_le_bytes());
        let crc = crc32fast::hash(&b[..508]);
        b[508..].copy_from_slice(&crc.to_le_bytes());
    }
    if let Ok(r) = LockRec::decode(&b) {
        let again = LockRec::decode(&r.encode()).expect("an encoded lock decodes");
        assert_eq!(again, r);
    }
});
