//! POSIX behaviour of the FUSE mount, checked by the real tools: pjdfstest
//! (0 failures) and fsx (100,000 operations by default; FSX_OPS to change;
//! and 10,000 with writes up to 2 MiB).

use std::process::Command;

use vmfs::{Fs, MkfsOptions};
use vmfs_tests::*;

fn mounted(d: &std::path::Path) -> Mounted {
    let urls = vec![
        file_lun(d, "a.img", 512 << 20),
        file_lun(d, "b.img", 512 << 20),
    ];
    Fs::mkfs(open_luns(&urls), &MkfsOptions::default()).unwrap();
    Mounted::new(&urls, &d.join("mnt"))
}

/// Run pjdfstest in `m` and require 0 failures.
fn pjdfstest(m: &Mounted) {
    require("pjdfstest");
    let conf = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/pjdfstest.toml");
    let o = Command::new("pjdfstest")
        .arg("-c")
        .arg(conf)
        .arg("-p")
        .arg(&m.path)
        .current_dir(&m.path)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    let summary = out
        .lines()
        .rev()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or("no summary");
    println!("pjdfstest {summary}");
    let lines: Vec<&str> = out.lines().collect();
    let failed: Vec<String> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("FAILED"))
        .map(|(i, _)| lines[i..(i + 4).min(lines.len())].join("\n"))
        .collect();
    assert!(
        o.status.success() && summary.contains(" 0 failed"),
        "pjdfstest: {summary}\n{}",
        failed.join("\n")
    );
}

#[test]
fn pjdfstest_passes() {
    let d = tempfile::tempdir().unwrap();
    let m = mounted(d.path());
    pjdfstest(&m);
    m.unmount();
}

/// A datastore on an iSCSI LUN (tgt) and a file LUN: mkfs, mount,
/// pjdfstest, then fsck clean.
#[test]
fn pjdfstest_passes_on_iscsi_and_file_luns() {
    let d = tempfile::tempdir().unwrap();
    let mut tgt = Tgt::start(d.path());
    let urls = vec![
        tgt.add_lun("ds0", 512 << 20),
        file_lun(d.path(), "b.img", 512 << 20),
    ];
    Fs::mkfs(open_luns(&urls), &MkfsOptions::default()).unwrap();
    let m = Mounted::new(&urls, &d.path().join("mnt"));
    pjdfstest(&m);
    m.unmount();
    let fs = Fs::open(open_luns(&urls)).unwrap();
    let r = vmfs::fsck::check(&fs, false, None).unwrap();
    assert!(r.errors.is_empty(), "fsck: {:?}", r.errors);
}

/// Run fsx for `ops` operations on a file in `m` (with `config`, a toml
/// file of fsx's, if given) and require it to end A-OK.
fn fsx(m: &Mounted, scratch: &std::path::Path, ops: &str, config: Option<&std::path::Path>) {
    require("fsx");
    let mut c = Command::new("fsx");
    c.args(["-N", ops, "-S", "20261123", "-P"]).arg(scratch);
    if let Some(f) = config {
        c.arg("-f").arg(f);
    }
    let o = c.arg(m.path.join("fsx.file")).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && out.contains("All operations completed A-OK"),
        "fsx failed:\n{}",
        &out[out.len().saturating_sub(4000)..]
    );
}

#[test]
fn fsx_passes() {
    let d = tempfile::tempdir().unwrap();
    let m = mounted(d.path());
    let ops = std::env::var("FSX_OPS").unwrap_or_else(|_| "100000".into());
    fsx(&m, d.path(), &ops, None);
    m.unmount();
}

/// fsx with writes of up to 2 MiB at any offset in an 8 MiB file, and
/// fsync, fallocate, hole punching, copy_file_range and reopening mixed in.
/// On a file LUN the aligned middle of a large write goes to the LUN with
/// O_DIRECT while its head and tail, smaller writes and metadata go through
/// the page cache, so this checks the two never disagree about a byte. The
/// default fsx run above never writes more than 64 KiB at once. Then fsck is
/// clean.
#[test]
fn fsx_with_large_writes_passes() {
    let d = tempfile::tempdir().unwrap();
    let m = mounted(d.path());
    let conf = d.path().join("fsx.toml");
    std::fs::write(
        &conf,
        "flen = 8388608\n[opsize]\nmax = 2097152\n[weights]\nclose_open = 2.0\n\
         fsync = 2.0\nfdatasync = 2.0\nposix_fallocate = 2.0\npunch_hole = 2.0\n\
         copy_file_range = 2.0\n",
    )
    .unwrap();
    fsx(&m, d.path(), "10000", Some(&conf));
    m.unmount();
    let urls =
        [d.path().join("a.img"), d.path().join("b.img")].map(|p| p.to_str().unwrap().to_string());
    let fs = Fs::open(open_luns(&urls)).unwrap();
    let r = vmfs::fsck::check(&fs, false, None).unwrap();
    assert!(r.errors.is_empty(), "fsck: {:?}", r.errors);
}

