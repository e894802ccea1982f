//! Several hosts mounted at once, with every core kept busy beside them
//! (busy loops: a host shares its CPUs with VMs): four `vmfs mount`
//! processes (each its own host UUID) on one file LUN (ten rounds), eight on
//! a larger one, and four on one NBD export served by a single qemu-nbd, run
//! create/write/rename/unlink in shared and private directories for a
//! bounded time; each host must make files. Then: fsck clean (which also finds any
//! block owned twice) and every acknowledged file present with its contents.
//! The same with two hosts over two iSCSI LUNs served by tgtd, once as is and
//! once with tgtd killed and restarted in the middle of the run. And four
//! hosts filling a datastore: ENOSPC only when it is full.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;
use common::{text, vmfs};

const RUN: Duration = Duration::from_secs(6);

fn host_uuid(i: usize) -> String {
    format!("{i:08x}-0000-4000-8000-0000000000{i:02x}")
}

fn content(host: usize, n: u64) -> Vec<u8> {
    // Sizes from inline (tiny) to several file blocks.
    let len = [13usize, 3000, 70_000, 200_000][(n % 4) as usize];
    (0..len)
        .map(|k| (k as u64 * 31 + n * 7 + host as u64 * 101) as u8)
        .collect()
}

/// One host's workload: returns the files it left (path relative to the
/// datastore root -> contents).
fn workload(mnt: &Path, host: usize, until: Instant) -> BTreeMap<String, Vec<u8>> {
    let private = format!("h{host}");
    std::fs::create_dir(mnt.join(&private)).unwrap();
    let mut left = BTreeMap::new();
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let dir = if n % 2 == 0 { "shared" } else { &private };
        let tmp = format!("{dir}/h{host}-{n}.tmp");
        let fin = format!("{dir}/h{host}-{n}");
        let data = content(host, n);
        let mut f = std::fs::File::create(mnt.join(&tmp)).unwrap();
        f.write_all(&data).unwrap();
        if n % 5 == 0 {
            f.sync_all().unwrap();
        }
        drop(f);
        std::fs::rename(mnt.join(&tmp), mnt.join(&fin)).unwrap();
        left.insert(fin.clone(), data);
        if n % 3 == 0 {
            // Remove an earlier file of ours.
            let old = left.keys().next().cloned().unwrap();
            std::fs::remove_file(mnt.join(&old)).unwrap();
            left.remove(&old);
        }
        if n % 7 == 0 {
            // Look at what the other hosts are doing.
            let names = std::fs::read_dir(mnt.join("shared")).unwrap().count();
            assert!(names > 0);
        }
    }
    left
}

/// The tests of this file one at a time: each keeps every core busy on its
/// own, and two side by side made a flush of a LUN file take seconds.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Host processes killed (and their mounts detached) if the test fails.
struct Hosts(Vec<(std::process::Child, PathBuf)>);

impl Hosts {
    /// Unmount every host cleanly (SIGTERM); each must exit with success.
    fn unmount_all(&mut self) {
        for (mut h, m) in std::mem::take(&mut self.0) {
            common::signal(&h, libc::SIGTERM);
            assert!(
                h.wait().unwrap().success(),
                "host on {} failed",
                m.display()
            );
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for (c, m) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
            let _ = std::process::Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(m)
                .status();
        }
    }
}

fn run(lun: &str, dir: &Path) {
    // A lease of 4 s: eight hosts share two CPUs here.
    run_with(&[lun], dir, 4, 4000, || {});
}

