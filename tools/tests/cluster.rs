//! Several hosts (processes with their own host UUIDs) on one datastore:
//! they share it; a dead host is detected by its silent heartbeat and
//! recovered (its locks with it); a stalled host fences itself.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

mod common;
use common::{digest, mounted, signal, text, vmfs, VMFS};

/// The hosts' lease. Short, so that takeovers are quick, but with a safe
/// window (half of it) wide enough that a heartbeat starved for a few
/// hundred milliseconds on a loaded 2-core CI machine (nine of these tests,
/// each with two hosts and an NBD server, run at once) does not fence a
/// healthy host: with 800 ms, a 592 ms gap fenced one mid-write.
const LEASE_MS: u32 = 2000;
const LEASE: &str = "2000";

fn mount_fg(lun: &str, mnt: &Path, host: &str) -> Child {
    common::mount_foreground_lease(&["--host-uuid", host, lun], mnt, LEASE_MS)
}

/// SIGKILL a host and detach its dead FUSE mount.
fn kill_host(c: &mut Child, mnt: &Path) {
    signal(c, libc::SIGKILL);
    c.wait().unwrap();
    let _ = Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(mnt)
        .status();
}

const A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const B: &str = "bbbbbbbb-0000-4000-8000-000000000002";

/// A datastore on an NBD export `name` (image `name.img` in the returned
/// directory) served by one qemu-nbd, and two mountpoints.
fn setup_nbd(
    name: &str,
) -> (
    tempfile::TempDir,
    vmfs_tests::Server,
    String,
    PathBuf,
    PathBuf,
) {
    let d = tempfile::tempdir().unwrap();
    let (server, url) = vmfs_tests::qemu_nbd(d.path(), name, 256 << 20);
    assert!(vmfs(&["mkfs", "--block-size", "64K", &url])
        .status
        .success());
    let (ma, mb) = (d.path().join("a"), d.path().join("b"));
    std::fs::create_dir(&ma).unwrap();
    std::fs::create_dir(&mb).unwrap();
    (d, server, url, ma, mb)
}

fn setup() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let lun = d.path().join("lun.img");
    std::fs::File::create(&lun)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    assert!(
        vmfs(&["mkfs", "--block-size", "64K", lun.to_str().unwrap()])
            .status
            .success()
    );
    let (ma, mb) = (d.path().join("a"), d.path().join("b"));
    std::fs::create_dir(&ma).unwrap();
    std::fs::create_dir(&mb).unwrap();
    (d, lun, ma, mb)
}

/// Two hosts share the datastore: names made on one are seen by the other
/// at once; a file one host has open for writing is EBUSY for the other;
/// offline work is refused. Then the writing host is killed with the file
/// open: the survivor notices within a lease and a heartbeat, replays its
/// journal, and can open the file for writing; fsck is clean. On a file LUN
/// (compare-and-write) and on an NBD export shared by both hosts (Disk
/// Paxos).
#[test]
fn two_hosts_share_and_takeover_after_kill() {
    let (_d, lun, ma, mb) = setup();
    share_and_takeover(lun.to_str().unwrap(), &ma, &mb);
}

#[test]
fn two_hosts_share_and_takeover_after_kill_over_nbd() {
    let (_d, _server, url, ma, mb) = setup_nbd("shared");
    share_and_takeover(&url, &ma, &mb);
}

fn open_rw(p: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().read(true).write(true).open(p)
}

