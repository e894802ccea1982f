//! What the virtual-disk tests share.

use std::path::Path;
use std::process::Command;

/// Run `qemu-img ARGS` in `dir`: whether it succeeded, and what it printed.
pub fn qemu_img(args: &[&str], dir: &Path) -> (bool, String) {
    let o = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-img is installed (qemu-utils)");
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}
