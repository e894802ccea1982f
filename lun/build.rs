//! Link libiscsi and libblkid (LGPL, dynamically), found through pkg-config.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Err(e) = pkg_config::Config::new()
        .atleast_version("1.18")
        .probe("libiscsi")
    {
        panic!(
            "libiscsi 1.18 or later is needed for iSCSI LUNs: run scripts/setup.sh, \
             or install the Debian package libiscsi-dev ({e})"
        );
    }
    if let Err(e) = pkg_config::Config::new().probe("blkid") {
        panic!(
            "libblkid is needed to probe LUNs before mkfs: run scripts/setup.sh, \
             or install the Debian package libblkid-dev ({e})"
        );
    }
}
