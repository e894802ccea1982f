//! The journal through the filesystem: what a crash keeps, what replay does
//! with a damaged journal, and that checking never writes.

use std::sync::Arc;

use lun::{Lun, MemLun};
use vmfs::format::*;
use vmfs::{Fs, MkfsOptions};

fn mem(size: u64) -> Vec<Arc<dyn Lun>> {
    vec![Arc::new(MemLun::new("mem0", size)) as Arc<dyn Lun>]
}

fn snapshot(l: &[Arc<dyn Lun>]) -> Vec<u8> {
    let mut b = vec![0u8; l[0].size() as usize];
    l[0].read_at(&mut b, 0).unwrap();
    b
}

fn opts() -> MkfsOptions {
    MkfsOptions {
        block_size: 64 << 10,
        journal_blocks: 256,
        ..Default::default()
    }
}

fn names(fs: &Fs) -> Vec<String> {
    let mut v: Vec<String> = fs
        .readdir(fs.root())
        .unwrap()
        .into_iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .filter(|n| n != "." && n != "..")
        .collect();
    v.sort();
    v
}

#[test]
fn a_crash_keeps_what_sync_committed_and_nothing_half_done() {
    let l = mem(32 << 20);
    let fs = Fs::mkfs(l.clone(), &opts()).unwrap();
    let root = fs.root();
    let a = fs
        .create(root, b"a", S_IFREG | 0o644, 0, 0, 0, None)
        .unwrap();
    fs.write(a.addr, 0, &[7u8; 100_000]).unwrap();
    fs.sync().unwrap();
    fs.create(root, b"b", S_IFREG | 0o644, 0, 0, 0, None)
        .unwrap();
    assert!(
        vmfs::testing::dirty_len(&fs) > 0,
        "b waits in the running transaction"
    );
    fs.abandon(); // a crash: nothing more is written
    drop(fs);
    let fs = Fs::open(l.clone()).unwrap();
    assert_eq!(fs.replays().len(), 1, "the synced transaction is replayed");
    assert_eq!(names(&fs), ["a"]);
    assert_eq!(fs.read(a.addr, 0, 100_000).unwrap(), vec![7u8; 100_000]);
    let r = vmfs::fsck::check(&fs, false, None).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    // A clean unmount leaves nothing to replay.
    fs.unmount().unwrap();
    drop(fs);
    let fs = Fs::open(l).unwrap();
    assert!(fs.replays().is_empty());
}

