//! The agentless backup of a running VM (`vmfs backup vm`) with a real
//! guest: two disks with ext4 being written all along, a qemu-guest-agent
//! channel whose freeze hook leaves a marker; full then incremental
//! backups, a job killed after its snapshots and one killed while the
//! guest is frozen, a second job of the same VM refused, restores that
//! fsck clean and hold the files as of each freeze, and the frozen disks
//! attached for other tools (files, NBD, a read-only loop mount). Without
//! a guest: a proxy on the LUNs (VM off, running, host dead, host
//! stopped), attach/detach, and proxies killed at moments spread over a
//! job.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::guest::*;
use common::text;

/// `vmfs backup ARGS` with the test's catalog.
fn backup(ds: &Ds, args: &[&str]) -> std::process::Output {
    let mut a = vec!["backup"];
    a.extend(args);
    if args[0] == "vm" && !args.contains(&"--state-dir") {
        a.extend(["--state-dir", &ds.st]);
    }
    Command::new(common::VMFS)
        .args(&a)
        .env("VMFS_BACKUP_CATALOG", ds.p("catalog.sqlite"))
        .env(
            "VMFS_LOG",
            std::env::var("VMFS_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .output()
        .unwrap()
}

fn backup_ok(ds: &Ds, args: &[&str]) -> String {
    let o = backup(ds, args);
    assert!(o.status.success(), "vmfs backup {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A file of an ext4 image, by debugfs (empty when absent).
fn cat(raw: &Path, f: &str) -> Vec<u8> {
    let o = Command::new("debugfs")
        .args(["-R", &format!("cat {f}")])
        .arg(raw)
        .output()
        .unwrap();
    o.stdout
}

fn fsck_clean(raw: &Path) {
    let o = Command::new("e2fsck").arg("-fn").arg(raw).output().unwrap();
    assert!(o.status.success(), "e2fsck {}: {}", raw.display(), text(&o));
}

#[test]
fn a_running_vm_is_backed_up_quiesced_full_then_incremental_and_restored() {
    let ds = Ds::new(1 << 30);
    let d0 = ds.disk("d0.vmdk");
    let d1 = ds.disk("d1.vmdk");
    for d in [&d0, &d1] {
        ds.run(&["disk", "create", "--size", "96M", d]);
    }
    let sock = ds.p("vus.sock");
    let q = ds.p("qga.sock");
    ds.run(&[
        "scsi",
        "add",
        "--socket",
        sock.to_str().unwrap(),
        "--guest-agent",
        q.to_str().unwrap(),
        &d0,
        &d1,
    ]);
    let repo = ds.p("repo");
    let r = repo.to_str().unwrap();
    backup_ok(&ds, &["init", "--repo", r, "--chunk-size", "64K"]);

    // The freeze hook lists, in each filesystem, the files there as it
    // freezes (so a restore must hold every one of them), and says so on
    // the console (then lingers a second: a window to kill a job in).
    let hook = ds.p("hook");
    std::fs::write(
        &hook,
        "#!/bin/sh\nif [ \"$1\" = freeze ]; then for m in /mnt/a /mnt/b; do ls $m | grep '^f[0-9]' > $m/frozen-marker; done; sync; echo FREEZE-HOOK > /dev/console; sleep 1; fi\nexit 0\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = r#"#!/bin/sh
set -eux
# Disks by LUN (sdX names follow the order probes finish, not LUNs).
lun() { for d in /sys/class/scsi_disk/*:$1; do ls "$d/device/block"; done; }
A=$(lun 0)
B=$(lun 1)
mkdir -p /mnt/a /mnt/b
mkfs.ext4 -q /dev/$A
mkfs.ext4 -q /dev/$B
mount /dev/$A /mnt/a
mount /dev/$B /mnt/b
echo WRITER-START
i=0
while [ $i -lt 200 ] && [ ! -e /tmp/stop ]; do
  for m in /mnt/a /mnt/b; do
    dd if=/dev/urandom of=$m/f$i bs=64k count=2 2>/dev/null
  done
  sync
  i=$((i+1))
  sleep 0.2
done
umount /mnt/a
umount /mnt/b
echo WRITER-DONE
"#;
    let mut g = Guest::start_with(
        ds.dir.path(),
        "bvm",
        script,
        &[(&hook, "/etc/qemu/fsfreeze-hook")],
        &sock,
        Some(&q),
        &[],
    );
    g.wait_for("WRITER-START", Duration::from_secs(180));
    std::thread::sleep(Duration::from_secs(3));

    // The proxy: host B, another process with a state directory of its
    // own, that sees only the LUN and asks host A through the datastore.
    let b = ds.p("b").to_str().unwrap().to_string();
    let lun = ds.lun.clone();
    let on_b: Vec<&str> = vec![
        "vm",
        "--repo",
        r,
        "--name",
        "vm1",
        "--datastore",
        &lun,
        "--state-dir",
        &b,
        "--lease-ms",
        "2000",
    ];
    let with = |head: &[&str], tail: &[&'static str]| -> Vec<String> {
        head.iter().chain(tail).map(|x| x.to_string()).collect()
    };
    // A backup of both disks by B, running (to be killed).
    let job_on_b = || {
        Command::new(common::VMFS)
            .arg("backup")
            .args(with(&on_b, &["vm/d0.vmdk", "vm/d1.vmdk"]))
            .env("VMFS_BACKUP_CATALOG", ds.p("catalog.sqlite"))
            .env("VMFS_LOG", "warn")
            .spawn()
            .unwrap()
    };

    // 1: full, by the proxy on the LUN.
    let args = with(&on_b, &["--json", "vm/d0.vmdk", "vm/d1.vmdk"]);
    let one = backup_ok(&ds, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let one: serde_json::Value = serde_json::from_str(&one).unwrap();
    eprintln!(
        "full: {} frozen {} ms, held {} ms, snapshots kept {} ms",
        one["snapshot"]["how"],
        one["snapshot"]["frozen_ms"],
        one["snapshot"]["held_ms"],
        one["snapshot_lifetime_ms"]
    );
    assert_eq!(one["snapshot"]["quiesced"], true, "{one}");
    assert!(
        one["snapshot"]["how"]
            .as_str()
            .unwrap()
            .contains("2 filesystem(s) frozen"),
        "{one}"
    );
    let id1 = one["manifest"]["id"].as_str().unwrap().to_string();
    for d in one["manifest"]["disks"].as_array().unwrap() {
        assert!(d["since"].is_null(), "{d}");
        assert!(d["change_id"].is_string(), "{d}");
    }

    // A proxy job killed once its snapshots are taken; a second job of the
    // same VM meanwhile (through host A's agent) is refused.
    std::thread::sleep(Duration::from_secs(2));
    let mut killed = job_on_b();
    let marker = format!("{d0}.backup");
    let t = Instant::now();
    while !Path::new(&marker).exists() {
        assert!(t.elapsed() < Duration::from_secs(60), "no snapshot taken");
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = backup(&ds, &["vm", "--repo", r, "--name", "vm1", &d0, &d1]);
    assert!(
        !o.status.success() && text(&o).contains("a backup that is running"),
        "{}",
        text(&o)
    );
    common::signal(&killed, libc::SIGKILL);
    let _ = killed.wait();

    // 2: incremental, through host A's agent this time (the change IDs are
    // the disk's, whoever reads); it deletes what the killed job left first,
    // once A knows that job dead: its heartbeat silent for a lease (2 s).
    std::thread::sleep(Duration::from_secs(4));
    let o = backup(
        &ds,
        &["vm", "--repo", r, "--name", "vm1", "--json", &d0, &d1],
    );
    assert!(o.status.success(), "{}", text(&o));
    let two: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(two["cleaned"].as_array().map(|a| a.len()), Some(2), "{two}");
    assert_eq!(two["snapshot"]["quiesced"], true, "{two}");
    let id2 = two["manifest"]["id"].as_str().unwrap().to_string();
    let disks1 = one["manifest"]["disks"].as_array().unwrap();
    for d in two["manifest"]["disks"].as_array().unwrap() {
        let name = d["name"].as_str().unwrap();
        let prev = disks1.iter().find(|x| x["name"] == name).unwrap();
        assert_eq!(d["since"], prev["change_id"], "{d}");
        // Only what changed between the two change IDs was read.
        let path = ds.disk(&format!("{name}.vmdk"));
        let c: serde_json::Value = serde_json::from_str(&ds.run(&[
            "disk",
            "changed",
            "--json",
            "--since",
            prev["change_id"].as_str().unwrap(),
            "--until",
            d["change_id"].as_str().unwrap(),
            &path,
        ]))
        .unwrap();
        let read = d["stats"]["read"].as_u64().unwrap();
        let changed = c["bytes"].as_u64().unwrap();
        eprintln!(
            "{name}: incremental read {read} bytes, changed {changed}, disk {}",
            96 << 20
        );
        assert!(
            read > 0 && read <= changed,
            "read {read}, changed {changed}: {d}"
        );
        assert!(read < (96 << 20) / 2, "{d}");
    }
    // No snapshot left behind, no marker.
    for d in [&d0, &d1] {
        let info: serde_json::Value =
            serde_json::from_str(&ds.run(&["disk", "info", "--json", d])).unwrap();
        assert_eq!(info["layers"].as_array().unwrap().len(), 1, "{info}");
        assert!(!Path::new(&format!("{d}.backup")).exists());
    }

    // A proxy killed while the guest is frozen (its freeze hook runs): the
    // host finishes the snapshot and thaws the guest all the same; the
    // next job (the attach below) deletes what it left.
    let hooks = g.console().matches("FREEZE-HOOK").count();
    let mut killed = job_on_b();
    let t = Instant::now();
    while g.console().matches("FREEZE-HOOK").count() == hooks {
        assert!(t.elapsed() < Duration::from_secs(60), "no freeze");
        std::thread::sleep(Duration::from_millis(20));
    }
    common::signal(&killed, libc::SIGKILL);
    let _ = killed.wait();
    let t = Instant::now();
    while !Path::new(&marker).exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the host did not finish the snapshot"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = qga(&q, "guest-fsfreeze-status");
    assert_eq!(st, "\"thawed\"", "the guest stayed frozen");

    // 3: attached for third-party tools by proxy B (over NBD too): the
    // copies equal the frozen layer as QEMU's own tools read it through
    // host A's mount, and its ext4 mounts read-only (`losetup -r -P`,
    // `mount -o ro`: clean, quiesced) with every file listed at the freeze.
    let exp = ds.p("exp");
    std::fs::create_dir(&exp).unwrap();
    let o = Command::new(common::VMFS)
        .args([
            "backup",
            "attach",
            "--datastore",
            &lun,
            "--state-dir",
            &b,
            "--lease-ms",
            "2000",
            "--json",
            "--nbd",
            "127.0.0.1:0",
            "--mountpoint",
            exp.to_str().unwrap(),
            "vm/d0.vmdk",
            "vm/d1.vmdk",
        ])
        .env("VMFS_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let att: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(att["snapshot"]["quiesced"], true, "{att}");
    assert_eq!(att["cleaned"].as_array().map(|a| a.len()), Some(2), "{att}");
    for (k, disk) in [(0, &d0), (1, &d1)] {
        let snap = att["record"]["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"] == format!("vm/d{k}.vmdk"))
            .unwrap()
            .clone();
        let layer = Path::new(disk)
            .parent()
            .unwrap()
            .join(snap["frozen"].as_str().unwrap());
        let reference = ds.p(&format!("ref{k}.raw"));
        let o = Command::new("qemu-img")
            .args(["convert", "-f", "vmdk", "-O", "raw"])
            .arg(&layer)
            .arg(&reference)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let want = std::fs::read(&reference).unwrap();
        let img = &att["record"]["images"][k];
        let over_nbd = ds.p(&format!("nbd{k}.raw"));
        let o = Command::new("qemu-img")
            .args(["convert", "-O", "raw", img["nbd"].as_str().unwrap()])
            .arg(&over_nbd)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        assert!(std::fs::read(&over_nbd).unwrap() == want, "d{k}: NBD copy");
        let file = img["file"].as_str().unwrap();
        assert!(std::fs::read(file).unwrap() == want, "d{k}: the file");
    }
    let o = Command::new("losetup")
        .args(["-r", "-P", "-f", "--show"])
        .arg(exp.join("d1.img"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let fsmnt = ds.p("fsmnt");
    std::fs::create_dir(&fsmnt).unwrap();
    let m = Command::new("mount")
        .args(["-o", "ro", &dev])
        .arg(&fsmnt)
        .output()
        .unwrap();
    let listed = std::fs::read_to_string(fsmnt.join("frozen-marker")).unwrap_or_default();
    let whole: Vec<(String, u64)> = listed
        .lines()
        .map(|f| {
            let len = std::fs::metadata(fsmnt.join(f))
                .map(|m| m.len())
                .unwrap_or(0);
            (f.to_string(), len)
        })
        .collect();
    let _ = Command::new("umount").arg(&fsmnt).status();
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    assert!(m.status.success(), "mount -o ro: {}", text(&m));
    assert!(!whole.is_empty(), "no freeze marker in the attached d1");
    for (f, len) in whole {
        assert_eq!(len, 128 << 10, "{f}, listed at the freeze, is not whole");
    }
    let o = Command::new(common::VMFS)
        .args(["backup", "detach", "--state-dir", &b, exp.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    for d in [&d0, &d1] {
        let info: serde_json::Value =
            serde_json::from_str(&ds.run(&["disk", "info", "--json", d])).unwrap();
        assert_eq!(info["layers"].as_array().unwrap().len(), 1, "{info}");
    }

    let (rc, console) = g.finish();
    assert_eq!(rc, 0, "{console}");
    assert!(console.contains("WRITER-DONE"), "{console}");
    let o = backup(&ds, &["verify", "--repo", r]);
    assert!(o.status.success(), "verify: {}", text(&o));

    // Restores: clean filesystems holding every file listed at the freeze.
    for (id, tag) in [(&id1, "one"), (&id2, "two")] {
        for disk in ["d0", "d1"] {
            let raw = ds.p(&format!("{tag}-{disk}.raw"));
            backup_ok(
                &ds,
                &[
                    "restore",
                    "--repo",
                    r,
                    "--disk",
                    disk,
                    id,
                    raw.to_str().unwrap(),
                ],
            );
            fsck_clean(&raw);
            let listed = String::from_utf8_lossy(&cat(&raw, "/frozen-marker")).into_owned();
            assert!(!listed.trim().is_empty(), "{tag} {disk}: no freeze marker");
            for f in listed.lines() {
                assert_eq!(
                    cat(&raw, &format!("/{f}")).len(),
                    128 << 10,
                    "{tag} {disk}: {f}, listed at the freeze, is not whole"
                );
            }
        }
    }
}

/// A proxy that only sees the LUNs (host B, its own state directory): a
/// VM that is off is snapshotted by the proxy itself; a running one's host
/// (A) is asked through the datastore and answers within heartbeats; an
/// incremental with nothing changed reads nothing; a host that does not
/// answer (SIGSTOP) is a clear error naming it, and nothing is left behind.
#[test]
fn a_proxy_on_the_luns_asks_the_vms_host_through_the_datastore() {
    let mut ds = Ds::new(1 << 30);
    let data = vmfs_tests::pattern(5, 24 << 20);
    let mut raw = vec![0u8; 32 << 20];
    raw[4 << 20..28 << 20].copy_from_slice(&data);
    std::fs::write(ds.p("in.raw"), &raw).unwrap();
    let d0 = ds.disk("d0.vmdk");
    ds.run(&["disk", "import", ds.p("in.raw").to_str().unwrap(), &d0]);
    let repo = ds.p("repo");
    let r = repo.to_str().unwrap().to_string();
    backup_ok(&ds, &["init", "--repo", &r, "--chunk-size", "64K"]);
    let b = ds.p("b").to_str().unwrap().to_string();
    let (lun, catalog) = (ds.lun.clone(), ds.p("catalog.sqlite"));
    let proxy = |extra: &[&str]| {
        let mut a = vec![
            "backup",
            "vm",
            "--repo",
            &r,
            "--name",
            "vm",
            "--datastore",
            &lun,
            "--state-dir",
            &b,
            "--lease-ms",
            "2000",
            "--json",
        ];
        a.extend(extra);
        a.push("vm/d0.vmdk");
        Command::new(common::VMFS)
            .args(&a)
            .env("VMFS_BACKUP_CATALOG", &catalog)
            .env("VMFS_LOG", "warn")
            .output()
            .unwrap()
    };
    let restored = |ds: &Ds, id: &str, tag: &str| {
        let out = ds.p(&format!("{tag}.raw"));
        backup_ok(
            &ds,
            &[
                "restore",
                "--repo",
                &r,
                "--disk",
                "d0",
                id,
                out.to_str().unwrap(),
            ],
        );
        assert!(
            std::fs::read(&out).unwrap() == raw,
            "{tag}: the restore differs"
        );
    };

    // Off: no host holds the disk; the proxy snapshots it itself.
    let o = proxy(&[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("it is off"), "{}", text(&o));
    let one: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(one["snapshot"]["quiesced"], false, "{one}");
    restored(&ds, one["manifest"]["id"].as_str().unwrap(), "off");

    // Running on host A (a controller; no guest needed): asked through
    // the datastore.
    let sock = ds.p("vus.sock");
    ds.run(&["scsi", "add", "--socket", sock.to_str().unwrap(), &d0]);
    let t = Instant::now();
    let o = proxy(&[]);
    assert!(o.status.success(), "{}", text(&o));
    eprintln!("through the datastore: {:?}", t.elapsed());
    assert!(
        text(&o).contains("asking it through the datastore"),
        "{}",
        text(&o)
    );
    let two: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let d = &two["manifest"]["disks"][0];
    assert_eq!(
        d["since"], one["manifest"]["disks"][0]["change_id"],
        "{two}"
    );
    assert_eq!(
        d["stats"]["read"].as_u64(),
        Some(0),
        "nothing changed: {two}"
    );
    restored(&ds, two["manifest"]["id"].as_str().unwrap(), "running");
    let info: serde_json::Value =
        serde_json::from_str(&ds.run(&["disk", "info", "--json", &d0])).unwrap();
    assert_eq!(info["layers"].as_array().unwrap().len(), 1, "{info}");

    // Host A dies once the snapshot is taken (the post-thaw hook kills it):
    // the job fails with an error naming A (it can neither answer what
    // changed nor delete the snapshot); the next job, A being dead (its
    // disks held by nobody), deletes the snapshot itself and backs up.
    let kill = format!("kill -9 {}", ds.host.child.id());
    let o = proxy(&["--post-thaw", &kill]);
    let e = text(&o);
    assert!(!o.status.success(), "{e}");
    assert!(e.contains("slot 0) stopped"), "{e}");
    ds.host.kill();
    std::thread::sleep(Duration::from_secs(1));
    let o = proxy(&[]);
    assert!(o.status.success(), "{}", text(&o));
    let four: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        four["cleaned"].as_array().map(|a| a.len()),
        Some(1),
        "{four}"
    );
    restored(&ds, four["manifest"]["id"].as_str().unwrap(), "after-death");
    // A comes back (a new mount as the same host) and serves the disk again.
    let mnt = ds.host.mnt.clone();
    let new = common::Host::mount(&["--state-dir", &ds.st, &ds.lun], &mnt);
    // (The dead one's drop would detach the mountpoint, the new mount's now.)
    std::mem::forget(std::mem::replace(&mut ds.host, new));
    ds.run(&["scsi", "add", "--socket", sock.to_str().unwrap(), &d0]);

    // Host A stops (SIGSTOP, by the pre-freeze hook: once the proxy has
    // joined and found A holding the disk): a clear error naming it,
    // within about a lease.
    let stop = format!("kill -STOP {}", ds.host.child.id());
    let t = Instant::now();
    let o = proxy(&["--pre-freeze", &stop]);
    common::signal(&ds.host.child, libc::SIGCONT);
    let e = text(&o);
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains("slot 0") && (e.contains("stopped") || e.contains("did not take")),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    // Nothing was snapshotted: once A is gone, the disk has one layer.
    ds.host.kill();
    std::thread::sleep(Duration::from_secs(2));
    let o = Command::new(common::VMFS)
        .args([
            "disk",
            "info",
            "--json",
            "--datastore",
            &ds.lun,
            "--state-dir",
            &b,
            "--lease-ms",
            "2000",
            "vm/d0.vmdk",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["layers"].as_array().unwrap().len(), 1, "{info}");
}

/// A `vmfs backup ...` command of the test's, unchecked.
fn vmfs_out(args: &[&str]) -> std::process::Output {
    Command::new(common::VMFS)
        .args(args)
        .env("VMFS_LOG", "warn")
        .output()
        .unwrap()
}

/// `backup attach` for third-party tools: the frozen disks as raw image
/// files (read by `cp --sparse` and `qemu-img`, holes kept) and over NBD
/// (`qemu-img convert nbd://`, `nbdcopy`, `qemu-img map` sees the holes);
/// no other job of the VM meanwhile; `detach` refused while a file is
/// open, then deletes the snapshots. An attach process killed (a proxy on
/// the LUNs): `detach` cleans up in its stead.
#[test]
fn attach_shows_the_frozen_disks_to_other_tools_and_detach_cleans_up() {
    let ds = Ds::new(1 << 30);
    // d0: data between 4 and 28 MiB of 32; d1: 8 MiB, all data.
    let mut raw0 = vec![0u8; 32 << 20];
    raw0[4 << 20..28 << 20].copy_from_slice(&vmfs_tests::pattern(11, 24 << 20));
    let raw1 = vmfs_tests::pattern(12, 8 << 20);
    std::fs::write(ds.p("in0.raw"), &raw0).unwrap();
    std::fs::write(ds.p("in1.raw"), &raw1).unwrap();
    let (d0, d1) = (ds.disk("d0.vmdk"), ds.disk("d1.vmdk"));
    ds.run(&["disk", "import", ds.p("in0.raw").to_str().unwrap(), &d0]);
    ds.run(&["disk", "import", ds.p("in1.raw").to_str().unwrap(), &d1]);
    // Served by host A (a controller; no guest needed).
    let vus = ds.p("vus.sock");
    ds.run(&["scsi", "add", "--socket", vus.to_str().unwrap(), &d0, &d1]);
    let exp = ds.p("exp");
    std::fs::create_dir(&exp).unwrap();
    let sock = ds.p("nbd.sock");
    let nbd = format!("unix:{}", sock.display());
    let a: serde_json::Value = serde_json::from_str(&ds.run(&[
        "backup",
        "attach",
        "--json",
        "--mountpoint",
        exp.to_str().unwrap(),
        "--nbd",
        &nbd,
        &d0,
        &d1,
    ]))
    .unwrap();
    let images = a["record"]["images"].as_array().unwrap();
    assert_eq!(images.len(), 2, "{a}");
    assert_eq!(images[0]["data"].as_u64(), Some(24 << 20), "{a}");
    let uri0 = images[0]["nbd"].as_str().unwrap().to_string();
    let uri1 = images[1]["nbd"].as_str().unwrap().to_string();
    assert!(uri0.starts_with("nbd+unix:///d0?socket="), "{uri0}");
    let f0 = exp.join("d0.img");
    assert!(std::fs::read(&f0).unwrap() == raw0, "d0.img differs");
    assert!(std::fs::read(exp.join("d1.img")).unwrap() == raw1);
    // cp --sparse keeps the holes.
    let c0 = ds.p("cp0.raw");
    let o = Command::new("cp")
        .arg("--sparse=always")
        .arg(&f0)
        .arg(&c0)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::read(&c0).unwrap() == raw0);
    assert!(allocated(c0.to_str().unwrap()) <= 25 << 20);
    // qemu-img over NBD, and its map of the export: the holes are known.
    let q0 = ds.p("q0.raw");
    let o = Command::new("qemu-img")
        .args(["convert", "-O", "raw", &uri0])
        .arg(&q0)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        std::fs::read(&q0).unwrap() == raw0,
        "qemu-img nbd copy differs"
    );
    let o = Command::new("qemu-img")
        .args(["map", "--output=json", &uri0])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let map: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(data, 24 << 20, "{map}");
    let n1 = ds.p("n1.raw");
    let o = Command::new("nbdcopy")
        .arg(&uri1)
        .arg(&n1)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::read(&n1).unwrap() == raw1, "nbdcopy differs");
    // Read-only.
    assert!(std::fs::OpenOptions::new().write(true).open(&f0).is_err());
    // No other job of the VM while attached.
    let o = vmfs_out(&[
        "backup",
        "attach",
        "--state-dir",
        &ds.st,
        "--mountpoint",
        ds.p("in0.raw").parent().unwrap().to_str().unwrap(),
        &d0,
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("is running"), "{}", text(&o));
    // Detach refused while an NBD client is connected, and while a file is
    // open; --force detaches all the same (the open file lets the image go).
    let detach = |force: bool| {
        let mut a = vec!["backup", "detach", "--state-dir", &ds.st];
        if force {
            a.push("--force");
        }
        a.push(exp.to_str().unwrap());
        vmfs_out(&a)
    };
    let client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let o = detach(false);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("NBD client"), "{}", text(&o));
    drop(client);
    std::thread::sleep(Duration::from_millis(200));
    let held = std::fs::File::open(&f0).unwrap();
    let o = detach(false);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("busy"), "{}", text(&o));
    assert!(common::mounted(&exp));
    let o = detach(true);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("deleted the snapshot"), "{}", text(&o));
    // (The open file may still read what the kernel cached; nothing more.)
    drop(held);
    assert!(!common::mounted(&exp));
    assert!(!sock.exists());
    for d in [&d0, &d1] {
        assert_eq!(disk_info(&ds, d)["layers"].as_array().unwrap().len(), 1);
        assert!(!Path::new(&format!("{d}.backup")).exists());
    }

    // A proxy on the LUNs (host B) attaches, and is killed.
    let b = ds.p("b").to_str().unwrap().to_string();
    let o = vmfs_out(&[
        "backup",
        "attach",
        "--datastore",
        &ds.lun,
        "--state-dir",
        &b,
        "--lease-ms",
        "2000",
        "--json",
        "--mountpoint",
        exp.to_str().unwrap(),
        "vm/d0.vmdk",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let a: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(std::fs::read(&f0).unwrap() == raw0);
    assert_eq!(disk_info(&ds, &d0)["layers"].as_array().unwrap().len(), 2);
    let pid = a["record"]["pid"].as_i64().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    let o = vmfs_out(&[
        "backup",
        "detach",
        "--state-dir",
        &b,
        "--lease-ms",
        "2000",
        exp.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("had died"), "{}", text(&o));
    assert!(!common::mounted(&exp));
    assert_eq!(disk_info(&ds, &d0)["layers"].as_array().unwrap().len(), 1);
    assert!(!Path::new(&format!("{d0}.backup")).exists());
    let o = vmfs_out(&["backup", "detach", "--state-dir", &b, exp.to_str().unwrap()]);
    assert!(
        !o.status.success() && text(&o).contains("nothing is attached"),
        "{}",
        text(&o)
    );
}

/// A proxy job (host B on the LUN; the disk served by host A) killed at
/// moments spread over a whole job: joining, asking A, reading, before and
/// while deleting its snapshot. Each time the next job succeeds, deletes
/// whatever the killed one left, and leaves no snapshot behind; the
/// repository verifies and lists no damaged backup.
#[test]
fn a_proxy_killed_at_any_moment_leaves_nothing_the_next_job_does_not_clean() {
    let ds = Ds::new(1 << 30);
    std::fs::write(ds.p("in.raw"), vmfs_tests::pattern(21, 256 << 20)).unwrap();
    let d0 = ds.disk("d0.vmdk");
    ds.run(&["disk", "import", ds.p("in.raw").to_str().unwrap(), &d0]);
    let vus = ds.p("vus.sock");
    ds.run(&["scsi", "add", "--socket", vus.to_str().unwrap(), &d0]);
    let repo = ds.p("repo");
    let r = repo.to_str().unwrap().to_string();
    backup_ok(&ds, &["init", "--repo", &r, "--chunk-size", "64K"]);
    let b = ds.p("b").to_str().unwrap().to_string();
    let lun = ds.lun.clone();
    // A new name each time: every job is a full one (it reads the disk).
    let proxy = |name: &str| {
        Command::new(common::VMFS)
            .args([
                "backup",
                "vm",
                "--repo",
                &r,
                "--name",
                name,
                "--datastore",
                &lun,
                "--state-dir",
                &b,
                "--lease-ms",
                "2000",
                "--json",
                "vm/d0.vmdk",
            ])
            .env("VMFS_BACKUP_CATALOG", ds.p("catalog.sqlite"))
            .env("VMFS_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Timed as the killed jobs will run: with the data in the repository.
    let o = proxy("first").wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let t = Instant::now();
    let o = proxy("whole").wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let whole = t.elapsed();
    eprintln!("a whole job: {whole:?}");
    let no_snapshot = |when: &str| {
        let info = disk_info(&ds, &d0);
        assert_eq!(
            info["layers"].as_array().unwrap().len(),
            1,
            "{when}: {info}"
        );
        assert!(!Path::new(&format!("{d0}.backup")).exists(), "{when}");
    };
    let mut cleaned = 0;
    for k in 1..=8u32 {
        let at = whole * k / 9;
        let mut c = proxy(&format!("killed{k}"));
        std::thread::sleep(at);
        common::signal(&c, libc::SIGKILL);
        let _ = c.wait();
        // A knows B dead a lease after its last heartbeat; the next job
        // joins as B again (the same state directory) meanwhile.
        let o = proxy(&format!("next{k}")).wait_with_output().unwrap();
        assert!(o.status.success(), "after a kill at {at:?}: {}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let n = v["cleaned"].as_array().map_or(0, |a| a.len());
        eprintln!("killed at {at:?}: the next job deleted {n} snapshot(s) left");
        cleaned += n;
        no_snapshot(&format!("after a kill at {at:?}"));
    }
    // Some kill landed while the snapshot existed.
    assert!(
        cleaned > 0,
        "no kill hit a snapshot: spread them differently"
    );
    let o = backup(&ds, &["verify", "--repo", &r]);
    assert!(o.status.success(), "verify: {}", text(&o));
    let o = backup(&ds, &["list", "--repo", &r, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let l: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(l["damaged"].as_array().map(|a| a.len()), Some(0), "{l}");
    let names: Vec<&str> = l["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    for k in 1..=8 {
        assert!(names.contains(&format!("next{k}").as_str()), "{names:?}");
    }

    // A job killed with its snapshot taken, and no next job: host A, which
    // serves the disk, deletes the snapshot on its own once it has seen
    // the job dead for a while (a VM whose backups stop grows no delta).
    let marker = format!("{d0}.backup");
    let mut c = proxy("abandoned");
    let t = Instant::now();
    while !Path::new(&marker).exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "no snapshot taken");
        std::thread::sleep(Duration::from_millis(10));
    }
    common::signal(&c, libc::SIGKILL);
    let _ = c.wait();
    let t = Instant::now();
    while Path::new(&marker).exists() {
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "host A left the snapshot of a dead job"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "host A deleted the abandoned snapshot after {:?}",
        t.elapsed()
    );
    no_snapshot("after host A's clean-up");
}
