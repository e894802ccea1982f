//! The `vmfs` command as a user runs it: exit codes, messages, and corruption
//! of every metadata kind reported clearly without writing to the volume.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{digest, mounted, text, vmfs, VMFS};

fn img(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

#[test]
fn help_everywhere() {
    for sub in [
        &["--help"][..],
        &["mkfs", "--help"],
        &["info", "--help"],
        &["fsck", "--help"],
        &["mount", "--help"],
        &["extend", "--help"],
    ] {
        let o = vmfs(sub);
        assert!(o.status.success(), "{sub:?}: {}", text(&o));
        assert!(text(&o).contains("Usage"), "{sub:?}");
    }
}

#[test]
fn mkfs_info_fsck_extend() {
    let d = tempfile::tempdir().unwrap();
    let a = img(d.path(), "a.img", 64 << 20);
    let b = img(d.path(), "b.img", 64 << 20);
    let c = img(d.path(), "c.img", 32 << 20);
    let (a, b, c) = (
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        c.to_str().unwrap(),
    );
    let o = vmfs(&[
        "mkfs",
        "--label",
        "ds",
        "--max-hosts",
        "1024",
        a,
        &format!("file://{b}"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = vmfs(&["info", a, b]);
    assert!(
        o.status.success()
            && text(&o).contains("ds")
            && text(&o).contains("extents     2")
            && text(&o).contains("1024"),
        "{}",
        text(&o)
    );
    assert_eq!(vmfs(&["fsck", a, b]).status.code(), Some(0));
    // Missing, reordered, doubled.
    let o = vmfs(&["fsck", a]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("missing extent 1"), "{}", text(&o));
    let o = vmfs(&["info", b, a]);
    assert!(
        !o.status.success() && text(&o).contains("position 0"),
        "{}",
        text(&o)
    );
    let o = vmfs(&["extend", a, b, "--add", c]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&vmfs(&["info", a, b, c])).contains("extents     3"));
    let o = vmfs(&["extend", a, b, c, "--add", a]);
    assert!(
        !o.status.success(),
        "extending with one of its own extents must fail"
    );
    assert_eq!(vmfs(&["fsck", a, b, c]).status.code(), Some(0));
    // Bad arguments say what is wrong.
    let o = vmfs(&["mkfs", "--block-size", "3M", a]);
    assert!(
        !o.status.success() && text(&o).contains("power of two"),
        "{}",
        text(&o)
    );
    let o = vmfs(&["info", "nbd+unix:///x"]);
    assert!(
        !o.status.success() && text(&o).contains("socket"),
        "{}",
        text(&o)
    );
}

#[test]
fn truncated_lun_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let a = img(d.path(), "a.img", 64 << 20);
    let b = img(d.path(), "b.img", 64 << 20);
    let (sa, sb) = (a.to_str().unwrap(), b.to_str().unwrap());
    assert!(vmfs(&["mkfs", sa, sb]).status.success());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&b)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    let before = (digest(&a), digest(&b));
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    for args in [
        vec!["fsck", sa, sb],
        vec!["mount", "--foreground", sa, sb, mnt.to_str().unwrap()],
    ] {
        let o = vmfs(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(
            text(&o).contains("truncated") && text(&o).contains("b.img"),
            "{}",
            text(&o)
        );
    }
    assert_eq!(
        before,
        (digest(&a), digest(&b)),
        "a refused volume was written to"
    );
}

/// Flip bytes in each kind of metadata: fsck and mount report it by name,
/// LUN and offset, exit non-zero, never panic, and write nothing.
#[test]
fn corruption_of_every_metadata_kind() {
    let d = tempfile::tempdir().unwrap();
    let a = img(d.path(), "a.img", 64 << 20);
    let b = img(d.path(), "b.img", 64 << 20);
    let (sa, sb) = (a.to_str().unwrap(), b.to_str().unwrap());
    assert!(vmfs(&["mkfs", sa, sb]).status.success());
    let objects = {
        let luns = vec![lun::open(sa).unwrap(), lun::open(sb).unwrap()];
        let fs = vmfs::Fs::open(luns).unwrap();
        use vmfs::format::*;
        let f = fs
            .create(fs.root(), b"file", S_IFREG | 0o644, 0, 0, 0, None)
            .unwrap();
        fs.write(f.addr, 0, b"hello").unwrap();
        // Far enough out to need a pointer block.
        let s = fs
            .create(fs.root(), b"sparse", S_IFREG | 0o644, 0, 0, 0, None)
            .unwrap();
        fs.write(s.addr, 300 << 20, b"far").unwrap();
        fs.create(fs.root(), b"dir", S_IFDIR | 0o755, 0, 0, 0, None)
            .unwrap();
        fs.sync().unwrap();
        vmfs::fsck::locate_objects(&fs).unwrap()
    };
    let kinds: Vec<_> = objects.iter().map(|o| o.0).collect();
    for k in [
        "volume header",
        "file-block cluster",
        "resource table",
        "resource cluster",
        "directory header",
        "directory bucket",
        "file descriptor",
        "pointer block",
    ] {
        assert!(kinds.contains(&k), "no {k} located: {kinds:?}");
    }
    assert_eq!(vmfs(&["fsck", sa, sb]).status.code(), Some(0));
    let pristine = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    for (kind, ext, off) in objects {
        std::fs::write(&a, &pristine.0).unwrap();
        std::fs::write(&b, &pristine.1).unwrap();
        let target = if ext == 0 { &a } else { &b };
        let mut bytes = std::fs::read(target).unwrap();
        for k in [40usize, 41, 300] {
            bytes[off as usize + k] ^= 0x5a;
        }
        std::fs::write(target, &bytes).unwrap();
        let before = (digest(&a), digest(&b));
        let o = vmfs(&["fsck", sa, sb]);
        let t = text(&o);
        assert!(
            matches!(o.status.code(), Some(1) | Some(2)),
            "{kind}: fsck exit {:?}: {t}",
            o.status.code()
        );
        assert!(
            t.contains("checksum") || t.contains("corrupt"),
            "{kind}: {t}"
        );
        let where_ = if ext == 0 { "a.img" } else { "b.img" };
        assert!(
            t.contains(where_) && t.contains(&off.to_string())
                || t.contains(where_) && t.contains("offset"),
            "{kind}: message does not name LUN and offset: {t}"
        );
        assert_eq!(
            before,
            (digest(&a), digest(&b)),
            "{kind}: fsck without --repair wrote to the volume"
        );
        // Structures needed to open the volume make mount fail up front.
        if [
            "volume header",
            "file-block cluster",
            "resource table",
            "resource cluster",
            "directory header",
        ]
        .contains(&kind)
        {
            let o = vmfs(&["mount", "--foreground", sa, sb, mnt.to_str().unwrap()]);
            assert_eq!(o.status.code(), Some(2), "{kind}: mount: {}", text(&o));
            assert_eq!(
                before,
                (digest(&a), digest(&b)),
                "{kind}: a refused mount wrote to the volume"
            );
        }
    }
}

#[test]
fn repair_fixes_leaks_and_link_counts() {
    let d = tempfile::tempdir().unwrap();
    let a = img(d.path(), "a.img", 64 << 20);
    let sa = a.to_str().unwrap();
    assert!(vmfs(&["mkfs", sa]).status.success());
    {
        use vmfs::format::*;
        let fs = vmfs::Fs::open(vec![lun::open(sa).unwrap()]).unwrap();
        let f = fs
            .create(fs.root(), b"f", S_IFREG | 0o644, 0, 0, 0, None)
            .unwrap();
        fs.write(f.addr, 0, &vec![7u8; 3 << 20]).unwrap();
        // Damage consistently (checksums valid): wrong link count, leaked block.
        vmfs::testing::op(&fs, |st, vol| {
            let mut i = st.iget(vol, f.addr)?;
            i.nlink = 5;
            st.iput(vol, &i)?;
            st.alloc.alloc_fb(vol, &mut st.meta)?;
            Ok(())
        })
        .unwrap();
        fs.sync().unwrap();
    }
    let o = vmfs(&["fsck", sa]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("link count 5") && text(&o).contains("leaked"),
        "{}",
        text(&o)
    );
    let o = vmfs(&["fsck", "--repair", sa]);
    assert!(text(&o).contains("repaired"), "{}", text(&o));
    let o = vmfs(&["fsck", sa]);
    assert_eq!(o.status.code(), Some(0), "after repair: {}", text(&o));
}

/// A foreground mount stops cleanly on SIGTERM and on SIGINT: unmounted,
/// data flushed, fsck clean.
#[test]
fn signals_unmount_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let a = img(d.path(), "a.img", 64 << 20);
    let sa = a.to_str().unwrap();
    assert!(vmfs(&["mkfs", sa]).status.success());
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    for (k, sig) in [libc::SIGTERM, libc::SIGINT].into_iter().enumerate() {
        let mut child = Command::new(VMFS)
            .args(["mount", "--foreground", sa, mnt.to_str().unwrap()])
            .env("VMFS_LOG", "warn")
            .spawn()
            .unwrap();
        let t = std::time::Instant::now();
        while !mounted(&mnt) {
            assert!(t.elapsed().as_secs() < 20, "mount did not appear");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::fs::write(mnt.join(format!("f{k}")), vec![k as u8 + 1; 2 << 20]).unwrap();
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let st = child.wait().unwrap();
        assert!(st.success(), "signal {sig}: exit {st}");
        assert!(!mounted(&mnt), "still mounted after signal {sig}");
    }
    let o = vmfs(&["fsck", sa]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let fs = vmfs::Fs::open(vec![lun::open(sa).unwrap()]).unwrap();
    for k in 0..2u8 {
        let i = fs.lookup(fs.root(), format!("f{k}").as_bytes()).unwrap();
        assert_eq!(fs.read(i.addr, 0, 2 << 20).unwrap(), vec![k + 1; 2 << 20]);
    }
}

/// An NBD "server" that answers garbage, one that hangs up mid-handshake,
/// and one that is not there: fsck and mount exit 2 with a clear message.
#[test]
fn broken_nbd_servers_are_clear_errors() {
    use std::io::Write;
    let d = tempfile::tempdir().unwrap();
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    for (k, reply) in [&b"HTTP/1.1 400 Bad Request\r\n\r\n"[..], &b"NBDMAGIC"[..]]
        .into_iter()
        .enumerate()
    {
        let sock = d.path().join(format!("s{k}.sock"));
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let reply = reply.to_vec();
        std::thread::spawn(move || {
            for c in l.incoming().take(2) {
                let mut c = c.unwrap();
                let _ = c.write_all(&reply);
            }
        });
        let url = format!("nbd+unix:///x?socket={}", sock.display());
        for args in [
            vec!["fsck", url.as_str()],
            vec!["mount", "--foreground", url.as_str(), mnt.to_str().unwrap()],
        ] {
            let o = vmfs(&args);
            let t = text(&o);
            assert_eq!(o.status.code(), Some(2), "{args:?}: {t}");
            assert!(
                t.contains("NBD") || t.contains("connection"),
                "{args:?}: {t}"
            );
            assert!(
                t.contains(&sock.display().to_string()),
                "message names the LUN: {t}"
            );
        }
    }
    let o = vmfs(&[
        "info",
        &format!("nbd+unix:///x?socket={}/absent.sock", d.path().display()),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("cannot connect"), "{}", text(&o));
}

/// An error says its cause once, and logs to a pipe carry no colour codes.
#[test]
fn messages_say_the_cause_once_and_logs_have_no_colour_in_a_pipe() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("nonexistent.img");
    let o = vmfs(&["mkfs", missing.to_str().unwrap()]);
    assert!(!o.status.success());
    assert_eq!(
        text(&o).matches("No such file or directory").count(),
        1,
        "{}",
        text(&o)
    );
    let a = img(d.path(), "a.img", 64 << 20);
    assert!(vmfs(&["mkfs", a.to_str().unwrap()]).status.success());
    let o = Command::new(VMFS)
        .args(["mkfs", "--force", a.to_str().unwrap()])
        .env("VMFS_LOG", "info")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("overwriting"), "{}", text(&o));
    assert!(
        !text(&o).contains('\u{1b}'),
        "ANSI codes in: {:?}",
        text(&o)
    );
}