fn share_and_takeover(sl: &str, ma: &Path, mb: &Path) {
    // Both cores busy beside the hosts, as on a host that runs VMs.
    let _hog = common::Hog::start();
    let mut a = mount_fg(sl, ma, A);
    let mut f = std::fs::File::create(ma.join("from-a")).unwrap();
    f.write_all(b"written by host a").unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut b = mount_fg(sl, mb, B);
    assert_eq!(
        std::fs::read(mb.join("from-a")).unwrap(),
        b"written by host a"
    );
    // A name made on b: a lookup on a finds it within a second.
    std::fs::write(mb.join("from-b"), b"b").unwrap();
    let t = Instant::now();
    while !ma.join("from-b").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "b's file not seen on a"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let o = vmfs(&["hosts", sl]);
    assert!(
        text(&o).matches("live (heartbeat moving)").count() == 2,
        "{}",
        text(&o)
    );
    // One writer at a time.
    let mut held = open_rw(&ma.join("from-a")).unwrap();
    let e = open_rw(&mb.join("from-a")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{e}");
    let e = std::fs::File::open(mb.join("from-a")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{e}");
    let e = std::fs::remove_file(mb.join("from-a")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{e}");
    let o = vmfs(&["locks", sl]);
    assert!(
        text(&o).contains("exclusive") && text(&o).contains(A),
        "{}",
        text(&o)
    );
    // Offline work is refused while a host is live.
    let o = vmfs(&["fsck", "--repair", sl]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("unmount it before repairing"),
        "{}",
        text(&o)
    );
    // Host a dies mid-write with the file open.
    held.write_all(&[9u8; 100_000]).unwrap();
    held.sync_all().unwrap();
    kill_host(&mut a, ma);
    let t = Instant::now();
    let mut f = loop {
        match open_rw(&mb.join("from-a")) {
            Ok(f) => break f,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                assert!(t.elapsed() < Duration::from_secs(10), "no takeover");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    };
    let took = t.elapsed();
    eprintln!("takeover after kill: {took:?} (lease {LEASE} ms)");
    assert!(
        took < Duration::from_millis(LEASE_MS as u64 * 9 / 8 + 1000),
        "takeover took {took:?}, more than lease + heartbeat (+1 s of slack)"
    );
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut got).unwrap();
    assert_eq!(got, vec![9u8; 100_000]);
    f.write_all(b"b writes now").unwrap();
    drop(f);
    signal(&b, libc::SIGTERM);
    assert!(b.wait().unwrap().success());
    let o = vmfs(&["fsck", sl]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = vmfs(&["locks", sl]);
    assert!(text(&o).contains("no lock is held"), "{}", text(&o));
}

/// SIGSTOP a host past its lease; another host recovers it and mounts; on
/// SIGCONT the stopped host finds its lease lost and writes nothing more
/// (the volume's checksum does not change), its pending writes fail.
#[test]
fn a_stalled_host_fences_itself() {
    let (_d, lun, ma, mb) = setup();
    stalled(lun.to_str().unwrap(), &lun, &ma, &mb);
}

/// The same over NBD, where nothing is compare-and-write: the stopped host
/// must not even renew its heartbeat over the recoverer's claim.
#[test]
fn a_stalled_host_fences_itself_over_nbd() {
    let (d, _server, url, ma, mb) = setup_nbd("stall");
    stalled(&url, &d.path().join("stall.img"), &ma, &mb);
}

/// `sl`: the LUN as the hosts name it; `lun`: the file holding its bytes.
fn stalled(sl: &str, lun: &Path, ma: &Path, mb: &Path) {
    let (ma, mb) = (ma.to_path_buf(), mb.to_path_buf());
    let mut a = mount_fg(sl, &ma, A);
    std::fs::write(ma.join("before"), b"1").unwrap();
    std::fs::File::open(ma.join("before"))
        .unwrap()
        .sync_all()
        .unwrap();
    signal(&a, libc::SIGSTOP);
    // Host b takes over the stopped host (it looks dead), works, leaves.
    let mut b = mount_fg(sl, &mb, B);
    std::fs::write(mb.join("from-b"), b"b").unwrap();
    signal(&b, libc::SIGTERM);
    assert!(b.wait().unwrap().success());
    let sum = digest(lun);
    // Host a wakes up with a write queued against it.
    let ma2 = ma.clone();
    let writer = std::thread::spawn(move || {
        std::fs::write(ma2.join("after-stop"), vec![7u8; 100_000])
            .and_then(|_| std::fs::File::open(ma2.join("after-stop"))?.sync_all())
    });
    std::thread::sleep(Duration::from_millis(200));
    signal(&a, libc::SIGCONT);
    let r = writer.join().unwrap();
    assert!(r.is_err(), "a fenced host acknowledged a write");
    std::thread::sleep(Duration::from_millis(1500)); // heartbeats, commit timer
    assert_eq!(digest(lun), sum, "the fenced host wrote to the volume");
    signal(&a, libc::SIGTERM);
    let _ = a.wait();
    let _ = Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(&ma)
        .status();
    assert_eq!(digest(lun), sum, "the fenced host wrote while stopping");
    let o = vmfs(&["fsck", sl]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = vmfs(&["hosts", sl]);
    assert!(!text(&o).contains("live"), "{}", text(&o));
}

/// Two survivors race to recover the same dead host: exactly one replays
/// its journal; both mount.
#[test]
fn two_survivors_race_and_exactly_one_recovers() {
    let (d, lun, ma, mb) = setup();
    let sl = lun.to_str().unwrap();
    let mc = d.path().join("c");
    std::fs::create_dir(&mc).unwrap();
    let _hog = common::Hog::start();
    let mut a = mount_fg(sl, &ma, A);
    std::fs::write(ma.join("x"), b"x").unwrap();
    std::fs::File::open(ma.join("x"))
        .unwrap()
        .sync_all()
        .unwrap();
    kill_host(&mut a, &ma);
    const C: &str = "cccccccc-0000-4000-8000-000000000003";
    let spawn = |host: &str, mnt: &Path| {
        Command::new(VMFS)
            .args([
                "mount",
                "--foreground",
                "--host-uuid",
                host,
                "--lease-ms",
                LEASE,
                sl,
            ])
            .arg(mnt)
            .env("VMFS_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut b = spawn(B, &mb);
    let mut c = spawn(C, &mc);
    let t = Instant::now();
    while !(mounted(&mb) || mounted(&mc)) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "neither survivor mounted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    while !(mounted(&mb) && mounted(&mc)) {
        if t.elapsed() > Duration::from_secs(20) {
            // Say why: both survivors' logs.
            let mut logs = String::new();
            for mut p in [b, c] {
                signal(&p, libc::SIGKILL);
                let _ = p.wait();
                let mut e = String::new();
                let _ = std::io::Read::read_to_string(p.stderr.as_mut().unwrap(), &mut e);
                logs.push_str(&e);
            }
            for m in [&mb, &mc] {
                let _ = Command::new("fusermount3")
                    .args(["-u", "-z"])
                    .arg(m)
                    .status();
            }
            panic!("one survivor did not mount:\n{logs}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read(mb.join("x")).unwrap(), b"x");
    assert_eq!(std::fs::read(mc.join("x")).unwrap(), b"x");
    for p in [&mut b, &mut c] {
        signal(p, libc::SIGTERM);
    }
    let mut logs = String::new();
    for p in [b, c] {
        let o = p.wait_with_output().unwrap();
        logs.push_str(&String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(logs.matches("replaying its journal").count(), 1, "{logs}");
    let o = vmfs(&["fsck", sl]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

fn capacity(m: &Path) -> u64 {
    let c = std::ffi::CString::new(m.to_str().unwrap()).unwrap();
    // SAFETY: a valid path and an out-parameter of the right type.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_blocks * s.f_frsize
}

/// `vmfs extend` while two hosts have the datastore mounted: it joins as a
/// third host, adds the extent under the volume lock; both mounted hosts
/// see the new capacity without remounting and can use it.
#[test]
fn online_extend_while_two_hosts_are_mounted() {
    let d = tempfile::tempdir().unwrap();
    let (l0, l1) = (d.path().join("l0.img"), d.path().join("l1.img"));
    for (p, n) in [(&l0, 64u64 << 20), (&l1, 128 << 20)] {
        std::fs::File::create(p).unwrap().set_len(n).unwrap();
    }
    let s0 = l0.to_str().unwrap();
    assert!(vmfs(&["mkfs", "--block-size", "64K", s0]).status.success());
    let (ma, mb) = (d.path().join("a"), d.path().join("b"));
    std::fs::create_dir(&ma).unwrap();
    std::fs::create_dir(&mb).unwrap();
    let mut a = mount_fg(s0, &ma, A);
    let mut b = mount_fg(s0, &mb, B);
    let before = capacity(&mb);
    assert!(before <= 64 << 20, "{before}");
    const C: &str = "cccccccc-0000-4000-8000-000000000003";
    let o = vmfs(&[
        "extend",
        "--host-uuid",
        C,
        "--lease-ms",
        LEASE,
        s0,
        "--add",
        l1.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("extending online"), "{}", text(&o));
    for m in [&ma, &mb] {
        let t = Instant::now();
        while capacity(m) < before + (100 << 20) {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{} still shows {} bytes",
                m.display(),
                capacity(m)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // More than the first extent ever held: it needs the new one.
    let big: Vec<u8> = (0..90u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(mb.join("big"), &big).unwrap();
    assert!(std::fs::read(ma.join("big")).unwrap() == big);
    for h in [&mut a, &mut b] {
        signal(h, libc::SIGTERM);
        assert!(h.wait().unwrap().success());
    }
    let o = vmfs(&["fsck", s0, l1.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// Two hosts over the same iSCSI LUNs (tgt, so Disk Paxos): one writer per
/// file, EBUSY for the other host, the lock visible in `vmfs locks`, and
/// the file free for the other host once closed.
#[test]
fn two_hosts_over_iscsi_one_writer() {
    let d = tempfile::tempdir().unwrap();
    let mut tgt = vmfs_tests::Tgt::start(d.path());
    let l0 = tgt.add_lun("c0", 128 << 20);
    let l1 = tgt.add_lun("c1", 128 << 20);
    let o = vmfs(&["mkfs", &l0, &l1]);
    assert!(o.status.success(), "{}", text(&o));
    let (ma, mb) = (d.path().join("a"), d.path().join("b"));
    std::fs::create_dir(&ma).unwrap();
    std::fs::create_dir(&mb).unwrap();
    let mut a = common::mount_foreground_lease(&["--host-uuid", A, &l0, &l1], &ma, 8000);
    let mut b = common::mount_foreground_lease(&["--host-uuid", B, &l0, &l1], &mb, 8000);
    std::fs::write(ma.join("disk.vmdk"), b"extent").unwrap();
    let held = open_rw(&ma.join("disk.vmdk")).unwrap();
    let t = Instant::now();
    while !mb.join("disk.vmdk").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "a's file not seen on b"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let e = open_rw(&mb.join("disk.vmdk")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{e}");
    let e = std::fs::remove_file(mb.join("disk.vmdk")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{e}");
    let o = vmfs(&["locks", &l0, &l1]);
    assert!(
        text(&o).contains("exclusive") && text(&o).contains(A) && text(&o).contains("Disk Paxos"),
        "{}",
        text(&o)
    );
    drop(held);
    let t = Instant::now();
    let mut f = loop {
        match open_rw(&mb.join("disk.vmdk")) {
            Ok(f) => break f,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "a's close never freed the file"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    };
    f.write_all(b"b").unwrap();
    drop(f);
    for (c, m) in [(&mut a, &ma), (&mut b, &mb)] {
        signal(c, libc::SIGTERM);
        assert!(
            c.wait().unwrap().success(),
            "host on {} failed",
            m.display()
        );
    }
    let o = vmfs(&["fsck", &l0, &l1]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// Hosts allocate from file-block clusters of their own: two hosts growing
/// a file each hold different clusters (`vmfs locks`); a host freeing
/// blocks in a cluster another host holds gets it handed over; a file one
/// host holds open for writing cannot have its metadata changed elsewhere,
/// but its size written there is seen elsewhere; fsck is clean and every
/// lock is free after unmount.
#[test]
fn hosts_allocate_from_clusters_of_their_own() {
    let (_d, lun, ma, mb) = setup();
    clusters_of_their_own(lun.to_str().unwrap(), &ma, &mb);
}

#[test]
fn hosts_allocate_from_clusters_of_their_own_over_nbd() {
    let (_d, _server, url, ma, mb) = setup_nbd("clusters");
    clusters_of_their_own(&url, &ma, &mb);
}

fn clusters_of_their_own(sl: &str, ma: &Path, mb: &Path) {
    let mut a = mount_fg(sl, ma, A);
    let mut b = mount_fg(sl, mb, B);
    // Written by a and closed: its blocks lie in a's cluster.
    std::fs::write(ma.join("old"), vec![5u8; 1 << 20]).unwrap();
    let mut fa = std::fs::File::create(ma.join("fa")).unwrap();
    let mut fb = std::fs::File::create(mb.join("fb")).unwrap();
    for _ in 0..8 {
        fa.write_all(&[1u8; 256 << 10]).unwrap();
        fb.write_all(&[2u8; 256 << 10]).unwrap();
    }
    fa.sync_all().unwrap();
    fb.sync_all().unwrap();
    let o = vmfs(&["locks", sl]);
    let t = text(&o);
    let clusters: Vec<&str> = t
        .split("file-block cluster")
        .skip(1)
        .map(|s| s.lines().nth(1).unwrap_or(""))
        .collect();
    assert!(
        clusters.iter().any(|l| l.contains(A)) && clusters.iter().any(|l| l.contains(B)),
        "each host should hold a file-block cluster of its own:\n{t}"
    );
    // b frees blocks in a cluster a holds: a hands it over.
    let t0 = Instant::now();
    std::fs::remove_file(mb.join("old")).unwrap();
    eprintln!(
        "unlink needing a cluster the other host held: {:?}",
        t0.elapsed()
    );
    assert!(!ma.join("old").exists());
    // a's open file: its metadata is a's to change, its size is seen on b.
    let e = std::fs::set_permissions(
        mb.join("fa"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{e}");
    std::fs::rename(mb.join("fa"), mb.join("fa2")).unwrap();
    fa.write_all(&[3u8; 100]).unwrap();
    fa.sync_all().unwrap();
    let want = 8 * (256 << 10) + 100;
    let t0 = Instant::now();
    while std::fs::metadata(mb.join("fa2")).unwrap().len() != want {
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "b does not see the size a wrote"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop((fa, fb));
    // The kernel answers close before the host has let go of the lock.
    let t0 = Instant::now();
    let got = loop {
        match std::fs::read(mb.join("fa2")) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(3),
                    "a never let go of fa"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            r => break r.unwrap(),
        }
    };
    assert_eq!(got.len() as u64, want, "a's file read on b");
    assert!(
        got[..8 * (256 << 10)].iter().all(|&x| x == 1)
            && got[8 * (256 << 10)..].iter().all(|&x| x == 3)
    );
    for (c, m) in [(&mut a, ma), (&mut b, mb)] {
        signal(c, libc::SIGTERM);
        assert!(
            c.wait().unwrap().success(),
            "host on {} failed",
            m.display()
        );
    }
    let o = vmfs(&["fsck", sl]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = vmfs(&["locks", sl]);
    assert!(text(&o).contains("no lock is held"), "{}", text(&o));
}
