//! Helpers shared by the `vmfs` command's integration tests.
#![allow(dead_code)]

pub mod guest;

use std::path::Path;
use std::process::{Command, Output};

pub const VMFS: &str = env!("CARGO_BIN_EXE_vmfs");

/// Run `vmfs ARGS` (warnings only in the log) and collect its output.
pub fn vmfs(args: &[&str]) -> Output {
    Command::new(VMFS)
        .args(args)
        .env(
            "VMFS_LOG",
            std::env::var("VMFS_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .output()
        .expect("run vmfs")
}

/// Stdout and stderr together, for assertions and failure messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Whether `m` is a mountpoint now.
pub fn mounted(m: &Path) -> bool {
    let m = std::fs::canonicalize(m).unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(m.to_str().unwrap()))
}

/// Start `vmfs mount --foreground ARGS MNT` and wait until it is mounted.
/// The lease is short (2 s), so that remounting after a kill waits little,
/// yet its safe window (1 s) outlasts the heartbeat stalls of a loaded
/// 2-core CI machine running TCG guests beside the tests: with 800 ms, a
/// 592 ms stall fenced a healthy host mid-write.
pub fn mount_foreground(args: &[&str], mnt: &Path) -> std::process::Child {
    mount_foreground_lease(args, mnt, 2000)
}

/// [`mount_foreground`] with a lease of `lease_ms`.
pub fn mount_foreground_lease(args: &[&str], mnt: &Path, lease_ms: u32) -> std::process::Child {
    let child = std::process::Command::new(VMFS)
        .args(["mount", "--foreground", "--lease-ms", &lease_ms.to_string()])
        .args(args)
        .arg(mnt)
        .env(
            "VMFS_LOG",
            std::env::var("VMFS_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .spawn()
        .unwrap();
    let mut child = child;
    let t = std::time::Instant::now();
    while !mounted(mnt) {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "vmfs mount of {} exited before mounting: {st}",
                mnt.display()
            );
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "mount did not appear"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}

/// FNV-1a over a file's bytes: enough to notice any write.
pub fn digest(p: &Path) -> u64 {
    std::fs::read(p)
        .unwrap()
        .iter()
        .fold(0xcbf29ce484222325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
        })
}

/// Send `sig` to a child process.
pub fn signal(c: &std::process::Child, sig: i32) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(c.id() as i32, sig) };
}

/// A `vmfs mount --foreground` process that is killed, and its mount
/// detached, when dropped: a failing test leaves no host behind (one would
/// keep the test runner's output open, and CI waiting).
pub struct Host {
    pub child: std::process::Child,
    pub mnt: std::path::PathBuf,
}

impl Host {
    /// [`mount_foreground`] with the process kept in a [`Host`].
    pub fn mount(args: &[&str], mnt: &Path) -> Host {
        Host {
            child: mount_foreground(args, mnt),
            mnt: mnt.to_path_buf(),
        }
    }
    /// [`Host::mount`] with a lease of `lease_ms`.
    pub fn mount_lease(args: &[&str], mnt: &Path, lease_ms: u32) -> Host {
        Host {
            child: mount_foreground_lease(args, mnt, lease_ms),
            mnt: mnt.to_path_buf(),
        }
    }
    /// SIGKILL it (a crash) and detach its dead mount.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(&self.child, libc::SIGKILL);
            let _ = self.child.wait();
        }
        let _ = std::process::Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.mnt)
            .stderr(std::process::Stdio::null())
            .status();
    }
    /// SIGTERM it (a clean unmount); Err if it did not exit cleanly.
    pub fn unmount(&mut self) -> Result<(), String> {
        signal(&self.child, libc::SIGTERM);
        match self.child.wait() {
            Ok(s) if s.success() => Ok(()),
            r => Err(format!("the host did not unmount cleanly: {r:?}")),
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
    }
}

#[allow(unused_imports)]
pub use vmfs_tests::Hog;