/// Writes go through direct-I/O handles, where the kernel leaves set-ID
/// stripping to the filesystem. A write by a user without CAP_FSETID drops
/// set-user-ID, and set-group-ID when the file is group-executable (as a
/// local filesystem does); a write by root keeps them; nothing else in the
/// mode changes.
#[test]
fn unprivileged_write_drops_setid_bits() {
    use std::os::unix::fs::PermissionsExt;
    require("setpriv");
    let d = tempfile::tempdir().unwrap();
    let m = mounted(d.path());
    // (mode, written by nobody?, mode expected after the write)
    let cases = [
        (0o6777, true, 0o0777),
        (0o6767, true, 0o2767),
        (0o4707, true, 0o0707),
        (0o0777, true, 0o0777),
        (0o6777, false, 0o6777),
    ];
    for (k, &(mode, nobody, want)) in cases.iter().enumerate() {
        let f = m.path.join(format!("setid-{k}"));
        std::fs::write(&f, b"0123").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
        let append = format!("printf x >> '{}'", f.display());
        let mut c = if nobody {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "sh",
                "-c",
            ]);
            c
        } else {
            let mut c = Command::new("sh");
            c.arg("-c");
            c
        };
        let o = c.arg(&append).output().unwrap();
        assert!(o.status.success(), "{append}: {o:?}");
        // The kernel may keep the old attributes for up to the TTL.
        let t = std::time::Instant::now();
        let got = loop {
            let got = std::fs::metadata(&f).unwrap().permissions().mode() & 0o7777;
            if got == want || t.elapsed().as_millis() > 1500 {
                break got;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert_eq!(
            got,
            want,
            "{mode:o} written by {}",
            if nobody { "nobody" } else { "root" }
        );
        assert_eq!(std::fs::read(&f).unwrap(), b"0123x");
    }
    m.unmount();
}

/// A read-only handle reads through the page cache; a write handle does
/// direct I/O. On one host, the reader sees each write at once (the
/// kernel drops the cached pages a direct write covers), and a write
/// through a shared mapping of the write handle reaches the reader too.
#[test]
fn cached_reader_sees_direct_writes() {
    use std::os::unix::fs::FileExt;
    let d = tempfile::tempdir().unwrap();
    let m = mounted(d.path());
    let p = m.path.join("f");
    std::fs::write(&p, vec![1u8; 1 << 20]).unwrap();
    let r = std::fs::File::open(&p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    r.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 1));
    let w = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    w.write_all_at(&[2u8; 4096], 8192).unwrap();
    r.read_exact_at(&mut buf, 0).unwrap();
    assert!(
        buf[8192..12288].iter().all(|&b| b == 2),
        "stale cached page"
    );
    assert!(buf[..8192].iter().chain(&buf[12288..]).all(|&b| b == 1));
    // SAFETY: a shared mapping of 1 MiB of an open file, unmapped below.
    unsafe {
        use std::os::fd::AsRawFd;
        let a = libc::mmap(
            std::ptr::null_mut(),
            1 << 20,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            w.as_raw_fd(),
            0,
        );
        assert_ne!(a, libc::MAP_FAILED, "mmap of a write handle");
        std::ptr::write_bytes((a as *mut u8).add(65536), 3, 4096);
        assert_eq!(libc::msync(a, 1 << 20, libc::MS_SYNC), 0);
        libc::munmap(a, 1 << 20);
    }
    r.read_exact_at(&mut buf, 0).unwrap();
    assert!(
        buf[65536..69632].iter().all(|&b| b == 3),
        "mmap write not seen"
    );
    drop((r, w));
    m.unmount();
}
