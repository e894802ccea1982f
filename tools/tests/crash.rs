//! Crash consistency: the harness as CI runs it, and real mount processes
//! killed with SIGKILL mid-workload.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod common;
use common::{text, vmfs};

/// The number before `word` in `s` ("123 crash states").
fn count_before(s: &str, word: &str) -> u64 {
    let i = s.find(word).unwrap_or_else(|| panic!("no {word:?} in {s}"));
    let w = s[..i].split_whitespace().last().unwrap();
    w.trim_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap()
}

/// 40,000 crash states per CI run (the issue asks for at least 10,000; they
/// take about 30 s; CRASHTEST_STATES overrides), and 4,000 of virtual-disk
/// workloads (writes into a chain, snapshot, revert, consolidate, grow,
/// clone; about 8 s) with an oracle on the disk's content and change
/// tracking. A longer run is
/// `vmfs crashtest --states N` or `--exhaustive`. A crash state = mount
/// with replay, fsck, oracle.
#[test]
fn crashtest_forty_thousand_states() {
    let states: u64 = std::env::var("CRASHTEST_STATES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40_000);
    let o = vmfs(&["crashtest", "--states", &states.to_string(), "--seed", "1"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(count_before(&t, "crash states") >= states, "{t}");
    assert!(
        count_before(&t, "needed a journal replay") > states / 4,
        "{t}"
    );
    assert_eq!(count_before(&t, "failures"), 0, "{t}");
    // A reproducer line runs exactly one state.
    let o = vmfs(&[
        "crashtest",
        "--workload",
        "create(B);fsync(B);write(B,0,71680);rename(B,D/C);sync",
        "--crash",
        "7:0:torn=0.3",
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains("1 crash states explored"), "{t}");
    // A virtual-disk workload runs alone, every planned state or one. (Its
    // crash points are not pinned: the datastore updates a file's mtime
    // only when the clock moved, so the write log varies a little from run
    // to run; the state before the first flush is always there.)
    let w = "disk:w(0,70000,5);snapshot;w(65536,4096,6);flush;consolidate";
    let o = vmfs(&["crashtest", "--workload", w]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(count_before(&t, "crash states") >= 50, "{t}");
    let o = vmfs(&["crashtest", "--workload", w, "--crash", "0:-"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains("1 crash states explored"), "{t}");
    // Nonsense is a clear error, exit 2.
    let o = vmfs(&["crashtest", "--workload", "frobnicate(A)"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("unknown operation frobnicate"),
        "{}",
        text(&o)
    );
}

fn mount(lun: &str, mnt: &Path) -> std::process::Child {
    common::mount_foreground(&[lun], mnt)
}

fn content(round: u64, k: u64) -> Vec<u8> {
    let len = 1000 + (k * 7919 + round * 104729) % (300 << 10);
    (0..len)
        .map(|i| ((i * 31 + k * 7 + round) % 251) as u8)
        .collect()
}

/// Mount in a real process, create/rename/unlink/write files with fsyncs
/// from another thread, SIGKILL the mount at a random moment, remount
/// (replay), and check: fsck clean and every fsynced file present with its
/// contents. Several rounds, each killing at a different moment.
#[test]
fn kill_9_mid_workload_loses_nothing_fsynced() {
    let d = tempfile::tempdir().unwrap();
    let lun: PathBuf = d.path().join("lun.img");
    std::fs::File::create(&lun)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let sl = lun.to_str().unwrap();
    assert!(vmfs(&["mkfs", "--block-size", "64K", sl]).status.success());
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let seed = std::process::id() as u64;
    // Both cores busy beside the host, as on a host that runs VMs.
    let _hog = common::Hog::start();
    // (path, contents) of every file whose fsync returned.
    let mut durable: Vec<(String, Vec<u8>)> = Vec::new();
    for round in 0..5u64 {
        let mut child = mount(sl, &mnt);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<(String, Option<Vec<u8>>)>();
        let worker = {
            let mnt = mnt.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let dir = mnt.join(format!("r{round}"));
                if std::fs::create_dir(&dir).is_err() {
                    return;
                }
                for k in 0.. {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    let tmp = dir.join(format!("tmp{k}"));
                    let fin = format!("r{round}/f{k}");
                    let data = content(round, k);
                    let r = (|| -> std::io::Result<()> {
                        let mut f = std::fs::File::create(&tmp)?;
                        f.write_all(&data)?;
                        f.sync_all()?;
                        std::fs::rename(&tmp, mnt.join(&fin))?;
                        if k % 3 == 0 {
                            // Some names are removed again: durable after a sync.
                            std::fs::remove_file(mnt.join(&fin))?;
                            std::fs::File::open(&dir)?.sync_all()?;
                            let _ = tx.send((fin.clone(), None));
                            return Ok(());
                        }
                        std::fs::File::open(&dir)?.sync_all()?;
                        let _ = tx.send((fin.clone(), Some(data.clone())));
                        Ok(())
                    })();
                    if r.is_err() {
                        return; // the mount died under us
                    }
                }
            })
        };
        // Kill at a random moment between 0.2 and 1.5 s into the workload.
        let wait = 200
            + (seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(round * 1442695040888963407)
                >> 33)
                % 1300;
        std::thread::sleep(Duration::from_millis(wait));
        // SAFETY: killing our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // The dead FUSE mount must be detached before the worker can notice.
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&mnt)
            .status();
        worker.join().unwrap();
        let mut n = 0;
        for (p, c) in rx.try_iter() {
            durable.retain(|(q, _)| *q != p);
            if let Some(c) = c {
                durable.push((p, c));
            }
            n += 1;
        }
        assert!(
            n > 0 || round > 0,
            "round {round}: nothing was fsynced in {wait} ms"
        );
        // Recovery: fsck (replays in memory) is clean, then a mount replays
        // for real and every fsynced file is there.
        let o = vmfs(&["fsck", sl]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "round {round} (killed after {wait} ms): {}",
            text(&o)
        );
        let mut child = mount(sl, &mnt);
        for (p, c) in &durable {
            let got = std::fs::read(mnt.join(p))
                .unwrap_or_else(|e| panic!("round {round}: fsynced {p} lost: {e}"));
            assert!(got == *c, "round {round}: {p} has the wrong contents");
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert!(child.wait().unwrap().success());
        let o = vmfs(&["fsck", sl]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "round {round} after remount: {}",
            text(&o)
        );
    }
    assert!(
        durable.len() > 5,
        "only {} files were fsynced in 5 rounds",
        durable.len()
    );
}

/// The multi-host workload under the recording LUN: three hosts mounted at
/// once, every crash state of their shared log recovers with what their
/// fsyncs promised.
#[test]
fn several_hosts_under_the_recording_lun() {
    let s = vmfs_tools::crashtest::multi_host(
        std::env::var("MH_HOSTS").map_or(3, |v| v.parse().unwrap()),
        12,
        7,
    )
    .unwrap();
    eprintln!("{s:?}");
    assert!(s.states > 50 && s.files_checked > 100, "{s:?}");
}
