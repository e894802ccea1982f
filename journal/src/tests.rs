use super::*;
use lun::MemLun;
use std::collections::BTreeMap;
use std::sync::Mutex;

const UUID: [u8; 16] = [7; 16];

/// A target that records what was applied.
#[derive(Default)]
struct Mem {
    blocks: Mutex<BTreeMap<u64, Vec<u8>>>,
    flushes: Mutex<u32>,
}
impl Target for Mem {
    fn write_block(&self, addr: u64, off: u32, body: &[u8]) -> std::result::Result<(), BoxError> {
        let mut b = self.blocks.lock().unwrap();
        let e = b.entry(addr).or_insert_with(|| vec![0; BLOCK]);
        e[off as usize..].copy_from_slice(body);
        Ok(())
    }
    fn flush(&self) -> std::result::Result<(), BoxError> {
        *self.flushes.lock().unwrap() += 1;
        Ok(())
    }
}

fn region(nblocks: u32) -> Region {
    Region {
        lun: Arc::new(MemLun::new("jl", 4096 * (u64::from(nblocks) + 8))),
        lun_offset: 8192,
        addr: 0x100,
        nblocks,
        slot: 3,
    }
}

fn img(addr: u64, fill: u8, off: u32) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[off as usize..].fill(fill);
    b[off as usize] = addr as u8;
    b
}

fn commit(j: &mut Journal, t: &Mem, addrs: &[u64], fill: u8) -> u64 {
    let imgs: Vec<Vec<u8>> = addrs.iter().map(|&a| img(a, fill, 512)).collect();
    let refs: Vec<(u64, u32, &[u8])> = addrs
        .iter()
        .zip(&imgs)
        .map(|(&a, b)| (a, 512u32, b.as_slice()))
        .collect();
    j.commit(&refs, t).unwrap()
}

#[test]
fn commit_scan_replay_and_replay_twice() {
    let r = region(MIN_BLOCKS);
    let t = Mem::default();
    let mut j = Journal::format(r.clone(), &UUID, 100).unwrap();
    assert_eq!(commit(&mut j, &t, &[10, 11, 12], 1), 100);
    assert_eq!(commit(&mut j, &t, &[11], 2), 101);
    let s = scan(&r, &UUID).unwrap();
    assert_eq!(s.records.len(), 2);
    assert!(s.stopped.is_none());
    let rep = replay(&r, &UUID, &t).unwrap();
    assert_eq!((rep.transactions, rep.blocks, rep.first_seq), (2, 4, 100));
    let b = t.blocks.lock().unwrap().clone();
    assert_eq!(b[&11][600], 2, "the later transaction wins");
    assert_eq!(b[&10][600], 1);
    assert!(
        b[&10][..512].iter().all(|&x| x == 0),
        "only the body is written"
    );
    // Twice: nothing more to do, and the journal opens for writing again.
    let rep = replay(&r, &UUID, &t).unwrap();
    assert_eq!(rep.transactions, 0);
    let mut j = Journal::open(r.clone(), &UUID).unwrap();
    assert_eq!(commit(&mut j, &t, &[5], 3), 102);
}

#[test]
fn open_refuses_an_unreplayed_journal() {
    let r = region(MIN_BLOCKS);
    let t = Mem::default();
    let mut j = Journal::format(r.clone(), &UUID, 1).unwrap();
    commit(&mut j, &t, &[10], 1);
    assert!(matches!(
        Journal::open(r, &UUID),
        Err(JournalError::NotReplayed { records: 1, .. })
    ));
}

#[test]
fn wraps_checkpoints_and_replays_only_what_is_after_the_tail() {
    let r = region(MIN_BLOCKS);
    let t = Mem::default();
    let mut j = Journal::format(r.clone(), &UUID, 1).unwrap();
    // 600 transactions of 3 blocks (5 log blocks each) go round the log ~12 times.
    for k in 0..600u64 {
        commit(&mut j, &t, &[k % 7, 100 + k % 3, 200], (k % 250) as u8);
    }
    assert!(j.checkpoints >= 10, "{} checkpoints", j.checkpoints);
    let s = scan(&r, &UUID).unwrap();
    assert!(s.stopped.is_none(), "{:?}", s.stopped);
    let n = s.records.len() as u64;
    assert!(n > 0 && n * 5 <= j.capacity());
    assert_eq!(s.records.last().unwrap().seq, 600);
    assert_eq!(s.records.first().unwrap().seq, 601 - n);
}

