#![no_main]
//! Any bytes as a change-tracking file's header slot and page: a header
//! decodes or is refused, never a panic; one that decodes encodes back to
//! the same header; and a tracker over such a file answers `changed` for
//! any change ID with ranges inside the disk, or a clean error.
use libfuzzer_sys::fuzz_target;
use snapshot::ctk::{ChangeId, Header, Tracker, MAGIC};
use snapshot::store::{LocalStore, Store};

fuzz_target!(|data: &[u8]| {
    let mut b = data.to_vec();
    b.resize(4096 + 4096 + 8, 0);
    if data.first().is_some_and(|x| x & 1 == 1) {
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        if data.first().is_some_and(|x| x & 2 == 2) {
            // The checksum made right: the fields' checks are explored.
            b[12..16].fill(0);
            let mut c = crc32fast::Hasher::new();
            c.update(&b[24..32]);
            c.update(&b[..4096]);
            let c = c.finalize();
            b[12..16].copy_from_slice(&c.to_le_bytes());
        }
    }
    let Ok(h) = Header::decode(&b[..4096]) else {
        return;
    };
    assert_eq!(Header::decode(&h.encode()).as_ref(), Ok(&h));
    if h.capacity > 1 << 30 {
        return; // a query reads every page: keep the runs short
    }
    // A file: this header (re-encoded so its checksum holds) and the page.
    let d = tempfile::tempdir().unwrap();
    let mut f = h.encode();
    f.extend_from_slice(&[0u8; 4096]);
    f.extend_from_slice(&b[4096..8192]);
    std::fs::write(d.path().join("x-ctk.vmdk"), &f).unwrap();
    let s = LocalStore::new(d.path());
    let Ok(t) = Tracker::open(&s as &dyn Store, "x-ctk.vmdk", false) else {
        return;
    };
    let e = u32::from_le_bytes(b[8192..8196].try_into().unwrap());
    let since = ChangeId { history: h.history, epoch: e % (h.epoch + 1) };
    if let Ok(c) = t.changed(since, None, None) {
        for r in c.ranges {
            assert!(r.start < r.end && r.end <= h.capacity.div_ceil(65536) * 65536);
        }
    }
});
