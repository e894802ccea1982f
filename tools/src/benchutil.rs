//! What the benches that drive the `vmfs` command share.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The `vmfs` binary beside the running bench (else the one on PATH).
pub fn vmfs_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("vmfs")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("vmfs"))
}

/// Run `cmd`; its stdout, or an error with everything it printed.
pub fn run(cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !o.status.success() {
        bail!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// `vmfs mount --foreground --state-dir STATE LUN MNT` as a host of its
/// own, once the mount is there (up to a minute).
pub fn mount(
    vmfs: &std::path::Path,
    state: &std::path::Path,
    lun: &std::path::Path,
    mnt: &std::path::Path,
) -> Result<std::process::Child> {
    let mut host = Command::new(vmfs)
        .args(["mount", "--foreground", "--state-dir"])
        .arg(state)
        .arg(lun)
        .arg(mnt)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let t = std::time::Instant::now();
    let want = mnt.to_str().unwrap_or("?");
    while !std::fs::read_to_string("/proc/self/mountinfo")?.contains(want) {
        if t.elapsed() > std::time::Duration::from_secs(60) {
            let _ = host.kill();
            bail!("the datastore did not mount on {}", mnt.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(host)
}
