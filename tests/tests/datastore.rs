//! A datastore over two LUNs, mounted with FUSE: a file larger than the
//! first extent's free space lands in both extents, survives unmount, fsck
//! and remount. Once over two file LUNs, once over a file and qemu-nbd.

use std::io::{Read, Write};

use vmfs::{Fs, MkfsOptions};
use vmfs_tests::*;

fn round_trip(urls: Vec<String>, dir: &std::path::Path) {
    Fs::mkfs(
        open_luns(&urls),
        &MkfsOptions {
            label: "e2e".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let first_free = {
        let fs = Fs::open(open_luns(&urls)).unwrap();
        fs.vol().header.extents[0].nblocks * fs.vol().block_size()
    };
    let size = first_free as usize + (8 << 20);
    let data = pattern(42, size);
    let mnt = dir.join("mnt");
    let m = Mounted::new(&urls, &mnt);
    {
        let mut f = std::fs::File::create(mnt.join("disk.bin")).unwrap();
        for c in data.chunks(1 << 20) {
            f.write_all(c).unwrap();
        }
        f.sync_all().unwrap();
        std::fs::create_dir(mnt.join("sub")).unwrap();
        std::fs::write(mnt.join("sub/small"), b"small file").unwrap();
    }
    m.unmount();
    {
        let fs = Fs::open(open_luns(&urls)).unwrap();
        let ino = fs.lookup(fs.root(), b"disk.bin").unwrap();
        let ext = fs.extents_of(ino.addr).unwrap();
        assert_eq!(
            ext.into_iter().collect::<Vec<_>>(),
            vec![0, 1],
            "the file must use both extents"
        );
        let r = vmfs::fsck::check(&fs, false, None).unwrap();
        assert!(r.errors.is_empty(), "fsck: {:?}", r.errors);
    }
    let m = Mounted::new(&urls, &mnt);
    let mut back = Vec::new();
    std::fs::File::open(mnt.join("disk.bin"))
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(back == data, "data read back differs");
    assert_eq!(std::fs::read(mnt.join("sub/small")).unwrap(), b"small file");
    m.unmount();
}

#[test]
fn two_file_luns() {
    let d = tempfile::tempdir().unwrap();
    let urls = vec![
        file_lun(d.path(), "a.img", 48 << 20),
        format!("file://{}", file_lun(d.path(), "b.img", 48 << 20)),
    ];
    round_trip(urls, d.path());
}

#[test]
fn file_lun_and_qemu_nbd_lun() {
    let d = tempfile::tempdir().unwrap();
    let (_srv, nbd) = qemu_nbd(d.path(), "ext1", 48 << 20);
    let urls = vec![file_lun(d.path(), "a.img", 48 << 20), nbd];
    round_trip(urls, d.path());
}

/// statfs reports real numbers, and they move when space is used.
#[test]
fn statfs_is_real() {
    let d = tempfile::tempdir().unwrap();
    let urls = vec![file_lun(d.path(), "a.img", 64 << 20)];
    Fs::mkfs(open_luns(&urls), &MkfsOptions::default()).unwrap();
    let mnt = d.path().join("mnt");
    let m = Mounted::new(&urls, &mnt);
    let st = |p: &std::path::Path| {
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
        s
    };
    let a = st(&mnt);
    assert_eq!(a.f_bsize, 1 << 20);
    assert_eq!(a.f_blocks, 64);
    std::fs::write(mnt.join("f"), vec![1u8; 10 << 20]).unwrap();
    let b = st(&mnt);
    // 10 data blocks, plus at most one sub-block cluster the file passed through while small.
    assert!(
        (10..=11).contains(&(a.f_bfree - b.f_bfree)),
        "{} blocks used",
        a.f_bfree - b.f_bfree
    );
    m.unmount();
}
