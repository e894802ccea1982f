//! The filesystem library on memory LUNs: files, directories, sparse files,
//! reopen, and corruption of every metadata kind.

use std::sync::Arc;

use lun::{Lun, MemLun};
use vmfs::format::*;
use vmfs::{Fs, MkfsOptions};

fn luns(sizes: &[u64]) -> Vec<Arc<dyn Lun>> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &s)| Arc::new(MemLun::new(&format!("mem{i}"), s)) as Arc<dyn Lun>)
        .collect()
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn files_span_extents_and_survive_reopen() {
    let l = luns(&[16 << 20, 16 << 20]);
    let fs = Fs::mkfs(l.clone(), &MkfsOptions::default()).unwrap();
    let root = fs.root();
    let f = fs
        .create(root, b"big", S_IFREG | 0o644, 0, 0, 0, None)
        .unwrap();
    let data = pattern(1, 20 << 20);
    for (k, chunk) in data.chunks(1 << 20).enumerate() {
        fs.write(f.addr, (k as u64) << 20, chunk).unwrap();
    }
    assert_eq!(fs.read(f.addr, 0, data.len()).unwrap(), data);
    let small = fs
        .create(root, b"small", S_IFREG | 0o600, 5, 6, 0, None)
        .unwrap();
    fs.write(small.addr, 0, b"hello").unwrap();
    let mid = fs
        .create(root, b"mid", S_IFREG | 0o600, 5, 6, 0, None)
        .unwrap();
    fs.write(mid.addr, 0, &pattern(2, 200_000)).unwrap(); // sub-blocks
    fs.write(mid.addr, 900_000, &pattern(3, 300_000)).unwrap(); // -> file blocks
    drop(fs);
    let fs = Fs::open(l).unwrap();
    let f = fs.lookup(fs.root(), b"big").unwrap();
    assert_eq!(f.size, 20 << 20);
    assert_eq!(fs.read(f.addr, 0, data.len()).unwrap(), data);
    assert_eq!(
        fs.read(fs.lookup(fs.root(), b"small").unwrap().addr, 0, 100)
            .unwrap(),
        b"hello"
    );
    let m = fs.lookup(fs.root(), b"mid").unwrap();
    let got = fs.read(m.addr, 0, 1_200_000).unwrap();
    assert_eq!(&got[..200_000], &pattern(2, 200_000)[..]);
    assert!(got[200_000..900_000].iter().all(|&b| b == 0));
    assert_eq!(&got[900_000..], &pattern(3, 300_000)[..]);
    let r = vmfs::fsck::check(&fs, false, None).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

#[test]
fn sparse_truncate_punch_fallocate() {
    let fs = Fs::mkfs(luns(&[64 << 20]), &MkfsOptions::default()).unwrap();
    let f = fs
        .create(fs.root(), b"s", S_IFREG | 0o644, 0, 0, 0, None)
        .unwrap();
    fs.write(f.addr, 10 << 20, b"end").unwrap();
    let before = fs.usage().free_blocks;
    assert!(fs.read(f.addr, 0, 4096).unwrap().iter().all(|&b| b == 0));
    fs.write(f.addr, 0, &[1u8; 3 << 20]).unwrap();
    fs.fallocate(
        f.addr,
        1 << 20,
        1 << 20,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    )
    .unwrap();
    assert!(fs.usage().free_blocks > before - 3);
    let r = fs.read(f.addr, 0, 3 << 20).unwrap();
    assert!(
        r[..1 << 20].iter().all(|&b| b == 1)
            && r[1 << 20..2 << 20].iter().all(|&b| b == 0)
            && r[2 << 20..].iter().all(|&b| b == 1)
    );
    fs.setattr(
        f.addr,
        &vmfs::SetAttr {
            size: Some(100),
            ..Default::default()
        },
    )
    .unwrap();
    fs.setattr(
        f.addr,
        &vmfs::SetAttr {
            size: Some(5 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    let r = fs.read(f.addr, 0, 5 << 20).unwrap();
    assert!(r[..100].iter().all(|&b| b == 1) && r[100..].iter().all(|&b| b == 0));
    fs.fallocate(f.addr, 0, 8 << 20, 0).unwrap();
    assert_eq!(fs.getattr(f.addr).unwrap().size, 8 << 20);
    assert!(fs
        .read(f.addr, 5 << 20, 3 << 20)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    fs.write(f.addr, (6 << 20) + 5, b"x").unwrap();
    let r = fs.read(f.addr, 6 << 20, 1 << 20).unwrap();
    assert_eq!(r[5], b'x');
    assert_eq!(r.iter().filter(|&&b| b != 0).count(), 1);
    let r = vmfs::fsck::check(&fs, false, None).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

#[test]
fn big_directory_and_rename_rules() {
    let fs = Fs::mkfs(luns(&[768 << 20]), &MkfsOptions::default()).unwrap();
    let d = fs
        .create(fs.root(), b"d", S_IFDIR | 0o755, 0, 0, 0, None)
        .unwrap();
    let n = 100_000;
    for k in 0..n {
        fs.create(
            d.addr,
            format!("file-{k:06}").as_bytes(),
            S_IFREG | 0o644,
            0,
            0,
            0,
            None,
        )
        .unwrap();
    }
    assert_eq!(fs.readdir(d.addr).unwrap().len(), n);
    for k in (0..n).step_by(997) {
        fs.lookup(d.addr, format!("file-{k:06}").as_bytes())
            .unwrap();
    }
    // O(1): a cold lookup reads a bounded number of metadata blocks.
    let reads = vmfs::fsck::count_lookup_reads(&fs, d.addr, b"file-054321").unwrap();
    assert!(
        reads <= 8,
        "lookup in a {n}-entry directory read {reads} blocks"
    );
    for k in 0..n / 2 {
        fs.unlink(d.addr, format!("file-{k:06}").as_bytes(), false)
            .unwrap();
    }
    assert_eq!(fs.readdir(d.addr).unwrap().len(), n / 2);
    let a = fs
        .create(fs.root(), b"a", S_IFDIR | 0o755, 0, 0, 0, None)
        .unwrap();
    let b = fs
        .create(a.addr, b"b", S_IFDIR | 0o755, 0, 0, 0, None)
        .unwrap();
    assert_eq!(
        fs.rename(fs.root(), b"a", b.addr, b"x", false, false)
            .unwrap_err()
            .fault(),
        vmfs::Fault::Invalid
    );
    assert_eq!(
        fs.unlink(fs.root(), b"a", true).unwrap_err().fault(),
        vmfs::Fault::NotEmpty
    );
    fs.rename(a.addr, b"b", fs.root(), b"b", false, false)
        .unwrap();
    assert_eq!(fs.lookup(fs.root(), b"b").unwrap().parent, fs.root());
    assert_eq!(fs.getattr(fs.root()).unwrap().nlink, 5);
    fs.unlink(fs.root(), b"a", true).unwrap();
    let r = vmfs::fsck::check(&fs, false, None).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

#[test]
fn wrong_missing_reordered_foreign_extents() {
    let l = luns(&[16 << 20, 16 << 20]);
    Fs::mkfs(l.clone(), &MkfsOptions::default()).unwrap();
    let other = luns(&[16 << 20]);
    Fs::mkfs(
        other.clone(),
        &MkfsOptions {
            label: "other".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let e = Fs::open(vec![l[0].clone()]).err().unwrap().to_string();
    assert!(e.contains("missing extent 1"), "{e}");
    let e = Fs::open(vec![l[1].clone(), l[0].clone()])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("is extent 1") && e.contains("position 0"), "{e}");
    let e = Fs::open(vec![l[0].clone(), other[0].clone()])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("another datastore") && e.contains("mem0"), "{e}");
    let e = Fs::open(vec![l[0].clone(), l[1].clone(), other[0].clone()])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("another datastore"), "{e}");
    let blank = luns(&[16 << 20]);
    let e = Fs::open(vec![l[0].clone(), l[1].clone(), blank[0].clone()])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("extent 2") && e.contains("not formatted"), "{e}");
}

#[test]
fn extend_adds_capacity() {
    let l = luns(&[16 << 20]);
    let fs = Fs::mkfs(l.clone(), &MkfsOptions::default()).unwrap();
    let before = fs.usage().total_blocks;
    let n = luns(&[32 << 20]);
    fs.extend(n[0].clone()).unwrap();
    assert_eq!(fs.usage().total_blocks, before + 32);
    let f = fs
        .create(fs.root(), b"f", S_IFREG | 0o644, 0, 0, 0, None)
        .unwrap();
    fs.write(f.addr, 0, &pattern(9, 30 << 20)).unwrap();
    drop(fs);
    let fs = Fs::open(vec![l[0].clone(), n[0].clone()]).unwrap();
    assert_eq!(
        fs.read(fs.lookup(fs.root(), b"f").unwrap().addr, 0, 30 << 20)
            .unwrap(),
        pattern(9, 30 << 20)
    );
    assert!(
        fs.extend(l[0].clone()).is_err(),
        "a LUN holding a datastore must be refused"
    );
}

/// A block freed by a transaction is never handed out again by the same
/// transaction, even when it is the only free block left (this used to spin).
#[test]
fn freed_block_not_reused_in_same_transaction() {
    let fs = Fs::mkfs(luns(&[16 << 20]), &MkfsOptions::default()).unwrap();
    let r = vmfs::testing::op(&fs, |st, vol| {
        // Free the first block taken: not at the cluster's end, where the
        // old wrap-around search happened to stop.
        let first = st.alloc.alloc_fb(vol, &mut st.meta)?;
        while st.alloc.alloc_fb(vol, &mut st.meta).is_ok() {}
        st.alloc.free_fb(vol, &mut st.meta, first)?;
        st.alloc.alloc_fb(vol, &mut st.meta)
    });
    assert!(matches!(r, Err(vmfs::FsError::NoSpace(_))), "{r:?}");
    // The failed transaction wrote nothing: the blocks are still free.
    assert!(fs.usage().free_blocks > 0);
}