#[test]
fn large_transactions_span_several_descriptors() {
    let r = region(2048);
    let t = Mem::default();
    let mut j = Journal::format(r.clone(), &UUID, 1).unwrap();
    let addrs: Vec<u64> = (0..600).collect();
    commit(&mut j, &t, &addrs, 9);
    let s = scan(&r, &UUID).unwrap();
    assert_eq!(s.records[0].images.len(), 600);
    assert_eq!(s.records[0].len, record_len(600));
    let too_big: Vec<u64> = (0..3000).collect();
    let imgs: Vec<Vec<u8>> = too_big.iter().map(|&a| img(a, 1, 0)).collect();
    let refs: Vec<(u64, u32, &[u8])> = imgs
        .iter()
        .enumerate()
        .map(|(a, b)| (a as u64, 0, b.as_slice()))
        .collect();
    assert!(matches!(
        j.commit(&refs, &t),
        Err(JournalError::TooLarge { .. })
    ));
}

/// Byte offset on the LUN of log position `pos`.
fn at(r: &Region, pos: u64) -> u64 {
    r.lun_offset + r.index(pos) * BLOCK as u64
}

#[test]
fn a_commit_without_its_blocks_is_skipped_and_never_applied() {
    let r = region(MIN_BLOCKS);
    let t = Mem::default();
    let mut j = Journal::format(r.clone(), &UUID, 1).unwrap();
    commit(&mut j, &t, &[10], 1); // positions 0..3
    commit(&mut j, &t, &[20, 21], 2); // positions 3..7: desc, 20, 21, commit
                                      // The image of block 21 never reached the disk (torn).
    r.lun.write_at(&[0xee; 512], at(&r, 5) + 1024).unwrap();
    let rep = replay(&r, &UUID, &t).unwrap();
    assert_eq!(rep.transactions, 1);
    let why = rep.stopped.unwrap();
    assert!(
        why.contains("transaction 2") && why.contains("0x15"),
        "{why}"
    );
    let b = t.blocks.lock().unwrap();
    assert!(b.contains_key(&10));
    assert!(
        !b.contains_key(&20) && !b.contains_key(&21),
        "nothing of the bad record"
    );
}

#[test]
fn wrong_sequence_and_foreign_records_stop_the_replay() {
    for case in 0..3 {
        let r = region(MIN_BLOCKS);
        let t = Mem::default();
        let mut j = Journal::format(r.clone(), &UUID, 1).unwrap();
        commit(&mut j, &t, &[10], 1);
        commit(&mut j, &t, &[20], 2);
        // Rewrite the second record's descriptor (position 3), resealed.
        let mut d = vec![0u8; BLOCK];
        r.lun.read_at(&mut d, at(&r, 3)).unwrap();
        match case {
            0 => put64(&mut d, 24, 9),                // sequence from nowhere
            1 => d[32..48].copy_from_slice(&[1; 16]), // another volume's record
            _ => put32(&mut d, D_COUNT, 5000),        // impossible count
        }
        seal(&mut d);
        r.lun.write_at(&d, at(&r, 3)).unwrap();
        let rep = replay(&r, &UUID, &t).unwrap();
        assert_eq!(rep.transactions, 1, "case {case}");
        assert!(rep.stopped.is_some(), "case {case}");
        assert!(!t.blocks.lock().unwrap().contains_key(&20));
    }
}

#[test]
fn a_journal_of_another_volume_is_refused_without_writing() {
    let r = region(MIN_BLOCKS);
    let t = Mem::default();
    let mut j = Journal::format(r.clone(), &[9; 16], 1).unwrap();
    commit(&mut j, &t, &[10], 1);
    let e = replay(&r, &UUID, &t).unwrap_err().to_string();
    assert!(
        e.contains("another volume") && e.contains("slot 3") && e.contains("jl"),
        "{e}"
    );
    assert!(t.blocks.lock().unwrap().is_empty());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// Garbage anywhere in the log: no panic, and only images that pass
    /// their checksums are applied (the ones committed before the damage).
    #[test]
    fn garbage_never_panics_nor_applies_bad_images(
        pos in 0u64..30, off in 0u64..4096, junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..600)
    ) {
        let r = region(MIN_BLOCKS);
        let t = Mem::default();
        let mut j = Journal::format(r.clone(), &UUID, 1).unwrap();
        for k in 0..6u64 {
            commit(&mut j, &t, &[k, 50 + k], k as u8 + 1);
        }
        let o = at(&r, pos) + off;
        let n = junk.len().min((r.lun.size() - o) as usize);
        r.lun.write_at(&junk[..n], o).unwrap();
        if let Ok(rep) = replay(&r, &UUID, &t) {
            for (a, b) in t.blocks.lock().unwrap().iter() {
                let k = a % 50;
                proptest::prop_assert_eq!(b, &img(*a, k as u8 + 1, 512), "block {} applied from a damaged record", a);
            }
            proptest::prop_assert!(rep.transactions <= 6);
        }
    }
}