#[test]
fn many_operations_wrap_the_journal_and_stay_consistent() {
    let l = mem(64 << 20);
    let fs = Fs::mkfs(l.clone(), &opts()).unwrap();
    let root = fs.root();
    for k in 0..3000u32 {
        let n = format!("f{}", k % 400);
        let _ = fs.unlink(root, n.as_bytes(), false);
        fs.create(root, n.as_bytes(), S_IFREG | 0o644, 0, 0, 0, None)
            .unwrap();
        if k % 50 == 0 {
            fs.sync().unwrap();
        }
    }
    fs.sync().unwrap();
    fs.abandon();
    drop(fs);
    let fs = Fs::open(l).unwrap();
    assert_eq!(names(&fs).len(), 400);
    let r = vmfs::fsck::check(&fs, false, None).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

/// The journal region of slot 0, from the LUN (byte offset, blocks).
fn journal_of(l: &[Arc<dyn Lun>]) -> (u64, u64) {
    let vol = vmfs::Volume::open(l.to_vec()).unwrap();
    let s = vol.read_slot(0).unwrap();
    (s.journal * 4096, u64::from(s.journal_blocks))
}

#[test]
fn garbage_in_the_journal_stops_replay_at_the_last_good_transaction() {
    let l = mem(32 << 20);
    let fs = Fs::mkfs(l.clone(), &opts()).unwrap();
    let root = fs.root();
    fs.create(root, b"one", S_IFREG | 0o644, 0, 0, 0, None)
        .unwrap();
    fs.sync().unwrap();
    let (joff, _) = journal_of(&l);
    // Where the next record will start: find the end of the first one.
    fs.create(root, b"two", S_IFREG | 0o644, 0, 0, 0, None)
        .unwrap();
    fs.sync().unwrap();
    fs.abandon();
    drop(fs);
    // Damage the second record (somewhere after the first few log blocks).
    let img = snapshot(&l);
    // The first descriptor is at log block 1; the second one after it.
    let mut descs = (1..64u64).filter(|b| {
        let o = (joff + b * 4096) as usize;
        &img[o..o + 4] == b"VJDS"
    });
    let _first = descs.next().unwrap();
    let second = descs.next().expect("a second record");
    l[0].write_at(&[0xab; 100], joff + (second + 1) * 4096 + 2000)
        .unwrap();
    let fs = Fs::open(l.clone()).unwrap();
    let reps = fs.replays();
    assert_eq!(reps.len(), 1);
    assert_eq!(reps[0].1.transactions, 1, "{}", reps[0].1);
    let why = reps[0].1.stopped.clone().unwrap();
    assert!(why.contains("checksum"), "{why}");
    assert_eq!(names(&fs), ["one"]);
    let r = vmfs::fsck::check(&fs, false, None).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

#[test]
fn a_journal_of_another_volume_is_refused_and_nothing_is_written() {
    let l = mem(32 << 20);
    let fs = Fs::mkfs(l.clone(), &opts()).unwrap();
    fs.create(fs.root(), b"x", S_IFREG | 0o644, 0, 0, 0, None)
        .unwrap();
    fs.sync().unwrap();
    fs.abandon();
    drop(fs);
    let (joff, _) = journal_of(&l);
    // Another volume's UUID in the journal superblock, resealed.
    let mut sb = vec![0u8; 4096];
    l[0].read_at(&mut sb, joff).unwrap();
    sb[32..48].copy_from_slice(&[0x42; 16]);
    sb[8..12].fill(0);
    let c = crc32fast::hash(&sb);
    sb[8..12].copy_from_slice(&c.to_le_bytes());
    l[0].write_at(&sb, joff).unwrap();
    let before = snapshot(&l);
    let e = Fs::open(l.clone()).err().expect("refused").to_string();
    assert!(
        e.contains("another volume") && e.contains("slot 0") && e.contains("mem0"),
        "{e}"
    );
    assert!(snapshot(&l) == before, "nothing written");
}

#[test]
fn checking_replays_in_memory_only() {
    let l = mem(32 << 20);
    let fs = Fs::mkfs(l.clone(), &opts()).unwrap();
    fs.create(fs.root(), b"x", S_IFREG | 0o644, 0, 0, 0, None)
        .unwrap();
    fs.sync().unwrap();
    fs.abandon();
    drop(fs);
    let before = snapshot(&l);
    let fs = Fs::open_for_check(l.clone(), false).unwrap();
    assert_eq!(fs.replays().len(), 1);
    assert_eq!(names(&fs), ["x"]);
    let r = vmfs::fsck::check(&fs, false, None).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    drop(fs);
    assert!(snapshot(&l) == before, "a check wrote to the LUN");
}

/// A full datastore still frees space: blocks freed by an uncommitted (or
/// not yet checkpointed) unlink become usable after the checkpoint the
/// allocator runs when nothing else is free. Never read-only, never ENOSPC
/// for space the user already gave back.
#[test]
fn a_full_datastore_reuses_what_was_just_freed() {
    let l = mem(24 << 20);
    let fs = Fs::mkfs(l.clone(), &opts()).unwrap();
    let root = fs.root();
    let a = fs
        .create(root, b"a", S_IFREG | 0o644, 0, 0, 0, None)
        .unwrap();
    let chunk = vec![1u8; 1 << 20];
    let mut size = 0u64;
    loop {
        match fs.write(a.addr, size, &chunk) {
            Ok(_) => size += chunk.len() as u64,
            Err(e) => {
                assert_eq!(e.fault(), vmfs::Fault::NoSpace, "{e}");
                break;
            }
        }
    }
    assert!(size >= 8 << 20, "only {size} bytes fit");
    fs.unlink(root, b"a", false).unwrap(); // not synced: the free is pending
    let b = fs
        .create(root, b"b", S_IFREG | 0o644, 0, 0, 0, None)
        .unwrap();
    for k in 0..size / chunk.len() as u64 {
        fs.write(b.addr, k * chunk.len() as u64, &chunk)
            .unwrap_or_else(|e| panic!("rewriting MiB {k} of {}: {e}", size >> 20));
    }
    fs.sync().unwrap();
    fs.abandon();
    drop(fs);
    let fs = Fs::open(l).unwrap();
    assert_eq!(names(&fs), ["b"]);
    let r = vmfs::fsck::check(&fs, false, None).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}
