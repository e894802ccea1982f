//! The NBD client against real servers: qemu-nbd and nbdkit, started here on
//! UNIX sockets and on loopback TCP.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lun::{Lun, LunError};

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(path: &std::path::Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "server socket {} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn require(bin: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{bin} is not installed: .ci/run installs it (apt-get install qemu-utils nbdkit)"
    );
}

fn qemu_nbd(dir: &std::path::Path, size: u64) -> (Server, String) {
    let img = dir.join("q.img");
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    serve_image(dir, &img)
}

/// qemu-nbd serving an existing image on `dir/q.sock`.
fn serve_image(dir: &std::path::Path, img: &std::path::Path) -> (Server, String) {
    require("qemu-nbd");
    let sock = dir.join("q.sock");
    let _ = std::fs::remove_file(&sock);
    let child = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-x",
            "disk",
            "-t",
            "--cache=none",
            "--aio=threads",
            "-k",
        ])
        .arg(&sock)
        .arg(img)
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_for(&sock);
    (
        Server(child),
        format!("nbd+unix:///disk?socket={}", sock.display()),
    )
}

fn exercise(lun: &Arc<dyn Lun>) {
    let size = lun.size();
    assert!(size >= 8 << 20);
    // Many writes in flight from many threads; then read back.
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let lun = lun.clone();
            std::thread::spawn(move || {
                for i in 0..32u64 {
                    let off = (u64::from(t) * 32 + i) * 16384;
                    lun.write_at(&vec![t ^ i as u8; 16384], off).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    lun.flush().unwrap();
    for t in 0..8u8 {
        for i in 0..32u64 {
            let off = (u64::from(t) * 32 + i) * 16384;
            let mut b = vec![0u8; 16384];
            lun.read_at(&mut b, off).unwrap();
            assert!(b.iter().all(|&x| x == t ^ i as u8), "thread {t} block {i}");
        }
    }
    // A read larger than one request; zeroes; out-of-range.
    let mut big = vec![1u8; 5 << 20];
    lun.read_at(&mut big, 0).unwrap();
    lun.write_zeroes(0, 1 << 20, false).unwrap();
    let mut z = vec![1u8; 1 << 20];
    lun.read_at(&mut z, 0).unwrap();
    assert!(z.iter().all(|&x| x == 0));
    assert!(matches!(
        lun.read_at(&mut z, size - 10),
        Err(LunError::OutOfRange { .. })
    ));
    assert!(lun.identity().unwrap().starts_with("nbd:"));
}

#[test]
fn qemu_nbd_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, url) = qemu_nbd(dir.path(), 16 << 20);
    let lun = lun::open(&url).unwrap();
    exercise(&lun);
}

#[test]
fn nbdkit_tcp_memory() {
    require("nbdkit");
    let port = 20000 + (std::process::id() % 20000) as u16;
    let _srv = Server(
        Command::new("nbdkit")
            .args([
                "-f",
                "-i",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "--exportname",
                "mem",
                "memory",
                "32M",
            ])
            .spawn()
            .unwrap(),
    );
    let url = format!("nbd://127.0.0.1:{port}/mem");
    let t = Instant::now();
    let lun = loop {
        match lun::open(&url) {
            Ok(l) => break l,
            Err(e) => {
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "nbdkit never answered: {e}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    exercise(&lun);
}

#[test]
fn refused_export_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, url) = qemu_nbd(dir.path(), 16 << 20);
    let wrong = url.replace("///disk", "///nosuch");
    let err = lun::open(&wrong).err().expect("export must not exist");
    let msg = err.to_string();
    assert!(msg.contains("nosuch"), "{msg}");
}

/// A server that answers the handshake and then garbage: the client must fail
/// the request with a protocol error, not hang or panic.
#[test]
fn garbage_and_short_replies() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fake.sock");
    for mode in 0..3 {
        let _ = std::fs::remove_file(&sock);
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(&0x4e42444d41474943u64.to_be_bytes()).unwrap();
            s.write_all(&0x49484156454F5054u64.to_be_bytes()).unwrap();
            s.write_all(&3u16.to_be_bytes()).unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).unwrap();
            // STRUCTURED_REPLY option: refuse it (policy error).
            let mut o = [0u8; 16];
            s.read_exact(&mut o).unwrap();
            let reply = |s: &mut std::os::unix::net::UnixStream, opt: u32, t: u32, data: &[u8]| {
                s.write_all(&0x3e889045565a9u64.to_be_bytes()).unwrap();
                s.write_all(&opt.to_be_bytes()).unwrap();
                s.write_all(&t.to_be_bytes()).unwrap();
                s.write_all(&(data.len() as u32).to_be_bytes()).unwrap();
                s.write_all(data).unwrap();
            };
            reply(&mut s, 8, (1 << 31) | 1, &[]);
            let mut o = [0u8; 16];
            s.read_exact(&mut o).unwrap();
            let len = u32::from_be_bytes(o[12..16].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            s.read_exact(&mut d).unwrap();
            let mut info = vec![0, 0];
            info.extend_from_slice(&(1u64 << 20).to_be_bytes());
            info.extend_from_slice(&1u16.to_be_bytes());
            reply(&mut s, 7, 3, &info);
            reply(&mut s, 7, 1, &[]);
            let mut req = [0u8; 28];
            s.read_exact(&mut req).unwrap();
            match mode {
                0 => s.write_all(b"garbage garbage garbage").unwrap(),
                1 => {
                    // A simple reply with a cookie nobody sent.
                    s.write_all(&0x67446698u32.to_be_bytes()).unwrap();
                    s.write_all(&0u32.to_be_bytes()).unwrap();
                    s.write_all(&999u64.to_be_bytes()).unwrap();
                }
                _ => {
                    // Right header, data cut short, then hang up.
                    s.write_all(&0x67446698u32.to_be_bytes()).unwrap();
                    s.write_all(&0u32.to_be_bytes()).unwrap();
                    s.write_all(&req[8..16]).unwrap();
                    s.write_all(&[0u8; 100]).unwrap();
                }
            }
        });
        let url = format!("nbd+unix:///x?socket={}", sock.display());
        // A short I/O timeout: a cut connection is tried again until then.
        let lun = lun::open_with(
            &url,
            lun::OpenOptions {
                io_timeout: Some(Duration::from_millis(500)),
            },
        )
        .unwrap();
        let mut b = vec![0u8; 4096];
        let err = lun
            .read_at(&mut b, 0)
            .expect_err("a broken reply must fail");
        let msg = err.to_string();
        assert!(
            msg.contains("x?socket") || msg.contains("fake.sock"),
            "error names the LUN: {msg}"
        );
        // The connection is now dead, the server gone: later requests fail
        // (at once after a protocol error; within the I/O timeout after a
        // cut connection, which is tried again until then).
        let t = Instant::now();
        assert!(lun.read_at(&mut b, 0).is_err());
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        h.join().unwrap();
    }
}