/// `hosts` host processes on the datastore over `luns` (its extents, in
/// order), each with a lease of `lease_ms`; `during` runs while they work.
fn run_with(luns: &[&str], dir: &Path, hosts: usize, lease_ms: u32, during: impl FnOnce()) {
    let _one = one_at_a_time();
    let mnts: Vec<PathBuf> = (0..hosts).map(|i| dir.join(format!("m{i}"))).collect();
    let _hog = common::Hog::start();
    let mut guard = Hosts(Vec::new());
    for (i, m) in mnts.iter().enumerate() {
        std::fs::create_dir(m).unwrap();
        let id = host_uuid(i);
        let mut args = vec!["--host-uuid", id.as_str()];
        args.extend_from_slice(luns);
        let h = common::mount_foreground_lease(&args, m, lease_ms);
        guard.0.push((h, m.clone()));
    }
    std::fs::create_dir(mnts[0].join("shared")).unwrap();
    // Over NBD every lock change is a Disk Paxos round and every hand-over
    // a checkpoint with four flushes through qemu-nbd: a longer run, so that
    // each host's few files are not down to luck.
    let until = Instant::now()
        + if luns[0].starts_with("nbd") {
            RUN * 2
        } else {
            RUN
        };
    let expected: BTreeMap<String, Vec<u8>> = std::thread::scope(|s| {
        let hs: Vec<_> = mnts
            .iter()
            .enumerate()
            .map(|(i, m)| s.spawn(move || workload(m, i, until)))
            .collect();
        during();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    // A name made on one host is seen by the others.
    for m in &mnts {
        let seen = std::fs::read_dir(m.join("shared")).unwrap().count();
        let want = expected.keys().filter(|k| k.starts_with("shared/")).count();
        assert_eq!(
            seen,
            want,
            "{} sees {seen} of {want} shared names",
            m.display()
        );
    }
    guard.unmount_all();
    let mut args = vec!["fsck"];
    args.extend_from_slice(luns);
    let o = vmfs(&args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // Every acknowledged file, with its contents, through a fresh mount.
    let check = dir.join("check");
    std::fs::create_dir(&check).unwrap();
    let id = host_uuid(9);
    let mut args = vec!["--host-uuid", id.as_str()];
    args.extend_from_slice(luns);
    let h = common::mount_foreground(&args, &check);
    guard.0.push((h, check.clone()));
    let mut total = 0;
    for (path, data) in &expected {
        let got = std::fs::read(check.join(path))
            .unwrap_or_else(|e| panic!("{path} is missing after the run: {e}"));
        assert!(got == *data, "{path}: contents differ");
        total += 1;
    }
    for i in 0..hosts {
        let n = std::fs::read_dir(check.join(format!("h{i}")))
            .unwrap()
            .count();
        let want = expected
            .keys()
            .filter(|k| k.starts_with(&format!("h{i}/")))
            .count();
        assert_eq!(n, want, "h{i} holds {n} names, {want} expected");
    }
    let (mut h, _) = guard.0.pop().unwrap();
    common::signal(&h, libc::SIGTERM);
    assert!(h.wait().unwrap().success());
    let made: Vec<usize> = (0..hosts)
        .map(|i| {
            expected
                .keys()
                .filter(|k| k.starts_with(&format!("h{i}/")))
                .count()
        })
        .collect();
    eprintln!("{hosts} hosts left {total} files, all present and intact; private files per host: {made:?}");
    // Over NBD every lock change is a Disk Paxos round and every release a
    // checkpoint with four flushes through qemu-nbd: few files, but each
    // host must have made some.
    for i in 0..hosts {
        assert!(
            expected.keys().any(|k| k.starts_with(&format!("h{i}/"))),
            "host {i} made no file"
        );
    }
}

/// Ten rounds, each on a new datastore: a failure that shows once in a few
/// runs (it did, with both cores busy: ENOSPC, a join refused, a host
/// starved) cannot hide.
#[test]
fn four_hosts_on_a_file_lun() {
    for round in 0..10 {
        eprintln!("round {round}");
        let d = tempfile::tempdir().unwrap();
        let l = datastore_file(d.path(), 512 << 20);
        run(&l, d.path());
    }
}

/// A datastore of 64 KiB blocks on a new file LUN of `size` bytes in `dir`.
fn datastore_file(dir: &Path, size: u64) -> String {
    let l = vmfs_tests::file_lun(dir, "lun.img", size);
    assert!(vmfs(&["mkfs", "--block-size", "64K", &l]).status.success());
    l
}

#[test]
fn eight_hosts_on_a_file_lun() {
    let d = tempfile::tempdir().unwrap();
    let l = datastore_file(d.path(), 1 << 30);
    run_with(&[&l], d.path(), 8, 4000, || {});
}

#[test]
fn four_hosts_on_one_nbd_export() {
    let d = tempfile::tempdir().unwrap();
    let (_server, url) = vmfs_tests::qemu_nbd(d.path(), "shared", 512 << 20);
    assert!(vmfs(&["mkfs", "--block-size", "64K", &url])
        .status
        .success());
    let o = vmfs(&["info", &url]);
    assert!(text(&o).contains("Disk Paxos"), "{}", text(&o));
    run(&url, d.path());
}

/// Two iSCSI LUNs (two targets of one tgtd), mkfs'd as one datastore.
fn iscsi_datastore(dir: &Path) -> (vmfs_tests::Tgt, Vec<String>) {
    let mut tgt = vmfs_tests::Tgt::start(dir);
    let luns = vec![tgt.add_lun("ds0", 256 << 20), tgt.add_lun("ds1", 256 << 20)];
    let mut args = vec!["mkfs", "--block-size", "64K"];
    args.extend(luns.iter().map(String::as_str));
    let o = vmfs(&args);
    assert!(o.status.success(), "{}", text(&o));
    let o = vmfs(&["info", &luns[0], &luns[1]]);
    assert!(
        text(&o).contains("Disk Paxos") && text(&o).contains("not atomic"),
        "tgt's compare-and-write must not be used:\n{}",
        text(&o)
    );
    (tgt, luns)
}

#[test]
fn two_hosts_on_iscsi_luns() {
    let d = tempfile::tempdir().unwrap();
    let (_tgt, luns) = iscsi_datastore(d.path());
    let luns: Vec<&str> = luns.iter().map(String::as_str).collect();
    // A lease of 16 s (I/O timeout 4 s): tgtd runs SYNCHRONIZE CACHE as an
    // fdatasync of its backing file, which beside the busy loops has taken
    // more than the 2 s an 8 s lease allows one I/O.
    run_with(&luns, d.path(), 2, 16_000, || {});
}

/// tgtd is killed and started again two seconds into the run: the hosts'
/// I/O stalls, libiscsi logs in again and re-sends what was in flight, and
/// the workload goes on without an error. A lease of 16 s (I/O timeout
/// 4 s) covers the outage.
#[test]
fn two_hosts_on_iscsi_survive_a_target_restart() {
    let d = tempfile::tempdir().unwrap();
    let (mut tgt, luns) = iscsi_datastore(d.path());
    let luns: Vec<&str> = luns.iter().map(String::as_str).collect();
    run_with(&luns, d.path(), 2, 16_000, || {
        std::thread::sleep(Duration::from_secs(2));
        tgt.kill();
        std::thread::sleep(Duration::from_millis(300));
        tgt.revive();
        eprintln!("tgtd restarted");
    });
}

/// Write files of up to 16 MiB in 1 MiB writes until a write fails with
/// ENOSPC (any other error fails the test); returns the bytes written.
fn fill(mnt: &Path, host: usize) -> u64 {
    let buf = vec![host as u8 + 1; 1 << 20];
    let mut total = 0;
    for n in 0.. {
        let p = mnt.join(format!("fill-{host}-{n}"));
        let mut f = std::fs::File::create(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        for _ in 0..16 {
            match f.write_all(&buf) {
                Ok(()) => total += buf.len() as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return total,
                Err(e) => panic!("{}: {e}", p.display()),
            }
        }
    }
    unreachable!()
}

/// Four hosts each write until they get ENOSPC, with both cores busy.
/// ENOSPC must mean the datastore is full: after all unmount, less than 1%
/// of it is free, or less than one file-block cluster per host (each host
/// may stop inside a cluster of its own), whichever is more; fsck is clean.
#[test]
fn four_hosts_fill_the_datastore() {
    let d = tempfile::tempdir().unwrap();
    let l = datastore_file(d.path(), 1 << 30);
    let _one = one_at_a_time();
    let _hog = common::Hog::start();
    let mut guard = Hosts(Vec::new());
    let mnts: Vec<PathBuf> = (0..4).map(|i| d.path().join(format!("m{i}"))).collect();
    for (i, m) in mnts.iter().enumerate() {
        std::fs::create_dir(m).unwrap();
        let id = host_uuid(i);
        let h = common::mount_foreground_lease(&["--host-uuid", &id, &l], m, 4000);
        guard.0.push((h, m.clone()));
    }
    let wrote: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = mnts
            .iter()
            .enumerate()
            .map(|(i, m)| s.spawn(move || fill(m, i)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    guard.unmount_all();
    let o = vmfs(&["fsck", &l]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let info = text(&vmfs(&["info", &l]));
    let blocks = |key: &str| -> u64 {
        let line = info.lines().find(|x| x.starts_with(key)).unwrap();
        let i = line.find('(').unwrap();
        line[i + 1..].split(' ').next().unwrap().parse().unwrap()
    };
    let (total, free) = (blocks("capacity"), blocks("free"));
    let cluster = vmfs::volume::fbc_blocks_for(total) as u64;
    let limit = (total / 100).max(4 * cluster);
    eprintln!(
        "4 hosts wrote {} MiB ({wrote:?} bytes); {free} of {total} blocks free ({:.2}%), limit {limit}",
        wrote.iter().sum::<u64>() >> 20,
        100.0 * free as f64 / total as f64
    );
    assert!(
        wrote.iter().all(|&w| w > 0),
        "a host wrote nothing: {wrote:?}"
    );
    assert!(
        free < limit,
        "ENOSPC with {free} of {total} blocks free (limit {limit}):\n{info}"
    );
}
