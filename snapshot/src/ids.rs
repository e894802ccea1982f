//! Random identifiers (CIDs, disk UUIDs, change-history ids), from the
//! kernel's random source; a test can make them a seeded sequence instead,
//! so that a recorded workload writes the same names (and so the same
//! blocks) every run.

use std::sync::atomic::{AtomicU64, Ordering};

/// 0: random; else the next value of the test sequence.
static TEST_NEXT: AtomicU64 = AtomicU64::new(0);

/// For tests: identifiers from now on are a sequence from `seed` (0: random
/// again).
#[doc(hidden)]
pub fn test_seed(seed: u64) {
    TEST_NEXT.store(seed, Ordering::Relaxed);
}

/// Fill `b` with random bytes.
pub(crate) fn fill(b: &mut [u8]) {
    let seq = TEST_NEXT.load(Ordering::Relaxed);
    if seq != 0 {
        TEST_NEXT.store(seq + 1, Ordering::Relaxed);
        // splitmix64 of the sequence number.
        let mut z = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for chunk in b.chunks_mut(8) {
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
        return;
    }
    let mut done = 0;
    while done < b.len() {
        // SAFETY: a valid buffer of the length given.
        let n = unsafe { libc::getrandom(b[done..].as_mut_ptr().cast(), b.len() - done, 0) };
        if n <= 0 {
            // No kernel randomness (never on Linux ≥ 3.17): the clock and
            // the pid, mixed, rather than a panic.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                ^ ((std::process::id() as u64) << 32);
            for (i, x) in b[done..].iter_mut().enumerate() {
                *x = (t >> ((i % 8) * 8)) as u8 ^ (i as u8).wrapping_mul(151);
            }
            return;
        }
        done += n as usize;
    }
}
