//! Throughput of the datastore against its baselines, side by side in one run:
//! the library vs. the raw LUN file, and the FUSE mount (a `vmfs mount`
//! process, as users run it) vs. a raw file on the same disk. Prints MB/s
//! (or IOPS) and the ratio. Not a test: no pass/fail.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use vmfs::format::S_IFREG;
use vmfs::{Fs, MkfsOptions};

#[derive(Parser)]
#[command(about = "vmfs throughput vs. the raw LUN and a raw file")]
struct Args {
    /// Scratch directory on the disk to measure (needs ~4x --size free).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// File size in MiB.
    #[arg(long, default_value_t = 1024)]
    size: u64,
    /// Random 4 KiB reads per run.
    #[arg(long, default_value_t = 20000)]
    random_reads: u64,
    /// Rounds, each running baseline and vmfs back to back; the medians
    /// of the figures and of the rounds' ratios are reported (a virtual
    /// disk's throughput swings between runs).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Also print every round's figures (baseline / vmfs), to stderr.
    #[arg(long)]
    per_round: bool,
}

/// Drop a file's pages from the page cache so reads go to the disk.
fn evict(p: &Path) {
    if let Ok(f) = File::open(p) {
        let _ = f.sync_all();
        // SAFETY: plain integer arguments on a valid fd.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

struct Io<'a> {
    write: Box<dyn Fn(&[u8], u64) -> Result<()> + 'a>,
    read: Box<dyn Fn(&mut [u8], u64) -> Result<()> + 'a>,
    sync: Box<dyn Fn() -> Result<()> + 'a>,
    evict: Box<dyn Fn() + 'a>,
}

struct Figures {
    seq_write: f64,
    /// The same from a page-aligned buffer, as dd, cp and QEMU use. From
    /// a buffer that is not (a plain `Vec`, like most programs' buffers)
    /// FUSE splits each 1 MiB write in two requests at the buffer's page
    /// boundary (its request limit is 256 pages).
    seq_write_aligned: f64,
    seq_read: f64,
    rand_read: f64,
}

/// Sequential 1 MiB writes over the whole file, then fsync (MB/s); from a
/// page-aligned buffer if `aligned`, else from a plain `Vec`.
fn seq_write(io: &Io, size: u64, aligned: bool) -> Result<f64> {
    let v = vec![0xa5u8; (1 << 20) + 4096];
    let start = if aligned {
        v.as_ptr().align_offset(4096)
    } else {
        0
    };
    let buf = &v[start..start + (1 << 20)];
    let t = Instant::now();
    for k in 0..size {
        (io.write)(buf, k << 20)?;
    }
    (io.sync)()?;
    Ok(size as f64 / t.elapsed().as_secs_f64())
}

/// Sequential 1 MiB reads of the whole file (MB/s).
fn seq_read(io: &Io, size: u64) -> Result<f64> {
    let mut rb = vec![0u8; 1 << 20];
    let t = Instant::now();
    for k in 0..size {
        (io.read)(&mut rb, k << 20)?;
    }
    Ok(size as f64 / t.elapsed().as_secs_f64())
}

/// `nrand` 4 KiB reads at pseudo-random aligned offsets (IOPS).
fn rand_read(io: &Io, size: u64, nrand: u64) -> Result<f64> {
    let mut x = 0x2545f4914f6cdd1du64;
    let mut small = vec![0u8; 4096];
    let t = Instant::now();
    for _ in 0..nrand {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (io.read)(&mut small, (x % (size * 256)) * 4096)?;
    }
    Ok(nrand as f64 / t.elapsed().as_secs_f64())
}

/// Write a new file of `size` MiB in 1 MiB writes, fsync it (MB/s), and
/// remove it: the allocating write path (a copy onto the datastore).
fn new_file_write(path: &Path, size: u64) -> Result<f64> {
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut f = File::create(path)?;
    for _ in 0..size {
        std::io::Write::write_all(&mut f, &buf)?;
    }
    f.sync_all()?;
    let mbs = size as f64 / t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(path)?;
    Ok(mbs)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Medians over the rounds of the baseline's figures, of ours, and of
/// each round's ratio ours / baseline.
struct Compared {
    base: Figures,
    ours: Figures,
    ratio: Figures,
}

/// Run baseline and vmfs `rounds` times. In a round each kind of run
/// (sequential write, sequential read, random read) is made four times,
/// A B B A, where A is the baseline in even rounds and vmfs in odd ones,
/// with both files' caches dropped before each run; a side's figure is its
/// two runs' work over their total time. Each round gives one ratio per
/// figure, so the drift of a virtual disk's speed between rounds cancels
/// out of the ratios, and so does going first or second: on this VM a run
/// right after the other side's 1 GiB run can be several times slower or
/// faster (the host is still flushing or still caching that gigabyte).
/// `--per-round` shows how far apart single runs are.
fn compare(
    base: &Io,
    ours: &Io,
    size: u64,
    nrand: u64,
    rounds: usize,
    per_round: bool,
) -> Result<Compared> {
    let (mut b, mut o) = (Vec::new(), Vec::new());
    for r in 0..rounds.max(1) {
        // (baseline, vmfs) figures of one kind, run A B B A.
        let abba = |f: &dyn Fn(&Io) -> Result<f64>| -> Result<(f64, f64)> {
            let run = |io: &Io| {
                (base.evict)();
                (ours.evict)();
                f(io)
            };
            let (first, second) = if r % 2 == 0 {
                (base, ours)
            } else {
                (ours, base)
            };
            let a1 = run(first)?;
            let b1 = run(second)?;
            let b2 = run(second)?;
            let a2 = run(first)?;
            // Two runs of the same work: total work over total time.
            let rate = |x: f64, y: f64| 2.0 / (1.0 / x + 1.0 / y);
            let (a, b) = (rate(a1, a2), rate(b1, b2));
            Ok(if r % 2 == 0 { (a, b) } else { (b, a) })
        };
        let w = abba(&|io| seq_write(io, size, false))?;
        let wa = abba(&|io| seq_write(io, size, true))?;
        let sr = abba(&|io| seq_read(io, size))?;
        let rr = abba(&|io| rand_read(io, size, nrand))?;
        if per_round {
            eprintln!(
                "round {r}: seq write {:.0}/{:.0} (aligned {:.0}/{:.0}) MB/s, seq read {:.0}/{:.0} MB/s, rand read {:.0}/{:.0} IOPS",
                w.0, w.1, wa.0, wa.1, sr.0, sr.1, rr.0, rr.1
            );
        }
        b.push(Figures {
            seq_write: w.0,
            seq_write_aligned: wa.0,
            seq_read: sr.0,
            rand_read: rr.0,
        });
        o.push(Figures {
            seq_write: w.1,
            seq_write_aligned: wa.1,
            seq_read: sr.1,
            rand_read: rr.1,
        });
    }
    let med = |f: &dyn Fn(usize) -> f64| median((0..b.len()).map(f).collect());
    let figures = |g: &dyn Fn(&Figures) -> f64| -> [f64; 3] {
        [
            med(&|i| g(&b[i])),
            med(&|i| g(&o[i])),
            med(&|i| g(&o[i]) / g(&b[i])),
        ]
    };
    let w = figures(&|f| f.seq_write);
    let wa = figures(&|f| f.seq_write_aligned);
    let sr = figures(&|f| f.seq_read);
    let rr = figures(&|f| f.rand_read);
    let pick = |k: usize| Figures {
        seq_write: w[k],
        seq_write_aligned: wa[k],
        seq_read: sr[k],
        rand_read: rr[k],
    };
    Ok(Compared {
        base: pick(0),
        ours: pick(1),
        ratio: pick(2),
    })
}

fn row(name: &str, unit: &str, base: f64, ours: f64, ratio: f64, goal: &str) {
    println!("{name:<34} {base:>10.0} {ours:>10.0} {unit:<5} {ratio:>6.2}x   {goal}");
}

fn rows(c: &Compared, what: &str, base: &str, goals: [&str; 3]) {
    row(
        &format!("{what} seq write 1M vs {base}"),
        "MB/s",
        c.base.seq_write,
        c.ours.seq_write,
        c.ratio.seq_write,
        goals[0],
    );
    row(
        &format!("{what} seq write 1M, aligned buffer"),
        "MB/s",
        c.base.seq_write_aligned,
        c.ours.seq_write_aligned,
        c.ratio.seq_write_aligned,
        "",
    );
    row(
        &format!("{what} seq read 1M vs {base}"),
        "MB/s",
        c.base.seq_read,
        c.ours.seq_read,
        c.ratio.seq_read,
        goals[1],
    );
    row(
        &format!("{what} rand read 4K vs {base}"),
        "IOPS",
        c.base.rand_read,
        c.ours.rand_read,
        c.ratio.rand_read,
        goals[2],
    );
}

/// The `vmfs mount` process the FUSE rows measure; unmounted (and, if it
/// does not exit, killed) when dropped, so a failed run leaves no mount.
struct MountProcess {
    child: std::process::Child,
    mnt: PathBuf,
}

impl MountProcess {
    fn unmount(&mut self) -> Result<std::process::ExitStatus> {
        let _ = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mnt)
            .status();
        Ok(self.child.wait()?)
    }
}

impl Drop for MountProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = std::process::Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mnt)
                .status();
            std::thread::sleep(std::time::Duration::from_millis(500));
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
        }
    }
}

