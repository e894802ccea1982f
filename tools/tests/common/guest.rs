//! A real guest for the tests that need one (`tests/guest/`: a small
//! Linux under QEMU TCG, booted by run-guest.sh with a test script), and a
//! mounted datastore to serve it disks from.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{text, vmfs, Host};

pub const MIB: usize = 1 << 20;

pub fn guest_dir() -> PathBuf {
    let d = PathBuf::from(
        std::env::var("VMFS_GUEST_DIR").unwrap_or_else(|_| "/var/tmp/vmfs-guest".into()),
    );
    assert!(
        d.join("vmlinux").exists(),
        "no test guest in {}: run scripts/setup.sh (it builds it with tests/guest/build-guest.sh)",
        d.display()
    );
    d
}

pub fn kit(f: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/guest")
        .join(f)
}

pub fn ok(args: &[&str]) -> String {
    let o = vmfs(args);
    assert!(o.status.success(), "vmfs {args:?}: {}", text(&o));
    text(&o)
}

/// A guest booted by run-guest.sh; stopped (with its QEMU) when dropped.
pub struct Guest {
    child: Option<Child>,
    log: PathBuf,
}

impl Guest {
    /// Boot with `script` as the test, `files` copied in, and one
    /// vhost-user-scsi controller on `sock` (plus `extra` QEMU arguments).
    pub fn start(
        dir: &Path,
        name: &str,
        script: &str,
        files: &[(&Path, &str)],
        sock: &Path,
        extra: &[&str],
    ) -> Guest {
        Self::start_with(dir, name, script, files, sock, None, extra)
    }

    /// [`Guest::start`] with a qemu-guest-agent channel on `qga`.
    pub fn start_with(
        dir: &Path,
        name: &str,
        script: &str,
        files: &[(&Path, &str)],
        sock: &Path,
        qga: Option<&Path>,
        extra: &[&str],
    ) -> Guest {
        let t = dir.join(format!("{name}.sh"));
        std::fs::write(&t, script).unwrap();
        let log = dir.join(format!("{name}.log"));
        let mut c = Command::new(kit("run-guest.sh"));
        c.arg("-k")
            .arg(guest_dir())
            .arg("-t")
            .arg(&t)
            .arg("-l")
            .arg(&log);
        c.args(["-T", "400", "-m", "512M"]);
        for (src, dst) in files {
            c.arg("-f").arg(format!("{}:{dst}", src.display()));
        }
        if let Some(q) = qga {
            c.arg("-g").arg(q);
        }
        c.arg("--")
            .args([
                "-chardev",
                &format!("socket,id=vus,path={}", sock.display()),
            ])
            .args(["-device", "vhost-user-scsi-pci,chardev=vus,num_queues=2"])
            .args(extra);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        Guest {
            child: Some(c.spawn().expect("run-guest.sh")),
            log,
        }
    }

    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Wait until the console shows `line`.
    pub fn wait_for(&mut self, line: &str, within: Duration) {
        let t = Instant::now();
        while !self.console().contains(line) {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "the guest ended ({st}) before printing {line}:\n{}",
                    self.console()
                );
            }
            assert!(
                t.elapsed() < within,
                "no {line} from the guest:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait for the guest to power off: its test's exit code and console.
    pub fn finish(mut self) -> (i32, String) {
        let st = self.child.take().unwrap().wait().unwrap();
        (st.code().unwrap_or(-1), self.console())
    }
}

/// Boot a guest with `script` to the end: it must exit 0 having printed
/// `want`. Its console.
pub fn boot(
    ds: &Ds,
    name: &str,
    script: &str,
    files: &[(&Path, &str)],
    sock: &Path,
    want: &str,
) -> String {
    let (rc, console) = Guest::start(ds.dir.path(), name, script, files, sock, &[]).finish();
    assert!(rc == 0 && console.contains(want), "{console}");
    console
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // run-guest.sh stops its QEMU on TERM.
            super::signal(&c, libc::SIGTERM);
            let _ = c.wait();
        }
    }
}

/// A mounted datastore of one LUN file (the host goes first when dropped:
/// nothing is deleted through a live mount).
pub struct Ds {
    pub host: Host,
    pub dir: tempfile::TempDir,
    pub lun: String,
    pub st: String,
}

impl Ds {
    pub fn new(size: u64) -> Ds {
        let dir = tempfile::Builder::new()
            .prefix("scsi")
            .tempdir_in("/tmp")
            .unwrap();
        let lun = vmfs_tests::file_lun(dir.path(), "ds.img", size);
        ok(&["mkfs", &lun]);
        let st = dir.path().join("a").to_str().unwrap().to_string();
        let mnt = dir.path().join("m");
        std::fs::create_dir(&mnt).unwrap();
        let host = Host::mount(&["--state-dir", &st, &lun], &mnt);
        std::fs::create_dir(mnt.join("vm")).unwrap();
        Ds { dir, lun, st, host }
    }
    /// `vmfs A B --state-dir (this host's) REST...`, which must succeed.
    pub fn run(&self, args: &[&str]) -> String {
        let mut a = args[..2].to_vec();
        a.extend(["--state-dir", &self.st]);
        a.extend(&args[2..]);
        ok(&a)
    }
    pub fn p(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }
    pub fn disk(&self, name: &str) -> String {
        self.host
            .mnt
            .join("vm")
            .join(name)
            .to_str()
            .unwrap()
            .to_string()
    }
}

pub fn pattern(n: usize, seed: u64) -> Vec<u8> {
    vmfs_tests::pattern(seed, n)
}

/// Bytes of a file the datastore holds (st_blocks through the mount).
pub fn allocated(p: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Copy `vmdk` (through the mount, as QEMU's tools read it) to `raw` and
/// check that the ext4 in it is clean.
pub fn ext4_clean(vmdk: &Path, raw: &Path) {
    let o = Command::new("qemu-img")
        .args(["convert", "-f", "vmdk", "-O", "raw"])
        .arg(vmdk)
        .arg(raw)
        .output()
        .unwrap();
    assert!(o.status.success(), "qemu-img convert: {}", text(&o));
    let fsck = Command::new("e2fsck").arg("-fn").arg(raw).output().unwrap();
    assert!(
        fsck.status.success(),
        "the ext4 of {}: {}",
        vmdk.display(),
        text(&fsck)
    );
}

/// A qemu-guest-agent command; its result as JSON text.
pub fn qga(sock: &Path, cmd: &str) -> String {
    let o = Command::new(kit("qga.py"))
        .arg(sock)
        .arg(cmd)
        .output()
        .unwrap();
    assert!(o.status.success(), "qga {cmd}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

pub fn disk_info(ds: &Ds, disk: &str) -> serde_json::Value {
    serde_json::from_str(&ds.run(&["disk", "info", "--json", disk])).unwrap()
}
