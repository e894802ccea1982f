//! The iSCSI backend against a real target (tgtd on loopback): login, I/O,
//! identity, capabilities, many commands in flight, CHAP, clear errors, and
//! a target that restarts under load.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lun::Lun;
use vmfs_tests::{pattern, Tgt};

const MIB: u64 = 1 << 20;

#[test]
fn reads_writes_and_knows_the_lun() {
    let dir = tempfile::tempdir().unwrap();
    let mut tgt = Tgt::start(dir.path());
    let url = tgt.add_lun("basic", 64 * MIB);
    let l = lun::open(&url).unwrap();
    assert_eq!(l.size(), 64 * MIB);
    assert_eq!(l.block_size(), 512);
    assert_eq!(l.name(), url);

    // Identity: tgt's registered-extended NAA designator, from the scsi_id we set.
    let id = l.identity().unwrap();
    let scsi_id = &tgt.luns[0].scsi_id;
    assert!(id.starts_with("naa.6"), "{id}");
    assert!(
        id.ends_with(&scsi_id[1..]),
        "{id} does not carry scsi_id {scsi_id}"
    );

    // tgt advertises COMPARE AND WRITE but it is not atomic: not used.
    assert!(!l.has_compare_and_write());

    // A 3 MiB write crosses the 1 MiB split: pieces in flight together.
    let data = pattern(7, 3 * MIB as usize);
    l.write_at(&data, 5 * MIB + 4096).unwrap();
    l.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    l.read_at(&mut back, 5 * MIB + 4096).unwrap();
    assert!(back == data, "read back differs");
    // The bytes are in the backing file, where the target put them.
    let f = std::fs::File::open(&tgt.luns[0].backing).unwrap();
    let mut raw = vec![0u8; 4096];
    f.read_exact_at(&mut raw, 5 * MIB + 4096).unwrap();
    assert_eq!(&raw[..], &data[..4096]);

    l.write_zeroes(5 * MIB + 4096, MIB, true).unwrap();
    let mut z = vec![1u8; MIB as usize];
    l.read_at(&mut z, 5 * MIB + 4096).unwrap();
    assert!(z.iter().all(|&b| b == 0));

    // Out of range: a clear error naming the LUN.
    let e = l
        .read_at(&mut [0u8; 512], 64 * MIB)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&url) && e.contains("beyond the end"), "{e}");

    // Bytes, not blocks: partial blocks are read, merged and written.
    l.write_at(&[0xaa; 100], 1000).unwrap();
    l.write_at(&[0xbb; 10], 1020).unwrap();
    let mut b = vec![0u8; 200];
    l.read_at(&mut b, 950).unwrap();
    assert!(b[..50].iter().all(|&x| x == 0));
    assert!(b[50..70].iter().all(|&x| x == 0xaa));
    assert!(b[70..80].iter().all(|&x| x == 0xbb));
    assert!(b[80..150].iter().all(|&x| x == 0xaa));
    assert!(b[150..].iter().all(|&x| x == 0));
}

