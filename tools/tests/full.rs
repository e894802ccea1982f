//! A full datastore whose host crashed can always be mounted again, a file
//! on it deleted and written again: joining never needs free space while a
//! host slot with a journal can be reused.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;
use common::{text, vmfs, Host};

/// Mount LUN on `mnt` as the host kept in `state`. The lease is 3 s, not
/// the tests' usual 2 s: filling a LUN over NBD beside a CPU hog queues
/// the heartbeat's write behind megabytes of data on the one connection,
/// and a renewal 400 ms late fences the host (CI saw 718 ms).
fn mount(lun: &str, mnt: &Path, state: &Path) -> Host {
    Host::mount_lease(&["--state-dir", state.to_str().unwrap(), lun], mnt, 3000)
}

fn unmount(h: &mut Host) {
    h.unmount().unwrap();
}

/// Write `path` in 1 MiB writes until ENOSPC (required), then fsync (so the
/// datastore is still full after a crash); returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let buf = vec![0x5au8; 1 << 20];
    let mut n = 0u64;
    loop {
        match f.write(&buf) {
            Ok(w) if w > 0 => n += w as u64,
            Ok(_) => panic!("a write of 0 bytes"),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                f.sync_all().unwrap();
                return n;
            }
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

fn free_bytes(m: &Path) -> u64 {
    let c = std::ffi::CString::new(m.to_str().unwrap()).unwrap();
    // SAFETY: a valid path and a zeroed out-struct.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_bavail * s.f_frsize
}

fn dirs(d: &Path, names: &[&str]) -> Vec<PathBuf> {
    names
        .iter()
        .map(|n| {
            let p = d.join(n);
            std::fs::create_dir_all(&p).unwrap();
            p
        })
        .collect()
}

/// Fill, kill -9, then: the same host remounts (it had the only journal),
/// and later a new host does, after a second crash on the full datastore;
/// deleting and writing again work, fsck is clean.
fn full_then_crash(lun: &str, d: &Path) {
    let _hog = common::Hog::start();
    let o = vmfs(&["mkfs", lun]);
    assert!(o.status.success(), "{}", text(&o));
    let v = dirs(d, &["mnt", "st-a", "st-b"]);
    let (mnt, sa, sb) = (&v[0], &v[1], &v[2]);

    let mut a = mount(lun, mnt, sa);
    let wrote = fill(&mnt.join("fill"));
    assert!(wrote > 150 << 20, "only {wrote} bytes fit on 256 MiB");
    assert!(
        free_bytes(mnt) < 2 << 20,
        "not full: {} bytes free",
        free_bytes(mnt)
    );
    a.kill();

    // The same host comes back: it reuses its own journal.
    let mut a = mount(lun, mnt, sa);
    std::fs::remove_file(mnt.join("fill")).unwrap();
    let again = fill(&mnt.join("fill2"));
    assert!(
        again + (4 << 20) >= wrote,
        "{again} bytes after the delete, {wrote} before"
    );
    a.kill();

    // A new host (another UUID) on the full datastore: it takes the slot
    // of the host that died, journal and all.
    let mut b = mount(lun, mnt, sb);
    std::fs::remove_file(mnt.join("fill2")).unwrap();
    std::fs::write(mnt.join("after"), vec![1u8; 8 << 20]).unwrap();
    std::fs::File::open(mnt.join("after"))
        .unwrap()
        .sync_all()
        .unwrap();
    unmount(&mut b);
    let o = vmfs(&["fsck", lun]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = vmfs(&["hosts", lun]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_full_datastore_mounts_again_after_its_host_crashed() {
    let d = tempfile::tempdir().unwrap();
    let lun = vmfs_tests::file_lun(d.path(), "l0.img", 256 << 20);
    full_then_crash(&lun, d.path());
}

#[test]
fn a_full_datastore_mounts_again_after_its_host_crashed_over_nbd() {
    let d = tempfile::tempdir().unwrap();
    let (_server, url) = vmfs_tests::qemu_nbd(d.path(), "l0", 256 << 20);
    full_then_crash(&url, d.path());
}

/// Two hosts; one fills the datastore and is killed. A third, new host
/// mounts beside the survivor while the datastore is still full (it reuses
/// the dead host's journal once the survivor has recovered it); the
/// survivor deletes the dead host's file, and remounts too.
#[test]
fn a_full_datastore_survivor_and_a_new_host_both_mount() {
    let d = tempfile::tempdir().unwrap();
    let lun = vmfs_tests::file_lun(d.path(), "l0.img", 256 << 20);
    assert!(vmfs(&["mkfs", &lun]).status.success());
    let _hog = common::Hog::start();
    let v = dirs(d.path(), &["ma", "mb", "mc", "st-a", "st-b", "st-c"]);
    let mut a = mount(&lun, &v[0], &v[3]);
    let mut b = mount(&lun, &v[1], &v[4]);
    std::fs::write(v[1].join("b-file"), vec![2u8; 4 << 20]).unwrap();
    fill(&v[0].join("fill"));
    assert!(
        free_bytes(&v[0]) < 2 << 20,
        "not full: {} bytes free",
        free_bytes(&v[0])
    );
    a.kill();
    let mut c = mount(&lun, &v[2], &v[5]);

    // The survivor may delete the dead host's file once it has recovered it
    // (until then the file is the dead host's, open for writing: EBUSY).
    let t = Instant::now();
    loop {
        match std::fs::remove_file(v[1].join("fill")) {
            Ok(()) => break,
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && t.elapsed() < Duration::from_secs(20) =>
            {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("the survivor deletes the dead host's file: {e}"),
        }
    }
    std::fs::write(v[2].join("c-file"), vec![3u8; 4 << 20]).unwrap();
    assert_eq!(
        std::fs::read(v[2].join("b-file")).unwrap(),
        vec![2u8; 4 << 20]
    );
    unmount(&mut b);
    let mut b = mount(&lun, &v[1], &v[4]);
    assert_eq!(std::fs::read(v[1].join("c-file")).unwrap().len(), 4 << 20);
    unmount(&mut b);
    unmount(&mut c);
    let o = vmfs(&["fsck", &lun]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// Joining needs a journal only when no free slot has one; then free space
/// in pieces is enough: a host joins a datastore whose free space is all in
/// holes of two file blocks (a smaller journal, said in `vmfs info`). (Files
/// of 2 MiB: a file of up to 1 MiB lives in sub-blocks, whose clusters stay
/// sub-blocks when it is deleted.)
#[test]
fn a_new_host_joins_where_free_space_is_in_pieces() {
    let d = tempfile::tempdir().unwrap();
    let lun = vmfs_tests::file_lun(d.path(), "l0.img", 256 << 20);
    assert!(vmfs(&["mkfs", &lun]).status.success());
    let v = dirs(d.path(), &["ma", "mb", "st-a", "st-b"]);
    let mut a = mount(&lun, &v[0], &v[2]);
    let one = vec![7u8; 2 << 20];
    let mut n = 0;
    loop {
        match std::fs::write(v[0].join(format!("f{n}")), &one) {
            Ok(()) => n += 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("f{n}: {e}"),
        }
    }
    for k in (1..n).step_by(2) {
        std::fs::remove_file(v[0].join(format!("f{k}"))).unwrap();
    }
    std::fs::File::open(&v[0]).unwrap().sync_all().unwrap();
    let mut b = mount(&lun, &v[1], &v[3]);
    std::fs::write(v[1].join("from-b"), &one).unwrap();
    assert_eq!(std::fs::read(v[0].join("from-b")).unwrap(), one);
    unmount(&mut b);
    unmount(&mut a);
    let o = vmfs(&["fsck", &lun]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let info = text(&vmfs(&["info", &lun]));
    assert!(
        info.contains("slot 1: free, generation 1, journal at") && info.contains("(2.0 MiB)"),
        "{info}"
    );
}
