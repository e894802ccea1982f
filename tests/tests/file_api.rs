//! The file API ([`vmfs::File`]): paths, lock modes between two hosts,
//! holes and allocated ranges, punch, set length, and many threads reading
//! and writing one file at once.

use std::sync::Arc;

use lun::{Lun, MemLun};
use vmfs::{Fault, Fs, FsError, LockMode, MkfsOptions};
use vmfs_tests::pattern;

const BS: u64 = 64 << 10;

fn mems(n: u64) -> Vec<Arc<MemLun>> {
    vec![Arc::new(MemLun::new("mem0", n))]
}

fn luns(m: &[Arc<MemLun>]) -> Vec<Arc<dyn Lun>> {
    m.iter().map(|l| l.clone() as Arc<dyn Lun>).collect()
}

fn opts() -> MkfsOptions {
    MkfsOptions {
        block_size: BS as u32,
        max_hosts: 4,
        journal_blocks: 256,
        ..Default::default()
    }
}

fn single(size: u64) -> Arc<Fs> {
    Arc::new(Fs::mkfs(luns(&mems(size)), &opts()).unwrap())
}

/// Two hosts mounted on the same memory LUN, in this process.
fn two_hosts(size: u64) -> (Arc<Fs>, Arc<Fs>) {
    let m = mems(size);
    Fs::mkfs(luns(&m), &opts()).unwrap().unmount().unwrap();
    let t = vmfs::cluster::Timeouts::new(Some(50), Some(1500)).unwrap();
    let uuid = |k: u8| {
        let mut u = [0u8; 16];
        u[0] = 0x51;
        u[15] = k;
        u
    };
    let a = Fs::mount(luns(&m), uuid(1), t).unwrap();
    let b = Fs::mount(luns(&m), uuid(2), t).unwrap();
    (Arc::new(a), Arc::new(b))
}

fn read_all(f: &vmfs::File) -> Vec<u8> {
    let mut v = vec![0u8; f.len().unwrap() as usize];
    f.read_exact_at(&mut v, 0).unwrap();
    v
}

