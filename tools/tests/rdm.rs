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
        let o = rdm_create(mode, st, &raw, &ds, path);
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
    let o = rdm_create("virtual", st, &raw, &ds, "/db-rdm.vmdk");
    assert!(!o.status.success(), "{}", text(&o));

    // The datastore's own LUN, or any datastore's: refused.
    let o = rdm_create("virtual", st, &ds, &ds, "/self.vmdk");
    assert!(text(&o).contains("datastore's own LUN"), "{}", text(&o));
    let other = vmfs_tests::file_lun(d.path(), "other.img", 64 << 20);
    assert!(vmfs(&["mkfs", &other]).status.success());
    let o = rdm_create("virtual", st, &other, &ds, "/other.vmdk");
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

const A: &str = "aaaaaaaa-0000-4000-8000-0000000000a1";
const B: &str = "bbbbbbbb-0000-4000-8000-0000000000b2";

/// `vmfs rdm create --mode MODE --state-dir ST LUN DS PATH`.
fn rdm_create(mode: &str, st: &str, lun: &str, ds: &str, path: &str) -> std::process::Output {
    vmfs(&[
        "rdm",
        "create",
        "--mode",
        mode,
        "--state-dir",
        st,
        lun,
        ds,
        path,
    ])
}

fn open_rw(p: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().read(true).write(true).open(p)
}

/// Through the mounted datastore a mapping reads and writes as a file of
/// its LUN's size, and the bytes are on the LUN (read back by a second
/// iSCSI session); one writer at a time across hosts; its size is fixed.
#[test]
fn io_through_a_mapping_on_two_mounted_hosts() {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::FileExt;
    let d = tempfile::tempdir().unwrap();
    let mut tgt = vmfs_tests::Tgt::start(d.path());
    let raw = tgt.add_lun("rawio", 32 << 20);
    let ds = vmfs_tests::file_lun(d.path(), "ds.img", 256 << 20);
    assert!(vmfs(&["mkfs", &ds]).status.success());
    let state = d.path().join("state");
    std::fs::create_dir(&state).unwrap();
    // The host's LUN list names the LUN (the URL hint would do as well).
    std::fs::write(
        state.join("luns"),
        format!("# LUNs this host may map\n{raw}\n"),
    )
    .unwrap();
    let st = state.to_str().unwrap();
    let o = rdm_create("virtual", st, &raw, &ds, "/db.vmdk");
    assert!(o.status.success(), "{}", common::text(&o));

    let (ma, mb) = (d.path().join("a"), d.path().join("b"));
    std::fs::create_dir(&ma).unwrap();
    std::fs::create_dir(&mb).unwrap();
    let mut a = common::mount_foreground_lease(&["--host-uuid", A, &ds], &ma, 8000);
    let mut b = common::mount_foreground_lease(&["--host-uuid", B, &ds], &mb, 8000);
    let map = ma.join("db.vmdk");
    assert_eq!(std::fs::metadata(&map).unwrap().len(), 32 << 20);

    let data = vmfs_tests::pattern(5, 300_000);
    let mut f = open_rw(&map).unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    let mut back = vec![0u8; data.len()];
    f.read_exact_at(&mut back, 1 << 20).unwrap();
    assert!(back == data, "read back through the mapping differs");
    // Past the LUN's end: refused. Truncate: refused.
    assert!(f.write_at(b"x", 32 << 20).is_err());
    assert!(f.set_len(1 << 20).is_err());

    // Another initiator (a second iSCSI session) sees the bytes on the LUN.
    let direct = lun::open(&raw).unwrap();
    let mut on_lun = vec![0u8; data.len()];
    direct.read_at(&mut on_lun, 1 << 20).unwrap();
    assert!(
        on_lun == data,
        "the LUN does not hold what was written through the mapping"
    );

    // One writer: host b's open for writing (or reading) gets EBUSY.
    let e = open_rw(&mb.join("db.vmdk")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{e}");
    drop(f);
    let t = std::time::Instant::now();
    let mut g = loop {
        match std::fs::File::open(mb.join("db.vmdk")) {
            Ok(g) => break g,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                assert!(
                    t.elapsed().as_secs() < 5,
                    "a's close never freed the mapping"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    };
    let mut first = vec![0u8; 16];
    g.seek(SeekFrom::Start(1 << 20)).unwrap();
    g.read_exact(&mut first).unwrap();
    assert_eq!(&first[..], &data[..16]);
    drop(g);
    for (c, m) in [(&mut a, &ma), (&mut b, &mb)] {
        common::signal(c, libc::SIGTERM);
        assert!(
            c.wait().unwrap().success(),
            "host on {} failed",
            m.display()
        );
    }
    let o = vmfs(&["fsck", &ds]);
    assert_eq!(o.status.code(), Some(0), "{}", common::text(&o));
}
