//! `vmfs mkfs` and `vmfs extend --add` never destroy what a LUN holds by
//! mistake: a datastore, a filesystem, a partition table, swap are refused
//! unless --force, a datastore some host uses is refused always, and a
//! refused run writes nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{text, vmfs, Host};

fn img(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// FNV-1a of each 4 KiB block of a file.
fn blocks(p: &Path) -> Vec<u64> {
    std::fs::read(p)
        .unwrap()
        .chunks(4096)
        .map(|c| {
            c.iter().fold(0xcbf29ce484222325u64, |h, &b| {
                (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
            })
        })
        .collect()
}

/// The 4 KiB blocks that differ between two digests, for messages.
fn changed(a: &[u64], b: &[u64]) -> Vec<usize> {
    (0..a.len().max(b.len()))
        .filter(|&i| a.get(i) != b.get(i))
        .collect()
}

fn run(cmd: &str, args: &[&str]) {
    vmfs_tests::require(cmd);
    let o = Command::new(cmd).args(args).output().unwrap();
    assert!(o.status.success(), "{cmd} {args:?}: {}", text(&o));
}

/// What `blkid -p` (util-linux, independent of our code) sees on a file.
fn blkid_type(p: &Path) -> String {
    vmfs_tests::require("blkid");
    let o = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE", s(p)])
        .output()
        .unwrap();
    let o2 = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "PTTYPE", s(p)])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout).trim(),
        String::from_utf8_lossy(&o2.stdout).trim()
    )
}

/// Refused, with `want` in the message, and the file unchanged.
fn refused(args: &[&str], lun: &Path, want: &[&str]) {
    let before = blocks(lun);
    let o = vmfs(args);
    assert!(
        !o.status.success(),
        "{args:?} must be refused: {}",
        text(&o)
    );
    for w in want {
        assert!(text(&o).contains(w), "{args:?}: no {w:?} in: {}", text(&o));
    }
    assert!(
        text(&o).contains(s(lun).rsplit('/').next().unwrap()),
        "the message names the LUN: {}",
        text(&o)
    );
    let after = blocks(lun);
    assert!(
        before == after,
        "{args:?} wrote to {}: blocks {:?}",
        lun.display(),
        changed(&before, &after)
    );
}

