//! Helpers for the cross-crate tests: real peers (qemu-nbd, nbdkit) started
//! on UNIX sockets, and datastores mounted with FUSE in this process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lun::Lun;
use vmfs::Fs;

/// Fail with an actionable message when a peer is not installed: a missing
/// install step in CI, never a reason to skip.
pub fn require(bin: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{bin} is not installed; .ci/run installs it (see README)"
    );
}

/// A server process killed on drop.
pub struct Server(pub Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// qemu-nbd serving a new raw image of `size` bytes on a UNIX socket; returns its URL.
pub fn qemu_nbd(dir: &Path, name: &str, size: u64) -> (Server, String) {
    require("qemu-nbd");
    let img = dir.join(format!("{name}.img"));
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    let sock = dir.join(format!("{name}.sock"));
    let child = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-x",
            name,
            "-t",
            "--shared=16",
            "--cache=none",
            "--aio=threads",
            "-k",
        ])
        .arg(&sock)
        .arg(&img)
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "qemu-nbd never created {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (
        Server(child),
        format!("nbd+unix:///{name}?socket={}", sock.display()),
    )
}

pub fn file_lun(dir: &Path, name: &str, size: u64) -> String {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p.to_str().unwrap().to_string()
}

pub fn open_luns(urls: &[String]) -> Vec<Arc<dyn Lun>> {
    urls.iter().map(|u| lun::open(u).unwrap()).collect()
}

fn is_mounted(mnt: &Path) -> bool {
    let m = std::fs::canonicalize(mnt).unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(m.to_str().unwrap()))
}

/// A datastore mounted with FUSE by this process; unmounted on drop.
pub struct Mounted {
    pub path: PathBuf,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<vmfs::Result<()>>>,
}

impl Mounted {
    pub fn new(urls: &[String], mnt: &Path) -> Mounted {
        std::fs::create_dir_all(mnt).unwrap();
        let fs = Arc::new(Fs::open(open_luns(urls)).expect("open the datastore"));
        let (tx, rx) = std::sync::mpsc::channel();
        let path = mnt.to_path_buf();
        let p2 = path.clone();
        let thread = std::thread::spawn(move || vmfs::fuse::serve(fs, &p2, 4, rx));
        let t = Instant::now();
        while !is_mounted(&path) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "mount never appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Mounted {
            path,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn unmount(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
            if let Some(t) = self.thread.take() {
                t.join().expect("serve thread").expect("clean unmount");
            }
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
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
