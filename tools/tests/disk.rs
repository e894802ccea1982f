//! `vmfs disk` on a mounted datastore, through the host agent, with QEMU
//! reading and writing the disk through the FUSE mount: create, snapshot,
//! revert, consolidate; `qemu-img info --backing-chain`, `check` and
//! `compare` see what we say at every step.

use std::path::Path;
use std::process::Command;

mod common;
use common::{text, vmfs, Host};

const MIB: usize = 1 << 20;

fn ok(args: &[&str]) -> String {
    let o = vmfs(args);
    assert!(o.status.success(), "vmfs {args:?}: {}", text(&o));
    text(&o)
}

fn qemu_io(disk: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "vmdk"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let o = c.arg(disk).output().unwrap();
    assert!(o.status.success(), "qemu-io {cmds:?}: {}", text(&o));
    assert!(
        !text(&o).contains("failed"),
        "qemu-io {cmds:?}: {}",
        text(&o)
    );
}

fn qemu_img(args: &[&str]) -> String {
    let o = Command::new("qemu-img").args(args).output().unwrap();
    assert!(o.status.success(), "qemu-img {args:?}: {}", text(&o));
    text(&o)
}

/// The disk compares equal to `want` (written to a local raw file).
fn same(disk: &Path, want: &[u8], scratch: &Path) {
    let raw = scratch.join("want.raw");
    std::fs::write(&raw, want).unwrap();
    qemu_img(&[
        "compare",
        "-f",
        "vmdk",
        "-F",
        "raw",
        disk.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
}

#[test]
fn disks_on_a_mounted_datastore_with_qemu_through_the_mount() {
    let d = tempfile::tempdir().unwrap();
    let lun = vmfs_tests::file_lun(d.path(), "ds.img", 512 << 20);
    let o = vmfs(&["mkfs", &lun]);
    assert!(o.status.success(), "{}", text(&o));
    let st = d.path().join("state");
    let st = st.to_str().unwrap();
    let mnt = d.path().join("m");
    std::fs::create_dir(&mnt).unwrap();
    let mut host = Host::mount(&["--state-dir", st, &lun], &mnt);
    std::fs::create_dir(mnt.join("vm1")).unwrap();
    let disk = mnt.join("vm1/disk.vmdk");
    let ds = disk.to_str().unwrap();

    let t = ok(&[
        "disk",
        "create",
        "--state-dir",
        st,
        "--size",
        "64M",
        "--adapter",
        "pvscsi",
        ds,
    ]);
    assert!(t.contains("created"), "{t}");
    let mut want = vec![0u8; 64 * MIB];
    qemu_io(&disk, &["write -P 0x61 0 1M", "write -P 0x62 10M 64k"]);
    want[..MIB].fill(0x61);
    want[10 * MIB..10 * MIB + 65536].fill(0x62);
    same(&disk, &want, d.path());
    let frozen = want.clone();

    // Snapshot: QEMU writes the new layer; the chain is what we say.
    let t = ok(&["disk", "snapshot", "--state-dir", st, ds]);
    assert!(t.contains("disk-000000.vmdk"), "{t}");
    let id = t
        .split("change ID ")
        .nth(1)
        .and_then(|r| r.split([' ', '\n']).next())
        .unwrap_or_else(|| panic!("no change ID in {t:?}"))
        .to_string();
    // Nothing written since: no range. '*': what may hold data.
    let o = vmfs(&["disk", "changed", "--state-dir", st, "--since", &id, ds]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "", "{}", text(&o));
    let all = ok(&["disk", "changed", "--state-dir", st, "--since", "*", ds]);
    assert!(all.starts_with("0 1048576\n"), "{all}");
    qemu_io(&disk, &["write -P 0x63 512k 1M", "write -P 0x64 63M 4k"]);
    // QEMU's vmdk driver does not keep our change tracking; its new CID
    // tells, and the answer is the whole disk, saying why.
    let j = ok(&[
        "disk",
        "changed",
        "--json",
        "--state-dir",
        st,
        "--since",
        &id,
        ds,
    ]);
    let v: serde_json::Value = serde_json::from_str(&j).unwrap();
    assert_eq!(v["ranges"], serde_json::json!([[0, 64 * MIB]]), "{j}");
    assert!(v["whole_disk"].as_str().unwrap().contains("CID"), "{j}");
    let t = ok(&["disk", "changed", "--state-dir", st, "--since", &id, ds]);
    assert!(t.contains("the whole disk must be read"), "{t}");
    want[512 * 1024..512 * 1024 + MIB].fill(0x63);
    want[63 * MIB..63 * MIB + 4096].fill(0x64);
    same(&disk, &want, d.path());
    let info = qemu_img(&["info", "--backing-chain", ds]);
    assert_eq!(info.matches("image: ").count(), 2, "{info}");
    assert!(qemu_img(&["check", ds]).contains("No errors"));
    let t = ok(&["disk", "check", "--state-dir", st, ds]);
    assert!(t.contains("2 layer(s), clean"), "{t}");
    let t = ok(&["disk", "info", "--state-dir", st, ds]);
    assert!(t.contains("2 layer(s)") && t.contains("pvscsi"), "{t}");
    let j = ok(&["disk", "info", "--json", "--state-dir", st, ds]);
    assert!(j.contains("\"layers\""), "{j}");
    // The frozen layer still reads as it was.
    same(&mnt.join("vm1/disk-000000.vmdk"), &frozen, d.path());

    // Revert: back to the snapshot.
    ok(&["disk", "revert", "--state-dir", st, ds]);
    same(&disk, &frozen, d.path());
    qemu_io(&disk, &["write -P 0x65 2M 128k"]);
    let mut want = frozen.clone();
    want[2 * MIB..2 * MIB + 128 * 1024].fill(0x65);

    // Consolidate: one layer again, same content, no file left behind.
    let t = ok(&["disk", "consolidate", "--state-dir", st, ds]);
    assert!(t.contains("0 snapshot(s) below"), "{t}");
    same(&disk, &want, d.path());
    let mut files: Vec<_> = std::fs::read_dir(mnt.join("vm1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        vec!["disk-ctk.vmdk", "disk-flat.vmdk", "disk.vmdk"],
        "files left behind"
    );
    let t = ok(&["disk", "info", "--state-dir", st, ds]);
    assert!(t.contains("tracking    on"), "{t}");
    ok(&["disk", "tracking", "--state-dir", st, ds, "off"]);
    let t = ok(&["disk", "info", "--state-dir", st, ds]);
    assert!(t.contains("tracking    off"), "{t}");
    assert!(!mnt.join("vm1/disk-ctk.vmdk").exists());
    // Nothing to consolidate: a clear refusal.
    let o = vmfs(&["disk", "consolidate", "--state-dir", st, ds]);
    assert!(
        !o.status.success() && text(&o).contains("no snapshot"),
        "{}",
        text(&o)
    );
    // A path not under a mount and no --datastore: refused.
    let o = vmfs(&["disk", "info", "--state-dir", st, "/tmp/none.vmdk"]);
    assert!(text(&o).contains("not under a vmfs mount"), "{}", text(&o));

    // Clone, export and import: independent disks with the same content.
    let t = ok(&[
        "disk",
        "clone",
        "--state-dir",
        st,
        ds,
        mnt.join("vm1/copy.vmdk").to_str().unwrap(),
    ]);
    assert!(t.contains("cloned"), "{t}");
    same(&mnt.join("vm1/copy.vmdk"), &want, d.path());
    let raw = d.path().join("export.raw");
    ok(&[
        "disk",
        "export",
        "--state-dir",
        st,
        ds,
        raw.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&raw).unwrap() == want);
    ok(&[
        "disk",
        "import",
        "--state-dir",
        st,
        raw.to_str().unwrap(),
        mnt.join("vm1/back.vmdk").to_str().unwrap(),
    ]);
    same(&mnt.join("vm1/back.vmdk"), &want, d.path());
    let t = ok(&[
        "disk",
        "resize",
        "--state-dir",
        st,
        "--size",
        "80M",
        mnt.join("vm1/back.vmdk").to_str().unwrap(),
    ]);
    assert!(t.contains("83886080 bytes"), "{t}");
    let info = qemu_img(&["info", mnt.join("vm1/back.vmdk").to_str().unwrap()]);
    assert!(info.contains("80 MiB"), "{info}");
    let o = vmfs(&[
        "disk",
        "clone",
        "--state-dir",
        st,
        ds,
        "/tmp/elsewhere.vmdk",
    ]);
    assert!(
        !o.status.success() && text(&o).contains("not under the mountpoint"),
        "{}",
        text(&o)
    );

    host.unmount().unwrap();
    // Not mounted: by the datastore's LUNs.
    let t = ok(&["disk", "info", "--datastore", &lun, "vm1/disk.vmdk"]);
    assert!(t.contains("1 layer(s)"), "{t}");
    ok(&["disk", "snapshot", "--datastore", &lun, "vm1/disk.vmdk"]);
    let t = ok(&["disk", "info", "--datastore", &lun, "vm1/disk.vmdk"]);
    assert!(t.contains("2 layer(s)"), "{t}");
    // Delete, not mounted too: every file of the chain goes (the disk has
    // a snapshot and change tracking is on again).
    ok(&[
        "disk",
        "tracking",
        "--datastore",
        &lun,
        "vm1/disk.vmdk",
        "on",
    ]);
    ok(&["disk", "delete", "--datastore", &lun, "vm1/back.vmdk"]);
    ok(&["disk", "delete", "--datastore", &lun, "vm1/copy.vmdk"]);
    ok(&["disk", "delete", "--datastore", &lun, "vm1/disk.vmdk"]);
    let o = vmfs(&["disk", "info", "--datastore", &lun, "vm1/disk.vmdk"]);
    assert!(!o.status.success(), "{}", text(&o));
    let o = vmfs(&["fsck", &lun]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let mut host = Host::mount(&["--state-dir", st, &lun], &mnt);
    let left: Vec<_> = std::fs::read_dir(mnt.join("vm1"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
    host.unmount().unwrap();
}

/// A disk written on host A (its top extent open for writing there):
/// host B's snapshot, revert and consolidate are refused naming A, while B
/// may still read the frozen layer below (what a backup proxy does). Once
/// A closes it, B's snapshot goes through.
#[test]
fn a_disk_in_use_on_one_host_is_refused_to_another() {
    let d = tempfile::tempdir().unwrap();
    let lun = vmfs_tests::file_lun(d.path(), "ds.img", 512 << 20);
    let o = vmfs(&["mkfs", &lun]);
    assert!(o.status.success(), "{}", text(&o));
    let (sa, sb) = (d.path().join("sa"), d.path().join("sb"));
    let (sa, sb) = (sa.to_str().unwrap(), sb.to_str().unwrap());
    let (ma, mb) = (d.path().join("a"), d.path().join("b"));
    std::fs::create_dir(&ma).unwrap();
    std::fs::create_dir(&mb).unwrap();
    let mut a = Host::mount(
        &[
            "--state-dir",
            sa,
            "--host-uuid",
            "aaaaaaaa-0000-4000-8000-0000000000d1",
            &lun,
        ],
        &ma,
    );
    let mut b = Host::mount(
        &[
            "--state-dir",
            sb,
            "--host-uuid",
            "bbbbbbbb-0000-4000-8000-0000000000d2",
            &lun,
        ],
        &mb,
    );
    std::fs::create_dir(ma.join("vm")).unwrap();
    let da = ma.join("vm/d.vmdk");
    let db = mb.join("vm/d.vmdk");
    ok(&[
        "disk",
        "create",
        "--state-dir",
        sa,
        "--size",
        "32M",
        da.to_str().unwrap(),
    ]);
    qemu_io(&da, &["write -P 0x71 0 1M"]);
    ok(&["disk", "snapshot", "--state-dir", sa, da.to_str().unwrap()]);
    let j = ok(&[
        "disk",
        "info",
        "--json",
        "--state-dir",
        sa,
        da.to_str().unwrap(),
    ]);
    let delta = j
        .split('"')
        .find(|s| s.ends_with("-delta.vmdk"))
        .expect("a delta in the chain")
        .to_string();
    // A writes the disk (a VM running there): its top extent is open.
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(ma.join("vm").join(&delta))
        .unwrap();
    let t = std::time::Instant::now();
    while !mb.join("vm/d.vmdk").exists() {
        assert!(t.elapsed().as_secs() < 5, "b never saw the disk");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for cmd in ["snapshot", "revert", "consolidate"] {
        let o = vmfs(&["disk", cmd, "--state-dir", sb, db.to_str().unwrap()]);
        assert!(!o.status.success(), "{cmd} went through: {}", text(&o));
        assert!(text(&o).contains("slot 0"), "{cmd}: {}", text(&o));
    }
    // The frozen layer reads on B meanwhile.
    let t = ok(&[
        "disk",
        "info",
        "--state-dir",
        sb,
        mb.join("vm/d-000000.vmdk").to_str().unwrap(),
    ]);
    assert!(t.contains("1 layer(s)"), "{t}");
    drop(held);
    let t = std::time::Instant::now();
    loop {
        let o = vmfs(&["disk", "snapshot", "--state-dir", sb, db.to_str().unwrap()]);
        if o.status.success() {
            break;
        }
        assert!(t.elapsed().as_secs() < 10, "{}", text(&o));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let t = ok(&["disk", "info", "--state-dir", sa, da.to_str().unwrap()]);
    assert!(t.contains("3 layer(s)"), "{t}");
    b.unmount().unwrap();
    a.unmount().unwrap();
    let o = vmfs(&["fsck", &lun]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}