fn main() -> Result<()> {
    let a = Args::parse();
    let dir = a.dir.join(format!("vmfs-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let size = a.size;
    let lun_path = dir.join("lun.img");
    let raw_path = dir.join("raw.img");
    // Room for the preallocated file and a new one as large.
    let lun_size = (2 * size + 64) << 20;
    File::create(&lun_path)?.set_len(lun_size)?;
    let raw = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&raw_path)?;
    raw.set_len(size << 20)?;

    // Preallocate both: write every byte once, untimed.
    let lun: Arc<dyn lun::Lun> = lun::open(lun_path.to_str().context("path")?)?;
    let fs = Fs::mkfs(vec![lun], &MkfsOptions::default())?;
    let f = fs.create(fs.root(), b"disk", S_IFREG | 0o644, 0, 0, 0, None)?;
    let buf = vec![1u8; 1 << 20];
    for k in 0..size {
        fs.write(f.addr, k << 20, &buf)?;
        raw.write_all_at(&buf, k << 20)?;
    }
    fs.sync()?;
    raw.sync_all()?;

    let raw_io = Io {
        write: Box::new(|b, o| Ok(raw.write_all_at(b, o)?)),
        read: Box::new(|b, o| Ok(raw.read_exact_at(b, o)?)),
        sync: Box::new(|| Ok(raw.sync_data()?)),
        evict: Box::new(|| evict(&raw_path)),
    };
    let fid = f.addr;
    let lib_io = Io {
        write: Box::new(|b, o| {
            fs.write(fid, o, b)?;
            Ok(())
        }),
        read: Box::new(|b, o| {
            fs.read_into(fid, o, b)?;
            Ok(())
        }),
        sync: Box::new(|| Ok(fs.sync()?)),
        evict: Box::new(|| evict(&lun_path)),
    };
    println!("vmfs-bench: {size} MiB file, {} random 4 KiB reads, ratios: median of {} rounds' ratios, scratch {}", a.random_reads, a.rounds, dir.display());
    println!(
        "{:<34} {:>10} {:>10} {:<5} {:>7}   goal",
        "", "baseline", "vmfs", "unit", "ratio"
    );
    let c = compare(
        &raw_io,
        &lib_io,
        size,
        a.random_reads,
        a.rounds,
        a.per_round,
    )?;
    rows(
        &c,
        "library",
        "raw LUN",
        [">= 0.95x", ">= 0.95x", ">= 0.90x"],
    );

    // The same through the FUSE mount vs. the raw backing file: the
    // `vmfs mount` a user runs, in a process of its own (the binary built
    // beside this one), on the volume the library has just let go.
    drop(lib_io);
    fs.unmount()?;
    drop(fs);
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let vmfs_bin = std::env::current_exe()?.with_file_name("vmfs");
    let log = dir.join("mount.log");
    let child = std::process::Command::new(&vmfs_bin)
        .arg("mount")
        .arg("--foreground")
        .arg("--host-uuid")
        .arg(uuid::Uuid::new_v4().to_string())
        .arg(&lun_path)
        .arg(&mnt)
        .stdout(std::process::Stdio::null())
        .stderr(File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {}", vmfs_bin.display()))?;
    let mut mount = MountProcess {
        child,
        mnt: mnt.clone(),
    };
    let t = Instant::now();
    while !std::fs::read_to_string("/proc/self/mountinfo")?.contains(mnt.to_str().context("path")?)
    {
        if let Some(st) = mount.child.try_wait()? {
            anyhow::bail!(
                "vmfs mount exited ({st}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        anyhow::ensure!(t.elapsed().as_secs() < 20, "mount did not appear");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mounted_path = mnt.join("disk");
    let mf = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&mounted_path)?;
    let fuse_io = Io {
        write: Box::new(|b, o| Ok(mf.write_all_at(b, o)?)),
        read: Box::new(|b, o| Ok(mf.read_exact_at(b, o)?)),
        sync: Box::new(|| Ok(mf.sync_data()?)),
        evict: Box::new(|| {
            evict(&mounted_path);
            evict(&lun_path)
        }),
    };
    let c = compare(
        &raw_io,
        &fuse_io,
        size,
        a.random_reads,
        a.rounds,
        a.per_round,
    )?;
    rows(&c, "FUSE", "raw file", [">= 0.70x", ">= 0.70x", ""]);
    let (mut b, mut o, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..a.rounds.max(1) {
        let raw_new = dir.join("raw-new.img");
        let fuse_new = mnt.join("new");
        let (x, y) = if k % 2 == 0 {
            let x = new_file_write(&raw_new, size)?;
            (x, new_file_write(&fuse_new, size)?)
        } else {
            let y = new_file_write(&fuse_new, size)?;
            (new_file_write(&raw_new, size)?, y)
        };
        b.push(x);
        o.push(y);
        r.push(y / x);
    }
    row(
        "FUSE new-file write 1M vs raw",
        "MB/s",
        median(b),
        median(o),
        median(r),
        "",
    );
    drop(fuse_io);
    drop(mf);
    let st = mount.unmount()?;
    anyhow::ensure!(st.success(), "vmfs mount exited with {st}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
