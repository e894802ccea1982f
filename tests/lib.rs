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
        let fs = Arc::new(Fs::open(open_luns(urls)).expect("open the datastore"));
        Mounted::with_fs(fs, mnt)
    }

    /// Mount a datastore already open (for instance over a fault-injecting LUN).
    pub fn with_fs(fs: Arc<Fs>, mnt: &Path) -> Mounted {
        std::fs::create_dir_all(mnt).unwrap();
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

/// Busy loops that keep every core busy beside the hosts (a host shares its
/// CPUs with virtual machines: a busy host is the normal case); killed when
/// dropped. One set at a time in a test binary: tests that run in parallel
/// each with its own would load the cores two or three times over, and
/// hosts with sub-second test leases then fence themselves at mount.
pub struct Hog(
    Vec<std::process::Child>,
    #[allow(dead_code)] std::sync::MutexGuard<'static, ()>,
);

static HOGS: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Hog {
    pub fn start() -> Hog {
        let turn = HOGS.lock().unwrap_or_else(|p| p.into_inner());
        let n = std::thread::available_parallelism().map_or(2, |n| n.get());
        Hog(
            (0..n)
                .map(|_| {
                    std::process::Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .spawn()
                        .expect("start a busy loop")
                })
                .collect(),
            turn,
        )
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
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

/// One LUN served by [`Tgt`]: its own target (`tid`, LUN 1) over a file.
#[derive(Clone)]
pub struct TgtLun {
    pub tid: u32,
    pub iqn: String,
    pub backing: PathBuf,
    /// What INQUIRY VPD 0x83 reports (tgt derives its NAA designator from it).
    pub scsi_id: String,
    /// CHAP account bound to the target, if any.
    pub chap: Option<(String, String)>,
    /// The target's own account for mutual CHAP, if any.
    pub mutual: Option<(String, String)>,
    /// Thin provisioning: UNMAP supported, unmapped blocks read as zeros.
    pub thin: bool,
}

/// tgtd, the userspace iSCSI target, on a free loopback port with its own
/// control port; killed on drop. Its configuration lives only in memory,
/// so [`Tgt::restart`] sets every target up again (same names, same SCSI
/// ids), as an administrator's config file would.
pub struct Tgt {
    child: Option<Child>,
    pub port: u16,
    control: u16,
    dir: PathBuf,
    pub luns: Vec<TgtLun>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Tgt {
    pub fn start(dir: &Path) -> Tgt {
        require("tgtd");
        require("tgtadm");
        let port = free_port();
        let mut t = Tgt {
            child: None,
            port,
            // tgtd's control socket is /var/run/tgtd/socket.N, N a 16-bit
            // signed number: unique as long as the ports are (the ephemeral
            // range is narrower than 32768).
            control: port & 0x7fff,
            dir: dir.to_path_buf(),
            luns: Vec::new(),
        };
        t.launch();
        t
    }

    fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.join(format!("tgtd-{}.log", self.port))).unwrap();
        let child = Command::new("tgtd")
            .args(["-f", "-C", &self.control.to_string(), "--iscsi"])
            .arg(format!("portal=127.0.0.1:{}", self.port))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tgtd");
        self.child = Some(child);
        let t = Instant::now();
        loop {
            let ok = Command::new("tgtadm")
                .args([
                    "-C",
                    &self.control.to_string(),
                    "--op",
                    "show",
                    "--mode",
                    "sys",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            let listening = std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
            if ok && listening {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "tgtd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Run `tgtadm --lld iscsi ARGS` against this tgtd.
    pub fn adm(&self, args: &[&str]) {
        let out = Command::new("tgtadm")
            .args(["-C", &self.control.to_string(), "--lld", "iscsi"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tgtadm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn configure(&self, l: &TgtLun) {
        let tid = l.tid.to_string();
        self.adm(&[
            "--op", "new", "--mode", "target", "--tid", &tid, "-T", &l.iqn,
        ]);
        self.adm(&[
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            &tid,
            "--lun",
            "1",
            "-b",
            l.backing.to_str().unwrap(),
        ]);
        let mut params = format!(
            "scsi_id={},scsi_sn={}",
            l.scsi_id,
            &l.scsi_id[l.scsi_id.len() - 8..]
        );
        if l.thin {
            params.push_str(",thin_provisioning=1");
        }
        let lu = ["--mode", "logicalunit", "--tid", &tid, "--lun", "1"];
        self.adm(&[&["--op", "update"][..], &lu, &["--params", &params]].concat());
        let account = ["--mode", "account", "--tid", &tid, "--user"];
        if let Some((user, pass)) = &l.chap {
            self.adm(&[
                "--op",
                "new",
                "--mode",
                "account",
                "--user",
                user,
                "--password",
                pass,
            ]);
            self.adm(&[&["--op", "bind"][..], &account, &[user]].concat());
        }
        if let Some((user, pass)) = &l.mutual {
            self.adm(&[
                "--op",
                "new",
                "--mode",
                "account",
                "--user",
                user,
                "--password",
                pass,
            ]);
            self.adm(&[&["--op", "bind"][..], &account, &[user, "--outgoing"]].concat());
        }
        self.adm(&[
            "--op", "bind", "--mode", "target", "--tid", &tid, "-I", "ALL",
        ]);
    }

    /// A new target with one LUN over a new sparse file of `size` bytes;
    /// returns the LUN's URL.
    pub fn add_lun(&mut self, name: &str, size: u64) -> String {
        let backing = self.dir.join(format!("{name}.img"));
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(size)
            .unwrap();
        self.add_existing(name, &backing, None)
    }

    /// A new target with one LUN over an existing file, optionally behind CHAP.
    pub fn add_existing(
        &mut self,
        name: &str,
        backing: &Path,
        chap: Option<(&str, &str)>,
    ) -> String {
        self.add_with(name, backing, chap, None, false)
    }

    /// A new target with one thin-provisioned LUN (UNMAP) over a new sparse file.
    pub fn add_thin_lun(&mut self, name: &str, size: u64) -> String {
        let backing = self.dir.join(format!("{name}.img"));
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(size)
            .unwrap();
        self.add_with(name, &backing, None, None, true)
    }

    /// The general form: CHAP, mutual CHAP (the target's account), thin.
    pub fn add_with(
        &mut self,
        name: &str,
        backing: &Path,
        chap: Option<(&str, &str)>,
        mutual: Option<(&str, &str)>,
        thin: bool,
    ) -> String {
        let tid = self.luns.len() as u32 + 1;
        let scsi_id = format!("{:08x}{:08x}", self.port, tid * 0x1001 + std::process::id());
        let l = TgtLun {
            tid,
            iqn: format!("iqn.2026-11.org.vmfs.test:{name}"),
            backing: backing.to_path_buf(),
            scsi_id,
            chap: chap.map(|(u, p)| (u.to_string(), p.to_string())),
            mutual: mutual.map(|(u, p)| (u.to_string(), p.to_string())),
            thin,
        };
        self.configure(&l);
        self.luns.push(l.clone());
        self.url(&l)
    }

    pub fn url(&self, l: &TgtLun) -> String {
        format!("iscsi://127.0.0.1:{}/{}/1", self.port, l.iqn)
    }

    /// Kill tgtd (SIGKILL: connections drop without a goodbye).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start tgtd again on the same port and set every target up again.
    pub fn revive(&mut self) {
        self.launch();
        for l in self.luns.clone() {
            self.configure(&l);
        }
    }

    /// Kill and revive.
    pub fn restart(&mut self) {
        self.kill();
        self.revive();
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        self.kill();
    }
}
