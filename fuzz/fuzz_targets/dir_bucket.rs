#![no_main]
use libfuzzer_sys::fuzz_target;
use vmfs::format::*;

fuzz_target!(|data: &[u8]| {
    let mut b = data.to_vec();
    b.resize(MD, 0);
    if let Ok(es) = bucket_entries(&b) {
        let mut again = vec![0u8; MD];
        assert!(bucket_store(&mut again, &es));
        assert_eq!(bucket_entries(&again).ok(), Some(es));
    }
});
