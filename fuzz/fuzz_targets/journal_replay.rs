#![no_main]
//! Replay of a damaged journal: a valid journal of three transactions, then
//! the fuzzer's patches (some blocks resealed so that damage behind a valid
//! checksum is reached too). Replay must not panic and must apply only
//! images whose descriptor checksum matches.
use std::sync::{Arc, Mutex};

use journal::{BoxError, Journal, Region, Target, BLOCK};
use libfuzzer_sys::fuzz_target;
use lun::{Lun, MemLun};

struct Sink(Mutex<Vec<(u64, Vec<u8>)>>);
impl Target for Sink {
    fn write_block(&self, addr: u64, _off: u32, body: &[u8]) -> Result<(), BoxError> {
        self.0.lock().unwrap().push((addr, body.to_vec()));
        Ok(())
    }
    fn flush(&self) -> Result<(), BoxError> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let lun = Arc::new(MemLun::new("fz", 300 * BLOCK as u64));
    let r = Region { lun: lun.clone(), lun_offset: 0, addr: 0x40, nblocks: 256, slot: 0 };
    let uuid = [3u8; 16];
    let sink = Sink(Mutex::new(Vec::new()));
    let mut j = Journal::format(r.clone(), &uuid, 10).unwrap();
    for t in 0..3u8 {
        let img = vec![t + 1; BLOCK];
        j.commit(&[(100 + u64::from(t), 0, &img[..]), (200, 512, &img[..])], &sink).unwrap();
    }
    // Patches: (block u8, offset u16, value u8, reseal u8).
    for p in data.chunks_exact(5) {
        let block = u64::from(p[0] % 16);
        let off = u64::from(u16::from_le_bytes([p[1], p[2]])) % BLOCK as u64;
        lun.write_at(&[p[3]], block * BLOCK as u64 + off).unwrap();
        if p[4] & 1 == 1 {
            let mut b = vec![0u8; BLOCK];
            lun.read_at(&mut b, block * BLOCK as u64).unwrap();
            b[8..12].fill(0);
            let c = crc32fast::hash(&b);
            b[8..12].copy_from_slice(&c.to_le_bytes());
            lun.write_at(&b, block * BLOCK as u64).unwrap();
        }
    }
    sink.0.lock().unwrap().clear();
    let _ = journal::replay(&r, &uuid, &sink);
});