#[test]
fn many_writers_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let mut tgt = Tgt::start(dir.path());
    let url = tgt.add_lun("busy", 64 * MIB);
    let l: Arc<dyn Lun> = lun::open(&url).unwrap();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let l = l.clone();
            std::thread::spawn(move || {
                for i in 0..64u64 {
                    let off = (t * 64 + i) * 64 * 1024;
                    l.write_at(&pattern(t * 1000 + i, 64 * 1024), off).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for t in 0..8u64 {
        for i in 0..64u64 {
            let mut b = vec![0u8; 64 * 1024];
            l.read_at(&mut b, (t * 64 + i) * 64 * 1024).unwrap();
            assert!(b == pattern(t * 1000 + i, 64 * 1024), "block {t}/{i}");
        }
    }
}

/// Many callers, small commands: callers take turns receiving for each
/// other (leader/follower); every read must see its own thread's last write.
#[test]
fn small_reads_and_writes_from_many_threads() {
    let dir = tempfile::tempdir().unwrap();
    let mut tgt = Tgt::start(dir.path());
    let url = tgt.add_lun("small", 16 * MIB);
    let l: Arc<dyn Lun> = lun::open(&url).unwrap();
    let threads: Vec<_> = (0..24u64)
        .map(|t| {
            let l = l.clone();
            std::thread::spawn(move || {
                let mut b = vec![0u8; 4096];
                for i in 0..300u64 {
                    let off = (t * 128 + i % 128) * 4096;
                    let p = pattern(t * 100_000 + i, 4096);
                    l.write_at(&p, off).unwrap();
                    l.read_at(&mut b, off).unwrap();
                    assert!(b == p, "thread {t}, round {i}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn login_errors_are_clear_and_chap_works() {
    let dir = tempfile::tempdir().unwrap();
    let mut tgt = Tgt::start(dir.path());
    let url = tgt.add_lun("plain", 8 * MIB);

    // No such target, no such LUN, LUN 0 (tgt's controller), nobody listening.
    let wrong = url.replace(":plain/", ":nosuch/");
    let e = lun::open(&wrong).err().unwrap().to_string();
    assert!(e.contains("login") && e.contains("nosuch"), "{e}");
    eprintln!("no such target: {e}");
    let base = url.strip_suffix("/1").unwrap();
    let e = lun::open(&format!("{base}/7")).err().unwrap().to_string();
    assert!(e.contains("iscsi://"), "{e}");
    eprintln!("no such LUN: {e}");
    let e = lun::open(&format!("{base}/0")).err().unwrap().to_string();
    assert!(e.contains("not a disk"), "{e}");

    // CHAP: the right secret logs in; a wrong one is refused, and neither
    // secret appears in the message or the LUN's name.
    let backing = dir.path().join("secret.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let plain = tgt.add_existing("secret", &backing, Some(("alice", "s3cretpassw0rd")));
    let good = plain.replace("iscsi://", "iscsi://alice%s3cretpassw0rd@");
    let l = lun::open(&good).unwrap();
    assert!(!l.name().contains("s3cret"), "{}", l.name());
    l.write_at(&[9u8; 512], 0).unwrap();
    let bad = plain.replace("iscsi://", "iscsi://alice%wrongwrongwrong@");
    let e = lun::open(&bad).err().unwrap().to_string();
    assert!(!e.contains("wrongwrong") && !e.contains("s3cret"), "{e}");
    eprintln!("wrong CHAP secret: {e}");
    let e = lun::open(&plain).err().unwrap().to_string();
    assert!(e.contains("login"), "{e}");

    // Mutual CHAP: the target proves itself too; a wrong target secret in
    // the URL fails the login.
    let backing = dir.path().join("mutual.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let url = tgt.add_with(
        "mutual",
        &backing,
        Some(("bob", "bobsecret12345")),
        Some(("tgtacct", "targetsecret123")),
        false,
    );
    let with = |tp: &str| {
        format!(
            "{}?target_user=tgtacct&target_password={tp}",
            url.replace("iscsi://", "iscsi://bob%bobsecret12345@")
        )
    };
    let l = lun::open(&with("targetsecret123")).unwrap();
    l.write_at(&[7u8; 512], 0).unwrap();
    assert!(!l.name().contains("secret"), "{}", l.name());
    let e = lun::open(&with("notthetarget999"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        !e.contains("notthetarget") && !e.contains("bobsecret"),
        "{e}"
    );
    eprintln!("wrong target secret: {e}");
}

/// A thin LUN (tgt with thin_provisioning): write_zeroes with unmap uses
/// UNMAP, the blocks read as zeros and the backing file gets its space back.
#[test]
fn unmap_on_a_thin_lun() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let mut tgt = Tgt::start(dir.path());
    let url = tgt.add_thin_lun("thin", 64 * MIB);
    let backing = tgt.luns[0].backing.clone();
    let lun::LunUrl::Iscsi(u) = lun::LunUrl::parse(&url).unwrap() else {
        panic!("not an iSCSI URL")
    };
    let l = lun::IscsiLun::connect(&u, &url, lun::IscsiOptions::default()).unwrap();
    assert!(
        l.info().unmap && l.info().unmap_reads_zero,
        "{:?}",
        l.info()
    );
    l.write_at(&pattern(3, 8 * MIB as usize), 8 * MIB).unwrap();
    l.flush().unwrap();
    let full = std::fs::metadata(&backing).unwrap().blocks();
    l.write_zeroes(8 * MIB, 8 * MIB, true).unwrap();
    l.flush().unwrap();
    let after = std::fs::metadata(&backing).unwrap().blocks();
    assert!(
        after + 8 * MIB / 512 / 2 < full,
        "UNMAP did not give space back ({full} -> {after} 512-byte blocks)"
    );
    let mut b = vec![1u8; 8 * MIB as usize];
    l.read_at(&mut b, 8 * MIB).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

/// tgtd killed and started again while a writer runs: I/O stalls, resumes
/// after the reconnect, and every acknowledged write is on the LUN.
#[test]
fn survives_a_target_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut tgt = Tgt::start(dir.path());
    let url = tgt.add_lun("restart", 64 * MIB);
    let l: Arc<dyn Lun> = lun::open_with(
        &url,
        lun::OpenOptions {
            io_timeout: Some(Duration::from_secs(20)),
        },
    )
    .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (l, stop) = (l.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut acked = 0u64;
            let mut longest = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && acked < 4000 {
                let t = Instant::now();
                l.write_at(&pattern(acked, 16 * 1024), acked * 16 * 1024)
                    .unwrap_or_else(|e| panic!("write {acked} failed: {e}"));
                longest = longest.max(t.elapsed());
                acked += 1;
            }
            (acked, longest)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    tgt.kill();
    std::thread::sleep(Duration::from_millis(500));
    tgt.revive();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (acked, longest) = writer.join().unwrap();
    eprintln!("{acked} writes acknowledged; the longest took {longest:?}");
    assert!(
        longest > Duration::from_millis(400),
        "the restart was not noticed"
    );
    for i in 0..acked {
        let mut b = vec![0u8; 16 * 1024];
        l.read_at(&mut b, i * 16 * 1024).unwrap();
        assert!(b == pattern(i, 16 * 1024), "write {i} lost");
    }
}

/// A target that stays away: I/O fails at its deadline with a message that
/// says so, instead of hanging; nothing is sent later.
#[test]
fn a_dead_target_fails_io_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let mut tgt = Tgt::start(dir.path());
    let url = tgt.add_lun("gone", 8 * MIB);
    let l = lun::open_with(
        &url,
        lun::OpenOptions {
            io_timeout: Some(Duration::from_secs(1)),
        },
    )
    .unwrap();
    l.write_at(&[1u8; 4096], 0).unwrap();
    tgt.kill();
    let t = Instant::now();
    let e = l.write_at(&[2u8; 4096], 0).unwrap_err().to_string();
    let took = t.elapsed();
    assert!(e.contains("timed out") && e.contains(&url), "{e}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "failed after {took:?}"
    );
    // Started again, the target has the first write, not the failed one
    // (it was never sent), and the LUN works again.
    std::thread::sleep(Duration::from_millis(1500));
    tgt.revive();
    let mut b = vec![0u8; 4096];
    let t = Instant::now();
    // Logins are retried at most a second apart: the first reads may still time out.
    while let Err(e) = l.read_at(&mut b, 0) {
        assert!(t.elapsed() < Duration::from_secs(10), "{e}");
    }
    assert!(b.iter().all(|&x| x == 1));
}
