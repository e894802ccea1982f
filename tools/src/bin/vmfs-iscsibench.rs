//! Read throughput of our iSCSI backend against libiscsi's own `iscsi-perf`
//! on the same LUN, side by side: sequential 1 MiB and random 4 KiB reads,
//! 16 in flight each, and the ratio ours / iscsi-perf. Each round runs both back to back
//! (order alternating) and gives one ratio; the figures are medians over
//! ROUNDS rounds, so that a busy machine's drift hits both alike.
//!
//! vmfs-iscsibench [SECONDS] [ROUNDS] [iscsi://...]   (defaults 3 and 3)
//!
//! Without a URL it starts tgtd on a free loopback port over a 1 GiB file of
//! random bytes (in a temporary directory) and measures that.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lun::Lun;

const IN_FLIGHT: u64 = 16;

struct Tgtd(Child);
impl Drop for Tgtd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn adm(control: u16, args: &[&str]) -> Result<()> {
    let o = Command::new("tgtadm")
        .args(["-C", &control.to_string(), "--lld", "iscsi"])
        .args(args)
        .output()
        .context("run tgtadm (install the tgt package)")?;
    if !o.status.success() {
        bail!("tgtadm {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

/// tgtd over a 1 GiB file of random bytes; returns the server and the URL.
fn start_tgtd(dir: &std::path::Path) -> Result<(Tgtd, String)> {
    let img = dir.join("bench.img");
    let mut f = std::fs::File::create(&img)?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        for b in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        std::io::Write::write_all(&mut f, &buf)?;
    }
    f.sync_all()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let control = port & 0x7fff;
    let child = Command::new("tgtd")
        .args(["-f", "-C", &control.to_string(), "--iscsi"])
        .arg(format!("portal=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start tgtd (install the tgt package)")?;
    let server = Tgtd(child);
    let t = Instant::now();
    while adm(control, &["--op", "show", "--mode", "target"]).is_err()
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
    {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("tgtd did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let iqn = "iqn.2026-11.org.vmfs.bench:lun";
    adm(
        control,
        &["--op", "new", "--mode", "target", "--tid", "1", "-T", iqn],
    )?;
    adm(
        control,
        &[
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            "1",
            "--lun",
            "1",
            "-b",
            img.to_str().context("path")?,
        ],
    )?;
    adm(
        control,
        &[
            "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
        ],
    )?;
    Ok((server, format!("iscsi://127.0.0.1:{port}/{iqn}/1")))
}

/// Our backend: IN_FLIGHT threads reading `len`-byte pieces for `secs`;
/// returns (MB/s, IOPS).
fn ours(lun: &Arc<dyn Lun>, len: u64, random: bool, secs: u64) -> (f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let pieces = lun.size() / len;
    let t = Instant::now();
    std::thread::scope(|s| {
        for th in 0..IN_FLIGHT {
            let (lun, stop, ops) = (lun.clone(), stop.clone(), ops.clone());
            s.spawn(move || {
                let mut buf = vec![0u8; len as usize];
                let mut x = 0x2545_f491_4f6c_dd1du64 ^ (th + 1);
                let mut seq = th * pieces / IN_FLIGHT;
                while !stop.load(Ordering::Relaxed) {
                    let piece = if random {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x % pieces
                    } else {
                        seq = (seq + 1) % pieces;
                        seq
                    };
                    if let Err(e) = lun.read_at(&mut buf, piece * len) {
                        eprintln!("read failed: {e}");
                        return;
                    }
                    ops.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        std::thread::sleep(Duration::from_secs(secs));
        stop.store(true, Ordering::Relaxed);
    });
    let el = t.elapsed().as_secs_f64();
    let n = ops.load(Ordering::Relaxed) as f64;
    (n * len as f64 / el / 1e6, n / el)
}

/// iscsi-perf on the same LUN; returns (MB/s, IOPS) from its summary line.
fn iscsi_perf(url: &str, blocks: u64, random: bool, secs: u64) -> Result<(f64, f64)> {
    let mut c = Command::new("iscsi-perf");
    c.args([
        "-t",
        &secs.to_string(),
        "-m",
        &IN_FLIGHT.to_string(),
        "-b",
        &blocks.to_string(),
    ]);
    if random {
        c.arg("-r");
    }
    let o = c
        .arg(url)
        .output()
        .context("run iscsi-perf (install the libiscsi-bin package)")?;
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    // "... iops average 12847 (50 MB/s)" — the last one is the total.
    let last = out
        .rsplit("iops average ")
        .next()
        .filter(|_| out.contains("iops average "))
        .with_context(|| format!("no summary in iscsi-perf's output:\n{out}"))?;
    let iops: f64 = last
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .context("iscsi-perf's IOPS")?;
    let bytes = blocks as f64 * 512.0;
    Ok((iops * bytes / 1e6, iops))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let secs: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(3);
    let rounds: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    let dir = tempfile::tempdir()?;
    let (_server, url) = match args.iter().find(|a| a.starts_with("iscsi://")) {
        Some(u) => (None, u.clone()),
        None => {
            let (s, u) = start_tgtd(dir.path())?;
            (Some(s), u)
        }
    };
    let lun = lun::open(&url)?;
    if lun.block_size() != 512 {
        bail!("this bench assumes 512-byte blocks (iscsi-perf counts in blocks)");
    }
    println!(
        "{url}: {} MiB, {IN_FLIGHT} reads in flight, median of {rounds} rounds of {secs} s each",
        lun.size() >> 20
    );
    println!(
        "{:<22} {:>14} {:>14} {:>7}",
        "reads", "ours", "iscsi-perf", "ratio"
    );
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    for (name, len, random) in [
        ("sequential 1 MiB", 1u64 << 20, false),
        ("random 4 KiB", 4096, true),
    ] {
        // Each round runs both back to back (in alternating order) and
        // yields one ratio: the machine's drift between rounds (a busy
        // neighbour, the page cache) then cancels out of the ratio.
        let pick = |r: (f64, f64)| if random { r.1 } else { r.0 };
        let (mut o, mut p, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds {
            let (a, b) = if r % 2 == 0 {
                let a = pick(ours(&lun, len, random, secs));
                (a, pick(iscsi_perf(&url, len / 512, random, secs)?))
            } else {
                let b = pick(iscsi_perf(&url, len / 512, random, secs)?);
                (pick(ours(&lun, len, random, secs)), b)
            };
            o.push(a);
            p.push(b);
            ratios.push(a / b);
        }
        let unit = if random { "IOPS" } else { "MB/s" };
        let (lo, hi) = ratios
            .iter()
            .fold((f64::MAX, 0f64), |(l, h), r| (l.min(*r), h.max(*r)));
        println!(
            "{name:<22} {:>9.0} {unit} {:>9.0} {unit} {:>6.2}x   (rounds {lo:.2}x..{hi:.2}x)",
            median(o),
            median(p),
            median(ratios),
        );
    }
    Ok(())
}