#[test]
fn paths_name_files_and_an_unlinked_open_file_lives_until_its_last_handle() {
    let fs = single(64 << 20);
    fs.mkdir_path("vm1", 0o755).unwrap();
    let f = fs
        .create_file("/vm1//disk.raw", 0o600, LockMode::Exclusive)
        .unwrap();
    f.write_at(b"hello", 0).unwrap();
    assert!(matches!(
        fs.create_file("vm1/disk.raw", 0o600, LockMode::Exclusive),
        Err(FsError::File(Fault::Exists, _))
    ));
    fs.rename_path("vm1/disk.raw", "./vm1/disk2.raw").unwrap();
    let g = fs.open_path("vm1/disk2.raw", LockMode::ReadOnly).unwrap();
    assert_eq!(read_all(&g), b"hello");
    let e = fs.open_path("vm1/nothing", LockMode::ReadOnly).unwrap_err();
    assert!(e.to_string().contains("vm1/nothing"), "{e}");
    assert!(fs.open_path("vm1/../x", LockMode::ReadOnly).is_err());
    assert!(matches!(
        fs.open_path("vm1", LockMode::ReadOnly),
        Err(FsError::File(Fault::IsDir, _))
    ));
    fs.unlink_path("vm1/disk2.raw").unwrap();
    assert!(fs.resolve("vm1/disk2.raw").is_err());
    // Still readable and writable through the handles.
    f.write_at(b"world", 5).unwrap();
    assert_eq!(read_all(&g), b"helloworld");
    let free = fs.usage().free_blocks;
    drop(f);
    drop(g);
    assert!(fs.usage().free_blocks >= free);
    let r = vmfs::fsck::check(&fs, false, None).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

#[test]
fn holes_allocated_ranges_punch_zeroes_and_length() {
    let fs = single(128 << 20);
    let f = fs.create_file("thin", 0o600, LockMode::Exclusive).unwrap();
    f.set_len(32 << 20).unwrap();
    assert_eq!(f.len().unwrap(), 32 << 20);
    assert_eq!(f.allocated(0, 32 << 20).unwrap(), vec![]);
    assert_eq!(f.seek_data(0).unwrap(), None);
    assert_eq!(f.seek_hole(100).unwrap(), Some(100));
    f.write_at(&pattern(1, 4096), 3 * BS + 100).unwrap();
    f.write_at(&pattern(2, (2 * BS) as usize), 10 * BS).unwrap();
    f.write_at(&pattern(3, 10), (32 << 20) - 10).unwrap();
    let want = vec![3 * BS..4 * BS, 10 * BS..12 * BS, (32 << 20) - BS..32 << 20];
    assert_eq!(f.allocated(0, u64::MAX).unwrap(), want);
    assert_eq!(
        f.allocated(3 * BS + 5, 8 * BS).unwrap(),
        vec![3 * BS + 5..4 * BS, 10 * BS..11 * BS + 5]
    );
    assert_eq!(f.seek_data(0).unwrap(), Some(3 * BS));
    assert_eq!(f.seek_data(3 * BS + 7).unwrap(), Some(3 * BS + 7));
    assert_eq!(f.seek_hole(3 * BS).unwrap(), Some(4 * BS));
    assert_eq!(f.seek_data(12 * BS).unwrap(), Some((32 << 20) - BS));
    assert_eq!(f.seek_hole((32 << 20) - 1).unwrap(), Some(32 << 20));
    assert_eq!(f.seek_data(32 << 20).unwrap(), None);
    assert_eq!(f.seek_hole(32 << 20).unwrap(), None);
    let mut b = vec![0u8; 4096];
    f.read_exact_at(&mut b, 3 * BS + 100).unwrap();
    assert_eq!(b, pattern(1, 4096));
    // Punch a whole block and part of another: the block goes, the part reads zeros.
    f.punch_hole(10 * BS, BS + 10).unwrap();
    assert_eq!(
        f.allocated(0, u64::MAX).unwrap(),
        vec![3 * BS..4 * BS, 11 * BS..12 * BS, (32 << 20) - BS..32 << 20]
    );
    let mut b = vec![1u8; (2 * BS) as usize];
    f.read_exact_at(&mut b, 10 * BS).unwrap();
    assert!(b[..(BS + 10) as usize].iter().all(|&x| x == 0));
    assert_eq!(
        &b[(BS + 10) as usize..],
        &pattern(2, (2 * BS) as usize)[(BS + 10) as usize..]
    );
    // Zeroes: reads as zeros, blocks stay allocated but are not data.
    f.write_zeroes(3 * BS, BS).unwrap();
    let mut b = vec![1u8; BS as usize];
    f.read_exact_at(&mut b, 3 * BS).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    assert_eq!(f.seek_data(0).unwrap(), Some(11 * BS));
    // Allocate (thick): no data either, but a write there needs no space.
    f.allocate(20 * BS, 4 * BS).unwrap();
    assert!(f.writes_in_place(20 * BS, 4096).is_ok());
    f.write_at(&pattern(4, 4096), 21 * BS).unwrap();
    assert_eq!(f.seek_data(12 * BS).unwrap(), Some(21 * BS));
    // Shrink, then grow back: the tail is a hole, reading zeros.
    f.set_len(11 * BS + 1).unwrap();
    f.set_len(32 << 20).unwrap();
    assert_eq!(f.allocated(0, u64::MAX).unwrap(), vec![11 * BS..12 * BS]);
    let mut b = vec![1u8; BS as usize];
    f.read_exact_at(&mut b, 21 * BS).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    drop(f);
    let r = vmfs::fsck::check(&fs, false, None).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

#[test]
fn cached_blocks_are_forgotten_when_the_file_changes_or_goes() {
    let fs = single(64 << 20);
    let f = fs.create_file("a", 0o600, LockMode::Exclusive).unwrap();
    f.write_at(&pattern(1, (4 * BS) as usize), 0).unwrap();
    let mut b = vec![0u8; 4096];
    f.read_exact_at(&mut b, BS).unwrap(); // now cached
                                          // Another handle of this host punches: the first sees the hole.
    let g = fs.open_path("a", LockMode::Exclusive).unwrap();
    g.punch_hole(BS, BS).unwrap();
    f.read_exact_at(&mut b, BS).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // ... and a write into it again.
    g.write_at(&[7u8; 4096], BS).unwrap();
    f.read_exact_at(&mut b, BS).unwrap();
    assert_eq!(b, vec![7u8; 4096]);
    drop((f, g));
    // The descriptor freed and used again for another file: its blocks are
    // read, not the old file's.
    let f = fs.open_path("a", LockMode::Exclusive).unwrap();
    f.read_exact_at(&mut b, 0).unwrap();
    let ino = f.ino();
    drop(f);
    fs.unlink_path("a").unwrap();
    let mut reused = None;
    for k in 0..3000 {
        let n = fs
            .create_file(&format!("n{k}"), 0o600, LockMode::Exclusive)
            .unwrap();
        n.set_len(4 * BS).unwrap();
        if n.ino() == ino {
            let mut z = vec![1u8; 4096];
            n.read_exact_at(&mut z, 0).unwrap();
            assert!(
                z.iter().all(|&x| x == 0),
                "a reused descriptor read its old file's block"
            );
            reused = Some(k);
            break;
        }
    }
    assert!(reused.is_some(), "descriptor {ino:#x} was not reused");
}

/// Offsets far past the end: reads return nothing, a write makes a
/// sparse file that big, and neither costs memory for the holes between.
#[test]
fn far_offsets_read_nothing_and_write_sparse() {
    let fs = single(64 << 20);
    let f = fs.create_file("far", 0o600, LockMode::Exclusive).unwrap();
    f.write_at(&[5u8; 4096], 0).unwrap();
    f.set_len(8 << 20).unwrap();
    let mut b = vec![1u8; 4096];
    assert_eq!(f.read_at(&mut b, 1 << 50).unwrap(), 0);
    assert_eq!(f.read_at(&mut b, u64::MAX - 10).unwrap(), 0);
    f.write_at(&[6u8; 4096], 1 << 40).unwrap();
    assert_eq!(f.len().unwrap(), (1 << 40) + 4096);
    f.read_exact_at(&mut b, 1 << 40).unwrap();
    assert_eq!(b, vec![6u8; 4096]);
    f.read_exact_at(&mut b, 1 << 39).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // The small file's data moved to a file block; the holes stayed holes.
    assert_eq!(
        f.allocated(0, u64::MAX).unwrap(),
        vec![0..BS, (1 << 40)..(1 << 40) + 4096]
    );
    assert!(f.write_at(b"x", u64::MAX - 1).is_err());
}

#[test]
fn a_read_only_handle_changes_nothing() {
    let fs = single(64 << 20);
    drop(fs.create_file("r", 0o600, LockMode::Exclusive).unwrap());
    let f = fs.open_path("r", LockMode::ReadOnly).unwrap();
    for e in [
        f.write_at(b"x", 0).unwrap_err(),
        f.set_len(10).unwrap_err(),
        f.punch_hole(0, 10).unwrap_err(),
        f.write_zeroes(0, 10).unwrap_err(),
    ] {
        assert!(matches!(e, FsError::ReadOnly(_)), "{e}");
        assert!(e.to_string().contains("read-only"), "{e}");
    }
    assert_eq!(f.len().unwrap(), 0);
}

/// Eight threads write and read back their own 4 KiB blocks of one thin
/// file at once (the first writes of each block allocate), then read
/// everyone's.
#[test]
fn many_threads_read_and_write_one_file_at_once() {
    let fs = single(256 << 20);
    let f = Arc::new(fs.create_file("disk", 0o600, LockMode::Exclusive).unwrap());
    let size = 64u64 << 20;
    f.set_len(size).unwrap();
    let blocks = size / 4096;
    let threads = 8u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            let f = f.clone();
            s.spawn(move || {
                let mut x = t + 1;
                let mut got = vec![0u8; 4096];
                for round in 0..400u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Thread t owns the blocks b with b % threads == t.
                    let b = (x % (blocks / threads)) * threads + t;
                    let data = pattern(b * 1000 + round, 4096);
                    f.write_at(&data, b * 4096).unwrap();
                    f.read_exact_at(&mut got, b * 4096).unwrap();
                    assert_eq!(
                        got, data,
                        "thread {t} block {b}: a read after the write returned"
                    );
                    let _ = f.read_at(&mut got, (x >> 20) % size);
                }
            });
        }
    });
    // Replay each thread's sequence: the last write of each block wins.
    let mut last = std::collections::HashMap::new();
    for t in 0..threads {
        let mut x = t + 1;
        for round in 0..400u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = (x % (blocks / threads)) * threads + t;
            last.insert(b, round);
        }
    }
    f.flush().unwrap();
    drop(f);
    let g = fs.open_path("disk", LockMode::ReadOnly).unwrap();
    let mut got = vec![0u8; 4096];
    for (b, round) in &last {
        g.read_exact_at(&mut got, b * 4096).unwrap();
        assert_eq!(got, pattern(b * 1000 + round, 4096), "block {b}");
    }
    let data: u64 = g
        .allocated(0, size)
        .unwrap()
        .iter()
        .map(|r| r.end - r.start)
        .sum();
    assert!(data >= last.len() as u64 * 4096 && data <= last.len() as u64 * BS);
}

