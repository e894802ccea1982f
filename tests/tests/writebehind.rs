//! Write-behind through a real FUSE mount: a write into blocks the file
//! has is answered before it reaches the LUN, yet reads and stat see it at
//! once, and a write that fails after its answer is reported by fsync
//! (once), with nothing else damaged.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vmfs::{Fs, MkfsOptions};
use vmfs_tests::*;

const MIB: usize = 1 << 20;

#[test]
fn reads_see_answered_writes_and_late_failures_reach_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let url = file_lun(dir.path(), "lun.img", 256 << 20);
    Fs::mkfs(
        open_luns(std::slice::from_ref(&url)),
        &MkfsOptions::default(),
    )
    .unwrap();
    let fault = Arc::new(lun::FaultLun::new(lun::open(&url).unwrap()));
    let fs = Arc::new(Fs::open(vec![fault.clone() as Arc<dyn lun::Lun>]).unwrap());
    let mnt = dir.path().join("mnt");
    let m = Mounted::with_fs(fs, &mnt);
    let path = mnt.join("disk");

    // Allocate 16 MiB (these writes are carried out before their answer).
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.write_all(&pattern(1, 16 * MIB)).unwrap();
    f.sync_all().unwrap();

    // Overwrite in place: each write is answered early; a read right after
    // (another handle too), and stat, must see it.
    let other = std::fs::File::open(&path).unwrap();
    for k in 0..16u64 {
        let p = pattern(100 + k, MIB);
        f.write_all_at(&p, k * MIB as u64).unwrap();
        let mut back = vec![0u8; MIB];
        other.read_exact_at(&mut back, k * MIB as u64).unwrap();
        assert!(back == p, "MiB {k} read back differs");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 16 * MIB as u64);
    }
    // Overlapping small writes land in order.
    for k in 0..200u64 {
        f.write_all_at(&[k as u8; 4096], 3 * MIB as u64 + k * 1000)
            .unwrap();
    }
    let mut back = vec![0u8; 4096];
    other
        .read_exact_at(&mut back, 3 * MIB as u64 + 199 * 1000)
        .unwrap();
    assert!(back.iter().all(|&b| b == 199));
    f.sync_all().unwrap();

    // The LUN starts failing writes: the write is answered (its blocks
    // exist), the failure comes with fsync, once.
    fault.set_plan(lun::FaultPlan {
        fail_writes: vec![0..u64::MAX],
        ..Default::default()
    });
    f.write_all_at(&pattern(7, MIB), 5 * MIB as u64).unwrap();
    let e = f
        .sync_all()
        .expect_err("fsync must report the failed write");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    fault.set_plan(Default::default());
    f.sync_all().expect("reported once; the LUN works again");

    // Nothing else was damaged: the rest reads as written.
    let mut all = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut all).unwrap();
    assert_eq!(all.len(), 16 * MIB);
    assert!(all[6 * MIB..7 * MIB] == pattern(106, MIB)[..]);
    drop(f);
    drop(other);
    m.unmount();
    let fs = Fs::open(open_luns(&[url])).unwrap();
    let r = vmfs::fsck::check(&fs, false, None).unwrap();
    assert!(r.errors.is_empty(), "fsck: {:?}", r.errors);
}