#[test]
fn mkfs_refuses_what_a_lun_holds_unless_forced() {
    let d = tempfile::tempdir().unwrap();

    // One of our datastores, unmounted.
    let a = img(d.path(), "a.img", 64 << 20);
    assert!(vmfs(&["mkfs", "--label", "old", s(&a)]).status.success());
    refused(
        &["mkfs", s(&a)],
        &a,
        &["holds extent 0 of 1 of datastore", "\"old\"", "--force"],
    );
    let o = vmfs(&["mkfs", "--force", "--label", "new", s(&a)]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&vmfs(&["info", s(&a)])).contains("new"));

    // A Linux filesystem: ext4, then xfs.
    let e = img(d.path(), "ext4.img", 64 << 20);
    run("mkfs.ext4", &["-q", "-F", "-L", "homes", s(&e)]);
    refused(&["mkfs", s(&e)], &e, &["ext4", "filesystem", "homes"]);
    let o = vmfs(&["mkfs", "--force", s(&e)]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        blkid_type(&e),
        "",
        "the forced mkfs wipes the old signature"
    );
    assert_eq!(vmfs(&["fsck", s(&e)]).status.code(), Some(0));

    let x = img(d.path(), "xfs.img", 320 << 20);
    run("mkfs.xfs", &["-q", "-f", s(&x)]);
    refused(&["mkfs", s(&x)], &x, &["xfs"]);

    // A GPT partition table (protective MBR, header, backup at the end).
    let g = img(d.path(), "gpt.img", 64 << 20);
    vmfs_tests::require("sfdisk");
    let mut c = Command::new("sfdisk")
        .args(["-q", s(&g)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin
        .take()
        .unwrap()
        .write_all(b"label: gpt\n,32M\n")
        .unwrap();
    assert!(c.wait().unwrap().success());
    refused(&["mkfs", s(&g)], &g, &["gpt", "partition table"]);

    // Swap, as the second LUN of two: nothing is written to either.
    let w = img(d.path(), "swap.img", 64 << 20);
    let fresh = img(d.path(), "fresh.img", 64 << 20);
    run("mkswap", &[s(&w)]);
    let before = blocks(&fresh);
    refused(&["mkfs", s(&fresh), s(&w)], &w, &["swap"]);
    assert!(before == blocks(&fresh), "the empty LUN was written");

    // extend --add: the same rules for the new LUN.
    let ds = img(d.path(), "ds.img", 64 << 20);
    assert!(vmfs(&["mkfs", s(&ds)]).status.success());
    let e2 = img(d.path(), "ext4b.img", 64 << 20);
    run("mkfs.ext4", &["-q", "-F", s(&e2)]);
    let dsb = blocks(&ds);
    refused(&["extend", s(&ds), "--add", s(&e2)], &e2, &["ext4"]);
    assert!(
        dsb == blocks(&ds),
        "a refused extend wrote to the datastore"
    );
    refused(
        &["extend", s(&ds), "--add", s(&a)],
        &a,
        &["datastore", "\"new\""],
    );
    let o = vmfs(&["extend", s(&ds), "--add", s(&e2), "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(blkid_type(&e2), "");
    assert_eq!(vmfs(&["fsck", s(&ds), s(&e2)]).status.code(), Some(0));
}

#[test]
fn mkfs_refuses_luns_it_cannot_read() {
    let d = tempfile::tempdir().unwrap();
    let tiny = d.path().join("tiny.img");
    std::fs::write(&tiny, [7u8; 1000]).unwrap();
    refused(&["mkfs", s(&tiny)], &tiny, &["only 1000 bytes"]);
    refused(&["mkfs", "--force", s(&tiny)], &tiny, &["only 1000 bytes"]);
    let o = vmfs(&["mkfs", s(&d.path().join("nonexistent.img"))]);
    assert!(
        !o.status.success() && text(&o).contains("nonexistent.img"),
        "{}",
        text(&o)
    );

    // A LUN whose reads fail: nbdkit's error filter over an empty disk.
    vmfs_tests::require("nbdkit");
    let sock = d.path().join("err.sock");
    let mut srv = Command::new("nbdkit")
        .args([
            "-f",
            "-U",
            s(&sock),
            "--filter=error",
            "memory",
            "64M",
            "error-pread-rate=100%",
            "error=EIO",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !sock.exists() && t.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let url = format!("nbd+unix:///?socket={}", s(&sock));
    let o = vmfs(&["mkfs", &url]);
    let _ = srv.kill();
    let _ = srv.wait();
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("err.sock"),
        "the message names the LUN: {}",
        text(&o)
    );
}

/// The blocks of extent 0 that only the mounted host's heartbeat changes:
/// slot sectors right after the 4 KiB header (64 slots of 512 bytes).
fn without_heartbeats(mut b: Vec<u64>) -> Vec<u64> {
    for x in b.iter_mut().skip(1).take(8) {
        *x = 0;
    }
    b
}

#[test]
fn mkfs_and_extend_refuse_a_datastore_in_use_even_forced() {
    let d = tempfile::tempdir().unwrap();
    let a = img(d.path(), "a.img", 64 << 20);
    let b = img(d.path(), "b.img", 64 << 20);
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    assert!(vmfs(&["mkfs", "--label", "live", s(&a), s(&b)])
        .status
        .success());
    let mut host = Host::mount(
        &["--state-dir", s(&d.path().join("st")), s(&a), s(&b)],
        &mnt,
    );
    std::fs::write(mnt.join("important.txt"), b"hello\n").unwrap();
    std::fs::File::open(mnt.join("important.txt"))
        .unwrap()
        .sync_all()
        .unwrap();
    // Let the commit and any write-behind settle.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (da, db) = (without_heartbeats(blocks(&a)), blocks(&b));

    // Not forced, forced, forced over the second extent alone (the first is
    // found by its URL), and as a LUN for another datastore's extend.
    let other = img(d.path(), "other.img", 64 << 20);
    assert!(vmfs(&["mkfs", s(&other)]).status.success());
    for args in [
        vec!["mkfs", "--lease-ms", "800", s(&a), s(&b)],
        vec!["mkfs", "--force", "--lease-ms", "800", s(&a), s(&b)],
        vec!["mkfs", "--force", "--lease-ms", "800", s(&b)],
        vec![
            "extend",
            s(&other),
            "--add",
            s(&b),
            "--force",
            "--lease-ms",
            "800",
        ],
    ] {
        let o = vmfs(&args);
        assert!(!o.status.success(), "{args:?}: {}", text(&o));
        assert!(
            text(&o).contains("is in use")
                && text(&o).contains("(slot 0)")
                && text(&o).contains("\"live\""),
            "{args:?}: the live host is named: {}",
            text(&o)
        );
        let (na, nb) = (without_heartbeats(blocks(&a)), blocks(&b));
        assert!(da == na, "{args:?} wrote to a.img: {:?}", changed(&da, &na));
        assert!(db == nb, "{args:?} wrote to b.img: {:?}", changed(&db, &nb));
    }

    // The mounted host never noticed: it still reads and writes.
    assert!(
        host.child.try_wait().unwrap().is_none(),
        "the mount process died"
    );
    assert_eq!(
        std::fs::read(mnt.join("important.txt")).unwrap(),
        b"hello\n"
    );
    std::fs::write(mnt.join("after.txt"), b"still here\n").unwrap();
    assert_eq!(
        std::fs::read(mnt.join("after.txt")).unwrap(),
        b"still here\n"
    );
    host.unmount().unwrap();
    let o = vmfs(&["fsck", s(&a), s(&b)]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    // Unmounted now: forced, it goes through.
    let o = vmfs(&["mkfs", "--force", "--lease-ms", "800", s(&a), s(&b)]);
    assert!(o.status.success(), "{}", text(&o));
}