/// qemu-nbd killed and started again under a writer: the client connects
/// again and sends what was in flight; every acknowledged write is there.
#[test]
fn survives_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (server, url) = qemu_nbd(dir.path(), 64 << 20);
    let lun: Arc<dyn Lun> = lun::open_with(
        &url,
        lun::OpenOptions {
            io_timeout: Some(Duration::from_secs(20)),
        },
    )
    .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (lun, stop) = (lun.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            let mut longest = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && n < 3000 {
                let t = Instant::now();
                lun.write_at(&[(n % 251) as u8; 16384], n * 16384)
                    .unwrap_or_else(|e| panic!("write {n}: {e}"));
                longest = longest.max(t.elapsed());
                n += 1;
            }
            (n, longest)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    drop(server); // SIGKILL
    std::thread::sleep(Duration::from_millis(500));
    let (_server, _) = serve_image(dir.path(), &dir.path().join("q.img"));
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (n, longest) = writer.join().unwrap();
    eprintln!("{n} writes acknowledged, the longest took {longest:?}");
    assert!(
        longest > Duration::from_millis(400),
        "the restart was not noticed"
    );
    for i in 0..n {
        let mut b = vec![0u8; 16384];
        lun.read_at(&mut b, i * 16384).unwrap();
        assert!(b.iter().all(|&x| x == (i % 251) as u8), "write {i} lost");
    }
}