/// Lock modes between two hosts: exclusive and read-only exclude each
/// other with EBUSY naming the holder's slot; read-only is shared; a
/// multi-writer file is written by both at once, each seeing the other's
/// writes; removing, truncating or punching a file the other host has open
/// is refused.
#[test]
fn two_hosts_lock_modes_and_ebusy_naming_the_holder() {
    let (a, b) = two_hosts(128 << 20);
    let fa = a.create_file("d", 0o600, LockMode::Exclusive).unwrap();
    fa.write_at(&pattern(1, 8192), 0).unwrap();
    for m in [LockMode::Exclusive, LockMode::ReadOnly] {
        let e = b.open_path("d", m).unwrap_err();
        assert!(matches!(e, FsError::Busy(_)), "{e}");
        assert!(e.to_string().contains("slot"), "{e}");
    }
    let e = b.unlink_path("d").unwrap_err();
    assert!(matches!(e, FsError::Busy(_)), "{e}");
    drop(fa);
    let ra = a.open_path("d", LockMode::ReadOnly).unwrap();
    let rb = b.open_path("d", LockMode::ReadOnly).unwrap();
    assert_eq!(read_all(&rb), pattern(1, 8192));
    assert!(matches!(
        b.open_path("d", LockMode::Exclusive),
        Err(FsError::Busy(_))
    ));
    drop((ra, rb));

    // Multi-writer: only a file marked so.
    let e = a.open_path("d", LockMode::MultiWriter).unwrap_err();
    assert!(e.to_string().contains("multi-writer"), "{e}");
    let ino = a.resolve("d").unwrap();
    a.set_multi_writer(ino, true).unwrap();
    {
        let f = a.open_path("d", LockMode::MultiWriter).unwrap();
        f.allocate(0, 8 << 20).unwrap(); // thick, as a shared disk is
        f.flush().unwrap();
    }
    let fa = Arc::new(a.open_path("d", LockMode::MultiWriter).unwrap());
    let fb = Arc::new(b.open_path("d", LockMode::MultiWriter).unwrap());
    assert!(matches!(
        b.open_path("d", LockMode::Exclusive),
        Err(FsError::Busy(_))
    ));
    std::thread::scope(|s| {
        for (h, f) in [(0u64, fa.clone()), (1, fb.clone())] {
            for t in 0..2u64 {
                let f = f.clone();
                s.spawn(move || {
                    for k in 0..64u64 {
                        // Host h thread t: blocks (k * 4 + h * 2 + t).
                        let blk = k * 4 + h * 2 + t;
                        f.write_at(&pattern(blk, 4096), blk * 4096).unwrap();
                    }
                });
            }
        }
    });
    fa.flush().unwrap();
    fb.flush().unwrap();
    // Each host reads every block, its own and the other's.
    for f in [&fa, &fb] {
        let mut got = vec![0u8; 4096];
        for blk in 0..256u64 {
            f.read_exact_at(&mut got, blk * 4096).unwrap();
            assert_eq!(got, pattern(blk, 4096), "block {blk}");
        }
    }
    let e = fb.punch_hole(0, 1 << 20).unwrap_err();
    assert!(matches!(e, FsError::Busy(_)), "{e}");
    // Host a's writer closes while its reader stays and b still writes:
    // a keeps its lock (no shared lock beside a writer elsewhere), so b
    // still may not pull blocks from under a's reader.
    let ra = a.open_path("d", LockMode::ReadOnly).unwrap();
    drop(fa);
    let e = fb.punch_hole(0, 1 << 20).unwrap_err();
    assert!(matches!(e, FsError::Busy(_)), "{e}");
    let mut got = vec![0u8; 4096];
    ra.read_exact_at(&mut got, 4096).unwrap();
    assert_eq!(got, pattern(1, 4096));
    let fa = ra;
    let e = fb.set_len(4096).unwrap_err();
    assert!(matches!(e, FsError::Busy(_)), "{e}");
    drop(fa);
    fb.set_len(1 << 20).unwrap();
    drop(fb);
    a.unmount().unwrap();
    b.unmount().unwrap();
    let r = vmfs::fsck::check(&b, false, None).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}
