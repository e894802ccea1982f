#![no_main]
//! Any 512 bytes (the magic made right half the time) must decode to a
//! sparse-extent header or an error, never a panic; a header that decodes
//! gives sane layout figures, and every grain directory and grain-table
//! entry checks or is refused cleanly.
use libfuzzer_sys::fuzz_target;
use snapshot::sparse::{check_gd, check_gte, Header, MAGIC};

fuzz_target!(|data: &[u8]| {
    let mut b = data.to_vec();
    b.resize(512 + 64, 0);
    if data.first().is_some_and(|x| x & 1 == 1) {
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    }
    let len = u64::from(u32::from_le_bytes([b[512], b[513], b[514], b[515]])) * 512;
    if let Ok(h) = Header::decode(&b[..512], "fuzz", len) {
        let _ = (h.tables(), h.gd_sectors(), h.grain_bytes());
        let gd: Vec<u32> = b[516..]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let _ = check_gd(&h, &gd, "fuzz", h.gd_offset);
        for e in gd {
            let _ = check_gte(&h, e, "fuzz", 0, len);
        }
    }
});
