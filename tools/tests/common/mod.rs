//! Helpers shared by the `vmfs` command's integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

pub const VMFS: &str = env!("CARGO_BIN_EXE_vmfs");

/// Run `vmfs ARGS` (warnings only in the log) and collect its output.
pub fn vmfs(args: &[&str]) -> Output {
    Command::new(VMFS)
        .args(args)
        .env("VMFS_LOG", "warn")
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
