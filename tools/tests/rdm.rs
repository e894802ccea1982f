//! Raw device mappings over a tgt LUN: `vmfs rdm create` in both modes,
//! `vmfs rdm info`, and the refusals (a datastore's own LUN, a LUN whose
//! identity changed).

mod common;
use common::{text, vmfs};

#[test]
fn map_a_tgt_lun_in_both_modes() {
    let d = tempfile::tempdir().unwrap();
    let mut tgt = vmfs_tests::Tgt::start(d.path());
    let raw = tgt.add_lun("raw", 64 << 20);
    let ds = vmfs_tests::file_lun(d.path(), "ds.img", 256 << 20);
    let o = vmfs(&["mkfs", &ds]);
    assert!(o.status.success(), "{}", text(&o));
    let state = d.path().join("state");
    let st = state.to_str().unwrap();

    for (mode, path) in [("virtual", "/db-rdm.vmdk"), ("physical", "/db-rdmp.vmdk")] {
        let o = vmfs(&[
            "rdm",
            "create",
            "--mode",
            mode,
            "--state-dir",
            st,
            &raw,
            &ds,
            path,
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let o = vmfs(&["rdm", "info", "--state-dir", st, &ds, path]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "{t}");
        let want = if mode == "virtual" {
            "vmfsRawDeviceMap"
        } else {
            "vmfsPassthroughRawDeviceMap"
        };
        assert!(
            t.contains(want) && t.contains("naa.6") && t.contains("identity and size match"),
            "{t}"
        );
    }
    // A second mapping at the same path: refused, nothing changed.
    let o = vmfs(&[
        "rdm",
        "create",
        "--mode",
        "virtual",
        "--state-dir",
        st,
        &raw,
        &ds,
        "/db-rdm.vmdk",
    ]);
    assert!(!o.status.success(), "{}", text(&o));

    // The datastore's own LUN, or any datastore's: refused.
    let o = vmfs(&[
        "rdm",
        "create",
        "--mode",
        "virtual",
        "--state-dir",
        st,
        &ds,
        &ds,
        "/self.vmdk",
    ]);
    assert!(text(&o).contains("datastore's own LUN"), "{}", text(&o));
    let other = vmfs_tests::file_lun(d.path(), "other.img", 64 << 20);
    assert!(vmfs(&["mkfs", &other]).status.success());
    let o = vmfs(&[
        "rdm",
        "create",
        "--mode",
        "virtual",
        "--state-dir",
        st,
        &other,
        &ds,
        "/other.vmdk",
    ]);
    assert!(text(&o).contains("volume header"), "{}", text(&o));

    // fsck is clean with mappings on the datastore.
    let o = vmfs(&["fsck", &ds]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    // The target now serves another LUN at the same URL (a new SCSI id):
    // the mapping refuses it, naming both identities.
    tgt.kill();
    tgt.luns[0].scsi_id = "abcdef0123456789".into();
    tgt.revive();
    let o = vmfs(&["rdm", "info", "--state-dir", st, &ds, "/db-rdm.vmdk"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("not the mapped LUN"), "{t}");
}
