//! One machine, one host: with a datastore mounted here, the other commands
//! go through the mount's control socket and act as its host (no second
//! slot); with nothing mounted they open the datastore themselves. The
//! socket survives no abuse: stale after kill -9, another datastore's,
//! garbage, huge lines, floods, and non-root clients.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{text, vmfs, Host};

const A: &str = "aaaaaaaa-0000-4000-8000-0000000000c1";

struct Setup {
    d: tempfile::TempDir,
    lun: String,
    st: String,
    mnt: PathBuf,
}

fn setup() -> Setup {
    let d = tempfile::tempdir().unwrap();
    let lun = vmfs_tests::file_lun(d.path(), "ds.img", 256 << 20);
    let o = vmfs(&["mkfs", "--block-size", "64K", &lun]);
    assert!(o.status.success(), "{}", text(&o));
    let st = d.path().join("state").to_str().unwrap().to_string();
    let mnt = d.path().join("m");
    std::fs::create_dir(&mnt).unwrap();
    Setup { d, lun, st, mnt }
}

fn mount(s: &Setup) -> Host {
    Host::mount(&["--host-uuid", A, "--state-dir", &s.st, &s.lun], &s.mnt)
}

fn ok(args: &[&str]) -> String {
    let o = vmfs(args);
    assert!(o.status.success(), "vmfs {args:?}: {}", text(&o));
    text(&o)
}

fn socket_of(st: &str) -> PathBuf {
    let run = Path::new(st).join("run");
    let mut socks: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    assert_eq!(socks.len(), 1, "{socks:?}");
    socks.pop().unwrap()
}

/// Lines of slots in `vmfs hosts` output.
fn slots(hosts: &str) -> Vec<&str> {
    hosts.lines().filter(|l| l.starts_with("slot ")).collect()
}

