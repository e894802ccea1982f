//! Paravirtual SCSI with a real guest: a Linux kernel under QEMU (TCG)
//! talks to the host's vhost-user-scsi controller (`vmfs scsi add`), its
//! `sd` driver and sg3_utils on one side, virtual disks on the datastore on
//! the other. Slow (seconds per boot): few tests, each proving several
//! things.

use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::guest::*;
use common::{text, vmfs, Host};

/// Probe, data both ways, ext4, discard, hostile bytes on the socket.
#[test]
fn a_guest_probes_reads_writes_and_trims_its_virtual_disks() {
    let ds = Ds::new(1 << 30);
    // LUN 0: made by the host from a raw image (a pattern at 32 MiB).
    let hostpat = pattern(8 * MIB, 7);
    let mut raw = vec![0u8; 64 * MIB];
    raw[32 * MIB..40 * MIB].copy_from_slice(&hostpat);
    std::fs::write(ds.p("in.raw"), &raw).unwrap();
    std::fs::write(ds.p("hostpat"), &hostpat).unwrap();
    let d0 = ds.disk("d0.vmdk");
    ds.run(&["disk", "import", ds.p("in.raw").to_str().unwrap(), &d0]);
    // LUN 1: a thin disk for ext4.
    let d1 = ds.disk("d1.vmdk");
    ds.run(&["disk", "create", "--size", "256M", &d1]);
    let guestpat = pattern(8 * MIB, 9);
    std::fs::write(ds.p("guestpat"), &guestpat).unwrap();
    // LUN 2: 3 TiB, thin (a few MiB of it ever written): the guest must
    // address it with the 16-byte commands past 2 TiB.
    let d2 = ds.disk("d2.vmdk");
    ds.run(&["disk", "create", "--size", "3T", &d2]);

    let sock = ds.p("vus.sock");
    let s = sock.to_str().unwrap();
    let out = ds.run(&["scsi", "add", "--socket", s, "--queues", "2", &d0, &d1, &d2]);
    assert!(out.contains("LUN 0") && out.contains("LUN 2"), "{out}");
    // A second controller may not take a disk that is attached.
    let o = vmfs(&[
        "scsi",
        "add",
        "--state-dir",
        &ds.st,
        "--socket",
        ds.p("x.sock").to_str().unwrap(),
        &d1,
    ]);
    assert!(
        !o.status.success() && text(&o).contains("already attached"),
        "{}",
        text(&o)
    );

    // Garbage on the socket, then a message with a wild size: the
    // connection is dropped, the controller serves the next one.
    for junk in [b"\x00\x01garbage that is no vhost-user message".to_vec(), {
        let mut m = vec![1u8, 0, 0, 0, 1, 0, 0, 0];
        m.extend_from_slice(&u32::MAX.to_le_bytes());
        m
    }] {
        use std::io::Write;
        let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let _ = c.write_all(&junk);
        std::thread::sleep(Duration::from_millis(200));
    }

    let script = r#"#!/bin/sh
set -eux
# Disks by LUN (sdX names follow the order probes finish, not LUNs).
lun() { for d in /sys/class/scsi_disk/*:$1; do ls "$d/device/block"; done; }
A=$(lun 0)
B=$(lun 1)
C=$(lun 2)
fail() { echo "FAIL: $*"; exit 1; }
for d in sda sdb sdc; do [ -b /dev/$d ] || fail "no /dev/$d"; done
sg_inq /dev/$A | grep -q "Vendor identification: VMFS" || fail inquiry
echo "NAA0=$(sg_vpd -p 0x83 /dev/$A | sed -n '/NAA/{n;p}' | tr -d ' ')"
echo "NAA1=$(sg_vpd -p 0x83 /dev/$B | sed -n '/NAA/{n;p}' | tr -d ' ')"
sg_vpd -p 0xb0 /dev/$B | grep -q "Maximum unmap LBA count: [1-9]" || fail "block limits"
sg_vpd -p 0xb2 /dev/$B | grep -q "(LBPU): 1" || fail provisioning
sg_readcap -l /dev/$B | grep -q "lbpme=1, lbprz=1" || fail readcap
sg_readcap -l /dev/$B | grep -q "Number of logical blocks=524288" || fail size
sg_opcodes /dev/$B | grep -q "Unmap" || fail opcodes
sg_opcodes /dev/$B | grep -q "Persistent reserve out" || fail opcodes-pr
sg_modes -p 8 /dev/$B | grep -q Caching || fail "caching page"
sg_modes -p 0x3f /dev/$B | grep -q Control || fail "control page"
test "$(cat /sys/block/$B/queue/discard_max_bytes)" -gt 0 || fail "no discard"
# A bad CDB is refused with sense, nothing else happens.
sg_raw -r 16 /dev/$B c0 00 00 00 00 00 2>&1 | grep -qi "illegal request" || fail "bad opcode accepted"
sg_raw -r 8 /dev/$B 25 00 ff ff ff ff 00 00 00 00 >/dev/null 2>&1 || true
# Task management: a LUN reset completes, and the LUN works after it.
sg_reset -d /dev/$B || fail "LUN reset"
dd if=/dev/$B of=/dev/null bs=4k count=1 iflag=direct || fail "read after the reset"
# 3 TiB: READ CAPACITY(16), and a pattern 2.5 TiB in (WRITE/READ(16)).
sg_readcap -l /dev/$C | grep -q "Number of logical blocks=6442450944" || fail "3 TiB size"
test "$(blockdev --getsize64 /dev/$C)" = 3298534883328 || fail "3 TiB block device"
dd if=/guestpat of=/dev/$C bs=1M seek=2621440 count=8 oflag=direct conv=fsync
dd if=/dev/$C of=/tmp/far bs=1M skip=2621440 count=8 iflag=direct
cmp /tmp/far /guestpat || fail "pattern past 2 TiB differs"
# The host's pattern, and ours with O_DIRECT.
dd if=/dev/$A of=/tmp/h bs=1M skip=32 count=8 iflag=direct
cmp /tmp/h /hostpat || fail "host pattern differs"
dd if=/guestpat of=/dev/$A bs=1M count=8 oflag=direct conv=fsync
# ext4 with files, fsync; 96 MiB written then deleted and trimmed.
mkfs.ext4 -q /dev/$B
mount /dev/$B /mnt
echo "kept by the guest" > /mnt/kept
dd if=/dev/urandom of=/mnt/big bs=1M count=96 conv=fsync
rm /mnt/big
sync
fstrim -v /mnt
umount /mnt
echo GUEST-OK
"#;
    let files = [
        (&*ds.p("hostpat"), "/hostpat"),
        (&*ds.p("guestpat"), "/guestpat"),
    ];
    let console = boot(&ds, "probe", script, &files, &sock, "GUEST-OK");
    let naa = |k: &str| {
        console
            .lines()
            .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    assert!(naa("NAA0=").starts_with("0x3"), "{console}");
    assert_ne!(naa("NAA0="), naa("NAA1="));

    let list = ds.run(&["scsi", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let lun1 = &v[0]["luns"][1];
    assert!(lun1["discards"].as_u64().unwrap() > 0, "{list}");
    assert!(
        lun1["write_bytes"].as_u64().unwrap() >= 96 * MIB as u64,
        "{list}"
    );
    // The trim gave the deleted file's blocks back to the datastore.
    let flat = ds.disk("d1-flat.vmdk");
    assert!(
        allocated(&flat) < 48 * MIB as u64,
        "{} bytes still allocated",
        allocated(&flat)
    );

    // QEMU is gone: the controller can be removed, and the disks read back.
    ds.run(&["scsi", "remove", "--socket", s]);
    let mut far = vec![0u8; 8 * MIB];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(ds.disk("d2-flat.vmdk"))
        .unwrap()
        .read_exact_at(&mut far, 2560 << 30)
        .unwrap();
    assert!(far == guestpat, "the guest's pattern 2.5 TiB into LUN 2");
    assert!(!sock.exists());
    ds.run(&["disk", "export", &d0, ds.p("d0.raw").to_str().unwrap()]);
    let back = std::fs::read(ds.p("d0.raw")).unwrap();
    assert!(
        back[..8 * MIB] == guestpat[..],
        "the guest's O_DIRECT pattern"
    );
    assert!(
        back[32 * MIB..40 * MIB] == hostpat[..],
        "the host's pattern"
    );
    ds.run(&["disk", "export", &d1, ds.p("d1.raw").to_str().unwrap()]);
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(ds.p("d1.raw"))
        .output()
        .unwrap();
    assert!(fsck.status.success(), "e2fsck: {}", text(&fsck));
    let cat = Command::new("debugfs")
        .args(["-R", "cat /kept"])
        .arg(ds.p("d1.raw"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "kept by the guest\n");
}

/// Snapshots and a consolidation while the guest runs fio with verify and
/// rewrites a 32 MiB file over and over: the guest sees pauses, never an
/// error; the layer frozen while the guest's filesystem was frozen through
/// its agent holds a clean filesystem with the marker its freeze hook
/// wrote; the consolidation merges most of the data with the guest running
/// (short pauses only), and the disk it leaves holds a clean filesystem.
#[test]
fn snapshots_of_a_running_guest_pause_it_and_freeze_a_consistent_filesystem() {
    let ds = Ds::new(1 << 30);
    let d = ds.disk("d.vmdk");
    ds.run(&["disk", "create", "--size", "128M", &d]);
    let sock = ds.p("vus.sock");
    ds.run(&["scsi", "add", "--socket", sock.to_str().unwrap(), &d]);
    let hook = ds.p("hook");
    std::fs::write(
        &hook,
        "#!/bin/sh\nif [ \"$1\" = freeze ]; then echo \"frozen at $(cat /proc/uptime)\" > /mnt/frozen-marker; sync; fi\nexit 0\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = r#"#!/bin/sh
set -eux
mkfs.ext4 -q /dev/sda
mount /dev/sda /mnt
echo written-before > /mnt/before
sync
echo FIO-START
( while [ ! -e /tmp/stop ]; do dd if=/dev/zero of=/mnt/big bs=1M count=32 oflag=direct conv=fsync 2>/dev/null; done ) &
fio --name=v --filename=/mnt/fio.dat --size=16M --rw=randwrite --bs=4k \
    --ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --verify_fatal=1 \
    --verify_backlog=64 --time_based --runtime=25 --output=/tmp/fio.out || { cat /tmp/fio.out; echo FIO-FAILED; exit 1; }
grep -q "err= 0" /tmp/fio.out || { cat /tmp/fio.out; exit 1; }
touch /tmp/stop
wait
umount /mnt
echo FIO-OK
"#;
    let q = ds.p("qga.sock");
    let mut g = Guest::start_with(
        ds.dir.path(),
        "snap",
        script,
        &[(&hook, "/etc/qemu/fsfreeze-hook")],
        &sock,
        Some(&q),
        &[],
    );
    g.wait_for("FIO-START", Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(3));
    // 1: frozen by the guest's agent.
    assert_eq!(qga(&q, "guest-fsfreeze-freeze"), "1");
    let t = Instant::now();
    let out = ds.run(&["disk", "snapshot", &d]);
    assert_eq!(qga(&q, "guest-fsfreeze-thaw"), "1");
    eprintln!("freeze to thaw {:?}: {out}", t.elapsed());
    assert!(out.contains("guest I/O held"), "{out}");
    let frozen = disk_info(&ds, &d)["layers"][1]["descriptor"]
        .as_str()
        .unwrap()
        .to_string();
    // Read the frozen layer (through the mount, as QEMU's tools do) while
    // the guest goes on writing above it.
    let raw = ds.p("frozen.raw");
    ext4_clean(&ds.host.mnt.join("vm").join(&frozen), &raw);
    std::thread::sleep(Duration::from_secs(2));
    // 2: crash-consistent, then 3: the newest snapshot merged back while
    // the guest writes.
    ds.run(&["disk", "snapshot", &d]);
    std::thread::sleep(Duration::from_secs(2));
    // Both snapshots merged back while the guest writes: most of it with
    // the guest running.
    let out = ds.run(&["disk", "consolidate", "--all", &d]);
    eprintln!("consolidate under fio: {out}");
    assert!(out.contains("2 snapshot(s) consolidated"), "{out}");
    let running: f64 = out
        .split(" MiB merged with the guest running")
        .next()
        .and_then(|h| h.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(running >= 16.0, "{out}");
    let (rc, console) = g.finish();
    assert_eq!(rc, 0, "{console}");
    assert!(console.contains("FIO-OK"), "{console}");
    assert!(!console.contains("I/O error"), "{console}");
    assert_eq!(disk_info(&ds, &d)["layers"].as_array().unwrap().len(), 1);
    ext4_clean(&ds.host.mnt.join("vm").join("d.vmdk"), &ds.p("now.raw"));
    let cat = |f: &str| {
        let o = Command::new("debugfs")
            .args(["-R", &format!("cat {f}")])
            .arg(&raw)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(cat("/before"), "written-before\n");
    assert!(
        cat("/frozen-marker").starts_with("frozen at"),
        "no marker of the freeze hook"
    );
    let list = ds.run(&["scsi", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v[0]["luns"][0]["errors"].as_u64(), Some(0), "{list}");
}

/// A second host cannot attach a disk the first serves (it names the
/// holder), gets it after the first dies and its lease runs out, and a new
/// guest there finds the first guest's data; the disk's designator is the
/// same on both hosts.
#[test]
fn a_disk_follows_its_guest_to_a_survivor_after_its_host_dies() {
    let mut ds = Ds::new(1 << 30);
    let d = ds.disk("ha.vmdk");
    ds.run(&["disk", "create", "--size", "64M", &d]);
    let sock = ds.p("a.sock");
    ds.run(&["scsi", "add", "--socket", sock.to_str().unwrap(), &d]);
    // Host B: the same datastore, another state directory.
    let stb = ds.p("b").to_str().unwrap().to_string();
    let mntb = ds.p("mb");
    std::fs::create_dir(&mntb).unwrap();
    let _b = Host::mount(&["--state-dir", &stb, &ds.lun], &mntb);
    let db = mntb.join("vm/ha.vmdk").to_str().unwrap().to_string();
    let sockb = ds.p("b.sock");
    let o = vmfs(&[
        "scsi",
        "add",
        "--state-dir",
        &stb,
        "--socket",
        sockb.to_str().unwrap(),
        &db,
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).to_lowercase().contains("host"),
        "the refusal names the holder: {}",
        text(&o)
    );

    let pat = pattern(4 * MIB, 3);
    std::fs::write(ds.p("pat"), &pat).unwrap();
    let first = r#"#!/bin/sh
set -eux
echo "NAA=$(sg_vpd -p 0x83 /dev/sda | sed -n '/NAA/{n;p}' | tr -d ' ')"
dd if=/pat of=/dev/sda bs=1M seek=8 oflag=direct conv=fsync
echo WRITTEN
sleep 600
"#;
    let mut g = Guest::start(
        ds.dir.path(),
        "first",
        first,
        &[(&ds.p("pat"), "/pat")],
        &sock,
        &[],
    );
    g.wait_for("WRITTEN", Duration::from_secs(120));
    let naa_a = g
        .console()
        .lines()
        .find_map(|l| l.strip_prefix("NAA=").map(str::to_string))
        .unwrap();
    // Host A dies under its running guest.
    ds.host.kill();
    drop(g);
    // B gets the disk once A's lease ran out and B recovered A's locks.
    let t = Instant::now();
    loop {
        let o = vmfs(&[
            "scsi",
            "add",
            "--state-dir",
            &stb,
            "--socket",
            sockb.to_str().unwrap(),
            &db,
        ]);
        if o.status.success() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "B never got the disk: {}",
            text(&o)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let second = r#"#!/bin/sh
set -eux
echo "NAA=$(sg_vpd -p 0x83 /dev/sda | sed -n '/NAA/{n;p}' | tr -d ' ')"
dd if=/dev/sda of=/tmp/back bs=1M skip=8 count=4 iflag=direct
cmp /tmp/back /pat
echo DATA-OK
"#;
    let console = boot(
        &ds,
        "second",
        second,
        &[(&ds.p("pat"), "/pat")],
        &sockb,
        "DATA-OK",
    );
    let naa_b = console
        .lines()
        .find_map(|l| l.strip_prefix("NAA=").map(str::to_string))
        .unwrap();
    assert_eq!(naa_a, naa_b, "the designator differs between hosts");
}

/// `scsi add` to a running controller hot-plugs the disk into the guest;
/// growing an attached disk reaches the guest as a capacity change.
#[test]
fn hotplug_and_resize_reach_a_running_guest() {
    let ds = Ds::new(1 << 30);
    let (d0, d1) = (ds.disk("h0.vmdk"), ds.disk("h1.vmdk"));
    ds.run(&["disk", "create", "--size", "32M", &d0]);
    ds.run(&["disk", "create", "--size", "16M", &d1]);
    let sock = ds.p("vus.sock");
    let s = sock.to_str().unwrap();
    ds.run(&["scsi", "add", "--socket", s, &d0]);
    let script = r#"#!/bin/sh
set -eu
wait_for() { i=0; while ! eval "$1"; do i=$((i+1)); [ $i -lt 900 ] || { echo "FAIL: $1"; exit 1; }; sleep 0.1; done; }
[ ! -b /dev/sdb ]
echo "SIZE0=$(cat /sys/block/sda/size)"
echo READY-PLUG
wait_for '[ -b /dev/sdb ]'
echo "PLUGGED=$(cat /sys/block/sdb/size)"
echo READY-GROW
wait_for '[ "$(cat /sys/block/sda/size)" != 65536 ]'
echo "GROWN=$(cat /sys/block/sda/size)"
dd if=/dev/zero of=/dev/sda bs=1M seek=40 count=1 oflag=direct
"#;
    let mut g = Guest::start(ds.dir.path(), "hotplug", script, &[], &sock, &[]);
    g.wait_for("READY-PLUG", Duration::from_secs(120));
    let out = ds.run(&["scsi", "add", "--socket", s, &d1]);
    assert!(out.contains("LUN 1"), "{out}");
    let st = ok(&["status", "--state-dir", &ds.st]);
    assert!(st.contains("LUN 1: vm/h1.vmdk"), "{st}");
    g.wait_for("PLUGGED=", Duration::from_secs(120));
    ds.run(&["disk", "resize", "--size", "64M", &d0]);
    let (rc, console) = g.finish();
    assert_eq!(rc, 0, "{console}");
    assert!(console.contains("SIZE0=65536"), "{console}");
    assert!(console.contains("PLUGGED=32768"), "{console}");
    assert!(console.contains("GROWN=131072"), "{console}");
}

/// A shared disk attached on two hosts at once: persistent reservations
/// made by a guest on one host hold for a guest on the other (register,
/// reserve, conflict, preempt), as pacemaker's fence_scsi uses them.
#[test]
fn persistent_reservations_of_a_shared_disk_hold_across_hosts() {
    let ds = Ds::new(1 << 30);
    let d = ds.disk("quorum.vmdk");
    ds.run(&[
        "disk",
        "create",
        "--size",
        "16M",
        "--provisioning",
        "eager",
        &d,
    ]);
    // Not shareable with a snapshot, sharing refuses snapshots.
    ds.run(&["disk", "share", &d, "on"]);
    let o = vmfs(&["disk", "snapshot", "--state-dir", &ds.st, &d]);
    assert!(
        !o.status.success() && text(&o).contains("shared"),
        "{}",
        text(&o)
    );
    let stb = ds.p("b").to_str().unwrap().to_string();
    let mntb = ds.p("mb");
    std::fs::create_dir(&mntb).unwrap();
    let _b = Host::mount(&["--state-dir", &stb, &ds.lun], &mntb);
    let db = mntb.join("vm/quorum.vmdk").to_str().unwrap().to_string();
    let (sa, sb) = (ds.p("a.sock"), ds.p("b.sock"));
    ds.run(&["scsi", "add", "--socket", sa.to_str().unwrap(), &d]);
    ok(&[
        "scsi",
        "add",
        "--state-dir",
        &stb,
        "--socket",
        sb.to_str().unwrap(),
        &db,
    ]);

    let common = r#"#!/bin/sh
set -ux
fail() { echo "FAIL: $*"; exit 1; }
dd if=/dev/zero of=/tmp/z bs=512 count=1 2>/dev/null
# WRITE(10) of one block; prints the SCSI status on failure.
w() { sg_raw -s 512 -i /tmp/z /dev/sda 2a 00 00 00 00 10 00 00 01 00 2>&1; }
keys() { sg_persist --in --read-keys /dev/sda 2>&1; }
res() { sg_persist --in --read-reservation /dev/sda 2>&1; }
"#;
    // Host A's guest registers 0xaa and reserves write-exclusive,
    // registrants only.
    let a1 = format!(
        "{common}{}",
        r#"sg_persist --out --register --param-sark=0xaa /dev/sda || fail register
sg_persist --out --reserve --param-rk=0xaa --prout-type=5 /dev/sda || fail reserve
w | grep -qi "conflict" && fail "the holder was refused"
res | grep -qi "0xaa" || fail "no reservation"
echo A1-OK
"#
    );
    boot(&ds, "pra1", &a1, &[], &sa, "A1-OK");
    // Host B's guest: refused until registered, then fences A off.
    let b1 = format!(
        "{common}{}",
        r#"keys | grep -qi "0xaa" || fail "B does not see A's key"
w | grep -qi "reservation conflict" || fail "an unregistered write went through"
sg_persist --out --register --param-sark=0xbb /dev/sda || fail register
w | grep -qi "conflict" && fail "a registrant was refused"
sg_persist --out --preempt --param-rk=0xbb --param-sark=0xaa --prout-type=5 /dev/sda || fail preempt
keys | grep -qi "0xaa" && fail "A's key survived the preempt"
res | grep -qi "0xbb" || fail "B does not hold the reservation"
echo B1-OK
"#
    );
    boot(&ds, "prb1", &b1, &[], &sb, "B1-OK");
    // Host A's guest again: fenced.
    let a2 = format!(
        "{common}{}",
        r#"w | grep -qi "reservation conflict" || fail "the fenced host still writes"
keys | grep -qi "0xbb" || fail "A does not see B's key"
echo A2-OK
"#
    );
    boot(&ds, "pra2", &a2, &[], &sa, "A2-OK");
}

/// Raw device mappings of iSCSI LUNs (tgt) are LUNs of the guest: a
/// virtual-mode one emulated (what the guest writes is on the mapped LUN),
/// a physical-mode one passing the guest's commands to the LUN (the guest
/// sees tgt's own identity and reservations).
#[test]
fn raw_device_mappings_are_luns_of_the_guest() {
    let ds = Ds::new(512 << 20);
    let mut tgt = vmfs_tests::Tgt::start(ds.dir.path());
    let raw = tgt.add_lun("pvraw", 32 << 20);
    let rawp = tgt.add_lun("pvrawp", 16 << 20);
    let map = ds.disk("raw.vmdk");
    ds.run(&["rdm", "create", "--mode", "virtual", &raw, &map]);
    let pmap = ds.disk("rawp.vmdk");
    ds.run(&["rdm", "create", "--mode", "physical", &rawp, &pmap]);
    let sock = ds.p("vus.sock");
    let s = sock.to_str().unwrap();
    ds.run(&["scsi", "add", "--socket", s, &map, &pmap]);
    let pat = pattern(2 * MIB, 11);
    std::fs::write(ds.p("pat"), &pat).unwrap();
    let script = r#"#!/bin/sh
set -eux
# Disks by LUN (sdX names follow the order probes finish, not LUNs).
lun() { for d in /sys/class/scsi_disk/*:$1; do ls "$d/device/block"; done; }
A=$(lun 0)
B=$(lun 1)
sg_inq /dev/$A | grep -q "Raw mapping"
test "$(cat /sys/block/$A/size)" = 65536
dd if=/pat of=/dev/$A bs=1M seek=1 oflag=direct conv=fsync
dd if=/dev/$A of=/tmp/back bs=1M skip=1 count=2 iflag=direct
cmp /tmp/back /pat
# The physical-mode LUN is tgt's own.
sg_inq /dev/$B | grep -q "Vendor identification: IET"
test "$(cat /sys/block/$B/size)" = 32768
dd if=/pat of=/dev/$B bs=1M seek=2 oflag=direct conv=fsync
dd if=/dev/$B of=/tmp/back2 bs=1M skip=2 count=2 iflag=direct
cmp /tmp/back2 /pat
sg_persist --out --register --param-sark=0x77 /dev/$B
sg_persist --in --read-keys /dev/$B | grep -qi 0x77
sg_persist --out --register --param-rk=0x77 --param-sark=0 /dev/$B
echo RDM-OK
"#;
    boot(
        &ds,
        "rdm",
        script,
        &[(&ds.p("pat"), "/pat")],
        &sock,
        "RDM-OK",
    );
    ds.run(&["scsi", "remove", "--socket", s]);
    for (url, at) in [(&raw, MIB as u64), (&rawp, 2 * MIB as u64)] {
        let direct = lun::open(url).unwrap();
        let mut on_lun = vec![0u8; pat.len()];
        direct.read_at(&mut on_lun, at).unwrap();
        assert!(on_lun == pat, "the guest's bytes are not on {url}");
    }
}
