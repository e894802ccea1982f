#![no_main]
use libfuzzer_sys::fuzz_target;
use vmfs::format::*;

fuzz_target!(|data: &[u8]| {
    let mut b = data.to_vec();
    b.resize(MD - LOCK_SECTOR, 0);
    let _ = Inode::decode(&b, 1);
    put32(&mut b, 0, MAGIC_FD);
    put16(&mut b, 4, VERSION);
    put64(&mut b, 16, 1);
    seal(&mut b);
    if let Ok(i) = Inode::decode(&b, 1) {
        // What decodes must re-encode to the same bytes.
        let mut again = vec![0u8; MD - LOCK_SECTOR];
        i.encode(&mut again);
        assert_eq!(Inode::decode(&again, 1).ok(), Some(i));
    }
});
