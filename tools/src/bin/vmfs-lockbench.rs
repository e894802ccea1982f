//! Volume lock acquire+release latency, p50/p99, on a file LUN
//! (compare-and-write) and on an NBD export served by qemu-nbd (Disk Paxos),
//! uncontended and with 4 contending hosts (threads, each its own slot).
//! The baseline beside each figure is one 512-byte write + read on the same
//! LUN: the ratio says how many such I/O round trips a lock costs.
//!
//! vmfs-lockbench [ROUNDS]      (default 2000 per host)

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

fn main() -> Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()
        .context("ROUNDS must be a number")?
        .unwrap_or(2000);
    let dir = tempfile_dir()?;
    let path = dir.join("lock.img");
    let f: Arc<dyn Lun> = Arc::new(lun::FileLun::create(&path, 1 << 20)?);
    report("file LUN", &f, rounds)?;
    let img = dir.join("nbd.img");
    std::fs::File::create(&img)?.set_len(1 << 20)?;
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
    let r = report("NBD (qemu-nbd, UNIX socket)", &n, rounds / 4);
    drop(n);
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("vmfs-lockbench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
