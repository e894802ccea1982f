//! The file API between two host processes on one file LUN, beside busy
//! loops on every core: a multi-writer file written by threads of both
//! hosts at once (each reads the other's blocks), an exclusive open refused
//! across hosts naming the holder, and a holder killed with SIGKILL whose
//! file the survivor opens once it has recovered the dead host.
//!
//! The second host is this test binary run again (`child_host`, which does
//! nothing unless `VMFS_FILE_CHILD` says what to do).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmfs::{Fs, FsError, Housekeeper, LockMode, MkfsOptions};
use vmfs_tests::Hog;

const BS: u64 = 64 << 10;
const LEASE_MS: u64 = 1500;
const SHARED_BLOCKS: u64 = 128; // 4 KiB blocks per host in the shared file

fn uuid(k: u8) -> [u8; 16] {
    let mut u = [0u8; 16];
    u[0] = 0x77;
    u[15] = k;
    u
}

fn mount(lun: &Path, k: u8) -> Arc<Fs> {
    let t = vmfs::cluster::Timeouts::new(None, Some(LEASE_MS)).unwrap();
    let l = lun::open(lun.to_str().unwrap()).unwrap();
    Arc::new(Fs::mount(vec![l], uuid(k), t).unwrap())
}

fn pattern(host: u64, blk: u64) -> Vec<u8> {
    (0..4096u64)
        .map(|i| (i * 31 + blk * 7 + host * 101) as u8)
        .collect()
}

/// Host `me` of 2 writes its blocks of the shared file from 4 threads:
/// block b of host h is at (b * 2 + h) * 4096.
fn write_mine(f: &Arc<vmfs::File>, me: u64) {
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let f = f.clone();
            s.spawn(move || {
                for b in (t..SHARED_BLOCKS).step_by(4) {
                    let at = (b * 2 + me) * 4096;
                    f.write_at(&pattern(me, b), at).unwrap();
                }
            });
        }
    });
    f.flush().unwrap();
}

fn check_all(f: &vmfs::File) {
    let mut got = vec![0u8; 4096];
    for h in 0..2u64 {
        for b in 0..SHARED_BLOCKS {
            f.read_exact_at(&mut got, (b * 2 + h) * 4096).unwrap();
            assert!(got == pattern(h, b), "host {h} block {b} differs");
        }
    }
}

fn wait_for(p: &Path, what: &str) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "waited too long for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn child(role: &str, dir: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_host",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("VMFS_FILE_CHILD", role)
        .env("VMFS_FILE_DIR", dir)
        .env("VMFS_LOG", "warn")
        .spawn()
        .unwrap()
}

/// Kills a child host when dropped (a failing test leaves none behind).
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The second host's side; a no-op when run as an ordinary test.
#[test]
fn child_host() {
    let Ok(role) = std::env::var("VMFS_FILE_CHILD") else {
        return;
    };
    let dir = PathBuf::from(std::env::var("VMFS_FILE_DIR").unwrap());
    let fs = mount(&dir.join("lun.img"), 2);
    let _hk = Housekeeper::start(fs.clone());
    match role.as_str() {
        "writer" => {
            let f = Arc::new(fs.open_path("shared", LockMode::MultiWriter).unwrap());
            write_mine(&f, 1);
            std::fs::write(dir.join("done2"), b"").unwrap();
            wait_for(&dir.join("done1"), "host 1's writes");
            check_all(&f);
            // The parent holds "solo" exclusively: refused, naming its slot.
            let e = fs.open_path("solo", LockMode::ReadOnly).unwrap_err();
            assert!(matches!(e, FsError::Busy(_)), "{e}");
            assert!(e.to_string().contains("slot 0"), "{e}");
            drop(f);
            fs.unmount().unwrap();
        }
        "holder" => {
            let f = fs.open_path("solo", LockMode::Exclusive).unwrap();
            f.write_at(&[9u8; 4096], 0).unwrap();
            f.flush().unwrap();
            std::fs::write(dir.join("holding"), b"").unwrap();
            // Killed here.
            std::thread::sleep(Duration::from_secs(120));
        }
        r => panic!("unknown role {r}"),
    }
}

#[test]
fn two_host_processes_share_a_multi_writer_file_and_recover_a_killed_holder() {
    let d = tempfile::tempdir().unwrap();
    let lun = d.path().join("lun.img");
    std::fs::File::create(&lun)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    {
        let l = lun::open(lun.to_str().unwrap()).unwrap();
        let opts = MkfsOptions {
            block_size: BS as u32,
            ..Default::default()
        };
        let fs = Arc::new(Fs::mkfs(vec![l], &opts).unwrap());
        let f = fs
            .create_file("shared", 0o600, LockMode::Exclusive)
            .unwrap();
        f.allocate(0, SHARED_BLOCKS * 2 * 4096).unwrap();
        drop(f);
        fs.set_multi_writer(fs.resolve("shared").unwrap(), true)
            .unwrap();
        drop(fs.create_file("solo", 0o600, LockMode::Exclusive).unwrap());
        fs.unmount().unwrap();
    }
    let _hog = Hog::start();
    let fs = mount(&lun, 1);
    let _hk = Housekeeper::start(fs.clone());
    let solo = fs.open_path("solo", LockMode::Exclusive).unwrap();
    let mut kid = Kid(child("writer", d.path()));
    let f = Arc::new(fs.open_path("shared", LockMode::MultiWriter).unwrap());
    write_mine(&f, 0);
    std::fs::write(d.path().join("done1"), b"").unwrap();
    wait_for(&d.path().join("done2"), "host 2's writes");
    check_all(&f);
    let st = kid.0.wait().unwrap();
    assert!(st.success(), "the second host failed: {st}");
    drop(solo);
    drop(f);

    // A holder killed with the file open: refused (naming it) until this
    // host has seen its heartbeat stop and recovered it, then granted.
    let mut kid = Kid(child("holder", d.path()));
    wait_for(&d.path().join("holding"), "the holder");
    let e = fs.open_path("solo", LockMode::Exclusive).unwrap_err();
    assert!(e.to_string().contains("slot"), "{e}");
    kid.0.kill().unwrap();
    kid.0.wait().unwrap();
    let t = Instant::now();
    let g = loop {
        match fs.open_path("solo", LockMode::Exclusive) {
            Ok(g) => break g,
            Err(FsError::Busy(m)) => {
                assert!(t.elapsed() < Duration::from_millis(LEASE_MS * 10), "{m}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("{e}"),
        }
    };
    // What the killed host flushed is there.
    let mut b = vec![0u8; 4096];
    g.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(b, vec![9u8; 4096]);
    drop(g);
    fs.unmount().unwrap();
    let l = lun::open(lun.to_str().unwrap()).unwrap();
    let fs = Fs::open_for_check(vec![l], false).unwrap();
    let r = vmfs::fsck::check(&fs, false, None).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}
