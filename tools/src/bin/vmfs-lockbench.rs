//! Volume lock acquire+release latency, p50/p99, on a file LUN
//! (compare-and-write) and on an NBD export served by qemu-nbd (Disk Paxos),
//! uncontended and with 4 contending hosts (threads, each its own slot).
//! The baseline beside each figure is one 512-byte write + read on the same
//! LUN: the ratio says how many such I/O round trips a lock costs.
//!
//! Then failover, on both LUNs: two `vmfs mount` processes (hosts); one
//! holds a file open for writing and is killed with SIGKILL; the time until
//! the other can open that file for writing (it has seen the silent
//! heartbeat, replayed the dead host's journal and freed its slot), beside
//! the goal of one lease plus one heartbeat.
//!
//! vmfs-lockbench [ROUNDS] [FAILOVERS]   (defaults 2000 per host, 5)

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lun::Lun;
use vmfs::locking::{Attempt, BallotBox, Dblock, Holder, VolumeLock, DBLOCK_LEN, SECTOR};

/// Ballot blocks at sectors 1.. of the LUN, written as the heartbeat code
/// writes a host's own sector: read, check, write.
struct Ballots<'a> {
    lun: &'a dyn Lun,
    slot: u32,
    n: u32,
}

impl BallotBox for Ballots<'_> {
    fn write_mine(&self, d: &Dblock) -> vmfs::locking::Result<()> {
        let off = (1 + u64::from(self.slot)) * SECTOR as u64;
        let mut b = vec![0u8; SECTOR];
        self.lun.read_at(&mut b, off)?;
        b[..DBLOCK_LEN].copy_from_slice(&d.encode());
        self.lun.write_at(&b, off)?;
        Ok(())
    }
    fn read_all(&self) -> vmfs::locking::Result<Vec<Dblock>> {
        let mut b = vec![0u8; self.n as usize * SECTOR];
        self.lun.read_at(&mut b, SECTOR as u64)?;
        Ok(b.chunks(SECTOR).map(Dblock::decode).collect())
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

/// Per-acquisition latencies of `hosts` hosts taking the lock `rounds` times each.
fn run(lun: &Arc<dyn Lun>, hosts: u32, rounds: usize) -> Result<Vec<Duration>> {
    lun.write_zeroes(0, 64 * SECTOR as u64, false)?;
    let vl = VolumeLock::new(lun.clone(), 0);
    let all = |_: &Holder| true;
    let out = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = (0..hosts)
            .map(|slot| {
                let (vl, lun, out) = (&vl, lun.clone(), &out);
                s.spawn(move || -> Result<()> {
                    let me = Holder {
                        slot,
                        generation: 1,
                    };
                    let bb = Ballots {
                        lun: &*lun,
                        slot,
                        n: hosts.max(1),
                    };
                    let mut mine = Vec::with_capacity(rounds);
                    for _ in 0..rounds {
                        let t = Instant::now();
                        loop {
                            match vl.try_acquire(me, &all, &bb)? {
                                Attempt::Acquired { .. } => break,
                                Attempt::Busy(_) => std::thread::yield_now(),
                                Attempt::Collided => std::thread::sleep(Duration::from_micros(
                                    100 + 97 * u64::from(slot),
                                )),
                            }
                        }
                        vl.release(me)?;
                        mine.push(t.elapsed());
                    }
                    out.lock().unwrap().extend(mine);
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join().expect("bench thread")?;
        }
        Ok(())
    })?;
    Ok(out.into_inner().unwrap())
}

fn baseline(lun: &Arc<dyn Lun>, rounds: usize) -> Result<Duration> {
    let mut v = Vec::with_capacity(rounds);
    let mut b = vec![7u8; SECTOR];
    for _ in 0..rounds {
        let t = Instant::now();
        lun.write_at(&b, 4096)?;
        lun.read_at(&mut b, 4096)?;
        v.push(t.elapsed());
    }
    Ok(pct(&mut v, 0.5))
}

fn report(name: &str, lun: &Arc<dyn Lun>, rounds: usize) -> Result<()> {
    let base = baseline(lun, rounds)?;
    println!(
        "{name}: {} (one 512 B write+read p50 {:.1} µs)",
        vmfs::locking::Method::for_lun(&**lun).describe(),
        base.as_secs_f64() * 1e6
    );
    for hosts in [1u32, 4] {
        let mut v = run(lun, hosts, rounds)?;
        let (p50, p99) = (pct(&mut v, 0.5), pct(&mut v, 0.99));
        println!(
            "  {hosts} host(s): acquire+release p50 {:>8.1} µs  p99 {:>8.1} µs  ({:.1}x the write+read)",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            p50.as_secs_f64() / base.as_secs_f64()
        );
    }
    Ok(())
}

/// Lease and heartbeat of the failover runs (the mount's default
/// heartbeat is lease / 8).
const LEASE_MS: u64 = 2000;
const HEARTBEAT_MS: u64 = LEASE_MS / 8;

/// A `vmfs mount --foreground` process as host `uuid`, once mounted.
fn mount_host(vmfs: &Path, lun: &str, mnt: &Path, uuid: &str) -> Result<Child> {
    std::fs::create_dir_all(mnt)?;
    let child = Command::new(vmfs)
        .args(["mount", "--foreground", "--host-uuid", uuid])
        .args(["--lease-ms", &LEASE_MS.to_string()])
        .args(["--heartbeat-ms", &HEARTBEAT_MS.to_string()])
        .arg(lun)
        .arg(mnt)
        .env("VMFS_LOG", "error")
        .spawn()
        .context("start vmfs mount")?;
    let t = Instant::now();
    let want = format!(" {} ", mnt.display());
    while !std::fs::read_to_string("/proc/self/mountinfo")?.contains(&want) {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(30),
            "{} did not mount",
            mnt.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

fn open_rw(p: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().read(true).write(true).open(p)
}

/// Kill-to-takeover times of `runs` failovers on the datastore at `lun`.
fn failover(vmfs: &Path, dir: &Path, lun: &str, runs: usize) -> Result<Vec<Duration>> {
    let (ma, mb) = (dir.join("host-a"), dir.join("host-b"));
    let mut out = Vec::new();
    for _ in 0..runs {
        let mut a = mount_host(vmfs, lun, &ma, "aaaaaaaa-0000-4000-8000-00000000000a")?;
        let mut held = std::fs::File::create(ma.join("disk"))?;
        std::io::Write::write_all(&mut held, &[7u8; 1 << 20])?;
        held.sync_all()?;
        let mut b = mount_host(vmfs, lun, &mb, "bbbbbbbb-0000-4000-8000-00000000000b")?;
        a.kill()?;
        let t = Instant::now();
        a.wait()?;
        drop(held);
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&ma)
            .status();
        let took = loop {
            match open_rw(&mb.join("disk")) {
                Ok(_) => break t.elapsed(),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "no takeover in 60 s");
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(e).context("open the dead host's file on the survivor"),
            }
        };
        out.push(took);
        // SAFETY: a plain signal to our own child.
        unsafe { libc::kill(b.id() as i32, libc::SIGTERM) };
        b.wait()?;
    }
    Ok(out)
}

fn report_failover(name: &str, lun: &str, dir: &Path, runs: usize) -> Result<()> {
    let vmfs = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("vmfs");
    let o = Command::new(&vmfs)
        .args(["mkfs", "--force", "--block-size", "64K", lun])
        .output()
        .context("run vmfs mkfs (build the vmfs binary beside this one)")?;
    anyhow::ensure!(
        o.status.success(),
        "mkfs: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut v = failover(&vmfs, dir, lun, runs)?;
    let ms: Vec<String> = v.iter().map(|d| format!("{}", d.as_millis())).collect();
    println!(
        "  failover ({name}), kill to takeover: median {} ms, max {} ms over {runs} runs [{}]; goal lease + heartbeat = {} ms",
        pct(&mut v, 0.5).as_millis(),
        pct(&mut v, 1.0).as_millis(),
        ms.join(", "),
        LEASE_MS + HEARTBEAT_MS
    );
    Ok(())
}

fn main() -> Result<()> {
    let arg = |n: usize, default: usize| -> Result<usize> {
        Ok(std::env::args()
            .nth(n)
            .map(|a| a.parse())
            .transpose()
            .context("ROUNDS and FAILOVERS must be numbers")?
            .unwrap_or(default))
    };
    let (rounds, failovers) = (arg(1, 2000)?, arg(2, 5)?);
    let dir = tempfile_dir()?;
    let path = dir.join("lock.img");
    let f: Arc<dyn Lun> = Arc::new(lun::FileLun::create(&path, 1 << 20)?);
    report("file LUN", &f, rounds)?;
    drop(f);
    let ds = dir.join("datastore.img");
    std::fs::File::create(&ds)?.set_len(256 << 20)?;
    if failovers > 0 {
        report_failover("file LUN", ds.to_str().context("path")?, &dir, failovers)?;
    }
    let img = dir.join("nbd.img");
    std::fs::File::create(&img)?.set_len(256 << 20)?;
    let sock = dir.join("nbd.sock");
    let mut server = std::process::Command::new("qemu-nbd")
        .args(["-f", "raw", "-x", "lock", "-t", "--shared=8", "-k"])
        .arg(&sock)
        .arg(&img)
        .spawn()
        .context("start qemu-nbd (Debian package qemu-utils)")?;
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("nbd+unix:///lock?socket={}", sock.display());
    let n = lun::open(&url)?;
    let mut r = report("NBD (qemu-nbd, UNIX socket)", &n, rounds / 4);
    drop(n);
    if r.is_ok() && failovers > 0 {
        r = report_failover("NBD", &url, &dir, failovers);
    }
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("vmfs-lockbench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