#[test]
fn commands_on_a_mounted_datastore_go_through_its_host() {
    let s = setup();
    let st = s.st.as_str();
    let mnt = s.mnt.to_str().unwrap();
    let mut tgt = vmfs_tests::Tgt::start(s.d.path());
    let raw = tgt.add_lun("agentraw", 16 << 20);
    let raw2 = tgt.add_lun("agentraw2", 16 << 20);
    let mut host = mount(&s);

    // status names the mount, its slot and host.
    let t = ok(&["status", "--state-dir", st]);
    assert!(
        t.contains(mnt) && t.contains(A) && t.contains("slot 0"),
        "{t}"
    );
    // info, hosts, locks by the LUN and by the mountpoint: the same host.
    for ds in [s.lun.as_str(), mnt] {
        let t = ok(&["info", "--state-dir", st, ds]);
        assert!(t.contains("slot 0: mounted"), "{t}");
        let t = ok(&["locks", "--state-dir", st, ds]);
        assert!(t.starts_with("locks by"), "{t}");
    }
    let t = ok(&["hosts", "--state-dir", st, mnt]);
    assert_eq!(slots(&t).len(), 1, "{t}");
    assert!(
        t.contains("live (heartbeat moving)") && t.contains(A),
        "{t}"
    );

    // rdm create by a path under the mountpoint and by the LUNs; rdm info
    // both ways. The mount makes them: visible at once through FUSE.
    ok(&[
        "rdm",
        "create",
        "--mode",
        "virtual",
        "--state-dir",
        st,
        &raw,
        &format!("{mnt}/db.vmdk"),
    ]);
    ok(&[
        "rdm",
        "create",
        "--mode",
        "physical",
        "--state-dir",
        st,
        &raw2,
        &s.lun,
        "/db2.vmdk",
    ]);
    assert_eq!(
        std::fs::metadata(s.mnt.join("db.vmdk")).unwrap().len(),
        16 << 20
    );
    assert_eq!(
        std::fs::metadata(s.mnt.join("db2.vmdk")).unwrap().len(),
        16 << 20
    );
    let t = ok(&["rdm", "info", "--state-dir", st, &format!("{mnt}/db.vmdk")]);
    assert!(
        t.contains("vmfsRawDeviceMap") && t.contains("identity and size match"),
        "{t}"
    );
    let t = ok(&["rdm", "info", "--state-dir", st, &s.lun, "db2.vmdk"]);
    assert!(t.contains("vmfsPassthroughRawDeviceMap"), "{t}");
    // Errors come back with the host's message.
    let o = vmfs(&[
        "rdm",
        "info",
        "--state-dir",
        st,
        &format!("{mnt}/nothing.vmdk"),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("nothing.vmdk"), "{}", text(&o));

    // extend by the mountpoint (a relative LUN path: the host sees it too).
    let l2 = vmfs_tests::file_lun(s.d.path(), "ext.img", 128 << 20);
    let rel = Path::new(&l2)
        .strip_prefix(std::env::current_dir().unwrap())
        .map(|p| p.to_str().unwrap().to_string())
        .unwrap_or(l2.clone());
    let t = ok(&["extend", "--state-dir", st, mnt, "--add", &rel]);
    assert!(t.contains("2 extents"), "{t}");
    let t = ok(&["info", "--state-dir", st, mnt]);
    assert!(t.contains("extents     2"), "{t}");

    // Still one host: no second slot was taken by any command.
    let t = ok(&["hosts", "--state-dir", st, &s.lun]);
    assert_eq!(slots(&t).len(), 1, "{t}");
    let sock = socket_of(st);
    host.unmount().unwrap();
    assert!(!sock.exists(), "the socket outlived its host");

    // Nothing mounted: the same commands open the datastore themselves.
    let t = ok(&["status", "--state-dir", st]);
    assert!(t.contains("hosts no datastore"), "{t}");
    let t = ok(&["info", "--state-dir", st, &s.lun, &l2]);
    assert!(t.contains("extents     2"), "{t}");
    ok(&["locks", "--state-dir", st, &s.lun, &l2]);
    let t = ok(&["hosts", "--state-dir", st, &s.lun, &l2]);
    assert!(t.contains("free"), "{t}");
    let t = ok(&["rdm", "info", "--state-dir", st, &s.lun, &l2, "db.vmdk"]);
    assert!(t.contains("identity and size match"), "{t}");
    let l3 = vmfs_tests::file_lun(s.d.path(), "ext3.img", 64 << 20);
    let t = ok(&["extend", "--state-dir", st, &s.lun, &l2, "--add", &l3]);
    assert!(t.contains("3 extents"), "{t}");
    let o = vmfs(&["fsck", &s.lun, &l2, &l3]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // A directory outside any mount is not a datastore.
    let o = vmfs(&["info", "--state-dir", st, s.d.path().to_str().unwrap()]);
    assert!(text(&o).contains("not under a vmfs mount"), "{}", text(&o));
}

#[test]
fn a_stale_socket_after_kill_is_replaced_and_never_trusted() {
    let s = setup();
    let st = s.st.as_str();
    let mut host = mount(&s);
    let sock = socket_of(st);
    host.kill();
    assert!(sock.exists());
    // Nobody listens: the command opens the datastore itself.
    let t = ok(&["info", "--state-dir", st, &s.lun]);
    assert!(t.contains("volume"), "{t}");
    let t = ok(&["status", "--state-dir", st]);
    assert!(t.contains("hosts no datastore"), "{t}");
    // A new mount replaces the stale socket.
    let mut host = mount(&s);
    let t = ok(&["status", "--state-dir", st]);
    assert!(t.contains(&format!("pid {}", host.child.id())), "{t}");
    // A second mount of the same datastore in the same state directory
    // is refused: one host per machine.
    let m2 = s.d.path().join("m2");
    std::fs::create_dir(&m2).unwrap();
    let o = vmfs(&[
        "mount",
        "--foreground",
        "--host-uuid",
        "aaaaaaaa-0000-4000-8000-0000000000c2",
        "--state-dir",
        st,
        "--lease-ms",
        "2000",
        &s.lun,
        m2.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("already hosts datastore"), "{}", text(&o));
    host.unmount().unwrap();
}

#[test]
fn a_socket_that_answers_for_another_datastore_is_refused() {
    let s = setup();
    let st = s.st.as_str();
    let mut host = mount(&s);
    // Another datastore, not mounted; a socket under its name that leads to
    // the first datastore's host.
    let other = vmfs_tests::file_lun(s.d.path(), "other.img", 64 << 20);
    let o = vmfs(&["mkfs", &other]);
    assert!(o.status.success(), "{}", text(&o));
    let t = ok(&["info", &other]);
    let uuid = t
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    let fake = Path::new(st).join("run").join(format!("{uuid}.sock"));
    std::fs::hard_link(socket_of(st), &fake).unwrap();
    let o = vmfs(&["info", "--state-dir", st, &other]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("answers for datastore"), "{}", text(&o));
    std::fs::remove_file(&fake).unwrap();
    host.unmount().unwrap();
}

/// A raw client of the control socket.
struct Raw {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Raw {
    fn connect(p: &Path) -> Raw {
        Raw::try_connect(p).unwrap_or_else(|g| panic!("{g}"))
    }
    /// Err(the line) when the host answers with an error, not a greeting.
    fn try_connect(p: &Path) -> Result<Raw, String> {
        let w = UnixStream::connect(p).unwrap();
        w.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let r = BufReader::new(w.try_clone().unwrap());
        let mut c = Raw { w, r };
        let g = c.line();
        if g.contains("\"vmfs-host\"") && g.contains("\"protocol\":1") {
            Ok(c)
        } else {
            Err(g)
        }
    }
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        l
    }
    fn ask(&mut self, req: &[u8]) -> String {
        self.w.write_all(req).unwrap();
        self.w.write_all(b"\n").unwrap();
        self.line()
    }
}

#[test]
fn garbage_on_the_socket_gets_error_replies_and_the_host_lives_on() {
    let s = setup();
    let mut host = mount(&s);
    let sock = socket_of(&s.st);
    let mut c = Raw::connect(&sock);
    let cases: &[(&[u8], &str)] = &[
        (b"hello", "BadRequest"),
        (b"{\"protocol\":1}", "BadRequest"),
        (
            b"{\"protocol\":1,\"command\":\"frobnicate\"}",
            "UnknownCommand",
        ),
        (b"{\"protocol\":2,\"command\":\"info\"}", "VersionMismatch"),
        (b"{\"command\":\"info\"}", "VersionMismatch"),
        (b"{\"protocol\":1,\"command\":[1,2]}", "BadRequest"),
        (
            b"{\"protocol\":1,\"command\":\"rdm-info\",\"arguments\":{\"path\":7}}",
            "BadRequest",
        ),
        (
            b"{\"protocol\":1,\"command\":\"rdm-info\",\"arguments\":{}}",
            "BadRequest",
        ),
        (
            b"{\"protocol\":1,\"command\":\"info\",\"arguments\":{\"x\":1}}",
            "BadRequest",
        ),
        (
            b"{\"protocol\":1,\"command\":\"rdm-info\",\"arguments\":{\"path\":\"nope\"}}",
            "NotFound",
        ),
        (b"\xff\xfe\x00", "BadRequest"),
    ];
    for (req, class) in cases {
        let r = c.ask(req);
        assert!(
            r.contains(&format!("\"class\":\"{class}\"")),
            "{} -> {r}",
            String::from_utf8_lossy(req)
        );
    }
    let r = c.ask(b"{\"protocol\":1,\"command\":\"info\",\"id\":\"x1\"}");
    assert!(
        r.contains("\"return\"") && r.contains("\"id\":\"x1\""),
        "{r}"
    );
    // A line of 2 MiB: an error, and the connection is closed.
    let mut huge = vec![b'a'; 2 << 20];
    huge.push(b'\n');
    c.w.write_all(&huge).unwrap_or(());
    let r = c.line();
    assert!(r.contains("longer than"), "{r}");
    let mut rest = String::new();
    let _ = c.r.read_to_string(&mut rest);
    // Silent clients and a flood of connections hold nobody up.
    let silent: Vec<_> = (0..8)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let flood: Vec<_> = (0..40)
        .filter_map(|_| UnixStream::connect(&sock).ok())
        .collect();
    drop(flood);
    let t = Instant::now();
    let mut c = loop {
        // Over the limit the host says so (class Busy); connections being
        // torn down count against it for a moment.
        match Raw::try_connect(&sock) {
            Ok(mut c) => {
                let r = c.ask(b"{\"protocol\":1,\"command\":\"status\"}");
                assert!(r.contains("\"return\""), "{r}");
                break c;
            }
            Err(g) => {
                assert!(g.contains("\"class\":\"Busy\""), "{g}");
                assert!(t.elapsed() < Duration::from_secs(10), "{g}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let r = c.ask(b"{\"protocol\":1,\"command\":\"locks\"}");
    assert!(r.contains("\"return\""), "{r}");
    drop(silent);
    // The mount still serves files.
    std::fs::write(s.mnt.join("f"), b"still here").unwrap();
    assert_eq!(std::fs::read(s.mnt.join("f")).unwrap(), b"still here");
    host.unmount().unwrap();
}

#[test]
fn a_non_root_client_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let s = setup();
    std::fs::set_permissions(s.d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut host = mount(&s);
    let nobody = |args: &[&str]| {
        let mut c = Command::new(common::VMFS);
        c.args(args).env("VMFS_LOG", "warn");
        // SAFETY: setgid/setuid in the child before exec.
        unsafe {
            c.pre_exec(|| {
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c.output().unwrap()
    };
    for args in [
        vec!["status", "--state-dir", &s.st],
        vec!["info", "--state-dir", &s.st, s.mnt.to_str().unwrap()],
    ] {
        let o = nobody(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(text(&o).contains("root"), "{args:?}: {}", text(&o));
    }
    // Even with the socket opened to everyone, the host checks the
    // client's credentials and refuses it.
    let sock = socket_of(&s.st);
    for p in [Path::new(&s.st), &Path::new(&s.st).join("run"), &sock] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let o = Command::new("python3")
        .args([
            "-c",
            "import os,socket,sys\nos.setgid(65534); os.setuid(65534)\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\nprint(s.makefile().readline())",
            sock.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let t = text(&o);
    assert!(
        t.contains("PermissionDenied") && t.contains("root only"),
        "{t}"
    );
    // Root still gets in.
    let t = ok(&["status", "--state-dir", &s.st]);
    assert!(t.contains("slot 0"), "{t}");
    host.unmount().unwrap();
}
