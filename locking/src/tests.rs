use super::*;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// A LUN without compare-and-write whose I/O yields at random, so that the
/// hosts' reads and writes interleave.
struct Jittery(lun::MemLun, AtomicU64);

impl Jittery {
    fn jitter(&self) {
        let x = self.1.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        let x = (x ^ (x >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        match x % 8 {
            0 => std::thread::sleep(std::time::Duration::from_micros(x % 200)),
            1 | 2 => std::thread::yield_now(),
            _ => {}
        }
    }
}

impl Lun for Jittery {
    fn name(&self) -> &str {
        "jittery"
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> lun::Result<()> {
        self.jitter();
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> lun::Result<()> {
        self.jitter();
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> lun::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> lun::Result<()> {
        self.0.write_zeroes(offset, len, unmap)
    }
    fn identity(&self) -> lun::Result<String> {
        Ok("jittery".into())
    }
}

/// Ballot blocks at sector `1 + slot` of the LUN (sector 0: the lock).
struct Box_<'a> {
    lun: &'a dyn Lun,
    slot: u32,
    n: u32,
}

impl BallotBox for Box_<'_> {
    fn write_mine(&self, d: &Dblock) -> Result<()> {
        let mut b = vec![0u8; SECTOR];
        b[..DBLOCK_LEN].copy_from_slice(&d.encode());
        self.lun
            .write_at(&b, (1 + u64::from(self.slot)) * SECTOR as u64)?;
        Ok(())
    }
    fn read_all(&self) -> Result<Vec<Dblock>> {
        let mut b = vec![0u8; self.n as usize * SECTOR];
        self.lun.read_at(&mut b, SECTOR as u64)?;
        Ok(b.chunks(SECTOR).map(Dblock::decode).collect())
    }
}

#[test]
fn lock_sector_round_trip_and_damage() {
    assert_eq!(LockRec::decode(&[0u8; SECTOR]).unwrap(), LockRec::default());
    let r = LockRec {
        mode: Mode::Shared,
        generation: 7,
        holders: vec![
            Holder {
                slot: 3,
                generation: 9,
            },
            Holder {
                slot: 1000,
                generation: 1,
            },
        ],
        next: Some(Holder {
            slot: 5,
            generation: 2,
        }),
    };
    let mut b = r.encode();
    assert_eq!(LockRec::decode(&b).unwrap(), r);
    b[20] ^= 1;
    assert!(LockRec::decode(&b).unwrap_err().contains("checksum"));
    let mut b = r.encode();
    b[0] = 0;
    assert!(LockRec::decode(&b).unwrap_err().contains("magic"));
    // An exclusive lock with two holders is not a lock.
    let mut bad = r.clone();
    bad.mode = Mode::Exclusive;
    assert!(LockRec::decode(&bad.encode()).is_err());
}

#[test]
fn modes_and_stale_holders() {
    let a = Holder {
        slot: 0,
        generation: 1,
    };
    let b = Holder {
        slot: 1,
        generation: 1,
    };
    let free = LockRec::default();
    let ex = free.with(Mode::Exclusive, a);
    assert_eq!(ex.generation, 1);
    assert!(!ex.grants(Mode::Shared, &b));
    assert!(ex.grants(Mode::Exclusive, &a));
    let sh = free.with(Mode::Shared, a);
    assert!(sh.grants(Mode::Shared, &b));
    assert!(!sh.grants(Mode::Exclusive, &b));
    assert!(!sh.grants(Mode::MultiWriter, &b));
    let mw = free.with(Mode::MultiWriter, a);
    assert!(mw.grants(Mode::MultiWriter, &b));
    // a's slot was recovered (generation moved on): its hold is gone.
    let only_b = |h: &Holder| h.slot == 1;
    assert!(ex.live(&only_b).grants(Mode::Exclusive, &b));
    assert_eq!(ex.without(&a).mode, Mode::Free);
}

/// `hosts` threads take and give back the volume lock `rounds` times each
/// and check that no two are ever inside at once.
fn exclusion(lun: Arc<dyn Lun>, hosts: u32, rounds: u32, dead: &[u32]) -> u64 {
    let vl = VolumeLock::new(lun.clone(), 0);
    let inside = AtomicU32::new(0);
    let total = AtomicU64::new(0);
    let collisions = AtomicU64::new(0);
    let members = |h: &Holder| !dead.contains(&h.slot);
    std::thread::scope(|s| {
        for slot in 0..hosts {
            if dead.contains(&slot) {
                continue;
            }
            let (vl, inside, total, lun, collisions) = (&vl, &inside, &total, &lun, &collisions);
            s.spawn(move || {
                let me = Holder {
                    slot,
                    generation: 1,
                };
                let bb = Box_ {
                    lun: &**lun,
                    slot,
                    n: hosts,
                };
                let mut last = 0;
                for _ in 0..rounds {
                    loop {
                        match vl.try_acquire(me, &members, &bb).unwrap() {
                            Attempt::Acquired { generation } => {
                                assert!(generation > last);
                                last = generation;
                                break;
                            }
                            Attempt::Busy(_) => std::thread::yield_now(),
                            Attempt::Collided => {
                                collisions.fetch_add(1, Ordering::Relaxed);
                                std::thread::sleep(std::time::Duration::from_micros(
                                    50 * u64::from(slot + 1),
                                ))
                            }
                        }
                    }
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                    total.fetch_add(1, Ordering::SeqCst);
                    std::thread::yield_now();
                    inside.fetch_sub(1, Ordering::SeqCst);
                    vl.release(me).unwrap();
                }
            });
        }
    });
    total.load(Ordering::SeqCst)
}

#[test]
fn disk_paxos_excludes() {
    let lun: Arc<dyn Lun> = Arc::new(Jittery(lun::MemLun::new("m", 1 << 20), AtomicU64::new(1)));
    assert_eq!(VolumeLock::new(lun.clone(), 0).method, Method::DiskPaxos);
    assert_eq!(exclusion(lun, 4, 150, &[]), 600);
}

#[test]
fn disk_paxos_skips_a_dead_winner() {
    let lun: Arc<dyn Lun> = Arc::new(Jittery(lun::MemLun::new("m", 1 << 20), AtomicU64::new(5)));
    // Slot 2 won instance 1 and died before writing the lock sector.
    let bb = Box_ {
        lun: &*lun,
        slot: 2,
        n: 3,
    };
    let dead = Holder {
        slot: 2,
        generation: 1,
    };
    bb.write_mine(&Dblock {
        lver: 1,
        mbal: 4099,
        bal: 4099,
        inp: dead,
    })
    .unwrap();
    assert_eq!(exclusion(lun.clone(), 3, 50, &[2]), 100);
    assert!(VolumeLock::new(lun, 0).peek().unwrap().generation > 100);
}

#[test]
fn compare_and_write_excludes() {
    let dir = tempfile::tempdir().unwrap();
    let f = lun::FileLun::create(&dir.path().join("l"), 1 << 20).unwrap();
    let lun: Arc<dyn Lun> = Arc::new(f);
    assert_eq!(
        VolumeLock::new(lun.clone(), 0).method,
        Method::CompareAndWrite
    );
    assert_eq!(exclusion(lun, 4, 200, &[]), 800);
}

#[test]
fn object_locks_under_the_volume_lock() {
    let lun = lun::MemLun::new("m", 1 << 20);
    let a = Holder {
        slot: 0,
        generation: 1,
    };
    let b = Holder {
        slot: 1,
        generation: 4,
    };
    let all = |_: &Holder| true;
    let off = 4096;
    assert!(
        acquire_under_volume_lock(&lun, off, Mode::Exclusive, a, &all)
            .unwrap()
            .is_ok()
    );
    let refused = acquire_under_volume_lock(&lun, off, Mode::Shared, b, &all)
        .unwrap()
        .unwrap_err();
    assert_eq!(refused.holders, vec![a]);
    release_under_volume_lock(&lun, off, a).unwrap();
    assert!(acquire_under_volume_lock(&lun, off, Mode::Shared, b, &all)
        .unwrap()
        .is_ok());
    assert!(acquire_under_volume_lock(&lun, off, Mode::Shared, a, &all)
        .unwrap()
        .is_ok());
    assert_eq!(read_lock(&lun, off).unwrap().holders.len(), 2);
}

/// A lock handed to a waiting host is busy for every other host (its
/// releaser too) until that host takes it, dies, or the reservation lapses.
fn hand_over(lun: Arc<dyn Lun>) {
    let mut vl = VolumeLock::new(lun.clone(), 0);
    vl.lapse = std::time::Duration::from_millis(300);
    let h = |slot| Holder {
        slot,
        generation: 1,
    };
    let bb = |slot| Box_ {
        lun: &*lun,
        slot,
        n: 3,
    };
    let all = |_: &Holder| true;
    assert!(matches!(
        vl.try_acquire(h(0), &all, &bb(0)).unwrap(),
        Attempt::Acquired { .. }
    ));
    vl.release_to(h(0), Some(h(2))).unwrap();
    assert_eq!(vl.peek().unwrap().next, Some(h(2)));
    for s in [0, 1] {
        assert!(
            matches!(vl.try_acquire(h(s), &all, &bb(s)).unwrap(), Attempt::Busy(r) if r.next == Some(h(2))),
            "slot {s} took a lock kept for slot 2"
        );
    }
    assert!(matches!(
        vl.try_acquire(h(2), &all, &bb(2)).unwrap(),
        Attempt::Acquired { .. }
    ));
    vl.release_to(h(2), Some(h(1))).unwrap();
    // Kept for a host that is no longer current: free for anyone.
    let not_1 = |x: &Holder| x.slot != 1;
    assert!(matches!(
        vl.try_acquire(h(0), &not_1, &bb(0)).unwrap(),
        Attempt::Acquired { .. }
    ));
    // A reservation nobody takes lapses on the observer's clock.
    vl.release_to(h(0), Some(h(1))).unwrap();
    assert!(matches!(
        vl.try_acquire(h(2), &all, &bb(2)).unwrap(),
        Attempt::Busy(_)
    ));
    std::thread::sleep(std::time::Duration::from_millis(350));
    assert!(matches!(
        vl.try_acquire(h(2), &all, &bb(2)).unwrap(),
        Attempt::Acquired { .. }
    ));
    assert_eq!(vl.peek().unwrap().next, None);
}

#[test]
fn hand_over_by_compare_and_write() {
    let dir = tempfile::tempdir().unwrap();
    let f = lun::FileLun::create(&dir.path().join("l"), 1 << 20).unwrap();
    hand_over(Arc::new(f));
}

#[test]
fn hand_over_by_disk_paxos() {
    hand_over(Arc::new(Jittery(
        lun::MemLun::new("m", 1 << 20),
        AtomicU64::new(3),
    )));
}

/// Random sectors (with a right CRC half the time): each decodes or is
/// refused, never panics, and one that decodes encodes back to itself.
/// (`fuzz/fuzz_targets/lock_sector.rs` does the same, guided.)
#[test]
fn random_sectors_decode_or_are_refused() {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut decoded = 0;
    for i in 0..20_000 {
        let mut b = vec![0u8; SECTOR];
        for v in b.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *v = x as u8;
        }
        // Plausible headers: few holders, known modes.
        b[6] %= 5;
        b[7] %= 40;
        if i % 2 == 0 {
            b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
            b[4..6].copy_from_slice(&VERSION.to_le_bytes());
            let crc = crc32fast::hash(&b[..CRC_OFF]);
            b[CRC_OFF..].copy_from_slice(&crc.to_le_bytes());
        }
        if let Ok(r) = LockRec::decode(&b) {
            decoded += 1;
            assert_eq!(LockRec::decode(&r.encode()).unwrap(), r);
        }
    }
    assert!(decoded > 100, "only {decoded} sectors decoded");
}
